//! `agentwatch run`: guard the configured agents, serve the control socket and /metrics, write
//! the audit trail, reload the policy live.
//!
//! Enforcement lives in pinned kernel objects, not in this process: stopping or killing the
//! daemon leaves every agent guarded, and a new daemon re-adopts the pins without detaching
//! anything. `agentwatch run --cleanup` is the only thing that removes them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use agentwatch_common::{
    AGENT_FLAG_DENY_ALL, AGENT_FLAG_KILLED, AGENT_FLAG_TRIPPED, NUM_PROTOS, VERDICT_ALLOWED,
    VERDICT_CAPPED, VERDICT_DENIED, egress_slot,
};
use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::SignalKind,
};

use crate::{
    agent::{Agents, Guarding, Policy},
    audit::{self, Audit},
    breaker::{Monitor, Signal, State as BreakerState, Transition},
    cgroup::{self, Cgroup},
    config::{Action, Agent, Config},
    control::{self, Request, Response},
    egress,
    events::{self, Event},
    kernel::PinDir,
    metrics::{self, AgentSnapshot, Snapshot},
};

/// Where the config came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefault,
}

/// How long kill and freeze wait for the kernel before they report failure.
const KILL_WAIT: Duration = Duration::from_secs(10);
const FREEZE_WAIT: Duration = Duration::from_secs(5);

/// The daemon's state, shared by its tasks behind one lock (held only for short, bounded work).
struct State {
    config: Config,
    source: ConfigSource,
    mount: PathBuf,
    agents: Agents,
    audit: Audit,
    reloads_ok: u64,
    reloads_rejected: u64,
    /// The config file's bytes last seen by the watcher (applied or rejected).
    last_seen: Option<Vec<u8>>,
    /// Rates, baselines and breakers, per agent.
    monitors: BTreeMap<String, Monitor>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    // A task that panicked while holding the lock left the state as it was; carry on with it.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config, source: ConfigSource) -> Result<()> {
    match &source {
        ConfigSource::File(p) => {
            tracing::info!(config = %p.display(), agents = config.agents.len(), "agentwatch starting")
        }
        ConfigSource::EmbeddedDefault => tracing::info!(
            "agentwatch starting on its embedded default config (no --config and nothing at {}): \
             no agents, metrics on {}",
            crate::config::DEFAULT_PATH,
            config.daemon.metrics_listen
        ),
    }
    let socket_path = config.daemon.control_socket.clone();
    refuse_if_running(&socket_path)?;
    let mount = cgroup::cgroup2_mount()?;
    tracing::info!(mount = %mount.display(), "cgroup2 found");
    let audit = Audit::open(&config.daemon.audit_log).with_context(|| {
        format!(
            "opening the audit log {}",
            config.daemon.audit_log.display()
        )
    })?;
    tracing::info!(audit_log = %audit::describe(&config.daemon.audit_log).display(), "audit trail open");
    let pins = PinDir::new(&config.daemon.pin_dir);
    ensure_bpffs(pins.root())?;
    let adopting = pins.exists();
    let mut agents = Agents::load_pinned(pins).context("loading the kernel programs")?;
    if adopting {
        tracing::info!(pin_dir = %config.daemon.pin_dir.display(), "re-adopting pinned maps and links");
    }
    let ring = agents
        .take_events()
        .context("the event ring buffer was already taken")?;
    let metrics_addr = config.daemon.metrics_listen;
    let last_seen = match &source {
        ConfigSource::File(p) => std::fs::read(p).ok(),
        ConfigSource::EmbeddedDefault => None,
    };
    let mut state = State {
        config: Config {
            daemon: config.daemon.clone(),
            agents: Vec::new(),
        },
        source,
        mount,
        agents,
        audit,
        reloads_ok: 0,
        reloads_rejected: 0,
        last_seen,
        monitors: BTreeMap::new(),
    };
    state.apply(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stale = state.agents.forget_stale()?;
    if stale.states > 0 || !stale.link_dirs.is_empty() {
        tracing::info!(states = stale.states, links = ?stale.link_dirs, "removed what an earlier daemon left for agents no longer configured");
    }
    let state: Shared = Arc::new(Mutex::new(state));

    let listener = bind_control(
        &socket_path,
        lock(&state).config.daemon.admin_group.as_deref(),
    )?;
    let metrics = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding metrics_listen {metrics_addr}"))?;
    tracing::info!(control_socket = %socket_path.display(), metrics = %format!("http://{}/metrics", metrics.local_addr()?), "agentwatch running");

    let admin_gid = lock(&state)
        .config
        .daemon
        .admin_group
        .as_deref()
        .and_then(control::group_id);
    let tasks = [
        tokio::spawn(read_events(Arc::clone(&state), ring)),
        tokio::spawn(serve_control(Arc::clone(&state), listener, admin_gid)),
        tokio::spawn(serve_metrics(Arc::clone(&state), metrics)),
        tokio::spawn(watch_config(Arc::clone(&state))),
        tokio::spawn(watch_lost(Arc::clone(&state))),
        tokio::spawn(watch_behaviour(Arc::clone(&state))),
    ];
    let result = wait_for_signals(&state).await;
    for t in &tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    let n = lock(&state).agents.names().count();
    tracing::info!(
        "agentwatch stopped; {n} agent(s) stay guarded by pinned programs (`agentwatch run --cleanup` removes them)"
    );
    result
}

async fn wait_for_signals(state: &Shared) -> Result<()> {
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let state = Arc::clone(state);
                let _ = tokio::task::spawn_blocking(move || lock(&state).reload_from_disk()).await;
            }
        }
    }
}

