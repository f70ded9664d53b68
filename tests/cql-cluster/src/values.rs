//! Value helpers: ids (UUIDs, MD5 digests as Cassandra computes them), collection encoding,
//! and type-aware ordering of serialized values.

use std::cmp::Ordering;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest, Md5};
use sluice_cql::types::ColumnType;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, AtomicOrdering::Relaxed));
    h.finish()
}

/// A random (version 4) UUID.
pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&random_u64().to_be_bytes());
    u[8..].copy_from_slice(&random_u64().to_be_bytes());
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// A time-based (version 1) UUID for now().
pub fn timeuuid() -> [u8; 16] {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    // 100 ns intervals since 1582-10-15.
    let t = since_epoch.as_nanos() as u64 / 100
        + 0x01B2_1DD2_1381_4000
        + (COUNTER.fetch_add(1, AtomicOrdering::Relaxed) % 100);
    let mut u = random_uuid();
    u[0..4].copy_from_slice(&((t & 0xffff_ffff) as u32).to_be_bytes());
    u[4..6].copy_from_slice(&(((t >> 32) & 0xffff) as u16).to_be_bytes());
    u[6..8].copy_from_slice(&((((t >> 48) & 0x0fff) as u16) | 0x1000).to_be_bytes());
    u
}

/// A UUID derived from a name (stable host ids and table ids).
pub fn name_uuid(name: &str) -> [u8; 16] {
    let mut u: [u8; 16] = Md5::digest(name.as_bytes()).into();
    u[6] = (u[6] & 0x0f) | 0x30;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The prepared statement id Cassandra computes: MD5 of keyspace (if any) + query text.
pub fn prepared_id(keyspace: Option<&str>, query: &str) -> Bytes {
    let mut md = Md5::new();
    if let Some(k) = keyspace {
        md.update(k.as_bytes());
    }
    md.update(query.as_bytes());
    Bytes::copy_from_slice(&md.finalize())
}

/// The result metadata id Cassandra computes over column names and marshal class names.
pub fn result_metadata_id(columns: &[(String, ColumnType)]) -> Bytes {
    let mut md = Md5::new();
    for (name, typ) in columns {
        md.update(name.as_bytes());
        md.update([0u8]);
        md.update(marshal_class(typ).as_bytes());
        md.update([0u8, 0u8]);
    }
    Bytes::copy_from_slice(&md.finalize())
}

/// Cassandra's `AbstractType.toString()` of a type (non-frozen forms).
pub fn marshal_class(t: &ColumnType) -> String {
    const P: &str = "org.apache.cassandra.db.marshal.";
    use ColumnType::*;
    match t {
        Custom(c) => c.clone(),
        Ascii => format!("{P}AsciiType"),
        Bigint => format!("{P}LongType"),
        Blob => format!("{P}BytesType"),
        Boolean => format!("{P}BooleanType"),
        Counter => format!("{P}CounterColumnType"),
        Decimal => format!("{P}DecimalType"),
        Double => format!("{P}DoubleType"),
        Float => format!("{P}FloatType"),
        Int => format!("{P}Int32Type"),
        Timestamp => format!("{P}TimestampType"),
        Uuid => format!("{P}UUIDType"),
        Varchar => format!("{P}UTF8Type"),
        Varint => format!("{P}IntegerType"),
        Timeuuid => format!("{P}TimeUUIDType"),
        Inet => format!("{P}InetAddressType"),
        Date => format!("{P}SimpleDateType"),
        Time => format!("{P}TimeType"),
        Smallint => format!("{P}ShortType"),
        Tinyint => format!("{P}ByteType"),
        Duration => format!("{P}DurationType"),
        List(e) => format!("{P}ListType({})", marshal_class(e)),
        Set(e) => format!("{P}SetType({})", marshal_class(e)),
        Map(k, v) => format!("{P}MapType({},{})", marshal_class(k), marshal_class(v)),
        Tuple(items) => format!(
            "{P}TupleType({})",
            items.iter().map(marshal_class).collect::<Vec<_>>().join(",")
        ),
        Udt { name, .. } => format!("{P}UserType({name})"),
    }
}

/// A `set<...>` / `list<...>` value.
pub fn encode_collection<B: AsRef<[u8]>>(items: &[B]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_i32(items.len() as i32);
    for i in items {
        out.put_i32(i.as_ref().len() as i32);
        out.put_slice(i.as_ref());
    }
    out.freeze()
}

/// A `map<...>` value.
pub fn encode_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(items: &[(K, V)]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_i32(items.len() as i32);
    for (k, v) in items {
        out.put_i32(k.as_ref().len() as i32);
        out.put_slice(k.as_ref());
        out.put_i32(v.as_ref().len() as i32);
        out.put_slice(v.as_ref());
    }
    out.freeze()
}

/// Serialized text.
pub fn text(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

/// Serialized int.
pub fn int(v: i32) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(&v.to_be_bytes()))
}

