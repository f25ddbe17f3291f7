//! `dimple sweep` and `dimple bench`: load-tested evaluation sweeps over a grid of decoding
//! settings and load levels, against a router or the embedded local model.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dimple_engine::EngineConfig;
use dimple_proto::convert::GenerateInput;
use dimple_router::RouterError;
use dimple_router::error::code_name;
use dimple_router::frontend::{FrontEvent, Frontend};
use dimple_sweep::dataset::{SyntheticSpec, content_hash};
use dimple_sweep::grid::{parse_block_length, parse_threshold};
use dimple_sweep::meta::{self, DatasetInfo, Metadata, ModelInfo, PartsHash, TargetInfo};
use dimple_sweep::plots::PlotFormat;
use dimple_sweep::report::{OutputDir, Saved};
use dimple_sweep::target::TargetFuture;
use dimple_sweep::{Grid, Item, Response, RunOptions, Summary, SweepRequest, Target, TargetError};
use prometheus::Registry;

use crate::generate::{RankArgs, default_response_len};
use crate::model_source::ModelSource;

/// Thresholds a sweep runs when none are given: no threshold, then increasingly
/// conservative confident decoding (the accuracy-vs-NFE curve).
pub const DEFAULT_THRESHOLDS: [f32; 5] = [0.0, 0.5, 0.7, 0.9, 0.95];

