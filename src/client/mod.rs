//! Client connections: the accept loop (maxclients), and each connection's loop:
//! read a batch → parse → dispatch every command (queued upstream at once) → resolve the
//! replies in order → one write. A bad frame closes only its own connection.

pub mod auth;
pub mod session;
pub mod tls;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::metrics::{CmdStat, Level, Outcome};
use crate::parse::request::{parse_batch, Limits, ParseState};
use crate::respond::Value;
use crate::route::cache::LaneRead;
use crate::route::{self, Pending};
use crate::Proxy;
use session::{ReplyMode, Session};

const READ_CHUNK: usize = 16 * 1024;
/// First reads are small: most connections send short commands, and an idle one keeps
/// its read buffer. A read that fills the buffer switches to `READ_CHUNK`.
const SMALL_READ: usize = 1024;
/// A reply buffer larger than this is given back after it is written.
const KEEP_OUT: usize = 64 * 1024;
/// Replies this large are written from their own buffer, not copied into the output.
const LARGE_REPLY: usize = 64 * 1024;

/// Accepts until `shutdown` flips, then returns (open connections finish on their own).
pub async fn accept_loop(
    px: Arc<Proxy>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(px.cfg.client.maxclients));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (sock, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        px.stats.connections.fetch_add(1, Ordering::Relaxed);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let px = px.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    px.active.fetch_add(1, Ordering::AcqRel);
                    // Released however the task ends (even by a panic).
                    let _active = Release(&px);
                    if let Err(e) = serve(&px, sock, addr, shutdown).await {
                        tracing::debug!(client = %addr, error = %e, "client connection ended");
                    }
                });
            }
            Err(_) => {
                px.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut sock = sock;
                    let _ = sock
                        .write_all(b"-ERR max number of clients reached\r\n")
                        .await;
                    let _ = sock.shutdown().await;
                });
            }
        }
    }
}

async fn serve(
    px: &Arc<Proxy>,
    sock: TcpStream,
    addr: std::net::SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let laddr = sock.local_addr()?;
    let _ = sock.set_nodelay(true);
    crate::net::set_keepalive(&sock, px.cfg.client.tcp_keepalive_secs);
    match &px.front_tls {
        Some(tls) => {
            let stream = match tls.accept(sock).await {
                Ok(s) => s,
                Err(e) => {
                    crate::metrics::TLS_HANDSHAKES_FAILED.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %addr, error = %e, "TLS handshake failed");
                    return Ok(());
                }
            };
            let (rd, wr) = tokio::io::split(stream);
            // Boxed: one allocation per connection keeps the spawned future's type shallow.
            Box::pin(serve_io(px, rd, wr, addr, laddr, shutdown)).await
        }
        None => {
            let (rd, wr) = sock.into_split();
            Box::pin(serve_io(px, rd, wr, addr, laddr, shutdown)).await
        }
    }
}

async fn serve_io<R, W>(
    px: &Arc<Proxy>,
    rd: R,
    wr: W,
    addr: std::net::SocketAddr,
    laddr: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let entry = px.clients.register(addr, laddr, px.started);
    let id = entry.id;
    let mut sess = Session::new(entry, px.auth.required());
    sess.namespace = session::namespace(&px.cfg.namespace);
    // CLIENT LIST forgets the connection however this task ends.
    struct Unregister<'a>(&'a Proxy, u64);
    impl Drop for Unregister<'_> {
        fn drop(&mut self) {
            self.0.clients.remove(self.1);
        }
    }
    let _unregister = Unregister(px, id);
    crate::metrics::with_reply_level(conn_loop(px, rd, wr, &mut sess, &mut shutdown)).await
}

/// A dispatched command waiting for its reply to be resolved and written.
struct Queued {
    p: Pending,
    proto: crate::respond::Proto,
    /// CLIENT REPLY OFF/SKIP: resolved but not written.
    silent: bool,
    stat: Option<&'static CmdStat>,
    level: Level,
    /// Refused by the proxy before it reached Redis (INFO commandstats rejected_calls).
    rejected: bool,
    started: Instant,
    /// The request, kept only while the slow log is on, for its entry.
    raw: Option<bytes::Bytes>,
    /// An L1 miss the fast lane forwarded as it is: its reply counts as an L2 hit or
    /// miss (the ordinary path counts its own).
    l1_miss: bool,
    /// A fast-lane write's keys, marked as being written (L1 on): released once its
    /// reply is in, before the client can see it.
    guard: Option<crate::l1::WriteGuard>,
    /// Counted in `tierproxy_inflight_requests` until the entry is dropped.
    _inflight: InFlight,
}

/// A command counted in `tierproxy_inflight_requests` from its dispatch until its queue
/// entry is dropped: answered, abandoned with its client, dropped with a connection the
/// shutdown timed out, or unwound by a panic. Counting down by hand on each way out
/// missed the last two.
struct InFlight(());

