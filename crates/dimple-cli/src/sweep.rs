//! `dimple sweep` and `dimple bench`: load-tested evaluation sweeps over a grid of decoding
//! settings and load levels, against a router or the embedded local model.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use dimple_engine::EngineConfig;
use dimple_proto::convert::GenerateInput;
use dimple_router::RouterError;
use dimple_router::error::code_name;
use dimple_router::frontend::{FrontEvent, Frontend};
use dimple_sweep::dataset::SyntheticSpec;
use dimple_sweep::report::OutputDir;
use dimple_sweep::target::TargetFuture;
use dimple_sweep::{Grid, Item, Response, RunOptions, Summary, SweepRequest, Target, TargetError};
use prometheus::Registry;

use crate::generate::RankArgs;
use crate::model_source::ModelSource;

/// The demo model's evaluation set, the default dataset.
pub const DEFAULT_DATASET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/demo_eval/eval.jsonl"
);

#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// JSONL dataset (id, question/text/messages, image/images, answer, answer_type).
    /// Default: the demo model's 100 evaluation items.
    #[arg(long, env = "DIMPLE_DATASET", conflicts_with = "synthetic")]
    pub dataset: Option<PathBuf>,
    /// Use N synthetic items instead (random prompts, half with a random image).
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Checkpoint directory for the embedded model; the built-in demo model when absent.
    #[arg(long, env = "DIMPLE_MODEL")]
    pub model: Option<PathBuf>,
    /// Output directory (re-running skips configurations already there).
    #[arg(long, default_value = "sweep-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Send the requests to a running router (`http://HOST:PORT`) instead of decoding them
    /// with an engine in this process.
    #[arg(long, env = "DIMPLE_ROUTER")]
    pub router: Option<String>,
    /// API key for the router (`authorization: Bearer`).
    #[arg(long, env = "DIMPLE_API_KEY")]
    pub api_key: Option<String>,
    /// The server's Prometheus endpoint (`http://HOST:PORT/metrics`), read before and after
    /// each configuration; its counter deltas go into the JSON rows.
    #[arg(long)]
    pub metrics_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Grid as a TOML file (keys: threshold, alg, pipeline, use_cache, max_new_tokens,
    /// steps, concurrency, rate, seed); flags below add to it.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Thresholds (0 = none), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub threshold: Vec<f32>,
    #[arg(long, value_delimiter = ',')]
    pub alg: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub pipeline: Vec<String>,
    /// Prefilling on/off, e.g. `false,true`.
    #[arg(long, value_delimiter = ',')]
    pub cache: Vec<bool>,
    #[arg(long, value_delimiter = ',')]
    pub max_new_tokens: Vec<usize>,
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Closed-loop concurrency levels.
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
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 4, 16])]
    pub concurrency: Vec<usize>,
    /// Each item is sent this many times per level.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    #[arg(long)]
    pub threshold: Option<f32>,
    #[arg(long)]
    pub cache: bool,
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

/// Requests sent to a router over gRPC, streamed so the client sees the first commit.
pub struct RouterTarget {
    client: dimple_proto::v1::dimple_client::DimpleClient<tonic::transport::Channel>,
    api_key: Option<String>,
}

