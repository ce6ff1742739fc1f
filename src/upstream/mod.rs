//! The upstream: the slot map, per-node pipelined connections, redirects, topology.
//!
//! Data plane: a request is *started* (its bytes queued on the owning node's connection,
//! nothing awaited) and later *finished* (its reply awaited, with the request timeout,
//! following MOVED/ASK/TRYAGAIN). Starting every command of a client's batch before
//! finishing any is what makes pipelining work across the proxy.
//!
//! Control plane: [`topology`] discovers the cluster (`CLUSTER SLOTS` on a control connection) and refreshes it
//! periodically and whenever a redirect or a lost connection says it changed.

pub mod conn;
pub mod iam;
pub mod pinned;
pub mod tls;
pub mod topology;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use crate::config::Config;
use crate::error::{Error, UpstreamError};
use crate::l1::tracking::Invalidator;
use crate::l1::{Coherence, L1};
use crate::parse::reply::error_text;
use crate::parse::table::CommandTable;
use crate::respond::Proto;
use conn::{ConnOpts, Handshake, PipeConn, ReplyRx};

pub const SLOTS: usize = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Cluster,
    Standalone,
}

/// Whether a reply asks for more than handing it to the client: a redirect (MOVED, ASK,
/// TRYAGAIN) or CLUSTERDOWN.
pub fn needs_follow_up(reply: &[u8]) -> bool {
    reply.first() == Some(&b'-')
        && [&b"-MOVED "[..], b"-ASK ", b"-TRYAGAIN", b"-CLUSTERDOWN"]
            .iter()
            .any(|p| reply.starts_with(p))
}

/// Which node a request goes to.
#[derive(Clone)]
pub enum Target {
    Slot(u16),
    Node(Arc<Node>),
    /// A command without keys: any master will do.
    Any,
}

/// Settings every connection needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub conns_per_node: usize,
    pub max_redirects: u32,
    pub refresh_interval: Duration,
    pub handshake: Handshake,
    pub pinned_max: usize,
    pub pinned_idle: usize,
    /// How long a request waits for an unreachable master to be replaced (cluster mode).
    pub failover_wait: Duration,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Result<Settings, String> {
        let seed_creds = cfg.seeds().into_iter().find(|s| s.password.is_some());
        let u = &cfg.upstream;
        let tls = match cfg.upstream_tls() {
            true => Some(Arc::new(tls::UpstreamTls::new(
                Some(u.tls_ca_file.as_str()).filter(|f| !f.is_empty()),
                Some(u.tls_server_name.clone()).filter(|n| !n.is_empty()),
            )?)),
            false => None,
        };
        let iam = u.iam.enabled.then(|| {
            Arc::new(iam::IamAuth::new(
                &u.iam.user_id,
                &u.iam.cache_name,
                &u.iam.region,
                u.iam.serverless,
            ))
        });
        Ok(Settings {
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            request_timeout: Duration::from_millis(u.request_timeout_ms),
            conns_per_node: u.connections_per_node,
            max_redirects: u.max_redirects,
            refresh_interval: Duration::from_millis(u.topology_refresh_interval_ms),
            pinned_max: u.pinned_max_per_node,
            pinned_idle: u.pinned_idle_per_node,
            failover_wait: Duration::from_millis(u.failover_wait_ms),
            handshake: Handshake {
                username: u
                    .username
                    .clone()
                    .or_else(|| seed_creds.as_ref().and_then(|s| s.username.clone())),
                password: u
                    .password
                    .clone()
                    .or_else(|| seed_creds.as_ref().and_then(|s| s.password.clone())),
                client_name: Some(u.client_name.clone()).filter(|n| !n.is_empty()),
                tls,
                iam,
                keepalive_secs: u.tcp_keepalive_secs,
            },
        })
    }
}

