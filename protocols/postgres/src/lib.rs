//! PostgreSQL wire protocol pieces for sluice: framing, startup decoding, server message builders,
//! zero-copy peeks into client messages, SCRAM-SHA-256 and read/write statement classification.
//!
//! This crate knows bytes and messages only: no sockets, no config, no async runtime.

#![warn(missing_docs)]

pub mod classify;
pub mod frame;
pub mod peek;
pub mod scram;
pub mod server;
pub mod startup;

pub use classify::{
    custom_setting_names, Class, Classification, Classifier, Effects, FunctionCatalog, Hint, PinReason,
};
pub use frame::{peek_message, split_message, split_startup, FrameError, Message, MAX_STARTUP_LEN};
