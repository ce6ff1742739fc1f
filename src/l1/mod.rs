//! L1: the in-process cache of hot keys' replies, kept coherent with Redis.
//!
//! - Entries are stored per key: one key holds the replies of every exact cached
//!   command about it (`GET k`, `HGET k f`, …, per protocol version), so one invalidation
//!   of the key drops them all.
//! - Bounded by bytes and by entries at once: every entry weighs at least
//!   `max_bytes / max_entries`, so the byte budget also caps the entry count.
//! - Admission: a key is cached only after `admit_after_reads` reads within the window.
//! - TTL mirrored: an entry expires at the key's remaining TTL in Redis (read in the same
//!   round trip), never later than `max_ttl`.
//! - The fill race: a read records the generation of its key's bucket before it is sent;
//!   its reply is cached only if no invalidation of that bucket (or flush) happened
//!   meanwhile. The check is repeated after the insert, so an invalidation racing the
//!   insert itself still wins.
//!
//! Invalidations come from three places: writes through this proxy ([`crate::route`]),
//! Redis's server-assisted tracking ([`tracking`]), and anything that may have lost
//! invalidations (a tracked connection closing, topology changes, FLUSHALL): a flush.

pub mod tracking;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::policy::Expiry;
use moka::sync::Cache;
use tokio::sync::oneshot;

use crate::config::L1Config;

/// Generation buckets for the fill-race guard (a key maps to one by hash).
const GEN_BUCKETS: usize = 1 << 16;
/// Bookkeeping bytes charged per entry on top of its data.
const ENTRY_OVERHEAD: usize = 96;
/// Slots of the hot front (see [`Front`]); a power of two, at most `GEN_BUCKETS`. 512
/// KiB of pointers; the entries are moka's own. 4,096 slots served about half of a
/// zipf read load over 100k keys from moka; this many, a tenth.
const FRONT_SLOTS: usize = 1 << 16;
/// Entries weighing more than this (key, signatures, replies and their bookkeeping, as
/// moka weighs them) stay out of the front: for large values moka's bookkeeping is a
/// small part of a hit.
const FRONT_MAX_ENTRY: usize = 16 * 1024;
/// One front hit in this many also reads the entry in moka, so that its admission and
/// eviction policy still sees which keys are hot.
const FRONT_TOUCH_EVERY: u32 = 32;
/// A slot's live occupant gives way to another key on one install in this many: the
/// hotter key of two sharing a slot ends up holding it.
const FRONT_DISPLACE_EVERY: u32 = 8;

/// How L1 learns of writes made elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coherence {
    /// Redis server-assisted client-side caching (CLIENT TRACKING … REDIRECT).
    Tracking,
    /// No tracking: entries live at most `max_ttl` and may be stale until then.
    Ttl,
}

/// One cached reply to one exact request about a key.
pub struct Cached {
    /// Protocol byte + the exact request bytes (name lower-cased).
    sig: Bytes,
    reply: Bytes,
    /// Its own lifetime: filling another reply of the key does not extend it.
    expires_at: Instant,
    /// Where its refresh-ahead window starts (the last `refresh_ahead_ratio` of its
    /// life, by the ratio of its fill); `None`: no refresh-ahead.
    refresh_at: Option<Instant>,
    /// Hits in the refresh-ahead window (the last `refresh_ahead_ratio` of its life).
    reads: AtomicU32,
    /// A refresh-ahead of it is in flight: one per reply at a time.
    refreshing: AtomicBool,
    /// Set by its fill once no invalidation is found to have raced the insert: until
    /// then it is in moka but not served (a write that went through entirely between
    /// the fill's first check and its insert would otherwise be read over).
    confirmed: AtomicBool,
}

impl Cached {
    /// Whether it may be served: confirmed by its fill and not expired.
    fn servable(&self, now: Instant) -> bool {
        self.expires_at > now && self.confirmed.load(Ordering::Acquire)
    }

    fn new(sig: Bytes, reply: Bytes, now: Instant, ttl: Duration, ratio: f64) -> Cached {
        let expires_at = now + ttl;
        Cached {
            sig,
            reply,
            expires_at,
            refresh_at: (ratio > 0.0).then(|| expires_at - ttl.mul_f64(ratio.min(1.0))),
            reads: AtomicU32::new(0),
            refreshing: AtomicBool::new(false),
            confirmed: AtomicBool::new(false),
        }
    }
}

/// A hit: the reply, and whether the caller should refresh it ahead of its expiry (the
/// caller won the reply's refresh flag, see [`L1::refresh_done`]).
pub struct Hit {
    pub reply: Bytes,
    pub refresh: bool,
}

/// One cached key: the replies of the commands read about it.
#[derive(Clone)]
pub struct KeyEntry {
    replies: Arc<Vec<Arc<Cached>>>,
    /// The latest of its replies' expiries.
    expires_at: Instant,
    /// The flush epoch it was filled in: served only while that is current.
    epoch: u64,
}

