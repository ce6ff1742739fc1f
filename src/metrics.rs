//! Every metric name and help text, in one place. Values are kept in the proxy's own
//! atomics on the hot path and copied into the Prometheus registry when `/metrics` is
//! scraped, so serving a request never touches the registry. Label values come from
//! fixed sets (levels), never from keys.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::Proxy;

pub const CACHE_HITS: &str = "tierproxy_cache_hits_total";
pub const CACHE_MISSES: &str = "tierproxy_cache_misses_total";
pub const L1_ENABLED: &str = "tierproxy_l1_enabled";
pub const L1_ENTRIES: &str = "tierproxy_l1_entries";
pub const L1_BYTES: &str = "tierproxy_l1_bytes";
pub const L1_EVICTIONS: &str = "tierproxy_l1_evictions_total";
pub const L1_INVALIDATIONS: &str = "tierproxy_l1_invalidations_total";
pub const L1_FLUSHES: &str = "tierproxy_l1_flushes_total";
pub const L1_FILLS_RACED: &str = "tierproxy_l1_fills_raced_total";
pub const L1_MERGED: &str = "tierproxy_l1_merged_reads_total";
pub const L1_REFRESHES: &str = "tierproxy_l1_refreshes_total";
pub const L1_REFRESHES_SKIPPED: &str = "tierproxy_l1_refreshes_skipped_total";
pub const L1_WARMED: &str = "tierproxy_l1_warmed_total";
pub const SPILL_WRITES: &str = "tierproxy_spill_writes_total";
pub const SPILL_BYTES: &str = "tierproxy_spill_bytes_total";
pub const SPILL_ERRORS: &str = "tierproxy_spill_errors_total";
pub const SPILL_STORE_SECONDS: &str = "tierproxy_spill_store_seconds_total";
pub const SPILL_STORE_OPS: &str = "tierproxy_spill_store_operations_total";
pub const SPILL_STORE_FAILURES: &str = "tierproxy_spill_store_errors_total";
pub const SPILL_STORE_DURATION: &str = "tierproxy_spill_store_duration_seconds";
pub const L2_COMPRESSION_BYTES: &str = "tierproxy_l2_compression_bytes_total";
pub const L2_COMPRESSED_WRITES: &str = "tierproxy_l2_compressed_writes_total";
pub const SPILL_SWEPT: &str = "tierproxy_spill_swept_total";
pub const COMMANDS: &str = "tierproxy_commands_total";
pub const ERRORS: &str = "tierproxy_error_replies_total";
pub const PROTOCOL_ERRORS: &str = "tierproxy_protocol_errors_total";
pub const AUTH_FAILURES: &str = "tierproxy_auth_failures_total";
pub const CLIENTS: &str = "tierproxy_client_connections";
pub const CONNECTIONS: &str = "tierproxy_client_connections_received_total";
pub const REJECTED: &str = "tierproxy_client_connections_rejected_total";
pub const UPSTREAM_CONNECTIONS: &str = "tierproxy_upstream_connections";
pub const TOPOLOGY_REFRESHES: &str = "tierproxy_topology_refreshes_total";
pub const PINNED: &str = "tierproxy_pinned_connections";
pub const PINNED_ACQUIRED_TOTAL: &str = "tierproxy_pinned_acquired_total";
pub const PINNED_CLOSED_TOTAL: &str = "tierproxy_pinned_closed_dirty_total";
pub const TRANSACTIONS: &str = "tierproxy_transactions_total";
pub const SUBSCRIPTIONS: &str = "tierproxy_pubsub_subscriptions";
pub const PUBSUB_MESSAGES: &str = "tierproxy_pubsub_messages_total";
pub const PUBSUB_DROPPED: &str = "tierproxy_pubsub_clients_dropped_total";
pub const PUBSUB_RESUBSCRIBES: &str = "tierproxy_pubsub_resubscribes_total";
pub const SCRIPT_RELOADS: &str = "tierproxy_script_reloads_total";
pub const COMMAND_DURATION: &str = "tierproxy_command_duration_seconds";
pub const SLOWLOG_ENTRIES: &str = "tierproxy_slowlog_entries_total";
pub const CONFIG_RELOADS: &str = "tierproxy_config_reloads_total";
pub const INFLIGHT: &str = "tierproxy_inflight_requests";
pub const OUTPUT_STALLS: &str = "tierproxy_client_output_stalls_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "tierproxy_tls_handshake_failures_total";
pub const NOPERM: &str = "tierproxy_noperm_total";
pub const FAILOVER_WAITS_TOTAL: &str = "tierproxy_failover_waits_total";

