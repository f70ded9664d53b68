//! CQL literals and their serialized form per column type: what turns `'user:1' ` or `42` in a
//! statement's text into the bytes a partition key is hashed over.

use std::net::IpAddr;

use crate::types::ColumnType;

/// A literal constant in CQL text.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'` or `$$text$$`.
    Str(String),
    /// An integer, as written (with its sign).
    Int(String),
    /// A float, as written; also `NaN`, `Infinity`, `-Infinity`.
    Float(String),
    Uuid([u8; 16]),
    /// `0x...`.
    Blob(Vec<u8>),
    Bool(bool),
    Null,
}

/// The serialized value of `lit` as a `typ`, or `None` when the literal does not fit the type
/// (or the type has no literal support here: collections, durations, user types).
pub fn serialize(lit: &Literal, typ: &ColumnType) -> Option<Vec<u8>> {
    use ColumnType as T;
    use Literal as L;
    match (typ, lit) {
        (T::Varchar, L::Str(s)) => Some(s.as_bytes().to_vec()),
        (T::Ascii, L::Str(s)) if s.is_ascii() => Some(s.as_bytes().to_vec()),
        (T::Int, L::Int(s)) => i32::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Bigint | T::Counter, L::Int(s)) => i64::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Smallint, L::Int(s)) => i16::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Tinyint, L::Int(s)) => i8::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Varint, L::Int(s)) => Some(varint(int(s)?)),
        (T::Double, L::Int(s) | L::Float(s)) => Some(float(s)?.to_be_bytes().to_vec()),
        (T::Float, L::Int(s) | L::Float(s)) => Some((float(s)? as f32).to_be_bytes().to_vec()),
        (T::Decimal, L::Int(s) | L::Float(s)) => decimal(s),
        (T::Boolean, L::Bool(b)) => Some(vec![u8::from(*b)]),
        (T::Uuid | T::Timeuuid, L::Uuid(u)) => Some(u.to_vec()),
        (T::Blob, L::Blob(b)) => Some(b.clone()),
        (T::Timestamp, L::Int(s)) => i64::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Timestamp, L::Str(s)) => timestamp_millis(s).map(|v| v.to_be_bytes().to_vec()),
        (T::Date, L::Str(s)) => date(s).map(|d| d.to_be_bytes().to_vec()),
        (T::Date, L::Int(s)) => u32::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Time, L::Int(s)) => i64::try_from(int(s)?).ok().map(|v| v.to_be_bytes().to_vec()),
        (T::Time, L::Str(s)) => time_nanos(s).map(|v| v.to_be_bytes().to_vec()),
        (T::Inet, L::Str(s)) => match s.trim().parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => Some(a.octets().to_vec()),
            IpAddr::V6(a) => Some(a.octets().to_vec()),
        },
        _ => None,
    }
}

fn int(s: &str) -> Option<i128> {
    s.parse().ok()
}

fn float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// Minimal big-endian two's complement, as Java's `BigInteger.toByteArray`.
fn varint(v: i128) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (cur, next) = (b[start], b[start + 1]);
        if (cur == 0 && next & 0x80 == 0) || (cur == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    b[start..].to_vec()
}

/// `<scale int><unscaled varint>` of a decimal literal.
fn decimal(s: &str) -> Option<Vec<u8>> {
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i32>().ok()?),
        None => (s, 0),
    };
    let (int_part, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int_part}{frac}");
    let unscaled: i128 = digits.parse().ok()?;
    let scale = i32::try_from(frac.len()).ok()?.checked_sub(exp)?;
    let mut out = scale.to_be_bytes().to_vec();
    out.extend(varint(unscaled));
    Some(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_ymd(s: &str) -> Option<(i64, i64, i64)> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let mut it = s.splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some((if neg { -y } else { y }, m, d))
}

/// A `date`: days since the epoch, offset by 2^31.
fn date(s: &str) -> Option<u32> {
    let (y, m, d) = parse_ymd(s.trim())?;
    u32::try_from(days_from_civil(y, m, d) + (1i64 << 31)).ok()
}

/// `HH:MM:SS[.fffffffff]` as nanoseconds since midnight.
fn time_nanos(s: &str) -> Option<i64> {
    let (hms, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    let mut it = hms.splitn(3, ':');
    let h: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let sec: i64 = it.next().unwrap_or("0").parse().ok()?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(((h * 60 + m) * 60 + sec) * 1_000_000_000 + nanos)
}

/// An ISO-8601-ish timestamp (`yyyy-mm-dd[( |T)HH:MM[:SS[.fff]]][Z|±HH[:]MM]`) as milliseconds
/// since the epoch; without a zone the time is taken as UTC.
fn timestamp_millis(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date_part, rest) = match s.find([' ', 'T']) {
        Some(i) if i >= 8 => (&s[..i], s[i + 1..].trim()),
        _ => (s, ""),
    };
    let (y, m, d) = parse_ymd(date_part)?;
    let days = days_from_civil(y, m, d);
    let (time_part, zone) = match rest.find(['Z', 'z', '+']).or_else(|| rest.rfind('-')) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let nanos = if time_part.is_empty() {
        0
    } else {
        time_nanos(time_part)?
    };
    let offset_min = match zone {
        "" | "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
            if digits.len() != 4 {
                return None;
            }
            let h: i64 = digits[..2].parse().ok()?;
            let mm: i64 = digits[2..].parse().ok()?;
            sign * (h * 60 + mm)
        }
    };
    Some(days * 86_400_000 + nanos / 1_000_000 - offset_min * 60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(varint(0), [0]);
        assert_eq!(varint(127), [0x7f]);
        assert_eq!(varint(128), [0, 0x80]);
        assert_eq!(varint(-1), [0xff]);
        assert_eq!(varint(-129), [0xff, 0x7f]);
        assert_eq!(decimal("1.50").unwrap(), [0, 0, 0, 2, 0, 150]);
        assert_eq!(
            serialize(&Literal::Int("-1".into()), &ColumnType::Int).unwrap(),
            [0xff; 4]
        );
        assert_eq!(serialize(&Literal::Int("128".into()), &ColumnType::Tinyint), None);
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(date("1970-01-01"), Some(1 << 31));
        assert_eq!(date("1969-12-31"), Some((1 << 31) - 1));
        assert_eq!(timestamp_millis("1970-01-02"), Some(86_400_000));
        assert_eq!(
            timestamp_millis("2011-02-03 04:05:00+0000"),
            Some(1_296_705_900_000)
        );
        assert_eq!(
            timestamp_millis("2011-02-03T04:05:00.123+01:00"),
            Some(1_296_702_300_123)
        );
        assert_eq!(time_nanos("00:00:01.5"), Some(1_500_000_000));
    }
}
