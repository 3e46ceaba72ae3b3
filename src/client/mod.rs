//! The command-line client: `switchboard send`, `recv` and `subscribe`.
//!
//! Output is one line per message. Text: `SEQUENCE PAYLOAD`, the payload as text when it is
//! UTF-8 without control characters, else `base64:` and its base64. `--json`: one object per line
//! with `address`, `sequence`, `sent_at` (RFC 3339), `headers` and `payload` (base64). A `Dropped`
//! event prints `dropped COUNT` (text) or `{"dropped": COUNT}`.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    time::SystemTime,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
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
        /// The transport's reason (with its causes).
        reason: String,
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

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn channel(args: &ClientArgs) -> Result<Channel, ClientError> {
    let bad = |reason: String| ClientError::BadServer {
        server: args.server.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(args.server.clone()).map_err(|e| bad(chain(&e)))?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))
    };
    if args.server.starts_with("https://") {
        crate::grpc::tls::install_provider();
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(chain(&e)))?;
    } else if args.ca_cert.is_some() || args.cert.is_some() {
        return Err(ClientError::Usage(
            "--ca-cert / --cert need an https:// --server".into(),
        ));
    }
    endpoint.connect().await.map_err(|e| ClientError::Connect {
        server: args.server.clone(),
        reason: chain(&e),
    })
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
