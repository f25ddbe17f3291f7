//! `dimple bench-random` (hidden): decoding speed on a model with pseudo-random weights of a
//! real shape, for machines without the weights.
//!
//! One run measures two things side by side:
//! 1. the machine's achievable matrix-multiply rate: plain matmuls at the model's own
//!    shapes (the MLP and `lm_head` projections) on the same device and dtype, and on the
//!    CPU in f32 the host step's own product kernel at the layers' shapes, the best of all;
//! 2. the engine at each concurrency level and cache mode: that many identical-shaped
//!    requests submitted at once, with per-request latency, response slots per second, and
//!    the *useful* FLOP rate of the steps: the matmul work a step needs (linear layers over
//!    the tokens it runs, attention against the keys it sees, `lm_head` over the slots it
//!    scores) divided by wall time, and that rate as a fraction of (1).
//!
//! The FLOP count is derived from the requests' own step events and the model shape, not
//! from engine internals, so the same file measures any engine that keeps the public API.
//! `scripts/speed-bench.sh` runs it for the current tree and a baseline commit in one go.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dimple_core::params::{BlockPlan, CacheMode, DecodeParams};
use dimple_engine::{EngineConfig, EngineEvent, GenerateRequest, GroupDevices, StepReport};
use dimple_model::{Checkpoint, DimpleConfig};

use crate::generate::RankArgs;

#[derive(Args, Debug)]
pub struct BenchRandomArgs {
    /// `7b` (Dimple-7B: 28 layers, hidden 3584, 28/4 heads, MLP 18944, vocab 152064),
    /// `speed` (8 layers, hidden 512, 8/2 heads, MLP 1536, vocab 32768) or `small`
    /// (4 layers, hidden 512, 8/2 heads, MLP 1408, vocab 8192).
    #[arg(long, default_value = "7b")]
    pub shape: String,
    /// Concurrency levels: this many requests are submitted at once.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 8, 32])]
    pub concurrency: Vec<usize>,
    /// Response slots per request.
    #[arg(long, default_value_t = 64)]
    pub response_tokens: usize,
    /// Diffusion steps per request (the schedule commits response/steps slots per step).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Cache modes to measure: `exact` (every step recomputes the prompt), `cached` or
    /// `prefix` (prefilling), `dual` (block-wise dual cache; give `--block-length`).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["exact".to_string()])]
    pub modes: Vec<String>,
    /// Block-wise decoding: slots per block (default: the whole response is one block).
    #[arg(long)]
    pub block_length: Option<usize>,
    /// Prefilling only (the same as `--modes cached`).
    #[arg(long)]
    pub cache: bool,
    /// Rounds per concurrency level (the first round of the run is a separate warm-up).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Skip the plain-matmul measurement.
    #[arg(long)]
    pub no_matmul: bool,
    /// Seconds each plain-matmul shape is timed for.
    #[arg(long, default_value_t = 0.4)]
    pub matmul_seconds: f64,
    /// The device's peak rate for the dtype, in TFLOP/s (e.g. about 990 for bf16 dense on
    /// an H100/H200): adds model FLOP utilisation (useful FLOP/s over this) to the table.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Before measuring, decode one request alone and again in a batch with this many
    /// others (all at once), and fail unless its tokens are the same.
    #[arg(long)]
    pub check_invariance: Option<usize>,
    /// Write this shape's random model as a model directory (`config.json`, the weights as
    /// `model.safetensors` in `--dtype`, a tokenizer covering the vocabulary, generation and
    /// image settings) and exit without measuring: `dimple serve --model DIR` serves it.
    #[arg(long, value_name = "DIR")]
    pub save_model: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub ranks: RankArgs,
}

fn shape(name: &str) -> anyhow::Result<DimpleConfig> {
    // Unset fields take the Dimple-7B defaults (see `DimpleConfig`).
    let json = match name {
        "7b" => r#"{"num_key_value_heads": 4}"#.to_string(),
        "small" => narrow_shape(4, 1408, 8192),
        "speed" => narrow_shape(8, 1536, 32768),
        other => bail!("`--shape` must be 7b, speed or small, got {other:?}"),
    };
    Ok(DimpleConfig::from_json(&json)?)
}