// Counters of the stateful paths, process-wide: pinned connections are released in
// `Drop`, where no `Proxy` is at hand.
pub static PINNED_ACQUIRED: AtomicU64 = AtomicU64::new(0);
pub static PINNED_CLOSED_DIRTY: AtomicU64 = AtomicU64::new(0);
/// EXEC outcomes: committed (array reply), conflict (nil: a WATCHed key changed),
/// aborted (EXECABORT), error (the proxy's own error, e.g. the upstream was lost).
pub static TX_COMMITTED: AtomicU64 = AtomicU64::new(0);
pub static TX_CONFLICT: AtomicU64 = AtomicU64::new(0);
pub static TX_ABORTED: AtomicU64 = AtomicU64::new(0);
pub static TX_ERROR: AtomicU64 = AtomicU64::new(0);
pub static SUBSCRIPTIONS_NOW: AtomicI64 = AtomicI64::new(0);
pub static PUBSUB_MESSAGES_OUT: AtomicU64 = AtomicU64::new(0);
pub static PUBSUB_DROPPED_CLIENTS: AtomicU64 = AtomicU64::new(0);
pub static PUBSUB_RESUBSCRIBED: AtomicU64 = AtomicU64::new(0);
pub static SCRIPTS_RELOADED: AtomicU64 = AtomicU64::new(0);
pub static SLOW_LOGGED: AtomicU64 = AtomicU64::new(0);
/// Clients closed for not reading their replies (`client.output_stall_timeout_secs`).
pub static OUTPUT_STALLED: AtomicU64 = AtomicU64::new(0);
/// Client TLS handshakes that failed or timed out (plaintext on the TLS port included).
pub static TLS_HANDSHAKES_FAILED: AtomicU64 = AtomicU64::new(0);
/// Commands refused to read-only users.
pub static NOPERM_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Requests that waited for an unreachable master to be replaced (upstream.failover_wait_ms).
pub static FAILOVER_WAITS: AtomicU64 = AtomicU64::new(0);
/// SIGHUP reloads: applied, and refused (the new file did not load or validate).
pub static RELOADS_OK: AtomicU64 = AtomicU64::new(0);
pub static RELOADS_FAILED: AtomicU64 = AtomicU64::new(0);
/// Commands dispatched whose replies have not been written yet.
pub static INFLIGHT_NOW: AtomicI64 = AtomicI64::new(0);

/// Error reply kinds counted by `tierproxy_error_replies_total{kind}`: the first word
/// of the error, from this fixed list (anything else is `other`).
pub const ERROR_KINDS: [&str; 20] = [
    "ERR",
    "WRONGTYPE",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "CROSSSLOT",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "BUSY",
    "NOSCRIPT",
    "EXECABORT",
    "READONLY",
    "OOM",
    "MASTERDOWN",
    "NOREPLICAS",
    "UNBLOCKED",
    "other",
];
static ERROR_COUNTS: [AtomicU64; ERROR_KINDS.len()] =
    [const { AtomicU64::new(0) }; ERROR_KINDS.len()];

/// Counts one error reply by kind; `line` is the error text without the leading `-`.
pub fn count_error(line: &[u8]) {
    let word = line
        .split(|&b| b == b' ' || b == b'\r')
        .next()
        .unwrap_or(b"");
    let i = ERROR_KINDS[..ERROR_KINDS.len() - 1]
        .iter()
        .position(|k| k.as_bytes() == word)
        .unwrap_or(ERROR_KINDS.len() - 1);
    ERROR_COUNTS[i].fetch_add(1, Ordering::Relaxed);
}

