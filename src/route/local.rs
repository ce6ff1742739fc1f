//! Commands the proxy answers itself: connection state (PING, HELLO, AUTH, CLIENT, …),
//! the server it presents (INFO, CONFIG GET, TIME) and a one-node cluster view (CLUSTER …)
//! at the proxy's own address, for cluster-mode clients.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::Pending;
use crate::client::session::{ReplyMode, Session};
use crate::error::Error;
use crate::parse::reply::{as_str, split_aggregate};
use crate::parse::request::Request;
use crate::parse::table::arity_fits;
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::{key_slot, Mode, Target};
use crate::Proxy;

/// Arity (Redis's convention: negative = at least) of every command answered here.
pub(crate) fn local_arity(name: &str) -> Option<i64> {
    Some(match name {
        "ping" | "quit" | "hello" | "info" => -1,
        "echo" | "select" => 2,
        "reset" | "time" | "readonly" | "readwrite" | "asking" => 1,
        "auth" => -2,
        "client" | "config" | "cluster" => -2,
        "client|setname" | "client|no-evict" | "client|no-touch" | "client|reply" => 3,
        "client|getname" | "client|id" | "client|info" | "client|help" => 2,
        "client|list" => -2,
        "client|setinfo" => 4,
        "config|get" => -3,
        "config|set" => -4,
        "config|resetstat" | "config|rewrite" | "config|help" => 2,
        "cluster|info" | "cluster|slots" | "cluster|shards" | "cluster|nodes" | "cluster|myid"
        | "cluster|help" => 2,
        "cluster|keyslot" | "cluster|countkeysinslot" => 3,
        "cluster|getkeysinslot" => 4,
        "tierproxy.l1" => -2,
        "tierproxy.tag" => -3,
        "tierproxy.invalidate" => 2,
        "tierproxy.l1|flush" | "tierproxy.l1|stats" => 2,
        "tierproxy.l1|get" => 3,
        "tierproxy.l1|warm" => -3,
        "slowlog" => -2,
        "slowlog|get" => -2,
        "slowlog|len" | "slowlog|reset" | "slowlog|help" => 2,
        _ => return None,
    })
}

fn full_name(name: &[u8], req: &Request) -> String {
    let name = String::from_utf8_lossy(name).into_owned();
    if matches!(
        name.as_str(),
        "client" | "config" | "cluster" | "tierproxy.l1" | "slowlog"
    ) && req.args.len() >= 2
    {
        let sub = String::from_utf8_lossy(&req.args[1]).to_ascii_lowercase();
        format!("{name}|{sub}")
    } else {
        name
    }
}

