//! `agentwatch run`: guard the configured agents, serve the control socket and /metrics, write
//! the audit trail, reload the policy live.
//!
//! Enforcement lives in pinned kernel objects, not in this process: stopping or killing the
//! daemon leaves every agent guarded, and a new daemon re-adopts the pins without detaching
//! anything. `agentwatch run --cleanup` is the only thing that removes them.
//!
//! The daemon is a set of tasks around one [`State`] (the policy and what enforces it), each
//! task in its own module: [`policy`] (apply a config as a plan; the config watcher), [`control`]
//! (the control socket, one function per request), [`status`] (status rows, /metrics),
//! [`behaviour`] (rates, baselines, breakers), [`reader`] (kernel events into the audit trail),
//! [`sweep`] (once a second: summaries of what was not written one by one, nested cgroups,
//! privileged processes), [`watchdog`] (links switched off are attached again; what the next
//! daemon needs to know of this one).
//! This file holds start-up and the tasks' wiring, nothing else.

mod behaviour;
mod cleanup;
mod control;
mod policy;
mod reader;
mod status;
mod sweep;
mod watchdog;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Context as _, Result, bail};
use tokio::{net::UnixListener, signal::unix::SignalKind};

pub use cleanup::cleanup;

use crate::{
    agent::Agents,
    audit::{self, Audit},
    cgroup,
    config::Config,
    control as protocol, dns,
    kernel::PinDir,
};

/// Where the config came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefault,
}

