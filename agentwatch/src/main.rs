//! The `agentwatch` command line.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use agentwatch::{
    config::{self, Config},
    daemon::{self, ConfigSource},
};
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agentwatch",
    version,
    about = "Egress and syscall monitor with a kill switch for AI agents"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        /// Config file (default: /etc/agentwatch/agentwatch.toml, else the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0, or exit 1 with `PATH:LINE:COL: message` per error.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a command inside a guarded agent's cgroup; the exit status is the command's.
    Launch {
        #[arg(long)]
        agent: String,
        /// The daemon's config file (same default as `run`).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(last = true, required = true)]
        cmd: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves `--config`: the given file, else the default path if it exists, else the embedded
/// default. A given file that does not parse is an error, never a fallback.
fn load_config(path: Option<PathBuf>) -> Result<(Config, ConfigSource)> {
    let path = path.or_else(|| {
        let p = PathBuf::from(config::DEFAULT_PATH);
        p.exists().then_some(p)
    });
    match path {
        Some(p) => {
            let c = Config::load(&p).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
            Ok((c, ConfigSource::File(p)))
        }
        None => {
            let c = Config::parse(config::EMBEDDED_DEFAULT, "<embedded default>")
                .map_err(|e| anyhow::anyhow!("the embedded default config is invalid:\n{e}"))?;
            Ok((c, ConfigSource::EmbeddedDefault))
        }
    }
}

fn real_main(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run { config } => {
            let (config, source) = load_config(config)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(config, source))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} agent(s))", config.display(), c.agents.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Cmd::Launch { agent, config, cmd } => {
            let (config, _) = load_config(config)?;
            match agentwatch::launch::launch(&config, &agent, &cmd)? {}
        }
    }
}
