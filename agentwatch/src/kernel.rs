//! The embedded kernel object: loading it, handing each concern its programs and maps, and
//! owning the maps every concern shares (agents, counters, events, settings).

use std::path::{Path, PathBuf};

use agentwatch_common::{
    AgentCounters, AgentLimits, AgentState, ByteCap, DestKey, DnsKey, DnsOrig, DnsPorts, DnsValue,
    ExecKey, FileDirKey, FilePath, LearnName, LearnNameKey, RuleHitKey, RuleKeyV4, RuleKeyV6,
    RuleValue, Seen, Settings,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues, RingBuf},
};

pub use crate::bpf::{KernelError, PinDir};
use crate::{
    bpf::{SignalsBlocked, map_err, take_map},
    bytes::BytesMaps,
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
    /// `child_pid`'s offset in this kernel's `sched_process_fork` record.
    pub(crate) fork_child_pid: u32,
    trips: Array<MapData, [u64; 4]>,
    /// The daemon's checkpoints (pinned: they outlive it) and the map's kernel id, to pin it
    /// again if its pin vanishes. None without pins, or if it could not be made (logged).
    checkpoints: Option<(Array<MapData, Checkpoint>, u32)>,
    pins: Option<PinDir>,
    /// Kernel ids of the pinned maps, to pin them again if their pins vanish.
    map_ids: Vec<(&'static str, u32)>,
}

/// Every map of the object with the key and value sizes this build expects of it. A pinned map
/// of another layout (an older agentwatch) is refused rather than misread.
const MAPS: [(&str, u32, u32); 38] = [
    ("AGENTS", 8, size_of::<AgentState>() as u32),
    ("COUNTERS", 4, size_of::<AgentCounters>() as u32),
    ("EVENTS", 0, 0),
    ("EVENTS_LOST", 4, 8),
    ("SETTINGS", 4, size_of::<Settings>() as u32),
    ("BREAKER_TRIPS", 4, 32),
    ("LIMITS", 4, size_of::<AgentLimits>() as u32),
    ("EXEC_ALLOW", size_of::<ExecKey>() as u32, 1),
    (
        "EXEC_INODES",
        size_of::<agentwatch_common::ExecInodeKey>() as u32,
        1,
    ),
    ("PARENTS", 4, 4),
    ("SCRATCH", 4, size_of::<ExecKey>() as u32),
    (
        "RULES_V4",
        4 + size_of::<RuleKeyV4>() as u32,
        size_of::<RuleValue>() as u32,
    ),
    (
        "RULES_V6",
        4 + size_of::<RuleKeyV6>() as u32,
        size_of::<RuleValue>() as u32,
    ),
    ("DEST_SEEN", size_of::<DestKey>() as u32, 8),
    ("SUPPRESSED", size_of::<DestKey>() as u32, 8),
    ("TASKS", 4, 8),
    ("NESTED", 8, 8),
    ("DOOMED", 4, 4),
    ("DOOMED_COUNT", 4, 8),
    ("DNS_PORTS", 4, size_of::<DnsPorts>() as u32),
    (
        "DNS_ALLOW",
        size_of::<DnsKey>() as u32,
        size_of::<DnsValue>() as u32,
    ),
    ("DNS_ORIG", 8, size_of::<DnsOrig>() as u32),
    ("DNS_COUNTS", 4, 8 * agentwatch_common::DNS_VERDICTS as u32),
    ("LEASES", 4, 8),
    ("LEASE_AUDITED", 4, 8),
    ("BYTE_CAPS", 4, size_of::<ByteCap>() as u32),
    ("RULE_HITS", size_of::<RuleHitKey>() as u32, 8),
    (
        "LEARN_DESTS",
        size_of::<DestKey>() as u32,
        size_of::<Seen>() as u32,
    ),
    (
        "LEARN_EXECS",
        size_of::<ExecKey>() as u32,
        size_of::<Seen>() as u32,
    ),
    (
        "LEARN_NAMES",
        size_of::<LearnNameKey>() as u32,
        size_of::<LearnName>() as u32,
    ),
    (
        "LEARN_QUOTA",
        4,
        size_of::<agentwatch_common::LearnQuota>() as u32,
    ),
    ("FILE_ALLOW", 4 + size_of::<FilePath>() as u32, 4),
    // The trie key and a PATH_MAX buffer.
    ("FILE_SCRATCH", 4, 4 + size_of::<FilePath>() as u32 + 4096),
    ("OPENS", 8, 16),
    ("FILE_DIRS", size_of::<FileDirKey>() as u32, 4),
    ("TAMPER_DAEMON", 4, 4),
    ("TAMPER_INODES", 16, 4),
    (
        "GATEWAY",
        4,
        size_of::<agentwatch_common::GatewayAddr>() as u32,
    ),
];

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
        raise_memlock();
        ensure_tracefs()?;
        let fork_child_pid = tracepoint_field_offset("sched", "sched_process_fork", "child_pid")?;
        // Parsed once (megabytes from sysfs) for both sets of offsets.
        let btf = crate::btf::Btf::vmlinux()
            .inspect_err(|e| tracing::warn!("reading the kernel's BTF: {e}"))
            .ok();
        let lsm = lsm_offsets(btf.as_ref());
        let clone = clone_offsets(btf.as_ref());
        let files = file_offsets(btf.as_ref());
        let walk = walk_offsets(btf.as_ref());
        let mut loader = EbpfLoader::new();
        loader
            .override_global("FILE_F_INODE", &files[0], true)
            .override_global("INODE_I_INO", &files[1], true)
            .override_global("INODE_I_SB", &files[2], true)
            .override_global("SB_S_DEV", &files[3], true)
            .override_global("EXEC_BPRM_FILE", &files[4], true)
            .override_global("EXEC_TASK_MM", &files[5], true)
            .override_global("EXEC_MM_EXE_FILE", &files[6], true)
            .override_global("FILES_TASK_FILES", &files[7], true)
            .override_global("FILES_FILES_FDT", &files[8], true)
            .override_global("FILES_FDT_FD", &files[9], true)
            .override_global("FILES_F_MODE", &walk[8], true)
            .override_global("FILES_F_PATH_MNT", &walk[0], true)
            .override_global("FILES_F_PATH_DENTRY", &walk[1], true)
            .override_global("FILES_DENTRY_PARENT", &walk[2], true)
            .override_global("FILES_DENTRY_INODE", &walk[3], true)
            .override_global("FILES_MOUNT_MNT", &walk[4], true)
            .override_global("FILES_MOUNT_MNT_ROOT", &walk[5], true)
            .override_global("FILES_MOUNT_PARENT", &walk[6], true)
            .override_global("FILES_MOUNT_MOUNTPOINT", &walk[7], true)
            .override_global("FILES_MOUNT_NS", &walk[9], true)
            .override_global("NEW_TASK_CGROUPS", &clone[0], true)
            .override_global("NEW_CSS_SET_DFL_CGRP", &clone[1], true)
            .override_global("NEW_CGROUP_KN", &clone[2], true)
            .override_global("NEW_KERNFS_NODE_ID", &clone[3], true)
            .override_global("NEW_TASK_TGID", &clone[4], true);
        if let Some(o) = &lsm {
            loader
                .override_global("FILE_F_PATH", &o.file_f_path, true)
                .override_global("FILE_F_MODE", &o.file_f_mode, true)
                .override_global("BPRM_FILENAME", &o.bprm_filename, true)
                .override_global("TASK_TGID", &o.task_tgid, true)
                .override_global("TAMPER_F_MODE", &o.file_f_mode, true)
                .override_global("DENTRY_D_INODE", &o.dentry_d_inode, true);
        }
        if let Some(pins) = &pins {
            pins.create()?;
            for (name, key, value) in MAPS {
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
            MAPS.iter()
                .filter_map(|&(name, _, _)| Some((name, MapInfo::from_pin(p.map(name)).ok()?.id())))
                .collect()
        });
        let agents = take_map(&mut ebpf, "AGENTS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let lost = take_map(&mut ebpf, "EVENTS_LOST")?;
        let events = Some(take_map(&mut ebpf, "EVENTS")?);
        let settings = take_map(&mut ebpf, "SETTINGS")?;
        let trips = take_map(&mut ebpf, "BREAKER_TRIPS")?;
        // Each concern loads (verifies) its own programs and takes its own maps.
        let egress = EgressMaps::load(&mut ebpf)?;
        let exec = ExecMaps::load(&mut ebpf)?;
        let files = FilesMaps::load(&mut ebpf, lsm.is_some())?;
        let sockets = SocketMaps::load(&mut ebpf)?;
        let dns = DnsMaps::load(&mut ebpf)?;
        let lease = LeaseMaps::load(&mut ebpf)?;
        let bytes = BytesMaps::load(&mut ebpf)?;
        let learn = LearnMaps::load(&mut ebpf)?;
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
            fork_child_pid,
            trips,
            checkpoints,
            pins,
            map_ids,
        })
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
        // Every field is a u64 (asserted in agentwatch-common): sum them word by word, so a
        // counter added later cannot be forgotten here.
        const WORDS: usize = size_of::<AgentCounters>() / 8;
        let mut sum = [0u64; WORDS];
        for c in per_cpu.iter() {
            // SAFETY: AgentCounters is #[repr(C)] of u64s only, WORDS words long.
            let words: [u64; WORDS] = unsafe { std::mem::transmute(*c) };
            for (s, v) in sum.iter_mut().zip(words) {
                *s += v;
            }
        }
        // SAFETY: as above; every bit pattern is a valid AgentCounters.
        Ok(unsafe { std::mem::transmute::<[u64; WORDS], AgentCounters>(sum) })
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

