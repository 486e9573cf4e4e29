//! Developer commands. `cargo xtask setup` makes a fresh machine ready (idempotent); `test`,
//! `run` and `lint` run setup first, so each is one command on a fresh machine.

use std::{
    env,
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install/prepare everything the build and tests need (idempotent).
    Setup,
    /// Set up, then build the release binary.
    Build,
    /// Set up, then run the demo (release build, as root), or `agentwatch ARGS` (e.g.
    /// `cargo xtask run -- run --config FILE` for the daemon).
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, lint, then run every test, the privileged ones included (needs root).
    Test,
    /// rustfmt check, clippy -D warnings on the host crates and, separately, on the eBPF crate.
    Lint,
    /// Set up, then run the benchmarks (release build) and print their numbers.
    Bench,
}

/// bpf-linker release that matches the nightly's LLVM (see kernel-and-toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => setup().and_then(|()| cargo(&["build", "--release"])),
        Cmd::Run { args } => setup().and_then(|()| run(&args)),
        Cmd::Test => setup().and_then(|()| lint()).and_then(|()| test()),
        Cmd::Lint => setup().and_then(|()| lint()),
        Cmd::Bench => setup().and_then(|()| bench()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// Runs a command, failing with its command line if it fails.
fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None if it cannot run or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(args: &[&str]) -> Result<()> {
    sh(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(workspace_root()),
    )
}

fn setup() -> Result<()> {
    let start = Instant::now();
    // bpf-linker goes to ~/.cargo/bin; make sure this process and its children find it.
    let cargo_bin = home()?.join(".cargo/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == cargo_bin) {
        let joined = env::join_paths(std::iter::once(cargo_bin).chain(env::split_paths(&path)))?;
        // SAFETY: single-threaded at this point; no other thread reads the environment.
        unsafe { env::set_var("PATH", joined) };
    }
    nightly_rust_src()?;
    bpf_linker()?;
    mounts()?;
    debian_packages()?;
    eprintln!("xtask: setup done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The eBPF crate builds core from source: nightly + rust-src.
fn nightly_rust_src() -> Result<()> {
    if output(Command::new("rustc").args(["+nightly", "--version"])).is_none() {
        eprintln!("xtask: installing the nightly toolchain");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: adding rust-src to nightly");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    Ok(PathBuf::from(s.trim()))
}

/// bpf-linker built against the nightly's own LLVM (`cargo install bpf-linker` alone fails to
/// find -lLLVM). A stamp records which LLVM it was built for, so a second setup is instant and
/// a nightly update rebuilds it.
fn bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let lib_dir = sysroot.join("lib");
    let llvm_lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let verbose =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in rustc +nightly -vV")?
        .to_owned();
    let cache = home()?.join(".cache/agentwatch");
    let stamp = cache.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} llvm {llvm_lib}\n");
    let works = output(Command::new("bpf-linker").arg("--version")).is_some();
    if works && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about a minute)"
    );
    // The linker keeps an rpath to this folder: it must stay (it is outside target/ on purpose).
    let prefix = cache.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm_lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&llvm_lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    sh(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix))?;
    fs::write(&stamp, want)?;
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn mounted(fstype: &str, at: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            l.split_once(" - ").is_some_and(|(left, right)| {
                right.split_whitespace().next() == Some(fstype)
                    && left.split_whitespace().nth(4) == Some(at)
            })
        })
    })
}

/// bpffs (pins) and tracefs (tracepoints) when missing.
fn mounts() -> Result<()> {
    for (fstype, at) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        if mounted(fstype, at) {
            continue;
        }
        if !is_root() {
            eprintln!("xtask: {fstype} is not mounted at {at} and this is not root: skipped");
            continue;
        }
        eprintln!("xtask: mounting {fstype} at {at}");
        fs::create_dir_all(at).ok();
        sh(Command::new("mount").args(["-t", fstype, fstype, at]))?;
    }
    Ok(())
}

/// Debian packages the tests use: iproute2 (`ip`, network namespaces) and util-linux
/// (`setpriv`, to run a client as an unprivileged user).
fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = [("ip", "iproute2"), ("setpriv", "util-linux")]
        .into_iter()
        .filter(|(bin, _)| output(Command::new("which").arg(bin)).is_none())
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; install them as root");
    }
    sh(Command::new("apt-get").arg("update"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing))
}

fn run(args: &[String]) -> Result<()> {
    cargo(&["build", "--release", "--bin", "agentwatch"])?;
    let bin = workspace_root().join("target/release/agentwatch");
    // No arguments: the demo, the whole story on this machine. With arguments: any command
    // (`cargo xtask run -- run --config FILE` runs the daemon).
    let args: Vec<&OsStr> = if args.is_empty() {
        vec![OsStr::new("demo")]
    } else {
        args.iter().map(OsStr::new).collect()
    };
    sh(Command::new(bin).args(args))
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // The eBPF crate only builds for the BPF target with nightly and build-std.
    sh(Command::new("cargo")
        .args([
            "+nightly",
            "clippy",
            "--package",
            "agentwatch-ebpf",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(workspace_root()))
}

fn test() -> Result<()> {
    if !is_root() && env::var("AGENTWATCH_SKIP_PRIVILEGED").as_deref() != Ok("1") {
        bail!(
            "the test suite includes privileged tests that need root (BPF, cgroups); run it as root, or set AGENTWATCH_SKIP_PRIVILEGED=1 to skip those on purpose"
        );
    }
    // Build every binary the end-to-end tests run (agentwatch, aw-probe) before they start.
    cargo(&["build", "--bins"])?;
    // A watchdog against hangs (a test waiting on a process that stays frozen): CI would
    // otherwise only stop at its own limit, with nothing said.
    let mut child = Command::new("timeout")
        .args(["--kill-after=30s", "40m"])
        .arg(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--no-fail-fast"])
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    // Pass the output through and add up libtest's per-binary results, so the run ends with
    // one line that says how many tests ran in all (the last binary alone may run none).
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count_of(rest, "passed");
                failed += count_of(rest, "failed");
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn bench() -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load BPF programs and make cgroups: run them as root");
    }
    cargo(&["build", "--release", "--bins"])?;
    cargo(&[
        "test",
        "--release",
        "--package",
        "agentwatch-tests",
        "--test",
        "bench",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
}

/// `N` in "ok. N passed; M failed; ..." for `what` = "passed".
fn count_of(summary: &str, what: &str) -> u64 {
    summary
        .split([';', '.'])
        .filter_map(|part| part.trim().strip_suffix(what))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}
