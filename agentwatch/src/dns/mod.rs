//! Hostname rules: the userspace half of `agentwatch-ebpf/src/dns.rs`.
//!
//! An agent with hostname rules (`tcp api.example.com 443`) gets its own forwarder: a UDP
//! socket and a TCP listener on 127.0.0.1 and on ::1, on ports the kernel picked. The egress
//! hooks send every DNS call of the agent there, whatever resolver it named, so the port a
//! query arrives on says which agent asked: no race and nothing to correlate. The forwarder
//! refuses names no rule allows, asks the upstream resolver for the others, writes the answer's
//! addresses into that agent's kernel allow-list ([`Learned`]) with the rule's protocol and
//! ports and a deadline the kernel checks itself, and only then answers.
//!
//! - [`crate::rules::names`]: hostname rules and how names match them;
//! - [`message`]: reading queries and answers, building replies (hickory-proto);
//! - [`forwarder`]: the per-agent sockets and the query path.

pub mod forwarder;
pub mod message;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use agentwatch_common::{DNS_RANGES, DNS_VERDICTS, DnsKey, DnsPorts, DnsRange, DnsValue};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink},
};

pub use crate::rules::names::{HostRule, HostRules, NamePattern};
use crate::{
    bpf::{
        KernelError, Link, LinkSet, ignore_missing, load::LoadEnv, load_program, map_err, program,
        take_map,
    },
    cgroup::Cgroup,
    concern::{Concern, Load, MapSpec, Policy, Slot},
};
pub use forwarder::{Endpoint, Forwarder, Settings, Stats};

/// The reply hooks, attached to every agent's cgroup beside the egress programs: they show a
/// redirected socket the resolver it asked as its peer.
pub const PROGRAMS: [&str; 4] = [
    "dns_recvmsg4",
    "dns_recvmsg6",
    "dns_getpeername4",
    "dns_getpeername6",
];

/// The sock_release hook that forgets a redirected socket's resolver when the socket goes.
pub const RELEASE_PROGRAM: &str = "dns_release";

/// Every program the DNS concern attaches to an agent's cgroup.
const ALL_PROGRAMS: [&str; 5] = [
    PROGRAMS[0],
    PROGRAMS[1],
    PROGRAMS[2],
    PROGRAMS[3],
    RELEASE_PROGRAM,
];

/// The forwarder ports per agent, and the learned addresses.
pub struct DnsMaps {
    ports: Array<MapData, DnsPorts>,
    learned: Learned,
}

impl Load for DnsMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("DNS_PORTS", 4, size_of::<DnsPorts>()),
        MapSpec::new("DNS_ALLOW", size_of::<DnsKey>(), size_of::<DnsValue>()),
        MapSpec::new("DNS_ORIG", 8, size_of::<agentwatch_common::DnsOrig>()),
        MapSpec::new("DNS_COUNTS", 4, 8 * DNS_VERDICTS),
    ];

    /// Takes the maps out of the object and loads (verifies) the programs.
    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        for name in PROGRAMS {
            load_program(name, program(ebpf, name)?, CgroupSockAddr::load)?;
        }
        load_program(
            RELEASE_PROGRAM,
            program::<CgroupSock>(ebpf, RELEASE_PROGRAM)?,
            CgroupSock::load,
        )?;
        Ok(Self {
            ports: take_map(ebpf, "DNS_PORTS")?,
            learned: Learned::new(take_map(ebpf, "DNS_ALLOW")?, take_map(ebpf, "DNS_COUNTS")?),
        })
    }
}

/// A forwarder's ports go in before the flag sends the agent's DNS there; a dropped one's stay
/// until the flag no longer does.
impl Concern for DnsMaps {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn sweep_free_slots(&mut self, live: &HashSet<u32>) -> Result<(), KernelError> {
        self.learned.retain_agents(live)
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        self.clear(slot.id)
    }

    fn apply(&mut self, slot: Slot, old: Option<&Policy>, new: &Policy) -> Result<(), KernelError> {
        match (old, new.dns) {
            // Guarding: the ports are exactly the policy's.
            (None, ports) => self.write_ports(slot.id, ports.unwrap_or_default()),
            (Some(_), Some(ports)) => self.write_ports(slot.id, ports),
            (Some(_), None) => Ok(()),
        }
    }

    fn programs(&self) -> &'static [&'static str] {
        &ALL_PROGRAMS
    }

    /// Only agents with hostname rules: the reply hooks run on every receive and the release
    /// hook on every close of the agent's sockets, and only redirected sockets need them.
    fn needed_by(&self, policy: &Policy) -> bool {
        policy.dns.is_some()
    }

    fn attach(
        &mut self,
        obj: &mut Ebpf,
        cgroup: &Cgroup,
        pin_dir: Option<&Path>,
        links: &mut LinkSet,
    ) -> Result<(), KernelError> {
        attach(obj, cgroup, pin_dir, links)
    }

    fn retire(
        &mut self,
        slot: Slot,
        old: Option<&Policy>,
        new: &Policy,
    ) -> Result<(), KernelError> {
        if new.dns.is_none() && old.is_some_and(|o| o.dns.is_some()) {
            self.clear(slot.id)?;
        }
        Ok(())
    }
}

