//! The sweeper: deletes objects no stub refers to, without ever deleting one that is.
//!
//! Mark: SCAN every master for string keys and read each one's first bytes (a ranged
//! read: values are never fetched whole); every authentic object stub marks its object.
//! Sweep: list the store; an object is a candidate when it is unmarked and older than
//! the grace period (which covers writes whose stub is not in Redis yet). It is deleted
//! only if it was a candidate in two consecutive marks: a stub that a RENAME, COPY or
//! RESTORE moved behind one SCAN's cursor is found by the next.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::stub::{Body, MAX_OBJECT_STUB};
use super::Spill;
use crate::error::Error;
use crate::parse::reply::{as_str, error_text, scan_reply};
use crate::respond::{command_bytes, Proto};
use crate::upstream::{Target, Upstream};

const SCAN_COUNT: &str = "500";

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub keys_scanned: u64,
    pub objects_marked: usize,
    pub objects_listed: usize,
    pub candidates: usize,
    pub deleted: usize,
    pub dry_run: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "keys_scanned={} objects_marked={} objects_listed={} unreferenced_candidates={} deleted={}{}",
            self.keys_scanned,
            self.objects_marked,
            self.objects_listed,
            self.candidates,
            self.deleted,
            if self.dry_run { " (dry run)" } else { "" }
        )
    }
}

/// Every object an authentic stub in Redis refers to.
pub async fn mark(
    up: &Upstream,
    spill: &Spill,
    keys_per_sec: u64,
) -> Result<(HashSet<String>, u64), Error> {
    let mut marked = HashSet::new();
    let mut scanned = 0u64;
    let started = std::time::Instant::now();
    for node in up.topology()?.masters.clone() {
        let mut cursor = Bytes::from_static(b"0");
        loop {
            let cmd = command_bytes(&[
                &b"SCAN"[..],
                &cursor,
                b"COUNT",
                SCAN_COUNT.as_bytes(),
                b"TYPE",
                b"string",
            ]);
            let raw = up
                .call(Target::Node(node.clone()), cmd, Proto::Resp2, 0)
                .await?;
            if let Some(e) = error_text(&raw) {
                return Err(Error::redis(e));
            }
            let (next, keys) =
                scan_reply(&raw).ok_or_else(|| Error::proxy("unexpected SCAN reply"))?;
            let end = (MAX_OBJECT_STUB - 1).to_string();
            let mut tickets = Vec::with_capacity(keys.len());
            for k in &keys {
                let cmd = command_bytes(&[&b"GETRANGE"[..], k, b"0", end.as_bytes()]);
                let target = Target::Slot(crate::upstream::key_slot(k));
                tickets.push(up.start(target, cmd, Proto::Resp2, 0).await);
            }
            for t in tickets {
                let raw = up.finish(t).await?;
                // A key Redis could not read now (LOADING, BUSY, CLUSTERDOWN…) may hold a
                // stub: fail the pass rather than leave its object unmarked.
                if let Some(e) = error_text(&raw) {
                    return Err(Error::redis(e));
                }
                let Some(v) = as_str(&raw) else { continue };
                let v = Bytes::copy_from_slice(v);
                if let Some(Ok(stub)) = spill.parse(&v) {
                    if let Body::Object(name) = stub.body {
                        marked.insert(name);
                    }
                }
            }
            scanned += keys.len() as u64;
            // Rate limit: never faster than keys_per_sec on average.
            let due = Duration::from_secs_f64(scanned as f64 / keys_per_sec.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            if &next[..] == b"0" {
                break;
            }
            cursor = next;
        }
    }
    Ok((marked, scanned))
}

/// One mark and sweep. Deletes only objects that were also in `previous` (the last
/// pass's candidates); returns this pass's candidates for the next.
pub async fn pass(
    up: &Upstream,
    spill: &Spill,
    grace: Duration,
    keys_per_sec: u64,
    previous: Option<&HashSet<String>>,
    dry_run: bool,
) -> Result<(Report, HashSet<String>), Error> {
    let started = SystemTime::now();
    let (marked, scanned) = mark(up, spill, keys_per_sec).await?;
    let listed = spill
        .store
        .list(spill.prefix())
        .await
        .map_err(|e| Error::proxy(format!("spill store: {e}")))?;
    let cutoff = started.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let candidates: HashSet<String> = listed
        .iter()
        .filter(|(name, modified)| !marked.contains(name) && *modified < cutoff)
        .map(|(name, _)| name.clone())
        .collect();
    let mut report = Report {
        keys_scanned: scanned,
        objects_marked: marked.len(),
        objects_listed: listed.len(),
        candidates: candidates.len(),
        deleted: 0,
        dry_run,
    };
    if let Some(prev) = previous {
        for name in candidates.intersection(prev) {
            if dry_run {
                report.deleted += 1;
                continue;
            }
            if spill.store.delete(name).await.is_ok() {
                report.deleted += 1;
                spill
                    .stats
                    .swept
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    Ok((report, candidates))
}

/// The background sweeper: a pass every `interval`, forever.
pub async fn background(
    up: std::sync::Arc<Upstream>,
    spill: std::sync::Arc<Spill>,
    interval: Duration,
    grace: Duration,
    keys_per_sec: u64,
) {
    let mut previous: Option<HashSet<String>> = None;
    loop {
        tokio::time::sleep(interval).await;
        match pass(&up, &spill, grace, keys_per_sec, previous.as_ref(), false).await {
            Ok((report, candidates)) => {
                tracing::info!(%report, "spill sweep");
                previous = Some(candidates);
            }
            Err(e) => {
                tracing::warn!(error = %e, "spill sweep failed");
                previous = None;
            }
        }
    }
}
