//! What the engine tells a request's owner: the slots each step committed, then a final
//! message (or an error). Streaming carries exactly these.

use dimple_core::params::FinishReason;

use crate::EngineError;

#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Step `step` (0-based, over the whole request) committed these `(response position,
    /// token)` pairs, all inside block `block` (0-based; always 0 without block-wise
    /// decoding).
    Step {
        step: usize,
        block: usize,
        committed: Vec<(usize, u32)>,
    },
    Finished(Finished),
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The whole response row (mask ids where a slot never committed).
    pub response_ids: Vec<u32>,
    /// Forward passes taken (NFE).
    pub steps: usize,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Milliseconds since submission.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Waiting before admission.
    pub queue_ms: f64,
    /// Until the first slot committed.
    pub first_commit_ms: Option<f64>,
    pub total_ms: f64,
}
