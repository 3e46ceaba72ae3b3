//! The command-line client against a real broker: send, recv, subscribe, output formats, errors.

mod common;

use std::{process::Stdio, time::Duration};

use common::{send, step, TestServer};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::Command,
};

fn switchboard(server: &TestServer) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.env("SWITCHBOARD_SERVER", format!("http://{}", server.addr))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> (i32, String, String) {
    let out = step("cli", cmd.output()).await.expect("cli runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_then_recv_text_and_json() {
    let server = TestServer::start().await;
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.orders", "first order", "--header", "kind=test"]);
    assert_eq!(run(cmd).await, (0, "1\n".into(), String::new()));

    // Binary payload from stdin with `-`.
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.orders", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[0xff, 0x00, 0x01])
        .await
        .unwrap();
    let out = step("send stdin", child.wait_with_output()).await.unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"2\n");

    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.orders"]);
    assert_eq!(run(cmd).await, (0, "1 first order\n".into(), String::new()));

    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.orders", "--json", "--max", "10"]);
    let (code, stdout, _) = run(cmd).await;
    assert_eq!(code, 0);
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["address"], "cli.orders");
    assert_eq!(line["sequence"], 2);
    assert_eq!(line["payload"], "/wAB");
    assert!(line["sent_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(line["headers"], serde_json::json!({}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_lines_pipelines_one_message_per_line() {
    let server = TestServer::start().await;
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.lines", "-", "--lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"alpha\nbeta\n\n\xffbin").await.unwrap();
    drop(stdin);
    let out = step("send --lines", child.wait_with_output())
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"1\n2\n3\n4\n");
    let mut c = server.client().await;
    let r = common::recv(&mut c, "cli.lines", "", 10, Duration::ZERO).await;
    let payloads: Vec<&[u8]> = r.messages.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads, vec![&b"alpha"[..], b"beta", b"", b"\xffbin"]);

    // --lines without `-` is an argument error.
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.lines", "x", "--lines"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("--lines"), "{stderr}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_exit_code_when_the_wait_ends_empty() {
    let server = TestServer::start().await;
    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.none", "--wait", "100ms"]);
    assert_eq!(run(cmd).await, (3, String::new(), String::new()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_prints_messages_until_count() {
    let server = TestServer::start().await;
    let mut cmd = switchboard(&server);
    cmd.args(["subscribe", "cli.feed", "--count", "2"])
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let broker = server.broker.clone();
    common::eventually("cli subscribed", || {
        broker.subscriber_count("cli.feed") == 1
    })
    .await;
    let mut c = server.client().await;
    send(&mut c, "cli.feed", b"one").await;
    send(&mut c, "cli.feed", b"two").await;
    send(&mut c, "cli.feed", b"three").await;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        step("line", lines.next_line()).await.unwrap().as_deref(),
        Some("1 one")
    );
    assert_eq!(
        step("line", lines.next_line()).await.unwrap().as_deref(),
        Some("2 two")
    );
    let status = step("subscribe exits", child.wait()).await.unwrap();
    assert!(status.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_clear_line_and_non_zero() {
    let server = TestServer::start().await;
    // A status from the server.
    let mut cmd = switchboard(&server);
    cmd.args(["send", "bad address", "x"]);
    let (code, stdout, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("address"),
        "{stderr}"
    );

    // A wait beyond the server's cap is an argument error before any call.
    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.x", "--wait", "2m"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("60s"), "{stderr}");
    assert!(!server.broker.contains("cli.x"), "no call was made");
    server.stop().await;

    // A refused connection: bind a port, then free it, so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args([
        "send",
        "a",
        "x",
        "--server",
        &format!("http://127.0.0.1:{port}"),
    ]);
    let (code, _, stderr) = tokio::time::timeout(Duration::from_secs(20), run(cmd))
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "switchboard: cannot connect to http://127.0.0.1:{port}: connection refused: is a \
             broker running at 127.0.0.1:{port}? (start one with `switchboard serve`)"
        )
    );
}