impl InFlight {
    fn one() -> InFlight {
        crate::metrics::INFLIGHT_NOW.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }

    /// `n` commands dispatched: one token each, counted with one atomic add.
    fn start(n: usize) -> InFlights {
        crate::metrics::INFLIGHT_NOW.fetch_add(n as i64, Ordering::Relaxed);
        InFlights(n)
    }
}

/// Tokens counted and not handed out yet: counted down if dropped before they are.
struct InFlights(usize);

impl Iterator for InFlights {
    type Item = InFlight;

    fn next(&mut self) -> Option<InFlight> {
        (self.0 > 0).then(|| {
            self.0 -= 1;
            InFlight(())
        })
    }
}

impl Drop for InFlights {
    fn drop(&mut self) {
        if self.0 > 0 {
            crate::metrics::INFLIGHT_NOW.fetch_sub(self.0 as i64, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::INFLIGHT_NOW.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a reply that was resolved: commandstats, the duration histogram, the slow log.
fn account(px: &Proxy, q: &Queued, v: &Value, sess: &Session, blocking: bool, now: Instant) {
    let error = match v {
        Value::Error(e) => Some(e.as_bytes()),
        Value::Raw(b) if crate::parse::reply::is_error(b) => Some(&b[1..]),
        _ => None,
    };
    if let Some(e) = error {
        px.stats.errors.fetch_add(1, Ordering::Relaxed);
        crate::metrics::count_error(e);
    }
    if let (true, Some(l1), Value::Raw(reply)) = (q.l1_miss, &px.l1, v) {
        route::cache::count_l2(l1, reply);
    }
    let micros = now.saturating_duration_since(q.started).as_micros() as u64;
    let level = if crate::metrics::take_store_read() {
        Level::L3
    } else {
        q.level
    };
    if let Some(stat) = q.stat {
        let outcome = match (q.rejected, error.is_some()) {
            (true, _) => Outcome::Rejected,
            (false, true) => Outcome::Failed,
            (false, false) => Outcome::Ok,
        };
        stat.record(level, micros, outcome);
    }
    // As in Redis, time spent blocked (BLPOP, WAIT, …) and refused commands are not
    // slow-log material.
    if let (Some(raw), false, false) = (&q.raw, blocking, q.rejected) {
        if px.slowlog.is_slow(micros) {
            let args = crate::parse::request::args_of(raw);
            px.slowlog.record(
                micros,
                &args,
                sess.entry.addr.to_string(),
                sess.name.clone().unwrap_or_default(),
            );
        }
    }
}

/// Counts a served connection out of `Proxy::active` when dropped.
struct Release<'a>(&'a Proxy);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's socket halves and buffers.
struct Io<R, W> {
    rd: R,
    wr: W,
    inbuf: BytesMut,
    out: BytesMut,
    pending: Vec<Queued>,
    /// `drain`'s list of forwarded groups, kept for the next batch (emptied).
    groups: Vec<Group>,
    /// The fast lane's L1 replies written out, kept for the next run (emptied): two
    /// lists grown per batch were a tenth of a hit's instructions at depth 1 (callgrind).
    written: WrittenHits,
    /// `client.output_stall_timeout_secs`.
    stall: Option<Duration>,
}

async fn conn_loop<R, W>(
    px: &Arc<Proxy>,
    rd: R,
    wr: W,
    sess: &mut Session,
    shutdown: &mut watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let cfg = &px.cfg.client;
    let idle = (cfg.idle_timeout_secs > 0).then(|| Duration::from_secs(cfg.idle_timeout_secs));
    // Allocated on first use: an idle connection holds no buffers beyond the first read's.
    let mut io = Io {
        rd,
        wr,
        inbuf: BytesMut::new(),
        out: BytesMut::new(),
        pending: Vec::new(),
        groups: Vec::new(),
        written: WrittenHits::default(),
        stall: (cfg.output_stall_timeout_secs > 0)
            .then(|| Duration::from_secs(cfg.output_stall_timeout_secs)),
    };
    let mut reqs = Vec::new();
    let mut parse_state = ParseState::default();
    let mut big_reads = false;
    if *shutdown.borrow() {
        return Ok(());
    }
    // Registered once for the connection's life: a fresh `changed()` for every wait for
    // input cost more than the read itself at pipeline depth 1 (callgrind). Once its
    // first poll has put this task on the signal's waiter list, a wait checks the
    // signal's version (one atomic load) instead of polling it again, which takes the
    // waiter list's lock each time.
    // Unconstrained: that one poll must register, whatever the task's budget.
    let mut signal = shutdown.clone();
    let stopping = tokio::task::unconstrained(signal.changed());
    tokio::pin!(stopping);
    let mut armed = false;
    // When the last read completed: the start of the batch it brought in.
    let mut read_at: Option<Instant> = None;
    loop {
        let limits = Limits {
            proto_max_bulk_len: cfg.proto_max_bulk_len as i64,
            unauthenticated: !sess.authenticated,
        };
        let unparsed = io.inbuf.len();
        let parse_err = parse_batch(
            &mut io.inbuf,
            limits,
            cfg.max_inflight,
            &mut reqs,
            &mut parse_state,
        )
        .err();
        if reqs.is_empty() && parse_err.is_none() {
            // Only empty frames (`*0`, blank lines) were consumed: what follows them may
            // be complete already, so parse again before waiting for input.
            if io.inbuf.len() < unparsed {
                continue;
            }
            if io.inbuf.len() as u64 > cfg.query_buffer_limit {
                tracing::warn!(client = %sess.entry.addr, "closing client that reached max query buffer length");
                return Ok(());
            }
            let chunk = if big_reads { READ_CHUNK } else { SMALL_READ };
            if io.inbuf.capacity() - io.inbuf.len() < chunk / 2 {
                io.inbuf.reserve(chunk);
            }
            let (rd, inbuf) = (&mut io.rd, &mut io.inbuf);
            let read = async {
                match idle {
                    Some(d) => tokio::time::timeout(d, rd.read_buf(inbuf)).await.ok(),
                    None => Some(rd.read_buf(inbuf).await),
                }
            };
            // A subscriber also waits for messages (and is dropped past its limit).
            let outbox = sess.pubsub.as_ref().map(|p| p.out.clone());
            let message = async {
                match &outbox {
                    Some(o) => o.ready.notified().await,
                    None => std::future::pending().await,
                }
            };
            let overflow = async {
                match &outbox {
                    Some(o) => o.overflow.notified().await,
                    None => std::future::pending().await,
                }
            };
            let stop = std::future::poll_fn(|cx| {
                if !std::mem::replace(&mut armed, true) && stopping.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                match shutdown.has_changed() {
                    Ok(false) => Poll::Pending,
                    _ => Poll::Ready(()),
                }
            });
            // The signal first: checking it is one load, and a client that always has
            // input ready must not keep a shutdown waiting.
            tokio::select! {
                biased;
                _ = stop => return Ok(()),
                r = read => match r {
                    None => return Ok(()), // idle timeout, closed silently as Redis does
                    Some(Ok(0)) => return Ok(()),
                    Some(Ok(_)) => big_reads = io.inbuf.len() == io.inbuf.capacity(),
                    Some(Err(e)) => return Err(e),
                },
                _ = message => {
                    if let Some(o) = &outbox {
                        o.drain_into(&mut io.out);
                        write_out(&mut io.wr, &mut io.out, Some(o), io.stall).await?;
                    }
                    continue;
                }
                _ = overflow => {
                    tracing::warn!(client = %sess.entry.addr, "closing subscriber over client.pubsub_output_limit");
                    return Ok(());
                }
            }
            let now = Instant::now();
            read_at = Some(now);
            sess.entry.last_active_ms.store(
                now.duration_since(px.started).as_millis() as u64,
                Ordering::Relaxed,
            );
            continue;
        }

        // Run in place: the batch's future is under 3 KiB (commands that need large
        // futures box their own), which every connection carries while idle; boxing it
        // instead cost an allocation of that size per batch, a tenth of the proxy's
        // instructions at pipeline depth 1 (callgrind).
        let started = read_at.take().unwrap_or_else(Instant::now);
        if !run_batch(px, sess, &mut reqs, parse_err, &mut io, started).await? {
            return Ok(());
        }
    }
}

/// Dispatches a batch of parsed requests, resolves their replies in order and writes
/// them (with the protocol error that ended the batch, if any). False: close the
/// connection.
async fn run_batch<R, W>(
    px: &Arc<Proxy>,
    sess: &mut Session,
    reqs: &mut Vec<crate::parse::request::Request>,
    parse_err: Option<crate::error::ProtocolError>,
    io: &mut Io<R, W>,
    mut started: Instant,
) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    // While replies are awaited the client socket is still watched: input is buffered
    // for the next batch, and a client that went away abandons a blocking command
    // instead of pinning its upstream connection until the command times out.
    let mut client_gone = false;
    // One clock read per batch (when its input was read), and again after each barrier:
    // a command's time starts at the later of this and the previous reply's resolution
    // (see `drain`).
    // One table for the batch's fast lane (see `forward_group`).
    let table = px.upstream.table();
    let mut reqs = reqs.drain(..).peekable();
    loop {
        if let Some(table) = &table {
            forward_group(px, sess, table, &mut reqs, io, started).await;
        }
        let Some(req) = reqs.next() else { break };
        let is_client_reply = req.args.len() == 3
            && req.args[0].eq_ignore_ascii_case(b"client")
            && req.args[1].eq_ignore_ascii_case(b"reply");
        let before = sess.reply_mode;
        let raw = px.slowlog.enabled().then(|| req.raw.clone());
        let p = route::dispatch(px, sess, req).await;
        sess.l1_missed = None;
        let inflight = InFlight::one();
        let silent = if is_client_reply {
            sess.reply_mode != ReplyMode::On
        } else {
            if before == ReplyMode::Skip {
                sess.reply_mode = ReplyMode::On;
            }
            before != ReplyMode::On
        };
        // A deferred command reaches the upstream only when awaited: resolve it (and
        // everything before it) before the next command is dispatched, so that no
        // later command of the pipeline overtakes it.
        let barrier = p.is_deferred();
        // Refused before reaching Redis: an immediate error from the proxy's own
        // checks (arity, NOAUTH, CROSSSLOT, …), not from a command it answers itself.
        let rejected =
            sess.level != Level::Local && matches!(&p, Pending::Ready(v) if is_error_reply(v));
        io.pending.push(Queued {
            p,
            proto: sess.proto,
            silent,
            stat: sess.cmd_stat.take(),
            level: sess.level,
            rejected,
            started,
            raw,
            l1_miss: false,
            guard: None,
            _inflight: inflight,
        });
        if barrier {
            if !drain(px, io, &mut client_gone, sess).await? {
                return Ok(false);
            }
            started = Instant::now();
        }
        if sess.closing {
            break;
        }
    }
    if !drain(px, io, &mut client_gone, sess).await? {
        return Ok(false);
    }
    if let Some(e) = &parse_err {
        px.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(client = %sess.entry.addr, error = %e, "protocol error; closing client");
        e.to_reply().encode(sess.proto, &mut io.out);
    }
    if !io.out.is_empty() {
        let outbox = sess.pubsub.as_ref().map(|p| &*p.out);
        if outbox.is_some_and(|o| o.is_over()) {
            return Ok(false);
        }
        write_out(&mut io.wr, &mut io.out, outbox, io.stall).await?;
    }
    if sess.closing || parse_err.is_some() || client_gone {
        let _ = io.wr.shutdown().await;
        return Ok(false);
    }
    Ok(true)
}

/// Takes the run of fast-lane commands ([`route::plan_forward`]) at the front of `reqs`:
/// - forwarded ones go as one group per node: one queue entry and one reply hand-over
///   per node instead of per command. Each still gets its own place in `io.pending`, so
///   replies, counters and the slow log are per command as on the ordinary path;
///   commands for one node keep their order on its connection, as they do there.
/// - reads that L1 answers are answered here: written straight to the output while
///   nothing before them is pending (nothing to queue, no reference to the cached reply
///   taken), queued behind the pending ones otherwise. A miss whose key is not admitted
///   or is being written is forwarded with the others; a miss to fill ends the run (the
///   ordinary path reads, merges and fills).
/// - with L1 on, a write marks its keys as being written before it is sent, until its
///   reply is in (`Queued::guard`), as the ordinary path's `cache::after_write` does.
async fn forward_group<R, W, I>(
    px: &Arc<Proxy>,
    sess: &mut Session,
    table: &crate::parse::table::CommandTable,
    reqs: &mut std::iter::Peekable<I>,
    io: &mut Io<R, W>,
    started: Instant,
) where
    I: Iterator<Item = crate::parse::request::Request>,
{
    // Requests are copied into their group: large ones go on their own, uncopied.
    const LARGE: usize = 16 * 1024;
    const GROUP_BYTES: usize = 256 * 1024;
    let plan_next = |reqs: &mut std::iter::Peekable<I>, sess: &Session| {
        reqs.peek()
            .filter(|r| r.raw.len() <= LARGE)
            .and_then(|r| route::plan_forward(px, sess, table, r))
    };
    let mut next = plan_next(reqs, sess);
    if next.is_none() {
        return;
    }
    let Ok(topo) = px.upstream.topology() else {
        return;
    };
    let node_of = |t: &crate::upstream::Target| match t {
        crate::upstream::Target::Slot(s) => topo.owner(*s).map(|n| Arc::as_ptr(n) as usize),
        _ => None,
    };
    /// The commands of the run for one node.
    struct ForNode {
        node: usize,
        target: crate::upstream::Target,
        /// The first request as the client sent it: a group of one goes upstream
        /// uncopied. A second one starts `data`, with the first copied in.
        first: bytes::Bytes,
        data: BytesMut,
        count: u32,
    }
    impl ForNode {
        fn len(&self) -> usize {
            self.first.len().max(self.data.len())
        }

        fn add(&mut self, raw: &bytes::Bytes, remaining: usize) {
            match self.count {
                0 => self.first = raw.clone(),
                1 => {
                    // Room for the batch's remaining requests of this size: one
                    // allocation for the usual run; past 16 KiB it grows as it fills.
                    let room = (self.first.len() + raw.len() * remaining).min(16 * 1024);
                    self.data = BytesMut::with_capacity(room);
                    self.data.extend_from_slice(&self.first);
                    self.data.extend_from_slice(raw);
                }
                _ => self.data.extend_from_slice(raw),
            }
            self.count += 1;
        }

        /// Where the group goes, its bytes, and how many requests they are.
        fn take(self) -> (crate::upstream::Target, bytes::Bytes, u32) {
            let data = match self.count {
                1 => self.first,
                _ => self.data.freeze(),
            };
            (self.target, data, self.count)
        }
    }
    /// A command of the run still to be queued.
    enum Planned {
        /// For the node group of this index.
        Node {
            group: usize,
            target: crate::upstream::Target,
            values: bool,
            /// An L1 miss forwarded as it is: its reply counts as an L2 hit or miss.
            l1_miss: bool,
            /// A write's keys, marked until its reply is in.
            guard: Option<crate::l1::WriteGuard>,
        },
        /// L1's reply, behind pending ones.
        Hit(bytes::Bytes),
    }
    // Sized for the rest of the batch (up to a point) once the run has a member: growing
    // them one doubling at a time cost more than the run's parsing (callgrind).
    let remaining = reqs.size_hint().0.min(64);
    let mut nodes: Vec<ForNode> = Vec::new();
    let mut planned = Vec::new();
    let slowlog = px.slowlog.enabled();
    let out_limit = px.cfg.client.output_buffer_limit as usize;
    // Replies written straight to the output: counted per command once the run is done.
    let mut written = std::mem::take(&mut io.written);
    let mut queued_hits = 0;
    // L1's expiry checks: commands before this run may have waited (a spill store
    // write, a connect), so the batch's start is not now. The loop does not wait.
    let now = Instant::now();
    let mut last_info = None;
    while let Some(plan) = next.take() {
        let mut target = plan.target;
        let mut l1_miss = false;
        if plan.cached {
            let (Some(l1), Some(req)) = (&px.l1, reqs.peek()) else {
                break;
            };
            let direct = io.pending.is_empty() && planned.is_empty() && io.out.len() < out_limit;
            let out = &mut io.out;
            // Written out now (`None`), or a reference to queue.
            let read = if direct {
                route::cache::lane_read(px, sess, l1, plan.info, req, now, |r| {
                    if r.len() >= LARGE_REPLY {
                        // Queued, to be written from where it lies (see `drain`).
                        return Some(r.clone());
                    }
                    out.extend_from_slice(r);
                    None
                })
            } else {
                route::cache::lane_read(px, sess, l1, plan.info, req, now, |r| Some(r.clone()))
            };
            match read {
                LaneRead::Hit(served) => {
                    let Some(req) = reqs.next() else { break };
                    match served {
                        None => written.add(plan.info.stat, slowlog.then_some(req.raw)),
                        Some(reply) => {
                            queued_hits += 1;
                            planned.push((plan.info, req, Planned::Hit(reply)));
                        }
                    }
                    last_info = Some(plan.info);
                    next = plan_next(reqs, sess);
                    continue;
                }
                // Forwarded with the run's other commands for its node.
                LaneRead::Forward(t) => {
                    target = t;
                    l1_miss = true;
                }
                // The ordinary path takes the miss (fill) without a second lookup.
                LaneRead::Ordinary { missed } => {
                    sess.l1_missed = missed.then_some(true);
                    break;
                }
            }
        }
        let at = node_of(&target);
        let g = at.and_then(|at| nodes.iter().position(|n| n.node == at));
        let (Some(at), false) = (at, g.is_some_and(|g| nodes[g].len() >= GROUP_BYTES)) else {
            if l1_miss {
                // Looked up, counted, and not to be filled: the ordinary path reads it
                // as it is.
                sess.l1_missed = Some(false);
            }
            break;
        };
        let Some(req) = reqs.next() else { break };
        let g = match g {
            Some(g) => g,
            None => {
                if nodes.is_empty() {
                    nodes.reserve(4);
                    planned.reserve(remaining);
                }
                nodes.push(ForNode {
                    node: at,
                    target: target.clone(),
                    first: bytes::Bytes::new(),
                    data: BytesMut::new(),
                    count: 0,
                });
                nodes.len() - 1
            }
        };
        // Marked from before it is sent until its reply is in (dropped in `drain`).
        let guard = match (&px.l1, plan.writes) {
            (Some(l1), true) => {
                let keys = plan.info.key_indices(&req.args);
                Some(l1.begin_write(keys.into_iter().map(|i| req.args[i].clone()).collect()))
            }
            _ => None,
        };
        nodes[g].add(&req.raw, remaining);
        last_info = Some(plan.info);
        planned.push((
            plan.info,
            req,
            Planned::Node {
                group: g,
                target,
                values: plan.values,
                l1_miss,
                guard,
            },
        ));
        next = plan_next(reqs, sess);
    }
    let Some(last) = last_info else {
        io.written = written;
        return;
    };
    let hits = written.count + queued_hits;
    if hits > 0 {
        if let Some(l1) = &px.l1 {
            l1.stats.hits.fetch_add(hits, Ordering::Relaxed);
        }
    }
    px.stats
        .commands
        .fetch_add(written.count + planned.len() as u64, Ordering::Relaxed);
    // CLIENT LIST's cmd= field: the run's last command.
    if !sess.last_cmd.as_ref().is_some_and(|c| Arc::ptr_eq(c, last)) {
        sess.update_meta(|m| m.last_cmd = last.name.clone());
        sess.last_cmd = Some(last.clone());
    }
    written.account(px, sess, started);
    io.written = written;
    if planned.is_empty() {
        return;
    }
    let proto = sess.proto;
    let hint = sess.hint();
    // Without a connection ready (not yet connected, a failover) a node's commands start
    // one by one, as the ordinary path would start them.
    // Per node: `Some(Some(ticket))` until its first member takes it, `Some(None)` after;
    // `None`: not grouped.
    let mut tickets: Vec<Option<Option<crate::upstream::GroupTicket>>> = nodes
        .into_iter()
        .map(|n| {
            let (target, data, count) = n.take();
            px.upstream
                .try_start_group(&target, data, count, proto, hint)
                .map(Some)
        })
        .collect();
    let inflight = InFlight::start(planned.len());
    for ((info, req, planned), inflight) in planned.into_iter().zip(inflight) {
        let raw = slowlog.then(|| req.raw.clone());
        let (p, level, l1_miss, guard) = match planned {
            Planned::Hit(reply) => (Pending::Ready(Value::Raw(reply)), Level::L1, false, None),
            Planned::Node {
                group,
                target,
                values,
                l1_miss,
                guard,
            } => {
                let member = route::Member {
                    target,
                    data: req.raw,
                    values,
                    group,
                };
                let p = match tickets[group].as_mut().map(Option::take) {
                    Some(Some(t)) => Pending::Group(t, member),
                    Some(None) => Pending::Member(member),
                    None => {
                        let t = px
                            .upstream
                            .start(member.target, member.data, proto, hint)
                            .await;
                        if member.values {
                            Pending::Values(t)
                        } else {
                            Pending::Forwarded(t)
                        }
                    }
                };
                (p, Level::L2, l1_miss, guard)
            }
        };
        io.pending.push(Queued {
            p,
            proto,
            silent: false,
            stat: Some(info.stat),
            level,
            rejected: false,
            started,
            raw,
            l1_miss,
            guard,
            _inflight: inflight,
        });
    }
}

/// L1's replies that the fast lane wrote straight to the output, for their counters and
/// the slow log: they all took the run's time.
#[derive(Default)]
struct WrittenHits {
    count: u64,
    /// Per command: its counters and how many.
    stats: Vec<(&'static CmdStat, u64)>,
    /// The requests, only while the slow log is on.
    raws: Vec<bytes::Bytes>,
}

impl WrittenHits {
    fn add(&mut self, stat: &'static CmdStat, raw: Option<bytes::Bytes>) {
        self.count += 1;
        match self.stats.iter_mut().find(|(s, _)| std::ptr::eq(*s, stat)) {
            Some((_, n)) => *n += 1,
            None => self.stats.push((stat, 1)),
        }
        self.raws.extend(raw);
    }

    /// Counts and logs the run's replies, and empties the lists for the next run.
    fn account(&mut self, px: &Proxy, sess: &Session, started: Instant) {
        if self.count == 0 {
            return;
        }
        self.count = 0;
        let micros = started.elapsed().as_micros() as u64;
        for (stat, n) in self.stats.drain(..) {
            stat.record_n(Level::L1, micros, n);
        }
        if !px.slowlog.is_slow(micros) {
            self.raws.clear();
        }
        for raw in self.raws.drain(..) {
            let args = crate::parse::request::args_of(&raw);
            px.slowlog.record(
                micros,
                &args,
                sess.entry.addr.to_string(),
                sess.name.clone().unwrap_or_default(),
            );
        }
        // A long batch's list is not kept by an idle connection.
        if self.raws.capacity() > KEEP_WRITTEN {
            self.raws = Vec::new();
        }
    }
}

/// `WrittenHits::raws` longer than this are not kept between runs.
const KEEP_WRITTEN: usize = 64;

/// Writes `out` to the client. A subscriber that stops reading is closed once its
/// queued messages pass the limit, even while this write is stuck; any client that
/// accepts nothing for `stall` is closed.
async fn write_out<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut BytesMut,
    outbox: Option<&crate::route::pubsub::Outbox>,
    stall: Option<Duration>,
) -> std::io::Result<()> {
    let write = write_all_watched(wr, out, stall);
    match outbox {
        Some(o) => tokio::select! {
            r = write => r?,
            _ = o.overflow.notified() => {
                return Err(std::io::Error::other("subscriber over client.pubsub_output_limit"));
            }
        },
        None => write.await?,
    }
    out.clear();
    if out.capacity() > KEEP_OUT {
        *out = BytesMut::new();
    }
    Ok(())
}

/// `write_all` then `flush` (TLS buffers records), failing with `TimedOut` if the
/// client takes no bytes for `stall`: each write that makes progress restarts the clock.
async fn write_all_watched<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &[u8],
    stall: Option<Duration>,
) -> std::io::Result<()> {
    async fn watched<T>(
        stall: Option<Duration>,
        f: impl Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        match stall {
            // The timer is only set up if the write has to wait: most writes complete
            // at once, and a timer's set-up is dearer than the write (callgrind).
            Some(d) => {
                let mut f = std::pin::pin!(f);
                let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
                if let Poll::Ready(r) = first {
                    return r;
                }
                match tokio::time::timeout(d, f).await {
                    Ok(r) => r,
                    Err(_) => {
                        crate::metrics::OUTPUT_STALLED.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            stalled_secs = d.as_secs(),
                            "closing client that reads none of its replies (client.output_stall_timeout_secs)"
                        );
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "client output stalled",
                        ))
                    }
                }
            }
            None => f.await,
        }
    }
    let mut off = 0;
    while off < buf.len() {
        let n = watched(stall, wr.write(&buf[off..])).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    watched(stall, wr.flush()).await
}

