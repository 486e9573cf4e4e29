//! Whom `agentwatch launch` runs an agent as: never root unless the config says so.
//!
//! An agent without `user` runs as a uid of its own from `daemon.agent_uids`, with the group of
//! the same number and no supplementary group. Each agent's uid is distinct from every other
//! agent's, so agents cannot signal, ptrace or write one another, and none of them can write
//! what root owns: the daemon's config, trail, socket, pins and cgroup files.
//!
//! The uid is stable: it is derived from the agent's name (SHA-256 into the range), not from
//! the order of the config, so reloads, restarts and other agents coming and going leave it as
//! it is. Two names that hash to the same uid are told apart by probing upwards, in the order
//! of their names: only then can an agent's uid depend on another agent (the one whose name
//! sorts first keeps the hashed uid). With the default range of 2^24 uids that takes a few
//! thousand agents to become likely.

use std::{
    collections::BTreeSet,
    fmt, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    str::FromStr,
};

use sha2::{Digest as _, Sha256};

/// An inclusive range of uids, `LO-HI` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub lo: u32,
    pub hi: u32,
}

impl UidRange {
    /// 1879048192-1895825407 (0x70000000-0x70ffffff): see the config's default.
    pub const DEFAULT: Self = Self {
        lo: 0x7000_0000,
        hi: 0x70ff_ffff,
    };

    /// How many uids the range holds.
    pub fn len(self) -> u64 {
        u64::from(self.hi - self.lo) + 1
    }

    /// Never: a range holds at least its one uid (`LO-LO`).
    pub fn is_empty(self) -> bool {
        false
    }

    pub fn contains(self, uid: u32) -> bool {
        (self.lo..=self.hi).contains(&uid)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("agent_uids `{s}`: {why} (expected LO-HI, e.g. \"1879048192-1895825407\")")
        };
        let (lo, hi) = s.split_once('-').ok_or_else(|| bad("no `-`"))?;
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| bad(&format!("`{}` is not a uid", t.trim())))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(bad("LO is above HI"));
        }
        // Below 1000 are the system's own users; 65534 is nobody, shared by every daemon that
        // drops to it; 2^32-1 is "no uid" to the kernel, and above 2^31 tools that keep uids in
        // a signed int break.
        if lo < 1000 {
            return Err(bad("uids below 1000 belong to the system"));
        }
        if (lo..=hi).contains(&65534) {
            return Err(bad("it holds 65534 (nobody), which other services share"));
        }
        if hi >= 1 << 31 {
            return Err(bad("uids of 2^31 and above are not supported"));
        }
        Ok(Self { lo, hi })
    }
}

/// Whom an agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// `user = "root"`: uid 0, said loudly by `check`, `status` and /metrics.
    Root,
    /// `user = "NAME"`: a user of the system's user database.
    User(String),
    /// No `user`: a uid of its own (its group is the same number).
    Own { uid: u32 },
}

impl RunAs {
    pub fn is_root(&self) -> bool {
        matches!(self, Self::Root)
    }

    /// For status: `root`, `user:NAME` or `uid:N`.
    pub fn describe(&self) -> String {
        match self {
            Self::Root => "root".to_owned(),
            Self::User(u) => format!("user:{u}"),
            Self::Own { uid } => format!("uid:{uid}"),
        }
    }
}

/// The uid each of `names` (agents without `user`) gets from `range`; None when the range is
/// too small for them all. Pure: the same names and range give the same uids on every host.
pub fn assign<'a>(
    names: impl IntoIterator<Item = &'a str>,
    range: UidRange,
) -> Option<Vec<(&'a str, u32)>> {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    if names.len() as u64 > range.len() {
        return None;
    }
    let mut taken = BTreeSet::new();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let digest = Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let mut offset = u64::from_be_bytes(first) % range.len();
        // Terminates: fewer names than uids, so a free one is always ahead (wrapping).
        loop {
            let uid = range.lo + u32::try_from(offset).ok()?;
            if taken.insert(uid) {
                out.push((name, uid));
                break;
            }
            offset = (offset + 1) % range.len();
        }
    }
    Some(out)
}

