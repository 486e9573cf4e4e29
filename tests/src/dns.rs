//! A small DNS server for the tests, and the parsed output of aw-probe's DNS commands.
//!
//! [`TestDnsServer`] answers from a zone the test gives it, the way a recursive resolver answers
//! a stub: a CNAME chain is followed inside the zone and the whole chain (the CNAME records, then
//! the final A/AAAA records) comes back in the answer section. It serves UDP and TCP on the same
//! loopback port (the daemon's `dns_upstream`) and remembers every question it was asked, so a
//! test can tell whether the daemon forwarded a query or kept it to itself. Messages are parsed
//! and built with hickory-proto, never by hand.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
    serialize::binary::BinDecodable as _,
};

/// The data of one record of a [`TestDnsServer`]'s zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdata {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// An alias: the target name (any case, trailing dot optional).
    Cname(String),
}

impl Rdata {
    fn record_type(&self) -> RecordType {
        match self {
            Self::A(_) => RecordType::A,
            Self::Aaaa(_) => RecordType::AAAA,
            Self::Cname(_) => RecordType::CNAME,
        }
    }
}

/// One record of a zone: owner name (any case, trailing dot optional), data, TTL in seconds.
pub type ZoneRecord = (String, Rdata, u32);

/// Shorthand for a zone record.
pub fn rec(name: &str, data: Rdata, ttl: u32) -> ZoneRecord {
    (name.to_owned(), data, ttl)
}

/// `name` as the zone keys and the question log hold it: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Zone: normalized owner name -> its records (data, TTL), in the order given.
type Zone = HashMap<String, Vec<(Rdata, u32)>>;

/// How many CNAMEs a chain may have before the server gives up (a loop in a test's zone).
const MAX_CHAIN: usize = 16;

/// One question as it arrived, with who sent it under which id: what a test needs to judge
/// the forwarder's upstream queries (ids and source ports nobody can predict).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The query's id.
    pub id: u16,
    /// Its source address and port.
    pub from: SocketAddr,
    /// The name in lower case without the trailing dot, as [`TestDnsServer::queries`] has it.
    pub name: String,
    pub qtype: RecordType,
    /// UDP (else TCP).
    pub udp: bool,
}

/// UDP answers held back by [`TestDnsServer::hold_udp`]: (reply, asker).
#[derive(Default)]
struct Hold {
    on: bool,
    pending: Vec<(Vec<u8>, SocketAddr)>,
}

