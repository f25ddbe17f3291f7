//! What `serve`, `router` and `worker` share: the engine-limit flags, worker setup from a
//! model source, the shutdown signal (SIGTERM or Ctrl-C), the `/metrics` endpoint, and the
//! tokio runtime.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use dimple_core::params::DecodeLimits;
use dimple_engine::EngineConfig;
use dimple_model::Checkpoint;
use dimple_model::preprocess::PreprocessConfig;
use dimple_proto::telemetry::{Render, serve_metrics};
use dimple_proto::tls::{EtcdSecurity, InternalTls};
use dimple_router::frontend::{Frontend, FrontendConfig};
use dimple_router::metrics::RouterMetrics;
use dimple_router::prompt::PromptBuilder;
use dimple_router::validate::{ImageLimits, Validator};
use dimple_worker::{LocalBackend, Worker, WorkerConfig};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::generate::RankArgs;
use crate::model_source::ModelSource;

/// Engine limits of a worker.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = EngineConfig::default().max_active, env = "DIMPLE_MAX_ACTIVE")]
    pub max_active: usize,
    /// Requests waiting for admission at most; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = EngineConfig::default().max_waiting, env = "DIMPLE_MAX_WAITING")]
    pub max_waiting: usize,
    /// Bytes of prompt K/V cache that cached-mode requests may hold together.
    #[arg(long, default_value_t = EngineConfig::default().cache_budget_bytes, env = "DIMPLE_CACHE_BUDGET_BYTES")]
    pub cache_budget_bytes: usize,
    /// Largest `max_new_tokens` a request may ask for.
    #[arg(long, default_value_t = DecodeLimits::default().max_new_tokens, env = "DIMPLE_MAX_NEW_TOKENS_LIMIT")]
    pub max_new_tokens_limit: usize,
    /// Largest `steps` a request may ask for.
    #[arg(long, default_value_t = DecodeLimits::default().max_steps, env = "DIMPLE_MAX_STEPS_LIMIT")]
    pub max_steps_limit: usize,
    /// Prompt tokens (image tokens included) at most.
    #[arg(long, default_value_t = EngineConfig::default().max_prompt_tokens, env = "DIMPLE_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: usize,
    /// A step running longer than this many seconds marks the worker NOT_SERVING until steps
    /// finish again (0: no watchdog).
    #[arg(long, default_value_t = 60.0, env = "DIMPLE_STEP_WATCHDOG_SECS")]
    pub step_watchdog_secs: f64,
}

impl EngineArgs {
    /// The worker's step watchdog.
    pub fn step_watchdog(&self) -> anyhow::Result<Option<std::time::Duration>> {
        if self.step_watchdog_secs == 0.0 {
            return Ok(None);
        }
        std::time::Duration::try_from_secs_f64(self.step_watchdog_secs)
            .map(Some)
            .with_context(|| {
                format!(
                    "`--step-watchdog-secs` must be a number of seconds, got {}",
                    self.step_watchdog_secs
                )
            })
    }

    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            max_active: self.max_active,
            max_waiting: self.max_waiting,
            cache_budget_bytes: self.cache_budget_bytes,
            limits: DecodeLimits {
                max_new_tokens: self.max_new_tokens_limit,
                max_steps: self.max_steps_limit,
            },
            max_prompt_tokens: self.max_prompt_tokens,
            ..EngineConfig::default()
        }
    }
}

/// Loads the model of `source` on the ranks of `ranks` and starts a worker over it.
pub fn start_worker(
    source: &ModelSource,
    ranks: &RankArgs,
    engine: &EngineArgs,
    registry: &Registry,
) -> anyhow::Result<Worker> {
    start_worker_with(
        source,
        ranks,
        engine.config(),
        source.preprocess_config()?,
        registry,
    )
}

