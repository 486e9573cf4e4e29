//! The embedded kernel object: loading it, handing each concern its programs and maps, and
//! owning the maps every concern shares (agents, counters, events, settings).

use std::path::Path;

use agentwatch_common::{AgentCounters, AgentState, Settings};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues, RingBuf},
};

pub use crate::bpf::{KernelError, PinDir};
use crate::{
    bpf::{SignalsBlocked, load::LoadEnv, map_err, take_map},
    bytes::BytesMaps,
    concern::{Concern, Load, MapSpec},
    dns::DnsMaps,
    egress::EgressMaps,
    exec::ExecMaps,
    files::FilesMaps,
    learn::LearnMaps,
    lease::LeaseMaps,
    sockets::SocketMaps,
};

/// The kernel programs, built by build.rs from agentwatch-ebpf.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentwatch-ebpf"));

/// union bpf_attr's `batch`: the attributes of BPF_MAP_LOOKUP_BATCH and BPF_MAP_UPDATE_BATCH.
#[repr(C)]
struct Batch {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The loaded object and its shared maps.
pub struct Kernel {
    pub(crate) ebpf: Ebpf,
    pub(crate) agents: HashMap<MapData, u64, AgentState>,
    counters: PerCpuArray<MapData, AgentCounters>,
    lost: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    pub(crate) egress: EgressMaps,
    pub(crate) exec: ExecMaps,
    pub(crate) files: FilesMaps,
    pub(crate) sockets: SocketMaps,
    pub(crate) dns: DnsMaps,
    pub(crate) lease: LeaseMaps,
    pub(crate) bytes: BytesMaps,
    pub(crate) learn: LearnMaps,
    pub(crate) settings: Array<MapData, Settings>,
    /// Slot 0: writes to `agents` and `settings` so far ([`Self::agents_changed`]).
    agents_gen: Array<MapData, u64>,
    /// `child_pid`'s offset in this kernel's `sched_process_fork` record.
    pub(crate) fork_child_pid: u32,
    trips: Array<MapData, [u64; 4]>,
    /// The daemon's checkpoints (pinned: they outlive it) and the map's kernel id, to pin it
    /// again if its pin vanishes. None without pins, or if it could not be made (logged).
    checkpoints: Option<(Array<MapData, Checkpoint>, u32)>,
    pins: Option<PinDir>,
    /// Kernel ids of the pinned maps, to pin them again if their pins vanish.
    map_ids: Vec<(&'static str, u32)>,
    /// [`Self::all_counters`]' buffers (keys, per-CPU values), kept: it runs ten times a
    /// second, and with 1,000 agents the values alone are 1,000 x CPUs counters.
    batch: std::sync::Mutex<(Vec<u32>, Vec<AgentCounters>)>,
}

/// The maps every concern shares (the agents, their counters, the events) and the tamper
/// guard's; each concern declares its own ([`Load::MAPS`]).
const SHARED_MAPS: &[MapSpec] = &[
    MapSpec::new("AGENTS", 8, size_of::<AgentState>()),
    MapSpec::new("COUNTERS", 4, size_of::<AgentCounters>()),
    MapSpec::new("EVENTS", 0, 0),
    MapSpec::new("EVENTS_LOST", 4, 8),
    MapSpec::new("SETTINGS", 4, size_of::<Settings>()),
    MapSpec::new("AGENTS_GEN", 4, 8),
    MapSpec::new("CURRENT", 4, size_of::<agentwatch_common::SyscallsCache>()),
    MapSpec::new("BREAKER_TRIPS", 4, 32),
    MapSpec::new("TAMPER_DAEMON", 4, 4),
    MapSpec::new("TAMPER_INODES", 16, 4),
    MapSpec::new("GATEWAY", 4, size_of::<agentwatch_common::GatewayAddr>()),
];

/// Every map of the object with the key and value sizes this build expects of it: a pinned
/// map of another layout (an older agentwatch) is refused rather than misread.
fn maps() -> impl Iterator<Item = &'static MapSpec> {
    [
        SHARED_MAPS,
        EgressMaps::MAPS,
        SocketMaps::MAPS,
        BytesMaps::MAPS,
        DnsMaps::MAPS,
        ExecMaps::MAPS,
        FilesMaps::MAPS,
        LeaseMaps::MAPS,
        LearnMaps::MAPS,
    ]
    .into_iter()
    .flatten()
}

/// Name of the pinned map of the daemon's checkpoints, beside the object's maps. Not one of
/// the object's: the kernel programs never read it, and an agentwatch without it simply makes
/// it.
pub const CHECKPOINTS: &str = "WATCHDOG";

/// [`Checkpoint::flags`] of slot 0: the daemon that wrote it stopped on SIGTERM or SIGINT.
pub const STOPPED_CLEAN: u64 = 1;

/// [`Checkpoint::denied_baseline_milli`] when no baseline was learned yet.
pub const NO_BASELINE: u64 = u64::MAX;

/// What the daemon wrote down, once a second and at a clean stop, in a pinned map that outlives
/// it: for a daemon started after it, to tell how the last one ended and when, and what the
/// agents did while no daemon watched (the kernel's counters kept counting). Slot 0 is the
/// daemon's own (flags, host-wide links); slot `id` is the agent with that kernel id.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// CLOCK_MONOTONIC ns when it was written; 0: never written.
    pub at_ns: u64,
    /// The agent's cgroup id (slot 0: 0): a checkpoint of another agent that had the slot
    /// is not taken for this one's.
    pub cgroup_id: u64,
    /// The agent's denied calls so far (the breaker's `denied` signal).
    pub denied: u64,
    /// The breaker's learned baseline of denied calls per second, in thousandths
    /// ([`NO_BASELINE`]: none yet).
    pub denied_baseline_milli: u64,
    /// The links the daemon held for the agent (slot 0: host-wide): 0 until it was guarded
    /// completely.
    pub links: u64,
    /// Slot 0: [`STOPPED_CLEAN`].
    pub flags: u64,
}

