//! The engine loop and its handle. One thread owns the model, the active set and the cache
//! pool; every iteration admits waiting requests that fit, drops cancelled or expired ones,
//! runs one packed forward pass over a step of every active sequence and applies each
//! sequence's own decision. Callers talk to it through [`EngineHandle`].

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dimple_core::params::{DecodeLimits, DecodeParams, FinishReason};
use dimple_model::{DimpleConfig, DimpleModel, kv_cache_bytes};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::EngineError;
use crate::events::EngineEvent;
use crate::pool::{Admission, CachePool};
use crate::sequence::Sequence;

/// Limits and sizes of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_active: usize,
    /// Requests waiting for admission at most; beyond, submissions fail with `QueueFull`.
    pub max_waiting: usize,
    /// Tokens in one forward pass at most (a sequence larger than this still runs alone).
    pub max_step_tokens: usize,
    /// Bytes of prompt K/V cache that cached-mode requests may hold together.
    pub cache_budget_bytes: usize,
    pub limits: DecodeLimits,
    /// Prompt tokens (image tokens included) at most.
    pub max_prompt_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_active: 64,
            max_waiting: 256,
            max_step_tokens: 16384,
            cache_budget_bytes: 1 << 30,
            limits: DecodeLimits::default(),
            max_prompt_tokens: 8192,
        }
    }
}

/// One image, already preprocessed into patch rows.
#[derive(Debug, Clone)]
pub struct EngineImage {
    /// Row-major `[patches, patch_dim]`.
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    pub grid_thw: [usize; 3],
}

/// A request as the engine takes it: token ids with image tokens already expanded.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub images: Vec<EngineImage>,
    pub params: DecodeParams,
    pub deadline: Option<Instant>,
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub waiting: usize,
    pub active: usize,
    pub cache_used_bytes: usize,
    pub cache_budget_bytes: usize,
    pub forward_passes: u64,
    pub healthy: bool,
}

/// Per-step observations, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub batch_size: usize,
    pub tokens: usize,
    pub committed: usize,
    pub seconds: f64,
}

type StepHook = Box<dyn Fn(&StepReport) + Send>;

struct Shared {
    waiting: AtomicUsize,
    active: AtomicUsize,
    cache_used: AtomicUsize,
    forward_passes: AtomicU64,
    healthy: AtomicBool,
    next_id: AtomicU64,
    failure: Mutex<Option<String>>,
}

struct Pending {
    id: u64,
    req: GenerateRequest,
    events: UnboundedSender<EngineEvent>,
    need_bytes: usize,
    submitted: Instant,
}

enum Command {
    Submit(Box<Pending>),
    Shutdown,
}

/// The caller's side of an engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    shared: Arc<Shared>,
    cfg: Arc<EngineConfig>,
    model_cfg: Arc<DimpleConfig>,
    dtype: candle_core::DType,
}

impl EngineHandle {
    /// Validates and queues a request. Events arrive on the returned receiver; dropping it
    /// cancels the request and frees its cache at the next step.
    pub fn submit(&self, req: GenerateRequest) -> Result<UnboundedReceiver<EngineEvent>, EngineError> {
        if !self.shared.healthy.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable(self.failure()));
        }
        let need_bytes = self.validate(&req)?;
        let limit = self.cfg.max_waiting;
        if self.shared.waiting.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull { limit });
        }
        let (events, rx) = unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let pending = Pending { id, req, events, need_bytes, submitted: Instant::now() };
        if self.tx.send(Command::Submit(Box::new(pending))).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable(self.failure()));
        }
        Ok(rx)
    }

    /// Checks everything knowable before admission; returns the cache bytes needed.
    fn validate(&self, req: &GenerateRequest) -> Result<usize, EngineError> {
        let cfg = &self.model_cfg;
        req.params.validate(&self.cfg.limits)?;
        let p = req.prompt_ids.len();
        if p == 0 {
            return Err(EngineError::Invalid("`prompt` is empty".into()));
        }
        if p > self.cfg.max_prompt_tokens {
            return Err(EngineError::Invalid(format!(
                "`prompt` has {p} tokens, the limit is {}",
                self.cfg.max_prompt_tokens
            )));
        }
        let total = p + req.params.max_new_tokens;
        if total > cfg.max_position_embeddings {
            return Err(EngineError::Invalid(format!(
                "prompt ({p}) + `max_new_tokens` ({}) = {total} exceeds the model's context of {}",
                req.params.max_new_tokens, cfg.max_position_embeddings
            )));
        }
        if let Some(&bad) = req.prompt_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::Invalid(format!("`prompt` token {bad} is outside the vocabulary ({})", cfg.vocab_size)));
        }
        for &(pos, tok) in &req.params.prior.fixed {
            if tok as usize >= cfg.vocab_size || tok == cfg.mask_token_id {
                return Err(EngineError::Invalid(format!(
                    "`prior` token {tok} at position {pos} must be a vocabulary id other than the mask id {}",
                    cfg.mask_token_id
                )));
            }
        }
        let patch_dim = cfg.vision_config.patch_dim();
        for (i, im) in req.images.iter().enumerate() {
            let [t, h, w] = im.grid_thw;
            if im.patch_dim != patch_dim || im.pixel_values.len() != t * h * w * patch_dim {
                return Err(EngineError::Invalid(format!(
                    "image {i}: {} pixel values for grid {:?} with patch size {}",
                    im.pixel_values.len(),
                    im.grid_thw,
                    patch_dim
                )));
            }
        }
        let need = if req.params.use_cache { kv_cache_bytes(cfg, p - 1, self.dtype) } else { 0 };
        if need > self.cfg.cache_budget_bytes {
            return Err(EngineError::CacheImpossible { needed: need, budget: self.cfg.cache_budget_bytes });
        }
        Ok(need)
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: self.shared.waiting.load(Ordering::Acquire),
            active: self.shared.active.load(Ordering::Acquire),
            cache_used_bytes: self.shared.cache_used.load(Ordering::Acquire),
            cache_budget_bytes: self.cfg.cache_budget_bytes,
            forward_passes: self.shared.forward_passes.load(Ordering::Acquire),
            healthy: self.shared.healthy.load(Ordering::Acquire),
        }
    }

    pub fn model_config(&self) -> &DimpleConfig {
        &self.model_cfg
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Stops the loop; running and waiting requests end with `Unavailable`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    fn failure(&self) -> String {
        self.shared
            .failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "the engine has stopped".into())
    }
}

