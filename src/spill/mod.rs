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

type Waiters = Vec<oneshot::Sender<Result<Framed, SpillError>>>;

/// A resolved value inside its own bulk reply, `$<len>\r\n<value>\r\n` (RESP2 and RESP3
/// frame a bulk string alike), built where the value was read or decompressed: the
/// reply goes out as it lies, and the value is never copied into another buffer.
#[derive(Debug, Clone)]
pub struct Framed {
    frame: Bytes,
    header: usize,
}

impl Framed {
    /// A buffer holding the header of a bulk of `len` bytes, with room for the rest.
    fn buffer(len: usize) -> Vec<u8> {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(len).as_bytes();
        let mut buf = Vec::with_capacity(digits.len() + len + 5);
        buf.push(b'$');
        buf.extend_from_slice(digits);
        buf.extend_from_slice(b"\r\n");
        buf
    }

    /// A [`Framed::buffer`] with its value written after the header: checked against the
    /// stub's length and checksum, then closed.
    fn finish(
        mut buf: Vec<u8>,
        original_len: u64,
        checksum: &[u8; 32],
    ) -> Result<Framed, SpillError> {
        let header = buf.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        let value = &buf[header..];
        if value.len() as u64 != original_len || stub::sha256(value) != *checksum {
            return Err(SpillError::Corrupt("checksum mismatch".into()));
        }
        buf.extend_from_slice(b"\r\n");
        Ok(Framed {
            frame: Bytes::from(buf),
            header,
        })
    }

    /// The value alone (a slice of the frame).
    pub fn value(&self) -> Bytes {
        self.frame.slice(self.header..self.frame.len() - 2)
    }

    /// The whole bulk reply.
    pub fn into_frame(self) -> Bytes {
        self.frame
    }
}

