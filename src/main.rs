//! sluice: a database-aware L4 ingress proxy. This file is the command line and start-up.

mod admin;
mod backend;
mod cluster;
mod config;
mod metrics;
mod pool;
mod router;
mod session;
mod tls;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::admin::AdminState;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::metrics::Metrics;

/// How long a shutdown waits for connected clients to leave.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

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
    Check,
    /// Print the embedded default configuration.
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(cli.config),
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

fn check(path: Option<PathBuf>) -> ExitCode {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, name)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, name: String) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let mut clusters = Vec::new();
    let mut listeners = Vec::new();
    for c in &config.clusters {
        let listener = TcpListener::bind(c.listen)
            .await
            .with_context(|| format!("cluster {:?}: cannot listen on {}", c.name, c.listen))?;
        listeners.push(listener);
        clusters.push(Cluster::new(c.clone(), metrics.clone()));
    }
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;
    let state = Arc::new(AdminState {
        clusters: clusters.clone(),
        metrics: metrics.clone(),
        accepting: AtomicBool::new(true),
    });
    tokio::spawn(admin::serve(admin_listener, state.clone()));

    let mut accept_tasks = Vec::new();
    for (cluster, listener) in clusters.iter().zip(listeners) {
        cluster.spawn_background();
        info!(cluster = %cluster.config.name, listen = %cluster.config.listen, nodes = cluster.topology.load().nodes.len(), "listening");
        let cluster = cluster.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        tokio::spawn(session::serve(cluster.clone(), stream, peer));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    info!(config = %name, admin = %config.admin.listen, version = env!("CARGO_PKG_VERSION"), "sluice started");

    shutdown_signal().await;
    info!("shutting down: no new connections; waiting for clients to leave");
    state.accepting.store(false, Ordering::Release);
    for t in &accept_tasks {
        t.abort();
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
    while tokio::time::Instant::now() < deadline
        && clusters.iter().any(|c| c.clients.load(Ordering::Acquire) > 0)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!("sluice stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