impl DnsMaps {
    /// Writes where agent `id`'s forwarder listens (default: nowhere, its DNS is denied).
    pub(crate) fn write_ports(&mut self, id: u32, ports: DnsPorts) -> Result<(), KernelError> {
        self.ports.set(id, ports, 0).map_err(map_err("DNS_PORTS"))
    }

    /// Clears agent slot `id`: no forwarder, no learned address.
    pub(crate) fn clear(&mut self, id: u32) -> Result<(), KernelError> {
        self.write_ports(id, DnsPorts::default())?;
        self.learned.forget_agent(id)
    }

    /// The learned addresses (shared with the forwarder).
    pub fn learned(&self) -> Learned {
        self.learned.clone()
    }
}

/// Attaches the reply hooks and the release hook to `cgroup` (pinned like the egress
/// programs; pins of an earlier daemon are adopted).
fn attach(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    crate::egress::attach_sock_addr(ebpf, cgroup, pin_dir, &PROGRAMS, links)?;
    let dir = cgroup.dir()?;
    let release = Link::pinned_or_attach(pin_dir, RELEASE_PROGRAM, || {
        let attach_err = |source| KernelError::Attach {
            name: RELEASE_PROGRAM,
            cgroup: cgroup.path().display().to_string(),
            source,
        };
        let prog = program::<CgroupSock>(ebpf, RELEASE_PROGRAM)?;
        let id = prog
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|source| KernelError::Link {
            name: RELEASE_PROGRAM,
            source,
        })
    })?;
    links.push(release);
    Ok(())
}

/// The addresses DNS answers admitted, per agent: the kernel's `DNS_ALLOW` with a copy kept
/// here (the forwarder merges into entries without reading the kernel, and expiry needs no
/// scan of it), and each agent's hostname rules, against which every write is checked under
/// the same lock: an answer that raced a reload is judged by the rules in force.
#[derive(Clone)]
pub struct Learned(Arc<Mutex<Table>>);

struct Table {
    map: HashMap<MapData, DnsKey, DnsValue>,
    mirror: StdHashMap<DnsKey, DnsValue>,
    rules: StdHashMap<u32, Arc<HostRules>>,
    /// Queries per agent and verdict (`DNS_ALLOWED`...), written through on every query.
    counts: Array<MapData, [u64; DNS_VERDICTS]>,
}

/// The key of `addr` learned for agent `id`, as the egress hook looks it up.
pub fn key_of(id: u32, addr: IpAddr) -> DnsKey {
    let mut key = DnsKey {
        agent: id,
        ..DnsKey::default()
    };
    match addr {
        IpAddr::V4(a) => {
            key.family = 4;
            key.addr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => {
                key.family = 4;
                key.addr[..4].copy_from_slice(&v4.octets());
            }
            None => {
                key.family = 6;
                key.addr = a.octets();
            }
        },
    }
    key
}

fn ranges_of(value: &DnsValue) -> Vec<DnsRange> {
    let n = usize::try_from(value.count).unwrap_or(0).min(DNS_RANGES);
    value.ranges[..n].to_vec()
}

fn value_of(ranges: &[DnsRange]) -> DnsValue {
    let mut value = DnsValue {
        count: u32::try_from(ranges.len()).unwrap_or(0),
        ..DnsValue::default()
    };
    value.ranges[..ranges.len()].copy_from_slice(ranges);
    value
}

impl Learned {
    fn new(
        map: HashMap<MapData, DnsKey, DnsValue>,
        counts: Array<MapData, [u64; DNS_VERDICTS]>,
    ) -> Self {
        // What an earlier daemon learned stays (its deadlines hold in the kernel); the rules
        // registered for each agent decide which of it is kept.
        let mirror = map.iter().filter_map(Result::ok).collect();
        Self(Arc::new(Mutex::new(Table {
            map,
            mirror,
            rules: StdHashMap::new(),
            counts,
        })))
    }

    /// Counts one query of agent `id` with `verdict` (`DNS_ALLOWED`...).
    pub fn count(&self, id: u32, verdict: usize) {
        let t = &mut *self.lock();
        let mut c = t.counts.get(&id, 0).unwrap_or_default();
        if let Some(slot) = c.get_mut(verdict) {
            *slot += 1;
        }
        if let Err(e) = t.counts.set(id, c, 0) {
            tracing::warn!(agent_id = id, "counting a DNS query: {e}");
        }
    }