/// No part of a `: `-separated error line says again what an earlier part said.
fn assert_no_repeats(line: &str) {
    let parts: Vec<&str> = line.trim_end().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[..i].iter().any(|q| q.contains(p)),
            "{p:?} repeated in {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_not_repeated() {
    // A transport error whose causes repeat its text ("dns error: dns error: ...").
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(["send", "a", "x", "--server", "http://nosuchhost.invalid:1"]);
    let (code, _, stderr) = step("unknown host", run(cmd)).await;
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("switchboard: cannot connect to http://nosuchhost.invalid:1: "),
        "{stderr}"
    );
    assert_no_repeats(&stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_takes_host_and_port_without_a_scheme() {
    // Plaintext: SWITCHBOARD_SERVER and --server without http://.
    let server = TestServer::start().await;
    let mut cmd = switchboard(&server);
    cmd.env("SWITCHBOARD_SERVER", server.addr.to_string())
        .args(["send", "cli.bare", "hello"]);
    assert_eq!(run(cmd).await, (0, "1\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.bare", "--server", &server.addr.to_string()]);
    assert_eq!(run(cmd).await, (0, "1 hello\n".into(), String::new()));
    server.stop().await;

    // With --ca-cert a bare HOST:PORT is TLS.
    let pki = common::pki::Pki::new("cli-bare");
    let server = TestServer::with_security(switchboard::config::Security {
        auth_file: None,
        tls: Some(pki.tls(false, false)),
    })
    .await;
    let mut cmd = switchboard(&server);
    cmd.env("SWITCHBOARD_SERVER", server.addr.to_string())
        .args(["send", "cli.bare", "secret", "--ca-cert"])
        .arg(pki.path("ca.pem"));
    assert_eq!(run(cmd).await, (0, "1\n".into(), String::new()));

    // An unknown scheme is refused before any connection, naming the accepted forms.
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.bare", "x", "--server"])
        .arg(format!("grpc://{}", server.addr));
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("unknown scheme grpc://") && stderr.contains("https://HOST:PORT"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_plaintext_mismatches_say_what_to_use() {
    let pki = common::pki::Pki::new("cli-mismatch");
    let ca = pki.path("ca.pem");

    // https:// and --ca-cert against a plaintext broker.
    let plain = TestServer::start().await;
    let mut cmd = switchboard(&plain);
    cmd.args(["send", "cli.m", "x", "--server"])
        .arg(format!("https://{}", plain.addr))
        .arg("--ca-cert")
        .arg(&ca);
    let (code, stdout, stderr) = run(cmd).await;
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        format!(
            "switchboard: cannot connect to https://{a}: the broker at {a} speaks plaintext: use \
             http://{a} (or {a}) without --ca-cert, --cert and --key\n",
            a = plain.addr
        )
    );
    assert!(!plain.broker.contains("cli.m"), "nothing was sent");
    plain.stop().await;

    // Plaintext (http:// or bare) against a TLS broker: the first call fails, not the connect.
    let tls = TestServer::with_security(switchboard::config::Security {
        auth_file: None,
        tls: Some(pki.tls(false, false)),
    })
    .await;
    for server in [format!("http://{}", tls.addr), tls.addr.to_string()] {
        for command in [&["send", "cli.m", "x"][..], &["subscribe", "cli.m"]] {
            let mut cmd = switchboard(&tls);
            cmd.env("SWITCHBOARD_SERVER", &server).args(command);
            let (code, stdout, stderr) = run(cmd).await;
            assert_eq!((code, stdout.as_str()), (1, ""), "{command:?}: {stderr}");
            assert_eq!(
                stderr,
                format!(
                    "switchboard: cannot connect to http://{a}: the broker at {a} speaks TLS: use \
                     https://{a} and --ca-cert FILE (the CA that signed its certificate)\n",
                    a = tls.addr
                ),
                "{command:?}"
            );
        }
    }

    // https:// without --ca-cert: the certificate is not trusted, and the line says why.
    let mut cmd = switchboard(&tls);
    cmd.env("SWITCHBOARD_SERVER", format!("https://{}", tls.addr))
        .args(["send", "cli.m", "x"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--ca-cert FILE"), "{stderr}");
    assert_no_repeats(&stderr);
    tls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_and_inspect() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    send(&mut c, "cli.a", b"one").await;
    send(&mut c, "cli.b", b"two").await;
    send(&mut c, "other", b"x").await;
    let mut cmd = switchboard(&server);
    cmd.args(["addresses", "cli."]);
    let (code, stdout, _) = run(cmd).await;
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        "ADDRESS\tRETAINED\tBYTES\tFIRST\tLAST\tSUBSCRIBERS\tGROUPS\n\
         cli.a\t1\t131\t1\t1\t0\t1\n\
         cli.b\t1\t131\t1\t1\t0\t1\n"
    );
    let mut cmd = switchboard(&server);
    cmd.args(["inspect", "cli.a", "--json"]);
    let (code, stdout, _) = run(cmd).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["address"], "cli.a");
    assert_eq!(v["consumer_groups"][0]["lag"], 1);
    let mut cmd = switchboard(&server);
    cmd.args(["inspect", "cli.a"]);
    let (_, stdout, _) = run(cmd).await;
    assert!(
        stdout.contains("GROUP\tLAG\tDROPPED\tNEXT\tPENDING\tREDELIVERED\tDEAD_LETTERED\n(default)\t1\t0\t1\t0\t0\t0\n"),
        "{stdout}"
    );
    let mut cmd = switchboard(&server);
    cmd.args(["inspect", "missing"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");
    server.stop().await;
}

/// Reads JSON log lines from the broker's stderr until one has `message == want`.
async fn log_event(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    want: &str,
) -> serde_json::Value {
    loop {
        let line = step("log line", lines.next_line())
            .await
            .unwrap()
            .expect("broker still logging");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == want {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_connections_and_rejections_and_no_deliveries() {
    let mut broker = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "switchboard=info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(broker.stderr.take().unwrap()).lines();
    let start = log_event(&mut lines, "switchboard listening").await;
    let addr = start["fields"]["listen"].as_str().unwrap().to_string();
    let mut c = switchboard::pb::broker_client::BrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let opened = log_event(&mut lines, "connection opened").await;
    assert!(opened["fields"]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    for _ in 0..3 {
        c.send(switchboard::pb::SendRequest {
            address: "logs".into(),
            payload: b"delivered quietly".to_vec().into(),
            headers: Default::default(),
            message_id: String::new(),
        })
        .await
        .unwrap();
    }
    let _ = c
        .send(switchboard::pb::SendRequest {
            address: "has space".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let rejected = log_event(&mut lines, "request rejected").await;
    assert_eq!(rejected["fields"]["method"], "Send");
    assert_eq!(rejected["fields"]["address"], "has space");
    assert_eq!(rejected["fields"]["code"], "INVALID_ARGUMENT");
    // A batch over the entry limit is refused by the codec before it is decoded: logged the
    // same way, with the address it was sent to.
    let status = c
        .send_batch(switchboard::pb::SendBatchRequest {
            address: "logs.batch".into(),
            messages: vec![switchboard::pb::BatchMessage::default(); 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let rejected = log_event(&mut lines, "request rejected").await;
    assert_eq!(rejected["fields"]["method"], "SendBatch");
    assert_eq!(rejected["fields"]["address"], "logs.batch");
    assert_eq!(rejected["fields"]["code"], "INVALID_ARGUMENT");
    assert!(rejected["fields"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("messages: more than 1000"));
    drop(c);
    log_event(&mut lines, "connection closed").await;
    // SIGTERM our own child by its PID, then check nothing was logged per message.
    let pid = broker.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    while let Some(line) = step("drain", lines.next_line()).await.unwrap() {
        rest.push(line);
    }
    assert!(step("exit", broker.wait()).await.unwrap().success());
    assert!(rest.iter().all(|l| !l.contains("delivered quietly")));
    assert!(rest.iter().any(|l| l.contains("switchboard stopped")));
}

/// A service manager (or a test) may signal as soon as the start line appears: the broker
/// must already handle SIGTERM then, drain and exit 0, not die by the signal's default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_start_line_is_a_clean_shutdown() {
    // With the handlers installed only once the server ran, most rounds died by the signal.
    for round in 0..5 {
        let mut broker = common::BrokerProcess::start(&[]).await;
        common::sigterm(&broker.child);
        let mut rest = Vec::new();
        while let Some(line) = step("drain", broker.logs.next_line()).await.unwrap() {
            rest.push(line);
        }
        let status = step("exit", broker.child.wait()).await.unwrap();
        assert!(status.success(), "round {round}: {status}; logs: {rest:#?}");
        assert!(
            rest.iter().any(|l| l.contains("switchboard stopped")),
            "round {round}: {rest:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_from_and_since_replay_history() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for p in ["one", "two", "three"] {
        send(&mut c, "cli.replay", p.as_bytes()).await;
    }
    let mut cmd = switchboard(&server);
    cmd.args(["subscribe", "cli.replay", "--from", "2", "--count", "2"]);
    assert_eq!(
        run(cmd).await,
        (0, "2 two\n3 three\n".into(), String::new())
    );
    let mut cmd = switchboard(&server);
    cmd.args(["subscribe", "cli.replay", "--since", "1h", "--count", "3"]);
    assert_eq!(
        run(cmd).await,
        (0, "1 one\n2 two\n3 three\n".into(), String::new())
    );
    let mut cmd = switchboard(&server);
    cmd.args(["subscribe", "cli.replay", "--from", "9"]);
    let (code, stdout, stderr) = run(cmd).await;
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(
        stderr.starts_with("switchboard: OUT_OF_RANGE: start_sequence: 9"),
        "{stderr}"
    );
    let mut cmd = switchboard(&server);
    cmd.args(["subscribe", "cli.replay", "--from", "1", "--since", "1h"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 2, "clap refuses both: {stderr}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_create_and_delete() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for p in ["a", "b"] {
        send(&mut c, "cli.groups", p.as_bytes()).await;
    }
    let mut cmd = switchboard(&server);
    cmd.args(["group", "create", "cli.groups", "audit", "--from", "1"]);
    assert_eq!(run(cmd).await, (0, "created 1\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args([
        "group",
        "create",
        "cli.groups",
        "audit",
        "--from",
        "1",
        "--json",
    ]);
    assert_eq!(
        run(cmd).await,
        (
            0,
            "{\"created\":false,\"next_sequence\":1}\n".into(),
            String::new()
        )
    );
    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.groups", "--group", "audit", "--max", "10"]);
    assert_eq!(run(cmd).await, (0, "1 a\n2 b\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["group", "create", "cli.groups", "audit"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("ALREADY_EXISTS"), "{stderr}");
    let mut cmd = switchboard(&server);
    cmd.args(["group", "delete", "cli.groups", "audit"]);
    assert_eq!(run(cmd).await, (0, "deleted\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["group", "delete", "cli.groups", "audit"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("audit"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_group_recv_ack_and_nack() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut cmd = switchboard(&server);
    cmd.args([
        "group",
        "create",
        "cli.jobs",
        "workers",
        "--ack-wait",
        "30s",
        "--max-deliveries",
        "5",
        "--dead-letter",
        "cli.jobs.dlq",
    ]);
    assert_eq!(run(cmd).await, (0, "created 1\n".into(), String::new()));
    for p in ["one", "two", "three"] {
        send(&mut c, "cli.jobs", p.as_bytes()).await;
    }
    // --ack: printed, then acknowledged.
    let mut cmd = switchboard(&server);
    cmd.args([
        "recv", "cli.jobs", "--group", "workers", "--max", "2", "--ack",
    ]);
    assert_eq!(run(cmd).await, (0, "1 one\n2 two\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["ack", "cli.jobs", "workers", "1", "2"]);
    assert_eq!(
        run(cmd).await,
        (0, "not pending: 1 2\n".into(), String::new())
    );
    // Without --ack the message stays leased; nack gives it back at once.
    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.jobs", "--group", "workers", "--json"]);
    let (code, stdout, _) = run(cmd).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("\"sequence\":3"), "{stdout}");
    assert!(stdout.contains("\"delivery_attempt\":1"), "{stdout}");
    let mut cmd = switchboard(&server);
    cmd.args(["nack", "cli.jobs", "workers", "3", "--delay", "0s"]);
    assert_eq!(run(cmd).await, (0, String::new(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["recv", "cli.jobs", "--group", "workers", "--ack"]);
    assert_eq!(run(cmd).await, (0, "3 three\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["ack", "cli.jobs", "", "1"]);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("FAILED_PRECONDITION"), "{stderr}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_message_id_and_pattern_subscribe() {
    let server = TestServer::start().await;
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.dedup", "x", "--message-id", "abc"]);
    assert_eq!(run(cmd).await, (0, "1\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.dedup", "x", "--message-id", "abc"]);
    assert_eq!(run(cmd).await, (0, "1 duplicate\n".into(), String::new()));
    // A pattern subscription, registered before the sends (it waits for --count messages).
    let mut cmd = switchboard(&server);
    cmd.args(["subscribe", "cli.p.>", "--count", "2", "--json"])
        .stdout(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let broker = server.broker.clone();
    common::eventually("pattern subscriber registered", || {
        broker.pattern_subscriptions() == 1
    })
    .await;
    let mut c = server.client().await;
    send(&mut c, "cli.q.nope", b"no").await;
    send(&mut c, "cli.p.a", b"one").await;
    send(&mut c, "cli.p.b.c", b"two").await;
    let out = step("subscribe", child.wait_with_output()).await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let addresses: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["address"].to_string())
        .collect();
    assert_eq!(addresses, ["\"cli.p.a\"", "\"cli.p.b.c\""]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_lines_batches_and_reports_a_refused_line() {
    let server = TestServer::with_limits(switchboard::config::Limits {
        max_message_bytes: 10,
        ..Default::default()
    })
    .await;
    let mut cmd = switchboard(&server);
    cmd.args(["send", "cli.batch", "-", "--lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut input = String::new();
    for i in 0..2500 {
        if i == 1234 {
            input.push_str("this line is far too long\n");
        } else {
            input.push_str(&format!("{i}\n"));
        }
    }
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = step("send --lines", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused line makes the exit code 1"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("switchboard: line 1235: RESOURCE_EXHAUSTED: payload:"),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let seqs: Vec<u64> = stdout.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=2499).collect::<Vec<_>>(),
        "every other line, in order"
    );
    let mut c = server.client().await;
    let mut all = Vec::new();
    while all.len() < 2499 {
        all.extend(
            common::recv(&mut c, "cli.batch", "", 1000, Duration::ZERO)
                .await
                .messages,
        );
    }
    assert_eq!(all[1233].payload.as_ref(), b"1233");
    assert_eq!(all[1234].payload.as_ref(), b"1235");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_token_and_client_certificate_flags() {
    use switchboard::{
        config::Security,
        grpc::auth::{new_token, token_sha256},
    };
    let pki = common::pki::Pki::new("cli");
    let token = new_token();
    let auth = pki.dir.join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[principal]]\nname = \"cli\"\ntoken_sha256 = \"{}\"\nsend = [\"cli.>\"]\n\n[[principal]]\nname = \"billing\"\nclient_cert_subject = \"CN=billing\"\nreceive = [\"cli.>\"]\n",
            token_sha256(&token)
        ),
    )
    .unwrap();
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: Some(pki.tls(true, true)),
    })
    .await;
    let https = format!("https://{}", server.addr);
    let ca = pki.path("ca.pem");
    let mut cmd = switchboard(&server);
    cmd.env("SWITCHBOARD_SERVER", &https)
        .env("SWITCHBOARD_TOKEN", &token)
        .arg("send")
        .arg("cli.secure")
        .arg("hello")
        .arg("--ca-cert")
        .arg(&ca);
    assert_eq!(run(cmd).await, (0, "1\n".into(), String::new()));
    let mut cmd = switchboard(&server);
    cmd.env("SWITCHBOARD_SERVER", &https)
        .args(["send", "cli.secure", "no token", "--ca-cert"])
        .arg(&ca);
    let (code, _, stderr) = run(cmd).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let mut cmd = switchboard(&server);
    cmd.env("SWITCHBOARD_SERVER", &https)
        .args(["recv", "cli.secure", "--ca-cert"])
        .arg(&ca)
        .arg("--cert")
        .arg(pki.path("client-billing.pem"))
        .arg("--key")
        .arg(pki.path("client-billing.key"));
    assert_eq!(run(cmd).await, (0, "1 hello\n".into(), String::new()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_new_prints_a_token_and_its_principal_entry() {
    let out = step(
        "token new",
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["token", "new", "orders-service"])
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().next().unwrap();
    assert_eq!(token.len(), 43, "256 bits, URL-safe base64");
    assert!(token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    let entry = &text[token.len()..];
    assert!(entry.contains("name = \"orders-service\""), "{entry}");
    let want = format!(
        "token_sha256 = \"{}\"",
        switchboard::grpc::auth::token_sha256(token)
    );
    assert!(entry.contains(&want), "{entry}");
    // The entry parses as an auth file that authenticates the token.
    let auth = switchboard::grpc::auth::Auth::parse(entry).unwrap();
    assert_eq!(
        auth.authenticate(Some(token), None).unwrap().name,
        "orders-service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_bad_cors_origin_and_both_http_listen_names() {
    let serve = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    };
    let (code, _, stderr) = run(serve(&["--cors-origin", "https://app.example.com/path"])).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--cors-origin") && stderr.contains("without a path"),
        "{stderr}"
    );
    let (code, _, stderr) = run(serve(&[
        "--http-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]))
    .await;
    assert_eq!(code, 2, "clap refuses the two names together: {stderr}");
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
}
