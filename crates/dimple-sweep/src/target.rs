//! What a sweep sends requests to. The binary implements [`Target`] for a router address
//! (gRPC) and for an in-process engine; the runner only sees this trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dimple_core::params::DecodeParams;

use crate::dataset::Item;

pub struct SweepRequest {
    pub item: Arc<Item>,
    pub params: DecodeParams,
}

/// A completed request as the client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The answer text: the response up to its first end token, special tokens removed.
    pub text: String,
    /// Forward passes the request took (NFE).
    pub steps: usize,
    /// Response slots decoded.
    pub tokens: usize,
    /// When the first slot was committed, measured from sending the request.
    pub first_commit: Option<Duration>,
}

/// A failed request: a status code name (e.g. `INVALID_ARGUMENT`) and its message.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetError {
    pub code: String,
    pub message: String,
}

pub type TargetFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response, TargetError>> + Send + 'a>>;

pub trait Target: Send + Sync {
    fn generate(&self, req: SweepRequest) -> TargetFuture<'_>;
}
