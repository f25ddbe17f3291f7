//! The Dimple model on candle: configuration, weights, the bidirectional text model with
//! M-RoPE, the windowed vision tower, the image projector and image preprocessing.
//!
//! Layout: `config` (HF `config.json`), `weights` (safetensors, single or sharded),
//! `text` (decoder), `rope_index` (3-component position ids), `vision` (tower, merger,
//! projector), `preprocess` (image bytes to patches).

pub mod config;
pub mod model;
pub mod preprocess;
pub mod rope_index;
pub mod text;
pub mod vision;
pub mod weights;

pub use config::{DimpleConfig, VisionConfig};
pub use model::DimpleModel;
pub use rope_index::{RopeIndex, rope_index};
pub use text::{KvCache, SeqInput, SeqOutput, TextModel, kv_cache_bytes};

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
}

pub type Result<T> = std::result::Result<T, ModelError>;
