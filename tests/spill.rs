//! L3 spill with the local-directory store, against a real cluster: values over the
//! threshold leave Redis, reads resolve them, stubs are authenticated.

mod support;

use std::io::Write;
use std::sync::OnceLock;

use support::{bulk, random, shared_cluster, tag, Proxy, Resp};

const THRESHOLD: usize = 4096;

struct Setup {
    proxy: Proxy,
    dir: tempfile::TempDir,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(new_setup)
}

/// A proxy with a store directory of its own (for tests that count objects).
fn new_setup() -> Setup {
    spill_proxy("")
}

/// A spilling proxy with its own store directory and `extra` lines in its `[l3]` section.
fn spill_proxy(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_with_config(
        &shared_cluster().seeds(),
        &format!(
            "[l3]\nenabled = true\nthreshold_bytes = {THRESHOLD}\ndir = \"{}\"\n{extra}",
            dir.path().display()
        ),
    );
    Setup { proxy, dir }
}

fn conn() -> Resp {
    Resp::connect(&setup().proxy.addr())
}

/// A client that bypasses the proxy (follows MOVED itself).
fn direct() -> DirectCluster {
    DirectCluster
}

struct DirectCluster;

impl DirectCluster {
    fn cmd(&self, args: &[&[u8]]) -> Vec<u8> {
        for m in shared_cluster().master_addrs() {
            let r = Resp::connect(&m).cmd_bytes(args);
            if !r.starts_with(b"-MOVED") {
                return r;
            }
        }
        panic!("no master took {:?}", String::from_utf8_lossy(args[0]));
    }
}

fn objects(dir: &std::path::Path) -> usize {
    object_files(dir).len()
}

/// The stored objects under `dir` (not the signing key or temporary files: dot files).
fn object_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

fn info_field(c: &mut Resp, name: &str) -> i64 {
    let info = String::from_utf8_lossy(&c.cmd(&["INFO", "spill"])).into_owned();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {info}"))
}

#[test]
fn round_trips_around_the_threshold_and_large() {
    let mut c = conn();
    let t = tag("sizes");
    for (i, n) in [
        THRESHOLD - 1,
        THRESHOLD,
        THRESHOLD + 1,
        1 << 20,
        20 << 20,
        100 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        for (kind, value) in [("random", random(n, i as u64 + 1)), ("zeros", vec![0u8; n])] {
            let k = format!("{t}{n}-{kind}");
            assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &value]), b"+OK\r\n");
            assert_eq!(
                c.cmd_bytes(&[b"GET", k.as_bytes()]),
                bulk(&value),
                "{n} {kind}"
            );
            assert_eq!(c.cmd(&["STRLEN", &k]), format!(":{n}\r\n").into_bytes());
            let held = direct().cmd(&[b"STRLEN", k.as_bytes()]);
            let held: usize = String::from_utf8_lossy(&held[1..]).trim().parse().unwrap();
            if n > THRESHOLD {
                assert!(held < 300, "Redis should hold a stub, holds {held} bytes");
            } else {
                assert_eq!(held, n, "values up to the threshold stay in Redis");
            }
        }
    }
}

