//! Integration-test harness: real Redis servers and clusters, a running `tierproxy`, and a raw
//! RESP client.
//!
//! Only the standard library is used, so the harness adds nothing to the dependency graph and
//! behaves the same in every test binary that declares `mod support;`.
//!
//! # Process hygiene
//!
//! Tests panic, and `static` fixtures (see [`shared_cluster`]) are never dropped, so `Drop` alone
//! cannot guarantee that Redis processes go away. Every `redis-server` is therefore started by a
//! small bash watchdog (see [`WATCHDOG_SCRIPT`]) that kills the server and deletes its temp dir as
//! soon as the test process is gone. `Drop` still kills everything eagerly, so a long test binary
//! does not accumulate servers.
//!
//! # Ports
//!
//! Redis needs fixed ports (a cluster advertises them to its peers), so ports are chosen at
//! random below the kernel's ephemeral range, checked by binding, never handed out twice within
//! one process, and a server that loses a port race is restarted on another port.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a single `redis-server` may take to log that it is ready. Generous because CI
/// machines are slow and several test binaries may start servers at once.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports a server may try before we conclude the failure is not a port race.
const SERVER_START_ATTEMPTS: usize = 5;
/// Upper bound for `redis-cli --cluster create`, which waits forever if the bus is unreachable.
const CLUSTER_CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a freshly created cluster may take until every node agrees on the topology.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Passed to every cluster node; short so that failover tests finish quickly.
const CLUSTER_NODE_TIMEOUT_MS: &str = "3000";
/// Redis derives the cluster bus port from the client port with this fixed offset.
const CLUSTER_BUS_OFFSET: u16 = 10_000;
const CLUSTER_SLOT_COUNT: u32 = 16_384;
/// Client ports are drawn from this range so that both the port and its bus port stay below
/// Linux's default ephemeral range (32768..), where the kernel would hand them to outgoing
/// connections and `bind(0)` listeners (such as the proxy's) behind our back.
const PORT_RANGE: (u16, u16) = (10_000, 22_767);
/// Logged by `redis-server` only after its listeners are bound. Seeing it in *our* log file is
/// what proves the server on the port is ours and not one from a parallel test binary.
const READY_MARKER: &[u8] = b"Ready to accept connections";
/// Short timeouts for the harness's own probes, which are retried by their callers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const PROXY_START_TIMEOUT: Duration = Duration::from_secs(30);
const PROXY_LISTENING_PREFIX: &str = "tierproxy listening on ";
const OUTPUT_TAIL_LINES: usize = 200;
const LOG_TAIL_LINES: usize = 40;

const RESP_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The wait both supervisors share: while `$target` lives, poll every 0.5 s (`read -t`,
/// which forks nothing) for the test process `$test_pid` going away, seen as EOF on stdin (a
/// pipe only the test process holds) or its pid gone; `orphaned` says which ended the wait.
macro_rules! orphan_wait {
    () => {
        r#"
orphaned=
while kill -0 "$target" 2>/dev/null; do
    if ! kill -0 "$test_pid" 2>/dev/null; then
        orphaned=1
        break
    fi
    read -r -t 0.5 _
    status=$?
    if [ "$status" -ne 0 ] && [ "$status" -le 128 ]; then
        orphaned=1
        break
    fi
done
"#
    };
}

/// Supervises one server process (positional parameters: test pid, server dir, the command
/// and its args): `redis-server`, or the S3-compatible server.
///
/// It prints the server's pid so `Drop` can kill the server itself (killing only bash would
/// orphan it), then waits until either side goes away:
/// * the server exits (startup failure or a deliberate kill): the watchdog exits too, which lets
///   the harness notice a failed start via `try_wait` and keeps the log for the panic message;
/// * the test process is gone, detected both by EOF on stdin (a pipe whose write end only the
///   test process holds; std opens it close-on-exec) and by polling the pid: the watchdog
///   SIGKILLs the server and deletes the temp dir that the never-dropped statics leave behind.
///
/// `read -t` doubles as the poll interval, so the loop forks nothing while idle.
const WATCHDOG_SCRIPT: &str = concat!(
    r#"
test_pid=$1
dir=$2
shift 2
"$@" </dev/null >>"$dir/stdout.log" 2>&1 &
target=$!
echo "$target"
exec >/dev/null
trap 'kill -KILL "$target" 2>/dev/null' EXIT
trap 'exit 1' HUP INT TERM
"#,
    orphan_wait!(),
    r#"
if [ -n "$orphaned" ]; then
    kill -KILL "$target" 2>/dev/null
    wait "$target" 2>/dev/null
    rm -rf "$dir"
fi
"#
);

/// Kills a proxy (positional parameters: test pid, proxy pid) once the test process is gone:
/// proxies shared through statics are never dropped, and would otherwise outlive the test
/// binary, reconnecting to servers that are gone. The test process's death is seen as EOF on
/// stdin (a pipe only it holds) or its pid gone; the reaper exits quietly when the proxy
/// exits first (a drop kills the reaper as well).
const REAPER_SCRIPT: &str = concat!(
    r#"
test_pid=$1
target=$2
"#,
    orphan_wait!(),
    r#"
if [ -n "$orphaned" ]; then
    kill -KILL "$target" 2>/dev/null
fi
"#
);

// ---------------------------------------------------------------------------------------------
// Standalone server
// ---------------------------------------------------------------------------------------------

/// A `redis-server` owned by the test; killed (and its temp dir removed) on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    server_pid: u32,
    watchdog: Child,
    stopped: bool,
}