/// Refuses to start a second daemon on the same control socket (and so the same pins).
fn refuse_if_running(socket: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "another agentwatch daemon is already running (its control socket {} answers)",
            socket.display()
        );
    }
    Ok(())
}

/// Pins need bpffs. Mount it at /sys/fs/bpf when the pin folder is below it and it is missing.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let on_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs with a valid C string and an out-pointer to a zeroed statfs.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; statfs writes only into `st`.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return false;
        }
        #[allow(
            clippy::useless_conversion,
            reason = "f_type is i64 on x86_64, narrower elsewhere"
        )]
        let f_type = i64::from(st.f_type);
        f_type == BPF_FS_MAGIC
    };
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if on_bpffs(existing) {
        return Ok(());
    }
    let bpffs = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs) && bpffs.exists() && !on_bpffs(bpffs) {
        tracing::info!("mounting bpffs at /sys/fs/bpf");
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount")?;
        if status.success() && on_bpffs(bpffs) {
            return Ok(());
        }
    }
    bail!(
        "pin_dir {} is not on a bpf file system; mount one (`mount -t bpf bpf /sys/fs/bpf`) or \
         choose a pin_dir below one",
        pin_dir.display()
    )
}

fn bind_control(path: &Path, admin_group: Option<&str>) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A stale socket of a daemon that died (refuse_if_running found nobody answering).
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let (mode, gid) = match admin_group.and_then(control::group_id) {
        Some(gid) => (0o660, Some(gid)),
        None => (0o600, None),
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

impl State {
    /// Applies `new` to the kernel: agents added are guarded, agents removed are unguarded
    /// (their processes keep running, reported), agents whose rules changed get them swapped
    /// atomically. Everything that can fail for reasons in the config is checked before the
    /// first change, so a rejected config changes nothing.
    fn apply(&mut self, new: Config) -> Result<String, String> {
        // Pre-flight: adopted cgroups must exist (rules were compiled while validating).
        for a in &new.agents {
            if a.adopted && !self.mount.join(&a.cgroup).join("cgroup.procs").exists() {
                return Err(format!(
                    "agent `{}` adopts cgroup {}, which does not exist",
                    a.name,
                    self.mount.join(&a.cgroup).display()
                ));
            }
        }
        if new.daemon != self.config.daemon {
            tracing::warn!("[daemon] settings changed: they take effect at the next restart");
        }
        let old: BTreeMap<String, Agent> = self
            .config
            .agents
            .iter()
            .map(|a| (a.name.clone(), a.clone()))
            .collect();
        let mut summary = Vec::new();
        // Removed agents, and agents whose cgroup moved, first: a cgroup is never in two agents.
        for (name, a) in &old {
            let keep = new.agent(name).is_some_and(|n| n.cgroup == a.cgroup);
            if !keep {
                self.remove_agent(a);
                summary.push(format!("-{name}"));
            }
        }
        for a in &new.agents {
            let rules = a.compiled.clone();
            match old.get(&a.name) {
                Some(o) if o.cgroup == a.cgroup => {
                    if o != a {
                        self.agents
                            .set_policy(&a.name, policy_of(a, rules))
                            .map_err(|e| e.to_string())?;
                        if let Some(m) = self.monitors.get_mut(&a.name) {
                            m.reconfigure(a.breaker);
                        }
                        summary.push(format!("~{}", a.name));
                    }
                }
                _ => {
                    self.add_agent(a, rules)?;
                    summary.push(format!("+{}", a.name));
                }
            }
        }
        self.config = Config {
            daemon: self.config.daemon.clone(),
            agents: new.agents,
        };
        Ok(summary.join(" "))
    }

    fn add_agent(&mut self, a: &Agent, rules: egress::CompiledRules) -> Result<(), String> {
        let path = self.mount.join(&a.cgroup);
        let cgroup = if a.adopted {
            Cgroup::open(&path).map_err(|e| e.to_string())?
        } else {
            Cgroup::create(&path).map_err(|e| e.to_string())?.0
        };
        let how = self
            .agents
            .guard(&a.name, cgroup, policy_of(a, rules))
            .map_err(|e| format!("guarding agent `{}`: {e}", a.name))?;
        let adopted = how == Guarding::Adopted;
        let mut monitor = Monitor::new(a.breaker, Instant::now());
        // A breaker that was open when the last daemon stopped is still open.
        if self
            .agents
            .info(&a.name)
            .is_some_and(|i| i.state.flags & AGENT_FLAG_TRIPPED != 0)
        {
            monitor.force_open(Instant::now());
        }
        self.monitors.insert(a.name.clone(), monitor);
        tracing::info!(agent = %a.name, cgroup = %path.display(), rules = a.egress.len(), adopted, "agent guarded");
        self.audit_agent(
            &a.name,
            "agent_guarded",
            json!({
                "cgroup": path.display().to_string(),
                "rules": a.egress.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "readopted": adopted,
            }),
        );
        Ok(())
    }

    fn remove_agent(&mut self, a: &Agent) {
        self.monitors.remove(&a.name);
        let cgroup = match self.agents.unguard(&a.name) {
            Ok(cg) => cg,
            Err(e) => {
                tracing::error!(agent = %a.name, "unguarding: {e}");
                return;
            }
        };
        let left = cgroup.all_pids().map(|p| p.len()).unwrap_or(0);
        tracing::warn!(agent = %a.name, processes = left, "agent removed from the policy: its processes keep running, unguarded");
        self.audit_agent(&a.name, "agent_removed", json!({ "processes": left }));
        if !a.adopted && left == 0 {
            let _ = cgroup.remove();
        }
    }

    fn audit_agent(&self, agent: &str, kind: &str, fields: Value) {
        if let Err(e) = self.audit.record(agent, kind, fields) {
            tracing::error!("writing the audit trail: {e}");
        }
    }

    /// Audits a kernel event of agent `agent_id` at its kernel timestamp.
    fn audit_event(&self, agent_id: u32, ts_ns: u64, kind: &str, fields: Value) {
        let agent = self.agents.name_of(agent_id).unwrap_or("");
        if let Err(e) = self
            .audit
            .record_at(events::wall_time(ts_ns), agent, kind, fields)
        {
            tracing::error!("writing the audit trail: {e}");
        }
    }

    fn audit_daemon(&self, kind: &str, fields: Value) {
        if let Err(e) = self.audit.record_daemon(kind, fields) {
            tracing::error!("writing the audit trail: {e}");
        }
    }

    /// Re-reads the config file and applies it, or rejects it whole.
    fn reload_from_disk(&mut self) -> Result<String, String> {
        let ConfigSource::File(path) = &self.source else {
            return Err(
                "running on the embedded default config: there is no file to reload".into(),
            );
        };
        let path = path.clone();
        self.last_seen = std::fs::read(&path).ok();
        let result = Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| self.apply(c));
        match &result {
            Ok(summary) => {
                self.reloads_ok += 1;
                tracing::info!(changes = %summary, "policy reloaded");
                self.audit_daemon("policy_reloaded", json!({ "changes": summary }));
            }
            Err(e) => {
                self.reloads_rejected += 1;
                tracing::error!("policy rejected, the previous one stays in force:\n{e}");
                self.audit_daemon("policy_rejected", json!({ "error": e }));
            }
        }
        result
    }

    fn handle(&mut self, req: Request, uid: u32) -> Response {
        let result = match req {
            Request::Status => Ok(json!({ "agents": self.status() })),
            Request::Reload => self
                .reload_from_disk()
                .map(|changes| json!({ "changes": changes })),
            Request::Freeze { agent } => self.freeze(&agent, true, uid),
            Request::Thaw { agent } => self.freeze(&agent, false, uid),
            Request::Kill { agent } => self.kill(&agent, uid),
            Request::Approve { agent } => self.approve(&agent, uid),
            Request::Launch { agent } => self.launch(&agent),
        };
        match result {
            Ok(data) => Response::ok(data),
            Err(e) => Response::err(e),
        }
    }

    fn cgroup_of(&self, agent: &str) -> Result<Cgroup, String> {
        self.agents.cgroup(agent).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.agents.names().collect();
            format!(
                "unknown agent `{agent}` (guarded: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })
    }

    fn freeze(&mut self, agent: &str, frozen: bool, uid: u32) -> Result<Value, String> {
        let cg = self.cgroup_of(agent)?;
        cg.set_frozen(frozen).map_err(|e| e.to_string())?;
        cg.wait_frozen(frozen, FREEZE_WAIT)
            .map_err(|e| e.to_string())?;
        let kind = if frozen { "frozen" } else { "thawed" };
        let processes = cg.all_pids().map(|p| p.len()).unwrap_or(0);
        self.audit_agent(
            agent,
            kind,
            json!({ "actor_uid": uid, "processes": processes }),
        );
        tracing::info!(agent, actor_uid = uid, processes, "{kind}");
        Ok(json!({ "state": kind, "processes": processes }))
    }

    /// The kill switch: egress denied in the kernel first (nothing more leaves, even from a
    /// process that survives a moment), then the whole tree killed at once.
    fn kill(&mut self, agent: &str, uid: u32) -> Result<Value, String> {
        let n = self.kill_tree(agent, AGENT_FLAG_KILLED)?;
        self.audit_agent(agent, "killed", json!({ "actor_uid": uid, "processes": n }));
        tracing::warn!(agent, actor_uid = uid, processes = n, "killed");
        Ok(json!({ "processes": n }))
    }

    /// Egress denied in the kernel first (nothing more leaves, even from a process that
    /// survives a moment), then the whole tree killed at once. Returns how many processes died.
    fn kill_tree(&mut self, agent: &str, extra_flags: u32) -> Result<usize, String> {
        let cg = self.cgroup_of(agent)?;
        self.agents
            .update_flags(agent, AGENT_FLAG_DENY_ALL | extra_flags, 0)
            .map_err(|e| e.to_string())?;
        let before = cg.all_pids().map_err(|e| e.to_string())?;
        cg.kill().map_err(|e| e.to_string())?;
        cg.wait_empty(KILL_WAIT).map_err(|e| e.to_string())?;
        // A frozen agent dies frozen; leave the cgroup thawed for whatever is approved next.
        let _ = cg.set_frozen(false);
        Ok(before.len())
    }

    /// Runs a breaker transition of `agent`: the trip's action at once, or its lifting.
    fn on_transition(&mut self, agent: &str, t: Transition) {
        match t {
            Transition::Tripped {
                signal,
                rate,
                baseline,
                action,
            } => {
                let (name, index) = action_label(action);
                tracing::warn!(
                    agent,
                    signal = signal.name(),
                    rate,
                    baseline,
                    action = name,
                    "breaker tripped"
                );
                if let Err(e) = self.agents.count_trip(agent, index) {
                    tracing::error!(agent, "counting the trip: {e}");
                }
                let result = match action {
                    Action::Alert => self.set_flags(agent, AGENT_FLAG_TRIPPED),
                    Action::Deny => self.set_flags(agent, AGENT_FLAG_TRIPPED | AGENT_FLAG_DENY_ALL),
                    Action::Freeze => self.set_flags(agent, AGENT_FLAG_TRIPPED).and_then(|()| {
                        self.cgroup_of(agent)?
                            .set_frozen(true)
                            .map_err(|e| e.to_string())
                    }),
                    Action::Kill => self.kill_tree(agent, AGENT_FLAG_TRIPPED).map(drop),
                };
                let mut fields = json!({
                    "signal": signal.name(),
                    "rate": round(rate),
                    "baseline": round(baseline),
                    "action": name,
                });
                if let Err(e) = &result {
                    tracing::error!(agent, "breaker action {name}: {e}");
                    fields["action_error"] = json!(e);
                }
                self.audit_agent(agent, "breaker_tripped", fields);
            }
            Transition::HalfOpen => {
                // Lift the action; the next window decides whether the breaker closes.
                let _ = self.agents.update_flags(agent, 0, AGENT_FLAG_DENY_ALL);
                if let Ok(cg) = self.cgroup_of(agent) {
                    let _ = cg.set_frozen(false);
                }
                tracing::info!(agent, "breaker half-open");
                self.audit_agent(agent, "breaker_half_open", json!({}));
            }
            Transition::Closed => {
                let _ = self.agents.update_flags(agent, 0, AGENT_FLAG_TRIPPED);
                tracing::info!(agent, "breaker closed");
                self.audit_agent(agent, "breaker_closed", json!({}));
            }
        }
    }

    fn set_flags(&mut self, agent: &str, flags: u32) -> Result<(), String> {
        self.agents
            .update_flags(agent, flags, 0)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// One tick of the behaviour monitor: every agent's counters into its monitor.
    fn tick(&mut self, now: Instant) {
        let names: Vec<String> = self.agents.names().map(str::to_owned).collect();
        for name in names {
            let Ok(c) = self.agents.counters(&name) else {
                continue;
            };
            let counts = [c.connects, c.sends, c.syscalls, c.execs + c.execs_denied];
            let t = self
                .monitors
                .get_mut(&name)
                .and_then(|m| m.observe(now, counts));
            if let Some(t) = t {
                self.on_transition(&name, t);
            }
        }
    }

    fn approve(&mut self, agent: &str, uid: u32) -> Result<Value, String> {
        let cg = self.cgroup_of(agent)?;
        let info = self.agents.info(agent).ok_or("agent vanished")?;
        let frozen = cg.frozen().map_err(|e| e.to_string())?;
        let held =
            info.state.flags & (AGENT_FLAG_KILLED | AGENT_FLAG_TRIPPED | AGENT_FLAG_DENY_ALL);
        if held == 0 && !frozen {
            return Err(format!(
                "agent `{agent}` is not tripped, killed or frozen: nothing to approve"
            ));
        }
        self.agents
            .update_flags(
                agent,
                0,
                AGENT_FLAG_KILLED | AGENT_FLAG_TRIPPED | AGENT_FLAG_DENY_ALL,
            )
            .map_err(|e| e.to_string())?;
        if let Some(m) = self.monitors.get_mut(agent) {
            m.approve();
        }
        if frozen {
            cg.set_frozen(false).map_err(|e| e.to_string())?;
            cg.wait_frozen(false, FREEZE_WAIT)
                .map_err(|e| e.to_string())?;
        }
        self.audit_agent(agent, "approved", json!({ "actor_uid": uid }));
        tracing::info!(agent, actor_uid = uid, "approved");
        Ok(json!({ "state": "running" }))
    }

    fn launch(&self, agent: &str) -> Result<Value, String> {
        let cg = self.cgroup_of(agent)?;
        let flags = self.agents.info(agent).map_or(0, |i| i.state.flags);
        if flags & AGENT_FLAG_KILLED != 0 {
            return Err(format!(
                "agent `{agent}` was killed; `agentwatch approve {agent}` first"
            ));
        }
        if flags & AGENT_FLAG_TRIPPED != 0 {
            return Err(format!(
                "agent `{agent}`'s breaker is open; `agentwatch approve {agent}` first"
            ));
        }
        Ok(json!({
            "cgroup": cg.path().display().to_string(),
            "user": self.config.agent(agent).and_then(|a| a.user.as_deref()),
        }))
    }

    fn agent_state(&self, name: &str, cg: &Cgroup) -> &'static str {
        let flags = self.agents.info(name).map_or(0, |i| i.state.flags);
        if flags & AGENT_FLAG_KILLED != 0 {
            "killed"
        } else if flags & AGENT_FLAG_TRIPPED != 0 {
            "tripped"
        } else if cg.frozen().unwrap_or(false) {
            "frozen"
        } else {
            "running"
        }
    }

    fn status(&self) -> Vec<Value> {
        let mut rows = Vec::new();
        for name in self.agents.names() {
            let Some(cg) = self.agents.cgroup(name) else {
                continue;
            };
            let c = self.agents.counters(name).unwrap_or_default();
            let by_proto = |verdict: u8| -> u64 {
                (0..NUM_PROTOS as u8)
                    .map(|p| c.egress[egress_slot(p, verdict)])
                    .sum()
            };
            let per_proto: serde_json::Map<String, Value> =
                [(0u8, "tcp"), (1, "udp"), (2, "other")]
                    .iter()
                    .map(|(p, n)| {
                        (
                            n.to_string(),
                            json!({
                                "allowed": c.egress[egress_slot(*p, VERDICT_ALLOWED)],
                                "denied": c.egress[egress_slot(*p, VERDICT_DENIED)],
                                "capped": c.egress[egress_slot(*p, VERDICT_CAPPED)],
                            }),
                        )
                    })
                    .collect();
            rows.push(json!({
                "name": name,
                "cgroup": cg.path().display().to_string(),
                "processes": cg.all_pids().map(|p| p.len()).unwrap_or(0),
                "state": self.agent_state(name, cg),
                "egress_denied_all": self.agents.info(name).is_some_and(|i| i.state.flags & AGENT_FLAG_DENY_ALL != 0),
                "allowed": by_proto(VERDICT_ALLOWED),
                "denied": by_proto(VERDICT_DENIED),
                "capped": by_proto(VERDICT_CAPPED),
                "connects": c.connects,
                "sends": c.sends,
                "syscalls": c.syscalls,
                "execs": c.execs,
                "execs_denied": c.execs_denied,
                "forks": c.forks,
                "breaker": self.monitors.get(name).map_or("none", |m| match (m.config(), m.state()) {
                    (None, _) => "none",
                    (Some(_), BreakerState::Closed) => "closed",
                    (Some(_), BreakerState::Open { .. }) => "open",
                    (Some(_), BreakerState::HalfOpen { .. }) => "half_open",
                }),
                "rates": self.monitors.get(name).map(|m| Signal::ALL.iter().map(|s| (s.name().to_owned(), json!(round(m.rate(*s))))).collect::<serde_json::Map<_, _>>()),
                "baselines": self.monitors.get(name).map(|m| Signal::ALL.iter().map(|s| (s.name().to_owned(), json!(m.baseline(*s).map(round)))).collect::<serde_json::Map<_, _>>()),
                "anomaly_score": self.monitors.get(name).map(|m| round(m.anomaly_score())),
                "egress": per_proto,
            }));
        }
        rows
    }

    fn snapshot(&self) -> Snapshot {
        let agents = self
            .agents
            .names()
            .map(|name| {
                let m = self.monitors.get(name);
                AgentSnapshot {
                    name: name.to_owned(),
                    counters: self.agents.counters(name).unwrap_or_default(),
                    frozen: self
                        .agents
                        .cgroup(name)
                        .is_some_and(|cg| cg.frozen().unwrap_or(false)),
                    rates: Signal::ALL.map(|s| m.map_or(0.0, |m| m.rate(s))),
                    baselines: Signal::ALL.map(|s| m.and_then(|m| m.baseline(s))),
                    anomaly_score: m.map_or(0.0, Monitor::anomaly_score),
                    breaker_open: m.is_some_and(Monitor::is_open),
                    trips: self.agents.trips(name),
                }
            })
            .collect();
        Snapshot {
            agents,
            events_lost: self.agents.kernel().events_lost().unwrap_or(0),
            reloads_ok: self.reloads_ok,
            reloads_rejected: self.reloads_rejected,
        }
    }
}

async fn read_events(state: Shared, ring: RingBuf<MapData>) -> Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always reports that same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    loop {
        // Events that arrived while no daemon ran are in the pinned buffer: drain first.
        drain(ring.get_mut(), &state);
        let mut guard = ring.readable_mut().await?;
        drain(guard.get_inner_mut(), &state);
        guard.clear_ready();
    }
}