/// Where a reply came from, the `level` label of the command duration histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The proxy's memory (an L1 hit).
    L1 = 0,
    /// Redis.
    L2 = 1,
    /// A spilled value read from the store.
    L3 = 2,
    /// Answered by the proxy itself (PING, CLIENT, INFO, queued in MULTI, …).
    Local = 3,
}

pub const LEVELS: [&str; 4] = ["l1", "l2", "l3", "local"];

tokio::task_local! {
    /// Set while a client connection's replies are resolved: whether one read the store.
    static STORE_READ: std::cell::Cell<bool>;
}

/// Runs a client connection with the store-read marker in scope.
pub async fn with_reply_level<F: std::future::Future>(f: F) -> F::Output {
    STORE_READ.scope(std::cell::Cell::new(false), f).await
}

/// Called where a spilled value is read from the store: the reply being resolved by
/// this task comes from L3. A no-op outside a client connection (e.g. the sweeper).
pub fn mark_store_read() {
    let _ = STORE_READ.try_with(|c| c.set(true));
}

/// Whether the store was read since the last call (and clears the marker).
pub fn take_store_read() -> bool {
    STORE_READ.try_with(|c| c.replace(false)).unwrap_or(false)
}

/// Upper bounds of the command duration buckets: exponential from 100 µs, doubling
/// (100 µs … 3.28 s), then +Inf.
pub const DURATION_BUCKETS_US: [u64; 16] = [
    100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 102_400, 204_800, 409_600,
    819_200, 1_638_400, 3_276_800,
];

/// How a command ended, for INFO commandstats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused by the proxy before it ran (arity, CROSSSLOT, NOAUTH, …).
    Rejected,
    /// Ran and answered with an error.
    Failed,
}

/// One command's counters (INFO commandstats) and duration histograms by level. One per
/// command name for the life of the process: command tables rebuilt after a topology
/// change point at the same counters.
#[derive(Debug, Default)]
pub struct CmdStat {
    pub name: String,
    pub calls: AtomicU64,
    pub usec: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    buckets: [[AtomicU64; DURATION_BUCKETS_US.len() + 1]; 4],
    sum_us: [AtomicU64; 4],
}

impl CmdStat {
    pub fn record(&self, level: Level, us: u64, outcome: Outcome) {
        if outcome == Outcome::Rejected {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if outcome == Outcome::Failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.usec.fetch_add(us, Ordering::Relaxed);
        let l = level as usize;
        let b = DURATION_BUCKETS_US.partition_point(|&ub| ub < us);
        self.buckets[l][b].fetch_add(1, Ordering::Relaxed);
        self.sum_us[l].fetch_add(us, Ordering::Relaxed);
    }

    /// `n` calls that succeeded, each taking `us`.
    pub fn record_n(&self, level: Level, us: u64, n: u64) {
        self.calls.fetch_add(n, Ordering::Relaxed);
        self.usec.fetch_add(us * n, Ordering::Relaxed);
        let l = level as usize;
        let b = DURATION_BUCKETS_US.partition_point(|&ub| ub < us);
        self.buckets[l][b].fetch_add(n, Ordering::Relaxed);
        self.sum_us[l].fetch_add(us * n, Ordering::Relaxed);
    }

    fn reset(&self) {
        for c in [&self.calls, &self.usec, &self.rejected, &self.failed] {
            c.store(0, Ordering::Relaxed);
        }
        for (bs, sum) in self.buckets.iter().zip(&self.sum_us) {
            bs.iter().for_each(|b| b.store(0, Ordering::Relaxed));
            sum.store(0, Ordering::Relaxed);
        }
    }
}

type StatMap = std::collections::BTreeMap<String, &'static CmdStat>;

fn command_stats_map() -> &'static std::sync::Mutex<StatMap> {
    static MAP: std::sync::OnceLock<std::sync::Mutex<StatMap>> = std::sync::OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// The counters of command `name` (`get`, `config|get`). Names come from the backend's
/// command table, a fixed set, so the few hundred entries live as long as the process.
pub fn command_stat(name: &str) -> &'static CmdStat {
    let mut map = command_stats_map()
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(name.to_string()).or_insert_with(|| {
        Box::leak(Box::new(CmdStat {
            name: name.to_string(),
            ..Default::default()
        }))
    })
}

