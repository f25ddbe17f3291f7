//! The worker's and its engine's metrics (names in `dimple_proto::telemetry::names`).
//! Step metrics come from the engine's step hook; gauges are refreshed from the engine's
//! stats on each scrape.

use std::sync::Arc;

use dimple_engine::{EngineStats, StepReport};
use dimple_proto::telemetry::{
    COUNT_BUCKETS, LATENCY_BUCKETS, OUTCOMES, names, register_gauge as gauge,
    register_histogram as histogram,
};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct WorkerMetrics {
    requests: IntCounterVec,
    outstanding: IntGauge,
    preprocess: Histogram,
    step_duration: Histogram,
    batch_size: Histogram,
    step_tokens: Histogram,
    committed: Histogram,
    forward_passes: IntCounter,
    cache_used: IntGauge,
    cache_budget: IntGauge,
    queue_depth: IntGauge,
    active: IntGauge,
    draining: IntGauge,
}

impl WorkerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                names::WORKER_REQUESTS,
                "Generation requests answered, by outcome.",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        // Every outcome shows up from the start, so rates work before the first failure.
        for o in OUTCOMES {
            requests.with_label_values(&[o]);
        }
        let forward_passes = IntCounter::new(names::ENGINE_FORWARD_PASSES, "Forward passes run.")?;
        registry.register(Box::new(forward_passes.clone()))?;
        Ok(Self {
            requests,
            outstanding: gauge(
                registry,
                names::WORKER_OUTSTANDING,
                "Requests received and not yet answered.",
            )?,
            preprocess: histogram(
                registry,
                names::WORKER_PREPROCESS_DURATION,
                "Image preprocessing time per image.",
                &LATENCY_BUCKETS,
            )?,
            step_duration: histogram(
                registry,
                names::ENGINE_STEP_DURATION,
                "Duration of one packed forward pass and its step decisions.",
                &LATENCY_BUCKETS,
            )?,
            batch_size: histogram(
                registry,
                names::ENGINE_BATCH_SIZE,
                "Sequences per forward pass.",
                &COUNT_BUCKETS,
            )?,
            step_tokens: histogram(
                registry,
                names::ENGINE_STEP_TOKENS,
                "Tokens per forward pass.",
                &COUNT_BUCKETS,
            )?,
            committed: histogram(
                registry,
                names::ENGINE_COMMITTED_PER_FORWARD,
                "Response slots committed per forward pass.",
                &[
                    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                ],
            )?,
            forward_passes,
            cache_used: gauge(
                registry,
                names::ENGINE_CACHE_USED,
                "Prompt K/V cache bytes held.",
            )?,
            cache_budget: gauge(
                registry,
                names::ENGINE_CACHE_BUDGET,
                "Prompt K/V cache budget in bytes.",
            )?,
            queue_depth: gauge(
                registry,
                names::ENGINE_QUEUE_DEPTH,
                "Requests waiting for admission.",
            )?,
            active: gauge(registry, names::ENGINE_ACTIVE, "Sequences being decoded.")?,
            draining: gauge(
                registry,
                names::WORKER_DRAINING,
                "1 while the worker drains (after SIGTERM or an engine failure), else 0.",
            )?,
        })
    }

    /// The engine's step hook feeding these metrics.
    pub fn step_hook(self: &Arc<Self>) -> Box<dyn Fn(&StepReport) + Send> {
        let me = self.clone();
        Box::new(move |r: &StepReport| me.observe_step(r))
    }

    /// Called by the engine thread after every step.
    pub fn observe_step(&self, r: &StepReport) {
        self.forward_passes.inc();
        self.step_duration.observe(r.seconds);
        self.batch_size.observe(r.batch_size as f64);
        self.step_tokens.observe(r.tokens as f64);
        self.committed.observe(r.committed as f64);
    }

    pub fn observe_preprocess(&self, seconds: f64) {
        self.preprocess.observe(seconds);
    }

    pub fn count_request(&self, outcome: &str) {
        self.requests.with_label_values(&[outcome]).inc();
    }

    /// Copies the engine's current load into the gauges.
    pub fn refresh(&self, stats: &EngineStats, outstanding: usize, draining: bool) {
        self.draining.set(i64::from(draining));
        let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.cache_used.set(int(stats.cache_used_bytes));
        self.cache_budget.set(int(stats.cache_budget_bytes));
        self.queue_depth.set(int(stats.waiting));
        self.active.set(int(stats.active));
        self.outstanding.set(int(outstanding));
    }
}