fn drain(ring: &mut RingBuf<MapData>, state: &Shared) {
    while let Some(item) = ring.next() {
        let event = events::decode(&item);
        drop(item);
        let s = lock(state);
        match event {
            Event::Egress(e) => s.audit_event(
                e.agent_id,
                e.ts_ns,
                e.kind,
                json!({
                    "pid": e.pid,
                    "tid": e.tid,
                    "comm": e.comm,
                    "proto": e.proto,
                    "dest": e.dest.to_string(),
                    "hook": e.hook,
                }),
            ),
            Event::Exec(e) => {
                // The kernel knows the parent only for forks it saw; ask /proc otherwise.
                let ppid = if e.ppid != 0 {
                    e.ppid
                } else {
                    proc_ppid(e.pid).unwrap_or(0)
                };
                if e.kind == "exec_denied" {
                    tracing::warn!(pid = e.pid, path = %e.path, "exec denied: killed");
                }
                s.audit_event(
                    e.agent_id,
                    e.ts_ns,
                    e.kind,
                    json!({
                        "pid": e.pid,
                        "ppid": ppid,
                        "comm": e.comm,
                        "path": e.path,
                    }),
                );
            }
            Event::Unknown { kind, len } => {
                tracing::warn!(kind, len, "unknown event kind from the kernel");
            }
        }
    }
}

