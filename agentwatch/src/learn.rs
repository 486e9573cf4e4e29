//! Least privilege from behaviour: the userspace half of `agentwatch-ebpf/src/learn.rs`.
//!
//! The kernel counts, per agent and rule, the calls each rule admitted (`RULE_HITS`, every
//! agent), and records every destination a learn-mode agent called and every path it exec'd
//! (`LEARN_DESTS`, `LEARN_EXECS`). The DNS forwarder records which name it answered with which
//! address for a learn-mode agent (`LEARN_NAMES`). All four maps are pinned, so what was
//! learned survives a daemon restart. [`propose`] turns them into the smallest policy that
//! lets the agent do what it did; [`Proposal::to_toml`] writes it as an `[[agents]]` table.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, MutexGuard},
};

use agentwatch_common::{
    DestKey, EXEC_PATH_MAX, ExecKey, LEARN_NAME_MAX, LearnName, LearnNameKey, LearnQuota,
    PROTO_TCP, PROTO_UDP, RuleHitKey, Seen,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuHashMap},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{
    bpf::{KernelError, ignore_missing, load::LoadEnv, map_err, remove_where, take_map},
    concern::{Concern, History, Load, MapSpec, Policy, Slot},
    config::Agent,
};

/// The rule counters and learn mode's records (shared with the DNS forwarder, which writes the
/// names).
#[derive(Clone)]
pub struct LearnMaps(Arc<Mutex<Maps>>);

struct Maps {
    hits: PerCpuHashMap<MapData, RuleHitKey, u64>,
    dests: HashMap<MapData, DestKey, Seen>,
    execs: HashMap<MapData, ExecKey, Seen>,
    names: HashMap<MapData, LearnNameKey, LearnName>,
    quota: Array<MapData, LearnQuota>,
}

/// What the kernel recorded of one learn-mode agent.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub dests: Vec<(DestKey, Seen)>,
    /// Exec'd paths (as given to execve).
    pub execs: Vec<(String, Seen)>,
    /// Names the forwarder answered, by address (as the egress hooks judge it: v4-mapped
    /// addresses as IPv4).
    pub names: StdHashMap<IpAddr, BTreeSet<String>>,
}

impl Load for LearnMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("RULE_HITS", size_of::<RuleHitKey>(), 8),
        MapSpec::new("LEARN_DESTS", size_of::<DestKey>(), size_of::<Seen>()),
        MapSpec::new("LEARN_EXECS", size_of::<ExecKey>(), size_of::<Seen>()),
        MapSpec::new(
            "LEARN_NAMES",
            size_of::<LearnNameKey>(),
            size_of::<LearnName>(),
        ),
        MapSpec::new("LEARN_QUOTA", 4, size_of::<LearnQuota>()),
    ];

    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        Ok(Self(Arc::new(Mutex::new(Maps {
            hits: take_map(ebpf, "RULE_HITS")?,
            dests: take_map(ebpf, "LEARN_DESTS")?,
            execs: take_map(ebpf, "LEARN_EXECS")?,
            names: take_map(ebpf, "LEARN_NAMES")?,
            quota: take_map(ebpf, "LEARN_QUOTA")?,
        }))))
    }
}

impl Concern for LearnMaps {
    fn name(&self) -> &'static str {
        "learn"
    }

    fn sweep_free_slots(
        &mut self,
        live: &std::collections::HashSet<u32>,
    ) -> Result<(), KernelError> {
        self.retain_hits(|agent, _| live.contains(&agent))?;
        self.retain_observed(|agent| live.contains(&agent))
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        match slot.history {
            // A clean slot has no records: only its share starts from nothing.
            History::Fresh => {
                let mut maps = self.lock();
                maps.quota
                    .set(slot.id, LearnQuota::default(), 0)
                    .map_err(map_err("LEARN_QUOTA"))
            }
            _ => self.forget_agent(slot.id),
        }
    }

    fn apply(
        &mut self,
        slot: Slot,
        _old: Option<&Policy>,
        new: &Policy,
    ) -> Result<(), KernelError> {
        self.set_quota(slot.id, new.learn_quota)
    }
}

