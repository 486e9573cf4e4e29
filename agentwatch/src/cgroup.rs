//! cgroup v2: finding the mount, creating, adopting, moving processes, freezing and killing.

use std::{
    fs,
    io::{self, ErrorKind},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

/// Errors of cgroup operations, each naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    #[error("cgroup path `{0}` must be relative to the cgroup2 mount, without `..`")]
    BadPath(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still has processes after {waited:?}")]
    NotEmpty { path: PathBuf, waited: Duration },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo. On hybrid hosts it is not
/// /sys/fs/cgroup (it is /sys/fs/cgroup/unified on the project's machines).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_cgroup2_mount(&info).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup rw,... shared:1 - cgroup2 cgroup2 rw": the fields after
        // " - " are fs type, source, options; field 5 (index 4) is the mount point.
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace()
            .nth(4)
            .map(|p| PathBuf::from(unescape(p)))
    })
}

/// Whether the cgroup2 mount carries `nsdelegate` (systemd mounts it so): then a process in a
/// cgroup namespace of its own (every launched agent) cannot move any process across the
/// namespace's root, the daemon included. False where it cannot be read.
pub fn nsdelegate() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| parse_nsdelegate(&info))
}

fn parse_nsdelegate(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        // The super block's options are the last field after " - cgroup2 SOURCE ".
        line.split_once(" - ").is_some_and(|(_, right)| {
            let mut f = right.split_whitespace();
            f.next() == Some("cgroup2")
                && f.nth(1)
                    .is_some_and(|opts| opts.split(',').any(|o| o == "nsdelegate"))
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1..i + 4)
                .is_some_and(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `rel` is a relative path inside the cgroup tree (no `..`, not absolute).
pub fn check_relative(rel: &str) -> Result<(), CgroupError> {
    let p = Path::new(rel);
    let ok = !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadPath(rel.to_owned()))
    }
}

/// A cgroup directory. Dropping it does nothing: removal is explicit ([`Cgroup::remove`]), since
/// a daemon must not tear down an agent's cgroup by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `path` (absolute), which must exist.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CgroupError> {
        let path = path.into();
        let procs = path.join("cgroup.procs");
        fs::metadata(&procs).map_err(io_err("opening cgroup", &path))?;
        Ok(Self { path })
    }

    /// Creates `path` (and missing parents); returns the cgroup and whether it was created now.
    pub fn create(path: impl Into<PathBuf>) -> Result<(Self, bool), CgroupError> {
        let path = path.into();
        match fs::create_dir(&path) {
            Ok(()) => Ok((Self { path }, true)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok((Self::open(path)?, false)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io_err("creating cgroup", parent))?;
                }
                fs::create_dir(&path).map_err(io_err("creating cgroup", &path))?;
                Ok((Self { path }, true))
            }
            Err(e) => Err(io_err("creating cgroup", &path)(e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the directory's inode.
    pub fn id(&self) -> Result<u64, CgroupError> {
        fs::metadata(&self.path)
            .map(|m| m.ino())
            .map_err(io_err("reading cgroup id of", &self.path))
    }

    /// An open directory handle, for attaching programs.
    pub fn dir(&self) -> Result<fs::File, CgroupError> {
        fs::File::open(&self.path).map_err(io_err("opening cgroup", &self.path))
    }

    /// Moves process `pid` (0: the caller) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(io_err("moving a process into", &procs))
    }

    /// Processes directly in this cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(io_err("reading", &procs))?;
        Ok(parse_pids(&text))
    }

    /// Processes in this cgroup and every cgroup below it.
    pub fn all_pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = self.pids()?;
        if is_leaf(fs::metadata(&self.path)) {
            return Ok(pids);
        }
        let entries = fs::read_dir(&self.path).map_err(io_err("listing", &self.path))?;
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                match (Self { path: entry.path() }).all_pids() {
                    Ok(more) => pids.extend(more),
                    // A child cgroup removed while we walk is simply gone.
                    Err(CgroupError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(pids)
    }

    /// Waits until cgroup.events reports `frozen` equal to `frozen`.
    pub fn wait_frozen(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let op = if frozen { "freezing" } else { "thawing" };
        if self.wait_event("frozen", u64::from(frozen), timeout)? {
            return Ok(());
        }
        Err(CgroupError::Io {
            op,
            path: self.path.clone(),
            source: io::Error::new(ErrorKind::TimedOut, format!("not done after {timeout:?}")),
        })
    }

    /// Waits until cgroup.events has `key` equal to `want`; false when `timeout` passed first.
    /// The kernel wakes pollers of cgroup.events (POLLPRI) whenever a value in it changes, so
    /// this returns as soon as the change happens, and the daemon never sleeps on a guess
    /// (it waits here under its state lock: a kill holds the daemon no longer than the kernel
    /// takes). A change between the read and the poll is not missed: a read marks what the
    /// opener has seen, and poll returns at once when the file changed since.
    fn wait_event(&self, key: &str, want: u64, timeout: Duration) -> Result<bool, CgroupError> {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::FileExt as _;
        let path = self.path.join("cgroup.events");
        let file = fs::File::open(&path).map_err(io_err("opening", &path))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        loop {
            let n = file
                .read_at(&mut buf, 0)
                .map_err(io_err("reading", &path))?;
            let text = String::from_utf8_lossy(&buf[..n]);
            if events_value(&text, key) == Some(want) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = [libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            }];
            // At least 1 ms: a sub-millisecond remainder must not become a busy poll.
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd for an fd `file` keeps open for the call.
            if unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(io_err("polling", &path)(e));
                }
            }
        }
    }

    /// This cgroup's cgroup.events, held open: see [`Events`].
    pub fn events(&self) -> Result<Events, CgroupError> {
        let path = self.path.join("cgroup.events");
        let file = fs::File::open(&path).map_err(io_err("opening", &path))?;
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&self.path)
            .map_err(io_err("opening cgroup", &self.path))?;
        let procs_path = self.path.join("cgroup.procs");
        let procs = fs::File::open(&procs_path).map_err(io_err("opening", &procs_path))?;
        Ok(Events {
            file,
            dir,
            procs,
            path,
        })
    }

    /// Does this cgroup or any cgroup below it hold a process? (`populated` in cgroup.events.)
    pub fn populated(&self) -> Result<bool, CgroupError> {
        Ok(self.event("populated")? == Some(1))
    }

    /// Is the cgroup frozen (`frozen` in cgroup.events)?
    pub fn frozen(&self) -> Result<bool, CgroupError> {
        Ok(self.event("frozen")? == Some(1))
    }

    fn event(&self, key: &str) -> Result<Option<u64>, CgroupError> {
        let events = self.path.join("cgroup.events");
        let text = fs::read_to_string(&events).map_err(io_err("reading", &events))?;
        Ok(events_value(&text, key))
    }

    /// Freezes (true) or thaws (false) every process in the subtree.
    pub fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let f = self.path.join("cgroup.freeze");
        fs::write(&f, if frozen { "1" } else { "0" }).map_err(io_err("writing", &f))
    }

    /// SIGKILLs every process in the subtree at once (cgroup.kill, Linux 5.14+).
    pub fn kill(&self) -> Result<(), CgroupError> {
        let f = self.path.join("cgroup.kill");
        fs::write(&f, "1").map_err(io_err("writing", &f))
    }

    /// Waits until no process is left in the subtree (`populated 0` in cgroup.events).
    pub fn wait_empty(&self, timeout: Duration) -> Result<(), CgroupError> {
        if self.wait_event("populated", 0, timeout)? {
            return Ok(());
        }
        Err(CgroupError::NotEmpty {
            path: self.path.clone(),
            waited: timeout,
        })
    }

    /// Removes the cgroup and every cgroup below it; they must hold no processes.
    pub fn remove(&self) -> Result<(), CgroupError> {
        remove_tree(&self.path)
    }
}