/// [`start_worker`] with explicit engine and preprocessing settings.
pub fn start_worker_with(
    source: &ModelSource,
    ranks: &RankArgs,
    engine: EngineConfig,
    preprocess: PreprocessConfig,
    registry: &Registry,
) -> anyhow::Result<Worker> {
    let checkpoint = match &source.0 {
        Some(dir) => Checkpoint::Dir(dir.clone()),
        None => Checkpoint::Builtin,
    };
    check_vocab(source, &checkpoint)?;
    let cfg = WorkerConfig {
        model_name: source.name(),
        default_max_new_tokens: crate::generate::default_response_len(source),
        preprocess,
        tp: ranks.tp,
    };
    Worker::start_group(&checkpoint, ranks.group()?, engine, cfg, registry).with_context(|| {
        format!(
            "starting the engine for {} on {} rank(s)",
            source.name(),
            ranks.tp
        )
    })
}

/// The request front-end over an in-process worker, for commands that decode here
/// (`generate`, `sweep`, `bench` without `--router`). `text_jobs` bounds concurrent
/// tokenising; requests get no server-side deadline.
pub fn local_frontend(
    worker: Worker,
    prompt: PromptBuilder,
    images: ImageLimits,
    text_jobs: usize,
) -> anyhow::Result<Arc<Frontend>> {
    let metrics = RouterMetrics::new(&Registry::new()).context("front-end metrics")?;
    let cfg = FrontendConfig {
        request_timeout: std::time::Duration::from_secs(365 * 24 * 3600),
        text_jobs,
        ..FrontendConfig::default()
    };
    Ok(Arc::new(Frontend::new(
        Arc::new(LocalBackend::new(worker)),
        Validator::new(Arc::new(prompt), images),
        Arc::new(metrics),
        cfg,
    )))
}

/// Refuses a tokenizer whose ids reach beyond the model's vocabulary (they would index past
/// the embedding table). A vocabulary padded beyond the tokenizer is normal. Checked before
/// the weights load; a model directory without `tokenizer.json` has nothing to check.
fn check_vocab(source: &ModelSource, checkpoint: &Checkpoint) -> anyhow::Result<()> {
    let tokenizer = match &source.0 {
        None => PromptBuilder::builtin()?,
        Some(dir) if dir.join("tokenizer.json").exists() => {
            PromptBuilder::from_file(&dir.join("tokenizer.json"), None)
                .with_context(|| format!("loading the tokenizer from {}", dir.display()))?
        }
        Some(_) => return Ok(()),
    };
    let model = checkpoint
        .config()
        .with_context(|| format!("reading the model config of {}", source.name()))?
        .vocab_size;
    let ids = tokenizer.vocab_size();
    if ids > model {
        bail!(
            "the tokenizer of {} has {ids} ids but the model's vocabulary has only {model}: \
             ids {model} and above cannot be embedded",
            source.name()
        );
    }
    Ok(())
}

pub use dimple_worker::image_limits;

/// A shutdown signal shared by several servers: set once on SIGTERM or Ctrl-C.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Listens for SIGTERM and Ctrl-C (must run inside the runtime).
    pub fn on_signals() -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            let _ = tx.send(true);
        });
        Self(rx)
    }

    /// Completes when the signal has come.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// Re-reads the API key file on every SIGHUP (must run inside the runtime).
pub fn reload_on_sighup(keys: dimple_router::ApiKeys) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; API keys reload only when the file changes");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: re-reading the API keys");
            keys.reload();
        }
    });
    #[cfg(not(unix))]
    let _ = keys;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Binds `addr`, naming the flag in the error.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding `{flag}` {addr}"))
}

/// Serves `/metrics` in the background for as long as the process runs (a drain included:
/// it is when the numbers matter most). Returns the address bound (`:0` picks a port).
pub async fn spawn_metrics(addr: SocketAddr, render: Render) -> anyhow::Result<SocketAddr> {
    let listener = bind(addr, "--metrics-listen").await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "metrics on /metrics");
    tokio::spawn(serve_metrics(listener, render, std::future::pending()));
    Ok(local)
}

