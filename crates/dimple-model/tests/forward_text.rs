//! Text forward passes against the reference: position ids, embeddings, rotary tables,
//! hidden states and logits, for a single sequence and a left-padded batch; and the
//! tensor-op path's padded batch (one step of mixed sequences) against each sequence alone
//! and against the host kernels.

mod common;

use candle_core::{DType, Device};
use common::*;
use dimple_model::{DimpleModel, KvCache, LogitRows, SeqInput, SeqOutput, TextModel, rope_index};

#[allow(clippy::needless_range_loop)] // `row` indexes the reference tensors too
fn check_case(case: &str) {
    let t = load_case(case);
    let cfg = config();
    let model = text_model();
    let (b, l) = t["input_ids"].dims2().unwrap();
    let pos_ref = to_i64(&t["position_ids"]); // [3, B, L]
    let deltas_ref = to_i64(&t["rope_deltas"]);

    assert_eq!(
        model.rope_inv_freq(),
        to_f32(&t["rope_inv_freq"]).as_slice(),
        "rope_inv_freq bit-exact"
    );

    let mut inputs = Vec::new();
    for (row, (ids, valid)) in case_rows(&t).into_iter().enumerate() {
        let ri = rope_index(&ids, Some(&valid), &[], &cfg).unwrap();
        for c in 0..3 {
            let want = &pos_ref[(c * b + row) * l..(c * b + row + 1) * l];
            let got: Vec<i64> = ri.positions.iter().map(|p| p[c]).collect();
            assert_eq!(got, want, "{case} row {row} position component {c}");
            let (cos, sin) = model.rope_component_tables(&ri.positions, c);
            let hd = cfg.head_dim();
            let cos_ref = to_f32(&t["rope_cos"].get(c).unwrap().get(row).unwrap());
            let sin_ref = to_f32(&t["rope_sin"].get(c).unwrap().get(row).unwrap());
            assert_eq!(cos.len(), l * hd);
            assert_close(&format!("{case} rope_cos[{c},{row}]"), &cos, &cos_ref);
            assert_close(&format!("{case} rope_sin[{c},{row}]"), &sin, &sin_ref);
        }
        assert_eq!(ri.delta, deltas_ref[row], "{case} row {row} rope delta");
        let embeds = model.embed_tokens(&ids).unwrap();
        let want = to_f32(&t["inputs_embeds"].get(row).unwrap());
        assert_close(
            &format!("{case} inputs_embeds[{row}]"),
            &to_f32(&embeds),
            &want,
        );
        inputs.push((embeds, ri.positions, valid));
    }

    // All rows in one packed call: each attends only within itself.
    let seqs: Vec<SeqInput> = inputs
        .iter()
        .map(|(e, p, v)| SeqInput {
            embeds: e.clone(),
            positions: p,
            key_valid: Some(v),
            prefix: None,
            keep_prefix: 0,
            suffix: None,
            keep_suffix: 0,
            logit_rows: (0..l).into(),
        })
        .collect();
    let mut trace = Vec::new();
    let out = model.forward(&seqs, Some(&mut trace)).unwrap();
    assert_eq!(trace.len(), 3, "embeddings, layer 0, final norm");
    for row in 0..b {
        for (k, h) in trace.iter().enumerate() {
            let got = to_f32(&h.narrow(0, row * l, l).unwrap());
            let want = to_f32(&t[&format!("hidden_states.{k}")].get(row).unwrap());
            // Padded positions are compared too: a pad attends only to itself.
            assert_close(&format!("{case} hidden_states.{k}[{row}]"), &got, &want);
        }
        let want = to_f32(&t["logits"].get(row).unwrap());
        assert_eq!(out[row].logits.dims(), &[l, cfg.vocab_size]);
        assert_close(
            &format!("{case} logits[{row}]"),
            &to_f32(&out[row].logits),
            &want,
        );
    }
}

#[test]
fn forward_text_matches_reference() {
    check_case("forward_text");
}

