//! The seed cache package's features, against the real cluster: YAML configuration (and
//! its `cache:` block), key namespaces, L1 refresh-ahead and L1 warming.

mod support;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{eventually, l1_stat as stat, message, shared_cluster, tag, Proxy, Resp};

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

fn config(suffix: &str, body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(suffix).tempfile().unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f
}

fn proxy_with(suffix: &str, body: &str) -> Proxy {
    let cfg = config(suffix, body);
    Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    )
}

fn check_config(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tierproxy"))
        .arg("--check-config")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A unique namespace per test run, so KEYS and SCAN see only this test's keys.
fn fresh_namespace(name: &str) -> String {
    let t = tag(name);
    format!("{}:", t.trim_matches(|c| c == '{' || c == '}'))
}

#[test]
fn yaml_files_take_the_same_keys_and_the_seeds_cache_block() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/tierproxy.example.yaml");
    let (ok, err) = check_config(&example);
    assert!(ok, "conf/tierproxy.example.yaml: {err}");

    // Top-level sections, as in TOML.
    let px = proxy_with(".yaml", "l1:\n  enabled: true\n  max_entries: 1234\n");
    let mut c = Resp::connect(&px.addr());
    assert_eq!(stat(&mut c, "l1_max_entries"), 1234);
    // The seed's shape: cache.l1 / cache.l2 / cache.l3.
    let px = proxy_with(
        ".yml",
        "cache:\n  l1:\n    enabled: true\n    max_entries: 4321\n  l2:\n    request_timeout_ms: 2000\n",
    );
    let mut c = Resp::connect(&px.addr());
    assert_eq!(stat(&mut c, "l1_max_entries"), 4321);
    assert_eq!(
        s(c.cmd(&["SET", &format!("{}y", tag("yaml")), "v"])),
        "+OK\r\n"
    );

    // A section given both ways, an unknown key, and bad YAML are errors, not guesses.
    let both = config(
        ".yaml",
        "l1:\n  enabled: true\ncache:\n  l1:\n    enabled: false\n",
    );
    let (ok, err) = check_config(both.path());
    assert!(!ok && err.contains("both cache.l1 and [l1]"), "{err}");
    let unknown = config(".yaml", "l1:\n  enabled: true\n  max_entriez: 5\n");
    let (ok, err) = check_config(unknown.path());
    assert!(!ok && err.contains("max_entriez"), "{err}");
    let broken = config(".yaml", "l1: [\n");
    assert!(!check_config(broken.path()).0);
}

