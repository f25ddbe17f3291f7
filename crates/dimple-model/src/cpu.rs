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
//! The layers' products run on [`PanelMatrix`] weights (packed once at load, AVX-512) where
//! the processor has AVX-512, and through `gemm` elsewhere; attention's products always go
//! through `gemm` (its AVX-512 kernels chosen at run time). Work is spread over the current
//! rayon pool: products split over (column panel, block of rows) tasks or inside `gemm`,
//! attention over (sequence, head) pairs. Each output element is
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

/// `out[m, n] = x[m, k] * w[k, n]`: a linear layer on `m` packed rows, `w` its transposed
/// weight; all three contiguous and row-major. Large products split over the current pool.
///
/// Panics (a bug, not an input error) when a slice is shorter than its shape.
pub(crate) fn linear(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), out: &mut [f32]) {
    assert_eq!(w.len(), k * n, "weight of the wrong size");
    let xm = Mat {
        rows: m,
        cols: k,
        stride: k,
    };
    gemm_into(x, xm, w.as_ptr(), (n as isize, 1), n, out, n, true);
}

/// `out[m, n] = x[m, k] * w[n, k]^T` (`w` rows at stride `wm.stride`) on the calling
/// thread: a product against keys stored one per row.
fn matmul_t(x: &[f32], xm: Mat, w: &[f32], wm: Mat, out: &mut [f32], out_stride: usize) {
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
        false,
    );
}

/// The shared body of the products, `out = x * rhs`: `rhs` addresses element (kk, j) at
/// `kk * rhs_strides.0 + j * rhs_strides.1` (checked by the callers); `par` lets large
/// products split over the current pool.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    x: &[f32],
    xm: Mat,
    rhs: *const f32,
    rhs_strides: (isize, isize),
    n: usize,
    out: &mut [f32],
    out_stride: usize,
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
            false,
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
            for (o, &g) in o.iter_mut().zip(g) {
                *o = -g;
            }
            exp_in_place(o);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = (g / (1.0 + *o)) * u;
            }
        });
}

/// Whether the processor has AVX-512F (the panel products' and the exponential's kernels).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x = e^x` for every value, rounded to the nearest f32 (computed in f64: the result is
/// the correctly rounded one except, rarely, a value within 2^-30 of a tie). Sixteen
/// values at a time where the processor has AVX-512; `f32::exp` elsewhere.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available (checked just above).
        unsafe { exp_avx512(xs) };
        return;
    }
    for x in xs {
        *x = x.exp();
    }
}

/// [`exp_in_place`] on AVX-512: `2^n * e^r` with `n = round(x / ln 2)`, `r = x - n ln 2`
/// (two-part ln 2, `|r| <= 0.35`) and `e^r` by its Taylor polynomial to degree 11 (relative
/// error below 1e-14), all in f64.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: AVX-512F is available (this function's contract); `c` holds 16 values.
        unsafe { exp16(c.as_mut_ptr()) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0f32; 16];
        buf[..rest.len()].copy_from_slice(rest);
        // SAFETY: as above, on a buffer of 16.
        unsafe { exp16(buf.as_mut_ptr()) };
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

/// The 16 values at `p`, in place.
///
/// # Safety
/// AVX-512F must be available; `p` must address 16 readable and writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp16(p: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: two unaligned loads and stores of 8 inside the 16 values of the contract.
    unsafe {
        let a = exp8(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
        let b = exp8(_mm512_cvtps_pd(_mm256_loadu_ps(p.add(8))));
        _mm256_storeu_ps(p, a);
        _mm256_storeu_ps(p.add(8), b);
    }
}