/// Handles every locally answered command, before (and without needing) the command
/// table, so PING, AUTH and friends work while the upstream is unreachable.
pub fn handle_early(
    px: &Arc<Proxy>,
    sess: &mut Session,
    name: &[u8],
    req: &Request,
) -> Option<Pending> {
    let base = std::str::from_utf8(name).ok()?;
    let arity = local_arity(base)?;
    let argc = req.args.len();
    if !arity_fits(arity, argc) {
        return Some(Pending::error(Error::arity(base)));
    }
    // PING's table arity is -1, but Redis rejects more than one argument itself.
    if base == "ping" && argc > 2 {
        return Some(Pending::error(Error::arity(base)));
    }
    let full = full_name(name, req);
    let Some(sub_arity) = local_arity(&full) else {
        // A container with a subcommand we do not emulate.
        let sub = &req.args[1];
        return Some(Pending::error(
            if base == "client" || base == "config" || base == "cluster" {
                match full.as_str() {
                "client|kill" | "client|pause" | "client|unpause" | "client|tracking"
                | "client|caching" | "client|getredir" | "client|trackinginfo"
                | "client|unblock" | "client|no-evict2" | "config|set" => Error::proxy(format!(
                    "'{full}' is not supported through the proxy"
                )),
                _ if full.starts_with("cluster|") => Error::proxy(format!(
                    "'{full}' is not supported through the proxy; it presents itself as a single node"
                )),
                _ => Error::unknown_subcommand(sub, base),
            }
            } else {
                Error::unknown_subcommand(sub, base)
            },
        ));
    };
    if !arity_fits(sub_arity, argc) {
        return Some(Pending::error(Error::arity(&full)));
    }
    if !sess.authenticated && !matches!(base, "auth" | "hello" | "quit" | "reset") {
        return Some(Pending::error(Error::noauth()));
    }
    sess.update_meta(|m| m.last_cmd = full.clone());
    let a = &req.args;
    let v = match full.as_str() {
        "ping" => match a.get(1) {
            Some(msg) => Value::Bulk(msg.clone()),
            None => Value::Simple("PONG"),
        },
        "echo" => Value::Bulk(a[1].clone()),
        "quit" => {
            sess.closing = true;
            Value::ok()
        }
        "reset" => {
            sess.txn.clear();
            sess.pubsub = None;
            sess.proto = Proto::Resp2;
            sess.name = None;
            sess.reply_mode = ReplyMode::On;
            sess.authenticated = !px.auth.required();
            // Unsubscribed above: the namespace may change.
            if let Err(e) = sess.become_user(
                crate::client::auth::Principal::default_user(),
                &px.cfg.namespace,
            ) {
                return Some(Pending::Ready(e.to_reply()));
            }
            sess.update_meta(|m| {
                m.name.clear();
                m.resp = 2;
            });
            Value::Simple("RESET")
        }
        "auth" => auth(px, sess, a),
        "hello" => hello(px, sess, a),
        "select" => match std::str::from_utf8(&a[1])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(0) => Value::ok(),
            Some(_) => Error::redis("ERR SELECT is not allowed in cluster mode").to_reply(),
            None => Error::redis("ERR value is not an integer or out of range").to_reply(),
        },
        "time" => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            Value::Array(vec![
                Value::bulk_str(&now.as_secs().to_string()),
                Value::bulk_str(&now.subsec_micros().to_string()),
            ])
        }
        "readonly" | "readwrite" | "asking" => Value::ok(),
        "info" => return Some(info(px, sess, a)),
        n if n.starts_with("client|") => client(px, sess, n, a),
        n if n.starts_with("config|") => config(px, sess, n, a),
        n if n.starts_with("cluster|") => return Some(cluster(px, sess, n, a)),
        n if n.starts_with("tierproxy.l1|") => l1_admin(px, n, a),
        s if s.starts_with("slowlog|") => px.slowlog.command(s, a),
        "tierproxy.tag" => return Some(super::tags::tag(px, sess, a.to_vec())),
        "tierproxy.invalidate" => return Some(super::tags::invalidate(px, sess, a.to_vec())),
        _ => return None,
    };
    Some(Pending::Ready(v))
}

/// Local policy commands reached through the table (never, in practice: every one of
/// them is caught by [`handle_early`] first).
pub async fn handle(_px: &Arc<Proxy>, _sess: &mut Session, name: &str, _req: Request) -> Pending {
    Pending::error(Error::proxy(format!(
        "'{name}' is not supported through the proxy"
    )))
}

fn auth(px: &Proxy, sess: &mut Session, a: &[Bytes]) -> Value {
    if a.len() > 3 {
        return Error::syntax().to_reply();
    }
    let (user, pass) = if a.len() == 3 {
        (Some(&a[1][..]), &a[2][..])
    } else {
        (None, &a[1][..])
    };
    match px.auth.check(user, pass) {
        Ok(p) => match sess.become_user(p, &px.cfg.namespace) {
            Ok(()) => {
                sess.authenticated = true;
                Value::ok()
            }
            Err(e) => e.to_reply(),
        },
        Err(e) => {
            px.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            e.to_reply()
        }
    }
}

