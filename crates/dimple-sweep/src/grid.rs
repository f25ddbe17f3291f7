//! The grid of a sweep: the product of decoding settings and load levels. Each point is a
//! [`Config`] with a stable key, so a re-run can tell which points are already done.

use std::path::Path;

use dimple_core::params::{Alg, DecodeParams, Pipeline};
use serde::{Deserialize, Serialize};

use crate::{Result, SweepError, file_err};

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Closed loop: this many requests in flight at all times.
    Concurrency(usize),
    /// Open loop: Poisson arrivals at this many requests per second.
    Rate(f64),
}

/// The lists whose product is the sweep. Empty lists take the single default value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grid {
    /// Confidence thresholds; 0 or `"none"` means none.
    #[serde(deserialize_with = "thresholds")]
    pub threshold: Vec<f32>,
    pub alg: Vec<String>,
    pub pipeline: Vec<String>,
    pub use_cache: Vec<bool>,
    pub max_new_tokens: Vec<usize>,
    /// Step caps; 0 or absent means `max_new_tokens`.
    pub steps: Vec<usize>,
    pub concurrency: Vec<usize>,
    pub rate: Vec<f64>,
    /// Seeds the request generators and arrival times.
    pub seed: u64,
}

/// A threshold as written: a number, or `"none"` (stored as 0).
pub fn parse_threshold(s: &str) -> std::result::Result<f32, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(0.0);
    }
    s.parse::<f32>()
        .map_err(|_| format!("threshold must be a number in [0, 1) or `none`, got {s:?}"))
}

fn thresholds<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        Number(f32),
        Name(String),
    }
    Vec::<T>::deserialize(d)?
        .into_iter()
        .map(|t| match t {
            T::Number(x) => Ok(x),
            T::Name(s) => parse_threshold(&s).map_err(serde::de::Error::custom),
        })
        .collect()
}

/// One point of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub threshold: Option<f32>,
    pub alg: Alg,
    pub pipeline: Pipeline,
    pub use_cache: bool,
    pub max_new_tokens: usize,
    pub steps: usize,
    pub load: Load,
    pub seed: u64,
}

impl Config {
    /// A stable, file-name-safe identifier.
    pub fn key(&self) -> String {
        let thr = self
            .threshold
            .map_or("none".to_string(), |t| format!("{t}"));
        let load = match self.load {
            Load::Concurrency(c) => format!("c{c}"),
            Load::Rate(r) => format!("r{r}"),
        };
        format!(
            "{}_{}_thr{}_cache{}_n{}_s{}_{}_seed{}",
            self.pipeline,
            self.alg,
            thr,
            u8::from(self.use_cache),
            self.max_new_tokens,
            self.steps,
            load,
            self.seed
        )
    }

    pub fn params(&self, seed: u64) -> DecodeParams {
        DecodeParams {
            max_new_tokens: self.max_new_tokens,
            steps: self.steps,
            threshold: self.threshold,
            alg: self.alg,
            pipeline: self.pipeline,
            use_original_confidence: self.pipeline == Pipeline::Dim,
            use_cache: self.use_cache,
            seed,
            ..DecodeParams::default()
        }
    }
}

