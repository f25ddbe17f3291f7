//! The bidirectional decoder: embeddings, M-RoPE, grouped-query attention with q/k/v
//! biases, SwiGLU MLP, RMSNorm, final norm and an untied `lm_head`.
//!
//! One forward call runs several independent sequences: every linear layer works on all
//! their tokens packed into one matrix, attention runs per sequence against that sequence's
//! own cached prefix and suffix (if any): on the host kernels sequence by sequence, on the
//! tensor-op path (GPU, and CPU in f16/bf16) as one padded batch (`crate::attention`). A
//! sequence's result does not depend on what it shares the call with.
//!
//! The same definition serves every tensor-parallel degree (see `crate::tp`): a rank holds
//! its query heads, its kv heads (split, or replicated beyond their number), its MLP
//! columns and its vocabulary slice, and its prefix caches hold only its kv heads. With a
//! group of one nothing is communicated and every layer holds the whole tensor.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::attention::{Heads, StepAttention};
use crate::cpu::{
    self, HeadLayout, HostTensors, SeqKeys, add_bias, rms_norm, rope_in_place, silu_mul,
};
use crate::tp::{
    ColumnParallelLinear, Comm, RowParallelLinear, Shard, SingleComm, TpLayout,
    VocabParallelEmbedding,
};
use crate::weights::{Linear, RmsNorm};
use crate::{DimpleConfig, ModelError, Result};

/// Keys and values of a sequence's cached prefix (or suffix), per layer, each `[kv_heads,
/// len, head_dim]` (keys after rotary embedding; under tensor parallelism, the rank's kv
/// heads only).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// The same keys and values as one tensor `[layers, 2, kv_heads, len, head_dim]` of
    /// which `layers` are views, when the tensor-op path kept them: a step then gathers a
    /// cache with one copy rather than one per layer.
    packed: Option<Tensor>,
}

impl KvCache {
    /// A cache from each layer's `(keys, values)`, `[kv_heads, len, head_dim]` each.
    pub fn new(layers: Vec<(Tensor, Tensor)>) -> Self {
        Self {
            layers,
            packed: None,
        }
    }

    /// A cache held in one `[layers, 2, kv_heads, len, head_dim]` tensor.
    pub(crate) fn from_packed(packed: Tensor) -> Result<Self> {
        let n = packed.dims().first().copied().unwrap_or(0);
        let layers = (0..n)
            .map(|l| {
                let kv = packed.get(l)?;
                Ok((kv.get(0)?, kv.get(1)?))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            layers,
            packed: Some(packed),
        })
    }

