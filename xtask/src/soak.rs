//! `cargo xtask soak --minutes N`: a real daemon guarding four agents under mixed load for N
//! minutes (tests/tests/soak.rs drives it and samples it every second), then a verdict on each
//! sampled series: a least-squares slope over the second half of the run against a threshold.
//! Writes target/soak/{soak.csv, load.json, soak.png, report.md}; fails if a series grows or
//! the load met a wrong verdict.

use std::{
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use plotters::prelude::*;

use crate::{cargo_env, is_root, workspace_root};

/// How fast each series may grow (units per minute, over the second half of the run) and
/// still count as flat. Each is set above the noise a healthy daemon shows over a 5-minute
/// half and below what a leak of one unit per load event would give (the load launches about
/// 600 processes, 24 DNS lookups, 12 reloads, 5 breaker trips and 4 kills a minute).
fn threshold(series: &str) -> (f64, &'static str) {
    match series {
        // A least-squares slope over a window of T minutes turns a one-off step of h into
        // 1.5 h / T: the allocator taking one more 132 KiB arena chunk in a 5-minute half is
        // about 40 KiB/min. 64 KiB/min (90 MiB a day) stays above that, and still catches
        // a leak of about 100 bytes per launch.
        "rss_kib" => (64.0, "KiB/min"),
        // Per-second CPU is noisy (10 ms ticks, bursty load): its slope's standard error over a
        // 5-minute half is about 0.2 points/min. Work that grows with accumulated state (a
        // scan of a growing table) shows as a steady climb above 1 point/min.
        "cpu_pct" => (1.0, "%/min"),
        // Integers with transient extra (a control connection, a scrape, a blocking-pool
        // thread) at sample time: half a unit a minute is above that noise and far below one
        // leaked per reload (12/min) or per kill (4/min).
        "fds" | "threads" => (0.5, "/min"),
        // Map entries and learned addresses churn with the TTL (2 s) and the alternating
        // policies; one leaked entry per kill or reload would be 4-12/min. (LRU maps are
        // judged apart: see `bounded`.)
        _ => (1.0, "entries/min"),
    }
}

/// LRU maps (`lru_*` columns) evict their oldest entries once full: an LRU map that fills
/// holds stale entries but cannot grow past max_entries (its memory is preallocated), so its
/// growth is reported, not failed.
fn bounded(series: &str) -> bool {
    series.starts_with("lru_")
}

/// The series the plot shows (the per-map columns go into the report's table only).
const PLOTTED: [&str; 7] = [
    "rss_kib",
    "cpu_pct",
    "fds",
    "threads",
    "dns_learned",
    "map_entries",
    "lru_entries",
];

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `cargo xtask soak --launches N --reloads M`: the footprint test of tests/tests/faults.rs at
/// that size, release build; it prints RSS and fds before and after and the time taken.
pub fn footprint(launches: u16, reloads: u16) -> Result<()> {
    if !is_root() {
        bail!("the footprint run loads BPF programs and makes cgroups: run it as root");
    }
    cargo_env(&["build", "--release", "--bins"], &[])?;
    cargo_env(
        &[
            "test",
            "--release",
            "--package",
            "agentwatch-tests",
            "--test",
            "faults",
            "--",
            "--ignored",
            "--nocapture",
            "--exact",
            "memory_and_descriptors_stay_flat_across_10000_launches_and_1000_reloads",
        ],
        &[
            ("AGENTWATCH_FLAT_LAUNCHES", &launches.to_string()),
            ("AGENTWATCH_FLAT_RELOADS", &reloads.to_string()),
        ],
    )
}

pub fn soak(minutes: f64) -> Result<()> {
    if !is_root() {
        bail!("the soak loads BPF programs and makes cgroups: run it as root");
    }
    if !minutes.is_finite() || minutes <= 0.0 {
        bail!("--minutes must be above 0");
    }
    let out = target_dir().join("soak");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for f in ["soak.csv", "load.json", "soak.png", "report.md"] {
        let _ = fs::remove_file(out.join(f));
    }
    // Release build: the figures should be those of the binary people run.
    cargo_env(&["build", "--release", "--bins"], &[])?;
    let out_s = out.to_string_lossy().into_owned();
    // On Ctrl-C the test stops its load and removes its daemon, cgroups and pins itself (the
    // terminal's SIGINT reaches it too), then leaves a partial CSV analysed below.
    let run = cargo_env(
        &[
            "test",
            "--release",
            "--package",
            "agentwatch-tests",
            "--test",
            "soak",
            "--",
            "--ignored",
            "--nocapture",
            "--exact",
            "soak",
        ],
        &[
            ("AGENTWATCH_SOAK_MINUTES", &minutes.to_string()),
            ("AGENTWATCH_SOAK_OUT", &out_s),
        ],
    );
    let csv = out.join("soak.csv");
    if !csv.exists() {
        return run.context("the soak wrote no samples");
    }
    let data = Csv::read(&csv)?;
    let load = fs::read_to_string(out.join("load.json")).unwrap_or_default();
    let verdicts = analyse(&data)?;
    plot(&data, &verdicts, &out.join("soak.png"))?;
    let report = report(&data, &verdicts, &load, minutes);
    fs::write(out.join("report.md"), &report)?;
    println!("{report}");
    println!(
        "soak: wrote {}/{{soak.csv,soak.png,report.md}}",
        out.display()
    );
    run.context("the soak's load failed (see load.json's problems)")?;
    let grew: Vec<&str> = verdicts
        .iter()
        .filter(|v| !v.flat)
        .map(|v| v.series.as_str())
        .collect();
    if !grew.is_empty() {
        bail!("growing over the second half: {}", grew.join(", "));
    }
    Ok(())
}

/// The samples: one column per series, `t_s` first.
struct Csv {
    names: Vec<String>,
    rows: Vec<Vec<f64>>,
}

impl Csv {
    fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut lines = text.lines();
        let names: Vec<String> = lines
            .next()
            .context("empty CSV")?
            .split(',')
            .map(str::to_owned)
            .collect();
        let mut rows = Vec::new();
        for (i, l) in lines.enumerate() {
            let row: Vec<f64> = l
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}:{}: not numbers", path.display(), i + 2))?;
            // A row cut short by an interrupted run says nothing.
            if row.len() == names.len() {
                rows.push(row);
            }
        }
        if rows.len() < 10 {
            bail!("{}: only {} samples", path.display(), rows.len());
        }
        Ok(Self { names, rows })
    }

    fn column(&self, i: usize) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.rows.iter().map(move |r| (r[0], r[i]))
    }
}

