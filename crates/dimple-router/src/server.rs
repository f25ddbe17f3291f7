//! [`serve`]: the router's gRPC server on a bound listener (mini-redis style): the public
//! service (optionally behind API keys and TLS), `grpc.health.v1`, reflection, worker
//! discovery and load polling, and a graceful drain when `shutdown` completes (NOT_SERVING,
//! no new connections, running requests finish within `drain_timeout`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dimple_proto::listeners::Listeners;
use dimple_proto::tls::InternalTls;
use dimple_proto::v1::dimple_server::DimpleServer;
use prometheus::Registry;
use tokio::sync::{Notify, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::RouterError;
use crate::auth::ApiKeys;
use crate::backend::Backend;
use crate::discovery::{self, Discovery};
use crate::frontend::{Frontend, FrontendConfig};
use crate::http::HttpApi;
use crate::metrics::RouterMetrics;
use crate::pool::{ChannelOptions, WorkerPool};
use crate::pool_backend::PoolBackend;
use crate::prompt::PromptBuilder;
use crate::retry::RetryBudgetConfig;
use crate::service::RouterService;
use crate::validate::{DEFAULT_MAX_BYTES_PER_TOKEN, ImageLimits, Validator};

/// PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Everything the router needs besides the tokenizer.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub discovery: Discovery,
    /// Upper bound of every request's deadline.
    pub request_timeout: Duration,
    /// Largest message accepted from clients and exchanged with workers.
    pub max_message_bytes: usize,
    pub api_keys: ApiKeys,
    pub tls: Option<TlsIdentity>,
    pub images: ImageLimits,
    /// How often workers' load is polled.
    pub poll_interval: Duration,
    /// Running requests get this long to finish after shutdown begins.
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    /// Prompt text accepted = `max_prompt_tokens` x this many bytes (checked before
    /// tokenising).
    pub max_bytes_per_token: usize,
    /// Tokenising and rendering jobs running at once at most (beyond: RESOURCE_EXHAUSTED).
    pub text_jobs: usize,
    /// Retries across workers allowed, router-wide.
    pub retry_budget: RetryBudgetConfig,
    /// Generation requests served at once at most, gRPC and HTTP together; beyond,
    /// RESOURCE_EXHAUSTED at once (0: no limit).
    pub max_pending: usize,
    /// Mutual TLS with workers.
    pub internal_tls: Option<InternalTls>,
    /// How often the API key file is checked for changes.
    pub api_keys_poll: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            discovery: Discovery::Static(Vec::new()),
            request_timeout: Duration::from_secs(300),
            max_message_bytes: 64 << 20,
            api_keys: ApiKeys::default(),
            tls: None,
            images: ImageLimits::default(),
            poll_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            max_bytes_per_token: DEFAULT_MAX_BYTES_PER_TOKEN,
            text_jobs: FrontendConfig::default().text_jobs,
            retry_budget: RetryBudgetConfig::default(),
            max_pending: 0,
            internal_tls: None,
            api_keys_poll: Duration::from_secs(2),
        }
    }
}

/// The public gRPC service name.
pub const SERVICE_NAME: &str = <DimpleServer<RouterService> as tonic::server::NamedService>::NAME;

/// A configured router, ready to serve.
pub struct Router {
    frontend: Arc<Frontend>,
    /// The workers (empty when an in-process backend decodes).
    pool: WorkerPool,
    cfg: RouterConfig,
}

impl Router {
    /// A router over workers found by `cfg.discovery`; its metrics are registered in
    /// `registry`.
    pub fn new(
        prompt: PromptBuilder,
        cfg: RouterConfig,
        registry: &Registry,
    ) -> Result<Self, RouterError> {
        let metrics = Arc::new(
            RouterMetrics::new(registry)
                .map_err(|e| RouterError::Setup(format!("metrics: {e}")))?,
        );
        let pool = WorkerPool::new(ChannelOptions {
            connect_timeout: cfg.connect_timeout,
            max_message_bytes: cfg.max_message_bytes,
            poll_interval: cfg.poll_interval,
            retry_budget: cfg.retry_budget,
            tls: cfg.internal_tls.clone(),
        });
        let backend = Arc::new(PoolBackend::new(pool.clone(), metrics.clone()));
        Ok(Self::assemble(prompt, cfg, backend, pool, metrics))
    }

    /// A router whose requests `backend` decodes (for example an engine in this process);
    /// `cfg.discovery` is not used.
    pub fn with_backend(
        prompt: PromptBuilder,
        cfg: RouterConfig,
        backend: Arc<dyn Backend>,
        registry: &Registry,
    ) -> Result<Self, RouterError> {
        let metrics = Arc::new(
            RouterMetrics::new(registry)
                .map_err(|e| RouterError::Setup(format!("metrics: {e}")))?,
        );
        let cfg = RouterConfig {
            discovery: Discovery::Static(Vec::new()),
            ..cfg
        };
        let pool = WorkerPool::new(ChannelOptions::default());
        Ok(Self::assemble(prompt, cfg, backend, pool, metrics))
    }

    fn assemble(
        prompt: PromptBuilder,
        cfg: RouterConfig,
        backend: Arc<dyn Backend>,
        pool: WorkerPool,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        let validator = Validator::new(Arc::new(prompt), cfg.images)
            .with_max_bytes_per_token(cfg.max_bytes_per_token);
        let fcfg = FrontendConfig {
            request_timeout: cfg.request_timeout,
            max_message_bytes: cfg.max_message_bytes,
            text_jobs: cfg.text_jobs,
            max_pending: cfg.max_pending,
        };
        Self {
            frontend: Arc::new(Frontend::new(backend, validator, metrics, fcfg)),
            pool,
            cfg,
        }
    }

