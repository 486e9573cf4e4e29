//! Guarded agents: the userspace half of `agentwatch-ebpf/src/agent.rs`.
//!
//! [`Agents`] owns the loaded kernel object and, per agent, its id, cgroup, live rule
//! generation, policy and links. The order of every operation is chosen so that no call of an
//! agent is ever judged without a complete policy: state and rules are written before programs
//! attach, a new rule generation is complete before one map write makes it live, exec paths
//! allowed by both the old and the new list stay allowed throughout, and a daemon that
//! re-adopts pinned agents never detaches anything. Guarding, re-applying and forgetting are
//! one loop over the concerns ([`crate::concern`]), phase by phase; what is here is the
//! switch between the phases (one write of the agent's state) and the links.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use agentwatch_common::{
    AgentCounters, AgentState, LSM_EXEC, LSM_FILES, LSM_SOCKETS, MAX_AGENTS, Settings,
};
use aya::maps::{MapData, RingBuf};

pub use crate::concern::Policy;
use crate::{
    bpf::{KernelError, Link, LinkSet, LinkState, PinDir, map_err, remove_link_dir},
    cgroup::{self, Cgroup, Presence},
    concern::{Concern, History, POLICY_FLAGS, Slot},
    egress, exec,
    files::{self, FileRule},
    kernel::{Checkpoint, Kernel},
    lease, sockets, syscalls,
};

/// One guarded agent.
struct Guarded {
    id: u32,
    cgroup: Cgroup,
    /// The cgroup's cgroup.events, held open: the sweep asks it every second whether the
    /// cgroup is still there and whether anything runs in it ([`Agents::refresh_presence`]).
    events: cgroup::Events,
    /// What `events` said when last read.
    presence: Presence,
    /// Whether the cgroup may have cgroups below it, as of the last
    /// [`Agents::refresh_presence`] ([`cgroup::Events::has_nested`]).
    nested: bool,
    cgroup_id: u64,
    /// Depth of the cgroup below the cgroup2 root.
    level: u32,
    state: AgentState,
    policy: Policy,
    links: Vec<Link>,
    /// Adopted from an earlier daemon's pinned state (not new to the kernel).
    adopted: bool,
    /// Links found detached or missing and not attached again yet (it failed): tried again by
    /// the next [`Agents::check_links`].
    lost: Vec<Lost>,
    /// Links this daemon had to attach anew when it adopted the agent because they were gone
    /// (their pin was removed while no daemon held them), for [`Agents::check_links`] to report.
    found_at_start: Vec<Restored>,
}

impl Guarded {
    /// The programs it has links of, attached or lost (awaiting `check_links`).
    fn program_names(&self) -> HashSet<&'static str> {
        self.links
            .iter()
            .map(Link::name)
            .chain(self.lost.iter().map(|l| l.program))
            .collect()
    }

    /// Its slot as the phases see it: this daemon wrote its live policy.
    fn slot(&self) -> Slot {
        Slot {
            id: self.id,
            cgroup_id: self.cgroup_id,
            generation: self.state.generation,
            history: History::Live,
        }
    }
}

/// A link found detached or missing, not attached again yet.
#[derive(Debug, Clone, Copy)]
struct Lost {
    program: &'static str,
    found: LinkState,
    old_id: Option<u32>,
}

/// A link of an agent (or a host-wide one) that [`Agents::check_links`] found no longer
/// attached, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The agent whose link it was; None for a host-wide link.
    pub agent: Option<String>,
    /// The program's name in the object.
    pub program: &'static str,
    /// [`LinkState::Detached`] or [`LinkState::Missing`].
    pub found: LinkState,
    /// The kernel id of the link that was found so (None when it was gone before this daemon
    /// held it).
    pub old_id: Option<u32>,
    /// The kernel id of the link attached in its place, or why it could not be attached (tried
    /// again every time).
    pub result: Result<u32, String>,
    /// Found when this daemon started: the link went while no daemon ran.
    pub at_start: bool,
}

/// What a committed policy replaced, for [`Agents::retire`] to remove (each concern's
/// [`crate::concern::Concern::retire`]: the old rule generation, DNS ports no longer used).
#[must_use = "the old generation stays in the kernel's maps until retired"]
pub struct Retired {
    name: String,
    /// The slot as it was before the switch.
    slot: Slot,
    old: Policy,
}

/// A policy written beside agent `name`'s live one, waiting for [`Agents::commit_policy`] or
/// [`Agents::abort_policy`].
#[derive(Debug)]
pub struct PreparedPolicy {
    name: String,
    policy: Policy,
    /// The slot it was written beside (its live generation).
    slot: Slot,
}

impl PreparedPolicy {
    /// The agent it is for.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What [`Agents::info`] reports about one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: u32,
    pub cgroup_id: u64,
    pub state: AgentState,
}

/// How [`Agents::guard`] found the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarding {
    /// New to the kernel: fresh id, counters from 0.
    New,
    /// Already in the kernel's pinned state (an earlier daemon): same id, counters and flags;
    /// its links were kept attached throughout.
    Adopted,
}

/// What [`Agents::forget_stale`] removed: agents a previous daemon guarded that are no longer
/// configured.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stale {
    pub states: usize,
    pub link_dirs: Vec<String>,
}

/// The set of guarded agents and the kernel object that guards them.
pub struct Agents {
    kernel: Kernel,
    mount: PathBuf,
    by_name: BTreeMap<String, Guarded>,
    /// Moves on whenever an agent is guarded or forgotten ([`Agents::membership`]).
    membership: u64,
    /// Exec/fork tracepoints, attached host-wide for as long as this object lives.
    host: Vec<Link>,
    /// The sys_enter hook, while some agent monitors syscalls.
    syscalls: Option<Link>,
    /// The file guard's programs, while some agent has a file list.
    file_guard: Option<Vec<Link>>,
    /// Host-wide links found detached or missing and not attached again yet: of `host`, of
    /// `file_guard` and of `syscalls` (each group is attached again on its own).
    host_lost: [Vec<Lost>; 3],
    /// Host-wide links attached anew at start because they were gone (see `found_at_start`).
    host_found_at_start: Vec<Restored>,
    /// Free slots that may not be clean: freed while this daemon ran (a program that found
    /// the agent's state just before it went may still have counted for it after it was
    /// forgotten), or forgotten halfway. Guarding one forgets it in full first, by scanning,
    /// as for a stale agent; only slots free since load are clean by construction.
    unclean: HashSet<u32>,
}

