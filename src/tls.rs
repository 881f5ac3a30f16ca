//! TLS material from PEM files — certificates and private keys — for the listeners (server side)
//! and for every client the gateway makes (origins, JWKS, OTLP), with errors that name the file
//! and what is wrong with it.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up; each names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path:?}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path:?} is not valid PEM: {source}")]
    Pem {
        path: String,
        source: std::io::Error,
    },
    #[error("{path:?} holds no certificate")]
    NoCertificate { path: String },
    #[error("{path:?} holds no private key")]
    NoKey { path: String },
    #[error("{path:?} holds an unusable certificate: {source}")]
    Certificate { path: String, source: rustls::Error },
    #[error("the certificate and key in {cert:?} / {key:?} do not work together: {source}")]
    Mismatch {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("TLS cannot be set up: {0}")]
    Setup(#[from] rustls::Error),
}

fn read(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates in a PEM file (none is not an error here: a CA file may add none).
pub fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut read(path)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })
}

/// The first private key in a PEM file.
pub fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut read(path)?.as_slice())
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

/// The crypto provider every TLS configuration of the gateway uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
