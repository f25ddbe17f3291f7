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
    /// Checkpoint directory; the built-in demo model when absent.
    #[arg(long, env = "DIMPLE_MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub ranks: RankArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

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
        serving::spawn_metrics(
            args.metrics_listen,
            serving::renderer(registry, refresh),
            &shutdown,
        )
        .await?;
        let listener = serving::bind(args.listen, "--listen").await?;
        let http_listener = serving::bind(args.http_listen, "--http-listen").await?;
        eprintln!(
            "dimple serve: {} on {} (OpenAI-compatible HTTP on http://{}, metrics on http://{}/metrics)",
            source.name(),
            listener.local_addr()?,
            http_listener.local_addr()?,
            args.metrics_listen
        );
        let http = tokio::spawn(dimple_router::serve_http(
            http_listener,
            router.http_api(),
            shutdown.wait(),
        ));
        let drain = {
            let worker = worker.clone();
            let wait = shutdown.wait();
            async move {
                wait.await;
                worker.begin_drain();
            }
        };
        dimple_router::serve(listener, router, drain).await?;
        http.await??;
        worker.shutdown();
        Ok(())
    })
}
