//! The TOML config: schema, defaults, and validation that reports every error with its place.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    cgroup,
    rules::{
        egress::{CompiledRules, EgressRule, Rule},
        names::HostRules,
    },
};

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/agentwatch/agentwatch.toml";

/// The config used when there is no file: it runs, guards nothing, and serves metrics.
pub const EMBEDDED_DEFAULT: &str = "# agentwatch embedded default: no agents.\n[daemon]\n";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default)]
    agents: Vec<RawAgent>,
    #[serde(default)]
    secrets: std::collections::BTreeMap<String, Spanned<crate::gateway::scope::RawSecret>>,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Agents live at `<cgroup2 mount>/<cgroup_parent>/<name>` unless they adopt a cgroup.
    pub cgroup_parent: String,
    /// Pinned links (each holds its attached program) and maps, so enforcement outlives the daemon.
    pub pin_dir: PathBuf,
    /// The control socket of the CLI.
    pub control_socket: PathBuf,
    /// Where Prometheus scrapes /metrics.
    pub metrics_listen: SocketAddr,
    /// JSON lines audit trail; `-` is stdout.
    pub audit_log: PathBuf,
    /// Members of this group may use the control socket too (root always may).
    pub admin_group: Option<String>,
    /// Per agent: denial lines written one by one per second; beyond it they are counted in the
    /// kernel and written once a second as a summary (`egress_denied_summary`).
    pub audit_rate: u32,
    /// The trail is rotated when it reaches this size ...
    pub audit_max_size: bytesize::ByteSize,
    /// ... keeping this many rotated files (`audit.jsonl.1` is the newest).
    pub audit_keep: u32,
    /// Where the DNS forwarder of hostname rules asks (None: the first nameserver of
    /// /etc/resolv.conf). `IP` or `IP:PORT`.
    #[serde(deserialize_with = "de::upstream")]
    pub dns_upstream: Option<SocketAddr>,
    /// An answer's addresses stay allowed at least this long ...
    #[serde(deserialize_with = "de::duration")]
    pub dns_min_ttl: Duration,
    /// ... and at most this long, whatever the answer's TTL (the TTLs the agent sees are lowered
    /// to this, so its cache forgets an address no later than the kernel does).
    #[serde(deserialize_with = "de::duration")]
    pub dns_max_ttl: Duration,
    /// `launch` runs an agent without `user` as a uid of its own from this range (`LO-HI`).
    #[serde(deserialize_with = "de::uid_range")]
    pub agent_uids: crate::uids::UidRange,
    /// The private homes of those agents: `<agent_homes>/<name>`, made by the daemon, owned
    /// by the agent's uid, mode 0700.
    pub agent_homes: PathBuf,
    /// Each learn-mode agent's share of the kernel's learn records: at most this many
    /// destinations, and this many exec'd paths. Beyond it the agent's own records are
    /// counted as lost (`learn` says its proposal is partial); no other agent loses any.
    pub learn_quota: u64,
    /// The API gateway's plain-HTTP listener, where agents' scopes are served (loopback).
    pub gateway_listen: SocketAddr,
}

/// Deserializers of `[daemon]` values that TOML has no type for.
mod de {
    use std::{net::SocketAddr, time::Duration};

    use serde::{Deserialize as _, Deserializer, de::Error as _};

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| D::Error::custom(format!("`{s}`: {e} (e.g. \"5s\", \"1h\")")))
    }

    pub fn uid_range<'de, D: Deserializer<'de>>(d: D) -> Result<crate::uids::UidRange, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }

    pub fn upstream<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Some(addr));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Some(SocketAddr::new(ip, 53)))
            .map_err(|_| {
                D::Error::custom(format!(
                    "`{s}` is not an address: expected IP or IP:PORT (e.g. \"127.0.0.53:53\", \"[2001:db8::53]:53\")"
                ))
            })
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            // One subtree for everything agentwatch creates: easy to find, easy to clean.
            cgroup_parent: "agentwatch".to_owned(),
            // bpffs is the only place pins can live; one folder per daemon.
            pin_dir: PathBuf::from("/sys/fs/bpf/agentwatch"),
            // /run is root-owned tmpfs: the socket vanishes at reboot with the daemon.
            control_socket: PathBuf::from("/run/agentwatch/control.sock"),
            // Loopback only: metrics name agents, which is nobody else's business by default.
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9750)),
            // Persistent and append-only; logrotate-friendly location.
            audit_log: PathBuf::from("/var/log/agentwatch/audit.jsonl"),
            // Root only, unless ops choose a group.
            admin_group: None,
            // Enough to read every denial of an agent that is merely misconfigured; a flooding
            // agent costs at most this many lines a second plus one summary.
            audit_rate: 100,
            // Days of ordinary denials, minutes of a flood at the rate above: never a full disk.
            audit_max_size: bytesize::ByteSize::mib(100),
            // 1 GiB of history at the default size.
            audit_keep: 10,
            // The host's own resolver, as every other program on it uses.
            dns_upstream: None,
            // Long enough for a connect that follows its lookup even on a loaded host.
            dns_min_ttl: Duration::from_secs(5),
            // A CDN's address is not trusted for longer than an hour without asking again.
            dns_max_ttl: Duration::from_secs(3600),
            // 2^24 uids above systemd-nspawn's container range (524288-1879048191) and below
            // 2^31: no login user, system user, DynamicUser or container has one, and few
            // enough agents share it that their hashed uids seldom collide.
            agent_uids: crate::uids::UidRange::DEFAULT,
            // 16,384 destinations (and paths): far more than an agent doing one job calls,
            // and 64 learn-mode agents' worth fit in the kernel's maps.
            learn_quota: agentwatch_common::DEFAULT_LEARN_QUOTA,
            // Persistent, root's, beside the rest of agentwatch's state.
            agent_homes: PathBuf::from("/var/lib/agentwatch/home"),
            // Loopback, beside metrics: only this host's agents call it, and the kernel says
            // which one each caller is.
            gateway_listen: SocketAddr::from(([127, 0, 0, 1], 9751)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    #[serde(default)]
    cgroup: Option<Spanned<String>>,
    #[serde(default)]
    user: Option<Spanned<String>>,
    #[serde(default)]
    egress: Vec<Spanned<String>>,
    #[serde(default)]
    exec_allow: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    limits: Option<Spanned<Limits>>,
    #[serde(default)]
    breaker: Option<Spanned<RawBreaker>>,
    #[serde(default)]
    monitor: Monitor,
    #[serde(default)]
    files: Option<Spanned<RawFiles>>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    lease: Option<Spanned<String>>,
    #[serde(default)]
    lease_action: Option<LeaseAction>,
    #[serde(default)]
    apis: Vec<crate::gateway::scope::RawApi>,
}