/// Tracepoints need tracefs; mount it where the kernel expects it when it is missing.
/// Offsets the LSM programs read, from the running kernel's BTF.
struct LsmOffsets {
    file_f_path: u32,
    file_f_mode: u32,
    bprm_filename: u32,
    task_tgid: u32,
    dentry_d_inode: u32,
}

/// The LSM programs' offsets when this kernel runs BPF LSM, else None (the tracepoints stand
/// in: files detected, execs and packet sockets killed). Said in the log either way, and by
/// `status` and `check`.
fn lsm_offsets(btf: Option<&crate::btf::Btf>) -> Option<LsmOffsets> {
    if !crate::files::bpf_lsm_active() {
        tracing::info!(
            "BPF LSM is not active (no `bpf` in /sys/kernel/security/lsm): file opens are \
             detected, execs and packet sockets killed, rather than refused"
        );
        return None;
    }
    let btf = btf?;
    let offsets = (|| {
        Ok::<_, crate::btf::BtfError>(LsmOffsets {
            file_f_path: btf.member_offset("file", "f_path")?,
            file_f_mode: btf.member_offset("file", "f_mode")?,
            bprm_filename: btf.member_offset("linux_binprm", "filename")?,
            task_tgid: btf.member_offset("task_struct", "tgid")?,
            dentry_d_inode: btf.member_offset("dentry", "d_inode")?,
        })
    })();
    match offsets {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(
                "BPF LSM is active but the kernel's BTF does not say where the LSM programs' \
                 fields are ({e}): falling back to detection"
            );
            None
        }
    }
}

