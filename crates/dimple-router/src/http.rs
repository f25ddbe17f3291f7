//! The OpenAI-compatible HTTP API beside gRPC, over the same [`Frontend`], API keys, limits
//! and error mapping:
//!
//! - `POST /v1/chat/completions`: messages with text and `image_url` parts (`data:` URIs
//!   only; remote URLs are refused), `max_tokens` (response slots), `temperature`, `top_p`,
//!   `seed`, `stop`, and the diffusion settings under `dimple` (`threshold`, `steps`, `alg`,
//!   `pipeline`, `use_cache`, `block_length`, `cache_mode`, `prior`, `top_k`, `alg_temp`,
//!   `allow_special_tokens`, `request_id`). `stream: true` answers with server-sent events: one chunk per
//!   denoising step carrying the newly committed left-to-right text, a last chunk with the
//!   finish reason and usage, then `[DONE]`.
//! - `GET /v1/models`, `POST /tokenize` (`text`, or `messages` through the chat template).
//! - `GET /health` (liveness: the process serves) and `GET /ready` (some backend can serve
//!   and the server is not draining); both open without a key.
//!
//! Errors are OpenAI-style bodies (`{"error": {"message", "type", "code"}}`) with the HTTP
//! status of the request's gRPC code (`error::http_status`). The body size is bounded by
//! the server's message limit. `model` in requests is not checked: one model is served.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router as HttpRouter;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use dimple_core::params::FinishReason;
use dimple_proto::convert::{GenerateInput, InputMessage, chat_input};
use dimple_proto::v1;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::RouterError;
use crate::auth::ApiKeys;
use crate::error::{code_name, http_status};
use crate::frontend::{Answer, AnswerEnd, CallRecord, FrontEvent, Frontend, TokenizeInput};

/// The HTTP API's shared state. Cheap to clone.
#[derive(Clone)]
pub struct HttpApi {
    frontend: Arc<Frontend>,
    keys: ApiKeys,
    max_body_bytes: usize,
}

impl HttpApi {
    pub fn new(frontend: Arc<Frontend>, keys: ApiKeys, max_body_bytes: usize) -> Self {
        Self {
            frontend,
            keys,
            max_body_bytes,
        }
    }

    /// The routes, ready to serve.
    pub fn routes(self) -> HttpRouter {
        let limit = self.max_body_bytes;
        HttpRouter::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/tokenize", post(tokenize))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self)
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.keys
            .check_header(header)
            .map_err(|s| ApiError(RouterError::Unauthenticated(s.message().to_owned())))
    }
}

/// Serves the HTTP API on `listener` until `shutdown` completes; readiness turns false
/// then, and running requests finish.
pub async fn serve_http(
    listener: TcpListener,
    api: HttpApi,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    serve_on(listener, api, shutdown, "HTTP API serving").await
}

/// The server of [`serve_http`] on any listener (plain TCP, or TLS connections).
pub(crate) async fn serve_on<L>(
    listener: L,
    api: HttpApi,
    shutdown: impl Future<Output = ()> + Send + 'static,
    serving: &'static str,
) -> Result<(), RouterError>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let frontend = api.frontend.clone();
    let local = listener
        .local_addr()
        .map_err(|e| RouterError::Setup(format!("HTTP listener address: {e}")))?;
    tracing::info!(%local, "{serving}");
    axum::serve(listener, api.routes())
        .with_graceful_shutdown(async move {
            shutdown.await;
            frontend.begin_drain();
        })
        .await
        .map_err(|e| RouterError::Setup(format!("HTTP server: {e}")))
}

/// An error as an OpenAI-style response.
pub struct ApiError(pub RouterError);

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let status =
            StatusCode::from_u16(http_status(code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(error_body(&self.0))).into_response()
    }
}