    /// Each layer's `(keys, values)`, `[kv_heads, len, head_dim]` each.
    pub fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// All layers in one `[layers, 2, kv_heads, len, head_dim]` tensor (stacked now when the
    /// cache was not kept that way).
    pub(crate) fn packed(&self) -> Result<Tensor> {
        if let Some(p) = &self.packed {
            return Ok(p.clone());
        }
        let flat: Vec<&Tensor> = self.layers.iter().flat_map(|(k, v)| [k, v]).collect();
        let (kv, len, hd) = match self.layers.first() {
            Some((k, _)) => k.dims3()?,
            None => {
                return Err(ModelError::Input("a cache without layers".into()));
            }
        };
        Ok(Tensor::stack(&flat, 0)?.reshape((self.layers.len(), 2, kv, len, hd))?)
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// Bytes a prefix cache of `len` positions takes for this configuration and dtype.
pub fn kv_cache_bytes(cfg: &DimpleConfig, len: usize, dtype: DType) -> usize {
    kv_cache_bytes_per_rank(cfg, len, dtype, 1)
}

/// Bytes one rank of a group of `world` holds for a prefix cache of `len` positions: its
/// share of the kv heads (one head when they are replicated).
pub fn kv_cache_bytes_per_rank(
    cfg: &DimpleConfig,
    len: usize,
    dtype: DType,
    world: usize,
) -> usize {
    let nkv = cfg.num_kv_heads();
    let local = nkv / world.clamp(1, nkv);
    2 * cfg.num_hidden_layers * local * cfg.head_dim() * len * dtype.size_in_bytes()
}

/// Which rows of a sequence's new tokens get logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitRows {
    /// A contiguous run of rows.
    Range(Range<usize>),
    /// These rows, in this order (a step scores only its masked slots).
    List(Vec<usize>),
}

impl LogitRows {
    pub fn len(&self) -> usize {
        match self {
            Self::Range(r) => r.len(),
            Self::List(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the largest row, 0 when empty.
    fn end(&self) -> usize {
        match self {
            Self::Range(r) if r.is_empty() => 0,
            Self::Range(r) => r.end,
            Self::List(v) => v.iter().max().map_or(0, |m| m + 1),
        }
    }

    fn rows(&self) -> Vec<usize> {
        match self {
            Self::Range(r) => r.clone().collect(),
            Self::List(v) => v.clone(),
        }
    }
}

impl From<Range<usize>> for LogitRows {
    fn from(r: Range<usize>) -> Self {
        Self::Range(r)
    }
}

impl From<Vec<usize>> for LogitRows {
    fn from(v: Vec<usize>) -> Self {
        Self::List(v)
    }
}

/// One sequence of a packed forward call.
pub struct SeqInput<'a> {
    /// Input embeddings of the new tokens, `[len, hidden]` (images already placed).
    pub embeds: Tensor,
    /// Position ids (t, h, w) of the new tokens.
    pub positions: &'a [[i64; 3]],
    /// Which keys (cached prefix first, then the new tokens, then the cached suffix) are
    /// real rather than padding. `None`: all real. A padded query attends only to itself.
    pub key_valid: Option<&'a [bool]>,
    /// Cached keys/values the new tokens attend to, placed before them.
    pub prefix: Option<&'a KvCache>,
    /// Cached keys/values placed after the new tokens: the later part of a sequence whose
    /// middle alone is recomputed (block-wise decoding with a dual cache).
    pub suffix: Option<&'a KvCache>,
    /// Return the keys/values of this many leading new tokens as a cache (0: none).
    pub keep_prefix: usize,
    /// Return the keys/values of this many trailing new tokens as a second cache (0: none).
    pub keep_suffix: usize,
    /// Rows of the new tokens whose logits are wanted.
    pub logit_rows: LogitRows,
}

/// Result for one sequence.
pub struct SeqOutput {
    /// `[rows, vocab]` in f32 for the requested rows (unshifted). Under tensor parallelism,
    /// only the rank's vocabulary slice ([`TextModel::vocab_range`]); see
    /// [`TextModel::gather_vocab`].
    pub logits: Tensor,
    /// The kept leading keys/values (`keep_prefix`).
    pub cache: Option<KvCache>,
    /// The kept trailing keys/values (`keep_suffix`).
    pub suffix_cache: Option<KvCache>,
}

struct Rope {
    inv_freq: Vec<f32>,
    /// For each of the head_dim/2 frequencies, which position component (t, h, w) drives it.
    component: Vec<usize>,
    /// cos and sin of `p * inv_freq[j]` for every position component value `p` below
    /// [`ROPE_TABLE_POSITIONS`], `head_dim/2` values per `p`: a step looks its rows up
    /// instead of evaluating them again (the same f32 expressions, so the same values).
    cos_by_pos: Vec<f32>,
    sin_by_pos: Vec<f32>,
}

/// Position values whose rotary rows are tabulated at load (beyond: computed per step).
const ROPE_TABLE_POSITIONS: usize = 8192;

impl Rope {
    fn new(cfg: &DimpleConfig) -> Self {
        let hd = cfg.head_dim();
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|k| 1.0 / base.powf((2 * k) as f32 / hd as f32))
            .collect();
        let mut component = Vec::with_capacity(hd / 2);
        for (c, &n) in cfg.mrope_section().iter().enumerate() {
            component.extend(std::iter::repeat_n(c, n));
        }
        let tabulated = cfg.max_position_embeddings.clamp(1, ROPE_TABLE_POSITIONS);
        let half = inv_freq.len();
        let mut cos_by_pos = Vec::with_capacity(tabulated * half);
        let mut sin_by_pos = Vec::with_capacity(tabulated * half);
        for p in 0..tabulated {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos_by_pos.push(angle.cos());
                sin_by_pos.push(angle.sin());
            }
        }
        Self {
            inv_freq,
            component,
            cos_by_pos,
            sin_by_pos,
        }
    }

