//! Who is at the other end of a control connection, judged from the kernel: the process, its
//! cgroup and its name, without a race against pid reuse.
//!
//! The guarded never steers the guard: the daemon refuses every request from a process inside
//! an agent's cgroup, whatever its uid. That judgement must be about the process that
//! connected, not about whatever process has its pid by the time the daemon looks:
//!
//! - **Linux 6.5 and later**: `SO_PEERPIDFD` gives a pidfd of the process that connected,
//!   taken by the kernel at connect time. Its pid is read from the pidfd's fdinfo, the cgroup
//!   and name from /proc, and then the pidfd is polled: a pid is not reused while its process
//!   lives (nor while it is an unreaped zombie), so a process still alive after the reads is
//!   the one the reads were about.
//! - **Earlier kernels (6.1)**: `SO_PEERCRED`'s pid, opened as a pidfd (`pidfd_open`, 5.3),
//!   and the process's start time compared with the moment the daemon accepted the
//!   connection: a process that started after the accept cannot be the one that connected.
//!   The same poll then proves the reads were about that process. What is left is a process
//!   that connected and exited before the accept, its pid taken by a process started in that
//!   instant (a few microseconds of an idle daemon, a full pid space to cycle through):
//!   possible in principle only there.
//!
//! A peer that cannot be judged (it exited, or it lives in a pid namespace the daemon cannot
//! see) is refused: never let in by default.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

/// A control socket peer as the kernel knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Its cgroup v2 path as the daemon sees it, relative to the cgroup2 mount (`/` is root).
    pub cgroup: String,
    pub comm: String,
    /// How the process was pinned down: `SO_PEERPIDFD` or `SO_PEERCRED+start time`.
    pub method: &'static str,
}

impl Peer {
    /// Its cgroup as an absolute path below `mount`.
    pub fn cgroup_path(&self, mount: &Path) -> PathBuf {
        mount.join(self.cgroup.trim_start_matches('/'))
    }
}

/// Why a peer could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading the peer's credentials: {0}")]
    Cred(io::Error),
    #[error("the peer's process is not visible in this pid namespace")]
    Invisible,
    #[error("the peer's process exited before it could be judged")]
    Exited,
    #[error("the process with the peer's pid started after the connection was accepted")]
    Reused,
    #[error("reading /proc/{pid}/{what}: {source}")]
    Proc {
        pid: u32,
        what: &'static str,
        source: io::Error,
    },
}

/// `SO_PEERPIDFD` (Linux 6.5; not in every libc yet).
const SO_PEERPIDFD: libc::c_int = 77;

/// Identifies the peer of the connected Unix socket `fd`. `accepted_ticks` is the boot-time
/// clock, in clock ticks, read just after the accept ([`boot_ticks`]).
pub fn identify(fd: BorrowedFd<'_>, accepted_ticks: u64) -> Result<Peer, PeerError> {
    let cred = peer_cred(fd.as_raw_fd()).map_err(PeerError::Cred)?;
    let (pidfd, pid, method) = match peer_pidfd(fd.as_raw_fd()) {
        Ok(pidfd) => {
            let pid = pidfd_pid(&pidfd)?;
            (pidfd, pid, "SO_PEERPIDFD")
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            let pid = u32::try_from(cred.pid).map_err(|_| PeerError::Invisible)?;
            if pid == 0 {
                return Err(PeerError::Invisible);
            }
            let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
                Some(libc::ESRCH) => PeerError::Exited,
                _ => PeerError::Cred(e),
            })?;
            if start_ticks(pid)? > accepted_ticks {
                return Err(PeerError::Reused);
            }
            (pidfd, pid, "SO_PEERCRED+start time")
        }
        Err(e) => return Err(PeerError::Cred(e)),
    };
    let cgroup = read_proc(pid, "cgroup")?;
    let cgroup = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_owned();
    let comm = read_proc(pid, "comm")?.trim_end().to_owned();
    if exited(&pidfd) {
        return Err(PeerError::Exited);
    }
    Ok(Peer {
        pid,
        uid: cred.uid,
        gid: cred.gid,
        cgroup,
        comm,
        method,
    })
}

