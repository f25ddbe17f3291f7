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
    /// Response slots decoded, the padding after the end token included.
    pub tokens: usize,
    /// Response tokens before the first end token: the answer's length. Throughput is
    /// reported in these, since the slots after the end token are padding.
    pub answer_tokens: usize,
    /// When the first slot was committed, measured from sending the request.
    pub first_commit: Option<Duration>,
}

/// A failed request: a canonical gRPC status code name (e.g. `INVALID_ARGUMENT`) and its
/// message.
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

/// The canonical gRPC status code names, in code order.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The canonical spelling of a status code name, whatever way a target spelled it
/// (`InvalidArgument`, `INVALIDARGUMENT`, `invalid_argument`, or the number `3`), so
/// that counts from different targets add up. Names that are no gRPC code are upper-cased.
pub fn canonical_code(code: &str) -> String {
    if let Ok(n) = code.trim().parse::<usize>()
        && let Some(name) = CODE_NAMES.get(n)
    {
        return (*name).to_string();
    }
    let squash = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    let wanted = squash(code);
    CODE_NAMES
        .iter()
        .find(|name| squash(name) == wanted)
        .map_or_else(|| code.trim().to_uppercase(), |name| (*name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spellings_become_canonical() {
        for spelling in [
            "InvalidArgument",
            "INVALIDARGUMENT",
            "invalid_argument",
            "3",
        ] {
            assert_eq!(canonical_code(spelling), "INVALID_ARGUMENT", "{spelling}");
        }
        assert_eq!(canonical_code("Unavailable"), "UNAVAILABLE");
        assert_eq!(canonical_code("DeadlineExceeded"), "DEADLINE_EXCEEDED");
        assert_eq!(canonical_code("client_panic"), "CLIENT_PANIC");
    }
}
