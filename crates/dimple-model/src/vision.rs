//! The vision side of Dimple: the windowed ViT (Qwen2.5-VL style), its 2x2 patch merger
//! and the image projector that maps merged tokens into the language model's width.
//!
//! Layout: this file holds the public [`VisionModel`], [`VisionTrace`] and
//! [`ImageProjector`]; `grid` does the per-call index bookkeeping on the host (rotary
//! coordinates, window permutation, segment boundaries) and `attention` the
//! segment-restricted attention.
//!
//! Row order: the processor emits patch rows in 2x2 merge groups. Inside the tower the merge
//! groups are permuted window by window so that every window (and every frame) is a
//! contiguous run of rows; the merger output is permuted back, so callers only ever see the
//! original order.

mod attention;
mod grid;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, RmsNorm, VarBuilder};

use crate::config::VisionConfig;
use crate::{ModelError, Result};

use attention::{Rotary, SegmentPlan, VisionAttention};
use grid::GridLayout;

/// RMSNorm epsilon of every vision norm (hard-coded in the reference, not in the config).
const NORM_EPS: f64 = 1e-6;
/// Base of the vision rotary embedding (hard-coded in the reference).
const ROPE_THETA: f32 = 10_000.0;

/// SiLU-gated feed-forward with biases.
#[derive(Debug)]
struct VisionMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl VisionMlp {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: candle_nn::linear(dim, hidden, vb.pp("gate_proj"))?,
            up_proj: candle_nn::linear(dim, hidden, vb.pp("up_proj"))?,
            down_proj: candle_nn::linear(hidden, dim, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        let up = self.up_proj.forward(xs)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}

/// Pre-norm transformer block.
#[derive(Debug)]
struct VisionBlock {
    norm1: RmsNorm,
    norm2: RmsNorm,
    attn: VisionAttention,
    mlp: VisionMlp,
}

impl VisionBlock {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.hidden_size;
        Ok(Self {
            norm1: candle_nn::rms_norm(dim, NORM_EPS, vb.pp("norm1"))?,
            norm2: candle_nn::rms_norm(dim, NORM_EPS, vb.pp("norm2"))?,
            attn: VisionAttention::new(dim, cfg.num_heads, vb.pp("attn"))?,
            mlp: VisionMlp::new(dim, cfg.intermediate_size, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, rotary: &Rotary, plan: &SegmentPlan) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, rotary, plan)?)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&xs)?)?;
        Ok((xs + mlp)?)
    }
}

/// Normalises each patch, concatenates the patches of a merge group and maps them through
/// Linear -> GELU (erf) -> Linear.
#[derive(Debug)]
struct PatchMerger {
    ln_q: RmsNorm,
    fc1: Linear,
    fc2: Linear,
    group_dim: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let group_dim = cfg.hidden_size * unit;
        Ok(Self {
            ln_q: candle_nn::rms_norm(cfg.hidden_size, NORM_EPS, vb.pp("ln_q"))?,
            fc1: candle_nn::linear(group_dim, group_dim, vb.pp("mlp").pp("0"))?,
            fc2: candle_nn::linear(group_dim, cfg.out_hidden_size, vb.pp("mlp").pp("2"))?,
            group_dim,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, dim) = xs.dims2()?;
        let xs = self
            .ln_q
            .forward(xs)?
            .reshape((n * dim / self.group_dim, self.group_dim))?;
        let xs = self.fc1.forward(&xs)?.gelu_erf()?;
        Ok(self.fc2.forward(&xs)?)
    }
}

/// Intermediate tensors of one vision forward, named after the golden reference hooks.
#[derive(Debug, Clone)]
pub struct VisionTrace {
    /// Rotary angles `[N, head_dim / 2]` (f32), original patch order.
    pub rot_pos_emb_freqs: Tensor,
    /// Merge-group permutation into window order.
    pub window_index: Vec<usize>,
    /// Window boundaries in patch rows (window order), without repeats.
    pub cu_window_seqlens: Vec<usize>,
    /// Frame boundaries in patch rows.
    pub cu_seqlens: Vec<usize>,
    /// `[N, hidden]`, original patch order.
    pub patch_embed_out: Tensor,
    /// Output of each block `[N, hidden]`, window-permuted order.
    pub block_outs: Vec<Tensor>,
    /// `[N / merge^2, out_hidden]`, window-permuted order.
    pub merger_out_window_order: Tensor,
    /// `[N / merge^2, out_hidden]`, original order (what [`VisionModel::forward`] returns).
    pub output: Tensor,
}