impl LearnMaps {
    /// Sets agent `id`'s share of the learn maps (`daemon.learn_quota`; 0: none), keeping the
    /// kernel's count of the records it holds.
    pub fn set_quota(&self, id: u32, limit: u64) -> Result<(), KernelError> {
        let mut maps = self.lock();
        let old = maps.quota.get(&id, 0).unwrap_or_default();
        maps.quota
            .set(id, LearnQuota { limit, ..old }, 0)
            .map_err(map_err("LEARN_QUOTA"))
    }

    /// Agent `id`'s share: its limit and the destination and exec records it holds.
    pub fn quota(&self, id: u32) -> LearnQuota {
        self.lock().quota.get(&id, 0).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // A panic elsewhere while holding the lock leaves the maps themselves consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls each rule admitted, by (agent id, rule id), summed over CPUs.
    pub fn rule_hits(&self) -> StdHashMap<(u32, u64), u64> {
        let maps = self.lock();
        maps.hits
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| ((k.agent, k.rule), per_cpu.iter().sum()))
            .collect()
    }

    /// Calls each rule of agent `id` admitted, by rule id.
    pub fn hits_of(&self, id: u32) -> StdHashMap<u64, u64> {
        self.rule_hits()
            .into_iter()
            .filter(|((agent, _), _)| *agent == id)
            .map(|((_, rule), n)| (rule, n))
            .collect()
    }

    /// Keeps the rule counts for which `keep(agent id, rule id)` holds: a removed rule's
    /// count goes with it (configured again, it starts at 0), and so do a removed agent's.
    pub fn retain_hits(&self, keep: impl Fn(u32, u64) -> bool) -> Result<(), KernelError> {
        let mut maps = self.lock();
        let gone: Vec<RuleHitKey> = maps
            .hits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep(k.agent, k.rule))
            .collect();
        for k in gone {
            ignore_missing(maps.hits.remove(&k), "RULE_HITS")?;
        }
        Ok(())
    }

    /// Keeps learn mode's records of the agents for which `keep(agent id)` holds (those still
    /// in learn mode): an agent that left learn mode starts afresh if it comes back.
    pub fn retain_observed(&self, keep: impl Fn(u32) -> bool) -> Result<(), KernelError> {
        let mut maps = self.lock();
        let mut emptied: BTreeSet<u32> = BTreeSet::new();
        emptied.extend(
            remove_where(&mut maps.dests, "LEARN_DESTS", |k| !keep(k.agent))?
                .iter()
                .map(|k| k.agent),
        );
        emptied.extend(
            remove_where(&mut maps.execs, "LEARN_EXECS", |k| !keep(k.agent))?
                .iter()
                .map(|k| k.agent),
        );
        remove_where(&mut maps.names, "LEARN_NAMES", |k| !keep(k.agent))?;
        // Every record of those agents is gone: so is their count (their limit stays until
        // the policy writes another).
        for id in emptied {
            let old = maps.quota.get(&id, 0).unwrap_or_default();
            maps.quota
                .set(
                    id,
                    LearnQuota {
                        limit: old.limit,
                        ..LearnQuota::default()
                    },
                    0,
                )
                .map_err(map_err("LEARN_QUOTA"))?;
        }
        Ok(())
    }

    /// Forgets everything of slot `id` (its agent is gone, or a new one takes the slot).
    pub fn forget_agent(&self, id: u32) -> Result<(), KernelError> {
        self.retain_hits(|agent, _| agent != id)?;
        self.retain_observed(|agent| agent != id)
    }

    /// Records that the forwarder answered `name` with `addr` for learn-mode agent `id`.
    pub fn record_name(
        &self,
        id: u32,
        addr: IpAddr,
        name: &str,
        now_ns: u64,
    ) -> Result<(), KernelError> {
        let (family, bytes) = judged(addr);
        let mut value = LearnName {
            last_ns: now_ns,
            ..LearnName::default()
        };
        let n = name.len().min(LEARN_NAME_MAX);
        value.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let key = LearnNameKey {
            agent: id,
            family,
            _pad: [0; 3],
            addr: bytes,
            name: crate::rules::egress::text_id(name),
        };
        self.lock()
            .names
            .insert(key, value, 0)
            .map_err(map_err("LEARN_NAMES"))
    }

    /// What learn mode recorded for agent `id`.
    pub fn observed(&self, id: u32) -> Observed {
        let maps = self.lock();
        let dests = maps
            .dests
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.agent == id)
            .collect();
        let execs = maps
            .execs
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.agent == id)
            .map(|(k, seen)| (c_string(&k.path[..EXEC_PATH_MAX]), seen))
            .collect();
        let mut names: StdHashMap<IpAddr, BTreeSet<String>> = StdHashMap::new();
        for (k, v) in maps.names.iter().filter_map(Result::ok) {
            if k.agent == id {
                names
                    .entry(addr_of(k.family, &k.addr))
                    .or_default()
                    .insert(c_string(&v.name));
            }
        }
        Observed {
            dests,
            execs,
            names,
        }
    }
}

