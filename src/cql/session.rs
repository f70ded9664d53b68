//! One client connection: framing and version negotiation, OPTIONS/STARTUP/REGISTER and
//! authentication answered by sluice, `USE` tracked per connection, `system.local`/`peers`
//! answered with sluice's own topology, and everything else forwarded to a node chosen per
//! request (see [`super::route`]), concurrently, with the answers going back in any order:
//! the reader writes each request into a node connection's outbox, and that connection's
//! reader writes the answer into this client's outbox ([`super::forward`],
//! [`super::outbox`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::{Header, Opcode, DEFAULT_MAX_BODY};
use sluice_cql::request::{ExecutePeek, Extensions, Prepare};
use sluice_cql::response::{error_code as ec, ColumnSpec, ErrorBody, Event, ResultBody};
use sluice_cql::statement::{parse, Bind, Statement};
use sluice_cql::types::ColumnType;
use sluice_cql::{Compression, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, info, info_span, warn, Instrument};

use super::backend::{Credentials, OpenError};
use super::forward::{envelope, ClientLink, Inflight, MAX_ATTEMPTS};
use super::metrics::RouteKind;
use super::outbox::{Cork, Out, Outbox};
use super::pool::PoolKey;
use super::prepared::PreparedInfo;
use super::route::{self, Route};
use super::systables::{self, LocalView};
use super::CqlCluster;
use crate::common::health::{Source, Verdict};

const AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";

/// How many bytes of answers may wait for a client before its reader stops reading its
/// requests (answers to requests already in flight still come: at most
/// `max_requests_per_client` more).
const CLIENT_OUTBOX_BOUND: usize = 1 << 20;

struct ClientCount(Arc<CqlCluster>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        self.0.client_gauge.dec();
    }
}

/// Serves one client connection until it closes.
pub async fn serve_client(cluster: Arc<CqlCluster>, stream: TcpStream, peer: SocketAddr) {
    let n = cluster.clients.fetch_add(1, Ordering::AcqRel) + 1;
    cluster.client_gauge.inc();
    let _count = ClientCount(cluster.clone());
    if n > cluster.config.max_client_connections {
        warn!(cluster = %cluster.config.name, %peer, "too many CQL clients; refusing the connection");
        cluster.error("too_many_clients");
        let msg = format!(
            "sluice: too many client connections (max_client_connections = {})",
            cluster.config.max_client_connections
        );
        cluster.cql_metrics.error_code(ec::OVERLOADED);
        refuse(stream, ec::OVERLOADED, &msg).await;
        return;
    }
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(cluster.config.listen);
    let span = info_span!("cql_client", cluster = %cluster.config.name, %peer);
    // The TLS handshake counts against login_timeout too.
    let login_deadline = tokio::time::Instant::now() + cluster.config.login_timeout;
    async move {
        let Some(acceptor) = cluster.client_tls.clone() else {
            let (rd, wr) = stream.into_split();
            return serve(cluster, rd, wr, local, login_deadline).await;
        };
        // TLS from the first byte (no negotiation in CQL): a TLS client opens with a
        // handshake record, a plaintext one with its protocol version.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(login_deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        if first[0] == crate::common::tls::TLS_HANDSHAKE_RECORD {
            match tokio::time::timeout_at(login_deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let (rd, wr) = tokio::io::split(tls);
                    serve(cluster, rd, wr, local, login_deadline).await;
                }
                Ok(Err(e)) => {
                    info!(error = %e, "TLS handshake with a CQL client failed");
                    cluster.error("tls_handshake");
                }
                Err(_) => debug!("client did not finish the TLS handshake within login_timeout"),
            }
        } else if cluster.config.require_tls {
            info!("plaintext client refused: require_tls");
            cluster.error("tls_required");
            cluster.cql_metrics.error_code(ec::AUTH_ERROR);
            refuse(
                stream,
                ec::AUTH_ERROR,
                "sluice: this listener requires TLS (require_tls = true); connect with TLS",
            )
            .await;
        } else {
            let (rd, wr) = stream.into_split();
            serve(cluster, rd, wr, local, login_deadline).await;
        }
    }
    .instrument(span)
    .await
}

