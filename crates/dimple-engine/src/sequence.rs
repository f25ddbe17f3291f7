//! One request inside the engine: its canvas (prompt + response slots), the fixed slots of
//! its structure prior, its policy and random generator and its event channel. It plans
//! its own part of a step and applies its own step decision, so its result never depends
//! on the other sequences of a step.
//!
//! Block-wise decoding: the response is split into blocks (`DecodeParams::block_plan`)
//! decoded left to right. Only the current block's masked slots are scored and committed;
//! its policy is the request's own rules with the block's step budget and the block's mask
//! count at its start. A single block (the default) is the official decoding, unchanged.
//!
//! This is the engine thread's (host) side of a request. Its device side, the prompt
//! embeddings and the prefix cache, lives on the rank threads (`group`), each rank holding
//! its own shard of the cache.

use std::sync::Arc;
use std::time::Instant;

use dimple_core::params::{BlockPlan, CacheMode, DecodeParams, FinishReason};
use dimple_model::DimpleConfig;
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::EngineError;
use crate::events::{EngineEvent, Finished, Timings};
use crate::group::{AdmitSeq, Scoring, SeqStep, SlotOutput};
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
    /// Response slots fixed by the structure prior: never masks, never changed.
    fixed: Vec<bool>,
    mask_id: u32,
    pub step: usize,
    pub state: SequenceState,
    /// Slots committed by the last step (for metrics).
    pub last_committed: usize,
    cache_mode: CacheMode,
    blocks: BlockPlan,
    /// The block being decoded.
    block: usize,
    /// Steps taken in the current block.
    block_step: usize,
    /// Masked slots of the current block when it started (what its schedule counts).
    block_total_mask: usize,
    /// Bytes reserved in the pool for the prefix cache (per rank).
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

impl Sequence {
    /// Builds the sequence: places the response masks and the prior and computes (which
    /// validates) the position ids. Returns what the ranks need to admit it.
    pub(crate) fn new(
        id: u64,
        req: crate::GenerateRequest,
        cfg: &DimpleConfig,
        events: UnboundedSender<EngineEvent>,
        reserved_bytes: usize,
        submitted: Instant,
    ) -> Result<(Self, AdmitSeq), EngineError> {
        let p = req.prompt_ids.len();
        let n = req.params.max_new_tokens;
        let mut ids = req.prompt_ids;
        ids.extend(req.params.initial_response(cfg.mask_token_id));
        let mut fixed = vec![false; n];
        for &(pos, _) in &req.params.prior.fixed {
            fixed[pos] = true;
        }
        let blocks = req.params.block_plan();
        let grids: Vec<[usize; 3]> = req.images.iter().map(|i| i.grid_thw).collect();
        // Checks the image tokens against the grids here, before any rank sees the request.
        let ri = dimple_model::rope_index(&ids, None, &grids, cfg)?;
        // Every block runs the request's own rules over the block's step budget (the whole
        // `steps` when there is one block).
        let policy = Policy::new(&DecodeParams {
            steps: blocks.steps_per_block,
            ..req.params.clone()
        })?;
        let now = Instant::now();
        let admit = AdmitSeq {
            id,
            prompt_ids: ids[..p].to_vec(),
            images: req.images,
            positions: Arc::new(ri.positions),
        };
        let mut seq = Self {
            id,
            ids,
            prompt_len: p,
            fixed,
            mask_id: cfg.mask_token_id,
            step: 0,
            state: SequenceState::Fresh,
            last_committed: 0,
            cache_mode: req.params.cache_mode(),
            blocks,
            block: 0,
            block_step: 0,
            block_total_mask: 0,
            reserved_bytes,
            policy,
            rng: request_rng(req.params.seed),
            events,
            deadline: req.deadline,
            timings: Timings::default(),
            submitted,
            admitted: now,
            first_commit: None,
        };
        // Validation leaves at least one masked slot, so some block has one.
        if seq.enter_block(0).is_none() {
            return Err(EngineError::Invalid(
                "the response has no masked slot".into(),
            ));
        }
        Ok((seq, admit))
    }