#[test]
fn every_set_form_and_mget_mixing_kinds() {
    let own = new_setup();
    let mut c = Resp::connect(&own.proxy.addr());
    let objects = || objects(own.dir.path());
    let t = tag("forms");
    let big = |s: u64| random(THRESHOLD * 3, s);
    let key = |n: &str| format!("{t}{n}");
    let get = |c: &mut Resp, k: &str| c.cmd(&["GET", k]);
    for (n, args) in [
        ("ex", vec!["EX", "100"]),
        ("px", vec!["PX", "100000"]),
        ("exat", vec!["EXAT", "9999999999"]),
        ("pxat", vec!["PXAT", "9999999999000"]),
    ] {
        let k = key(n);
        let v = big(1);
        let mut cmd: Vec<&[u8]> = vec![b"SET", k.as_bytes(), &v];
        cmd.extend(args.iter().map(|a| a.as_bytes()));
        assert_eq!(c.cmd_bytes(&cmd), b"+OK\r\n", "{n}");
        assert_eq!(get(&mut c, &k), bulk(&v));
        let ttl = String::from_utf8_lossy(&c.cmd(&["TTL", &k])).into_owned();
        assert!(ttl.starts_with(':') && !ttl.starts_with(":-"), "{n}: {ttl}");
    }
    // KEEPTTL keeps the TTL; XX on an existing key writes; NX does not.
    let k = key("ex");
    let v2 = big(2);
    assert_eq!(
        c.cmd_bytes(&[b"SET", k.as_bytes(), &v2, b"KEEPTTL", b"XX"]),
        b"+OK\r\n"
    );
    assert!(!c.cmd(&["TTL", &k]).starts_with(b":-"));
    assert_eq!(get(&mut c, &k), bulk(&v2));
    let before = objects();
    assert_eq!(
        c.cmd_bytes(&[b"SET", k.as_bytes(), &big(3), b"NX"]),
        b"$-1\r\n"
    );
    assert_eq!(
        objects(),
        before,
        "a refused NX write must not leave its object"
    );
    assert_eq!(
        c.cmd_bytes(&[b"SET", key("absent").as_bytes(), &big(3), b"XX"]),
        b"$-1\r\n"
    );
    assert_eq!(
        objects(),
        before,
        "a refused XX write must not leave its object"
    );
    // GET returns the old (spilled) value.
    let v4 = big(4);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v4, b"GET"]), bulk(&v2));
    assert_eq!(c.cmd_bytes(&[b"GETSET", k.as_bytes(), b"small"]), bulk(&v4));
    assert_eq!(get(&mut c, &k), b"$5\r\nsmall\r\n");
    // SETEX, PSETEX, SETNX.
    let v5 = big(5);
    assert_eq!(
        c.cmd_bytes(&[b"SETEX", key("sx").as_bytes(), b"100", &v5]),
        b"+OK\r\n"
    );
    assert_eq!(
        c.cmd_bytes(&[b"PSETEX", key("psx").as_bytes(), b"100000", &v5]),
        b"+OK\r\n"
    );
    assert_eq!(
        c.cmd_bytes(&[b"SETNX", key("snx").as_bytes(), &v5]),
        b":1\r\n"
    );
    let before = objects();
    assert_eq!(
        c.cmd_bytes(&[b"SETNX", key("snx").as_bytes(), &big(6)]),
        b":0\r\n"
    );
    assert_eq!(objects(), before);
    for n in ["sx", "psx", "snx"] {
        assert_eq!(get(&mut c, &key(n)), bulk(&v5), "{n}");
    }
    // MSET / MSETNX / MGET with spilled, inline and missing keys.
    let (a, b) = (big(7), big(8));
    assert_eq!(
        c.cmd_bytes(&[
            b"MSET",
            key("m1").as_bytes(),
            &a,
            key("m2").as_bytes(),
            b"inline",
            key("m3").as_bytes(),
            &b
        ]),
        b"+OK\r\n"
    );
    let mut want = b"*4\r\n".to_vec();
    want.extend(bulk(&a));
    want.extend(b"$6\r\ninline\r\n");
    want.extend(b"$-1\r\n");
    want.extend(bulk(&b));
    assert_eq!(
        c.cmd(&["MGET", &key("m1"), &key("m2"), &key("missing"), &key("m3")]),
        want
    );
    let before = objects();
    assert_eq!(
        c.cmd_bytes(&[
            b"MSETNX",
            key("m1").as_bytes(),
            &big(9),
            key("m9").as_bytes(),
            b"x"
        ]),
        b":0\r\n"
    );
    assert_eq!(objects(), before);
    // GETDEL and GETEX resolve too.
    assert_eq!(c.cmd(&["GETEX", &key("m1"), "PERSIST"]), bulk(&a));
    assert_eq!(c.cmd(&["GETDEL", &key("m1")]), bulk(&a));
    assert_eq!(get(&mut c, &key("m1")), b"$-1\r\n");
    // GETRANGE / SUBSTR on the resolved value.
    assert_eq!(c.cmd(&["GETRANGE", &key("m3"), "0", "9"]), bulk(&b[..10]));
    assert_eq!(
        c.cmd(&["GETRANGE", &key("m3"), "-5", "-1"]),
        bulk(&b[b.len() - 5..])
    );
    assert_eq!(
        c.cmd(&["SUBSTR", &key("m3"), "100", "199"]),
        bulk(&b[100..200])
    );
    assert_eq!(c.cmd(&["GETRANGE", &key("m2"), "0", "1"]), b"$2\r\nin\r\n");
    // RESP3 clients see the same values.
    c.cmd(&["HELLO", "3"]);
    assert_eq!(get(&mut c, &key("m3")), bulk(&b));
}

