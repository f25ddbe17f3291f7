//! What the servers expose besides gRPC: every metric name (one place, so dashboards have one
//! reference: `dimple_<subsystem>_<name>_<unit>`, bounded label sets) and a minimal HTTP
//! server for Prometheus' `GET /metrics`.
//!
//! Registries are per server instance (`prometheus::Registry`), never global, so a test can
//! run a router and two workers in one process and read each one's numbers.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Metric names. Labels, where any, are listed with each and take a fixed set of values.
pub mod names {
    /// Counter, labels `rpc` (generate, generate_stream, tokenize, get_model_info) and
    /// `outcome` (see [`super::OUTCOMES`]).
    pub const ROUTER_REQUESTS: &str = "dimple_router_requests_total";
    /// Histogram, label `rpc`: from arrival to the last byte.
    pub const ROUTER_REQUEST_DURATION: &str = "dimple_router_request_duration_seconds";
    /// Histogram: time a request waited on its worker before admission into the batch.
    pub const ROUTER_QUEUE_DURATION: &str = "dimple_router_queue_duration_seconds";
    /// Histogram: from arrival at the worker to the first committed slot.
    pub const ROUTER_FIRST_COMMIT_DURATION: &str = "dimple_router_first_commit_duration_seconds";
    /// Histogram: forward passes a finished request took (NFE).
    pub const ROUTER_REQUEST_STEPS: &str = "dimple_router_request_nfe_steps";
    /// Counter: attempts on another worker after one failed before streaming anything.
    pub const ROUTER_RETRIES: &str = "dimple_router_retries_total";
    /// Counter, label `reason` (`budget`: the router-wide retry budget was spent;
    /// `engine_failed`: the request already failed the engine of two workers): retries not
    /// made.
    pub const ROUTER_RETRIES_DENIED: &str = "dimple_router_retries_denied_total";
    /// Gauge: workers known (static list or etcd).
    pub const ROUTER_WORKERS: &str = "dimple_router_workers_count";
    /// Gauge: generation requests being served.
    pub const ROUTER_INFLIGHT: &str = "dimple_router_inflight_requests";
    /// Gauge, 0 or 1: the router is draining (after SIGTERM, until it exits).
    pub const ROUTER_DRAINING: &str = "dimple_router_draining";

    /// Counter, label `outcome`: generation requests a worker answered.
    pub const WORKER_REQUESTS: &str = "dimple_worker_requests_total";
    /// Gauge: requests received and not yet answered.
    pub const WORKER_OUTSTANDING: &str = "dimple_worker_outstanding_requests";
    /// Gauge, 0 or 1: the worker is draining (after SIGTERM or an engine failure).
    pub const WORKER_DRAINING: &str = "dimple_worker_draining";
    /// Histogram: image bytes to patches, per image.
    pub const WORKER_PREPROCESS_DURATION: &str = "dimple_worker_preprocess_duration_seconds";

    /// Histogram: one packed forward pass plus the step decisions.
    pub const ENGINE_STEP_DURATION: &str = "dimple_engine_step_duration_seconds";
    /// Histogram: sequences in one forward pass.
    pub const ENGINE_BATCH_SIZE: &str = "dimple_engine_batch_size_sequences";
    /// Histogram: tokens in one forward pass.
    pub const ENGINE_STEP_TOKENS: &str = "dimple_engine_step_tokens";
    /// Histogram: response slots committed by one forward pass (all its sequences).
    pub const ENGINE_COMMITTED_PER_FORWARD: &str = "dimple_engine_committed_per_forward_tokens";
    /// Counter: forward passes run.
    pub const ENGINE_FORWARD_PASSES: &str = "dimple_engine_forward_passes_total";
    /// Gauge: prompt K/V cache bytes held by running requests.
    pub const ENGINE_CACHE_USED: &str = "dimple_engine_cache_used_bytes";
    /// Gauge: the cache pool's budget.
    pub const ENGINE_CACHE_BUDGET: &str = "dimple_engine_cache_budget_bytes";
    /// Gauge: requests waiting for admission.
    pub const ENGINE_QUEUE_DEPTH: &str = "dimple_engine_queue_depth_requests";
    /// Gauge: sequences being decoded.
    pub const ENGINE_ACTIVE: &str = "dimple_engine_active_sequences";
}

