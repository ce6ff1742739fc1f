//! MULTI/EXEC/DISCARD/WATCH/UNWATCH with Redis Cluster's semantics.
//!
//! Commands between MULTI and EXEC are checked and queued in the proxy (`+QUEUED`), and
//! EXEC sends `MULTI, …, EXEC` in one write on a pinned connection to the transaction's
//! node. So a transaction holds an upstream connection for one round trip, not for as
//! long as the client takes to queue it. WATCH is the exception: it must reach the node
//! when the client sends it, so it pins a connection until EXEC, DISCARD or UNWATCH.
//!
//! All keys of a transaction, WATCHed ones included, must hash to one slot: the command
//! that breaks this gets `CROSSSLOT` and EXEC then gets `EXECABORT`, as Redis Cluster
//! does for a command it cannot serve inside a transaction.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

use super::{spill, Pending};
use crate::client::session::Session;
use crate::error::Error;
use crate::parse::reply::{error_text, is_error, split_aggregate};
use crate::parse::request::Request;
use crate::parse::table::{CommandInfo, Lookup, Lowered, Policy};
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::pinned::Pinned;
use crate::upstream::{key_slot, Mode, Target};
use crate::{metrics, Proxy};

/// A session's transaction state.
#[derive(Default)]
pub struct TxnState {
    /// Between MULTI and EXEC/DISCARD: the queued commands.
    queue: Option<Queue>,
    /// Keys are WATCHed (on the connection in `pin`, once the WATCH reply came).
    watching: bool,
    /// The slot every key of the transaction must hash to, once one is known.
    slot: Option<u16>,
    /// The pinned connection carrying the WATCH. Shared with the deferred WATCH and
    /// EXEC replies, which fill and empty it; they are pipeline barriers, so the next
    /// command never sees it half-updated.
    pin: Arc<Mutex<WatchSlot>>,
}

#[derive(Default)]
struct WatchSlot {
    pin: Option<Pinned>,
    /// Keys were WATCHed on a connection that is gone: the WATCH can no longer be
    /// honoured, so EXEC must not run the transaction.
    lost: bool,
}

impl TxnState {
    pub fn in_multi(&self) -> bool {
        self.queue.is_some()
    }

    /// Keys may be WATCHed (reads then bypass L1).
    pub fn is_watching(&self) -> bool {
        self.watching
    }

    /// RESET, DISCARD, a failed EXEC: no transaction, nothing watched. A pinned
    /// connection is returned to the pool (UNWATCHed first).
    pub fn clear(&mut self) {
        self.queue = None;
        self.watching = false;
        self.slot = None;
        take_all(&self.pin);
    }
}

impl TxnState {
    /// How many commands are queued (0 outside MULTI).
    pub fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.cmds.len())
    }

    /// The command queued last names keys of namespace `ns` in its reply, `how`: EXEC
    /// strips them there, as the reply of the command run alone would be.
    pub fn strip_last(&mut self, ns: Bytes, how: super::namespace::Strip) {
        if let Some(c) = self.queue.as_mut().and_then(|q| q.cmds.last_mut()) {
            c.strip = Some((ns, how));
        }
    }

    /// A command was refused while queueing (as by Redis's checks): EXEC will answer
    /// EXECABORT. Nothing happens outside MULTI.
    pub fn refuse_queued(&mut self) {
        if let Some(q) = self.queue.as_mut() {
            q.aborted = true;
        }
    }
}

#[derive(Default)]
struct Queue {
    cmds: Vec<Queued>,
    bytes: usize,
    /// A command was refused while queueing: EXEC answers EXECABORT.
    aborted: bool,
    /// Keys the transaction may write (L1 treats them as being written until EXEC ends).
    write_keys: Vec<Bytes>,
    flush: bool,
}

