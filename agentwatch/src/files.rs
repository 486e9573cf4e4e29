//! The file guard (`[agents.files]`): the userspace half of `agentwatch-ebpf/src/files.rs`.
//!
//! Where the kernel has BPF LSM, `lsm/file_open` refuses opens outside an agent's prefixes
//! with EACCES and reports them. Elsewhere the open syscalls' tracepoints report the agent's
//! opens and this module resolves each (through /proc, as the process sees it) and judges it:
//! an open outside the list is audited and the agent's breaker action runs.

use std::path::{Component, Path, PathBuf};

use agentwatch_common::{
    EVENT_FILE_DENIED, EVENT_FILE_OPENED, FILE_ACCESS_LINK, FILE_ACCESS_READ, FILE_ACCESS_WRITE,
    FILE_KEY_AGENT_BITS, FILE_RULE_READ_ONLY, FileDirKey, FileEvent, FilePath, InodeKey,
};
use aya::{
    Btf, Ebpf,
    maps::{
        HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Lsm, TracePoint, links::FdLink},
};
use serde_json::json;

pub use crate::rules::files::{FileRule, admitted};
use crate::{
    audit::KernelLine,
    bpf::{
        KernelError, Link, LinkSet, c_string, ignore_missing, load::LoadEnv, load_program, map_err,
        program, read_record, remove_where, take_map,
    },
    concern::{Concern, History, Load, MapSpec, Policy, Slot},
};

/// A rule's entries in the kernel's trie: the prefix, and for `/dir/` the directory itself
/// (`/dir` followed by its NUL, an exact match).
fn keys(rule: &FileRule, agent: u32) -> Vec<Key<FilePath>> {
    let mut out = vec![key(agent, rule.prefix.as_bytes(), false)];
    if let Some(dir) = rule.prefix.strip_suffix('/')
        && !dir.is_empty()
    {
        out.push(key(agent, dir.as_bytes(), true));
    }
    out
}

fn key(agent: u32, bytes: &[u8], with_nul: bool) -> Key<FilePath> {
    let mut data = FilePath {
        agent,
        ..FilePath::default()
    };
    data.path[..bytes.len()].copy_from_slice(bytes);
    let len = bytes.len() + usize::from(with_nul);
    Key::new(FILE_KEY_AGENT_BITS + 8 * len as u32, data)
}

/// The directories `rules` name, by identity, as the open tracepoints look them up
/// (`FILE_DIRS`): each `/dir/` prefix that is a directory now (followed through symlinks, as
/// an open would be). Two rules on one directory (`/lib/:ro` and `/usr/lib/`) keep the
/// stricter: the kernel then sends the open to the daemon, which judges the path it names.
/// A prefix that is not a directory yet is left to the daemon too.
pub fn dir_keys(agent: u32, rules: &[FileRule]) -> std::collections::BTreeMap<FileDirKey, u32> {
    let mut out = std::collections::BTreeMap::new();
    for r in rules {
        if !r.prefix.ends_with('/') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&r.prefix) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let id = crate::tamper::kernel_inode_key(&meta);
        let key = FileDirKey {
            agent,
            dev: id.dev,
            ino: id.ino,
        };
        let bits = if r.read_only { FILE_RULE_READ_ONLY } else { 0 };
        *out.entry(key).or_insert(bits) |= bits;
    }
    out
}

