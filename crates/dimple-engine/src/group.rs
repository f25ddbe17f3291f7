//! The rank threads of a worker: one thread per device, each owning its device, its shard
//! of the weights (`dimple_model::tp`) and its shard of every sequence's prefix cache.
//!
//! How a step flows: the engine thread builds one [`StepPlan`] (sequences to admit, to
//! evict, and to step, each with its current response and the slots to score) and hands
//! the same plan to every rank. Each rank embeds, runs the sharded forward pass (two
//! all-reduces per layer), and scores the masked slots on its vocabulary slice: greedy
//! slots are reduced to a few numbers per row and combined by one small exchange
//! (`vocab_score`); slots that sample (temperature, or confidences read from a filtered
//! distribution) gather their full rows, since sampling needs the whole distribution.
//! Rank 0 replies with the per-slot results, the others with an acknowledgement; the
//! engine thread applies each request's own policy and random generator.
//!
//! A sequence's step is one of three shapes: the whole sequence (possibly keeping the
//! keys/values of its leading and trailing positions), the last prompt token and the
//! response against the kept prompt (prefix cache), or one block's window against the kept
//! keys/values before and after it (dual cache).
//!
//! Failure: a rank whose step errs or panics aborts the group's communicator, so peers
//! blocked in a collective fail instead of waiting, and the thread ends. The engine thread
//! waits for every rank's reply with a deadline and treats an error, a vanished rank or a
//! missed deadline as the failure of the whole group.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use dimple_model::tp::{Comm, CommError, LocalComm, SingleComm};
use dimple_model::{
    Checkpoint, DimpleConfig, DimpleModel, KvCache, LogitRows, ModelError, SeqInput,
};
use rayon::prelude::*;

use crate::EngineError;
use crate::engine::EngineImage;
use crate::policy::{ConfidenceKind, SlotScore};
use crate::vocab_score::{RowStats, STATS, slice_stats, slice_stats_device};

/// The devices of a group's ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupDevices {
    /// Every rank on the CPU, exchanging through shared memory.
    Cpu,
    /// Rank r on CUDA device `first_ordinal + r`, exchanging through NCCL (needs the
    /// `cuda` feature).
    Cuda { first_ordinal: usize },
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The rank's step returns an error.
    Error,
    /// The rank's thread panics.
    Panic,
    /// The rank's step sleeps this many milliseconds, then carries on (a stuck device).
    Hang { millis: u64 },
}

/// A fault injected into one rank, for testing how the group fails: at forward pass
/// `forward_pass` (0-based), after the step's first collective, so that its peers are
/// already inside the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInjection {
    pub rank: usize,
    pub forward_pass: u64,
    pub kind: FaultKind,
}

/// How to run a tensor-parallel group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Ranks (tensor-parallel degree). Must be one of the model's valid degrees.
    pub world_size: usize,
    pub dtype: DType,
    pub devices: GroupDevices,
    /// A collective waiting longer than this for its peers fails the group.
    pub comm_timeout: Duration,
    /// The engine thread waits at most this long for a step (admission included) before
    /// declaring the group failed: the last resort against a rank that hangs.
    pub step_timeout: Duration,
    pub fault: Option<FaultInjection>,
    /// Run CPU f32 passes on the tensor-op path (the one every other device and dtype
    /// runs, scoring reduced on the tensors' device) instead of the host kernels: to check
    /// that path, multi-rank included, on a machine without a GPU.
    pub tensor_ops: bool,
}

impl GroupConfig {
    /// `world_size` CPU ranks in f32 (candle's CPU matmul has no bf16 kernel).
    pub fn cpu(world_size: usize) -> Self {
        Self {
            world_size,
            dtype: DType::F32,
            devices: GroupDevices::Cpu,
            comm_timeout: Duration::from_secs(300),
            step_timeout: Duration::from_secs(600),
            fault: None,
            tensor_ops: false,
        }
    }
}

