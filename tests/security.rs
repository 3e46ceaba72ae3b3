//! Security over real connections: bearer tokens and per-address permissions, mTLS identities,
//! TLS refusals, and that failed authentications do not hurt permitted clients. Certificates
//! are generated here with rcgen.

mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Connect and call timeout of the TLS tests' clients.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

use common::{pki::Pki, TestServer};
use switchboard::{
    config::Security,
    grpc::auth::{new_token, token_sha256},
    pb::{
        admin_client::AdminClient, broker_client::BrokerClient, ListAddressesRequest, RecvRequest,
        SendRequest, SubscribeRequest,
    },
};
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request, Status,
};

fn write_auth(dir: &std::path::Path, text: &str) -> PathBuf {
    let p = dir.join("auth.toml");
    std::fs::write(&p, text).unwrap();
    p
}

type Authed = BrokerClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
            );
        }
        Ok(r)
    }
}

async fn plain(addr: SocketAddr, token: Option<&str>) -> Authed {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    BrokerClient::with_interceptor(ch, Bearer(token.map(str::to_string)))
}

async fn tls_channel(
    addr: SocketAddr,
    pki: &Pki,
    ca: &str,
    client: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    switchboard::grpc::tls::install_provider();
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(
            std::fs::read(pki.path(&format!("{ca}.pem"))).unwrap(),
        ));
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(pki.path(&format!("{c}.pem"))).unwrap(),
            std::fs::read(pki.path(&format!("{c}.key"))).unwrap(),
        ));
    }
    // Bounded: a refused client must fail, never wait forever (one CI run hung here once,
    // not reproduced in 290 runs since).
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

fn send_req(address: &str) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: b"x".to_vec().into(),
        ..Default::default()
    }
}

