//! Key namespaces (the seed's KeyBuilder prefix, e.g. `mcp:v1:`): every key a client
//! names is prefixed on the way to Redis, and key names in replies (KEYS, SCAN, the
//! blocking and multi pops) are stripped on the way back, so several applications or
//! versions share one cluster without seeing each other's keys.
//!
//! Keys are found by the command table's key positions (the same as routing), so every
//! command with declared keys is covered, scripts' KEYS included. A hash tag keeps
//! working: the namespace holds no braces (checked at start), so `{user1}:a` becomes
//! `ns:{user1}:a`, hashed on `user1` as before. Commands that cover the whole database
//! (FLUSHALL, FLUSHDB, DBSIZE, RANDOMKEY, SWAPDB, MOVE, SELECT) are refused: they would
//! reach every namespace.

use bytes::{BufMut, Bytes, BytesMut};

use super::Pending;
use crate::error::Error;
use crate::parse::reply::{as_str, split_aggregate};
use crate::parse::request::Request;
use crate::parse::table::CommandInfo;
use crate::respond::Value;

/// What a namespaced request needs on its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strip {
    /// The reply names no keys.
    Nothing,
    /// KEYS: an array of key names.
    Array,
    /// SCAN: `[cursor, [keys…]]`.
    Scan,
    /// BLPOP, BZPOPMIN, LMPOP, ZMPOP, …: `[key, …]` (or nil).
    FirstOfArray,
}

/// Commands that reach every namespace at once: refused.
fn whole_database(name: &str) -> bool {
    matches!(
        name,
        "flushall" | "flushdb" | "dbsize" | "randomkey" | "swapdb" | "move" | "select"
    )
}

fn strip_for(name: &str) -> Strip {
    match name {
        "keys" => Strip::Array,
        "scan" => Strip::Scan,
        "blpop" | "brpop" | "bzpopmin" | "bzpopmax" | "blmpop" | "bzmpop" | "lmpop" | "zmpop" => {
            Strip::FirstOfArray
        }
        _ => Strip::Nothing,
    }
}

