//! The startup phase: SSL/GSSENC negotiation (refused for now), cancel requests, SCRAM-SHA-256
//! authentication of the client, and the greeting (parameters, cancel key, ReadyForQuery).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use sluice_postgres::scram::{ScramError, ScramServer};
use sluice_postgres::server;
use sluice_postgres::startup::StartupPacket;
use sluice_postgres::{split_message, split_startup, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::settings;
use super::{fatal, Link, Session};
use crate::common::buffers::Buffer;
use crate::common::tls::{ClientStream, MaybeTls};
use crate::config::PoolMode;
use crate::postgres::cluster::{AttachError, Cancel, Checkout, Cluster};

/// Longest password/SASL message a client may send.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;
/// A refused login waits this long before hearing so, to slow down password guessing.
const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(250);

/// Runs the startup phase. `Ok(None)` means the connection ended (cancel request, refusal,
/// client gone); the client has been told why where it could be.
/// The session is boxed: moved by value, its ~600 bytes would be stored several times over in
/// the connection's task (each async frame that holds it keeps its own copy).
pub async fn login(
    cluster: &Arc<Cluster>,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
) -> std::io::Result<Option<Box<Session>>> {
    let local = tcp.local_addr().ok();
    // The stream may turn into a TLS stream half-way through the handshake.
    let mut slot: Option<ClientStream> = Some(MaybeTls::Plain(tcp));
    // Small: a login's messages are; the session reads into buffers from the thread's pool.
    let mut buf = BytesMut::with_capacity(512);
    let mut out = BytesMut::new();
    let held = HeldClock::default();
    let result = {
        let handshake = std::pin::pin!(handshake(cluster, peer, &mut slot, &mut buf, &mut out, &held));
        within_login_timeout(cluster.config.login_timeout, &held, handshake).await
    };
    // Gone only if the login timed out in the middle of a TLS handshake.
    let Some(mut stream) = slot else { return Ok(None) };
    let greeted = match result {
        Ok(r) => r?,
        Err(_) => {
            info!("client did not finish logging in within login_timeout");
            fatal(&mut out, "08P01", "sluice: login timed out");
            None
        }
    };
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    let greeted = match greeted {
        Some(Outcome::Client(g)) => g,
        Some(Outcome::Console(login)) => {
            crate::admin::console::serve(cluster, stream, buf, BytesMut::new(), login).await?;
            return Ok(None);
        }
        None => return Ok(None),
    };
    let Greeted {
        who,
        startup_serializable,
        checkout,
        db,
    } = greeted;
    let tls = matches!(stream, MaybeTls::Tls(_));
    // Session mode: the client keeps the backend that answered its login for its whole
    // session, so it is told that backend's own key, and `pg_backend_pid()`, NOTIFY pids and
    // `pg_terminate_backend` agree with BackendKeyData as on a direct connection. Transaction
    // mode: the client has no server process of its own; sluice issues a key.
    let session_key = checkout
        .as_ref()
        .filter(|_| cluster.pg.pool_mode == PoolMode::Session)
        .map(|c| c.conn.key());
    let client = cluster.activity.register(
        crate::postgres::activity::ClientInfo::new(cluster.next_session_id(), who, peer, local, tls),
        session_key,
    );
    let cancel_key = client.cancel_key;
    let mut greeting = Buffer::default();
    server::backend_key_data(greeting.get(), cancel_key.0, cancel_key.1);
    server::ready_for_query(greeting.get(), b'I');
    // What the client sent right behind its login (drivers may pipeline a first query).
    let mut cbuf = Buffer::default();
    if !buf.is_empty() {
        cbuf.get().extend_from_slice(&buf);
    }
    drop(buf);
    let mut session = Box::new(Session {
        cluster: cluster.clone(),
        client,
        db,
        busy: None,
        startup_serializable,
        stream,
        cbuf,
        out: greeting,
        to_backend: Buffer::default(),
        link: Link::Idle,
        statements: Default::default(),
        settings: settings::none(),
        pinned: None,
        rare: None,
        idle_timer: None,
    });
    // The connection that answered the login serves the client's first request (session
    // mode: every request) without another checkout.
    if let Some(mut checkout) = checkout {
        if cluster.pg.pool_mode == PoolMode::Session {
            session.attach(checkout);
        } else {
            checkout.park();
            session.client.cancel.set(None);
            session.link = Link::Parked(checkout);
        }
    }
    session.flush_client().await?;
    Ok(Some(session))
}

/// How a login ended well.
enum Outcome {
    /// A client of the cluster.
    Client(Greeted),
    /// A user of the admin console.
    Console(crate::admin::console::Login),
}

/// A client that has logged in.
struct Greeted {
    who: Arc<crate::postgres::activity::Identity>,
    startup_serializable: bool,
    /// The backend whose parameters the client was told, if one was checked out for it.
    checkout: Option<Checkout>,
    /// Its database's activity record, with the function catalog loaded.
    db: Arc<crate::postgres::activity::DbActivity>,
}

/// Time a login spent held by the console's PAUSE, which `login_timeout` does not count
/// (only `pause_timeout` bounds it).
#[derive(Default)]
struct HeldClock(std::sync::Mutex<(Option<tokio::time::Instant>, std::time::Duration)>);

impl HeldClock {
    fn hold(&self) {
        self.0.lock().expect("held clock").0 = Some(tokio::time::Instant::now());
    }

    fn release(&self) {
        let mut c = self.0.lock().expect("held clock");
        if let Some(since) = c.0.take() {
            c.1 += since.elapsed();
        }
    }

    /// Held so far, the current hold included.
    fn total(&self) -> std::time::Duration {
        let c = self.0.lock().expect("held clock");
        c.1 + c.0.map_or(std::time::Duration::ZERO, |s| s.elapsed())
    }
}

/// `handshake` bounded by `login_timeout`, not counting the time it was held by PAUSE.
///
/// Takes the handshake pinned by the caller: a future taken by value and pinned here would be
/// stored twice in this one's state (the argument and the pinned local), 3.5 KiB more per login
/// in flight.
async fn within_login_timeout<F: std::future::Future>(
    limit: std::time::Duration,
    held: &HeldClock,
    mut handshake: std::pin::Pin<&mut F>,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let start = tokio::time::Instant::now();
    loop {
        // The deadline moves by the time held so far; woken at the earliest possible one.
        let deadline = start + limit + held.total();
        match tokio::time::timeout_at(deadline, &mut handshake).await {
            Ok(r) => return Ok(r),
            Err(e) if start + limit + held.total() <= tokio::time::Instant::now() => return Err(e),
            Err(_) => {}
        }
    }
}

/// Reads the startup packet and authenticates. Returns the client once AuthenticationOk and
/// the parameters are in `out`.
async fn handshake(
    cluster: &Arc<Cluster>,
    peer: std::net::SocketAddr,
    slot: &mut Option<ClientStream>,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    held: &HeldClock,
) -> std::io::Result<Option<Outcome>> {
    let mut negotiations = 0;
    let mut stream = slot.as_mut().expect("present until a TLS upgrade");
    let params = loop {
        let packet = loop {
            if buf.starts_with(TERMINATE) {
                // A driver that connects and changes its mind sends Terminate first: PostgreSQL
                // closes without a word, and so does sluice.
                debug!("client sent Terminate before its startup packet");
                cluster
                    .metrics
                    .error(&cluster.config.name, "terminate_before_startup");
                return Ok(None);
            }
            match split_startup(buf) {
                Ok(Some(p)) => break p,
                Ok(None) => {
                    if stream.read_buf(buf).await? == 0 {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    info!(error = %e, "invalid startup packet");
                    fatal(out, "08P01", &format!("sluice: invalid startup packet: {e}"));
                    return Ok(None);
                }
            }
        };
        match StartupPacket::parse(&packet) {
            // Bytes after an SSLRequest, before the handshake, would be plaintext injected
            // ahead of the encrypted stream: refused (the guard on an empty buffer).
            Ok(StartupPacket::SslRequest)
                if negotiations < 2 && buf.is_empty() && cluster.client_tls.is_some() =>
            {
                negotiations += 1;
                stream.write_all(b"S").await?;
                let (Some(acceptor), Some(MaybeTls::Plain(tcp))) = (&cluster.client_tls, slot.take()) else {
                    fatal(out, "08P01", "sluice: SSLRequest on an encrypted connection");
                    return Ok(None);
                };
                match acceptor.accept(tcp).await {
                    Ok(tls) => *slot = Some(MaybeTls::Tls(Box::new(tls))),
                    Err(e) => {
                        info!(error = %e, "client TLS handshake failed");
                        cluster.metrics.error(&cluster.config.name, "tls_handshake");
                        return Ok(None);
                    }
                }
                stream = slot.as_mut().expect("just upgraded");
            }
            Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest)
                if negotiations < 2 && buf.is_empty() =>
            {
                negotiations += 1;
                stream.write_all(b"N").await?;
            }
            Ok(StartupPacket::CancelRequest { pid, secret }) => {
                forward_cancel(cluster, pid, &secret).await;
                return Ok(None);
            }
            Ok(p @ StartupPacket::Startup { .. }) => break p,
            Ok(_) => {
                fatal(out, "08P01", "sluice: unexpected encryption request");
                return Ok(None);
            }
            Err(e) => {
                info!(error = %e, "invalid startup packet");
                fatal(out, "08P01", &format!("sluice: {e}"));
                return Ok(None);
            }
        }
    };
    let user = params.param("user").unwrap_or_default().to_string();
    let database = params
        .param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    if params
        .param("replication")
        .is_some_and(|r| r != "false" && r != "0")
    {
        fatal(out, "08P01", "sluice: replication connections are not supported");
        return Ok(None);
    }

    if cluster.config.require_tls && !matches!(stream, MaybeTls::Tls(_)) {
        info!(%user, "plaintext client refused: require_tls");
        fatal(
            out,
            "28000",
            "sluice: this listener requires TLS (connect with sslmode=require)",
        );
        return Ok(None);
    }

    if !authenticate(cluster, stream, buf, out, &user, &database).await? {
        return Ok(None);
    }

    let StartupPacket::Startup {
        params: ref startup_params,
        ..
    } = params
    else {
        unreachable!("the loop above only breaks with a Startup packet")
    };
    if cluster.console.is_console_database(&database) {
        let Some(access) = cluster.console.access(&user) else {
            info!(%user, %database, "admin console refused: not an admin or stats user");
            fatal(
                out,
                "28000",
                &format!("sluice: user \"{user}\" may not use the admin console (not in [admin] admin_users or stats_users)"),
            );
            return Ok(None);
        };
        server::authentication_ok(out);
        return Ok(Some(Outcome::Console(crate::admin::console::Login {
            user,
            access,
            peer,
            application_name: params.param("application_name").unwrap_or_default().to_string(),
        })));
    }
    server::authentication_ok(out);
    let who = cluster
        .activity
        .identity(&user, &database, settings::startup_params(startup_params));
    // A new client of a paused database waits for RESUME, like its transactions, bounded by
    // pause_timeout only.
    held.hold();
    let waited = cluster
        .console
        .wait_while_paused(&database, tokio::time::Instant::now())
        .await;
    held.release();
    if let Err(e) = waited {
        info!(%user, %database, "login refused: {e}");
        fatal(out, "57P03", &e.to_string());
        return Ok(None);
    }
    let fresh = cluster.pg.pool_mode == PoolMode::Session;
    let checkout = match cluster.login_params(&user, &database, &who.startup, fresh).await {
        Ok((params, checkout)) => {
            // What the primary announced to a connection opened with the client's own startup
            // parameters: what a direct connection would have been told.
            for (k, v) in params.iter() {
                server::parameter_status(out, k, v);
            }
            checkout
        }
        Err(AttachError::Pool(crate::postgres::pool::PoolError::Connect(
            crate::postgres::backend::BackendError::Server { raw, .. },
        ))) => {
            out.extend_from_slice(&raw);
            return Ok(None);
        }
        Err(e) => {
            warn!(error = %e, "login failed: no backend");
            let code = match e {
                AttachError::Pool(crate::postgres::pool::PoolError::Exhausted { .. }) => "53300",
                _ => "57P03",
            };
            fatal(out, code, &e.to_string());
            return Ok(None);
        }
    };
    let db = cluster.function_catalog(&user, &database).await;
    debug!(%user, %database, "client logged in");
    Ok(Some(Outcome::Client(Greeted {
        db,
        startup_serializable: settings::startup_serializable(startup_params),
        who,
        checkout,
    })))
}

/// A Terminate message, which some drivers send before anything else when they give up on a
/// connection at once.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// SCRAM-SHA-256 against the configured password or verifier, or the verifier `auth_query`
/// found. Unknown users run the same exchange against a random secret and fail the same way.
async fn authenticate(
    cluster: &Arc<Cluster>,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    user: &str,
    database: &str,
) -> std::io::Result<bool> {
    // A role that is not configured may be found by auth_query; whatever the lookup says, the
    // exchange below runs the same way (against a random secret when there is no such role).
    let found = match cluster.users.contains_key(user) {
        true => None,
        // Boxed: the lookup's future (a backend connection and a query) is larger than the
        // rest of the login, which would carry it for every configured user too.
        false => Box::pin(cluster.lookup_user(user, database)).await,
    };
    let known = cluster.users.get(user).or(found.as_deref());
    if let Some(crate::postgres::backend::Credential::Md5(stored)) = known.map(|u| &u.credential) {
        // Known by its md5 hash only: the client proves it with md5 (SCRAM needs the password).
        return authenticate_md5(cluster, stream, buf, out, user, stored).await;
    }
    let secret = known
        .and_then(|u| u.secret.clone())
        .unwrap_or_else(|| cluster.dummy_secret.clone());
    let mut scram = ScramServer::new(secret);
    server::authentication_sasl(out, &["SCRAM-SHA-256"]);
    stream.write_all(out).await?;
    out.clear();

    let Some(first) = read_auth_message(stream, buf, out).await? else {
        return Ok(false);
    };
    let (mechanism, data) = match server::decode_sasl_initial_response(first.body()) {
        Ok(m) => m,
        Err(e) => {
            fatal(out, "08P01", &format!("sluice: {e}"));
            return Ok(false);
        }
    };
    if mechanism != "SCRAM-SHA-256" {
        fatal(
            out,
            "28000",
            &format!("sluice: unsupported SASL mechanism {mechanism:?}"),
        );
        return Ok(false);
    }
    let server_first = match scram.client_first(&data, &crate::postgres::cluster::random_nonce()) {
        Ok(m) => m,
        Err(e) => return refuse(cluster, out, user, e).await,
    };
    server::authentication_sasl_continue(out, &server_first);
    stream.write_all(out).await?;
    out.clear();

    let Some(last) = read_auth_message(stream, buf, out).await? else {
        return Ok(false);
    };
    match scram.client_final(last.body()) {
        Ok(server_final) if known.is_some() => {
            if let (Some(crate::postgres::backend::Credential::PassThrough(keys)), Some(key)) =
                (known.map(|u| &u.credential), scram.client_key())
            {
                // Kept in memory only: what sluice logs in to the servers with from now on.
                keys.remember(key);
            }
            server::authentication_sasl_final(out, &server_final);
            Ok(true)
        }
        Ok(_) => refuse(cluster, out, user, ScramError::BadProof).await,
        Err(e) => refuse(cluster, out, user, e).await,
    }
}

/// md5 authentication against a stored md5 hash: a fresh random salt, and the client's answer
/// compared in constant time; a wrong one is refused exactly as a wrong SCRAM proof.
async fn authenticate_md5(
    cluster: &Arc<Cluster>,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    user: &str,
    stored: &str,
) -> std::io::Result<bool> {
    let salt: [u8; 4] = rand::random();
    server::authentication_md5_password(out, salt);
    stream.write_all(out).await?;
    out.clear();
    let Some(answer) = read_auth_message(stream, buf, out).await? else {
        return Ok(false);
    };
    let body = answer.body();
    let body = body.strip_suffix(&[0]).unwrap_or(body);
    if sluice_postgres::md5::verify(stored, salt, body) {
        Ok(true)
    } else {
        refuse(cluster, out, user, ScramError::BadProof).await
    }
}

async fn refuse(cluster: &Cluster, out: &mut BytesMut, user: &str, e: ScramError) -> std::io::Result<bool> {
    cluster.auth_failed();
    info!(%user, reason = %e, "client authentication failed");
    tokio::time::sleep(AUTH_FAILURE_DELAY).await;
    match e {
        ScramError::BadProof | ScramError::Nonce => fatal(
            out,
            "28P01",
            &format!("password authentication failed for user \"{user}\""),
        ),
        ScramError::ChannelBinding => fatal(out, "28000", "sluice: SCRAM channel binding is not supported"),
        other => fatal(out, "08P01", &format!("sluice: {other}")),
    }
    Ok(false)
}

/// Reads one password-phase ('p') message.
async fn read_auth_message(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
) -> std::io::Result<Option<Message>> {
    loop {
        match split_message(buf, MAX_AUTH_MESSAGE) {
            Ok(Some(m)) if m.tag() == b'p' => return Ok(Some(m)),
            Ok(Some(m)) => {
                fatal(
                    out,
                    "08P01",
                    &format!(
                        "sluice: expected a password message, got {:?}",
                        char::from(m.tag())
                    ),
                );
                return Ok(None);
            }
            Ok(None) => {
                if stream.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            }
            Err(e) => {
                fatal(out, "08P01", &format!("sluice: {e}"));
                return Ok(None);
            }
        }
    }
}

/// Forwards a client's CancelRequest to the backend running its query, if any. Unknown keys
/// do nothing, like PostgreSQL.
async fn forward_cancel(cluster: &Cluster, pid: i32, secret: &[u8]) {
    let Ok(secret) = <[u8; 4]>::try_from(secret) else {
        return;
    };
    let Some(client) = cluster.activity.by_cancel_key((pid, i32::from_be_bytes(secret))) else {
        debug!("cancel request for an unknown key");
        return;
    };
    let target = match client.cancel.cancel() {
        Cancel::Forward(target) => target,
        // The query still waits for a backend: it is given up, with 57014.
        Cancel::Dequeued => return debug!("cancel request for a query waiting for a backend"),
        Cancel::Idle => return debug!("cancel request for an idle client"),
    };
    let mut msg = BytesMut::new();
    frontend::cancel_request(target.pid, target.secret, &mut msg);
    let send = async {
        let mut s = TcpStream::connect(&*target.addr).await?;
        s.write_all(&msg).await?;
        // The server closes the connection when it has read the request.
        let mut sink = [0u8; 1];
        let _ = s.read(&mut sink).await;
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), send).await {
        Ok(Ok(())) => debug!(node = %target.addr, "cancel request forwarded"),
        _ => warn!(node = %target.addr, "could not forward a cancel request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn time_held_by_pause_does_not_count_against_login_timeout() {
        let limit = Duration::from_secs(2);
        // Not held: cut at the limit.
        let held = HeldClock::default();
        let slow = tokio::time::sleep(Duration::from_secs(3));
        assert!(within_login_timeout(limit, &held, std::pin::pin!(slow))
            .await
            .is_err());
        // Held 10 s (as PAUSE would), then 1.5 s of ordinary work: within the limit.
        let held = HeldClock::default();
        let login = async {
            held.hold();
            tokio::time::sleep(Duration::from_secs(10)).await;
            held.release();
            tokio::time::sleep(Duration::from_millis(1500)).await;
        };
        let started = tokio::time::Instant::now();
        assert!(within_login_timeout(limit, &held, std::pin::pin!(login))
            .await
            .is_ok());
        assert_eq!(started.elapsed(), Duration::from_millis(11_500));
        // Held, then slow past the limit: cut 2 s after the hold, not counting it.
        let held = HeldClock::default();
        let login = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            held.hold();
            tokio::time::sleep(Duration::from_secs(10)).await;
            held.release();
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let started = tokio::time::Instant::now();
        assert!(within_login_timeout(limit, &held, std::pin::pin!(login))
            .await
            .is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(12));
    }
}
