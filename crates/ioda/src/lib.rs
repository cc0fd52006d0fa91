//! The `ioda` binary's library half: configuration, the `serve` wiring and a signing API client.
//! Kept as a library so integration tests can start a whole platform in-process.

pub mod bench;
pub mod client;
pub mod config;
mod https;
mod listeners;
pub mod serve;
pub mod tls;
