//! `dimple generate`: one request through an in-process engine. Prints the answer (showing
//! the denoising live on a terminal), or with `--json` the response ids, the number of
//! forward passes and the response after every step.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::Args;
use dimple_core::params::{DecodeParams, StructurePrior};
use dimple_engine::{
    EngineConfig, EngineEvent, EngineImage, GenerateRequest, GroupConfig, GroupDevices,
};
use dimple_model::Checkpoint;
use dimple_model::preprocess::preprocess_image;
use dimple_router::prompt::{ChatMessage, ContentPart, PromptBuilder};

use crate::model_source::ModelSource;

/// Decode parameters shared by every command that submits requests.
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Response length in tokens (mask slots). Default: the model's generation config, else 64.
    #[arg(long, env = "DIMPLE_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<usize>,
    /// Forward passes at most. Default: `max_new_tokens`.
    #[arg(long, env = "DIMPLE_STEPS")]
    pub steps: Option<usize>,
    /// Confident decoding: commit every slot whose confidence exceeds this (0 or absent: off).
    #[arg(long, env = "DIMPLE_THRESHOLD")]
    pub threshold: Option<f32>,
    /// maskgit_plus, topk_margin, entropy, origin, origin-ratio or autoregressive.
    #[arg(long, default_value = "maskgit_plus", env = "DIMPLE_ALG")]
    pub alg: String,
    /// dim (confident decoding) or dream (pure schedule).
    #[arg(long, default_value = "dim", env = "DIMPLE_PIPELINE")]
    pub pipeline: String,
    #[arg(long, default_value_t = 0.0, env = "DIMPLE_TEMPERATURE")]
    pub temperature: f32,
    #[arg(long, env = "DIMPLE_TOP_P")]
    pub top_p: Option<f32>,
    #[arg(long, env = "DIMPLE_TOP_K")]
    pub top_k: Option<usize>,
    #[arg(long, env = "DIMPLE_ALG_TEMP")]
    pub alg_temp: Option<f32>,
    /// Score confidences with the tempered, filtered distribution instead of the original one.
    #[arg(long, env = "DIMPLE_NO_ORIGINAL_CONFIDENCE")]
    pub no_original_confidence: bool,
    #[arg(long, default_value_t = 0, env = "DIMPLE_SEED")]
    pub seed: u64,
    /// Prefilling: compute the prompt's keys/values once and reuse them every step.
    #[arg(long, env = "DIMPLE_CACHE")]
    pub cache: bool,
    /// Structure prior: fixed response tokens as `POS:TOKEN,POS:TOKEN,...`.
    #[arg(long, env = "DIMPLE_PRIOR")]
    pub prior: Option<String>,
}

impl DecodeArgs {
    /// Builds the parameters; `default_len` is the response length when none is given.
    pub fn params(&self, default_len: usize) -> anyhow::Result<DecodeParams> {
        let max_new_tokens = self.max_new_tokens.unwrap_or(default_len);
        Ok(DecodeParams {
            max_new_tokens,
            steps: self.steps.unwrap_or(max_new_tokens),
            threshold: self.threshold,
            alg: self.alg.parse()?,
            pipeline: self.pipeline.parse()?,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            alg_temp: self.alg_temp,
            use_original_confidence: !self.no_original_confidence,
            seed: self.seed,
            use_cache: self.cache,
            prior: parse_prior(self.prior.as_deref())?,
        })
    }
}