/// Runs the protocol on an accepted (and, with TLS, decrypted) connection until it closes.
async fn serve<R, W>(
    cluster: Arc<CqlCluster>,
    mut rd: R,
    wr: W,
    local: SocketAddr,
    login_deadline: tokio::time::Instant,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let out = Outbox::new(wr, Encoder::new(), CLIENT_OUTBOX_BOUND);
    let writer = tokio::spawn(out.clone().run(|| {}));
    let mut c = Client {
        link: Arc::new(ClientLink {
            permits: Semaphore::new(cluster.cql.max_requests_per_client),
            cluster: cluster.clone(),
            out: out.clone(),
        }),
        cluster,
        out: out.clone(),
        local,
        version: None,
        started: false,
        auth: Auth::NotNeeded,
        credentials: None,
        keyspace: None,
        pool_key: None,
        framing: None,
    };
    let mut dec = Decoder::new(DEFAULT_MAX_BODY);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // When the bytes in `buf` were read: the start of their requests' latency, one clock
    // read per read instead of one per request.
    let mut received = Instant::now();
    'outer: loop {
        if c.version.is_none() && buf.len() >= 4 {
            let v = buf[0] & 0x7f;
            let max = c.cluster.snapshot().max_version.clamp(4, 5);
            if !(4..=max).contains(&v) {
                debug!(version = v, "unsupported protocol version");
                c.cluster.cql_metrics.error_code(ec::PROTOCOL_ERROR);
                let _ = out.push(Out::Raw(version_error(&buf, max)));
                break;
            }
            c.version = Some(v);
        }
        // What the requests of one read produce (requests to nodes, local answers) is
        // written once per socket by the thread's flusher ([`Cork`]); nothing stays corked
        // while a request waits.
        let mut cork = Some(Cork::new());
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(env)) => {
                    let handled = {
                        let mut handle = std::pin::pin!(c.handle(env, received));
                        match futures_util::poll!(handle.as_mut()) {
                            Poll::Ready(ok) => ok,
                            // It waits (for a permit, a connection, a login): what was
                            // corked goes now, and nothing stays corked while it waits.
                            Poll::Pending => {
                                drop(cork.take());
                                let ok = handle.await;
                                cork = Some(Cork::new());
                                ok
                            }
                        }
                    };
                    if !handled {
                        break 'outer;
                    }
                    if let Some(f) = c.framing.take() {
                        dec.set_framing(f);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let h = e
                        .header()
                        .unwrap_or(Header::request(c.version.unwrap_or(4), 0, Opcode::Error));
                    debug!(error = %e, "malformed frame from client");
                    c.error(&h, ErrorBody::protocol(e.to_string()));
                    if e.is_fatal() {
                        break 'outer;
                    }
                }
            }
        }
        drop(cork);
        out.room().await;
        let read = if c.ready() {
            rd.read_buf(&mut buf).await
        } else {
            match tokio::time::timeout_at(login_deadline, rd.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    debug!("client did not finish STARTUP within login_timeout");
                    break;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => received = Instant::now(),
        }
    }
    out.close();
    let _ = writer.await;
}

/// Refuses a client in its own protocol, as PostgreSQL clients get an ErrorResponse: the
/// first request (OPTIONS or STARTUP) gets an ERROR of `code` on its stream (OVERLOADED over
/// `max_client_connections`, as 53300; AUTH_ERROR for plaintext under `require_tls`, as
/// 28000), then the connection closes. A client that sends nothing within 2 s is just closed.
async fn refuse(mut stream: TcpStream, code: i32, msg: &str) {
    let wait = std::time::Duration::from_secs(2);
    let mut head = [0u8; 9];
    let read = tokio::time::timeout(wait, stream.read_exact(&mut head)).await;
    if !matches!(read, Ok(Ok(_))) {
        return;
    }
    // Read the request's body too (a few KiB at most for OPTIONS/STARTUP): closing a socket
    // with unread bytes resets it, and the client could lose the answer.
    let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]).min(64 * 1024) as u64;
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(wait, tokio::io::copy(&mut (&mut stream).take(len), &mut sink)).await;
    let body = Response::Error(ErrorBody::new(code, msg)).to_body(4);
    let version = (head[0] & 0x7f).clamp(3, 5);
    let mut out = BytesMut::new();
    Header::response(version, i16::from_be_bytes([head[2], head[3]]), Opcode::Error)
        .encode(body.len(), &mut out);
    out.put_slice(&body);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
}

