//! Prometheus metrics: built fresh from kernel counters and daemon state at every scrape.
//!
//! Counters come straight from the kernel's per-CPU maps (pinned, so they survive daemon
//! restarts and never go backwards); a new registry per scrape means no userspace copy can
//! drift from them. Label values are only configured agent names and fixed sets.

use crate::breaker::{SIGNALS, Signal};
use agentwatch_common::{
    AgentCounters, NUM_PROTOS, PROTO_OTHER, PROTO_TCP, PROTO_UDP, VERDICT_ALLOWED, VERDICT_CAPPED,
    VERDICT_DENIED, VERDICT_WOULD_DENY, egress_slot,
};
use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// What one scrape shows about one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentSnapshot {
    pub name: String,
    pub counters: AgentCounters,
    pub frozen: bool,
    /// It runs as root (`user = "root"`).
    pub root: bool,
    /// Requests from inside it refused on the control socket.
    pub control_refused: u64,
    /// Its links found switched off and attached again by the daemon.
    pub guard_restored: u64,
    /// The daemon found in its cgroup (moved there) and moved back out.
    pub daemon_moved: u64,
    /// Per signal (indexed like `Signal::ALL`): current rate and learned baseline.
    /// None: the kernel does not count the signal for this agent (no series, rather than 0).
    pub rates: [Option<f64>; SIGNALS],
    pub baselines: [Option<f64>; SIGNALS],
    pub anomaly_score: f64,
    pub breaker_open: bool,
    /// Trips by action (alert, deny, freeze, kill).
    pub trips: [u64; 4],
    /// The DNS forwarder's counts (zero without hostname rules).
    pub dns: crate::dns::Stats,
    /// Seconds until the agent's egress lease runs out (0 once it has); None: no lease.
    pub lease_seconds_left: Option<f64>,
    /// Every configured rule (its text as written) with the calls it admitted.
    pub rule_hits: Vec<(String, u64)>,
    /// Per API scope: calls through the gateway by decision.
    pub api_calls: Vec<(String, Vec<(&'static str, u64)>)>,
}

const ACTIONS: [&str; 4] = ["alert", "deny", "freeze", "kill"];

/// What one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub agents: Vec<AgentSnapshot>,
    pub events_lost: u64,
    pub reloads_ok: u64,
    pub reloads_rejected: u64,
    /// Audit lines that could not be written (full or read-only disk).
    pub audit_lines_lost: u64,
    /// Connections the API gateway closed at once (over its bounds).
    pub gateway_connections_refused: u64,
}

