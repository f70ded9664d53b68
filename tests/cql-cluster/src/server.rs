//! One node's native transport: accepting connections, version negotiation, STARTUP with
//! compression and optional PasswordAuthenticator, v5 segment framing after READY, REGISTER and
//! event pushes, and dispatch of requests to the engine.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::{flags, Header, Opcode};
use sluice_cql::request::Extensions;
use sluice_cql::response::{error_code as ec, ErrorBody, Event};
use sluice_cql::{Compression, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::engine::{self, Session};
use crate::values::random_uuid;
use crate::{Shared, Subscriber};

/// The most a body may claim.
const MAX_BODY: usize = 256 * 1024 * 1024;
const AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";

/// What the writer half of a connection is told.
pub(crate) enum Out {
    Envelope(Envelope),
    /// Switch framing for everything queued after this.
    Framing(Framing),
    /// An event, framed with the connection's version.
    Event(Event),
    /// Bytes written as they are (answers to a version the codec does not frame).
    Raw(Bytes),
    /// Flush and close.
    Close,
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, node: usize, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = shared
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tasks_of = shared.clone();
        let shared = shared.clone();
        let handle = match shared.tls.clone() {
            None => tokio::spawn(async move {
                let (rd, wr) = stream.into_split();
                connection(shared, node, conn, rd, wr).await
            }),
            // TLS from the first byte, as a node with client_encryption_options enabled
            // (and not optional) speaks it.
            Some(acceptor) => tokio::spawn(async move {
                let accepted = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await;
                if let Ok(Ok(tls)) = accepted {
                    let (rd, wr) = tokio::io::split(tls);
                    connection(shared, node, conn, rd, wr).await
                }
            }),
        };
        let mut tasks = tasks_of.tasks[node].lock().unwrap_or_else(|e| e.into_inner());
        tasks.conns.retain(|_, h| !h.is_finished());
        tasks.conns.insert(conn, handle);
    }
}

