//! Behaviour: every agent's counters into its monitor ten times a second, and the breaker's
//! transitions turned into actions.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::LazyLock,
    time::{Duration, Instant},
};

use agentwatch_common::{AGENT_FLAG_DENY_ALL, AGENT_FLAG_TRIPPED, AgentCounters, VERDICT_DENIED};
use anyhow::Result;
use serde_json::json;

use super::{State, status::round};
use crate::{
    breaker::{Monitor, SIGNALS, Transition},
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

/// The agents' monitors, by name, and what lets a tick pass over the quiet ones.
#[derive(Default)]
pub(super) struct Monitors {
    by_name: BTreeMap<String, Monitor>,
    quiet: Quiet,
}

/// What the tick keeps of each agent to pass over a quiet one without touching its monitor:
/// with 1,000 idle agents, looking at every monitor ten times a second (each look a cache
/// miss or several) was most of an idle daemon's time. An agent is passed over while its
/// counts have not moved since its monitor last saw them and the monitor said it would stay
/// quiet until now ([`Monitor::quiet_until`]); the ticks it missed are made up for
/// ([`Monitor::skipped`]) before its next observe or any change from outside the tick. (A
/// look needs nothing made up: a quiet monitor's rates and baselines stay as they are.)
#[derive(Default)]
struct Quiet {
    /// The [`crate::agent::Agents::membership`] `seen` is for; None: rebuilt next tick.
    membership: Option<u64>,
    /// Every agent, in name order (as [`crate::agent::Agents::slots`] gives them).
    seen: Vec<Seen>,
    /// The last [`HISTORY`] ticks (number, time), oldest first.
    ticks: VecDeque<(u64, Instant)>,
    /// The last tick's number.
    tick: u64,
}

/// One agent, as of the last tick that showed it to its monitor.
struct Seen {
    name: String,
    slot: u32,
    counts: [u64; SIGNALS],
    /// [`Monitor::quiet_until`] then; None: shown at every tick.
    quiet_until: Option<Instant>,
    /// The number of that tick.
    tick: u64,
}

/// How many recent ticks are kept: an agent passed over longer than this is shown to its
/// monitor anyway. (A quiet monitor is due at the end of each window, so only agents with
/// windows over 100 s get that far.)
const HISTORY: u64 = 1024;

impl Monitors {
    pub(super) fn get(&self, name: &str) -> Option<&Monitor> {
        // Exact as it is: what a tick passed over did not change its rates or baselines.
        self.by_name.get(name)
    }

    /// The monitor of `name`, brought up to date first: for a change from outside the tick.
    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut Monitor> {
        self.settle(name);
        self.by_name.get_mut(name)
    }

    pub(super) fn insert(&mut self, name: String, monitor: Monitor) {
        self.settle(&name);
        self.by_name.insert(name, monitor);
    }

    pub(super) fn remove(&mut self, name: &str) {
        self.settle(name);
        self.by_name.remove(name);
    }

    /// Shows `name`'s monitor the ticks it was passed over, and has the next tick show it
    /// the counts whatever they are.
    fn settle(&mut self, name: &str) {
        let q = &mut self.quiet;
        // `seen` is in name order (the agents'): a reload settles every agent, so no walk.
        let Ok(i) = q.seen.binary_search_by(|s| s.name.as_str().cmp(name)) else {
            return;
        };
        let seen = &mut q.seen[i];
        if let Some(m) = self.by_name.get_mut(name) {
            m.skipped(missed(&q.ticks, seen.tick, q.tick + 1));
        }
        seen.tick = q.tick;
        seen.quiet_until = None;
    }

    /// Makes the tick's list of agents that of `membership` (read with `slots` when agents
    /// came or went, every monitor brought up to date first); returns how many counter slots
    /// the next [`Self::tick`] needs.
    fn prepare(&mut self, membership: u64, slots: impl FnOnce() -> Vec<(String, u32)>) -> u32 {
        let q = &mut self.quiet;
        if q.membership != Some(membership) {
            for seen in &q.seen {
                if let Some(m) = self.by_name.get_mut(&seen.name) {
                    m.skipped(missed(&q.ticks, seen.tick, q.tick + 1));
                }
            }
            let tick = q.tick;
            q.seen = slots()
                .into_iter()
                .map(|(name, slot)| Seen {
                    name,
                    slot,
                    counts: [0; SIGNALS],
                    quiet_until: None,
                    tick,
                })
                .collect();
            q.membership = Some(membership);
        }
        q.seen.iter().map(|s| s.slot + 1).max().unwrap_or(0)
    }

    /// Shows every agent's counts (`counters`, by slot) to its monitor, at tick time `now`,
    /// passing over the quiet ones; returns the transitions, by agent. After
    /// [`Self::prepare`].
    fn tick(
        &mut self,
        now: Instant,
        counters: &[AgentCounters],
        api_calls: &BTreeMap<String, u64>,
    ) -> Vec<(String, Transition)> {
        let q = &mut self.quiet;
        q.tick += 1;
        q.ticks.push_back((q.tick, now));
        while q.ticks.len() as u64 > HISTORY {
            q.ticks.pop_front();
        }
        let mut out = Vec::new();
        for seen in &mut q.seen {
            let Some(c) = counters.get(seen.slot as usize) else {
                continue;
            };
            // Only agents the gateway serves are in `api_calls` (none, often): no lookup
            // by name for the others.
            let api = if api_calls.is_empty() {
                0
            } else {
                api_calls.get(&seen.name).copied().unwrap_or(0)
            };
            let counts = signal_counts(c, api);
            if counts == seen.counts
                && seen.quiet_until.is_some_and(|until| now < until)
                && q.tick - seen.tick < HISTORY
            {
                continue;
            }
            let Some(m) = self.by_name.get_mut(&seen.name) else {
                continue;
            };
            m.skipped(missed(&q.ticks, seen.tick, q.tick));
            let t = m.observe(now, counts);
            seen.counts = counts;
            seen.quiet_until = m.quiet_until();
            seen.tick = q.tick;
            if let Some(t) = t {
                out.push((seen.name.clone(), t));
            }
        }
        out
    }
}

/// The times of the ticks numbered after `after` and before `before`. `ticks` are numbered
/// one after another, so the range is found by index, not by a walk of all [`HISTORY`]: a
/// settle of every agent would otherwise walk it once per agent.
fn missed(
    ticks: &VecDeque<(u64, Instant)>,
    after: u64,
    before: u64,
) -> impl Iterator<Item = Instant> + '_ {
    let first = ticks.front().map_or(0, |(n, _)| *n);
    let index = |n: u64| usize::try_from(n.saturating_sub(first)).unwrap_or(usize::MAX);
    let start = index(after.saturating_add(1)).min(ticks.len());
    let end = index(before).clamp(start, ticks.len());
    ticks.range(start..end).map(|(_, t)| *t)
}