/// Why a start attempt failed; `port_in_use` decides whether retrying on another port can help.
struct StartFailure {
    port_in_use: bool,
    report: String,
}

impl RedisServer {
    /// Starts a throwaway standalone server with persistence disabled, so tests never wait on
    /// disk and never see data from an earlier run.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// Like [`RedisServer::start`]; `extra` is appended after the harness defaults, so it can
    /// override them (Redis keeps the last value of a repeated option). Keep `--loglevel` at
    /// `notice` or more verbose: readiness is detected from a notice-level log line.
    pub fn start_with_args(extra: &[&str]) -> RedisServer {
        Self::launch(extra, false)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends a signal to the server (`STOP` freezes it with its connections open).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.server_pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {}", self.server_pid);
    }

    /// Starts a server, moving to a fresh port whenever another process won the race for one.
    fn launch(extra: &[&str], cluster: bool) -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..SERVER_START_ATTEMPTS {
            let mut server = Self::spawn(free_port(), extra, cluster);
            match server.wait_ready() {
                Ok(()) => return server,
                Err(failure) if failure.port_in_use => failures.push(failure.report),
                Err(failure) => panic!("{}", failure.report),
            }
        }
        panic!(
            "redis-server lost the port race {SERVER_START_ATTEMPTS} times in a row:\n\n{}",
            failures.join("\n\n")
        );
    }

    fn spawn(port: u16, extra: &[&str], cluster: bool) -> RedisServer {
        let dir = make_temp_dir("redis");
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--dir",
            &path(""),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            // READY_MARKER is logged at notice level.
            "--loglevel",
            "notice",
            "--logfile",
            &path("redis.log"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if cluster {
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &path("nodes.conf"),
                    "--cluster-node-timeout",
                    CLUSTER_NODE_TIMEOUT_MS,
                ]
                .iter()
                .map(|s| s.to_string()),
            );
        }
        args.extend(extra.iter().map(|s| s.to_string()));

        let mut watchdog = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("tierproxy-redis-watchdog")
            .arg(std::process::id().to_string())
            .arg(&dir)
            .arg("redis-server")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn bash to supervise redis-server: {e}"));

        let mut line = String::new();
        let stdout = watchdog.stdout.take().expect("watchdog stdout is piped");
        let read = BufReader::new(stdout).read_line(&mut line);
        let Ok(server_pid) = line.trim().parse::<u32>() else {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            let _ = fs::remove_dir_all(&dir);
            panic!("redis-server watchdog did not report a pid (read {read:?}, got {line:?})");
        };
        RedisServer {
            port,
            dir,
            server_pid,
            watchdog,
            stopped: false,
        }
    }

    /// Waits for our own ready marker (not merely a PING answer, which a foreign server that
    /// grabbed the port would also give), then confirms with a PING.
    fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        let log_path = self.dir.join("redis.log");
        loop {
            if let Ok(Some(_)) = self.watchdog.try_wait() {
                return Err(self.start_failure("redis-server exited during startup"));
            }
            let log = fs::read(&log_path).unwrap_or_default();
            if contains(&log, READY_MARKER) && query(&self.addr(), &["PING"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.start_failure(&format!(
                    "redis-server was not ready within {SERVER_START_TIMEOUT:?}"
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_failure(&self, what: &str) -> StartFailure {
        let log = fs::read(self.dir.join("redis.log")).unwrap_or_default();
        let port_in_use = contains(&log, b"Address already in use");
        StartFailure {
            port_in_use,
            report: format!("{what} (port {}):\n{}", self.port, self.log_tail()),
        }
    }

    /// The end of the server's log and of anything it wrote to stdout/stderr (e.g. bash's
    /// "command not found"), for panic messages.
    fn log_tail(&self) -> String {
        format!(
            "--- {} (tail) ---\n{}\n--- stdout/stderr (tail) ---\n{}",
            self.dir.join("redis.log").display(),
            file_tail(&self.dir.join("redis.log"), LOG_TAIL_LINES),
            file_tail(&self.dir.join("stdout.log"), LOG_TAIL_LINES),
        )
    }

    /// SIGKILLs the server and returns once it is gone. Waiting for the watchdog is what makes
    /// "gone" true: bash reaps the server before it exits, so the port is closed afterwards.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        stop_supervised(&mut self.watchdog, self.server_pid);
    }
}

/// SIGKILLs a watchdog-supervised server and waits for its watchdog, which reaps it first,
/// so the server's port is closed when this returns.
fn stop_supervised(watchdog: &mut Child, server_pid: u32) {
    // A watchdog that has exited has already reaped the server, so its pid may be reused.
    if let Ok(None) = watchdog.try_wait() {
        send_signal("KILL", server_pid);
    }
    // Closing stdin also makes the watchdog exit (and kill the server) if the direct kill
    // failed for some reason.
    drop(watchdog.stdin.take());
    if wait_timeout(watchdog, Duration::from_secs(5)).is_none() {
        let _ = watchdog.kill();
        let _ = watchdog.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One standalone server per test binary, for tests that isolate their keys with [`tag`].
pub fn shared_standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

/// A Redis Cluster of loopback nodes; every node is killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
    replicas_per_master: usize,
}

/// One row of `CLUSTER SLOTS`, normalized so that views from different nodes compare equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SlotRange {
    start: u16,
    end: u16,
    master: String,
    /// Sorted: nodes may list a master's replicas in different orders.
    replicas: Vec<String>,
}

impl RedisCluster {
    /// Starts `masters * (1 + replicas_per_master)` nodes, creates the cluster with `redis-cli`,
    /// and returns only once every node reports `cluster_state:ok`, all nodes agree on
    /// `CLUSTER SLOTS` (all slots, every replica) and every replica's link is up. Tests can then
    /// assume a settled topology instead of retrying MOVED/CLUSTERDOWN themselves.
    pub fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create requires at least 3 masters, asked for {masters}"
        );
        let total = masters * (1 + replicas_per_master);
        // If a later node fails to start, unwinding drops the nodes collected so far.
        let nodes = (0..total).map(|_| RedisServer::launch(&[], true)).collect();
        let cluster = RedisCluster {
            nodes,
            masters,
            replicas_per_master,
        };
        cluster.create();
        cluster.wait_until_settled();
        cluster
    }

    /// Addresses of the nodes that have not been killed: what a client should be seeded with.
    pub fn seeds(&self) -> Vec<String> {
        self.live_nodes().map(RedisServer::addr).collect()
    }

    /// The masters that currently own slots, in slot order, as reported by the first live node
    /// that answers. A killed master stays listed until the cluster has failed over.
    pub fn master_addrs(&self) -> Vec<String> {
        let mut masters: Vec<String> = Vec::new();
        for (_, _, master) in self.slot_owners() {
            if !masters.contains(&master) {
                masters.push(master);
            }
        }
        masters
    }

    /// `(first slot, last slot, master address)` of every slot range, in slot order, as
    /// reported by the first live node that answers (the same view as [`Self::master_addrs`]).
    pub fn slot_owners(&self) -> Vec<(u16, u16, String)> {
        let mut errors = Vec::new();
        for node in self.live_nodes() {
            match query(&node.addr(), &["CLUSTER", "SLOTS"]).and_then(|v| slot_ranges(&v)) {
                Ok(ranges) => {
                    return ranges
                        .into_iter()
                        .map(|r| (r.start, r.end, r.master))
                        .collect();
                }
                Err(e) => errors.push(format!("{}: {e}", node.addr())),
            }
        }
        panic!(
            "no live cluster node answered CLUSTER SLOTS:\n{}",
            errors.join("\n")
        );
    }

    /// Every node ever started for this cluster, killed ones included, in start order.
    pub fn node_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    /// SIGKILLs one node, to simulate a crash. Returns once the process is gone; killing an
    /// already killed node is a no-op.
    pub fn kill_node(&mut self, addr: &str) {
        let known = self.node_addrs();
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.addr() == addr)
            .unwrap_or_else(|| panic!("kill_node: {addr} is not a node of this cluster {known:?}"));
        node.stop();
    }

    /// Freezes (`STOP`) or thaws (`CONT`) every live node: the cluster stops answering
    /// without losing any state, and comes back as it was.
    pub fn signal_all(&self, sig: &str) {
        for n in self.live_nodes() {
            n.signal(sig);
        }
    }

    fn live_nodes(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| !n.stopped)
    }

    fn create(&self) {
        let log_path = self.nodes[0].dir.join("cluster-create.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log file handle: {e}"));
        let mut cli = Command::new("redis-cli");
        cli.args(["--cluster", "create"])
            .args(self.node_addrs())
            .args(["--cluster-replicas", &self.replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = cli
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        let outcome = match wait_timeout(&mut child, CLUSTER_CREATE_TIMEOUT) {
            Some(status) if status.success() => return,
            Some(status) => format!("failed with {status}"),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                format!("did not finish within {CLUSTER_CREATE_TIMEOUT:?}")
            }
        };
        panic!(
            "`{cli:?}` {outcome}\n--- redis-cli output ---\n{}\n{}",
            file_tail(&log_path, 60),
            self.log_tails()
        );
    }

    fn wait_until_settled(&self) {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            let why = match self.check_settled() {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                panic!(
                    "cluster ({} masters, {} replicas each) not settled after \
                     {CLUSTER_READY_TIMEOUT:?}: {why}\n{}",
                    self.masters,
                    self.replicas_per_master,
                    self.log_tails()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_settled(&self) -> Result<(), String> {
        let mut reference: Option<(String, Vec<SlotRange>)> = None;
        for node in self.live_nodes() {
            let addr = node.addr();
            let info = query_text(&addr, &["CLUSTER", "INFO"])?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("{addr} does not report cluster_state:ok yet"));
            }
            let ranges = slot_ranges(&query(&addr, &["CLUSTER", "SLOTS"])?)
                .map_err(|e| format!("{addr}: {e}"))?;
            match &reference {
                None => {
                    self.check_topology(&ranges)
                        .map_err(|e| format!("{addr} reports an incomplete topology: {e}"))?;
                    reference = Some((addr.clone(), ranges));
                }
                Some((first, expected)) if *expected != ranges => {
                    return Err(format!(
                        "nodes disagree on CLUSTER SLOTS:\n  {first}: {expected:?}\n  {addr}: {ranges:?}"
                    ));
                }
                Some(_) => {}
            }
            let replication = query_text(&addr, &["INFO", "replication"])?;
            let is_replica = replication.contains("role:slave");
            if is_replica && !replication.contains("master_link_status:up") {
                return Err(format!("replica {addr} has not synced with its master yet"));
            }
        }
        Ok(())
    }

    /// Checks one node's view: all slots covered, the expected number of masters, and every
    /// replica known (replicas are learned through gossip and appear later than masters).
    fn check_topology(&self, ranges: &[SlotRange]) -> Result<(), String> {
        let mut next_slot = 0u32;
        for range in ranges {
            if u32::from(range.start) != next_slot {
                return Err(format!("slot {next_slot} is not covered"));
            }
            next_slot = u32::from(range.end) + 1;
            if range.replicas.len() != self.replicas_per_master {
                return Err(format!(
                    "master {} lists {} replicas",
                    range.master,
                    range.replicas.len()
                ));
            }
        }
        if next_slot != CLUSTER_SLOT_COUNT {
            return Err(format!("slots {next_slot}.. are not covered"));
        }
        let masters: HashSet<&str> = ranges.iter().map(|r| r.master.as_str()).collect();
        if masters.len() != self.masters {
            return Err(format!(
                "{} masters instead of {}",
                masters.len(),
                self.masters
            ));
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("===== node {} =====\n{}", n.addr(), n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One 3-master cluster (no replicas) per test binary, started on first use. Tests share it by
/// prefixing their keys with [`tag`], which keeps each test's keys in a single slot.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start(3, 0))
}

/// Parses a `CLUSTER SLOTS` reply into sorted, normalized ranges.
fn slot_ranges(reply: &Value) -> Result<Vec<SlotRange>, String> {
    let Value::Aggregate(_, Some(rows)) = reply else {
        return Err(format!("unexpected CLUSTER SLOTS reply {reply:?}"));
    };
    let mut ranges = Vec::with_capacity(rows.len());
    for row in rows {
        let bad = || format!("unexpected CLUSTER SLOTS row {row:?}");
        let Value::Aggregate(_, Some(fields)) = row else {
            return Err(bad());
        };
        let [start, end, master, replicas @ ..] = fields.as_slice() else {
            return Err(bad());
        };
        let slot = |v: &Value| v.as_int().and_then(|n| u16::try_from(n).ok());
        let mut replicas = replicas
            .iter()
            .map(|r| node_addr(r).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        replicas.sort();
        ranges.push(SlotRange {
            start: slot(start).ok_or_else(bad)?,
            end: slot(end).ok_or_else(bad)?,
            master: node_addr(master).ok_or_else(bad)?,
            replicas,
        });
    }
    ranges.sort();
    Ok(ranges)
}

/// `[ip, port, id, ...]` from `CLUSTER SLOTS` as "ip:port".
fn node_addr(node: &Value) -> Option<String> {
    let Value::Aggregate(_, Some(fields)) = node else {
        return None;
    };
    Some(format!(
        "{}:{}",
        fields.first()?.as_text()?,
        fields.get(1)?.as_int()?
    ))
}

// ---------------------------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------------------------

/// A running `tierproxy` binary; killed on drop.
pub struct Proxy {
    child: Child,
    /// Kills the proxy if the test process goes away without dropping it (see
    /// [`REAPER_SCRIPT`]).
    reaper: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<VecDeque<String>>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Proxy {
    /// Starts the proxy on ephemeral ports and waits for its `tierproxy listening on ADDR`
    /// line, which is printed only once it accepts connections, so tests can connect right away.
    /// Both pipes are drained continuously: a proxy blocked on a full stderr pipe would look
    /// like a proxy bug.
    ///
    /// Then waits until the proxy knows the upstream topology (`CLUSTER INFO` says
    /// `cluster_state:ok`): the proxy accepts clients before that, answering
    /// topology-dependent commands with an error, which is not what most tests exercise.
    pub fn start(upstream: &[String], extra_args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let proxy = Proxy::start_unready(upstream, extra_args, env);
        proxy.wait_ready();
        proxy
    }

    /// Waits (up to 30 s) until the proxy reports the upstream topology as known.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(mut c) = std::panic::catch_unwind(|| Resp::connect(&self.addr())) {
                // Connections may need to authenticate: a NOAUTH reply means "not yet known".
                last = String::from_utf8_lossy(&c.cmd(&["CLUSTER", "INFO"])).into_owned();
                if last.contains("cluster_state:ok") || last.starts_with("-NOAUTH") {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tierproxy never learned the upstream topology: {last}\n--- stderr ---\n{}",
            self.stderr_tail()
        );
    }

    /// Starts the proxy and returns as soon as it accepts connections.
    pub fn start_unready(upstream: &[String], extra_args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tierproxy"));
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--upstream")
            .arg(upstream.join(","))
            .args(extra_args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{command:?}`: {e}"));
        let mut reaper = Command::new("bash")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("tierproxy-reaper")
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cannot spawn bash to reap the proxy: {e}")
            });

        let stdout = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let readers = [
            spawn_line_reader(
                child.stdout.take().expect("stdout is piped"),
                Arc::clone(&stdout),
                Some(ready_tx),
            ),
            spawn_line_reader(
                child.stderr.take().expect("stderr is piped"),
                Arc::clone(&stderr),
                None,
            ),
        ];

        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        let failure = loop {
            match ready_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addr) => {
                    return Proxy {
                        child,
                        reaper,
                        addr,
                        stdout,
                        stderr,
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Stdout closed without the line; the exit check below will report why.
                Err(RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(50)),
            }
            if let Ok(Some(status)) = child.try_wait() {
                stop_reaper(&mut reaper);
                break format!("exited with {status} before reporting its listen address");
            }
            if Instant::now() >= deadline {
                stop_reaper(&mut reaper);
                let _ = child.kill();
                let _ = child.wait();
                break format!("did not report its listen address within {PROXY_START_TIMEOUT:?}");
            }
        };
        // Let the readers collect the last output, which usually holds the actual error.
        let settle = Instant::now() + Duration::from_secs(2);
        while readers.iter().any(|r| !r.is_finished()) && Instant::now() < settle {
            thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "tierproxy {failure}\ncommand: {command:?}\n--- stdout ---\n{}\n--- stderr (last {} lines) ---\n{}",
            join_lines(&stdout),
            OUTPUT_TAIL_LINES,
            join_lines(&stderr)
        );
    }

    /// A proxy started with `--config` pointing at a file holding `body` (removed once
    /// the proxy has read it).
    pub fn start_with_config(upstream: &[String], body: &str) -> Proxy {
        let cfg = config_file(body);
        let path = cfg.path().to_str().expect("utf-8 temp path").to_string();
        Proxy::start(upstream, &["--config", &path], &[])
    }

    /// The admin HTTP listener, from the `tierproxy admin listening on ADDR` line that the
    /// proxy prints before its main listening line.
    pub fn admin_addr(&self) -> String {
        lock(&self.stdout)
            .iter()
            .find_map(|l| l.strip_prefix("tierproxy admin listening on "))
            .map(|a| a.trim().to_string())
            .expect("the proxy printed no admin address (started with --admin-listen \"\"?)")
    }

    /// The value of an unlabelled metric from `/metrics` (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `GET path` on the admin listener: (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin_addr()).expect("admin listener");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One write: a request split over several segments is what real clients send
        // too, but a single buffer keeps this helper's behaviour independent of timing.
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the proxy logged, for assertion messages.
    pub fn stderr_tail(&self) -> String {
        join_lines(&self.stderr)
    }

    /// Asks the proxy to shut down gracefully and reports how it exited, so tests can assert a
    /// clean exit code. Returns `None` if it was still running at `deadline` and had to be
    /// SIGKILLed; once it has exited, further calls return the recorded status.
    pub fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        // Never signal a pid we have already reaped: it may belong to another process by now.
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // The reaper goes first: once the proxy is reaped its pid may be reused.
        stop_reaper(&mut self.reaper);
        send_signal("TERM", self.pid());
        let status = wait_timeout(&mut self.child, deadline);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The reaper first (see `terminate`); both are no-ops on an already reaped child.
        stop_reaper(&mut self.reaper);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stop_reaper(reaper: &mut Child) {
    let _ = reaper.kill();
    let _ = reaper.wait();
}

/// Reads `source` line by line into a bounded buffer until EOF. On stdout it also reports the
/// proxy's listen address through `ready`.
fn spawn_line_reader(
    source: impl Read + Send + 'static,
    sink: Arc<Mutex<VecDeque<String>>>,
    ready: Option<Sender<SocketAddr>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if let Some(ready) = &ready {
                if let Some(addr) = line
                    .strip_prefix(PROXY_LISTENING_PREFIX)
                    .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                {
                    let _ = ready.send(addr);
                }
            }
            let mut lines = lock(&sink);
            if lines.len() == OUTPUT_TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    })
}

fn join_lines(lines: &Mutex<VecDeque<String>>) -> String {
    lock(lines).iter().cloned().collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------------------------------------
// Raw RESP client
// ---------------------------------------------------------------------------------------------

/// A deliberately dumb RESP client: it hands back the exact bytes of each reply so tests can
/// assert byte-for-byte what the proxy forwards (a real client library would normalize them).
/// Every read is bounded by a timeout, so a hung proxy fails the test instead of hanging it.
pub struct Resp {
    stream: TcpStream,
    addr: String,
    /// Bytes received but not yet returned (pipelined replies arrive in the same read).
    buf: Vec<u8>,
    eof: bool,
}

/// A decoded reply, only as detailed as the harness's own checks need.
enum Value {
    /// `+ - : _ , ( #` with the text after the type byte.
    Line(u8, Vec<u8>),
    /// `$ ! =` with the payload; `None` for the RESP2 null bulk `$-1`.
    Blob(u8, Option<Vec<u8>>),
    /// `* ~ > %` with the elements (maps flattened to key, value, ...); `None` for `*-1`.
    Aggregate(u8, Option<Vec<Value>>),
}

/// Compact, RESP-like rendering for panic messages (the derived form would print byte arrays).
impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Line(kind, text) => write!(f, "{}{}", *kind as char, text.escape_ascii()),
            Value::Blob(kind, Some(data)) => {
                write!(f, "{}\"{}\"", *kind as char, data.escape_ascii())
            }
            Value::Blob(kind, None) | Value::Aggregate(kind, None) => {
                write!(f, "{}-1", *kind as char)
            }
            Value::Aggregate(kind, Some(items)) => {
                write!(f, "{}", *kind as char)?;
                f.debug_list().entries(items).finish()
            }
        }
    }
}

impl Value {
    fn as_int(&self) -> Option<i64> {
        match self {
            Value::Line(b':', text) => std::str::from_utf8(text).ok()?.parse().ok(),
            _ => None,
        }
    }

    fn as_text(&self) -> Option<String> {
        match self {
            Value::Line(b'+', text) | Value::Blob(_, Some(text)) => {
                Some(String::from_utf8_lossy(text).into_owned())
            }
            _ => None,
        }
    }
}

impl Resp {
    pub fn connect(addr: &str) -> Resp {
        Self::try_connect(addr, RESP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_connect(addr: &str, timeout: Duration) -> Result<Resp, String> {
        let socket_addr = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| format!("cannot resolve {addr:?}"))?;
        let stream = TcpStream::connect_timeout(&socket_addr, timeout)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| format!("cannot configure connection to {addr}: {e}"))?;
        Ok(Resp {
            stream,
            addr: addr.to_string(),
            buf: Vec::new(),
            eof: false,
        })
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            panic!("cannot send to {}: {e}", self.addr);
        }
    }

    pub fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd_bytes(&args)
    }

    pub fn cmd_bytes(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send_raw(&encode_cmd(args));
        self.read_reply()
    }

    /// Returns the raw bytes of exactly one reply, leaving any later pipelined replies
    /// buffered. An attribute (`|`) is returned together with the reply it annotates, and a
    /// push (`>`) counts as a reply of its own. Panics on timeout, EOF or malformed input.
    pub fn read_reply(&mut self) -> Vec<u8> {
        match self.next_reply() {
            Ok((_, len)) => self.buf.drain(..len).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    /// One reply if it arrives within `limit`, else `None` (the connection stays usable).
    pub fn read_reply_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let _ = self.stream.set_read_timeout(Some(limit));
        let r = self.next_reply();
        let _ = self.stream.set_read_timeout(Some(RESP_TIMEOUT));
        match r {
            Ok((_, len)) => Some(self.buf.drain(..len).collect()),
            Err(_) => None,
        }
    }

    /// Sends a command without waiting for its reply.
    pub fn send(&mut self, args: &[&str]) {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send_raw(&encode_cmd(&args));
    }

    /// Everything still buffered or yet to arrive, up to the peer closing the connection
    /// (a reset counts as closing). Panics if the peer keeps it open past the read timeout.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        while !self.eof {
            if let Err(e) = self.fill() {
                panic!(
                    "{} did not close the connection ({e}); received: {}",
                    self.addr,
                    show(&self.buf)
                );
            }
        }
        std::mem::take(&mut self.buf)
    }

    /// Whether the peer closes the connection within a couple of seconds. Data that arrives
    /// meanwhile stays buffered for [`Resp::read_reply`] / [`Resp::read_until_closed`].
    pub fn is_closed(&mut self) -> bool {
        let deadline = Instant::now() + CLOSE_PROBE_TIMEOUT;
        while !self.eof {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || self.stream.set_read_timeout(Some(remaining)).is_err() {
                break;
            }
            match self.fill() {
                Ok(()) => {}
                Err(e) if is_timeout(&e) => break,
                // Any other read error means the connection is unusable.
                Err(_) => self.eof = true,
            }
        }
        let _ = self.stream.set_read_timeout(Some(RESP_TIMEOUT));
        self.eof
    }

    /// Decodes the next reply from the buffer, reading more as needed; returns it with its
    /// length in bytes (still in the buffer).
    fn next_reply(&mut self) -> Result<(Value, usize), String> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => {
                    return Err(format!(
                        "malformed reply from {}: {e}; buffered: {}",
                        self.addr,
                        show(&self.buf)
                    ))
                }
            }
            let read = if self.eof {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            } else {
                self.fill()
            };
            if let Err(e) = read {
                let what = if self.eof {
                    "closed the connection".to_string()
                } else if is_timeout(&e) {
                    format!("sent no complete reply within {RESP_TIMEOUT:?}")
                } else {
                    format!("read failed: {e}")
                };
                return Err(format!(
                    "{} {what}; buffered: {}",
                    self.addr,
                    show(&self.buf)
                ));
            }
        }
    }

    /// One read into the buffer. EOF and connection resets set `eof` rather than failing.
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    Ok(())
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.eof = true;
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
    }
}