fn error_body(e: &RouterError) -> Value {
    let code = e.code();
    let kind = match http_status(code) {
        400 => "invalid_request_error",
        401 => "authentication_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    let message = match e {
        RouterError::Worker(s) => s.message().to_owned(),
        e => e.to_string(),
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": code_name(code)}})
}

fn invalid(message: String) -> ApiError {
    ApiError(RouterError::Invalid(message))
}

/// Parses a JSON body, naming the offending path in errors.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            invalid(format!(
                "the request body is not valid JSON for this route: {inner}"
            ))
        } else {
            invalid(format!("`{path}`: {inner}"))
        }
    })
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<MessageIn>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopIn>,
    #[serde(default)]
    stream: bool,
    n: Option<u32>,
    #[serde(default)]
    dimple: DimpleExt,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    content: Option<ContentIn>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ContentIn {
    Text(String),
    Parts(Vec<PartIn>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum PartIn {
    Text { text: String },
    ImageUrl { image_url: ImageUrlIn },
}

#[derive(Deserialize)]
struct ImageUrlIn {
    url: String,
}

/// Diffusion settings beyond the OpenAI fields.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DimpleExt {
    threshold: Option<f32>,
    steps: Option<u32>,
    alg: Option<String>,
    pipeline: Option<String>,
    use_cache: Option<bool>,
    /// Block-wise decoding: response slots per block.
    block_length: Option<u32>,
    /// `exact`, `prefix` or `dual`.
    cache_mode: Option<String>,
    top_k: Option<u32>,
    alg_temp: Option<f32>,
    /// A template string (`"The answer is <mask><mask>.<|im_end|>"`) or `[[position,
    /// token_id], ...]`.
    prior: Option<PriorIn>,
    #[serde(default)]
    allow_special_tokens: bool,
    #[serde(default)]
    request_id: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PriorIn {
    Template(String),
    Fixed(Vec<(u32, u32)>),
}

/// The image bytes of a `data:` URI; remote URLs are refused.
fn image_bytes(url: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(invalid(format!(
            "`{field}`: only `data:` URIs are accepted (data:image/png;base64,...); the server does not fetch remote URLs"
        )));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(invalid(format!(
            "`{field}`: a `data:` URI needs a `,` before the data"
        )));
    };
    if !meta.ends_with(";base64") {
        return Err(invalid(format!(
            "`{field}`: the `data:` URI must be base64-encoded (`;base64,`)"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| invalid(format!("`{field}`: invalid base64: {e}")))
}

fn messages_in(messages: Vec<MessageIn>) -> Result<v1::Chat, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            None => return Err(invalid(format!("`messages[{i}].content` must be set"))),
            Some(ContentIn::Text(t)) => vec![v1::ContentPart {
                part: Some(v1::content_part::Part::Text(t)),
            }],
            Some(ContentIn::Parts(parts)) => {
                let mut content = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    let part = match p {
                        PartIn::Text { text } => v1::content_part::Part::Text(text),
                        PartIn::ImageUrl { image_url } => {
                            let field = format!("messages[{i}].content[{j}].image_url.url");
                            v1::content_part::Part::Image(v1::Image {
                                data: image_bytes(&image_url.url, &field)?,
                            })
                        }
                    };
                    content.push(v1::ContentPart { part: Some(part) });
                }
                content
            }
        };
        out.push(v1::ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(v1::Chat { messages: out })
}

/// The gRPC request an OpenAI chat request stands for (the same request, the same answer).
fn generate_request(r: ChatRequest) -> Result<v1::GenerateRequest, ApiError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(invalid("`n` must be 1".into()));
    }
    let d = r.dimple;
    let stop = match r.stop {
        None => Vec::new(),
        Some(StopIn::One(s)) => vec![s],
        Some(StopIn::Many(v)) => v,
    };
    let prior = d.prior.map(|p| v1::StructurePrior {
        prior: Some(match p {
            PriorIn::Template(template) => {
                v1::structure_prior::Prior::Template(v1::TemplatePrior {
                    template,
                    mask_placeholder: String::new(),
                })
            }
            PriorIn::Fixed(pairs) => v1::structure_prior::Prior::Fixed(v1::FixedTokens {
                tokens: pairs
                    .into_iter()
                    .map(|(position, token_id)| v1::FixedToken { position, token_id })
                    .collect(),
            }),
        }),
    });
    Ok(v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Chat(messages_in(r.messages)?)),
        params: Some(v1::DecodeParams {
            max_new_tokens: r.max_completion_tokens.or(r.max_tokens),
            steps: d.steps,
            threshold: d.threshold,
            alg: d.alg.unwrap_or_default(),
            pipeline: d.pipeline.unwrap_or_default(),
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: d.top_k,
            alg_temp: d.alg_temp,
            use_original_confidence: None,
            seed: r.seed,
            use_cache: d.use_cache,
            stop,
            block_length: d.block_length,
            cache_mode: d.cache_mode.unwrap_or_default(),
        }),
        prior,
        stream: None,
        request_id: d.request_id,
        allow_special_tokens: d.allow_special_tokens,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(a: &Answer) -> &'static str {
    match a.answer_end {
        AnswerEnd::EndToken | AnswerEnd::StopSequence => "stop",
        AnswerEnd::Length => "length",
    }
}