/// Attaches (or adopts the pins of) the host-wide programs every daemon runs: the exec/fork
/// and socket tracepoints, and with BPF LSM the exec and packet-socket programs. All or
/// nothing: what this call attached is detached again if a later one fails (adopted pins stay).
fn attach_host(
    kernel: &mut Kernel,
    dir: Option<&std::path::Path>,
) -> Result<Vec<Link>, KernelError> {
    let lsm = kernel.files.lsm();
    let ebpf = &mut kernel.ebpf;
    LinkSet::build(|links| {
        exec::attach(ebpf, dir, links)?;
        sockets::attach_host(ebpf, dir, links)?;
        files::attach_host(ebpf, lsm, dir, links)
    })
}

/// Attaches (or adopts the pins of) the programs of the concerns `want` picks to `cgroup`.
/// All or nothing: what this call attached is detached again if a later one fails (adopted
/// pins stay).
fn attach_agent(
    kernel: &mut Kernel,
    cgroup: &Cgroup,
    pin_dir: Option<&std::path::Path>,
    want: impl Fn(&dyn Concern) -> bool,
) -> Result<Vec<Link>, KernelError> {
    let (ebpf, concerns) = kernel.concerns();
    LinkSet::build(|links| {
        concerns
            .into_iter()
            .filter(|c| want(&**c))
            .try_for_each(|c| c.attach(ebpf, cgroup, pin_dir, links))
    })
}

/// The concerns an agent under `policy` has attached: those the policy needs, and those whose
/// programs it had (`had`: a link of that name attached, lost or pinned), which stay.
fn attached_for(policy: &Policy, had: impl Fn(&str) -> bool) -> impl Fn(&dyn Concern) -> bool {
    move |c| c.needed_by(policy) || c.programs().iter().any(|p| had(p))
}

/// Finds the links of `links` the kernel no longer has attached (`cgroup_id`: where cgroup
/// links must be attached), adds them to `lost`, and if any are lost attaches the group again
/// with `attach`: with the lost links' pins removed, it adopts the pins of those still
/// attached (never detached, not for an instant) and attaches the lost ones anew, pinned where
/// they were. Returns what it found lost and what became of each.
fn restore_group(
    links: &mut Vec<Link>,
    cgroup_id: Option<u64>,
    lost: &mut Vec<Lost>,
    attach: impl FnOnce() -> Result<Vec<Link>, KernelError>,
) -> Vec<(Lost, Result<u32, String>)> {
    let mut kept = Vec::with_capacity(links.len());
    for link in std::mem::take(links) {
        let found = link.kernel_state(cgroup_id);
        if found == LinkState::Attached {
            kept.push(link);
            continue;
        }
        lost.push(Lost {
            program: link.name(),
            found,
            old_id: link.id(),
        });
        if let Err(e) = link.discard() {
            tracing::warn!("forgetting a link that no longer guards: {e}");
        }
    }
    if lost.is_empty() {
        *links = kept;
        return Vec::new();
    }
    // Attaching adopts the pins of the links still attached: each must have one (pinned again
    // if its pin went), or it would be attached a second time beside itself.
    for link in &kept {
        if let Err(e) = link.repin() {
            tracing::warn!(link = link.name(), "pinning a link again: {e}");
        }
    }
    match attach() {
        Ok(new) => {
            let out = std::mem::take(lost)
                .into_iter()
                .map(|l| {
                    let id = new
                        .iter()
                        .find(|n| n.name() == l.program)
                        .and_then(Link::id)
                        .ok_or_else(|| "not attached again".to_owned());
                    (l, id)
                })
                .collect();
            // The old fds of the links kept close here; their pins hold them.
            *links = new;
            out
        }
        Err(e) => {
            *links = kept;
            let e = e.to_string();
            lost.iter().map(|l| (*l, Err(e.clone()))).collect()
        }
    }
}

impl Agents {
    /// Loads the kernel object with private maps; links are owned and detach on drop.
    pub fn load() -> Result<Self, KernelError> {
        Self::new(Kernel::load()?)
    }

    /// Loads the kernel object with maps and links pinned under `pins`, so enforcement outlives
    /// this process; what an earlier daemon pinned there is reused.
    pub fn load_pinned(pins: PinDir) -> Result<Self, KernelError> {
        Self::new(Kernel::load_pinned(pins)?)
    }

    fn new(mut kernel: Kernel) -> Result<Self, KernelError> {
        let host_dir = kernel.pins().map(PinDir::host_links);
        // An earlier daemon that got as far as its first checkpoint had every host-wide link
        // pinned: one it lacks now went while no daemon ran.
        let had_host = kernel.checkpoint(0).is_some_and(|c| c.links > 0);
        let host = attach_host(&mut kernel, host_dir.as_deref())?;
        let lsm = kernel.files.lsm();
        // An earlier daemon's file guard is adopted (never a moment detached); sync_files
        // drops it if no agent needs it.
        let file_guard = match &host_dir {
            Some(dir) if files::guard_pinned(dir, lsm) => Some(LinkSet::build(|links| {
                files::attach_guard(&mut kernel.ebpf, lsm, Some(dir), links)
            })?),
            _ => None,
        };
        // An earlier daemon's sys_enter pin is adopted; sync_syscalls drops it if unneeded.
        let syscalls = match &host_dir {
            Some(dir) if syscalls::pinned(dir) => {
                Some(syscalls::attach(&mut kernel.ebpf, Some(dir))?)
            }
            _ => None,
        };
        // Every free slot clean from the start (an earlier daemon may have crashed while it
        // forgot an agent), one pass over each map: guarding a new agent then scans none.
        let live: HashSet<u32> = kernel.agent_states().iter().map(|(_, s)| s.id).collect();
        let (_, concerns) = kernel.concerns();
        for c in concerns {
            c.sweep_free_slots(&live)?;
        }
        let host_found_at_start = if had_host {
            found_anew(None, host.iter().chain(file_guard.iter().flatten()))
        } else {
            Vec::new()
        };
        Ok(Self {
            kernel,
            mount: cgroup::cgroup2_mount()?,
            by_name: BTreeMap::new(),
            membership: 0,
            host,
            syscalls,
            file_guard,
            host_lost: Default::default(),
            host_found_at_start,
            unclean: HashSet::new(),
        })
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut Kernel {
        &mut self.kernel
    }

    /// The event ring buffer (one reader).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.kernel.take_events()
    }