/// Redis accepts client names made of printable ASCII without spaces.
fn valid_name(b: &[u8]) -> bool {
    b.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

fn hello(px: &Proxy, sess: &mut Session, a: &[Bytes]) -> Value {
    let mut ver = None;
    let mut next = 1;
    if a.len() >= 2 {
        match std::str::from_utf8(&a[1])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(v) if v == 2 || v == 3 => ver = Some(v),
            Some(_) => return Value::error("NOPROTO unsupported protocol version"),
            None => return Value::error("ERR Protocol version is not an integer or out of range"),
        }
        next = 2;
    }
    let mut creds = None;
    let mut setname = None;
    let mut j = next;
    while j < a.len() {
        let more = a.len() - 1 - j;
        let opt = &a[j];
        if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            creds = Some((a[j + 1].clone(), a[j + 2].clone()));
            j += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            setname = Some(a[j + 1].clone());
            j += 2;
        } else {
            return Value::error(format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(opt)
            ));
        }
    }
    if let Some((u, p)) = creds {
        match px.auth.check(Some(&u), &p) {
            Ok(p) => {
                if let Err(e) = sess.become_user(p, &px.cfg.namespace) {
                    return e.to_reply();
                }
                sess.authenticated = true;
            }
            Err(e) => {
                px.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                return e.to_reply();
            }
        }
    }
    if !sess.authenticated {
        return Value::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    if let Some(n) = setname {
        if !valid_name(&n) {
            return Value::error(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        }
        set_name(sess, &n);
    }
    if let Some(v) = ver {
        sess.proto = if v == 3 { Proto::Resp3 } else { Proto::Resp2 };
        sess.update_meta(|m| m.resp = v);
    }
    let version = px.upstream.facts().redis_version;
    Value::Map(vec![
        (Value::bulk_str("server"), Value::bulk_str("redis")),
        (Value::bulk_str("version"), Value::bulk_str(&version)),
        (Value::bulk_str("proto"), Value::Int(sess.proto.version())),
        (Value::bulk_str("id"), Value::Int(sess.id() as i64)),
        (Value::bulk_str("mode"), Value::bulk_str("standalone")),
        (Value::bulk_str("role"), Value::bulk_str("master")),
        (Value::bulk_str("modules"), Value::Array(vec![])),
    ])
}

fn set_name(sess: &mut Session, n: &[u8]) {
    let name = String::from_utf8_lossy(n).into_owned();
    sess.name = (!name.is_empty()).then(|| name.clone());
    sess.update_meta(|m| m.name = name);
}

fn on_off(b: &[u8]) -> Option<bool> {
    if b.eq_ignore_ascii_case(b"on") {
        Some(true)
    } else if b.eq_ignore_ascii_case(b"off") {
        Some(false)
    } else {
        None
    }
}

fn client(px: &Proxy, sess: &mut Session, sub: &str, a: &[Bytes]) -> Value {
    match sub {
        "client|id" => Value::Int(sess.id() as i64),
        "client|getname" => match &sess.name {
            Some(n) => Value::bulk_str(n),
            None => Value::Null,
        },
        "client|setname" => {
            if !valid_name(&a[2]) {
                return Value::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            set_name(sess, &a[2]);
            Value::ok()
        }
        "client|info" => {
            let line = sess.entry.describe(px.started);
            Value::Verbatim(Bytes::from(format!("{line}\n")))
        }
        "client|list" => client_list(px, a),
        "client|setinfo" => {
            let attr = a[2].to_ascii_lowercase();
            let val = &a[3];
            let field = match &attr[..] {
                b"lib-name" => "lib-name",
                b"lib-ver" => "lib-ver",
                _ => {
                    return Value::error(format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&a[2])
                    ))
                }
            };
            if !valid_name(val) {
                return Value::error(format!(
                    "ERR {field} cannot contain spaces, newlines or special characters."
                ));
            }
            let val = String::from_utf8_lossy(val).into_owned();
            sess.update_meta(|m| {
                if field == "lib-name" {
                    m.lib_name = val;
                } else {
                    m.lib_ver = val;
                }
            });
            Value::ok()
        }
        "client|no-evict" | "client|no-touch" => match on_off(&a[2]) {
            Some(_) => Value::ok(),
            None => Error::syntax().to_reply(),
        },
        "client|reply" => {
            let m = a[2].to_ascii_lowercase();
            match &m[..] {
                b"on" => {
                    sess.reply_mode = ReplyMode::On;
                    Value::ok()
                }
                // Neither OFF nor SKIP is answered (Redis sends nothing for them).
                b"off" => {
                    sess.reply_mode = ReplyMode::Off;
                    Value::ok()
                }
                b"skip" => {
                    sess.reply_mode = ReplyMode::Skip;
                    Value::ok()
                }
                _ => Error::syntax().to_reply(),
            }
        }
        "client|help" => Value::Array(
            [
                "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "GETNAME",
                "ID",
                "INFO",
                "LIST [TYPE normal] [ID <id> ...]",
                "NO-EVICT (ON|OFF)",
                "NO-TOUCH (ON|OFF)",
                "REPLY (ON|OFF|SKIP)",
                "SETINFO <LIB-NAME|LIB-VER> <value>",
                "SETNAME <name>",
                "HELP",
            ]
            .iter()
            .map(|s| Value::SimpleOwned(s.to_string()))
            .collect(),
        ),
        _ => Error::unknown_subcommand(sub.as_bytes(), "client").to_reply(),
    }
}

