//! `dimple bench-random` (hidden): decoding throughput on a model with pseudo-random
//! weights of a real shape (Dimple-7B by default), for machines that have a GPU but not the
//! weights. For each concurrency level it submits that many requests at once and prints the
//! mean forward-step time and the response tokens per second. Used by `scripts/gpu-check.sh`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use dimple_core::params::DecodeParams;
use dimple_engine::{EngineConfig, EngineEvent, GenerateRequest, StepReport};
use dimple_model::{Checkpoint, DimpleConfig};

use crate::generate::RankArgs;

#[derive(Args, Debug)]
pub struct BenchRandomArgs {
    /// `7b` (Dimple-7B: 28 layers, hidden 3584, 28/4 heads, MLP 18944, vocab 152064) or
    /// `small` (4 layers, hidden 512, 8/2 heads, MLP 1408, vocab 8192).
    #[arg(long, default_value = "7b")]
    pub shape: String,
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 8, 32])]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub response_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Prefilling (prompt K/V computed once).
    #[arg(long)]
    pub cache: bool,
    #[command(flatten)]
    pub ranks: RankArgs,
}

fn shape(name: &str) -> anyhow::Result<DimpleConfig> {
    // Unset fields take the Dimple-7B defaults (see `DimpleConfig`).
    let json = match name {
        "7b" => r#"{"num_key_value_heads": 4}"#,
        "small" => {
            r#"{"num_key_value_heads": 2, "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
                "intermediate_size": 1408, "vocab_size": 8192, "mrope_section": [8, 12, 12],
                "image_token_id": 8186, "video_token_id": 8187, "vision_start_token_id": 8188,
                "vision_end_token_id": 8189, "vision_token_id": 8190, "mask_token_id": 8191,
                "pad_token_id": 8185, "eos_token_id": 8185,
                "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 512, "fullatt_block_indexes": [0]}}"#
        }
        other => bail!("`--shape` must be 7b or small, got {other:?}"),
    };
    Ok(DimpleConfig::from_json(json)?)
}

pub fn run(a: BenchRandomArgs) -> anyhow::Result<()> {
    let cfg = shape(&a.shape)?;
    let group = a.ranks.group()?;
    let max_c = a.concurrency.iter().copied().max().unwrap_or(1);
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
    let request = |salt: u64| {
        let prompt_ids = (0..a.prompt_tokens as u64)
            .map(|i| ((i * 7919 + salt * 104_729) % text_ids) as u32)
            .collect();
        let params = DecodeParams {
            max_new_tokens: a.response_tokens,
            steps: a.response_tokens,
            use_cache: a.cache,
            ..DecodeParams::default()
        };
        GenerateRequest {
            prompt_ids,
            images: Vec::new(),
            params,
            deadline: None,
        }
    };
    let run_level = |c: usize, salt: u64| -> anyhow::Result<(f64, usize, usize)> {
        let started = Instant::now();
        let rxs = (0..c)
            .map(|i| engine.submit(request(salt + i as u64)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tokens = 0;
        for mut rx in rxs {
            loop {
                match rx.blocking_recv().context("the engine stopped")? {
                    EngineEvent::Step { committed, .. } => tokens += committed.len(),
                    EngineEvent::Finished(_) => break,
                    EngineEvent::Failed(e) => bail!("request failed: {e}"),
                }
            }
        }
        Ok((started.elapsed().as_secs_f64(), tokens, c))
    };
    // Warm-up: kernels load (and PTX is compiled) on first use.
    let warm = Instant::now();
    run_level(1, 0)?;
    eprintln!("warm-up request: {:.2} s", warm.elapsed().as_secs_f64());
    println!(
        "| tp | concurrency | steps | mean step ms | p50 step ms | tokens/step | tokens/s | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (k, &c) in a.concurrency.iter().enumerate() {
        if let Ok(mut l) = log.lock() {
            l.clear();
        }
        let (wall, tokens, _) = run_level(c, 1_000 * (k as u64 + 1))?;
        let mut steps: Vec<f64> = log
            .lock()
            .map(|l| l.iter().map(|r| r.seconds).collect())
            .unwrap_or_default();
        steps.sort_by(f64::total_cmp);
        let mean = steps.iter().sum::<f64>() / steps.len().max(1) as f64;
        let p50 = steps.get(steps.len() / 2).copied().unwrap_or(0.0);
        println!(
            "| {} | {c} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            a.ranks.tp,
            steps.len(),
            mean * 1e3,
            p50 * 1e3,
            tokens as f64 / steps.len().max(1) as f64,
            tokens as f64 / wall,
            wall
        );
    }
    engine.shutdown();
    Ok(())
}
