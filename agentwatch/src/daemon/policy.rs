//! Applying a config: as a plan computed from the old and the new one. Everything that can fail
//! is prepared first (new agents' cgroups, state, rules and links; changed agents' next rule
//! generation); a plan that fails while preparing is rolled back and changes nothing. Then the
//! changed agents switch, each in one map write; then what is gone is removed.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agentwatch_common::AGENT_FLAG_TRIPPED;
use anyhow::Result;
use serde_json::{Value, json};

use super::{ConfigSource, Shared, State, lock};
use crate::{
    agent::{Guarding, Policy, PreparedPolicy},
    breaker::{Monitor, SIGNALS, Signal},
    cgroup::Cgroup,
    config::{Agent, Config},
    dns::Endpoint,
};

/// An agent guarded while preparing a plan: what undoing it takes.
pub(super) struct Added {
    name: String,
    how: Guarding,
    /// This plan created the cgroup (remove it again on rollback).
    created: bool,
    /// The `agent_guarded` audit record, written once the plan went through.
    pub(super) audit: Value,
}

impl State {
    /// Applies `new`: agents added are guarded, agents removed are unguarded (their processes
    /// keep running, reported), agents whose policy changed get it swapped atomically. A config
    /// that fails anywhere before the switch changes nothing.
    pub(super) fn apply(&mut self, new: Config) -> Result<String, String> {
        // Agents guarded or forgotten make and remove pins: the tamper guard looks again.
        self.pins_dirty = true;
        // Agents waiting for their cgroup to come back are judged by the new config like any
        // agent not guarded now: added if it names them (and their cgroup exists), else gone.
        self.vanished.clear();
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
        // Secrets read and upstream clients built before anything changes: a secret that
        // cannot be read (or may be read by others) refuses the whole config.
        let mut gateway_plan = self.prepare_gateway(&new)?;
        let gateway = self.gateway.addr();
        let old: BTreeMap<String, Agent> = self
            .config
            .agents
            .iter()
            .map(|a| (a.name.clone(), a.clone()))
            .collect();
        // An agent whose cgroup moved is removed and added again.
        let removed: Vec<&Agent> = old
            .values()
            .filter(|a| new.agent(&a.name).is_none_or(|n| n.cgroup != a.cgroup))
            .collect();
        let changed: Vec<&Agent> = new
            .agents
            .iter()
            .filter(|a| {
                old.get(&a.name)
                    .is_some_and(|o| o.cgroup == a.cgroup && *o != **a)
            })
            .collect();
        let added: Vec<&Agent> = new
            .agents
            .iter()
            .filter(|a| old.get(&a.name).is_none_or(|o| o.cgroup != a.cgroup))
            .collect();
        // A cgroup belongs to one agent at a time: an added agent that takes over a removed
        // one's cgroup can only be guarded once that one is unguarded.
        let (deferred, added): (Vec<&Agent>, Vec<&Agent>) = added
            .into_iter()
            .partition(|a| removed.iter().any(|r| r.cgroup == a.cgroup));

        // 1. Prepare everything that can fail.
        let mut guarded = Vec::new();
        // With the DNS forwarder sockets bound for agents that gain hostname rules.
        let mut prepared: Vec<(PreparedPolicy, Option<Endpoint>)> = Vec::new();
        let mut failure = None;
        for a in &added {
            match self.add_agent(a) {
                Ok(g) => guarded.push(g),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for a in &changed {
                let mut policy = match policy_of(a, &self.config.daemon, gateway) {
                    Ok(p) => p,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                let endpoint = if !self.wants_dns(a) {
                    None
                } else if let Some(ports) = self.dns.ports(&a.name) {
                    policy.dns = Some(ports);
                    None
                } else {
                    match self.dns.bind() {
                        Ok(e) => {
                            policy.dns = Some(e.ports);
                            Some(e)
                        }
                        Err(e) => {
                            failure = Some(format!("agent `{}`: {e}", a.name));
                            break;
                        }
                    }
                };
                match self.agents.prepare_policy(&a.name, policy) {
                    Ok(p) => prepared.push((p, endpoint)),
                    Err(e) => {
                        failure = Some(format!("agent `{}`: {e}", a.name));
                        break;
                    }
                }
            }
        }
        if let Some(e) = failure {
            for (p, _) in prepared {
                self.agents.abort_policy(p);
            }
            for g in guarded.into_iter().rev() {
                self.undo_add(g);
            }
            return Err(e);
        }

        // 2. Switch.
        if !prepared.is_empty() {
            crate::crash::point("reload.prepared");
        }
        let mut summary = Vec::new();
        let mut retired = Vec::new();
        let switched = 'switch: {
            for (i, (p, endpoint)) in prepared.into_iter().enumerate() {
                let name = p.name().to_owned();
                match self.agents.commit_policy(p) {
                    Ok(r) => retired.push(r),
                    Err(e) => break 'switch Err(format!("switching a policy: {e}")),
                }
                if i == 0 {
                    crate::crash::point("reload.switched_one");
                }
                let Some(a) = new.agent(&name) else { continue };
                let served = match (!self.wants_dns(a), endpoint) {
                    (true, _) => {
                        self.dns.stop(&name);
                        Ok(())
                    }
                    (false, Some(endpoint)) => self.serve_dns(a, endpoint),
                    (false, None) => self.dns.update(&name, a.hostnames.clone(), a.learn),
                };
                if let Err(e) = served {
                    break 'switch Err(format!("agent `{name}`: {e}"));
                }
            }
            Ok(())
        };
        // The old generations go once no call can still be reading them, also when a later
        // step failed: a generation left behind would be written over by the next reload
        // (which does not clear it first), its stale rules mixed into the new ones.
        let retire_result = self
            .agents
            .retire(retired)
            .map_err(|e| format!("removing the old policies: {e}"));
        switched?;
        retire_result?;
        for a in &changed {
            if let Some(m) = self.monitors.get_mut(&a.name) {
                m.reconfigure(a.breaker);
                m.set_counted(counted_signals(a), Instant::now());
            }
        }
        // A rule gone (a hostname rule's learned addresses with it): what the agent opened
        // under it stops now, not at its next connect.
        for a in &changed {
            let removed_rule = self
                .config
                .agent(&a.name)
                .is_some_and(|old| old.rule_texts.iter().any(|r| !a.rule_texts.contains(r)));
            if removed_rule {
                self.close_refused_sockets(&a.name, "reload");
            }
        }
        for g in guarded {
            self.audit_agent(&g.name, "agent_guarded", g.audit);
            summary.push(format!("+{}", g.name));
        }

        // 3. Remove what is gone, then guard the agents that waited for a removed one's cgroup.
        for a in &removed {
            self.remove_agent(a);
            summary.push(format!("-{}", a.name));
        }
        // These can only fail after the switch: the rest of the plan stays applied, and an
        // agent that could not be guarded is left out of the config in force (so the next
        // reload tries it again), and reported.
        let mut late = Vec::new();
        for a in &deferred {
            match self.add_agent(a) {
                Ok(g) => {
                    self.audit_agent(&g.name, "agent_guarded", g.audit);
                    summary.push(format!("+{}", g.name));
                }
                Err(e) => late.push((a.name.clone(), e)),
            }
        }
        summary.extend(changed.iter().map(|a| format!("~{}", a.name)));
        summary.sort_by_key(|s| match s.as_bytes().first() {
            Some(b'-') => 0,
            Some(b'+') => 1,
            _ => 2,
        });
        let mut agents = new.agents;
        agents.retain(|a| !late.iter().any(|(n, _)| *n == a.name));
        // The gateway serves exactly the agents in force; the others' tokens are revoked.
        for a in &removed {
            self.gateway.remove_agent(&a.name, "removed");
        }
        for (name, _) in &late {
            self.gateway.remove_agent(name, "removed");
        }
        for a in &agents {
            let scopes = gateway_plan.remove(&a.name).unwrap_or_default();
            match (self.agents.info(&a.name), self.agents.cgroup(&a.name)) {
                (Some(info), Some(cg)) => {
                    self.gateway
                        .set_agent(&a.name, info.cgroup_id, cg.path(), scopes);
                }
                _ => self.gateway.remove_agent(&a.name, "removed"),
            }
            self.sync_gateway(&a.name);
        }
        self.config = Config {
            daemon: self.config.daemon.clone(),
            agents,
            secrets: new.secrets,
        };
        self.sync_learn();
        if late.is_empty() {
            Ok(summary.join(" "))
        } else {
            let failed: Vec<String> = late.into_iter().map(|(_, e)| e).collect();
            Err(format!(
                "applied ({}), except: {}",
                summary.join(" "),
                failed.join("; ")
            ))
        }
    }

    /// Guards agent `a` (creating or opening its cgroup); audits nothing yet.
    pub(super) fn add_agent(&mut self, a: &Agent) -> Result<Added, String> {
        let path = self.mount.join(&a.cgroup);
        let endpoint = if !self.wants_dns(a) {
            None
        } else {
            Some(
                self.dns
                    .bind()
                    .map_err(|e| format!("agent `{}`: {e}", a.name))?,
            )
        };
        let mut policy = policy_of(a, &self.config.daemon, self.gateway.addr())?;
        policy.dns = endpoint.as_ref().map(|e| e.ports);
        let (cgroup, created) = if a.adopted {
            (Cgroup::open(&path).map_err(|e| e.to_string())?, false)
        } else {
            Cgroup::create(&path).map_err(|e| e.to_string())?
        };
        let how = match self.agents.guard(&a.name, cgroup.clone(), policy) {
            Ok(how) => how,
            Err(e) => {
                if created {
                    let _ = cgroup.remove();
                }
                return Err(format!("guarding agent `{}`: {e}", a.name));
            }
        };
        let adopted = how == Guarding::Adopted;
        let mut monitor = Monitor::new(a.breaker, Instant::now()).counting(counted_signals(a));
        // A breaker that was open when the last daemon stopped is still open.
        if self
            .agents
            .info(&a.name)
            .is_some_and(|i| i.state.flags & AGENT_FLAG_TRIPPED != 0)
        {
            monitor.force_open(Instant::now());
        }
        self.monitors.insert(a.name.clone(), monitor);
        // Summaries count from here: for a re-adopted agent, what was counted while no daemon
        // ran is in its metrics, not in a summary.
        let counters = match how {
            Guarding::New => Default::default(),
            Guarding::Adopted => self.agents.counters(&a.name).unwrap_or_default(),
        };
        self.swept.start(&a.name, counters);
        let added = Added {
            name: a.name.clone(),
            how,
            created,
            audit: json!({
                "cgroup": path.display().to_string(),
                "rules": a.egress.iter().map(ToString::to_string)
                    .chain(a.hostnames.0.iter().map(ToString::to_string))
                    .collect::<Vec<_>>(),
                "readopted": adopted,
            }),
        };
        if let Some(endpoint) = endpoint
            && let Err(e) = self.serve_dns(a, endpoint)
        {
            self.undo_add(added);
            return Err(format!("agent `{}`: {e}", a.name));
        }
        tracing::info!(agent = %a.name, cgroup = %path.display(), rules = a.egress.len(), hostname_rules = a.hostnames.0.len(), adopted, "agent guarded");
        Ok(added)
    }

    /// Does agent `a` get a DNS forwarder? With hostname rules, always (without an upstream
    /// that is an error); in learn mode, whenever there is an upstream, so that the proposal
    /// can name the hosts the agent looked up rather than their addresses of the day.
    fn wants_dns(&self, a: &Agent) -> bool {
        !a.hostnames.is_empty() || (a.learn && self.dns.has_upstream())
    }

    /// Drops the rule counts of rules no longer configured and learn mode's records of agents
    /// no longer in learn mode (or gone), so that neither `status --rules` nor `learn` shows
    /// what the config in force no longer says.
    /// Closes agent `name`'s open sockets its policy in force refuses; audits
    /// `sockets_closed` (reason, count, and up to 16 of them: proto, local, peer).
    fn close_refused_sockets(&mut self, name: &str, reason: &str) {
        match self.agents.close_refused_sockets(name) {
            Ok(closed) if closed.is_empty() => {}
            Ok(closed) => {
                let shown: Vec<serde_json::Value> = closed
                    .iter()
                    .take(16)
                    .map(|s| {
                        serde_json::json!({
                            "proto": if s.protocol == libc::IPPROTO_TCP as u8 { "tcp" } else { "udp" },
                            "local": s.local.to_string(),
                            "peer": s.peer.to_string(),
                        })
                    })
                    .collect();
                tracing::warn!(
                    agent = name,
                    count = closed.len(),
                    reason,
                    "open sockets closed"
                );
                self.audit_agent(
                    name,
                    "sockets_closed",
                    serde_json::json!({ "reason": reason, "count": closed.len(), "sockets": shown }),
                );
            }
            Err(e) => {
                tracing::error!(agent = name, "closing the sockets its policy refuses: {e}");
                self.audit_agent(
                    name,
                    "sockets_closed",
                    serde_json::json!({ "reason": reason, "error": e }),
                );
            }
        }
    }

    fn sync_learn(&self) {
        let mut rules: BTreeMap<u32, std::collections::HashSet<u64>> = BTreeMap::new();
        let mut learning = std::collections::HashSet::new();
        for a in &self.config.agents {
            if let Some(info) = self.agents.info(&a.name) {
                rules.insert(info.id, a.rule_texts.iter().map(|(id, _)| *id).collect());
                if a.learn {
                    learning.insert(info.id);
                }
            }
        }
        let learn = self.agents.kernel().learn();
        let kept = learn
            .retain_hits(|agent, rule| rules.get(&agent).is_some_and(|r| r.contains(&rule)))
            .and_then(|()| learn.retain_observed(|agent| learning.contains(&agent)));
        if let Err(e) = kept {
            tracing::warn!("removing rule counts and learn records no longer configured: {e}");
        }
    }

    /// Starts agent `a`'s DNS forwarder on `endpoint` (its ports are already in the kernel).
    fn serve_dns(&mut self, a: &Agent, endpoint: Endpoint) -> Result<(), String> {
        let id = self
            .agents
            .info(&a.name)
            .map(|i| i.id)
            .ok_or_else(|| format!("agent `{}` is not guarded", a.name))?;
        self.dns
            .serve(&a.name, id, a.hostnames.clone(), a.learn, endpoint)
    }

    /// Rolls back an [`State::add_agent`] of a plan that failed: a new agent is unguarded (and
    /// its fresh cgroup removed); one re-adopted from an earlier daemon's pins is left in the
    /// kernel as it was found, only forgotten here.
    fn undo_add(&mut self, g: Added) {
        self.monitors.remove(&g.name);
        self.dns.stop(&g.name);
        match g.how {
            Guarding::Adopted => self.agents.release(&g.name),
            Guarding::New => match self.agents.unguard(&g.name) {
                Ok(cgroup) => {
                    if g.created {
                        let _ = cgroup.remove();
                    }
                }
                Err(e) => tracing::error!(agent = %g.name, "rolling back its guard: {e}"),
            },
        }
    }

    fn remove_agent(&mut self, a: &Agent) {
        self.monitors.remove(&a.name);
        // Its forwarder stops before the slot is cleared: nothing is learned for it after.
        self.dns.stop(&a.name);
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

    /// Re-reads the config file and applies it, or rejects it whole.
    pub(super) fn reload_from_disk(&mut self) -> Result<String, String> {
        let ConfigSource::File(path) = &self.source else {
            return Err(
                "running on the embedded default config: there is no file to reload".into(),
            );
        };
        let path = path.clone();
        self.last_seen = SeenConfig::read(&path);
        // A config someone else could have written is no config of root's (crate::ownership).
        let result = crate::ownership::check("the config", &path)
            .map_err(|e| e.to_string())
            .and_then(|()| Config::load(&path).map_err(|e| e.to_string()))
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
}

/// The kernel policy of a configured agent.
impl State {
    /// Every secret of `new` read, and every scope's upstream client built: per agent, its
    /// scopes ready for the gateway. Nothing is changed; an error refuses the config whole.
    fn prepare_gateway(
        &mut self,
        new: &Config,
    ) -> Result<BTreeMap<String, Vec<crate::gateway::serve::PreparedScope>>, String> {
        use crate::gateway::{secrets, serve::PreparedScope, upstream};
        // The listener first: the agents' rules name where it listens.
        if new.agents.iter().any(|a| !a.apis.is_empty()) {
            let listen = new.daemon.gateway_listen;
            let addr = self.gateway.listen().map_err(|e| {
                format!(
                    "binding gateway_listen {listen} (is another daemon or program using it?): {e}"
                )
            })?;
            self.agents.kernel_mut().set_gateway(addr).map_err(|e| {
                format!("telling the egress programs where the gateway listens: {e}")
            })?;
        }
        let mut errors = Vec::new();
        let mut loaded = BTreeMap::new();
        for (name, source) in &new.secrets {
            match secrets::load(name, source) {
                Ok(s) => {
                    loaded.insert(name.clone(), Arc::new(s));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        // The host's roots are read once, and only if a scope trusts them.
        let mut system: Option<Result<Arc<rustls::RootCertStore>, String>> = None;
        let mut plan = BTreeMap::new();
        for a in &new.agents {
            let mut scopes = Vec::new();
            for api in &a.apis {
                let roots = match &api.ca_file {
                    Some(path) => upstream::roots_from(path).map_err(|e| e.to_string()),
                    None => system
                        .get_or_insert_with(|| upstream::system_roots().map_err(|e| e.to_string()))
                        .clone(),
                };
                let client = roots.and_then(|r| upstream::client(r).map_err(|e| e.to_string()));
                match (client, loaded.get(&api.secret)) {
                    (Ok(client), Some(secret)) => {
                        match crate::gateway::scope::secret_fits(api, secret) {
                            Ok(()) => scopes.push(PreparedScope::new(
                                api.clone(),
                                Arc::clone(secret),
                                client,
                            )),
                            Err(e) => errors.push(format!("agent `{}` {e}", a.name)),
                        }
                    }
                    (Err(e), _) => {
                        errors.push(format!("agent `{}` api `{}`: {e}", a.name, api.name))
                    }
                    // Its secret's own error is already in the list.
                    (Ok(_), None) => {}
                }
            }
            plan.insert(a.name.clone(), scopes);
        }
        if errors.is_empty() {
            Ok(plan)
        } else {
            Err(errors.join("; "))
        }
    }

    /// Tells the gateway what the kernel says of agent `agent`: denied (breaker, kill switch)
    /// and when its lease ends.
    pub(super) fn sync_gateway(&self, agent: &str) {
        let flags = self.agents.info(agent).map_or(0, |i| i.state.flags);
        self.gateway
            .set_denied(agent, flags & agentwatch_common::AGENT_FLAG_DENY_ALL != 0);
        self.gateway
            .set_lease_end(agent, self.agents.lease_deadline(agent));
    }
}

/// The kernel policy of agent `a`. An agent with API scopes may also connect to the gateway
/// at `gateway` (its own rules need not name it; nothing else of the host is opened).
fn policy_of(
    a: &Agent,
    daemon: &crate::config::DaemonConfig,
    gateway: Option<std::net::SocketAddr>,
) -> Result<Policy, String> {
    let rules = if a.apis.is_empty() {
        a.compiled.clone()
    } else {
        let gateway = gateway
            .ok_or_else(|| format!("agent `{}`: the API gateway is not listening", a.name))?;
        let rule: crate::egress::Rule = format!("tcp {} {}", gateway.ip(), gateway.port())
            .parse()
            .map_err(|e| format!("agent `{}`: the gateway's rule: {e}", a.name))?;
        let mut all = a.egress.clone();
        all.push(rule);
        crate::egress::compile(&all).map_err(|e| format!("agent `{}`: {e}", a.name))?
    };
    Ok(Policy {
        rules,
        connects_per_second: a.limits.connects_per_second,
        sends_per_second: a.limits.sends_per_second,
        events_per_second: Some(daemon.audit_rate),
        exec_allow: a.exec_allow.clone(),
        files: a.files.clone(),
        monitor_syscalls: a.monitor.syscalls,
        // Set by the caller once the forwarder's sockets are bound.
        dns: None,
        lease: a.lease,
        egress_bytes_per_second: a.limits.egress_bytes_per_second,
        learn: a.learn,
        learn_quota: daemon.learn_quota,
        gateway: !a.apis.is_empty(),
        count_destinations: counted_signals(a)[Signal::Destinations as usize],
    })
}

/// The signals the kernel counts for agent `a`: what its policy turns on in the kernel and
/// what its monitor judges, from one rule ([`Signal::counted`]).
fn counted_signals(a: &Agent) -> [bool; SIGNALS] {
    Signal::counted(a.monitor.syscalls, a.breaker.is_some())
}

/// Reloads when the config file's content changes (editors that replace the file included).
pub(super) async fn watch_config(state: Shared) -> Result<()> {
    let ConfigSource::File(path) = lock(&state).source.clone() else {
        return Ok(());
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // The file is read only when its metadata changed: a config of a million rules is
        // 25 MB, which the idle daemon used to read and compare every second.
        let Ok(meta) = tokio::fs::metadata(&path).await else {
            continue;
        };
        let stamp = Stamp::of(&meta);
        let (state, path) = (Arc::clone(&state), path.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let mut s = lock(&state);
            if s.last_seen.stamp == Some(stamp) {
                return;
            }
            let Ok(now) = std::fs::read(&path) else {
                return;
            };
            if s.last_seen.bytes.as_deref() != Some(now.as_slice()) {
                tracing::info!("config file changed: reloading");
                let _ = s.reload_from_disk();
            } else {
                // Touched, not changed (or changed back): nothing to apply.
                s.last_seen.stamp = Some(stamp);
            }
        })
        .await;
    }
}

/// What the config watcher saw of the file last: its bytes (what decides whether to reload),
/// and its metadata when they were read (what decides whether to read them again).
#[derive(Default)]
pub(super) struct SeenConfig {
    stamp: Option<Stamp>,
    bytes: Option<Vec<u8>>,
}

impl SeenConfig {
    /// The file at `path` now. The metadata is taken before the bytes: a write between the two
    /// leaves an old stamp beside new bytes, so the next look reads the file again; the other
    /// order could pair a new stamp with old bytes and miss the write for good.
    pub(super) fn read(path: &std::path::Path) -> Self {
        let stamp = std::fs::metadata(path).ok().map(|m| Stamp::of(&m));
        Self {
            stamp,
            bytes: std::fs::read(path).ok(),
        }
    }
}

/// A file's identity and change times. An edit in place moves mtime and ctime (ctime cannot be
/// set back by the writer); a rename over it (editors, Kubernetes ConfigMaps) changes the inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}
