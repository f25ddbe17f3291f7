//! [`LocalBackend`]: a [`Worker`] in this process as the front-end's
//! [`dimple_router::Backend`] — `dimple serve` (no loopback gRPC hop), and `dimple generate`,
//! `sweep` and `bench` without `--router`.
//!
//! It takes the same steps as the worker's gRPC service (drain check, image preprocessing
//! on the blocking pool, submission with the deadline, event forwarding), and its errors
//! are the statuses that service would answer, so a request fails the same way whether it
//! crossed the network or not.

use dimple_core::image_size::ImageSizeParams;
use dimple_engine::{EngineEvent, GenerateRequest};
use dimple_model::preprocess::PreprocessConfig;
use dimple_proto::convert::sat_u32;
use dimple_proto::telemetry::outcome;
use dimple_router::RouterError;
use dimple_router::backend::{Backend, BackendFinished, BackendStep, BackendTimings, StepSink};
use dimple_router::validate::{ImageLimits, ModelView, ValidRequest};
use tokio::time::Instant;

use crate::service::{Outstanding, finish_outcome};
use crate::{Worker, WorkerError};

/// Decodes on an in-process worker.
pub struct LocalBackend {
    worker: Worker,
}

impl LocalBackend {
    pub fn new(worker: Worker) -> Self {
        Self { worker }
    }

    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    async fn run(
        &self,
        req: &ValidRequest,
        deadline: Instant,
        steps: StepSink,
    ) -> Result<BackendFinished, RouterError> {
        if self.worker.is_draining() {
            return Err(status(WorkerError::Draining));
        }
        let images = self
            .worker
            .preprocess(req.images.clone())
            .await
            .map_err(status)?;
        let mut rx = self
            .worker
            .engine()
            .submit(GenerateRequest {
                prompt_ids: req.prompt_ids.clone(),
                images,
                params: req.params.clone(),
                deadline: Some(deadline.into_std()),
            })
            .map_err(|e| status(WorkerError::from(e)))?;
        loop {
            let event = match &steps {
                Some(tx) => tokio::select! {
                    e = rx.recv() => e,
                    _ = tx.closed() => return Err(RouterError::Cancelled),
                },
                None => rx.recv().await,
            };
            match event {
                Some(EngineEvent::Step {
                    step,
                    block,
                    committed,
                }) => {
                    if let Some(tx) = &steps {
                        let step = BackendStep {
                            step: sat_u32(step),
                            committed,
                            block: sat_u32(block),
                        };
                        if tx.send(step).await.is_err() {
                            return Err(RouterError::Cancelled);
                        }
                    }
                }
                Some(EngineEvent::Finished(f)) => {
                    return Ok(BackendFinished {
                        response_ids: f.response_ids,
                        steps: sat_u32(f.steps),
                        finish_reason: f.finish_reason,
                        timings: BackendTimings {
                            queue_ms: f.timings.queue_ms,
                            first_commit_ms: f.timings.first_commit_ms,
                            total_ms: f.timings.total_ms,
                        },
                    });
                }
                Some(EngineEvent::Failed(e)) => return Err(status(WorkerError::from(e))),
                None => {
                    return Err(RouterError::Unavailable(
                        "the engine stopped without answering".into(),
                    ));
                }
            }
        }
    }
}

/// The front-end's image limits from a preprocessor config: the same size rule and pixel
/// bound the worker applies, so header probing and preprocessing agree.
pub fn image_limits(pre: &PreprocessConfig) -> ImageLimits {
    ImageLimits {
        size: ImageSizeParams {
            patch_size: pre.patch_size,
            merge_size: pre.merge_size,
            temporal_patch_size: pre.temporal_patch_size,
            min_pixels: pre.min_pixels,
            max_pixels: pre.max_pixels,
        },
        max_pixels: pre.max_decoded_pixels,
    }
}

/// The status the worker's gRPC service would answer.
fn status(e: WorkerError) -> RouterError {
    RouterError::Worker(tonic::Status::from(e))
}

#[tonic::async_trait]
impl Backend for LocalBackend {
    async fn model(&self) -> Result<ModelView, RouterError> {
        Ok(ModelView::from(self.worker.info()))
    }

    async fn generate(
        &self,
        req: &ValidRequest,
        deadline: Instant,
        steps: StepSink,
    ) -> Result<BackendFinished, RouterError> {
        let mut guard = Outstanding::new(self.worker.clone());
        let result = self.run(req, deadline, steps).await;
        guard.outcome = match &result {
            Ok(f) => finish_outcome(f.finish_reason),
            Err(e) => outcome(e.code()),
        };
        result
    }

    fn ready(&self) -> bool {
        self.worker.load().accepting
    }

    fn replicas(&self) -> usize {
        1
    }
}
