//! md5 password authentication (PostgreSQL's legacy method) from the stored hash alone.
//!
//! `pg_authid` holds `md5` + hex(md5(password ‖ user)) for an md5 role. The md5 exchange only
//! ever uses that hash: the client answers a 4-byte salt with `md5` + hex(md5(hash ‖ salt)).
//! So whoever holds the hash can both check a client's answer and answer a server's challenge;
//! it cannot do SCRAM, which needs the password.

use md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| {
            [
                DIGITS[usize::from(b >> 4)] as char,
                DIGITS[usize::from(b & 15)] as char,
            ]
        })
        .collect()
}

/// Whether `s` is a stored md5 hash as `pg_authid` holds it: `md5` and 32 lowercase hex digits
/// (PostgreSQL takes such a string given as a password to be a hash, too).
pub fn is_stored_hash(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("md5")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The stored hash of `password` for `user`: `md5` + hex(md5(password ‖ user)).
pub fn stored_hash(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// The answer to an AuthenticationMD5Password carrying `salt`, from the stored hash (with its
/// `md5` prefix): `md5` + hex(md5(hex digits ‖ salt)).
pub fn response(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(stored.strip_prefix("md5").unwrap_or(stored).as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// Whether `answer` (a PasswordMessage body without its trailing NUL) answers the challenge
/// `salt` for the stored hash. Compared in constant time.
pub fn verify(stored: &str, salt: [u8; 4], answer: &[u8]) -> bool {
    let expected = response(stored, salt);
    let expected = expected.as_bytes();
    if answer.len() != expected.len() {
        return false;
    }
    expected.iter().zip(answer).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_postgres_protocol_and_postgresql() {
        // What `CREATE ROLE legacy PASSWORD 'legacy-secret'` stores under password_encryption = md5.
        let stored = stored_hash("legacy", "legacy-secret");
        assert!(is_stored_hash(&stored), "{stored}");
        let salt = [0x01, 0x9a, 0xff, 0x00];
        let theirs = postgres_protocol::authentication::md5_hash(b"legacy", b"legacy-secret", salt);
        assert_eq!(response(&stored, salt), theirs);
        assert!(verify(&stored, salt, theirs.as_bytes()));
        assert!(!verify(&stored, [0, 0, 0, 0], theirs.as_bytes()));
        assert!(!verify(&stored, salt, b"md5"));
        // A known value: md5("foo" || "bar").
        assert_eq!(stored_hash("bar", "foo"), "md53858f62230ac3c915f300c664312c63f");
    }

    #[test]
    fn only_the_stored_form_is_a_hash() {
        assert!(!is_stored_hash("md5"));
        assert!(
            !is_stored_hash("md53858F62230AC3C915F300C664312C63F"),
            "PostgreSQL writes lowercase"
        );
        assert!(!is_stored_hash("md53858f62230ac3c915f300c664312c63"));
        assert!(!is_stored_hash("SCRAM-SHA-256$4096:c2FsdA==$a:b"));
    }
}
