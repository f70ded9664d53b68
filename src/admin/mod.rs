//! What operators see and use, for every cluster of either protocol: the HTTP listener
//! (`/metrics`, `/healthz`, `/readyz`, `/topology` and the status page), the admin console (the
//! virtual database `sluice` on PostgreSQL listeners), and the view both report from.

pub mod console;
pub mod http;
pub mod status;
