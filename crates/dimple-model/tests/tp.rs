//! Tensor parallelism on CPU: the golden tiny model (4 query / 2 kv heads) sharded over 1, 2
//! and 4 rank threads (4 exceeds the kv heads: the replication path) reproduces every golden
//! forward case (text cases also on the tensor-op path), and degrees that cannot shard it
//! are refused with the valid ones.

mod common;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use common::*;
use dimple_model::{Checkpoint, Comm, DimpleModel, LocalComm, ModelError, SeqInput, rope_index};

/// Runs `f` on every rank of a `world`-rank group (one thread each, each with its own
/// shard of the golden model) and returns rank 0's result.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(&DimpleModel) -> T + Send + Sync + 'static,
) -> T {
    on_ranks_with(world, true, f)
}

/// [`on_ranks`] on the host kernels (`host_kernels`) or on the tensor-op path.
fn on_ranks_with<T: Send + 'static>(
    world: usize,
    host_kernels: bool,
    f: impl Fn(&DimpleModel) -> T + Send + Sync + 'static,
) -> T {
    let f = Arc::new(f);
    let threads: Vec<_> = LocalComm::group(world, Duration::from_secs(60))
        .into_iter()
        .map(|comm| {
            let f = f.clone();
            std::thread::spawn(move || {
                let comm: Arc<dyn Comm> = Arc::new(comm);
                let mut model = Checkpoint::Dir(golden(""))
                    .load(DType::F32, &Device::Cpu, comm)
                    .expect("shard loads");
                model.text.set_host_kernels(host_kernels).unwrap();
                f(&model)
            })
        })
        .collect();
    let mut results: Vec<T> = threads
        .into_iter()
        .map(|t| t.join().expect("rank thread"))
        .collect();
    results.swap_remove(0)
}

/// Hidden states (replicated on every rank) and full-vocabulary logits of one golden case,
/// computed by a sharded model.
fn sharded_forward(
    model: &DimpleModel,
    case: &str,
    images: &[usize],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = load_case(case);
    let cfg = model.config().clone();
    let l = t["input_ids"].dims2().unwrap().1;
    let (pv, grids) = if images.is_empty() {
        (None, Vec::new())
    } else {
        let (pv, g) = golden_pixels(images);
        (Some(pv), g)
    };
    let features = pv.map(|pv| model.encode_images(&pv, &grids).unwrap());
    let mut rows = Vec::new();
    for (ids, valid) in case_rows(&t) {
        let ri = rope_index(&ids, Some(&valid), &grids, &cfg).unwrap();
        let embeds = model.embed(&ids, features.as_ref()).unwrap();
        rows.push((embeds, ri.positions, valid));
    }
    let seqs: Vec<SeqInput> = rows
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
    let out = model.text.forward(&seqs, Some(&mut trace)).unwrap();
    let hidden = trace.iter().map(to_f32).collect();
    let logits = out
        .iter()
        .map(|o| {
            assert_eq!(
                o.logits.dims(),
                &[l, model.text.vocab_range().len()],
                "each rank holds its vocabulary slice"
            );
            to_f32(&model.text.gather_vocab(&o.logits).unwrap())
        })
        .collect();
    (hidden, logits)
}

fn check_case(world: usize, case: &'static str, images: &'static [usize]) {
    check_case_on(world, true, case, images);
}

fn check_case_on(world: usize, host_kernels: bool, case: &'static str, images: &'static [usize]) {
    let (hidden, logits) = on_ranks_with(world, host_kernels, move |m| {
        sharded_forward(m, case, images)
    });
    let t = load_case(case);
    let b = t["input_ids"].dims()[0];
    let l = t["input_ids"].dims()[1];
    for (k, h) in hidden.iter().enumerate() {
        let want = to_f32(&t[&format!("hidden_states.{k}")]);
        assert_close(&format!("tp {world} {case} hidden_states.{k}"), h, &want);
    }
    assert_eq!(logits.len(), b);
    for (row, got) in logits.iter().enumerate() {
        let want = to_f32(&t["logits"].get(row).unwrap());
        assert_eq!(got.len(), l * 384);
        assert_close(&format!("tp {world} {case} logits[{row}]"), got, &want);
    }
}

#[test]
fn text_forward_matches_reference_at_every_degree() {
    for world in [1, 2, 4] {
        check_case(world, "forward_text", &[]);
        check_case(world, "forward_text_batch", &[]);
    }
}

