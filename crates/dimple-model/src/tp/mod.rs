//! Tensor parallelism: one model definition sharded over the ranks of a group.
//!
//! Layout: `comm` (the [`Comm`] trait and the group of one), `local` (ranks as threads
//! exchanging through shared memory: CPU and every test), `nccl` (NCCL, behind the `cuda`
//! feature), `layout` (which slice each rank owns; the valid degrees of a model), `layers`
//! (column-, row- and vocab-parallel layers).
//!
//! How a forward pass flows through the ranks (Megatron-style, two all-reduces per layer):
//! every rank holds the full hidden state; q/k/v and gate/up are column-parallel (each rank
//! computes its own heads and MLP columns, no communication); attention runs on the rank's
//! heads against the rank's own slice of the prefix cache; o_proj and down_proj are
//! row-parallel and end with an all-reduce that restores the full hidden state. The
//! embedding and `lm_head` split the vocabulary: the embedding all-reduces, `lm_head` leaves
//! each rank with the logits of its vocabulary slice, which the decoding step reduces to a
//! few numbers per row instead of gathering.

mod comm;
mod layers;
mod layout;
mod local;
#[cfg(feature = "cuda")]
mod nccl;

pub use comm::{Comm, CommError, SingleComm};
pub use layers::{ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding};
pub use layout::{Shard, TpLayout, check_degree, valid_degrees};
pub use local::LocalComm;
#[cfg(feature = "cuda")]
pub use nccl::{NcclComm, NcclGroup};
