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
    /// PUBSUB CHANNELS / SHARDCHANNELS: channel names (those of other namespaces left out).
    Channels,
    /// PUBSUB NUMSUB / SHARDNUMSUB: `[channel, count, …]`.
    NumSub,
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
        "pubsub|channels" | "pubsub|shardchannels" => Strip::Channels,
        "pubsub|numsub" | "pubsub|shardnumsub" => Strip::NumSub,
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
/// reply for a command the namespace cannot allow. `event_channel` is L1's invalidation
/// channel: a message there names a key, so the key is what gets the namespace.
pub fn rewrite(
    ns: &[u8],
    info: &CommandInfo,
    event_channel: &[u8],
    req: Request,
) -> Result<(Request, Strip), Error> {
    let name = info.name.as_str();
    if whole_database(name) {
        return Err(Error::proxy(format!(
            "'{}' is not allowed with a key namespace: it would reach every namespace",
            name.to_ascii_uppercase()
        )));
    }
    if info.policy == crate::parse::table::Policy::Subscribe {
        // The subscription keeps the client's names (its confirmations show them);
        // pub/sub translates each name on its way to Redis and back.
        return Ok((req, Strip::Nothing));
    }
    let mut args = req.args;
    match name {
        // SPUBLISH declares its channel as a (not-key) key: translated here, once.
        "publish" | "spublish" if args.len() == 3 => {
            if names_keys(&args[1], false, event_channel) {
                // A keyevent or invalidation message names a key: the namespace's.
                args[2] = prefixed(ns, &args[2]);
            } else {
                args[1] = channel_in(ns, event_channel, &args[1], false);
            }
            return Ok((Request::from_args(args), Strip::Nothing));
        }
        "pubsub|numsub" | "pubsub|shardnumsub" => {
            for a in &mut args[2..] {
                *a = channel_in(ns, event_channel, a, false);
            }
        }
        "pubsub|channels" | "pubsub|shardchannels" => match args.len() {
            2 => args.push(channel_in(ns, event_channel, b"*", true)),
            _ => args[2] = channel_in(ns, event_channel, &args[2], true),
        },
        _ => {
            for i in info.key_indices(&args) {
                args[i] = prefixed(ns, &args[i]);
            }
        }
    }
    if matches!(name, "sort" | "sort_ro") {
        // BY and GET name keys by pattern (`weight_*`, `data_*->field`): in the
        // namespace too, or SORT would read other namespaces' keys. `GET #` is the
        // element itself.
        let mut i = 2;
        while i + 1 < args.len() {
            let by = args[i].eq_ignore_ascii_case(b"by");
            let get = args[i].eq_ignore_ascii_case(b"get") && &args[i + 1][..] != b"#";
            if by || get {
                args[i + 1] = prefixed(ns, &args[i + 1]);
                i += 2;
            } else if args[i].eq_ignore_ascii_case(b"limit") {
                i += 3;
            } else {
                i += 1;
            }
        }
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

const KEYSPACE: &[u8] = b"__keyspace@";
const KEYEVENT: &[u8] = b"__keyevent@";

/// Where the key starts in a keyspace-notification channel (`__keyspace@<db>__:<key>`,
/// `<db>` possibly a glob); 0 for any other channel, whose whole name is the client's.
fn key_part(ch: &[u8]) -> usize {
    if !ch.starts_with(KEYSPACE) {
        return 0;
    }
    ch[KEYSPACE.len()..]
        .windows(3)
        .position(|w| w == b"__:")
        .map_or(0, |i| KEYSPACE.len() + i + 3)
}

/// The key a keyspace-notification channel is about.
pub fn keyspace_key(ch: &[u8]) -> Option<&[u8]> {
    match key_part(ch) {
        0 => None,
        at => Some(&ch[at..]),
    }
}

/// A keyevent-notification channel (`__keyevent@<db>__:<event>`): shared by every
/// namespace, the key is the message.
pub fn is_keyevent(ch: &[u8]) -> bool {
    ch.starts_with(KEYEVENT)
}

/// A channel every namespace shares, whose messages are key names: a keyevent
/// notification's, and L1's invalidation channel `event` (empty: none).
fn names_keys(ch: &[u8], pattern: bool, event: &[u8]) -> bool {
    is_keyevent(ch) || (!pattern && !event.is_empty() && ch == event)
}

/// Channel `ch` (a glob pattern if `pattern`) in namespace `ns`: `news` becomes
/// `ns:news`, `__keyspace@0__:k` becomes `__keyspace@0__:ns:k` (the key is namespaced);
/// a keyevent channel and L1's invalidation channel `event` stay as they are (their
/// messages name keys: those are translated instead).
pub fn channel_in(ns: &[u8], event: &[u8], ch: &[u8], pattern: bool) -> Bytes {
    if names_keys(ch, pattern, event) {
        return Bytes::copy_from_slice(ch);
    }
    let at = key_part(ch);
    let mut b = BytesMut::with_capacity(ch.len() + 2 * ns.len());
    b.put_slice(&ch[..at]);
    if pattern {
        b.put_slice(&escape_glob(ns));
    } else {
        b.put_slice(ns);
    }
    b.put_slice(&ch[at..]);
    b.freeze()
}

/// The client's name for channel (or pattern) `ch` of Redis; `None` if it is not in
/// namespace `ns`.
pub fn channel_out(ns: &[u8], event: &[u8], ch: &[u8], pattern: bool) -> Option<Bytes> {
    if names_keys(ch, pattern, event) {
        return Some(Bytes::copy_from_slice(ch));
    }
    let at = key_part(ch);
    let escaped;
    let prefix = if pattern {
        escaped = escape_glob(ns);
        &escaped[..]
    } else {
        ns
    };
    let rest = ch[at..].strip_prefix(prefix)?;
    let mut b = BytesMut::with_capacity(ch.len());
    b.put_slice(&ch[..at]);
    b.put_slice(rest);
    Some(b.freeze())
}

/// A `message`, `pmessage` or `smessage` frame from Redis as a client of namespace `ns`
/// sees it: channel (and pattern) names without the namespace, and the key named by a
/// keyevent notification or an L1 invalidation (channel `event`) without it. `None`: the
/// message is about another namespace's key.
pub fn message_out(ns: &[u8], event: &[u8], frame: &Bytes) -> Option<Bytes> {
    let mut items = split_aggregate(frame)?;
    let kind = as_str(items.first()?)?;
    let (pattern_at, channel_at) = match kind {
        b"message" | b"smessage" if items.len() == 3 => (None, 1),
        b"pmessage" if items.len() == 4 => (Some(1), 2),
        _ => return Some(frame.clone()),
    };
    let channel = as_str(&items[channel_at])?;
    if names_keys(channel, false, event) {
        let payload = &items[channel_at + 1];
        let key = as_str(payload)?.strip_prefix(ns)?;
        items[channel_at + 1] = rebulk(payload, key);
    } else {
        let out = channel_out(ns, event, channel, false)?;
        items[channel_at] = rebulk(&items[channel_at], &out);
    }
    if let Some(p) = pattern_at {
        let out = channel_out(ns, event, as_str(&items[p])?, true)?;
        items[p] = rebulk(&items[p], &out);
    }
    Some(reassemble(frame, items.len(), &items))
}

/// L1's invalidation channel, shared by every namespace (its messages name keys): only
/// while L1 is on; empty otherwise.
pub fn event_channel(px: &crate::Proxy) -> &[u8] {
    px.l1
        .as_ref()
        .and_then(|l| l.event_channel.as_deref())
        .unwrap_or_default()
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
            let args: Vec<Bytes> = req
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
            let args: Vec<Bytes> = req
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
        Value::Raw(strip_raw(&ns, event_channel(&px), how, raw))
    })
}