#[test]
fn strlen_reads_the_stub_not_the_store() {
    let mut c = conn();
    let k = format!("{}len", tag("strlen"));
    let v = random(THRESHOLD * 10, 42);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v]), b"+OK\r\n");
    let reads = info_field(&mut c, "spill_reads");
    for _ in 0..5 {
        assert_eq!(
            c.cmd(&["STRLEN", &k]),
            format!(":{}\r\n", v.len()).into_bytes()
        );
    }
    // Other tests may read concurrently; five STRLENs must not be five store reads.
    assert!(info_field(&mut c, "spill_reads") - reads < 5);
}

#[test]
fn copies_renames_and_dumps_carry_the_stub() {
    let mut c = conn();
    let t = tag("copy");
    let (src, cp, rn, rs) = (
        format!("{t}src"),
        format!("{t}copy"),
        format!("{t}renamed"),
        format!("{t}restored"),
    );
    let v = random(THRESHOLD * 4, 7);
    assert_eq!(c.cmd_bytes(&[b"SET", src.as_bytes(), &v]), b"+OK\r\n");
    // A direct client copies the stub, then the original is deleted: the copy still reads.
    assert_eq!(
        direct().cmd(&[b"COPY", src.as_bytes(), cp.as_bytes()]),
        b":1\r\n"
    );
    assert_eq!(c.cmd(&["DEL", &src]), b":1\r\n");
    assert_eq!(c.cmd(&["GET", &cp]), bulk(&v));
    assert_eq!(c.cmd(&["RENAME", &cp, &rn]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &rn]), bulk(&v));
    let dump = c.cmd(&["DUMP", &rn]);
    let payload = &dump[dump.iter().position(|&b| b == b'\n').unwrap() + 1..dump.len() - 2];
    assert_eq!(
        c.cmd_bytes(&[b"RESTORE", rs.as_bytes(), b"0", payload]),
        b"+OK\r\n"
    );
    assert_eq!(c.cmd(&["GET", &rs]), bulk(&v));
}

#[test]
fn forged_stubs_are_errors_and_stub_looking_values_read_back() {
    let mut c = conn();
    let t = tag("forge");
    let (forged, looks, trunc) = (
        format!("{t}forged"),
        format!("{t}looks"),
        format!("{t}trunc"),
    );
    let mut fake = b"\xF5TPX\x01\x01\x00\x00".to_vec();
    fake.extend(std::iter::repeat_n(7u8, 120));
    assert_eq!(
        direct().cmd(&[b"SET", forged.as_bytes(), &fake]),
        b"+OK\r\n"
    );
    let r = String::from_utf8_lossy(&c.cmd(&["GET", &forged])).into_owned();
    assert!(r.starts_with("-ERR tierproxy: invalid spill stub"), "{r}");
    assert_eq!(
        c.cmd(&["PING"]),
        b"+PONG\r\n",
        "the connection stays usable"
    );
    // A real stub, truncated by a direct client.
    let v = random(THRESHOLD * 2, 9);
    c.cmd_bytes(&[b"SET", trunc.as_bytes(), &v]);
    let held = direct().cmd(&[b"GET", trunc.as_bytes()]);
    let stub = &held[held.iter().position(|&b| b == b'\n').unwrap() + 1..held.len() - 2];
    direct().cmd(&[b"SET", trunc.as_bytes(), &stub[..stub.len() - 1]]);
    assert!(c
        .cmd(&["GET", &trunc])
        .starts_with(b"-ERR tierproxy: invalid spill stub"));
    // A user value that merely starts with the magic comes back byte for byte.
    let odd = b"\xF5TPX\x01\x01 not really a stub".to_vec();
    assert_eq!(c.cmd_bytes(&[b"SET", looks.as_bytes(), &odd]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &looks]), bulk(&odd));
    assert_eq!(
        c.cmd(&["STRLEN", &looks]),
        format!(":{}\r\n", odd.len()).into_bytes()
    );
}