    /// Agent `id`'s queries by verdict.
    pub fn counts(&self, id: u32) -> [u64; DNS_VERDICTS] {
        self.lock().counts.get(&id, 0).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets agent `id`'s hostname rules and keeps only what rules still configured admitted
    /// (a rule's identity covers its name, protocol and ports, so what it admitted stays true).
    pub fn register(&self, id: u32, rules: Arc<HostRules>) -> Result<(), KernelError> {
        let ids = rules.ids();
        let mut t = self.lock();
        t.rules.insert(id, rules);
        t.rewrite(|k| k.agent == id, |r| ids.contains(&r.rule))
    }

    /// Agent `id`'s hostname rules, if it has a forwarder.
    pub fn rules(&self, id: u32) -> Option<Arc<HostRules>> {
        self.lock().rules.get(&id).cloned()
    }

    /// Removes agent `id`'s rules and every address learned for it.
    pub fn forget_agent(&self, id: u32) -> Result<(), KernelError> {
        let mut t = self.lock();
        t.rules.remove(&id);
        t.counts
            .set(id, [0; DNS_VERDICTS], 0)
            .map_err(map_err("DNS_COUNTS"))?;
        t.rewrite(|k| k.agent == id, |_| false)
    }

    /// Removes what was learned for agents other than `live` (an earlier daemon's agents).
    pub fn retain_agents(&self, live: &HashSet<u32>) -> Result<(), KernelError> {
        let mut t = self.lock();
        t.rules.retain(|id, _| live.contains(id));
        t.rewrite(|k| !live.contains(&k.agent), |_| false)
    }

    /// Admits `addrs`, each for its TTL from `now_ns`, for agent `id` under every rule of its
    /// that allows `name` (judged on its labels). `Ok(false)`: no rule in force allows `name`
    /// (nothing written).
    pub fn admit(
        &self,
        id: u32,
        name: &hickory_proto::rr::Name,
        addrs: &[(IpAddr, Duration)],
        now_ns: u64,
    ) -> Result<bool, KernelError> {
        let mut t = self.lock();
        let Some(rules) = t.rules.get(&id).cloned() else {
            return Ok(false);
        };
        let matched: Vec<(u64, &HostRule)> = rules.matching(name).map(|r| (r.id(), r)).collect();
        if matched.is_empty() {
            return Ok(false);
        }
        for &(addr, ttl) in addrs {
            let key = key_of(id, addr);
            let deadline = now_ns.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
            let mut ranges: Vec<DnsRange> = t
                .mirror
                .get(&key)
                .map(ranges_of)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.expires_ns > now_ns)
                .collect();
            for &(rule_id, rule) in &matched {
                match ranges.iter_mut().find(|r| r.rule == rule_id) {
                    Some(r) => r.expires_ns = r.expires_ns.max(deadline),
                    None => ranges.push(DnsRange {
                        expires_ns: deadline,
                        rule: rule_id,
                        lo: rule.ports.lo,
                        hi: rule.ports.hi,
                        protos: rule.proto.bits(),
                        _pad: [0; 3],
                    }),
                }
            }
            // More rules than the kernel's slots: keep those that last longest.
            ranges.sort_by_key(|r| std::cmp::Reverse(r.expires_ns));
            ranges.truncate(DNS_RANGES);
            let value = value_of(&ranges);
            t.map.insert(key, value, 0).map_err(map_err("DNS_ALLOW"))?;
            t.mirror.insert(key, value);
        }
        Ok(true)
    }

    /// Removes entries whose every deadline passed (the kernel already refuses them; this
    /// frees their slots). Returns how many went.
    pub fn expire(&self, now_ns: u64) -> Result<usize, KernelError> {
        let mut t = self.lock();
        let before = t.mirror.len();
        t.rewrite(|_| true, |r| r.expires_ns > now_ns)?;
        Ok(before - t.mirror.len())
    }

    /// Does agent `id` hold a learned address `addr` (for any protocol and port)?
    pub fn holds(&self, id: u32, addr: IpAddr) -> bool {
        self.lock().mirror.contains_key(&key_of(id, addr))
    }

    /// Addresses currently learned for agent `id` (expired ones not yet swept included).
    pub fn addresses(&self, id: u32) -> usize {
        self.lock().mirror.keys().filter(|k| k.agent == id).count()
    }
}

impl Table {
    /// For entries whose key passes `select`, keeps the ranges that pass `keep`; writes the
    /// changed entries and removes the emptied ones.
    fn rewrite(
        &mut self,
        select: impl Fn(&DnsKey) -> bool,
        keep: impl Fn(&DnsRange) -> bool,
    ) -> Result<(), KernelError> {
        let changed: Vec<(DnsKey, Vec<DnsRange>)> = self
            .mirror
            .iter()
            .filter(|(k, _)| select(k))
            .filter_map(|(k, v)| {
                let all = ranges_of(v);
                let kept: Vec<DnsRange> = all.iter().copied().filter(|r| keep(r)).collect();
                (kept.len() != all.len()).then_some((*k, kept))
            })
            .collect();
        for (key, kept) in changed {
            if kept.is_empty() {
                ignore_missing(self.map.remove(&key), "DNS_ALLOW")?;
                self.mirror.remove(&key);
            } else {
                let value = value_of(&kept);
                self.map
                    .insert(key, value, 0)
                    .map_err(map_err("DNS_ALLOW"))?;
                self.mirror.insert(key, value);
            }
        }
        Ok(())
    }
}
