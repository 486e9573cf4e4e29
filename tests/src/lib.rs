//! Helpers for agentwatch's privileged end-to-end tests, in the style of aya's test_helpers:
//! guards that create kernel state (cgroups, network namespaces) and remove it on Drop, also
//! when a test fails.

use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod bench;
pub mod dns;
pub mod prom;
pub mod upstream;

use agentwatch::{
    cgroup::{self, Cgroup},
    events::{self, EgressAttempt, Event},
};
use aya::maps::{MapData, RingBuf};

/// Prefix of every cgroup and pin the tests create, so leftovers are easy to find.
pub const TEST_PREFIX: &str = "agentwatch-test-";

/// Decides whether privileged tests run. They run unless the developer set
/// `AGENTWATCH_SKIP_PRIVILEGED=1` on purpose; without root or BPF they fail with the reason,
/// never skip silently.
pub fn require_privileged() -> bool {
    if std::env::var("AGENTWATCH_SKIP_PRIVILEGED").is_ok_and(|v| v == "1") {
        eprintln!("AGENTWATCH_SKIP_PRIVILEGED=1: skipping a privileged test");
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "privileged tests need root (euid is {euid}); run them as root, or set \
         AGENTWATCH_SKIP_PRIVILEGED=1 to skip them on purpose"
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists()
            || Path::new("/proc/sys/kernel/bpf_stats_enabled").exists(),
        "this kernel shows no sign of BPF support (no /sys/kernel/btf/vmlinux, no \
         /proc/sys/kernel/bpf_stats_enabled)"
    );
    true
}

/// Skips the calling test only when `AGENTWATCH_SKIP_PRIVILEGED=1`.
#[macro_export]
macro_rules! privileged {
    () => {
        if !$crate::require_privileged() {
            return;
        }
    };
}

/// `limit` stretched by `AGENTWATCH_TEST_TIME_SCALE` (default 1), for the helpers' deadlines
/// (how long to wait for something that will happen), never for a rate or a window a test
/// asserts on. `cargo xtask vmtest` sets it: under QEMU's TCG the guest runs the daemon's
/// start-up (BPF verification) about 10-20 times slower than the host.
pub fn patience(limit: Duration) -> Duration {
    limit * time_scale()
}