/// An object changed in the store behind the proxy's back (bytes flipped, cut short,
/// grown) is refused with an error, never served; stored compressed or raw alike.
#[test]
fn objects_changed_in_the_store_are_refused_never_served() {
    let own = spill_proxy("\n[l1]\nenabled = false");
    let mut c = Resp::connect(&own.proxy.addr());
    let t = tag("tamper");
    let compressible = vec![b'a'; THRESHOLD * 64];
    let incompressible = random(THRESHOLD * 64, 21);
    type Change = fn(&mut Vec<u8>);
    let changes: [(&str, Change); 5] = [
        ("flipped", |b| {
            let mid = b.len() / 2;
            b[mid] ^= 1;
        }),
        ("short", |b| b.truncate(b.len() - 1)),
        ("long", |b| b.push(0)),
        ("empty", |b| b.clear()),
        // Its length intact, its bytes not zstd (nor the value) at all.
        ("garbled", |b| b.iter_mut().for_each(|x| *x = 0x55)),
    ];
    for (kind, v) in [("zstd", &compressible), ("raw", &incompressible)] {
        for (how, change) in changes {
            let k = format!("{t}{kind}:{how}");
            let before = object_files(own.dir.path());
            assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v[..]]), b"+OK\r\n");
            let file = object_files(own.dir.path())
                .into_iter()
                .find(|f| !before.contains(f))
                .expect("the SET stored an object");
            assert_eq!(c.cmd(&["GET", &k]), bulk(v), "{kind} {how}: before");
            let mut stored = std::fs::read(&file).unwrap();
            change(&mut stored);
            std::fs::write(&file, &stored).unwrap();
            let r = String::from_utf8_lossy(&c.cmd(&["GET", &k])).into_owned();
            assert!(
                r.starts_with("-ERR tierproxy: spilled value corrupt"),
                "{kind} {how}: {}",
                &r[..r.len().min(80)]
            );
            assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n", "{kind} {how}: usable");
        }
    }
    assert!(info_field(&mut c, "spill_errors") >= 10);
}

