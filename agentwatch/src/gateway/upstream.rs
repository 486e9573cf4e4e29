//! The client a scope's allowed calls go upstream with: HTTPS only (rustls), verified against
//! the host's roots or the scope's `ca_file`, HTTP/2 where the upstream offers it (ALPN) and
//! HTTP/1.1 otherwise. It follows no redirect: a 3xx goes back to the agent as it came, so the
//! injected credential never follows a `Location` to another host.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};

/// A request body as forwarded (the agent's, streamed).
pub type Body = BoxBody<Bytes, hyper::Error>;

/// One scope's upstream client.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Why a scope's client could not be built (its reload is refused).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("the host's certificate roots: {0}")]
    Roots(String),
    #[error("TLS settings: {0}")]
    Config(String),
}

/// The host's roots, read once per reload (the system's CA bundle, as other programs use it).
pub fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(TlsError::Roots(why));
    }
    Ok(Arc::new(roots))
}

/// The roots in the PEM file at `path`.
pub fn roots_from(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    let err = |message: String| TlsError::CaFile {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("holds no certificate".to_owned()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// A client that trusts `roots` only.
pub fn client(roots: Arc<RootCertStore>) -> Result<UpstreamClient, TlsError> {
    // ring, not aws-lc-rs: aws-lc needs cmake and a C build this project's setup does not
    // have. rustls 0.23.48 deprecates ring's provider for lacking post-quantum key exchange
    // (X25519MLKEM768): a known limit, in README "Credentials"; moving means aws-lc-rs here
    // and cmake in `cargo xtask setup`.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let tls = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // No Nagle towards the upstream either: a request's headers and body, or HTTP/2's frames,
    // leave as written (see the listener's side in serve.rs).
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}
