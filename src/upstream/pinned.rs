//! Connections pinned to one client at a time: WATCH…EXEC, blocking commands, WAIT.
//!
//! They come from a bounded pool per node and protocol, never from a new TCP connection
//! per use: at most `pinned_max_per_node` are out at once, and up to
//! `pinned_idle_per_node` released ones stay open for the next client. A connection goes
//! back only when it carries no state: one released in the middle of a request (the
//! client went away while blocked) is closed, and one with keys still WATCHed is reset
//! with UNWATCH first.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::{ConnOpts, PipeConn, ReplyRx};
use super::{Node, Upstream};
use crate::error::{Error, UpstreamError};
use crate::respond::{command_bytes, Proto};

/// A node's pinned connections: the permits, and the idle ones per protocol. Holds
/// that may last indefinitely (blocking commands, WATCH) and short ones (EXEC, a spill
/// read-modify-write) have separate permits, so a thousand blocked queue workers never
/// leave transactions without a connection.
pub(crate) struct PinnedPool {
    permits: Arc<Semaphore>,
    short_permits: Arc<Semaphore>,
    idle: [Mutex<Vec<PipeConn>>; 2],
    max_idle: usize,
}

impl PinnedPool {
    pub(crate) fn new(max: usize, max_idle: usize) -> PinnedPool {
        PinnedPool {
            permits: Arc::new(Semaphore::new(max)),
            short_permits: Arc::new(Semaphore::new(max)),
            idle: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
            max_idle,
        }
    }

    fn idle(&self, proto: Proto) -> std::sync::MutexGuard<'_, Vec<PipeConn>> {
        self.idle[(proto == Proto::Resp3) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn put_back(&self, proto: Proto, conn: PipeConn) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle(proto);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// (pinned out now, idle and open) for INFO and metrics.
    pub(crate) fn counts(&self, max: usize) -> (usize, usize) {
        let idle = self.idle[0].lock().map(|v| v.len()).unwrap_or(0)
            + self.idle[1].lock().map(|v| v.len()).unwrap_or(0);
        let in_use =
            2 * max - self.permits.available_permits() - self.short_permits.available_permits();
        (in_use, idle)
    }
}

/// One pinned connection, the client's until dropped.
pub struct Pinned {
    conn: Option<PipeConn>,
    pub node: Arc<Node>,
    proto: Proto,
    timeout: Duration,
    /// Keys are WATCHed on it: UNWATCH before anyone else may use it.
    pub watching: bool,
    /// A request is out and its reply not read: the connection cannot be reused.
    busy: bool,
    permit: Option<OwnedSemaphorePermit>,
}

impl Upstream {
    /// A connection to `node` for one client's exclusive use: an idle pooled one, or a
    /// new one while the node's limit allows; waits up to the connect timeout for one.
    /// `long`: it may be held indefinitely (a blocking command, a WATCH).
    pub async fn pinned(
        &self,
        node: &Arc<Node>,
        proto: Proto,
        long: bool,
    ) -> Result<Pinned, Error> {
        let s = &self.settings;
        let err = |source| Error::Upstream {
            addr: node.addr.to_string(),
            source,
        };
        let permits = if long {
            &node.pinned.permits
        } else {
            &node.pinned.short_permits
        };
        let permit = tokio::time::timeout(s.connect_timeout, permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::proxy(format!(
                    "all {} {} pinned connections to {} are in use (upstream.pinned_max_per_node)",
                    s.pinned_max,
                    if long { "long-held" } else { "short" },
                    node.addr
                ))
            })?
            .map_err(|_| err(UpstreamError::ConnectionLost))?;
        let reused = {
            let mut idle = node.pinned.idle(proto);
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let conn = match reused {
            Some(c) => c,
            None => PipeConn::connect(
                &node.addr,
                proto,
                &s.handshake,
                s.connect_timeout,
                ConnOpts::default(),
            )
            .await
            .map_err(err)?,
        };
        crate::metrics::PINNED_ACQUIRED.fetch_add(1, Ordering::Relaxed);
        Ok(Pinned {
            conn: Some(conn),
            node: node.clone(),
            proto,
            timeout: s.request_timeout,
            watching: false,
            busy: false,
            permit: Some(permit),
        })
    }
}

impl Pinned {
    fn err(&self, source: UpstreamError) -> Error {
        Error::Upstream {
            addr: self.node.addr.to_string(),
            source,
        }
    }