#[test]
fn forward_text_batch_matches_reference() {
    check_case("forward_text_batch");
}

/// The cached-prefix entry point: running the prompt once, keeping its K/V, then running
/// only the tail against that cache gives the same logits as the full sequence (the
/// response tokens are unchanged here, so nothing is stale).
#[test]
fn cached_prefix_window_equals_full_sequence() {
    let t = load_case("forward_text");
    let cfg = config();
    let model = text_model();
    let ids: Vec<u32> = to_i64(&t["input_ids"]).iter().map(|&x| x as u32).collect();
    let l = ids.len();
    let ri = rope_index(&ids, None, &[], &cfg).unwrap();
    let embeds = model.embed_tokens(&ids).unwrap();
    let p = 20 - 1; // prompt length 20, keep all but its last token
    let full = model
        .forward(
            &[SeqInput {
                embeds: embeds.clone(),
                positions: &ri.positions,
                key_valid: None,
                prefix: None,
                keep_prefix: p,
                suffix: None,
                keep_suffix: 0,
                logit_rows: (0..l).into(),
            }],
            None,
        )
        .unwrap();
    let cache = full[0].cache.as_ref().expect("cache kept");
    assert_eq!(cache.len(), p);
    assert_eq!(
        cache.bytes(),
        dimple_model::kv_cache_bytes(&cfg, p, candle_core::DType::F32)
    );
    let window = model
        .forward(
            &[SeqInput {
                embeds: embeds.narrow(0, p, l - p).unwrap(),
                positions: &ri.positions[p..],
                key_valid: None,
                prefix: Some(cache),
                keep_prefix: 0,
                suffix: None,
                keep_suffix: 0,
                logit_rows: (0..l - p).into(),
            }],
            None,
        )
        .unwrap();
    let want = to_f32(&full[0].logits.narrow(0, p, l - p).unwrap());
    assert_close("window logits", &to_f32(&window[0].logits), &want);
    let reference = to_f32(&t["logits"].get(0).unwrap().narrow(0, p, l - p).unwrap());
    assert_close(
        "window logits vs reference",
        &to_f32(&window[0].logits),
        &reference,
    );
}

/// Scoring only some rows (in any order) gives exactly those rows of the all-rows logits,
/// for a padded batch: the last layer then runs attention and the MLP only for the scored
/// rows, and no row's value may change for it.
#[test]
fn scored_rows_equal_the_same_rows_of_a_full_pass() {
    let t = load_case("forward_text_batch");
    let cfg = config();
    let model = text_model();
    let (b, l) = t["input_ids"].dims2().unwrap();
    let inputs: Vec<_> = case_rows(&t)
        .into_iter()
        .map(|(ids, valid)| {
            let ri = rope_index(&ids, Some(&valid), &[], &cfg).unwrap();
            (model.embed_tokens(&ids).unwrap(), ri.positions, valid)
        })
        .collect();
    let picks: Vec<Vec<usize>> = (0..b)
        .map(|row| match row % 3 {
            0 => vec![l - 1, 2, l / 2, 0],
            1 => Vec::new(),
            _ => vec![l / 3],
        })
        .collect();
    let seqs = |rows: &dyn Fn(usize) -> LogitRows| -> Vec<SeqInput<'_>> {
        inputs
            .iter()
            .enumerate()
            .map(|(n, (e, p, v))| SeqInput {
                embeds: e.clone(),
                positions: p,
                key_valid: Some(v),
                prefix: None,
                keep_prefix: 0,
                suffix: None,
                keep_suffix: 0,
                logit_rows: rows(n),
            })
            .collect()
    };
    let full = model.forward(&seqs(&|_| (0..l).into()), None).unwrap();
    let some = model
        .forward(&seqs(&|n| LogitRows::List(picks[n].clone())), None)
        .unwrap();
    let mut trace = Vec::new();
    let traced = model
        .forward(
            &seqs(&|n| LogitRows::List(picks[n].clone())),
            Some(&mut trace),
        )
        .unwrap();
    for row in 0..b {
        assert_eq!(some[row].logits.dims(), &[picks[row].len(), cfg.vocab_size]);
        let all = to_f32(&full[row].logits);
        let want: Vec<f32> = picks[row]
            .iter()
            .flat_map(|&r| all[r * cfg.vocab_size..(r + 1) * cfg.vocab_size].to_vec())
            .collect();
        assert_eq!(
            to_f32(&some[row].logits),
            want,
            "row {row}: scored rows differ"
        );
        assert_eq!(
            to_f32(&traced[row].logits),
            want,
            "row {row}: traced pass differs"
        );
    }
}

