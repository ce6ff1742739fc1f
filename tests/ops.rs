//! Running tierproxy: configuration and its precedence, authentication, limits, an
//! unreachable upstream, and graceful shutdown. Each test starts its own proxy.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, shared_cluster, shared_standalone, tag, Proxy, RedisServer, Resp};

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tierproxy")
}

fn write_config(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f
}

/// `tierproxy --config FILE --check-config`.
fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(bin())
        .arg("--config")
        .arg(path)
        .arg("--check-config")
        .output()
        .unwrap()
}

#[test]
fn check_config_accepts_the_examples_and_names_a_bad_key() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/conf")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = check_config(&path);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bad = write_config("[client]\nmaxclients = 0\n");
    let out = check_config(bad.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client.maxclients"), "{err}");

    let unknown = write_config("[upstream]\nrequest_timeout = 5\n");
    let out = check_config(unknown.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("request_timeout"), "{err}");

    let typed = write_config("listen = 5\n");
    let out = check_config(typed.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));

    let out = Command::new(bin())
        .args(["--check-config", "--upstream", "ftp://nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.seeds"));
}

#[test]
fn precedence_is_cli_then_env_then_file() {
    let file_port = free_port();
    let env_port = free_port();
    let cfg = write_config(&format!(
        "listen = \"127.0.0.1:{file_port}\"\nadmin_listen = \"\"\n[upstream]\nseeds = [\"127.0.0.1:1\"]\n"
    ));
    // env beats the file for the listener; the CLI beats env for the upstream.
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(cfg.path())
        .args(["--upstream", &shared_standalone().addr()])
        .env("TIERPROXY_LISTEN", format!("127.0.0.1:{env_port}"))
        .env("REDIS_ADDR", "127.0.0.1:2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line.trim(),
        format!("tierproxy listening on 127.0.0.1:{env_port}")
    );
    let mut c = Resp::connect(&format!("127.0.0.1:{env_port}"));
    let k = format!("{}p", tag("prec"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s(c.cmd(&["SET", &k, "1"]));
        if r == "+OK\r\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upstream from --upstream never became usable: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn password_and_users_gate_every_command() {
    let hash = "93915a0a4bf8f634cb1856494dd4304472ad46b9827f541f76b6761c49cc55b0"; // sha256("pw2")
    let cfg = write_config(&format!(
        "[[auth.users]]\nname = \"app\"\npassword_sha256 = \"{hash}\"\n"
    ));
    let px = Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[("TIERPROXY_PASSWORD", "s3cret")],
    );
    let mut c = Resp::connect(&px.addr());
    assert_eq!(
        s(c.cmd(&["GET", "x"])),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(s(c.cmd(&["PING"])), "-NOAUTH Authentication required.\r\n");
    assert_eq!(
        s(c.cmd(&["HELLO", "3"])),
        "-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n"
    );
    assert_eq!(
        s(c.cmd(&["AUTH", "wrong"])),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(s(c.cmd(&["AUTH", "a", "b", "c"])), "-ERR syntax error\r\n");
    assert_eq!(s(c.cmd(&["AUTH", "s3cret"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
    // A named user, through HELLO … AUTH.
    let mut d = Resp::connect(&px.addr());
    let r = s(d.cmd(&["HELLO", "3", "AUTH", "app", "pw2"]));
    assert!(r.starts_with("%7"), "{r}");
    assert_eq!(s(d.cmd(&["PING"])), "+PONG\r\n");
    let mut e = Resp::connect(&px.addr());
    assert_eq!(
        s(e.cmd(&["AUTH", "app", "pw"])),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    // Unauthenticated clients get Redis's tighter frame limits.
    e.send_raw(b"*20\r\n");
    assert_eq!(
        s(e.read_reply()),
        "-ERR Protocol error: unauthenticated multibulk length\r\n"
    );
    assert!(e.is_closed());
    // RESET de-authenticates.
    assert_eq!(s(c.cmd(&["RESET"])), "+RESET\r\n");
    assert_eq!(
        s(c.cmd(&["GET", "x"])),
        "-NOAUTH Authentication required.\r\n"
    );
}

#[test]
fn limits_maxclients_bulk_len_inflight_idle() {
    let cfg = write_config(
        "[client]\nmaxclients = 3\nproto_max_bulk_len = 1024\nmax_inflight = 4\nidle_timeout_secs = 1\n",
    );
    let px = Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let mut a = Resp::connect(&px.addr());
    let mut b = Resp::connect(&px.addr());
    assert_eq!(s(a.cmd(&["PING"])), "+PONG\r\n");
    assert_eq!(s(b.cmd(&["PING"])), "+PONG\r\n");

    // A pipeline deeper than max_inflight is served completely and in order.
    let t = tag("limits");
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend(support::encode_cmd(&[b"ECHO", i.to_string().as_bytes()]));
        batch.extend(support::encode_cmd(&[b"GET", format!("{t}{i}").as_bytes()]));
    }
    a.send_raw(&batch);
    for i in 0..100 {
        let v = i.to_string();
        assert_eq!(s(a.read_reply()), format!("${}\r\n{v}\r\n", v.len()));
        assert_eq!(s(a.read_reply()), "$-1\r\n");
    }

    // Bulk larger than proto_max_bulk_len.
    let mut big = Resp::connect(&px.addr());
    big.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000\r\n");
    assert_eq!(
        s(big.read_reply()),
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    assert!(big.is_closed());

    // The fourth concurrent client is refused with Redis's error.
    let _c = Resp::connect(&px.addr());
    std::thread::sleep(Duration::from_millis(100));
    let mut d = Resp::connect(&px.addr());
    assert_eq!(s(d.read_reply()), "-ERR max number of clients reached\r\n");

    // Idle clients are closed after idle_timeout_secs.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(b.is_closed(), "idle connection should have been closed");
}

#[test]
fn unreachable_upstream_fails_fast_and_recovers() {
    let redis = RedisServer::start();
    let port = redis.port();
    let px = Proxy::start(
        &[redis.addr()],
        &[
            "--config",
            write_config("[upstream]\nrequest_timeout_ms = 1000\nconnect_timeout_ms = 500\n")
                .path()
                .to_str()
                .unwrap(),
        ],
        &[],
    );
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}k", tag("down"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while s(c.cmd(&["SET", &k, "v"])) != "+OK\r\n" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stop the server: requests get an error reply promptly, the connection stays usable.
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .output();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let r = s(c.cmd(&["GET", &k]));
    assert!(r.starts_with("-ERR tierproxy: upstream"), "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "error took {:?}",
        start.elapsed()
    );
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");

    // Bring a server back on the same port: service resumes by itself.
    let dir = tempfile::tempdir().unwrap();
    let mut again = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last;
    loop {
        last = s(c.cmd(&["SET", &k, "back"]));
        if last == "+OK\r\n" || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = again.kill();
    let _ = again.wait();
    assert_eq!(last, "+OK\r\n");
}

#[test]
fn upstream_unknown_at_start_is_an_error_reply_not_a_hang() {
    let dead = format!("127.0.0.1:{}", free_port());
    let px = Proxy::start_unready(&[dead], &[], &[]);
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
    let start = Instant::now();
    let r = s(c.cmd(&["GET", "k"]));
    assert!(
        r.starts_with("-ERR tierproxy: upstream topology is not known yet"),
        "{r}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut px = Proxy::start(&shared_cluster().seeds(), &[], &[]);
    let mut c = Resp::connect(&px.addr());
    let q = format!("{}q", tag("drain"));
    // A request that takes a second to answer is in flight when SIGTERM arrives.
    c.send_raw(&support::encode_cmd(&[b"BLPOP", q.as_bytes(), b"1"]));
    std::thread::sleep(Duration::from_millis(200));
    let status = px.terminate(Duration::from_secs(15));
    assert_eq!(
        s(c.read_reply()),
        "*-1\r\n",
        "the in-flight request was answered"
    );
    let status = status.expect("tierproxy did not exit by itself");
    assert!(status.success(), "{status:?}");
}

#[test]
fn upstream_password_from_env_or_url() {
    let redis = RedisServer::start_with_args(&["--requirepass", "upw"]);
    let k = format!("{}auth", tag("upauth"));
    // REDIS_PASSWORD
    let px = Proxy::start(&[redis.addr()], &[], &[("REDIS_PASSWORD", "upw")]);
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", &k, "1"])), "+OK\r\n");
    c.cmd(&["HELLO", "3"]);
    assert_eq!(s(c.cmd(&["GET", &k])), "$1\r\n1\r\n");
    // An ACL user in a redis:// URL.
    let mut admin = Resp::connect(&redis.addr());
    assert_eq!(s(admin.cmd(&["AUTH", "upw"])), "+OK\r\n");
    assert_eq!(
        s(admin.cmd(&["ACL", "SETUSER", "app", "on", ">apppw", "~*", "+@all"])),
        "+OK\r\n"
    );
    let url = format!("redis://app:apppw@{}", redis.addr());
    let px2 = Proxy::start(&[url], &[], &[]);
    let mut d = Resp::connect(&px2.addr());
    assert_eq!(s(d.cmd(&["GET", &k])), "$1\r\n1\r\n");
    // A wrong password: requests fail with the upstream's reason, never hang.
    let px3 = Proxy::start_unready(&[redis.addr()], &[], &[("REDIS_PASSWORD", "nope")]);
    let mut e = Resp::connect(&px3.addr());
    let start = Instant::now();
    let r = s(e.cmd(&["GET", &k]));
    assert!(r.starts_with("-ERR tierproxy: upstream"), "{r}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// The value of one sample line of the Prometheus text (`name{labels} value`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn info_field(c: &mut Resp, section: &str, field: &str) -> Option<String> {
    let info = s(c.cmd(&["INFO", section]));
    info.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_string())
    })
}

#[test]
fn metrics_commandstats_and_slowlog_count_a_known_workload() {
    let cfg = write_config(
        "[l1]\nenabled = true\nadmit_after_reads = 1\n[metrics]\nprefix = \"mcp\"\n[slowlog]\nlog_slower_than_us = 300000\n",
    );
    let px = Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}k", tag("known"));
    let q = format!("{}q", tag("known"));
    for i in 0..10 {
        assert_eq!(s(c.cmd(&["SET", &k, &format!("v{i}")])), "+OK\r\n");
    }
    for _ in 0..20 {
        assert_eq!(s(c.cmd(&["GET", &k])), "$2\r\nv9\r\n");
    }
    for _ in 0..3 {
        let r = s(c.cmd(&["INCR", &k]));
        assert!(r.starts_with("-ERR value is not an integer"), "{r}");
    }
    let r = s(c.cmd(&["GET"]));
    assert!(r.starts_with("-ERR wrong number of arguments"), "{r}");
    // Blocked for 0.6 s: in the histogram, but blocked time is not slow-log material.
    assert_eq!(s(c.cmd(&["BLPOP", &q, "0.6"])), "*-1\r\n");
    // Busy for longer than the slow log's 300 ms (about 0.6 s of Lua on this machine).
    let script = "local i=0 while i<60000000 do i=i+1 end return i";
    assert_eq!(s(c.cmd(&["EVAL", script, "0"])), ":60000000\r\n");

    let (code, text) = px.admin_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("tierproxy_") || l.contains(" tierproxy_")),
        "every name carries the configured prefix:\n{text}"
    );
    let d = "mcp_command_duration_seconds_count";
    assert_eq!(
        metric(&text, &format!("{d}{{command=\"set\",level=\"l2\"}}")),
        Some(10.0),
        "{text}"
    );
    let get_l1 = metric(&text, &format!("{d}{{command=\"get\",level=\"l1\"}}")).unwrap_or(0.0);
    let get_l2 = metric(&text, &format!("{d}{{command=\"get\",level=\"l2\"}}")).unwrap_or(0.0);
    assert_eq!(get_l1 + get_l2, 20.0, "{text}");
    // The first GET fills L1; later ones are hits unless a tracking invalidation of the
    // SETs arrived after that fill.
    assert!(get_l1 >= 10.0, "{text}");
    assert_eq!(
        metric(&text, "mcp_cache_hits_total{level=\"l1\"}"),
        Some(get_l1),
        "hits counted once, as answered from L1"
    );
    assert_eq!(
        metric(&text, &format!("{d}{{command=\"incr\",level=\"l2\"}}")),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, &format!("{d}{{command=\"blpop\",level=\"l2\"}}")),
        Some(1.0)
    );
    // BLPOP's 0.6 s lands in the buckets above 0.4096 s only.
    assert_eq!(
        metric(
            &text,
            "mcp_command_duration_seconds_bucket{command=\"blpop\",level=\"l2\",le=\"0.4096\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "mcp_command_duration_seconds_bucket{command=\"blpop\",level=\"l2\",le=\"+Inf\"}"
        ),
        Some(1.0)
    );
    // Three INCR errors and one arity error.
    assert_eq!(
        metric(&text, "mcp_error_replies_total{kind=\"ERR\"}"),
        Some(4.0),
        "{text}"
    );
    assert!(metric(&text, "mcp_commands_total").unwrap() >= 35.0);
    assert_eq!(metric(&text, "mcp_inflight_requests"), Some(0.0));
    assert!(metric(&text, "mcp_slowlog_entries_total").unwrap() >= 1.0);

    let stats = s(c.cmd(&["INFO", "commandstats"]));
    assert!(stats.contains("cmdstat_set:calls=10,"), "{stats}");
    assert!(stats.contains("cmdstat_get:calls=20,"), "{stats}");
    assert!(stats.contains("rejected_calls=1,failed_calls=0"), "{stats}");
    let incr = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_incr:"))
        .unwrap();
    assert!(
        incr.starts_with("cmdstat_incr:calls=3,")
            && incr.ends_with("rejected_calls=0,failed_calls=3"),
        "{incr}"
    );
    let lat = s(c.cmd(&["INFO", "latencystats"]));
    assert!(
        lat.contains("latency_percentiles_usec_blpop:p50=819200.000"),
        "{lat}"
    );
    // INFO without arguments leaves them out, as Redis does.
    assert!(!s(c.cmd(&["INFO"])).contains("cmdstat_"));

    // The newest entry is the EVAL (id, time, µs, arguments, client address, name).
    let slow = s(c.cmd(&["SLOWLOG", "GET", "1"]));
    assert!(slow.starts_with("*1\r\n*6\r\n"), "{slow}");
    assert!(
        slow.contains(&format!(
            "*3\r\n$4\r\nEVAL\r\n${}\r\n{script}\r\n$1\r\n0\r\n",
            script.len()
        )),
        "{slow}"
    );
    let micros: u64 = slow.split("\r\n").nth(4).unwrap()[1..].parse().unwrap();
    assert!(micros >= 300_000, "{slow}");
    assert!(!s(c.cmd(&["SLOWLOG", "GET", "-1"])).contains("BLPOP"));
    let r = s(c.cmd(&["SLOWLOG", "GET", "1", "x"]));
    assert!(r.starts_with("-ERR syntax error"), "{r}");
    assert_eq!(s(c.cmd(&["SLOWLOG", "RESET"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["SLOWLOG", "LEN"])), ":0\r\n");
    let r = s(c.cmd(&["SLOWLOG", "GET", "-2"]));
    assert!(
        r.starts_with("-ERR count should be greater than or equal to -1"),
        "{r}"
    );
    assert_eq!(
        s(c.cmd(&["CONFIG", "GET", "slowlog-log-slower-than"])),
        "*2\r\n$23\r\nslowlog-log-slower-than\r\n$6\r\n300000\r\n"
    );
    assert_eq!(s(c.cmd(&["CONFIG", "RESETSTAT"])), "+OK\r\n");
    assert!(!s(c.cmd(&["INFO", "commandstats"])).contains("cmdstat_set"));
}

/// A proxy in front of `redis` whose upstream requests time out after 1 s.
fn proxy_with_1s_timeout(redis: &RedisServer) -> Proxy {
    let cfg = write_config("[upstream]\nrequest_timeout_ms = 1000\n");
    Proxy::start(
        &[redis.addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    )
}

/// A node that stops answering (frozen, its connections open): every request waiting on
/// it gets the timeout error after `request_timeout_ms` (the connection's watchdog
/// checks every eighth of it), the client connection stays usable, and service resumes
/// on a fresh upstream connection once the node answers again.
#[test]
fn frozen_upstream_times_out_every_waiting_request() {
    let redis = RedisServer::start();
    let px = proxy_with_1s_timeout(&redis);
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", "frozen", "v"])), "+OK\r\n");
    redis.signal("STOP");
    let start = Instant::now();
    c.send_raw("*2\r\n$3\r\nGET\r\n$6\r\nfrozen\r\n".repeat(5).as_bytes());
    let replies: Vec<String> = (0..5).map(|_| s(c.read_reply())).collect();
    let took = start.elapsed();
    redis.signal("CONT");
    for r in &replies {
        assert!(
            r.starts_with("-ERR tierproxy: upstream") && r.contains("no reply within 1000 ms"),
            "{r}"
        );
    }
    assert!(
        took >= Duration::from_millis(1000),
        "timed out early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "timed out late: {took:?}"
    );
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
    assert!(support::eventually(Duration::from_secs(5), || s(
        c.cmd(&["GET", "frozen"])
    )
        == "$1\r\nv\r\n"));
}

/// Pipelined commands are forwarded as one group: when the upstream stops answering in
/// the middle of it, the replies that arrived are delivered and only the rest fail.
#[test]
fn a_group_cut_by_a_timeout_keeps_the_replies_that_arrived() {
    let redis = RedisServer::start();
    let px = proxy_with_1s_timeout(&redis);
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", "cut", "5"])), "+OK\r\n");
    // Redis answers reads, then holds the connection at the first write for 3 s.
    let mut direct = Resp::connect(&redis.addr());
    assert_eq!(
        s(direct.cmd(&["CLIENT", "PAUSE", "3000", "WRITE"])),
        "+OK\r\n"
    );
    c.send_raw(&support::encode_pipeline(&[
        &["GET", "cut"],
        &["STRLEN", "cut"],
        &["INCR", "cut"],
        &["GET", "cut"],
    ]));
    let replies: Vec<String> = (0..4).map(|_| s(c.read_reply())).collect();
    assert_eq!(replies[0], "$1\r\n5\r\n", "{replies:?}");
    assert_eq!(replies[1], ":1\r\n", "{replies:?}");
    for r in &replies[2..] {
        assert!(r.contains("no reply within 1000 ms"), "{replies:?}");
    }
    assert_eq!(s(direct.cmd(&["CLIENT", "UNPAUSE"])), "+OK\r\n");
    // The connection was replaced: service goes on.
    assert!(support::eventually(Duration::from_secs(10), || s(
        c.cmd(&["STRLEN", "cut"])
    )
        == ":1\r\n"));
}

#[test]
fn readyz_follows_the_cluster_stopping_and_starting() {
    let cluster = support::RedisCluster::start(3, 0);
    let px = Proxy::start(&cluster.seeds(), &[], &[]);
    assert_eq!(px.admin_get("/readyz").0, 200);
    let ready = |want: u16| {
        support::eventually(Duration::from_secs(20), || {
            px.admin_get("/readyz").0 == want
        })
    };
    // Every node frozen: nothing answers, though every connection stays open.
    cluster.signal_all("STOP");
    let went_down = ready(503);
    let body = px.admin_get("/readyz").1;
    cluster.signal_all("CONT");
    assert!(went_down, "readyz stayed 200 with the cluster stopped");
    assert!(body.starts_with("upstream not ready"), "{body}");
    assert!(ready(200), "readyz did not come back with the cluster");
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}k", tag("ready"));
    assert!(support::eventually(Duration::from_secs(10), || s(
        c.cmd(&["SET", &k, "v"])
    )
        == "+OK\r\n"));
}

#[test]
fn sighup_reloads_l1_size_slowlog_and_passwords() {
    let mut cfg = write_config(
        "[l1]\nenabled = true\nadmit_after_reads = 1\nmax_entries = 1000\n[slowlog]\nlog_slower_than_us = -1\n",
    );
    let px = Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let mut c = Resp::connect(&px.addr());
    let k = format!("{}k", tag("hup"));
    assert_eq!(s(c.cmd(&["SET", &k, "v"])), "+OK\r\n");
    // Read until cached (a tracking invalidation of the SET may drop the first fill).
    assert!(support::eventually(Duration::from_secs(5), || {
        s(c.cmd(&["GET", &k])) == "$1\r\nv\r\n"
            && info_field(&mut c, "l1", "l1_entries").as_deref() == Some("1")
    }));
    assert_eq!(
        info_field(&mut c, "l1", "l1_max_entries").as_deref(),
        Some("1000")
    );

    let rewrite = |f: &mut tempfile::NamedTempFile, body: &str| {
        let file = f.as_file_mut();
        file.set_len(0).unwrap();
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        file.write_all(body.as_bytes()).unwrap();
        file.sync_all().unwrap();
    };
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &px.pid().to_string()])
            .status()
            .unwrap()
            .success());
    };
    rewrite(
        &mut cfg,
        "[l1]\nenabled = true\nadmit_after_reads = 1\nmax_entries = 50\n[slowlog]\nlog_slower_than_us = 0\n[auth]\npassword = \"hup-pw\"\n[upstream]\nconnect_timeout_ms = 777\n",
    );
    hup();
    assert!(
        support::eventually(Duration::from_secs(10), || {
            info_field(&mut c, "l1", "l1_max_entries").as_deref() == Some("50")
        }),
        "{}",
        px.stderr_tail()
    );
    // A new size means a new, empty cache; the open connection stays authenticated.
    assert_eq!(info_field(&mut c, "l1", "l1_entries").as_deref(), Some("0"));
    assert_eq!(s(c.cmd(&["GET", &k])), "$1\r\nv\r\n");
    assert_eq!(
        s(c.cmd(&["CONFIG", "GET", "slowlog-log-slower-than"])),
        "*2\r\n$23\r\nslowlog-log-slower-than\r\n$1\r\n0\r\n"
    );
    // Threshold 0: every command is logged now.
    assert!(s(c.cmd(&["SLOWLOG", "LEN"])) != ":0\r\n");
    // The new password applies to new connections.
    let mut fresh = Resp::connect(&px.addr());
    assert!(s(fresh.cmd(&["GET", &k])).starts_with("-NOAUTH"));
    assert_eq!(s(fresh.cmd(&["AUTH", "hup-pw"])), "+OK\r\n");
    assert_eq!(s(fresh.cmd(&["GET", &k])), "$1\r\nv\r\n");
    assert!(
        support::eventually(Duration::from_secs(5), || px
            .stderr_tail()
            .contains("only take effect after a restart")
            && px.stderr_tail().contains("upstream")),
        "{}",
        px.stderr_tail()
    );

    // An invalid file changes nothing and is counted.
    rewrite(&mut cfg, "[l1]\nenabled = true\nmax_entries = 0\n");
    hup();
    assert!(support::eventually(Duration::from_secs(10), || {
        metric(
            &px.admin_get("/metrics").1,
            "tierproxy_config_reloads_total{result=\"failed\"}",
        ) == Some(1.0)
    }));
    assert_eq!(
        info_field(&mut c, "l1", "l1_max_entries").as_deref(),
        Some("50")
    );
    assert!(s(Resp::connect(&px.addr()).cmd(&["GET", &k])).starts_with("-NOAUTH"));
    assert_eq!(
        metric(
            &px.admin_get("/metrics").1,
            "tierproxy_config_reloads_total{result=\"ok\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn serve_stale_on_error_answers_from_l1_while_the_upstream_is_down() {
    let redis = RedisServer::start();
    let cfg = write_config(
        "[l1]\nenabled = true\nadmit_after_reads = 1\nserve_stale_on_error = true\n[upstream]\nrequest_timeout_ms = 1000\nconnect_timeout_ms = 500\n",
    );
    let px = Proxy::start(
        &[redis.addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", "hot", "cached"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["SET", "cold", "never-read"])), "+OK\r\n");
    assert!(support::eventually(Duration::from_secs(5), || {
        s(c.cmd(&["GET", "hot"])) == "$6\r\ncached\r\n"
            && info_field(&mut c, "l1", "l1_entries").as_deref() == Some("1")
    }));
    let _ = Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "shutdown", "nosave"])
        .output();
    // The lost connections flush L1 (entries are no longer known fresh), but kept ones
    // answer while the upstream cannot.
    assert!(support::eventually(Duration::from_secs(10), || {
        info_field(&mut c, "l1", "l1_flushes").is_some_and(|v| v != "0")
    }));
    assert_eq!(s(c.cmd(&["GET", "hot"])), "$6\r\ncached\r\n");
    let r = s(c.cmd(&["GET", "cold"]));
    assert!(r.starts_with("-ERR tierproxy: upstream"), "{r}");
    assert_eq!(
        info_field(&mut c, "l1", "l1_stale_served").as_deref(),
        Some("1")
    );
}

/// `tierproxy_inflight_requests` counts commands from dispatch to answer; a client that
/// leaves with a pipeline still waiting (a BLPOP, then reads behind it) takes its count
/// with it.
#[test]
fn inflight_requests_return_to_zero_when_a_client_leaves_mid_pipeline() {
    let px = Proxy::start(&[shared_standalone().addr()], &[], &[]);
    let gauge = || px.metric("tierproxy_inflight_requests");
    let wait_for = |want: &dyn Fn(f64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = gauge();
            if want(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(gauge(), 0.0);
    let k = format!("{}list", tag("inflight"));
    let mut pipeline = format!("*3\r\n$5\r\nBLPOP\r\n${}\r\n{k}\r\n$2\r\n10\r\n", k.len());
    for _ in 0..5 {
        pipeline.push_str(&format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()));
    }
    let mut sock = std::net::TcpStream::connect(px.addr()).unwrap();
    sock.write_all(pipeline.as_bytes()).unwrap();
    let during = wait_for(&|v| v >= 1.0);
    assert!(during >= 1.0, "the waiting BLPOP is in flight: {during}");
    drop(sock);
    let after = wait_for(&|v| v == 0.0);
    assert_eq!(
        after, 0.0,
        "the client left: nothing of its pipeline is in flight"
    );
}
