//! Whole-model forward passes with images against the reference: position ids with image
//! grids, the embeddings after image placement, hidden states and logits.

mod common;

use common::*;
use dimple_model::{ModelError, SeqInput, rope_index};

fn check_case(case: &str, images: &[usize]) {
    let t = load_case(case);
    let cfg = config();
    let model = full_model();
    let ids: Vec<u32> = to_i64(&t["input_ids"]).iter().map(|&x| x as u32).collect();
    let l = ids.len();
    let (pv, grids) = golden_pixels(images);
    assert_eq!(
        to_i64(&t["image_grid_thw"]),
        grids
            .iter()
            .flat_map(|g| g.iter().map(|&x| x as i64))
            .collect::<Vec<_>>()
    );

    let ri = rope_index(&ids, None, &grids, &cfg).unwrap();
    let pos_ref = to_i64(&t["position_ids"]);
    for c in 0..3 {
        let got: Vec<i64> = ri.positions.iter().map(|p| p[c]).collect();
        assert_eq!(
            got,
            &pos_ref[c * l..(c + 1) * l],
            "{case} position component {c}"
        );
    }
    assert_eq!(ri.delta, to_i64(&t["rope_deltas"])[0], "{case} rope delta");

    let features = model.encode_images(&pv, &grids).unwrap();
    assert_close(
        &format!("{case} projector_out"),
        &to_f32(&features),
        &to_f32(&t["projector_out"]),
    );
    let embeds = model.embed(&ids, Some(&features)).unwrap();
    assert_close(
        &format!("{case} inputs_embeds"),
        &to_f32(&embeds),
        &to_f32(&t["inputs_embeds"]),
    );

    let mut trace = Vec::new();
    let seq = SeqInput {
        embeds,
        positions: &ri.positions,
        key_valid: None,
        prefix: None,
        keep_prefix: 0,
        suffix: None,
        keep_suffix: 0,
        logit_rows: (0..l).into(),
    };
    let out = model.text.forward(&[seq], Some(&mut trace)).unwrap();
    for (k, h) in trace.iter().enumerate() {
        assert_close(
            &format!("{case} hidden_states.{k}"),
            &to_f32(h),
            &to_f32(&t[&format!("hidden_states.{k}")]),
        );
    }
    assert_close(
        &format!("{case} logits"),
        &to_f32(&out[0].logits),
        &to_f32(&t["logits"]),
    );
}

#[test]
fn forward_image_matches_reference() {
    check_case("forward_image", &[1]);
}

#[test]
fn forward_two_images_match_reference() {
    check_case("forward_image2", &[1, 2]);
}

#[test]
fn image_token_count_mismatch_is_an_error() {
    let cfg = config();
    let model = full_model();
    let (pv, grids) = golden_pixels(&[1]);
    let features = model.encode_images(&pv, &grids).unwrap();
    // 11 image tokens for an image that gives 12 rows.
    let mut ids = vec![5u32, cfg.vision_start_token_id];
    ids.extend(std::iter::repeat_n(cfg.image_token_id, 11));
    ids.extend([cfg.vision_end_token_id, 7]);
    let err = model.embed(&ids, Some(&features)).unwrap_err();
    assert!(
        matches!(err, ModelError::Input(ref m) if m.contains("11 image tokens")),
        "{err}"
    );
    let err = rope_index(&ids, None, &grids, &cfg).unwrap_err();
    assert!(
        matches!(err, ModelError::Input(ref m) if m.contains("needs 12 image tokens")),
        "{err}"
    );
    // Images given for a prompt without image tokens.
    let err = rope_index(&[1, 2, 3], None, &grids, &cfg).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
}
