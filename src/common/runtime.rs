//! One `current_thread` tokio runtime per core: a client's session, its backend connections
//! and every wake-up between them stay on the thread that accepted the client.
//!
//! Core 0 runs on the thread that starts sluice (its `block_on` runs the server: reload,
//! admin, probes, discovery); cores 1.. each get a thread of their own. Each core accepts on
//! its own `SO_REUSEPORT` socket of every client address (`common::listener`), the
//! PostgreSQL pools keep idle connections per core (`postgres::pool`), and each core opens
//! CQL node connections of its own (`cql::pool`). What the cores share
//! (configuration, topology, metrics, pool bounds) is shared through atomics and `ArcSwap`
//! snapshots, which need no runtime.

use std::cell::Cell;

use tokio::runtime::{Builder, Handle, Runtime};

thread_local! {
    /// The core whose runtime runs on this thread (0 on threads that are not a core's).
    static CORE: Cell<usize> = const { Cell::new(0) };
}

/// The core the calling thread runs: which per-core pool a checkout uses.
pub fn current_core() -> usize {
    CORE.with(Cell::get)
}

/// Marks the calling thread as core `core`'s.
pub(crate) fn enter_core(core: usize) {
    CORE.with(|c| c.set(core));
}

/// The number of cores when `[runtime] threads` is not set: one per CPU sluice may use
/// (affinity mask and cgroup quota respected).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The running cores: a handle to each one's runtime, by core number.
#[derive(Clone)]
pub struct Cores {
    handles: Vec<Handle>,
}

impl Cores {
    /// Starts `n` (at least one) `current_thread` runtimes. Cores 1.. run on threads of their
    /// own until the process ends; core 0's runtime is returned for the caller to `block_on`
    /// on its own thread.
    pub fn start(n: usize) -> std::io::Result<(Runtime, Cores)> {
        let core0 = Builder::new_current_thread().enable_all().build()?;
        let mut handles = vec![core0.handle().clone()];
        for core in 1..n.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("sluice-core-{core}"))
                .spawn(move || {
                    enter_core(core);
                    // Runs the tasks spawned onto this core (accept loops, sessions) for as
                    // long as the process lives.
                    runtime.block_on(std::future::pending::<()>());
                })?;
        }
        Ok((core0, Cores { handles }))
    }

    /// How many cores there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true: there is at least one core.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Each core's runtime, by core number.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}
