//! Greedy slot scoring on vocabulary shards: each rank reduces its slice of a logits row to
//! four numbers, one small exchange combines them, and every rank ends with the same
//! `(x0, confidence)` that [`crate::policy::Scorer::score`] gives on the whole row. Whole
//! rows are never gathered on this path.
//!
//! The statistics are those of the policy's row pass, computed the same way on each
//! slice: the max and its first index, the largest other value, and the sum of
//! `exp(x - max)` accumulated in f64. Combining slices in
//! rank order (lower vocabulary ids first) rebases each slice's sum onto the global max,
//! so with one rank the result is bit for bit the policy's; with several, the sums differ
//! only by f64 rounding, far below the f32 they are rounded to. The negative entropy needs
//! the final normaliser, hence a second exchange of one partial sum per row.

use candle_core::{D, DType, Tensor};

use crate::policy::{ConfidenceKind, SlotScore};

/// Values per row in the first exchange: max, argmax (vocabulary id), second, sum.
pub(crate) const STATS: usize = 4;

/// Added to probabilities before the log, as the policy (and the reference) do.
const ENTROPY_EPS: f32 = 1e-10;

/// The first-exchange statistics of one row slice whose first entry is vocabulary id
/// `offset`, exactly as the policy's row pass computes them.
pub(crate) fn slice_stats(row: &[f32], offset: usize) -> [f64; STATS] {
    let (max, argmax, second, sum) = crate::policy::row_statistics(row);
    [
        f64::from(max),
        (offset + argmax) as f64,
        f64::from(second),
        sum,
    ]
}

/// The same statistics reduced on the tensor's device, for `[rows, slice]` logits: on an
/// accelerator only `rows x 4` numbers cross to the host instead of whole rows. The sum is
/// an f32 reduction on the device (as torch's CUDA softmax does it), so confidences may
/// differ from the host pass in the last bits; ties for the max resolve to the first index
/// when the backend's argmax does.
pub(crate) fn slice_stats_device(
    x: &Tensor,
    offset: usize,
) -> candle_core::Result<Vec<[f64; STATS]>> {
    let (_, width) = x.dims2()?;
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let argmax = x.argmax_keepdim(D::Minus1)?;
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    // The largest value once the first argmax is set aside (a tie leaves another copy).
    let cols = Tensor::arange(0u32, width as u32, x.device())?.unsqueeze(0)?;
    let is_arg = cols.broadcast_eq(&argmax)?;
    let floor = Tensor::full(f32::NEG_INFINITY, x.shape(), x.device())?;
    let second = is_arg.where_cond(&floor, &x)?.max_keepdim(D::Minus1)?;
    let argmax = argmax.to_dtype(DType::F32)?;
    let stacked = Tensor::cat(&[&max, &argmax, &second, &sum], 1)?.to_vec2::<f32>()?;
    Ok(stacked
        .into_iter()
        .map(|r| {
            [
                f64::from(r[0]),
                (offset + r[1] as usize) as f64,
                f64::from(r[2]),
                f64::from(r[3]),
            ]
        })
        .collect())
}

/// A row's statistics over the whole vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowStats {
    pub max: f32,
    pub argmax: usize,
    pub second: f32,
    /// `sum exp(x - max)`, rounded to f32 as torch holds it.
    pub sum: f32,
}

