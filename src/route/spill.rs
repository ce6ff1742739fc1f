//! The L3 side of the request path: large values leave for the spill store before their
//! write goes upstream, and replies that carry stubs are resolved before they go out.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::Pending;
use crate::error::Error;
use crate::parse::reply::{as_int, as_str, is_error, split_aggregate};
use crate::parse::request::Request;
use crate::respond::{command_bytes, Proto, Value};
use crate::spill::stub::{self, MAX_OBJECT_STUB};
use crate::spill::Spill;
use crate::upstream::{key_slot, Target};
use crate::Proxy;

/// Whether the request path handles this command itself when the spill store is on
/// (string reads and writes that may meet a spilled value, LCS, writes of values).
pub fn intercepts(name: &str, argc: usize) -> bool {
    matches!(
        name,
        "strlen" | "getrange" | "substr" | "append" | "setrange" | "lcs"
    ) || has_value_positions(name, argc)
}

/// Whether [`value_positions`] is non-empty, without allocating.
pub fn has_value_positions(name: &str, argc: usize) -> bool {
    match name {
        "set" | "setnx" | "getset" => argc >= 3,
        "setex" | "psetex" => argc == 4,
        "mset" | "msetnx" => argc > 2,
        _ => false,
    }
}

/// Whether any value of this write must go to the spill store (large, or looking like
/// a stub).
pub fn must_wrap_any(spill: &Spill, name: &str, args: &[Bytes]) -> bool {
    let (first, step) = match name {
        "set" | "setnx" | "getset" => (2, usize::MAX),
        "setex" | "psetex" => (3, usize::MAX),
        "mset" | "msetnx" => (2, 2),
        _ => return false,
    };
    args.iter()
        .skip(first)
        .step_by(step)
        .any(|v| spill.must_wrap(v))
}

/// Argument positions of the values a string write stores.
pub fn value_positions(name: &str, argc: usize) -> Vec<usize> {
    match name {
        "set" | "setnx" | "getset" if argc >= 3 => vec![2],
        "setex" | "psetex" if argc == 4 => vec![3],
        "mset" | "msetnx" => (2..argc).step_by(2).collect(),
        _ => Vec::new(),
    }
}

/// Replies that carry values (bulk strings, or arrays of them) which may be stubs.
pub fn returns_values(name: &str) -> bool {
    matches!(name, "get" | "getex" | "getdel" | "getset" | "mget" | "set")
}