/// What one forward pass produces besides the per-block outputs.
struct Run {
    output: Tensor,
    merged: Tensor,
    embedded: Tensor,
    /// Rotary angles `[N, head_dim / 2]`, original patch order.
    freqs: Vec<f32>,
    layout: GridLayout,
}

/// The vision tower: patch embedding, windowed/full attention blocks and the patch merger.
#[derive(Debug)]
pub struct VisionModel {
    /// The Conv3d patch embedding as a linear map over flattened patches (kernel = stride).
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    /// Per block: attend over the whole frame instead of within windows.
    full_attention: Vec<bool>,
    merger: PatchMerger,
    patch_dim: usize,
    head_dim: usize,
    merge: usize,
    /// Window side in merged tokens.
    window: usize,
    dtype: DType,
    device: Device,
}

impl VisionModel {
    /// Loads the tower; `vb` points at the checkpoint's `visual` prefix.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let cfg_err = |field: &str, msg: String| {
            ModelError::Config(format!("`vision_config.{field}`: {msg}"))
        };
        if cfg.num_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_heads)
            || !cfg.head_dim().is_multiple_of(4)
        {
            return Err(cfg_err(
                "num_heads",
                format!(
                    "hidden_size {} / num_heads {} must be a multiple of 4",
                    cfg.hidden_size, cfg.num_heads
                ),
            ));
        }
        let merged_patch = cfg.spatial_merge_size * cfg.patch_size;
        if merged_patch == 0
            || cfg.window_size < merged_patch
            || !cfg.window_size.is_multiple_of(merged_patch)
        {
            return Err(cfg_err(
                "window_size",
                format!(
                    "{} must be a positive multiple of patch_size*spatial_merge_size = {merged_patch}",
                    cfg.window_size
                ),
            ));
        }
        if let Some(&b) = cfg.fullatt_block_indexes.iter().find(|&&b| b >= cfg.depth) {
            return Err(cfg_err(
                "fullatt_block_indexes",
                format!("block {b} >= depth {}", cfg.depth),
            ));
        }
        let (hidden, patch_dim) = (cfg.hidden_size, cfg.patch_dim());
        let w = vb.pp("patch_embed").pp("proj").get(
            vec![
                hidden,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
            "weight",
        )?;
        let patch_embed = Linear::new(w.reshape((hidden, patch_dim))?, None);
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let full_attention = (0..cfg.depth)
            .map(|i| cfg.fullatt_block_indexes.contains(&i))
            .collect();
        Ok(Self {
            patch_embed,
            blocks,
            full_attention,
            merger: PatchMerger::new(cfg, vb.pp("merger"))?,
            patch_dim,
            head_dim: cfg.head_dim(),
            merge: cfg.spatial_merge_size,
            window: cfg.window_size / merged_patch,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Merged image tokens `[N / merge^2, out_hidden_size]` for the patch rows of one or more
    /// images (rows concatenated in image order, `grid_thw` one `[t, h, w]` per image).
    pub fn forward(&self, pixel_values: &Tensor, grid_thw: &[[usize; 3]]) -> Result<Tensor> {
        Ok(self.run(pixel_values, grid_thw, None)?.output)
    }

    /// Like [`VisionModel::forward`], also returning every intermediate (for parity tests).
    pub fn forward_traced(
        &self,
        pixel_values: &Tensor,
        grid_thw: &[[usize; 3]],
    ) -> Result<VisionTrace> {
        let mut block_outs = Vec::with_capacity(self.blocks.len());
        let run = self.run(pixel_values, grid_thw, Some(&mut block_outs))?;
        let (n, half) = (run.layout.positions.len(), self.head_dim / 2);
        Ok(VisionTrace {
            rot_pos_emb_freqs: Tensor::from_vec(run.freqs, (n, half), &self.device)?,
            window_index: run.layout.window_index,
            cu_window_seqlens: run.layout.cu_window_seqlens,
            cu_seqlens: run.layout.cu_seqlens,
            patch_embed_out: run.embedded,
            block_outs,
            merger_out_window_order: run.merged,
            output: run.output,
        })
    }

    fn validate(&self, pixel_values: &Tensor, grid_thw: &[[usize; 3]]) -> Result<usize> {
        let (rows, cols) = match *pixel_values.dims() {
            [r, c] => (r, c),
            ref d => {
                return Err(ModelError::Input(format!(
                    "`pixel_values` must be 2-D [patches, {}], got shape {d:?}",
                    self.patch_dim
                )));
            }
        };
        if cols != self.patch_dim {
            return Err(ModelError::Input(format!(
                "`pixel_values` rows must have {} values, got {cols}",
                self.patch_dim
            )));
        }
        if grid_thw.is_empty() {
            return Err(ModelError::Input(
                "`image_grid_thw` must name at least one image".into(),
            ));
        }
        let mut total = 0usize;
        for (i, &[t, h, w]) in grid_thw.iter().enumerate() {
            if t == 0
                || h == 0
                || w == 0
                || !h.is_multiple_of(self.merge)
                || !w.is_multiple_of(self.merge)
            {
                return Err(ModelError::Input(format!(
                    "`image_grid_thw[{i}]` = [{t}, {h}, {w}]: t must be positive and h, w positive multiples of spatial_merge_size {}",
                    self.merge
                )));
            }
            total = total
                .checked_add(t.saturating_mul(h).saturating_mul(w))
                .ok_or_else(|| {
                    ModelError::Input("`image_grid_thw` patch count overflows".into())
                })?;
        }
        if total != rows {
            return Err(ModelError::Input(format!(
                "`image_grid_thw` covers {total} patches but `pixel_values` has {rows} rows"
            )));
        }
        Ok(rows)
    }

    /// The forward pass; pushes each block output into `block_outs` when given.
    fn run(
        &self,
        pixel_values: &Tensor,
        grid_thw: &[[usize; 3]],
        mut block_outs: Option<&mut Vec<Tensor>>,
    ) -> Result<Run> {
        let n = self.validate(pixel_values, grid_thw)?;
        let unit = self.merge * self.merge;
        let layout = GridLayout::new(grid_thw, self.merge, self.window);
        let dev = &self.device;

        let half = self.head_dim / 2;
        let inv_freq = grid::rotary_inv_freq(half, ROPE_THETA);
        let freqs = grid::rotary_freqs(&layout.positions, &inv_freq);
        let perm = layout.patch_permutation(unit);
        // The rotary angles travel with their patches into window order.
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for &row in &perm {
            let f = &freqs[row as usize * half..(row as usize + 1) * half];
            cos.extend(f.iter().map(|a| a.cos()));
            sin.extend(f.iter().map(|a| a.sin()));
        }
        let rotary = Rotary {
            cos: Tensor::from_vec(cos, (n, half), dev)?,
            sin: Tensor::from_vec(sin, (n, half), dev)?,
        };
        let window_plan = SegmentPlan::new(&layout.cu_window_seqlens, dev)?;
        let frame_plan = SegmentPlan::new(&layout.cu_seqlens, dev)?;
        let perm = Tensor::from_vec(perm, n, dev)?;
        let inverse = Tensor::from_vec(layout.inverse_window_index(), n / unit, dev)?;

        let xs = pixel_values.to_device(dev)?.to_dtype(self.dtype)?;
        let embedded = self.patch_embed.forward(&xs)?;
        let mut xs = embedded.index_select(&perm, 0)?;
        for (block, &full) in self.blocks.iter().zip(&self.full_attention) {
            let plan = if full { &frame_plan } else { &window_plan };
            xs = block.forward(&xs, &rotary, plan)?;
            if let Some(outs) = block_outs.as_deref_mut() {
                outs.push(xs.clone());
            }
        }
        let merged = self.merger.forward(&xs)?;
        let output = merged.index_select(&inverse, 0)?;
        Ok(Run {
            output,
            merged,
            embedded,
            freqs,
            layout,
        })
    }
}

/// Maps merged vision tokens to the language model width: Linear -> SiLU -> Linear.
#[derive(Debug)]
pub struct ImageProjector {
    linear_1: Linear,
    linear_2: Linear,
}

impl ImageProjector {
    /// `in_dim` is the vision `out_hidden_size`, `hidden` the text `hidden_size`; `vb`
    /// points at the checkpoint's `img_projector` prefix.
    pub fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, hidden, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(hidden, hidden, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.linear_1.forward(xs)?.silu()?;
        Ok(self.linear_2.forward(&xs)?)
    }
}
