//! Keyspace-wide commands, answered from every master: DBSIZE (sum), KEYS (concatenated),
//! SCAN (a cursor that walks the masters in turn), RANDOMKEY, FLUSHALL/FLUSHDB.
//!
//! SCAN cursor layout: `node_cursor << 14 | first_slot_of_node`. A node is named by the
//! lowest slot it owns, which stays meaningful across topology refreshes; when that slot
//! moved to another node the scan restarts on the new owner (SCAN may repeat keys, never
//! skips one that existed for the whole scan).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use rand::seq::SliceRandom;

use super::Pending;
use crate::client::session::Session;
use crate::error::Error;
use crate::parse::reply::{as_int, as_str, is_error, split_aggregate};
use crate::parse::request::Request;
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::{Node, Target};
use crate::Proxy;

const SLOT_BITS: u32 = 14;

pub async fn dispatch(px: &Arc<Proxy>, sess: &Session, name: &str, req: Request) -> Pending {
    let px = px.clone();
    let proto = sess.proto;
    let hint = sess.hint();
    let name = name.to_string();
    Pending::Deferred(Box::pin(async move {
        let r = match name.as_str() {
            "scan" => scan(&px, proto, hint, &req.args).await,
            "randomkey" => randomkey(&px, proto, hint, &req).await,
            _ => fan_out(&px, proto, hint, &name, &req).await,
        };
        r.unwrap_or_else(|e| e.to_reply())
    }))
}

async fn all_masters(px: &Proxy) -> Result<Vec<Arc<Node>>, Error> {
    Ok(px.upstream.topology()?.masters.clone())
}

async fn fan_out(
    px: &Proxy,
    proto: Proto,
    hint: usize,
    name: &str,
    req: &Request,
) -> Result<Value, Error> {
    let replies = px
        .upstream
        .on_every_master(req.raw.clone(), proto, hint)
        .await?;
    match name {
        "dbsize" => {
            let mut sum = 0;
            for r in &replies {
                sum += as_int(r).ok_or_else(|| Error::proxy("unexpected DBSIZE reply"))?;
            }
            Ok(Value::Int(sum))
        }
        "keys" => {
            let mut items = Vec::new();
            for r in &replies {
                items.extend(
                    split_aggregate(r).ok_or_else(|| Error::proxy("unexpected KEYS reply"))?,
                );
            }
            Ok(raw_array(&items))
        }
        // FLUSHALL / FLUSHDB: every master said OK.
        _ => Ok(Value::ok()),
    }
}

fn raw_array(items: &[Bytes]) -> Value {
    let mut out = BytesMut::new();
    out.put_slice(format!("*{}\r\n", items.len()).as_bytes());
    for i in items {
        out.put_slice(i);
    }
    Value::Raw(out.freeze())
}

async fn randomkey(px: &Proxy, proto: Proto, hint: usize, req: &Request) -> Result<Value, Error> {
    let mut masters = all_masters(px).await?;
    masters.shuffle(&mut rand::thread_rng());
    for n in masters {
        let raw = px
            .upstream
            .call(Target::Node(n), req.raw.clone(), proto, hint)
            .await?;
        if is_error(&raw) || as_str(&raw).is_some() {
            return Ok(Value::Raw(raw));
        }
    }
    Ok(Value::Null)
}

async fn scan(px: &Proxy, proto: Proto, hint: usize, args: &[Bytes]) -> Result<Value, Error> {
    let cursor = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Error::redis("ERR invalid cursor"))?;
    let topo = px.upstream.topology()?;
    let order = topo.masters_by_first_slot();
    if order.is_empty() {
        return Err(Error::NoTopology("no masters known".into()));
    }
    let slot = (cursor & ((1 << SLOT_BITS) - 1)) as u16;
    let mut node_cursor = cursor >> SLOT_BITS;
    let pos = match order.iter().position(|(s, _)| *s == slot) {
        Some(p) => p,
        None => {
            // That node no longer exists as such: continue with the slot's new owner.
            node_cursor = 0;
            order.iter().rposition(|(s, _)| *s <= slot).unwrap_or(0)
        }
    };
    let (first_slot, node) = &order[pos];
    let mut sub: Vec<Bytes> = Vec::with_capacity(args.len());
    sub.push(args[0].clone());
    sub.push(Bytes::from(node_cursor.to_string()));
    sub.extend(args[2..].iter().cloned());
    let raw = px
        .upstream
        .call(Target::Node(node.clone()), command_bytes(&sub), proto, hint)
        .await?;
    if is_error(&raw) {
        return Ok(Value::Raw(raw));
    }
    let parts = split_aggregate(&raw).ok_or_else(|| Error::proxy("unexpected SCAN reply"))?;
    let (Some(next), Some(keys)) = (parts.first(), parts.get(1)) else {
        return Err(Error::proxy("unexpected SCAN reply"));
    };
    let next = as_str(next)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Error::proxy("unexpected SCAN cursor"))?;
    let out_cursor = if next != 0 {
        if next >> (64 - SLOT_BITS) != 0 {
            return Err(Error::proxy("upstream SCAN cursor too large to combine"));
        }
        (next << SLOT_BITS) | *first_slot as u64
    } else {
        match order.get(pos + 1) {
            Some((s, _)) => *s as u64,
            None => 0,
        }
    };
    Ok(Value::Array(vec![
        Value::bulk_str(&out_cursor.to_string()),
        Value::Raw(keys.clone()),
    ]))
}
