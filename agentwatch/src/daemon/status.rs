//! What the daemon shows: `status` rows and the /metrics snapshot.

use std::sync::Arc;

use agentwatch_common::{
    AGENT_FLAG_DENY_ALL, AGENT_FLAG_KILLED, AGENT_FLAG_TRIPPED, VERDICT_ALLOWED, VERDICT_CAPPED,
    VERDICT_DENIED, VERDICT_WOULD_DENY, egress_slot,
};
use anyhow::Result;
use serde_json::{Value, json};

use super::{Shared, State, behaviour, lock};
use crate::{
    breaker::{Monitor, Signal, State as BreakerState},
    cgroup::Cgroup,
    lease,
    metrics::{self, AgentSnapshot, Snapshot},
};

impl State {
    /// The kernel's counters of agent `name`, with the file opens the daemon found outside its
    /// list (without BPF LSM) in `files_denied`.
    pub(super) fn agent_counters(&self, name: &str) -> agentwatch_common::AgentCounters {
        let mut c = self.agents.counters(name).unwrap_or_default();
        c.files_denied += self.files_detected.get(name).copied().unwrap_or(0);
        c
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

    /// One row per agent; with `rules`, each row lists the agent's rules and the calls each
    /// admitted.
    pub(super) fn status(&self, rules: bool) -> Vec<Value> {
        let gateway = self.gateway.counts();
        let held = self.gateway.held();
        let hits = if rules {
            self.agents.kernel().learn().rule_hits()
        } else {
            Default::default()
        };
        let mut rows = Vec::new();
        for name in self.agents.names() {
            let Some(cg) = self.agents.cgroup(name) else {
                continue;
            };
            let c = self.agent_counters(name);
            let dns = self.dns.stats(name);
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
                                "would_deny": c.egress[egress_slot(*p, VERDICT_WOULD_DENY)],
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
                "allowed": c.verdict_total(VERDICT_ALLOWED),
                "denied": c.verdict_total(VERDICT_DENIED),
                "capped": c.verdict_total(VERDICT_CAPPED),
                "would_deny": c.verdict_total(VERDICT_WOULD_DENY),
                "mode": if self.config.agent(name).is_some_and(|a| a.learn) { "learn" } else { "enforce" },
                // Whom `launch` runs it as; `root` flags an agent that can still reach what
                // the file modes guard (README "Security model").
                "runs_as": self.config.agent(name).map(|a| a.run_as.describe()),
                "root": self.config.agent(name).is_some_and(|a| a.run_as.is_root()),
                "connects": c.connects,
                "egress_bytes": c.egress_bytes,
                "egress_bytes_dropped": c.egress_bytes_dropped,
                // Packets of sockets opened before a deny, kill or lease end, dropped as they
                // left (the deny holds for open sockets too).
                "packets_revoked": c.packets_revoked,
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
                "rates": self.monitors.get(name).map(|m| Signal::ALL.iter().map(|s| (s.name().to_owned(), json!(m.counted_rate(*s).map(round)))).collect::<serde_json::Map<_, _>>()),
                "baselines": self.monitors.get(name).map(|m| Signal::ALL.iter().map(|s| (s.name().to_owned(), json!(m.counted_baseline(*s).map(round)))).collect::<serde_json::Map<_, _>>()),
                "anomaly_score": self.monitors.get(name).map(|m| round(m.anomaly_score())),
                "egress": per_proto,
                "files_denied": c.files_denied,
                "files": self.config.agent(name).and_then(|a| a.files.as_ref()).map(|_| crate::files::modes(self.agents.kernel().files.lsm())["files"].clone()),
                "escape_attempts": {
                    "raw_socket": c.raw_sockets_denied,
                    "packet_socket": c.packet_sockets_killed + c.packet_sockets_denied,
                    "cgroup_escape": c.cgroup_escapes,
                    "control_refused": self.control_refusals.get(name).map_or(0, |r| r.total),
                    "tamper_refused": c.tamper_refused,
                    // Packets with an IPv6 routing header or IPv4 options, refused.
                    "route_option": c.route_options_refused,
                    // Its links found detached or gone and attached again (the watchdog).
                    "guard_restored": self.watchdog.restored(name),
                    // The daemon found in its cgroup and moved back out.
                    "daemon_moved": self.watchdog.moved(name),
                },
                "dns": {
                    "allowed": dns.allowed,
                    "denied": dns.denied,
                    "failed": dns.failed,
                    "malformed": dns.malformed,
                    "would_deny": dns.would_deny,
                    "learned": dns.learned,
                },
                "lease": self.lease_row(name),
                // Per API scope: calls by decision, limits left, calls held for a human.
                "apis": gateway.get(name).map_or_else(
                    || json!({}),
                    |scopes| crate::gateway::serve::status_json(
                        scopes,
                        &held.iter().filter(|h| h.agent == name).cloned().collect::<Vec<_>>(),
                    ),
                ),
                "audit_suppressed": c.suppressed(),
                "privileged_processes": privileged(cg),
            }));
            if rules
                && let (Some(row), Some(id), Some(a)) = (
                    rows.last_mut().and_then(Value::as_object_mut),
                    self.agents.info(name).map(|i| i.id),
                    self.config.agent(name),
                )
            {
                let list: Vec<Value> = a
                    .rule_texts
                    .iter()
                    .map(|(rule, text)| {
                        json!({ "rule": text, "hits": hits.get(&(id, *rule)).copied().unwrap_or(0) })
                    })
                    .collect();
                row.insert("rules".to_owned(), Value::Array(list));
                row.insert("rule_hits_lost".to_owned(), json!(c.rule_hits_lost));
            }
        }
        rows
    }

    /// The agent's lease: its action, seconds left and whether it expired; null without one.
    fn lease_row(&self, name: &str) -> Value {
        let action = self.config.agent(name).map(|a| a.lease_action);
        match (self.agents.lease_deadline(name), action) {
            (Some(deadline), Some(action)) => {
                let left = lease::seconds_left(deadline);
                json!({ "action": action.name(), "seconds_left": round(left), "expired": left <= 0.0 })
            }
            _ => Value::Null,
        }
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let hits = self.agents.kernel().learn().rule_hits();
        let gateway = self.gateway.counts();
        let agents = self
            .agents
            .names()
            .map(|name| {
                let m = self.monitors.get(name);
                AgentSnapshot {
                    name: name.to_owned(),
                    counters: self.agent_counters(name),
                    root: self.config.agent(name).is_some_and(|a| a.run_as.is_root()),
                    control_refused: self.control_refusals.get(name).map_or(0, |r| r.total),
                    guard_restored: self.watchdog.restored(name),
                    daemon_moved: self.watchdog.moved(name),
                    frozen: self
                        .agents
                        .cgroup(name)
                        .is_some_and(|cg| cg.frozen().unwrap_or(false)),
                    rates: Signal::ALL.map(|s| m.map_or(Some(0.0), |m| m.counted_rate(s))),
                    baselines: Signal::ALL.map(|s| m.and_then(|m| m.counted_baseline(s))),
                    anomaly_score: m.map_or(0.0, Monitor::anomaly_score),
                    breaker_open: m.is_some_and(Monitor::is_open),
                    trips: self.agents.trips(name),
                    dns: self.dns.stats(name),
                    lease_seconds_left: self.agents.lease_deadline(name).map(lease::seconds_left),
                    rule_hits: match (self.agents.info(name), self.config.agent(name)) {
                        (Some(info), Some(a)) => a
                            .rule_texts
                            .iter()
                            .map(|(id, text)| {
                                (
                                    text.clone(),
                                    hits.get(&(info.id, *id)).copied().unwrap_or(0),
                                )
                            })
                            .collect(),
                        _ => Vec::new(),
                    },
                    api_calls: gateway
                        .get(name)
                        .map(|scopes| {
                            scopes
                                .iter()
                                .map(|(api, s)| (api.clone(), s.calls.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
        Snapshot {
            agents,
            events_lost: self.agents.kernel().events_lost().unwrap_or(0),
            reloads_ok: self.reloads_ok,
            reloads_rejected: self.reloads_rejected,
            audit_lines_lost: self.audit.lines_lost(),
            gateway_connections_refused: self.gateway.connections_refused(),
        }
    }
}

pub(super) async fn serve_metrics(state: Shared, listener: tokio::net::TcpListener) -> Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = Arc::clone(&state);
            async move {
                let snapshot = tokio::task::spawn_blocking(move || lock(&state).snapshot()).await;
                match snapshot
                    .map_err(|e| e.to_string())
                    .and_then(|s| metrics::render(&s).map_err(|e| e.to_string()))
                    .map(|mut text| {
                        text.push_str(&tick_metric());
                        text
                    }) {
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

/// `agentwatch_tick_seconds` in the text format (empty if it could not be made).
fn tick_metric() -> String {
    use prometheus::Encoder as _;
    let Some(h) = behaviour::TICK_SECONDS.as_ref() else {
        return String::new();
    };
    let r = prometheus::Registry::new();
    let mut out = Vec::new();
    if r.register(Box::new(h.clone())).is_err()
        || prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut out)
            .is_err()
    {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

pub(super) fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The agent's processes that hold a capability able to switch agentwatch off or walk around
/// it: `[{pid, capabilities}]`.
fn privileged(cg: &Cgroup) -> Value {
    let pids = cg.all_pids().unwrap_or_default();
    let held = crate::privileges::dangerous_held_by(&pids).unwrap_or_default();
    held.into_iter()
        .map(|(pid, caps)| {
            json!({
                "pid": pid,
                "capabilities": caps.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect()
}
