//! A small fake Kubernetes API server for sluice's tests.
//!
//! It serves LIST and WATCH of EndpointSlices and Pods the way kube-apiserver v1.36 does —
//! chunked JSON event streams with resourceVersions, BOOKMARKs, `410 Expired` after compaction,
//! `403 Forbidden` from RBAC, pagination with continue tokens — from recorded scenarios in
//! `../shared/fixtures/k8s/`. A test steps through a scenario (`advance_to(rv)`), and can cut
//! the server off (`set_down`), hang it (`set_hung`, like a SIGSTOPped kube-apiserver), compact
//! it (`expire`) or deny a token (`add_token`).
//! [`dns::FakeDns`] is a tiny DNS server for the DNS discovery tests.
//! Recorded pod addresses are data: tests rewrite them to loopback addresses with
//! [`Scenario::rewrite`] before anything connects to them.

mod chunks;
pub mod client;
pub mod dns;
mod scenario;
mod selector;
mod server;
mod store;

pub use chunks::{burst, Chunker, BUFFER};
pub use scenario::{
    exchange, fixtures_dir, recording, watch_events, EventType, Kind, Object, Scenario, Step,
};
pub use selector::Selector;
pub use server::{FakeApiServer, RequestLog, ADMIN_TOKEN};
