//! switchboard: a gRPC pub/sub message broker.
//!
//! Clients **Send** a message to an address, pull it with unary **Recv** (long-poll, batches,
//! consumer groups), or watch an address with streaming **Subscribe** (fan-out from a chosen
//! start, or a share of a consumer group). See `README.md` for the full semantics.
//!
//! # Layout
//! Arrows point down only: `grpc` → `broker` → `engine`; the leaf modules are shared.
//! - [`grpc`]: the gRPC face: [`grpc::service`] (`switchboard.v1.Broker`), [`grpc::wire`]
//!   (zero-copy Subscribe), [`grpc::admin`], [`grpc::health`], [`grpc::connection`] (per-connection
//!   stream limit), [`grpc::admission`] (handshake timeout, connection limit, log budget),
//!   [`grpc::auth`] (tokens, certificate subjects, permissions), [`grpc::tls`] (rustls, reload),
//!   [`grpc::server`] (`bind` + `run` with graceful shutdown).
//! - [`broker`]: the core without gRPC: the [`Broker`] handle (Send, Recv, Subscribe, consumer
//!   groups) and [`broker::Subscription`]s (lag becomes `Dropped`).
//! - [`engine`]: the storage boundary ([`engine::Engine`], [`engine::Log`]): append, read from a
//!   sequence or a time, group cursors, retention. [`engine::memory`] is the in-memory engine.
//! - [`client`]: the CLI's client commands; [`cli`]: clap flags.
//! - Leaves: [`alloc`] (memory given back when idle), [`pb`] (generated code), [`message`] (the stored message and its wire frame),
//!   [`config`], [`error`], [`validate`], [`metrics`], [`shutdown`].
//!
//! # Semantics in brief
//! - Every message sent to an address gets the next per-address sequence (1, 2, …) and its
//!   `sent_at`; order per address is send order.
//! - Retention is history: an address keeps every message, consumed or not, until a bound
//!   removes it: count, bytes and age per address, and retained bytes broker-wide (oldest
//!   first). The default bounds fill with history, so memory use approaches
//!   `--max-retained-bytes` on a busy broker.
//! - Consumer groups are cursors into that history; fan-out streams may start at a sequence or
//!   a time (replay). Whoever falls behind an eviction is told the exact number lost.
#![cfg_attr(
    not(test),
    warn(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::print_stdout
    )
)]

pub mod alloc;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod fdlimit;
pub mod grpc;
pub mod message;
pub mod metrics;
pub mod pb;
pub mod shutdown;
pub mod validate;

pub use broker::Broker;
pub use engine::{AddressInfo, Batch, GroupInfo, StartAt};
pub use error::BrokerError;
pub use message::Message;
