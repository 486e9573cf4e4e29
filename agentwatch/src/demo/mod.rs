//! `agentwatch demo`: the whole story in about half a minute, for real.
//!
//! It starts a daemon of its own on an embedded config (its own cgroup parent, pin folder,
//! control socket and audit trail under a temporary folder), a loopback HTTP server standing in
//! for the model provider, and a scripted agent ([`agent`]) that makes allowed calls, tries a
//! call that is not on its list, tries a raw socket, bursts until the breaker freezes it, is
//! approved, and is killed by the kill switch. A second agent then calls a model API through
//! the daemon's gateway holding only a phantom token: an allowed call (the provider gets the
//! real key), a call outside its scope (403), and a flood over one keep-alive connection that
//! trips its breaker on `api_calls`. Each step is narrated with what the kernel and
//! the daemon actually did, then the matching audit lines are shown. Everything it made is
//! removed at the end, also when it fails or is interrupted (Ctrl-C).

pub mod agent;
mod provider;

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    bpf::ktime_ns,
    cgroup::{self, Cgroup},
    config::Config,
    control::{self, Request},
};
use provider::{ApiProvider, Provider};

/// The agent of the demo.
const AGENT: &str = "demo-agent";
/// The agent that uses a model API through the gateway.
const API_AGENT: &str = "demo-api";

/// The demo's config; `{...}` are filled in per run.
const CONFIG: &str = r#"# agentwatch demo: one agent that may call its model provider, and nothing else.
[daemon]
cgroup_parent = "{parent}"
pin_dir = "{pins}"
control_socket = "{socket}"
metrics_listen = "127.0.0.1:0"
gateway_listen = "127.0.0.1:0"
audit_log = "{audit}"
agent_homes = "{homes}"

[[agents]]
name = "demo-agent"
egress = ["tcp {provider_ip} {provider_port}"]

[agents.breaker]
warmup = "4s"
window = "1s"
trip_factor = 5.0
min_rate = 20.0
action = "freeze"
require_approval = true

# The second agent holds no API key: the gateway puts it in.
[secrets]
llm = { file = "{secret}" }

[[agents]]
name = "demo-api"
egress = []

[[agents.apis]]
name = "llm"
upstream = "https://{api_addr}"
ca_file = "{ca}"
secret = "llm"
allow = ["POST /v1/chat/completions"]
env = { OPENAI_BASE_URL = "{url}/v1", OPENAI_API_KEY = "{token}" }

[agents.breaker]
warmup = "4s"
window = "1s"
trip_factor = 5.0
min_rate = 20.0
min_bytes_rate = 100000000    # its bytes to the gateway are not what this step shows
action = "deny"
require_approval = true
"#;

/// How long the agent runs at its normal rate before it bursts (longer than the warmup).
const STEADY_SECS: u32 = 5;
/// Steps of the story.
const STEPS: u32 = 9;

/// Runs the demo; exit 0 when every step did what it should.
pub fn run() -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo loads eBPF programs and makes cgroups: run it as root (`sudo agentwatch demo`)"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        // Taken over now, not when the select below first polls it: `ctrl_c()` installs its
        // handler only then, and the story runs its first steps without yielding, so a Ctrl-C
        // in those seconds killed the demo with its daemon and agents left running.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("handling Ctrl-C")?;
        let mut env = Env::create()?;
        let outcome = tokio::select! {
            r = story(&mut env) => r.map(|()| ExitCode::SUCCESS),
            _ = interrupt.recv() => {
                println!("\ninterrupted: cleaning up");
                Ok(ExitCode::from(130))
            }
        };
        let cleaned = env.cleanup();
        match (&outcome, cleaned) {
            (_, Err(e)) => {
                eprintln!("agentwatch demo: cleaning up: {e:#}");
                Ok(ExitCode::FAILURE)
            }
            (Ok(_), Ok(summary)) => {
                println!("{summary}");
                outcome
            }
            (Err(_), Ok(_)) => outcome,
        }
    })
}