/// How an agent's allow-list is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Calls the allow-list does not admit get EPERM.
    #[default]
    Enforce,
    /// Nothing the allow-list would deny is denied: it is counted and audited
    /// (`egress_would_deny`). Caps, the exec allow-list, the escape guards, leases and the
    /// kill switch still hold.
    Learn,
}

/// What happens when an agent's egress lease runs out. Egress is denied in the kernel in every
/// case; `freeze` and `kill` also stop the agent's processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseAction {
    #[default]
    Deny,
    Freeze,
    Kill,
}

impl LeaseAction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Freeze => "freeze",
            Self::Kill => "kill",
        }
    }
}

/// `[agents.limits]`: hard caps per second, enforced in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub connects_per_second: Option<u32>,
    pub sends_per_second: Option<u32>,
    /// Outbound bytes per second (IP packets, headers included); over it, packets are dropped.
    pub egress_bytes_per_second: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    #[serde(default)]
    warmup: Option<Spanned<String>>,
    #[serde(default)]
    window: Option<Spanned<String>>,
    #[serde(default)]
    trip_factor: Option<Spanned<f64>>,
    #[serde(default)]
    min_rate: Option<Spanned<f64>>,
    #[serde(default)]
    min_bytes_rate: Option<Spanned<f64>>,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    require_approval: Option<bool>,
    #[serde(default)]
    cooldown: Option<Spanned<String>>,
}

/// What a tripped breaker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Alert,
    Deny,
    Freeze,
    Kill,
}

/// `[agents.breaker]`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breaker {
    pub warmup: Duration,
    pub window: Duration,
    pub trip_factor: f64,
    pub min_rate: f64,
    /// The `bytes` signal's own floor, in bytes per second.
    pub min_bytes_rate: f64,
    pub action: Action,
    pub require_approval: bool,
    /// Without `require_approval`: how long the breaker stays open before it half-opens.
    pub cooldown: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            // Long enough to see an agent's start-up, short enough to guard it soon.
            warmup: Duration::from_secs(30),
            window: Duration::from_secs(1),
            // A 5x jump over the agent's own normal is well outside ordinary jitter.
            trip_factor: 5.0,
            // Below this absolute rate nothing is an emergency, whatever the ratio.
            min_rate: 20.0,
            // An agent's ordinary chatter is far below 64 KiB a second; an upload is not.
            min_bytes_rate: 65536.0,
            // Pausing loses nothing and leaves a human to decide.
            action: Action::Freeze,
            require_approval: true,
            // Long enough for a human to look before the agent is let go again.
            cooldown: Duration::from_secs(30),
        }
    }
}

/// `[agents.files]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    allow: Vec<Spanned<String>>,
}

/// `[agents.monitor]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    /// Per-agent syscall counts; costs every syscall on the host a little.
    #[serde(default)]
    pub syscalls: bool,
}