    fn free_id(&self) -> Result<u32, KernelError> {
        let used: HashSet<u32> = self
            .kernel
            .agent_states()
            .into_iter()
            .map(|(_, s)| s.id)
            .chain(self.by_name.values().map(|g| g.id))
            .collect();
        // Id 0 counts calls that match no agent; agents use 1.. .
        (1..MAX_AGENTS)
            .find(|id| !used.contains(id))
            .ok_or(KernelError::NoAgentSlot(MAX_AGENTS - 1))
    }

    fn level_of(&self, cgroup: &Cgroup) -> u32 {
        cgroup.path().strip_prefix(&self.mount).map_or(0, |rel| {
            u32::try_from(rel.components().count()).unwrap_or(0)
        })
    }

    /// Starts guarding `cgroup` as agent `name`. An agent the kernel already knows (pinned
    /// state of an earlier daemon) is adopted: same id, counters and kill/breaker flags, its
    /// pinned links kept attached, its policy replaced atomically.
    pub fn guard(
        &mut self,
        name: &str,
        cgroup: Cgroup,
        policy: impl Into<Policy>,
    ) -> Result<Guarding, KernelError> {
        let policy = policy.into();
        if self.by_name.contains_key(name) {
            return Err(KernelError::AlreadyGuarded(name.to_owned()));
        }
        // Opened before the id is read: if the cgroup is replaced in between, these events are
        // of the old one, found gone by the next sweep, which guards the agent again.
        let events = cgroup.events()?;
        let presence = events.presence()?;
        let cgroup_id = cgroup.id()?;
        let level = self.level_of(&cgroup);
        if level == 0 {
            return Err(KernelError::Cgroup(cgroup::CgroupError::BadPath(
                cgroup.path().display().to_string(),
            )));
        }
        self.attach_file_guard(policy.files.is_some())?;
        let (mut state, slot) = match self.kernel.agents.get(&cgroup_id, 0).ok() {
            Some(state) => (
                state,
                Slot {
                    id: state.id,
                    cgroup_id,
                    generation: state.generation,
                    history: History::Adopted,
                },
            ),
            None => {
                // A fresh slot has no live generation: its first is 0, written as the next
                // after an (empty) 1.
                let id = self.free_id()?;
                let state = AgentState {
                    id,
                    generation: 1,
                    flags: 0,
                    _pad: 0,
                };
                let slot = Slot {
                    id,
                    cgroup_id,
                    generation: 1,
                    history: History::Fresh,
                };
                // The shared maps' slot (counters, trips, checkpoint), and each concern's O(1)
                // part; a slot freed since load is first forgotten in full.
                if self.unclean.contains(&id) {
                    self.forget_slot(
                        Slot {
                            history: History::Adopted,
                            ..slot
                        },
                        None,
                    )?;
                    self.unclean.remove(&id);
                }
                self.forget_slot(slot, None)?;
                (state, slot)
            }
        };
        let how = match slot.history {
            History::Fresh => Guarding::New,
            _ => Guarding::Adopted,
        };
        self.write_policy(slot, &policy)?;
        state.generation = slot.generation ^ 1;
        state.flags = (state.flags & !POLICY_FLAGS) | policy.flags();
        self.write_state(cgroup_id, state)?;
        if how == Guarding::New {
            crate::crash::point("guard.state");
        }
        self.write_settings(Some(level))?;
        let pin_dir = self.kernel.pins().map(|p| p.agent_links(name, cgroup_id));
        // An earlier daemon's pinned links are adopted, needed or not.
        let pinned = |p: &str| pin_dir.as_ref().is_some_and(|d| d.join(p).exists());
        let want = attached_for(&policy, pinned);
        let links = match attach_agent(&mut self.kernel, &cgroup, pin_dir.as_deref(), want) {
            Ok(links) => links,
            Err(e) => {
                if how == Guarding::New {
                    // No half-guarded agent: nothing of it stays in the kernel.
                    self.undo_state(cgroup_id);
                    self.unclean.insert(slot.id);
                    let written = Slot {
                        generation: state.generation,
                        history: History::Live,
                        ..slot
                    };
                    let (_, concerns) = self.kernel.concerns();
                    for c in concerns {
                        if let Err(e) = c.forget(written, Some(&policy)) {
                            tracing::warn!(agent = name, "undoing {}: {e}", c.name());
                        }
                    }
                }
                return Err(e);
            }
        };
        self.settle(slot, &policy)?;
        if how == Guarding::Adopted {
            // A call that read the old generation may still be looking its rules up.
            crate::bpf::load::wait_for_running_programs();
            let (_, concerns) = self.kernel.concerns();
            for c in concerns {
                c.retire(slot, None, &policy)?;
            }
        }
        // The processes already in the cgroup belong to the agent (the kernel records later
        // ones itself, at fork and when they move in). Listed after the state is written, so a
        // fork in between is seen by one or the other.
        let pids = cgroup.all_pids()?;
        self.kernel.sockets.seed_tasks(cgroup_id, &pids)?;
        self.kernel.sockets.sync_nested(cgroup_id, &cgroup, true)?;
        let adopted = how == Guarding::Adopted;
        // An adopted agent whose earlier daemon checkpointed it fully guarded had every link
        // pinned: one attached anew now was gone while no daemon ran. (A daemon killed halfway
        // through guarding it never checkpointed it: its links are simply new.)
        let found_at_start = match self.kernel.checkpoint(state.id) {
            Some(c) if adopted && c.cgroup_id == cgroup_id && c.links > 0 => {
                found_anew(Some(name), links.iter())
            }
            _ => Vec::new(),
        };
        if !adopted {
            // A checkpoint of an agent that had this slot before is not this one's. Failing
            // that is no reason to leave the agent unguarded: the next sweep writes it anyway.
            let fresh = Checkpoint {
                at_ns: crate::bpf::ktime_ns(),
                cgroup_id,
                denied_baseline_milli: crate::kernel::NO_BASELINE,
                ..Checkpoint::default()
            };
            if let Err(e) = self.kernel.set_checkpoint(state.id, fresh) {
                tracing::warn!(agent = name, "resetting the agent's checkpoint: {e}");
            }
        }
        self.membership += 1;
        self.by_name.insert(
            name.to_owned(),
            Guarded {
                id: state.id,
                cgroup,
                nested: events.has_nested(),
                events,
                presence,
                cgroup_id,
                level,
                state,
                policy,
                links,
                adopted,
                lost: Vec::new(),
                found_at_start,
            },
        );
        self.sync_syscalls()?;
        Ok(how)
    }

