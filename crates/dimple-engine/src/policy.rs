//! The unmasking policy of one request, exact to the official Dimple `_sample` loop
//! (`yu-rp/Dimple`, `generation_utils.py`), with no model in sight.
//!
//! Per step the engine hands this module one logits row per masked slot (already shifted:
//! the row for slot p is the model output at p-1) and gets back:
//! 1. [`Scorer::score`]: the token `x0` and the confidence of each slot (official
//!    `sample_tokens`). The greedy path (temperature 0, or filters that cannot change the
//!    result) is one fused pass over the row that never allocates; sampling and filtered
//!    paths may allocate and draw from the request's own RNG.
//! 2. [`Policy::decide`]: which slots commit this step (official threshold rule, fallback
//!    schedule, or the Dream schedule), and which branch decided it.
//! 3. [`Policy::after_step`]: whether the loop goes on.
//!
//! Everything is per request. The official code decodes a batch jointly (one top-k over all
//! rows and a batch-wide mask count); here each request decides alone, so a request's result
//! never depends on what it was batched with. For batch size 1 both agree exactly.
//!
//! All arithmetic that can move a decision is done in f32 in the order torch does it:
//! the timestep grid, the mask ratio, `trunc(n * (1 - s/t))`, and softmax (`exp(x - max)`
//! times `1/sum`). Decisions in the golden runs come within 7e-5 of the threshold.

use dimple_core::params::{Alg, DecodeParams, FinishReason, Pipeline};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Last value of the timestep grid (`eps` in the official generation config).
pub const TIMESTEP_EPS: f32 = 1e-3;

/// Added to probabilities before the log in the entropy confidence, as officially.
const ENTROPY_EPS: f32 = 1e-10;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("`steps` must be >= 1, got 0")]
    ZeroSteps,
    #[error("`alg` `{alg}` is not supported with pipeline `{pipeline}`")]
    Unsupported { alg: Alg, pipeline: Pipeline },
    #[error("a logits row must hold at least one entry, got an empty row")]
    EmptyLogits,
    #[error("`step` must be < `steps` ({steps}), got {step}")]
    StepOutOfRange { step: usize, steps: usize },
    #[error("`num_total_mask` ({num_total_mask}) must be >= the number of masked slots ({masked})")]
    MaskCountMismatch {
        num_total_mask: usize,
        masked: usize,
    },
    #[error("step {step} of the dim pipeline got no masked slot; the loop should have stopped")]
    NoMaskedSlots { step: usize },
}

/// `torch.linspace(1, eps, steps + 1)` in f32, bit for bit.
///
/// torch computes `d = (end - start) / steps` and fills the first half forwards from `start`
/// and the second half backwards from `end`, each value with one fused multiply-add.
pub fn timesteps(steps: usize) -> Vec<f32> {
    let (start, end) = (1.0f32, TIMESTEP_EPS);
    if steps == 0 {
        return vec![start];
    }
    let d = (end - start) / steps as f32;
    // (steps + 1) / 2 in torch's integer arithmetic.
    let half = steps.div_ceil(2);
    (0..=steps)
        .map(|i| {
            if i < half {
                d.mul_add(i as f32, start)
            } else {
                (-d).mul_add((steps - i) as f32, end)
            }
        })
        .collect()
}

/// The RNG a request draws from: seeded per request so that results do not depend on
/// batching or on other requests.
pub fn request_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The token proposed for one masked slot and the confidence the policy ranks it by.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlotScore {
    pub x0: u32,
    pub confidence: f32,
}

/// What the confidence of a slot measures (chosen by [`Alg`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceKind {
    /// p(x0).
    Probability,
    /// p(top1) - p(top2), independent of x0.
    Margin,
    /// sum p*log(p + 1e-10): 0 for a one-hot distribution, negative otherwise.
    NegEntropy,
}

/// Turns a logits row into a [`SlotScore`] (official `sample_tokens`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scorer {
    pub kind: ConfidenceKind,
    /// > 0: `x0` is sampled from softmax(logits / temperature); otherwise greedy.
    pub temperature: f32,
    /// Nucleus filter, kept only when < 1 (officially `top_p >= 1` is a no-op).
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    /// Confidence from softmax of the raw row instead of the tempered, filtered one.
    pub use_original_confidence: bool,
}

impl Scorer {
    pub fn new(params: &DecodeParams) -> Self {
        let kind = match params.alg {
            Alg::TopkMargin => ConfidenceKind::Margin,
            Alg::Entropy => ConfidenceKind::NegEntropy,
            Alg::MaskgitPlus | Alg::Origin | Alg::OriginRatio | Alg::Autoregressive => {
                ConfidenceKind::Probability
            }
        };
        Self {
            kind,
            temperature: params.temperature,
            top_p: params.top_p.filter(|&p| p < 1.0),
            // torch cannot take the top 0; validation rejects it, this keeps us total.
            top_k: params.top_k.map(|k| k.max(1)),
            use_original_confidence: params.effective_use_original_confidence(),
        }
    }

