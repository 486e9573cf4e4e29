//! Enforcement that notices being switched off, and a daemon that knows what happened while it
//! was gone.
//!
//! Anyone who can open the daemon's pins (BPF_OBJ_GET) can BPF_LINK_DETACH the links behind
//! them: the pins stay, the programs stop judging. So once a second (from the sweep) every link
//! the daemon holds is asked of the kernel whether it is still attached; one that is not is
//! attached again, audited (`guard_restored`), counted, and taken for what it is, a tamper
//! attempt: the agent's breaker trips on `tamper`.
//!
//! The pins keep enforcing when the daemon is SIGKILLed, and the kernel keeps counting; what a
//! daemon started after it cannot know from the kernel alone is how the last one ended, when,
//! and what it had counted by then. So the daemon writes a checkpoint ([`Checkpoint`]) once a
//! second and at a clean stop, in a pinned map that outlives it. At start the new daemon audits
//! `daemon_restarted` (how the last one ended, and the gap), and the denied calls each agent
//! made while no daemon watched are judged by its breaker.

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use agentwatch_common::AgentCounters;
use serde_json::{Value, json};

use super::{State, behaviour::signal_counts, status::round};
use crate::{
    agent::{Agents, Restored},
    audit,
    bpf::ktime_ns,
    breaker::Signal,
    kernel::{Checkpoint, NO_BASELINE, STOPPED_CLEAN},
};

/// What the watchdog has seen since the daemon started.
#[derive(Debug, Default)]
pub(super) struct Watchdog {
    /// Per agent (`""`: host-wide links): links found detached or missing and attached again.
    restored: BTreeMap<String, u64>,
    /// (agent, program, error) of links that could not be attached again, already logged and
    /// audited: a failure that repeats every second says nothing new.
    failing: HashSet<(Option<String>, &'static str, String)>,
    /// The last error writing a checkpoint, logged once.
    checkpoint_error: Option<String>,
    /// Set at a clean stop: a sweep that still runs after it must not write over the mark.
    stopping: bool,
    /// The daemon's own cgroup (relative to the cgroup2 mount), where it goes back to when an
    /// agent has moved it into its cgroup: taken at start, and again whenever the daemon finds
    /// itself moved to a cgroup of no agent (an operator's move is kept).
    home: Option<String>,
    /// Per agent: times the daemon found itself in that agent's cgroup.
    moved: BTreeMap<String, u64>,
    /// The agent cgroup the daemon could not leave, already audited: not again every second.
    stuck_in: Option<String>,
}

impl Watchdog {
    /// Links of agent `agent` (`""`: the host-wide ones) that were found detached or missing
    /// and attached again since this daemon started.
    pub(super) fn restored(&self, agent: &str) -> u64 {
        self.restored.get(agent).copied().unwrap_or(0)
    }

    /// Times the daemon found itself moved into agent `agent`'s cgroup since it started.
    pub(super) fn moved(&self, agent: &str) -> u64 {
        self.moved.get(agent).copied().unwrap_or(0)
    }

