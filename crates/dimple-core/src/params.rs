//! Per-request decode parameters, their validation, and the reasons a request finishes.
//!
//! The names and defaults follow the official Dimple `diffusion_generate` call
//! (`yu-rp/Dimple`, `DimpleGenerationConfig` and the tiny model's `generation_config.json`):
//! `alg='maskgit_plus'`, `decoding_pipeline='dim'`, `temperature=0`,
//! `use_original_confidence=True`, no `alg_p_threshold`, no cache. `threshold` here is the
//! official `alg_p_threshold`; `pipeline` is `decoding_pipeline`.
//!
//! [`DecodeParams::validate`] runs once at the edge; everything inside the engine may then
//! rely on the invariants it checks. Token ids in a [`StructurePrior`] are checked against
//! the vocabulary later, by the engine, which knows the model.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a set of decode parameters was rejected. Every message names the field and the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// A numeric field lies outside its allowed range.
    #[error("`{field}` must be {expected}, got {got}")]
    OutOfRange {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error("unknown `alg` {got:?}; expected one of: {}", Alg::SPELLINGS.join(", "))]
    UnknownAlg { got: String },
    #[error("unknown `pipeline` {got:?}; expected one of: {}", Pipeline::SPELLINGS.join(", "))]
    UnknownPipeline { got: String },
    /// A field that the chosen pipeline does not support (the official code either ignores
    /// it silently or fails at the first step; both are worse than a clear rejection).
    #[error("`{field}` is not supported with pipeline `{pipeline}`: {reason}")]
    Unsupported {
        field: &'static str,
        pipeline: Pipeline,
        reason: &'static str,
    },
    #[error(
        "`prior` position {position} must be < `max_new_tokens` ({max_new_tokens}); \
         positions count from the first response token"
    )]
    PriorPositionOutOfRange {
        position: usize,
        max_new_tokens: usize,
    },
    #[error("`prior` fixes response position {position} more than once")]
    PriorDuplicatePosition { position: usize },
    #[error("`prior` fixes all {max_new_tokens} response positions; at least one must stay masked")]
    PriorCoversResponse { max_new_tokens: usize },
    #[error("unknown `cache` mode {got:?}; expected one of: {}", CacheMode::SPELLINGS.join(", "))]
    UnknownCacheMode { got: String },
    /// `use_cache` (the prefix-cache alias) and an explicit `cache` mode disagree.
    #[error("`use_cache` = true asks for the prefix cache but `cache` is `{cache}`")]
    CacheConflict { cache: CacheMode },
}

/// The unmasking algorithm (`alg` in the official code): how a step's confidence is scored
/// and, on the fallback schedule, which slots are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Alg {
    /// Confidence = probability of the chosen token; commit the top-k.
    #[default]
    #[serde(rename = "maskgit_plus")]
    MaskgitPlus,
    /// Confidence = p(top1) - p(top2); commit the top-k.
    #[serde(rename = "topk_margin")]
    TopkMargin,
    /// Confidence = sum p*log(p + 1e-10) (negative entropy); commit the top-k.
    #[serde(rename = "entropy")]
    Entropy,
    /// The fallback schedule commits k slots chosen uniformly at random.
    #[serde(rename = "origin")]
    Origin,
    /// The fallback schedule commits each slot independently with probability 1 - s/t.
    /// Only the 'dim' pipeline supports it.
    #[serde(rename = "origin-ratio")]
    OriginRatio,
    /// The fallback schedule commits the leftmost masked slot.
    #[serde(rename = "autoregressive")]
    Autoregressive,
}

impl Alg {
    /// The official spellings, in declaration order.
    pub const SPELLINGS: [&'static str; 6] = [
        "maskgit_plus",
        "topk_margin",
        "entropy",
        "origin",
        "origin-ratio",
        "autoregressive",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::MaskgitPlus => "maskgit_plus",
            Alg::TopkMargin => "topk_margin",
            Alg::Entropy => "entropy",
            Alg::Origin => "origin",
            Alg::OriginRatio => "origin-ratio",
            Alg::Autoregressive => "autoregressive",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Alg {
    type Err = ParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "maskgit_plus" => Alg::MaskgitPlus,
            "topk_margin" => Alg::TopkMargin,
            "entropy" => Alg::Entropy,
            "origin" => Alg::Origin,
            "origin-ratio" => Alg::OriginRatio,
            "autoregressive" => Alg::Autoregressive,
            _ => return Err(ParamError::UnknownAlg { got: s.to_owned() }),
        })
    }
}

