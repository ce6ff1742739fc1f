//! Hostile and careless clients: malformed and oversized frames compared byte for byte
//! with a real redis-server, read-only users refused like an ACL `-@write` user, a reader
//! that never reads, and thousands of idle connections, with the proxy's memory measured
//! from /proc.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{config_file, eventually, exchange, shared_standalone, Proxy, RedisServer, Resp};

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

/// The proxy's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn proxy_in_front_of(addr: String, env: &[(&str, &str)]) -> Proxy {
    Proxy::start(&[addr], &[], env)
}

/// Malformed, oversized and odd frames get exactly Redis's reply, and the connection is
/// closed exactly when Redis closes it.
#[test]
fn malformed_frames_get_redis_s_replies_byte_for_byte() {
    let redis = shared_standalone();
    let px = proxy_in_front_of(redis.addr(), &[]);
    let mut nested = Vec::new();
    for _ in 0..100_000 {
        nested.extend_from_slice(b"*1\r\n");
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "bulk length over proto-max-bulk-len",
            b"*1\r\n$600000000\r\n".to_vec(),
        ),
        ("array header over INT_MAX", b"*2147483648\r\n".to_vec()),
        (
            "negative array length then a command",
            b"*-5\r\nPING\r\n".to_vec(),
        ),
        ("negative bulk length", b"*1\r\n$-5\r\n".to_vec()),
        ("bulk length not a number", b"*1\r\n$1x\r\n".to_vec()),
        (
            "bulk length with a plus sign",
            b"*1\r\n$+4\r\nPING\r\n".to_vec(),
        ),
        (
            "nested array (RESP3 aggregate) inside a request",
            b"*1\r\n*1\r\n$1\r\nx\r\n".to_vec(),
        ),
        ("100,000 nested array headers", nested),
        (
            "RESP3 map as a request",
            b"%1\r\n$1\r\na\r\n$1\r\nb\r\n".to_vec(),
        ),
        (
            "invalid UTF-8 command name",
            b"*2\r\n$2\r\n\xff\xfe\r\n$1\r\n\x80\r\n".to_vec(),
        ),
        ("invalid UTF-8 inline command", b"\xc3\x28 x\r\n".to_vec()),
        (
            "NUL bytes in a command name",
            b"*1\r\n$3\r\nG\x00T\r\n".to_vec(),
        ),
        ("a 300-byte multibyte command name", {
            let name = "é".repeat(150);
            let mut v = format!("*2\r\n${}\r\n", name.len()).into_bytes();
            v.extend_from_slice(name.as_bytes());
            v.extend_from_slice(b"\r\n$3\r\na\x00b\r\n");
            v
        }),
        (
            "an unknown CONFIG subcommand with invalid UTF-8",
            b"*2\r\n$6\r\nCONFIG\r\n$2\r\n\xff\x00\r\n".to_vec(),
        ),
        ("unbalanced quotes inline", b"SET k \"v\r\n".to_vec()),
        // Found by the fuzzer: a NUL in an inline command made the splitter loop forever.
        // Redis looks for the newline with strchr(), so a NUL leaves the line unfinished.
        (
            "NUL inside an inline command",
            b"ECHO a\x00b c\r\nPING\r\n".to_vec(),
        ),
        ("NUL inside an inline command, then 70 KiB", {
            let mut v = b"ECHO a\x00b\r\n".to_vec();
            v.extend(std::iter::repeat_n(b'x', 70 * 1024));
            v
        }),
        (
            "vertical tab and form feed in an inline command",
            b"ECHO\x0ba\x0c\x0b\r\n".to_vec(),
        ),
        ("bulk without its CRLF", b"*1\r\n$4\r\nPINGxx".to_vec()),
        ("inline line over 64 KiB", vec![b'a'; 70 * 1024]),
        ("array count line over 64 KiB", {
            let mut v = b"*".to_vec();
            v.extend(std::iter::repeat_n(b'1', 70 * 1024));
            v
        }),
    ];
    assert_like_redis(&redis.addr(), &px.addr(), cases);
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
}

