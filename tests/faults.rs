//! Faults under load (issue #7, "Faults"): a master killed and failed over, slots moved by
//! `redis-cli --cluster reshard`, and the S3 store frozen and then killed, each while client
//! threads keep one connection apiece busy and check every reply they get.
//!
//! Every test starts its own cluster or S3 server, since it breaks them, and the tests run
//! one at a time ([`serial`]): they time recoveries, and on a small machine two of them side
//! by side would mostly time each other. What they measure goes to stderr on lines starting
//! with `FAILOVER:`, `RESHARD:` and `S3FAULT:` (`cargo test --test faults -- --nocapture`).

mod support;

use std::collections::HashMap;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::{
    config_file, encode_cmd, eventually, random, tag, Proxy, RedisCluster, RedisServer, Resp,
    S3Server,
};

/// How long a held connection may wait for one reply before the test calls it a hang:
/// longer than any of the proxy's own timeouts, so a reply that does come is seen.
const REPLY_LIMIT: Duration = Duration::from_secs(15);
/// A client's pause after an error reply, as a real client would back off. Without it a
/// thread whose requests fail fast would spin and take the CPU the recovery needs.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
const SLOTS: usize = 16_384;

// =============================================================================================
// A master killed under load
// =============================================================================================

const FAILOVER_THREADS: usize = 6;
const FAILOVER_KEYS_PER_THREAD: usize = 50;
/// Load before the kill, and how long it goes on after it.
const FAILOVER_WARMUP: Duration = Duration::from_secs(2);
const FAILOVER_AFTER_KILL: Duration = Duration::from_secs(12);
/// "Full service": every client has had this long of error-free requests…
const FULL_SERVICE_WINDOW: Duration = Duration::from_secs(1);
/// …within this long of the kill. The harness's cluster-node-timeout is 3 s; the replica's
/// election and the proxy's topology refresh follow.
const FULL_SERVICE_LIMIT: Duration = Duration::from_secs(10);
/// Requests sent this soon after the kill may still have been in flight when it landed.
const IN_FLIGHT_MARGIN: Duration = Duration::from_millis(500);

