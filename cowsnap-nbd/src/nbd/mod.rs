//! The NBD protocol: wire format, handshake, transmission.
pub mod handshake;
pub mod limits;
pub mod proto;
pub mod server;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod transmission;
