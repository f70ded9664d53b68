//! The client listener both protocols share: a bound address whose accept loops hand each
//! connection to the protocol's [`Service`] it currently serves. A reload points the listener
//! at a new cluster in one atomic step; connections already open keep the cluster they have.
//!
//! Every core (`common::runtime`) accepts on a socket of its own, all bound to the address
//! with `SO_REUSEPORT`: the kernel spreads new connections over the cores, and a client's
//! session runs where it was accepted, without a hand-off between threads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::common::runtime::Cores;

/// What a protocol plugs into a [`Listener`]: one accepted client, served until it leaves.
/// The service does its own admission (it answers a refused client in its own protocol:
/// PostgreSQL's 53300, CQL's OVERLOADED), login and relay.
pub trait Service: Send + Sync + 'static {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A task that is aborted when its handle is dropped.
pub struct Task(JoinHandle<()>);

impl Task {
    pub fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Task {
        Task(tokio::spawn(f))
    }
}

impl From<JoinHandle<()>> for Task {
    fn from(h: JoinHandle<()>) -> Task {
        Task(h)
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A bound listen address serving whichever service it currently points at. Dropping it
/// closes the address on every core (clients already connected keep their sessions).
pub struct Listener<S> {
    target: Arc<ArcSwap<S>>,
    _accept: Vec<Task>,
}

impl<S: Service> Listener<S> {
    /// Starts accepting on each core's socket of `bound` for `service`.
    pub fn start(bound: Bound, service: Arc<S>) -> Listener<S> {
        let target = Arc::new(ArcSwap::new(service));
        Listener {
            _accept: bound
                .sockets
                .into_iter()
                .map(|(core, socket)| Task(core.spawn(accept_loop(socket, target.clone()))))
                .collect(),
            target,
        }
    }

    /// New clients go to `service` from now on, on every core (one shared pointer).
    pub fn point_at(&self, service: Arc<S>) {
        self.target.store(service);
    }
}

/// A client address bound on every core: one listening socket per core, each registered with
/// that core's runtime. Dropping it unused closes the address.
pub struct Bound {
    sockets: Vec<(Handle, TcpListener)>,
}

/// Pending connections the kernel may queue per listener: tokio's default (1024) makes bursts
/// of new clients wait seconds in the kernel before sluice sees them.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` once per core with a deep accept backlog. With more than one core the sockets
/// share the address through `SO_REUSEPORT`; an address that something else listens on is
/// still refused ("address in use"), as without it.
pub fn listen(addr: SocketAddr, cores: &Cores) -> std::io::Result<Bound> {
    let many = cores.len() > 1;
    if many && addr.port() != 0 {
        // `SO_REUSEPORT` would let these sockets join a group another sluice process of the
        // same user already listens with: a plain bind first says whether the address is free.
        let probe = socket_for(addr)?;
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
    }
    let mut addr = addr;
    let mut sockets = Vec::with_capacity(cores.len());
    for core in cores.handles() {
        let socket = socket_for(addr)?;
        socket.set_reuseaddr(true)?;
        if many {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        // Port 0: every core's socket takes the port the first one got.
        addr = socket.local_addr()?;
        // Registered with this core's runtime: its accept loop and the clients it accepts
        // run there.
        let _entered = core.enter();
        sockets.push((core.clone(), socket.listen(LISTEN_BACKLOG)?));
    }
    Ok(Bound { sockets })
}

fn socket_for(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
}

/// Accepts clients and serves each with the listener's current service.
async fn accept_loop<S: Service>(listener: TcpListener, target: Arc<ArcSwap<S>>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(target.load_full().serve(stream, peer));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