struct Shared {
    zone: Mutex<Zone>,
    queries: Mutex<Vec<(String, RecordType)>>,
    exchanges: Mutex<Vec<Exchange>>,
    hold: Mutex<Hold>,
    stop: AtomicBool,
    /// Threads serving TCP connections, joined on Drop.
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// Locks `m`, also after a serving thread panicked (the data is still what the test wants).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A DNS server on 127.0.0.1, UDP and TCP on the same ephemeral port, serving a zone the test
/// sets. Background threads serve it; Drop stops and joins them.
pub struct TestDnsServer {
    addr: SocketAddr,
    /// The UDP socket's twin, for sending held answers from the server's own address and port.
    udp_out: UdpSocket,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl TestDnsServer {
    /// Starts serving `records` on an ephemeral port of 127.0.0.1.
    pub fn start(records: impl IntoIterator<Item = ZoneRecord>) -> Self {
        let (udp, tcp) = bind_pair();
        Self::serve(udp, tcp, records)
    }

    /// Starts serving `records` on `addr` (UDP and TCP), e.g. 127.0.0.1:53 inside a network
    /// namespace of the test's own, where glibc's resolver can be pointed at it.
    pub fn start_at(addr: SocketAddr, records: impl IntoIterator<Item = ZoneRecord>) -> Self {
        let udp = UdpSocket::bind(addr).expect("binding the DNS server's UDP socket");
        let tcp = TcpListener::bind(addr).expect("binding the DNS server's TCP listener");
        Self::serve(udp, tcp, records)
    }

    fn serve(
        udp: UdpSocket,
        tcp: TcpListener,
        records: impl IntoIterator<Item = ZoneRecord>,
    ) -> Self {
        let addr = udp.local_addr().expect("DNS server UDP address");
        let shared = Arc::new(Shared {
            zone: Mutex::new(zone_of(records)),
            queries: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            hold: Mutex::new(Hold::default()),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        // A short timeout on every blocking call, so the threads see `stop` soon after Drop.
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("DNS server UDP timeout");
        tcp.set_nonblocking(true)
            .expect("DNS server TCP listener non-blocking");
        let udp_out = udp.try_clone().expect("DNS server UDP socket clone");
        let threads = vec![
            {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name("test-dns-udp".into())
                    .spawn(move || serve_udp(&udp, &shared))
                    .expect("spawning the DNS server's UDP thread")
            },
            {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name("test-dns-tcp".into())
                    .spawn(move || serve_tcp(&tcp, &shared))
                    .expect("spawning the DNS server's TCP thread")
            },
        ];
        Self {
            addr,
            udp_out,
            shared,
            threads,
        }
    }

    /// Where it serves (UDP and TCP): `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the whole zone; later questions are answered from `records`.
    pub fn set(&self, records: impl IntoIterator<Item = ZoneRecord>) {
        *lock(&self.shared.zone) = zone_of(records);
    }

    /// Every question received so far, in order: (name in lower case without the trailing dot,
    /// type). Undecodable messages are not questions and are not listed.
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        lock(&self.shared.queries).clone()
    }

    /// How many questions named `name` (any case, trailing dot optional), of any type.
    pub fn queries_for(&self, name: &str) -> usize {
        let name = normalize(name);
        lock(&self.shared.queries)
            .iter()
            .filter(|(n, _)| *n == name)
            .count()
    }

    /// Forgets the questions received so far (and their [`exchanges`](Self::exchanges)).
    pub fn clear_queries(&self) {
        lock(&self.shared.queries).clear();
        lock(&self.shared.exchanges).clear();
    }

    /// Every question received so far, in order, with its id and its sender's address.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.shared.exchanges).clone()
    }

    /// From now on, UDP questions are recorded as they arrive but their answers are held back
    /// until [`release_udp`](Self::release_udp): a test can act while a query is in flight.
    pub fn hold_udp(&self) {
        lock(&self.shared.hold).on = true;
    }

    /// Sends the held answers (in the order the questions came) and answers at once again.
    /// Returns how many were sent.
    pub fn release_udp(&self) -> usize {
        let pending = {
            let mut hold = lock(&self.shared.hold);
            hold.on = false;
            std::mem::take(&mut hold.pending)
        };
        for (reply, to) in &pending {
            self.udp_out
                .send_to(reply, to)
                .expect("sending a held DNS answer");
        }
        pending.len()
    }
}

impl Drop for TestDnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let connections: Vec<_> = lock(&self.shared.connections).drain(..).collect();
        for t in connections {
            let _ = t.join();
        }
    }
}

fn zone_of(records: impl IntoIterator<Item = ZoneRecord>) -> Zone {
    let mut zone = Zone::new();
    for (name, data, ttl) in records {
        zone.entry(normalize(&name)).or_default().push((data, ttl));
    }
    zone
}

/// A UDP socket and a TCP listener on the same port of 127.0.0.1. The UDP port is ephemeral;
/// when TCP cannot take it (something else holds it), tries another.
fn bind_pair() -> (UdpSocket, TcpListener) {
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("binding the DNS server's UDP socket");
        let addr = udp.local_addr().expect("DNS server UDP address");
        match TcpListener::bind(addr) {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last = Some(e),
        }
    }
    panic!("no port of 127.0.0.1 was free for both UDP and TCP: {last:?}");
}

fn serve_udp(socket: &UdpSocket, shared: &Shared) {
    let mut buf = vec![0u8; 65_535];
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], shared, Some(from), true) {
            // Held or sent under one lock: a release never misses an answer queued meanwhile.
            let mut hold = lock(&shared.hold);
            if hold.on {
                hold.pending.push((reply, from));
            } else {
                let _ = socket.send_to(&reply, from);
            }
        }
    }
}

