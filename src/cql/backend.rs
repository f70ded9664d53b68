//! One multiplexed connection to a node: the handshake (STARTUP, PasswordAuthenticator, USE),
//! then any number of concurrent requests, each on a stream id of this connection (clients'
//! stream ids are remapped here and restored on the way back).
//!
//! A client's request ([`Inflight`]) waits in its stream id's slot, and the connection's
//! reader hands its answer straight to the client's outbox ([`Inflight::answered`]): no task
//! and no channel per request. sluice's own requests (heartbeats, the control connection,
//! re-prepares) wait on a oneshot ([`BackendConn::request`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::gauge::Gauge;
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::Header;
use sluice_cql::request::{Extensions, Query, QueryParams};
use sluice_cql::response::ErrorBody;
use sluice_cql::{Compression, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::forward::Inflight;
use super::outbox::{Cork, Out, Outbox};
use super::pool::{NodeLoad, PoolKey};
use crate::common::tls::{BackendStream, BackendTls, MaybeTls};

/// Login credentials (PasswordAuthenticator, SASL PLAIN).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.user)
    }
}

impl Credentials {
    /// The SASL PLAIN token.
    pub fn token(&self) -> Bytes {
        let mut t = Vec::with_capacity(self.user.len() + self.password.len() + 2);
        t.push(0);
        t.extend_from_slice(self.user.as_bytes());
        t.push(0);
        t.extend_from_slice(self.password.as_bytes());
        Bytes::from(t)
    }

    /// Credentials from a SASL PLAIN token (`[authzid] NUL user NUL password`).
    pub fn from_token(token: &[u8]) -> Option<Credentials> {
        let mut parts = token.split(|b| *b == 0);
        let _authzid = parts.next()?;
        let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
        let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
        Some(Credentials { user, password })
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// TCP connect (or the handshake) failed or timed out: the node is unreachable.
    #[error("cannot connect to {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    /// The node answered with an error (authentication, USE of a missing keyspace, version).
    #[error("{addr} refused the connection: {}", .error.message)]
    Refused { addr: SocketAddr, error: ErrorBody },
    /// The node wants credentials and there are none.
    #[error("{addr} requires authentication ({authenticator})")]
    NeedsAuth { addr: SocketAddr, authenticator: String },
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The connection closed before the answer came.
    #[error("connection to the node was lost")]
    Lost,
    /// No answer within the request timeout.
    #[error("no answer within the request timeout")]
    Timeout,
    /// Every stream id of the connection is in use.
    #[error("no free stream id on the connection")]
    Busy,
}

/// What waits for the answer on one stream id.
enum Slot {
    Free,
    /// One of sluice's own requests.
    Waiter(oneshot::Sender<Envelope>),
    /// A client's request: the answer goes to the client's outbox.
    Client(Inflight),
    /// A client's request that timed out: the id stays reserved until its late answer
    /// arrives (and is dropped) or the connection ends, so that a late answer can never
    /// reach another request.
    Abandoned,
}

struct Streams {
    /// By stream id; grown as ids are first used (ids are reused lowest-first).
    slots: Vec<Slot>,
    free: Vec<i16>,
    /// Set (under the lock) when the reader has failed every waiting request: nothing may
    /// wait here any more.
    closed: bool,
}

impl Streams {
    fn slot(&mut self, id: i16) -> &mut Slot {
        let i = id as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || Slot::Free);
        }
        &mut self.slots[i]
    }

    /// Takes what waits on `id` and frees the id (ids not in use are ignored).
    fn take(&mut self, id: i16) -> Slot {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return Slot::Free;
        };
        let taken = std::mem::replace(slot, Slot::Free);
        if !matches!(taken, Slot::Free) {
            self.free.push(id);
        }
        taken
    }
}

/// The node and pool a connection belongs to, as request completions need them.
pub struct ConnInfo {
    pub addr: SocketAddr,
    /// What the connection is bound to (protocol version, keyspace, credentials).
    pub key: PoolKey,
    /// Clients' requests in flight to the node, and its timeouts in a row.
    pub load: Arc<NodeLoad>,
}

