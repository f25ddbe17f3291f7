//! Checkpoint loading: one `model.safetensors` or a sharded set listed by
//! `model.safetensors.index.json`, memory-mapped, converted to the dtype chosen at load.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::{ModelError, Result, cpu};

/// The safetensors files of a checkpoint directory, in a stable order.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ModelError::Io(format!("{}: {e}", index.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                ModelError::Weights(format!("{}: no `weight_map` object", index.display()))
            })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if shards.is_empty() {
            return Err(ModelError::Weights(format!(
                "{}: empty `weight_map`",
                index.display()
            )));
        }
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(ModelError::Weights(format!(
                "shard {} listed in the index is missing",
                missing.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Weights(format!(
        "{}: neither model.safetensors nor model.safetensors.index.json found",
        dir.display()
    )))
}

/// A memory-mapped variable store over the checkpoint's files.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are mapped read-only; the checkpoint must not be modified while the
    // model is loaded, which is the same contract every safetensors loader has.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|e| ModelError::Weights(e.to_string()))?;
    Ok(vb)
}

/// Fetches a tensor by its checkpoint name, turning a missing or mis-shaped tensor into an
/// error that names it.
pub fn get<S: Into<Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let full = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    if !vb.contains_tensor(name) {
        return Err(ModelError::Weights(format!(
            "missing tensor `{full}` (expected shape {shape:?})"
        )));
    }
    vb.get(shape.clone(), name).map_err(|e| {
        ModelError::Weights(format!("tensor `{full}` (expected shape {shape:?}): {e}"))
    })
}

/// Fetches the slice `range` along `dim` of the checkpoint tensor `name` (whose full shape
/// is `full`): the shard hint of a tensor-parallel layer. The whole tensor is read and the
/// slice copied out, so the full tensor lives only for the duration of this call.
pub fn get_sharded<S: Into<Shape>>(
    vb: &VarBuilder,
    full: S,
    name: &str,
    dim: usize,
    range: Range<usize>,
) -> Result<Tensor> {
    let full: Shape = full.into();
    let size = full.dims().get(dim).copied().unwrap_or(0);
    if range.end > size || range.start > range.end {
        let path = if vb.prefix().is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", vb.prefix())
        };
        return Err(ModelError::Weights(format!(
            "tensor `{path}`: shard {range:?} of dimension {dim} is outside its shape {full:?}"
        )));
    }
    let t = get(vb, full, name)?;
    if range.start == 0 && range.end == size {
        return Ok(t);
    }
    Ok(t.narrow(dim, range.start, range.len())?.contiguous()?)
}

/// A linear layer `y = x W^T (+ b)` with weights named like the checkpoint.
///
/// The weight is held transposed, `[in, out]` and contiguous: the product then reads it as
/// a column-major left operand that the CPU matrix kernels use without repacking it at
/// every call (about twice as fast for the few-row products of a decoding step); other
/// devices' kernels take either layout alike. For the host step in f32 the weight can
/// instead be held as column panels ([`Linear::pack_for_host`]): one copy either way.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Clone)]
enum LinearWeight {
    /// `[in, out]`, contiguous.
    Transposed(Tensor),
    /// Column panels for the host step's kernels.
    Panels(Arc<cpu::PanelMatrix>),
}

impl std::fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinearWeight::Transposed(t) => f.debug_tuple("Transposed").field(t).finish(),
            LinearWeight::Panels(p) => write!(f, "Panels({}x{})", p.k(), p.n()),
        }
    }
}

impl Linear {
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = get(vb, (out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(get(vb, out_dim, "bias")?)
        } else {
            None
        };
        Self::from_parts(weight, bias)
    }

    /// From a checkpoint-layout weight `[out, in]` and bias `[out]`.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: LinearWeight::Transposed(weight.t()?.contiguous()?),
            bias,
        })
    }

    /// `xs` is `[rows, in]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs.matmul(self.weight_t()?)?;
        Ok(match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }

    /// The weight transposed, `[in, out]`, contiguous; an error while it is held as panels
    /// (see [`Linear::unpack`]).
    pub fn weight_t(&self) -> Result<&Tensor> {
        match &self.weight {
            LinearWeight::Transposed(t) => Ok(t),
            LinearWeight::Panels(_) => Err(ModelError::Weights(
                "this layer's weight is packed for the host kernels; unpack it for tensor products"
                    .into(),
            )),
        }
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            LinearWeight::Transposed(t) => Ok(t.dims2()?),
            LinearWeight::Panels(p) => Ok((p.k(), p.n())),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Holds the weight as column panels when it is an f32 CPU tensor and the processor
    /// has the panel kernels (AVX-512); otherwise leaves it as it is. Returns whether the
    /// weight is packed now.
    pub fn pack_for_host(&mut self) -> Result<bool> {
        let LinearWeight::Transposed(t) = &self.weight else {
            return Ok(true);
        };
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            return Ok(false);
        }
        let (k, n) = t.dims2()?;
        let host = cpu::HostTensors::new(&[t])?;
        let Some(panels) = cpu::PanelMatrix::pack(host.slice(0)?, k, n) else {
            return Ok(false);
        };
        drop(host);
        self.weight = LinearWeight::Panels(Arc::new(panels));
        Ok(true)
    }

    /// Holds the weight as a transposed tensor again (for tensor products).
    pub fn unpack(&mut self) -> Result<()> {
        if let LinearWeight::Panels(p) = &self.weight {
            let t = Tensor::from_vec(p.unpack(), (p.k(), p.n()), &Device::Cpu)?;
            self.weight = LinearWeight::Transposed(t);
        }
        Ok(())
    }

    /// `out[m, out] = x[m, in] W^T` on the host, without the bias: `x` and `out` row-major
    /// f32. The weight must be an f32 CPU tensor or panels.
    ///
    /// Panics (a bug, not an input error) when the slices do not hold `m` rows.
    pub fn host_product(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match &self.weight {
            LinearWeight::Panels(p) => p.matmul(x, m, out),
            LinearWeight::Transposed(t) => {
                let (k, n) = t.dims2()?;
                let host = cpu::HostTensors::new(&[t])?;
                cpu::linear(x, host.slice(0)?, (m, k, n), out);
            }
        }
        Ok(())
    }

    /// One layer computing the outputs of `parts` side by side (their output features
    /// concatenated in order): one product instead of several over the same input. The
    /// parts must all have a bias or all have none.
    pub fn fuse(parts: &[&Linear]) -> Result<Self> {
        let weights = parts
            .iter()
            .map(|p| p.weight_t())
            .collect::<Result<Vec<_>>>()?;
        let weight_t = Tensor::cat(&weights, 1)?;
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            _ => {
                return Err(ModelError::Weights(
                    "fused layers must all have a bias or all have none".into(),
                ));
            }
        };
        Ok(Self {
            weight: LinearWeight::Transposed(weight_t),
            bias,
        })
    }
}

/// Root-mean-square norm computed in f32, as the reference does, then cast back.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: get(vb, dim, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let x = x.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(x.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}