// SAFETY: #[repr(C)] of u64s only, no padding; every bit pattern is a value.
unsafe impl aya::Pod for Checkpoint {}

/// Opens the checkpoint map pinned under `pins`, or makes and pins it. A pin of another layout
/// (another version's) is replaced: what it said is lost, nothing else.
fn open_checkpoints(pins: &PinDir) -> Result<(Array<MapData, Checkpoint>, u32), KernelError> {
    let name = CHECKPOINTS;
    let path = pins.map(name);
    let fits = |info: &MapInfo| {
        matches!(info.map_type(), Ok(aya::maps::MapType::Array))
            && info.key_size() == 4
            && info.value_size() as usize == size_of::<Checkpoint>()
            && info.max_entries() == agentwatch_common::MAX_AGENTS
    };
    let pin_err = |path: &Path, source| KernelError::Pin {
        path: path.to_owned(),
        source,
    };
    if path.exists() && !MapInfo::from_pin(&path).is_ok_and(|i| fits(&i)) {
        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
    }
    if !path.exists() {
        let map = Array::<MapData, Checkpoint>::create(agentwatch_common::MAX_AGENTS, 0)
            .map_err(map_err(name))?;
        map.pin(&path)
            .map_err(|e| pin_err(&path, std::io::Error::other(e.to_string())))?;
    }
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    let id = data.info().map_err(map_err(name))?.id();
    let map = Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(name))?;
    Ok((map, id))
}

/// The embedded object's bytes (empty in a build without eBPF programs).
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

impl Kernel {
    /// Loads the embedded object with private maps (gone when this value is dropped), and
    /// verifies every program. Nothing is attached yet.
    pub fn load() -> Result<Self, KernelError> {
        Self::load_with(None)
    }

    /// Loads the embedded object with its maps pinned under `pins` (reusing maps pinned there
    /// by an earlier daemon: rules, agent state and counters carry over).
    pub fn load_pinned(pins: PinDir) -> Result<Self, KernelError> {
        Self::load_with(Some(pins))
    }