/// Every command's counters, by name.
pub fn command_stats() -> Vec<&'static CmdStat> {
    command_stats_map()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .copied()
        .collect()
}

/// CONFIG RESETSTAT.
pub fn reset_command_stats() {
    for s in command_stats() {
        s.reset();
    }
}

/// INFO commandstats, in Redis's format (`cmdstat_get:calls=…,usec=…,…`), measured at
/// the proxy from the command's parse to its reply.
pub fn info_commandstats(out: &mut String) {
    use std::fmt::Write;
    for s in command_stats() {
        let calls = s.calls.load(Ordering::Relaxed);
        let rejected = s.rejected.load(Ordering::Relaxed);
        if calls == 0 && rejected == 0 {
            continue;
        }
        let usec = s.usec.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "cmdstat_{}:calls={calls},usec={usec},usec_per_call={:.2},rejected_calls={rejected},failed_calls={}\r\n",
            s.name,
            if calls == 0 { 0.0 } else { usec as f64 / calls as f64 },
            s.failed.load(Ordering::Relaxed),
        );
    }
}

/// INFO latencystats-style percentiles per command (from the histogram buckets: each
/// value is the upper bound of the bucket holding that percentile).
pub fn info_latencystats(out: &mut String) {
    use std::fmt::Write;
    for s in command_stats() {
        let mut merged = [0u64; DURATION_BUCKETS_US.len() + 1];
        for bs in &s.buckets {
            for (m, b) in merged.iter_mut().zip(bs) {
                *m += b.load(Ordering::Relaxed);
            }
        }
        let total: u64 = merged.iter().sum();
        if total == 0 {
            continue;
        }
        let pct = |q: f64| {
            let want = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in merged.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return DURATION_BUCKETS_US
                        .get(i)
                        .map_or(f64::INFINITY, |&u| u as f64);
                }
            }
            f64::INFINITY
        };
        let _ = write!(
            out,
            "latency_percentiles_usec_{}:p50={:.3},p99={:.3},p99.9={:.3}\r\n",
            s.name,
            pct(0.5),
            pct(0.99),
            pct(0.999)
        );
    }
}

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder().ok()?;
    describe_counter!(
        CACHE_HITS,
        "Reads answered at a cache level (level=l1: proxy memory; l2: Redis, non-nil reply)."
    );
    describe_counter!(
        CACHE_MISSES,
        "Reads not answered at a cache level (l1: went upstream; l2: nil reply)."
    );
    describe_gauge!(
        L1_ENABLED,
        "1 while L1 caches; 0 when it is configured off or the upstream refused tracking."
    );
    describe_gauge!(L1_ENTRIES, "Keys held in L1.");
    describe_gauge!(
        L1_BYTES,
        "Bytes held in L1, as weighed against l1.max_bytes."
    );
    describe_counter!(L1_EVICTIONS, "L1 entries evicted to stay within budget.");
    describe_counter!(
        L1_INVALIDATIONS,
        "Key invalidations applied to L1 (writes here, tracking, events, tags)."
    );
    describe_counter!(
        L1_FLUSHES,
        "Whole-L1 flushes (lost tracking connections, topology changes, FLUSHALL)."
    );
    describe_counter!(
        L1_FILLS_RACED,
        "Upstream replies not cached because the key changed while they were in flight."
    );
    describe_counter!(
        L1_MERGED,
        "L1 misses that waited for an identical read already in flight."
    );
    describe_counter!(
        L1_REFRESHES,
        "Refresh-ahead reads started for hot L1 replies near their expiry (l1.refresh_ahead_ratio)."
    );
    describe_counter!(
        L1_REFRESHES_SKIPPED,
        "Refresh-ahead reads that were due but skipped: l1.refresh_ahead_concurrency in flight already."
    );
    describe_counter!(
        L1_WARMED,
        "Replies loaded into L1 by warming (l1.warm_keys, l1.warm_patterns, TIERPROXY.L1 WARM)."
    );
    describe_counter!(SPILL_WRITES, "Values spilled to the store.");
    describe_counter!(SPILL_BYTES, "Spill bytes (direction=in: client values spilled; stored: after compression; out: resolved for clients).");
    describe_counter!(SPILL_ERRORS, "Spill store failures and invalid stubs.");
    describe_counter!(
        SPILL_STORE_SECONDS,
        "Time spent in spill store calls (with _operations_total: mean latency)."
    );
    describe_counter!(SPILL_STORE_OPS, "Spill store calls.");
    describe_counter!(
        SPILL_STORE_FAILURES,
        "Failed spill store calls by op (put, get, delete) and kind (timeout, not_found, io, denied, throttled, server, client, connection, other)."
    );
    describe_counter!(
        L2_COMPRESSION_BYTES,
        "Values compressed in Redis (l3.compression_min_bytes): direction=in (original) or stored (compressed)."
    );
    describe_counter!(
        L2_COMPRESSED_WRITES,
        "Values stored zstd-compressed in Redis."
    );
    describe_counter!(
        SPILL_SWEPT,
        "Unreferenced spilled objects deleted by the sweeper."
    );
    describe_counter!(COMMANDS, "Commands received from clients.");
    describe_counter!(
        ERRORS,
        "Error replies sent to clients, by kind (the error's first word: ERR, WRONGTYPE, MOVED, …, other)."
    );
    describe_gauge!(
        INFLIGHT,
        "Commands received whose replies have not been written yet."
    );
    describe_counter!(
        SLOWLOG_ENTRIES,
        "Commands slower than slowlog.log_slower_than_us (SLOWLOG)."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "SIGHUP config reloads by result (ok, failed)."
    );
    describe_counter!(
        PROTOCOL_ERRORS,
        "Client connections closed for a malformed frame."
    );
    describe_counter!(AUTH_FAILURES, "Failed AUTH/HELLO AUTH attempts.");
    describe_counter!(
        OUTPUT_STALLS,
        "Clients disconnected for reading none of their replies for client.output_stall_timeout_secs."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Client TLS handshakes that failed or timed out (plaintext on the TLS listener included)."
    );
    describe_counter!(
        FAILOVER_WAITS_TOTAL,
        "Requests that waited for an unreachable master's failover instead of failing at once."
    );
    describe_counter!(
        NOPERM,
        "Commands refused with NOPERM (write commands from read-only users)."
    );
    describe_gauge!(CLIENTS, "Client connections open now.");
    describe_counter!(CONNECTIONS, "Client connections accepted.");
    describe_counter!(REJECTED, "Client connections refused at maxclients.");
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        "Pipelined upstream data connections open now."
    );
    describe_counter!(TOPOLOGY_REFRESHES, "Upstream topology refreshes.");
    describe_gauge!(
        PINNED,
        "Pinned upstream connections (transactions, blocking commands): state=in_use or idle."
    );
    describe_counter!(
        PINNED_ACQUIRED_TOTAL,
        "Pinned connections handed to a client."
    );
    describe_counter!(
        PINNED_CLOSED_TOTAL,
        "Pinned connections closed instead of reused (released mid-request or lost)."
    );
    describe_counter!(
        TRANSACTIONS,
        "EXECs by outcome: committed, conflict (WATCH), aborted (EXECABORT), error."
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        "Channels, patterns and shard channels subscribed by clients now."
    );
    describe_counter!(PUBSUB_MESSAGES, "Pub/sub messages delivered to clients.");
    describe_counter!(
        PUBSUB_DROPPED,
        "Subscribers disconnected past client.pubsub_output_limit."
    );
    describe_counter!(
        PUBSUB_RESUBSCRIBES,
        "Upstream subscriber connections re-established after a loss or failover."
    );
    describe_counter!(
        SCRIPT_RELOADS,
        "NOSCRIPT replies healed by loading the script on the node and retrying."
    );
    Some(handle)
}

