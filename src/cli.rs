//! Command-line interface (clap derive). Every flag has a default, a unit in its name where it
//! has one, and a `SWITCHBOARD_*` environment variable. Nothing past this module sees clap types.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::config::{Limits, ServerConfig};

/// switchboard: a gRPC pub/sub message broker.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker (service switchboard.v1.Broker) until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

/// Flags of `switchboard serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Largest payload a Send accepts, in bytes (at most 67108864 = 64 MiB).
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Most messages one address retains; the oldest leaves when a new one would exceed it.
    #[arg(long, env = "SWITCHBOARD_RETENTION_MESSAGES", default_value_t = 65_536)]
    pub retention_messages: usize,

    /// Most bytes one address retains (payload + headers + 128 bytes per message).
    #[arg(long, env = "SWITCHBOARD_RETENTION_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub retention_bytes: usize,

    /// Most bytes retained across all addresses; past it the oldest messages broker-wide are
    /// evicted first.
    #[arg(long, env = "SWITCHBOARD_MAX_RETAINED_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_retained_bytes: usize,

    /// Milliseconds an address with nothing retained, no subscriber and no waiting Recv stays
    /// before it is reclaimed.
    #[arg(long, env = "SWITCHBOARD_IDLE_ADDRESS_MS", default_value_t = 10_000)]
    pub idle_address_ms: u64,

    /// Milliseconds shutdown waits for open calls to finish before closing connections.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
}

impl ServeArgs {
    /// The validated server configuration.
    ///
    /// # Errors
    /// A message naming the flag and the allowed range.
    pub fn config(&self) -> Result<ServerConfig, String> {
        let limits = Limits {
            max_message_bytes: self.max_message_bytes,
            retention_messages: self.retention_messages,
            retention_bytes: self.retention_bytes,
            max_retained_bytes: self.max_retained_bytes,
            idle_address: Duration::from_millis(self.idle_address_ms),
        };
        limits.validate()?;
        Ok(ServerConfig {
            limits,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
        })
    }
}