/// `AGENTWATCH_TEST_TIME_SCALE` (default 1): how many times slower than the host this machine
/// runs the tests.
pub fn time_scale() -> u32 {
    std::env::var("AGENTWATCH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// In a guest of `cargo xtask vmtest` (`AGENTWATCH_IN_VM` set): prints
/// `SKIPPED under TCG: <reason>` where the run's log shows it (straight to stdout: libtest keeps
/// a passing test's `println!` to itself) and returns true, for the caller to skip what
/// emulation cannot judge. On the host: false, nothing printed.
pub fn skipped_under_tcg(reason: &str) -> bool {
    if std::env::var_os("AGENTWATCH_IN_VM").is_none() {
        return false;
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "SKIPPED under TCG: {reason}");
    true
}

/// `d` stretched by the time scale, for the durations a test configures and then asserts on
/// (a breaker's warmup and window, a TTL, a lease, the phases and sleeps timed against them).
/// Stretched together they keep the test's meaning; on the host (scale 1) nothing changes.
/// Under TCG, starting a process (`agentwatch launch`, a probe) takes seconds, so a 1 s TTL
/// or a 500 ms window would judge the emulator instead of agentwatch.
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// [`scaled`] as a config duration (`"5000ms"`).
pub fn scaled_toml(d: Duration) -> String {
    format!("{}ms", scaled(d).as_millis())
}

/// `per_second` divided by the time scale: the rate of a test whose durations are [`scaled`],
/// so every window sees the same number of calls as on the host (a guest under TCG cannot
/// make 300 TCP connects a second, but 30 over a window ten times as long is the same burst
/// to the breaker). On the host (scale 1) the rate is unchanged.
pub fn scaled_rate(per_second: f64) -> f64 {
    per_second / f64::from(time_scale())
}

/// A `rate:seconds` phase for `aw-probe pace`, with the rate [`scaled_rate`] and the seconds
/// [`scaled`]: the same number of calls, spread over a stretched time.
pub fn pace_phase(per_second: f64, secs: f64) -> String {
    format!(
        "{}:{}",
        scaled_rate(per_second),
        secs * f64::from(time_scale())
    )
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process: `agentwatch-test-<pid>-<n>`.
pub fn unique_name() -> String {
    format!(
        "{TEST_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cgroup the test created directly under the cgroup2 mount. On Drop it kills whatever runs
/// in it (only processes the test started can be there) and removes it with its children.
pub struct TestCgroup {
    cgroup: Cgroup,
}

impl TestCgroup {
    pub fn new() -> Self {
        let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
        Self::at(mount.join(unique_name()))
    }

    /// A cgroup at `path` (which must be below a cgroup this test created).
    pub fn at(path: PathBuf) -> Self {
        let (cgroup, created) = Cgroup::create(&path).expect("creating a test cgroup");
        assert!(created, "{} already existed", path.display());
        Self { cgroup }
    }

    /// A child cgroup `name` below this one.
    pub fn child(&self, name: &str) -> Self {
        Self::at(self.cgroup.path().join(name))
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    pub fn path(&self) -> &Path {
        self.cgroup.path()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.cgroup.path().exists() {
            return;
        }
        // Thaw first: a frozen process cannot die until thawed on older kernels.
        let _ = self.cgroup.set_frozen(false);
        let _ = self.cgroup.kill();
        if let Err(e) = self.cgroup.wait_empty(patience(Duration::from_secs(5))) {
            eprintln!("test cgroup cleanup: {e}");
        }
        if let Err(e) = self.cgroup.remove() {
            eprintln!("test cgroup cleanup: {e}");
        }
    }
}

/// Runs the rest of the calling *thread* in a new network namespace with `lo` up; the thread's
/// original namespace is restored on Drop. Processes spawned from this thread start in it.
pub struct NetNsGuard {
    original: fs::File,
}

impl NetNsGuard {
    pub fn new() -> Self {
        let original = fs::File::open("/proc/thread-self/ns/net").expect("opening own netns");
        // SAFETY: unshare only affects this thread's namespace membership.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let guard = Self { original };
        guard.ip(&["link", "set", "lo", "up"]);
        guard
    }

    /// Runs `ip ARGS` inside the namespace; panics on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("running ip (iproute2)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Makes every address of `net` local to this namespace (AnyIP route on lo), so a listener
    /// on the wildcard address answers for all of them.
    pub fn local_route(&self, net: &str) {
        if net.contains(':') {
            self.ip(&["-6", "route", "add", "local", net, "dev", "lo"]);
        } else {
            self.ip(&["route", "add", "local", net, "dev", "lo"]);
        }
    }
}

impl Default for NetNsGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // SAFETY: setns with a valid namespace fd; affects this thread only. The new namespace
        // goes away with its last user.
        let ret = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if ret != 0 {
            eprintln!(
                "restoring the network namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// One attempt reported by aw-probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub op: String,
    pub dest: String,
    pub ok: bool,
    pub errno: i32,
    pub pid: u32,
    pub ppid: u32,
}

/// Path of the aw-probe binary.
pub fn probe_bin() -> PathBuf {
    // Integration tests of this package see CARGO_BIN_EXE_*; the helpers may run from elsewhere.
    if let Some(p) = option_env!("CARGO_BIN_EXE_aw-probe") {
        return PathBuf::from(p);
    }
    target_dir().join("aw-probe")
}

/// Path of the agentwatch binary (built by `cargo test --workspace`).
pub fn agentwatch_bin() -> PathBuf {
    target_dir().join("agentwatch")
}

/// The Python of the virtualenv with the official API SDKs (openai, anthropic) that
/// `cargo xtask setup` makes under target/, where an agent's own uid can read it; a clear
/// failure when it is missing.
pub fn sdk_python() -> PathBuf {
    let python = target_dir()
        .parent()
        .map(|t| t.join("sdk-venv/bin/python"))
        .expect("target/ above target/<profile>");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` installs the API SDKs the gateway tests run",
        python.display()
    );
    python
}

/// target/<profile>: the test executable lives in target/<profile>/deps.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test executable is in target/<profile>/deps")
}

/// Runs aw-probe inside `cgroup` (or where the test runs, if None) and returns its output.
pub fn run_probe(cgroup: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(probe_bin());
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    let out = cmd.args(args).output().expect("running aw-probe");
    assert!(
        out.status.success(),
        "aw-probe {args:?} failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs aw-probe and parses its attempts.
pub fn probe(cgroup: Option<&Path>, args: &[&str]) -> Vec<Attempt> {
    parse_attempts(&run_probe(cgroup, args).stdout)
}

/// Parses aw-probe's JSON lines.
pub fn parse_attempts(stdout: &[u8]) -> Vec<Attempt> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("aw-probe JSON");
            Attempt {
                op: v["op"].as_str().unwrap_or_default().to_owned(),
                dest: v["dest"].as_str().unwrap_or_default().to_owned(),
                ok: v["ok"].as_bool().unwrap_or(false),
                errno: v["errno"]
                    .as_i64()
                    .and_then(|e| i32::try_from(e).ok())
                    .unwrap_or(-1),
                pid: v["pid"]
                    .as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or(0),
                ppid: v["ppid"]
                    .as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or(0),
            }
        })
        .collect()
}

/// The single attempt of a probe run that makes exactly one.
pub fn one(attempts: Vec<Attempt>) -> Attempt {
    assert_eq!(attempts.len(), 1, "expected one attempt: {attempts:?}");
    attempts.into_iter().next().expect("one attempt")
}

/// Reads egress events until `n` arrived (or 5 s passed), then waits briefly for extras.
pub fn read_events(ring: &mut RingBuf<MapData>, n: usize) -> Vec<EgressAttempt> {
    let mut out = Vec::new();
    let start = Instant::now();
    let mut settled: Option<Instant> = None;
    loop {
        while let Some(item) = ring.next() {
            match events::decode(&item) {
                Event::Egress(e) => out.push(e),
                // Exec, socket, escape, file and tamper events have their own tests.
                Event::Exec(_)
                | Event::Socket(_)
                | Event::Escape(_)
                | Event::File(_)
                | Event::Tamper(_) => {}
                Event::Unknown { kind, len } => panic!("unknown event kind {kind} ({len} bytes)"),
            }
        }
        if out.len() >= n {
            // Give stray extra events a moment to show up, so "exactly n" means something.
            let since = *settled.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(200) {
                return out;
            }
        }
        if start.elapsed() > patience(Duration::from_secs(5)) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub const EPERM: i32 = libc::EPERM;

/// Does this kernel run BPF LSM? Then agentwatch refuses (EPERM) an exec outside an agent's
/// allow-list where it otherwise kills it: tests expect one or the other from this.
pub fn bpf_lsm() -> bool {
    agentwatch::bpf::load::bpf_lsm_active()
}

/// Asserts how a spawn-each line of an exec outside the allow-list ended: refused with EPERM
/// (BPF LSM) or killed by SIGKILL.
pub fn assert_exec_denied(line: &serde_json::Value) {
    if bpf_lsm() {
        assert_eq!(
            (line["errno"].as_i64(), line["signal"].as_i64()),
            (Some(i64::from(EPERM)), None),
            "refused: {line}"
        );
    } else {
        assert_eq!(line["signal"].as_i64(), Some(9), "killed: {line}");
    }
}

/// A scratch folder removed on Drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name());
        fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl TempDir {
    /// A scratch folder an agent may write too (mode 1777, like /tmp): agents run as uids of
    /// their own, not as the test's root.
    pub fn for_agents() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let d = Self::new();
        fs::set_permissions(&d.0, fs::Permissions::from_mode(0o1777)).expect("chmod temp dir");
        d
    }
}

impl TempDir {
    /// A gateway secret file `name` holding `value` and a newline, mode 0600 (root's alone,
    /// as the daemon requires).
    pub fn secret(&self, name: &str, value: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.0.join(name);
        fs::write(&p, format!("{value}\n")).expect("secret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A real `agentwatch run` daemon with its own cgroup parent, pin folder, control socket,
/// audit log and metrics port. On Drop it kills the daemon, everything in its cgroups, and
/// removes its pins and cgroups, also when the test failed.
pub struct DaemonEnv {
    pub dir: TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub audit: PathBuf,
    pub pin_dir: PathBuf,
    /// Absolute path of the agents' parent cgroup.
    pub cgroup_parent: PathBuf,
    parent_name: String,
    /// Extra `[daemon]` lines, appended to the environment's own.
    daemon_extra: String,
    log: PathBuf,
    child: Option<std::process::Child>,
    /// Environment of the daemons started from now on (e.g. `AGENTWATCH_CRASH_AT`).
    daemon_env: Vec<(String, String)>,
}

impl DaemonEnv {
    pub fn new() -> Self {
        let dir = TempDir::new();
        let name = unique_name();
        let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
        Self {
            config: dir.0.join("agentwatch.toml"),
            socket: dir.0.join("control.sock"),
            audit: dir.0.join("audit.jsonl"),
            log: dir.0.join("daemon.log"),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            cgroup_parent: mount.join(&name),
            parent_name: name,
            daemon_extra: String::new(),
            dir,
            child: None,
            daemon_env: Vec::new(),
        }
    }

    /// The `[daemon]` section every config of this environment uses, with the extra lines of
    /// [`Self::set_daemon_extra`].
    pub fn daemon_section(&self) -> String {
        format!(
            "[daemon]\ncgroup_parent = \"{}\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
             metrics_listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\naudit_log = \"{}\"\n\
             agent_homes = \"{}\"\n{}\n",
            self.parent_name,
            self.pin_dir.display(),
            self.socket.display(),
            self.audit.display(),
            self.homes().display(),
            self.daemon_extra
        )
    }

    /// A folder every agent may write (mode 1777, like /tmp), for the files a test's agent
    /// writes (counters, markers): agents run as uids of their own, and the environment's own
    /// folder, which holds the config and the trail, is root's alone.
    pub fn scratch(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.dir.0.join("scratch");
        if !p.exists() {
            fs::create_dir_all(&p).expect("scratch dir");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).expect("chmod scratch");
        }
        p
    }

    /// Where the daemon makes the homes of agents that run as a uid of their own.
    pub fn homes(&self) -> PathBuf {
        self.dir.0.join("homes")
    }

    /// Adds `lines` (TOML key = value lines, e.g. `dns_upstream = "127.0.0.1:5353"`) to the
    /// `[daemon]` section of every config written from now on; replaces earlier extra lines.
    pub fn set_daemon_extra(&mut self, lines: &str) {
        self.daemon_extra = lines.trim_end().to_owned();
        if !self.daemon_extra.is_empty() {
            self.daemon_extra.push('\n');
        }
    }

    /// Writes the config: the environment's `[daemon]` section followed by `agents`.
    pub fn write_config(&self, agents: &str) {
        // Write-then-rename, so the daemon's file watcher never reads half a file.
        let tmp = self.dir.0.join("agentwatch.toml.tmp");
        fs::write(&tmp, format!("{}{agents}", self.daemon_section())).expect("writing config");
        fs::rename(&tmp, &self.config).expect("renaming config");
    }

    /// Starts the daemon and waits until it serves.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(agentwatch_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting agentwatch run");
        self.child = Some(child);
        let runs_before = self.log().matches("agentwatch running").count();
        let start = Instant::now();
        while self.log().matches("agentwatch running").count() == runs_before {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("agentwatch run exited with {status}:\n{}", self.log());
            }
            assert!(
                start.elapsed() < patience(Duration::from_secs(15)),
                "daemon did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `agentwatch audit verify` on this environment's trail; panics with its report unless the
    /// chain is intact.
    pub fn verify_audit(&self) {
        let out = Command::new(agentwatch_bin())
            .args(["audit", "verify"])
            .arg(&self.audit)
            .output()
            .expect("audit verify");
        assert!(
            out.status.success(),
            "the audit chain: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Sets the environment of the daemons started from now on (replacing earlier settings).
    pub fn set_daemon_env(&mut self, vars: &[(&str, &str)]) {
        self.daemon_env = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Waits until the daemon exits by itself (a crash point); its signal, if a signal ended it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        let mut child = self.child.take().expect("a daemon to wait for");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.signal();
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid().expect("daemon running")).expect("pid");
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(pid, signal) };
    }

    /// Sends `signal` and waits for the daemon to exit; returns its exit code.
    pub fn stop_with(&mut self, signal: i32) -> Option<i32> {
        self.signal(signal);
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                start.elapsed() < patience(Duration::from_secs(15)),
                "daemon did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `agentwatch --socket <this socket> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agentwatch_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running agentwatch")
    }

    /// Sends `request` over the control socket as the CLI does, but waits as long as
    /// [`patience`] allows instead of the CLI's fixed 30 s: under TCG a request over a full
    /// kernel map (`learn` after a flood) takes longer than that. The daemon's answer, or the
    /// test fails with its refusal.
    pub fn request(&self, request: &agentwatch::control::Request) -> serde_json::Value {
        agentwatch::control::call(&self.socket, request, patience(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("control request: {e}"))
            .into_result()
            .unwrap_or_else(|e| panic!("control request refused: {e}"))
    }

    /// `agentwatch --socket <this socket> launch --agent AGENT -- CMD...`, for the caller to add
    /// more arguments and run or spawn.
    pub fn launch_command(&self, agent: &str, cmd: &[&str]) -> Command {
        let mut c = Command::new(agentwatch_bin());
        c.arg("--socket")
            .arg(&self.socket)
            .args(["launch", "--agent", agent, "--"])
            .args(cmd);
        c
    }

    /// `agentwatch --socket <this socket> launch --agent AGENT -- aw-probe`, for the caller to
    /// add aw-probe's arguments and run or spawn.
    pub fn probe_command(&self, agent: &str) -> Command {
        let mut cmd = self.launch_command(agent, &[]);
        cmd.arg(probe_bin());
        cmd
    }

    /// `agentwatch launch --agent AGENT -- aw-probe ARGS`, run to completion.
    pub fn launch_probe(&self, agent: &str, args: &[&str]) -> Output {
        self.probe_command(agent)
            .args(args)
            .output()
            .expect("running agentwatch launch")
    }

    /// `agentwatch status --json`, parsed: agent name -> row.
    pub fn status(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        v["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .map(|r| (r["name"].as_str().unwrap_or_default().to_owned(), r.clone()))
            .collect()
    }

    /// Absolute path of agent `name`'s cgroup (created by the daemon).
    pub fn agent_cgroup(&self, name: &str) -> PathBuf {
        self.cgroup_parent.join(name)
    }

    /// The folder of agent `name`'s link pins (`links/NAME@CGROUP_ID`): there is exactly one.
    pub fn agent_link_dir(&self, name: &str) -> PathBuf {
        let prefix = format!("{name}@");
        let dirs: Vec<PathBuf> = fs::read_dir(self.pin_dir.join("links"))
            .expect("links folder")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        assert_eq!(dirs.len(), 1, "one link folder of {name}: {dirs:?}");
        dirs.into_iter().next().expect("one folder")
    }

    /// The audit trail's written lines, parsed.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        written_lines(&fs::read_to_string(&self.audit).unwrap_or_default())
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Waits until the audit trail holds at least `n` lines of `kind`; returns those lines.
    pub fn wait_audit(&self, kind: &str, n: usize) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let lines: Vec<_> = self
                .audit_lines()
                .into_iter()
                .filter(|l| l["kind"] == kind)
                .collect();
            if lines.len() >= n || start.elapsed() > patience(Duration::from_secs(10)) {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Scrapes /metrics (address from the daemon's last start-up log line).
    pub fn metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let log = self.log();
        let addr = log
            .rsplit("metrics=http://")
            .next()
            .and_then(|rest| rest.split('/').next())
            .expect("metrics address in the log")
            .to_owned();
        let mut s = std::net::TcpStream::connect(&addr).expect("connecting to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// The value of the metric line that starts with `series` (name and labels).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }
}

/// The lines of a file another process appends to, without the last one if it has no newline
/// yet: a reader can see a line's start before its end even though the daemon writes each line
/// in one write(2) (the kernel copies and publishes a write page by page).
pub fn written_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

impl Default for DaemonEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for DaemonEnv {
    fn drop(&mut self) {
        // A failed test's daemon says what it saw: CI keeps only the output, not the files.
        if std::thread::panicking() {
            let trail = fs::read_to_string(&self.audit).unwrap_or_default();
            let log = self.log();
            eprintln!(
                "---- daemon audit trail ({}), last 60 lines ----\n{}\n---- daemon log, last 60 lines ----\n{}",
                self.audit.display(),
                last_lines(&trail, 60),
                last_lines(&log, 60)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(cg) = Cgroup::open(&self.cgroup_parent) {
            let _ = cg.set_frozen(false);
            let _ = cg.kill();
            let _ = cg.wait_empty(patience(Duration::from_secs(5)));
        }
        if let Err(e) = agentwatch::kernel::PinDir::new(&self.pin_dir).remove_all() {
            eprintln!("daemon env cleanup: {e}");
        }
        if let Ok(cg) = Cgroup::open(&self.cgroup_parent)
            && let Err(e) = cg.remove()
        {
            eprintln!("daemon env cleanup: {e}");
        }
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of the kernel's event timestamps).
pub use agentwatch::bpf::ktime_ns as monotonic_ns;

/// Does the cgroup2 mount carry `nsdelegate`?
pub fn cgroup2_nsdelegate() -> bool {
    agentwatch::cgroup::nsdelegate()
}

/// Polls `f` every 10 ms until it holds; fails the test after `patience(timeout)`, naming
/// `what`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    assert!(
        holds_within(timeout, f),
        "timed out after {:?} waiting for {what}",
        patience(timeout)
    );
}

/// Polls `f` every 10 ms until it holds: true then, false once `patience(timeout)` has passed
/// without it. For a wait whose failure message needs what was seen last.
pub fn holds_within(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let timeout = patience(timeout);
    let start = Instant::now();
    while !f() {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Sleeps until `at` (at once if it passed).
pub fn sleep_until(at: Instant) {
    if let Some(d) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// A TCP listener on `addr` (port 0: one the kernel picks) and its port.
pub fn tcp_listener(addr: &str) -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind(addr).expect(addr);
    let port = l.local_addr().expect("local_addr").port();
    (l, port)
}

/// A TCP listener on loopback that accepts and drops every connection (its backlog never
/// fills); its port.
pub fn accepting() -> u16 {
    let (l, port) = tcp_listener("127.0.0.1:0");
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    port
}

/// The entries of a map, counted with BPF_MAP_GET_NEXT_KEY (aya keeps its key iterator to
/// typed maps; this counts any map whatever its key type).
pub fn count_entries(info: &aya::maps::MapInfo) -> Option<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = info.fd().ok()?;
    let size = usize::try_from(info.key_size()).ok()?;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut first = true;
    let mut n = 0u64;
    // A concurrent delete can restart the walk; bound it rather than loop forever.
    let bound = u64::from(info.max_entries()) * 2 + 2;
    while n < bound {
        // union bpf_attr for BPF_MAP_GET_NEXT_KEY: map_fd, pad, key, next_key.
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            next_key: u64,
            flags: u64,
        }
        let attr = Attr {
            map_fd: u32::try_from(fd.as_fd().as_raw_fd()).ok()?,
            _pad: 0,
            // NULL asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_GET_NEXT_KEY reads key_size bytes at `key` and writes key_size bytes
        // at `next_key`, both buffers of that size that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                libc::c_long::from(4i32), // BPF_MAP_GET_NEXT_KEY
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if ret != 0 {
            break;
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        n += 1;
    }
    Some(n)
}

/// The entries of the map pinned at `pin_dir/maps/name` (None: no such pin).
pub fn pinned_entries(pin_dir: &std::path::Path, name: &str) -> Option<u64> {
    let info = aya::maps::MapInfo::from_pin(pin_dir.join("maps").join(name)).ok()?;
    count_entries(&info)
}