    /// Replaces the policy of agent `name`: [`Agents::prepare_policy`],
    /// [`Agents::commit_policy`], then [`Agents::retire`].
    pub fn set_policy(&mut self, name: &str, policy: impl Into<Policy>) -> Result<(), KernelError> {
        let prepared = self.prepare_policy(name, policy)?;
        let retired = self.commit_policy(prepared)?;
        self.retire(vec![retired])
    }

    /// Removes what committed policies left behind (their old rule generation, DNS ports no
    /// longer used) once no program can still be using it: after one RCU grace period for
    /// the whole batch (a reload of a thousand agents waits once, not a thousand times).
    pub fn retire(&mut self, retired: Vec<Retired>) -> Result<(), KernelError> {
        if retired.is_empty() {
            return Ok(());
        }
        crate::bpf::load::wait_for_running_programs();
        // An agent unguarded since has no policy in force: whatever it had goes.
        let none = Policy::default();
        for r in retired {
            let new = self.by_name.get(&r.name).map_or(&none, |g| &g.policy);
            let (_, concerns) = self.kernel.concerns();
            for c in concerns {
                c.retire(r.slot, Some(&r.old), new)?;
            }
        }
        self.sync_syscalls()
    }

    /// Writes everything of agent `name`'s new policy that can be written beside the live one
    /// (each concern's `prepare`): its rules into the agent's other generation, and the exec
    /// paths and file prefixes it adds (one on both lists is allowed at every instant).
    /// Nothing the kernel judges by changes yet, but for those additions. On failure what was
    /// written is removed again.
    pub fn prepare_policy(
        &mut self,
        name: &str,
        policy: impl Into<Policy>,
    ) -> Result<PreparedPolicy, KernelError> {
        let slot = self.get(name)?.slot();
        let prepared = PreparedPolicy {
            name: name.to_owned(),
            policy: policy.into(),
            slot,
        };
        let (_, concerns) = self.kernel.concerns();
        let written = concerns
            .into_iter()
            .try_for_each(|c| c.prepare(slot, &prepared.policy));
        let written = written.and_then(|()| self.attach_newly_needed(name, &prepared.policy));
        match written {
            Ok(()) => Ok(prepared),
            Err(e) => {
                self.abort_policy(prepared);
                Err(e)
            }
        }
    }

    /// Attaches the concerns `policy` needs that agent `name` has none of the programs of
    /// (hostname rules added by a reload): before the switch, so the first call judged under
    /// the new policy finds them. They stay attached if the policy is then dropped.
    fn attach_newly_needed(&mut self, name: &str, policy: &Policy) -> Result<(), KernelError> {
        let pins = self.kernel.pins().cloned();
        let g = self
            .by_name
            .get_mut(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        let had = g.program_names();
        let pin_dir = pins.map(|p| p.agent_links(name, g.cgroup_id));
        let want =
            |c: &dyn Concern| c.needed_by(policy) && !c.programs().iter().any(|p| had.contains(p));
        let new = attach_agent(&mut self.kernel, &g.cgroup, pin_dir.as_deref(), want)?;
        g.links.extend(new);
        Ok(())
    }

    /// Drops a prepared policy: what its `prepare` wrote is removed, the live policy stays.
    pub fn abort_policy(&mut self, prepared: PreparedPolicy) {
        let none = Policy::default();
        let live = self
            .by_name
            .get(&prepared.name)
            .map_or(&none, |g| &g.policy);
        let (_, concerns) = self.kernel.concerns();
        for c in concerns {
            if let Err(e) = c.abort(prepared.slot, &prepared.policy, live) {
                tracing::warn!(agent = prepared.name, "undoing {}: {e}", c.name());
            }
        }
    }

    /// Makes a prepared policy live: each concern applies what the kernel reads under any
    /// generation (caps, DNS ports, the lease), then one map write flips the rule generation
    /// and the policy flags, then each concern settles (exec paths and file prefixes no longer
    /// listed go). What the switch replaced is returned, for [`Agents::retire`] once no
    /// program can still be reading it. A destination allowed (or denied) by both policies is
    /// allowed (denied) at every instant.
    pub fn commit_policy(&mut self, prepared: PreparedPolicy) -> Result<Retired, KernelError> {
        let PreparedPolicy { name, policy, slot } = prepared;
        let g = self
            .by_name
            .get(&name)
            .ok_or_else(|| KernelError::UnknownAgent(name.clone()))?;
        if g.slot() != slot {
            return Err(KernelError::Policy(format!(
                "agent `{name}`'s policy changed since this one was prepared"
            )));
        }
        let (cgroup_id, mut state) = (g.cgroup_id, g.state);
        let (_, concerns) = self.kernel.concerns();
        for c in concerns {
            c.apply(slot, Some(&g.policy), &policy)?;
        }
        self.attach_file_guard(policy.files.is_some())?;
        state.generation = slot.generation ^ 1;
        state.flags = (state.flags & !POLICY_FLAGS) | policy.flags();
        self.write_state(cgroup_id, state)?;
        self.settle(slot, &policy)?;
        let g = self.get_mut(&name)?;
        g.state = state;
        let old = std::mem::replace(&mut g.policy, policy);
        Ok(Retired { name, slot, old })
    }

    /// Writes `new` for a slot this daemon did not write (a fresh or adopted agent) up to the
    /// switch: every concern prepares, then every concern applies.
    fn write_policy(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        let (_, concerns) = self.kernel.concerns();
        for c in concerns {
            c.prepare(slot, new)?;
        }
        let (_, concerns) = self.kernel.concerns();
        for c in concerns {
            c.apply(slot, None, new)?;
        }
        Ok(())
    }

    /// After the switch: every concern drops what only the old policy allowed.
    fn settle(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        let (_, concerns) = self.kernel.concerns();
        concerns.into_iter().try_for_each(|c| c.settle(slot, new))
    }

    /// Forgets agent `name` without touching the kernel: its pinned links stay attached and
    /// its state stays (a daemon that gives up re-adopting an agent leaves it as it found it).
    /// Without pins, dropping the links detaches them.
    pub fn release(&mut self, name: &str) {
        self.membership += 1;
        self.by_name.remove(name);
    }

    /// A number that changes whenever the set of agents (or an agent's slot) changes: what a
    /// cache of [`Agents::slots`] is checked against.
    pub fn membership(&self) -> u64 {
        self.membership
    }

    /// Every agent's name and slot (its index in [`Kernel::all_counters`]), by name.
    pub fn slots(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_name.iter().map(|(name, g)| (name.as_str(), g.id))
    }

    /// Sets and clears `AGENT_FLAG_*` bits of agent `name` in one map write.
    pub fn update_flags(
        &mut self,
        name: &str,
        set: u32,
        clear: u32,
    ) -> Result<AgentState, KernelError> {
        let g = self.get(name)?;
        let mut state = g.state;
        state.flags = (state.flags | set) & !clear;
        let cgroup_id = g.cgroup_id;
        self.write_state(cgroup_id, state)?;
        self.get_mut(name)?.state = state;
        Ok(state)
    }

    /// Stops guarding agent `name`: detaches its programs (removing their pins), then removes
    /// its state, rules, caps, exec list and counters. Its processes keep running, unguarded.
    /// Returns its cgroup.
    pub fn unguard(&mut self, name: &str) -> Result<Cgroup, KernelError> {
        let g = self
            .by_name
            .remove(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))?;
        let slot = g.slot();
        for link in g.links {
            link.detach().map_err(|source| KernelError::Pin {
                path: g.cgroup.path().to_owned(),
                source,
            })?;
        }
        if let Some(pins) = self.kernel.pins() {
            let _ = std::fs::remove_dir(pins.agent_links(name, g.cgroup_id));
        }
        self.undo_state(g.cgroup_id);
        self.unclean.insert(slot.id);
        self.forget_slot(slot, Some(&g.policy))?;
        self.write_settings(None)?;
        self.sync_syscalls()?;
        Ok(g.cgroup)
    }

