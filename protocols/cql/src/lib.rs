//! Cassandra CQL native protocol for sluice: framing (v4 frames with lz4/snappy, v5 segments
//! with CRC24/CRC32), the request and response messages a proxy routes on, Murmur3 tokens,
//! replica placement and just enough CQL text analysis to find a partition key.
//!
//! No sockets, no configuration: everything here turns bytes into values and back, never
//! panics on any input, and checks every length against what is buffered (or a cap) before it
//! allocates.

pub mod codec;
pub mod compression;
pub mod crc;
pub mod error;
pub mod frame;
pub mod murmur3;
pub mod request;
pub mod response;
pub mod result;
pub mod ring;
pub mod segment;
pub mod statement;
pub mod types;
pub mod value;
pub mod wire;

pub use codec::{Decoder, Encoder, Envelope, Framing};
pub use compression::Compression;
pub use error::DecodeError;
pub use frame::{Header, Opcode};
pub use request::Request;
pub use response::Response;