fn usage(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens + a.completion_tokens,
        "forward_passes": a.steps,
    })
}

/// What the OpenAI shape has no field for: the response row and how decoding ended.
fn dimple_details(a: &Answer) -> Value {
    json!({
        "request_id": a.request_id,
        "token_ids": a.token_ids,
        "forward_passes": a.steps,
        "decode_finish": match a.finish_reason {
            FinishReason::StepLimit => "step_limit",
            _ => "completed",
        },
    })
}

async fn chat_completions(State(api): State<HttpApi>, headers: HeaderMap, body: Bytes) -> Response {
    let mut record = api.frontend.record("http_chat_completions", true);
    let result = async {
        api.authorize(&headers)?;
        let req: ChatRequest = parse(&body)?;
        let stream = req.stream;
        let input = GenerateInput::try_from(generate_request(req)?).map_err(RouterError::from)?;
        let prepared = api.frontend.prepare(input).await?;
        let deadline = api.frontend.deadline(None);
        let model = prepared.model.model.clone();
        if stream {
            return Ok(Err((api.frontend.stream(prepared, deadline), model)));
        }
        let answer = api.frontend.generate(&prepared, deadline).await?;
        Ok::<_, ApiError>(Ok((answer, model)))
    }
    .await;
    match result {
        Err(e) => {
            record.fail(&e.0);
            e.into_response()
        }
        Ok(Ok((a, model))) => {
            record.ok();
            axum::Json(json!({
                "id": format!("chatcmpl-{}", a.request_id),
                "object": "chat.completion",
                "created": now_secs(),
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": a.text},
                    "finish_reason": finish_reason(&a),
                    "logprobs": null,
                }],
                "usage": usage(&a),
                "dimple": dimple_details(&a),
            }))
            .into_response()
        }
        Ok(Err((events, model))) => sse(events, model, record).into_response(),
    }
}