/// The daemon's state, shared by its tasks behind one lock (held only for short, bounded work).
struct State {
    config: Config,
    source: ConfigSource,
    mount: PathBuf,
    agents: Agents,
    audit: Audit,
    reloads_ok: u64,
    reloads_rejected: u64,
    /// The config file as last seen by the watcher (applied or rejected).
    last_seen: policy::SeenConfig,
    /// Rates, baselines and breakers, per agent.
    monitors: behaviour::Monitors,
    /// What the once-a-second sweep has accounted for.
    swept: sweep::Swept,
    /// The DNS forwarder of agents with hostname rules (its tasks run beside this state and
    /// never take its lock).
    dns: dns::Forwarder,
    /// The API gateway (phantom tokens): like the forwarder, its tasks never take this lock;
    /// the policy tells it the scopes, launches get tokens from it, kills revoke them.
    gateway: crate::gateway::serve::Gateway,
    /// Configured agents whose cgroup was removed from under the daemon: out of the config in
    /// force until their cgroup exists again (`sweep::sweep_vanished`).
    vanished: Vec<crate::config::Agent>,
    /// Without BPF LSM: opens outside an agent's file list found by the daemon (added to the
    /// kernel's `files_denied` wherever counters are shown).
    files_detected: BTreeMap<String, u64>,
    /// Requests refused on the control socket because they came from inside an agent.
    control_refusals: BTreeMap<String, control::Refusals>,
    /// The daemon's files the tamper guard keeps agents from changing (BPF LSM), by inode.
    protected: BTreeMap<agentwatch_common::InodeKey, PathBuf>,
    /// The pin folder's part of `protected`, read again only when `pins_dirty` says the pins
    /// may have changed (reading a folder holds a descriptor while it lasts: not once a
    /// second for nothing).
    protected_pins: BTreeMap<agentwatch_common::InodeKey, PathBuf>,
    pins_dirty: bool,
    /// Links found switched off and attached again, and the checkpoints for the next daemon.
    watchdog: watchdog::Watchdog,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    // A task that panicked while holding the lock left the state as it was; carry on with it.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Raises this process's soft limit on open files to the hard one; the limit now.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    };
    if raised {
        Ok(lim.rlim_cur)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The daemon holds a descriptor per map, program, link and control peer, and the usual soft
/// limit (1,024) is far below what the control socket's connection cap allows.
fn raise_nofile() {
    match raise_nofile_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("could not raise the open files limit: {e}"),
    }
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
    raise_nofile();
    // The daemon holds the agents' API secrets: no core file, and its /proc/<pid>/mem, environ
    // and maps closed to every process without CAP_SYS_PTRACE, a root agent of the same uid
    // included (launch drops that capability).
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(
            "could not make the daemon non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
    // Bound before anything is guarded: a port in use is a config error reported at once, not
    // a daemon that stops halfway through starting.
    let metrics_addr = config.daemon.metrics_listen;
    let metrics = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| {
            format!(
                "binding metrics_listen {metrics_addr} (is another daemon or program using it?)"
            )
        })?;
    let mount = cgroup::cgroup2_mount()?;
    tracing::info!(mount = %mount.display(), "cgroup2 found");
    // Read before the trail is opened for writing: what it ends with is what was written.
    let written = audit::recent_kernel_records(&config.daemon.audit_log);
    let last_line = audit::last_record(&config.daemon.audit_log);
    let rotation = audit::Rotation {
        max_size: config.daemon.audit_max_size.as_u64(),
        keep: config.daemon.audit_keep,
    };
    let audit =
        Audit::open_rotating(&config.daemon.audit_log, Some(rotation)).with_context(|| {
            format!(
                "opening the audit log {}",
                config.daemon.audit_log.display()
            )
        })?;
    tracing::info!(audit_log = %audit::describe(&config.daemon.audit_log).display(), "audit trail open");
    // It binds gateway_listen when the first agent with API scopes is guarded.
    let gateway = crate::gateway::serve::Gateway::new(
        config.daemon.gateway_listen,
        audit.clone(),
        config.daemon.audit_rate,
    );
    let pins = PinDir::new(&config.daemon.pin_dir);
    ensure_bpffs(pins.root())?;
    // Made now, so that it is the daemon's own: an agent that made it first owns it, and the
    // check below refuses that.
    std::fs::create_dir_all(pins.root())
        .with_context(|| format!("creating pin_dir {}", pins.root().display()))?;
    check_ownership(&config, &source)?;
    let adopting = pins.exists();
    let mut agents = Agents::load_pinned(pins).context("loading the kernel programs")?;
    if adopting {
        tracing::info!(pin_dir = %config.daemon.pin_dir.display(), "re-adopting pinned maps and links");
    }
    let previous = watchdog::Previous::read(&agents, last_line.as_ref(), adopting);

    // The tamper guard (BPF LSM) refuses agents' signals to this process.
    agents
        .kernel_mut()
        .set_daemon_tgid(std::process::id())
        .context("telling the tamper guard the daemon's pid")?;
    let ring = agents
        .take_events()
        .context("the event ring buffer was already taken")?;
    let dns = start_dns(&config, &agents, &audit)?;
    let last_seen = match &source {
        ConfigSource::File(p) => policy::SeenConfig::read(p),
        ConfigSource::EmbeddedDefault => policy::SeenConfig::default(),
    };
    let mut state = State {
        config: Config {
            daemon: config.daemon.clone(),
            agents: Vec::new(),
            secrets: BTreeMap::new(),
        },
        source,
        mount,
        agents,
        audit,
        reloads_ok: 0,
        reloads_rejected: 0,
        last_seen,
        monitors: behaviour::Monitors::default(),
        files_detected: BTreeMap::new(),
        control_refusals: BTreeMap::new(),
        protected: BTreeMap::new(),
        protected_pins: BTreeMap::new(),
        pins_dirty: true,
        watchdog: watchdog::Watchdog::default(),
        swept: sweep::Swept::default(),
        dns,
        gateway,
        vanished: Vec::new(),
    };
    state.watchdog.set_home();
    state.note_start(previous.as_ref());
    state.apply(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    state.finish_kills();
    state.judge_gap();
    let stale = state.agents.forget_stale()?;
    if stale.states > 0 || !stale.link_dirs.is_empty() {
        tracing::info!(states = stale.states, links = ?stale.link_dirs, "removed what an earlier daemon left for agents no longer configured");
    }
    // What an earlier daemon learned for agents no longer configured goes with them.
    let live = state
        .agents
        .names()
        .filter_map(|n| state.agents.info(n))
        .map(|i| i.id)
        .collect();
    state.agents.kernel().learned().retain_agents(&live)?;
    let state: Shared = Arc::new(Mutex::new(state));

    // Handled from before the daemon says it runs: a SIGTERM or SIGINT right after "agentwatch
    // running" (a service manager's stop, a test's) is a clean stop, not the default action's
    // death (seen in the 6.1 guest, where the window between the two was long enough to hit).
    let signals = Signals::new()?;
    let listener = bind_control(
        &socket_path,
        lock(&state).config.daemon.admin_group.as_deref(),
    )?;
    tracing::info!(control_socket = %socket_path.display(), metrics = %format!("http://{}/metrics", metrics.local_addr()?), "agentwatch running");

    let admin_gid = lock(&state)
        .config
        .daemon
        .admin_group
        .as_deref()
        .and_then(protocol::group_id);
    // Before the first request: the socket, the config and the trail are guarded from then on.
    guard_files(&state);
    let tasks = [
        tokio::spawn(guard_files_every_second(Arc::clone(&state))),
        tokio::spawn(reader::read_events(Arc::clone(&state), ring, written)),
        tokio::spawn(reader::watch_lost(Arc::clone(&state))),
        tokio::spawn(control::serve(Arc::clone(&state), listener, admin_gid)),
        tokio::spawn(status::serve_metrics(Arc::clone(&state), metrics)),
        tokio::spawn(policy::watch_config(Arc::clone(&state))),
        tokio::spawn(every(Arc::clone(&state), behaviour::TICK, State::tick)),
        tokio::spawn(every(Arc::clone(&state), sweep::PERIOD, State::sweep)),
    ];
    let result = wait_for_signals(&state, signals).await;
    for t in &tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    let n = {
        let mut s = lock(&state);
        if let Ok(signal) = &result {
            s.stopped_clean(signal);
        }
        s.audit.sync();
        s.agents.names().count()
    };
    tracing::info!(
        "agentwatch stopped; {n} agent(s) stay guarded by pinned programs (`agentwatch run --cleanup` removes them)"
    );
    result.map(drop)
}

/// The DNS forwarder. Its upstream is found now; without one, the daemon still runs, and
/// only agents with hostname rules are refused, with the reason.
fn start_dns(config: &Config, agents: &Agents, audit: &Audit) -> Result<dns::Forwarder> {
    let upstream = match dns::Settings::upstream_from(config.daemon.dns_upstream) {
        Ok(addr) => {
            tracing::info!(upstream = %addr, "DNS forwarder upstream");
            Some(addr)
        }
        Err(e) => {
            tracing::warn!("no DNS upstream, so hostname rules cannot be used: {e}");
            None
        }
    };
    let settings = dns::Settings {
        upstream,
        min_ttl: config.daemon.dns_min_ttl,
        max_ttl: config.daemon.dns_max_ttl,
        audit_rate: config.daemon.audit_rate,
    };
    dns::Forwarder::new(
        agents.kernel().learned(),
        agents.kernel().learn(),
        settings,
        audit.clone(),
    )
    .context("starting the DNS forwarder")
}

/// The signals the daemon acts on, taken from the default action once made.
struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            sigint: tokio::signal::unix::signal(SignalKind::interrupt())?,
            sigterm: tokio::signal::unix::signal(SignalKind::terminate())?,
            sighup: tokio::signal::unix::signal(SignalKind::hangup())?,
        })
    }
}