/// Before AUTH, Redis's tighter limits apply (10 arguments, 16 KiB bulks), with its
/// wording; the proxy's replies match a password-protected redis-server's.
#[test]
fn unauthenticated_clients_get_the_tighter_limits() {
    let redis = RedisServer::start_with_args(&["--requirepass", "pw"]);
    let px = Proxy::start_unready(
        &[redis.addr()],
        &[],
        &[("TIERPROXY_PASSWORD", "pw"), ("REDIS_PASSWORD", "pw")],
    );
    // The harness readiness probe stops at NOAUTH; the admin endpoint knows better.
    assert!(eventually(Duration::from_secs(20), || px
        .admin_get("/readyz")
        .0
        == 200));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("11 arguments", b"*11\r\n".to_vec()),
        ("a 20 KiB bulk", b"*1\r\n$20000\r\n".to_vec()),
        (
            "a command before AUTH",
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec(),
        ),
        // Empty frames before AUTH in the same packet: the AUTH is still answered.
        (
            "empty frames, then AUTH",
            b"\r\n*0\r\nAUTH pw\r\nPING\r\n".to_vec(),
        ),
    ];
    assert_like_redis(&redis.addr(), &px.addr(), cases);
}

/// Sends each case's bytes to redis-server and to the proxy on fresh connections: the
/// replies and whether the connection was closed must be the same.
fn assert_like_redis(redis: &str, proxy: &str, cases: Vec<(&str, Vec<u8>)>) {
    for (what, bytes) in cases {
        let want = exchange(redis, &bytes, Duration::from_millis(500));
        let got = exchange(proxy, &bytes, Duration::from_millis(500));
        // Bytes, not text: a lossy conversion would hide a difference in invalid UTF-8.
        assert_eq!(
            got,
            want,
            "{what}: proxy (reply, closed) differs from redis-server:\n  proxy: {:?}\n  redis: {:?}",
            s(got.0.clone()),
            s(want.0.clone())
        );
    }
}

