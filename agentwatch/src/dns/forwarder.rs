//! The DNS forwarder: one set of loopback sockets per agent with hostname rules, so the port a
//! query arrives on names the agent that asked.
//!
//! Each query is handled in a task of its own, bounded per agent: a burst or a malformed packet
//! from one agent costs that agent's tasks, never the other agents' answers. A query's path:
//! read it (FORMERR if it is not one) -> refuse a name no rule allows (REFUSED, counted,
//! audited) -> ask upstream over the agent's transport -> write the answer's addresses into the
//! agent's kernel allow-list -> answer. A failure anywhere after the name was allowed answers
//! SERVFAIL: the agent learns nothing it could connect to.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use agentwatch_common::{
    DNS_ALLOWED, DNS_DENIED, DNS_FAILED, DNS_MALFORMED, DNS_WOULD_DENY, DnsPorts,
};
use bytes::{BufMut as _, BytesMut};
use hickory_proto::op::ResponseCode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Handle,
    sync::Semaphore,
    task::JoinHandle,
    time::timeout,
};

use super::{
    Learned,
    message::{self, Malformed, Query},
};
use crate::rules::names::HostRules;
use crate::{audit::Audit, bpf::ktime_ns, learn::LearnMaps};

/// How long upstream has to answer one query (stub resolvers retry after about 5 s).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);
/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries of one agent in flight at once; beyond it, queries are dropped (and counted as
/// failed): the agent retries, the other agents do not wait.
const IN_FLIGHT: usize = 256;
/// TCP connections of one agent open at once.
const TCP_CONNECTIONS: usize = 64;
/// The names a `dns_denied_summary` lists.
const SUMMARY_NAMES: usize = 10;

/// What the forwarder needs from the daemon's config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where allowed names are resolved (None: no upstream could be found; agents with
    /// hostname rules are then refused with the reason).
    pub upstream: Option<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Per agent: `dns_denied` lines written one by one per second; beyond it, summarised.
    pub audit_rate: u32,
}

impl Settings {
    /// `configured`, or the first nameserver of /etc/resolv.conf.
    pub fn upstream_from(configured: Option<SocketAddr>) -> Result<SocketAddr, String> {
        if let Some(addr) = configured {
            return Ok(addr);
        }
        let text = std::fs::read("/etc/resolv.conf").map_err(|e| {
            format!("reading /etc/resolv.conf for a DNS upstream: {e}; set daemon.dns_upstream")
        })?;
        let conf = resolv_conf::Config::parse(&text)
            .map_err(|e| format!("/etc/resolv.conf: {e}; set daemon.dns_upstream"))?;
        conf.nameservers
            .first()
            .map(|ns| SocketAddr::new(IpAddr::from(ns), 53))
            .ok_or_else(|| {
                "/etc/resolv.conf names no nameserver; set daemon.dns_upstream".to_owned()
            })
    }
}

/// A snapshot of one agent's counts (status rows, /metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Answered (the name was allowed; whatever upstream said, NXDOMAIN included).
    pub allowed: u64,
    /// Refused: no rule allows the name.
    pub denied: u64,
    /// SERVFAIL or dropped: upstream failed, the kernel write failed, too many in flight.
    pub failed: u64,
    /// Not a DNS query (FORMERR or dropped).
    pub malformed: u64,
    /// Learn mode: no rule allows the name, and it was answered anyway.
    pub would_deny: u64,
    /// Addresses in the agent's kernel allow-list now.
    pub learned: u64,
}

/// Denials of one agent in the current second, for the audit rate.
#[derive(Debug, Default)]
struct Window {
    second: u64,
    written: u32,
    suppressed: u64,
    names: HashMap<String, u64>,
}

