//! Pub/Sub through the proxy.
//!
//! A subscribing client gets subscriber connections of its own (see [`ConnKey`]): one to
//! any master for patterns (Redis Cluster broadcasts PUBLISH to every node, so any node
//! sees every message), one per node for channels (on the owner of the channel's slot,
//! where PUBLISH goes too), one per slot for shard channels (SSUBSCRIBE goes to the
//! owner of the channel's slot), and one per master for keyspace notifications, which a
//! node publishes only to its own subscribers. Each is driven by a task that forwards `message`,
//! `pmessage` and `smessage` frames, exactly as Redis sent them in the client's protocol,
//! into the client's [`Outbox`]; it reconnects and re-subscribes after a lost connection
//! or a failover.
//!
//! The subscription set is the session's, so the counts in the (un)subscribe replies are
//! Redis's even though the subscriptions are spread over several upstream connections.
//! A reply is sent only once the upstream confirmed the subscription: a message
//! published after the client saw its confirmation reaches it.
//!
//! A client that does not read its messages is disconnected once more than
//! `client.pubsub_output_limit` bytes wait for it (Redis's
//! `client-output-buffer-limit pubsub`): the proxy's memory stays bounded.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{namespace, Pending};
use crate::client::session::Session;
use crate::error::Error;
use crate::parse::reply::{as_int, as_str, error_text, frame_len, split_aggregate};
use crate::parse::request::Request;
use crate::respond::{command_bytes, Proto, Value};
use crate::upstream::conn::{dial, handshake};
use crate::upstream::{key_slot, Mode, Target, Upstream};
use crate::{metrics, Proxy};

/// Messages waiting for the client, filled by the subscriber tasks.
pub struct Outbox {
    /// Frames with their sequence numbers, and the next sequence number.
    queue: Mutex<(VecDeque<(u64, Bytes)>, u64)>,
    /// Set by a (un)subscribe reply: only frames numbered below go out before it (those
    /// that Redis sent before its confirmation).
    cutoff: Mutex<Option<u64>>,
    bytes: AtomicUsize,
    limit: usize,
    /// Something was queued.
    pub ready: Notify,
    /// The client is over its limit: close it.
    pub overflow: Notify,
    over: AtomicBool,
}

impl Outbox {
    fn new(limit: u64) -> Outbox {
        Outbox {
            queue: Mutex::new((VecDeque::new(), 0)),
            cutoff: Mutex::new(None),
            bytes: AtomicUsize::new(0),
            limit: limit as usize,
            ready: Notify::new(),
            overflow: Notify::new(),
            over: AtomicBool::new(false),
        }
    }