    /// cos and sin, `head_dim/2` values per position each, in f32 on the host.
    fn host_tables(&self, positions: &[[i64; 3]]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let tabulated = (self.cos_by_pos.len() / half.max(1)) as i64;
        for p in positions {
            for j in 0..half {
                let v = p[self.component[j]];
                if (0..tabulated).contains(&v) {
                    let at = v as usize * half + j;
                    cos.push(self.cos_by_pos[at]);
                    sin.push(self.sin_by_pos[at]);
                } else {
                    let angle = v as f32 * self.inv_freq[j];
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }

    /// cos and sin, `[len, head_dim/2]` each (the second half of a rotary row repeats the first).
    fn tables(
        &self,
        positions: &[[i64; 3]],
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = self.host_tables(positions);
        let cos = Tensor::from_vec(cos, (positions.len(), half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions.len(), half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Each sequence's logits rows (packed in `logits`, in sequence order) and kept caches, from
/// each layer's kept keys/values per sequence.
fn split_outputs(
    seqs: &[SeqInput<'_>],
    logits: &Tensor,
    caches: Vec<Vec<(Tensor, Tensor)>>,
    suffix_caches: Vec<Vec<(Tensor, Tensor)>>,
) -> Result<Vec<SeqOutput>> {
    let kept =
        |keep: usize, layers: Vec<(Tensor, Tensor)>| (keep > 0).then(|| KvCache::new(layers));
    let prefix = seqs.iter().zip(caches).map(|(s, l)| kept(s.keep_prefix, l));
    let suffix = seqs
        .iter()
        .zip(suffix_caches)
        .map(|(s, l)| kept(s.keep_suffix, l));
    outputs(seqs, logits, prefix.collect(), suffix.collect())
}

/// Each sequence's logits rows (packed in `logits`, in sequence order) and kept caches.
fn outputs(
    seqs: &[SeqInput<'_>],
    logits: &Tensor,
    caches: Vec<Option<KvCache>>,
    suffix_caches: Vec<Option<KvCache>>,
) -> Result<Vec<SeqOutput>> {
    let mut out = Vec::with_capacity(seqs.len());
    let mut off = 0;
    for ((s, cache), suffix_cache) in seqs.iter().zip(caches).zip(suffix_caches) {
        let r = s.logit_rows.len();
        out.push(SeqOutput {
            logits: logits.narrow(0, off, r)?,
            cache,
            suffix_cache,
        });
        off += r;
    }
    Ok(out)
}

/// Attention over the rank's heads (all of them in a group of one).
struct Attention {
    /// q, k and v fused into one projection: output columns `[q heads | k heads | v heads]`.
    qkv: ColumnParallelLinear,
    o: RowParallelLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    /// gate and up fused into one projection: output columns `[gate | up]`.
    gate_up: ColumnParallelLinear,
    /// The rank's MLP columns.
    inter: usize,
    down: RowParallelLinear,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(xs)?;
        let g = candle_nn::ops::silu(&gu.narrow(1, 0, self.inter)?)?;
        self.down
            .forward(&(g * gu.narrow(1, self.inter, self.inter)?)?)
    }
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// The host step's row buffers, kept from one pass to the next so that a step neither
/// maps fresh pages nor zeroes them. Each is sized to the largest recent step and given
/// back when a step needs under a quarter of it.
#[derive(Default)]
struct HostScratch {
    xs: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    proj: Vec<f32>,
}

/// `len` values of `buf` (their content is whatever the last pass left: every use writes
/// before it reads).
fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() > 4 * len + (1 << 16) {
        *buf = Vec::new();
    }
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// The language model of Dimple (one rank's shard of it).
pub struct TextModel {
    embed: VocabParallelEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// The rows of the rank's vocabulary slice.
    lm_head: ColumnParallelLinear,
    rope: Rope,
    cfg: DimpleConfig,
    layout: TpLayout,
    comm: Arc<dyn Comm>,
    device: Device,
    dtype: DType,
    /// Whether a CPU f32 pass runs the host kernels (`crate::cpu`; the default) rather than
    /// the tensor-op path every other device and dtype runs.
    host_kernels: bool,
    scratch: std::sync::Mutex<HostScratch>,
}

impl TextModel {
    /// The whole model (a group of one). `vb` is the checkpoint root (names `model.*` and
    /// `lm_head.*`).
    pub fn new(cfg: &DimpleConfig, vb: &VarBuilder) -> Result<Self> {
        Self::new_sharded(cfg, vb, Arc::new(SingleComm))
    }

    /// This rank's shard, for the rank and group of `comm`: every sharded tensor is loaded
    /// from the full checkpoint tensor narrowed to the rank's slice.
    pub fn new_sharded(cfg: &DimpleConfig, vb: &VarBuilder, comm: Arc<dyn Comm>) -> Result<Self> {
        let layout = TpLayout::new(cfg, comm.rank(), comm.world_size())?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let heads = |s: Shard, n: usize| {
            let r = s.range(n);
            r.start * hd..r.end * hd
        };
        let (q_rows, kv_rows) = (heads(layout.q, nh), heads(layout.kv, nkv));
        let mlp_cols = layout.mlp.range(cfg.intermediate_size);
        let vocab = layout.vocab_range(cfg.vocab_size);
        let m = vb.pp("model");
        let embed = VocabParallelEmbedding::load(
            &m.pp("embed_tokens"),
            cfg.vocab_size,
            h,
            vocab.clone(),
            comm.clone(),
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let p = l.pp("mlp");
            let inter = cfg.intermediate_size;
            let q = ColumnParallelLinear::load(&a.pp("q_proj"), h, nh * hd, true, q_rows.clone())?;
            let k =
                ColumnParallelLinear::load(&a.pp("k_proj"), h, nkv * hd, true, kv_rows.clone())?;
            let v =
                ColumnParallelLinear::load(&a.pp("v_proj"), h, nkv * hd, true, kv_rows.clone())?;
            let gate =
                ColumnParallelLinear::load(&p.pp("gate_proj"), h, inter, false, mlp_cols.clone())?;
            let up =
                ColumnParallelLinear::load(&p.pp("up_proj"), h, inter, false, mlp_cols.clone())?;
            layers.push(Layer {
                attn: Attention {
                    qkv: ColumnParallelLinear::fuse(&[q, k, v])?,
                    o: RowParallelLinear::load(
                        &a.pp("o_proj"),
                        nh * hd,
                        h,
                        false,
                        q_rows.clone(),
                        comm.clone(),
                    )?,
                    heads: layout.heads,
                    kv_heads: layout.kv_heads,
                    head_dim: hd,
                },
                mlp: Mlp {
                    gate_up: ColumnParallelLinear::fuse(&[gate, up])?,
                    inter: mlp_cols.len(),
                    down: RowParallelLinear::load(
                        &p.pp("down_proj"),
                        inter,
                        h,
                        false,
                        mlp_cols.clone(),
                        comm.clone(),
                    )?,
                },
                input_norm: RmsNorm::load(&l.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                post_norm: RmsNorm::load(&l.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            });
        }
        let norm = RmsNorm::load(&m.pp("norm"), h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            ColumnParallelLinear::from_linear(Linear::from_parts(embed.shard_weight()?, None)?)
        } else {
            ColumnParallelLinear::load(&vb.pp("lm_head"), h, cfg.vocab_size, false, vocab)?
        };
        let mut model = Self {
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            cfg: cfg.clone(),
            layout,
            comm,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            host_kernels: false,
            scratch: Default::default(),
        };
        model.set_host_kernels(true)?;
        Ok(model)
    }

    /// Runs CPU f32 passes on the host kernels (`true`, the default) or on the tensor-op
    /// path that serves every other device and dtype (`false`: to check that path against
    /// them on a machine without a GPU). The host kernels hold the decoder's weights as
    /// column panels where the processor has the kernels for them; the tensor-op path
    /// holds them as tensors (the layers are repacked, not copied).
    pub fn set_host_kernels(&mut self, on: bool) -> Result<()> {
        let host = on && self.host_capable();
        for linear in self.linears_mut() {
            if host {
                linear.pack_for_host()?;
            } else {
                linear.unpack()?;
            }
        }
        self.host_kernels = on;
        Ok(())
    }

    /// Whether passes run on the host kernels (CPU, f32, not switched off): their logits
    /// are host memory. Otherwise they run on the tensor-op path and stay on the device.
    pub fn runs_host_kernels(&self) -> bool {
        self.host_capable() && self.host_kernels
    }

    /// The host kernels exist for this model's device and dtype (CPU, f32).
    fn host_capable(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    /// Every linear layer of the decoder, `lm_head` included.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    l.attn.qkv.linear_mut(),
                    l.attn.o.linear_mut(),
                    l.mlp.gate_up.linear_mut(),
                    l.mlp.down.linear_mut(),
                ]
            })
            .chain(std::iter::once(self.lm_head.linear_mut()))
    }

    /// The rank's place in its group and the slices it holds.
    pub fn layout(&self) -> &TpLayout {
        &self.layout
    }

    pub fn comm(&self) -> &Arc<dyn Comm> {
        &self.comm
    }

    /// The vocabulary ids whose logits this rank's [`SeqOutput::logits`] hold, in order.
    pub fn vocab_range(&self) -> Range<usize> {
        self.layout.vocab_range(self.cfg.vocab_size)
    }

    /// The full-vocabulary logits from every rank's slice (a collective: every rank of the
    /// group must call it with the same number of rows).
    pub fn gather_vocab(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(self.comm.all_gather(logits, 1)?)
    }

    pub fn config(&self) -> &DimpleConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Rotary inverse frequencies (for checks against the reference).
    pub fn rope_inv_freq(&self) -> &[f32] {
        &self.rope.inv_freq
    }

    /// cos and sin of the full rotary row (`head_dim` values) that position component
    /// `component` (0 = t, 1 = h, 2 = w) alone would give, before the M-RoPE section
    /// selection: the reference's intermediate, exposed for checks.
    pub fn rope_component_tables(
        &self,
        positions: &[[i64; 3]],
        component: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let half = self.rope.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * half);
        let mut sin = Vec::with_capacity(positions.len() * 2 * half);
        for p in positions {
            for d in 0..2 * half {
                let angle = p[component] as f32 * self.rope.inv_freq[d % half];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }

    /// Token embeddings `[len, hidden]`; ids outside the vocabulary are an error (caught
    /// before any communication, so every rank of a group fails alike).
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )));
        }
        self.embed.forward(ids)
    }

    /// Runs the packed forward pass. With `trace`, the hidden states after the embeddings,
    /// after each layer but the last, and after the final norm are pushed (packed rows).
    pub fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Vec<SeqOutput>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut lens = Vec::with_capacity(seqs.len());
        let mut all_pos = Vec::new();
        for (n, s) in seqs.iter().enumerate() {
            let (len, h) = s.embeds.dims2()?;
            if h != self.cfg.hidden_size || len != s.positions.len() || len == 0 {
                return Err(ModelError::Input(format!(
                    "sequence {n}: embeds {:?} with {} positions (hidden {})",
                    s.embeds.dims(),
                    s.positions.len(),
                    self.cfg.hidden_size
                )));
            }
            let prefix = s.prefix.map_or(0, KvCache::len);
            let suffix = s.suffix.map_or(0, KvCache::len);
            if let Some(kv) = s.key_valid
                && kv.len() != prefix + len + suffix
            {
                return Err(ModelError::Input(format!(
                    "sequence {n}: key mask has {} entries, expected {}",
                    kv.len(),
                    prefix + len + suffix
                )));
            }
            if s.logit_rows.end() > len || s.keep_prefix + s.keep_suffix > len {
                return Err(ModelError::Input(format!(
                    "sequence {n}: logit rows or kept prefix and suffix beyond {len} tokens"
                )));
            }
            for c in [s.prefix, s.suffix].into_iter().flatten() {
                if c.layers.len() != self.layers.len() {
                    return Err(ModelError::Input(format!(
                        "sequence {n}: cache has {} layers",
                        c.layers.len()
                    )));
                }
            }
            lens.push(len);
            all_pos.extend_from_slice(s.positions);
        }
        if self.runs_host_kernels() {
            return self.forward_host(seqs, &lens, &all_pos, trace);
        }
        let embeds: Vec<Tensor> = seqs
            .iter()
            .map(|s| s.embeds.to_dtype(self.dtype))
            .collect::<candle_core::Result<_>>()?;
        let mut xs = Tensor::cat(&embeds, 0)?;
        let (cos, sin) = self.rope.tables(&all_pos, &self.device, self.dtype)?;
        // Everything attention needs to know about the step's sequences, on the device
        // before the first layer: no layer waits on the host.
        let heads = Heads {
            heads: self.layout.heads,
            kv_heads: self.layout.kv_heads,
            head_dim: self.cfg.head_dim(),
        };
        let step = StepAttention::new(seqs, &lens, heads, self.layers.len(), &self.device)?;
        let mut kept = Vec::new();

        if let Some(t) = trace.as_deref_mut() {
            t.push(xs.clone());
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let qkv = a.qkv.forward(&layer.input_norm.forward(&xs)?)?;
            let (att, keep) = step.layer(li, &qkv, &cos, &sin)?;
            kept.extend(keep);
            xs = (xs + a.o.forward(&att)?)?;
            let mlp = layer.mlp.forward(&layer.post_norm.forward(&xs)?)?;
            xs = (xs + mlp)?;
            if li + 1 < self.layers.len()
                && let Some(t) = trace.as_deref_mut()
            {
                t.push(xs.clone());
            }
        }
        let xs = self.norm.forward(&xs)?;
        if let Some(t) = trace {
            t.push(xs.clone());
        }
        let mut rows: Vec<u32> = Vec::new();
        let mut off = 0;
        for (n, s) in seqs.iter().enumerate() {
            rows.extend(s.logit_rows.rows().into_iter().map(|r| (off + r) as u32));
            off += lens[n];
        }
        let logits = if rows.is_empty() {
            Tensor::zeros((0, self.vocab_range().len()), DType::F32, &self.device)?
        } else {
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, &self.device)?;
            self.lm_head
                .forward(&xs.index_select(&idx, 0)?)?
                .to_dtype(DType::F32)?
        };
        let (caches, suffix_caches) = step.kept_caches(kept)?;
        outputs(seqs, &logits, caches, suffix_caches)
    }

    /// [`TextModel::forward`] in f32 on the CPU, over reused host buffers (see `crate::cpu`).
    fn forward_host(
        &self,
        seqs: &[SeqInput<'_>],
        lens: &[usize],
        all_pos: &[[i64; 3]],
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Vec<SeqOutput>> {
        let h = self.cfg.hidden_size;
        let total: usize = lens.iter().sum();
        let Some(first) = self.layers.first() else {
            return Err(ModelError::Input("the model has no layers".into()));
        };
        let lay = HeadLayout {
            heads: first.attn.heads,
            kv_heads: first.attn.kv_heads,
            hd: first.attn.head_dim,
        };
        let (qw, ow, inter) = (lay.qkv_width(), lay.heads * lay.hd, first.mlp.inter);
        // Each sequence's embeddings copied once, straight into the packed rows.
        let embeds: Vec<Tensor> = seqs
            .iter()
            .map(|s| s.embeds.to_dtype(DType::F32)?.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let mut bufs = match self.scratch.lock() {
            Ok(mut kept) => std::mem::take(&mut *kept),
            Err(_) => HostScratch::default(),
        };
        let xs = scratch(&mut bufs.xs, total * h);
        {
            let host = HostTensors::new(&embeds.iter().collect::<Vec<_>>())?;
            let mut at = 0;
            for i in 0..embeds.len() {
                let e = host.slice(i)?;
                xs[at..at + e.len()].copy_from_slice(e);
                at += e.len();
            }
        }
        drop(embeds);
        let (cos, sin) = self.rope.host_tables(all_pos);
        let mut rows = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for &len in lens {
            rows.push(off);
            off += len;
        }
        let normed = scratch(&mut bufs.normed, total * h);
        let qkv = scratch(&mut bufs.qkv, total * qw);
        let att = scratch(&mut bufs.att, total * ow);
        let gu = scratch(&mut bufs.gu, total * 2 * inter);
        let act = scratch(&mut bufs.act, total * inter);
        let proj = scratch(&mut bufs.proj, total * h);
        let host_trace = |xs: &[f32]| Tensor::from_slice(xs, (total, h), &Device::Cpu);
        if let Some(t) = trace.as_deref_mut() {
            t.push(host_trace(xs)?);
        }
        let mut caches: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(); seqs.len()];
        let mut suffix_caches: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(); seqs.len()];
        // Only the rows that are scored reach the `lm_head`; after the last layer's keys
        // and values, only they are carried on (unless every row's state is traced).
        let picked: Vec<usize> = seqs
            .iter()
            .zip(&rows)
            .flat_map(|(s, &base)| s.logit_rows.rows().into_iter().map(move |r| base + r))
            .collect();
        let prune = trace.is_none();
        let mut cur = total;
        for (li, layer) in self.layers.iter().enumerate() {
            let narrow = prune && li + 1 == self.layers.len();
            let a = &layer.attn;
            let m = &layer.mlp;
            let mut tensors = vec![layer.input_norm.weight(), layer.post_norm.weight()];
            let qkv_bias = a.qkv.linear().bias().map(|b| {
                tensors.push(b);
                tensors.len() - 1
            });
            // Every sequence's cached keys and values of this layer.
            let mut prefix_at = vec![None; seqs.len()];
            for (n, s) in seqs.iter().enumerate() {
                if let Some(p) = s.prefix {
                    let (k, v) = &p.layers[li];
                    tensors.push(k);
                    tensors.push(v);
                    prefix_at[n] = Some((tensors.len() - 2, p.len()));
                }
            }
            let mut suffix_at = vec![None; seqs.len()];
            for (n, s) in seqs.iter().enumerate() {
                if let Some(p) = s.suffix {
                    let (k, v) = &p.layers[li];
                    tensors.push(k);
                    tensors.push(v);
                    suffix_at[n] = Some((tensors.len() - 2, p.len()));
                }
            }
            let host = HostTensors::new(&tensors)?;
            rms_norm(xs, host.slice(0)?, layer.input_norm.eps(), normed);
            a.qkv.linear().host_product(normed, total, qkv)?;
            if let Some(b) = qkv_bias {
                add_bias(qkv, host.slice(b)?);
            }
            rope_in_place(qkv, qw, 0, lay.heads, lay.hd, &cos, &sin);
            rope_in_place(qkv, qw, ow, lay.kv_heads, lay.hd, &cos, &sin);
            let mut keys = Vec::with_capacity(seqs.len());
            for (n, s) in seqs.iter().enumerate() {
                if s.keep_prefix > 0 {
                    caches[n].push(self.host_cache(qkv, lay, rows[n], s.keep_prefix)?);
                }
                if s.keep_suffix > 0 {
                    let from = rows[n] + lens[n] - s.keep_suffix;
                    suffix_caches[n].push(self.host_cache(qkv, lay, from, s.keep_suffix)?);
                }
                let prefix = match prefix_at[n] {
                    Some((i, _)) => Some((host.slice(i)?, host.slice(i + 1)?)),
                    None => None,
                };
                let suffix = match suffix_at[n] {
                    Some((i, _)) => Some((host.slice(i)?, host.slice(i + 1)?)),
                    None => None,
                };
                keys.push(SeqKeys {
                    row: rows[n],
                    len: lens[n],
                    prefix,
                    prefix_len: prefix_at[n].map_or(0, |(_, l)| l),
                    suffix,
                    suffix_len: suffix_at[n].map_or(0, |(_, l)| l),
                    key_valid: s.key_valid,
                });
            }
            cpu::attention(qkv, lay, &keys, att)?;
            drop(keys);
            if narrow {
                // The last layer's remaining work only for the scored rows, in their order:
                // every other row's output would be thrown away. (Attention above still ran
                // for every row: its kernels' rounding depends on how many query rows share
                // a block, and a row's value must not depend on which rows are scored.)
                cur = picked.len();
                let gather = |src: &[f32], w: usize| -> Vec<f32> {
                    picked
                        .iter()
                        .flat_map(|&r| src[r * w..(r + 1) * w].iter().copied())
                        .collect()
                };
                let picked_xs = gather(xs, h);
                xs[..cur * h].copy_from_slice(&picked_xs);
                let picked_att = gather(att, ow);
                att[..cur * ow].copy_from_slice(&picked_att);
            }
            a.o.linear()
                .host_product(&att[..cur * ow], cur, &mut proj[..cur * h])?;
            self.reduce_rows(&a.o, &mut proj[..cur * h], cur)?;
            for (x, p) in xs[..cur * h].iter_mut().zip(&proj[..cur * h]) {
                *x += p;
            }
            rms_norm(
                &xs[..cur * h],
                host.slice(1)?,
                layer.post_norm.eps(),
                &mut normed[..cur * h],
            );
            m.gate_up
                .linear()
                .host_product(&normed[..cur * h], cur, &mut gu[..cur * 2 * inter])?;
            silu_mul(&gu[..cur * 2 * inter], inter, &mut act[..cur * inter]);
            m.down
                .linear()
                .host_product(&act[..cur * inter], cur, &mut proj[..cur * h])?;
            self.reduce_rows(&m.down, &mut proj[..cur * h], cur)?;
            for (x, p) in xs[..cur * h].iter_mut().zip(&proj[..cur * h]) {
                *x += p;
            }
            if li + 1 < self.layers.len()
                && let Some(t) = trace.as_deref_mut()
            {
                t.push(host_trace(xs)?);
            }
        }
        let norm = HostTensors::new(&[self.norm.weight()])?;
        rms_norm(
            &xs[..cur * h],
            norm.slice(0)?,
            self.norm.eps(),
            &mut normed[..cur * h],
        );
        if let Some(t) = trace {
            t.push(host_trace(normed)?);
        }
        let gathered: Vec<f32>;
        let lm_in: &[f32] = if cur == picked.len() && prune {
            &normed[..cur * h]
        } else {
            gathered = picked
                .iter()
                .flat_map(|&r| normed[r * h..(r + 1) * h].iter().copied())
                .collect();
            &gathered
        };
        let lm = self.lm_head.linear();
        let vocab = lm.dims()?.1;
        let mut logits = vec![0f32; picked.len() * vocab];
        lm.host_product(lm_in, picked.len(), &mut logits)?;
        if let Some(b) = lm.bias() {
            let host = HostTensors::new(&[b])?;
            add_bias(&mut logits, host.slice(0)?);
        }
        if let Ok(mut kept) = self.scratch.lock() {
            *kept = bufs;
        }
        let logits = Tensor::from_vec(logits, (picked.len(), vocab), &Device::Cpu)?;
        split_outputs(seqs, &logits, caches, suffix_caches)
    }

    /// Keys and values `[kv_heads, keep, hd]` of the `keep` packed rows from `row` on
    /// (keys after rotary).
    fn host_cache(
        &self,
        qkv: &[f32],
        lay: HeadLayout,
        row: usize,
        keep: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (w, hd) = (lay.qkv_width(), lay.hd);
        let mut k = Vec::with_capacity(lay.kv_heads * keep * hd);
        let mut v = Vec::with_capacity(lay.kv_heads * keep * hd);
        for (first, dst) in [(lay.heads, &mut k), (lay.heads + lay.kv_heads, &mut v)] {
            for head in 0..lay.kv_heads {
                for r in row..row + keep {
                    let at = r * w + (first + head) * hd;
                    dst.extend_from_slice(&qkv[at..at + hd]);
                }
            }
        }
        let shape = (lay.kv_heads, keep, hd);
        Ok((
            Tensor::from_vec(k, shape, &Device::Cpu)?,
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        ))
    }

    /// Completes a row-parallel product held in `partial` (`[rows, hidden]`): the sum over
    /// the group's ranks, then the layer's bias.
    fn reduce_rows(
        &self,
        layer: &RowParallelLinear,
        partial: &mut [f32],
        rows: usize,
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        if layer.comm().world_size() > 1 {
            let t = Tensor::from_slice(partial, (rows, h), &Device::Cpu)?;
            let sum: Vec<f32> = layer.comm().all_reduce_sum(&t)?.flatten_all()?.to_vec1()?;
            partial.copy_from_slice(&sum);
        }
        if let Some(b) = layer.bias() {
            let host = HostTensors::new(&[b])?;
            add_bias(partial, host.slice(0)?);
        }
        Ok(())
    }
}
