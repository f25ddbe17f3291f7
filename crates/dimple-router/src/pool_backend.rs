//! [`PoolBackend`]: the worker pool as a [`Backend`] — the router's way of decoding.
//!
//! Workers are tried in the pool's order (least outstanding work first). A worker that fails
//! before anything reached the client (unreachable, queue full, draining, or a broken stream
//! before the first streamed step) is replaced by the next one; once steps have been
//! streamed, a failure ends the request with UNAVAILABLE. The deadline is sent on to the
//! worker; dropping the call cancels the request on the worker.

use std::sync::Arc;
use std::time::Duration;

use dimple_proto::convert::parse_finish_reason;
use dimple_proto::worker;
use tokio::time::Instant;
use tonic::{Request, Status};

use crate::RouterError;
use crate::backend::{Backend, BackendFinished, BackendStep, BackendTimings, StepSink};
use crate::metrics::RouterMetrics;
use crate::pool::{WorkerEntry, WorkerPool};
use crate::validate::{ModelView, ValidRequest};

/// Workers tried for one request at most.
const MAX_ATTEMPTS: usize = 8;
/// How long a worker may take to describe its model.
const INFO_TIMEOUT: Duration = Duration::from_secs(3);

/// Decodes on the workers of a pool.
pub struct PoolBackend {
    pool: WorkerPool,
    metrics: Arc<RouterMetrics>,
}

impl PoolBackend {
    pub fn new(pool: WorkerPool, metrics: Arc<RouterMetrics>) -> Self {
        Self { pool, metrics }
    }
}

#[tonic::async_trait]
impl Backend for PoolBackend {
    async fn model(&self) -> Result<ModelView, RouterError> {
        let info = self.pool.model_info(INFO_TIMEOUT).await?;
        Ok(ModelView::from(&info))
    }

    async fn generate(
        &self,
        req: &ValidRequest,
        deadline: Instant,
        steps: StepSink,
    ) -> Result<BackendFinished, RouterError> {
        dispatch(self, req, deadline, steps.as_ref()).await
    }

    fn ready(&self) -> bool {
        self.pool.any_ready()
    }

    fn replicas(&self) -> usize {
        self.pool.len()
    }
}

/// Why one attempt on one worker ended without an answer.
enum AttemptError {
    /// Nothing reached the client: another worker may take the request.
    Retry(Status),
    Final(RouterError),
}

/// Whether a worker's status means "try another worker" (rather than "this request is
/// wrong" or "its time is up"). CANCELLED counts as a failure: the router only cancels a
/// worker call by dropping it, after which it reads nothing more.
fn retryable(s: &Status) -> bool {
    !matches!(
        s.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::OutOfRange
            | tonic::Code::FailedPrecondition
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
    )
}

/// Serves `valid` on the best worker, retrying on others while nothing was streamed.
async fn dispatch(
    backend: &PoolBackend,
    valid: &ValidRequest,
    deadline: Instant,
    tx: Option<&tokio::sync::mpsc::Sender<BackendStep>>,
) -> Result<BackendFinished, RouterError> {
    let ranked = backend.pool.ranked();
    if ranked.is_empty() {
        return Err(RouterError::NoWorkers);
    }
    let wire = worker::GenerateRequest {
        request_id: valid.request_id.clone(),
        prompt_ids: valid.prompt_ids.clone(),
        images: valid.images.clone(),
        params: Some((&valid.params).into()),
    };
    let budget = backend.pool.retry_budget();
    budget.record_request();
    let mut failures = Vec::new();
    let mut exhausted = 0;
    let mut engine_failures = 0;
    let mut budget_spent = false;
    for (attempt, entry) in ranked.iter().take(MAX_ATTEMPTS).enumerate() {
        if attempt > 0 {
            if !budget.try_retry() {
                backend.metrics.retry_denied("budget");
                budget_spent = true;
                break;
            }
            backend.metrics.retry();
            tracing::debug!(addr = %entry.addr, attempt, "retrying on another worker");
        }
        match attempt_on(entry, &wire, deadline, tx).await {
            Ok(resp) => return Ok(resp),
            Err(AttemptError::Final(e)) => return Err(e),
            // A failure at or after the deadline is the deadline's doing, not the worker's.
            Err(AttemptError::Retry(_)) if Instant::now() >= deadline => {
                return Err(RouterError::Deadline("no answer in time".into()));
            }
            Err(AttemptError::Retry(s)) => {
                if s.code() == tonic::Code::ResourceExhausted {
                    exhausted += 1;
                } else {
                    entry.mark_failed();
                }
                tracing::warn!(addr = %entry.addr, code = ?s.code(), error = %s.message(), "worker attempt failed");
                failures.push(format!("{}: {}", entry.addr, s.message()));
                // The request may be what broke the engine: one more worker may try it,
                // not every worker.
                if dimple_proto::failure::is_engine_failed(&s) {
                    engine_failures += 1;
                    if engine_failures > 1 {
                        backend.metrics.retry_denied("engine_failed");
                        return Err(RouterError::Unavailable(format!(
                            "the engines of {engine_failures} workers failed while serving this request; \
                             it is not retried further ({})",
                            failures.join("; ")
                        )));
                    }
                }
            }
        }
    }
    let mut detail = failures.join("; ");
    if budget_spent {
        detail.push_str("; not retried further: the router's retry budget is spent");
    }
    if exhausted == failures.len() {
        Err(RouterError::Exhausted(format!(
            "every worker's queue is full ({detail})"
        )))
    } else {
        Err(RouterError::Unavailable(format!(
            "no worker could serve the request ({detail})"
        )))
    }
}