/// A kernel timestamp as RFC 3339 to the second (what a reviewer needs of "last used").
pub fn wall(ts_ns: u64) -> String {
    let full = crate::audit::rfc3339(crate::events::wall_time(ts_ns));
    match full.split_once('.') {
        Some((seconds, _)) => format!("{seconds}Z"),
        None => full,
    }
}

/// Removes the entries of `map` whose key `gone` says; returns their keys.
/// An address as the egress hooks judge it: family 4 (also for a v4-mapped one) with the
/// address in the first 4 bytes, or family 6.
fn judged(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => (6, v6.octets()),
        IpAddr::V6(v6) => {
            bytes[..4].copy_from_slice(
                &v6.to_ipv4_mapped()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED)
                    .octets(),
            );
            (4, bytes)
        }
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (4, bytes)
        }
    }
}

fn addr_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// How far `learn` may widen addresses into networks (`--widen-v4 24`): only when asked, and
/// only where two or more addresses with the same protocol and port share the network.
#[derive(Debug, Default, Clone, Copy)]
pub struct Widen {
    pub v4: Option<u8>,
    pub v6: Option<u8>,
}

/// One rule of a proposal, with what backs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedRule {
    pub rule: String,
    /// Calls it stands for.
    pub calls: u64,
    /// Of those, the calls the policy in force would deny (learn mode only).
    #[serde(default)]
    pub would_deny: u64,
    /// When it was last used (RFC 3339), if the kernel recorded it (learn mode).
    #[serde(default)]
    pub last: Option<String>,
    /// For a hostname rule: the addresses the forwarder answered and the agent called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// One exec'd path of a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedExec {
    pub path: String,
    pub execs: u64,
    pub last: Option<String>,
}

/// The least-privilege policy proposed for one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub agent: String,
    /// The agent's mode while it was observed: `learn` (destinations and execs recorded) or
    /// `enforce` (only which configured rules admitted calls).
    pub mode: String,
    pub egress: Vec<ProposedRule>,
    /// None: no exec was recorded (enforce mode keeps the configured list).
    pub exec_allow: Option<Vec<ProposedExec>>,
    /// Execs the exec allow-list killed (left out of `exec_allow`).
    pub killed_execs: Vec<ProposedExec>,
    /// Resolvers the agent asked (port 53) that need no rule: the proposal has hostname rules,
    /// so its DNS goes to agentwatch's forwarder whatever resolver it names.
    #[serde(default)]
    pub resolvers: Vec<ProposedRule>,
    /// Configured rules that admitted no call.
    pub unused_rules: Vec<String>,
    /// Destinations or execs the kernel had no room to record: the proposal may miss some.
    pub lost: u64,
    /// The agent's other settings as configured, carried into the proposed table.
    pub keep: toml::Table,
    /// Its API scopes that were called, each with an `allow` proposed from the calls.
    #[serde(default)]
    pub apis: Vec<ProposedApi>,
    /// Its API scopes never called (left out of the proposed table).
    #[serde(default)]
    pub unused_apis: Vec<String>,
}

/// One API scope of a proposal: its configured table with `allow` made of what was called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposedApi {
    pub name: String,
    /// `METHOD TEMPLATE` patterns of the calls the configured `allow` admitted.
    pub allow: Vec<ProposedCall>,
    /// Calls the configured `allow` refused (left out of `allow`).
    pub refused: Vec<ProposedCall>,
    /// Configured patterns that admitted no call.
    pub unused_allow: Vec<String>,
    /// Calls the gateway had no room to remember: the proposal may miss some.
    pub lost: u64,
    /// The scope's table as configured, `allow` aside.
    pub keep: toml::Table,
}

