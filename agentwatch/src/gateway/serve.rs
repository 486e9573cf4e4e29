//! The gateway's front: one plain-HTTP listener on loopback for every agent's scopes.
//!
//! An agent's scope `NAME` is at `http://LISTEN/NAME/`; the rest of the path is the API's. For
//! each connection the gateway asks the kernel (socket diagnostics) which cgroup made the
//! calling socket: that, not anything the agent sends, says which agent calls. Then each call:
//!
//! 1. the token must be one given to that agent for that scope (else 401: `refused`, or
//!    `revoked` for a token that was valid once);
//! 2. the agent's breaker must not deny it (403 `denied`);
//! 3. its method and canonical path must match the scope's `allow` (400/403 `denied`);
//! 4. it takes a place in the scope's limits (429 `limited`, with Retry-After);
//! 5. a call `approve` names waits for a human (`api_held`), bound to a digest of its method,
//!    path and body; approved it goes on (`approved`), denied or timed out it gets 403
//!    (`refused`);
//! 6. every credential it carried is removed, the secret injected, and it goes upstream with
//!    its body streamed; the answer comes back as it arrives (server-sent events included).
//!    A call that fails upstream is answered 502 and keeps its place in the limits.
//!
//! Every call is audited (`api_call`) when its answer has been sent or the agent hung up.
//! What the gateway holds is bounded, so that no caller, agent or any local process, can take
//! the daemon's descriptors or memory: connections in all, per agent and from processes that
//! are no agent's (those get one answer per connection), the time a request's head may take
//! and a connection may idle, and the lines a second that outsiders' calls write.
//! Revoking an agent (kill switch, lease end, removed from the config) drops its tokens and cuts
//! every connection it has to the gateway at once, with the upstream streams behind them.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request, Response, StatusCode, Version,
    body::{Frame, Incoming},
    header::{HOST, HeaderValue, RETRY_AFTER},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use super::{
    auth::{self, Presented},
    judge::{Target, first_match},
    limits::ScopeLimits,
    scope::{self, Api},
    secrets::Secret,
    tokens::{Grant, Tokens},
    upstream::{Body, UpstreamClient},
};
use crate::audit::Audit;

/// Decisions as audited and counted (`agentwatch_api_calls_total{decision}`).
pub const DECISIONS: [&str; 6] = [
    "allowed", "approved", "denied", "limited", "refused", "revoked",
];

/// Most bytes of a held call's body kept for the human's decision (and its digest).
const HELD_BODY_MAX: usize = 10 * 1024 * 1024;

/// Calls of one scope, by decision (indexed like [`DECISIONS`]).
#[derive(Debug, Default)]
pub struct ScopeCounts([AtomicU64; 6]);

