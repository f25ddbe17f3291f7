//! The sharded layers of the one model definition. Each is loaded from the full
//! checkpoint tensor narrowed to the rank's slice (the shard hint), so the same checkpoint
//! serves every degree.
//!
//! - [`ColumnParallelLinear`]: output features split; no communication, the output stays
//!   split (q/k/v heads, MLP gate/up columns, `lm_head` vocabulary rows).
//! - [`RowParallelLinear`]: input features split; the partial products are summed by an
//!   all-reduce (o_proj, down_proj).
//! - [`VocabParallelEmbedding`]: vocabulary rows split; ids outside the rank's slice look up
//!   an all-zero row, and an all-reduce assembles the embeddings. Exactly one rank
//!   contributes a non-zero row per id, so the sum is exact.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::comm::Comm;
use crate::Result;
use crate::weights::{Linear, get_sharded};

/// `y = x W^T (+ b)` with the output features `rows` of the full layer.
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear {
    inner: Linear,
}

impl ColumnParallelLinear {
    /// Loads output features `rows` of a `[out_dim, in_dim]` layer (and its bias).
    pub fn load(
        vb: &VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        rows: Range<usize>,
    ) -> Result<Self> {
        let weight = get_sharded(vb, (out_dim, in_dim), "weight", 0, rows.clone())?;
        let bias = if bias {
            Some(get_sharded(vb, out_dim, "bias", 0, rows)?)
        } else {
            None
        };
        Ok(Self {
            inner: Linear::from_parts(weight, bias)?,
        })
    }

    pub fn from_linear(inner: Linear) -> Self {
        Self { inner }
    }

    /// The rank's slices of several column-parallel layers over the same input, as one
    /// layer whose outputs are theirs side by side.
    pub fn fuse(parts: &[ColumnParallelLinear]) -> Result<Self> {
        let inner: Vec<&Linear> = parts.iter().map(|p| &p.inner).collect();
        Ok(Self {
            inner: Linear::fuse(&inner)?,
        })
    }

    /// The rank's output features of the layer (weight held `[in, out slice]`) and bias.
    pub fn linear(&self) -> &Linear {
        &self.inner
    }

    /// For changing how the weight is held ([`Linear::pack_for_host`]).
    pub fn linear_mut(&mut self) -> &mut Linear {
        &mut self.inner
    }

    /// `xs` is `[rows, in]`; the result holds this rank's output features only.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }
}

/// `y = sum over ranks (x_r W_r^T) (+ b)`: each rank holds input features `cols`.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    inner: Linear,
    /// Added once, after the reduction.
    bias: Option<Tensor>,
    comm: Arc<dyn Comm>,
}

impl RowParallelLinear {
    /// Loads input features `cols` of a `[out_dim, in_dim]` layer; the bias is whole.
    pub fn load(
        vb: &VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        cols: Range<usize>,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        let weight = get_sharded(vb, (out_dim, in_dim), "weight", 1, cols)?;
        let bias = if bias {
            Some(crate::weights::get(vb, out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            inner: Linear::from_parts(weight, None)?,
            bias,
            comm,
        })
    }

    /// The rank's input features of the layer (weight held `[in slice, out]`); the bias
    /// is in [`Self::bias`].
    pub fn linear(&self) -> &Linear {
        &self.inner
    }

    /// For changing how the weight is held ([`Linear::pack_for_host`]).
    pub fn linear_mut(&mut self) -> &mut Linear {
        &mut self.inner
    }

    /// Added once after the reduction.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn comm(&self) -> &Arc<dyn Comm> {
        &self.comm
    }

    /// `xs` is `[rows, this rank's input features]`; the result is the full output on
    /// every rank.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let partial = self.inner.forward(xs)?;
        let ys = self.comm.all_reduce_sum(&partial)?;
        Ok(match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }
}

/// Token embeddings with the vocabulary split over the ranks.
#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    /// This rank's rows followed by one all-zero row that out-of-slice ids read.
    table: Tensor,
    range: Range<usize>,
    comm: Arc<dyn Comm>,
}

impl VocabParallelEmbedding {
    /// Loads rows `range` of a `[vocab, hidden]` table.
    pub fn load(
        vb: &VarBuilder,
        vocab: usize,
        hidden: usize,
        range: Range<usize>,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        let rows = get_sharded(vb, (vocab, hidden), "weight", 0, range.clone())?;
        Self::from_rows(rows, range, comm)
    }

    fn from_rows(rows: Tensor, range: Range<usize>, comm: Arc<dyn Comm>) -> Result<Self> {
        let (_, hidden) = rows.dims2()?;
        let zero = Tensor::zeros((1, hidden), rows.dtype(), rows.device())?;
        Ok(Self {
            table: Tensor::cat(&[&rows, &zero], 0)?,
            range,
            comm,
        })
    }

    /// This rank's rows `[range.len(), hidden]` (an untied `lm_head` shares them).
    pub fn shard_weight(&self) -> Result<Tensor> {
        Ok(self.table.narrow(0, 0, self.range.len())?)
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn dtype(&self) -> DType {
        self.table.dtype()
    }

    pub fn device(&self) -> &Device {
        self.table.device()
    }

    /// Embeddings `[ids.len(), hidden]`; a collective when the vocabulary is split. Ids
    /// must be below the vocabulary size (checked by the caller).
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let zero_row = self.range.len() as u32;
        let local: Vec<u32> = ids
            .iter()
            .map(|&id| {
                let id = id as usize;
                if self.range.contains(&id) {
                    (id - self.range.start) as u32
                } else {
                    zero_row
                }
            })
            .collect();
        let idx = Tensor::from_vec(local, ids.len(), self.table.device())?;
        let part = self.table.index_select(&idx, 0)?;
        if self.comm.world_size() == 1 {
            return Ok(part);
        }
        Ok(self.comm.all_reduce_sum(&part)?)
    }
}