async fn attempt_on(
    entry: &Arc<WorkerEntry>,
    wire: &worker::GenerateRequest,
    deadline: Instant,
    tx: Option<&tokio::sync::mpsc::Sender<BackendStep>>,
) -> Result<BackendFinished, AttemptError> {
    let _inflight = entry.begin();
    let mut req = Request::new(wire.clone());
    req.set_timeout(deadline.saturating_duration_since(Instant::now()));
    let down = entry.went_down();
    tokio::pin!(down);
    let mut client = entry.client();
    let call = tokio::select! {
        r = client.generate(req) => r,
        _ = &mut down => Err(stopped_answering(entry)),
    };
    let mut stream = match call {
        Ok(r) => r.into_inner(),
        Err(s) if retryable(&s) => return Err(AttemptError::Retry(s)),
        Err(s) => return Err(AttemptError::Final(RouterError::Worker(s))),
    };
    let mut streamed = false;
    loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = closed(tx) => return Err(AttemptError::Final(RouterError::Cancelled)),
            // The worker stopped answering polls (frozen, partitioned): waiting for the
            // connection to time out would stall this request for many seconds.
            _ = &mut down => Err(stopped_answering(entry)),
        };
        let failure = match next {
            Ok(Some(worker::GenerateEvent {
                event: Some(worker::generate_event::Event::Step(step)),
            })) => {
                if let Some(tx) = tx {
                    let step = BackendStep {
                        step: step.step,
                        committed: step
                            .committed
                            .iter()
                            .map(|c| (c.position as usize, c.token_id))
                            .collect(),
                        block: step.block,
                    };
                    if tx.send(step).await.is_err() {
                        return Err(AttemptError::Final(RouterError::Cancelled));
                    }
                    streamed = true;
                }
                continue;
            }
            Ok(Some(worker::GenerateEvent {
                event: Some(worker::generate_event::Event::Finished(f)),
            })) => {
                if let Some(load) = &f.load {
                    entry.record_load(load);
                }
                let finish_reason = parse_finish_reason(&f.finish_reason).map_err(|e| {
                    AttemptError::Final(RouterError::Internal(format!("worker answer: {e}")))
                })?;
                return Ok(BackendFinished {
                    response_ids: f.response_ids,
                    steps: f.steps,
                    finish_reason,
                    timings: BackendTimings {
                        queue_ms: f.queue_ms,
                        first_commit_ms: f.first_commit_ms,
                        total_ms: f.total_ms,
                    },
                });
            }
            // An event kind this router does not know: skip it.
            Ok(Some(worker::GenerateEvent { event: None })) => continue,
            Ok(None) => Status::unavailable("the worker ended the stream without a final message"),
            Err(s) => s,
        };
        // A call cut at the deadline (by tonic's timer or the worker's) is no worker fault.
        if Instant::now() >= deadline && failure.code() != tonic::Code::InvalidArgument {
            return Err(AttemptError::Final(RouterError::Deadline(
                "no answer in time".into(),
            )));
        }
        if !streamed && retryable(&failure) {
            return Err(AttemptError::Retry(failure));
        }
        if retryable(&failure) {
            entry.mark_failed();
            return Err(AttemptError::Final(RouterError::Unavailable(format!(
                "worker {} failed after streaming began: {}",
                entry.addr,
                failure.message()
            ))));
        }
        return Err(AttemptError::Final(RouterError::Worker(failure)));
    }
}

fn stopped_answering(entry: &WorkerEntry) -> Status {
    Status::unavailable(format!("worker {} stopped answering", entry.addr))
}

/// Completes when the streaming client has gone away; never for a unary call.
async fn closed(tx: Option<&tokio::sync::mpsc::Sender<BackendStep>>) {
    match tx {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_worker_statuses_are_retried() {
        assert!(!retryable(&Status::invalid_argument("x")));
        assert!(!retryable(&Status::deadline_exceeded("x")));
        assert!(retryable(&Status::unavailable("x")));
        assert!(retryable(&Status::resource_exhausted("x")));
        assert!(retryable(&Status::unknown("connection reset")));
    }
}