/// LSM programs and their hooks: the file guard's, attached while some agent has a file list
/// (`file_open` runs for every open on the host) ...
pub const LSM_FILE_PROGRAMS: [(&str, &str); 2] = [
    ("files_file_open", "file_open"),
    ("files_path_link", "path_link"),
];
/// ... and the exec allow-list's and packet-socket guard's, attached for as long as the daemon
/// guards anything (they replace tracepoints that are always attached).
pub const LSM_HOST_PROGRAMS: [(&str, &str); 8] = [
    ("exec_bprm_check_security", "bprm_check_security"),
    ("sockets_socket_create", "socket_create"),
    // clone3(CLONE_INTO_CGROUP) by an agent task (crate::sockets).
    ("sockets_task_alloc", "task_alloc"),
    // The tamper guard (crate::tamper): no bpf() from agents, no signal to the daemon, no
    // change to the daemon's files.
    ("tamper_bpf", "bpf"),
    ("tamper_task_kill", "task_kill"),
    ("tamper_file_open", "file_open"),
    ("tamper_inode_unlink", "inode_unlink"),
    ("tamper_inode_rename", "inode_rename"),
];

/// The open tracepoints that stand in for `lsm/file_open` where the kernel has no BPF LSM.
pub const TRACEPOINTS: [(&str, &str, &str); 8] = [
    ("files_sys_enter_openat", "syscalls", "sys_enter_openat"),
    ("files_sys_exit_openat", "syscalls", "sys_exit_openat"),
    ("files_sys_enter_openat2", "syscalls", "sys_enter_openat2"),
    ("files_sys_exit_openat2", "syscalls", "sys_exit_openat2"),
    ("files_sys_enter_open", "syscalls", "sys_enter_open"),
    ("files_sys_exit_open", "syscalls", "sys_exit_open"),
    ("files_sys_enter_creat", "syscalls", "sys_enter_creat"),
    ("files_sys_exit_creat", "syscalls", "sys_exit_creat"),
];

fn load_lsm(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    let btf = Btf::from_sys_fs().map_err(|e| KernelError::Policy(format!("BTF: {e}")))?;
    for (name, hook) in LSM_FILE_PROGRAMS.into_iter().chain(LSM_HOST_PROGRAMS) {
        load_program(name, program::<Lsm>(ebpf, name)?, |p| p.load(hook, &btf))?;
    }
    Ok(())
}

/// The file guards' maps, and whether BPF LSM programs guard this host.
pub struct FilesMaps {
    allow: LpmTrie<MapData, FilePath, u32>,
    dirs: HashMap<MapData, FileDirKey, u32>,
    lsm: bool,
}

impl Load for FilesMaps {
    const MAPS: &'static [MapSpec] = &[
        MapSpec::new("FILE_ALLOW", 4 + size_of::<FilePath>(), 4),
        // The trie key and a PATH_MAX buffer.
        MapSpec::new("FILE_SCRATCH", 4, 4 + size_of::<FilePath>() + 4096),
        MapSpec::new("OPENS", 8, 16),
        MapSpec::new("FILE_DIRS", size_of::<FileDirKey>(), 4),
    ];

    /// Loads (verifies) the LSM programs when the kernel runs BPF LSM, else (or if this kernel
    /// refuses one of them: a hook built out, a helper not allowed there) the open tracepoints,
    /// saying so in the log; `status` and `check` show the mode that resulted.
    fn load(ebpf: &mut Ebpf, env: &LoadEnv) -> Result<Self, KernelError> {
        let lsm = env.lsm()
            && match load_lsm(ebpf) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "BPF LSM is active but this kernel refused agentwatch's LSM programs \
                         ({e}): files are detected, execs and packet sockets killed, instead"
                    );
                    false
                }
            };
        if !lsm {
            for (name, _, _) in TRACEPOINTS {
                load_program(name, program::<TracePoint>(ebpf, name)?, TracePoint::load)?;
            }
        }
        Ok(Self {
            allow: take_map(ebpf, "FILE_ALLOW")?,
            dirs: take_map(ebpf, "FILE_DIRS")?,
            lsm,
        })
    }
}

