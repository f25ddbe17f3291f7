//! `dimple serve`: the router's front-end and one worker in one process — the embedded
//! default for one machine (built-in demo model unless `--model`). Requests go from the
//! front-end to the engine through `dimple_worker::LocalBackend`, with no network hop; the
//! public gRPC service and the OpenAI-compatible HTTP API share them. One `/metrics`
//! endpoint shows both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use dimple_router::{ApiKeys, Router, RouterConfig};
use dimple_worker::LocalBackend;
use prometheus::Registry;

use crate::generate::RankArgs;
use crate::model_source::ModelSource;
use crate::serving::{self, EngineArgs, Shutdown};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the public gRPC service.
    #[arg(long, default_value = "127.0.0.1:50051", env = "DIMPLE_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`,
    /// `/tokenize`, `/health`, `/ready`).
    #[arg(long, default_value = "127.0.0.1:8080", env = "DIMPLE_HTTP_LISTEN")]
    pub http_listen: SocketAddr,
    /// One API key per line; when set, every public call (gRPC and HTTP) needs
    /// `authorization: Bearer <key>`.
    #[arg(long, env = "DIMPLE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Address of the HTTP `/metrics` endpoint.
    #[arg(long, default_value = "127.0.0.1:9090", env = "DIMPLE_METRICS_LISTEN")]
    pub metrics_listen: SocketAddr,
    /// Optional plaintext listener serving only `grpc.health.v1` (for probes when the main
    /// port needs TLS): `""` is liveness, the service name readiness.
    #[arg(long, env = "DIMPLE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Checkpoint directory; the built-in demo model when absent.
    #[arg(long, env = "DIMPLE_MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub ranks: RankArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// After an engine failure, how long the process stays up so that failed requests'
/// statuses reach their callers.
const FAILURE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let source = ModelSource(args.model.clone());
    let registry = Registry::new();
    let worker = serving::start_worker(&source, &args.ranks, &args.engine, &registry)?;
    let prompt = source.prompt_builder()?;
    let images = serving::image_limits(&source.preprocess_config()?);
    let api_keys = match &args.api_keys_file {
        Some(path) => ApiKeys::from_file(path)
            .with_context(|| format!("reading `--api-keys-file` {}", path.display()))?,
        None => ApiKeys::default(),
    };
    serving::block_on(async move {
        let shutdown = Shutdown::on_signals();
        let cfg = RouterConfig {
            images,
            api_keys,
            ..RouterConfig::default()
        };
        let backend = Arc::new(LocalBackend::new(worker.clone()));
        let router = Router::with_backend(prompt, cfg, backend, &registry)?;
        let refresh = {
            let w = worker.clone();
            let r = router.metrics_refresher();
            move || {
                w.refresh_metrics();
                r();
            }
        };
        let metrics =
            serving::spawn_metrics(args.metrics_listen, serving::renderer(registry, refresh))
                .await?;
        let listeners = serving::listeners(args.listen, args.health_listen).await?;
        let http_listener = serving::bind(args.http_listen, "--http-listen").await?;
        eprintln!(
            "dimple serve: {} on {} (metrics on http://{metrics}/metrics, OpenAI-compatible HTTP on http://{})",
            source.name(),
            listeners.grpc.local_addr()?,
            http_listener.local_addr()?,
        );
        let http = tokio::spawn(dimple_router::serve_http(
            http_listener,
            router.http_api(),
            shutdown.wait(),
        ));
        // The engine's step watchdog; completes with the cause if the engine fails.
        let failure = dimple_worker::supervise(worker.clone(), args.engine.step_watchdog()?);
        let drain = {
            let worker = worker.clone();
            let wait = shutdown.wait();
            async move {
                wait.await;
                worker.begin_drain();
            }
        };
        let router_task = dimple_router::serve(listeners, router, drain);
        tokio::pin!(router_task);
        tokio::select! {
            r = &mut router_task => {
                r?;
                http.await??;
                worker.shutdown();
            }
            // A failed engine: the process exits non-zero (its supervisor restarts it)
            // instead of serving with no engine, once failed requests got their statuses.
            why = failure => {
                tracing::error!(error = %why, "the engine failed; exiting after {FAILURE_GRACE:?}");
                worker.begin_drain();
                tokio::time::sleep(FAILURE_GRACE).await;
                worker.shutdown();
                anyhow::bail!("the engine failed: {why}");
            }
        }
        Ok(())
    })
}
