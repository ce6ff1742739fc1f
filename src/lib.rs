//! tierproxy: a Redis-protocol proxy that looks like one ordinary Redis server and
//! forwards to a Redis Cluster (or one standalone server).
//!
//! # The life of a request
//!
//! 1. [`client`] accepts a connection (bounded by `maxclients`) and keeps its
//!    [`client::session::Session`]: protocol version, authentication, name, reply mode.
//! 2. [`parse::request`] cuts complete RESP or inline commands off the read buffer,
//!    zero-copy, with Redis's own limits and `Protocol error` replies.
//! 3. [`route::dispatch`] classifies the command from the [`parse::table`] (built from
//!    the backend's `COMMAND` reply, with tierproxy's policy overlay) and either answers
//!    it locally (PING, HELLO, CLIENT, CONFIG GET, CLUSTER, INFO), forwards it to the owner
//!    of its keys' slot, splits it across slots and merges (MGET, MSET, DEL, …), or fans it
//!    out to every master (SCAN, DBSIZE, KEYS, FLUSHALL).
//!    Cacheable reads of hot keys are answered from [`l1`] when it holds them; every
//!    write invalidates its keys there before its reply goes out.
//! 4. [`upstream`] queues the original bytes on a pipelined connection to the node
//!    (`start`), and later waits for the raw reply (`finish`), following MOVED/ASK.
//!    [`upstream::topology`] keeps the slot map current (`CLUSTER SLOTS`).
//! 5. [`respond`] encodes local replies in the client's protocol; forwarded replies go
//!    back as the upstream sent them, in request order, one write per batch.

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod error;
pub mod l1;
pub mod metrics;
pub mod net;
pub mod parse;
pub mod reload;
pub mod respond;
pub mod route;
pub mod slowlog;
pub mod spill;
pub mod upstream;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use config::Config;
use error::StartError;

/// Counters behind INFO stats (and, later, the metrics endpoint).
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub rejected: AtomicU64,
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
}

