//! L3 with the S3 store, against a real S3-compatible server on loopback (moto) and a
//! real cluster: path-style addressing via AWS_ENDPOINT_URL, multipart uploads,
//! server-side encryption, S3 going away and coming back.

mod support;

use std::io::Write;

use support::{bulk, random, shared_cluster, tag, Proxy, Resp, S3Server};

const THRESHOLD: usize = 4096;
const BUCKET: &str = "tierproxy-test";
const KEY: &str = "a-signing-key-shared-by-all-proxies";

fn proxy(s3: &S3Server) -> Proxy {
    let mut cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        cfg,
        "[l3]\nenabled = true\nthreshold_bytes = {THRESHOLD}\nbucket = \"{BUCKET}\"\nprefix = \"spill/\"\nsse = \"AES256\"\nmultipart_threshold_bytes = 8388608\npart_size_bytes = 5242880\ntimeout_ms = 3000\n"
    )
    .unwrap();
    let endpoint = s3.endpoint();
    Proxy::start(
        &shared_cluster().seeds(),
        &["--config", cfg.path().to_str().unwrap()],
        &[
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("CACHE_L3_SIGNING_KEY", KEY),
        ],
    )
}

#[test]
fn values_round_trip_through_s3_with_encryption_and_multipart() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let px = proxy(&s3);
    let mut c = Resp::connect(&px.addr());
    let t = tag("s3rt");
    for (i, n) in [THRESHOLD + 1, 1 << 20, 20 << 20].into_iter().enumerate() {
        let v = random(n, i as u64 + 3);
        let k = format!("{t}{n}");
        assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v]), b"+OK\r\n", "{n}");
        assert_eq!(c.cmd(&["GET", &k]), bulk(&v), "{n}");
        assert_eq!(c.cmd(&["STRLEN", &k]), format!(":{n}\r\n").into_bytes());
    }
    let compressible = vec![b'z'; 3 << 20];
    let kz = format!("{t}zeros");
    assert_eq!(
        c.cmd_bytes(&[b"SET", kz.as_bytes(), &compressible]),
        b"+OK\r\n"
    );
    assert_eq!(c.cmd(&["GET", &kz]), bulk(&compressible));
    let keys = s3.keys(BUCKET);
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("spill/")), "{keys:?}");
    let mut multipart = 0;
    for (k, etag, size) in s3.objects(BUCKET) {
        if etag.contains('-') {
            // A multipart upload ("<md5>-<parts>"): encrypted through CreateMultipartUpload.
            multipart += 1;
            assert!(size > 8 << 20, "{k}: {size} bytes in parts");
        }
        assert_eq!(s3.object_sse(BUCKET, &k).as_deref(), Some("AES256"), "{k}");
    }
    assert_eq!(
        multipart, 1,
        "the 20 MiB value should have gone up in parts"
    );
    // A refused write leaves nothing behind.
    assert_eq!(
        c.cmd_bytes(&[b"SET", kz.as_bytes(), &random(THRESHOLD * 2, 9), b"NX"]),
        b"$-1\r\n"
    );
    assert_eq!(s3.keys(BUCKET).len(), 4);
    // Another proxy with the same signing key reads the same store.
    let other = proxy(&s3);
    let mut d = Resp::connect(&other.addr());
    assert_eq!(d.cmd(&["GET", &kz]), bulk(&compressible));
}

#[test]
fn s3_going_away_fails_requests_not_connections_and_loses_nothing() {
    let mut s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let port = s3.port();
    let px = proxy(&s3);
    let mut c = Resp::connect(&px.addr());
    let t = tag("s3down");
    let (k, small) = (format!("{t}big"), format!("{t}small"));
    let v1 = random(THRESHOLD * 3, 1);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v1]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", &small, "kept"]), b"+OK\r\n");

    s3.stop();
    // A spilled write fails and Redis keeps the old value (its stub).
    let r = String::from_utf8_lossy(&c.cmd_bytes(&[
        b"SET",
        small.as_bytes(),
        &random(THRESHOLD * 3, 2),
    ]))
    .into_owned();
    assert!(r.starts_with("-ERR tierproxy: spill store"), "{r}");
    assert_eq!(c.cmd(&["GET", &small]), b"$4\r\nkept\r\n");
    // A spilled read fails; the connection stays usable.
    let r = String::from_utf8_lossy(&c.cmd(&["GET", &k])).into_owned();
    assert!(r.starts_with("-ERR tierproxy: spill store"), "{r}");
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    assert_eq!(c.cmd(&["SET", &small, "still-works"]), b"+OK\r\n");

    // S3 back (empty: moto keeps nothing across restarts): spilled writes work again.
    let s3 = S3Server::start_on(port);
    // Before its bucket is back: S3's own code and message, on one line.
    let r = String::from_utf8_lossy(&c.cmd_bytes(&[
        b"SET",
        small.as_bytes(),
        &random(THRESHOLD * 3, 4),
    ]))
    .into_owned();
    assert!(
        r.starts_with(
            "-ERR tierproxy: spill store: S3 PutObject: NoSuchBucket: The specified bucket does not exist (HTTP 404)"
        ),
        "{r}"
    );
    s3.create_bucket(BUCKET);
    let v2 = random(THRESHOLD * 3, 3);
    assert_eq!(c.cmd_bytes(&[b"SET", k.as_bytes(), &v2]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", &k]), bulk(&v2));
    // A ranged read of an incompressible (raw) object fetches only that range.
    assert_eq!(c.cmd(&["GETRANGE", &k, "10", "19"]), bulk(&v2[10..20]));

    // The failures are counted by operation and kind, the latency as a histogram.
    let (_, metrics) = px.admin_get("/metrics");
    let failed_puts: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tierproxy_spill_store_errors_total{") && l.contains("op=\"put\"")
        })
        .filter_map(|l| l.rsplit(" ").next()?.parse::<u64>().ok())
        .sum();
    assert!(failed_puts >= 1, "no failed put counted:\n{metrics}");
    assert!(
        metrics.contains("tierproxy_spill_store_duration_seconds_bucket{op=\"get\",le=\"+Inf\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE tierproxy_spill_store_duration_seconds histogram"));
}

#[test]
fn an_s3_store_without_a_signing_key_is_refused() {
    let mut cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(cfg, "[l3]\nenabled = true\nbucket = \"b\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tierproxy"))
        .arg("--config")
        .arg(cfg.path())
        .arg("--check-config")
        .env_remove("CACHE_L3_SIGNING_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("l3.signing_key"));
}