    fn load_with(pins: Option<PinDir>) -> Result<Self, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        // A thread that signals are rained on spends its time in handlers and never finishes
        // loading; blocked, they wait until the object is loaded (see `load_program`). From
        // the first step: reading the kernel's BTF (megabytes from sysfs) under a signal every
        // 50 us never finished in a TCG guest, where each read outlasts the gap between them.
        let _mask = SignalsBlocked::new();
        let env = LoadEnv::probe()?;
        let mut loader = EbpfLoader::new();
        env.set_globals(&mut loader);
        if let Some(pins) = &pins {
            pins.create()?;
            for &MapSpec { name, key, value } in maps() {
                let path = pins.map(name);
                if path.exists() {
                    let info = MapInfo::from_pin(&path)
                        .map_err(|source| KernelError::Map { name, source })?;
                    if (info.key_size(), info.value_size()) != (key, value) {
                        return Err(KernelError::IncompatiblePin {
                            path,
                            found: (info.key_size(), info.value_size()),
                            want: (key, value),
                        });
                    }
                    // The same layout, but made by an older agentwatch with smaller tries: it is
                    // used as it is (its rules are in force), and `check` counts on the larger.
                    if matches!(name, "RULES_V4" | "RULES_V6")
                        && info.max_entries() < agentwatch_common::RULE_TRIE_CAPACITY
                    {
                        tracing::warn!(
                            map = name,
                            pinned = info.max_entries(),
                            this_build = agentwatch_common::RULE_TRIE_CAPACITY,
                            "this pinned rule trie holds fewer entries than this agentwatch \
                             makes: a config that `check` accepts may be refused at reload when \
                             it is full; stopping the daemon and `agentwatch run --cleanup` \
                             makes the tries anew (the agents are unguarded until it starts)"
                        );
                    }
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // The daemon runs without its checkpoints rather than not at all: they only tell the
        // next daemon what happened meanwhile.
        let checkpoints = pins
            .as_ref()
            .and_then(|p| match open_checkpoints(p) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!("the daemon's checkpoint map: {e}; a daemon started after this one will not know how it ended");
                    None
                }
            });
        let map_ids = pins.as_ref().map_or_else(Vec::new, |p| {
            maps()
                .filter_map(|m| Some((m.name, MapInfo::from_pin(p.map(m.name)).ok()?.id())))
                .collect()
        });
        let agents = take_map(&mut ebpf, "AGENTS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let lost = take_map(&mut ebpf, "EVENTS_LOST")?;
        let events = Some(take_map(&mut ebpf, "EVENTS")?);
        let settings = take_map(&mut ebpf, "SETTINGS")?;
        let agents_gen = take_map(&mut ebpf, "AGENTS_GEN")?;
        let trips = take_map(&mut ebpf, "BREAKER_TRIPS")?;
        // Each concern loads (verifies) its own programs and takes its own maps.
        let egress = EgressMaps::load(&mut ebpf, &env)?;
        let exec = ExecMaps::load(&mut ebpf, &env)?;
        let files = FilesMaps::load(&mut ebpf, &env)?;
        let sockets = SocketMaps::load(&mut ebpf, &env)?;
        let dns = DnsMaps::load(&mut ebpf, &env)?;
        let lease = LeaseMaps::load(&mut ebpf, &env)?;
        let bytes = BytesMaps::load(&mut ebpf, &env)?;
        let learn = LearnMaps::load(&mut ebpf, &env)?;
        crate::syscalls::load(&mut ebpf)?;
        Ok(Self {
            ebpf,
            agents,
            counters,
            lost,
            events,
            egress,
            exec,
            files,
            sockets,
            dns,
            lease,
            bytes,
            learn,
            settings,
            agents_gen,
            fork_child_pid: env.fork_child_pid,
            trips,
            checkpoints,
            pins,
            map_ids,
            batch: std::sync::Mutex::default(),
        })
    }

    /// The object, and every concern in the order their programs attach to an agent's cgroup.
    pub(crate) fn concerns(&mut self) -> (&mut Ebpf, [&mut dyn Concern; 8]) {
        (
            &mut self.ebpf,
            [
                &mut self.egress,
                &mut self.sockets,
                &mut self.bytes,
                &mut self.dns,
                &mut self.exec,
                &mut self.files,
                &mut self.lease,
                &mut self.learn,
            ],
        )
    }

    /// Clears what the shared maps keep of slot `id` (its checkpoint, counters and breaker
    /// trips), so an agent that later gets the slot starts at 0.
    pub(crate) fn forget_slot(&mut self, id: u32) -> Result<(), KernelError> {
        self.set_checkpoint(id, Checkpoint::default())?;
        self.reset_counters(id)?;
        self.reset_trips(id)
    }

    /// Tells the programs that cache an `AGENTS` lookup (the syscall monitor) that `AGENTS` or
    /// `SETTINGS` changed: called after every write to either. Only this daemon writes the
    /// count, under its state lock, so a read and a write do not race.
    pub(crate) fn agents_changed(&mut self) {
        let next = self.agents_gen.get(&0, 0).unwrap_or(0).wrapping_add(1);
        if let Err(e) = self.agents_gen.set(0, next, 0) {
            // Only counting depends on it: syscalls of an agent changed now may be counted
            // for what it was until the next change.
            tracing::error!("AGENTS_GEN: {e}");
        }
    }

    /// Writes slot 0 of the array map `name` (the one-entry maps the daemon fills at start).
    fn set_slot0<T: aya::Pod>(&mut self, name: &'static str, value: T) -> Result<(), KernelError> {
        let err = |source| KernelError::Map { name, source };
        let mut map: aya::maps::Array<&mut MapData, T> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(KernelError::MissingMap(name))?,
        )
        .map_err(err)?;
        map.set(0, value, 0).map_err(err)
    }

