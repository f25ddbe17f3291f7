//! The Dimple model on candle: configuration, weights, the bidirectional text model with
//! M-RoPE, the windowed vision tower, the image projector and image preprocessing.
//!
//! Layout: `config` (HF `config.json`), `weights` (safetensors, single or sharded),
//! `text` (decoder), `attention` (its padded batched attention on tensor ops), `rope_index`
//! (3-component position ids), `vision` (tower, merger, projector), `preprocess` (image
//! bytes to patches), `tp` (tensor parallelism: the `Comm` trait with its thread-local and
//! NCCL groups, the sharded layers, the valid degrees).

mod attention;
pub mod config;
mod cpu;
pub mod model;
pub mod preprocess;
pub mod rope_index;
pub mod text;
pub mod tp;
pub mod vision;
pub mod weights;

pub use config::{DimpleConfig, VisionConfig};
pub use cpu::exp_in_place;
pub use model::{Checkpoint, DimpleModel, save_random_weights};
pub use rope_index::{RopeIndex, rope_index};
pub use text::{
    KvCache, LogitRows, SeqInput, SeqOutput, TextModel, kv_cache_bytes, kv_cache_bytes_per_rank,
};
pub use tp::{Comm, CommError, LocalComm, SingleComm, TpLayout, check_degree, valid_degrees};

/// Errors from loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("io: {0}")]
    Io(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("image: {0}")]
    Image(String),
    #[error("input: {0}")]
    Input(String),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// A collective of a tensor-parallel group failed (a peer failed, left or timed out).
    #[error("tensor-parallel communication: {0}")]
    Comm(#[from] tp::CommError),
    /// The tensor-parallel degree cannot shard this model.
    #[error("tensor-parallel degree {degree} cannot shard this model: {reason}; valid degrees: {}", list(.valid))]
    InvalidDegree {
        degree: usize,
        reason: String,
        valid: Vec<usize>,
    },
}

fn list(v: &[usize]) -> String {
    v.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T> = std::result::Result<T, ModelError>;