/// One sequence's logits and kept caches, flattened.
#[derive(Debug, PartialEq)]
struct Flat {
    logits: Vec<f32>,
    caches: Vec<Vec<f32>>,
}

fn flat(o: &SeqOutput) -> Flat {
    let mut caches = Vec::new();
    for c in [&o.cache, &o.suffix_cache].into_iter().flatten() {
        for (k, v) in c.layers() {
            caches.push(to_f32(k));
            caches.push(to_f32(v));
        }
    }
    Flat {
        logits: to_f32(&o.logits),
        caches,
    }
}

/// One step of six different sequences (a whole sequence keeping a prefix and a suffix, a
/// window over a kept prefix with key padding, a dual-cache window, two left-padded rows,
/// a short sequence keeping a suffix), run as one call and each alone. Returns (batched,
/// alone).
fn mixed_step(model: &TextModel) -> (Vec<Flat>, Vec<Flat>) {
    let cfg = config();
    let t = load_case("forward_text");
    let ids: Vec<u32> = to_i64(&t["input_ids"]).iter().map(|&x| x as u32).collect();
    let l = ids.len();
    let pos = rope_index(&ids, None, &[], &cfg).unwrap().positions;
    let embeds = |r: std::ops::Range<usize>| model.embed_tokens(&ids[r]).unwrap();
    let whole = |keep: (usize, usize), rows: LogitRows| SeqInput {
        embeds: embeds(0..l),
        positions: &pos,
        key_valid: None,
        prefix: None,
        keep_prefix: keep.0,
        suffix: None,
        keep_suffix: keep.1,
        logit_rows: rows,
    };
    // Caches from whole passes of this model: a prompt prefix as the tensor path keeps it,
    // and a dual cache around [22, 28) rebuilt layer by layer (as another path gives it).
    let mut prompt = model
        .forward(&[whole((19, 0), (0..1).into())], None)
        .unwrap();
    let prefix = prompt[0].cache.take().expect("prefix kept");
    let mut dual = model
        .forward(&[whole((22, l - 28), (0..1).into())], None)
        .unwrap();
    let before = KvCache::new(dual[0].cache.take().expect("kept").layers().to_vec());
    let after = KvCache::new(dual[0].suffix_cache.take().expect("kept").layers().to_vec());
    let window_valid: Vec<bool> = (0..l).map(|j| j != 3 && j != 7).collect();

    let b = load_case("forward_text_batch");
    let (rows, lb) = b["input_ids"].dims2().unwrap();
    let batch_ids = to_i64(&b["input_ids"]);
    let batch_mask = to_i64(&b["attention_mask"]);
    let padded: Vec<(Vec<u32>, Vec<bool>)> = (0..rows.min(2))
        .map(|r| {
            let span = r * lb..(r + 1) * lb;
            (
                batch_ids[span.clone()].iter().map(|&x| x as u32).collect(),
                batch_mask[span].iter().map(|&m| m != 0).collect(),
            )
        })
        .collect();
    let padded_pos: Vec<Vec<[i64; 3]>> = padded
        .iter()
        .map(|(ids, valid)| rope_index(ids, Some(valid), &[], &cfg).unwrap().positions)
        .collect();

    let seq = |n: usize| -> SeqInput<'_> {
        match n {
            0 => whole((19, 4), (0..l).into()),
            1 => SeqInput {
                embeds: embeds(19..l),
                positions: &pos[19..],
                key_valid: Some(&window_valid),
                prefix: Some(&prefix),
                keep_prefix: 0,
                suffix: None,
                keep_suffix: 0,
                logit_rows: (0..l - 19).into(),
            },
            2 => SeqInput {
                embeds: embeds(22..28),
                positions: &pos[22..28],
                key_valid: None,
                prefix: Some(&before),
                keep_prefix: 0,
                suffix: Some(&after),
                keep_suffix: 0,
                logit_rows: vec![5, 0, 3].into(),
            },
            3 | 4 => {
                let (ids, valid) = &padded[n - 3];
                SeqInput {
                    embeds: model.embed_tokens(ids).unwrap(),
                    positions: &padded_pos[n - 3],
                    key_valid: Some(valid),
                    prefix: None,
                    keep_prefix: 0,
                    suffix: None,
                    keep_suffix: 0,
                    logit_rows: (0..ids.len()).into(),
                }
            }
            _ => SeqInput {
                embeds: embeds(0..5),
                positions: &pos[..5],
                key_valid: None,
                prefix: None,
                keep_prefix: 0,
                suffix: None,
                keep_suffix: 2,
                logit_rows: (1..5).into(),
            },
        }
    };
    let n = 4 + padded.len();
    let all: Vec<SeqInput> = (0..n).map(seq).collect();
    let batched = model
        .forward(&all, None)
        .unwrap()
        .iter()
        .map(flat)
        .collect();
    let alone = (0..n)
        .map(|k| flat(&model.forward(&[seq(k)], None).unwrap()[0]))
        .collect();
    (batched, alone)
}

