//! Three-component (t, h, w) position ids for M-RoPE, following the reference
//! `get_rope_index`: text runs advance all three components together; an image's tokens
//! take its merged-grid coordinates offset by the next free text position; padded slots
//! hold 1.

use crate::{DimpleConfig, ModelError, Result};

/// Position ids of one sequence and its rope delta (`max + 1 - len`), which places tokens
/// appended after the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    pub positions: Vec<[i64; 3]>,
    pub delta: i64,
}

/// Computes position ids for one sequence. `attention_mask` marks real tokens (None: all
/// real); `grids` are the `[t, h, w]` patch grids of the images, in order of appearance.
pub fn rope_index(
    ids: &[u32],
    attention_mask: Option<&[bool]>,
    grids: &[[usize; 3]],
    cfg: &DimpleConfig,
) -> Result<RopeIndex> {
    if let Some(m) = attention_mask
        && m.len() != ids.len()
    {
        return Err(ModelError::Input(format!(
            "attention mask has {} entries for {} ids",
            m.len(),
            ids.len()
        )));
    }
    let real: Vec<usize> = (0..ids.len())
        .filter(|&i| attention_mask.is_none_or(|m| m[i]))
        .collect();
    let tokens: Vec<u32> = real.iter().map(|&i| ids[i]).collect();
    let merge = cfg.vision_config.spatial_merge_size;

    let mut pos: Vec<[i64; 3]> = Vec::with_capacity(tokens.len());
    let mut next: i64 = 0;
    let mut i = 0usize;
    let mut image = 0usize;
    while i < tokens.len() {
        if tokens[i] == cfg.video_token_id {
            return Err(ModelError::Input("video inputs are not supported".into()));
        }
        if tokens[i] != cfg.image_token_id {
            pos.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let grid = grids.get(image).ok_or_else(|| {
            ModelError::Input(format!(
                "the prompt has more images than the {} image grids given",
                grids.len()
            ))
        })?;
        let (t, h, w) = (grid[0], grid[1] / merge, grid[2] / merge);
        let n = t * h * w;
        if i + n > tokens.len() || tokens[i..i + n].iter().any(|&x| x != cfg.image_token_id) {
            let run = tokens[i..]
                .iter()
                .take_while(|&&x| x == cfg.image_token_id)
                .count();
            return Err(ModelError::Input(format!(
                "image {image} needs {n} image tokens, the prompt has a run of {run}"
            )));
        }
        let mut max = next;
        for ti in 0..t {
            for hi in 0..h {
                for wi in 0..w {
                    let p = [next + ti as i64, next + hi as i64, next + wi as i64];
                    max = max.max(p[0]).max(p[1]).max(p[2]);
                    pos.push(p);
                }
            }
        }
        next = max + 1;
        i += n;
        image += 1;
    }
    if image != grids.len() {
        return Err(ModelError::Input(format!(
            "{} image grids given but the prompt holds {image} images",
            grids.len()
        )));
    }
    let mut positions = vec![[1i64; 3]; ids.len()];
    for (k, &i) in real.iter().enumerate() {
        positions[i] = pos[k];
    }
    // The reference takes the text-only maximum over padded slots too (they hold 1), and the
    // image-path maximum over real tokens only.
    let over: &[[i64; 3]] = if grids.is_empty() { &positions } else { &pos };
    let max = over
        .iter()
        .flat_map(|p| p.iter().copied())
        .max()
        .unwrap_or(0);
    let delta = max + 1 - ids.len() as i64;
    Ok(RopeIndex { positions, delta })
}
