//! The gRPC face of the broker: services that decode a request, validate it, call the
//! [`Broker`](crate::Broker) and encode the answer, plus the server that runs them. No policy
//! and no storage lives here; nothing below (`broker/`, `engine/`) imports this module.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod codec;
pub mod connection;
mod frame_limit;
pub mod health;
pub mod hosts;
pub mod server;
pub mod service;
pub mod tls;
pub mod web;
pub mod wire;
