//! Parity of the vision tower, patch merger and image projector with the golden outputs of
//! the official implementation (tiny random model, f32 on CPU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dimple_model::vision::{ImageProjector, VisionModel};
use dimple_model::{DimpleConfig, ModelError};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden");

fn golden(name: &str) -> PathBuf {
    Path::new(GOLDEN).join(name)
}

fn load_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(name), &Device::Cpu).unwrap()
}

struct Model {
    cfg: DimpleConfig,
    vision: VisionModel,
    projector: ImageProjector,
}

fn load_model() -> Model {
    let cfg = DimpleConfig::from_file(&golden("config.json")).unwrap();
    // SAFETY: the fixture file is read-only test data that nothing modifies while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[golden("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let vision = VisionModel::new(&cfg.vision_config, vb.pp("visual")).unwrap();
    let projector = ImageProjector::new(
        cfg.vision_config.out_hidden_size,
        cfg.hidden_size,
        vb.pp("img_projector"),
    )
    .unwrap();
    Model {
        cfg,
        vision,
        projector,
    }
}

/// Asserts `got` matches `want` within 1e-4 of `want`'s largest magnitude; reports the
/// worst element's error relative to that scale.
fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let got = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (worst_i, worst) = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0f32), |acc, (i, d)| {
            if d > acc.1 || d.is_nan() { (i, d) } else { acc }
        });
    let rel = worst / scale;
    println!("{name}: worst relative error {rel:.3e} at {worst_i} (max|ref| {scale:.3})");
    assert!(
        rel <= 1e-4,
        "{name}: element {worst_i} got {} want {} (relative {rel:.3e})",
        got[worst_i],
        want[worst_i]
    );
}

fn ints(t: &Tensor) -> Vec<usize> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// Pixel rows and grids named by a forward case's `pixel_values_source`.
fn case_inputs(case: &str) -> (Tensor, Vec<[usize; 3]>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{case}.json"))).unwrap())
            .unwrap();
    let source = json["pixel_values_source"].as_str().unwrap();
    let (file, expr) = source.split_once(": ").unwrap();
    let preproc = load_tensors(file);
    let names: Vec<&str> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
        .filter(|s| s.ends_with(".pixel_values"))
        .collect();
    assert!(!names.is_empty(), "{case}: no pixel_values in {source:?}");
    let mut rows = Vec::new();
    let mut grids = Vec::new();
    for name in names {
        let image = name.trim_end_matches(".pixel_values");
        rows.push(preproc[name].clone());
        let g = ints(&preproc[&format!("{image}.image_grid_thw")]);
        grids.push([g[0], g[1], g[2]]);
    }
    (Tensor::cat(&rows, 0).unwrap(), grids)
}

fn check_case(model: &Model, case: &str) {
    let want = load_tensors(&format!("{case}.safetensors"));
    let (pixels, grids) = case_inputs(case);
    let want_grids = ints(&want["image_grid_thw"]);
    assert_eq!(grids.concat(), want_grids, "{case}: image_grid_thw");

    let trace = model.vision.forward_traced(&pixels, &grids).unwrap();
    // Index bookkeeping and rotary angles must be exact.
    assert_eq!(
        trace.window_index,
        ints(&want["vision.window_index"]),
        "{case}: window_index"
    );
    assert_eq!(
        trace.cu_window_seqlens,
        ints(&want["vision.cu_window_seqlens"]),
        "{case}: cu_window_seqlens"
    );
    assert_eq!(
        trace.cu_seqlens,
        ints(&want["vision.cu_seqlens"]),
        "{case}: cu_seqlens"
    );
    let freqs = &want["vision.rot_pos_emb_freqs"];
    assert_eq!(
        trace.rot_pos_emb_freqs.dims(),
        freqs.dims(),
        "{case}: rot_pos_emb_freqs shape"
    );
    assert_eq!(
        trace
            .rot_pos_emb_freqs
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        freqs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "{case}: rot_pos_emb_freqs"
    );

    assert_close(
        &format!("{case} patch_embed_out"),
        &trace.patch_embed_out,
        &want["vision.patch_embed_out"],
    );
    assert_eq!(trace.block_outs.len(), model.cfg.vision_config.depth);
    for (i, out) in trace.block_outs.iter().enumerate() {
        assert_close(
            &format!("{case} block{i}_out"),
            out,
            &want[&format!("vision.block{i}_out")],
        );
    }
    assert_close(
        &format!("{case} merger_out_window_order"),
        &trace.merger_out_window_order,
        &want["vision.merger_out_window_order"],
    );
    assert_close(
        &format!("{case} output"),
        &trace.output,
        &want["vision.output"],
    );

    // The plain forward returns the same tokens as the traced one.
    let plain = model.vision.forward(&pixels, &grids).unwrap();
    assert_close(&format!("{case} forward"), &plain, &want["vision.output"]);

    let projected = model.projector.forward(&trace.output).unwrap();
    assert_close(
        &format!("{case} projector_out"),
        &projected,
        &want["projector_out"],
    );
}