/// A cgroup's cgroup.events (with its directory and cgroup.procs), held open. One pread(2) of
/// it says whether that cgroup still exists and whether any process is in it or below it,
/// with no path walk: what the daemon asks of every agent every second. It answers for the
/// cgroup it was opened in, not for its path: a cgroup removed and made again under the same
/// name (a service restarted) is another cgroup, and this one is gone.
#[derive(Debug)]
pub struct Events {
    file: fs::File,
    /// The cgroup's directory (O_PATH): its link count without a path walk.
    dir: fs::File,
    /// Its cgroup.procs. (Read to the end, the kernel's walk of its tasks holds nothing.)
    procs: fs::File,
    path: PathBuf,
}

/// What [`Events::presence`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The cgroup was removed (its path may hold another one by now).
    Gone,
    /// No process in the cgroup or below it.
    Empty,
    /// Some process in the cgroup or below it.
    Populated,
}

impl Events {
    /// Whether the cgroup may have cgroups below it ([`is_leaf`] of the held directory's
    /// fstat(2), so no path walk). True where it cannot be read.
    pub fn has_nested(&self) -> bool {
        !is_leaf(self.dir.metadata())
    }

    /// Processes directly in the cgroup (its cgroup.procs, held open: a read from offset 0
    /// lists them anew, with no open, path walk or close).
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        use std::os::unix::fs::FileExt as _;
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match self.procs.read_at(&mut chunk, text.len() as u64) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io_err("reading", &self.path.with_file_name("cgroup.procs"))(e));
                }
            }
        }
        Ok(parse_pids(&String::from_utf8_lossy(&text)))
    }

    /// Reads the file: whether the cgroup is still there and whether a process is in it.
    pub fn presence(&self) -> Result<Presence, CgroupError> {
        use std::os::unix::fs::FileExt as _;
        let mut buf = [0u8; 256];
        match self.file.read_at(&mut buf, 0) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                Ok(match events_value(&text, "populated") {
                    Some(0) => Presence::Empty,
                    _ => Presence::Populated,
                })
            }
            // kernfs answers a file of a removed node with ENODEV.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) => {
                Ok(Presence::Gone)
            }
            Err(e) => Err(io_err("reading", &self.path)(e)),
        }
    }
}

