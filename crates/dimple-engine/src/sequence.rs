//! One request inside the engine: its canvas (prompt + response slots), the fixed slots of
//! its structure prior, its policy and random generator, its prompt cache and its event
//! channel. It plans its own forward input and applies its own step decision, so its
//! result never depends on the other sequences of a step.

use std::time::Instant;

use candle_core::Tensor;
use dimple_core::params::FinishReason;
use dimple_model::{DimpleModel, KvCache, SeqInput};
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::EngineError;
use crate::events::{EngineEvent, Finished, Timings};
use crate::policy::{Policy, StepOutcome, request_rng};

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceState {
    /// Admitted; the next step is step 0 (a full forward pass).
    Fresh,
    /// At least one step done; the next is `step`.
    Decoding,
}

pub struct Sequence {
    pub id: u64,
    /// Prompt + response slots.
    ids: Vec<u32>,
    prompt_len: usize,
    /// Prompt embeddings with image rows placed, computed once at admission.
    prompt_embeds: Tensor,
    positions: Vec<[i64; 3]>,
    /// Response slots fixed by the structure prior: never masks, never changed.
    fixed: Vec<bool>,
    num_total_mask: usize,
    mask_id: u32,
    pub step: usize,
    pub state: SequenceState,
    /// Slots committed by the last step (for metrics).
    pub last_committed: usize,
    use_cache: bool,
    /// K/V of the first `prompt_len - 1` positions, from step 0 (cache mode only).
    cache: Option<KvCache>,
    /// Bytes reserved in the pool for `cache`.
    pub reserved_bytes: usize,
    policy: Policy,
    rng: StdRng,
    events: UnboundedSender<EngineEvent>,
    pub deadline: Option<Instant>,
    timings: Timings,
    submitted: Instant,
    admitted: Instant,
    first_commit: Option<Instant>,
}

/// What a sequence feeds into one packed forward pass.
pub struct StepInput {
    pub embeds: Tensor,
    pub start: usize,
    pub keep_prefix: usize,
    pub logit_rows: std::ops::Range<usize>,
}

impl Sequence {
    /// Builds the sequence: places the response masks and the prior, computes position ids
    /// and the prompt embeddings (running the vision tower for its images).
    pub(crate) fn new(
        id: u64,
        req: crate::GenerateRequest,
        model: &DimpleModel,
        events: UnboundedSender<EngineEvent>,
        reserved_bytes: usize,
        submitted: Instant,
    ) -> Result<Self, EngineError> {
        let cfg = model.config();
        let p = req.prompt_ids.len();
        let n = req.params.max_new_tokens;
        let mut ids = req.prompt_ids;
        ids.extend(std::iter::repeat_n(cfg.mask_token_id, n));
        let mut fixed = vec![false; n];
        for &(pos, tok) in &req.params.prior.fixed {
            ids[p + pos] = tok;
            fixed[pos] = true;
        }
        let num_total_mask = fixed.iter().filter(|&&f| !f).count();
        let grids: Vec<[usize; 3]> = req.images.iter().map(|i| i.grid_thw).collect();
        let ri = dimple_model::rope_index(&ids, None, &grids, cfg)?;
        let features = if req.images.is_empty() {
            None
        } else {
            let dev = model.device();
            let mut rows = Vec::with_capacity(req.images.len());
            for im in &req.images {
                let patches = im.pixel_values.len() / im.patch_dim.max(1);
                rows.push(Tensor::from_slice(&im.pixel_values, (patches, im.patch_dim), dev)?);
            }
            Some(model.encode_images(&Tensor::cat(&rows, 0)?, &grids)?)
        };
        let prompt_embeds = model.embed(&ids[..p], features.as_ref())?;
        let policy = Policy::new(&req.params)?;
        let now = Instant::now();
        Ok(Self {
            id,
            ids,
            prompt_len: p,
            prompt_embeds,
            positions: ri.positions,
            fixed,
            num_total_mask,
            mask_id: cfg.mask_token_id,
            step: 0,
            state: SequenceState::Fresh,
            last_committed: 0,
            use_cache: req.params.use_cache,
            cache: None,
            reserved_bytes,
            policy,
            rng: request_rng(req.params.seed),
            events,
            deadline: req.deadline,
            timings: Timings::default(),
            submitted,
            admitted: now,
            first_commit: None,
        })
    }