    pub fn response_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }

    /// The current block's response slots.
    fn block_range(&self) -> std::ops::Range<usize> {
        self.blocks.block(self.block, self.response_len())
    }

    /// Masked slots of response range `r`.
    fn count_masked(&self, r: std::ops::Range<usize>) -> usize {
        let p = self.prompt_len;
        r.filter(|&j| !self.fixed[j] && self.ids[p + j] == self.mask_id)
            .count()
    }

    /// Makes the first block from `from` on that has a masked slot the current one;
    /// `None` when no block from `from` on has one.
    fn enter_block(&mut self, from: usize) -> Option<usize> {
        let n = self.response_len();
        for b in from..self.blocks.num_blocks {
            let masks = self.count_masked(self.blocks.block(b, n));
            if masks > 0 {
                self.block = b;
                self.block_step = 0;
                self.block_total_mask = masks;
                return Some(b);
            }
        }
        None
    }

    /// The block being decoded (0-based).
    pub fn block(&self) -> usize {
        self.block
    }

    /// Whether the next step runs only the current block's window (dual cache).
    fn in_block_window(&self) -> bool {
        self.cache_mode == CacheMode::Dual && self.block_step > 0
    }

    /// Tokens this sequence puts into the next forward pass.
    pub fn step_tokens(&self) -> usize {
        if self.in_block_window() {
            self.block_range().len() + 1
        } else if self.cache_mode == CacheMode::Prefix && self.state == SequenceState::Decoding {
            self.response_len() + 1
        } else {
            self.ids.len()
        }
    }

    /// Whether the client has gone away.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// The current block's slots still to fill, ascending.
    fn masked(&self) -> Vec<usize> {
        let p = self.prompt_len;
        self.block_range()
            .filter(|&j| !self.fixed[j] && self.ids[p + j] == self.mask_id)
            .collect()
    }

    /// This sequence's part of the next step: the whole sequence; or (prefix cache after
    /// step 0) the last prompt token and the response against the cached prompt; or (dual
    /// cache after a block's first step) the block's window against the kept keys/values
    /// of everything else, which the block's first step (a whole pass) refreshed.
    pub(crate) fn plan(&self) -> SeqStep {
        let n = self.response_len();
        let range = self.block_range();
        let (window, block, keep_prefix, keep_suffix) = match self.cache_mode {
            CacheMode::Exact => (false, None, 0, 0),
            CacheMode::Prefix if self.state == SequenceState::Decoding => (true, None, 0, 0),
            CacheMode::Prefix => (false, None, self.prompt_len - 1, 0),
            CacheMode::Dual if self.block_step > 0 => (false, Some(range), 0, 0),
            CacheMode::Dual => (
                false,
                None,
                self.prompt_len - 1 + range.start,
                n - range.end,
            ),
        };
        let scorer = self.policy.scorer();
        SeqStep {
            id: self.id,
            response: self.ids[self.prompt_len..].to_vec(),
            window,
            keep_prefix,
            keep_suffix,
            block,
            // Response positions are far below u32::MAX (bounded by the context length).
            masked: self.masked().into_iter().map(|j| j as u32).collect(),
            scoring: if scorer.is_greedy() {
                Scoring::Greedy(scorer.kind)
            } else {
                Scoring::FullRows
            },
        }
    }

    /// Applies one step from the scored masked slots (or their full shifted logits rows).
    /// Returns whether the sequence finished.
    pub(crate) fn apply(&mut self, out: SlotOutput) -> Result<Option<FinishReason>, EngineError> {
        let p = self.prompt_len;
        let masked = self.masked();
        let scores = match out {
            SlotOutput::Scores(s) => s,
            SlotOutput::Rows(rows) => {
                let mut s = Vec::with_capacity(rows.len());
                for row in &rows {
                    s.push(self.policy.score(row, &mut self.rng)?);
                }
                s
            }
        };
        if scores.len() != masked.len() {
            return Err(EngineError::Model(format!(
                "{} scores for {} masked slots",
                scores.len(),
                masked.len()
            )));
        }
        let decision = self.policy.decide(
            self.block_step,
            self.block_total_mask,
            &scores,
            &mut self.rng,
        )?;
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
        let block = self.block;
        let masks_left = masked.len() - committed.len();
        self.last_committed = committed.len();
        let _ = self.events.send(EngineEvent::Step {
            step,
            block,
            committed,
        });
        self.step += 1;
        self.state = SequenceState::Decoding;
        Ok(match self.policy.after_step(self.block_step, masks_left) {
            StepOutcome::Continue => {
                self.block_step += 1;
                None
            }
            // The block is done (filled, or out of its steps): on to the next block with
            // a masked slot. After the last one the request ends as its last block did,
            // unless an earlier block ran out of steps with slots still masked.
            StepOutcome::Finished(r) => match self.enter_block(block + 1) {
                Some(_) => None,
                None if self.count_masked(0..self.response_len()) > masks_left => {
                    Some(FinishReason::StepLimit)
                }
                None => Some(r),
            },
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
        let _ = self.events.send(EngineEvent::Finished(Finished {
            response_ids: self.ids[self.prompt_len..].to_vec(),
            steps: self.step,
            finish_reason: reason,
            timings: self.timings,
        }));
    }

    pub fn fail(&mut self, err: EngineError) {
        let _ = self.events.send(EngineEvent::Failed(err));
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
