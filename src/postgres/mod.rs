//! PostgreSQL clusters: a client's session ([`session`]: login, then the relay), the routing
//! decision ([`router`], pure), the run-time cluster ([`cluster`]: users, probes, cancel keys,
//! the attach loop), pooled server connections ([`pool`], [`backend`]), and what the session
//! learns from the databases ([`functions`], [`auth_query`]) and reports ([`activity`]).
//!
//! The wire protocol itself (framing, classification, SCRAM) lives in the I/O-free
//! `sluice-postgres` crate under `protocols/postgres`.

pub mod activity;
pub mod auth_query;
pub mod backend;
pub mod cluster;
pub mod functions;
pub mod pool;
pub mod router;
pub mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::common::listener::Service;
use cluster::Cluster;

impl Service for Cluster {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        session::serve(self, stream, peer)
    }
}