impl Grid {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        toml::from_str(&text).map_err(|e| file_err(path, e))
    }

    /// Every combination, in a fixed order (load levels innermost).
    pub fn configs(&self, default_len: usize) -> Result<Vec<Config>> {
        fn or<T: Clone>(v: &[T], d: T) -> Vec<T> {
            if v.is_empty() { vec![d] } else { v.to_vec() }
        }
        let mut thresholds = Vec::new();
        for &t in &or(&self.threshold, 0.0) {
            if !(0.0..1.0).contains(&t) {
                return Err(SweepError::Grid(format!(
                    "`threshold` {t} is not in [0, 1)"
                )));
            }
            thresholds.push((t > 0.0).then_some(t));
        }
        let algs = or(&self.alg, "maskgit_plus".into())
            .iter()
            .map(|a| {
                a.parse::<Alg>()
                    .map_err(|e| SweepError::Grid(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let pipelines = or(&self.pipeline, "dim".into())
            .iter()
            .map(|p| {
                p.parse::<Pipeline>()
                    .map_err(|e| SweepError::Grid(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut loads: Vec<Load> = self
            .concurrency
            .iter()
            .map(|&c| Load::Concurrency(c))
            .collect();
        loads.extend(self.rate.iter().map(|&r| Load::Rate(r)));
        if loads.is_empty() {
            loads.push(Load::Concurrency(1));
        }
        for l in &loads {
            match *l {
                Load::Concurrency(0) => {
                    return Err(SweepError::Grid("`concurrency` must be >= 1".into()));
                }
                Load::Rate(r) if !(r.is_finite() && r > 0.0) => {
                    return Err(SweepError::Grid(format!(
                        "`rate` must be > 0 requests/s, got {r}"
                    )));
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        for &pipeline in &pipelines {
            for &alg in &algs {
                for &threshold in &thresholds {
                    // The dream loop has no threshold: one point instead of one per value.
                    if pipeline == Pipeline::Dream && threshold.is_some() {
                        continue;
                    }
                    for &use_cache in &or(&self.use_cache, false) {
                        for &n in &or(&self.max_new_tokens, default_len) {
                            if n == 0 {
                                return Err(SweepError::Grid(
                                    "`max_new_tokens` must be >= 1".into(),
                                ));
                            }
                            for &s in &or(&self.steps, 0) {
                                for &load in &loads {
                                    out.push(Config {
                                        threshold,
                                        alg,
                                        pipeline,
                                        use_cache,
                                        max_new_tokens: n,
                                        steps: if s == 0 { n } else { s },
                                        load,
                                        seed: self.seed,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        if out.is_empty() {
            return Err(SweepError::Grid(
                "the grid is empty (dream with only thresholds > 0?)".into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_and_keys() {
        let g = Grid {
            threshold: vec![0.0, 0.9],
            use_cache: vec![false, true],
            concurrency: vec![1, 4],
            rate: vec![2.5],
            max_new_tokens: vec![16],
            ..Grid::default()
        };
        let c = g.configs(16).unwrap();
        assert_eq!(c.len(), 2 * 2 * 3);
        let keys: std::collections::HashSet<String> = c.iter().map(Config::key).collect();
        assert_eq!(keys.len(), c.len(), "keys are unique");
        assert!(keys.contains("dim_maskgit_plus_thr0.9_cache1_n16_s16_c4_seed0"));
        assert!(keys.contains("dim_maskgit_plus_thrnone_cache0_n16_s16_r2.5_seed0"));
    }

    #[test]
    fn bad_grids_are_refused() {
        assert!(
            Grid {
                threshold: vec![1.5],
                ..Grid::default()
            }
            .configs(8)
            .is_err()
        );
        assert!(
            Grid {
                alg: vec!["nope".into()],
                ..Grid::default()
            }
            .configs(8)
            .is_err()
        );
        assert!(
            Grid {
                concurrency: vec![0],
                ..Grid::default()
            }
            .configs(8)
            .is_err()
        );
        assert!(
            Grid {
                rate: vec![-1.0],
                ..Grid::default()
            }
            .configs(8)
            .is_err()
        );
    }

    #[test]
    fn toml_round_trip() {
        let g: Grid = toml::from_str(
            "threshold = [\"none\", 0.5]\nconcurrency = [2]\nuse_cache = [true]\nseed = 7\n",
        )
        .unwrap();
        assert_eq!(g.threshold, vec![0.0, 0.5]);
        assert!(toml::from_str::<Grid>("threshold = [\"high\"]").is_err());
        assert_eq!(parse_threshold("None"), Ok(0.0));
        assert_eq!(parse_threshold("0.9"), Ok(0.9));
        assert_eq!(g.seed, 7);
        assert!(toml::from_str::<Grid>("bogus = 1").is_err());
    }
}