/// The key names of reply `raw` without namespace `ns` (what [`strip_reply`] does, also
/// for one element of an EXEC reply).
pub fn strip_raw(ns: &[u8], event: &[u8], how: Strip, raw: Bytes) -> Bytes {
    let Some(items) = split_aggregate(&raw) else {
        return raw;
    };
    if raw.get(1) == Some(&b'-') {
        // A nil array (a pop that timed out).
        return raw;
    }
    if how == Strip::Channels {
        let kept: Vec<Bytes> = items
            .iter()
            .filter_map(|item| {
                let out = channel_out(ns, event, as_str(item)?, false)?;
                Some(rebulk(item, &out))
            })
            .collect();
        return reassemble(&raw, kept.len(), &kept);
    }
    let items: Vec<Bytes> = items
        .into_iter()
        .enumerate()
        .map(|(n, item)| match how {
            Strip::Array => strip_bulk(ns, &item),
            Strip::Scan if n == 1 => strip_raw(ns, event, Strip::Array, item),
            Strip::FirstOfArray if n == 0 => strip_bulk(ns, &item),
            Strip::NumSub if n % 2 == 0 => {
                match as_str(&item).and_then(|c| channel_out(ns, event, c, false)) {
                    Some(c) => rebulk(&item, &c),
                    None => item,
                }
            }
            _ => item,
        })
        .collect();
    reassemble(&raw, items.len(), &items)
}

/// Aggregate `raw`'s type with `n` elements `items` (already encoded).
fn reassemble(raw: &[u8], n: usize, items: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(raw.len() + 16);
    out.put_u8(raw[0]);
    // A map's count is of pairs.
    let n = if raw[0] == b'%' { n / 2 } else { n };
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
    out.put_slice(b"\r\n");
    for i in items {
        out.put_slice(i);
    }
    out.freeze()
}

