//! Server-assisted client-side caching: one invalidation connection per upstream node.
//!
//! The node's data connections turn tracking on with `REDIRECT <id of this connection>`,
//! so every key any of them reads is tracked by Redis, and a write to it from anywhere
//! (another proxy, a direct client, expiry, eviction) sends the key here as a message on
//! `__redis__:invalidate`; a null message means "everything" (FLUSHALL/FLUSHDB).
//!
//! If this connection closes, invalidations for the node's keys are lost from then on:
//! L1 is flushed and the caller recycles the node's data connections so that they
//! redirect to the replacement.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;

use super::L1;
use crate::error::UpstreamError;
use crate::parse::reply::{as_str, elements, frame_len, is_null};
use crate::respond::{command_bytes, Proto};
use crate::upstream::conn::{dial, handshake, read_one, Handshake, UpRead};

pub struct Invalidator {
    pub id: i64,
    alive: Arc<AtomicBool>,
    task: AbortHandle,
}

impl Invalidator {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

impl Drop for Invalidator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens the invalidation connection and subscribes; `on_lost` runs (after an L1 flush)
/// if it ever closes.
pub async fn start(
    addr: &str,
    hs: &Handshake,
    timeout: Duration,
    l1: Arc<L1>,
    on_lost: impl Fn() + Send + Sync + 'static,
) -> Result<Invalidator, UpstreamError> {
    let ms = timeout.as_millis() as u64;
    let (mut rd, mut wr) = dial(addr, timeout, hs).await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let hs = Handshake {
        client_name: hs
            .client_name
            .as_ref()
            .map(|n| format!("{n}-invalidations")),
        ..hs.clone()
    };
    let id = tokio::time::timeout(timeout, async {
        handshake(&mut rd, &mut wr, &mut buf, Proto::Resp2, &hs, Vec::new()).await?;
        let mut out = BytesMut::new();
        out.extend_from_slice(&command_bytes(&["CLIENT", "ID"]));
        // Data connections will ask for `CLIENT TRACKING on REDIRECT <id>`: make sure
        // this user may (ACLs, Redis before 6) before any of them depends on it. Turning
        // tracking off here changes nothing.
        out.extend_from_slice(&command_bytes(&["CLIENT", "TRACKING", "off"]));
        let mut sub: Vec<&[u8]> = vec![b"SUBSCRIBE", b"__redis__:invalidate"];
        if let Some(ch) = &l1.event_channel {
            sub.push(ch);
        }
        let confirmations = sub.len() - 1;
        out.extend_from_slice(&command_bytes(&sub));
        wr.write_all(&out)
            .await
            .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
        let id = read_one(&mut rd, &mut buf).await?;
        let id = crate::parse::reply::as_int(&id)
            .ok_or_else(|| UpstreamError::Handshake("CLIENT ID: unexpected reply".into()))?;
        let probe = read_one(&mut rd, &mut buf).await?;
        if let Some(err) = crate::parse::reply::error_text(&probe) {
            return Err(UpstreamError::Handshake(format!("CLIENT TRACKING: {err}")));
        }
        for _ in 0..confirmations {
            let sub = read_one(&mut rd, &mut buf).await?;
            if crate::parse::reply::is_error(&sub) {
                return Err(UpstreamError::Handshake(format!(
                    "SUBSCRIBE: {}",
                    String::from_utf8_lossy(&sub)
                )));
            }
        }
        Ok(id)
    })
    .await
    .map_err(|_| UpstreamError::Handshake(format!("no reply within {ms} ms")))??;

    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    let node = Arc::<str>::from(addr);
    let task = tokio::spawn(async move {
        // The write half stays open for as long as we listen.
        let _wr = wr;
        let why = listen(&mut rd, &mut buf, &l1).await;
        flag.store(false, Ordering::Release);
        tracing::warn!(upstream = %node, reason = %why, "invalidation connection lost; flushing L1");
        l1.flush_unsure("invalidation connection lost");
        on_lost();
    });
    Ok(Invalidator {
        id,
        alive,
        task: task.abort_handle(),
    })
}

async fn listen(rd: &mut UpRead, buf: &mut BytesMut, l1: &L1) -> String {
    loop {
        loop {
            let n = match frame_len(buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return format!("bad frame: {}", e.0),
            };
            // Read where it lies: a write-heavy mix sends one message per write.
            apply(&buf[..n], l1);
            buf.advance(n);
        }
        buf.reserve(16 * 1024);
        match rd.read_buf(buf).await {
            Ok(0) => return "closed by the server".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// `["message", "__redis__:invalidate", [key…] | nil]`, or
/// `["message", <event channel>, key]`; anything else (subscription confirmations) is
/// ignored.
fn apply(frame: &[u8], l1: &L1) {
    let Some(mut parts) = elements(frame) else {
        return;
    };
    if parts.next().and_then(as_str) != Some(&b"message"[..]) {
        return;
    }
    let (Some(channel), Some(body)) = (parts.next().and_then(as_str), parts.next()) else {
        return;
    };
    if l1.event_channel.as_deref() == Some(channel) {
        if let Some(key) = as_str(body) {
            l1.invalidate(key);
        }
        return;
    }
    match elements(body) {
        Some(keys) => {
            for k in keys.filter_map(as_str) {
                l1.invalidate(k);
            }
        }
        None if is_null(body) => l1.flush("FLUSHALL/FLUSHDB on the upstream"),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::L1Config;

    #[test]
    fn invalidation_messages_drop_keys_flush_or_are_ignored() {
        let l1 = L1::new(&L1Config::default());
        let st = |l1: &L1| {
            (
                l1.stats.invalidations.load(Ordering::Relaxed),
                l1.stats.flushes.load(Ordering::Relaxed),
            )
        };
        apply(
            b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n",
            &l1,
        );
        assert_eq!(st(&l1), (2, 0));
        // FLUSHALL / FLUSHDB: a null instead of keys.
        apply(
            b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*-1\r\n",
            &l1,
        );
        assert_eq!(st(&l1), (2, 1));
        // The event channel names one key.
        apply(
            b"*3\r\n$7\r\nmessage\r\n$16\r\ncache:invalidate\r\n$1\r\nk\r\n",
            &l1,
        );
        assert_eq!(st(&l1), (3, 1));
        // Subscription confirmations and anything else change nothing.
        apply(
            b"*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n",
            &l1,
        );
        apply(b"+OK\r\n", &l1);
        assert_eq!(st(&l1), (3, 1));
    }
}
