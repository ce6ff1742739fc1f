//! The Dockerfile's essentials, checked as text (CI has no container engine): a
//! multi-stage build, a slim runtime image, a non-root user, the ports, a health check
//! against /healthz, and a config the image can actually load.

use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap()
}

fn instructions(df: &str) -> Vec<(String, String)> {
    df.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(i, rest)| (i.to_ascii_uppercase(), rest.to_string()))
        .collect()
}

#[test]
fn dockerfile_has_the_essentials() {
    let df = dockerfile();
    let ins = instructions(&df);
    let froms: Vec<&String> = ins
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert!(froms.len() >= 2, "multi-stage build expected: {froms:?}");
    assert!(
        froms.last().unwrap().contains("slim"),
        "slim runtime image: {froms:?}"
    );
    assert!(
        ins.iter()
            .any(|(i, r)| i == "COPY" && r.starts_with("--from=")),
        "the runtime stage copies the binary from the build stage"
    );
    let user = ins
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, r)| r.trim().to_string());
    assert!(
        user.as_deref().is_some_and(|u| u != "root" && u != "0"),
        "non-root USER: {user:?}"
    );
    let exposed: Vec<&String> = ins
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .map(|(_, r)| r)
        .collect();
    assert!(
        exposed.iter().any(|r| r.contains("6380")),
        "EXPOSE 6380: {exposed:?}"
    );
    assert!(
        exposed.iter().any(|r| r.contains("9121")),
        "EXPOSE 9121: {exposed:?}"
    );
    assert!(
        df.contains("HEALTHCHECK") && df.contains("/healthz"),
        "HEALTHCHECK against /healthz"
    );
    assert!(df.contains("ENTRYPOINT") && df.contains("/usr/local/bin/tierproxy"));
}

#[test]
fn the_config_baked_into_the_image_is_valid() {
    // The image copies conf/tierproxy.example.toml and listens on 0.0.0.0 via env.
    let df = dockerfile();
    assert!(
        df.contains("conf/tierproxy.example.toml"),
        "the image ships the example config"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tierproxy"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tierproxy.example.toml"),
            "--check-config",
        ])
        .env("TIERPROXY_LISTEN", "0.0.0.0:6380")
        .env("TIERPROXY_ADMIN_LISTEN", "0.0.0.0:9121")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
