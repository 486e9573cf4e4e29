//! Once a second: what an agent did beyond its audit rate goes into the trail as summaries,
//! expired DNS-learned addresses leave the kernel, the kernel learns the cgroups agents made
//! below their own, processes of an agent that hold a capability able to switch agentwatch
//! off are audited (once each), every link is checked to be still attached and the daemon's
//! checkpoint written ([`super::watchdog`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use agentwatch_common::{AGENT_FLAG_KILLED, AgentCounters};
use serde_json::json;

use super::State;
use crate::{bpf::ktime_ns, cgroup::Presence, config::LeaseAction, privileges};

/// How many destinations an `egress_denied_summary` names (the busiest).
const SUMMARY_DESTS: usize = 10;

/// What the sweeps have accounted for so far.
pub(super) struct Swept {
    /// Per agent: the counters as of the last sweep (or as of its guarding).
    counters: BTreeMap<String, AgentCounters>,
    /// Per agent: its live processes already checked for a dangerous capability (and audited
    /// if they held one). Each is read once: see [`State::audit_privileged`].
    checked: HashMap<String, HashSet<u32>>,
    /// The pins were there at the last sweep.
    pins_present: bool,
    /// The last error pinning again, so that a sweep that fails alike says nothing new.
    restore_error: Option<String>,
    /// Sweeps run so far (the allocator is trimmed every [`TRIM_EVERY`]th).
    sweeps: u64,
}

/// How many sweeps (seconds) between two trims of the allocator's free memory.
const TRIM_EVERY: u64 = 10;

impl Default for Swept {
    fn default() -> Self {
        Self {
            counters: BTreeMap::new(),
            checked: HashMap::new(),
            // The daemon made or found them at its start.
            pins_present: true,
            restore_error: None,
            sweeps: 0,
        }
    }
}

/// How often the sweep runs: summaries are per second.
pub(super) const PERIOD: Duration = Duration::from_secs(1);

impl Swept {
    /// Agent `name` is guarded now, with `counters`: the next sweep summarises from there.
    pub(super) fn start(&mut self, name: &str, counters: AgentCounters) {
        self.counters.insert(name.to_owned(), counters);
    }
}

/// Hands the allocator's free pages back to the kernel. The daemon's live heap stays under a
/// megabyte (measured with heaptrack after 1,500 launches and 100 reloads: 383 KiB live), but
/// glibc keeps what its per-thread arenas freed: with the tokio threads' short-lived
/// allocations interleaved with longer-lived ones, the soak's RSS crept up 46-75 KiB a minute
/// in those arenas with nothing live growing. malloc_trim releases every free page of every
/// arena, not only the top of the main heap; on a heap this small it takes well under a
/// millisecond.
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Every agent's counters, by name, in one read ([`crate::agent::Agents::all_counters`]).
pub(super) fn read_counters(
    agents: &crate::agent::Agents,
) -> Result<Vec<(String, AgentCounters)>, String> {
    agents
        .all_counters()
        .map(|all| all.into_iter().map(|(n, c)| (n.to_owned(), c)).collect())
        .map_err(|e| e.to_string())
}