/// A prefix on both the old and the new list is allowed at every instant: a reload's new
/// prefixes go in beside the live list, stale ones go after the switch.
impl Concern for FilesMaps {
    fn name(&self) -> &'static str {
        "files"
    }

    fn sweep_free_slots(
        &mut self,
        live: &std::collections::HashSet<u32>,
    ) -> Result<(), KernelError> {
        let stale: Vec<Key<FilePath>> = self
            .allow
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&k.data().agent))
            .collect();
        for k in stale {
            ignore_missing(self.allow.remove(&k), "FILE_ALLOW")?;
        }
        remove_where(&mut self.dirs, "FILE_DIRS", |k| !live.contains(&k.agent))?;
        Ok(())
    }

    fn forget(&mut self, slot: Slot, _last: Option<&Policy>) -> Result<(), KernelError> {
        match slot.history {
            History::Fresh => Ok(()),
            _ => self.sync(slot.id, None),
        }
    }

    fn prepare(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        match (slot.history, &new.files) {
            // A clean slot, or new prefixes beside a live list: only additions.
            (History::Live | History::Fresh, Some(rules)) => self.insert(slot.id, rules),
            (History::Live | History::Fresh, None) => Ok(()),
            // Whatever an earlier daemon's list had that this one has not goes now.
            (History::Adopted, files) => self.sync(slot.id, files.as_deref()),
        }
    }

    fn abort(&mut self, slot: Slot, _prepared: &Policy, live: &Policy) -> Result<(), KernelError> {
        self.sync(slot.id, live.files.as_deref())
    }

    fn settle(&mut self, slot: Slot, new: &Policy) -> Result<(), KernelError> {
        match slot.history {
            History::Live => self.sync(slot.id, new.files.as_deref()),
            History::Fresh | History::Adopted => Ok(()),
        }
    }
}

impl FilesMaps {
    /// BPF LSM programs guard files, execs and packet sockets (else: tracepoints detect).
    pub fn lsm(&self) -> bool {
        self.lsm
    }

    /// Makes agent `id`'s prefixes exactly `rules` (None: none): inserts first, then removes
    /// what is no longer listed, so a prefix on both the old and the new list is never missing.
    pub(crate) fn sync(&mut self, id: u32, rules: Option<&[FileRule]>) -> Result<(), KernelError> {
        let rules = rules.unwrap_or_default();
        // The allowed directories, stat'ed once: those inserted are exactly those kept.
        let dirs = dir_keys(id, rules);
        self.insert_prefixes(id, rules)?;
        self.insert_dirs(&dirs)?;
        let want: Vec<(u32, FilePath)> = rules
            .iter()
            .flat_map(|r| keys(r, id))
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        let stale: Vec<Key<FilePath>> = self
            .allow
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().agent == id && !want.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            ignore_missing(self.allow.remove(&k), "FILE_ALLOW")?;
        }
        let stale: Vec<FileDirKey> = self
            .dirs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.agent == id && !dirs.contains_key(k))
            .collect();
        for k in stale {
            ignore_missing(self.dirs.remove(&k), "FILE_DIRS")?;
        }
        Ok(())
    }

    /// Adds `rules` for agent `id` without removing anything (a reload's first step).
    pub(crate) fn insert(&mut self, id: u32, rules: &[FileRule]) -> Result<(), KernelError> {
        self.insert_prefixes(id, rules)?;
        self.insert_dirs(&dir_keys(id, rules))
    }

    fn insert_prefixes(&mut self, id: u32, rules: &[FileRule]) -> Result<(), KernelError> {
        for r in rules {
            let value = if r.read_only { FILE_RULE_READ_ONLY } else { 0 };
            for k in keys(r, id) {
                self.allow
                    .insert(&k, value, 0)
                    .map_err(map_err("FILE_ALLOW"))?;
            }
        }
        Ok(())
    }

    fn insert_dirs(
        &mut self,
        dirs: &std::collections::BTreeMap<FileDirKey, u32>,
    ) -> Result<(), KernelError> {
        for (k, &bits) in dirs {
            self.dirs.insert(k, bits, 0).map_err(map_err("FILE_DIRS"))?;
        }
        Ok(())
    }
}