#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// JSONL dataset (id, question/text/messages, image/images, answer, answer_type, kind).
    /// Default: the demo model's 100 evaluation items, built into the binary.
    #[arg(long, env = "DIMPLE_DATASET", conflicts_with = "synthetic")]
    pub dataset: Option<PathBuf>,
    /// Use N synthetic items instead (random prompts, half with a random image, no
    /// references: no accuracy).
    #[arg(long, env = "DIMPLE_SYNTHETIC")]
    pub synthetic: Option<usize>,
    /// Only the first N items.
    #[arg(long, env = "DIMPLE_LIMIT")]
    pub limit: Option<usize>,
    /// Checkpoint directory for the in-process model; the built-in demo model when absent.
    /// Its generation config gives the default response length.
    #[arg(long, env = "DIMPLE_MODEL", conflicts_with = "router")]
    pub model: Option<PathBuf>,
    /// Output folder. Default: a new timestamped folder in the current directory
    /// (`sweep-YYYYMMDD-HHMMSS` or `bench-...`). Giving the folder of an earlier run
    /// resumes it: complete configurations are kept, failed ones run again. A folder written
    /// with other settings (dataset, limit, model, target, repeats, warm-up) is refused.
    #[arg(long, env = "DIMPLE_OUT")]
    pub out: Option<PathBuf>,
    /// Discard the results in `--out` when they were made with other settings.
    #[arg(long, env = "DIMPLE_FORCE")]
    pub force: bool,
    /// Seeds the requests' random generators, the arrival times and synthetic items.
    #[arg(long, default_value_t = 0, env = "DIMPLE_SEED")]
    pub seed: u64,
    /// Each item is sent this many times per configuration.
    #[arg(long, default_value_t = 1, env = "DIMPLE_REPEATS")]
    pub repeats: usize,
    /// Requests sent before each configuration and left out of every measure (warms
    /// connections, allocations and caches).
    #[arg(long, default_value_t = 2, env = "DIMPLE_WARMUP")]
    pub warmup: usize,
    /// Latency objective in milliseconds: goodput counts the requests answered within it.
    #[arg(long, default_value_t = 1000.0, env = "DIMPLE_SLO_MS")]
    pub slo_ms: f64,
    /// Plot file formats, comma-separated: png, svg.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "png",
        env = "DIMPLE_FORMAT"
    )]
    pub format: Vec<PlotFormat>,
    /// Send the requests to a running router (`http://HOST:PORT`) instead of decoding them
    /// with an engine in this process.
    #[arg(long, env = "DIMPLE_ROUTER")]
    pub router: Option<String>,
    /// API key for the router (`authorization: Bearer`).
    #[arg(long, env = "DIMPLE_API_KEY")]
    pub api_key: Option<String>,
    /// The server's Prometheus endpoint (`http://HOST:PORT/metrics`), read before and after
    /// each configuration: counter changes and gauge values (labels kept) go into the JSON
    /// rows.
    #[arg(long, env = "DIMPLE_METRICS_URL")]
    pub metrics_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Grid as a TOML file (keys: threshold, alg, pipeline, cache_mode, max_new_tokens,
    /// block_length, steps, concurrency, rate, seed; use_cache as the older spelling of
    /// cache_mode); the flags below add to it.
    #[arg(long, env = "DIMPLE_GRID")]
    pub grid: Option<PathBuf>,
    /// Confidence thresholds, comma-separated; `none` (or 0) decodes without one.
    /// Default: none,0.5,0.7,0.9,0.95.
    #[arg(long, value_delimiter = ',', value_parser = parse_threshold)]
    pub threshold: Vec<f32>,
    /// Unmasking algorithms: maskgit_plus (default), topk_margin, entropy, origin,
    /// origin-ratio, autoregressive.
    #[arg(long, value_delimiter = ',')]
    pub alg: Vec<String>,
    /// Decoding loops: dim (confident decoding, default) or dream (schedule only; one
    /// point, thresholds do not apply).
    #[arg(long, value_delimiter = ',')]
    pub pipeline: Vec<String>,
    /// Cache modes: exact (recompute the whole sequence every step; default), prefix
    /// (the prompt's keys/values computed once, at step 0) or dual (the keys/values outside
    /// the current block, refreshed at each block start).
    #[arg(long, value_delimiter = ',')]
    pub cache_mode: Vec<String>,
    /// The older spelling of `--cache-mode`: false is exact, true is prefix. Not together
    /// with `--cache-mode` (nor with `cache_mode` in the grid file).
    #[arg(long, value_delimiter = ',')]
    pub cache: Vec<bool>,
    /// Response lengths in slots. Default: the model's generation config (16 for the
    /// built-in model; the server's default with `--router`).
    #[arg(long, value_delimiter = ',')]
    pub max_new_tokens: Vec<usize>,
    /// Block-wise decoding: slots per block, e.g. `whole,8,4`; `whole` (default) decodes
    /// the whole response as one block, and so does a block as long as the response.
    #[arg(long, value_delimiter = ',', value_parser = parse_block_length)]
    pub block_length: Vec<Option<usize>>,
    /// Forward passes at most per request, shared among the blocks. Default: the
    /// response length.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Closed-loop concurrency levels: requests kept in flight (default 1 when no
    /// `--rate` is given).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Open-loop Poisson arrival rates (requests/s).
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Concurrency levels (requests kept in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 4, 16])]
    pub concurrency: Vec<usize>,
    /// Confidence threshold (`none` or 0: none).
    #[arg(long, value_parser = parse_threshold)]
    pub threshold: Option<f32>,
    /// Prefilling (cache mode `prefix`): compute the prompt's keys and values once. The
    /// same as `--cache-mode prefix`.
    #[arg(long, conflicts_with = "cache_mode")]
    pub cache: bool,
    /// Cache mode: exact (default), prefix or dual.
    #[arg(long)]
    pub cache_mode: Option<String>,
    /// Block-wise decoding: slots per block (`whole`, the default, is one block).
    #[arg(long)]
    pub block_length: Option<String>,
}

