//! The control socket: one function per request of the CLI.

use std::{sync::Arc, time::Duration};

use agentwatch_common::{AGENT_FLAG_DENY_ALL, AGENT_FLAG_KILLED, AGENT_FLAG_TRIPPED};
use anyhow::Result;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::{Shared, State, lock};
use crate::{
    cgroup::Cgroup,
    config::LeaseAction,
    control::{self, Request, Response},
    uids::RunAs,
};

/// How long kill and freeze wait for the kernel before they report failure.
const KILL_WAIT: Duration = Duration::from_secs(10);
pub(super) const FREEZE_WAIT: Duration = Duration::from_secs(5);
/// A peer has this long to send its request line, and again to take the answer: one that
/// stalls is dropped, and holds nothing but its own connection meanwhile.
pub(super) const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once. Beyond it a new peer is told the daemon is busy and dropped, so
/// no number of idle peers can use up the daemon's file descriptors.
pub(super) const MAX_CONNECTIONS: usize = 4096;
/// Most lines a `Recent` request returns, and how far back from the trail's end it reads.
const RECENT_MAX: usize = 1000;
const RECENT_BYTES: u64 = 512 * 1024;

pub(super) async fn serve(
    state: Shared,
    listener: UnixListener,
    admin_gid: Option<u32>,
) -> Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            // The peer connected before this instant (see crate::peer on kernels without
            // SO_PEERPIDFD).
            Ok((stream, _)) => (stream, crate::peer::boot_ticks()),
            Err(e) => {
                // Out of file descriptors (or memory): the listener itself is fine. Serving
                // stops for a moment, not for good.
                tracing::warn!("control socket: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (stream, accepted) = stream;
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = answer(stream, &Response::err("busy: too many control connections")).await;
            });
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            if let Err(e) = control_connection(state, stream, admin_gid, accepted).await {
                tracing::debug!("control connection: {e:#}");
            }
            drop(slot);
        });
    }
}

/// Writes one response line to `stream` within [`PEER_TIMEOUT`].
async fn answer(mut stream: UnixStream, response: &Response) -> Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    tokio::time::timeout(PEER_TIMEOUT, stream.write_all(&line)).await??;
    Ok(())
}

async fn control_connection(
    state: Shared,
    mut stream: UnixStream,
    admin_gid: Option<u32>,
    accepted: u64,
) -> Result<()> {
    use std::os::fd::AsFd as _;
    // The request line first, bounded in size and time: a peer that says nothing costs a task
    // here, not a judgement, so a human's request is not queued behind a thousand idle peers'
    // (nothing a peer asks is acted on before it is judged below). Bytes, not a String: a
    // request that is not UTF-8 gets "bad request" like any other malformed one.
    let mut line = Vec::new();
    let said = {
        let mut reader = BufReader::new((&mut stream).take(control::MAX_REQUEST as u64));
        match tokio::time::timeout(PEER_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Ok(read) => {
                read?;
                true
            }
            Err(_) => false,
        }
    };
    // Judged from the kernel (crate::peer): the process is the one that was connected at the
    // accept (its pidfd, or its start time against the accept's), so judging after the read
    // is as race-free as before it. A peer that cannot be judged is refused.
    let peer = match crate::peer::identify(stream.as_fd(), accepted) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("control socket: refused a peer that could not be judged: {e}");
            return answer(stream, &Response::err(format!("permission denied: {e}"))).await;
        }
    };
    // The state's lock is a blocking one: taken on a blocking thread, never on the runtime's
    // workers, which a long reload holding it would otherwise stall one by one.
    let (inside, peer) = {
        let st = Arc::clone(&state);
        tokio::task::spawn_blocking(move || (lock(&st).agent_holding(&peer), peer)).await?
    };
    if let Some(agent) = inside {
        // The guarded never steers the guard, root or not: what it asked (or that it asked
        // nothing in time) goes in the trail.
        let request = refused_request(&line);
        let message = format!(
            "refused: this process (pid {}) is inside agent `{agent}`'s cgroup, and an agent \
             never steers its guard; a human runs agentwatch from outside every agent",
            peer.pid
        );
        let st = Arc::clone(&state);
        tokio::task::spawn_blocking(move || {
            let mut s = lock(&st);
            s.refuse_control(&agent, &peer, request);
            s.audit.sync();
        })
        .await?;
        return answer(stream, &Response::err(message)).await;
    }
    let (uid, gid) = (peer.uid, peer.gid);
    if !control::authorized(uid, gid, i32::try_from(peer.pid).ok(), admin_gid) {
        tracing::warn!(
            uid,
            gid,
            "control socket: refused a peer that is not root or an admin"
        );
        let refusal = Response::err(format!(
            "permission denied: uid {uid} is not root{}",
            if admin_gid.is_some() {
                " or in the admin group"
            } else {
                ""
            }
        ));
        return answer(stream, &refusal).await;
    }
    if !said {
        tracing::debug!(
            uid,
            "control socket: dropped a peer that sent no request line in time"
        );
        return Ok(());
    }
    let response = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => {
            tracing::debug!(?req, uid, "control request");
            let state = Arc::clone(&state);
            tokio::task::spawn_blocking(move || {
                let mut s = lock(&state);
                let response = s.handle(req, uid);
                // The command's audit line is in the trail when the command returns.
                s.audit.sync();
                response
            })
            .await?
        }
        Err(e) => Response::err(format!("bad request: {e}")),
    };
    answer(stream, &response).await
}