/// e^x of eight f64 values, rounded to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp8(x: std::arch::x86_64::__m512d) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // 1/k! for k = 11 down to 0.
    const TAYLOR: [f64; 12] = [
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with its low 32 bits zero so that n * LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = std::f64::consts::LN_2 - LN2_HI;
    // Out of [-110, 90] e^x is 0 or infinity in f32 (clamped, so n stays small); NaN stays
    // NaN.
    let nan = _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(x, x);
    let c = _mm512_min_pd(
        _mm512_max_pd(x, _mm512_set1_pd(-110.0)),
        _mm512_set1_pd(90.0),
    );
    let n = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_pd(c, _mm512_set1_pd(std::f64::consts::LOG2_E)),
    );
    let r = _mm512_fmadd_pd(
        n,
        _mm512_set1_pd(-LN2_LO),
        _mm512_fmadd_pd(n, _mm512_set1_pd(-LN2_HI), c),
    );
    let mut p = _mm512_set1_pd(TAYLOR[0]);
    for &k in &TAYLOR[1..] {
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(k));
    }
    let y = _mm512_mask_blend_pd(nan, _mm512_scalef_pd(p, n), x);
    _mm512_cvtpd_ps(y)
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
        if let Some((k, v)) = s.prefix
            && (k.len() != nkv * s.prefix_len * hd || v.len() != k.len())
        {
            return Err(ModelError::Input("prefix cache of the wrong size".into()));
        }
        if let Some((k, v)) = s.suffix
            && (k.len() != nkv * s.suffix_len * hd || v.len() != k.len())
        {
            return Err(ModelError::Input("suffix cache of the wrong size".into()));
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
            matmul_t(q, qm, k, km, &mut scores, keys);
        }
        let k = &qkv[s.row * w + (nh + kvh) * hd..];
        let km = Mat {
            rows: s.len,
            cols: hd,
            stride: w,
        };
        matmul_t(q, qm, k, km, &mut scores[s.prefix_len..], keys);
        if let Some((sk, _)) = s.suffix {
            let k = &sk[kvh * s.suffix_len * hd..(kvh + 1) * s.suffix_len * hd];
            let km = Mat {
                rows: s.suffix_len,
                cols: hd,
                stride: hd,
            };
            matmul_t(q, qm, k, km, &mut scores[s.prefix_len + s.len..], keys);
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
            for x in row.iter_mut() {
                *x -= max;
            }
            exp_in_place(row);
            let mut sum = 0f32;
            for x in row.iter() {
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

/// Columns per panel of a [`PanelMatrix`].
const PANEL: usize = 64;
/// Rows of `x` per register tile of the panel kernel.
const TILE_ROWS: usize = 6;
/// Rows per parallel task (8 tiles): with one panel, the unit of work the pool shares out.
const TASK_ROWS: usize = 8 * TILE_ROWS;
/// Fewest tasks one thread takes at a time.
const MIN_TASKS: usize = 4;

/// A `[k, n]` weight stored as column panels `[n / 64][k][64]` (the last panel padded with
/// zeros): the layout the host step's products read, laid out once at load.
///
/// `gemm` packs both operands at every call: with the few hundred rows of a decoding step
/// that packing is a tenth of the step, and against the 32768-wide `lm_head` its
/// page-strided reads cost more than the arithmetic. Here each panel is streamed from
/// memory as it lies and each row of `x` is read in place. Each output element is one
/// fused multiply-add chain over `k` in order, started from zero: the same value `gemm`
/// gives while `k` fits in one of its depth blocks (at least 512), and the same value
/// whatever rows share the product.
pub(crate) struct PanelMatrix {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PanelMatrix {
    /// Packs `w` (`[k, n]` row-major); `None` when the processor lacks AVX-512 (the plain
    /// `gemm` product is used there).
    pub fn pack(w: &[f32], k: usize, n: usize) -> Option<Self> {
        if !Self::supported() || w.len() != k * n || k == 0 || n == 0 {
            return None;
        }
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0f32; panels * k * PANEL];
        data.par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, dst)| {
                let c0 = p * PANEL;
                let width = PANEL.min(n - c0);
                for (kk, row) in dst.chunks_exact_mut(PANEL).enumerate() {
                    row[..width].copy_from_slice(&w[kk * n + c0..kk * n + c0 + width]);
                }
            });
        Some(Self { data, k, n })
    }

    pub fn supported() -> bool {
        avx512()
    }

    /// Inner dimension (rows of the weight).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Outer dimension (columns of the weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The weight back in its `[k, n]` row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        w.par_chunks_mut(n).enumerate().for_each(|(kk, row)| {
            for (p, cols) in row.chunks_mut(PANEL).enumerate() {
                let at = (p * k + kk) * PANEL;
                cols.copy_from_slice(&self.data[at..at + cols.len()]);
            }
        });
        w
    }

    /// `out[m, n] = x[m, k] * w` (`x` and `out` row-major and contiguous).
    ///
    /// Work is shared out as (panel, block of rows) tasks over the current pool, panel by
    /// panel so that a thread's consecutive tasks reuse the panel it just read.
    ///
    /// Panics (a bug, not an input error) when the slices do not hold `m` rows.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(
            x.len() >= m * k && out.len() >= m * n,
            "rows outside the data"
        );
        if m == 0 {
            return;
        }
        let panels = n.div_ceil(PANEL);
        let blocks = m.div_ceil(TASK_ROWS);
        let dst = SendPtr(out.as_mut_ptr());
        (0..panels * blocks)
            .into_par_iter()
            .with_min_len(MIN_TASKS)
            .for_each(|t| {
                let (p, b) = (t / blocks, t % blocks);
                let (c0, r0) = (p * PANEL, b * TASK_ROWS);
                let rows = TASK_ROWS.min(m - r0);
                let width = PANEL.min(n - c0);
                let panel = &self.data[p * k * PANEL..(p + 1) * k * PANEL];
                // SAFETY: `pack` only builds a matrix on a processor with AVX-512; the task
                // writes columns `c0 ..+ width` of rows `r0 ..+ rows` of `out` (disjoint from
                // every other task, inside `out` as asserted above), and reads those rows of
                // `x` and one whole panel.
                unsafe {
                    panel_product(
                        &x[r0 * k..(r0 + rows) * k],
                        rows,
                        k,
                        panel,
                        dst.get().add(r0 * n + c0),
                        n,
                        width,
                    )
                };
            });
    }
}

