//! Egress allow-list enforcement: the userspace half of `agentwatch-ebpf/src/egress.rs`.
//!
//! Attaches the four cgroup sock_addr programs to an agent's cgroup and writes its compiled
//! rules into the kernel's LPM tries, one rule generation at a time.

pub mod events;

use std::{os::fd::AsFd as _, path::Path};

use ipnet::{Ipv4Net, Ipv6Net};

use agentwatch_common::{
    AgentLimits, Cap, DestKey, RuleKeyV4, RuleKeyV6, RuleValue, SCOPE_BITS, SuppressedKey,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};

pub use crate::rules::egress::{CompiledRules, Proto, Rule, RuleError, compile};
use crate::{
    bpf::{
        KernelError, Link, LinkSet, ignore_missing, load::LoadEnv, load_program, map_err, take_map,
    },
    cgroup::Cgroup,
    concern::{Concern, History, Load, MapSpec, Policy, Slot},
};

/// The four egress programs, by their names in the object.
pub const PROGRAMS: [&str; 4] = [
    "egress_connect4",
    "egress_connect6",
    "egress_sendmsg4",
    "egress_sendmsg6",
];

/// The rule tries and the per-agent hard caps.
pub struct EgressMaps {
    v4: LpmTrie<MapData, RuleKeyV4, RuleValue>,
    v6: LpmTrie<MapData, RuleKeyV6, RuleValue>,
    limits: Array<MapData, AgentLimits>,
    /// Denials over an agent's event rate, counted per destination (LRU: the busiest stay).
    suppressed: HashMap<MapData, SuppressedKey, u64>,
}

/// Denials of one destination that were counted, not written one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub proto: &'static str,
    pub dest: std::net::SocketAddr,
    pub count: u64,
}

/// The hard caps of one agent, per second (None: no cap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub connects_per_second: Option<u32>,
    pub sends_per_second: Option<u32>,
    /// Denial events written one by one (the rest are counted in the kernel and summarised):
    /// the daemon's `audit_rate`.
    pub events_per_second: Option<u32>,
}

impl Load for EgressMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("LIMITS", 4, size_of::<AgentLimits>()),
        MapSpec::new(
            "RULES_V4",
            4 + size_of::<RuleKeyV4>(),
            size_of::<RuleValue>(),
        ),
        MapSpec::new(
            "RULES_V6",
            4 + size_of::<RuleKeyV6>(),
            size_of::<RuleValue>(),
        ),
        MapSpec::new("DEST_SEEN", size_of::<DestKey>(), 8),
        MapSpec::new("SUPPRESSED", size_of::<DestKey>(), 8),
    ];

    /// Takes the maps out of the object and loads (verifies) the programs.
    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        for name in PROGRAMS {
            load_program(name, program(ebpf, name)?, CgroupSockAddr::load)?;
        }
        Ok(Self {
            v4: take_map(ebpf, "RULES_V4")?,
            v6: take_map(ebpf, "RULES_V6")?,
            limits: take_map(ebpf, "LIMITS")?,
            suppressed: take_map(ebpf, "SUPPRESSED")?,
        })
    }
}

