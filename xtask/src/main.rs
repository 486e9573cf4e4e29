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
use serde_json::{Value, json};

mod chaos;
mod soak;

mod vmtest;

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
    /// Set up, then run the benchmarks (release build, needs root): writes BENCHMARKS.md and
    /// target/bench.json.
    Bench {
        /// A small version of every section (about two minutes; CI runs it so the benchmarks
        /// never rot). Writes target/BENCHMARKS.quick.md instead of BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
        /// Only this section (egress, syscalls, workload, containment, events, scale,
        /// gateway): writes target/BENCHMARKS.SECTION.md and target/bench.SECTION.json,
        /// leaving BENCHMARKS.md as it is.
        #[arg(long)]
        section: Option<String>,
    },
    /// Set up, then SIGKILL the daemon ROUNDS times inside reloads, guards, kill switches and
    /// DNS answers while an agent probes: zero wrong verdicts, nothing leaked (needs root).
    Chaos {
        #[arg(long, default_value_t = 50)]
        rounds: usize,
    },
    /// Set up, then run the privileged suite in QEMU guests with Debian's kernels (TCG, cgroup2
    /// at /sys/fs/cgroup with nsdelegate). The host's own kernel is `cargo xtask test`.
    Vmtest {
        /// Kernel series (6.1, 6.12) or exact Debian version (6.1.0-47-cloud-amd64); repeat
        /// for several. Default: 6.1.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Every kernel series of the matrix.
        #[arg(long, conflicts_with = "kernels")]
        all: bool,
        /// Minutes after which each guest is stopped and counted as failed.
        #[arg(long, default_value_t = 120)]
        timeout_minutes: u64,
        /// Only these test files of tests/tests (e.g. `--test egress`); repeat for several.
        /// Default: every test binary of the workspace.
        #[arg(long = "test", value_name = "FILE")]
        tests: Vec<String>,
        /// Passed to each test binary (a name filter, `--exact`, ...), after `--`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Set up, then run a real daemon under mixed load for MINUTES (release build), sample
    /// its RSS, CPU, fds, threads and map entries every second into target/soak/ (CSV, PNG,
    /// report), and fail if any of them grows (needs root).
    /// With --launches/--reloads instead: a release daemon's RSS and fds before and after that
    /// many agent launches and config reloads (tests/tests/faults.rs, ignored there), failing if
    /// a descriptor leaks or RSS grows by more than 2 MiB.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Agent launches for the footprint run (e.g. 10000).
        #[arg(long)]
        launches: Option<u16>,
        /// Config reloads for the footprint run (e.g. 1000).
        #[arg(long)]
        reloads: Option<u16>,
    },
    /// Build the fuzz targets (cargo-fuzz, nightly) and run each for a bounded time; fails on
    /// a crash and leaves the crashing input in fuzz/artifacts/TARGET/.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only this target (default: every one in fuzz/fuzz_targets/).
        target: Option<String>,
    },
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
        Cmd::Bench { quick, section } => setup().and_then(|()| bench(quick, section.as_deref())),
        Cmd::Chaos { rounds } => setup().and_then(|()| chaos::chaos(rounds)),
        Cmd::Vmtest {
            kernels,
            all,
            timeout_minutes,
            tests,
            test_args,
        } => setup().and_then(|()| {
            vmtest::vmtest(&vmtest::Args {
                kernels,
                all,
                timeout: std::time::Duration::from_secs(timeout_minutes * 60),
                tests,
                test_args,
            })
        }),
        Cmd::Soak {
            minutes,
            launches: None,
            reloads: None,
        } => setup().and_then(|()| soak::soak(minutes)),
        Cmd::Soak {
            launches, reloads, ..
        } => setup()
            .and_then(|()| soak::footprint(launches.unwrap_or(10_000), reloads.unwrap_or(1_000))),
        Cmd::Fuzz { seconds, target } => fuzz_setup().and_then(|()| fuzz(seconds, target)),
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
    cargo_env(args, &[])
}

/// `cargo ARGS` in the workspace with `vars` set.
fn cargo_env(args: &[&str], vars: &[(&str, &str)]) -> Result<()> {
    sh(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .envs(vars.iter().copied())
            .current_dir(workspace_root()),
    )
}

