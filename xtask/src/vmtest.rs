//! `cargo xtask vmtest`: the privileged suite inside QEMU guests running Debian's kernels (issue
//! 12), against the binaries built on the host.
//!
//! The guest's root filesystem is the host's own `/`, shared read-only over virtiofs with a
//! tmpfs overlay on top, so every tool the suite uses (ip, prometheus, promtool, the
//! kubernetes-validate virtualenv, systemd-analyze) is there at the same path as on the host and
//! the test binaries find each other by their host paths. Debian's cloud kernels have no 9p,
//! hence virtiofs (QEMU 7.2's virtiofsd). A busybox initramfs loads the virtio/virtiofs/overlay
//! modules, builds that root and switches to it; a script the xtask writes into a second,
//! writable share then mounts what a systemd host has (cgroup2 at /sys/fs/cgroup with
//! `nsdelegate`, bpffs, tracefs), runs every test binary and writes libtest's output back.
//!
//! Nothing is installed on the host but the Debian packages below: the kernels are
//! `apt-get download`ed and extracted into ~/.cache/agentwatch/kernels/<version>/.

use std::{
    env, fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Present, cargo, count_of, home, install_debian_packages, is_root, output, sh};

/// What the guest needs from Debian: QEMU and its virtiofsd (qemu-system-x86 7.2 ships the C
/// virtiofsd in qemu-system-common), a static busybox for the initramfs (it also writes the
/// cpio archive), and kmod's depmod (modules.dep for the extracted kernels; in the guest the
/// kernel calls the host root's /sbin/modprobe to load veth, nf_tables and the like on demand).
const VM_PACKAGES: [(Present, &str); 4] = [
    (
        Present::File("/usr/bin/qemu-system-x86_64"),
        "qemu-system-x86",
    ),
    (Present::File(VIRTIOFSD), "qemu-system-x86"),
    (Present::File(BUSYBOX), "busybox-static"),
    (Present::File("/usr/sbin/depmod"), "kmod"),
];

const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
const BUSYBOX: &str = "/bin/busybox";

/// The kernel series of the matrix: Debian 12 / Amazon Linux 2023's 6.1 and the newer
/// distributions' 6.12, each as Debian's cloud flavour (virtio, small). `apt` is the package
/// name's pattern; the newest matching package in the lists is used.
struct Series {
    name: &'static str,
    apt: &'static str,
}

const SERIES: [Series; 2] = [
    Series {
        name: "6.1",
        apt: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
    },
    Series {
        name: "6.12",
        apt: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$",
    },
];

/// Modules the initramfs loads before it can mount the root (those the kernel has built in are
/// skipped: 6.12's cloud kernel has virtio and virtiofs built in, 6.1's has them as modules).
const INITRAMFS_MODULES: [&str; 3] = ["virtio_pci", "virtiofs", "overlay"];

/// Guest size: 2 vCPUs like the host; 2 GiB held the whole suite (the overlay's upper layer,
/// where everything the tests write goes, is a tmpfs in this memory).
const GUEST_CPUS: &str = "2";
const GUEST_MEM_MIB: u32 = 2048;

/// How much longer the tests' helpers wait for things in a guest (tests/src/lib.rs
/// `patience`): TCG runs the daemon's start-up, mostly BPF verification, 10-20 times slower
/// than the host (measured: 13 s in the 6.1 guest).
const TIME_SCALE: u32 = 10;

pub struct Args {
    pub kernels: Vec<String>,
    pub all: bool,
    pub timeout: Duration,
    /// Test files to run (tests/tests/NAME.rs); empty: every test binary.
    pub tests: Vec<String>,
    /// Arguments for each test binary (libtest's filter and flags).
    pub test_args: Vec<String>,
}

