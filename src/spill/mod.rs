//! L3: values over the threshold are stored, zstd-compressed, in a [`store::Store`],
//! and Redis holds a small authenticated [`stub::Stub`] in their place.
//!
//! Writes: compress → put the object under a new unique name (durable first) → only then
//! write the stub with the client's own command. A write Redis did not perform (NX/XX,
//! an error) deletes the object; anything uncertain is left for the sweeper.
//! Reads: a reply that is a stub is resolved — fetch (concurrent reads of one object
//! share one fetch), check the length, decompress, verify the checksum — and the
//! client sees its original value.

pub mod store;
pub mod stub;
pub mod sweep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use rand::RngCore;
use tokio::sync::oneshot;

use crate::config::L3Config;
use crate::error::StartError;
use store::{DirStore, Store, StoreError};
use stub::{Body, Codec, Stub, StubError};

const RMW_STRIPES: usize = 256;

/// Compression runs on the blocking pool above this size, not on a runtime worker.
const BLOCKING_ABOVE: usize = 64 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpillError {
    #[error("spill store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Stub(#[from] StubError),
    #[error("spilled value corrupt: {0}")]
    Corrupt(String),
}

#[derive(Default)]
pub struct SpillStats {
    pub writes: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_out: AtomicU64,
    pub merged_reads: AtomicU64,
    pub errors: AtomicU64,
    pub discarded: AtomicU64,
    pub store_ms_total: AtomicU64,
    pub store_ops: AtomicU64,
    /// Store call latency per operation (put, get, delete): a histogram.
    pub latency: [Histogram; 3],
    /// Store call failures by operation and kind (see `StoreError::kind`).
    pub failures: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// GETRANGE/SUBSTR answered with a ranged store read.
    pub ranged_reads: AtomicU64,
    /// In-Redis compression (values between `compression_min_bytes` and the threshold).
    pub compressed_writes: AtomicU64,
    pub compressed_bytes_in: AtomicU64,
    pub compressed_bytes_stored: AtomicU64,
    /// Unreferenced objects deleted by the sweeper.
    pub swept: AtomicU64,
}

/// Upper bounds (seconds) of the store latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
pub const STORE_OPS: [&str; 3] = ["put", "get", "delete"];
const OP_PUT: usize = 0;
const OP_GET: usize = 1;
const OP_DELETE: usize = 2;

/// A fixed-bucket latency histogram in atomics (rendered as a Prometheus histogram).
#[derive(Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    pub buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    pub sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

type Waiters = Vec<oneshot::Sender<Result<Bytes, SpillError>>>;

pub struct Spill {
    /// Values longer than this are spilled (reloadable: `l3.threshold_bytes`).
    threshold: std::sync::atomic::AtomicUsize,
    /// In-Redis compression from this size up (below the threshold); 0 = off.
    pub compress_min: usize,
    key: Vec<u8>,
    prefix: String,
    level: i32,
    timeout: Duration,
    pub store: Store,
    inflight: Mutex<HashMap<String, Waiters>>,
    /// Read-modify-writes of one key through this proxy take turns (striped by key hash):
    /// optimistic retries then only race other proxies and direct clients.
    rmw_locks: Vec<tokio::sync::Mutex<()>>,
    pub stats: SpillStats,
}

