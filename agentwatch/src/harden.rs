//! What `agentwatch launch` does to itself after joining the agent's cgroup and before it execs
//! the agent's command, so that the agent cannot switch agentwatch off or walk around it.
//!
//! The steps, in this order (each must succeed, or the launch is aborted: the command never
//! runs less hardened than promised):
//!
//! 1. **A new cgroup namespace** (`unshare(CLONE_NEWCGROUP)`), entered after joining the agent's
//!    cgroup, so the agent sees that cgroup as `/`. On a cgroup2 mount with `nsdelegate` (as
//!    systemd mounts it) the kernel then refuses to move its processes to a cgroup outside
//!    (ENOENT). Needs CAP_SYS_ADMIN, so it comes first.
//! 2. **The bounding set** loses the [`DANGEROUS`] capabilities (PR_CAPBSET_DROP). This needs
//!    CAP_SETPCAP, so it is done while still privileged, before the user switch: afterwards no
//!    exec (of a setuid-root or file-capability binary, or as root) can bring them back.
//! 3. **The user**: the agent's `user`, or without one a uid of its own ([`crate::uids`]; its
//!    group has the same number and it has no supplementary group); root only for
//!    `user = "root"`. Its supplementary groups (initgroups semantics:
//!    every group of the system user database that lists it, plus its primary group), then its
//!    primary gid, then its uid, each for the real, effective and saved id. Groups before gid
//!    before uid, because each step needs CAP_SETGID / CAP_SETUID, which the uid switch takes
//!    away. Switching from root to another uid also empties the effective, permitted and
//!    ambient sets (the kernel's rule), so a non-root agent holds no capability at all.
//! 4. **Effective, inheritable and permitted sets** lose the [`DANGEROUS`] capabilities (in
//!    that order: effective must stay a subset of permitted), and the **ambient set** is
//!    cleared. For an agent that stays root this is what takes the capabilities away now; the
//!    bounding set (step 2) keeps them from coming back at exec.
//! 5. **no_new_privs** (PR_SET_NO_NEW_PRIVS): setuid/setgid bits and file capabilities are
//!    ignored at exec from now on, for the command and everything it starts.
//! 6. **No new user namespace** (a seccomp filter, inherited by everything it starts):
//!    `unshare` and `clone` with CLONE_NEWUSER fail with EPERM, and `clone3` (whose flags a
//!    seccomp filter cannot read) with ENOSYS, which makes glibc and other runtimes fall back
//!    to `clone`. Inside a user namespace of its own an agent would hold every capability
//!    again over its own mounts: it could bind-mount another program over an allowed path, or
//!    another file over one its file guard allows. 32-bit and x32 system calls are refused
//!    (EPERM) whole: their numbers differ, and agents have no use for them.
//!
//! Then every promise is read back from the kernel ([`verify`]) before the caller execs.
//!
//! What this does NOT cover:
//! - An agent with `user = "root"` runs as uid 0. It keeps every other capability
//!   (CAP_DAC_OVERRIDE, CAP_KILL, CAP_SETUID, ...) and root's file access: without BPF LSM it
//!   can kill the daemon, remove pins under bpffs, or read any file. And without `nsdelegate`
//!   on the cgroup2 mount (this project's test machine has none), writing its pid into another
//!   cgroup's cgroup.procs needs only write access to that file, which root has: the cgroup
//!   namespace alone does not stop the move there (the escape guard in [`crate::sockets`] then
//!   kills the process before its write returns). That is why root is never the default.
//! - No new mount, network or pid namespace, no seccomp filter beyond the user-namespace one,
//!   no resource limits, no changed environment beyond HOME/USER/LOGNAME (set by the caller
//!   for a `user`).
//! - Processes that are already running, and adopted agents (a systemd unit's or a pod's
//!   cgroup, not started by `launch`): those get what their unit gives them; see
//!   [`crate::privileges`] to report what they hold, and the README for the unit settings.

use std::{
    ffi::{CStr, CString},
    fs, io,
    path::PathBuf,
};

use caps::{CapSet, Capability};

pub use crate::privileges::DANGEROUS;

/// A hardening step failed; the command must not run.
#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error("user `{0}` does not exist on this host")]
    UnknownUser(String),
    #[error("user `{0}` is not a valid user name")]
    BadUserName(String),
    #[error("looking up user `{user}`: {source}")]
    Lookup { user: String, source: io::Error },
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        source: io::Error,
    },
    #[error("{step}: {message}")]
    Caps { step: String, message: String },
    #[error("hardening did not take: {0}")]
    NotHardened(String),
}

