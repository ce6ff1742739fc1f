//! Typed configuration: defaults (named constants with units) < TOML file < environment
//! < command line. `validate()` names the offending key; `--check-config` runs it.

use std::path::Path;

use serde::Deserialize;

use crate::error::StartError;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6380";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9121";
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:6379";
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_CONNECTIONS_PER_NODE: usize = 2;
pub const DEFAULT_TOPOLOGY_REFRESH_MS: u64 = 10_000;
pub const DEFAULT_MAX_REDIRECTS: u32 = 5;
pub const DEFAULT_PINNED_MAX_PER_NODE: usize = 1_024;
pub const DEFAULT_PINNED_IDLE_PER_NODE: usize = 16;
pub const DEFAULT_PUBSUB_OUTPUT_LIMIT: u64 = 32 * 1024 * 1024;
pub const DEFAULT_MAXCLIENTS: usize = 10_000;
/// Redis's default `proto-max-bulk-len`.
pub const DEFAULT_PROTO_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
/// Redis's default `client-query-buffer-limit`.
pub const DEFAULT_QUERY_BUFFER_LIMIT: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_MAX_INFLIGHT: usize = 1_024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 0;
/// Redis's default `tcp-keepalive`.
pub const DEFAULT_CLIENT_TCP_KEEPALIVE_SECS: u64 = 300;
pub const DEFAULT_UPSTREAM_TCP_KEEPALIVE_SECS: u64 = 60;
/// Long enough for a Redis Cluster failover with a few seconds of node timeout.
pub const DEFAULT_FAILOVER_WAIT_MS: u64 = 10_000;
/// Unsent replies held for one client before the proxy waits for it to read.
pub const DEFAULT_OUTPUT_BUFFER_LIMIT: u64 = 8 * 1024 * 1024;
pub const DEFAULT_OUTPUT_STALL_TIMEOUT_SECS: u64 = 60;
/// A client that has not finished the TLS handshake after this long is closed.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_L1_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_L1_MAX_ENTRIES: u64 = 10_000;
pub const DEFAULT_L1_MAX_VALUE_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_L1_TTL_MS: u64 = 5 * 60 * 1000;
pub const DEFAULT_L1_ADMIT_AFTER_READS: u32 = 2;
pub const DEFAULT_L1_ADMIT_WINDOW_MS: u64 = 10_000;
pub const DEFAULT_L3_THRESHOLD_BYTES: u64 = 512 * 1024;
pub const DEFAULT_L3_DIR: &str = "./data/spill";
pub const DEFAULT_L3_PREFIX: &str = "tierproxy/";
pub const DEFAULT_L3_ZSTD_LEVEL: i32 = 3;
pub const DEFAULT_L3_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_METRICS_PREFIX: &str = "tierproxy";
/// Redis's default `slowlog-log-slower-than` (µs) and `slowlog-max-len`.
pub const DEFAULT_SLOWLOG_SLOWER_THAN_US: i64 = 10_000;
pub const DEFAULT_SLOWLOG_MAX_LEN: usize = 128;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client-facing RESP listener.
    pub listen: String,
    /// Admin HTTP listener (`/healthz`, `/readyz`); empty disables it.
    pub admin_listen: String,
    /// How long SIGTERM waits for in-flight requests before exiting.
    pub shutdown_timeout_ms: u64,
    /// Threads serving requests; 0: one per core but one, at least one (see
    /// [`Config::workers`]).                          env TIERPROXY_WORKER_THREADS
    pub worker_threads: usize,
    /// Prepended to every key on the way to Redis and stripped from key names on the way
    /// back (the seed's KeyBuilder prefix, e.g. `mcp:v1:`); empty: none. A user's own
    /// `namespace` ([[auth.users]]) replaces it for that user.  env TIERPROXY_NAMESPACE
    pub namespace: String,
    pub upstream: UpstreamConfig,
    pub client: ClientConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub l1: L1Config,
    pub l3: L3Config,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub slowlog: SlowlogConfig,
    /// The seed's `cache:` block (`l1`, `l2` = upstream, `l3`), accepted in place of the
    /// top-level sections; moved there by [`Config::load`].
    #[serde(rename = "cache")]
    pub seed_cache: Option<SeedCache>,
}

/// The seed application's `cache:` block, as its YAML files have it.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SeedCache {
    pub l1: Option<L1Config>,
    pub l2: Option<UpstreamConfig>,
    pub l3: Option<L3Config>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prefix of every Prometheus metric name (`mcp` for the seed's dashboards).
    ///                                                   env TIERPROXY_METRICS_PREFIX
    pub prefix: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            prefix: DEFAULT_METRICS_PREFIX.into(),
        }
    }
}

