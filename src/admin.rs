//! Admin HTTP listener: `/healthz` (the process is alive), `/readyz` (not draining, the
//! upstream topology is known, and at least one master answers PING now), `/metrics`.
//! A deliberately tiny HTTP/1.1 responder: probes send one small GET and close.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Proxy;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(px: Arc<Proxy>, listener: TcpListener) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let px = px.clone();
        tokio::spawn(async move {
            // The request line may arrive in pieces: read until the end of the head
            // (or 8 KiB, or the timeout).
            let mut buf = Vec::with_capacity(1024);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            if tokio::time::timeout(REQUEST_TIMEOUT, read_head)
                .await
                .is_err()
            {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = route(&px, path).await;
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, sock.write_all(resp.as_bytes())).await;
        });
    }
}

async fn route(px: &Proxy, path: &str) -> (&'static str, String) {
    match path {
        "/healthz" => ("200 OK", "ok\n".into()),
        "/metrics" => match &px.prometheus {
            Some(h) => ("200 OK", crate::metrics::render(px, h)),
            None => (
                "503 Service Unavailable",
                "metrics recorder unavailable\n".into(),
            ),
        },
        "/readyz" => {
            if px.draining.load(Ordering::Acquire) {
                return ("503 Service Unavailable", "draining\n".into());
            }
            if px.warming.load(Ordering::Acquire) {
                return (
                    "503 Service Unavailable",
                    "warming L1 (l1.warm_before_ready)\n".into(),
                );
            }
            match upstream_answers(px).await {
                Ok(()) => ("200 OK", "ready\n".into()),
                Err(why) => (
                    "503 Service Unavailable",
                    format!("upstream not ready: {why}\n"),
                ),
            }
        }
        _ => ("404 Not Found", "not found\n".into()),
    }
}

/// Whether the upstream can serve now: the topology is known and some master answers
/// PING within the probe timeout. One master is enough: with a shard down, this proxy
/// still serves every other shard, and taking the whole fleet out of the load balancer
/// would turn a partial outage into a full one.
async fn upstream_answers(px: &Proxy) -> Result<(), String> {
    let topo = px.upstream.topology().map_err(|e| e.to_string())?;
    let wait = Duration::from_millis(px.cfg.upstream.connect_timeout_ms.clamp(200, 2_000));
    let ping = bytes::Bytes::from_static(b"*1\r\n$4\r\nPING\r\n");
    let mut probes = tokio::task::JoinSet::new();
    for node in &topo.masters {
        let up = px.upstream.clone();
        let (node, ping) = (node.clone(), ping.clone());
        probes.spawn(async move {
            let target = crate::upstream::Target::Node(node);
            tokio::time::timeout(wait, up.call(target, ping, crate::respond::Proto::Resp2, 0)).await
        });
    }
    let mut last = String::from("no masters");
    while let Some(done) = probes.join_next().await {
        match done {
            Ok(Ok(Ok(reply))) if reply.starts_with(b"+PONG") => return Ok(()),
            Ok(Ok(Ok(reply))) => last = String::from_utf8_lossy(&reply).trim().to_string(),
            Ok(Ok(Err(e))) => last = e.to_string(),
            Ok(Err(_)) => last = format!("no PING reply within {} ms", wait.as_millis()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}
