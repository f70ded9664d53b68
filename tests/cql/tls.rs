//! TLS on both sides of a CQL cluster: clients to sluice (TLS from the first byte, optional
//! client certificates, `require_tls`), and sluice to nodes that speak only TLS
//! (`backend_tls = "require" | "verify-full"`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::ExtendedKeyUsagePurpose;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sluice_cql::response::error_code;
use sluice_cql::{Compression, Request, Response};
use sluice_cql_testcluster::{ClusterSpec, TestCluster};
use tokio_rustls::rustls;

use crate::client::{error_of, Client};
use crate::support::certs::{write, Ca};
use crate::support::{bounded, Sluice};

/// The nodes' addresses (127.0.0.1..=n) as certificate names.
fn node_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("127.0.0.{i}")).collect()
}

/// A sluice configuration for `cluster` with `keys` in `[[clusters]]` and `tail` after it.
fn config(cluster: &TestCluster, keys: &str, tail: &str) -> String {
    crate::config(cluster, keys, tail)
}

/// A TLS client connector trusting `ca_pem`, presenting `identity` if given.
fn connector(ca_pem: &str, identity: Option<&(String, String)>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Opens a TLS connection to sluice (checking its certificate for 127.0.0.1).
async fn tls_raw(addr: SocketAddr, tls: &tokio_rustls::TlsConnector) -> std::io::Result<Client> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = tls.connect(name, tcp).await?;
    Ok(Client::over(Box::new(stream)))
}

/// Waits (bounded) until sluice's logs contain `needle`.
fn wait_for_log(sluice: &Sluice, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(l) = sluice.logs().into_iter().find(|l| l.contains(needle)) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} within {secs} s:\n{}",
            sluice.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PYTHON_TLS: &str = r#"
import ssl, sys
from cassandra.cluster import Cluster
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_REQUIRED
cluster = Cluster([host], port=port, ssl_context=ctx, protocol_version=4)
s = cluster.connect()
s.execute("CREATE KEYSPACE py_tls WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}")
s.set_keyspace("py_tls")
s.execute("CREATE TABLE kv (k text PRIMARY KEY, v int)")
ins = s.prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
for i in range(20):
    s.execute(ins, ("k%d" % i, i))
assert s.execute("SELECT v FROM kv WHERE k = 'k7'").one().v == 7
cluster.shutdown()
print("ok")
"#;

/// Runs the Python driver over TLS against sluice; panics with its output if it fails.
fn python_tls(addr: SocketAddr, ca: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "tls.py", PYTHON_TLS);
    let mut child = Command::new("python3")
        .arg(&script)
        .args([addr.ip().to_string(), addr.port().to_string()])
        .arg(ca)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Python TLS client did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python over TLS failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_on_both_sides_with_require_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("sluice test CA");
    let names = node_names(3);
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("localhost");
    let (node_cert, node_key) = ca.sign(&all, ExtendedKeyUsagePurpose::ServerAuth);
    let cluster = TestCluster::start(ClusterSpec::new(3, 8).with_tls(&node_cert, &node_key)).unwrap();
    let (cert, key) = ca.sign(&["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    let keys = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nrequire_tls = true\nbackend_tls = \"verify-full\"\nbackend_tls_ca = \"{}\"",
        write(dir.path(), "server.pem", &cert).display(),
        write(dir.path(), "server.key", &key).display(),
        ca_path.display()
    );
    let sluice = Sluice::start(&config(&cluster, &keys, ""));
    let addr = sluice.listen_addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bounded(60, async {
        let tls = connector(&ca.pem, None);
        // A TLS client (checking sluice's certificate) runs queries on nodes reached over
        // verified TLS.
        for version in [4u8, 5] {
            let mut c = tls_raw(addr, &tls)
                .await
                .expect("TLS handshake with sluice")
                .startup(version, Compression::None)
                .await;
            let ks = format!("tls_v{version}");
            c.ok(&format!(
                "CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 2}}"
            ))
            .await;
            c.ok(&format!("CREATE TABLE {ks}.kv (k text PRIMARY KEY, v int)")).await;
            for i in 0..10 {
                c.ok(&format!("INSERT INTO {ks}.kv (k, v) VALUES ('k{i}', {i})")).await;
            }
            let rows = c.rows(&format!("SELECT v FROM {ks}.kv WHERE k = 'k3'")).await;
            assert_eq!(rows.rows_count, 1);
        }
        let records = crate::user_records(&cluster, "tls_v4");
        let (hits, routable) = crate::replica_hits(&records);
        assert!(routable >= 10 && hits == routable, "{hits}/{routable}");

        // require_tls: a plaintext client gets a CQL error it can read, then the close.
        let mut plain = Client::raw(addr).await;
        plain
            .send(0, &Request::Startup(vec![("CQL_VERSION".into(), "3.0.0".into())]))
            .await;
        let (_, r) = plain.recv().await.expect("an ERROR before the close");
        let e = error_of(&r);
        assert_eq!(e.code, error_code::AUTH_ERROR, "{r:?}");
        assert!(e.message.contains("requires TLS"), "{}", e.message);
        assert!(plain.recv_envelope().await.is_none(), "the connection closes");

        // A client that does not trust sluice's CA fails its handshake.
        let other = Ca::new("another CA");
        assert!(tls_raw(addr, &connector(&other.pem, None)).await.is_err());
    }));
    // The Python driver with an ssl_context.
    python_tls(addr, &ca_path);
    let (_, topo) = sluice.http_get("/topology");
    let topo: serde_json::Value = serde_json::from_str(&topo).unwrap();
    let nodes = topo["clusters"][0]["nodes"].as_array().unwrap();
    assert!(nodes.iter().all(|n| n["healthy"] == true), "{topo}");
    let refused = sluice.metric("sluice_errors_total{cluster=\"ring\",reason=\"tls_required\"}");
    assert_eq!(refused, Some(1.0));
    sluice.assert_no_unexpected_errors(&[]);
}