/// A line on stderr. Write errors (a closed pipe) are ignored: losing the log must not
/// stop a sweep before its results are saved.
fn say(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

/// Requests decoded by an engine in this process, through the same front-end as a router.
pub struct LocalTarget {
    frontend: Arc<Frontend>,
    worker: dimple_worker::Worker,
}

impl LocalTarget {
    pub fn start(source: &ModelSource) -> anyhow::Result<Self> {
        let engine = EngineConfig {
            max_active: 64,
            max_waiting: 4096,
            ..EngineConfig::default()
        };
        let ranks = RankArgs {
            tp: 1,
            device: "cpu".into(),
            dtype: "f32".into(),
        };
        let pre = source.preprocess_config()?;
        let images = crate::serving::image_limits(&pre);
        let worker =
            crate::serving::start_worker_with(source, &ranks, engine, pre, &Registry::new())?;
        let frontend =
            crate::serving::local_frontend(worker.clone(), source.prompt_builder()?, images, 4096)?;
        Ok(Self { frontend, worker })
    }
}

impl Drop for LocalTarget {
    fn drop(&mut self) {
        self.worker.shutdown();
    }
}

fn target_error(e: RouterError) -> TargetError {
    TargetError {
        code: code_name(e.code()).into(),
        message: match e {
            RouterError::Worker(s) => s.message().to_owned(),
            e => e.to_string(),
        },
    }
}

impl Target for LocalTarget {
    fn generate(&self, req: SweepRequest) -> TargetFuture<'_> {
        Box::pin(async move {
            let sent = Instant::now();
            let input = GenerateInput::try_from(RouterTarget::request(&req))
                .map_err(|e| target_error(e.into()))?;
            let prepared = self.frontend.prepare(input).await.map_err(target_error)?;
            let mut events = self.frontend.stream(prepared, self.frontend.deadline(None));
            let mut first = None;
            loop {
                match events.recv().await {
                    Some(Ok(FrontEvent::Step(s))) => {
                        if first.is_none() && !s.committed.is_empty() {
                            first = Some(sent.elapsed());
                        }
                    }
                    Some(Ok(FrontEvent::Final(a))) => {
                        return Ok(Response {
                            text: a.text,
                            steps: a.steps as usize,
                            tokens: a.token_ids.len(),
                            answer_tokens: a.completion_tokens,
                            first_commit: first,
                        });
                    }
                    Some(Ok(FrontEvent::Started(_))) => {}
                    Some(Err(e)) => return Err(target_error(e)),
                    None => {
                        return Err(TargetError {
                            code: "UNAVAILABLE".into(),
                            message: "the stream ended without an answer".into(),
                        });
                    }
                }
            }
        })
    }
}

/// Response tokens before the first end token.
fn answer_len(response: &[u32], eos: u32) -> usize {
    response
        .iter()
        .position(|&t| t == eos)
        .unwrap_or(response.len())
}

/// Requests sent to a router over gRPC, streamed so the client sees the first commit.
pub struct RouterTarget {
    client: dimple_proto::v1::dimple_client::DimpleClient<tonic::transport::Channel>,
    api_key: Option<String>,
    /// The server's model, from `GetModelInfo` at connection.
    info: dimple_proto::v1::ModelInfo,
}

impl RouterTarget {
    pub async fn connect(url: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        let channel = crate::remote::connect(url, None).await?;
        let mut client = dimple_proto::v1::dimple_client::DimpleClient::new(channel)
            .max_decoding_message_size(64 << 20);
        let mut req = tonic::Request::new(dimple_proto::v1::GetModelInfoRequest {});
        authorize(&mut req, api_key.as_deref());
        let info = client
            .get_model_info(req)
            .await
            .with_context(|| format!("GetModelInfo at {url}"))?
            .into_inner();
        Ok(Self {
            client,
            api_key,
            info,
        })
    }

    /// The `GetModelInfo` answer as JSON for the report.
    fn info_json(&self) -> serde_json::Value {
        let i = &self.info;
        serde_json::json!({
            "model": i.model,
            "vocab_size": i.vocab_size,
            "mask_token_id": i.mask_token_id,
            "eos_token_id": i.eos_token_id,
            "image_token_id": i.image_token_id,
            "max_position_embeddings": i.max_position_embeddings,
            "default_max_new_tokens": i.default_max_new_tokens,
            "limits": i.limits.as_ref().map(|l| serde_json::json!({
                "max_new_tokens": l.max_new_tokens,
                "max_steps": l.max_steps,
                "max_prompt_tokens": l.max_prompt_tokens,
                "max_image_pixels": l.max_image_pixels,
                "max_message_bytes": l.max_message_bytes,
            })),
            "workers": i.workers,
        })
    }