struct Queued {
    raw: Bytes,
    /// Its reply may carry spill stubs to resolve.
    resolve: bool,
    /// Rewritten into a script that refuses to touch a spilled value (its name, for the
    /// error that replaces the script's refusal).
    guarded: Option<String>,
    /// A namespaced client's KEYS, SCAN or pop: the key names its reply carries lose the
    /// namespace (see [`TxnState::strip_last`]).
    strip: Option<(Bytes, super::namespace::Strip)>,
}

fn take(cell: &Mutex<WatchSlot>) -> Option<Pinned> {
    cell.lock().unwrap_or_else(|p| p.into_inner()).pin.take()
}

fn put(cell: &Mutex<WatchSlot>, pin: Pinned) {
    cell.lock().unwrap_or_else(|p| p.into_inner()).pin = Some(pin);
}

fn mark_lost(cell: &Mutex<WatchSlot>) {
    cell.lock().unwrap_or_else(|p| p.into_inner()).lost = true;
}

/// Empties the slot: (the pinned connection, whether a WATCH was lost).
fn take_all(cell: &Mutex<WatchSlot>) -> (Option<Pinned>, bool) {
    let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
    (g.pin.take(), std::mem::take(&mut g.lost))
}

const WATCH_LOST: &str =
    "the upstream connection holding the WATCH was lost; transaction discarded";

const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

/// Commands that change what the connection is (protocol, identity, subscriptions):
/// queued inside a transaction they would change the pinned upstream connection instead.
fn connection_scoped(info: &CommandInfo) -> bool {
    match info.policy {
        Policy::Local => !matches!(info.name.as_str(), "ping" | "echo" | "time"),
        Policy::Unsupported => true,
        _ => info.flags.pubsub && (info.name.ends_with("subscribe") || info.name == "monitor"),
    }
}

/// Whether [`intercept`] has anything to do with this command.
pub fn wants(sess: &Session, name: &[u8]) -> bool {
    sess.authenticated
        && (sess.txn.in_multi()
            || matches!(
                name,
                b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch"
            ))
        && !matches!(name, b"quit" | b"reset")
}

/// Transaction commands, and every command while a transaction is open. Gives the
/// request back when it is not the transaction's business.
pub async fn intercept(
    px: &Arc<Proxy>,
    sess: &mut Session,
    lowered: &Lowered,
    req: Request,
) -> Result<Pending, Request> {
    let name = lowered.as_bytes();
    let ours = matches!(
        name,
        b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch"
    );
    if !sess.authenticated || !(ours || sess.txn.in_multi()) || matches!(name, b"quit" | b"reset") {
        return Err(req);
    }
    let Some(table) = px.upstream.table() else {
        return Err(req);
    };
    let in_multi = sess.txn.in_multi();
    // Redis's own checks come first, and inside MULTI they abort the transaction.
    let info = match table.lookup_lowered(lowered, &req.args) {
        Lookup::Found(info) if info.arity_ok(req.args.len()) => info,
        other => {
            if let Some(q) = sess.txn.queue.as_mut() {
                q.aborted = true;
            }
            return Ok(Pending::error(match other {
                Lookup::UnknownSub(c) => Error::unknown_subcommand(&req.args[1], &c.name),
                Lookup::Unknown => Error::unknown_command(&req.args[0], &req.args[1..]),
                Lookup::Found(info) => Error::arity(&info.name),
            }));
        }
    };
    let cluster = px.upstream.mode() == Some(Mode::Cluster);
    Ok(match name {
        b"multi" if in_multi => Pending::error(Error::redis("ERR MULTI calls can not be nested")),
        b"multi" => {
            sess.txn.queue = Some(Queue::default());
            Pending::Ready(Value::ok())
        }
        b"exec" if !in_multi => Pending::error(Error::redis("ERR EXEC without MULTI")),
        b"exec" => exec(px, sess),
        b"discard" if !in_multi => Pending::error(Error::redis("ERR DISCARD without MULTI")),
        b"discard" => {
            sess.txn.clear();
            Pending::Ready(Value::ok())
        }
        b"watch" if in_multi => {
            Pending::error(Error::redis("ERR WATCH inside MULTI is not allowed"))
        }
        b"watch" => watch(px, sess, req, cluster),
        b"unwatch" if !in_multi => {
            sess.txn.clear();
            Pending::Ready(Value::ok())
        }
        _ => queue(px, sess, &info, req, cluster).await,
    })
}