/// What a refused peer asked, for its audit line: the request as the CLI sends it when it
/// is one (cut to its command when long: the agent chooses its size), else `"unparsed"`.
fn refused_request(line: &[u8]) -> Value {
    match serde_json::from_slice::<Request>(line) {
        Ok(req) => {
            let v = serde_json::to_value(&req).unwrap_or(Value::Null);
            if v.to_string().len() <= 512 {
                v
            } else {
                json!({ "cmd": v["cmd"], "cut": true })
            }
        }
        Err(_) => json!("unparsed"),
    }
}

/// At most this many `control_refused` lines per agent and second; beyond it they are counted,
/// and the next line written says how many were not.
const REFUSALS_PER_SECOND: u32 = 10;

/// The written and unwritten refusals of one agent in the current second.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Refusals {
    /// All refusals since the daemon started (status, /metrics).
    pub total: u64,
    second: u64,
    written: u32,
    unwritten: u64,
}

impl State {
    /// The agent whose cgroup holds `peer` (its own or one below it). A process under the
    /// agents' parent cgroup but in no configured agent (one removed from the config
    /// meanwhile) is agent ground too: named "" then.
    pub(super) fn agent_holding(&self, peer: &crate::peer::Peer) -> Option<String> {
        self.agent_at(&peer.cgroup_path(&self.mount))
    }

    /// The agent whose cgroup is `at` (absolute) or holds it; "" for agent ground of no
    /// configured agent (see [`Self::agent_holding`]).
    pub(super) fn agent_at(&self, at: &std::path::Path) -> Option<String> {
        for name in self.agents.names() {
            if let Some(cg) = self.agents.cgroup(name)
                && crate::peer::inside(at, cg.path())
            {
                return Some(name.to_owned());
            }
        }
        crate::peer::inside(at, &self.mount.join(&self.config.daemon.cgroup_parent))
            .then(String::new)
    }

    /// A request from inside agent `agent`: audited `control_refused`, counted as an escape
    /// attempt, and acted on like one (its breaker trips on signal `tamper`).
    pub(super) fn refuse_control(&mut self, agent: &str, peer: &crate::peer::Peer, request: Value) {
        tracing::warn!(
            agent,
            pid = peer.pid,
            uid = peer.uid,
            comm = %peer.comm,
            %request,
            "control socket: refused a request from inside an agent"
        );
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let r = self.control_refusals.entry(agent.to_owned()).or_default();
        r.total += 1;
        if r.second != second {
            r.second = second;
            r.written = 0;
        }
        if r.written >= REFUSALS_PER_SECOND {
            r.unwritten += 1;
        } else {
            r.written += 1;
            let mut fields = json!({
                "pid": peer.pid,
                "uid": peer.uid,
                "comm": peer.comm,
                "cgroup": peer.cgroup,
                "request": request,
                "judged_by": peer.method,
            });
            if r.unwritten > 0 {
                fields["not_written_before"] = json!(r.unwritten);
                r.unwritten = 0;
            }
            self.audit_agent(agent, "control_refused", fields);
        }
        if !agent.is_empty() {
            self.trip_on(agent, "tamper");
        }
    }

