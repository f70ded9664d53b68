//! One connection from sluice to a PostgreSQL server: connect, authenticate, simple queries.
//!
//! Messages towards the server are built with `postgres-protocol`'s frontend encoders and its
//! SCRAM client; server messages are framed with `sluice_postgres` and the few fields needed
//! during startup are read by hand below (a handful of fixed layouts).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use sluice_postgres::backend::{backend_key_data, data_row, parameter_status, Authentication};
use sluice_postgres::{peek, split_message, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::tls::{BackendStream, BackendTls, MaybeTls};
use crate::config::BackendTlsMode;

/// The largest message sluice accepts from a server (a DataRow can legitimately be big).
pub const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// Why a backend connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The node is unreachable or the connection broke: the node's fault, retry elsewhere.
    #[error("i/o error talking to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("timed out after {after:?} talking to {addr}")]
    Timeout { addr: String, after: Duration },
    /// The server refused with an ErrorResponse, kept whole so it can be forwarded to the client.
    #[error("server {addr} said {code}: {message}")]
    Server {
        addr: String,
        code: String,
        message: String,
        raw: Bytes,
    },
    /// The server spoke something sluice does not understand.
    #[error("protocol error from {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    /// A verifier-only user has not logged in through sluice since it started, so sluice has
    /// no key to answer the server's SCRAM challenge with (sluice's fault; a client login fixes
    /// it).
    #[error("cannot log in to {addr} as {user:?} yet: sluice holds only a SCRAM verifier for it and no client has logged in as {user:?} since sluice started (SCRAM pass-through)")]
    NoClientKey { addr: String, user: String },
}

impl BackendError {
    /// True when the node itself (not the request or the credentials) is at fault.
    pub fn is_node_failure(&self) -> bool {
        matches!(self, BackendError::Io { .. } | BackendError::Timeout { .. })
            || matches!(self, BackendError::Server { code, .. } if code.starts_with("57P") || code.starts_with("08"))
    }
}

/// Startup parameters a connection is opened with besides `user` and `database`: a client's
/// own (application_name, client_encoding, DateStyle, options, ...), so that the server treats
/// them exactly as it would from a direct connection — they are what `RESET` and `DISCARD ALL`
/// return to, and what the server reports in ParameterStatus.
pub type StartupParams = Arc<Vec<(String, String)>>;

/// The startup parameters of sluice's own connections (probes, lookups).
pub fn own_startup_params() -> StartupParams {
    Arc::new(vec![
        ("client_encoding".to_string(), "UTF8".to_string()),
        ("application_name".to_string(), "sluice".to_string()),
    ])
}

/// Whether two parameter sets are the same (usually the same allocation).
pub fn same_startup(a: &StartupParams, b: &StartupParams) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// How sluice proves a user to the servers.
pub enum Credential {
    /// A password: cleartext, md5 and SCRAM-SHA-256 servers all accept it.
    Password(String),
    /// Only a stored SCRAM-SHA-256 verifier: sluice answers a server's SCRAM challenge with the
    /// ClientKey recovered from the user's last successful client login (SCRAM pass-through).
    PassThrough(Arc<PassThrough>),
    /// Only a stored md5 hash (`md5` + 32 hex digits, as `pg_authid` holds it): enough to answer
    /// a server's md5 challenge, not a SCRAM or cleartext one.
    Md5(String),
}

/// No credential: what an unknown user gets (trust servers still let it in).
pub static NO_CREDENTIAL: Credential = Credential::Password(String::new());

/// The keys of a verifier-only user; the ClientKey lives in memory only.
pub struct PassThrough {
    /// ServerKey from the verifier: checks the server's signature.
    pub server_key: [u8; 32],
    client_key: std::sync::Mutex<Option<[u8; 32]>>,
}

impl PassThrough {
    pub fn new(server_key: [u8; 32]) -> PassThrough {
        PassThrough {
            server_key,
            client_key: std::sync::Mutex::new(None),
        }
    }

    /// Keeps the ClientKey a client just proved (replacing the previous one).
    pub fn remember(&self, client_key: [u8; 32]) {
        *self.client_key.lock().expect("client key lock") = Some(client_key);
    }

    /// The ClientKey of the last successful client login, if any since sluice started.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        *self.client_key.lock().expect("client key lock")
    }
}

/// A SCRAM exchange towards a server, with a password or with the keys.
enum SaslClient {
    Password(ScramSha256),
    Keys(sluice_postgres::scram::ScramKeyClient),
}

