//! Exec and fork telemetry and the exec allow-list: the userspace half of
//! `agentwatch-ebpf/src/exec.rs`.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    path::{Path, PathBuf},
};

use agentwatch_common::{
    EVENT_EXEC, EVENT_EXEC_DENIED, EVENT_EXEC_REFUSED, EXEC_PATH_MAX, ExecEvent, ExecInodeKey,
    ExecKey,
};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::TracePoint,
};
use serde_json::json;

use crate::{
    audit::KernelLine,
    bpf::{
        KernelError, LinkSet, c_string, ignore_missing, load::LoadEnv, load_program, map_err,
        program, read_record, remove_where, take_map,
    },
    concern::{Concern, History, Load, MapSpec, Policy, Slot},
};

/// The tracepoint programs: (name in the object, category, tracepoint).
pub const PROGRAMS: [(&str, &str, &str); 2] = [
    ("exec_sched_process_exec", "sched", "sched_process_exec"),
    ("exec_sched_process_fork", "sched", "sched_process_fork"),
];

/// The exec allow-lists of every agent: by path (`EXEC_ALLOW`: agent id + path, for kernels
/// whose BTF does not say how to reach an exec'd file) and by the files those paths name
/// (`EXEC_INODES`: agent id + device + inode, what the kernel judges everywhere else).
pub struct ExecMaps {
    allow: HashMap<MapData, ExecKey, u8>,
    inodes: HashMap<MapData, ExecInodeKey, u8>,
    /// What `inodes` holds per agent id, so a refresh compares without reading the map.
    written: StdHashMap<u32, HashSet<ExecInodeKey>>,
    /// Each allowed path's file, held open: an inode the kernel numbers afresh when it is
    /// read in again (overlayfs) keeps its number while it is open.
    held: StdHashMap<PathBuf, std::fs::File>,
    /// One refresh pass's answers, by path (several agents allow the same programs) ...
    seen: StdHashMap<PathBuf, Option<(u32, u64)>>,
    /// ... and the mount table, read once a pass.
    mountinfo: Option<String>,
}

impl Load for ExecMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("EXEC_ALLOW", size_of::<ExecKey>(), 1),
        MapSpec::new("EXEC_INODES", size_of::<ExecInodeKey>(), 1),
        MapSpec::new("PARENTS", 4, 4),
        MapSpec::new("SCRATCH", 4, size_of::<ExecKey>()),
    ];

    /// Loads (verifies) the programs and takes the allow-list map out of the object.
    fn load(ebpf: &mut Ebpf, _env: &LoadEnv) -> Result<Self, KernelError> {
        for (name, _, _) in PROGRAMS {
            load_program(name, program::<TracePoint>(ebpf, name)?, TracePoint::load)?;
        }
        Ok(Self {
            allow: take_map(ebpf, "EXEC_ALLOW")?,
            inodes: take_map(ebpf, "EXEC_INODES")?,
            written: StdHashMap::new(),
            held: StdHashMap::new(),
            seen: StdHashMap::new(),
            mountinfo: None,
        })
    }
}

/// An exec path on both the old and the new list is allowed at every instant: a reload's new
/// paths go in beside the live list, stale ones go after the switch.
impl Concern for ExecMaps {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn sweep_free_slots(&mut self, live: &HashSet<u32>) -> Result<(), KernelError> {
        remove_where(&mut self.allow, "EXEC_ALLOW", |k| !live.contains(&k.agent))?;
        remove_where(&mut self.inodes, "EXEC_INODES", |k| {
            !live.contains(&k.agent)
        })?;
        self.written.retain(|id, _| live.contains(id));
        Ok(())
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        match slot.history {
            History::Fresh => Ok(()),
            _ => self.sync(slot.id, None),
        }
    }

    fn prepare(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        match slot.history {
            // A clean slot, or new paths beside a live list: only additions.
            History::Live | History::Fresh => {
                for p in new.exec_allow.iter().flatten() {
                    self.insert(slot.id, p)?;
                }
                Ok(())
            }
            // Whatever an earlier daemon's list had that this one has not goes now.
            History::Adopted => self.sync(slot.id, new.exec_allow.as_deref()),
        }
    }