/// Encodes a command the way clients send it: an array of bulk strings.
pub fn encode_cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Commands encoded back to back, to be sent in one write (a pipeline).
pub fn encode_pipeline(cmds: &[&[&str]]) -> Vec<u8> {
    let mut out = Vec::new();
    for cmd in cmds {
        let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
        out.extend(encode_cmd(&args));
    }
    out
}

/// A pub/sub message frame (RESP2) as Redis sends it: `kind` (`message`, `pmessage`,
/// `smessage`) and its parts.
pub fn message(kind: &str, parts: &[&str]) -> String {
    let mut m = format!("*{}\r\n${}\r\n{kind}\r\n", parts.len() + 1, kind.len());
    for p in parts {
        m.push_str(&format!("${}\r\n{p}\r\n", p.len()));
    }
    m
}

/// Decodes one RESP2/RESP3 reply at the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise the value and how many bytes it spans. Streamed (`?`) replies are not supported
/// because Redis never sends them.
fn parse_reply(buf: &[u8]) -> Result<Option<(Value, usize)>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, header)) = buf[..line_end].split_first() else {
        return Err("empty line where a reply was expected".to_string());
    };
    let mut pos = line_end + 2;
    match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'(' | b'#' => {
            Ok(Some((Value::Line(kind, header.to_vec()), pos)))
        }
        b'$' | b'!' | b'=' => {
            let Some(len) = parse_length(kind, header)? else {
                return Ok(Some((Value::Blob(kind, None), pos)));
            };
            let Some(payload) = buf.get(pos..pos + len + 2) else {
                return Ok(None);
            };
            if !payload.ends_with(b"\r\n") {
                return Err(format!(
                    "{len}-byte {:?} payload not followed by CRLF",
                    kind as char
                ));
            }
            pos += len + 2;
            Ok(Some((
                Value::Blob(kind, Some(payload[..len].to_vec())),
                pos,
            )))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let Some(count) = parse_length(kind, header)? else {
                return Ok(Some((Value::Aggregate(kind, None), pos)));
            };
            // Maps and attributes count key/value pairs.
            let elements = if matches!(kind, b'%' | b'|') {
                count * 2
            } else {
                count
            };
            let mut values = Vec::with_capacity(elements.min(1024));
            for _ in 0..elements {
                let Some((value, len)) = parse_reply(&buf[pos..])? else {
                    return Ok(None);
                };
                values.push(value);
                pos += len;
            }
            if kind == b'|' {
                // An attribute annotates the reply that follows; together they are one reply.
                return Ok(parse_reply(&buf[pos..])?.map(|(value, len)| (value, pos + len)));
            }
            Ok(Some((Value::Aggregate(kind, Some(values)), pos)))
        }
        other => Err(format!("unknown reply type byte {:?}", other as char)),
    }
}

