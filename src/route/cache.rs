//! The L1 side of the request path: cacheable reads served from and filled into L1,
//! and writes invalidating their keys before their replies go out.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::Pending;
use crate::client::session::Session;
use crate::l1::{Role, L1};
use crate::parse::reply::{as_int, is_error};
use crate::parse::request::Request;
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::Target;
use crate::Proxy;

/// Deterministic, read-only commands about one key whose reply depends only on the key's
/// value. Never: anything time- or randomness-dependent (TTL, PTTL, OBJECT, SRANDMEMBER,
/// HRANDFIELD, ZRANDMEMBER, RANDOMKEY) — they are simply not listed.
pub fn cacheable(name: &str) -> bool {
    matches!(
        name,
        "get"
            | "mget"
            | "getrange"
            | "substr"
            | "strlen"
            | "getbit"
            | "bitcount"
            | "bitpos"
            | "exists"
            | "type"
            | "hget"
            | "hmget"
            | "hgetall"
            | "hlen"
            | "hexists"
            | "hstrlen"
            | "hkeys"
            | "hvals"
            | "smembers"
            | "sismember"
            | "smismember"
            | "scard"
            | "lrange"
            | "lindex"
            | "llen"
            | "lpos"
            | "zrange"
            | "zrangebyscore"
            | "zrevrange"
            | "zrevrangebyscore"
            | "zrangebylex"
            | "zrevrangebylex"
            | "zscore"
            | "zmscore"
            | "zcard"
            | "zrank"
            | "zrevrank"
            | "zcount"
            | "zlexcount"
    )
}

/// Whether a stored signature is that of this request, without building one: the hit
/// path allocates nothing.
fn signature_matches(sig: &[u8], proto: Proto, args: &[Bytes]) -> bool {
    let Some((&v, mut rest)) = sig.split_first() else {
        return false;
    };
    if v != proto.version() as u8 {
        return false;
    }
    let mut header = itoa::Buffer::new();
    let count = header.format(args.len());
    let Some(r) = rest
        .strip_prefix(b"*")
        .and_then(|r| r.strip_prefix(count.as_bytes()))
    else {
        return false;
    };
    rest = r;
    for (i, a) in args.iter().enumerate() {
        let Some(r) = rest.strip_prefix(b"\r\n$") else {
            return false;
        };
        let mut len = itoa::Buffer::new();
        let Some(r) = r.strip_prefix(len.format(a.len()).as_bytes()) else {
            return false;
        };
        let Some(r) = r.strip_prefix(b"\r\n") else {
            return false;
        };
        if r.len() < a.len() {
            return false;
        }
        let (body, r) = r.split_at(a.len());
        let same = if i == 0 {
            body.eq_ignore_ascii_case(a)
        } else {
            body == &a[..]
        };
        if !same {
            return false;
        }
        rest = r;
    }
    rest == b"\r\n"
}

/// The cache key of a request within its key's entry: protocol version and the command
/// with its name lower-cased, so `GET k`, `get k` and an MGET of `k` share one reply.
fn signature(proto: Proto, args: &[Bytes]) -> Bytes {
    let mut sig = BytesMut::with_capacity(args.iter().map(|a| a.len() + 8).sum::<usize>() + 1);
    sig.put_u8(proto.version() as u8);
    let mut canonical: Vec<Bytes> = Vec::with_capacity(args.len());
    canonical.push(Bytes::from(args[0].to_ascii_lowercase()));
    canonical.extend(args[1..].iter().cloned());
    crate::respond::encode_command(&canonical, &mut sig);
    sig.freeze()
}

/// MGET of several keys: each key is a cached GET (an MGET element is byte for byte the
/// GET reply), merged in key order. A key of another type is nil, as in MGET.
pub async fn mget(px: &Arc<Proxy>, sess: &mut Session, l1: &Arc<L1>, keys: Vec<Bytes>) -> Pending {
    let mut parts = Vec::with_capacity(keys.len());
    for key in keys {
        let req = Request::from_args(vec![Bytes::from_static(b"GET"), key.clone()]);
        parts.push(read(px, sess, l1, key, req).await);
    }
    // From L1 only if every key was.
    if !parts.iter().all(|p| matches!(p, Pending::Ready(_))) {
        sess.level = crate::metrics::Level::L2;
    }
    let px = px.clone();
    let proto = sess.proto;
    Pending::Later(Box::pin(async move {
        let mut out = BytesMut::new();
        out.put_slice(format!("*{}\r\n", parts.len()).as_bytes());
        for p in parts {
            let v = p.resolve(&px).await;
            let raw = v.to_bytes(proto);
            if raw.starts_with(b"-WRONGTYPE") {
                Value::Null.encode(proto, &mut out);
            } else if is_error(&raw) {
                return Value::Raw(raw);
            } else {
                out.put_slice(&raw);
            }
        }
        Value::Raw(out.freeze())
    }))
}