    fn abort(&mut self, slot: Slot, _prepared: &Policy, live: &Policy) -> Result<(), KernelError> {
        self.sync(slot.id, live.exec_allow.as_deref())
    }

    fn settle(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        match slot.history {
            History::Live => self.sync(slot.id, new.exec_allow.as_deref()),
            History::Fresh | History::Adopted => Ok(()),
        }
    }
}

impl ExecMaps {
    /// Allows agent `id` to exec `path`: the path, and the file it names now (a path that
    /// names no file allows nothing but its own string, for kernels judging on that).
    pub(crate) fn insert(&mut self, id: u32, path: &Path) -> Result<(), KernelError> {
        let key = exec_key(id, path).map_err(|e| KernelError::Policy(e.to_string()))?;
        self.allow
            .insert(key, 1, 0)
            .map_err(map_err("EXEC_ALLOW"))?;
        if let Some(k) = self.inode_of(id, path) {
            self.inodes
                .insert(k, 1, 0)
                .map_err(map_err("EXEC_INODES"))?;
            self.written.entry(id).or_default().insert(k);
        }
        Ok(())
    }

    /// Makes agent `id`'s files exactly those `paths` name now, if that changed since they
    /// were written (a package upgrade replaces a program with a new file at the same path).
    /// New files go in before old ones go, so a program on both is never refused. Returns the
    /// paths whose file changed.
    pub(crate) fn refresh(
        &mut self,
        id: u32,
        paths: &[PathBuf],
    ) -> Result<Vec<PathBuf>, KernelError> {
        let keys: Vec<(PathBuf, Option<ExecInodeKey>)> = paths
            .iter()
            .map(|p| (p.clone(), self.inode_seen(id, p)))
            .collect();
        let want: HashSet<ExecInodeKey> = keys.iter().filter_map(|(_, k)| *k).collect();
        let had = self.written.get(&id).cloned().unwrap_or_default();
        if want == had {
            return Ok(Vec::new());
        }
        for k in want.difference(&had) {
            self.inodes
                .insert(*k, 1, 0)
                .map_err(map_err("EXEC_INODES"))?;
        }
        for k in had.difference(&want) {
            ignore_missing(self.inodes.remove(k), "EXEC_INODES")?;
        }
        let changed = keys
            .into_iter()
            .filter(|(_, k)| k.is_some_and(|k| !had.contains(&k)))
            .map(|(p, _)| p)
            .collect();
        self.written.insert(id, want);
        Ok(changed)
    }