impl Spill {
    pub async fn new(cfg: &L3Config) -> Result<Spill, StartError> {
        let err = |m: String| StartError::Config(m);
        let dir = std::path::Path::new(&cfg.dir);
        let store = if cfg.bucket.is_empty() {
            Store::Dir(DirStore::new(dir).map_err(|e| err(format!("l3.dir {}: {e}", cfg.dir)))?)
        } else {
            Store::S3(store::S3Store::new(cfg).await.map_err(err)?)
        };
        let key = if !cfg.signing_key.is_empty() {
            cfg.signing_key.as_bytes().to_vec()
        } else {
            local_signing_key(dir)
                .map_err(|e| err(format!("l3.dir {}: signing key: {e}", cfg.dir)))?
        };
        Ok(Spill {
            threshold: std::sync::atomic::AtomicUsize::new(cfg.threshold_bytes as usize),
            compress_min: cfg.compression_min_bytes as usize,
            key,
            prefix: cfg.prefix.clone(),
            level: cfg.zstd_level,
            timeout: Duration::from_millis(cfg.timeout_ms),
            store,
            inflight: Mutex::new(HashMap::new()),
            rmw_locks: (0..RMW_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            stats: SpillStats::default(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lock a read-modify-write of `key` holds while it runs.
    pub fn rmw_lock(&self, key: &[u8]) -> &tokio::sync::Mutex<()> {
        // FNV-1a: a fixed hash, so every request for a key picks the same stripe.
        let stripe = key.iter().fold(0xcbf29ce484222325u64, |a, &b| {
            (a ^ b as u64).wrapping_mul(0x100000001b3)
        });
        &self.rmw_locks[(stripe as usize) % self.rmw_locks.len()]
    }

    /// Whether a value written by a client may not go to Redis as it is: it is spilled,
    /// compressed, or escaped because it looks like a stub.
    pub fn must_wrap(&self, value: &[u8]) -> bool {
        value.len() > self.threshold()
            || stub::is_stub(value)
            || (self.compress_min > 0 && value.len() >= self.compress_min)
    }

    /// A value under the threshold: compressed into an inline envelope when compression
    /// is on and pays (envelope included), escaped if it looks like a stub, else as is.
    fn wrap_small(&self, value: Bytes) -> Bytes {
        if self.compress_min > 0 && value.len() >= self.compress_min {
            if let Ok(c) = zstd::bulk::compress(&value, self.level) {
                if c.len() + stub::ENVELOPE < value.len() {
                    let st = &self.stats;
                    st.compressed_writes.fetch_add(1, Ordering::Relaxed);
                    st.compressed_bytes_in
                        .fetch_add(value.len() as u64, Ordering::Relaxed);
                    let stub = Stub {
                        codec: Codec::Zstd,
                        original_len: value.len() as u64,
                        stored_len: c.len() as u64,
                        checksum: stub::sha256(&value),
                        body: Body::Inline(Bytes::from(c)),
                    };
                    let enc = stub.encode(&self.key);
                    st.compressed_bytes_stored
                        .fetch_add(enc.len() as u64, Ordering::Relaxed);
                    return enc;
                }
            }
        }
        if stub::is_stub(&value) {
            return Stub::inline(value).encode(&self.key);
        }
        value
    }

    /// Runs one store call (`op` is an index into [`STORE_OPS`]) under the timeout,
    /// recording its latency and, if it fails, the kind of failure.
    async fn timed<T>(
        &self,
        op: usize,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let r = tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout.as_millis() as u64)));
        let took = start.elapsed();
        self.stats
            .store_ms_total
            .fetch_add(took.as_millis() as u64, Ordering::Relaxed);
        self.stats.store_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.latency[op].observe(took);
        if let Err(e) = &r {
            let mut f = self
                .stats
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *f.entry((STORE_OPS[op], e.kind())).or_default() += 1;
        }
        r
    }

    /// Turns a client's value into what Redis stores: a stub for a stored object (whose
    /// name is returned, so the caller can discard it if Redis does not take the write),
    /// or the envelope of a small value that merely looks like a stub.
    pub async fn wrap(&self, value: Bytes) -> Result<(Bytes, Option<String>), SpillError> {
        if value.len() <= self.threshold() {
            return Ok((self.wrap_small(value), None));
        }
        let level = self.level;
        let original = value.clone();
        let compress = move || -> (Codec, Bytes, [u8; 32]) {
            let sum = stub::sha256(&original);
            match zstd::bulk::compress(&original, level) {
                Ok(c) if c.len() < original.len() => (Codec::Zstd, Bytes::from(c), sum),
                _ => (Codec::Raw, original, sum),
            }
        };
        let (codec, stored, checksum) = if value.len() > BLOCKING_ABOVE {
            tokio::task::spawn_blocking(compress)
                .await
                .map_err(|e| SpillError::Corrupt(format!("compression task: {e}")))?
        } else {
            compress()
        };
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("{}{}/{}", self.prefix, &hex[..2], hex);
        let stub = Stub {
            codec,
            original_len: value.len() as u64,
            stored_len: stored.len() as u64,
            checksum,
            body: Body::Object(name.clone()),
        };
        let stored_len = stored.len() as u64;
        if let Err(e) = self.timed(OP_PUT, self.store.put(&name, stored)).await {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            // A timed-out put may still land: make sure it does not linger.
            let _ = self.timed(OP_DELETE, self.store.delete(&name)).await;
            return Err(e.into());
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        self.stats
            .bytes_stored
            .fetch_add(stored_len, Ordering::Relaxed);
        Ok((stub.encode(&self.key), Some(name)))
    }

    /// Deletes an object no stub refers to (Redis refused the write).
    pub async fn discard(&self, name: &str) {
        if self.timed(OP_DELETE, self.store.delete(name)).await.is_ok() {
            self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn threshold(&self) -> usize {
        self.threshold.load(Ordering::Relaxed)
    }

    /// SIGHUP: a new threshold applies to the next writes (stubs already written stay
    /// valid whatever it is).
    pub fn set_threshold(&self, bytes: u64) {
        self.threshold.store(bytes as usize, Ordering::Relaxed);
    }

    /// The parsed stub, if `value` is one (no store access).
    pub fn parse(&self, value: &Bytes) -> Option<Result<Stub, StubError>> {
        stub::is_stub(value).then(|| Stub::decode(value, &self.key))
    }

    /// The client's value behind whatever Redis returned.
    pub async fn resolve(&self, value: Bytes) -> Result<Bytes, SpillError> {
        let Some(parsed) = self.parse(&value) else {
            return Ok(value);
        };
        let stub = parsed.inspect_err(|_| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        let out = match (&stub.body, stub.codec) {
            (Body::Inline(p), Codec::Raw) => p.clone(),
            (Body::Inline(p), Codec::Zstd) => {
                if p.len() as u64 != stub.stored_len {
                    return Err(SpillError::Corrupt("inline length mismatch".into()));
                }
                zstd::bulk::decompress(p, stub.original_len as usize)
                    .map(Bytes::from)
                    .map_err(|e| SpillError::Corrupt(format!("zstd: {e}")))?
            }
            (Body::Object(name), _) => {
                let out = self.fetch(name, &stub).await?;
                crate::metrics::mark_store_read();
                out
            }
        };
        if out.len() as u64 != stub.original_len || stub::sha256(&out) != stub.checksum {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(SpillError::Corrupt("checksum mismatch".into()));
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_out
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Bytes `start..=end` (already clamped to the value) of a spilled value. An object
    /// stored raw (incompressible data) is read by range from the store; anything else
    /// is resolved whole and cut. A ranged read cannot check the whole value's checksum:
    /// it relies on the object name, which the authenticated stub names, never being
    /// reused (objects are immutable).
    pub async fn resolve_range(
        &self,
        stub: &Stub,
        value: Bytes,
        start: u64,
        end: u64,
    ) -> Result<Bytes, SpillError> {
        if let (Body::Object(name), Codec::Raw) = (&stub.body, stub.codec) {
            if end < stub.stored_len {
                let len = end - start + 1;
                let r = self
                    .timed(OP_GET, self.store.get_range(name, start, len))
                    .await
                    .inspect_err(|_| {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    })?;
                self.stats.ranged_reads.fetch_add(1, Ordering::Relaxed);
                crate::metrics::mark_store_read();
                self.stats.bytes_out.fetch_add(len, Ordering::Relaxed);
                return Ok(r);
            }
        }
        let all = self.resolve(value).await?;
        Ok(all.slice(start as usize..=end as usize))
    }

    /// Fetches and decodes one object; concurrent fetches of it share one store read.
    async fn fetch(&self, name: &str, stub: &Stub) -> Result<Bytes, SpillError> {
        let rx = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match m.get_mut(name) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    m.insert(name.to_string(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = rx {
            self.stats.merged_reads.fetch_add(1, Ordering::Relaxed);
            return match rx.await {
                Ok(r) => r,
                Err(_) => Err(SpillError::Store(StoreError::Io(
                    "shared read abandoned".into(),
                ))),
            };
        }
        // Whatever happens below, release the waiters.
        struct Release<'a>(&'a Spill, &'a str, Option<Result<Bytes, SpillError>>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let waiters = self
                    .0
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(self.1)
                    .unwrap_or_default();
                if let Some(r) = &self.2 {
                    for w in waiters {
                        let _ = w.send(r.clone());
                    }
                }
            }
        }
        let mut release = Release(self, name, None);
        let result = self.fetch_decode(name, stub).await;
        release.2 = Some(result.clone());
        drop(release);
        result
    }

    async fn fetch_decode(&self, name: &str, stub: &Stub) -> Result<Bytes, SpillError> {
        let stored = self
            .timed(OP_GET, self.store.get(name))
            .await
            .inspect_err(|_| {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            })?;
        if stored.len() as u64 != stub.stored_len {
            return Err(SpillError::Corrupt(format!(
                "object {name} has {} bytes, stub says {}",
                stored.len(),
                stub.stored_len
            )));
        }
        match stub.codec {
            Codec::Raw => Ok(stored),
            Codec::Zstd => {
                let cap = stub.original_len as usize;
                let decode = move || zstd::bulk::decompress(&stored, cap);
                let out = if cap > BLOCKING_ABOVE {
                    tokio::task::spawn_blocking(decode)
                        .await
                        .map_err(|e| SpillError::Corrupt(format!("decompression task: {e}")))?
                } else {
                    decode()
                };
                out.map(Bytes::from)
                    .map_err(|e| SpillError::Corrupt(format!("zstd: {e}")))
            }
        }
    }
}

/// The local store's signing key: generated once, kept in the directory (0600).
fn local_signing_key(dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let path = dir.join(".signing-key");
    match std::fs::read(&path) {
        Ok(k) if k.len() >= 32 => Ok(k),
        _ => {
            let mut k = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut k);
            let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&path, hex.as_bytes())?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(hex.into_bytes())
        }
    }
}