/// A user from the system user database, with its supplementary groups resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// Every group of the user (initgroups semantics), the primary group included.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// Looks `name` up in the system user database (NSS: /etc/passwd, /etc/group, LDAP, ...).
/// `Ok(None)` when there is no such user.
pub fn lookup_user(name: &str) -> Result<Option<User>, HardenError> {
    let cname = CString::new(name).map_err(|_| HardenError::BadUserName(name.to_owned()))?;
    let lookup = |source: io::Error| HardenError::Lookup {
        user: name.to_owned(),
        source,
    };
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain old data; getpwnam_r fills it with pointers into buf.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    loop {
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: valid C string, passwd struct, buffer of the length given, result pointer.
        let ret = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match ret {
            0 if result.is_null() => return Ok(None),
            0 => break,
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // glibc says "not found" with 0, other libcs with one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(lookup(io::Error::from_raw_os_error(e))),
        }
    }
    // SAFETY: getpwnam_r succeeded: pw_dir is a C string inside buf, which is still alive.
    let home = unsafe { CStr::from_ptr(pw.pw_dir) }
        .to_string_lossy()
        .into_owned();
    let (uid, gid) = (pw.pw_uid, pw.pw_gid);
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: groups holds n entries; getgrouplist writes at most n and sets n.
        let ret = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).map_err(|_| lookup(io::Error::other("negative group count")))?;
        if ret >= 0 {
            groups.truncate(n);
            break;
        }
        if n <= groups.len() {
            if groups.len() >= 1 << 16 {
                return Err(lookup(io::Error::other("too many groups")));
            }
            groups.resize(groups.len() * 2, 0);
        } else {
            groups.resize(n, 0);
        }
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(Some(User {
        name: name.to_owned(),
        uid,
        gid,
        groups,
        home: PathBuf::from(home),
    }))
}

/// Hardens the calling process as described in the module docs, then verifies it; the caller
/// execs the agent's command next and must not exec on an error. Call it single-threaded,
/// after joining the agent's cgroup: capabilities are per thread, and the cgroup namespace is
/// rooted where the process is when it is created.
pub fn harden(user: Option<&User>) -> Result<(), HardenError> {
    // 1. Own cgroup namespace (needs CAP_SYS_ADMIN: first).
    // SAFETY: unshare with a namespace flag only changes this process's namespace membership.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(sys("entering a new cgroup namespace"));
    }
    // 2. Bounding set, while CAP_SETPCAP is still there.
    for cap in DANGEROUS {
        caps::drop(None, CapSet::Bounding, cap)
            .map_err(|e| caps_err(format!("dropping {cap} from the bounding set"), e))?;
    }
    // 3. The user: groups, gid, uid (each needs what the next one takes away).
    if let Some(u) = user {
        // SAFETY: setgroups reads groups.len() gids from a live slice.
        if unsafe { libc::setgroups(u.groups.len(), u.groups.as_ptr()) } != 0 {
            return Err(sys("setting the supplementary groups"));
        }
        // SAFETY: plain id-setting syscalls (glibc applies them to every thread).
        if unsafe { libc::setresgid(u.gid, u.gid, u.gid) } != 0 {
            return Err(sys("setting the group id"));
        }
        // SAFETY: as above.
        if unsafe { libc::setresuid(u.uid, u.uid, u.uid) } != 0 {
            return Err(sys("setting the user id"));
        }
    }
    // 4. Effective before permitted (effective must stay a subset), inheritable, ambient.
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        drop_from(set)?;
    }
    caps::clear(None, CapSet::Ambient)
        .map_err(|e| caps_err("clearing the ambient set".to_owned(), e))?;
    // 5. no_new_privs.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("setting no_new_privs"));
    }
    // 6. No new user namespace (no_new_privs lets an unprivileged process install it).
    userns::install()?;
    verify(user)
}

/// The seccomp filter of step 6.
mod userns {
    use super::{HardenError, sys};

    /// `struct sock_filter` / `struct sock_fprog` of linux/filter.h.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Insn {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }

    #[repr(C)]
    struct Prog {
        len: u16,
        filter: *const Insn,
    }

    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

    /// Offsets in `struct seccomp_data`: nr, arch, the low word of args[0] (little endian).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0_LO: u32 = 16;

