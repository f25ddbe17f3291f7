//! `dimple generate`: one request through the router's front-end, over an in-process engine
//! (or a running router with `--router`). Prints the answer (showing the denoising live on
//! a terminal), or with `--json` the response ids, the number of forward passes and the
//! response after every step.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::Args;
use dimple_core::params::StructurePrior;
use dimple_engine::{EngineConfig, GroupConfig, GroupDevices};
use dimple_proto::convert::GenerateInput;
use dimple_router::RouterError;
use dimple_router::prompt::PromptBuilder;
use prometheus::Registry;

use crate::model_source::ModelSource;
use crate::remote::{Events, front_error};
use crate::serving;

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
    /// Prefilling: compute the prompt's keys/values once and reuse them every step (the
    /// same as `--cache-mode prefix`).
    #[arg(long, env = "DIMPLE_CACHE")]
    pub cache: bool,
    /// Block-wise decoding: slots per block, decoded left to right, each block with
    /// `steps / blocks` steps (at least 1). Default: the whole response is one block.
    #[arg(long, env = "DIMPLE_BLOCK_LENGTH")]
    pub block_length: Option<usize>,
    /// exact (recompute everything every step), prefix (= --cache) or dual (keep the
    /// keys/values outside the current block, refreshed at each block start).
    #[arg(long, env = "DIMPLE_CACHE_MODE")]
    pub cache_mode: Option<String>,
    /// Structure prior: fixed response tokens as `POS:TOKEN,POS:TOKEN,...`.
    #[arg(long, env = "DIMPLE_PRIOR")]
    pub prior: Option<String>,
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
    /// (tokenised into fixed positions by the front-end).
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
    // The same request `--router` sends, through the same front-end, decoded here.
    let request = crate::remote::request(&args)?;
    let source = ModelSource(args.model.clone());
    let mut pre = source.preprocess_config()?;
    if let Some(v) = args.min_pixels {
        pre.min_pixels = v;
    }
    if let Some(v) = args.max_pixels {
        pre.max_pixels = v;
    }
    let prompt = match source.prompt_builder() {
        Ok(p) => p,
        // A bare checkpoint still decodes token ids; its text is only indicative.
        Err(e) if args.input_ids.is_some() => {
            eprintln!("warning: {e:#}; text is decoded with the built-in demo tokenizer");
            PromptBuilder::builtin()?
        }
        Err(e) => return Err(e),
    };
    let images = serving::image_limits(&pre);
    let worker = serving::start_worker_with(
        &source,
        &args.ranks,
        EngineConfig::default(),
        pre,
        &Registry::new(),
    )?;
    let result = serving::block_on(async {
        let frontend = serving::local_frontend(worker.clone(), prompt, images, 4)?;
        let input =
            GenerateInput::try_from(request).map_err(|e| front_error(RouterError::from(e)))?;
        let prepared = frontend.prepare(input).await.map_err(front_error)?;
        let deadline = frontend.deadline(None);
        let events = Events::Local(frontend.stream(prepared, deadline));
        crate::remote::print(&args, events, None).await
    });
    worker.shutdown();
    result
}

/// `max_new_tokens` from the model's generation config, else 64.
pub(crate) fn default_response_len(source: &ModelSource) -> usize {
    let text = match &source.0 {
        Some(dir) => std::fs::read_to_string(dir.join("generation_config.json")).ok(),
        None => Some(dimple_core::builtin::GENERATION_CONFIG_JSON.to_string()),
    };
    dimple_worker::default_max_new_tokens(text.as_deref())
}
