//! The running server: listeners, clusters with their discovery, and the admin listener —
//! with hot reload (SIGHUP, optional file watch) and graceful shutdown (SIGTERM, SIGINT).
//!
//! A reload builds everything the new configuration needs before changing anything: the
//! file is parsed and validated in full, new listen addresses are bound, new or changed
//! clusters are built and their discovery started. Only then are listeners pointed at their
//! new clusters, in one step. A cluster whose settings did not change is kept as it is, with
//! its pools and connections. A replaced cluster keeps serving the clients it has (probes and
//! discovery included) until they leave. Any error leaves the running configuration in place
//! and is logged, every one of them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin::console::{Console, ServerCommand};
use crate::admin::http::{self as admin, AdminState};
use crate::common::listener::{listen, Listener, Task};
use crate::common::metrics::{Metrics, ReloadLabels};
use crate::config::{ClusterConfig, Config};
use crate::discovery::{self, Feed};
use crate::postgres::cluster::Cluster;

/// Where the running configuration came from.
pub struct Source {
    /// The file, or `None` for the embedded default (nothing to reload).
    pub path: Option<PathBuf>,
    /// How logs name it.
    pub name: String,
    /// The text the running configuration was parsed from.
    pub text: String,
}

/// A cluster at run time with everything that runs for it. Dropping it stops its probes,
/// pool reaper and discovery (clients still connected keep their sessions).
struct Running {
    config: ClusterConfig,
    cluster: Arc<Cluster>,
    feed: Feed,
    _tasks: Vec<Task>,
}

/// The whole running server.
pub struct Server {
    source: Source,
    config: Config,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
    admin_task: Task,
    /// The admin console on the PostgreSQL listeners.
    console: Arc<Console>,
    /// What the console asks of the main loop (RELOAD, SHUTDOWN); taken by `run`.
    commands: Option<mpsc::UnboundedReceiver<ServerCommand>>,
    clusters: BTreeMap<String, Running>,
    listeners: HashMap<SocketAddr, Listener<Cluster>>,
    /// Replaced clusters whose clients have not all left yet (for the shutdown drain).
    retiring: Vec<Arc<Cluster>>,
    /// CQL clusters (run by `crate::cql`).
    cql: crate::cql::CqlClusters,
}

/// Binds `addr` for cluster `name`.
async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    listen(addr).with_context(|| format!("cluster {name:?}: cannot listen on {addr}"))
}

/// Builds a cluster and starts its discovery (which checks credentials and RBAC). Nothing
/// runs for it yet: see [`launch`].
async fn build(
    config: &ClusterConfig,
    metrics: &Arc<Metrics>,
    console: &Arc<Console>,
) -> anyhow::Result<(Arc<Cluster>, Feed)> {
    let Some(pg) = config.postgres().cloned() else {
        anyhow::bail!("cluster {:?} is not a PostgreSQL cluster", config.name);
    };
    let feed = discovery::start(&config.name, &config.discovery, metrics).await?;
    Ok((
        Cluster::new(config.clone(), pg, metrics.clone(), console.clone()),
        feed,
    ))
}

/// Starts the probes, the pool reaper and the task that feeds discovery into the topology.
fn launch(config: ClusterConfig, cluster: Arc<Cluster>, feed: Feed) -> Running {
    let mut tasks: Vec<Task> = cluster.spawn_background().into_iter().map(Task::from).collect();
    let mut members = feed.members.clone();
    let c = cluster.clone();
    tasks.push(Task::spawn(async move {
        loop {
            let current = members.borrow_and_update().clone();
            if let Some(m) = current {
                c.set_members(&m);
            }
            if members.changed().await.is_err() {
                return;
            }
        }
    }));
    Running {
        config,
        cluster,
        feed,
        _tasks: tasks,
    }
}