#[test]
fn append_and_setrange_on_spilled_values_lose_no_concurrent_write() {
    let mut c = conn();
    let k = format!("{}rmw", tag("rmw"));
    let v = random(THRESHOLD * 2, 3);
    c.cmd_bytes(&[b"SET", k.as_bytes(), &v]);
    let mut want = v.clone();
    want.extend_from_slice(b"xyz");
    assert_eq!(
        c.cmd(&["APPEND", &k, "xyz"]),
        format!(":{}\r\n", want.len()).into_bytes()
    );
    assert_eq!(c.cmd(&["GET", &k]), bulk(&want));
    want[10..13].copy_from_slice(b"ABC");
    assert_eq!(
        c.cmd(&["SETRANGE", &k, "10", "ABC"]),
        format!(":{}\r\n", want.len()).into_bytes()
    );
    assert_eq!(c.cmd(&["GET", &k]), bulk(&want));
    // Past the end: zero-padded, as Redis does.
    let end = want.len() + 5;
    want.resize(end, 0);
    want.extend_from_slice(b"!");
    assert_eq!(
        c.cmd(&["SETRANGE", &k, &end.to_string(), "!"]),
        format!(":{}\r\n", want.len()).into_bytes()
    );
    assert_eq!(c.cmd(&["GET", &k]), bulk(&want));
    assert_eq!(
        c.cmd(&["INCR", &k]),
        b"-ERR value is not an integer or out of range\r\n"
    );
    assert!(
        direct().cmd(&[b"STRLEN", k.as_bytes()]).len() < 8,
        "still a stub in Redis"
    );

    // Four clients append concurrently: every append lands (optimistic retries).
    let base = want.len();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let k = k.clone();
            std::thread::spawn(move || {
                let mut c = conn();
                for _ in 0..10 {
                    let r = c.cmd(&["APPEND", &k, &i.to_string()]);
                    assert!(r.starts_with(b":"), "{}", String::from_utf8_lossy(&r));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        c.cmd(&["STRLEN", &k]),
        format!(":{}\r\n", base + 40).into_bytes()
    );
    let all = c.cmd(&["GET", &k]);
    for i in 0..4u8 {
        let n = all[all.len() - 42..]
            .iter()
            .filter(|&&b| b == b'0' + i)
            .count();
        assert_eq!(n, 10, "appends of client {i}");
    }
    // Ordinary values: Redis's own behaviour and errors.
    let s = format!("{}plain", tag("rmw"));
    assert_eq!(c.cmd(&["APPEND", &s, "ab"]), b":2\r\n");
    assert_eq!(c.cmd(&["SETRANGE", &s, "1", "X"]), b":2\r\n");
    assert_eq!(c.cmd(&["GET", &s]), b"$2\r\naX\r\n");
    assert_eq!(
        c.cmd(&["SETRANGE", &s, "-1", "X"]),
        b"-ERR offset is out of range\r\n"
    );
    let l = format!("{}list", tag("rmw"));
    c.cmd(&["RPUSH", &l, "x"]);
    assert_eq!(
        c.cmd(&["APPEND", &l, "x"]),
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    );
}

#[test]
fn a_failing_store_fails_the_write_and_leaves_redis_untouched() {
    // A proxy whose store directory is a file: every put fails.
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let mut cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        cfg,
        "[l3]\nenabled = true\nthreshold_bytes = {THRESHOLD}\nsigning_key = \"k\"\ndir = \"{}/sub\"\n",
        setup().dir.path().display()
    )
    .unwrap();
    let px = Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    std::fs::remove_dir_all(setup().dir.path().join("sub")).unwrap();
    std::fs::copy(blocker.path(), setup().dir.path().join("sub")).unwrap();
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}fail", tag("storefail"));
    assert_eq!(c.cmd(&["SET", &k, "old"]), b"+OK\r\n");
    let r =
        String::from_utf8_lossy(&c.cmd_bytes(&[b"SET", k.as_bytes(), &random(THRESHOLD * 2, 1)]))
            .into_owned();
    assert!(r.starts_with("-ERR tierproxy: spill store"), "{r}");
    assert_eq!(
        c.cmd(&["GET", &k]),
        b"$3\r\nold\r\n",
        "Redis must be untouched"
    );
    std::fs::remove_file(setup().dir.path().join("sub")).unwrap();
}

#[test]
fn concurrent_reads_of_one_value_share_a_store_read() {
    let k = format!("{}hot", tag("shared"));
    let v = random(4 << 20, 5);
    conn().cmd_bytes(&[b"SET", k.as_bytes(), &v]);
    let want = bulk(&v);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let k = k.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                let mut c = conn();
                for _ in 0..5 {
                    assert!(c.cmd(&["GET", &k]) == want);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A proxy with L1 (admitting on the first read) and the spill store in a directory of
/// its own (removed when the returned guard is dropped, after the proxy); `top` is
/// prepended to its config.
fn l1_spill_proxy(top: &str) -> (tempfile::TempDir, Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        cfg,
        "{top}[l1]\nenabled = true\nadmit_after_reads = 1\n[l3]\nenabled = true\nthreshold_bytes = {THRESHOLD}\ndir = \"{}\"\n",
        dir.path().display()
    )
    .unwrap();
    let px = Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    (dir, px)
}

#[test]
fn with_l1_a_hot_spilled_value_is_cached_resolved_and_invalidated_on_write() {
    let (_dir, px) = l1_spill_proxy("");
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}both", tag("l1l3"));
    let v1 = random(THRESHOLD * 8, 11);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v1]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &k]), bulk(&v1));
    let cached = c.cmd(&["TIERPROXY.L1", "GET", &k]);
    assert!(
        cached.windows(v1.len()).any(|w| w == &v1[..]),
        "L1 should hold the resolved value, not the stub"
    );
    let reads = info_field(&mut c, "spill_reads");
    for _ in 0..5 {
        assert_eq!(c.cmd(&["GET", &k]), bulk(&v1));
    }
    assert_eq!(
        info_field(&mut c, "spill_reads"),
        reads,
        "hits must not read the store"
    );
    let v2 = random(THRESHOLD * 8, 12);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v2]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &k]), bulk(&v2));
    assert_eq!(
        c.cmd(&["MGET", &k, &k]),
        [b"*2\r\n".to_vec(), bulk(&v2), bulk(&v2)].concat()
    );
}

