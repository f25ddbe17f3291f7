//! Hugging Face `config.json` of a Dimple checkpoint.
//!
//! Field names mirror the file. Fields a checkpoint may omit take the defaults of the
//! reference configuration classes (text defaults are the Dimple-7B shape), so a
//! `save_pretrained` file that keeps only non-default values loads to the same model.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

fn d_vocab() -> usize {
    152064
}
fn d_hidden() -> usize {
    3584
}
fn d_intermediate() -> usize {
    18944
}
fn d_layers() -> usize {
    28
}
fn d_heads() -> usize {
    28
}
fn d_act() -> String {
    "silu".into()
}
fn d_max_pos() -> usize {
    32768
}
fn d_eps() -> f64 {
    1e-6
}
fn d_theta() -> f64 {
    1_000_000.0
}
fn d_true() -> bool {
    true
}
fn d_image_token() -> u32 {
    151655
}
fn d_video_token() -> u32 {
    151656
}
fn d_vision_start() -> u32 {
    151652
}
fn d_vision_end() -> u32 {
    151653
}
fn d_vision_token() -> u32 {
    151654
}
fn d_mask_token() -> u32 {
    151666
}
fn d_pad_token() -> u32 {
    151643
}
fn d_eos_token() -> u32 {
    151643
}

/// The language model and the ids the decoding loop needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DimpleConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Absent means multi-head attention (as many kv heads as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    /// Split of the rotary half-dimension over the (t, h, w) position components. Some
    /// checkpoints keep it inside `rope_scaling` instead; see [`DimpleConfig::mrope_section`].
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bidirectional attention over the whole sequence (the diffusion setting).
    #[serde(default = "d_true")]
    pub full_attn_mask: bool,
    #[serde(default = "d_image_token")]
    pub image_token_id: u32,
    #[serde(default = "d_video_token")]
    pub video_token_id: u32,
    #[serde(default = "d_vision_start")]
    pub vision_start_token_id: u32,
    #[serde(default = "d_vision_end")]
    pub vision_end_token_id: u32,
    #[serde(default = "d_vision_token")]
    pub vision_token_id: u32,
    #[serde(default = "d_mask_token")]
    pub mask_token_id: u32,
    #[serde(default = "d_pad_token")]
    pub pad_token_id: u32,
    #[serde(default = "d_eos_token")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub vision_config: VisionConfig,
}

fn d_v_depth() -> usize {
    32
}
fn d_v_hidden() -> usize {
    1280
}
fn d_v_intermediate() -> usize {
    3420
}
fn d_v_heads() -> usize {
    16
}
fn d_v_in_ch() -> usize {
    3
}
fn d_v_patch() -> usize {
    14
}
fn d_v_merge() -> usize {
    2
}
fn d_v_tpatch() -> usize {
    2
}
fn d_v_window() -> usize {
    112
}
fn d_v_fullatt() -> Vec<usize> {
    vec![7, 15, 23, 31]
}
fn d_v_out() -> usize {
    3584
}
fn d_v_tps() -> usize {
    2
}

/// The vision tower (windowed ViT), its patch merger and the output width fed to the
/// image projector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VisionConfig {
    #[serde(default = "d_v_depth")]
    pub depth: usize,
    #[serde(default = "d_v_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_v_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_v_heads")]
    pub num_heads: usize,
    #[serde(default = "d_v_in_ch")]
    pub in_channels: usize,
    #[serde(default = "d_v_patch")]
    pub patch_size: usize,
    #[serde(default = "d_v_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_v_tpatch")]
    pub temporal_patch_size: usize,
    /// Side of an attention window in pixels (112 = 4x4 merged tokens at patch 14).
    #[serde(default = "d_v_window")]
    pub window_size: usize,
    /// Blocks that attend over the whole image instead of within windows.
    #[serde(default = "d_v_fullatt")]
    pub fullatt_block_indexes: Vec<usize>,
    #[serde(default = "d_v_out")]
    pub out_hidden_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_v_tps")]
    pub tokens_per_second: usize,
}

impl Default for VisionConfig {
    fn default() -> Self {
        // Deserialising an empty object applies every field default above.
        serde_json::from_str("{}").expect("all VisionConfig fields have defaults")
    }
}

fn invalid(field: &str, msg: String) -> ModelError {
    ModelError::Config(format!("`{field}`: {msg}"))
}

