//! The HTTP(S) client cachegate uses outside the proxy path (hyper-util + rustls): JWKS and
//! OpenID discovery fetches, the OTLP span exporter and `cachegate init --openapi URL`. The
//! proxy path has its own pool (`upstream::pool`) and takes only the TLS settings from here.

use crate::tls::{self, TlsError};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpsClient<B> = Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// A pooled HTTP/1.1 client for `http://` and `https://` URLs; `https://` servers are verified
/// against the PEM certificates in `ca_file`, or the system roots without it.
pub fn client<B>(ca_file: Option<&str>) -> Result<HttpsClient<B>, TlsError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca_file)?)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The TLS settings of every client: the PEM certificates in `ca_file` as roots, or the
/// system's.
pub fn tls_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in tls::certificates(path)? {
                roots.add(cert).map_err(|source| TlsError::Certificate {
                    path: path.to_owned(),
                    source,
                })?;
            }
        }
        None => {
            // Unreadable system certificates are skipped; an https fetch then fails
            // with a TLS error that says so.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
