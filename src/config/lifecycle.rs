//! `[reload]` and `[shutdown]`: how sluice picks up a new file and how it stops.

use std::time::Duration;

use toml::Value;

use super::Fields;

/// `[reload]`. SIGHUP always reloads; `watch` also reloads when the file changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadConfig {
    pub watch: bool,
}

/// `[shutdown]`: what SIGTERM does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// `/readyz` fails at once; the listeners keep accepting this long, so that Kubernetes
    /// stops sending new connections before they are refused.
    pub readiness_delay: Duration,
    /// Then in-flight transactions get this long to finish before the connections close.
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            readiness_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

pub(super) fn parse_reload(root: &mut Fields<'_>) -> ReloadConfig {
    let Some(t) = root.take_table("reload") else {
        return ReloadConfig::default();
    };
    let mut f = root.child(t, "reload".into());
    // An invalid value is reported by `boolean`; the default stands in for it meanwhile.
    let watch = f.boolean("watch", false).unwrap_or(false);
    f.finish();
    ReloadConfig { watch }
}

pub(super) fn parse_shutdown(root: &mut Fields<'_>) -> ShutdownConfig {
    let defaults = ShutdownConfig::default();
    let Some(t) = root.take_table("shutdown") else {
        return defaults;
    };
    let mut f = root.child(t, "shutdown".into());
    let readiness_delay = duration_or_zero(&mut f, "readiness_delay").unwrap_or(defaults.readiness_delay);
    let drain_timeout = duration_or_zero(&mut f, "drain_timeout").unwrap_or(defaults.drain_timeout);
    f.finish();
    ShutdownConfig {
        readiness_delay,
        drain_timeout,
    }
}

/// A duration where zero is meaningful ("do not wait").
fn duration_or_zero(f: &mut Fields<'_>, key: &str) -> Option<Duration> {
    match f.take(key)? {
        Value::String(s) if s.trim() == "0" => Some(Duration::ZERO),
        Value::String(s) => match humantime::parse_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                f.error(key, &format!("invalid duration {s:?}: {e}"));
                None
            }
        },
        other => {
            f.error(
                key,
                &format!(
                    "must be a duration string like \"0s\" or \"5s\", found {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, EMBEDDED_DEFAULT};

    use super::*;

    #[test]
    fn defaults_and_values() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.reload, ReloadConfig::default());
        assert_eq!(c.shutdown, ShutdownConfig::default());
        let text = format!(
            "[reload]\nwatch = true\n[shutdown]\nreadiness_delay = \"5s\"\ndrain_timeout = \"0s\"\n{EMBEDDED_DEFAULT}"
        );
        let c = Config::parse(&text).unwrap();
        assert!(c.reload.watch);
        assert_eq!(c.shutdown.readiness_delay, Duration::from_secs(5));
        assert_eq!(c.shutdown.drain_timeout, Duration::ZERO);
    }

    #[test]
    fn bad_values_are_errors_with_paths() {
        let text = format!(
            "[reload]\nwatch = \"yes\"\n[shutdown]\ndrain_timeout = \"soon\"\nnope = 1\n{EMBEDDED_DEFAULT}"
        );
        let errs: Vec<String> = Config::parse(&text)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errs.iter().any(|e| e.starts_with("reload.watch:")), "{errs:?}");
        assert!(
            errs.iter().any(|e| e.starts_with("shutdown.drain_timeout:")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e == "shutdown.nope: unknown key"), "{errs:?}");
    }
}