/// One agent, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub name: String,
    /// The cgroup relative to the cgroup2 mount.
    pub cgroup: String,
    /// True when the config names the cgroup (adopted, not created by agentwatch).
    pub adopted: bool,
    /// Whom `agentwatch launch` runs the command as: `user = "NAME"` (its groups, primary
    /// group and uid; only the name's form is checked here, whether the user exists is checked
    /// at launch), `user = "root"`, or without `user` a uid of its own (never root by default).
    pub run_as: crate::uids::RunAs,
    /// The address rules of `egress` (enforced by the kernel's rule tries).
    pub egress: Vec<Rule>,
    /// The hostname rules of `egress` (enforced through the DNS forwarder).
    pub hostnames: HostRules,
    /// `egress` compiled for the kernel (done once, while validating).
    pub compiled: CompiledRules,
    /// None: no exec allow-list; Some(list): an exec of anything else is killed.
    pub exec_allow: Option<Vec<PathBuf>>,
    /// `[agents.files] allow`: None, no file guard; Some(list): opens outside it are refused
    /// (BPF LSM) or detected and acted on.
    pub files: Option<Vec<crate::files::FileRule>>,
    pub limits: Limits,
    pub breaker: Option<Breaker>,
    pub monitor: Monitor,
    /// Egress lease: every call is denied this long after the agent is guarded or extended.
    pub lease: Option<Duration>,
    pub lease_action: LeaseAction,
    /// `mode = "learn"`.
    pub learn: bool,
    /// Every `egress` rule as written (trimmed), by rule id: what metrics and `status --rules`
    /// call the rule. One entry per id: a rule written twice is one rule.
    pub rule_texts: Vec<(u64, String)>,
    /// The agent's table as written, for `agentwatch learn` to carry its other settings into
    /// the policy it proposes.
    pub table: toml::Table,
    /// `[[agents.apis]]`: the scopes the gateway serves it.
    pub apis: Vec<crate::gateway::scope::Api>,
}

/// A validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub agents: Vec<Agent>,
    /// `[secrets]`: where each comes from (read by the daemon, never by this check).
    pub secrets: std::collections::BTreeMap<String, crate::gateway::secrets::SecretSource>,
}

/// One problem in a config file, with its 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub path: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.path, e.line, e.col, e.message)?;
        }
        Ok(())
    }
}

struct Collector<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            line,
            col,
            message: message.into(),
        });
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Does `name` look like a user name: 1-32 characters of letters, digits, `_`, `.` and `-`,
/// starting with a letter or `_`, optionally ending in `$` (Samba machine accounts)? Close to
/// what useradd and systemd accept; it also rules out numeric ids, which are not names.
fn valid_user_name(name: &str) -> bool {
    let body = name.strip_suffix('$').unwrap_or(name);
    (1..=32).contains(&name.len())
        && body
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            path: shown.clone(),
            errors: vec![ConfigError {
                line: 1,
                col: 1,
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates `text`; `path` only names it in errors. The whole file is checked
    /// and every error reported, not just the first.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigErrors> {
        let mut c = Collector {
            text,
            errors: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                c.at(span, e.message().to_owned());
                return Err(ConfigErrors {
                    path: path.to_owned(),
                    errors: c.errors,
                });
            }
        };
        // The same text as plain tables (it parsed above, so this does too).
        let tables = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|mut t| match t.remove("agents") {
                Some(toml::Value::Array(a)) => Some(a),
                _ => None,
            })
            .unwrap_or_default()
            .into_iter()
            .map(|v| match v {
                toml::Value::Table(t) => t,
                _ => toml::Table::new(),
            });
        let config = validate(raw, tables, &mut c);
        if c.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors {
                path: path.to_owned(),
                errors: c.errors,
            })
        }
    }

    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }
}

