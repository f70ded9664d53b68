//! One console connection after its login: simple-protocol commands until the client leaves.

use std::sync::Arc;

use bytes::BytesMut;
use sluice_postgres::server::{self, ErrorFields};
use sluice_postgres::{peek, split_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

use super::command::{self, Flow};
use super::Access;
use crate::common::tls::ClientStream;
use crate::postgres::activity::ClientInfo;
use crate::postgres::cluster::Cluster;

/// The longest command the console reads.
const MAX_COMMAND: usize = 64 * 1024;

fn error(out: &mut BytesMut, severity: &str, message: &str) {
    server::error_response(
        out,
        &ErrorFields {
            severity,
            code: "08P01",
            message,
            detail: None,
            hint: None,
        },
    );
}

/// Who is on the console.
pub struct Login {
    pub user: String,
    pub access: Access,
    pub peer: std::net::SocketAddr,
    pub application_name: String,
}

/// Greets a console user (whose AuthenticationOk is already in `out`) and serves commands.
pub async fn serve(
    cluster: &Arc<Cluster>,
    mut stream: ClientStream,
    mut buf: BytesMut,
    mut out: BytesMut,
    login: Login,
) -> std::io::Result<()> {
    let console = cluster.console.clone();
    let version = format!("{}/sluice", env!("CARGO_PKG_VERSION"));
    for (k, v) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", login.application_name.as_str()),
    ] {
        server::parameter_status(&mut out, k, v);
    }
    server::backend_key_data(&mut out, 0, 0);
    server::ready_for_query(&mut out, b'I');
    let tls = matches!(stream, crate::common::tls::MaybeTls::Tls(_));
    let who = cluster.activity.identity(
        &login.user,
        "sluice",
        std::sync::Arc::new(vec![(
            "application_name".to_string(),
            login.application_name.clone(),
        )]),
    );
    let _listed = cluster.activity.register_console(ClientInfo::new(
        cluster.next_session_id(),
        who,
        login.peer,
        None,
        tls,
    ));
    info!(user = %login.user, access = ?login.access, "admin console session");
    // After an extended-protocol message: everything until Sync is dropped, as a server does
    // after an error.
    let mut skipping = false;
    loop {
        stream.write_all(&out).await?;
        out.clear();
        let msg = loop {
            match split_message(&mut buf, MAX_COMMAND) {
                Ok(Some(m)) => break m,
                Ok(None) => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                Err(e) => {
                    error(&mut out, "FATAL", &format!("sluice: protocol violation: {e}"));
                    return stream.write_all(&out).await;
                }
            }
        };
        match msg.tag() {
            b'X' => return Ok(()),
            b'Q' if !skipping => {
                let sql = match peek::query(msg.body()) {
                    Ok(q) => String::from_utf8_lossy(q).into_owned(),
                    Err(e) => {
                        error(&mut out, "FATAL", &format!("sluice: protocol violation: {e}"));
                        return stream.write_all(&out).await;
                    }
                };
                debug!(user = %login.user, %sql, "console command");
                let flow = command::run(&console, &login.user, login.access, &sql, &mut out).await;
                server::ready_for_query(&mut out, b'I');
                if flow == Flow::Close {
                    stream.write_all(&out).await?;
                    return stream.shutdown().await;
                }
            }
            b'S' => {
                skipping = false;
                server::ready_for_query(&mut out, b'I');
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' | b'Q' => {
                if !skipping {
                    error(
                        &mut out,
                        "ERROR",
                        "sluice admin console: only the simple query protocol is supported",
                    );
                    skipping = msg.tag() != b'Q';
                    if msg.tag() == b'Q' {
                        server::ready_for_query(&mut out, b'I');
                    }
                }
            }
            other => {
                error(
                    &mut out,
                    "FATAL",
                    &format!(
                        "sluice: protocol violation: unexpected message type {:?}",
                        char::from(other)
                    ),
                );
                return stream.write_all(&out).await;
            }
        }
    }
}