    /// Removes what an earlier daemon left for agents that are not guarded now: kernel state
    /// (and rules, caps, exec lists, counters) of other cgroups, and pinned links of other
    /// agents. Call it after guarding every configured agent.
    pub fn forget_stale(&mut self) -> Result<Stale, KernelError> {
        let mut stale = Stale::default();
        if let Some(pins) = self.kernel.pins().cloned() {
            let mut keep: HashSet<PathBuf> = self
                .by_name
                .iter()
                .map(|(n, g)| pins.agent_links(n, g.cgroup_id))
                .collect();
            keep.insert(pins.host_links());
            if let Ok(dirs) = std::fs::read_dir(pins.links_root()) {
                for dir in dirs.filter_map(Result::ok).map(|d| d.path()) {
                    if keep.contains(&dir) {
                        continue;
                    }
                    remove_link_dir(&dir)?;
                    stale.link_dirs.push(
                        dir.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    );
                }
            }
        }
        let live: HashSet<u64> = self.by_name.values().map(|g| g.cgroup_id).collect();
        let gone: Vec<(u64, AgentState)> = self
            .kernel
            .agent_states()
            .into_iter()
            .filter(|(cgroup_id, _)| !live.contains(cgroup_id))
            .collect();
        for (cgroup_id, state) in gone {
            self.undo_state(cgroup_id);
            self.unclean.insert(state.id);
            let slot = Slot {
                id: state.id,
                cgroup_id,
                generation: state.generation,
                history: History::Adopted,
            };
            self.forget_slot(slot, None)?;
            stale.states += 1;
        }
        self.write_settings(None)?;
        self.sync_syscalls()?;
        Ok(stale)
    }

    /// Brings the kernel's list of cgroups nested below each agent's up to date (agents may make
    /// cgroups below their own; a move into one is not an escape).
    pub fn sync_nested(&mut self) -> Result<(), KernelError> {
        for g in self.by_name.values() {
            // Also while no process is in it: a process can enter it and move to a cgroup
            // made there meanwhile within the same second, and such a move must be known
            // as one inside the agent.
            self.kernel
                .sockets
                .sync_nested(g.cgroup_id, &g.cgroup, g.nested)?;
        }
        Ok(())
    }

    /// The processes of agent `name`, in its cgroup and every cgroup below it (None: not
    /// guarded). With no cgroup below as of the last [`Self::refresh_presence`] (the common
    /// case), one read from the held directory and no path walk: the sweep asks this of
    /// every populated agent every second.
    pub fn all_pids(&self, name: &str) -> Option<Result<Vec<u32>, cgroup::CgroupError>> {
        let g = self.by_name.get(name)?;
        Some(if g.nested {
            g.cgroup.all_pids()
        } else {
            g.events.pids()
        })
    }

    /// Whether agent `name`'s cgroup is still the one it guards and whether anything runs in
    /// it, as of the last [`Agents::refresh_presence`]: None for an agent not guarded.
    pub fn presence(&self, name: &str) -> Option<Presence> {
        self.by_name.get(name).map(|g| g.presence)
    }