    /// Makes agent `id`'s allow-list exactly `paths` (None: empty): inserts first, then removes
    /// what is no longer listed, so a path on both the old and the new list is never missing.
    pub(crate) fn sync(&mut self, id: u32, paths: Option<&[PathBuf]>) -> Result<(), KernelError> {
        let mut want: HashSet<Vec<u8>> = HashSet::new();
        for p in paths.unwrap_or_default() {
            self.insert(id, p)?;
            want.insert(p.as_os_str().as_encoded_bytes().to_vec());
        }
        let stale: Vec<ExecKey> = self
            .allow
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let len = k.path.iter().position(|&b| b == 0).unwrap_or(k.path.len());
                k.agent == id && !want.contains(&k.path[..len])
            })
            .collect();
        for k in stale {
            ignore_missing(self.allow.remove(&k), "EXEC_ALLOW")?;
        }
        // The files: read from the map (a restarted daemon's pins hold an earlier one's).
        let want: HashSet<ExecInodeKey> = paths
            .unwrap_or_default()
            .iter()
            .filter_map(|p| self.inode_of(id, p))
            .collect();
        let stale: Vec<ExecInodeKey> = self
            .inodes
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.agent == id && !want.contains(k))
            .collect();
        for k in stale {
            ignore_missing(self.inodes.remove(&k), "EXEC_INODES")?;
        }
        if want.is_empty() {
            self.written.remove(&id);
        } else {
            self.written.insert(id, want);
        }
        Ok(())
    }

    /// The allow-list key of the file `path` names now for agent `id` (symlinks followed, as
    /// execve follows them), in the kernel's device encoding; None if nothing is there. The
    /// file stays open (`held`) until the path names another.
    fn inode_of(&mut self, id: u32, path: &Path) -> Option<ExecInodeKey> {
        let (dev, ino, file) = kernel_identity_in(path, &mut None)?;
        self.held.insert(path.to_owned(), file);
        Some(ExecInodeKey {
            agent: id,
            dev,
            ino,
        })
    }

    /// Starts a refresh pass over every agent: each path is looked at once in it.
    pub(crate) fn begin_refresh(&mut self) {
        self.seen.clear();
        self.mountinfo = None;
    }

    /// [`Self::inode_of`], answered once per path in a refresh pass.
    fn inode_seen(&mut self, id: u32, path: &Path) -> Option<ExecInodeKey> {
        let identity = match self.seen.get(path) {
            Some(known) => *known,
            None => {
                let found =
                    kernel_identity_in(path, &mut self.mountinfo).map(|(dev, ino, file)| {
                        self.held.insert(path.to_owned(), file);
                        (dev, ino)
                    });
                self.seen.insert(path.to_owned(), found);
                found
            }
        };
        identity.map(|(dev, ino)| ExecInodeKey {
            agent: id,
            dev,
            ino,
        })
    }
}

/// The identity the kernel's programs see for the file `path` names: the super block's device
/// (`MAJOR << 20 | MINOR`) and the inode number of the file an open of it gets. Read from
/// /proc/self/fdinfo (`ino:`, `mnt_id:`) and /proc/self/mountinfo (the mount's device), not
/// from stat(2): on overlayfs stat reports the underlying file's device and number while the
/// file an exec opens is the overlay's, with a number of its own. stat's answer where /proc
/// does not say (before 5.14 fdinfo has no `ino:`).
pub fn kernel_identity(path: &Path) -> Option<(u32, u64, std::fs::File)> {
    kernel_identity_in(path, &mut None)
}

/// [`kernel_identity`] with the mount table read at most once into `mountinfo`.
fn kernel_identity_in(
    path: &Path,
    mountinfo: &mut Option<String>,
) -> Option<(u32, u64, std::fs::File)> {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    let file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    let stat_dev = (libc::major(meta.dev()) << 20) | libc::minor(meta.dev());
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
    let field = |key: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    let ino = field("ino:")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(meta.ino());
    let dev = field("mnt_id:")
        .and_then(|id| mount_device(&id, mountinfo))
        .unwrap_or(stat_dev);
    Some((dev, ino, file))
}

/// The device (`MAJOR << 20 | MINOR`) of the mount with id `mnt_id`, from mountinfo.
fn mount_device(mnt_id: &str, mountinfo: &mut Option<String>) -> Option<u32> {
    if mountinfo.is_none() {
        *mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok();
    }
    let info = mountinfo.as_deref()?;
    let line = info.lines().find(|l| l.split(' ').next() == Some(mnt_id))?;
    let (major, minor) = line.split(' ').nth(2)?.split_once(':')?;
    Some((major.parse::<u32>().ok()? << 20) | minor.parse::<u32>().ok()?)
}

/// Attaches the tracepoints host-wide (they act only on agents' tasks), pinned under
/// `pin_dir` when given; pins of an earlier daemon are adopted.
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    crate::bpf::link::attach_tracepoints(ebpf, &PROGRAMS, pin_dir, links)
}

/// An exec of an agent process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRecord {
    /// `exec` or `exec_denied` (killed or refused by the allow-list).
    pub kind: &'static str,
    /// exec_denied: refused with EPERM by BPF LSM (the process lives on), not killed.
    pub refused: bool,
    pub agent_id: u32,
    pub pid: u32,
    /// 0 when the fork predates the programs.
    pub ppid: u32,
    pub comm: String,
    pub path: String,
    pub ts_ns: u64,
}