/// Parses a length/count header; `None` is the RESP2 null (`$-1` / `*-1`).
fn parse_length(kind: u8, header: &[u8]) -> Result<Option<usize>, String> {
    let text = String::from_utf8_lossy(header);
    match text.parse::<i64>() {
        Ok(-1) if matches!(kind, b'$' | b'*') => Ok(None),
        Ok(n) if n >= 0 => usize::try_from(n)
            .map(Some)
            .map_err(|_| format!("length {n} too large")),
        _ => Err(format!("bad length {text:?} after {:?}", kind as char)),
    }
}

/// Sends one command on a fresh connection and decodes the reply, without panicking: the
/// harness polls servers that may not be up yet. Error replies are returned as values.
fn query(addr: &str, args: &[&str]) -> Result<Value, String> {
    let mut conn = Resp::try_connect(addr, PROBE_TIMEOUT)?;
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    conn.stream
        .write_all(&encode_cmd(&args))
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    conn.next_reply().map(|(value, _)| value)
}

/// Like [`query`] for commands that answer with text (INFO, CLUSTER INFO); error replies fail.
fn query_text(addr: &str, args: &[&str]) -> Result<String, String> {
    let reply = query(addr, args)?;
    reply
        .as_text()
        .ok_or_else(|| format!("{addr}: {} answered {reply:?}", args.join(" ")))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Printable form of received bytes for panic messages, truncated to stay readable.
fn show(bytes: &[u8]) -> String {
    const LIMIT: usize = 1024;
    let shown = bytes[..bytes.len().min(LIMIT)].escape_ascii().to_string();
    if bytes.len() > LIMIT {
        format!("\"{shown}\" ... ({} bytes in total)", bytes.len())
    } else {
        format!("\"{shown}\"")
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, ports, temp dirs, processes
// ---------------------------------------------------------------------------------------------

/// A hash tag unique to one test run, e.g. `{t_get_set_1f2e...}`. Prefixing all of a test's keys
/// with it keeps them in one slot (multi-key commands work on a cluster) and away from other
/// tests on the shared servers, including reruns against a server that outlived a test.
pub fn tag(name: &str) -> String {
    // Braces would end the hash tag early, so keep only unambiguous characters.
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{{t_{name}_{:016x}}}", random_u64())
}

/// A random loopback port that is free now, whose cluster bus port (+10000) is free too, and
/// that this process has not handed out before (so parallel tests never race each other; other
/// processes are handled by retrying in [`RedisServer`]).
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut handed_out = lock(HANDED_OUT.get_or_init(Default::default));
    let (low, high) = PORT_RANGE;
    for _ in 0..10_000 {
        let port = low + (random_u64() % u64::from(high - low + 1)) as u16;
        let bindable = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !handed_out.contains(&port) && bindable(port) && bindable(port + CLUSTER_BUS_OFFSET) {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port pair found in {low}..={high}");
}

/// Differs on every call (per-call random hasher keys, plus a counter, pid and time for good
/// measure), which is all tags and port choices need.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// A new directory under the system temp dir; the name carries the pid so leftovers can be
/// traced to the test process that created them.
fn make_temp_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tierproxy-test-{kind}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create {}: {e}", dir.display()),
        }
    }
}

/// The last `lines` lines of a file, or why it could not be read.
fn file_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// std can only signal its own children, and only with SIGKILL; `kill(1)` covers the rest.
fn send_signal(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// A poisoned lock only means another test thread panicked; the data is still fine to read.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------

/// A real S3-compatible server on loopback (moto's server, from PyPI), supervised by the same
/// watchdog as the Redis servers. Each server is empty when it starts (state is in memory).
pub struct S3Server {
    port: u16,
    dir: PathBuf,
    server_pid: u32,
    watchdog: Child,
    stopped: bool,
}

impl S3Server {
    pub fn start() -> S3Server {
        S3Server::start_on(free_port())
    }

    /// Starts on a given port (to bring a stopped server "back" at the same address).
    pub fn start_on(port: u16) -> S3Server {
        let dir = make_temp_dir("s3");
        let mut watchdog = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("tierproxy-s3-watchdog")
            .arg(std::process::id().to_string())
            .arg(&dir)
            .args(["python3", "-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn bash to supervise the S3 server: {e}"));
        let mut line = String::new();
        let stdout = watchdog.stdout.take().expect("watchdog stdout is piped");
        let _ = BufReader::new(stdout).read_line(&mut line);
        let server_pid = line
            .trim()
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("S3 watchdog did not report a pid: {line:?}"));
        let mut s = S3Server {
            port,
            dir,
            server_pid,
            watchdog,
            stopped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _, _)) = s.try_http("GET", "/", b"") {
                return s;
            }
            if Instant::now() > deadline || matches!(s.watchdog.try_wait(), Ok(Some(_))) {
                let log = file_tail(&s.dir.join("stdout.log"), LOG_TAIL_LINES);
                s.stop();
                panic!("the S3 server (python3 -m moto.server; pip install 'moto[server]') did not start on port {port}:\n{log}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn try_http(&self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, String, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, head.to_string(), body.to_string()))
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, _, body) = self.try_http("PUT", &format!("/{bucket}"), b"").unwrap();
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// The object names in a bucket (up to 1,000).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let (status, _, body) = self
            .try_http("GET", &format!("/{bucket}?list-type=2"), b"")
            .unwrap();
        assert_eq!(status, 200, "list {bucket}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|p| p.split("</Key>").next())
            .map(String::from)
            .collect()
    }

    /// (name, ETag, size) of the objects in a bucket, from the listing.
    pub fn objects(&self, bucket: &str) -> Vec<(String, String, u64)> {
        let (status, _, body) = self
            .try_http("GET", &format!("/{bucket}?list-type=2"), b"")
            .unwrap();
        assert_eq!(status, 200, "list {bucket}: {body}");
        let field = |entry: &str, tag: &str| {
            entry
                .split(&format!("<{tag}>"))
                .nth(1)
                .and_then(|r| r.split(&format!("</{tag}>")).next())
                .unwrap_or_default()
                .to_string()
        };
        body.split("<Contents>")
            .skip(1)
            .map(|e| {
                let etag = field(e, "ETag").replace("&#34;", "").replace('"', "");
                (field(e, "Key"), etag, field(e, "Size").parse().unwrap_or(0))
            })
            .collect()
    }

    /// The server-side encryption S3 reports for an object (a signed HeadObject through
    /// boto3, which comes with moto; the server refuses unsigned HEADs).
    pub fn object_sse(&self, bucket: &str, key: &str) -> Option<String> {
        let script = "import sys, boto3\n\
c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test')\n\
print(c.head_object(Bucket=sys.argv[2], Key=sys.argv[3]).get('ServerSideEncryption') or '')";
        let out = Command::new("python3")
            .args(["-c", script, &self.endpoint(), bucket, key])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "head_object: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!v.is_empty()).then_some(v)
    }

    /// The status line and headers of HEAD on an object.
    pub fn head(&self, bucket: &str, key: &str) -> String {
        self.try_http("HEAD", &format!("/{bucket}/{key}"), b"")
            .map(|(_, head, _)| head)
            .unwrap_or_default()
    }

    /// A response header of HEAD on an object (lower-case name).
    pub fn object_header(&self, bucket: &str, key: &str, header: &str) -> Option<String> {
        let (_, head, _) = self
            .try_http("HEAD", &format!("/{bucket}/{key}"), b"")
            .ok()?;
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(header)
                .then(|| v.trim().to_string())
        })
    }

    /// Kills the server (the port closes before this returns).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        stop_supervised(&mut self.watchdog, self.server_pid);
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Sends a signal (a `kill(1)` name: `STOP` freezes the server, keeping its
    /// connections and its state; `CONT` thaws it). Stopping it ([`S3Server::stop`]) or
    /// dropping it still works on a frozen server: SIGKILL needs no cooperation.
    pub fn signal(&self, sig: &str) {
        assert!(!self.stopped, "kill -{sig}: the S3 server was stopped");
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.server_pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill -{sig}: {e}"));
        assert!(
            status.success(),
            "kill -{sig} {} (the S3 server) failed: {status}",
            self.server_pid
        );
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The RESP bulk-string encoding of `v` (what a GET of it answers).
/// Sends raw `bytes` on a new TCP connection and collects what comes back until the peer
/// closes it (`true`; a reset counts as a close) or stays silent for `quiet` (`false`).
pub fn exchange(addr: &str, bytes: &[u8], quiet: Duration) -> (Vec<u8>, bool) {
    let mut sock = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    sock.set_read_timeout(Some(quiet))
        .expect("set_read_timeout");
    sock.write_all(bytes).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (got, false)
            }
            Err(_) => return (got, true),
        }
    }
}