#[test]
fn backend_verify_full_with_a_wrong_ca_or_name_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("sluice test CA");
    // (what the nodes present, what sluice trusts, what the error says)
    let wrong_ca = Ca::new("not the nodes' CA");
    let names = node_names(2);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let right_names = ca.sign(&names, ExtendedKeyUsagePurpose::ServerAuth);
    let wrong_names = ca.sign(
        &["db.example.com", "127.0.0.99"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cases = [
        (right_names, wrong_ca.pem.clone(), "UnknownIssuer"),
        (wrong_names, ca.pem.clone(), "not valid for name"),
    ];
    for (i, ((cert, key), trusted, why)) in cases.into_iter().enumerate() {
        let cluster = TestCluster::start(ClusterSpec::new(2, 8).with_tls(&cert, &key)).unwrap();
        let keys = format!(
            "backend_tls = \"verify-full\"\nbackend_tls_ca = \"{}\"",
            write(dir.path(), &format!("trusted{i}.pem"), &trusted).display()
        );
        let sluice = Sluice::spawn_with_env(&config(&cluster, &keys, ""), &[]);
        let line = wait_for_log(&sluice, "TLS handshake failed", 20);
        assert!(line.contains("verify-full") && line.contains(why), "{line}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(bounded(30, async {
            let mut c = Client::connect(sluice.listen_addr(), 4, Compression::None).await;
            let r = c.query("SELECT * FROM system_schema.keyspaces").await;
            let e = error_of(&r);
            assert_eq!(e.code, error_code::SERVER_ERROR, "{r:?}");
            assert!(
                e.message.contains("TLS handshake failed") && e.message.contains(why),
                "{}",
                e.message
            );
        }));
        let (status, body) = sluice.http_get("/readyz");
        assert_eq!(status, 503, "{body}");
        // No request reached a node.
        assert!(cluster.records().is_empty());
        sluice.assert_no_unexpected_errors(&[]);
    }
}

#[test]
fn client_certificates_with_tls_client_ca_and_plaintext_alongside() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("sluice test CA");
    let client_ca = Ca::new("client CA");
    let cluster = TestCluster::start(ClusterSpec::new(3, 8)).unwrap();
    let (cert, key) = ca.sign(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let keys = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\nbackend_tls = \"disable\"",
        write(dir.path(), "server.pem", &cert).display(),
        write(dir.path(), "server.key", &key).display(),
        write(dir.path(), "client-ca.pem", &client_ca.pem).display(),
    );
    let sluice = Sluice::start(&config(&cluster, &keys, ""));
    let addr = sluice.listen_addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bounded(60, async {
        // A certificate from the client CA: in.
        let good = client_ca.sign(&["app"], ExtendedKeyUsagePurpose::ClientAuth);
        let mut c = tls_raw(addr, &connector(&ca.pem, Some(&good)))
            .await
            .expect("TLS with a client certificate")
            .startup(5, Compression::Lz4)
            .await;
        c.ok("SELECT release_version FROM system.local").await;
        c.ok("SELECT keyspace_name FROM system_schema.keyspaces").await;

        // No certificate, or one from another CA: the handshake (or the first read, with
        // TLS 1.3) fails, and no CQL answer comes.
        let stranger = ca.sign(&["app"], ExtendedKeyUsagePurpose::ClientAuth);
        for identity in [None, Some(&stranger)] {
            match tls_raw(addr, &connector(&ca.pem, identity)).await {
                Err(_) => {}
                // Nothing is sent: the server's alert (or close) ends the connection.
                Ok(mut c) => assert!(
                    c.recv_envelope().await.is_none(),
                    "refused without a valid certificate"
                ),
            }
        }

        // require_tls is off: plaintext clients share the listener.
        let mut plain = Client::connect(addr, 4, Compression::None).await;
        let r = plain.call(Request::Options).await;
        assert!(matches!(r, Response::Supported(_)), "{r:?}");
        plain
            .ok("SELECT keyspace_name FROM system_schema.keyspaces")
            .await;
    }));
    wait_for_log(&sluice, "TLS handshake with a CQL client failed", 10);
    sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_require_encrypts_without_checking_the_certificate() {
    // The nodes' certificate is from a CA sluice knows nothing of, and names none of them.
    let ca = Ca::new("unknown CA");
    let (cert, key) = ca.sign(&["db.example.com"], ExtendedKeyUsagePurpose::ServerAuth);
    let cluster = TestCluster::start(ClusterSpec::new(3, 8).with_tls(&cert, &key)).unwrap();
    let sluice = Sluice::start(&config(&cluster, "backend_tls = \"require\"", ""));
    bounded(30, async {
        let mut c = Client::connect(sluice.listen_addr(), 5, Compression::None).await;
        c.ok("CREATE KEYSPACE req WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("CREATE TABLE req.kv (k text PRIMARY KEY, v int)").await;
        c.ok("INSERT INTO req.kv (k, v) VALUES ('a', 1)").await;
        assert_eq!(c.rows("SELECT v FROM req.kv WHERE k = 'a'").await.rows_count, 1);
    })
    .await;
    assert!(!cluster.records().is_empty());
    sluice.assert_no_unexpected_errors(&[]);
}