pub fn vmtest(args: &Args) -> Result<()> {
    if !is_root() {
        bail!("vmtest runs virtiofsd (which needs root) and downloads kernels: run it as root");
    }
    install_debian_packages(&VM_PACKAGES)?;
    let wanted = wanted_kernels(args)?;
    let kernels = wanted
        .iter()
        .map(|w| kernel(w))
        .collect::<Result<Vec<_>>>()?;

    let target = target_dir()?;
    let binaries = select_binaries(build_test_binaries()?, &args.tests)?;
    eprintln!(
        "xtask: {} test binaries to run in each guest",
        binaries.len()
    );

    let mut results = Vec::new();
    for k in &kernels {
        let r = run_guest(k, &target, &binaries, args)
            .with_context(|| format!("guest with kernel {}", k.version));
        results.push((k.version.clone(), r));
    }
    println!();
    println!("vmtest summary (cgroup2 at /sys/fs/cgroup with nsdelegate, TCG):");
    let mut failed = false;
    for (version, r) in &results {
        match r {
            Ok(s) => {
                println!(
                    "  {version}: {} passed, {} failed, {} binaries failed; boot {:.1}s, suite {:.0}s",
                    s.passed,
                    s.failed,
                    s.failed_binaries.len(),
                    s.boot_secs,
                    s.suite_secs
                );
                for b in &s.failed_binaries {
                    println!("      failed: {b}");
                }
                failed |= !s.ok();
            }
            Err(e) => {
                println!("  {version}: did not finish: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("vmtest failed on at least one kernel (see above)");
    }
    Ok(())
}

/// The series asked for: `--all` is every series, `--kernel` a series (6.1, 6.12) or an exact
/// package version (6.1.0-47-cloud-amd64, to try an older kernel); by default 6.1, the oldest
/// kernel the project supports and the one most likely to refuse a program.
fn wanted_kernels(args: &Args) -> Result<Vec<String>> {
    if args.all {
        return Ok(SERIES.iter().map(|s| s.name.to_owned()).collect());
    }
    if args.kernels.is_empty() {
        return Ok(vec![SERIES[0].name.to_owned()]);
    }
    Ok(args.kernels.clone())
}

struct Kernel {
    version: String,
    /// The extracted package: boot/vmlinuz-<version>, lib/modules/<version>.
    root: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.version))
    }

    fn modules(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.version))
    }
}

fn kernels_cache() -> Result<PathBuf> {
    Ok(home()?.join(".cache/agentwatch/kernels"))
}

/// The kernel for `wanted` (a series name or an exact version), downloaded and extracted into
/// the cache unless it is there already.
fn kernel(wanted: &str) -> Result<Kernel> {
    let version = match SERIES.iter().find(|s| s.name == wanted) {
        Some(series) => newest_in_lists(series)?,
        None => wanted.to_owned(),
    };
    let cache = kernels_cache()?;
    let k = Kernel {
        root: cache.join(&version),
        version: version.clone(),
    };
    // modules.dep is written last: its presence means a complete extraction.
    if k.vmlinuz().exists() && k.modules().join("modules.dep").exists() {
        return Ok(k);
    }
    eprintln!(
        "xtask: downloading and extracting linux-image-{version} (not installed on the host)"
    );
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let package = format!("linux-image-{version}");
    sh(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&debs))
    .with_context(|| format!("apt-get download {package} (is it in the package lists?)"))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("no {package}_*.deb in {} after download", debs.display()))?;
    let partial = cache.join(format!("{version}.partial"));
    let _ = fs::remove_dir_all(&partial);
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    // The package's postinst would run depmod; it is never installed, so run it on the copy.
    sh(Command::new("/usr/sbin/depmod")
        .arg("-b")
        .arg(&partial)
        .arg(&version))?;
    let _ = fs::remove_dir_all(&k.root);
    fs::rename(&partial, &k.root)?;
    Ok(k)
}

/// The newest version of a series in the package lists (`apt-get update` once if it has none).
fn newest_in_lists(series: &Series) -> Result<String> {
    let search = || {
        output(Command::new("apt-cache").args(["search", "--names-only", series.apt]))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|p| p.strip_prefix("linux-image-"))
            .map(str::to_owned)
            .max_by_key(|v| version_key(v))
    };
    if let Some(v) = search() {
        return Ok(v);
    }
    sh(Command::new("apt-get").arg("update"))?;
    search().with_context(|| {
        format!(
            "no package matching {} in the package lists (kernel series {})",
            series.apt, series.name
        )
    })
}

/// Orders kernel versions by their numbers: 6.12.117 after 6.12.99, 6.1.0-56 after 6.1.0-9.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn target_dir() -> Result<PathBuf> {
    let out = output(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(crate::workspace_root()),
    )
    .context("cargo metadata")?;
    let meta: Value = serde_json::from_str(&out).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("no target_directory in cargo metadata")
}

