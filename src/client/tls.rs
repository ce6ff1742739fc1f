//! TLS on the client listener (`tls.cert_file` / `--tls-cert`): rustls, the same
//! aws-lc-rs build as the upstream side. With `tls.client_ca_file` clients must present a
//! certificate that chains to it (or may, with `auth_clients = "optional"`). A plaintext
//! client fails the handshake and is closed without a reply. SIGHUP re-reads the files,
//! so certificates are rotated without a restart.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

pub struct FrontTls {
    acceptor: RwLock<TlsAcceptor>,
    handshake_timeout: Duration,
}

impl FrontTls {
    pub fn new(cfg: &TlsConfig) -> Result<FrontTls, String> {
        Ok(FrontTls {
            acceptor: RwLock::new(acceptor(cfg)?),
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
        })
    }

    /// Re-reads the certificate, key and client CA (SIGHUP). On error the running ones
    /// stay.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), String> {
        let fresh = acceptor(cfg)?;
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The server side of the handshake, bounded by `tls.handshake_timeout_ms`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let acceptor = self
            .acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

fn certs(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key} {path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{key} {path}: no certificates"));
    }
    Ok(certs)
}

fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, String> {
    let chain = certs("tls.cert_file", &cfg.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| format!("tls.key_file {}: {e}", cfg.key_file))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if cfg.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs("tls.client_ca_file", &cfg.client_ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("tls.client_ca_file {}: {e}", cfg.client_ca_file))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = match cfg.auth_clients.as_str() {
            "optional" => verifier.allow_unauthenticated(),
            _ => verifier,
        };
        builder.with_client_cert_verifier(
            verifier
                .build()
                .map_err(|e| format!("tls.client_ca_file {}: {e}", cfg.client_ca_file))?,
        )
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_bad_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let junk = junk.to_str().unwrap().to_string();
        let cfg = TlsConfig {
            cert_file: junk.clone(),
            key_file: junk.clone(),
            ..TlsConfig::default()
        };
        let e = FrontTls::new(&cfg).err().unwrap();
        assert!(e.starts_with("tls.cert_file"), "{e}");
        let cfg = TlsConfig {
            cert_file: "/nonexistent/cert.pem".into(),
            ..cfg
        };
        let e = FrontTls::new(&cfg).err().unwrap();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    }
}
