//! What both protocols share: the listener (accept loop and task handles), the running server
//! (start, hot reload, drain and shutdown), the role topology with node health that discovery
//! and probes feed, TLS on both sides, and the Prometheus metrics; I/O buffers lent per thread.

pub mod buffers;
pub mod intern;
pub mod listener;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod topology;
