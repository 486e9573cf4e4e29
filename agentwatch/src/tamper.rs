//! The tamper guard's records: what an agent was refused because it would reach agentwatch
//! itself (BPF LSM only; see agentwatch-ebpf/src/tamper.rs). Each becomes a `tamper_refused`
//! line, counts as an escape attempt, and trips the agent's breaker (signal `tamper`).

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agentwatch_common::{
    EVENT_TAMPER_REFUSED, InodeKey, TAMPER_BPF, TAMPER_FILE, TAMPER_OP_RENAME, TAMPER_OP_UNLINK,
    TAMPER_OP_WRITE, TAMPER_SIGNAL, TamperEvent,
};
use serde_json::json;

use crate::{
    audit::KernelLine,
    bpf::{c_string, read_record},
};

/// A refused `bpf()` call or signal to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TamperRecord {
    pub agent_id: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `bpf`, `signal` or `file`.
    pub what: &'static str,
    /// The bpf command, the signal, or the file operation (`TAMPER_OP_*`).
    pub arg: u32,
    /// The signalled daemon's pid (signals only).
    pub target: u32,
    /// The file (files only).
    pub file: InodeKey,
    pub ts_ns: u64,
}

/// Decodes a tamper record (`kind` is its first word); None for other kinds.
pub fn decode(kind: u32, bytes: &[u8]) -> Option<TamperRecord> {
    if kind != EVENT_TAMPER_REFUSED {
        return None;
    }
    let e = read_record::<TamperEvent>(bytes)?;
    Some(TamperRecord {
        agent_id: e.agent,
        pid: e.tgid,
        tid: e.pid,
        comm: c_string(&e.comm),
        what: match e.what {
            TAMPER_BPF => "bpf",
            TAMPER_SIGNAL => "signal",
            TAMPER_FILE => "file",
            _ => "unknown",
        },
        arg: e.arg,
        target: e.target,
        file: InodeKey {
            dev: e.dev,
            _pad: 0,
            ino: e.ino,
        },
        ts_ns: e.ts_ns,
    })
}

/// Name of a bpf(2) command, as in the kernel's `enum bpf_cmd` (the number beyond these).
fn bpf_cmd(cmd: u32) -> String {
    const NAMES: [&str; 37] = [
        "BPF_MAP_CREATE",
        "BPF_MAP_LOOKUP_ELEM",
        "BPF_MAP_UPDATE_ELEM",
        "BPF_MAP_DELETE_ELEM",
        "BPF_MAP_GET_NEXT_KEY",
        "BPF_PROG_LOAD",
        "BPF_OBJ_PIN",
        "BPF_OBJ_GET",
        "BPF_PROG_ATTACH",
        "BPF_PROG_DETACH",
        "BPF_PROG_TEST_RUN",
        "BPF_PROG_GET_NEXT_ID",
        "BPF_MAP_GET_NEXT_ID",
        "BPF_PROG_GET_FD_BY_ID",
        "BPF_MAP_GET_FD_BY_ID",
        "BPF_OBJ_GET_INFO_BY_FD",
        "BPF_PROG_QUERY",
        "BPF_RAW_TRACEPOINT_OPEN",
        "BPF_BTF_LOAD",
        "BPF_BTF_GET_FD_BY_ID",
        "BPF_TASK_FD_QUERY",
        "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
        "BPF_MAP_FREEZE",
        "BPF_BTF_GET_NEXT_ID",
        "BPF_MAP_LOOKUP_BATCH",
        "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
        "BPF_MAP_UPDATE_BATCH",
        "BPF_MAP_DELETE_BATCH",
        "BPF_LINK_CREATE",
        "BPF_LINK_UPDATE",
        "BPF_LINK_GET_FD_BY_ID",
        "BPF_LINK_GET_NEXT_ID",
        "BPF_ENABLE_STATS",
        "BPF_ITER_CREATE",
        "BPF_LINK_DETACH",
        "BPF_PROG_BIND_MAP",
        "BPF_TOKEN_CREATE",
    ];
    usize::try_from(cmd)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| cmd.to_string(), |n| (*n).to_owned())
}

impl TamperRecord {
    /// `tamper_refused` (pid, tid, comm, what, and the bpf command, the signal and target, or
    /// the file operation and `path`: `files` names the daemon's files by inode).
    pub fn audit_line(&self, files: &BTreeMap<InodeKey, PathBuf>) -> KernelLine {
        let mut fields = json!({
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "what": self.what,
        });
        match self.what {
            "signal" => {
                fields["signal"] = json!(self.arg);
                fields["target_pid"] = json!(self.target);
            }
            "file" => {
                fields["op"] = json!(match self.arg {
                    TAMPER_OP_WRITE => "write",
                    TAMPER_OP_UNLINK => "unlink",
                    TAMPER_OP_RENAME => "rename",
                    _ => "unknown",
                });
                // The path it had when the daemon last looked (it may have been renamed
                // since by someone else; the inode is what was guarded).
                fields["path"] = json!(files.get(&self.file).map(|p| p.display().to_string()));
                fields["ino"] = json!(self.file.ino);
            }
            _ => fields["bpf_cmd"] = json!(bpf_cmd(self.arg)),
        }
        KernelLine {
            agent_id: self.agent_id,
            ts_ns: self.ts_ns,
            kind: "tamper_refused",
            pid: self.pid,
            fields,
        }
    }
}

