//! The protocol's primitive notations ([string], [bytes], [value], [inet], maps, ...): a
//! bounds-checked reader over a body and the matching writers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// A bound value: `[value]` in the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Length -1.
    Null,
    /// Length -2: leave the column as it is.
    Unset,
    /// The serialized value.
    Set(Bytes),
}

impl Value {
    /// The bytes, when there are any.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Set(b) => Some(b),
            _ => None,
        }
    }
}

/// Reads primitives off the front of a body. Every read checks the remaining length first;
/// byte fields are zero-copy slices of the body.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    /// A reader over a whole body.
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The unread rest, consuming the reader.
    pub fn rest(self) -> Bytes {
        self.buf
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }

    /// `n` raw bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    /// A `[byte]`.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    /// A `[short]`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    /// An `[int]`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }

    /// A `[long]`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }

    /// A `[uuid]`.
    pub fn uuid(&mut self, what: &'static str) -> Result<[u8; 16], DecodeError> {
        self.need(16, what)?;
        let mut out = [0u8; 16];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    fn utf8(b: Bytes, what: &'static str) -> Result<String, DecodeError> {
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8(what))
    }

    /// A `[string]`.
    pub fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        Self::utf8(b, what)
    }

    /// A `[long string]`.
    pub fn long_string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.i32(what)?;
        let n = usize::try_from(n).map_err(|_| DecodeError::invalid(what, format!("negative length {n}")))?;
        let b = self.take(n, what)?;
        Self::utf8(b, what)
    }

    /// A `[short bytes]`.
    pub fn short_bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    /// A `[bytes]`: `None` for a negative length.
    pub fn bytes(&mut self, what: &'static str) -> Result<Option<Bytes>, DecodeError> {
        let n = self.i32(what)?;
        if n < 0 {
            return Ok(None);
        }
        self.take(n as usize, what).map(Some)
    }

    /// A `[value]`.
    pub fn value(&mut self, what: &'static str) -> Result<Value, DecodeError> {
        match self.i32(what)? {
            -1 => Ok(Value::Null),
            -2 => Ok(Value::Unset),
            n if n < 0 => Err(DecodeError::invalid(what, format!("value length {n}"))),
            n => self.take(n as usize, what).map(Value::Set),
        }
    }

    /// A count of items each at least `min_size` bytes long: rejected up front when the body
    /// cannot possibly hold them, so a count never sizes an allocation beyond the input.
    pub fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u16(what)? as usize;
        self.check_count(n, min_size, what)
    }

    /// Like [`Reader::count`] for an `[int]` count.
    pub fn int_count(&mut self, what: &'static str, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.i32(what)?;
        let n = usize::try_from(n).map_err(|_| DecodeError::invalid(what, format!("negative count {n}")))?;
        self.check_count(n, min_size, what)
    }

    fn check_count(&self, n: usize, min_size: usize, what: &'static str) -> Result<usize, DecodeError> {
        if n.saturating_mul(min_size) > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n)
    }

    /// A `[string list]`.
    pub fn string_list(&mut self, what: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.count(what, 2)?;
        (0..n).map(|_| self.string(what)).collect()
    }

    /// A `[string map]`, in wire order.
    pub fn string_map(&mut self, what: &'static str) -> Result<Vec<(String, String)>, DecodeError> {
        let n = self.count(what, 4)?;
        (0..n)
            .map(|_| Ok((self.string(what)?, self.string(what)?)))
            .collect()
    }

    /// A `[string multimap]`, in wire order.
    pub fn string_multimap(&mut self, what: &'static str) -> Result<Vec<(String, Vec<String>)>, DecodeError> {
        let n = self.count(what, 4)?;
        (0..n)
            .map(|_| Ok((self.string(what)?, self.string_list(what)?)))
            .collect()
    }

    /// A `[bytes map]`, in wire order.
    pub fn bytes_map(&mut self, what: &'static str) -> Result<Vec<(String, Option<Bytes>)>, DecodeError> {
        let n = self.count(what, 6)?;
        (0..n)
            .map(|_| Ok((self.string(what)?, self.bytes(what)?)))
            .collect()
    }

    /// An `[inetaddr]`.
    pub fn inetaddr(&mut self, what: &'static str) -> Result<IpAddr, DecodeError> {
        match self.u8(what)? {
            4 => {
                let b = self.take(4, what)?;
                Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            }
            16 => {
                let b = self.take(16, what)?;
                let mut a = [0u8; 16];
                a.copy_from_slice(&b);
                Ok(IpAddr::V6(Ipv6Addr::from(a)))
            }
            n => Err(DecodeError::invalid(what, format!("address size {n}"))),
        }
    }

    /// An `[inet]`: address and port.
    pub fn inet(&mut self, what: &'static str) -> Result<SocketAddr, DecodeError> {
        let ip = self.inetaddr(what)?;
        let port = self.i32(what)?;
        let port = u16::try_from(port).map_err(|_| DecodeError::invalid(what, format!("port {port}")))?;
        Ok(SocketAddr::new(ip, port))
    }
}

