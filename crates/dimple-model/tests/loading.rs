//! Loading checkpoints: configuration defaults and validation, single-file and sharded
//! safetensors, dtypes chosen at load, and the errors for missing or mis-shaped tensors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use dimple_model::{DimpleConfig, DimpleModel, ModelError, SeqInput, rope_index};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dimple-loading-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn golden_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden("model.safetensors"), &Device::Cpu).unwrap()
}

fn write_checkpoint(dir: &Path, tensors: &HashMap<String, Tensor>) {
    std::fs::copy(golden("config.json"), dir.join("config.json")).unwrap();
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

/// Logits of the `forward_text` case through a loaded model.
fn text_logits(model: &DimpleModel) -> Vec<f32> {
    let t = load_case("forward_text");
    let ids: Vec<u32> = to_i64(&t["input_ids"]).iter().map(|&x| x as u32).collect();
    let ri = rope_index(&ids, None, &[], model.config()).unwrap();
    let embeds = model.embed(&ids, None).unwrap();
    let seq = SeqInput {
        embeds,
        positions: &ri.positions,
        key_valid: None,
        prefix: None,
        keep_prefix: 0,
        suffix: None,
        keep_suffix: 0,
        logit_rows: (0..ids.len()).into(),
    };
    to_f32(&model.text.forward(&[seq], None).unwrap()[0].logits)
}

#[test]
fn absent_config_fields_take_the_reference_defaults() {
    // `config.json` keeps only non-default values; `config_full.json` spells out all of them.
    let short = DimpleConfig::from_file(&golden("config.json")).unwrap();
    let full = DimpleConfig::from_file(&golden("config_full.json")).unwrap();
    assert_eq!(short, full);
    assert_eq!(short.vision_config.patch_size, 14);
    assert_eq!(short.vision_config.window_size, 112);
    assert_eq!(short.vision_config.spatial_merge_size, 2);
}

#[test]
fn inconsistent_configs_are_refused_naming_the_field() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("config.json")).unwrap()).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/mrope_section",
            serde_json::json!([2, 3, 4]),
            "mrope_section",
        ),
        (
            "/num_key_value_heads",
            serde_json::json!(3),
            "num_key_value_heads",
        ),
        ("/hidden_size", serde_json::json!(66), "hidden_size"),
        (
            "/num_attention_heads",
            serde_json::json!(0),
            "num_attention_heads",
        ),
        ("/hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("/mask_token_id", serde_json::json!(384), "mask_token_id"),
        ("/rms_norm_eps", serde_json::json!(0.0), "rms_norm_eps"),
        (
            "/vision_config/num_heads",
            serde_json::json!(3),
            "vision_config.hidden_size",
        ),
        (
            "/vision_config/fullatt_block_indexes",
            serde_json::json!([1, 9]),
            "vision_config.fullatt_block_indexes",
        ),
        (
            "/vision_config/window_size",
            serde_json::json!(100),
            "vision_config.window_size",
        ),
    ];
    for (pointer, value, field) in cases {
        let mut cfg = base.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let obj = if parent.is_empty() {
            &mut cfg
        } else {
            cfg.pointer_mut(parent).unwrap()
        };
        obj.as_object_mut()
            .unwrap()
            .insert(key.to_string(), value.clone());
        let err = DimpleConfig::from_json(&cfg.to_string()).unwrap_err();
        assert!(
            matches!(&err, ModelError::Config(m) if m.contains(&format!("`{field}`"))),
            "{pointer} = {value}: {err}"
        );
    }
    let err = DimpleConfig::from_json("{ not json").unwrap_err();
    assert!(matches!(err, ModelError::Config(_)), "{err}");
    let err = DimpleConfig::from_json(r#"{"hidden_size": "wide"}"#).unwrap_err();
    assert!(
        matches!(&err, ModelError::Config(m) if m.contains("hidden_size")),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = temp_dir("missing");
    let mut tensors = golden_tensors();
    tensors.remove("model.norm.weight").unwrap();
    write_checkpoint(&dir, &tensors);
    let err = DimpleModel::load(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("load must fail");
    assert!(
        matches!(&err, ModelError::Weights(m) if m.contains("model.norm.weight")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_mis_shaped_tensor_is_named() {
    let dir = temp_dir("shape");
    let mut tensors = golden_tensors();
    let bad = tensors["model.layers.1.self_attn.k_proj.weight"]
        .narrow(0, 0, 16)
        .unwrap();
    tensors.insert("model.layers.1.self_attn.k_proj.weight".into(), bad);
    write_checkpoint(&dir, &tensors);
    let err = DimpleModel::load(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("load must fail");
    assert!(
        matches!(&err, ModelError::Weights(m) if m.contains("model.layers.1.self_attn.k_proj.weight")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_directory_without_weights_is_an_error() {
    let dir = temp_dir("empty");
    std::fs::copy(golden("config.json"), dir.join("config.json")).unwrap();
    let err = DimpleModel::load(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("load must fail");
    assert!(
        matches!(&err, ModelError::Weights(m) if m.contains("model.safetensors")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sharded_checkpoints_load_like_a_single_file() {
    let dir = temp_dir("sharded");
    std::fs::copy(golden("config.json"), dir.join("config.json")).unwrap();
    let tensors = golden_tensors();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert((*n).clone(), tensors[*n].clone());
        map.insert((*n).clone(), serde_json::Value::String(file.into()));
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = DimpleModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let want = to_f32(&load_case("forward_text")["logits"]);
    assert_close("sharded logits", &text_logits(&sharded), &want);

    // A shard listed in the index but absent is named.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = DimpleModel::load(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("load must fail");
    assert!(
        matches!(&err, ModelError::Weights(m) if m.contains("model-00002-of-00002.safetensors")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn half_precision_dtypes_are_chosen_at_load() {
    let want = to_f32(&load_case("forward_text")["logits"]);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for dtype in [DType::F16, DType::BF16] {
        let model = DimpleModel::load(&golden(""), dtype, &Device::Cpu).unwrap();
        assert_eq!(model.text.dtype(), dtype);
        let got = text_logits(&model);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .sum::<f32>()
            / got.len() as f32;
        eprintln!("{dtype:?}: worst {worst}, mean {mean}, max|ref| {scale}");
        // The golden model's weights are deliberately large (init 0.4, lm_head x2), which
        // magnifies rounding: f16 keeps 11 significant bits, bf16 only 8. The point is that
        // the half-precision path runs end to end and stays near f32, not that it matches.
        let (tol_worst, tol_mean) = if dtype == DType::F16 {
            (2e-2, 2e-3)
        } else {
            (2.5e-1, 2e-2)
        };
        assert!(
            worst / scale < tol_worst && mean / scale < tol_mean,
            "{dtype:?}: worst {worst}, mean {mean} vs max {scale}"
        );
    }
}

#[test]
fn saved_random_weights_load_as_the_random_checkpoint_with_a_real_checkpoints_tensors() {
    let dir = temp_dir("random");
    let cfg = DimpleConfig::from_file(&golden("config.json")).unwrap();
    std::fs::copy(golden("config.json"), dir.join("config.json")).unwrap();
    dimple_model::save_random_weights(&cfg, DType::F32, &dir.join("model.safetensors")).unwrap();

    // The file holds exactly the tensors of the reference checkpoint, with their shapes.
    let saved_f32 =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let shapes = |m: &HashMap<String, Tensor>| {
        let mut v: Vec<(String, Vec<usize>)> = m
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&saved_f32), shapes(&golden_tensors()));

    // Loaded from disk, the model computes what the in-memory random weights compute.
    let from_disk = DimpleModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let in_memory = dimple_model::Checkpoint::Random(Box::new(cfg))
        .load(
            DType::F32,
            &Device::Cpu,
            std::sync::Arc::new(dimple_model::SingleComm),
        )
        .unwrap();
    let logits = text_logits(&from_disk);
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_eq!(logits, text_logits(&in_memory));

    // Half precision: the same weights rounded once.
    dimple_model::save_random_weights(
        from_disk.config(),
        DType::BF16,
        &dir.join("model.safetensors"),
    )
    .unwrap();
    let saved =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.embed_tokens.weight";
    assert_eq!(saved[name].dtype(), DType::BF16);
    assert_eq!(
        to_f32(&saved[name]),
        to_f32(&saved_f32[name].to_dtype(DType::BF16).unwrap())
    );
    assert!(!dir.join("model.safetensors.partial").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