/// Resolves the pending replies in order into `out`. False if the client went away while
/// a blocking command waited (that command is abandoned, its connection closed). Once
/// `out` passes `client.output_buffer_limit` it is written before more replies are
/// resolved: a client that does not read makes the proxy wait, not buffer.
async fn drain<R, W>(
    px: &Arc<Proxy>,
    io: &mut Io<R, W>,
    client_gone: &mut bool,
    sess: &Session,
) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Io {
        rd,
        wr,
        inbuf,
        out,
        pending,
        groups,
        stall,
        ..
    } = io;
    let stall = *stall;
    let out_limit = px.cfg.client.output_buffer_limit as usize;
    // A subscriber's messages are interleaved with its replies.
    let outbox = sess.pubsub.as_ref().map(|p| &*p.out);
    let limit = px.cfg.client.query_buffer_limit;
    // A command's time starts when it was dispatched or when the reply before it was
    // resolved, whichever is later: waiting behind its own pipeline is not its time.
    let mut prev_done: Option<Instant> = None;
    // The replies of the forwarded groups being resolved (by the group's index in its
    // run: a run's members all come before the next run's), for their members in turn.
    groups.clear();
    let hint = sess.hint();
    for mut q in pending.drain(..) {
        match (&q.p, prev_done) {
            // The members of a group share its time: its replies arrive together.
            (Pending::Member(m), _) => {
                if let Some(g) = groups.get(m.group) {
                    q.started = g.begin;
                }
            }
            (_, Some(t)) => q.started = q.started.max(t),
            _ => {}
        }
        let began = q.started;
        let p = std::mem::replace(&mut q.p, Pending::Ready(Value::Null));
        let blocking = p.is_blocking();
        let proto = q.proto;
        // A later member of a group whose reply is plain: taken as it is, with no
        // future to build (its time is the group's, which arrived in one piece).
        let direct = match &p {
            Pending::Member(m) => match groups.get(m.group).and_then(|g| g.front()) {
                Some(raw)
                    if !(crate::upstream::needs_follow_up(raw)
                        || m.values && route::reply_may_hold_stub(raw)) =>
                {
                    groups[m.group].replies.next().map(Value::Raw)
                }
                _ => None,
            },
            _ => None,
        };
        let now_known = match (&direct, &p) {
            (Some(_), Pending::Member(m)) => groups.get(m.group).map(|g| g.arrived),
            _ => None,
        };
        let v = if direct.is_some() {
            direct
        } else {
            let groups = &mut *groups;
            let resolve = async move {
                match p {
                    Pending::Group(t, m) => {
                        if groups.len() <= m.group {
                            groups.resize_with(m.group + 1, || Group::new(began));
                        }
                        let g = &mut groups[m.group];
                        let addr = t.addr();
                        g.addr = Some(addr.clone());
                        g.begin = began;
                        g.replies = Vec::new().into_iter();
                        g.error = None;
                        let (replies, e) = match px.upstream.finish_group(t).await {
                            Ok(r) => r,
                            Err(e) => (Vec::new(), Some(e)),
                        };
                        g.arrived = Instant::now();
                        g.replies = replies.into_iter();
                        g.error = e.map(|e| e.to_reply());
                        let got = g.pop();
                        m.reply(px, proto, hint, addr, got).await
                    }
                    Pending::Member(m) => {
                        let (addr, got) = match groups.get_mut(m.group) {
                            Some(g) => (g.addr.clone().unwrap_or_else(|| Arc::from("")), g.pop()),
                            None => (Arc::from(""), None),
                        };
                        m.reply(px, proto, hint, addr, got).await
                    }
                    p => p.resolve(px).await,
                }
            };
            tokio::pin!(resolve);
            // Most replies are in by now: only a reply still on its way needs the socket
            // watched beside it.
            let ready = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(match resolve.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => Some(v),
                    std::task::Poll::Pending => None,
                })
            })
            .await;
            if ready.is_some() {
                ready
            } else {
                loop {
                    tokio::select! {
                        biased;
                        v = &mut resolve => break Some(v),
                        r = rd.read_buf(inbuf), if !*client_gone && (inbuf.len() as u64) < limit => {
                            if matches!(r, Ok(0) | Err(_)) {
                                *client_gone = true;
                                if blocking {
                                    break None;
                                }
                            }
                        }
                    }
                }
            }
        };
        let Some(v) = v else {
            // This command and the ones after it are abandoned with the client.
            return Ok(false);
        };
        // The write is acknowledged: reads may fill again (see `L1::begin_write`).
        drop(q.guard.take());
        let now = now_known.unwrap_or_else(Instant::now);
        account(px, &q, &v, sess, blocking, now);
        prev_done = Some(now);
        // Messages that arrived before this reply go out before it.
        if let Some(o) = outbox {
            o.drain_into(out);
        }
        match &v {
            _ if q.silent => {}
            // A large reply (a spilled value, a big hash) goes out from its own buffer
            // after what is buffered: not copied into the output.
            Value::Raw(b) if b.len() >= LARGE_REPLY && outbox.is_none() => {
                let sent = async {
                    write_out(wr, out, None, stall).await?;
                    write_all_watched(wr, b, stall).await
                };
                sent.await?;
                continue;
            }
            v => v.encode(q.proto, out),
        }
        if out.len() >= out_limit {
            write_out(wr, out, outbox, stall).await?;
        }
    }
    // The list stays; the replies it holds go (they share the connections' read buffers).
    groups.clear();
    Ok(true)
}