/// Writes a `[string]`; a string longer than 65535 bytes is cut (it cannot be framed).
pub fn put_string(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

/// Writes a `[long string]`.
pub fn put_long_string(out: &mut BytesMut, s: &str) {
    put_len_i32(out, s.len());
    out.put_slice(s.as_bytes());
}

fn put_len_i32(out: &mut BytesMut, n: usize) {
    out.put_i32(i32::try_from(n).unwrap_or(i32::MAX));
}

/// Writes `[short bytes]`.
pub fn put_short_bytes(out: &mut BytesMut, b: &[u8]) {
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

/// Writes `[bytes]`; `None` is null.
pub fn put_bytes(out: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => out.put_i32(-1),
        Some(b) => {
            put_len_i32(out, b.len());
            out.put_slice(b);
        }
    }
}

/// Writes a `[value]`.
pub fn put_value(out: &mut BytesMut, v: &Value) {
    match v {
        Value::Null => out.put_i32(-1),
        Value::Unset => out.put_i32(-2),
        Value::Set(b) => put_bytes(out, Some(b)),
    }
}

/// Writes a `[short]` count, saturating.
pub fn put_count(out: &mut BytesMut, n: usize) {
    out.put_u16(n.min(u16::MAX as usize) as u16);
}

/// Writes a `[string list]`.
pub fn put_string_list(out: &mut BytesMut, items: &[String]) {
    put_count(out, items.len());
    for s in items.iter().take(u16::MAX as usize) {
        put_string(out, s);
    }
}

/// Writes a `[string map]`.
pub fn put_string_map(out: &mut BytesMut, items: &[(String, String)]) {
    put_count(out, items.len());
    for (k, v) in items.iter().take(u16::MAX as usize) {
        put_string(out, k);
        put_string(out, v);
    }
}

/// Writes a `[string multimap]`.
pub fn put_string_multimap(out: &mut BytesMut, items: &[(String, Vec<String>)]) {
    put_count(out, items.len());
    for (k, v) in items.iter().take(u16::MAX as usize) {
        put_string(out, k);
        put_string_list(out, v);
    }
}

/// Writes a `[bytes map]`.
pub fn put_bytes_map(out: &mut BytesMut, items: &[(String, Option<Bytes>)]) {
    put_count(out, items.len());
    for (k, v) in items.iter().take(u16::MAX as usize) {
        put_string(out, k);
        put_bytes(out, v.as_deref());
    }
}

/// Writes an `[inetaddr]`.
pub fn put_inetaddr(out: &mut BytesMut, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            out.put_u8(4);
            out.put_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.put_u8(16);
            out.put_slice(&a.octets());
        }
    }
}

/// Writes an `[inet]`.
pub fn put_inet(out: &mut BytesMut, addr: SocketAddr) {
    put_inetaddr(out, addr.ip());
    out.put_i32(i32::from(addr.port()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip() {
        let mut out = BytesMut::new();
        put_string(&mut out, "héllo");
        put_long_string(&mut out, "SELECT 1");
        put_bytes(&mut out, None);
        put_value(&mut out, &Value::Unset);
        put_string_multimap(&mut out, &[("A".into(), vec!["x".into(), "y".into()])]);
        put_inet(&mut out, "127.0.0.3:9042".parse().unwrap());
        let mut r = Reader::new(out.freeze());
        assert_eq!(r.string("s").unwrap(), "héllo");
        assert_eq!(r.long_string("q").unwrap(), "SELECT 1");
        assert_eq!(r.bytes("b").unwrap(), None);
        assert_eq!(r.value("v").unwrap(), Value::Unset);
        assert_eq!(r.string_multimap("m").unwrap()[0].1, ["x", "y"]);
        assert_eq!(r.inet("i").unwrap(), "127.0.0.3:9042".parse().unwrap());
        assert!(r.is_empty());
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0, 1]));
        assert_eq!(r.string_list("l"), Err(DecodeError::Truncated("l")));
        let mut r = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff]));
        assert!(r.bytes("b").is_err());
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xfd]));
        assert!(matches!(r.value("v"), Err(DecodeError::Invalid { .. })));
    }
}