/// The same on the tensor-op path (forced on the CPU in f32): each rank's padded attention
/// batch runs over its own query and kv heads (at 4 ranks, one query head reading one
/// replicated kv head).
#[test]
fn text_forward_on_the_tensor_path_matches_reference_at_every_degree() {
    for world in [1, 2, 4] {
        check_case_on(world, false, "forward_text", &[]);
        check_case_on(world, false, "forward_text_batch", &[]);
    }
}

#[test]
fn image_forward_matches_reference_at_every_degree() {
    for world in [1, 2, 4] {
        check_case(world, "forward_image", &[1]);
        check_case(world, "forward_image2", &[1, 2]);
    }
}

/// Cached-prefix windows hold only the rank's kv heads and still give the full-sequence
/// logits.
#[test]
fn sharded_prefix_cache_window_equals_full_sequence() {
    for world in [2, 4] {
        let (window, full, cache_bytes) = on_ranks(world, |m| {
            let t = load_case("forward_text");
            let ids: Vec<u32> = to_i64(&t["input_ids"]).iter().map(|&x| x as u32).collect();
            let l = ids.len();
            let ri = rope_index(&ids, None, &[], m.config()).unwrap();
            let embeds = m.embed(&ids, None).unwrap();
            let p = 19;
            let seq = SeqInput {
                embeds: embeds.clone(),
                positions: &ri.positions,
                key_valid: None,
                prefix: None,
                keep_prefix: p,
                suffix: None,
                keep_suffix: 0,
                logit_rows: (0..l).into(),
            };
            let out = m.text.forward(&[seq], None).unwrap();
            let cache = out[0].cache.as_ref().unwrap();
            let seq = SeqInput {
                embeds: embeds.narrow(0, p, l - p).unwrap(),
                positions: &ri.positions[p..],
                key_valid: None,
                prefix: Some(cache),
                keep_prefix: 0,
                suffix: None,
                keep_suffix: 0,
                logit_rows: (0..l - p).into(),
            };
            let win = m.text.forward(&[seq], None).unwrap();
            let full = m
                .text
                .gather_vocab(&out[0].logits.narrow(0, p, l - p).unwrap())
                .unwrap();
            (
                to_f32(&m.text.gather_vocab(&win[0].logits).unwrap()),
                to_f32(&full),
                cache.bytes(),
            )
        });
        assert_close(&format!("tp {world} window"), &window, &full);
        // 2 layers x (k, v) x 1 local kv head x 16 x 19 positions x 4 bytes.
        assert_eq!(
            cache_bytes,
            2 * 2 * 16 * 19 * 4,
            "tp {world}: one kv head per rank"
        );
        assert_eq!(
            cache_bytes,
            dimple_model::kv_cache_bytes_per_rank(&config(), 19, DType::F32, world)
        );
    }
}

#[test]
fn a_degree_that_cannot_shard_the_model_is_refused() {
    let cfg = config();
    assert_eq!(dimple_model::valid_degrees(&cfg), vec![1, 2, 4]);
    let err = dimple_model::check_degree(&cfg, 3).unwrap_err();
    assert!(
        matches!(err, ModelError::InvalidDegree { degree: 3, ref valid, .. } if valid == &vec![1, 2, 4]),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("degree 3") && msg.contains("valid degrees: 1, 2, 4"),
        "{msg}"
    );
    // 8 ranks for 4 query heads.
    let msg = dimple_model::check_degree(&cfg, 8).unwrap_err().to_string();
    assert!(
        msg.contains("num_attention_heads 4 is not divisible by 8"),
        "{msg}"
    );
    // Loading a shard for such a group fails the same way, before any communication.
    let comm: Arc<dyn Comm> = Arc::new(LocalComm::group(3, Duration::from_secs(1)).swap_remove(0));
    let err = Checkpoint::Dir(golden(""))
        .load(DType::F32, &Device::Cpu, comm)
        .err()
        .expect("refused");
    assert!(
        matches!(err, ModelError::InvalidDegree { degree: 3, .. }),
        "{err}"
    );
}

#[test]
fn vocab_parallel_embedding_is_exact() {
    // Every id's embedding at 4 ranks equals the checkpoint row bit for bit: exactly one
    // rank contributes a non-zero row, so the all-reduce adds only zeros.
    let ids: Vec<u32> = (0..384).collect();
    let got = on_ranks(4, move |m| to_f32(&m.text.embed_tokens(&ids).unwrap()));
    let w = candle_core::safetensors::load(golden("model.safetensors"), &Device::Cpu).unwrap();
    let want = to_f32(&w["model.embed_tokens.weight"]);
    assert_eq!(got, want);
}