    /// Queues a frame; false once the client is over its limit (it is being dropped).
    fn push(&self, frame: Bytes) -> bool {
        if self.over.load(Ordering::Acquire) {
            return false;
        }
        let n = self.bytes.fetch_add(frame.len(), Ordering::AcqRel) + frame.len();
        if n > self.limit {
            if !self.over.swap(true, Ordering::AcqRel) {
                metrics::PUBSUB_DROPPED_CLIENTS.fetch_add(1, Ordering::Relaxed);
                // A stored permit: the client loop sees it even if not waiting right now.
                self.overflow.notify_one();
            }
            return false;
        }
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let seq = q.1;
            q.1 += 1;
            q.0.push_back((seq, frame));
        }
        self.ready.notify_one();
        true
    }

    /// The sequence number the next frame will get: every frame queued so far is below.
    fn mark(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    fn set_cutoff(&self, seq: u64) {
        *self.cutoff.lock().unwrap_or_else(|p| p.into_inner()) = Some(seq);
    }

    /// Moves the queued frames into `out`: all of them, or, right before a
    /// (un)subscribe reply, those that came before its confirmation.
    pub fn drain_into(&self, out: &mut BytesMut) {
        let limit = self
            .cutoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(u64::MAX);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while q.0.front().is_some_and(|(seq, _)| *seq < limit) {
            let Some((_, f)) = q.0.pop_front() else { break };
            n += f.len();
            metrics::PUBSUB_MESSAGES_OUT.fetch_add(1, Ordering::Relaxed);
            out.extend_from_slice(&f);
        }
        drop(q);
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Channel,
    Pattern,
    Shard,
}

impl Kind {
    fn of(name: &str) -> Option<(Kind, bool)> {
        Some(match name {
            "subscribe" => (Kind::Channel, true),
            "unsubscribe" => (Kind::Channel, false),
            "psubscribe" => (Kind::Pattern, true),
            "punsubscribe" => (Kind::Pattern, false),
            "ssubscribe" => (Kind::Shard, true),
            "sunsubscribe" => (Kind::Shard, false),
            _ => return None,
        })
    }

    fn reply_name(self, sub: bool) -> &'static str {
        match (self, sub) {
            (Kind::Channel, true) => "subscribe",
            (Kind::Channel, false) => "unsubscribe",
            (Kind::Pattern, true) => "psubscribe",
            (Kind::Pattern, false) => "punsubscribe",
            (Kind::Shard, true) => "ssubscribe",
            (Kind::Shard, false) => "sunsubscribe",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// A session's subscriptions and the connections that carry them.
pub struct PubSub {
    sets: [BTreeSet<Bytes>; 3],
    /// The upstream connections, by what they are for (see [`ConnKey`]).
    conns: HashMap<ConnKey, SubConn>,
    /// Which connections carry each subscription (a keyevent channel: one per master).
    carried_by: HashMap<(Kind, Bytes), Vec<ConnKey>>,
    /// Subscriptions the upstream refused or never confirmed: taken back at the next
    /// command (see [`PubSub::settle`]).
    failed: Arc<Mutex<Vec<(Kind, Bytes)>>>,
    pub out: Arc<Outbox>,
    /// The key namespace the subscriptions live in (fixed while there are any: the
    /// session refuses to switch to a user of another namespace meanwhile), and L1's
    /// invalidation channel, which every namespace shares.
    ns: Option<(Bytes, Bytes)>,
}

/// What an upstream subscriber connection is for, which says where it (re)connects.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum ConnKey {
    /// Patterns: PUBLISH reaches every node in a cluster, so any node hears every message.
    Any,
    /// Channels, on the node that owned their slot at subscription time (PUBLISH goes
    /// there too, see [`publish_target`]); a reconnect finds their slot's owner.
    Node(Arc<str>),
    /// Shard channels of one slot (one SSUBSCRIBE names one slot).
    Slot(u16),
    /// Keyspace notifications, which a cluster node publishes only to its own
    /// subscribers: one connection per master, to the owner of the master's first slot.
    Master(u16),
}

impl ConnKey {
    /// Where the connection goes; `None`: the owner of its first channel's slot.
    fn target(&self) -> Option<Target> {
        match self {
            ConnKey::Any => Some(Target::Any),
            ConnKey::Node(_) => None,
            ConnKey::Slot(s) | ConnKey::Master(s) => Some(Target::Slot(*s)),
        }
    }
}

/// The slot of a channel: a keyspace notification's is its key's (where the key lives is
/// the node that publishes it), any other channel's is its name's.
fn channel_slot(ch: &[u8]) -> u16 {
    match namespace::keyspace_key(ch) {
        Some(key) => key_slot(key),
        None => key_slot(ch),
    }
}

/// Subscriptions that hear keyspace notifications from every node: a keyevent channel
/// (the event of every key), and a pattern over keyspace or keyevent channels. Other
/// patterns stay on one connection, since a PUBLISH reaches every node.
fn on_every_master(kind: Kind, upstream_name: &[u8]) -> bool {
    match kind {
        Kind::Channel => namespace::is_keyevent(upstream_name),
        Kind::Pattern => {
            upstream_name.starts_with(b"__keyspace@") || namespace::is_keyevent(upstream_name)
        }
        Kind::Shard => false,
    }
}

impl PubSub {
    fn new(limit: u64, ns: Option<(Bytes, Bytes)>) -> PubSub {
        PubSub {
            sets: Default::default(),
            conns: HashMap::new(),
            carried_by: HashMap::new(),
            failed: Arc::new(Mutex::new(Vec::new())),
            out: Arc::new(Outbox::new(limit)),
            ns,
        }
    }

    /// Redis's name for the client's channel or pattern `name`.
    fn upstream_name(&self, kind: Kind, name: &Bytes) -> Bytes {
        match &self.ns {
            Some((ns, event)) => namespace::channel_in(ns, event, name, kind == Kind::Pattern),
            None => name.clone(),
        }
    }

    /// The connections that should carry subscription `name` of `kind`.
    fn place(&self, px: &Proxy, kind: Kind, name: &Bytes) -> Vec<ConnKey> {
        let upstream = self.upstream_name(kind, name);
        if on_every_master(kind, &upstream) {
            if let Ok(t) = px.upstream.topology() {
                let masters: Vec<ConnKey> = t
                    .masters_by_first_slot()
                    .into_iter()
                    .map(|(slot, _)| ConnKey::Master(slot))
                    .collect();
                if !masters.is_empty() {
                    return masters;
                }
            }
        }
        vec![match kind {
            Kind::Pattern => ConnKey::Any,
            Kind::Shard => ConnKey::Slot(key_slot(&upstream)),
            Kind::Channel => ConnKey::Node(
                px.upstream
                    .resolve_target(&Target::Slot(channel_slot(&upstream)))
                    .map(|node| node.addr.clone())
                    .unwrap_or_else(|_| Arc::from("?")),
            ),
        }]
    }

    /// Hands a change of subscriptions `names` to the connections that carry them
    /// (starting those that are new, closing those left with nothing): one ack per
    /// connection, with the names it carries.
    fn hand_over(
        &mut self,
        px: &Proxy,
        proto: Proto,
        kind: Kind,
        sub: bool,
        names: Vec<Bytes>,
    ) -> Vec<(Vec<Bytes>, Ack)> {
        let mut by_conn: HashMap<ConnKey, Vec<Bytes>> = HashMap::new();
        for n in names {
            let keys = if sub {
                let keys = self.place(px, kind, &n);
                self.carried_by.insert((kind, n.clone()), keys.clone());
                keys
            } else {
                match self.carried_by.remove(&(kind, n.clone())) {
                    Some(k) => k,
                    None => continue,
                }
            };
            for k in keys {
                by_conn.entry(k).or_default().push(n.clone());
            }
        }
        let mut acks = Vec::new();
        for (key, names) in by_conn {
            let upstream = names.iter().map(|n| self.upstream_name(kind, n)).collect();
            let conn = self.conns.entry(key.clone()).or_insert_with(|| {
                SubConn::spawn(
                    px.upstream.clone(),
                    proto,
                    self.out.clone(),
                    self.ns.clone(),
                    key.target(),
                )
            });
            acks.push((names, conn.change(kind, sub, upstream)));
            if !self.carried_by.values().any(|ks| ks.contains(&key)) {
                // Closing the connection unsubscribes whatever it carried.
                self.conns.remove(&key);
            }
        }
        acks
    }

    /// Redis's count for (un)subscribe replies of this kind.
    fn count(&self, kind: Kind) -> i64 {
        match kind {
            Kind::Shard => self.sets[2].len() as i64,
            _ => (self.sets[0].len() + self.sets[1].len()) as i64,
        }
    }

    /// In subscribed mode (RESP2 restricts commands then).
    pub fn active(&self) -> bool {
        self.sets.iter().any(|s| !s.is_empty())
    }

    /// Takes back subscriptions that failed upstream, so counts and subscribed mode
    /// stay true (and the connections stop retrying them).
    pub fn settle(&mut self) {
        let failed = std::mem::take(&mut *self.failed.lock().unwrap_or_else(|p| p.into_inner()));
        if failed.is_empty() {
            return;
        }
        for (kind, name) in failed {
            if !self.sets[kind.idx()].remove(&name) {
                continue;
            }
            metrics::SUBSCRIPTIONS_NOW.fetch_sub(1, Ordering::Relaxed);
            let keys = self.carried_by.remove(&(kind, name.clone()));
            let upstream = self.upstream_name(kind, &name);
            for k in keys.unwrap_or_default() {
                if let Some(c) = self.conns.get(&k) {
                    drop(c.change(kind, false, vec![upstream.clone()]));
                }
            }
        }
        let carried = &self.carried_by;
        self.conns
            .retain(|k, _| carried.values().any(|ks| ks.contains(k)));
    }
}

impl Drop for PubSub {
    fn drop(&mut self) {
        let n: usize = self.sets.iter().map(|s| s.len()).sum();
        metrics::SUBSCRIPTIONS_NOW.fetch_sub(n as i64, Ordering::Relaxed);
    }
}

/// Subscribed mode in RESP2: what may run (Redis's list).
pub fn allowed_in_resp2_subscribed(name: &[u8]) -> bool {
    matches!(
        name,
        b"subscribe"
            | b"unsubscribe"
            | b"psubscribe"
            | b"punsubscribe"
            | b"ssubscribe"
            | b"sunsubscribe"
            | b"ping"
            | b"quit"
            | b"reset"
    )
}

/// PING in RESP2 subscribed mode: `["pong", message]`.
pub fn subscribed_ping(req: &Request) -> Pending {
    let msg = req.args.get(1).cloned().unwrap_or_default();
    Pending::Ready(Value::Array(vec![
        Value::bulk_str("pong"),
        Value::Bulk(msg),
    ]))
}

fn confirmation(kind: Kind, sub: bool, name: Option<Bytes>, count: i64) -> Value {
    Value::Push(vec![
        Value::bulk_str(kind.reply_name(sub)),
        name.map_or(Value::Null, Value::Bulk),
        Value::Int(count),
    ])
}

/// SUBSCRIBE, UNSUBSCRIBE, PSUBSCRIBE, PUNSUBSCRIBE, SSUBSCRIBE, SUNSUBSCRIBE.
pub fn dispatch(px: &Arc<Proxy>, sess: &mut Session, name: &str, req: Request) -> Pending {
    let Some((kind, sub)) = Kind::of(name) else {
        return Pending::error(Error::proxy(format!("'{name}' is not a subscribe command")));
    };
    let cluster = px.upstream.mode() == Some(Mode::Cluster);
    let names: Vec<Bytes> = req.args[1..].to_vec();
    let limit = px.cfg.client.pubsub_output_limit;
    let ns = sess
        .namespace
        .clone()
        .map(|ns| (ns, Bytes::copy_from_slice(namespace::event_channel(px))));
    let ps = sess
        .pubsub
        .get_or_insert_with(|| Box::new(PubSub::new(limit, ns.clone())));
    if ps.ns != ns && !ps.active() {
        // The user changed since the last subscription: the next ones are in its namespace.
        **ps = PubSub::new(limit, ns);
    }
    // Redis Cluster: one SSUBSCRIBE names channels of one slot (Redis's names: a
    // namespace moves the slot).
    if kind == Kind::Shard && cluster {
        let slots: BTreeSet<u16> = names
            .iter()
            .map(|n| key_slot(&ps.upstream_name(kind, n)))
            .collect();
        if slots.len() > 1 {
            return Pending::error(Error::crossslot());
        }
    }
    let proto = sess.proto;
    let mut replies = Vec::new();
    let mut changed = Vec::new();
    if sub {
        for n in names {
            if ps.sets[kind.idx()].insert(n.clone()) {
                metrics::SUBSCRIPTIONS_NOW.fetch_add(1, Ordering::Relaxed);
                changed.push(n.clone());
            }
            replies.push(confirmation(kind, true, Some(n), ps.count(kind)));
        }
    } else {
        let names = if names.is_empty() {
            ps.sets[kind.idx()].iter().cloned().collect()
        } else {
            names
        };
        if names.is_empty() {
            replies.push(confirmation(kind, false, None, ps.count(kind)));
        }
        for n in names {
            if ps.sets[kind.idx()].remove(&n) {
                metrics::SUBSCRIPTIONS_NOW.fetch_sub(1, Ordering::Relaxed);
                changed.push(n.clone());
            }
            replies.push(confirmation(kind, false, Some(n), ps.count(kind)));
        }
    }
    let mut reply = BytesMut::new();
    for r in &replies {
        r.encode(proto, &mut reply);
    }
    let reply = Value::Raw(reply.freeze());
    if changed.is_empty() {
        return Pending::Ready(reply);
    }

    let acks = ps.hand_over(px, proto, kind, sub, changed);
    let timeout = px.upstream.settings.request_timeout;
    let out = ps.out.clone();
    let failed = ps.failed.clone();
    Pending::Deferred(Box::pin(async move {
        // All confirmations within one deadline; the reply goes out after the messages
        // Redis sent before the first of them.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut cutoff = u64::MAX;
        let mut error = None;
        for (names, ack) in acks {
            let e = match tokio::time::timeout_at(deadline, ack).await {
                Ok(Ok(Ok(seq))) => {
                    cutoff = cutoff.min(seq);
                    continue;
                }
                Ok(Ok(Err(e))) => Error::redis(e),
                Ok(Err(_)) if !sub => continue, // connection closed: unsubscribed anyway
                Ok(Err(_)) => Error::proxy("the subscriber connection was lost"),
                Err(_) => Error::proxy(format!(
                    "the upstream did not confirm the subscription within {} ms",
                    timeout.as_millis()
                )),
            };
            if sub {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(names.into_iter().map(|n| (kind, n)));
            }
            error.get_or_insert(e);
        }
        if let Some(e) = error {
            return e.to_reply();
        }
        if cutoff != u64::MAX {
            out.set_cutoff(cutoff);
        }
        reply
    }))
}

/// A subscriber connection quiet this long is PINGed; quiet as long again, it is
/// replaced.
const KEEPALIVE: Duration = Duration::from_secs(15);

type Ack = oneshot::Receiver<Result<u64, String>>;

enum Change {
    Apply {
        kind: Kind,
        sub: bool,
        names: Vec<Bytes>,
        done: oneshot::Sender<Result<u64, String>>,
    },
}

/// One upstream subscriber connection, driven by its task (aborted on drop, which closes
/// the connection and so ends its subscriptions).
struct SubConn {
    tx: mpsc::UnboundedSender<Change>,
    task: tokio::task::AbortHandle,
}

impl Drop for SubConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SubConn {
    fn spawn(
        up: Arc<Upstream>,
        proto: Proto,
        out: Arc<Outbox>,
        ns: Option<(Bytes, Bytes)>,
        target: Option<Target>,
    ) -> SubConn {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(up, proto, out, ns, target, rx));
        SubConn {
            tx,
            task: task.abort_handle(),
        }
    }

    fn change(&self, kind: Kind, sub: bool, names: Vec<Bytes>) -> Ack {
        let (done, ack) = oneshot::channel();
        let _ = self.tx.send(Change::Apply {
            kind,
            sub,
            names,
            done,
        });
        ack
    }
}

/// Confirmations an upstream command will produce, and who waits for them.
struct Waiting {
    reply: &'static str,
    remaining: usize,
    done: Vec<oneshot::Sender<Result<u64, String>>>,
}

async fn run(
    up: Arc<Upstream>,
    proto: Proto,
    out: Arc<Outbox>,
    ns: Option<(Bytes, Bytes)>,
    pinned: Option<Target>,
    mut rx: mpsc::UnboundedReceiver<Change>,
) {
    let mut sets: [BTreeSet<Bytes>; 3] = Default::default();
    // Changes that came while disconnected wait here (their sets are already updated):
    // they are confirmed with the (re)subscription that follows.
    let mut unsent: Vec<oneshot::Sender<Result<u64, String>>> = Vec::new();
    // The first change says which slot (so which node) this connection is for.
    match rx.recv().await {
        Some(Change::Apply {
            kind,
            sub,
            names,
            done,
        }) => {
            apply(&mut sets, kind, sub, &names);
            unsent.push(done);
        }
        None => return,
    }
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        if !first {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            up.request_refresh();
        }
        // Where it is pinned, or wherever the slot of what it carries lives now.
        let target = match (&pinned, sets[0].iter().next()) {
            (Some(t), _) => t.clone(),
            (None, Some(ch)) => Target::Slot(channel_slot(ch)),
            (None, None) => Target::Any,
        };
        let session = async {
            let node = up.resolve_target(&target).map_err(|e| e.to_string())?;
            let s = &up.settings;
            let (mut rd, mut wr) = dial(&node.addr, s.connect_timeout, &s.handshake)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            tokio::time::timeout(
                s.connect_timeout,
                handshake(&mut rd, &mut wr, &mut buf, proto, &s.handshake, Vec::new()),
            )
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((rd, wr, buf, node.addr.clone()))
        };
        let (mut rd, mut wr, mut buf, addr) = match session.await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "subscriber connection failed");
                first = false;
                // Keep taking changes so their sets stay right for the next attempt.
                while let Ok(c) = rx.try_recv() {
                    let Change::Apply {
                        kind,
                        sub,
                        names,
                        done,
                    } = c;
                    apply(&mut sets, kind, sub, &names);
                    unsent.push(done);
                }
                if rx.is_closed() && sets.iter().all(|s| s.is_empty()) {
                    return;
                }
                continue;
            }
        };
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        // (Re-)subscribe everything this connection carries.
        let mut hello = BytesMut::new();
        for kind in [Kind::Channel, Kind::Pattern, Kind::Shard] {
            let set = &sets[kind.idx()];
            if set.is_empty() {
                continue;
            }
            let mut args: Vec<Bytes> = vec![Bytes::from_static(cmd_name(kind, true))];
            args.extend(set.iter().cloned());
            hello.extend_from_slice(&command_bytes(&args));
            waiting.push_back(Waiting {
                reply: kind.reply_name(true),
                remaining: set.len(),
                done: Vec::new(),
            });
        }
        match waiting.back_mut() {
            Some(last) => last.done.append(&mut unsent),
            None => {
                for done in unsent.drain(..) {
                    let _ = done.send(Ok(out.mark()));
                }
            }
        }
        if !first && !hello.is_empty() {
            metrics::PUBSUB_RESUBSCRIBED.fetch_add(1, Ordering::Relaxed);
            tracing::info!(upstream = %addr, "re-subscribing after a lost subscriber connection");
        }
        first = false;
        if !hello.is_empty() && wr.write_all(&hello).await.is_err() {
            continue;
        }
        backoff = Duration::from_millis(50);
        // Serve until the connection fails (then reconnect) or the session goes.
        // A node that vanished without closing the connection (power loss, partition)
        // would leave the subscription silently dead: PING it when it is quiet.
        let mut quiet = tokio::time::interval(KEEPALIVE);
        quiet.reset();
        let mut pinged = false;
        let lost = loop {
            // Every complete frame first.
            let mut resubscribe = false;
            loop {
                let n = match frame_len(&buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(_) => {
                        resubscribe = true;
                        break;
                    }
                };
                let frame = buf.split_to(n).freeze();
                pinged = false;
                quiet.reset();
                match on_frame(&up, &frame, &mut waiting, &out, ns.as_ref()) {
                    Frame::Ok => {}
                    Frame::Unsolicited => {
                        // The node gave up a shard channel (its slot moved): subscribe
                        // again wherever it lives now.
                        resubscribe = true;
                    }
                    Frame::Overflow => return,
                }
            }
            if resubscribe {
                break true;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                },
                c = rx.recv() => match c {
                    None => return,
                    Some(Change::Apply { kind, sub, names, done }) => {
                        let names: Vec<Bytes> = apply(&mut sets, kind, sub, &names);
                        if names.is_empty() {
                            let _ = done.send(Ok(out.mark()));
                            continue;
                        }
                        let mut args: Vec<Bytes> = vec![Bytes::from_static(cmd_name(kind, sub))];
                        args.extend(names.iter().cloned());
                        waiting.push_back(Waiting {
                            reply: kind.reply_name(sub),
                            remaining: names.len(),
                            done: vec![done],
                        });
                        if wr.write_all(&command_bytes(&args)).await.is_err() {
                            break true;
                        }
                    }
                },
                _ = quiet.tick() => {
                    if pinged {
                        tracing::warn!(upstream = %addr, "subscriber connection stopped answering");
                        break true;
                    }
                    pinged = true;
                    if wr.write_all(&command_bytes(&["PING"])).await.is_err() {
                        break true;
                    }
                }
            }
        };
        if lost {
            tracing::debug!(upstream = %addr, "subscriber connection lost");
            // Whoever waited gets the resubscription's confirmation instead.
            for w in waiting.drain(..) {
                unsent.extend(w.done);
            }
            if sets.iter().all(|s| s.is_empty()) {
                for d in unsent.drain(..) {
                    let _ = d.send(Ok(out.mark()));
                }
                if rx.is_closed() {
                    return;
                }
            }
        }
    }
}

