//! SIGHUP: reload the config file and apply the settings that can change under running
//! connections: the log level, L1 sizes, TTLs and admission, the spill threshold, the
//! front end's users and passwords, and the slow log. Everything else is compared and
//! logged as needing a restart; a file that fails to load or validate changes nothing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use crate::config::{Config, L1Config};
use crate::error::StartError;
use crate::Proxy;

/// Loads the config again as at start-up (same file, environment and command line).
pub type Loader = Box<dyn Fn() -> Result<Config, StartError> + Send + Sync>;
/// Swaps the log filter (installed by the binary, which owns the subscriber).
pub type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_RELOADER: OnceLock<LogReloader> = OnceLock::new();

pub fn set_log_reloader(f: LogReloader) {
    let _ = LOG_RELOADER.set(f);
}

/// What one reload did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub applied: Vec<&'static str>,
    pub needs_restart: Vec<&'static str>,
}

/// Waits for SIGHUP and reloads, until the process ends.
pub async fn on_sighup(px: Arc<Proxy>, load: Loader) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGHUP handler; config reload disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match load() {
            Ok(cfg) => {
                let out = apply(&px, cfg);
                crate::metrics::RELOADS_OK.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    applied = ?out.applied,
                    needs_restart = ?out.needs_restart,
                    "SIGHUP: configuration reloaded"
                );
                if !out.needs_restart.is_empty() {
                    tracing::warn!(
                        settings = ?out.needs_restart,
                        "SIGHUP: these settings changed in the file but only take effect after a restart"
                    );
                }
            }
            Err(e) => {
                crate::metrics::RELOADS_FAILED.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
            }
        }
    }
}

/// `base` with the L1 settings a reload applies taken from `from` (the rest of L1's
/// settings need a restart).
fn with_live_l1(base: &L1Config, from: &L1Config) -> L1Config {
    L1Config {
        max_bytes: from.max_bytes,
        max_entries: from.max_entries,
        max_value_bytes: from.max_value_bytes,
        default_ttl_ms: from.default_ttl_ms,
        max_ttl_ms: from.max_ttl_ms,
        admit_after_reads: from.admit_after_reads,
        admit_window_ms: from.admit_window_ms,
        refresh_ahead_ratio: from.refresh_ahead_ratio,
        refresh_ahead_min_reads: from.refresh_ahead_min_reads,
        ..base.clone()
    }
}

/// Applies `new` over the running config; returns what changed.
pub fn apply(px: &Proxy, new: Config) -> Outcome {
    let old = px.config();
    let mut out = Outcome::default();
    // What is in effect afterwards: the old config with the applied settings replaced.
    let mut live = (*old).clone();

    if old.log.level != new.log.level {
        match LOG_RELOADER.get().map(|f| f(&new.log.level)) {
            Some(Ok(())) => {
                live.log.level = new.log.level.clone();
                out.applied.push("log.level");
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "log.level not reloaded");
                out.needs_restart.push("log.level");
            }
            None => out.needs_restart.push("log.level"),
        }
    }
    if old.log.format != new.log.format {
        out.needs_restart.push("log.format");
    }

    let reloaded = with_live_l1(&old.l1, &new.l1);
    if reloaded != old.l1 {
        match &px.l1 {
            Some(l1) => {
                let resized = l1.reconfigure(&new.l1);
                live.l1 = reloaded;
                out.applied.push(if resized {
                    "l1 (sizes: cache emptied, TTLs, admission)"
                } else {
                    "l1 (TTLs, value limit, admission, refresh-ahead)"
                });
            }
            None => out.needs_restart.push("l1 (disabled at start)"),
        }
    }
    if with_live_l1(&new.l1, &old.l1) != old.l1 {
        out.needs_restart
            .push("l1 (enabled, coherence, invalidation_channel, serve_stale_on_error, refresh_ahead_concurrency, warming)");
    }

    if old.l3.threshold_bytes != new.l3.threshold_bytes {
        match &px.spill {
            Some(sp) => {
                sp.set_threshold(new.l3.threshold_bytes);
                live.l3.threshold_bytes = new.l3.threshold_bytes;
                out.applied.push("l3.threshold_bytes");
            }
            None => out.needs_restart.push("l3 (disabled at start)"),
        }
    }
    let mut l3_rest = new.l3.clone();
    l3_rest.threshold_bytes = old.l3.threshold_bytes;
    if l3_rest != old.l3 {
        out.needs_restart
            .push("l3 (store, keys, compression, sweep)");
    }

    if old.auth != new.auth {
        px.auth.reload(&new.auth);
        live.auth = new.auth.clone();
        out.applied.push("auth (users and passwords)");
    }
    if old.slowlog != new.slowlog {
        px.slowlog.configure(&new.slowlog);
        live.slowlog = new.slowlog.clone();
        out.applied.push("slowlog");
    }

    // Certificates are re-read on every reload (rotation keeps the same paths).
    match (&px.front_tls, new.tls.enabled() == old.tls.enabled()) {
        (Some(tls), true) => match tls.reload(&new.tls) {
            Ok(()) => {
                live.tls = crate::config::TlsConfig {
                    handshake_timeout_ms: old.tls.handshake_timeout_ms,
                    ..new.tls.clone()
                };
                out.applied.push("tls (certificate, key, client CA)");
                if new.tls.handshake_timeout_ms != old.tls.handshake_timeout_ms {
                    out.needs_restart.push("tls.handshake_timeout_ms");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; keeping the running ones");
            }
        },
        (None, true) => {}
        (_, false) => out.needs_restart.push("tls (turning TLS on or off)"),
    }

    for (name, changed) in [
        ("listen", old.listen != new.listen),
        ("namespace", old.namespace != new.namespace),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("worker_threads", old.worker_threads != new.worker_threads),
        (
            "shutdown_timeout_ms",
            old.shutdown_timeout_ms != new.shutdown_timeout_ms,
        ),
        ("upstream", old.upstream != new.upstream),
        ("client", old.client != new.client),
        ("metrics", old.metrics != new.metrics),
    ] {
        if changed {
            out.needs_restart.push(name);
        }
    }
    *px.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
    out
}