    /// Tells the egress programs where the API gateway listens (see `AGENT_FLAG_GATEWAY`).
    pub fn set_gateway(&mut self, at: std::net::SocketAddr) -> Result<(), KernelError> {
        let mut g = agentwatch_common::GatewayAddr {
            port: at.port(),
            set: 1,
            ..Default::default()
        };
        match at.ip() {
            std::net::IpAddr::V4(a) => g.addr[..4].copy_from_slice(&a.octets()),
            std::net::IpAddr::V6(a) => {
                g.addr = a.octets();
                g.v6 = 1;
            }
        }
        self.set_slot0("GATEWAY", g)
    }

    /// Tells the tamper guard which process is the daemon (`lsm/task_kill` refuses agents'
    /// signals to it). Written at every start: the pinned map holds the last daemon's.
    pub fn set_daemon_tgid(&mut self, tgid: u32) -> Result<(), KernelError> {
        self.set_slot0("TAMPER_DAEMON", tgid)
    }

    /// Makes the tamper guard's set of the daemon's files exactly `want`: adds first, then
    /// removes what is no longer wanted, so a file in both is never unguarded.
    pub fn sync_protected(
        &mut self,
        want: &std::collections::BTreeSet<agentwatch_common::InodeKey>,
    ) -> Result<(), KernelError> {
        use agentwatch_common::InodeKey;
        let name = "TAMPER_INODES";
        let mut map: aya::maps::HashMap<&mut MapData, InodeKey, u32> =
            aya::maps::HashMap::try_from(
                self.ebpf
                    .map_mut(name)
                    .ok_or(KernelError::MissingMap(name))?,
            )
            .map_err(|source| KernelError::Map { name, source })?;
        let have: std::collections::BTreeSet<InodeKey> =
            map.keys().filter_map(Result::ok).collect();
        for k in want.difference(&have) {
            map.insert(k, 1, 0)
                .map_err(|source| KernelError::Map { name, source })?;
        }
        for k in have.difference(want) {
            crate::bpf::ignore_missing(map.remove(k), name)?;
        }
        Ok(())
    }

    /// The checkpoint in `slot` (0: the daemon's, else the agent with that id), if one was
    /// ever written there.
    pub fn checkpoint(&self, slot: u32) -> Option<Checkpoint> {
        let (map, _) = self.checkpoints.as_ref()?;
        map.get(&slot, 0).ok().filter(|c| c.at_ns != 0)
    }

