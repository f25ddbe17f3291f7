//! Host kernels for the decoder's packed forward pass in f32 on the CPU.
//!
//! The generic tensor path allocates a fresh tensor for every intermediate, copies the
//! cached prefix next to the new keys in every layer, and materialises each sequence's
//! whole score matrix three times. On the CPU the step instead runs over a few reused
//! row-major buffers: one fused q/k/v projection, rotary applied in place, attention that
//! reads the prefix cache and the new keys where they lie (query rows in blocks, so no
//! sequence's full score matrix exists at once), one fused gate/up projection, and the
//! `lm_head` only over the rows that are scored.
//!
//! Every matrix product goes through `gemm` (AVX-512 kernels where the processor has them,
//! chosen at run time). Work is spread over the current rayon pool: large products split
//! inside `gemm`, attention splits over (sequence, head) pairs. Each output element is
//! computed the same way whatever else shares the step, so a sequence's result does not
//! depend on its batch.

use std::ops::Deref;

use candle_core::{Layout, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::{ModelError, Result};

/// Read access to the f32 data of CPU tensors, held for as long as this value lives.
pub(crate) struct HostTensors<'a> {
    guards: Vec<(Box<dyn Deref<Target = Storage> + 'a>, &'a Layout)>,
}

impl<'a> HostTensors<'a> {
    /// Locks the storage of every tensor for reading; each must be a contiguous f32 CPU
    /// tensor.
    pub fn new(tensors: &[&'a Tensor]) -> Result<Self> {
        let guards: Vec<(Box<dyn Deref<Target = Storage> + 'a>, &'a Layout)> = tensors
            .iter()
            .map(|t| {
                let (g, l) = t.storage_and_layout();
                (Box::new(g) as Box<dyn Deref<Target = Storage>>, l)
            })
            .collect();
        for (g, l) in &guards {
            if !matches!(&***g, Storage::Cpu(_)) || !l.is_contiguous() {
                return Err(ModelError::Input(
                    "the CPU kernels need contiguous host tensors".into(),
                ));
            }
        }
        Ok(Self { guards })
    }

    /// The data of the `i`-th tensor given to [`HostTensors::new`].
    pub fn slice(&self, i: usize) -> Result<&[f32]> {
        let (g, l) = &self.guards[i];
        let Storage::Cpu(c) = &***g else {
            return Err(ModelError::Input("not a CPU tensor".into()));
        };
        let all = c.as_slice::<f32>()?;
        let start = l.start_offset();
        Ok(&all[start..start + l.shape().elem_count()])
    }
}

/// How many threads the large products may use: the current rayon pool.
fn parallelism(work: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    // Below a few MFLOP the hand-off costs more than it saves.
    if threads > 1 && work >= 1 << 21 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// A row-major matrix view: `rows` rows of `cols` values, consecutive rows `stride` apart.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

/// `out[m, n] (+)= x[m, k] * w[k, n]` with `w` a layer's transposed weight: row-major
/// `x` and `out` at the given strides, contiguous `w`. `accumulate` adds to what `out`
/// holds.
///
/// Panics (a bug, not an input error) when a view reaches outside its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    x: &[f32],
    xm: Mat,
    w: &[f32],
    wm: Mat,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
    par: bool,
) {
    let (k, n) = (xm.cols, wm.cols);
    assert_eq!(wm.rows, k, "inner dimensions differ");
    assert!(
        wm.rows * wm.stride <= w.len() && wm.cols <= wm.stride,
        "rhs outside its data"
    );
    gemm_into(
        x,
        xm,
        w.as_ptr(),
        (wm.stride as isize, 1),
        n,
        out,
        out_stride,
        accumulate,
        par,
    );
}

/// `out[m, n] (+)= x[m, k] * w[n, k]^T` (`w` rows at stride `wm.stride`): a product against
/// keys stored one per row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_t(
    x: &[f32],
    xm: Mat,
    w: &[f32],
    wm: Mat,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
    par: bool,
) {
    let (k, n) = (xm.cols, wm.rows);
    assert_eq!(wm.cols, k, "inner dimensions differ");
    if n > 0 {
        assert!(
            wm.stride * (n - 1) + k <= w.len(),
            "rhs view outside its data"
        );
    }
    gemm_into(
        x,
        xm,
        w.as_ptr(),
        (1, wm.stride as isize),
        n,
        out,
        out_stride,
        accumulate,
        par,
    );
}