#[test]
fn a_namespace_prefixes_keys_and_strips_them_from_replies() {
    let ns = fresh_namespace("ns");
    let px = proxy_with(".toml", &format!("namespace = \"{ns}\"\n"));
    let truth = Proxy::start(&shared_cluster().seeds(), &[], &[]);
    let mut c = Resp::connect(&px.addr());
    let mut t = Resp::connect(&truth.addr());

    // Plain keys, and what Redis really holds.
    assert_eq!(s(c.cmd(&["SET", "k1", "v1"])), "+OK\r\n");
    assert_eq!(s(t.cmd(&["GET", &format!("{ns}k1")])), "$2\r\nv1\r\n");
    assert_eq!(s(c.cmd(&["GET", "k1"])), "$2\r\nv1\r\n");
    // Multi-key commands across slots, and hash tags keep keys together.
    assert_eq!(s(c.cmd(&["MSET", "a", "1", "b", "2", "c", "3"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["MGET", "a", "b", "c", "nope"])),
        "*4\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n$-1\r\n"
    );
    assert_eq!(s(c.cmd(&["MSET", "{u}x", "1", "{u}y", "2"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["SUNIONSTORE", "{u}s", "{u}x-set"])),
        ":0\r\n",
        "two keys with one hash tag must stay in one slot"
    );
    // RENAME moves both keys inside the namespace; EVAL's KEYS are prefixed.
    assert_eq!(s(c.cmd(&["RENAME", "{u}x", "{u}z"])), "+OK\r\n");
    assert_eq!(s(t.cmd(&["EXISTS", &format!("{ns}{{u}}z")])), ":1\r\n");
    assert_eq!(
        s(c.cmd(&["EVAL", "return redis.call('GET', KEYS[1])", "1", "k1"])),
        "$2\r\nv1\r\n"
    );

    // KEYS and SCAN see this namespace only, without the prefix.
    let mut want = vec!["a", "b", "c", "k1", "{u}y", "{u}z"];
    want.sort();
    let keys = s(c.cmd(&["KEYS", "*"]));
    let mut got: Vec<&str> = keys
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
        .collect();
    got.sort();
    assert_eq!(got, want, "{keys}");
    let mut scanned = Vec::new();
    let mut cursor = "0".to_string();
    loop {
        let r = s(c.cmd(&["SCAN", &cursor, "COUNT", "50"]));
        let lines: Vec<&str> = r.split("\r\n").collect();
        cursor = lines[2].to_string();
        scanned.extend(
            lines[3..]
                .iter()
                .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
                .map(|l| l.to_string()),
        );
        if cursor == "0" {
            break;
        }
    }
    scanned.sort();
    assert_eq!(scanned, want);
    let r = s(c.cmd(&["KEYS", "{u}*"]));
    assert!(
        r.starts_with("*2\r\n") && r.contains("{u}y") && !r.contains(&ns),
        "{r}"
    );

    // Inside a transaction too: EXEC's reply strips what the commands alone would.
    assert_eq!(s(c.cmd(&["MULTI"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["RPUSH", "{u}q", "e"])), "+QUEUED\r\n");
    assert_eq!(s(c.cmd(&["LMPOP", "1", "{u}q", "LEFT"])), "+QUEUED\r\n");
    assert_eq!(
        s(c.cmd(&["EXEC"])),
        "*2\r\n:1\r\n*2\r\n$4\r\n{u}q\r\n*1\r\n$1\r\ne\r\n"
    );

    // Blocking pops name their key without the prefix.
    assert_eq!(s(c.cmd(&["RPUSH", "list", "x"])), ":1\r\n");
    assert_eq!(
        s(c.cmd(&["BLPOP", "list", "1"])),
        "*2\r\n$4\r\nlist\r\n$1\r\nx\r\n"
    );
    // Whole-database commands would cross namespaces.
    for cmd in [&["FLUSHALL"][..], &["DBSIZE"], &["RANDOMKEY"]] {
        let r = s(c.cmd(cmd));
        assert!(
            r.starts_with("-ERR tierproxy:") && r.contains("namespace"),
            "{r}"
        );
    }
    assert_eq!(s(t.cmd(&["EXISTS", &format!("{ns}k1")])), ":1\r\n");
}

/// SORT's BY and GET patterns name keys too (Redis Cluster refuses them, a single
/// server runs them): in the namespace, not the same names outside it.
#[test]
fn sort_patterns_stay_in_the_namespace() {
    let ns = fresh_namespace("sort");
    let cfg = config(".toml", &format!("namespace = \"{ns}\"\n"));
    let upstream = [support::shared_standalone().addr()];
    let px = Proxy::start(&upstream, &["--config", cfg.path().to_str().unwrap()], &[]);
    let truth = Proxy::start(&upstream, &[], &[]);
    let mut c = Resp::connect(&px.addr());
    let mut t = Resp::connect(&truth.addr());
    // Names unique to this run, used inside and outside the namespace.
    let b = fresh_namespace("sortkeys");
    let k = |n: &str| format!("{b}{n}");
    let list = k("l");
    assert_eq!(s(c.cmd(&["RPUSH", &list, "2", "1", "3"])), ":3\r\n");
    let (w1, w2, w3, d1, d2, d3) = (k("w_1"), k("w_2"), k("w_3"), k("d_1"), k("d_2"), k("d_3"));
    assert_eq!(
        s(c.cmd(&["MSET", &w1, "30", &w2, "10", &w3, "20", &d1, "one", &d2, "two", &d3, "three"])),
        "+OK\r\n"
    );
    // The same names outside the namespace, with other weights and values.
    assert_eq!(
        s(t.cmd(&["MSET", &w1, "1", &w2, "2", &w3, "3", &d1, "x"])),
        "+OK\r\n"
    );
    let (by, get) = (k("w_*"), k("d_*"));
    assert_eq!(
        s(c.cmd(&["SORT", &list, "BY", &by, "GET", &get, "GET", "#"])),
        "*6\r\n$3\r\ntwo\r\n$1\r\n2\r\n$5\r\nthree\r\n$1\r\n3\r\n$3\r\none\r\n$1\r\n1\r\n"
    );
    assert_eq!(
        s(c.cmd(&["SORT_RO", &list, "BY", &by, "LIMIT", "0", "1", "GET", &get])),
        "*1\r\n$3\r\ntwo\r\n"
    );
    assert_eq!(s(t.cmd(&["DEL", &w1, &w2, &w3, &d1])), ":4\r\n");

    // KEYS and SCAN inside a transaction (a single server runs them there): EXEC's reply
    // strips the namespace as their own replies would be.
    let pattern = k("l*");
    assert_eq!(s(c.cmd(&["MULTI"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["KEYS", &pattern])), "+QUEUED\r\n");
    assert_eq!(
        s(c.cmd(&["SCAN", "0", "MATCH", &pattern, "COUNT", "100000"])),
        "+QUEUED\r\n"
    );
    let r = s(c.cmd(&["EXEC"]));
    let bulk = format!("${}\r\n{list}\r\n", list.len());
    assert!(
        r.starts_with(&format!("*2\r\n*1\r\n{bulk}*2\r\n$1\r\n0\r\n*1\r\n{bulk}")),
        "{r}"
    );
}

#[test]
fn each_user_can_have_its_own_namespace() {
    let ns = fresh_namespace("shared");
    let tenant = fresh_namespace("tenant");
    // Password "tpw" for both users.
    let px = proxy_with(
        ".toml",
        &format!(
            "namespace = \"{ns}\"\n[auth]\npassword = \"tpw\"\n[[auth.users]]\nname = \"tenant\"\npassword_sha256 = \"c89cf27dc96c00734421d6df4ee6f67931523bc6447b509d5d3ad9932abfa651\"\nnamespace = \"{tenant}\"\n"
        ),
    );
    let truth = Proxy::start(&shared_cluster().seeds(), &[], &[]);
    let mut t = Resp::connect(&truth.addr());
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["AUTH", "tenant", "tpw"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["SET", "k", "tenant's"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["RESET"])), "+RESET\r\n");
    assert_eq!(s(c.cmd(&["AUTH", "tpw"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["GET", "k"])), "$-1\r\n");
    assert_eq!(s(c.cmd(&["SET", "k", "default's"])), "+OK\r\n");
    assert_eq!(
        s(t.cmd(&["GET", &format!("{tenant}k")])),
        "$8\r\ntenant's\r\n"
    );
    assert_eq!(s(t.cmd(&["GET", &format!("{ns}k")])), "$9\r\ndefault's\r\n");
    // Subscriptions are named in the tenant's namespace: switching to a user of another
    // one is refused while they last.
    let mut r3 = Resp::connect(&px.addr());
    assert!(s(r3.cmd(&["HELLO", "3", "AUTH", "tenant", "tpw"])).starts_with('%'));
    assert!(s(r3.cmd(&["SUBSCRIBE", "ch"])).starts_with(">3\r\n$9\r\nsubscribe"));
    let r = s(r3.cmd(&["AUTH", "tpw"]));
    assert!(
        r.starts_with("-ERR tierproxy:") && r.contains("namespace"),
        "{r}"
    );
    assert!(s(r3.cmd(&["UNSUBSCRIBE"])).starts_with(">3\r\n$11\r\nunsubscribe"));
    assert_eq!(s(r3.cmd(&["AUTH", "tpw"])), "+OK\r\n");
    // The next subscription is in the new user's namespace.
    assert!(s(r3.cmd(&["SUBSCRIBE", "ch"])).starts_with(">3\r\n$9\r\nsubscribe"));
    assert_eq!(
        s(t.cmd(&["PUBLISH", &format!("{tenant}ch"), "old"])),
        ":0\r\n"
    );
    assert_eq!(s(t.cmd(&["PUBLISH", &format!("{ns}ch"), "new"])), ":1\r\n");
    assert_eq!(
        s(r3.read_reply()),
        ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nnew\r\n"
    );
    let bad = config(".toml", "namespace = \"a{b}:\"\n");
    assert!(!check_config(bad.path()).0);
}

/// Every pub/sub message that reaches `c` within `quiet` of the last one.
fn messages(c: &mut Resp, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = c.read_reply_within(quiet) {
        out.push(s(m));
    }
    out
}

/// Channel names, patterns and keyspace notifications live in the namespace too: a
/// namespaced subscriber hears its own namespace's channels and keys under the names it
/// used, never another namespace's; PUBLISH and PUBSUB are translated the same way, and a
/// PUBLISH on L1's invalidation channel names the namespaced key.
#[test]
fn a_namespace_covers_channels_and_keyspace_notifications() {
    let ns = fresh_namespace("chan");
    // L1 on: its invalidation channel is the one shared by every namespace.
    let px = proxy_with(
        ".toml",
        &format!("namespace = \"{ns}\"\n[l1]\nenabled = true\n"),
    );
    let truth = Proxy::start(&shared_cluster().seeds(), &[], &[]);
    for m in shared_cluster().master_addrs() {
        let mut d = Resp::connect(&m);
        assert_eq!(
            s(d.cmd(&["CONFIG", "SET", "notify-keyspace-events", "KEA"])),
            "+OK\r\n"
        );
    }
    let mut sub = Resp::connect(&px.addr());
    // Confirmations carry the client's names.
    assert_eq!(
        s(sub.cmd(&["SUBSCRIBE", "news"])),
        message("subscribe", &["news"])
            .replace("$4\r\nnews\r\n", "$4\r\nnews\r\n:1\r\n")
            .replacen("*2", "*3", 1)
    );
    assert!(s(sub.cmd(&["PSUBSCRIBE", "__keyspace@0__:ev*"])).contains("__keyspace@0__:ev*"));
    assert!(s(sub.cmd(&["SUBSCRIBE", "__keyevent@0__:set"])).contains("__keyevent@0__:set"));
    assert!(s(sub.cmd(&["SSUBSCRIBE", "{s}shard"])).contains("{s}shard"));
    assert!(s(sub.cmd(&["SUBSCRIBE", "__keyspace@0__:evk"])).contains("__keyspace@0__:evk"));

    let mut c = Resp::connect(&px.addr());
    let mut t = Resp::connect(&truth.addr());
    // Through the namespaced proxy: heard. Another namespace's `news`: not heard.
    assert_eq!(s(c.cmd(&["PUBLISH", "news", "mine"])), ":1\r\n");
    assert_eq!(s(t.cmd(&["PUBLISH", "news", "not mine"])), ":0\r\n");
    assert_eq!(
        s(t.cmd(&["PUBLISH", &format!("{ns}news"), "from outside"])),
        ":1\r\n"
    );
    assert_eq!(s(c.cmd(&["SPUBLISH", "{s}shard", "sharded"])), ":1\r\n");
    // Keyspace and keyevent notifications of this namespace's keys, not of others'.
    assert_eq!(s(c.cmd(&["SET", "evk", "v"])), "+OK\r\n");
    assert_eq!(s(t.cmd(&["SET", "evk", "v"])), "+OK\r\n");
    let got = messages(&mut sub, Duration::from_millis(500));
    let want = [
        message("message", &["news", "mine"]),
        message("message", &["news", "from outside"]),
        message("smessage", &["{s}shard", "sharded"]),
        message(
            "pmessage",
            &["__keyspace@0__:ev*", "__keyspace@0__:evk", "set"],
        ),
        message("message", &["__keyevent@0__:set", "evk"]),
        message("message", &["__keyspace@0__:evk", "set"]),
    ];
    for w in &want {
        assert_eq!(
            got.iter().filter(|g| *g == w).count(),
            1,
            "expected {w:?} once in {got:?}"
        );
    }
    assert_eq!(got.len(), want.len(), "unexpected messages in {got:?}");
    // Messages within a channel keep their order.
    let pos = |m: &str| got.iter().position(|g| g == m);
    assert!(pos(&want[0]) < pos(&want[1]), "{got:?}");

    // PUBSUB answers in the client's names and sees this namespace only.
    assert_eq!(
        s(c.cmd(&["PUBSUB", "NUMSUB", "news", "other"])),
        "*4\r\n$4\r\nnews\r\n:1\r\n$5\r\nother\r\n:0\r\n"
    );
    let channels = s(c.cmd(&["PUBSUB", "CHANNELS"]));
    assert!(channels.contains("\r\nnews\r\n"), "{channels}");
    assert!(!channels.contains(&ns), "{channels}");
    let channels = s(c.cmd(&["PUBSUB", "CHANNELS", "__keyevent@0__:*"]));
    assert!(channels.contains("__keyevent@0__:set"), "{channels}");
    assert_eq!(
        s(c.cmd(&["PUBSUB", "SHARDNUMSUB", "{s}shard"])),
        "*2\r\n$8\r\n{s}shard\r\n:1\r\n"
    );

    // A keyevent message a namespaced client publishes names the namespace's key.
    let master = shared_cluster().master_addrs()[0].clone();
    let mut direct = Resp::connect(&master);
    assert!(s(direct.cmd(&["SUBSCRIBE", "__keyevent@0__:fake"])).contains("fake"));
    c.cmd(&["PUBLISH", "__keyevent@0__:fake", "k0"]);
    assert_eq!(
        s(direct.read_reply()),
        message("message", &["__keyevent@0__:fake", &format!("{ns}k0")])
    );

    // L1's invalidation channel keeps its name; the key in the message is namespaced,
    // and a namespaced subscriber hears its own namespace's keys only. (Counts: other
    // proxies' L1 listeners may hear the channel too.)
    let mut inv = Resp::connect(&truth.addr());
    assert!(s(inv.cmd(&["SUBSCRIBE", "cache:invalidate"])).contains("cache:invalidate"));
    let mut nsub = Resp::connect(&px.addr());
    assert!(s(nsub.cmd(&["SUBSCRIBE", "cache:invalidate"])).contains("cache:invalidate"));
    let count = |r: Vec<u8>| -> i64 { s(r).trim_start_matches(':').trim().parse().unwrap() };
    assert!(count(t.cmd(&["PUBLISH", "cache:invalidate", "elsewhere:k"])) >= 2);
    assert!(count(c.cmd(&["PUBLISH", "cache:invalidate", "k1"])) >= 2);
    assert_eq!(
        s(inv.read_reply()),
        message("message", &["cache:invalidate", "elsewhere:k"])
    );
    assert_eq!(
        s(inv.read_reply()),
        message("message", &["cache:invalidate", &format!("{ns}k1")])
    );
    assert_eq!(
        s(nsub.read_reply()),
        message("message", &["cache:invalidate", "k1"])
    );

    // UNSUBSCRIBE of everything names the client's channels.
    sub.send(&["UNSUBSCRIBE"]);
    let mut names: Vec<String> = (0..3).map(|_| s(sub.read_reply())).collect();
    names.sort();
    assert!(names[0].contains("\r\n__keyevent@0__:set\r\n"), "{names:?}");
    assert!(names[1].contains("\r\n__keyspace@0__:evk\r\n"), "{names:?}");
    assert!(names[2].contains("\r\nnews\r\n"), "{names:?}");
}

/// A hot key read steadily through its expiry keeps being served from L1: refresh-ahead
/// re-reads it in the last fraction of its lifetime, once per lifetime, not once per
/// reader. Without refresh-ahead the same reads miss at every expiry.
#[test]
fn refresh_ahead_keeps_a_hot_key_cached_through_its_expiry() {
    let run = |ratio: &str| {
        let px = proxy_with(
            ".toml",
            &format!("[l1]\nenabled = true\nadmit_after_reads = 1\ndefault_ttl_ms = 1000\nmax_ttl_ms = 1000\nrefresh_ahead_ratio = {ratio}\nrefresh_ahead_min_reads = 2\n"),
        );
        let k = format!("{}hot", tag("refresh"));
        let mut c = Resp::connect(&px.addr());
        assert_eq!(s(c.cmd(&["SET", &k, "v"])), "+OK\r\n");
        assert!(eventually(Duration::from_secs(5), || {
            s(c.cmd(&["GET", &k])) == "$1\r\nv\r\n" && stat(&mut c, "l1_entries") == 1
        }));
        let misses = stat(&mut c, "l1_misses");
        // Four readers for 3.5 s: three and a half lifetimes.
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (addr, k) = (px.addr(), k.clone());
                std::thread::spawn(move || {
                    let mut r = Resp::connect(&addr);
                    let end = Instant::now() + Duration::from_millis(3500);
                    while Instant::now() < end {
                        assert_eq!(s(r.cmd(&["GET", &k])), "$1\r\nv\r\n");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        (
            stat(&mut c, "l1_misses") - misses,
            stat(&mut c, "l1_refreshes"),
        )
    };
    let (misses, refreshes) = run("0.5");
    assert_eq!(misses, 0, "a refreshed hot key should never miss");
    // One refresh per lifetime (every ~0.5-1 s), not one per reader or per hit.
    assert!((3..=10).contains(&refreshes), "refreshes: {refreshes}");
    let (misses, refreshes) = run("0");
    assert!(
        misses >= 3,
        "without refresh-ahead each expiry misses: {misses}"
    );
    assert_eq!(refreshes, 0);
}

#[test]
fn warming_loads_keys_and_patterns_and_can_hold_readiness() {
    let truth = Proxy::start(&shared_cluster().seeds(), &[], &[]);
    let mut t = Resp::connect(&truth.addr());
    let prefix = tag("warm");
    for i in 0..40 {
        assert_eq!(
            s(t.cmd(&["SET", &format!("{prefix}p{i}"), &format!("v{i}")])),
            "+OK\r\n"
        );
    }
    assert_eq!(s(t.cmd(&["SET", &format!("{prefix}one"), "1"])), "+OK\r\n");
    assert_eq!(
        s(t.cmd(&["HSET", &format!("{prefix}hash"), "f", "v"])),
        ":1\r\n"
    );

    // Start-up: one key and a pattern, 20 keys a second, readiness held until done.
    let cfg = config(
        ".toml",
        &format!(
            "[l1]\nenabled = true\nadmit_after_reads = 2\nwarm_keys = [\"{prefix}one\", \"{prefix}hash\", \"{prefix}missing\"]\nwarm_patterns = [\"{prefix}p*\"]\nwarm_keys_per_sec = 20\nwarm_before_ready = true\n"
        ),
    );
    let started = Instant::now();
    let px = Proxy::start_unready(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let (code, body) = px.admin_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("warming"), "{body}");
    assert!(eventually(Duration::from_secs(20), || px
        .admin_get("/readyz")
        .0
        == 200));
    // 43 keys at 20 a second: not before ~2 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    let mut c = Resp::connect(&px.addr());
    // The string keys are in for both protocols; the hash and the missing key are not.
    assert_eq!(stat(&mut c, "l1_warmed"), 2 * 41);
    let (hits, misses) = (stat(&mut c, "l1_hits"), stat(&mut c, "l1_misses"));
    assert_eq!(s(c.cmd(&["GET", &format!("{prefix}p7")])), "$2\r\nv7\r\n");
    assert_eq!(s(c.cmd(&["GET", &format!("{prefix}one")])), "$1\r\n1\r\n");
    assert!(s(c.cmd(&["HELLO", "3"])).starts_with('%'));
    assert_eq!(s(c.cmd(&["GET", &format!("{prefix}p8")])), "$2\r\nv8\r\n");
    assert_eq!(
        stat(&mut c, "l1_hits") - hits,
        3,
        "warmed keys are hits on first read"
    );
    assert_eq!(stat(&mut c, "l1_misses"), misses);
    // A write through Redis directly still invalidates a warmed key (it is tracked).
    assert_eq!(s(t.cmd(&["SET", &format!("{prefix}one"), "2"])), "+OK\r\n");
    assert!(eventually(Duration::from_secs(2), || s(
        c.cmd(&["GET", &format!("{prefix}one")])
    ) == "$1\r\n2\r\n"));

    // On demand: TIERPROXY.L1 WARM key|pattern…, in the background.
    let other = tag("warm2");
    for i in 0..5 {
        assert_eq!(s(t.cmd(&["SET", &format!("{other}q{i}"), "x"])), "+OK\r\n");
    }
    let mut d = Resp::connect(&px.addr());
    let before = stat(&mut d, "l1_warmed");
    assert_eq!(
        s(d.cmd(&["TIERPROXY.L1", "WARM", &format!("{other}q*")])),
        "+Background warming started\r\n"
    );
    assert!(eventually(Duration::from_secs(10), || stat(
        &mut d,
        "l1_warmed"
    ) - before
        == 10));
    let hits = stat(&mut d, "l1_hits");
    assert_eq!(s(d.cmd(&["GET", &format!("{other}q3")])), "$1\r\nx\r\n");
    assert_eq!(stat(&mut d, "l1_hits") - hits, 1);
    let r = s(d.cmd(&["TIERPROXY.L1", "WARM"]));
    assert!(r.starts_with("-ERR wrong number of arguments"), "{r}");
}