/// Attaches the file guard host-wide (it acts on agents with a file list only): the LSM
/// programs, or the open tracepoints. Pinned under `pin_dir` when given; pins of an earlier
/// daemon are adopted.
pub(crate) fn attach_guard(
    ebpf: &mut Ebpf,
    lsm: bool,
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    if lsm {
        attach_lsm(ebpf, &LSM_FILE_PROGRAMS, pin_dir, links)
    } else {
        crate::bpf::link::attach_tracepoints(ebpf, &TRACEPOINTS, pin_dir, links)
    }
}

/// Did an earlier daemon leave the file guard attached (pinned under `pin_dir`)?
pub(crate) fn guard_pinned(pin_dir: &Path, lsm: bool) -> bool {
    if lsm {
        LSM_FILE_PROGRAMS
            .iter()
            .any(|(n, _)| pin_dir.join(n).exists())
    } else {
        TRACEPOINTS.iter().any(|(n, _, _)| pin_dir.join(n).exists())
    }
}

/// Attaches the exec and packet-socket LSM programs when the kernel has BPF LSM (nothing
/// otherwise: the tracepoints that kill instead are exec.rs's and sockets.rs's).
pub(crate) fn attach_host(
    ebpf: &mut Ebpf,
    lsm: bool,
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    if lsm {
        attach_lsm(ebpf, &LSM_HOST_PROGRAMS, pin_dir, links)
    } else {
        Ok(())
    }
}

fn attach_lsm(
    ebpf: &mut Ebpf,
    programs: &[(&'static str, &str)],
    pin_dir: Option<&Path>,
    links: &mut LinkSet,
) -> Result<(), KernelError> {
    for &(name, _) in programs {
        links.push(Link::pinned_or_attach(pin_dir, name, || {
            let prog = program::<Lsm>(ebpf, name)?;
            let id = prog
                .attach()
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            Ok(FdLink::from(link))
        })?);
    }
    Ok(())
}

/// A file open of an agent: refused by the kernel, or (without BPF LSM) made, to be judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Refused by `lsm/file_open` (else: an open the tracepoints saw, not yet judged).
    pub refused: bool,
    pub agent_id: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub write: bool,
    pub read: bool,
    /// A hard link refused (no path: the hook names dentries, not paths).
    pub link: bool,
    /// Refused: the path the kernel resolved. Opened: the path as passed, as read at the
    /// syscall's exit (empty: unreadable; see [`FileRecord::resolve`]).
    pub path: String,
    pub fd: i32,
    pub dirfd: i32,
    /// Opened: the file the kernel found behind `fd` (zero: unknown).
    pub file: InodeKey,
    pub ts_ns: u64,
}

/// Where the path a detected open is judged on came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathFrom {
    /// The string the process passed (resolved against its working directory or dirfd).
    Passed,
    /// That string could not be read, or did not lead to the file the kernel opened: the
    /// name of the fd, which still held that very file.
    Fd,
    /// Neither: the fd no longer holds that file, or this kernel's BTF gave no way to tell.
    /// No rule admits an unknown path.
    Unknown,
}

/// Decodes a file record (`kind` is its first word); None for other kinds.
pub fn decode(kind: u32, bytes: &[u8]) -> Option<FileRecord> {
    if kind != EVENT_FILE_DENIED && kind != EVENT_FILE_OPENED {
        return None;
    }
    let e = read_record::<FileEvent>(bytes)?;
    Some(FileRecord {
        refused: e.kind == EVENT_FILE_DENIED,
        agent_id: e.agent,
        pid: e.tgid,
        tid: e.pid,
        comm: c_string(&e.comm),
        write: e.access & FILE_ACCESS_WRITE != 0,
        read: e.access & FILE_ACCESS_READ != 0,
        link: e.access & FILE_ACCESS_LINK != 0,
        path: c_string(&e.path),
        fd: e.fd,
        dirfd: e.dirfd,
        file: InodeKey {
            dev: e.dev,
            _pad: 0,
            ino: e.ino,
        },
        ts_ns: e.ts_ns,
    })
}

