//! What operators deploy, checked with the real tools: a real Prometheus scraping a real daemon
//! after a known workload (exact counts through its HTTP API, and the alerting rules evaluated
//! on what it scraped), `promtool check metrics` on a real scrape, the alerting rules' unit
//! tests, every Grafana panel's query run through that Prometheus, the Kubernetes manifests
//! against the Kubernetes schemas, and the systemd units through `systemd-analyze`.
//!
//! The tools come from `cargo xtask setup` (tests/src/prom.rs says where); a missing one fails
//! the test with that advice. Only the tests that run a daemon need root.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use agentwatch_tests::{
    DaemonEnv, TempDir, agentwatch_bin,
    dns::{Rdata, TestDnsServer, parse_lookups, rec, start_daemon},
    parse_attempts, privileged,
    prom::{
        self, JOB, PROMTOOL, Prometheus, SYSTEMD_ANALYZE, families, metrics_addr, repo_root, tool,
        unix_now,
    },
    run_probe,
};
use agentwatch_tests::{accepting, wait_until};
use serde_json::Value;

/// The name the resolving agent's hostname rule allows, and one no rule allows.
const API: &str = "api.agentwatch.test";
const EVIL: &str = "evil.agentwatch.test";
/// The resolver the agent asks: a loopback address nothing listens on; the kernel sends the
/// agent's port-53 calls to its forwarder whatever address they name.
const RESOLVER: &str = "127.0.0.99";

/// Every alert deploy/prometheus/alerts.yml defines.
const ALERTS: [&str; 10] = [
    "AgentwatchBreakerOpen",
    "AgentwatchAgentFrozen",
    "AgentwatchAgentKilled",
    "AgentwatchEscapeAttempt",
    "AgentwatchEventsLost",
    "AgentwatchPolicyReloadRejected",
    "AgentwatchDeniedEgressSpike",
    "AgentwatchDnsRefusedBulk",
    "AgentwatchLeaseExpiring",
    "AgentwatchDown",
];

/// Every metric family a daemon with agents exposes (agentwatch/src/metrics.rs).
const FAMILIES: [&str; 17] = [
    "agentwatch_egress_total",
    "agentwatch_agent_frozen",
    "agentwatch_events_lost_total",
    "agentwatch_policy_reloads_total",
    "agentwatch_build_info",
    "agentwatch_syscalls_total",
    "agentwatch_execs_total",
    "agentwatch_escape_attempts_total",
    "agentwatch_audit_suppressed_total",
    "agentwatch_dns_queries_total",
    "agentwatch_dns_learned_addresses",
    "agentwatch_lease_seconds_left",
    "agentwatch_rate_per_second",
    "agentwatch_baseline_per_second",
    "agentwatch_anomaly_score",
    "agentwatch_breaker_open",
    "agentwatch_breaker_trips_total",
];