fn validate(
    raw: RawConfig,
    mut tables: impl Iterator<Item = toml::Table>,
    c: &mut Collector<'_>,
) -> Config {
    let daemon = raw.daemon;
    // The daemon table carries no spans; a bad parent is reported at the top of the file.
    if cgroup::check_relative(&daemon.cgroup_parent).is_err() {
        c.at(
            0..0,
            format!(
                "daemon.cgroup_parent `{}` must be a relative cgroup path without `..`",
                daemon.cgroup_parent
            ),
        );
    }
    if daemon.dns_min_ttl > daemon.dns_max_ttl {
        c.at(
            0..0,
            format!(
                "daemon.dns_min_ttl ({}) must not be longer than daemon.dns_max_ttl ({})",
                humantime::format_duration(daemon.dns_min_ttl),
                humantime::format_duration(daemon.dns_max_ttl)
            ),
        );
    }
    if daemon.dns_max_ttl < Duration::from_secs(1) {
        c.at(
            0..0,
            "daemon.dns_max_ttl must be at least 1s: shorter, every answer expires before the \
             agent can use it"
                .to_owned(),
        );
    }
    if daemon.audit_rate == 0 {
        c.at(
            0..0,
            "daemon.audit_rate must be at least 1 (denials beyond it are summarised, never lost)"
                .to_owned(),
        );
    }
    if daemon.audit_max_size.as_u64() < 4096 {
        c.at(
            0..0,
            format!(
                "daemon.audit_max_size {} is too small to hold a few lines; use at least 4KiB",
                daemon.audit_max_size
            ),
        );
    }
    if let Some(g) = &daemon.admin_group
        && crate::control::group_id(g).is_none()
    {
        c.at(
            0..0,
            format!("daemon.admin_group `{g}` is not a group on this host"),
        );
    }
    for (key, path) in [
        ("pin_dir", &daemon.pin_dir),
        ("control_socket", &daemon.control_socket),
        ("agent_homes", &daemon.agent_homes),
    ] {
        if !path.is_absolute() {
            c.at(
                0..0,
                format!("daemon.{key} `{}` must be an absolute path", path.display()),
            );
        }
    }
    let secrets = crate::gateway::scope::secrets(&raw.secrets, &mut |span, m| c.at(span, m));
    let mut seen_names: HashMap<String, Range<usize>> = HashMap::new();
    // Each cgroup so far (without a trailing `/`) -> where it was written, as written: an
    // overlap is found among its own ancestors and a range of descendants, not by comparing
    // with every earlier agent (10,000 agents).
    let mut seen_cgroups: BTreeMap<String, Vec<(String, Range<usize>)>> = BTreeMap::new();
    let mut agents = Vec::new();
    for a in raw.agents {
        let table = tables.next().unwrap_or_default();
        let name = a.name.get_ref().clone();
        let name_span = a.name.span();
        if !crate::rules::valid_name(&name) {
            c.at(name_span.clone(), format!(
                "agent name `{name}` must be 1-63 characters of a-z, 0-9 and `-`, not starting with `-`"
            ));
        }
        let duplicate = seen_names.contains_key(&name);
        if let Some(first) = seen_names.get(&name) {
            let (l, _) = line_col(c.text, first.start);
            c.at(
                name_span.clone(),
                format!("duplicate agent name `{name}` (first defined on line {l})"),
            );
        } else {
            seen_names.insert(name.clone(), name_span.clone());
        }
        let (cgroup, adopted, cg_span) = match &a.cgroup {
            Some(s) => (s.get_ref().clone(), true, s.span()),
            None => (
                format!("{}/{name}", daemon.cgroup_parent),
                false,
                name_span.clone(),
            ),
        };
        if a.cgroup.is_some() && cgroup::check_relative(&cgroup).is_err() {
            c.at(
                cg_span.clone(),
                format!("cgroup `{cgroup}` must be relative to the cgroup2 mount, without `..`"),
            );
        }
        // A duplicate name without its own cgroup clashes by construction: said once above.
        let derived_clash = duplicate && !adopted;
        let key = cgroup.trim_end_matches('/').to_owned();
        if !derived_clash {
            let mut overlaps: Vec<&(String, Range<usize>)> = overlapping(&seen_cgroups, &key);
            // In the order they were written, as a reader goes through the file.
            overlaps.sort_by_key(|(_, span)| span.start);
            for (other, other_span) in overlaps {
                let (l, _) = line_col(c.text, other_span.start);
                c.at(
                    cg_span.clone(),
                    format!(
                        "cgroup `{cgroup}` overlaps cgroup `{other}` of the agent on line {l}: an \
                     agent's processes must belong to exactly one agent"
                    ),
                );
            }
        }
        seen_cgroups
            .entry(key)
            .or_default()
            .push((cgroup.clone(), cg_span));
        let mut egress = Vec::new();
        let mut hostnames = HostRules::default();
        let mut rule_texts: Vec<(u64, String)> = Vec::new();
        let mut rule_ids: HashSet<u64> = HashSet::new();
        for r in &a.egress {
            match r.get_ref().parse::<EgressRule>() {
                Ok(rule) => {
                    let id = rule.id();
                    if rule_ids.insert(id) {
                        rule_texts.push((id, r.get_ref().trim().to_owned()));
                    }
                    match rule {
                        EgressRule::Net(rule) => egress.push(rule),
                        EgressRule::Name(rule) => hostnames.0.push(rule),
                    }
                }
                Err(e) => c.at(r.span(), format!("egress rule `{}`: {e}", r.get_ref())),
            }
        }
        let compiled = match crate::egress::compile(&egress) {
            Ok(compiled) => compiled,
            Err(e) => {
                c.at(name_span.clone(), format!("agent `{name}`: {e}"));
                CompiledRules::default()
            }
        };
        let exec_allow = a.exec_allow.as_ref().map(|list| {
            let mut paths = Vec::new();
            for p in list {
                let path = PathBuf::from(p.get_ref());
                if !p.get_ref().starts_with('/') {
                    c.at(
                        p.span(),
                        format!(
                            "exec_allow entry `{}` must be an absolute path",
                            p.get_ref()
                        ),
                    );
                } else if let Err(e) = crate::exec::exec_key(0, &path) {
                    c.at(p.span(), format!("exec_allow entry {e}"));
                } else {
                    paths.push(path);
                }
            }
            paths
        });
        let files = a.files.as_ref().map(|f| {
            let mut rules = Vec::new();
            for entry in &f.get_ref().allow {
                match crate::files::FileRule::parse(entry.get_ref()) {
                    Ok(r) => rules.push(r),
                    Err(e) => c.at(entry.span(), format!("files.allow entry {e}")),
                }
            }
            rules
        });
        let limits = match &a.limits {
            Some(l) => {
                let v = *l.get_ref();
                if v.egress_bytes_per_second.is_some_and(|b| b < 4096) {
                    c.at(
                        l.span(),
                        "limits.egress_bytes_per_second must be at least 4096: below it an \
                         agent could not even open a connection",
                    );
                }
                if v.connects_per_second == Some(0) || v.sends_per_second == Some(0) {
                    c.at(
                        l.span(),
                        "limits of 0 per second would block the agent entirely; \
                                    use an empty egress list to deny all egress",
                    );
                }
                v
            }
            None => Limits::default(),
        };
        let breaker = a.breaker.as_ref().map(|b| breaker(b, c));
        let lease = a
            .lease
            .as_ref()
            .and_then(|l| match humantime::parse_duration(l.get_ref()) {
                Ok(d) if d >= Duration::from_secs(1) => Some(d),
                Ok(_) => {
                    c.at(l.span(), "lease must be at least 1s");
                    None
                }
                Err(e) => {
                    c.at(
                        l.span(),
                        format!("lease `{}`: {e} (e.g. \"2h\", \"30m\")", l.get_ref()),
                    );
                    None
                }
            });
        if a.lease_action.is_some() && a.lease.is_none() {
            c.at(
                name_span.clone(),
                format!("agent `{name}`: lease_action is set but there is no lease"),
            );
        }
        if let Some(u) = &a.user
            && !valid_user_name(u.get_ref())
        {
            c.at(
                u.span(),
                format!(
                    "user `{}` is not a user name (1-32 characters of letters, digits, `_`, `.` \
                     and `-`, starting with a letter or `_`)",
                    u.get_ref()
                ),
            );
        }
        let apis = crate::gateway::scope::apis(&a.apis, &secrets, &mut |span, m| {
            c.at(span, format!("agent `{name}`: {m}"));
        });
        agents.push(Agent {
            name,
            cgroup,
            adopted,
            run_as: match a.user.as_ref().map(|u| u.get_ref().as_str()) {
                Some("root") => crate::uids::RunAs::Root,
                Some(u) => crate::uids::RunAs::User(u.to_owned()),
                // The uid is filled in below, once every agent's name is known.
                None => crate::uids::RunAs::Own { uid: 0 },
            },
            egress,
            hostnames,
            compiled,
            exec_allow,
            files,
            limits,
            breaker,
            monitor: a.monitor,
            lease,
            lease_action: a.lease_action.unwrap_or_default(),
            learn: a.mode == Mode::Learn,
            rule_texts,
            table,
            apis,
        });
    }
    assign_uids(&daemon, &mut agents, c);
    check_learn_quota(&daemon, &agents, c);
    check_rule_capacity(&daemon, &agents, c);
    Config {
        daemon,
        agents,
        secrets,
    }
}