    /// linux/audit.h.
    #[cfg(target_arch = "x86_64")]
    const NATIVE: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const NATIVE: u32 = 0xc000_00b7;
    /// x32 system calls carry this bit in their number on x86_64.
    const X32_BIT: u32 = 0x4000_0000;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
        Insn { code, jt, jf, k }
    }

    /// The filter: jumps count the instructions skipped after the current one.
    fn program() -> Vec<Insn> {
        let unshare = libc::SYS_unshare as u32;
        let clone = libc::SYS_clone as u32;
        let clone3 = libc::SYS_clone3 as u32;
        vec![
            // 0: another architecture (a 32-bit program): refused whole.
            insn(LD_W_ABS, 0, 0, ARCH),
            insn(JEQ_K, 1, 0, NATIVE),
            insn(RET_K, 0, 0, EPERM),
            // 3: x32 calls, likewise.
            insn(LD_W_ABS, 0, 0, NR),
            insn(JGE_K, 0, 1, X32_BIT),
            insn(RET_K, 0, 0, EPERM),
            // 6: clone3: its flags are in memory a filter cannot read.
            insn(JEQ_K, 0, 1, clone3),
            insn(RET_K, 0, 0, ENOSYS),
            // 8: unshare and clone take the flags in their first argument.
            insn(JEQ_K, 2, 0, unshare),
            insn(JEQ_K, 1, 0, clone),
            insn(RET_K, 0, 0, ALLOW),
            // 11: CLONE_NEWUSER among them: refused.
            insn(LD_W_ABS, 0, 0, ARG0_LO),
            insn(JSET_K, 0, 1, libc::CLONE_NEWUSER as u32),
            insn(RET_K, 0, 0, EPERM),
            insn(RET_K, 0, 0, ALLOW),
        ]
    }

    /// Installs the filter on the calling process (no_new_privs must be set).
    pub(super) fn install() -> Result<(), HardenError> {
        let filter = program();
        let prog = Prog {
            len: filter.len() as u16,
            filter: filter.as_ptr(),
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog` and the instructions it
        // points to, both alive for the call; the kernel copies them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &raw const prog,
            )
        };
        if r != 0 {
            return Err(sys(
                "installing the seccomp filter against new user namespaces",
            ));
        }
        Ok(())
    }
}

/// Reads back from the kernel everything [`harden`] promises for the calling thread.
pub fn verify(user: Option<&User>) -> Result<(), HardenError> {
    let mut wrong = Vec::new();
    for (set, name) in [
        (CapSet::Bounding, "bounding"),
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Ambient, "ambient"),
    ] {
        for cap in DANGEROUS {
            let held = caps::has_cap(None, set, cap)
                .map_err(|e| caps_err(format!("reading the {name} set"), e))?;
            if held {
                wrong.push(format!("{cap} still in the {name} set"));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    if nnp != 1 {
        wrong.push(format!("no_new_privs is {nnp}"));
    }
    let cgroup = fs::read_to_string("/proc/self/cgroup").map_err(|source| HardenError::Sys {
        step: "reading /proc/self/cgroup",
        source,
    })?;
    if !cgroup.lines().any(|l| l == "0::/") {
        wrong.push("the cgroup namespace is not rooted at the agent's cgroup".to_owned());
    }
    let status = fs::read_to_string("/proc/self/status").map_err(|source| HardenError::Sys {
        step: "reading /proc/self/status",
        source,
    })?;
    if !status
        .lines()
        .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
    {
        wrong.push("no seccomp filter against new user namespaces".to_owned());
    }
    if let Some(u) = user {
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: getresuid/getresgid write three ids each.
        unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
        if [r, e, s] != [u.uid; 3] {
            wrong.push(format!("uids are {r}/{e}/{s}, not {}", u.uid));
        }
        // SAFETY: as above.
        unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
        if [r, e, s] != [u.gid; 3] {
            wrong.push(format!("gids are {r}/{e}/{s}, not {}", u.gid));
        }
        let mut groups = supplementary_groups()?;
        groups.sort_unstable();
        groups.dedup();
        if groups != u.groups {
            wrong.push(format!("groups are {groups:?}, not {:?}", u.groups));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(HardenError::NotHardened(wrong.join("; ")))
    }
}

fn drop_from(set: CapSet) -> Result<(), HardenError> {
    let step = || format!("dropping capabilities from the {set:?} set");
    let mut have = caps::read(None, set).map_err(|e| caps_err(step(), e))?;
    let before = have.len();
    have.retain(|c: &Capability| !DANGEROUS.contains(c));
    if have.len() != before {
        caps::set(None, set, &have).map_err(|e| caps_err(step(), e))?;
    }
    Ok(())
}

fn supplementary_groups() -> Result<Vec<u32>, HardenError> {
    // SAFETY: getgroups(0, NULL) only returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let len = usize::try_from(n).map_err(|_| sys("reading the supplementary groups"))?;
    let mut groups = vec![0; len];
    // SAFETY: groups has room for n entries.
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    let len = usize::try_from(n).map_err(|_| sys("reading the supplementary groups"))?;
    groups.truncate(len);
    Ok(groups)
}

fn sys(step: &'static str) -> HardenError {
    HardenError::Sys {
        step,
        source: io::Error::last_os_error(),
    }
}

fn caps_err(step: String, e: caps::errors::CapsError) -> HardenError {
    HardenError::Caps {
        step,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_root_and_reports_missing_users() {
        let root = lookup_user("root").unwrap().expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(lookup_user("agentwatch-no-such-user").unwrap(), None);
        assert!(matches!(
            lookup_user("a\0b"),
            Err(HardenError::BadUserName(_))
        ));
    }
}