/// The shared body of the products: `rhs` addresses element (kk, j) at
/// `kk * rhs_strides.0 + j * rhs_strides.1` (checked by the callers).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    x: &[f32],
    xm: Mat,
    rhs: *const f32,
    rhs_strides: (isize, isize),
    n: usize,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
    par: bool,
) {
    let (m, k) = (xm.rows, xm.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        xm.stride * (m - 1) + k <= x.len(),
        "lhs view outside its data"
    );
    assert!(
        out_stride * (m - 1) + n <= out.len(),
        "destination outside its data"
    );
    let parallelism = if par {
        parallelism(m * n * k)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts here and in the callers keep every element the views address
    // inside their slices; `out` is borrowed mutably and does not alias the operands.
    unsafe {
        gemm_raw(
            (x.as_ptr(), xm.stride),
            rhs,
            rhs_strides,
            (out.as_mut_ptr(), out_stride),
            (m, n, k),
            accumulate,
            parallelism,
        );
    }
}

/// The one call into `gemm`: `out[m, n] (+)= x[m, k] * rhs[k, n]`, `x` and `out` row-major
/// at their row strides, `rhs` element (kk, j) at `kk * rhs_strides.0 + j * rhs_strides.1`.
///
/// # Safety
/// Every element those views address must lie inside live allocations, and the `out`
/// region must not be read or written by anything else during the call.
unsafe fn gemm_raw(
    (x, x_stride): (*const f32, usize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    (out, out_stride): (*mut f32, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            accumulate,
            x,
            1,
            x_stride as isize,
            rhs,
            rhs_strides.1,
            rhs_strides.0,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out[m, n] (+)= p[m, k] * v[k, n]` (`v` row-major with row stride `v_stride`).
#[allow(clippy::too_many_arguments)]
fn matmul_nn(
    p: &[f32],
    pm: Mat,
    v: &[f32],
    v_stride: usize,
    n: usize,
    out: *mut f32,
    out_stride: usize,
    accumulate: bool,
) {
    let (m, k) = (pm.rows, pm.cols);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        pm.stride * (m - 1) + k <= p.len(),
        "lhs view outside its data"
    );
    assert!(
        v_stride * (k - 1) + n <= v.len(),
        "rhs view outside its data"
    );
    // SAFETY: the views stay inside `p` and `v` (asserted); the caller guarantees `out`
    // addresses `m` rows of `n` values `out_stride` apart that nothing else touches.
    unsafe {
        gemm_raw(
            (p.as_ptr(), pm.stride),
            v.as_ptr(),
            (v_stride as isize, 1),
            (out, out_stride),
            (m, n, k),
            accumulate,
            Parallelism::None,
        );
    }
}

/// Adds `bias` to every row of `xs` (`cols` wide).
pub(crate) fn add_bias(xs: &mut [f32], bias: &[f32]) {
    for row in xs.chunks_exact_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
}

/// Root-mean-square norm of each row of `xs` into `out`: `x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(xs: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let h = weight.len();
    out.par_chunks_mut(h)
        .zip(xs.par_chunks(h))
        .with_min_len(16)
        .for_each(|(o, x)| {
            let sum: f32 = x.iter().map(|v| v * v).sum();
            let mean = sum / h as f32;
            let inv = (mean + eps as f32).sqrt().recip();
            for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
                *o = (x * inv) * w;
            }
        });
}

/// Rotary embedding in place on `heads` consecutive heads of `hd` values starting at
/// column `col` of each row; `cos`/`sin` hold `hd/2` values per row.
pub(crate) fn rope_in_place(
    xs: &mut [f32],
    row_stride: usize,
    col: usize,
    heads: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = hd / 2;
    xs.par_chunks_mut(row_stride)
        .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
        .with_min_len(16)
        .for_each(|(row, (c, s))| {
            for h in 0..heads {
                let x = &mut row[col + h * hd..col + (h + 1) * hd];
                let (a, b) = x.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x1 * s[i] + x2 * c[i];
                }
            }
        });
}

/// `out[r, i] = silu(gu[r, i]) * gu[r, inter + i]` for a fused gate/up row `[gate | up]`.
pub(crate) fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    out.par_chunks_mut(inter)
        .zip(gu.par_chunks(2 * inter))
        .with_min_len(16)
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(inter);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = (g / (1.0 + (-g).exp())) * u;
            }
        });
}

/// Where one sequence's keys and values are for one layer.
pub(crate) struct SeqKeys<'a> {
    /// First packed row of the sequence's new tokens and their number.
    pub row: usize,
    pub len: usize,
    /// The cached prefix `[kv_heads, prefix, hd]` (keys then values), if any.
    pub prefix: Option<(&'a [f32], &'a [f32])>,
    pub prefix_len: usize,
    /// Cached keys/values placed after the new tokens `[kv_heads, suffix, hd]`, if any.
    pub suffix: Option<(&'a [f32], &'a [f32])>,
    pub suffix_len: usize,
    /// Which keys (prefix first, then the new tokens, then the suffix) are real; `None`:
    /// all.
    pub key_valid: Option<&'a [bool]>,
}

/// Head counts and the packed q/k/v row layout `[q heads | k heads | v heads]`.
#[derive(Clone, Copy)]
pub(crate) struct HeadLayout {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
}

impl HeadLayout {
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.hd
    }
}