impl ScopeCounts {
    fn add(&self, decision: &str) {
        if let Some(i) = DECISIONS.iter().position(|d| *d == decision) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (decision, count) for every decision.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        DECISIONS
            .iter()
            .zip(&self.0)
            .map(|(d, c)| (*d, c.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// One scope of one agent, live: what a reload replaces, with the limits and counts it keeps.
pub struct LiveScope {
    pub api: Api,
    secret: Arc<Secret>,
    client: UpstreamClient,
    limits: Arc<Mutex<ScopeLimits>>,
    pub counts: Arc<ScopeCounts>,
    learned: Arc<Mutex<LearnedCalls>>,
}

/// What `learn` proposes a scope's `allow` from: per method and path template (see
/// [`Target::template`]) of the calls the agent made with a valid token, how many the scope's
/// `allow` admitted and refused; and how many calls each configured pattern admitted. Kept
/// across reloads like the counts.
#[derive(Debug, Clone, Default)]
pub struct LearnedCalls {
    /// (method, template) -> (admitted, refused).
    pub calls: BTreeMap<(String, String), (u64, u64)>,
    /// `allow` pattern as written -> calls it admitted (the first that matched).
    pub pattern_hits: BTreeMap<String, u64>,
    /// Calls of templates past [`LEARNED_MAX`]: the proposal may miss some.
    pub lost: u64,
}

/// Templates remembered per scope: an agent that calls ever new paths cannot grow the daemon.
pub const LEARNED_MAX: usize = 1024;

impl LearnedCalls {
    fn record(&mut self, target: &Target, admitted_by: Option<&super::judge::Pattern>) {
        if let Some(p) = admitted_by {
            *self.pattern_hits.entry(p.to_string()).or_default() += 1;
        }
        let key = (target.method.clone(), target.template());
        let full = self.calls.len() >= LEARNED_MAX;
        match self.calls.get_mut(&key) {
            Some(c) => bump(c, admitted_by.is_some()),
            None if full => self.lost += 1,
            None => bump(self.calls.entry(key).or_default(), admitted_by.is_some()),
        }
        fn bump(c: &mut (u64, u64), admitted: bool) {
            if admitted {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
    }
}

/// A scope ready to go live (built before a reload is applied: a bad CA file refuses it whole).
pub struct PreparedScope {
    api: Api,
    secret: Arc<Secret>,
    client: UpstreamClient,
}

impl PreparedScope {
    pub fn new(api: Api, secret: Arc<Secret>, client: UpstreamClient) -> Self {
        Self {
            api,
            secret,
            client,
        }
    }
}

/// A call waiting for a human.
#[derive(Debug, Clone)]
pub struct HeldCall {
    pub id: u64,
    pub agent: String,
    pub scope: String,
    pub method: String,
    pub path: String,
    /// SHA-256 of method, path and body: what the human approves is exactly this call.
    pub digest: String,
    pub body_bytes: usize,
    pub since: std::time::SystemTime,
}

struct Held {
    call: HeldCall,
    decide: oneshot::Sender<bool>,
}

struct LiveAgent {
    cgroup_id: u64,
    cgroup: PathBuf,
    scopes: BTreeMap<String, Arc<LiveScope>>,
    /// The breaker denies its calls.
    denied: bool,
    /// Its egress lease ends then (CLOCK_MONOTONIC ns, the kernel's deadline): calls after it
    /// are refused as `revoked`, and its connections are cut when it comes.
    lease_end: Option<u64>,
    /// Which lease timer is current (an extended lease's old timer does nothing).
    lease_timer: u64,
    /// Bumped to cut every connection of the agent.
    cut: watch::Sender<u64>,
    /// Its connections open (at most [`MAX_AGENT_CONNECTIONS`]).
    connections: Arc<Semaphore>,
}

impl LiveAgent {
    /// Calls made through all its scopes, whatever the decision.
    fn calls(&self) -> u64 {
        self.scopes.values().map(|s| s.counts.total()).sum()
    }
}

/// Connections open at once, in all: far below the descriptors a daemon has.
const MAX_CONNECTIONS: usize = 4096;
/// Connections of one agent: above the thousand a busy agent's connection pools keep, and
/// one agent cannot take every place.
const MAX_AGENT_CONNECTIONS: usize = 1024;
/// Connections of processes that are no agent's: each gets one 401 and is closed.
const MAX_OUTSIDER_CONNECTIONS: usize = 32;
/// A request's head must have arrived this long after the gateway starts reading it, and a
/// keep-alive connection idle this long is closed (hyper's header timer runs while it waits
/// for the next request): a caller that dribbles bytes holds no place for long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// `api_call` lines a second for calls from outside every agent; the rest are counted and the
/// next line written says how many were not (`not_written_before`).
const OUTSIDER_LINES_PER_SECOND: u32 = 10;

/// What the bounds turned away: said by `status` (`gateway`).
struct Shed {
    /// `daemon.audit_rate`: an agent's refused calls written a second (the cap its kernel
    /// denials have).
    agent_rate: u32,
    /// Agents' refused-call lines not written (over `agent_rate`).
    agent_lines_not_written: AtomicU64,
    /// Per agent, the current second's refused-call lines: (its start, written, not written
    /// since the last line).
    agent_seconds: Mutex<BTreeMap<String, (Instant, u32, u64)>>,
    /// Connections closed at once: over [`MAX_CONNECTIONS`] or the caller's own bound.
    connections_refused: AtomicU64,
    /// Outsiders' `api_call` lines not written (over [`OUTSIDER_LINES_PER_SECOND`]).
    lines_not_written: AtomicU64,
    /// The current second's outsider lines: (its start, lines written, not written since the
    /// last line).
    outsider_second: Mutex<Option<(Instant, u32, u64)>>,
}

impl Shed {
    fn new(agent_rate: u32) -> Self {
        Self {
            agent_rate,
            agent_lines_not_written: AtomicU64::new(0),
            agent_seconds: Mutex::new(BTreeMap::new()),
            connections_refused: AtomicU64::new(0),
            lines_not_written: AtomicU64::new(0),
            outsider_second: Mutex::new(None),
        }
    }

    /// May an outsider's call line be written now? Some(lines not written before it).
    fn outsider_line(&self) -> Option<u64> {
        let mut second = lock(&self.outsider_second);
        let taken = take_line(
            second.get_or_insert((Instant::now(), 0, 0)),
            OUTSIDER_LINES_PER_SECOND,
        );
        if taken.is_none() {
            self.lines_not_written.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// May a line of `agent`'s refused call be written now? Some(lines not written before
    /// it). Allowed calls are always written: each reached the upstream.
    fn agent_line(&self, agent: &str) -> Option<u64> {
        let mut seconds = lock(&self.agent_seconds);
        let second = seconds
            .entry(agent.to_owned())
            .or_insert((Instant::now(), 0, 0));
        let taken = take_line(second, self.agent_rate);
        if taken.is_none() {
            self.agent_lines_not_written.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }
}

/// One line of a `rate` a second, from `second` (its start, lines written, not written since
/// the last line): Some(lines not written before this one), or None (counted).
fn take_line(second: &mut (Instant, u32, u64), rate: u32) -> Option<u64> {
    let (start, written, unwritten) = second;
    let now = Instant::now();
    if now.duration_since(*start) >= Duration::from_secs(1) {
        (*start, *written) = (now, 0);
    }
    if *written >= rate {
        *unwritten += 1;
        return None;
    }
    *written += 1;
    Some(std::mem::take(unwritten))
}

/// The gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

struct Inner {
    /// `gateway_listen` as configured; bound when the first agent with API scopes comes.
    listen: SocketAddr,
    /// Where it listens, once bound.
    addr: Mutex<Option<SocketAddr>>,
    runtime: tokio::runtime::Handle,
    audit: Audit,
    agents: RwLock<BTreeMap<String, LiveAgent>>,
    tokens: Mutex<Tokens>,
    held: Mutex<BTreeMap<u64, Held>>,
    next_held: AtomicU64,
    /// Digests of tokens revoked, with why (bounded: the newest kept).
    revoked: Mutex<Revoked>,
    /// Places for connections: all of them, and those of outsiders.
    connections: Arc<Semaphore>,
    outsiders: Arc<Semaphore>,
    shed: Arc<Shed>,
}

#[derive(Default)]
struct Revoked {
    by_digest: BTreeMap<[u8; 32], (Grant, &'static str)>,
    order: std::collections::VecDeque<[u8; 32]>,
}

/// Revoked tokens remembered to say `revoked` rather than `refused`.
const REVOKED_KEPT: usize = 65536;

impl Inner {
    fn agents_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, LiveAgent>> {
        self.agents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn agents_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, LiveAgent>> {
        self.agents
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Gateway {
    /// A gateway that will listen on `listen` (see [`Self::listen`]), serving on the current
    /// tokio runtime.
    /// `audit_rate`: an agent's refused calls audited a second (`daemon.audit_rate`).
    pub fn new(listen: SocketAddr, audit: Audit, audit_rate: u32) -> Self {
        Self(Arc::new(Inner {
            listen,
            addr: Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
            audit,
            agents: RwLock::new(BTreeMap::new()),
            tokens: Mutex::new(Tokens::default()),
            held: Mutex::new(BTreeMap::new()),
            next_held: AtomicU64::new(1),
            revoked: Mutex::new(Revoked::default()),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            outsiders: Arc::new(Semaphore::new(MAX_OUTSIDER_CONNECTIONS)),
            shed: Arc::new(Shed::new(audit_rate)),
        }))
    }

    /// Binds the listener if it is not yet bound, and says where it listens. Only a daemon
    /// with an agent that has API scopes binds it: the others never take the port.
    pub fn listen(&self) -> std::io::Result<SocketAddr> {
        let mut addr = lock(&self.0.addr);
        if let Some(a) = *addr {
            return Ok(a);
        }
        let std_listener = std::net::TcpListener::bind(self.0.listen)?;
        std_listener.set_nonblocking(true)?;
        let bound = std_listener.local_addr()?;
        let listener = {
            let _in_runtime = self.0.runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let inner = Arc::clone(&self.0);
        self.0.runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        // Full: closed at once, before anything is read or asked of the kernel.
                        let Ok(place) = Arc::clone(&inner.connections).try_acquire_owned() else {
                            inner
                                .shed
                                .connections_refused
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let inner = Arc::clone(&inner);
                        tokio::spawn(connection(inner, stream, peer, place));
                    }
                    Err(e) => {
                        // Out of descriptors: the listener is fine, serving pauses a moment.
                        tracing::warn!("gateway: accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(gateway = %bound, "API gateway listening");
        *addr = Some(bound);
        Ok(bound)
    }

    /// `status`'s `gateway`: where it listens (null: not bound) and what its bounds turned
    /// away.
    pub fn status(&self) -> Value {
        let shed = &self.0.shed;
        json!({
            "listen": self.addr().map(|a| a.to_string()),
            "connections": MAX_CONNECTIONS - self.0.connections.available_permits(),
            "connections_refused": shed.connections_refused.load(Ordering::Relaxed),
            "outsider_lines_not_written": shed.lines_not_written.load(Ordering::Relaxed),
            "agent_lines_not_written": shed.agent_lines_not_written.load(Ordering::Relaxed),
        })
    }

    /// Per scope of `agent`: the calls `learn` proposes its `allow` from.
    pub fn learned(&self, agent: &str) -> BTreeMap<String, LearnedCalls> {
        self.agents_read()
            .get(agent)
            .map(|a| {
                a.scopes
                    .iter()
                    .map(|(name, s)| (name.clone(), lock(&s.learned).clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Connections closed at once by the bounds, since the daemon started.
    pub fn connections_refused(&self) -> u64 {
        self.0.shed.connections_refused.load(Ordering::Relaxed)
    }

    /// Where it listens (None: not bound, no agent has API scopes yet).
    pub fn addr(&self) -> Option<SocketAddr> {
        *lock(&self.0.addr)
    }

    /// The URL of scope `scope` as agents get it.
    fn url(&self, addr: SocketAddr, scope: &str) -> String {
        format!("http://{addr}/{scope}")
    }

    fn agents_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, LiveAgent>> {
        self.0.agents_read()
    }

    fn agents_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, LiveAgent>> {
        self.0.agents_write()
    }

    /// Makes `agent`'s scopes exactly `scopes` (a config applied): limits and counts of scopes
    /// that stay are kept, secrets rotate for the next call, tokens of scopes gone are revoked.
    /// An agent with no scopes left is forgotten (its tokens revoked, its connections cut).
    pub fn set_agent(
        &self,
        agent: &str,
        cgroup_id: u64,
        cgroup: &Path,
        scopes: Vec<PreparedScope>,
    ) {
        if scopes.is_empty() {
            self.remove_agent(agent, "removed");
            return;
        }
        let mut agents = self.agents_write();
        let entry = agents.entry(agent.to_owned()).or_insert_with(|| LiveAgent {
            cgroup_id,
            cgroup: cgroup.to_owned(),
            scopes: BTreeMap::new(),
            denied: false,
            lease_end: None,
            lease_timer: 0,
            cut: watch::channel(0).0,
            connections: Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS)),
        });
        entry.cgroup_id = cgroup_id;
        entry.cgroup = cgroup.to_owned();
        let mut live = BTreeMap::new();
        for p in scopes {
            let (limits, counts, learned) = match entry.scopes.get(&p.api.name) {
                Some(old) => {
                    lock(&old.limits).reconfigure(p.api.per_minute, p.api.per_day);
                    (
                        Arc::clone(&old.limits),
                        Arc::clone(&old.counts),
                        Arc::clone(&old.learned),
                    )
                }
                None => (
                    Arc::new(Mutex::new(ScopeLimits::new(
                        p.api.per_minute,
                        p.api.per_day,
                    ))),
                    Arc::new(ScopeCounts::default()),
                    Arc::default(),
                ),
            };
            live.insert(
                p.api.name.clone(),
                Arc::new(LiveScope {
                    api: p.api,
                    secret: p.secret,
                    client: p.client,
                    limits,
                    counts,
                    learned,
                }),
            );
        }
        let keep: Vec<&str> = live.keys().map(String::as_str).collect();
        let gone = lock(&self.0.tokens).revoke_scopes_except(agent, &keep);
        entry.scopes = live;
        drop(agents);
        if gone > 0 {
            tracing::info!(
                agent,
                tokens = gone,
                "gateway: tokens of removed scopes revoked"
            );
        }
    }

    /// Forgets `agent`: tokens revoked, connections cut, held calls refused.
    pub fn remove_agent(&self, agent: &str, why: &'static str) {
        self.revoke(agent, why);
        self.agents_write().remove(agent);
    }

    /// Revokes every token of `agent` and cuts its connections (kill switch, lease end). Its
    /// scopes stay: a new `launch` gets new tokens.
    pub fn revoke(&self, agent: &str, why: &'static str) -> usize {
        let n = {
            let mut tokens = lock(&self.0.tokens);
            let grants = tokens.take_agent(agent);
            let mut revoked = lock(&self.0.revoked);
            for (digest, grant) in &grants {
                revoked.remember(*digest, grant.clone(), why);
            }
            grants.len()
        };
        self.cut(agent);
        let held: Vec<Held> = {
            let mut h = lock(&self.0.held);
            let ids: Vec<u64> = h
                .values()
                .filter(|c| c.call.agent == agent)
                .map(|c| c.call.id)
                .collect();
            ids.into_iter().filter_map(|id| h.remove(&id)).collect()
        };
        for h in held {
            let _ = h.decide.send(false);
        }
        n
    }

    /// The breaker's verdict on `agent`'s calls (true: 403 to all).
    pub fn set_denied(&self, agent: &str, denied: bool) {
        if let Some(a) = self.agents_write().get_mut(agent) {
            a.denied = denied;
        }
    }

    /// When `agent`'s lease ends (the kernel's deadline; None: no lease). Every call checks
    /// it; when it comes, the agent's connections are cut. Its tokens stay: an extended lease
    /// lets the same launch call again.
    pub fn set_lease_end(&self, agent: &str, deadline_ns: Option<u64>) {
        let mut agents = self.agents_write();
        let Some(a) = agents.get_mut(agent) else {
            return;
        };
        if a.lease_end == deadline_ns {
            return;
        }
        a.lease_end = deadline_ns;
        a.lease_timer += 1;
        let Some(deadline) = deadline_ns else {
            return;
        };
        let timer = a.lease_timer;
        let left = Duration::from_nanos(deadline.saturating_sub(crate::bpf::ktime_ns()));
        let gw = self.clone();
        let agent = agent.to_owned();
        self.0.runtime.spawn(async move {
            tokio::time::sleep(left).await;
            let current = gw
                .agents_read()
                .get(&agent)
                .is_some_and(|a| a.lease_timer == timer);
            if current {
                gw.cut(&agent);
            }
        });
    }

    /// Ends every connection of `agent` to the gateway, and the upstream streams behind them.
    fn cut(&self, agent: &str) {
        if let Some(a) = self.agents_read().get(agent) {
            a.cut.send_modify(|g| *g += 1);
        }
    }

    /// For a new launch of `agent`: per scope, the variables the agent gets (URL, token and
    /// the scope's `env`). Empty when the agent has no scopes.
    pub fn launch(&self, agent: &str) -> Result<Vec<(String, String)>, String> {
        let agents = self.agents_read();
        let Some(a) = agents.get(agent) else {
            return Ok(Vec::new());
        };
        if a.scopes.is_empty() {
            return Ok(Vec::new());
        }
        let addr = self
            .addr()
            .ok_or_else(|| "the API gateway is not listening".to_owned())?;
        let mut tokens = lock(&self.0.tokens);
        let launch = tokens.next_launch();
        let mut env = Vec::new();
        for (name, s) in &a.scopes {
            let token = tokens
                .mint(agent, name, launch)
                .map_err(|e| format!("no random token: {e}"))?;
            let url = self.url(addr, name);
            let (url_var, token_var) = scope::env_names(name);
            for (k, v) in &s.api.env {
                env.push((k.clone(), scope::fill(v, &url, &token)));
            }
            env.push((url_var, url));
            env.push((token_var, token));
        }
        Ok(env)
    }

    /// Per agent and scope: calls by decision, limits left.
    pub fn counts(&self) -> BTreeMap<String, BTreeMap<String, ScopeStatus>> {
        let now = Instant::now();
        self.agents_read()
            .iter()
            .map(|(agent, a)| {
                let scopes = a
                    .scopes
                    .iter()
                    .map(|(name, s)| {
                        let (minute_left, day_left) = lock(&s.limits).left(now);
                        (
                            name.clone(),
                            ScopeStatus {
                                calls: s.counts.snapshot(),
                                minute_left,
                                day_left,
                            },
                        )
                    })
                    .collect();
                (agent.clone(), scopes)
            })
            .collect()
    }

    /// [`Self::api_calls`] of every agent the gateway serves, under one lock: what the
    /// behaviour tick reads ten times a second (agents without scopes are not in it).
    pub fn all_api_calls(&self) -> BTreeMap<String, u64> {
        self.agents_read()
            .iter()
            .map(|(name, a)| (name.clone(), a.calls()))
            .collect()
    }

    /// Every call `agent` made through the gateway, whatever the decision (breaker signal
    /// `api_calls`).
    pub fn api_calls(&self, agent: &str) -> u64 {
        self.agents_read().get(agent).map_or(0, LiveAgent::calls)
    }

    /// Calls waiting for a human.
    pub fn held(&self) -> Vec<HeldCall> {
        lock(&self.0.held)
            .values()
            .map(|h| h.call.clone())
            .collect()
    }

    /// A human's decision on held call `id` of `agent`.
    pub fn decide(&self, agent: &str, id: u64, approve: bool) -> Result<HeldCall, String> {
        let mut held = lock(&self.0.held);
        match held.get(&id) {
            Some(h) if h.call.agent == agent => {}
            Some(_) | None => {
                return Err(format!("agent `{agent}` has no held call {id}"));
            }
        }
        let h = held
            .remove(&id)
            .ok_or_else(|| format!("agent `{agent}` has no held call {id}"))?;
        let call = h.call.clone();
        h.decide
            .send(approve)
            .map_err(|_| format!("call {id} ended before the decision (the agent hung up)"))?;
        Ok(call)
    }
}

/// What status shows of one scope.
#[derive(Debug, Clone)]
pub struct ScopeStatus {
    pub calls: Vec<(&'static str, u64)>,
    pub minute_left: Option<u32>,
    pub day_left: Option<u32>,
}

impl Revoked {
    fn remember(&mut self, digest: [u8; 32], grant: Grant, why: &'static str) {
        if self.by_digest.insert(digest, (grant, why)).is_none() {
            self.order.push_back(digest);
        }
        while self.order.len() > REVOKED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.by_digest.remove(&old);
            }
        }
    }
}

/// The agent whose cgroup (or a cgroup nested below it) made the socket at `peer` that is
/// connected to us at `local`.
fn identify(inner: &Inner, peer: SocketAddr, local: SocketAddr) -> Option<String> {
    let cgroup_id = match crate::sockdiag::find_tcp(peer, local) {
        Ok(Some(s)) => s.cgroup_id,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("gateway: asking the kernel who called from {peer}: {e}");
            return None;
        }
    };
    let agents = inner.agents_read();
    if let Some((name, _)) = agents.iter().find(|(_, a)| a.cgroup_id == cgroup_id) {
        return Some(name.clone());
    }
    // A cgroup the agent made below its own.
    use std::os::unix::fs::MetadataExt as _;
    agents
        .iter()
        .find(|(_, a)| {
            crate::sockets::descendants(&a.cgroup)
                .iter()
                .any(|d| std::fs::metadata(d).is_ok_and(|m| m.ino() == cgroup_id))
        })
        .map(|(name, _)| name.clone())
}

async fn connection(
    inner: Arc<Inner>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    _place: OwnedSemaphorePermit,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    // Small writes go out at once: a streamed answer's first event must not wait for the
    // agent's ACK of the headers (Nagle with delayed ACKs: 40 ms).
    let _ = stream.set_nodelay(true);
    let who = {
        let inner = Arc::clone(&inner);
        tokio::task::spawn_blocking(move || identify(&inner, peer, local))
            .await
            .ok()
            .flatten()
    };
    let (cut, places) = match &who {
        Some(a) => match inner.agents_read().get(a) {
            Some(a) => (Some(a.cut.subscribe()), Arc::clone(&a.connections)),
            // Forgotten since it was identified.
            None => return,
        },
        None => (None, Arc::clone(&inner.outsiders)),
    };
    let Ok(_own_place) = places.try_acquire_owned() else {
        inner
            .shed
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    let service = {
        let inner = Arc::clone(&inner);
        let who = who.clone();
        service_fn(move |req| {
            let inner = Arc::clone(&inner);
            let who = who.clone();
            async move { Ok::<_, Infallible>(call(inner, who, peer, req).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // An outsider gets its answer and the connection ends: one place, one request.
        .keep_alive(who.is_some())
        .serve_connection(TokioIo::new(stream), service);
    match cut {
        Some(mut cut) => {
            cut.mark_unchanged();
            tokio::select! {
                _ = conn => {}
                // Revoked: the connection, and every stream it carries, ends now.
                _ = cut.changed() => {}
            }
        }
        None => {
            let _ = conn.await;
        }
    }
}

/// What the audit line of one call says, written when the call ends (see [`CallEnd`]).
struct CallLine {
    audit: Audit,
    agent: String,
    api: String,
    method: String,
    path: String,
    decision: &'static str,
    status: u16,
    reason: Option<String>,
    started: Instant,
    bytes_out: Arc<AtomicU64>,
    bytes_in: Arc<AtomicU64>,
    counts: Option<Arc<ScopeCounts>>,
    peer: SocketAddr,
    shed: Arc<Shed>,
}

impl CallLine {
    fn write(&self) {
        if let Some(c) = &self.counts {
            c.add(self.decision);
        }
        let mut fields = json!({
            "api": self.api,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "decision": self.decision,
            "bytes_out": self.bytes_out.load(Ordering::Relaxed),
            "bytes_in": self.bytes_in.load(Ordering::Relaxed),
            "ms": round_ms(self.started.elapsed()),
        });
        if let Some(r) = &self.reason {
            fields["reason"] = json!(r);
        }
        if self.agent.is_empty() {
            // Any local process can call: its lines are bounded, the rest counted.
            let Some(unwritten) = self.shed.outsider_line() else {
                return;
            };
            if unwritten > 0 {
                fields["not_written_before"] = json!(unwritten);
            }
            fields["peer"] = json!(self.peer.to_string());
            self.audit.record_daemon("api_call", fields);
        } else if matches!(self.decision, "allowed" | "approved") {
            self.audit.record(&self.agent, "api_call", fields);
        } else {
            // Refusals cost the agent nothing to make: at `audit_rate` a second like its
            // kernel denials, the rest counted (in `status`, and in the next line written).
            let Some(unwritten) = self.shed.agent_line(&self.agent) else {
                return;
            };
            if unwritten > 0 {
                fields["not_written_before"] = json!(unwritten);
            }
            self.audit.record(&self.agent, "api_call", fields);
        }
    }
}

/// Writes the call's line when dropped: when the answer's body has been sent, or the agent
/// hung up, or its connection was cut.
struct CallEnd(CallLine);

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.0.write();
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

type Answer = Response<Body>;

/// A whole body, as the boxed type every answer has.
fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| -> hyper::Error { match never {} })
        .boxed()
}

/// A response of the gateway's own, with a JSON body saying why.
fn own(status: StatusCode, message: &str) -> Answer {
    let body =
        serde_json::to_vec(&json!({ "error": { "message": message, "type": "agentwatch" } }))
            .unwrap_or_default();
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Answers the call with the gateway's own `status`, auditing it as `decision` with `why`.
fn refuse(line: &mut CallLine, status: StatusCode, decision: &'static str, why: &str) -> Answer {
    line.status = status.as_u16();
    line.decision = decision;
    line.reason = Some(why.to_owned());
    line.write();
    own(status, why)
}

/// `/NAME/rest?query` -> (`NAME`, `/rest?query`).
fn split_scope(path_and_query: &str) -> (&str, String) {
    let trimmed = path_and_query.trim_start_matches('/');
    let end = trimmed.find(['/', '?']).unwrap_or(trimmed.len());
    let (name, rest) = trimmed.split_at(end);
    let rest = if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    };
    (name, rest)
}

/// A request body the gateway answered without reading (a refusal) is read away, up to this
/// much and for this long, so the connection can carry the agent's next call.
const DRAIN_MAX: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

async fn call(
    inner: Arc<Inner>,
    who: Option<String>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Answer {
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let mut answer = judge_and_forward(inner, who, peer, parts, &mut body).await;
    if let Some(unread) = body {
        // hyper reads an unread body away only if it has already arrived, else it closes the
        // connection after the answer: a client that sent its next call on it then fails
        // (seen: one of 16 Python clients lost a call after a 429). Read it here; one too
        // large or too slow ends the connection, said to the client with `Connection: close`.
        let drained =
            tokio::time::timeout(DRAIN_TIME, Limited::new(unread, DRAIN_MAX).collect()).await;
        if !matches!(drained, Ok(Ok(_))) {
            close_after(&mut answer);
        }
    }
    answer
}

/// Says in `answer` that the connection ends after it (hyper then closes it).
fn close_after(answer: &mut Answer) {
    answer
        .headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
}

/// Judges the call and forwards it; takes `body` out of its slot only to read or send it.
async fn judge_and_forward(
    inner: Arc<Inner>,
    who: Option<String>,
    peer: SocketAddr,
    mut parts: hyper::http::request::Parts,
    body: &mut Option<Incoming>,
) -> Answer {
    let started = Instant::now();
    let raw = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let (scope_name, rest) = split_scope(&raw);
    let scope_name = scope_name.to_owned();
    // The path as audited before it is judged: without the query, never more than 256 bytes.
    let shown: String = rest
        .split('?')
        .next()
        .unwrap_or("/")
        .chars()
        .take(256)
        .collect();
    let (scope, denied, lease_over) = {
        let agents = inner.agents_read();
        let a = who.as_ref().and_then(|w| agents.get(w));
        (
            a.and_then(|a| a.scopes.get(&scope_name)).cloned(),
            a.is_some_and(|a| a.denied),
            a.and_then(|a| a.lease_end)
                .is_some_and(|e| crate::bpf::ktime_ns() >= e),
        )
    };
    let auth = scope
        .as_ref()
        .map_or(super::auth::Auth::Bearer, |s| s.api.auth.clone());
    let presented = auth::take_token(&mut parts.headers, &auth);
    let mut line = CallLine {
        audit: inner.audit.clone(),
        agent: who.clone().unwrap_or_default(),
        api: scope_name.clone(),
        method: parts.method.as_str().to_ascii_uppercase(),
        path: shown,
        decision: "refused",
        status: 401,
        reason: None,
        started,
        bytes_out: Arc::new(AtomicU64::new(0)),
        bytes_in: Arc::new(AtomicU64::new(0)),
        counts: scope.as_ref().map(|s| Arc::clone(&s.counts)),
        peer,
        shed: Arc::clone(&inner.shed),
    };
    // 1. Who calls (the kernel), and with a token given to that agent for that scope.
    let Some(agent) = who.clone() else {
        return refuse(
            &mut line,
            StatusCode::UNAUTHORIZED,
            "refused",
            "the calling socket is not an agent's: the gateway serves agents only",
        );
    };
    let token = match presented {
        Presented::One(t) => t,
        Presented::None => {
            return refuse(&mut line, StatusCode::UNAUTHORIZED, "refused", "no token");
        }
        Presented::Conflicting => {
            return refuse(
                &mut line,
                StatusCode::UNAUTHORIZED,
                "refused",
                "two different credentials in one request",
            );
        }
    };
    let grant = lock(&inner.tokens).check(&token).cloned();
    match grant {
        Some(g) if g.agent == agent && g.scope == scope_name && scope.is_some() => {}
        Some(_) => {
            return refuse(
                &mut line,
                StatusCode::UNAUTHORIZED,
                "refused",
                "this token was not given to this agent for this API",
            );
        }
        None => {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let revoked = lock(&inner.revoked)
                .by_digest
                .get(&digest)
                .map(|(_, why)| *why);
            return match revoked {
                Some(why) => refuse(
                    &mut line,
                    StatusCode::UNAUTHORIZED,
                    "revoked",
                    &format!("token revoked ({why})"),
                ),
                None => refuse(
                    &mut line,
                    StatusCode::UNAUTHORIZED,
                    "refused",
                    "unknown token",
                ),
            };
        }
    }
    let Some(scope) = scope else {
        return refuse(
            &mut line,
            StatusCode::UNAUTHORIZED,
            "refused",
            "no such API",
        );
    };
    if lease_over {
        return refuse(
            &mut line,
            StatusCode::UNAUTHORIZED,
            "revoked",
            "token revoked (lease ended)",
        );
    }
    // 2. The breaker.
    if denied {
        return refuse(
            &mut line,
            StatusCode::FORBIDDEN,
            "denied",
            "the agent's breaker is open: calls are denied until a human approves",
        );
    }
    // 3. The scope's patterns, on the canonical target.
    let target = match Target::parse(parts.method.as_str(), &rest) {
        Ok(t) => t,
        Err(e) => return refuse(&mut line, StatusCode::BAD_REQUEST, "denied", &e.to_string()),
    };
    line.method = target.method.clone();
    line.path = target.path.clone();
    // A presigned AWS URL carries the agent's credential in its query, which goes upstream
    // as sent: refused (the gateway signs with headers).
    if matches!(scope.api.auth, super::auth::Auth::AwsSigV4(_))
        && super::aws::presigned(target.query.as_deref())
    {
        return refuse(
            &mut line,
            StatusCode::BAD_REQUEST,
            "denied",
            "a presigned URL's query would carry the agent's credential upstream: sign with \
             the Authorization header",
        );
    }
    let admitted_by = first_match(&scope.api.allow, &target);
    lock(&scope.learned).record(&target, admitted_by);
    if admitted_by.is_none() {
        return refuse(
            &mut line,
            StatusCode::FORBIDDEN,
            "denied",
            &format!(
                "{} {} is not allowed by API `{scope_name}`",
                target.method, target.path
            ),
        );
    }
    // 4. Limits, reserved before anything is sent.
    let reserved = lock(&scope.limits).reserve(Instant::now());
    if let Err(hit) = reserved {
        let secs = hit.retry_after.as_secs().max(1);
        let mut r = refuse(
            &mut line,
            StatusCode::TOO_MANY_REQUESTS,
            "limited",
            &format!("over {} of API `{scope_name}`", hit.which.name()),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        return r;
    }
    // 5. A human, where the scope says so.
    let mut decision = "allowed";
    let Some(body) = body.take() else {
        return own(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request's body is gone",
        );
    };
    let body: Body = if first_match(&scope.api.approve, &target).is_some() {
        let bytes = match Limited::new(body, HELD_BODY_MAX).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                // Partly read: the connection ends with this answer.
                let mut answer = refuse(
                    &mut line,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "denied",
                    "a call held for approval may carry at most 10 MiB",
                );
                close_after(&mut answer);
                return answer;
            }
        };
        match hold(&inner, &agent, &scope.api, &target, &bytes).await {
            Ok(()) => decision = "approved",
            Err(why) => return refuse(&mut line, StatusCode::FORBIDDEN, "refused", &why),
        }
        full(bytes)
    } else {
        body.boxed()
    };
    // 6. Upstream, with the real credential.
    line.decision = decision;
    forward(line, scope, target, parts, body).await
}

/// Holds a call until a human decides or `approve_timeout` passes. Ok: approved.
async fn hold(
    inner: &Inner,
    agent: &str,
    api: &Api,
    target: &Target,
    body: &Bytes,
) -> Result<(), String> {
    let scope = api.name.as_str();
    let timeout = api.approve_timeout;
    let mut h = Sha256::new();
    h.update(target.method.as_bytes());
    h.update(b" ");
    h.update(target.path_and_query().as_bytes());
    h.update(b"\n");
    h.update(body);
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let id = inner.next_held.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    let call = HeldCall {
        id,
        agent: agent.to_owned(),
        scope: scope.to_owned(),
        method: target.method.clone(),
        path: target.path.clone(),
        digest: digest.clone(),
        body_bytes: body.len(),
        since: std::time::SystemTime::now(),
    };
    inner.audit.record(
        agent,
        "api_held",
        json!({
            "api": scope,
            "call": id,
            "method": call.method,
            "path": call.path,
            "digest": digest,
            "body_bytes": body.len(),
            "timeout_s": timeout.as_secs_f64(),
        }),
    );
    lock(&inner.held).insert(id, Held { call, decide: tx });
    // Gone from the table however this ends (the agent hanging up drops this future).
    struct Unhold<'a>(&'a Inner, u64);
    impl Drop for Unhold<'_> {
        fn drop(&mut self) {
            lock(&self.0.held).remove(&self.1);
        }
    }
    let _unhold = Unhold(inner, id);
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(format!("call {id} was denied")),
        Ok(Err(_)) => Err(format!("call {id} was refused (its agent was revoked)")),
        Err(_) => Err(format!(
            "call {id} was not approved within {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// Sends the call upstream. An answer of the gateway's own here (502, 413) comes after the
/// request's body was partly read or handed on: the connection ends with it.
async fn forward(
    line: CallLine,
    scope: Arc<LiveScope>,
    target: Target,
    parts: hyper::http::request::Parts,
    body: Body,
) -> Answer {
    let (answer, own_answer) = send_upstream(line, scope, target, parts, body).await;
    let mut answer = answer;
    if own_answer {
        close_after(&mut answer);
    }
    answer
}

async fn send_upstream(
    mut line: CallLine,
    scope: Arc<LiveScope>,
    target: Target,
    mut parts: hyper::http::request::Parts,
    body: Body,
) -> (Answer, bool) {
    let api = &scope.api;
    let uri = format!(
        "https://{}{}{}",
        api.upstream.authority(),
        api.upstream.base,
        target.path_and_query()
    );
    auth::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    if let Err(e) = auth::inject(&mut parts.headers, &api.auth, &scope.secret) {
        line.status = 502;
        line.reason = Some(e.clone());
        line.write();
        return (own(StatusCode::BAD_GATEWAY, &e), true);
    }
    // AWS: the body's hash is signed (S3 aside), so the body is read first.
    let aws = match &api.auth {
        auth::Auth::AwsSigV4(t) => Some(t),
        _ => None,
    };
    let (body, signed_body) = match aws {
        Some(t) if super::aws::signs_body(t) => {
            match Limited::new(body, super::aws::SIGNED_BODY_MAX)
                .collect()
                .await
            {
                Ok(b) => {
                    let bytes = b.to_bytes();
                    (full(bytes.clone()), Some(bytes))
                }
                Err(_) => {
                    line.status = 413;
                    line.decision = "denied";
                    line.reason = Some("a signed AWS body is at most 10 MiB".into());
                    line.write();
                    return (
                        own(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "a call to this AWS service carries at most 10 MiB (its body is signed)",
                        ),
                        true,
                    );
                }
            }
        }
        _ => (body, None),
    };
    let counted_out = Arc::clone(&line.bytes_out);
    let body = body
        .map_frame(move |f: Frame<Bytes>| {
            if let Some(d) = f.data_ref() {
                counted_out.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            f
        })
        .boxed();
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.headers_mut() = parts.headers;
    match uri.parse() {
        Ok(u) => *up.uri_mut() = u,
        Err(e) => {
            let why = format!("the upstream URL: {e}");
            line.status = 502;
            line.reason = Some(why.clone());
            line.write();
            return (own(StatusCode::BAD_GATEWAY, &why), true);
        }
    }
    if let Some(t) = aws {
        let signed = super::aws::KeyPair::from_secret(&scope.secret)
            .map_err(str::to_owned)
            .and_then(|keys| {
                super::aws::sign_request(
                    &mut up,
                    signed_body.as_deref(),
                    &keys,
                    t,
                    std::time::SystemTime::now(),
                )
            });
        if let Err(e) = signed {
            line.status = 502;
            line.reason = Some(e.clone());
            line.write();
            return (own(StatusCode::BAD_GATEWAY, &e), true);
        }
    }
    match scope.client.request(up).await {
        Ok(resp) => {
            let (mut rp, rb) = resp.into_parts();
            auth::strip_hop_by_hop(&mut rp.headers);
            // Served to the agent over HTTP/1.1 whatever the upstream spoke.
            rp.version = Version::HTTP_11;
            line.status = rp.status.as_u16();
            let counted_in = Arc::clone(&line.bytes_in);
            let end = CallEnd(line);
            let body = rb
                .map_frame(move |f: Frame<Bytes>| {
                    let _ = &end;
                    if let Some(d) = f.data_ref() {
                        counted_in.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    f
                })
                .boxed();
            (Response::from_parts(rp, body), false)
        }
        Err(e) => {
            // hyper's errors name the failure (connect, TLS, protocol), never a header.
            let why = format!("upstream: {e}");
            line.status = 502;
            line.reason = Some(why.clone());
            line.write();
            (
                own(
                    StatusCode::BAD_GATEWAY,
                    "the upstream call failed (it still counts toward the limits)",
                ),
                true,
            )
        }
    }
}

/// Status rows' JSON of the gateway's view of one agent.
pub fn status_json(scopes: &BTreeMap<String, ScopeStatus>, held: &[HeldCall]) -> Value {
    let rows: BTreeMap<&String, Value> = scopes
        .iter()
        .map(|(name, s)| {
            let calls: BTreeMap<&str, u64> = s.calls.iter().copied().collect();
            (
                name,
                json!({
                    "calls": calls,
                    "per_minute_left": s.minute_left,
                    "per_day_left": s.day_left,
                    "held": held.iter().filter(|h| h.scope == *name).map(|h| json!({
                        "call": h.id,
                        "method": h.method,
                        "path": h.path,
                        "digest": h.digest,
                        "body_bytes": h.body_bytes,
                        "held_seconds": h.since.elapsed().map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0),
                    })).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    json!(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_is_the_first_segment() {
        assert_eq!(
            split_scope("/mail/v3/x?q=1"),
            ("mail", "/v3/x?q=1".to_owned())
        );
        assert_eq!(split_scope("/mail"), ("mail", "/".to_owned()));
        assert_eq!(split_scope("/mail?x"), ("mail", "/?x".to_owned()));
        assert_eq!(split_scope("/"), ("", "/".to_owned()));
    }
}
