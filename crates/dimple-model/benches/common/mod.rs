//! A Dimple-shaped checkpoint with random weights, for benchmarks: the real architecture
//! (GQA with q/k/v biases, SwiGLU, M-RoPE, untied `lm_head`, a vision tower) at a size that
//! a 2-core CPU runs in reasonable time. It is written to a temporary directory as
//! `config.json` + `model.safetensors` and loaded with [`DimpleModel::load`], the path
//! every real checkpoint takes.
//!
//! Shared by `dimple-model/benches/forward.rs` and `dimple-engine/benches/engine.rs` (which
//! includes this file by path). It lives in a sub-folder so that cargo does not take it for
//! a benchmark of its own.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dimple_model::DimpleModel;

/// The text decoder's shape; the vision tower is always tiny (the benchmarks feed text).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

/// hidden 512, 4 layers, 8 query / 2 kv heads (head_dim 64), intermediate 1408, vocab 8192:
/// Dimple-7B's proportions (GQA 4:1, intermediate ~2.75x hidden) scaled down ~7x in width.
pub const BENCH: Shape = Shape {
    hidden: 512,
    layers: 4,
    heads: 8,
    kv_heads: 2,
    intermediate: 1408,
    vocab: 8192,
};

/// For smoke runs (`cargo test --benches`): the same architecture, tiny.
pub const TINY: Shape = Shape {
    hidden: 64,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    intermediate: 160,
    vocab: 512,
};

impl Shape {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Text parameters (embeddings and `lm_head` included).
    pub fn text_params(&self) -> usize {
        let (h, hd) = (self.hidden, self.head_dim());
        let attn = h * self.heads * hd * 2
            + 2 * h * self.kv_heads * hd
            + (self.heads + 2 * self.kv_heads) * hd;
        let layer = attn + 3 * h * self.intermediate + 2 * h;
        self.layers * layer + 2 * self.vocab * h + h
    }

    fn config_json(&self) -> String {
        // M-RoPE sections split head_dim/2 like Dimple's [16, 24, 24] of 64.
        let half = self.head_dim() / 2;
        let t = half / 4;
        let h = (half - t) / 2;
        let w = half - t - h;
        let v = self.vocab as u32;
        serde_json::json!({
            "architectures": ["DimpleModel"],
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "mrope_section": [t, h, w],
            "tie_word_embeddings": false,
            "pad_token_id": v - 8,
            "mask_token_id": v - 7,
            "image_token_id": v - 6,
            "video_token_id": v - 5,
            "vision_start_token_id": v - 4,
            "vision_end_token_id": v - 3,
            "vision_token_id": v - 2,
            "eos_token_id": v - 1,
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 48,
                "fullatt_block_indexes": [0]
            }
        })
        .to_string()
    }

    fn tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let dev = &Device::Cpu;
        let mut t = HashMap::new();
        let mut w = |name: String, dims: &[usize]| -> candle_core::Result<()> {
            t.insert(name, Tensor::randn(0f32, 0.02, dims, dev)?);
            Ok(())
        };
        let (h, hd, i) = (self.hidden, self.head_dim(), self.intermediate);
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        w("model.embed_tokens.weight".into(), &[self.vocab, h])?;
        w("lm_head.weight".into(), &[self.vocab, h])?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, dims) in [
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.q_proj.bias", vec![q]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.k_proj.bias", vec![kv]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.bias", vec![kv]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                w(format!("{p}.{name}"), &dims)?;
            }
        }
        // The vision tower of `config_json`: hidden 32, intermediate 64, out 48, 1 block.
        let (vh, vi, vo) = (32, 64, 48);
        w("visual.patch_embed.proj.weight".into(), &[vh, 3, 2, 14, 14])?;
        for (name, dims) in [
            ("visual.blocks.0.attn.qkv.weight", vec![3 * vh, vh]),
            ("visual.blocks.0.attn.qkv.bias", vec![3 * vh]),
            ("visual.blocks.0.attn.proj.weight", vec![vh, vh]),
            ("visual.blocks.0.attn.proj.bias", vec![vh]),
            ("visual.blocks.0.mlp.gate_proj.weight", vec![vi, vh]),
            ("visual.blocks.0.mlp.gate_proj.bias", vec![vi]),
            ("visual.blocks.0.mlp.up_proj.weight", vec![vi, vh]),
            ("visual.blocks.0.mlp.up_proj.bias", vec![vi]),
            ("visual.blocks.0.mlp.down_proj.weight", vec![vh, vi]),
            ("visual.blocks.0.mlp.down_proj.bias", vec![vh]),
            ("visual.merger.mlp.0.weight", vec![4 * vh, 4 * vh]),
            ("visual.merger.mlp.0.bias", vec![4 * vh]),
            ("visual.merger.mlp.2.weight", vec![vo, 4 * vh]),
            ("visual.merger.mlp.2.bias", vec![vo]),
            ("img_projector.linear_1.weight", vec![h, vo]),
            ("img_projector.linear_1.bias", vec![h]),
            ("img_projector.linear_2.weight", vec![h, h]),
            ("img_projector.linear_2.bias", vec![h]),
        ] {
            w(name.into(), &dims)?;
        }
        // Norm weights are ones, as a freshly initialised checkpoint has them.
        let mut ones = |name: String, n: usize| -> candle_core::Result<()> {
            t.insert(name, Tensor::ones(n, DType::F32, dev)?);
            Ok(())
        };
        for l in 0..self.layers {
            ones(format!("model.layers.{l}.input_layernorm.weight"), h)?;
            ones(
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                h,
            )?;
        }
        ones("model.norm.weight".into(), h)?;
        ones("visual.blocks.0.norm1.weight".into(), vh)?;
        ones("visual.blocks.0.norm2.weight".into(), vh)?;
        ones("visual.merger.ln_q.weight".into(), vh)?;
        Ok(t)
    }
}

/// A checkpoint directory that deletes itself when dropped.
pub struct Checkpoint {
    pub dir: PathBuf,
}

impl Checkpoint {
    /// Writes a random checkpoint of `shape` (seeded by candle's global CPU generator).
    pub fn write(shape: &Shape) -> Checkpoint {
        let dir = std::env::temp_dir().join(format!(
            "dimple-bench-{}-{}",
            std::process::id(),
            shape.hidden
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        std::fs::write(dir.join("config.json"), shape.config_json()).expect("write config.json");
        let tensors = shape.tensors().expect("random tensors");
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
            .expect("write model.safetensors");
        Checkpoint { dir }
    }

    pub fn load(&self) -> DimpleModel {
        DimpleModel::load(&self.dir, DType::F32, &Device::Cpu).expect("the random checkpoint loads")
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