impl KeyEntry {
    fn bytes(&self, key: &[u8]) -> usize {
        key.len()
            + ENTRY_OVERHEAD
            + self
                .replies
                .iter()
                .map(|c| c.sig.len() + c.reply.len() + 64)
                .sum::<usize>()
    }
}

type KeyCache = Cache<Bytes, KeyEntry, ahash::RandomState>;

/// The hot front of L1: a small direct-mapped table (by key hash) of entries read
/// lately, consulted before moka. A hit here costs no shared write: no read-log entry,
/// no clock read (the caller's time is used), no reference count. It holds only what
/// moka held when it was read:
/// - an entry is served only while its key's generation bucket is the one it was read
///   under (every invalidation bumps it, before and again after moka's removal, so an
///   entry read from moka just before a removal is never served after it), its flush
///   epoch is current and no write through this proxy is in flight;
/// - entries leave with their key's invalidation, moka's eviction, and every flush, and
///   only entries up to [`FRONT_MAX_ENTRY`] enter. An entry is looked up in moka again
///   after it is put in the front, and taken out if moka no longer holds it (an eviction
///   whose notice ran first), so the front holds nothing beyond moka's budget.
/// - a fill puts its reply in the front too, under the generation its read started in.
struct Front {
    slots: Box<[arc_swap::ArcSwapOption<FrontEntry>]>,
}

/// One reply of a key, laid out for a hit to touch as little memory as it can: the
/// checks are in the entry itself, and the signature names the key (a signature that
/// matches the request is about the request's key), so a hit reads the entry, the
/// signature and the reply, not the key or moka's entry.
struct FrontEntry {
    /// The key's generation bucket when the entry was read from moka or filled.
    gen: u64,
    /// The flush epoch of its moka entry.
    epoch: u64,
    /// The reply's own expiry, and when its key's entry expires (for displacement).
    expires_at: Instant,
    key_expires_at: Instant,
    sig: Bytes,
    reply: Bytes,
    /// Its key's full hash, for removal and displacement (not the key: a copy of it
    /// would be memory outside moka's budget). Keys whose hashes collide in all 64 bits
    /// may take each other's entry out: a lost hit, never a wrong one.
    hash: u64,
    /// The reply's refresh-ahead bookkeeping, read only inside its refresh window.
    cached: Arc<Cached>,
}

impl Front {
    fn new() -> Front {
        Front {
            slots: (0..FRONT_SLOTS)
                .map(|_| arc_swap::ArcSwapOption::empty())
                .collect(),
        }
    }

    fn slot(&self, hash: u64) -> &arc_swap::ArcSwapOption<FrontEntry> {
        &self.slots[hash as usize & (self.slots.len() - 1)]
    }

    /// Drops the entry of the key with this hash, if its slot holds it.
    fn remove(&self, hash: u64) {
        let slot = self.slot(hash);
        let cur = slot.load();
        if cur.as_ref().is_some_and(|f| f.hash == hash) {
            slot.compare_and_swap(&*cur, None);
        }
    }

    fn clear(&self) {
        for s in self.slots.iter() {
            s.store(None);
        }
    }
}

/// The hash that places a key in its generation bucket and its front slot.
fn hash_of(hasher: &ahash::RandomState, key: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(key);
    h.finish()
}

/// A cheap per-thread counter: true once in `every` calls.
fn one_in(every: u32) -> bool {
    thread_local! {
        static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    TICK.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        n % every == 0
    })
}

/// A cache bounded by bytes and entries at once: every entry weighs at least
/// `max_bytes / max_entries`.
fn build_cache(
    max_bytes: u64,
    max_entries: u64,
    evictions: Arc<AtomicU64>,
    front: Arc<Front>,
    buckets: Arc<[Bucket]>,
    hasher: ahash::RandomState,
) -> KeyCache {
    let min_weight = (max_bytes / max_entries.max(1)).max(1);
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(move |k: &Bytes, v: &KeyEntry| {
            (v.bytes(k) as u64).max(min_weight).min(u32::MAX as u64) as u32
        })
        .expire_after(ExpireAt)
        .eviction_listener(move |k, _v, cause| {
            if cause == RemovalCause::Size {
                evictions.fetch_add(1, Ordering::Relaxed);
            }
            let hash = hash_of(&hasher, &k);
            // Every value that leaves, replaced ones too, was counted when it went in.
            buckets[hash as usize & (GEN_BUCKETS - 1)]
                .held
                .fetch_sub(1, Ordering::SeqCst);
            // Replaced: the front's copy is still right (a fill adds replies); the next
            // read from moka takes the new one.
            if cause != RemovalCause::Replaced {
                front.remove(hash);
            }
        })
        // Randomly keyed like SipHash (keys are client-chosen), but cheaper.
        .build_with_hasher(ahash::RandomState::new())
}

struct ExpireAt;

impl Expiry<Bytes, KeyEntry> for ExpireAt {
    fn expire_after_create(&self, _k: &Bytes, v: &KeyEntry, now: Instant) -> Option<Duration> {
        Some(v.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _k: &Bytes,
        v: &KeyEntry,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.expires_at.saturating_duration_since(now))
    }
}