/// Query rows per block: bounds the scores held at once to `BLOCK x keys` per task.
const BLOCK: usize = 64;

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output regions to parallel tasks (see `attention`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Attention of every sequence's new tokens over its prefix, its own new tokens and its
/// suffix, per head, into `out` (`[rows, heads * hd]`). `qkv` holds the packed projections with rotary
/// already applied to q and k.
pub(crate) fn attention(
    qkv: &[f32],
    lay: HeadLayout,
    seqs: &[SeqKeys<'_>],
    out: &mut [f32],
) -> Result<()> {
    let w = lay.qkv_width();
    let (nh, nkv, hd) = (lay.heads, lay.kv_heads, lay.hd);
    let group = nh / nkv.max(1);
    let ow = nh * hd;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    for s in seqs {
        if (s.row + s.len) * ow > out.len() || (s.row + s.len) * w > qkv.len() {
            return Err(ModelError::Input("attention rows outside the step".into()));
        }
        if let Some((k, v)) = s.prefix {
            if k.len() != nkv * s.prefix_len * hd || v.len() != k.len() {
                return Err(ModelError::Input("prefix cache of the wrong size".into()));
            }
        }
        if let Some((k, v)) = s.suffix {
            if k.len() != nkv * s.suffix_len * hd || v.len() != k.len() {
                return Err(ModelError::Input("suffix cache of the wrong size".into()));
            }
        }
        if s.key_valid
            .is_some_and(|kv| kv.len() != s.prefix_len + s.len + s.suffix_len)
        {
            return Err(ModelError::Input("key mask of the wrong size".into()));
        }
    }
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..nh).flat_map(move |h| (0..s.len.div_ceil(BLOCK)).map(move |b| (si, h, b)))
        })
        .collect();
    let dst = SendPtr(out.as_mut_ptr());
    tasks.into_par_iter().for_each(|(si, h, b)| {
        let s = &seqs[si];
        let kvh = h / group;
        let q0 = b * BLOCK;
        let rows = BLOCK.min(s.len - q0);
        let keys = s.prefix_len + s.len + s.suffix_len;
        let mut scores = vec![0f32; rows * keys];
        let q = &qkv[(s.row + q0) * w + h * hd..];
        let qm = Mat {
            rows,
            cols: hd,
            stride: w,
        };
        // Scores against the cached prefix, then against the new keys.
        if let Some((pk, _)) = s.prefix {
            let k = &pk[kvh * s.prefix_len * hd..(kvh + 1) * s.prefix_len * hd];
            let km = Mat {
                rows: s.prefix_len,
                cols: hd,
                stride: hd,
            };
            matmul_t(q, qm, k, km, &mut scores, keys, false, false);
        }
        let k = &qkv[s.row * w + (nh + kvh) * hd..];
        let km = Mat {
            rows: s.len,
            cols: hd,
            stride: w,
        };
        matmul_t(
            q,
            qm,
            k,
            km,
            &mut scores[s.prefix_len..],
            keys,
            false,
            false,
        );
        if let Some((sk, _)) = s.suffix {
            let k = &sk[kvh * s.suffix_len * hd..(kvh + 1) * s.suffix_len * hd];
            let km = Mat {
                rows: s.suffix_len,
                cols: hd,
                stride: hd,
            };
            matmul_t(
                q,
                qm,
                k,
                km,
                &mut scores[s.prefix_len + s.len..],
                keys,
                false,
                false,
            );
        }
        for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
            let qi = s.prefix_len + q0 + i;
            let mut max = f32::NEG_INFINITY;
            for (j, x) in row.iter_mut().enumerate() {
                let allowed = match s.key_valid {
                    None => true,
                    Some(valid) => (valid[qi] && valid[j]) || j == qi,
                };
                *x = if allowed {
                    *x * scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(*x);
            }
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            for x in row.iter_mut() {
                *x /= sum;
            }
        }
        let pm = Mat {
            rows,
            cols: keys,
            stride: keys,
        };
        // SAFETY: task (s, h, b) writes rows `s.row + q0 ..+ rows`, columns `h*hd ..+ hd`
        // of `out`: disjoint from every other task's region, inside `out` (checked above).
        let o = unsafe { dst.get().add((s.row + q0) * ow + h * hd) };
        let mut acc = false;
        if let Some((_, pv)) = s.prefix {
            let v = &pv[kvh * s.prefix_len * hd..(kvh + 1) * s.prefix_len * hd];
            let p = Mat {
                cols: s.prefix_len,
                ..pm
            };
            matmul_nn(&scores, p, v, hd, hd, o, ow, false);
            acc = s.prefix_len > 0;
        }
        let v = &qkv[s.row * w + (nh + nkv + kvh) * hd..];
        let p = Mat {
            rows,
            cols: s.len,
            stride: keys,
        };
        matmul_nn(&scores[s.prefix_len..], p, v, w, hd, o, ow, acc);
        if let Some((_, sv)) = s.suffix {
            let v = &sv[kvh * s.suffix_len * hd..(kvh + 1) * s.suffix_len * hd];
            let p = Mat {
                rows,
                cols: s.suffix_len,
                stride: keys,
            };
            matmul_nn(&scores[s.prefix_len + s.len..], p, v, hd, hd, o, ow, true);
        }
    });
    Ok(())
}
