//! Socket options tokio does not expose.

use std::time::Duration;

use tokio::net::TcpStream;

/// TCP keepalive after `idle_secs` without traffic (0 = leave it off), then a probe every
/// third of that, and the connection is dropped after three unanswered probes: Redis's
/// `tcp-keepalive` settings. A peer that vanished without a FIN or RST is then noticed.
pub fn set_keepalive(stream: &TcpStream, idle_secs: u64) {
    if idle_secs == 0 {
        return;
    }
    let idle = Duration::from_secs(idle_secs);
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}
