//! Segment-restricted self-attention of the vision blocks.
//!
//! Attention never crosses a window (windowed blocks) or a frame (full-attention blocks).
//! Instead of masking an `[N, N]` score matrix, segments of equal length are stacked into
//! one batch and attended with two batched matmuls, so the work is proportional to
//! `sum(len^2)` and only a handful of kernels run per block.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::Result;

/// Upper bound on one f32 score tensor `[segments, heads, queries, keys]`. Larger groups are
/// split by segments and then by query rows, which bounds peak memory for big images at
/// the cost of a few more kernels.
const SCORE_BUDGET_BYTES: usize = 512 << 20;

/// Segments of one length, attended as one batch.
#[derive(Debug)]
struct SegmentGroup {
    len: usize,
    count: usize,
    /// First row when the segments form one contiguous run (then no gather is needed).
    start: usize,
    /// Row gather `[count * len]` (u32) when the segments are not one contiguous run.
    rows: Option<Tensor>,
}

/// How to split `N` rows into attention segments, precomputed once per forward call.
#[derive(Debug)]
pub(crate) struct SegmentPlan {
    groups: Vec<SegmentGroup>,
    /// Gather that puts the concatenated group outputs back into row order; `None` when
    /// the groups already produce rows in order.
    restore: Option<Tensor>,
}

impl SegmentPlan {
    /// Builds the plan from cumulative boundaries (`[0, ..., N]`, non-decreasing).
    pub fn new(cu: &[usize], device: &Device) -> Result<Self> {
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for pair in cu.windows(2) {
            let len = pair[1] - pair[0];
            if len > 0 {
                by_len.entry(len).or_default().push(pair[0]);
            }
        }
        let mut order: Vec<u32> = Vec::with_capacity(cu.last().copied().unwrap_or(0));
        let mut groups = Vec::with_capacity(by_len.len());
        for (len, starts) in by_len {
            let contiguous = starts
                .iter()
                .enumerate()
                .all(|(i, &s)| s == starts[0] + i * len);
            let ids: Vec<u32> = starts
                .iter()
                .flat_map(|&s| (s..s + len).map(|r| r as u32))
                .collect();
            let rows = if contiguous {
                None
            } else {
                Some(Tensor::from_vec(ids.clone(), ids.len(), device)?)
            };
            order.extend_from_slice(&ids);
            groups.push(SegmentGroup {
                len,
                count: starts.len(),
                start: starts[0],
                rows,
            });
        }
        let in_order = order.iter().enumerate().all(|(i, &r)| r as usize == i);
        let restore = if in_order {
            None
        } else {
            let mut inv = vec![0u32; order.len()];
            for (pos, &row) in order.iter().enumerate() {
                inv[row as usize] = pos as u32;
            }
            Some(Tensor::from_vec(inv, order.len(), device)?)
        };
        Ok(Self { groups, restore })
    }