fn serve_tcp(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let for_conn = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("test-dns-conn".into())
                    .spawn(move || serve_connection(stream, &for_conn));
                match spawned {
                    Ok(handle) => lock(&shared.connections).push(handle),
                    Err(e) => eprintln!("test DNS server: spawning a connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("test DNS server: accept: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Serves length-prefixed messages on one connection until the peer closes it (several
/// queries per connection, as RFC 7766 allows).
fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let peer = stream.peer_addr().ok();
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .is_err()
    {
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 65_537];
    while !shared.stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(reply) = answer(&message, shared, peer, false) {
                let Ok(len) = u16::try_from(reply.len()) else {
                    return;
                };
                let mut framed = len.to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        }
    }
}

/// The reply to one received message, or None when it gets none (a response, or less than a
/// header). Over UDP a reply too large for the asker (512 bytes, or its EDNS payload size)
/// is truncated (TC set, no records), so it retries over TCP as it would with a real server.
fn answer(bytes: &[u8], shared: &Shared, from: Option<SocketAddr>, udp: bool) -> Option<Vec<u8>> {
    let request = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            // Undecodable: FORMERR to whoever sent a header we can read, as servers do.
            let header = Header::from_bytes(bytes).ok()?;
            if header.metadata.message_type != MessageType::Query {
                return None;
            }
            let reply = Message::error_msg(
                header.metadata.id,
                header.metadata.op_code,
                ResponseCode::FormErr,
            );
            return reply.to_vec().ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = request.metadata.id;
    let mut reply = Message::response(id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
    }
    if request.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
    } else if request.queries.len() != 1 {
        reply.metadata.response_code = ResponseCode::FormErr;
    } else {
        let query = &request.queries[0];
        let asked = normalize(&query.name.to_ascii());
        lock(&shared.queries).push((asked.clone(), query.query_type));
        if let Some(from) = from {
            lock(&shared.exchanges).push(Exchange {
                id,
                from,
                name: asked.clone(),
                qtype: query.query_type,
                udp,
            });
        }
        let zone = lock(&shared.zone).clone();
        match resolve(&zone, &query.name, &asked, query.query_type) {
            Some(records) => {
                reply.metadata.authoritative = true;
                reply.add_answers(records);
            }
            None => reply.metadata.response_code = ResponseCode::NXDomain,
        }
    }
    let bytes = reply.to_vec().ok()?;
    if udp && bytes.len() > usize::from(request.max_payload()) {
        return reply.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// The answer section for (`asked`, `qtype`): the CNAME chain from `asked`, then the records
/// of `qtype` at its end. None when the name (or the end of the chain) is not in the zone:
/// NXDOMAIN. A name that exists without records of `qtype` gets an empty answer (NODATA).
fn resolve(zone: &Zone, owner: &Name, asked: &str, qtype: RecordType) -> Option<Vec<Record>> {
    let mut answers = Vec::new();
    // The first owner is the name as asked (its case kept, as resolvers echo it).
    let mut owner = owner.clone();
    let mut current = asked.to_owned();
    for _ in 0..=MAX_CHAIN {
        let records = zone.get(&current)?;
        let cname = records.iter().find_map(|(data, ttl)| match data {
            Rdata::Cname(target) => Some((target.clone(), *ttl)),
            _ => None,
        });
        match cname {
            Some((target, ttl)) if qtype != RecordType::CNAME => {
                let target_name = fqdn(&target)?;
                answers.push(Record::from_rdata(
                    owner,
                    ttl,
                    RData::CNAME(CNAME(target_name.clone())),
                ));
                owner = target_name;
                current = normalize(&target);
            }
            _ => {
                for (data, ttl) in records.iter().filter(|(d, _)| d.record_type() == qtype) {
                    let rdata = match data {
                        Rdata::A(ip) => RData::A(A(*ip)),
                        Rdata::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
                        Rdata::Cname(target) => RData::CNAME(CNAME(fqdn(target)?)),
                    };
                    answers.push(Record::from_rdata(owner.clone(), *ttl, rdata));
                }
                return Some(answers);
            }
        }
    }
    // A CNAME loop: real resolvers give up with SERVFAIL; NXDOMAIN is close enough here.
    None
}

/// `name` as a fully qualified hickory Name.
fn fqdn(name: &str) -> Option<Name> {
    Name::from_str(&format!("{}.", name.trim_end_matches('.'))).ok()
}

/// One lookup reported by aw-probe's `resolve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// 0 when an answer came back; else the errno of the call that failed (11 EAGAIN or 110
    /// ETIMEDOUT: no answer in 2 s).
    pub errno: i32,
    /// The answer's RCODE (hickory's name: NoError, Refused, FormErr, NXDomain, ServFail, ...).
    pub rcode: Option<String>,
    /// The A/AAAA data of the answer section, in order.
    pub addrs: Vec<String>,
    /// The TTL of each of `addrs`.
    pub ttls: Vec<u32>,
    /// The targets of the CNAME records of the answer section, in order.
    pub cnames: Vec<String>,
    /// Who answered: recvfrom's source address (udp) or getpeername (udp-connected, tcp).
    pub from: Option<String>,
    /// The answer carried the query's id.
    pub id_ok: bool,
    /// The answer had the TC bit set.
    pub truncated: bool,
    /// Microseconds from sending the query to having the answer.
    pub us: u64,
}

/// Parses aw-probe's `resolve` lines.
pub fn parse_lookups(stdout: &[u8]) -> Vec<Lookup> {
    json_lines(stdout)
        .filter(|v| v["op"] == "resolve")
        .map(|v| Lookup {
            errno: errno_of(&v),
            rcode: v["rcode"].as_str().map(str::to_owned),
            addrs: strings(&v["addrs"]),
            ttls: v["ttls"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                        .collect()
                })
                .unwrap_or_default(),
            cnames: strings(&v["cnames"]),
            from: v["from"].as_str().map(str::to_owned),
            id_ok: v["id_ok"].as_bool().unwrap_or(false),
            truncated: v["truncated"].as_bool().unwrap_or(false),
            us: v["us"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// What aw-probe's `dns-raw` got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    /// 0 when a reply came back; else the errno of the call that failed (11 EAGAIN: none in 2 s).
    pub errno: i32,
    pub reply_len: usize,
    /// RCODE and id of the reply, when it parses as a DNS header.
    pub rcode: Option<String>,
    pub id: Option<u16>,
}

/// Parses aw-probe's `dns-raw` lines.
pub fn parse_raw(stdout: &[u8]) -> Vec<RawReply> {
    json_lines(stdout)
        .filter(|v| v["op"] == "dns-raw")
        .map(|v| RawReply {
            errno: errno_of(&v),
            reply_len: v["reply_len"]
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
            rcode: v["rcode"].as_str().map(str::to_owned),
            id: v["id"].as_u64().and_then(|i| u16::try_from(i).ok()),
        })
        .collect()
}

fn json_lines(stdout: &[u8]) -> impl Iterator<Item = serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("aw-probe JSON"))
        .collect::<Vec<_>>()
        .into_iter()
}

fn errno_of(v: &serde_json::Value) -> i32 {
    v["errno"]
        .as_i64()
        .and_then(|e| i32::try_from(e).ok())
        .unwrap_or(-1)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Lower-case hex of `bytes`, for aw-probe's `dns-raw`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A query for (`name`, `qtype`) with id `id`, as bytes.
pub fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(
        fqdn(name).expect("a valid DNS name"),
        qtype,
    ));
    m.to_vec().expect("encoding a DNS query")
}

/// A message that is not a DNS query but has a header: id `id`, a query with one question,
/// and the question ends in the middle of a label. A server answers it FORMERR with `id`.
pub fn malformed_with_header(id: u16) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    // Flags: a standard query, RD; counts: one question.
    b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    // A 63-byte label with two bytes of it.
    b.extend_from_slice(&[0x3f, b'a', b'b']);
    assert!(
        Message::from_vec(&b).is_err(),
        "the malformed message decodes"
    );
    b
}

/// `len` bytes (at least 13) of junk behind a query header with id `id`: the question's name
/// is a compression pointer past the end (0xff bytes).
pub fn oversized_junk(id: u16, len: usize) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    b.resize(len.max(13), 0xff);
    assert!(Message::from_vec(&b).is_err(), "the junk decodes");
    b
}

/// A real daemon whose DNS forwarder asks `server`, with `agents` (TOML `[[agents]]` tables)
/// and answers' TTLs bounded to [1s, 1h].
pub fn start_daemon(server: &TestDnsServer, agents: &str) -> crate::DaemonEnv {
    start_daemon_with_min_ttl(server, agents, "1s")
}

/// [`start_daemon`] with `dns_min_ttl` set to `min_ttl` (a config duration).
pub fn start_daemon_with_min_ttl(
    server: &TestDnsServer,
    agents: &str,
    min_ttl: &str,
) -> crate::DaemonEnv {
    let mut env = crate::DaemonEnv::new();
    env.set_daemon_extra(&format!(
        "dns_upstream = \"{}\"\ndns_min_ttl = \"{min_ttl}\"\ndns_max_ttl = \"1h\"\n",
        server.addr()
    ));
    env.write_config(agents);
    env.start();
    env
}
