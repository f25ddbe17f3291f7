//! Keys/values kept before and after a window (the dual cache of block-wise decoding).
//!
//! A whole pass keeps the keys/values of the positions before a block's window and of the
//! positions after it; a pass over the window alone, attending to both, must then give the
//! whole pass's logits for the window rows (nothing is stale). Once tokens inside the window
//! change, the same kept keys/values no longer match a fresh whole pass (the designed
//! approximation), while keys/values kept from a fresh pass over the new tokens match it
//! again. Checked on the host f32 kernels and on the generic tensor path (f64).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dimple_model::{DimpleModel, KvCache, SeqInput, TextModel, kv_cache_bytes, rope_index};

/// Prompt of the `forward_text` case (20 tokens) followed by 12 response slots.
const PROMPT: usize = 20;
/// The block: response slots [4, 8). Its window starts one position earlier.
const BLOCK: std::ops::Range<usize> = 4..8;

fn ids() -> Vec<u32> {
    let t = load_case("forward_text");
    to_i64(&t["input_ids"]).iter().map(|&x| x as u32).collect()
}

fn input<'a>(
    embeds: Tensor,
    positions: &'a [[i64; 3]],
    prefix: Option<&'a KvCache>,
    suffix: Option<&'a KvCache>,
    keep: (usize, usize),
    rows: std::ops::Range<usize>,
) -> SeqInput<'a> {
    SeqInput {
        embeds,
        positions,
        key_valid: None,
        prefix,
        keep_prefix: keep.0,
        suffix,
        keep_suffix: keep.1,
        logit_rows: rows.into(),
    }
}

/// Window logits, the whole pass's logits for the same rows, and the caches it kept.
struct Pass {
    full: Vec<f32>,
    prefix: KvCache,
    suffix: KvCache,
}

/// The whole pass over `ids`, keeping everything outside the window `[before, after_start)`.
fn whole_pass(text: &TextModel, ids: &[u32], positions: &[[i64; 3]]) -> Pass {
    let l = ids.len();
    let (before, after_start) = (PROMPT - 1 + BLOCK.start, PROMPT + BLOCK.end);
    let embeds = text.embed_tokens(ids).unwrap();
    let out = text
        .forward(
            &[input(
                embeds,
                positions,
                None,
                None,
                (before, l - after_start),
                before..after_start,
            )],
            None,
        )
        .unwrap();
    let mut out = out.into_iter().next().unwrap();
    Pass {
        full: to_f32(&out.logits),
        prefix: out.cache.take().expect("prefix kept"),
        suffix: out.suffix_cache.take().expect("suffix kept"),
    }
}

fn window_pass(
    text: &TextModel,
    ids: &[u32],
    positions: &[[i64; 3]],
    prefix: &KvCache,
    suffix: &KvCache,
) -> Vec<f32> {
    let (before, after_start) = (PROMPT - 1 + BLOCK.start, PROMPT + BLOCK.end);
    let embeds = text.embed_tokens(&ids[before..after_start]).unwrap();
    let out = text
        .forward(
            &[input(
                embeds,
                &positions[before..after_start],
                Some(prefix),
                Some(suffix),
                (0, 0),
                0..after_start - before,
            )],
            None,
        )
        .unwrap();
    to_f32(&out[0].logits)
}

fn worst_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn check(dtype: DType) {
    let cfg = config();
    let model = DimpleModel::load(&golden(""), dtype, &Device::Cpu).unwrap();
    let text = &model.text;
    let mut ids = ids();
    let l = ids.len();
    assert_eq!(l, PROMPT + 12);
    let positions = rope_index(&ids, None, &[], &cfg).unwrap().positions;

    // Fresh caches: the window reproduces the whole pass.
    let pass = whole_pass(text, &ids, &positions);
    let before = PROMPT - 1 + BLOCK.start;
    assert_eq!(pass.prefix.len(), before);
    assert_eq!(pass.suffix.len(), l - PROMPT - BLOCK.end);
    assert_eq!(
        pass.prefix.bytes() + pass.suffix.bytes(),
        kv_cache_bytes(&cfg, l - (BLOCK.len() + 1), dtype)
    );
    let window = window_pass(text, &ids, &positions, &pass.prefix, &pass.suffix);
    assert_close(
        &format!("{dtype:?}: window vs whole pass"),
        &window,
        &pass.full,
    );

    // The kept parts are the whole sequence's keys/values at those positions.
    let all = text
        .forward(
            &[input(
                text.embed_tokens(&ids).unwrap(),
                &positions,
                None,
                None,
                (l, 0),
                0..1,
            )],
            None,
        )
        .unwrap();
    let all = all[0].cache.as_ref().unwrap();
    for (li, ((pk, pv), (sk, sv))) in pass
        .prefix
        .layers()
        .iter()
        .zip(pass.suffix.layers())
        .enumerate()
    {
        let (ak, av) = &all.layers()[li];
        for (got, whole, from, n) in [
            (pk, ak, 0, before),
            (pv, av, 0, before),
            (sk, ak, PROMPT + BLOCK.end, l - PROMPT - BLOCK.end),
            (sv, av, PROMPT + BLOCK.end, l - PROMPT - BLOCK.end),
        ] {
            assert_eq!(
                to_f32(got),
                to_f32(&whole.narrow(1, from, n).unwrap()),
                "{dtype:?}: layer {li} kept keys/values"
            );
        }
    }

    // Commit tokens inside the block: the kept keys/values are now stale.
    for (k, j) in BLOCK.enumerate() {
        ids[PROMPT + j] = 17 + 40 * k as u32;
    }
    let fresh = whole_pass(text, &ids, &positions);
    let stale = window_pass(text, &ids, &positions, &pass.prefix, &pass.suffix);
    let drift = worst_rel(&stale, &fresh.full);
    assert!(
        drift > 1e-3,
        "{dtype:?}: stale caches must differ from a fresh pass (worst {drift:.2e})"
    );
    let refreshed = window_pass(text, &ids, &positions, &fresh.prefix, &fresh.suffix);
    assert_close(
        &format!("{dtype:?}: window over refreshed caches"),
        &refreshed,
        &fresh.full,
    );
}

#[test]
fn window_between_kept_prefix_and_suffix_equals_the_whole_pass_host_kernels() {
    check(DType::F32);
}

#[test]
fn window_between_kept_prefix_and_suffix_equals_the_whole_pass_tensor_path() {
    check(DType::F64);
}