/// A `METHOD PATH` pattern and the calls behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedCall {
    pub pattern: String,
    pub calls: u64,
}

/// Proposes each of `agent`'s API scopes from what the gateway saw (`learned`, per scope):
/// `allow` becomes one pattern per method and path template the configured `allow` admitted,
/// in the order of their counts; scopes never called are listed apart.
pub fn propose_apis(
    agent: &Agent,
    learned: &BTreeMap<String, crate::gateway::serve::LearnedCalls>,
) -> (Vec<ProposedApi>, Vec<String>) {
    let tables: Vec<&toml::Table> = agent
        .table
        .get("apis")
        .and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(toml::Value::as_table).collect())
        .unwrap_or_default();
    let mut used = Vec::new();
    let mut unused = Vec::new();
    for api in &agent.apis {
        let seen = learned.get(&api.name);
        let Some(seen) = seen.filter(|s| !s.calls.is_empty()) else {
            unused.push(api.name.clone());
            continue;
        };
        let pick = |admitted: bool| {
            let mut out: Vec<ProposedCall> = seen
                .calls
                .iter()
                .map(|((method, template), (ok, refused))| ProposedCall {
                    pattern: format!("{method} {template}"),
                    calls: if admitted { *ok } else { *refused },
                })
                .filter(|c| c.calls > 0)
                .collect();
            out.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.pattern.cmp(&b.pattern)));
            out
        };
        let mut keep = tables
            .iter()
            .find(|t| t.get("name").and_then(toml::Value::as_str) == Some(api.name.as_str()))
            .map(|t| (*t).clone())
            .unwrap_or_default();
        keep.remove("allow");
        used.push(ProposedApi {
            name: api.name.clone(),
            allow: pick(true),
            refused: pick(false),
            unused_allow: api
                .allow
                .iter()
                .map(ToString::to_string)
                .filter(|p| seen.pattern_hits.get(p).copied().unwrap_or(0) == 0)
                .collect(),
            lost: seen.lost,
            keep,
        });
    }
    (used, unused)
}

/// Proposes agent `agent`'s least-privilege policy from what the kernel saw. `hits`: calls per
/// rule id; `observed`: learn mode's records (empty in enforce mode); `wall`: turns a kernel
/// timestamp into RFC 3339.
pub fn propose(
    agent: &Agent,
    hits: &StdHashMap<u64, u64>,
    observed: &Observed,
    lost: u64,
    widen: Widen,
    wall: impl Fn(u64) -> String,
) -> Proposal {
    let unused_rules = agent
        .rule_texts
        .iter()
        .filter(|(id, _)| hits.get(id).copied().unwrap_or(0) == 0)
        .map(|(_, text)| text.clone())
        .collect();
    let mut keep = agent.table.clone();
    // `apis` comes back scope by scope (`propose_apis`).
    for key in ["name", "mode", "egress", "exec_allow", "apis"] {
        keep.remove(key);
    }
    let mut resolvers = Vec::new();
    let (egress, exec_allow, killed_execs) = if agent.learn {
        let mut egress = egress_from(observed, widen, &wall);
        if egress.iter().any(|r| !r.addresses.is_empty()) {
            (resolvers, egress) = egress.into_iter().partition(is_resolver);
        }
        let mut ran = Vec::new();
        let mut killed = Vec::new();
        for (path, seen) in &observed.execs {
            let last = Some(wall(seen.last_ns));
            if seen.count > seen.refused {
                ran.push(ProposedExec {
                    path: path.clone(),
                    execs: seen.count - seen.refused,
                    last: last.clone(),
                });
            }
            if seen.refused > 0 {
                killed.push(ProposedExec {
                    path: path.clone(),
                    execs: seen.refused,
                    last,
                });
            }
        }
        ran.sort_by(|a, b| a.path.cmp(&b.path));
        killed.sort_by(|a, b| a.path.cmp(&b.path));
        let exec_allow = (!ran.is_empty()).then_some(ran);
        (egress, exec_allow, killed)
    } else {
        // Enforce mode records no destination: the proposal is the configured rules that were
        // used, each with its count.
        let egress = agent
            .rule_texts
            .iter()
            .filter_map(|(id, text)| {
                let calls = hits.get(id).copied().unwrap_or(0);
                (calls > 0).then(|| ProposedRule {
                    rule: text.clone(),
                    calls,
                    would_deny: 0,
                    last: None,
                    addresses: Vec::new(),
                })
            })
            .collect();
        if let Some(list) = &agent.exec_allow {
            keep.insert(
                "exec_allow".to_owned(),
                toml::Value::Array(
                    list.iter()
                        .map(|p| toml::Value::String(p.display().to_string()))
                        .collect(),
                ),
            );
        }
        (egress, None, Vec::new())
    };
    Proposal {
        agent: agent.name.clone(),
        mode: if agent.learn { "learn" } else { "enforce" }.to_owned(),
        egress,
        exec_allow,
        killed_execs,
        resolvers,
        unused_rules,
        lost,
        keep,
        apis: Vec::new(),
        unused_apis: Vec::new(),
    }
}