/// A forwarded group's replies still to be handed to its members, its node, and its
/// time (each member's time: when the group's first member's started, when the
/// replies arrived).
struct Group {
    /// As the connection reader handed them over (not copied into another list).
    replies: std::vec::IntoIter<bytes::Bytes>,
    /// For the members past the replies, if the connection ended before theirs came.
    error: Option<Value>,
    /// The node's address, once the group's first member is resolved.
    addr: Option<Arc<str>>,
    begin: Instant,
    arrived: Instant,
}

impl Group {
    /// The next member's reply: the next of the replies, or the group's error.
    fn pop(&mut self) -> Option<Result<bytes::Bytes, Value>> {
        match self.replies.next() {
            Some(r) => Some(Ok(r)),
            None => self.error.clone().map(Err),
        }
    }

    /// The next member's reply, if it is one of the replies.
    fn front(&self) -> Option<&bytes::Bytes> {
        self.replies.as_slice().first()
    }

    /// Filled in when the group's first member is resolved.
    fn new(at: Instant) -> Group {
        Group {
            replies: Vec::new().into_iter(),
            error: None,
            addr: None,
            begin: at,
            arrived: at,
        }
    }
}

fn is_error_reply(v: &Value) -> bool {
    match v {
        Value::Error(_) => true,
        Value::Raw(b) => crate::parse::reply::is_error(b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this binary that counts in-flight commands: it reads the
    /// gauge's changes, with nothing else moving it.
    #[test]
    fn in_flight_tokens_count_down_however_they_go() {
        let gauge = || crate::metrics::INFLIGHT_NOW.load(Ordering::Relaxed);
        let base = gauge();
        let mut tokens = InFlight::start(3);
        let first = tokens.next().expect("three counted");
        assert_eq!(gauge(), base + 3);
        // Two never handed out (a run dropped half way): counted down with the rest.
        drop(tokens);
        assert_eq!(gauge(), base + 1);
        // One in a queue entry that is dropped, not answered (a panic, a dropped task).
        drop(first);
        assert_eq!(gauge(), base);
        let one = InFlight::one();
        assert_eq!(gauge(), base + 1);
        drop(one);
        assert_eq!(gauge(), base);
    }
}