/// A read between WATCH and EXEC bypasses L1 and goes to Redis; its stub must still be
/// resolved. Namespaced users take the ordinary request path (not the fast lane), where
/// this once returned the stub itself.
#[test]
fn with_l1_a_watching_read_of_a_spilled_value_is_resolved() {
    let (_dir, px) = l1_spill_proxy("namespace = \"ns:\"\n");
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}watched", tag("l1l3w"));
    let v = random(THRESHOLD * 4, 13);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &k]), bulk(&v));
    assert_eq!(c.cmd(&["WATCH", &k]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &k]), bulk(&v), "read while watching");
    assert_eq!(
        c.cmd(&["STRLEN", &k]),
        format!(":{}\r\n", v.len()).into_bytes()
    );
    assert_eq!(c.cmd(&["UNWATCH"]), b"+OK\r\n");
}

#[test]
fn the_sweeper_deletes_only_unreferenced_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        cfg,
        "[l3]\nenabled = true\nthreshold_bytes = {THRESHOLD}\ndir = \"{}\"\nsweep_interval_secs = 0\nsweep_grace_secs = 0\nsweep_keys_per_sec = 1000000\n",
        dir.path().display()
    )
    .unwrap();
    let cfg_path = cfg.path().to_str().unwrap().to_string();
    let px = Proxy::start(&shared_cluster().seeds(), &["--config", &cfg_path], &[]);
    let mut c = Resp::connect(&px.addr());
    let t = tag("sweep");
    let (live, copy, over, exp) = (
        format!("{t}live"),
        format!("{t}copy"),
        format!("{t}over"),
        format!("{t}exp"),
    );
    let (v_live, v_old, v_new, v_exp) = (
        random(THRESHOLD * 2, 21),
        random(THRESHOLD * 2, 22),
        random(THRESHOLD * 2, 23),
        random(THRESHOLD * 2, 24),
    );
    c.cmd_bytes(&[b"SET", live.as_bytes(), &v_live]);
    // A direct client duplicates the stub, then the original goes: the object stays referenced.
    assert_eq!(
        direct().cmd(&[b"COPY", live.as_bytes(), copy.as_bytes()]),
        b":1\r\n"
    );
    c.cmd(&["DEL", &live]);
    c.cmd_bytes(&[b"SET", over.as_bytes(), &v_old]);
    c.cmd_bytes(&[b"SET", over.as_bytes(), &v_new]); // v_old's object is now garbage
    c.cmd_bytes(&[b"SET", exp.as_bytes(), &v_exp, b"PX", b"100"]); // garbage once expired
    assert_eq!(objects(dir.path()), 4);
    std::thread::sleep(std::time::Duration::from_millis(300));

    let sweep = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tierproxy"))
            .args([
                "--config",
                &cfg_path,
                "--upstream",
                &shared_cluster().seeds().join(","),
            ])
            .arg("sweep")
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dry = sweep(&["--dry-run"]);
    assert!(dry.contains("deleted=2 (dry run)"), "{dry}");
    assert_eq!(objects(dir.path()), 4, "a dry run deletes nothing");
    let real = sweep(&[]);
    assert!(real.contains("deleted=2"), "{real}");
    assert_eq!(objects(dir.path()), 2);
    assert_eq!(c.cmd(&["GET", &copy]), bulk(&v_live));
    assert_eq!(c.cmd(&["GET", &over]), bulk(&v_new));
    assert_eq!(c.cmd(&["GET", &exp]), b"$-1\r\n");
    // Nothing left to collect.
    assert!(sweep(&[]).contains("deleted=0"));
}

#[test]
fn prometheus_counts_the_spill() {
    let mut c = conn();
    let big = format!("{}big", tag("prom"));
    c.cmd_bytes(&[b"SET", big.as_bytes(), &random(THRESHOLD * 2, 77)]);
    c.cmd(&["GET", &big]);
    let (status, body) = setup().proxy.admin_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "tierproxy_spill_writes_total",
        "tierproxy_spill_bytes_total{direction=\"stored\"}",
        "tierproxy_cache_hits_total{level=\"l3\"}",
        "tierproxy_spill_store_duration_seconds_bucket{op=\"put\",le=\"0.001\"}",
    ] {
        assert!(body.contains(name), "{name} missing from\n{body}");
    }
}

