//! A real HTTPS server on loopback, with a CA of its own made for the test (rcgen), that
//! records every request that reaches it: the API "upstream" of the gateway tests.
//!
//! `GET|POST /stream[?n=N][&gap_ms=MS]` answers with N (default 3) server-sent events, one
//! every `STREAM_GAP` (or MS), then `[DONE]`, so a test can tell a streamed answer from a buffered one; how
//! each stream ended (events sent, completed or cut by the reader) is kept in `streams`.
//! `POST /v1/chat/completions` answers as OpenAI's API does (with `"stream": true`: one chunk
//! per word of [`CHAT_REPLY`], one every `STREAM_GAP`, then `[DONE]`), `POST /v1/messages` as
//! Anthropic's (not streamed), so the official SDKs can talk to it. Anything else gets 200 and
//! a small JSON body naming the path.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    /// Header names lower-cased, values as sent (every copy).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub version: String,
}

impl Recorded {
    /// Every value of header `name`.
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How one `/stream` answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    /// Events sent before it ended (`[DONE]` not counted).
    pub sent: usize,
    /// All sent and `[DONE]` too; false: the reader went away first.
    pub completed: bool,
}

type Streams = Arc<Mutex<Vec<StreamEnd>>>;

/// Time between the events of `/stream` and of a streamed chat completion.
pub const STREAM_GAP: Duration = Duration::from_millis(400);

/// What the chat completion and the message answer say (streamed: a word per chunk).
pub const CHAT_REPLY: &str = "hello from the upstream";

/// The server; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    /// The test CA's certificate (PEM), for the scope's `ca_file`.
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<Recorded>>>,
    streams: Streams,
    _dir: crate::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Starts it on 127.0.0.1, with a certificate for `127.0.0.1` and `localhost`.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// The same, keeping no record of the requests (`requests` stays empty): the bench
    /// sends hundreds of thousands.
    pub fn start_unrecorded() -> Self {
        Self::start_with(false)
    }

    fn start_with(record: bool) -> Self {
        let dir = crate::TempDir::new();
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agentwatch test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let ca_file = dir.0.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("ca.pem");
        let chain = vec![cert.der().clone()];
        let private =
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("private key");
        // ring, as the gateway uses (see agentwatch/src/gateway/upstream.rs).
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let seen2 = Arc::clone(&seen);
        let streams: Streams = Arc::default();
        let streams2 = Arc::clone(&streams);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        // As API servers do: a stream's first event leaves at once, not after
                        // the reader's delayed ACK of the headers.
                        let _ = tcp.set_nodelay(true);
                        let acceptor = acceptor.clone();
                        let seen = Arc::clone(&seen2);
                        let streams = Arc::clone(&streams2);
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(move |req| {
                                let seen = Arc::clone(&seen);
                                let streams = Arc::clone(&streams);
                                async move {
                                    Ok::<_, Infallible>(
                                        answer(req, record.then_some(seen), streams).await,
                                    )
                                }
                            });
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(tls), service)
                                    .await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            ca_file,
            seen,
            streams,
            _dir: dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// How the `/stream` answers so far ended.
    pub fn streams(&self) -> Vec<StreamEnd> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// What arrived so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<hyper::body::Incoming>,
    seen: Option<Arc<Mutex<Vec<Recorded>>>>,
    streams: Streams,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let asked: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Some(seen) = seen {
        seen.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Recorded {
                method: parts.method.to_string(),
                path_and_query: path.clone(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body,
                version: format!("{:?}", parts.version),
            });
    }
    match (parts.method.as_str(), parts.uri.path()) {
        ("POST", "/v1/chat/completions") if asked["stream"] == true => {
            let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
                let c = serde_json::json!({
                    "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                    "model": asked["model"], "choices": [
                        {"index": 0, "delta": delta, "finish_reason": finish}
                    ]
                });
                Bytes::from(format!("data: {c}\n\n"))
            };
            let mut events: Vec<Bytes> = CHAT_REPLY
                .split_inclusive(' ')
                .enumerate()
                .map(|(i, w)| {
                    let delta = if i == 0 {
                        serde_json::json!({"role": "assistant", "content": w})
                    } else {
                        serde_json::json!({"content": w})
                    };
                    chunk(delta, serde_json::Value::Null)
                })
                .collect();
            events.push(chunk(serde_json::json!({}), "stop".into()));
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            return sse(events, streams);
        }
        ("POST", "/v1/chat/completions") => {
            return json(serde_json::json!({
                "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                "model": asked["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": CHAT_REPLY}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
            }));
        }
        ("POST", "/v1/messages") => {
            return json(serde_json::json!({
                "id": "msg_test", "type": "message", "role": "assistant",
                "model": asked["model"],
                "content": [{"type": "text", "text": CHAT_REPLY}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 1, "output_tokens": 4}
            }));
        }
        _ => {}
    }
    if parts.uri.path() == "/stream" {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
        let param = |name: &str| {
            parts.uri.query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            })
        };
        let n = param("n").map_or(3, |n| n as usize);
        let gap = param("gap_ms").map_or(STREAM_GAP, Duration::from_millis);
        tokio::spawn(async move {
            let end = |sent, completed| {
                streams
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(StreamEnd { sent, completed });
            };
            for i in 0..n {
                let event = format!("data: {{\"n\":{i}}}\n\n");
                if tx.send_data(Bytes::from(event)).await.is_err() {
                    end(i, false);
                    return;
                }
                // The reader gone shows at the next send, one gap later.
                tokio::time::sleep(gap).await;
            }
            let done = tx.send_data(Bytes::from_static(b"data: [DONE]\n\n")).await;
            end(n, done.is_ok());
        });
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    let body = format!(
        "{{\"ok\":true,\"path\":{}}}",
        serde_json::Value::String(path)
    );
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON answer.
fn json(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A server-sent event stream of `events`, one every [`STREAM_GAP`] (the last, `[DONE]`,
/// right after the one before), its end recorded in `streams` like `/stream`'s.
fn sse(events: Vec<Bytes>, streams: Streams) -> Response<Body> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        let total = events.len().saturating_sub(1);
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 && i < total {
                tokio::time::sleep(STREAM_GAP).await;
            }
            if tx.send_data(e).await.is_err() {
                streams
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(StreamEnd {
                        sent: i,
                        completed: false,
                    });
                return;
            }
        }
        streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(StreamEnd {
                sent: total,
                completed: true,
            });
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    r
}