    /// Takes the daemon's cgroup at start as the one to go back to.
    pub(super) fn set_home(&mut self) {
        self.home = own_cgroup();
    }
}

/// This process's cgroup v2 path, relative to the cgroup2 mount (`/proc/self/cgroup`'s `0::`
/// line; the daemon lives in the host's cgroup namespace).
fn own_cgroup() -> Option<String> {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// How the last daemon ended, as a daemon that starts after it can tell.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Previous {
    /// `clean` (it stopped on SIGTERM or SIGINT), `killed or crashed` (it left no mark of a
    /// clean stop: SIGKILL, an OOM kill and a crash look alike from here), or `unknown` (pins
    /// of a daemon that kept no checkpoint, and a trail that does not say).
    how: &'static str,
    /// Seconds since its last sign of life: its last checkpoint (written every second while it
    /// ran), else the last line it wrote.
    gap_seconds: Option<f64>,
    /// `ts` of the last line it wrote.
    last_line: Option<String>,
    /// Its pins were there: this daemon re-adopts what it enforced.
    adopting: bool,
}

impl Previous {
    /// What the last daemon left: its checkpoint in `agents`' kernel and `last_line`, the last
    /// line of the trail (read before this daemon wrote anything). None on a first start: no
    /// pins and no trail.
    pub(super) fn read(agents: &Agents, last_line: Option<&Value>, adopting: bool) -> Option<Self> {
        if !adopting && last_line.is_none() {
            return None;
        }
        let checkpoint = agents.kernel().checkpoint(0);
        let stopped = last_line.is_some_and(|l| l["kind"] == "daemon_stopped");
        let how = match checkpoint {
            Some(c) if c.flags & STOPPED_CLEAN != 0 => "clean",
            Some(_) => "killed or crashed",
            None if stopped => "clean",
            // Pins without a checkpoint: an agentwatch that kept none, whose trail never marks
            // a clean stop either.
            None if adopting => "unknown",
            None => "killed or crashed",
        };
        let ts = last_line.and_then(|l| l["ts"].as_str()).map(str::to_owned);
        let gap_seconds = match checkpoint {
            Some(c) => Some(ktime_ns().saturating_sub(c.at_ns) as f64 / 1e9),
            None => ts.as_deref().and_then(audit::parse_ts).map(|t| {
                (time::OffsetDateTime::now_utc() - t)
                    .as_seconds_f64()
                    .max(0.0)
            }),
        };
        Some(Self {
            how,
            gap_seconds,
            last_line: ts,
            adopting,
        })
    }
}

impl State {
    /// At start, before anything else is audited: `daemon_restarted` if there was a daemon
    /// before this one, and this daemon's first checkpoint (which also clears the last one's
    /// clean-stop mark: if this one is killed, the next one must not take it for clean).
    pub(super) fn note_start(&mut self, previous: Option<&Previous>) {
        if let Some(p) = previous {
            let gap = p.gap_seconds.map(round);
            if p.how == "clean" {
                tracing::info!(how = p.how, gap_seconds = ?gap, "the last daemon stopped cleanly");
            } else {
                tracing::warn!(how = p.how, gap_seconds = ?gap, "the last daemon did not stop cleanly (killed or crashed); what the agents were denied meanwhile is judged now");
            }
            self.audit_daemon(
                "daemon_restarted",
                json!({
                    "how": p.how,
                    "gap_seconds": gap,
                    "last_line": p.last_line,
                    "pins_adopted": p.adopting,
                }),
            );
        }
        self.checkpoint(0);
    }

    /// Judges, by each adopted agent's breaker, the denied calls it made since the last
    /// daemon's checkpoint of it (the kernel counted them while no daemon watched; this
    /// daemon's rate windows start from now and would never see them): a rate over the gap (at
    /// least one breaker window long) above `trip_factor` x the baseline the last daemon had
    /// learned and above `min_rate` trips it on `denied` (`breaker_tripped` with
    /// `during_gap: true`). Without a baseline, `min_rate` alone. Called once, after the config
    /// is applied and before any checkpoint of this daemon.
    pub(super) fn judge_gap(&mut self) {
        let now_ns = ktime_ns();
        let names: Vec<String> = self.agents.names().map(str::to_owned).collect();
        for name in names {
            let Some(info) = self.agents.info(&name) else {
                continue;
            };
            let Some(cp) = self.agents.kernel().checkpoint(info.id) else {
                continue;
            };
            let Some(cfg) = self.monitors.get(&name).and_then(|m| {
                // An open breaker (the kernel says it was) has acted already.
                (!m.is_open()).then(|| m.config().copied()).flatten()
            }) else {
                continue;
            };
            if !self.agents.adopted(&name) || cp.cgroup_id != info.cgroup_id {
                continue;
            }
            let Ok(counters) = self.agents.counters(&name) else {
                continue;
            };
            let denied = signal_counts(&counters, 0)[Signal::Denied as usize];
            let Some(count) = denied.checked_sub(cp.denied) else {
                continue;
            };
            let gap = now_ns.saturating_sub(cp.at_ns) as f64 / 1e9;
            if count == 0 || gap <= 0.0 {
                continue;
            }
            // The breaker judges rates over a window; a gap shorter than one is judged as one.
            let rate = count as f64 / gap.max(cfg.window.as_secs_f64());
            let baseline = if cp.denied_baseline_milli == NO_BASELINE {
                0.0
            } else {
                cp.denied_baseline_milli as f64 / 1000.0
            };
            if rate > cfg.trip_factor * baseline && rate > cfg.min_rate {
                if let Some(m) = self.monitors.get_mut(&name) {
                    m.force_open(Instant::now());
                }
                self.run_trip_with(
                    &name,
                    Signal::Denied.name(),
                    rate,
                    baseline,
                    cfg.action,
                    json!({ "during_gap": true, "gap_seconds": round(gap), "count": count }),
                );
            }
        }
    }