/// Is this proposed address rule DNS to a resolver (`udp|tcp ADDR 53`)?
fn is_resolver(r: &ProposedRule) -> bool {
    let fields: Vec<&str> = r.rule.split_whitespace().collect();
    matches!(fields[..], ["udp" | "tcp", dest, "53"] if dest.parse::<IpAddr>().is_ok())
}

/// A rule's protocol word for protocol index `proto`. Another protocol (an ICMP ping socket)
/// can only be named by `any`, and has no port.
fn proto_word(proto: u8) -> (&'static str, bool) {
    match proto {
        PROTO_TCP => ("tcp", true),
        PROTO_UDP => ("udp", true),
        _ => ("any", false),
    }
}

/// The egress rules of a learn-mode agent: a hostname rule where the forwarder answered the
/// address with a name, an address rule otherwise (widened only as asked); ports exact.
fn egress_from(
    observed: &Observed,
    widen: Widen,
    wall: &impl Fn(u64) -> String,
) -> Vec<ProposedRule> {
    // (hostnames first, rule text) -> what backs the rule.
    let mut rules: BTreeMap<(u8, String), Tally> = BTreeMap::new();
    let mut add = |order: u8, text: String, seen: &Seen, addr: Option<String>| {
        let e = rules.entry((order, text)).or_default();
        e.calls += seen.count;
        e.would_deny += seen.refused;
        e.last_ns = e.last_ns.max(seen.last_ns);
        e.addrs.extend(addr);
    };
    // (proto, port, net) -> addresses in it, for widening.
    let mut plain: BTreeMap<(u8, u16, IpNet), Vec<(IpAddr, Seen)>> = BTreeMap::new();
    for (k, seen) in &observed.dests {
        let addr = addr_of(k.family, &k.addr);
        let (proto, has_port) = proto_word(k.proto);
        let ports = if has_port {
            k.port.to_string()
        } else {
            "*".to_owned()
        };
        if let Some(names) = observed.names.get(&addr) {
            for name in names {
                add(
                    0,
                    format!("{proto} {name} {ports}"),
                    seen,
                    Some(addr.to_string()),
                );
            }
            continue;
        }
        let net = match (addr, widen) {
            (IpAddr::V4(a), Widen { v4: Some(len), .. }) => Ipv4Net::new(a, len.min(32))
                .map(|n| IpNet::V4(n.trunc()))
                .unwrap_or(IpNet::from(addr)),
            (IpAddr::V6(a), Widen { v6: Some(len), .. }) => Ipv6Net::new(a, len.min(128))
                .map(|n| IpNet::V6(n.trunc()))
                .unwrap_or(IpNet::from(addr)),
            _ => IpNet::from(addr),
        };
        plain
            .entry((k.proto, if has_port { k.port } else { 0 }, net))
            .or_default()
            .push((addr, *seen));
    }
    for ((proto, port, net), members) in plain {
        let (word, has_port) = proto_word(proto);
        let ports = if has_port {
            port.to_string()
        } else {
            "*".to_owned()
        };
        let distinct: BTreeSet<IpAddr> = members.iter().map(|(a, _)| *a).collect();
        if distinct.len() >= 2 {
            for (_, seen) in &members {
                add(1, format!("{word} {net} {ports}"), seen, None);
            }
        } else {
            for (a, seen) in &members {
                add(1, format!("{word} {a} {ports}"), seen, None);
            }
        }
    }
    rules
        .into_iter()
        .map(|((_, rule), t)| ProposedRule {
            rule,
            calls: t.calls,
            would_deny: t.would_deny,
            last: Some(wall(t.last_ns)),
            addresses: t.addrs.into_iter().collect(),
        })
        .collect()
}

