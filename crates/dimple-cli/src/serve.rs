//! `dimple serve`: router and one worker in one process — the embedded default for one
//! machine (built-in demo model unless `--model`). The worker listens on an ephemeral
//! loopback port that only the router dials; one `/metrics` endpoint shows both.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use dimple_router::{Discovery, Router, RouterConfig};
use dimple_worker::ServeOptions;
use prometheus::Registry;

use crate::generate::RankArgs;
use crate::model_source::ModelSource;
use crate::serving::{self, EngineArgs, Shutdown};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the public gRPC service.
    #[arg(long, default_value = "127.0.0.1:50051", env = "DIMPLE_LISTEN")]
    pub listen: SocketAddr,
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
    /// Mutual TLS between the embedded router and worker (one certificate serves both).
    #[command(flatten)]
    pub internal_tls: serving::InternalTlsArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let source = ModelSource(args.model.clone());
    let registry = Registry::new();
    let worker = serving::start_worker(&source, &args.ranks, &args.engine, &registry)?;
    let prompt = source.prompt_builder()?;
    let images = serving::image_limits(&source.preprocess_config()?);
    serving::block_on(async move {
        let shutdown = Shutdown::on_signals();
        let worker_listener =
            serving::bind(SocketAddr::from(([127, 0, 0, 1], 0)), "worker (internal)").await?;
        let worker_addr = worker_listener.local_addr()?;
        let internal_tls = args.internal_tls.load()?;
        let cfg = RouterConfig {
            discovery: Discovery::Static(vec![worker_addr.to_string()]),
            images,
            internal_tls: internal_tls.clone(),
            ..RouterConfig::default()
        };
        let router = Router::new(prompt, cfg, &registry)?;
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
        eprintln!(
            "dimple serve: {} on {} (metrics on http://{metrics}/metrics)",
            source.name(),
            listeners.grpc.local_addr()?,
        );
        let worker_task = tokio::spawn(dimple_worker::serve(
            worker_listener,
            worker,
            ServeOptions {
                advertise_addr: worker_addr.to_string(),
                step_watchdog: args.engine.step_watchdog()?,
                tls: internal_tls,
                ..ServeOptions::default()
            },
            shutdown.wait(),
        ));
        let router_task = dimple_router::serve(listeners, router, shutdown.wait());
        tokio::pin!(router_task);
        let mut worker_task = worker_task;
        tokio::select! {
            r = &mut router_task => {
                r?;
                worker_task.await??;
            }
            // The worker ends first only when its engine failed: the process exits non-zero
            // (its supervisor restarts it) instead of serving a router with no engine.
            w = &mut worker_task => {
                w??;
                router_task.await?;
            }
        }
        Ok(())
    })
}