impl State {
    pub(super) fn sweep(&mut self) {
        // Before anything that may freeze or kill an agent (leases, breakers).
        let _ = self.leave_agents();
        // Which cgroups are gone, empty or populated: read by the steps below.
        self.agents.refresh_presence();
        let names: Vec<String> = self.agents.names().map(str::to_owned).collect();
        // Every agent's counters in one read, for the summaries and the checkpoints.
        let counters = read_counters(&self.agents);
        match &counters {
            Ok(all) => {
                for (name, now) in all {
                    self.summarise(name, *now);
                }
            }
            Err(e) => tracing::error!("reading the agents' counters for their summaries: {e}"),
        }
        self.sweep_pins();
        self.sweep_vanished();
        // After sweep_vanished: a removed cgroup's links went with it, which is not tamper.
        self.watch_links();
        self.heartbeat(counters.as_deref().map_err(String::as_str));
        self.sweep_dns();
        self.sweep_leases();
        // Whatever changed an agent's flags or lease, the gateway agrees within a second.
        for name in &names {
            self.sync_gateway(name);
        }
        if let Err(e) = self.agents.sync_nested() {
            tracing::error!("updating the nested cgroups of agents: {e}");
        }
        match self.agents.refresh_exec() {
            Ok(changed) => {
                for (agent, path) in changed {
                    self.audit_agent(
                        &agent,
                        "exec_allow_refreshed",
                        serde_json::json!({ "path": path.display().to_string() }),
                    );
                }
            }
            Err(e) => tracing::error!("updating the files exec allow-lists name: {e}"),
        }
        for name in &names {
            self.audit_privileged(name);
        }
        // Forget agents that are gone (a set: a list would compare every name with every
        // other, a million string compares a second at 1,000 agents).
        let names: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        self.swept
            .counters
            .retain(|n, _| names.contains(n.as_str()));
        self.swept.checked.retain(|n, _| names.contains(n.as_str()));
        self.swept.sweeps += 1;
        if self.swept.sweeps.is_multiple_of(TRIM_EVERY) {
            trim_allocator();
        }
    }

    /// The pins are what keeps enforcement when the daemon is gone. If they vanish (the bpffs
    /// under `pin_dir` unmounted, or the folder removed), enforcement holds only while this
    /// daemon runs: said loudly, once, in the log and the trail (`pins_lost`). This daemon
    /// still holds every map and link, so as soon as there is a bpffs at `pin_dir` again (the
    /// folder can be made, or bpffs is mounted again) it pins them all again, audited
    /// (`pins_restored`): a daemon killed after that leaves enforcement in place again.
    fn sweep_pins(&mut self) {
        let Some(pins) = self.agents.kernel().pins() else {
            return;
        };
        let pin_dir = pins.root().display().to_string();
        if self.swept.pins_present && !pins.exists() {
            self.swept.pins_present = false;
            tracing::error!(%pin_dir, "the pinned programs and maps are gone (bpffs unmounted or the folder removed): enforcement now holds only while this daemon runs; agentwatch pins them again as soon as bpffs is mounted there again");
            self.audit_daemon(
                "pins_lost",
                json!({
                    "pin_dir": pin_dir,
                    "effect": "enforcement holds only while this daemon runs",
                    "fix": "mount bpffs again at or above pin_dir: agentwatch pins everything again by itself",
                }),
            );
        }
        if self.swept.pins_present || !pins.on_bpffs() {
            return;
        }
        match self.agents.restore_pins() {
            Ok((maps, links)) => {
                self.pins_dirty = true;
                // Not one of the object's maps (`maps` counts those): pinned beside them.
                if let Err(e) = self.agents.kernel().repin_checkpoints() {
                    tracing::error!(%pin_dir, "pinning the daemon's checkpoints again: {e}");
                }
                self.swept.pins_present = true;
                self.swept.restore_error = None;
                tracing::info!(%pin_dir, maps, links, "pinned the maps and links again: enforcement outlives this daemon again");
                self.audit_daemon(
                    "pins_restored",
                    json!({ "pin_dir": pin_dir, "maps": maps, "links": links }),
                );
            }
            Err(e) => {
                let e = e.to_string();
                if self.swept.restore_error.as_ref() != Some(&e) {
                    tracing::error!(%pin_dir, "pinning the maps and links again: {e}; retrying every second");
                    self.swept.restore_error = Some(e);
                }
            }
        }
    }

