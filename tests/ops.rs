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