/// What a write's reply says about whether Redis stored our stubs. `from_redis` is false
/// for the proxy's own errors (a timeout, a lost connection): the write may have been
/// applied, so nothing is certain. MSET is never certain: split across slots, one
/// slot's error says nothing of the others.
fn certainly_not_written(name: &str, args: &[Bytes], reply: &[u8], from_redis: bool) -> bool {
    if !from_redis || name == "mset" {
        return false;
    }
    if is_error(reply) {
        return true;
    }
    let nil = matches!(reply, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n");
    match name {
        // SET … GET answers the old value (or nil) whether or not NX/XX let it write:
        // that case is left to the sweeper.
        "set" => nil && !args.iter().any(|a| a.eq_ignore_ascii_case(b"GET")),
        "setnx" | "msetnx" => as_int(reply) == Some(0),
        _ => false,
    }
}

/// Stores the request's large (or stub-looking) values and returns the request to send,
/// with stubs in their place, and the names of the objects it refers to.
pub async fn prepare_write(
    spill: &Spill,
    name: &str,
    req: Request,
) -> Result<(Request, Vec<String>), Error> {
    let positions = value_positions(name, req.args.len());
    if !positions.iter().any(|&i| spill.must_wrap(&req.args[i])) {
        return Ok((req, Vec::new()));
    }
    let mut args = req.args;
    let mut objects = Vec::new();
    for i in positions {
        if !spill.must_wrap(&args[i]) {
            continue;
        }
        match spill.wrap(args[i].clone()).await {
            Ok((stub, obj)) => {
                args[i] = stub;
                objects.extend(obj);
            }
            Err(e) => {
                // Redis is untouched; objects already stored for this command go.
                for o in &objects {
                    spill.discard(o).await;
                }
                return Err(Error::proxy(e.to_string()));
            }
        }
    }
    Ok((Request::from_args(args), objects))
}

/// After a spilled write: discard the objects if Redis did not store them, and resolve
/// an old value in the reply (SET … GET, GETSET).
pub fn finish_write(
    px: &Arc<Proxy>,
    name: String,
    args: Vec<Bytes>,
    objects: Vec<String>,
    proto: Proto,
    p: Pending,
) -> Pending {
    let px = px.clone();
    p.then(move |p| async move {
        let v = p.resolve(&px).await;
        // Replies that came from Redis are raw; the proxy's own errors are not.
        let from_redis = matches!(v, Value::Raw(_));
        let raw = v.to_bytes(proto);
        let Some(spill) = px.spill.as_ref() else {
            return Value::Raw(raw);
        };
        if certainly_not_written(&name, &args, &raw, from_redis) {
            for o in &objects {
                spill.discard(o).await;
            }
        }
        match resolve_reply(spill, raw).await {
            Ok(b) => Value::Raw(b),
            Err(e) => e.to_reply(),
        }
    })
}

/// A forwarded reply with its stubs (if any) replaced by their values. The store is
/// only touched, and the future only boxed, when a stub is there.
pub async fn resolved(px: &Proxy, raw: Bytes) -> Value {
    match px.spill.as_ref() {
        Some(spill) if may_hold_stub(&raw) => match Box::pin(resolve_reply(spill, raw)).await {
            Ok(b) => Value::Raw(b),
            Err(e) => e.to_reply(),
        },
        _ => Value::Raw(raw),
    }
}

/// Whether a reply may contain a stub: a bulk string or an array of them that holds one.
pub fn may_hold_stub(raw: &Bytes) -> bool {
    match raw.first() {
        Some(b'$') => as_str(raw).is_some_and(stub::is_stub),
        Some(b'*') => split_aggregate(raw)
            .is_some_and(|items| items.iter().any(|i| as_str(i).is_some_and(stub::is_stub))),
        _ => false,
    }
}

/// Resolves any stub in a bulk reply, or in the elements of an array reply.
pub async fn resolve_reply(spill: &Spill, raw: Bytes) -> Result<Bytes, Error> {
    match raw.first() {
        Some(b'$') => resolve_bulk(spill, raw).await,
        Some(b'*') => {
            let Some(items) = split_aggregate(&raw) else {
                return Ok(raw);
            };
            if !items.iter().any(|i| as_str(i).is_some_and(stub::is_stub)) {
                return Ok(raw);
            }
            let header = format!("*{}\r\n", items.len());
            let mut parts = Vec::with_capacity(items.len());
            for i in items {
                parts.push(resolve_bulk(spill, i).await?);
            }
            // Sized exactly: L1 caches it as it is (`Held::Own`).
            let mut out =
                BytesMut::with_capacity(header.len() + parts.iter().map(Bytes::len).sum::<usize>());
            out.put_slice(header.as_bytes());
            for p in parts {
                out.put_slice(&p);
            }
            Ok(out.freeze())
        }
        _ => Ok(raw),
    }
}

async fn resolve_bulk(spill: &Spill, raw: Bytes) -> Result<Bytes, Error> {
    let Some(payload) = as_str(&raw) else {
        return Ok(raw);
    };
    if !stub::is_stub(payload) {
        return Ok(raw);
    }
    let start = payload.as_ptr() as usize - raw.as_ptr() as usize;
    let value = raw.slice(start..start + payload.len());
    // The value arrives inside its own bulk reply: no copy into another one.
    spill
        .resolve_stub(&value)
        .await
        .map(|framed| framed.into_frame())
        .map_err(|e| Error::proxy(e.to_string()))
}

/// Wraps a read whose reply may carry stubs.
pub fn resolving(px: &Arc<Proxy>, proto: Proto, p: Pending) -> Pending {
    let p = match p {
        Pending::Forwarded(t) => return Pending::Values(t),
        other => other,
    };
    let px = px.clone();
    p.then(move |p| async move {
        let raw = p.resolve(&px).await.to_bytes(proto);
        match px.spill.as_ref() {
            Some(spill) => match resolve_reply(spill, raw).await {
                Ok(b) => Value::Raw(b),
                Err(e) => e.to_reply(),
            },
            None => Value::Raw(raw),
        }
    })
}

/// STRLEN, GETRANGE, SUBSTR, APPEND, SETRANGE on a key that may hold a stub. The key's
/// first bytes tell: STRLEN of a stub comes from the stub (no store read); a range is
/// cut from the resolved value; APPEND/SETRANGE become an optimistic read-modify-write.
pub async fn string_op(
    px: &Arc<Proxy>,
    proto: Proto,
    hint: usize,
    name: &str,
    req: Request,
) -> Pending {
    let key = req.args[1].clone();
    let target = Target::Slot(key_slot(&key));
    if name == "append" || name == "setrange" {
        return guarded_write(px, proto, hint, name, req, target).await;
    }
    let probe = command_bytes(&[
        &b"GETRANGE"[..],
        &key,
        b"0",
        (MAX_OBJECT_STUB - 1).to_string().as_bytes(),
    ]);
    let probe_t = px
        .upstream
        .start(target.clone(), probe, Proto::Resp2, hint)
        .await;
    let px = px.clone();
    let name = name.to_string();
    Pending::Deferred(Box::pin(async move {
        let r = async {
            let head = px.upstream.finish(probe_t).await?;
            let spill = px
                .spill
                .as_ref()
                .ok_or_else(|| Error::proxy("spill disabled"))?;
            let head_val = as_str(&head)
                .map(Bytes::copy_from_slice)
                .unwrap_or_default();
            if !stub::is_stub(&head_val) {
                // Not spilled: the command runs as sent (the probe changed nothing).
                return px
                    .upstream
                    .call(target, req.raw, proto, hint)
                    .await
                    .map(Value::Raw);
            }
            match name.as_str() {
                "strlen" => {
                    // An object stub fits in the probe; a long inline envelope does not.
                    let parsed = match spill.parse(&head_val) {
                        Some(Ok(s)) => s,
                        _ => {
                            let v = whole_value(&px, target, &key, hint).await?;
                            match spill.parse(&v) {
                                Some(Ok(s)) => s,
                                Some(Err(e)) => return Err(Error::proxy(e.to_string())),
                                None => return Ok(Value::Int(v.len() as i64)),
                            }
                        }
                    };
                    Ok(Value::Int(parsed.original_len as i64))
                }
                _ => {
                    // GETRANGE / SUBSTR key start end on the resolved value.
                    let int = |b: &Bytes| {
                        std::str::from_utf8(b)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok())
                    };
                    let (Some(start), Some(end)) = (int(&req.args[2]), int(&req.args[3])) else {
                        return Err(Error::redis("ERR value is not an integer or out of range"));
                    };
                    let v = whole_value(&px, target, &key, hint).await?;
                    let stub = match spill.parse(&v) {
                        Some(Ok(st)) => st,
                        Some(Err(e)) => return Err(Error::proxy(e.to_string())),
                        None => return Ok(Value::Bulk(range(&v, start, end))),
                    };
                    let Some((s, e)) = range_bounds(stub.original_len, start, end) else {
                        return Ok(Value::Bulk(Bytes::new()));
                    };
                    let part = spill
                        .resolve_range(&stub, v, s, e)
                        .await
                        .map_err(|e| Error::proxy(e.to_string()))?;
                    Ok(Value::Bulk(part))
                }
            }
        }
        .await;
        r.unwrap_or_else(|e| e.to_reply())
    }))
}

