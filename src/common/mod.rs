//! What both protocols share: the listener (accept loop and task handles), the running server
//! (start, hot reload, drain and shutdown), the role topology that discovery and probes feed,
//! node health (one rule and one report for both protocols), TLS on both sides, and the Prometheus metrics;
//! I/O buffers lent per thread and shared names.

pub mod buffers;
pub mod health;
pub mod intern;
pub mod listener;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod topology;