/// The name of the user database's entry for `uid`, if it has one.
pub fn user_of(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain old data; getpwuid_r fills it with pointers into buf.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    loop {
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: a passwd struct, a buffer of the length given, a result pointer.
        let ret = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match ret {
            0 if result.is_null() => return None,
            0 => break,
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            _ => return None,
        }
    }
    // SAFETY: getpwuid_r succeeded: pw_name is a C string inside buf, which is still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Makes (or checks) `<homes>/<name>`: a directory owned by `uid`:`uid`, mode 0700. `homes` is
/// made root's, mode 0755, if missing. Safe against an agent that plants a symlink or a file
/// there: the home is opened without following links and changed through that descriptor,
/// and anything at its place that is not a directory is refused.
pub fn make_home(homes: &Path, name: &str, uid: u32) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    if !homes.exists() {
        std::fs::create_dir_all(homes)?;
        // Whatever the daemon's umask (systemd's UMask=0077): each agent must be able to pass
        // through to its own home.
        std::fs::set_permissions(homes, std::fs::Permissions::from_mode(0o755))?;
    }
    let meta = std::fs::symlink_metadata(homes)?;
    if meta.mode() & 0o001 == 0 {
        return Err(io::Error::other(format!(
            "{} (daemon.agent_homes) is mode {:04o}: agents cannot reach their homes through \
             it; make it 0755",
            homes.display(),
            meta.mode() & 0o7777
        )));
    }
    // The folder of the homes must be root's and writable by nobody else: the agent could
    // otherwise swap its home for a link to something of root's between the checks below.
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} must be a directory of root's that only root can write (daemon.agent_homes)",
            homes.display()
        )));
    }
    let dir = open(homes, libc::O_DIRECTORY | libc::O_PATH, None)?;
    let cname = std::ffi::CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: mkdirat with a live directory fd and a C string.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), cname.as_ptr(), 0o700) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    let home = open(
        Path::new(name),
        libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY,
        Some(&dir),
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => io::Error::new(
            io::ErrorKind::NotADirectory,
            format!(
                "{} is not a directory (a link or a file is in its place): not used",
                homes.join(name).display()
            ),
        ),
        _ => e,
    })?;
    let gid = uid;
    // SAFETY: fchown/fchmod on a descriptor this function owns.
    if unsafe { libc::fchown(home.as_raw_fd(), uid, gid) } != 0
        || unsafe { libc::fchmod(home.as_raw_fd(), 0o700) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(homes.join(name))
}

fn open(path: &Path, flags: libc::c_int, at: Option<&OwnedFd>) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let dirfd = at.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: openat with a C string; the result is checked before it is owned.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor openat just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_with_clear_errors() {
        assert_eq!(
            "1879048192-1895825407".parse::<UidRange>(),
            Ok(UidRange::DEFAULT)
        );
        assert_eq!(UidRange::DEFAULT.len(), 1 << 24);
        assert_eq!(
            "100000-100009".parse::<UidRange>().map(UidRange::len),
            Ok(10)
        );
        for (bad, why) in [
            ("100000", "no `-`"),
            ("x-100", "`x` is not a uid"),
            ("200000-100000", "LO is above HI"),
            ("0-100000", "uids below 1000 belong to the system"),
            ("60000-70000", "it holds 65534 (nobody)"),
            ("100000-2147483648", "uids of 2^31 and above"),
        ] {
            let e = bad.parse::<UidRange>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn uids_are_stable_distinct_and_independent_of_order() {
        let r = UidRange::DEFAULT;
        let a = assign(["mailer", "coder", "scout"], r).unwrap();
        let b = assign(["scout", "mailer", "coder", "mailer"], r).unwrap();
        assert_eq!(a, b);
        let only = assign(["mailer"], r).unwrap();
        assert_eq!(
            only[0],
            *a.iter().find(|(n, _)| *n == "mailer").unwrap(),
            "another agent does not move mailer's uid"
        );
        let uids: BTreeSet<u32> = a.iter().map(|(_, u)| *u).collect();
        assert_eq!(uids.len(), 3);
        assert!(uids.iter().all(|u| r.contains(*u)));
    }

    #[test]
    fn collisions_probe_upwards_and_a_full_range_is_refused() {
        // Ten uids for ten names: each gets one, all distinct, whatever they hash to.
        let r: UidRange = "100000-100009".parse().unwrap();
        let names: Vec<String> = (0..10).map(|i| format!("agent-{i}")).collect();
        let got = assign(names.iter().map(String::as_str), r).unwrap();
        let uids: BTreeSet<u32> = got.iter().map(|(_, u)| *u).collect();
        assert_eq!(uids, (100000..=100009).collect());
        let eleven: Vec<String> = (0..11).map(|i| format!("agent-{i}")).collect();
        assert_eq!(assign(eleven.iter().map(String::as_str), r), None);
    }

    #[test]
    fn homes_are_private_and_a_planted_link_is_refused() {
        let root = std::env::temp_dir().join(format!("agentwatch-homes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let homes = root.join("homes");
        if unsafe { libc::geteuid() } != 0 {
            // chown needs root; the rest of the behaviour is covered by the privileged tests.
            return;
        }
        let home = make_home(&homes, "a", 1_879_048_300).unwrap();
        let m = std::fs::metadata(&home).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (1_879_048_300, 1_879_048_300, 0o700)
        );
        // Again: still the same, nothing refused.
        make_home(&homes, "a", 1_879_048_300).unwrap();
        std::os::unix::fs::symlink("/etc", homes.join("b")).unwrap();
        let e = make_home(&homes, "b", 1_879_048_301).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory, "{e}");
        assert!(
            e.to_string()
                .ends_with("b is not a directory (a link or a file is in its place): not used"),
            "{e}"
        );
        assert_eq!(std::fs::metadata("/etc").unwrap().uid(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