fn recv_req(address: &str) -> RecvRequest {
    RecvRequest {
        address: address.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_and_permissions_hold_per_address() {
    let pki = Pki::new("tokens");
    let (orders, reader) = (new_token(), new_token());
    let auth = write_auth(
        &pki.dir,
        &format!(
            r#"
[[principal]]
name = "orders-service"
token_sha256 = "{}"
send = ["orders.>"]
receive = ["orders.*", "audit.>"]

[[principal]]
name = "reader"
token_sha256 = "{}"
receive = [">"]
"#,
            token_sha256(&orders),
            token_sha256(&reader)
        ),
    );
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: None,
    })
    .await;
    // No token, a wrong token: UNAUTHENTICATED, nothing created.
    for token in [None, Some("not-a-token")] {
        let mut c = plain(server.addr, token).await;
        let e = c.send(send_req("orders.eu")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = c
            .subscribe(SubscribeRequest {
                address: "orders.eu".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    assert!(!server.broker.contains("orders.eu"));
    let mut c = plain(server.addr, Some(&orders)).await;
    assert_eq!(
        c.send(send_req("orders.eu"))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        1
    );
    assert!(c.send(send_req("orders.eu.created")).await.is_ok());
    for denied in ["orders", "ordersX.y", "billing.x"] {
        let e = c.send(send_req(denied)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{denied}");
        assert!(
            e.message().contains("orders-service")
                && e.message().contains("send to")
                && e.message().contains(denied),
            "{}",
            e.message()
        );
        assert!(
            !server.broker.contains(denied),
            "nothing stored for {denied}"
        );
    }
    assert_eq!(
        c.recv(recv_req("orders.eu"))
            .await
            .unwrap()
            .into_inner()
            .messages
            .len(),
        1
    );
    let e = c.recv(recv_req("orders.eu.created")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "`*` is exactly one token");
    // A Subscribe is refused before any message flows.
    let e = c
        .subscribe(SubscribeRequest {
            address: "billing.>".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(server.broker.pattern_subscriptions(), 0);
    // Admin needs admin = true.
    let ch = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminClient::with_interceptor(ch, Bearer(Some(orders.clone())));
    let e = admin
        .list_addresses(ListAddressesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("orders-service"), "{}", e.message());
    // receive without send.
    let mut r = plain(server.addr, Some(&reader)).await;
    assert!(r.recv(recv_req("anything.at.all")).await.is_ok());
    assert_eq!(
        r.send(send_req("anything")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Health stays open.
    let ch = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(h.into_inner().status, 1);
    let m = server.scrape().await;
    assert!(m.get(r#"switchboard_auth_failures_total{reason="missing"}"#) >= Some(&2.0));
    assert!(m.get(r#"switchboard_auth_failures_total{reason="unknown"}"#) >= Some(&2.0));
    server.stop().await;
}

/// CreateGroup with a dead-letter address needs `send` on that address as well as `receive` on
/// the group's: a receive-only principal cannot make the broker write to an address nobody
/// may send to (before the fix its group was created and its dead letters landed there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_address_needs_send_permission() {
    let pki = Pki::new("dead-letters");
    let (reader, worker) = (new_token(), new_token());
    let auth = write_auth(
        &pki.dir,
        &format!(
            r#"
[[principal]]
name = "reader"
token_sha256 = "{}"
receive = ["jobs"]

[[principal]]
name = "worker"
token_sha256 = "{}"
receive = ["jobs"]
send = ["jobs", "jobs.dead"]
"#,
            token_sha256(&reader),
            token_sha256(&worker)
        ),
    );
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: None,
    })
    .await;
    let create = |group: &str, dead: &str| switchboard::pb::CreateGroupRequest {
        address: "jobs".into(),
        group: group.into(),
        ack_wait: Some(std::time::Duration::from_secs(30).try_into().unwrap()),
        max_deliveries: 1,
        dead_letter_address: dead.into(),
        ..Default::default()
    };
    let mut r = plain(server.addr, Some(&reader)).await;
    let e = r
        .create_group(create("sneaky", "billing.secret"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("reader") && e.message().contains("billing.secret"),
        "{}",
        e.message()
    );
    let names = common::group_names(&server, "jobs").await;
    assert!(
        !names.iter().any(|g| g == "sneaky"),
        "no group created: {names:?}"
    );
    // Even to an address it may receive from, a receive-only principal may not dead-letter.
    let e = r.create_group(create("g", "jobs")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A principal that may send there can.
    let mut w = plain(server.addr, Some(&worker)).await;
    assert!(w.create_group(create("workers", "jobs.dead")).await.is_ok());
    // And a group without dead letters needs receive only.
    let mut plain_group = create("plain", "");
    plain_group.max_deliveries = 0;
    assert!(r.create_group(plain_group).await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identities_and_tls_refusals() {
    let pki = Pki::new("mtls");
    pki.issue("other", "stranger", &["billing"]);
    // `issue` for "other" rewrote server.pem with another CA: issue ours again last.
    pki.issue("ca", "client", &["billing", "nobody"]);
    let auth = write_auth(
        &pki.dir,
        r#"
[[principal]]
name = "billing"
client_cert_subject = "CN=billing"
receive = [">"]
"#,
    );
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: Some(pki.tls(true, false)),
    })
    .await;
    let ch = tls_channel(server.addr, &pki, "ca", Some("client-billing"))
        .await
        .unwrap();
    let mut billing = BrokerClient::new(ch);
    assert!(billing.recv(recv_req("invoices")).await.is_ok());
    let e = billing.send(send_req("invoices")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("billing"), "{}", e.message());
    // A certificate the CA signed for an unknown subject: authenticated by TLS, unknown here.
    let ch = tls_channel(server.addr, &pki, "ca", Some("client-nobody"))
        .await
        .unwrap();
    let e = BrokerClient::new(ch)
        .recv(recv_req("invoices"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // No client certificate, a certificate from another CA, a plaintext client: no service.
    for client in [None, Some("stranger-billing")] {
        let refused = match tls_channel(server.addr, &pki, "ca", client).await {
            Err(_) => true,
            Ok(ch) => BrokerClient::new(ch)
                .recv(recv_req("invoices"))
                .await
                .is_err(),
        };
        assert!(refused, "{client:?}");
    }
    let plain_refused = match Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => BrokerClient::new(ch)
            .recv(recv_req("invoices"))
            .await
            .is_err(),
    };
    assert!(plain_refused);
    // A client that trusts another CA refuses the server's certificate.
    let distrusted = match tls_channel(server.addr, &pki, "other", Some("client-billing")).await {
        Err(_) => true,
        Ok(ch) => BrokerClient::new(ch)
            .recv(recv_req("invoices"))
            .await
            .is_err(),
    };
    assert!(
        distrusted,
        "the server's certificate is not signed by the other CA"
    );
    // Nobody else noticed: the permitted client still works.
    assert!(billing.recv(recv_req("invoices")).await.is_ok());
    // (The metrics endpoint speaks TLS here too: read the counters in process.)
    let text = server.broker.metrics().render(0, 0, 0);
    let rejected: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"switchboard_connections_rejected_total{reason="tls_handshake"} "#)
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(rejected >= 2.0, "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_lets_a_token_client_in() {
    let pki = Pki::new("optional");
    let token = new_token();
    let auth = write_auth(
        &pki.dir,
        &format!(
            "[[principal]]\nname = \"browser\"\ntoken_sha256 = \"{}\"\nsend = [\"web.>\"]\n",
            token_sha256(&token)
        ),
    );
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: Some(pki.tls(true, true)),
    })
    .await;
    let ch = tls_channel(server.addr, &pki, "ca", None).await.unwrap();
    let mut c = BrokerClient::with_interceptor(ch.clone(), Bearer(Some(token)));
    assert!(c.send(send_req("web.page")).await.is_ok());
    let e = BrokerClient::new(ch)
        .send(send_req("web.page"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificates_and_wrong_hosts_are_refused() {
    let pki = Pki::new("expired");
    pki.issue_expired("oldca", "billing");
    // Trust both CAs for client certificates: the expired one chains, but is expired.
    let bundle = pki.path("clientcas.pem");
    let mut both = std::fs::read(pki.path("ca.pem")).unwrap();
    both.extend(std::fs::read(pki.path("oldca.pem")).unwrap());
    std::fs::write(&bundle, both).unwrap();
    let mut tls = pki.tls(true, false);
    tls.client_ca = Some(bundle);
    let server = TestServer::with_security(Security {
        auth_file: None,
        tls: Some(tls),
    })
    .await;
    let expired = match tls_channel(server.addr, &pki, "ca", Some("expired-billing")).await {
        Err(_) => true,
        Ok(ch) => BrokerClient::new(ch).recv(recv_req("x")).await.is_err(),
    };
    assert!(expired, "an expired client certificate is refused");
    // A client expecting another host name refuses the broker's certificate.
    switchboard::grpc::tls::install_provider();
    let wrong_host = ClientTlsConfig::new()
        .domain_name("wrong.example")
        .ca_certificate(Certificate::from_pem(
            std::fs::read(pki.path("ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(pki.path("client-billing.pem")).unwrap(),
            std::fs::read(pki.path("client-billing.key")).unwrap(),
        ));
    let refused = match Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(wrong_host)
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => BrokerClient::new(ch).recv(recv_req("x")).await.is_err(),
    };
    assert!(refused, "wrong host name");
    // A good client is unaffected.
    let ch = tls_channel(server.addr, &pki, "ca", Some("client-billing"))
        .await
        .unwrap();
    assert!(BrokerClient::new(ch).recv(recv_req("x")).await.is_ok());
    server.stop().await;
}