pub fn parse_prior(text: Option<&str>) -> anyhow::Result<StructurePrior> {
    let mut fixed = Vec::new();
    for item in text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (pos, tok) = item
            .split_once(':')
            .with_context(|| format!("`--prior` item {item:?} is not POS:TOKEN"))?;
        fixed.push((
            pos.trim()
                .parse()
                .with_context(|| format!("`--prior` position {pos:?}"))?,
            tok.trim()
                .parse()
                .with_context(|| format!("`--prior` token {tok:?}"))?,
        ));
    }
    Ok(StructurePrior { fixed })
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The question, sent as one user message through the chat template. Omit it when
    /// giving `--input-ids`.
    pub prompt: Option<String>,
    /// Checkpoint directory; the built-in demo model when absent.
    #[arg(long, env = "DIMPLE_MODEL")]
    pub model: Option<PathBuf>,
    /// The whole prompt as token ids (image tokens already expanded), e.g. `1,2,3`.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    pub input_ids: Option<Vec<u32>>,
    /// Image files, in the order their tokens appear in the prompt.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    #[arg(long, env = "DIMPLE_MIN_PIXELS")]
    pub min_pixels: Option<u64>,
    #[arg(long, env = "DIMPLE_MAX_PIXELS")]
    pub max_pixels: Option<u64>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Print one JSON object: response_ids, steps, history, finish_reason, text.
    #[arg(long)]
    pub json: bool,
    /// Send the request to a running router (`http://HOST:PORT`, or `https://` with TLS)
    /// instead of decoding in-process; the denoising is shown live from its stream.
    #[arg(long, env = "DIMPLE_ROUTER")]
    pub router: Option<String>,
    /// API key sent as `authorization: Bearer <key>` (with `--router`).
    #[arg(long, env = "DIMPLE_API_KEY")]
    pub api_key: Option<String>,
    /// PEM certificate of the CA that signed the router's TLS certificate (with `--router`).
    #[arg(long, env = "DIMPLE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Structure prior as a response template, e.g. "The answer is <mask><mask>.<|im_end|>"
    /// (with `--router`: the router tokenises it into fixed positions).
    #[arg(long, conflicts_with = "prior")]
    pub prior_template: Option<String>,
    #[command(flatten)]
    pub ranks: RankArgs,
}

/// Where the model runs: tensor-parallel degree, device and dtype.
#[derive(Args, Debug, Clone)]
pub struct RankArgs {
    /// Tensor-parallel degree: this many rank threads, one per device (CPU ranks when there
    /// is no GPU). Must be one of the model's valid degrees.
    #[arg(long, default_value_t = 1, env = "DIMPLE_TP")]
    pub tp: usize,
    /// cpu, cuda, or auto (CUDA when the binary is built with it and a GPU opens). `cuda`
    /// fails at start when the binary lacks CUDA or the GPUs do not open.
    #[arg(long, default_value = "auto", env = "DIMPLE_DEVICE")]
    pub device: String,
    /// f32, bf16 or f16 (candle's CPU matmul has no bf16 kernel: use f32 or f16 on CPU).
    #[arg(long, default_value = "f32", env = "DIMPLE_DTYPE")]
    pub dtype: String,
}