pub fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

/// `n` reproducible, incompressible bytes (xorshift from `seed`).
pub fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TOML config file for `tierproxy --config`, removed when dropped (the proxy reads it at
/// start).
pub fn config_file(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp config file");
    f.write_all(body.as_bytes()).expect("write config");
    f
}

/// `INFO clients`' `connected_clients` of a server, asked directly.
pub fn connected_clients(addr: &str) -> i64 {
    let mut c = Resp::connect(addr);
    let info = String::from_utf8_lossy(&c.cmd(&["INFO", "clients"])).into_owned();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|n| n - 1) // not counting the connection asking
        .unwrap_or_else(|| panic!("no connected_clients in {info:?}"))
}

/// Polls `f` every 50 ms until it returns true or `limit` passes; whether it did.
/// A numeric field of `INFO l1` (panics if it is missing).
/// `calls=` of `cmd` in INFO commandstats over `c` (a proxy's or a redis-server's): 0
/// while it has not run.
pub fn command_calls(c: &mut Resp, cmd: &str) -> i64 {
    let info = String::from_utf8_lossy(&c.cmd(&["INFO", "commandstats"])).into_owned();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn l1_stat(c: &mut Resp, name: &str) -> i64 {
    let info = String::from_utf8_lossy(&c.cmd(&["INFO", "l1"])).into_owned();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {info}"))
}

pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
