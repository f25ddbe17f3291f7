//! [`Frontend`]: the one way a request enters the system, whatever the entry point (gRPC,
//! the OpenAI-style HTTP API, `dimple generate`, sweeps and benchmarks).
//!
//! It owns validation ([`Validator`]), prompt building, structure priors, rendering (answer
//! text, canvas, committed prefix, stop strings, usage counts) and the error type
//! ([`RouterError`], mapped to gRPC and HTTP statuses in `error`). Decoding itself is a
//! [`Backend`]'s job. Text work (tokenising, template rendering, image header probing,
//! per-step detokenising) runs on tokio's blocking pool behind a semaphore, never on the
//! async threads: new requests get RESOURCE_EXHAUSTED when the pool is saturated, and
//! running streams wait for a permit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dimple_core::params::FinishReason;
use dimple_proto::convert::{GenerateInput, InputMessage, PromptInput};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use crate::RouterError;
use crate::backend::{Backend, BackendFinished, BackendStep, BackendTimings};
use crate::metrics::RouterMetrics;
use crate::prompt::{PromptBuilder, SpecialToken};
use crate::validate::{ModelView, ValidRequest, Validator, chat_messages_for_template};

/// The most a client's deadline is shortened by so that our answer beats its own timer.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Limits and sizes of the front-end.
#[derive(Debug, Clone, Copy)]
pub struct FrontendConfig {
    /// Upper bound of every request's deadline.
    pub request_timeout: Duration,
    /// Reported in `ModelInfo.limits` (the servers enforce it on bodies and messages).
    pub max_message_bytes: usize,
    /// Text jobs (tokenising, rendering) running at once on the blocking pool at most.
    pub text_jobs: usize,
    /// Generation requests served at once at most, whatever the entry point; beyond,
    /// RESOURCE_EXHAUSTED at once (0: no limit).
    pub max_pending: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(300),
            max_message_bytes: 64 << 20,
            text_jobs: 64,
            max_pending: 0,
        }
    }
}

/// Sent first on a stream, before any decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub request_id: String,
    pub prompt_tokens: usize,
    /// The response row before step 0 (masks and the prior's tokens).
    pub initial_ids: Vec<u32>,
    pub mask_token_id: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommittedView {
    pub position: usize,
    pub token_id: u32,
    /// The token's text, special tokens written out.
    pub text: String,
}

/// One denoising step as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepView {
    pub step: u32,
    pub committed: Vec<CommittedView>,
    pub masks_left: usize,
    /// The whole response, masks shown as the request's placeholder (when asked for).
    pub canvas: Option<String>,
    /// The committed left prefix as answer text (cut at the end token and stop strings): it
    /// can only grow.
    pub prefix_text: String,
    /// The 0-based block of the response this step decoded.
    pub block: u32,
}

/// What ended the answer text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerEnd {
    EndToken,
    StopSequence,
    Length,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub request_id: String,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Forward passes.
    pub steps: u32,
    pub finish_reason: FinishReason,
    pub answer_end: AnswerEnd,
    pub prompt_tokens: usize,
    /// Response tokens before the first end token.
    pub completion_tokens: usize,
    pub timings: BackendTimings,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FrontEvent {
    Started(Started),
    Step(StepView),
    Final(Answer),
}

/// A request that passed validation, with the model it was validated against.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub valid: ValidRequest,
    pub model: ModelView,
    /// The request's place under `max_pending`, held until the request is answered (by
    /// every clone of it).
    pub admitted: Option<Arc<OwnedSemaphorePermit>>,
}

/// What `Tokenize` takes.
#[derive(Debug, Clone)]
pub enum TokenizeInput {
    Text(String),
    Chat {
        messages: Vec<InputMessage>,
        allow_special_tokens: bool,
    },
}

/// Token ids, each with its piece of the tokenised text and byte offsets in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    pub offsets: Vec<(usize, usize)>,
}