/// One agent's forwarder.
struct AgentDns {
    name: String,
    id: u32,
    /// Learn mode: names no rule allows are answered (and reported), not refused.
    learn: AtomicBool,
    window: Mutex<Window>,
    in_flight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

struct Served {
    agent: Arc<AgentDns>,
    ports: DnsPorts,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Inner {
    learned: Learned,
    /// Where the names answered to learn-mode agents are recorded (for `agentwatch learn`).
    names: LearnMaps,
    settings: Settings,
    audit: Audit,
    runtime: Handle,
    served: Mutex<BTreeMap<String, Served>>,
}

/// The forwarder of every agent with hostname rules. Cheap to clone.
#[derive(Clone)]
pub struct Forwarder(Arc<Inner>);

/// Sockets bound for one agent, not yet served: binding can fail, so a config is applied only
/// once every agent's sockets are bound.
pub struct Endpoint {
    pub ports: DnsPorts,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

/// `dns_denied` lines not written one by one, per agent (for `dns_denied_summary`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub agent: String,
    pub count: u64,
    /// The most refused names with their counts, busiest first.
    pub names: Vec<(String, u64)>,
}

impl Forwarder {
    /// A forwarder writing into `learned` (and, for learn-mode agents, into `names`); tasks
    /// run on the current tokio runtime.
    pub fn new(
        learned: Learned,
        names: LearnMaps,
        settings: Settings,
        audit: Audit,
    ) -> io::Result<Self> {
        let runtime = Handle::try_current().map_err(io::Error::other)?;
        Ok(Self(Arc::new(Inner {
            learned,
            names,
            settings,
            audit,
            runtime,
            served: Mutex::new(BTreeMap::new()),
        })))
    }

    fn served(&self) -> MutexGuard<'_, BTreeMap<String, Served>> {
        self.0
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Is there an upstream to forward to?
    pub fn has_upstream(&self) -> bool {
        self.0.settings.upstream.is_some()
    }

    /// Binds a new agent's sockets: UDP and TCP on 127.0.0.1 and, where the host has it, on
    /// ::1, each on a port the kernel picks.
    pub fn bind(&self) -> Result<Endpoint, String> {
        if self.0.settings.upstream.is_none() {
            return Err(
                "hostname rules need a DNS upstream: set daemon.dns_upstream (none \
                        was found in /etc/resolv.conf)"
                    .to_owned(),
            );
        }
        let err = |what: &str, e: io::Error| format!("DNS forwarder: binding {what}: {e}");
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0));
        let udp4 = std::net::UdpSocket::bind(v4).map_err(|e| err("UDP 127.0.0.1", e))?;
        let tcp4 = std::net::TcpListener::bind(v4).map_err(|e| err("TCP 127.0.0.1", e))?;
        let mut ports = DnsPorts {
            udp4: local_port(udp4.local_addr()),
            tcp4: local_port(tcp4.local_addr()),
            udp6: 0,
            tcp6: 0,
        };
        let mut udp = vec![udp4];
        let mut tcp = vec![tcp4];
        // A host without IPv6 loopback: IPv6 resolvers get no forwarder, so such DNS calls
        // are denied (ports 0) rather than sent anywhere else.
        if let (Ok(udp6), Ok(tcp6)) = (
            std::net::UdpSocket::bind(v6),
            std::net::TcpListener::bind(v6),
        ) {
            ports.udp6 = local_port(udp6.local_addr());
            ports.tcp6 = local_port(tcp6.local_addr());
            udp.push(udp6);
            tcp.push(tcp6);
        } else {
            tracing::warn!("no IPv6 loopback: DNS to IPv6 resolvers is denied for agents");
        }
        for s in &udp {
            s.set_nonblocking(true).map_err(|e| err("UDP", e))?;
        }
        for s in &tcp {
            s.set_nonblocking(true).map_err(|e| err("TCP", e))?;
        }
        Ok(Endpoint { ports, udp, tcp })
    }