/// The decoding pipeline (`decoding_pipeline` in the official code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pipeline {
    /// Dimple's own loop: optional confidence threshold, a fallback schedule driven by the
    /// fraction of masks left, and an early stop once no mask remains.
    #[default]
    Dim,
    /// The loop inherited from Dream: k = n*(1 - s/t) per step, no threshold, and always
    /// exactly `steps` iterations. Confidences never use the original distribution.
    Dream,
}

impl Pipeline {
    /// The official spellings, in declaration order.
    pub const SPELLINGS: [&'static str; 2] = ["dim", "dream"];

    pub fn as_str(self) -> &'static str {
        match self {
            Pipeline::Dim => "dim",
            Pipeline::Dream => "dream",
        }
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pipeline {
    type Err = ParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dim" => Ok(Pipeline::Dim),
            "dream" => Ok(Pipeline::Dream),
            _ => Err(ParamError::UnknownPipeline { got: s.to_owned() }),
        }
    }
}

/// How much of a step's attention input is recomputed (`cache` in a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Every step runs the whole sequence: the official no-cache decoding.
    #[default]
    Exact,
    /// The official prefilling (`use_cache`): step 0 runs the whole sequence and keeps the
    /// keys/values of the prompt but its last token; every later step runs the last prompt
    /// token and the whole response against them. The cache is never refreshed, also not
    /// at block starts.
    Prefix,
    /// Block-wise dual cache: the first step of each block runs the whole sequence and
    /// keeps the keys/values of everything outside the block's window (the prompt and
    /// earlier response before it, the later response after it); the block's other steps
    /// run only the window (the token before the block, whose output row gives the block's
    /// first slot its logits, and the block itself) against them. With one block this is
    /// exactly [`CacheMode::Prefix`].
    Dual,
}

impl CacheMode {
    /// The spellings, in declaration order.
    pub const SPELLINGS: [&'static str; 3] = ["exact", "prefix", "dual"];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Exact => "exact",
            CacheMode::Prefix => "prefix",
            CacheMode::Dual => "dual",
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheMode {
    type Err = ParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(CacheMode::Exact),
            "prefix" => Ok(CacheMode::Prefix),
            "dual" => Ok(CacheMode::Dual),
            _ => Err(ParamError::UnknownCacheMode { got: s.to_owned() }),
        }
    }
}

/// How a response is split into blocks and the step budget over them (see
/// [`DecodeParams::block_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPlan {
    /// Slots per block; the last block holds the remainder when it does not divide.
    pub block_length: usize,
    pub num_blocks: usize,
    /// Steps each block may take at most.
    pub steps_per_block: usize,
}

impl BlockPlan {
    /// Response slots `[start, end)` of block `b`.
    pub fn block(&self, b: usize, max_new_tokens: usize) -> std::ops::Range<usize> {
        let start = (b * self.block_length).min(max_new_tokens);
        start..(start + self.block_length).min(max_new_tokens)
    }
}

/// Response tokens fixed before decoding starts (the official `generation_tokens_hook_func`
/// called with `step=None`). Fixed slots are not masks: they are left out of the mask count
/// that drives the schedule and are never changed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StructurePrior {
    /// `(response position, token id)`; position 0 is the first generated token.
    pub fixed: Vec<(usize, u32)>,
}

impl StructurePrior {
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty()
    }

    /// Checks positions against the response length; token ids are the engine's to check.
    pub fn validate(&self, max_new_tokens: usize) -> Result<(), ParamError> {
        let mut seen = HashSet::with_capacity(self.fixed.len());
        for &(position, _) in &self.fixed {
            if position >= max_new_tokens {
                return Err(ParamError::PriorPositionOutOfRange {
                    position,
                    max_new_tokens,
                });
            }
            if !seen.insert(position) {
                return Err(ParamError::PriorDuplicatePosition { position });
            }
        }
        // With nothing masked the official schedule divides 0 by 0 and fails.
        if seen.len() == max_new_tokens {
            return Err(ParamError::PriorCoversResponse { max_new_tokens });
        }
        Ok(())
    }
}

