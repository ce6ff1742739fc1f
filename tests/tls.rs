//! TLS to the upstream against redis-server's own TLS mode, with certificates this test
//! generates (openssl): verification against the CA file, by IP SAN, by a configured
//! server name, and refusal of a certificate the CA did not sign.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{config_file, free_port, Proxy, RedisServer, Resp};

fn s(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate it signed for `san` (e.g. `IP:127.0.0.1`).
fn certs(dir: &Path, name: &str, san: &str) {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
    );
    leaf(dir, &ca, name, san);
}

/// A certificate `name.crt` (key `name.key`) signed by the CA `ca.crt`/`ca.key`.
fn leaf(dir: &Path, ca: &str, name: &str, san: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// A standalone server with a TLS port beside its plaintext one (the harness waits on
/// the plaintext one); returns the server and its TLS address.
fn tls_server(dir: &Path, name: &str) -> (RedisServer, String) {
    let port = free_port();
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let server = RedisServer::start_with_args(&[
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &p(&format!("{name}.crt")),
        "--tls-key-file",
        &p(&format!("{name}.key")),
        "--tls-ca-cert-file",
        &p(&format!("{name}-ca.crt")),
        "--tls-auth-clients",
        "no",
    ]);
    (server, format!("127.0.0.1:{port}"))
}

#[test]
fn upstream_tls_verifies_the_server_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "ip", "IP:127.0.0.1");
    let (_server, tls_addr) = tls_server(dir.path(), "ip");
    let ca = dir.path().join("ip-ca.crt");
    let cfg = config_file(&format!(
        "[upstream]\ntls = true\ntls_ca_file = {:?}\n",
        ca.to_str().unwrap()
    ));
    let px = Proxy::start(
        std::slice::from_ref(&tls_addr),
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", "over-tls", "yes"])), "+OK\r\n");
    assert_eq!(s(c.cmd(&["GET", "over-tls"])), "$3\r\nyes\r\n");
    assert_eq!(px.admin_get("/readyz").0, 200);

    // The same port spoken to in plaintext does not work: the traffic above was TLS.
    let plain = Proxy::start_unready(std::slice::from_ref(&tls_addr), &[], &[]);
    let mut p = Resp::connect(&plain.addr());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(s(p.cmd(&["GET", "over-tls"])).starts_with("-ERR tierproxy: upstream"));

    // rediss:// seeds turn TLS on by themselves; REDIS_TLS_CA_FILE names the CA.
    let by_url = Proxy::start(
        &[format!("rediss://{tls_addr}")],
        &[],
        &[("REDIS_TLS_CA_FILE", ca.to_str().unwrap())],
    );
    assert_eq!(
        s(Resp::connect(&by_url.addr()).cmd(&["GET", "over-tls"])),
        "$3\r\nyes\r\n"
    );
}

#[test]
fn upstream_tls_refuses_an_untrusted_or_misnamed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "dns", "DNS:redis.test");
    certs(dir.path(), "other", "IP:127.0.0.1");
    let (_server, tls_addr) = tls_server(dir.path(), "dns");
    let ca = |n: &str| {
        dir.path()
            .join(format!("{n}-ca.crt"))
            .to_string_lossy()
            .into_owned()
    };
    let start = |body: String| {
        let cfg = config_file(&body);
        Proxy::start_unready(
            std::slice::from_ref(&tls_addr),
            &["--config", cfg.path().to_str().unwrap()],
            &[],
        )
    };
    // Signed by the right CA, but for redis.test, not 127.0.0.1.
    let misnamed = start(format!(
        "[upstream]\ntls = true\ntls_ca_file = {:?}\n",
        ca("dns")
    ));
    // A CA that did not sign it.
    let untrusted = start(format!(
        "[upstream]\ntls = true\ntls_ca_file = {:?}\ntls_server_name = \"redis.test\"\n",
        ca("other")
    ));
    // Right CA and the name the certificate carries: accepted.
    let named = start(format!(
        "[upstream]\ntls = true\ntls_ca_file = {:?}\ntls_server_name = \"redis.test\"\n",
        ca("dns")
    ));
    named.wait_ready();
    assert_eq!(
        s(Resp::connect(&named.addr()).cmd(&["SET", "k", "v"])),
        "+OK\r\n"
    );
    for (px, why) in [(&misnamed, "not valid for name"), (&untrusted, "issuer")] {
        let r = s(Resp::connect(&px.addr()).cmd(&["GET", "k"]));
        assert!(r.starts_with("-ERR tierproxy: upstream"), "{r}");
        let (code, body) = px.admin_get("/readyz");
        assert_eq!(code, 503);
        assert!(
            support::eventually(Duration::from_secs(5), || px
                .stderr_tail()
                .to_lowercase()
                .contains(why)),
            "{body}\n{}",
            px.stderr_tail()
        );
    }
}

