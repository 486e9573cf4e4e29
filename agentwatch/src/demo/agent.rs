//! The demo's scripted agent (`agentwatch demo-agent ACTION ...`, hidden): what an AI agent's
//! process does, reported as one JSON line per attempt on stdout for the narrator to read.
//!
//! - `calls ADDR N`: N HTTP requests to the model provider at ADDR
//! - `connect ADDR`: one TCP connect (somewhere not on the allow-list)
//! - `raw`: one `socket(AF_INET, SOCK_RAW)`
//! - `pace ADDR MARK STEADY_SECS`: start 3 helper processes, call ADDR 5 times a second for
//!   STEADY_SECS, write the burst's start (CLOCK_MONOTONIC ns) to MARK, call as fast as it can
//!   for 2 s, then 3 times a second until killed. Pacing never makes up for lost time: a
//!   process that was frozen carries on at its rate, it does not burst to catch up.
//! - `sleep`: sleep until killed (a helper process)
//! - `api`: what an SDK does with `OPENAI_BASE_URL` and `OPENAI_API_KEY` (the gateway's URL and
//!   a phantom token): a chat completion, then a call outside the scope, over one connection
//! - `api-pace MARK STEADY_SECS`: over one keep-alive connection to the gateway, 5 chat
//!   completions a second for STEADY_SECS, the flood's start (CLOCK_MONOTONIC ns) to MARK,
//!   then as many as it can for 2 s or until 20 were refused; reports how they were answered