/// The transaction's slot, with these keys added; `CROSSSLOT` if they don't share it.
fn join_slot(current: Option<u16>, keys: &[&Bytes], cluster: bool) -> Result<Option<u16>, Error> {
    if !cluster {
        return Ok(None);
    }
    let mut slot = current;
    for k in keys {
        let s = key_slot(k);
        match slot {
            Some(x) if x != s => return Err(Error::crossslot()),
            _ => slot = Some(s),
        }
    }
    Ok(slot)
}

fn watch(px: &Arc<Proxy>, sess: &mut Session, req: Request, cluster: bool) -> Pending {
    let keys: Vec<&Bytes> = req.args[1..].iter().collect();
    let slot = match join_slot(sess.txn.slot, &keys, cluster) {
        Ok(s) => s,
        Err(e) => return Pending::error(e),
    };
    sess.txn.slot = slot;
    sess.txn.watching = true;
    let cell = sess.txn.pin.clone();
    let proto = sess.proto;
    let px = px.clone();
    Pending::Deferred(Box::pin(async move {
        let r = async {
            let mut pin = match take(&cell) {
                Some(p) if p.is_alive() => p,
                Some(p) if p.watching => {
                    // Keys watched before are no longer watched anywhere: a later EXEC
                    // must fail rather than commit over a change it cannot see.
                    mark_lost(&cell);
                    return Err(Error::proxy(WATCH_LOST));
                }
                _ => {
                    let target = slot.map_or(Target::Any, Target::Slot);
                    let node = px.upstream.resolve_target(&target)?;
                    px.upstream.pinned(&node, proto, true).await?
                }
            };
            let mut reply = match pin.call(req.raw.clone()).await {
                Ok(r) => r,
                // The connection died before this proxy noticed: what it watched is
                // lost with it, as above.
                Err(e) if pin.watching => {
                    tracing::debug!(error = %e, "the connection holding a WATCH failed");
                    mark_lost(&cell);
                    return Err(Error::proxy(WATCH_LOST));
                }
                Err(e) => return Err(e),
            };
            if let Some((node, false)) = px.upstream.redirected(&reply) {
                if !pin.watching {
                    // The slot moved before anything was watched here: watch at its owner.
                    pin = px.upstream.pinned(&node, proto, true).await?;
                    reply = pin.call(req.raw.clone()).await?;
                }
            }
            if !is_error(&reply) {
                pin.watching = true;
            }
            if pin.watching {
                put(&cell, pin);
            }
            Ok::<Bytes, Error>(reply)
        }
        .await;
        r.map(Value::Raw).unwrap_or_else(|e| e.to_reply())
    }))
}

async fn queue(
    px: &Arc<Proxy>,
    sess: &mut Session,
    info: &Arc<CommandInfo>,
    req: Request,
    cluster: bool,
) -> Pending {
    let r = check_and_rewrite(px, sess, info, req, cluster).await;
    let Some(q) = sess.txn.queue.as_mut() else {
        return Pending::error(Error::proxy("no transaction"));
    };
    match r {
        Ok((queued, slot, keys)) => {
            q.bytes += queued.raw.len();
            if q.bytes as u64 > px.cfg.client.query_buffer_limit {
                q.aborted = true;
                return Pending::error(Error::proxy(
                    "the transaction exceeds client.query_buffer_limit",
                ));
            }
            if info.may_write() {
                q.write_keys.extend(keys);
                q.flush |= matches!(info.name.as_str(), "flushall" | "flushdb");
            }
            q.cmds.push(queued);
            sess.txn.slot = slot;
            Pending::Ready(Value::Simple("QUEUED"))
        }
        Err(e) => {
            q.aborted = true;
            Pending::error(e)
        }
    }
}