fn setup() -> Result<()> {
    let start = Instant::now();
    cargo_bin_on_path()?;
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    mounts()?;
    debian_packages()?;
    kubernetes_validate()?;
    botocore()?;
    sdks()?;
    eprintln!("xtask: setup done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo install` puts bpf-linker and cargo-fuzz in ~/.cargo/bin; make sure this process and
/// its children find them.
fn cargo_bin_on_path() -> Result<()> {
    let cargo_bin = home()?.join(".cargo/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == cargo_bin) {
        let joined = env::join_paths(std::iter::once(cargo_bin).chain(env::split_paths(&path)))?;
        // SAFETY: single-threaded at this point; no other thread reads the environment.
        unsafe { env::set_var("PATH", joined) };
    }
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

/// How setup finds out whether a Debian package's part the tests use is there.
enum Present {
    /// A program on PATH.
    Bin(&'static str),
    /// A file at this path: where the tests look for it (tests/src/prom.rs), so another
    /// program of the same name elsewhere on PATH does not count.
    File(&'static str),
    /// A Python module of the system's python3 (Debian splits `ensurepip`, which `python3 -m
    /// venv` needs, into python3-venv).
    PyModule(&'static str),
}

/// Debian packages the tests use, each with what shows it is installed: iproute2 (`ip`,
/// network namespaces), util-linux (`setpriv`, to run a client as an unprivileged user),
/// prometheus (`prometheus` and `promtool`, for tests/tests/operators.rs: a real Prometheus
/// scrapes a daemon, promtool checks the scrape and the alerting rules), python3-venv (the
/// virtualenv kubernetes-validate goes into, and the one the benchmarks' `pip install` uses),
/// systemd (`systemd-analyze verify`, which checks the units in deploy/systemd/ without a
/// running systemd) and nftables (`nft`: the benchmarks compare the egress hooks with an
/// nftables table holding the same allow-list).
const DEBIAN_PACKAGES: [(Present, &str); 8] = [
    (Present::Bin("ip"), "iproute2"),
    (Present::Bin("setpriv"), "util-linux"),
    (Present::File("/usr/bin/prometheus"), "prometheus"),
    (Present::File("/usr/bin/promtool"), "prometheus"),
    (Present::PyModule("ensurepip"), "python3-venv"),
    (Present::File("/usr/bin/systemd-analyze"), "systemd"),
    (Present::File("/usr/sbin/nft"), "nftables"),
    // The bench's gateway section compares the gateway with nginx as the same
    // credential-injecting reverse proxy.
    (Present::File("/usr/sbin/nginx"), "nginx"),
];

/// The system's own Python, not whatever a version manager (pyenv, conda) put first on PATH:
/// python3-venv completes exactly this one.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn present(p: &Present) -> bool {
    match p {
        Present::Bin(bin) => output(Command::new("which").arg(bin)).is_some(),
        Present::File(path) => Path::new(path).exists(),
        Present::PyModule(module) => output(
            Command::new(SYSTEM_PYTHON)
                .arg("-c")
                .arg(format!("import {module}")),
        )
        .is_some(),
    }
}

fn debian_packages() -> Result<()> {
    install_debian_packages(&DEBIAN_PACKAGES)
}

/// Installs the packages whose part is missing (none: nothing runs).
fn install_debian_packages(packages: &[(Present, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for (p, pkg) in packages {
        if !present(p) && !missing.contains(pkg) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; install them as root");
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    sh(Command::new("apt-get").arg("update"))?;
    // No recommends: prometheus recommends prometheus-node-exporter, another host service the
    // tests do not use. Noninteractive: setup runs in CI without a terminal.
    sh(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing the Debian packages {missing:?}"))?;
    // Services the packages enable and start that the tests and the bench run their own of.
    for service in ["prometheus", "nginx"] {
        if missing.contains(&service) {
            disable_system_service(service)?;
        }
    }
    for (p, pkg) in packages {
        if !present(p) {
            bail!(
                "installed the Debian package {pkg}, but its part the tests need is still missing"
            );
        }
    }
    Ok(())
}

/// Debian's prometheus and nginx packages enable (and, where services may start, start) a
/// system-wide service: Prometheus on :9090 scraping this host, nginx on :80. The tests and the
/// bench start their own on loopback; a machine set up for them should not keep a second one
/// running.
fn disable_system_service(name: &str) -> Result<()> {
    let systemd_runs = Path::new("/run/systemd/system").exists();
    let unit = format!("{name}.service");
    if systemd_runs {
        sh(Command::new("systemctl").args(["disable", "--now", &unit])).with_context(|| {
            format!("stopping and disabling the {name} service the package started")
        })?;
    } else {
        // No systemd as init (a container): the package's SysV script is what could run.
        // `stop` of a service that is not running succeeds.
        sh(Command::new(format!("/etc/init.d/{name}")).arg("stop"))
            .with_context(|| format!("stopping the {name} service the package started"))?;
        sh(Command::new("update-rc.d").args([name, "disable"]))
            .with_context(|| format!("disabling the {name} SysV service"))?;
        // The package also enabled its systemd unit (symlinks only): remove them too, so a
        // later boot with systemd does not start it.
        sh(Command::new("systemctl").args(["disable", &unit]))
            .with_context(|| format!("disabling the {name} systemd unit"))?;
    }
    eprintln!("xtask: stopped and disabled the system {name} service; the tests run their own");
    Ok(())
}

/// kubernetes-validate release the tests validate deploy/kubernetes/ with (it bundles the
/// Kubernetes schemas, so no network at test time).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// The virtualenv setup installs Python tools into: the project's own, beside bpf-linker's
/// LLVM, never the system's Python. tests/src/prom.rs looks for it here.
fn venv_dir() -> Result<PathBuf> {
    Ok(home()?.join(".cache/agentwatch/venv"))
}

/// kubernetes-validate from PyPI into the project's virtualenv, pinned; a second run only asks
/// the installed one its version.
fn kubernetes_validate() -> Result<()> {
    let venv = venv_dir()?;
    let bin = venv.join("bin/kubernetes-validate");
    let installed = output(Command::new(&bin).arg("--version"));
    if installed.as_deref().map(str::trim) == Some(KUBERNETES_VALIDATE_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
        venv.display()
    );
    let pip = venv.join("bin/pip");
    if !pip.exists() {
        sh(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv)).with_context(|| {
            format!(
                "creating a virtualenv at {} (needs Debian's python3-venv)",
                venv.display()
            )
        })?;
    }
    sh(Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!(
            "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
        )))
    .with_context(|| {
        format!(
            "installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI into {}",
            venv.display()
        )
    })?;
    let now = output(Command::new(&bin).arg("--version"));
    if now.as_deref().map(str::trim) != Some(KUBERNETES_VALIDATE_VERSION) {
        bail!(
            "{} --version says {now:?} after installing {KUBERNETES_VALIDATE_VERSION}",
            bin.display()
        );
    }
    Ok(())
}

/// botocore release the gateway tests check AWS signatures with: an independent signer (the
/// one boto3 and the AWS CLI use), not the code under test.
const BOTOCORE_VERSION: &str = "1.44.18";

/// botocore from PyPI into the project's virtualenv (made by `kubernetes_validate`), pinned.
fn botocore() -> Result<()> {
    let venv = venv_dir()?;
    let python = venv.join("bin/python");
    let version = || {
        output(Command::new(&python).args(["-c", "import botocore; print(botocore.__version__)"]))
    };
    if version().as_deref().map(str::trim) == Some(BOTOCORE_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing botocore {BOTOCORE_VERSION} into {}",
        venv.display()
    );
    sh(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("botocore=={BOTOCORE_VERSION}")))
    .with_context(|| {
        format!(
            "installing botocore {BOTOCORE_VERSION} from PyPI into {}",
            venv.display()
        )
    })?;
    let now = version();
    if now.as_deref().map(str::trim) != Some(BOTOCORE_VERSION) {
        bail!("botocore says {now:?} after installing {BOTOCORE_VERSION}");
    }
    Ok(())
}

/// The official API SDKs the gateway tests run inside an agent (tests/tests/sdks.rs), pinned:
/// they must work unchanged through the gateway with only their base-URL and key variables set.
const SDKS: [(&str, &str); 2] = [("openai", "3.63.0"), ("anthropic", "2.17.0")];

/// Where [`sdks`] installs them: a virtualenv of its own under target/, since the agent that
/// imports them runs as its own uid, which cannot enter root's home (the other virtualenv's
/// place); target/ is where the agents already run aw-probe from. tests/src/lib.rs looks here.
fn sdk_venv_dir() -> PathBuf {
    workspace_root().join("target/sdk-venv")
}

/// The SDKs from PyPI into [`sdk_venv_dir`], pinned; a second run only asks their versions.
fn sdks() -> Result<()> {
    let venv = sdk_venv_dir();
    let python = venv.join("bin/python");
    let probe = SDKS
        .iter()
        .map(|(m, _)| format!("import {m}; print({m}.__version__)"))
        .collect::<Vec<_>>()
        .join("; ");
    let want = SDKS.iter().map(|(_, v)| *v).collect::<Vec<_>>().join("\n");
    let versions = || output(Command::new(&python).args(["-c", &probe]));
    if versions().as_deref().map(str::trim) == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!("xtask: installing {SDKS:?} into {}", venv.display());
    if !python.exists() {
        sh(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv)).with_context(|| {
            format!(
                "creating a virtualenv at {} (needs Debian's python3-venv)",
                venv.display()
            )
        })?;
    }
    sh(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(SDKS.iter().map(|(m, v)| format!("{m}=={v}"))))
    .with_context(|| format!("installing {SDKS:?} from PyPI into {}", venv.display()))?;
    let now = versions();
    if now.as_deref().map(str::trim) != Some(want.as_str()) {
        bail!("the SDKs say {now:?} after installing {SDKS:?}");
    }
    Ok(())
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
    // The fuzz crate is outside the workspace (it builds only under cargo-fuzz): its own check.
    cargo(&["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"])?;
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

/// The benchmark sections of issue 11, in the order BENCHMARKS.md shows them: the test in
/// tests/tests/bench.rs and the heading.
const SECTIONS: [(&str, &str); 7] = [
    ("egress", "1. Egress hook cost"),
    ("syscalls", "2. Syscall monitor cost"),
    ("workload", "3. A real agent's workload"),
    ("containment", "4. Containment"),
    ("events", "5. Events and the trail"),
    ("scale", "6. Scale"),
    ("gateway", "7. API gateway"),
];

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs every section (one `cargo test` of tests/tests/bench.rs each, so one that fails does
/// not stop the others), then renders what they wrote. Fails if a section failed or produced
/// no numbers.
fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load BPF programs and make cgroups: run them as root");
    }
    let sections: Vec<(&str, &str)> = match only {
        None => SECTIONS.to_vec(),
        Some(name) => {
            let Some(s) = SECTIONS.iter().find(|(key, _)| *key == name) else {
                let keys: Vec<&str> = SECTIONS.iter().map(|(key, _)| *key).collect();
                bail!("no bench section {name:?}; the sections are {keys:?}");
            };
            vec![*s]
        }
    };
    let mut command = String::from("cargo xtask bench");
    if quick {
        command.push_str(" --quick");
    }
    if let Some(name) = only {
        command.push_str(&format!(" --section {name}"));
    }
    let command = command.as_str();
    let started = Instant::now();
    cargo(&["build", "--release", "--bins"])?;
    let target = target_dir();
    fs::create_dir_all(&target)?;
    let lines_file = target.join("bench-lines.jsonl");
    let _ = fs::remove_file(&lines_file);
    let bench_exe = bench_executable()?;
    let mut seconds = Vec::new();
    let mut failed = Vec::new();
    for &(key, title) in &sections {
        eprintln!("xtask: bench section {title}");
        let t = Instant::now();
        let ok = Command::new(&bench_exe)
            .args([
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "--exact",
                key,
            ])
            .env("AGENTWATCH_BENCH_OUT", &lines_file)
            .env("AGENTWATCH_BENCH_QUICK", if quick { "1" } else { "0" })
            // Where `cargo test` runs a test: its package's folder.
            .current_dir(workspace_root().join("tests"))
            .status()
            .with_context(|| format!("running {}", bench_exe.display()))?
            .success();
        seconds.push(t.elapsed().as_secs_f64());
        if !ok {
            failed.push(key);
        }
    }
    let records: Vec<Value> = fs::read_to_string(&lines_file)
        .unwrap_or_default()
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading the sections' results")?;
    let total = started.elapsed().as_secs_f64();
    let host = Host::read(command, quick, total);
    let json_path = match only {
        Some(name) => target.join(format!("bench.{name}.json")),
        None => target.join("bench.json"),
    };
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&bench_json(&host, &records, &sections, &seconds))?,
    )?;
    let md = render_markdown(&host, &records, &sections, &seconds);
    let md_path = match (only, quick) {
        (Some(name), _) => target.join(format!("BENCHMARKS.{name}.md")),
        (None, true) => target.join("BENCHMARKS.quick.md"),
        (None, false) => workspace_root().join("BENCHMARKS.md"),
    };
    fs::write(&md_path, md)?;
    eprintln!(
        "xtask: bench took {total:.0}s; wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    let empty: Vec<&str> = sections
        .iter()
        .map(|(key, _)| *key)
        .filter(|key| {
            !records
                .iter()
                .any(|r| r["section"] == *key && r["kind"] == "row")
        })
        .collect();
    if !failed.is_empty() || !empty.is_empty() {
        bail!("bench sections failed: {failed:?}; sections without numbers: {empty:?}");
    }
    Ok(())
}

/// Builds tests/tests/bench.rs (release) and returns its executable: the sections then run it
/// directly, one after the other, without a cargo run (and its build scripts) between them.
fn bench_executable() -> Result<PathBuf> {
    let out = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--release",
            "--package",
            "agentwatch-tests",
            "--test",
            "bench",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("building the benchmarks")?;
    if !out.status.success() {
        bail!("building the benchmarks failed: {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "bench")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no executable for tests/tests/bench.rs")
}

/// What BENCHMARKS.md says about the machine and the run.
struct Host {
    command: String,
    quick: bool,
    kernel: String,
    cpus: usize,
    cpu_model: String,
    date: String,
    total_seconds: f64,
}

impl Host {
    fn read(command: &str, quick: bool, total_seconds: f64) -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            command: command.into(),
            quick,
            kernel: output(Command::new("uname").arg("-r"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            date: output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            total_seconds,
        }
    }
}

fn bench_json(host: &Host, records: &[Value], sections: &[(&str, &str)], seconds: &[f64]) -> Value {
    let sections: serde_json::Map<String, Value> = sections
        .iter()
        .zip(seconds)
        .map(|((key, title), secs)| {
            let of = |kind: &str| -> Vec<Value> {
                records
                    .iter()
                    .filter(|r| r["section"] == *key && r["kind"] == kind)
                    .cloned()
                    .collect()
            };
            (
                (*key).to_owned(),
                json!({"title": title, "seconds": secs, "rows": of("row"),
                    "notes": of("note"), "targets": of("target")}),
            )
        })
        .collect();
    json!({"command": host.command, "quick": host.quick, "kernel": host.kernel,
        "cpus": host.cpus, "cpu_model": host.cpu_model, "date": host.date,
        "total_seconds": host.total_seconds, "sections": sections})
}

/// A Markdown table cell: no pipes or line breaks inside.
fn cell(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.replace('|', "\\|").replace('\n', " ")
}

fn render_markdown(
    host: &Host,
    records: &[Value],
    sections: &[(&str, &str)],
    seconds: &[f64],
) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "# agentwatch benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `{}` ({}) on {}: kernel {}, {} CPUs ({}), {:.0} s in all.{}\n",
        host.command,
        if host.quick {
            "quick: fewer rounds, smaller sizes"
        } else {
            "full run"
        },
        host.date,
        host.kernel,
        host.cpus,
        host.cpu_model,
        host.total_seconds,
        if host.quick {
            ""
        } else {
            " Absolute times drift between runs and machines; the ratios inside one run are what to quote."
        }
    );
    let targets: Vec<&Value> = records.iter().filter(|r| r["kind"] == "target").collect();
    let _ = writeln!(md, "## Summary: the targets of issue 11\n");
    let _ = writeln!(
        md,
        "| section | target | measured | standing |\n| --- | --- | --- | --- |"
    );
    for &(key, title) in sections {
        for t in targets.iter().filter(|t| t["section"] == key) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                title.split_once(". ").map_or(title, |(_, t)| t),
                cell(&t["target"]),
                cell(&t["measured"]),
                if t["met"] == true { "met" } else { "missed" }
            );
        }
    }
    md.push('\n');
    for ((key, title), secs) in sections.iter().zip(seconds) {
        let _ = writeln!(md, "## {title}\n");
        let rows: Vec<&Value> = records
            .iter()
            .filter(|r| r["section"] == *key && r["kind"] == "row")
            .collect();
        if rows.is_empty() {
            let _ = writeln!(
                md,
                "No numbers: the section failed (see the run's output).\n"
            );
        }
        let mut tables: Vec<&str> = Vec::new();
        for r in &rows {
            let t = r["table"].as_str().unwrap_or_default();
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
        for t in tables {
            let mut of_table = rows.iter().filter(|r| r["table"] == t).peekable();
            let Some(first) = of_table.peek() else {
                continue;
            };
            let columns: Vec<String> = first["columns"]
                .as_array()
                .map(|c| c.iter().map(cell).collect())
                .unwrap_or_default();
            let _ = writeln!(md, "{t}:\n");
            let _ = writeln!(md, "| {} |", columns.join(" | "));
            let _ = writeln!(md, "|{}", " --- |".repeat(columns.len()));
            for r in of_table {
                let cells: Vec<String> = r["cells"]
                    .as_array()
                    .map(|c| c.iter().map(cell).collect())
                    .unwrap_or_default();
                let _ = writeln!(md, "| {} |", cells.join(" | "));
            }
            md.push('\n');
        }
        for n in records
            .iter()
            .filter(|r| r["section"] == *key && r["kind"] == "note")
        {
            let _ = writeln!(md, "{}\n", n["text"].as_str().unwrap_or_default());
        }
        let _ = writeln!(md, "_Section run time: {secs:.0} s._\n");
    }
    md
}

/// cargo-fuzz release `setup` installs (the one measured here: about 2.5 minutes to build on a
/// loaded 2-core machine).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for `cargo xtask fuzz`; a second setup only asks the installed one its version.
fn cargo_fuzz() -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a few minutes)");
    sh(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]))
}

