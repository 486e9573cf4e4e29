//! Prometheus metrics: built fresh from kernel counters and daemon state at every scrape.
//!
//! Counters come straight from the kernel's per-CPU maps (pinned, so they survive daemon
//! restarts and never go backwards); a new registry per scrape means no userspace copy can
//! drift from them. Label values are only configured agent names and fixed sets.

use agentwatch_common::{
    AgentCounters, NUM_PROTOS, PROTO_OTHER, PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED, VERDICT_CAPPED,
    VERDICT_DENIED, egress_slot,
};
use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// What one scrape shows about one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentSnapshot {
    pub name: String,
    pub counters: AgentCounters,
    pub frozen: bool,
}

/// What one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub agents: Vec<AgentSnapshot>,
    pub events_lost: u64,
    pub reloads_ok: u64,
    pub reloads_rejected: u64,
}

const PROTOS: [(u8, &str); NUM_PROTOS] = [
    (PROTO_TCP, "tcp"),
    (PROTO_UDP, "udp"),
    (PROTO_OTHER, "other"),
];
const VERDICTS: [(u8, &str); 3] = [
    (VERDICT_ALLOWED, "allowed"),
    (VERDICT_DENIED, "denied"),
    (VERDICT_CAPPED, "capped"),
];

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

#[allow(
    dead_code,
    reason = "float gauges arrive with the behaviour monitor (rates, baselines)"
)]
fn float_gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Renders `s` in the Prometheus text format.
pub fn render(s: &Snapshot) -> prometheus::Result<String> {
    let r = Registry::new();
    let egress = counter_vec(
        &r,
        "agentwatch_egress_total",
        "Outbound calls judged in the kernel",
        &["agent", "proto", "verdict"],
    )?;
    let frozen = gauge_vec(
        &r,
        "agentwatch_agent_frozen",
        "1 while the agent's cgroup is frozen",
        &["agent"],
    )?;
    let lost = counter_vec(
        &r,
        "agentwatch_events_lost_total",
        "Kernel events dropped because the ring buffer was full",
        &[],
    )?;
    let reloads = counter_vec(
        &r,
        "agentwatch_policy_reloads_total",
        "Policy reloads by result",
        &["result"],
    )?;
    let build = gauge_vec(
        &r,
        "agentwatch_build_info",
        "Always 1; the version label says which build runs",
        &["version"],
    )?;
    for a in &s.agents {
        for (p, pname) in PROTOS {
            for (v, vname) in VERDICTS {
                egress
                    .with_label_values(&[a.name.as_str(), pname, vname])
                    .inc_by(a.counters.egress[egress_slot(p, v)]);
            }
        }
        frozen
            .with_label_values(&[a.name.as_str()])
            .set(i64::from(a.frozen));
    }
    lost.with_label_values(&[] as &[&str]).inc_by(s.events_lost);
    reloads.with_label_values(&["ok"]).inc_by(s.reloads_ok);
    reloads
        .with_label_values(&["rejected"])
        .inc_by(s.reloads_rejected);
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names_and_labels() {
        let mut counters = AgentCounters::default();
        counters.egress[egress_slot(PROTO_TCP, VERDICT_DENIED)] = 7;
        counters.egress[egress_slot(PROTO_UDP, VERDICT_ALLOWED)] = 3;
        let text = render(&Snapshot {
            agents: vec![AgentSnapshot {
                name: "mailer".into(),
                counters,
                frozen: true,
            }],
            events_lost: 2,
            reloads_ok: 4,
            reloads_rejected: 1,
        })
        .unwrap();
        for line in [
            "agentwatch_egress_total{agent=\"mailer\",proto=\"tcp\",verdict=\"denied\"} 7",
            "agentwatch_egress_total{agent=\"mailer\",proto=\"udp\",verdict=\"allowed\"} 3",
            "agentwatch_egress_total{agent=\"mailer\",proto=\"tcp\",verdict=\"capped\"} 0",
            "agentwatch_agent_frozen{agent=\"mailer\"} 1",
            "agentwatch_events_lost_total 2",
            "agentwatch_policy_reloads_total{result=\"ok\"} 4",
            "agentwatch_policy_reloads_total{result=\"rejected\"} 1",
            "# TYPE agentwatch_egress_total counter",
            "# TYPE agentwatch_agent_frozen gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(text.contains("agentwatch_build_info{version=\""));
    }
}
