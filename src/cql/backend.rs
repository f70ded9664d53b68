//! One multiplexed connection to a node: the handshake (STARTUP, PasswordAuthenticator, USE),
//! then any number of concurrent requests, each on a stream id of this connection (clients'
//! stream ids are remapped here and restored on the way back).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::gauge::Gauge;
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::Header;
use sluice_cql::request::{Extensions, Query, QueryParams};
use sluice_cql::response::ErrorBody;
use sluice_cql::{Compression, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

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

type Waiter = oneshot::Sender<Envelope>;

/// What the writer half is told.
enum Outgoing {
    Frame(Envelope),
    Close,
}

struct Streams {
    waiting: HashMap<i16, Waiter>,
    free: Vec<i16>,
}

/// An open, multiplexed connection.
pub struct BackendConn {
    tx: mpsc::UnboundedSender<Outgoing>,
    streams: Arc<Mutex<Streams>>,
    closed: Arc<AtomicBool>,
    /// Cancelled when the connection ends (EOF, reset, a write error, or `close`).
    lost: CancellationToken,
    inflight: AtomicUsize,
    /// When the connection opened, and when it last received bytes (milliseconds after that).
    opened_at: std::time::Instant,
    last_read_ms: Arc<AtomicU64>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let streams = Arc::new(Mutex::new(Streams {
            waiting: HashMap::new(),
            free: (0..=i16::MAX).rev().collect(),
        }));
        let closed = Arc::new(AtomicBool::new(false));
        let lost = CancellationToken::new();
        let opened_at = std::time::Instant::now();
        let last_read_ms = Arc::new(AtomicU64::new(0));
        let ends = Ends {
            addr,
            read_at: (opened_at, last_read_ms.clone()),
            streams: streams.clone(),
            closed: closed.clone(),
            lost: lost.clone(),
            events: o.events.clone(),
            gauge: o.gauge.clone(),
        };
        match stream {
            MaybeTls::Plain(tcp) => {
                let (rd, wr) = tcp.into_split();
                spawn_loops(rd, wr, enc, dec, buf, rx, ends);
            }
            MaybeTls::Tls(tls) => {
                let (rd, wr) = tokio::io::split(*tls);
                spawn_loops(rd, wr, enc, dec, buf, rx, ends);
            }
        }
        Ok(Opened {
            conn: Arc::new(BackendConn {
                tx,
                streams,
                closed,
                lost,
                inflight: AtomicUsize::new(0),
                opened_at,
                last_read_ms,
            }),
        })
    }

    /// Whether the connection can no longer be used.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves when the connection has ended (the node closed or reset it, a write failed,
    /// or it was closed here).
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// How long the connection has received nothing from its node.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed));
        self.opened_at.elapsed().saturating_sub(last)
    }

    /// Requests waiting for an answer on this connection.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Sends `env` on a free stream id and waits for the answer, which comes back with the
    /// original stream id restored.
    pub async fn request(&self, env: &Envelope, timeout: Duration) -> Result<Envelope, RequestError> {
        if self.is_closed() {
            return Err(RequestError::Lost);
        }
        let (tx, rx) = oneshot::channel();
        let stream = {
            let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            let Some(id) = s.free.pop() else {
                return Err(RequestError::Busy);
            };
            s.waiting.insert(id, tx);
            id
        };
        let mut header = env.header;
        header.stream = stream;
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .tx
            .send(Outgoing::Frame(Envelope::new(header, env.body.clone())))
            .is_ok();
        let out = if !sent {
            Err(RequestError::Lost)
        } else {
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
        };
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        out
    }

    /// Closes the connection (pending requests fail with `Lost`).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.tx.send(Outgoing::Close);
        self.lost.cancel();
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

/// What the reader and writer halves share about the connection's end.
struct Ends {
    addr: SocketAddr,
    /// When the connection opened, and when it last received bytes (ms after that).
    read_at: (std::time::Instant, Arc<AtomicU64>),
    streams: Arc<Mutex<Streams>>,
    closed: Arc<AtomicBool>,
    lost: CancellationToken,
    events: Option<mpsc::UnboundedSender<Envelope>>,
    gauge: Option<Gauge>,
}

fn spawn_loops<R, W>(
    rd: R,
    wr: W,
    enc: Encoder,
    dec: Decoder,
    buf: BytesMut,
    rx: mpsc::UnboundedReceiver<Outgoing>,
    e: Ends,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    if let Some(g) = &e.gauge {
        g.inc();
    }
    tokio::spawn(write_loop(wr, enc, rx, e.closed.clone(), e.lost.clone()));
    tokio::spawn(async move {
        let conn = (e.streams, e.closed, e.lost, e.read_at);
        read_loop(e.addr, rd, dec, buf, conn, e.events).await;
        if let Some(g) = &e.gauge {
            g.dec();
        }
    });
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    enc: Encoder,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    closed: Arc<AtomicBool>,
    lost: CancellationToken,
) {
    let mut buf = BytesMut::new();
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut stop = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Outgoing::Frame(e) => batch.push(e),
                Outgoing::Close => {
                    stop = true;
                    break;
                }
            }
            if batch.len() < 256 {
                next = rx.try_recv().ok();
            }
        }
        enc.encode_all(&batch, &mut buf);
        batch.clear();
        if wr.write_all(&buf).await.is_err() || stop || closed.load(Ordering::Acquire) {
            break;
        }
        buf.clear();
    }
    closed.store(true, Ordering::Release);
    lost.cancel();
    let _ = wr.shutdown().await;
}

/// What the reader shares with the connection: the waiting requests, the closed flag and
/// token, and when bytes last arrived.
type ConnState = (
    Arc<Mutex<Streams>>,
    Arc<AtomicBool>,
    CancellationToken,
    (std::time::Instant, Arc<AtomicU64>),
);

async fn read_loop<R: AsyncRead + Unpin>(
    addr: SocketAddr,
    mut rd: R,
    mut dec: Decoder,
    mut buf: BytesMut,
    // The waiting requests; `closed` and `lost` are set and cancelled when the connection
    // ends; `read_at` records when bytes last arrived.
    (streams, closed, lost, read_at): ConnState,
    events: Option<mpsc::UnboundedSender<Envelope>>,
) {
    'outer: loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(env)) => {
                    let id = env.header.stream;
                    if id < 0 {
                        if let Some(tx) = &events {
                            let _ = tx.send(env);
                        }
                        continue;
                    }
                    let waiter = {
                        let mut s = streams.lock().unwrap_or_else(|e| e.into_inner());
                        let w = s.waiting.remove(&id);
                        if w.is_some() {
                            s.free.push(id);
                        }
                        w
                    };
                    if let Some(w) = waiter {
                        let _ = w.send(env);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(node = %addr, error = %e, "backend sent bytes that do not frame; closing");
                    break 'outer;
                }
            }
        }
        // A closed connection stops waiting at once: a frozen node sends no EOF, and the
        // requests waiting here must fail (as lost) now, not at their timeout.
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = lost.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let (opened_at, last) = &read_at;
                last.store(opened_at.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        if closed.load(Ordering::Acquire) {
            break;
        }
    }
    closed.store(true, Ordering::Release);
    lost.cancel();
    // Dropping the waiters fails every pending request with `Lost`.
    let mut s = streams.lock().unwrap_or_else(|e| e.into_inner());
    s.waiting.clear();
}
