//! Commands that may block the connection they run on (BLPOP, BLMOVE, XREAD BLOCK, …,
//! WAIT): each runs on a pinned connection of its own, so it never holds up other
//! clients' requests on the shared pipelined connections. The connection returns to the
//! pool when the reply arrives; a client that leaves while blocked abandons the command
//! and its connection is closed (see [`Pending::Blocking`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Pending;
use crate::error::Error;
use crate::parse::reply::{as_int, error_text};
use crate::parse::request::Request;
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::{Mode, Target};
use crate::Proxy;

/// How long the command may block, from its own arguments: `None` blocks indefinitely
/// (timeout 0). Unparsable timeouts are left to Redis to reject, with no extra wait.
pub fn block_for(name: &str, args: &[Bytes]) -> Option<Duration> {
    let secs = |b: &Bytes| -> Option<f64> { std::str::from_utf8(b).ok()?.parse::<f64>().ok() };
    let ms = |b: &Bytes| -> Option<f64> { secs(b).map(|v| v / 1000.0) };
    let t = match name {
        "blmpop" | "bzmpop" => args.get(1).and_then(secs),
        "xread" | "xreadgroup" => {
            // Options come before STREAMS; XREADGROUP's GROUP takes two names (which
            // may be spelled "block").
            let mut i = 1;
            let mut found = None;
            while i < args.len() && !args[i].eq_ignore_ascii_case(b"streams") {
                if args[i].eq_ignore_ascii_case(b"group") {
                    i += 3;
                    continue;
                }
                if args[i].eq_ignore_ascii_case(b"block") {
                    found = args.get(i + 1).and_then(ms);
                    break;
                }
                i += 1;
            }
            match found {
                Some(v) => Some(v),
                // Without BLOCK, XREAD answers at once.
                None => return Some(Duration::ZERO),
            }
        }
        "wait" => args.get(2).and_then(ms),
        _ => args.last().and_then(secs),
    };
    match t {
        Some(0.0) => None,
        Some(v) if v.is_finite() && v > 0.0 => Some(Duration::from_secs_f64(v.min(1e9))),
        // No BLOCK option (XREAD returns at once), or a bad value Redis will reject.
        _ => Some(Duration::ZERO),
    }
}

/// Runs a blocking command on a pinned connection to `target`'s node, following
/// MOVED/ASK. The wait is bounded by the command's own timeout plus the request timeout.
pub fn run(px: &Arc<Proxy>, proto: Proto, target: Target, name: &str, req: Request) -> Pending {
    let px = px.clone();
    let limit = block_for(name, &req.args).map(|d| d + px.upstream.settings.request_timeout);
    Pending::Blocking(Box::pin(async move {
        let result = async {
            let mut node = px.upstream.resolve_target(&target)?;
            let mut asking = false;
            let mut hops = 0;
            loop {
                let mut pin = px.upstream.pinned(&node, proto, true).await?;
                let asking_rx = if asking {
                    Some(pin.send(command_bytes(&["ASKING"]))?)
                } else {
                    None
                };
                let rx = pin.send(req.raw.clone())?;
                if let Some(a) = asking_rx {
                    pin.reply(a, None).await?;
                }
                let reply = pin.reply(rx, Some(limit)).await?;
                pin.idle();
                drop(pin);
                match px.upstream.redirected(&reply) {
                    Some((next, ask)) if hops < px.upstream.settings.max_redirects => {
                        hops += 1;
                        node = next;
                        asking = ask;
                    }
                    _ => return Ok::<Bytes, Error>(reply),
                }
            }
        }
        .await;
        match result {
            Ok(raw) => Value::Raw(raw),
            Err(e) => e.to_reply(),
        }
    }))
}

/// WAIT numreplicas timeout: the client's writes went to several masters over shared
/// connections, so WAIT runs on every master, on a pinned connection that first makes a
/// write of its own (a short-lived marker key in one of that master's slots). That write
/// comes after all of the client's earlier writes (WAIT is a pipeline barrier), so
/// "replicas that acknowledged it" counts replicas holding everything the client wrote.
/// The reply is the smallest count over the masters.
pub fn wait(px: &Arc<Proxy>, proto: Proto, req: Request) -> Pending {
    let px = px.clone();
    let limit = block_for("wait", &req.args).map(|d| d + px.upstream.settings.request_timeout);
    Pending::Blocking(Box::pin(async move {
        let result = async {
            let topo = px.upstream.topology()?;
            let masters = match topo.mode {
                Mode::Cluster => topo.masters_by_first_slot(),
                Mode::Standalone => topo.masters.iter().map(|n| (0u16, n.clone())).collect(),
            };
            let mut waits = Vec::new();
            for (slot, node) in masters {
                let px = px.clone();
                let raw = req.raw.clone();
                waits.push(tokio::spawn(async move {
                    let mut pin = px.upstream.pinned(&node, proto, true).await?;
                    let marker = format!("tierproxy:wait:{{{}}}", slot_tag(slot));
                    let set = pin.send(command_bytes(&["SET", &marker, "1", "PX", "1000"]))?;
                    let rx = pin.send(raw)?;
                    let s = pin.reply(set, None).await?;
                    if let Some(e) = error_text(&s) {
                        return Err(Error::redis(e));
                    }
                    let r = pin.reply(rx, Some(limit)).await?;
                    pin.idle();
                    Ok::<Bytes, Error>(r)
                }));
            }
            // A client that leaves abandons every node's WAIT, not just the one awaited.
            let _abort = AbortAll(waits.iter().map(|w| w.abort_handle()).collect());
            let mut least: Option<i64> = None;
            for w in waits {
                let r = w.await.map_err(|_| Error::proxy("WAIT task failed"))??;
                if error_text(&r).is_some() {
                    return Ok(Value::Raw(r));
                }
                let n = as_int(&r).ok_or_else(|| Error::proxy("unexpected WAIT reply"))?;
                least = Some(least.map_or(n, |l| l.min(n)));
            }
            Ok(Value::Int(least.unwrap_or(0)))
        }
        .await;
        result.unwrap_or_else(|e: Error| e.to_reply())
    }))
}

struct AbortAll(Vec<tokio::task::AbortHandle>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// A hash tag whose slot is `slot` (found by search; cached per slot would be cheaper,
/// but WAIT is rare).
fn slot_tag(slot: u16) -> String {
    (0u32..)
        .map(|i| format!("w{i}"))
        .find(|t| crate::upstream::key_slot(t.as_bytes()) == slot)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::parse::request::args;

    #[test]
    fn block_times() {
        assert_eq!(block_for("blpop", &args(&["blpop", "a", "b", "0"])), None);
        assert_eq!(
            block_for("blpop", &args(&["blpop", "a", "1.5"])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            block_for("blmpop", &args(&["blmpop", "2", "1", "k", "LEFT"])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            block_for(
                "xread",
                &args(&["xread", "BLOCK", "0", "STREAMS", "s", "$"])
            ),
            None
        );
        assert_eq!(
            block_for("xread", &args(&["xread", "STREAMS", "s", "$"])),
            Some(Duration::ZERO)
        );
        assert_eq!(
            block_for(
                "xreadgroup",
                &args(&[
                    "xreadgroup",
                    "GROUP",
                    "block",
                    "c1",
                    "BLOCK",
                    "0",
                    "STREAMS",
                    "s",
                    ">"
                ])
            ),
            None
        );
        assert_eq!(
            block_for("wait", &args(&["wait", "1", "250"])),
            Some(Duration::from_millis(250))
        );
    }
}