    /// Writes the checkpoint in `slot` (nothing without the checkpoint map).
    pub fn set_checkpoint(&mut self, slot: u32, c: Checkpoint) -> Result<(), KernelError> {
        match &mut self.checkpoints {
            Some((map, _)) => map.set(slot, c, 0).map_err(map_err(CHECKPOINTS)),
            None => Ok(()),
        }
    }

    /// Writes many checkpoints (slot, checkpoint) in one call (BPF_MAP_UPDATE_BATCH): the
    /// sweep writes every agent's each second. One at a time where the kernel has no batch
    /// writes for arrays.
    pub fn set_checkpoints(&mut self, all: &[(u32, Checkpoint)]) -> Result<(), KernelError> {
        const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let Some((map, _)) = &mut self.checkpoints else {
            return Ok(());
        };
        if all.is_empty() {
            return Ok(());
        }
        let err = |e: std::io::Error| KernelError::Map {
            name: CHECKPOINTS,
            source: MapError::IoError(e),
        };
        let keys: Vec<u32> = all.iter().map(|(k, _)| *k).collect();
        let values: Vec<Checkpoint> = all.iter().map(|(_, c)| *c).collect();
        let fd = map.map().fd().as_fd().as_raw_fd();
        let mut attr = Batch {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(keys.len()).map_err(|e| err(std::io::Error::other(e)))?,
            map_fd: u32::try_from(fd).map_err(|e| err(std::io::Error::other(e)))?,
            elem_flags: 0,
            flags: 0,
        };
        match crate::bpf::bpf_call(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => {
                for &(slot, c) in all {
                    map.set(slot, c, 0).map_err(map_err(CHECKPOINTS))?;
                }
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Pins the checkpoint map again if its pin is gone (its bpffs was unmounted and mounted
    /// again); true if it did.
    pub(crate) fn repin_checkpoints(&self) -> Result<bool, KernelError> {
        let (Some(pins), Some((_, id))) = (&self.pins, &self.checkpoints) else {
            return Ok(false);
        };
        let path = pins.map(CHECKPOINTS);
        if path.exists() || !pins.exists() {
            return Ok(false);
        }
        crate::bpf::pin_by_id(crate::bpf::BPF_MAP_GET_FD_BY_ID, *id, &path)
            .map_err(|source| KernelError::Pin { path, source })?;
        Ok(true)
    }

    /// Where this object's maps and links are pinned, if they are.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// Pins again the maps whose pins are gone; returns how many.
    pub(crate) fn restore_map_pins(&self) -> Result<usize, KernelError> {
        match &self.pins {
            Some(pins) => pins.restore_maps(&self.map_ids),
            None => Ok(0),
        }
    }

    /// The addresses hostname rules admitted (shared with the DNS forwarder).
    pub fn learned(&self) -> crate::dns::Learned {
        self.dns.learned()
    }

    /// The rule counters and learn mode's records (shared with the DNS forwarder).
    pub fn learn(&self) -> LearnMaps {
        self.learn.clone()
    }

    /// The event ring buffer; it has one reader, so it can be taken once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Counters of agent `id`, summed over CPUs.
    pub fn counters(&self, id: u32) -> Result<AgentCounters, KernelError> {
        let per_cpu = self.counters.get(&id, 0).map_err(map_err("COUNTERS"))?;
        Ok(sum_cpus(per_cpu.iter()))
    }

    /// Counters of slots `0..slots`, each summed over CPUs, read in one BPF_MAP_LOOKUP_BATCH
    /// (Linux 5.6): the behaviour monitor reads every agent ten times a second, and one
    /// syscall per agent was most of an idle daemon's time. A kernel that refuses the batch
    /// is read slot by slot.
    pub fn all_counters(&self, slots: u32) -> Result<Vec<AgentCounters>, KernelError> {
        const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let err = |e: std::io::Error| KernelError::Map {
            name: "COUNTERS",
            source: MapError::IoError(e),
        };
        let slots = slots.min(agentwatch_common::MAX_AGENTS);
        let n = slots as usize;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(e))?;
        // A per-CPU value is its size rounded up to 8 bytes, once per possible CPU:
        // AgentCounters is u64s only, so no rounding.
        let mut batch = self
            .batch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (keys, values) = &mut *batch;
        keys.resize(n, 0);
        values.resize(n * cpus, AgentCounters::default());
        let mut next = 0u32;
        let fd = self.counters.map().fd().as_fd().as_raw_fd();
        let mut attr = Batch {
            in_batch: 0,
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: slots,
            map_fd: u32::try_from(fd).map_err(|e| err(std::io::Error::other(e)))?,
            elem_flags: 0,
            flags: 0,
        };
        let got = match crate::bpf::bpf_call(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => attr.count as usize,
            // The end of the map was reached: `count` says how many were read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => attr.count as usize,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => {
                return (0..slots).map(|id| self.counters(id)).collect();
            }
            Err(e) => return Err(err(e)),
        };
        let mut out = vec![AgentCounters::default(); n];
        for (i, &key) in keys.iter().enumerate().take(got.min(n)) {
            if let (Some(slot), Some(per_cpu)) = (
                out.get_mut(key as usize),
                values.get(i * cpus..(i + 1) * cpus),
            ) {
                *slot = sum_cpus(per_cpu.iter());
            }
        }
        Ok(out)
    }

    /// Breaker trips of agent `id` by action (alert, deny, freeze, kill).
    pub fn trips(&self, id: u32) -> [u64; 4] {
        self.trips.get(&id, 0).unwrap_or_default()
    }

    /// Counts one trip of agent `id` with action index `action` (0..4).
    pub(crate) fn count_trip(&mut self, id: u32, action: usize) -> Result<(), KernelError> {
        let mut t = self.trips(id);
        if let Some(slot) = t.get_mut(action) {
            *slot += 1;
        }
        self.trips.set(id, t, 0).map_err(map_err("BREAKER_TRIPS"))
    }

    pub(crate) fn reset_trips(&mut self, id: u32) -> Result<(), KernelError> {
        self.trips
            .set(id, [0; 4], 0)
            .map_err(map_err("BREAKER_TRIPS"))
    }

    /// Zeroes the counters of slot `id`, so an agent that later gets the slot starts at 0.
    pub(crate) fn reset_counters(&mut self, id: u32) -> Result<(), KernelError> {
        let err = |source| KernelError::Map {
            name: "COUNTERS",
            source,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(MapError::IoError(e)))?;
        let zero = PerCpuValues::try_from(vec![AgentCounters::default(); cpus])
            .map_err(|e| err(MapError::IoError(e)))?;
        self.counters.set(id, zero, 0).map_err(err)
    }

    /// Events the kernel could not put in the ring buffer because it was full.
    pub fn events_lost(&self) -> Result<u64, KernelError> {
        let per_cpu = self.lost.get(&0, 0).map_err(map_err("EVENTS_LOST"))?;
        Ok(per_cpu.iter().sum())
    }

    /// Agent state entries in the kernel: (cgroup id, state).
    pub(crate) fn agent_states(&self) -> Vec<(u64, AgentState)> {
        self.agents.iter().filter_map(Result::ok).collect()
    }

    /// Kernel ids of the loaded programs (for diagnostics and leak checks).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok().map(|i| i.id()))
            .collect()
    }
}

/// The sum of one slot's per-CPU counters. Every field is a u64 (asserted in
/// agentwatch-common): summed word by word, so a counter added later cannot be forgotten here.
fn sum_cpus<'a>(per_cpu: impl Iterator<Item = &'a AgentCounters>) -> AgentCounters {
    const WORDS: usize = size_of::<AgentCounters>() / 8;
    let mut sum = [0u64; WORDS];
    for c in per_cpu {
        // SAFETY: AgentCounters is #[repr(C)] of u64s only, WORDS words long.
        let words: [u64; WORDS] = unsafe { std::mem::transmute(*c) };
        for (s, v) in sum.iter_mut().zip(words) {
            *s += v;
        }
    }
    // SAFETY: as above; every bit pattern is a valid AgentCounters.
    unsafe { std::mem::transmute::<[u64; WORDS], AgentCounters>(sum) }
}