fn client_list(px: &Proxy, a: &[Bytes]) -> Value {
    let mut ids: Option<Vec<u64>> = None;
    let mut i = 2;
    while i < a.len() {
        if a[i].eq_ignore_ascii_case(b"TYPE") && i + 1 < a.len() {
            let t = a[i + 1].to_ascii_lowercase();
            match &t[..] {
                b"normal" => {}
                b"master" | b"replica" | b"slave" | b"pubsub" => {
                    return Value::Verbatim(Bytes::new());
                }
                _ => {
                    return Value::error(format!(
                        "ERR Unknown client type '{}'",
                        String::from_utf8_lossy(&a[i + 1])
                    ))
                }
            }
            i += 2;
        } else if a[i].eq_ignore_ascii_case(b"ID") && i + 1 < a.len() {
            let mut v = Vec::new();
            for id in &a[i + 1..] {
                match std::str::from_utf8(id)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    Some(n) if n > 0 => v.push(n),
                    _ => return Value::error("ERR Invalid client ID"),
                }
            }
            ids = Some(v);
            break;
        } else {
            return Error::syntax().to_reply();
        }
    }
    let mut out = String::new();
    for c in px.clients.all() {
        if ids.as_ref().is_some_and(|ids| !ids.contains(&c.id)) {
            continue;
        }
        out.push_str(&c.describe(px.started));
        out.push('\n');
    }
    Value::Verbatim(Bytes::from(out))
}

/// Redis's `stringmatchlen`, case-insensitive: `*`, `?`, `[a-z]`, `[^x]`, `\x`.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    fn m(p: &[u8], s: &[u8]) -> bool {
        let (mut pi, mut si) = (0, 0);
        while pi < p.len() {
            match p[pi] {
                b'*' => {
                    while pi + 1 < p.len() && p[pi + 1] == b'*' {
                        pi += 1;
                    }
                    if pi + 1 == p.len() {
                        return true;
                    }
                    for k in si..=s.len() {
                        if m(&p[pi + 1..], &s[k..]) {
                            return true;
                        }
                    }
                    return false;
                }
                b'?' => {
                    if si >= s.len() {
                        return false;
                    }
                    si += 1;
                }
                b'[' => {
                    if si >= s.len() {
                        return false;
                    }
                    pi += 1;
                    let not = pi < p.len() && p[pi] == b'^';
                    if not {
                        pi += 1;
                    }
                    let mut matched = false;
                    while pi < p.len() && p[pi] != b']' {
                        if p[pi] == b'\\' && pi + 1 < p.len() {
                            pi += 1;
                            matched |= p[pi] == s[si];
                        } else if pi + 2 < p.len() && p[pi + 1] == b'-' {
                            let (lo, hi) = (p[pi].min(p[pi + 2]), p[pi].max(p[pi + 2]));
                            matched |= (lo..=hi).contains(&s[si]);
                            pi += 2;
                        } else {
                            matched |= p[pi] == s[si];
                        }
                        pi += 1;
                    }
                    if matched == not {
                        return false;
                    }
                    si += 1;
                }
                b'\\' if pi + 1 < p.len() => {
                    pi += 1;
                    if si >= s.len() || p[pi] != s[si] {
                        return false;
                    }
                    si += 1;
                }
                c => {
                    if si >= s.len() || c != s[si] {
                        return false;
                    }
                    si += 1;
                }
            }
            pi += 1;
        }
        si == s.len()
    }
    m(&pat.to_ascii_lowercase(), &s.to_ascii_lowercase())
}