/// Copies the current values into the registry and renders the Prometheus text.
pub fn render(px: &Proxy, handle: &PrometheusHandle) -> String {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let s = &px.stats;
    counter!(COMMANDS).absolute(ld(&s.commands));
    for (kind, c) in ERROR_KINDS.iter().zip(&ERROR_COUNTS) {
        let n = ld(c);
        if n > 0 {
            counter!(ERRORS, "kind" => *kind).absolute(n);
        }
    }
    gauge!(INFLIGHT).set(INFLIGHT_NOW.load(Ordering::Relaxed) as f64);
    counter!(SLOWLOG_ENTRIES).absolute(ld(&SLOW_LOGGED));
    counter!(CONFIG_RELOADS, "result" => "ok").absolute(ld(&RELOADS_OK));
    counter!(CONFIG_RELOADS, "result" => "failed").absolute(ld(&RELOADS_FAILED));
    counter!(PROTOCOL_ERRORS).absolute(ld(&s.protocol_errors));
    counter!(AUTH_FAILURES).absolute(ld(&s.auth_failures));
    counter!(OUTPUT_STALLS).absolute(ld(&OUTPUT_STALLED));
    counter!(TLS_HANDSHAKE_FAILURES).absolute(ld(&TLS_HANDSHAKES_FAILED));
    counter!(NOPERM).absolute(ld(&NOPERM_REFUSED));
    counter!(FAILOVER_WAITS_TOTAL).absolute(ld(&FAILOVER_WAITS));
    counter!(CONNECTIONS).absolute(ld(&s.connections));
    counter!(REJECTED).absolute(ld(&s.rejected));
    gauge!(CLIENTS).set(px.clients.len() as f64);
    gauge!(UPSTREAM_CONNECTIONS).set(px.upstream.total_connections() as f64);
    counter!(TOPOLOGY_REFRESHES).absolute(px.upstream.refreshes.load(Ordering::Relaxed));
    let (in_use, idle) = px.upstream.pinned_counts();
    gauge!(PINNED, "state" => "in_use").set(in_use as f64);
    gauge!(PINNED, "state" => "idle").set(idle as f64);
    counter!(PINNED_ACQUIRED_TOTAL).absolute(ld(&PINNED_ACQUIRED));
    counter!(PINNED_CLOSED_TOTAL).absolute(ld(&PINNED_CLOSED_DIRTY));
    for (outcome, c) in [
        ("committed", &TX_COMMITTED),
        ("conflict", &TX_CONFLICT),
        ("aborted", &TX_ABORTED),
        ("error", &TX_ERROR),
    ] {
        counter!(TRANSACTIONS, "outcome" => outcome).absolute(ld(c));
    }
    gauge!(SUBSCRIPTIONS).set(SUBSCRIPTIONS_NOW.load(Ordering::Relaxed) as f64);
    counter!(PUBSUB_MESSAGES).absolute(ld(&PUBSUB_MESSAGES_OUT));
    counter!(PUBSUB_DROPPED).absolute(ld(&PUBSUB_DROPPED_CLIENTS));
    counter!(PUBSUB_RESUBSCRIBES).absolute(ld(&PUBSUB_RESUBSCRIBED));
    counter!(SCRIPT_RELOADS).absolute(ld(&SCRIPTS_RELOADED));
    if let Some(sp) = &px.spill {
        let st = &sp.stats;
        counter!(CACHE_HITS, "level" => "l3").absolute(ld(&st.reads));
        counter!(SPILL_WRITES).absolute(ld(&st.writes));
        counter!(SPILL_BYTES, "direction" => "in").absolute(ld(&st.bytes_in));
        counter!(SPILL_BYTES, "direction" => "stored").absolute(ld(&st.bytes_stored));
        counter!(SPILL_BYTES, "direction" => "out").absolute(ld(&st.bytes_out));
        counter!(SPILL_ERRORS).absolute(ld(&st.errors));
        counter!(SPILL_STORE_SECONDS).absolute(ld(&st.store_ms_total) / 1000);
        counter!(SPILL_STORE_OPS).absolute(ld(&st.store_ops));
        counter!(SPILL_SWEPT).absolute(ld(&st.swept));
        let failures = st
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // An L3 miss: a stub whose object the store does not have.
        let l3_misses = failures.get(&("get", "not_found")).copied().unwrap_or(0);
        counter!(CACHE_MISSES, "level" => "l3").absolute(l3_misses);
        for ((op, kind), n) in failures {
            counter!(SPILL_STORE_FAILURES, "op" => op, "kind" => kind).absolute(n);
        }
        counter!(L2_COMPRESSED_WRITES).absolute(ld(&st.compressed_writes));
        counter!(L2_COMPRESSION_BYTES, "direction" => "in").absolute(ld(&st.compressed_bytes_in));
        counter!(L2_COMPRESSION_BYTES, "direction" => "stored")
            .absolute(ld(&st.compressed_bytes_stored));
    }
    let l1_on = px.l1.as_ref().is_some_and(|l1| !l1.is_disabled());
    gauge!(L1_ENABLED).set(if l1_on { 1.0 } else { 0.0 });
    if let Some(l1) = &px.l1 {
        let st = &l1.stats;
        counter!(CACHE_HITS, "level" => "l1").absolute(ld(&st.hits));
        counter!(CACHE_MISSES, "level" => "l1").absolute(ld(&st.misses));
        counter!(CACHE_HITS, "level" => "l2").absolute(ld(&st.l2_hits));
        counter!(CACHE_MISSES, "level" => "l2").absolute(ld(&st.l2_misses));
        gauge!(L1_ENTRIES).set(l1.entries() as f64);
        gauge!(L1_BYTES).set(l1.weighted_bytes() as f64);
        counter!(L1_EVICTIONS).absolute(ld(&st.evictions));
        counter!(L1_INVALIDATIONS).absolute(ld(&st.invalidations));
        counter!(L1_FLUSHES).absolute(ld(&st.flushes));
        counter!(L1_FILLS_RACED).absolute(ld(&st.fills_raced));
        counter!(L1_MERGED).absolute(ld(&st.merged));
        counter!(L1_REFRESHES).absolute(ld(&st.refreshes));
        counter!(L1_REFRESHES_SKIPPED).absolute(ld(&st.refreshes_skipped));
        counter!(L1_WARMED).absolute(ld(&st.warmed));
    }
    let mut text = handle.render();
    if let Some(sp) = &px.spill {
        render_store_latency(&sp.stats, &mut text);
    }
    render_command_durations(&mut text);
    with_prefix(text, &px.cfg.metrics.prefix)
}

