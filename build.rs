//! Release builds place the functions a running sluice executes (PostgreSQL and CQL) together
//! at the start of the binary's code, hottest first (`src/link/order.txt`, written by
//! `benches/link-order.py` from a callgrind profile).
//!
//! The kernel maps a program's code in 64 KiB windows around each page it touches, and the
//! ~2 MB of code that start-up, logins, the relay, the pool, the probes and the admin
//! endpoints run was spread over ~120 of the 193 windows of the 12 MB of code, between
//! functions that never run; every window counts in the process's RSS. Ordered, a sluice
//! that has served a login maps 5.1 MiB of file pages instead of 9.9 (benches/README.md,
//! "Later on 2026-12-07"). What runs is unchanged.
//!
//! Only where the linker is LLD (`--symbol-ordering-file` is LLD's): the default for
//! `x86_64-unknown-linux-gnu` since Rust 1.90, unless a linker or linker flags are configured.
//! Names the build no longer has are skipped silently (a stale list costs only locality).
//! `SLUICE_LINK_ORDER=0` turns it off.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/link/order.txt");
    println!("cargo:rerun-if-env-changed=SLUICE_LINK_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let enabled = !matches!(std::env::var("SLUICE_LINK_ORDER").as_deref(), Ok("0"));
    if !(release && enabled && default_linker_is_lld()) {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = std::path::Path::new(&dir).join("src/link/order.txt");
    if order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether this build links with rustc's own LLD: the target's default since Rust 1.90, and
/// neither a linker nor linker flags configured.
fn default_linker_is_lld() -> bool {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if env("TARGET") != "x86_64-unknown-linux-gnu"
        || std::env::var_os("RUSTC_LINKER").is_some()
        || env("CARGO_ENCODED_RUSTFLAGS").contains("link")
    {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
