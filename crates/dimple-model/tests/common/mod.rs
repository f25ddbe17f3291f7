//! Helpers shared by the model's golden tests: fixture paths, tensor loading, tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dimple_model::{DimpleConfig, TextModel, weights};

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/golden"
    ))
    .join(name)
}

pub fn load_case(name: &str) -> HashMap<String, Tensor> {
    let path = golden(&format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {} must exist and load: {e}", path.display()))
}

pub fn config() -> DimpleConfig {
    DimpleConfig::from_file(&golden("config.json")).expect("golden config loads")
}

pub fn text_model() -> TextModel {
    let files = weights::checkpoint_files(&golden("")).expect("golden weights exist");
    let vb = weights::var_builder(&files, DType::F32, &Device::Cpu).expect("mmap weights");
    TextModel::new(&config(), &vb).expect("text model builds")
}

pub fn to_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

pub fn to_i64(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// Each row of a case's `input_ids` with its `attention_mask` as key validity.
pub fn case_rows(t: &HashMap<String, Tensor>) -> Vec<(Vec<u32>, Vec<bool>)> {
    let (b, l) = t["input_ids"].dims2().unwrap();
    let ids = to_i64(&t["input_ids"]);
    let mask = to_i64(&t["attention_mask"]);
    (0..b)
        .map(|row| {
            let r = row * l..(row + 1) * l;
            (
                ids[r.clone()].iter().map(|&x| x as u32).collect(),
                mask[r].iter().map(|&m| m != 0).collect(),
            )
        })
        .collect()
}

/// Asserts `got` is within 1e-4 x max|want| of `want`, element by element.
pub fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > worst {
            worst = d;
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= 1e-4,
        "{name}: worst |diff| {worst} at {at} (got {}, want {}), {rel:.2e} x max|ref| {scale}",
        got[at],
        want[at]
    );
}

/// The golden checkpoint as a whole model.
pub fn full_model() -> dimple_model::DimpleModel {
    dimple_model::DimpleModel::load(&golden(""), DType::F32, &Device::Cpu)
        .expect("golden model loads")
}

/// Pixel values and grids of the default-preprocessed golden images `ks` (1-based), rows
/// concatenated in order, as the reference processor returns them.
pub fn golden_pixels(ks: &[usize]) -> (Tensor, Vec<[usize; 3]>) {
    let pre = load_case("preproc_default");
    let mut rows = Vec::new();
    let mut grids = Vec::new();
    for k in ks {
        rows.push(pre[&format!("image{k}.pixel_values")].clone());
        let g = to_i64(&pre[&format!("image{k}.image_grid_thw")]);
        grids.push([g[0] as usize, g[1] as usize, g[2] as usize]);
    }
    (Tensor::cat(&rows, 0).unwrap(), grids)
}
