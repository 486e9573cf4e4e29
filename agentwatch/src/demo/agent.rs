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
