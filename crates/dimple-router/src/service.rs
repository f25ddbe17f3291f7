//! The public `dimple.v1.Dimple` service.
//!
//! A generation request is converted and validated once, then dispatched: workers are tried
//! in the pool's order (least outstanding work first). A worker that fails before anything
//! reached the client (unreachable, queue full, draining, or a broken stream before the first
//! streamed step) is replaced by the next one; once steps have been streamed, a failure ends
//! the stream with UNAVAILABLE. The deadline (the client's `grpc-timeout`, capped by the
//! server's request timeout) is enforced here and sent on to the worker; a client that goes
//! away drops the worker call, which cancels the request on the worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dimple_proto::convert::{
    GenerateInput, PromptInput, chat_input, parse_finish_reason, public_finish_reason, sat_u32,
};
use dimple_proto::deadline::grpc_timeout;
use dimple_proto::telemetry::outcome;
use dimple_proto::{v1, worker};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::RouterError;
use crate::metrics::RouterMetrics;
use crate::pool::{WorkerEntry, WorkerPool};
use crate::prompt::PromptBuilder;
use crate::validate::{ModelView, ValidRequest, Validator};

/// Workers tried for one request at most.
const MAX_ATTEMPTS: usize = 8;
/// How long a worker may take to describe its model.
const INFO_TIMEOUT: Duration = Duration::from_secs(3);
/// The most a client's deadline is shortened by so that our answer beats its own timer.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Limits the service applies itself.
#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    /// Upper bound of every request's deadline.
    pub request_timeout: Duration,
    /// Reported in `ModelInfo.limits`.
    pub max_message_bytes: usize,
    /// Generation requests this router serves at once at most; beyond, RESOURCE_EXHAUSTED
    /// at once (0: no limit).
    pub max_pending: usize,
}

/// What every call shares.
pub struct RouterState {
    pub pool: WorkerPool,
    pub validator: Validator,
    pub metrics: RouterMetrics,
    pub limits: ServiceLimits,
    next_id: AtomicU64,
    /// Places for generation requests (`limits.max_pending`), `None` without a limit.
    pending: Option<Arc<tokio::sync::Semaphore>>,
}

impl RouterState {
    pub fn new(
        pool: WorkerPool,
        validator: Validator,
        metrics: RouterMetrics,
        limits: ServiceLimits,
    ) -> Self {
        Self {
            pool,
            validator,
            metrics,
            limits,
            next_id: AtomicU64::new(1),
            pending: (limits.max_pending > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(limits.max_pending))),
        }
    }

    /// A place for one generation request, held until it is answered; refused at once when
    /// `max_pending` requests are in flight.
    fn admit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, RouterError> {
        let Some(pending) = &self.pending else {
            return Ok(None);
        };
        pending.clone().try_acquire_owned().map(Some).map_err(|_| {
            RouterError::Exhausted(format!(
                "the router is serving its limit of {} requests (`max_pending`)",
                self.limits.max_pending
            ))
        })
    }

    fn prompt(&self) -> &PromptBuilder {
        self.validator.prompt_builder()
    }
}

/// The gRPC face of the router. Cheap to clone.
#[derive(Clone)]
pub struct RouterService {
    state: Arc<RouterState>,
}

impl RouterService {
    pub fn new(state: Arc<RouterState>) -> Self {
        Self { state }
    }

    fn deadline(&self, meta: &tonic::metadata::MetadataMap) -> Instant {
        let cap = self.state.limits.request_timeout;
        // The client's timer started before the request reached us: answering a little
        // early makes the client read DEADLINE_EXCEEDED from us rather than a cancellation
        // from its own timer.
        let client = grpc_timeout(meta).map(|t| t.saturating_sub((t / 10).min(DEADLINE_MARGIN)));
        Instant::now() + client.map_or(cap, |t| t.min(cap))
    }

    async fn prepare(
        &self,
        req: v1::GenerateRequest,
    ) -> Result<(ValidRequest, ModelView), RouterError> {
        let input = GenerateInput::try_from(req)?;
        let info = self.state.pool.model_info(INFO_TIMEOUT).await?;
        let model = ModelView::from(&info);
        let mut valid = self.state.validator.validate(input, &model)?;
        if valid.request_id.is_empty() {
            valid.request_id =
                format!("req-{}", self.state.next_id.fetch_add(1, Ordering::Relaxed));
        }
        Ok((valid, model))
    }
}

