//! The public `dimple.v1.Dimple` gRPC service: proto messages in and out, everything else
//! through the [`Frontend`]. The deadline is the client's `grpc-timeout`, capped by the
//! server's request timeout; a client that goes away drops the stream, which cancels the
//! request.

use std::sync::Arc;

use dimple_proto::convert::{GenerateInput, chat_input, public_finish_reason, sat_u32};
use dimple_proto::deadline::grpc_timeout;
use dimple_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::RouterError;
use crate::frontend::{Answer, AnswerEnd, FrontEvent, Frontend, StepView, TokenizeInput};

/// The gRPC face of a [`Frontend`]. Cheap to clone.
#[derive(Clone)]
pub struct RouterService {
    frontend: Arc<Frontend>,
}

impl RouterService {
    pub fn new(frontend: Arc<Frontend>) -> Self {
        Self { frontend }
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
        let mut record = self.frontend.record("generate", true);
        let deadline = self.frontend.deadline(grpc_timeout(request.metadata()));
        let result = async {
            let input = GenerateInput::try_from(request.into_inner())?;
            let prepared = self.frontend.prepare(input).await?;
            tracing::Span::current().record("request_id", prepared.valid.request_id.as_str());
            self.frontend.generate(&prepared, deadline).await
        }
        .await;
        Ok(Response::new(response(record.note(result)?)))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn generate_stream(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut record = self.frontend.record("generate_stream", true);
        let deadline = self.frontend.deadline(grpc_timeout(request.metadata()));
        let prepared = record.note(
            async {
                let input = GenerateInput::try_from(request.into_inner())?;
                self.frontend.prepare(input).await
            }
            .await,
        )?;
        tracing::Span::current().record("request_id", prepared.valid.request_id.as_str());
        let mut events = self.frontend.stream(prepared, deadline);
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    e = events.recv() => e,
                    _ = tx.closed() => return,
                };
                let Some(item) = item else { return };
                let msg = match item {
                    Ok(e) => {
                        if matches!(e, FrontEvent::Final(_)) {
                            record.ok();
                        }
                        stream_message(e)
                    }
                    Err(e) => {
                        record.fail(&e);
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        let mut record = self.frontend.record("tokenize", false);
        let result = async {
            let req = request.into_inner();
            let input = match req.input {
                None => {
                    return Err(RouterError::Convert(
                        dimple_proto::convert::ConvertError::Missing {
                            field: "input".into(),
                            expected: "`text` or `chat`",
                        },
                    ));
                }
                Some(v1::tokenize_request::Input::Text(t)) => TokenizeInput::Text(t),
                Some(v1::tokenize_request::Input::Chat(chat)) => TokenizeInput::Chat {
                    messages: chat_input(chat, "chat")?,
                    allow_special_tokens: req.allow_special_tokens,
                },
            };
            let t = self.frontend.tokenize(input).await?;
            Ok(v1::TokenizeResponse {
                ids: t.ids,
                tokens: t.tokens,
                offsets: t
                    .offsets
                    .into_iter()
                    .map(|(start, end)| v1::TokenSpan {
                        start: sat_u32(start),
                        end: sat_u32(end),
                    })
                    .collect(),
            })
        }
        .await;
        Ok(Response::new(record.note(result)?))
    }

    async fn get_model_info(
        &self,
        _: Request<v1::GetModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        let mut record = self.frontend.record("get_model_info", false);
        let result = self.frontend.model_info().await.map(|i| {
            let m = &i.model;
            v1::ModelInfo {
                model: m.model.clone(),
                vocab_size: sat_u32(m.vocab_size),
                mask_token_id: m.mask_token_id,
                eos_token_id: m.eos_token_id,
                image_token_id: m.image_token_id,
                max_position_embeddings: sat_u32(m.max_position_embeddings),
                default_max_new_tokens: sat_u32(m.default_max_new_tokens),
                limits: Some(v1::Limits {
                    max_new_tokens: sat_u32(m.limits.max_new_tokens),
                    max_steps: sat_u32(m.limits.max_steps),
                    max_prompt_tokens: sat_u32(m.max_prompt_tokens),
                    max_image_pixels: i.max_image_pixels,
                    max_message_bytes: i.max_message_bytes as u64,
                    max_prompt_bytes: i.max_prompt_bytes as u64,
                }),
                workers: sat_u32(i.replicas),
            }
        });
        Ok(Response::new(record.note(result)?))
    }
}

/// The proto form of a stream event.
pub fn stream_message(e: FrontEvent) -> v1::GenerateStreamResponse {
    use v1::generate_stream_response::Event;
    let event = match e {
        FrontEvent::Started(s) => Event::Started(v1::Started {
            request_id: s.request_id,
            prompt_tokens: sat_u32(s.prompt_tokens),
            initial_ids: s.initial_ids,
            mask_token_id: s.mask_token_id,
        }),
        FrontEvent::Step(s) => Event::Step(step(s)),
        FrontEvent::Final(a) => Event::Final(response(a)),
    };
    v1::GenerateStreamResponse { event: Some(event) }
}

/// The proto form of a step.
pub fn step(s: StepView) -> v1::StepUpdate {
    v1::StepUpdate {
        step: s.step,
        committed: s
            .committed
            .into_iter()
            .map(|c| v1::CommittedToken {
                position: sat_u32(c.position),
                token_id: c.token_id,
                text: c.text,
            })
            .collect(),
        masks_left: sat_u32(s.masks_left),
        canvas: s.canvas,
        prefix_text: s.prefix_text,
        block: s.block,
    }
}

/// The proto form of an answer.
pub fn response(a: Answer) -> v1::GenerateResponse {
    v1::GenerateResponse {
        request_id: a.request_id,
        text: a.text,
        token_ids: a.token_ids,
        steps: a.steps,
        finish_reason: public_finish_reason(a.finish_reason) as i32,
        timings: Some(v1::Timings {
            queue_ms: a.timings.queue_ms,
            first_commit_ms: a.timings.first_commit_ms,
            total_ms: a.timings.total_ms,
        }),
        prompt_tokens: sat_u32(a.prompt_tokens),
        completion_tokens: sat_u32(a.completion_tokens),
        answer_end: match a.answer_end {
            AnswerEnd::EndToken => v1::AnswerEnd::EndToken,
            AnswerEnd::StopSequence => v1::AnswerEnd::StopSequence,
            AnswerEnd::Length => v1::AnswerEnd::Length,
        } as i32,
    }
}