/// The value Redis holds for `key` (empty if none), as raw bytes.
async fn whole_value(px: &Proxy, target: Target, key: &Bytes, hint: usize) -> Result<Bytes, Error> {
    let cmd = command_bytes(&[&b"GET"[..], key]);
    let full = px.upstream.call(target, cmd, Proto::Resp2, hint).await?;
    if let Some(e) = crate::parse::reply::error_text(&full) {
        return Err(Error::redis(e));
    }
    Ok(as_str(&full)
        .map(Bytes::copy_from_slice)
        .unwrap_or_default())
}

/// APPEND/SETRANGE run as a script that first checks, atomically on the server, that the
/// value is not a stub (a check followed by a plain write could race another client's
/// spilled SET and corrupt its stub). `pcall` keeps Redis's own error texts.
const GUARDED_WRITE: &str = "local head = redis.pcall('GETRANGE', KEYS[1], 0, 3) \
if head == ARGV[1] then return redis.error_reply('TIERPROXY_SPILLED') end \
if ARGV[2] == 'append' then return redis.pcall('APPEND', KEYS[1], ARGV[3]) end \
return redis.pcall('SETRANGE', KEYS[1], ARGV[3], ARGV[4])";

/// LCS compares the values Redis holds: on a stub it would compare stub bytes. A script
/// checks both keys atomically and runs LCS only when neither is spilled.
const GUARDED_LCS: &str = "for i = 1, 2 do \
local head = redis.pcall('GETRANGE', KEYS[i], 0, 3) \
if head == ARGV[1] then return redis.error_reply('TIERPROXY_SPILLED') end end \
return redis.pcall('LCS', KEYS[1], KEYS[2], unpack(ARGV, 2))";