/// What would go wrong running this command inside the transaction, or the command as it
/// will be sent (large values already spilled), with the transaction's slot and its keys.
async fn check_and_rewrite(
    px: &Arc<Proxy>,
    sess: &Session,
    info: &Arc<CommandInfo>,
    req: Request,
    cluster: bool,
) -> Result<(Queued, Option<u16>, Vec<Bytes>), Error> {
    if connection_scoped(info) {
        return Err(Error::proxy(format!(
            "'{}' cannot be queued in a transaction through the proxy",
            info.name
        )));
    }
    if cluster && info.policy == Policy::Keyspace {
        return Err(Error::proxy(format!(
            "'{}' spans every node and cannot run inside a transaction on a cluster",
            info.name
        )));
    }
    let key_idx = info.key_indices(&req.args);
    let keys: Vec<Bytes> = key_idx.iter().map(|&i| req.args[i].clone()).collect();
    let slot = join_slot(sess.txn.slot, &keys.iter().collect::<Vec<_>>(), cluster)?;
    let name = info.name.as_str();
    let Some(sp) = px.spill.as_ref() else {
        return Ok((plain(req, false), slot, keys));
    };
    if let Some(args) = spill::guarded_in_transaction(name, &req.args) {
        let queued = Queued {
            raw: command_bytes(&args),
            resolve: false,
            guarded: Some(name.to_ascii_uppercase()),
            strip: None,
        };
        return Ok((queued, slot, keys));
    }
    let resolve = spill::returns_values(name);
    if spill::value_positions(name, req.args.len()).is_empty() {
        return Ok((plain(req, resolve), slot, keys));
    }
    // The values leave for the store now; if the transaction never runs, the objects
    // are unreferenced and the sweeper removes them after its grace period.
    let (req, _objects) = spill::prepare_write(sp, name, req).await?;
    Ok((plain(req, resolve), slot, keys))
}

fn plain(req: Request, resolve: bool) -> Queued {
    Queued {
        raw: req.raw,
        resolve,
        guarded: None,
        strip: None,
    }
}

fn exec(px: &Arc<Proxy>, sess: &mut Session) -> Pending {
    let Some(q) = sess.txn.queue.take() else {
        return Pending::error(Error::redis("ERR EXEC without MULTI"));
    };
    let slot = sess.txn.slot;
    let cell = sess.txn.pin.clone();
    // EXEC ends the transaction and the WATCH, whatever it answers.
    sess.txn.watching = false;
    sess.txn.slot = None;
    if q.aborted {
        take_all(&cell);
        metrics::TX_ABORTED.fetch_add(1, Ordering::Relaxed);
        return Pending::error(Error::redis(EXECABORT));
    }
    let proto = sess.proto;
    let guard = px.l1.as_ref().map(|l1| {
        let g = l1.begin_write(q.write_keys.clone());
        if q.flush {
            l1.flush("FLUSHALL/FLUSHDB in a transaction");
        }
        (l1.clone(), g)
    });
    let flush = q.flush;
    let px2 = px.clone();
    let p = Pending::Deferred(Box::pin(async move {
        let r = run(&px2, &cell, slot, proto, &q).await;
        match &r {
            Ok(b) if b.starts_with(b"*-1") || b.starts_with(b"_") => &metrics::TX_CONFLICT,
            Ok(b) if b.starts_with(b"-EXECABORT") => &metrics::TX_ABORTED,
            Ok(b) if is_error(b) => &metrics::TX_ERROR,
            Ok(_) => &metrics::TX_COMMITTED,
            Err(_) => &metrics::TX_ERROR,
        }
        .fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(raw) => Value::Raw(raw),
            Err(e) => e.to_reply(),
        }
    }));
    match guard {
        Some((l1, g)) => super::cache::after_write(px, &l1, g, flush, p),
        None => p,
    }
}