/// The server's listeners: `listen`, and `--health-listen` when given.
pub async fn listeners(
    listen: SocketAddr,
    health: Option<SocketAddr>,
) -> anyhow::Result<dimple_proto::listeners::Listeners> {
    let grpc = bind(listen, "--listen").await?;
    let health = match health {
        Some(a) => Some(bind(a, "--health-listen").await?),
        None => None,
    };
    Ok(dimple_proto::listeners::Listeners { grpc, health })
}

/// A renderer of `registry` that runs `refresh` first (gauges read at scrape time).
pub fn renderer(registry: Registry, refresh: impl Fn() + Send + Sync + 'static) -> Render {
    Arc::new(move || {
        refresh();
        dimple_proto::telemetry::render_registry(&registry)
    })
}

/// Runs `fut` on a multi-threaded tokio runtime (model work runs on its own threads).
pub fn block_on<T>(fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(fut)
}

/// Mutual TLS between routers and workers (all three files, or none).
#[derive(Args, Debug, Clone)]
pub struct InternalTlsArgs {
    /// This process's certificate chain (PEM) for router-worker traffic; with
    /// `--internal-tls-key` and `--internal-tls-ca`, that traffic uses mutual TLS.
    #[arg(long, env = "DIMPLE_INTERNAL_TLS_CERT", requires_all = ["internal_tls_key", "internal_tls_ca"])]
    pub internal_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--internal-tls-cert`.
    #[arg(long, env = "DIMPLE_INTERNAL_TLS_KEY", requires = "internal_tls_cert")]
    pub internal_tls_key: Option<PathBuf>,
    /// CA (PEM) the other side's certificate must chain to.
    #[arg(long, env = "DIMPLE_INTERNAL_TLS_CA", requires = "internal_tls_cert")]
    pub internal_tls_ca: Option<PathBuf>,
}

impl InternalTlsArgs {
    pub fn load(&self) -> anyhow::Result<Option<InternalTls>> {
        let (Some(cert), Some(key), Some(ca)) = (
            &self.internal_tls_cert,
            &self.internal_tls_key,
            &self.internal_tls_ca,
        ) else {
            return Ok(None);
        };
        Ok(Some(InternalTls {
            cert_pem: read(cert, "--internal-tls-cert")?,
            key_pem: read(key, "--internal-tls-key")?,
            ca_pem: read(ca, "--internal-tls-ca")?,
        }))
    }
}

/// TLS and credentials for etcd (all optional).
#[derive(Args, Debug, Clone)]
pub struct EtcdSecurityArgs {
    /// CA (PEM) of etcd's server certificate; turns TLS on (use `https://` endpoints).
    #[arg(long, env = "DIMPLE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, when it requires one.
    #[arg(long, env = "DIMPLE_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "DIMPLE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd username, with `--etcd-password-file`.
    #[arg(long, env = "DIMPLE_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd password (one line; the trailing newline is ignored).
    #[arg(long, env = "DIMPLE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    pub fn load(&self) -> anyhow::Result<EtcdSecurity> {
        let client_pem = match (&self.etcd_cert, &self.etcd_key) {
            (Some(c), Some(k)) => Some((read(c, "--etcd-cert")?, read(k, "--etcd-key")?)),
            _ => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(u), Some(p)) => {
                let password = String::from_utf8(read(p, "--etcd-password-file")?)
                    .context("`--etcd-password-file` is not UTF-8")?;
                Some((
                    u.clone(),
                    password.trim_end_matches(['\r', '\n']).to_owned(),
                ))
            }
            _ => None,
        };
        Ok(EtcdSecurity {
            ca_pem: self
                .etcd_ca
                .as_ref()
                .map(|p| read(p, "--etcd-ca"))
                .transpose()?,
            client_pem,
            user,
        })
    }
}

fn read(path: &std::path::Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading `{flag}` {}", path.display()))
}