    /// Whether [`Scorer::score`] takes the fused, allocation-free pass. With temperature 0
    /// the filters never remove the argmax, so they matter only when the confidence is read
    /// from the filtered distribution.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
            && (self.use_original_confidence || (self.top_p.is_none() && self.top_k.is_none()))
    }

    /// Scores one logits row over the vocabulary. The RNG is touched only when sampling.
    pub fn score<R: Rng + ?Sized>(
        &self,
        row: &[f32],
        rng: &mut R,
    ) -> Result<SlotScore, PolicyError> {
        if row.is_empty() {
            return Err(PolicyError::EmptyLogits);
        }
        Ok(if self.is_greedy() {
            self.score_greedy(row)
        } else {
            self.score_filtered(row, rng)
        })
    }

    fn score_greedy(&self, row: &[f32]) -> SlotScore {
        let st = RowStats::of(row);
        SlotScore {
            x0: token_id(st.argmax),
            confidence: self.confidence(row, &st, st.argmax),
        }
    }

    fn confidence(&self, row: &[f32], st: &RowStats, x0: usize) -> f32 {
        match self.kind {
            ConfidenceKind::Probability => st.prob(row[x0]),
            ConfidenceKind::Margin => st.margin(),
            ConfidenceKind::NegEntropy => st.neg_entropy(row),
        }
    }

    fn score_filtered<R: Rng + ?Sized>(&self, row: &[f32], rng: &mut R) -> SlotScore {
        let mut temperature = self.temperature;
        let mut z: Vec<f32> = if temperature > 0.0 {
            let scaled: Vec<f32> = row.iter().map(|&x| x / temperature).collect();
            // A temperature so small that logits/temperature overflows f32 is the greedy
            // limit; torch would produce NaN probabilities here.
            if scaled.iter().any(|x| x.is_infinite()) {
                temperature = 0.0;
                row.to_vec()
            } else {
                scaled
            }
        } else {
            row.to_vec()
        };
        if let Some(p) = self.top_p {
            keep_top_p(&mut z, p);
        }
        if let Some(k) = self.top_k {
            keep_top_k(&mut z, k);
        }
        let st = RowStats::of(&z);
        let x0 = if temperature > 0.0 {
            sample_index(&z, &st, rng).unwrap_or(st.argmax)
        } else {
            st.argmax
        };
        let confidence = if self.use_original_confidence {
            self.confidence(row, &RowStats::of(row), x0)
        } else {
            self.confidence(&z, &st, x0)
        };
        SlotScore {
            x0: token_id(x0),
            confidence,
        }
    }
}

fn token_id(index: usize) -> u32 {
    // Token ids are u32 throughout the workspace, so a vocabulary index always fits.
    index as u32
}

/// Softmax statistics of one row, gathered without allocating.
#[derive(Debug, Clone, Copy)]
struct RowStats {
    max: f32,
    argmax: usize,
    /// Largest value besides the first argmax (equal to `max` on a tie).
    second: f32,
    /// `sum exp(x - max)`, rounded to f32 as torch holds it.
    sum: f32,
}

/// A row's max, its first index, the largest other value, and `sum exp(x - max)` in f64
/// (each term the f32 exponential, summed in order: f64 keeps the sum from adding error
/// beyond torch's own f32 sum). Two passes: the maxima, then the exponentials in blocks
/// through the vector kernel. Shared by the whole-row scorer and the vocabulary-sharded one.
pub(crate) fn row_statistics(row: &[f32]) -> (f32, usize, f32, f64) {
    let mut max = f32::NEG_INFINITY;
    let mut second = f32::NEG_INFINITY;
    let mut argmax = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            second = max;
            max = x;
            argmax = i;
        } else if x > second {
            second = x;
        }
    }
    let mut sum = 0.0f64;
    let mut block = [0f32; 256];
    for part in row.chunks(block.len()) {
        let terms = &mut block[..part.len()];
        for (t, &x) in terms.iter_mut().zip(part) {
            *t = x - max;
        }
        dimple_model::exp_in_place(terms);
        for &t in terms.iter() {
            sum += f64::from(t);
        }
    }
    (max, argmax, second, sum)
}

impl RowStats {
    fn of(row: &[f32]) -> Self {
        let (max, argmax, second, sum) = row_statistics(row);
        Self {
            max,
            argmax,
            second,
            sum: sum as f32,
        }
    }

    /// torch's CPU softmax multiplies by the reciprocal of the sum.
    fn inv_sum(&self) -> f32 {
        1.0 / self.sum
    }

    fn prob(&self, x: f32) -> f32 {
        (x - self.max).exp() * self.inv_sum()
    }

    fn margin(&self) -> f32 {
        self.prob(self.max) - self.prob(self.second)
    }

    /// A second pass: each term needs the final normaliser.
    fn neg_entropy(&self, row: &[f32]) -> f32 {
        let inv = self.inv_sum();
        let mut acc = 0.0f64;
        for &x in row {
            let p = (x - self.max).exp() * inv;
            acc += f64::from(p * (p + ENTROPY_EPS).ln());
        }
        acc as f32
    }
}