/// A slot in a node's pool: the live connection, and a lock so only one task connects.
struct ConnSlot {
    cur: RwLock<Option<Arc<PipeConn>>>,
    connecting: tokio::sync::Mutex<()>,
    /// After a failed connect, fail fast until this instant instead of waiting again.
    backoff_until: Mutex<Option<(Instant, UpstreamError)>>,
}

impl ConnSlot {
    fn new() -> ConnSlot {
        ConnSlot {
            cur: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            backoff_until: Mutex::new(None),
        }
    }

    fn live(&self) -> Option<Arc<PipeConn>> {
        let cur = self.cur.read().unwrap_or_else(|p| p.into_inner());
        cur.as_ref().filter(|c| !c.is_closed()).cloned()
    }
}

const CONNECT_BACKOFF: Duration = Duration::from_millis(200);

pub struct Node {
    pub addr: Arc<str>,
    pools: [Vec<ConnSlot>; 2],
    /// Set when L1 uses tracking: data connections redirect invalidations here.
    tracking: Option<Arc<L1>>,
    invalidator: tokio::sync::Mutex<Option<Invalidator>>,
    pub(crate) pinned: pinned::PinnedPool,
    me: Weak<Node>,
}

impl Node {
    fn new(addr: &str, s: &Settings, tracking: Option<Arc<L1>>) -> Arc<Node> {
        let per_node = s.conns_per_node;
        Arc::new_cyclic(|me| Node {
            addr: addr.into(),
            pools: [
                (0..per_node).map(|_| ConnSlot::new()).collect(),
                (0..per_node).map(|_| ConnSlot::new()).collect(),
            ],
            pinned: pinned::PinnedPool::new(s.pinned_max, s.pinned_idle),
            tracking,
            invalidator: tokio::sync::Mutex::new(None),
            me: me.clone(),
        })
    }

    /// Closes every data connection (they reconnect on next use).
    fn recycle_connections(&self) {
        for slot in self.pools.iter().flatten() {
            if let Some(c) = slot.cur.write().unwrap_or_else(|p| p.into_inner()).take() {
                c.kill();
            }
        }
    }

    /// The data-connection options: tracking redirected to this node's (live)
    /// invalidation connection, and an L1 flush if the tracked connection closes.
    async fn conn_opts(&self, s: &Settings) -> Result<ConnOpts, UpstreamError> {
        let Some(l1) = self.tracking.as_ref().filter(|l| !l.is_disabled()) else {
            return Ok(ConnOpts::default());
        };
        let mut inv = self.invalidator.lock().await;
        let id = match inv.as_ref().filter(|i| i.is_alive()) {
            Some(i) => i.id,
            None => {
                let me = self.me.clone();
                let started = crate::l1::tracking::start(
                    &self.addr,
                    &s.handshake,
                    s.connect_timeout,
                    l1.clone(),
                    move || {
                        // Data connections still redirect to the dead id: replace them.
                        if let Some(node) = me.upgrade() {
                            node.recycle_connections();
                        }
                    },
                )
                .await;
                let fresh = match started {
                    Ok(f) => f,
                    // The server answered but refused (no CLIENT TRACKING, ACLs, …).
                    Err(UpstreamError::Handshake(why)) => {
                        l1.disable(&why);
                        return Ok(ConnOpts::default());
                    }
                    Err(e) => return Err(e),
                };
                let id = fresh.id;
                *inv = Some(fresh);
                id
            }
        };
        let flush = l1.clone();
        Ok(ConnOpts {
            tracking_redirect: Some(id),
            on_close: Some(Arc::new(move || {
                flush.flush_unsure("tracked data connection closed")
            })),
            request_timeout: None,
        })
    }

    /// The pool's connection for `hint` if it is up, without waiting.
    pub fn live_conn(&self, proto: Proto, hint: usize) -> Option<Arc<PipeConn>> {
        let pool = &self.pools[(proto == Proto::Resp3) as usize];
        pool[hint % pool.len()].live()
    }