/// A bulk string without the namespace prefix (unchanged if it lacks it).
fn strip_bulk(ns: &[u8], item: &Bytes) -> Bytes {
    match as_str(item).and_then(|s| s.strip_prefix(ns)) {
        Some(rest) => rebulk(item, rest),
        None => item.clone(),
    }
}

/// `content` encoded as `item` was (bulk, verbatim-less RESP3 blob or simple string).
fn rebulk(item: &[u8], content: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(content.len() + 16);
    let marker = item[0];
    out.put_u8(marker);
    if marker != b'+' {
        out.put_slice(itoa::Buffer::new().format(content.len()).as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(content);
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
            &strip_raw(b"ns:", b"", Strip::Array, keys)[..],
            b"*2\r\n$3\r\nabc\r\n$4\r\n{x}y\r\n"
        );
        let scan = Bytes::from_static(b"*2\r\n$2\r\n17\r\n*1\r\n$4\r\nns:k\r\n");
        assert_eq!(
            &strip_raw(b"ns:", b"", Strip::Scan, scan)[..],
            b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n"
        );
        let pop = Bytes::from_static(b"*2\r\n$4\r\nns:l\r\n$4\r\nns:v\r\n");
        assert_eq!(
            &strip_raw(b"ns:", b"", Strip::FirstOfArray, pop)[..],
            b"*2\r\n$1\r\nl\r\n$4\r\nns:v\r\n"
        );
        let nil = Bytes::from_static(b"*-1\r\n");
        assert_eq!(
            &strip_raw(b"ns:", b"", Strip::FirstOfArray, nil)[..],
            b"*-1\r\n"
        );
    }

    #[test]
    fn channels_and_notifications_move_into_the_namespace_and_back() {
        let cases: [(&[u8], bool, &[u8]); 7] = [
            (b"inv", false, b"inv"),
            (b"inv", true, b"n\\*:inv"),
            (b"news", false, b"n*:news"),
            (b"__keyspace@0__:k", false, b"__keyspace@0__:n*:k"),
            (b"__keyspace@*__:k*", true, b"__keyspace@*__:n\\*:k*"),
            (b"__keyevent@0__:set", false, b"__keyevent@0__:set"),
            (b"new?", true, b"n\\*:new?"),
        ];
        for (client, pattern, redis) in cases {
            assert_eq!(&channel_in(b"n*:", b"inv", client, pattern)[..], redis);
            assert_eq!(
                channel_out(b"n*:", b"inv", redis, pattern).as_deref(),
                Some(client)
            );
        }
        assert_eq!(channel_out(b"n:", b"inv", b"other:news", false), None);
        assert_eq!(
            channel_out(b"n:", b"inv", b"__keyspace@0__:other:k", false),
            None
        );
    }

    #[test]
    fn messages_lose_the_namespace_and_other_namespaces_keys_are_dropped() {
        let m = Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$6\r\nn:news\r\n$2\r\nhi\r\n");
        assert_eq!(
            &message_out(b"n:", b"inv", &m).unwrap()[..],
            b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
        );
        let p = Bytes::from_static(
            b">4\r\n$8\r\npmessage\r\n$18\r\n__keyspace@0__:n:*\r\n$18\r\n__keyspace@0__:n:k\r\n$3\r\nset\r\n",
        );
        assert_eq!(
            &message_out(b"n:", b"inv", &p).unwrap()[..],
            &b">4\r\n$8\r\npmessage\r\n$16\r\n__keyspace@0__:*\r\n$16\r\n__keyspace@0__:k\r\n$3\r\nset\r\n"[..]
        );
        let ours = Bytes::from_static(
            b"*3\r\n$7\r\nmessage\r\n$18\r\n__keyevent@0__:set\r\n$3\r\nn:k\r\n",
        );
        assert_eq!(
            &message_out(b"n:", b"inv", &ours).unwrap()[..],
            b"*3\r\n$7\r\nmessage\r\n$18\r\n__keyevent@0__:set\r\n$1\r\nk\r\n"
        );
        let theirs = Bytes::from_static(
            b"*3\r\n$7\r\nmessage\r\n$18\r\n__keyevent@0__:set\r\n$3\r\nm:k\r\n",
        );
        assert_eq!(message_out(b"n:", b"inv", &theirs), None);
        let inv = Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$3\r\ninv\r\n$3\r\nn:k\r\n");
        assert_eq!(
            &message_out(b"n:", b"inv", &inv).unwrap()[..],
            b"*3\r\n$7\r\nmessage\r\n$3\r\ninv\r\n$1\r\nk\r\n"
        );
    }

    #[test]
    fn escapes_glob_characters() {
        assert_eq!(escape_glob(b"a*b?[c]\\:"), b"a\\*b\\?\\[c\\]\\\\:".to_vec());
    }
}
