//! What decodes a validated request: the [`Backend`] trait.
//!
//! The front-end ([`crate::frontend::Frontend`]) owns everything that touches text —
//! validation, prompts, rendering, errors — and hands token ids to a backend, which answers
//! with the slots each step committed and a final row. Two implementations exist:
//! [`crate::pool_backend::PoolBackend`] (the worker pool over gRPC, with retries: the
//! router) and `dimple_worker::LocalBackend` (an engine in the same process: `dimple serve`,
//! and `dimple generate` / `sweep` / `bench` without `--router`). The in-process one lives
//! in the worker crate because the router never imports the model or the engine.

use dimple_core::params::FinishReason;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::RouterError;
use crate::validate::{ModelView, ValidRequest};

/// The slots one denoising step committed.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStep {
    /// 0-based forward-pass index.
    pub step: u32,
    /// `(response position, token id)` in the order the policy chose them.
    pub committed: Vec<(usize, u32)>,
    /// The 0-based block of the response this step decoded.
    pub block: u32,
}

/// Milliseconds measured where the request was decoded, from its arrival there.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BackendTimings {
    pub queue_ms: f64,
    pub first_commit_ms: Option<f64>,
    pub total_ms: f64,
}

/// The end of a decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendFinished {
    /// The whole response row (mask ids where a slot never committed).
    pub response_ids: Vec<u32>,
    /// Forward passes taken.
    pub steps: u32,
    /// How decoding ended; the front-end turns the unsuccessful ones into errors.
    pub finish_reason: FinishReason,
    pub timings: BackendTimings,
}

/// Where step events go while a request decodes. `None`: the caller wants only the final
/// answer (a backend may then retry a request at any point, since nothing was shown).
pub type StepSink = Option<mpsc::Sender<BackendStep>>;

#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The served model and the limits the backend enforces.
    async fn model(&self) -> Result<ModelView, RouterError>;

    /// Decodes `req` by `deadline`, sending each step to `steps`. A closed sink means the
    /// client went away: the backend stops and answers [`RouterError::Cancelled`]. Dropping
    /// the future cancels the request.
    async fn generate(
        &self,
        req: &ValidRequest,
        deadline: Instant,
        steps: StepSink,
    ) -> Result<BackendFinished, RouterError>;

    /// Whether at least one replica can take a request now (readiness).
    fn ready(&self) -> bool;

    /// Replicas known (`ModelInfo.workers`).
    fn replicas(&self) -> usize;
}