/// What `cargo xtask fuzz` needs of setup: the nightly toolchain (libFuzzer's sanitizer
/// flags) and cargo-fuzz. Not the rest (bpf-linker, mounts, Debian packages): the fuzz build
/// skips the eBPF object.
fn fuzz_setup() -> Result<()> {
    cargo_bin_on_path()?;
    nightly_rust_src()?;
    cargo_fuzz()
}

/// One target's run, as libFuzzer reported it.
struct FuzzRun {
    target: String,
    executed: Option<u64>,
    per_second: Option<u64>,
    /// Where libFuzzer wrote each crashing (or hanging, or leaking) input.
    crashes: Vec<String>,
    /// libFuzzer or cargo-fuzz failed.
    failed: bool,
}

/// Builds every fuzz target, then runs each (or only `only`) for `seconds`, one at a time in
/// one process (libFuzzer's default: `-jobs`/`-workers` would move its output into log
/// files). New inputs go to fuzz/work/TARGET/ (not checked in), the seeds are read from
/// fuzz/corpus/TARGET/, crashes land in fuzz/artifacts/TARGET/.
fn fuzz(seconds: u64, only: Option<String>) -> Result<()> {
    let fuzz_dir = workspace_root().join("fuzz");
    let mut targets: Vec<String> = fs::read_dir(fuzz_dir.join("fuzz_targets"))
        .context("listing fuzz/fuzz_targets")?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    targets.sort();
    if let Some(only) = only {
        if !targets.contains(&only) {
            bail!(
                "no fuzz target `{only}`; the targets are {}",
                targets.join(", ")
            );
        }
        targets = vec![only];
    }
    let cargo_fuzz = |command: &str, args: &[&str]| {
        let mut cmd = Command::new("cargo");
        // Release with debug assertions and overflow checks (cargo-fuzz's default), without
        // AddressSanitizer: the code fuzzed is safe Rust (its one unsafe read is checked for
        // length first), and without ASan the build is shorter and runs about twice as many
        // inputs a second. The same flags for `build` and `run`, or `run` builds again.
        // The library builds without the eBPF object (agentwatch/build.rs): nothing fuzzed
        // here loads kernel programs, and the fuzz build needs no bpf-linker.
        cmd.args(["+nightly", "fuzz", command, "--sanitizer", "none"])
            .args(args)
            .env("AYA_BUILD_SKIP", "1")
            .current_dir(&fuzz_dir);
        cmd
    };
    let start = Instant::now();
    sh(&mut cargo_fuzz("build", &[]))?;
    eprintln!(
        "xtask: fuzz targets built in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let mut runs = Vec::new();
    for target in &targets {
        runs.push(fuzz_one(&fuzz_dir, target, seconds, &cargo_fuzz)?);
    }
    println!(
        "fuzz: {:<14} {:>12} {:>8} crashes",
        "target", "inputs", "exec/s"
    );
    let shown = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    for r in &runs {
        println!(
            "fuzz: {:<14} {:>12} {:>8} {}{}",
            r.target,
            shown(r.executed),
            shown(r.per_second),
            r.crashes.len(),
            if r.failed && r.crashes.is_empty() {
                " (libFuzzer failed, see its log)"
            } else {
                ""
            }
        );
        for c in &r.crashes {
            println!("fuzz:   crash input: {c}");
        }
    }
    println!(
        "fuzz: {} target(s) in {:.1}s with the build",
        runs.len(),
        start.elapsed().as_secs_f64()
    );
    let bad: Vec<&str> = runs
        .iter()
        .filter(|r| r.failed || !r.crashes.is_empty())
        .map(|r| r.target.as_str())
        .collect();
    if !bad.is_empty() {
        bail!(
            "fuzzing found crashes in {} (reproduce with `cd fuzz && AYA_BUILD_SKIP=1 cargo +nightly fuzz run TARGET INPUT`)",
            bad.join(", ")
        );
    }
    Ok(())
}

fn fuzz_one(
    fuzz_dir: &Path,
    target: &str,
    seconds: u64,
    cargo_fuzz: &dyn Fn(&str, &[&str]) -> Command,
) -> Result<FuzzRun> {
    let work = fuzz_dir.join("work").join(target);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let log_path = fuzz_dir.join("work").join(format!("{target}.log"));
    let seeds = fuzz_dir.join("corpus").join(target);
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    let mut args: Vec<String> = vec![
        target.into(),
        work.display().to_string(),
        seeds.display().to_string(),
        "--".into(),
        format!("-max_total_time={seconds}"),
        "-print_final_stats=1".into(),
        // An input that takes this long is a hang worth a report (the default is 20 minutes).
        "-timeout=10".into(),
    ];
    if dict.exists() {
        args.push(format!("-dict={}", dict.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!(
        "xtask: fuzzing {target} for {seconds}s (log: {})",
        log_path.display()
    );
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    // libFuzzer prints a line per new input found: into the log, not the terminal.
    let status = cargo_fuzz("run", &args)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |key: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(key))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .next_back()
    };
    // After a crash there are no final stats: the last status line (`#N ...`) tells how far
    // it got.
    let last_status = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .next_back();
    let crashes: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| path.trim().to_owned())
        .collect();
    let failed = !status.success();
    if failed || !crashes.is_empty() {
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("xtask: {target} failed; the end of its log:");
        for l in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("  {l}");
        }
    }
    Ok(FuzzRun {
        target: target.to_owned(),
        executed: stat("stat::number_of_executed_units:").or(last_status),
        per_second: stat("stat::average_exec_per_sec:"),
        crashes,
        failed,
    })
}

/// `N` in "ok. N passed; M failed; ..." for `what` = "passed".
fn count_of(summary: &str, what: &str) -> u64 {
    summary
        .split([';', '.'])
        .filter_map(|part| part.trim().strip_suffix(what))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}
