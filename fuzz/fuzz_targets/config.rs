//! The configuration parser (`Config::parse`) on any text: every input gives a config or a list
//! of errors, never a panic.
//! The parser is the sluice library's, exactly what the binary runs.

#![no_main]

use libfuzzer_sys::fuzz_target;

use sluice::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::Config::parse(text) {
        Ok(c) => {
            let _ = c.unsupported();
            // Debug output never depends on (so never shows) a password.
            let mut other = c.clone();
            for cluster in &mut other.clusters {
                for u in &mut cluster.users {
                    u.password = format!("not-{}", u.password);
                }
            }
            assert_eq!(
                format!("{c:?}"),
                format!("{other:?}"),
                "a password shows in Debug output"
            );
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result names at least one error");
            let _ = errors.to_string();
        }
    }
});