/// The model and the limits as advertised.
#[derive(Debug, Clone)]
pub struct ModelInfoView {
    pub model: ModelView,
    pub max_image_pixels: u64,
    pub max_message_bytes: usize,
    pub max_prompt_bytes: usize,
    pub replicas: usize,
}

/// Validation, prompts and rendering in front of a [`Backend`]. Share it in an `Arc`.
pub struct Frontend {
    backend: Arc<dyn Backend>,
    validator: Validator,
    metrics: Arc<RouterMetrics>,
    cfg: FrontendConfig,
    text_jobs: Arc<Semaphore>,
    draining: AtomicBool,
    next_id: AtomicU64,
    /// Places for generation requests (`cfg.max_pending`), `None` without a limit.
    pending: Option<Arc<Semaphore>>,
}

impl Frontend {
    pub fn new(
        backend: Arc<dyn Backend>,
        validator: Validator,
        metrics: Arc<RouterMetrics>,
        cfg: FrontendConfig,
    ) -> Self {
        Self {
            backend,
            validator,
            metrics,
            text_jobs: Arc::new(Semaphore::new(cfg.text_jobs.max(1))),
            cfg,
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            pending: (cfg.max_pending > 0).then(|| Arc::new(Semaphore::new(cfg.max_pending))),
        }
    }

    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    pub fn prompt(&self) -> &PromptBuilder {
        self.validator.prompt_builder()
    }

    pub fn metrics(&self) -> &Arc<RouterMetrics> {
        &self.metrics
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Readiness: not draining and some replica can take a request.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.backend.ready()
    }

    /// From now on, readiness is false (running requests continue).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The deadline of a request arriving now: the client's timeout capped by the server's.
    ///
    /// The client's timer started before the request reached us: answering a little early
    /// makes the client read DEADLINE_EXCEEDED from us rather than a cancellation from its
    /// own timer.
    pub fn deadline(&self, client_timeout: Option<Duration>) -> Instant {
        let cap = self.cfg.request_timeout;
        let client = client_timeout.map(|t| t.saturating_sub((t / 10).min(DEADLINE_MARGIN)));
        Instant::now() + client.map_or(cap, |t| t.min(cap))
    }

    /// A place for one generation request; refused at once when `max_pending` requests are
    /// in flight.
    fn admit(&self) -> Result<Option<Arc<OwnedSemaphorePermit>>, RouterError> {
        let Some(pending) = &self.pending else {
            return Ok(None);
        };
        pending
            .clone()
            .try_acquire_owned()
            .map(|p| Some(Arc::new(p)))
            .map_err(|_| {
                RouterError::Exhausted(format!(
                    "the server is serving its limit of {} requests (`max_pending`)",
                    self.cfg.max_pending
                ))
            })
    }

