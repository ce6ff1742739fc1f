//! Control plane: discovers whether the upstream is a cluster or one server, loads the
//! command table from it, and keeps the slot map current.
//!
//! The slot map comes from `CLUSTER SLOTS`, asked on one control connection (the same
//! pipelined connection type as the data path, so TLS and authentication are the data
//! path's too), to the known masters first and then the seeds. A refresh runs
//! periodically and soon after any redirect or lost connection (coalesced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_protocol::resp2::types::OwnedFrame as F;

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
        ctl: None,
    };
    loop {
        match refresh(&up, &mut state).await {
            Ok(()) => up.set_reachable(true),
            Err(e) => {
                tracing::warn!(error = %e, "topology refresh failed");
                up.set_reachable(false);
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
    /// The control connection (cluster mode), with the address it reached.
    ctl: Option<(String, PipeConn)>,
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

/// Sends one command on the control connection and waits for its reply.
async fn ask(up: &Upstream, conn: &PipeConn, args: &[&str]) -> Result<bytes::Bytes, String> {
    let rx = conn
        .send(command_bytes(args), 0)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(up.settings.request_timeout, rx).await {
        Ok(Ok(Ok(r))) => Ok(r),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(_)) => Err("connection lost".to_string()),
        Err(_) => {
            conn.kill();
            Err("timed out".to_string())
        }
    }
}

/// One `CLUSTER SLOTS` row's master: (first slot, last slot, host, port).
type SlotRange = (u16, u16, String, u16);

/// Parses a RESP2 `CLUSTER SLOTS` reply. An empty host (or `?`, an unknown endpoint)
/// means the node that answered, `asked`.
pub fn parse_cluster_slots(reply: &[u8], asked: &str) -> Result<Vec<SlotRange>, String> {
    if let Some(e) = crate::parse::reply::error_text(reply) {
        return Err(e);
    }
    let (frame, _) = redis_protocol::resp2::decode::decode(reply)
        .map_err(|e| format!("CLUSTER SLOTS reply: {e:?}"))?
        .ok_or("CLUSTER SLOTS reply incomplete")?;
    let F::Array(rows) = frame else {
        return Err("CLUSTER SLOTS reply is not an array".into());
    };
    let asked_host = split_host_port(asked).map(|(h, _)| h).unwrap_or_default();
    let int = |f: &F| match f {
        F::Integer(i) => Some(*i),
        _ => None,
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let F::Array(items) = row else {
            return Err("CLUSTER SLOTS row is not an array".into());
        };
        let (Some(start), Some(end), Some(F::Array(master))) = (
            items.first().and_then(int),
            items.get(1).and_then(int),
            items.get(2),
        ) else {
            return Err("CLUSTER SLOTS row is malformed".into());
        };
        let host = match master.first() {
            Some(F::BulkString(b)) | Some(F::SimpleString(b)) => {
                String::from_utf8_lossy(b).into_owned()
            }
            _ => return Err("CLUSTER SLOTS master has no host".into()),
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.clone()
        } else {
            host
        };
        let port = master
            .get(1)
            .and_then(int)
            .ok_or("CLUSTER SLOTS master has no port")?;
        if !(0..SLOTS as i64).contains(&start)
            || !(start..SLOTS as i64).contains(&end)
            || !(1..=65535).contains(&port)
        {
            return Err(format!(
                "CLUSTER SLOTS row out of range: {start}-{end} port {port}"
            ));
        }
        out.push((start as u16, end as u16, host, port as u16));
    }
    Ok(out)
}

async fn refresh_cluster(up: &Arc<Upstream>, st: &mut State) -> Result<(), String> {
    let s = &up.settings;
    if st.ctl.as_ref().is_some_and(|(_, c)| c.is_closed()) {
        st.ctl = None;
    }
    if st.ctl.is_none() {
        // Known masters first: after a failover the seeds may be the dead ones.
        let mut candidates: Vec<String> = Vec::new();
        if let Ok(t) = up.topology() {
            candidates.extend(t.masters.iter().map(|m| m.addr.to_string()));
        }
        for seed in up.seeds.iter() {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut errors = Vec::new();
        for addr in candidates {
            match PipeConn::connect(
                &addr,
                Proto::Resp2,
                &s.handshake,
                s.connect_timeout,
                Default::default(),
            )
            .await
            {
                Ok(c) => {
                    st.ctl = Some((addr, c));
                    break;
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        if st.ctl.is_none() {
            return Err(format!("no cluster node reachable ({})", errors.join("; ")));
        }
    }
    let Some((asked, conn)) = st.ctl.as_ref() else {
        return Err("cluster control connection missing".into());
    };
    let reply = match ask(up, conn, &["CLUSTER", "SLOTS"]).await {
        Ok(r) => r,
        Err(e) => {
            st.ctl = None;
            return Err(format!("CLUSTER SLOTS: {e}"));
        }
    };
    let ranges = match parse_cluster_slots(&reply, asked) {
        Ok(r) => r,
        Err(e) => {
            // A node that is not serving (CLUSTERDOWN, LOADING): ask another next time.
            st.ctl = None;
            return Err(format!("CLUSTER SLOTS: {e}"));
        }
    };
    let mut slots = vec![u16::MAX; SLOTS];
    let mut masters: Vec<Arc<super::Node>> = Vec::new();
    for (start, end, host, port) in ranges {
        let addr = join_host_port(&host, port);
        let idx = match masters.iter().position(|m| *m.addr == *addr) {
            Some(i) => i,
            None => {
                masters.push(up.node(&addr));
                masters.len() - 1
            }
        };
        for s in start..=end {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_slots_rows() {
        let reply = b"*2\r\n*4\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7001\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7004\r\n$2\r\nir\r\n*3\r\n:5461\r\n:16383\r\n*3\r\n$0\r\n\r\n:7002\r\n$2\r\nid\r\n";
        let rows = parse_cluster_slots(reply, "10.0.0.9:7002").unwrap();
        assert_eq!(
            rows,
            vec![
                (0, 5460, "127.0.0.1".to_string(), 7001),
                (5461, 16383, "10.0.0.9".to_string(), 7002)
            ]
        );
        assert!(
            parse_cluster_slots(b"-CLUSTERDOWN The cluster is down\r\n", "a:1")
                .unwrap_err()
                .contains("CLUSTERDOWN")
        );
        assert!(parse_cluster_slots(
            b"*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            "a:1"
        )
        .is_err());
    }
}
