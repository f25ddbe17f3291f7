//! Per-configuration measures computed from the request records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::grid::Config;
use crate::runner::Record;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub key: String,
    pub config: Config,
    pub requests: usize,
    pub ok: usize,
    /// Accuracy over answered items with a reference (`None` when there are none).
    pub accuracy: Option<f64>,
    pub latency_mean_s: f64,
    pub latency_p50_s: f64,
    pub latency_p90_s: f64,
    pub latency_p99_s: f64,
    pub first_commit_mean_s: Option<f64>,
    /// Mean forward passes per answered request (NFE).
    pub nfe_mean: f64,
    /// Response slots decoded per forward pass.
    pub tokens_per_forward: f64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub wall_s: f64,
    pub errors: BTreeMap<String, usize>,
    /// Accuracy per item kind.
    pub accuracy_by_kind: BTreeMap<String, f64>,
    /// Server-side counter deltas over the run (from `/metrics`), when scraped.
    pub server: BTreeMap<String, f64>,
    /// Sorted latencies, for the CDF plot.
    pub latencies_s: Vec<f64>,
}

/// The `q`-quantile (nearest rank) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Summary {
    pub fn from_records(config: &Config, records: &[Record], wall_s: f64) -> Self {
        let ok: Vec<&Record> = records.iter().filter(|r| r.code == "OK").collect();
        let mut lat: Vec<f64> = ok.iter().map(|r| r.latency_s).collect();
        lat.sort_by(f64::total_cmp);
        let scored: Vec<bool> = ok.iter().filter_map(|r| r.correct).collect();
        let accuracy = (!scored.is_empty())
            .then(|| scored.iter().filter(|&&c| c).count() as f64 / scored.len() as f64);
        let firsts: Vec<f64> = ok.iter().filter_map(|r| r.first_commit_s).collect();
        let steps: usize = ok.iter().map(|r| r.steps).sum();
        let tokens: usize = ok.iter().map(|r| r.tokens).sum();
        let mut errors = BTreeMap::new();
        for r in records.iter().filter(|r| r.code != "OK") {
            *errors.entry(r.code.clone()).or_insert(0) += 1;
        }
        let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for r in &ok {
            if let (Some(k), Some(c)) = (&r.kind, r.correct) {
                let e = by_kind.entry(k.clone()).or_default();
                e.0 += 1;
                e.1 += usize::from(c);
            }
        }
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let wall = wall_s.max(1e-9);
        Summary {
            key: config.key(),
            config: config.clone(),
            requests: records.len(),
            ok: ok.len(),
            accuracy,
            latency_mean_s: mean(&lat),
            latency_p50_s: quantile(&lat, 0.5),
            latency_p90_s: quantile(&lat, 0.9),
            latency_p99_s: quantile(&lat, 0.99),
            first_commit_mean_s: (!firsts.is_empty()).then(|| mean(&firsts)),
            nfe_mean: if ok.is_empty() {
                0.0
            } else {
                steps as f64 / ok.len() as f64
            },
            tokens_per_forward: if steps == 0 {
                0.0
            } else {
                tokens as f64 / steps as f64
            },
            tokens_per_s: tokens as f64 / wall,
            requests_per_s: ok.len() as f64 / wall,
            wall_s,
            errors,
            accuracy_by_kind: by_kind
                .into_iter()
                .map(|(k, (n, c))| (k, c as f64 / n as f64))
                .collect(),
            server: BTreeMap::new(),
            latencies_s: lat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::{Grid, Load};

    fn rec(code: &str, lat: f64, steps: usize, correct: Option<bool>) -> Record {
        Record {
            item: "x".into(),
            kind: Some("k".into()),
            code: code.into(),
            latency_s: lat,
            first_commit_s: Some(lat / 2.0),
            steps,
            tokens: 16,
            correct,
            answer: None,
        }
    }

    #[test]
    fn measures_by_hand() {
        let cfg = Grid {
            concurrency: vec![2],
            ..Grid::default()
        }
        .configs(16)
        .unwrap()
        .remove(0);
        assert_eq!(cfg.load, Load::Concurrency(2));
        let records = vec![
            rec("OK", 1.0, 2, Some(true)),
            rec("OK", 3.0, 4, Some(false)),
            rec("OK", 2.0, 6, Some(true)),
            rec("INVALID_ARGUMENT", 0.1, 0, None),
        ];
        let s = Summary::from_records(&cfg, &records, 4.0);
        assert_eq!(s.ok, 3);
        assert_eq!(s.accuracy, Some(2.0 / 3.0));
        assert_eq!(s.latency_p50_s, 2.0);
        assert_eq!(s.latency_p99_s, 3.0);
        assert_eq!(s.latency_mean_s, 2.0);
        assert_eq!(s.nfe_mean, 4.0);
        assert_eq!(s.tokens_per_forward, 48.0 / 12.0);
        assert_eq!(s.tokens_per_s, 12.0);
        assert_eq!(s.requests_per_s, 0.75);
        assert_eq!(s.errors["INVALID_ARGUMENT"], 1);
        assert_eq!(s.accuracy_by_kind["k"], 2.0 / 3.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.9), 4.0);
    }
}