/// Learn-mode agents' shares must fit the kernel's learn maps together, or one agent filling
/// its share could still cost another its records.
fn check_learn_quota(daemon: &DaemonConfig, agents: &[Agent], c: &mut Collector<'_>) {
    let capacity = u64::from(agentwatch_common::LEARN_CAPACITY);
    if daemon.learn_quota == 0 || daemon.learn_quota > capacity {
        c.at(
            0..0,
            format!(
                "daemon.learn_quota must be between 1 and {capacity} (the kernel's learn maps \
                 hold that many records), not {}",
                daemon.learn_quota
            ),
        );
        return;
    }
    let learning = agents.iter().filter(|a| a.learn).count() as u64;
    if learning * daemon.learn_quota > capacity {
        c.at(
            0..0,
            format!(
                "{learning} agents in learn mode with daemon.learn_quota = {} need {} learn \
                 records, more than the kernel's {capacity}: lower learn_quota to at most {}",
                daemon.learn_quota,
                learning * daemon.learn_quota,
                capacity / learning
            ),
        );
    }
}

/// The agents' compiled rules must fit half of each kernel rule trie, so that a reload (which
/// writes every changed agent's next rules beside the live ones) always fits. Refused here, the
/// config never reaches the kernel, where a full trie would fail a reload halfway.
fn check_rule_capacity(daemon: &DaemonConfig, agents: &[Agent], c: &mut Collector<'_>) {
    for e in rule_capacity_errors(daemon, agents, agentwatch_common::MAX_CONFIG_RULE_ENTRIES) {
        c.at(0..0, e);
    }
}

/// [`check_rule_capacity`] against any `limit` (the tests' small ones).
fn rule_capacity_errors(daemon: &DaemonConfig, agents: &[Agent], limit: usize) -> Vec<String> {
    // The gateway's own rule, one entry more for each agent with API scopes.
    let gateway = agents.iter().filter(|a| !a.apis.is_empty()).count();
    let (gateway_v4, gateway_v6) = if daemon.gateway_listen.is_ipv4() {
        (gateway, 0)
    } else {
        (0, gateway)
    };
    let v4 = agents.iter().map(|a| a.compiled.v4.len()).sum::<usize>() + gateway_v4;
    let v6 = agents.iter().map(|a| a.compiled.v6.len()).sum::<usize>() + gateway_v6;
    [("IPv4", v4), ("IPv6", v6)]
        .into_iter()
        .filter(|&(_, entries)| entries > limit)
        .map(|(family, entries)| {
            format!(
                "the agents' {family} egress rules need {entries} kernel entries (one per \
                 distinct destination prefix of each agent), more than the {limit} a config \
                 may use (half the kernel's rule trie: a reload writes the next rules beside \
                 the live ones); merge addresses into wider prefixes"
            )
        })
        .collect()
}

