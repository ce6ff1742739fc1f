//! Stateful commands through the proxy on a real 3-master cluster: transactions, blocking
//! commands, pub/sub and scripts, with several clients where it matters.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::{eventually, message, shared_cluster, shared_standalone, tag, Proxy, Resp};

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

fn proxy() -> &'static Proxy {
    static P: OnceLock<Proxy> = OnceLock::new();
    P.get_or_init(|| Proxy::start(&shared_cluster().seeds(), &[], &[]))
}

/// Held by every test that WATCHes: `a_lost_watch_connection_fails_the_transaction` kills
/// the node's connection that ran a WATCH, found by `cmd=watch` in CLIENT LIST, which
/// must be its own.
fn watch_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn masters() -> Vec<String> {
    shared_cluster().master_addrs()
}

/// The master that owns `key`: the one that answers for it without a redirect.
fn owner(key: &str) -> String {
    masters()
        .into_iter()
        .find(|m| !s(Resp::connect(m).cmd(&["EXISTS", key])).starts_with("-MOVED"))
        .unwrap_or_else(|| panic!("no owner for {key}"))
}

/// Connections named `name` (`upstream.client_name`) over every master.
fn named_upstream_clients(name: &str) -> usize {
    let field = format!(" name={name} ");
    masters()
        .iter()
        .map(|m| {
            let list = s(Resp::connect(m).cmd(&["CLIENT", "LIST"]));
            list.lines().filter(|l| l.contains(&field)).count()
        })
        .sum()
}

// ------------------------------------------------------------------------------------------
// Transactions
// ------------------------------------------------------------------------------------------

/// The same session against Redis directly and through the proxy: byte-identical replies.
#[test]
fn transaction_replies_are_redis_replies() {
    let _watching = watch_lock();
    let t = tag("tx_replies");
    let k = format!("{t}k");
    let l = format!("{t}l");
    let script: Vec<Vec<String>> = [
        vec!["DEL", &k, &l],
        vec!["EXEC"],
        vec!["DISCARD"],
        vec!["MULTI"],
        vec!["MULTI"],
        vec!["WATCH", &k],
        vec!["SET", &k, "1"],
        vec!["INCR", &k],
        vec!["LPUSH", &k, "x"], // a runtime error inside EXEC's array
        vec!["PING"],
        vec!["GET", &k],
        vec!["EXEC"],
        vec!["MULTI"],
        vec!["SET", &l, "a"],
        vec!["NOSUCHCOMMAND", "x"],
        vec!["GET"],
        vec!["EXEC"],
        vec!["GET", &l],
        vec!["MULTI"],
        vec!["SET", &l, "b"],
        vec!["DISCARD"],
        vec!["GET", &l],
        vec!["MULTI"],
        vec!["EXEC"],
        vec!["WATCH", &k, &l],
        vec!["UNWATCH"],
    ]
    .iter()
    .map(|v| v.iter().map(|a| a.to_string()).collect())
    .collect();
    let run = |addr: &str| -> Vec<String> {
        let mut c = Resp::connect(addr);
        script
            .iter()
            .map(|cmd| {
                let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
                s(c.cmd(&args))
            })
            .collect()
    };
    let direct = run(&shared_standalone().addr());
    let through = run(&proxy().addr());
    for (i, (d, p)) in direct.iter().zip(&through).enumerate() {
        assert_eq!(d, p, "reply {i} to {:?} differs", script[i]);
    }
}