impl State {
    /// One tick of the behaviour monitor: every agent's counters into its monitor.
    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        let _timer = TICK_SECONDS
            .as_ref()
            .map(prometheus::Histogram::start_timer);
        let agents = &self.agents;
        let slots = self.monitors.prepare(agents.membership(), || {
            agents.slots().map(|(n, id)| (n.to_owned(), id)).collect()
        });
        let counters = match agents.kernel().all_counters(slots) {
            Ok(all) => all,
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
        let api_calls = self.gateway.all_api_calls();
        let transitions = self.monitors.tick(now, &counters, &api_calls);
        for (name, t) in transitions {
            self.on_transition(&name, t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, Breaker as BreakerConfig};

    fn config() -> BreakerConfig {
        BreakerConfig {
            warmup: Duration::from_secs(1),
            window: Duration::from_millis(500),
            trip_factor: 5.0,
            min_rate: 20.0,
            min_bytes_rate: 65536.0,
            action: Action::Alert,
            require_approval: false,
            cooldown: Duration::from_secs(2),
        }
    }

    /// `missed` by index gives exactly the ticks a walk of the whole history would.
    #[test]
    fn missed_ticks_by_index_are_those_a_walk_finds() {
        let t0 = Instant::now();
        let ticks: VecDeque<(u64, Instant)> = (40..60u64)
            .map(|n| (n, t0 + Duration::from_millis(n)))
            .collect();
        for after in 0..70 {
            for before in 0..70 {
                let walk: Vec<Instant> = ticks
                    .iter()
                    .filter(|(n, _)| *n > after && *n < before)
                    .map(|(_, t)| *t)
                    .collect();
                let got: Vec<Instant> = missed(&ticks, after, before).collect();
                assert_eq!(got, walk, "after {after}, before {before}");
            }
        }
        assert_eq!(missed(&VecDeque::new(), 3, 9).count(), 0);
    }

    /// The tick's bookkeeping: monitors it passes over end exactly where monitors shown every
    /// tick do, through agents that wake and sleep, API calls, trips, changes from outside
    /// the tick (a forced trip, an approval) and agents coming and going.
    #[test]
    fn the_tick_passes_over_quiet_agents_and_misses_nothing() {
        let t0 = Instant::now();
        let names = ["a", "b", "c", "d"];
        let mut lazy = Monitors::default();
        let mut full: BTreeMap<String, Monitor> = BTreeMap::new();
        for n in names {
            lazy.insert(n.to_owned(), Monitor::new(Some(config()), t0));
            full.insert(n.to_owned(), Monitor::new(Some(config()), t0));
        }
        let mut counters = vec![AgentCounters::default(); names.len() + 1];
        let mut membership = 0;
        let mut t = t0;
        let mut passed_over = 0;
        for i in 0..4000u64 {
            t += Duration::from_millis(100);
            // `a` works steadily, `b` in bursts, `c` now and then, `d` never.
            counters[1].connects += 3;
            if (i / 50) % 3 == 0 {
                counters[2].sends += 40;
            }
            if i % 97 == 0 {
                counters[3].connects += 1;
            }
            let mut api = BTreeMap::new();
            if (i / 200) % 2 == 1 {
                api.insert("c".to_owned(), i / 10);
            }
            // From outside the tick, now and then.
            if i % 700 == 350 {
                lazy.get_mut("d").expect("d").force_open(t);
                full.get_mut("d").expect("d").force_open(t);
            }
            if i % 700 == 600 {
                let counts = signal_counts(&counters[4], 0);
                lazy.get_mut("d").expect("d").approve(t, counts, true);
                full.get_mut("d").expect("d").approve(t, counts, true);
            }
            // `c` goes and comes back with a fresh monitor; its slot is another.
            if i == 2000 {
                lazy.remove("c");
                full.remove("c");
                membership += 1;
            }
            if i == 2100 {
                lazy.insert("c".to_owned(), Monitor::new(Some(config()), t));
                full.insert("c".to_owned(), Monitor::new(Some(config()), t));
                membership += 1;
            }
            let present: Vec<(String, u32)> = names
                .iter()
                .zip(1u32..)
                .filter(|(n, _)| full.contains_key(**n))
                .map(|(n, slot)| ((*n).to_owned(), slot))
                .collect();
            lazy.prepare(membership, || present.clone());
            let got = lazy.tick(t, &counters, &api);
            let mut want = Vec::new();
            for (name, slot) in &present {
                let api = api.get(name).copied().unwrap_or(0);
                let counts = signal_counts(&counters[*slot as usize], api);
                if let Some(tr) = full.get_mut(name).and_then(|m| m.observe(t, counts)) {
                    want.push((name.clone(), tr));
                }
            }
            assert_eq!(got, want, "tick {i}");
            passed_over += lazy
                .quiet
                .seen
                .iter()
                .filter(|s| s.tick != lazy.quiet.tick)
                .count();
            // Everything a reader sees is the same; after settling, the samples too.
            for name in full.keys() {
                let (l, f) = (lazy.get(name).expect("lazy"), &full[name]);
                assert_eq!(l.state(), f.state(), "{name} at tick {i}");
                for s in crate::breaker::Signal::ALL {
                    assert_eq!(l.rate(s), f.rate(s), "{name} at tick {i}");
                    assert_eq!(l.baseline(s), f.baseline(s), "{name} at tick {i}");
                }
            }
            if i % 500 == 499 {
                for name in names {
                    if let Some(l) = lazy.get_mut(name) {
                        assert_eq!(format!("{l:?}"), format!("{:?}", full[name]), "{name}");
                    }
                }
            }
        }
        // `d` and mostly `c` sleep: most of their looks were passed over.
        assert!(passed_over > 4000, "passed over: {passed_over}");
    }
}