impl RowStats {
    /// Combines one row's per-slice statistics, given in rank order.
    pub fn combine<'a>(slices: impl Iterator<Item = &'a [f64]>) -> RowStats {
        let slices: Vec<&[f64]> = slices.collect();
        let mut max = f32::NEG_INFINITY;
        let mut winner = 0;
        for (r, s) in slices.iter().enumerate() {
            // Strictly greater: on a tie the lower vocabulary ids (lower rank) win, as the
            // row pass keeps the first index.
            if s[0] as f32 > max || r == 0 {
                max = s[0] as f32;
                winner = r;
            }
        }
        let mut second = slices[winner][2] as f32;
        let mut sum = 0.0f64;
        for (r, s) in slices.iter().enumerate() {
            let m = s[0] as f32;
            if r != winner && m > second {
                second = m;
            }
            sum += s[3] * (s[0] - f64::from(max)).exp();
        }
        RowStats {
            max,
            argmax: slices[winner][1] as usize,
            second,
            sum: sum as f32,
        }
    }

    fn inv_sum(&self) -> f32 {
        1.0 / self.sum
    }

    fn prob(&self, x: f32) -> f32 {
        (x - self.max).exp() * self.inv_sum()
    }

    /// This slice's part of `sum p * log(p + 1e-10)`, accumulated in f64 like the policy.
    pub fn neg_entropy_part(&self, slice: &[f32]) -> f64 {
        let inv = self.inv_sum();
        let mut acc = 0.0f64;
        for &x in slice {
            let p = (x - self.max).exp() * inv;
            acc += f64::from(p * (p + ENTROPY_EPS).ln());
        }
        acc
    }

    /// The device twin of [`RowStats::neg_entropy_part`] for `[rows, slice]` logits.
    pub fn neg_entropy_parts_device(
        stats: &[RowStats],
        x: &Tensor,
    ) -> candle_core::Result<Vec<f64>> {
        let dev = x.device();
        let n = stats.len();
        let max = Tensor::from_vec(stats.iter().map(|s| s.max).collect::<Vec<_>>(), (n, 1), dev)?;
        let inv = Tensor::from_vec(
            stats.iter().map(|s| s.inv_sum()).collect::<Vec<_>>(),
            (n, 1),
            dev,
        )?;
        let p = x
            .to_dtype(DType::F32)?
            .broadcast_sub(&max)?
            .exp()?
            .broadcast_mul(&inv)?;
        let terms = (&p * (&p + f64::from(ENTROPY_EPS))?.log()?)?;
        Ok(terms
            .sum(D::Minus1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// The slot score, as the policy's greedy pass computes it; `neg_entropy` is the summed
    /// second exchange (used only by [`ConfidenceKind::NegEntropy`]).
    pub fn score(&self, kind: ConfidenceKind, neg_entropy: f64) -> SlotScore {
        let confidence = match kind {
            // p(x0) with x0 the argmax: exp(0) * (1 / sum).
            ConfidenceKind::Probability => self.prob(self.max),
            ConfidenceKind::Margin => self.prob(self.max) - self.prob(self.second),
            ConfidenceKind::NegEntropy => neg_entropy as f32,
        };
        // Token ids are u32 throughout the workspace, so a vocabulary index always fits.
        SlotScore {
            x0: self.argmax as u32,
            confidence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Scorer;
    use candle_core::Device;
    use dimple_core::params::{Alg, DecodeParams};
    use rand::{Rng, SeedableRng};

    fn scorer(alg: Alg) -> Scorer {
        Scorer::new(&DecodeParams {
            alg,
            ..Default::default()
        })
    }

    /// Scores `row` split into `world` equal slices, as the ranks would.
    fn sharded(row: &[f32], world: usize, kind: ConfidenceKind, device: bool) -> SlotScore {
        let w = row.len() / world;
        let parts: Vec<[f64; STATS]> = (0..world)
            .map(|r| {
                let s = &row[r * w..(r + 1) * w];
                if device {
                    let t = Tensor::from_slice(s, (1, w), &Device::Cpu).unwrap();
                    slice_stats_device(&t, r * w).unwrap()[0]
                } else {
                    slice_stats(s, r * w)
                }
            })
            .collect();
        let st = RowStats::combine(parts.iter().map(|p| &p[..]));
        let ent: f64 = (0..world)
            .map(|r| st.neg_entropy_part(&row[r * w..(r + 1) * w]))
            .sum();
        st.score(kind, ent)
    }

    fn rows() -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut rows: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                (0..384)
                    .map(|_| rng.random_range(-20.0f32..20.0) * (1.0 + (i % 5) as f32))
                    .collect()
            })
            .collect();
        // Ties for the max inside one slice, across slices, and a max in the last slot.
        let mut tie = vec![0.5f32; 384];
        tie[10] = 9.0;
        tie[300] = 9.0;
        rows.push(tie);
        let mut tie_in = vec![-1.0f32; 384];
        tie_in[5] = 3.0;
        tie_in[6] = 3.0;
        rows.push(tie_in);
        let mut last = vec![0.0f32; 384];
        last[383] = 4.0;
        rows.push(last);
        rows
    }

    #[test]
    fn one_slice_is_the_policy_bit_for_bit() {
        for (alg, kind) in [
            (Alg::MaskgitPlus, ConfidenceKind::Probability),
            (Alg::TopkMargin, ConfidenceKind::Margin),
            (Alg::Entropy, ConfidenceKind::NegEntropy),
        ] {
            let sc = scorer(alg);
            for row in rows() {
                let want = sc
                    .score(&row, &mut rand::rngs::StdRng::seed_from_u64(0))
                    .unwrap();
                assert_eq!(sharded(&row, 1, kind, false), want, "{alg:?}");
            }
        }
    }

    #[test]
    fn slices_agree_with_the_whole_row() {
        for (alg, kind) in [
            (Alg::MaskgitPlus, ConfidenceKind::Probability),
            (Alg::TopkMargin, ConfidenceKind::Margin),
            (Alg::Entropy, ConfidenceKind::NegEntropy),
        ] {
            let sc = scorer(alg);
            for row in rows() {
                let want = sc
                    .score(&row, &mut rand::rngs::StdRng::seed_from_u64(0))
                    .unwrap();
                for world in [2, 3, 4, 8] {
                    let got = sharded(&row, world, kind, false);
                    assert_eq!(
                        got.x0, want.x0,
                        "{alg:?} world {world}: argmax (first on ties)"
                    );
                    // A few ulps of the probabilities (a margin is a difference of two).
                    let tol = 4.0 * f32::EPSILON * want.confidence.abs().max(1.0);
                    assert!(
                        (got.confidence - want.confidence).abs() <= tol,
                        "{alg:?} world {world}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn device_reduction_agrees_with_the_host_pass() {
        for (alg, kind) in [
            (Alg::MaskgitPlus, ConfidenceKind::Probability),
            (Alg::TopkMargin, ConfidenceKind::Margin),
            (Alg::Entropy, ConfidenceKind::NegEntropy),
        ] {
            let sc = scorer(alg);
            for row in rows() {
                let want = sc
                    .score(&row, &mut rand::rngs::StdRng::seed_from_u64(0))
                    .unwrap();
                for world in [1, 4] {
                    let got = sharded(&row, world, kind, true);
                    assert_eq!(got.x0, want.x0, "{alg:?} world {world}");
                    let tol = 1e-5 * want.confidence.abs().max(1e-6);
                    assert!(
                        (got.confidence - want.confidence).abs() <= tol,
                        "{alg:?} world {world}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn entropy_parts_on_the_device_sum_like_the_host() {
        let row = &rows()[7];
        let st = RowStats::combine(std::iter::once(&slice_stats(row, 0)[..]));
        let t = Tensor::from_slice(row, (1, row.len()), &Device::Cpu).unwrap();
        let dev = RowStats::neg_entropy_parts_device(&[st], &t).unwrap()[0];
        let host = st.neg_entropy_part(row);
        assert!(
            (dev - host).abs() <= 1e-5 * host.abs().max(1e-6),
            "{dev} vs {host}"
        );
    }
}
