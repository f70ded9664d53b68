//! Cassandra's Murmur3Partitioner token: the first half of MurmurHash3 x64-128 (seed 0), with
//! Cassandra's quirk of sign-extending tail bytes, and the composite routing key encoding.

/// The partitioner's minimum token, which Cassandra gives the empty key.
pub const MIN_TOKEN: i64 = i64::MIN;

const C1: u64 = 0x87c3_7b91_1142_53d5;
const C2: u64 = 0x4cf5_ad43_2745_937f;

fn fmix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

fn mix_k1(k1: u64) -> u64 {
    k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2)
}

fn mix_k2(k2: u64) -> u64 {
    k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1)
}

/// `h1` of Cassandra's MurmurHash3 x64-128 with seed 0.
pub fn hash(key: &[u8]) -> i64 {
    let (mut h1, mut h2) = (0u64, 0u64);
    let mut blocks = key.chunks_exact(16);
    for block in &mut blocks {
        let mut a = [0u8; 8];
        a.copy_from_slice(&block[..8]);
        let k1 = u64::from_le_bytes(a);
        a.copy_from_slice(&block[8..]);
        let k2 = u64::from_le_bytes(a);
        h1 ^= mix_k1(k1);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix_k2(k2);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let tail = blocks.remainder();
    // Java reads each tail byte as a signed byte and widens it to a long: sign extension.
    let byte = |i: usize| tail[i] as i8 as i64 as u64;
    let (mut k1, mut k2) = (0u64, 0u64);
    for i in (8..tail.len()).rev() {
        k2 ^= byte(i) << ((i - 8) * 8);
    }
    if tail.len() > 8 {
        h2 ^= mix_k2(k2);
    }
    for i in (0..tail.len().min(8)).rev() {
        k1 ^= byte(i) << (i * 8);
    }
    if !tail.is_empty() {
        h1 ^= mix_k1(k1);
    }
    let len = key.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1.wrapping_add(h2) as i64
}

/// The token of a serialized partition key (a single column, or see [`composite_key`]).
pub fn token(key: &[u8]) -> i64 {
    if key.is_empty() {
        return MIN_TOKEN;
    }
    match hash(key) {
        i64::MIN => i64::MAX,
        t => t,
    }
}

/// The routing key of a multi-column partition key: `u16 BE length ‖ bytes ‖ 0x00` per
/// component. A single component is its own routing key.
pub fn composite_key<B: AsRef<[u8]>>(components: &[B]) -> Vec<u8> {
    if let [single] = components {
        return single.as_ref().to_vec();
    }
    let mut out = Vec::with_capacity(components.iter().map(|c| c.as_ref().len() + 3).sum());
    for c in components {
        let c = c.as_ref();
        let n = c.len().min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&c[..n]);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_vectors() {
        let cases: [(&[u8], i64); 9] = [
            (b"123", -7468325962851647638),
            (b"test", -6017608668500074083),
            (b"xd", 4507812186440344727),
            (b"primary_key", -1632642444691073360),
            ("kremówki".as_bytes(), 4354931215268080151),
            (&[0xfe; 8], -8927430733708461935),
            (&[0x10; 8], 1446172840243228796),
            (&[0x00, 0xff, 0x10, 0xfa, 0x99].repeat(10), 5837342703291459765),
            (b"9223372036854775807", 7162290910810015547),
        ];
        for (key, want) in cases {
            assert_eq!(token(key), want, "{key:?}");
        }
        assert_eq!(token(b""), i64::MIN);
    }

    #[test]
    fn composite_encoding() {
        assert_eq!(
            composite_key(&[b"ab".as_ref(), &[0, 0, 0, 1]]),
            [0, 2, b'a', b'b', 0, 0, 4, 0, 0, 0, 1, 0]
        );
        assert_eq!(composite_key(&[b"solo"]), b"solo");
    }
}