/// A hidden-512, 8/2-head text model of `layers` layers with the special ids at the top of
/// its vocabulary, and a one-block vision tower.
fn narrow_shape(layers: usize, inter: usize, vocab: usize) -> String {
    let id = |below: usize| vocab - below;
    format!(
        r#"{{"num_key_value_heads": 2, "num_hidden_layers": {layers}, "hidden_size": 512,
            "num_attention_heads": 8, "intermediate_size": {inter}, "vocab_size": {vocab},
            "mrope_section": [8, 12, 12], "image_token_id": {}, "video_token_id": {},
            "vision_start_token_id": {}, "vision_end_token_id": {}, "vision_token_id": {},
            "mask_token_id": {}, "pad_token_id": {}, "eos_token_id": {},
            "vision_config": {{"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                               "out_hidden_size": 512, "fullatt_block_indexes": [0]}}}}"#,
        id(6),
        id(5),
        id(4),
        id(3),
        id(2),
        id(1),
        id(7),
        id(7)
    )
}

/// Matmul FLOPs of the model's work, from its shape.
struct FlopModel {
    layers: f64,
    /// Per token, one layer's linear projections.
    layer_per_token: f64,
    /// Per token, one layer's key and value projections: all the last layer needs of a row
    /// that is not scored.
    kv_per_token: f64,
    /// Per (query, key) pair, one layer: QK^T and PV over every query head.
    attn_per_pair: f64,
    /// Per scored row.
    lm_head_per_row: f64,
}

impl FlopModel {
    fn new(c: &DimpleConfig) -> Self {
        let (h, hd) = (c.hidden_size as f64, c.head_dim() as f64);
        let (nh, nkv) = (c.num_attention_heads as f64, c.num_kv_heads() as f64);
        let kv = h * nkv * hd * 2.0;
        let per_layer = h * nh * hd * 2.0 + kv + 3.0 * h * c.intermediate_size as f64;
        Self {
            layers: c.num_hidden_layers as f64,
            layer_per_token: 2.0 * per_layer,
            kv_per_token: 2.0 * kv,
            attn_per_pair: 2.0 * 2.0 * nh * hd,
            lm_head_per_row: 2.0 * h * c.vocab_size as f64,
        }
    }

    /// One step of one request: `queries` tokens run against `keys` keys, `scored` rows. Of
    /// the last layer, a row that is not scored needs only its keys and values.
    fn step(&self, queries: usize, keys: usize, scored: usize) -> f64 {
        let (q, s, k) = (queries as f64, scored as f64, keys as f64);
        let rows = (self.layers - 1.0) * q;
        (rows + s) * self.layer_per_token
            + (q - s) * self.kv_per_token
            + (rows + s) * k * self.attn_per_pair
            + s * self.lm_head_per_row
    }

    /// A whole request (one block) from its per-step committed counts.
    #[cfg(test)]
    fn request(&self, prompt: usize, slots: usize, cached: bool, committed: &[usize]) -> f64 {
        let mode = if cached {
            CacheMode::Prefix
        } else {
            CacheMode::Exact
        };
        let plan = BlockPlan {
            block_length: slots,
            num_blocks: 1,
            steps_per_block: committed.len(),
        };
        let steps: Vec<(usize, usize)> = committed.iter().map(|&c| (0, c)).collect();
        self.request_blocks(prompt, slots, mode, &plan, &steps)
    }

    /// A whole request from its per-step (block, committed count): prefix mode runs the
    /// window after the first step, dual mode the block's window after each block's first
    /// step; only the current block's masked slots are scored.
    fn request_blocks(
        &self,
        prompt: usize,
        slots: usize,
        mode: CacheMode,
        plan: &BlockPlan,
        steps: &[(usize, usize)],
    ) -> f64 {
        let mut masked: Vec<usize> = (0..plan.num_blocks)
            .map(|b| plan.block(b, slots).len())
            .collect();
        let mut total = 0.0;
        let mut last_block = None;
        for (k, &(b, c)) in steps.iter().enumerate() {
            let queries = match mode {
                CacheMode::Prefix if k > 0 => 1 + slots,
                CacheMode::Dual if last_block == Some(b) => plan.block(b, slots).len() + 1,
                _ => prompt + slots,
            };
            total += self.step(queries, prompt + slots, masked[b]);
            masked[b] = masked[b].saturating_sub(c);
            last_block = Some(b);
        }
        total
    }
}

/// Best matmul rate (FLOP/s) at the model's shapes, as `x [m, k] @ w[n, k]^T` like a linear
/// layer.
fn matmul_peak(
    c: &DimpleConfig,
    device: &Device,
    dtype: DType,
    seconds: f64,
) -> anyhow::Result<Vec<(String, f64)>> {
    let (h, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let shapes = [
        (128, h, inter),
        (512, h, inter),
        (2048, h, inter),
        (2048, inter, h),
        (64, h, vocab),
        (512, h, vocab),
    ];
    let mut out = Vec::new();
    for (m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(dtype)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), device)?.to_dtype(dtype)?;
        let wt = w.t()?;
        let _ = x.matmul(&wt)?;
        device.synchronize()?;
        let started = Instant::now();
        let mut runs = 0u32;
        while started.elapsed() < Duration::from_secs_f64(seconds) || runs < 3 {
            let _ = x.matmul(&wt)?;
            runs += 1;
        }
        device.synchronize()?;
        let secs = started.elapsed().as_secs_f64() / runs as f64;
        out.push((
            format!("{m}x{k} @ {k}x{n}"),
            2.0 * (m * k * n) as f64 / secs,
        ));
    }
    Ok(out)
}

/// The host step's own product kernel (CPU f32: column panels where the processor has
/// AVX-512) at the shapes of the model's layers, on packed rows as a step runs them.
fn host_kernel_rates(c: &DimpleConfig, seconds: f64) -> anyhow::Result<Vec<(String, f64)>> {
    let (h, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let shapes = [
        (128, h, 2 * inter),
        (128, inter, h),
        (2048, h, 2 * inter),
        (2048, inter, h),
        (64, h, vocab),
    ];
    let mut out = Vec::new();
    for (m, k, n) in shapes {
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
        let mut layer = dimple_model::weights::Linear::from_parts(w, None)?;
        let kind = if layer.pack_for_host()? {
            "panels"
        } else {
            "host"
        };
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)?.to_vec1()?;
        let mut y = vec![0f32; m * n];
        layer.host_product(&x, m, &mut y)?;
        let started = Instant::now();
        let mut runs = 0u32;
        while started.elapsed() < Duration::from_secs_f64(seconds) || runs < 3 {
            layer.host_product(&x, m, &mut y)?;
            runs += 1;
        }
        let secs = started.elapsed().as_secs_f64() / runs as f64;
        out.push((
            format!("{kind} {m}x{k} @ {k}x{n}"),
            2.0 * (m * k * n) as f64 / secs,
        ));
    }
    Ok(out)
}

/// How a cache mode is named in the tables (`cached` is the prefix cache).
fn mode_label(mode: CacheMode, block_length: Option<usize>) -> String {
    match (mode, block_length) {
        (CacheMode::Exact, _) => "exact".to_string(),
        (CacheMode::Prefix, _) => "cached".to_string(),
        (CacheMode::Dual, Some(b)) => format!("dual, block {b}"),
        (CacheMode::Dual, None) => "dual".to_string(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(a: BenchRandomArgs) -> anyhow::Result<()> {
    let cfg = shape(&a.shape)?;
    let group = a.ranks.group()?;
    if let Some(dir) = &a.save_model {
        let started = Instant::now();
        crate::random_model::write(&cfg, group.dtype, dir)?;
        println!(
            "wrote the random {} model ({:?}) to {} in {:.1} s; serve it with `dimple serve --model {}`",
            a.shape,
            group.dtype,
            dir.display(),
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        return Ok(());
    }
    let device = match group.devices {
        GroupDevices::Cpu => Device::Cpu,
        GroupDevices::Cuda { first_ordinal } => Device::new_cuda(first_ordinal)?,
    };
    let modes: Vec<CacheMode> = if a.cache {
        vec![CacheMode::Prefix]
    } else {
        a.modes
            .iter()
            .map(|m| match m.as_str() {
                "exact" => Ok(CacheMode::Exact),
                "cached" | "prefix" => Ok(CacheMode::Prefix),
                "dual" => Ok(CacheMode::Dual),
                other => bail!("`--modes` takes exact, cached (prefix) and dual, got {other:?}"),
            })
            .collect::<anyhow::Result<_>>()?
    };
    let flops = FlopModel::new(&cfg);

    let mut peak = 0.0f64;
    if !a.no_matmul {
        println!(
            "matmul at the model's shapes ({:?}, {:?}):",
            group.devices, group.dtype
        );
        let mut rates = matmul_peak(&cfg, &device, group.dtype, a.matmul_seconds)?;
        if device.is_cpu() && group.dtype == DType::F32 {
            rates.extend(host_kernel_rates(&cfg, a.matmul_seconds)?);
        }
        for (name, rate) in rates {
            println!("  {name:<31} {:8.1} GFLOP/s", rate / 1e9);
            peak = peak.max(rate);
        }
        println!("  best: {:.1} GFLOP/s", peak / 1e9);
    }

    // The invariance check submits its request and the others at once: they must all fit
    // one batch.
    let max_c = a
        .concurrency
        .iter()
        .copied()
        .chain(a.check_invariance.map(|others| others + 1))
        .max()
        .unwrap_or(1);
    let log: Arc<Mutex<Vec<StepReport>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let hook = Box::new(move |r: &StepReport| {
        if let Ok(mut l) = sink.lock() {
            l.push(*r);
        }
    });
    let loaded = Instant::now();
    let engine_cfg = EngineConfig {
        max_active: max_c,
        max_waiting: max_c * 2,
        cache_budget_bytes: 64 << 30,
        ..EngineConfig::default()
    };
    let engine = dimple_engine::start_group(
        &Checkpoint::Random(Box::new(cfg.clone())),
        group.clone(),
        engine_cfg,
        Some(hook),
    )
    .context("starting the rank group")?;
    eprintln!(
        "random {} model, tp {}, {:?} {:?}: loaded in {:.1} s",
        a.shape,
        a.ranks.tp,
        group.devices,
        group.dtype,
        loaded.elapsed().as_secs_f64()
    );
    // Text ids well below the special ids at the top of the vocabulary.
    let text_ids = (cfg.vocab_size - 1024).min(150_000) as u64;
    let steps = a.steps.unwrap_or(a.response_tokens);
    let request = |salt: u64, mode: CacheMode| {
        let prompt_ids = (0..a.prompt_tokens as u64)
            .map(|i| ((i * 7919 + salt * 104_729) % text_ids) as u32)
            .collect();
        let params = DecodeParams {
            max_new_tokens: a.response_tokens,
            steps,
            cache: Some(mode),
            block_length: a.block_length,
            ..DecodeParams::default()
        };
        GenerateRequest {
            prompt_ids,
            images: Vec::new(),
            params,
            deadline: None,
        }
    };
    struct Level {
        wall: f64,
        latencies: Vec<f64>,
        slots: usize,
        useful_flops: f64,
    }
    let run_level = |c: usize, salt: u64, mode: CacheMode| -> anyhow::Result<Level> {
        let started = Instant::now();
        let rxs = (0..c)
            .map(|i| engine.submit(request(salt + i as u64, mode)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut level = Level {
            wall: 0.0,
            latencies: Vec::with_capacity(c),
            slots: 0,
            useful_flops: 0.0,
        };
        for mut rx in rxs {
            let mut committed = Vec::new();
            loop {
                match rx.blocking_recv().context("the engine stopped")? {
                    EngineEvent::Step {
                        committed: c,
                        block,
                        ..
                    } => {
                        level.slots += c.len();
                        committed.push((block, c.len()));
                    }
                    EngineEvent::Finished(_) => break,
                    EngineEvent::Failed(e) => bail!("request failed: {e}"),
                }
            }
            level.latencies.push(started.elapsed().as_secs_f64());
            let plan = request(0, mode).params.block_plan();
            level.useful_flops +=
                flops.request_blocks(a.prompt_tokens, a.response_tokens, mode, &plan, &committed);
        }
        level.wall = started.elapsed().as_secs_f64();
        Ok(level)
    };
    // Warm-up: buffers, thread pools, and on a GPU kernel loading, on first use.
    let warm = Instant::now();
    for &mode in &modes {
        run_level(1, 0, mode)?;
    }
    eprintln!("warm-up: {:.2} s", warm.elapsed().as_secs_f64());
    if let Some(others) = a.check_invariance {
        for &cached in &modes {
            let decode = |batch: usize| -> anyhow::Result<Vec<u32>> {
                let rxs = (0..batch)
                    .map(|i| engine.submit(request(7 + i as u64, cached)))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut first = None;
                for mut rx in rxs {
                    loop {
                        match rx.blocking_recv().context("the engine stopped")? {
                            EngineEvent::Step { .. } => {}
                            EngineEvent::Finished(f) => {
                                first.get_or_insert(f.response_ids);
                                break;
                            }
                            EngineEvent::Failed(e) => bail!("request failed: {e}"),
                        }
                    }
                }
                first.context("no request")
            };
            let alone = decode(1)?;
            let batched = decode(1 + others)?;
            let mode = mode_label(cached, a.block_length);
            if alone != batched {
                bail!(
                    "batch invariance ({mode}): a request decoded alone and with {others} others differs:\n  alone   {alone:?}\n  batched {batched:?}"
                );
            }
            println!(
                "batch invariance ({mode}): alone and with {others} others, the same {} tokens",
                alone.len()
            );
        }
    }
    println!(
        "\n{} model, {} prompt + {} response slots, {} steps, tp {}:",
        a.shape, a.prompt_tokens, a.response_tokens, steps, a.ranks.tp
    );
    println!(
        "| mode | concurrency | forward passes | mean step ms | request p50 s | request max s | slots/s | useful GFLOP/s | of matmul best | MFU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // A step's report is logged just after its requests hear that they finished: wait
    // until the log holds every pass since it was last cleared, so no level sees
    // another's steps.
    let mut cleared_at = 0u64;
    let settle = |since: u64| {
        let want = engine.stats().forward_passes - since;
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.lock().map_or(0, |l| l.len() as u64) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    for &mode in &modes {
        for (k, &c) in a.concurrency.iter().enumerate() {
            let mut agg = Level {
                wall: 0.0,
                latencies: Vec::new(),
                slots: 0,
                useful_flops: 0.0,
            };
            settle(cleared_at);
            if let Ok(mut l) = log.lock() {
                l.clear();
            }
            cleared_at = engine.stats().forward_passes;
            for round in 0..a.rounds.max(1) {
                let lv = run_level(c, 1_000 * (k as u64 + 1) + 97 * round as u64, mode)?;
                agg.wall += lv.wall;
                agg.latencies.extend(lv.latencies);
                agg.slots += lv.slots;
                agg.useful_flops += lv.useful_flops;
            }
            settle(cleared_at);
            let steps: Vec<f64> = log
                .lock()
                .map(|l| l.iter().map(|r| r.seconds).collect())
                .unwrap_or_default();
            let mean_step = steps.iter().sum::<f64>() / steps.len().max(1) as f64;
            agg.latencies.sort_by(f64::total_cmp);
            let rate = agg.useful_flops / agg.wall;
            let mfu = match a.peak_tflops {
                Some(p) if p > 0.0 => format!("{:.1}%", 100.0 * rate / (p * 1e12)),
                _ => "-".into(),
            };
            println!(
                "| {} | {c} | {} | {:.1} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {mfu} |",
                mode_label(mode, a.block_length),
                steps.len(),
                mean_step * 1e3,
                percentile(&agg.latencies, 0.5),
                agg.latencies.last().copied().unwrap_or(0.0),
                agg.slots as f64 / agg.wall,
                rate / 1e9,
                if peak > 0.0 {
                    format!("{:.0}%", 100.0 * rate / peak)
                } else {
                    "-".into()
                }
            );
        }
    }
    engine.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_model_counts_the_work_a_step_needs() {
        let c = shape("speed").unwrap();
        let f = FlopModel::new(&c);
        // Per layer: q and o 512x512, k and v 512x128, three MLP projections 512x1536.
        let per_layer = 2.0 * 512.0 * 512.0 + 2.0 * 512.0 * 128.0 + 3.0 * 512.0 * 1536.0;
        assert_eq!(f.layer_per_token, 2.0 * per_layer);
        assert_eq!(f.kv_per_token, 2.0 * 2.0 * 512.0 * 128.0);
        assert_eq!(f.lm_head_per_row, 2.0 * 512.0 * 32768.0);
        // Every row runs 7 whole layers, plus keys and values in the last; scored rows
        // run the whole last layer and the lm_head.
        let attn = 2.0 * 2.0 * 8.0 * 64.0;
        assert_eq!(
            f.step(10, 20, 3),
            (7.0 * 10.0 + 3.0) * 2.0 * per_layer
                + 7.0 * 2.0 * 2.0 * 512.0 * 128.0
                + (7.0 * 10.0 + 3.0) * 20.0 * attn
                + 3.0 * 2.0 * 512.0 * 32768.0
        );
        // Exact mode runs prompt + response every step; cached mode only the window after
        // the first step. Scored rows shrink as slots commit.
        let exact = f.request(64, 64, false, &[32, 32]);
        let cached = f.request(64, 64, true, &[32, 32]);
        assert_eq!(exact, f.step(128, 128, 64) + f.step(128, 128, 32));
        assert_eq!(cached, f.step(128, 128, 64) + f.step(65, 128, 32));
        assert!(cached < exact);
    }
}
