//! The standard gRPC health service (`grpc.health.v1.Health`, from tonic-health), made to let go
//! at shutdown: tonic-health's `Watch` streams never end by themselves, so each one here ends
//! (after a final `NOT_SERVING`) when shutdown begins, and cannot hold the server open.

use std::pin::Pin;

use futures_util::{stream, Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{
        health_check_response::ServingStatus as PbStatus,
        health_server::{Health, HealthServer},
        HealthCheckRequest, HealthCheckResponse,
    },
    server::{HealthReporter, HealthService},
    ServingStatus,
};

use crate::{pb::broker_server::SERVICE_NAME, shutdown::ShutdownToken, Broker};

/// `grpc.health.v1.Health` whose `Watch` streams end when shutdown begins.
#[derive(Debug)]
pub struct ShutdownAwareHealth {
    inner: HealthService,
    shutdown: ShutdownToken,
}

/// Builds the health service: `SERVING` for `""` and `switchboard.v1.Broker`. Call
/// [`set_not_serving`] with the returned reporter as soon as shutdown begins.
pub async fn service(
    shutdown: ShutdownToken,
) -> (HealthReporter, HealthServer<ShutdownAwareHealth>) {
    let reporter = HealthReporter::new();
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let inner = HealthService::from_health_reporter(reporter.clone());
    (
        reporter,
        HealthServer::new(ShutdownAwareHealth { inner, shutdown }),
    )
}

/// Marks `""` and `switchboard.v1.Broker` `NOT_SERVING`.
pub async fn set_not_serving(reporter: &HealthReporter) {
    for name in ["", SERVICE_NAME] {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

/// On the Redis engine: PINGs Redis every second and keeps `switchboard.v1.Broker`
/// `NOT_SERVING` while it does not answer (logging each change), until shutdown.
pub async fn follow_redis(broker: Broker, reporter: HealthReporter, mut shutdown: ShutdownToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let up = tokio::select! {
            up = broker.probe() => up,
            () = shutdown.cancelled() => return,
        };
        if up != serving {
            serving = up;
            if up {
                tracing::info!("redis reachable again: serving");
            } else {
                tracing::warn!("redis unreachable: switchboard.v1.Broker NOT_SERVING");
            }
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(SERVICE_NAME, status).await;
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for ShutdownAwareHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let watch = self.inner.watch(request).await?.into_inner();
        let mut token = self.shutdown.clone();
        let last = HealthCheckResponse {
            status: PbStatus::NotServing.into(),
        };
        let stream = watch
            .take_until(async move { token.cancelled().await })
            .chain(stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}