    /// Reads again the cgroup.events of every agent whose file changed since it was last read
    /// (one poll for all, [`cgroup::changed`]): an idle agent costs no read. A file that
    /// cannot be read counts as populated, so nothing is skipped on a guess. The kernel may
    /// tell of a change up to 10 ms late (it spaces cgroup.events notifications): a cgroup
    /// populated just before a sweep can be seen so only by the next one. Also reads whether
    /// each has cgroups below it (one fstat(2) each), for the rest of the sweep.
    pub fn refresh_presence(&mut self) {
        let events: Vec<&cgroup::Events> = self.by_name.values().map(|g| &g.events).collect();
        let changed = cgroup::changed(&events);
        for ((name, g), changed) in self.by_name.iter_mut().zip(changed) {
            g.nested = g.events.has_nested();
            if changed {
                g.presence = g.events.presence().unwrap_or_else(|e| {
                    tracing::warn!(agent = %name, "{e}");
                    Presence::Populated
                });
            }
        }
    }

    /// Closes agent `name`'s open sockets whose peer its policy in force refuses (after a
    /// reload that removed rules: [`crate::sockdiag`]). A connection or connected UDP socket
    /// of its cgroup (or one nested below) counts; a connection accepted by one of its
    /// listeners does not (the agent did not call out), nor does one to its DNS forwarder, nor
    /// anything of an agent in learn mode. Returns the sockets closed.
    pub fn close_refused_sockets(
        &self,
        name: &str,
    ) -> Result<Vec<crate::sockdiag::OpenSocket>, String> {
        use agentwatch_common::{PROTO_TCP, PROTO_UDP};
        let g = self.get(name).map_err(|e| e.to_string())?;
        if g.policy.learn {
            return Ok(Vec::new());
        }
        // Its own cgroup and every one nested below it, as the escape guard counts them.
        let mut cgroups: HashSet<u64> = HashSet::from([g.cgroup_id]);
        cgroups.extend(
            sockets::descendants(g.cgroup.path())
                .iter()
                .filter_map(|dir| Cgroup::open(dir).and_then(|c| c.id()).ok()),
        );
        let ids: Vec<u64> = cgroups.into_iter().collect();
        let mine = crate::sockdiag::list_in(&ids).map_err(|e| format!("listing sockets: {e}"))?;
        let listening: HashSet<u16> = mine
            .iter()
            .filter(|s| s.state == crate::sockdiag::TCP_LISTEN)
            .map(|s| s.local.port())
            .collect();
        let forwarder: Vec<u16> = g
            .policy
            .dns
            .map(|p| vec![p.udp4, p.tcp4, p.udp6, p.tcp6])
            .unwrap_or_default();
        let learned = self.kernel.learned();
        let mut closed = Vec::new();
        for s in mine {
            if !s.connected() {
                continue;
            }
            let tcp = s.protocol == libc::IPPROTO_TCP as u8;
            if tcp && listening.contains(&s.local.port()) {
                continue;
            }
            // Judged as the hooks judge it: a v4-mapped peer is an IPv4 one.
            let ip = match s.peer.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            if ip.is_loopback() && forwarder.contains(&s.peer.port()) {
                continue;
            }
            let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
            let admitted = crate::rules::egress::admits(&g.policy.rules, proto, ip, s.peer.port())
                || (g.policy.dns.is_some() && learned.holds(g.id, ip));
            if admitted {
                continue;
            }
            crate::sockdiag::destroy(&s).map_err(|e| format!("closing {}: {e}", s.peer))?;
            closed.push(s);
        }
        Ok(closed)
    }

    /// Brings the files each exec allow-list names up to date (a package upgrade puts a new
    /// file at an allowed path; the kernel judges execs on the file). Returns the agents and
    /// paths whose file changed.
    pub fn refresh_exec(&mut self) -> Result<Vec<(String, PathBuf)>, KernelError> {
        let mut changed = Vec::new();
        self.kernel.exec.begin_refresh();
        for (name, g) in &self.by_name {
            if let Some(paths) = &g.policy.exec_allow {
                for p in self.kernel.exec.refresh(g.id, paths)? {
                    changed.push((name.clone(), p));
                }
            }
        }
        Ok(changed)
    }

    /// Agent `name`'s suppressed denials per destination since the last call, busiest first.
    pub fn take_suppressed(&mut self, name: &str) -> Result<Vec<egress::Suppressed>, KernelError> {
        let id = self.get(name)?.id;
        Ok(self.kernel.egress.take_suppressed(id))
    }

    /// Counts a breaker trip of agent `name` (action index: alert, deny, freeze, kill).
    pub fn count_trip(&mut self, name: &str, action: usize) -> Result<(), KernelError> {
        let id = self.get(name)?.id;
        self.kernel.count_trip(id, action)
    }

    /// Breaker trips of agent `name` by action (alert, deny, freeze, kill).
    pub fn trips(&self, name: &str) -> [u64; 4] {
        self.by_name
            .get(name)
            .map_or([0; 4], |g| self.kernel.trips(g.id))
    }

    /// The id, cgroup id and kernel state of agent `name`.
    pub fn info(&self, name: &str) -> Option<AgentInfo> {
        self.by_name.get(name).map(|g| AgentInfo {
            id: g.id,
            cgroup_id: g.cgroup_id,
            state: g.state,
        })
    }

    /// The cgroup of agent `name`.
    pub fn cgroup(&self, name: &str) -> Option<&Cgroup> {
        self.by_name.get(name).map(|g| &g.cgroup)
    }

    /// Names of the guarded agents, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The file guard prefixes of the agent with kernel id `id` (None: no such agent, or no
    /// file guard).
    pub fn files_of(&self, id: u32) -> Option<Vec<FileRule>> {
        self.by_name
            .values()
            .find(|g| g.id == id)
            .and_then(|g| g.policy.files.clone())
    }