/// What `CONFIG GET` answers: what redis-benchmark and client libraries ask about.
fn config_values(px: &Proxy) -> Vec<(&'static str, String)> {
    let c = px.config();
    let port = px.local_port.load(Ordering::Relaxed).to_string();
    vec![
        ("save", String::new()),
        ("appendonly", "no".into()),
        ("maxmemory", "0".into()),
        ("maxmemory-policy", "noeviction".into()),
        ("databases", "1".into()),
        ("cluster-enabled", "no".into()),
        ("maxclients", c.client.maxclients.to_string()),
        (
            "proto-max-bulk-len",
            c.client.proto_max_bulk_len.to_string(),
        ),
        (
            "client-query-buffer-limit",
            c.client.query_buffer_limit.to_string(),
        ),
        ("timeout", c.client.idle_timeout_secs.to_string()),
        (
            "slowlog-log-slower-than",
            c.slowlog.log_slower_than_us.to_string(),
        ),
        ("slowlog-max-len", c.slowlog.max_len.to_string()),
        ("port", port),
    ]
}

fn config(px: &Proxy, sess: &Session, sub: &str, a: &[Bytes]) -> Value {
    match sub {
        "config|get" => {
            let mut pairs = Vec::new();
            for (k, v) in config_values(px) {
                if a[2..].iter().any(|p| glob_match(p, k.as_bytes())) {
                    pairs.push((Value::bulk_str(k), Value::bulk_str(&v)));
                }
            }
            let _ = sess;
            Value::Map(pairs)
        }
        "config|resetstat" => {
            px.stats.reset();
            crate::metrics::reset_command_stats();
            Value::ok()
        }
        "config|help" => Value::Array(vec![Value::SimpleOwned(
            "CONFIG GET <pattern> [<pattern> ...] | RESETSTAT".into(),
        )]),
        _ => Error::proxy(format!("'{sub}' is not supported through the proxy")).to_reply(),
    }
}