    pub fn pool(&self) -> &WorkerPool {
        &self.pool
    }

    pub fn frontend(&self) -> &Arc<Frontend> {
        &self.frontend
    }

    /// The OpenAI-compatible HTTP API over the same front-end and API keys.
    pub fn http_api(&self) -> HttpApi {
        HttpApi::new(
            self.frontend.clone(),
            self.cfg.api_keys.clone(),
            self.cfg.max_message_bytes,
        )
    }

    /// A handle that refreshes the router's gauges; call before rendering the registry.
    pub fn metrics_refresher(&self) -> impl Fn() + Send + Sync + 'static {
        let frontend = self.frontend.clone();
        move || {
            frontend
                .metrics()
                .set_workers(frontend.backend().replicas())
        }
    }
}

/// Serves `router` on `listeners` until `shutdown` completes, then drains.
///
/// Health: `""` is liveness (SERVING while the process runs, drain included);
/// [`SERVICE_NAME`] is readiness (SERVING while at least one worker is known and the router
/// is not draining).
pub async fn serve(
    listeners: impl Into<Listeners>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let Listeners {
        grpc: listener,
        health: health_listener,
    } = listeners.into();
    let Router {
        frontend,
        pool,
        cfg,
    } = router;
    let local = listener
        .local_addr()
        .map_err(|e| RouterError::Setup(format!("listener address: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_keys = stop_rx.clone();
    tokio::spawn(discovery::run(
        cfg.discovery.clone(),
        pool.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(pool.clone().run_poller(cfg.poll_interval, stop_rx));

    // The guard lives until `serve` returns: probes keep working through the drain.
    let (health, health_service, _probes) =
        dimple_proto::listeners::health_services(SERVICE_NAME, health_listener).await;
    let (draining_tx, draining) = watch::channel(false);
    tokio::spawn(publish_readiness(
        pool.clone(),
        frontend.clone(),
        health.clone(),
        draining,
    ));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dimple_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // The descriptor set also holds the internal worker service, which is not served here.
            .with_service_name(SERVICE_NAME)
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| RouterError::Setup(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| RouterError::Setup(format!("reflection: {e}")))?;

    let keys = cfg.api_keys.clone();
    tokio::spawn(keys.clone().watch_file(cfg.api_keys_poll, stop_rx_keys));
    // Clients may gzip their requests (images compress little, prompts and ids well).
    let public = DimpleServer::new(RouterService::new(frontend.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let counted = frontend.clone();
    let public = NameRpc(InterceptedService::new(
        public,
        move |req: tonic::Request<()>| {
            let rpc = req.extensions().get::<Rpc>().copied();
            keys.check(req).inspect_err(|_| {
                if let Some(Rpc(rpc)) = rpc {
                    counted.metrics().count_request(rpc, "unauthenticated");
                }
            })
        },
    ));

    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = &cfg.tls {
        let identity = Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| RouterError::Setup(format!("TLS: {e}")))?;
    }
    tracing::info!(%local, tls = cfg.tls.is_some(), api_keys = !cfg.api_keys.is_empty(), "router serving");

    let drain_started = Arc::new(Notify::new());
    let signal = {
        let health = health.clone();
        let drain_started = drain_started.clone();
        let frontend = frontend.clone();
        async move {
            shutdown.await;
            tracing::info!("router draining");
            frontend.begin_drain();
            frontend.metrics().set_draining();
            draining_tx.send_replace(true);
            health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            drain_started.notify_one();
        }
    };
    let server = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(public)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    let drain_timeout = cfg.drain_timeout;
    let result = tokio::select! {
        r = server => r.map_err(|e| RouterError::Setup(format!("gRPC server: {e}"))),
        _ = async { drain_started.notified().await; tokio::time::sleep(drain_timeout).await } => {
            tracing::warn!(timeout = ?drain_timeout, "drain timed out; dropping running requests");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    result
}

/// How often readiness is re-evaluated besides worker-set changes.
const READINESS_TICK: Duration = Duration::from_millis(100);

/// Keeps the readiness status ([`SERVICE_NAME`]) in line with the worker set until the
/// router drains (the drain sets NOT_SERVING itself).
async fn publish_readiness(
    pool: WorkerPool,
    frontend: Arc<Frontend>,
    health: tonic_health::server::HealthReporter,
    mut draining: watch::Receiver<bool>,
) {
    let mut workers = pool.subscribe();
    let mut readiness = dimple_proto::listeners::Readiness::new(health, SERVICE_NAME);
    loop {
        // Some worker known, or an in-process backend that takes requests.
        let ready =
            !pool.is_empty() || (frontend.backend().replicas() > 0 && frontend.backend().ready());
        if !readiness.update(ready, || *draining.borrow()).await {
            return;
        }
        tokio::select! {
            r = workers.changed() => if r.is_err() { return },
            _ = draining.changed() => {}
            // An in-process backend's state changes without a pool event.
            _ = tokio::time::sleep(READINESS_TICK) => {}
        }
    }
}

/// Which RPC a request calls, put in its extensions by [`NameRpc`].
#[derive(Debug, Clone, Copy)]
struct Rpc(&'static str);

/// The public service with the RPC named in each request's extensions: the API-key
/// interceptor does not see the request path, and counts its refusals by RPC.
#[derive(Clone)]
struct NameRpc<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for NameRpc<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for NameRpc<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let rpc = match method {
            "Generate" => Some("generate"),
            "GenerateStream" => Some("generate_stream"),
            "Tokenize" => Some("tokenize"),
            "GetModelInfo" => Some("get_model_info"),
            _ => None,
        };
        if let Some(rpc) = rpc {
            req.extensions_mut().insert(Rpc(rpc));
        }
        self.0.call(req)
    }
}
