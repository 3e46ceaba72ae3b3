//! switchboard: a gRPC pub/sub message broker.
//!
//! Clients **Send** a message to an address, pull it with unary **Recv** (long-poll, batches,
//! consumer groups), or watch an address with streaming **Subscribe** (fan-out, or a share of a
//! consumer group). See `README.md` for the full semantics.
//!
//! # Layout
//! - [`pb`]: generated protobuf and tonic code for `proto/switchboard/v1/broker.proto`.
//! - [`cli`]: clap flags; [`client`]: the `send` / `recv` / `subscribe` commands; [`config`]: validated [`config::Limits`] and [`config::ServerConfig`].
//! - [`connection`]: per-connection limit on long-lived streams.
//! - [`error`]: [`error::BrokerError`] and its one mapping to `tonic::Status`.
//! - [`validate`]: pure request checks; builds [`validate::Address`] and [`validate::Group`].
//! - [`registry`]: the [`registry::Broker`] handle: a sharded map of addresses, Send / Recv /
//!   Subscribe without gRPC, idle reclaim.
//! - `address`: one address: sequence, retention window, group cursors, fan-out bookkeeping.
//! - `budget`: the broker-wide retained-bytes bound and its oldest-first eviction.
//! - [`subscription`]: a registered subscriber as a sequence of events; lag becomes `Dropped`.
//! - [`admin`]: the `switchboard.v1.Admin` introspection service.
//! - [`metrics`]: Prometheus metrics, served on `--metrics-listen`.
//! - [`health`]: `grpc.health.v1.Health` whose watch streams end at shutdown.
//! - [`wire`]: zero-copy fan-out: Subscribe served from frames encoded once per message.
//! - [`service`]: the thin gRPC layer; [`server`]: `bind` + `run` with graceful shutdown;
//!   [`shutdown`]: the shutdown trigger, tokens and the SIGINT/SIGTERM future.
//!
//! # Semantics in brief
//! - Every message sent to an address gets the next per-address sequence (1, 2, …) and its
//!   `sent_at`; order per address is send order.
//! - An address retains a window of messages bounded by count and bytes, and the broker bounds
//!   retained bytes overall (oldest evicted first). A message leaves once every consumer group
//!   has taken it and every subscriber was handed it, or when a bound evicts it.
//! - Whoever falls behind an eviction is told the exact number lost.
#![cfg_attr(
    not(test),
    warn(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::print_stdout
    )
)]

mod address;
pub mod admin;
mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod health;
pub mod metrics;
pub mod pb;
pub mod registry;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod subscription;
pub mod validate;
pub mod wire;

pub use address::{AddressInfo, Batch, GroupInfo, Message};
pub use budget::Budget;
pub use error::BrokerError;
pub use registry::Broker;
