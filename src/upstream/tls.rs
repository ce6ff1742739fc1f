//! TLS to the upstream (`rediss://` seeds or `upstream.tls`): rustls with the system's
//! root certificates or `upstream.tls_ca_file`, SNI and hostname verification against the
//! node's address as the cluster reports it (hostnames in ElastiCache's CLUSTER SLOTS and
//! MOVED), or against `upstream.tls_server_name` when nodes are addressed by IP.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::UpstreamError;

/// The read and write halves of an upstream connection, plain or TLS.
pub type UpRead = Box<dyn AsyncRead + Send + Unpin>;
pub type UpWrite = Box<dyn AsyncWrite + Send + Unpin>;

pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    /// Verify every node against this name instead of its address.
    server_name: Option<String>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Trusts the certificates in `ca_file` (PEM), or the system's roots without one.
    pub fn new(ca_file: Option<&str>, server_name: Option<String>) -> Result<UpstreamTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("upstream.tls_ca_file {path}: {e}"))?;
                for cert in certs {
                    let cert = cert.map_err(|e| format!("upstream.tls_ca_file {path}: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("upstream.tls_ca_file {path}: {e}"))?;
                }
                if roots.is_empty() {
                    return Err(format!("upstream.tls_ca_file {path}: no certificates"));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(
                        "no system root certificates found; set upstream.tls_ca_file (REDIS_TLS_CA_FILE)"
                            .into(),
                    );
                }
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// TLS over `tcp` to `addr` (`host:port`), verified against the host (or the
    /// configured server name).
    pub async fn wrap(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<(UpRead, UpWrite), UpstreamError> {
        let host = match &self.server_name {
            Some(n) => n.clone(),
            None => host_of(addr).to_string(),
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|e| UpstreamError::Handshake(format!("TLS server name {host:?}: {e}")))?;
        let stream = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| UpstreamError::Handshake(format!("TLS: {e}")))?;
        let (rd, wr) = tokio::io::split(stream);
        Ok((Box::new(rd), Box::new(wr)))
    }
}

/// The host part of `host:port` / `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("cache.example.com:6379"), "cache.example.com");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
    }

    #[test]
    fn a_bad_ca_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate").unwrap();
        let e = UpstreamTls::new(p.to_str(), None).unwrap_err();
        assert!(e.contains("no certificates"), "{e}");
        let e = UpstreamTls::new(Some("/nonexistent/ca.pem"), None).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