/// A sequence entering the ranks: what they need to compute its prompt embeddings once.
pub(crate) struct AdmitSeq {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    pub images: Vec<EngineImage>,
    /// Position ids of the whole sequence (prompt and response), computed and validated on
    /// the engine thread.
    pub positions: Arc<Vec<[i64; 3]>>,
}

/// How a sequence's masked slots are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scoring {
    /// Reduced on the vocabulary shards.
    Greedy(ConfidenceKind),
    /// Full rows gathered for the engine thread to score (sampling, filtered confidences).
    FullRows,
}

/// One sequence's part of a step.
pub(crate) struct SeqStep {
    pub id: u64,
    /// The response row as it stands (masks, prior tokens, commits).
    pub response: Vec<u32>,
    /// Run the last prompt token and the response against the cached prompt.
    pub window: bool,
    /// Keep the keys/values of this many leading positions (step 0 of cache mode, a block
    /// start of dual-cache mode).
    pub keep_prefix: usize,
    /// Keep the keys/values of this many trailing positions (a block start of dual-cache
    /// mode: the response after the block).
    pub keep_suffix: usize,
    /// Run only these response slots, and the token before them, against the sequence's
    /// kept prefix and suffix (the steps of a dual-cache block after its first).
    pub block: Option<std::ops::Range<usize>>,
    /// Response slots to score, ascending.
    pub masked: Vec<u32>,
    pub scoring: Scoring,
}

/// Everything the ranks do in one iteration, identical for every rank.
#[derive(Default)]
pub(crate) struct StepPlan {
    pub admit: Vec<AdmitSeq>,
    pub evict: Vec<u64>,
    pub step: Vec<SeqStep>,
}

/// One sequence's scored slots, from rank 0.
pub(crate) enum SlotOutput {
    Scores(Vec<SlotScore>),
    Rows(Vec<Vec<f32>>),
}

/// Why a rank stopped.
#[derive(Debug)]
struct RankFailure {
    message: String,
    /// The rank failed because a peer aborted the group: an echo of the real cause.
    echo: bool,
}

impl RankFailure {
    fn own(message: String) -> Self {
        Self {
            message,
            echo: false,
        }
    }
}

impl From<ModelError> for RankFailure {
    fn from(e: ModelError) -> Self {
        let echo = matches!(e, ModelError::Comm(CommError::Aborted { .. }));
        Self {
            message: e.to_string(),
            echo,
        }
    }
}

impl From<candle_core::Error> for RankFailure {
    fn from(e: candle_core::Error) -> Self {
        Self::own(e.to_string())
    }
}

impl From<EngineError> for RankFailure {
    fn from(e: EngineError) -> Self {
        Self::own(e.to_string())
    }
}

/// A rank's answer: `Some` outputs from rank 0, `None` from the others.
type RankReply = Result<Option<Vec<SlotOutput>>, RankFailure>;

struct RankHandle {
    tx: Option<Sender<Arc<StepPlan>>>,
    rx: Receiver<RankReply>,
    thread: Option<JoinHandle<()>>,
}

/// The engine thread's side of the rank threads.
pub(crate) struct Group {
    ranks: Vec<RankHandle>,
    step_timeout: Duration,
    failed: bool,
}