    /// The connection `hint` picks (a client always picks the same one, which keeps its
    /// commands to one node in order), connecting it if needed.
    pub async fn conn(
        &self,
        proto: Proto,
        hint: usize,
        s: &Settings,
    ) -> Result<Arc<PipeConn>, UpstreamError> {
        if let Some(c) = self.live_conn(proto, hint) {
            return Ok(c);
        }
        let pool = &self.pools[(proto == Proto::Resp3) as usize];
        let slot = &pool[hint % pool.len()];
        let _guard = slot.connecting.lock().await;
        if let Some(c) = slot.live() {
            return Ok(c);
        }
        {
            let b = slot.backoff_until.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((until, err)) = b.as_ref() {
                if Instant::now() < *until {
                    return Err(err.clone());
                }
            }
        }
        let connected = match self.conn_opts(s).await {
            Ok(opts) => {
                let opts = ConnOpts {
                    request_timeout: Some(s.request_timeout),
                    ..opts
                };
                PipeConn::connect(&self.addr, proto, &s.handshake, s.connect_timeout, opts).await
            }
            Err(e) => Err(e),
        };
        match connected {
            Ok(c) => {
                let c = Arc::new(c);
                *slot.cur.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                *slot.backoff_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(c)
            }
            Err(e) => {
                *slot.backoff_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now() + CONNECT_BACKOFF, e.clone()));
                Err(e)
            }
        }
    }

    pub fn open_connections(&self) -> usize {
        self.pools
            .iter()
            .flatten()
            .filter(|s| s.live().is_some())
            .count()
    }
}

/// The routing view: who owns each slot.
pub struct Topology {
    pub mode: Mode,
    /// Index into `masters` for each slot; `u16::MAX` where no master owns it.
    pub slots: Vec<u16>,
    pub masters: Vec<Arc<Node>>,
    pub refreshed_at: Instant,
}

impl Topology {
    pub fn owner(&self, slot: u16) -> Option<&Arc<Node>> {
        let idx = *self.slots.get(slot as usize)?;
        self.masters.get(idx as usize)
    }

    /// Masters ordered by the lowest slot each owns: a stable order for SCAN cursors.
    pub fn masters_by_first_slot(&self) -> Vec<(u16, Arc<Node>)> {
        let mut seen = vec![false; self.masters.len()];
        let mut out = Vec::new();
        for (slot, &idx) in self.slots.iter().enumerate() {
            if let Some(n) = self.masters.get(idx as usize) {
                if !seen[idx as usize] {
                    seen[idx as usize] = true;
                    out.push((slot as u16, n.clone()));
                }
            }
        }
        out
    }
}

/// What the backend told us at discovery, for INFO/HELLO.
#[derive(Debug, Clone, Default)]
pub struct ServerFacts {
    pub redis_version: String,
}

pub struct Upstream {
    pub settings: Settings,
    pub seeds: Vec<String>,
    topo: RwLock<Option<Arc<Topology>>>,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    table: RwLock<Option<Arc<CommandTable>>>,
    facts: RwLock<ServerFacts>,
    last_error: Mutex<String>,
    refresh: Notify,
    pub refreshes: AtomicU64,
    /// The last topology refresh reached a node: the cluster is at least partly up, so
    /// an unreachable master is worth waiting for (a failover), not a total outage.
    reachable: std::sync::atomic::AtomicBool,
    rr: AtomicUsize,
    /// L1 when it relies on tracking (invalidation connections, flush on changes).
    tracking: Option<Arc<L1>>,
}

/// Requests queued together on one connection ([`Upstream::try_start_group`]). Holds
/// the connection, as a [`Ticket`] does: a node dropped from the topology meanwhile
/// keeps it until the replies are in.
pub struct GroupTicket {
    conn: Arc<PipeConn>,
    rx: conn::GroupRx,
    count: u32,
}

impl GroupTicket {
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The node the group went to.
    pub fn addr(&self) -> Arc<str> {
        self.conn.addr.clone()
    }
}