/// Inside MULTI the value cannot be looked at first: string commands that would read or
/// change a stub as if it were the value run as a script that refuses spilled values.
const GUARDED_ANY: &str = "for i = 1, #KEYS do \
local head = redis.pcall('GETRANGE', KEYS[i], 0, 3) \
if head == ARGV[1] then return redis.error_reply('TIERPROXY_SPILLED') end end \
local a = {} \
for i = 1, #KEYS do a[#a + 1] = KEYS[i] end \
for i = 3, #ARGV do a[#a + 1] = ARGV[i] end \
return redis.pcall(ARGV[2], unpack(a))";

/// The guarded form of a string command queued in a transaction (`None`: not needed).
pub fn guarded_in_transaction(name: &str, args: &[Bytes]) -> Option<Vec<Bytes>> {
    let nkeys: usize = match name {
        "strlen" | "getrange" | "substr" | "append" | "setrange" => 1,
        "lcs" => 2,
        _ => return None,
    };
    let mut out = vec![
        Bytes::from_static(b"EVAL"),
        Bytes::from_static(GUARDED_ANY.as_bytes()),
        Bytes::from(nkeys.to_string()),
    ];
    out.extend(args[1..=nkeys].iter().cloned());
    out.push(Bytes::from_static(stub::MAGIC));
    out.push(Bytes::copy_from_slice(name.as_bytes()));
    out.extend(args[nkeys + 1..].iter().cloned());
    Some(out)
}

/// LCS with the spill on: Redis's reply, or a clear error if either value is spilled.
pub async fn lcs(px: &Arc<Proxy>, proto: Proto, hint: usize, req: Request) -> Pending {
    let target = Target::Slot(key_slot(&req.args[1]));
    let mut script: Vec<&[u8]> = vec![
        b"EVAL",
        GUARDED_LCS.as_bytes(),
        b"2",
        &req.args[1],
        &req.args[2],
        stub::MAGIC,
    ];
    script.extend(req.args[3..].iter().map(|a| &a[..]));
    let ticket = px
        .upstream
        .start(target, command_bytes(&script), proto, hint)
        .await;
    let px = px.clone();
    // Deferred: the spilled case reads the values again, and no later command of the
    // pipeline may change them first.
    Pending::Deferred(Box::pin(async move {
        let r = async {
            let reply = px.upstream.finish(ticket).await?;
            if crate::parse::reply::error_text(&reply).as_deref() != Some("ERR TIERPROXY_SPILLED") {
                return Ok(Value::Raw(reply));
            }
            spilled_lcs(&px, hint, &req).await
        }
        .await;
        r.unwrap_or_else(|e: Error| e.to_reply())
    }))
}

