//! The collective operations a tensor-parallel group needs, as a trait, and the trivial
//! group of one.

use std::fmt::Debug;

use candle_core::Tensor;

/// A failed collective. Once a group has failed, every later collective on any of its
/// ranks fails too: a group is never half-alive.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// A rank marked the group failed (an error or panic), or left it.
    #[error("rank {rank}: the tensor-parallel group was aborted: {reason}")]
    Aborted { rank: usize, reason: String },
    /// No peer completed the collective in time; the group is aborted.
    #[error("rank {rank}: `{op}` waited more than {seconds} s for its peers")]
    Timeout {
        rank: usize,
        op: &'static str,
        seconds: u64,
    },
    /// Ranks called different collectives, or passed inconsistent shapes.
    #[error("rank {rank}: {detail}")]
    Mismatch { rank: usize, detail: String },
    /// The backend (tensor library or NCCL) failed.
    #[error("rank {rank}: {detail}")]
    Backend { rank: usize, detail: String },
}

/// Collectives over the ranks of one tensor-parallel group.
///
/// Every rank must call the same collectives in the same order with tensors of the same
/// shape; a rank that cannot (it failed) calls [`Comm::abort`] so that its peers return an
/// error instead of waiting. With a world of one, every operation returns its input.
pub trait Comm: Send + Sync + Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks; every rank gets the same result.
    fn all_reduce_sum(&self, xs: &Tensor) -> Result<Tensor, CommError>;
    /// Every rank's `xs` concatenated along `dim`, in rank order.
    fn all_gather(&self, xs: &Tensor, dim: usize) -> Result<Tensor, CommError>;
    /// Every rank's `values` (all of the same length) concatenated in rank order: the small
    /// host-side exchange that combines per-rank statistics (max, argmax, sum of
    /// exponentials...) without moving whole rows.
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>, CommError>;
    /// Marks the group failed so that peers blocked in (or entering) a collective return
    /// [`CommError::Aborted`]. Idempotent.
    fn abort(&self, reason: &str);
}

/// The group of one: no communication at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleComm;

impl Comm for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, xs: &Tensor) -> Result<Tensor, CommError> {
        Ok(xs.clone())
    }
    fn all_gather(&self, xs: &Tensor, _dim: usize) -> Result<Tensor, CommError> {
        Ok(xs.clone())
    }
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>, CommError> {
        Ok(values.to_vec())
    }
    fn abort(&self, _reason: &str) {}
}