async fn connection<R, W>(shared: Arc<Shared>, node: usize, conn: u64, rd: R, wr: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let version = Arc::new(std::sync::atomic::AtomicU8::new(4));
    let reader = read_loop(shared.clone(), node, conn, rd, tx, version.clone());
    let writer = write_loop(shared.clone(), node, wr, rx, version);
    tokio::join!(reader, writer);
    shared
        .subscribers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|s| s.conn != conn);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    node: usize,
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    version: Arc<std::sync::atomic::AtomicU8>,
) {
    let mut enc = Encoder::new();
    let mut buf = BytesMut::new();
    let mut pending: Vec<Envelope> = Vec::new();
    while let Some(first) = rx.recv().await {
        shared.while_frozen(node).await;
        let mut close = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Out::Envelope(e) => pending.push(e),
                Out::Event(ev) => {
                    let v = version.load(std::sync::atomic::Ordering::Relaxed);
                    let body = Response::Event(ev).to_body(v);
                    pending.push(Envelope::new(Header::response(v, -1, Opcode::Event), body));
                }
                Out::Framing(f) => {
                    enc.encode_all(&pending, &mut buf);
                    pending.clear();
                    enc.set_framing(f);
                }
                Out::Raw(b) => {
                    enc.encode_all(&pending, &mut buf);
                    pending.clear();
                    buf.put_slice(&b);
                }
                Out::Close => {
                    close = true;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        enc.encode_all(&pending, &mut buf);
        pending.clear();
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        if close {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    node: usize,
    tx: mpsc::UnboundedSender<Out>,
    version: Option<u8>,
    shared_version: Arc<std::sync::atomic::AtomicU8>,
    started: bool,
    authenticated: bool,
    /// Framing the decoder switches to after STARTUP.
    framing: Option<Framing>,
    session: Session,
}

impl Conn {
    fn send(&self, header: &Header, resp: &Response, ext: Extensions) {
        let v = self.version.unwrap_or(4);
        let mut body = BytesMut::new();
        ext.encode(&mut body);
        resp.encode(v, &mut body);
        let mut h = Header::response(v, header.stream, resp.opcode());
        h.flags = ext.flags();
        let _ = self.tx.send(Out::Envelope(Envelope::new(h, body.freeze())));
    }

    fn error(&self, header: &Header, e: ErrorBody) {
        self.send(header, &Response::Error(e), Extensions::default());
    }

    fn ready(&self) -> bool {
        self.started && (self.shared.credentials.is_none() || self.authenticated)
    }

    /// Handles one request; returns false to close the connection.
    fn handle(&mut self, env: Envelope) -> bool {
        let h = env.header;
        let v = self.version.unwrap_or(h.version);
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
            self.error(&h, ErrorBody::protocol("Invalid request direction"));
            return true;
        }
        let (_, body) = match Extensions::split(&h, env.body) {
            Ok(x) => x,
            Err(e) => {
                self.error(&h, ErrorBody::protocol(format!("Invalid frame body: {e}")));
                return true;
            }
        };
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
                let supported = vec![
                    (
                        "PROTOCOL_VERSIONS".to_string(),
                        vec!["4/v4".to_string(), "5/v5".to_string()],
                    ),
                    (
                        "COMPRESSION".to_string(),
                        vec!["snappy".to_string(), "lz4".to_string()],
                    ),
                    ("CQL_VERSION".to_string(), vec![crate::CQL_VERSION.to_string()]),
                ];
                self.send(&h, &Response::Supported(supported), Extensions::default());
            }
            Request::Startup(opts) => {
                if self.started {
                    self.error(
                        &h,
                        ErrorBody::protocol(
                            "Unexpected message STARTUP, the connection is already initialised",
                        ),
                    );
                    return true;
                }
                let compression = match opts.iter().find(|(k, _)| k.eq_ignore_ascii_case("COMPRESSION")) {
                    None => Compression::None,
                    Some((_, name)) => match Compression::from_name(name) {
                        Some(Compression::Snappy) if v >= 5 => {
                            self.error(
                                &h,
                                ErrorBody::protocol("Snappy compression is not supported in protocol v5"),
                            );
                            return true;
                        }
                        Some(c) => c,
                        None => {
                            self.error(
                                &h,
                                ErrorBody::protocol(format!("Unknown compression algorithm: {name}")),
                            );
                            return true;
                        }
                    },
                };
                self.started = true;
                let framing = Framing::after_startup(v, compression);
                self.framing = Some(framing);
                let reply = if self.shared.credentials.is_some() {
                    Response::Authenticate(AUTHENTICATOR.into())
                } else {
                    Response::Ready
                };
                if v < 5 {
                    // v4: READY itself is already compressed.
                    let _ = self.tx.send(Out::Framing(framing));
                    self.send(&h, &reply, Extensions::default());
                } else {
                    self.send(&h, &reply, Extensions::default());
                    let _ = self.tx.send(Out::Framing(framing));
                }
                return true;
            }
            Request::AuthResponse(token) => {
                if !self.started || self.shared.credentials.is_none() || self.authenticated {
                    self.error(&h, ErrorBody::protocol("Unexpected AUTH_RESPONSE"));
                    return true;
                }
                let token = token.unwrap_or_default();
                let mut parts = token.split(|b| *b == 0).skip(1);
                let user = String::from_utf8_lossy(parts.next().unwrap_or_default()).to_string();
                let pass = String::from_utf8_lossy(parts.next().unwrap_or_default()).to_string();
                if self.shared.credentials.as_ref() == Some(&(user.clone(), pass)) {
                    self.authenticated = true;
                    self.send(&h, &Response::AuthSuccess(None), Extensions::default());
                } else {
                    self.error(
                        &h,
                        ErrorBody::new(
                            ec::AUTH_ERROR,
                            format!("Provided username {user} and/or password are incorrect"),
                        ),
                    );
                }
            }
            Request::Register(types) => {
                if !self.ready() {
                    self.error(
                        &h,
                        ErrorBody::protocol("Unexpected message REGISTER, expecting STARTUP or OPTIONS"),
                    );
                    return true;
                }
                self.shared
                    .subscribers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Subscriber {
                        node: self.node,
                        conn: self.session.conn,
                        types,
                        tx: self.tx.clone(),
                    });
                self.send(&h, &Response::Ready, Extensions::default());
            }
            req => {
                if !self.ready() {
                    let what = h.opcode().map_or("UNKNOWN", Opcode::name);
                    self.error(
                        &h,
                        ErrorBody::protocol(format!(
                            "Unexpected message {what}, expecting STARTUP or OPTIONS"
                        )),
                    );
                    return true;
                }
                let op = h.opcode().unwrap_or(Opcode::Query);
                let r = match &req {
                    Request::Query(q) => engine::Request::Query(q),
                    Request::Prepare(p) => engine::Request::Prepare(p),
                    Request::Execute(e) => engine::Request::Execute(e),
                    Request::Batch(b) => engine::Request::Batch(b),
                    _ => return true,
                };
                self.session.version = v;
                let reply = engine::handle(&self.shared, self.node, &mut self.session, op, r);
                for ev in &reply.events {
                    self.shared
                        .broadcast(&Event::SchemaChange(ev.clone()), "SCHEMA_CHANGE", None);
                }
                let ext = Extensions {
                    tracing_id: (h.flags & flags::TRACING != 0).then(random_uuid),
                    warnings: (!reply.warnings.is_empty()).then_some(reply.warnings),
                    custom_payload: None,
                };
                self.send(&h, &reply.response, ext);
            }
        }
        true
    }
}

