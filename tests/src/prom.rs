//! The operators' tools for tests/tests/operators.rs: a real Prometheus (Debian's package) that
//! the test starts on loopback and removes on Drop, promtool, and the virtualenv holding
//! kubernetes-validate. `cargo xtask setup` installs all of them; a test that cannot find one
//! fails and says so, it never skips.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{DaemonEnv, TempDir};

/// Where Debian's prometheus package puts its programs (`cargo xtask setup` installs it).
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";
/// Debian's systemd package (`cargo xtask setup` installs it where systemd is not the init).
pub const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

/// A tool setup installs, or a failure that says to run setup.
pub fn tool(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs what these tests need)",
        path.display()
    );
    path.to_owned()
}

/// The project's virtualenv (`cargo xtask setup` creates it; xtask's `venv_dir`).
pub fn venv() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/agentwatch/venv")
}

/// kubernetes-validate in the project's virtualenv.
pub fn kubernetes_validate() -> PathBuf {
    tool(venv().join("bin/kubernetes-validate"))
}

/// The workspace's root folder (deploy/ is there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// `host:port` of the daemon's /metrics, from its last start-up log line.
pub fn metrics_addr(env: &DaemonEnv) -> String {
    let log = env.log();
    log.rsplit("metrics=http://")
        .next()
        .and_then(|rest| rest.split('/').next())
        .filter(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("no metrics address in the daemon's log:\n{log}"))
        .to_owned()
}

/// The metric family names a scrape declares (`# TYPE NAME KIND` lines).
pub fn families(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET `path` from `addr` over HTTP/1.0 (the server closes after the body, so no chunking);
/// returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Seconds since the Unix epoch (Prometheus' sample timestamps are on this clock).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The scrape job's name: the one deploy/prometheus/alerts.yml's AgentwatchDown expects.
pub const JOB: &str = "agentwatch";

/// A real Prometheus on 127.0.0.1 with its own storage folder, scraping one daemon every second
/// and evaluating rule files every second. Drop stops it and removes its folder.
pub struct Prometheus {
    child: Option<Child>,
    pub addr: String,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`) as job [`JOB`], with `rule_files`
    /// loaded, and waits until it is ready.
    pub fn start(target: &str, rule_files: &[PathBuf]) -> Self {
        let bin = tool(PROMETHEUS);
        let dir = TempDir::new();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - \"{}\"\n", p.display()))
            .collect();
        let config = dir.0.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n{}scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n",
                if rules.is_empty() {
                    "  []\n".to_owned()
                } else {
                    rules.concat()
                }
            ),
        )
        .expect("writing prometheus.yml");
        // The port is picked by binding and letting go; another process may take it in between,
        // so a Prometheus that exits at once is started again on another port.
        let data = dir.0.join("data");
        let log_path = dir.0.join("prometheus.log");
        let mut p = Self {
            child: None,
            addr: String::new(),
            dir,
        };
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            p.addr = format!("127.0.0.1:{port}");
            let log = fs::File::create(&log_path).expect("prometheus.log");
            p.child = Some(
                Command::new(&bin)
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!("--storage.tsdb.path={}", data.display()))
                    .arg(format!("--web.listen-address={}", p.addr))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("starting prometheus"),
            );
            if p.wait_ready() {
                return p;
            }
            // It exited (the port was taken meanwhile): try another.
            p.stop();
        }
        panic!("prometheus did not start on any of 5 ports")
    }

    /// Waits until /-/ready answers 200; false if Prometheus exited first. Panics with its log
    /// if it neither exits nor gets ready within 30 s.
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                eprintln!("prometheus exited with {status}:\n{}", self.log());
                return false;
            }
            if matches!(http_get(&self.addr, "/-/ready"), Ok((200, _))) {
                return true;
            }
            assert!(
                start.elapsed() < crate::patience(Duration::from_secs(30)),
                "prometheus not ready after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; returns the status code and the parsed JSON body.
    pub fn api(&self, path: &str) -> (u16, Value) {
        let (status, body) = http_get(&self.addr, path)
            .unwrap_or_else(|e| panic!("GET {path} from prometheus: {e}\n{}", self.log()));
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
        (status, v)
    }

    /// Runs an instant query; returns the status code and the parsed answer, whatever it is
    /// (400 with `errorType: bad_data` for an expression that does not parse).
    pub fn query_raw(&self, expr: &str) -> (u16, Value) {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr)))
    }

    /// Runs an instant query that must succeed; returns its result vector.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let (status, v) = self.query_raw(expr);
        assert_eq!(status, 200, "query `{expr}`: {v}");
        assert_eq!(v["status"], "success", "query `{expr}`: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("query `{expr}`: no result vector: {v}"))
            .clone()
    }

    /// The value of every series of `expr`, keyed by the values of `labels` (in that order).
    pub fn values_by(&self, expr: &str, labels: &[&str]) -> Vec<(Vec<String>, f64)> {
        let mut out: Vec<(Vec<String>, f64)> = self
            .query(expr)
            .iter()
            .map(|s| {
                let key = labels
                    .iter()
                    .map(|l| s["metric"][*l].as_str().unwrap_or_default().to_owned())
                    .collect();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("query `{expr}`: no value in {s}"));
                (key, value)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Waits until the daemon was scraped successfully at or after `t` (Unix seconds): every
    /// counter of that scrape then includes whatever happened before `t`.
    pub fn wait_scrape_after(&self, t: f64) {
        // The raw samples of `up` with their own timestamps. (`timestamp(up == 1)` would not
        // do: this Prometheus gives the evaluation time for anything but a plain selector.)
        let expr = format!("up{{job=\"{JOB}\"}}[1m]");
        let start = Instant::now();
        loop {
            let samples: Vec<(f64, String)> = self
                .query(&expr)
                .iter()
                .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| Some((v[0].as_f64()?, v[1].as_str()?.to_owned())))
                .collect();
            if samples.iter().any(|(ts, up)| *ts >= t && up == "1") {
                return;
            }
            // Prometheus starts scraping up to 5 s after it is ready (it applies discovered
            // targets at most every 5 s), then every second.
            assert!(
                start.elapsed() < crate::patience(Duration::from_secs(20)),
                "no successful scrape after {t} within 20 s (samples {samples:?}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The alerts Prometheus holds now (pending and firing).
    pub fn alerts(&self) -> Vec<Value> {
        let (status, v) = self.api("/api/v1/alerts");
        assert_eq!(status, 200, "{v}");
        v["data"]["alerts"].as_array().cloned().unwrap_or_default()
    }

    /// Every loaded rule (of every group).
    pub fn rules(&self) -> Vec<Value> {
        let (status, v) = self.api("/api/v1/rules");
        assert_eq!(status, 200, "{v}");
        v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id()).unwrap_or(0);
            // SIGTERM first: Prometheus closes its storage cleanly; SIGKILL if it takes longer
            // than 5 s, so a test never hangs on it.
            // SAFETY: signalling the process this guard started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field removes the storage folder after this.
    }
}
