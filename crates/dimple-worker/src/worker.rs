//! The [`Worker`] handle: the engine, the preprocessing settings, the metrics and the load
//! counters that the gRPC service and the server share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::time::Instant;

use dimple_engine::{EngineConfig, EngineHandle, EngineImage, GroupConfig};
use dimple_model::preprocess::{PreprocessConfig, preprocess_image};
use dimple_model::{Checkpoint, DimpleModel};
use dimple_proto::convert::sat_u32;
use dimple_proto::discovery::{Capacity, WorkerRecord};
use dimple_proto::worker as pb;
use prometheus::Registry;

use crate::WorkerError;
use crate::metrics::WorkerMetrics;

/// What a worker needs besides the model and the engine limits.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Reported to routers and clients (`ModelInfo.model`).
    pub model_name: String,
    /// `max_new_tokens` of requests that leave it unset (the model's generation config).
    pub default_max_new_tokens: usize,
    pub preprocess: PreprocessConfig,
    /// Tensor-parallel ranks the engine runs on (reported to routers and in etcd).
    pub tp: usize,
}

/// `max_new_tokens` of a `generation_config.json` text, else 64.
pub fn default_max_new_tokens(generation_config: Option<&str>) -> usize {
    generation_config
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| v.get("max_new_tokens").and_then(|m| m.as_u64()))
        .map_or(64, |m| m as usize)
}

pub(crate) struct Shared {
    pub engine: EngineHandle,
    pub metrics: Arc<WorkerMetrics>,
    pub preprocess: PreprocessConfig,
    pub info: pb::WorkerInfo,
    /// Requests received and not yet answered, preprocessing included.
    pub outstanding: AtomicUsize,
    pub draining: AtomicBool,
    /// Requests between admission check and engine submission (decoding their images):
    /// they count against the engine's waiting queue.
    pub preprocessing: AtomicUsize,
    /// Bounds the images decoded at once (each is CPU-heavy, on the blocking pool).
    pub preprocess_slots: Arc<tokio::sync::Semaphore>,
    /// The engine has active sequences but finished no step for far longer than a step
    /// takes (set and cleared by the server's progress watchdog).
    pub stalled: AtomicBool,
}

/// One running engine and its bookkeeping. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    pub(crate) shared: Arc<Shared>,
}

impl Worker {
    /// Starts a single-rank engine over `model`; the worker's metrics go into `registry`.
    pub fn start(
        model: DimpleModel,
        engine_cfg: EngineConfig,
        cfg: WorkerConfig,
        registry: &Registry,
    ) -> Result<Self, WorkerError> {
        let metrics = Arc::new(WorkerMetrics::new(registry)?);
        let engine = dimple_engine::start(model, engine_cfg, Some(metrics.step_hook()));
        Ok(Self::new(engine, metrics, cfg))
    }

    /// Starts the built-in demo model (CPU, f32, one rank) with its own preprocessing and
    /// response length.
    pub fn builtin(engine_cfg: EngineConfig, registry: &Registry) -> Result<Self, WorkerError> {
        let preprocess =
            PreprocessConfig::from_json(dimple_core::builtin::PREPROCESSOR_CONFIG_JSON)
                .map_err(|e| WorkerError::Internal(format!("built-in preprocessing: {e}")))?;
        let cfg = WorkerConfig {
            model_name: dimple_core::builtin::NAME.into(),
            default_max_new_tokens: default_max_new_tokens(Some(
                dimple_core::builtin::GENERATION_CONFIG_JSON,
            )),
            preprocess,
            tp: 1,
        };
        Self::start_group(
            &Checkpoint::Builtin,
            GroupConfig::cpu(1),
            engine_cfg,
            cfg,
            registry,
        )
    }

    /// Starts a (possibly tensor-parallel) group of rank threads loading `checkpoint`.
    pub fn start_group(
        checkpoint: &Checkpoint,
        group: GroupConfig,
        engine_cfg: EngineConfig,
        cfg: WorkerConfig,
        registry: &Registry,
    ) -> Result<Self, WorkerError> {
        let metrics = Arc::new(WorkerMetrics::new(registry)?);
        let engine =
            dimple_engine::start_group(checkpoint, group, engine_cfg, Some(metrics.step_hook()))?;
        Ok(Self::new(engine, metrics, cfg))
    }

