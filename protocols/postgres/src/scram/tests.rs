//! SCRAM tests: RFC 7677 vector, a real client (postgres-protocol), and malformed input.

use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use proptest::prelude::*;

const RFC_SALT_B64: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";

fn rfc_secret() -> ScramSecret {
    ScramSecret::new("pencil", &STANDARD.decode(RFC_SALT_B64).unwrap(), 4096)
}

#[test]
fn rfc7677_vector() {
    let mut server = ScramServer::new(rfc_secret());
    let first = server
        .client_first(
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
    assert_eq!(
        first,
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let fin = server
        .client_final(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        )
        .unwrap();
    assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    assert_eq!(server.client_final(b"c=biws"), Err(ScramError::OutOfOrder));
}

/// Runs a whole exchange with postgres-protocol's client; returns the server's verdict and
/// whether the client accepted the server's signature.
fn exchange(
    secret: &ScramSecret,
    client_password: &str,
    binding: ChannelBinding,
) -> (Result<(), ScramError>, bool) {
    let mut client = ScramSha256::new(client_password.as_bytes(), binding);
    let mut server = ScramServer::new(secret.clone());
    let first = server
        .client_first(client.message(), "3rfcNHYJY1ZVvWVs7j")
        .unwrap();
    client.update(&first).unwrap();
    match server.client_final(client.message()) {
        Ok(fin) => (Ok(()), client.finish(&fin).is_ok()),
        Err(e) => (Err(e), false),
    }
}

#[test]
fn full_exchange_with_postgres_protocol_client() {
    let secret = ScramSecret::new("s3cr3t pass", b"0123456789abcdef", 4096);
    assert_eq!(
        exchange(&secret, "s3cr3t pass", ChannelBinding::unsupported()),
        (Ok(()), true)
    );
    // "y,,": client could bind but believes the server cannot.
    assert_eq!(
        exchange(&secret, "s3cr3t pass", ChannelBinding::unrequested()),
        (Ok(()), true)
    );
}

#[test]
fn wrong_password() {
    let secret = ScramSecret::new("right", b"salt", 4096);
    assert_eq!(
        exchange(&secret, "wrong", ChannelBinding::unsupported()),
        (Err(ScramError::BadProof), false)
    );
}

#[test]
fn channel_binding_is_refused() {
    let mut client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1, 2, 3]));
    let mut server = ScramServer::new(ScramSecret::new("pw", b"salt", 1));
    assert_eq!(
        server.client_first(client.message(), "abc"),
        Err(ScramError::ChannelBinding)
    );
    assert_eq!(
        server.client_first(client.message(), "abc"),
        Err(ScramError::OutOfOrder)
    );
    let _ = client.update(b"");
}

#[test]
fn final_message_checks() {
    let secret = ScramSecret::new("pencil", b"salt", 1);
    let start = |s: &ScramSecret| {
        let mut server = ScramServer::new(s.clone());
        server.client_first(b"n,,n=,r=abc", "XYZ").unwrap();
        server
    };
    let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    let cases: [(String, ScramError); 6] = [
        (format!("c=eSws,r=abcXYZ,{proof}"), ScramError::ChannelBinding),
        (format!("c=biws,r=abcXYQ,{proof}"), ScramError::Nonce),
        (format!("c=biws,r=abcXYZ,{proof}"), ScramError::BadProof),
        ("c=biws,r=abcXYZ".to_owned(), ScramError::Malformed("no proof")),
        (
            "c=biws,r=abcXYZ,p=!!".to_owned(),
            ScramError::Malformed("proof is not base64"),
        ),
        (
            "c=biws,r=abcXYZ,p=AAAA".to_owned(),
            ScramError::Malformed("proof has the wrong length"),
        ),
    ];
    for (msg, err) in cases {
        assert_eq!(start(&secret).client_final(msg.as_bytes()), Err(err), "{msg}");
    }
    assert_eq!(
        ScramServer::new(secret).client_final(b"c=biws"),
        Err(ScramError::OutOfOrder)
    );
}

#[test]
fn first_message_checks() {
    let secret = ScramSecret::new("pw", b"salt", 1);
    let first = |msg: &[u8], nonce: &str| ScramServer::new(secret.clone()).client_first(msg, nonce);
    assert_eq!(
        first(b"p=tls-server-end-point,,n=,r=abc", "x"),
        Err(ScramError::ChannelBinding)
    );
    assert!(matches!(
        first(b"n,a=bob,n=,r=abc", "x"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first(b"x,,n=,r=abc", "x"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first(b"n,,m=ext,n=,r=abc", "x"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(first(b"n,,n=,r=", "x"), Err(ScramError::Malformed(_))));
    assert!(matches!(first(b"n,,r=abc", "x"), Err(ScramError::Malformed(_))));
    assert!(matches!(
        first(b"n,,n=,r=abc", "a,b"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(first(b"n,,n=,r=abc", ""), Err(ScramError::Malformed(_))));
    // Username is ignored; extensions after the nonce are tolerated.
    assert_eq!(
        first(b"y,,n=someone,r=abc,x=1", "d").unwrap(),
        b"r=abcd,s=c2FsdA==,i=1"
    );
}

#[test]
fn debug_hides_keys() {
    let secret = ScramSecret::new("pw", b"salt", 1);
    let shown = format!("{secret:?} {:?}", ScramServer::new(secret.clone()));
    assert!(shown.contains("iterations: 1"), "{shown}");
    assert!(!shown.contains("key"), "{shown}");
}

proptest! {
    #[test]
    fn never_panics(first in proptest::collection::vec(any::<u8>(), 0..96),
                    fin in proptest::collection::vec(any::<u8>(), 0..96)) {
        let mut server = ScramServer::new(ScramSecret::new("pw", b"salt", 1));
        let _ = server.client_first(&first, "nonce");
        let _ = server.client_final(&fin);
        let mut server = ScramServer::new(ScramSecret::new("pw", b"salt", 1));
        if server.client_first(b"n,,n=,r=abc", "def").is_ok() {
            let mut msg = b"c=biws,r=abcdef,".to_vec();
            msg.extend_from_slice(&fin);
            let _ = server.client_final(&msg);
        }
    }
}

#[test]
fn passwords_are_saslprepped_like_postgres() {
    // U+2168 ROMAN NUMERAL NINE normalises (NFKC) to "IX": either form logs in, as directly.
    let secret = ScramSecret::new("IX-\u{2168}", b"salt", 16);
    assert_eq!(
        exchange(&secret, "IX-\u{2168}", ChannelBinding::unsupported()),
        (Ok(()), true)
    );
    assert_eq!(
        exchange(&secret, "IX-IX", ChannelBinding::unsupported()),
        (Ok(()), true)
    );
    // A password SASLprep rejects (a prohibited control character) is used as it is.
    let raw = ScramSecret::new("a\u{7}b", b"salt", 16);
    assert_eq!(
        exchange(&raw, "a\u{7}b", ChannelBinding::unsupported()),
        (Ok(()), true)
    );
}
