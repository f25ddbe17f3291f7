//! Block-wise decoding and the cache modes on the built-in demo model's 100 evaluation
//! items (16 response slots): accuracy and mean forward passes (NFE) for every (cache,
//! block length, threshold) setting, printed as a table. What must hold whatever the
//! numbers: every request completes, a request takes at least one pass per block that had
//! masks, one whole-response block in dual mode is the prefilling (`prefix`) token for
//! token, and an explicit whole-response block is the plain decoding.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use dimple_core::params::{CacheMode, DecodeParams, FinishReason};
use dimple_engine::{EngineConfig, EngineEvent, EngineImage, Finished, GenerateRequest};
use dimple_model::DimpleModel;
use dimple_model::preprocess::{PreprocessConfig, preprocess_image};
use dimple_router::prompt::{ChatMessage, ContentPart, PromptBuilder};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/demo_eval"
    ))
    .join(rel)
}

type Setting = (CacheMode, Option<usize>, Option<f32>);

#[test]
fn block_and_cache_settings_on_the_demo_items() {
    let items: Vec<Value> = std::fs::read_to_string(fixture("eval.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 100);
    let builder = PromptBuilder::builtin().unwrap();
    let pre = PreprocessConfig::from_json(dimple_core::builtin::PREPROCESSOR_CONFIG_JSON).unwrap();
    let model = DimpleModel::builtin(DType::F32, &Device::Cpu).unwrap();
    let eos = model.config().eos_token_id;
    let engine = dimple_engine::start(
        model,
        EngineConfig {
            max_active: 64,
            max_waiting: 4096,
            ..EngineConfig::default()
        },
        None,
    );
    let mut prompts = Vec::new();
    for it in &items {
        let mut parts = Vec::new();
        let mut images = Vec::new();
        if let Some(rel) = it["image"].as_str() {
            images.push(preprocess_image(&std::fs::read(fixture(rel)).unwrap(), &pre).unwrap());
            parts.push(ContentPart::Image);
        }
        parts.push(ContentPart::text(it["question"].as_str().unwrap()));
        let counts: Vec<usize> = images
            .iter()
            .map(|i| i.num_image_tokens(pre.merge_size as usize))
            .collect();
        let ids = builder
            .build(&[ChatMessage::parts("user", parts)], &counts)
            .unwrap()
            .ids;
        let images: Vec<EngineImage> = images.into_iter().map(EngineImage::from).collect();
        prompts.push((ids, images, it["answer"].as_str().unwrap().to_string()));
    }
    // Confident decoding keeps the run short (about 1.5 passes per item in one block); the
    // full grid (no threshold, block 8) is the same code with more passes.
    let mut settings: Vec<Setting> = Vec::new();
    for cache in [CacheMode::Exact, CacheMode::Prefix, CacheMode::Dual] {
        for block in [None, Some(4)] {
            settings.push((cache, block, Some(0.9)));
        }
    }
    settings.push((CacheMode::Exact, Some(16), Some(0.9)));
    settings.push((CacheMode::Dual, Some(16), Some(0.9)));
    let params = |&(cache, block, thr): &Setting| DecodeParams {
        max_new_tokens: 16,
        steps: 16,
        threshold: thr,
        block_length: block,
        cache: Some(cache),
        ..DecodeParams::default()
    };
    let mut pending = Vec::new();
    for s in &settings {
        for (ids, images, _) in &prompts {
            let req = GenerateRequest {
                prompt_ids: ids.clone(),
                images: images.clone(),
                params: params(s),
                deadline: None,
            };
            pending.push(engine.submit(req).unwrap());
        }
    }
    let mut results: BTreeMap<String, Vec<Finished>> = BTreeMap::new();
    let label = |&(cache, block, thr): &Setting| {
        format!(
            "{cache} block {} thr {}",
            block.map_or("-".into(), |b| b.to_string()),
            thr.map_or("-".into(), |t| t.to_string())
        )
    };
    let mut rxs = pending.into_iter();
    for s in &settings {
        let mut out = Vec::new();
        for _ in 0..prompts.len() {
            let mut rx = rxs.next().unwrap();
            let mut blocks = std::collections::BTreeSet::new();
            let f = loop {
                match rx.blocking_recv().expect("final event") {
                    EngineEvent::Step { block, .. } => {
                        blocks.insert(block);
                    }
                    EngineEvent::Finished(f) => break f,
                    EngineEvent::Failed(e) => panic!("{}: {e}", label(s)),
                }
            };
            assert_eq!(f.finish_reason, FinishReason::Completed, "{}", label(s));
            assert!(f.steps >= blocks.len(), "{}", label(s));
            if let Some(b) = s.1 {
                assert_eq!(
                    *blocks.last().unwrap(),
                    16usize.div_ceil(b) - 1,
                    "{}",
                    label(s)
                );
            }
            out.push(f);
        }
        results.insert(label(s), out);
    }
    eprintln!("| cache | block | threshold | accuracy | mean NFE |");
    eprintln!("|---|---|---|---|---|");
    for s in &settings {
        let out = &results[&label(s)];
        let correct = out
            .iter()
            .zip(&prompts)
            .filter(|(f, p)| {
                let end = f.response_ids.iter().position(|&t| t == eos).unwrap_or(16);
                builder.decode(&f.response_ids[..end], true).unwrap().trim() == p.2
            })
            .count();
        let nfe = out.iter().map(|f| f.steps).sum::<usize>() as f64 / out.len() as f64;
        eprintln!(
            "| {} | {} | {} | {:.2} | {nfe:.2} |",
            s.0,
            s.1.map_or("16 (one)".into(), |b| b.to_string()),
            s.2.map_or("-".into(), |t| t.to_string()),
            correct as f64 / out.len() as f64
        );
    }
    let ids =
        |k: &str| -> Vec<Vec<u32>> { results[k].iter().map(|f| f.response_ids.clone()).collect() };
    assert_eq!(ids("exact block 16 thr 0.9"), ids("exact block - thr 0.9"));
    assert_eq!(ids("dual block 16 thr 0.9"), ids("prefix block - thr 0.9"));
    assert_eq!(engine.stats().cache_used_bytes, 0);
    engine.shutdown();
}
