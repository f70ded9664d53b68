//! One PostgreSQL client connection: startup, authentication, then the routed relay.
//!
//! Client messages are framed and forwarded untouched except where statement names must be
//! rewritten (named prepared statements live per backend; see `statements.rs`). A backend is
//! attached when a request arrives and, in transaction mode, returned to its pool as soon as
//! ReadyForQuery says idle with nothing left in flight — unless session state (LISTEN, temp
//! tables, ...) pins the client to it. While no other client waits for that pool, the session
//! keeps the finished backend parked and reuses it when the router sends the client's next
//! request to the same node: the common case then costs no pool checkout and return. Sluice's
//! own queries on the attached backend (settings replay and capture, WAL position for
//! read-your-writes) are answered to sluice, never relayed; see `replies.rs`.

mod gate;
mod in_flight;
mod login;
mod relay;
mod replies;
mod settings;
#[cfg(test)]
mod sizes;
mod statements;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::future::{FutureExt, OptionFuture};
use sluice_postgres::server::{self, ErrorFields};
use sluice_postgres::{peek, split_message, Classification, Message, PinReason};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

use crate::common::buffers::Buffer;
use crate::common::tls::ClientStream;
use crate::common::topology::Role;
use crate::config::PoolMode;
use crate::postgres::cluster::{AttachError, CancelTarget, Checkout, Cluster};
use crate::postgres::router::Intent;
use in_flight::{Attached, InFlightBox};
use replies::Unit;
use settings::Settings;

/// The largest message a client may send (a Bind or CopyData with a large value).
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024 * 1024;
/// Bytes of client messages waiting to be written to the backend before sluice stops reading
/// the client.
const BACKEND_BACKLOG: usize = 256 * 1024;

/// Serves one client connection to the end.
///
/// Not an `async fn`: its arguments would stay in the connection's task for the whole session
/// (an async fn keeps room for them). They go into the boxed login instead, which is freed once
/// the client has logged in; the task keeps only the session's relay.
pub fn serve(cluster: Arc<Cluster>, stream: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
    // Boxed: the login future (SCRAM, TLS accept, the first backend connection) is several
    // KiB and only needed once; inline it would stay part of every idle client's task.
    let login = Box::pin(admit_and_log_in(cluster.clone(), stream, peer));
    // Chained with combinators rather than written as one `async` block: a block would keep
    // the finished login's slot, the session and the cluster beside the relay's future for the
    // whole session; `then` holds either the login or the session's future, never both.
    login
        .then(|session| OptionFuture::from(session.map(Session::run)))
        .map(move |_| cluster.client_disconnected())
}

