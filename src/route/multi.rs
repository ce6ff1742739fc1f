//! Multi-key commands whose keys span slots: split into one sub-command per slot, sent
//! together, merged back in key order (MGET), all-or-first-error (MSET) or summed (DEL,
//! UNLINK, EXISTS, TOUCH). Keys in one slot, or a standalone upstream, forward unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::Pending;
use crate::client::session::Session;
use crate::error::Error;
use crate::parse::reply::{as_int, is_error, split_aggregate};
use crate::parse::request::Request;
use crate::parse::table::{CommandInfo, Policy};
use crate::respond::{command_bytes, Value};
use crate::upstream::{key_slot, Mode, Target};
use crate::Proxy;

pub async fn dispatch(
    px: &Arc<Proxy>,
    sess: &Session,
    policy: Policy,
    info: &CommandInfo,
    req: Request,
) -> Pending {
    let args = &req.args;
    if policy == Policy::Mset && args.len().is_multiple_of(2) {
        return Pending::error(Error::arity(&info.name));
    }
    let keys = info.key_indices(args);
    let Some(&first) = keys.first() else {
        return Pending::error(Error::arity(&info.name));
    };
    let slot0 = key_slot(&args[first]);
    let single = px.upstream.mode() != Some(Mode::Cluster)
        || keys.iter().all(|&i| key_slot(&args[i]) == slot0);
    if single {
        let t = px
            .upstream
            .start(Target::Slot(slot0), req.raw, sess.proto, sess.hint())
            .await;
        return Pending::Forwarded(t);
    }

    // Group key positions by slot; BTreeMap keeps the split deterministic.
    let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for &i in &keys {
        groups.entry(key_slot(&args[i])).or_default().push(i);
    }
    let mut parts = Vec::with_capacity(groups.len());
    for (slot, idxs) in groups {
        let mut sub: Vec<&[u8]> = vec![&args[0]];
        for &i in &idxs {
            sub.push(&args[i]);
            if policy == Policy::Mset {
                sub.push(&args[i + 1]);
            }
        }
        let t = px
            .upstream
            .start(
                Target::Slot(slot),
                command_bytes(&sub),
                sess.proto,
                sess.hint(),
            )
            .await;
        parts.push((idxs, t));
    }
    let px = px.clone();
    let nkeys = keys.len();
    let key_order = keys;
    Pending::Later(Box::pin(async move {
        let mut replies = Vec::with_capacity(parts.len());
        for (idxs, t) in parts {
            match px.upstream.finish(t).await {
                Ok(raw) => replies.push((idxs, raw)),
                Err(e) => return e.to_reply(),
            }
        }
        if let Some((_, err)) = replies.iter().find(|(_, r)| is_error(r)) {
            return Value::Raw(err.clone());
        }
        match policy {
            Policy::Mget => merge_mget(nkeys, &key_order, replies),
            Policy::Mset => Value::ok(),
            _ => {
                let mut sum = 0i64;
                for (_, r) in &replies {
                    match as_int(r) {
                        Some(n) => sum += n,
                        None => {
                            return Error::proxy("unexpected reply to a split command").to_reply()
                        }
                    }
                }
                Value::Int(sum)
            }
        }
    }))
}

/// Puts each sub-reply's elements back at their keys' positions.
fn merge_mget(nkeys: usize, key_order: &[usize], replies: Vec<(Vec<usize>, Bytes)>) -> Value {
    let mut by_arg: BTreeMap<usize, Bytes> = BTreeMap::new();
    for (idxs, raw) in replies {
        let Some(items) = split_aggregate(&raw) else {
            return Error::proxy("unexpected reply to a split MGET").to_reply();
        };
        if items.len() != idxs.len() {
            return Error::proxy("split MGET reply has the wrong length").to_reply();
        }
        for (i, item) in idxs.into_iter().zip(items) {
            by_arg.insert(i, item);
        }
    }
    let mut out = BytesMut::new();
    out.put_slice(format!("*{nkeys}\r\n").as_bytes());
    for i in key_order {
        match by_arg.get(i) {
            Some(b) => out.put_slice(b),
            None => return Error::proxy("split MGET lost a key").to_reply(),
        }
    }
    Value::Raw(out.freeze())
}
