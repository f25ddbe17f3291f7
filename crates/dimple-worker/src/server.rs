//! [`serve`]: the worker's gRPC server on a bound listener (mini-redis style), with
//! `grpc.health.v1` and reflection, etcd registration, and a graceful drain.
//!
//! Drain order when `shutdown` completes: refuse new requests and report NOT_SERVING, revoke
//! the etcd lease (routers stop choosing this worker), let running requests finish (at most
//! `drain_timeout`, then they are failed), stop the server, then stop the engine. The server
//! keeps answering load polls until the running requests are done: a worker that went
//! silent would look frozen to routers, which re-route the requests of frozen workers.
//!
//! When the engine fails (a model error or a panic; it cannot be restarted in place): report
//! NOT_SERVING at once, revoke the lease, and let the failed requests' statuses (UNAVAILABLE,
//! marked `engine-failed`) reach their callers; after `failure_grace` the server stops and
//! [`serve`] returns [`WorkerError::EngineFailed`], so the process exits non-zero and its
//! supervisor (Kubernetes) starts a fresh one.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dimple_proto::listeners::Listeners;
use dimple_proto::tls::InternalTls;
use dimple_proto::worker::worker_server::WorkerServer;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
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
    /// Mutual TLS with routers: they must present a certificate from `ca_pem`.
    pub tls: Option<InternalTls>,
    /// A step running longer than this (with sequences waiting on it) marks the worker
    /// NOT_SERVING until steps finish again; `None` turns the watchdog off.
    pub step_watchdog: Option<Duration>,
    /// After an engine failure, how long the server stays up (NOT_SERVING, deregistered) so
    /// that failed requests' statuses reach their callers before the process exits.
    pub failure_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            etcd: None,
            advertise_addr: String::new(),
            drain_timeout: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
            prompt_assets: None,
            failure_grace: Duration::from_secs(2),
            step_watchdog: Some(Duration::from_secs(60)),
            tls: None,
        }
    }
}

/// The gRPC service name, as health checks and reflection report it.
pub const SERVICE_NAME: &str = <WorkerServer<WorkerService> as tonic::server::NamedService>::NAME;

/// Serves `worker` on `listeners` until `shutdown` completes, then drains.
///
/// Health: `""` is liveness (SERVING while the process runs); [`SERVICE_NAME`] is readiness
/// (SERVING while the engine runs and makes progress, the worker is registered in etcd when
/// it uses etcd, and it is not draining).
pub async fn serve(
    listeners: impl Into<Listeners>,
    worker: Worker,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let Listeners {
        grpc: listener,
        health: health_listener,
    } = listeners.into();
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Internal(format!("listener address: {e}")))?;
    let advertise = if opts.advertise_addr.is_empty() {
        local.to_string()
    } else {
        opts.advertise_addr.clone()
    };
    // The guard lives until `serve` returns: probes keep working through the drain.
    let (health, health_service, _probes) =
        dimple_proto::listeners::health_services(SERVICE_NAME, health_listener).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dimple_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
        .build_v1()?;
    if let Some(limit) = opts.step_watchdog {
        tokio::spawn(watch_progress(worker.clone(), limit));
    }
    let registration = opts
        .etcd
        .clone()
        .map(|cfg| Registration::start(cfg, worker.record(&advertise)));
    tokio::spawn(publish_readiness(
        worker.clone(),
        health.clone(),
        registration.as_ref().map(Registration::registered),
    ));
    tracing::info!(%local, %advertise, tls = opts.tls.is_some(), "worker serving");

    let drain_started = Arc::new(Notify::new());
    let engine_failure = Arc::new(OnceLock::new());
    let signal = {
        let worker = worker.clone();
        let health = health.clone();
        let drain_started = drain_started.clone();
        let engine_failure = engine_failure.clone();
        let mut failed = worker.engine().failed();
        let grace = opts.failure_grace;
        let drain_timeout = opts.drain_timeout;
        async move {
            let failure = tokio::select! {
                _ = shutdown => None,
                why = engine_failed(&mut failed) => Some(why),
            };
            match &failure {
                None => tracing::info!("worker draining"),
                Some(why) => tracing::error!(
                    error = %why,
                    "the engine failed; leaving the cluster and exiting after {grace:?}"
                ),
            }
            worker.begin_drain();
            health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            if let Some(r) = registration {
                r.deregister().await;
            }
            match failure {
                Some(why) => {
                    let _ = engine_failure.set(why);
                    tokio::time::sleep(grace).await;
                }
                None => {
                    if !worker.wait_idle(drain_timeout).await {
                        tracing::warn!(timeout = ?drain_timeout, "drain timed out; cancelling running requests");
                        worker.shutdown();
                    }
                }
            }
            drain_started.notify_one();
        }
    };
    let service = WorkerServer::new(
        WorkerService::new(worker.clone()).with_prompt_assets(opts.prompt_assets.clone()),
    )
    .accept_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(opts.max_message_bytes)
    .max_encoding_message_size(opts.max_message_bytes);
    let mut builder = Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.server())?;
    }
    let server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    let result = tokio::select! {
        r = server => r.map_err(WorkerError::from),
        // Requests are done or failed by now; connections get a moment to close.
        _ = async { drain_started.notified().await; tokio::time::sleep(CLOSE_GRACE).await } => {
            tracing::warn!("connections still open after the drain; closing");
            Ok(())
        }
    };
    worker.shutdown();
    match engine_failure.get() {
        Some(why) => Err(WorkerError::EngineFailed(why.clone())),
        None => result,
    }
}

