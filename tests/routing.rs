//! Routing over a real cluster: slot owners, cross-slot split and merge, CROSSSLOT,
//! keyspace fan-out (SCAN, KEYS, DBSIZE, FLUSHALL), MOVED/ASK during a slot migration,
//! and a standalone upstream.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::OnceLock;

use support::{shared_cluster, shared_standalone, tag, Proxy, RedisCluster, Resp};

fn proxy() -> &'static Proxy {
    static P: OnceLock<Proxy> = OnceLock::new();
    P.get_or_init(|| Proxy::start(&shared_cluster().seeds(), &[], &[]))
}

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

/// Keys that share a prefix but no hash tag, so they land on every master.
fn spread_keys(name: &str, n: usize) -> Vec<String> {
    let t = tag(name).replace(['{', '}'], "");
    (0..n).map(|i| format!("{t}:{i}")).collect()
}

fn slot_of(c: &mut Resp, key: &str) -> i64 {
    s(c.cmd(&["CLUSTER", "KEYSLOT", key]))
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn mget_mset_del_exists_touch_over_100_keys_across_slots() {
    let mut c = Resp::connect(&proxy().addr());
    let keys = spread_keys("multi", 100);
    let slots: HashSet<i64> = keys.iter().map(|k| slot_of(&mut c, k)).collect();
    assert!(slots.len() > 50, "keys should spread over many slots");

    let mut mset: Vec<String> = vec!["MSET".into()];
    for (i, k) in keys.iter().enumerate() {
        mset.push(k.clone());
        mset.push(format!("v{i}"));
    }
    let args: Vec<&str> = mset.iter().map(String::as_str).collect();
    assert_eq!(s(c.cmd(&args)), "+OK\r\n");

    // MGET in key order, with a missing key in the middle.
    let missing = format!("{}-missing", keys[0]);
    let mut mget: Vec<&str> = vec!["MGET"];
    mget.extend(keys.iter().take(50).map(String::as_str));
    mget.push(&missing);
    mget.extend(keys.iter().skip(50).map(String::as_str));
    let mut want = String::from("*101\r\n");
    for i in 0..101 {
        if i == 50 {
            want.push_str("$-1\r\n");
        } else {
            let j = if i < 50 { i } else { i - 1 };
            let v = format!("v{j}");
            want.push_str(&format!("${}\r\n{v}\r\n", v.len()));
        }
    }
    assert_eq!(s(c.cmd(&mget)), want);

    // EXISTS counts repeats, as Redis does.
    let mut exists: Vec<&str> = vec!["EXISTS", &keys[0], &keys[0], &missing];
    exists.extend(keys.iter().skip(1).map(String::as_str));
    assert_eq!(s(c.cmd(&exists)), ":101\r\n");
    let mut touch: Vec<&str> = vec!["TOUCH"];
    touch.extend(keys.iter().map(String::as_str));
    assert_eq!(s(c.cmd(&touch)), ":100\r\n");
    let mut unlink: Vec<&str> = vec!["UNLINK"];
    unlink.extend(keys.iter().take(10).map(String::as_str));
    assert_eq!(s(c.cmd(&unlink)), ":10\r\n");
    let mut del: Vec<&str> = vec!["DEL", &missing];
    del.extend(keys.iter().map(String::as_str));
    assert_eq!(s(c.cmd(&del)), ":90\r\n");
    assert_eq!(
        s(c.cmd(&["MSET", &keys[0], "1", &keys[1]])),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
}

#[test]
fn other_multi_key_commands_across_slots_get_crossslot() {
    let mut c = Resp::connect(&proxy().addr());
    let keys = spread_keys("cross", 40);
    let (a, b) = {
        let sa = slot_of(&mut c, &keys[0]);
        let other = keys
            .iter()
            .find(|k| slot_of(&mut Resp::connect(&proxy().addr()), k) != sa)
            .unwrap();
        (keys[0].clone(), other.clone())
    };
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    assert_eq!(s(c.cmd(&["MSETNX", &a, "1", &b, "2"])), crossslot);
    assert_eq!(s(c.cmd(&["SUNION", &a, &b])), crossslot);
    assert_eq!(s(c.cmd(&["RENAME", &a, &b])), crossslot);
    assert_eq!(s(c.cmd(&["EVAL", "return 1", "2", &a, &b])), crossslot);
    // Same slot via a hash tag: allowed, and the reply is Redis's.
    let t = tag("cross-ok");
    let (x, y) = (format!("{t}x"), format!("{t}y"));
    assert_eq!(s(c.cmd(&["MSETNX", &x, "1", &y, "2"])), ":1\r\n");
    assert_eq!(
        s(c.cmd(&["EVAL", "return redis.call('GET', KEYS[1])", "1", &x])),
        "$1\r\n1\r\n"
    );
    assert_eq!(s(c.cmd(&["RENAME", &x, &y])), "+OK\r\n");
}

#[test]
fn scan_returns_every_key_and_keys_dbsize_agree() {
    let mut c = Resp::connect(&proxy().addr());
    let keys = spread_keys("scan", 600);
    for chunk in keys.chunks(100) {
        let mut mset: Vec<&str> = vec!["MSET"];
        for k in chunk {
            mset.push(k);
            mset.push("x");
        }
        assert_eq!(s(c.cmd(&mset)), "+OK\r\n");
    }
    let prefix = keys[0].rsplit_once(':').unwrap().0.to_string();
    let pattern = format!("{prefix}:*");
    let mut seen = HashSet::new();
    let mut cursor = "0".to_string();
    let mut rounds = 0;
    loop {
        let raw = c.cmd(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "100"]);
        let text = s(raw);
        let mut lines = text.split("\r\n");
        assert_eq!(lines.next(), Some("*2"));
        lines.next();
        cursor = lines.next().unwrap().to_string();
        let n: usize = lines
            .next()
            .unwrap()
            .trim_start_matches('*')
            .parse()
            .unwrap();
        for _ in 0..n {
            lines.next();
            seen.insert(lines.next().unwrap().to_string());
        }
        rounds += 1;
        assert!(rounds < 10_000, "scan does not terminate");
        if cursor == "0" {
            break;
        }
    }
    let want: HashSet<String> = keys.iter().cloned().collect();
    assert_eq!(seen, want);
    assert!(rounds > 3, "the cursor should walk more than one master");

    let listed = s(c.cmd(&["KEYS", &pattern]));
    assert!(listed.starts_with("*600\r\n"), "{}", &listed[..20]);
    assert_eq!(s(c.cmd(&["SCAN", "notanumber"])), "-ERR invalid cursor\r\n");
    let typed = s(c.cmd(&["SCAN", "0", "MATCH", &pattern, "TYPE", "hash"]));
    assert!(typed.ends_with("*0\r\n"), "{typed}");
    let rk = s(c.cmd(&["RANDOMKEY"]));
    assert!(rk.starts_with('$'), "{rk}");
}

#[test]
fn flushall_reaches_every_master() {
    let cluster = RedisCluster::start(3, 0);
    let px = Proxy::start(&cluster.seeds(), &[], &[]);
    let mut c = Resp::connect(&px.addr());
    let keys = spread_keys("flush", 60);
    let mut mset: Vec<&str> = vec!["MSET"];
    for k in &keys {
        mset.push(k);
        mset.push("1");
    }
    assert_eq!(s(c.cmd(&mset)), "+OK\r\n");
    assert_eq!(s(c.cmd(&["DBSIZE"])), ":60\r\n");
    for m in cluster.master_addrs() {
        let mut d = Resp::connect(&m);
        assert_ne!(s(d.cmd(&["DBSIZE"])), ":0\r\n", "every master holds keys");
    }
    assert_eq!(s(c.cmd(&["FLUSHALL", "SYNC"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["DBSIZE"])), ":0\r\n");
    assert_eq!(s(c.cmd(&["RANDOMKEY"])), "$-1\r\n");
    assert_eq!(s(c.cmd(&["FLUSHDB", "ASYNC"])), "+OK\r\n");
}

fn node_id(addr: &str) -> String {
    s(Resp::connect(addr).cmd(&["CLUSTER", "MYID"]))
        .split("\r\n")
        .nth(1)
        .unwrap()
        .to_string()
}

fn owner_of(cluster: &RedisCluster, slot: i64) -> String {
    // Ask one node for the slot map (redis-cli prints it one field a line).
    let out = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            cluster.seeds()[0].rsplit_once(':').unwrap().1,
            "cluster",
            "slots",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i + 3 < lines.len() {
        if let (Ok(a), Ok(b)) = (lines[i].parse::<i64>(), lines[i + 1].parse::<i64>()) {
            if a <= slot && slot <= b {
                return format!("{}:{}", lines[i + 2], lines[i + 3]);
            }
        }
        i += 1;
    }
    panic!("no owner for slot {slot} in {text}");
}

/// Sends `cmds` in one write and checks their replies, in order.
fn pipeline(c: &mut Resp, cmds: &[&[&str]], want: &[&str]) {
    c.send_raw(&support::encode_pipeline(cmds));
    let got: Vec<String> = want.iter().map(|_| s(c.read_reply())).collect();
    assert_eq!(got, want);
}

/// A pipeline over keys of every master, forwarded as one group per node, with
/// commands the proxy handles itself in between: every reply in request order.
#[test]
fn a_pipeline_over_every_master_keeps_its_order() {
    let mut c = Resp::connect(&proxy().addr());
    let keys = spread_keys("pipe_order", 30);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(s(c.cmd(&["SET", k, &format!("v{i}")])), "+OK\r\n");
    }
    let mut cmds: Vec<Vec<String>> = Vec::new();
    let mut want: Vec<String> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let v = format!("v{i}");
        cmds.push(vec!["GET".into(), k.clone()]);
        want.push(format!("${}\r\n{v}\r\n", v.len()));
        cmds.push(vec!["STRLEN".into(), k.clone()]);
        want.push(format!(":{}\r\n", v.len()));
        if i % 7 == 3 {
            // PING is answered by the proxy: it ends a run of the fast lane.
            cmds.push(vec!["PING".into()]);
            want.push("+PONG\r\n".into());
            cmds.push(vec!["INCR".into(), format!("{k}:n")]);
            want.push(":1\r\n".into());
            cmds.push(vec!["DEL".into(), format!("{k}:n")]);
            want.push(":1\r\n".into());
        }
    }
    let cmds: Vec<Vec<&str>> = cmds
        .iter()
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();
    let cmds: Vec<&[&str]> = cmds.iter().map(Vec::as_slice).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    for _ in 0..3 {
        pipeline(&mut c, &cmds, &want);
    }
}