/// Categorical draw from softmax(z); `None` when the weights are unusable.
fn sample_index<R: Rng + ?Sized>(z: &[f32], st: &RowStats, rng: &mut R) -> Option<usize> {
    let weight = |x: f32| f64::from((x - st.max).exp());
    let total: f64 = z.iter().map(|&x| weight(x)).sum();
    if !(total.is_finite() && total > 0.0) {
        return None;
    }
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last = None;
    for (i, &x) in z.iter().enumerate() {
        let w = weight(x);
        if w > 0.0 {
            acc += w;
            last = Some(i);
            if acc > target {
                return Some(i);
            }
        }
    }
    // Only rounding in the running sum can get here; the last candidate is the right one.
    last
}

/// Official `top_p_logits`: keep the smallest prefix of the sorted distribution whose mass
/// exceeds `top_p` (the top token always stays); the rest become `f32::MIN`.
///
/// Only the head of the order is ever needed: the largest few values are selected and
/// sorted first, and the selection widens only while their mass stays at or below
/// `top_p`. The order (value descending, lower index first among ties) is total, so the
/// kept set and the running sum are those of a full sort.
fn keep_top_p(z: &mut [f32], top_p: f32) {
    let st = RowStats::of(z);
    let inv = st.inv_sum();
    let mut order: Vec<usize> = (0..z.len()).collect();
    let n = order.len();
    let mut head = n.min(64);
    let kept = loop {
        {
            let by_rank = |a: &usize, b: &usize| z[*b].total_cmp(&z[*a]).then(a.cmp(b));
            if head > 0 && head < n {
                order.select_nth_unstable_by(head - 1, by_rank);
            }
            order[..head].sort_by(by_rank);
        }
        // torch's cumsum accumulates f32 inputs in f64 and stores f32.
        let mut cum = 0.0f64;
        let found = order[..head].iter().enumerate().find_map(|(rank, &i)| {
            cum += f64::from((z[i] - st.max).exp() * inv);
            (cum as f32 > top_p).then_some(rank + 1)
        });
        match found {
            Some(kept) => break kept,
            None if head == n => break n,
            None => head = (head * 4).min(n),
        }
    };
    for &i in &order[kept..] {
        z[i] = f32::MIN;
    }
}

/// Official `top_k_logits`: everything strictly below the k-th largest value becomes
/// `f32::MIN` (ties with the k-th value stay).
fn keep_top_k(z: &mut [f32], k: usize) {
    if k >= z.len() {
        return;
    }
    let mut values = z.to_vec();
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for x in z.iter_mut() {
        if *x < kth {
            *x = f32::MIN;
        }
    }
}

/// Which branch of the official loop decided a step (spelled as in the golden records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionPath {
    /// 'dim': at least one confidence was strictly above the threshold.
    Threshold,
    /// 'dim' with a threshold, last step: every remaining slot commits.
    ThresholdLastStepAll,
    /// 'dim' fallback schedule (no threshold, or nothing passed it).
    Schedule,
    /// 'dream': k = n*(1 - s/t) per step.
    DreamSchedule,
}

impl DecisionPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionPath::Threshold => "threshold",
            DecisionPath::ThresholdLastStepAll => "threshold_last_step_all",
            DecisionPath::Schedule => "schedule",
            DecisionPath::DreamSchedule => "dream_schedule",
        }
    }
}

/// The outcome of one step for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDecision {
    /// Indices into the step's slot list, ascending. Each takes its `x0`; a slot whose `x0`
    /// is the mask id itself simply stays a mask, as officially.
    pub commit: Vec<usize>,
    pub path: DecisionPath,
    /// On the 'dim' schedule, the timestep index `s` whose `n*(1 - s/ratio)` gave k.
    pub s_index: Option<usize>,
}

/// Whether the decoding loop goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepOutcome {
    Continue,
    Finished(FinishReason),
}

/// The decision rules of one request, built once from its validated parameters.
#[derive(Debug, Clone)]
pub struct Policy {
    alg: Alg,
    pipeline: Pipeline,
    steps: usize,
    threshold: Option<f32>,
    alg_temp: Option<f32>,
    scorer: Scorer,
    timesteps: Vec<f32>,
}

