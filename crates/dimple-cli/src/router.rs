//! `dimple router`: the public gRPC service in front of workers found in etcd or listed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dimple_proto::discovery::DEFAULT_PREFIX;
use dimple_router::{ApiKeys, Discovery, Router, RouterConfig, TlsIdentity};
use prometheus::Registry;

use crate::model_source::ModelSource;
use crate::serving::{self, Shutdown};

#[derive(Args, Debug)]
pub struct RouterArgs {
    /// Address of the public gRPC service.
    #[arg(long, default_value = "0.0.0.0:50051", env = "DIMPLE_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`,
    /// `/tokenize`, `/health`, `/ready`); off unless given.
    #[arg(long, env = "DIMPLE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP API over TLS too, with `--tls-cert` and `--tls-key` (HTTP/1.1 by ALPN).
    /// Without it the HTTP API is plain HTTP even when gRPC is TLS (for a proxy or ingress
    /// that terminates TLS in front of it).
    #[arg(long, env = "DIMPLE_HTTP_TLS", requires_all = ["tls_cert", "http_listen"])]
    pub http_tls: bool,
    /// Bound on bytes per prompt token: prompt text longer than `max_prompt_tokens` x this
    /// is refused before tokenising.
    #[arg(long, default_value_t = dimple_router::validate::DEFAULT_MAX_BYTES_PER_TOKEN, env = "DIMPLE_MAX_BYTES_PER_TOKEN")]
    pub max_bytes_per_token: usize,
    /// Address of the HTTP `/metrics` endpoint.
    #[arg(long, default_value = "0.0.0.0:9090", env = "DIMPLE_METRICS_LISTEN")]
    pub metrics_listen: SocketAddr,
    /// Optional plaintext listener serving only `grpc.health.v1` (for probes when the main
    /// port needs TLS): `""` is liveness, the service name readiness.
    #[arg(long, env = "DIMPLE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Model directory: only tokenizer.json, the chat template and preprocessor_config.json
    /// are read. The built-in demo tokenizer when absent.
    #[arg(long, env = "DIMPLE_MODEL")]
    pub model: Option<PathBuf>,
    /// Instead of `--model`: fetch tokenizer.json, the chat template and
    /// preprocessor_config.json from a worker at start-up (waits until one answers), so the
    /// router needs no access to the weights.
    #[arg(long, conflicts_with = "model", env = "DIMPLE_ASSETS_FROM_WORKERS")]
    pub assets_from_workers: bool,
    /// Static worker list (`HOST:PORT,...`), used when no etcd endpoints are given.
    #[arg(long, value_delimiter = ',', env = "DIMPLE_WORKERS")]
    pub workers: Vec<String>,
    /// etcd endpoints (`http://host:port`, comma-separated) to discover workers.
    #[arg(long, value_delimiter = ',', env = "DIMPLE_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix under which workers register.
    #[arg(long, default_value = DEFAULT_PREFIX, env = "DIMPLE_ETCD_PREFIX")]
    pub etcd_prefix: String,
    /// Server certificate chain (PEM); with `--tls-key`, serves TLS.
    #[arg(long, env = "DIMPLE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "DIMPLE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// One API key per line; when set, every public call needs `authorization: Bearer <key>`.
    /// Re-read when it changes (checked every 2 s) and on SIGHUP.
    #[arg(long, env = "DIMPLE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Upper bound of every request's deadline.
    #[arg(long, default_value_t = 300, env = "DIMPLE_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: u64,
    /// Largest gRPC message, in and out.
    #[arg(long, default_value_t = 64 << 20, env = "DIMPLE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: usize,
    /// Generation requests served at once at most; beyond, RESOURCE_EXHAUSTED at once
    /// (0: no limit).
    #[arg(long, default_value_t = 0, env = "DIMPLE_MAX_PENDING")]
    pub max_pending: usize,
    #[command(flatten)]
    pub internal_tls: serving::InternalTlsArgs,
    #[command(flatten)]
    pub etcd_security: serving::EtcdSecurityArgs,
    /// Running requests get this long to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "DIMPLE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
}

pub fn run(args: RouterArgs) -> anyhow::Result<()> {
    let discovery = if !args.etcd_endpoints.is_empty() {
        Discovery::Etcd {
            endpoints: args.etcd_endpoints.clone(),
            prefix: args.etcd_prefix.clone(),
            security: args.etcd_security.load()?,
        }
    } else if !args.workers.is_empty() {
        Discovery::Static(args.workers.clone())
    } else {
        bail!("give `--workers HOST:PORT,...` or `--etcd-endpoints URL,...`");
    };
    let internal_tls = args.internal_tls.load()?;
    let source = if args.assets_from_workers {
        let dir = crate::assets::private_dir();
        serving::block_on(crate::assets::fetch_into(
            &discovery,
            args.max_message_bytes,
            internal_tls.as_ref(),
            &dir,
        ))?;
        ModelSource(Some(dir))
    } else {
        ModelSource(args.model.clone())
    };
    let prompt = source.prompt_builder()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("reading `--tls-cert` {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("reading `--tls-key` {}", key.display()))?,
        }),
        _ => None,
    };
    let api_keys = match &args.api_keys_file {
        Some(path) => {
            let keys = ApiKeys::from_file(path)
                .with_context(|| format!("reading `--api-keys-file` {}", path.display()))?;
            if keys.is_empty() {
                bail!("`--api-keys-file` {} holds no key", path.display());
            }
            keys
        }
        None => ApiKeys::default(),
    };
    let api_keys_reload = api_keys.clone();
    let http_tls = match (&tls, args.http_tls) {
        (Some(id), true) => Some(dimple_router::HttpsIdentity::new(id)?),
        _ => None,
    };
    let cfg = RouterConfig {
        discovery,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        max_message_bytes: args.max_message_bytes,
        api_keys,
        tls,
        images: serving::image_limits(&source.preprocess_config()?),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        max_bytes_per_token: args.max_bytes_per_token,
        max_pending: args.max_pending,
        internal_tls,
        ..RouterConfig::default()
    };
    let registry = Registry::new();
    let router = Router::new(prompt, cfg, &registry)?;
    serving::block_on(async move {
        let shutdown = Shutdown::on_signals();
        serving::reload_on_sighup(api_keys_reload);
        let metrics = serving::spawn_metrics(
            args.metrics_listen,
            serving::renderer(registry, router.metrics_refresher()),
        )
        .await?;
        let listeners = serving::listeners(args.listen, args.health_listen).await?;
        eprintln!(
            "dimple router: listening on {} (metrics on {metrics})",
            listeners.grpc.local_addr()?,
        );
        let http = match args.http_listen {
            Some(addr) => {
                let l = serving::bind(addr, "--http-listen").await?;
                let scheme = if http_tls.is_some() { "https" } else { "http" };
                eprintln!(
                    "dimple router: OpenAI-compatible HTTP on {scheme}://{}",
                    l.local_addr()?
                );
                let api = router.http_api();
                Some(match http_tls {
                    Some(id) => {
                        tokio::spawn(dimple_router::serve_https(l, api, id, shutdown.wait()))
                    }
                    None => tokio::spawn(dimple_router::serve_http(l, api, shutdown.wait())),
                })
            }
            None => None,
        };
        dimple_router::serve(listeners, router, shutdown.wait()).await?;
        if let Some(h) = http {
            h.await??;
        }
        Ok(())
    })
}