/// What the connection's halves and its handle share.
struct Shared {
    info: ConnInfo,
    streams: Mutex<Streams>,
    closed: AtomicBool,
    /// Cancelled when the connection ends (EOF, reset, a write error, or `close`).
    lost: CancellationToken,
    /// Requests waiting for an answer (clients' and sluice's own).
    inflight: AtomicUsize,
    /// When the connection opened, and when it last received bytes (milliseconds after that).
    opened_at: Instant,
    last_read_ms: AtomicU64,
}

impl Shared {
    fn streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request that stopped waiting (answered, timed out, lost).
    fn ended(&self, slot: &Slot) {
        match slot {
            Slot::Client(_) => {
                self.info.load.ended();
                self.inflight.fetch_sub(1, Ordering::Relaxed);
            }
            Slot::Waiter(_) => {
                self.inflight.fetch_sub(1, Ordering::Relaxed);
            }
            Slot::Free | Slot::Abandoned => {}
        }
    }
}

/// An open, multiplexed connection.
pub struct BackendConn {
    /// The socket's write half: requests are written from the task that sends them.
    out: Arc<Outbox>,
    shared: Arc<Shared>,
    /// The core whose runtime runs the connection's reader and writer.
    core: usize,
}

impl Drop for BackendConn {
    /// Nobody can send on it any more: the writer ends once it has written what is queued
    /// (then the connection counts as lost, as when the node closes it).
    fn drop(&mut self) {
        self.out.close();
    }
}

/// An opened connection.
pub struct Opened {
    pub conn: Arc<BackendConn>,
}

/// A raw framed connection used during the handshake.
struct Raw {
    stream: BackendStream,
    dec: Decoder,
    enc: Encoder,
    buf: BytesMut,
}

impl Raw {
    async fn send(&mut self, env: &Envelope) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.enc.encode(env, &mut out);
        self.stream.write_all(&out).await
    }

    async fn recv(&mut self) -> std::io::Result<Envelope> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(env)) if env.header.stream >= 0 => return Ok(env),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
        }
    }

    async fn call(&mut self, version: u8, stream: i16, req: &Request) -> std::io::Result<Response> {
        let env = Envelope::new(
            Header::request(version, stream, req.opcode()),
            req.to_body(version),
        );
        self.send(&env).await?;
        let env = self.recv().await?;
        decode_response(&env).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Decodes a response envelope's message.
pub fn decode_response(env: &Envelope) -> Result<Response, sluice_cql::DecodeError> {
    let (_, body) = Extensions::split(&env.header, env.body.clone())?;
    Response::decode(env.header.version, env.header.opcode, body)
}

/// Options of one connection to open.
pub struct OpenOptions<'a> {
    pub version: u8,
    pub keyspace: Option<&'a str>,
    pub credentials: Option<&'a Credentials>,
    pub cql_version: &'a str,
    pub timeout: Duration,
    /// Ask OPTIONS first and return SUPPORTED.
    pub options: bool,
    /// Where EVENT messages go (the control connection); other connections drop them.
    pub events: Option<mpsc::UnboundedSender<Envelope>>,
    /// TLS towards the node (`backend_tls`).
    pub tls: &'a BackendTls,
    /// Counts the connection while it is open (`sluice_cql_node_connections`).
    pub gauge: Option<Gauge>,
    /// The node's load in its pool (`None` outside the pools).
    pub load: Option<Arc<NodeLoad>>,
}

impl BackendConn {
    /// Connects and runs the handshake; the connection is ready for requests.
    pub async fn open(addr: SocketAddr, o: OpenOptions<'_>) -> Result<Opened, OpenError> {
        let unreachable = |reason: String| OpenError::Unreachable { addr, reason };
        let fut = Self::handshake(addr, &o);
        match tokio::time::timeout(o.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(unreachable(format!("no handshake within {:?}", o.timeout))),
        }
    }

