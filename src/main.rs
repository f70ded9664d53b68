//! sluice: a database-aware L4 ingress proxy. This file is the command line and start-up; the
//! proxy itself is the library (`src/lib.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info};

use sluice::check;
use sluice::common::{runtime, server};
use sluice::config::{self, Config};

/// glibc's malloc, with small 128-byte-aligned blocks (tokio's tasks and I/O registrations) in
/// slabs of their own: `sluice::common::alloc`.
#[global_allocator]
static ALLOCATOR: sluice::common::alloc::Allocator = sluice::common::alloc::Allocator;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A database-aware L4 proxy: PostgreSQL read/write routing and pooling"
)]
struct Cli {
    /// The TOML configuration file; without it sluice fronts PostgreSQL on 127.0.0.1:5432.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file, print every error, exit non-zero if there is one.
    Check {
        /// Also connect to each cluster's discovery source and to every node it finds, and
        /// report what was found (and what is wrong, by name).
        #[arg(long)]
        online: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { online }) => check(cli.config, online),
        Some(Command::DefaultConfig) => {
            print!("{}", config::EMBEDDED_DEFAULT.trim_start());
            ExitCode::SUCCESS
        }
        None => run(cli.config),
    }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<(String, String)> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            Ok((p.display().to_string(), text))
        }
        None => Ok(("<embedded default>".into(), config::EMBEDDED_DEFAULT.to_string())),
    }
}

fn check(path: Option<PathBuf>, online: bool) -> ExitCode {
    let (name, text) = match load(path.as_ref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match Config::parse(&text) {
        Ok(c) => {
            let unsupported = c.unsupported();
            for u in &unsupported {
                println!("{name}: note: {u}");
            }
            println!("{name}: ok ({} cluster(s))", c.clusters.len());
            if online && !check::online(&c) {
                println!("{name}: the online check found problems");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{name}: error: {e}");
            }
            eprintln!("{name}: {} error(s)", errors.0.len());
            ExitCode::FAILURE
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("kube")) {
        // sluice reports Kubernetes API failures itself (a warning, metrics, /readyz); kube's
        // ERROR line per failed request would repeat them on every retry of an outage.
        // Routine disconnects are no news either: kube logs "eof in poll ... without sending
        // TLS close_notify" at WARN on every one, and its watcher a WARN per 403 retry; sluice
        // says what matters once, at a bounded rate. RUST_LOG=kube=... shows them again.
        for directive in [
            "kube_client::client::builder=off",
            "kube_client::client=error",
            "kube_runtime::watcher=error",
        ] {
            filter = filter.add_directive(directive.parse().expect("valid directive"));
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (name, text) = match load(path.as_ref()) {
        Ok(t) => t,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::parse(&text) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                error!(file = %name, "configuration error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let unsupported = config.unsupported();
    if !unsupported.is_empty() {
        for e in &unsupported {
            error!(file = %name, "{e}");
        }
        return ExitCode::from(2);
    }
    // One current_thread runtime per core (see `common::runtime`); this thread runs core 0.
    let threads = config.runtime.threads.unwrap_or_else(runtime::default_threads);
    let (runtime, cores) = match runtime::Cores::start(threads) {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(threads, "runtime started: one current_thread runtime per thread");
    let source = server::Source { path, name, text };
    match runtime.block_on(server::run(source, config, cores)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
