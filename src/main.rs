//! The `switchboard` binary: parses flags, installs tracing, and runs the chosen command.

use std::process::ExitCode;

use clap::Parser;
use switchboard::{
    cli::{self, Cli, Command, LogFormat, ServeArgs},
    client,
    grpc::server,
    shutdown, Broker,
};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept to explain a failed connection once the command has consumed its flags.
    let client_args = cli.command.client().cloned();
    let result = match cli.command {
        Command::Serve(args) => return serve(*args).await,
        Command::Send(args) => client::send(args).await,
        Command::Recv(args) => client::recv(args).await,
        Command::Subscribe(args) => client::subscribe(args).await,
        Command::Addresses(args) => client::addresses(args).await,
        Command::Inspect(args) => client::inspect(args).await,
        Command::Group(command) => client::group(command).await,
        Command::Token(cli::TokenCommand::New { name }) => {
            let token = switchboard::grpc::auth::new_token();
            println!("{token}");
            println!();
            println!("[[principal]]");
            println!("name = {name:?}");
            println!(
                "token_sha256 = \"{}\"",
                switchboard::grpc::auth::token_sha256(&token)
            );
            println!("send = []");
            println!("receive = []");
            println!("admin = false");
            Ok(0)
        }
        Command::Ack(args) => client::ack(args).await,
        Command::Nack(args) => client::nack(args).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let e = match &client_args {
                Some(args) => client::explain(e, args).await,
                None => e,
            };
            eprintln!("switchboard: {e}");
            match e {
                client::ClientError::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("switchboard=info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    switchboard::grpc::admission::install_panic_log();
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    // Before anything opens files or sockets: every connection and segment file is one.
    match switchboard::fdlimit::raise() {
        Ok(Some(limit)) => {
            tracing::info!(
                soft = limit.soft,
                hard = limit.hard,
                raised_from = limit.before,
                "open-file limit (RLIMIT_NOFILE)"
            );
            let http = args.http_listen().map(|_| config.http.max_connections);
            if let Some(warning) =
                switchboard::fdlimit::shortfall(&limit, config.admission.max_connections, http)
            {
                tracing::warn!("{warning}");
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)")
        }
    }
    // Refuse to start on a bad auth file or TLS material, before listening.
    if let Some(path) = &config.security.auth_file {
        if let Err(e) = switchboard::grpc::auth::Auth::load(path) {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(tls) = &config.security.tls {
        if let Err(e) = tls.load() {
            eprintln!("switchboard: TLS: {e}");
            return ExitCode::from(2);
        }
    }
    // Before anything opens TLS (a `rediss://` Redis, the listener with --tls-cert).
    switchboard::grpc::tls::install_provider();
    // Recover the data directory before listening, so health turns SERVING only when every
    // address is back.
    let broker = match (&config.storage, &config.redis) {
        (Some(storage), _) => Broker::with_disk(config.limits.clone(), storage),
        (None, Some(redis)) => Broker::with_redis(config.limits.clone(), redis).await,
        (None, None) => Ok(Broker::new(config.limits.clone())),
    };
    let broker = match broker {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Before "listening" is announced: until then SIGTERM's default action would end the
    // process by the signal instead of shutting it down (see `shutdown::Signals`).
    let signals = match shutdown::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGINT / SIGTERM handlers");
            return ExitCode::FAILURE;
        }
    };
    let (listener, addr) = match server::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let http = match args.http_listen() {
        Some(addr) => match server::bind(addr).await {
            Ok((l, _)) => Some(l),
            Err(e) => {
                tracing::error!("--http-listen: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    if !addr.ip().is_loopback() {
        let missing: Vec<&str> = [
            (config.security.tls.is_none(), "TLS (--tls-cert)"),
            (
                config.security.auth_file.is_none(),
                "authentication (--auth-file)",
            ),
        ]
        .into_iter()
        .filter_map(|(m, what)| m.then_some(what))
        .collect();
        if !missing.is_empty() {
            tracing::warn!(
                listen = %addr,
                missing = %missing.join(", "),
                "listening on a non-loopback address without TLS or authentication: anyone who can reach the port can read, send and delete"
            );
        }
    }
    let l = &config.limits;
    tracing::info!(
        listen = %addr,
        max_message_bytes = l.max_message_bytes,
        retention_messages = l.retention_messages,
        retention_bytes = l.retention_bytes,
        retention_age = %humantime::format_duration(l.retention_age),
        max_retained_bytes = l.max_retained_bytes,
        idle_address_ms = l.idle_address.as_millis(),
        data_dir = config.storage.as_ref().map(|s| s.dir.display().to_string()),
        redis = config
            .redis
            .as_ref()
            .map(|r| switchboard::engine::redis::shown(&r.urls)),
        "switchboard listening"
    );
    let engine_handle = broker.clone();
    let r = server::run_with_http(listener, http, broker, config, signals.recv()).await;
    // Everything answered is durable already; this writes out what interval mode holds.
    engine_handle.engine().close();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