/// `TIERPROXY.L1 FLUSH|STATS|GET key`: operate and inspect the hot-key cache.
fn l1_admin(px: &Arc<Proxy>, sub: &str, a: &[Bytes]) -> Value {
    let Some(l1) = &px.l1 else {
        return Error::proxy("L1 is disabled (l1.enabled = false)").to_reply();
    };
    match sub {
        "tierproxy.l1|flush" => {
            l1.flush("TIERPROXY.L1 FLUSH");
            Value::ok()
        }
        // TIERPROXY.L1 WARM key|pattern…: an argument with glob characters is a SCAN
        // pattern. Runs in the background, like BGSAVE.
        "tierproxy.l1|warm" => {
            let (patterns, keys): (Vec<Bytes>, Vec<Bytes>) = a[2..]
                .iter()
                .cloned()
                .partition(|x| super::namespace::is_pattern(x));
            let (px, l1) = (px.clone(), l1.clone());
            tokio::spawn(async move {
                let n = super::cache::warm(px, l1, keys, patterns).await;
                tracing::info!(replies = n, "TIERPROXY.L1 WARM done");
            });
            Value::Simple("Background warming started")
        }
        "tierproxy.l1|stats" => Value::Map(
            l1_fields(l1)
                .into_iter()
                .map(|(k, v)| (Value::bulk_str(k), Value::Int(v as i64)))
                .collect(),
        ),
        "tierproxy.l1|get" => match l1.peek(&a[2]) {
            None => Value::Null,
            Some(replies) => Value::Map(vec![
                (
                    // The entry's: that of its longest-lived reply.
                    Value::bulk_str("ttl_ms"),
                    Value::Int(
                        replies
                            .iter()
                            .map(|(_, _, left)| left.as_millis() as i64)
                            .max()
                            .unwrap_or(0),
                    ),
                ),
                (
                    Value::bulk_str("replies"),
                    Value::Array(
                        replies
                            .into_iter()
                            .map(|(sig, reply, left)| {
                                Value::Array(vec![
                                    Value::Int(sig.first().copied().unwrap_or(2) as i64),
                                    Value::Bulk(sig.slice(1..)),
                                    Value::Bulk(reply),
                                    Value::Int(left.as_millis() as i64),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]),
        },
        _ => Error::unknown_subcommand(sub.as_bytes(), "tierproxy.l1").to_reply(),
    }
}

fn l1_fields(l1: &crate::l1::L1) -> Vec<(&'static str, u64)> {
    let st = &l1.stats;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    vec![
        ("l1_hits", ld(&st.hits)),
        ("l1_misses", ld(&st.misses)),
        ("l1_entries", l1.entries()),
        ("l1_bytes", l1.weighted_bytes()),
        ("l1_max_bytes", l1.max_bytes()),
        ("l1_max_entries", l1.max_entries()),
        ("l1_evictions", ld(&st.evictions)),
        ("l1_invalidations", ld(&st.invalidations)),
        ("l1_flushes", ld(&st.flushes)),
        ("l1_fills", ld(&st.fills)),
        ("l1_fills_raced", ld(&st.fills_raced)),
        ("l1_merged_reads", ld(&st.merged)),
        ("l1_stale_served", ld(&st.stale_served)),
        ("l1_refreshes", ld(&st.refreshes)),
        ("l1_refreshes_skipped", ld(&st.refreshes_skipped)),
        ("l1_warmed", ld(&st.warmed)),
    ]
}

/// A stable node id for the emulated one-node cluster.
fn node_id(px: &Proxy) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("tierproxy:{}", px.cfg.listen).as_bytes());
    h.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

fn cluster(px: &Arc<Proxy>, sess: &Session, sub: &str, a: &[Bytes]) -> Pending {
    let laddr = sess.entry.laddr;
    let ip = laddr.ip().to_string();
    let port = laddr.port() as i64;
    let id = node_id(px);
    let v = match sub {
        "cluster|info" => {
            let ok = px.upstream.topology().is_ok();
            let state = if ok { "ok" } else { "fail" };
            let assigned = if ok { 16384 } else { 0 };
            Value::Verbatim(Bytes::from(format!(
                "cluster_state:{state}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{assigned}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:1\r\ncluster_my_epoch:1\r\ncluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\ntotal_cluster_links_buffer_limit_exceeded:0\r\n"
            )))
        }
        "cluster|slots" => Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![
                Value::bulk_str(&ip),
                Value::Int(port),
                Value::bulk_str(&id),
                Value::Map(vec![]),
            ]),
        ])]),
        "cluster|shards" => Value::Array(vec![Value::Map(vec![
            (
                Value::bulk_str("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(16383)]),
            ),
            (
                Value::bulk_str("nodes"),
                Value::Array(vec![Value::Map(vec![
                    (Value::bulk_str("id"), Value::bulk_str(&id)),
                    (Value::bulk_str("port"), Value::Int(port)),
                    (Value::bulk_str("ip"), Value::bulk_str(&ip)),
                    (Value::bulk_str("endpoint"), Value::bulk_str(&ip)),
                    (Value::bulk_str("role"), Value::bulk_str("master")),
                    (Value::bulk_str("replication-offset"), Value::Int(0)),
                    (Value::bulk_str("health"), Value::bulk_str("online")),
                ])]),
            ),
        ])]),
        "cluster|nodes" => Value::Verbatim(Bytes::from(format!(
            "{id} {ip}:{port}@{} myself,master - 0 0 1 connected 0-16383\n",
            port + 10000
        ))),
        "cluster|myid" => Value::bulk_str(&id),
        "cluster|keyslot" => Value::Int(key_slot(&a[2]) as i64),
        "cluster|countkeysinslot" | "cluster|getkeysinslot" => {
            let slot = match std::str::from_utf8(&a[2]).ok().and_then(|s| s.parse::<i64>().ok()) {
                Some(s) if (0..16384).contains(&s) => s as u16,
                _ => return Pending::Ready(Value::error("ERR Invalid slot")),
            };
            let target = match px.upstream.mode() {
                Some(Mode::Cluster) => Target::Slot(slot),
                _ => {
                    // A standalone server has no slots; count the keys hashing there.
                    return Pending::Ready(Value::error(
                        "ERR This instance has cluster support disabled",
                    ));
                }
            };
            let args: Vec<Bytes> = a.to_vec();
            let px = px.clone();
            let proto = sess.proto;
            let hint = sess.hint();
            return Pending::Deferred(Box::pin(async move {
                match px.upstream.call(target, command_bytes(&args), proto, hint).await {
                    Ok(raw) => Value::Raw(raw),
                    Err(e) => e.to_reply(),
                }
            }));
        }
        "cluster|help" => Value::Array(vec![Value::SimpleOwned(
            "CLUSTER INFO|SLOTS|SHARDS|NODES|MYID|KEYSLOT|COUNTKEYSINSLOT|GETKEYSINSLOT (one-node view of the proxy)".into(),
        )]),
        _ => Error::unknown_subcommand(sub.as_bytes(), "cluster").to_reply(),
    };
    Pending::Ready(v)
}

/// INFO: the proxy's own sections, plus the keyspace summed over every master.
fn info(px: &Arc<Proxy>, _sess: &Session, a: &[Bytes]) -> Pending {
    let wanted: Vec<String> = a[1..]
        .iter()
        .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase())
        .collect();
    let everything = wanted.iter().any(|w| w == "all" || w == "everything");
    let all = wanted.is_empty() || everything || wanted.iter().any(|w| w == "default");
    // As Redis: commandstats and latencystats only when asked for (or "all").
    let named = wanted.clone();
    let want_extra = move |s: &str| everything || named.iter().any(|w| w == s);
    let want = move |s: &str| all || wanted.iter().any(|w| w == s);
    let px = px.clone();
    Pending::Deferred(Box::pin(async move {
        let mut out = String::new();
        if want("server") {
            let facts = px.upstream.facts();
            let mode = match px.upstream.mode() {
                Some(Mode::Cluster) => "cluster",
                Some(Mode::Standalone) => "standalone",
                None => "unknown",
            };
            let up = px.started.elapsed().as_secs();
            out.push_str(&format!(
                "# Server\r\nredis_version:{}\r\ntierproxy_version:{}\r\nredis_mode:standalone\r\nos:{} {}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{up}\r\nuptime_in_days:{}\r\nupstream_mode:{mode}\r\nworker_threads:{}\r\n\r\n",
                facts.redis_version,
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::env::consts::ARCH,
                std::process::id(),
                px.local_port.load(Ordering::Relaxed),
                up / 86400,
                px.cfg.workers(),
            ));
        }
        if want("clients") {
            out.push_str(&format!(
                "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n\r\n",
                px.clients.len(),
                px.cfg.client.maxclients
            ));
        }
        if want("stats") {
            let s = &px.stats;
            out.push_str(&format!(
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\ntotal_error_replies:{}\r\nauth_failures:{}\r\nprotocol_errors:{}\r\n\r\n",
                s.connections.load(Ordering::Relaxed),
                s.commands.load(Ordering::Relaxed),
                s.rejected.load(Ordering::Relaxed),
                s.errors.load(Ordering::Relaxed),
                s.auth_failures.load(Ordering::Relaxed),
                s.protocol_errors.load(Ordering::Relaxed),
            ));
        }
        if want("upstream") {
            let (nodes, age) = match px.upstream.topology() {
                Ok(t) => (t.masters.len(), t.refreshed_at.elapsed().as_secs()),
                Err(_) => (0, 0),
            };
            out.push_str(&format!(
                "# Upstream\r\nupstream_masters:{nodes}\r\nupstream_connections:{}\r\ntopology_refreshes:{}\r\nlast_topology_refresh_seconds_ago:{age}\r\n\r\n",
                px.upstream.total_connections(),
                px.upstream.refreshes.load(Ordering::Relaxed),
            ));
        }
        if want("l1") {
            out.push_str("# L1\r\n");
            match &px.l1 {
                Some(l1) => {
                    match l1.disabled_reason() {
                        // Configured on, but the upstream refused tracking.
                        Some(why) => out.push_str(&format!(
                            "l1_enabled:0\r\nl1_disabled_reason:{}\r\n",
                            why.replace(['\r', '\n'], " ")
                        )),
                        None => out.push_str("l1_enabled:1\r\n"),
                    }
                    let mode = match l1.coherence {
                        crate::l1::Coherence::Tracking => "tracking",
                        crate::l1::Coherence::Ttl => "ttl",
                    };
                    out.push_str(&format!("l1_coherence:{mode}\r\n"));
                    for (k, v) in l1_fields(l1) {
                        out.push_str(&format!("{k}:{v}\r\n"));
                    }
                }
                None => out.push_str("l1_enabled:0\r\n"),
            }
            out.push_str("\r\n");
        }
        if want("spill") {
            out.push_str("# Spill\r\n");
            match &px.spill {
                Some(sp) => {
                    let st = &sp.stats;
                    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                    let ops = ld(&st.store_ops).max(1);
                    out.push_str(&format!(
                        "spill_enabled:1\r\nspill_store:{}\r\nspill_threshold_bytes:{}\r\nspill_writes:{}\r\nspill_bytes_in:{}\r\nspill_bytes_stored:{}\r\nspill_reads:{}\r\nspill_bytes_out:{}\r\nspill_merged_reads:{}\r\nspill_errors:{}\r\nspill_discarded:{}\r\nspill_store_ops:{}\r\nspill_store_avg_ms:{:.2}\r\nspill_swept:{}\r\n",
                        sp.store.describe(),
                        sp.threshold(),
                        ld(&st.writes),
                        ld(&st.bytes_in),
                        ld(&st.bytes_stored),
                        ld(&st.reads),
                        ld(&st.bytes_out),
                        ld(&st.merged_reads),
                        ld(&st.errors),
                        ld(&st.discarded),
                        ld(&st.store_ops),
                        ld(&st.store_ms_total) as f64 / ops as f64,
                        ld(&st.swept),
                    ));
                    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
                    let failures: Vec<String> = st
                        .failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .map(|((op, kind), n)| format!("{op}_{kind}={n}"))
                        .collect();
                    out.push_str(&format!(
                        "spill_ranged_reads:{}\r\nspill_compression_ratio:{:.2}\r\nspill_store_errors:{}\r\nl2_compression_min_bytes:{}\r\nl2_compressed_writes:{}\r\nl2_compressed_bytes_in:{}\r\nl2_compressed_bytes_stored:{}\r\nl2_compression_ratio:{:.2}\r\n",
                        ld(&st.ranged_reads),
                        ratio(ld(&st.bytes_in), ld(&st.bytes_stored)),
                        failures.join(","),
                        sp.compress_min,
                        ld(&st.compressed_writes),
                        ld(&st.compressed_bytes_in),
                        ld(&st.compressed_bytes_stored),
                        ratio(ld(&st.compressed_bytes_in), ld(&st.compressed_bytes_stored)),
                    ));
                }
                None => out.push_str("spill_enabled:0\r\n"),
            }
            out.push_str("\r\n");
        }
        if want_extra("commandstats") {
            out.push_str("# Commandstats\r\n");
            crate::metrics::info_commandstats(&mut out);
            out.push_str("\r\n");
        }
        if want_extra("latencystats") {
            out.push_str("# Latencystats\r\n");
            crate::metrics::info_latencystats(&mut out);
            out.push_str("\r\n");
        }
        if want("keyspace") {
            out.push_str("# Keyspace\r\n");
            match keyspace_totals(&px).await {
                Ok((keys, expires)) if keys > 0 => {
                    out.push_str(&format!("db0:keys={keys},expires={expires},avg_ttl=0\r\n"))
                }
                Ok(_) => {}
                Err(e) => out.push_str(&format!("# error: {e}\r\n")),
            }
        }
        // Redis ends the text without the final blank line.
        while out.ends_with("\r\n\r\n") {
            out.truncate(out.len() - 2);
        }
        Value::Verbatim(Bytes::from(out))
    }))
}