    /// Once a second: every link asked of the kernel, what is found detached or missing
    /// attached again ([`Agents::check_links`]), audited and acted on.
    pub(super) fn watch_links(&mut self) {
        for r in self.agents.check_links() {
            // A link attached again is pinned anew: the tamper guard looks at the pins again.
            self.pins_dirty = true;
            self.on_restored(r);
        }
    }

    fn on_restored(&mut self, r: Restored) {
        let who = r.agent.clone().unwrap_or_default();
        let mut fields = json!({
            "program": r.program,
            "found": r.found.name(),
            "old_link_id": r.old_id,
        });
        if r.at_start {
            fields["at_start"] = json!(true);
        }
        match &r.result {
            Ok(id) => {
                self.watchdog
                    .failing
                    .retain(|(a, p, _)| !(*a == r.agent && *p == r.program));
                *self.watchdog.restored.entry(who.clone()).or_default() += 1;
                fields["link_id"] = json!(id);
                let so_far = self.watchdog.restored(&who);
                tracing::warn!(agent = %who, program = r.program, found = r.found.name(), link_id = id, old_link_id = ?r.old_id, at_start = r.at_start, restored_so_far = so_far, "a guard was switched off; attached again");
                self.audit_guard(r.agent.as_deref(), "guard_restored", fields);
            }
            Err(e) => {
                if !self
                    .watchdog
                    .failing
                    .insert((r.agent.clone(), r.program, e.clone()))
                {
                    return;
                }
                fields["error"] = json!(e);
                tracing::error!(agent = %who, program = r.program, found = r.found.name(), "a guard was switched off and attaching it again failed: {e}; retrying every second");
                self.audit_guard(r.agent.as_deref(), "guard_lost", fields);
            }
        }
        // Switching a guard off is what an agent trying to get out would do: its breaker trips
        // (once per trip; later findings are audited, not acted on again).
        if let Some(agent) = &r.agent {
            self.trip_on(agent, "tamper");
        }
    }

    /// The daemon out of every agent's cgroup, before anything freezes or kills one and once a
    /// second. A root agent on a cgroup2 mount without `nsdelegate` can write the daemon's pid
    /// into its own `cgroup.procs` (the kernel checks only that it may write there): then
    /// freezing or killing the agent would freeze or kill the daemon with it, and the agent
    /// itself could freeze it. Found there, the daemon writes itself back into its own cgroup,
    /// audits `daemon_moved`, counts it and trips the agent's breaker on `tamper`. Err while
    /// it is still inside an agent (it could not leave): freezing or killing one would reach it.
    pub(super) fn leave_agents(&mut self) -> Result<(), String> {
        let Some(now) = own_cgroup() else {
            return Ok(());
        };
        if self.watchdog.home.as_deref() == Some(now.as_str()) {
            return Ok(());
        }
        let at = self.mount.join(now.trim_start_matches('/'));
        let Some(agent) = self.agent_at(&at) else {
            // Moved by someone outside the agents (an operator, a service manager): that is
            // its cgroup from now on.
            tracing::info!(cgroup = %now, "the daemon's cgroup changed; it stays there");
            self.watchdog.home = Some(now);
            return Ok(());
        };
        let result = match &self.watchdog.home {
            Some(home) => crate::cgroup::Cgroup::open(self.mount.join(home.trim_start_matches('/')))
                .and_then(|cg| cg.add_pid(std::process::id()))
                .map_err(|e| format!("moving the daemon back to {home}: {e}")),
            None => Err("the daemon started inside an agent's cgroup: it has no cgroup of its own to go back to".to_owned()),
        };
        if result.is_err() && self.watchdog.stuck_in.as_deref() == Some(now.as_str()) {
            return result;
        }
        self.watchdog.stuck_in = result.is_err().then(|| now.clone());
        let mut fields = json!({
            "cgroup": now,
            "moved_back_to": self.watchdog.home,
        });
        match &result {
            Ok(()) => {
                tracing::warn!(agent, cgroup = %now, "the daemon was moved into an agent's cgroup; it moved itself back out")
            }
            Err(e) => {
                tracing::error!(agent, cgroup = %now, "the daemon was moved into an agent's cgroup and could not leave it: {e}");
                fields["moved_back_to"] = Value::Null;
                fields["error"] = json!(e);
            }
        }
        let who = if agent.is_empty() {
            None
        } else {
            Some(agent.as_str())
        };
        *self.watchdog.moved.entry(agent.clone()).or_default() += 1;
        self.audit_guard(who, "daemon_moved", fields);
        // Out first, then the breaker: its action may be to kill the agent's whole tree.
        if result.is_ok()
            && let Some(agent) = who
        {
            self.trip_on(agent, "tamper");
        }
        result
    }