/// Waits for SIGINT or SIGTERM (reloading on SIGHUP meanwhile); the name of the one that came.
async fn wait_for_signals(state: &Shared, signals: Signals) -> Result<&'static str> {
    let Signals {
        mut sigint,
        mut sigterm,
        mut sighup,
    } = signals;
    loop {
        tokio::select! {
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); return Ok("SIGINT"); }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); return Ok("SIGTERM"); }
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

/// The daemon refuses to run on files that anyone but root could write, replace or unlink
/// ([`crate::ownership`]): an agent (never root unless the config says so) could otherwise
/// rewrite its own allow-list, its trail, or the daemon's pins.
fn check_ownership(config: &Config, source: &ConfigSource) -> Result<()> {
    let mut paths = vec![("pin_dir", config.daemon.pin_dir.clone())];
    if let ConfigSource::File(p) = source {
        paths.push(("the config", p.clone()));
    }
    if config.daemon.audit_log != Path::new("-") {
        paths.push(("the audit trail", config.daemon.audit_log.clone()));
    }
    for (what, path) in paths {
        crate::ownership::check(what, &path)?;
    }
    Ok(())
}

fn bind_control(path: &Path, admin_group: Option<&str>) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Whoever may write the socket's folder could put a socket of its own in its place.
        crate::ownership::check("the control socket's folder", dir)?;
    }
    // A stale socket of a daemon that died (refuse_if_running found nobody answering).
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let (mode, gid) = match admin_group.and_then(protocol::group_id) {
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

/// Keeps the tamper guard's set of the daemon's files current (BPF LSM only). The files are
/// looked at without the state's lock (by `lstat`, no descriptor), the pin folder only after
/// something may have changed its pins; only the map update takes the lock.
fn guard_files(state: &Shared) {
    let (paths, pins, walk) = {
        let mut s = lock(state);
        let Some((paths, pins)) = s.guarded_paths() else {
            return;
        };
        (paths, pins, std::mem::take(&mut s.pins_dirty))
    };
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let mut want = crate::tamper::protected(&refs, &[]);
    let walked = walk.then(|| crate::tamper::protected(&[], &[pins.as_path()]));
    let mut s = lock(state);
    if let Some(p) = walked {
        s.protected_pins = p;
    }
    want.extend(s.protected_pins.iter().map(|(k, v)| (*k, v.clone())));
    // Most seconds nothing changed: no map call at all then.
    if s.protected == want {
        return;
    }
    let keys = want.keys().copied().collect();
    match s.agents.kernel_mut().sync_protected(&keys) {
        Ok(()) => s.protected = want,
        Err(e) => {
            s.pins_dirty = true;
            tracing::error!("keeping the tamper guard's file set: {e}");
        }
    }
}

/// [`guard_files`] once a second, on a blocking thread: a file made since (a rotated trail, a
/// new agent's pins) is guarded within a second.
async fn guard_files_every_second(state: Shared) -> Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = Arc::clone(&state);
        tokio::task::spawn_blocking(move || guard_files(&state)).await?;
    }
}