const AT_FDCWD: i32 = -100;

impl FileRecord {
    /// "read", "write", "read_write" or "link".
    pub fn access(&self) -> &'static str {
        if self.link {
            return "link";
        }
        match (self.read, self.write) {
            (true, true) => "read_write",
            (false, true) => "write",
            _ => "read",
        }
    }

    /// The opened file's path as the process saw it: the path it passed, made absolute
    /// against its working directory (or `dirfd`), with symlinks and `..` resolved as they are
    /// now (lexically where the file is gone), believed only where it leads to the file the
    /// kernel opened (its device and inode in the record). The string is read from the
    /// caller's memory at the syscall's exit: unreadable by then (its page unmapped), changed
    /// by another thread since the kernel read it, it names something else or nothing. Then
    /// the fd is asked, and believed only while it holds that file; else the path is unknown.
    /// The fd is not asked first: by the time the daemon reads the record the process may
    /// have closed it and opened something else on the same number (seen: an fd reused
    /// across an exec). A kernel whose BTF gave no identity leaves the string unchecked.
    pub fn resolve(&self) -> (String, PathFrom) {
        if let Some(path) = self.resolve_passed() {
            let same = self.file == InodeKey::default()
                || std::fs::metadata(&path)
                    .is_ok_and(|m| crate::tamper::kernel_inode_key(&m) == self.file);
            if same {
                return (path, PathFrom::Passed);
            }
        }
        match self.name_by_fd() {
            Some(path) => (path, PathFrom::Fd),
            None => (String::new(), PathFrom::Unknown),
        }
    }

    /// The passed path made absolute and resolved (see [`FileRecord::resolve`]); None when
    /// there is none or it is relative to a directory no longer known (the process gone or
    /// its `dirfd` closed): no guess at a base, which would name some other file.
    fn resolve_passed(&self) -> Option<String> {
        if self.path.is_empty() {
            return None;
        }
        let proc = PathBuf::from(format!("/proc/{}", self.pid));
        let passed = Path::new(&self.path);
        let absolute = if let Ok(rest) = passed.strip_prefix("/proc/self") {
            // The process's own /proc entry, not the daemon's.
            proc.join(rest)
        } else if let Ok(rest) = passed.strip_prefix("/proc/thread-self") {
            proc.join("task").join(self.tid.to_string()).join(rest)
        } else if passed.is_absolute() {
            passed.to_path_buf()
        } else {
            let base = if self.dirfd == AT_FDCWD {
                std::fs::read_link(proc.join("cwd"))
            } else {
                std::fs::read_link(proc.join("fd").join(self.dirfd.to_string()))
            };
            base.ok()?.join(passed)
        };
        Some(
            std::fs::canonicalize(&absolute)
                .unwrap_or_else(|_| normalize(&absolute))
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// The name of the file behind the record's fd, if it is still the file the kernel saw
    /// opened. The fd is opened once (O_PATH: a FIFO does not block it) and both the identity
    /// and the name are read from that one open, so the agent cannot swap the file between
    /// the check and the name.
    fn name_by_fd(&self) -> Option<String> {
        use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
        if self.file == InodeKey::default() {
            return None;
        }
        let open = |link: String| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
                .open(link)
        };
        // The thread's fd table first (a task cloned without CLONE_FILES has its own), then
        // the process's, should the thread have ended since.
        let held = open(format!(
            "/proc/{}/task/{}/fd/{}",
            self.pid, self.tid, self.fd
        ))
        .or_else(|_| open(format!("/proc/{}/fd/{}", self.pid, self.fd)))
        .ok()?;
        let meta = held.metadata().ok()?;
        if crate::tamper::kernel_inode_key(&meta) != self.file {
            return None;
        }
        let name = std::fs::read_link(format!("/proc/self/fd/{}", held.as_raw_fd())).ok()?;
        Some(name.to_string_lossy().into_owned())
    }

    /// `file_denied` (pid, tid, comm, path, access, enforced: refused by the kernel, or only
    /// detected after the open).
    /// `path_from` ("fd" or "unknown") only where the path is not the one passed.
    pub fn audit_line(&self, path: &str, from: PathFrom) -> KernelLine {
        let mut fields = json!({
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "path": path,
            "access": self.access(),
            "enforced": self.refused,
        });
        let from = match from {
            PathFrom::Passed => None,
            PathFrom::Fd => Some("fd"),
            PathFrom::Unknown => Some("unknown"),
        };
        if let (Some(from), Some(map)) = (from, fields.as_object_mut()) {
            map.insert("path_from".into(), from.into());
        }
        KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: "file_denied",
            pid: self.pid,
            fields,
        }
    }
}