    /// An agent whose cgroup was removed from under the daemon (a cgroup can only be removed
    /// once empty: its processes are gone) loses its guard, audited (`agent_cgroup_removed`),
    /// and is guarded again as soon as its cgroup exists again: at once for a cgroup agentwatch
    /// made (made again), when the service comes back for an adopted one (systemd removes a
    /// service's cgroup when it stops and makes a new one when it starts). Until then it is out
    /// of the config in force; a reload that names it tries it like a new agent.
    fn sweep_vanished(&mut self) {
        let gone: Vec<crate::config::Agent> = self
            .config
            .agents
            .iter()
            .filter(|a| {
                // The guarded cgroup itself, not its path: one removed and made again at once
                // (a service restarted) is another cgroup, with none of the agent's links.
                self.agents.presence(&a.name) == Some(Presence::Gone)
            })
            .cloned()
            .collect();
        for a in gone {
            self.monitors.remove(&a.name);
            self.dns.stop(&a.name);
            let cgroup = self.mount.join(&a.cgroup);
            if let Err(e) = self.agents.unguard(&a.name) {
                tracing::error!(agent = %a.name, "dropping the guard of a removed cgroup: {e}");
            }
            self.config.agents.retain(|c| c.name != a.name);
            tracing::warn!(agent = %a.name, cgroup = %cgroup.display(), adopted = a.adopted, "the agent's cgroup was removed from under agentwatch; it is guarded again when the cgroup exists again");
            self.audit_agent(
                &a.name,
                "agent_cgroup_removed",
                json!({
                    "cgroup": cgroup.display().to_string(),
                    "guarded_again": if a.adopted { "when the cgroup exists again" } else { "now: agentwatch makes it again" },
                }),
            );
            self.vanished.push(a);
        }
        let waiting = std::mem::take(&mut self.vanished);
        for a in waiting {
            if a.adopted && !self.mount.join(&a.cgroup).join("cgroup.procs").exists() {
                self.vanished.push(a);
                continue;
            }
            match self.add_agent(&a) {
                Ok(g) => {
                    let mut fields = g.audit.clone();
                    fields["again"] = json!(true);
                    self.audit_agent(&a.name, "agent_guarded", fields);
                    tracing::info!(agent = %a.name, "guarded again");
                    self.config.agents.push(a);
                }
                Err(e) => {
                    tracing::error!(agent = %a.name, "guarding again: {e}");
                    self.vanished.push(a);
                }
            }
        }
    }

    /// An expired lease is audited (`lease_expired`) and its action run, once per expiry. The
    /// kernel already denies the agent's egress from the deadline on, daemon or not; a daemon
    /// that starts after the deadline audits and acts then. Which expiry was audited is kept
    /// in the kernel beside the deadline, so a restarted daemon does not audit it again.
    fn sweep_leases(&mut self) {
        let leased: Vec<(String, LeaseAction)> = self
            .config
            .agents
            .iter()
            .filter(|a| a.lease.is_some())
            .map(|a| (a.name.clone(), a.lease_action))
            .collect();
        for (name, action) in leased {
            let Some(deadline) = self.agents.lease_deadline(&name) else {
                continue;
            };
            if ktime_ns() < deadline || self.agents.lease_expiry_audited(&name) {
                continue;
            }
            let result = match action {
                LeaseAction::Deny => Ok(()),
                LeaseAction::Freeze => self
                    .leave_agents()
                    .and_then(|()| self.cgroup_of(&name))
                    .and_then(|cg| cg.set_frozen(true).map_err(|e| e.to_string())),
                LeaseAction::Kill => self.kill_tree(&name, AGENT_FLAG_KILLED).map(drop),
            };
            let mut fields = json!({ "action": action.name() });
            if let Err(e) = result {
                tracing::error!(agent = %name, "lease action {}: {e}", action.name());
                fields["action_error"] = json!(e);
            }
            tracing::warn!(agent = %name, action = action.name(), "egress lease expired");
            self.audit_agent(&name, "lease_expired", fields);
            // Recorded after the line is handed to the writer: a crash in between repeats the
            // line after the restart rather than lose it.
            if let Err(e) = self.agents.mark_lease_expiry_audited(&name) {
                tracing::error!(agent = %name, "recording the audited lease expiry: {e}");
            }
        }
    }

    /// Refused DNS names over the audit rate go into `dns_denied_summary`; learned addresses
    /// whose every deadline passed leave the kernel map (the kernel refused them already).
    fn sweep_dns(&mut self) {
        for s in self.dns.take_suppressed() {
            let names: Vec<_> = s
                .names
                .iter()
                .map(|(name, count)| json!({ "name": name, "count": count }))
                .collect();
            self.audit_agent(
                &s.agent,
                "dns_denied_summary",
                json!({ "count": s.count, "names": names }),
            );
        }
        if let Err(e) = self.dns.expire() {
            tracing::warn!("removing expired learned addresses: {e}");
        }
    }

