//! Padded batched attention for the tensor-op path of [`TextModel::forward`]: every
//! sequence of a step in one fixed list of kernels per layer, however many there are.
//!
//! Once per step, on the host, [`StepAttention::new`] lays the step's sequences out as a
//! padded batch (`[sequences, max_len]` queries against `[sequences, max_keys]` keys), writes
//! the index lists that move rows between that layout and the packed one (one upload for all
//! of them), builds the additive mask (one upload), and gathers the step's cached keys and
//! values (every sequence's prefix and suffix caches) into one tensor, one copy per cache.
//! Each layer then runs: rotary over the packed query and key rows, one gather each for
//! queries, keys and values (keys and values first joined to the cached ones when the step
//! has caches), one batched product for the scores, one additive mask (unless no key is
//! padded or masked), one softmax, one batched product with the values and one gather back
//! to the packed rows; in a step that keeps caches, one more gather each for the kept keys
//! and values. Kept caches leave the step whole: one tensor per cache holding every layer
//! (`KvCache`'s packed form), which the next step gathers with one copy.
//!
//! Padding changes no result. Padded keys are zero rows that the mask sets to -inf, so their
//! probabilities are exact zeros and they add exact zeros to the values' sum; padded query
//! rows are computed and never read. The key count is rounded up to [`KEY_ALIGN`], so a
//! reduction along a row of keys groups a sequence's real keys the same way alone and in any
//! batch (the CPU's vectorised sums run 32 lanes, CUDA's softmax strides 32 threads over the
//! row); the zeros that follow leave every partial sum as it was.
//!
//! [`TextModel::forward`]: crate::TextModel::forward

use candle_core::{DType, Device, Tensor};

use crate::text::{KvCache, SeqInput};
use crate::{ModelError, Result};

/// Key counts are rounded up to a multiple of this (see the module docs).
const KEY_ALIGN: usize = 32;

/// One optional cache per sequence of the step.
pub(crate) type SeqCaches = Vec<Option<KvCache>>;

/// The index of a padded row: `index_select` writes a zero row for it.
const PAD: u32 = u32::MAX;

/// The rank's attention heads (the same in every layer).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Query heads that share one kv head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Where the step's new keys (or values) lie in the rows of `head_dim` a layer gathers them
/// from: token `t`, kv head `h` is row `base + t * stride + first + h`.
#[derive(Debug, Clone, Copy)]
struct NewRows {
    base: usize,
    stride: usize,
    first: usize,
}

impl NewRows {
    fn at(&self, t: usize, h: usize) -> usize {
        self.base + t * self.stride + self.first + h
    }
}

/// A run of one sequence's new keys and values that the step returns as a cache.
#[derive(Debug)]
struct Kept {
    seq: usize,
    /// The trailing run (`keep_suffix`) rather than the leading one.
    suffix: bool,
    /// First row of the run in the layer's kept rows (its kv heads, then its positions).
    row: usize,
    len: usize,
}

/// One step's attention layout, shared by every layer.
pub(crate) struct StepAttention {
    heads: Heads,
    layers: usize,
    /// Packed new rows of the step (all sequences).
    total: usize,
    batch: usize,
    max_len: usize,
    max_keys: usize,
    /// `[kv_heads * batch * group * max_len]`: packed query rows in the padded layout.
    q_idx: Tensor,
    /// `[kv_heads * batch * max_keys]`: key rows (and value rows) in the padded layout.
    k_idx: Tensor,
    v_idx: Tensor,
    /// `[total * heads]`: the attention output rows back in packed order.
    out_idx: Tensor,
    /// The kept keys' and values' rows, all runs of all sequences; `None` when none is kept.
    keep_idx: Option<(Tensor, Tensor)>,
    kept: Vec<Kept>,
    /// `[batch, 1, max_len, max_keys]` in f32: 0 where a query may read a key, -inf
    /// elsewhere; `None` when every query reads every key (no padding anywhere).
    mask: Option<Tensor>,
    /// Every cache of the step, `[layers, 2, kv_heads * positions * head_dim]`, and its
    /// number of positions; `None` when no sequence has one.
    cached: Option<(Tensor, usize)>,
}

