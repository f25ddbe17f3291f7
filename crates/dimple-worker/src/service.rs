//! The `dimple.worker.v1.Worker` gRPC service.
//!
//! `Generate` preprocesses the images (on the blocking pool, never on a tokio worker),
//! submits the request to the engine with the caller's deadline (from `grpc-timeout`) and
//! streams the engine's events. The response stream owns the engine's event receiver: when
//! the caller goes away, tonic drops the stream, the receiver closes and the engine cancels
//! the request and frees its cache at its next step.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use dimple_core::params::{DecodeParams, FinishReason};
use dimple_engine::{EngineEvent, EngineImage, GenerateRequest};
use dimple_proto::convert::sat_u32;
use dimple_proto::deadline::grpc_timeout;
use dimple_proto::telemetry::outcome;
use dimple_proto::worker as pb;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{Worker, WorkerError};

/// The gRPC face of a [`Worker`].
pub struct WorkerService {
    worker: Worker,
    /// Served by `GetPromptAssets`; `None` answers FAILED_PRECONDITION.
    prompt_assets: Option<std::sync::Arc<pb::PromptAssets>>,
}

impl WorkerService {
    pub fn new(worker: Worker) -> Self {
        Self {
            worker,
            prompt_assets: None,
        }
    }

    pub fn with_prompt_assets(mut self, assets: Option<std::sync::Arc<pb::PromptAssets>>) -> Self {
        self.prompt_assets = assets;
        self
    }

    async fn submit(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<UnboundedReceiver<EngineEvent>, Status> {
        let received = Instant::now();
        if self.worker.is_draining() {
            return Err(WorkerError::Draining.into());
        }
        let timeout = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let params = DecodeParams::try_from(req.params.ok_or(WorkerError::MissingParams)?)
            .map_err(WorkerError::from)?;
        // Admission before the images are decoded: a request the queue cannot take must not
        // cost image decoding on every worker the router tries.
        let _admitted = self.admit()?;
        let images = self.preprocess(req.images).await?;
        tracing::debug!(request_id = %req.request_id, prompt = req.prompt_ids.len(), "submitting");
        let rx = self
            .worker
            .shared
            .engine
            .submit(GenerateRequest {
                prompt_ids: req.prompt_ids,
                images,
                params,
                deadline: timeout.map(|t| received + t),
            })
            .map_err(WorkerError::from)?;
        Ok(rx)
    }

    /// Refuses the request when the engine is down or its queue (counting the requests
    /// still decoding their images) is full; holds a queue place until submission.
    fn admit(&self) -> Result<Preprocessing, WorkerError> {
        let shared = &self.worker.shared;
        let stats = shared.engine.stats();
        if !stats.healthy {
            return Err(WorkerError::Draining);
        }
        let limit = shared.engine.config().max_waiting;
        let before = shared.preprocessing.fetch_add(1, Ordering::AcqRel);
        let guard = Preprocessing(self.worker.clone());
        if stats.waiting + before >= limit {
            return Err(dimple_engine::EngineError::QueueFull { limit }.into());
        }
        Ok(guard)
    }

    async fn preprocess(&self, images: Vec<Vec<u8>>) -> Result<Vec<EngineImage>, WorkerError> {
        self.worker.preprocess(images).await
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = EventStream;

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let mut guard = Outstanding::new(self.worker.clone());
        match self.submit(request).await {
            Ok(rx) => Ok(Response::new(EventStream {
                rx,
                guard: Some(guard),
            })),
            Err(status) => {
                guard.outcome = outcome(status.code());
                Err(status)
            }
        }
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        Ok(Response::new(self.worker.load()))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        Ok(Response::new(self.worker.info().clone()))
    }

    async fn get_prompt_assets(
        &self,
        _: Request<pb::PromptAssetsRequest>,
    ) -> Result<Response<pb::PromptAssets>, Status> {
        match &self.prompt_assets {
            Some(a) => Ok(Response::new(a.as_ref().clone())),
            None => Err(Status::failed_precondition(
                "this worker was started without prompt assets",
            )),
        }
    }
}

/// A queue place held while a request's images are decoded.
struct Preprocessing(Worker);

impl Drop for Preprocessing {
    fn drop(&mut self) {
        self.0.shared.preprocessing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request as outstanding from arrival until it is answered or abandoned, and
/// records its outcome once (a request dropped unanswered was cancelled by its caller).
pub(crate) struct Outstanding {
    worker: Worker,
    pub(crate) outcome: &'static str,
}

impl Outstanding {
    pub(crate) fn new(worker: Worker) -> Self {
        worker
            .shared
            .outstanding
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self {
            worker,
            outcome: "cancelled",
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.worker
            .shared
            .outstanding
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.worker.shared.metrics.count_request(self.outcome);
    }
}

/// The response stream of `Generate`: the engine's events as messages, ending after the
/// final one.
pub struct EventStream {
    rx: UnboundedReceiver<EngineEvent>,
    /// `None` once the final event went out.
    guard: Option<Outstanding>,
}

impl EventStream {
    /// Ends the stream, recording `outcome`; returns the worker for a last load report.
    fn end(&mut self, outcome: &'static str) -> Option<Worker> {
        let mut guard = self.guard.take()?;
        guard.outcome = outcome;
        let worker = guard.worker.clone();
        drop(guard);
        Some(worker)
    }
}

impl Stream for EventStream {
    type Item = Result<pb::GenerateEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.guard.is_none() {
            return Poll::Ready(None);
        }
        let event = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(e) => e,
        };
        let item = match event {
            Some(EngineEvent::Step {
                step,
                block,
                committed,
            }) => Ok(pb::GenerateEvent {
                event: Some(pb::generate_event::Event::Step(pb::Step {
                    step: sat_u32(step),
                    block: sat_u32(block),
                    committed: committed
                        .into_iter()
                        .map(|(p, t)| pb::FixedToken {
                            position: sat_u32(p),
                            token_id: t,
                        })
                        .collect(),
                })),
            }),
            Some(EngineEvent::Finished(f)) => {
                let worker = self.end(finish_outcome(f.finish_reason));
                Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Finished(pb::Finished {
                        response_ids: f.response_ids,
                        steps: sat_u32(f.steps),
                        finish_reason: f.finish_reason.as_str().to_owned(),
                        queue_ms: f.timings.queue_ms,
                        first_commit_ms: f.timings.first_commit_ms,
                        total_ms: f.timings.total_ms,
                        load: worker.map(|w| w.load()),
                    })),
                })
            }
            Some(EngineEvent::Failed(e)) => {
                // A request failed because the whole engine failed says so distinctly: it
                // may be the request that broke it.
                let failure = self.guard.as_ref().and_then(|g| g.worker.engine_failure());
                let status = match (e, failure) {
                    (dimple_engine::EngineError::Unavailable(_), Some(why)) => {
                        Status::from(WorkerError::EngineFailed(why))
                    }
                    (e, _) => Status::from(WorkerError::from(e)),
                };
                self.end(outcome(status.code()));
                Err(status)
            }
            None => {
                self.end("unavailable");
                Err(Status::unavailable("the engine stopped without answering"))
            }
        };
        Poll::Ready(Some(item))
    }
}

pub(crate) fn finish_outcome(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Completed | FinishReason::StepLimit => "ok",
        FinishReason::Cancelled => "cancelled",
        FinishReason::DeadlineExceeded => "deadline_exceeded",
        FinishReason::Error => "internal",
    }
}