/// Server-wide caps that a request must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeLimits {
    /// Largest response length a request may ask for.
    pub max_new_tokens: usize,
    /// Largest number of denoising steps (each is one forward pass).
    pub max_steps: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_new_tokens: 1024,
            max_steps: 1024,
        }
    }
}

/// Per-request decode parameters (the official `diffusion_generate` keyword arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeParams {
    /// Number of masked slots appended after the prompt.
    pub max_new_tokens: usize,
    /// Number of denoising iterations; the 'dim' pipeline may stop earlier.
    pub steps: usize,
    /// `alg_p_threshold`: commit every slot whose confidence is strictly above it.
    /// `None` or `Some(0.0)` disables it. Only the 'dim' pipeline uses it.
    pub threshold: Option<f32>,
    pub alg: Alg,
    pub pipeline: Pipeline,
    /// 0 means greedy; above 0 the token is sampled from softmax(logits / temperature).
    pub temperature: f32,
    /// Nucleus filter; values >= 1 disable it, as in the official code.
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    /// Above 0, the fallback schedule samples its k slots from softmax(confidence / alg_temp)
    /// instead of taking the top k. `None` or 0 disables it.
    pub alg_temp: Option<f32>,
    /// Score confidences with the unfiltered, untempered distribution (the official default,
    /// which the authors strongly recommend). The 'dream' pipeline always uses `false`.
    pub use_original_confidence: bool,
    /// Seeds the request's own random generator, so results never depend on batching.
    pub seed: u64,
    /// Reuse the prompt K/V computed at step 0 (the official "prefilling" approximation).
    /// An alias of `cache = prefix`, kept because the official call spells it this way.
    pub use_cache: bool,
    pub prior: StructurePrior,
    /// Slots per block for block-wise (semi-autoregressive) decoding; `None` (the default)
    /// decodes the whole response as one block, exactly as the official code does.
    pub block_length: Option<usize>,
    /// The cache approximation; `None` means `prefix` when `use_cache` is set, else `exact`.
    pub cache: Option<CacheMode>,
}

impl Default for DecodeParams {
    /// The Dimple generation defaults. The official class default of 512 steps is meant for
    /// 512-token answers; here `steps` defaults to `max_new_tokens` (one token per step).
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            steps: 64,
            threshold: None,
            alg: Alg::MaskgitPlus,
            pipeline: Pipeline::Dim,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            alg_temp: None,
            use_original_confidence: true,
            seed: 0,
            use_cache: false,
            prior: StructurePrior::default(),
            block_length: None,
            cache: None,
        }
    }
}

fn out_of_range(field: &'static str, expected: &str, got: impl fmt::Display) -> ParamError {
    ParamError::OutOfRange {
        field,
        expected: expected.to_owned(),
        got: got.to_string(),
    }
}

impl DecodeParams {
    /// The threshold in force: `None` when unset or 0, as the official `> 0` test does.
    pub fn effective_threshold(&self) -> Option<f32> {
        self.threshold.filter(|&t| t > 0.0)
    }

    /// `alg_temp` in force: `None` when unset or 0.
    pub fn effective_alg_temp(&self) -> Option<f32> {
        self.alg_temp.filter(|&t| t > 0.0)
    }

    /// Whether confidences come from the original distribution; 'dream' forces `false`.
    pub fn effective_use_original_confidence(&self) -> bool {
        self.use_original_confidence && self.pipeline == Pipeline::Dim
    }

    /// The cache mode in force: `cache` when set, otherwise `prefix` for `use_cache`.
    pub fn cache_mode(&self) -> CacheMode {
        match self.cache {
            Some(c) => c,
            None if self.use_cache => CacheMode::Prefix,
            None => CacheMode::Exact,
        }
    }