impl DimpleConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    /// Parses and validates a `config.json` document.
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        // The error names the offending field's path (e.g. `vision_config.depth`).
        let cfg: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ModelError::Config(format!("config.json: `{path}`: {}", e.into_inner()))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The M-RoPE section sizes (t, h, w), from the top level or from `rope_scaling`.
    pub fn mrope_section(&self) -> Vec<usize> {
        if let Some(s) = &self.mrope_section {
            return s.clone();
        }
        if let Some(s) = self
            .rope_scaling
            .as_ref()
            .and_then(|r| r.get("mrope_section"))
            .and_then(|v| serde_json::from_value::<Vec<usize>>(v.clone()).ok())
        {
            return s;
        }
        // Dimple-7B: head_dim 128, half 64 = 16 + 24 + 24.
        vec![16, 24, 24]
    }

    /// Rejects configurations the model cannot be built from, naming the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("vision_config.depth", self.vision_config.depth),
            ("vision_config.hidden_size", self.vision_config.hidden_size),
            (
                "vision_config.intermediate_size",
                self.vision_config.intermediate_size,
            ),
            ("vision_config.num_heads", self.vision_config.num_heads),
            ("vision_config.patch_size", self.vision_config.patch_size),
            (
                "vision_config.spatial_merge_size",
                self.vision_config.spatial_merge_size,
            ),
            (
                "vision_config.temporal_patch_size",
                self.vision_config.temporal_patch_size,
            ),
            (
                "vision_config.out_hidden_size",
                self.vision_config.out_hidden_size,
            ),
            ("vision_config.in_channels", self.vision_config.in_channels),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be positive, got 0".into()));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(invalid(
                "hidden_size",
                format!(
                    "{} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not divisible by num_key_value_heads {}",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        let head_dim = self.head_dim();
        if !head_dim.is_multiple_of(2) {
            return Err(invalid(
                "hidden_size",
                format!("head_dim {head_dim} must be even"),
            ));
        }
        let sec = self.mrope_section();
        if sec.len() != 3 || sec.iter().sum::<usize>() != head_dim / 2 {
            return Err(invalid(
                "mrope_section",
                format!(
                    "{sec:?} must have 3 entries summing to head_dim/2 = {}",
                    head_dim / 2
                ),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be > 0, got {}", self.rms_norm_eps),
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(invalid(
                "rope_theta",
                format!("must be > 0, got {}", self.rope_theta),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("only \"silu\" is supported, got {:?}", self.hidden_act),
            ));
        }
        let ids = [
            ("image_token_id", self.image_token_id),
            ("video_token_id", self.video_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
            ("vision_end_token_id", self.vision_end_token_id),
            ("vision_token_id", self.vision_token_id),
            ("mask_token_id", self.mask_token_id),
            ("pad_token_id", self.pad_token_id),
            ("eos_token_id", self.eos_token_id),
        ];
        for (field, id) in ids {
            if id as usize >= self.vocab_size {
                return Err(invalid(
                    field,
                    format!(
                        "{id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                ));
            }
        }
        let v = &self.vision_config;
        if !v.hidden_size.is_multiple_of(v.num_heads) {
            return Err(invalid(
                "vision_config.hidden_size",
                format!(
                    "{} is not divisible by vision_config.num_heads {}",
                    v.hidden_size, v.num_heads
                ),
            ));
        }
        let vhd = v.hidden_size / v.num_heads;
        if !vhd.is_multiple_of(4) {
            return Err(invalid(
                "vision_config.num_heads",
                format!("vision head_dim {vhd} must be a multiple of 4 (2-D rotary)"),
            ));
        }
        if !v
            .window_size
            .is_multiple_of(v.patch_size * v.spatial_merge_size)
        {
            return Err(invalid(
                "vision_config.window_size",
                format!(
                    "{} is not a multiple of patch_size*spatial_merge_size = {}",
                    v.window_size,
                    v.patch_size * v.spatial_merge_size
                ),
            ));
        }
        if let Some(&b) = v.fullatt_block_indexes.iter().find(|&&b| b >= v.depth) {
            return Err(invalid(
                "vision_config.fullatt_block_indexes",
                format!("block {b} >= depth {}", v.depth),
            ));
        }
        if v.hidden_act != "silu" {
            return Err(invalid(
                "vision_config.hidden_act",
                format!("only \"silu\" is supported, got {:?}", v.hidden_act),
            ));
        }
        Ok(())
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Pixel values per patch row: channels x temporal patch x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}