/// The parent pid of `pid` from /proc (None if it is gone).
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Label and index (in BREAKER_TRIPS) of an action.
fn action_label(a: Action) -> (&'static str, usize) {
    match a {
        Action::Alert => ("alert", 0),
        Action::Deny => ("deny", 1),
        Action::Freeze => ("freeze", 2),
        Action::Kill => ("kill", 3),
    }
}

/// The kernel policy of a configured agent.
fn policy_of(a: &Agent, rules: egress::CompiledRules) -> Policy {
    Policy {
        rules,
        connects_per_second: a.limits.connects_per_second,
        sends_per_second: a.limits.sends_per_second,
        exec_allow: a.exec_allow.clone(),
        monitor_syscalls: a.monitor.syscalls,
    }
}

/// Feeds every agent's counters to its behaviour monitor ten times a second.
async fn watch_behaviour(state: Shared) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = Arc::clone(&state);
        tokio::task::spawn_blocking(move || lock(&state).tick(Instant::now())).await?;
    }
}

/// The kernel counts events it could not queue; report every increase, never drop silently.
async fn watch_lost(state: Shared) -> Result<()> {
    let mut seen = lock(&state).agents.kernel().events_lost()?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let s = lock(&state);
        let lost = s.agents.kernel().events_lost()?;
        if lost > seen {
            tracing::warn!(
                lost = lost - seen,
                "event ring buffer was full: events lost"
            );
            s.audit_daemon(
                "events_lost",
                json!({ "count": lost - seen, "total": lost }),
            );
            seen = lost;
        }
    }
}