fn cmd_name(kind: Kind, sub: bool) -> &'static [u8] {
    match (kind, sub) {
        (Kind::Channel, true) => b"SUBSCRIBE",
        (Kind::Channel, false) => b"UNSUBSCRIBE",
        (Kind::Pattern, true) => b"PSUBSCRIBE",
        (Kind::Pattern, false) => b"PUNSUBSCRIBE",
        (Kind::Shard, true) => b"SSUBSCRIBE",
        (Kind::Shard, false) => b"SUNSUBSCRIBE",
    }
}

/// Updates the connection's own set; the names that really changed it.
fn apply(sets: &mut [BTreeSet<Bytes>; 3], kind: Kind, sub: bool, names: &[Bytes]) -> Vec<Bytes> {
    let set = &mut sets[kind.idx()];
    names
        .iter()
        .filter(|n| {
            if sub {
                set.insert((*n).clone())
            } else {
                set.remove(*n)
            }
        })
        .cloned()
        .collect()
}

enum Frame {
    Ok,
    Unsolicited,
    Overflow,
}

fn on_frame(
    up: &Upstream,
    frame: &Bytes,
    waiting: &mut VecDeque<Waiting>,
    out: &Outbox,
    ns: Option<&(Bytes, Bytes)>,
) -> Frame {
    if error_text(frame).is_some_and(|e| e.starts_with("MOVED ")) {
        // Our slot map was stale: learn the new owner and reconnect there (whoever
        // waits is confirmed by the resubscription).
        up.redirected(frame);
        return Frame::Unsolicited;
    }
    if let Some(e) = error_text(frame) {
        // A refused (un)subscribe: its waiter learns why.
        if let Some(w) = waiting.pop_front() {
            for d in w.done {
                let _ = d.send(Err(e.clone()));
            }
        }
        return Frame::Ok;
    }
    let Some(items) = split_aggregate(frame) else {
        return Frame::Ok;
    };
    let kind = items.first().and_then(|k| as_str(k)).unwrap_or_default();
    match kind {
        b"message" | b"pmessage" | b"smessage" => {
            let frame = match ns {
                // The client's names; a keyevent about another namespace's key is not
                // for this client.
                Some((ns, event)) => match namespace::message_out(ns, event, frame) {
                    Some(f) => f,
                    None => return Frame::Ok,
                },
                None => frame.clone(),
            };
            if out.push(frame) {
                Frame::Ok
            } else {
                Frame::Overflow
            }
        }
        b"subscribe" | b"unsubscribe" | b"psubscribe" | b"punsubscribe" | b"ssubscribe"
        | b"sunsubscribe" => {
            let expected = waiting.front().is_some_and(|w| w.reply.as_bytes() == kind);
            if !expected {
                return if kind == b"sunsubscribe" {
                    Frame::Unsolicited
                } else {
                    Frame::Ok
                };
            }
            if let Some(w) = waiting.front_mut() {
                w.remaining = w.remaining.saturating_sub(1);
                if w.remaining == 0 {
                    for d in waiting.pop_front().map(|w| w.done).unwrap_or_default() {
                        let _ = d.send(Ok(out.mark()));
                    }
                }
            }
            Frame::Ok
        }
        _ => Frame::Ok,
    }
}

