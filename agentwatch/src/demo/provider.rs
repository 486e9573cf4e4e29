//! The demo's stand-in for a model provider: a real HTTP server on loopback that answers every
//! request and counts them, so the narration can say how many calls got through.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};
use axum::{Router, routing::any};
use tokio::{net::TcpListener, task::JoinHandle};

/// A running provider; stops when dropped.
pub struct Provider {
    pub addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Provider {
    /// Serves on 127.0.0.1, on a port the kernel picks.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the demo model provider")?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&served);
        let app = Router::new().fallback(any(move || {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                "{\"completion\":\"ok\"}"
            }
        }));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("demo model provider stopped: {e}");
            }
        });
        Ok(Self { addr, served, task })
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The demo's stand-in for an API provider behind the gateway: HTTPS on loopback with a
/// certificate from a CA made for this run (the scope's `ca_file`), answering every request
/// as a chat completion, counting them and keeping the credential each one carried, so the
/// narration can show what reached the provider: the real key, never the agent's token.
pub struct ApiProvider {
    pub addr: SocketAddr,
    /// The CA's certificate (PEM).
    pub ca_pem: String,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl ApiProvider {
    /// Serves on 127.0.0.1, on a port the kernel picks.
    pub async fn start() -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate().context("the demo CA's key")?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "agentwatch demo CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().context("the demo provider's key")?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?
            .signed_by(&key, &issuer)?;
        let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("the demo provider's key: {e}"))?;
        // ring, as the gateway's client uses (see gateway/upstream.rs).
        #[allow(deprecated)]
        let crypto = rustls::crypto::ring::default_provider();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(crypto))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], private)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the demo API provider")?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let credential = req
                            .headers()
                            .get(hyper::header::AUTHORIZATION)
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .unwrap_or_default();
                        seen.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(credential);
                        async move {
                            let body = http_body_util::Full::new(bytes::Bytes::from_static(
                                b"{\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\
                                  \"message\":{\"role\":\"assistant\",\"content\":\"ok\"}}]}",
                            ));
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_pem: ca_cert.pem(),
            seen,
            task,
        })
    }

    /// The `Authorization` header of each request so far, in order.
    pub fn credentials(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for ApiProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}