/// LCS when a value is spilled: both values read, resolved, and compared here as Redis
/// would.
async fn spilled_lcs(px: &Proxy, hint: usize, req: &Request) -> Result<Value, Error> {
    let opts = super::lcs::options(&req.args[3..])?;
    let spill = px
        .spill
        .as_ref()
        .ok_or_else(|| Error::proxy("spill disabled"))?;
    let target = Target::Slot(key_slot(&req.args[1]));
    // GET each (not MGET) so that a key of another type answers WRONGTYPE, as LCS does.
    let mut values = Vec::with_capacity(2);
    for k in &req.args[1..3] {
        let raw = px
            .upstream
            .call(
                target.clone(),
                command_bytes(&[&b"GET"[..], k]),
                Proto::Resp2,
                hint,
            )
            .await?;
        if let Some(e) = crate::parse::reply::error_text(&raw) {
            return Err(Error::redis(e));
        }
        let v = as_str(&raw).map(Bytes::copy_from_slice).unwrap_or_default();
        values.push(
            spill
                .resolve(v)
                .await
                .map_err(|e| Error::proxy(e.to_string()))?,
        );
    }
    let (a, b) = (values[0].clone(), values[1].clone());
    tokio::task::spawn_blocking(move || super::lcs::lcs(&a, &b, opts))
        .await
        .map_err(|e| Error::proxy(format!("LCS task: {e}")))?
}

async fn guarded_write(
    px: &Arc<Proxy>,
    proto: Proto,
    hint: usize,
    name: &str,
    req: Request,
    target: Target,
) -> Pending {
    let mut script: Vec<&[u8]> = vec![
        b"EVAL",
        GUARDED_WRITE.as_bytes(),
        b"1",
        &req.args[1],
        stub::MAGIC,
        name.as_bytes(),
    ];
    script.extend(req.args[2..].iter().map(|a| &a[..]));
    let ticket = px
        .upstream
        .start(target.clone(), command_bytes(&script), proto, hint)
        .await;
    let px = px.clone();
    let name = name.to_string();
    Pending::Deferred(Box::pin(async move {
        let r = async {
            let reply = px.upstream.finish(ticket).await?;
            if crate::parse::reply::error_text(&reply).as_deref() != Some("ERR TIERPROXY_SPILLED") {
                return Ok(Value::Raw(reply));
            }
            let spill = px
                .spill
                .as_ref()
                .ok_or_else(|| Error::proxy("spill disabled"))?;
            read_modify_write(&px, spill, &target, &name, &req.args).await
        }
        .await;
        r.unwrap_or_else(|e| e.to_reply())
    }))
}

/// Attempts before an APPEND/SETRANGE on a spilled value gives up under contention.
const RMW_ATTEMPTS: usize = 16;
/// Redis's limit on the length SETRANGE/APPEND may produce (512 MiB).
const MAX_STRING: usize = 512 * 1024 * 1024;