/// Starts the engine thread over `model`. `on_step` (optional) observes every step.
pub fn start(model: DimpleModel, cfg: EngineConfig, on_step: Option<StepHook>) -> EngineHandle {
    let (tx, rx) = channel();
    let shared = Arc::new(Shared {
        waiting: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        cache_used: AtomicUsize::new(0),
        forward_passes: AtomicU64::new(0),
        healthy: AtomicBool::new(true),
        next_id: AtomicU64::new(1),
        failure: Mutex::new(None),
    });
    let handle = EngineHandle {
        tx,
        shared: shared.clone(),
        cfg: Arc::new(cfg.clone()),
        model_cfg: Arc::new(model.config().clone()),
        dtype: model.text.dtype(),
    };
    let spawned = std::thread::Builder::new().name("dimple-engine".into()).spawn(move || {
        let mut lp = Loop {
            model,
            pool: CachePool::new(cfg.cache_budget_bytes),
            cfg,
            rx,
            shared,
            waiting: VecDeque::new(),
            active: Vec::new(),
            on_step,
        };
        lp.run();
    });
    if let Err(e) = spawned {
        handle.shared.healthy.store(false, Ordering::Release);
        if let Ok(mut f) = handle.shared.failure.lock() {
            *f = Some(format!("cannot start the engine thread: {e}"));
        }
    }
    handle
}

struct Loop {
    model: DimpleModel,
    pool: CachePool,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    waiting: VecDeque<Pending>,
    active: Vec<Sequence>,
    on_step: Option<StepHook>,
}