    fn audit_guard(&self, agent: Option<&str>, kind: &str, fields: Value) {
        match agent {
            Some(a) => self.audit_agent(a, kind, fields),
            None => self.audit_daemon(kind, fields),
        }
    }

    /// Once a second: the daemon's checkpoint and every agent's, for a daemon started after
    /// this one.
    /// `counters`: every agent's, as the sweep read them.
    pub(super) fn heartbeat(&mut self, counters: Result<&[(String, AgentCounters)], &str>) {
        if self.watchdog.stopping {
            return;
        }
        self.checkpoint_with(0, counters);
    }

    /// At a clean stop (SIGTERM, SIGINT): `daemon_stopped` in the trail, then a checkpoint
    /// that says so. Nothing writes a checkpoint after it.
    pub(super) fn stopped_clean(&mut self, signal: &str) {
        self.audit_daemon("daemon_stopped", json!({ "signal": signal }));
        self.checkpoint(STOPPED_CLEAN);
        self.watchdog.stopping = true;
    }

    /// Writes the daemon's checkpoint (slot 0, with `flags`) and every agent's.
    fn checkpoint(&mut self, flags: u64) {
        let counters = super::sweep::read_counters(&self.agents);
        self.checkpoint_with(flags, counters.as_deref().map_err(String::as_str));
    }

    /// [`Self::checkpoint`] with every agent's `counters` read already: every checkpoint in
    /// one write.
    fn checkpoint_with(&mut self, flags: u64, counters: Result<&[(String, AgentCounters)], &str>) {
        let at_ns = ktime_ns();
        let host_links = self.agents.host_link_count() as u64;
        // The daemon's first: one batch is written in order.
        let mut all = vec![(
            0,
            Checkpoint {
                at_ns,
                links: host_links,
                flags,
                ..Checkpoint::default()
            },
        )];
        let mut result = counters.map(drop).map_err(str::to_owned);
        for (name, counters) in counters.into_iter().flatten() {
            let Some(info) = self.agents.info(name) else {
                continue;
            };
            let baseline = self
                .monitors
                .get(name)
                .and_then(|m| m.baseline(Signal::Denied));
            all.push((
                info.id,
                Checkpoint {
                    at_ns,
                    cgroup_id: info.cgroup_id,
                    denied: signal_counts(counters, 0)[Signal::Denied as usize],
                    denied_baseline_milli: baseline.map_or(NO_BASELINE, |b| (b * 1000.0) as u64),
                    links: self.agents.link_count(name) as u64,
                    flags: 0,
                },
            ));
        }
        let written = self
            .agents
            .kernel_mut()
            .set_checkpoints(&all)
            .map_err(|e| e.to_string());
        result = written.and(result);
        match result {
            Ok(()) => self.watchdog.checkpoint_error = None,
            Err(e) => {
                if self.watchdog.checkpoint_error.as_ref() != Some(&e) {
                    tracing::error!(
                        "writing the daemon's checkpoint: {e}; a daemon started after this one will know less of what happened"
                    );
                    self.watchdog.checkpoint_error = Some(e);
                }
            }
        }
    }
}
