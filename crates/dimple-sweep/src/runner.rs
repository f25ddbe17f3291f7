//! Offers load for one configuration: closed loop (a fixed number of requests in flight) or
//! open loop (Poisson arrivals at a fixed rate), over every item of the dataset, and records
//! what each request saw. Warm-up requests ([`warm_up`]) go first and are not recorded, so
//! one-time costs (connections, allocations, caches) stay out of the latencies.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::dataset::Item;
use crate::grid::{Config, Load};
use crate::target::{SweepRequest, Target, canonical_code};

/// What one request saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub item: String,
    pub kind: Option<String>,
    /// `OK` or the canonical status code name (`UNAVAILABLE`, ...).
    pub code: String,
    /// The error message of a failed request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The item has a reference answer, so the request counts towards accuracy whether or
    /// not it was answered.
    #[serde(default)]
    pub reference: bool,
    pub latency_s: f64,
    pub first_commit_s: Option<f64>,
    pub steps: usize,
    /// Response slots decoded, padding included.
    pub tokens: usize,
    /// Response tokens before the end token.
    #[serde(default)]
    pub answer_tokens: usize,
    /// Whether the answer was right; `None` for unanswered items and items without a
    /// reference.
    pub correct: Option<bool>,
    pub answer: Option<String>,
}

impl Record {
    pub fn is_ok(&self) -> bool {
        self.code == "OK"
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Show a progress bar with ETA on the terminal.
    pub progress: bool,
    /// Text in front of the progress bar (e.g. `config 2/8 <key>`).
    pub label: String,
    /// Each item is sent this many times.
    pub repeats: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            progress: false,
            label: String::new(),
            repeats: 1,
        }
    }
}

/// Runs `cfg` over `items` and returns one record per request, in completion order, and
/// the wall time the run took.
pub async fn run_config(
    target: Arc<dyn Target>,
    items: &[Arc<Item>],
    cfg: &Config,
    opts: &RunOptions,
) -> (Vec<Record>, Duration) {
    let total = items.len() * opts.repeats.max(1);
    let bar = if opts.progress {
        let b = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}") {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(if opts.label.is_empty() {
            cfg.key()
        } else {
            opts.label.clone()
        });
        b
    } else {
        ProgressBar::hidden()
    };
    let work: Arc<Vec<Arc<Item>>> =
        Arc::new((0..total).map(|i| items[i % items.len()].clone()).collect());
    let started = Instant::now();
    let mut handles = Vec::new();
    match cfg.load {
        Load::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.min(total).max(1) {
                let (target, work, next, bar, cfg) = (
                    target.clone(),
                    work.clone(),
                    next.clone(),
                    bar.clone(),
                    cfg.clone(),
                );
                handles.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = work.get(i) else { break };
                        out.push(one(&*target, item.clone(), &cfg, i).await);
                        bar.inc(1);
                    }
                    out
                }));
            }
        }
        Load::Rate(rate) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
            let mut at = Duration::ZERO;
            for (i, item) in work.iter().enumerate() {
                // Exponential inter-arrival times give a Poisson arrival process.
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                at += Duration::from_secs_f64(-u.ln() / rate);
                let (target, item, bar, cfg) =
                    (target.clone(), item.clone(), bar.clone(), cfg.clone());
                let wait = at.saturating_sub(started.elapsed());
                tokio::time::sleep(wait).await;
                handles.push(tokio::spawn(async move {
                    let r = one(&*target, item, &cfg, i).await;
                    bar.inc(1);
                    vec![r]
                }));
            }
        }
    }
    let mut records = Vec::with_capacity(total);
    for h in handles {
        match h.await {
            Ok(rs) => records.extend(rs),
            Err(e) => records.push(Record {
                item: String::new(),
                kind: None,
                code: "CLIENT_PANIC".into(),
                message: Some(e.to_string()),
                reference: false,
                latency_s: 0.0,
                first_commit_s: None,
                steps: 0,
                tokens: 0,
                answer_tokens: 0,
                correct: None,
                answer: None,
            }),
        }
    }
    bar.finish_and_clear();
    (records, started.elapsed())
}

/// Sends `n` warm-up requests for `cfg` (as many at once as the closed-loop concurrency)
/// and waits for them; nothing is recorded. Run it before [`run_config`] (and before
/// reading server metrics) so that one-time costs stay out of the measures.
pub async fn warm_up(target: Arc<dyn Target>, items: &[Arc<Item>], cfg: &Config, n: usize) {
    if items.is_empty() {
        return;
    }
    let width = match cfg.load {
        Load::Concurrency(c) => c.max(1),
        Load::Rate(_) => n.max(1),
    };
    let mut sent = 0;
    while sent < n {
        let batch: Vec<_> = (sent..n.min(sent + width))
            .map(|i| {
                let (target, item, cfg) =
                    (target.clone(), items[i % items.len()].clone(), cfg.clone());
                // Seeds beyond the measured ones, so a warm-up never shares a seed with them.
                let index = usize::MAX / 2 + i;
                tokio::spawn(async move { one(&*target, item, &cfg, index).await })
            })
            .collect();
        sent += batch.len();
        for h in batch {
            let _ = h.await;
        }
    }
}

async fn one(target: &dyn Target, item: Arc<Item>, cfg: &Config, index: usize) -> Record {
    let params = cfg.params(cfg.seed.wrapping_add(index as u64));
    let sent = Instant::now();
    let result = target
        .generate(SweepRequest {
            item: item.clone(),
            params,
        })
        .await;
    let latency_s = sent.elapsed().as_secs_f64();
    match result {
        Ok(r) => Record {
            item: item.id.clone(),
            kind: item.kind.clone(),
            code: "OK".into(),
            message: None,
            reference: item.reference.is_some(),
            latency_s,
            first_commit_s: r.first_commit.map(|d| d.as_secs_f64()),
            steps: r.steps,
            tokens: r.tokens,
            answer_tokens: r.answer_tokens,
            correct: item.score(&r.text),
            answer: Some(r.text),
        },
        Err(e) => Record {
            item: item.id.clone(),
            kind: item.kind.clone(),
            code: canonical_code(&e.code),
            message: Some(e.message),
            reference: item.reference.is_some(),
            latency_s,
            first_commit_s: None,
            steps: 0,
            tokens: 0,
            answer_tokens: 0,
            correct: None,
            answer: None,
        },
    }
}
