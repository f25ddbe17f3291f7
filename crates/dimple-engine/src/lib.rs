//! The diffusion decoding engine: per-request unmasking policies (`policy`), sequences and
//! their state (`sequence`), the prefix-cache pool (`pool`), the engine loop and its handle
//! (`engine`), the rank threads that own the (possibly tensor-parallel) model (`group`),
//! greedy scoring on vocabulary shards (`vocab_score`), and the events a request's owner
//! receives (`events`).
//!
//! Every request decodes exactly as the official implementation decodes it alone; batching
//! changes throughput, never results. On top of the official decoding a request may ask for
//! block-wise decoding (`DecodeParams::block_length`) and a cache approximation per request
//! (`DecodeParams::cache`: exact, the official prefix cache, or the dual cache that keeps
//! the keys/values outside the current block and recomputes only the block between block
//! starts); requests of every mode share the same forward passes.

pub mod engine;
pub mod error;
pub mod events;
pub mod group;
pub mod policy;
pub mod pool;
pub mod sequence;
mod vocab_score;

pub use engine::{
    EngineConfig, EngineHandle, EngineImage, EngineStats, GenerateRequest, StepReport,
    cached_positions, start, start_group,
};
pub use error::EngineError;
pub use events::{EngineEvent, Finished, Timings};
pub use group::{FaultInjection, FaultKind, GroupConfig, GroupDevices};
