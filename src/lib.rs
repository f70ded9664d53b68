//! sluice, the library behind the `sluice` binary: a database-aware L4 ingress proxy.
//!
//! The layout follows the architecture (README, "Architecture"):
//! - shared by both protocols: [`config`] (the TOML model and its validation), [`discovery`]
//!   (static lists, Kubernetes, DNS), [`common`] (listener, running server with reload and
//!   drain, role topology and node health, TLS, metrics) and [`admin`] (HTTP endpoints, status
//!   page, admin console);
//! - one folder per protocol: [`postgres`] and [`cql`], each plugging into the shared
//!   listener through [`common::listener::Service`]. Their wire formats are the I/O-free crates
//!   under `protocols/`.

pub mod admin;
pub mod check;
pub mod common;
pub mod config;
pub mod cql;
pub mod discovery;
pub mod postgres;