/// Keeps a replaced cluster running until its last client has left, then stops it.
fn retire(running: Running) {
    tokio::spawn(async move {
        while running.cluster.clients.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        info!(cluster = %running.config.name, "replaced cluster has no clients left; stopped");
        drop(running);
    });
}

impl Server {
    /// Binds every listener, starts discovery and probes for every cluster, and serves the
    /// admin endpoints. Discovery start-up errors (credentials, RBAC) are returned.
    pub async fn start(source: Source, config: Config) -> anyhow::Result<Server> {
        let (config, cql_configs) = crate::cql::split(config);
        let metrics = Arc::new(Metrics::new());
        let mut bound = Vec::new();
        for c in &config.clusters {
            bound.push(bind(&c.name, c.listen).await?);
        }
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;
        let admin = Arc::new(AdminState {
            clusters: ArcSwap::from_pointee(Vec::new()),
            discovery: ArcSwap::from_pointee(HashMap::new()),
            cql: ArcSwap::from_pointee(Vec::new()),
            metrics: metrics.clone(),
            accepting: AtomicBool::new(true),
        });
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let console = Console::new(config.admin.clone(), admin.clone(), commands_tx);
        let cql = crate::cql::CqlClusters::start(cql_configs, &metrics).await?;
        admin.cql.store(Arc::new(cql.clusters()));
        let admin_task = Task::spawn(admin::serve(admin_listener, admin.clone()));
        let mut clusters = BTreeMap::new();
        let mut listeners = HashMap::new();
        for (c, listener) in config.clusters.iter().zip(bound) {
            let (cluster, feed) = build(c, &metrics, &console).await?;
            let running = launch(c.clone(), cluster.clone(), feed);
            listeners.insert(c.listen, Listener::start(listener, cluster));
            info!(cluster = %c.name, listen = %c.listen, discovery = running.feed.status.source, "listening");
            clusters.insert(c.name.clone(), running);
        }
        let server = Server {
            source,
            config,
            metrics,
            admin,
            admin_task,
            console,
            commands: Some(commands),
            clusters,
            listeners,
            retiring: Vec::new(),
            cql,
        };
        server.publish_admin_view();
        info!(config = %server.source.name, admin = %server.config.admin.listen, version = env!("CARGO_PKG_VERSION"), "sluice started");
        Ok(server)
    }

    /// Points the admin endpoints at the running clusters.
    fn publish_admin_view(&self) {
        self.admin.clusters.store(Arc::new(
            self.clusters.values().map(|r| r.cluster.clone()).collect(),
        ));
        self.admin.discovery.store(Arc::new(
            self.clusters
                .iter()
                .map(|(name, r)| (name.clone(), r.feed.status.clone()))
                .collect(),
        ));
    }

    /// Whether the running configuration asks for the file watch.
    pub fn watch_requested(&self) -> Option<&Path> {
        self.source.path.as_deref().filter(|_| self.config.reload.watch)
    }

    /// Re-reads the file and applies it if its text changed (file watch events).
    pub async fn reload_if_changed(&mut self) {
        let Some(path) = self.source.path.clone() else {
            return;
        };
        match std::fs::read_to_string(&path) {
            Ok(text) if text == self.source.text => {}
            _ => {
                // Errors are logged by `reload`.
                let _ = self.reload("the file changed").await;
            }
        }
    }

    /// Reads, validates and applies the configuration file; on any error the running
    /// configuration stays and every error is logged (and returned).
    pub async fn reload(&mut self, why: &str) -> Result<(), Vec<String>> {
        let Some(path) = self.source.path.clone() else {
            info!("{why}: running on the embedded default configuration; nothing to reload");
            return Ok(());
        };
        info!(config = %self.source.name, "{why}: reloading the configuration");
        let result = match std::fs::read_to_string(&path) {
            Err(e) => Err(vec![format!("cannot read {}: {e}", path.display())]),
            Ok(text) => match Config::parse(&text) {
                Err(errors) => Err(errors.0.iter().map(|e| e.to_string()).collect()),
                Ok(config) => {
                    let unsupported: Vec<String> =
                        config.unsupported().iter().map(|e| e.to_string()).collect();
                    if !unsupported.is_empty() {
                        Err(unsupported)
                    } else {
                        self.apply(config, text).await.map_err(|e| vec![format!("{e:#}")])
                    }
                }
            },
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels { result: outcome })
            .inc();
        if let Err(errors) = &result {
            for e in errors {
                error!(config = %self.source.name, "reload: {e}");
            }
            error!(config = %self.source.name, errors = errors.len(), "configuration reload failed; the running configuration stays in place");
        }
        result
    }

