//! Tag-based invalidation across slots (the seed's tag invalidation):
//! `TIERPROXY.TAG key tag [tag …]` records that `key` carries each tag;
//! `TIERPROXY.INVALIDATE tag` deletes every key carrying it, wherever those keys live.
//!
//! A tag's members are a Redis set named `tierproxy:tag:{<tag>}`: the tag is its own
//! hash tag, so one tag's set sits in one slot while its keys may be in any slot. The
//! deletes are ordinary DELs per slot, so every proxy's L1 hears of them through
//! tracking. INVALIDATE walks the set with SSCAN (bounded memory) and removes only the
//! members it deleted, so a key tagged meanwhile keeps its tag.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::Pending;
use crate::client::session::Session;
use crate::error::Error;
use crate::parse::reply::{as_int, error_text, scan_reply};
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::{key_slot, Target};
use crate::Proxy;

const SCAN_BATCH: &str = "500";

fn tag_set(tag: &[u8]) -> Bytes {
    let mut name = b"tierproxy:tag:{".to_vec();
    name.extend_from_slice(tag);
    name.push(b'}');
    Bytes::from(name)
}

fn reply_err(raw: &[u8]) -> Option<Error> {
    error_text(raw).map(Error::redis)
}

/// `TIERPROXY.TAG key tag [tag …]`: the number of tags newly attached.
pub fn tag(px: &Arc<Proxy>, sess: &Session, args: Vec<Bytes>) -> Pending {
    let px = px.clone();
    let hint = sess.hint();
    Pending::Deferred(Box::pin(async move {
        let key = &args[1];
        let mut tickets = Vec::new();
        for t in &args[2..] {
            let set = tag_set(t);
            let cmd = command_bytes(&[&b"SADD"[..], &set, key]);
            tickets.push(
                px.upstream
                    .start(Target::Slot(key_slot(&set)), cmd, Proto::Resp2, hint)
                    .await,
            );
        }
        let mut added = 0;
        for t in tickets {
            match px.upstream.finish(t).await {
                Ok(raw) => match (as_int(&raw), reply_err(&raw)) {
                    (Some(n), _) => added += n,
                    (_, Some(e)) => return e.to_reply(),
                    _ => return Error::proxy("unexpected SADD reply").to_reply(),
                },
                Err(e) => return e.to_reply(),
            }
        }
        Value::Int(added)
    }))
}

/// `TIERPROXY.INVALIDATE tag`: deletes every key carrying the tag; the number deleted.
pub fn invalidate(px: &Arc<Proxy>, sess: &Session, args: Vec<Bytes>) -> Pending {
    let px = px.clone();
    let hint = sess.hint();
    Pending::Deferred(Box::pin(async move {
        match invalidate_tag(&px, hint, &args[1]).await {
            Ok(n) => Value::Int(n),
            Err(e) => e.to_reply(),
        }
    }))
}

async fn invalidate_tag(px: &Proxy, hint: usize, tag: &[u8]) -> Result<i64, Error> {
    let set = tag_set(tag);
    let set_target = || Target::Slot(key_slot(&set));
    let mut cursor = Bytes::from_static(b"0");
    let mut deleted = 0;
    loop {
        let cmd = command_bytes(&[
            &b"SSCAN"[..],
            &set,
            &cursor,
            b"COUNT",
            SCAN_BATCH.as_bytes(),
        ]);
        let raw = px
            .upstream
            .call(set_target(), cmd, Proto::Resp2, hint)
            .await?;
        if let Some(e) = reply_err(&raw) {
            return Err(e);
        }
        let (next, members) =
            scan_reply(&raw).ok_or_else(|| Error::proxy("unexpected SSCAN reply"))?;
        if !members.is_empty() {
            let mut by_slot: BTreeMap<u16, Vec<Bytes>> = BTreeMap::new();
            for m in &members {
                by_slot.entry(key_slot(m)).or_default().push(m.clone());
            }
            let mut tickets = Vec::new();
            for (slot, keys) in by_slot {
                if let Some(l1) = &px.l1 {
                    for k in &keys {
                        l1.invalidate(k);
                    }
                }
                let mut del: Vec<Bytes> = vec![Bytes::from_static(b"DEL")];
                del.extend(keys);
                tickets.push(
                    px.upstream
                        .start(Target::Slot(slot), command_bytes(&del), Proto::Resp2, hint)
                        .await,
                );
            }
            for t in tickets {
                let raw = px.upstream.finish(t).await?;
                if let Some(e) = reply_err(&raw) {
                    return Err(e);
                }
                deleted += as_int(&raw).unwrap_or(0);
            }
            if let Some(l1) = &px.l1 {
                for k in &members {
                    l1.invalidate(k);
                }
            }
            let mut srem: Vec<Bytes> = vec![Bytes::from_static(b"SREM"), set.clone()];
            srem.extend(members);
            let raw = px
                .upstream
                .call(set_target(), command_bytes(&srem), Proto::Resp2, hint)
                .await?;
            if let Some(e) = reply_err(&raw) {
                return Err(e);
            }
        }
        if &next[..] == b"0" {
            return Ok(deleted);
        }
        cursor = next;
    }
}
