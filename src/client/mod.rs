//! The command-line client: `switchboard send`, `recv` and `subscribe`.
//!
//! Output is one line per message. Text: `SEQUENCE PAYLOAD`, the payload as text when it is
//! UTF-8 without control characters, else `base64:` and its base64. `--json`: one object per line
//! with `address`, `sequence`, `sent_at` (RFC 3339), `headers` and `payload` (base64). A `Dropped`
//! event prints `dropped COUNT` (text) or `{"dropped": COUNT}`.
//!
//! `--server` takes `HOST:PORT`, `http://` or `https://` ([`Target`]). A failure is one line:
//! causes that repeat are left out, a refused connection asks whether a broker runs there, and
//! a TLS / plaintext mismatch is named with the scheme and flags to use ([`explain`]).

use std::{
    collections::BTreeMap,
    error::Error as _,
    io::{self, Read, Write},
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    cli::{
        AddressesArgs, ClientArgs, GroupCommand, InspectArgs, NackArgs, RecvArgs, SendArgs,
        SettleArgs, SubscribeArgs,
    },
    pb::{self, admin_client::AdminClient, broker_client::BrokerClient, subscribe_response::Event},
};

/// Exit code of `switchboard recv` when the wait ended with no message.
pub const EXIT_EMPTY: u8 = 3;

/// Why a client command failed; printed as one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--server` is not a URI.
    #[error("--server {server:?}: {reason}")]
    BadServer {
        /// What was given.
        server: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The broker could not be reached.
    #[error("cannot connect to {server}: {reason}")]
    Connect {
        /// The broker's URI.
        server: String,
        /// The transport's reason (with its causes), and a hint when there is one.
        reason: String,
    },
    /// Nothing accepted the connection at the broker's address.
    #[error(
        "cannot connect to {server}: connection refused: is a broker running at {authority}? \
         (start one with `switchboard serve`)"
    )]
    Refused {
        /// The broker's URI.
        server: String,
        /// Its `HOST:PORT`.
        authority: String,
    },
    /// The broker speaks TLS and the client plaintext, or the other way round.
    #[error("cannot connect to {server}: {}", mismatch_hint(authority, *broker_tls))]
    Mismatch {
        /// The broker's URI, as the client used it.
        server: String,
        /// Its `HOST:PORT`.
        authority: String,
        /// Whether the broker speaks TLS (so the client did not).
        broker_tls: bool,
    },
    /// The broker answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// The arguments do not fit together.
    #[error("{0}")]
    Usage(String),
    /// Reading stdin or writing stdout failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn code_name(code: tonic::Code) -> String {
    // `Code::description` is prose; the status name is what gRPC users search for.
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_uppercase()).then_some('_');
            sep.into_iter().chain(c.to_uppercase())
        })
        .collect()
}

fn mismatch_hint(authority: &str, broker_tls: bool) -> String {
    if broker_tls {
        format!(
            "the broker at {authority} speaks TLS: use https://{authority} and --ca-cert FILE \
             (the CA that signed its certificate)"
        )
    } else {
        format!(
            "the broker at {authority} speaks plaintext: use http://{authority} (or {authority}) \
             without --ca-cert, --cert and --key"
        )
    }
}

/// `e` and its causes on one line, `: `-separated. A cause whose text is already in the line
/// is left out: transport errors often repeat their source in their own message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !part.is_empty() && !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// The first `T` in `e`'s chain, also inside an `io::Error` that wraps one.
fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(t) = c
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<T>())
        {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// Where `--server` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// What the channel connects to: `http://` or `https://`, then the authority as given.
    pub uri: String,
    /// `HOST:PORT`, with the scheme's default port when none was given.
    pub authority: String,
    /// The host, without the brackets of an IPv6 address (the TLS server name).
    pub host: String,
    /// Whether the client speaks TLS to it.
    pub tls: bool,
}