    fn request(req: &SweepRequest) -> dimple_proto::v1::GenerateRequest {
        use dimple_proto::v1;
        let last_user = req.item.turns.iter().rposition(|t| t.role == "user");
        let messages = req
            .item
            .turns
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut content = Vec::new();
                if Some(i) == last_user {
                    for data in &req.item.images {
                        content.push(v1::ContentPart {
                            part: Some(v1::content_part::Part::Image(v1::Image {
                                data: data.clone(),
                            })),
                        });
                    }
                }
                content.push(v1::ContentPart {
                    part: Some(v1::content_part::Part::Text(t.content.clone())),
                });
                v1::ChatMessage {
                    role: t.role.clone(),
                    content,
                }
            })
            .collect();
        let p = &req.params;
        v1::GenerateRequest {
            input: Some(v1::generate_request::Input::Chat(v1::Chat { messages })),
            params: Some(v1::DecodeParams {
                max_new_tokens: Some(p.max_new_tokens as u32),
                steps: Some(p.steps as u32),
                threshold: p.threshold,
                alg: p.alg.to_string(),
                pipeline: p.pipeline.to_string(),
                temperature: Some(p.temperature),
                top_p: p.top_p,
                top_k: p.top_k.map(|k| k as u32),
                alg_temp: p.alg_temp,
                use_original_confidence: Some(p.use_original_confidence),
                seed: Some(p.seed),
                use_cache: Some(p.use_cache),
                stop: Vec::new(),
                block_length: p.block_length.map(|n| n as u32),
                cache_mode: p.cache.map(|c| c.as_str().to_owned()).unwrap_or_default(),
            }),
            prior: None,
            stream: None,
            request_id: String::new(),
            allow_special_tokens: false,
        }
    }
}

impl Target for RouterTarget {
    fn generate(&self, req: SweepRequest) -> TargetFuture<'_> {
        use dimple_proto::v1::generate_stream_response::Event;
        Box::pin(async move {
            let status = |s: tonic::Status| TargetError {
                code: code_name(s.code()).into(),
                message: s.message().to_string(),
            };
            let sent = Instant::now();
            let mut grpc = tonic::Request::new(Self::request(&req));
            authorize(&mut grpc, self.api_key.as_deref());
            let mut stream = self
                .client
                .clone()
                .generate_stream(grpc)
                .await
                .map_err(status)?
                .into_inner();
            let mut first = None;
            loop {
                match stream.message().await.map_err(status)? {
                    Some(m) => match m.event {
                        Some(Event::Step(s)) if first.is_none() && !s.committed.is_empty() => {
                            first = Some(sent.elapsed())
                        }
                        Some(Event::Final(f)) => {
                            return Ok(Response {
                                text: f.text,
                                steps: f.steps as usize,
                                tokens: f.token_ids.len(),
                                answer_tokens: answer_len(&f.token_ids, self.info.eos_token_id),
                                first_commit: first,
                            });
                        }
                        _ => {}
                    },
                    None => {
                        return Err(TargetError {
                            code: "UNAVAILABLE".into(),
                            message: "stream ended without an answer".into(),
                        });
                    }
                }
            }
        })
    }
}

fn authorize<T>(req: &mut tonic::Request<T>, api_key: Option<&str>) {
    if let Some(key) = api_key
        && let Ok(v) = format!("Bearer {key}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
}

/// The items of a run and their description.
fn load_items(w: &WorkloadArgs) -> anyhow::Result<(Vec<Arc<Item>>, DatasetInfo)> {
    let (mut items, name) = match (w.synthetic, &w.dataset) {
        (Some(n), _) => (
            dimple_sweep::synthetic(&SyntheticSpec {
                items: n,
                seed: w.seed,
                ..SyntheticSpec::default()
            })?,
            format!("synthetic ({n} items, seed {})", w.seed),
        ),
        (None, Some(p)) => (dimple_sweep::load_jsonl(p)?, p.display().to_string()),
        (None, None) => (
            dimple_sweep::dataset::demo_eval()?,
            dimple_sweep::dataset::DEMO_EVAL_NAME.to_string(),
        ),
    };
    if let Some(n) = w.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("no items to run");
    }
    let info = DatasetInfo {
        name,
        items: items.len(),
        sha256: content_hash(&items),
        limit: w.limit,
        synthetic: w.synthetic,
    };
    Ok((items.into_iter().map(Arc::new).collect(), info))
}