#[test]
fn iam_auth_connects_as_the_iam_user_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), "iam", "IP:127.0.0.1");
    let (server, tls_addr) = tls_server(dir.path(), "iam");
    // Redis cannot check a SigV4 token; a `nopass` user accepts any password, so this
    // shows the handshake authenticates as the IAM user (the token itself is unit-tested
    // against botocore's, src/upstream/iam.rs).
    let mut admin = Resp::connect(&server.addr());
    assert_eq!(
        s(admin.cmd(&[
            "ACL",
            "SETUSER",
            "iam-user-01",
            "on",
            "nopass",
            "~*",
            "&*",
            "+@all"
        ])),
        "+OK\r\n"
    );
    assert_eq!(
        s(admin.cmd(&["ACL", "SETUSER", "default", "off"])),
        "+OK\r\n"
    );
    let ca = dir.path().join("iam-ca.crt");
    let cfg = config_file(&format!(
        "[upstream]\ntls = true\ntls_ca_file = {:?}\n[upstream.iam]\nenabled = true\nuser_id = \"iam-user-01\"\ncache_name = \"my-cache\"\nregion = \"us-east-1\"\n",
        ca.to_str().unwrap()
    ));
    let px = Proxy::start(
        &[tls_addr],
        &["--config", cfg.path().to_str().unwrap()],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            (
                "AWS_SECRET_ACCESS_KEY",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            ),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let mut c = Resp::connect(&px.addr());
    assert_eq!(s(c.cmd(&["SET", "iam", "ok"])), "+OK\r\n");
    let clients = s(admin.cmd(&["CLIENT", "LIST"]));
    assert!(
        clients
            .lines()
            .any(|l| l.contains("name=tierproxy ") && l.contains("user=iam-user-01")),
        "{clients}"
    );
    // IAM without TLS is refused at start-up: ElastiCache only accepts it over TLS.
    let plain = config_file(
        "[upstream]\n[upstream.iam]\nenabled = true\nuser_id = \"u\"\ncache_name = \"c\"\nregion = \"us-east-1\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tierproxy"))
        .args(["--config", plain.path().to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.iam.enabled"));
}

/// A proxy whose client listener uses TLS, in front of a plaintext standalone server;
/// returns once its admin endpoint says it is ready (the harness's own readiness probe
/// speaks plaintext).
fn tls_proxy(dir: &Path, extra: &[&str]) -> Proxy {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut args = vec![
        "--tls-cert".to_string(),
        p("front.crt"),
        "--tls-key".to_string(),
        p("front.key"),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let px = Proxy::start_unready(&[support::shared_standalone().addr()], &args, &[]);
    assert!(
        support::eventually(Duration::from_secs(20), || px.admin_get("/readyz").0 == 200),
        "the TLS proxy never became ready: {}",
        px.stderr_tail()
    );
    px
}

/// `redis-cli --tls` against the proxy: (success, stdout + stderr).
fn tls_cli(dir: &Path, px: &Proxy, tls_args: &[&str], cmd: &[&str]) -> (bool, String) {
    let out = Command::new("redis-cli")
        .current_dir(dir)
        .args(["-h", "127.0.0.1", "-p", &px.port().to_string(), "--tls"])
        .args(tls_args)
        .args(cmd)
        .output()
        .expect("redis-cli");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `--tls-cert`/`--tls-key`: clients connect with TLS (verified against the CA that
/// signed the proxy's certificate); a plaintext client gets no reply, only a close; a
/// client that trusts another CA refuses the proxy.
#[test]
fn the_client_listener_speaks_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, "front", "IP:127.0.0.1");
    certs(d, "other", "IP:127.0.0.1");
    let px = tls_proxy(d, &[]);

    let ca = ["--cacert", "front-ca.crt"];
    assert_eq!(
        tls_cli(d, &px, &ca, &["SET", "front-tls", "secret"]),
        (true, "OK\n".to_string())
    );
    assert_eq!(
        tls_cli(d, &px, &ca, &["GET", "front-tls"]),
        (true, "secret\n".to_string())
    );

    // Plaintext on the TLS listener: the handshake fails and the connection is closed
    // without a RESP reply.
    let failures = px.metric("tierproxy_tls_handshake_failures_total");
    let got = plaintext_exchange(&px.addr(), b"PING\r\n");
    assert!(
        !s(got.clone()).contains("PONG") && !got.starts_with(b"+") && !got.starts_with(b"-"),
        "a plaintext client got a RESP reply: {:?}",
        s(got)
    );
    assert!(support::eventually(Duration::from_secs(5), || {
        px.metric("tierproxy_tls_handshake_failures_total") > failures
    }));

    // A client that does not trust the proxy's CA refuses it.
    let (ok, out) = tls_cli(d, &px, &["--cacert", "other-ca.crt"], &["PING"]);
    assert!(
        !ok || !out.contains("PONG"),
        "untrusted proxy accepted: {out}"
    );
}

/// `--tls-ca-cert`: clients must present a certificate signed by that CA. Without one,
/// or with one from another CA, they get nothing; `auth_clients = "optional"` lets
/// certificate-less clients in but still refuses a bad certificate.
#[test]
fn client_certificates_are_verified_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, "front", "IP:127.0.0.1");
    leaf(d, "front-ca", "app", "DNS:app.example");
    certs(d, "rogue", "DNS:rogue.example");
    let ca_path = d.join("front-ca.crt").to_string_lossy().into_owned();
    let px = tls_proxy(d, &["--tls-ca-cert", &ca_path]);

    let ca = ["--cacert", "front-ca.crt"];
    let with_cert = [
        "--cacert",
        "front-ca.crt",
        "--cert",
        "app.crt",
        "--key",
        "app.key",
    ];
    assert_eq!(
        tls_cli(d, &px, &with_cert, &["PING"]),
        (true, "PONG\n".to_string())
    );
    let (_, out) = tls_cli(d, &px, &ca, &["PING"]);
    assert!(
        !out.contains("PONG"),
        "a client without a certificate got in: {out}"
    );
    let rogue = [
        "--cacert",
        "front-ca.crt",
        "--cert",
        "rogue.crt",
        "--key",
        "rogue.key",
    ];
    let (_, out) = tls_cli(d, &px, &rogue, &["PING"]);
    assert!(
        !out.contains("PONG"),
        "a certificate from another CA got in: {out}"
    );
    drop(px);

    let cfg = config_file(&format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nauth_clients = \"optional\"\n",
        d.join("front.crt").to_string_lossy(),
        d.join("front.key").to_string_lossy(),
        ca_path,
    ));
    let optional = Proxy::start_unready(
        &[support::shared_standalone().addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    assert!(support::eventually(Duration::from_secs(20), || {
        optional.admin_get("/readyz").0 == 200
    }));
    assert_eq!(
        tls_cli(d, &optional, &ca, &["PING"]),
        (true, "PONG\n".to_string())
    );
    assert_eq!(
        tls_cli(d, &optional, &with_cert, &["PING"]),
        (true, "PONG\n".to_string())
    );
    let (_, out) = tls_cli(d, &optional, &rogue, &["PING"]);
    assert!(
        !out.contains("PONG"),
        "optional mode accepted a bad certificate: {out}"
    );
}

/// A client that opens a TCP connection to the TLS listener and says nothing is closed
/// after `tls.handshake_timeout_ms`, and does not hold up anyone else.
#[test]
fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, "front", "IP:127.0.0.1");
    let cfg = config_file(&format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nhandshake_timeout_ms = 500\n",
        d.join("front.crt").to_string_lossy(),
        d.join("front.key").to_string_lossy(),
    ));
    let px = Proxy::start_unready(
        &[support::shared_standalone().addr()],
        &["--config", cfg.path().to_str().unwrap()],
        &[],
    );
    assert!(support::eventually(Duration::from_secs(20), || {
        px.admin_get("/readyz").0 == 200
    }));
    let silent = std::thread::spawn({
        let addr = px.addr();
        move || plaintext_exchange(&addr, b"")
    });
    assert_eq!(
        tls_cli(d, &px, &["--cacert", "front-ca.crt"], &["PING"]),
        (true, "PONG\n".to_string())
    );
    assert!(silent.join().unwrap().is_empty());
}

/// Sends `bytes` on a plain TCP connection and returns what comes back before the
/// proxy closes it; fails if it stays open for 10 s.
fn plaintext_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let (got, closed) = support::exchange(addr, bytes, Duration::from_secs(10));
    assert!(
        closed,
        "the proxy kept a plaintext connection open: {got:?}"
    );
    got
}