#[test]
fn moved_and_ask_are_followed_during_a_slot_migration() {
    let cluster = RedisCluster::start(3, 0);
    let px = Proxy::start(&cluster.seeds(), &[], &[]);
    let mut c = Resp::connect(&px.addr());
    let t = tag("migrate");
    let (k1, k2) = (format!("{t}a"), format!("{t}b"));
    assert_eq!(s(c.cmd(&["SET", &k1, "one"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["SET", &k2, "two"])), "+OK\r\n");
    let slot = slot_of(&mut c, &k1);
    let src = owner_of(&cluster, slot);
    let dst = cluster
        .master_addrs()
        .into_iter()
        .find(|m| *m != src)
        .unwrap();
    let (src_id, dst_id) = (node_id(&src), node_id(&dst));
    let sl = slot.to_string();
    let (dst_host, dst_port) = dst.rsplit_once(':').unwrap();
    let mut srcc = Resp::connect(&src);
    let mut dstc = Resp::connect(&dst);
    assert_eq!(
        s(dstc.cmd(&["CLUSTER", "SETSLOT", &sl, "IMPORTING", &src_id])),
        "+OK\r\n"
    );
    assert_eq!(
        s(srcc.cmd(&["CLUSTER", "SETSLOT", &sl, "MIGRATING", &dst_id])),
        "+OK\r\n"
    );
    // Move only k1: the source now answers ASK for it, and still serves k2.
    assert_eq!(
        s(srcc.cmd(&["MIGRATE", dst_host, dst_port, &k1, "0", "5000"])),
        "+OK\r\n"
    );
    assert_eq!(
        s(c.cmd(&["GET", &k1])),
        "$3\r\none\r\n",
        "ASK must be followed"
    );
    assert_eq!(s(c.cmd(&["GET", &k2])), "$3\r\ntwo\r\n");
    // The same in one pipeline, which the proxy forwards as one group: the ASKs in the
    // middle of it are followed one by one, and the replies keep their order.
    pipeline(
        &mut c,
        &[&["GET", &k1], &["GET", &k2], &["GET", &k1], &["GET", &k2]],
        &[
            "$3\r\none\r\n",
            "$3\r\ntwo\r\n",
            "$3\r\none\r\n",
            "$3\r\ntwo\r\n",
        ],
    );
    // Finish the migration: the slot now belongs to dst, and the proxy learns by MOVED.
    assert_eq!(
        s(srcc.cmd(&["MIGRATE", dst_host, dst_port, &k2, "0", "5000"])),
        "+OK\r\n"
    );
    for n in cluster.master_addrs() {
        assert_eq!(
            s(Resp::connect(&n).cmd(&["CLUSTER", "SETSLOT", &sl, "NODE", &dst_id])),
            "+OK\r\n"
        );
    }
    // A pipeline that meets MOVED: each redirected command is re-sent, in order.
    pipeline(
        &mut c,
        &[
            &["GET", &k2],
            &["EXISTS", &k1],
            &["GET", &k2],
            &["TYPE", &k1],
        ],
        &["$3\r\ntwo\r\n", ":1\r\n", "$3\r\ntwo\r\n", "+string\r\n"],
    );
    assert_eq!(s(c.cmd(&["SET", &k1, "uno"])), "+OK\r\n");
    assert_eq!(s(Resp::connect(&dst).cmd(&["GET", &k1])), "$3\r\nuno\r\n");
}

#[test]
fn standalone_upstream_needs_no_slots() {
    let px = Proxy::start(&[shared_standalone().addr()], &[], &[]);
    let mut c = Resp::connect(&px.addr());
    let keys = spread_keys("standalone", 20);
    // Any keys may be combined on a single server (ElastiCache, cluster mode disabled).
    assert_eq!(s(c.cmd(&["MSET", &keys[0], "a", &keys[1], "b"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["SUNIONSTORE", &keys[2], &keys[3], &keys[4]])),
        ":0\r\n"
    );
    assert_eq!(
        s(c.cmd(&["MGET", &keys[0], &keys[1]])),
        "*2\r\n$1\r\na\r\n$1\r\nb\r\n"
    );
    assert_eq!(s(c.cmd(&["RENAME", &keys[0], &keys[5]])), "+OK\r\n");
    let scan = s(c.cmd(&["SCAN", "0", "MATCH", &keys[5], "COUNT", "1000"]));
    assert!(
        scan.contains(&keys[5]) || scan.starts_with("*2\r\n$"),
        "{scan}"
    );
    let info = s(c.cmd(&["INFO", "server"]));
    assert!(info.contains("upstream_mode:standalone"), "{info}");
    assert_eq!(
        s(c.cmd(&["CLUSTER", "COUNTKEYSINSLOT", "1"])),
        "-ERR This instance has cluster support disabled\r\n"
    );
}

#[test]
fn blocking_commands_do_not_hold_up_other_clients() {
    let mut blocked = Resp::connect(&proxy().addr());
    let t = tag("block");
    let q = format!("{t}q");
    blocked.send_raw(&support::encode_cmd(&[b"BLPOP", q.as_bytes(), b"0"]));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut other = Resp::connect(&proxy().addr());
    let start = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(s(other.cmd(&["PING"])), "+PONG\r\n");
        assert_eq!(s(other.cmd(&["GET", &format!("{t}other")])), "$-1\r\n");
    }
    // Not a speed assertion: only that the others were never stuck behind the BLPOP.
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(s(other.cmd(&["RPUSH", &q, "job"])), ":1\r\n");
    let got = s(blocked.read_reply());
    assert_eq!(got, format!("*2\r\n${}\r\n{q}\r\n$3\r\njob\r\n", q.len()));
}

fn connected_clients(addr: &str) -> i64 {
    let info = s(Resp::connect(addr).cmd(&["INFO", "clients"]));
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_client_leaving_while_blocked_frees_its_upstream_connection() {
    let redis = support::RedisServer::start();
    let px = Proxy::start(&[redis.addr()], &[], &[]);
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", "warm", "1"])), "+OK\r\n");
    let baseline = connected_clients(&redis.addr());
    let mut blocked: Vec<Resp> = (0..20)
        .map(|i| {
            let mut b = Resp::connect(&px.addr());
            b.send_raw(&support::encode_cmd(&[
                b"BLPOP",
                format!("q{i}").as_bytes(),
                b"0",
            ]));
            b
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while connected_clients(&redis.addr()) < baseline + 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "blocked commands never reached redis"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    blocked.clear(); // the clients disconnect
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = connected_clients(&redis.addr());
        if now <= baseline {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now} upstream connections left, baseline {baseline}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(s(c.cmd(&["GET", "warm"])), "$1\r\n1\r\n");
}

#[test]
fn a_blocking_command_is_not_overtaken_by_the_rest_of_its_pipeline() {
    let mut c = Resp::connect(&proxy().addr());
    let q = format!("{}q", tag("order"));
    // On Redis itself the BLPOP runs (and times out) before the RPUSH behind it.
    let mut batch = support::encode_cmd(&[b"BLPOP", q.as_bytes(), b"1"]);
    batch.extend(support::encode_cmd(&[b"RPUSH", q.as_bytes(), b"x"]));
    c.send_raw(&batch);
    assert_eq!(s(c.read_reply()), "*-1\r\n");
    assert_eq!(s(c.read_reply()), ":1\r\n");
}
