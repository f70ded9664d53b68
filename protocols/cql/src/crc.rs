//! The two checksums of v5 segments: CRC24 over the header, CRC32 over the payload.

const CRC24_INIT: u32 = 0x87_5060;
const CRC24_POLY: u32 = 0x197_4F0B;

/// Cassandra's CRC24 of the low `len` bytes of `value`, least significant byte first.
pub fn crc24(mut value: u64, len: usize) -> u32 {
    let mut crc = CRC24_INIT;
    for _ in 0..len {
        crc ^= ((value & 0xff) as u32) << 16;
        value >>= 8;
        for _ in 0..8 {
            crc <<= 1;
            if crc & 0x100_0000 != 0 {
                crc ^= CRC24_POLY;
            }
        }
    }
    crc & 0xff_ffff
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32_TABLE: [u32; 256] = crc32_table();

/// Continues a standard (zlib) CRC-32 over `data`.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The payload checksum of a v5 segment: CRC-32 seeded with the bytes `FA 2D 55 CA`.
pub fn segment_crc32(payload: &[u8]) -> u32 {
    crc32_update(crc32_update(0, &[0xfa, 0x2d, 0x55, 0xca]), payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32_update(0, b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn crc24_of_a_recorded_header() {
        // capture_v5_lz4: header 35 00 74 00 04, CRC24 (LE) 4e 49 6c.
        let header = u64::from_le_bytes([0x35, 0x00, 0x74, 0x00, 0x04, 0, 0, 0]);
        assert_eq!(crc24(header, 5), 0x6c_494e);
    }
}