/// A started request: queued upstream (or failed to queue), not yet answered.
pub struct Ticket {
    target: Target,
    data: Bytes,
    proto: Proto,
    hint: usize,
    state: Result<(Arc<PipeConn>, ReplyRx), Error>,
}

impl Upstream {
    pub fn new(cfg: &Config, l1: Option<Arc<L1>>) -> Result<Arc<Upstream>, String> {
        Ok(Arc::new(Upstream {
            tracking: l1.filter(|l| l.coherence == Coherence::Tracking),
            settings: Settings::from_config(cfg)?,
            seeds: cfg.seeds().iter().map(|s| s.addr()).collect(),
            topo: RwLock::new(None),
            nodes: Mutex::new(HashMap::new()),
            table: RwLock::new(None),
            facts: RwLock::new(ServerFacts::default()),
            last_error: Mutex::new("not connected yet".into()),
            refresh: Notify::new(),
            refreshes: AtomicU64::new(0),
            reachable: std::sync::atomic::AtomicBool::new(false),
            rr: AtomicUsize::new(0),
        }))
    }

    pub fn topology(&self) -> Result<Arc<Topology>, Error> {
        match self.topo.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(t) => Ok(t.clone()),
            None => Err(Error::NoTopology(self.last_error())),
        }
    }

    pub fn table(&self) -> Option<Arc<CommandTable>> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn facts(&self) -> ServerFacts {
        self.facts.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn mode(&self) -> Option<Mode> {
        self.topology().ok().map(|t| t.mode)
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_last_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// The shared node object for an address (connections survive topology changes).
    pub fn node(&self, addr: &str) -> Arc<Node> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .entry(addr.to_string())
            .or_insert_with(|| Node::new(addr, &self.settings, self.tracking.clone()))
            .clone()
    }

    pub(crate) fn set_reachable(&self, yes: bool) {
        self.reachable.store(yes, Ordering::Relaxed);
    }

    /// A request that could not be sent because its master is unreachable (connect
    /// refused or timed out: it never ran) or the cluster says CLUSTERDOWN: during a
    /// failover it is re-sent to the slot's owner as the topology changes, until
    /// `upstream.failover_wait_ms` has passed. Given up at once when no node answers
    /// the topology refresh (a total outage is reported promptly) and outside cluster
    /// mode.
    async fn wait_for_failover(
        &self,
        target: &Target,
        data: &Bytes,
        proto: Proto,
        hint: usize,
        mut err: Error,
        deadline: &mut Option<Instant>,
    ) -> Result<(Arc<PipeConn>, ReplyRx), Error> {
        if !unavailable(&err)
            || !matches!(target, Target::Slot(_) | Target::Any)
            || self.mode() != Some(Mode::Cluster)
            || self.settings.failover_wait.is_zero()
        {
            return Err(err);
        }
        let until = *deadline.get_or_insert_with(|| {
            crate::metrics::FAILOVER_WAITS.fetch_add(1, Ordering::Relaxed);
            Instant::now() + self.settings.failover_wait
        });
        let mut pause = Duration::from_millis(50);
        loop {
            if !unavailable(&err) || Instant::now() + pause > until {
                return Err(err);
            }
            self.request_refresh();
            tokio::time::sleep(pause).await;
            if !self.reachable.load(Ordering::Relaxed) {
                return Err(err);
            }
            pause = (pause * 2).min(Duration::from_millis(500));
            let queued = match self.resolve(target) {
                Ok(node) => self.queue(&node, data.clone(), 0, proto, hint).await,
                Err(e) => Err(e),
            };
            match queued {
                Ok(q) => return Ok(q),
                Err(e) => err = e,
            }
        }
    }

    /// Asks the topology task for a refresh soon (coalesced).
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Pinned connections (in use, idle) over every node.
    pub fn pinned_counts(&self) -> (usize, usize) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .values()
            .map(|n| n.pinned.counts(self.settings.pinned_max))
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    pub fn total_connections(&self) -> usize {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.values().map(|n| n.open_connections()).sum()
    }

    fn resolve(&self, target: &Target) -> Result<Arc<Node>, Error> {
        let topo = self.topology()?;
        match target {
            Target::Node(n) => Ok(n.clone()),
            Target::Slot(slot) => topo.owner(*slot).cloned().ok_or_else(|| {
                Error::redis(format!(
                    "CLUSTERDOWN Hash slot not served (slot {slot} has no master)"
                ))
            }),
            Target::Any => {
                if topo.masters.is_empty() {
                    return Err(Error::NoTopology("no masters known".into()));
                }
                let i = self.rr.fetch_add(1, Ordering::Relaxed) % topo.masters.len();
                Ok(topo.masters[i].clone())
            }
        }
    }

    async fn queue(
        &self,
        node: &Node,
        data: Bytes,
        skip: u8,
        proto: Proto,
        hint: usize,
    ) -> Result<(Arc<PipeConn>, ReplyRx), Error> {
        let upstream_err = |source| Error::Upstream {
            addr: node.addr.to_string(),
            source,
        };
        let conn = node.conn(proto, hint, &self.settings).await.map_err(|e| {
            self.request_refresh();
            upstream_err(e)
        })?;
        let rx = conn.send(data, skip).map_err(upstream_err)?;
        Ok((conn, rx))
    }

    /// Queues a request on its node's connection without waiting for the reply.
    /// A request whose master is unreachable waits here for a failover
    /// ([`Self::wait_for_failover`]): the caller dispatches nothing after it meanwhile, so
    /// a pipeline's later commands cannot overtake it.
    pub async fn start(&self, target: Target, data: Bytes, proto: Proto, hint: usize) -> Ticket {
        match self.try_start(target, data, proto, hint) {
            Ok(t) => t,
            // Boxed: connecting and waiting for a failover make a large future, which
            // would otherwise sit inside every caller's, on the path of every request.
            Err((target, data)) => Box::pin(self.start_slow(target, data, proto, hint)).await,
        }
    }

    /// The common case of [`Self::start`], without waiting: the target's node is known
    /// and its connection is up. `Err` hands the request back for the slow path.
    fn try_start(
        &self,
        target: Target,
        data: Bytes,
        proto: Proto,
        hint: usize,
    ) -> Result<Ticket, (Target, Bytes)> {
        let Some(conn) = self
            .resolve(&target)
            .ok()
            .and_then(|node| node.live_conn(proto, hint))
        else {
            return Err((target, data));
        };
        match conn.send(data.clone(), 0) {
            Ok(rx) => Ok(Ticket {
                target,
                data,
                proto,
                hint,
                state: Ok((conn, rx)),
            }),
            Err(_) => Err((target, data)),
        }
    }

    async fn start_slow(&self, target: Target, data: Bytes, proto: Proto, hint: usize) -> Ticket {
        let state = match self.resolve(&target) {
            Ok(node) => self.queue(&node, data.clone(), 0, proto, hint).await,
            Err(e) => Err(e),
        };
        let state = match state {
            Err(e) if unavailable(&e) => {
                self.wait_for_failover(&target, &data, proto, hint, e, &mut None)
                    .await
            }
            other => other,
        };
        Ticket {
            target,
            data,
            proto,
            hint,
            state,
        }
    }

    /// Waits for a started request's reply, following redirects. The reply is the raw
    /// RESP bytes, in the protocol of the client that sent it.
    pub async fn finish(&self, t: Ticket) -> Result<Bytes, Error> {
        let Ticket {
            target,
            data,
            proto,
            hint,
            state,
        } = t;
        let (conn, rx) = state?;
        // No timer per request: the connection's watchdog fails its requests with
        // `Timeout` (and closes it) once the oldest has waited request_timeout.
        let got = rx.await;
        match got {
            Ok(Ok(reply)) if !needs_follow_up(&reply) => Ok(reply),
            // Boxed: following redirects and failovers is a large future, which would
            // otherwise sit inside every reply's.
            got => {
                Box::pin(self.follow_up(target, data, proto, hint, conn.addr.clone(), got)).await
            }
        }
    }

    /// The rest of [`Self::finish`] after a reply that is not the final one (a redirect,
    /// CLUSTERDOWN) or a failure.
    async fn follow_up(
        &self,
        target: Target,
        data: Bytes,
        proto: Proto,
        hint: usize,
        mut addr: Arc<str>,
        mut got: Result<Result<Bytes, UpstreamError>, tokio::sync::oneshot::error::RecvError>,
    ) -> Result<Bytes, Error> {
        let mut failover: Option<Instant> = None;
        let mut redirects = 0u32;
        loop {
            let reply = match got {
                Err(_) => {
                    self.request_refresh();
                    return Err(Error::Upstream {
                        addr: addr.to_string(),
                        source: UpstreamError::ConnectionLost,
                    });
                }
                Ok(Err(e)) => {
                    if matches!(e, UpstreamError::Timeout(_)) {
                        self.request_refresh();
                    }
                    return Err(Error::Upstream {
                        addr: addr.to_string(),
                        source: e,
                    });
                }
                Ok(Ok(reply)) => reply,
            };
            let Some(redirect) = Redirect::parse(&reply) else {
                if reply.starts_with(b"-CLUSTERDOWN") {
                    let down = Error::Redis(error_text(&reply).unwrap_or_default());
                    match self
                        .wait_for_failover(&target, &data, proto, hint, down, &mut failover)
                        .await
                    {
                        Ok((c, rx)) => {
                            addr = c.addr.clone();
                            got = rx.await;
                            continue;
                        }
                        Err(_) => return Ok(reply),
                    }
                }
                return Ok(reply);
            };
            redirects += 1;
            if redirects > self.settings.max_redirects {
                return Ok(reply);
            }
            let (c, rx) = match redirect {
                Redirect::Moved { slot, addr } => {
                    self.apply_moved(slot, &addr);
                    self.request_refresh();
                    let node = self.node(&addr);
                    self.queue(&node, data.clone(), 0, proto, hint).await?
                }
                Redirect::Ask { addr } => {
                    let node = self.node(&addr);
                    let mut both = BytesMut::with_capacity(data.len() + 16);
                    both.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
                    both.extend_from_slice(&data);
                    self.queue(&node, both.freeze(), 1, proto, hint).await?
                }
                Redirect::TryAgain => {
                    tokio::time::sleep(Duration::from_millis(10 * redirects as u64)).await;
                    let node = self.resolve(&target)?;
                    self.queue(&node, data.clone(), 0, proto, hint).await?
                }
            };
            addr = c.addr.clone();
            got = rx.await;
        }
    }

    /// Queues `count` requests for `target`'s node at once (`data` holds them back to
    /// back) if its connection is up; their replies come back together. `None`: the
    /// node or its connection is not ready, so the requests take the ordinary path.
    pub fn try_start_group(
        &self,
        target: &Target,
        data: Bytes,
        count: u32,
        proto: Proto,
        hint: usize,
    ) -> Option<GroupTicket> {
        let node = self.resolve(target).ok()?;
        let conn = node.live_conn(proto, hint)?;
        let rx = conn.send_group(data, count).ok()?;
        Some(GroupTicket { conn, rx, count })
    }

    /// The replies of a group, one `Bytes` each, in order; if the connection ended
    /// before all arrived, the error for the rest.
    pub async fn finish_group(&self, g: GroupTicket) -> Result<(Vec<Bytes>, Option<Error>), Error> {
        let lost = |source| Error::Upstream {
            addr: g.conn.addr.to_string(),
            source,
        };
        let replies = match g.rx.await {
            Ok(Ok(replies)) => replies,
            Err(_) => {
                self.request_refresh();
                return Err(lost(UpstreamError::ConnectionLost));
            }
            Ok(Err(e)) => {
                if matches!(e, UpstreamError::Timeout(_)) {
                    self.request_refresh();
                }
                return Err(lost(e));
            }
        };
        if replies.len() < g.count as usize {
            self.request_refresh();
            return Ok((replies, Some(lost(g.conn.end_error()))));
        }
        Ok((replies, None))
    }

    /// Takes over a grouped request whose reply was a redirect or CLUSTERDOWN, as
    /// [`Self::finish`] does for a single one.
    pub async fn follow(
        &self,
        target: Target,
        data: Bytes,
        proto: Proto,
        hint: usize,
        addr: Arc<str>,
        reply: Bytes,
    ) -> Result<Bytes, Error> {
        self.follow_up(target, data, proto, hint, addr, Ok(Ok(reply)))
            .await
    }

    /// Start and finish in one call, for requests that need not be pipelined.
    pub async fn call(
        &self,
        target: Target,
        data: Bytes,
        proto: Proto,
        hint: usize,
    ) -> Result<Bytes, Error> {
        let t = self.start(target, data, proto, hint).await;
        self.finish(t).await
    }

    /// The same request on every master, all sent before any reply is awaited; the
    /// replies in master order. The first node's error reply is `Error::NodeReply`, so
    /// callers pass Redis's error through unchanged with `?`.
    pub async fn on_every_master(
        &self,
        data: Bytes,
        proto: Proto,
        hint: usize,
    ) -> Result<Vec<Bytes>, Error> {
        let masters = self.topology()?.masters.clone();
        let mut tickets = Vec::with_capacity(masters.len());
        for n in masters {
            tickets.push(self.start(Target::Node(n), data.clone(), proto, hint).await);
        }
        let mut replies = Vec::with_capacity(tickets.len());
        for t in tickets {
            replies.push(self.finish(t).await?);
        }
        match replies.iter().find(|r| error_text(r).is_some()) {
            Some(e) => Err(Error::NodeReply(e.clone())),
            None => Ok(replies),
        }
    }

    /// Points one slot at its new owner right away, before the full refresh lands.
    fn apply_moved(&self, slot: u16, addr: &str) {
        let node = self.node(addr);
        let mut guard = self.topo.write().unwrap_or_else(|p| p.into_inner());
        let Some(old) = guard.as_ref() else { return };
        let mut masters = old.masters.clone();
        let idx = match masters.iter().position(|m| m.addr == node.addr) {
            Some(i) => i,
            None => {
                masters.push(node);
                masters.len() - 1
            }
        };
        let mut slots = old.slots.clone();
        if let Some(s) = slots.get_mut(slot as usize) {
            *s = idx as u16;
        }
        *guard = Some(Arc::new(Topology {
            mode: old.mode,
            slots,
            masters,
            refreshed_at: old.refreshed_at,
        }));
        drop(guard);
        if let Some(l1) = &self.tracking {
            // The slot's keys now live on a node whose tracking has never seen our reads.
            l1.flush_unsure("slot moved");
        }
    }

    pub(crate) fn install(&self, topo: Topology) {
        let mut guard = self.topo.write().unwrap_or_else(|p| p.into_inner());
        let changed = match guard.as_ref() {
            None => false,
            Some(old) => {
                old.mode != topo.mode
                    || old.slots.iter().zip(&topo.slots).any(|(a, b)| {
                        let a = old.masters.get(*a as usize).map(|n| &n.addr);
                        let b = topo.masters.get(*b as usize).map(|n| &n.addr);
                        a != b
                    })
            }
        };
        // Nodes that are no longer masters go, with their connections (requests in
        // flight keep theirs alive until they finish; a later MOVED re-creates a node).
        {
            let keep: std::collections::HashSet<&str> =
                topo.masters.iter().map(|n| &*n.addr).collect();
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.retain(|addr, _| keep.contains(addr.as_str()));
        }
        *guard = Some(Arc::new(topo));
        drop(guard);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        if changed {
            tracing::info!("topology changed");
            if let Some(l1) = &self.tracking {
                l1.flush_unsure("topology changed");
            }
        }
    }

    pub(crate) fn install_table(&self, table: CommandTable, facts: ServerFacts) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(table));
        *self.facts.write().unwrap_or_else(|p| p.into_inner()) = facts;
    }

    /// For requests on pinned connections, which follow redirects themselves: the node
    /// a MOVED or ASK reply points to, and whether ASKING must precede the retry. A
    /// MOVED also updates the slot map.
    pub fn redirected(&self, reply: &[u8]) -> Option<(Arc<Node>, bool)> {
        match Redirect::parse(reply)? {
            Redirect::Moved { slot, addr } => {
                self.apply_moved(slot, &addr);
                self.request_refresh();
                Some((self.node(&addr), false))
            }
            Redirect::Ask { addr } => Some((self.node(&addr), true)),
            Redirect::TryAgain => None,
        }
    }

    pub fn resolve_target(&self, target: &Target) -> Result<Arc<Node>, Error> {
        self.resolve(target)
    }
}