/// A real failover under load: the master of slot 0 is SIGKILLed while six clients, each on
/// one connection held for the whole test, SET and GET keys spread over every slot. No
/// connection may close or hang; no GET may answer anything but the key's last acknowledged
/// value (or the value of a write that failed since, which may or may not have been applied);
/// every client must have had a second without errors within 10 s of the kill; and at the
/// end every key holds what its client last had acknowledged. Only requests in flight at
/// the kill may get an error: the ones sent later wait for the promotion. Errors, latency
/// and recovery are printed on `FAILOVER:` lines.
#[test]
fn failover_under_load_keeps_client_connections_and_recovers() {
    let _serial = serial();
    let mut cluster = RedisCluster::start(3, 1);
    let px = Proxy::start(&cluster.seeds(), &[], &[]);
    let victim = owner_of_slot(&cluster, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<JoinHandle<FailoverLoad>> = (0..FAILOVER_THREADS)
        .map(|t| {
            let (addr, stop) = (px.addr(), Arc::clone(&stop));
            thread::Builder::new()
                .name(format!("failover-load-{t}"))
                .spawn(move || failover_load(t, &addr, &stop))
                .expect("spawn a load thread")
        })
        .collect();
    thread::sleep(FAILOVER_WARMUP);
    let killed_at = Instant::now();
    cluster.kill_node(&victim);
    thread::sleep(FAILOVER_AFTER_KILL.saturating_sub(killed_at.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<FailoverLoad> = load.into_iter().map(join).collect();

    // ---- What the clients saw, measured from the kill ----
    let since_kill = |t: Instant| t.saturating_duration_since(killed_at);
    let samples: Vec<&Sample> = reports.iter().flat_map(|r| &r.samples).collect();
    let errors: Vec<&Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.error.is_some())
        .collect();
    let errors_before_kill = errors.iter().filter(|s| s.done < killed_at).count();
    let errors_after_kill: Vec<Instant> = errors
        .iter()
        .filter(|s| s.done >= killed_at)
        .map(|s| s.done)
        .collect();
    let first_error = errors_after_kill.iter().min().copied().map(since_kill);
    let last_error = errors_after_kill.iter().max().copied().map(since_kill);
    let restored: Vec<Option<Instant>> = reports
        .iter()
        .map(|r| restored_at(&r.samples, killed_at))
        .collect();
    let full_service = restored
        .iter()
        .copied()
        .collect::<Option<Vec<Instant>>>()
        .and_then(|all| all.into_iter().max())
        .map(since_kill);
    eprintln!(
        "FAILOVER: killed={victim} threads={FAILOVER_THREADS} requests={} errors={} \
         errors_before_kill={errors_before_kill} first_error={} last_error={} full_service={}",
        samples.len(),
        errors.len(),
        secs(first_error),
        secs(last_error),
        secs(full_service),
    );
    for (r, at) in reports.iter().zip(&restored) {
        eprintln!(
            "FAILOVER: thread={} requests={} errors={} restored={}",
            r.thread,
            r.samples.len(),
            r.samples.iter().filter(|s| s.error.is_some()).count(),
            secs(at.map(since_kill)),
        );
    }
    print_error_counts("FAILOVER:", errors.iter().filter_map(|s| s.error.clone()));

    // ---- The rules ----
    let broken: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            r.broken
                .as_ref()
                .map(|b| format!("thread {}: {b}", r.thread))
        })
        .collect();
    assert!(
        broken.is_empty(),
        "client connections did not survive the failover (kill at +0s):\n{}\n--- proxy stderr ---\n{}",
        broken.join("\n"),
        px.stderr_tail()
    );
    let wrong: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.wrong.iter().map(move |(at, w)| {
                format!("thread {} at {}: {w}", r.thread, relative(*at, killed_at))
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} replies were wrong (times relative to the kill):\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Only the requests in flight when the master died may fail: later ones wait for the
    // replica's promotion (upstream.failover_wait_ms) instead of getting an error. The
    // margin covers the kill itself (the process is gone when kill_node returns).
    let late: Vec<String> = errors
        .iter()
        .filter(|e| e.sent >= killed_at + IN_FLIGHT_MARGIN)
        .map(|e| {
            format!(
                "sent at {}: {}",
                relative(e.sent, killed_at),
                e.error.as_deref().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        late.is_empty(),
        "{} requests sent after the kill got errors (only those in flight may):\n{}",
        late.len(),
        late.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    let full_service = full_service.unwrap_or_else(|| {
        panic!(
            "some client never had {FULL_SERVICE_WINDOW:?} without errors in the \
             {FAILOVER_AFTER_KILL:?} after the kill (see the FAILOVER: lines)\n--- proxy stderr ---\n{}",
            px.stderr_tail()
        )
    });
    assert!(
        full_service <= FULL_SERVICE_LIMIT,
        "full service came back {full_service:?} after the kill, over the {FULL_SERVICE_LIMIT:?} allowed"
    );
    // Not vacuous: the cluster really replaced the master.
    let promoted = eventually(Duration::from_secs(30), || {
        !cluster.master_addrs().contains(&victim)
    });
    assert!(
        promoted,
        "the cluster never replaced the killed master {victim}: {:?}",
        cluster.slot_owners()
    );

    // ---- Afterwards every key holds what its client last had acknowledged ----
    let mut c = Resp::connect(&px.addr());
    let mut mismatches = Vec::new();
    for (key, truth) in reports.iter().flat_map(|r| &r.keys) {
        let reply = c.cmd(&["GET", key.as_str()]);
        let ok = match decode(&reply) {
            Reply::Bulk(v) => truth.allows(Some(v.as_slice())),
            Reply::Null => truth.allows(None),
            _ => false,
        };
        if !ok {
            mismatches.push(format!("{key}: {}, but {}", show(&reply), truth.describe()));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} keys do not hold their last acknowledged value after the failover:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// One load thread of the failover test, and what it saw.
struct FailoverLoad {
    thread: usize,
    samples: Vec<Sample>,
    /// Replies that broke the rules, with when they arrived.
    wrong: Vec<(Instant, String)>,
    /// Why the held connection stopped being usable, if it did.
    broken: Option<String>,
    /// The thread's keys, with what each may hold now.
    keys: Vec<(String, Candidates)>,
}

/// One request: when it was sent, when its reply arrived, and the error it got, if any.
struct Sample {
    sent: Instant,
    done: Instant,
    error: Option<String>,
}

/// SET then GET of each of the thread's keys in turn, on one connection, until `stop`.
fn failover_load(index: usize, addr: &str, stop: &AtomicBool) -> FailoverLoad {
    let mut conn = Resp::connect(addr);
    // No hash tag: the keys spread over every slot, so over every master.
    let mut keys: Vec<(String, Candidates)> = (0..FAILOVER_KEYS_PER_THREAD)
        .map(|i| (format!("fo:{index}:{i}"), Candidates::default()))
        .collect();
    let mut samples = Vec::new();
    let mut wrong = Vec::new();
    let mut broken = None;
    let mut counter = 0u64;
    'load: while !stop.load(Ordering::Relaxed) {
        for (key, truth) in &mut keys {
            if stop.load(Ordering::Relaxed) {
                break 'load;
            }
            counter += 1;
            let value = counter.to_string().into_bytes();
            let sent = Instant::now();
            let reply = match request(&mut conn, &[b"SET", key.as_bytes(), &value]) {
                Ok(reply) => reply,
                Err(why) => {
                    broken = Some(format!("SET {key}: {why}"));
                    break 'load;
                }
            };
            let done = Instant::now();
            let error = error_text(&reply);
            if error.is_some() {
                truth.fail(value);
            } else if reply == b"+OK\r\n" {
                truth.ack(value);
            } else {
                wrong.push((done, format!("SET {key} answered {}", show(&reply))));
                truth.fail(value);
            }
            let set_failed = error.is_some();
            samples.push(Sample { sent, done, error });

            let sent = Instant::now();
            let reply = match request(&mut conn, &[b"GET", key.as_bytes()]) {
                Ok(reply) => reply,
                Err(why) => {
                    broken = Some(format!("GET {key}: {why}"));
                    break 'load;
                }
            };
            let done = Instant::now();
            let (error, allowed) = match decode(&reply) {
                Reply::Error(e) => (Some(e), true),
                Reply::Null => (None, truth.allows(None)),
                Reply::Bulk(v) => (None, truth.allows(Some(v.as_slice()))),
                _ => (None, false),
            };
            if !allowed {
                wrong.push((
                    done,
                    format!(
                        "GET {key} answered {}, but {}",
                        show(&reply),
                        truth.describe()
                    ),
                ));
            }
            let get_failed = error.is_some();
            samples.push(Sample { sent, done, error });
            if set_failed || get_failed {
                thread::sleep(ERROR_PAUSE);
            }
        }
    }
    if broken.is_none() {
        broken = still_open(&mut conn);
    }
    FailoverLoad {
        thread: index,
        samples,
        wrong,
        broken,
        keys,
    }
}

/// What a key may hold, as its only writer knows it: the last acknowledged value (`None`:
/// nothing acknowledged yet, so the key may also be missing), or the value of a write that
/// failed since, which may or may not have been applied.
#[derive(Default)]
struct Candidates {
    acked: Option<Vec<u8>>,
    failed: Vec<Vec<u8>>,
}

impl Candidates {
    fn ack(&mut self, value: Vec<u8>) {
        self.acked = Some(value);
        self.failed.clear();
    }

    fn fail(&mut self, value: Vec<u8>) {
        self.failed.push(value);
    }

    /// Whether a GET may answer `got` (`None`: the key is missing).
    fn allows(&self, got: Option<&[u8]>) -> bool {
        match got {
            None => self.acked.is_none(),
            Some(v) => {
                self.acked.as_deref() == Some(v) || self.failed.iter().any(|f| f.as_slice() == v)
            }
        }
    }

    fn describe(&self) -> String {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let acked = match &self.acked {
            Some(v) => format!("{:?}", text(v.as_slice())),
            None => "none".to_string(),
        };
        let failed: Vec<String> = self.failed.iter().map(|f| text(f.as_slice())).collect();
        format!("the last acknowledged value is {acked} and the writes that failed since are {failed:?}")
    }
}

/// When a client had been served without errors for [`FULL_SERVICE_WINDOW`] after its last
/// error since the kill: the arrival of the first reply to a request sent that long after
/// that error (so a thread that hangs is not "served"). `None` if the load ended first.
fn restored_at(samples: &[Sample], killed_at: Instant) -> Option<Instant> {
    let last_error = samples
        .iter()
        .filter(|s| s.error.is_some() && s.done >= killed_at)
        .map(|s| s.done)
        .max()
        .unwrap_or(killed_at);
    samples
        .iter()
        .filter(|s| s.sent >= last_error + FULL_SERVICE_WINDOW)
        .map(|s| s.done)
        .min()
}

// =============================================================================================
// Slots resharded under load
// =============================================================================================

const RESHARD_THREADS: usize = 4;
const COUNTERS_PER_THREAD: usize = 200;
/// Slots moved from A to B, then from B to C.
const FIRST_MOVE: usize = 300;
const SECOND_MOVE: usize = 500;
const RESHARD_TIMEOUT: Duration = Duration::from_secs(120);

/// Live resharding: while four clients (one connection each) INCR and GET 800 counters,
/// `redis-cli --cluster reshard` moves 300 slots from master A to B, then 500 from B to C
/// (the 300 just received among them), keys and all, with MIGRATE. Half of the counters are
/// placed in the slots that move. The proxy follows ASK and MOVED, so the clients see no
/// error at all, every connection stays open, every INCR and GET answers the count the
/// client expects, and at the end every counter holds exactly its acknowledged INCRs. The
/// slot map must show the moves, so the test cannot pass by nothing having happened.
#[test]
fn resharding_under_load_shows_no_client_errors() {
    let _serial = serial();
    let cluster = RedisCluster::start(3, 0);
    let px = Proxy::start(&cluster.seeds(), &[], &[]);
    let before = slot_table(&cluster);
    let masters = cluster.master_addrs();
    let [a, b, c] = masters.as_slice() else {
        panic!("expected 3 masters, the cluster reports {masters:?}");
    };

    // The local slot function must agree with Redis, or the counters land elsewhere.
    let mut probe = Resp::connect(a);
    for key in [
        "foo",
        "rs:0:0",
        "{user1000}.following",
        "a{}b",
        "x{y}z{w}",
        "{}{a}",
    ] {
        let reply = probe.cmd(&["CLUSTER", "KEYSLOT", key]);
        assert!(
            matches!(decode(&reply), Reply::Int(n) if usize::try_from(n) == Ok(key_slot(key))),
            "CLUSTER KEYSLOT {key} answered {}, the test computes {}",
            show(&reply),
            key_slot(key)
        );
    }

    // With a single source, redis-cli moves that source's lowest-numbered slots
    // (clusterManagerComputeReshardTable): A's first 300 go to B, then B's first 500 (the
    // 300 among them) go to C. Half the counters are put there; the rest fall where their
    // names hash. If redis-cli ever chose differently, the check near the end says so.
    let first = lowest_slots(&before, a, FIRST_MOVE);
    let mut between = before.clone();
    for &slot in &first {
        between[slot].clone_from(b);
    }
    let second = lowest_slots(&between, b, SECOND_MOVE);
    let mut aimed = vec![false; SLOTS];
    for &slot in first.iter().chain(&second) {
        aimed[slot] = true;
    }
    let counters: Vec<Vec<String>> = (0..RESHARD_THREADS)
        .map(|t| {
            (0..COUNTERS_PER_THREAD)
                .map(|i| {
                    if i < COUNTERS_PER_THREAD / 2 {
                        format!("rs:{t}:{i}")
                    } else {
                        (0u64..)
                            .map(|n| format!("rs:{t}:{i}:{n}"))
                            .find(|k| aimed[key_slot(k)])
                            .expect("an endless search ends with a find")
                    }
                })
                .collect()
        })
        .collect();

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<JoinHandle<ReshardLoad>> = counters
        .into_iter()
        .enumerate()
        .map(|(t, keys)| {
            let (addr, stop) = (px.addr(), Arc::clone(&stop));
            thread::Builder::new()
                .name(format!("reshard-load-{t}"))
                .spawn(move || reshard_load(&addr, keys, &stop, started))
                .expect("spawn a load thread")
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    let first_out = or_stop(reshard(a, a, b, FIRST_MOVE), &stop);
    let first_done = started.elapsed();
    let second_out = or_stop(reshard(b, b, c, SECOND_MOVE), &stop);
    let second_done = started.elapsed();
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<ReshardLoad> = load.into_iter().map(join).collect();

    // ---- What happened ----
    let expected = [
        (a, owned_by(&before, a) - FIRST_MOVE),
        (b, owned_by(&before, b) + FIRST_MOVE - SECOND_MOVE),
        (c, owned_by(&before, c) + SECOND_MOVE),
    ];
    // redis-cli tells every master, but give gossip a moment anyway.
    let moved_as_expected = eventually(Duration::from_secs(10), || {
        let now = slot_table(&cluster);
        expected.iter().all(|(m, n)| owned_by(&now, m) == *n)
    });
    let after = slot_table(&cluster);
    let all_counters: Vec<&Counter> = reports.iter().flat_map(|r| &r.counters).collect();
    let moved_counters = all_counters
        .iter()
        .filter(|ctr| {
            let slot = key_slot(&ctr.key);
            before[slot] != after[slot]
        })
        .count();
    let errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
    eprintln!(
        "RESHARD: requests={} errors={} first_reshard_done={:.3}s second_reshard_done={:.3}s \
         counters={} counters_in_moved_slots={moved_counters} slots_now={:?}",
        reports.iter().map(|r| r.requests).sum::<u64>(),
        errors.len(),
        first_done.as_secs_f64(),
        second_done.as_secs_f64(),
        all_counters.len(),
        [a, b, c].map(|m| (m.as_str(), owned_by(&after, m))),
    );
    print_error_counts(
        "RESHARD:",
        errors.iter().map(|e| {
            e.split_once(": ")
                .map_or(e.as_str(), |(_, m)| m)
                .to_string()
        }),
    );

    // ---- The rules ----
    assert!(
        errors.is_empty(),
        "{} error replies during the resharding (seconds from the start of the load; the \
         reshards ended at {:.3}s and {:.3}s):\n{}\n--- proxy stderr ---\n{}",
        errors.len(),
        first_done.as_secs_f64(),
        second_done.as_secs_f64(),
        errors
            .iter()
            .take(50)
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        px.stderr_tail()
    );
    let broken: Vec<String> = reports
        .iter()
        .enumerate()
        .filter_map(|(t, r)| r.broken.as_ref().map(|why| format!("thread {t}: {why}")))
        .collect();
    assert!(
        broken.is_empty(),
        "client connections did not survive the resharding:\n{}",
        broken.join("\n")
    );
    let wrong: Vec<&String> = reports.iter().flat_map(|r| &r.wrong).collect();
    assert!(
        wrong.is_empty(),
        "{} replies answered a wrong count:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(50)
            .map(|w| w.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut conn = Resp::connect(&px.addr());
    let mut off = Vec::new();
    for ctr in &all_counters {
        let reply = conn.cmd(&["GET", ctr.key.as_str()]);
        let value = match decode(&reply) {
            Reply::Bulk(v) => parse_i64(&v),
            Reply::Null => Some(0),
            _ => None,
        };
        if !value.is_some_and(|n| ctr.allows(n)) {
            off.push(format!(
                "{}: {} after {} acknowledged INCRs ({} failed)",
                ctr.key,
                show(&reply),
                ctr.acked,
                ctr.failed
            ));
        }
    }
    assert!(
        off.is_empty(),
        "{} counters do not hold their acknowledged INCRs:\n{}",
        off.len(),
        off.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        moved_as_expected,
        "CLUSTER SLOTS does not show the moves: expected {expected:?}, got {:?}\n\
         --- first reshard ---\n{}\n--- second reshard ---\n{}",
        [a, b, c].map(|m| (m.as_str(), owned_by(&after, m))),
        tail(&first_out, 30),
        tail(&second_out, 30),
    );
    let aimed_counters = RESHARD_THREADS * COUNTERS_PER_THREAD / 2;
    assert!(
        moved_counters * 2 >= aimed_counters,
        "only {moved_counters} counters were in slots that moved, though {aimed_counters} were \
         placed in the slots redis-cli was expected to move (its source's lowest-numbered): \
         the expectation is wrong, so the test barely exercised a migration"
    );
}

/// One load thread of the resharding test, and what it saw.
struct ReshardLoad {
    requests: u64,
    /// Error replies: when (seconds from the start of the load), the command and key, the error.
    errors: Vec<String>,
    /// Replies that were no error but not the count either.
    wrong: Vec<String>,
    broken: Option<String>,
    counters: Vec<Counter>,
}

/// A counter and the INCRs of its only writer: acknowledged, and failed (which may or may
/// not have been applied).
struct Counter {
    key: String,
    acked: i64,
    failed: i64,
}

impl Counter {
    /// Whether the counter may hold `n` now.
    fn allows(&self, n: i64) -> bool {
        (self.acked..=self.acked + self.failed).contains(&n)
    }
}

/// INCR then GET of each counter in turn, on one connection, until `stop`.
fn reshard_load(addr: &str, keys: Vec<String>, stop: &AtomicBool, started: Instant) -> ReshardLoad {
    let mut conn = Resp::connect(addr);
    let mut counters: Vec<Counter> = keys
        .into_iter()
        .map(|key| Counter {
            key,
            acked: 0,
            failed: 0,
        })
        .collect();
    let mut requests = 0u64;
    let mut errors = Vec::new();
    let mut wrong = Vec::new();
    let mut broken = None;
    let at = || format!("{:.3}s", started.elapsed().as_secs_f64());
    'load: while !stop.load(Ordering::Relaxed) {
        for ctr in &mut counters {
            if stop.load(Ordering::Relaxed) {
                break 'load;
            }
            let mut failed = false;
            requests += 1;
            let reply = match request(&mut conn, &[b"INCR", ctr.key.as_bytes()]) {
                Ok(reply) => reply,
                Err(why) => {
                    broken = Some(format!("INCR {}: {why}", ctr.key));
                    break 'load;
                }
            };
            match decode(&reply) {
                Reply::Int(n) => {
                    ctr.acked += 1;
                    if !ctr.allows(n) {
                        wrong.push(format!(
                            "{} INCR {} answered {n} after {} acknowledged INCRs ({} failed)",
                            at(),
                            ctr.key,
                            ctr.acked - 1,
                            ctr.failed
                        ));
                    }
                }
                Reply::Error(e) => {
                    ctr.failed += 1;
                    failed = true;
                    errors.push(format!("{} INCR {}: {e}", at(), ctr.key));
                }
                _ => {
                    ctr.failed += 1;
                    wrong.push(format!(
                        "{} INCR {} answered {}",
                        at(),
                        ctr.key,
                        show(&reply)
                    ));
                }
            }

            requests += 1;
            let reply = match request(&mut conn, &[b"GET", ctr.key.as_bytes()]) {
                Ok(reply) => reply,
                Err(why) => {
                    broken = Some(format!("GET {}: {why}", ctr.key));
                    break 'load;
                }
            };
            let value = match decode(&reply) {
                Reply::Error(e) => {
                    failed = true;
                    errors.push(format!("{} GET {}: {e}", at(), ctr.key));
                    None
                }
                Reply::Bulk(v) => Some(parse_i64(&v)),
                Reply::Null => Some(Some(0)),
                _ => Some(None),
            };
            // `None`: an error, already recorded; `Some(None)`: no count at all.
            if let Some(value) = value {
                if !value.is_some_and(|n| ctr.allows(n)) {
                    wrong.push(format!(
                        "{} GET {} answered {} after {} acknowledged INCRs ({} failed)",
                        at(),
                        ctr.key,
                        show(&reply),
                        ctr.acked,
                        ctr.failed
                    ));
                }
            }
            if failed {
                thread::sleep(ERROR_PAUSE);
            }
        }
    }
    if broken.is_none() {
        broken = still_open(&mut conn);
    }
    ReshardLoad {
        requests,
        errors,
        wrong,
        broken,
        counters,
    }
}

/// The output of a reshard; if it failed, the load is stopped before the test fails.
fn or_stop(reshard: Result<String, String>, stop: &AtomicBool) -> String {
    reshard.unwrap_or_else(|why| {
        stop.store(true, Ordering::Relaxed);
        panic!("{why}")
    })
}

/// Runs `redis-cli --cluster reshard` through the node `via`, moving `slots` slots from the
/// master `from` to the master `to` (keys and all, with MIGRATE): its output, or why it
/// failed. Waits first until redis-cli's own consistency check passes, as it refuses to
/// reshard a cluster whose nodes still disagree after the previous move.
fn reshard(via: &str, from: &str, to: &str, slots: usize) -> Result<String, String> {
    let mut last_check = String::new();
    let agreed = eventually(Duration::from_secs(30), || {
        let mut check = Command::new("redis-cli");
        check.args(["--cluster", "check", via]);
        match run_logged(&mut check, Duration::from_secs(30)) {
            Ok(_) => true,
            Err(why) => {
                last_check = why;
                false
            }
        }
    });
    if !agreed {
        return Err(format!(
            "the cluster never passed `redis-cli --cluster check`:\n{last_check}"
        ));
    }
    let (from_id, to_id, count) = (node_id(from), node_id(to), slots.to_string());
    let mut cli = Command::new("redis-cli");
    cli.args([
        "--cluster",
        "reshard",
        via,
        "--cluster-from",
        from_id.as_str(),
        "--cluster-to",
        to_id.as_str(),
        "--cluster-slots",
        count.as_str(),
        "--cluster-yes",
    ]);
    run_logged(&mut cli, RESHARD_TIMEOUT)
}

/// Runs a command to completion (killing it after `limit`) with stdout and stderr
/// interleaved in one temp file: the output if it exited 0, else a report with the output.
fn run_logged(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let log = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
    let out = log.reopen().map_err(|e| format!("reopen temp file: {e}"))?;
    // One open file description for both streams, so they append instead of overwriting.
    let err = out
        .try_clone()
        .map_err(|e| format!("clone temp file: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let spawned = cmd.spawn();
    let mut child = spawned.map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = String::from_utf8_lossy(&fs::read(log.path()).unwrap_or_default()).into_owned();
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => Err(format!("{cmd:?} failed ({s}):\n{}", tail(&output, 60))),
        None => Err(format!(
            "{cmd:?} did not finish within {limit:?}:\n{}",
            tail(&output, 60)
        )),
    }
}

/// A node's cluster id.
fn node_id(addr: &str) -> String {
    let reply = Resp::connect(addr).cmd(&["CLUSTER", "MYID"]);
    match decode(&reply) {
        Reply::Bulk(id) => String::from_utf8_lossy(&id).into_owned(),
        _ => panic!("CLUSTER MYID on {addr} answered {}", show(&reply)),
    }
}

/// How many slots `master` owns in `table`.
fn owned_by(table: &[String], master: &str) -> usize {
    table
        .iter()
        .filter(|owner| owner.as_str() == master)
        .count()
}

/// The `n` lowest-numbered slots that `master` owns in `table`.
fn lowest_slots(table: &[String], master: &str, n: usize) -> Vec<usize> {
    table
        .iter()
        .enumerate()
        .filter(|(_, owner)| owner.as_str() == master)
        .map(|(slot, _)| slot)
        .take(n)
        .collect()
}

// =============================================================================================
// The S3 store frozen, then killed, under spill traffic
// =============================================================================================

const S3_BUCKET: &str = "tierproxy-faults";
/// `l3.timeout_ms`: every store call fails after this long.
const S3_TIMEOUT_MS: u64 = 1000;
/// `l3.threshold_bytes` (its minimum): every value of the test (4–20 KiB) spills.
const SPILL_THRESHOLD: usize = 1024;
const S3_WRITERS: usize = 3;
const S3_KEYS_PER_WRITER: usize = 6;
const S3_READERS: usize = 2;
/// While S3 is frozen a reply may take this much longer than `l3.timeout_ms` (the Redis
/// side of the request, scheduling on a busy machine), but no more.
const S3_REPLY_MARGIN: Duration = Duration::from_secs(4);

/// The phases of the S3 test, in order, as indices into [`PHASES`].
const NORMAL: usize = 0;
const FROZEN: usize = 1;
/// S3 thawed, until a spilled write through the proxy works again (not asserted on).
const THAWING: usize = 2;
const THAWED: usize = 3;
/// S3 killed, restarted (empty) and its bucket created again.
const KILLED: usize = 4;
/// Until a spilled write through the proxy works again (not asserted on).
const RESTARTING: usize = 5;
const RESTARTED: usize = 6;
/// A request sent in one phase and answered in another counts for neither.
const STRADDLING: usize = 7;
const PHASES: [&str; 8] = [
    "a-normal",
    "b-frozen",
    "b-thawing",
    "c-normal",
    "d-killed",
    "d-restarting",
    "e-normal",
    "straddling",
];

/// S3 slow and then gone while writers SET large (spilled) values and readers GET them, each
/// on one held connection: (a) normal; (b) the S3 server frozen with SIGSTOP for 5 s: SETs
/// fail within `l3.timeout_ms` plus a margin, they do not hang; (c) thawed: every SET is
/// acknowledged again; (d) the S3 server killed for 3 s and restarted empty: SETs fail;
/// (e) normal again: every SET is acknowledged. Every value is derived from its key and
/// version, so each GET is checked byte for byte: at any time it answers an error or a
/// version no older than the last one acknowledged before the GET was sent (and one that
/// was written), never other bytes. At the end every key last written after the restart
/// reads back exactly that write; keys last written before the kill may answer an error
/// (their objects died with the old server) but never a wrong value. Counts per phase are
/// printed on `S3FAULT:` lines.
#[test]
fn s3_down_or_slow_during_spill_traffic_loses_no_acknowledged_write() {
    let _serial = serial();
    let redis = RedisServer::start();
    let mut s3 = S3Server::start();
    s3.create_bucket(S3_BUCKET);
    let port = s3.port();
    let px = spill_proxy(&redis, &s3);
    let t = tag("s3fault");
    let keys: Vec<String> = (0..S3_WRITERS * S3_KEYS_PER_WRITER)
        .map(|i| format!("{t}k{i}"))
        .collect();
    let probe = format!("{t}probe");
    let load = Arc::new(SpillLoad {
        versions: keys.iter().map(|_| Mutex::default()).collect(),
        keys,
        phase: AtomicUsize::new(NORMAL),
        stop: AtomicBool::new(false),
    });

    let mut threads: Vec<JoinHandle<S3Load>> = Vec::new();
    for w in 0..S3_WRITERS {
        let (load, addr) = (Arc::clone(&load), px.addr());
        let mine: Vec<usize> = (w * S3_KEYS_PER_WRITER..(w + 1) * S3_KEYS_PER_WRITER).collect();
        let spawned = thread::Builder::new()
            .name(format!("s3-writer-{w}"))
            .spawn(move || s3_writer(&load, &addr, &mine));
        threads.push(spawned.expect("spawn a writer thread"));
    }
    for r in 0..S3_READERS {
        let (load, addr) = (Arc::clone(&load), px.addr());
        let spawned = thread::Builder::new()
            .name(format!("s3-reader-{r}"))
            .spawn(move || s3_reader(&load, &addr, r * 7));
        threads.push(spawned.expect("spawn a reader thread"));
    }
    let enter = |phase: usize| load.phase.store(phase, Ordering::SeqCst);

    thread::sleep(Duration::from_secs(2));
    enter(FROZEN);
    s3.signal("STOP");
    // A SET that fails while frozen was measured to take up to 2 s (twice l3.timeout_ms):
    // with 4 s, a writer's SETs could all straddle the phase's edges and none count.
    thread::sleep(Duration::from_secs(5));
    s3.signal("CONT");
    enter(THAWING);
    let thaw_recovery = wait_for_spilled_write(&px, &probe);
    enter(THAWED);
    thread::sleep(Duration::from_secs(2));
    enter(KILLED);
    s3.stop();
    thread::sleep(Duration::from_secs(3));
    s3 = S3Server::start_on(port);
    // Every write acknowledged from here on went to the new server: the old one is gone.
    let restarted_at = Instant::now();
    s3.create_bucket(S3_BUCKET);
    enter(RESTARTING);
    let restart_recovery = wait_for_spilled_write(&px, &probe);
    enter(RESTARTED);
    thread::sleep(Duration::from_secs(2));
    load.stop.store(true, Ordering::Relaxed);
    let reports: Vec<S3Load> = threads.into_iter().map(join).collect();

    // ---- Counts per phase ----
    let ops: Vec<&Op> = reports.iter().flat_map(|r| &r.ops).collect();
    let mut tallies: Vec<Tally> = PHASES.iter().map(|_| Tally::default()).collect();
    for op in &ops {
        let tally = &mut tallies[op.phase];
        match (op.set, op.error.is_some()) {
            (true, false) => tally.sets_acked += 1,
            (true, true) => tally.sets_failed += 1,
            (false, false) => tally.gets_ok += 1,
            (false, true) => tally.gets_failed += 1,
        }
        tally.slowest = tally.slowest.max(op.latency);
    }
    let frozen_slowest = ops
        .iter()
        .filter(|op| op.sent_phase == FROZEN)
        .map(|op| op.latency)
        .max()
        .unwrap_or_default();
    eprintln!(
        "S3FAULT: timeout_ms={S3_TIMEOUT_MS} writers={S3_WRITERS} readers={S3_READERS} keys={} \
         thaw_recovery={:.3}s restart_recovery={:.3}s slowest_reply_sent_while_frozen={:.3}s",
        load.keys.len(),
        thaw_recovery.as_secs_f64(),
        restart_recovery.as_secs_f64(),
        frozen_slowest.as_secs_f64(),
    );
    for (name, t) in PHASES.iter().zip(&tallies) {
        eprintln!(
            "S3FAULT: phase={name} sets_acked={} sets_errored={} gets_ok={} gets_errored={} slowest={:.3}s",
            t.sets_acked,
            t.sets_failed,
            t.gets_ok,
            t.gets_failed,
            t.slowest.as_secs_f64()
        );
    }
    print_error_counts(
        "S3FAULT:",
        ops.iter().filter_map(|op| {
            let e = op.error.as_ref()?;
            let what = if op.set { "SET" } else { "GET" };
            Some(format!("[{} {what}] {e}", PHASES[op.phase]))
        }),
    );

    // ---- The rules ----
    let broken: Vec<&String> = reports.iter().filter_map(|r| r.broken.as_ref()).collect();
    assert!(
        broken.is_empty(),
        "client connections did not survive S3 faults:\n{}\n--- proxy stderr ---\n{}",
        broken
            .iter()
            .map(|b| b.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        px.stderr_tail()
    );
    let wrong: Vec<&String> = reports.iter().flat_map(|r| &r.wrong).collect();
    assert!(
        wrong.is_empty(),
        "{} replies were wrong:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(50)
            .map(|w| w.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A SET sent during the fault and failing just after its end felt it too: on a busy
    // machine a failing SET can take long enough that none is sent and answered inside.
    for phase in [FROZEN, KILLED] {
        let felt = ops
            .iter()
            .filter(|op| op.set && op.sent_phase == phase && op.error.is_some())
            .count();
        assert!(
            felt > 0,
            "no SET sent in phase {} failed: the fault was not felt, so the test proves nothing",
            PHASES[phase]
        );
    }
    for phase in [NORMAL, THAWED, RESTARTED] {
        let t = &tallies[phase];
        assert!(
            t.sets_failed == 0 && t.sets_acked > 0,
            "in phase {} (S3 up) {} SETs failed and {} were acknowledged; every one should be \
             acknowledged (errors are on the S3FAULT: lines)\n--- proxy stderr ---\n{}",
            PHASES[phase],
            t.sets_failed,
            t.sets_acked,
            px.stderr_tail()
        );
    }
    let frozen_limit = Duration::from_millis(S3_TIMEOUT_MS) + S3_REPLY_MARGIN;
    assert!(
        frozen_slowest <= frozen_limit,
        "a request sent while S3 was frozen took {frozen_slowest:?}, over l3.timeout_ms \
         ({S3_TIMEOUT_MS} ms) plus {S3_REPLY_MARGIN:?}"
    );

    // ---- Afterwards: what was acknowledged since the restart is there ----
    let mut c = Resp::connect(&px.addr());
    let mut bad = Vec::new();
    let mut written_since_restart = 0;
    for (k, key) in load.keys.iter().enumerate() {
        let (sent, acked) = {
            let v = lock(&load.versions[k]);
            (v.sent, v.acked)
        };
        let since_restart = acked.is_some_and(|(_, at)| at > restarted_at);
        if since_restart {
            written_since_restart += 1;
        }
        let floor = acked.map_or(0, |(version, _)| version);
        let reply = c.cmd(&["GET", key.as_str()]);
        let complaint = match decode(&reply) {
            Reply::Bulk(v) => match version_of(key, &v) {
                Some(got) if (floor..=sent).contains(&got) => None,
                Some(got) => Some(format!("version {got}")),
                None => Some(format!("{} bytes of no version of the key", v.len())),
            },
            // Its object went with the old server.
            Reply::Error(_) if !since_restart => None,
            Reply::Null if acked.is_none() => None,
            _ => Some(show(&reply)),
        };
        if let Some(complaint) = complaint {
            bad.push(format!(
                "{key}: {complaint}, but version {floor} was the last acknowledged \
                 ({}) and {sent} the last sent",
                if since_restart {
                    "after the restart"
                } else {
                    "before the kill"
                }
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "keys do not read back their acknowledged writes:\n{}",
        bad.join("\n")
    );
    assert!(
        written_since_restart > 0,
        "no key was acknowledged after S3 came back, so nothing was checked"
    );
}

/// What the S3 test's threads share.
struct SpillLoad {
    keys: Vec<String>,
    /// Per key (same index), what its writer has sent and had acknowledged.
    versions: Vec<Mutex<Versions>>,
    /// The current phase, an index into [`PHASES`].
    phase: AtomicUsize,
    stop: AtomicBool,
}

/// A key's versions go up by one per SET, from 1; one writer thread owns each key.
#[derive(Default)]
struct Versions {
    /// The newest version whose SET has been sent (set before it is sent).
    sent: u64,
    /// The newest acknowledged version, and when the acknowledgement arrived.
    acked: Option<(u64, Instant)>,
}

/// One request of the S3 test.
struct Op {
    set: bool,
    sent_phase: usize,
    /// The phase it counts for: [`STRADDLING`] unless sent and answered in the same one.
    phase: usize,
    latency: Duration,
    error: Option<String>,
}

/// One thread of the S3 test, and what it saw.
#[derive(Default)]
struct S3Load {
    ops: Vec<Op>,
    wrong: Vec<String>,
    broken: Option<String>,
}

impl S3Load {
    /// Keeps the request's outcome; after an error, pauses so a failing client does not
    /// spin.
    fn record(&mut self, op: Op) {
        let failed = op.error.is_some();
        self.ops.push(op);
        if failed {
            thread::sleep(ERROR_PAUSE);
        }
    }
}

#[derive(Default)]
struct Tally {
    sets_acked: usize,
    sets_failed: usize,
    gets_ok: usize,
    gets_failed: usize,
    slowest: Duration,
}

/// SETs the next version of each of its keys in turn, on one connection, until `stop`.
fn s3_writer(load: &SpillLoad, addr: &str, mine: &[usize]) -> S3Load {
    let mut conn = Resp::connect(addr);
    let mut out = S3Load::default();
    'load: while !load.stop.load(Ordering::Relaxed) {
        for &k in mine {
            if load.stop.load(Ordering::Relaxed) {
                break 'load;
            }
            let key = &load.keys[k];
            let version = {
                let mut v = lock(&load.versions[k]);
                v.sent += 1;
                v.sent
            };
            let value = spill_value(key, version);
            let sent_phase = load.phase.load(Ordering::SeqCst);
            let sent = Instant::now();
            let reply = match request(&mut conn, &[b"SET", key.as_bytes(), &value]) {
                Ok(reply) => reply,
                Err(why) => {
                    out.broken = Some(format!(
                        "[{}] SET {key} (version {version}): {why}",
                        PHASES[sent_phase]
                    ));
                    break 'load;
                }
            };
            let latency = sent.elapsed();
            let phase = phase_of(sent_phase, load.phase.load(Ordering::SeqCst));
            let error = error_text(&reply);
            if error.is_none() {
                if reply == b"+OK\r\n" {
                    lock(&load.versions[k]).acked = Some((version, Instant::now()));
                } else {
                    out.wrong.push(format!(
                        "[{}] SET {key} (version {version}) answered {}",
                        PHASES[phase],
                        show(&reply)
                    ));
                }
            }
            out.record(Op {
                set: true,
                sent_phase,
                phase,
                latency,
                error,
            });
        }
    }
    if out.broken.is_none() {
        out.broken = still_open(&mut conn);
    }
    out
}

/// GETs every key in turn (from `first` on), on one connection, until `stop`, checking each
/// value against what the writers had sent and had acknowledged.
fn s3_reader(load: &SpillLoad, addr: &str, first: usize) -> S3Load {
    let mut conn = Resp::connect(addr);
    let mut out = S3Load::default();
    let n = load.keys.len();
    'load: while !load.stop.load(Ordering::Relaxed) {
        for i in 0..n {
            if load.stop.load(Ordering::Relaxed) {
                break 'load;
            }
            let k = (first + i) % n;
            let key = &load.keys[k];
            // Acknowledged before the GET is sent: the GET must not answer anything older.
            let floor = lock(&load.versions[k]).acked.map(|(v, _)| v);
            let sent_phase = load.phase.load(Ordering::SeqCst);
            let sent = Instant::now();
            let reply = match request(&mut conn, &[b"GET", key.as_bytes()]) {
                Ok(reply) => reply,
                Err(why) => {
                    out.broken = Some(format!("[{}] GET {key}: {why}", PHASES[sent_phase]));
                    break 'load;
                }
            };
            let latency = sent.elapsed();
            let phase = phase_of(sent_phase, load.phase.load(Ordering::SeqCst));
            // Sent by now: a write in flight may already be visible.
            let newest = lock(&load.versions[k]).sent;
            let mut error = None;
            let complaint = match decode(&reply) {
                Reply::Error(e) => {
                    error = Some(e);
                    None
                }
                Reply::Null => floor.map(|f| format!("nil, after version {f} was acknowledged")),
                Reply::Bulk(v) => match version_of(key, &v) {
                    None => Some(format!(
                        "{} bytes that are no version of the key: {}",
                        v.len(),
                        show(&v)
                    )),
                    Some(got) => match floor {
                        Some(f) if got < f => Some(format!(
                            "version {got}, older than version {f}, acknowledged before the GET was sent"
                        )),
                        _ if got > newest => Some(format!(
                            "version {got}, which was never written (the newest sent is {newest})"
                        )),
                        _ => None,
                    },
                },
                _ => Some(format!("an unexpected reply {}", show(&reply))),
            };
            if let Some(complaint) = complaint {
                out.wrong.push(format!(
                    "[{}] GET {key} answered {complaint}",
                    PHASES[phase]
                ));
            }
            out.record(Op {
                set: false,
                sent_phase,
                phase,
                latency,
                error,
            });
        }
    }
    if out.broken.is_none() {
        out.broken = still_open(&mut conn);
    }
    out
}

fn phase_of(sent: usize, answered: usize) -> usize {
    if sent == answered {
        sent
    } else {
        STRADDLING
    }
}

/// Version `version` of `key`'s value: 4–20 KiB, starting with `key#version#` and going on
/// with incompressible bytes, all derived from the two, so a reader can name the version
/// it got and check every byte.
fn spill_value(key: &str, version: u64) -> Vec<u8> {
    let seed = fnv1a(key.as_bytes()) ^ version.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let len = 4 * 1024 + (seed % (16 * 1024 + 1)) as usize;
    let mut value = format!("{key}#{version}#").into_bytes();
    value.extend(random(len - value.len(), seed));
    value
}

/// Which version of `key`'s value `value` is, if it is exactly one.
fn version_of(key: &str, value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(key.as_bytes())?.strip_prefix(b"#")?;
    let end = rest.iter().position(|&b| b == b'#')?;
    let version: u64 = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    (spill_value(key, version) == value).then_some(version)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A proxy over `upstream` that spills every value over [`SPILL_THRESHOLD`] to the bucket
/// on `s3`, with [`S3_TIMEOUT_MS`] on every store call.
fn spill_proxy(upstream: &RedisServer, s3: &S3Server) -> Proxy {
    // Removed when dropped, after the proxy has read it at start.
    let cfg = config_file(&format!(
        "[l3]\nenabled = true\nthreshold_bytes = {SPILL_THRESHOLD}\nbucket = \"{S3_BUCKET}\"\n\
         prefix = \"spill/\"\ntimeout_ms = {S3_TIMEOUT_MS}\n"
    ));
    let path = cfg.path().to_str().expect("utf-8 temp path").to_string();
    let endpoint = s3.endpoint();
    Proxy::start(
        &[upstream.addr()],
        &["--config", path.as_str()],
        &[
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("CACHE_L3_SIGNING_KEY", "a-signing-key-for-the-fault-tests"),
        ],
    )
}

/// SETs a spilled value through the proxy until one is acknowledged (at most 30 s): the
/// store works again. How long that took.
fn wait_for_spilled_write(px: &Proxy, key: &str) -> Duration {
    let started = Instant::now();
    let mut conn = Resp::connect(&px.addr());
    let value = random(2 * SPILL_THRESHOLD, 7);
    let mut last = String::new();
    let ok = eventually(Duration::from_secs(30), || {
        let reply = conn.cmd_bytes(&[b"SET", key.as_bytes(), &value]);
        last = show(&reply);
        reply == b"+OK\r\n"
    });
    assert!(
        ok,
        "spilled writes never worked again (the last reply: {last})\n--- proxy stderr ---\n{}",
        px.stderr_tail()
    );
    started.elapsed()
}

// =============================================================================================
// Shared helpers
// =============================================================================================

/// The tests of this file take turns (see the module docs).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    lock(&SERIAL)
}

/// A poisoned lock only means another thread panicked; its data is still what it was.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A load thread's result; its panic, with its name, if it panicked.
fn join<T>(handle: JoinHandle<T>) -> T {
    let name = handle
        .thread()
        .name()
        .unwrap_or("a load thread")
        .to_string();
    handle.join().unwrap_or_else(|payload| {
        let text = if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else if let Some(s) = payload.downcast_ref::<&str>() {
            s.to_string()
        } else {
            "(no message)".to_string()
        };
        panic!("{name} panicked: {text}")
    })
}

/// Sends one command on a held connection and waits up to [`REPLY_LIMIT`] for its reply.
/// `Err` says why the connection cannot be used any more: the proxy closed it, no reply
/// came, or the write failed.
fn request(conn: &mut Resp, args: &[&[u8]]) -> Result<Vec<u8>, String> {
    let frame = encode_cmd(args);
    // `send_raw` panics when the write fails: a finding to report, not a reason to lose
    // the thread's records.
    if panic::catch_unwind(AssertUnwindSafe(|| conn.send_raw(&frame))).is_err() {
        return Err("the write failed: the connection is gone".to_string());
    }
    if let Some(reply) = conn.read_reply_within(REPLY_LIMIT) {
        return Ok(reply);
    }
    if conn.is_closed() {
        Err("the proxy closed the connection".to_string())
    } else {
        Err(format!(
            "no complete, well-formed reply within {REPLY_LIMIT:?}"
        ))
    }
}

/// Why a held connection is no longer usable once the load is over, or `None` if it still
/// answers PING.
fn still_open(conn: &mut Resp) -> Option<String> {
    match request(conn, &[b"PING"]) {
        Ok(reply) if reply == b"+PONG\r\n" => None,
        Ok(reply) => Some(format!("PING after the load answered {}", show(&reply))),
        Err(why) => Some(format!("PING after the load: {why}")),
    }
}

/// The replies the tests look into.
enum Reply {
    Bulk(Vec<u8>),
    Null,
    Int(i64),
    Error(String),
    Other,
}

fn decode(reply: &[u8]) -> Reply {
    match reply.first() {
        Some(b'-') => Reply::Error(line_text(reply)),
        Some(b':') => line_text(reply).parse().map_or(Reply::Other, Reply::Int),
        Some(b'$') if reply == b"$-1\r\n" => Reply::Null,
        Some(b'$') => {
            let Some(eol) = reply.windows(2).position(|w| w == b"\r\n") else {
                return Reply::Other;
            };
            let len = std::str::from_utf8(&reply[1..eol])
                .ok()
                .and_then(|n| n.parse::<usize>().ok());
            let body = &reply[eol + 2..];
            match len {
                Some(len) if body.len() == len + 2 && body.ends_with(b"\r\n") => {
                    Reply::Bulk(body[..len].to_vec())
                }
                _ => Reply::Other,
            }
        }
        _ => Reply::Other,
    }
}

/// The text of a one-line reply (`-ERR …`, `:12`), without its type byte and CRLF.
fn line_text(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply.get(1..).unwrap_or_default())
        .trim_end()
        .to_string()
}

fn error_text(reply: &[u8]) -> Option<String> {
    reply.starts_with(b"-").then(|| line_text(reply))
}

fn parse_i64(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Printable form of a reply for messages, cut short.
fn show(bytes: &[u8]) -> String {
    const LIMIT: usize = 200;
    let shown = bytes[..bytes.len().min(LIMIT)].escape_ascii();
    if bytes.len() > LIMIT {
        format!("\"{shown}\"... ({} bytes)", bytes.len())
    } else {
        format!("\"{shown}\"")
    }
}

/// Prints each distinct error with how often it came, most frequent first.
fn print_error_counts(prefix: &str, errors: impl Iterator<Item = String>) {
    const SHOWN: usize = 25;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in errors {
        *counts.entry(e).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (error, n) in counts.iter().take(SHOWN) {
        eprintln!("{prefix} error x{n}: {error}");
    }
    if counts.len() > SHOWN {
        eprintln!(
            "{prefix} ... and {} more distinct errors",
            counts.len() - SHOWN
        );
    }
}

/// `Some(d)` as seconds, `None` as "never".
fn secs(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.3}s", d.as_secs_f64()),
        None => "never".to_string(),
    }
}

/// `at` relative to `origin`, signed, in seconds.
fn relative(at: Instant, origin: Instant) -> String {
    if at >= origin {
        format!("+{:.3}s", (at - origin).as_secs_f64())
    } else {
        format!("-{:.3}s", (origin - at).as_secs_f64())
    }
}

/// The last `lines` lines of a command's output.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The master of every slot (indexed by slot) as the cluster reports it now; empty where
/// no master owns it.
fn slot_table(cluster: &RedisCluster) -> Vec<String> {
    let mut owners = vec![String::new(); SLOTS];
    for (start, end, master) in cluster.slot_owners() {
        owners[usize::from(start)..=usize::from(end)].fill(master);
    }
    owners
}

fn owner_of_slot(cluster: &RedisCluster, slot: usize) -> String {
    let owner = slot_table(cluster).swap_remove(slot);
    assert!(!owner.is_empty(), "no master owns slot {slot}");
    owner
}

/// Redis Cluster's hash slot of a key: CRC16 (XMODEM) of the key, or of its hash tag (the
/// part between the first `{` and the next `}`, if not empty), modulo 16384.
fn key_slot(key: &str) -> usize {
    let k = key.as_bytes();
    let hashed = match k.iter().position(|&b| b == b'{') {
        Some(open) => match k[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &k[open + 1..open + 1 + len],
            _ => k,
        },
        None => k,
    };
    usize::from(crc16(hashed)) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
