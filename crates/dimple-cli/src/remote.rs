//! `dimple generate`: the request built from the command line, sent to a running router
//! (`--router URL`) or to the front-end over an in-process engine, with the denoising shown
//! live from the stream (one step message per forward pass). Both paths print from the same
//! stream messages.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use dimple_proto::v1;
use dimple_proto::v1::dimple_client::DimpleClient;
use dimple_router::RouterError;
use dimple_router::error::code_name;
use dimple_router::frontend::FrontEvent;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::generate::{DecodeArgs, GenerateArgs, parse_prior};

/// Builds the public request from the command line.
pub fn request(args: &GenerateArgs) -> anyhow::Result<v1::GenerateRequest> {
    let mut images = Vec::new();
    for path in &args.image {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        images.push(v1::Image { data });
    }
    let input = match (&args.input_ids, &args.prompt) {
        (Some(ids), _) => v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: ids.clone(),
            images,
        }),
        (None, Some(text)) => {
            let mut content: Vec<v1::ContentPart> = images
                .into_iter()
                .map(|im| v1::ContentPart {
                    part: Some(v1::content_part::Part::Image(im)),
                })
                .collect();
            content.push(v1::ContentPart {
                part: Some(v1::content_part::Part::Text(text.clone())),
            });
            v1::generate_request::Input::Chat(v1::Chat {
                messages: vec![v1::ChatMessage {
                    role: "user".into(),
                    content,
                }],
            })
        }
        (None, None) => bail!("give a prompt or --input-ids"),
    };
    let prior = match (&args.prior_template, &args.decode.prior) {
        (Some(t), _) => Some(v1::StructurePrior {
            prior: Some(v1::structure_prior::Prior::Template(v1::TemplatePrior {
                template: t.clone(),
                mask_placeholder: String::new(),
            })),
        }),
        (None, Some(p)) => {
            let fixed = parse_prior(Some(p))?;
            Some(v1::StructurePrior {
                prior: Some(v1::structure_prior::Prior::Fixed(v1::FixedTokens {
                    tokens: fixed
                        .fixed
                        .iter()
                        .map(|&(p, t)| v1::FixedToken {
                            position: p as u32,
                            token_id: t,
                        })
                        .collect(),
                })),
            })
        }
        (None, None) => None,
    };
    Ok(v1::GenerateRequest {
        input: Some(input),
        params: Some(params(&args.decode)),
        prior,
        stream: Some(v1::StreamOptions {
            include_canvas: true,
            mask_placeholder: "_".into(),
        }),
        request_id: String::new(),
        allow_special_tokens: false,
    })
}

/// Unset flags stay unset, so the server's defaults (the model's generation config) apply.
pub(crate) fn params(d: &DecodeArgs) -> v1::DecodeParams {
    v1::DecodeParams {
        max_new_tokens: d.max_new_tokens.map(|n| n as u32),
        steps: d.steps.map(|n| n as u32),
        threshold: d.threshold,
        alg: d.alg.clone(),
        pipeline: d.pipeline.clone(),
        temperature: Some(d.temperature),
        top_p: d.top_p,
        top_k: d.top_k.map(|k| k as u32),
        alg_temp: d.alg_temp,
        use_original_confidence: Some(!d.no_original_confidence),
        seed: Some(d.seed),
        use_cache: Some(d.cache),
        stop: Vec::new(),
        block_length: d.block_length.map(|n| n as u32),
        cache_mode: d.cache_mode.clone().unwrap_or_default(),
    }
}

pub(crate) async fn connect(
    url: &str,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<Channel> {
    let mut endpoint =
        Endpoint::from_shared(url.to_owned()).with_context(|| format!("`--router` {url:?}"))?;
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading `--ca-cert` {}", path.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the router at {url}"))
}

/// Where a generation's stream messages come from.
pub enum Events {
    /// Boxed: the gRPC stream is several times the size of the channel receiver.
    Remote(Box<tonic::Streaming<v1::GenerateStreamResponse>>),
    Local(mpsc::Receiver<Result<FrontEvent, RouterError>>),
}

impl Events {
    async fn next(&mut self) -> anyhow::Result<Option<v1::GenerateStreamResponse>> {
        match self {
            Events::Remote(s) => s.message().await.map_err(status_error),
            Events::Local(rx) => match rx.recv().await {
                None => Ok(None),
                Some(Ok(e)) => Ok(Some(dimple_router::service::stream_message(e))),
                Some(Err(e)) => Err(front_error(e)),
            },
        }
    }
}

/// A front-end error as the command reports it.
pub fn front_error(e: RouterError) -> anyhow::Error {
    anyhow::anyhow!("{}: {e}", code_name(e.code()))
}

pub fn run(args: &GenerateArgs, url: &str) -> anyhow::Result<()> {
    let request = request(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let channel = connect(url, args.ca_cert.as_deref()).await?;
        let mut client = DimpleClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut req = tonic::Request::new(request);
        if let Some(key) = &args.api_key {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().context("`--api-key`")?,
            );
        }
        let stream = client
            .generate_stream(req)
            .await
            .map_err(status_error)?
            .into_inner();
        print(args, Events::Remote(Box::new(stream)), Some(url)).await
    })
}

/// Prints a generation from its stream: the live canvas on a terminal, then the answer (or
/// the JSON history).
pub async fn print(
    args: &GenerateArgs,
    mut events: Events,
    via: Option<&str>,
) -> anyhow::Result<()> {
    let live = !args.json && std::io::stderr().is_terminal();
    let mut row: Vec<u32> = Vec::new();
    let mut history = Vec::new();
    let mut blocks = Vec::new();
    let finished = loop {
        let Some(msg) = events.next().await? else {
            bail!("the stream ended without a final answer");
        };
        match msg.event {
            Some(v1::generate_stream_response::Event::Started(s)) => row = s.initial_ids,
            Some(v1::generate_stream_response::Event::Step(step)) => {
                for c in &step.committed {
                    if let Some(slot) = row.get_mut(c.position as usize) {
                        *slot = c.token_id;
                    }
                }
                history.push(row.clone());
                blocks.push(step.block);
                if live && let Some(canvas) = &step.canvas {
                    eprint!(
                        "\r\x1b[Kstep {:>3} block {:>2}  {}",
                        history.len(),
                        step.block,
                        canvas.replace('\n', " ")
                    );
                    let _ = std::io::stderr().flush();
                }
            }
            Some(v1::generate_stream_response::Event::Final(f)) => break f,
            None => {}
        }
    };
    if live {
        eprintln!();
    }
    let reason = match v1::FinishReason::try_from(finished.finish_reason) {
        Ok(v1::FinishReason::Completed) => "completed",
        Ok(v1::FinishReason::StepLimit) => "step_limit",
        _ => "unspecified",
    };
    if args.json {
        let out = serde_json::json!({
            "response_ids": finished.token_ids,
            "steps": finished.steps,
            "history": history,
            "blocks": blocks,
            "finish_reason": reason,
            "text": finished.text,
        });
        println!("{out}");
    } else {
        println!("{}", finished.text);
        let via = via.map(|u| format!("; via {u}")).unwrap_or_default();
        eprintln!(
            "[{} forward passes for {} response slots, {}{via}]",
            finished.steps,
            finished.token_ids.len(),
            reason
        );
    }
    Ok(())
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "the router answered {}: {}",
        code_name(s.code()),
        s.message()
    )
}
