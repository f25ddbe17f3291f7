//! The engine loop and its handle. One thread owns the active set and the cache pool;
//! every iteration admits waiting requests that fit, drops cancelled or expired ones, runs
//! one packed forward pass over a step of every active sequence and applies each
//! sequence's own decision. Callers talk to it through [`EngineHandle`].
//!
//! The model itself lives on rank threads (`group`): one for [`start`], one per device of a
//! tensor-parallel group for [`start_group`]. The engine thread hands every rank the same
//! step plan and applies the per-slot results rank 0 returns; a failed rank fails the whole
//! group (every request gets an error and the engine turns unhealthy).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dimple_core::params::{CacheMode, DecodeLimits, DecodeParams, FinishReason};
use dimple_model::{Checkpoint, DimpleConfig, DimpleModel, kv_cache_bytes_per_rank};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;

use crate::EngineError;
use crate::events::EngineEvent;
use crate::group::{AdmitSeq, Group, GroupConfig, StepPlan, panic_text};
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
    /// Bytes of K/V cache that prefix- and dual-cache requests may hold together, per rank
    /// (each rank of a tensor-parallel group holds its share of the kv heads); see
    /// [`cached_positions`].
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
    /// Set once when the engine fails (never on a requested shutdown), before the requests
    /// it held are failed: whoever sees such a failed request can already tell the cause.
    failed: watch::Sender<Option<String>>,
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
    /// Ranks of the tensor-parallel group (1 for [`start`]).
    world: usize,
}

