//! The built-in demo model on its 100 evaluation items, through the whole local path: chat
//! template and tokenizer, PNG decoding and preprocessing, the engine. Under every decoding
//! setting the official implementation was run with, the response ids and the number of
//! forward passes equal the official ones, and so do accuracy and mean NFE.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use dimple_core::params::{DecodeParams, Pipeline};
use dimple_engine::{EngineConfig, EngineEvent, EngineImage, GenerateRequest};
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

fn jsonl(rel: &str) -> Vec<Value> {
    std::fs::read_to_string(fixture(rel))
        .unwrap_or_else(|e| panic!("{rel} must exist: {e}"))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `dim_thr0.9_cache1` -> decode parameters of that setting.
fn setting(name: &str) -> DecodeParams {
    let mut parts = name.split('_');
    let pipeline: Pipeline = parts.next().unwrap().parse().unwrap();
    let thr = parts.next().unwrap().trim_start_matches("thr");
    let cache = parts.next().unwrap() == "cache1";
    DecodeParams {
        max_new_tokens: 16,
        steps: 16,
        threshold: if thr == "none" {
            None
        } else {
            Some(thr.parse().unwrap())
        },
        pipeline,
        use_original_confidence: pipeline == Pipeline::Dim,
        use_cache: cache,
        ..DecodeParams::default()
    }
}

#[test]
fn demo_eval_matches_the_official_outputs_under_every_setting() {
    let items = jsonl("eval.jsonl");
    assert_eq!(items.len(), 100);
    let reference = jsonl("reference_outputs.jsonl");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("results.json")).unwrap()).unwrap();

    let builder = PromptBuilder::builtin().unwrap();
    let pre = PreprocessConfig::from_json(dimple_core::builtin::PREPROCESSOR_CONFIG_JSON).unwrap();
    let model = DimpleModel::builtin(DType::F32, &Device::Cpu).unwrap();
    let eos = model.config().eos_token_id;
    let engine = dimple_engine::start(
        model,
        EngineConfig {
            max_active: 48,
            max_waiting: 2048,
            ..EngineConfig::default()
        },
        None,
    );

    // Prompt and image of each item, built once.
    let mut prompts = BTreeMap::new();
    for it in &items {
        let id = it["id"].as_str().unwrap().to_string();
        let mut parts = Vec::new();
        let mut images = Vec::new();
        if let Some(rel) = it["image"].as_str() {
            let bytes = std::fs::read(fixture(rel)).unwrap();
            images.push(preprocess_image(&bytes, &pre).unwrap());
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
        prompts.insert(
            id,
            (ids, images, it["answer"].as_str().unwrap().to_string()),
        );
    }

    // Every (setting, item) submitted at once: they share steps in the engine.
    let mut pending = Vec::new();
    for r in &reference {
        let (ids, images, _) = &prompts[r["id"].as_str().unwrap()];
        let req = GenerateRequest {
            prompt_ids: ids.clone(),
            images: images.clone(),
            params: setting(r["config"].as_str().unwrap()),
            deadline: None,
        };
        pending.push((r, engine.submit(req).unwrap()));
    }

    let mut per_setting: BTreeMap<String, (usize, usize, usize, Vec<String>)> = BTreeMap::new();
    for (r, mut rx) in pending {
        let finished = loop {
            match rx.blocking_recv().expect("final event") {
                EngineEvent::Step { .. } => {}
                EngineEvent::Finished(f) => break f,
                EngineEvent::Failed(e) => panic!("{}: {e}", r["id"]),
            }
        };
        let id = r["id"].as_str().unwrap();
        let config = r["config"].as_str().unwrap().to_string();
        let want: Vec<u32> = r["response_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let e = per_setting.entry(config).or_default();
        if finished.response_ids != want || finished.steps as u64 != r["nfe"].as_u64().unwrap() {
            let diff: Vec<usize> = (0..want.len())
                .filter(|&i| finished.response_ids.get(i) != want.get(i))
                .collect();
            e.3.push(format!(
                "{id}: positions {diff:?} differ, steps {} vs {}",
                finished.steps, r["nfe"]
            ));
        }
        let end = finished
            .response_ids
            .iter()
            .position(|&t| t == eos)
            .unwrap_or(finished.response_ids.len());
        let pred = builder
            .decode(&finished.response_ids[..end], true)
            .unwrap()
            .trim()
            .to_string();
        if e.3.is_empty() || !e.3.last().unwrap().starts_with(id) {
            assert_eq!(
                pred,
                r["pred"].as_str().unwrap().trim(),
                "{id} decoded answer under {}",
                r["config"]
            );
        }
        e.0 += 1;
        e.1 += usize::from(pred == prompts[id].2);
        e.2 += finished.steps;
    }

    for row in results["table"].as_array().unwrap() {
        let config = row["config"].as_str().unwrap();
        let (n, correct, nfe, mismatches) = &per_setting[config];
        assert_eq!(*n, 100, "{config}");
        assert!(
            mismatches.len() <= 1,
            "{config}: more than one item differs from the official outputs: {mismatches:?}"
        );
        if !mismatches.is_empty() {
            eprintln!("{config}: near-tie flip tolerated: {mismatches:?}");
        }
        let acc = *correct as f64 / *n as f64;
        let mean_nfe = *nfe as f64 / *n as f64;
        assert!(
            (acc - row["acc"].as_f64().unwrap()).abs() < 0.011,
            "{config}: accuracy {acc} vs {}",
            row["acc"]
        );
        assert!(
            (mean_nfe - row["mean_nfe"].as_f64().unwrap()).abs() < 0.02,
            "{config}: mean NFE {mean_nfe} vs {}",
            row["mean_nfe"]
        );
        eprintln!("{config}: acc {acc:.3} mean NFE {mean_nfe:.2}");
    }
    assert_eq!(engine.stats().cache_used_bytes, 0);
}