    async fn handshake(addr: SocketAddr, o: &OpenOptions<'_>) -> Result<Opened, OpenError> {
        let io = |e: std::io::Error| OpenError::Unreachable {
            addr,
            reason: e.to_string(),
        };
        let tcp = TcpStream::connect(addr).await.map_err(io)?;
        let _ = tcp.set_nodelay(true);
        let stream = match o.tls.mode {
            crate::config::BackendTlsMode::Disable => MaybeTls::Plain(tcp),
            mode => o
                .tls
                .connect(&addr.ip().to_string(), tcp)
                .await
                .map_err(|e| OpenError::Unreachable {
                    addr,
                    reason: format!(
                        "TLS handshake failed (backend_tls = \"{}\"): {e}",
                        tls_mode_name(mode)
                    ),
                })?,
        };
        let mut raw = Raw {
            stream,
            dec: Decoder::default(),
            enc: Encoder::new(),
            buf: BytesMut::new(),
        };
        let v = o.version;
        let refused = |error: ErrorBody| OpenError::Refused { addr, error };
        if o.options {
            match raw.call(v, 0, &Request::Options).await.map_err(io)? {
                Response::Supported(_) => {}
                Response::Error(e) => return Err(refused(e)),
                other => {
                    return Err(io(std::io::Error::other(format!(
                        "unexpected {:?}",
                        other.opcode()
                    ))))
                }
            }
        }
        let startup = Request::Startup(vec![("CQL_VERSION".into(), o.cql_version.into())]);
        let first = raw.call(v, 0, &startup).await.map_err(io)?;
        match first {
            Response::Ready => {
                raw.dec.set_framing(Framing::after_startup(v, Compression::None));
                raw.enc.set_framing(Framing::after_startup(v, Compression::None));
            }
            Response::Authenticate(authenticator) => {
                raw.dec.set_framing(Framing::after_startup(v, Compression::None));
                raw.enc.set_framing(Framing::after_startup(v, Compression::None));
                let Some(c) = o.credentials else {
                    return Err(OpenError::NeedsAuth { addr, authenticator });
                };
                match raw
                    .call(v, 0, &Request::AuthResponse(Some(c.token())))
                    .await
                    .map_err(io)?
                {
                    Response::AuthSuccess(_) => {}
                    Response::Error(e) => return Err(refused(e)),
                    Response::AuthChallenge(_) => {
                        return Err(refused(ErrorBody::new(
                            sluice_cql::response::error_code::AUTH_ERROR,
                            format!(
                                "{authenticator} sent a challenge; only PasswordAuthenticator is supported"
                            ),
                        )))
                    }
                    other => {
                        return Err(io(std::io::Error::other(format!(
                            "unexpected {:?}",
                            other.opcode()
                        ))))
                    }
                }
            }
            Response::Error(e) => return Err(refused(e)),
            other => {
                return Err(io(std::io::Error::other(format!(
                    "unexpected {:?}",
                    other.opcode()
                ))))
            }
        }
        if let Some(ks) = o.keyspace {
            let q = Request::Query(Query {
                query: format!("USE \"{}\"", ks.replace('"', "\"\"")),
                params: QueryParams::new(1),
            });
            if let Response::Error(e) = raw.call(v, 0, &q).await.map_err(io)? {
                return Err(refused(e));
            }
        }
        let Raw {
            stream,
            dec,
            enc,
            buf,
            ..
        } = raw;
        let shared = Arc::new(Shared {
            info: ConnInfo {
                addr,
                key: PoolKey {
                    version: o.version,
                    keyspace: o.keyspace.map(str::to_string),
                    credentials: o.credentials.cloned(),
                },
                load: o.load.clone().unwrap_or_else(|| Arc::new(NodeLoad::detached())),
            },
            streams: Mutex::new(Streams {
                slots: Vec::new(),
                free: (0..=i16::MAX).rev().collect(),
                closed: false,
            }),
            closed: AtomicBool::new(false),
            lost: CancellationToken::new(),
            inflight: AtomicUsize::new(0),
            opened_at: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        });
        let ends = Ends {
            shared: shared.clone(),
            events: o.events.clone(),
            gauge: o.gauge.clone(),
        };
        // The requests waiting for a node are bounded by the stream ids, not here.
        let out = match stream {
            MaybeTls::Plain(tcp) => {
                let (rd, wr) = tcp.into_split();
                spawn_loops(rd, Outbox::new(wr, enc, usize::MAX), dec, buf, ends)
            }
            MaybeTls::Tls(tls) => {
                let (rd, wr) = tokio::io::split(*tls);
                spawn_loops(rd, Outbox::new(wr, enc, usize::MAX), dec, buf, ends)
            }
        };
        Ok(Opened {
            conn: Arc::new(BackendConn {
                out,
                shared,
                core: crate::common::runtime::current_core(),
            }),
        })
    }