/// SLOWLOG: requests slower than this, measured at the proxy from parse to reply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SlowlogConfig {
    /// Microseconds; 0 logs every command, negative disables (Redis's semantics).
    pub log_slower_than_us: i64,
    pub max_len: usize,
}

impl Default for SlowlogConfig {
    fn default() -> Self {
        SlowlogConfig {
            log_slower_than_us: DEFAULT_SLOWLOG_SLOWER_THAN_US,
            max_len: DEFAULT_SLOWLOG_MAX_LEN,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct L3Config {
    /// Spill string values over the threshold to the store.   env CACHE_L3_ENABLED
    pub enabled: bool,
    /// Values longer than this are spilled.                    env CACHE_L3_THRESHOLD_BYTES
    pub threshold_bytes: u64,
    /// The local-directory store.                              env CACHE_L3_DIR
    pub dir: String,
    /// S3 bucket: set, the S3 store is used instead of `dir`.  env CACHE_L3_BUCKET
    pub bucket: String,
    /// AWS region; empty: the standard chain (AWS_REGION, profile, …), else us-east-1.
    pub region: String,
    /// S3-compatible endpoint (also AWS_ENDPOINT_URL); set, path-style addressing is used.
    pub endpoint_url: String,
    /// Server-side encryption: "", "AES256" or "aws:kms".
    pub sse: String,
    pub sse_kms_key_id: String,
    /// Objects larger than this are uploaded in parts of `part_size_bytes`.
    pub multipart_threshold_bytes: u64,
    pub part_size_bytes: u64,
    /// Object name prefix.                                     env CACHE_L3_PREFIX
    pub prefix: String,
    /// HMAC key for stubs; empty with the local store: generated and kept in `dir`.
    ///                                                         env CACHE_L3_SIGNING_KEY
    pub signing_key: String,
    pub zstd_level: i32,
    /// In-Redis compression: values of at least this many bytes (and not over the
    /// threshold) are stored zstd-compressed in Redis when that makes them smaller;
    /// 0 = off.                                                 env CACHE_L2_COMPRESSION_MIN_BYTES
    pub compression_min_bytes: u64,
    /// Every store call fails after this long.
    pub timeout_ms: u64,
    /// Background sweep period; 0 = only `tierproxy sweep`.
    pub sweep_interval_secs: u64,
    /// Unreferenced objects younger than this are kept (writes in flight).
    pub sweep_grace_secs: u64,
    /// The sweeper reads at most this many keys per second from Redis.
    pub sweep_keys_per_sec: u64,
}

impl Default for L3Config {
    fn default() -> Self {
        L3Config {
            enabled: false,
            threshold_bytes: DEFAULT_L3_THRESHOLD_BYTES,
            dir: DEFAULT_L3_DIR.into(),
            bucket: String::new(),
            region: String::new(),
            endpoint_url: String::new(),
            sse: String::new(),
            sse_kms_key_id: String::new(),
            multipart_threshold_bytes: 16 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            prefix: DEFAULT_L3_PREFIX.into(),
            signing_key: String::new(),
            zstd_level: DEFAULT_L3_ZSTD_LEVEL,
            compression_min_bytes: 0,
            timeout_ms: DEFAULT_L3_TIMEOUT_MS,
            sweep_interval_secs: 6 * 3600,
            sweep_grace_secs: 3600,
            sweep_keys_per_sec: 5000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct L1Config {
    /// The in-proxy hot-key cache.                          env CACHE_L1_ENABLED
    pub enabled: bool,
    /// Byte budget for cached replies (keys and bookkeeping included).
    pub max_bytes: u64,
    /// Entry budget.                                        env CACHE_L1_MAX_SIZE
    pub max_entries: u64,
    /// Replies larger than this are never cached.
    pub max_value_bytes: u64,
    /// Lifetime of an entry whose key has no TTL.          env CACHE_L1_DEFAULT_TTL
    pub default_ttl_ms: u64,
    /// No entry lives longer than this, whatever the key's TTL.
    pub max_ttl_ms: u64,
    /// A key is cached from its N-th read within `admit_window_ms` (1: first read).
    pub admit_after_reads: u32,
    pub admit_window_ms: u64,
    /// "tracking" (Redis CLIENT TRACKING, coherent) or "ttl" (may be stale up to max_ttl).
    pub coherence: String,
    /// `PUBLISH <channel> <key>` drops `key` from every proxy's L1 (the seed's event-based
    /// invalidation; needs tracking mode). Empty disables it.
    pub invalidation_channel: String,
    /// While the upstream is unreachable, answer reads from entries that are no longer
    /// known to be fresh (kept until their TTL) instead of failing. Off by default: the
    /// replies may be stale.
    pub serve_stale_on_error: bool,
    /// Refresh-ahead: a cached reply read at least `refresh_ahead_min_reads` times while
    /// less than this fraction of its lifetime is left is re-read in the background (one refresh per key at a time), so hot keys do not
    /// miss at expiry. 0 = off.
    pub refresh_ahead_ratio: f64,
    pub refresh_ahead_min_reads: u32,
    /// Background refreshes in flight at most; a due refresh beyond it is skipped.
    pub refresh_ahead_concurrency: usize,
    /// Warming at start-up: these keys, and the keys matching these SCAN patterns, are
    /// read into L1 (as GET) in the background. Also `TIERPROXY.L1 WARM`.
    pub warm_keys: Vec<String>,
    pub warm_patterns: Vec<String>,
    /// Warming reads at most this many keys per second.
    pub warm_keys_per_sec: u64,
    /// `/readyz` answers 503 until start-up warming is done.
    pub warm_before_ready: bool,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            enabled: true,
            max_bytes: DEFAULT_L1_MAX_BYTES,
            max_entries: DEFAULT_L1_MAX_ENTRIES,
            max_value_bytes: DEFAULT_L1_MAX_VALUE_BYTES,
            default_ttl_ms: DEFAULT_L1_TTL_MS,
            max_ttl_ms: DEFAULT_L1_TTL_MS,
            admit_after_reads: DEFAULT_L1_ADMIT_AFTER_READS,
            admit_window_ms: DEFAULT_L1_ADMIT_WINDOW_MS,
            coherence: "tracking".into(),
            invalidation_channel: "cache:invalidate".into(),
            serve_stale_on_error: false,
            refresh_ahead_ratio: 0.2,
            refresh_ahead_min_reads: 2,
            refresh_ahead_concurrency: 16,
            warm_keys: Vec::new(),
            warm_patterns: Vec::new(),
            warm_keys_per_sec: 1000,
            warm_before_ready: false,
        }
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The seed's duration syntax: `300`, `300s`, `5m`, `1h`, `250ms`.
pub fn parse_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "s" => 1_000,
        "ms" => 1,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Seeds: `host:port`, `redis://[user:pass@]host:port` or `rediss://…`.
    pub seeds: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout_ms: u64,
    /// Every upstream request fails with an error reply after this long.
    pub request_timeout_ms: u64,
    /// Pipelined data connections per node and protocol version.
    pub connections_per_node: usize,
    pub topology_refresh_interval_ms: u64,
    pub max_redirects: u32,
    /// Connections pinned to one client at a time (transactions with WATCH, EXEC,
    /// blocking commands, pub/sub) per node: at most this many at once.
    pub pinned_max_per_node: usize,
    /// Released pinned connections kept open for reuse, per node and protocol.
    pub pinned_idle_per_node: usize,
    /// TLS to every node; also on when any seed is `rediss://`.
    pub tls: bool,
    /// PEM file of the CA certificates to trust (default: the system's roots).
    ///                                                     env REDIS_TLS_CA_FILE
    pub tls_ca_file: String,
    /// Verify every node's certificate against this name (and send it as SNI) instead of
    /// the node's address: for nodes addressed by IP. Empty: the node's address.
    pub tls_server_name: String,
    /// ElastiCache IAM authentication.
    pub iam: IamConfig,
    /// TCP keepalive probes on every upstream connection after this idle time, so a
    /// dead node behind a silent network is noticed; 0 = off.
    pub tcp_keepalive_secs: u64,
    /// Cluster mode: a request whose master cannot be reached (never sent) or that gets
    /// CLUSTERDOWN waits up to this long for a replica to be promoted, re-sent as the
    /// topology changes, instead of failing at once; 0 = fail at once.
    pub failover_wait_ms: u64,
    /// `CLIENT SETNAME` on every upstream connection, so `CLIENT LIST` on a node tells
    /// this proxy's connections apart (invalidation connections get `-invalidations`
    /// added); empty = no name.
    pub client_name: String,
}

/// ElastiCache IAM authentication: each connection authenticates as `user_id` with a
/// SigV4 token from the standard AWS credential chain (ElastiCache requires TLS for it).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct IamConfig {
    pub enabled: bool,
    /// The ElastiCache user id (IAM-enabled user).
    pub user_id: String,
    /// The replication group id, or the serverless cache's name (not a host name).
    pub cache_name: String,
    pub region: String,
    pub serverless: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    pub maxclients: usize,
    pub proto_max_bulk_len: u64,
    pub query_buffer_limit: u64,
    /// Commands of one connection in flight at once; more are read only after replies.
    pub max_inflight: usize,
    /// Close a client idle this long; 0 = never (Redis's `timeout 0`).
    pub idle_timeout_secs: u64,
    /// Pub/sub messages queued for a client that reads too slowly: past this many bytes
    /// it is disconnected (Redis's `client-output-buffer-limit pubsub` hard limit).
    pub pubsub_output_limit: u64,
    /// Replies produced for a client but not yet written: past this many bytes the proxy
    /// writes them before resolving more (a client that does not read holds no more).
    pub output_buffer_limit: u64,
    /// A client that accepts none of its pending replies for this long is disconnected;
    /// 0 = never.
    pub output_stall_timeout_secs: u64,
    /// TCP keepalive probes on client sockets after this idle time (Redis's
    /// `tcp-keepalive`); 0 = off.
    pub tcp_keepalive_secs: u64,
}

/// TLS on the client listener. With a certificate configured the listener speaks only
/// TLS: plaintext clients fail the handshake and are closed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the listener.                 flag --tls-cert
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).              flag --tls-key
    pub key_file: String,
    /// PEM CA certificates that client certificates must chain to; empty = clients
    /// are not asked for one.                                  flag --tls-ca-cert
    pub client_ca_file: String,
    /// With `client_ca_file`: `yes` requires a client certificate, `optional` verifies one
    /// if sent (Redis's `tls-auth-clients`).
    pub auth_clients: String,
    pub handshake_timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            auth_clients: "yes".into(),
            handshake_timeout_ms: DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Password of the `default` user (requirepass). Prefer `TIERPROXY_PASSWORD`.
    pub password: Option<String>,
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Hex SHA-256 of the password; plaintext passwords are never stored in the file.
    pub password_sha256: String,
    /// Refuse commands that write (NOPERM), as an ACL user with `-@write` would be.
    #[serde(default)]
    pub readonly: bool,
    /// This user's key namespace, instead of the top-level `namespace` (multi-tenant).
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error|warn|info|debug|trace` or a tracing filter; `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            worker_threads: 0,
            upstream: UpstreamConfig::default(),
            client: ClientConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            l1: L1Config::default(),
            l3: L3Config::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            slowlog: SlowlogConfig::default(),
            namespace: String::new(),
            seed_cache: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            seeds: vec![DEFAULT_UPSTREAM.into()],
            username: None,
            password: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            connections_per_node: DEFAULT_CONNECTIONS_PER_NODE,
            topology_refresh_interval_ms: DEFAULT_TOPOLOGY_REFRESH_MS,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            pinned_max_per_node: DEFAULT_PINNED_MAX_PER_NODE,
            pinned_idle_per_node: DEFAULT_PINNED_IDLE_PER_NODE,
            tls: false,
            tls_ca_file: String::new(),
            tls_server_name: String::new(),
            iam: IamConfig::default(),
            tcp_keepalive_secs: DEFAULT_UPSTREAM_TCP_KEEPALIVE_SECS,
            failover_wait_ms: DEFAULT_FAILOVER_WAIT_MS,
            client_name: "tierproxy".into(),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            maxclients: DEFAULT_MAXCLIENTS,
            proto_max_bulk_len: DEFAULT_PROTO_MAX_BULK_LEN,
            query_buffer_limit: DEFAULT_QUERY_BUFFER_LIMIT,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            pubsub_output_limit: DEFAULT_PUBSUB_OUTPUT_LIMIT,
            output_buffer_limit: DEFAULT_OUTPUT_BUFFER_LIMIT,
            output_stall_timeout_secs: DEFAULT_OUTPUT_STALL_TIMEOUT_SECS,
            tcp_keepalive_secs: DEFAULT_CLIENT_TCP_KEEPALIVE_SECS,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Command-line values that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ca_cert: Option<String>,
}

/// A parsed upstream seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Seed {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `host:port`, `[v6]:port`, `redis://[user[:pass]@]host[:port][/0]`, `rediss://…`.
pub fn parse_seed(s: &str) -> Result<Seed, String> {
    let s = s.trim();
    let (tls, rest) = if let Some(r) = s.strip_prefix("rediss://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("redis://") {
        (false, r)
    } else if s.contains("://") {
        return Err(format!("{s:?}: scheme must be redis:// or rediss://"));
    } else {
        (false, s)
    };
    let rest = rest.split('/').next().unwrap_or_default();
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (
                (!user.is_empty()).then(|| user.to_string()),
                Some(pass.to_string()),
            ),
            None => (None, Some(u.to_string())),
        },
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, p) = h
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), ""),
        }
    };
    if host.is_empty() {
        return Err(format!("{s:?}: missing host"));
    }
    let port = if port.is_empty() {
        6379
    } else {
        port.parse::<u16>()
            .map_err(|_| format!("{s:?}: bad port {port:?}"))?
    };
    Ok(Seed {
        host,
        port,
        tls,
        username,
        password,
    })
}