enum Redirect {
    Moved { slot: u16, addr: String },
    Ask { addr: String },
    TryAgain,
}

impl Redirect {
    fn parse(reply: &[u8]) -> Option<Redirect> {
        if reply.first() != Some(&b'-') {
            return None;
        }
        let text = error_text(reply)?;
        let mut parts = text.split(' ');
        match parts.next()? {
            "MOVED" => {
                let slot = parts.next()?.parse().ok()?;
                let addr = parts.next()?.to_string();
                Some(Redirect::Moved { slot, addr })
            }
            "ASK" => {
                let _slot = parts.next()?;
                Some(Redirect::Ask {
                    addr: parts.next()?.to_string(),
                })
            }
            "TRYAGAIN" => Some(Redirect::TryAgain),
            _ => None,
        }
    }
}

/// Whether a request failed without having been sent because its node is unreachable,
/// or because the cluster is failing over (CLUSTERDOWN): safe to send again.
fn unavailable(e: &Error) -> bool {
    match e {
        Error::Upstream { source, .. } => matches!(
            source,
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_)
        ),
        Error::Redis(m) => m.starts_with("CLUSTERDOWN"),
        _ => false,
    }
}

/// The hash slot of a key, honouring `{hash tags}` (Redis's `keyHashSlot`): the part
/// between the first `{` and the first `}` after it, when that part is not empty.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) & 0x3FFF
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as Redis Cluster hashes keys.
fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

const CRC16_TABLE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn key_slots_are_redis_cluster_slots() {
        // CLUSTER KEYSLOT on Redis 7.0.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b""), 0);
        // The tag rule, on top of that known CRC (0x31C3 for "123456789").
        assert_eq!(key_slot(b"user:{123456789}:name"), 12739);
        assert_eq!(key_slot(b"{123456789}{other}"), 12739);
        assert_eq!(key_slot(b"{{123456789}"), key_slot(b"{123456789"));
        for whole in [
            &b"foo{}{123456789}"[..],
            b"{unclosed123456789",
            b"}123456789{",
        ] {
            // An empty or unclosed tag: the whole key is hashed.
            assert_eq!(key_slot(whole), super::crc16(whole) & 0x3FFF, "{whole:?}");
            assert_ne!(key_slot(whole), 12739, "{whole:?}");
        }
        // Against an independent implementation, over keys full of braces.
        let alphabet = b"{}ab\x00\xff";
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 12) as usize;
            let key: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i * 5)) % alphabet.len() as u64) as usize])
                .collect();
            assert_eq!(
                key_slot(&key),
                redis_protocol::redis_keyslot(&key),
                "{key:?}"
            );
        }
    }
}
