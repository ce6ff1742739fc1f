//! One pipelined connection to one upstream node.
//!
//! A writer task drains a queue of requests and writes each batch with one syscall; a
//! reader task cuts replies off the socket (framing only, no decoding) and hands each one
//! to the oldest waiter, in FIFO order. Many clients share one connection, so no request
//! here may leave state behind on it (stateful commands use dedicated connections).
//!
//! However the reader ends (the upstream closed, a bad reply, the watchdog), every
//! waiter gets its error at once: `Timeout` if the watchdog ended it, else
//! `ConnectionLost`; a group's waiter first gets the replies that arrived.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use super::tls::{UpRead, UpWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::error::UpstreamError;
use crate::parse::reply::{error_text, frame_len};
use crate::respond::{command_bytes, Proto};

pub type ReplyTx = oneshot::Sender<Result<Bytes, UpstreamError>>;
pub type ReplyRx = oneshot::Receiver<Result<Bytes, UpstreamError>>;
/// A group's replies, one `Bytes` each, cut where the reader framed them.
type GroupTx = oneshot::Sender<Result<Vec<Bytes>, UpstreamError>>;
pub type GroupRx = oneshot::Receiver<Result<Vec<Bytes>, UpstreamError>>;

/// Where a request's replies go: together in one `Bytes`, or one each. A receiver
/// that is gone (its client left) simply drops what it is sent.
enum Tx {
    One(ReplyTx),
    Each(GroupTx),
}

impl Tx {
    fn fail(self, err: UpstreamError) {
        match self {
            Tx::One(tx) => drop(tx.send(Err(err))),
            Tx::Each(tx) => drop(tx.send(Err(err))),
        }
    }

    /// Hands over `reply`, whose replies end at the offsets in `ends` (for `Each`).
    fn deliver(self, reply: Bytes, ends: &[usize]) {
        match self {
            Tx::One(tx) => drop(tx.send(Ok(reply))),
            Tx::Each(tx) => {
                let mut at = 0;
                let each = ends
                    .iter()
                    .map(|&end| {
                        let r = reply.slice(at..end);
                        at = end;
                        r
                    })
                    .collect();
                drop(tx.send(Ok(each)));
            }
        }
    }
}

const READ_CHUNK: usize = 64 * 1024;
const MAX_BATCH: usize = 512;

/// Credentials and identity used in every upstream handshake.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_name: Option<String>,
    /// TLS to every node (`rediss://` seeds or `upstream.tls`).
    pub tls: Option<Arc<super::tls::UpstreamTls>>,
    /// ElastiCache IAM: the password is a fresh token for `iam.user_id`.
    pub iam: Option<Arc<super::iam::IamAuth>>,
    /// `upstream.tcp_keepalive_secs`, on every connection (pinned ones included).
    pub keepalive_secs: u64,
}

/// Called once when a connection closes, whatever closes it.
pub type OnClose = Arc<dyn Fn() + Send + Sync>;

/// Per-connection extras for data connections that L1 depends on.
#[derive(Clone, Default)]
pub struct ConnOpts {
    /// `CLIENT TRACKING on REDIRECT <id>`: invalidations for keys this connection reads
    /// go to that (invalidation) connection.
    pub tracking_redirect: Option<i64>,
    /// A tracked connection that closes takes its tracked keys with it: L1 must flush.
    pub on_close: Option<OnClose>,
    /// `upstream.request_timeout_ms`: a connection whose oldest request has waited this
    /// long fails every request on it with `Timeout` and closes (see [`watchdog`]).
    pub request_timeout: Option<Duration>,
}

struct Req {
    data: Bytes,
    /// Replies to swallow before the one the caller wants (`ASKING` before a command).
    skip: u8,
    /// Replies the caller wants (one for a single command).
    count: u32,
    tx: Tx,
}

struct Waiter {
    skip: u8,
    count: u32,
    tx: Tx,
    /// When its bytes were handed to the socket (one clock read per written batch).
    sent: Instant,
}

pub struct PipeConn {
    pub addr: Arc<str>,
    tx: mpsc::UnboundedSender<Req>,
    closed: Arc<CloseState>,
    tasks: [AbortHandle; 3],
}

struct CloseState {
    closed: AtomicBool,
    on_close: Option<OnClose>,
    /// Set by the watchdog when it closes the connection: `request_timeout` in ms.
    timed_out_ms: AtomicU64,
}

impl CloseState {
    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            if let Some(f) = &self.on_close {
                f();
            }
        }
    }
}