impl ExecRecord {
    /// `exec` / `exec_denied` (pid, ppid, comm, path). The kernel knows the parent only for
    /// forks it saw; /proc is asked otherwise.
    pub fn audit_line(&self) -> KernelLine {
        let ppid = if self.ppid != 0 {
            self.ppid
        } else {
            proc_ppid(self.pid).unwrap_or(0)
        };
        let mut line = KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: self.kind,
            pid: self.pid,
            fields: json!({
                "pid": self.pid,
                "ppid": ppid,
                "comm": self.comm,
                "path": self.path,
            }),
        };
        if self.kind == "exec_denied" {
            line.fields["action"] = json!(if self.refused { "refused" } else { "killed" });
        }
        line
    }
}

/// Decodes an exec record (`kind` is its first word); None for other kinds.
pub fn decode(kind: u32, bytes: &[u8]) -> Option<ExecRecord> {
    if kind != EVENT_EXEC && kind != EVENT_EXEC_DENIED && kind != EVENT_EXEC_REFUSED {
        return None;
    }
    let e = read_record::<ExecEvent>(bytes)?;
    Some(ExecRecord {
        kind: if e.kind == EVENT_EXEC {
            "exec"
        } else {
            "exec_denied"
        },
        refused: e.kind == EVENT_EXEC_REFUSED,
        agent_id: e.agent,
        pid: e.pid,
        ppid: e.ppid,
        comm: c_string(&e.comm),
        path: c_string(&e.path),
        ts_ns: e.ts_ns,
    })
}

/// The parent pid of `pid` from /proc (None if it is gone).
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Why a path cannot be on an exec allow-list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecPathError {
    #[error("`{0}` is longer than {EXEC_PATH_MAX} bytes")]
    TooLong(String),
    #[error("`{0}` contains a NUL byte")]
    Nul(String),
}

/// The allow-list key of `path` for agent `agent` (NUL-padded, as the kernel builds it).
pub fn exec_key(agent: u32, path: &Path) -> Result<ExecKey, ExecPathError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    let shown = || path.display().to_string();
    if bytes.len() > EXEC_PATH_MAX {
        return Err(ExecPathError::TooLong(shown()));
    }
    if bytes.contains(&0) {
        return Err(ExecPathError::Nul(shown()));
    }
    let mut key = ExecKey {
        agent,
        ..ExecKey::default()
    };
    key.path[..bytes.len()].copy_from_slice(bytes);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_identity_of_a_file_is_its_inode_and_its_mounts_device() {
        use std::os::unix::fs::MetadataExt as _;
        let (dev, ino, _file) = kernel_identity(Path::new("/proc/self/exe")).unwrap();
        let m = std::fs::metadata("/proc/self/exe").unwrap();
        // SAFETY: statfs fills the struct it is given.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a live struct.
        assert_eq!(
            unsafe { libc::statfs(c"/proc/self/exe".as_ptr(), &mut fs) },
            0
        );
        const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
        if fs.f_type as i64 != OVERLAYFS_SUPER_MAGIC {
            // Elsewhere than on overlayfs: the same as stat says.
            assert_eq!(ino, m.ino());
            assert_eq!(dev, (libc::major(m.dev()) << 20) | libc::minor(m.dev()));
        }
        assert!(kernel_identity(Path::new("/nonexistent/x")).is_none());
    }

    #[test]
    fn keys_are_nul_padded_and_bounded() {
        let k = exec_key(3, Path::new("/usr/bin/curl")).unwrap();
        assert_eq!(k.agent, 3);
        assert_eq!(&k.path[..13], b"/usr/bin/curl");
        assert!(k.path[13..].iter().all(|&b| b == 0));
        let long = format!("/{}", "x".repeat(EXEC_PATH_MAX));
        assert!(matches!(
            exec_key(1, Path::new(&long)),
            Err(ExecPathError::TooLong(_))
        ));
        let max = format!("/{}", "x".repeat(EXEC_PATH_MAX - 1));
        assert!(exec_key(1, Path::new(&max)).is_ok());
    }
}