impl Target {
    /// Reads `--server`: `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`. A bare
    /// `HOST:PORT` is plaintext, or TLS when a TLS flag (--ca-cert, --cert) is given.
    ///
    /// # Errors
    /// [`ClientError::BadServer`] for another scheme or no host; [`ClientError::Usage`] for
    /// `http://` with a TLS flag.
    pub fn of(args: &ClientArgs) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadServer {
            server: args.server.clone(),
            reason,
        };
        let server = args.server.trim();
        let tls_flags = args.ca_cert.is_some() || args.cert.is_some();
        let (tls, rest) = match server.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => {
                if tls_flags {
                    return Err(ClientError::Usage(format!(
                        "--ca-cert / --cert need TLS: use --server https://{rest} (or {rest})"
                    )));
                }
                (false, rest)
            }
            Some((scheme, _)) => {
                return Err(bad(format!(
                    "unknown scheme {scheme}://: give HOST:PORT, http://HOST:PORT or \
                     https://HOST:PORT"
                )))
            }
            None => (tls_flags, server),
        };
        let uri = format!("{}://{rest}", if tls { "https" } else { "http" });
        let parsed: http::Uri = uri.parse().map_err(|e| bad(chain(&e)))?;
        let host = parsed
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host: give HOST:PORT".into()))?;
        let port = parsed.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self {
            authority: format!("{host}:{port}"),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            tls,
            uri,
        })
    }
}

async fn channel(args: &ClientArgs) -> Result<Channel, ClientError> {
    let target = Target::of(args)?;
    let bad = |reason: String| ClientError::BadServer {
        server: args.server.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(target.uri.clone()).map_err(|e| bad(chain(&e)))?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))
    };
    if target.tls {
        crate::grpc::tls::install_provider();
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(chain(&e)))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| connect_error(&target, args, &e))
}

fn connect_error(target: &Target, args: &ClientArgs, e: &tonic::transport::Error) -> ClientError {
    if find::<io::Error>(e).is_some_and(|io| io.kind() == io::ErrorKind::ConnectionRefused) {
        return ClientError::Refused {
            server: target.uri.clone(),
            authority: target.authority.clone(),
        };
    }
    // tonic's own text is only "transport error": start at its cause.
    let mut reason = chain(e.source().unwrap_or(e));
    if args.ca_cert.is_none()
        && matches!(
            find::<rustls::Error>(e),
            Some(rustls::Error::InvalidCertificate(_))
        )
    {
        reason.push_str(
            ": the client trusts no CA by default: give the one that signed the broker's \
             certificate with --ca-cert FILE",
        );
    }
    ClientError::Connect {
        server: target.uri.clone(),
        reason,
    }
}

/// How long each probe of [`explain`] waits for the broker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Turns a failure of the connection (not a status the broker sent) into
/// [`ClientError::Mismatch`] when the broker at `--server` speaks the other protocol, TLS or
/// plaintext: a TLS client sees "corrupt message", a plaintext one "h2 protocol error", and
/// neither says what to change. Found by probing the port once, only after such a failure.
/// Any other error is returned as it is.
pub async fn explain(e: ClientError, args: &ClientArgs) -> ClientError {
    let from_the_connection = match &e {
        ClientError::Connect { .. } => true,
        // Statuses the broker sends have no source; those made from a transport error do.
        ClientError::Status(s) => {
            matches!(
                s.code(),
                tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
            ) && s.source().is_some()
        }
        _ => false,
    };
    if !from_the_connection {
        return e;
    }
    let Ok(target) = Target::of(args) else {
        return e;
    };
    let other = if target.tls {
        speaks_plaintext_h2(&target).await
    } else {
        speaks_tls(&target).await
    };
    if other {
        ClientError::Mismatch {
            server: target.uri,
            authority: target.authority,
            broker_tls: !target.tls,
        }
    } else {
        e
    }
}

/// Whether the port answers an HTTP/2 client preface in plaintext with a SETTINGS frame.
async fn speaks_plaintext_h2(target: &Target) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(&target.authority).await?;
        // The client preface, then an empty SETTINGS frame (RFC 9113, section 3.4).
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await?;
        let mut frame_header = [0u8; 9];
        s.read_exact(&mut frame_header).await?;
        io::Result::Ok(frame_header[3] == 0x04)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Ok(true))
    )
}