    /// Wraps a running engine whose step hook feeds `metrics`.
    pub fn new(engine: EngineHandle, metrics: Arc<WorkerMetrics>, cfg: WorkerConfig) -> Self {
        let mc = engine.model_config();
        let ec = engine.config();
        let info = pb::WorkerInfo {
            model: cfg.model_name.clone(),
            vocab_size: sat_u32(mc.vocab_size),
            mask_token_id: mc.mask_token_id,
            eos_token_id: mc.eos_token_id,
            image_token_id: mc.image_token_id,
            max_position_embeddings: sat_u32(mc.max_position_embeddings),
            default_max_new_tokens: sat_u32(cfg.default_max_new_tokens),
            max_new_tokens: sat_u32(ec.limits.max_new_tokens),
            max_steps: sat_u32(ec.limits.max_steps),
            max_prompt_tokens: sat_u32(ec.max_prompt_tokens),
            max_image_pixels: cfg.preprocess.max_decoded_pixels,
            tp: sat_u32(cfg.tp),
        };
        Self {
            shared: Arc::new(Shared {
                engine,
                metrics,
                preprocess: cfg.preprocess,
                info,
                outstanding: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                stalled: AtomicBool::new(false),
                preprocessing: AtomicUsize::new(0),
                preprocess_slots: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(4, |n| n.get()),
                )),
            }),
        }
    }

    /// Decodes and preprocesses encoded images on the blocking pool (never on a tokio
    /// worker).
    pub async fn preprocess(&self, images: Vec<Vec<u8>>) -> Result<Vec<EngineImage>, WorkerError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let shared = self.shared.clone();
        let slot = shared
            .preprocess_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| WorkerError::Internal(format!("image preprocessing: {e}")))?;
        let job = move || {
            // Held until the decoding ends, even when the caller stops waiting for it.
            let _slot = slot;
            let mut out = Vec::with_capacity(images.len());
            for (index, bytes) in images.iter().enumerate() {
                let started = Instant::now();
                let im = preprocess_image(bytes, &shared.preprocess).map_err(|e| {
                    WorkerError::Image {
                        index,
                        message: e.to_string(),
                    }
                })?;
                shared
                    .metrics
                    .observe_preprocess(started.elapsed().as_secs_f64());
                out.push(EngineImage::from(im));
            }
            Ok(out)
        };
        tokio::task::spawn_blocking(job)
            .await
            .map_err(|e| WorkerError::Internal(format!("image preprocessing: {e}")))?
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.shared.engine
    }

    pub fn info(&self) -> &pb::WorkerInfo {
        &self.shared.info
    }

    /// The load as routers see it.
    pub fn load(&self) -> pb::LoadReport {
        let s = self.shared.engine.stats();
        let cfg = self.shared.engine.config();
        pb::LoadReport {
            outstanding: sat_u32(self.shared.outstanding.load(Ordering::Acquire)),
            waiting: sat_u32(s.waiting),
            active: sat_u32(s.active),
            max_waiting: sat_u32(cfg.max_waiting),
            max_active: sat_u32(cfg.max_active),
            cache_used_bytes: s.cache_used_bytes as u64,
            cache_budget_bytes: s.cache_budget_bytes as u64,
            accepting: self.is_ready_with(&s),
        }
    }

    /// The etcd record advertising this worker at `addr`.
    pub fn record(&self, addr: &str) -> WorkerRecord {
        let cfg = self.shared.engine.config();
        WorkerRecord {
            addr: addr.to_owned(),
            model: self.shared.info.model.clone(),
            tp: self.shared.info.tp as usize,
            capacity: Capacity {
                max_active: cfg.max_active,
                max_waiting: cfg.max_waiting,
                cache_budget_bytes: cfg.cache_budget_bytes,
            },
        }
    }

    /// Whether the worker should get new requests: engine running and making progress, not
    /// draining.
    pub fn is_ready(&self) -> bool {
        self.is_ready_with(&self.shared.engine.stats())
    }

    fn is_ready_with(&self, s: &dimple_engine::EngineStats) -> bool {
        s.healthy && !self.is_draining() && !self.shared.stalled.load(Ordering::Acquire)
    }

    pub(crate) fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::Release);
    }

    /// Why the engine failed, once it has (a requested shutdown is not a failure).
    pub fn engine_failure(&self) -> Option<String> {
        self.shared.engine.failed().borrow().clone()
    }

    /// Refuses new requests from now on; running ones finish.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    /// Waits until no request is outstanding; false if some still are after `timeout`.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let idle = async {
            while self.shared.outstanding.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Copies the engine's load into the gauges; call before rendering the registry.
    pub fn refresh_metrics(&self) {
        self.shared.metrics.refresh(
            &self.shared.engine.stats(),
            self.shared.outstanding.load(Ordering::Acquire),
            self.is_draining(),
        );
    }

    /// Stops the engine; requests still running end with UNAVAILABLE.
    pub fn shutdown(&self) {
        self.shared.engine.shutdown();
    }
}