impl RankArgs {
    pub fn group(&self) -> anyhow::Result<GroupConfig> {
        let dtype = match self.dtype.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => bail!("`--dtype` must be f32, bf16 or f16, got {other:?}"),
        };
        let devices = match self.device.as_str() {
            "cpu" => GroupDevices::Cpu,
            "cuda" => {
                crate::device::require_cuda(self.tp)?;
                GroupDevices::Cuda { first_ordinal: 0 }
            }
            "auto" if candle_core::utils::cuda_is_available() && Device::new_cuda(0).is_ok() => {
                GroupDevices::Cuda { first_ordinal: 0 }
            }
            "auto" => GroupDevices::Cpu,
            other => bail!("`--device` must be cpu, cuda or auto, got {other:?}"),
        };
        Ok(GroupConfig {
            dtype,
            devices,
            ..GroupConfig::cpu(self.tp)
        })
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.router {
        return crate::remote::run(&args, url);
    }
    if args.prior_template.is_some() {
        bail!("`--prior-template` needs `--router` (the router tokenises templates)");
    }
    let source = ModelSource(args.model.clone());
    let checkpoint = match &source.0 {
        Some(dir) => Checkpoint::Dir(dir.clone()),
        None => Checkpoint::Builtin,
    };
    let group = args.ranks.group()?;
    let engine = dimple_engine::start_group(&checkpoint, group, EngineConfig::default(), None)
        .with_context(|| {
            format!(
                "loading the model from {} on {} rank(s)",
                source.name(),
                args.ranks.tp
            )
        })?;
    let cfg = engine.model_config().clone();
    let mut pre = source.preprocess_config()?;
    if let Some(v) = args.min_pixels {
        pre.min_pixels = v;
    }
    if let Some(v) = args.max_pixels {
        pre.max_pixels = v;
    }
    let mut images = Vec::new();
    for path in &args.image {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let im =
            preprocess_image(&bytes, &pre).with_context(|| format!("image {}", path.display()))?;
        images.push(im);
    }
    let builder = source.prompt_builder().ok();
    let prompt_ids = match (&args.input_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let builder = builder
                .as_ref()
                .context("the model has no tokenizer.json; use --input-ids")?;
            let mut parts: Vec<ContentPart> = images.iter().map(|_| ContentPart::Image).collect();
            parts.push(ContentPart::text(text.clone()));
            let counts: Vec<usize> = images
                .iter()
                .map(|i| i.num_image_tokens(pre.merge_size as usize))
                .collect();
            builder
                .build(&[ChatMessage::parts("user", parts)], &counts)?
                .ids
        }
        (None, None) => bail!("give a prompt or --input-ids"),
    };
    let default_len = default_response_len(&source);
    let params = args.decode.params(default_len)?;
    let n = params.max_new_tokens;
    let mut row = params.initial_response(cfg.mask_token_id);
    let request = GenerateRequest {
        prompt_ids,
        images: images.into_iter().map(EngineImage::from).collect(),
        params,
        deadline: None,
    };
    let mut rx = engine.submit(request)?;
    let live = !args.json && std::io::stderr().is_terminal();
    let mut history = Vec::new();
    let finished = loop {
        match rx
            .blocking_recv()
            .context("the engine stopped without answering")?
        {
            EngineEvent::Step { committed, .. } => {
                for (p, t) in committed {
                    row[p] = t;
                }
                history.push(row.clone());
                if live {
                    if let Some(b) = &builder {
                        let canvas = render_canvas(b, &row, cfg.mask_token_id);
                        eprint!("\r\x1b[Kstep {:>3}  {canvas}", history.len());
                        let _ = std::io::stderr().flush();
                    }
                }
            }
            EngineEvent::Finished(f) => break f,
            EngineEvent::Failed(e) => bail!("generation failed: {e}"),
        }
    };
    if live {
        eprintln!();
    }
    engine.shutdown();
    let text = builder
        .as_ref()
        .map(|b| answer_text(b, &finished.response_ids, cfg.eos_token_id))
        .transpose()?;
    if args.json {
        let out = serde_json::json!({
            "response_ids": finished.response_ids,
            "steps": finished.steps,
            "history": history,
            "finish_reason": finished.finish_reason.as_str(),
            "text": text,
        });
        println!("{out}");
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!("{:?}", finished.response_ids),
        }
        eprintln!(
            "[{} forward passes for {} response slots, {}]",
            finished.steps, n, finished.finish_reason
        );
    }
    Ok(())
}

/// `max_new_tokens` from the model's generation config, else 64.
pub(crate) fn default_response_len(source: &ModelSource) -> usize {
    let text = match &source.0 {
        Some(dir) => std::fs::read_to_string(dir.join("generation_config.json")).ok(),
        None => Some(dimple_core::builtin::GENERATION_CONFIG_JSON.to_string()),
    };
    text.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("max_new_tokens").and_then(|m| m.as_u64()))
        .map_or(64, |m| m as usize)
}

/// The answer: the text before the first end token, special tokens dropped.
pub fn answer_text(builder: &PromptBuilder, response: &[u32], eos: u32) -> anyhow::Result<String> {
    let end = response
        .iter()
        .position(|&t| t == eos)
        .unwrap_or(response.len());
    Ok(builder.decode(&response[..end], true)?.trim().to_string())
}

/// The response with committed text decoded and each still-masked slot shown as `_`.
pub fn render_canvas(builder: &PromptBuilder, row: &[u32], mask: u32) -> String {
    let mut out = String::new();
    let mut run: Vec<u32> = Vec::new();
    for &t in row.iter().chain(std::iter::once(&mask)) {
        if t == mask {
            if !run.is_empty() {
                out.push_str(&builder.decode(&run, false).unwrap_or_default());
                run.clear();
            }
            out.push('_');
        } else {
            run.push(t);
        }
    }
    out.pop();
    out.replace('\n', " ")
}
