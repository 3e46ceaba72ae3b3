//! Watches an address with the generated Rust client, printing each message as it arrives.
//!
//! ```text
//! cargo run --example subscribe -- greetings                # Ctrl-C to stop
//! ```
//!
//! `subscribe(...).await` returns once the broker has registered the subscriber: every message
//! sent after that point is delivered (or reported as `Dropped` if this reader falls behind).

use switchboard::pb::{broker_client::BrokerClient, subscribe_response::Event, SubscribeRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "greetings".to_string());
    let server =
        std::env::var("SWITCHBOARD_SERVER").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut client = BrokerClient::connect(server).await?;
    let mut stream = client
        .subscribe(SubscribeRequest {
            address: address.clone(),
            group: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("subscribed to {address}");
    while let Some(r) = stream.message().await? {
        match r.event {
            Some(Event::Message(m)) => println!(
                "{} #{}: {}",
                m.address,
                m.sequence,
                String::from_utf8_lossy(&m.payload)
            ),
            Some(Event::Dropped(d)) => println!("fell behind: {} messages dropped", d.count),
            None => {}
        }
    }
    Ok(())
}