/// Name and hash of the in-process model. For a checkpoint directory the hash covers its
/// configuration, tokenizer and preprocessor files and the names and sizes of its weight
/// files (reading every weight of a 7B model would take minutes); for the built-in model
/// it covers every file.
fn local_model_info(source: &ModelSource) -> anyhow::Result<ModelInfo> {
    let mut h = PartsHash::default();
    let mut add = |name: &str, bytes: &[u8]| h.add(name, bytes);
    match &source.0 {
        None => {
            use dimple_core::builtin as b;
            add("config.json", b::CONFIG_JSON.as_bytes());
            add(
                "generation_config.json",
                b::GENERATION_CONFIG_JSON.as_bytes(),
            );
            add(
                "preprocessor_config.json",
                b::PREPROCESSOR_CONFIG_JSON.as_bytes(),
            );
            add("tokenizer.json", b::TOKENIZER_JSON.as_bytes());
            add("model.safetensors", b::MODEL_SAFETENSORS);
        }
        Some(dir) => {
            let mut names: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
                .with_context(|| format!("reading the model directory {}", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect();
            names.sort();
            for (name, path) in names {
                if name.ends_with(".json") {
                    let bytes =
                        std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
                    add(&name, &bytes);
                } else if name.ends_with(".safetensors") {
                    let len = std::fs::metadata(&path)
                        .with_context(|| format!("{}", path.display()))?
                        .len();
                    add(&name, &len.to_le_bytes());
                }
            }
        }
    }
    Ok(ModelInfo {
        name: source.name(),
        sha256: h.finish(),
        default_max_new_tokens: default_response_len(source),
    })
}

/// The command line as typed, with arguments quoted where a shell would need it.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:,=@+%".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--out`, or a new `<prefix>-<timestamp>` folder that does not exist yet.
fn out_dir(w: &WorkloadArgs, prefix: &str, stamp: &str) -> PathBuf {
    if let Some(p) = &w.out {
        return p.clone();
    }
    let base = PathBuf::from(format!("{prefix}-{stamp}"));
    let mut candidate = base.clone();
    let mut n = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    candidate
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// A finished configuration's line in the log.
fn result_line(s: &Summary) -> String {
    let acc = match (s.accuracy, s.accuracy_ci95) {
        (Some(a), Some((lo, hi))) => format!("acc {a:.3} [{lo:.3}, {hi:.3}]"),
        _ => "acc -".into(),
    };
    let errors = if s.errors.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = s
            .errors
            .iter()
            .map(|(code, e)| {
                format!(
                    "{code} x{}{}",
                    e.count,
                    e.messages
                        .first()
                        .map_or(String::new(), |m| format!(" ({m})"))
                )
            })
            .collect();
        format!(", errors: {}", parts.join(", "))
    };
    format!(
        "{}, ok {}/{}, {acc}, NFE {:.2}, {:.1} answer tok/s, p50 {:.3}s{errors}",
        if s.complete { "complete" } else { "FAILED" },
        s.ok,
        s.requests,
        s.nfe_mean,
        s.answer_tokens_per_s,
        s.latency_p50_s
    )
}

/// Waits briefly before reading server metrics: a server counts a request when its stream
/// closes, just after the client has the final message, so reading at once could miss the
/// last requests (or count warm-up ones in the configuration).
fn settle_metrics() {
    std::thread::sleep(Duration::from_millis(200));
}

/// What a run reports: the summaries in grid order and the folder they are in.
struct GridRun {
    summaries: Vec<Summary>,
    out: PathBuf,
}

/// Runs every configuration not already complete in the output folder, then writes the
/// reports. Fails (after writing them) when a configuration was left incomplete.
fn run_grid(w: &WorkloadArgs, grid: &Grid, title: &str, prefix: &str) -> anyhow::Result<GridRun> {
    if w.repeats == 0 {
        bail!("`--repeats` must be >= 1");
    }
    if !(w.slo_ms.is_finite() && w.slo_ms > 0.0) {
        bail!("`--slo-ms` must be > 0, got {}", w.slo_ms);
    }
    let (items, dataset) = load_items(w)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let source = ModelSource(w.model.clone());
    let (router, model, target_info) = match &w.router {
        Some(url) => {
            let r = rt.block_on(RouterTarget::connect(url, w.api_key.clone()))?;
            let server = r.info_json();
            // What the server says of its model; the worker count is left out, since it
            // does not change answers.
            let mut h = PartsHash::default();
            for field in [
                "model",
                "vocab_size",
                "mask_token_id",
                "eos_token_id",
                "image_token_id",
                "default_max_new_tokens",
            ] {
                h.add(field, server[field].to_string().as_bytes());
            }
            let model = ModelInfo {
                name: r.info.model.clone(),
                sha256: h.finish(),
                default_max_new_tokens: r.info.default_max_new_tokens as usize,
            };
            let info = TargetInfo {
                kind: "router".into(),
                url: Some(url.clone()),
                server: Some(server),
            };
            (Some(r), model, info)
        }
        None => (
            None,
            local_model_info(&source)?,
            TargetInfo {
                kind: "in-process".into(),
                url: None,
                server: None,
            },
        ),
    };
    let (date, stamp) = meta::now();
    let meta = Metadata {
        title: title.to_string(),
        command_line: command_line(),
        date,
        software: format!("dimple {}", env!("CARGO_PKG_VERSION")),
        seed: w.seed,
        dataset,
        model,
        target: target_info,
        repeats: w.repeats,
        warmup: w.warmup,
        slo_ms: Some(w.slo_ms),
    };
    let slo_s = Some(w.slo_ms / 1e3);
    let configs = grid.configs(meta.model.default_max_new_tokens)?;
    let out_path = out_dir(w, prefix, &stamp);
    let out = OutputDir::open(&out_path, &meta, w.force)?;
    // Complete configurations from earlier runs, re-measured with this run's SLO.
    let mut done: std::collections::BTreeMap<String, Summary> = out
        .saved()?
        .into_values()
        .filter(|d| d.summary.complete)
        .map(|d| {
            let mut s =
                Summary::from_records(&d.summary.config, &d.records, d.summary.wall_s, slo_s);
            s.server = d.summary.server;
            (s.key.clone(), s)
        })
        .collect();
    let todo: Vec<_> = configs
        .iter()
        .filter(|c| !done.contains_key(&c.key()))
        .cloned()
        .collect();
    let total = configs.len();
    say(format_args!(
        "{} items, {} configurations ({} already done, {} to run), output in {}",
        items.len(),
        total,
        total - todo.len(),
        todo.len(),
        out_path.display()
    ));
    if !todo.is_empty() {
        let target: Arc<dyn Target> = match router {
            Some(r) => Arc::new(r),
            None => Arc::new(LocalTarget::start(&source)?),
        };
        let started = Instant::now();
        for (i, cfg) in todo.iter().enumerate() {
            let k = total - todo.len() + i + 1;
            let opts = RunOptions {
                progress: std::io::stderr().is_terminal(),
                label: format!("configuration {k} of {total} {}", cfg.key()),
                repeats: w.repeats,
            };
            rt.block_on(dimple_sweep::warm_up(target.clone(), &items, cfg, w.warmup));
            let before = w.metrics_url.as_deref().map(|url| {
                settle_metrics();
                dimple_sweep::scrape::scrape(url)
            });
            let (records, wall) =
                rt.block_on(dimple_sweep::run_config(target.clone(), &items, cfg, &opts));
            let mut summary = Summary::from_records(cfg, &records, wall.as_secs_f64(), slo_s);
            if let (Some(url), Some(before)) = (&w.metrics_url, before) {
                settle_metrics();
                match (before, dimple_sweep::scrape::scrape(url)) {
                    (Ok(b), Ok(a)) => summary.server = dimple_sweep::scrape::compare(&b, &a),
                    (Err(e), _) | (_, Err(e)) => {
                        say(format_args!("warning: could not read {url}: {e}"))
                    }
                }
            }
            out.save(&Saved {
                summary: summary.clone(),
                records,
            })?;
            let left = todo.len() - i - 1;
            let eta = started
                .elapsed()
                .div_f64((i + 1) as f64)
                .mul_f64(left as f64);
            say(format_args!(
                "[{k}/{total}] {}: {}; {} left, eta {}",
                summary.key,
                result_line(&summary),
                left,
                fmt_duration(eta)
            ));
            done.insert(summary.key.clone(), summary);
        }
    }
    // Report in grid order, including points finished by earlier runs.
    let summaries: Vec<Summary> = configs
        .iter()
        .filter_map(|c| done.get(&c.key()).cloned())
        .collect();
    for p in out.write_reports(&summaries, &meta, &w.format)? {
        say(format_args!("wrote {}", p.display()));
    }
    let failed: Vec<&Summary> = summaries.iter().filter(|s| !s.complete).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} configurations did not get an answer to every request ({}); they are \
             saved as failed and run again when the same command is repeated with --out {}",
            failed.len(),
            total,
            failed
                .iter()
                .map(|s| s.key.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            out_path.display()
        );
    }
    Ok(GridRun {
        summaries,
        out: out_path,
    })
}