impl Loop {
    fn run(&mut self) {
        loop {
            if !self.intake() {
                self.stop("the engine was shut down".into());
                return;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                self.admit();
                self.reap();
                self.step();
            }));
            self.publish();
            if let Err(panic) = outcome {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(%what, "engine step panicked; failing all requests");
                self.stop(format!("the engine failed: {what}"));
                return;
            }
        }
    }

    /// Moves submitted requests into the waiting queue, blocking when there is nothing to do.
    /// Returns false on shutdown.
    fn intake(&mut self) -> bool {
        if self.active.is_empty() && self.waiting.is_empty() {
            match self.rx.recv() {
                Ok(Command::Submit(p)) => self.waiting.push_back(*p),
                Ok(Command::Shutdown) | Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(Command::Submit(p)) => self.waiting.push_back(*p),
                Ok(Command::Shutdown) => return false,
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return !(self.active.is_empty() && self.waiting.is_empty()),
            }
        }
    }

    /// Admits waiting requests in order while they fit.
    fn admit(&mut self) {
        // Requests whose client went away while waiting leave without running.
        let before = self.waiting.len();
        self.waiting.retain(|p| !p.events.is_closed());
        self.shared.waiting.fetch_sub(before - self.waiting.len(), Ordering::AcqRel);
        while self.active.len() < self.cfg.max_active {
            let Some(front) = self.waiting.front() else { break };
            match self.pool.reserve(front.need_bytes) {
                Admission::Later => break,
                Admission::Impossible => {
                    // Checked at submission; kept total for a budget that shrank.
                    let p = self.pop_waiting();
                    let _ = p.events.send(EngineEvent::Failed(EngineError::CacheImpossible {
                        needed: p.need_bytes,
                        budget: self.pool.budget(),
                    }));
                }
                Admission::Ok => {
                    let p = self.pop_waiting();
                    match Sequence::new(p.id, p.req, &self.model, p.events.clone(), p.need_bytes, p.submitted) {
                        Ok(seq) => self.active.push(seq),
                        Err(e) => {
                            self.pool.release(p.need_bytes);
                            let _ = p.events.send(EngineEvent::Failed(e));
                        }
                    }
                }
            }
        }
    }

    fn pop_waiting(&mut self) -> Pending {
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        // The caller saw `front()`; `expect` cannot fail.
        self.waiting.pop_front().expect("front exists")
    }

    /// Removes cancelled and expired sequences, freeing their cache.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.active.len() {
            let s = &mut self.active[i];
            let reason = if s.is_cancelled() {
                Some(FinishReason::Cancelled)
            } else if s.deadline.is_some_and(|d| now >= d) {
                Some(FinishReason::DeadlineExceeded)
            } else {
                None
            };
            if let Some(r) = reason {
                let mut s = self.active.swap_remove(i);
                tracing::debug!(id = s.id, reason = %r, "sequence leaves early");
                s.finish(r);
                self.pool.release(s.reserved_bytes);
            } else {
                i += 1;
            }
        }
    }

    /// One packed forward pass over a step of the active sequences (oldest first, within the
    /// token budget), then each sequence's own decision.
    fn step(&mut self) {
        if self.active.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut chosen = Vec::new();
        let mut tokens = 0;
        for (i, s) in self.active.iter().enumerate() {
            let t = s.step_tokens();
            if !chosen.is_empty() && tokens + t > self.cfg.max_step_tokens {
                continue;
            }
            tokens += t;
            chosen.push(i);
        }
        let plans: Result<Vec<_>, EngineError> = chosen.iter().map(|&i| self.active[i].plan(&self.model)).collect();
        let result = plans.and_then(|plans| {
            let inputs: Vec<_> = chosen.iter().zip(&plans).map(|(&i, p)| self.active[i].seq_input(p)).collect();
            self.model.text.forward(&inputs, None).map_err(EngineError::from)
        });
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for &i in chosen.iter().rev() {
                    let mut s = self.active.swap_remove(i);
                    s.fail(e.clone());
                    self.pool.release(s.reserved_bytes);
                }
                return;
            }
        };
        self.shared.forward_passes.fetch_add(1, Ordering::AcqRel);
        let mut finished = Vec::new();
        let mut committed = 0;
        for (&i, out) in chosen.iter().zip(outputs) {
            let s = &mut self.active[i];
            match s.apply(&out.logits, out.cache) {
                Ok(done) => {
                    committed += s.last_committed;
                    if let Some(r) = done {
                        finished.push((i, Ok(r)));
                    }
                }
                Err(e) => finished.push((i, Err(e))),
            }
        }
        // Remove from the back so earlier indices stay valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, r) in finished {
            let mut s = self.active.swap_remove(i);
            match r {
                Ok(reason) => s.finish(reason),
                Err(e) => s.fail(e),
            }
            self.pool.release(s.reserved_bytes);
        }
        if let Some(hook) = &self.on_step {
            hook(&StepReport { batch_size: chosen.len(), tokens, committed, seconds: started.elapsed().as_secs_f64() });
        }
    }

    fn publish(&self) {
        self.shared.active.store(self.active.len(), Ordering::Release);
        self.shared.cache_used.store(self.pool.used(), Ordering::Release);
    }

    /// Fails everything and marks the engine unhealthy.
    fn stop(&mut self, why: String) {
        self.shared.healthy.store(false, Ordering::Release);
        if let Ok(mut f) = self.shared.failure.lock() {
            *f = Some(why.clone());
        }
        for mut s in self.active.drain(..) {
            s.fail(EngineError::Unavailable(why.clone()));
            self.pool.release(s.reserved_bytes);
        }
        for p in self.waiting.drain(..) {
            let _ = p.events.send(EngineEvent::Failed(EngineError::Unavailable(why.clone())));
        }
        // Requests still in the channel are answered too, so nobody waits forever.
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Submit(p) = cmd {
                let _ = p.events.send(EngineEvent::Failed(EngineError::Unavailable(why.clone())));
            }
        }
        self.shared.waiting.store(0, Ordering::Release);
        self.publish();
    }
}

impl From<dimple_model::preprocess::PreprocessedImage> for EngineImage {
    fn from(p: dimple_model::preprocess::PreprocessedImage) -> Self {
        Self { pixel_values: p.pixel_values, patch_dim: p.patch_dim, grid_thw: p.grid_thw }
    }
}