impl Policy {
    pub fn new(params: &DecodeParams) -> Result<Self, PolicyError> {
        if params.steps == 0 {
            return Err(PolicyError::ZeroSteps);
        }
        if params.pipeline == Pipeline::Dream && params.alg == Alg::OriginRatio {
            return Err(PolicyError::Unsupported {
                alg: params.alg,
                pipeline: params.pipeline,
            });
        }
        Ok(Self {
            alg: params.alg,
            pipeline: params.pipeline,
            steps: params.steps,
            // The dream loop never looks at the threshold.
            threshold: params
                .effective_threshold()
                .filter(|_| params.pipeline == Pipeline::Dim),
            alg_temp: params.effective_alg_temp(),
            scorer: Scorer::new(params),
            timesteps: timesteps(params.steps),
        })
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn scorer(&self) -> &Scorer {
        &self.scorer
    }

    /// Scores one shifted logits row; see [`Scorer::score`].
    pub fn score<R: Rng + ?Sized>(
        &self,
        row: &[f32],
        rng: &mut R,
    ) -> Result<SlotScore, PolicyError> {
        self.scorer.score(row, rng)
    }

    /// Decides step `step` (0-based). `slots` holds the request's masked slots in position
    /// order; `num_total_mask` is their count at setup (structure-prior slots excluded).
    pub fn decide<R: Rng + ?Sized>(
        &self,
        step: usize,
        num_total_mask: usize,
        slots: &[SlotScore],
        rng: &mut R,
    ) -> Result<StepDecision, PolicyError> {
        if step >= self.steps {
            return Err(PolicyError::StepOutOfRange {
                step,
                steps: self.steps,
            });
        }
        if num_total_mask < slots.len() {
            return Err(PolicyError::MaskCountMismatch {
                num_total_mask,
                masked: slots.len(),
            });
        }
        match self.pipeline {
            Pipeline::Dim => self.decide_dim(step, num_total_mask, slots, rng),
            Pipeline::Dream => Ok(self.decide_dream(step, slots, rng)),
        }
    }

    fn decide_dim<R: Rng + ?Sized>(
        &self,
        step: usize,
        num_total_mask: usize,
        slots: &[SlotScore],
        rng: &mut R,
    ) -> Result<StepDecision, PolicyError> {
        let n = slots.len();
        if n == 0 {
            return Err(PolicyError::NoMaskedSlots { step });
        }
        if let Some(thr) = self.threshold {
            if step == self.steps - 1 {
                return Ok(StepDecision {
                    commit: (0..n).collect(),
                    path: DecisionPath::ThresholdLastStepAll,
                    s_index: None,
                });
            }
            let passed: Vec<usize> = (0..n).filter(|&i| slots[i].confidence > thr).collect();
            if !passed.is_empty() {
                return Ok(StepDecision {
                    commit: passed,
                    path: DecisionPath::Threshold,
                    s_index: None,
                });
            }
        }
        let sched = self.fallback_schedule(step, n, num_total_mask);
        let mut commit = match self.alg {
            Alg::MaskgitPlus | Alg::TopkMargin | Alg::Entropy => self.select_k(slots, sched.k, rng),
            // The leftmost masked slot; the schedule's k is ignored, as officially.
            Alg::Autoregressive => vec![0],
            Alg::Origin => rand::seq::index::sample(rng, n, sched.k).into_vec(),
            Alg::OriginRatio => (0..n)
                .filter(|_| rng.random::<f32>() < sched.p_transfer)
                .collect(),
        };
        commit.sort_unstable();
        Ok(StepDecision {
            commit,
            path: DecisionPath::Schedule,
            s_index: Some(sched.s_index),
        })
    }

    /// The official fallback: with `ratio = n / num_total_mask`, walk the grid from the
    /// first `s < ratio` (and no earlier than `step + 1`) until `trunc(n*(1 - s/ratio)) >= 1`;
    /// the last grid point commits everything.
    fn fallback_schedule(&self, step: usize, n: usize, num_total_mask: usize) -> Schedule {
        let ts = &self.timesteps;
        let last = ts[self.steps];
        let nf = n as f32;
        let ratio = nf / num_total_mask as f32;
        let all = Schedule {
            s_index: self.steps,
            k: n,
            p_transfer: 1.0,
        };
        // The official code raises when ratio <= eps (possible only with >= 1000 masks at
        // setup); committing everything is the limit of its own rule.
        let Some(first) = ts.iter().position(|&t| t < ratio) else {
            return all;
        };
        for (j, &s) in ts.iter().enumerate().skip(first.max(step + 1)) {
            if s <= last {
                return Schedule { s_index: j, ..all };
            }
            let p_transfer = 1.0 - s / ratio;
            // `as` truncates toward zero like Python's int(); negatives never reach 1.
            let k = (nf * p_transfer) as i64;
            if k >= 1 {
                return Schedule {
                    s_index: j,
                    k: (k as usize).min(n),
                    p_transfer,
                };
            }
        }
        all
    }

    fn decide_dream<R: Rng + ?Sized>(
        &self,
        step: usize,
        slots: &[SlotScore],
        rng: &mut R,
    ) -> StepDecision {
        let n = slots.len();
        let last_step = step == self.steps - 1;
        let (t, s) = (self.timesteps[step], self.timesteps[step + 1]);
        let commit = match self.alg {
            Alg::Origin => {
                let p_transfer = if last_step { 1.0 } else { 1.0 - s / t };
                (0..n)
                    .filter(|_| rng.random::<f32>() < p_transfer)
                    .collect()
            }
            Alg::Autoregressive => (0..n.min(1)).collect(),
            // `Policy::new` rejects origin-ratio with dream; treat it like maskgit if built
            // by hand.
            Alg::MaskgitPlus | Alg::TopkMargin | Alg::Entropy | Alg::OriginRatio => {
                let k = if last_step {
                    n
                } else {
                    ((n as f32 * (1.0 - s / t)) as i64).clamp(0, n as i64) as usize
                };
                let mut picked = self.select_k(slots, k, rng);
                picked.sort_unstable();
                picked
            }
        };
        StepDecision {
            commit,
            path: DecisionPath::DreamSchedule,
            s_index: None,
        }
    }

    /// The k slots to commit by confidence: the top k, or with `alg_temp` a draw of k
    /// without replacement from softmax(confidence / alg_temp).
    fn select_k<R: Rng + ?Sized>(&self, slots: &[SlotScore], k: usize, rng: &mut R) -> Vec<usize> {
        if k == 0 {
            return Vec::new();
        }
        let keys: Vec<f64> = match self.alg_temp {
            None => slots.iter().map(|s| f64::from(s.confidence)).collect(),
            // Gumbel top-k: adding Gumbel noise to the logits and keeping the k largest is
            // exactly sequential sampling without replacement (torch.multinomial).
            Some(a) => slots
                .iter()
                .map(|s| {
                    // random() is in [0, 1); 1 - u is in (0, 1], so ln never sees 0.
                    let u = 1.0 - rng.random::<f64>();
                    f64::from(s.confidence) / f64::from(a) - (-u.ln()).ln()
                })
                .collect(),
        };
        let mut order: Vec<usize> = (0..slots.len()).collect();
        // torch.topk does not define an order among ties; the lower position wins here.
        order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
        order.truncate(k);
        order
    }

    /// The loop rule after step `step` left `masks_left` masked response slots: 'dim' stops
    /// as soon as none remains, 'dream' always runs all `steps` iterations.
    pub fn after_step(&self, step: usize, masks_left: usize) -> StepOutcome {
        let out_of_steps = step + 1 >= self.steps;
        match self.pipeline {
            Pipeline::Dim if masks_left == 0 => StepOutcome::Finished(FinishReason::Completed),
            _ if !out_of_steps => StepOutcome::Continue,
            _ if masks_left == 0 => StepOutcome::Finished(FinishReason::Completed),
            _ => StepOutcome::Finished(FinishReason::StepLimit),
        }
    }
}

/// What the 'dim' fallback schedule chose.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    s_index: usize,
    /// Slots to commit (ignored by `autoregressive` and `origin-ratio`).
    k: usize,
    /// `1 - s/ratio`, or 1 at the last grid point (used by `origin-ratio`).
    p_transfer: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// p = [0.1, 0.15, 0.5, 0.25] as logits, shifted by a constant (softmax ignores it).
    fn row() -> Vec<f32> {
        [0.1f32, 0.15, 0.5, 0.25]
            .iter()
            .map(|p| p.ln() + 3.0)
            .collect()
    }