    /// Name of the agent with kernel id `id`.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        self.by_name
            .iter()
            .find(|(_, g)| g.id == id)
            .map(|(n, _)| n.as_str())
    }

    /// Counters of agent `name`, summed over CPUs.
    pub fn counters(&self, name: &str) -> Result<AgentCounters, KernelError> {
        self.kernel.counters(self.get(name)?.id)
    }

    /// Counters of every agent, summed over CPUs, by name (sorted), read in one call.
    pub fn all_counters(&self) -> Result<Vec<(&str, AgentCounters)>, KernelError> {
        let slots = self.by_name.values().map(|g| g.id + 1).max().unwrap_or(0);
        let all = self.kernel.all_counters(slots)?;
        Ok(self
            .by_name
            .iter()
            .filter_map(|(name, g)| Some((name.as_str(), *all.get(g.id as usize)?)))
            .collect())
    }

    /// Pins again what this daemon holds whose pin is gone (bpffs unmounted and mounted again,
    /// the folder removed): every map and every link, so enforcement outlives this process
    /// again. Returns (maps, links) pinned.
    pub fn restore_pins(&self) -> Result<(usize, usize), KernelError> {
        let maps = self.kernel.restore_map_pins()?;
        let mut links = 0;
        for link in self
            .host
            .iter()
            .chain(self.syscalls.iter())
            .chain(self.by_name.values().flat_map(|g| g.links.iter()))
        {
            links += usize::from(link.repin()?);
        }
        Ok((maps, links))
    }

    /// Asks the kernel whether every link this daemon holds is still attached: each agent's
    /// to its cgroup (a detached cgroup link reports cgroup id 0), and the host-wide ones. A
    /// link found detached or missing is forgotten (its pin removed) and its program attached
    /// again, pinned where it was, the agent's other links kept as they are. Also returns,
    /// once, the links found gone when this daemon started. Needs pins (the daemon's way of
    /// running): without them nothing is attached again, and the result says so.
    pub fn check_links(&mut self) -> Vec<Restored> {
        let mut out = std::mem::take(&mut self.host_found_at_start);
        let pins = self.kernel.pins().cloned();
        let names: Vec<String> = self.by_name.keys().cloned().collect();
        for name in names {
            let Some(g) = self.by_name.get_mut(&name) else {
                continue;
            };
            out.append(&mut g.found_at_start);
            let cgroup_id = g.cgroup_id;
            let all_attached = g.lost.is_empty()
                && g.links
                    .iter()
                    .all(|l| l.kernel_state(Some(cgroup_id)) == LinkState::Attached);
            // A cgroup removed from under the daemon takes its links with it: that is no
            // tamper, and the sweep guards the agent again when the cgroup is back.
            if all_attached
                || g.events.presence().is_ok_and(|p| p == Presence::Gone)
                || g.cgroup.id().ok() != Some(cgroup_id)
            {
                continue;
            }
            let dir = pins.as_ref().map(|p| p.agent_links(&name, g.cgroup_id));
            let cgroup = g.cgroup.clone();
            let kernel = &mut self.kernel;
            // Restored are exactly the concerns it had.
            let had = g.program_names();
            let want = attached_for(&g.policy, |p| had.contains(p));
            let fixed = restore_group(
                &mut g.links,
                Some(g.cgroup_id),
                &mut g.lost,
                || match &dir {
                    Some(dir) => attach_agent(kernel, &cgroup, Some(dir), want),
                    None => Err(not_pinned()),
                },
            );
            out.extend(fixed.into_iter().map(|(l, result)| Restored {
                agent: Some(name.clone()),
                program: l.program,
                found: l.found,
                old_id: l.old_id,
                result,
                at_start: false,
            }));
        }
        let dir = pins.as_ref().map(PinDir::host_links);
        let lsm = self.kernel.files.lsm();
        let [host_lost, guard_lost, syscalls_lost] = &mut self.host_lost;
        let mut host = std::mem::take(&mut self.host);
        let mut fixed = restore_group(&mut host, None, host_lost, || match &dir {
            Some(dir) => attach_host(&mut self.kernel, Some(dir)),
            None => Err(not_pinned()),
        });
        self.host = host;
        // The file guard and the sys_enter hook come and go with the agents that need them;
        // while one is not attached, nothing of it is lost.
        match self.file_guard.as_mut() {
            Some(guard) => {
                let ebpf = &mut self.kernel.ebpf;
                fixed.extend(restore_group(guard, None, guard_lost, || match &dir {
                    Some(dir) => {
                        LinkSet::build(|links| files::attach_guard(ebpf, lsm, Some(dir), links))
                    }
                    None => Err(not_pinned()),
                }));
            }
            None => guard_lost.clear(),
        }
        match self.syscalls.take() {
            Some(link) => {
                let mut one = vec![link];
                let ebpf = &mut self.kernel.ebpf;
                fixed.extend(restore_group(
                    &mut one,
                    None,
                    syscalls_lost,
                    || match &dir {
                        Some(dir) => syscalls::attach(ebpf, Some(dir)).map(|l| vec![l]),
                        None => Err(not_pinned()),
                    },
                ));
                self.syscalls = one.pop();
            }
            None => syscalls_lost.clear(),
        }
        out.extend(fixed.into_iter().map(|(l, result)| Restored {
            agent: None,
            program: l.program,
            found: l.found,
            old_id: l.old_id,
            result,
            at_start: false,
        }));
        out
    }

    /// Was agent `name` adopted from an earlier daemon's pinned state (rather than new)?
    pub fn adopted(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|g| g.adopted)
    }

    /// How many links this daemon holds for agent `name`.
    pub fn link_count(&self, name: &str) -> usize {
        self.by_name.get(name).map_or(0, |g| g.links.len())
    }

    /// How many host-wide links this daemon holds.
    pub fn host_link_count(&self) -> usize {
        self.host.len()
            + self.syscalls.iter().count()
            + self.file_guard.as_ref().map_or(0, Vec::len)
    }

    /// Kernel ids of the links of agent `name` (for diagnostics and leak checks).
    pub fn link_ids(&self, name: &str) -> Vec<u32> {
        self.by_name
            .get(name)
            .map(|g| g.links.iter().filter_map(Link::id).collect())
            .unwrap_or_default()
    }

    /// Kernel ids of the host-wide links (exec/fork tracepoints, sys_enter while attached).
    pub fn host_link_ids(&self) -> Vec<u32> {
        self.host
            .iter()
            .chain(self.syscalls.iter())
            .filter_map(Link::id)
            .collect()
    }

    fn get(&self, name: &str) -> Result<&Guarded, KernelError> {
        self.by_name
            .get(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Guarded, KernelError> {
        self.by_name
            .get_mut(name)
            .ok_or_else(|| KernelError::UnknownAgent(name.to_owned()))
    }

    fn write_state(&mut self, cgroup_id: u64, state: AgentState) -> Result<(), KernelError> {
        let written = self
            .kernel
            .agents
            .insert(cgroup_id, state, 0)
            .map_err(map_err("AGENTS"));
        // Also after a failed write: whatever it left is looked up again.
        self.kernel.agents_changed();
        written
    }

    fn undo_state(&mut self, cgroup_id: u64) {
        if let Err(e) = self.kernel.agents.remove(&cgroup_id) {
            tracing::warn!(cgroup_id, "removing agent state: {e}");
        }
        self.kernel.agents_changed();
    }

    /// Clears everything of `slot` in every concern and in the shared maps, so the next agent
    /// in it starts clean (`last`: the policy this daemon wrote there, if it did).
    fn forget_slot(&mut self, slot: Slot, last: Option<&Policy>) -> Result<(), KernelError> {
        let (_, concerns) = self.kernel.concerns();
        for c in concerns {
            c.forget(slot, last)?;
        }
        self.kernel.forget_slot(slot.id)
    }

    /// Agent `name`'s lease deadline (CLOCK_MONOTONIC ns), if it has a lease.
    pub fn lease_deadline(&self, name: &str) -> Option<u64> {
        let g = self.by_name.get(name)?;
        g.policy.lease?;
        self.kernel.lease.deadline(g.id)
    }

    /// Was the expiry of agent `name`'s current lease deadline audited (by this daemon or an
    /// earlier one)?
    pub fn lease_expiry_audited(&self, name: &str) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|g| g.policy.lease.is_some() && self.kernel.lease.expiry_audited(g.id))
    }

    /// Records that the expiry of agent `name`'s current lease deadline was audited.
    pub fn mark_lease_expiry_audited(&mut self, name: &str) -> Result<(), KernelError> {
        let id = self.get(name)?.id;
        self.kernel.lease.mark_audited(id)
    }

    /// Moves agent `name`'s lease deadline to `length` from now; returns the new deadline.
    pub fn extend_lease(&mut self, name: &str, length: Duration) -> Result<u64, KernelError> {
        let g = self.get(name)?;
        if g.policy.lease.is_none() {
            return Err(KernelError::Policy(format!(
                "agent `{name}` has no lease (set `lease` in its config)"
            )));
        }
        let (id, deadline) = (g.id, lease::deadline_in(length));
        self.kernel.lease.set(id, Some(deadline))?;
        Ok(deadline)
    }

    /// The levels the kernel looks agents up at: those of the guarded agents (`widen_with`:
    /// plus one more, and, before stale state is forgotten, plus what is there already).
    fn write_settings(&mut self, widen_with: Option<u32>) -> Result<(), KernelError> {
        let mut levels: Vec<u32> = self.by_name.values().map(|g| g.level).collect();
        if let Some(l) = widen_with {
            levels.push(l);
            let cur = self.kernel.settings.get(&0, 0).unwrap_or_default();
            if cur.max_level > 0 {
                levels.extend([cur.min_level, cur.max_level]);
            }
        }
        let (min_level, max_level) = match (levels.iter().min(), levels.iter().max()) {
            (Some(&min), Some(&max)) => (min, max),
            _ => (0, 0),
        };
        let settings = Settings {
            min_level,
            max_level,
            fork_child_pid: self.kernel.fork_child_pid,
            lsm: if self.kernel.files.lsm() {
                LSM_SOCKETS | LSM_FILES | LSM_EXEC
            } else {
                0
            },
        };
        let written = self
            .kernel
            .settings
            .set(0, settings, 0)
            .map_err(map_err("SETTINGS"));
        // The levels decide which agent a task is found in, as `AGENTS` does.
        self.kernel.agents_changed();
        written
    }

    /// Attaches the file guard if `needed` and it is not attached yet: before an agent's flag
    /// turns its file list on, so no open of it goes unjudged.
    fn attach_file_guard(&mut self, needed: bool) -> Result<(), KernelError> {
        if needed && self.file_guard.is_none() {
            let dir = self.kernel.pins().map(PinDir::host_links);
            let lsm = self.kernel.files.lsm();
            let ebpf = &mut self.kernel.ebpf;
            self.file_guard = Some(LinkSet::build(|links| {
                files::attach_guard(ebpf, lsm, dir.as_deref(), links)
            })?);
        }
        Ok(())
    }

    /// Detaches the file guard when no agent has a file list (every open on the host pays
    /// for it while attached).
    fn sync_file_guard(&mut self) -> Result<(), KernelError> {
        if self.by_name.values().any(|g| g.policy.files.is_some()) {
            return Ok(());
        }
        for link in self.file_guard.take().into_iter().flatten() {
            link.detach().map_err(|source| KernelError::Pin {
                path: PathBuf::from("file guard"),
                source,
            })?;
        }
        Ok(())
    }

    /// Attaches the sys_enter hook while some agent monitors syscalls; detaches it otherwise;
    /// and detaches the file guard once no agent needs it.
    fn sync_syscalls(&mut self) -> Result<(), KernelError> {
        self.sync_file_guard()?;
        let wanted = self.by_name.values().any(|g| g.policy.monitor_syscalls);
        match (wanted, self.syscalls.is_some()) {
            (true, false) => {
                let dir = self.kernel.pins().map(PinDir::host_links);
                self.syscalls = Some(syscalls::attach(&mut self.kernel.ebpf, dir.as_deref())?);
            }
            (false, true) => {
                if let Some(link) = self.syscalls.take() {
                    link.detach().map_err(|source| KernelError::Pin {
                        path: PathBuf::from(syscalls::PROGRAM),
                        source,
                    })?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The links of `links` attached anew rather than adopted from a pin, as found missing at
/// start.
fn found_anew<'a>(agent: Option<&str>, links: impl Iterator<Item = &'a Link>) -> Vec<Restored> {
    links
        .filter(|l| l.fresh())
        .map(|l| Restored {
            agent: agent.map(str::to_owned),
            program: l.name(),
            found: LinkState::Missing,
            old_id: None,
            result: l.id().ok_or_else(|| "its id is unknown".to_owned()),
            at_start: true,
        })
        .collect()
}

/// Why a link cannot be attached again without pins.
fn not_pinned() -> KernelError {
    KernelError::Policy(
        "links are not pinned (the daemon always pins them): not attached again".to_owned(),
    )
}
