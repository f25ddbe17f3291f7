//! One request inside the engine: its canvas (prompt + response slots), the fixed slots of
//! its structure prior, its policy and random generator and its event channel. It plans
//! its own part of a step and applies its own step decision, so its result never depends
//! on the other sequences of a step.
//!
//! This is the engine thread's (host) side of a request. Its device side, the prompt
//! embeddings and the prefix cache, lives on the rank threads (`group`), each rank holding
//! its own shard of the cache.

use std::sync::Arc;
use std::time::Instant;

use dimple_core::params::FinishReason;
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
    num_total_mask: usize,
    mask_id: u32,
    pub step: usize,
    pub state: SequenceState,
    /// Slots committed by the last step (for metrics).
    pub last_committed: usize,
    use_cache: bool,
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
        let num_total_mask = fixed.iter().filter(|&&f| !f).count();
        let grids: Vec<[usize; 3]> = req.images.iter().map(|i| i.grid_thw).collect();
        // Checks the image tokens against the grids here, before any rank sees the request.
        let ri = dimple_model::rope_index(&ids, None, &grids, cfg)?;
        let policy = Policy::new(&req.params)?;
        let now = Instant::now();
        let admit = AdmitSeq {
            id,
            prompt_ids: ids[..p].to_vec(),
            images: req.images,
            positions: Arc::new(ri.positions),
        };
        let seq = Self {
            id,
            ids,
            prompt_len: p,
            fixed,
            num_total_mask,
            mask_id: cfg.mask_token_id,
            step: 0,
            state: SequenceState::Fresh,
            last_committed: 0,
            use_cache: req.params.use_cache,
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
        Ok((seq, admit))
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

    /// The response slots still to fill, ascending.
    fn masked(&self) -> Vec<usize> {
        let p = self.prompt_len;
        (0..self.response_len())
            .filter(|&j| !self.fixed[j] && self.ids[p + j] == self.mask_id)
            .collect()
    }

    /// This sequence's part of the next step: the whole sequence, or (cache mode after step
    /// 0) the last prompt token and the response against the cached prompt.
    pub(crate) fn plan(&self) -> SeqStep {
        let window = self.use_cache && self.state == SequenceState::Decoding;
        let scorer = self.policy.scorer();
        SeqStep {
            id: self.id,
            response: self.ids[self.prompt_len..].to_vec(),
            window,
            keep_prefix: if self.use_cache && !window {
                self.prompt_len - 1
            } else {
                0
            },
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
        let decision =
            self.policy
                .decide(self.step, self.num_total_mask, &scores, &mut self.rng)?;
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