const PROTOS: [(u8, &str); NUM_PROTOS] = [
    (PROTO_TCP, "tcp"),
    (PROTO_UDP, "udp"),
    (PROTO_OTHER, "other"),
];
const VERDICTS: [(u8, &str); 4] = [
    (VERDICT_ALLOWED, "allowed"),
    (VERDICT_DENIED, "denied"),
    (VERDICT_CAPPED, "capped"),
    (VERDICT_WOULD_DENY, "would_deny"),
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
    let root = gauge_vec(
        &r,
        "agentwatch_agent_root",
        "1 for an agent that runs as root (user = \"root\"): without BPF LSM it can reach the daemon's files",
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
    let audit_lost = counter_vec(
        &r,
        "agentwatch_audit_lines_lost_total",
        "Audit lines that could not be written (full or read-only disk); the trail marks each \
         gap with an audit_lines_lost line once it is writable again",
        &[],
    )?;
    let build = gauge_vec(
        &r,
        "agentwatch_build_info",
        "Always 1; the version label says which build runs",
        &["version"],
    )?;
    let syscalls = counter_vec(
        &r,
        "agentwatch_syscalls_total",
        "System calls of agents that monitor them",
        &["agent"],
    )?;
    let execs = counter_vec(
        &r,
        "agentwatch_execs_total",
        "Execs of agent processes, allowed or killed by the exec allow-list",
        &["agent", "verdict"],
    )?;
    let escapes = counter_vec(
        &r,
        "agentwatch_escape_attempts_total",
        "Attempts to get around the guard, by kind (refused or killed in the kernel)",
        &["agent", "kind"],
    )?;
    let files_denied = counter_vec(
        &r,
        "agentwatch_files_denied_total",
        "File opens outside the agent's [agents.files] list: refused (BPF LSM) or detected",
        &["agent"],
    )?;
    let suppressed = counter_vec(
        &r,
        "agentwatch_audit_suppressed_total",
        "Denials over the agent's audit_rate: counted and summarised, not written one by one",
        &["agent"],
    )?;
    let dns_queries = counter_vec(
        &r,
        "agentwatch_dns_queries_total",
        "DNS queries of agents with hostname rules: allowed (answered), denied (REFUSED: no \
         rule allows the name), failed (upstream or the kernel write failed: SERVFAIL), \
         malformed (FORMERR or dropped)",
        &["agent", "verdict"],
    )?;
    let dns_learned = gauge_vec(
        &r,
        "agentwatch_dns_learned_addresses",
        "Addresses in the agent's kernel allow-list learned from allowed DNS answers",
        &["agent"],
    )?;
    let bytes = counter_vec(
        &r,
        "agentwatch_egress_bytes_total",
        "Outbound bytes of the agent (IP packets, headers included) that left it",
        &["agent"],
    )?;
    let bytes_dropped = counter_vec(
        &r,
        "agentwatch_egress_bytes_dropped_total",
        "Outbound bytes the agent's byte cap dropped in the kernel",
        &["agent"],
    )?;
    let api_calls = counter_vec(
        &r,
        "agentwatch_api_calls_total",
        "Calls through the API gateway, by scope and decision (allowed, approved, denied, \
         limited, refused, revoked)",
        &["agent", "api", "decision"],
    )?;
    let revoked = counter_vec(
        &r,
        "agentwatch_egress_packets_revoked_total",
        "Packets of sockets the agent opened before its egress was revoked (kill switch, \
         breaker, lease end), dropped in the kernel as they left",
        &["agent"],
    )?;
    let lease_left = float_gauge_vec(
        &r,
        "agentwatch_lease_seconds_left",
        "Seconds until the agent's egress lease runs out (0: expired, egress denied); agents \
         with a lease only",
        &["agent"],
    )?;
    let rule_hits = counter_vec(
        &r,
        "agentwatch_rule_hits_total",
        "Calls each egress rule admitted (counted under the most specific rule that admits \
         the call); 0 for a rule never used",
        &["agent", "rule"],
    )?;
    let records_lost = counter_vec(
        &r,
        "agentwatch_records_lost_total",
        "What the kernel had no room to record: rule_hits (admitted calls not counted per \
         rule), learn (learn-mode destinations or execs left out of `agentwatch learn`)",
        &["agent", "map"],
    )?;
    let rate = float_gauge_vec(
        &r,
        "agentwatch_rate_per_second",
        "Current rate over the breaker window",
        &["agent", "signal"],
    )?;
    let baseline = float_gauge_vec(
        &r,
        "agentwatch_baseline_per_second",
        "Learned normal rate",
        &["agent", "signal"],
    )?;
    let score = float_gauge_vec(
        &r,
        "agentwatch_anomaly_score",
        "How many times its baseline the most abnormal signal runs at",
        &["agent"],
    )?;
    let open = gauge_vec(
        &r,
        "agentwatch_breaker_open",
        "1 while the agent's breaker is open",
        &["agent"],
    )?;
    let trips = counter_vec(
        &r,
        "agentwatch_breaker_trips_total",
        "Breaker trips by action",
        &["agent", "action"],
    )?;
    for a in &s.agents {
        let n = a.name.as_str();
        for (p, pname) in PROTOS {
            for (v, vname) in VERDICTS {
                egress
                    .with_label_values(&[n, pname, vname])
                    .inc_by(a.counters.egress[egress_slot(p, v)]);
            }
        }
        frozen.with_label_values(&[n]).set(i64::from(a.frozen));
        root.with_label_values(&[n]).set(i64::from(a.root));
        syscalls.with_label_values(&[n]).inc_by(a.counters.syscalls);
        execs
            .with_label_values(&[n, "allowed"])
            .inc_by(a.counters.execs);
        execs
            .with_label_values(&[n, "denied"])
            .inc_by(a.counters.execs_denied);
        let c = &a.counters;
        for (kind, n_) in [
            ("raw_socket", c.raw_sockets_denied),
            (
                "packet_socket",
                c.packet_sockets_killed + c.packet_sockets_denied,
            ),
            ("cgroup_escape", c.cgroup_escapes),
            ("control_refused", a.control_refused),
            ("tamper_refused", c.tamper_refused),
            ("route_option", c.route_options_refused),
            ("guard_restored", a.guard_restored),
            ("daemon_moved", a.daemon_moved),
        ] {
            escapes.with_label_values(&[n, kind]).inc_by(n_);
        }
        suppressed.with_label_values(&[n]).inc_by(c.suppressed());
        files_denied.with_label_values(&[n]).inc_by(c.files_denied);
        for (verdict, count) in [
            ("allowed", a.dns.allowed),
            ("denied", a.dns.denied),
            ("failed", a.dns.failed),
            ("malformed", a.dns.malformed),
            ("would_deny", a.dns.would_deny),
        ] {
            dns_queries.with_label_values(&[n, verdict]).inc_by(count);
        }
        bytes.with_label_values(&[n]).inc_by(c.egress_bytes);
        bytes_dropped
            .with_label_values(&[n])
            .inc_by(c.egress_bytes_dropped);
        revoked.with_label_values(&[n]).inc_by(c.packets_revoked);
        for (api, calls) in &a.api_calls {
            for (decision, count) in calls {
                api_calls
                    .with_label_values(&[n, api.as_str(), decision])
                    .inc_by(*count);
            }
        }
        for (rule, hits) in &a.rule_hits {
            rule_hits
                .with_label_values(&[n, rule.as_str()])
                .inc_by(*hits);
        }
        records_lost
            .with_label_values(&[n, "rule_hits"])
            .inc_by(c.rule_hits_lost);
        records_lost
            .with_label_values(&[n, "learn"])
            .inc_by(c.learn_lost);
        if let Some(left) = a.lease_seconds_left {
            lease_left.with_label_values(&[n]).set(left);
        }
        dns_learned
            .with_label_values(&[n])
            .set(i64::try_from(a.dns.learned).unwrap_or(i64::MAX));
        for (i, signal) in Signal::ALL.iter().map(|s| s.name()).enumerate() {
            if let Some(r) = a.rates[i] {
                rate.with_label_values(&[n, signal]).set(r);
            }
            // No baseline before the first window: absent, rather than a misleading 0.
            if let Some(b) = a.baselines[i] {
                baseline.with_label_values(&[n, signal]).set(b);
            }
        }
        score.with_label_values(&[n]).set(a.anomaly_score);
        open.with_label_values(&[n]).set(i64::from(a.breaker_open));
        for (i, action) in ACTIONS.iter().enumerate() {
            trips.with_label_values(&[n, action]).inc_by(a.trips[i]);
        }
    }
    lost.with_label_values(&[] as &[&str]).inc_by(s.events_lost);
    reloads.with_label_values(&["ok"]).inc_by(s.reloads_ok);
    reloads
        .with_label_values(&["rejected"])
        .inc_by(s.reloads_rejected);
    audit_lost
        .with_label_values(&[] as &[&str])
        .inc_by(s.audit_lines_lost);
    counter_vec(
        &r,
        "agentwatch_gateway_connections_refused_total",
        "Connections the API gateway closed at once: over its bound in all, an agent's, or \
         that of processes outside every agent",
        &[],
    )?
    .with_label_values(&[] as &[&str])
    .inc_by(s.gateway_connections_refused);
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
                root: true,
                control_refused: 3,
                guard_restored: 0,
                daemon_moved: 1,
                rates: [
                    Some(12.5),
                    Some(0.0),
                    None,
                    Some(0.0),
                    Some(0.0),
                    None,
                    Some(0.0),
                    Some(0.0),
                ],
                baselines: [Some(2.0), None, None, None, None, None, None, None],
                anomaly_score: 6.25,
                breaker_open: true,
                trips: [0, 0, 1, 0],
                dns: crate::dns::Stats {
                    allowed: 5,
                    denied: 2,
                    learned: 3,
                    ..Default::default()
                },
                lease_seconds_left: Some(42.5),
                rule_hits: vec![("tcp 10.0.0.0/8 443".into(), 4), ("udp ::1 53".into(), 0)],
                api_calls: vec![("mail".into(), vec![("allowed", 3), ("limited", 1)])],
            }],
            events_lost: 2,
            reloads_ok: 4,
            reloads_rejected: 1,
            audit_lines_lost: 2,
            gateway_connections_refused: 5,
        })
        .unwrap();
        for line in [
            "agentwatch_egress_total{agent=\"mailer\",proto=\"tcp\",verdict=\"denied\"} 7",
            "agentwatch_egress_total{agent=\"mailer\",proto=\"udp\",verdict=\"allowed\"} 3",
            "agentwatch_egress_total{agent=\"mailer\",proto=\"tcp\",verdict=\"capped\"} 0",
            "agentwatch_agent_frozen{agent=\"mailer\"} 1",
            "agentwatch_agent_root{agent=\"mailer\"} 1",
            "agentwatch_escape_attempts_total{agent=\"mailer\",kind=\"control_refused\"} 3",
            "agentwatch_escape_attempts_total{agent=\"mailer\",kind=\"daemon_moved\"} 1",
            "agentwatch_events_lost_total 2",
            "agentwatch_policy_reloads_total{result=\"ok\"} 4",
            "agentwatch_policy_reloads_total{result=\"rejected\"} 1",
            "# TYPE agentwatch_egress_total counter",
            "# TYPE agentwatch_agent_frozen gauge",
            "agentwatch_rate_per_second{agent=\"mailer\",signal=\"connects\"} 12.5",
            "agentwatch_baseline_per_second{agent=\"mailer\",signal=\"connects\"} 2",
            "agentwatch_anomaly_score{agent=\"mailer\"} 6.25",
            "agentwatch_breaker_open{agent=\"mailer\"} 1",
            "agentwatch_breaker_trips_total{action=\"freeze\",agent=\"mailer\"} 1",
            "agentwatch_execs_total{agent=\"mailer\",verdict=\"denied\"} 0",
            "agentwatch_syscalls_total{agent=\"mailer\"} 0",
            "agentwatch_dns_queries_total{agent=\"mailer\",verdict=\"allowed\"} 5",
            "agentwatch_dns_queries_total{agent=\"mailer\",verdict=\"denied\"} 2",
            "agentwatch_dns_queries_total{agent=\"mailer\",verdict=\"malformed\"} 0",
            "agentwatch_dns_learned_addresses{agent=\"mailer\"} 3",
            "agentwatch_lease_seconds_left{agent=\"mailer\"} 42.5",
            "agentwatch_audit_lines_lost_total 2",
            "agentwatch_gateway_connections_refused_total 5",
            "agentwatch_rule_hits_total{agent=\"mailer\",rule=\"tcp 10.0.0.0/8 443\"} 4",
            "agentwatch_rule_hits_total{agent=\"mailer\",rule=\"udp ::1 53\"} 0",
            "agentwatch_api_calls_total{agent=\"mailer\",api=\"mail\",decision=\"allowed\"} 3",
            "agentwatch_api_calls_total{agent=\"mailer\",api=\"mail\",decision=\"limited\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(text.contains("agentwatch_build_info{version=\""));
        assert!(
            !text.contains("signal=\"sends\"} 0\nagentwatch_baseline"),
            "no baseline before learning"
        );
        assert!(
            !text.contains("agentwatch_baseline_per_second{agent=\"mailer\",signal=\"sends\"}")
        );
        // Signals the kernel does not count for the agent have no series, rather than a 0.
        assert!(text.contains("agentwatch_rate_per_second{agent=\"mailer\",signal=\"sends\"} 0"));
        for signal in ["syscalls", "destinations"] {
            assert!(
                !text.contains(&format!(
                    "agentwatch_rate_per_second{{agent=\"mailer\",signal=\"{signal}\"}}"
                )),
                "{signal}"
            );
        }
    }
}
