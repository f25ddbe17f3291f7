//! The sockets a server runs on: its gRPC listener and, optionally, a second plaintext one
//! that serves only `grpc.health.v1`, so that Kubernetes probes work while the main port
//! needs TLS (or mutual TLS).

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

/// Listeners of one server, already bound.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    /// Plaintext, `grpc.health.v1` only; kept open until the server has drained.
    pub health: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Self { grpc, health: None }
    }
}

/// Keeps a server's plaintext health listener serving; dropping it stops that listener.
pub struct ProbeGuard {
    _stop: oneshot::Sender<()>,
}

/// A server's `grpc.health.v1`: the reporter, the service for its main port with
/// `readiness_name` starting NOT_SERVING, and, when `listener` is given, the same service
/// on that plaintext port until the returned guard is dropped (so probes keep answering
/// through a drain).
pub async fn health_services(
    readiness_name: &str,
    listener: Option<TcpListener>,
) -> (HealthReporter, HealthServer<impl Health>, ProbeGuard) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(readiness_name, ServingStatus::NotServing)
        .await;
    let (stop, stopped) = oneshot::channel::<()>();
    if let Some(l) = listener {
        let probes = Server::builder()
            .add_service(service.clone())
            .serve_with_incoming_shutdown(TcpIncoming::from(l), async {
                let _ = stopped.await;
            });
        tokio::spawn(probes);
    }
    (reporter, service, ProbeGuard { _stop: stop })
}

/// A server's readiness status as last published.
pub struct Readiness {
    health: HealthReporter,
    service: &'static str,
    published: Option<bool>,
}

impl Readiness {
    pub fn new(health: HealthReporter, service: &'static str) -> Self {
        Self {
            health,
            service,
            published: None,
        }
    }

    /// Publishes SERVING or NOT_SERVING when `ready` differs from what was published last.
    /// Answers false when the server is draining (`draining()`), after which its caller
    /// stops: the drain sets NOT_SERVING itself, and one that began while a status was being
    /// published gets NOT_SERVING put back.
    pub async fn update(&mut self, ready: bool, draining: impl Fn() -> bool) -> bool {
        if draining() {
            return false;
        }
        if self.published != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.health.set_service_status(self.service, status).await;
            self.published = Some(ready);
            if draining() {
                self.health
                    .set_service_status(self.service, ServingStatus::NotServing)
                    .await;
                return false;
            }
        }
        true
    }
}