fn deploy(rel: &str) -> PathBuf {
    repo_root().join("deploy").join(rel)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` and returns its output (a program that cannot start is a failure with its name).
fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

/// A loopback port nothing listens on (denied before it matters).
fn unlisted_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

/// A daemon guarding two agents: `worker` (address rules for a TCP listener and a UDP socket of
/// the test, and an hour's egress lease) and `resolver` (one hostname rule, so its DNS goes through the daemon's forwarder
/// to a DNS server of the test). Drop removes the daemon, its cgroups and pins, and the servers.
struct Guarded {
    env: DaemonEnv,
    _dns: TestDnsServer,
    tcp_port: u16,
    udp: UdpSocket,
}

/// What [`Guarded::run_workload`] makes the kernel count, per (agent, proto, verdict): every
/// series the daemon exposes for the two agents, so "exactly" covers the zeros too.
const EGRESS: [(&str, &str, &str, f64); 24] = [
    ("resolver", "other", "allowed", 0.0),
    ("resolver", "other", "capped", 0.0),
    ("resolver", "other", "denied", 0.0),
    ("resolver", "other", "would_deny", 0.0),
    ("resolver", "tcp", "allowed", 1.0),
    ("resolver", "tcp", "capped", 0.0),
    ("resolver", "tcp", "denied", 0.0),
    ("resolver", "tcp", "would_deny", 0.0),
    // Its three DNS queries: sends the kernel let through, to the forwarder.
    ("resolver", "udp", "allowed", 3.0),
    ("resolver", "udp", "capped", 0.0),
    ("resolver", "udp", "denied", 0.0),
    ("resolver", "udp", "would_deny", 0.0),
    ("worker", "other", "allowed", 0.0),
    ("worker", "other", "capped", 0.0),
    ("worker", "other", "denied", 0.0),
    ("worker", "other", "would_deny", 0.0),
    ("worker", "tcp", "allowed", 3.0),
    ("worker", "tcp", "capped", 0.0),
    ("worker", "tcp", "denied", 2.0),
    ("worker", "tcp", "would_deny", 0.0),
    ("worker", "udp", "allowed", 4.0),
    ("worker", "udp", "capped", 0.0),
    ("worker", "udp", "denied", 1.0),
    ("worker", "udp", "would_deny", 0.0),
];

impl Guarded {
    fn start() -> Self {
        let tcp_port = accepting();
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_port = udp.local_addr().expect("addr").port();
        let dns = TestDnsServer::start([rec(API, Rdata::A(Ipv4Addr::LOCALHOST), 60)]);
        let env = start_daemon(
            &dns,
            &format!(
                "[[agents]]\nname = \"worker\"\n\
                 egress = [\"tcp 127.0.0.1 {tcp_port}\", \"udp 127.0.0.1 {udp_port}\"]\n\
                 lease = \"1h\"\n\n\
                 [[agents]]\nname = \"resolver\"\negress = [\"tcp {API} {tcp_port}\"]\n"
            ),
        );
        Self {
            env,
            _dns: dns,
            tcp_port,
            udp,
        }
    }

    /// `agentwatch launch --agent AGENT -- aw-probe ARGS`, which must exit 0.
    fn launch(&self, agent: &str, args: &[&str]) -> Output {
        let out = self.env.launch_probe(agent, args);
        assert!(
            out.status.success(),
            "{agent} {args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Outcomes (0 or errno) of a launched aw-probe's attempts.
    fn errnos(&self, agent: &str, args: &[&str]) -> Vec<i32> {
        parse_attempts(&self.launch(agent, args).stdout)
            .iter()
            .map(|a| a.errno)
            .collect()
    }

    /// The known workload: [`EGRESS`], 1 allowed and 2 refused DNS queries, 1 raw socket.
    fn run_workload(&self) {
        let tcp = self.tcp_port.to_string();
        let udp = self.udp.local_addr().expect("addr").port().to_string();
        let other = unlisted_port().to_string();
        let eperm = libc::EPERM;
        assert_eq!(
            self.errnos("worker", &["connect", "tcp", "127.0.0.1", &tcp, "3"]),
            [0; 3]
        );
        assert_eq!(
            self.errnos("worker", &["connect", "tcp", "127.0.0.1", &other, "2"]),
            [eperm; 2]
        );
        assert_eq!(
            self.errnos("worker", &["sendto", "127.0.0.1", &udp, "4"]),
            [0; 4]
        );
        assert_eq!(
            self.errnos("worker", &["sendto", "127.0.0.1", &other, "1"]),
            [eperm]
        );
        // A raw socket is an escape attempt only for a process that could open one: `launch`
        // drops CAP_NET_RAW, so the kernel would refuse it before agentwatch's hook runs. A
        // root process moved into the agent's cgroup keeps it.
        let raw = parse_attempts(
            &run_probe(
                Some(&self.env.agent_cgroup("worker")),
                &["socket", "inet", "raw", "1"],
            )
            .stdout,
        );
        assert_eq!(
            raw.iter().map(|a| a.errno).collect::<Vec<_>>(),
            [eperm],
            "{raw:?}"
        );

        let allowed = parse_lookups(
            &self
                .launch("resolver", &["resolve", RESOLVER, "53", API, "A", "udp"])
                .stdout,
        );
        assert_eq!(allowed.len(), 1, "{allowed:?}");
        assert_eq!(allowed[0].rcode.as_deref(), Some("NoError"), "{allowed:?}");
        assert_eq!(allowed[0].addrs, ["127.0.0.1"], "{allowed:?}");
        let refused = parse_lookups(
            &self
                .launch(
                    "resolver",
                    &["resolve", RESOLVER, "53", EVIL, "A", "udp", "2"],
                )
                .stdout,
        );
        let rcodes: Vec<_> = refused.iter().map(|l| l.rcode.as_deref()).collect();
        assert_eq!(rcodes, [Some("Refused"); 2], "{refused:?}");
        // The allowed answer opened its address on the rule's port.
        assert_eq!(
            self.errnos("resolver", &["connect", "tcp", "127.0.0.1", &tcp]),
            [0]
        );
    }
}

/// A guarded daemon and a Prometheus that scraped it once before the workload (so rate() and
/// increase() see the workload's calls as increases) and at least once after it.
fn scraped_fleet(rule_files: &[PathBuf]) -> (Prometheus, Guarded) {
    let g = Guarded::start();
    let prom = Prometheus::start(&metrics_addr(&g.env), rule_files);
    prom.wait_scrape_after(unix_now());
    g.run_workload();
    // The forwarder counts a query as it answers it; the daemon's own /metrics showing both
    // refusals means the cut-off below comes after every count.
    wait_until(
        "the daemon counting 2 refused names",
        Duration::from_secs(5),
        || {
            g.env
                .metric("agentwatch_dns_queries_total{agent=\"resolver\",verdict=\"denied\"}")
                == Some(2.0)
        },
    );
    prom.wait_scrape_after(unix_now());
    (prom, g)
}

#[test]
fn prometheus_scrapes_the_exact_counts_of_a_known_workload_and_alerts_on_the_escape() {
    privileged!();
    let (prom, g) = scraped_fleet(&[deploy("prometheus/alerts.yml")]);
    let instance = metrics_addr(&g.env);

    let egress = prom.values_by(
        &format!("agentwatch_egress_total{{job=\"{JOB}\"}}"),
        &["agent", "proto", "verdict"],
    );
    let want: Vec<(Vec<String>, f64)> = EGRESS
        .iter()
        .map(|(a, p, v, n)| (vec![(*a).to_owned(), (*p).to_owned(), (*v).to_owned()], *n))
        .collect();
    assert_eq!(egress, want);

    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        prom.values_by("agentwatch_dns_queries_total", &["agent", "verdict"]),
        [
            (s(&["resolver", "allowed"]), 1.0),
            (s(&["resolver", "denied"]), 2.0),
            (s(&["resolver", "failed"]), 0.0),
            (s(&["resolver", "malformed"]), 0.0),
            (s(&["resolver", "would_deny"]), 0.0),
            (s(&["worker", "allowed"]), 0.0),
            (s(&["worker", "denied"]), 0.0),
            (s(&["worker", "failed"]), 0.0),
            (s(&["worker", "malformed"]), 0.0),
            (s(&["worker", "would_deny"]), 0.0),
        ]
    );
    assert_eq!(
        prom.values_by("agentwatch_dns_learned_addresses", &["agent"]),
        [(s(&["resolver"]), 1.0), (s(&["worker"]), 0.0)]
    );
    assert_eq!(
        prom.values_by(
            "agentwatch_escape_attempts_total{agent=\"worker\"}",
            &["kind"]
        ),
        [
            (s(&["cgroup_escape"]), 0.0),
            (s(&["control_refused"]), 0.0),
            (s(&["daemon_moved"]), 0.0),
            (s(&["guard_restored"]), 0.0),
            (s(&["packet_socket"]), 0.0),
            (s(&["raw_socket"]), 1.0),
            (s(&["route_option"]), 0.0),
            (s(&["tamper_refused"]), 0.0),
        ]
    );
    // The same through an aggregation an operator would write.
    assert_eq!(
        prom.values_by(
            "sum by (verdict) (agentwatch_egress_total{agent=\"worker\"})",
            &["verdict"]
        ),
        [
            (s(&["allowed"]), 7.0),
            (s(&["capped"]), 0.0),
            (s(&["denied"]), 3.0),
            (s(&["would_deny"]), 0.0),
        ]
    );

    // The alerting rules, evaluated by this Prometheus on what it scraped: all load, and the
    // escape attempt (and nothing else: 3 denials and 2 refused names are no spike) alerts.
    let rules = prom.rules();
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ALERTS.into_iter().collect(), "{rules:#?}");
    assert!(
        rules.iter().all(|r| r["health"] == "ok"),
        "rules with errors: {rules:#?}"
    );
    wait_until(
        "AgentwatchEscapeAttempt to fire",
        Duration::from_secs(15),
        || {
            prom.alerts().iter().any(|a| {
                a["labels"]["alertname"] == "AgentwatchEscapeAttempt" && a["state"] == "firing"
            })
        },
    );
    let alerts: Vec<(Value, Value)> = prom
        .alerts()
        .iter()
        .map(|a| (a["labels"].clone(), a["state"].clone()))
        .collect();
    let want = serde_json::json!({
        "alertname": "AgentwatchEscapeAttempt",
        "agent": "worker",
        "instance": instance,
        "kind": "raw_socket",
        "severity": "critical",
    });
    assert_eq!(alerts, [(want, Value::from("firing"))]);
}

#[test]
fn promtool_check_metrics_passes_on_a_real_scrape() {
    privileged!();
    let promtool = tool(PROMTOOL);
    let g = Guarded::start();
    g.run_workload();
    // Baselines are absent until the breaker learned a window: wait, so every family shows.
    wait_until("a learned baseline", Duration::from_secs(10), || {
        g.env.metrics().contains("agentwatch_baseline_per_second{")
    });
    let scrape = g.env.metrics();
    let found = families(&scrape);
    for f in FAMILIES {
        assert!(found.iter().any(|x| x == f), "no {f} in:\n{scrape}");
    }
    let unique: BTreeSet<&String> = found.iter().collect();
    assert_eq!(unique.len(), found.len(), "a family declared twice");

    let check = |text: &str| {
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writing the scrape to promtool");
        child.wait_with_output().expect("promtool")
    };
    let out = check(&scrape);
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "promtool check metrics: {:?}\n{}",
        out.status,
        text(&out)
    );
    // The same lint catches a counter named against the conventions: the check is live.
    let bad = check(&format!(
        "{scrape}# HELP agentwatch_bad a counter without _total\n# TYPE agentwatch_bad counter\n\
         agentwatch_bad 1\n"
    ));
    assert!(
        !bad.status.success() && text(&bad).contains("agentwatch_bad"),
        "{}",
        text(&bad)
    );
}

/// `- alert: NAME` lines of a rules file, in order.
fn alert_names(rules_yaml: &str) -> Vec<String> {
    rules_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool(PROMTOOL);
    let dir = deploy("prometheus");
    let rules = fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    assert_eq!(alert_names(&rules), ALERTS);

    let out = run(Command::new(&promtool)
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
        "{}",
        text(&out)
    );

    // Every alert has at least one test case in alerts_test.yml.
    let tests = fs::read_to_string(dir.join("alerts_test.yml")).expect("alerts_test.yml");
    for a in ALERTS {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "no unit test for {a} in alerts_test.yml"
        );
    }
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&dir));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));

    // The unit tests have teeth: with the denied-egress threshold raised tenfold, the case that
    // must fire fails.
    let tmp = TempDir::new();
    let threshold = "(rate(agentwatch_egress_total{verdict=\"denied\"}[2m])) > 5\n";
    assert!(rules.contains(threshold), "the spike rule changed shape");
    fs::write(
        tmp.0.join("alerts.yml"),
        rules.replace(
            threshold,
            "(rate(agentwatch_egress_total{verdict=\"denied\"}[2m])) > 50\n",
        ),
    )
    .expect("write");
    fs::write(tmp.0.join("alerts_test.yml"), &tests).expect("write");
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&tmp.0));
    assert!(
        !out.status.success() && text(&out).contains("AgentwatchDeniedEgressSpike"),
        "{}",
        text(&out)
    );

    // The fleet scrape config, with its rule file and host list.
    let out = run(Command::new(&promtool)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("WARNING"),
        "promtool check config warned:\n{}",
        text(&out)
    );
}

/// Grafana's variables in a panel query, replaced by what they expand to for "All" and a
/// typical range.
fn expand(expr: &str) -> String {
    let mut e = expr.to_owned();
    for (var, value) in [
        ("$__rate_interval", "1m"),
        ("$__range", "1h"),
        ("$__interval", "15s"),
        ("$instance", ".*"),
        ("$agent", ".*"),
        ("$signal", ".*"),
    ] {
        e = e.replace(var, value);
    }
    assert!(!e.contains('$'), "an unknown variable in `{expr}`");
    e
}

/// The `agentwatch_*` names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    expr.match_indices("agentwatch_")
        .map(|(i, _)| {
            expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn every_dashboard_query_parses_returns_data_and_uses_only_scraped_metrics() {
    privileged!();
    let dash: Value = serde_json::from_str(
        &fs::read_to_string(deploy("grafana/agentwatch.json")).expect("agentwatch.json"),
    )
    .expect("the dashboard is JSON");
    let panels: Vec<&Value> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    let titles: BTreeSet<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Rate vs baseline: $signal",
        "Verdicts over time",
        "Breaker state",
        "Denials by agent",
        "DNS queries",
        "Escape attempts",
    ] {
        assert!(titles.contains(want), "no panel {want:?} in {titles:?}");
    }
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(ids.insert(p["id"].as_u64()), "panel id used twice: {title}");
        // The datasource is the dashboard's variable, so importing never needs an edit.
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: no gridPos");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            exprs.push((title.to_owned(), expr.to_owned()));
        }
    }
    // Variables: label_values(EXPR, LABEL) is Grafana's, not PromQL; EXPR must parse and
    // LABEL must have values.
    let mut var_queries = Vec::new();
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] != "query" {
            continue;
        }
        let def = v["definition"].as_str().expect("definition");
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {def}"));
        let (expr, label) = inner.rsplit_once(',').expect("label_values(EXPR, LABEL)");
        var_queries.push((
            format!("variable {}", v["name"]),
            format!("count by ({}) ({})", label.trim(), expr.trim()),
        ));
    }

    let (prom, g) = scraped_fleet(&[]);
    // rate() and increase() need two samples in their window, the baseline a learned window.
    wait_until(
        "3 scrapes and a learned baseline",
        Duration::from_secs(15),
        || {
            !prom
                .query(&format!("count_over_time(up{{job=\"{JOB}\"}}[1m]) >= 3"))
                .is_empty()
                && !prom.query("agentwatch_baseline_per_second").is_empty()
        },
    );
    // The check is live: a broken expression gets 400 bad_data.
    let (status, v) = prom.query_raw("sum by (agent (agentwatch_egress_total)");
    assert_eq!((status, v["errorType"].as_str()), (400, Some("bad_data")));

    let scraped = families(&g.env.metrics());
    for (title, expr) in exprs.iter().chain(&var_queries) {
        let e = expand(expr);
        let (status, v) = prom.query_raw(&e);
        assert_eq!(status, 200, "{title}: `{e}`: {v}");
        let result = v["data"]["result"].as_array();
        assert!(
            result.is_some_and(|r| !r.is_empty()),
            "{title}: `{e}` returned no series: {v}"
        );
        for name in metric_names(expr) {
            assert!(
                scraped.contains(&name),
                "{title}: {name} is not in a real scrape ({scraped:?})"
            );
        }
    }
}

/// Every document of a YAML file, as JSON (PyYAML, which kubernetes-validate brings into the
/// project's virtualenv, does the parsing).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let py = tool(prom::venv().join("bin/python"));
    let out = run(Command::new(py)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path));
    assert!(out.status.success(), "{}: {}", path.display(), text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A TOML document as JSON (Python's tomllib).
fn toml_doc(toml: &str) -> Value {
    let py = tool(prom::venv().join("bin/python"));
    let mut child = Command::new(py)
        .args([
            "-c",
            "import json, sys, tomllib; print(json.dumps(tomllib.loads(sys.stdin.read())))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(toml.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// `agentwatch check --config` on `toml` (written to a scratch file).
fn agentwatch_check(toml: &str) -> Output {
    let tmp = TempDir::new();
    let path = tmp.0.join("agentwatch.toml");
    fs::write(&path, toml).expect("write");
    run(Command::new(agentwatch_bin())
        .args(["check", "--config"])
        .arg(&path))
}

/// The Kubernetes release the manifests are validated against (kubernetes-validate bundles
/// its schemas; pinned so a new release of the tool does not move the target).
const KUBERNETES: &str = "1.33.0";

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let validate = prom::kubernetes_validate();
    let dir = deploy("kubernetes");
    let manifests: Vec<PathBuf> = ["namespace.yaml", "configmap.yaml", "daemonset.yaml"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let mut present: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    present.sort();
    let mut want = manifests.clone();
    want.sort();
    assert_eq!(present, want, "a manifest this test does not know");

    let out = run(Command::new(&validate)
        .args(["--strict", "-k", KUBERNETES])
        .args(&manifests));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out).matches(" passed for resource ").count(),
        3,
        "{}",
        text(&out)
    );
    // The validation is live: a misspelt field fails under --strict.
    let tmp = TempDir::new();
    let ds_text = fs::read_to_string(dir.join("daemonset.yaml")).expect("daemonset.yaml");
    assert!(ds_text.contains("hostPID: true"));
    let bad = tmp.0.join("daemonset.yaml");
    fs::write(&bad, ds_text.replace("hostPID: true", "hostPid: true")).expect("write");
    let out = run(Command::new(&validate)
        .args(["--strict", "-k", KUBERNETES])
        .arg(&bad));
    assert!(
        !out.status.success() && text(&out).contains("hostPid"),
        "{}",
        text(&out)
    );

    // What the daemon needs, as the manifests give it.
    let ns = &yaml_docs(&dir.join("namespace.yaml"))[0];
    let cm = &yaml_docs(&dir.join("configmap.yaml"))[0];
    let ds = &yaml_docs(&dir.join("daemonset.yaml"))[0];
    let namespace = ns["metadata"]["name"].as_str().expect("namespace name");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    assert_eq!(cm["metadata"]["namespace"], namespace);
    assert_eq!(ds["metadata"]["namespace"], namespace);
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true);
    let c = &spec["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let mounts: Vec<(String, String)> = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["mountPath"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let volumes = spec["volumes"].as_array().expect("volumes");
    // Each host path at the same path in the container: the daemon uses fixed paths
    // (bpffs, the cgroup2 mount it finds first, tracefs) and the node's tools the same socket.
    for host in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/sys/kernel/tracing",
        "/run/agentwatch",
        "/var/log/agentwatch",
    ] {
        let v = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("no hostPath volume for {host}"));
        let name = v["name"].as_str().expect("volume name");
        assert!(
            mounts.contains(&(name.to_owned(), host.to_owned())),
            "{host} is not mounted at {host}: {mounts:?}"
        );
    }
    let cfg_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let cfg_mount = &mounts
        .iter()
        .find(|(n, _)| Some(n.as_str()) == cfg_volume["name"].as_str())
        .expect("the ConfigMap mounted")
        .1;
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let key = cm["data"]
        .as_object()
        .and_then(|d| d.keys().next())
        .expect("a ConfigMap key");
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", &format!("{cfg_mount}/{key}")]),
        "{args:?} do not read {cfg_mount}/{key}"
    );

    // The config: valid, stdout for the trail, metrics where the annotations send Prometheus.
    let toml = cm["data"][key].as_str().expect("the config");
    let out = agentwatch_check(toml);
    assert!(out.status.success(), "{}", text(&out));
    let cfg = toml_doc(toml);
    assert_eq!(cfg["daemon"]["audit_log"], "-");
    let listen = cfg["daemon"]["metrics_listen"].as_str().expect("listen");
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let port = annotations["prometheus.io/port"].as_str().expect("port");
    assert_eq!(listen, format!("0.0.0.0:{port}"));
    assert_eq!(
        c["ports"][0]["containerPort"]
            .as_u64()
            .map(|p| p.to_string()),
        Some(port.to_owned())
    );
    // The commented example of an adopted pod is valid once uncommented.
    let start = toml.find("# [[agents]]").expect("the example agent");
    let uncommented: String = toml[start..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let example = format!("{}{uncommented}\n", &toml[..start]);
    let out = agentwatch_check(&example);
    assert!(
        out.status.success() && text(&out).contains("(1 agent(s))"),
        "{example}\n{}",
        text(&out)
    );
    let agent = &toml_doc(&example)["agents"][0];
    assert!(
        agent["cgroup"]
            .as_str()
            .is_some_and(|c| c.starts_with("kubepods.slice/")),
        "{agent}"
    );
}

/// systemd's cgroup path of a slice: each dash is a level (`a-b.slice` is `a.slice/a-b.slice`).
fn slice_path(slice: &str) -> String {
    let stem = slice.strip_suffix(".slice").expect("a .slice name");
    let parts: Vec<&str> = stem.split('-').collect();
    (1..=parts.len())
        .map(|n| format!("{}.slice", parts[..n].join("-")))
        .collect::<Vec<_>>()
        .join("/")
}

/// `KEY=value` of a unit file, the last one set.
fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .next_back()
}

/// The exposure score `systemd-analyze security --offline=yes UNIT` gives (0 safe .. 10).
fn exposure(units: &Path, unit: &str) -> f64 {
    let out = run(Command::new(SYSTEMD_ANALYZE)
        .args(["security", "--offline=yes", "--no-pager", unit])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display())));
    let t = text(&out);
    t.lines()
        .find_map(|l| l.split_once(&format!("Overall exposure level for {unit}: ")))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{t}"))
}

#[test]
fn systemd_units_verify_and_the_drop_in_places_the_agent_where_the_config_adopts_it() {
    tool(SYSTEMD_ANALYZE);
    let dir = deploy("systemd");
    let dropin =
        fs::read_to_string(dir.join("mailer.service.d/agentwatch.conf")).expect("the drop-in");
    // The units as installed, in a unit folder of the test's own, with the agent's own
    // service (whatever it is; here a stand-in) beside them. agentwatch.service points at the
    // binary this test run built, since verify checks that ExecStart= exists.
    let tmp = TempDir::new();
    let units = &tmp.0;
    fs::create_dir_all(units.join("mailer.service.d")).expect("mkdir");
    for f in [
        "agents-mailer.slice",
        "agentwatch-guarded@.service",
        "mailer.service.d/agentwatch.conf",
    ] {
        fs::copy(dir.join(f), units.join(f)).expect("copy");
    }
    let daemon_unit = fs::read_to_string(dir.join("agentwatch.service")).expect("unit");
    fs::write(
        units.join("agentwatch.service"),
        daemon_unit.replace(
            "/usr/local/bin/agentwatch",
            &agentwatch_bin().display().to_string(),
        ),
    )
    .expect("write");
    fs::write(
        units.join("mailer.service"),
        "[Unit]\nDescription=the agent's own service\n\n[Service]\nExecStart=/bin/true\n",
    )
    .expect("write");

    let verify = |units: &Path| {
        run(Command::new(SYSTEMD_ANALYZE)
            .args([
                "verify",
                "mailer.service",
                "agents-mailer.slice",
                "agentwatch-guarded@mailer.service",
                "agentwatch.service",
            ])
            .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display())))
    };
    let out = verify(units);
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify: {:?}\n{}",
        out.status,
        text(&out)
    );
    // Verify does read the drop-in: a misspelt setting in it is reported with its line.
    fs::write(
        units.join("mailer.service.d/agentwatch.conf"),
        dropin.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
    )
    .expect("write");
    let out = verify(units);
    assert!(
        text(&out).contains("agentwatch.conf:") && text(&out).contains("NoNewPrivilege"),
        "{}",
        text(&out)
    );
    fs::write(units.join("mailer.service.d/agentwatch.conf"), &dropin).expect("write");

    // The drop-in is what hardens the service: systemd's own score, with and without it.
    let hardened = exposure(units, "mailer.service");
    assert!(hardened <= 2.0, "exposure {hardened} with the drop-in");
    let bare = TempDir::new();
    fs::copy(units.join("mailer.service"), bare.0.join("mailer.service")).expect("copy");
    let unhardened = exposure(&bare.0, "mailer.service");
    assert!(unhardened >= 9.0, "exposure {unhardened} without it");
    // No capabilities left at all (an empty bounding set), so none of the eight launch drops.
    assert_eq!(
        unit_value(&dropin, "CapabilityBoundingSet").as_deref(),
        Some("")
    );
    assert_eq!(
        unit_value(&dropin, "NoNewPrivileges").as_deref(),
        Some("yes")
    );
    assert!(
        unit_value(&dropin, "User").is_some_and(|u| u != "root" && !u.is_empty()),
        "the agent runs as root"
    );
    assert_eq!(
        unit_value(&dropin, "Requires").as_deref(),
        Some("agentwatch-guarded@mailer.service")
    );

    // The config snippet adopts exactly the cgroup the drop-in's Slice= puts the service in,
    // and `agentwatch check` accepts it.
    let slice = unit_value(&dropin, "Slice").expect("Slice=");
    let snippet = fs::read_to_string(dir.join("mailer.toml")).expect("mailer.toml");
    let agent = &toml_doc(&snippet)["agents"][0];
    assert_eq!(agent["name"], "mailer");
    assert_eq!(
        agent["cgroup"].as_str(),
        Some(slice_path(&slice).as_str()),
        "Slice={slice}"
    );
    assert_eq!(slice_path(&slice), "agents.slice/agents-mailer.slice");
    let out = agentwatch_check(&snippet);
    assert!(out.status.success(), "{}", text(&out));
}