/// The ERROR a client speaking an unsupported version gets, in a header it can read.
fn version_error(first: &[u8], max: u8) -> Bytes {
    let v = first[0] & 0x7f;
    let supported = if max >= 5 { "4/v4, 5/v5" } else { "4/v4" };
    let msg = format!("Invalid or unsupported protocol version ({v}); supported versions are ({supported})");
    let body = Response::Error(ErrorBody::protocol(msg)).to_body(4);
    let mut out = BytesMut::new();
    if v <= 2 {
        out.put_u8(0x80 | v);
        out.put_u8(0);
        out.put_u8(first.get(2).copied().unwrap_or(0));
        out.put_u8(Opcode::Error as u8);
        out.put_u32(body.len() as u32);
    } else {
        let stream = i16::from_be_bytes([first[2], first[3]]);
        let reply = if v == 3 { 3 } else { max };
        Header::response(reply, stream, Opcode::Error).encode(body.len(), &mut out);
    }
    out.put_slice(&body);
    out.freeze()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    NotNeeded,
    /// Clients log in with one of the configured users.
    Local,
    /// Clients' credentials are checked by a node.
    Passthrough,
    Done,
}

struct Client {
    cluster: Arc<CqlCluster>,
    /// The connection's write half.
    out: Arc<Outbox>,
    local: SocketAddr,
    version: Option<u8>,
    started: bool,
    auth: Auth,
    /// The client's own credentials, once accepted.
    credentials: Option<Credentials>,
    keyspace: Option<String>,
    /// The key of the node connections this client's requests go on (built when first
    /// needed, again after USE or a login).
    pool_key: Option<PoolKey>,
    framing: Option<Framing>,
    /// What its requests in flight share.
    link: Arc<ClientLink>,
}

impl Client {
    fn v(&self) -> u8 {
        self.version.unwrap_or(4)
    }

    fn ready(&self) -> bool {
        self.started && matches!(self.auth, Auth::NotNeeded | Auth::Done)
    }

    fn send(&self, h: &Header, resp: &Response) {
        let _ = self.out.push(Out::Envelope(envelope(self.v(), h.stream, resp)));
    }

    fn error(&self, h: &Header, e: ErrorBody) {
        self.cluster.cql_metrics.error_code(e.code);
        self.send(h, &Response::Error(e));
    }

    /// Counts a request sluice answers itself.
    fn local(&self, h: &Header) {
        self.cluster.cql_metrics.request(h.opcode(), RouteKind::Local);
    }

    /// Credentials towards the cluster for this client's requests.
    fn backend_credentials(&self) -> Option<Credentials> {
        if self.cluster.cql.username.is_some() {
            self.cluster.credentials()
        } else {
            self.credentials.clone()
        }
    }

    fn key(&self, keyspace: Option<String>) -> PoolKey {
        PoolKey {
            version: self.v(),
            keyspace,
            credentials: self.backend_credentials(),
        }
    }

