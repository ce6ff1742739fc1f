//! Admin HTTP listener: `/healthz` (the process is alive) and `/readyz` (the upstream
//! topology is known and the proxy is not draining). A deliberately tiny HTTP/1.1
//! responder: probes send one small GET and close.

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
            let (status, body) = route(&px, path);
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, sock.write_all(resp.as_bytes())).await;
        });
    }
}

fn route(px: &Proxy, path: &str) -> (&'static str, String) {
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
                ("503 Service Unavailable", "draining\n".into())
            } else if px.upstream.topology().is_ok() {
                ("200 OK", "ready\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    format!("upstream not ready: {}\n", px.upstream.last_error()),
                )
            }
        }
        _ => ("404 Not Found", "not found\n".into()),
    }
}
