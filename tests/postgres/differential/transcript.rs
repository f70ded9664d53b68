//! Running one message sequence on a fresh connection the way a driver does (send up to a
//! Flush or Sync, then read every response that is due), and the record of what came back.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sequence::Msg;
use crate::raw::raw_login;

/// How long a response that is due may take. Only a stalled proxy reaches it; PostgreSQL
/// answers in milliseconds even with the machine busy.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// The simple query sent after the sequence: anything the proxy still had to say shows up
/// before its answer.
const SENTINEL: &str = "SELECT 'end of sequence'";

/// What came back for one sequence: the responses read after each Flush or Sync (`after` is
/// the index of that message; the sentinel query's are last, with `after == msgs.len()`).
#[derive(Debug, Default)]
pub struct Transcript {
    pub reads: Vec<Read>,
    /// Why the run stopped early (a stall or a closed connection), if it did.
    pub broken: Option<String>,
}

#[derive(Debug)]
pub struct Read {
    pub after: usize,
    pub replies: Vec<Reply>,
}

/// One backend message, rendered for comparison (see [`Reply::parse`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply(pub String);

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `sluice_` and 16 hex digits: the names sluice gives statements on its backends, which a
/// client must never see.
pub fn sluice_name() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new("sluice_[0-9a-f]{16}").unwrap())
}

/// Responses that end the answer to one frontend message (RowDescription only ends a
/// Describe: Execute does not send one in the extended protocol).
fn ends_answer(tag: u8) -> bool {
    matches!(tag, b'1' | b'2' | b'3' | b'T' | b'n' | b'C' | b's' | b'I' | b'E')
}

impl Reply {
    /// Renders a backend message with everything a client may rely on: error and notice
    /// severity, SQLSTATE, message and position; command tags, rows and descriptions exactly. Process
    /// ids (in notifications) are masked; sluice's statement names are kept, and flagged by
    /// [`Transcript::leaks`].
    fn parse(tag: u8, body: &[u8]) -> Reply {
        let cstr = |b: &[u8]| String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or(b)).into_owned();
        let i16_at = |b: &[u8], at: usize| i16::from_be_bytes([b[at], b[at + 1]]);
        let i32_at = |b: &[u8], at: usize| i32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let text = match tag {
            b'E' | b'N' => {
                let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
                let mut position = String::new();
                let mut rest = body;
                while let Some((&kind, tail)) = rest.split_first() {
                    if kind == 0 {
                        break;
                    }
                    let value = cstr(tail);
                    rest = &tail[(value.len() + 1).min(tail.len())..];
                    match kind {
                        b'V' => severity = value,
                        b'S' if severity.is_empty() => severity = value,
                        b'C' => code = value,
                        b'M' => message = value,
                        b'P' => position = format!(" at {value}"),
                        _ => {}
                    }
                }
                let what = if tag == b'E' { "Error" } else { "Notice" };
                format!("{what}({severity} {code} {message}{position})")
            }
            b'C' => format!("CommandComplete({})", cstr(body)),
            b'D' => {
                let mut at = 2;
                let mut cols = Vec::new();
                for _ in 0..i16_at(body, 0) {
                    let len = i32_at(body, at);
                    at += 4;
                    if len < 0 {
                        cols.push("NULL".to_string());
                    } else {
                        let len = len as usize;
                        cols.push(format!("{:?}", String::from_utf8_lossy(&body[at..at + len])));
                        at += len;
                    }
                }
                format!("DataRow({})", cols.join(", "))
            }
            b'T' => {
                let mut at = 2;
                let mut fields = Vec::new();
                for _ in 0..i16_at(body, 0) {
                    let name = cstr(&body[at..]);
                    at += name.len() + 1;
                    let f = &body[at..at + 18];
                    at += 18;
                    fields.push(format!(
                        "{name}: type {} table {} col {} size {} mod {} format {}",
                        i32_at(f, 6),
                        i32_at(f, 0),
                        i16_at(f, 4),
                        i16_at(f, 10),
                        i32_at(f, 12),
                        i16_at(f, 16)
                    ));
                }
                format!("RowDescription({})", fields.join("; "))
            }
            b't' => {
                let types: Vec<i32> = (0..i16_at(body, 0) as usize)
                    .map(|i| i32_at(body, 2 + 4 * i))
                    .collect();
                format!("ParameterDescription({types:?})")
            }
            b'Z' => format!("ReadyForQuery({})", char::from(body[0])),
            b'1' => "ParseComplete".into(),
            b'2' => "BindComplete".into(),
            b'3' => "CloseComplete".into(),
            b'n' => "NoData".into(),
            b's' => "PortalSuspended".into(),
            b'I' => "EmptyQueryResponse".into(),
            b'S' => {
                let name = cstr(body);
                format!("ParameterStatus({name}={})", cstr(&body[name.len() + 1..]))
            }
            b'A' => {
                let channel = cstr(&body[4..]);
                format!("Notification(pid <masked>, {channel})")
            }
            b'K' => "BackendKeyData(<masked>)".into(),
            _ => format!("{}({body:02x?})", char::from(tag)),
        };
        Reply(text)
    }
}