/// Server-sent events of a stream: a chunk per step with the text that joined the
/// committed prefix, then the finish chunk and `[DONE]`.
fn sse(
    mut events: mpsc::Receiver<Result<FrontEvent, RouterError>>,
    model: String,
    mut record: CallRecord,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(32);
    tokio::spawn(async move {
        let created = now_secs();
        let mut id = String::new();
        // The prefix text already sent.
        let mut sent = String::new();
        let chunk = |id: &str, delta: Value, finish: Value, extra: Option<(&str, Value)>| {
            let mut c = json!({
                "id": format!("chatcmpl-{id}"),
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
            });
            if let (Some((k, v)), Some(obj)) = (extra, c.as_object_mut()) {
                obj.insert(k.to_owned(), v);
            }
            Event::default().data(c.to_string())
        };
        loop {
            let item = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
            };
            let Some(item) = item else { return };
            let event = match item {
                Ok(FrontEvent::Started(s)) => {
                    id = s.request_id;
                    chunk(
                        &id,
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                        None,
                    )
                }
                Ok(FrontEvent::Step(s)) => {
                    // A trailing partial character decodes as U+FFFD until its last byte
                    // commits: hold it back.
                    let prefix = s.prefix_text.trim_end_matches('\u{FFFD}');
                    let delta = match prefix.strip_prefix(sent.as_str()) {
                        Some(d) => d.to_owned(),
                        None => String::new(),
                    };
                    if !delta.is_empty() {
                        sent.push_str(&delta);
                    }
                    let info = json!({"step": s.step, "masks_left": s.masks_left});
                    chunk(
                        &id,
                        json!({"content": delta}),
                        Value::Null,
                        Some(("dimple", info)),
                    )
                }
                Ok(FrontEvent::Final(a)) => {
                    record.ok();
                    let rest = a.text.strip_prefix(sent.as_str()).unwrap_or("").to_owned();
                    let last = chunk(
                        &id,
                        if rest.is_empty() {
                            json!({})
                        } else {
                            json!({"content": rest})
                        },
                        json!(finish_reason(&a)),
                        Some(("usage", usage(&a))),
                    );
                    if tx.send(Ok(last)).await.is_err() {
                        return;
                    }
                    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
                Err(e) => {
                    record.fail(&e);
                    let _ = tx
                        .send(Ok(Event::default().data(error_body(&e).to_string())))
                        .await;
                    return;
                }
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeIn {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    text: Option<String>,
    messages: Option<Vec<MessageIn>>,
    #[serde(default)]
    allow_special_tokens: bool,
}

async fn tokenize(State(api): State<HttpApi>, headers: HeaderMap, body: Bytes) -> Response {
    let mut record = api.frontend.record("http_tokenize", false);
    let result = async {
        api.authorize(&headers)?;
        let req: TokenizeIn = parse(&body)?;
        let input = match (req.text, req.messages) {
            (Some(text), None) => TokenizeInput::Text(text),
            (None, Some(messages)) => TokenizeInput::Chat {
                messages: chat_messages(messages)?,
                allow_special_tokens: req.allow_special_tokens,
            },
            _ => return Err(invalid("give exactly one of `text` and `messages`".into())),
        };
        let t = api.frontend.tokenize(input).await?;
        Ok::<_, ApiError>(json!({
            "count": t.ids.len(),
            "ids": t.ids,
            "tokens": t.tokens,
            "offsets": t.offsets,
        }))
    }
    .await;
    json_reply(&mut record, result)
}

/// A JSON answer (or error), with its outcome recorded.
fn json_reply(record: &mut CallRecord, result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => {
            record.ok();
            axum::Json(v).into_response()
        }
        Err(e) => {
            record.fail(&e.0);
            e.into_response()
        }
    }
}

fn chat_messages(messages: Vec<MessageIn>) -> Result<Vec<InputMessage>, ApiError> {
    // Named as in generation requests, so errors read the same on every route.
    let chat = messages_in(messages)?;
    chat_input(chat, "chat").map_err(|e| ApiError(RouterError::from(e)))
}

async fn models(State(api): State<HttpApi>, headers: HeaderMap) -> Response {
    let mut record = api.frontend.record("http_models", false);
    let result = async {
        api.authorize(&headers)?;
        let info = api.frontend.model_info().await?;
        Ok::<_, ApiError>(json!({
            "object": "list",
            "data": [{
                "id": info.model.model,
                "object": "model",
                "created": 0,
                "owned_by": "dimple",
                "max_model_len": info.model.max_position_embeddings,
            }],
        }))
    }
    .await;
    json_reply(&mut record, result)
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(api): State<HttpApi>) -> Response {
    if api.frontend.ready() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_only() {
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG");
        assert_eq!(
            image_bytes(&format!("data:image/png;base64,{png}"), "f")
                .ok()
                .unwrap(),
            b"\x89PNG"
        );
        let e = image_bytes(
            "https://example.com/cat.png",
            "messages[0].content[1].image_url.url",
        )
        .err()
        .unwrap()
        .0
        .to_string();
        assert!(e.contains("does not fetch remote URLs"), "{e}");
        assert!(image_bytes("data:image/png,abc", "f").is_err());
    }

    #[test]
    fn chat_request_maps_to_the_grpc_request() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"hi"}]}],"max_tokens":8,"temperature":0.5,"seed":3,
            "stop":"x","dimple":{"threshold":0.9,"use_cache":true,"prior":[[0,5]]}}"#;
        let r = generate_request(parse::<ChatRequest>(body).ok().unwrap())
            .ok()
            .unwrap();
        let p = r.params.unwrap();
        assert_eq!(p.max_new_tokens, Some(8));
        assert_eq!(p.threshold, Some(0.9));
        assert_eq!(p.seed, Some(3));
        assert_eq!(p.stop, vec!["x".to_owned()]);
        assert_eq!(p.use_cache, Some(true));
        assert!(r.prior.is_some());
        let bad = br#"{"messages":[{"role":"user","content":[{"type":"audio"}]}]}"#;
        assert!(parse::<ChatRequest>(bad).is_err());
        let bad = br#"{"messages":[],"dimple":{"treshold":0.9}}"#;
        let e = parse::<ChatRequest>(bad).err().unwrap().0.to_string();
        assert!(e.contains("dimple"), "{e}");
    }
}