/// Appends `v` to the index list, failing beyond what a u32 index holds.
fn push_index(idx: &mut Vec<u32>, v: usize) -> Result<()> {
    match u32::try_from(v) {
        Ok(i) if i != PAD => {
            idx.push(i);
            Ok(())
        }
        _ => Err(ModelError::Input(format!(
            "attention row {v} does not fit a 32-bit index"
        ))),
    }
}

/// The additive mask `[sequences, max_len, max_keys]` (row-major) of a step whose sequences
/// have `lens` new tokens and `keys` keys each: -inf for padded keys and, within a sequence
/// with a key mask, where `allowed = (valid[query] && valid[key]) || key is the query's own`
/// fails; 0 elsewhere. `None` when it would be all zeros.
fn attention_mask(
    seqs: &[SeqInput<'_>],
    lens: &[usize],
    keys: &[usize],
    max_len: usize,
    max_keys: usize,
) -> Option<Vec<f32>> {
    let mut mask = vec![0f32; seqs.len() * max_len * max_keys];
    let mut masked = false;
    for (n, (s, row)) in seqs
        .iter()
        .zip(mask.chunks_exact_mut(max_len * max_keys))
        .enumerate()
    {
        let p = s.prefix.map_or(0, KvCache::len);
        for (i, row) in row.chunks_exact_mut(max_keys).enumerate() {
            row[keys[n]..].fill(f32::NEG_INFINITY);
            masked |= keys[n] < max_keys;
            // Padded query rows read every real key (they are never used; this keeps their
            // softmax finite).
            let Some(valid) = s.key_valid.filter(|_| i < lens[n]) else {
                continue;
            };
            let own = p + i;
            for (j, m) in row[..keys[n]].iter_mut().enumerate() {
                if !((valid[own] && valid[j]) || j == own) {
                    *m = f32::NEG_INFINITY;
                    masked = true;
                }
            }
        }
    }
    masked.then_some(mask)
}

impl StepAttention {
    /// The layout of `seqs` (their new-token counts in `lens`), for a model of `layers`
    /// layers with the rank's `heads`. Shapes of the caches are checked here.
    pub(crate) fn new(
        seqs: &[SeqInput<'_>],
        lens: &[usize],
        heads: Heads,
        layers: usize,
        device: &Device,
    ) -> Result<Self> {
        let Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = heads;
        if nkv == 0 || nh % nkv != 0 {
            return Err(ModelError::Input(format!(
                "{nh} query heads cannot share {nkv} kv heads"
            )));
        }
        let g = heads.group();
        let batch = seqs.len();
        let total: usize = lens.iter().sum();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let cache_len = |c: Option<&KvCache>| c.map_or(0, KvCache::len);
        let keys: Vec<usize> = seqs
            .iter()
            .zip(lens)
            .map(|(s, &l)| cache_len(s.prefix) + l + cache_len(s.suffix))
            .collect();
        let max_keys = keys.iter().copied().max().unwrap_or(0).div_ceil(KEY_ALIGN) * KEY_ALIGN;

        // The step's caches, in order, and where each one's rows start.
        let mut packed = Vec::new();
        let mut positions = 0;
        // Per sequence, the first row of its prefix and of its suffix cache.
        let mut cache_rows = Vec::with_capacity(batch);
        for (n, s) in seqs.iter().enumerate() {
            let mut at = [0; 2];
            for (c, at) in [s.prefix, s.suffix].into_iter().zip(&mut at) {
                if let Some(c) = c {
                    *at = positions * nkv;
                    positions += c.len();
                    let p = c.packed()?;
                    if p.dims() != [layers, 2, nkv, c.len(), hd] {
                        return Err(ModelError::Input(format!(
                            "sequence {n}: cache of shape {:?}, the model needs [{layers}, 2, \
                             {nkv}, {}, {hd}]",
                            p.dims(),
                            c.len()
                        )));
                    }
                    packed.push(p.reshape((layers, 2, nkv * c.len() * hd))?);
                }
            }
            cache_rows.push(at);
        }
        let cached = if packed.is_empty() {
            None
        } else {
            Some((Tensor::cat(&packed, 2)?, positions))
        };
        // The new keys and values in the layer's projections: keys in the rotated `[q | k]`
        // rows, values in the `[q | k | v]` rows. Without caches, layers gather them from
        // there; with caches, from the cached rows followed by the new `[kv_heads]` rows of
        // each token. Kept runs always come from the projections.
        let proj_k = NewRows {
            base: 0,
            stride: nh + nkv,
            first: nh,
        };
        let proj_v = NewRows {
            base: 0,
            stride: nh + 2 * nkv,
            first: nh + nkv,
        };
        let (new_k, new_v) = if cached.is_some() {
            let rows = NewRows {
                base: positions * nkv,
                stride: nkv,
                first: 0,
            };
            (rows, rows)
        } else {
            (proj_k, proj_v)
        };

        let mut starts = Vec::with_capacity(batch);
        let mut off = 0;
        for &l in lens {
            starts.push(off);
            off += l;
        }
        // Every index list in one buffer (one upload), each a range of it.
        let mut idx: Vec<u32> = Vec::new();
        for h in 0..nkv {
            for (n, &l) in lens.iter().enumerate() {
                for gi in 0..g {
                    for i in 0..max_len {
                        if i < l {
                            push_index(&mut idx, (starts[n] + i) * (nh + nkv) + h * g + gi)?;
                        } else {
                            idx.push(PAD);
                        }
                    }
                }
            }
        }
        let q_range = 0..idx.len();

        let key_rows = |idx: &mut Vec<u32>, new: NewRows| -> Result<_> {
            let from = idx.len();
            for h in 0..nkv {
                for (n, s) in seqs.iter().enumerate() {
                    let (p, l) = (cache_len(s.prefix), lens[n]);
                    for j in 0..max_keys {
                        let row = if j < p {
                            cache_rows[n][0] + h * p + j
                        } else if j < p + l {
                            new.at(starts[n] + j - p, h)
                        } else if j < keys[n] {
                            let sl = cache_len(s.suffix);
                            cache_rows[n][1] + h * sl + j - p - l
                        } else {
                            idx.push(PAD);
                            continue;
                        };
                        push_index(idx, row)?;
                    }
                }
            }
            Ok(from..idx.len())
        };
        let k_range = key_rows(&mut idx, new_k)?;
        let v_range = if cached.is_some() {
            k_range.clone()
        } else {
            key_rows(&mut idx, new_v)?
        };

        let from = idx.len();
        for (n, &l) in lens.iter().enumerate() {
            for i in 0..l {
                for h in 0..nh {
                    let (kh, gi) = (h / g, h % g);
                    push_index(&mut idx, ((kh * batch + n) * g + gi) * max_len + i)?;
                }
            }
        }
        let out_range = from..idx.len();

        // Kept runs, all sequences in one list: a run's rows are its kv heads, each over its
        // positions, so that a run is one `[kv_heads, len, head_dim]` block.
        let mut kept = Vec::new();
        let mut kept_rows = 0;
        let mut runs = Vec::new();
        for (n, s) in seqs.iter().enumerate() {
            for (suffix, len, from) in [
                (false, s.keep_prefix, starts[n]),
                (true, s.keep_suffix, starts[n] + lens[n] - s.keep_suffix),
            ] {
                if len > 0 {
                    kept.push(Kept {
                        seq: n,
                        suffix,
                        row: kept_rows,
                        len,
                    });
                    kept_rows += nkv * len;
                    runs.push((from, len));
                }
            }
        }
        let mut keep_ranges = None;
        if !runs.is_empty() {
            let mut ranges = Vec::with_capacity(2);
            for new in [proj_k, proj_v] {
                let start = idx.len();
                for &(from, len) in &runs {
                    for h in 0..nkv {
                        for t in from..from + len {
                            push_index(&mut idx, new.at(t, h))?;
                        }
                    }
                }
                ranges.push(start..idx.len());
            }
            keep_ranges = Some((ranges[0].clone(), ranges[1].clone()));
        }

        let mask = attention_mask(seqs, lens, &keys, max_len, max_keys);
        let n_idx = idx.len();
        let idx = Tensor::from_vec(idx, n_idx, device)?;
        let at = |r: std::ops::Range<usize>| idx.narrow(0, r.start, r.len());
        Ok(Self {
            heads,
            layers,
            total,
            batch,
            max_len,
            max_keys,
            q_idx: at(q_range)?,
            k_idx: at(k_range)?,
            v_idx: at(v_range)?,
            out_idx: at(out_range)?,
            keep_idx: match keep_ranges {
                Some((k, v)) => Some((at(k)?, at(v)?)),
                None => None,
            },
            kept,
            mask: match mask {
                Some(m) => Some(Tensor::from_vec(m, (batch, 1, max_len, max_keys), device)?),
                None => None,
            },
            cached,
        })
    }

    /// Attention of layer `layer` over its fused projection `qkv` (`[total, (heads + 2 *
    /// kv_heads) * head_dim]`, before rotary; `cos`, `sin`: `[total, head_dim / 2]`).
    /// Returns `[total, heads * head_dim]` and, in a step that keeps caches, the layer's kept
    /// keys and values (`[rows, head_dim]` each, for [`StepAttention::kept_caches`]).
    pub(crate) fn layer(
        &self,
        layer: usize,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = self.heads;
        let (t, b, g) = (self.total, self.batch, self.heads.group());
        let (len, keys) = (self.max_len, self.max_keys);
        // Rotary over the query and key heads of every token at once: each token is a batch
        // entry of one position, with its own cos/sin row.
        let qk = qkv
            .narrow(1, 0, (nh + nkv) * hd)?
            .contiguous()?
            .reshape((t, 1, nh + nkv, hd))?;
        let qk = candle_nn::rotary_emb::rope_thd(
            &qk,
            &cos.reshape((t, 1, hd / 2))?,
            &sin.reshape((t, 1, hd / 2))?,
        )?;
        let qk_rows = qk.reshape((t * (nh + nkv), hd))?;
        let qkv_rows = qkv.reshape((t * (nh + 2 * nkv), hd))?;
        let (k_src, v_src) = match &self.cached {
            None => (qk_rows.clone(), qkv_rows.clone()),
            Some((cached, positions)) => {
                let c = cached.get(layer)?;
                let join = |c: Tensor, new: Tensor| -> Result<Tensor> {
                    let c = c.reshape((*positions, nkv, hd))?;
                    Ok(Tensor::cat(&[&c, &new], 0)?.reshape(((positions + t) * nkv, hd))?)
                };
                (
                    join(
                        c.get(0)?,
                        qk.reshape((t, nh + nkv, hd))?.narrow(1, nh, nkv)?,
                    )?,
                    join(
                        c.get(1)?,
                        qkv.reshape((t, nh + 2 * nkv, hd))?
                            .narrow(1, nh + nkv, nkv)?,
                    )?,
                )
            }
        };
        // Query heads h read kv head h / group (local numbering; the layout keeps every
        // rank's query heads with the kv heads they read): each (kv head, sequence) is one
        // batch entry whose rows are its group's heads' queries.
        let q = qk_rows
            .index_select(&self.q_idx, 0)?
            .reshape((nkv * b, g * len, hd))?;
        let k = k_src
            .index_select(&self.k_idx, 0)?
            .reshape((nkv * b, keys, hd))?;
        let v = v_src
            .index_select(&self.v_idx, 0)?
            .reshape((nkv * b, keys, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
        if let Some(m) = &self.mask {
            scores = scores.reshape((nkv, b, g, len, keys))?.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?
            .reshape((nkv * b, g * len, keys))?;
        let out = probs.matmul(&v)?.reshape((nkv * b * g * len, hd))?;
        let out = out.index_select(&self.out_idx, 0)?.reshape((t, nh * hd))?;
        let kept = match &self.keep_idx {
            Some((ki, vi)) => Some((qk_rows.index_select(ki, 0)?, qkv_rows.index_select(vi, 0)?)),
            None => None,
        };
        Ok((out, kept))
    }

    /// Each sequence's kept prefix and suffix caches from every layer's kept rows (in layer
    /// order): one stack of all layers, then one copy per kept run so that each cache owns
    /// its memory (none when the step keeps a single run).
    pub(crate) fn kept_caches(
        &self,
        per_layer: Vec<(Tensor, Tensor)>,
    ) -> Result<(SeqCaches, SeqCaches)> {
        let mut prefix = vec![None; self.batch];
        let mut suffix = vec![None; self.batch];
        if self.kept.is_empty() {
            return Ok((prefix, suffix));
        }
        if per_layer.len() != self.layers {
            return Err(ModelError::Input(format!(
                "kept rows of {} layers, the model has {}",
                per_layer.len(),
                self.layers
            )));
        }
        let Heads {
            kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.heads;
        let rows: Vec<&Tensor> = per_layer.iter().flat_map(|(k, v)| [k, v]).collect();
        let all = Tensor::stack(&rows, 0)?; // [layers * 2, rows, head_dim]
        for run in &self.kept {
            let packed = all
                .narrow(1, run.row, nkv * run.len)?
                .contiguous()?
                .reshape((self.layers, 2, nkv, run.len, hd))?;
            let cache = Some(KvCache::from_packed(packed)?);
            if run.suffix {
                suffix[run.seq] = cache;
            } else {
                prefix[run.seq] = cache;
            }
        }
        Ok((prefix, suffix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::LogitRows;

    const HEADS: Heads = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    const LAYERS: usize = 2;

    /// Deterministic values in (-1, 1) for tensor `salt`.
    fn values(n: usize, salt: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729) as f64 * 0.618_033_988_7).sin())
            .collect()
    }

    fn tensor(shape: &[usize], salt: usize) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(values(n, salt), shape, &Device::Cpu).unwrap()
    }

    fn cache(len: usize, salt: usize) -> KvCache {
        let Heads {
            kv_heads: kv,
            head_dim: hd,
            ..
        } = HEADS;
        KvCache::new(
            (0..LAYERS)
                .map(|l| {
                    (
                        tensor(&[kv, len, hd], salt + 2 * l),
                        tensor(&[kv, len, hd], salt + 2 * l + 1),
                    )
                })
                .collect(),
        )
    }

    fn to_vec(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// One sequence's attention for layer `layer`, by the definition (f64 loops): keys are
    /// the prefix cache, the new tokens, the suffix cache; `valid` the key mask.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        layer: usize,
        qkv: &[f64],
        rows: std::ops::Range<usize>,
        prefix: Option<&KvCache>,
        suffix: Option<&KvCache>,
        valid: Option<&[bool]>,
    ) -> Vec<f64> {
        let Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = HEADS;
        let w = (nh + 2 * nkv) * hd;
        let cached = |c: Option<&KvCache>, which: usize| -> (usize, Vec<f64>) {
            c.map_or((0, Vec::new()), |c| {
                let (k, v) = &c.layers()[layer];
                (c.len(), to_vec(if which == 0 { k } else { v }))
            })
        };
        let (p, pk) = cached(prefix, 0);
        let (_, pv) = cached(prefix, 1);
        let (s, sk) = cached(suffix, 0);
        let (_, sv) = cached(suffix, 1);
        let l = rows.len();
        // Key (or value, first = nh + nkv) j of kv head h.
        let key = |first: usize, c: (&[f64], &[f64]), h: usize, j: usize| -> Vec<f64> {
            if j < p {
                c.0[(h * p + j) * hd..(h * p + j + 1) * hd].to_vec()
            } else if j < p + l {
                let at = (rows.start + j - p) * w + (first + h) * hd;
                qkv[at..at + hd].to_vec()
            } else {
                let j = j - p - l;
                c.1[(h * s + j) * hd..(h * s + j + 1) * hd].to_vec()
            }
        };
        let keys = p + l + s;
        let mut out = vec![0.0; l * nh * hd];
        for i in 0..l {
            for h in 0..nh {
                let kh = h / HEADS.group();
                let q = &qkv[(rows.start + i) * w + h * hd..][..hd];
                let mut scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let allowed = valid.is_none_or(|v| (v[p + i] && v[j]) || j == p + i);
                        if !allowed {
                            return f64::NEG_INFINITY;
                        }
                        let k = key(nh, (&pk, &sk), kh, j);
                        q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                scores.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = scores.iter().sum();
                for (j, pj) in scores.iter().enumerate() {
                    let v = key(nh + nkv, (&pv, &sv), kh, j);
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] += pj / sum * v[d];
                    }
                }
            }
        }
        out
    }

    fn input<'a>(
        len: usize,
        prefix: Option<&'a KvCache>,
        suffix: Option<&'a KvCache>,
        valid: Option<&'a [bool]>,
        keep: (usize, usize),
    ) -> SeqInput<'a> {
        SeqInput {
            embeds: Tensor::zeros((len, 1), DType::F64, &Device::Cpu).unwrap(),
            positions: &[],
            key_valid: valid,
            prefix,
            suffix,
            keep_prefix: keep.0,
            keep_suffix: keep.1,
            logit_rows: LogitRows::Range(0..0),
        }
    }

    /// Several sequences of different lengths, with and without prefix and suffix caches
    /// and key padding, against the definition; kept runs against the projection's rows.
    #[test]
    fn padded_batch_matches_each_sequence_by_the_definition() {
        let Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = HEADS;
        let (p1, s2, p2) = (cache(5, 100), cache(3, 200), cache(33, 300));
        let valid: Vec<bool> = (0..4 + 33 + 3).map(|j| j % 5 != 1).collect();
        let lens = [7, 2, 4, 1];
        let seqs = [
            input(lens[0], None, None, None, (3, 2)),
            input(lens[1], Some(&p1), None, None, (0, 0)),
            input(lens[2], Some(&p2), Some(&s2), Some(&valid), (0, 1)),
            input(lens[3], None, None, None, (1, 0)),
        ];
        let total: usize = lens.iter().sum();
        let step = StepAttention::new(&seqs, &lens, HEADS, LAYERS, &Device::Cpu).unwrap();
        assert_eq!(step.max_len, 7);
        assert_eq!(step.max_keys, 64, "33 + 4 + 3 keys, rounded up to 32");
        // Identity rotary: the definition above sees the projection's rows as they are.
        let cos = Tensor::ones((total, hd / 2), DType::F64, &Device::Cpu).unwrap();
        let sin = Tensor::zeros((total, hd / 2), DType::F64, &Device::Cpu).unwrap();
        let mut kept = Vec::new();
        for layer in 0..LAYERS {
            let qkv = tensor(&[total, (nh + 2 * nkv) * hd], 10 + layer);
            let (out, keep) = step.layer(layer, &qkv, &cos, &sin).unwrap();
            kept.push(keep.expect("the step keeps runs"));
            let (flat, got) = (to_vec(&qkv), to_vec(&out));
            let mut row = 0;
            for (n, s) in seqs.iter().enumerate() {
                let want = naive(
                    layer,
                    &flat,
                    row..row + lens[n],
                    s.prefix,
                    s.suffix,
                    s.key_valid,
                );
                let got = &got[row * nh * hd..(row + lens[n]) * nh * hd];
                for (g, w) in got.iter().zip(&want) {
                    // Scores pass through f32, as on every device.
                    assert!(
                        (g - w).abs() < 1e-5,
                        "layer {layer} sequence {n}: {g} vs {w}"
                    );
                }
                row += lens[n];
            }
        }
        let qkvs: Vec<Tensor> = (0..LAYERS)
            .map(|l| tensor(&[total, (nh + 2 * nkv) * hd], 10 + l))
            .collect();
        let (prefix, suffix) = step.kept_caches(kept).unwrap();
        let runs = [
            (0, false, 0, 3),
            (0, true, 5, 2),
            (2, true, 12, 1),
            (3, false, 13, 1),
        ];
        for (seq, is_suffix, from, len) in runs {
            let c = if is_suffix {
                &suffix[seq]
            } else {
                &prefix[seq]
            };
            let c = c.as_ref().expect("kept");
            assert_eq!(c.len(), len);
            for (l, (k, v)) in c.layers().iter().enumerate() {
                let rows = qkvs[l]
                    .narrow(0, from, len)
                    .unwrap()
                    .reshape((len, nh + 2 * nkv, hd))
                    .unwrap();
                let want = |first| rows.narrow(1, first, nkv).unwrap().transpose(0, 1).unwrap();
                assert_eq!(to_vec(k), to_vec(&want(nh)), "seq {seq} layer {l} keys");
                assert_eq!(
                    to_vec(v),
                    to_vec(&want(nh + nkv)),
                    "seq {seq} layer {l} values"
                );
            }
        }
        assert!(prefix[1].is_none() && prefix[2].is_none() && suffix[3].is_none());
    }
}