/// What a connection is opened with.
#[derive(Clone, Copy)]
pub struct ConnectOptions<'a> {
    pub addr: &'a str,
    pub user: &'a str,
    pub credential: &'a Credential,
    pub database: &'a str,
    pub params: &'a StartupParams,
    pub timeout: Duration,
    pub tls: &'a BackendTls,
}

/// An open, authenticated, idle server connection.
pub struct Backend {
    pub addr: String,
    pub stream: BackendStream,
    /// Bytes read from the server and not yet consumed.
    pub rbuf: BytesMut,
    /// ParameterStatus values the server sent at startup.
    pub params: Vec<(String, String)>,
    /// The server's BackendKeyData, for cancel requests.
    pub pid: i32,
    pub secret: i32,
    pub created: Instant,
    pub last_used: Instant,
    /// Names (as hashes) of the statements sluice prepared on this connection. Looked up for
    /// every Bind: hashed with foldhash, not SipHash (randomly seeded per set, and the keys are
    /// sluice's own statement hashes, so no client picks what collides here).
    pub prepared: HashSet<u64, foldhash::fast::RandomState>,
    /// The result shape (`sluice_postgres::backend::row_shape`) of statements in `prepared`, as
    /// sluice's own Describe after its Parse reported it; missing until that answer arrives.
    /// An entry outlives its statement's Close: read it through [`Backend::shape`].
    pub shapes: HashMap<u64, u64, foldhash::fast::RandomState>,
    /// The session settings this connection carries (see `session::settings`).
    pub settings: Arc<Vec<(String, String)>>,
    /// The startup parameters it was opened with (pooled connections serve only clients that
    /// sent the same ones).
    pub startup: StartupParams,
    /// The session (client) that used it last; 0 for none.
    pub owner: u64,
    /// The last owner ran something that may have left session state sluice does not track
    /// (a write, SET, set_config): the next different owner gets it reset first.
    pub tainted: bool,
    /// Lists the connection in its pool's server list (`SHOW SERVERS`) while it lives.
    pub registration: Option<crate::postgres::pool::Registration>,
    /// The core (`common::runtime`) whose runtime the socket is registered with.
    pub home: usize,
}

impl Backend {
    /// The shape of the rows of statement `hash` on this connection, while it holds the
    /// statement and its shape is known.
    pub fn shape(&self, hash: u64) -> Option<u64> {
        self.prepared
            .contains(&hash)
            .then(|| self.shapes.get(&hash).copied())
            .flatten()
    }

    /// Connects and authenticates (trust, cleartext, md5 or SCRAM-SHA-256), waiting for the
    /// first ReadyForQuery. The whole exchange is bounded by `opts.timeout`.
    pub async fn connect(opts: ConnectOptions<'_>) -> Result<Backend, BackendError> {
        let addr = opts.addr.to_string();
        tokio::time::timeout(opts.timeout, Self::connect_inner(opts))
            .await
            .map_err(|_| BackendError::Timeout {
                addr,
                after: opts.timeout,
            })?
    }

