//! PostgreSQL wire protocol pieces for sluice: framing, startup decoding, server message builders,
//! typed decoders of the server messages a proxy reads itself, zero-copy peeks into client
//! messages, SCRAM-SHA-256, read/write statement classification and the SQL commands a proxy
//! must recognise (`EXECUTE`, `DEALLOCATE`, `DISCARD ALL`, database-level DDL).
//!
//! This crate knows bytes and messages only: no sockets, no config, no async runtime.

#![warn(missing_docs)]

pub mod backend;
pub mod classify;
pub mod commands;
pub mod frame;
pub mod md5;
pub mod peek;
pub mod scram;
pub mod server;
pub mod startup;

pub use classify::{
    custom_setting_names, Class, Classification, Classifier, Effects, FunctionCatalog, Hint, PinReason,
};
pub use frame::{peek_message, split_message, split_startup, FrameError, Message, MAX_STARTUP_LEN};

/// `s` as an SQL string literal that means the same whatever `standard_conforming_strings` is
/// (as PostgreSQL's `quote_literal` writes it): quotes doubled, and an `E''` literal with
/// doubled backslashes when there are any.
pub fn quote_literal(s: &str) -> String {
    let quoted = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::quote_literal;

    #[test]
    fn literals_are_quoted_like_quote_literal() {
        assert_eq!(quote_literal("app"), "'app'");
        assert_eq!(quote_literal("o'neil"), "'o''neil'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }
}
