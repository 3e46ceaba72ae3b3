//! 10,000 failed authentications in a loop beside a permitted client: the permitted client's
//! median call time at most doubles. A file of its own, so no other test shares the machine
//! while it measures; the comparison is within this run, never against a fixed time.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{step, TestServer};
use switchboard::{
    config::Security,
    grpc::auth::{new_token, token_sha256},
    pb::{broker_client::BrokerClient, SendRequest},
};
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel, Code,
    Request, Status,
};

#[derive(Clone)]
struct Bearer(String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {}", self.0)).unwrap(),
        );
        Ok(r)
    }
}

async fn client(
    server: &TestServer,
    token: &str,
) -> BrokerClient<InterceptedService<Channel, Bearer>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    BrokerClient::with_interceptor(ch, Bearer(token.to_string()))
}

fn req(address: &str) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: b"x".to_vec().into(),
        ..Default::default()
    }
}

async fn median_send(c: &mut BrokerClient<InterceptedService<Channel, Bearer>>) -> Duration {
    let mut times = Vec::with_capacity(300);
    for _ in 0..300 {
        let t = Instant::now();
        c.send(req("flood.ok")).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_do_not_slow_a_permitted_client_more_than_2x() {
    let dir = std::env::temp_dir().join(format!("switchboard-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = new_token();
    let auth = dir.join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[principal]]\nname = \"ok\"\ntoken_sha256 = \"{}\"\nsend = [\">\"]\n",
            token_sha256(&token)
        ),
    )
    .unwrap();
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: None,
    })
    .await;
    let mut good = client(&server, &token).await;
    median_send(&mut good).await; // warm up
    let alone = median_send(&mut good).await;
    // One attacker, 10,000 failed authentications in a loop, overlapping the measurement.
    let mut attacker = client(&server, "wrong-token").await;
    let failed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&failed);
    let attack = tokio::spawn(async move {
        for _ in 0..10_000 {
            let e = attacker.send(req("flood.bad")).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    common::eventually("the attack is under way", || {
        failed.load(Ordering::Relaxed) >= 100
    })
    .await;
    let during = median_send(&mut good).await;
    let overlapped = failed.load(Ordering::Relaxed) < 10_000;
    step("attack", attack).await.unwrap();
    eprintln!(
        "median permitted Send: {alone:?} alone, {during:?} during the failed authentications"
    );
    assert!(overlapped, "the measurement ran while the attack did");
    assert!(during <= alone * 2, "{during:?} vs {alone:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 10_000);
    assert!(
        !server.broker.contains("flood.bad"),
        "nothing stored for them"
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