    /// The block split and step budget. The response of `n = max_new_tokens` slots is cut
    /// into `num_blocks = ceil(n / block_length)` blocks of `block_length` slots, left to
    /// right; when `block_length` does not divide `n` the last block holds the remaining
    /// `n mod block_length` slots. Each block gets `steps_per_block = max(1, steps /
    /// num_blocks)` steps (integer division: the `steps mod num_blocks` leftover steps are
    /// not used, and with fewer steps than blocks every block still gets one). With no
    /// `block_length`, or one of at least `n`, there is one block with all `steps`.
    pub fn block_plan(&self) -> BlockPlan {
        let n = self.max_new_tokens.max(1);
        let block_length = self.block_length.unwrap_or(n).clamp(1, n);
        let num_blocks = n.div_ceil(block_length);
        BlockPlan {
            block_length,
            num_blocks,
            steps_per_block: (self.steps / num_blocks).max(1),
        }
    }

    /// The response row before step 0: `max_new_tokens` mask ids with the structure prior's
    /// tokens placed (positions outside the row are ignored; validation refuses them).
    pub fn initial_response(&self, mask_token_id: u32) -> Vec<u32> {
        let mut row = vec![mask_token_id; self.max_new_tokens];
        for &(p, t) in &self.prior.fixed {
            if let Some(slot) = row.get_mut(p) {
                *slot = t;
            }
        }
        row
    }