    fn handle(&mut self, req: Request, uid: u32) -> Response {
        let result = match req {
            Request::Status { rules } => Ok(json!({
                "agents": self.status(rules),
                "guards": crate::files::modes(self.agents.kernel().files.lsm()),
                "gateway": self.gateway.status(),
            })),
            Request::Reload => self
                .reload_from_disk()
                .map(|changes| json!({ "changes": changes })),
            Request::Freeze { agent } => self.freeze(&agent, true, uid),
            Request::Thaw { agent } => self.freeze(&agent, false, uid),
            Request::Kill { agent } => self.kill(&agent, uid),
            Request::Approve {
                agent,
                call: Some(id),
                ..
            } => self.decide_call(&agent, id, true, uid),
            Request::Approve {
                agent,
                keep_baseline,
                call: None,
            } => self.approve(&agent, keep_baseline, uid),
            Request::Deny { agent, call } => self.decide_call(&agent, call, false, uid),
            Request::Launch { agent } => self.launch(&agent),
            Request::Recent { lines } => Ok(json!({ "lines": self.recent(lines) })),
            Request::Extend { agent, seconds } => self.extend(&agent, seconds, uid),
            Request::Learn {
                agent,
                widen_v4,
                widen_v6,
            } => self.learn(&agent, widen_v4, widen_v6),
        };
        match result {
            Ok(data) => Response::ok(data),
            Err(e) => Response::err(e),
        }
    }