impl EngineHandle {
    /// Validates and queues a request. Events arrive on the returned receiver; dropping it
    /// cancels the request and frees its cache at the next step.
    pub fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<UnboundedReceiver<EngineEvent>, EngineError> {
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
        let pending = Pending {
            id,
            req,
            events,
            need_bytes,
            submitted: Instant::now(),
        };
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
        if let Some(&bad) = req
            .prompt_ids
            .iter()
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(EngineError::Invalid(format!(
                "`prompt` token {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
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
        let need = kv_cache_bytes_per_rank(
            cfg,
            cached_positions(&req.params, p),
            self.dtype,
            self.world,
        );
        if need > self.cfg.cache_budget_bytes {
            return Err(EngineError::CacheImpossible {
                needed: need,
                budget: self.cfg.cache_budget_bytes,
            });
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

    /// Ranks of the tensor-parallel group behind this engine.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Stops the loop; running and waiting requests end with `Unavailable`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    /// The engine's failure, once it has failed (a model error or a panic, as opposed to a
    /// requested shutdown): `Some(why)` from then on.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.shared.failed.subscribe()
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

/// Positions whose keys/values a request holds at most between steps: none in exact mode,
/// the prompt but its last token with the prefix cache, and with the dual cache everything
/// outside a block's window, largest for the shortest (the last) block.
pub fn cached_positions(params: &DecodeParams, prompt_len: usize) -> usize {
    let n = params.max_new_tokens;
    match params.cache_mode() {
        CacheMode::Exact => 0,
        CacheMode::Prefix => prompt_len.saturating_sub(1),
        CacheMode::Dual => {
            let plan = params.block_plan();
            let shortest = plan.block(plan.num_blocks - 1, n).len();
            (prompt_len + n).saturating_sub(1 + shortest)
        }
    }
}

/// Starts the engine thread over `model` (a whole model: one rank). `on_step` (optional)
/// observes every step.
pub fn start(model: DimpleModel, cfg: EngineConfig, on_step: Option<StepHook>) -> EngineHandle {
    let model_cfg = model.config().clone();
    let dtype = model.text.dtype();
    spawn(Group::single(model), model_cfg, dtype, cfg, on_step)
}

/// Starts a tensor-parallel engine: `group.world_size` rank threads each load their shard of
/// `checkpoint` (in parallel) and the engine thread drives them. Returns once every rank is
/// loaded; a degree the model cannot take is refused with the valid ones
/// ([`EngineError::Invalid`]), a load failure is [`EngineError::Model`].
pub fn start_group(
    checkpoint: &Checkpoint,
    group: GroupConfig,
    cfg: EngineConfig,
    on_step: Option<StepHook>,
) -> Result<EngineHandle, EngineError> {
    let (ranks, model_cfg) = Group::start(checkpoint, &group)?;
    Ok(spawn(Ok(ranks), model_cfg, group.dtype, cfg, on_step))
}

fn spawn(
    group: Result<Group, EngineError>,
    model_cfg: DimpleConfig,
    dtype: candle_core::DType,
    cfg: EngineConfig,
    on_step: Option<StepHook>,
) -> EngineHandle {
    let (tx, rx) = channel();
    let shared = Arc::new(Shared {
        waiting: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        cache_used: AtomicUsize::new(0),
        forward_passes: AtomicU64::new(0),
        healthy: AtomicBool::new(true),
        next_id: AtomicU64::new(1),
        failure: Mutex::new(None),
        failed: watch::Sender::new(None),
    });
    let model_cfg = Arc::new(model_cfg);
    let handle = EngineHandle {
        tx,
        shared: shared.clone(),
        cfg: Arc::new(cfg.clone()),
        model_cfg: model_cfg.clone(),
        dtype,
        world: group.as_ref().map_or(1, Group::world_size),
    };
    let group = match group {
        Ok(g) => g,
        Err(e) => {
            handle.mark_failed(format!("cannot start the engine: {e}"));
            return handle;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("dimple-engine".into())
        .spawn(move || {
            let mut lp = Loop {
                group,
                model_cfg,
                pool: CachePool::new(cfg.cache_budget_bytes),
                cfg,
                rx,
                shared,
                waiting: VecDeque::new(),
                active: Vec::new(),
                admitted: Vec::new(),
                evicted: Vec::new(),
                on_step,
            };
            lp.run();
        });
    if let Err(e) = spawned {
        handle.mark_failed(format!("cannot start the engine thread: {e}"));
    }
    handle
}

impl EngineHandle {
    fn mark_failed(&self, why: String) {
        self.shared.healthy.store(false, Ordering::Release);
        if let Ok(mut f) = self.shared.failure.lock() {
            *f = Some(why.clone());
        }
        self.shared.failed.send_replace(Some(why));
    }
}

struct Loop {
    group: Group,
    model_cfg: Arc<DimpleConfig>,
    pool: CachePool,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    waiting: VecDeque<Pending>,
    active: Vec<Sequence>,
    /// Sequences admitted since the last plan: the ranks compute their prompt embeddings.
    admitted: Vec<AdmitSeq>,
    /// Sequences that left since the last plan: the ranks drop their state.
    evicted: Vec<u64>,
    on_step: Option<StepHook>,
}

impl Loop {
    fn run(&mut self) {
        loop {
            if let Err(e) = self.flush_evictions() {
                self.group_failed(e);
                return;
            }
            if !self.intake() {
                self.stop("the engine was shut down".into());
                self.group.shutdown();
                return;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                self.admit();
                self.reap();
                // Published before the step, so that a step that never ends shows as
                // active sequences making no progress.
                self.publish();
                self.step()
            }));
            self.publish();
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.group_failed(e);
                    return;
                }
                Err(panic) => {
                    let what = panic_text(&*panic);
                    tracing::error!(%what, "engine step panicked; failing all requests");
                    self.fail(format!("the engine failed: {what}"));
                    self.group.shutdown();
                    return;
                }
            }
        }
    }

    fn group_failed(&mut self, e: String) {
        tracing::error!(error = %e, "the model's rank group failed; failing all requests");
        self.fail(format!("the engine failed: {e}"));
        self.group.shutdown();
    }

    /// Before going idle, lets the ranks drop the state of the sequences that left.
    fn flush_evictions(&mut self) -> Result<(), String> {
        if self.evicted.is_empty() || !self.active.is_empty() || !self.waiting.is_empty() {
            return Ok(());
        }
        let plan = StepPlan {
            evict: std::mem::take(&mut self.evicted),
            ..StepPlan::default()
        };
        self.group.run(plan).map(|_| ())
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
                Err(TryRecvError::Disconnected) => {
                    return !(self.active.is_empty() && self.waiting.is_empty());
                }
            }
        }
    }

    /// Admits waiting requests in order while they fit.
    fn admit(&mut self) {
        // Requests whose client went away while waiting leave without running; those whose
        // deadline passed while waiting end with `DeadlineExceeded` before taking any memory.
        let before = self.waiting.len();
        let now = Instant::now();
        let mask = self.model_cfg.mask_token_id;
        self.waiting.retain(|p| {
            if p.events.is_closed() {
                return false;
            }
            if p.req.deadline.is_none_or(|d| now < d) {
                return true;
            }
            let row = p.req.params.initial_response(mask);
            let waited = (now - p.submitted).as_secs_f64() * 1e3;
            let _ = p
                .events
                .send(EngineEvent::Finished(crate::events::Finished {
                    response_ids: row,
                    steps: 0,
                    finish_reason: dimple_core::params::FinishReason::DeadlineExceeded,
                    timings: crate::events::Timings {
                        queue_ms: waited,
                        first_commit_ms: None,
                        total_ms: waited,
                    },
                }));
            false
        });
        self.shared
            .waiting
            .fetch_sub(before - self.waiting.len(), Ordering::AcqRel);
        while self.active.len() < self.cfg.max_active {
            let Some(front) = self.waiting.front() else {
                break;
            };
            match self.pool.reserve(front.need_bytes) {
                Admission::Later => break,
                Admission::Impossible => {
                    // Checked at submission; kept total for a budget that shrank.
                    let p = self.pop_waiting();
                    let _ = p
                        .events
                        .send(EngineEvent::Failed(EngineError::CacheImpossible {
                            needed: p.need_bytes,
                            budget: self.pool.budget(),
                        }));
                }
                Admission::Ok => {
                    let p = self.pop_waiting();
                    match Sequence::new(
                        p.id,
                        p.req,
                        &self.model_cfg,
                        p.events.clone(),
                        p.need_bytes,
                        p.submitted,
                    ) {
                        Ok((seq, admit)) => {
                            self.active.push(seq);
                            self.admitted.push(admit);
                        }
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
                let s = self.active.swap_remove(i);
                tracing::debug!(id = s.id, reason = %r, "sequence leaves early");
                self.retire(s, Ok(r));
            } else {
                i += 1;
            }
        }
    }

    /// One packed forward pass over a step of the active sequences (oldest first, within the
    /// token budget), then each sequence's own decision.
    /// One packed forward pass over a step of the active sequences (oldest first, within the
    /// token budget), then each sequence's own decision. An error is the failure of the
    /// rank group.
    fn step(&mut self) -> Result<(), String> {
        if self.active.is_empty() {
            return Ok(());
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
        let mut admit = std::mem::take(&mut self.admitted);
        let mut evict = std::mem::take(&mut self.evicted);
        // A sequence that left before its first step never needs to reach the ranks.
        let gone: Vec<u64> = admit
            .iter()
            .filter(|a| evict.contains(&a.id))
            .map(|a| a.id)
            .collect();
        admit.retain(|a| !gone.contains(&a.id));
        evict.retain(|id| !gone.contains(id));
        let step = chosen.iter().map(|&i| self.active[i].plan()).collect();
        let outputs = self.group.run(StepPlan { admit, evict, step })?;
        self.shared.forward_passes.fetch_add(1, Ordering::AcqRel);
        let mut finished = Vec::new();
        let mut committed = 0;
        for (&i, out) in chosen.iter().zip(outputs) {
            let s = &mut self.active[i];
            match s.apply(out) {
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
            let s = self.active.swap_remove(i);
            self.retire(s, r);
        }
        if let Some(hook) = &self.on_step {
            hook(&StepReport {
                batch_size: chosen.len(),
                tokens,
                committed,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    }

    /// Removes a sequence: its cache reservation is released and published before the
    /// final event goes out, so a client that sees the end also sees the memory free.
    fn retire(&mut self, mut s: Sequence, outcome: Result<FinishReason, EngineError>) {
        self.pool.release(s.reserved_bytes);
        self.evicted.push(s.id);
        self.shared
            .active
            .store(self.active.len(), Ordering::Release);
        self.shared
            .cache_used
            .store(self.pool.used(), Ordering::Release);
        match outcome {
            Ok(reason) => s.finish(reason),
            Err(e) => s.fail(e),
        }
    }

    fn publish(&self) {
        self.shared
            .active
            .store(self.active.len(), Ordering::Release);
        self.shared
            .cache_used
            .store(self.pool.used(), Ordering::Release);
    }

    /// The engine failed: publishes the cause, then fails everything.
    fn fail(&mut self, why: String) {
        self.shared.failed.send_replace(Some(why.clone()));
        self.stop(why);
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
            let _ = p
                .events
                .send(EngineEvent::Failed(EngineError::Unavailable(why.clone())));
        }
        // Requests still in the channel are answered too, so nobody waits forever.
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Submit(p) = cmd {
                let _ = p
                    .events
                    .send(EngineEvent::Failed(EngineError::Unavailable(why.clone())));
            }
        }
        self.shared.waiting.store(0, Ordering::Release);
        self.publish();
    }
}

impl From<dimple_model::preprocess::PreprocessedImage> for EngineImage {
    fn from(p: dimple_model::preprocess::PreprocessedImage) -> Self {
        Self {
            pixel_values: p.pixel_values,
            patch_dim: p.patch_dim,
            grid_thw: p.grid_thw,
        }
    }
}