    pub fn response_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }

    /// Tokens this sequence puts into the next forward pass.
    pub fn step_tokens(&self) -> usize {
        if self.use_cache && self.state == SequenceState::Decoding {
            self.response_len() + 1
        } else {
            self.ids.len()
        }
    }

    /// Whether the client has gone away.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// The next forward input: the whole sequence, or (cache mode after step 0) the last
    /// prompt token and the response against the cached prompt.
    pub fn plan(&self, model: &DimpleModel) -> Result<StepInput, EngineError> {
        let p = self.prompt_len;
        let n = self.response_len();
        let response = model.text.embed_tokens(&self.ids[p..])?;
        if self.use_cache && self.state == SequenceState::Decoding {
            let last = self.prompt_embeds.narrow(0, p - 1, 1)?;
            Ok(StepInput { embeds: Tensor::cat(&[&last, &response], 0)?, start: p - 1, keep_prefix: 0, logit_rows: 0..n })
        } else {
            let keep = if self.use_cache { p - 1 } else { 0 };
            Ok(StepInput {
                embeds: Tensor::cat(&[&self.prompt_embeds, &response], 0)?,
                start: 0,
                keep_prefix: keep,
                logit_rows: p - 1..p - 1 + n,
            })
        }
    }

    pub fn seq_input<'a>(&'a self, s: &StepInput) -> SeqInput<'a> {
        SeqInput {
            embeds: s.embeds.clone(),
            positions: &self.positions[s.start..],
            key_valid: None,
            prefix: if s.start > 0 { self.cache.as_ref() } else { None },
            keep_prefix: s.keep_prefix,
            logit_rows: s.logit_rows.clone(),
        }
    }

    /// Applies one step from the shifted logits of the response slots (`[n, vocab]`).
    /// Returns whether the sequence finished.
    pub fn apply(&mut self, logits: &Tensor, new_cache: Option<KvCache>) -> Result<Option<FinishReason>, EngineError> {
        if let Some(c) = new_cache {
            self.cache = Some(c);
        }
        let p = self.prompt_len;
        let masked: Vec<usize> =
            (0..self.response_len()).filter(|&j| !self.fixed[j] && self.ids[p + j] == self.mask_id).collect();
        let mut scores = Vec::with_capacity(masked.len());
        if !masked.is_empty() {
            let idx: Vec<u32> = masked.iter().map(|&j| j as u32).collect();
            let idx = Tensor::from_vec(idx, masked.len(), logits.device())?;
            let rows = logits.index_select(&idx, 0)?.to_vec2::<f32>()?;
            for row in &rows {
                scores.push(self.policy.score(row, &mut self.rng)?);
            }
        }
        let decision = self.policy.decide(self.step, self.num_total_mask, &scores, &mut self.rng)?;
        let mut committed = Vec::with_capacity(decision.commit.len());
        for &i in &decision.commit {
            let j = masked[i];
            let tok = scores[i].x0;
            self.ids[p + j] = tok;
            if tok != self.mask_id {
                committed.push((j, tok));
            }
        }
        let now = Instant::now();
        if !committed.is_empty() && self.first_commit.is_none() {
            self.first_commit = Some(now);
        }
        let step = self.step;
        let masks_left = masked.len() - committed.len();
        self.last_committed = committed.len();
        let _ = self.events.send(EngineEvent::Step { step, committed });
        self.step += 1;
        self.state = SequenceState::Decoding;
        Ok(match self.policy.after_step(step, masks_left) {
            StepOutcome::Continue => None,
            StepOutcome::Finished(r) => Some(r),
        })
    }

    /// Sends the final event; the sequence is dropped by the caller right after.
    pub fn finish(&mut self, reason: FinishReason) {
        let now = Instant::now();
        self.timings = Timings {
            queue_ms: ms(self.admitted - self.submitted),
            first_commit_ms: self.first_commit.map(|t| ms(t - self.submitted)),
            total_ms: ms(now - self.submitted),
        };
        self.cache = None;
        let _ = self.events.send(EngineEvent::Finished(Finished {
            response_ids: self.ids[self.prompt_len..].to_vec(),
            steps: self.step,
            finish_reason: reason,
            timings: self.timings,
        }));
    }

    pub fn fail(&mut self, err: EngineError) {
        self.cache = None;
        let _ = self.events.send(EngineEvent::Failed(err));
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