/// What one proposed rule stands for, added up over the destinations it covers.
#[derive(Default)]
struct Tally {
    calls: u64,
    would_deny: u64,
    last_ns: u64,
    addrs: BTreeSet<String>,
}

impl Proposal {
    /// The proposal as an `[[agents]]` table `agentwatch check` accepts, each rule and path
    /// with a comment saying what backs it, followed by the configured rules never used.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Least-privilege policy for agent `{}`, proposed by `agentwatch learn` from what it did \
             ({} mode).",
            self.agent, self.mode
        );
        if self.mode == "learn" {
            out.push_str(
                "# Review it, put it in place of the agent's [[agents]] table, then `agentwatch reload`:\n\
                 # the agent is then enforced (mode is left out).\n",
            );
        } else {
            out.push_str(
                "# Enforce mode records no destination: these are the configured rules that admitted calls.\n",
            );
        }
        if self.lost > 0 {
            let _ = writeln!(
                out,
                "# WARNING: {} call(s) or exec(s) found the agent's share of the kernel's learn records full (daemon.learn_quota) and went unrecorded: this proposal may miss some.",
                self.lost
            );
        }
        out.push_str("[[agents]]\n");
        let _ = writeln!(out, "name = {}", toml::Value::String(self.agent.clone()));
        let (scalars, tables): (Vec<_>, Vec<_>) = self
            .keep
            .iter()
            .partition(|(_, v)| !matches!(v, toml::Value::Table(_)));
        for (k, v) in scalars {
            let _ = writeln!(out, "{k} = {v}");
        }
        let egress: Vec<(String, String)> = self
            .egress
            .iter()
            .map(|r| {
                let mut why = format!("{} call{}", r.calls, plural(r.calls));
                if r.would_deny > 0 {
                    let _ = write!(why, " ({} not allowed by the current rules)", r.would_deny);
                }
                if let Some(last) = &r.last {
                    let _ = write!(why, ", last {last}");
                }
                if !r.addresses.is_empty() {
                    let _ = write!(why, "; answered {}", r.addresses.join(", "));
                }
                (toml::Value::String(r.rule.clone()).to_string(), why)
            })
            .collect();
        array(&mut out, "egress", &egress);
        match &self.exec_allow {
            Some(list) => {
                let lines: Vec<(String, String)> = list
                    .iter()
                    .map(|e| {
                        let mut why = format!("{} exec{}", e.execs, plural(e.execs));
                        if let Some(last) = &e.last {
                            let _ = write!(why, ", last {last}");
                        }
                        (toml::Value::String(e.path.clone()).to_string(), why)
                    })
                    .collect();
                array(&mut out, "exec_allow", &lines);
            }
            None if self.mode == "learn" => {
                out.push_str("# no exec was seen; `exec_allow = []` would forbid every exec\n");
            }
            None => {}
        }
        for r in &self.resolvers {
            let _ = writeln!(
                out,
                "# DNS to {} ({} call{}) goes to agentwatch's forwarder with the hostname rules: no rule needed",
                toml::Value::String(r.rule.clone()),
                r.calls,
                plural(r.calls)
            );
        }
        for e in &self.killed_execs {
            let _ = writeln!(
                out,
                "# killed by the exec allow-list, left out: {} ({} exec{})",
                toml::Value::String(e.path.clone()),
                e.execs,
                plural(e.execs)
            );
        }
        for (k, v) in tables {
            if let toml::Value::Table(t) = v {
                let _ = writeln!(out, "\n[agents.{k}]");
                out.push_str(&toml::to_string(t).unwrap_or_default());
            }
        }
        for api in &self.apis {
            out.push_str("\n[[agents.apis]]\n");
            let _ = writeln!(out, "name = {}", toml::Value::String(api.name.clone()));
            let mut keep = api.keep.clone();
            keep.remove("name");
            for (k, v) in &keep {
                let _ = writeln!(out, "{k} = {v}");
            }
            let allow: Vec<(String, String)> = api
                .allow
                .iter()
                .map(|c| {
                    (
                        toml::Value::String(c.pattern.clone()).to_string(),
                        format!("{} call{}", c.calls, plural(c.calls)),
                    )
                })
                .collect();
            array(&mut out, "allow", &allow);
            for c in &api.refused {
                let _ = writeln!(
                    out,
                    "# refused by `allow`, left out: {} ({} call{})",
                    toml::Value::String(c.pattern.clone()),
                    c.calls,
                    plural(c.calls)
                );
            }
            for p in &api.unused_allow {
                let _ = writeln!(
                    out,
                    "# configured, never used: {}",
                    toml::Value::String(p.clone())
                );
            }
            if api.lost > 0 {
                let _ = writeln!(
                    out,
                    "# WARNING: {} call(s) of paths past the {} the gateway remembers went unrecorded",
                    api.lost,
                    crate::gateway::serve::LEARNED_MAX
                );
            }
        }
        for name in &self.unused_apis {
            let _ = writeln!(
                out,
                "\n# API scope {} was never called: left out",
                toml::Value::String(name.clone())
            );
        }
        if !self.unused_rules.is_empty() {
            out.push_str("\n# Configured rules this agent never used (left out above):\n");
            for r in &self.unused_rules {
                let _ = writeln!(out, "#   {}", toml::Value::String(r.clone()));
            }
        }
        out
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `key = [` one item per line with its comment, aligned `]`.
fn array(out: &mut String, key: &str, items: &[(String, String)]) {
    let width = items.iter().map(|(v, _)| v.len()).max().unwrap_or(0) + 1;
    let _ = writeln!(out, "{key} = [");
    for (value, why) in items {
        let _ = writeln!(out, "  {:<width$} # {why}", format!("{value},"));
    }
    out.push_str("]\n");
}