/// Reloads when the config file's content changes (editors that replace the file included).
async fn watch_config(state: Shared) -> Result<()> {
    let ConfigSource::File(path) = lock(&state).source.clone() else {
        return Ok(());
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(now) = tokio::fs::read(&path).await else {
            continue;
        };
        let state = Arc::clone(&state);
        let _ = tokio::task::spawn_blocking(move || {
            let mut s = lock(&state);
            if s.last_seen.as_deref() != Some(now.as_slice()) {
                tracing::info!("config file changed: reloading");
                let _ = s.reload_from_disk();
            }
        })
        .await;
    }
}

async fn serve_control(
    state: Shared,
    listener: UnixListener,
    admin_gid: Option<u32>,
) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            if let Err(e) = control_connection(state, stream, admin_gid).await {
                tracing::debug!("control connection: {e:#}");
            }
        });
    }
}

async fn control_connection(
    state: Shared,
    mut stream: UnixStream,
    admin_gid: Option<u32>,
) -> Result<()> {
    let cred = stream.peer_cred()?;
    let (uid, gid) = (cred.uid(), cred.gid());
    if !control::authorized(uid, gid, cred.pid(), admin_gid) {
        tracing::warn!(
            uid,
            gid,
            "control socket: refused a peer that is not root or an admin"
        );
        let mut line = serde_json::to_vec(&Response::err(format!(
            "permission denied: uid {uid} is not root{}",
            if admin_gid.is_some() {
                " or in the admin group"
            } else {
                ""
            }
        )))?;
        line.push(b'\n');
        stream.write_all(&line).await?;
        return Ok(());
    }
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read.take(control::MAX_REQUEST as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            tracing::debug!(?req, uid, "control request");
            let state = Arc::clone(&state);
            tokio::task::spawn_blocking(move || lock(&state).handle(req, uid)).await?
        }
        Err(e) => Response::err(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

async fn serve_metrics(state: Shared, listener: tokio::net::TcpListener) -> Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = Arc::clone(&state);
            async move {
                let snapshot = tokio::task::spawn_blocking(move || lock(&state).snapshot()).await;
                match snapshot
                    .map_err(|e| e.to_string())
                    .and_then(|s| metrics::render(&s).map_err(|e| e.to_string()))
                {
                    Ok(text) => (
                        axum::http::StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        e,
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app).await?;
    Ok(())
}

/// `agentwatch run --cleanup`: detach and unpin everything under pin_dir, remove the agent
/// cgroups agentwatch created (when empty) and the control socket. For uninstall.
pub fn cleanup(config: &Config) -> Result<String> {
    refuse_if_running(&config.daemon.control_socket)
        .context("stop the daemon before `--cleanup`")?;
    let pins = PinDir::new(&config.daemon.pin_dir);
    let links = pins.remove_all()?;
    let mount = cgroup::cgroup2_mount()?;
    let mut removed = 0;
    let mut kept = Vec::new();
    for a in config.agents.iter().filter(|a| !a.adopted) {
        let path = mount.join(&a.cgroup);
        let Ok(cg) = Cgroup::open(&path) else {
            continue;
        };
        if cg.populated().unwrap_or(true) {
            kept.push(path.display().to_string());
        } else if cg.remove().is_ok() {
            removed += 1;
        }
    }
    let parent = mount.join(&config.daemon.cgroup_parent);
    if let Ok(cg) = Cgroup::open(&parent)
        && !cg.populated().unwrap_or(true)
        && std::fs::read_dir(&parent)
            .is_ok_and(|d| !d.filter_map(Result::ok).any(|e| e.path().is_dir()))
    {
        let _ = cg.remove();
    }
    let _ = std::fs::remove_file(&config.daemon.control_socket);
    let mut summary = format!(
        "detached {links} link(s), removed the pins under {} and {removed} agent cgroup(s)",
        config.daemon.pin_dir.display()
    );
    if !kept.is_empty() {
        summary.push_str(&format!(
            "; kept cgroups that still hold processes: {}",
            kept.join(", ")
        ));
    }
    Ok(summary)
}