/// `.` and `..` removed without touching the filesystem (`..` of `/` is `/`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// How the file guard, exec allow-list and packet-socket guard act on this host.
pub fn modes(lsm: bool) -> serde_json::Value {
    if lsm {
        json!({
            "files": "enforced (BPF LSM: EACCES; hard links refused)",
            "exec_allow": "enforced (BPF LSM: EPERM)",
            "packet_sockets": "enforced (BPF LSM: EPERM)",
            "tamper": "enforced (BPF LSM: an agent's bpf() calls, its signals to the daemon and its writes, unlinks and renames of the daemon's files are refused)",
        })
    } else {
        json!({
            "files": "detected (no BPF LSM: open tracepoints, then the breaker action; hard links not judged)",
            "exec_allow": "killed (no BPF LSM: SIGKILL at exec)",
            "packet_sockets": "killed (no BPF LSM: SIGKILL at socket())",
            "tamper": "file modes and uids only (no BPF LSM: an agent with user = \"root\" can open the pins and signal the daemon)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trie_keys_cover_the_prefix_and_the_directory() {
        let r = FileRule::parse("/tmp/").unwrap();
        let k = keys(&r, 7);
        assert_eq!(k.len(), 2);
        assert_eq!(k[0].prefix_len(), 32 + 8 * 5);
        assert_eq!(&k[0].data().path[..5], b"/tmp/");
        assert_eq!(k[1].prefix_len(), 32 + 8 * 5, "`/tmp` and its NUL");
        assert_eq!(&k[1].data().path[..5], b"/tmp\0");
        assert!(k.iter().all(|k| k.data().agent == 7));
        assert_eq!(keys(&FileRule::parse("/").unwrap(), 1).len(), 1);
        const { assert!(agentwatch_common::FILE_KEY_PATH > agentwatch_common::FILE_RULE_MAX + 1) };
    }

    #[test]
    fn resolves_relative_paths_and_dot_dot() {
        assert_eq!(
            normalize(Path::new("/a/b/../../../etc/./x")),
            Path::new("/etc/x")
        );
        let me = std::process::id();
        let r = FileRecord {
            refused: false,
            agent_id: 1,
            pid: me,
            tid: me,
            comm: String::new(),
            write: false,
            read: true,
            link: false,
            path: "no/such/dir/../file".into(),
            fd: 1_000_000,
            dirfd: AT_FDCWD,
            file: InodeKey::default(),
            ts_ns: 0,
        };
        let cwd = std::env::current_dir().unwrap();
        let (path, from) = r.resolve();
        assert_eq!(Path::new(&path), cwd.join("no/such/file"));
        assert_eq!(from, PathFrom::Passed);
        // Relative to a directory fd that is closed by now: no base is guessed (a guess of
        // `/` once named `openat(fd_of_/usr, "lib")` as `/lib`).
        let gone = FileRecord {
            path: "lib".into(),
            dirfd: 999_999,
            ..r
        };
        assert_eq!(gone.resolve(), (String::new(), PathFrom::Unknown));
    }

    #[test]
    fn allowed_directories_are_keyed_by_identity_and_the_stricter_rule_wins() {
        let dir = std::env::temp_dir().join(format!("aw-files-dirs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink(dir.join("sub"), dir.join("link")).unwrap();
        std::fs::write(dir.join("file"), "x").unwrap();
        let rule = |p: &Path, ro: bool| {
            FileRule::parse(&format!("{}{}", p.display(), if ro { ":ro" } else { "" })).unwrap()
        };
        let key = |p: &Path| {
            let id = crate::tamper::kernel_inode_key(&std::fs::metadata(p).unwrap());
            FileDirKey {
                agent: 3,
                dev: id.dev,
                ino: id.ino,
            }
        };
        let keys = dir_keys(
            3,
            &[
                rule(&dir.join("sub/"), false),
                // The same directory through a symlink, read-only: the stricter stays.
                rule(&dir.join("link/"), true),
                // Not a directory, absent, or not a `/dir/` prefix: left to the daemon.
                rule(&dir.join("file/"), false),
                rule(&dir.join("absent/"), false),
                rule(&dir.join("su"), false),
                FileRule::parse(&format!("{}/", dir.display())).unwrap(),
            ],
        );
        let want = std::collections::BTreeMap::from([
            (key(&dir.join("sub")), FILE_RULE_READ_ONLY),
            (key(&dir), 0),
        ]);
        assert_eq!(keys, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_the_kernel_could_not_read_is_named_by_its_fd_only_while_it_holds_that_file() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("aw-files-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let held = std::fs::File::open(&a).unwrap();
        let me = std::process::id();
        // The thread id of this test's thread: its fd table is the process's.
        let tid = unsafe { libc::gettid() } as u32;
        let record = |file: InodeKey| FileRecord {
            refused: false,
            agent_id: 1,
            pid: me,
            tid,
            comm: String::new(),
            write: false,
            read: true,
            link: false,
            path: String::new(),
            fd: held.as_raw_fd(),
            dirfd: AT_FDCWD,
            file,
            ts_ns: 0,
        };
        let key = |p: &Path| crate::tamper::kernel_inode_key(&std::fs::metadata(p).unwrap());
        assert_eq!(
            record(key(&a)).resolve(),
            (
                a.canonicalize().unwrap().display().to_string(),
                PathFrom::Fd
            )
        );
        // The fd now holds another file than the kernel saw opened (closed and reused, or
        // swapped with dup2): not believed.
        assert_eq!(
            record(key(&b)).resolve(),
            (String::new(), PathFrom::Unknown)
        );
        // No identity from the kernel (its BTF did not say): not believed either.
        assert_eq!(
            record(InodeKey::default()).resolve(),
            (String::new(), PathFrom::Unknown)
        );
        // Unknown is outside every list, `/` included.
        let root = [FileRule::parse("/").unwrap()];
        assert!(!admitted(&root, "", false));
        // A string that reads fine but names another file than the kernel opened (changed
        // by another thread after the kernel read it, or a stale pointer): the fd decides.
        let passed = |path: &Path, file: InodeKey| FileRecord {
            path: path.display().to_string(),
            ..record(file)
        };
        let canon_a = a.canonicalize().unwrap().display().to_string();
        assert_eq!(
            passed(&b, key(&a)).resolve(),
            (canon_a.clone(), PathFrom::Fd)
        );
        assert_eq!(passed(&a, key(&a)).resolve(), (canon_a, PathFrom::Passed));
        // ... and with the fd no longer holding it either: unknown, never the string.
        assert_eq!(
            FileRecord {
                fd: 1_000_000,
                ..passed(&b, key(&a))
            }
            .resolve(),
            (String::new(), PathFrom::Unknown)
        );
        drop(held);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