/// Gives every agent without `user` its own uid from `daemon.agent_uids` ([`crate::uids`]).
fn assign_uids(daemon: &DaemonConfig, agents: &mut [Agent], c: &mut Collector<'_>) {
    use crate::uids::RunAs;
    let own: Vec<String> = agents
        .iter()
        .filter(|a| matches!(a.run_as, RunAs::Own { .. }))
        .map(|a| a.name.clone())
        .collect();
    let Some(uids) = crate::uids::assign(own.iter().map(String::as_str), daemon.agent_uids) else {
        c.at(
            0..0,
            format!(
                "daemon.agent_uids {} holds {} uid(s), fewer than the {} agents without `user`",
                daemon.agent_uids,
                daemon.agent_uids.len(),
                own.len()
            ),
        );
        return;
    };
    let uids: HashMap<&str, u32> = uids.into_iter().collect();
    for a in agents {
        if let RunAs::Own { uid } = &mut a.run_as
            && let Some(u) = uids.get(a.name.as_str())
        {
            *uid = *u;
        }
    }
}

/// Is one cgroup path equal to, or below, the other?
/// The cgroups in `seen` that `key` (no trailing `/`) is, lies under or holds: its own path and
/// each ancestor's looked up, its descendants a range of the ordered map (every path that
/// starts with `key/` sorts between `key/` and `key0`, `0` following `/`).
fn overlapping<'a>(
    seen: &'a BTreeMap<String, Vec<(String, Range<usize>)>>,
    key: &str,
) -> Vec<&'a (String, Range<usize>)> {
    let mut found = Vec::new();
    let ancestors = key
        .match_indices('/')
        .map(|(i, _)| &key[..i])
        .chain(std::iter::once(key));
    for path in ancestors {
        if let Some(entries) = seen.get(path) {
            found.extend(entries);
        }
    }
    for (_, entries) in seen.range(format!("{key}/")..format!("{key}0")) {
        found.extend(entries);
    }
    found
}

