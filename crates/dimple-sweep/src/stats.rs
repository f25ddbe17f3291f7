//! Per-configuration measures computed from the request records.
//!
//! A configuration is complete only when every request was answered. Accuracy is given two
//! ways: over every item with a reference (an unanswered item counts as wrong), with a 95%
//! Wilson interval, and over the answered items alone. Throughput counts answer tokens (up to
//! the end token); response slots, padding included, are reported separately.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::grid::Config;
use crate::runner::Record;

/// Distinct error messages kept per status code.
pub const MESSAGES_KEPT: usize = 3;

/// Failed requests with one status code.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorCount {
    pub count: usize,
    /// The first distinct messages, in the order they were seen.
    pub messages: Vec<String>,
}

/// Accuracy of one item kind (unanswered items count as wrong).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindAccuracy {
    pub items: usize,
    pub correct: usize,
    pub accuracy: f64,
}

/// A server gauge read before and after a configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaugeChange {
    pub before: Option<f64>,
    pub after: Option<f64>,
}

/// Server metrics over a configuration, one entry per series (labels kept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerMetrics {
    /// `after - before` of counters and of histogram/summary sums and counts.
    pub counters: BTreeMap<String, f64>,
    pub gauges: BTreeMap<String, GaugeChange>,
}

impl ServerMetrics {
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.gauges.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub key: String,
    pub config: Config,
    pub requests: usize,
    pub ok: usize,
    /// Every request was answered. Incomplete configurations are kept in the report as
    /// failed, left out of the plots, and run again on resume.
    pub complete: bool,
    /// Items with a reference (the denominator of `accuracy`).
    pub scored: usize,
    /// Items answered right.
    pub correct: usize,
    /// Correct answers over every item with a reference, unanswered ones counted wrong
    /// (`None` when no item has a reference).
    pub accuracy: Option<f64>,
    /// The 95% Wilson score interval of `accuracy`.
    pub accuracy_ci95: Option<(f64, f64)>,
    /// Correct answers over the answered items with a reference.
    pub accuracy_answered: Option<f64>,
    pub latency_mean_s: f64,
    pub latency_p50_s: f64,
    pub latency_p90_s: f64,
    pub latency_p99_s: f64,
    /// Time to first commit: from sending until the first response slot was committed.
    pub first_commit_p50_s: Option<f64>,
    pub first_commit_p99_s: Option<f64>,
    /// Median of each request's latency divided by its forward passes.
    pub step_latency_p50_s: f64,
    /// Mean forward passes per answered request (NFE).
    pub nfe_mean: f64,
    /// Answer tokens (before the end token) per forward pass.
    pub answer_tokens_per_forward: f64,
    /// Answer tokens per second of wall time: the headline throughput.
    pub answer_tokens_per_s: f64,
    /// Response slots (padding included) per second of wall time.
    pub slots_per_s: f64,
    pub requests_per_s: f64,
    /// The latency objective goodput is measured against.
    pub slo_s: Option<f64>,
    /// Requests answered within `slo_s`, per second of wall time.
    pub goodput_rps: Option<f64>,
    /// Share of all requests answered within `slo_s`.
    pub slo_attainment: Option<f64>,
    pub wall_s: f64,
    pub errors: BTreeMap<String, ErrorCount>,
    pub accuracy_by_kind: BTreeMap<String, KindAccuracy>,
    /// Server-side metrics over the run (from `/metrics`), when read.
    #[serde(default, skip_serializing_if = "ServerMetrics::is_empty")]
    pub server: ServerMetrics,
    /// Sorted latencies of answered requests, for the CDF plot.
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

/// The 95% Wilson score interval for `correct` successes out of `n`.
pub fn wilson95(correct: usize, n: usize) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    const Z: f64 = 1.959_963_984_540_054;
    let n_f = n as f64;
    let p = correct as f64 / n_f;
    let z2 = Z * Z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = Z / denom * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

impl Summary {
    /// Measures of `records`, with goodput counted against `slo_s` when given.
    pub fn from_records(
        config: &Config,
        records: &[Record],
        wall_s: f64,
        slo_s: Option<f64>,
    ) -> Self {
        let ok: Vec<&Record> = records.iter().filter(|r| r.is_ok()).collect();
        let lat = sorted(ok.iter().map(|r| r.latency_s).collect());
        let firsts = sorted(ok.iter().filter_map(|r| r.first_commit_s).collect());
        let per_step = sorted(
            ok.iter()
                .filter(|r| r.steps > 0)
                .map(|r| r.latency_s / r.steps as f64)
                .collect(),
        );
        let steps: usize = ok.iter().map(|r| r.steps).sum();
        let slots: usize = ok.iter().map(|r| r.tokens).sum();
        let answer_tokens: usize = ok.iter().map(|r| r.answer_tokens).sum();
        let mut errors: BTreeMap<String, ErrorCount> = BTreeMap::new();
        for r in records.iter().filter(|r| !r.is_ok()) {
            let e = errors.entry(r.code.clone()).or_default();
            e.count += 1;
            if let Some(m) = &r.message
                && e.messages.len() < MESSAGES_KEPT
                && !e.messages.contains(m)
            {
                e.messages.push(m.clone());
            }
        }
        let answered_scored: Vec<bool> = ok.iter().filter_map(|r| r.correct).collect();
        let scored_records: Vec<&Record> = records.iter().filter(|r| r.reference).collect();
        let scored = scored_records.len();
        let correct = scored_records
            .iter()
            .filter(|r| r.correct == Some(true))
            .count();
        let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for r in &scored_records {
            if let Some(k) = &r.kind {
                let e = by_kind.entry(k.clone()).or_default();
                e.0 += 1;
                e.1 += usize::from(r.correct == Some(true));
            }
        }
        let wall = wall_s.max(1e-9);
        let within = slo_s.map(|slo| lat.iter().filter(|&&l| l <= slo).count());
        Summary {
            key: config.key(),
            config: config.clone(),
            requests: records.len(),
            ok: ok.len(),
            complete: !records.is_empty() && ok.len() == records.len(),
            scored,
            correct,
            accuracy: (scored > 0).then(|| correct as f64 / scored as f64),
            accuracy_ci95: wilson95(correct, scored),
            accuracy_answered: (!answered_scored.is_empty()).then(|| {
                answered_scored.iter().filter(|&&c| c).count() as f64 / answered_scored.len() as f64
            }),
            latency_mean_s: ratio(lat.iter().sum(), lat.len() as f64),
            latency_p50_s: quantile(&lat, 0.5),
            latency_p90_s: quantile(&lat, 0.9),
            latency_p99_s: quantile(&lat, 0.99),
            first_commit_p50_s: (!firsts.is_empty()).then(|| quantile(&firsts, 0.5)),
            first_commit_p99_s: (!firsts.is_empty()).then(|| quantile(&firsts, 0.99)),
            step_latency_p50_s: quantile(&per_step, 0.5),
            nfe_mean: ratio(steps as f64, ok.len() as f64),
            answer_tokens_per_forward: ratio(answer_tokens as f64, steps as f64),
            answer_tokens_per_s: answer_tokens as f64 / wall,
            slots_per_s: slots as f64 / wall,
            requests_per_s: ok.len() as f64 / wall,
            slo_s,
            goodput_rps: within.map(|n| n as f64 / wall),
            slo_attainment: within.map(|n| ratio(n as f64, records.len() as f64)),
            wall_s,
            errors,
            accuracy_by_kind: by_kind
                .into_iter()
                .map(|(k, (n, c))| {
                    (
                        k,
                        KindAccuracy {
                            items: n,
                            correct: c,
                            accuracy: c as f64 / n as f64,
                        },
                    )
                })
                .collect(),
            server: ServerMetrics::default(),
            latencies_s: lat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::{Grid, Load};

    fn rec(item: &str, code: &str, lat: f64, steps: usize, correct: Option<bool>) -> Record {
        Record {
            item: item.into(),
            kind: Some("k".into()),
            code: code.into(),
            message: (code != "OK").then(|| format!("{code} happened")),
            reference: true,
            latency_s: lat,
            first_commit_s: (code == "OK").then_some(lat / 2.0),
            steps,
            tokens: if code == "OK" { 16 } else { 0 },
            answer_tokens: if code == "OK" { 2 } else { 0 },
            correct,
            answer: None,
        }
    }

    fn config() -> Config {
        let cfg = Grid {
            concurrency: vec![2],
            ..Grid::default()
        }
        .configs(16)
        .unwrap()
        .remove(0);
        assert_eq!(cfg.load, Load::Concurrency(2));
        cfg
    }

    #[test]
    fn measures_by_hand() {
        let records = vec![
            rec("a", "OK", 1.0, 2, Some(true)),
            rec("b", "OK", 3.0, 4, Some(false)),
            rec("c", "OK", 2.0, 6, Some(true)),
            rec("d", "INVALID_ARGUMENT", 0.1, 0, None),
        ];
        let s = Summary::from_records(&config(), &records, 4.0, Some(2.5));
        assert_eq!(s.ok, 3);
        assert!(!s.complete, "one request failed");
        assert_eq!(s.scored, 4);
        assert_eq!(
            s.accuracy,
            Some(2.0 / 4.0),
            "the unanswered item counts as wrong"
        );
        assert_eq!(s.accuracy_answered, Some(2.0 / 3.0));
        assert_eq!(s.latency_p50_s, 2.0);
        assert_eq!(s.latency_p99_s, 3.0);
        assert_eq!(s.latency_mean_s, 2.0);
        assert_eq!(s.first_commit_p50_s, Some(1.0));
        assert_eq!(s.step_latency_p50_s, 0.5, "per step: 0.5, 0.75, 1/3");
        assert_eq!(s.nfe_mean, 4.0);
        assert_eq!(s.answer_tokens_per_forward, 6.0 / 12.0);
        assert_eq!(s.answer_tokens_per_s, 6.0 / 4.0);
        assert_eq!(s.slots_per_s, 48.0 / 4.0);
        assert_eq!(s.requests_per_s, 0.75);
        assert_eq!(s.goodput_rps, Some(2.0 / 4.0), "two answered within 2.5 s");
        assert_eq!(s.slo_attainment, Some(2.0 / 4.0));
        assert_eq!(s.errors["INVALID_ARGUMENT"].count, 1);
        assert_eq!(
            s.errors["INVALID_ARGUMENT"].messages,
            vec!["INVALID_ARGUMENT happened".to_string()]
        );
        assert_eq!(s.accuracy_by_kind["k"].accuracy, 2.0 / 4.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.9), 4.0);
    }

    #[test]
    fn complete_only_when_every_request_answered() {
        let all_ok = vec![rec("a", "OK", 1.0, 2, Some(true))];
        assert!(Summary::from_records(&config(), &all_ok, 1.0, None).complete);
        assert!(!Summary::from_records(&config(), &[], 1.0, None).complete);
    }

    #[test]
    fn error_messages_are_distinct_and_bounded() {
        let mut records = Vec::new();
        for i in 0..10 {
            let mut r = rec("x", "UNAVAILABLE", 0.1, 0, None);
            r.message = Some(format!("connection refused {}", i % 5));
            records.push(r);
            records.push(rec("x", "UNAVAILABLE", 0.1, 0, None));
        }
        let s = Summary::from_records(&config(), &records, 1.0, None);
        let e = &s.errors["UNAVAILABLE"];
        assert_eq!(e.count, 20);
        assert_eq!(e.messages.len(), MESSAGES_KEPT);
        assert_eq!(e.messages[0], "connection refused 0");
        assert_eq!(e.messages[1], "UNAVAILABLE happened");
        assert_eq!(s.accuracy, Some(0.0));
        assert_eq!(s.accuracy_answered, None);
    }

    #[test]
    fn wilson_interval() {
        // Symmetric around one half, inside [0, 1], narrower with more data, and the
        // textbook value for 8 of 10 (0.490, 0.943).
        let (lo, hi) = wilson95(5, 10).unwrap();
        assert!((lo + hi - 1.0).abs() < 1e-12);
        let (lo, hi) = wilson95(8, 10).unwrap();
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo0, hi0) = wilson95(0, 20).unwrap();
        assert_eq!(lo0, 0.0);
        assert!(hi0 > 0.0 && hi0 < 0.2);
        let (a, b) = wilson95(80, 100).unwrap();
        assert!(b - a < hi - lo);
        assert_eq!(wilson95(0, 0), None);
    }
}