fn tensor_path(dtype: DType) -> DimpleModel {
    let mut model = DimpleModel::load(&golden(""), dtype, &Device::Cpu).unwrap();
    model.text.set_host_kernels(false).unwrap();
    model
}

/// Asserts `got` is within `tol` x max|want| of `want`.
fn assert_within(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{name}: worst |diff| {worst}, {:.2e} x max|ref| {scale}",
        worst / scale
    );
}

/// The tensor-op path in f32 (the GPU's path, forced on the CPU): a step of six mixed
/// sequences gives each exactly, bit for bit, what it gives alone (padding adds exact
/// zeros), and the host kernels' results.
#[test]
fn tensor_path_batch_equals_each_sequence_alone_and_the_host_kernels() {
    let model = tensor_path(DType::F32);
    let (batched, alone) = mixed_step(&model.text);
    for (n, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert!(b == a, "sequence {n}: batched and alone differ");
    }
    let (host, _) = mixed_step(&text_model());
    for (n, (b, h)) in batched.iter().zip(&host).enumerate() {
        assert_close(&format!("sequence {n} logits"), &b.logits, &h.logits);
        assert_eq!(b.caches.len(), h.caches.len(), "sequence {n}: kept caches");
        for (k, (bc, hc)) in b.caches.iter().zip(&h.caches).enumerate() {
            assert_close(&format!("sequence {n} cache {k}"), bc, hc);
        }
    }
}

/// The same step in f16 on the tensor path: batched equals alone bit for bit, and both
/// follow the f32 host kernels to f16 precision.
#[test]
fn tensor_path_batch_in_f16_equals_each_sequence_alone() {
    let model = tensor_path(DType::F16);
    let (batched, alone) = mixed_step(&model.text);
    for (n, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert!(b == a, "sequence {n}: batched and alone differ");
    }
    let (host, _) = mixed_step(&text_model());
    for (n, (b, h)) in batched.iter().zip(&host).enumerate() {
        assert_within(
            &format!("sequence {n} logits (f16)"),
            &b.logits,
            &h.logits,
            2e-2,
        );
    }
}