impl RouterTarget {
    pub async fn connect(url: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        let channel = crate::remote::connect(url, None).await?;
        let client = dimple_proto::v1::dimple_client::DimpleClient::new(channel)
            .max_decoding_message_size(64 << 20);
        Ok(Self { client, api_key })
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
            if let Some(key) = &self.api_key {
                if let Ok(v) = format!("Bearer {key}").parse() {
                    grpc.metadata_mut().insert("authorization", v);
                }
            }
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

fn load_items(w: &WorkloadArgs) -> anyhow::Result<Vec<Arc<Item>>> {
    let mut items = match (w.synthetic, &w.dataset) {
        (Some(n), _) => dimple_sweep::synthetic(&SyntheticSpec {
            items: n,
            seed: w.seed,
            ..SyntheticSpec::default()
        })?,
        (None, Some(p)) => dimple_sweep::load_jsonl(p)?,
        (None, None) => dimple_sweep::load_jsonl(std::path::Path::new(DEFAULT_DATASET))
            .with_context(|| {
                format!("the default dataset {DEFAULT_DATASET}; give --dataset or --synthetic")
            })?,
    };
    if let Some(n) = w.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("no items to run");
    }
    Ok(items.into_iter().map(Arc::new).collect())
}

/// Runs every configuration not already in the output directory, then writes the reports.
fn run_grid(
    w: &WorkloadArgs,
    grid: &Grid,
    repeats: usize,
    title: &str,
) -> anyhow::Result<Vec<Summary>> {
    let items = load_items(w)?;
    let configs = grid.configs(16)?;
    let out = OutputDir::create(&w.out)?;
    let mut done = out.finished()?;
    let todo: Vec<_> = configs
        .iter()
        .filter(|c| !done.contains_key(&c.key()))
        .cloned()
        .collect();
    eprintln!(
        "{} items, {} configurations ({} already done, {} to run), output in {}",
        items.len(),
        configs.len(),
        configs.len() - todo.len(),
        todo.len(),
        w.out.display()
    );
    if !todo.is_empty() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let target: Arc<dyn Target> = match &w.router {
            Some(url) => Arc::new(rt.block_on(RouterTarget::connect(url, w.api_key.clone()))?),
            None => Arc::new(LocalTarget::start(&ModelSource(w.model.clone()))?),
        };
        let opts = RunOptions {
            progress: std::io::stderr().is_terminal(),
            repeats,
        };
        for cfg in &todo {
            let before = w.metrics_url.as_deref().map(dimple_sweep::scrape::scrape);
            let (records, wall) =
                rt.block_on(dimple_sweep::run_config(target.clone(), &items, cfg, &opts));
            let mut summary = Summary::from_records(cfg, &records, wall.as_secs_f64());
            if let (Some(url), Some(before)) = (&w.metrics_url, before) {
                match (before, dimple_sweep::scrape::scrape(url)) {
                    (Ok(b), Ok(a)) => summary.server = dimple_sweep::scrape::delta(&b, &a),
                    (Err(e), _) | (_, Err(e)) => eprintln!("warning: could not read {url}: {e}"),
                }
            }
            out.save(&summary, &records)?;
            eprintln!(
                "{}: ok {}/{} acc {} NFE {:.2} {:.1} tok/s p50 {:.3}s",
                summary.key,
                summary.ok,
                summary.requests,
                summary.accuracy.map_or("-".into(), |a| format!("{a:.3}")),
                summary.nfe_mean,
                summary.tokens_per_s,
                summary.latency_p50_s
            );
            done.insert(summary.key.clone(), summary);
        }
    }
    // Report in grid order, including points finished by earlier runs.
    let summaries: Vec<Summary> = configs
        .iter()
        .filter_map(|c| done.get(&c.key()).cloned())
        .collect();
    for p in out.write_reports(&summaries, title)? {
        eprintln!("wrote {}", p.display());
    }
    Ok(summaries)
}

pub fn run_sweep(a: SweepArgs) -> anyhow::Result<()> {
    let mut grid = match &a.grid {
        Some(p) => Grid::from_toml_file(p)?,
        None => Grid::default(),
    };
    grid.threshold.extend(&a.threshold);
    grid.alg.extend(a.alg.iter().cloned());
    grid.pipeline.extend(a.pipeline.iter().cloned());
    grid.use_cache.extend(&a.cache);
    grid.max_new_tokens.extend(&a.max_new_tokens);
    grid.steps.extend(&a.steps);
    grid.concurrency.extend(&a.concurrency);
    grid.rate.extend(&a.rate);
    if a.grid.is_none() {
        grid.seed = a.workload.seed;
    }
    if grid.threshold.is_empty() {
        // Default: the accuracy-vs-NFE curve of confident decoding.
        grid.threshold = vec![0.0, 0.5, 0.7, 0.9, 0.95];
    }
    run_grid(&a.workload, &grid, 1, "Dimple sweep")?;
    Ok(())
}

pub fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    let grid = Grid {
        threshold: vec![a.threshold.unwrap_or(0.0)],
        use_cache: vec![a.cache],
        concurrency: a.concurrency.clone(),
        seed: a.workload.seed,
        ..Grid::default()
    };
    let summaries = run_grid(&a.workload, &grid, a.repeats, "Dimple bench")?;
    println!("| concurrency | requests | req/s | tokens/s | NFE | p50 s | p99 s | speed-up vs 1 |");
    println!("|---|---|---|---|---|---|---|---|");
    let one = summaries.first().map_or(1.0, |s| s.tokens_per_s.max(1e-9));
    for s in &summaries {
        let c = match s.config.load {
            dimple_sweep::Load::Concurrency(c) => c.to_string(),
            dimple_sweep::Load::Rate(r) => format!("rate {r}"),
        };
        println!(
            "| {c} | {} | {:.2} | {:.1} | {:.2} | {:.3} | {:.3} | {:.2}x |",
            s.ok,
            s.requests_per_s,
            s.tokens_per_s,
            s.nfe_mean,
            s.latency_p50_s,
            s.latency_p99_s,
            s.tokens_per_s / one
        );
    }
    Ok(())
}