/// The rules go in generations: a new policy's rules are written beside the live ones, the
/// agent state's switch makes them live, and the old generation is retired once no program
/// can still be reading it.
impl Concern for EgressMaps {
    fn name(&self) -> &'static str {
        "egress"
    }

    fn forget(&mut self, slot: Slot, last: Option<&Policy>) -> Result<(), KernelError> {
        self.clear_caps(slot.id)?;
        match (last, slot.history) {
            (Some(p), _) => self.clear(slot.live_scope(), &p.rules),
            (None, History::Fresh) => Ok(()),
            // Whatever an earlier daemon (or a crash halfway through a write) left there.
            (None, _) => {
                self.clear_scope(slot.live_scope())?;
                self.clear_scope(slot.next_scope()).map(drop)
            }
        }
    }

    fn sweep_free_slots(
        &mut self,
        live: &std::collections::HashSet<u32>,
    ) -> Result<(), KernelError> {
        let v4: Vec<Key<RuleKeyV4>> = self
            .v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&(k.data().scope >> 1)))
            .collect();
        let v6: Vec<Key<RuleKeyV6>> = self
            .v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&(k.data().scope >> 1)))
            .collect();
        for k in &v4 {
            ignore_missing(self.v4.remove(k), "RULES_V4")?;
        }
        for k in &v6 {
            ignore_missing(self.v6.remove(k), "RULES_V6")?;
        }
        Ok(())
    }

    fn prepare(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        if slot.history == History::Adopted {
            // The other generation may hold a half-written policy of a crashed daemon.
            self.clear_scope(slot.next_scope())?;
        }
        self.write(slot.next_scope(), &new.rules)
    }

    fn abort(&mut self, slot: Slot, prepared: &Policy, _live: &Policy) -> Result<(), KernelError> {
        self.clear(slot.next_scope(), &prepared.rules)
    }

    fn apply(
        &mut self,
        slot: Slot,
        _old: Option<&Policy>,
        new: &Policy,
    ) -> Result<(), KernelError> {
        self.write_caps(
            slot.id,
            Caps {
                connects_per_second: new.connects_per_second,
                sends_per_second: new.sends_per_second,
                events_per_second: new.events_per_second,
            },
        )
    }

    fn programs(&self) -> &'static [&'static str] {
        &PROGRAMS
    }

    fn attach(
        &mut self,
        obj: &mut Ebpf,
        cgroup: &Cgroup,
        pin_dir: Option<&Path>,
        links: &mut LinkSet,
    ) -> Result<(), KernelError> {
        attach_sock_addr(obj, cgroup, pin_dir, &PROGRAMS, links)
    }

    fn retire(
        &mut self,
        slot: Slot,
        old: Option<&Policy>,
        _new: &Policy,
    ) -> Result<(), KernelError> {
        match (old, slot.history) {
            (Some(old), _) => self.clear(slot.live_scope(), &old.rules),
            // What an earlier daemon wrote is found by scanning; a fresh slot's was forgotten.
            (None, History::Adopted) => self.clear_scope(slot.live_scope()).map(drop),
            (None, _) => Ok(()),
        }
    }
}

impl EgressMaps {
    /// Writes agent `id`'s caps, keeping each cap's running state (`tat`) so a reload grants
    /// no burst.
    pub(crate) fn write_caps(&mut self, id: u32, caps: Caps) -> Result<(), KernelError> {
        let old = self.limits.get(&id, 0).unwrap_or_default();
        let cap = |per_second: Option<u32>, old: Cap| Cap {
            tat_ns: old.tat_ns,
            ..Cap::per_second(per_second.unwrap_or(0))
        };
        let limits = AgentLimits {
            connects: cap(caps.connects_per_second, old.connects),
            sends: cap(caps.sends_per_second, old.sends),
            events: cap(caps.events_per_second, old.events),
        };
        self.limits.set(id, limits, 0).map_err(map_err("LIMITS"))
    }

    /// Takes agent `id`'s per-destination counts of suppressed denials out of the kernel
    /// (they start again from 0), busiest first. The exact total is the agent's
    /// `egress_suppressed` counter; these name where the denials went, and a count the kernel
    /// adds between the read and the removal here is not named (the LRU map may also have
    /// dropped a rare destination under pressure).
    pub fn take_suppressed(&mut self, id: u32) -> Vec<Suppressed> {
        let mine: Vec<(SuppressedKey, u64)> = self
            .suppressed
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.agent == id)
            .collect();
        let mut out: Vec<Suppressed> = mine
            .into_iter()
            .map(|(k, count)| {
                let _ = self.suppressed.remove(&k);
                Suppressed {
                    proto: events::proto_name(k.proto),
                    dest: events::dest_addr(k.family, k.addr, k.port),
                    count,
                }
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then(a.dest.cmp(&b.dest)));
        out
    }

