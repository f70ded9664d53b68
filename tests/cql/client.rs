//! A minimal CQL client for the tests: raw frames over the `sluice-cql` codec, so tests can
//! send exactly what they mean (pipelined requests, bad bytes) and see exactly what comes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::Header;
use sluice_cql::request::{Execute, Extensions, Prepare, Query, QueryParams};
use sluice_cql::response::{ErrorBody, Prepared, ResultBody, Rows};
use sluice_cql::wire::Value;
use sluice_cql::{Compression, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client connection: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Client {
    stream: Box<dyn Io>,
    dec: Decoder,
    enc: Encoder,
    buf: BytesMut,
    pub version: u8,
    next_stream: i16,
}

impl Client {
    /// Connects without the handshake.
    pub async fn raw(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Client::over(Box::new(stream))
    }

    /// A client on an established connection (e.g. TLS), without the handshake.
    pub fn over(stream: Box<dyn Io>) -> Client {
        Client {
            stream,
            dec: Decoder::default(),
            enc: Encoder::new(),
            buf: BytesMut::new(),
            version: 4,
            next_stream: 1,
        }
    }

    /// Connects and completes STARTUP.
    pub async fn connect(addr: SocketAddr, version: u8, compression: Compression) -> Client {
        Client::raw(addr).await.startup(version, compression).await
    }

    /// Completes STARTUP on a raw client.
    pub async fn startup(self, version: u8, compression: Compression) -> Client {
        let mut c = self;
        c.version = version;
        let mut opts = vec![("CQL_VERSION".to_string(), "3.0.0".to_string())];
        if let Some(n) = compression.name() {
            opts.push(("COMPRESSION".into(), n.into()));
        }
        let startup = Request::Startup(opts);
        c.send(0, &startup).await;
        if version < 5 {
            c.dec.set_framing(Framing::Frames(compression));
        }
        let (_, r) = c.recv().await.expect("READY");
        assert_eq!(r, Response::Ready);
        c.enc.set_framing(Framing::after_startup(version, compression));
        c.dec.set_framing(Framing::after_startup(version, compression));
        c
    }

    /// Every byte the server sends until it closes (at most 10 s).
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = self.buf.split().to_vec();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut out)).await;
        out
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("write");
    }

    pub async fn send(&mut self, stream: i16, req: &Request) {
        let env = Envelope::new(
            Header::request(self.version, stream, req.opcode()),
            req.to_body(self.version),
        );
        let mut out = BytesMut::new();
        self.enc.encode(&env, &mut out);
        self.send_bytes(&out).await;
    }

    /// The next envelope that is not an event; `None` when the server closed the connection.
    pub async fn recv_envelope(&mut self) -> Option<Envelope> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(env)) if env.header.stream == -1 => continue,
                Ok(Some(env)) => return Some(env),
                Ok(None) => {}
                Err(e) => panic!("the server sent bytes that do not frame: {e}"),
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf))
                .await
                .expect("an answer within 20 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// The next envelope, events included.
    pub async fn recv_any(&mut self) -> Envelope {
        loop {
            if let Some(env) = self.dec.decode(&mut self.buf).expect("frames") {
                return env;
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf))
                .await
                .expect("an envelope within 20 s")
                .unwrap_or(0);
            assert!(n > 0, "connection closed");
        }
    }

    pub async fn recv(&mut self) -> Option<(i16, Response)> {
        let env = self.recv_envelope().await?;
        let (_, body) = Extensions::split(&env.header, env.body).expect("extensions");
        let r =
            Response::decode(env.header.version, env.header.opcode, body).expect("a response that decodes");
        Some((env.header.stream, r))
    }

    /// Sends one request and waits for its answer.
    pub async fn call(&mut self, req: Request) -> Response {
        let s = self.next_stream;
        self.next_stream = if s >= 30_000 { 1 } else { s + 1 };
        self.send(s, &req).await;
        let (stream, r) = self.recv().await.expect("connection closed instead of answering");
        assert_eq!(stream, s);
        r
    }

    /// Sends every request before reading any answer; answers come back in request order.
    pub async fn pipeline(&mut self, reqs: Vec<Request>) -> Vec<Response> {
        assert!(reqs.len() < 30_000);
        let mut out = BytesMut::new();
        for (i, r) in reqs.iter().enumerate() {
            let env = Envelope::new(
                Header::request(self.version, i as i16, r.opcode()),
                r.to_body(self.version),
            );
            self.enc.encode(&env, &mut out);
        }
        self.send_bytes(&out).await;
        let mut got: HashMap<i16, Response> = HashMap::new();
        while got.len() < reqs.len() {
            let (s, r) = self.recv().await.expect("all answers");
            assert!(got.insert(s, r).is_none(), "two answers on stream {s}");
        }
        (0..reqs.len())
            .map(|i| got.remove(&(i as i16)).unwrap())
            .collect()
    }

    pub async fn query(&mut self, q: &str) -> Response {
        self.call(query(q, vec![])).await
    }

    /// Runs a query that must succeed.
    pub async fn ok(&mut self, q: &str) -> ResultBody {
        match self.query(q).await {
            Response::Result(r) => r,
            other => panic!("{q}: {other:?}"),
        }
    }

    pub async fn rows(&mut self, q: &str) -> Rows {
        match self.ok(q).await {
            ResultBody::Rows(r) => r,
            other => panic!("{q}: expected rows, got {other:?}"),
        }
    }

    pub async fn prepare(&mut self, q: &str) -> Prepared {
        let r = self
            .call(Request::Prepare(Prepare {
                query: q.into(),
                flags: 0,
                keyspace: None,
            }))
            .await;
        match r {
            Response::Result(ResultBody::Prepared(p)) => p,
            other => panic!("PREPARE {q}: {other:?}"),
        }
    }

    pub async fn execute(&mut self, p: &Prepared, values: Vec<Bytes>) -> Response {
        self.call(execute(p, values)).await
    }
}

/// Decodes an envelope's message.
pub fn decode(env: &Envelope) -> Result<Response, sluice_cql::DecodeError> {
    let (_, body) = Extensions::split(&env.header, env.body.clone())?;
    Response::decode(env.header.version, env.header.opcode, body)
}

pub fn query(q: &str, values: Vec<Bytes>) -> Request {
    let mut params = QueryParams::new(1);
    if !values.is_empty() {
        params.values = Some(values.into_iter().map(Value::Set).collect());
    }
    Request::Query(Query {
        query: q.into(),
        params,
    })
}

pub fn execute(p: &Prepared, values: Vec<Bytes>) -> Request {
    let mut params = QueryParams::new(1);
    params.values = Some(values.into_iter().map(Value::Set).collect());
    Request::Execute(Execute {
        id: p.id.clone(),
        result_metadata_id: p.result_metadata_id.clone(),
        params,
    })
}

pub fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn int(v: i32) -> Bytes {
    Bytes::copy_from_slice(&v.to_be_bytes())
}

/// The error of a response, or a panic.
pub fn error_of(r: &Response) -> &ErrorBody {
    match r {
        Response::Error(e) => e,
        other => panic!("expected an ERROR, got {other:?}"),
    }
}