/// A huge array header or bulk length announces memory the client never sends: the
/// proxy allocates for what arrives, not for what is announced, and a partial frame
/// followed by silence is closed by the idle timeout.
#[test]
fn announced_sizes_do_not_allocate_and_partial_frames_time_out() {
    let cfg = config_file("[client]\nidle_timeout_secs = 1\n");
    let px = Proxy::start(
        &[shared_standalone().addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let before = rss_kib(px.pid());
    let mut hostile = Vec::new();
    for i in 0..50 {
        let mut sock = TcpStream::connect(px.addr()).expect("connect");
        let header: &[u8] = if i % 2 == 0 {
            b"*2147483647\r\n$3\r\nGET\r\n"
        } else {
            b"*2\r\n$3\r\nSET\r\n$536870000\r\nabc"
        };
        sock.write_all(header).unwrap();
        hostile.push(sock);
    }
    std::thread::sleep(Duration::from_millis(300));
    let during = rss_kib(px.pid());
    eprintln!("HOSTILE: RSS {before} KiB before, {during} KiB with 50 connections announcing 2^31 arguments or 512 MB bulks");
    assert!(
        during < before + 64 * 1024,
        "announced sizes were allocated: RSS went from {before} to {during} KiB"
    );
    // A partial frame and then silence: closed by the idle timeout, with no reply.
    for mut sock in hostile {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("a partial frame got a reply: {:?}", &buf[..n]),
        }
    }
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
}

/// A read-only user gets Redis's NOPERM for every command an ACL `-@write` user is
/// refused (compared with a real redis-server's replies), inside MULTI too, and the
/// refusals are counted; reads, EVAL_RO and PUBLISH still work. EVAL and FCALL, which
/// Redis would refuse only inside the script, are refused outright.
#[test]
fn read_only_users_get_noperm_for_writes() {
    let redis = RedisServer::start();
    let mut admin = Resp::connect(&redis.addr());
    assert_eq!(
        s(admin.cmd(&["ACL", "SETUSER", "reader", "on", ">rpw", "~*", "&*", "+@all", "-@write"])),
        "+OK\r\n"
    );
    let reader_hash = sha256_hex("rpw");
    let writer_hash = sha256_hex("wpw");
    let cfg = config_file(&format!(
        "[[auth.users]]\nname = \"reader\"\npassword_sha256 = \"{reader_hash}\"\nreadonly = true\n\n[[auth.users]]\nname = \"writer\"\npassword_sha256 = \"{writer_hash}\"\n"
    ));
    let px = Proxy::start_unready(
        &[redis.addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    // The harness readiness probe stops at NOAUTH; the admin endpoint knows better.
    assert!(eventually(Duration::from_secs(20), || px
        .admin_get("/readyz")
        .0
        == 200));

    let mut direct = Resp::connect(&redis.addr());
    assert_eq!(s(direct.cmd(&["AUTH", "reader", "rpw"])), "+OK\r\n");
    let mut via = Resp::connect(&px.addr());
    assert_eq!(s(via.cmd(&["AUTH", "reader", "rpw"])), "+OK\r\n");
    let k = "ro:absent";
    let cmds: Vec<Vec<&str>> = vec![
        vec!["SET", k, "v"],
        vec!["GET", k],
        vec!["DEL", k],
        vec!["INCR", k],
        vec!["HSET", "ro:h", "f", "v"],
        vec!["EXPIRE", k, "10"],
        vec!["FLUSHALL"],
        vec!["SET", k],
        vec!["EXISTS", k],
        vec!["PUBLISH", "ro:channel", "m"],
        vec!["EVAL_RO", "return 7", "0"],
        vec!["MULTI"],
        vec!["GET", k],
        vec!["SET", k, "v"],
        vec!["EXEC"],
    ];
    for cmd in &cmds {
        let want = s(direct.cmd(cmd));
        let got = s(via.cmd(cmd));
        assert_eq!(got, want, "{cmd:?}");
    }
    for script in [vec!["EVAL", "return 1", "0"], vec!["FCALL", "f", "0"]] {
        let cmd = script[0].to_lowercase();
        assert_eq!(
            s(via.cmd(&script)),
            format!("-NOPERM this user has no permissions to run the '{cmd}' command\r\n")
        );
    }
    assert!(s(via.cmd(&["TIERPROXY.TAG", k, "t"])).starts_with("-NOPERM"));
    // PFCOUNT has a read-write key spec but the readonly flag: a read.
    assert_eq!(s(via.cmd(&["PFCOUNT", k])), s(direct.cmd(&["PFCOUNT", k])));
    // Administration that would run with the proxy's own upstream credentials, and the
    // proxy's resets, are refused; its local read-only admin commands are not.
    for (cmd, name) in [
        (vec!["ACL", "SETUSER", "reader", "+@all"], "acl|setuser"),
        (vec!["CONFIG", "RESETSTAT"], "config|resetstat"),
        (vec!["SLOWLOG", "RESET"], "slowlog|reset"),
        (vec!["TIERPROXY.L1", "FLUSH"], "tierproxy.l1|flush"),
    ] {
        assert_eq!(
            s(via.cmd(&cmd)),
            format!("-NOPERM this user has no permissions to run the '{name}' command\r\n"),
            "{cmd:?}"
        );
    }
    assert!(s(via.cmd(&["CONFIG", "GET", "maxclients"])).starts_with("*2\r\n"));
    // Arity comes first, for the proxy's own commands too.
    assert!(s(via.cmd(&["TIERPROXY.INVALIDATE"])).starts_with("-ERR wrong number of arguments"));
    assert!(px.metric("tierproxy_noperm_total") >= 7.0);

    let mut writer = Resp::connect(&px.addr());
    assert_eq!(s(writer.cmd(&["AUTH", "writer", "wpw"])), "+OK\r\n");
    assert_eq!(s(writer.cmd(&["SET", k, "w"])), "+OK\r\n");
    assert_eq!(s(via.cmd(&["GET", k])), "$1\r\nw\r\n");
    // RESET drops the read-only user with the rest of the connection's state.
    assert_eq!(s(via.cmd(&["RESET"])), "+RESET\r\n");
    assert!(s(via.cmd(&["GET", k])).starts_with("-NOAUTH"));
}

fn sha256_hex(s: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// A client that pipelines reads of a 64 KiB value and never reads the replies: the
/// proxy stops producing once `client.output_buffer_limit` is unsent (memory stays far
/// below the 1.3 GB the replies add up to) and closes it after
/// `client.output_stall_timeout_secs`; other clients are served meanwhile.
#[test]
fn a_client_that_never_reads_is_bounded_and_disconnected() {
    let cfg =
        config_file("[client]\noutput_buffer_limit = 1048576\noutput_stall_timeout_secs = 2\n");
    let px = Proxy::start(
        &[shared_standalone().addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let mut c = Resp::connect(&px.addr());
    let value = "x".repeat(64 * 1024);
    assert_eq!(s(c.cmd(&["SET", "slow:big", &value])), "+OK\r\n");
    let before = rss_kib(px.pid());

    let sock = TcpStream::connect(px.addr()).expect("connect");
    let done = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let mut sock = sock.try_clone().unwrap();
        let done = done.clone();
        move || {
            let one = b"*2\r\n$3\r\nGET\r\n$8\r\nslow:big\r\n";
            let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
            for _ in 0..20 {
                if sock.write_all(&batch).is_err() {
                    break;
                }
            }
            done.store(true, Ordering::Release);
        }
    });
    let stalls = px.metric("tierproxy_client_output_stalls_total");
    let started = Instant::now();
    let mut peak = before;
    let closed = eventually(Duration::from_secs(60), || {
        peak = peak.max(rss_kib(px.pid()));
        // Others are served while the slow reader is stuck.
        assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
        px.metric("tierproxy_client_output_stalls_total") > stalls
    });
    eprintln!(
        "SLOW READER: closed after {:?}; RSS {before} KiB before, peak {peak} KiB",
        started.elapsed()
    );
    assert!(closed, "the slow reader was never disconnected");
    assert!(
        peak < before + 256 * 1024,
        "RSS grew from {before} to {peak} KiB for one client that does not read"
    );
    // Its socket is closed: the writer's pipeline ends (write error) rather than hanging.
    drop(sock);
    assert!(eventually(Duration::from_secs(30), || done.load(Ordering::Acquire)));
    writer.join().unwrap();
}

/// 10,000 idle client connections (each ran one command) fit in bounded memory: the
/// proxy's RSS is measured and must stay under 200 MiB (issue #9's target).
#[test]
fn ten_thousand_idle_connections_fit_in_bounded_memory() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let nofile: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    const N: usize = 10_000;
    assert!(
        nofile >= N as u64 + 500,
        "this test needs `ulimit -n` of at least {} (it is {nofile})",
        N + 500
    );
    let px = Proxy::start(
        &[shared_standalone().addr()],
        &[],
        &[("TIERPROXY_MAXCLIENTS", "10100")],
    );
    let before = rss_kib(px.pid());
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let mut sock = TcpStream::connect(px.addr()).expect("connect");
        sock.write_all(b"PING\r\n").unwrap();
        conns.push(sock);
    }
    for sock in &mut conns {
        let mut buf = [0u8; 7];
        sock.read_exact(&mut buf).expect("PONG");
        assert_eq!(&buf, b"+PONG\r\n");
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(px.pid());
    let per = (after.saturating_sub(before)) * 1024 / N as u64;
    eprintln!(
        "IDLE: {N} connections: RSS {before} KiB before, {after} KiB after, {per} bytes each"
    );
    assert!(
        after < 200 * 1024,
        "{N} idle connections take {after} KiB of RSS"
    );
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
}