/// One libtest binary as `cargo test` would run it.
struct TestBinary {
    /// e.g. "agentwatch-tests/egress" or "agentwatch (lib)".
    name: String,
    exe: PathBuf,
    /// cargo runs each test binary in its package's folder.
    cwd: PathBuf,
}

/// Builds what `cargo xtask test` builds (the bins the end-to-end tests start, then the test
/// binaries) and lists the test binaries from cargo's JSON messages.
fn build_test_binaries() -> Result<Vec<TestBinary>> {
    cargo(&["build", "--bins"])?;
    let cargo_bin = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo_bin)
        .args(["test", "--no-run", "--message-format=json"])
        .current_dir(crate::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let mut bins: Vec<TestBinary> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        let package = msg["package_id"]
            .as_str()
            .and_then(package_name)
            .unwrap_or("?");
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("?");
        let name = match kind {
            "test" => format!("{package}/{target}"),
            _ => format!("{package} ({kind} {target})"),
        };
        if bins.iter().any(|b| b.exe == Path::new(exe)) {
            continue;
        }
        bins.push(TestBinary {
            name,
            exe: PathBuf::from(exe),
            cwd: Path::new(manifest)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        });
    }
    if bins.is_empty() {
        bail!("cargo test --no-run listed no test binary");
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bins)
}