/// A cacheable read of one key: from L1, or from upstream (merged with identical reads
/// in flight) and then filled, with the key's PTTL read in the same round trip.
pub async fn read(
    px: &Arc<Proxy>,
    sess: &mut Session,
    l1: &Arc<L1>,
    key: Bytes,
    req: Request,
) -> Pending {
    let proto = sess.proto;
    let hint = sess.hint();
    if let Some(reply) = l1.get(&key, |s| signature_matches(s, proto, &req.args)) {
        sess.level = crate::metrics::Level::L1;
        return Pending::Ready(Value::Raw(reply));
    }
    let target = Target::Slot(crate::upstream::key_slot(&key));
    let sig = signature(proto, &req.args);
    if !l1.admit(&key) {
        let ticket = px.upstream.start(target, req.raw, proto, hint).await;
        let (px, l1) = (px.clone(), l1.clone());
        return Pending::Later(Box::pin(async move {
            match unspill(&px, px.upstream.finish(ticket).await).await {
                Ok(reply) => {
                    count_l2(&l1, &reply);
                    Value::Raw(reply)
                }
                Err(e) => or_stale(&l1, &key, &sig, e),
            }
        }));
    }
    match l1.lead_or_follow(&sig, &key) {
        Role::Follow(rx) => {
            let px = px.clone();
            let l1 = l1.clone();
            Pending::Later(Box::pin(async move {
                match rx.await {
                    Ok(reply) => Value::Raw(reply),
                    // The leader gave up (its client left, or it failed): read ourselves.
                    Err(_) => {
                        match unspill(&px, px.upstream.call(target, req.raw, proto, hint).await)
                            .await
                        {
                            Ok(raw) => Value::Raw(raw),
                            Err(e) => or_stale(&l1, &key, &sig, e),
                        }
                    }
                }
            }))
        }
        Role::Lead(guard) => {
            let token = guard.token;
            let value = px
                .upstream
                .start(target.clone(), req.raw, proto, hint)
                .await;
            let pttl_cmd = command_bytes(&[&b"PTTL"[..], &key]);
            let pttl = px.upstream.start(target, pttl_cmd, proto, hint).await;
            let px = px.clone();
            let l1 = l1.clone();
            Pending::Later(Box::pin(async move {
                let reply = unspill(&px, px.upstream.finish(value).await).await;
                let pttl = px.upstream.finish(pttl).await.ok().and_then(|b| as_int(&b));
                match reply {
                    Ok(reply) => {
                        count_l2(&l1, &reply);
                        if let (Some(ms), false) = (pttl, is_error(&reply)) {
                            l1.fill(key, token, sig, reply.clone(), ms);
                        }
                        guard.complete(&reply);
                        Value::Raw(reply)
                    }
                    Err(e) => or_stale(&l1, &key, &sig, e),
                }
            }))
        }
    }
}

/// The error for a read the upstream could not answer, or, with
/// `l1.serve_stale_on_error` and the upstream unreachable, the last reply cached for it.
fn or_stale(l1: &L1, key: &[u8], sig: &Bytes, e: crate::error::Error) -> Value {
    use crate::error::{Error, UpstreamError as U};
    let unreachable = match &e {
        Error::NoTopology(_) => true,
        Error::Upstream { source, .. } => matches!(
            source,
            U::Connect(_) | U::ConnectTimeout(_) | U::ConnectionLost
        ),
        _ => false,
    };
    if unreachable {
        if let Some(reply) = l1.get_stale(key, |s| s == &sig[..]) {
            return Value::Raw(reply);
        }
    }
    e.to_reply()
}

/// A reply from Redis with any spill stub in it resolved (before it is cached).
async fn unspill(
    px: &Proxy,
    reply: Result<Bytes, crate::error::Error>,
) -> Result<Bytes, crate::error::Error> {
    match (reply, px.spill.as_ref()) {
        (Ok(raw), Some(spill)) => super::spill::resolve_reply(spill, raw).await,
        (r, _) => r,
    }
}

/// L2 (Redis) hit or miss for a read L1 could not answer: a nil reply is a miss.
fn count_l2(l1: &L1, reply: &[u8]) {
    let nil = matches!(reply, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n");
    let c = if nil {
        &l1.stats.l2_misses
    } else {
        &l1.stats.l2_hits
    };
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Runs a write with its keys marked as being written (see [`L1::begin_write`]) until
/// it is acknowledged, so no read can be served, joined or filled with the old value in
/// between; the guard invalidates the keys again before the reply leaves.
pub fn after_write(
    px: &Arc<Proxy>,
    l1: &Arc<L1>,
    guard: crate::l1::WriteGuard,
    flush: bool,
    p: Pending,
) -> Pending {
    let px = px.clone();
    let l1 = l1.clone();
    p.then(move |p| async move {
        let v = p.resolve(&px).await;
        drop(guard);
        if flush {
            l1.flush("FLUSHALL/FLUSHDB through the proxy");
        }
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::parse::request::args;

    #[test]
    fn signature_matching_agrees_with_building() {
        let sig = signature(Proto::Resp2, &args(&["GET", "k"]));
        assert!(signature_matches(&sig, Proto::Resp2, &args(&["get", "k"])));
        assert!(signature_matches(&sig, Proto::Resp2, &args(&["GeT", "k"])));
        assert!(!signature_matches(&sig, Proto::Resp3, &args(&["GET", "k"])));
        assert!(!signature_matches(&sig, Proto::Resp2, &args(&["GET", "K"])));
        assert!(!signature_matches(
            &sig,
            Proto::Resp2,
            &args(&["GET", "k", "x"])
        ));
        assert!(!signature_matches(
            &sig,
            Proto::Resp2,
            &args(&["GET", "kk"])
        ));
        let h = signature(Proto::Resp3, &args(&["HGET", "h", "f"]));
        assert!(signature_matches(
            &h,
            Proto::Resp3,
            &args(&["hget", "h", "f"])
        ));
        assert!(!signature_matches(
            &h,
            Proto::Resp3,
            &args(&["hget", "h", "g"])
        ));
    }
}
