//! What the benchmarks (tests/tests/bench.rs, run by `cargo xtask bench`) share: where their
//! results go, their statistics, the peers they compare agentwatch with (an nftables table, an
//! empty BPF program) and the /proc readings of a process's cost.
//!
//! Each result is one JSON line appended to the file named by `AGENTWATCH_BENCH_OUT` (and
//! printed): xtask renders them into BENCHMARKS.md and target/bench.json.

use std::{
    fs,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::probe_bin;

/// `AGENTWATCH_BENCH_QUICK=1`: a small version of every section (CI runs it so the benchmarks
/// never rot; its numbers are rougher).
pub fn quick() -> bool {
    std::env::var("AGENTWATCH_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// `full` normally, `quick` under [`quick`].
pub fn pick<T>(full: T, quick_value: T) -> T {
    if quick() { quick_value } else { full }
}

/// Writes one section's results.
pub struct Report {
    section: &'static str,
}

impl Report {
    /// `section`: one of xtask's section keys (egress, syscalls, workload, containment,
    /// events, scale).
    pub fn new(section: &'static str) -> Self {
        Self { section }
    }

    fn emit(&self, mut v: Value) {
        v["section"] = json!(self.section);
        let line = v.to_string();
        println!("bench: {line}");
        if let Some(path) = std::env::var_os("AGENTWATCH_BENCH_OUT") {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("opening AGENTWATCH_BENCH_OUT");
            writeln!(f, "{line}").expect("writing AGENTWATCH_BENCH_OUT");
        }
    }

    /// One row of the section's table `table` (its columns given with every row, so each row
    /// stands alone in bench.json). `cells` are what the table shows; `data` the raw numbers.
    pub fn row(&self, table: &str, columns: &[&str], cells: &[String], data: Value) {
        assert_eq!(columns.len(), cells.len(), "{table}: columns and cells");
        self.emit(json!({"kind": "row", "table": table, "columns": columns, "cells": cells, "data": data}));
    }

    /// A sentence under the section's tables (method, sizes, caveats).
    pub fn note(&self, text: &str) {
        self.emit(json!({"kind": "note", "text": text}));
    }

    /// Where a target of issue 11 stands: `measured` as shown, `met` whether it holds.
    pub fn target(&self, target: &str, measured: &str, met: bool) {
        self.emit(json!({"kind": "target", "target": target, "measured": measured, "met": met}));
    }
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// The `p`th percentile of `v` (nearest rank; sorted in place); 0 for an empty slice.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The largest value of `v`.
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// `1234` -> "1,234".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Runs `aw-probe --cgroup DIR ARGS` (a `time-*` command) and returns its (`ns_per_call`,
/// `cpu_ns_per_call`): wall time, and the CPU time of the calling thread.
pub fn probe_times(cgroup: &Path, args: &[&str]) -> (f64, f64) {
    let o = Command::new(probe_bin())
        .arg("--cgroup")
        .arg(cgroup)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running aw-probe");
    assert!(o.status.success(), "aw-probe {args:?}: {:?}", o.status);
    let v: Value = serde_json::from_slice(&o.stdout).expect("aw-probe JSON");
    (
        v["ns_per_call"].as_f64().expect("ns_per_call"),
        v["cpu_ns_per_call"].as_f64().expect("cpu_ns_per_call"),
    )
}

/// Wall time per call of a `time-*` command of aw-probe run in `cgroup`.
pub fn ns_per_call(cgroup: &Path, args: &[&str]) -> f64 {
    probe_times(cgroup, args).0
}

/// CPU time per call of the calling thread (CLOCK_THREAD_CPUTIME_ID) of a `time-*` command of
/// aw-probe run in `cgroup`. The hooks' cost without the time the probe spent preempted by
/// other work of a shared host (the loopback packet's softirq work runs in the caller's
/// context, so it is counted).
pub fn cpu_ns_per_call(cgroup: &Path, args: &[&str]) -> f64 {
    probe_times(cgroup, args).1
}

/// An nftables table of the bench's own: the same allow-list as an agent's, for the sockets of
/// one cgroup, the way a user would write it without agentwatch (`socket cgroupv2` + an
/// interval set of address . protocol . port). Deleted on Drop, also when the bench fails.
pub struct NftTable {
    name: String,
}

/// One allowed (address, protocol, port) of an nftables set.
pub struct NftAllow {
    pub addr: std::net::IpAddr,
    pub proto: &'static str,
    pub port: u16,
}

impl NftTable {
    /// Guards the cgroup at `cgroup` (absolute path below the cgroup2 mount `mount`) with the
    /// allow-list `allow`: anything else its sockets send is dropped.
    pub fn new(mount: &Path, cgroup: &Path, allow: &[NftAllow]) -> Self {
        let rel = cgroup
            .strip_prefix(mount)
            .expect("the cgroup is below the cgroup2 mount");
        let level = rel.components().count();
        // nft resolves the path below /sys/fs/cgroup: on a hybrid host (cgroup2 at
        // /sys/fs/cgroup/unified) the v2 tree is named `unified/...`.
        let nft_path = match mount.strip_prefix("/sys/fs/cgroup") {
            Ok(sub) if !sub.as_os_str().is_empty() => sub.join(rel),
            _ => rel.to_path_buf(),
        };
        let name = format!("agentwatch_bench_{}", std::process::id());
        let elements = |v6: bool| -> String {
            allow
                .iter()
                .filter(|a| a.addr.is_ipv6() == v6)
                .map(|a| format!("{} . {} . {}", a.addr, a.proto, a.port))
                .collect::<Vec<_>>()
                .join(",\n")
        };
        let set = |name: &str, ty: &str, els: String| {
            let els = if els.is_empty() {
                String::new()
            } else {
                format!("elements = {{ {els} }}")
            };
            format!(
                "set {name} {{\ntype {ty} . inet_proto . inet_service\nflags interval\n{els}\n}}\n"
            )
        };
        let text = format!(
            "table inet {name} {{\n{}{}\
             chain out {{\ntype filter hook output priority filter; policy accept;\n\
             socket cgroupv2 level {level} \"{}\" jump agent\n}}\n\
             chain agent {{\n\
             meta nfproto ipv4 ip daddr . meta l4proto . th dport @allow4 accept\n\
             meta nfproto ipv6 ip6 daddr . meta l4proto . th dport @allow6 accept\n\
             drop\n}}\n}}\n",
            set("allow4", "ipv4_addr", elements(false)),
            set("allow6", "ipv6_addr", elements(true)),
            nft_path.display()
        );
        let file = std::env::temp_dir().join(format!("{name}.nft"));
        fs::write(&file, text).expect("writing the nft file");
        // The guard exists before the load: a load that fails half way is removed too.
        let table = Self { name };
        let out = Command::new("nft")
            .arg("-f")
            .arg(&file)
            .output()
            .expect("running nft (Debian package nftables; `cargo xtask setup` installs it)");
        let _ = fs::remove_file(&file);
        assert!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Empty BPF programs (`r0 = 0; exit`, or `r0 = 1` where that allows the call) attached where
/// agentwatch's are: the floor that anything hooked there pays. Loaded with the bpf syscall
/// directly, because they are not part of agentwatch's object. Detached and unloaded on Drop
/// (closing their fds).
pub struct EmptyProgram {
    _fds: Vec<std::os::fd::OwnedFd>,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
// From linux/perf_event.h (the libc crate does not carry them).
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// _IO('$', 0)
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// _IOW('$', 8, __u32)
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// The head of `union bpf_attr` for BPF_PROG_LOAD (the kernel takes a shorter attr than its own
/// and treats the rest as zero).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// The bpf syscall, retried on EAGAIN: its non-negative return value.
fn bpf_call(cmd: libc::c_long, attr: *const u8, size: usize) -> std::io::Result<i64> {
    // The verifier may return EAGAIN when a signal is pending (kernel-and-toolchain.md).
    for _ in 0..5 {
        // SAFETY: `attr` points to a live, initialised attr of `size` bytes.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
        if r >= 0 {
            return Ok(r);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
}

/// A bpf command that returns a new fd (PROG_LOAD, RAW_TRACEPOINT_OPEN, ...).
pub fn bpf(
    cmd: libc::c_long,
    attr: *const u8,
    size: usize,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = i32::try_from(bpf_call(cmd, attr, size)?).expect("fd");
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A bpf command that returns 0 (PROG_ATTACH, ...).
pub fn bpf_op(cmd: libc::c_long, attr: *const u8, size: usize) -> std::io::Result<()> {
    bpf_call(cmd, attr, size).map(drop)
}

fn load_empty(prog_type: u32) -> std::os::fd::OwnedFd {
    load_trivial(prog_type, 0, 0)
}

/// Loads `r0 = r0_value; exit` as a program of `prog_type` (for cgroup hooks, with
/// `expected_attach_type`), with the bpf syscall directly: a program that is not agentwatch's.
pub fn load_trivial(
    prog_type: u32,
    expected_attach_type: u32,
    r0_value: i32,
) -> std::os::fd::OwnedFd {
    // mov64 r0, IMM; exit
    let insns: [u64; 2] = [0xb7 | (u64::from(r0_value as u32) << 32), 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"aw_bench0");
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type,
    };
    bpf(
        BPF_PROG_LOAD,
        (&raw const attr).cast(),
        std::mem::size_of::<ProgLoadAttr>(),
    )
    .expect("loading a trivial BPF program")
}

impl EmptyProgram {
    /// On the raw tracepoint `sys_enter` (as agentwatch's syscall monitor).
    pub fn raw_sys_enter() -> Self {
        use std::os::fd::AsRawFd as _;
        let prog = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT);
        let name = c"sys_enter";
        let attr = RawTracepointAttr {
            name: name.as_ptr() as u64,
            prog_fd: u32::try_from(prog.as_raw_fd()).expect("fd"),
            _pad: 0,
        };
        let link = bpf(
            BPF_RAW_TRACEPOINT_OPEN,
            (&raw const attr).cast(),
            std::mem::size_of::<RawTracepointAttr>(),
        )
        .expect("attaching an empty raw tracepoint to sys_enter");
        Self {
            _fds: vec![link, prog],
        }
    }

    /// On the classic tracepoints `category/name` (as agentwatch's escape and exec guards),
    /// one program attached to each.
    pub fn tracepoints(points: &[(&str, &str)]) -> Self {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let mut fds = Vec::new();
        for (category, name) in points {
            let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                .into_iter()
                .find(|d| Path::new(d).join("events").exists())
                .expect("tracefs is mounted (`cargo xtask setup` mounts it)");
            let id: u64 = fs::read_to_string(format!("{tracefs}/events/{category}/{name}/id"))
                .expect("tracepoint id")
                .trim()
                .parse()
                .expect("tracepoint id");
            let prog = load_empty(BPF_PROG_TYPE_TRACEPOINT);
            // struct perf_event_attr, first 64 bytes (PERF_ATTR_SIZE_VER0): type, size,
            // config, sample_period, ..., wakeup_events at byte 48.
            let mut attr = [0u8; 64];
            attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
            attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
            attr[8..16].copy_from_slice(&id.to_ne_bytes());
            attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
            attr[48..52].copy_from_slice(&1u32.to_ne_bytes());
            // SAFETY: perf_event_open with a valid attr; pid -1 cpu 0 as libbpf does (a BPF
            // program on a tracepoint runs on every CPU whatever the event's cpu).
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_ptr(),
                    -1,
                    0,
                    -1,
                    PERF_FLAG_FD_CLOEXEC,
                )
            };
            assert!(
                fd >= 0,
                "perf_event_open {category}/{name}: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: the kernel just returned this fd to us.
            let event =
                unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) };
            // SAFETY: ioctls on the perf event fd with the program fd / no argument.
            unsafe {
                assert_eq!(
                    libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()),
                    0,
                    "PERF_EVENT_IOC_SET_BPF: {}",
                    std::io::Error::last_os_error()
                );
                assert_eq!(
                    libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0),
                    0,
                    "PERF_EVENT_IOC_ENABLE: {}",
                    std::io::Error::last_os_error()
                );
            }
            fds.push(event);
            fds.push(prog);
        }
        Self { _fds: fds }
    }

    /// On `cgroup`'s connect4, connect6, sendmsg4 and sendmsg6 hooks, programs that allow
    /// every call (`r0 = 1`): the floor that any egress filter hooked there pays. Attached
    /// with BPF_LINK_CREATE, so closing the links detaches them.
    pub fn cgroup_egress(cgroup: &Path) -> Self {
        use std::os::fd::AsRawFd as _;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
        // BPF_CGROUP_INET4_CONNECT, _INET6_CONNECT, _UDP4_SENDMSG, _UDP6_SENDMSG.
        const HOOKS: [u32; 4] = [10, 11, 14, 15];
        #[repr(C)]
        struct LinkCreateAttr {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
        }
        let dir = fs::File::open(cgroup).expect("opening the cgroup");
        let mut fds = Vec::new();
        for hook in HOOKS {
            let prog = load_trivial(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, hook, 1);
            let attr = LinkCreateAttr {
                prog_fd: u32::try_from(prog.as_raw_fd()).expect("fd"),
                target_fd: u32::try_from(dir.as_raw_fd()).expect("fd"),
                attach_type: hook,
                flags: 0,
            };
            let link = bpf(
                BPF_LINK_CREATE,
                (&raw const attr).cast(),
                std::mem::size_of::<LinkCreateAttr>(),
            )
            .expect("attaching an empty egress program");
            fds.push(link);
            fds.push(prog);
        }
        Self { _fds: fds }
    }
}

/// User + system CPU seconds process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory of the BPF maps process `pid` holds, in bytes: the sum of the `memlock` each
/// map fd's fdinfo reports (what the kernel charges for the map), each map counted once.
pub fn map_memlock(pid: u32) -> (u64, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    for e in dir.filter_map(Result::ok) {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    (total, seen.len())
}
