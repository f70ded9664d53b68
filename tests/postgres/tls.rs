//! TLS on both sides: clients to sluice (SSLRequest answered 'S', `require_tls`), and sluice to
//! a PostgreSQL server with TLS (`backend_tls = "verify-full"` against a CA).

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::ExtendedKeyUsagePurpose;

use crate::support::certs::{write, Ca};
use crate::support::{bounded, exec, pg_bin, PgCluster, Sluice};

/// A CA and a certificate for 127.0.0.1/localhost signed by it, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = Ca::new("sluice test CA");
    let (cert, key) = ca.sign(&["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    (
        write(dir, "ca.pem", &ca.pem),
        write(dir, "server.pem", &cert),
        write(dir, "server.key", &key),
    )
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

/// `tls_client_ca` on a PostgreSQL listener: a TLS client must present a certificate that chains
/// to the configured CA (psql's `sslcert`/`sslkey`); one without a certificate, or with one from
/// another CA, fails the handshake and never reaches a server; plaintext clients are still
/// served unless `require_tls` says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_with_tls_client_ca() {
    let cluster = PgCluster::start(0);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let client_ca = Ca::new("client CA");
    let (good_cert, good_key) = client_ca.sign(&["app"], ExtendedKeyUsagePurpose::ClientAuth);
    let (bad_cert, bad_key) = Ca::new("stranger CA").sign(&["app"], ExtendedKeyUsagePurpose::ClientAuth);
    let good = (
        write(dir.path(), "good.pem", &good_cert),
        write(dir.path(), "good.key", &good_key),
    );
    let bad = (
        write(dir.path(), "bad.pem", &bad_cert),
        write(dir.path(), "bad.key", &bad_key),
    );
    {
        // libpq refuses a private key that others may read.
        use std::os::unix::fs::PermissionsExt;
        for k in [&good.1, &bad.1] {
            std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let (toml, _, _) = crate::support::sluice_config(
        &cluster,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"",
            cert.display(),
            key.display(),
            write(dir.path(), "client-ca.pem", &client_ca.pem).display()
        ),
    );
    let sluice = Sluice::start(&toml);
    let port = sluice.listen_addr().port();
    let root = format!("sslmode=verify-full sslrootcert={}", ca.display());
    let run = move |conninfo: String| async move {
        tokio::task::spawn_blocking(move || psql(port, &conninfo, "SELECT 'through sluice'"))
            .await
            .unwrap()
    };
    bounded(60, async {
        let out = run(format!(
            "{root} sslcert={} sslkey={}",
            good.0.display(),
            good.1.display()
        ))
        .await;
        assert!(
            out.status.success(),
            "a client certificate from the configured CA: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "through sluice");

        // Without a certificate, and with one from another CA: the handshake fails.
        for conninfo in [
            format!("{root} sslcert=/nonexistent sslkey=/nonexistent"),
            format!("{root} sslcert={} sslkey={}", bad.0.display(), bad.1.display()),
        ] {
            let out = run(conninfo.clone()).await;
            assert!(!out.status.success(), "{conninfo}: must fail");
            let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert!(
                err.contains("certificate") || err.contains("ssl"),
                "{conninfo}: {err}"
            );
        }

        // Plaintext is still served (require_tls is off).
        let out = run("sslmode=disable".into()).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    })
    .await;
    // Both refused handshakes are counted (sluice counts right after the alert it sends, so the
    // count may trail psql's exit by a moment).
    let counted = "sluice_errors_total{cluster=\"app\",reason=\"tls_handshake\"} 2";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, metrics) = sluice.http_get("/metrics");
        if metrics.contains(counted) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "want {counted}:\n{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    sluice.assert_no_unexpected_errors(&[]);
}