    /// Attention of `q`, `k`, `v` (`[N, heads, head_dim]`) within each segment; returns
    /// `[N, heads * head_dim]` in row order.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (_, heads, head_dim) = q.dims3()?;
        let mut outs = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let gather = |t: &Tensor| -> Result<Tensor> {
                let rows = match &g.rows {
                    Some(ids) => t.contiguous()?.index_select(ids, 0)?,
                    None => t.narrow(0, g.start, g.count * g.len)?,
                };
                Ok(rows
                    .reshape((g.count, g.len, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (qg, kg, vg) = (gather(q)?, gather(k)?, gather(v)?);
            let out = attend_chunked(&qg, &kg, &vg, scale, SCORE_BUDGET_BYTES)?;
            outs.push(
                out.transpose(1, 2)?
                    .reshape((g.count * g.len, heads * head_dim))?,
            );
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(match &self.restore {
            Some(ids) => out.index_select(ids, 0)?,
            None => out,
        })
    }
}

/// Softmax attention over `[B, heads, L, head_dim]`, split so that no f32 score tensor
/// exceeds `budget` bytes.
fn attend_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let (b, heads, len, _) = q.dims4()?;
    let per_segment = heads * len * len * 4;
    if b * per_segment <= budget {
        return attend_dense(q, k, v, scale);
    }
    let mut parts = Vec::new();
    if per_segment <= budget {
        let step = budget / per_segment;
        for s in (0..b).step_by(step) {
            let n = step.min(b - s);
            parts.push(attend_dense(
                &q.narrow(0, s, n)?,
                &k.narrow(0, s, n)?,
                &v.narrow(0, s, n)?,
                scale,
            )?);
        }
        return Ok(Tensor::cat(&parts, 0)?);
    }
    let rows = (budget / (heads * len * 4)).max(1);
    for s in 0..b {
        let (ks, vs) = (k.narrow(0, s, 1)?, v.narrow(0, s, 1)?);
        let mut seg = Vec::new();
        for r in (0..len).step_by(rows) {
            let n = rows.min(len - r);
            seg.push(attend_dense(
                &q.narrow(0, s, 1)?.narrow(2, r, n)?.contiguous()?,
                &ks,
                &vs,
                scale,
            )?);
        }
        parts.push(Tensor::cat(&seg, 2)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// One batched attention; scores are scaled and normalised in f32 as the reference does.
fn attend_dense(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax_last_dim(&(scores * scale)?)?;
    Ok(probs.to_dtype(v.dtype())?.matmul(v)?)
}

/// Rotary tables for the rows in window order: `cos`/`sin` `[N, head_dim / 2]` (f32).
#[derive(Debug)]
pub(crate) struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Multi-head self-attention with a fused `qkv` projection and 2-D rotary embedding.
#[derive(Debug)]
pub(crate) struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            num_heads,
            head_dim: dim / num_heads,
        })
    }

    pub fn forward(&self, xs: &Tensor, rotary: &Rotary, plan: &SegmentPlan) -> Result<Tensor> {
        let (n, dim) = xs.dims2()?;
        let (heads, head_dim) = (self.num_heads, self.head_dim);
        let dtype = xs.dtype();
        // The fused projection is laid out [q heads | k heads | v heads].
        let qkv = self.qkv.forward(xs)?;
        // Rotating q and k together halves the kernel count; the reference rotates in f32.
        let qk = qkv
            .narrow(1, 0, 2 * dim)?
            .to_dtype(DType::F32)?
            .reshape((1, n, 2 * heads, head_dim))?
            .contiguous()?;
        let qk = candle_nn::rotary_emb::rope_thd(&qk, &rotary.cos, &rotary.sin)?
            .to_dtype(dtype)?
            .squeeze(0)?;
        let q = qk.narrow(1, 0, heads)?;
        let k = qk.narrow(1, heads, heads)?;
        let v = qkv.narrow(1, 2 * dim, dim)?.reshape((n, heads, head_dim))?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let out = plan.attend(&q, &k, &v, scale)?;
        Ok(self.proj.forward(&out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: attention within each segment done one segment at a time.
    fn per_segment(q: &Tensor, k: &Tensor, v: &Tensor, cu: &[usize]) -> Tensor {
        let (_, h, d) = q.dims3().unwrap();
        let mut outs = Vec::new();
        for p in cu.windows(2) {
            let (s, l) = (p[0], p[1] - p[0]);
            let take = |t: &Tensor| {
                t.narrow(0, s, l)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (qs, ks, vs) = (take(q), take(k), take(v));
            let sc = (qs.matmul(&ks.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&sc).unwrap();
            let o = p
                .matmul(&vs)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((l, h * d))
                .unwrap();
            outs.push(o);
        }
        Tensor::cat(&outs, 0).unwrap()
    }

    #[test]
    fn grouped_matches_per_segment() {
        let dev = Device::Cpu;
        // Mixed lengths in an interleaved order force both the gather and the restore path.
        let cu = [0, 4, 6, 10, 11, 13, 17];
        let n = 17;
        let q = Tensor::randn(0f32, 1.0, (n, 2, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (n, 2, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (n, 2, 4), &dev).unwrap();
        let plan = SegmentPlan::new(&cu, &dev).unwrap();
        assert!(plan.restore.is_some());
        let got = plan.attend(&q, &k, &v, 0.5).unwrap();
        let want = per_segment(&q, &k, &v, &cu);
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
    }

    #[test]
    fn one_run_needs_no_gather() {
        let plan = SegmentPlan::new(&[0, 8, 16], &Device::Cpu).unwrap();
        assert_eq!(plan.groups.len(), 1);
        assert!(plan.groups[0].rows.is_none());
        assert!(plan.restore.is_none());
    }

    #[test]
    fn chunking_matches_dense() {
        let dev = Device::Cpu;
        let shape = (3, 2, 8, 4);
        let q = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let dense = attend_dense(&q, &k, &v, 0.5).unwrap();
        // One segment's scores take 2*8*8*4 = 512 bytes: 1100 splits by segments, 300 by
        // query rows (4 rows per chunk).
        for budget in [1100, 300] {
            let split = attend_chunked(&q, &k, &v, 0.5, budget).unwrap();
            let diff = (&dense - split)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "budget {budget}: max diff {diff}");
        }
    }
}