#[test]
fn lcs_on_spilled_values_is_the_lcs_redis_computes() {
    let mut c = conn();
    let t = tag("lcs_spilled");
    let alphabet = |n: usize, seed: u64| -> Vec<u8> {
        random(n, seed)
            .iter()
            .map(|b| b"acgt"[(b % 4) as usize])
            .collect()
    };
    let (big, small) = (alphabet(THRESHOLD + 100, 5), alphabet(300, 6));
    let (pb, ps) = (format!("{t}pb"), format!("{t}ps"));
    let (db, ds) = (format!("{t}db"), format!("{t}ds"));
    c.cmd_bytes(&[b"SET", pb.as_bytes(), &big]);
    c.cmd_bytes(&[b"SET", ps.as_bytes(), &small]);
    // The same values written directly to Redis, where LCS runs natively.
    direct().cmd(&[b"SET", db.as_bytes(), &big]);
    direct().cmd(&[b"SET", ds.as_bytes(), &small]);
    assert!(
        direct().cmd(&[b"GET", pb.as_bytes()]).len() < 400,
        "not spilled"
    );
    for opts in [
        vec![],
        vec!["LEN"],
        vec!["IDX"],
        vec!["IDX", "MINMATCHLEN", "3", "WITHMATCHLEN"],
    ] {
        let mut through: Vec<&str> = vec!["LCS", &pb, &ps];
        through.extend(&opts);
        let mut native: Vec<&[u8]> = vec![b"LCS", db.as_bytes(), ds.as_bytes()];
        native.extend(opts.iter().map(|o| o.as_bytes()));
        assert_eq!(
            String::from_utf8_lossy(&c.cmd(&through)),
            String::from_utf8_lossy(&direct().cmd(&native)),
            "LCS {opts:?}"
        );
    }
    assert_eq!(
        c.cmd(&["LCS", &pb, &ps, "IDX", "LEN"]),
        b"-ERR If you want both the length and indexes, please just use IDX.\r\n"
    );
}

#[test]
fn getrange_of_a_raw_object_is_a_ranged_read() {
    let mut c = conn();
    let k = format!("{}raw", tag("ranged"));
    let v = random(THRESHOLD * 8, 11); // incompressible: stored raw
    c.cmd_bytes(&[b"SET", k.as_bytes(), &v]);
    let before = info_field(&mut c, "spill_ranged_reads");
    assert_eq!(c.cmd(&["GETRANGE", &k, "100", "199"]), bulk(&v[100..200]));
    assert_eq!(
        c.cmd(&["GETRANGE", &k, "-10", "-1"]),
        bulk(&v[v.len() - 10..])
    );
    assert_eq!(c.cmd(&["SUBSTR", &k, "0", "0"]), bulk(&v[..1]));
    assert_eq!(c.cmd(&["GETRANGE", &k, "5", "1"]), b"$0\r\n\r\n");
    assert_eq!(
        c.cmd(&["GETRANGE", &k, "0", "-1"]),
        bulk(&v),
        "a range over the whole value"
    );
    assert!(info_field(&mut c, "spill_ranged_reads") >= before + 4);
    // A compressed object is resolved whole, then cut.
    let z = format!("{}zstd", tag("ranged"));
    let compressible = vec![b'q'; THRESHOLD * 8];
    c.cmd_bytes(&[b"SET", z.as_bytes(), &compressible]);
    assert_eq!(c.cmd(&["GETRANGE", &z, "7", "9"]), b"$3\r\nqqq\r\n");
}