/// Serialized bigint.
pub fn bigint(v: i64) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(&v.to_be_bytes()))
}

/// Serialized boolean.
pub fn boolean(v: bool) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(&[u8::from(v)]))
}

/// Serialized uuid.
pub fn uuid(u: [u8; 16]) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(&u))
}

/// Serialized inet.
pub fn inet(ip: IpAddr) -> Option<Bytes> {
    Some(match ip {
        IpAddr::V4(a) => Bytes::copy_from_slice(&a.octets()),
        IpAddr::V6(a) => Bytes::copy_from_slice(&a.octets()),
    })
}

/// Bytes that sort like the values of `typ` do in CQL (ascending).
pub fn sort_key(typ: &ColumnType, v: &[u8]) -> Vec<u8> {
    use ColumnType::*;
    match typ {
        Int | Bigint | Smallint | Tinyint | Counter | Timestamp | Time if !v.is_empty() => {
            let mut k = v.to_vec();
            k[0] ^= 0x80;
            k
        }
        Double | Float if !v.is_empty() => {
            let mut k = v.to_vec();
            if k[0] & 0x80 != 0 {
                k.iter_mut().for_each(|b| *b = !*b);
            } else {
                k[0] ^= 0x80;
            }
            k
        }
        Timeuuid if v.len() == 16 => {
            // Time-ordered: time_hi, time_mid, time_low, then the rest.
            let mut k = Vec::with_capacity(16);
            k.extend_from_slice(&[v[6] & 0x0f, v[7], v[4], v[5], v[0], v[1], v[2], v[3]]);
            k.extend_from_slice(&v[8..]);
            k
        }
        _ => v.to_vec(),
    }
}

/// Compares two serialized values of `typ`.
pub fn compare(typ: &ColumnType, a: &[u8], b: &[u8]) -> Ordering {
    sort_key(typ, a).cmp(&sort_key(typ, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_cassandra() {
        let q = "INSERT INTO events (payload, ts, bucket, tenant, note) VALUES (?, ?, ?, ?, ?)";
        assert_eq!(
            sluice_cql::response::hex(&prepared_id(Some("proxy_fixture"), q)),
            "4a5c8634037b33c1d21bc6bb589ad6c6"
        );
        let cols = [
            ("k".to_string(), ColumnType::Varchar),
            ("v".to_string(), ColumnType::Int),
        ];
        assert_eq!(
            sluice_cql::response::hex(&result_metadata_id(&cols)),
            "e62f20da8e27a4277fc9a96b5494b213"
        );
        assert_eq!(
            sluice_cql::response::hex(&result_metadata_id(&[])),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }

    #[test]
    fn ordering() {
        assert_eq!(
            compare(&ColumnType::Int, &(-1i32).to_be_bytes(), &1i32.to_be_bytes()),
            Ordering::Less
        );
        assert_eq!(
            compare(
                &ColumnType::Double,
                &(-2f64).to_be_bytes(),
                &(-1f64).to_be_bytes()
            ),
            Ordering::Less
        );
        assert_eq!(compare(&ColumnType::Varchar, b"b", b"ab"), Ordering::Greater);
    }
}