/// Values of the `outcome` label: one per gRPC status the servers answer with.
pub const OUTCOMES: [&str; 8] = [
    "ok",
    "invalid_argument",
    "resource_exhausted",
    "unavailable",
    "deadline_exceeded",
    "cancelled",
    "unauthenticated",
    "internal",
];

/// The `outcome` label of a gRPC status code (bounded: anything else is `internal`).
pub fn outcome(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "ok",
        tonic::Code::InvalidArgument
        | tonic::Code::OutOfRange
        | tonic::Code::FailedPrecondition => "invalid_argument",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => "unauthenticated",
        _ => "internal",
    }
}

/// Latency buckets in seconds, from sub-millisecond CPU steps to long GPU requests.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// Buckets for counts (steps, batch sizes, tokens).
pub const COUNT_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 16384.0,
];

/// Creates a histogram with `buckets` and registers it in `registry`.
pub fn register_histogram(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<prometheus::Histogram> {
    let h = prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Creates an integer gauge and registers it in `registry`.
pub fn register_gauge(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
) -> prometheus::Result<prometheus::IntGauge> {
    let g = prometheus::IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Produces the exposition text on each scrape (so gauges can be refreshed first).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A renderer that encodes every metric of `registry` in the Prometheus text format.
pub fn render_registry(registry: &prometheus::Registry) -> String {
    let encoder = prometheus::TextEncoder::new();
    encoder
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes. Other paths get 404.
pub async fn serve_metrics(
    listener: TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Accept errors (for example too many open files) are transient.
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(respond(&req, &render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render(),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: try GET /metrics\n".to_owned(),
            )
        };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Reads the value of an unlabelled metric (or the sum over all its label sets) from
/// Prometheus text. For tests and quick checks.
pub fn scrape_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = key.split('{').next().unwrap_or(key);
        if metric == name
            && let Ok(v) = value.parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        let all = [
            names::ROUTER_REQUESTS,
            names::ROUTER_REQUEST_DURATION,
            names::ROUTER_QUEUE_DURATION,
            names::ROUTER_FIRST_COMMIT_DURATION,
            names::ROUTER_REQUEST_STEPS,
            names::ROUTER_RETRIES,
            names::ROUTER_WORKERS,
            names::ROUTER_INFLIGHT,
            names::WORKER_REQUESTS,
            names::WORKER_OUTSTANDING,
            names::WORKER_PREPROCESS_DURATION,
            names::ENGINE_STEP_DURATION,
            names::ENGINE_BATCH_SIZE,
            names::ENGINE_STEP_TOKENS,
            names::ENGINE_COMMITTED_PER_FORWARD,
            names::ENGINE_FORWARD_PASSES,
            names::ENGINE_CACHE_USED,
            names::ENGINE_CACHE_BUDGET,
            names::ENGINE_QUEUE_DEPTH,
            names::ENGINE_ACTIVE,
        ];
        for n in all {
            let parts: Vec<&str> = n.split('_').collect();
            assert_eq!(parts[0], "dimple", "{n}");
            assert!(["router", "worker", "engine"].contains(&parts[1]), "{n}");
            assert!(parts.len() >= 4, "{n} needs a name and a unit");
        }
        // Flags (0 or 1) have no unit.
        for n in [names::ROUTER_DRAINING, names::WORKER_DRAINING] {
            assert_eq!(n.split('_').count(), 3, "{n}");
        }
        let mut sorted = all.to_vec();
        sorted.extend([names::ROUTER_DRAINING, names::WORKER_DRAINING]);
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len() + 2, "names are unique");
    }

    #[test]
    fn scrape_sums_label_sets() {
        let text = "# HELP x y\nfoo_total{a=\"1\"} 2\nfoo_total{a=\"2\"} 3\nfoo_bar 7\n";
        assert_eq!(scrape_value(text, "foo_total"), Some(5.0));
        assert_eq!(scrape_value(text, "foo_bar"), Some(7.0));
        assert_eq!(scrape_value(text, "missing"), None);
    }

    #[test]
    fn outcomes_are_bounded() {
        for code in [
            tonic::Code::Ok,
            tonic::Code::Aborted,
            tonic::Code::Unknown,
            tonic::Code::InvalidArgument,
        ] {
            assert!(OUTCOMES.contains(&outcome(code)));
        }
    }
}