    /// Writes what the kernel counted instead of reporting it one by one since the last sweep:
    /// `egress_denied_summary` (count, busiest destinations) and `socket_denied_summary`.
    fn summarise(&mut self, name: &str, now: AgentCounters) {
        let before = self
            .swept
            .counters
            .insert(name.to_owned(), now)
            .unwrap_or_default();
        let egress = now
            .egress_suppressed
            .saturating_sub(before.egress_suppressed);
        let lost = now.events_lost.saturating_sub(before.events_lost);
        if egress > 0 {
            let dests = self.agents.take_suppressed(name).unwrap_or_default();
            let named: Vec<_> = dests
                .iter()
                .take(SUMMARY_DESTS)
                .map(|d| json!({ "proto": d.proto, "dest": d.dest.to_string(), "count": d.count }))
                .collect();
            self.audit_agent(
                name,
                "egress_denied_summary",
                json!({
                    "count": egress,
                    "dests": named,
                    "distinct_dests": dests.len(),
                }),
            );
        }
        // The other kinds an agent can make at will in a loop: counted in the kernel beyond the
        // audit rate, written here as one line each.
        for (kind, count) in [
            (
                "socket_denied_summary",
                now.sockets_suppressed
                    .saturating_sub(before.sockets_suppressed),
            ),
            (
                "exec_summary",
                now.execs_suppressed.saturating_sub(before.execs_suppressed),
            ),
            (
                "cgroup_escape_summary",
                now.escapes_suppressed
                    .saturating_sub(before.escapes_suppressed),
            ),
        ] {
            if count > 0 {
                self.audit_agent(name, kind, json!({ "count": count }));
            }
        }
        if lost > 0 {
            tracing::warn!(
                agent = name,
                lost,
                "ring buffer full: events of this agent lost"
            );
            self.audit_agent(name, "events_lost", json!({ "count": lost }));
        }
    }

    /// Audits, once per process, an agent's processes that hold a capability that could switch
    /// agentwatch off or walk around it (adopted agents are not hardened by `launch`).
    ///
    /// Each process is read once (its /proc/PID/status, the dearest read of an idle sweep),
    /// when it first shows up in the agent: what it could ever hold is known by then
    /// ([`privileges`]: the four sets read never gain a capability none of them held). A pid
    /// freed and taken again between two sweeps is taken for the process read before: a fork
    /// inside the agent holds no more than its parent, and a process put in from outside
    /// under the same number needs the pid space to wrap within that second.
    fn audit_privileged(&mut self, name: &str) {
        if self.agents.presence(name) == Some(Presence::Empty) {
            // No process left: none to look at, and none to remember.
            self.swept.checked.remove(name);
            return;
        }
        let Some(Ok(pids)) = self.agents.all_pids(name) else {
            return;
        };
        let checked = self.swept.checked.entry(name.to_owned()).or_default();
        let new: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| !checked.contains(p))
            .collect();
        // Processes that left (exited) are forgotten: the set holds live processes only, not
        // one entry per process the agent ever ran. (Some left when it holds more than the
        // listed processes it already has.)
        if checked.len() > pids.len().saturating_sub(new.len()) {
            let live: HashSet<u32> = pids.into_iter().collect();
            checked.retain(|pid| live.contains(pid));
        }
        if new.is_empty() {
            return;
        }
        let Ok(held) = privileges::dangerous_held_by(&new) else {
            return;
        };
        // One that exited before its read is marked too: it is gone from the next list.
        checked.extend(new);
        for (pid, caps) in held {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_owned())
                .unwrap_or_default();
            let caps: Vec<String> = caps.iter().map(ToString::to_string).collect();
            tracing::warn!(
                agent = name,
                pid,
                ?caps,
                "agent process holds dangerous capabilities"
            );
            self.audit_agent(
                name,
                "privileged_process",
                json!({ "pid": pid, "comm": comm, "capabilities": caps }),
            );
        }
    }
}
