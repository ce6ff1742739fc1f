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
pub const L1_ENTRIES: &str = "tierproxy_l1_entries";
pub const L1_BYTES: &str = "tierproxy_l1_bytes";
pub const L1_EVICTIONS: &str = "tierproxy_l1_evictions_total";
pub const L1_INVALIDATIONS: &str = "tierproxy_l1_invalidations_total";
pub const L1_FLUSHES: &str = "tierproxy_l1_flushes_total";
pub const L1_FILLS_RACED: &str = "tierproxy_l1_fills_raced_total";
pub const L1_MERGED: &str = "tierproxy_l1_merged_reads_total";
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
    describe_counter!(ERRORS, "Error replies sent to clients.");
    describe_counter!(
        PROTOCOL_ERRORS,
        "Client connections closed for a malformed frame."
    );
    describe_counter!(AUTH_FAILURES, "Failed AUTH/HELLO AUTH attempts.");
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
    counter!(ERRORS).absolute(ld(&s.errors));
    counter!(PROTOCOL_ERRORS).absolute(ld(&s.protocol_errors));
    counter!(AUTH_FAILURES).absolute(ld(&s.auth_failures));
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
        for ((op, kind), n) in failures {
            counter!(SPILL_STORE_FAILURES, "op" => op, "kind" => kind).absolute(n);
        }
        counter!(L2_COMPRESSED_WRITES).absolute(ld(&st.compressed_writes));
        counter!(L2_COMPRESSION_BYTES, "direction" => "in").absolute(ld(&st.compressed_bytes_in));
        counter!(L2_COMPRESSION_BYTES, "direction" => "stored")
            .absolute(ld(&st.compressed_bytes_stored));
    }
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
    }
    let mut text = handle.render();
    if let Some(sp) = &px.spill {
        render_store_latency(&sp.stats, &mut text);
    }
    text
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