impl Config {
    /// Loads defaults < file < environment < overrides, then validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, StartError> {
        let mut cfg = match file {
            Some(path) => {
                if !path.exists() {
                    return Err(StartError::Config(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                use figment::providers::{Format, Toml, Yaml};
                let yaml = path.extension().is_some_and(|e| {
                    e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml")
                });
                let fig = if yaml {
                    figment::Figment::new().merge(Yaml::file(path))
                } else {
                    figment::Figment::new().merge(Toml::file(path))
                };
                let mut cfg = fig
                    .extract::<Config>()
                    .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
                let top = [
                    fig.contains("l1"),
                    fig.contains("upstream"),
                    fig.contains("l3"),
                ];
                cfg.lift_seed_cache(top)
                    .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
                cfg
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        if let Some(v) = &overrides.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = &overrides.admin_listen {
            cfg.admin_listen = v.clone();
        }
        if let Some(v) = &overrides.upstream {
            cfg.upstream.seeds = split_list(v);
        }
        if let Some(v) = &overrides.tls_cert {
            cfg.tls.cert_file = v.clone();
        }
        if let Some(v) = &overrides.tls_key {
            cfg.tls.key_file = v.clone();
        }
        if let Some(v) = &overrides.tls_ca_cert {
            cfg.tls.client_ca_file = v.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Moves the seed's `cache:` block (`l1`, `l2`, `l3`) to the top-level sections. A
    /// section given both ways is an error rather than a silent choice.
    /// `top` says whether the file has the top-level `l1`, `upstream` and `l3` sections
    /// (present, even with default values, is still given twice).
    fn lift_seed_cache(&mut self, top: [bool; 3]) -> Result<(), String> {
        let Some(block) = self.seed_cache.take() else {
            return Ok(());
        };
        let [has_l1, has_upstream, has_l3] = top;
        if let Some(l1) = block.l1 {
            if has_l1 {
                return Err("both cache.l1 and [l1] are set; keep one".into());
            }
            self.l1 = l1;
        }
        if let Some(l2) = block.l2 {
            if has_upstream {
                return Err("both cache.l2 and [upstream] are set; keep one".into());
            }
            self.upstream = l2;
        }
        if let Some(l3) = block.l3 {
            if has_l3 {
                return Err("both cache.l3 and [l3] are set; keep one".into());
            }
            self.l3 = l3;
        }
        Ok(())
    }

    /// The runtime's worker threads: `worker_threads`, or by default one per core but
    /// one (at least one). The core left over is the kernel's: on loopback and on small
    /// machines it carries the TCP work of every request, and the clients run there too.
    /// Measured on 2 cores: one worker served 5-50 % more than two at pipeline depth 1
    /// and 16, forwarding and from L1 (`bench/README.md`).
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .saturating_sub(1)
                .max(1),
            n => n,
        }
    }

    /// Environment overrides, using the seed application's names where they exist.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), StartError> {
        if let Some(v) = get("REDIS_ADDR") {
            self.upstream.seeds = split_list(&v);
        }
        if let Some(v) = get("REDIS_PASSWORD") {
            self.upstream.password = Some(v);
        }
        if let Some(v) = get("REDIS_TLS_CA_FILE") {
            self.upstream.tls_ca_file = v;
        }
        if let Some(v) = get("REDIS_USERNAME") {
            self.upstream.username = Some(v);
        }
        if let Some(v) = get("TIERPROXY_NAMESPACE") {
            self.namespace = v;
        }
        if let Some(v) = get("TIERPROXY_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("TIERPROXY_WORKER_THREADS") {
            self.worker_threads = v.trim().parse().map_err(|_| {
                StartError::Config(format!(
                    "TIERPROXY_WORKER_THREADS: expected a number of threads, got {v:?}"
                ))
            })?;
        }
        if let Some(v) = get("TIERPROXY_ADMIN_LISTEN") {
            self.admin_listen = v;
        }
        if let Some(v) = get("TIERPROXY_TLS_CERT") {
            self.tls.cert_file = v;
        }
        if let Some(v) = get("TIERPROXY_TLS_KEY") {
            self.tls.key_file = v;
        }
        if let Some(v) = get("TIERPROXY_TLS_CA_CERT") {
            self.tls.client_ca_file = v;
        }
        if let Some(v) = get("TIERPROXY_PASSWORD") {
            self.auth.password = Some(v);
        }
        if let Some(v) = get("CACHE_L1_ENABLED") {
            self.l1.enabled = parse_bool(&v).ok_or_else(|| {
                StartError::Config(format!(
                    "CACHE_L1_ENABLED (l1.enabled): {v:?} is not a boolean"
                ))
            })?;
        }
        if let Some(v) = get("CACHE_L1_MAX_SIZE") {
            self.l1.max_entries = v.trim().parse().map_err(|_| {
                StartError::Config(format!(
                    "CACHE_L1_MAX_SIZE (l1.max_entries): {v:?} is not a number"
                ))
            })?;
        }
        if let Some(v) = get("CACHE_L1_DEFAULT_TTL") {
            self.l1.default_ttl_ms = parse_duration_ms(&v).ok_or_else(|| {
                StartError::Config(format!(
                    "CACHE_L1_DEFAULT_TTL (l1.default_ttl_ms): {v:?} is not a duration like 300s or 5m"
                ))
            })?;
        }
        if let Some(v) = get("CACHE_L3_ENABLED") {
            self.l3.enabled = parse_bool(&v).ok_or_else(|| {
                StartError::Config(format!(
                    "CACHE_L3_ENABLED (l3.enabled): {v:?} is not a boolean"
                ))
            })?;
        }
        if let Some(v) = get("CACHE_L3_THRESHOLD_BYTES") {
            self.l3.threshold_bytes = v.trim().parse().map_err(|_| {
                StartError::Config(format!(
                    "CACHE_L3_THRESHOLD_BYTES (l3.threshold_bytes): {v:?} is not a number"
                ))
            })?;
        }
        if let Some(v) = get("CACHE_L2_COMPRESSION_MIN_BYTES") {
            self.l3.compression_min_bytes = v.trim().parse().map_err(|_| {
                StartError::Config(format!(
                    "CACHE_L2_COMPRESSION_MIN_BYTES (l3.compression_min_bytes): {v:?} is not a number"
                ))
            })?;
        }
        if let Some(v) = get("CACHE_L3_DIR") {
            self.l3.dir = v;
        }
        if let Some(v) = get("CACHE_L3_BUCKET") {
            self.l3.bucket = v;
        }
        if let Some(v) = get("CACHE_L3_PREFIX") {
            self.l3.prefix = v;
        }
        if let Some(v) = get("CACHE_L3_SIGNING_KEY") {
            self.l3.signing_key = v;
        }
        if let Some(v) = get("TIERPROXY_METRICS_PREFIX") {
            self.metrics.prefix = v;
        }
        if let Some(v) = get("TIERPROXY_MAXCLIENTS") {
            self.client.maxclients = v.parse().map_err(|_| {
                StartError::Config(format!(
                    "TIERPROXY_MAXCLIENTS (client.maxclients): {v:?} is not a number"
                ))
            })?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |key: &str, why: String| Err(StartError::Config(format!("{key}: {why}")));
        if let Err(e) = self.listen.parse::<std::net::SocketAddr>() {
            return bad(
                "listen",
                format!("{:?} is not an ip:port address ({e})", self.listen),
            );
        }
        if !self.admin_listen.is_empty() {
            if let Err(e) = self.admin_listen.parse::<std::net::SocketAddr>() {
                return bad(
                    "admin_listen",
                    format!("{:?} is not an ip:port address ({e})", self.admin_listen),
                );
            }
        }
        if self.upstream.seeds.is_empty() {
            return bad("upstream.seeds", "at least one seed is required".into());
        }
        for s in &self.upstream.seeds {
            if let Err(e) = parse_seed(s) {
                return bad("upstream.seeds", e);
            }
        }
        let u = &self.upstream;
        // Redis refuses names with spaces, newlines or other non-printable characters.
        if u.client_name.bytes().any(|b| !(b'!'..=b'~').contains(&b)) {
            return bad(
                "upstream.client_name",
                format!(
                    "{:?}: only printable ASCII without spaces (CLIENT SETNAME's rule)",
                    u.client_name
                ),
            );
        }
        for (key, v) in [
            ("upstream.connect_timeout_ms", u.connect_timeout_ms),
            ("upstream.request_timeout_ms", u.request_timeout_ms),
            (
                "upstream.topology_refresh_interval_ms",
                u.topology_refresh_interval_ms,
            ),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0".into());
            }
        }
        if self.worker_threads > 1024 {
            return bad("worker_threads", "must be at most 1024".into());
        }
        if u.connections_per_node == 0 || u.connections_per_node > 64 {
            return bad("upstream.connections_per_node", "must be 1..=64".into());
        }
        if u.pinned_max_per_node == 0 {
            return bad(
                "upstream.pinned_max_per_node",
                "must be greater than 0".into(),
            );
        }
        if !u.tls_ca_file.is_empty() && !Path::new(&u.tls_ca_file).is_file() {
            return bad(
                "upstream.tls_ca_file",
                format!("{:?} is not a readable file", u.tls_ca_file),
            );
        }
        if u.iam.enabled {
            for (key, v) in [
                ("upstream.iam.user_id", &u.iam.user_id),
                ("upstream.iam.cache_name", &u.iam.cache_name),
                ("upstream.iam.region", &u.iam.region),
            ] {
                if v.is_empty() {
                    return bad(key, "is required with upstream.iam.enabled".into());
                }
            }
            if !self.upstream_tls() {
                return bad(
                    "upstream.iam.enabled",
                    "ElastiCache accepts IAM authentication only over TLS: set upstream.tls = true or use rediss:// seeds".into(),
                );
            }
        }
        let c = &self.client;
        if c.maxclients == 0 {
            return bad("client.maxclients", "must be greater than 0".into());
        }
        if c.max_inflight == 0 {
            return bad("client.max_inflight", "must be greater than 0".into());
        }
        if c.proto_max_bulk_len < 1024 || c.proto_max_bulk_len > i64::MAX as u64 {
            return bad("client.proto_max_bulk_len", "must be at least 1024".into());
        }
        if c.query_buffer_limit < 1024 * 1024 {
            return bad("client.query_buffer_limit", "must be at least 1 MiB".into());
        }
        if c.output_buffer_limit < 16 * 1024 {
            return bad(
                "client.output_buffer_limit",
                "must be at least 16 KiB".into(),
            );
        }
        let t = &self.tls;
        if t.enabled() || !t.key_file.is_empty() {
            for (key, v) in [
                ("tls.cert_file", &t.cert_file),
                ("tls.key_file", &t.key_file),
            ] {
                if v.is_empty() {
                    return bad(key, "is required when the listener uses TLS".into());
                }
                if !Path::new(v).is_file() {
                    return bad(key, format!("{v:?} is not a readable file"));
                }
            }
        }
        if !t.client_ca_file.is_empty() {
            if !t.enabled() {
                return bad(
                    "tls.client_ca_file",
                    "needs tls.cert_file and tls.key_file".into(),
                );
            }
            if !Path::new(&t.client_ca_file).is_file() {
                return bad(
                    "tls.client_ca_file",
                    format!("{:?} is not a readable file", t.client_ca_file),
                );
            }
        }
        if !matches!(t.auth_clients.as_str(), "yes" | "optional") {
            return bad(
                "tls.auth_clients",
                format!("{:?} must be \"yes\" or \"optional\"", t.auth_clients),
            );
        }
        if t.handshake_timeout_ms == 0 {
            return bad("tls.handshake_timeout_ms", "must be greater than 0".into());
        }
        for (i, user) in self.auth.users.iter().enumerate() {
            let h = &user.password_sha256;
            if user.name.is_empty() {
                return bad(&format!("auth.users[{i}].name"), "must not be empty".into());
            }
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(
                    &format!("auth.users[{i}].password_sha256"),
                    "must be 64 hex digits (sha256 of the password)".into(),
                );
            }
        }
        let l1 = &self.l1;
        for (key, v) in [
            ("l1.max_bytes", l1.max_bytes),
            ("l1.max_entries", l1.max_entries),
            ("l1.max_value_bytes", l1.max_value_bytes),
            ("l1.default_ttl_ms", l1.default_ttl_ms),
            ("l1.max_ttl_ms", l1.max_ttl_ms),
            ("l1.admit_window_ms", l1.admit_window_ms),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0".into());
            }
        }
        if l1.admit_after_reads == 0 {
            return bad("l1.admit_after_reads", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&l1.refresh_ahead_ratio) {
            return bad(
                "l1.refresh_ahead_ratio",
                format!(
                    "{}: must be at least 0 and less than 1",
                    l1.refresh_ahead_ratio
                ),
            );
        }
        if l1.warm_keys_per_sec == 0 {
            return bad("l1.warm_keys_per_sec", "must be greater than 0".into());
        }
        for (key, ns) in std::iter::once(("namespace", &self.namespace)).chain(
            self.auth
                .users
                .iter()
                .filter_map(|u| u.namespace.as_ref().map(|n| ("auth.users.namespace", n))),
        ) {
            // A brace would change which part of a key Redis hashes (its hash tag).
            if ns.contains(['{', '}']) {
                return bad(key, format!("{ns:?}: must not contain braces (hash tags)"));
            }
        }
        if !matches!(l1.coherence.as_str(), "tracking" | "ttl") {
            return bad(
                "l1.coherence",
                format!("{:?}: must be \"tracking\" or \"ttl\"", l1.coherence),
            );
        }
        let l3 = &self.l3;
        if l3.enabled {
            if !l3.bucket.is_empty() && l3.signing_key.len() < 16 {
                return bad(
                    "l3.signing_key",
                    "the S3 store needs a signing key of at least 16 bytes (CACHE_L3_SIGNING_KEY), shared by every proxy".into(),
                );
            }
            if l3.bucket.is_empty() && l3.dir.is_empty() {
                return bad("l3.dir", "must not be empty".into());
            }
        }
        if !matches!(l3.sse.as_str(), "" | "AES256" | "aws:kms") {
            return bad(
                "l3.sse",
                format!("{:?}: must be \"\", \"AES256\" or \"aws:kms\"", l3.sse),
            );
        }
        if l3.part_size_bytes < 5 * 1024 * 1024 {
            return bad(
                "l3.part_size_bytes",
                "must be at least 5 MiB (S3's minimum part)".into(),
            );
        }
        if l3.multipart_threshold_bytes < l3.part_size_bytes {
            return bad(
                "l3.multipart_threshold_bytes",
                "must be at least l3.part_size_bytes".into(),
            );
        }
        if l3.threshold_bytes < 1024 {
            return bad("l3.threshold_bytes", "must be at least 1024".into());
        }
        if l3.compression_min_bytes > 0 && l3.compression_min_bytes < 128 {
            return bad(
                "l3.compression_min_bytes",
                "must be 0 (off) or at least 128: the envelope alone is 90 bytes".into(),
            );
        }
        if !(1..=22).contains(&l3.zstd_level) {
            return bad("l3.zstd_level", "must be 1..=22".into());
        }
        if l3.timeout_ms == 0 {
            return bad("l3.timeout_ms", "must be greater than 0".into());
        }
        if l3.prefix.starts_with('/') || l3.prefix.contains("..") {
            return bad("l3.prefix", "must be a relative name without '..'".into());
        }
        let p = self.metrics.prefix.as_bytes();
        let name_char = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b':';
        if p.is_empty() || p[0].is_ascii_digit() || !p.iter().all(name_char) {
            return bad(
                "metrics.prefix",
                format!(
                    "{:?}: must match [a-zA-Z_:][a-zA-Z0-9_:]* (a Prometheus name)",
                    self.metrics.prefix
                ),
            );
        }
        if self.slowlog.max_len > 1_000_000 {
            return bad("slowlog.max_len", "must be at most 1000000".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad(
                "log.format",
                format!("{:?}: must be \"text\" or \"json\"", self.log.format),
            );
        }
        Ok(())
    }

    /// Whether upstream connections use TLS.
    pub fn upstream_tls(&self) -> bool {
        self.upstream.tls || self.seeds().iter().any(|s| s.tls)
    }

    pub fn seeds(&self) -> Vec<Seed> {
        // validate() has checked every seed parses.
        self.upstream
            .seeds
            .iter()
            .filter_map(|s| parse_seed(s).ok())
            .collect()
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse() {
        assert_eq!(parse_seed("127.0.0.1:7000").unwrap().port, 7000);
        let s = parse_seed("rediss://app:s3cr:et@cache.example:6380/0").unwrap();
        assert!(s.tls);
        assert_eq!(s.username.as_deref(), Some("app"));
        assert_eq!(s.password.as_deref(), Some("s3cr:et"));
        assert_eq!(s.addr(), "cache.example:6380");
        let s = parse_seed("redis://:pw@[::1]:7001").unwrap();
        assert_eq!(s.username, None);
        assert_eq!(s.addr(), "[::1]:7001");
        assert!(parse_seed("http://x").is_err());
        assert!(parse_seed("h:notaport").is_err());
    }

    #[test]
    fn seed_durations() {
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("300"), Some(300_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("2h"), Some(7_200_000));
        assert_eq!(parse_duration_ms("5 weeks"), None);
    }

    #[test]
    fn env_precedence_and_validation() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "REDIS_ADDR" => Some("a:1, b:2".into()),
            "TIERPROXY_MAXCLIENTS" => Some("7".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.upstream.seeds, vec!["a:1", "b:2"]);
        assert_eq!(c.client.maxclients, 7);
        c.client.max_inflight = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("client.max_inflight"), "{e}");
    }

    #[test]
    fn upstream_client_name_follows_redis_rules() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.upstream.client_name = String::new();
        assert!(c.validate().is_ok(), "empty means no name");
        for bad in ["two words", "line\nbreak", "é"] {
            c.upstream.client_name = bad.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("upstream.client_name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn worker_threads_default_to_one_per_core_but_one() {
        let mut c = Config::default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.workers(), cores.saturating_sub(1).max(1));
        c.apply_env(|k| (k == "TIERPROXY_WORKER_THREADS").then(|| "3".into()))
            .unwrap();
        assert_eq!(c.workers(), 3);
        let e = c
            .apply_env(|k| (k == "TIERPROXY_WORKER_THREADS").then(|| "many".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("TIERPROXY_WORKER_THREADS"), "{e}");
        c.worker_threads = 5000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("worker_threads"), "{e}");
    }
}
