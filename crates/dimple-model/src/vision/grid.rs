//! Host-side index bookkeeping for a batch of image grids: patch coordinates for the 2-D
//! rotary embedding, the window permutation and the attention segment boundaries.
//!
//! Everything here is pure integer arithmetic done once per forward call; the tensors built
//! from it are reused by every block.

/// Index layout of one vision forward call over several `(t, h, w)` patch grids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GridLayout {
    /// `(h, w)` patch coordinate of every patch row, in the processor's 2x2-grouped order.
    pub positions: Vec<(usize, usize)>,
    /// Merged-token order after window partitioning: entry `j` is the original merge group
    /// that lands at window-order slot `j`.
    pub window_index: Vec<usize>,
    /// Patch-row boundaries of the windows (window order), starting at 0, without repeats.
    pub cu_window_seqlens: Vec<usize>,
    /// Patch-row boundaries of whole frames; a frame of one image is a full-attention unit.
    pub cu_seqlens: Vec<usize>,
    /// Largest grid side, the size of the rotary frequency table.
    pub max_grid: usize,
}

impl GridLayout {
    /// Builds the layout. `merge` is the spatial merge size and `window` the window side in
    /// merged tokens; the grids must already be validated (`h`, `w` multiples of `merge`).
    pub fn new(grid_thw: &[[usize; 3]], merge: usize, window: usize) -> Self {
        let unit = merge * merge;
        let total: usize = grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let mut positions = Vec::with_capacity(total);
        let mut window_index = Vec::with_capacity(total / unit);
        let mut cu_window_seqlens = vec![0];
        let mut cu_seqlens = vec![0];
        let mut group_offset = 0;
        let mut max_grid = 0;
        for &[t, h, w] in grid_thw {
            max_grid = max_grid.max(h).max(w);
            let (mh, mw) = (h / merge, w / merge);
            for _ in 0..t {
                for bh in 0..mh {
                    for bw in 0..mw {
                        for ih in 0..merge {
                            for iw in 0..merge {
                                positions.push((bh * merge + ih, bw * merge + iw));
                            }
                        }
                    }
                }
            }
            // Windows tile each frame row-major; the reference pads the merged grid to whole
            // windows and drops the padding, which is the same as clipping edge windows and
            // skipping empty ones (their repeated boundaries are removed there too).
            for frame in 0..t {
                let frame_base = group_offset + frame * mh * mw;
                for wy in (0..mh).step_by(window) {
                    for wx in (0..mw).step_by(window) {
                        let before = window_index.len();
                        for y in wy..(wy + window).min(mh) {
                            for x in wx..(wx + window).min(mw) {
                                window_index.push(frame_base + y * mw + x);
                            }
                        }
                        let count = window_index.len() - before;
                        if count > 0 {
                            let last = cu_window_seqlens[cu_window_seqlens.len() - 1];
                            cu_window_seqlens.push(last + count * unit);
                        }
                    }
                }
                let last = cu_seqlens[cu_seqlens.len() - 1];
                cu_seqlens.push(last + h * w);
            }
            group_offset += t * mh * mw;
        }
        Self {
            positions,
            window_index,
            cu_window_seqlens,
            cu_seqlens,
            max_grid,
        }
    }

    /// Patch-row gather that puts rows into window order (`unit` rows per merge group).
    pub fn patch_permutation(&self, unit: usize) -> Vec<u32> {
        self.window_index
            .iter()
            .flat_map(|&g| (0..unit).map(move |i| (g * unit + i) as u32))
            .collect()
    }

    /// Merge-group gather that undoes the window order (the inverse permutation).
    pub fn inverse_window_index(&self) -> Vec<u32> {
        let mut inv = vec![0u32; self.window_index.len()];
        for (slot, &g) in self.window_index.iter().enumerate() {
            inv[g] = slot as u32;
        }
        inv
    }
}

/// Inverse frequencies of the vision rotary embedding over `dim` = head_dim / 2 channels,
/// computed in f32 like the reference (`1 / theta^(arange(0, dim, 2) / dim)`).
pub(crate) fn rotary_inv_freq(dim: usize, theta: f32) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|k| 1.0f32 / theta.powf(k as f32 / dim as f32))
        .collect()
}

/// Per-patch rotary angles `[N, dim]`: the `h` table row followed by the `w` table row.
pub(crate) fn rotary_freqs(positions: &[(usize, usize)], inv_freq: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(positions.len() * inv_freq.len() * 2);
    for &(h, w) in positions {
        out.extend(inv_freq.iter().map(|f| h as f32 * f));
        out.extend(inv_freq.iter().map(|f| w as f32 * f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_window_keeps_order() {
        // 4x4 patches = 2x2 merged tokens, all inside one 4x4 window.
        let l = GridLayout::new(&[[1, 4, 4]], 2, 4);
        assert_eq!(l.window_index, vec![0, 1, 2, 3]);
        assert_eq!(l.cu_window_seqlens, vec![0, 16]);
        assert_eq!(l.cu_seqlens, vec![0, 16]);
        assert_eq!(
            &l.positions[..6],
            &[(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]
        );
    }

    #[test]
    fn partial_edge_windows_are_clipped() {
        // 5x5 merged tokens with 4x4 windows: a full window, a right column of 4, a bottom
        // row of 4 and a single corner token.
        let l = GridLayout::new(&[[1, 10, 10]], 2, 4);
        let mut want: Vec<usize> = (0..4)
            .flat_map(|y| (0..4).map(move |x| y * 5 + x))
            .collect();
        want.extend([4, 9, 14, 19, 20, 21, 22, 23, 24]);
        assert_eq!(l.window_index, want);
        assert_eq!(l.cu_window_seqlens, vec![0, 64, 80, 96, 100]);
        assert_eq!(l.cu_seqlens, vec![0, 100]);
        let inv = l.inverse_window_index();
        for (slot, &g) in l.window_index.iter().enumerate() {
            assert_eq!(inv[g] as usize, slot);
        }
    }

    #[test]
    fn second_image_indices_are_offset() {
        // Image 1 has 2x2 merged tokens (4 groups), image 2 one token: its group id is 4.
        let l = GridLayout::new(&[[1, 4, 4], [1, 2, 2]], 2, 4);
        assert_eq!(l.window_index, vec![0, 1, 2, 3, 4]);
        assert_eq!(l.cu_window_seqlens, vec![0, 16, 20]);
        assert_eq!(l.cu_seqlens, vec![0, 16, 20]);
        assert_eq!(l.patch_permutation(4).len(), 20);
    }

    #[test]
    fn frames_attend_separately() {
        let l = GridLayout::new(&[[2, 2, 2]], 2, 4);
        assert_eq!(l.cu_seqlens, vec![0, 4, 8]);
        assert_eq!(l.cu_window_seqlens, vec![0, 4, 8]);
    }
}