fn breaker(b: &Spanned<RawBreaker>, c: &mut Collector<'_>) -> Breaker {
    let raw = b.get_ref();
    let mut out = Breaker::default();
    let mut duration = |d: &Option<Spanned<String>>, key: &str, slot: &mut Duration| {
        if let Some(d) = d {
            match humantime::parse_duration(d.get_ref()) {
                Ok(v) if !v.is_zero() => *slot = v,
                Ok(_) => c.at(d.span(), format!("breaker.{key} must be longer than 0")),
                Err(e) => c.at(
                    d.span(),
                    format!(
                        "breaker.{key} `{}`: {e} (e.g. \"30s\", \"2m\")",
                        d.get_ref()
                    ),
                ),
            }
        }
    };
    duration(&raw.warmup, "warmup", &mut out.warmup);
    duration(&raw.window, "window", &mut out.window);
    duration(&raw.cooldown, "cooldown", &mut out.cooldown);
    if let Some(f) = &raw.trip_factor {
        if f.get_ref().is_finite() && *f.get_ref() > 1.0 {
            out.trip_factor = *f.get_ref();
        } else {
            c.at(f.span(), "breaker.trip_factor must be a number above 1.0");
        }
    }
    if let Some(m) = &raw.min_rate {
        if m.get_ref().is_finite() && *m.get_ref() >= 0.0 {
            out.min_rate = *m.get_ref();
        } else {
            c.at(m.span(), "breaker.min_rate must be a number of at least 0");
        }
    }
    if let Some(m) = &raw.min_bytes_rate {
        if m.get_ref().is_finite() && *m.get_ref() >= 0.0 {
            out.min_bytes_rate = *m.get_ref();
        } else {
            c.at(
                m.span(),
                "breaker.min_bytes_rate must be a number of at least 0",
            );
        }
    }
    if out.window > out.warmup {
        c.at(
            b.span(),
            "breaker.window must not be longer than breaker.warmup",
        );
    }
    if let Some(a) = raw.action {
        out.action = a;
    }
    if let Some(r) = raw.require_approval {
        out.require_approval = r;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rules_beyond_half_the_kernel_trie_are_refused_per_family_gateway_rule_included() {
        let text = "[secrets]\nk = { file = \"/etc/k\" }\n\
            [[agents]]\nname = \"a\"\negress = [\"tcp 10.0.0.1 443\", \"tcp 10.0.0.2 443\", \
            \"tcp 10.0.0.2 80\", \"udp ::1 53\"]\n\
            [[agents]]\nname = \"b\"\negress = [\"tcp 10.0.0.1 443\"]\n\
            [[agents.apis]]\nname = \"x\"\nupstream = \"https://api.example.com\"\nsecret = \"k\"\n\
            allow = [\"GET /**\"]\n";
        let c = Config::parse(text, "t.toml").unwrap();
        // IPv4: a's two prefixes (10.0.0.2's two rules share one), b's one, b's gateway rule
        // (127.0.0.1, the default listener): 4. IPv6: 1.
        assert!(rule_capacity_errors(&c.daemon, &c.agents, 4).is_empty());
        let e = rule_capacity_errors(&c.daemon, &c.agents, 3);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("the agents' IPv4 egress rules need 4 kernel entries"),
            "{}",
            e[0]
        );
        let e = rule_capacity_errors(&c.daemon, &c.agents, 0);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[1].contains("IPv6 egress rules need 1 kernel entries"),
            "{}",
            e[1]
        );
    }

    /// Do two cgroups overlap (one is, or lies under, the other)? The plain definition that
    /// [`overlapping`] must agree with.
    fn nested(a: &str, b: &str) -> bool {
        let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
        a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
    }

    #[test]
    fn overlapping_cgroups_are_found_as_comparing_each_pair_finds_them() {
        let paths = [
            "a",
            "a/b",
            "a/b/",
            "a/bc",
            "a/b/c",
            "ab",
            "a0",
            "a.b",
            "b",
            "b/a",
            "a/b/c/d/e",
            "x/y",
            "x/y-z",
            "x/yz/a",
        ];
        let mut seen: BTreeMap<String, Vec<(String, Range<usize>)>> = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            seen.entry(p.trim_end_matches('/').to_owned())
                .or_default()
                .push(((*p).to_owned(), i..i + 1));
        }
        for key in paths.iter().chain(&["a/b/c/d", "x", "x/y/z", "c", "a/b0"]) {
            let key = key.trim_end_matches('/');
            let mut got: Vec<&str> = overlapping(&seen, key)
                .into_iter()
                .map(|(p, _)| p.as_str())
                .collect();
            got.sort_unstable();
            let mut want: Vec<&str> = paths.iter().copied().filter(|p| nested(key, p)).collect();
            want.sort_unstable();
            assert_eq!(got, want, "{key}");
        }
    }

    use super::*;
    use crate::uids::UidRange;

    #[test]
    fn embedded_default_is_valid_and_empty() {
        let c = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert!(c.agents.is_empty());
        assert_eq!(c.daemon, DaemonConfig::default());
        assert_eq!(c.daemon.metrics_listen.to_string(), "127.0.0.1:9750");
    }

    #[test]
    fn parses_contract_example_without_hostnames() {
        let text = r#"
[daemon]
cgroup_parent = "agentwatch"
audit_log = "-"

[[agents]]
name = "mailer"
user = "mailer"
cgroup = "system.slice/mailer.service"
egress = ["tcp 10.1.2.3 443", "udp 127.0.0.53 53", "tcp 2001:db8::/32 *"]
exec_allow = ["/usr/bin/python3"]

[agents.limits]
connects_per_second = 50

[agents.breaker]
warmup = "30s"
window = "1s"
trip_factor = 5.0
min_rate = 20.0
action = "kill"
require_approval = false

[agents.monitor]
syscalls = true

[[agents]]
name = "coder"
"#;
        let c = Config::parse(text, "t.toml").unwrap();
        assert_eq!(c.agents.len(), 2);
        let m = &c.agents[0];
        assert_eq!(m.cgroup, "system.slice/mailer.service");
        assert!(m.adopted);
        assert_eq!(m.run_as, crate::uids::RunAs::User("mailer".into()));
        let own = crate::uids::assign([c.agents[1].name.as_str()], UidRange::DEFAULT).unwrap();
        assert_eq!(
            c.agents[1].run_as,
            crate::uids::RunAs::Own { uid: own[0].1 }
        );
        assert_eq!(m.egress.len(), 3);
        assert_eq!(m.limits.connects_per_second, Some(50));
        assert_eq!(m.breaker.unwrap().action, Action::Kill);
        assert!(m.monitor.syscalls);
        assert_eq!(c.agents[1].cgroup, "agentwatch/coder");
        assert!(!c.agents[1].adopted);
    }

    #[test]
    fn reports_every_error_with_line_and_column() {
        let text = r#"[[agents]]
name = "Bad_Name"
egress = ["tcp 10.0.0.1 99999", "tcp 10.0.0.1 80"]

[[agents]]
name = "dup"

[[agents]]
name = "dup"
cgroup = "agentwatch/dup/x"
"#;
        let e = Config::parse(text, "f.toml").unwrap_err();
        let shown = e.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 4, "{shown}");
        assert!(
            lines[0].starts_with("f.toml:2:8: agent name `Bad_Name`"),
            "{shown}"
        );
        assert!(
            lines[1].starts_with("f.toml:3:11: egress rule `tcp 10.0.0.1 99999`: bad port"),
            "{shown}"
        );
        assert!(
            lines[2]
                .starts_with("f.toml:9:8: duplicate agent name `dup` (first defined on line 6)"),
            "{shown}"
        );
        assert!(
            lines[3].starts_with("f.toml:10:10: cgroup `agentwatch/dup/x` overlaps"),
            "{shown}"
        );
    }

    #[test]
    fn user_names() {
        for ok in [
            "nobody",
            "_apt",
            "systemd-network",
            "Debian-exim",
            "host$",
            "a.b",
            "u1",
        ] {
            assert!(valid_user_name(ok), "{ok}");
        }
        for bad in [
            "",
            "0",
            "1000",
            "-x",
            ".x",
            "a b",
            "a:b",
            "a/b",
            "$",
            &"a".repeat(33),
        ] {
            assert!(!valid_user_name(bad), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = Config::parse("[daemon]\npin_dri = \"/x\"\n", "f").unwrap_err();
        assert_eq!(e.errors[0].line, 2);
        assert!(
            e.errors[0].message.contains("unknown field `pin_dri`"),
            "{e}"
        );
        let e = Config::parse(
            "[[agents]]\nname = \"a\"\n[agents.breaker]\nwarmup = \"soon\"\naction = \"explode\"\n",
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `explode`"), "{e}");
        let e = Config::parse(
            "[[agents]]\nname = \"a\"\n[agents.breaker]\nwarmup = \"soon\"\n",
            "f",
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("f:4:10: breaker.warmup `soon`"),
            "{e}"
        );
        let e = Config::parse("[[agents]]\nname = \"a\"\nuser = \"0day;rm\"\n", "f").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("f:3:8: user `0day;rm` is not a user name"),
            "{e}"
        );
        let e = Config::parse("[[agents]]\nname = \"a\"\ncgroup = \"../etc\"\n", "f").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("f:3:10: cgroup `../etc` must be relative"),
            "{e}"
        );
    }

    #[test]
    fn hostname_rules_and_dns_settings() {
        let text = r#"
[daemon]
dns_upstream = "127.0.0.53"
dns_min_ttl = "2s"
dns_max_ttl = "10m"

[[agents]]
name = "coder"
egress = ["tcp api.example.com 443", "tcp *.GitHub.com. 22", "udp 10.0.0.1 53"]
"#;
        let c = Config::parse(text, "t.toml").unwrap();
        assert_eq!(
            c.daemon.dns_upstream,
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(c.daemon.dns_min_ttl, Duration::from_secs(2));
        assert_eq!(c.daemon.dns_max_ttl, Duration::from_secs(600));
        let a = &c.agents[0];
        assert_eq!(a.egress.len(), 1);
        let names: Vec<String> = a.hostnames.0.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["tcp api.example.com 443", "tcp *.github.com 22"]);
        assert_eq!(
            Config::parse(EMBEDDED_DEFAULT, "d")
                .unwrap()
                .daemon
                .dns_upstream,
            None
        );

        let bad = r#"
[daemon]
dns_min_ttl = "2h"

[[agents]]
name = "coder"
egress = ["tcp *.com 443", "tcp a.*.example.com 443", "tcp localhost 80"]
"#;
        let e = Config::parse(bad, "f").unwrap_err().to_string();
        assert!(
            e.contains("dns_min_ttl (2h) must not be longer than daemon.dns_max_ttl (1h)"),
            "{e}"
        );
        assert!(e.contains("f:7:11: egress rule `tcp *.com 443`: `*.com` would allow every name under a top-level domain"), "{e}");
        assert!(
            e.contains("`a.*.example.com`: a wildcard is only allowed as the whole first label"),
            "{e}"
        );
        assert!(e.contains("`localhost` is a single label"), "{e}");
        let e = Config::parse("[daemon]\ndns_upstream = \"resolver\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f:2:16: `resolver` is not an address"), "{e}");
    }

    #[test]
    fn leases() {
        let c = Config::parse(
            "[[agents]]\nname = \"a\"\nlease = \"2h\"\nlease_action = \"freeze\"\n\n\
             [[agents]]\nname = \"b\"\nlease = \"90s\"\n\n[[agents]]\nname = \"c\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.agents[0].lease, Some(Duration::from_secs(7200)));
        assert_eq!(c.agents[0].lease_action, LeaseAction::Freeze);
        assert_eq!(c.agents[1].lease_action, LeaseAction::Deny);
        assert_eq!(c.agents[2].lease, None);
        let e = Config::parse(
            "[[agents]]\nname = \"a\"\nlease = \"0s\"\n\n[[agents]]\nname = \"b\"\n\
             lease_action = \"kill\"\n\n[[agents]]\nname = \"c\"\nlease = \"soon\"\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("f:3:9: lease must be at least 1s"), "{e}");
        assert!(
            e.contains("agent `b`: lease_action is set but there is no lease"),
            "{e}"
        );
        assert!(e.contains("f:11:9: lease `soon`"), "{e}");
        let e = Config::parse(
            "[[agents]]\nname = \"d\"\nlease = \"1h\"\nlease_action = \"pause\"\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("f:4:16: unknown variant `pause`"), "{e}");
    }
}