/// Whether the port completes a TLS handshake, or gets as far as a certificate or an alert.
/// No CA is trusted, so a TLS broker fails at its certificate: that is enough to tell.
async fn speaks_tls(target: &Target) -> bool {
    crate::grpc::tls::install_provider();
    let Ok(builder) = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions() else {
        return false;
    };
    let config = builder
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let Ok(name) = rustls::pki_types::ServerName::try_from(target.host.clone()) else {
        return false;
    };
    let probe = async {
        let tcp = TcpStream::connect(&target.authority).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map(drop)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => matches!(
            e.get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            Some(
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::AlertReceived(_)
                    | rustls::Error::PeerIncompatible(_)
            )
        ),
        Err(_) => false,
    }
}

/// Adds `authorization: Bearer TOKEN` to every call when `--token` is given.
#[derive(Debug, Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Token {
    fn of(args: &ClientArgs) -> Result<Self, ClientError> {
        args.token
            .as_ref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Usage("--token: not a valid header value".into()))
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Client = BrokerClient<tonic::service::interceptor::InterceptedService<Channel, Token>>;

async fn connect(args: &ClientArgs) -> Result<Client, ClientError> {
    Ok(
        BrokerClient::with_interceptor(channel(args).await?, Token::of(args)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    )
}

/// `switchboard send`: prints the sequence. Returns the exit code.
///
/// # Errors
/// [`ClientError`] when stdin cannot be read, the broker cannot be reached or refuses.
pub async fn send(args: SendArgs) -> Result<u8, ClientError> {
    if args.lines {
        return send_lines(args).await;
    }
    let payload = match args.payload.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            io::stdin().lock().read_to_end(&mut buf)?;
            buf
        }
        Some(p) => p.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let mut client = connect(&args.client).await?;
    let r = client
        .send(pb::SendRequest {
            address: args.address,
            payload: payload.into(),
            headers: args.headers.into_iter().collect(),
            message_id: args.message_id.unwrap_or_default(),
        })
        .await
        .map_err(ClientError::Status)?
        .into_inner();
    let mut out = io::stdout().lock();
    if args.client.json {
        let mut v = serde_json::json!({ "sequence": r.sequence });
        if r.duplicate {
            v["duplicate"] = true.into();
        }
        writeln!(out, "{v}")?;
    } else if r.duplicate {
        writeln!(out, "{} duplicate", r.sequence)?;
    } else {
        writeln!(out, "{}", r.sequence)?;
    }
    Ok(0)
}