/// Offsets the clone-into-cgroup check reads a new task's cgroup id and tgid with
/// (`task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`,
/// `task_struct.tgid`), from the running kernel's BTF. All zero when the BTF does not say:
/// the check then takes every clone into a cgroup by an agent task for an escape.
fn clone_offsets(btf: Option<&crate::btf::Btf>) -> [u32; 5] {
    let Some(btf) = btf else {
        return [0; 5];
    };
    let offsets = (|| {
        Ok::<_, crate::btf::BtfError>([
            btf.member_offset("task_struct", "cgroups")?,
            btf.member_offset("css_set", "dfl_cgrp")?,
            btf.member_offset("cgroup", "kn")?,
            btf.member_offset("kernfs_node", "id")?,
            btf.member_offset("task_struct", "tgid")?,
        ])
    })();
    offsets.unwrap_or_else(|e| {
        tracing::warn!(
            "the kernel's BTF does not say where a task's cgroup is ({e}): every \
             clone3(CLONE_INTO_CGROUP) of an agent task is taken for an escape"
        );
        [0; 5]
    })
}

/// Offsets that reach a file's identity (`file.f_inode`, `inode.i_ino`, `inode.i_sb`,
/// `super_block.s_dev`) and the file an exec opened (`linux_binprm.file`, `task_struct.mm`,
/// `mm_struct.exe_file`) and the file behind an fd (`task_struct.files`, `files_struct.fdt`,
/// `fdtable.fd`), from the running kernel's BTF, with or without BPF LSM: the exec allow-list
/// judges the file itself with them, and the file guard's tracepoints identify the file an
/// open got. All zero when the BTF does not say: execs are then judged on the path given to
/// execve (said in the log), and the daemon judges each open on the path string alone.
fn file_offsets(btf: Option<&crate::btf::Btf>) -> [u32; 10] {
    let offsets = btf.ok_or_else(|| "no BTF".to_owned()).and_then(|btf| {
        (|| {
            Ok::<_, crate::btf::BtfError>([
                btf.member_offset("file", "f_inode")?,
                btf.member_offset("inode", "i_ino")?,
                btf.member_offset("inode", "i_sb")?,
                btf.member_offset("super_block", "s_dev")?,
                btf.member_offset("linux_binprm", "file")?,
                btf.member_offset("task_struct", "mm")?,
                btf.member_offset("mm_struct", "exe_file")?,
                btf.member_offset("task_struct", "files")?,
                btf.member_offset("files_struct", "fdt")?,
                btf.member_offset("fdtable", "fd")?,
            ])
        })()
        .map_err(|e| e.to_string())
    });
    offsets.unwrap_or_else(|e| {
        tracing::warn!(
            "the kernel's BTF does not say how to reach an exec'd file ({e}): exec allow-lists \
             are judged on the path given to execve, which another mount namespace or a \
             chroot can put another program behind"
        );
        [0; 10]
    })
}