#[derive(Default)]
pub struct L1Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fills: AtomicU64,
    /// Fills dropped because the key was invalidated while the read was in flight.
    pub fills_raced: AtomicU64,
    pub invalidations: AtomicU64,
    pub flushes: AtomicU64,
    /// Misses that waited for an identical read already in flight.
    pub merged: AtomicU64,
    /// L1 misses answered by Redis with a value / with nil.
    pub l2_hits: AtomicU64,
    pub l2_misses: AtomicU64,
    pub evictions: Arc<AtomicU64>,
    /// Replies served stale while the upstream was unreachable (serve_stale_on_error).
    pub stale_served: AtomicU64,
    /// Refresh-ahead reads started, and due ones skipped (concurrency limit reached).
    pub refreshes: AtomicU64,
    pub refreshes_skipped: AtomicU64,
    /// Replies loaded by warming (start-up and TIERPROXY.L1 WARM).
    pub warmed: AtomicU64,
}

/// How a reply handed to [`L1::fill`] is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A slice of a larger buffer (a connection's reads): cached as a copy.
    Shared,
    /// A buffer of its own, exactly the reply: cached as it is.
    Own,
}

/// A read's ticket to fill: the generations it saw before it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillToken {
    bucket: usize,
    gen: u64,
    epoch: u64,
}

pub struct L1 {
    pub coherence: Coherence,
    /// Channel whose messages name keys to drop (seed's event-based invalidation).
    pub event_channel: Option<Bytes>,
    // Reloadable (SIGHUP): read on every use.
    max_value_bytes: AtomicUsize,
    default_ttl_ms: AtomicU64,
    max_ttl_ms: AtomicU64,
    admit_after: AtomicU32,
    max_entries: AtomicU64,
    /// Swapped for a new one when a reload changes the size limits.
    cache: RwLock<KeyCache>,
    front: Arc<Front>,
    /// Admission counters: (window number << 16 | reads in that window), by key hash.
    /// A collision can only admit a key early; memory is fixed.
    reads: Box<[AtomicU32]>,
    admit_window_ms: AtomicU64,
    started: Instant,
    /// The fill-race guard's generations and write marks, by key hash.
    buckets: Arc<[Bucket]>,
    epoch: AtomicU64,
    hasher: ahash::RandomState,
    pub stats: L1Stats,
    max_bytes: AtomicU64,
    /// Keep entries through unsure flushes, to answer reads while the upstream is down.
    serve_stale: bool,
    /// Set when the backend cannot track keys: L1 then serves and stores nothing.
    disabled: std::sync::atomic::AtomicBool,
    /// Why it was disabled (for `INFO l1`).
    disabled_reason: Mutex<String>,
    /// Reads in flight by exact request: later identical misses wait for the first.
    inflight: Mutex<HashMap<Bytes, InFlight>>,
    /// Refresh-ahead: the fraction of a reply's lifetime under which a hit refreshes
    /// it (f64 bits; 0 = off), and the reads it needs first. Reloadable.
    refresh_ratio: AtomicU64,
    refresh_min_reads: AtomicU32,
    /// Background refreshes in flight at most.
    pub refresh_slots: Arc<tokio::sync::Semaphore>,
}

/// A leader's read in flight: the token it started with, and who waits for it.
type InFlight = (FillToken, Vec<oneshot::Sender<Bytes>>);

/// A generation bucket: keys hashing here share it. Both counters sit on one cache line,
/// which a hit reads first.
#[derive(Default)]
#[repr(align(16))]
struct Bucket {
    /// Bumped by every invalidation of one of its keys: a read that started under an
    /// older generation may not fill, and a front entry read under one is not served.
    gen: AtomicU64,
    /// Writes through this proxy in flight: while one is, its keys are neither served
    /// nor filled, and no read joins another's (it may predate the write).
    writing: AtomicU32,
    /// Values of its keys in moka, or more: raised before an insert, lowered by the
    /// removal notice. At 0 none of its keys is in moka, so a miss or an invalidation
    /// skips moka (under a write-heavy mix most invalidations find nothing to drop).
    held: AtomicU32,
}

impl Bucket {
    /// Whether moka may hold one of this bucket's keys.
    fn may_hold(&self) -> bool {
        self.held.load(Ordering::SeqCst) > 0
    }
}