    fn params(alg: Alg) -> DecodeParams {
        DecodeParams {
            alg,
            ..Default::default()
        }
    }

    fn scorer(alg: Alg, f: impl FnOnce(&mut DecodeParams)) -> Scorer {
        let mut p = params(alg);
        f(&mut p);
        Scorer::new(&p)
    }

    fn close(a: f32, b: f64, tol: f64) -> bool {
        (f64::from(a) - b).abs() < tol
    }

    fn conf(alg: Alg, f: impl FnOnce(&mut DecodeParams)) -> SlotScore {
        scorer(alg, f).score(&row(), &mut request_rng(0)).unwrap()
    }

    /// The plain rule: sort the whole row, walk the cumulative mass.
    fn keep_top_p_by_full_sort(z: &mut [f32], top_p: f32) {
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
        let st = RowStats::of(z);
        let inv = st.inv_sum();
        let mut cum = 0.0f64;
        let mut kept = order.len();
        for (rank, &i) in order.iter().enumerate() {
            cum += f64::from((z[i] - st.max).exp() * inv);
            if cum as f32 > top_p {
                kept = rank + 1;
                break;
            }
        }
        for &i in &order[kept..] {
            z[i] = f32::MIN;
        }
    }

    #[test]
    fn top_p_from_the_head_equals_a_full_sort() {
        let mut rng = request_rng(11);
        for case in 0..60 {
            let n = [1, 3, 64, 65, 300, 5000][case % 6];
            // Peaked, flat and tied rows: the kept set ranges from one token to all.
            let spread = [0.05f32, 1.0, 8.0][case % 3];
            let row: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * spread * 4.0).round() / 4.0)
                .collect();
            for top_p in [0.0f32, 0.3, 0.9, 0.999, 1.0] {
                let (mut a, mut b) = (row.clone(), row.clone());
                keep_top_p(&mut a, top_p);
                keep_top_p_by_full_sort(&mut b, top_p);
                assert_eq!(a, b, "n {n}, spread {spread}, top_p {top_p}");
            }
        }
    }

    #[test]
    fn timestep_grid_endpoints_and_shape() {
        assert_eq!(timesteps(1), vec![1.0, 1e-3]);
        assert_eq!(timesteps(0), vec![1.0]);
        let ts = timesteps(4);
        // linspace(1, 0.001, 5) by hand: step 0.24975.
        for (t, want) in ts.iter().zip([1.0, 0.75025, 0.5005, 0.25075, 0.001]) {
            assert!(close(*t, want, 1e-6), "{t} vs {want}");
        }
        let ts = timesteps(16);
        assert_eq!((ts.len(), ts[0], ts[16]), (17, 1.0, 1e-3));
        assert!(ts.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn greedy_confidences_by_hand() {
        let s = conf(Alg::MaskgitPlus, |_| {});
        assert_eq!(s.x0, 2);
        assert!(close(s.confidence, 0.5, 1e-6));
        let s = conf(Alg::TopkMargin, |_| {});
        assert_eq!(s.x0, 2);
        assert!(close(s.confidence, 0.5 - 0.25, 1e-6));
        let s = conf(Alg::Entropy, |_| {});
        let h: f64 = [0.1f64, 0.15, 0.5, 0.25].iter().map(|p| p * p.ln()).sum();
        assert!(close(s.confidence, h, 1e-6), "{} vs {h}", s.confidence);
        // A tie at the top gives a margin of exactly 0 and the first index.
        let s = scorer(Alg::TopkMargin, |_| {})
            .score(&[1.0, 2.0, 2.0], &mut request_rng(0))
            .unwrap();
        assert_eq!((s.x0, s.confidence), (1, 0.0));
        assert!(scorer(Alg::MaskgitPlus, |_| {}).is_greedy());
    }

    #[test]
    fn filters_change_confidence_only_without_original_confidence() {
        // top_p 0.6 over sorted [0.5, 0.25, 0.15, 0.1]: cumsum 0.5, 0.75 -> keeps {2, 3}.
        let top_p = |p: &mut DecodeParams| {
            p.top_p = Some(0.6);
            p.use_original_confidence = false;
        };
        let s = conf(Alg::MaskgitPlus, top_p);
        assert_eq!(s.x0, 2);
        assert!(close(s.confidence, 2.0 / 3.0, 1e-6));
        assert!(close(
            conf(Alg::TopkMargin, top_p).confidence,
            1.0 / 3.0,
            1e-6
        ));
        let h = 2.0 / 3.0 * (2.0f64 / 3.0).ln() + 1.0 / 3.0 * (1.0f64 / 3.0).ln();
        assert!(close(conf(Alg::Entropy, top_p).confidence, h, 1e-6));
        // The same kept set through top_k.
        let s = conf(Alg::MaskgitPlus, |p| {
            p.top_k = Some(2);
            p.use_original_confidence = false;
        });
        assert!(close(s.confidence, 2.0 / 3.0, 1e-6));
        // top_p below the top probability keeps one token: a certain distribution.
        let one = |p: &mut DecodeParams| {
            p.top_p = Some(0.4);
            p.use_original_confidence = false;
        };
        assert_eq!(conf(Alg::MaskgitPlus, one).confidence, 1.0);
        assert_eq!(conf(Alg::TopkMargin, one).confidence, 1.0);
        assert!(close(conf(Alg::Entropy, one).confidence, 0.0, 1e-6));
        // With the original confidence the filters are invisible and the path is greedy.
        let orig = scorer(Alg::MaskgitPlus, |p| p.top_p = Some(0.6));
        assert!(orig.is_greedy());
        let s = orig.score(&row(), &mut request_rng(0)).unwrap();
        assert!(close(s.confidence, 0.5, 1e-6));
        // top_p >= 1 is a no-op, as officially.
        assert!(
            scorer(Alg::MaskgitPlus, |p| {
                p.top_p = Some(1.0);
                p.use_original_confidence = false;
            })
            .is_greedy()
        );
    }

    #[test]
    fn temperature_sampling_follows_the_tempered_distribution() {
        // T = 0.5 squares the probabilities: [0.01, 0.0225, 0.25, 0.0625] / 0.345.
        let tempered = [0.01f64, 0.0225, 0.25, 0.0625].map(|w| w / 0.345);
        let orig = [0.1f64, 0.15, 0.5, 0.25];
        for use_orig in [false, true] {
            let sc = scorer(Alg::MaskgitPlus, |p| {
                p.temperature = 0.5;
                p.use_original_confidence = use_orig;
            });
            assert!(!sc.is_greedy());
            let mut rng = request_rng(7);
            let mut counts = [0usize; 4];
            let draws = 20_000;
            for _ in 0..draws {
                let s = sc.score(&row(), &mut rng).unwrap();
                let i = s.x0 as usize;
                counts[i] += 1;
                let want = if use_orig { orig[i] } else { tempered[i] };
                assert!(
                    close(s.confidence, want, 1e-6),
                    "{} vs {want}",
                    s.confidence
                );
            }
            for i in 0..4 {
                let freq = counts[i] as f64 / draws as f64;
                assert!(
                    (freq - tempered[i]).abs() < 0.02,
                    "{i}: {freq} vs {}",
                    tempered[i]
                );
            }
        }
        // Sampling never leaves the top-k set.
        let sc = scorer(Alg::MaskgitPlus, |p| {
            p.temperature = 1.0;
            p.top_k = Some(2);
        });
        let mut rng = request_rng(3);
        for _ in 0..500 {
            let x0 = sc.score(&row(), &mut rng).unwrap().x0;
            assert!(x0 == 2 || x0 == 3);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let sc = scorer(Alg::MaskgitPlus, |p| p.temperature = 1.0);
        let draw = |seed: u64| -> Vec<SlotScore> {
            let mut rng = request_rng(seed);
            (0..64)
                .map(|_| sc.score(&row(), &mut rng).unwrap())
                .collect()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn empty_row_is_an_error() {
        let sc = scorer(Alg::MaskgitPlus, |_| {});
        assert_eq!(
            sc.score(&[], &mut request_rng(0)),
            Err(PolicyError::EmptyLogits)
        );
    }

    fn slots(confs: &[f32]) -> Vec<SlotScore> {
        confs
            .iter()
            .enumerate()
            .map(|(i, &c)| SlotScore {
                x0: 100 + i as u32,
                confidence: c,
            })
            .collect()
    }

    fn policy(f: impl FnOnce(&mut DecodeParams)) -> Policy {
        let mut p = DecodeParams::default();
        f(&mut p);
        Policy::new(&p).unwrap()
    }

    #[test]
    fn threshold_is_strict_and_last_step_commits_all() {
        let pol = policy(|p| {
            p.steps = 4;
            p.threshold = Some(0.5);
        });
        let mut rng = request_rng(0);
        let d = pol
            .decide(0, 3, &slots(&[0.5, 0.7, 0.2]), &mut rng)
            .unwrap();
        assert_eq!((d.commit, d.path), (vec![1], DecisionPath::Threshold));
        let d = pol
            .decide(3, 3, &slots(&[0.1, 0.2, 0.3]), &mut rng)
            .unwrap();
        assert_eq!(
            (d.commit, d.path),
            (vec![0, 1, 2], DecisionPath::ThresholdLastStepAll)
        );
        // Nothing above the threshold: the schedule, worked by hand on linspace(1, .001, 5):
        // ratio 1; s = 0.75025 gives trunc(3 * 0.24975) = 0; s = 0.5005 gives 1.
        let d = pol
            .decide(0, 3, &slots(&[0.3, 0.2, 0.4]), &mut rng)
            .unwrap();
        assert_eq!(
            (d.commit, d.path, d.s_index),
            (vec![2], DecisionPath::Schedule, Some(2))
        );
    }

    #[test]
    fn schedule_one_per_step_then_two_at_the_end() {
        let pol = policy(|p| {
            p.max_new_tokens = 16;
            p.steps = 16;
        });
        let mut rng = request_rng(0);
        // Step 0: 16*(1 - 0.9375625) = 0.999 -> 0, then 16*(1 - 0.875125) = 1.998 -> 1.
        // Confidences 7i mod 16 (/16): the largest, 15, sits at i = 9 (7 * 9 = 63 = 3*16 + 15).
        let confs: Vec<f32> = (0..16).map(|i| (i as f32 * 7.0) % 16.0 / 16.0).collect();
        let d = pol.decide(0, 16, &slots(&confs), &mut rng).unwrap();
        assert_eq!((d.commit, d.s_index), (vec![9], Some(2)));
        // Step 14 with 2 masks: ratio 0.125, s = ts[15] gives 2*(1 - 0.0634/0.125) = 0.985,
        // so j reaches 16 and both commit.
        let d = pol.decide(14, 16, &slots(&[0.2, 0.9]), &mut rng).unwrap();
        assert_eq!((d.commit, d.s_index), (vec![0, 1], Some(16)));
    }

    #[test]
    fn schedule_never_looks_behind_the_next_grid_point() {
        // Step 2 of 4 with all 8 slots still masked (ratio 1): s = 0.75025 would already give
        // trunc(8 * 0.24975) = 1, but the search starts at index 3: trunc(8 * 0.74925) = 5.
        let pol = policy(|p| p.steps = 4);
        let confs = [0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5, 0.4];
        let d = pol
            .decide(2, 8, &slots(&confs), &mut request_rng(0))
            .unwrap();
        assert_eq!((d.commit, d.s_index), (vec![1, 3, 5, 6, 7], Some(3)));
    }

    #[test]
    fn autoregressive_commits_the_leftmost_slot() {
        let pol = policy(|p| {
            p.alg = Alg::Autoregressive;
            p.steps = 8;
        });
        let d = pol
            .decide(0, 8, &slots(&[0.1, 0.9, 0.8]), &mut request_rng(0))
            .unwrap();
        assert_eq!((d.commit, d.path), (vec![0], DecisionPath::Schedule));
        // A threshold still applies first.
        let pol = policy(|p| {
            p.alg = Alg::Autoregressive;
            p.steps = 8;
            p.threshold = Some(0.85);
        });
        let d = pol
            .decide(0, 8, &slots(&[0.1, 0.9, 0.8]), &mut request_rng(0))
            .unwrap();
        assert_eq!((d.commit, d.path), (vec![1], DecisionPath::Threshold));
    }

    #[test]
    fn dream_schedule() {
        let pol = policy(|p| {
            p.pipeline = Pipeline::Dream;
            p.max_new_tokens = 16;
            p.steps = 16;
        });
        let mut rng = request_rng(0);
        let confs: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        // Step 0: trunc(16 * (1 - s/t)) = trunc(0.999) = 0.
        let d = pol.decide(0, 16, &slots(&confs), &mut rng).unwrap();
        assert_eq!((d.commit.len(), d.path), (0, DecisionPath::DreamSchedule));
        // The last step commits everything left.
        let d = pol.decide(15, 16, &slots(&confs[..3]), &mut rng).unwrap();
        assert_eq!(d.commit, vec![0, 1, 2]);
        // No masks left is not an error in dream: the loop keeps running.
        let d = pol.decide(5, 16, &[], &mut rng).unwrap();
        assert!(d.commit.is_empty());
    }

    #[test]
    fn origin_variants_use_the_rng_reproducibly() {
        let pol = policy(|p| {
            p.alg = Alg::Origin;
            p.max_new_tokens = 16;
            p.steps = 16;
        });
        let confs = vec![0.5; 16];
        let run = |seed| {
            pol.decide(0, 16, &slots(&confs), &mut request_rng(seed))
                .unwrap()
        };
        // k = 1 as for maskgit_plus, but a random slot.
        assert_eq!(run(1).commit.len(), 1);
        assert_eq!(run(1), run(1));
        let picks: std::collections::HashSet<_> = (0..40).map(|s| run(s).commit[0]).collect();
        assert!(picks.len() > 5);

        let pol = policy(|p| {
            p.alg = Alg::OriginRatio;
            p.steps = 4;
        });
        // The last grid point transfers with probability 1.
        let d = pol
            .decide(3, 5, &slots(&[0.1; 5]), &mut request_rng(0))
            .unwrap();
        assert_eq!(d.commit, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn alg_temp_samples_k_without_replacement() {
        // 2 of 2 masks on linspace(1, .001, 5): s = 0.75025 and 0.5005 give k = 0,
        // s = 0.25075 gives trunc(2 * 0.74925) = 1.
        let pol = policy(|p| {
            p.steps = 4;
            p.alg_temp = Some(1.0);
        });
        // softmax([0, ln 3] / 1) = [0.25, 0.75].
        let confs = [0.0f32, 3.0f32.ln()];
        let mut rng = request_rng(11);
        let draws = 10_000;
        let mut ones = 0;
        for _ in 0..draws {
            let d = pol.decide(0, 2, &slots(&confs), &mut rng).unwrap();
            assert_eq!((d.commit.len(), d.s_index), (1, Some(3)));
            ones += d.commit[0];
        }
        let freq = ones as f64 / draws as f64;
        assert!((freq - 0.75).abs() < 0.02, "{freq}");
        // k = 2 of 2 takes both, whatever the draw.
        let d = pol.decide(3, 2, &slots(&confs), &mut rng).unwrap();
        assert_eq!(d.commit, vec![0, 1]);
        // A tiny alg_temp is the plain top-k.
        let tiny = policy(|p| {
            p.steps = 4;
            p.alg_temp = Some(1e-6);
        });
        let d = tiny
            .decide(0, 3, &slots(&[0.3, 0.2, 0.4]), &mut request_rng(5))
            .unwrap();
        assert_eq!(d.commit, vec![2]);
    }

    #[test]
    fn finish_rules() {
        let dim = policy(|p| p.steps = 4);
        assert_eq!(
            dim.after_step(0, 0),
            StepOutcome::Finished(FinishReason::Completed)
        );
        assert_eq!(dim.after_step(2, 3), StepOutcome::Continue);
        assert_eq!(
            dim.after_step(3, 1),
            StepOutcome::Finished(FinishReason::StepLimit)
        );
        let dream = policy(|p| {
            p.steps = 4;
            p.pipeline = Pipeline::Dream;
        });
        assert_eq!(dream.after_step(1, 0), StepOutcome::Continue);
        assert_eq!(
            dream.after_step(3, 0),
            StepOutcome::Finished(FinishReason::Completed)
        );
        assert_eq!(
            dream.after_step(3, 2),
            StepOutcome::Finished(FinishReason::StepLimit)
        );
    }

    #[test]
    fn decide_rejects_inconsistent_inputs() {
        let pol = policy(|p| p.steps = 4);
        let mut rng = request_rng(0);
        assert_eq!(
            pol.decide(4, 3, &slots(&[0.1]), &mut rng),
            Err(PolicyError::StepOutOfRange { step: 4, steps: 4 })
        );
        assert_eq!(
            pol.decide(0, 1, &slots(&[0.1, 0.2]), &mut rng),
            Err(PolicyError::MaskCountMismatch {
                num_total_mask: 1,
                masked: 2
            })
        );
        assert_eq!(
            pol.decide(1, 3, &[], &mut rng),
            Err(PolicyError::NoMaskedSlots { step: 1 })
        );
        let bad = DecodeParams {
            pipeline: Pipeline::Dream,
            alg: Alg::OriginRatio,
            ..Default::default()
        };
        assert!(matches!(
            Policy::new(&bad),
            Err(PolicyError::Unsupported { .. })
        ));
    }
}