struct Verdict {
    series: String,
    column: usize,
    start: f64,
    end: f64,
    min: f64,
    max: f64,
    /// Per minute, over the second half.
    slope: f64,
    /// Intercept at t = 0 s of the second half's line, for the plot.
    intercept: f64,
    threshold: f64,
    unit: &'static str,
    flat: bool,
}

/// Least squares y = a + b t: (a, b).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|(t, y)| (t - mt) * (y - my)).sum();
    let sxx: f64 = points.iter().map(|(t, _)| (t - mt) * (t - mt)).sum();
    let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - b * mt, b)
}

fn analyse(data: &Csv) -> Result<Vec<Verdict>> {
    let t_end = data.rows.last().map(|r| r[0]).context("no samples")?;
    let half = t_end / 2.0;
    let mut out = Vec::new();
    for (i, name) in data.names.iter().enumerate().skip(1) {
        // The first CPU sample has no interval before it.
        let all: Vec<(f64, f64)> = data
            .column(i)
            .filter(|(t, _)| name != "cpu_pct" || *t >= 1.0)
            .collect();
        let second: Vec<(f64, f64)> = all.iter().copied().filter(|(t, _)| *t >= half).collect();
        let (a, b) = fit(&second);
        let slope = b * 60.0;
        let (threshold, unit) = threshold(name);
        // Start and end as the mean of the first and last 10 samples: single samples of the
        // noisy series (CPU, transient fds) would say little.
        let mean = |s: &[(f64, f64)]| s.iter().map(|p| p.1).sum::<f64>() / s.len().max(1) as f64;
        out.push(Verdict {
            series: name.clone(),
            column: i,
            start: mean(&all[..all.len().min(10)]),
            end: mean(&all[all.len().saturating_sub(10)..]),
            min: all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
            max: all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
            slope,
            intercept: a,
            threshold,
            unit,
            flat: slope < threshold || bounded(name),
        });
    }
    Ok(out)
}