    pub fn validate(&self, limits: &DecodeLimits) -> Result<(), ParamError> {
        if self.max_new_tokens == 0 || self.max_new_tokens > limits.max_new_tokens {
            return Err(out_of_range(
                "max_new_tokens",
                &format!("in [1, {}]", limits.max_new_tokens),
                self.max_new_tokens,
            ));
        }
        if self.steps == 0 || self.steps > limits.max_steps {
            return Err(out_of_range(
                "steps",
                &format!("in [1, {}]", limits.max_steps),
                self.steps,
            ));
        }
        // Negated range tests so that NaN is rejected too.
        if let Some(t) = self.threshold
            && !(0.0..1.0).contains(&t)
        {
            return Err(out_of_range("threshold", "in [0, 1)", t));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(out_of_range(
                "temperature",
                "a finite number >= 0",
                self.temperature,
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(out_of_range("top_p", "in (0, 1]", p));
        }
        if self.top_k == Some(0) {
            return Err(out_of_range("top_k", ">= 1", 0));
        }
        if let Some(a) = self.alg_temp
            && !(a.is_finite() && a >= 0.0)
        {
            return Err(out_of_range("alg_temp", "a finite number >= 0", a));
        }
        if let Some(b) = self.block_length
            && !(1..=self.max_new_tokens).contains(&b)
        {
            return Err(out_of_range(
                "block_length",
                &format!("in [1, {}] (`max_new_tokens`)", self.max_new_tokens),
                b,
            ));
        }
        if self.use_cache
            && let Some(c) = self.cache
            && c == CacheMode::Exact
        {
            return Err(ParamError::CacheConflict { cache: c });
        }
        if self.pipeline == Pipeline::Dream {
            if self.effective_threshold().is_some() {
                return Err(ParamError::Unsupported {
                    field: "threshold",
                    pipeline: self.pipeline,
                    reason: "the dream loop has no confidence threshold",
                });
            }
            if self.alg == Alg::OriginRatio {
                return Err(ParamError::Unsupported {
                    field: "alg",
                    pipeline: self.pipeline,
                    reason: "`origin-ratio` exists only in the dim loop",
                });
            }
        }
        self.prior.validate(self.max_new_tokens)
    }
}

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Every masked response slot holds a token (for 'dream', after all `steps` ran).
    Completed,
    /// All `steps` iterations ran and some slots are still masks. Reachable when the schedule
    /// commits fewer slots than needed, e.g. `autoregressive` with `steps < max_new_tokens`,
    /// or when the model predicted the mask id itself. The official code returns such
    /// sequences as they are, masks included.
    StepLimit,
    /// The client cancelled the request or went away.
    Cancelled,
    /// The request's deadline passed before it finished.
    DeadlineExceeded,
    /// The engine failed while running this request (for example a model error).
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Completed => "completed",
            FinishReason::StepLimit => "step_limit",
            FinishReason::Cancelled => "cancelled",
            FinishReason::DeadlineExceeded => "deadline_exceeded",
            FinishReason::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_new_tokens: 256,
            max_steps: 512,
        }
    }

    fn err(p: &DecodeParams) -> String {
        p.validate(&limits()).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_dimple_generation_defaults_and_valid() {
        let p = DecodeParams::default();
        assert_eq!(p.alg, Alg::MaskgitPlus);
        assert_eq!(p.pipeline, Pipeline::Dim);
        assert_eq!(p.temperature, 0.0);
        assert!(p.use_original_confidence);
        assert_eq!(p.threshold, None);
        assert!(!p.use_cache);
        assert_eq!((p.top_p, p.top_k, p.alg_temp), (None, None, None));
        p.validate(&limits()).unwrap();
    }

    #[test]
    fn threshold_range() {
        let mut p = DecodeParams {
            threshold: Some(1.5),
            ..Default::default()
        };
        assert_eq!(err(&p), "`threshold` must be in [0, 1), got 1.5");
        p.threshold = Some(1.0);
        assert_eq!(err(&p), "`threshold` must be in [0, 1), got 1");
        p.threshold = Some(-0.1);
        assert!(err(&p).starts_with("`threshold` must be in [0, 1)"));
        p.threshold = Some(f32::NAN);
        assert!(err(&p).starts_with("`threshold` must be in [0, 1)"));
        p.threshold = Some(0.0);
        p.validate(&limits()).unwrap();
        assert_eq!(p.effective_threshold(), None);
        p.threshold = Some(0.9);
        p.validate(&limits()).unwrap();
        assert_eq!(p.effective_threshold(), Some(0.9));
    }

    #[test]
    fn lengths_and_steps_against_limits() {
        let mut p = DecodeParams {
            max_new_tokens: 257,
            ..Default::default()
        };
        assert_eq!(err(&p), "`max_new_tokens` must be in [1, 256], got 257");
        p.max_new_tokens = 0;
        assert_eq!(err(&p), "`max_new_tokens` must be in [1, 256], got 0");
        p.max_new_tokens = 256;
        p.steps = 0;
        assert_eq!(err(&p), "`steps` must be in [1, 512], got 0");
        p.steps = 513;
        assert_eq!(err(&p), "`steps` must be in [1, 512], got 513");
        // More steps than tokens is legal (the official default is 512 steps).
        p.max_new_tokens = 16;
        p.steps = 512;
        p.validate(&limits()).unwrap();
    }

    #[test]
    fn sampling_fields() {
        let base = DecodeParams::default();
        let p = DecodeParams {
            temperature: -1.0,
            ..base.clone()
        };
        assert_eq!(
            err(&p),
            "`temperature` must be a finite number >= 0, got -1"
        );
        let p = DecodeParams {
            temperature: f32::INFINITY,
            ..base.clone()
        };
        assert_eq!(
            err(&p),
            "`temperature` must be a finite number >= 0, got inf"
        );
        let p = DecodeParams {
            top_p: Some(0.0),
            ..base.clone()
        };
        assert_eq!(err(&p), "`top_p` must be in (0, 1], got 0");
        let p = DecodeParams {
            top_p: Some(1.2),
            ..base.clone()
        };
        assert_eq!(err(&p), "`top_p` must be in (0, 1], got 1.2");
        let p = DecodeParams {
            top_k: Some(0),
            ..base.clone()
        };
        assert_eq!(err(&p), "`top_k` must be >= 1, got 0");
        let p = DecodeParams {
            alg_temp: Some(-0.5),
            ..base.clone()
        };
        assert_eq!(err(&p), "`alg_temp` must be a finite number >= 0, got -0.5");
        let p = DecodeParams {
            temperature: 0.7,
            top_p: Some(1.0),
            top_k: Some(50),
            alg_temp: Some(0.0),
            ..base
        };
        p.validate(&limits()).unwrap();
        assert_eq!(p.effective_alg_temp(), None);
    }

    #[test]
    fn dream_rejects_threshold_and_origin_ratio() {
        let p = DecodeParams {
            pipeline: Pipeline::Dream,
            threshold: Some(0.9),
            ..Default::default()
        };
        assert_eq!(
            err(&p),
            "`threshold` is not supported with pipeline `dream`: \
             the dream loop has no confidence threshold"
        );
        let p = DecodeParams {
            pipeline: Pipeline::Dream,
            alg: Alg::OriginRatio,
            ..Default::default()
        };
        assert!(err(&p).starts_with("`alg` is not supported with pipeline `dream`"));
        // The default use_original_confidence=true is accepted and ignored, as officially.
        let p = DecodeParams {
            pipeline: Pipeline::Dream,
            ..Default::default()
        };
        p.validate(&limits()).unwrap();
        assert!(!p.effective_use_original_confidence());
    }

    #[test]
    fn prior_validation() {
        let mut p = DecodeParams {
            max_new_tokens: 4,
            steps: 4,
            ..Default::default()
        };
        p.prior.fixed = vec![(0, 11), (3, 307)];
        p.validate(&limits()).unwrap();
        p.prior.fixed = vec![(0, 11), (4, 307)];
        assert_eq!(
            err(&p),
            "`prior` position 4 must be < `max_new_tokens` (4); \
             positions count from the first response token"
        );
        p.prior.fixed = vec![(2, 11), (2, 12)];
        assert_eq!(err(&p), "`prior` fixes response position 2 more than once");
        p.prior.fixed = vec![(0, 1), (1, 1), (2, 1), (3, 1)];
        assert_eq!(
            err(&p),
            "`prior` fixes all 4 response positions; at least one must stay masked"
        );
    }

    #[test]
    fn alg_and_pipeline_spellings() {
        for s in Alg::SPELLINGS {
            let a: Alg = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        for s in Pipeline::SPELLINGS {
            let p: Pipeline = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(
            "maskgit".parse::<Alg>().unwrap_err().to_string(),
            "unknown `alg` \"maskgit\"; expected one of: maskgit_plus, topk_margin, \
             entropy, origin, origin-ratio, autoregressive"
        );
        assert_eq!(
            "Dim".parse::<Pipeline>().unwrap_err().to_string(),
            "unknown `pipeline` \"Dim\"; expected one of: dim, dream"
        );
    }

    #[test]
    fn cache_mode_alias_and_conflict() {
        let mut p = DecodeParams::default();
        assert_eq!(p.cache_mode(), CacheMode::Exact);
        p.use_cache = true;
        assert_eq!(p.cache_mode(), CacheMode::Prefix);
        p.cache = Some(CacheMode::Dual);
        assert_eq!(p.cache_mode(), CacheMode::Dual);
        p.validate(&limits()).unwrap();
        p.cache = Some(CacheMode::Exact);
        assert_eq!(
            err(&p),
            "`use_cache` = true asks for the prefix cache but `cache` is `exact`"
        );
        p.use_cache = false;
        p.validate(&limits()).unwrap();
        for s in CacheMode::SPELLINGS {
            assert_eq!(s.parse::<CacheMode>().unwrap().to_string(), s);
        }
        assert_eq!(
            "full".parse::<CacheMode>().unwrap_err().to_string(),
            "unknown `cache` mode \"full\"; expected one of: exact, prefix, dual"
        );
    }

    #[test]
    fn block_length_range_and_plan() {
        let mut p = DecodeParams {
            max_new_tokens: 64,
            steps: 64,
            ..Default::default()
        };
        // No block length: one block with every step.
        assert_eq!(
            p.block_plan(),
            BlockPlan {
                block_length: 64,
                num_blocks: 1,
                steps_per_block: 64
            }
        );
        p.block_length = Some(0);
        assert_eq!(
            err(&p),
            "`block_length` must be in [1, 64] (`max_new_tokens`), got 0"
        );
        p.block_length = Some(65);
        assert!(err(&p).starts_with("`block_length` must be in [1, 64]"));
        p.block_length = Some(16);
        p.validate(&limits()).unwrap();
        assert_eq!(
            p.block_plan(),
            BlockPlan {
                block_length: 16,
                num_blocks: 4,
                steps_per_block: 16
            }
        );
        assert_eq!(p.block_plan().block(3, 64), 48..64);
        // Ragged: 64 = 3 x 20 + 4; 30 steps over 4 blocks leave 2 unused.
        p.block_length = Some(20);
        p.steps = 30;
        let plan = p.block_plan();
        assert_eq!((plan.num_blocks, plan.steps_per_block), (4, 7));
        assert_eq!(plan.block(2, 64), 40..60);
        assert_eq!(plan.block(3, 64), 60..64);
        // Fewer steps than blocks: one step each.
        p.steps = 2;
        assert_eq!(p.block_plan().steps_per_block, 1);
    }
}