/// Renames every metric from `tierproxy_…` to `<prefix>_…` (`metrics.prefix`). Names
/// are declared once above with the default prefix; only line starts are rewritten, so
/// label values and help texts are untouched.
fn with_prefix(text: String, prefix: &str) -> String {
    const DEFAULT: &str = "tierproxy_";
    if prefix == "tierproxy" {
        return text;
    }
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for line in text.split_inclusive('\n') {
        let (head, rest) = match line.strip_prefix("# HELP ") {
            Some(r) => ("# HELP ", r),
            None => match line.strip_prefix("# TYPE ") {
                Some(r) => ("# TYPE ", r),
                None => ("", line),
            },
        };
        out.push_str(head);
        match rest.strip_prefix(DEFAULT) {
            Some(r) => {
                out.push_str(prefix);
                out.push('_');
                out.push_str(r);
            }
            None => out.push_str(rest),
        }
    }
    out
}

/// `tierproxy_command_duration_seconds{command,level}`: each command's time at the
/// proxy, from its parse to its reply, by where the reply came from. Only series that
/// saw a call are written.
fn render_command_durations(out: &mut String) {
    use std::fmt::Write;
    let name = COMMAND_DURATION;
    let _ = writeln!(
        out,
        "# HELP {name} Command latency at the proxy (parse to reply) by command and level (l1, l2 = Redis, l3 = spill store, local)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for s in command_stats() {
        for (l, level) in LEVELS.iter().enumerate() {
            let mut cumulative = 0;
            let counts: Vec<u64> = s.buckets[l]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            if counts.iter().all(|&n| n == 0) {
                continue;
            }
            let cmd = &s.name;
            for (i, n) in counts.iter().enumerate() {
                cumulative += n;
                let le = DURATION_BUCKETS_US
                    .get(i)
                    .map_or("+Inf".to_string(), |&us| (us as f64 / 1e6).to_string());
                let _ = writeln!(
                    out,
                    "{name}_bucket{{command=\"{cmd}\",level=\"{level}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = s.sum_us[l].load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_sum{{command=\"{cmd}\",level=\"{level}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "{name}_count{{command=\"{cmd}\",level=\"{level}\"}} {cumulative}"
            );
        }
    }
}

/// The spill store latency histogram, in Prometheus's text format (kept in our own
/// atomics, so it is written here rather than through the registry).
fn render_store_latency(st: &crate::spill::SpillStats, out: &mut String) {
    use std::fmt::Write;
    let name = SPILL_STORE_DURATION;
    let _ = writeln!(
        out,
        "# HELP {name} Spill store call latency (S3 or the local directory), by op."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (op, h) in crate::spill::STORE_OPS.iter().zip(&st.latency) {
        let mut cumulative = 0;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = crate::spill::LATENCY_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{op=\"{op}\",le=\"{le}\"}} {cumulative}");
        }
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{op=\"{op}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{op=\"{op}\"}} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_renames_names_only() {
        let text = "# HELP tierproxy_x_total About tierproxy_x.\n# TYPE tierproxy_x_total counter\ntierproxy_x_total{k=\"tierproxy_v\"} 3\nother 1\n";
        let got = with_prefix(text.to_string(), "mcp");
        assert_eq!(
            got,
            "# HELP mcp_x_total About tierproxy_x.\n# TYPE mcp_x_total counter\nmcp_x_total{k=\"tierproxy_v\"} 3\nother 1\n"
        );
    }

    #[test]
    fn durations_land_in_exponential_buckets() {
        let s = command_stat("test|buckets");
        s.record(Level::L2, 100, Outcome::Ok); // le 100 µs
        s.record(Level::L2, 101, Outcome::Ok); // le 200 µs
        s.record(Level::L1, 5_000_000, Outcome::Failed); // +Inf
        s.record(Level::L2, 7, Outcome::Rejected);
        assert_eq!(s.buckets[1][0].load(Ordering::Relaxed), 1);
        assert_eq!(s.buckets[1][1].load(Ordering::Relaxed), 1);
        assert_eq!(
            s.buckets[0][DURATION_BUCKETS_US.len()].load(Ordering::Relaxed),
            1
        );
        assert_eq!(s.calls.load(Ordering::Relaxed), 3);
        assert_eq!(s.rejected.load(Ordering::Relaxed), 1);
        assert_eq!(s.failed.load(Ordering::Relaxed), 1);
        let mut info = String::new();
        info_commandstats(&mut info);
        assert!(
            info.contains("cmdstat_test|buckets:calls=3,usec=5000201,usec_per_call=1666733.67,rejected_calls=1,failed_calls=1\r\n"),
            "{info}"
        );
        assert!(std::ptr::eq(s, command_stat("test|buckets")));
    }

    #[test]
    fn error_kinds() {
        let before = ERROR_COUNTS[ERROR_KINDS.len() - 1].load(Ordering::Relaxed);
        count_error(b"WRONGTYPE Operation against a key");
        count_error(b"SOMETHINGNEW x");
        assert!(ERROR_COUNTS[1].load(Ordering::Relaxed) >= 1);
        assert!(ERROR_COUNTS[ERROR_KINDS.len() - 1].load(Ordering::Relaxed) > before);
    }
}