/// APPEND / SETRANGE on a value that is (or was a moment ago) spilled: an optimistic
/// read-modify-write on a dedicated connection — WATCH, read and resolve, compute, store
/// the new value, MULTI/SET KEEPTTL/EXEC — retried if another client wrote meanwhile, so
/// no concurrent write is lost and the stub is never corrupted.
async fn read_modify_write(
    px: &Proxy,
    spill: &Spill,
    target: &Target,
    name: &str,
    args: &[Bytes],
) -> Result<Value, Error> {
    let key = &args[1];
    let offset = if name == "setrange" {
        match std::str::from_utf8(&args[2])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(o) if o >= 0 => o as usize,
            Some(_) => return Err(Error::redis("ERR offset is out of range")),
            None => return Err(Error::redis("ERR value is not an integer or out of range")),
        }
    } else {
        0
    };
    let _turn = spill.rmw_lock(key).lock().await;
    let node = px.upstream.resolve_target(target)?;
    // `watching` makes sure that, whatever way this ends, the WATCH does not outlive it
    // (UNWATCH before the connection is reused).
    let mut pin = px.upstream.pinned(&node, Proto::Resp2, false).await?;
    for attempt in 0..RMW_ATTEMPTS {
        if attempt > 0 {
            // Another proxy or a direct client won the race: back off with jitter so
            // competing writers do not retry in lockstep.
            let cap = 1u64 << attempt.min(6);
            let ms = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=cap);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        pin.watching = true;
        let wg = pin
            .pipeline(vec![
                command_bytes(&[&b"WATCH"[..], key]),
                command_bytes(&[&b"GET"[..], key]),
            ])
            .await?;
        let (w, g) = (&wg[0], &wg[1]);
        if is_error(w) {
            return Ok(Value::Raw(w.clone()));
        }
        if is_error(g) {
            return Ok(Value::Raw(g.clone()));
        }
        let current = match as_str(g) {
            Some(v) => spill
                .resolve(Bytes::copy_from_slice(v))
                .await
                .map_err(|e| Error::proxy(e.to_string()))?,
            None => Bytes::new(),
        };
        let mut next = current.to_vec();
        match name {
            "append" => next.extend_from_slice(&args[2]),
            _ => {
                let value = &args[3];
                if value.is_empty() {
                    return Ok(Value::Int(current.len() as i64));
                }
                if offset + value.len() > MAX_STRING {
                    return Err(Error::redis(
                        "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
                    ));
                }
                if next.len() < offset + value.len() {
                    next.resize(offset + value.len(), 0);
                }
                next[offset..offset + value.len()].copy_from_slice(value);
            }
        }
        if next.len() > MAX_STRING {
            return Err(Error::redis(
                "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
            ));
        }
        let new_len = next.len();
        let next = Bytes::from(next);
        let (stored, object) = if spill.must_wrap(&next) {
            match spill.wrap(next).await {
                Ok(x) => x,
                Err(e) => {
                    return Err(Error::proxy(e.to_string()));
                }
            }
        } else {
            (next, None)
        };
        let mut r = pin
            .pipeline(vec![
                command_bytes(&[b"MULTI"]),
                command_bytes(&[&b"SET"[..], key, &stored, b"KEEPTTL"]),
                command_bytes(&[b"EXEC"]),
            ])
            .await?;
        // EXEC ends the WATCH, whatever it answers.
        pin.watching = false;
        let e = r.pop().unwrap_or_default();
        if e.starts_with(b"*-1") || e.starts_with(b"_") {
            // Someone wrote the key meanwhile: our object was never referenced.
            if let Some(o) = object {
                spill.discard(&o).await;
            }
            continue;
        }
        if is_error(&e) {
            if let Some(o) = object {
                spill.discard(&o).await;
            }
            return Ok(Value::Raw(e));
        }
        return Ok(Value::Int(new_len as i64));
    }
    Err(Error::proxy(format!(
        "{} on a spilled value: too much contention ({RMW_ATTEMPTS} attempts)",
        name.to_ascii_uppercase()
    )))
}

/// Redis's GETRANGE arithmetic.
fn range(v: &Bytes, start: i64, end: i64) -> Bytes {
    match range_bounds(v.len() as u64, start, end) {
        Some((s, e)) => v.slice(s as usize..=e as usize),
        None => Bytes::new(),
    }
}

/// The inclusive byte range GETRANGE `start end` selects of a `len`-byte value; `None`
/// for an empty result.
fn range_bounds(len: u64, start: i64, end: i64) -> Option<(u64, u64)> {
    let len = len as i64;
    if len == 0 || (start < 0 && end < 0 && start > end) {
        return None;
    }
    let mut s = if start < 0 { len + start } else { start };
    let mut e = if end < 0 { len + end } else { end };
    s = s.max(0);
    e = e.max(0);
    if e >= len {
        e = len - 1;
    }
    if s > e || len == 0 {
        return None;
    }
    Some((s as u64, e as u64))
}

#[cfg(test)]
mod tests {
    use super::range;
    use bytes::Bytes;

    #[test]
    fn getrange_arithmetic() {
        let v = Bytes::from_static(b"This is a string");
        assert_eq!(&range(&v, 0, 3)[..], b"This");
        assert_eq!(&range(&v, -3, -1)[..], b"ing");
        assert_eq!(&range(&v, 0, -1)[..], &v[..]);
        assert_eq!(&range(&v, 10, 100)[..], b"string");
        assert_eq!(&range(&v, 5, 3)[..], b"");
        assert_eq!(&range(&v, -1, -5)[..], b"");
    }
}