    /// Handles one envelope from the client, read at `received`; false closes the connection.
    async fn handle(&mut self, env: Envelope, received: Instant) -> bool {
        let h = env.header;
        let v = self.v();
        if h.version != v {
            self.error(
                &h,
                ErrorBody::protocol(format!(
                    "Invalid message version. Got {} but previous messages on this connection had version {v}",
                    h.version
                )),
            );
            return false;
        }
        if h.response {
            self.error(
                &h,
                ErrorBody::protocol("Invalid request: the frame has the response direction bit"),
            );
            return true;
        }
        let (_, body) = match Extensions::split(&h, env.body.clone()) {
            Ok(x) => x,
            Err(e) => {
                self.error(&h, ErrorBody::protocol(format!("Invalid frame body: {e}")));
                return true;
            }
        };
        // An EXECUTE is routed from its body read in place: no request is built (or allocated,
        // or moved) for it. What the peek does not take goes through the decoder below, which
        // also reports what is wrong with it.
        if h.opcode == Opcode::Execute as u8 && self.ready() {
            if let Some(route) = self.route_execute(v, &body) {
                let snap = self.cluster.snapshot();
                self.send_routed(&h, env, route, received, &snap).await;
                return true;
            }
        }
        let req = match Request::decode(v, h.opcode, body) {
            Ok(r) => r,
            Err(e) => {
                self.error(
                    &h,
                    ErrorBody::protocol(format!("Invalid or corrupt message: {e}")),
                );
                return true;
            }
        };
        match req {
            Request::Options => {
                let snap = self.cluster.snapshot();
                let mut versions = vec!["4/v4".to_string()];
                if snap.max_version >= 5 {
                    versions.push("5/v5".into());
                }
                let cql = if snap.info.cql_version.is_empty() {
                    "3.4.5".to_string()
                } else {
                    snap.info.cql_version.clone()
                };
                let supported = vec![
                    ("PROTOCOL_VERSIONS".to_string(), versions),
                    ("COMPRESSION".to_string(), vec!["snappy".into(), "lz4".into()]),
                    ("CQL_VERSION".to_string(), vec![cql]),
                ];
                self.send(&h, &Response::Supported(supported));
            }
            Request::Startup(opts) => return self.startup(&h, &opts),
            Request::AuthResponse(token) => self.auth_response(&h, token.as_deref()).await,
            Request::Register(types) => {
                if !self.ready() {
                    self.error(
                        &h,
                        ErrorBody::protocol("Unexpected message REGISTER, expecting STARTUP or OPTIONS"),
                    );
                    return true;
                }
                if types.iter().any(|t| t == "SCHEMA_CHANGE") {
                    tokio::spawn(relay_schema_events(self.cluster.clone(), self.out.clone(), v));
                }
                self.send(&h, &Response::Ready);
            }
            req => {
                if !self.ready() {
                    let what = h.opcode().map_or("UNKNOWN", Opcode::name);
                    let expecting = if self.started {
                        "AUTH_RESPONSE"
                    } else {
                        "STARTUP or OPTIONS"
                    };
                    self.error(
                        &h,
                        ErrorBody::protocol(format!("Unexpected message {what}, expecting {expecting}")),
                    );
                    return true;
                }
                self.request(env, req, received).await;
            }
        }
        true
    }

    fn startup(&mut self, h: &Header, opts: &[(String, String)]) -> bool {
        if self.started {
            self.error(
                h,
                ErrorBody::protocol("Unexpected message STARTUP: the connection is already initialised"),
            );
            return true;
        }
        let v = self.v();
        let compression = match opts.iter().find(|(k, _)| k.eq_ignore_ascii_case("COMPRESSION")) {
            None => Compression::None,
            Some((_, name)) => match Compression::from_name(name) {
                Some(Compression::Snappy) if v >= 5 => {
                    self.error(
                        h,
                        ErrorBody::protocol("Snappy compression is not supported in protocol v5"),
                    );
                    return true;
                }
                Some(c) => c,
                None => {
                    self.error(
                        h,
                        ErrorBody::protocol(format!("Unknown compression algorithm: {name}")),
                    );
                    return true;
                }
            },
        };
        self.started = true;
        self.auth = if !self.cluster.config.users.is_empty() {
            Auth::Local
        } else if self.cluster.cql.username.is_none() && self.cluster.snapshot().auth_required {
            Auth::Passthrough
        } else {
            Auth::NotNeeded
        };
        let reply = match self.auth {
            Auth::NotNeeded => Response::Ready,
            _ => Response::Authenticate(AUTHENTICATOR.into()),
        };
        let framing = Framing::after_startup(v, compression);
        self.framing = Some(framing);
        if v < 5 {
            // v4: READY is already compressed; v5 switches to segments after it.
            let _ = self.out.push(Out::Framing(framing));
            self.send(h, &reply);
        } else {
            self.send(h, &reply);
            let _ = self.out.push(Out::Framing(framing));
        }
        true
    }