/// A glob pattern matching `ns` literally.
fn escape_glob(ns: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ns.len() + 4);
    for &b in ns {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

fn prefixed(ns: &[u8], v: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(ns.len() + v.len());
    b.put_slice(ns);
    b.put_slice(v);
    b.freeze()
}

/// Rewrites a request known to the command table into namespace `ns`. `Err` is the
/// reply for a command the namespace cannot allow.
pub fn rewrite(ns: &[u8], info: &CommandInfo, req: Request) -> Result<(Request, Strip), Error> {
    let name = info.name.as_str();
    if whole_database(name) {
        return Err(Error::proxy(format!(
            "'{}' is not allowed with a key namespace: it would reach every namespace",
            name.to_ascii_uppercase()
        )));
    }
    let mut args = req.args;
    for i in info.key_indices(&args) {
        args[i] = prefixed(ns, &args[i]);
    }
    match name {
        "keys" if args.len() == 2 => {
            args[1] = pattern_in(ns, &args[1]);
        }
        "scan" => {
            let at = args
                .iter()
                .enumerate()
                .skip(2)
                .step_by(2)
                .find(|(_, a)| a.eq_ignore_ascii_case(b"match"))
                .map(|(i, _)| i + 1);
            match at {
                Some(i) if i < args.len() => args[i] = pattern_in(ns, &args[i]),
                // A MATCH without its pattern: Redis's syntax error, unchanged.
                Some(_) => {}
                None => {
                    args.push(Bytes::from_static(b"MATCH"));
                    args.push(pattern_in(ns, b"*"));
                }
            }
        }
        _ => {}
    }
    Ok((Request::from_args(args), strip_for(name)))
}

/// Whether an argument of TIERPROXY.L1 WARM is a SCAN pattern rather than a key.
pub fn is_pattern(arg: &[u8]) -> bool {
    arg.iter().any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// A SCAN pattern for the keys of namespace `ns` that match `pattern` there.
pub fn pattern_in(ns: &[u8], pattern: &[u8]) -> Bytes {
    prefixed(&escape_glob(ns), pattern)
}

/// The proxy's own commands: keys, patterns and tag names all live in the namespace.
pub fn rewrite_local(ns: &[u8], name: &[u8], req: Request) -> Request {
    match name {
        // TIERPROXY.L1 GET key / WARM key|pattern…
        b"tierproxy.l1" if req.args.len() >= 3 => {
            let sub = req.args[1].to_ascii_lowercase();
            if sub != b"get" && sub != b"warm" {
                return req;
            }
            let args = req
                .args
                .iter()
                .enumerate()
                .map(|(i, a)| match i {
                    0 | 1 => a.clone(),
                    _ if sub == b"warm" && is_pattern(a) => pattern_in(ns, a),
                    _ => prefixed(ns, a),
                })
                .collect();
            Request::from_args(args)
        }
        // TIERPROXY.TAG key tag… / TIERPROXY.INVALIDATE tag…
        b"tierproxy.tag" | b"tierproxy.invalidate" => {
            let args = req
                .args
                .iter()
                .enumerate()
                .map(|(i, a)| if i == 0 { a.clone() } else { prefixed(ns, a) })
                .collect();
            Request::from_args(args)
        }
        _ => req,
    }
}

/// Strips the namespace from the key names in a reply.
pub fn strip_reply(
    px: &std::sync::Arc<crate::Proxy>,
    proto: crate::respond::Proto,
    ns: Bytes,
    how: Strip,
    p: Pending,
) -> Pending {
    if how == Strip::Nothing {
        return p;
    }
    let px = px.clone();
    p.then(move |p| async move {
        // Forwarded replies are raw already; merged ones (cluster SCAN, KEYS) are encoded.
        let raw = p.resolve(&px).await.to_bytes(proto);
        Value::Raw(strip_raw(&ns, how, raw))
    })
}

fn strip_raw(ns: &[u8], how: Strip, raw: Bytes) -> Bytes {
    let Some(items) = split_aggregate(&raw) else {
        return raw;
    };
    let header_len = raw.len() - items.iter().map(|i| i.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(raw.len());
    out.put_slice(&raw[..header_len]);
    for (n, item) in items.iter().enumerate() {
        match how {
            Strip::Array => out.put_slice(&strip_bulk(ns, item)),
            Strip::Scan if n == 1 => out.put_slice(&strip_raw(ns, Strip::Array, item.clone())),
            Strip::FirstOfArray if n == 0 => out.put_slice(&strip_bulk(ns, item)),
            _ => out.put_slice(item),
        }
    }
    out.freeze()
}

/// A bulk string without the namespace prefix (unchanged if it lacks it).
fn strip_bulk(ns: &[u8], item: &Bytes) -> Bytes {
    let Some(s) = as_str(item) else {
        return item.clone();
    };
    let Some(rest) = s.strip_prefix(ns) else {
        return item.clone();
    };
    let mut out = BytesMut::with_capacity(rest.len() + 16);
    let marker = item[0];
    out.put_u8(marker);
    out.put_slice(itoa::Buffer::new().format(rest.len()).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(rest);
    out.put_slice(b"\r\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_keys_scan_and_pops() {
        let keys = Bytes::from_static(b"*2\r\n$6\r\nns:abc\r\n$7\r\nns:{x}y\r\n");
        assert_eq!(
            &strip_raw(b"ns:", Strip::Array, keys)[..],
            b"*2\r\n$3\r\nabc\r\n$4\r\n{x}y\r\n"
        );
        let scan = Bytes::from_static(b"*2\r\n$2\r\n17\r\n*1\r\n$4\r\nns:k\r\n");
        assert_eq!(
            &strip_raw(b"ns:", Strip::Scan, scan)[..],
            b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n"
        );
        let pop = Bytes::from_static(b"*2\r\n$4\r\nns:l\r\n$4\r\nns:v\r\n");
        assert_eq!(
            &strip_raw(b"ns:", Strip::FirstOfArray, pop)[..],
            b"*2\r\n$1\r\nl\r\n$4\r\nns:v\r\n"
        );
        let nil = Bytes::from_static(b"*-1\r\n");
        assert_eq!(&strip_raw(b"ns:", Strip::FirstOfArray, nil)[..], b"*-1\r\n");
    }

    #[test]
    fn escapes_glob_characters() {
        assert_eq!(escape_glob(b"a*b?[c]\\:"), b"a\\*b\\?\\[c\\]\\\\:".to_vec());
    }
}