/// The ERROR a peer speaking an unsupported version gets, framed so it can read it.
fn version_error(first: &[u8]) -> Bytes {
    let v = first[0] & 0x7f;
    let msg = format!("Invalid or unsupported protocol version ({v}); supported versions are (4/v4, 5/v5)");
    let body = Response::Error(ErrorBody::protocol(msg)).to_body(4);
    let mut out = BytesMut::new();
    if v <= 2 {
        out.put_u8(0x80 | v);
        out.put_u8(0);
        out.put_u8(first.get(2).copied().unwrap_or(0));
        out.put_u8(Opcode::Error as u8);
        out.put_u32(body.len() as u32);
    } else {
        let stream = match (first.get(2), first.get(3)) {
            (Some(a), Some(b)) => i16::from_be_bytes([*a, *b]),
            _ => 0,
        };
        let reply_version = if v == 3 { 3 } else { 5 };
        Header::response(reply_version, stream, Opcode::Error).encode(body.len(), &mut out);
    }
    out.put_slice(&body);
    out.freeze()
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    node: usize,
    conn: u64,
    mut rd: R,
    tx: mpsc::UnboundedSender<Out>,
    shared_version: Arc<std::sync::atomic::AtomicU8>,
) {
    let mut c = Conn {
        shared,
        node,
        tx: tx.clone(),
        version: None,
        shared_version,
        started: false,
        authenticated: false,
        framing: None,
        session: Session {
            keyspace: None,
            version: 4,
            conn,
        },
    };
    let mut dec = Decoder::new(MAX_BODY);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    'outer: loop {
        if c.version.is_none() && buf.len() >= 4 {
            let v = buf[0] & 0x7f;
            if !(4..=5).contains(&v) {
                // Answer raw bytes: no framing state exists for this version.
                let _ = tx.send(Out::Raw(version_error(&buf)));
                break;
            }
            c.version = Some(v);
            c.session.version = v;
            c.shared_version.store(v, std::sync::atomic::Ordering::Relaxed);
        }
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(env)) => {
                    if c.shared.is_hung(node) {
                        continue;
                    }
                    if !c.handle(env) {
                        break 'outer;
                    }
                    // What the client sends after STARTUP uses the negotiated framing.
                    if let Some(f) = c.framing.take() {
                        dec.set_framing(f);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let header =
                        e.header()
                            .unwrap_or(Header::request(c.version.unwrap_or(4), 0, Opcode::Error));
                    c.error(&header, ErrorBody::protocol(e.to_string()));
                    if e.is_fatal() {
                        break 'outer;
                    }
                }
            }
        }
        c.shared.while_frozen(node).await;
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = tx.send(Out::Close);
}
