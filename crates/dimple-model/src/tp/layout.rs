//! Which slice of every sharded dimension a rank owns, and which tensor-parallel degrees a
//! model admits.
//!
//! Query heads, MLP columns and the vocabulary are split evenly. Key/value heads are split
//! evenly while the degree is at most their number; beyond, each kv head is replicated on
//! the `degree / kv_heads` consecutive ranks whose query heads read it (rank r's query heads
//! start at head `r * heads_per_rank`, and query head h reads kv head `h / group`).

use std::ops::Range;

use crate::{DimpleConfig, ModelError, Result};

/// An even split of a dimension into `world` parts, of which this is part `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const FULL: Shard = Shard { rank: 0, world: 1 };

    /// The slice of `0..len` this part owns (`len` must be divisible by `world`).
    pub fn range(&self, len: usize) -> Range<usize> {
        let part = len / self.world;
        part * self.rank..part * (self.rank + 1)
    }
}

/// The per-rank sizes and slices of one tensor-parallel rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpLayout {
    pub rank: usize,
    pub world: usize,
    /// Query heads of this rank.
    pub heads: usize,
    /// Key/value heads of this rank (1 when they are replicated).
    pub kv_heads: usize,
    /// Slice of the query heads.
    pub q: Shard,
    /// Slice of the kv heads: an even split over `min(world, kv_heads)` parts.
    pub kv: Shard,
    /// Slice of the MLP's intermediate columns.
    pub mlp: Shard,
    /// Slice of the vocabulary (embedding rows and `lm_head` rows).
    pub vocab: Shard,
}

impl TpLayout {
    /// The layout of `rank` in a group of `world`; refuses degrees the model cannot take.
    pub fn new(cfg: &DimpleConfig, rank: usize, world: usize) -> Result<Self> {
        check_degree(cfg, world)?;
        if rank >= world {
            return Err(ModelError::Config(format!(
                "tensor-parallel rank {rank} is outside a group of {world}"
            )));
        }
        let nkv = cfg.num_kv_heads();
        let kv_world = world.min(nkv);
        Ok(Self {
            rank,
            world,
            heads: cfg.num_attention_heads / world,
            kv_heads: nkv / kv_world,
            q: Shard { rank, world },
            kv: Shard {
                rank: rank * kv_world / world,
                world: kv_world,
            },
            mlp: Shard { rank, world },
            vocab: Shard { rank, world },
        })
    }

    /// The vocabulary ids whose logits this rank computes.
    pub fn vocab_range(&self, vocab: usize) -> Range<usize> {
        self.vocab.range(vocab)
    }
}

/// Why `degree` cannot shard this model, or `None` when it can.
fn degree_problem(cfg: &DimpleConfig, degree: usize) -> Option<String> {
    let nh = cfg.num_attention_heads;
    let nkv = cfg.num_kv_heads();
    if degree == 0 {
        return Some("the degree must be at least 1".into());
    }
    if !nh.is_multiple_of(degree) {
        return Some(format!(
            "num_attention_heads {nh} is not divisible by {degree}"
        ));
    }
    if degree <= nkv && !nkv.is_multiple_of(degree) {
        return Some(format!(
            "num_key_value_heads {nkv} is not divisible by {degree}"
        ));
    }
    if degree > nkv && !degree.is_multiple_of(nkv) {
        return Some(format!(
            "{degree} is not a multiple of num_key_value_heads {nkv} (each kv head must be replicated on whole ranks)"
        ));
    }
    if !cfg.intermediate_size.is_multiple_of(degree) {
        return Some(format!(
            "intermediate_size {} is not divisible by {degree}",
            cfg.intermediate_size
        ));
    }
    if !cfg.vocab_size.is_multiple_of(degree) {
        return Some(format!(
            "vocab_size {} is not divisible by {degree}",
            cfg.vocab_size
        ));
    }
    None
}

/// Every tensor-parallel degree this model admits, ascending (at most one rank per query
/// head).
pub fn valid_degrees(cfg: &DimpleConfig) -> Vec<usize> {
    (1..=cfg.num_attention_heads)
        .filter(|&d| degree_problem(cfg, d).is_none())
        .collect()
}

/// Refuses a degree the model cannot be sharded to, naming the reason and the valid ones.
pub fn check_degree(cfg: &DimpleConfig, degree: usize) -> Result<()> {
    match degree_problem(cfg, degree) {
        None => Ok(()),
        Some(reason) => Err(ModelError::InvalidDegree {
            degree,
            reason,
            valid: valid_degrees(cfg),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv: usize, inter: usize, vocab: usize) -> DimpleConfig {
        let mut c = DimpleConfig::from_json(r#"{"num_key_value_heads": 4}"#).unwrap();
        c.num_attention_heads = heads;
        c.num_key_value_heads = Some(kv);
        c.intermediate_size = inter;
        c.vocab_size = vocab;
        c
    }

    #[test]
    fn dimple_7b_degrees() {
        // 28 query heads: divisors 1, 2, 4, 7, 14, 28. 7 and 14 are not multiples of the 4
        // kv heads; 28 is, but 18944 / 28 = 676.57 MLP columns is not whole.
        let c = cfg(28, 4, 18944, 152064);
        assert_eq!(valid_degrees(&c), vec![1, 2, 4]);
    }

    #[test]
    fn kv_heads_split_then_replicated() {
        let c = cfg(4, 2, 160, 384);
        assert_eq!(valid_degrees(&c), vec![1, 2, 4]);
        let l = TpLayout::new(&c, 1, 2).unwrap();
        assert_eq!(
            (l.heads, l.kv_heads, l.kv),
            (2, 1, Shard { rank: 1, world: 2 })
        );
        // Degree 4 > 2 kv heads: ranks 0, 1 read kv head 0 and ranks 2, 3 kv head 1, as
        // query heads 0..4 read kv heads 0, 0, 1, 1.
        let kv: Vec<usize> = (0..4)
            .map(|r| TpLayout::new(&c, r, 4).unwrap().kv.rank)
            .collect();
        assert_eq!(kv, vec![0, 0, 1, 1]);
        assert_eq!(TpLayout::new(&c, 3, 4).unwrap().kv_heads, 1);
    }

    #[test]
    fn invalid_degree_names_the_valid_ones() {
        let c = cfg(4, 2, 160, 384);
        let err = check_degree(&c, 3).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("num_attention_heads 4 is not divisible by 3"),
            "{msg}"
        );
        assert!(msg.contains("valid degrees: 1, 2, 4"), "{msg}");
        let c = cfg(8, 8, 160, 385);
        assert!(
            check_degree(&c, 2)
                .unwrap_err()
                .to_string()
                .contains("vocab_size 385")
        );
    }

    #[test]
    fn shard_ranges_tile_the_dimension() {
        let parts: Vec<_> = (0..4)
            .map(|r| Shard { rank: r, world: 4 }.range(384))
            .collect();
        assert_eq!(parts, vec![0..96, 96..192, 192..288, 288..384]);
    }
}
