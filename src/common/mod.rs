//! What both protocols share: the runtime (one `current_thread` runtime per core), the
//! listener (accept loops and task handles), the running server (start, hot reload, drain and
//! shutdown), the role topology that discovery and probes feed, node health (one rule and one
//! report for both protocols), TLS on both sides, the Prometheus metrics, counters striped by
//! runtime thread, I/O buffers lent per thread and shared names.

pub mod alloc;
pub mod buffers;
pub mod health;
pub mod intern;
pub mod listener;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod striped;
pub mod tls;
pub mod topology;
