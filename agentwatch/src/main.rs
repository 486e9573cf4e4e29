//! The `agentwatch` command line.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use agentwatch::{
    config::{self, Config},
    control::{self, Request},
    daemon::{self, ConfigSource},
};
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "agentwatch",
    version,
    about = "Egress and syscall monitor with a kill switch for AI agents"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// The daemon's control socket (commands that talk to the daemon).
    #[arg(long, global = true, default_value = "/run/agentwatch/control.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        /// Config file (default: /etc/agentwatch/agentwatch.toml, else the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Instead of running: detach and remove every pin and the cgroups agentwatch created
        /// (uninstall). The daemon must be stopped.
        #[arg(long)]
        cleanup: bool,
    },
    /// Validate a config file: exit 0, or exit 1 with `PATH:LINE:COL: message` per error.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a command inside a guarded agent's cgroup; the exit status is the command's.
    Launch {
        #[arg(long)]
        agent: String,
        #[arg(last = true, required = true)]
        cmd: Vec<OsString>,
    },
    /// One row per agent: cgroup, processes, state, egress counts.
    Status {
        /// Only this agent.
        agent: Option<String>,
        /// Each agent's egress rules with the calls each admitted (unused rules marked).
        #[arg(long)]
        rules: bool,
        #[arg(long)]
        json: bool,
    },
    /// Propose the agent's least-privilege policy from what it did: an [[agents]] table for
    /// `check` and `reload` (every destination it called or tried, hostnames where the
    /// forwarder answered the address, every path it exec'd), then its rules never used.
    Learn {
        agent: String,
        /// Widen IPv4 addresses into networks of this prefix length where two or more with the
        /// same protocol and port share one (default: exact addresses).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=32))]
        widen_v4: Option<u8>,
        /// The same for IPv6 (0-128).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=128))]
        widen_v6: Option<u8>,
        /// The proposal as JSON (rules, counts, last use, unused rules) for tools.
        #[arg(long)]
        json: bool,
    },
    /// Pause every process of the agent (cgroup.freeze); nothing is lost.
    Freeze { agent: String },
    /// Resume a frozen agent.
    Thaw { agent: String },
    /// Kill switch: deny all egress of the agent, then kill its whole process tree.
    Kill { agent: String },
    /// Close a tripped breaker / lift a kill: the agent may run and call out again. Its rate
    /// windows restart and its baselines are learned again from now (warmup again).
    Approve {
        agent: String,
        /// Keep the learned baselines; judge only calls made after the approval against them.
        #[arg(long, conflicts_with = "call")]
        keep_baseline: bool,
        /// Instead: let this one held API call through (its id is in `status` and `top`).
        #[arg(long, value_name = "ID")]
        call: Option<u64>,
    },
    /// Refuse a held API call: it gets 403 (`refused`).
    Deny {
        agent: String,
        /// The held call's id (in `status` and `top`).
        #[arg(long, value_name = "ID")]
        call: u64,
    },
    /// Reload the daemon's config (same as SIGHUP).
    Reload,
    /// Reopen the agent's egress lease for DURATION from now (e.g. 30m, 2h); audited.
    Extend {
        agent: String,
        #[arg(value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Live view of every agent: state, rate vs baseline per signal, denials, breaker, the
    /// latest audit events; keys to freeze, thaw, kill and approve (each confirmed).
    Top {
        /// How often to refresh.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Run the whole story on this machine (as root): a daemon on an embedded config, a model
    /// provider on loopback and a scripted agent that is allowed, denied, refused a raw socket,
    /// frozen by its breaker, approved and killed. Leaves nothing behind.
    Demo,
    /// The demo's scripted agent (used by `demo`).
    #[command(hide = true)]
    DemoAgent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The audit trail (no daemon needed).
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the trail's hash chain: exit 0, or exit 1 naming the file and line where it breaks.
    ///
    /// Give rotated files oldest first: audit.jsonl.3 audit.jsonl.2 audit.jsonl.1 audit.jsonl.
    /// A first line that follows a line not given (rotated away) is said, not an error.
    Verify {
        /// The trail's files, oldest first.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli.command, cli.socket) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves `--config`: the given file, else the default path if it exists, else the embedded
/// default. A given file that does not parse is an error, never a fallback.
fn load_config(path: Option<PathBuf>) -> Result<(Config, ConfigSource)> {
    let path = path.or_else(|| {
        let p = PathBuf::from(config::DEFAULT_PATH);
        p.exists().then_some(p)
    });
    match path {
        Some(p) => {
            let c = Config::load(&p).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
            Ok((c, ConfigSource::File(p)))
        }
        None => {
            let c = Config::parse(config::EMBEDDED_DEFAULT, "<embedded default>")
                .map_err(|e| anyhow::anyhow!("the embedded default config is invalid:\n{e}"))?;
            Ok((c, ConfigSource::EmbeddedDefault))
        }
    }
}

fn real_main(cmd: Cmd, socket: PathBuf) -> Result<ExitCode> {
    let request = match cmd {
        Cmd::Run { config, cleanup } => {
            let (config, source) = load_config(config)?;
            if cleanup {
                println!("{}", daemon::cleanup(&config)?);
                return Ok(ExitCode::SUCCESS);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(config, source))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Demo => return agentwatch::demo::run(),
        Cmd::Top { interval } => {
            agentwatch::top::run(&socket, interval)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::DemoAgent { args } => {
            agentwatch::demo::agent::run(&args)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Check { config } => {
            return match Config::load(&config) {
                Ok(c) => {
                    // The daemon refuses hostname rules it cannot resolve: so does check.
                    if c.agents.iter().any(|a| !a.hostnames.is_empty())
                        && let Err(e) =
                            agentwatch::dns::Settings::upstream_from(c.daemon.dns_upstream)
                    {
                        println!("{}: {e}", config.display());
                        return Ok(ExitCode::FAILURE);
                    }
                    // The daemon refuses a config whose secrets it cannot read, or that others
                    // may read: so does check (as the daemon's user, it reads them the same way).
                    let mut bad = false;
                    let mut loaded = std::collections::BTreeMap::new();
                    for (name, source) in &c.secrets {
                        match agentwatch::gateway::secrets::load(name, source) {
                            Ok(s) => {
                                loaded.insert(name.clone(), s);
                            }
                            Err(e) => {
                                println!("{}: {e}", config.display());
                                bad = true;
                            }
                        }
                    }
                    // And each holds what its scopes' `auth` sends (an AWS key pair).
                    for a in &c.agents {
                        for api in &a.apis {
                            if let Some(s) = loaded.get(&api.secret)
                                && let Err(e) = agentwatch::gateway::scope::secret_fits(api, s)
                            {
                                println!("{}: agent `{}` {e}", config.display(), a.name);
                                bad = true;
                            }
                        }
                    }
                    if bad {
                        return Ok(ExitCode::FAILURE);
                    }
                    println!("{}: ok ({} agent(s))", config.display(), c.agents.len());
                    for a in c.agents.iter().filter(|a| a.run_as.is_root()) {
                        println!(
                            "  warning: agent `{}` runs as root (user = \"root\"): it keeps root's \
                             file access and CAP_KILL, so it can stop the daemon, remove its \
                             pins and rewrite its config and trail; the control socket still \
                             refuses it and the escape guards still hold. Without `user`, it \
                             gets a uid of its own",
                            a.name
                        );
                    }
                    // What the guards do here depends on the kernel: say it before a reload.
                    let modes = agentwatch::files::modes(agentwatch::bpf::load::bpf_lsm_active());
                    for (key, used) in [
                        ("files", c.agents.iter().any(|a| a.files.is_some())),
                        (
                            "exec_allow",
                            c.agents.iter().any(|a| a.exec_allow.is_some()),
                        ),
                        ("packet_sockets", !c.agents.is_empty()),
                        ("tamper", c.agents.iter().any(|a| a.run_as.is_root())),
                    ] {
                        if used {
                            println!(
                                "  {key} on this host: {}",
                                modes[key].as_str().unwrap_or("?")
                            );
                        }
                    }
                    if c.agents.iter().any(|a| a.run_as.is_root())
                        && !agentwatch::cgroup::nsdelegate()
                    {
                        println!(
                            "  cgroup2 on this host: no nsdelegate: an agent with user = \"root\" \
                             can write the daemon's pid into its own cgroup.procs; the writer is \
                             killed and the daemon moves itself back within a second, but one put \
                             in a frozen cgroup stays frozen (mount cgroup2 with nsdelegate, as \
                             systemd does)"
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            };
        }
        Cmd::Audit {
            command: AuditCmd::Verify { paths },
        } => {
            let report = agentwatch::audit::verify::verify(&paths)?;
            print!("{report}");
            return Ok(if report.intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::Launch { agent, cmd } => match agentwatch::launch::launch(&socket, &agent, &cmd)? {},
        Cmd::Status { agent, rules, json } => {
            let mut data = ask(&socket, Request::Status { rules })?;
            if let Some(name) = &agent
                && let Some(rows) = data["agents"].as_array_mut()
            {
                rows.retain(|r| r["name"].as_str() == Some(name.as_str()));
                if rows.is_empty() {
                    anyhow::bail!("unknown agent `{name}`");
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                print_status(&data);
                if rules {
                    print_rules(&data);
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Learn {
            agent,
            widen_v4,
            widen_v6,
            json,
        } => {
            let data = ask(
                &socket,
                Request::Learn {
                    agent,
                    widen_v4,
                    widen_v6,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                let proposal: agentwatch::learn::Proposal = serde_json::from_value(data)
                    .context("the daemon's proposal is not what this client understands")?;
                print!("{}", proposal.to_toml());
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Freeze { agent } => Request::Freeze { agent },
        Cmd::Thaw { agent } => Request::Thaw { agent },
        Cmd::Kill { agent } => Request::Kill { agent },
        Cmd::Approve {
            agent,
            keep_baseline,
            call,
        } => Request::Approve {
            agent,
            keep_baseline,
            call,
        },
        Cmd::Deny { agent, call } => Request::Deny { agent, call },
        Cmd::Reload => Request::Reload,
        Cmd::Extend { agent, duration } => {
            if duration < Duration::from_secs(1) {
                anyhow::bail!("extend by at least 1s");
            }
            Request::Extend {
                agent,
                seconds: duration.as_secs(),
            }
        }
    };
    let what = describe(&request);
    let data = ask(&socket, request)?;
    match data.get("processes") {
        Some(n) => println!("{what}: done ({n} process(es))"),
        None => println!("{what}: done"),
    }
    if let Some(until) = data.get("until").and_then(Value::as_str) {
        println!("egress lease open until {until}");
    }
    if let Some(changes) = data.get("changes").and_then(Value::as_str) {
        println!(
            "changes: {}",
            if changes.is_empty() { "none" } else { changes }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(r: &Request) -> String {
    match r {
        Request::Freeze { agent } => format!("freeze {agent}"),
        Request::Thaw { agent } => format!("thaw {agent}"),
        Request::Kill { agent } => format!("kill {agent}"),
        Request::Approve {
            agent,
            call: Some(id),
            ..
        } => format!("approve {agent} call {id}"),
        Request::Approve { agent, .. } => format!("approve {agent}"),
        Request::Deny { agent, call } => format!("deny {agent} call {call}"),
        Request::Reload => "reload".into(),
        Request::Status { .. } => "status".into(),
        Request::Learn { agent, .. } => format!("learn {agent}"),
        Request::Launch { agent } => format!("launch {agent}"),
        Request::Recent { .. } => "recent audit lines".into(),
        Request::Extend { agent, .. } => format!("extend {agent}"),
    }
}

/// Sends `request`; a refusal becomes an error with the daemon's message.
fn ask(socket: &std::path::Path, request: Request) -> Result<Value> {
    // Kill waits for the whole tree to die; leave it room.
    let response = control::call(socket, &request, Duration::from_secs(30))?;
    response.into_result().map_err(anyhow::Error::msg)
}

/// Each agent's rules with the calls each admitted; a rule that admitted none is marked.
fn print_rules(data: &Value) {
    for r in data["agents"].as_array().into_iter().flatten() {
        println!("\n{}: egress rules", r["name"].as_str().unwrap_or("?"));
        let rules = r["rules"].as_array().cloned().unwrap_or_default();
        if rules.is_empty() {
            println!("  (none: every call is denied)");
        }
        let width = rules
            .iter()
            .filter_map(|x| x["rule"].as_str())
            .map(str::len)
            .max()
            .unwrap_or(0);
        for x in rules {
            let hits = x["hits"].as_u64().unwrap_or(0);
            println!(
                "  {:<width$}  {:>10}{}",
                x["rule"].as_str().unwrap_or("?"),
                hits,
                if hits == 0 { "  unused" } else { "" }
            );
        }
        if r["rule_hits_lost"].as_u64().is_some_and(|n| n > 0) {
            println!(
                "  ({} admitted call(s) could not be counted per rule: the kernel's map was full)",
                r["rule_hits_lost"]
            );
        }
    }
}

fn print_status(data: &Value) {
    let rows = data["agents"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no agents");
        return;
    }
    println!(
        "{:<20} {:<8} {:>6} {:>10} {:>8} {:>8} {:>10} {:>10} {:<9} {:>7} {:>9}  CGROUP",
        "AGENT",
        "STATE",
        "PROCS",
        "ALLOWED",
        "DENIED",
        "CAPPED",
        "CONN/S",
        "BASE/S",
        "BREAKER",
        "ESCAPES",
        "DNS_DENY"
    );
    for r in rows {
        let num = |v: &Value| v.as_f64().map_or("-".to_owned(), |f| format!("{f:.1}"));
        // As text first: a JSON value's Display ignores width and alignment.
        let count = |v: &Value| v.as_u64().map_or("-".to_owned(), |n| n.to_string());
        let escapes: u64 = r["escape_attempts"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        println!(
            "{:<20} {:<8} {:>6} {:>10} {:>8} {:>8} {:>10} {:>10} {:<9} {:>7} {:>9}  {}",
            r["name"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            count(&r["processes"]),
            count(&r["allowed"]),
            count(&r["denied"]),
            count(&r["capped"]),
            num(&r["rates"]["connects"]),
            num(&r["baselines"]["connects"]),
            r["breaker"].as_str().unwrap_or("?"),
            escapes,
            count(&r["dns"]["denied"]),
            r["cgroup"].as_str().unwrap_or("?"),
        );
        if let Some(files) = r["files"].as_str() {
            println!("  files: {} denied, {files}", count(&r["files_denied"]));
        }
        // Nothing stops a process holding these from switching agentwatch off: say so.
        for p in r["privileged_processes"].as_array().into_iter().flatten() {
            println!(
                "  warning: pid {} holds {}",
                p["pid"],
                p["capabilities"]
                    .as_array()
                    .map(|c| c
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_default()
            );
        }
    }
}