/// Admission, then the login inside the client's span.
async fn admit_and_log_in(
    cluster: Arc<Cluster>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<Box<Session>> {
    let admitted = cluster.client_connected();
    let _ = stream.set_nodelay(true);
    if !admitted {
        let mut out = BytesMut::new();
        fatal(&mut out, "53300", "sorry, too many clients already");
        let mut stream = stream;
        let _ = stream.write_all(&out).await;
        return None;
    }
    let span = client_span(&peer, &cluster.config.name);
    match login::login(&cluster, stream, peer)
        .instrument(span.clone())
        .await
    {
        Ok(session) => session,
        Err(e) => {
            debug!(parent: &span, error = %e, "client i/o error during login");
            None
        }
    }
}

/// The span that names a client in every log line about it: `client{peer=.. cluster=..}`.
///
/// Only the login runs inside one. A logged-in session makes it for each line it logs rather
/// than keeping one: a live span costs a registry slot, a field map and its formatted fields
/// (a few hundred bytes per idle client), and entering it on every poll of the relay would
/// cost time per transaction. Log lines read the same either way.
fn client_span(peer: &SocketAddr, cluster: &str) -> tracing::Span {
    tracing::info_span!("client", %peer, cluster = %cluster)
}

/// Appends an ErrorResponse with this severity.
fn error_with(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    server::error_response(
        out,
        &ErrorFields {
            severity,
            code,
            message,
            detail: None,
            hint: None,
        },
    );
}

/// Appends a FATAL ErrorResponse.
fn fatal(out: &mut BytesMut, code: &str, message: &str) {
    error_with(out, "FATAL", code, message);
}

/// How a session ends.
enum End {
    /// The client left (EOF or Terminate).
    ClientGone,
    /// The client broke the protocol; it has been told.
    ClientFault(String),
    /// The backend broke; the client has been told.
    BackendFault(String),
}

/// The server connection a session holds, and what it is for: the states the relay tells
/// apart. A session never holds a parked and an attached backend at once, and drops the
/// client's messages until Sync only while it has no backend.
enum Link {
    /// No backend: between transactions, or before the first.
    Idle,
    /// An extended-protocol request found no backend (no primary, pool exhausted, cancelled,
    /// paused): its error was sent, and the client's messages up to its Sync are dropped; the
    /// Sync is answered with ReadyForQuery.
    FailedUntilSync,
    /// The backend of the client's last transaction, kept while nobody else needs it; the
    /// router may give it the next request (see `Session::park`).
    Parked(Checkout),
    /// A backend runs the client's requests (and sluice's own: settings, WAL position).
    Attached(Attached),
}

impl Link {
    fn attached(&self) -> Option<&Attached> {
        match self {
            Link::Attached(a) => Some(a),
            _ => None,
        }
    }

    fn attached_mut(&mut self) -> Option<&mut Attached> {
        match self {
            Link::Attached(a) => Some(a),
            _ => None,
        }
    }

    /// The parked backend, leaving no backend.
    fn take_parked(&mut self) -> Option<Checkout> {
        match std::mem::replace(self, Link::Idle) {
            Link::Parked(c) => Some(c),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// Session state that most clients never need.
#[derive(Default)]
struct Rare {
    /// Custom (`a.b`) settings the client has set, read back with the others.
    custom_settings: Vec<String>,
    /// The WAL position of the client's last write (read-your-writes).
    min_lsn: Option<u64>,
    /// A client message that starts a write while the replica backend it is attached to still
    /// answers earlier requests (the client's pipelined reads, or sluice's settings capture):
    /// it waits, with everything after it, until that backend is done and can be let go.
    held: Option<Message>,
    /// The client has run SQL `PREPARE` (transaction mode: its statements of that kind are on
    /// the backend it is pinned to, under their own names).
    sql_prepared: bool,
}

/// A logged-in client.
pub struct Session {
    cluster: Arc<Cluster>,
    /// The client as the admin console lists it (`SHOW CLIENTS`, `SHOW POOLS`); also its
    /// user, database and session id (unique in the cluster: marks the backends this session
    /// used last).
    /// Listed in its cluster's `Activity` until the session drops.
    client: Arc<crate::postgres::activity::ClientInfo>,
    /// Its database's activity (transactions in flight, totals) and function catalog.
    db: Arc<crate::postgres::activity::DbActivity>,
    /// The client's transaction in flight (from its first message to the ReadyForQuery that
    /// ends it): what a console `PAUSE` waits for.
    busy: Option<crate::postgres::activity::Busy>,
    /// The startup parameters make every transaction serializable.
    startup_serializable: bool,
    /// The client connection, read and written by this one task (no `tokio::io::split`: its
    /// halves share the stream behind an `Arc` and a lock).
    stream: ClientStream,
    /// Client bytes not yet framed. Like `out` and `to_backend`, it holds a buffer only while
    /// it holds bytes: an idle client has none (see `common::buffers`).
    cbuf: Buffer,
    /// Bytes for the client.
    out: Buffer,
    /// Bytes for the backend.
    to_backend: Buffer,
    /// The server connection the session holds, if any, and what it is for.
    link: Link,
    /// The client's prepared statements by the client's name ("" is the unnamed one).
    statements: statements::Statements,
    /// The client's session settings, replayed on each backend it gets.
    settings: Settings,
    /// Session state ties the client to its current backend for good.
    pinned: Option<PinReason>,
    /// What few clients need, boxed when first needed (an idle session stays small).
    rare: Option<Box<Rare>>,
    /// `client_idle_timeout` between transactions (made on first use, when configured).
    idle_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for Session {
    /// Takes the client off its cluster's list (and forgets its cancel key).
    fn drop(&mut self) {
        self.cluster.activity.unregister(&self.client);
    }
}

impl Session {
    /// The rarely needed state, made when first needed.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// The WAL position of the client's last write (read-your-writes).
    fn min_lsn(&self) -> Option<u64> {
        self.rare.as_ref().and_then(|r| r.min_lsn)
    }

    /// Custom (`a.b`) settings the client has set.
    fn custom_settings(&self) -> &[String] {
        self.rare.as_ref().map_or(&[], |r| &r.custom_settings)
    }

    /// Names the client in a log line (see `client_span`).
    fn span(&self) -> tracing::Span {
        client_span(&self.client.addr.get(), &self.cluster.config.name)
    }

    // Not an `async fn`: an async fn keeps its arguments twice in its state machine (as
    // captured and as moved into its body), and this one is part of every client's task.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self: Box<Self>) -> impl Future<Output = ()> + Send {
        async move {
            let end = self.relay().await;
            self.log_end(end);
            self.detach_at_end().await;
            // The error that ends the session (e.g. 08006 when the backend closed) is still in
            // `out` when the backend read saw EOF: the client must get it before the close.
            let _ = self.flush_client().await;
            let _ = self.stream.shutdown().await;
        }
    }

    /// Says how the session ended (consuming the reason: nothing of it stays in the task's
    /// future while the session winds down).
    fn log_end(&self, end: End) {
        match end {
            End::ClientGone => debug!(parent: &self.span(), "client left"),
            End::ClientFault(why) => {
                info!(parent: &self.span(), reason = %why, "client disconnected for a protocol violation")
            }
            End::BackendFault(why) => {
                warn!(parent: &self.span(), reason = %why, "client disconnected after a backend failure")
            }
        }
    }

    /// The backend connection ended or broke. The client is told once: by the server's own
    /// FATAL error when it sent one (a terminated backend, a shutdown), else by sluice's 08006.
    fn backend_lost(&mut self, why: &str) -> End {
        let node = self
            .link
            .attached_mut()
            .map(|a| a.checkout.conn.node().to_string())
            .unwrap_or_default();
        let told = self.link.attached().is_some_and(|a| a.st.server_fatal);
        if let Some(a) = self.link.attached_mut() {
            a.checkout.conn.discard();
        }
        self.cluster
            .metrics
            .error(&self.cluster.config.name, "backend_lost");
        let msg = format!("sluice: lost the connection to database node {node}: {why}");
        if !told {
            fatal(self.out.get(), "08006", &msg);
        }
        End::BackendFault(msg)
    }

    /// Handles every complete client message in the buffer.
    ///
    /// Not an `async fn`: it would keep `self` twice.
    #[allow(clippy::manual_async_fn)]
    fn process_client_messages(&mut self) -> impl Future<Output = Result<(), End>> + Send + '_ {
        async move {
            // One await point: each would keep room of its own for the message in this future.
            loop {
                let msg = if let Some(msg) = self.rare.as_mut().and_then(|r| r.held.take()) {
                    if self.link.attached().is_some_and(|a| !a.st.units.is_empty())
                        || self.shape_pending(&msg)
                    {
                        self.rare().held = Some(msg);
                        return Ok(());
                    }
                    msg
                } else {
                    if self.cbuf.is_empty() {
                        return Ok(());
                    }
                    match split_message(self.cbuf.get(), MAX_CLIENT_MESSAGE) {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(self.violation(&format!("invalid message framing: {e}"))),
                    }
                };
                self.handle_client_message(msg).await?;
            }
        }
    }

    fn violation(&mut self, why: &str) -> End {
        let msg = format!("sluice: protocol violation: {why}");
        fatal(self.out.get(), "08P01", &msg);
        self.cluster
            .metrics
            .error(&self.cluster.config.name, "protocol_violation");
        End::ClientFault(msg)
    }

    /// Acts on one client message: answers it, forwards it, or first takes a backend for it.
    /// Not an `async fn`: it would keep the message twice (as its argument and as the local
    /// it is moved into) in every client's task.
    #[allow(clippy::manual_async_fn)]
    fn handle_client_message(&mut self, msg: Message) -> impl Future<Output = Result<(), End>> + Send + '_ {
        async move {
            let tag = msg.tag();
            if !matches!(
                tag,
                b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'd' | b'c' | b'f' | b'F' | b'X'
            ) {
                return Err(self.violation(&format!("unexpected message type {:?}", char::from(tag))));
            }
            if tag == b'X' {
                return Err(End::ClientGone);
            }
            // After an error in an extended-protocol batch the server skips the client's
            // messages up to its Sync, a Query or FunctionCall too: no answer is due for it,
            // and it has no effect for sluice to note. It is not sent.
            if matches!(tag, b'Q' | b'F')
                && self
                    .link
                    .attached()
                    .is_some_and(|a| a.st.batch_failed && a.st.in_batch && a.st.units.is_empty())
            {
                return Ok(());
            }
            // A message that starts a transaction passes the console's pause gate first.
            let answered_locally = matches!(self.link, Link::FailedUntilSync)
                || (self.link.attached().is_none() && matches!(tag, b'S' | b'H' | b'd' | b'c' | b'f'));
            if !answered_locally {
                self.end_transaction_if_done();
                if self.busy.is_none() {
                    if let Err(e) = self.start_transaction().await {
                        return self.attach_failed(tag, e);
                    }
                }
            }
            // A simple query is classified once, for routing and for its session effects.
            let query_class = if tag == b'Q' {
                let sql = match peek::query(msg.body()) {
                    Ok(sql) => sql,
                    Err(e) => return Err(self.violation(&e.to_string())),
                };
                if let Some(database) = sluice_postgres::commands::database_to_release(sql) {
                    // DROP DATABASE and friends need the database unused: sluice's idle (and
                    // parked) connections to it go first.
                    debug!(parent: &self.span(), %database, "closing pooled connections to the database");
                    self.cluster.pools.drain_database(&database);
                }
                Some(self.classify_sql(sql))
            } else {
                None
            };
            if self.must_wait_for_replica(&msg, query_class)? || self.unnamed_undecided(&msg) {
                self.rare().held = Some(msg);
                return Ok(());
            }
            if matches!(tag, b'Q' | b'E') {
                self.db
                    .totals
                    .queries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if self.link.attached().is_none() {
                if matches!(self.link, Link::FailedUntilSync) {
                    if tag == b'S' {
                        self.link = Link::Idle;
                        server::ready_for_query(self.out.get(), b'I');
                    }
                    return Ok(());
                }
                match tag {
                    // Nothing to run: answer locally.
                    b'S' => {
                        server::ready_for_query(self.out.get(), b'I');
                        return Ok(());
                    }
                    // Flush with nothing in flight, and COPY data outside COPY, are ignored (the
                    // server ignores the latter too).
                    b'H' | b'd' | b'c' | b'f' => return Ok(()),
                    _ => {}
                }
                let serializable = self.serializable();
                let class = match query_class {
                    Some(c) => c,
                    // Every request goes to the primary whatever it is (session pooling,
                    // serializable transactions, `consistency = "primary"`): no classification of
                    // the request and no scan of its batch, only the check that classifying it
                    // would have made (a malformed message is refused before a backend is taken).
                    None if !Intent::depends_on_class(&self.cluster.pg, serializable) => {
                        self.check_request(&msg)?;
                        Classification::WRITE
                    }
                    None => {
                        let first = self.classify(&msg)?;
                        self.batch_class(first)
                    }
                };
                let intent = Intent::for_request(class, &self.cluster.pg, serializable);
                let had_parked = matches!(self.link, Link::Parked(_));
                match self.attach_counted(intent).await {
                    Ok(checkout) => self.attach(checkout),
                    Err(e) => {
                        if had_parked {
                            self.client.cancel.set(None);
                        }
                        return self.attach_failed(tag, e);
                    }
                }
            }
            if self.awaits_shape(&msg) {
                self.rare().held = Some(msg);
                return Ok(());
            }
            self.forward(msg, query_class)
        }
    }

    /// Whether `msg` needs the primary while the attached backend is a replica, and must wait
    /// before it is routed: for the replies still to come, which may leave a transaction open
    /// (then the request belongs on that backend) or not (then the backend is let go and the
    /// request routed anew); or for the end of the client's extended-protocol batch, which
    /// sluice ends with a Sync of its own (`Unit::EndBatch`) when the batch is open with nothing
    /// else to wait for. asyncpg prepares a statement with Parse, Describe and Flush, without
    /// Sync, and after a client-side error (an argument it cannot encode) sends nothing more
    /// for it: its next request, a write, would otherwise run in that batch on the replica.
    /// A Parse or Bind of a write inside a batch that so far only read moves the batch the same
    /// way, as does a Query or FunctionCall, which ends the batch on the server anyway. An error
    /// in the batch before it makes the server skip the client's messages up to its Sync, and
    /// sluice skips them too (`Session::batch_ended`).
    fn must_wait_for_replica(
        &mut self,
        msg: &Message,
        query_class: Option<Classification>,
    ) -> Result<bool, End> {
        let Some(a) = self.link.attached() else {
            return Ok(false);
        };
        let (tag, in_batch) = (msg.tag(), a.st.in_batch);
        // A batch's Describe, Execute and Close use what it has prepared and bound: they
        // start nothing new.
        let may_need_primary =
            matches!(tag, b'Q' | b'F' | b'P' | b'B') || (!in_batch && matches!(tag, b'D' | b'E' | b'C'));
        let waiting = !a.st.units.is_empty();
        // With nothing to wait for, an open batch is ended only outside a transaction (in one,
        // a read-only one on a replica, a write fails there as it would directly) and while
        // the server has reported no error in it (then it skips the write, as directly).
        let end_batch = !waiting && in_batch && a.st.status == b'I' && !a.st.batch_failed;
        if !may_need_primary
            || !(waiting || end_batch)
            || a.st.copy_in
            || a.checkout.role == Role::Primary
            || self.pinned.is_some()
            || self.cluster.pg.pool_mode == PoolMode::Session
        {
            return Ok(false);
        }
        let class = match query_class {
            Some(c) => c,
            // Inside a batch each Parse and Bind is looked at as it comes: the batch moves at
            // its first write, and what it read before stays where it ran.
            None if in_batch => self.classify(msg)?,
            None => {
                let first = self.classify(msg)?;
                self.batch_class(first)
            }
        };
        if Intent::for_request(class, &self.cluster.pg, self.serializable()) != Intent::Primary {
            return Ok(false);
        }
        if end_batch {
            if let Some(a) = self.link.attached_mut() {
                a.st.in_batch = false;
                a.push_unit(Unit::EndBatch);
                self.to_backend.get().extend_from_slice(&SYNC);
            }
        }
        Ok(true)
    }

    /// Whether `msg` uses the unnamed statement while a Parse of it in an earlier batch is still
    /// unanswered and the backend's unnamed statement was not the client's before it: if the
    /// server skipped that Parse after an error, the client has no unnamed statement and must
    /// be told so (26000), not be bound to another client's. It waits for the answer.
    fn unnamed_undecided(&self, msg: &Message) -> bool {
        let Some(a) = self.link.attached() else {
            return false;
        };
        // The pending-Parse condition first: it is almost always false, and then the message
        // need not be decoded here a second time.
        let undecided = a.st.fixups.iter().any(|p| {
            p.batch < a.st.units_pushed
                && matches!(p.backend, statements::BackendChange::Unnamed(false))
                && p.client.as_ref().is_some_and(|(n, _)| n.is_empty())
        });
        undecided
            && match msg.tag() {
                b'B' => peek::bind(msg.body()).is_ok_and(|b| b.statement.is_empty()),
                b'D' => peek::target(msg.body()).is_ok_and(|t| t.kind == b'S' && t.name.is_empty()),
                _ => false,
            }
    }

    /// Whether the client's transactions are serializable by default (a hot standby refuses
    /// them): its own SET decides, else its startup parameters.
    fn serializable(&self) -> bool {
        match self
            .settings
            .iter()
            .find(|(n, _)| n == "default_transaction_isolation")
        {
            Some(_) => settings::serializable(&self.settings),
            None => self.startup_serializable,
        }
    }

    /// `Cluster::attach` for the client's next request, given up when the client sends a
    /// CancelRequest meanwhile (waiting for a pool slot or for a primary).
    async fn attach_cancellable(&mut self, intent: Intent) -> Result<Checkout, AttachError> {
        // The parked backend serves the request if the router chooses its node; otherwise it
        // goes back to its pool (also when the wait is cancelled).
        let mut parked = self.link.take_parked();
        // Queued before the attach is first polled, so that no cancel is missed.
        let woken = self.client.cancel.queue().await;
        let who = &self.client.who;
        let attach = self.cluster.attach(
            intent,
            &who.user,
            &who.database,
            &who.startup,
            self.min_lsn(),
            &mut parked,
        );
        tokio::select! {
            biased;
            r = attach => r,
            () = woken => Err(AttachError::Cancelled),
        }
    }

    /// The class of an extended-protocol batch that starts with a message of class `first`: a
    /// write if any Parse or Bind already buffered before its Sync is one (the batch runs on
    /// the node chosen for its first message; one that began on a replica moves to the primary
    /// at a write that arrives later, see `must_wait_for_replica`).
    fn batch_class(&self, first: Classification) -> Classification {
        if first.class == sluice_postgres::Class::Write {
            return first;
        }
        let mut at = 0;
        while let Some((tag, total)) = sluice_postgres::peek_message(&self.cbuf[at..], MAX_CLIENT_MESSAGE) {
            let body = &self.cbuf[at + 5..at + total];
            let class = match tag {
                b'S' => break,
                b'P' => peek::parse(body).ok().map(|p| {
                    self.known_statement(&p)
                        .map_or_else(|| self.classify_sql(p.query), |s| s.class)
                }),
                b'B' => peek::bind(body)
                    .ok()
                    .and_then(|b| self.statements.get(b.statement))
                    .map(|s| s.class),
                _ => None,
            };
            if class.is_some_and(|c| c.class == sluice_postgres::Class::Write) {
                return Classification::WRITE;
            }
            at += total;
        }
        first
    }

    /// Classifies SQL knowing the functions of the client's database.
    fn classify_sql(&self, sql: &[u8]) -> Classification {
        self.cluster
            .classifier
            .classify_in(sql, self.db.functions.get().as_deref())
    }

    /// The class of an extended-protocol request that starts with `msg`.
    fn classify(&mut self, msg: &Message) -> Result<Classification, End> {
        let c = &self.cluster.classifier;
        Ok(match msg.tag() {
            b'P' => match peek::parse(msg.body()) {
                Ok(p) => self
                    .known_statement(&p)
                    .map_or_else(|| c.classify(p.query), |s| s.class),
                Err(e) => return Err(self.violation(&e.to_string())),
            },
            b'B' => match peek::bind(msg.body()) {
                Ok(b) => self
                    .statements
                    .get(b.statement)
                    .map_or(Classification::WRITE, |s| s.class),
                Err(e) => return Err(self.violation(&e.to_string())),
            },
            b'D' => match peek::target(msg.body()) {
                Ok(t) if t.kind == b'S' => self
                    .statements
                    .get(t.name)
                    .map_or(Classification::WRITE, |s| s.class),
                Ok(_) => Classification::WRITE,
                Err(e) => return Err(self.violation(&e.to_string())),
            },
            _ => Classification::WRITE,
        })
    }

    /// Refuses an extended-protocol request message that `classify` could not read (the same
    /// protocol violation, with the same words), without classifying it.
    fn check_request(&mut self, msg: &Message) -> Result<(), End> {
        let read = match msg.tag() {
            b'P' => peek::parse(msg.body()).map(drop),
            b'B' => peek::bind(msg.body()).map(drop),
            b'D' => peek::target(msg.body()).map(drop),
            _ => Ok(()),
        };
        read.map_err(|e| self.violation(&e.to_string()))
    }

    fn attach(&mut self, mut checkout: Checkout) {
        let addr = checkout.conn.node_shared();
        let be = checkout.conn.conn();
        self.client.cancel.set(Some(CancelTarget {
            addr,
            pid: be.pid,
            secret: be.secret,
        }));
        debug!(parent: &self.span(), node = %be.addr, "attached backend");
        let foreign = be.owner != self.client.id && be.tainted;
        // The backend carries someone else's settings (or may: another client wrote or set
        // something there): make them the client's.
        let replay =
            self.cluster.pg.pool_mode == PoolMode::Transaction && (foreign || be.settings != self.settings);
        if replay {
            be.settings = self.settings.clone();
            be.tainted = false;
            self.cluster.settings_replayed();
        }
        be.owner = self.client.id;
        let mut attached = Attached {
            checkout,
            st: InFlightBox::take(),
        };
        if replay {
            for sql in settings::replay_sql(&self.settings, foreign) {
                attached.own_query(self.to_backend.get(), &sql, Unit::Replay);
            }
        }
        self.link = Link::Attached(attached);
    }

    /// Ties the client to its backend for the rest of the session.
    fn pin(&mut self, reason: PinReason) {
        if self.pinned.is_none() && self.cluster.pg.pool_mode == PoolMode::Transaction {
            info!(parent: &self.span(), reason = reason.label(), "client pinned to its backend connection");
            self.cluster.pinned(reason.label());
            self.pinned = Some(reason);
        }
    }

    /// The client's transaction is over: keeps the backend parked for the client's next
    /// request while no other client waits for its pool, else returns it.
    fn park(&mut self) {
        let Some(a) = self.link.attached() else { return };
        if !a.is_clean() || self.pinned.is_some() || a.checkout.conn.contended() {
            return self.detach();
        }
        // The cancel target stays: a cancel request while parked reaches an idle backend,
        // which ignores it; it is cleared when the parked backend is let go.
        if let Link::Attached(mut a) = std::mem::replace(&mut self.link, Link::Idle) {
            a.checkout.park();
            self.link = Link::Parked(a.checkout);
        }
    }

    /// Lets go of the parked backend (back to its pool).
    fn release_parked(&mut self) {
        if self.link.take_parked().is_some() {
            self.client.cancel.set(None);
        }
    }

    /// Returns the backend to its pool, or closes it when it is not clean.
    fn detach(&mut self) {
        if let Link::Attached(mut a) = std::mem::replace(&mut self.link, Link::Idle) {
            if !a.is_clean() || self.pinned.is_some() {
                a.checkout.conn.discard();
            }
            self.client.cancel.set(None);
        }
    }

    /// Lets go of the backend when the client leaves. A transaction or request still in flight,
    /// or pinned session state, closes the connection (the server rolls back and forgets);
    /// in session mode a clean connection is reset with DISCARD ALL before anyone else gets it.
    async fn detach_at_end(&mut self) {
        self.release_parked();
        let Some(a) = self.link.attached_mut() else { return };
        if a.is_clean() && self.cluster.pg.pool_mode == PoolMode::Session {
            let be = a.checkout.conn.conn();
            // Boxed: once per session, and a large future to keep out of every session's.
            let reset = Box::pin(tokio::time::timeout(
                std::time::Duration::from_secs(2),
                be.simple_query("DISCARD ALL"),
            ))
            .await;
            be.prepared.clear();
            be.settings = Default::default();
            be.owner = 0;
            be.tainted = false;
            if !matches!(reset, Ok(Ok(_))) {
                a.checkout.conn.discard();
            }
        }
        self.detach();
    }

    fn attach_failed(&mut self, tag: u8, e: AttachError) -> Result<(), End> {
        use crate::postgres::backend::BackendError;
        use crate::postgres::pool::PoolError;
        let (code, reason) = match &e {
            AttachError::NoPrimary { .. } => ("57P03", "no_primary"),
            AttachError::NoNode { .. } => ("57P03", "no_node"),
            AttachError::Pool(PoolError::Exhausted { .. }) => ("53300", "pool_exhausted"),
            AttachError::Pool(PoolError::Connect(_)) => ("08006", "backend_connect"),
            AttachError::Cancelled => ("57014", "cancelled"),
            AttachError::Paused(_) => ("57P03", "paused"),
        };
        self.cluster.metrics.error(&self.cluster.config.name, reason);
        if let AttachError::Pool(PoolError::Connect(BackendError::Server { raw, .. })) = &e {
            // The server's own refusal (e.g. unknown database) says it best.
            self.out.get().extend_from_slice(raw);
            if raw_is_fatal(raw) {
                return Err(End::BackendFault(e.to_string()));
            }
        } else {
            if matches!(e, AttachError::Cancelled) {
                debug!(parent: &self.span(), "request cancelled while it waited for a backend");
            } else {
                warn!(parent: &self.span(), error = %e, "request failed");
            }
            error_with(self.out.get(), "ERROR", code, &e.to_string());
        }
        if tag == b'Q' {
            server::ready_for_query(self.out.get(), b'I');
        } else {
            self.link = Link::FailedUntilSync;
        }
        Ok(())
    }

    /// Whether the attached backend runs on the primary (for read-your-writes bookkeeping).
    fn attached_to_primary(&self) -> bool {
        self.link
            .attached()
            .is_some_and(|a| a.checkout.role == Role::Primary)
    }
}

/// A Sync message.
const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// A Query message.
fn simple_query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut b).expect("sluice's own SQL has no NUL");
    b
}

/// Whether a raw ErrorResponse ends the server session (its first field is the severity).
fn raw_is_fatal(raw: &[u8]) -> bool {
    peek::error_is_fatal(raw.get(5..).unwrap_or_default())
}