/// For a worker served in process (no gRPC server of its own): runs the step watchdog
/// (when `step_watchdog` is set) and completes with the cause once the engine has failed.
pub fn supervise(
    worker: Worker,
    step_watchdog: Option<Duration>,
) -> impl Future<Output = String> + Send + 'static {
    if let Some(limit) = step_watchdog {
        tokio::spawn(watch_progress(worker.clone(), limit));
    }
    let mut failed = worker.engine().failed();
    async move { engine_failed(&mut failed).await }
}

/// Completes with the cause once the engine has failed; never if it does not.
async fn engine_failed(failed: &mut tokio::sync::watch::Receiver<Option<String>>) -> String {
    let why = failed
        .wait_for(Option::is_some)
        .await
        .map(|why| why.clone().unwrap_or_default());
    match why {
        Ok(why) => why,
        // The engine (and its sender) lives as long as the worker: this does not happen.
        Err(_) => std::future::pending().await,
    }
}

/// The progress watchdog: while the engine has active sequences, a step must finish at
/// least every `limit`. A stuck device or a hung collective otherwise leaves the worker
/// looking healthy while its requests wait forever: it is marked stalled (NOT_SERVING, not
/// accepting in its load reports) until steps finish again. Ends when the worker drains.
async fn watch_progress(worker: Worker, limit: Duration) {
    let tick = (limit / 4).max(Duration::from_millis(10));
    let mut passes = worker.engine().stats().forward_passes;
    let mut since = tokio::time::Instant::now();
    let mut stalled = false;
    loop {
        tokio::time::sleep(tick).await;
        if worker.is_draining() {
            return;
        }
        let s = worker.engine().stats();
        if s.forward_passes != passes || s.active == 0 {
            passes = s.forward_passes;
            since = tokio::time::Instant::now();
            if stalled {
                stalled = false;
                worker.set_stalled(false);
                tracing::warn!("the engine finishes steps again");
            }
        } else if !stalled && since.elapsed() > limit {
            stalled = true;
            worker.set_stalled(true);
            tracing::error!(
                active = s.active,
                "no step finished for {:?} (limit {limit:?}); reporting NOT_SERVING",
                since.elapsed()
            );
        }
    }
}

/// After the drain, how long open connections get to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How often readiness is re-evaluated (besides registration changes).
const READINESS_TICK: Duration = Duration::from_millis(50);

/// Keeps the readiness status ([`SERVICE_NAME`]) in line with the worker's state until it
/// drains (the drain sets NOT_SERVING itself).
async fn publish_readiness(
    worker: Worker,
    health: tonic_health::server::HealthReporter,
    mut registered: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let mut readiness = dimple_proto::listeners::Readiness::new(health, SERVICE_NAME);
    loop {
        let ready = worker.is_ready() && registered.as_ref().is_none_or(|r| *r.borrow());
        if !readiness.update(ready, || worker.is_draining()).await {
            return;
        }
        match registered.as_mut() {
            Some(r) => {
                tokio::select! {
                    _ = r.changed() => {}
                    _ = tokio::time::sleep(READINESS_TICK) => {}
                }
            }
            None => tokio::time::sleep(READINESS_TICK).await,
        }
    }
}