    async fn auth_response(&mut self, h: &Header, token: Option<&[u8]>) {
        if !matches!(self.auth, Auth::Local | Auth::Passthrough) {
            self.error(h, ErrorBody::protocol("Unexpected message AUTH_RESPONSE"));
            return;
        }
        let bad = |user: &str| {
            ErrorBody::new(
                ec::AUTH_ERROR,
                format!("Provided username {user} and/or password are incorrect"),
            )
        };
        let Some(creds) = token.and_then(Credentials::from_token) else {
            self.error(
                h,
                ErrorBody::new(
                    ec::AUTH_ERROR,
                    "expected a SASL PLAIN token (PasswordAuthenticator)",
                ),
            );
            return;
        };
        if self.auth == Auth::Local {
            let ok = self
                .cluster
                .config
                .users
                .iter()
                .any(|u| u.name == creds.user && u.password == creds.password);
            if !ok {
                self.cluster
                    .metrics
                    .auth_failures
                    .get_or_create(&crate::common::metrics::ClusterLabels {
                        cluster: self.cluster.config.name.clone(),
                    })
                    .inc();
                self.error(h, bad(&creds.user));
                return;
            }
            self.credentials = Some(creds);
            self.pool_key = None;
            self.auth = Auth::Done;
            self.send(h, &Response::AuthSuccess(None));
            return;
        }
        // Passthrough: a node checks the credentials by accepting a connection with them.
        self.credentials = Some(creds.clone());
        self.pool_key = None;
        let key = self.key(None);
        let snap = self.cluster.snapshot();
        let order = route::candidates(&snap, &Route::default(), None, None, |a| {
            self.cluster.pools.inflight(a)
        });
        for i in order.into_iter().take(MAX_ATTEMPTS) {
            let addr = snap.nodes[i].addr;
            match self.cluster.pools.get(addr, &key, super::CQL_VERSION).await {
                Ok(_) => {
                    self.cluster.offer_credentials(&creds);
                    self.auth = Auth::Done;
                    self.send(h, &Response::AuthSuccess(None));
                    return;
                }
                Err(OpenError::Refused { error, .. }) => {
                    self.credentials = None;
                    self.error(h, error);
                    return;
                }
                Err(OpenError::Unreachable { reason, .. }) => {
                    let why = format!("unreachable: {reason}");
                    self.cluster.observe(addr, Verdict::down(Source::Connect, why));
                }
                Err(OpenError::NeedsAuth { .. }) => {}
            }
        }
        self.credentials = None;
        self.error(
            h,
            ErrorBody::new(
                ec::SERVER_ERROR,
                "sluice: no node reachable to check the credentials",
            ),
        );
    }

    async fn request(&mut self, env: Envelope, req: Request, started: Instant) {
        let h = env.header;
        let snap = self.cluster.snapshot();
        let route = match &req {
            Request::Query(q) => {
                let stmt = parse(&q.query).ok();
                match &stmt {
                    Some(Statement::Use(ks)) => {
                        self.local(&h);
                        self.use_keyspace(&h, ks).await;
                        return;
                    }
                    Some(Statement::Select(sel)) => {
                        let ks = q.params.keyspace.as_deref().or(self.keyspace.as_deref());
                        if let Some(table) = systables::virtual_table(sel, ks) {
                            self.local(&h);
                            self.answer_virtual(&h, sel, table, &snap, false);
                            return;
                        }
                    }
                    _ => {}
                }
                route::for_query(&snap, self.keyspace.as_deref(), stmt.as_ref(), &q.params)
            }
            Request::Execute(e) => {
                let info = self.cluster.prepared.get(&e.id);
                if let Some(table) = info.as_ref().and_then(|i| i.virtual_table) {
                    if let Some(Statement::Select(sel)) = info.as_ref().and_then(|i| i.statement.as_ref()) {
                        let skip = e.params.flags & sluice_cql::request::query_flags::SKIP_METADATA != 0;
                        self.local(&h);
                        self.answer_virtual(&h, sel, table, &snap, skip);
                        return;
                    }
                }
                route::for_execute(&snap, info.as_deref(), &e.params)
            }
            Request::Prepare(p) => {
                let ks = p.keyspace.as_deref().or(self.keyspace.as_deref());
                if let Ok(Statement::Select(sel)) = parse(&p.query) {
                    if let Some(table) = systables::virtual_table(&sel, ks) {
                        self.local(&h);
                        self.prepare_virtual(&h, p, sel, table, &snap);
                        return;
                    }
                }
                Route::default()
            }
            Request::Batch(b) => route::for_batch(&snap, self.keyspace.as_deref(), &self.cluster.prepared, b),
            _ => Route::default(),
        };
        drop(req);
        self.send_routed(&h, env, route, started, &snap).await;
    }