#[test]
fn keys_of_a_transaction_share_one_slot() {
    let _watching = watch_lock();
    let mut c = Resp::connect(&proxy().addr());
    let (a, b) = (tag("tx_slot_a"), tag("tx_slot_b"));
    assert_eq!(s(c.cmd(&["MULTI"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["SET", &format!("{a}1"), "x"])), "+QUEUED\r\n");
    assert_eq!(
        s(c.cmd(&["SET", &format!("{b}1"), "y"])),
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(
        s(c.cmd(&["EXEC"])),
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(s(c.cmd(&["EXISTS", &format!("{a}1")])), ":0\r\n");

    // WATCHed keys count too.
    assert_eq!(s(c.cmd(&["WATCH", &format!("{a}w")])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["MULTI"])), "+OK\r\n");
    assert!(s(c.cmd(&["GET", &format!("{b}w")])).starts_with("-CROSSSLOT"));
    assert!(s(c.cmd(&["EXEC"])).starts_with("-EXECABORT"));
    // One WATCH over two slots is refused outright.
    assert!(s(c.cmd(&["WATCH", &format!("{a}w"), &format!("{b}w")])).starts_with("-CROSSSLOT"));
    // A multi-key command within one slot is fine.
    assert_eq!(s(c.cmd(&["MULTI"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["MSET", &format!("{a}m1"), "1", &format!("{a}m2"), "2"])),
        "+QUEUED\r\n"
    );
    assert_eq!(
        s(c.cmd(&["MGET", &format!("{a}m1"), &format!("{a}m2")])),
        "+QUEUED\r\n"
    );
    assert_eq!(
        s(c.cmd(&["EXEC"])),
        "*2\r\n+OK\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n"
    );
}

#[test]
fn watch_sees_another_clients_write() {
    let _watching = watch_lock();
    let t = tag("tx_watch");
    let k = format!("{t}k");
    let mut c1 = Resp::connect(&proxy().addr());
    let mut c2 = Resp::connect(&proxy().addr());
    c1.cmd(&["SET", &k, "0"]);

    // A write through the proxy by another client.
    assert_eq!(s(c1.cmd(&["WATCH", &k])), "+OK\r\n");
    assert_eq!(s(c2.cmd(&["SET", &k, "theirs"])), "+OK\r\n");
    assert_eq!(s(c1.cmd(&["MULTI"])), "+OK\r\n");
    assert_eq!(s(c1.cmd(&["SET", &k, "mine"])), "+QUEUED\r\n");
    assert_eq!(s(c1.cmd(&["EXEC"])), "*-1\r\n");
    assert_eq!(s(c1.cmd(&["GET", &k])), "$6\r\ntheirs\r\n");

    // A write made directly on the node.
    assert_eq!(s(c1.cmd(&["WATCH", &k])), "+OK\r\n");
    let mut direct = Resp::connect(&owner(&k));
    assert_eq!(s(direct.cmd(&["SET", &k, "direct"])), "+OK\r\n");
    c1.cmd(&["MULTI"]);
    c1.cmd(&["SET", &k, "mine"]);
    assert_eq!(s(c1.cmd(&["EXEC"])), "*-1\r\n");

    // No conflict: the transaction runs.
    assert_eq!(s(c1.cmd(&["WATCH", &k])), "+OK\r\n");
    assert_eq!(s(c1.cmd(&["GET", &k])), "$6\r\ndirect\r\n");
    c1.cmd(&["MULTI"]);
    c1.cmd(&["SET", &k, "mine"]);
    c1.cmd(&["GET", &k]);
    assert_eq!(s(c1.cmd(&["EXEC"])), "*2\r\n+OK\r\n$4\r\nmine\r\n");
}

#[test]
fn a_thousand_transactions_reuse_pooled_connections() {
    let _watching = watch_lock();
    // Its own proxy, with its own connection name: only its connections are counted,
    // whatever other tests open on the same nodes meanwhile.
    let name = format!("tierproxy-txpool-{}", std::process::id());
    let px = Proxy::start_with_config(
        &shared_cluster().seeds(),
        &format!("[upstream]\nclient_name = \"{name}\"\n"),
    );
    let t = tag("tx_pool");
    let k = format!("{t}n");
    let mut c = Resp::connect(&px.addr());
    let tx = |c: &mut Resp, watch: bool| {
        if watch {
            assert_eq!(s(c.cmd(&["WATCH", &k])), "+OK\r\n");
        }
        assert_eq!(s(c.cmd(&["MULTI"])), "+OK\r\n");
        assert_eq!(s(c.cmd(&["INCR", &k])), "+QUEUED\r\n");
        let r = s(c.cmd(&["EXEC"]));
        assert!(r.starts_with("*1\r\n:"), "EXEC gave {r:?}");
    };
    for i in 0..20 {
        tx(&mut c, i % 2 == 0);
    }
    let before = named_upstream_clients(&name);
    assert!(before > 0, "no upstream connection is named {name}");
    for i in 0..1000 {
        tx(&mut c, i % 2 == 0);
    }
    let after = named_upstream_clients(&name);
    assert!(
        after <= before + 1,
        "upstream connections grew from {before} to {after} over 1,000 transactions"
    );
    assert_eq!(s(c.cmd(&["GET", &k])), "$4\r\n1020\r\n");
}

/// A client that leaves with keys WATCHed: the pooled connection it used is UNWATCHed
/// before the next client gets it (one idle connection per node makes reuse certain).
#[test]
fn a_client_leaving_mid_transaction_leaves_no_watch_behind() {
    let _watching = watch_lock();
    let px = Proxy::start_with_config(
        &shared_cluster().seeds(),
        "[upstream]\npinned_idle_per_node = 1\n",
    );
    let t = tag("tx_leave");
    let (k, k2) = (format!("{t}k"), format!("{t}k2"));
    {
        let mut c1 = Resp::connect(&px.addr());
        assert_eq!(s(c1.cmd(&["WATCH", &k])), "+OK\r\n");
        assert_eq!(s(c1.cmd(&["MULTI"])), "+OK\r\n");
        assert_eq!(s(c1.cmd(&["SET", &k, "never"])), "+QUEUED\r\n");
    }
    // Give the proxy a moment to notice and clean up, then change the watched key.
    std::thread::sleep(Duration::from_millis(300));
    let mut other = Resp::connect(&px.addr());
    assert_eq!(s(other.cmd(&["SET", &k, "changed"])), "+OK\r\n");
    for _ in 0..5 {
        let mut c2 = Resp::connect(&px.addr());
        c2.cmd(&["MULTI"]);
        c2.cmd(&["SET", &k2, "ok"]);
        assert_eq!(
            s(c2.cmd(&["EXEC"])),
            "*1\r\n+OK\r\n",
            "a stale WATCH made an unrelated transaction fail"
        );
    }
    assert_eq!(s(other.cmd(&["GET", &k])), "$7\r\nchanged\r\n");
    let (_, metrics) = px.admin_get("/metrics");
    assert!(metrics.contains("tierproxy_transactions_total{outcome=\"committed\"}"));
}

/// The connection holding a WATCH dies: the WATCH cannot be honoured any more, so the
/// transaction must not commit (a later WATCH does not silently replace it).
#[test]
fn a_lost_watch_connection_fails_the_transaction() {
    let _watching = watch_lock();
    let t = tag("tx_lost");
    let (k, other) = (format!("{t}k"), format!("{t}o"));
    let mut c = Resp::connect(&proxy().addr());
    assert_eq!(s(c.cmd(&["WATCH", &k])), "+OK\r\n");
    // Kill the proxy's connection that ran the WATCH, on the node.
    let node = owner(&k);
    let mut d = Resp::connect(&node);
    let list = s(d.cmd(&["CLIENT", "LIST"]));
    let id = list
        .lines()
        .find(|l| l.contains("cmd=watch"))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no WATCHing connection in {list}"))
        .to_string();
    assert_eq!(s(d.cmd(&["CLIENT", "KILL", "ID", &id])), ":1\r\n");
    d.cmd(&["SET", &k, "changed-meanwhile"]);
    let r = s(c.cmd(&["WATCH", &other]));
    assert!(r.contains("WATCH was lost"), "{r}");
    c.cmd(&["MULTI"]);
    c.cmd(&["SET", &k, "mine"]);
    let r = s(c.cmd(&["EXEC"]));
    assert!(r.contains("WATCH was lost"), "{r}");
    assert_eq!(s(c.cmd(&["GET", &k])), "$17\r\nchanged-meanwhile\r\n");
    // After that the session is clean again.
    c.cmd(&["MULTI"]);
    c.cmd(&["SET", &k, "mine"]);
    assert_eq!(s(c.cmd(&["EXEC"])), "*1\r\n+OK\r\n");
    // And the protocol cannot change under a WATCH.
    c.cmd(&["WATCH", &k]);
    assert!(s(c.cmd(&["HELLO", "3"])).starts_with("-ERR tierproxy: HELLO cannot change"));
    c.cmd(&["UNWATCH"]);
    assert!(s(c.cmd(&["HELLO", "3"])).starts_with("%"));
}

#[test]
fn session_commands_are_refused_inside_a_transaction() {
    let mut c = Resp::connect(&proxy().addr());
    c.cmd(&["MULTI"]);
    assert!(s(c.cmd(&["CLIENT", "SETNAME", "x"]))
        .starts_with("-ERR tierproxy: 'client|setname' cannot be queued"));
    assert!(
        s(c.cmd(&["SUBSCRIBE", "ch"])).starts_with("-ERR tierproxy: 'subscribe' cannot be queued")
    );
    assert!(s(c.cmd(&["KEYS", "*"])).starts_with("-ERR tierproxy: 'keys' spans every node"));
    assert!(s(c.cmd(&["EXEC"])).starts_with("-EXECABORT"));
    // RESET ends a transaction.
    c.cmd(&["MULTI"]);
    assert_eq!(s(c.cmd(&["RESET"])), "+RESET\r\n");
    assert_eq!(s(c.cmd(&["EXEC"])), "-ERR EXEC without MULTI\r\n");
}

// ------------------------------------------------------------------------------------------
// Blocking commands
// ------------------------------------------------------------------------------------------

#[test]
fn blpop_wakes_when_another_client_pushes() {
    let t = tag("block_wake");
    let q = format!("{t}q");
    let mut waiter = Resp::connect(&proxy().addr());
    let mut pusher = Resp::connect(&proxy().addr());
    waiter.send(&["BLPOP", &q, "0"]);
    assert!(waiter
        .read_reply_within(Duration::from_millis(300))
        .is_none());
    assert_eq!(s(pusher.cmd(&["RPUSH", &q, "job"])), ":1\r\n");
    let got = s(waiter.read_reply());
    assert_eq!(got, format!("*2\r\n${}\r\n{q}\r\n$3\r\njob\r\n", q.len()));

    // The other blocking forms, each woken the same way.
    let (src, dst) = (format!("{t}src"), format!("{t}dst"));
    waiter.send(&["BLMOVE", &src, &dst, "LEFT", "RIGHT", "0"]);
    pusher.cmd(&["RPUSH", &src, "m"]);
    assert_eq!(s(waiter.read_reply()), "$1\r\nm\r\n");
    waiter.send(&["BZPOPMIN", &format!("{t}z"), "0"]);
    pusher.cmd(&["ZADD", &format!("{t}z"), "1", "a"]);
    assert!(s(waiter.read_reply()).contains("\r\na\r\n"));
    waiter.send(&["XREAD", "BLOCK", "0", "STREAMS", &format!("{t}s"), "$"]);
    assert!(waiter
        .read_reply_within(Duration::from_millis(200))
        .is_none());
    pusher.cmd(&["XADD", &format!("{t}s"), "*", "f", "v"]);
    assert!(s(waiter.read_reply()).contains("\r\nf\r\n$1\r\nv\r\n"));
    // The rest of the family, each woken by a push from the other client.
    for (cmd, push) in [
        (vec!["BRPOP", "L", "0"], vec!["RPUSH", "L", "r"]),
        (vec!["BRPOPLPUSH", "L", "D", "0"], vec!["RPUSH", "L", "r"]),
        (
            vec!["BLMPOP", "0", "1", "L", "LEFT"],
            vec!["RPUSH", "L", "r"],
        ),
        (vec!["BZPOPMAX", "Z", "0"], vec!["ZADD", "Z", "2", "m"]),
        (
            vec!["BZMPOP", "0", "1", "Z", "MIN"],
            vec!["ZADD", "Z", "2", "m"],
        ),
    ] {
        let (l, d, z) = (format!("{t}L"), format!("{t}D"), format!("{t}Z"));
        let sub = |v: &Vec<&str>| -> Vec<String> {
            v.iter()
                .map(|a| match *a {
                    "L" => l.clone(),
                    "D" => d.clone(),
                    "Z" => z.clone(),
                    o => o.to_string(),
                })
                .collect()
        };
        let (cmd, push) = (sub(&cmd), sub(&push));
        waiter.send(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            waiter
                .read_reply_within(Duration::from_millis(100))
                .is_none(),
            "{cmd:?} did not block"
        );
        pusher.cmd(&push.iter().map(String::as_str).collect::<Vec<_>>());
        let r = s(waiter.read_reply());
        assert!(
            r.starts_with('*') || r.starts_with('$'),
            "{cmd:?} gave {r:?}"
        );
    }
    // XREADGROUP BLOCK, with a group named "block".
    let st = format!("{t}g");
    pusher.cmd(&["XGROUP", "CREATE", &st, "block", "$", "MKSTREAM"]);
    waiter.send(&[
        "XREADGROUP",
        "GROUP",
        "block",
        "c1",
        "BLOCK",
        "0",
        "STREAMS",
        &st,
        ">",
    ]);
    assert!(waiter
        .read_reply_within(Duration::from_millis(100))
        .is_none());
    pusher.cmd(&["XADD", &st, "*", "f", "g"]);
    assert!(s(waiter.read_reply()).contains("\r\nf\r\n$1\r\ng\r\n"));
    // A timeout expires with Redis's nil.
    assert_eq!(
        s(waiter.cmd(&["BLPOP", &format!("{t}none"), "0.2"])),
        "*-1\r\n"
    );
    // WAIT: no replicas here, so 0 once the timeout passes.
    assert_eq!(s(waiter.cmd(&["WAIT", "1", "100"])), ":0\r\n");
    assert_eq!(s(waiter.cmd(&["WAIT", "0", "0"])), ":0\r\n");
}

#[test]
fn a_hundred_blocked_clients_delay_nobody_and_leak_nothing() {
    let name = format!("tierproxy-blockmany-{}", std::process::id());
    let px = Proxy::start_with_config(
        &shared_cluster().seeds(),
        &format!("[upstream]\nclient_name = \"{name}\"\n"),
    );
    let t = tag("block_many");
    let count = || named_upstream_clients(&name);
    let baseline = count();
    let mut blocked: Vec<Resp> = (0..100)
        .map(|i| {
            let mut c = Resp::connect(&px.addr());
            c.send(&["BLPOP", &format!("{t}q{i}"), "0"]);
            c
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || count() >= baseline + 100),
        "100 blocked clients should hold 100 upstream connections: {} → {}",
        baseline,
        count()
    );
    // Everyone else is served meanwhile.
    let mut other = Resp::connect(&px.addr());
    for i in 0..50 {
        assert_eq!(s(other.cmd(&["PING"])), "+PONG\r\n");
        assert_eq!(s(other.cmd(&["SET", &format!("{t}k{i}"), "v"])), "+OK\r\n");
    }
    // Wake a few, kill the rest: their upstream connections go.
    for (i, c) in blocked.iter_mut().enumerate().take(5) {
        other.cmd(&["RPUSH", &format!("{t}q{i}"), "x"]);
        assert!(s(c.read_reply()).starts_with("*2\r\n"));
    }
    drop(blocked);
    assert!(
        eventually(Duration::from_secs(10), || count() <= baseline + 8),
        "upstream connections did not return to the baseline {baseline}: {}",
        count()
    );
}

// ------------------------------------------------------------------------------------------
// Pub/Sub
// ------------------------------------------------------------------------------------------

#[test]
fn subscribers_get_messages_published_anywhere() {
    let t = tag("ps_any").replace(['{', '}'], "");
    let (a, b) = (format!("{t}a"), format!("{t}b"));
    let mut sub = Resp::connect(&proxy().addr());
    sub.send(&["SUBSCRIBE", &a, &b]);
    assert_eq!(
        s(sub.read_reply()),
        format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{a}\r\n:1\r\n", a.len())
    );
    assert_eq!(
        s(sub.read_reply()),
        format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{b}\r\n:2\r\n", b.len())
    );

    // Through the proxy, and directly on every master.
    let mut publisher = Resp::connect(&proxy().addr());
    assert_eq!(s(publisher.cmd(&["PUBLISH", &a, "via-proxy"])), ":1\r\n");
    assert_eq!(s(sub.read_reply()), message("message", &[&a, "via-proxy"]));
    for m in masters() {
        let mut direct = Resp::connect(&m);
        direct.cmd(&["PUBLISH", &b, &format!("from-{m}")]);
        assert_eq!(
            s(sub.read_reply()),
            message("message", &[&b, &format!("from-{m}")])
        );
    }

    // Patterns.
    sub.send(&["PSUBSCRIBE", &format!("{t}p*")]);
    assert_eq!(
        s(sub.read_reply()),
        format!(
            "*3\r\n$10\r\npsubscribe\r\n${}\r\n{t}p*\r\n:3\r\n",
            t.len() + 2
        )
    );
    publisher.cmd(&["PUBLISH", &format!("{t}p1"), "pat"]);
    assert_eq!(
        s(sub.read_reply()),
        message("pmessage", &[&format!("{t}p*"), &format!("{t}p1"), "pat"])
    );

    // RESP2 subscribed mode: Redis's rules and error text.
    sub.send(&["GET", "x"]);
    assert_eq!(
        s(sub.read_reply()),
        "-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
    sub.send(&["PING"]);
    assert_eq!(s(sub.read_reply()), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    sub.send(&["MULTI"]);
    assert_eq!(
        s(sub.read_reply()),
        "-ERR Can't execute 'multi': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );

    // Unsubscribing: Redis's counts; then the connection is an ordinary one again.
    sub.send(&["UNSUBSCRIBE", &a]);
    assert_eq!(
        s(sub.read_reply()),
        format!("*3\r\n$11\r\nunsubscribe\r\n${}\r\n{a}\r\n:2\r\n", a.len())
    );
    sub.send(&["PUNSUBSCRIBE"]);
    assert_eq!(
        s(sub.read_reply()),
        format!(
            "*3\r\n$12\r\npunsubscribe\r\n${}\r\n{t}p*\r\n:1\r\n",
            t.len() + 2
        )
    );
    sub.send(&["UNSUBSCRIBE"]);
    assert_eq!(
        s(sub.read_reply()),
        format!("*3\r\n$11\r\nunsubscribe\r\n${}\r\n{b}\r\n:0\r\n", b.len())
    );
    assert_eq!(s(publisher.cmd(&["PUBLISH", &a, "nobody"])), ":0\r\n");
    assert_eq!(s(sub.cmd(&["PING"])), "+PONG\r\n");
}

/// A cluster node publishes keyspace notifications only to its own subscribers: through
/// the proxy a keyevent channel or a keyspace pattern hears every node's keys, and the
/// keyspace channel of one key hears that key wherever it lives.
#[test]
fn keyspace_notifications_come_from_every_node() {
    let t = tag("ps_notify").replace(['{', '}'], "");
    for m in masters() {
        assert_eq!(
            s(Resp::connect(&m).cmd(&["CONFIG", "SET", "notify-keyspace-events", "KEA"])),
            "+OK\r\n"
        );
    }
    // Keys on every master.
    let mut keys: Vec<String> = Vec::new();
    let mut owners = std::collections::BTreeSet::new();
    for i in 0.. {
        let k = format!("{t}k{i}");
        if owners.insert(owner(&k)) {
            keys.push(k);
        }
        if owners.len() == masters().len() {
            break;
        }
    }
    let mut sub = Resp::connect(&proxy().addr());
    let pattern = format!("__keyspace@0__:{t}*");
    sub.send(&["PSUBSCRIBE", &pattern]);
    assert!(s(sub.read_reply()).contains(&pattern));
    let last = keys.last().unwrap().clone();
    let one = format!("__keyspace@0__:{last}");
    // The keyevent channel hears other tests' SETs at once: subscribed last, in the same
    // command, whose confirmations come before any message.
    sub.send(&["SUBSCRIBE", &one, "__keyevent@0__:set"]);
    assert!(s(sub.read_reply()).contains(&one));
    assert!(s(sub.read_reply()).contains("__keyevent@0__:set"));

    let mut c = Resp::connect(&proxy().addr());
    let mut want: Vec<String> = keys
        .iter()
        .flat_map(|k| {
            [
                message("message", &["__keyevent@0__:set", k]),
                message(
                    "pmessage",
                    &[&pattern, &format!("__keyspace@0__:{k}"), "set"],
                ),
            ]
        })
        .collect();
    want.push(message("message", &[&one, "set"]));
    // Other tests' SETs arrive on the keyevent channel too: only ours are counted. A
    // test beside this one kills every subscriber connection: a notification sent while
    // they are re-established is lost, so the keys are written again until all arrive.
    let mut got = std::collections::BTreeSet::new();
    for _round in 0..5 {
        for k in &keys {
            assert_eq!(s(c.cmd(&["SET", k, "v"])), "+OK\r\n");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while got.len() < want.len() && std::time::Instant::now() < deadline {
            if let Some(m) = sub.read_reply_within(Duration::from_millis(200)) {
                let m = s(m);
                if want.contains(&m) {
                    got.insert(m);
                }
            }
        }
        if got.len() == want.len() {
            break;
        }
    }
    want.sort();
    assert_eq!(got.into_iter().collect::<Vec<_>>(), want);
}

/// The subscribe/unsubscribe replies, byte for byte as Redis sends them.
#[test]
fn subscription_replies_are_redis_replies() {
    let t = tag("ps_same").replace(['{', '}'], "");
    let (a, b) = (format!("{t}a"), format!("{t}b"));
    let steps: Vec<Vec<String>> = vec![
        vec!["UNSUBSCRIBE".into()],
        vec!["SUBSCRIBE".into(), a.clone(), b.clone(), a.clone()],
        vec!["PSUBSCRIBE".into(), format!("{t}*")],
        vec!["PING".into(), "hi".into()],
        vec!["UNSUBSCRIBE".into(), format!("{t}never")],
        vec!["PUNSUBSCRIBE".into(), format!("{t}*")],
        vec!["UNSUBSCRIBE".into(), b.clone()],
        vec!["UNSUBSCRIBE".into()],
    ];
    let replies_per_step = [1, 3, 1, 1, 1, 1, 1, 1];
    let run = |addr: &str, resp3: bool| -> Vec<String> {
        let mut c = Resp::connect(addr);
        if resp3 {
            c.cmd(&["HELLO", "3"]);
        }
        let mut out = Vec::new();
        for (st, n) in steps.iter().zip(replies_per_step) {
            let args: Vec<&str> = st.iter().map(String::as_str).collect();
            c.send(&args);
            for _ in 0..n {
                out.push(s(c.read_reply()));
            }
        }
        out
    };
    for resp3 in [false, true] {
        let direct = run(&shared_standalone().addr(), resp3);
        let through = run(&proxy().addr(), resp3);
        assert_eq!(direct, through, "resp3={resp3}");
    }
}

#[test]
fn resp3_subscribers_run_commands_and_get_pushes() {
    let t = tag("ps_resp3");
    let ch = t.replace(['{', '}'], "");
    let mut c = Resp::connect(&proxy().addr());
    c.cmd(&["HELLO", "3"]);
    c.send(&["SUBSCRIBE", &ch]);
    assert_eq!(
        s(c.read_reply()),
        format!(">3\r\n$9\r\nsubscribe\r\n${}\r\n{ch}\r\n:1\r\n", ch.len())
    );
    assert_eq!(s(c.cmd(&["SET", &format!("{t}k"), "v"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["GET", &format!("{t}k")])), "$1\r\nv\r\n");
    let mut p = Resp::connect(&proxy().addr());
    p.cmd(&["PUBLISH", &ch, "pushed"]);
    assert_eq!(
        s(c.read_reply()),
        format!(
            ">3\r\n$7\r\nmessage\r\n${}\r\n{ch}\r\n$6\r\npushed\r\n",
            ch.len()
        )
    );
}

#[test]
fn shard_channels_follow_their_slot() {
    let t = tag("ps_shard");
    let ch = format!("{t}news");
    let mut sub = Resp::connect(&proxy().addr());
    sub.send(&["SSUBSCRIBE", &ch]);
    assert_eq!(
        s(sub.read_reply()),
        format!("*3\r\n$10\r\nssubscribe\r\n${}\r\n{ch}\r\n:1\r\n", ch.len())
    );
    // Shard channels of two slots in one command: CROSSSLOT, as Redis Cluster says.
    sub.send(&["SSUBSCRIBE", &format!("{}x", tag("other")), &ch]);
    assert!(s(sub.read_reply()).starts_with("-CROSSSLOT"));
    let mut p = Resp::connect(&proxy().addr());
    assert_eq!(s(p.cmd(&["SPUBLISH", &ch, "one"])), ":1\r\n");
    assert_eq!(s(sub.read_reply()), message("smessage", &[&ch, "one"]));
    let mut direct = Resp::connect(&owner(&ch));
    direct.cmd(&["SPUBLISH", &ch, "two"]);
    assert_eq!(s(sub.read_reply()), message("smessage", &[&ch, "two"]));

    // Aggregated introspection.
    assert_eq!(
        s(p.cmd(&["PUBSUB", "SHARDNUMSUB", &ch])),
        format!("*2\r\n${}\r\n{ch}\r\n:1\r\n", ch.len())
    );
    assert!(s(p.cmd(&["PUBSUB", "SHARDCHANNELS", &format!("{t}*")])).contains(&ch));
    sub.send(&["SUNSUBSCRIBE"]);
    assert_eq!(
        s(sub.read_reply()),
        format!(
            "*3\r\n$12\r\nsunsubscribe\r\n${}\r\n{ch}\r\n:0\r\n",
            ch.len()
        )
    );
}

#[test]
fn pubsub_introspection_covers_every_node() {
    let t = tag("ps_intro").replace(['{', '}'], "");
    let ch = format!("{t}c");
    // One subscriber through the proxy, one directly on each master.
    let mut via = Resp::connect(&proxy().addr());
    via.send(&["SUBSCRIBE", &ch]);
    via.read_reply();
    let mut directs: Vec<Resp> = masters()
        .iter()
        .map(|m| {
            let mut d = Resp::connect(m);
            d.send(&["SUBSCRIBE", &ch]);
            d.read_reply();
            d.send(&["PSUBSCRIBE", &format!("{t}*")]);
            d.read_reply();
            d
        })
        .collect();
    let mut c = Resp::connect(&proxy().addr());
    let want = 1 + directs.len();
    assert_eq!(
        s(c.cmd(&["PUBSUB", "NUMSUB", &ch, &format!("{t}none")])),
        format!(
            "*4\r\n${}\r\n{ch}\r\n:{want}\r\n${}\r\n{t}none\r\n:0\r\n",
            ch.len(),
            t.len() + 4
        )
    );
    // A flat array in RESP3 too, as Redis answers.
    let mut c3 = Resp::connect(&proxy().addr());
    c3.cmd(&["HELLO", "3"]);
    assert_eq!(
        s(c3.cmd(&["PUBSUB", "NUMSUB", &ch])),
        format!("*2\r\n${}\r\n{ch}\r\n:{want}\r\n", ch.len())
    );
    let channels = s(c.cmd(&["PUBSUB", "CHANNELS", &format!("{t}*")]));
    assert_eq!(channels, format!("*1\r\n${}\r\n{ch}\r\n", ch.len()));
    let numpat: i64 = s(c.cmd(&["PUBSUB", "NUMPAT"]))
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap();
    assert!(numpat >= directs.len() as i64);
    directs.clear();
}

#[test]
fn a_slow_subscriber_is_disconnected_at_its_limit() {
    let px = Proxy::start_with_config(
        &shared_cluster().seeds(),
        "[client]\npubsub_output_limit = 1048576\n",
    );
    let ch = tag("ps_slow").replace(['{', '}'], "");
    let mut sub = Resp::connect(&px.addr());
    sub.send(&["SUBSCRIBE", &ch]);
    sub.read_reply();
    // The subscriber never reads again; messages are published in bursts bigger than the
    // socket buffers and the limit together. (Only then is closure checked: checking
    // reads what is buffered, which would make the subscriber a fast one.) Another test
    // may kill pub/sub connections meanwhile, losing a burst: hence a few attempts.
    let payload = "x".repeat(64 * 1024);
    let mut p = Resp::connect(&masters()[0]);
    let mut closed = false;
    for _ in 0..3 {
        for _ in 0..768 {
            p.cmd(&["PUBLISH", &ch, &payload]);
        }
        if sub.is_closed() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow subscriber was not disconnected");
    let (_, metrics) = px.admin_get("/metrics");
    assert!(
        metrics.contains("tierproxy_pubsub_clients_dropped_total 1"),
        "{metrics}"
    );
    // The proxy serves others as before.
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
}

#[test]
fn subscriptions_survive_a_lost_upstream_connection() {
    let px = Proxy::start_with_config(&shared_cluster().seeds(), "");
    let ch = tag("ps_survive").replace(['{', '}'], "");
    let mut sub = Resp::connect(&px.addr());
    sub.send(&["SUBSCRIBE", &ch]);
    sub.read_reply();
    // Kill every pub/sub connection on every node (the proxy's subscriber among them).
    for m in masters() {
        let mut d = Resp::connect(&m);
        d.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    // Messages published after the proxy re-subscribed arrive.
    let mut p = Resp::connect(&masters()[1]);
    let mut n = 0;
    let arrived = eventually(Duration::from_secs(10), || {
        n += 1;
        p.cmd(&["PUBLISH", &ch, &format!("m{n}")]);
        sub.read_reply_within(Duration::from_millis(100)).is_some()
    });
    assert!(
        arrived,
        "no message after the subscriber connection was killed"
    );
    let (_, metrics) = px.admin_get("/metrics");
    assert!(
        !metrics.contains("tierproxy_pubsub_resubscribes_total 0"),
        "{metrics}"
    );
}

// ------------------------------------------------------------------------------------------
// Scripts and functions
// ------------------------------------------------------------------------------------------

const SCRIPT: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

#[test]
fn scripts_load_everywhere_and_heal_noscript() {
    let mut c = Resp::connect(&proxy().addr());
    let sha_reply = s(c.cmd(&["SCRIPT", "LOAD", SCRIPT]));
    let sha = sha_reply.lines().nth(1).unwrap().to_string();
    for m in masters() {
        let mut d = Resp::connect(&m);
        assert_eq!(
            s(d.cmd(&["SCRIPT", "EXISTS", &sha])),
            "*1\r\n:1\r\n",
            "on {m}"
        );
    }
    assert_eq!(
        s(c.cmd(&["SCRIPT", "EXISTS", &sha, "0000"])),
        "*2\r\n:1\r\n:0\r\n"
    );
    // EVALSHA works for keys on every master.
    let keys: Vec<String> = (0..30)
        .map(|i| format!("{}k", tag(&format!("sc{i}"))))
        .collect();
    for k in &keys {
        assert_eq!(s(c.cmd(&["EVALSHA", &sha, "1", k, "2"])), ":2\r\n");
    }
    // Keys in two slots: CROSSSLOT.
    assert!(s(c.cmd(&["EVALSHA", &sha, "2", &keys[0], &keys[1], "1"])).starts_with("-CROSSSLOT"));
    // A node loses its script cache (as after a failover): healed on the next EVALSHA.
    let k = &keys[0];
    let mut node = Resp::connect(&owner(k));
    assert_eq!(s(node.cmd(&["SCRIPT", "FLUSH"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["EVALSHA", &sha, "1", k, "3"])), ":5\r\n");
    // EVAL'd scripts are healed too.
    let body = "return redis.call('GET', KEYS[1])";
    assert_eq!(s(c.cmd(&["EVAL", body, "1", k])), "$1\r\n5\r\n");
    let body_sha = s(node.cmd(&["SCRIPT", "LOAD", body]))
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    node.cmd(&["SCRIPT", "FLUSH"]);
    assert_eq!(s(c.cmd(&["EVALSHA", &body_sha, "1", k])), "$1\r\n5\r\n");
    // An unknown script: Redis's NOSCRIPT.
    assert!(
        s(c.cmd(&["EVALSHA", "ffffffffffffffffffffffffffffffffffffffff", "0"]))
            .starts_with("-NOSCRIPT")
    );
    let (_, metrics) = proxy().admin_get("/metrics");
    assert!(
        !metrics.contains("tierproxy_script_reloads_total 0\n"),
        "{metrics}"
    );
}

#[test]
fn functions_are_loaded_on_every_master() {
    let lib = tag("fn").replace(['{', '}'], "");
    let code = format!(
        "#!lua name={lib}\nredis.register_function{{function_name='{lib}_get', callback=function(keys, args) return redis.call('GET', keys[1]) end, flags={{'no-writes'}}}}"
    );
    let mut c = Resp::connect(&proxy().addr());
    assert_eq!(
        s(c.cmd(&["FUNCTION", "LOAD", &code])),
        format!("${}\r\n{lib}\r\n", lib.len())
    );
    for i in 0..20 {
        let k = format!("{}k", tag(&format!("fn{i}")));
        c.cmd(&["SET", &k, "v"]);
        assert_eq!(
            s(c.cmd(&["FCALL", &format!("{lib}_get"), "1", &k])),
            "$1\r\nv\r\n"
        );
        assert_eq!(
            s(c.cmd(&["FCALL_RO", &format!("{lib}_get"), "1", &k])),
            "$1\r\nv\r\n"
        );
    }
    assert_eq!(s(c.cmd(&["FUNCTION", "DELETE", &lib])), "+OK\r\n");
    for m in masters() {
        let mut d = Resp::connect(&m);
        assert!(
            s(d.cmd(&["FCALL", &format!("{lib}_get"), "0"])).starts_with("-ERR Function not found")
        );
    }
}

/// A real failover: the master owning the channels dies, its replica takes over.
/// Subscriptions are re-established on the new master, and EVALSHA of a script loaded
/// through the proxy works there (Redis does not replicate its script cache).
#[test]
fn subscriptions_and_scripts_survive_a_failover() {
    let mut cluster = support::RedisCluster::start(3, 1);
    let px = Proxy::start(&cluster.seeds(), &[], &[]);
    let t = tag("failover");
    let (ch, sch, key) = (
        t.replace(['{', '}'], ""),
        format!("{t}shard"),
        format!("{t}k"),
    );
    let victim = {
        // The master owning the shard channel's slot (and the key's).
        let masters = cluster.master_addrs();
        masters
            .into_iter()
            .find(|m| !s(Resp::connect(m).cmd(&["EXISTS", &key])).starts_with("-MOVED"))
            .unwrap()
    };
    let mut sub = Resp::connect(&px.addr());
    sub.send(&["SUBSCRIBE", &ch]);
    sub.read_reply();
    sub.send(&["SSUBSCRIBE", &sch]);
    sub.read_reply();
    let mut c = Resp::connect(&px.addr());
    let sha = s(c.cmd(&["SCRIPT", "LOAD", SCRIPT]))
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(s(c.cmd(&["EVALSHA", &sha, "1", &key, "1"])), ":1\r\n");

    cluster.kill_node(&victim);
    // Until the replica is promoted and the proxy has reconnected, retry.
    let mut n = 0;
    let got_message = eventually(Duration::from_secs(30), || {
        n += 1;
        c.cmd(&["PUBLISH", &ch, &format!("m{n}")]);
        sub.read_reply_within(Duration::from_millis(200)).is_some()
    });
    assert!(got_message, "no message after the failover");
    let got_shard = eventually(Duration::from_secs(30), || {
        n += 1;
        c.cmd(&["SPUBLISH", &sch, &format!("s{n}")]);
        matches!(sub.read_reply_within(Duration::from_millis(200)), Some(r) if s(r.clone()).contains("smessage"))
    });
    assert!(got_shard, "no shard message after the failover");
    let healed = eventually(Duration::from_secs(30), || {
        s(c.cmd(&["EVALSHA", &sha, "1", &key, "1"])).starts_with(':')
    });
    assert!(healed, "EVALSHA did not work on the promoted master");
}
