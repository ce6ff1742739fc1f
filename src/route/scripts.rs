//! Scripts and functions over a cluster.
//!
//! EVAL/EVALSHA/FCALL and their `_RO` forms are routed by their keys like any command.
//! What needs the proxy: SCRIPT LOAD/EXISTS/FLUSH and FUNCTION LOAD/DELETE/FLUSH/RESTORE
//! go to every master, so an EVALSHA works whatever slot its keys hash to; and Redis
//! does not replicate its script cache, so after a failover (or a SCRIPT FLUSH on one
//! node) an EVALSHA of a script the proxy has seen answers NOSCRIPT. The proxy keeps
//! the bodies it saw (bounded) and heals that: it loads the script on the node and
//! retries once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha1::{Digest, Sha1};

use super::Pending;
use crate::client::session::Session;
use crate::error::Error;
use crate::parse::reply::{as_int, as_str, error_text, split_aggregate};
use crate::parse::request::Request;
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::Target;
use crate::{metrics, Proxy};

/// Script bodies seen (sha1 hex, lower case → body), bounded in count and bytes.
#[derive(Default)]
pub struct ScriptCache {
    inner: Mutex<(HashMap<String, Bytes>, usize)>,
}

const MAX_SCRIPTS: usize = 10_000;
const MAX_SCRIPT_BYTES: usize = 64 * 1024 * 1024;

impl ScriptCache {
    fn remember(&self, body: &Bytes) -> String {
        let sha = hex(&Sha1::digest(body));
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !g.0.contains_key(&sha) {
            if g.0.len() >= MAX_SCRIPTS || g.1 + body.len() > MAX_SCRIPT_BYTES {
                // Rarely reached (applications use a handful of scripts): start over
                // rather than track recency on every EVAL.
                g.0.clear();
                g.1 = 0;
            }
            g.1 += body.len();
            g.0.insert(sha.clone(), body.clone());
        }
        sha
    }

    fn get(&self, sha: &[u8]) -> Option<Bytes> {
        let sha = std::str::from_utf8(sha).ok()?.to_ascii_lowercase();
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(&sha).cloned()
    }

    fn clear(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.clear();
        g.1 = 0;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// EVAL and EVAL_RO: remember the body (for a later EVALSHA's NOSCRIPT).
pub fn saw_eval(px: &Proxy, req: &Request) {
    if let Some(body) = req.args.get(1) {
        px.scripts.remember(body);
    }
}

/// SCRIPT …/FUNCTION … on every master, replies combined.
pub fn fan_out(px: &Arc<Proxy>, sess: &Session, name: &str, req: Request) -> Pending {
    let px = px.clone();
    let proto = sess.proto;
    let hint = sess.hint();
    let name = name.to_string();
    Pending::Deferred(Box::pin(async move {
        let r = async {
            if name == "script|load" {
                px.scripts.remember(&req.args[2]);
            }
            if name == "script|flush" {
                px.scripts.clear();
            }
            let replies = px
                .upstream
                .on_every_master(req.raw.clone(), proto, hint)
                .await?;
            let Some(first) = replies.first().cloned() else {
                return Err(Error::NoTopology("no masters known".into()));
            };
            if name == "script|exists" {
                // A script exists for the proxy when every master has it.
                let mut all: Option<Vec<i64>> = None;
                for r in &replies {
                    let flags: Vec<i64> = split_aggregate(r)
                        .ok_or_else(|| Error::proxy("unexpected SCRIPT EXISTS reply"))?
                        .iter()
                        .map(|i| as_int(i).unwrap_or(0))
                        .collect();
                    all = Some(match all {
                        None => flags,
                        Some(a) => a
                            .iter()
                            .zip(&flags)
                            .map(|(x, y)| x.min(y))
                            .copied()
                            .collect(),
                    });
                }
                return Ok(Value::Array(
                    all.unwrap_or_default()
                        .into_iter()
                        .map(Value::Int)
                        .collect(),
                ));
            }
            Ok(Value::Raw(first))
        }
        .await;
        r.unwrap_or_else(|e: Error| e.to_reply())
    }))
}

/// EVALSHA/EVALSHA_RO: on NOSCRIPT for a script the proxy has seen, load it on that
/// node and retry once.
pub async fn evalsha(px: &Arc<Proxy>, sess: &Session, target: Target, req: Request) -> Pending {
    let proto = sess.proto;
    let hint = sess.hint();
    // Pin a keyless call to one node, so the retry goes where the NOSCRIPT came from.
    let target = match target {
        Target::Any => match px.upstream.resolve_target(&Target::Any) {
            Ok(n) => Target::Node(n),
            Err(e) => return Pending::error(e),
        },
        t => t,
    };
    let ticket = px
        .upstream
        .start(target.clone(), req.raw.clone(), proto, hint)
        .await;
    // A script the proxy could heal is a pipeline barrier: if it is healed, the retry
    // must still run before the commands behind it. (The call itself is sent now.)
    let healable = px.scripts.get(&req.args[1]).is_some();
    let px = px.clone();
    let fut = Box::pin(async move {
        let r = async {
            let reply = px.upstream.finish(ticket).await?;
            let noscript = error_text(&reply).is_some_and(|e| e.starts_with("NOSCRIPT"));
            let body = match (noscript, px.scripts.get(&req.args[1])) {
                (true, Some(b)) => b,
                _ => return Ok(reply),
            };
            let load = command_bytes(&[&b"SCRIPT"[..], b"LOAD", &body]);
            let loaded = px
                .upstream
                .call(target.clone(), load, Proto::Resp2, hint)
                .await?;
            if as_str(&loaded).is_none() {
                return Ok(reply);
            }
            metrics::SCRIPTS_RELOADED.fetch_add(1, Ordering::Relaxed);
            tracing::info!("NOSCRIPT healed by reloading the script");
            px.upstream.call(target, req.raw.clone(), proto, hint).await
        }
        .await;
        match r {
            Ok(b) => Value::Raw(b),
            Err(e) => e.to_reply(),
        }
    });
    if healable {
        Pending::Deferred(fut)
    } else {
        Pending::Later(fut)
    }
}