    /// The route of an EXECUTE read in place ([`ExecutePeek`]); `None` when it needs the
    /// decoded request: a body the peek does not take, a virtual table sluice answers itself,
    /// or a key found only with the statement's text.
    fn route_execute(&self, version: u8, body: &Bytes) -> Option<Route> {
        let e = ExecutePeek::read(version, body)?;
        let info = self.cluster.prepared.get(e.id);
        if info.as_ref().is_some_and(|i| i.virtual_table.is_some()) {
            return None;
        }
        route::for_peeked_execute(info.as_deref(), &e)
    }

    /// Counts a routed request and hands it to the best node (see [`Inflight::dispatch`]), once
    /// the client has a permit for it.
    async fn send_routed(
        &mut self,
        h: &Header,
        env: Envelope,
        route: Route,
        started: Instant,
        snap: &super::snapshot::Snapshot,
    ) {
        self.cluster.routed(route.partition.is_some());
        let kind = if route.lwt {
            RouteKind::Lwt
        } else if route.partition.is_some() {
            RouteKind::Token
        } else {
            RouteKind::Any
        };
        self.cluster.cql_metrics.request(h.opcode(), kind);
        // The permit goes back when the request is answered (`Inflight` drops).
        match self.link.permits.try_acquire() {
            Ok(p) => p.forget(),
            Err(_) => match self.link.permits.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => return,
            },
        }
        if self.pool_key.is_none() {
            self.pool_key = Some(self.key(self.keyspace.clone()));
        }
        let key = self.pool_key.as_ref().expect("set above");
        Inflight::new(self.link.clone(), env, route, started).dispatch(key, snap);
    }

    /// `USE ks`: checked by opening (or reusing) a connection bound to that keyspace.
    async fn use_keyspace(&mut self, h: &Header, ks: &str) {
        let key = self.key(Some(ks.to_string()));
        let snap = self.cluster.snapshot();
        let order = route::candidates(&snap, &Route::default(), None, None, |a| {
            self.cluster.pools.inflight(a)
        });
        for i in order.into_iter().take(MAX_ATTEMPTS) {
            let addr = snap.nodes[i].addr;
            match self.cluster.pools.get(addr, &key, super::CQL_VERSION).await {
                Ok(_) => {
                    self.keyspace = Some(ks.to_string());
                    self.pool_key = None;
                    self.send(h, &Response::Result(ResultBody::SetKeyspace(ks.to_string())));
                    return;
                }
                Err(OpenError::Refused { error, .. }) => {
                    self.error(h, error);
                    return;
                }
                Err(OpenError::NeedsAuth { authenticator, .. }) => {
                    self.error(
                        h,
                        ErrorBody::new(ec::AUTH_ERROR, format!("the cluster requires {authenticator}")),
                    );
                    return;
                }
                Err(OpenError::Unreachable { reason, .. }) => {
                    let why = format!("unreachable: {reason}");
                    self.cluster.observe(addr, Verdict::down(Source::Connect, why));
                }
            }
        }
        self.error(h, ErrorBody::new(ec::SERVER_ERROR, "sluice: no node reachable"));
    }

    /// PREPARE of a query on a virtual table: answered by sluice, remembered as virtual.
    fn prepare_virtual(
        &self,
        h: &Header,
        p: &Prepare,
        sel: sluice_cql::statement::Select,
        table: &'static str,
        snap: &super::snapshot::Snapshot,
    ) {
        let rows = match systables::answer(&sel, table, &self.view(snap, &self.datacenter(snap))) {
            Ok(r) => r,
            Err(e) => return self.error(h, e),
        };
        let mut binds: Vec<(usize, ColumnSpec)> = Vec::new();
        for r in &sel.relations {
            for t in &r.terms {
                if let sluice_cql::statement::Term::Bind(b) = t {
                    let (i, name) = match b {
                        Bind::Positional(i) => (*i, r.column.clone()),
                        Bind::Named(n, i) => (*i, n.clone()),
                    };
                    let typ = systables::column_type(table, &r.column).unwrap_or(ColumnType::Varchar);
                    binds.push((i, ColumnSpec::new("system", table, &name, typ)));
                }
            }
        }
        binds.sort_by_key(|b| b.0);
        let columns: Vec<ColumnSpec> = binds.into_iter().map(|b| b.1).collect();
        let ks = p.keyspace.as_deref().or(self.keyspace.as_deref());
        let id = Bytes::copy_from_slice(&systables::prepared_id(ks, &p.query));
        let prepared = sluice_cql::response::Prepared {
            id: id.clone(),
            result_metadata_id: (self.v() >= 5).then(|| id.clone()),
            metadata: sluice_cql::response::PreparedMetadata {
                flags: 0,
                pk_indexes: Vec::new(),
                global_spec: (!columns.is_empty()).then(|| ("system".to_string(), table.to_string())),
                columns,
            },
            result_metadata: rows.metadata,
        };
        let mut info = PreparedInfo::new(&p.query, self.keyspace.clone(), p.keyspace.clone(), &prepared);
        info.virtual_table = Some(table);
        self.cluster.prepared.insert(id, info);
        self.send(h, &Response::Result(ResultBody::Prepared(prepared)));
    }

    fn datacenter(&self, snap: &super::snapshot::Snapshot) -> String {
        self.cluster
            .local_datacenter(snap)
            .unwrap_or_else(|| "datacenter1".into())
    }

    fn view<'a>(&'a self, snap: &'a super::snapshot::Snapshot, dc: &'a str) -> LocalView<'a> {
        let info = &snap.info;
        LocalView {
            address: self.local,
            cluster_name: if info.cluster_name.is_empty() {
                &self.cluster.config.name
            } else {
                &info.cluster_name
            },
            cql_version: if info.cql_version.is_empty() {
                "3.4.5"
            } else {
                &info.cql_version
            },
            release_version: if info.release_version.is_empty() {
                "4.0.0"
            } else {
                &info.release_version
            },
            partitioner: if info.partitioner.is_empty() {
                "org.apache.cassandra.dht.Murmur3Partitioner"
            } else {
                &info.partitioner
            },
            datacenter: dc,
            schema_version: info.schema_version,
            // A node reports the highest version it speaks, not the connection's.
            protocol_version: snap.max_version.clamp(4, 5),
        }
    }

    fn answer_virtual(
        &self,
        h: &Header,
        sel: &sluice_cql::statement::Select,
        table: &str,
        snap: &super::snapshot::Snapshot,
        skip_metadata: bool,
    ) {
        let dc = self.datacenter(snap);
        let view = self.view(snap, &dc);
        match systables::answer(sel, table, &view) {
            Ok(mut rows) => {
                if skip_metadata {
                    rows.metadata.flags |= sluice_cql::result::rows_flags::NO_METADATA;
                    rows.metadata.columns.clear();
                    rows.metadata.global_spec = None;
                }
                self.send(h, &Response::Result(ResultBody::Rows(rows)))
            }
            Err(e) => self.error(h, e),
        }
    }
}

/// Forwards SCHEMA_CHANGE events of the cluster to a client that registered for them.
async fn relay_schema_events(cluster: Arc<CqlCluster>, out: Arc<Outbox>, version: u8) {
    let mut rx = cluster.schema_events.subscribe();
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(sc) => {
                    let resp = Response::Event(Event::SchemaChange(sc));
                    if out.push(Out::Envelope(envelope(version, -1, &resp))).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
            _ = out.ended() => return,
        }
    }
}