#[cfg(test)]
mod tests {
    use agentwatch_common::PROTO_OTHER;

    use super::*;
    use crate::config::Config;

    fn dest(proto: u8, addr: IpAddr, port: u16) -> DestKey {
        let (family, addr) = judged(addr);
        DestKey {
            agent: 1,
            port,
            family,
            proto,
            addr,
        }
    }

    fn seen(count: u64, refused: u64) -> Seen {
        Seen {
            count,
            refused,
            last_ns: 5,
        }
    }

    const CONFIG: &str = r#"
[[agents]]
name = "a"
mode = "learn"
lease = "2h"
egress = ["tcp 10.0.0.0/8 443", "tcp  10.9.9.9   22", "tcp api.example.com 443"]
exec_allow = ["/usr/bin/python3"]
[agents.limits]
connects_per_second = 50
"#;

    #[test]
    fn proposes_exact_rules_that_check_accepts() {
        let config = Config::parse(CONFIG, "t.toml").unwrap();
        let agent = &config.agents[0];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let observed = Observed {
            dests: vec![
                (dest(PROTO_TCP, ip("10.1.2.3"), 443), seen(3, 0)),
                (dest(PROTO_TCP, ip("10.1.2.4"), 443), seen(2, 0)),
                (dest(PROTO_UDP, ip("192.0.2.7"), 514), seen(4, 4)),
                (dest(PROTO_TCP, ip("2001:db8::5"), 8443), seen(1, 1)),
                (dest(PROTO_OTHER, ip("192.0.2.9"), 0), seen(1, 1)),
                (dest(PROTO_TCP, ip("203.0.113.5"), 443), seen(6, 0)),
                (dest(PROTO_UDP, ip("127.0.0.53"), 53), seen(9, 0)),
            ],
            execs: vec![
                ("/usr/bin/python3".into(), seen(2, 0)),
                ("/usr/bin/nc".into(), seen(1, 1)),
            ],
            names: StdHashMap::from([(
                ip("203.0.113.5"),
                BTreeSet::from(["api.example.com".to_owned()]),
            )]),
        };
        let hits = StdHashMap::from([(agent.rule_texts[0].0, 5)]);
        let wall = |_| "2026-11-22T08:00:00Z".to_owned();
        let p = propose(agent, &hits, &observed, 0, Widen::default(), wall);
        let rules: Vec<&str> = p.egress.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(
            rules,
            [
                "tcp api.example.com 443",
                "any 192.0.2.9 *",
                "tcp 10.1.2.3 443",
                "tcp 10.1.2.4 443",
                "tcp 2001:db8::5 8443",
                "udp 192.0.2.7 514",
            ]
        );
        assert_eq!(p.egress[0].calls, 6);
        // With a hostname rule, DNS goes to the forwarder: the resolver needs no rule.
        assert_eq!(p.resolvers.len(), 1);
        assert_eq!(p.resolvers[0].rule, "udp 127.0.0.53 53");
        assert_eq!(p.egress[0].addresses, ["203.0.113.5"]);
        assert_eq!(p.egress[5].would_deny, 4);
        assert_eq!(
            p.unused_rules,
            ["tcp  10.9.9.9   22", "tcp api.example.com 443"]
        );
        let toml = p.to_toml();
        let back = Config::parse(&toml, "proposal.toml").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let b = &back.agents[0];
        assert!(!b.learn, "{toml}");
        assert_eq!(b.lease, agent.lease);
        assert_eq!(b.limits, agent.limits);
        assert_eq!(b.egress.len(), 5);
        assert_eq!(b.hostnames.0.len(), 1);
        assert_eq!(
            b.exec_allow.as_deref(),
            Some(&[std::path::PathBuf::from("/usr/bin/python3")][..])
        );
        assert!(toml.contains("# 6 calls, last 2026-11-22T08:00:00Z; answered 203.0.113.5"));
        assert!(
            toml.contains(
                "\"udp 192.0.2.7 514\",       # 4 calls (4 not allowed by the current rules)"
            ),
            "{toml}"
        );
        assert!(
            toml.contains("# killed by the exec allow-list, left out: \"/usr/bin/nc\" (1 exec)")
        );
        assert!(toml.contains("#   \"tcp  10.9.9.9   22\""));
        assert!(toml.contains("# DNS to \"udp 127.0.0.53 53\" (9 calls) goes to"));

        // Widening only where asked, and only where two addresses share the network.
        let widen = Widen {
            v4: Some(24),
            v6: None,
        };
        let p = propose(agent, &hits, &observed, 0, widen, wall);
        let rules: Vec<&str> = p.egress.iter().map(|r| r.rule.as_str()).collect();
        assert!(rules.contains(&"tcp 10.1.2.0/24 443"), "{rules:?}");
        assert!(rules.contains(&"udp 192.0.2.7 514"), "{rules:?}");
        assert_eq!(
            p.egress
                .iter()
                .find(|r| r.rule == "tcp 10.1.2.0/24 443")
                .map(|r| r.calls),
            Some(5)
        );
    }

    #[test]
    fn enforce_mode_proposes_the_rules_used() {
        let config = Config::parse(&CONFIG.replace("mode = \"learn\"\n", ""), "t.toml").unwrap();
        let agent = &config.agents[0];
        let hits = StdHashMap::from([(agent.rule_texts[1].0, 7)]);
        let p = propose(
            agent,
            &hits,
            &Observed::default(),
            0,
            Widen::default(),
            |_| String::new(),
        );
        assert_eq!(p.egress.len(), 1);
        assert_eq!(p.egress[0].rule, "tcp  10.9.9.9   22");
        assert_eq!(p.egress[0].calls, 7);
        assert_eq!(p.unused_rules.len(), 2);
        assert!(!p.to_toml().contains("WARNING"));
        let partial = propose(
            agent,
            &hits,
            &Observed::default(),
            3,
            Widen::default(),
            |_| String::new(),
        );
        assert!(partial.to_toml().contains(
            "# WARNING: 3 call(s) or exec(s) found the agent's share of the kernel's learn records full (daemon.learn_quota) and went unrecorded: this proposal may miss some."
        ));
        let toml = p.to_toml();
        let back = Config::parse(&toml, "proposal.toml").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(back.agents[0].exec_allow, agent.exec_allow);
    }
}
