//! The `sluice` command line: version, and `check` on good and bad configurations.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run sluice")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The contract configs shared with checks outside this repository (beside it in CI).
fn contract_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/contract/")).to_path_buf()
}

#[test]
fn version_prints_the_package_version() {
    let out = sluice(&["--version"]);
    assert!(out.status.success(), "--version failed: {}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {printed:?}"
    );
}

#[test]
fn check_accepts_every_contract_config() {
    let dir = contract_dir();
    for name in ["postgres.toml", "cql.toml", "kubernetes.toml"] {
        let path = dir.join(name);
        assert!(path.exists(), "missing contract file {}", path.display());
        let out = sluice(&["check", "--config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "sluice check {name} failed ({}):\n{}",
            out.status,
            text(&out)
        );
    }
}

#[test]
fn check_reports_every_error_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[admin]
listen = "127.0.0.1:9930"

[[clusters]]
name = "app"
protocol = "postgres"
listen = "127.0.0.1:6432"
pool_mode = "statement"
bogus = 1

[clusters.discovery]
static = ["127.0.0.1:55432"]

[[clusters.users]]
name = "app"
password = "app-secret"
"#,
    )
    .unwrap();
    let out = sluice(&["check", "--config", path.to_str().unwrap()]);
    let printed = text(&out);
    assert!(!out.status.success(), "check accepted a bad config:\n{printed}");
    assert!(
        printed.contains("clusters[0].pool_mode"),
        "the bad value is not reported with its key path:\n{printed}"
    );
    assert!(
        printed.contains("statement"),
        "the bad value itself is not named:\n{printed}"
    );
    assert!(
        printed.contains("clusters[0].bogus"),
        "the unknown key is not reported with its key path:\n{printed}"
    );
}

#[test]
fn check_fails_on_a_missing_file() {
    let out = sluice(&["check", "--config", "/nonexistent/sluice.toml"]);
    assert!(
        !out.status.success(),
        "check accepted a missing file:\n{}",
        text(&out)
    );
}