/// `send --lines`: each stdin line is one message, sent in batches (SendBatch) of the lines
/// ready at once. Refused lines are reported on stderr (`line N: CODE: message`) and make the
/// exit code 1; the rest are sent.
async fn send_lines(args: SendArgs) -> Result<u8, ClientError> {
    if args.payload.as_deref() != Some("-") {
        return Err(ClientError::Usage(
            "--lines reads stdin: give `-` as the payload".into(),
        ));
    }
    let mut client = connect(&args.client).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(LINES_BATCH);
    let headers: std::collections::HashMap<_, _> = args.headers.into_iter().collect();
    // Stdin is blocking: read it on its own thread.
    let reader = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut stdin = io::stdin().lock();
        loop {
            let mut line = Vec::new();
            if io::BufRead::read_until(&mut stdin, b'\n', &mut line)? == 0 {
                return Ok(());
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if tx.blocking_send(line).is_err() {
                return Ok(()); // the sender stopped; its error is reported below
            }
        }
    });
    let mut out = io::stdout().lock();
    let mut failed = false;
    let mut line_no = 0u64;
    // Lines that are ready go out together (at most LINES_BATCH lines or LINES_BATCH_BYTES);
    // a lone line typed by hand goes at once.
    while let Some(first) = rx.recv().await {
        let mut lines = vec![(line_no + 1, first)];
        let mut bytes = lines[0].1.len();
        line_no += 1;
        while lines.len() < LINES_BATCH && bytes < LINES_BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => {
                    line_no += 1;
                    bytes += line.len();
                    lines.push((line_no, line));
                }
                Err(_) => break,
            }
        }
        // One refused line refuses the batch: report it, drop it, send the rest again.
        while !lines.is_empty() {
            let request = pb::SendBatchRequest {
                address: args.address.clone(),
                messages: lines
                    .iter()
                    .map(|(_, l)| pb::BatchMessage {
                        payload: l.clone().into(),
                        headers: headers.clone(),
                        message_id: String::new(),
                    })
                    .collect(),
            };
            match client.send_batch(request).await {
                Ok(r) => {
                    for r in r.into_inner().results {
                        if args.client.json {
                            writeln!(out, "{}", serde_json::json!({ "sequence": r.sequence }))?;
                        } else {
                            writeln!(out, "{}", r.sequence)?;
                        }
                    }
                    break;
                }
                Err(status) => {
                    let Some(index) = refused_index(&status).filter(|i| *i < lines.len()) else {
                        return Err(ClientError::Status(status));
                    };
                    failed = true;
                    let (n, _) = lines.remove(index);
                    let code = code_name(status.code());
                    let message = status.message();
                    let reason = message.split_once(": ").map_or(message, |(_, r)| r);
                    eprintln!("switchboard: line {n}: {code}: {reason}");
                }
            }
        }
        out.flush()?;
    }
    reader
        .await
        .map_err(|e| ClientError::Io(io::Error::other(e)))??;
    Ok(u8::from(failed))
}

/// Lines per SendBatch of `send --lines` (the broker's limit).
const LINES_BATCH: usize = 1000;
/// Bytes of lines per SendBatch of `send --lines`: within the broker's decode headroom
/// (96 KiB above --max-message-bytes), whatever its limits.
const LINES_BATCH_BYTES: usize = 64 * 1024;

/// The index a SendBatch refusal names (`messages[3]: ...`).
fn refused_index(status: &tonic::Status) -> Option<usize> {
    let rest = status.message().strip_prefix("messages[")?;
    rest.split_once(']')?.0.parse().ok()
}

/// `switchboard recv`: prints what it got; exit code 0, or [`EXIT_EMPTY`] when nothing came.
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached or refuses.
pub async fn recv(args: RecvArgs) -> Result<u8, ClientError> {
    let mut client = connect(&args.client).await?;
    let wait = prost_types::Duration::try_from(args.wait).unwrap_or_default();
    let r = client
        .recv(pb::RecvRequest {
            address: args.address.clone(),
            group: args.group.clone(),
            max_messages: args.max,
            wait: Some(wait),
            // This client's receive limit is unbounded: the broker's own limit applies.
            max_bytes: u32::MAX,
        })
        .await
        .map_err(ClientError::Status)?
        .into_inner();
    {
        let mut out = io::stdout().lock();
        if r.dropped > 0 {
            print_dropped(&mut out, r.dropped, args.client.json)?;
        }
        for m in &r.messages {
            print_message(&mut out, m, args.client.json)?;
        }
        out.flush()?;
    }
    if args.ack && !r.messages.is_empty() {
        client
            .ack(pb::AckRequest {
                address: args.address.clone(),
                group: args.group.clone(),
                sequences: r.messages.iter().map(|m| m.sequence).collect(),
            })
            .await
            .map_err(ClientError::Status)?;
    }
    Ok(if r.messages.is_empty() { EXIT_EMPTY } else { 0 })
}