    async fn connect_inner(opts: ConnectOptions<'_>) -> Result<Backend, BackendError> {
        let io_err = |source| BackendError::Io {
            addr: opts.addr.to_string(),
            source,
        };
        let tcp = TcpStream::connect(opts.addr).await.map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let stream = negotiate_tls(tcp, &opts).await?;
        let now = Instant::now();
        let mut be = Backend {
            addr: opts.addr.to_string(),
            stream,
            rbuf: BytesMut::with_capacity(8192),
            params: Vec::new(),
            pid: 0,
            secret: 0,
            created: now,
            last_used: now,
            prepared: HashSet::default(),
            shapes: HashMap::default(),
            settings: Default::default(),
            startup: opts.params.clone(),
            owner: 0,
            tainted: false,
            registration: None,
            home: crate::common::runtime::current_core(),
        };
        let mut out = BytesMut::new();
        let params = [("user", opts.user), ("database", opts.database)]
            .into_iter()
            .chain(opts.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(params, &mut out).map_err(io_err)?;
        be.send(&out).await?;
        let mut scram: Option<SaslClient> = None;
        let password = match opts.credential {
            Credential::Password(p) => Some(p.as_str()),
            Credential::PassThrough(_) | Credential::Md5(_) => None,
        };
        let no_password = |be: &Backend, method: &str| {
            match opts.credential {
            Credential::Md5(_) => be.protocol(&format!(
                "the server asks for {method} but sluice has only the md5 hash of user {:?}, which answers md5 authentication only (the server's pg_hba.conf must use md5 for it, and the role's password be stored as md5)",
                opts.user
            )),
            _ => be.protocol(&format!(
                "the server asks for {method} but user {:?} has only a SCRAM verifier in sluice's configuration (pass-through needs SCRAM-SHA-256 on the server)",
                opts.user
            )),
        }
        };
        loop {
            let msg = be.read_message().await?;
            match msg.tag() {
                b'R' => {
                    let auth = Authentication::decode(msg.body())
                        .ok_or_else(|| be.protocol("short Authentication message"))?;
                    out.clear();
                    match auth {
                        Authentication::Ok => {}
                        Authentication::CleartextPassword => {
                            let password =
                                password.ok_or_else(|| no_password(&be, "a cleartext password"))?;
                            frontend::password_message(password.as_bytes(), &mut out).map_err(io_err)?
                        }
                        Authentication::Md5Password { salt } => {
                            let hash = match (opts.credential, password) {
                                (Credential::Md5(stored), _) => sluice_postgres::md5::response(stored, salt),
                                (_, Some(password)) => postgres_protocol::authentication::md5_hash(
                                    opts.user.as_bytes(),
                                    password.as_bytes(),
                                    salt,
                                ),
                                (_, None) => return Err(no_password(&be, "an md5 password")),
                            };
                            frontend::password_message(hash.as_bytes(), &mut out).map_err(io_err)?;
                        }
                        Authentication::Sasl { .. } => {
                            if !auth.offers(b"SCRAM-SHA-256") {
                                return Err(be.protocol(
                                    "server offers no SASL mechanism sluice supports (SCRAM-SHA-256)",
                                ));
                            }
                            let client = match opts.credential {
                                Credential::Md5(_) => return Err(no_password(&be, "SCRAM-SHA-256")),
                                Credential::Password(p) => {
                                    let s = ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported());
                                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                        .map_err(io_err)?;
                                    SaslClient::Password(s)
                                }
                                Credential::PassThrough(keys) => {
                                    let Some(client_key) = keys.client_key() else {
                                        return Err(BackendError::NoClientKey {
                                            addr: be.addr.clone(),
                                            user: opts.user.to_string(),
                                        });
                                    };
                                    let s = sluice_postgres::scram::ScramKeyClient::new(
                                        client_key,
                                        keys.server_key,
                                        &crate::postgres::cluster::random_nonce(),
                                    );
                                    frontend::sasl_initial_response(
                                        "SCRAM-SHA-256",
                                        &s.client_first(),
                                        &mut out,
                                    )
                                    .map_err(io_err)?;
                                    SaslClient::Keys(s)
                                }
                            };
                            scram = Some(client);
                        }
                        Authentication::SaslContinue(rest) => match scram.as_mut() {
                            Some(SaslClient::Password(s)) => {
                                // The key derivation (PBKDF2, 4096 rounds or more: a millisecond
                                // and up) runs on the blocking pool: the other sessions of this
                                // runtime thread (`common::runtime`) go on meanwhile.
                                let mut owned = std::mem::replace(
                                    s,
                                    ScramSha256::new(b"", ChannelBinding::unsupported()),
                                );
                                let rest = rest.to_vec();
                                let derived = tokio::task::spawn_blocking(move || {
                                    owned.update(&rest).map(|()| owned).map_err(|e| e.to_string())
                                })
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r)
                                .map_err(|e| be.protocol(&format!("SCRAM: {e}")))?;
                                *s = derived;
                                frontend::sasl_response(s.message(), &mut out).map_err(io_err)?;
                            }
                            Some(SaslClient::Keys(s)) => {
                                let m = s
                                    .server_first(rest)
                                    .map_err(|e| be.protocol(&format!("SCRAM: {e}")))?;
                                frontend::sasl_response(&m, &mut out).map_err(io_err)?;
                            }
                            None => return Err(be.protocol("SASLContinue without SASL")),
                        },
                        Authentication::SaslFinal(rest) => {
                            let checked = match scram.as_mut() {
                                Some(SaslClient::Password(s)) => s.finish(rest).map_err(|e| e.to_string()),
                                Some(SaslClient::Keys(s)) => s.server_final(rest).map_err(|e| e.to_string()),
                                None => return Err(be.protocol("SASLFinal without SASL")),
                            };
                            checked.map_err(|e| be.protocol(&format!("SCRAM server signature: {e}")))?;
                        }
                        Authentication::Other(other) => {
                            return Err(be.protocol(&format!("unsupported authentication method {other}")))
                        }
                    }
                    if !out.is_empty() {
                        be.send(&out).await?;
                    }
                }
                b'S' => {
                    if let Some((k, v)) = parameter_status(msg.body()) {
                        be.params.push((k, v));
                    }
                }
                b'K' => {
                    if let Some((pid, secret)) = backend_key_data(msg.body()) {
                        (be.pid, be.secret) = (pid, secret);
                    }
                }
                b'Z' => return Ok(be),
                b'E' => return Err(be.server_error(msg)),
                b'N' | b'v' => {}
                other => {
                    return Err(be.protocol(&format!("unexpected message {:?} during startup", other as char)))
                }
            }
        }
    }

    fn protocol(&self, reason: &str) -> BackendError {
        BackendError::Protocol {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    fn server_error(&self, msg: Message) -> BackendError {
        let (code, message) = peek::error_code_and_message(msg.body());
        BackendError::Server {
            addr: self.addr.clone(),
            code,
            message,
            raw: msg.into_raw(),
        }
    }

    fn io(&self, source: io::Error) -> BackendError {
        BackendError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    /// Writes all of `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await.map_err(|e| self.io(e))
    }

    /// Reads one whole message.
    pub async fn read_message(&mut self) -> Result<Message, BackendError> {
        loop {
            match split_message(&mut self.rbuf, MAX_BACKEND_MESSAGE) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(&e.to_string())),
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs one simple query and returns the text values of its rows. An ErrorResponse is
    /// returned as `BackendError::Server` after the connection is idle again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.io(e))?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = self.read_message().await?;
            match msg.tag() {
                b'D' => rows.push(data_row(msg.body()).ok_or_else(|| self.protocol("malformed DataRow"))?),
                b'E' => error = Some(self.server_error(msg)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// True when the server has said nothing and closed nothing since the connection went idle:
    /// a connection the server closed (restart, idle timeout) is caught before a client uses it.
    /// Peeks at the TCP socket, so TLS records stay untouched.
    /// Registers the connection with the runtime of `core`, the calling thread's, if it was
    /// registered with another one (a pooled connection moving to another core). The server
    /// connection, its TLS state and what sluice knows about it stay as they are.
    pub fn rehome(&mut self, core: usize) -> std::io::Result<()> {
        if self.home != core {
            self.stream.rehome()?;
            self.home = core;
        }
        Ok(())
    }

    /// Whether an idle connection is still usable: the server has sent nothing since its last
    /// ReadyForQuery (a server that ends a connection sends a FATAL error or closes it). Looks
    /// at the socket's readiness first and peeks only when the reactor saw it readable: no
    /// waker is registered and no lock taken (this runs for every reuse of a parked backend).
    pub fn looks_alive(&self) -> bool {
        let tcp = self.stream.tcp();
        silent(tcp.try_io(tokio::io::Interest::READABLE, || peek_byte(tcp)))
    }

    /// [`Backend::looks_alive`] asked of the kernel instead of the reactor: a non-blocking peek,
    /// one system call. The reactor's readiness can lag behind a close that has just arrived
    /// (a terminated backend was handed out as alive, once in a full test run), so a
    /// connection that has been idle a while is checked this way before it is reused.
    pub fn alive_now(&self) -> bool {
        silent(peek_byte(self.stream.tcp()))
    }
}

/// A non-blocking peek at the next byte the server sent, leaving it unread.
fn peek_byte(tcp: &tokio::net::TcpStream) -> std::io::Result<usize> {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    socket2::SockRef::from(tcp).peek(&mut probe)
}

/// Whether a [`peek_byte`] found the connection open with nothing to read.
fn silent(peeked: std::io::Result<usize>) -> bool {
    matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// SSLRequest and, when the server agrees, the TLS handshake (per `opts.tls.mode`).
async fn negotiate_tls(mut tcp: TcpStream, opts: &ConnectOptions<'_>) -> Result<BackendStream, BackendError> {
    let protocol = |reason: String| BackendError::Protocol {
        addr: opts.addr.to_string(),
        reason,
    };
    let io_err = |source| BackendError::Io {
        addr: opts.addr.to_string(),
        source,
    };
    if opts.tls.mode == BackendTlsMode::Disable {
        return Ok(MaybeTls::Plain(tcp));
    }
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {
            let host = opts.addr.rsplit_once(':').map_or(opts.addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            opts.tls
                .connect(host, tcp)
                .await
                .map_err(|e| protocol(format!("TLS handshake failed: {e}")))
        }
        b'N' if opts.tls.mode == BackendTlsMode::Prefer => Ok(MaybeTls::Plain(tcp)),
        b'N' => Err(protocol(
            "the server does not accept TLS, and backend_tls requires it".into(),
        )),
        other => Err(protocol(format!("unexpected answer {other:#04x} to SSLRequest"))),
    }
}
