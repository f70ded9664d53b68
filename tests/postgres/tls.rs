//! TLS on both sides: clients to sluice (SSLRequest answered 'S', `require_tls`), and sluice to
//! a PostgreSQL server with TLS (`backend_tls = "verify-full"` against a CA).

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::support::{bounded, exec, pg_bin, PgCluster, Sluice};

/// A CA and a certificate for 127.0.0.1/localhost signed by it, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sluice test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    // A subject different from the issuer's, or OpenSSL takes the leaf for self-signed.
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

/// Makes the files readable by the `postgres` OS user (which runs the servers), key 0600.
fn give_to_postgres(files: &[&Path]) {
    use std::os::unix::fs::PermissionsExt;
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    for f in files {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let (Some(uid), Some(gid)) = (id("-u"), id("-g")) {
            let _ = std::os::unix::fs::chown(f, Some(uid), Some(gid));
        }
    }
}

fn psql(port: u16, conninfo: &str, sql: &str) -> std::process::Output {
    Command::new(pg_bin("psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} user=app dbname=app {conninfo}"
        ))
        .args(["-XAtc", sql])
        .env("PGPASSWORD", "app-secret")
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_sides() {
    let cluster = PgCluster::start(0);
    let certs_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(certs_dir.path());

    // The server gets its own copy of the identity, owned by postgres.
    let server_cert = cluster.dir().join("server.pem");
    let server_key = cluster.dir().join("server.key");
    std::fs::copy(&cert, &server_cert).unwrap();
    std::fs::copy(&key, &server_key).unwrap();
    give_to_postgres(&[&server_cert, &server_key]);
    let su = cluster.superuser_client(cluster.primary_port()).await;
    exec(
        &su,
        &format!("ALTER SYSTEM SET ssl_cert_file = '{}'", server_cert.display()),
    )
    .await;
    exec(
        &su,
        &format!("ALTER SYSTEM SET ssl_key_file = '{}'", server_key.display()),
    )
    .await;
    exec(&su, "ALTER SYSTEM SET ssl = on").await;
    exec(&su, "SELECT pg_reload_conf()").await;

    let (toml, _, _) = crate::support::sluice_config(
        &cluster,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\nrequire_tls = true\nbackend_tls = \"verify-full\"\nbackend_tls_ca = \"{}\"",
            cert.display(),
            key.display(),
            ca.display()
        ),
    );
    let sluice = Sluice::start(&toml);
    let port = sluice.listen_addr().port();
    bounded(60, async {
        // The client verifies sluice's certificate; sluice verifies the server's.
        let ca_opt = format!("sslmode=verify-full sslrootcert={}", ca.display());
        let q = "SELECT s.ssl FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()";
        let out = tokio::task::spawn_blocking(move || psql(port, &ca_opt, q))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "psql over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "t",
            "sluice→server is not TLS"
        );

        // require_tls: a plaintext client is refused with a clear message.
        let out = tokio::task::spawn_blocking(move || psql(port, "sslmode=disable", "SELECT 1"))
            .await
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("requires TLS"), "{err}");

        // A client that does not trust sluice's CA cannot verify it.
        let out = tokio::task::spawn_blocking(move || {
            psql(port, "sslmode=verify-full sslrootcert=/dev/null", "SELECT 1")
        })
        .await
        .unwrap();
        assert!(!out.status.success(), "verify-full without the CA must fail");

        // The probe also went over verified TLS: the node is healthy.
        let (_, topology) = sluice.http_get("/topology");
        assert!(topology.contains("\"healthy\":true"), "{topology}");
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
}