    /// Runs `job` on the blocking pool. `wait`: wait for a permit (work of an admitted
    /// request); otherwise refuse at once when the pool is saturated (new work).
    async fn text_job<T: Send + 'static>(
        &self,
        wait: bool,
        job: impl FnOnce() -> Result<T, RouterError> + Send + 'static,
    ) -> Result<T, RouterError> {
        let permit = if wait {
            self.text_jobs
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| RouterError::Internal("the text pool is closed".into()))?
        } else {
            self.text_jobs.clone().try_acquire_owned().map_err(|_| {
                RouterError::Exhausted(format!(
                    "the server's text workers are busy ({} jobs running); retry later",
                    self.cfg.text_jobs
                ))
            })?
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| RouterError::Internal(format!("text job: {e}")))?
    }

    /// Validates a request against the served model: sizes first (cheap, here), then
    /// tokenising and image probing on the blocking pool.
    /// Admission (`max_pending`) comes first, before any tokenising or image probing.
    pub async fn prepare(&self, input: GenerateInput) -> Result<Prepared, RouterError> {
        let admitted = self.admit()?;
        let model = self.backend.model().await?;
        self.validator
            .check_text_size(input.prompt.text_bytes(), &model)?;
        let validator = self.validator.clone();
        let m = model.clone();
        let mut valid = self
            .text_job(false, move || validator.validate(input, &m))
            .await?;
        if valid.request_id.is_empty() {
            valid.request_id = format!("req-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        }
        Ok(Prepared {
            valid,
            model,
            admitted,
        })
    }

    /// Decodes a prepared request and returns the answer.
    pub async fn generate(&self, p: &Prepared, deadline: Instant) -> Result<Answer, RouterError> {
        let finished =
            with_deadline(deadline, self.backend.generate(&p.valid, deadline, None)).await?;
        self.answer(p, finished).await
    }

    /// Decodes a prepared request, streaming `Started`, one `Step` per denoising step and
    /// the `Final` answer (or an error). Dropping the receiver cancels the request.
    pub fn stream(
        self: &Arc<Self>,
        p: Prepared,
        deadline: Instant,
    ) -> mpsc::Receiver<Result<FrontEvent, RouterError>> {
        let (tx, rx) = mpsc::channel(32);
        let this = self.clone();
        tokio::spawn(async move {
            let started = Started {
                request_id: p.valid.request_id.clone(),
                prompt_tokens: p.valid.prompt_ids.len(),
                initial_ids: p.valid.initial_row(p.model.mask_token_id),
                mask_token_id: p.model.mask_token_id,
            };
            if tx.send(Ok(FrontEvent::Started(started))).await.is_err() {
                return;
            }
            let result = this.run_stream(&p, deadline, &tx).await;
            let last = match result {
                Ok(answer) => Ok(FrontEvent::Final(answer)),
                Err(RouterError::Cancelled) if tx.is_closed() => return,
                Err(e) => Err(e),
            };
            let _ = tx.send(last).await;
        });
        rx
    }

    async fn run_stream(
        &self,
        p: &Prepared,
        deadline: Instant,
        tx: &mpsc::Sender<Result<FrontEvent, RouterError>>,
    ) -> Result<Answer, RouterError> {
        let (steps_tx, mut steps_rx) = mpsc::channel::<BackendStep>(32);
        let decode = with_deadline(
            deadline,
            self.backend.generate(&p.valid, deadline, Some(steps_tx)),
        );
        tokio::pin!(decode);
        let mut row = p.valid.initial_row(p.model.mask_token_id);
        let mut finished = None;
        loop {
            tokio::select! {
                step = steps_rx.recv() => match step {
                    Some(step) => {
                        for &(pos, tok) in &step.committed {
                            if let Some(slot) = row.get_mut(pos) {
                                *slot = tok;
                            }
                        }
                        let view = self.render_step(p, step, row.clone()).await?;
                        if tx.send(Ok(FrontEvent::Step(view))).await.is_err() {
                            return Err(RouterError::Cancelled);
                        }
                    }
                    // The backend's sender goes with its future: it has finished.
                    None => if finished.is_some() { break },
                },
                r = &mut decode, if finished.is_none() => finished = Some(r),
                _ = tx.closed() => return Err(RouterError::Cancelled),
            }
        }
        match finished {
            Some(r) => self.answer(p, r?).await,
            None => Err(RouterError::Internal(
                "the backend ended without an answer".into(),
            )),
        }
    }

    async fn render_step(
        &self,
        p: &Prepared,
        step: BackendStep,
        row: Vec<u32>,
    ) -> Result<StepView, RouterError> {
        let prompt = self.validator.shared_prompt_builder();
        let mask = p.model.mask_token_id;
        let eos = p.model.eos_token_id;
        let canvas_placeholder = p
            .valid
            .stream
            .include_canvas
            .then(|| p.valid.stream.mask_placeholder.clone());
        let stop = p.valid.stop.clone();
        self.text_job(true, move || {
            let committed = step
                .committed
                .iter()
                .map(|&(position, token_id)| CommittedView {
                    position,
                    token_id,
                    text: decode_lossy(&prompt, &[token_id], false),
                })
                .collect();
            let first_mask = row.iter().position(|&t| t == mask).unwrap_or(row.len());
            let (prefix_text, _) =
                cut_at_stop(answer_text(&prompt, &row[..first_mask], eos), &stop);
            Ok(StepView {
                step: step.step,
                committed,
                masks_left: row.iter().filter(|&&t| t == mask).count(),
                canvas: canvas_placeholder.map(|ph| render_canvas(&prompt, &row, mask, &ph)),
                prefix_text,
                block: step.block,
            })
        })
        .await
    }

    /// The answer of a finished request; unsuccessful endings become errors.
    async fn answer(&self, p: &Prepared, f: BackendFinished) -> Result<Answer, RouterError> {
        match f.finish_reason {
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
        self.metrics
            .observe_finished(f.timings.queue_ms, f.timings.first_commit_ms, f.steps);
        let prompt = self.validator.shared_prompt_builder();
        let eos = p.model.eos_token_id;
        let stop = p.valid.stop.clone();
        let ids = f.response_ids.clone();
        let (text, completion_tokens, answer_end) = self
            .text_job(true, move || {
                let end = ids.iter().position(|&t| t == eos);
                let completion = end.unwrap_or(ids.len());
                let (text, stopped) = cut_at_stop(answer_text(&prompt, &ids, eos), &stop);
                let answer_end = match (stopped, end) {
                    (true, _) => AnswerEnd::StopSequence,
                    (false, Some(_)) => AnswerEnd::EndToken,
                    (false, None) => AnswerEnd::Length,
                };
                Ok((text, completion, answer_end))
            })
            .await?;
        Ok(Answer {
            request_id: p.valid.request_id.clone(),
            text,
            token_ids: f.response_ids,
            steps: f.steps,
            finish_reason: f.finish_reason,
            answer_end,
            prompt_tokens: p.valid.prompt_ids.len(),
            completion_tokens,
            timings: f.timings,
        })
    }

    /// Token ids of text or of a conversation (through the chat template), with offsets.
    pub async fn tokenize(&self, input: TokenizeInput) -> Result<Tokenized, RouterError> {
        let model = self.backend.model().await?;
        let bytes = match &input {
            TokenizeInput::Text(t) => t.len(),
            TokenizeInput::Chat { messages, .. } => {
                PromptInput::Chat(messages.clone()).text_bytes()
            }
        };
        self.validator.check_text_size(bytes, &model)?;
        let validator = self.validator.clone();
        self.text_job(false, move || {
            let prompt = validator.prompt_builder();
            let (ids, text, offsets) = match input {
                TokenizeInput::Text(text) => {
                    let (ids, offsets) = prompt.encode_with_offsets(&text)?;
                    (ids, text, offsets)
                }
                TokenizeInput::Chat {
                    messages,
                    allow_special_tokens,
                } => {
                    validator.check_special_text(&messages, allow_special_tokens)?;
                    let chat = PromptInput::Chat(messages);
                    let counts = validator.image_token_counts(&chat)?;
                    let PromptInput::Chat(messages) = &chat else {
                        return Err(RouterError::Internal("built as chat above".into()));
                    };
                    let (built, text, offsets) =
                        prompt.build_spans(&chat_messages_for_template(messages), &counts)?;
                    (built.ids, text, offsets)
                }
            };
            let image_pad = prompt.special_id(SpecialToken::ImagePad).ok();
            let tokens = token_pieces(&text, &ids, &offsets, image_pad);
            Ok(Tokenized {
                ids,
                tokens,
                offsets,
            })
        })
        .await
    }

    /// The served model and the limits it honours together.
    pub async fn model_info(&self) -> Result<ModelInfoView, RouterError> {
        let model = self.backend.model().await?;
        Ok(ModelInfoView {
            max_prompt_bytes: self.validator.max_prompt_bytes(&model),
            model,
            max_image_pixels: self.validator.image_limits().max_pixels,
            max_message_bytes: self.cfg.max_message_bytes,
            replicas: self.backend.replicas(),
        })
    }

    /// Counts a call in the metrics until the returned record drops.
    pub fn record(self: &Arc<Self>, rpc: &'static str, generation: bool) -> CallRecord {
        if generation {
            self.metrics.inflight().inc();
        }
        CallRecord {
            metrics: self.metrics.clone(),
            rpc,
            started: Instant::now(),
            outcome: "cancelled",
            generation,
        }
    }
}

/// Records one call's outcome and latency when dropped (a call dropped unanswered was
/// cancelled by its client).
pub struct CallRecord {
    metrics: Arc<RouterMetrics>,
    rpc: &'static str,
    started: Instant,
    outcome: &'static str,
    generation: bool,
}

impl CallRecord {
    /// Notes the outcome of `r` and passes it on.
    pub fn note<T>(&mut self, r: Result<T, RouterError>) -> Result<T, RouterError> {
        match &r {
            Ok(_) => self.ok(),
            Err(e) => self.fail(e),
        }
        r
    }

    pub fn ok(&mut self) {
        self.outcome = "ok";
    }

    pub fn fail(&mut self, e: &RouterError) {
        self.outcome = dimple_proto::telemetry::outcome(e.code());
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if self.generation {
            self.metrics.inflight().dec();
        }
        self.metrics
            .observe_request(self.rpc, self.outcome, self.started.elapsed().as_secs_f64());
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

/// Each token's piece of `text`: the text between its offsets. Byte-level tokens sharing
/// one character's offsets leave the character to the last of them (the others are empty),
/// so the pieces concatenate to the text; expanded image tokens show the placeholder.
pub fn token_pieces(
    text: &str,
    ids: &[u32],
    offsets: &[(usize, usize)],
    image_pad: Option<u32>,
) -> Vec<String> {
    let mut out = Vec::with_capacity(ids.len());
    let mut covered = 0usize;
    for (i, (&id, &(start, end))) in ids.iter().zip(offsets).enumerate() {
        if Some(id) == image_pad {
            out.push(SpecialToken::ImagePad.as_str().to_owned());
            covered = covered.max(end);
            continue;
        }
        let shared_with_next = offsets.get(i + 1) == Some(&(start, end));
        let start = start.max(covered);
        let piece = if shared_with_next || start >= end {
            ""
        } else {
            text.get(start..end).unwrap_or("")
        };
        if !piece.is_empty() {
            covered = end;
        }
        out.push(piece.to_owned());
    }
    out
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

/// `text` cut before the earliest stop string (then trimmed at the end), and whether one
/// was found.
pub fn cut_at_stop(text: String, stop: &[String]) -> (String, bool) {
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (text[..at].trim_end().to_owned(), true),
        None => (text, false),
    }
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

    /// A backend that only describes a model; these tests never decode.
    struct ModelOnly;

    #[tonic::async_trait]
    impl Backend for ModelOnly {
        async fn model(&self) -> Result<ModelView, RouterError> {
            Ok(ModelView::demo_for_tests())
        }
        async fn generate(
            &self,
            _: &ValidRequest,
            _: Instant,
            _: crate::backend::StepSink,
        ) -> Result<BackendFinished, RouterError> {
            Err(RouterError::Internal("not a decoding backend".into()))
        }
        fn ready(&self) -> bool {
            true
        }
        fn replicas(&self) -> usize {
            1
        }
    }

    fn frontend(cfg: FrontendConfig) -> Frontend {
        let metrics = RouterMetrics::new(&prometheus::Registry::new()).unwrap();
        Frontend::new(
            Arc::new(ModelOnly),
            Validator::new(
                Arc::new(PromptBuilder::builtin().unwrap()),
                crate::validate::ImageLimits::default(),
            ),
            Arc::new(metrics),
            cfg,
        )
    }

    fn text(t: &str) -> GenerateInput {
        crate::validate::test_input(PromptInput::Text(t.into()))
    }

    #[tokio::test]
    async fn saturated_text_pool_answers_resource_exhausted_at_once() {
        let f = frontend(FrontendConfig {
            text_jobs: 1,
            ..FrontendConfig::default()
        });
        assert!(f.prepare(text("hello")).await.is_ok());
        // Every text worker busy: a new request is refused, not queued behind them.
        let held = f.text_jobs.clone().try_acquire_owned().unwrap();
        let t = std::time::Instant::now();
        let e = f.prepare(text("hello")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        let e = f
            .tokenize(TokenizeInput::Text("hello".into()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(t.elapsed() < Duration::from_millis(500));
        // Over-long text is refused from its length even then (no job needed).
        let e = f.prepare(text(&"x".repeat(10 << 20))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        drop(held);
        assert!(f.prepare(text("hello")).await.is_ok());
    }

    #[tokio::test]
    async fn max_pending_refuses_beyond_the_limit_until_a_request_ends() {
        let f = frontend(FrontendConfig {
            max_pending: 1,
            ..FrontendConfig::default()
        });
        let first = f.prepare(text("hello")).await.unwrap();
        let e = f.prepare(text("hello")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        // A clone shares the place: the place frees when the last one drops.
        let clone = first.clone();
        drop(first);
        assert!(f.prepare(text("hello")).await.is_err());
        drop(clone);
        assert!(f.prepare(text("hello")).await.is_ok());
    }

    #[test]
    fn client_deadlines_are_shortened_by_a_small_margin() {
        let f = frontend(FrontendConfig {
            text_jobs: 1,
            ..FrontendConfig::default()
        });
        let now = Instant::now();
        let d = f.deadline(Some(Duration::from_secs(10))) - now;
        assert!(
            d <= Duration::from_millis(9_900) + Duration::from_millis(50),
            "{d:?}"
        );
        assert!(d >= Duration::from_millis(9_800), "{d:?}");
        // Short timeouts lose a tenth at most.
        let d = f.deadline(Some(Duration::from_millis(100))) - Instant::now();
        assert!(
            d <= Duration::from_millis(90) + Duration::from_millis(5),
            "{d:?}"
        );
    }

    #[tokio::test]
    async fn text_work_runs_off_the_async_threads() {
        let f = frontend(FrontendConfig {
            text_jobs: 4,
            ..FrontendConfig::default()
        });
        let runtime_thread = std::thread::current().id();
        let job_thread = f
            .text_job(false, || Ok(std::thread::current().id()))
            .await
            .unwrap();
        assert_ne!(job_thread, runtime_thread);
    }

    #[test]
    fn canvas_answer_and_stop_strings() {
        let p = PromptBuilder::builtin().unwrap();
        let eos = p.special_id(SpecialToken::ImEnd).unwrap();
        let mask = p.special_id(SpecialToken::Mask).unwrap();
        let ab = p.encode_text("ab").unwrap();
        let mut row = ab.clone();
        row.push(mask);
        row.push(eos);
        assert_eq!(render_canvas(&p, &row, mask, "_"), "ab_<|im_end|>");
        assert_eq!(answer_text(&p, &row, eos), "ab");
        assert_eq!(
            cut_at_stop("red and blue. green".into(), &[".".into(), "and".into()]),
            ("red".into(), true)
        );
        assert_eq!(
            cut_at_stop("red".into(), &["x".into()]),
            ("red".into(), false)
        );
    }

    #[test]
    fn token_pieces_concatenate_to_the_text() {
        let p = PromptBuilder::from_file(
            std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/tokenizer/tokenizer.json"
            )),
            None,
        )
        .unwrap();
        for text in ["你好", "hello 世界, ok", "a\u{1F600}b"] {
            let (ids, offsets) = p.encode_with_offsets(text).unwrap();
            let pieces = token_pieces(text, &ids, &offsets, None);
            assert_eq!(pieces.len(), ids.len());
            assert_eq!(pieces.concat(), text, "{offsets:?}");
            assert!(pieces.iter().all(|t| !t.contains('\u{FFFD}')));
        }
    }
}