/// The boot-time clock (CLOCK_BOOTTIME, which /proc/PID/stat's start time counts) in clock
/// ticks, rounded up so that a process started in the same tick counts as before it.
pub fn boot_ticks() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    // SAFETY: sysconf has no memory preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let ns = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    ns.saturating_mul(hz).div_ceil(1_000_000_000)
}

fn peer_cred(fd: RawFd) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

fn peer_pidfd(fd: RawFd) -> io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `pidfd`.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if pidfd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel just installed this descriptor for us.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked before it is owned.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: pidfd_open just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pid a pidfd refers to, from its fdinfo: -1 once the process exited, 0 when it lives in
/// a pid namespace this process cannot see.
fn pidfd_pid(pidfd: &OwnedFd) -> Result<u32, PeerError> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(PeerError::Cred)?;
    let pid: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| PeerError::Cred(io::Error::other("no Pid: in the pidfd's fdinfo")))?;
    match pid {
        -1 => Err(PeerError::Exited),
        0 => Err(PeerError::Invisible),
        p => u32::try_from(p).map_err(|_| PeerError::Invisible),
    }
}

/// Has the process of `pidfd` exited? A pidfd polls readable once it has.
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one live descriptor, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

fn read_proc(pid: u32, what: &'static str) -> Result<String, PeerError> {
    std::fs::read_to_string(format!("/proc/{pid}/{what}")).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            PeerError::Exited
        } else {
            PeerError::Proc { pid, what, source }
        }
    })
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
fn start_ticks(pid: u32) -> Result<u64, PeerError> {
    let stat = read_proc(pid, "stat")?;
    // comm (field 2) may hold spaces and parentheses: count from the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| PeerError::Proc {
            pid,
            what: "stat",
            source: io::Error::other("no start time"),
        })
}

/// Is `cgroup` (absolute) `guarded` or below it?
pub fn inside(cgroup: &Path, guarded: &Path) -> bool {
    cgroup.starts_with(guarded)
}

/// For tests and tools: [`identify`] on a borrowed std socket.
pub fn identify_stream(s: &std::os::unix::net::UnixStream) -> Result<Peer, PeerError> {
    use std::os::fd::AsFd as _;
    identify(s.as_fd(), boot_ticks())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_pair_names_this_process_and_its_cgroup() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = identify_stream(&a).unwrap();
        assert_eq!(p.pid, std::process::id());
        // SAFETY: getuid has no preconditions.
        assert_eq!(p.uid, unsafe { libc::getuid() });
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(own.contains(&format!("0::{}", p.cgroup)), "{own} vs {p:?}");
        assert_eq!(
            p.comm,
            std::fs::read_to_string("/proc/self/comm")
                .unwrap()
                .trim_end()
        );
    }

    #[test]
    fn a_process_that_started_after_the_accept_is_not_the_peer() {
        let (a, _b) = UnixStream::pair().unwrap();
        // An accept "before boot": every process started after it.
        use std::os::fd::AsFd as _;
        if peer_pidfd(a.as_raw_fd()).is_ok() {
            // SO_PEERPIDFD: the start time is not needed, and not looked at.
            assert!(identify(a.as_fd(), 0).is_ok());
        } else {
            assert!(matches!(identify(a.as_fd(), 0), Err(PeerError::Reused)));
        }
    }

    #[test]
    fn start_time_is_read_past_a_comm_with_parentheses() {
        let me = start_ticks(std::process::id()).unwrap();
        assert!(me <= boot_ticks());
        assert!(me > 0);
    }

    #[test]
    fn inside_is_by_path_components() {
        assert!(inside(Path::new("/cg/aw/a"), Path::new("/cg/aw/a")));
        assert!(inside(Path::new("/cg/aw/a/sub"), Path::new("/cg/aw/a")));
        assert!(!inside(Path::new("/cg/aw/ab"), Path::new("/cg/aw/a")));
        assert!(!inside(Path::new("/cg/aw"), Path::new("/cg/aw/a")));
    }
}