/// PUBLISH goes to the owner of the channel's slot, where this proxy's subscribers to
/// it are: the message reaches every node anyway, and the count covers them.
pub fn publish_target(args: &[Bytes]) -> Target {
    args.get(1)
        .map_or(Target::Any, |ch| Target::Slot(channel_slot(ch)))
}

/// PUBSUB CHANNELS / NUMSUB / NUMPAT / SHARDCHANNELS / SHARDNUMSUB over every master.
pub fn info(px: &Arc<Proxy>, sess: &Session, name: &str, req: Request) -> Pending {
    let px = px.clone();
    let proto = sess.proto;
    let hint = sess.hint();
    let name = name.to_string();
    Pending::Deferred(Box::pin(async move {
        let r = async {
            if name == "pubsub|help" {
                return px
                    .upstream
                    .call(Target::Any, req.raw.clone(), proto, hint)
                    .await
                    .map(Value::Raw);
            }
            let replies = px
                .upstream
                .on_every_master(req.raw.clone(), proto, hint)
                .await?;
            let bad = || Error::proxy(format!("unexpected {name} reply"));
            match name.as_str() {
                "pubsub|numpat" => {
                    let mut sum = 0;
                    for r in &replies {
                        sum += as_int(r).ok_or_else(bad)?;
                    }
                    Ok(Value::Int(sum))
                }
                "pubsub|channels" | "pubsub|shardchannels" => {
                    let mut all = BTreeSet::new();
                    for r in &replies {
                        for item in split_aggregate(r).ok_or_else(bad)? {
                            all.insert(Bytes::copy_from_slice(as_str(&item).ok_or_else(bad)?));
                        }
                    }
                    Ok(Value::Array(all.into_iter().map(Value::Bulk).collect()))
                }
                _ => {
                    // NUMSUB / SHARDNUMSUB: channel, count pairs in request order, summed.
                    let channels = &req.args[2..];
                    let mut counts = vec![0i64; channels.len()];
                    for r in &replies {
                        let items = split_aggregate(r).ok_or_else(bad)?;
                        for (i, pair) in items.chunks(2).enumerate() {
                            if let (Some(c), [_, n]) = (counts.get_mut(i), pair) {
                                *c += as_int(n).ok_or_else(bad)?;
                            }
                        }
                    }
                    // A flat array in both protocols, as Redis answers.
                    Ok(Value::Array(
                        channels
                            .iter()
                            .zip(counts)
                            .flat_map(|(c, n)| [Value::Bulk(c.clone()), Value::Int(n)])
                            .collect(),
                    ))
                }
            }
        }
        .await;
        r.unwrap_or_else(|e: Error| e.to_reply())
    }))
}