    /// Applies a validated configuration: everything that can fail happens before the first
    /// change.
    async fn apply(&mut self, config: Config, text: String) -> anyhow::Result<()> {
        let (config, cql_configs) = crate::cql::split(config);
        // CQL clusters new or changed start now (discovery, control connection); their new
        // addresses are bound. Unchanged ones stay as they are.
        let cql = self.cql.prepare(cql_configs, &self.metrics).await?;
        // 1. New listen addresses, and the admin address if it moved.
        let mut bound = HashMap::new();
        for c in &config.clusters {
            if !self.listeners.contains_key(&c.listen) && !bound.contains_key(&c.listen) {
                bound.insert(c.listen, bind(&c.name, c.listen).await?);
            }
        }
        let admin_listener = if config.admin.listen != self.config.admin.listen {
            Some(
                TcpListener::bind(config.admin.listen)
                    .await
                    .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?,
            )
        } else {
            None
        };
        // 2. New and changed clusters, with their discovery started.
        let mut built = Vec::new();
        for c in &config.clusters {
            if self.clusters.get(&c.name).is_some_and(|r| r.config == *c) {
                continue;
            }
            let (cluster, feed) = build(c, &self.metrics, &self.console).await?;
            built.push((c.clone(), cluster, feed));
        }
        // 3. Commit: nothing below can fail.
        self.cql.commit(cql);
        self.admin.cql.store(Arc::new(self.cql.clusters()));
        let mut kept = Vec::new();
        let mut next: BTreeMap<String, Running> = BTreeMap::new();
        for c in &config.clusters {
            if let Some(r) = self.clusters.remove(&c.name).filter(|r| r.config == *c) {
                kept.push(c.name.clone());
                next.insert(c.name.clone(), r);
            }
        }
        let started: Vec<String> = built.iter().map(|(c, _, _)| c.name.clone()).collect();
        for (c, cluster, feed) in built {
            next.insert(c.name.clone(), launch(c, cluster, feed));
        }
        let retired: Vec<String> = self.clusters.keys().cloned().collect();
        self.retiring.retain(|c| c.clients.load(Ordering::Acquire) > 0);
        for (_, old) in std::mem::take(&mut self.clusters) {
            self.retiring.push(old.cluster.clone());
            retire(old);
        }
        self.clusters = next;
        let mut listeners = HashMap::new();
        for c in &config.clusters {
            let cluster = self.clusters[&c.name].cluster.clone();
            let listener = match self.listeners.remove(&c.listen) {
                Some(l) => {
                    l.point_at(cluster);
                    l
                }
                None => {
                    let socket = bound.remove(&c.listen).expect("bound in step 1");
                    Listener::start(socket, cluster)
                }
            };
            listeners.insert(c.listen, listener);
        }
        // Listeners no longer configured close here.
        self.listeners = listeners;
        if let Some(l) = admin_listener {
            self.admin_task = Task::spawn(admin::serve(l, self.admin.clone()));
        }
        if config.runtime != self.config.runtime {
            warn!("runtime.threads changed: it applies when sluice restarts");
        }
        self.console.configure(config.admin.clone());
        self.config = config;
        self.source.text = text;
        self.publish_admin_view();
        info!(
            config = %self.source.name,
            kept = %kept.join(","),
            started = %started.join(","),
            replaced_or_removed = %retired.join(","),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Every cluster that may still have clients: the running ones and replaced ones.
    fn all_clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values().map(|r| &r.cluster).chain(&self.retiring)
    }

    /// Requests that hold a backend right now (transactions in flight), over every cluster.
    fn in_flight(&self) -> u32 {
        self.all_clusters()
            .map(|c| {
                c.topology
                    .load()
                    .nodes
                    .iter()
                    .map(|n| n.load.load(Ordering::Acquire))
                    .sum::<u32>()
            })
            .sum()
    }

    fn clients(&self) -> usize {
        self.all_clusters()
            .map(|c| c.clients.load(Ordering::Acquire))
            .sum()
    }

    /// Graceful shutdown: `/readyz` fails first; after `readiness_delay` the listeners close;
    /// then in-flight transactions get up to `drain_timeout` to finish, and the process ends
    /// (closing every connection).
    pub async fn shutdown(mut self) {
        let s = self.config.shutdown.clone();
        self.admin.accepting.store(false, Ordering::Release);
        info!(readiness_delay = ?s.readiness_delay, drain_timeout = ?s.drain_timeout, "shutting down: /readyz now fails");
        tokio::time::sleep(s.readiness_delay).await;
        self.listeners.clear();
        info!(
            clients = self.clients(),
            in_flight = self.in_flight(),
            "no longer accepting clients; waiting for in-flight transactions"
        );
        let deadline = tokio::time::Instant::now() + s.drain_timeout;
        let mut idle_checks = 0;
        while tokio::time::Instant::now() < deadline && self.clients() > 0 {
            // Two quiet checks in a row: a client between two statements of a pipeline is
            // not mistaken for an idle one.
            idle_checks = if self.in_flight() == 0 { idle_checks + 1 } else { 0 };
            if idle_checks >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.in_flight();
        if left > 0 {
            warn!(
                in_flight = left,
                "drain timeout reached; closing transactions still running"
            );
        }
        info!(clients = self.clients(), "sluice stopped");
    }
}

/// Watches the directory of `path` (editors and Kubernetes ConfigMaps replace files by
/// renaming) and sends a message on every change.
fn watch_file(path: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Runs sluice until SIGTERM or SIGINT; SIGHUP (and file changes, with `[reload] watch`)
/// reload the configuration.
pub async fn run(source: Source, config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut server = Server::start(source, config).await?;
    let mut commands = server.commands.take().expect("taken once, here");
    let (file_tx, mut file_rx) = mpsc::unbounded_channel();
    let mut watcher: Option<(PathBuf, notify::RecommendedWatcher)> = None;
    loop {
        // Follow `[reload] watch` as reloads change it.
        let wanted = server.watch_requested().map(Path::to_path_buf);
        if wanted.as_ref() != watcher.as_ref().map(|(p, _)| p) {
            watcher = wanted.and_then(|p| match watch_file(&p, file_tx.clone()) {
                Ok(w) => {
                    info!(file = %p.display(), "watching the configuration file");
                    Some((p, w))
                }
                Err(e) => {
                    warn!(file = %p.display(), error = %e, "cannot watch the configuration file; SIGHUP still reloads");
                    None
                }
            });
        }
        tokio::select! {
            _ = hup.recv() => {
                // Errors are logged by `reload`.
                let _ = server.reload("SIGHUP").await;
            }
            Some(command) = commands.recv() => match command {
                ServerCommand::Reload(reply) => {
                    let _ = reply.send(server.reload("console RELOAD").await);
                }
                ServerCommand::Shutdown => {
                    info!("console SHUTDOWN");
                    break;
                }
            },
            Some(()) = file_rx.recv() => {
                // Writes come in bursts: wait for the last one.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while file_rx.try_recv().is_ok() {}
                server.reload_if_changed().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    server.shutdown().await;
    Ok(())
}