    /// Removes agent slot `id`'s caps (the next agent in the slot starts uncapped and clean).
    pub(crate) fn clear_caps(&mut self, id: u32) -> Result<(), KernelError> {
        self.limits
            .set(id, AgentLimits::default(), 0)
            .map_err(map_err("LIMITS"))
    }

    /// Writes `rules` under `scope` (an agent's rule generation). Entries are only added or
    /// replaced, never removed, so a live scope never loses a rule it keeps.
    pub(crate) fn write(&mut self, scope: u32, rules: &CompiledRules) -> Result<(), KernelError> {
        for (net, value) in &rules.v4 {
            let key = v4_key(scope, net);
            self.v4
                .insert(&key, value, 0)
                .map_err(map_err("RULES_V4"))?;
        }
        for (net, value) in &rules.v6 {
            let key = v6_key(scope, net);
            self.v6
                .insert(&key, value, 0)
                .map_err(map_err("RULES_V6"))?;
        }
        Ok(())
    }

    /// Removes the entries of `rules` under `scope`. Missing entries are not an error (a
    /// half-written generation is cleared the same way).
    pub(crate) fn clear(&mut self, scope: u32, rules: &CompiledRules) -> Result<(), KernelError> {
        for (net, _) in &rules.v4 {
            let key = v4_key(scope, net);
            ignore_missing(self.v4.remove(&key), "RULES_V4")?;
        }
        for (net, _) in &rules.v6 {
            let key = v6_key(scope, net);
            ignore_missing(self.v6.remove(&key), "RULES_V6")?;
        }
        Ok(())
    }
}

impl EgressMaps {
    /// Removes every entry under `scope`, whatever wrote it (rules of a generation this daemon
    /// did not write itself: an earlier daemon's, or a half-finished write before a crash).
    /// Scans the tries, so it is for start-up and adoption, not for every reload.
    pub(crate) fn clear_scope(&mut self, scope: u32) -> Result<usize, KernelError> {
        let v4: Vec<Key<RuleKeyV4>> = self
            .v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().scope == scope)
            .collect();
        let v6: Vec<Key<RuleKeyV6>> = self
            .v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().scope == scope)
            .collect();
        for k in &v4 {
            ignore_missing(self.v4.remove(k), "RULES_V4")?;
        }
        for k in &v6 {
            ignore_missing(self.v6.remove(k), "RULES_V6")?;
        }
        Ok(v4.len() + v6.len())
    }
}

/// LPM key of `net` under `scope`: the scope's 32 bits always match in full.
fn v4_key(scope: u32, net: &Ipv4Net) -> Key<RuleKeyV4> {
    let addr = net.network().octets();
    Key::new(
        SCOPE_BITS + u32::from(net.prefix_len()),
        RuleKeyV4 { scope, addr },
    )
}

fn v6_key(scope: u32, net: &Ipv6Net) -> Key<RuleKeyV6> {
    let addr = net.network().octets();
    Key::new(
        SCOPE_BITS + u32::from(net.prefix_len()),
        RuleKeyV6 { scope, addr },
    )
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, KernelError> {
    crate::bpf::program(ebpf, name)
}

/// Attaches cgroup sock_addr programs `names` to `cgroup` (single mode: nothing below it can
/// override them; the egress programs, and the DNS concern's reply hooks). With `pin_dir`,
/// each link is pinned there, and a link already pinned there by an earlier daemon is kept as
/// it is: re-adopting an agent never detaches it, not even for an instant.
pub(crate) fn attach_sock_addr(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    pin_dir: Option<&Path>,
    names: &[&'static str],
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    let dir = cgroup.dir()?;
    for &name in names {
        let link = Link::pinned_or_attach(pin_dir, name, || {
            let attach_err = |source| KernelError::Attach {
                name,
                cgroup: cgroup.path().display().to_string(),
                source,
            };
            let prog = program(ebpf, name)?;
            let id = prog
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            // Only kernels before 5.7 lack bpf_link; there the link is not fd-based.
            FdLink::try_from(link).map_err(|source| KernelError::Link { name, source })
        });
        links.push(link?);
    }
    Ok(())
}
