//! The standard health service and server reflection, as grpcurl and other tools use them.

mod common;

use std::time::Duration;

use common::{step, TestServer};
use switchboard::config::ServerConfig;
use tokio_stream::StreamExt;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

async fn channel(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_then_not_serving_and_watch_does_not_hold_shutdown() {
    // A grace period far above the step timeout: if a Watch stream held shutdown up, stop()
    // would time out.
    let server = TestServer::with_config(ServerConfig {
        shutdown_grace: Duration::from_secs(120),
        ..ServerConfig::default()
    })
    .await;
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", "switchboard.v1.Broker"] {
        let r = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(check("nope")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut watch = health
        .watch(check("switchboard.v1.Broker"))
        .await
        .unwrap()
        .into_inner();
    let first = step("first watch event", watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let stopping = tokio::spawn(server.stop());
    let mut last = None;
    while let Some(item) = step("watch ends", watch.next()).await {
        last = Some(item.unwrap().status());
    }
    assert_eq!(last, Some(ServingStatus::NotServing));
    step("server stops despite the open watch", stopping)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_services() {
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(channel(&server).await);
    let requests = tokio_stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "switchboard.v1.Broker".into(),
            )),
        },
    ]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let list = step("list", responses.next()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = list.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["switchboard.v1.Broker", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let file = step("describe", responses.next()).await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(fds)) = file.message_response else {
        panic!("expected a file descriptor");
    };
    assert!(!fds.file_descriptor_proto.is_empty());
    server.stop().await;
}