impl Transcript {
    /// Responses naming one of sluice's own statements.
    pub fn leaks(&self) -> Vec<&Reply> {
        self.reads
            .iter()
            .flat_map(|r| &r.replies)
            .filter(|r| sluice_name().is_match(&r.0))
            .collect()
    }

    /// The transcript one read per line, for failure reports.
    pub fn render(&self, msgs: &[Msg]) -> String {
        let mut out = String::new();
        for r in &self.reads {
            let label = msgs
                .get(r.after)
                .map_or("sentinel query".to_string(), |m| format!("#{} {m}", r.after));
            out.push_str(&format!("  after {label}:\n"));
            for reply in &r.replies {
                out.push_str(&format!("      {reply}\n"));
            }
        }
        if let Some(b) = &self.broken {
            out.push_str(&format!("  then: {b}\n"));
        }
        out
    }
}

/// A logged-in raw connection and what has been read from it but not yet parsed.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn next(&mut self) -> Result<Reply, String> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let m = self.buf.split_to(1 + len);
                    return Ok(Reply::parse(m[0], &m[5..]));
                }
            }
            match tokio::time::timeout(REPLY_WAIT, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(format!("no response within {REPLY_WAIT:?}")),
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
                Ok(Ok(0)) => return Err("connection closed".into()),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn send(&mut self, out: &mut BytesMut) -> Result<(), String> {
        let r = self
            .stream
            .write_all(out)
            .await
            .map_err(|e| format!("write failed: {e}"));
        out.clear();
        r
    }
}

/// The tag a rendered reply came from, for counting answers.
fn tag_of(r: &Reply) -> u8 {
    match r.0.split('(').next().unwrap_or("") {
        "ParseComplete" => b'1',
        "BindComplete" => b'2',
        "CloseComplete" => b'3',
        "RowDescription" => b'T',
        "NoData" => b'n',
        "CommandComplete" => b'C',
        "PortalSuspended" => b's',
        "EmptyQueryResponse" => b'I',
        "Error" => b'E',
        "ReadyForQuery" => b'Z',
        _ => 0,
    }
}

/// Runs `msgs` on a fresh connection to `addr` as `app`. After each Flush, reads the answers
/// of every message sent since the last read (none once the batch has failed: the server then
/// skips to Sync); after each Sync, reads up to ReadyForQuery. Then the sentinel query.
pub async fn run(addr: SocketAddr, msgs: &[Msg]) -> Transcript {
    let mut conn = Conn {
        stream: raw_login(addr).await,
        buf: BytesMut::new(),
    };
    let mut t = Transcript::default();
    if let Err(e) = drive(&mut conn, msgs, &mut t).await {
        t.broken = Some(e);
    }
    t
}

async fn drive(conn: &mut Conn, msgs: &[Msg], t: &mut Transcript) -> Result<(), String> {
    let mut out = BytesMut::new();
    // Messages sent and not answered yet, and whether this batch has failed.
    let (mut due, mut failed) = (0usize, false);
    for (i, m) in msgs.iter().enumerate() {
        m.encode(&mut out);
        let mut replies = Vec::new();
        match m {
            Msg::Flush => {
                conn.send(&mut out).await?;
                while due > 0 {
                    let r = read(conn, &mut replies, t, i).await?;
                    if ends_answer(r) {
                        due -= 1;
                    }
                    if r == b'E' {
                        failed = true;
                        due = 0;
                    }
                }
            }
            Msg::Sync => {
                conn.send(&mut out).await?;
                while read(conn, &mut replies, t, i).await? != b'Z' {}
                (due, failed) = (0, false);
            }
            // Sent behind a Flush (nothing due): answered up to its ReadyForQuery, or skipped
            // without an answer in a batch that failed.
            Msg::Query { .. } => {
                conn.send(&mut out).await?;
                if !failed {
                    while read(conn, &mut replies, t, i).await? != b'Z' {}
                }
            }
            _ if !failed => due += 1,
            _ => {}
        }
        if matches!(m, Msg::Flush | Msg::Sync | Msg::Query { .. }) {
            t.reads.push(Read { after: i, replies });
        }
    }
    frontend::query(SENTINEL, &mut out).unwrap();
    conn.send(&mut out).await?;
    let mut replies = Vec::new();
    while read(conn, &mut replies, t, msgs.len()).await? != b'Z' {}
    t.reads.push(Read {
        after: msgs.len(),
        replies,
    });
    Ok(())
}

/// Reads one reply into `replies`; on failure records what was read so far in `t`.
async fn read(
    conn: &mut Conn,
    replies: &mut Vec<Reply>,
    t: &mut Transcript,
    after: usize,
) -> Result<u8, String> {
    match conn.next().await {
        Ok(r) => {
            let tag = tag_of(&r);
            replies.push(r);
            Ok(tag)
        }
        Err(e) => {
            t.reads.push(Read {
                after,
                replies: std::mem::take(replies),
            });
            Err(e)
        }
    }
}