/// Marks the connection closed when a task ends, however it ends (even aborted).
struct CloseOnDrop(Arc<CloseState>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl PipeConn {
    /// Connects, authenticates and switches protocol, all within `timeout`.
    pub async fn connect(
        addr: &str,
        proto: Proto,
        hs: &Handshake,
        timeout: Duration,
        opts: ConnOpts,
    ) -> Result<PipeConn, UpstreamError> {
        let ms = timeout.as_millis() as u64;
        let (mut rd, mut wr) = dial(addr, timeout, hs).await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut extra = Vec::new();
        if let Some(id) = opts.tracking_redirect {
            extra.push(command_bytes(&[
                "CLIENT",
                "TRACKING",
                "on",
                "REDIRECT",
                &id.to_string(),
            ]));
        }
        tokio::time::timeout(
            timeout,
            handshake(&mut rd, &mut wr, &mut buf, proto, hs, extra),
        )
        .await
        .map_err(|_| UpstreamError::Handshake(format!("no reply within {ms} ms")))??;

        let queue: Arc<Mutex<VecDeque<Waiter>>> = Arc::new(Mutex::new(VecDeque::new()));
        let closed = Arc::new(CloseState {
            closed: AtomicBool::new(false),
            on_close: opts.on_close,
            timed_out_ms: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(
            wr,
            rx,
            queue.clone(),
            CloseOnDrop(closed.clone()),
        ));
        let reader = tokio::spawn(read_loop(
            rd,
            buf,
            queue.clone(),
            closed.clone(),
            writer.abort_handle(),
            addr.into(),
        ));
        let dog = tokio::spawn(watchdog(
            queue,
            closed.clone(),
            opts.request_timeout,
            reader.abort_handle(),
            addr.into(),
        ));
        Ok(PipeConn {
            addr: addr.into(),
            tx,
            closed,
            tasks: [
                writer.abort_handle(),
                reader.abort_handle(),
                dog.abort_handle(),
            ],
        })
    }

    /// Why the connection ended (`Timeout` if the watchdog ended it), for the requests
    /// it leaves unanswered.
    pub fn end_error(&self) -> UpstreamError {
        self.closed.end_error()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.closed.load(Ordering::Acquire)
    }

    /// Queues one request; the reply arrives on the returned receiver, in order.
    pub fn send(&self, data: Bytes, skip: u8) -> Result<ReplyRx, UpstreamError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(data, skip, 1, Tx::One(tx))?;
        Ok(rx)
    }

    /// Queues `count` requests (`data` holds them back to back); their replies arrive
    /// together on the returned receiver, one `Bytes` each (framed once, by the reader).
    pub fn send_group(&self, data: Bytes, count: u32) -> Result<GroupRx, UpstreamError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(data, 0, count, Tx::Each(tx))?;
        Ok(rx)
    }

    fn enqueue(&self, data: Bytes, skip: u8, count: u32, tx: Tx) -> Result<(), UpstreamError> {
        if self.is_closed() {
            return Err(UpstreamError::ConnectionLost);
        }
        self.tx
            .send(Req {
                data,
                skip,
                count,
                tx,
            })
            .map_err(|_| UpstreamError::ConnectionLost)
    }

    /// Ends the connection: its tasks stop, and the reader's end fails every request
    /// still waiting on it.
    pub fn kill(&self) {
        self.closed.close();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for PipeConn {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A connection to `addr` within `timeout` (TCP, Nagle off, then TLS when configured),
/// split for reading and writing.
pub(crate) async fn dial(
    addr: &str,
    timeout: Duration,
    hs: &Handshake,
) -> Result<(UpRead, UpWrite), UpstreamError> {
    let ms = timeout.as_millis() as u64;
    let connect = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        crate::net::set_keepalive(&stream, hs.keepalive_secs);
        match &hs.tls {
            Some(tls) => tls.wrap(addr, stream).await,
            None => {
                let (rd, wr) = stream.into_split();
                Ok((Box::new(rd) as UpRead, Box::new(wr) as UpWrite))
            }
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(ms))?
}

/// Authenticates, selects the protocol and names the connection, then runs `extra`
/// commands; every reply must be a success. Pipelined: one round trip.
pub(crate) async fn handshake(
    rd: &mut UpRead,
    wr: &mut UpWrite,
    buf: &mut BytesMut,
    proto: Proto,
    hs: &Handshake,
    extra: Vec<Bytes>,
) -> Result<(), UpstreamError> {
    let mut cmds: Vec<Bytes> = Vec::new();
    // With IAM, the user is the IAM user and the password a token valid now.
    let iam_hs;
    let hs = match &hs.iam {
        Some(iam) => {
            let token = iam.token().await.map_err(UpstreamError::Handshake)?;
            iam_hs = Handshake {
                username: Some(iam.user_id.clone()),
                password: Some(token),
                ..hs.clone()
            };
            &iam_hs
        }
        None => hs,
    };
    let user = hs.username.clone().unwrap_or_else(|| "default".into());
    match proto {
        Proto::Resp3 => {
            let mut args: Vec<String> = vec!["HELLO".into(), "3".into()];
            if let Some(p) = &hs.password {
                args.extend(["AUTH".into(), user, p.clone()]);
            }
            cmds.push(command_bytes(&args));
        }
        Proto::Resp2 => {
            if let Some(p) = &hs.password {
                cmds.push(match &hs.username {
                    Some(u) => command_bytes(&["AUTH", u, p]),
                    None => command_bytes(&["AUTH", p]),
                });
            }
        }
    }
    if let Some(name) = &hs.client_name {
        cmds.push(command_bytes(&["CLIENT", "SETNAME", name]));
    }
    cmds.extend(extra);
    if cmds.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    for c in &cmds {
        out.extend_from_slice(c);
    }
    wr.write_all(&out)
        .await
        .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
    for _ in 0..cmds.len() {
        let reply = read_one(rd, buf).await?;
        if let Some(err) = error_text(&reply) {
            return Err(UpstreamError::Handshake(err));
        }
    }
    Ok(())
}

/// Reads exactly one reply (used only during the handshake).
pub async fn read_one(
    rd: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
) -> Result<Bytes, UpstreamError> {
    loop {
        match frame_len(buf) {
            Ok(Some(n)) => return Ok(buf.split_to(n).freeze()),
            Ok(None) => {}
            Err(e) => return Err(UpstreamError::Protocol(e.0)),
        }
        buf.reserve(READ_CHUNK);
        match rd.read_buf(buf).await {
            Ok(0) => return Err(UpstreamError::ConnectionLost),
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::Connect(e.to_string())),
        }
    }
}

async fn write_loop(
    mut wr: UpWrite,
    mut rx: mpsc::UnboundedReceiver<Req>,
    queue: Arc<Mutex<VecDeque<Waiter>>>,
    _closed: CloseOnDrop,
) {
    let mut batch: Vec<Req> = Vec::with_capacity(MAX_BATCH);
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Let the other tasks that are ready now (typically other clients whose
        // requests just arrived) queue theirs first, so one write carries them all.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        out.clear();
        {
            // Waiters are queued before the bytes leave, so a reply always finds one.
            let sent = Instant::now();
            let mut q = match queue.lock() {
                Ok(q) => q,
                Err(poisoned) => poisoned.into_inner(),
            };
            for req in batch.drain(..) {
                out.extend_from_slice(&req.data);
                q.push_back(Waiter {
                    skip: req.skip,
                    count: req.count,
                    tx: req.tx,
                    sent,
                });
            }
        }
        if wr.write_all(&out).await.is_err() {
            return;
        }
        if out.capacity() > 4 * READ_CHUNK {
            out = BytesMut::with_capacity(READ_CHUNK);
        }
    }
}

/// The reader's framing state. Dropped however the reader ends (the upstream closed,
/// a bad reply, the watchdog aborting it): the front waiter gets the replies of its
/// group that are already in, and every waiter left gets its error at once.
struct Reading {
    queue: Arc<Mutex<VecDeque<Waiter>>>,
    closed: Arc<CloseState>,
    buf: BytesMut,
    /// The front waiter's replies framed so far: `have` of them, the first `scan` bytes
    /// of `buf` (after `partial`, which holds those that came before a push frame).
    scan: usize,
    have: u32,
    partial: BytesMut,
    /// For a waiter that takes its replies one each: where each framed one ends
    /// (counted from the start of `partial`).
    ends: Vec<usize>,
}

/// Fails every waiting request with `err`.
fn fail_all(q: &mut VecDeque<Waiter>, err: &UpstreamError) {
    for w in q.drain(..) {
        w.tx.fail(err.clone());
    }
}

impl CloseState {
    /// Why the connection ended, for the requests it leaves unanswered.
    fn end_error(&self) -> UpstreamError {
        match self.timed_out_ms.load(Ordering::Acquire) {
            0 => UpstreamError::ConnectionLost,
            ms => UpstreamError::Timeout(ms),
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        // No new requests from now on; the writer is stopped beside this.
        self.closed.close();
        let mut q = match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.have > 0 {
            if let Some(w) = q.pop_front() {
                self.partial.extend_from_slice(&self.buf[..self.scan]);
                w.tx.deliver(std::mem::take(&mut self.partial).freeze(), &self.ends);
            }
        }
        fail_all(&mut q, &self.closed.end_error());
    }
}

async fn read_loop(
    mut rd: UpRead,
    buf: BytesMut,
    queue: Arc<Mutex<VecDeque<Waiter>>>,
    closed: Arc<CloseState>,
    writer: AbortHandle,
    addr: Arc<str>,
) {
    let mut st = Reading {
        queue,
        closed,
        buf,
        scan: 0,
        have: 0,
        partial: BytesMut::new(),
        ends: Vec::new(),
    };
    // Whatever ends this loop ends the connection; the writer goes first (dropped
    // before `st`, so it queues nothing after the waiters were failed).
    let _stop_writer = AbortOnDrop(writer);
    let queue = st.queue.clone();
    loop {
        loop {
            let scan = st.scan;
            let n = match frame_len(&st.buf[scan..]) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(upstream = %addr, error = %e.0, "unparseable reply; closing connection");
                    return;
                }
            };
            if st.buf[scan] == b'>' {
                // Out-of-band push (RESP3), cut out of the replies around it. The only
                // one a data connection expects: its tracking redirect died, so
                // invalidations are being lost. Closing the connection flushes L1
                // (on_close) and the replacement tracks afresh.
                if scan > 0 {
                    let before = st.buf.split_to(scan);
                    st.partial.extend_from_slice(&before);
                    st.scan = 0;
                }
                let push = st.buf.split_to(n);
                if push.windows(21).any(|w| w == b"tracking-redir-broken") {
                    tracing::warn!(upstream = %addr, "tracking-redir-broken; reconnecting");
                    return;
                }
                continue;
            }
            let mut q = match queue.lock() {
                Ok(q) => q,
                Err(poisoned) => poisoned.into_inner(),
            };
            let Some(front) = q.front_mut() else {
                tracing::warn!(upstream = %addr, "reply with no request waiting; closing connection");
                return;
            };
            if front.skip > 0 && st.have == 0 {
                // Only single requests skip (ASKING's +OK), before their own reply.
                front.skip -= 1;
                let _ = st.buf.split_to(scan + n);
                continue;
            }
            st.scan += n;
            st.have += 1;
            if matches!(front.tx, Tx::Each(_)) {
                st.ends.push(st.partial.len() + st.scan);
            }
            if st.have < front.count {
                continue;
            }
            let Some(w) = q.pop_front() else { continue };
            drop(q);
            let done = st.buf.split_to(st.scan);
            let reply = if st.partial.is_empty() {
                done.freeze()
            } else {
                st.partial.extend_from_slice(&done);
                std::mem::take(&mut st.partial).freeze()
            };
            st.scan = 0;
            st.have = 0;
            // The client may have gone away; its reply is simply dropped.
            w.tx.deliver(reply, &st.ends);
            st.ends.clear();
        }
        if st.buf.capacity() - st.buf.len() < READ_CHUNK / 4 {
            st.buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(&mut st.buf).await {
            Ok(0) => {
                tracing::debug!(upstream = %addr, "upstream closed the connection");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(upstream = %addr, error = %e, "upstream read failed");
                return;
            }
        }
    }
}

/// Enforces `upstream.request_timeout_ms` for every request on the connection with one
/// timer, instead of one per request: every `timeout / 8` it looks at the oldest
/// waiter, and if that one has waited `timeout` or longer, ends the connection: the
/// reader, aborted, fails every waiter with `Timeout` (a node that stopped answering
/// would only make every later request time out too). A request therefore fails
/// between `timeout` and `timeout * 9 / 8` after it was sent.
async fn watchdog(
    queue: Arc<Mutex<VecDeque<Waiter>>>,
    closed: Arc<CloseState>,
    timeout: Option<Duration>,
    reader: AbortHandle,
    addr: Arc<str>,
) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let ms = timeout.as_millis() as u64;
    let tick = (timeout / 8).max(Duration::from_millis(1));
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let waiting = {
            let mut q = match queue.lock() {
                Ok(q) => q,
                Err(poisoned) => poisoned.into_inner(),
            };
            if closed.closed.load(Ordering::Acquire) {
                // Ended otherwise: a request the writer queued as the reader ended.
                fail_all(&mut q, &UpstreamError::ConnectionLost);
                return;
            }
            match q.front() {
                Some(w) if w.sent.elapsed() >= timeout => q.len(),
                _ => continue,
            }
        };
        tracing::warn!(upstream = %addr, waiting, timeout_ms = ms, "request timed out; closing connection");
        closed.timed_out_ms.store(ms.max(1), Ordering::Release);
        closed.close();
        // The reader's state, dropped, hands out what arrived and fails the rest.
        reader.abort();
        return;
    }
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
