//! `agentwatch run`: guard the configured agents until told to stop.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    agent::Agents,
    audit::{self, Audit},
    cgroup::{self, Cgroup},
    config::{Agent, Config},
    egress,
    events::{self, Event},
};

/// Where the config came from, for the first log line.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefault,
}

/// A guarded agent's cgroup and whether the daemon made it (and so may remove it).
struct Placed {
    name: String,
    cgroup: Cgroup,
    created: bool,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config, source: ConfigSource) -> Result<()> {
    match &source {
        ConfigSource::File(p) => {
            tracing::info!(config = %p.display(), agents = config.agents.len(), "agentwatch starting")
        }
        ConfigSource::EmbeddedDefault => tracing::info!(
            "agentwatch starting on its embedded default config (no config file given and none at {}): no agents",
            crate::config::DEFAULT_PATH
        ),
    }
    let mount = cgroup::cgroup2_mount()?;
    tracing::info!(mount = %mount.display(), "cgroup2 found");
    let audit = Audit::open(&config.daemon.audit_log).with_context(|| {
        format!(
            "opening the audit log {}",
            config.daemon.audit_log.display()
        )
    })?;
    tracing::info!(audit_log = %audit::describe(&config.daemon.audit_log).display(), "audit trail open");
    let mut agents = Agents::load().context("loading the kernel programs")?;
    // The parent of created agent cgroups is removed at exit only if this daemon made it.
    let parent = mount.join(&config.daemon.cgroup_parent);
    let parent_existed = parent.exists();
    let mut placed = Vec::new();
    let result = guard_all(&config, &mount, &mut agents, &audit, &mut placed);
    let result = match result {
        Ok(()) => serve(&mut agents, &audit).await,
        Err(e) => Err(e),
    };
    shutdown(&mut agents, &audit, placed);
    if !parent_existed && parent.exists() {
        match Cgroup::open(&parent).and_then(|p| p.populated().map(|busy| (p, busy))) {
            Ok((p, false)) => {
                if let Err(e) = p.remove() {
                    tracing::warn!("removing {}: {e}", parent.display());
                }
            }
            Ok((_, true)) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    result
}

fn guard_all(
    config: &Config,
    mount: &std::path::Path,
    agents: &mut Agents,
    audit: &Audit,
    placed: &mut Vec<Placed>,
) -> Result<()> {
    for agent in &config.agents {
        let p = guard_one(agent, mount, agents)?;
        let counters_note = agents.info(&agent.name).map(|i| i.id).unwrap_or_default();
        tracing::info!(agent = %agent.name, cgroup = %p.cgroup.path().display(), id = counters_note, rules = agent.egress.len(), "agent guarded");
        audit.record(
            &agent.name,
            "agent_guarded",
            json!({
                "cgroup": p.cgroup.path().display().to_string(),
                "rules": agent.egress.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
        )?;
        placed.push(p);
    }
    Ok(())
}

fn guard_one(agent: &Agent, mount: &std::path::Path, agents: &mut Agents) -> Result<Placed> {
    let path = mount.join(&agent.cgroup);
    let (cgroup, created) = if agent.adopted {
        let cg = Cgroup::open(&path).with_context(|| {
            format!(
                "agent `{}` adopts cgroup {}, which does not exist",
                agent.name,
                path.display()
            )
        })?;
        (cg, false)
    } else {
        Cgroup::create(&path)
            .with_context(|| format!("creating the cgroup of agent `{}`", agent.name))?
    };
    let rules = egress::compile(&agent.egress)?;
    agents
        .guard(&agent.name, cgroup.clone(), rules)
        .with_context(|| format!("guarding agent `{}`", agent.name))?;
    Ok(Placed {
        name: agent.name.clone(),
        cgroup,
        created,
    })
}

async fn serve(agents: &mut Agents, audit: &Audit) -> Result<()> {
    let ring = agents
        .take_events()
        .context("the event ring buffer was already taken")?;
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always reports that same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut lost_seen = agents.kernel().events_lost()?;
    tracing::info!("agentwatch running");
    loop {
        tokio::select! {
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), agents, audit);
                guard.clear_ready();
            }
            _ = tick.tick() => {
                // The kernel counts what it could not queue; say so, never drop it silently.
                let lost = agents.kernel().events_lost()?;
                if lost > lost_seen {
                    tracing::warn!(lost = lost - lost_seen, "event ring buffer was full: events lost");
                    audit.record("", "events_lost", json!({"count": lost - lost_seen, "total": lost}))?;
                    lost_seen = lost;
                }
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, agents: &Agents, audit: &Audit) {
    while let Some(item) = ring.next() {
        match events::decode(&item) {
            Event::Egress(e) => {
                let agent = agents.name_of(e.agent_id).unwrap_or("");
                let r = audit.record_at(
                    events::wall_time(e.ts_ns),
                    agent,
                    e.kind,
                    json!({
                        "pid": e.pid,
                        "tid": e.tid,
                        "comm": e.comm,
                        "proto": e.proto,
                        "dest": e.dest.to_string(),
                        "hook": e.hook,
                    }),
                );
                if let Err(err) = r {
                    tracing::error!("writing the audit trail: {err}");
                }
            }
            Event::Unknown { kind, len } => {
                tracing::warn!(kind, len, "unknown event kind from the kernel");
            }
        }
    }
}

/// Detaches every agent and removes the cgroups the daemon created, when empty. An agent whose
/// processes still run keeps its cgroup (they are not killed) and is reported.
fn shutdown(agents: &mut Agents, audit: &Audit, placed: Vec<Placed>) {
    for p in placed {
        if let Err(e) = agents.unguard(&p.name) {
            tracing::error!(agent = %p.name, "detaching: {e}");
        }
        let _ = audit.record(&p.name, "agent_unguarded", json!({}));
        match p.cgroup.populated() {
            Ok(true) => tracing::warn!(agent = %p.name, cgroup = %p.cgroup.path().display(),
                "agent processes keep running, no longer guarded"),
            Ok(false) if p.created => {
                if let Err(e) = p.cgroup.remove() {
                    tracing::warn!(agent = %p.name, "removing its cgroup: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(agent = %p.name, "{e}"),
        }
    }
    tracing::info!("agentwatch stopped");
}
