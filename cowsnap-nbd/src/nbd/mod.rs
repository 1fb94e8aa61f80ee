//! The NBD protocol: wire format, handshake, transmission.
pub mod server;