    /// Queues one request (pipelining several is allowed); read with [`Pinned::reply`].
    pub fn send(&mut self, data: Bytes) -> Result<ReplyRx, Error> {
        let conn = self
            .conn
            .as_ref()
            .ok_or(UpstreamError::ConnectionLost)
            .map_err(|e| self.err(e))?;
        let rx = conn.send(data, 0).map_err(|e| self.err(e))?;
        self.busy = true;
        Ok(rx)
    }

    /// Waits for a reply, within `limit` (`None`: the request timeout; `Some(None)`:
    /// no limit, for commands that block by design). A timeout or loss closes the
    /// connection: its state is unknown.
    pub async fn reply(
        &mut self,
        rx: ReplyRx,
        limit: Option<Option<Duration>>,
    ) -> Result<Bytes, Error> {
        let limit = limit.unwrap_or(Some(self.timeout));
        let r = match limit {
            Some(d) => match tokio::time::timeout(d, rx).await {
                Ok(r) => r,
                Err(_) => {
                    self.poison();
                    return Err(self.err(UpstreamError::Timeout(d.as_millis() as u64)));
                }
            },
            None => rx.await,
        };
        match r {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                self.poison();
                Err(self.err(e))
            }
            Err(_) => {
                self.poison();
                Err(self.err(UpstreamError::ConnectionLost))
            }
        }
    }

    /// Marks every request sent so far as answered (the caller read all the replies).
    pub fn idle(&mut self) {
        self.busy = false;
    }

    /// One request, one reply, within the request timeout.
    pub async fn call(&mut self, data: Bytes) -> Result<Bytes, Error> {
        let rx = self.send(data)?;
        let r = self.reply(rx, None).await;
        if r.is_ok() {
            self.busy = false;
        }
        r
    }

    /// Several requests in one write, their replies in order, within the request timeout.
    pub async fn pipeline(&mut self, cmds: Vec<Bytes>) -> Result<Vec<Bytes>, Error> {
        let mut rxs = Vec::with_capacity(cmds.len());
        for c in cmds {
            rxs.push(self.send(c)?);
        }
        let mut out = Vec::with_capacity(rxs.len());
        for rx in rxs {
            out.push(self.reply(rx, None).await?);
        }
        self.busy = false;
        Ok(out)
    }

    /// Closes the connection instead of returning it to the pool.
    pub fn poison(&mut self) {
        self.conn = None;
    }

    pub fn is_alive(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.is_closed())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.busy || conn.is_closed() {
            // Abandoned mid-request (e.g. a client left while blocked): its reply would
            // reach the next user. Closing it is the only clean way out.
            crate::metrics::PINNED_CLOSED_DIRTY.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let node = self.node.clone();
        let proto = self.proto;
        if !self.watching {
            node.pinned.put_back(proto, conn);
            return;
        }
        // Watched keys must not follow the connection to its next client.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let timeout = self.timeout;
        // The permit stays taken until the connection is clean or closed.
        let permit = self.permit.take();
        rt.spawn(async move {
            let _permit = permit;
            let Ok(rx) = conn.send(command_bytes(&["UNWATCH"]), 0) else {
                return;
            };
            if let Ok(Ok(Ok(r))) = tokio::time::timeout(timeout, rx).await {
                if &r[..] == b"+OK\r\n" {
                    node.pinned.put_back(proto, conn);
                }
            }
        });
    }
}