/// The kernel's name of the inode at `path` (not following a last symbolic link): its file
/// system's `dev_t` as the kernel keeps it (`MAJOR << 20 | MINOR`) and its number.
pub fn inode_key(path: &Path) -> Option<InodeKey> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| kernel_inode_key(&m))
}

/// The kernel's name of the inode `m` describes (see [`inode_key`]).
pub fn kernel_inode_key(m: &std::fs::Metadata) -> InodeKey {
    let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
    InodeKey {
        dev: (major << 20) | minor,
        _pad: 0,
        ino: m.ino(),
    }
}

/// The daemon's files and folders the tamper guard keeps agents from changing: each of
/// `paths` that exists, and everything below those that are folders of the daemon's own
/// (`deep`: the pin folder). Named by inode, with the path for the audit line.
pub fn protected(paths: &[&Path], deep: &[&Path]) -> BTreeMap<InodeKey, PathBuf> {
    let mut out = BTreeMap::new();
    for p in paths {
        if let Some(k) = inode_key(p) {
            out.insert(k, p.to_path_buf());
        }
    }
    let mut stack: Vec<PathBuf> = deep.iter().map(|p| p.to_path_buf()).collect();
    // Bounded like the kernel's map: a pin folder of this size is far beyond any host's.
    while let Some(dir) = stack.pop() {
        if out.len() >= 8000 {
            break;
        }
        if let Some(k) = inode_key(&dir) {
            out.insert(k, dir.clone());
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if let Some(k) = inode_key(&p) {
                out.insert(k, p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_kinds_into_their_lines() {
        let mut e = TamperEvent {
            kind: EVENT_TAMPER_REFUSED,
            agent: 2,
            pid: 41,
            tgid: 40,
            ts_ns: 9,
            what: TAMPER_BPF,
            arg: 7,
            ..Default::default()
        };
        e.comm[..7].copy_from_slice(b"python3");
        // SAFETY: TamperEvent is plain old data.
        let bytes: [u8; size_of::<TamperEvent>()] = unsafe { std::mem::transmute(e) };
        let r = decode(EVENT_TAMPER_REFUSED, &bytes).unwrap();
        let none = BTreeMap::new();
        let line = r.audit_line(&none);
        assert_eq!(line.kind, "tamper_refused");
        assert_eq!(
            line.fields,
            json!({"pid": 40, "tid": 41, "comm": "python3", "what": "bpf", "bpf_cmd": "BPF_OBJ_GET"})
        );
        e.what = TAMPER_SIGNAL;
        e.arg = 9;
        e.target = 77;
        // SAFETY: as above.
        let bytes: [u8; size_of::<TamperEvent>()] = unsafe { std::mem::transmute(e) };
        let line = decode(EVENT_TAMPER_REFUSED, &bytes)
            .unwrap()
            .audit_line(&none);
        assert_eq!(line.fields["signal"], 9);
        assert_eq!(line.fields["target_pid"], 77);
        assert_eq!(bpf_cmd(34), "BPF_LINK_DETACH");
        assert_eq!(bpf_cmd(99), "99");
        assert_eq!(decode(1, &bytes), None);
        // A file: its path from what the daemon guards.
        let dir = std::env::temp_dir();
        let key = inode_key(&dir).unwrap();
        e.what = TAMPER_FILE;
        e.arg = TAMPER_OP_RENAME;
        (e.dev, e.ino) = (key.dev, key.ino);
        // SAFETY: as above.
        let bytes: [u8; size_of::<TamperEvent>()] = unsafe { std::mem::transmute(e) };
        let files = protected(&[&dir], &[]);
        let line = decode(EVENT_TAMPER_REFUSED, &bytes)
            .unwrap()
            .audit_line(&files);
        assert_eq!(line.fields["op"], "rename");
        assert_eq!(line.fields["path"], dir.display().to_string());
    }

    #[test]
    fn inode_keys_use_the_kernels_dev_encoding() {
        // /proc/self/mountinfo's third field is MAJOR:MINOR as the kernel keeps it.
        let root = inode_key(Path::new("/")).unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // The last mount on / is the one seen (an initramfs's rootfs may lie below it).
        let line = info
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap();
        let (major, minor) = line.split(' ').nth(2).unwrap().split_once(':').unwrap();
        let (major, minor): (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
        assert_eq!(root.dev, (major << 20) | minor);
    }
}