/// `switchboard subscribe`: prints events until Ctrl-C, `--count` messages, or the stream ends.
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached, refuses, or ends the stream with an error.
pub async fn subscribe(args: SubscribeArgs) -> Result<u8, ClientError> {
    let mut client = connect(&args.client).await?;
    let (start_sequence, start_time) = args.start.fields();
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            address: args.address,
            group: args.group,
            start_sequence,
            start_time,
        })
        .await
        .map_err(ClientError::Status)?
        .into_inner();
    let mut received = 0u64;
    loop {
        if args.count.is_some_and(|n| received >= n) {
            return Ok(0);
        }
        let next = tokio::select! {
            r = stream.message() => r.map_err(ClientError::Status)?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let Some(response) = next else {
            return Ok(0);
        };
        let mut out = io::stdout().lock();
        match response.event {
            Some(Event::Message(m)) => {
                print_message(&mut out, &m, args.client.json)?;
                received += 1;
            }
            Some(Event::Dropped(d)) => print_dropped(&mut out, d.count, args.client.json)?,
            None => {}
        }
        out.flush()?;
    }
}

/// `switchboard group create|delete`: prints `created NEXT` / `exists NEXT` for create,
/// `deleted` for delete (`--json`: one object).
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached or refuses.
pub async fn group(command: GroupCommand) -> Result<u8, ClientError> {
    let mut out = io::stdout().lock();
    match command {
        GroupCommand::Create(args) => {
            let mut client = connect(&args.client).await?;
            let (start_sequence, start_time) = args.start.fields();
            let r = client
                .create_group(pb::CreateGroupRequest {
                    address: args.address,
                    group: args.group,
                    start_sequence,
                    start_time,
                    ack_wait: args
                        .ack_wait
                        .and_then(|d| prost_types::Duration::try_from(d).ok()),
                    max_deliveries: args.max_deliveries,
                    dead_letter_address: args.dead_letter.unwrap_or_default(),
                    max_ack_pending: args.max_ack_pending,
                })
                .await
                .map_err(ClientError::Status)?
                .into_inner();
            if args.client.json {
                let v = serde_json::json!({"created": r.created, "next_sequence": r.next_sequence});
                writeln!(out, "{v}")?;
            } else {
                let word = if r.created { "created" } else { "exists" };
                writeln!(out, "{word} {}", r.next_sequence)?;
            }
        }
        GroupCommand::Delete(args) => {
            let mut client = connect(&args.client).await?;
            client
                .delete_group(pb::DeleteGroupRequest {
                    address: args.address,
                    group: args.group,
                })
                .await
                .map_err(ClientError::Status)?;
            if args.client.json {
                writeln!(out, "{}", serde_json::json!({"deleted": true}))?;
            } else {
                writeln!(out, "deleted")?;
            }
        }
    }
    Ok(0)
}

fn print_not_pending(not_pending: &[u64], json: bool) -> Result<(), ClientError> {
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::json!({ "not_pending": not_pending }))?;
    } else if !not_pending.is_empty() {
        let list: Vec<String> = not_pending.iter().map(u64::to_string).collect();
        writeln!(out, "not pending: {}", list.join(" "))?;
    }
    Ok(())
}

/// `switchboard ack ADDRESS GROUP SEQ...`: acknowledges; prints the sequences that were not
/// pending, if any.
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached or refuses.
pub async fn ack(args: SettleArgs) -> Result<u8, ClientError> {
    let mut client = connect(&args.client).await?;
    let r = client
        .ack(pb::AckRequest {
            address: args.address,
            group: args.group,
            sequences: args.sequences,
        })
        .await
        .map_err(ClientError::Status)?
        .into_inner();
    print_not_pending(&r.not_pending, args.client.json)?;
    Ok(0)
}

/// `switchboard nack ADDRESS GROUP SEQ... [--delay D]`: gives messages back; prints the
/// sequences that were not pending, if any.
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached or refuses.
pub async fn nack(args: NackArgs) -> Result<u8, ClientError> {
    let s = args.settle;
    let mut client = connect(&s.client).await?;
    let r = client
        .nack(pb::NackRequest {
            address: s.address,
            group: s.group,
            sequences: s.sequences,
            delay: prost_types::Duration::try_from(args.delay).ok(),
        })
        .await
        .map_err(ClientError::Status)?
        .into_inner();
    print_not_pending(&r.not_pending, s.client.json)?;
    Ok(0)
}