impl Stats {
    /// CONFIG RESETSTAT.
    pub fn reset(&self) {
        for c in [
            &self.connections,
            &self.rejected,
            &self.commands,
            &self.errors,
            &self.auth_failures,
            &self.protocol_errors,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Everything a connection needs, shared.
pub struct Proxy {
    /// The configuration at start-up: what settings that need a restart are read from.
    pub cfg: Config,
    /// The configuration in effect, with reloaded settings applied (SIGHUP).
    pub live: std::sync::RwLock<Arc<Config>>,
    pub upstream: Arc<upstream::Upstream>,
    /// The hot-key cache, when `l1.enabled`.
    pub l1: Option<Arc<l1::L1>>,
    /// The large-value spill, when `l3.enabled`.
    pub spill: Option<Arc<spill::Spill>>,
    pub clients: client::session::Registry,
    pub auth: client::auth::Auth,
    pub stats: Stats,
    pub started: Instant,
    pub local_port: AtomicU16,
    pub draining: AtomicBool,
    /// Start-up L1 warming still running with `l1.warm_before_ready`: not ready yet.
    pub warming: AtomicBool,
    /// Client connections being served right now (for the shutdown drain).
    pub active: AtomicUsize,
    /// Prometheus registry handle (`None` if another recorder was installed first).
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Script bodies seen, to heal NOSCRIPT after a failover.
    pub scripts: route::scripts::ScriptCache,
    pub slowlog: slowlog::SlowLog,
    /// TLS on the client listener, when `tls.cert_file` is set.
    pub front_tls: Option<client::tls::FrontTls>,
}

impl Proxy {
    /// The configuration in effect now (reloadable settings included).
    pub fn config(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Start-up warming (`l1.warm_keys`, `l1.warm_patterns`) in the background, once the
/// topology is known. With `l1.warm_before_ready`, `/readyz` waits for it.
fn start_warming(px: &Arc<Proxy>) {
    let (Some(l1), c) = (px.l1.clone(), &px.cfg.l1) else {
        return;
    };
    if c.warm_keys.is_empty() && c.warm_patterns.is_empty() {
        return;
    }
    // Configured keys are the clients' keys: in the configured namespace.
    let ns = px.cfg.namespace.as_bytes();
    let keys = c
        .warm_keys
        .iter()
        .map(|k| bytes::Bytes::from([ns, k.as_bytes()].concat()))
        .collect();
    let patterns = c
        .warm_patterns
        .iter()
        .map(|p| route::namespace::pattern_in(ns, p.as_bytes()))
        .collect();
    px.warming.store(c.warm_before_ready, Ordering::Release);
    let px = px.clone();
    tokio::spawn(async move {
        while px.upstream.topology().is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let started = Instant::now();
        let n = route::cache::warm(px.clone(), l1, keys, patterns).await;
        px.warming.store(false, Ordering::Release);
        tracing::info!(
            replies = n,
            took_ms = started.elapsed().as_millis() as u64,
            "L1 warming done"
        );
    });
}

/// Binds, serves until `shutdown` resolves, drains, and returns. With a `reload`
/// loader, SIGHUP re-reads the configuration (see [`reload`]).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    reload: Option<reload::Loader>,
) -> Result<(), StartError> {
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.listen.clone(),
        source,
    })?;
    let admin = if cfg.admin_listen.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(&cfg.admin_listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: cfg.admin_listen.clone(),
                    source,
                })?,
        )
    };

    let front_tls = match cfg.tls.enabled() {
        true => Some(client::tls::FrontTls::new(&cfg.tls).map_err(StartError::Config)?),
        false => None,
    };
    let l1 = cfg.l1.enabled.then(|| Arc::new(l1::L1::new(&cfg.l1)));
    let spill = match cfg.l3.enabled {
        true => Some(Arc::new(spill::Spill::new(&cfg.l3).await?)),
        false => None,
    };
    let upstream = upstream::Upstream::new(&cfg, l1.clone()).map_err(StartError::Config)?;
    let px = Arc::new(Proxy {
        l1,
        spill,
        auth: client::auth::Auth::new(&cfg.auth),
        upstream: upstream.clone(),
        clients: Default::default(),
        stats: Stats::default(),
        started: Instant::now(),
        local_port: AtomicU16::new(local.port()),
        draining: AtomicBool::new(false),
        warming: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        prometheus: metrics::install(),
        scripts: Default::default(),
        slowlog: slowlog::SlowLog::new(&cfg.slowlog),
        front_tls,
        live: std::sync::RwLock::new(Arc::new(cfg.clone())),
        cfg,
    });
    let sweeper = px
        .spill
        .clone()
        .filter(|_| px.cfg.l3.sweep_interval_secs > 0)
        .map(|sp| {
            let l3 = &px.cfg.l3;
            tokio::spawn(spill::sweep::background(
                upstream.clone(),
                sp,
                Duration::from_secs(l3.sweep_interval_secs),
                Duration::from_secs(l3.sweep_grace_secs),
                l3.sweep_keys_per_sec,
            ))
        });
    let topo_task = tokio::spawn(upstream::topology::run(upstream));
    start_warming(&px);
    let admin_task = admin.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "admin listening");
            println!("tierproxy admin listening on {a}");
        }
        tokio::spawn(admin::serve(px.clone(), l))
    });

    let reload_task = reload.map(|load| tokio::spawn(reload::on_sighup(px.clone(), load)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let accept = tokio::spawn(client::accept_loop(px.clone(), listener, stop_rx));
    tracing::info!(addr = %local, "listening");
    // The one line scripts and tests wait for; logs go to stderr.
    println!("tierproxy listening on {local}");

    shutdown.await;
    tracing::info!("shutting down: draining client connections");
    px.draining.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = accept.await;
    let deadline = Instant::now() + Duration::from_millis(px.cfg.shutdown_timeout_ms);
    while px.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = px.active.load(Ordering::Acquire);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain deadline reached; closing remaining connections"
        );
    }
    topo_task.abort();
    if let Some(t) = reload_task {
        t.abort();
    }
    if let Some(t) = admin_task {
        t.abort();
    }
    if let Some(t) = sweeper {
        t.abort();
    }
    Ok(())
}

/// `tierproxy sweep [--dry-run]`: two mark-and-sweep passes (an object is deleted only if
/// both found it unreferenced and older than the grace period), then exit.
pub async fn sweep(cfg: Config, dry_run: bool) -> Result<spill::sweep::Report, StartError> {
    if !cfg.l3.enabled {
        return Err(StartError::Config(
            "l3.enabled: the spill is not enabled".into(),
        ));
    }
    let upstream = upstream::Upstream::new(&cfg, None).map_err(StartError::Config)?;
    let topo = tokio::spawn(upstream::topology::run(upstream.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream.topology().is_err() {
        if Instant::now() > deadline {
            topo.abort();
            return Err(StartError::Upstream(upstream.last_error()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sp = spill::Spill::new(&cfg.l3).await?;
    let l3 = &cfg.l3;
    let grace = Duration::from_secs(l3.sweep_grace_secs);
    let run = async {
        let (_, first) =
            spill::sweep::pass(&upstream, &sp, grace, l3.sweep_keys_per_sec, None, true).await?;
        let (report, _) = spill::sweep::pass(
            &upstream,
            &sp,
            grace,
            l3.sweep_keys_per_sec,
            Some(&first),
            dry_run,
        )
        .await?;
        Ok::<_, error::Error>(report)
    };
    let result = run.await.map_err(|e| StartError::Upstream(e.to_string()));
    topo.abort();
    result
}
