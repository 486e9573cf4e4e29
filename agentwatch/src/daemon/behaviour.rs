//! Behaviour: every agent's counters into its monitor ten times a second, and the breaker's
//! transitions turned into actions.

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use agentwatch_common::{AGENT_FLAG_DENY_ALL, AGENT_FLAG_TRIPPED, AgentCounters, VERDICT_DENIED};
use anyhow::Result;
use serde_json::json;

use super::{State, status::round};
use crate::{
    breaker::{SIGNALS, Transition},
    config::Action,
};

/// How often every agent's counters are fed to its behaviour monitor.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// How long each tick took (`agentwatch_tick_seconds`): the tick reads every agent's counters
/// ten times a second, so this is what grows with the number of agents, and a tick near TICK
/// long would delay the breaker. Kept across scrapes (unlike the per-scrape registry of
/// metrics.rs), so its sum and count cover the daemon's whole life.
pub(super) static TICK_SECONDS: LazyLock<Option<prometheus::Histogram>> = LazyLock::new(|| {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(
            "agentwatch_tick_seconds",
            "Time one behaviour tick (every agent's counters read, breakers judged) took",
        )
        // 10 us .. about 1.3 s: from one idle agent to far past the 100 ms period.
        .buckets(prometheus::exponential_buckets(1e-5, 2.0, 18).unwrap_or_default()),
    )
    .ok()
});

impl State {
    /// One tick of the behaviour monitor: every agent's counters into its monitor.
    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        let _timer = TICK_SECONDS
            .as_ref()
            .map(prometheus::Histogram::start_timer);
        let all: Vec<(String, AgentCounters)> = match self.agents.all_counters() {
            Ok(all) => all.into_iter().map(|(n, c)| (n.to_owned(), c)).collect(),
            Err(e) => {
                // Said once: ten times a second would drown the log.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::error!(
                        "reading the agents' counters: {e}; no breaker judges until it succeeds"
                    );
                });
                return;
            }
        };
        for (name, c) in all {
            let counts = signal_counts(&c, self.gateway.api_calls(&name));
            let t = self
                .monitors
                .get_mut(&name)
                .and_then(|m| m.observe(now, counts));
            if let Some(t) = t {
                self.on_transition(&name, t);
            }
        }
    }

    /// Runs a breaker transition of `agent`: the trip's action at once, or its lifting.
    fn on_transition(&mut self, agent: &str, t: Transition) {
        match t {
            Transition::Tripped {
                signal,
                rate,
                baseline,
                action,
            } => self.run_trip(agent, signal.name(), rate, baseline, action),
            Transition::HalfOpen => {
                // Lift the action; the next window decides whether the breaker closes.
                let _ = self.agents.update_flags(agent, 0, AGENT_FLAG_DENY_ALL);
                self.sync_gateway(agent);
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

    /// Runs a trip's action and audits `breaker_tripped`.
    fn run_trip(&mut self, agent: &str, signal: &str, rate: f64, baseline: f64, action: Action) {
        self.run_trip_with(agent, signal, rate, baseline, action, json!({}));
    }

    /// [`Self::run_trip`], with `extra` fields (an object) added to the `breaker_tripped` line
    /// after the usual ones.
    pub(super) fn run_trip_with(
        &mut self,
        agent: &str,
        signal: &str,
        rate: f64,
        baseline: f64,
        action: Action,
        extra: serde_json::Value,
    ) {
        let (name, index) = action_label(action);
        tracing::warn!(
            agent,
            signal,
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
                self.leave_agents()?;
                self.cgroup_of(agent)?
                    .set_frozen(true)
                    .map_err(|e| e.to_string())
            }),
            Action::Kill => self.kill_tree(agent, AGENT_FLAG_TRIPPED).map(drop),
        };
        let mut fields = json!({
            "signal": signal,
            "rate": round(rate),
            "baseline": round(baseline),
            "action": name,
        });
        if let (Some(fields), serde_json::Value::Object(extra)) = (fields.as_object_mut(), extra) {
            fields.extend(extra);
        }
        if let Err(e) = &result {
            tracing::error!(agent, "breaker action {name}: {e}");
            fields["action_error"] = json!(e);
        }
        self.audit_agent(agent, "breaker_tripped", fields);
    }

    /// Without BPF LSM, an open outside the agent's file list is found after the fact: the
    /// breaker opens on signal `files` and its action runs ([`Self::trip_on`]).
    pub(super) fn trip_on_file(&mut self, agent: &str) {
        self.trip_on(agent, "files");
    }

    /// Something the agent did that was meant to be impossible (an open outside its file list
    /// found after the fact, a request on the control socket, a guard switched off): the
    /// breaker opens on `signal` and its action runs (kill when the agent has no breaker: the
    /// attempt was meant to be refused). Once per trip: while the breaker stays open, later
    /// attempts are audited but not acted on again.
    pub(super) fn trip_on(&mut self, agent: &str, signal: &str) {
        let now = Instant::now();
        let Some(monitor) = self.monitors.get_mut(agent) else {
            return;
        };
        if monitor.is_open() {
            return;
        }
        let action = monitor.config().map_or(Action::Kill, |c| c.action);
        monitor.force_open(now);
        self.run_trip(agent, signal, 1.0, 0.0, action);
    }

    fn set_flags(&mut self, agent: &str, flags: u32) -> Result<(), String> {
        let set = self
            .agents
            .update_flags(agent, flags, 0)
            .map(drop)
            .map_err(|e| e.to_string());
        // A breaker that denies denies the agent's API calls too.
        self.sync_gateway(agent);
        set
    }
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

/// The cumulative count behind each breaker signal (indexed like `Signal::ALL`).
pub(super) fn signal_counts(c: &AgentCounters, api_calls: u64) -> [u64; SIGNALS] {
    [
        c.connects,
        c.sends,
        c.syscalls,
        c.execs + c.execs_denied,
        c.verdict_total(VERDICT_DENIED),
        c.destinations,
        c.egress_bytes,
        api_calls,
    ]
}