/// Records one call's outcome and latency when dropped (a call dropped unanswered was
/// cancelled by its client).
struct CallRecord {
    state: Arc<RouterState>,
    rpc: &'static str,
    started: Instant,
    outcome: &'static str,
    generation: bool,
}

impl CallRecord {
    fn new(state: &Arc<RouterState>, rpc: &'static str, generation: bool) -> Self {
        if generation {
            state.metrics.inflight().inc();
        }
        Self {
            state: state.clone(),
            rpc,
            started: Instant::now(),
            outcome: "cancelled",
            generation,
        }
    }

    fn status<T>(&mut self, r: Result<T, RouterError>) -> Result<T, Status> {
        match r {
            Ok(v) => {
                self.outcome = "ok";
                Ok(v)
            }
            Err(e) => {
                let s = Status::from(e);
                self.outcome = outcome(s.code());
                Err(s)
            }
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if self.generation {
            self.state.metrics.inflight().dec();
        }
        self.state.metrics.observe_request(
            self.rpc,
            self.outcome,
            self.started.elapsed().as_secs_f64(),
        );
    }
}

type StreamItem = Result<v1::GenerateStreamResponse, Status>;

#[tonic::async_trait]
impl v1::dimple_server::Dimple for RouterService {
    type GenerateStreamStream = ReceiverStream<StreamItem>;

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
        let mut record = CallRecord::new(&self.state, "generate", true);
        let _admitted = record.status(self.state.admit())?;
        let deadline = self.deadline(request.metadata());
        let result = async {
            let (valid, model) = self.prepare(request.into_inner()).await?;
            tracing::Span::current().record("request_id", valid.request_id.as_str());
            with_deadline(
                deadline,
                dispatch(&self.state, &valid, &model, deadline, None),
            )
            .await
        }
        .await;
        record.status(result).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn generate_stream(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut record = CallRecord::new(&self.state, "generate_stream", true);
        let admitted = record.status(self.state.admit())?;
        let deadline = self.deadline(request.metadata());
        let (valid, model) = record.status(self.prepare(request.into_inner()).await)?;
        tracing::Span::current().record("request_id", valid.request_id.as_str());
        let (tx, rx) = mpsc::channel(32);
        let started = v1::Started {
            request_id: valid.request_id.clone(),
            prompt_tokens: sat_u32(valid.prompt_ids.len()),
            initial_ids: valid.initial_row(model.mask_token_id),
            mask_token_id: model.mask_token_id,
        };
        let first = v1::GenerateStreamResponse {
            event: Some(v1::generate_stream_response::Event::Started(started)),
        };
        // The channel is new and empty: this cannot wait.
        let _ = tx.send(Ok(first)).await;
        let state = self.state.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let result = with_deadline(
                deadline,
                dispatch(&state, &valid, &model, deadline, Some(&tx)),
            )
            .await;
            match record.status(result) {
                Ok(resp) => {
                    let last = v1::GenerateStreamResponse {
                        event: Some(v1::generate_stream_response::Event::Final(resp)),
                    };
                    let _ = tx.send(Ok(last)).await;
                }
                Err(s) => {
                    if s.code() == tonic::Code::Cancelled {
                        tracing::debug!("client went away");
                    }
                    let _ = tx.send(Err(s)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        let mut record = CallRecord::new(&self.state, "tokenize", false);
        let result = (|| {
            let ids = match request.into_inner().input {
                None => {
                    return Err(RouterError::Convert(
                        dimple_proto::convert::ConvertError::Missing {
                            field: "input".into(),
                            expected: "`text` or `chat`",
                        },
                    ));
                }
                Some(v1::tokenize_request::Input::Text(t)) => {
                    self.state.prompt().encode_text(&t)?
                }
                Some(v1::tokenize_request::Input::Chat(chat)) => {
                    let prompt = PromptInput::Chat(chat_input(chat, "chat")?);
                    let counts = self.state.validator.image_token_counts(&prompt)?;
                    let PromptInput::Chat(messages) = &prompt else {
                        unreachable!("built as chat above")
                    };
                    let messages = crate::validate::chat_messages_for_template(messages);
                    self.state.prompt().build(&messages, &counts)?.ids
                }
            };
            let tokens = ids
                .iter()
                .map(|&id| decode_lossy(self.state.prompt(), &[id], false))
                .collect();
            Ok(v1::TokenizeResponse { ids, tokens })
        })();
        record.status(result).map(Response::new)
    }

    async fn get_model_info(
        &self,
        _: Request<v1::GetModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        let mut record = CallRecord::new(&self.state, "get_model_info", false);
        let result = self
            .state
            .pool
            .model_info(INFO_TIMEOUT)
            .await
            .map(|i| v1::ModelInfo {
                model: i.model.clone(),
                vocab_size: i.vocab_size,
                mask_token_id: i.mask_token_id,
                eos_token_id: i.eos_token_id,
                image_token_id: i.image_token_id,
                max_position_embeddings: i.max_position_embeddings,
                default_max_new_tokens: i.default_max_new_tokens,
                limits: Some(v1::Limits {
                    max_new_tokens: i.max_new_tokens,
                    max_steps: i.max_steps,
                    max_prompt_tokens: i.max_prompt_tokens,
                    max_image_pixels: self.state.validator.image_limits().max_pixels,
                    max_message_bytes: self.state.limits.max_message_bytes as u64,
                }),
                workers: sat_u32(self.state.pool.len()),
            });
        record.status(result).map(Response::new)
    }
}

async fn with_deadline<T>(
    deadline: Instant,
    fut: impl Future<Output = Result<T, RouterError>>,
) -> Result<T, RouterError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(RouterError::Deadline("no answer in time".into())),
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
    state: &RouterState,
    valid: &ValidRequest,
    model: &ModelView,
    deadline: Instant,
    tx: Option<&mpsc::Sender<StreamItem>>,
) -> Result<v1::GenerateResponse, RouterError> {
    let ranked = state.pool.ranked();
    if ranked.is_empty() {
        return Err(RouterError::NoWorkers);
    }
    let wire = worker::GenerateRequest {
        request_id: valid.request_id.clone(),
        prompt_ids: valid.prompt_ids.clone(),
        images: valid.images.clone(),
        params: Some((&valid.params).into()),
    };
    let budget = state.pool.retry_budget();
    budget.record_request();
    let mut failures = Vec::new();
    let mut exhausted = 0;
    let mut engine_failures = 0;
    let mut budget_spent = false;
    for (attempt, entry) in ranked.iter().take(MAX_ATTEMPTS).enumerate() {
        if attempt > 0 {
            if !budget.try_retry() {
                state.metrics.retry_denied("budget");
                budget_spent = true;
                break;
            }
            state.metrics.retry();
            tracing::debug!(addr = %entry.addr, attempt, "retrying on another worker");
        }
        match attempt_on(state, entry, &wire, valid, model, deadline, tx).await {
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
                        state.metrics.retry_denied("engine_failed");
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
    state: &RouterState,
    entry: &Arc<WorkerEntry>,
    wire: &worker::GenerateRequest,
    valid: &ValidRequest,
    model: &ModelView,
    deadline: Instant,
    tx: Option<&mpsc::Sender<StreamItem>>,
) -> Result<v1::GenerateResponse, AttemptError> {
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
    let mut row = valid.initial_row(model.mask_token_id);
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
                for c in &step.committed {
                    if let Some(slot) = row.get_mut(c.position as usize) {
                        *slot = c.token_id;
                    }
                }
                if let Some(tx) = tx {
                    let update = step_update(state.prompt(), valid, model, &step, &row);
                    let msg = v1::GenerateStreamResponse {
                        event: Some(v1::generate_stream_response::Event::Step(update)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
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
                return finish(state, valid, model, f).map_err(AttemptError::Final);
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
async fn closed(tx: Option<&mpsc::Sender<StreamItem>>) {
    match tx {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

fn finish(
    state: &RouterState,
    valid: &ValidRequest,
    model: &ModelView,
    f: worker::Finished,
) -> Result<v1::GenerateResponse, RouterError> {
    use dimple_core::params::FinishReason;
    let reason = parse_finish_reason(&f.finish_reason)
        .map_err(|e| RouterError::Internal(format!("worker answer: {e}")))?;
    match reason {
        FinishReason::Cancelled => return Err(RouterError::Cancelled),
        FinishReason::DeadlineExceeded => {
            return Err(RouterError::Deadline(
                "the worker stopped the request".into(),
            ));
        }
        FinishReason::Error => {
            return Err(RouterError::Internal(
                "the worker failed while decoding".into(),
            ));
        }
        FinishReason::Completed | FinishReason::StepLimit => {}
    }
    state
        .metrics
        .observe_finished(f.queue_ms, f.first_commit_ms, f.steps);
    Ok(v1::GenerateResponse {
        request_id: valid.request_id.clone(),
        text: answer_text(state.prompt(), &f.response_ids, model.eos_token_id),
        token_ids: f.response_ids,
        steps: f.steps,
        finish_reason: public_finish_reason(reason) as i32,
        timings: Some(v1::Timings {
            queue_ms: f.queue_ms,
            first_commit_ms: f.first_commit_ms,
            total_ms: f.total_ms,
        }),
        prompt_tokens: sat_u32(valid.prompt_ids.len()),
    })
}

fn step_update(
    prompt: &PromptBuilder,
    valid: &ValidRequest,
    model: &ModelView,
    step: &worker::Step,
    row: &[u32],
) -> v1::StepUpdate {
    let mask = model.mask_token_id;
    let committed = step
        .committed
        .iter()
        .map(|c| v1::CommittedToken {
            position: c.position,
            token_id: c.token_id,
            text: decode_lossy(prompt, &[c.token_id], false),
        })
        .collect();
    let first_mask = row.iter().position(|&t| t == mask).unwrap_or(row.len());
    v1::StepUpdate {
        step: step.step,
        committed,
        masks_left: sat_u32(row.iter().filter(|&&t| t == mask).count()),
        canvas: valid
            .stream
            .include_canvas
            .then(|| render_canvas(prompt, row, mask, &valid.stream.mask_placeholder)),
        prefix_text: answer_text(prompt, &row[..first_mask], model.eos_token_id),
    }
}

/// Decodes ids; ids the tokenizer does not know are left out rather than failing the answer
/// (the model's vocabulary may be padded beyond the tokenizer's).
pub fn decode_lossy(prompt: &PromptBuilder, ids: &[u32], skip_special: bool) -> String {
    match prompt.decode(ids, skip_special) {
        Ok(t) => t,
        Err(_) => {
            let known: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|&id| prompt.decode(&[id], false).is_ok())
                .collect();
            prompt.decode(&known, skip_special).unwrap_or_default()
        }
    }
}

/// The answer: the response up to the first end token, special tokens dropped, trimmed.
pub fn answer_text(prompt: &PromptBuilder, response: &[u32], eos: u32) -> String {
    let end = response
        .iter()
        .position(|&t| t == eos)
        .unwrap_or(response.len());
    decode_lossy(prompt, &response[..end], true)
        .trim()
        .to_owned()
}

/// The response with committed runs decoded and each masked slot shown as `placeholder`.
pub fn render_canvas(prompt: &PromptBuilder, row: &[u32], mask: u32, placeholder: &str) -> String {
    let mut out = String::new();
    let mut run: Vec<u32> = Vec::new();
    for &t in row {
        if t == mask {
            if !run.is_empty() {
                out.push_str(&decode_lossy(prompt, &run, false));
                run.clear();
            }
            out.push_str(placeholder);
        } else {
            run.push(t);
        }
    }
    if !run.is_empty() {
        out.push_str(&decode_lossy(prompt, &run, false));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canvas_and_answer() {
        let p = PromptBuilder::builtin().unwrap();
        let eos = p.special_id(crate::prompt::SpecialToken::ImEnd).unwrap();
        let mask = p.special_id(crate::prompt::SpecialToken::Mask).unwrap();
        let ab = p.encode_text("ab").unwrap();
        let mut row = ab.clone();
        row.push(mask);
        row.push(eos);
        assert_eq!(render_canvas(&p, &row, mask, "_"), "ab_<|im_end|>");
        assert_eq!(answer_text(&p, &row, eos), "ab");
        assert!(!retryable(&Status::invalid_argument("x")));
        assert!(retryable(&Status::unavailable("x")));
        assert!(retryable(&Status::resource_exhausted("x")));
        assert!(retryable(&Status::unknown("connection reset")));
    }
}
