//! The L1 side of the request path: cacheable reads served from and filled into L1,
//! and writes invalidating their keys before their replies go out.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::Pending;
use crate::client::session::Session;
use crate::l1::{Role, L1};
use crate::parse::reply::{as_int, as_str, is_error, split_aggregate};
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

/// The common case of [`signature_matches`], in three compares: the client sent the
/// canonical multibulk (`raw`, whose command name is `name_len` bytes long), so the
/// signature is the protocol byte and `raw` with the name lower-cased. False says
/// nothing: the request may still match in another spelling.
fn raw_matches(sig: &[u8], proto: Proto, raw: &[u8], name_len: usize) -> bool {
    let digits = |n: usize| n.checked_ilog10().unwrap_or(0) as usize + 1;
    let Some((&v, sig)) = sig.split_first() else {
        return false;
    };
    if v != proto.version() as u8 || sig.len() != raw.len() || raw.first() != Some(&b'*') {
        return false;
    }
    // `*<argc>\r\n$<name_len>\r\n`: the argument count's digits are found, the name's
    // length is known.
    let Some(cr) = raw.iter().position(|&b| b == b'\r') else {
        return false;
    };
    let name = cr + 2 + 1 + digits(name_len) + 2;
    let Some(rest) = name.checked_add(name_len).filter(|&e| e <= raw.len()) else {
        return false;
    };
    sig[..name] == raw[..name]
        && sig[name..rest].eq_ignore_ascii_case(&raw[name..rest])
        && sig[rest..] == raw[rest..]
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

/// What the fast lane's L1 lookup found ([`lane_read`]).
pub enum LaneRead<R> {
    /// L1 held the reply; `take` was given it.
    Hit(R),
    /// A miss that is forwarded as it is, to the key's slot: the key is not (yet) hot
    /// enough to cache, or a write of it through this proxy is in flight (a fill would
    /// be refused). Counted as a miss here; the reply counts as an L2 hit or miss.
    Forward(Target),
    /// For the ordinary path: a miss to read and fill (`missed`: admitted, counted), or
    /// not looked up (not one read of one key; `l1.serve_stale_on_error`).
    Ordinary { missed: bool },
}

/// The fast lane's L1 lookup (see `route::plan_forward`) of a read of one key: a hit,
/// or how the miss is taken. Counts misses; the lane counts its hits.
pub fn lane_read<R>(
    px: &Arc<Proxy>,
    sess: &Session,
    l1: &Arc<L1>,
    info: &crate::parse::table::CommandInfo,
    req: &Request,
    now: std::time::Instant,
    take: impl FnOnce(&Bytes) -> R,
) -> LaneRead<R> {
    let args = &req.args;
    let (mut key, mut keys) = (0, 0);
    info.for_each_key(args, |i| {
        key = i;
        keys += 1;
    });
    if keys != 1 {
        return LaneRead::Ordinary { missed: false };
    }
    let key = &args[key];
    let proto = sess.proto;
    let matches = |s: &[u8]| {
        raw_matches(s, proto, &req.raw, args[0].len()) || signature_matches(s, proto, args)
    };
    if let Some((r, refresh)) = l1.lookup_with(key, now, matches, take) {
        if refresh {
            refresh_ahead(px, l1, key.clone(), signature(proto, args), sess.hint());
        }
        return LaneRead::Hit(r);
    }
    // Serving stale on an upstream error is the ordinary path's: it looks again.
    if l1.serves_stale() {
        return LaneRead::Ordinary { missed: false };
    }
    l1.stats
        .misses
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if l1.being_written(key) || !l1.admit(key) {
        return LaneRead::Forward(Target::Slot(crate::upstream::key_slot(key)));
    }
    LaneRead::Ordinary { missed: true }
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
    let matches = |s: &[u8]| {
        raw_matches(s, proto, &req.raw, req.args[0].len()) || signature_matches(s, proto, &req.args)
    };
    // Looked up, counted and admitted a moment ago by the fast lane: a miss (going
    // upstream is always right).
    let lane_missed = sess.l1_missed.take();
    let hit = if lane_missed.is_some() {
        None
    } else {
        l1.get(&key, matches)
    };
    if let Some(hit) = hit {
        sess.level = crate::metrics::Level::L1;
        if hit.refresh {
            refresh_ahead(px, l1, key, signature(proto, &req.args), hint);
        }
        return Pending::Ready(Value::Raw(hit.reply));
    }
    let target = Target::Slot(crate::upstream::key_slot(&key));
    let sig = signature(proto, &req.args);
    // Not hot enough to cache, or being written through this proxy (the fill would be
    // refused): read as it is, without the PTTL.
    if l1.being_written(&key) || !lane_missed.unwrap_or_else(|| l1.admit(&key)) {
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
                        let read = Box::pin(px.upstream.call(target, req.raw, proto, hint));
                        match unspill(&px, read.await).await {
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
                let reply = unspill_held(&px, px.upstream.finish(value).await).await;
                let pttl = px.upstream.finish(pttl).await.ok().and_then(|b| as_int(&b));
                match reply {
                    Ok((reply, held)) => {
                        count_l2(&l1, &reply);
                        if let (Some(ms), false) = (pttl, is_error(&reply)) {
                            l1.fill(key, token, sig, reply.clone(), held, ms);
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

/// Re-reads a hot cached reply near its expiry in the background (refresh-ahead): the
/// request is the reply's signature itself (protocol byte + exact command), with the
/// key's PTTL in the same round trip, filled like any read (the fill-race guard
/// applies). At most `l1.refresh_ahead_concurrency` at once; a due refresh beyond that
/// is skipped and may be retried by a later hit.
fn refresh_ahead(px: &Arc<Proxy>, l1: &Arc<L1>, key: Bytes, sig: Bytes, hint: usize) {
    let Ok(permit) = l1.refresh_slots.clone().try_acquire_owned() else {
        l1.stats
            .refreshes_skipped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        l1.refresh_done(&key, &sig);
        return;
    };
    l1.stats
        .refreshes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (px, l1) = (px.clone(), l1.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let proto = if sig.first() == Some(&3) {
            Proto::Resp3
        } else {
            Proto::Resp2
        };
        if !load(&px, &l1, &key, &sig, proto, hint).await {
            l1.refresh_done(&key, &sig);
        }
    });
}

/// Reads the request of signature `sig` (protocol byte + command) and its key's PTTL
/// upstream, stubs resolved: the fill token taken before it was sent, the reply and the
/// PTTL. None if either failed or the reply is an error.
async fn fetch(
    px: &Proxy,
    l1: &L1,
    key: &Bytes,
    sig: &Bytes,
    proto: Proto,
    hint: usize,
) -> Option<(crate::l1::FillToken, Bytes, crate::l1::Held, i64)> {
    let target = Target::Slot(crate::upstream::key_slot(key));
    let token = l1.begin(key);
    let value = px
        .upstream
        .start(target.clone(), sig.slice(1..), proto, hint)
        .await;
    let pttl = px
        .upstream
        .start(target, command_bytes(&[&b"PTTL"[..], key]), proto, hint)
        .await;
    let reply = unspill_held(px, px.upstream.finish(value).await).await;
    let pttl = px.upstream.finish(pttl).await.ok().and_then(|b| as_int(&b));
    match (reply, pttl) {
        (Ok((reply, held)), Some(ms)) if !is_error(&reply) => Some((token, reply, held, ms)),
        _ => None,
    }
}

/// [`fetch`] then fill; true if the reply was cached.
async fn load(px: &Proxy, l1: &L1, key: &Bytes, sig: &Bytes, proto: Proto, hint: usize) -> bool {
    let Some((token, reply, held, ms)) = fetch(px, l1, key, sig, proto, hint).await else {
        return false;
    };
    l1.fill(key.clone(), token, sig.clone(), reply, held, ms)
}

/// Spreads warming reads to `l1.warm_keys_per_sec`: ticks of 10 ms each with its share
/// of the rate, or one key per tick below 100 keys a second.
struct Pace {
    tick: tokio::time::Interval,
    per_tick: u64,
    used: u64,
}

impl Pace {
    fn new(per_sec: u64) -> Pace {
        let per_sec = per_sec.max(1);
        let period = std::time::Duration::from_millis(10)
            .max(std::time::Duration::from_secs(1) / per_sec as u32);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Pace {
            tick,
            per_tick: (per_sec / 100).max(1),
            used: u64::MAX,
        }
    }

    async fn next(&mut self) {
        if self.used >= self.per_tick {
            self.tick.tick().await;
            self.used = 0;
        }
        self.used += 1;
    }
}

/// Warming: reads `keys`, and the keys matching `patterns` (SCAN on every master), into
/// L1 as `GET` replies, at most `l1.warm_keys_per_sec` keys a second and `l1.max_entries`
/// keys in all. A string value is filled for both protocol versions (its bytes are the
/// same in RESP2 and RESP3); missing keys and other types are skipped. Returns the
/// replies loaded.
pub async fn warm(px: Arc<Proxy>, l1: Arc<L1>, keys: Vec<Bytes>, patterns: Vec<Bytes>) -> u64 {
    let budget = l1.max_entries();
    let mut pace = Pace::new(px.cfg.l1.warm_keys_per_sec);
    let mut seen = 0u64;
    let mut loaded = 0u64;
    for key in keys {
        if seen >= budget {
            return loaded;
        }
        pace.next().await;
        seen += 1;
        loaded += warm_key(&px, &l1, key).await;
    }
    if patterns.is_empty() {
        return loaded;
    }
    let masters = match px.upstream.topology() {
        Ok(t) => t.masters.clone(),
        Err(e) => {
            tracing::warn!(error = %e, "L1 warming: no topology; patterns skipped");
            return loaded;
        }
    };
    for pattern in patterns {
        for node in &masters {
            let mut cursor = Bytes::from_static(b"0");
            loop {
                let scan =
                    command_bytes(&[&b"SCAN"[..], &cursor, b"MATCH", &pattern, b"COUNT", b"100"]);
                let reply = match px
                    .upstream
                    .call(Target::Node(node.clone()), scan, Proto::Resp2, 0)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(node = %node.addr, error = %e, "L1 warming: SCAN failed");
                        break;
                    }
                };
                let parts = split_aggregate(&reply).unwrap_or_default();
                let (Some(next), Some(found)) = (
                    parts.first().and_then(|c| as_str(c)),
                    parts.get(1).and_then(split_aggregate),
                ) else {
                    tracing::warn!(node = %node.addr, "L1 warming: unexpected SCAN reply");
                    break;
                };
                cursor = Bytes::copy_from_slice(next);
                for k in found {
                    let Some(k) = as_str(&k) else { continue };
                    if seen >= budget {
                        return loaded;
                    }
                    pace.next().await;
                    seen += 1;
                    loaded += warm_key(&px, &l1, Bytes::copy_from_slice(k)).await;
                }
                if &cursor[..] == b"0" {
                    break;
                }
            }
        }
    }
    loaded
}

/// One key warmed as `GET key`: the replies loaded (0, or 2 for both protocols).
async fn warm_key(px: &Proxy, l1: &L1, key: Bytes) -> u64 {
    let req = [Bytes::from_static(b"get"), key.clone()];
    let sig2 = signature(Proto::Resp2, &req);
    let sig3 = signature(Proto::Resp3, &req);
    let Some((token, reply, held, ms)) = fetch(px, l1, &key, &sig2, Proto::Resp2, 0).await else {
        return 0;
    };
    // Only string values: a missing key's nil differs between the protocols, and is
    // not worth a cache entry.
    if reply.first() != Some(&b'$') || &reply[..] == b"$-1\r\n" {
        return 0;
    }
    let mut n = 0;
    for sig in [sig2, sig3] {
        n += l1.fill(key.clone(), token, sig, reply.clone(), held, ms) as u64;
    }
    l1.stats
        .warmed
        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    n
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
    unspill_held(px, reply).await.map(|(reply, _)| reply)
}

/// [`unspill`], and how the reply is held, for [`L1::fill`]: a resolved stub is a
/// buffer of its own, anything else a slice of an upstream connection's read buffer.
async fn unspill_held(
    px: &Proxy,
    reply: Result<Bytes, crate::error::Error>,
) -> Result<(Bytes, crate::l1::Held), crate::error::Error> {
    use crate::l1::Held;
    match (reply, px.spill.as_ref()) {
        // Boxed: the store's read is a large future, which every read of L1's would
        // otherwise carry (and copy into its own box) for the rare stub.
        (Ok(raw), Some(spill)) if super::spill::may_hold_stub(&raw) => {
            Box::pin(super::spill::resolve_reply(spill, raw))
                .await
                .map(|r| (r, Held::Own))
        }
        (r, _) => r.map(|r| (r, Held::Shared)),
    }
}

/// L2 (Redis) hit or miss for a read L1 could not answer: a nil reply is a miss.
pub fn count_l2(l1: &L1, reply: &[u8]) {
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

    /// The fast compare says yes only when the full one does, and says yes for the
    /// canonical encoding in any case of the name.
    #[test]
    fn raw_matching_agrees_with_signature_matching() {
        let requests: &[&[&str]] = &[
            &["GET", "k"],
            &["get", "k"],
            &["GeT", "K"],
            &["GET", "kk"],
            &["GET", "k", "x"],
            &["HGET", "h", "f"],
            &["hget", "h", "g"],
            &["HGET", "h", "f\r\n$1\r\nx"],
            &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
            &["zrange", "z", "0", "-1"],
            &["GET", ""],
        ];
        for proto in [Proto::Resp2, Proto::Resp3] {
            for stored in requests {
                let sig = signature(proto, &args(stored));
                for sent in requests {
                    let a = args(sent);
                    let raw = crate::respond::command_bytes(&a);
                    let full = signature_matches(&sig, proto, &a);
                    for p in [Proto::Resp2, Proto::Resp3] {
                        let fast = raw_matches(&sig, p, &raw, a[0].len());
                        assert!(
                            !fast || signature_matches(&sig, p, &a),
                            "{stored:?} {sent:?}"
                        );
                    }
                    assert_eq!(
                        raw_matches(&sig, proto, &raw, a[0].len()),
                        full,
                        "{stored:?} {sent:?}"
                    );
                }
                // Non-canonical spellings are left to the full compare.
                let odd = b"*2\r\n$03\r\nGET\r\n$1\r\nk\r\n";
                assert!(!raw_matches(&sig, proto, odd, 3));
            }
        }
    }
}