/// The test binaries of the files asked for (`--test egress` is agentwatch-tests/egress), all
/// when none was; a name that matches no test file is an error, not an empty run.
fn select_binaries(all: Vec<TestBinary>, tests: &[String]) -> Result<Vec<TestBinary>> {
    if tests.is_empty() {
        return Ok(all);
    }
    for t in tests {
        if !all
            .iter()
            .any(|b| b.name.rsplit('/').next() == Some(t.as_str()))
        {
            let names: Vec<&str> = all
                .iter()
                .filter_map(|b| b.name.split_once('/'))
                .map(|(_, n)| n)
                .collect();
            bail!(
                "--test {t}: no such test file (there are: {})",
                names.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|b| {
            tests
                .iter()
                .any(|t| b.name.rsplit('/').next() == Some(t.as_str()))
        })
        .collect())
}

/// A package id's name: "path+file:///w/tests#agentwatch-tests@0.1.0" -> "agentwatch-tests";
/// cargo leaves the name out when it is the folder's, "path+file:///w/agentwatch#0.1.0" ->
/// "agentwatch".
fn package_name(id: &str) -> Option<&str> {
    let (url, tail) = id.rsplit_once('#')?;
    match tail.split_once('@') {
        Some((name, _)) => Some(name),
        None => url.rsplit('/').next(),
    }
}

struct GuestRun {
    passed: u64,
    failed: u64,
    failed_binaries: Vec<String>,
    boot_secs: f64,
    suite_secs: f64,
}

impl GuestRun {
    fn ok(&self) -> bool {
        self.failed == 0 && self.failed_binaries.is_empty() && self.passed > 0
    }
}

/// A child process killed (and reaped) when dropped: qemu and the virtiofsd daemons never
/// outlive the xtask, whatever fails.
struct Guard {
    what: &'static str,
    child: Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            eprintln!("xtask: stopping {} (pid {})", self.what, self.child.id());
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn run_guest(k: &Kernel, target: &Path, binaries: &[TestBinary], args: &Args) -> Result<GuestRun> {
    let timeout = args.timeout;
    let dir = target.join("vmtest").join(&k.version);
    let share = dir.join("share");
    let rootfs = dir.join("rootfs");
    let _ = fs::remove_dir_all(&share);
    fs::create_dir_all(share.join("out"))?;
    fs::create_dir_all(&rootfs)?;
    let root_sock = dir.join("root.sock");
    let share_sock = dir.join("share.sock");
    // sun_path holds 108 bytes.
    if root_sock.as_os_str().len() > 100 {
        bail!(
            "{} is too long for a unix socket; use a shorter CARGO_TARGET_DIR",
            root_sock.display()
        );
    }
    let initramfs = dir.join("initramfs.cpio");
    build_initramfs(k, &dir.join("initramfs"), &initramfs)?;
    let script = share.join("guest.sh");
    fs::write(&script, guest_script(k, binaries, &args.test_args)?)?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;

    for s in [&root_sock, &share_sock] {
        let _ = fs::remove_file(s);
    }
    // The host's / for the guest, read-only as seen by the host kernel (not only as mounted in
    // the guest): a non-recursive read-only bind in a mount namespace of virtiofsd's own, so
    // the guest sees the root filesystem without /proc, /sys, /dev or any other mount.
    let root_daemon = Guard {
        what: "virtiofsd (host root, read-only)",
        child: Command::new("nice")
            .args(["-n", "10", "unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind / "$1" && mount -o remount,bind,ro "$1" && exec "$2" --socket-path="$3" -o source="$1" -o cache=always -o sandbox=chroot"#)
            .args(["sh".as_ref(), rootfs.as_os_str(), VIRTIOFSD.as_ref(), root_sock.as_os_str()])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("virtiofsd-root.log"))?)
            .spawn()
            .context("starting virtiofsd for the host root")?,
    };
    let share_daemon = Guard {
        what: "virtiofsd (share)",
        child: Command::new("nice")
            .args(["-n", "10", VIRTIOFSD])
            .arg(format!("--socket-path={}", share_sock.display()))
            .arg("-o")
            .arg(format!("source={}", share.display()))
            .args(["-o", "cache=none", "-o", "sandbox=chroot"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("virtiofsd-share.log"))?)
            .spawn()
            .context("starting virtiofsd for the share")?,
    };
    wait_for_socket(&root_sock)?;
    wait_for_socket(&share_sock)?;

    eprintln!(
        "xtask: booting {} under TCG ({GUEST_CPUS} vCPUs, {GUEST_MEM_MIB} MiB), timeout {} min",
        k.version,
        timeout.as_secs() / 60
    );
    let console_path = dir.join("console.log");
    let started = Instant::now();
    let mut qemu = Guard {
        what: "qemu",
        child: Command::new("nice")
            .args(["-n", "10", "qemu-system-x86_64"])
            // TCG: KVM guests do not run on these machines (kernel-and-toolchain.md).
            // thread=single: one host thread runs both vCPUs in turn. With a thread per vCPU
            // (QEMU 7.2's default), 2 of 3 whole 6.1 runs locked up for good: a vCPU kept
            // trapping on an int3 in a static branch the kernel had already written back (a
            // tracepoint being attached), which points at TCG's handling of code another
            // vCPU modifies. Not proven; no run has locked up since (README "Kernel matrix").
            .args(["-accel", "tcg,thread=single"])
            .args(["-cpu", "max", "-smp", GUEST_CPUS])
            .args(["-m", &format!("{GUEST_MEM_MIB}M")])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            // vhost-user (virtiofsd) needs the guest's memory shared with it.
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=root,path={}", root_sock.display()))
            .args(["-device", "vhost-user-fs-pci,chardev=root,tag=hostroot"])
            .arg("-chardev")
            .arg(format!("socket,id=share,path={}", share_sock.display()))
            .args(["-device", "vhost-user-fs-pci,chardev=share,tag=share"])
            .arg("-kernel")
            .arg(k.vmlinuz())
            .arg("-initrd")
            .arg(&initramfs)
            // panic=-1: a guest panic reboots at once, and -no-reboot turns that into an exit.
            // A CPU stuck in the kernel panics too, with every CPU's backtrace, rather than
            // hold the guest until the timeout; 60 s (watchdog_thresh 30) so that TCG's slow
            // but moving kernel paths (the verifier) are not taken for one.
            .args([
                "-append",
                "console=ttyS0 panic=-1 loglevel=4 softlockup_panic=1 \
                 softlockup_all_cpu_backtrace=1 watchdog_thresh=30",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-system-x86_64")?,
    };
    // The console goes to the terminal as it comes (the suite's progress) and to a file.
    let stdout = qemu.child.stdout.take().context("qemu stdout")?;
    let mut console = fs::File::create(&console_path)?;
    let (done_tx, done_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line);
            let _ = writeln!(console, "{text}");
            println!("[guest] {}", text.trim_end_matches('\r'));
        }
        let _ = done_tx.send(());
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = qemu.child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            timed_out = true;
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    drop(qemu);
    let _ = done_rx.recv_timeout(Duration::from_secs(5));
    let _ = reader.join();
    drop(root_daemon);
    drop(share_daemon);
    let wall = started.elapsed().as_secs_f64();

    // The guest writes `done` only after the last binary: without it the guest died first.
    let done = fs::read_to_string(share.join("done")).ok();
    if timed_out {
        bail!(
            "timed out after {} min: qemu killed; the guest's console is in {}",
            timeout.as_secs() / 60,
            console_path.display()
        );
    }
    let Some(done) = done else {
        bail!(
            "the guest stopped before the suite finished (qemu {status:?} after {wall:.0}s: a \
             kernel panic, an OOM or a crash); its console is in {}",
            console_path.display()
        );
    };
    let mut run = GuestRun {
        passed: 0,
        failed: 0,
        failed_binaries: Vec::new(),
        boot_secs: 0.0,
        suite_secs: 0.0,
    };
    // "boot <uptime> end <uptime>": seconds since the guest kernel started.
    let mut nums = done
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok());
    run.boot_secs = nums.next().unwrap_or(0.0);
    run.suite_secs = nums.next().unwrap_or(0.0) - run.boot_secs;
    for (i, b) in binaries.iter().enumerate() {
        let log = fs::read_to_string(share.join(format!("out/{i}.log"))).unwrap_or_default();
        for line in log.lines() {
            if let Some(rest) = line.strip_prefix("test result: ") {
                run.passed += count_of(rest, "passed");
                run.failed += count_of(rest, "failed");
            }
        }
        let rc = fs::read_to_string(share.join(format!("out/{i}.rc"))).unwrap_or_default();
        if rc.trim() != "0" {
            run.failed_binaries
                .push(format!("{} (exit {})", b.name, rc.trim()));
        }
    }
    println!(
        "vmtest {}: {} passed, {} failed (boot {:.1}s, suite {:.0}s, qemu {wall:.0}s in all); logs in {}",
        k.version,
        run.passed,
        run.failed,
        run.boot_secs,
        run.suite_secs,
        share.join("out").display()
    );
    Ok(run)
}

fn wait_for_socket(path: &Path) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("virtiofsd did not create {}", path.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A busybox initramfs: busybox, the modules the root needs (decompressed: busybox insmod
/// reads plain .ko), and /init. Rebuilt each run; it is a few MB and takes well under a second.
fn build_initramfs(k: &Kernel, staging: &Path, out: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(staging);
    for d in [
        "bin", "modules", "proc", "sys", "dev", "lower", "upper", "newroot",
    ] {
        fs::create_dir_all(staging.join(d))?;
    }
    fs::copy(BUSYBOX, staging.join("bin/busybox"))?;
    let mut order = String::new();
    for m in module_load_order(k)? {
        let src = k.modules().join(&m);
        let file = Path::new(&m)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module file name")?;
        let plain = file
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .trim_end_matches(".gz")
            .to_owned();
        let data = match Path::new(file).extension().and_then(|e| e.to_str()) {
            Some("xz") => decompress("xz", &src)?,
            Some("zst") => decompress("zstd", &src)?,
            Some("gz") => decompress("gzip", &src)?,
            _ => fs::read(&src)?,
        };
        fs::write(staging.join("modules").join(&plain), data)?;
        order.push_str(&plain);
        order.push('\n');
    }
    fs::write(staging.join("modules/order"), order)?;
    let init = staging.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    // busybox cpio takes the file list on stdin, parents before children.
    let mut list = Vec::new();
    list_tree(staging, Path::new("."), &mut list)?;
    let mut cpio = Command::new(BUSYBOX)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("busybox cpio")?;
    {
        let mut stdin = cpio.stdin.take().context("cpio stdin")?;
        for p in &list {
            writeln!(stdin, "{}", p.display())?;
        }
    }
    let status = cpio.wait()?;
    if !status.success() {
        bail!("busybox cpio failed: {status}");
    }
    Ok(())
}

fn decompress(tool: &str, path: &Path) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("{tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), out.status);
    }
    Ok(out.stdout)
}

fn list_tree(base: &Path, rel: &Path, list: &mut Vec<PathBuf>) -> Result<()> {
    list.push(rel.to_path_buf());
    let full = base.join(rel);
    if full.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(&full)?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        entries.sort();
        for e in entries {
            list_tree(base, &rel.join(e), list)?;
        }
    }
    Ok(())
}

/// Module files (relative to lib/modules/<version>) to insmod, dependencies first, from
/// depmod's modules.dep ("kernel/fs/fuse/virtiofs.ko: kernel/.../virtio.ko ..."; modprobe
/// loads a line's dependencies last to first).
fn module_load_order(k: &Kernel) -> Result<Vec<String>> {
    let dep = fs::read_to_string(k.modules().join("modules.dep"))?;
    let builtin = fs::read_to_string(k.modules().join("modules.builtin")).unwrap_or_default();
    let stem = |p: &str| -> String {
        let file = p.rsplit('/').next().unwrap_or(p);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let mut order: Vec<String> = Vec::new();
    for want in INITRAMFS_MODULES {
        let line = dep.lines().find_map(|l| {
            let (module, deps) = l.split_once(':')?;
            (stem(module) == want).then_some((module, deps))
        });
        let Some((module, deps)) = line else {
            if builtin.lines().any(|l| stem(l) == want) {
                continue;
            }
            bail!("kernel {} has no module {want}, built in or not", k.version);
        };
        for m in deps.split_whitespace().rev().chain([module]) {
            if !order.iter().any(|o| o == m) {
                order.push(m.to_owned());
            }
        }
    }
    Ok(order)
}

/// Stage one, in the initramfs (busybox sh): the host's root read-only over virtiofs under a
/// tmpfs overlay, the share at /vmtest inside it, then stage two from the share as PID 1.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "vmtest-init: $*"; echo o > /proc/sysrq-trigger; sleep 30; }
for m in $(cat /modules/order); do insmod "/modules/$m" || fail "insmod $m failed"; done
mount -t virtiofs -o ro hostroot /lower || fail "mounting the host root failed"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot \
    || fail "overlay failed"
mkdir -p /newroot/vmtest
mount -t virtiofs share /newroot/vmtest || fail "mounting the share failed"
umount /proc /sys /dev
exec switch_root /newroot /vmtest/guest.sh
"#;

/// Single-quoted for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn quote_path(p: &Path) -> Result<String> {
    p.to_str()
        .map(quote)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The guest gets a fresh tmpfs on /tmp (the tests' scratch space, in guest memory), which
/// would hide a checkout or target folder a user cloned under the host's /tmp (`cd: can't cd to
/// /tmp/.../tests` in every binary). For each top-level entry of /tmp that one of `paths` lies
/// in: the lines that keep the host's /tmp reachable before the tmpfs goes on, and those that
/// bind that entry back onto the new /tmp after. Both empty when nothing is under /tmp.
fn host_tmp_binds(paths: impl Iterator<Item = PathBuf>) -> Result<(String, String)> {
    let mut entries: Vec<PathBuf> = paths
        .filter_map(|p| {
            let rest = p.strip_prefix("/tmp").ok()?;
            let first = rest.components().next()?;
            Some(Path::new("/tmp").join(first))
        })
        .collect();
    entries.sort();
    entries.dedup();
    if entries.is_empty() {
        return Ok((String::new(), String::new()));
    }
    let keep = "mkdir -p /run/vmtest-host-tmp && mount --bind /tmp /run/vmtest-host-tmp\n";
    let mut restore =
        String::from("# The checkout (or its target folder) lives under the host's /tmp.\n");
    for e in &entries {
        let name = e.strip_prefix("/tmp").unwrap_or(e);
        let from = Path::new("/run/vmtest-host-tmp").join(name);
        restore.push_str(&format!(
            "mkdir -p {to} && mount --bind {from} {to}\n",
            to = quote_path(e)?,
            from = quote_path(&from)?,
        ));
    }
    restore.push_str("umount /run/vmtest-host-tmp\n");
    Ok((keep.to_owned(), restore))
}

/// Stage two, PID 1 in the host's root (its /bin/sh): what a systemd host mounts, the guest
/// kernel's modules where modprobe looks, then each test binary in its package's folder with
/// the environment `cargo test` gives it.
fn guest_script(k: &Kernel, binaries: &[TestBinary], test_args: &[String]) -> Result<String> {
    let test_args = test_args
        .iter()
        .map(|a| quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let home = home()?;
    let path = env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let modules = k.modules();
    let keep_tmp = host_tmp_binds(
        [crate::workspace_root(), target_dir()?]
            .into_iter()
            .chain(binaries.iter().flat_map(|b| [b.exe.clone(), b.cwd.clone()])),
    )?;
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!/bin/sh
# Written by `cargo xtask vmtest` for kernel {version}.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
{keep_tmp}mount -t tmpfs tmpfs /tmp
{restore_tmp}# Pure cgroup v2 where systemd puts it, with nsdelegate, and the controllers systemd enables.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
echo '+cpu +memory +pids' > /sys/fs/cgroup/cgroup.subtree_control
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t securityfs securityfs /sys/kernel/security
mount -t debugfs debugfs /sys/kernel/debug
# The kernel's own modules where modprobe (from the host root) looks for them.
mkdir -p /lib/modules/{version}
mount --bind {modules} /lib/modules/{version}
ip link set lo up
# A host has an address besides loopback, and glibc's getaddrinfo (AI_ADDRCONFIG) asks for
# IPv4 only then (tests/tests/dns.rs runs getent): the guest has no NIC, so a dummy one.
ip link add eth0 type dummy && ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up
hostname vmtest
# Quiet while booting; from here on the console shows warnings and backtraces (a lockup's).
echo 5 > /proc/sys/kernel/printk
# A CPU that loops in the kernel with interrupts mostly off escapes the soft-lockup detector
# but not RCU's (seen: a vCPU trapping on int3 in syscall_trace_enter for 500 s): panic at
# its report too, after 60 s as for lockups.
echo 60 > /sys/module/rcupdate/parameters/rcu_cpu_stall_timeout
echo 1 > /proc/sys/kernel/panic_on_rcu_stall
export HOME={home} PATH={path} AGENTWATCH_IN_VM={version} RUST_BACKTRACE=1
export AGENTWATCH_TEST_TIME_SCALE={TIME_SCALE}
boot=$(cut -d' ' -f1 /proc/uptime)
echo "vmtest: kernel $(uname -r), userland up at ${{boot}}s; LSMs: $(cat /sys/kernel/security/lsm)"
"#,
        version = k.version,
        keep_tmp = keep_tmp.0,
        restore_tmp = keep_tmp.1,
        modules = quote_path(&modules)?,
        home = quote_path(&home)?,
        path = quote(&path),
    ));
    for (i, b) in binaries.iter().enumerate() {
        let name = quote(&b.name);
        s.push_str(&format!(
            r#"echo "vmtest: [{n}/{total}] "{name}" at $(cut -d' ' -f1 /proc/uptime)s"
(cd {cwd} && CARGO_MANIFEST_DIR={cwd} {exe} {test_args}; echo $? > /vmtest/out/{i}.rc) 2>&1 | tee /vmtest/out/{i}.log
"#,
            n = i + 1,
            total = binaries.len(),
            cwd = quote_path(&b.cwd)?,
            exe = quote_path(&b.exe)?,
        ));
    }
    s.push_str(
        r#"echo "boot $boot end $(cut -d' ' -f1 /proc/uptime)" > /vmtest/done
sync
echo o > /proc/sysrq-trigger
sleep 30
"#,
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_under_tmp_is_bound_back_onto_the_guests_tmpfs() {
        let (keep, restore) = host_tmp_binds(
            [
                "/tmp/clone/target/debug/deps/egress-1",
                "/tmp/clone/tests",
                "/tmp/t2/debug",
                "/work/main",
            ]
            .into_iter()
            .map(PathBuf::from),
        )
        .expect("binds");
        assert_eq!(
            keep,
            "mkdir -p /run/vmtest-host-tmp && mount --bind /tmp /run/vmtest-host-tmp\n"
        );
        let binds: Vec<&str> = restore.lines().filter(|l| l.contains("--bind")).collect();
        assert_eq!(
            binds,
            [
                "mkdir -p '/tmp/clone' && mount --bind '/run/vmtest-host-tmp/clone' '/tmp/clone'",
                "mkdir -p '/tmp/t2' && mount --bind '/run/vmtest-host-tmp/t2' '/tmp/t2'",
            ]
        );
        assert!(
            restore.ends_with("umount /run/vmtest-host-tmp\n"),
            "{restore}"
        );
    }

    #[test]
    fn nothing_under_tmp_changes_nothing() {
        let binds = host_tmp_binds(["/work/main", "/root/t"].into_iter().map(PathBuf::from));
        assert_eq!(binds.expect("binds"), (String::new(), String::new()));
    }
}
