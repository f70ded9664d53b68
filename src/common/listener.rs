//! The client listener both protocols share: a bound address whose accept loop hands each
//! connection to the protocol's [`Service`] it currently serves. A reload points the listener
//! at a new cluster in one atomic step; connections already open keep the cluster they have.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::warn;

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
/// closes the address (clients already connected keep their sessions).
pub struct Listener<S> {
    target: Arc<ArcSwap<S>>,
    _accept: Task,
}

impl<S: Service> Listener<S> {
    /// Starts accepting on `socket` for `service`.
    pub fn start(socket: TcpListener, service: Arc<S>) -> Listener<S> {
        let target = Arc::new(ArcSwap::new(service));
        Listener {
            _accept: Task::spawn(accept_loop(socket, target.clone())),
            target,
        }
    }

    /// New clients go to `service` from now on.
    pub fn point_at(&self, service: Arc<S>) {
        self.target.store(service);
    }
}

/// Pending connections the kernel may queue per listener: tokio's default (1024) makes bursts
/// of new clients wait seconds in the kernel before sluice sees them.
const LISTEN_BACKLOG: u32 = 4096;

/// A client listener on `addr` with a deep accept backlog.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
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