/// One panel's columns of the product, tile by tile of [`TILE_ROWS`] rows.
///
/// # Safety
/// AVX-512F must be available; `out` must address `m` rows `out_stride` apart of `width`
/// writable values; `x` holds `m` rows of `k`; `panel` holds `k` rows of [`PANEL`].
#[cfg(target_arch = "x86_64")]
unsafe fn panel_product(
    x: &[f32],
    m: usize,
    k: usize,
    panel: &[f32],
    out: *mut f32,
    out_stride: usize,
    width: usize,
) {
    let mut i = 0;
    while i < m {
        let rows = TILE_ROWS.min(m - i);
        let (xs, o) = (&x[i * k..(i + rows) * k], unsafe {
            out.add(i * out_stride)
        });
        // SAFETY: forwarded from this function's contract, for rows `i ..+ rows`.
        unsafe {
            match rows {
                6 => panel_tile::<6>(xs, k, panel, o, out_stride, width),
                5 => panel_tile::<5>(xs, k, panel, o, out_stride, width),
                4 => panel_tile::<4>(xs, k, panel, o, out_stride, width),
                3 => panel_tile::<3>(xs, k, panel, o, out_stride, width),
                2 => panel_tile::<2>(xs, k, panel, o, out_stride, width),
                _ => panel_tile::<1>(xs, k, panel, o, out_stride, width),
            }
        }
        i += rows;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panel_product(_: &[f32], _: usize, _: usize, _: &[f32], _: *mut f32, _: usize, _: usize) {
    unreachable!("panel matrices are only packed on x86-64 with AVX-512");
}

/// `R` rows times one panel: 4 x 16 accumulators per row, one chain over `k` each.
///
/// # Safety
/// As [`panel_product`], for `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panel_tile<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[f32],
    out: *mut f32,
    out_stride: usize,
    width: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && panel.len() >= k * PANEL);
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let (xp, pp) = (x.as_ptr(), panel.as_ptr());
    for kk in 0..k {
        // SAFETY: `kk < k`: inside the panel's `k` rows of 64 and each row of `x`.
        unsafe {
            let b = pp.add(kk * PANEL);
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            let b2 = _mm512_loadu_ps(b.add(32));
            let b3 = _mm512_loadu_ps(b.add(48));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * k + kk));
                a[0] = _mm512_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, b1, a[1]);
                a[2] = _mm512_fmadd_ps(xv, b2, a[2]);
                a[3] = _mm512_fmadd_ps(xv, b3, a[3]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, lanes) in a.iter().enumerate() {
            let c0 = v * 16;
            if c0 >= width {
                break;
            }
            let left = width - c0;
            let mask: __mmask16 = if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            // SAFETY: columns `c0 ..+ min(16, left)` of row `r` are inside `out`.
            unsafe { _mm512_mask_storeu_ps(out.add(r * out_stride + c0), mask, *lanes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// The vector exponential is the f64 exponential rounded to f32 (to the last bit in
    /// all but a few ties), and within one unit in the last place of `f32::exp` everywhere,
    /// limits and NaN included, at every length (the tail of a slice takes another road).
    #[test]
    fn exp_in_place_rounds_the_exact_exponential() {
        let mut xs: Vec<f32> = (0..2_000_000)
            .map(|i| -105.0 + 195.0 * i as f32 / 2_000_000.0)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.72283,
            88.72284,
            89.0,
            -87.33654,
            -103.27893,
            -103.97208,
            -104.0,
            -200.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::MIN,
            f32::MAX,
        ]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let mut off_exact = 0;
        for (&x, &y) in xs.iter().zip(&got) {
            let exact = (x as f64).exp() as f32;
            let libm = x.exp();
            if y.to_bits() != exact.to_bits() {
                off_exact += 1;
            }
            let ulps = (y.to_bits() as i64 - libm.to_bits() as i64).abs();
            assert!(ulps <= 1, "e^{x}: {y} vs f32::exp {libm} ({ulps} ulps)");
        }
        assert!(
            off_exact <= xs.len() / 100_000,
            "{off_exact} values off the rounded exponential"
        );
        let mut nan = [f32::NAN; 3];
        exp_in_place(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
        for len in 0..40 {
            let mut part: Vec<f32> = xs[1000..1000 + len].to_vec();
            exp_in_place(&mut part);
            assert_eq!(part, got[1000..1000 + len], "length {len}");
        }
    }

    /// The panel product equals `gemm`'s bit for bit (one depth block: `k` <= 512) for
    /// every row count, and each row is the same whichever rows share the product.
    #[test]
    fn panel_product_equals_gemm_for_every_row_count() {
        let (k, n) = (512, 1000);
        let w = values(k * n, 1);
        let Some(p) = PanelMatrix::pack(&w, k, n) else {
            assert!(
                !PanelMatrix::supported(),
                "packing refused on a processor with AVX-512"
            );
            return;
        };
        assert_eq!(p.unpack(), w, "unpacking does not give the weight back");
        let x = values(100 * k, 2);
        let mut alone = vec![0f32; n];
        p.matmul(&x[7 * k..8 * k], 1, &mut alone);
        for m in [1, 5, 6, 7, 13, 33, 40, 100] {
            let mut ours = vec![0f32; m * n];
            p.matmul(&x[..m * k], m, &mut ours);
            let mut reference = vec![0f32; m * n];
            linear(&x[..m * k], &w, (m, k, n), &mut reference);
            let differ = ours
                .iter()
                .zip(&reference)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{m} rows: {differ} values differ from gemm");
            if m > 7 {
                assert_eq!(
                    &ours[7 * n..8 * n],
                    &alone[..],
                    "row 7 depends on its batch"
                );
            }
        }
    }
}