    /// Whether the connection can no longer be used.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// The node and pool key of the connection.
    pub fn info(&self) -> &ConnInfo {
        &self.shared.info
    }

    /// Resolves when the connection has ended (the node closed or reset it, a write failed,
    /// or it was closed here).
    pub async fn lost(&self) {
        self.shared.lost.cancelled().await
    }

    /// How long the connection has received nothing from its node.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.shared.last_read_ms.load(Ordering::Relaxed));
        self.shared.opened_at.elapsed().saturating_sub(last)
    }

    /// The core whose runtime reads the connection's answers (see [`crate::common::runtime`]).
    pub fn core(&self) -> usize {
        self.core
    }

    /// Requests waiting for an answer on this connection.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed)
    }

    /// Reserves a free stream id for `slot`, counts it in flight and writes the request on
    /// it; `Err` gives `slot` back.
    // The request comes back by value when it cannot be written (rare): moving it costs
    // less than boxing it on every error.
    #[allow(clippy::result_large_err)]
    fn start(&self, mut header: Header, body: Bytes, slot: Slot) -> Result<i16, (RequestError, Slot)> {
        let id = {
            let mut s = self.shared.streams();
            if s.closed || self.is_closed() {
                return Err((RequestError::Lost, slot));
            }
            let Some(id) = s.free.pop() else {
                return Err((RequestError::Busy, slot));
            };
            if let Slot::Client(_) = &slot {
                self.shared.info.load.started();
            }
            self.shared.inflight.fetch_add(1, Ordering::Relaxed);
            *s.slot(id) = slot;
            id
        };
        header.stream = id;
        // Written outside the lock: the write may be a system call.
        if self.out.push(Out::Envelope(Envelope::new(header, body))).is_err() {
            // The writer is gone: the reader fails what waits (or already has).
            let mut s = self.shared.streams();
            let slot = s.take(id);
            self.shared.ended(&slot);
            return match slot {
                Slot::Free => Err((RequestError::Lost, Slot::Free)),
                slot => Err((RequestError::Lost, slot)),
            };
        }
        Ok(id)
    }

    /// Writes a client's request on a free stream id; its answer (or its loss) goes to
    /// [`Inflight`]'s completions. `Err` gives the request back unless the connection's
    /// reader already failed it as lost.
    #[allow(clippy::result_large_err)]
    pub(super) fn send(&self, req: Inflight) -> Result<(), (RequestError, Option<Inflight>)> {
        let (header, body) = (req.request().header, req.request().body.clone());
        match self.start(header, body, Slot::Client(req)) {
            Ok(_) => Ok(()),
            Err((e, Slot::Client(req))) => Err((e, Some(req))),
            Err((e, _)) => Err((e, None)),
        }
    }

    /// Sends `env` on a free stream id and waits for the answer, which comes back with the
    /// original stream id restored.
    pub async fn request(&self, env: &Envelope, timeout: Duration) -> Result<Envelope, RequestError> {
        let (tx, rx) = oneshot::channel();
        if let Err((e, _)) = self.start(env.header, env.body.clone(), Slot::Waiter(tx)) {
            return Err(e);
        }
        // On timeout the id stays reserved until its answer arrives (or the connection
        // dies), so a late answer can never reach another request.
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(mut resp)) => {
                resp.header.stream = env.header.stream;
                Ok(resp)
            }
            Ok(Err(_)) => Err(RequestError::Lost),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Clients' requests written at or before `sent_before` that still wait: each is taken
    /// out (its id stays reserved until the late answer arrives) and returned, to be failed
    /// with a timeout.
    pub(super) fn expired(&self, sent_before: std::time::Instant) -> Vec<Inflight> {
        let mut out = Vec::new();
        let mut s = self.shared.streams();
        for slot in s.slots.iter_mut() {
            if matches!(slot, Slot::Client(r) if r.sent() <= sent_before) {
                let taken = std::mem::replace(slot, Slot::Abandoned);
                self.shared.ended(&taken);
                if let Slot::Client(r) = taken {
                    out.push(r);
                }
            }
        }
        out
    }

    /// Closes the connection (pending requests fail with `Lost`).
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.out.close();
        self.shared.lost.cancel();
    }
}