/// Decompresses one zstd frame into `buf` after what it holds, to exactly `len` more
/// bytes: the value lands where its reply will be sent from.
fn decompress_into(src: &[u8], buf: &mut Vec<u8>, len: usize) -> Result<(), SpillError> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let corrupt = |what: String| SpillError::Corrupt(format!("zstd: {what}"));
    let start = buf.len();
    buf.reserve_exact(len);
    let mut decoder = Decoder::new().map_err(|e| corrupt(e.to_string()))?;
    // No window beyond what a value of this length needs (the compressor fits it to the
    // value, 1 KiB at least), with room to spare: an object that declares a larger one
    // is refused before its window is allocated.
    let need = usize::BITS - len.saturating_sub(1).leading_zeros();
    decoder
        .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
            (need + 1).clamp(10, 31),
        ))
        .map_err(|e| corrupt(e.to_string()))?;
    let mut input = InBuffer::around(src);
    let mut out = OutBuffer::around_pos(buf, start);
    loop {
        let before = (input.pos(), out.pos());
        let left = decoder
            .run(&mut input, &mut out)
            .map_err(|e| corrupt(e.to_string()))?;
        if left == 0 {
            break;
        }
        if out.pos() - start > len {
            return Err(corrupt(format!("value longer than the stub's {len} bytes")));
        }
        if (input.pos(), out.pos()) == before {
            return Err(corrupt("value cut short".into()));
        }
    }
    // Each step has set the buffer's length to what is written.
    let trailing = input.pos() < src.len();
    if trailing || buf.len() - start != len {
        return Err(corrupt(format!(
            "{} bytes decoded, the stub says {len}",
            buf.len() - start
        )));
    }
    Ok(())
}

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
        if !stub::is_stub(&value) {
            return Ok(value);
        }
        Ok(self.resolve_stub(&value).await?.value())
    }

    /// The value behind a stub (`value` is one: [`stub::is_stub`]), in its bulk reply.
    pub async fn resolve_stub(&self, value: &Bytes) -> Result<Framed, SpillError> {
        let stub = Stub::decode(value, &self.key).inspect_err(|_| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        let original = stub.original_len as usize;
        let framed = match (&stub.body, stub.codec) {
            (Body::Inline(p), Codec::Raw) => {
                let mut buf = Framed::buffer(p.len());
                buf.extend_from_slice(p);
                Framed::finish(buf, stub.original_len, &stub.checksum)
            }
            (Body::Inline(p), Codec::Zstd) if p.len() as u64 != stub.stored_len => {
                Err(SpillError::Corrupt("inline length mismatch".into()))
            }
            (Body::Inline(p), Codec::Zstd) => {
                let mut buf = Framed::buffer(original);
                decompress_into(p, &mut buf, original)
                    .and_then(|()| Framed::finish(buf, stub.original_len, &stub.checksum))
            }
            // Its failures are counted by the read they share (`fetch_decode`).
            (Body::Object(name), _) => self.fetch(name, &stub).await.inspect(|_| {
                crate::metrics::mark_store_read();
            }),
        };
        let framed = framed.inspect_err(|_| {
            if matches!(stub.body, Body::Inline(_)) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_out
            .fetch_add(stub.original_len, Ordering::Relaxed);
        Ok(framed)
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
    async fn fetch(&self, name: &str, stub: &Stub) -> Result<Framed, SpillError> {
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
        struct Release<'a>(&'a Spill, &'a str, Option<Result<Framed, SpillError>>);
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

    /// Reads an object into its reply's buffer (stored raw) or reads it and decompresses
    /// it there (zstd); then checks it against the stub. The value is written once, by
    /// the read or by the decompression, and not copied after (`bench/spill.sh` counts).
    async fn fetch_decode(&self, name: &str, stub: &Stub) -> Result<Framed, SpillError> {
        // Counted once per store read: the readers that shared it are not counted again.
        self.read_object(name, stub).await.inspect_err(|_| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        })
    }

    async fn read_object(&self, name: &str, stub: &Stub) -> Result<Framed, SpillError> {
        let original = stub.original_len as usize;
        let mismatch = |got: usize| {
            SpillError::Corrupt(format!(
                "object {name} has {got} bytes, stub says {}",
                stub.stored_len
            ))
        };
        let (original_len, checksum) = (stub.original_len, stub.checksum);
        let finish: Box<dyn FnOnce() -> Result<Framed, SpillError> + Send> = match stub.codec {
            Codec::Raw => {
                let buf = Framed::buffer(original);
                let header = buf.len();
                let buf = self
                    .timed(OP_GET, self.store.get_into(name, buf, stub.stored_len))
                    .await?;
                if (buf.len() - header) as u64 != stub.stored_len {
                    return Err(mismatch(buf.len() - header));
                }
                Box::new(move || Framed::finish(buf, original_len, &checksum))
            }
            Codec::Zstd => {
                // Never more than the stub's length plus one is read: an object swapped
                // for a huge file costs no more than the real one.
                let room = Vec::with_capacity(stub.stored_len as usize);
                let stored = self
                    .timed(OP_GET, self.store.get_into(name, room, stub.stored_len))
                    .await?;
                if stored.len() as u64 != stub.stored_len {
                    return Err(mismatch(stored.len()));
                }
                Box::new(move || {
                    let mut buf = Framed::buffer(original);
                    decompress_into(&stored, &mut buf, original)?;
                    Framed::finish(buf, original_len, &checksum)
                })
            }
        };
        // Decompression and the checksum take a large value's time off the runtime.
        if original > BLOCKING_ABOVE {
            tokio::task::spawn_blocking(finish)
                .await
                .map_err(|e| SpillError::Corrupt(format!("decoding task: {e}")))?
        } else {
            finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(value: &[u8]) -> Result<Framed, SpillError> {
        let mut buf = Framed::buffer(value.len());
        buf.extend_from_slice(value);
        Framed::finish(buf, value.len() as u64, &stub::sha256(value))
    }

    #[test]
    fn a_framed_value_is_its_own_bulk_reply() {
        for value in [&b""[..], b"v", &[7u8; 100_000]] {
            let f = framed(value).unwrap();
            assert_eq!(&f.value()[..], value);
            let mut want = format!("${}\r\n", value.len()).into_bytes();
            want.extend_from_slice(value);
            want.extend_from_slice(b"\r\n");
            assert_eq!(&f.into_frame()[..], &want[..]);
        }
        let mut buf = Framed::buffer(3);
        buf.extend_from_slice(b"abd");
        assert!(matches!(
            Framed::finish(buf, 3, &stub::sha256(b"abc")),
            Err(SpillError::Corrupt(_))
        ));
        let mut buf = Framed::buffer(3);
        buf.extend_from_slice(b"abcd");
        assert!(Framed::finish(buf, 3, &stub::sha256(b"abc")).is_err());
    }

    #[test]
    fn decompression_writes_after_the_header_and_checks_the_length() {
        let value: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let z = zstd::bulk::compress(&value, 3).unwrap();
        let mut buf = Framed::buffer(value.len());
        let header = buf.clone();
        decompress_into(&z, &mut buf, value.len()).unwrap();
        assert_eq!(&buf[..header.len()], &header[..]);
        assert_eq!(&buf[header.len()..], &value[..]);
        // The stub's length is the bound, both ways (3 short: past the buffer's spare
        // room, refused while decoding; 1 short: by the final length check).
        for len in [value.len() - 3, value.len() - 1, value.len() + 1, 0] {
            let mut buf = Framed::buffer(len);
            assert!(decompress_into(&z, &mut buf, len).is_err(), "{len}");
        }
        // Cut short, trailing bytes, not zstd at all.
        let mut buf = Framed::buffer(value.len());
        assert!(decompress_into(&z[..z.len() - 1], &mut buf, value.len()).is_err());
        let mut long = z.clone();
        long.push(0);
        let mut buf = Framed::buffer(value.len());
        assert!(decompress_into(&long, &mut buf, value.len()).is_err());
        let mut buf = Framed::buffer(value.len());
        assert!(decompress_into(&value[..1000], &mut buf, value.len()).is_err());
        // A frame that declares no size and a window far beyond the value's (what a
        // tampered object could) is refused, not given its window.
        let small = &value[..2000];
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(27))
            .unwrap();
        std::io::Write::write_all(&mut enc, small).unwrap();
        let z = enc.finish().unwrap();
        let mut buf = Framed::buffer(small.len());
        let e = decompress_into(&z, &mut buf, small.len()).unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
        // What the proxy writes (bulk, size known) decodes at every size around a
        // power of two, where the window bound is tightest.
        for n in [0usize, 1, 1023, 1024, 1025, 65_536, 65_537, 1 << 20] {
            let v: Vec<u8> = (0..n).map(|i| (i * 7 % 253) as u8).collect();
            let z = zstd::bulk::compress(&v, 19).unwrap();
            let mut buf = Framed::buffer(n);
            let header = buf.len();
            decompress_into(&z, &mut buf, n).unwrap();
            assert_eq!(&buf[header..], &v[..], "{n}");
        }
    }
}
