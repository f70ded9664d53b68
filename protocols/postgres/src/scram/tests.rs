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

#[test]
fn verifiers_parse_and_print() {
    let secret = rfc_secret();
    let text = secret.verifier();
    assert!(
        text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"),
        "{text}"
    );
    let back = ScramSecret::parse(&text).expect("parses");
    assert_eq!(back.verifier(), text);
    assert_eq!(back.stored_key(), secret.stored_key());
    assert_eq!(back.server_key(), secret.server_key());
    for bad in [
        "",
        "pencil",
        "md5abc",
        "SCRAM-SHA-256$4096:c2FsdA==$abc:def",
        "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
        "SCRAM-SHA-256$x:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
        "SCRAM-SHA-1$4096:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
    ] {
        assert!(ScramSecret::parse(bad).is_none(), "{bad:?} parsed");
    }
}

/// A client proving itself with the password to a verifier-only server: the server recovers
/// the ClientKey, and a key client then logs in to another server holding the same verifier
/// (pass-through) and checks that server's signature.
#[test]
fn pass_through_with_the_recovered_client_key() {
    let verifier = ScramSecret::new("s3cr3t pass", b"0123456789abcdef", 4096).verifier();
    let secret = ScramSecret::parse(&verifier).unwrap();
    let mut front = ScramServer::new(secret.clone());
    assert_eq!(front.client_key(), None);
    let mut client = ScramSha256::new(b"s3cr3t pass", ChannelBinding::unsupported());
    let first = front.client_first(client.message(), "frontnonce").unwrap();
    client.update(&first).unwrap();
    let fin = front.client_final(client.message()).unwrap();
    client.finish(&fin).unwrap();
    let client_key = front.client_key().expect("recovered");

    // The real server, with the same verifier.
    let mut server = ScramServer::new(secret.clone());
    let mut keys = ScramKeyClient::new(client_key, secret.server_key(), "keynonce");
    let server_first = server.client_first(&keys.client_first(), "servernonce").unwrap();
    let client_final = keys.server_first(&server_first).unwrap();
    let server_final = server
        .client_final(&client_final)
        .expect("the server accepts the key");
    keys.server_final(&server_final)
        .expect("the client accepts the server");
    // A server with another verifier refuses, and a forged server signature is refused.
    let other = ScramSecret::new("other", b"0123456789abcdef", 4096);
    let mut server = ScramServer::new(other);
    let mut keys = ScramKeyClient::new(client_key, secret.server_key(), "keynonce");
    let server_first = server.client_first(&keys.client_first(), "servernonce").unwrap();
    let client_final = keys.server_first(&server_first).unwrap();
    assert_eq!(server.client_final(&client_final), Err(ScramError::BadProof));
    assert_eq!(keys.server_final(b"v=AAAA"), Err(ScramError::BadProof));
    // A nonce that does not extend the client's is refused.
    let mut keys = ScramKeyClient::new(client_key, secret.server_key(), "keynonce");
    assert_eq!(
        keys.server_first(b"r=other,s=c2FsdA==,i=4096"),
        Err(ScramError::Nonce)
    );
    // A wrong password recovers nothing.
    let mut front = ScramServer::new(secret);
    let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
    let first = front.client_first(client.message(), "frontnonce").unwrap();
    client.update(&first).unwrap();
    assert_eq!(front.client_final(client.message()), Err(ScramError::BadProof));
    assert_eq!(front.client_key(), None);
}