    /// Starts answering agent `name` (kernel id `id`) on `endpoint` under `rules`. What was
    /// learned for `id` under rules no longer configured is removed first.
    pub fn serve(
        &self,
        name: &str,
        id: u32,
        rules: HostRules,
        learn: bool,
        endpoint: Endpoint,
    ) -> Result<(), String> {
        self.0
            .learned
            .register(id, Arc::new(rules))
            .map_err(|e| e.to_string())?;
        let agent = Arc::new(AgentDns {
            name: name.to_owned(),
            id,
            learn: AtomicBool::new(learn),
            window: Mutex::new(Window::default()),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            connections: Arc::new(Semaphore::new(TCP_CONNECTIONS)),
        });
        // Every socket is handed to tokio before any task starts: a failure leaves nothing
        // running.
        let _guard = self.0.runtime.enter();
        let udp = endpoint
            .udp
            .into_iter()
            .map(UdpSocket::from_std)
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let tcp = endpoint
            .tcp
            .into_iter()
            .map(TcpListener::from_std)
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for s in udp {
            let task = serve_udp(Arc::clone(&self.0), Arc::clone(&agent), s);
            tasks.push(self.0.runtime.spawn(task));
        }
        for l in tcp {
            let task = serve_tcp(Arc::clone(&self.0), Arc::clone(&agent), l);
            tasks.push(self.0.runtime.spawn(task));
        }
        tracing::info!(agent = name, ports = ?endpoint.ports, "DNS forwarder serving");
        self.served().insert(
            name.to_owned(),
            Served {
                agent,
                ports: endpoint.ports,
                tasks,
            },
        );
        Ok(())
    }

    /// Replaces agent `name`'s hostname rules (a reload); what rules no longer configured
    /// admitted is removed.
    pub fn update(&self, name: &str, rules: HostRules, learn: bool) -> Result<(), String> {
        let id = {
            let served = self.served();
            let s = served
                .get(name)
                .ok_or_else(|| format!("agent `{name}` has no DNS forwarder"))?;
            s.agent.learn.store(learn, Ordering::Relaxed);
            s.agent.id
        };
        self.0
            .learned
            .register(id, Arc::new(rules))
            .map_err(|e| e.to_string())
    }

    /// Stops answering agent `name` and forgets what was learned for it.
    pub fn stop(&self, name: &str) {
        let Some(served) = self.served().remove(name) else {
            return;
        };
        if let Err(e) = self.0.learned.forget_agent(served.agent.id) {
            tracing::warn!(agent = name, "forgetting learned addresses: {e}");
        }
    }

    /// Where agent `name`'s forwarder listens, if it has one.
    pub fn ports(&self, name: &str) -> Option<DnsPorts> {
        self.served().get(name).map(|s| s.ports)
    }

    /// Agent `name`'s counts.
    pub fn stats(&self, name: &str) -> Stats {
        let served = self.served();
        let Some(s) = served.get(name) else {
            return Stats::default();
        };
        let c = self.0.learned.counts(s.agent.id);
        Stats {
            allowed: c[DNS_ALLOWED],
            denied: c[DNS_DENIED],
            failed: c[DNS_FAILED],
            malformed: c[DNS_MALFORMED],
            would_deny: c[DNS_WOULD_DENY],
            learned: self.0.learned.addresses(s.agent.id) as u64,
        }
    }

    /// Takes the denials of each agent that were counted, not written, since the last call.
    pub fn take_suppressed(&self) -> Vec<Suppressed> {
        let served = self.served();
        let mut out = Vec::new();
        for s in served.values() {
            let mut w = lock(&s.agent.window);
            if w.suppressed == 0 {
                continue;
            }
            let mut names: Vec<(String, u64)> = w.names.drain().collect();
            names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            names.truncate(SUMMARY_NAMES);
            out.push(Suppressed {
                agent: s.agent.name.clone(),
                count: std::mem::take(&mut w.suppressed),
                names,
            });
        }
        out
    }

    /// Removes expired learned addresses.
    pub fn expire(&self) -> Result<usize, String> {
        self.0.learned.expire(ktime_ns()).map_err(|e| e.to_string())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn local_port(addr: io::Result<SocketAddr>) -> u16 {
    addr.map_or(0, |a| a.port())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

async fn serve_udp(inner: Arc<Inner>, agent: Arc<AgentDns>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    // The largest UDP payload: a bigger query is cut, fails to parse and gets FORMERR.
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier replies surface here on some kernels; keep serving.
                tracing::debug!(agent = %agent.name, "DNS forwarder UDP receive: {e}");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&agent.in_flight).try_acquire_owned() else {
            inner.learned.count(agent.id, DNS_FAILED);
            continue;
        };
        let packet = buf[..n].to_vec();
        let (inner, agent, socket) = (Arc::clone(&inner), Arc::clone(&agent), Arc::clone(&socket));
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = handle(&inner, &agent, &packet, Transport::Udp).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                tracing::debug!(agent = %agent.name, "DNS forwarder UDP reply: {e}");
            }
        });
    }
}

