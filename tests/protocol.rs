//! Exact replies through tierproxy, as raw RESP bytes, in front of a real 3-master
//! cluster: the front end (RESP2, RESP3, inline, pipelining, bad frames) and the commands
//! the proxy answers itself.

mod support;

use std::sync::OnceLock;

use support::{shared_cluster, tag, Proxy, Resp};

fn proxy() -> &'static Proxy {
    static P: OnceLock<Proxy> = OnceLock::new();
    P.get_or_init(|| Proxy::start(&shared_cluster().seeds(), &[], &[]))
}

fn conn() -> Resp {
    Resp::connect(&proxy().addr())
}

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn ping_echo_and_redis_error_texts() {
    let mut c = conn();
    assert_eq!(s(c.cmd(&["PING"])), "+PONG\r\n");
    assert_eq!(s(c.cmd(&["PING", "hi"])), "$2\r\nhi\r\n");
    assert_eq!(
        s(c.cmd(&["PING", "a", "b"])),
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
    assert_eq!(s(c.cmd(&["ECHO", "x y"])), "$3\r\nx y\r\n");
    assert_eq!(
        s(c.cmd(&["NOSUCH", "a", "b"])),
        "-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(
        s(c.cmd(&["GET"])),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        s(c.cmd(&["CONFIG"])),
        "-ERR wrong number of arguments for 'config' command\r\n"
    );
    assert_eq!(
        s(c.cmd(&["OBJECT", "NOPE"])),
        "-ERR unknown subcommand 'NOPE'. Try OBJECT HELP.\r\n"
    );
    assert_eq!(s(c.cmd(&["SELECT", "0"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["SELECT", "1"])),
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
    assert_eq!(
        s(c.cmd(&["AUTH", "pw"])),
        "-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n"
    );
    // A type error comes from Redis itself, unchanged.
    let k = format!("{}str", tag("errs"));
    assert_eq!(s(c.cmd(&["SET", &k, "x"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["LPUSH", &k, "x"])),
        "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    );
    assert_eq!(
        s(c.cmd(&["INCR", &k])),
        "-ERR value is not an integer or out of range\r\n"
    );
}

#[test]
fn inline_commands_work_like_redis() {
    let mut c = conn();
    let k = format!("{}inline", tag("inline"));
    c.send_raw(format!("SET {k} \"a b\"\r\nGET {k}\r\nPING\n").as_bytes());
    assert_eq!(s(c.read_reply()), "+OK\r\n");
    assert_eq!(s(c.read_reply()), "$3\r\na b\r\n");
    assert_eq!(s(c.read_reply()), "+PONG\r\n");
    // Blank lines and empty multibulks are skipped silently.
    c.send_raw(b"\r\n*0\r\nPING\r\n");
    assert_eq!(s(c.read_reply()), "+PONG\r\n");
}

#[test]
fn resp3_after_hello_3() {
    let mut c = conn();
    let hello = s(c.cmd(&["HELLO", "3"]));
    assert!(
        hello.starts_with("%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        "{hello}"
    );
    assert!(hello.contains("$5\r\nproto\r\n:3\r\n"), "{hello}");
    let t = tag("resp3");
    let (h, z, missing) = (format!("{t}h"), format!("{t}z"), format!("{t}missing"));
    assert_eq!(s(c.cmd(&["HSET", &h, "f", "v"])), ":1\r\n");
    assert_eq!(s(c.cmd(&["HGETALL", &h])), "%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
    assert_eq!(s(c.cmd(&["ZADD", &z, "1.5", "m"])), ":1\r\n");
    assert_eq!(s(c.cmd(&["ZSCORE", &z, "m"])), ",1.5\r\n");
    assert_eq!(s(c.cmd(&["GET", &missing])), "_\r\n");
    // Local replies follow the protocol too.
    let cfg = s(c.cmd(&["CONFIG", "GET", "save"]));
    assert_eq!(cfg, "%1\r\n$4\r\nsave\r\n$0\r\n\r\n");
    // Back to RESP2 on the same connection.
    let hello2 = s(c.cmd(&["HELLO", "2"]));
    assert!(hello2.starts_with("*14\r\n"), "{hello2}");
    assert_eq!(s(c.cmd(&["HGETALL", &h])), "*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
    assert_eq!(s(c.cmd(&["GET", &missing])), "$-1\r\n");
    assert_eq!(
        s(c.cmd(&["HELLO", "4"])),
        "-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        s(c.cmd(&["HELLO", "3", "FOO"])),
        "-ERR Syntax error in HELLO option 'FOO'\r\n"
    );
}

#[test]
fn hello_with_setname() {
    let mut c = conn();
    let r = s(c.cmd(&["HELLO", "3", "SETNAME", "worker-1"]));
    assert!(r.starts_with("%7"), "{r}");
    assert_eq!(s(c.cmd(&["CLIENT", "GETNAME"])), "$8\r\nworker-1\r\n");
}

#[test]
fn pipeline_of_1000_commands_keeps_order() {
    let mut c = conn();
    let t = tag("pipe");
    let mut batch = Vec::new();
    for i in 0..500 {
        // Keys without a shared tag spread over all masters.
        let k = format!("pipe:{t}:{i}:x").replace(['{', '}'], "");
        batch.extend(support::encode_cmd(&[
            b"SET",
            k.as_bytes(),
            i.to_string().as_bytes(),
        ]));
        batch.extend(support::encode_cmd(&[b"GET", k.as_bytes()]));
    }
    c.send_raw(&batch);
    for i in 0..500 {
        assert_eq!(s(c.read_reply()), "+OK\r\n", "SET #{i}");
        let v = i.to_string();
        assert_eq!(
            s(c.read_reply()),
            format!("${}\r\n{v}\r\n", v.len()),
            "GET #{i}"
        );
    }
}

/// Large replies are written from their own buffers, between the small ones around
/// them: the order and the bytes are the pipeline's.
#[test]
fn large_replies_keep_their_place_in_a_pipeline() {
    let mut c = conn();
    let t = tag("large");
    let (small, big) = (format!("{t}small"), format!("{t}big"));
    let big_value: String = (0..300 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    assert_eq!(s(c.cmd(&["SET", &small, "s"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["SET", &big, &big_value])), "+OK\r\n");
    let big_reply = format!("${}\r\n{big_value}\r\n", big_value.len());
    let mut batch = Vec::new();
    let mut want = Vec::new();
    for i in 0..20 {
        let k = if i % 3 == 1 { &big } else { &small };
        batch.extend(support::encode_cmd(&[b"GET", k.as_bytes()]));
        want.push(if k == &big {
            big_reply.clone()
        } else {
            "$1\r\ns\r\n".to_string()
        });
        batch.extend(support::encode_cmd(&[b"PING"]));
        want.push("+PONG\r\n".to_string());
    }
    c.send_raw(&batch);
    for (i, w) in want.iter().enumerate() {
        assert!(s(c.read_reply()) == *w, "reply #{i} differs");
    }
}

#[test]
fn malformed_frame_closes_only_that_connection() {
    let mut other = conn();
    assert_eq!(s(other.cmd(&["PING"])), "+PONG\r\n");
    let cases: &[(&[u8], &str)] = &[
        (
            b"*1\r\n+PING\r\n",
            "-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"*x\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$-3\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"SET k \"abc\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ];
    for (input, want) in cases {
        let mut bad = conn();
        // Commands before the bad frame are still answered, in order.
        let mut bytes = b"PING\r\n".to_vec();
        bytes.extend_from_slice(input);
        bad.send_raw(&bytes);
        assert_eq!(s(bad.read_reply()), "+PONG\r\n");
        assert_eq!(s(bad.read_reply()), *want);
        assert!(bad.is_closed(), "connection must close after {want}");
    }
    assert_eq!(s(other.cmd(&["PING"])), "+PONG\r\n");
}

#[test]
fn client_commands() {
    let mut c = conn();
    let id = s(c.cmd(&["CLIENT", "ID"]));
    assert!(id.starts_with(':'), "{id}");
    assert_eq!(s(c.cmd(&["CLIENT", "GETNAME"])), "$-1\r\n");
    assert_eq!(s(c.cmd(&["CLIENT", "SETNAME", "app"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["CLIENT", "GETNAME"])), "$3\r\napp\r\n");
    assert_eq!(
        s(c.cmd(&["CLIENT", "SETNAME", "a b"])),
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(
        s(c.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "mylib"])),
        "+OK\r\n"
    );
    assert_eq!(
        s(c.cmd(&["CLIENT", "SETINFO", "LIB-VER", "1.2"])),
        "+OK\r\n"
    );
    assert_eq!(
        s(c.cmd(&["CLIENT", "SETINFO", "COLOR", "x"])),
        "-ERR Unrecognized option 'COLOR'\r\n"
    );
    let info = s(c.cmd(&["CLIENT", "INFO"]));
    let idnum = id.trim_start_matches(':').trim();
    assert!(info.contains(&format!("id={idnum} ")), "{info}");
    assert!(info.contains("name=app "), "{info}");
    assert!(info.contains("lib-name=mylib lib-ver=1.2"), "{info}");
    let list = s(c.cmd(&["CLIENT", "LIST", "ID", idnum]));
    assert_eq!(list.matches("id=").count(), 1, "{list}");
    assert_eq!(s(c.cmd(&["CLIENT", "NO-EVICT", "on"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["CLIENT", "NO-TOUCH", "off"])), "+OK\r\n");
    assert_eq!(
        s(c.cmd(&["CLIENT", "NO-EVICT", "maybe"])),
        "-ERR syntax error\r\n"
    );
    // REPLY OFF: nothing until ON; SKIP: the next reply only.
    c.send_raw(b"CLIENT REPLY OFF\r\nPING\r\nCLIENT REPLY ON\r\nPING x\r\n");
    assert_eq!(s(c.read_reply()), "+OK\r\n");
    assert_eq!(s(c.read_reply()), "$1\r\nx\r\n");
    c.send_raw(b"CLIENT REPLY SKIP\r\nPING a\r\nPING b\r\n");
    assert_eq!(s(c.read_reply()), "$1\r\nb\r\n");
    assert_eq!(
        s(c.cmd(&["CLIENT", "NOPE"])),
        "-ERR unknown subcommand 'NOPE'. Try CLIENT HELP.\r\n"
    );
}

#[test]
fn config_get_answers_benchmarks_and_clients() {
    let mut c = conn();
    assert_eq!(
        s(c.cmd(&["CONFIG", "GET", "save"])),
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(
        s(c.cmd(&["CONFIG", "GET", "appendonly"])),
        "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
    );
    let many = s(c.cmd(&["CONFIG", "GET", "max*", "databases"]));
    for k in ["maxmemory", "maxclients", "databases"] {
        assert!(many.contains(k), "{many}");
    }
    assert_eq!(s(c.cmd(&["CONFIG", "GET", "nosuchthing"])), "*0\r\n");
}

#[test]
fn cluster_emulation_presents_one_node_at_the_proxy() {
    let mut c = conn();
    let port = proxy().port();
    let slots = s(c.cmd(&["CLUSTER", "SLOTS"]));
    assert!(
        slots.starts_with(&format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n:{port}\r\n$40\r\n"
        )),
        "{slots}"
    );
    let info = s(c.cmd(&["CLUSTER", "INFO"]));
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    let nodes = s(c.cmd(&["CLUSTER", "NODES"]));
    assert!(
        nodes.contains(&format!(
            " 127.0.0.1:{port}@{} myself,master - 0 0 1 connected 0-16383",
            port as u32 + 10000
        )),
        "{nodes}"
    );
    let myid = s(c.cmd(&["CLUSTER", "MYID"]));
    assert!(nodes.contains(&myid[5..45]), "{myid} / {nodes}");
    assert_eq!(s(c.cmd(&["CLUSTER", "KEYSLOT", "foo"])), ":12182\r\n");
    assert_eq!(
        s(c.cmd(&["CLUSTER", "KEYSLOT", "{user1}.x"])),
        s(c.cmd(&["CLUSTER", "KEYSLOT", "user1"]))
    );
    let shards = s(c.cmd(&["CLUSTER", "SHARDS"]));
    assert!(
        shards.contains("$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n"),
        "{shards}"
    );
    assert_eq!(
        s(c.cmd(&["CLUSTER", "COUNTKEYSINSLOT", "x"])),
        "-ERR Invalid slot\r\n"
    );
    let count = s(c.cmd(&["CLUSTER", "COUNTKEYSINSLOT", "12182"]));
    assert!(count.starts_with(':'), "{count}");
}

#[test]
fn info_time_dbsize_and_command_from_the_backend() {
    let mut c = conn();
    let k = format!("{}info", tag("info"));
    c.cmd(&["SET", &k, "1"]);
    let info = s(c.cmd(&["INFO"]));
    for want in [
        "# Server",
        "redis_version:7.",
        "# Clients",
        "connected_clients:",
        "# Stats",
        "total_commands_processed:",
        "# Keyspace",
        "db0:keys=",
    ] {
        assert!(info.contains(want), "missing {want} in {info}");
    }
    let only = s(c.cmd(&["INFO", "keyspace"]));
    assert!(
        only.contains("# Keyspace") && !only.contains("# Server"),
        "{only}"
    );
    let dbsize = s(c.cmd(&["DBSIZE"]));
    let n: i64 = dbsize.trim_start_matches(':').trim().parse().unwrap();
    assert!(n >= 1, "{dbsize}");
    let time = s(c.cmd(&["TIME"]));
    assert!(time.starts_with("*2\r\n$10\r\n"), "{time}");
    let count = s(c.cmd(&["COMMAND", "COUNT"]));
    let n: i64 = count.trim_start_matches(':').trim().parse().unwrap();
    assert!(n > 200, "{count}");
    let keys = s(c.cmd(&["COMMAND", "GETKEYS", "MSET", "a", "1", "b", "2"]));
    assert_eq!(keys, "*2\r\n$1\r\na\r\n$1\r\nb\r\n");
    let docs = s(c.cmd(&["COMMAND", "DOCS", "GET"]));
    assert!(docs.contains("summary"), "{docs}");
}

#[test]
fn quit_and_reset() {
    let mut c = conn();
    assert_eq!(s(c.cmd(&["CLIENT", "SETNAME", "x"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["RESET"])), "+RESET\r\n");
    assert_eq!(s(c.cmd(&["CLIENT", "GETNAME"])), "$-1\r\n");
    assert_eq!(s(c.cmd(&["QUIT"])), "+OK\r\n");
    assert!(c.is_closed());
}