/// Offsets that lead from an opened file up through its directories and mounts (see
/// agentwatch-ebpf's `files::allowed_dir`): `file.f_path` plus `path.mnt` and plus
/// `path.dentry`, `dentry.d_parent`, `dentry.d_inode`, `mount.mnt`, `mount.mnt` plus
/// `vfsmount.mnt_root`, `mount.mnt_parent`, `mount.mnt_mountpoint`, `file.f_mode` (how the
/// file was opened) and `mount.mnt_ns` (which tells the kernel's internal mounts: pipes,
/// sockets). All zero when the BTF
/// does not say (then, without BPF LSM, every open of an agent with a file list goes to the
/// daemon, said in the log).
fn walk_offsets(btf: Option<&crate::btf::Btf>) -> [u32; 10] {
    let offsets = btf.ok_or_else(|| "no BTF".to_owned()).and_then(|btf| {
        (|| {
            let f_path = btf.member_offset("file", "f_path")?;
            let mnt = btf.member_offset("mount", "mnt")?;
            Ok::<_, crate::btf::BtfError>([
                f_path + btf.member_offset("path", "mnt")?,
                f_path + btf.member_offset("path", "dentry")?,
                btf.member_offset("dentry", "d_parent")?,
                btf.member_offset("dentry", "d_inode")?,
                mnt,
                mnt + btf.member_offset("vfsmount", "mnt_root")?,
                btf.member_offset("mount", "mnt_parent")?,
                btf.member_offset("mount", "mnt_mountpoint")?,
                btf.member_offset("file", "f_mode")?,
                btf.member_offset("mount", "mnt_ns")?,
            ])
        })()
        .map_err(|e| e.to_string())
    });
    match offsets {
        // Zero is the "unknown" mark on the kernel side: every one of these is past a first
        // member on every kernel, so a zero here means a layout this code does not know.
        Ok(o) if o.iter().all(|&v| v != 0) => o,
        Ok(o) => {
            tracing::warn!(
                "unexpected file and mount layout in the kernel's BTF ({o:?}): without BPF LSM, \
                 every open of an agent with a file list goes to the daemon to be judged"
            );
            [0; 10]
        }
        Err(e) => {
            tracing::warn!(
                "the kernel's BTF does not say how to walk up from a file ({e}): without BPF \
                 LSM, every open of an agent with a file list goes to the daemon to be judged"
            );
            [0; 10]
        }
    }
}

