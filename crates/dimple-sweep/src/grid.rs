//! The grid of a sweep: the product of decoding settings and load levels. Each point is a
//! [`Config`] with a stable key, so a re-run can tell which points are already done.

use std::path::Path;

use dimple_core::params::{Alg, CacheMode, DecodeParams, Pipeline};
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
    /// Cache modes: `exact` (the default), `prefix` or `dual`.
    pub cache_mode: Vec<String>,
    /// The older spelling of the cache, kept so that earlier grid files and commands still
    /// run: `false` is `exact`, `true` is `prefix`. Refused together with `cache_mode`,
    /// since the two lists could disagree.
    pub use_cache: Vec<bool>,
    pub max_new_tokens: Vec<usize>,
    /// Slots per block; `None` (written `"whole"`) decodes the whole response as one block.
    #[serde(deserialize_with = "block_lengths")]
    pub block_length: Vec<Option<usize>>,
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

/// A block length as written: a number of slots (at least 1), or `"whole"` for the whole
/// response as one block (`None`).
pub fn parse_block_length(s: &str) -> std::result::Result<Option<usize>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("whole") {
        return Ok(None);
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(format!(
            "block_length must be an integer >= 1 or `whole` (the whole response as one \
             block), got {s:?}"
        )),
    }
}

fn block_lengths<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Option<usize>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        Number(i64),
        Name(String),
    }
    Vec::<B>::deserialize(d)?
        .into_iter()
        .map(|b| match b {
            B::Number(n) => parse_block_length(&n.to_string()),
            B::Name(s) => parse_block_length(&s),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// One point of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SavedConfig")]
pub struct Config {
    pub threshold: Option<f32>,
    pub alg: Alg,
    pub pipeline: Pipeline,
    /// What each step recomputes.
    pub cache_mode: CacheMode,
    pub max_new_tokens: usize,
    pub steps: usize,
    /// Slots per block; `None` when the whole response is one block. A block length equal
    /// to `max_new_tokens` is the same decoding and is stored as `None`, so that both
    /// spellings name one configuration.
    pub block_length: Option<usize>,
    pub load: Load,
    pub seed: u64,
}

/// A configuration as saved in a results folder. Folders written before the cache mode
/// and the block length were grid dimensions hold `use_cache` (a bool) and neither field.
#[derive(Deserialize)]
struct SavedConfig {
    threshold: Option<f32>,
    alg: Alg,
    pipeline: Pipeline,
    #[serde(default)]
    cache_mode: Option<CacheMode>,
    #[serde(default)]
    use_cache: bool,
    max_new_tokens: usize,
    steps: usize,
    #[serde(default)]
    block_length: Option<usize>,
    load: Load,
    seed: u64,
}

impl From<SavedConfig> for Config {
    fn from(c: SavedConfig) -> Self {
        Config {
            threshold: c.threshold,
            alg: c.alg,
            pipeline: c.pipeline,
            cache_mode: c.cache_mode.unwrap_or(if c.use_cache {
                CacheMode::Prefix
            } else {
                CacheMode::Exact
            }),
            max_new_tokens: c.max_new_tokens,
            steps: c.steps,
            block_length: c.block_length,
            load: c.load,
            seed: c.seed,
        }
    }
}

impl Config {
    /// A stable, file-name-safe identifier. `exact` and `prefix` keep the `cache0` and
    /// `cache1` of the earlier boolean and a whole-response block adds nothing, so the
    /// points of folders written before these dimensions existed are still recognised.
    pub fn key(&self) -> String {
        let thr = self
            .threshold
            .map_or("none".to_string(), |t| format!("{t}"));
        let load = match self.load {
            Load::Concurrency(c) => format!("c{c}"),
            Load::Rate(r) => format!("r{r}"),
        };
        let cache = match self.cache_mode {
            CacheMode::Exact => "0",
            CacheMode::Prefix => "1",
            CacheMode::Dual => "dual",
        };
        let block = self
            .block_length
            .map_or(String::new(), |b| format!("_b{b}"));
        format!(
            "{}_{}_thr{}_cache{}_n{}_s{}{}_{}_seed{}",
            self.pipeline,
            self.alg,
            thr,
            cache,
            self.max_new_tokens,
            self.steps,
            block,
            load,
            self.seed
        )
    }

    /// Slots per block as decoded: the response length for a whole-response block.
    pub fn slots_per_block(&self) -> usize {
        self.block_length.unwrap_or(self.max_new_tokens)
    }

    pub fn params(&self, seed: u64) -> DecodeParams {
        DecodeParams {
            max_new_tokens: self.max_new_tokens,
            steps: self.steps,
            threshold: self.threshold,
            alg: self.alg,
            pipeline: self.pipeline,
            use_original_confidence: self.pipeline == Pipeline::Dim,
            // Both fields: a server that predates `cache_mode` still gets the prefix cache.
            use_cache: self.cache_mode == CacheMode::Prefix,
            cache: Some(self.cache_mode),
            block_length: self.block_length,
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

    /// The cache modes of the grid, from `cache_mode` or its older spelling `use_cache`.
    fn cache_modes(&self) -> Result<Vec<CacheMode>> {
        match (self.cache_mode.is_empty(), self.use_cache.is_empty()) {
            (false, false) => Err(SweepError::Grid(
                "`cache_mode` (`--cache-mode`) and `use_cache` (`--cache`) both set the cache; \
                 give `cache_mode` alone (`use_cache` false is `exact`, true is `prefix`)"
                    .into(),
            )),
            (false, true) => self
                .cache_mode
                .iter()
                .map(|m| {
                    m.trim()
                        .parse::<CacheMode>()
                        .map_err(|e| SweepError::Grid(e.to_string()))
                })
                .collect(),
            (true, false) => Ok(self
                .use_cache
                .iter()
                .map(|&on| {
                    if on {
                        CacheMode::Prefix
                    } else {
                        CacheMode::Exact
                    }
                })
                .collect()),
            (true, true) => Ok(vec![CacheMode::Exact]),
        }
    }

    /// Every combination, in a fixed order (load levels innermost). A block length larger
    /// than the response length is kept: the server refuses such requests, and the
    /// configuration is reported as failed with its answer.
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
        let cache_modes = self.cache_modes()?;
        if self.block_length.contains(&Some(0)) {
            return Err(SweepError::Grid(
                "`block_length` must be >= 1 (or `whole`), got 0".into(),
            ));
        }
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
                    for &cache_mode in &cache_modes {
                        for &n in &or(&self.max_new_tokens, default_len) {
                            if n == 0 {
                                return Err(SweepError::Grid(
                                    "`max_new_tokens` must be >= 1".into(),
                                ));
                            }
                            // `n` and `whole` are one configuration: listed once.
                            let mut blocks: Vec<Option<usize>> = Vec::new();
                            for b in or(&self.block_length, None) {
                                let b = b.filter(|&b| b != n);
                                if !blocks.contains(&b) {
                                    blocks.push(b);
                                }
                            }
                            for &block_length in &blocks {
                                for &s in &or(&self.steps, 0) {
                                    for &load in &loads {
                                        out.push(Config {
                                            threshold,
                                            alg,
                                            pipeline,
                                            cache_mode,
                                            max_new_tokens: n,
                                            steps: if s == 0 { n } else { s },
                                            block_length,
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

    #[test]
    fn cache_mode_and_block_length_are_dimensions() {
        let g = Grid {
            cache_mode: vec!["exact".into(), "prefix".into(), "dual".into()],
            block_length: vec![None, Some(16), Some(8), Some(4)],
            threshold: vec![0.0, 0.9],
            ..Grid::default()
        };
        let c = g.configs(16).unwrap();
        // A block of 16 slots in a 16-slot response is the whole response: listed once.
        assert_eq!(c.len(), 3 * 3 * 2);
        let keys: std::collections::HashSet<String> = c.iter().map(Config::key).collect();
        assert_eq!(keys.len(), c.len(), "keys are unique");
        // Exact and prefix with one block keep the keys of the earlier boolean.
        assert!(keys.contains("dim_maskgit_plus_thrnone_cache0_n16_s16_c1_seed0"));
        assert!(keys.contains("dim_maskgit_plus_thr0.9_cache1_n16_s16_c1_seed0"));
        assert!(keys.contains("dim_maskgit_plus_thr0.9_cachedual_n16_s16_b4_c1_seed0"));
        assert!(keys.contains("dim_maskgit_plus_thrnone_cache0_n16_s16_b8_c1_seed0"));
        let dual4 = c
            .iter()
            .find(|c| c.cache_mode == CacheMode::Dual && c.block_length == Some(4))
            .unwrap();
        assert_eq!(dual4.slots_per_block(), 4);
        let p = dual4.params(3);
        assert_eq!(
            (p.cache, p.block_length, p.seed),
            (Some(CacheMode::Dual), Some(4), 3)
        );
        assert_eq!(p.cache_mode(), CacheMode::Dual);
        assert!(!p.use_cache);
        let limits = dimple_core::params::DecodeLimits {
            max_new_tokens: 64,
            max_steps: 64,
        };
        for cfg in &c {
            let p = cfg.params(0);
            assert_eq!(p.cache_mode(), cfg.cache_mode);
            assert_eq!(p.block_plan().block_length, cfg.slots_per_block());
            p.validate(&limits).unwrap();
        }
        // The block list is taken per response length: 16 is a real block when n = 32.
        let g = Grid {
            block_length: vec![None, Some(16)],
            max_new_tokens: vec![16, 32],
            ..Grid::default()
        };
        let blocks: Vec<(usize, Option<usize>)> = g
            .configs(16)
            .unwrap()
            .iter()
            .map(|c| (c.max_new_tokens, c.block_length))
            .collect();
        assert_eq!(blocks, vec![(16, None), (32, None), (32, Some(16))]);
        // Longer than the response: kept, for the server to refuse as it defines.
        let g = Grid {
            block_length: vec![Some(32)],
            ..Grid::default()
        };
        let c = g.configs(16).unwrap();
        assert_eq!(c[0].block_length, Some(32));
        assert!(c[0].params(0).validate(&limits).is_err());
    }

    #[test]
    fn use_cache_is_the_older_spelling_of_the_cache_mode() {
        let modes = |g: Grid| -> Vec<CacheMode> {
            g.configs(16)
                .unwrap()
                .iter()
                .map(|c| c.cache_mode)
                .collect()
        };
        assert_eq!(modes(Grid::default()), vec![CacheMode::Exact]);
        assert_eq!(
            modes(Grid {
                use_cache: vec![false, true],
                ..Grid::default()
            }),
            vec![CacheMode::Exact, CacheMode::Prefix]
        );
        let p = Grid {
            use_cache: vec![true],
            ..Grid::default()
        }
        .configs(16)
        .unwrap()[0]
            .params(0);
        assert!(
            p.use_cache,
            "servers without `cache_mode` still get the prefix cache"
        );
        let both = Grid {
            use_cache: vec![true],
            cache_mode: vec!["dual".into()],
            ..Grid::default()
        };
        assert_eq!(
            both.configs(16).unwrap_err().to_string(),
            "grid: `cache_mode` (`--cache-mode`) and `use_cache` (`--cache`) both set the \
             cache; give `cache_mode` alone (`use_cache` false is `exact`, true is `prefix`)"
        );
        let bad = Grid {
            cache_mode: vec!["full".into()],
            ..Grid::default()
        };
        assert_eq!(
            bad.configs(16).unwrap_err().to_string(),
            "grid: unknown `cache` mode \"full\"; expected one of: exact, prefix, dual"
        );
    }

    #[test]
    fn block_lengths_as_written() {
        assert_eq!(parse_block_length("whole"), Ok(None));
        assert_eq!(parse_block_length(" Whole "), Ok(None));
        assert_eq!(parse_block_length("8"), Ok(Some(8)));
        for bad in ["0", "-1", "x", "", "2.5"] {
            let e = parse_block_length(bad).unwrap_err();
            assert!(
                e.starts_with("block_length must be an integer >= 1 or `whole`"),
                "{e}"
            );
        }
        let g: Grid = toml::from_str(
            "block_length = [\"whole\", 8, 4]\ncache_mode = [\"exact\", \"dual\"]\n",
        )
        .unwrap();
        assert_eq!(g.block_length, vec![None, Some(8), Some(4)]);
        assert_eq!(g.cache_mode, vec!["exact", "dual"]);
        assert_eq!(g.configs(16).unwrap().len(), 6);
        let e = toml::from_str::<Grid>("block_length = [0]").unwrap_err();
        assert!(
            e.to_string()
                .contains("block_length must be an integer >= 1"),
            "{e}"
        );
        assert!(toml::from_str::<Grid>("block_length = [\"half\"]").is_err());
        let e = Grid {
            block_length: vec![Some(0)],
            ..Grid::default()
        }
        .configs(16)
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "grid: `block_length` must be >= 1 (or `whole`), got 0"
        );
    }

    #[test]
    fn saved_configurations_of_earlier_versions_keep_their_keys() {
        // As written before the cache mode and block length were dimensions.
        let old = r#"{"threshold":0.9,"alg":"maskgit_plus","pipeline":"dim","use_cache":true,
            "max_new_tokens":16,"steps":16,"load":{"concurrency":1},"seed":0}"#;
        let c: Config = serde_json::from_str(old).unwrap();
        assert_eq!((c.cache_mode, c.block_length), (CacheMode::Prefix, None));
        assert_eq!(c.key(), "dim_maskgit_plus_thr0.9_cache1_n16_s16_c1_seed0");
        // And this version's own files round-trip.
        let now = Grid {
            cache_mode: vec!["dual".into()],
            block_length: vec![Some(4)],
            ..Grid::default()
        }
        .configs(16)
        .unwrap()
        .remove(0);
        let text = serde_json::to_string(&now).unwrap();
        assert!(text.contains("\"cache_mode\":\"dual\"") && text.contains("\"block_length\":4"));
        assert_eq!(serde_json::from_str::<Config>(&text).unwrap(), now);
    }
}
