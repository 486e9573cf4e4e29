//! aw-http: the HTTP client of the bench's gateway section, run inside an agent (the gateway
//! answers only its agents' sockets). HTTP/1.1 with keep-alive (hyper), over TLS (rustls)
//! for an `https://` URL, trusting only `--ca FILE`. Every answer must be 200: anything else
//! is counted as an error and the bench fails on it, so a number never measures refusals.
//!
//! A URL or token written `$NAME...` starts with the value of environment variable NAME (the
//! agent's `AGENTWATCH_API_<SCOPE>_URL` / `_TOKEN`, which `launch` sets).
//!
//! - `latency URL N`: N GETs one after another on one connection; prints each call's time.
//! - `throughput URL CONNS SECONDS`: CONNS connections each calling in a loop for SECONDS;
//!   prints the calls completed.
//! - `ttfb URL N`: N times a fresh connection (not timed), then one GET: the time from sending
//!   it to the first byte of the body (the URL should stream: `/stream?n=1`).
//! - `hold URL CONNS`: CONNS connections, one GET each, then held open; prints `held`. Each
//!   line on stdin is a wave: one more GET on every connection, its time printed. Ends at EOF.
//!
//! Options after the arguments: `--ca FILE`, `--token TOKEN` (sent as `Authorization: Bearer`).
//! One JSON line per result on stdout.

use std::{
    io::BufRead as _,
    net::SocketAddr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    tls: Option<tokio_rustls::TlsConnector>,
    token: Option<String>,
}

/// `$NAME rest` -> the value of NAME followed by rest.
fn expand(arg: &str) -> Result<String> {
    let Some(rest) = arg.strip_prefix('$') else {
        return Ok(arg.to_owned());
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let value =
        std::env::var(&rest[..end]).with_context(|| format!("${} is not set", &rest[..end]))?;
    Ok(format!("{value}{}", &rest[end..]))
}

impl Target {
    fn parse(url: &str, ca: Option<&str>, token: Option<String>) -> Result<Self> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        let host = uri.host().context("URL without a host")?.to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("URL must be http:// or https://: {url}"),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let ip: std::net::IpAddr = host
            .parse()
            .context("the bench's URLs name an IP address")?;
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let tls = if https {
            let ca = ca.context("an https:// URL needs --ca FILE")?;
            let pem = std::fs::read(ca).with_context(|| format!("reading {ca}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                roots.add(cert.context("a certificate in --ca")?)?;
            }
            // ring, as the gateway and the test upstream use.
            #[allow(deprecated)]
            let provider = rustls::crypto::ring::default_provider();
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            host: format!("{host}:{port}"),
            path,
            tls,
            token,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
                let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
                handshake(TokioIo::new(stream)).await
            }
            None => handshake(TokioIo::new(tcp)).await,
        }
    }

    fn request(&self) -> Result<Request<Empty<Bytes>>> {
        let mut r = Request::get(&self.path).header(hyper::header::HOST, &self.host);
        if let Some(t) = &self.token {
            r = r.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        Ok(r.body(Empty::new())?)
    }

    /// One GET, its body read to the end; Err unless 200.
    async fn call(&self, send: &mut SendRequest<Empty<Bytes>>) -> Result<()> {
        send.ready().await?;
        let resp = send.send_request(self.request()?).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != hyper::StatusCode::OK {
            bail!(
                "{status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        Ok(())
    }
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Empty<Bytes>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn latency(t: &Target, n: usize) -> Result<()> {
    let mut send = t.connect().await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        t.call(&mut send).await?;
        samples.push(start.elapsed().as_nanos() as u64);
    }
    println!("{}", json!({"latency_ns": samples}));
    Ok(())
}

async fn throughput(t: Arc<Target>, conns: usize, seconds: f64) -> Result<()> {
    let mut sends = Vec::with_capacity(conns);
    for _ in 0..conns {
        sends.push(t.connect().await?);
    }
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut send in sends {
        let t = Arc::clone(&t);
        tasks.spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < until {
                t.call(&mut send).await?;
                calls += 1;
            }
            anyhow::Ok(calls)
        });
    }
    let mut calls = 0;
    while let Some(r) = tasks.join_next().await {
        calls += r??;
    }
    let took = start.elapsed().as_secs_f64();
    println!("{}", json!({"calls": calls, "seconds": took}));
    Ok(())
}

async fn ttfb(t: &Target, n: usize) -> Result<()> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let mut send = t.connect().await?;
        send.ready().await?;
        let start = Instant::now();
        let resp = send.send_request(t.request()?).await?;
        if resp.status() != hyper::StatusCode::OK {
            bail!("{}", resp.status());
        }
        let mut body = resp.into_body();
        loop {
            let frame = body
                .frame()
                .await
                .context("the stream ended before a byte")??;
            if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                break;
            }
        }
        samples.push(start.elapsed().as_nanos() as u64);
        // Dropped: the rest of the stream is not waited for.
    }
    println!("{}", json!({"ttfb_ns": samples}));
    Ok(())
}

async fn hold(t: Arc<Target>, conns: usize) -> Result<()> {
    let mut sends = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut send = t.connect().await?;
        t.call(&mut send).await?;
        sends.push(send);
    }
    println!("{}", json!({"held": sends.len()}));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() || tx.blocking_send(()).is_err() {
                return;
            }
        }
    });
    while rx.recv().await.is_some() {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for mut send in sends.drain(..) {
            let t = Arc::clone(&t);
            tasks.spawn(async move {
                t.call(&mut send).await?;
                anyhow::Ok(send)
            });
        }
        while let Some(r) = tasks.join_next().await {
            sends.push(r??);
        }
        println!(
            "{}",
            json!({"wave_ns": start.elapsed().as_nanos() as u64, "calls": sends.len()})
        );
    }
    Ok(())
}

fn run() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut option = |name: &str| -> Result<Option<String>> {
        match args.iter().position(|a| a == name) {
            Some(i) if i + 1 < args.len() => {
                let v = args.remove(i + 1);
                args.remove(i);
                Ok(Some(v))
            }
            Some(_) => bail!("{name} needs a value"),
            None => Ok(None),
        }
    };
    let ca = option("--ca")?;
    let token = option("--token")?.map(|t| expand(&t)).transpose()?;
    let [mode, url, rest @ ..] = args.as_slice() else {
        bail!("usage: aw-http latency|throughput|ttfb|hold URL ... [--ca FILE] [--token T]");
    };
    let t = Arc::new(Target::parse(&expand(url)?, ca.as_deref(), token)?);
    let count = |i: usize| -> Result<usize> {
        rest.get(i)
            .context("a count is missing")?
            .parse()
            .context("a count must be a number")
    };
    // One thread: the same client load against every target compared.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match mode.as_str() {
            "latency" => latency(&t, count(0)?).await,
            "throughput" => {
                let seconds: f64 = rest
                    .get(1)
                    .context("throughput URL CONNS SECONDS")?
                    .parse()
                    .context("SECONDS")?;
                throughput(Arc::clone(&t), count(0)?, seconds).await
            }
            "ttfb" => ttfb(&t, count(0)?).await,
            "hold" => {
                // A thousand connections need more descriptors than the usual soft limit.
                agentwatch::daemon::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
                hold(Arc::clone(&t), count(0)?).await
            }
            other => bail!("unknown mode {other}"),
        }
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aw-http: {e:#}");
            ExitCode::FAILURE
        }
    }
}