fn tls_mode_name(mode: crate::config::BackendTlsMode) -> &'static str {
    use crate::config::BackendTlsMode::*;
    match mode {
        Disable => "disable",
        Prefer => "prefer",
        Require => "require",
        VerifyFull => "verify-full",
    }
}

/// What the reader and writer halves get.
struct Ends {
    shared: Arc<Shared>,
    events: Option<mpsc::UnboundedSender<Envelope>>,
    gauge: Option<Gauge>,
}

/// Starts the reader and the outbox's writer task; returns the outbox.
fn spawn_loops<R>(rd: R, out: Arc<Outbox>, dec: Decoder, buf: BytesMut, e: Ends) -> Arc<Outbox>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    if let Some(g) = &e.gauge {
        g.inc();
    }
    // The writer ends when a write fails, or when the connection is closed or dropped (once
    // what is queued is written): the connection is lost from then on.
    let shared = e.shared.clone();
    tokio::spawn(out.clone().run(move || {
        shared.closed.store(true, Ordering::Release);
        shared.lost.cancel();
    }));
    tokio::spawn(async move {
        read_loop(rd, dec, buf, &e.shared, e.events).await;
        if let Some(g) = &e.gauge {
            g.dec();
        }
    });
    out
}

/// Reads answers until the connection ends: each goes to what waits on its stream id
/// (taken out under one lock per read), then, at the end, every waiting request fails as
/// lost.
async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    mut dec: Decoder,
    mut buf: BytesMut,
    shared: &Shared,
    events: Option<mpsc::UnboundedSender<Envelope>>,
) {
    let addr = shared.info.addr;
    let mut answers: Vec<Envelope> = Vec::new();
    let mut waiting: Vec<Slot> = Vec::new();
    // When the bytes in `buf` were read: the end of their requests' latency.
    let mut received = Instant::now();
    'outer: loop {
        let mut broken = false;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(env)) if env.header.stream < 0 => {
                    if let Some(tx) = &events {
                        let _ = tx.send(env);
                    }
                }
                Ok(Some(env)) => answers.push(env),
                Ok(None) => break,
                Err(e) => {
                    debug!(node = %addr, error = %e, "backend sent bytes that do not frame; closing");
                    broken = true;
                    break;
                }
            }
        }
        if !answers.is_empty() {
            // The answers to one client leave in one write (and requests sent elsewhere, in
            // one write per node), once all are delivered.
            let _cork = Cork::new();
            {
                let mut s = shared.streams();
                for env in &answers {
                    let slot = s.take(env.header.stream);
                    shared.ended(&slot);
                    waiting.push(slot);
                }
            }
            for (env, slot) in answers.drain(..).zip(waiting.drain(..)) {
                match slot {
                    Slot::Waiter(w) => {
                        let _ = w.send(env);
                    }
                    Slot::Client(req) => req.answered(env, &shared.info, received),
                    Slot::Free | Slot::Abandoned => {}
                }
            }
        }
        if broken {
            break 'outer;
        }
        // A closed connection stops waiting at once: a frozen node sends no EOF, and the
        // requests waiting here must fail (as lost) now, not at their timeout.
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = shared.lost.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                received = Instant::now();
                let ms = received.saturating_duration_since(shared.opened_at).as_millis() as u64;
                shared.last_read_ms.store(ms, Ordering::Relaxed);
            }
        }
        if shared.closed.load(Ordering::Acquire) {
            break;
        }
    }
    shared.closed.store(true, Ordering::Release);
    shared.lost.cancel();
    let pending: Vec<Slot> = {
        let mut s = shared.streams();
        s.closed = true;
        let slots = std::mem::take(&mut s.slots);
        for slot in &slots {
            shared.ended(slot);
        }
        slots
    };
    // Dropping the waiters fails sluice's own requests with `Lost`; clients' requests are
    // sent elsewhere or failed, by the rules of [`Inflight::lost`].
    let _cork = Cork::new();
    for slot in pending {
        if let Slot::Client(req) = slot {
            req.lost(&shared.info);
        }
    }
}