impl Group {
    /// A group of one over an already loaded whole model.
    pub fn single(model: DimpleModel) -> Result<Self, EngineError> {
        if model.comm().world_size() != 1 {
            return Err(EngineError::Invalid(format!(
                "`start` takes a whole model; this one is rank {} of {} (use `start_group`)",
                model.comm().rank(),
                model.comm().world_size()
            )));
        }
        let (tx, rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("dimple-rank-0".into())
            .spawn(move || {
                let rank = Rank::new(model, None);
                in_rank_pool(0, 1, move || rank.serve(rx, reply_tx));
            })
            .map_err(|e| EngineError::Unavailable(format!("cannot start the rank thread: {e}")))?;
        Ok(Self {
            ranks: vec![RankHandle {
                tx: Some(tx),
                rx: reply_rx,
                thread: Some(thread),
            }],
            step_timeout: Duration::MAX,
            failed: false,
        })
    }

    /// Starts `group.world_size` rank threads, each loading its shard of `checkpoint`, and
    /// waits until all are loaded.
    pub fn start(
        checkpoint: &Checkpoint,
        group: &GroupConfig,
    ) -> Result<(Self, DimpleConfig), EngineError> {
        let cfg = checkpoint.config()?;
        let world = group.world_size;
        dimple_model::check_degree(&cfg, world).map_err(|e| EngineError::Invalid(e.to_string()))?;
        if let Some(f) = group.fault.filter(|f| f.rank >= world) {
            return Err(EngineError::Invalid(format!(
                "`fault.rank` {} is outside a group of {world}",
                f.rank
            )));
        }
        let comms = make_comms(group)?;
        let mut ranks = Vec::with_capacity(world);
        for (rank, comm) in comms.into_iter().enumerate() {
            let (tx, rx) = channel();
            let (reply_tx, reply_rx) = channel::<RankReply>();
            let checkpoint = checkpoint.clone();
            let group = group.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dimple-rank-{rank}"))
                .spawn(move || {
                    let loaded = catch_unwind(AssertUnwindSafe(|| {
                        load_rank(&checkpoint, &group, rank, comm)
                    }));
                    let model = match loaded {
                        Ok(Ok(m)) => m,
                        Ok(Err(e)) => {
                            let _ = reply_tx.send(Err(RankFailure::own(format!(
                                "rank {rank} failed to load: {e}"
                            ))));
                            return;
                        }
                        Err(p) => {
                            let _ = reply_tx.send(Err(RankFailure::own(format!(
                                "rank {rank} panicked while loading: {}",
                                panic_text(&*p)
                            ))));
                            return;
                        }
                    };
                    if reply_tx.send(Ok(None)).is_err() {
                        return;
                    }
                    let fault = group.fault.filter(|f| f.rank == rank);
                    let r = Rank::new(model, fault);
                    in_rank_pool(rank, world, move || r.serve(rx, reply_tx));
                })
                .map_err(|e| {
                    EngineError::Unavailable(format!("cannot start rank thread {rank}: {e}"))
                })?;
            ranks.push(RankHandle {
                tx: Some(tx),
                rx: reply_rx,
                thread: Some(thread),
            });
        }
        let mut me = Self {
            ranks,
            step_timeout: group.step_timeout,
            failed: false,
        };
        let mut problem = None;
        for (rank, r) in me.ranks.iter().enumerate() {
            match r.rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => problem = problem.or(Some(e.message)),
                Err(_) => problem = problem.or(Some(format!("rank {rank} ended while loading"))),
            }
        }
        if let Some(e) = problem {
            me.fail();
            return Err(EngineError::Model(e));
        }
        Ok((me, cfg))
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Runs one plan on every rank; rank 0's per-sequence outputs, in `plan.step` order.
    /// An error means the group has failed and can run nothing more.
    pub fn run(&mut self, plan: StepPlan) -> Result<Vec<SlotOutput>, String> {
        if self.failed {
            return Err("the tensor-parallel group has already failed".into());
        }
        let plan = Arc::new(plan);
        for (rank, r) in self.ranks.iter().enumerate() {
            let sent =
                r.tx.as_ref()
                    .is_some_and(|tx| tx.send(plan.clone()).is_ok());
            if !sent {
                self.fail();
                return Err(format!("rank {rank} is gone"));
            }
        }
        let deadline = Instant::now().checked_add(self.step_timeout);
        let mut outputs = None;
        let mut problem: Option<String> = None;
        let mut echo = false;
        for (rank, r) in self.ranks.iter().enumerate() {
            let reply = match deadline {
                Some(d) => {
                    r.rx.recv_timeout(d.saturating_duration_since(Instant::now()))
                }
                None => r.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match reply {
                Ok(Ok(out)) => {
                    if rank == 0 {
                        outputs = out;
                    }
                }
                // A peer's echo ("the group was aborted by rank r") gives way to the cause.
                Ok(Err(e)) => {
                    if problem.is_none() || (echo && !e.echo) {
                        problem = Some(e.message);
                        echo = e.echo;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    problem = problem.or(Some(format!("rank {rank} ended unexpectedly")))
                }
                Err(RecvTimeoutError::Timeout) => {
                    problem = problem.or(Some(format!(
                        "rank {rank} did not finish the step within {:?}",
                        self.step_timeout
                    )));
                    break;
                }
            }
        }
        if let Some(e) = problem {
            self.fail();
            return Err(e);
        }
        outputs.ok_or_else(|| {
            self.fail();
            "rank 0 replied without outputs".to_string()
        })
    }

    /// Lets every rank thread end; joins them unless the group failed (a failed rank may be
    /// stuck in a device call, and the engine must not wait for it).
    pub fn shutdown(&mut self) {
        for r in &mut self.ranks {
            r.tx = None;
        }
        if !self.failed {
            for r in &mut self.ranks {
                if let Some(t) = r.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        for r in &mut self.ranks {
            r.tx = None;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn make_comms(group: &GroupConfig) -> Result<Vec<RankComm>, EngineError> {
    let world = group.world_size;
    if world == 1 {
        return Ok(vec![RankComm::Ready(Arc::new(SingleComm))]);
    }
    match group.devices {
        GroupDevices::Cpu => Ok(LocalComm::group(world, group.comm_timeout)
            .into_iter()
            .map(|c| RankComm::Ready(Arc::new(c) as Arc<dyn Comm>))
            .collect()),
        #[cfg(feature = "cuda")]
        GroupDevices::Cuda { .. } => {
            let g = dimple_model::tp::NcclGroup::new(world)
                .map_err(|e| EngineError::Model(e.to_string()))?;
            Ok((0..world).map(|_| RankComm::Nccl(g.clone())).collect())
        }
        #[cfg(not(feature = "cuda"))]
        GroupDevices::Cuda { .. } => Err(EngineError::Invalid(
            "CUDA ranks need a build with the `cuda` feature".into(),
        )),
    }
}

/// A rank's communicator, or what it joins from its own thread (NCCL initialisation is a
/// collective and must run on every rank concurrently).
enum RankComm {
    Ready(Arc<dyn Comm>),
    #[cfg(feature = "cuda")]
    Nccl(Arc<dimple_model::tp::NcclGroup>),
}

fn load_rank(
    checkpoint: &Checkpoint,
    group: &GroupConfig,
    rank: usize,
    comm: RankComm,
) -> Result<DimpleModel, ModelError> {
    let device = match group.devices {
        GroupDevices::Cpu => Device::Cpu,
        GroupDevices::Cuda { first_ordinal } => Device::new_cuda(first_ordinal + rank)?,
    };
    // Without the `cuda` feature only `Ready` exists.
    #[allow(clippy::infallible_destructuring_match)]
    let comm: Arc<dyn Comm> = match comm {
        RankComm::Ready(c) => c,
        #[cfg(feature = "cuda")]
        RankComm::Nccl(g) => Arc::new(g.join(rank, &device)?),
    };
    let mut model = checkpoint.load(group.dtype, &device, comm)?;
    if group.tensor_ops {
        model.text.set_host_kernels(false)?;
    }
    Ok(model)
}

/// Runs a rank's loop on a thread pool of its own, sized to its share of the machine's
/// cores: the host kernels split their work over this pool, the rank's own thread being
/// one of its workers, so no more threads compute than there are cores (threads that
/// outnumber the cores spin against each other at every parallel hand-off).
fn in_rank_pool(rank: usize, world: usize, run: impl FnOnce() + Send) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("DIMPLE_CPU_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or((cores / world.max(1)).max(1));
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("dimple-rank-{rank}-{i}"))
        .build()
    {
        Ok(pool) => pool.install(run),
        Err(e) => {
            tracing::warn!(rank, error = %e, "no rank thread pool; using the global one");
            run()
        }
    }
}

pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// One greedy slot of a step on a rank, between the two exchanges.
struct GreedyRow {
    /// Index of its sequence in the step.
    seq: usize,
    kind: ConfidenceKind,
    /// The rank's logits slice, kept for the entropy pass (host path).
    host: Option<Vec<f32>>,
    /// The same on the device (accelerator path).
    device: Option<Tensor>,
}

/// A sequence's state on one rank.
struct RankSeq {
    prompt_embeds: Tensor,
    positions: Arc<Vec<[i64; 3]>>,
    /// The rank's kv heads of the prompt's first `prompt_len - 1` positions (cache mode),
    /// or of everything before the current block's window (dual-cache mode).
    cache: Option<KvCache>,
    /// Dual-cache mode: the rank's kv heads of the response after the current block.
    suffix: Option<KvCache>,
}

struct Rank {
    model: DimpleModel,
    seqs: HashMap<u64, RankSeq>,
    forward_passes: u64,
    fault: Option<FaultInjection>,
}

impl Rank {
    fn new(model: DimpleModel, fault: Option<FaultInjection>) -> Self {
        Self {
            model,
            seqs: HashMap::new(),
            forward_passes: 0,
            fault,
        }
    }

    fn rank(&self) -> usize {
        self.model.comm().rank()
    }

    /// Serves plans until the engine goes away or a step fails.
    fn serve(mut self, rx: Receiver<Arc<StepPlan>>, reply: Sender<RankReply>) {
        while let Ok(plan) = rx.recv() {
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run(&plan)));
            let failure = match outcome {
                Ok(Ok(out)) => {
                    if reply.send(Ok(out)).is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Err(e)) => e,
                Err(p) => RankFailure::own(format!("panicked: {}", panic_text(&*p))),
            };
            let rank = self.rank();
            tracing::error!(rank, failure = %failure.message, "rank failed; aborting the group");
            self.model.comm().abort(&failure.message);
            let message = format!("rank {rank}: {}", failure.message);
            let _ = reply.send(Err(RankFailure { message, ..failure }));
            return;
        }
    }

    fn run(&mut self, plan: &StepPlan) -> Result<Option<Vec<SlotOutput>>, RankFailure> {
        for id in &plan.evict {
            self.seqs.remove(id);
        }
        for a in &plan.admit {
            let seq = self.admit(a)?;
            self.seqs.insert(a.id, seq);
        }
        let outputs = if plan.step.is_empty() {
            Vec::new()
        } else {
            self.step(&plan.step)?
        };
        Ok((self.rank() == 0).then_some(outputs))
    }

    /// The prompt embeddings, with the image rows placed (the vision tower is replicated:
    /// every rank computes the same features).
    fn admit(&self, a: &AdmitSeq) -> Result<RankSeq, RankFailure> {
        let features = if a.images.is_empty() {
            None
        } else {
            let dev = self.model.device();
            let mut rows = Vec::with_capacity(a.images.len());
            let mut grids = Vec::with_capacity(a.images.len());
            for im in &a.images {
                let patches = im.pixel_values.len() / im.patch_dim.max(1);
                rows.push(Tensor::from_slice(
                    &im.pixel_values,
                    (patches, im.patch_dim),
                    dev,
                )?);
                grids.push(im.grid_thw);
            }
            Some(self.model.encode_images(&Tensor::cat(&rows, 0)?, &grids)?)
        };
        let prompt_embeds = self.model.embed(&a.prompt_ids, features.as_ref())?;
        Ok(RankSeq {
            prompt_embeds,
            positions: a.positions.clone(),
            cache: None,
            suffix: None,
        })
    }

    fn inject_fault(&self) -> Result<(), EngineError> {
        match self.fault {
            Some(f) if f.forward_pass == self.forward_passes => match f.kind {
                FaultKind::Error => Err(EngineError::Model(format!(
                    "injected fault at forward pass {}",
                    f.forward_pass
                ))),
                FaultKind::Panic => panic!("injected panic at forward pass {}", f.forward_pass),
                FaultKind::Hang { millis } => {
                    std::thread::sleep(Duration::from_millis(millis));
                    Ok(())
                }
            },
            _ => Ok(()),
        }
    }

    fn step(&mut self, steps: &[SeqStep]) -> Result<Vec<SlotOutput>, RankFailure> {
        let text = &self.model.text;
        // One lookup (one collective) for every response of the step.
        let all: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.response.iter().copied())
            .collect();
        let responses = text.embed_tokens(&all)?;
        self.inject_fault()?;
        self.forward_passes += 1;
        let mut embeds = Vec::with_capacity(steps.len());
        let mut off = 0;
        for s in steps {
            let seq = self.seqs.get(&s.id).ok_or_else(|| {
                RankFailure::own(format!("sequence {} is unknown to the rank", s.id))
            })?;
            let n = s.response.len();
            let resp = responses.narrow(0, off, n)?;
            off += n;
            let p = seq.prompt_embeds.dims()[0];
            let e = if let Some(b) = &s.block {
                // The window starts one position before the block: its output row gives
                // the block's first slot its logits.
                if b.start == 0 {
                    Tensor::cat(
                        &[
                            &seq.prompt_embeds.narrow(0, p - 1, 1)?,
                            &resp.narrow(0, 0, b.end)?,
                        ],
                        0,
                    )?
                } else {
                    resp.narrow(0, b.start - 1, b.len() + 1)?
                }
            } else if s.window {
                Tensor::cat(&[&seq.prompt_embeds.narrow(0, p - 1, 1)?, &resp], 0)?
            } else {
                Tensor::cat(&[&seq.prompt_embeds, &resp], 0)?
            };
            embeds.push(e);
        }
        let mut inputs = Vec::with_capacity(steps.len());
        for (s, e) in steps.iter().zip(embeds) {
            let seq = &self.seqs[&s.id];
            let p = seq.prompt_embeds.dims()[0];
            let input = if let Some(b) = &s.block {
                // Dual cache: the kept keys/values must be those of everything outside the
                // window, else the attention would silently miss or repeat keys.
                let (before, after) = (p - 1 + b.start, s.response.len() - b.end);
                let have = (
                    seq.cache.as_ref().map_or(0, KvCache::len),
                    seq.suffix.as_ref().map_or(0, KvCache::len),
                );
                if have != (before, after) {
                    return Err(RankFailure::own(format!(
                        "sequence {}: dual cache holds {have:?} positions, the block needs \
                         ({before}, {after})",
                        s.id
                    )));
                }
                SeqInput {
                    embeds: e,
                    positions: &seq.positions[before..p + b.end],
                    key_valid: None,
                    prefix: seq.cache.as_ref(),
                    keep_prefix: 0,
                    suffix: seq.suffix.as_ref(),
                    keep_suffix: 0,
                    // Slot m reads the output row of the token before it: window row
                    // m - start.
                    logit_rows: LogitRows::List(
                        s.masked.iter().map(|&m| m as usize - b.start).collect(),
                    ),
                }
            } else if s.window {
                let cache = seq.cache.as_ref().ok_or_else(|| {
                    RankFailure::own(format!("sequence {}: no prefix cache", s.id))
                })?;
                SeqInput {
                    embeds: e,
                    positions: &seq.positions[p - 1..],
                    key_valid: None,
                    prefix: Some(cache),
                    keep_prefix: 0,
                    suffix: None,
                    keep_suffix: 0,
                    // Slot m reads the logits of the token before it: row m of the window.
                    logit_rows: LogitRows::List(s.masked.iter().map(|&m| m as usize).collect()),
                }
            } else {
                SeqInput {
                    embeds: e,
                    positions: &seq.positions,
                    key_valid: None,
                    prefix: None,
                    keep_prefix: s.keep_prefix,
                    suffix: None,
                    keep_suffix: s.keep_suffix,
                    logit_rows: LogitRows::List(
                        s.masked.iter().map(|&m| p - 1 + m as usize).collect(),
                    ),
                }
            };
            inputs.push(input);
        }
        let outs = text.forward(&inputs, None)?;
        drop(inputs);
        let offset = text.vocab_range().start;
        // Host passes score on the host; device passes reduce on the device and bring back
        // a few numbers per row, all sequences' rows in one transfer.
        let on_host = text.runs_host_kernels();
        // Greedy rows: first-exchange statistics; full rows: gathered now, in plan order on
        // every rank, so the collectives line up.
        let mut stats: Vec<f64> = Vec::new();
        let mut greedy_rows: Vec<GreedyRow> = Vec::new();
        let mut results: Vec<SlotOutput> = Vec::with_capacity(steps.len());
        let mut caches = Vec::with_capacity(steps.len());
        // (sequence, its rows) waiting for the one gather of full rows.
        let mut full: Vec<(usize, Tensor)> = Vec::new();
        // (sequence, kind, its rows) waiting for the one device reduction.
        let mut on_device: Vec<(usize, ConfidenceKind, Tensor)> = Vec::new();
        for (k, (s, out)) in steps.iter().zip(outs).enumerate() {
            caches.push((out.cache, out.suffix_cache));
            if s.masked.is_empty() {
                results.push(SlotOutput::Scores(Vec::new()));
                continue;
            }
            // The model computed logits for the masked slots only, in their order.
            let rows = out.logits;
            match s.scoring {
                Scoring::FullRows => {
                    results.push(SlotOutput::Rows(Vec::new()));
                    full.push((k, rows));
                }
                Scoring::Greedy(kind) if !on_host => {
                    results.push(SlotOutput::Scores(Vec::with_capacity(s.masked.len())));
                    on_device.push((k, kind, rows));
                }
                Scoring::Greedy(kind) => {
                    let need_slice = kind == ConfidenceKind::NegEntropy;
                    // One pass over each row's vocabulary slice, the rows spread over the
                    // rank's threads (each row's statistic is computed alone, so the
                    // result does not depend on the split).
                    let (_, width) = rows.dims2()?;
                    let flat: Vec<f32> = rows.flatten_all()?.to_vec1()?;
                    let row_stats: Vec<[f64; STATS]> = flat
                        .par_chunks(width.max(1))
                        .map(|row| slice_stats(row, offset))
                        .collect();
                    for (i, st) in row_stats.iter().enumerate() {
                        stats.extend_from_slice(st);
                        greedy_rows.push(GreedyRow {
                            seq: k,
                            kind,
                            host: need_slice.then(|| flat[i * width..(i + 1) * width].to_vec()),
                            device: None,
                        });
                    }
                    results.push(SlotOutput::Scores(Vec::with_capacity(s.masked.len())));
                }
            }
        }
        if !full.is_empty() {
            // Every full row of the step: one gather over the ranks, one copy to the host.
            let parts: Vec<&Tensor> = full.iter().map(|(_, t)| t).collect();
            let gathered = text.gather_vocab(&Tensor::cat(&parts, 0)?)?;
            if self.rank() == 0 {
                let mut rows = gathered.to_vec2::<f32>()?.into_iter();
                for (k, t) in &full {
                    let n = t.dims2()?.0;
                    results[*k] = SlotOutput::Rows(rows.by_ref().take(n).collect());
                }
            }
        }
        if !on_device.is_empty() {
            let parts: Vec<&Tensor> = on_device.iter().map(|(_, _, t)| t).collect();
            let joined = Tensor::cat(&parts, 0)?;
            let mut st = slice_stats_device(&joined, offset)?.into_iter();
            let mut row = 0;
            for (k, kind, t) in &on_device {
                for _ in 0..t.dims2()?.0 {
                    let r = st
                        .next()
                        .ok_or_else(|| RankFailure::own("the device reduction lost rows".into()))?;
                    stats.extend_from_slice(&r);
                    greedy_rows.push(GreedyRow {
                        seq: *k,
                        kind: *kind,
                        host: None,
                        device: (*kind == ConfidenceKind::NegEntropy)
                            .then(|| joined.narrow(0, row, 1))
                            .transpose()?,
                    });
                    row += 1;
                }
            }
        }
        for (s, (cache, suffix)) in steps.iter().zip(caches) {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            if s.keep_suffix > 0 || (s.keep_prefix > 0 && seq.suffix.is_some()) {
                // A dual-cache refresh replaces both parts (the last block keeps no suffix).
                seq.cache = cache;
                seq.suffix = suffix;
            } else if let Some(c) = cache {
                seq.cache = Some(c);
            }
        }
        if greedy_rows.is_empty() {
            return Ok(results);
        }
        let comm = self.model.comm().clone();
        let world = comm.world_size();
        let all = comm.all_gather_host(&stats).map_err(ModelError::from)?;
        let per_rank = stats.len();
        let combined: Vec<RowStats> = (0..greedy_rows.len())
            .map(|i| {
                RowStats::combine(
                    (0..world)
                        .map(|r| &all[r * per_rank + i * STATS..r * per_rank + (i + 1) * STATS]),
                )
            })
            .collect();
        // Second exchange, only for negative-entropy rows: the partial sums need the global
        // max and normaliser.
        let mut entropy = vec![0.0f64; greedy_rows.len()];
        let ent_rows: Vec<usize> = (0..greedy_rows.len())
            .filter(|&i| greedy_rows[i].kind == ConfidenceKind::NegEntropy)
            .collect();
        if !ent_rows.is_empty() {
            let mut parts = vec![0.0f64; ent_rows.len()];
            // Device rows: one reduction and one transfer for all of them.
            let (mut dev_at, mut dev_rows, mut dev_stats) = (Vec::new(), Vec::new(), Vec::new());
            for (j, &i) in ent_rows.iter().enumerate() {
                match (&greedy_rows[i].host, &greedy_rows[i].device) {
                    (Some(row), _) => parts[j] = combined[i].neg_entropy_part(row),
                    (None, Some(t)) => {
                        dev_at.push(j);
                        dev_rows.push(t);
                        dev_stats.push(combined[i]);
                    }
                    (None, None) => {
                        return Err(RankFailure::own("an entropy row kept no logits".into()));
                    }
                }
            }
            if !dev_rows.is_empty() {
                let joined = Tensor::cat(&dev_rows, 0)?;
                let got = RowStats::neg_entropy_parts_device(&dev_stats, &joined)?;
                for (j, v) in dev_at.into_iter().zip(got) {
                    parts[j] = v;
                }
            }
            let all = comm.all_gather_host(&parts).map_err(ModelError::from)?;
            for (j, &i) in ent_rows.iter().enumerate() {
                // Rank order, like the pass over the whole vocabulary.
                entropy[i] = (0..world).fold(0.0, |acc, r| acc + all[r * parts.len() + j]);
            }
        }
        for (i, g) in greedy_rows.iter().enumerate() {
            if let SlotOutput::Scores(v) = &mut results[g.seq] {
                v.push(combined[i].score(g.kind, entropy[i]));
            }
        }
        Ok(results)
    }
}
