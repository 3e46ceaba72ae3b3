//! Publishes messages with the generated Rust client.
//!
//! ```text
//! cargo run --release -- serve                              # the broker, in one terminal
//! cargo run --example publish -- greetings hello world      # sends "hello" and "world"
//! ```

use switchboard::pb::{broker_client::BrokerClient, SendRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "greetings".to_string());
    let server =
        std::env::var("SWITCHBOARD_SERVER").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut client = BrokerClient::connect(server).await?;
    for payload in args {
        let r = client
            .send(SendRequest {
                address: address.clone(),
                payload: payload.into_bytes().into(),
                headers: Default::default(),
                message_id: String::new(),
            })
            .await?
            .into_inner();
        println!("sent to {address}: sequence {}", r.sequence);
    }
    Ok(())
}