async fn keyspace_totals(px: &Proxy) -> Result<(u64, u64), Error> {
    let topo = px.upstream.topology()?;
    let mut tickets = Vec::new();
    for n in &topo.masters {
        let cmd = command_bytes(&["INFO", "keyspace"]);
        tickets.push(
            px.upstream
                .start(Target::Node(n.clone()), cmd, Proto::Resp2, 0)
                .await,
        );
    }
    let (mut keys, mut expires) = (0u64, 0u64);
    for t in tickets {
        let raw = px.upstream.finish(t).await?;
        let text = as_str(&raw)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("db0:")) {
            for kv in line[4..].split(',') {
                match kv.split_once('=') {
                    Some(("keys", v)) => keys += v.trim().parse::<u64>().unwrap_or(0),
                    Some(("expires", v)) => expires += v.trim().parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    let _ = split_aggregate;
    Ok((keys, expires))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b"save"));
        assert!(glob_match(b"max*", b"maxmemory"));
        assert!(glob_match(b"SAVE", b"save"));
        assert!(glob_match(b"s?ve", b"save"));
        assert!(glob_match(b"[a-c]ppendonly", b"appendonly"));
        assert!(!glob_match(b"[^a]ppendonly", b"appendonly"));
        assert!(!glob_match(b"max", b"maxmemory"));
    }
}
