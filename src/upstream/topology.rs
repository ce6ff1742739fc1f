//! Control plane: discovers whether the upstream is a cluster or one server, loads the
//! command table from it, and keeps the slot map current.
//!
//! The slot map comes from fred's cached cluster state (`sync_cluster` +
//! `cached_cluster_state`); fred owns reconnecting to the cluster for discovery. A refresh
//! runs periodically and soon after any redirect or lost connection (coalesced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::{ClientLike, ClusterInterface};
use fred::types::config::{ClusterDiscoveryPolicy, Config as FredConfig, ServerConfig};

use super::conn::PipeConn;
use super::{Mode, ServerFacts, Topology, Upstream, SLOTS};
use crate::parse::reply::as_str;
use crate::parse::table::CommandTable;
use crate::respond::{command_bytes, Proto};

/// Wait between attempts while the upstream has never been reached.
const RETRY_UNKNOWN: Duration = Duration::from_millis(500);
/// Refreshes asked for by redirects are coalesced over this window.
const REFRESH_DEBOUNCE: Duration = Duration::from_millis(50);

/// Runs forever (the task is dropped at shutdown).
pub async fn run(up: Arc<Upstream>) {
    let mut state = State {
        mode: None,
        fred: None,
    };
    loop {
        match refresh(&up, &mut state).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "topology refresh failed");
                up.set_last_error(e);
            }
        }
        let wait = if up.topology().is_ok() {
            up.settings.refresh_interval
        } else {
            RETRY_UNKNOWN
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = up.refresh.notified() => tokio::time::sleep(REFRESH_DEBOUNCE).await,
        }
    }
}

struct State {
    mode: Option<Mode>,
    fred: Option<fred::clients::Client>,
}

async fn refresh(up: &Arc<Upstream>, st: &mut State) -> Result<(), String> {
    if st.mode.is_none() || up.table().is_none() {
        let (mode, table, facts) = probe(up).await?;
        tracing::info!(
            mode = ?mode,
            commands = table.len(),
            redis_version = %facts.redis_version,
            "upstream discovered"
        );
        up.install_table(table, facts);
        st.mode = Some(mode);
    }
    match st.mode {
        Some(Mode::Standalone) => {
            if up.topology().is_err() {
                let node = up.node(&up.seeds[0]);
                up.install(Topology {
                    mode: Mode::Standalone,
                    slots: vec![0; SLOTS],
                    masters: vec![node],
                    refreshed_at: Instant::now(),
                });
            }
            Ok(())
        }
        Some(Mode::Cluster) => refresh_cluster(up, st).await,
        None => Err("upstream mode unknown".into()),
    }
}

/// Asks the first reachable seed what it is, and for its command table.
async fn probe(up: &Upstream) -> Result<(Mode, CommandTable, ServerFacts), String> {
    let mut errors = Vec::new();
    for addr in &up.seeds {
        match probe_one(up, addr).await {
            Ok(r) => return Ok(r),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(format!("no seed reachable ({})", errors.join("; ")))
}

async fn probe_one(up: &Upstream, addr: &str) -> Result<(Mode, CommandTable, ServerFacts), String> {
    let s = &up.settings;
    let conn = PipeConn::connect(
        addr,
        Proto::Resp2,
        &s.handshake,
        s.connect_timeout,
        Default::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let ask = |args: &[&str]| {
        let rx = conn.send(command_bytes(args), 0);
        async move {
            let rx = rx.map_err(|e| e.to_string())?;
            match tokio::time::timeout(s.request_timeout, rx).await {
                Ok(Ok(Ok(r))) => Ok(r),
                Ok(Ok(Err(e))) => Err(e.to_string()),
                Ok(Err(_)) => Err("connection lost".to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }
    };
    let info = ask(&["INFO", "everything"]).await?;
    let info = String::from_utf8_lossy(as_str(&info).ok_or("INFO: unexpected reply")?).into_owned();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    let mode = if field("cluster_enabled").as_deref() == Some("1") {
        Mode::Cluster
    } else {
        Mode::Standalone
    };
    let facts = ServerFacts {
        redis_version: field("redis_version").unwrap_or_else(|| "7.0.0".into()),
    };
    let reply = ask(&["COMMAND"]).await?;
    let table = CommandTable::from_command_reply(&reply)?;
    Ok((mode, table, facts))
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.to_string(), p.parse().ok()?))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn refresh_cluster(up: &Arc<Upstream>, st: &mut State) -> Result<(), String> {
    let s = &up.settings;
    let deadline = s.connect_timeout + s.request_timeout;
    if st.fred.is_none() {
        // Known masters first: after a failover the seeds may be the dead ones.
        let mut hosts: Vec<(String, u16)> = Vec::new();
        if let Ok(t) = up.topology() {
            hosts.extend(t.masters.iter().filter_map(|m| split_host_port(&m.addr)));
        }
        hosts.extend(up.seeds.iter().filter_map(|a| split_host_port(a)));
        hosts.dedup();
        let mut server = ServerConfig::new_clustered(hosts);
        if let ServerConfig::Clustered { policy, .. } = &mut server {
            *policy = ClusterDiscoveryPolicy::UseCache;
        }
        let config = FredConfig {
            server,
            username: s.handshake.username.clone(),
            password: s.handshake.password.clone(),
            fail_fast: true,
            ..Default::default()
        };
        let client = fred::types::Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = s.connect_timeout;
                c.internal_command_timeout = s.request_timeout;
                c.max_command_attempts = 2;
            })
            .build()
            .map_err(|e| format!("fred client: {e}"))?;
        match tokio::time::timeout(deadline, client.init()).await {
            Ok(Ok(_task)) => st.fred = Some(client),
            Ok(Err(e)) => return Err(format!("cluster discovery: {e}")),
            Err(_) => return Err("cluster discovery timed out".into()),
        }
    }
    let Some(client) = st.fred.as_ref() else {
        return Err("cluster discovery client missing".into());
    };
    let synced = tokio::time::timeout(deadline, client.sync_cluster()).await;
    let state = match synced {
        Ok(Ok(())) => client.cached_cluster_state(),
        Ok(Err(e)) => {
            drop_fred(st);
            return Err(format!("CLUSTER SLOTS: {e}"));
        }
        Err(_) => {
            drop_fred(st);
            return Err("CLUSTER SLOTS timed out".into());
        }
    };
    let Some(routing) = state else {
        drop_fred(st);
        return Err("cluster state unavailable".into());
    };
    let mut slots = vec![u16::MAX; SLOTS];
    let mut masters: Vec<Arc<super::Node>> = Vec::new();
    for range in routing.slots() {
        let addr = join_host_port(&range.primary.host, range.primary.port);
        let idx = match masters.iter().position(|m| *m.addr == *addr) {
            Some(i) => i,
            None => {
                masters.push(up.node(&addr));
                masters.len() - 1
            }
        };
        for s in range.start..=range.end.min(SLOTS as u16 - 1) {
            slots[s as usize] = idx as u16;
        }
    }
    if masters.is_empty() {
        return Err("cluster reports no slots assigned".into());
    }
    up.install(Topology {
        mode: Mode::Cluster,
        slots,
        masters,
        refreshed_at: Instant::now(),
    });
    Ok(())
}

fn drop_fred(st: &mut State) {
    if let Some(client) = st.fred.take() {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), client.quit()).await;
        });
    }
}