#[test]
fn forward_image_matches_reference() {
    check_case(&load_model(), "forward_image");
}

#[test]
fn forward_two_images_with_windows_matches_reference() {
    let model = load_model();
    check_case(&model, "forward_image2");
    // Image 2 (10x18 patches = 5x9 merged tokens) splits into 2x3 = 6 windows; with image 1's
    // single window that makes 7 segments.
    let (pixels, grids) = case_inputs("forward_image2");
    let trace = model.vision.forward_traced(&pixels, &grids).unwrap();
    assert_eq!(trace.cu_window_seqlens.len(), 1 + 1 + 6);
}

#[test]
fn images_do_not_attend_to_each_other() {
    // Image 1 alone and image 1 followed by image 2 must give image 1 the same tokens.
    let model = load_model();
    let (pixels, grids) = case_inputs("forward_image2");
    let both = model.vision.forward(&pixels, &grids).unwrap();
    let first_rows = grids[0].iter().product::<usize>();
    let alone = model
        .vision
        .forward(&pixels.narrow(0, 0, first_rows).unwrap(), &grids[..1])
        .unwrap();
    let tokens = alone.dim(0).unwrap();
    assert_close(
        "image1 alone vs in pair",
        &both.narrow(0, 0, tokens).unwrap(),
        &alone,
    );
}

#[test]
fn mismatched_grid_is_an_input_error() {
    let model = load_model();
    let (pixels, grids) = case_inputs("forward_image");
    let [t, h, w] = grids[0];
    // 6x8 grid has 48 rows; claim 8x8 = 64.
    let err = model.vision.forward(&pixels, &[[t, h + 2, w]]).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "got {err:?}");
    // A grid side that is not a multiple of the merge size is rejected even when the patch
    // count fits (6x8 -> 3x16).
    let err = model
        .vision
        .forward(&pixels, &[[t, h / 2, w * 2]])
        .unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "got {err:?}");
    // Rows of the wrong width.
    let narrow = pixels.narrow(1, 0, 100).unwrap();
    let err = model.vision.forward(&narrow, &grids).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "got {err:?}");
}

#[test]
fn half_precision_tracks_f32_reference() {
    // The same weights in bf16/f16 (norms, rotary and softmax still in f32 internally) stay
    // close to the f32 reference; a dtype mix-up would fail to run or drift far.
    let cfg = DimpleConfig::from_file(&golden("config.json")).unwrap();
    let want = load_tensors("forward_image2.safetensors");
    let (pixels, grids) = case_inputs("forward_image2");
    // Tolerances: bf16 keeps 8 mantissa bits, f16 11; activations reach about 100.
    for (dtype, tol) in [(DType::BF16, 1e-1), (DType::F16, 2e-2)] {
        // SAFETY: the fixture file is read-only test data that nothing modifies while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[golden("model.safetensors")], dtype, &Device::Cpu)
                .unwrap()
        };
        let vision = VisionModel::new(&cfg.vision_config, vb.pp("visual")).unwrap();
        let out = vision.forward(&pixels, &grids).unwrap();
        assert_eq!(out.dtype(), dtype);
        let got = out.to_dtype(DType::F32).unwrap();
        let diff = (got - &want["vision.output"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        let scale = want["vision.output"].abs().unwrap().max_all().unwrap();
        let rel = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
        println!("{dtype:?} output: worst relative error {rel:.3e}");
        assert!(rel < tol, "{dtype:?}: relative error {rel:.3e}");
    }
}
