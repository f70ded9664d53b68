//! A raw HTTP/1.1 GET client that keeps the chunk boundaries, to compare the fake server's
//! bytes with the recordings.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The head of a response and a channel of its body chunks (`None` after the terminating
/// chunk or a complete Content-Length body; the channel closes early if the connection
/// breaks).
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub chunks: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
}

impl RawResponse {
    /// A header's value (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The next chunk, waiting up to `wait`; `Ok(None)` at the end of the body.
    pub async fn next_chunk(&mut self, wait: Duration) -> Result<Option<Vec<u8>>, String> {
        match tokio::time::timeout(wait, self.chunks.recv()).await {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err("connection ended without a terminating chunk".into()),
            Err(_) => Err(format!("no chunk within {wait:?}")),
        }
    }

    /// Every remaining chunk up to the end of the body.
    pub async fn all_chunks(&mut self, wait: Duration) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        while let Some(c) = self.next_chunk(wait).await? {
            out.push(c);
        }
        Ok(out)
    }
}

/// Sends `GET path_and_query` with an optional bearer token, as kube does.
pub async fn get(
    addr: SocketAddr,
    path_and_query: &str,
    token: Option<&str>,
) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET {path_and_query} HTTP/1.1\r\n{auth}host: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    tokio::spawn(async move {
        if !chunked {
            let mut body = vec![0; length.unwrap_or(0)];
            if reader.read_exact(&mut body).await.is_ok() {
                let _ = tx.send(Some(body));
                let _ = tx.send(None);
            }
            return;
        }
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let Ok(size) = usize::from_str_radix(line.trim().split(';').next().unwrap_or_default(), 16)
            else {
                return;
            };
            if size == 0 {
                let _ = tx.send(None);
                return;
            }
            let mut chunk = vec![0; size + 2];
            if reader.read_exact(&mut chunk).await.is_err() {
                return;
            }
            chunk.truncate(size);
            if tx.send(Some(chunk)).is_err() {
                return;
            }
        }
    });
    Ok(RawResponse {
        status,
        headers,
        chunks: rx,
    })
}
