//! [`serve`]: the worker's gRPC server on a bound listener (mini-redis style), with
//! `grpc.health.v1` and reflection, etcd registration, and a graceful drain.
//!
//! Drain order when `shutdown` completes: refuse new requests and report NOT_SERVING, revoke
//! the etcd lease (routers stop choosing this worker), let running requests finish (at most
//! `drain_timeout`), then stop the engine.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dimple_proto::worker::worker_server::WorkerServer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::service::WorkerService;
use crate::{EtcdConfig, Registration, Worker, WorkerError};

/// How the worker serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Register in etcd under this configuration; `None` for a static setup.
    pub etcd: Option<EtcdConfig>,
    /// The address routers dial (registered in etcd).
    pub advertise_addr: String,
    /// Running requests get this long to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// Tokenizer, chat template and preprocessing files served to routers
    /// (`GetPromptAssets`); `None` refuses the call.
    pub prompt_assets: Option<Arc<dimple_proto::worker::PromptAssets>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            etcd: None,
            advertise_addr: String::new(),
            drain_timeout: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
            prompt_assets: None,
        }
    }
}

/// The gRPC service name, as health checks and reflection report it.
pub const SERVICE_NAME: &str = <WorkerServer<WorkerService> as tonic::server::NamedService>::NAME;

/// Serves `worker` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    worker: Worker,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Internal(format!("listener address: {e}")))?;
    let advertise = if opts.advertise_addr.is_empty() {
        local.to_string()
    } else {
        opts.advertise_addr.clone()
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dimple_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
        .build_v1()?;
    let registration = opts
        .etcd
        .clone()
        .map(|cfg| Registration::start(cfg, worker.record(&advertise)));
    tracing::info!(%local, %advertise, "worker serving");

    let drain_started = Arc::new(Notify::new());
    let signal = {
        let worker = worker.clone();
        let health = health.clone();
        let drain_started = drain_started.clone();
        async move {
            shutdown.await;
            tracing::info!("worker draining");
            worker.begin_drain();
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            if let Some(r) = registration {
                r.deregister().await;
            }
            drain_started.notify_one();
        }
    };
    let service = WorkerServer::new(
        WorkerService::new(worker.clone()).with_prompt_assets(opts.prompt_assets.clone()),
    )
    .max_decoding_message_size(opts.max_message_bytes)
    .max_encoding_message_size(opts.max_message_bytes);
    let server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    let result = tokio::select! {
        r = server => r.map_err(WorkerError::from),
        _ = async { drain_started.notified().await; tokio::time::sleep(opts.drain_timeout).await } => {
            tracing::warn!(timeout = ?opts.drain_timeout, "drain timed out; cancelling running requests");
            Ok(())
        }
    };
    worker.shutdown();
    result
}