/// Which of `events` may have changed since each was last read, in one poll(2) per 1,024
/// files and no read: kernfs marks a file ready (POLLPRI) once its value changed after the
/// opener's last read, and ready with POLLERR once its cgroup is removed. (A poll of every
/// file, not epoll: epoll is woken by the change but not by the removal.) Where the poll
/// fails, every file counts as changed.
pub fn changed(events: &[&Events]) -> Vec<bool> {
    use std::os::fd::AsRawFd as _;
    let mut out = Vec::with_capacity(events.len());
    // At most RLIMIT_NOFILE descriptors per call, which is at least 1,024.
    for chunk in events.chunks(1024) {
        let mut fds: Vec<libc::pollfd> = chunk
            .iter()
            .map(|e| libc::pollfd {
                fd: e.file.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            })
            .collect();
        let n = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `fds` is a valid array of `n` pollfds for fds `chunk` keeps open; a zero
        // timeout only asks, never waits.
        let polled = unsafe { libc::poll(fds.as_mut_ptr(), n, 0) };
        if polled < 0 {
            out.extend(std::iter::repeat_n(true, fds.len()));
        } else {
            out.extend(fds.iter().map(|f| f.revents != 0));
        }
    }
    out
}

/// The pids of a cgroup.procs text, one per line.
fn parse_pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Whether a cgroup directory (its metadata) has no cgroup below it: a cgroup directory's
/// link count is 2 plus its subdirectories (kernfs keeps it), so one stat answers instead of
/// listing its dozens of control files. False where it cannot be read, so a walk is never
/// skipped on a guess.
pub(crate) fn is_leaf(meta: io::Result<fs::Metadata>) -> bool {
    meta.is_ok_and(|m| m.nlink() == 2)
}

/// The value of `key` in cgroup.events' text (`populated 1\nfrozen 0\n`).
fn events_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", path)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", path))?;
        if entry.file_type().map_err(io_err("listing", path))?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // A cgroup whose last process just exited can report EBUSY for a moment.
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && start.elapsed() < Duration::from_secs(2) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_err("removing cgroup", path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
32 25 0:27 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
41 32 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 32 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
        let escaped = "41 32 0:38 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn nsdelegate_is_read_from_the_cgroup2_super_options() {
        let hybrid =
            "41 32 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert!(!parse_nsdelegate(hybrid));
        let systemd = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw,nsdelegate
35 25 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert!(parse_nsdelegate(systemd));
        // Only cgroup2's options count.
        assert!(!parse_nsdelegate(
            "25 30 0:23 / /sys rw - sysfs sysfs rw,nsdelegate\n"
        ));
    }

    #[test]
    fn relative_paths_only() {
        assert!(check_relative("agentwatch/mailer").is_ok());
        assert!(check_relative("system.slice/mailer.service").is_ok());
        for bad in ["", "/abs", "a/../b", "..", "./a"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }
}