#[test]
fn append_racing_set_loses_nothing_and_corrupts_nothing() {
    let k = format!("{}race", tag("append_set"));
    let filler = random(THRESHOLD * 2, 21);
    let value = move |i: usize| -> Vec<u8> {
        let mut v = format!("S{i}:").into_bytes();
        v.extend_from_slice(&filler);
        v
    };
    conn().cmd_bytes(&[b"SET", k.as_bytes(), &value(0)]);
    let setter = {
        let k = k.clone();
        let value = value.clone();
        std::thread::spawn(move || {
            let mut c = conn();
            for i in 1..=20 {
                assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &value(i)]), b"+OK\r\n");
            }
        })
    };
    let appender = {
        let k = k.clone();
        std::thread::spawn(move || {
            let mut c = conn();
            for _ in 0..40 {
                let r = c.cmd(&["APPEND", &k, "|a"]);
                assert!(r.starts_with(b":"), "{}", String::from_utf8_lossy(&r));
            }
        })
    };
    let mut reader = conn();
    for _ in 0..20 {
        let r = reader.cmd(&["GET", &k]);
        assert!(
            r.starts_with(b"$"),
            "a read during the race failed: {}",
            String::from_utf8_lossy(&r)
        );
    }
    setter.join().unwrap();
    appender.join().unwrap();
    // Whatever the interleaving: one SET's value, then only whole appends.
    let got = conn().cmd(&["GET", &k]);
    let body = &got[got.iter().position(|&b| b == b'\n').unwrap() + 1..got.len() - 2];
    let i: usize = std::str::from_utf8(&body[1..body.iter().position(|&b| b == b':').unwrap()])
        .unwrap()
        .parse()
        .unwrap();
    let base = value(i);
    assert_eq!(&body[..base.len()], &base[..], "the SET's value is intact");
    let tail = &body[base.len()..];
    assert!(
        tail.len().is_multiple_of(2) && tail.chunks(2).all(|c| c == b"|a"),
        "appends are whole"
    );
    assert!(tail.len() / 2 <= 40);
}

#[test]
fn in_redis_compression_is_transparent() {
    let Setup { proxy: px, dir } = spill_proxy("compression_min_bytes = 1024\n");
    let mut c = Resp::connect(&px.addr());
    let t = tag("l2z");
    let (z, r, s) = (format!("{t}z"), format!("{t}r"), format!("{t}s"));
    let text: Vec<u8> = b"hello compressible world ".repeat(120); // 3000 bytes
    let noise = random(3000, 31);
    assert_eq!(c.cmd_bytes(&[b"SET", z.as_bytes(), &text]), b"+OK\r\n");
    assert_eq!(c.cmd_bytes(&[b"SET", r.as_bytes(), &noise]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", &s, "short"]), b"+OK\r\n");
    // Redis holds a small envelope for the compressible value, the others as they are.
    let held = direct().cmd(&[b"STRLEN", z.as_bytes()]);
    let held: usize = String::from_utf8_lossy(&held[1..]).trim().parse().unwrap();
    assert!(held < 600, "compressed value takes {held} bytes in Redis");
    assert_eq!(direct().cmd(&[b"GET", r.as_bytes()]), bulk(&noise));
    assert_eq!(direct().cmd(&[b"GET", s.as_bytes()]), b"$5\r\nshort\r\n");
    // Through the proxy, every read and write sees the original value.
    assert_eq!(c.cmd(&["GET", &z]), bulk(&text));
    assert_eq!(c.cmd(&["STRLEN", &z]), b":3000\r\n");
    assert_eq!(c.cmd(&["GETRANGE", &z, "6", "10"]), b"$5\r\ncompr\r\n");
    assert_eq!(c.cmd(&["APPEND", &z, "!"]), b":3001\r\n");
    let mut want = text.clone();
    want.push(b'!');
    assert_eq!(c.cmd(&["GET", &z]), bulk(&want));
    assert_eq!(
        c.cmd(&["MGET", &z, &r, &s]),
        [
            b"*3\r\n".to_vec(),
            bulk(&want),
            bulk(&noise),
            b"$5\r\nshort\r\n".to_vec()
        ]
        .concat()
    );
    assert!(info_field(&mut c, "l2_compressed_writes") >= 2);
    let (_, metrics) = px.admin_get("/metrics");
    assert!(
        metrics.contains("tierproxy_l2_compressed_writes_total"),
        "{metrics}"
    );
    // Nothing went to the store: compression happens in Redis.
    assert_eq!(objects(dir.path()), 0);
}