/// Runs `work` on the state every `period` (on a blocking thread: it takes the lock and may
/// read the kernel's maps), for as long as the daemon runs. A tick that comes late is not
/// made up for.
async fn every(state: Shared, period: std::time::Duration, work: fn(&mut State)) -> Result<()> {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = Arc::clone(&state);
        tokio::task::spawn_blocking(move || work(&mut lock(&state))).await?;
    }
}

impl State {
    /// The daemon's files and folders the tamper guard keeps agents from changing: the config
    /// and its folder, the trail and its folder (a rotation makes a new file), the control
    /// socket and its folder, the homes folder; and the pin folder, all of whose contents
    /// count (new agents make new pins). None without BPF LSM (nothing to keep).
    fn guarded_paths(&self) -> Option<(Vec<PathBuf>, PathBuf)> {
        if !self.agents.kernel().files.lsm() {
            return None;
        }
        let d = &self.config.daemon;
        let mut paths: Vec<PathBuf> = vec![d.control_socket.clone(), d.agent_homes.clone()];
        if let Some(dir) = d.control_socket.parent() {
            paths.push(dir.to_owned());
        }
        if let ConfigSource::File(p) = &self.source {
            paths.push(p.clone());
            if let Some(dir) = p.parent() {
                paths.push(dir.to_owned());
            }
        }
        if d.audit_log != Path::new("-") {
            paths.push(d.audit_log.clone());
            if let Some(dir) = d.audit_log.parent() {
                paths.push(dir.to_owned());
            }
        }
        Some((paths, d.pin_dir.clone()))
    }

    fn audit_agent(&self, agent: &str, kind: &str, fields: serde_json::Value) {
        self.audit.record(agent, kind, fields);
    }

    fn audit_daemon(&self, kind: &str, fields: serde_json::Value) {
        self.audit.record_daemon(kind, fields);
    }
}
