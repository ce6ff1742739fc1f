//! Real clients through tierproxy: redis-benchmark (no errors, no warnings) and redis-py
//! (a mainstream client library) in RESP2 and RESP3.

mod support;

use std::process::Command;
use std::sync::OnceLock;

use support::{shared_cluster, tag, Proxy};

fn proxy() -> &'static Proxy {
    static P: OnceLock<Proxy> = OnceLock::new();
    P.get_or_init(|| Proxy::start(&shared_cluster().seeds(), &[], &[]))
}

#[test]
fn redis_benchmark_runs_clean() {
    let tests = "ping,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,zpopmin,lrange,mset";
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &proxy().port().to_string()])
        .args(["-t", tests, "-n", "10000", "-c", "20", "-q"])
        .output()
        .expect("redis-benchmark must be installed (redis-tools)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let all = format!("{stdout}\n{stderr}");
    for bad in ["WARNING", "ERR", "rror", "Could not"] {
        assert!(
            !all.contains(bad),
            "redis-benchmark printed {bad:?}:\n{all}"
        );
    }
    // -q prints one final "NAME: N requests per second" line per test (after \r updates).
    let finals: Vec<&str> = stdout
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .collect();
    for name in [
        "PING_INLINE",
        "PING_MBULK",
        "SET",
        "GET",
        "INCR",
        "LPUSH",
        "RPUSH",
        "LPOP",
        "RPOP",
        "SADD",
        "HSET",
        "SPOP",
        "ZADD",
        "ZPOPMIN",
        "LRANGE_100",
        "LRANGE_600",
        "MSET",
    ] {
        assert!(
            finals.iter().any(|l| l.trim_start().starts_with(name)),
            "no result for {name}:\n{stdout}"
        );
    }
}

#[test]
fn redis_py_resp2_and_resp3() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/redis_py_workload.py"
    );
    for proto in ["2", "3"] {
        let prefix = tag(&format!("py{proto}"));
        let out = Command::new("python3")
            .args([
                script,
                "127.0.0.1",
                &proxy().port().to_string(),
                proto,
                &prefix,
            ])
            .output()
            .expect("python3 must be installed");
        assert!(
            out.status.success(),
            "redis-py RESP{proto} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