fn info_json(a: &pb::AddressInfo) -> serde_json::Value {
    serde_json::json!({
        "address": a.address,
        "retained_messages": a.retained_messages,
        "retained_bytes": a.retained_bytes,
        "first_sequence": a.first_sequence,
        "last_sequence": a.last_sequence,
        "subscribers": a.subscribers,
        "groups": a.groups,
    })
}

const ADDRESS_HEADER: &str = "ADDRESS\tRETAINED\tBYTES\tFIRST\tLAST\tSUBSCRIBERS\tGROUPS";

fn info_row(a: &pb::AddressInfo) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
        a.address,
        a.retained_messages,
        a.retained_bytes,
        a.first_sequence,
        a.last_sequence,
        a.subscribers,
        a.groups
    )
}

/// `switchboard addresses [PREFIX]`: every matching address (all pages), a tab-separated table
/// with a header, or one JSON object per line.
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached or refuses.
pub async fn addresses(args: AddressesArgs) -> Result<u8, ClientError> {
    let mut admin =
        AdminClient::with_interceptor(channel(&args.client).await?, Token::of(&args.client)?);
    let mut out = io::stdout().lock();
    if !args.client.json {
        writeln!(out, "{ADDRESS_HEADER}")?;
    }
    let mut token = String::new();
    loop {
        let page = admin
            .list_addresses(pb::ListAddressesRequest {
                prefix: args.prefix.clone(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .map_err(ClientError::Status)?
            .into_inner();
        for a in &page.addresses {
            if args.client.json {
                writeln!(out, "{}", info_json(a))?;
            } else {
                writeln!(out, "{}", info_row(a))?;
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(0);
        }
        token = page.next_page_token;
    }
}

/// `switchboard inspect ADDRESS`: the address, then one line per consumer group
/// (`GROUP LAG DROPPED NEXT PENDING REDELIVERED DEAD_LETTERED`; the default group shows as
/// `(default)`), or one JSON object (with each group's acknowledgement settings).
///
/// # Errors
/// [`ClientError`] when the broker cannot be reached or refuses (`NOT_FOUND` for an unknown
/// address).
pub async fn inspect(args: InspectArgs) -> Result<u8, ClientError> {
    let mut admin =
        AdminClient::with_interceptor(channel(&args.client).await?, Token::of(&args.client)?);
    let r = admin
        .get_address(pb::GetAddressRequest {
            address: args.address,
        })
        .await
        .map_err(ClientError::Status)?
        .into_inner();
    let info = r.address.unwrap_or_default();
    let mut out = io::stdout().lock();
    if args.client.json {
        let mut v = info_json(&info);
        v["consumer_groups"] = r
            .groups
            .iter()
            .map(|g| {
                let ack_wait = g
                    .ack_wait
                    .and_then(|d| std::time::Duration::try_from(d).ok())
                    .map(|d| humantime::format_duration(d).to_string());
                serde_json::json!({
                    "group": g.group,
                    "lag": g.lag,
                    "dropped": g.dropped,
                    "next_sequence": g.next_sequence,
                    "pending": g.pending,
                    "redelivered": g.redelivered,
                    "dead_lettered": g.dead_lettered,
                    "ack_wait": ack_wait,
                    "max_deliveries": g.max_deliveries,
                    "dead_letter_address": g.dead_letter_address,
                    "max_ack_pending": g.max_ack_pending,
                })
            })
            .collect();
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{ADDRESS_HEADER}")?;
        writeln!(out, "{}", info_row(&info))?;
        writeln!(out)?;
        writeln!(
            out,
            "GROUP\tLAG\tDROPPED\tNEXT\tPENDING\tREDELIVERED\tDEAD_LETTERED"
        )?;
        for g in &r.groups {
            let name = if g.group.is_empty() {
                "(default)"
            } else {
                &g.group
            };
            writeln!(
                out,
                "{name}\t{}\t{}\t{}\t{}\t{}\t{}",
                g.lag, g.dropped, g.next_sequence, g.pending, g.redelivered, g.dead_lettered
            )?;
        }
    }
    Ok(0)
}

fn print_dropped(out: &mut impl Write, count: u64, json: bool) -> io::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::json!({ "dropped": count }))
    } else {
        writeln!(out, "dropped {count}")
    }
}

/// Writes one message as one line (see the module docs for the format).
///
/// # Errors
/// Writing to `out` failed.
pub fn print_message(out: &mut impl Write, m: &pb::Message, json: bool) -> io::Result<()> {
    if json {
        let sent_at = m
            .sent_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|t| humantime::format_rfc3339_micros(t).to_string());
        let headers: BTreeMap<_, _> = m.headers.iter().collect();
        let mut line = serde_json::json!({
            "address": m.address,
            "sequence": m.sequence,
            "sent_at": sent_at,
            "headers": headers,
            "payload": STANDARD.encode(&m.payload),
        });
        // Only for groups with acknowledgements, so other output is unchanged.
        if m.delivery_attempt != 0 {
            line["delivery_attempt"] = m.delivery_attempt.into();
        }
        writeln!(out, "{line}")
    } else {
        match std::str::from_utf8(&m.payload) {
            Ok(text) if !text.chars().any(char::is_control) => {
                writeln!(out, "{} {text}", m.sequence)
            }
            _ => writeln!(out, "{} base64:{}", m.sequence, STANDARD.encode(&m.payload)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    fn args(server: &str, ca_cert: bool) -> ClientArgs {
        ClientArgs {
            server: server.into(),
            json: false,
            token: None,
            ca_cert: ca_cert.then(|| "ca.pem".into()),
            cert: None,
            key: None,
        }
    }

    #[test]
    fn server_forms() {
        let t = |server, ca| Target::of(&args(server, ca)).map(|t| (t.uri, t.authority, t.tls));
        let ok = |uri: &str, authority: &str, tls| Ok((uri.into(), authority.into(), tls));
        assert_eq!(
            t("127.0.0.1:50051", false).map_err(|e| e.to_string()),
            ok("http://127.0.0.1:50051", "127.0.0.1:50051", false)
        );
        assert_eq!(
            t("broker:7000", true).map_err(|e| e.to_string()),
            ok("https://broker:7000", "broker:7000", true)
        );
        assert_eq!(
            t("HTTPS://broker:7000", true).map_err(|e| e.to_string()),
            ok("https://broker:7000", "broker:7000", true)
        );
        assert_eq!(
            t("http://broker", false).map_err(|e| e.to_string()),
            ok("http://broker", "broker:80", false)
        );
        let v6 = Target::of(&args("[::1]:50051", false)).unwrap();
        assert_eq!(
            (v6.authority.as_str(), v6.host.as_str()),
            ("[::1]:50051", "::1")
        );
        assert!(matches!(
            Target::of(&args("http://broker:1", true)),
            Err(ClientError::Usage(m)) if m.contains("https://broker:1")
        ));
        assert!(matches!(
            Target::of(&args("grpc://broker:1", false)),
            Err(ClientError::BadServer { reason, .. }) if reason.contains("unknown scheme grpc://")
        ));
        assert!(matches!(
            Target::of(&args("http://:1", false)),
            Err(ClientError::BadServer { .. })
        ));
    }

    #[test]
    fn a_chain_leaves_out_causes_it_already_says() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<Self>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "tcp connect error",
            Some(Box::new(E(
                "tcp connect error",
                Some(Box::new(E("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            chain(&e),
            "tcp connect error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn text_and_binary_lines() {
        let mut m = pb::Message {
            address: "a".into(),
            sequence: 7,
            payload: b"hi there".to_vec().into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        print_message(&mut out, &m, false).unwrap();
        m.payload = vec![0xff, 0x00].into();
        print_message(&mut out, &m, false).unwrap();
        m.payload = b"two\nlines".to_vec().into();
        print_message(&mut out, &m, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "7 hi there\n7 base64:/wA=\n7 base64:dHdvCmxpbmVz\n"
        );
    }
}
