//! The router's metrics (names in `dimple_proto::telemetry::names`).

use dimple_proto::telemetry::{
    COUNT_BUCKETS, LATENCY_BUCKETS, OUTCOMES, names, register_gauge as gauge,
    register_histogram as histogram,
};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Values of the `rpc` label.
/// (the HTTP API's routes count as rpcs too).
pub const RPCS: [&str; 7] = [
    "generate",
    "generate_stream",
    "tokenize",
    "get_model_info",
    "http_chat_completions",
    "http_tokenize",
    "http_models",
];

/// Values of the `reason` label of denied retries.
pub const RETRY_DENIALS: [&str; 2] = ["budget", "engine_failed"];

#[derive(Clone)]
pub struct RouterMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    queue: Histogram,
    first_commit: Histogram,
    steps: Histogram,
    retries: IntCounter,
    retries_denied: IntCounterVec,
    workers: IntGauge,
    inflight: IntGauge,
    draining: IntGauge,
}

impl RouterMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                names::ROUTER_REQUESTS,
                "Requests answered, by rpc and outcome.",
            ),
            &["rpc", "outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        for rpc in RPCS {
            for o in OUTCOMES {
                requests.with_label_values(&[rpc, o]);
            }
        }
        let duration = HistogramVec::new(
            HistogramOpts::new(
                names::ROUTER_REQUEST_DURATION,
                "Request latency from arrival to answer.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["rpc"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let retries = IntCounter::new(
            names::ROUTER_RETRIES,
            "Attempts on another worker after a failure.",
        )?;
        registry.register(Box::new(retries.clone()))?;
        let retries_denied = IntCounterVec::new(
            Opts::new(
                names::ROUTER_RETRIES_DENIED,
                "Retries not made: the retry budget was spent, or the request failed two engines.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(retries_denied.clone()))?;
        for r in RETRY_DENIALS {
            retries_denied.with_label_values(&[r]);
        }
        let workers = gauge(registry, names::ROUTER_WORKERS, "Workers known.")?;
        let inflight = gauge(
            registry,
            names::ROUTER_INFLIGHT,
            "Generation requests being served.",
        )?;
        let draining = gauge(
            registry,
            names::ROUTER_DRAINING,
            "1 while the router drains (after SIGTERM), else 0.",
        )?;
        Ok(Self {
            draining,
            requests,
            duration,
            queue: histogram(
                registry,
                names::ROUTER_QUEUE_DURATION,
                "Wait for admission on the worker.",
                &LATENCY_BUCKETS,
            )?,
            first_commit: histogram(
                registry,
                names::ROUTER_FIRST_COMMIT_DURATION,
                "Time to the first committed slot, on the worker.",
                &LATENCY_BUCKETS,
            )?,
            steps: histogram(
                registry,
                names::ROUTER_REQUEST_STEPS,
                "Forward passes per request (NFE).",
                &COUNT_BUCKETS,
            )?,
            retries,
            retries_denied,
            workers,
            inflight,
        })
    }

    pub fn observe_request(&self, rpc: &str, outcome: &str, seconds: f64) {
        self.requests.with_label_values(&[rpc, outcome]).inc();
        self.duration.with_label_values(&[rpc]).observe(seconds);
    }

    /// Counts a call answered before it reached the service (no latency to record).
    pub fn count_request(&self, rpc: &str, outcome: &str) {
        self.requests.with_label_values(&[rpc, outcome]).inc();
    }

    /// Worker-side timings of a finished request.
    pub fn observe_finished(&self, queue_ms: f64, first_commit_ms: Option<f64>, steps: u32) {
        self.queue.observe(queue_ms / 1e3);
        if let Some(ms) = first_commit_ms {
            self.first_commit.observe(ms / 1e3);
        }
        self.steps.observe(f64::from(steps));
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    /// A retry not made; `reason` is one of [`RETRY_DENIALS`].
    pub fn retry_denied(&self, reason: &'static str) {
        self.retries_denied.with_label_values(&[reason]).inc();
    }

    pub fn set_workers(&self, n: usize) {
        self.workers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_draining(&self) {
        self.draining.set(1);
    }

    pub fn inflight(&self) -> &IntGauge {
        &self.inflight
    }
}