/// A write in flight through this proxy (see [`L1::begin_write`]).
pub struct WriteGuard {
    l1: Arc<L1>,
    keys: Vec<Bytes>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        for k in &self.keys {
            // The generation moves before the count is lowered: a read that starts after
            // this sees the new value upstream; one that started before (it may have read
            // the old value on another connection) cannot fill. Nothing entered moka or
            // the front meanwhile: fills are refused and lookups serve nothing while the
            // count is raised, so there is nothing to remove.
            let b = self.l1.bucket(k);
            self.l1.buckets[b].gen.fetch_add(1, Ordering::SeqCst);
            self.l1.buckets[b].writing.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What a miss does: read upstream itself, or wait for an identical read in flight.
pub enum Role {
    Lead(LeadGuard),
    Follow(oneshot::Receiver<Bytes>),
}

/// The leader of a merged read. Dropping it without [`LeadGuard::complete`] releases
/// the followers (their receivers close and they read upstream themselves).
pub struct LeadGuard {
    l1: Arc<L1>,
    sig: Bytes,
    pub token: FillToken,
}

impl LeadGuard {
    /// Hands the reply to every follower.
    pub fn complete(self, reply: &Bytes) {
        if let Some(waiters) = self.l1.take_inflight(&self.sig, self.token) {
            for w in waiters {
                let _ = w.send(reply.clone());
            }
        }
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        // After complete() the entry is gone already; this only releases abandoned ones.
        let _ = self.l1.take_inflight(&self.sig, self.token);
    }
}

impl L1 {
    pub fn new(cfg: &L1Config) -> L1 {
        let evictions = Arc::new(AtomicU64::new(0));
        let hasher = ahash::RandomState::new();
        let front = Arc::new(Front::new());
        let buckets: Arc<[Bucket]> = (0..GEN_BUCKETS).map(|_| Bucket::default()).collect();
        let cache = build_cache(
            cfg.max_bytes,
            cfg.max_entries,
            evictions.clone(),
            front.clone(),
            buckets.clone(),
            hasher.clone(),
        );
        let read_slots = (cfg.max_entries.saturating_mul(4))
            .clamp(1 << 12, 1 << 22)
            .next_power_of_two() as usize;
        let reads = (0..read_slots).map(|_| AtomicU32::new(0)).collect();
        L1 {
            event_channel: (!cfg.invalidation_channel.is_empty())
                .then(|| Bytes::from(cfg.invalidation_channel.clone())),
            coherence: if cfg.coherence == "ttl" {
                Coherence::Ttl
            } else {
                Coherence::Tracking
            },
            max_value_bytes: AtomicUsize::new(cfg.max_value_bytes as usize),
            default_ttl_ms: AtomicU64::new(cfg.default_ttl_ms),
            max_ttl_ms: AtomicU64::new(cfg.max_ttl_ms),
            admit_after: AtomicU32::new(cfg.admit_after_reads.max(1)),
            max_entries: AtomicU64::new(cfg.max_entries),
            cache: RwLock::new(cache),
            front,
            reads,
            admit_window_ms: AtomicU64::new(cfg.admit_window_ms.max(1)),
            started: Instant::now(),
            buckets,
            epoch: AtomicU64::new(0),
            hasher,
            stats: L1Stats {
                evictions,
                ..Default::default()
            },
            max_bytes: AtomicU64::new(cfg.max_bytes),
            serve_stale: cfg.serve_stale_on_error,
            inflight: Mutex::new(HashMap::new()),
            disabled: std::sync::atomic::AtomicBool::new(false),
            disabled_reason: Mutex::new(String::new()),
            refresh_ratio: AtomicU64::new(cfg.refresh_ahead_ratio.to_bits()),
            refresh_min_reads: AtomicU32::new(cfg.refresh_ahead_min_reads),
            refresh_slots: Arc::new(tokio::sync::Semaphore::new(cfg.refresh_ahead_concurrency)),
        }
    }

    fn refresh_ratio(&self) -> f64 {
        f64::from_bits(self.refresh_ratio.load(Ordering::Relaxed))
    }

    /// Whether a hit on `c` now should refresh it: in the last `ratio` of its lifetime,
    /// read `refresh_ahead_min_reads` times within that window (this hit included), and
    /// not being refreshed already (this claims it). Hits earlier in the lifetime cost
    /// no shared write.
    fn refresh_due(&self, c: &Cached, now: Instant) -> bool {
        // Computed at the fill: a hit compares two instants.
        if c.refresh_at.is_none_or(|at| now <= at) {
            return false;
        }
        let reads = c.reads.fetch_add(1, Ordering::Relaxed) + 1;
        reads >= self.refresh_min_reads.load(Ordering::Relaxed)
            && !c.refreshing.swap(true, Ordering::AcqRel)
    }

    /// A refresh claimed by a hit did not happen (no slot, or it failed): a later hit may
    /// try again.
    pub fn refresh_done(&self, key: &[u8], sig: &[u8]) {
        if let Some(e) = self.cache().get(key) {
            if let Some(c) = e.replies.iter().find(|c| c.sig == sig) {
                c.refreshing.store(false, Ordering::Release);
            }
        }
    }

    fn cache(&self) -> RwLockReadGuard<'_, KeyCache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies reloaded limits (SIGHUP). New sizes take a new, empty cache (moka's
    /// capacity is fixed at build); TTLs, the value limit and admission apply to the
    /// next fills. Returns whether the cache was replaced.
    pub fn reconfigure(&self, cfg: &L1Config) -> bool {
        self.max_value_bytes
            .store(cfg.max_value_bytes as usize, Ordering::Relaxed);
        self.default_ttl_ms
            .store(cfg.default_ttl_ms, Ordering::Relaxed);
        self.max_ttl_ms.store(cfg.max_ttl_ms, Ordering::Relaxed);
        self.admit_after
            .store(cfg.admit_after_reads.max(1), Ordering::Relaxed);
        self.admit_window_ms
            .store(cfg.admit_window_ms.max(1), Ordering::Relaxed);
        self.refresh_ratio
            .store(cfg.refresh_ahead_ratio.to_bits(), Ordering::Relaxed);
        self.refresh_min_reads
            .store(cfg.refresh_ahead_min_reads, Ordering::Relaxed);
        let resized = self.max_bytes.load(Ordering::Relaxed) != cfg.max_bytes
            || self.max_entries.load(Ordering::Relaxed) != cfg.max_entries;
        if resized {
            let fresh = build_cache(
                cfg.max_bytes,
                cfg.max_entries,
                self.stats.evictions.clone(),
                self.front.clone(),
                self.buckets.clone(),
                self.hasher.clone(),
            );
            // Fills in flight were admitted under the old cache: refuse them.
            self.epoch.fetch_add(1, Ordering::SeqCst);
            let old = std::mem::replace(
                &mut *self.cache.write().unwrap_or_else(|p| p.into_inner()),
                fresh,
            );
            // What was read from the old cache meanwhile entered the front under the
            // old epoch: out with it, and never served (the epoch moves on again).
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.front.clear();
            // Emptied and freed after the lock is released (it takes a while): each
            // removal's notice lowers its bucket's count, which dropping would not.
            let keys: Vec<Bytes> = old.iter().map(|(k, _)| Bytes::clone(&k)).collect();
            for k in keys {
                old.invalidate(&k);
            }
            drop(old);
            self.max_bytes.store(cfg.max_bytes, Ordering::Relaxed);
            self.max_entries.store(cfg.max_entries, Ordering::Relaxed);
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        }
        resized
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    pub fn max_entries(&self) -> u64 {
        self.max_entries.load(Ordering::Relaxed)
    }

    /// Turns L1 off for good (the backend refused tracking: caching would be incoherent).
    pub fn disable(&self, why: &str) {
        if !self.disabled.swap(true, Ordering::AcqRel) {
            *self
                .disabled_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = why.to_owned();
            tracing::error!(reason = why, "L1 disabled: the upstream cannot track keys; set l1.coherence = \"ttl\" to cache without tracking");
            self.flush("disabled");
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// The reason given to [`L1::disable`], if it was called.
    pub fn disabled_reason(&self) -> Option<String> {
        self.is_disabled().then(|| {
            self.disabled_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// Joins an identical read in flight, or becomes its leader. A follower may join
    /// only while nothing invalidated the key since the leader's read was sent: after a
    /// write acknowledged through this proxy, no read may be served an older value.
    pub fn lead_or_follow(self: &Arc<Self>, sig: &Bytes, key: &[u8]) -> Role {
        if self.being_written(key) {
            // A read in flight may predate the write: read alone, and do not register
            // (the fill will be refused too).
            return Role::Lead(LeadGuard {
                l1: self.clone(),
                sig: sig.clone(),
                token: self.begin(key),
            });
        }
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, waiters)) = m.get_mut(sig) {
            if self.still_valid(token) {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                self.stats.merged.fetch_add(1, Ordering::Relaxed);
                return Role::Follow(rx);
            }
        }
        let token = self.begin(key);
        // A stale leader's followers (if any) are released and read for themselves.
        m.insert(sig.clone(), (token, Vec::new()));
        Role::Lead(LeadGuard {
            l1: self.clone(),
            sig: sig.clone(),
            token,
        })
    }

    fn take_inflight(&self, sig: &Bytes, token: FillToken) -> Option<Vec<oneshot::Sender<Bytes>>> {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(sig) {
            Some((t, _)) if *t == token => m.remove(sig).map(|(_, w)| w),
            _ => None,
        }
    }

    fn bucket(&self, key: &[u8]) -> usize {
        hash_of(&self.hasher, key) as usize & (GEN_BUCKETS - 1)
    }

    /// The cached reply to exactly this request, if any; counted as a hit or a miss.
    pub fn get(&self, key: &[u8], matches: impl Fn(&[u8]) -> bool) -> Option<Hit> {
        let found = self.lookup(key, Instant::now(), matches);
        let counter = if found.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// As [`L1::get`] at time `now`, counting nothing: the caller counts.
    pub fn lookup(&self, key: &[u8], now: Instant, matches: impl Fn(&[u8]) -> bool) -> Option<Hit> {
        self.lookup_with(key, now, matches, Bytes::clone)
            .map(|(reply, refresh)| Hit { reply, refresh })
    }

    /// As [`L1::lookup`], handing the reply to `take` where it lies (a caller that
    /// copies it out needs no reference of its own): what `take` returned, and whether
    /// the caller should refresh it (see [`Hit`]). From the front if it holds the reply,
    /// else from moka (and the entry then enters the front).
    pub fn lookup_with<R>(
        &self,
        key: &[u8],
        now: Instant,
        matches: impl Fn(&[u8]) -> bool,
        take: impl FnOnce(&Bytes) -> R,
    ) -> Option<(R, bool)> {
        if self.is_disabled() {
            return None;
        }
        let hash = hash_of(&self.hasher, key);
        let bucket = &self.buckets[hash as usize & (GEN_BUCKETS - 1)];
        if bucket.writing.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        // Read before moka: see `Front`.
        let gen = bucket.gen.load(Ordering::SeqCst);
        let slot = self.front.slot(hash);
        {
            let front = slot.load();
            if let Some(f) = front.as_ref().filter(|f| {
                f.gen == gen && f.epoch == epoch && f.expires_at > now && matches(&f.sig)
            }) {
                // Gone from moka (an eviction whose notice is on its way): the front
                // lets it go too.
                if one_in(FRONT_TOUCH_EVERY) && self.cache().get(key).is_none() {
                    self.front.remove(hash);
                }
                return Some((take(&f.reply), self.refresh_due(&f.cached, now)));
            }
        }
        if !bucket.may_hold() {
            return None;
        }
        let e = self.cache().get(key)?;
        // Entries of an earlier epoch are kept only to be served stale.
        if e.epoch != epoch {
            return None;
        }
        let c = e
            .replies
            .iter()
            .find(|c| c.servable(now) && matches(&c.sig))?;
        let hit = (take(&c.reply), self.refresh_due(c, now));
        self.enter_front(hash, gen, key, &e, c, now);
        Some(hit)
    }

    /// Puts reply `c` of an entry just read from moka or filled (under generation
    /// `gen`) in its key's front slot, unless it is large, or the slot holds another key
    /// that is still servable and this install is not its turn to displace it.
    fn enter_front(
        &self,
        hash: u64,
        gen: u64,
        key: &[u8],
        e: &KeyEntry,
        c: &Arc<Cached>,
        now: Instant,
    ) {
        if key.len() + c.sig.len() + c.reply.len() + ENTRY_OVERHEAD > FRONT_MAX_ENTRY {
            return;
        }
        let slot = self.front.slot(hash);
        // Another key's entry that is still servable (its generation is this one's
        // bucket's: slot and bucket come from the same hash bits).
        let keep = slot.load().as_ref().is_some_and(|f| {
            f.hash != hash
                && f.gen
                    == self.buckets[hash as usize & (GEN_BUCKETS - 1)]
                        .gen
                        .load(Ordering::SeqCst)
                && f.epoch == e.epoch
                && f.key_expires_at > now
                && !one_in(FRONT_DISPLACE_EVERY)
        });
        if !keep {
            slot.store(Some(Arc::new(FrontEntry {
                gen,
                epoch: e.epoch,
                expires_at: c.expires_at,
                key_expires_at: e.expires_at,
                sig: c.sig.clone(),
                reply: c.reply.clone(),
                hash,
                cached: c.clone(),
            })));
            // Evicted meanwhile, its notice already run: not kept beyond moka's budget.
            if !self.cache().contains_key(key) {
                self.front.remove(hash);
            }
        }
    }

    /// `l1.serve_stale_on_error`.
    pub fn serves_stale(&self) -> bool {
        self.serve_stale
    }

    /// Counts a read of `key`; true once it is hot enough to be cached.
    pub fn admit(&self, key: &[u8]) -> bool {
        let admit_after = self.admit_after.load(Ordering::Relaxed);
        if admit_after <= 1 {
            return true;
        }
        let window_ms = self.admit_window_ms.load(Ordering::Relaxed);
        let window = ((self.started.elapsed().as_millis() as u64 / window_ms) & 0xFFFF) as u32;
        let mut h = self.hasher.build_hasher();
        h.write(key);
        let slot = &self.reads[(h.finish() as usize) & (self.reads.len() - 1)];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let count = if cur >> 16 == window {
                ((cur & 0xFFFF) + 1).min(0xFFFF)
            } else {
                1
            };
            let next = (window << 16) | count;
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return count >= admit_after,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Taken before a read is sent upstream.
    pub fn begin(&self, key: &[u8]) -> FillToken {
        let bucket = self.bucket(key);
        FillToken {
            bucket,
            gen: self.buckets[bucket].gen.load(Ordering::SeqCst),
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    fn still_valid(&self, t: &FillToken) -> bool {
        self.buckets[t.bucket].gen.load(Ordering::SeqCst) == t.gen
            && self.epoch.load(Ordering::SeqCst) == t.epoch
    }

    /// Caches `reply` for `key`/`sig` if nothing invalidated the key since `token`;
    /// whether it did.
    /// `pttl_ms` is the key's remaining TTL in Redis (-1: none, -2: no such key).
    pub fn fill(
        &self,
        key: Bytes,
        token: FillToken,
        sig: Bytes,
        reply: Bytes,
        held: Held,
        pttl_ms: i64,
    ) -> bool {
        if reply.len() > self.max_value_bytes.load(Ordering::Relaxed)
            || crate::parse::reply::is_error(&reply)
            || self.is_disabled()
        {
            return false;
        }
        let mut ttl = Duration::from_millis(
            self.default_ttl_ms
                .load(Ordering::Relaxed)
                .min(self.max_ttl_ms.load(Ordering::Relaxed)),
        );
        if pttl_ms >= 0 {
            ttl = ttl.min(Duration::from_millis(pttl_ms as u64));
        }
        if ttl.is_zero() {
            return false;
        }
        if !self.still_valid(&token)
            || self.buckets[token.bucket].writing.load(Ordering::SeqCst) > 0
        {
            self.stats.fills_raced.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // Copied: the key and the reply are slices of the client's and the upstream
        // connection's read buffers, which a cached slice would keep whole (a 100-byte
        // reply pinning a 16 KiB buffer), beyond what the budget weighs. A reply in a
        // buffer of its own (a resolved spill value, up to `max_value_bytes`) is not.
        let key = Bytes::copy_from_slice(&key);
        let reply = match held {
            Held::Shared => Bytes::copy_from_slice(&reply),
            Held::Own => reply,
        };
        let now = Instant::now();
        let cache = self.cache();
        let bucket = &self.buckets[token.bucket];
        // The key's other replies keep their own lifetimes (they were read earlier).
        let held = bucket.may_hold();
        let mut replies: Vec<Arc<Cached>> = match held.then(|| cache.get(&key)).flatten() {
            Some(e) if e.epoch == token.epoch => e
                .replies
                .iter()
                .filter(|c| c.sig != sig && c.expires_at > now)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let filled = Arc::new(Cached::new(sig, reply, now, ttl, self.refresh_ratio()));
        replies.push(filled.clone());
        let expires_at = replies
            .iter()
            .map(|c| c.expires_at)
            .max()
            .unwrap_or(now + ttl);
        let entry = KeyEntry {
            replies: Arc::new(replies),
            expires_at,
            epoch: token.epoch,
        };
        // Counted before it can be seen: `held` never under-counts.
        bucket.held.fetch_add(1, Ordering::SeqCst);
        cache.insert(key.clone(), entry.clone());
        if !self.still_valid(&token)
            || self.buckets[token.bucket].writing.load(Ordering::SeqCst) > 0
        {
            // An invalidation raced the insert: it may have run before the insert landed.
            // Removed as `invalidate` removes (not through it: the cache lock is held), so
            // that a lookup which read the insert cannot put it in the front either.
            cache.invalidate(&key);
            self.buckets[token.bucket]
                .gen
                .fetch_add(1, Ordering::SeqCst);
            self.front.remove(hash_of(&self.hasher, &key));
            self.stats.fills_raced.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        filled.confirmed.store(true, Ordering::Release);
        drop(cache);
        // Servable from the front while the generation is the token's: an invalidation
        // from here on bumps it.
        self.enter_front(
            hash_of(&self.hasher, &key),
            token.gen,
            &key,
            &entry,
            &filled,
            now,
        );
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether a write of `key` (or of a key sharing its bucket) through this proxy
    /// is in flight: nothing read now may be cached or served.
    pub fn being_written(&self, key: &[u8]) -> bool {
        self.buckets[self.bucket(key)]
            .writing
            .load(Ordering::SeqCst)
            > 0
    }

    /// Marks `keys` as being written through this proxy until the guard is dropped (when
    /// the write's reply is in): invalidated now and again then.
    pub fn begin_write(self: &Arc<Self>, keys: Vec<Bytes>) -> WriteGuard {
        for k in &keys {
            self.buckets[self.bucket(k)]
                .writing
                .fetch_add(1, Ordering::SeqCst);
            self.invalidate(k);
        }
        WriteGuard {
            l1: self.clone(),
            keys,
        }
    }

    /// Drops every cached reply about `key`, and stops in-flight reads from caching it.
    pub fn invalidate(&self, key: &[u8]) {
        let hash = hash_of(&self.hasher, key);
        let b = hash as usize & (GEN_BUCKETS - 1);
        self.buckets[b].gen.fetch_add(1, Ordering::SeqCst);
        // Nothing to drop from moka: a fill inserting now counted itself before its
        // insert, so it sees the generation bumped above and takes itself out.
        if self.buckets[b].may_hold() {
            self.cache().invalidate(key);
        }
        // Again after the removal: a lookup that read moka before it read the
        // generation before this, so what it put in the front is never served.
        self.buckets[b].gen.fetch_add(1, Ordering::SeqCst);
        self.front.remove(hash);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops everything (and stops every in-flight fill).
    pub fn flush(&self, why: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache().invalidate_all();
        self.front.clear();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(reason = why, "L1 flushed");
    }

    /// Invalidations may have been lost (a tracking connection closed, the topology
    /// changed): nothing cached may be served as fresh any more. With
    /// `l1.serve_stale_on_error` the entries are kept, unserved, until their TTL, to
    /// answer reads that fail for want of the upstream; otherwise they are dropped.
    pub fn flush_unsure(&self, why: &str) {
        if !self.serve_stale {
            return self.flush(why);
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.front.clear();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            reason = why,
            "L1 flushed (entries kept for serve_stale_on_error)"
        );
    }

    /// The cached reply to this request whatever its epoch (it may be stale): only for
    /// `l1.serve_stale_on_error`, when the upstream cannot answer.
    pub fn get_stale(&self, key: &[u8], matches: impl Fn(&[u8]) -> bool) -> Option<Bytes> {
        if !self.serve_stale || self.is_disabled() || self.being_written(key) {
            return None;
        }
        let now = Instant::now();
        let found = self.cache().get(key).and_then(|e| {
            e.replies
                .iter()
                .find(|c| c.servable(now) && matches(&c.sig))
                .map(|c| c.reply.clone())
        });
        if found.is_some() {
            self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    pub fn entries(&self) -> u64 {
        let cache = self.cache();
        cache.run_pending_tasks();
        cache.entry_count()
    }

    /// Bytes held (as weighed, i.e. never less than the real bytes).
    pub fn weighted_bytes(&self) -> u64 {
        let cache = self.cache();
        cache.run_pending_tasks();
        cache.weighted_size()
    }

    /// Replies cached for `key` (TIERPROXY.L1 GET): signature, reply and remaining
    /// lifetime of each.
    pub fn peek(&self, key: &[u8]) -> Option<Vec<(Bytes, Bytes, Duration)>> {
        let now = Instant::now();
        self.cache().get(key).map(|e| {
            e.replies
                .iter()
                .filter(|c| c.servable(now))
                .map(|c| {
                    (
                        c.sig.clone(),
                        c.reply.clone(),
                        c.expires_at.saturating_duration_since(now),
                    )
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(l1: &L1) -> u64 {
        l1.cache().run_pending_tasks();
        l1.buckets
            .iter()
            .map(|b| b.held.load(Ordering::SeqCst) as u64)
            .sum()
    }

    fn fill(l1: &L1, key: &str, sig: &str, pttl_ms: i64) -> bool {
        let token = l1.begin(key.as_bytes());
        l1.fill(
            Bytes::copy_from_slice(key.as_bytes()),
            token,
            Bytes::copy_from_slice(sig.as_bytes()),
            Bytes::from_static(b"$1\r\nv\r\n"),
            Held::Shared,
            pttl_ms,
        )
    }

    /// The per-bucket count that lets misses and invalidations skip moka must never be
    /// below what moka holds, and must come back down as entries leave by every way
    /// out, or the shortcut would serve nothing (under) or fade away (over).
    #[test]
    fn held_counts_follow_moka_through_every_removal() {
        let cfg = L1Config {
            max_entries: 64,
            max_bytes: 64 * 1024,
            ..L1Config::default()
        };
        let l1 = L1::new(&cfg);
        // Over the entry budget: size evictions and rejected inserts.
        for i in 0..1000 {
            fill(&l1, &format!("k{i}"), &format!("Gk{i}"), -1);
        }
        let n = l1.entries();
        assert!(n > 0 && n <= 64, "{n}");
        assert_eq!(held(&l1), l1.entries());
        // Replaced: a second reply for keys that are cached.
        let cached: Vec<String> = (0..1000)
            .map(|i| format!("k{i}"))
            .filter(|k| l1.peek(k.as_bytes()).is_some())
            .collect();
        assert!(!cached.is_empty());
        for k in &cached {
            assert!(fill(&l1, k, &format!("S{k}"), -1));
            assert!(l1.buckets[l1.bucket(k.as_bytes())].may_hold());
        }
        assert_eq!(held(&l1), l1.entries());
        // Invalidated.
        for k in cached.iter().step_by(2) {
            l1.invalidate(k.as_bytes());
        }
        assert_eq!(held(&l1), l1.entries());
        // Expired.
        for i in 0..10 {
            fill(&l1, &format!("short{i}"), "G", 1);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(held(&l1), l1.entries());
        // Flushed.
        l1.flush("test");
        assert_eq!(l1.entries(), 0);
        assert_eq!(held(&l1), 0);
        // Resized (a new cache; the old one is emptied).
        for i in 0..50 {
            fill(&l1, &format!("r{i}"), "G", -1);
        }
        assert!(held(&l1) > 0);
        assert!(l1.reconfigure(&L1Config {
            max_entries: 128,
            ..cfg
        }));
        assert_eq!(held(&l1), 0);
        // And a key nothing holds is a miss without asking moka, then a hit once filled.
        assert!(l1.lookup(b"fresh", Instant::now(), |_| true).is_none());
        assert!(fill(&l1, "fresh", "G", -1));
        assert!(l1.lookup(b"fresh", Instant::now(), |s| s == b"G").is_some());
    }
}