async fn run(
    px: &Arc<Proxy>,
    cell: &Mutex<WatchSlot>,
    slot: Option<u16>,
    proto: Proto,
    q: &Queue,
) -> Result<Bytes, Error> {
    // Whether keys are WATCHed is what the slot holds: a WATCH that failed watched
    // nothing, one whose connection died cannot be honoured.
    let (pin, lost) = take_all(cell);
    let watching = pin.as_ref().is_some_and(|p| p.watching);
    let mut pin = match pin {
        _ if lost => return Err(Error::proxy(WATCH_LOST)),
        Some(p) if p.watching && !p.is_alive() => return Err(Error::proxy(WATCH_LOST)),
        Some(p) if p.is_alive() => p,
        _ => {
            let node = px
                .upstream
                .resolve_target(&slot.map_or(Target::Any, Target::Slot))?;
            px.upstream.pinned(&node, proto, false).await?
        }
    };
    let mut batch = Vec::with_capacity(q.cmds.len() + 2);
    batch.push(command_bytes(&["MULTI"]));
    batch.extend(q.cmds.iter().map(|c| c.raw.clone()));
    batch.push(command_bytes(&["EXEC"]));
    for attempt in 0..2 {
        let mut replies = pin.pipeline(batch.clone()).await?;
        pin.watching = false;
        let exec = replies.pop().unwrap_or_default();
        // A slot that moved since: nothing ran (EXECABORT). Without a WATCH to keep,
        // the whole transaction can go to the slot's new owner.
        let moved = replies
            .iter()
            .find_map(|r| px.upstream.redirected(r).filter(|(_, ask)| !ask));
        match moved {
            Some((node, _)) if attempt == 0 && !watching => {
                pin = px.upstream.pinned(&node, proto, false).await?;
                continue;
            }
            _ => {}
        }
        if let Some(e) = replies.iter().skip(1).find(|r| is_error(r)) {
            tracing::debug!(error = ?error_text(e), "transaction refused while queueing upstream");
        }
        drop(pin);
        return finish(px, q, exec).await;
    }
    Err(Error::proxy("transaction redirected twice"))
}

/// EXEC's array with spill stubs resolved, guarded refusals explained and a namespace's
/// key names stripped.
async fn finish(px: &Proxy, q: &Queue, exec: Bytes) -> Result<Bytes, Error> {
    let sp = px.spill.as_ref();
    if !q
        .cmds
        .iter()
        .any(|c| (sp.is_some() && (c.resolve || c.guarded.is_some())) || c.strip.is_some())
    {
        return Ok(exec);
    }
    let Some(items) = split_aggregate(&exec).filter(|i| i.len() == q.cmds.len()) else {
        return Ok(exec);
    };
    let mut out = BytesMut::with_capacity(exec.len());
    out.put_slice(format!("*{}\r\n", items.len()).as_bytes());
    for (item, cmd) in items.into_iter().zip(&q.cmds) {
        let item = if let (Some(name), Some(_)) = (&cmd.guarded, sp) {
            if error_text(&item).as_deref() == Some("ERR TIERPROXY_SPILLED") {
                Error::proxy(format!(
                    "{name} on a spilled value cannot run inside MULTI; run it outside the transaction"
                ))
                .to_reply()
                .to_bytes(Proto::Resp2)
            } else {
                item
            }
        } else if let (true, Some(sp)) = (cmd.resolve, sp) {
            match spill::resolve_reply(sp, item).await {
                Ok(b) => b,
                Err(e) => e.to_reply().to_bytes(Proto::Resp2),
            }
        } else {
            item
        };
        let item = match &cmd.strip {
            Some((ns, how)) => {
                super::namespace::strip_raw(ns, super::namespace::event_channel(px), *how, item)
            }
            None => item,
        };
        out.put_slice(&item);
    }
    Ok(out.freeze())
}