fn ensure_tracefs() -> Result<(), KernelError> {
    let events = Path::new("/sys/kernel/tracing/events");
    if events.exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .status();
    match status {
        Ok(s) if s.success() && events.exists() => Ok(()),
        _ => Err(KernelError::Pin {
            path: PathBuf::from("/sys/kernel/tracing"),
            source: std::io::Error::other(
                "tracefs is not mounted and mounting it failed (mount -t tracefs tracefs /sys/kernel/tracing)",
            ),
        }),
    }
}

/// The offset of `field` in tracepoint `category/name`'s record, from its format file: record
/// layouts change between kernels (the fork record's comms became `__data_loc` after 6.12).
fn tracepoint_field_offset(category: &str, name: &str, field: &str) -> Result<u32, KernelError> {
    let candidates = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ];
    let path = candidates
        .iter()
        .map(|root| Path::new(root).join(category).join(name).join("format"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            Path::new(candidates[0])
                .join(category)
                .join(name)
                .join("format")
        });
    let pin_err = |source| KernelError::Pin {
        path: path.clone(),
        source,
    };
    let format = std::fs::read_to_string(&path).map_err(pin_err)?;
    parse_field_offset(&format, field).ok_or_else(|| {
        pin_err(std::io::Error::other(format!(
            "no field `{field}` with an offset in the tracepoint's format"
        )))
    })
}

/// `offset:N` of the line declaring `field` in a tracepoint format
/// (`\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;`).
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.split_whitespace().last()?;
        if name.split('[').next()? != field {
            return None;
        }
        let offset = rest
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it. Raising it
/// costs nothing and keeps older kernels from failing with a confusing EPERM.
/// Waits until every BPF program that was running when it was called has finished: an RCU
/// grace period, through membarrier(MEMBARRIER_CMD_GLOBAL), which calls synchronize_rcu()
/// (BPF programs run inside RCU read-side sections). Before removing entries that a program
/// may have found through a value it read just before that value changed (the old rule
/// generation after a flip): without it a call that read the old generation, then lost its CPU
/// (seen in a TCG guest, 1 wrong verdict in 37,716 during 100 reloads), found its rules gone
/// and was denied.
pub fn wait_for_running_programs() {
    /// linux/membarrier.h.
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // Only nohz_full kernels refuse it: wait far longer than any program runs.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) failed ({}): old rule generations are removed \
                 100 ms after a reload's flip instead of after an RCU grace period",
                std::io::Error::last_os_error()
            );
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised rlimit.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_says_how_to_walk_up_from_a_file() {
        // Every supported kernel has BTF (the daemon needs it for the LSM and exec offsets).
        let btf = crate::btf::Btf::vmlinux().expect("the running kernel's BTF");
        let o = walk_offsets(Some(&btf));
        assert!(o.iter().all(|&v| v != 0), "{o:?}");
        // `path` is { mnt, dentry }: the two sums are 8 bytes apart.
        assert_eq!(o[1], o[0] + 8, "{o:?}");
        // mnt_root is the vfsmount's first member.
        assert_eq!(o[5], o[4], "{o:?}");
        assert_eq!(walk_offsets(None), [0; 10]);
    }

    #[test]
    fn finds_a_field_offset_in_a_tracepoint_format() {
        // 6.1's record (comms inline) and 6.18's (comms as __data_loc).
        let v61 = "name: sched_process_fork\nID: 300\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(v61, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(v61, "parent_comm"), Some(8));
        let v618 = "format:\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(v618, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(v618, "pid"), None);
        assert_eq!(parse_field_offset("", "child_pid"), None);
    }
}
