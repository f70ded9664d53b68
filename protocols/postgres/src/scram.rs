//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), pure: the caller supplies randomness.
//!
//! Channel binding (SCRAM-SHA-256-PLUS) is not offered: with TLS terminated at sluice, the
//! client's binding data could never be checked end to end.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Salted password material for one user: what PostgreSQL stores in `pg_authid`.
#[derive(Clone)]
pub struct ScramSecret {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramSecret {
    /// Derive the secret from a password. Slow on purpose (PBKDF2 with `iterations` rounds, 4096
    /// is PostgreSQL's default): compute it once per user when loading configuration. An
    /// `iterations` of 0 is treated as 1.
    ///
    /// The password is normalised with SASLprep as PostgreSQL does (and as clients such as libpq
    /// do before hashing): when SASLprep rejects it, its bytes are used as they are.
    pub fn new(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let prepared = stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password));
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramSecret {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }
}

impl ScramSecret {
    /// Reads a stored verifier as PostgreSQL keeps it in `pg_authid.rolpassword`:
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts). `None` if
    /// the text is not one.
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|i| *i > 0)?;
        let salt = STANDARD.decode(salt).ok().filter(|s| !s.is_empty())?;
        let key = |b64: &str| -> Option<[u8; 32]> { STANDARD.decode(b64).ok()?.try_into().ok() };
        Some(ScramSecret {
            salt,
            iterations,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// The verifier text of this secret (the inverse of [`ScramSecret::parse`]).
    pub fn verifier(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }

    /// StoredKey = H(ClientKey).
    pub fn stored_key(&self) -> [u8; 32] {
        self.stored_key
    }

    /// ServerKey, which proves the server to a client.
    pub fn server_key(&self) -> [u8; 32] {
        self.server_key
    }
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret")
            .field("salt_len", &self.salt.len())
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// A SCRAM exchange that failed. All but `OutOfOrder` are the client's fault; none is retryable
/// within the same exchange (the client must reconnect).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// Message does not follow the RFC 5802 grammar (or the server nonce given is unusable).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Client asked for channel binding, or sent binding data we did not agree on.
    #[error("channel binding is not supported")]
    ChannelBinding,
    /// Client-final nonce differs from the combined nonce.
    #[error("nonce mismatch")]
    Nonce,
    /// Wrong password.
    #[error("invalid proof")]
    BadProof,
    /// A message arrived in the wrong phase (a bug in the caller, or a repeated attempt).
    #[error("SCRAM exchange out of order")]
    OutOfOrder,
}

enum State {
    Initial,
    SentFirst {
        gs2_header: Vec<u8>,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        nonce: Vec<u8>,
    },
    /// Succeeded or failed: no further messages accepted.
    Finished,
}

/// Server-side SCRAM state machine for one authentication attempt.
pub struct ScramServer {
    secret: ScramSecret,
    state: State,
    /// The client's ClientKey, recovered from its proof once the exchange succeeded.
    client_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Initial => "initial",
            State::SentFirst { .. } => "sent-first",
            State::Finished => "finished",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E.
fn printable(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn split_comma(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == b',')?;
    Some((&s[..i], &s[i + 1..]))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ScramServer {
    /// Start an exchange for `secret`.
    pub fn new(secret: ScramSecret) -> Self {
        ScramServer {
            secret,
            state: State::Initial,
            client_key: None,
        }
    }

    /// The client's ClientKey (ClientProof XOR HMAC(StoredKey, AuthMessage)), known once
    /// [`ScramServer::client_final`] accepted the proof. With it, sluice can answer another
    /// server's challenge for the same verifier (SCRAM pass-through) without the password.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }

    /// client-first-message (from SASLInitialResponse data) -> server-first-message.
    /// `server_nonce` is caller-supplied random printable ASCII (no ','). Accepts gs2 headers
    /// "n,," and "y,,"; "p=..." (channel binding) is rejected with [`ScramError::ChannelBinding`].
    /// The username in `n=` is ignored (PostgreSQL clients send it empty).
    pub fn client_first(&mut self, message: &[u8], server_nonce: &str) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::Initial) {
            return Err(ScramError::OutOfOrder);
        }
        self.state = State::Finished;
        if !printable(server_nonce.as_bytes()) {
            return Err(ScramError::Malformed(
                "server nonce must be printable ASCII without ','",
            ));
        }
        let (cbind_flag, rest) = split_comma(message).ok_or(ScramError::Malformed("no gs2 header"))?;
        match cbind_flag {
            b"n" | b"y" => {}
            f if f.starts_with(b"p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (authzid, bare) = split_comma(rest).ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authorization identity is not supported"));
        }
        let gs2_header = &message[..message.len() - bare.len()];

        let mut attrs = bare.split(|&b| b == b',');
        match attrs.next() {
            Some(a) if a.starts_with(b"m=") => {
                return Err(ScramError::Malformed("unsupported mandatory extension"))
            }
            Some(a) if a.starts_with(b"n=") => {}
            _ => return Err(ScramError::Malformed("expected username attribute")),
        }
        let client_nonce = match attrs.next() {
            Some(a) if a.starts_with(b"r=") && printable(&a[2..]) => &a[2..],
            _ => return Err(ScramError::Malformed("expected nonce attribute")),
        };

        let mut nonce = client_nonce.to_vec();
        nonce.extend_from_slice(server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(STANDARD.encode(&self.secret.salt).as_bytes());
        server_first.extend_from_slice(format!(",i={}", self.secret.iterations).as_bytes());

        self.state = State::SentFirst {
            gs2_header: gs2_header.to_vec(),
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// client-final-message -> server-final-message ("v=..."), or [`ScramError::BadProof`] for
    /// a wrong password. Checks that `c=` is the base64 of the gs2 header and that `r=` is the
    /// combined nonce.
    pub fn client_final(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return Err(ScramError::OutOfOrder);
        };
        // The proof is the last attribute and signs everything before it.
        let at = message
            .windows(3)
            .rposition(|w| w == b",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let (without_proof, proof) = (&message[..at], &message[at + 3..]);

        let mut attrs = without_proof.split(|&b| b == b',');
        match attrs.next() {
            Some(a) if a.starts_with(b"c=") => {
                if a[2..] != *STANDARD.encode(&gs2_header).as_bytes() {
                    return Err(ScramError::ChannelBinding);
                }
            }
            _ => return Err(ScramError::Malformed("expected channel binding attribute")),
        }
        match attrs.next() {
            Some(a) if a.starts_with(b"r=") => {
                if !constant_time_eq(&a[2..], &nonce) {
                    return Err(ScramError::Nonce);
                }
            }
            _ => return Err(ScramError::Malformed("expected nonce attribute")),
        }
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }

        let auth_message: [&[u8]; 5] = [&client_first_bare, b",", &server_first, b",", without_proof];
        let client_signature = hmac(&self.secret.stored_key, &auth_message);
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(client_signature)) {
            *k = p ^ s;
        }
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored_key, &self.secret.stored_key) {
            return Err(ScramError::BadProof);
        }
        self.client_key = Some(client_key);
        let server_signature = hmac(&self.secret.server_key, &auth_message);
        let mut out = b"v=".to_vec();
        out.extend_from_slice(STANDARD.encode(server_signature).as_bytes());
        Ok(out)
    }
}

