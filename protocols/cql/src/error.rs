//! The error of every body decoder in this crate.

/// Why a message body could not be decoded. Always the sender's fault; the frame itself was
/// well delimited, so the connection can go on after an ERROR response on that stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ended in the middle of a field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field holds a value the protocol does not allow.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// An opcode this direction of the protocol does not have.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A declared length above the cap in force.
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Declared length.
        len: usize,
        /// The cap.
        max: usize,
    },
}

impl DecodeError {
    /// An `Invalid` error.
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}