/// What the demo made, removed by [`Env::cleanup`] (and by Drop, should it be skipped).
struct Env {
    exe: PathBuf,
    dir: PathBuf,
    config_path: PathBuf,
    config: Option<Config>,
    socket: PathBuf,
    audit: PathBuf,
    agent_cgroup: PathBuf,
    api_cgroup: PathBuf,
    daemon: Option<Child>,
    /// Agent processes started in the background (reaped at cleanup).
    background: Vec<Child>,
    provider: Option<Provider>,
    api_provider: Option<ApiProvider>,
    /// The made-up key of the demo's API, which only the daemon reads.
    api_key: String,
    cleaned: bool,
}

impl Env {
    fn create() -> Result<Self> {
        let name = format!("agentwatch-demo-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mount = cgroup::cgroup2_mount()?;
        Ok(Self {
            exe: std::env::current_exe().context("finding the agentwatch binary")?,
            config_path: dir.join("agentwatch.toml"),
            socket: dir.join("control.sock"),
            audit: dir.join("audit.jsonl"),
            agent_cgroup: mount.join(&name).join(AGENT),
            api_cgroup: mount.join(&name).join(API_AGENT),
            dir,
            config: None,
            daemon: None,
            background: Vec::new(),
            provider: None,
            api_provider: None,
            api_key: demo_key()?,
            cleaned: false,
        })
    }

    fn parent_name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Writes the config, the API's key (mode 0600) and CA, and starts the daemon on them;
    /// returns once its control socket answers.
    fn start_daemon(&mut self, provider: SocketAddr, api: &ApiProvider) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let parent = self.parent_name();
        let (secret, ca) = (self.dir.join("llm.key"), self.dir.join("llm-ca.pem"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .and_then(|mut f| writeln!(f, "{}", self.api_key))
            .with_context(|| format!("writing {}", secret.display()))?;
        std::fs::write(&ca, &api.ca_pem).with_context(|| format!("writing {}", ca.display()))?;
        let text = CONFIG
            .replace("{parent}", &parent)
            .replace("{pins}", &format!("/sys/fs/bpf/{parent}"))
            .replace("{socket}", &self.socket.display().to_string())
            .replace("{audit}", &self.audit.display().to_string())
            .replace("{homes}", &self.dir.join("homes").display().to_string())
            .replace("{provider_ip}", &provider.ip().to_string())
            .replace("{provider_port}", &provider.port().to_string())
            .replace("{api_addr}", &api.addr.to_string())
            .replace("{secret}", &secret.display().to_string())
            .replace("{ca}", &ca.display().to_string());
        std::fs::write(&self.config_path, &text)?;
        self.config = Some(
            Config::parse(&text, "<demo config>")
                .map_err(|e| anyhow::anyhow!("the demo config is invalid:\n{e}"))?,
        );
        let log = std::fs::File::create(self.dir.join("daemon.log"))?;
        let child = Command::new(&self.exe)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the daemon")?;
        self.daemon = Some(child);
        let start = Instant::now();
        while self.ask(Request::Status { rules: false }).is_err() {
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the daemon exited ({status}):\n{}",
                    std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the daemon did not start within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn ask(&self, request: Request) -> Result<Value> {
        control::call(&self.socket, &request, Duration::from_secs(10))?
            .into_result()
            .map_err(anyhow::Error::msg)
    }

    /// The agent's status row.
    fn row(&self) -> Result<Value> {
        let status = self.ask(Request::Status { rules: false })?;
        status["agents"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == AGENT))
            .cloned()
            .context("the daemon does not list the demo agent")
    }

    /// `agentwatch launch --agent demo-agent -- agentwatch demo-agent ARGS`.
    fn launched(&self, args: &[&str]) -> Command {
        self.launched_as(AGENT, args)
    }

    /// `agentwatch launch --agent AGENT -- agentwatch demo-agent ARGS`.
    fn launched_as(&self, agent: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(["launch", "--agent", agent, "--"])
            .arg(&self.exe)
            .arg("demo-agent")
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the scripted agent to completion; its report lines.
    fn run_agent(&self, mut cmd: Command) -> Result<Vec<Value>> {
        let out = cmd.output().context("running the demo agent")?;
        if !out.status.success() {
            bail!(
                "the demo agent failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Audit lines of `kinds`, in order.
    fn audit_lines(&self, kinds: &[&str]) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| kinds.iter().any(|k| v["kind"] == *k))
            .collect()
    }

    /// Waits (up to `timeout`) for an audit line of `kind`.
    async fn wait_audit(&self, kind: &str, timeout: Duration) -> Result<Value> {
        self.wait_audit_where(kind, timeout, |_| true).await
    }

    /// Waits (up to `timeout`) for an audit line of `kind` that `matches`; the last such.
    async fn wait_audit_where(
        &self,
        kind: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Some(v) = self.audit_lines(&[kind]).into_iter().rfind(|v| matches(v)) {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!("no `{kind}` line in the audit trail after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the agent's processes, stops the daemon, removes pins, cgroups and the folder.
    fn cleanup(&mut self) -> Result<String> {
        self.cleaned = true;
        for path in [&self.agent_cgroup, &self.api_cgroup] {
            if let Ok(cg) = Cgroup::open(path) {
                let _ = cg.set_frozen(false);
                let _ = cg.kill();
                let _ = cg.wait_empty(Duration::from_secs(5));
            }
        }
        for mut child in self.background.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut child) = self.daemon.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: signalling the daemon this process started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.provider.take();
        self.api_provider.take();
        let mut summary = String::from("cleaned up: ");
        if let Some(config) = &self.config {
            summary.push_str(&crate::daemon::cleanup(config)?);
        }
        // The parent cgroup goes once its agent's is gone (cleanup removes both when empty).
        let parent = self.agent_cgroup.parent().map(Path::to_path_buf);
        if let Some(p) = parent
            && p.exists()
        {
            let _ = std::fs::remove_dir(&self.agent_cgroup);
            let _ = std::fs::remove_dir(&self.api_cgroup);
            std::fs::remove_dir(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        summary.push_str(&format!("; removed {}", self.dir.display()));
        Ok(summary)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !self.cleaned
            && let Err(e) = self.cleanup()
        {
            eprintln!("agentwatch demo: cleaning up: {e:#}");
        }
    }
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn errno_text(errno: i64) -> String {
    match errno {
        0 => "succeeded".to_owned(),
        1 => "EPERM (Operation not permitted)".to_owned(),
        e => format!(
            "errno {e} ({})",
            std::io::Error::from_raw_os_error(i32::try_from(e).unwrap_or(0))
        ),
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// A made-up API key for this run (`sk-demo-` and 24 hex digits from the OS's CSPRNG).
fn demo_key() -> Result<String> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    Ok(format!(
        "sk-demo-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// `count` of `status` in an `{"200": n, ...}` report.
fn answered(report: &Value, status: &str) -> u64 {
    report[status].as_u64().unwrap_or(0)
}

/// The nine steps, narrated.
async fn story(env: &mut Env) -> Result<()> {
    let provider = Provider::start().await?;
    let provider_addr = provider.addr;
    env.provider = Some(provider);
    let api = ApiProvider::start().await?;
    // Somewhere the agent is not allowed to send to: a real listener, so a connect that got
    // through would succeed; the point is that it never gets there.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0")?;
    let elsewhere = elsewhere.local_addr()?;
    say("agentwatch demo: one AI agent, guarded by agentwatch. Everything below really happens:");
    say("the kernel enforces, the daemon decides, the audit trail records.\n");
    env.start_daemon(provider_addr, &api)?;
    env.api_provider = Some(api);
    say(&format!(
        "  daemon started; agent `{AGENT}` (cgroup {}) may call its model provider at \
         {provider_addr} over TCP, and nothing else.\n",
        env.agent_cgroup.display()
    ));
    let served = |env: &Env| env.provider.as_ref().map_or(0, Provider::served);

    // 1. Allowed calls.
    say(&format!("[1/{STEPS}] The agent calls its model provider."));
    let reports = env.run_agent(env.launched(&["calls", &provider_addr.to_string(), "5"]))?;
    let ok = reports.iter().filter(|r| r["status"] == 200).count();
    let allowed = env.row()?["allowed"].as_u64().unwrap_or(0);
    say(&format!(
        "      5 calls, {ok} answered with HTTP 200; the kernel counted {allowed} allowed connects."
    ));
    if ok != 5 {
        bail!("expected 5 answered calls, got {ok}: {reports:?}");
    }

    // 2. A call that is not on the list.
    say(&format!(
        "[2/{STEPS}] It tries to send data somewhere else ({elsewhere}, not on its list)."
    ));
    let r = env.run_agent(env.launched(&["connect", &elsewhere.to_string()]))?;
    let errno = r.first().map_or(-1, |r| r["errno"].as_i64().unwrap_or(-1));
    say(&format!(
        "      connect(): {}: refused in the kernel, no packet left the agent.",
        errno_text(errno)
    ));
    if errno != 1 {
        bail!("expected EPERM for the unlisted destination, got {r:?}");
    }
    let denied = env
        .wait_audit("egress_denied", Duration::from_secs(5))
        .await?;
    say(&format!("      audit: {denied}"));

    // 3. A raw socket, as root with every capability.
    say(&format!(
        "[3/{STEPS}] As root with CAP_NET_RAW, it tries a raw socket (to get around the connect hooks)."
    ));
    let mut raw = Command::new(&env.exe);
    raw.arg("demo-agent")
        .arg("--cgroup")
        .arg(&env.agent_cgroup)
        .arg("raw")
        .stdin(Stdio::null());
    let r = env.run_agent(raw)?;
    let errno = r.first().map_or(-1, |r| r["errno"].as_i64().unwrap_or(-1));
    say(&format!(
        "      socket(AF_INET, SOCK_RAW): {}: refused by agentwatch's sock_create hook.",
        errno_text(errno)
    ));
    if errno != 1 {
        bail!("expected EPERM for the raw socket, got {r:?}");
    }
    let socket_denied = env
        .wait_audit("socket_denied", Duration::from_secs(5))
        .await?;
    say(&format!("      audit: {socket_denied}"));

    // 4. Normal rate, then a burst.
    say(&format!(
        "[4/{STEPS}] It works at 5 calls/s for {STEADY_SECS} s (the breaker learns its normal), then bursts."
    ));
    // The agent runs as a uid of its own: it writes its mark where it may (its home), not in
    // the demo's folder, which is root's alone (it holds the config and the trail).
    let mark = env.dir.join("homes").join(AGENT).join("burst-started");
    let mut pacer = env.launched(&[
        "pace",
        &provider_addr.to_string(),
        &mark.display().to_string(),
        &STEADY_SECS.to_string(),
    ]);
    let pacer = pacer
        .stdout(Stdio::null())
        .spawn()
        .context("starting the agent")?;
    // Killed by the kill switch at step 6 (or by cleanup), reaped at cleanup.
    env.background.push(pacer);
    let start = Instant::now();
    while !mark.exists() {
        if start.elapsed() > Duration::from_secs(u64::from(STEADY_SECS) + 10) {
            bail!("the agent never started its burst");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cg = Cgroup::open(&env.agent_cgroup)?;
    while !cg.frozen().unwrap_or(false) {
        if start.elapsed() > Duration::from_secs(u64::from(STEADY_SECS) + 20) {
            bail!("the breaker did not freeze the agent");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let frozen_at = ktime_ns();
    let burst_at: u64 = std::fs::read_to_string(&mark)?.trim().parse()?;
    let trip = env
        .wait_audit("breaker_tripped", Duration::from_secs(5))
        .await?;
    let processes = env.row()?["processes"].as_u64().unwrap_or(0);
    say(&format!(
        "      normal: {:.1} {}/s learned; burst: {:.0}/s ({:.0}x its normal).",
        num(&trip["baseline"]),
        trip["signal"].as_str().unwrap_or("?"),
        num(&trip["rate"]),
        num(&trip["rate"]) / num(&trip["baseline"]).max(0.1)
    ));
    say(&format!(
        "      breaker tripped and froze all {processes} processes {} ms after the burst began.",
        frozen_at.saturating_sub(burst_at) / 1_000_000
    ));
    say(&format!("      audit: {trip}"));

    // 5. Frozen until a human decides.
    let at_freeze = served(env);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let while_frozen = served(env) - at_freeze;
    say(&format!(
        "[5/{STEPS}] It stays frozen until a human decides: {while_frozen} calls got out in 2 s. The \
         human approves: `agentwatch approve {AGENT}`."
    ));
    if while_frozen != 0 {
        bail!("{while_frozen} calls were answered while the agent was frozen");
    }
    env.ask(Request::Approve {
        agent: AGENT.to_owned(),
        keep_baseline: false,
        call: None,
    })?;
    cg.wait_frozen(false, Duration::from_secs(5))?;
    let before = served(env);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = served(env);
    say(&format!(
        "      thawed: it carries on at its own pace, {} calls answered in the next 2 s; its \
         normal is learned again from now.",
        after - before
    ));

    // 6. The kill switch.
    say(&format!(
        "[6/{STEPS}] Kill switch: `agentwatch kill {AGENT}`."
    ));
    let killed = env.ask(Request::Kill {
        agent: AGENT.to_owned(),
    })?;
    let left = Cgroup::open(&env.agent_cgroup)?.all_pids()?.len();
    say(&format!(
        "      egress revoked first, then {} processes killed at once (cgroup.kill); {left} left.",
        killed["processes"]
    ));

    api_steps(env).await?;

    say(&format!(
        "\nThe audit trail ({}), these steps:",
        env.audit.display()
    ));
    for line in env.audit_lines(&[
        "egress_denied",
        "socket_denied",
        "breaker_tripped",
        "frozen",
        "approved",
        "thawed",
        "killed",
    ]) {
        say(&format!("  {line}"));
    }
    // Every line carries `prev`, the SHA-256 of the line before it: the trail verifies.
    let report = crate::audit::verify::verify(std::slice::from_ref(&env.audit))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    say(&format!(
        "\n`agentwatch audit verify {}`:\n  {}",
        env.audit.display(),
        report.to_string().trim_end().replace('\n', "\n  ")
    ));
    if !report.intact() {
        bail!("the demo's audit trail does not verify");
    }
    let row = env.row()?;
    say(&format!(
        "\nIn all: {} calls answered by the model provider, {} denied in the kernel, 1 raw socket \
         refused, the burst frozen in {} ms, {} processes killed.",
        served(env),
        row["denied"],
        frozen_at.saturating_sub(burst_at) / 1_000_000,
        killed["processes"]
    ));
    Ok(())
}

/// Steps 7 to 9: an agent that uses a model API holds no key, only a phantom token.
async fn api_steps(env: &Env) -> Result<()> {
    let credentials = |env: &Env| {
        env.api_provider
            .as_ref()
            .map_or_else(Vec::new, ApiProvider::credentials)
    };
    let shown_key = format!("{}...", &env.api_key[..12.min(env.api_key.len())]);

    say(&format!(
        "[7/{STEPS}] A second agent, `{API_AGENT}`, uses a model API through agentwatch's gateway. \
         It holds no key: its OPENAI_API_KEY is a phantom token, its OPENAI_BASE_URL the gateway."
    ));
    let reports = env.run_agent(env.launched_as(API_AGENT, &["api"]))?;
    let get = |op: &str, i: usize| {
        reports
            .iter()
            .filter(|r| r["op"] == op)
            .nth(i)
            .cloned()
            .unwrap_or_default()
    };
    if get("api_env", 0)["key_is_phantom_token"] != true {
        bail!("the agent's OPENAI_API_KEY is not a phantom token: {reports:?}");
    }
    let (allowed, outside) = (get("api", 0), get("api", 1));
    let seen = credentials(env);
    say(&format!(
        "      POST /v1/chat/completions: HTTP {}. The provider received `Authorization: Bearer \
         {shown_key}` (the real key, read by the daemon alone), not the agent's token.",
        allowed["status"]
    ));
    if allowed["status"] != 200 || seen != [format!("Bearer {}", env.api_key)] {
        bail!(
            "expected one answered call with the real key: {reports:?}, the provider saw {seen:?}"
        );
    }
    let call = env
        .wait_audit_where("api_call", Duration::from_secs(5), |l| {
            l["decision"] == "allowed"
        })
        .await?;
    say(&format!("      audit: {call}"));

    say(&format!(
        "[8/{STEPS}] It tries a call outside its scope (`allow` lists POST /v1/chat/completions only)."
    ));
    say(&format!(
        "      DELETE /v1/files/demo: HTTP {}, judged by the gateway; the provider still saw {} \
         request.",
        outside["status"],
        credentials(env).len()
    ));
    if outside["status"] != 403 || credentials(env).len() != 1 {
        bail!("expected the call outside the scope refused with 403: {reports:?}");
    }
    let call = env
        .wait_audit_where("api_call", Duration::from_secs(5), |l| {
            l["decision"] == "denied"
        })
        .await?;
    say(&format!("      audit: {call}"));

    say(&format!(
        "[9/{STEPS}] It calls at 5/s for {STEADY_SECS} s over one keep-alive connection, then \
         floods that same connection: to the kernel all of it is one connect; the gateway counts \
         every call (breaker signal `api_calls`, action deny)."
    ));
    let mark = env.dir.join("homes").join(API_AGENT).join("flood-started");
    let reports = env.run_agent(env.launched_as(
        API_AGENT,
        &[
            "api-pace",
            &mark.display().to_string(),
            &STEADY_SECS.to_string(),
        ],
    ))?;
    let flood = reports
        .iter()
        .find(|r| r["op"] == "api_flood")
        .cloned()
        .with_context(|| format!("the agent did not report its flood: {reports:?}"))?;
    let trip = env
        .wait_audit_where("breaker_tripped", Duration::from_secs(5), |l| {
            l["agent"] == API_AGENT
        })
        .await?;
    let (ok, refused) = (
        answered(&flood["answered"], "200"),
        answered(&flood["answered"], "403"),
    );
    let reached = credentials(env).len() as u64;
    // Every call answered 200 reached the provider (the first, the steady ones, the flood's
    // before the trip); none refused did.
    let want = 1 + answered(&flood["steady"], "200") + ok;
    say(&format!(
        "      The breaker tripped on `{}` at {:.0} calls/s (its learned normal: {:.1}/s; \
         min_rate 20/s): {ok} flood calls answered before, {refused} refused with 403 after; {} \
         connect(s) in all.",
        trip["signal"].as_str().unwrap_or("?"),
        num(&trip["rate"]),
        num(&trip["baseline"]),
        flood["connects"]
    ));
    say(&format!(
        "      the provider received {reached} calls: each one answered 200, none refused."
    ));
    say(&format!("      audit: {trip}"));
    if trip["signal"] != "api_calls" || refused == 0 || reached != want {
        bail!(
            "expected the flood refused after an api_calls trip: {flood}, {trip}, the provider \
             saw {reached} calls, not {want}"
        );
    }
    Ok(())
}