async fn serve_tcp(inner: Arc<Inner>, agent: Arc<AgentDns>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, for one: wait a moment rather than spin.
                tracing::warn!(agent = %agent.name, "DNS forwarder TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&agent.connections).try_acquire_owned() else {
            inner.learned.count(agent.id, DNS_FAILED);
            continue;
        };
        let (inner, agent) = (Arc::clone(&inner), Arc::clone(&agent));
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(&inner, &agent, stream).await;
        });
    }
}

/// Answers the length-framed queries of one TCP connection, one after the other, until the
/// agent closes it, stalls, or sends something that is not even a DNS header.
async fn serve_connection(inner: &Inner, agent: &AgentDns, mut stream: TcpStream) {
    loop {
        let Ok(Ok(len)) = timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let mut packet = vec![0u8; usize::from(len)];
        if !matches!(
            timeout(TCP_IDLE, stream.read_exact(&mut packet)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(reply) = handle(inner, agent, &packet, Transport::Tcp).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut frame = BytesMut::with_capacity(2 + reply.len());
        frame.put_u16(len);
        frame.put_slice(&reply);
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// One packet of an agent: the reply to send, if any.
async fn handle(
    inner: &Inner,
    agent: &AgentDns,
    packet: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let query = match message::parse_query(packet) {
        Ok(q) => q,
        Err(bad) => {
            inner.learned.count(agent.id, DNS_MALFORMED);
            return match bad {
                Malformed::Drop => None,
                Malformed::Reply { id, rcode } => Some(message::bare_reply(id, rcode)),
            };
        }
    };
    let allowed = inner
        .learned
        .rules(agent.id)
        .is_some_and(|rules| rules.allows(&query.qname));
    // Learn mode: a name no rule allows is answered (and reported); its addresses are not
    // admitted, so a connect to them is a would-be denial of its own.
    let learning = !allowed && agent.learn.load(Ordering::Relaxed);
    if !allowed && !learning {
        return Some(refuse(inner, agent, &query, transport));
    }
    let servfail = |why: &str| {
        inner.learned.count(agent.id, DNS_FAILED);
        tracing::warn!(agent = %agent.name, name = %query.name, "DNS forwarder: {why}; answered SERVFAIL");
        Some(message::error_reply(&query.message, ResponseCode::ServFail))
    };
    let upstream = inner.settings.upstream?;
    let id = match random_id() {
        Ok(id) => id,
        Err(e) => return servfail(&e),
    };
    let answer = match exchange(upstream, &query, id, transport).await {
        Ok(bytes) => match message::read_answer(&bytes, &query, id) {
            Ok(a) => a,
            Err(e) => return servfail(&format!("upstream {upstream}: {e}")),
        },
        Err(e) => return servfail(&format!("upstream {upstream}: {e}")),
    };
    let (min, max) = (inner.settings.min_ttl, inner.settings.max_ttl);
    if agent.learn.load(Ordering::Relaxed) {
        // Before the agent sees the answer, so that its first call to an address is already
        // known by name.
        let now = ktime_ns();
        for &(ip, _) in &answer.addrs {
            if let Err(e) = inner.names.record_name(agent.id, ip, &query.name, now) {
                tracing::warn!(agent = %agent.name, name = %query.name, %ip, "recording the name for `agentwatch learn` failed (the proposal will name the address): {e}");
            }
        }
    }
    if learning {
        report(inner, agent, &query, transport, "dns_would_deny");
    } else {
        let addrs: Vec<(IpAddr, Duration)> = answer
            .addrs
            .iter()
            .map(|&(ip, ttl)| (ip, Duration::from_secs(u64::from(ttl)).clamp(min, max)))
            .collect();
        // Written into the kernel before the agent can see the answer: its first connect to an
        // address it learned is judged with that address in place.
        match inner
            .learned
            .admit(agent.id, &query.qname, &addrs, ktime_ns())
        {
            Ok(true) => crate::crash::point("dns.admitted"),
            // The rules changed while upstream answered: judged by the rules in force now.
            Ok(false) => return Some(refuse(inner, agent, &query, transport)),
            Err(e) => return servfail(&format!("writing the learned addresses: {e}")),
        }
    }
    let max_ttl = u32::try_from(max.as_secs()).unwrap_or(u32::MAX);
    let addrs = answer.addrs.len();
    match message::reply(answer.message, query.message.metadata.id, max_ttl) {
        Ok(reply) => {
            let verdict = if learning {
                DNS_WOULD_DENY
            } else {
                DNS_ALLOWED
            };
            inner.learned.count(agent.id, verdict);
            tracing::debug!(agent = %agent.name, name = %query.name, addrs, learning, "DNS answer");
            Some(reply)
        }
        Err(e) => servfail(&format!("building the reply: {e}")),
    }
}

/// REFUSED for a name no rule allows: counted, and audited within the agent's audit rate.
fn refuse(inner: &Inner, agent: &AgentDns, query: &Query, transport: Transport) -> Vec<u8> {
    inner.learned.count(agent.id, DNS_DENIED);
    report(inner, agent, query, transport, "dns_denied");
    message::error_reply(&query.message, ResponseCode::Refused)
}

/// Audits a name no rule allows as `kind` (`dns_denied`, `dns_would_deny`), within the agent's
/// audit rate; beyond it, counted for the once-a-second summary.
fn report(inner: &Inner, agent: &AgentDns, query: &Query, transport: Transport, kind: &str) {
    let second = ktime_ns() / 1_000_000_000;
    let write = {
        let mut w = lock(&agent.window);
        if w.second != second {
            w.second = second;
            w.written = 0;
        }
        if w.written < inner.settings.audit_rate {
            w.written += 1;
            true
        } else {
            w.suppressed += 1;
            *w.names.entry(query.name.clone()).or_default() += 1;
            false
        }
    };
    if write {
        inner.audit.record(
            &agent.name,
            kind,
            json!({
                "name": query.name,
                "qtype": query.qtype.to_string(),
                "transport": transport.name(),
            }),
        );
    }
}

/// A query id nobody can predict, from the OS's CSPRNG: a blind spoofer must guess it (and the
/// source port, [`upstream_socket`]) to forge upstream's answer. std's `RandomState` is no
/// random number generator: its keys are drawn once per thread and then only incremented, so
/// every id would be a fixed function of one secret and a counter, and std promises nothing
/// about how hard that is to predict. An error (no entropy source: not on any kernel agentwatch
/// runs on) fails the query.
fn random_id() -> Result<u16, String> {
    let mut id = [0u8; 2];
    getrandom::fill(&mut id).map_err(|e| format!("no random query id: {e}"))?;
    Ok(u16::from_ne_bytes(id))
}

/// Source ports drawn before leaving the choice to the kernel: with a port in use 1 time in
/// 100, 8 draws all hit one only 1 time in 10^16.
const PORT_DRAWS: usize = 8;
/// The kernel's default ephemeral range, for when /proc does not say.
const DEFAULT_PORTS: (u16, u16) = (32768, 60999);

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`, which IPv6 uses too):
/// ports there are meant for exactly this, so a port drawn from it takes none a service binds.
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(str::parse::<u16>);
            match (it.next(), it.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) if 0 < lo && lo <= hi => Some((lo, hi)),
                _ => None,
            }
        })
        .unwrap_or(DEFAULT_PORTS)
}

/// Ports set aside by `net.ipv4.ip_local_reserved_ports` (`8080,9000-9010`): the kernel never
/// picks them on its own, and neither does the forwarder, though an explicit bind would get them.
fn reserved_ports() -> Vec<(u16, u16)> {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    text.trim()
        .split(',')
        .filter_map(|part| {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
        })
        .collect()
}

/// A UDP socket for one upstream query, bound to a source port drawn from the OS's CSPRNG in
/// the ephemeral range and connected to `upstream`. The random port is the other half of what
/// a blind spoofer must guess besides the id; the connect makes the kernel drop every datagram
/// not from `upstream`'s address and port before the forwarder sees it. A drawn port in use
/// (EADDRINUSE) is drawn again, a few times; then port 0 leaves the choice to the kernel (Linux
/// also draws it at random in the same range), so a crowded range slows no query down and
/// fails none. The two /proc files are read per query (a few microseconds, never blocking):
/// a changed sysctl is followed at once.
async fn upstream_socket(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let any = if upstream.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let (lo, hi) = ephemeral_ports();
    let reserved = reserved_ports();
    let span = u32::from(hi - lo) + 1;
    let mut socket = None;
    for _ in 0..PORT_DRAWS {
        let draw = getrandom::u32().map_err(io::Error::other)?;
        // The modulo's bias is below 2^-16 (span <= 2^16 of 2^32): no port is likelier to
        // any measurable degree.
        let Ok(port) = u16::try_from(u32::from(lo) + draw % span) else {
            continue;
        };
        if reserved.iter().any(|&(a, b)| a <= port && port <= b) {
            continue;
        }
        match UdpSocket::bind(SocketAddr::new(any, port)).await {
            Ok(s) => {
                socket = Some(s);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    }
    let socket = match socket {
        Some(s) => s,
        None => UdpSocket::bind(SocketAddr::new(any, 0)).await?,
    };
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Asks upstream over `transport`; returns its reply's bytes.
async fn exchange(
    upstream: SocketAddr,
    query: &Query,
    id: u16,
    transport: Transport,
) -> Result<Vec<u8>, String> {
    let bytes = message::upstream_query(query, id)?;
    let io = |e: io::Error| e.to_string();
    match transport {
        Transport::Udp => {
            let socket = upstream_socket(upstream).await.map_err(io)?;
            socket.send(&bytes).await.map_err(io)?;
            let mut buf = vec![0u8; 65536];
            let read = async {
                loop {
                    let n = socket.recv(&mut buf).await?;
                    // A stray datagram that is not the answer (another id) is skipped; one
                    // with the id but another question is refused by `read_answer`.
                    if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                        return Ok::<_, io::Error>(buf[..n].to_vec());
                    }
                }
            };
            timeout(UPSTREAM_TIMEOUT, read)
                .await
                .map_err(|_| "no answer in time".to_owned())?
                .map_err(io)
        }
        Transport::Tcp => {
            let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_owned())?;
            let talk = async {
                let mut stream = TcpStream::connect(upstream).await?;
                let mut frame = BytesMut::with_capacity(2 + bytes.len());
                frame.put_u16(len);
                frame.put_slice(&bytes);
                stream.write_all(&frame).await?;
                let n = stream.read_u16().await?;
                let mut reply = vec![0u8; usize::from(n)];
                stream.read_exact(&mut reply).await?;
                Ok::<_, io::Error>(reply)
            };
            timeout(UPSTREAM_TIMEOUT, talk)
                .await
                .map_err(|_| "no answer in time".to_owned())?
                .map_err(io)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[tokio::test]
    async fn upstream_sockets_are_connected_from_random_ephemeral_ports() {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = upstream.local_addr().unwrap();
        let (lo, hi) = ephemeral_ports();
        let mut ports = HashSet::new();
        // Held open together, so that a port is never handed out twice.
        let mut sockets = Vec::new();
        for _ in 0..64 {
            let s = upstream_socket(addr).await.unwrap();
            assert_eq!(s.peer_addr().unwrap(), addr);
            let port = s.local_addr().unwrap().port();
            assert!((lo..=hi).contains(&port), "{port} outside {lo}-{hi}");
            ports.insert(port);
            sockets.push(s);
        }
        assert_eq!(ports.len(), 64);
        // Sequential ports would sit within 64 of each other; 64 draws from thousands do not.
        let (min, max) = (ports.iter().min().unwrap(), ports.iter().max().unwrap());
        assert!(max - min > 1000, "{min}..{max}");
    }

    #[test]
    fn query_ids_do_not_follow_each_other() {
        let ids: Vec<u16> = (0..64).map(|_| random_id().unwrap()).collect();
        let distinct: HashSet<_> = ids.iter().collect();
        assert!(distinct.len() >= 60, "{ids:?}");
        let steps: HashSet<u16> = ids.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
        assert!(steps.len() > 1, "an arithmetic sequence: {ids:?}");
    }
}
