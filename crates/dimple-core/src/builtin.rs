//! The built-in demo checkpoint, compiled into the binary so that `dimple serve` and
//! `dimple generate` work offline with no model directory: a tiny Dimple-architecture model
//! trained on a synthetic image-question task, with its own byte-level tokenizer. The files
//! live in `models/dimple-demo/` at the repository root.

pub const CONFIG_JSON: &str = include_str!("../../../models/dimple-demo/config.json");
pub const GENERATION_CONFIG_JSON: &str =
    include_str!("../../../models/dimple-demo/generation_config.json");
pub const PREPROCESSOR_CONFIG_JSON: &str =
    include_str!("../../../models/dimple-demo/preprocessor_config.json");
pub const TOKENIZER_JSON: &str = include_str!("../../../models/dimple-demo/tokenizer.json");
pub static MODEL_SAFETENSORS: &[u8] =
    include_bytes!("../../../models/dimple-demo/model.safetensors");

/// Name reported for the built-in model.
pub const NAME: &str = "dimple-demo";