/// Client side of SCRAM-SHA-256 with the keys instead of the password: ClientKey proves the
/// client, ServerKey checks the server (SCRAM pass-through). It works with any server whose
/// verifier holds the same keys, whatever salt and iteration count it announces.
pub struct ScramKeyClient {
    client_key: [u8; 32],
    server_key: [u8; 32],
    client_first_bare: Vec<u8>,
    nonce: Vec<u8>,
    /// The AuthMessage once the client-final message was built.
    auth_message: Option<Vec<u8>>,
}

impl ScramKeyClient {
    /// Starts an exchange; `nonce` is caller-supplied random printable ASCII (no ',').
    pub fn new(client_key: [u8; 32], server_key: [u8; 32], nonce: &str) -> Self {
        ScramKeyClient {
            client_key,
            server_key,
            client_first_bare: format!("n=,r={nonce}").into_bytes(),
            nonce: nonce.as_bytes().to_vec(),
            auth_message: None,
        }
    }

    /// The client-first-message (SASLInitialResponse data).
    pub fn client_first(&self) -> Vec<u8> {
        let mut m = b"n,,".to_vec();
        m.extend_from_slice(&self.client_first_bare);
        m
    }

    /// server-first-message (SASLContinue data) -> client-final-message (SASLResponse data).
    pub fn server_first(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        if self.auth_message.is_some() {
            return Err(ScramError::OutOfOrder);
        }
        let mut attrs = message.split(|&b| b == b',');
        let nonce = match attrs.next() {
            Some(a) if a.starts_with(b"r=") => &a[2..],
            _ => return Err(ScramError::Malformed("expected nonce attribute")),
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() || !printable(nonce) {
            return Err(ScramError::Nonce);
        }
        match (attrs.next(), attrs.next()) {
            (Some(s), Some(i)) if s.starts_with(b"s=") && i.starts_with(b"i=") => {}
            _ => return Err(ScramError::Malformed("expected salt and iteration count")),
        }
        let mut without_proof = b"c=biws,r=".to_vec();
        without_proof.extend_from_slice(nonce);
        let auth_message = [&self.client_first_bare[..], b",", message, b",", &without_proof].concat();
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac(&stored_key, &[&auth_message]);
        let proof: Vec<u8> = self
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.auth_message = Some(auth_message);
        let mut out = without_proof;
        out.extend_from_slice(b",p=");
        out.extend_from_slice(STANDARD.encode(proof).as_bytes());
        Ok(out)
    }

    /// server-final-message (SASLFinal data): checks the server's signature.
    pub fn server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let auth_message = self.auth_message.as_ref().ok_or(ScramError::OutOfOrder)?;
        let v = message
            .strip_prefix(b"v=")
            .ok_or(ScramError::Malformed("expected verifier attribute"))?;
        let v = v.split(|&b| b == b',').next().unwrap_or_default();
        let expected = hmac(&self.server_key, &[auth_message]);
        if constant_time_eq(STANDARD.encode(expected).as_bytes(), v) {
            Ok(())
        } else {
            Err(ScramError::BadProof)
        }
    }
}

impl std::fmt::Debug for ScramKeyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeyClient").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