pub fn run_sweep(a: SweepArgs) -> anyhow::Result<()> {
    let mut grid = match &a.grid {
        Some(p) => Grid::from_toml_file(p)?,
        None => Grid::default(),
    };
    grid.threshold.extend(&a.threshold);
    grid.alg.extend(a.alg.iter().cloned());
    grid.pipeline.extend(a.pipeline.iter().cloned());
    grid.cache_mode.extend(a.cache_mode.iter().cloned());
    grid.use_cache.extend(&a.cache);
    grid.max_new_tokens.extend(&a.max_new_tokens);
    grid.block_length.extend(&a.block_length);
    grid.steps.extend(&a.steps);
    grid.concurrency.extend(&a.concurrency);
    grid.rate.extend(&a.rate);
    if a.grid.is_none() {
        grid.seed = a.workload.seed;
    }
    if grid.threshold.is_empty() {
        grid.threshold = DEFAULT_THRESHOLDS.to_vec();
    }
    let run = run_grid(&a.workload, &grid, "Dimple sweep", "sweep")?;
    say(format_args!(
        "report: {}",
        run.out.join("report.md").display()
    ));
    Ok(())
}

pub fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    let grid = Grid {
        threshold: vec![a.threshold.unwrap_or(0.0)],
        cache_mode: vec![match (&a.cache_mode, a.cache) {
            (Some(mode), _) => mode.clone(),
            (None, true) => "prefix".into(),
            (None, false) => "exact".into(),
        }],
        block_length: vec![match &a.block_length {
            Some(b) => parse_block_length(b).map_err(|e| anyhow::anyhow!("--block-length: {e}"))?,
            None => None,
        }],
        concurrency: a.concurrency.clone(),
        seed: a.workload.seed,
        ..Grid::default()
    };
    let run = run_grid(&a.workload, &grid, "Dimple bench", "bench")?;
    // The table goes to stdout; a reader that went away (`| head`) must not fail the run,
    // whose results are already saved.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| concurrency | requests | req/s | answer tok/s | slots/s | NFE | p50 s | p99 s | speed-up vs first |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let first = run
        .summaries
        .first()
        .map_or(1.0, |s| s.answer_tokens_per_s.max(1e-9));
    for s in &run.summaries {
        let c = match s.config.load {
            dimple_sweep::Load::Concurrency(c) => c.to_string(),
            dimple_sweep::Load::Rate(r) => format!("rate {r}"),
        };
        let _ = writeln!(
            out,
            "| {c} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.3} | {:.3} | {:.2}x |",
            s.ok,
            s.requests_per_s,
            s.answer_tokens_per_s,
            s.slots_per_s,
            s.nfe_mean,
            s.latency_p50_s,
            s.latency_p99_s,
            s.answer_tokens_per_s / first
        );
    }
    say(format_args!(
        "report: {}",
        run.out.join("report.md").display()
    ));
    Ok(())
}