use std::{
    io::Write as _,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Runs one action; `--cgroup DIR` first moves this process into DIR (as root, with every
/// capability: the demo uses it to show that the kernel refuses even such a process).
pub fn run(args: &[String]) -> Result<()> {
    let mut args = args;
    if let [flag, dir, rest @ ..] = args
        && flag == "--cgroup"
    {
        std::fs::write(Path::new(dir).join("cgroup.procs"), "0")
            .with_context(|| format!("joining {dir}"))?;
        args = rest;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args {
        [a, addr, n] if a == "calls" => rt.block_on(calls(addr.parse()?, n.parse()?)),
        [a, addr] if a == "connect" => {
            let errno = match std::net::TcpStream::connect_timeout(
                &addr.parse()?,
                Duration::from_secs(2),
            ) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            report(&json!({ "op": "connect", "dest": addr, "errno": errno }));
            Ok(())
        }
        [a] if a == "raw" => {
            // SAFETY: plain socket(2); the descriptor is closed at once if one is returned.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            let errno = if fd < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            } else {
                // SAFETY: closing the descriptor just returned.
                unsafe { libc::close(fd) };
                0
            };
            report(&json!({ "op": "raw_socket", "errno": errno }));
            Ok(())
        }
        [a, addr, mark, steady] if a == "pace" => {
            for _ in 0..3 {
                std::process::Command::new(std::env::current_exe()?)
                    .args(["demo-agent", "sleep"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .context("starting a helper process")?;
            }
            rt.block_on(pace(addr.parse()?, Path::new(mark), steady.parse()?))
        }
        [a] if a == "api" => rt.block_on(api()),
        [a, mark, steady] if a == "api-pace" => {
            rt.block_on(api_pace(Path::new(mark), steady.parse()?))
        }
        [a] if a == "sleep" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => bail!("demo-agent: unknown action {args:?}"),
    }
}

fn report(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// One HTTP request to the provider: the status, or the errno of the connect.
async fn call(addr: SocketAddr) -> Result<u16, i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(errno)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| -1)?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::post(format!("http://{addr}/v1/complete"))
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|_| -1)?;
    let response = sender.send_request(request).await.map_err(|_| -1)?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    conn.abort();
    Ok(status)
}

async fn calls(addr: SocketAddr, n: u32) -> Result<()> {
    for i in 1..=n {
        match call(addr).await {
            Ok(status) => report(&json!({ "op": "call", "n": i, "status": status, "errno": 0 })),
            Err(errno) => report(&json!({ "op": "call", "n": i, "errno": errno })),
        }
    }
    Ok(())
}

/// Calls `addr` at `per_second` for `secs` (forever if None), never catching up.
async fn paced(addr: SocketAddr, per_second: u32, secs: Option<f64>) {
    let interval = Duration::from_secs(1) / per_second.max(1);
    let start = Instant::now();
    let mut next = Instant::now();
    while secs.is_none_or(|s| start.elapsed().as_secs_f64() < s) {
        let _ = call(addr).await;
        next += interval;
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else {
            next = now;
        }
    }
}

async fn pace(addr: SocketAddr, mark: &Path, steady: f64) -> Result<()> {
    paced(addr, 5, Some(steady)).await;
    std::fs::write(mark, crate::bpf::ktime_ns().to_string()).context("writing the mark")?;
    paced(addr, 1000, Some(2.0)).await;
    paced(addr, 3, None).await;
    Ok(())
}

/// One keep-alive HTTP/1.1 connection to the gateway, as an SDK's client keeps, made again
/// should the gateway close it; counts the connects it took.
struct ApiConn {
    base: hyper::Uri,
    token: String,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>>,
    connects: u32,
}

impl ApiConn {
    /// From the variables the scope's `env` set, as the OpenAI SDK reads them.
    fn from_env() -> Result<Self> {
        let base = std::env::var("OPENAI_BASE_URL").context("OPENAI_BASE_URL is not set")?;
        let token = std::env::var("OPENAI_API_KEY").context("OPENAI_API_KEY is not set")?;
        Ok(Self {
            base: base.parse().context("OPENAI_BASE_URL")?,
            token,
            sender: None,
            connects: 0,
        })
    }

    /// `METHOD BASE/path`: the answer's status (0: no answer).
    async fn call(&mut self, method: hyper::Method, path: &str) -> u16 {
        for _ in 0..2 {
            if self.sender.is_none() {
                let authority = self.base.authority().map(|a| a.as_str().to_owned());
                let Some(authority) = authority else {
                    return 0;
                };
                let Ok(stream) = tokio::net::TcpStream::connect(&authority).await else {
                    return 0;
                };
                self.connects += 1;
                let Ok((sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return 0;
                };
                tokio::spawn(conn);
                self.sender = Some(sender);
            }
            let Some(sender) = self.sender.as_mut() else {
                return 0;
            };
            let body = if method == hyper::Method::POST {
                Bytes::from_static(
                    b"{\"model\":\"demo\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
                )
            } else {
                Bytes::new()
            };
            let request = hyper::Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", self.base.path().trim_end_matches('/')))
                .header(
                    hyper::header::HOST,
                    self.base.authority().map_or("", |a| a.as_str()),
                )
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", self.token),
                )
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(body));
            let Ok(request) = request else {
                return 0;
            };
            if sender.ready().await.is_ok()
                && let Ok(response) = sender.send_request(request).await
            {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                return status;
            }
            // Closed by the gateway: one new connection, as a client would.
            self.sender = None;
        }
        0
    }
}

async fn api() -> Result<()> {
    let mut conn = ApiConn::from_env()?;
    report(&json!({
        "op": "api_env",
        "key_is_phantom_token": conn.token.starts_with("awp_"),
        "base": conn.base.to_string(),
    }));
    let status = conn.call(hyper::Method::POST, "/chat/completions").await;
    report(&json!({ "op": "api", "call": "POST /chat/completions", "status": status }));
    let status = conn.call(hyper::Method::DELETE, "/files/demo").await;
    report(&json!({ "op": "api", "call": "DELETE /files/demo", "status": status }));
    Ok(())
}

async fn api_pace(mark: &Path, steady: f64) -> Result<()> {
    let mut conn = ApiConn::from_env()?;
    let start = Instant::now();
    let mut next = Instant::now();
    let mut steady_answers = std::collections::BTreeMap::<u16, u32>::new();
    while start.elapsed().as_secs_f64() < steady {
        let status = conn.call(hyper::Method::POST, "/chat/completions").await;
        *steady_answers.entry(status).or_default() += 1;
        next += Duration::from_millis(200);
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else {
            next = now;
        }
    }
    std::fs::write(mark, crate::bpf::ktime_ns().to_string()).context("writing the mark")?;
    let mut answered = std::collections::BTreeMap::<u16, u32>::new();
    let flood = Instant::now();
    // Until 2 s have passed or 20 calls were refused: enough to show that the refusals go on.
    while flood.elapsed() < Duration::from_secs(2) && answered.get(&403).copied() < Some(20) {
        let status = conn.call(hyper::Method::POST, "/chat/completions").await;
        *answered.entry(status).or_default() += 1;
    }
    report(&json!({
        "op": "api_flood",
        "steady": by_status(&steady_answers),
        "answered": by_status(&answered),
        "connects": conn.connects,
    }));
    Ok(())
}

/// `{"200": n, "403": m}`.
fn by_status(counts: &std::collections::BTreeMap<u16, u32>) -> serde_json::Value {
    counts
        .iter()
        .map(|(s, n)| (s.to_string(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}