    /// The trail's last `n` lines (at most [`RECENT_MAX`]), parsed, oldest first; none when the
    /// trail goes to stdout. Read from the file's end, so a large trail costs no more.
    fn recent(&self, n: usize) -> Vec<Value> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let path = &self.config.daemon.audit_log;
        let Ok(mut file) = std::fs::File::open(path) else {
            return Vec::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        let start = len.saturating_sub(RECENT_BYTES);
        let mut tail = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut tail).is_err() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&tail);
        let mut lines: Vec<&str> = text.lines().collect();
        // The first line read may be cut in the middle unless the read began at the start.
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        let skip = lines.len().saturating_sub(n.min(RECENT_MAX));
        lines[skip..]
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub(super) fn cgroup_of(&self, agent: &str) -> Result<Cgroup, String> {
        self.agents.cgroup(agent).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.agents.names().collect();
            format!(
                "unknown agent `{agent}` (guarded: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })
    }

    fn freeze(&mut self, agent: &str, frozen: bool, uid: u32) -> Result<Value, String> {
        self.leave_agents()?;
        let cg = self.cgroup_of(agent)?;
        cg.set_frozen(frozen).map_err(|e| e.to_string())?;
        cg.wait_frozen(frozen, FREEZE_WAIT)
            .map_err(|e| e.to_string())?;
        let kind = if frozen { "frozen" } else { "thawed" };
        let processes = cg.all_pids().map(|p| p.len()).unwrap_or(0);
        self.audit_agent(
            agent,
            kind,
            json!({ "actor_uid": uid, "processes": processes }),
        );
        tracing::info!(agent, actor_uid = uid, processes, "{kind}");
        Ok(json!({ "state": kind, "processes": processes }))
    }

    /// The kill switch: egress denied in the kernel first (nothing more leaves, even from a
    /// process that survives a moment), then the whole tree killed at once.
    fn kill(&mut self, agent: &str, uid: u32) -> Result<Value, String> {
        let n = self.kill_tree(agent, AGENT_FLAG_KILLED)?;
        self.audit_agent(agent, "killed", json!({ "actor_uid": uid, "processes": n }));
        tracing::warn!(agent, actor_uid = uid, processes = n, "killed");
        Ok(json!({ "processes": n }))
    }

    /// Finishes kill switches an earlier daemon did not (it died after revoking egress, which
    /// held all along, and before killing the tree): a killed agent has no process left.
    pub(super) fn finish_kills(&mut self) {
        let names: Vec<String> = self.agents.names().map(str::to_owned).collect();
        for name in names {
            let killed = self
                .agents
                .info(&name)
                .is_some_and(|i| i.state.flags & AGENT_FLAG_KILLED != 0);
            let left = self
                .agents
                .cgroup(&name)
                .and_then(|cg| cg.all_pids().ok())
                .map_or(0, |p| p.len());
            if !killed || left == 0 {
                continue;
            }
            match self.kill_tree(&name, AGENT_FLAG_KILLED) {
                Ok(n) => {
                    tracing::warn!(agent = %name, processes = n, "finished a kill switch an earlier daemon did not");
                    self.audit_agent(
                        &name,
                        "killed",
                        json!({ "actor_uid": null, "processes": n, "finished_after_restart": true }),
                    );
                }
                Err(e) => {
                    tracing::error!(agent = %name, "finishing an interrupted kill switch: {e}")
                }
            }
        }
    }

    /// Egress denied in the kernel first (nothing more leaves, even from a process that
    /// survives a moment), then the whole tree killed at once. Returns how many processes died.
    pub(super) fn kill_tree(&mut self, agent: &str, extra_flags: u32) -> Result<usize, String> {
        self.leave_agents()?;
        let cg = self.cgroup_of(agent)?;
        self.agents
            .update_flags(agent, AGENT_FLAG_DENY_ALL | extra_flags, 0)
            .map_err(|e| e.to_string())?;
        crate::crash::point("kill.denied");
        // Its tokens die and its calls through the gateway are cut with its processes.
        let revoked = self.gateway.revoke(agent, "killed");
        if revoked > 0 {
            tracing::info!(agent, tokens = revoked, "gateway tokens revoked");
        }
        self.sync_gateway(agent);
        let before = cg.all_pids().map_err(|e| e.to_string())?;
        cg.kill().map_err(|e| e.to_string())?;
        cg.wait_empty(KILL_WAIT).map_err(|e| e.to_string())?;
        // A frozen agent dies frozen; leave the cgroup thawed for whatever is approved next.
        let _ = cg.set_frozen(false);
        Ok(before.len())
    }

    /// Reopens agent `agent`'s egress lease for `seconds` from now. An agent its lease froze is
    /// thawed; one its lease killed stays killed until approved (a kill is never undone by
    /// extending alone).
    fn extend(&mut self, agent: &str, seconds: u64, uid: u32) -> Result<Value, String> {
        if seconds == 0 {
            return Err("extend by at least 1s".to_owned());
        }
        let cg = self.cgroup_of(agent)?;
        // Whether the expiry being reopened was acted on, read before the deadline moves.
        let reopened = self.agents.lease_expiry_audited(agent);
        let deadline = self
            .agents
            .extend_lease(agent, Duration::from_secs(seconds))
            .map_err(|e| e.to_string())?;
        self.sync_gateway(agent);
        let action = self.config.agent(agent).map(|a| a.lease_action);
        if reopened && action == Some(LeaseAction::Freeze) {
            cg.set_frozen(false).map_err(|e| e.to_string())?;
        }
        let until = crate::audit::rfc3339(crate::events::wall_time(deadline));
        tracing::info!(agent, actor_uid = uid, %until, "egress lease extended");
        self.audit_agent(
            agent,
            "lease_extended",
            json!({ "until": until, "seconds": seconds, "actor_uid": uid }),
        );
        Ok(json!({ "until": until, "seconds_left": seconds }))
    }

    /// The least-privilege policy proposed for `agent` from what the kernel recorded.
    fn learn(
        &self,
        agent: &str,
        widen_v4: Option<u8>,
        widen_v6: Option<u8>,
    ) -> Result<Value, String> {
        self.cgroup_of(agent)?;
        if widen_v4.is_some_and(|l| l > 32) || widen_v6.is_some_and(|l| l > 128) {
            return Err("--widen-v4 takes 0-32, --widen-v6 0-128".to_owned());
        }
        let config = self
            .config
            .agent(agent)
            .ok_or_else(|| format!("agent `{agent}` is not in the config in force"))?;
        let info = self.agents.info(agent).ok_or("agent vanished")?;
        let learn = self.agents.kernel().learn();
        let observed = if config.learn {
            learn.observed(info.id)
        } else {
            crate::learn::Observed::default()
        };
        let lost = self
            .agents
            .counters(agent)
            .map(|c| c.learn_lost)
            .unwrap_or(0);
        let proposal = crate::learn::propose(
            config,
            &learn.hits_of(info.id),
            &observed,
            lost,
            crate::learn::Widen {
                v4: widen_v4,
                v6: widen_v6,
            },
            crate::learn::wall,
        );
        let mut proposal = proposal;
        (proposal.apis, proposal.unused_apis) =
            crate::learn::propose_apis(config, &self.gateway.learned(agent));
        serde_json::to_value(&proposal).map_err(|e| e.to_string())
    }

    fn approve(&mut self, agent: &str, keep_baseline: bool, uid: u32) -> Result<Value, String> {
        let cg = self.cgroup_of(agent)?;
        let info = self.agents.info(agent).ok_or("agent vanished")?;
        let frozen = cg.frozen().map_err(|e| e.to_string())?;
        let held =
            info.state.flags & (AGENT_FLAG_KILLED | AGENT_FLAG_TRIPPED | AGENT_FLAG_DENY_ALL);
        if held == 0 && !frozen {
            return Err(format!(
                "agent `{agent}` is not tripped, killed or frozen: nothing to approve"
            ));
        }
        self.agents
            .update_flags(
                agent,
                0,
                AGENT_FLAG_KILLED | AGENT_FLAG_TRIPPED | AGENT_FLAG_DENY_ALL,
            )
            .map_err(|e| e.to_string())?;
        self.sync_gateway(agent);
        // The windows restart from the counts of this instant: what the agent did before the
        // approval is never judged again.
        let counts = super::behaviour::signal_counts(
            &self.agents.counters(agent).map_err(|e| e.to_string())?,
            self.gateway.api_calls(agent),
        );
        if let Some(m) = self.monitors.get_mut(agent) {
            m.approve(std::time::Instant::now(), counts, keep_baseline);
        }
        if frozen {
            cg.set_frozen(false).map_err(|e| e.to_string())?;
            cg.wait_frozen(false, FREEZE_WAIT)
                .map_err(|e| e.to_string())?;
        }
        self.audit_agent(
            agent,
            "approved",
            json!({ "actor_uid": uid, "keep_baseline": keep_baseline }),
        );
        tracing::info!(agent, actor_uid = uid, "approved");
        Ok(json!({ "state": "running" }))
    }

    /// A human's decision on a held API call: audited (`api_decided`, with who), then the call
    /// goes on or gets 403.
    fn decide_call(
        &mut self,
        agent: &str,
        id: u64,
        approve: bool,
        uid: u32,
    ) -> Result<Value, String> {
        let call = self.gateway.decide(agent, id, approve)?;
        self.audit_agent(
            agent,
            "api_decided",
            json!({
                "api": call.scope,
                "call": id,
                "method": call.method,
                "path": call.path,
                "digest": call.digest,
                "decision": if approve { "approved" } else { "refused" },
                "actor_uid": uid,
            }),
        );
        Ok(json!({ "call": id, "decision": if approve { "approved" } else { "refused" } }))
    }

    fn launch(&self, agent: &str) -> Result<Value, String> {
        let cg = self.cgroup_of(agent)?;
        let flags = self.agents.info(agent).map_or(0, |i| i.state.flags);
        if flags & AGENT_FLAG_KILLED != 0 {
            return Err(format!(
                "agent `{agent}` was killed; `agentwatch approve {agent}` first"
            ));
        }
        if flags & AGENT_FLAG_TRIPPED != 0 {
            return Err(format!(
                "agent `{agent}`'s breaker is open; `agentwatch approve {agent}` first"
            ));
        }
        let run_as = self
            .config
            .agent(agent)
            .map(|a| a.run_as.clone())
            .ok_or_else(|| format!("agent `{agent}` is not in the config in force"))?;
        let cgroup = cg.path().display().to_string();
        // A token per API scope for this launch (worthless outside this agent's cgroup).
        let env: Vec<[String; 2]> = self
            .gateway
            .launch(agent)?
            .into_iter()
            .map(|(k, v)| [k, v])
            .collect();
        let mut reply = match run_as {
            RunAs::Root => json!({ "cgroup": cgroup, "user": "root" }),
            RunAs::User(u) => json!({ "cgroup": cgroup, "user": u }),
            RunAs::Own { uid } => {
                // A uid of the user database is someone's: an agent must not share it.
                if let Some(owner) = crate::uids::user_of(uid) {
                    return Err(format!(
                        "agent `{agent}`'s own uid {uid} belongs to user `{owner}` on this \
                         host; give daemon.agent_uids a range ({}) no user has a uid in, or \
                         give the agent a `user`",
                        self.config.daemon.agent_uids
                    ));
                }
                let home = crate::uids::make_home(&self.config.daemon.agent_homes, agent, uid)
                    .map_err(|e| {
                        format!(
                            "making agent `{agent}`'s home in {}: {e}",
                            self.config.daemon.agent_homes.display()
                        )
                    })?;
                json!({
                    "cgroup": cgroup,
                    "user": null,
                    "uid": uid,
                    "gid": uid,
                    "home": home.display().to_string(),
                })
            }
        };
        reply["env"] = json!(env);
        Ok(reply)
    }
}