/// DejaVu Sans from the system, for the plot's text. The plot is drawn without text when it is
/// missing (no font is embedded in the repository).
fn font() -> bool {
    const PATHS: [&str; 2] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    PATHS.iter().any(|p| {
        fs::read(p).is_ok_and(|bytes| {
            // plotters keeps fonts for the life of the process; this one is read once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

fn plot(data: &Csv, verdicts: &[Verdict], path: &Path) -> Result<()> {
    let text = font();
    let root = BitMapBackend::new(path, (1400, 1400)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((4, 2));
    let t_end = data.rows.last().map_or(1.0, |r| r[0]);
    for (area, name) in areas.iter().zip(PLOTTED) {
        let Some(v) = verdicts.iter().find(|v| v.series == name) else {
            continue;
        };
        let points: Vec<(f64, f64)> = data.column(v.column).map(|(t, y)| (t / 60.0, y)).collect();
        // Zero-based y, so a flat series looks flat rather than zoomed into its noise.
        let top = if v.max > 0.0 { v.max * 1.1 } else { 1.0 };
        let mut b = ChartBuilder::on(area);
        b.margin(10);
        if text {
            b.caption(
                format!(
                    "{name}: {:+.2} {} (2nd half), {}",
                    v.slope,
                    v.unit,
                    verdict_text(v)
                ),
                ("sans-serif", 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(60);
        }
        let mut chart = b.build_cartesian_2d(0.0..t_end / 60.0, 0.0..top)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("minutes");
        } else {
            mesh.disable_mesh().x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        chart.draw_series(LineSeries::new(points, &BLUE))?;
        // The second half's fitted line, in red.
        let (t0, t1) = (t_end / 2.0, t_end);
        let line = [t0, t1].map(|t| (t / 60.0, v.intercept + v.slope / 60.0 * t));
        chart.draw_series(LineSeries::new(line, RED.stroke_width(2)))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn verdict_text(v: &Verdict) -> &'static str {
    if v.slope < v.threshold {
        "flat"
    } else if bounded(&v.series) {
        "fills (LRU, bounded)"
    } else {
        "GROWS"
    }
}

fn report(data: &Csv, verdicts: &[Verdict], load: &str, minutes: f64) -> String {
    let t_end = data.rows.last().map_or(0.0, |r| r[0]);
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# agentwatch soak: {minutes} min asked, {:.1} min sampled ({} samples)\n",
        t_end / 60.0,
        data.rows.len()
    );
    let _ = writeln!(
        r,
        "Slope: least squares over the second half of the run ({:.1}-{:.1} min), per minute. \
         Start/end: mean of the first/last 10 samples.\n",
        t_end / 120.0,
        t_end / 60.0
    );
    let _ = writeln!(
        r,
        "| series | start | end | min | max | slope | threshold | verdict |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for v in verdicts {
        let _ = writeln!(
            r,
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:+.3} {} | {} | {} |",
            v.series,
            v.start,
            v.end,
            v.min,
            v.max,
            v.slope,
            v.unit,
            v.threshold,
            verdict_text(v)
        );
    }
    let _ = writeln!(
        r,
        "\nPlot (soak.png): {} in blue over minutes, the second half's fitted line in red.\n",
        PLOTTED.join(", ")
    );
    let _ = writeln!(r, "Load (load.json):\n\n```json\n{}\n```", load.trim());
    r
}
