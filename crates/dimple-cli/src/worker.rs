//! `dimple worker`: one tensor-parallel group serving the internal worker gRPC service,
//! registered in etcd when endpoints are given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dimple_proto::discovery::DEFAULT_PREFIX;
use dimple_worker::{EtcdConfig, ServeOptions};
use prometheus::Registry;

use crate::generate::RankArgs;
use crate::model_source::ModelSource;
use crate::serving::{self, EngineArgs, Shutdown};

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Address of the worker gRPC service.
    #[arg(long, default_value = "0.0.0.0:50061", env = "DIMPLE_LISTEN")]
    pub listen: SocketAddr,
    /// `HOST:PORT` that routers dial, registered in etcd. Default: the listen address.
    #[arg(long, env = "DIMPLE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Address of the HTTP `/metrics` endpoint.
    #[arg(long, default_value = "0.0.0.0:9091", env = "DIMPLE_METRICS_LISTEN")]
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
    /// etcd endpoints (`http://host:port`, comma-separated). No registration when absent.
    #[arg(long, value_delimiter = ',', env = "DIMPLE_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix under which workers register.
    #[arg(long, default_value = DEFAULT_PREFIX, env = "DIMPLE_ETCD_PREFIX")]
    pub etcd_prefix: String,
    /// Lease TTL: how long a worker that died stays registered at most.
    #[arg(long, default_value_t = 10, env = "DIMPLE_LEASE_TTL_SECS")]
    pub lease_ttl_secs: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub internal_tls: serving::InternalTlsArgs,
    #[command(flatten)]
    pub etcd_security: serving::EtcdSecurityArgs,
    /// Running requests get this long to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "DIMPLE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
    /// Largest request message accepted.
    #[arg(long, default_value_t = 64 << 20, env = "DIMPLE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: usize,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let source = ModelSource(args.model.clone());
    let registry = Registry::new();
    // The model loads before the runtime starts: it is blocking work.
    let worker = serving::start_worker(&source, &args.ranks, &args.engine, &registry)?;
    let prompt_assets = match &args.model {
        Some(dir) => dimple_worker::assets::from_dir(&source.name(), dir)
            .with_context(|| format!("reading the prompt assets of {}", dir.display()))?,
        None => dimple_worker::assets::builtin(),
    };
    serving::block_on(async move {
        let shutdown = Shutdown::on_signals();
        let refresh = {
            let w = worker.clone();
            move || w.refresh_metrics()
        };
        let metrics =
            serving::spawn_metrics(args.metrics_listen, serving::renderer(registry, refresh))
                .await?;
        let listeners = serving::listeners(args.listen, args.health_listen).await?;
        let advertise_addr = args
            .advertise_addr
            .clone()
            .unwrap_or_else(|| args.listen.to_string());
        let etcd = match args.etcd_endpoints.is_empty() {
            true => None,
            false => Some(EtcdConfig {
                endpoints: args.etcd_endpoints.clone(),
                prefix: args.etcd_prefix.clone(),
                lease_ttl: Duration::from_secs(args.lease_ttl_secs),
                security: args.etcd_security.load()?,
            }),
        };
        let opts = ServeOptions {
            etcd,
            advertise_addr,
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            max_message_bytes: args.max_message_bytes,
            prompt_assets: Some(std::sync::Arc::new(prompt_assets)),
            step_watchdog: args.engine.step_watchdog()?,
            tls: args.internal_tls.load()?,
            ..ServeOptions::default()
        };
        eprintln!(
            "dimple worker: {} on {} (metrics on {metrics})",
            source.name(),
            listeners.grpc.local_addr()?,
        );
        dimple_worker::serve(listeners, worker, opts, shutdown.wait()).await?;
        Ok(())
    })
}
