//! One forward pass of the text decoder on CPU, on a Dimple-shaped random model
//! (`common::BENCH`: hidden 512, 4 layers, 8/2 heads, intermediate 1408, vocab 8192, f32).
//! Throughput is in tokens: criterion's "elements/s" is tokens per second.
//!
//! Cases: one sequence of 128 and of 512 tokens (logits for every row, as the reference
//! `model.forward` computes them), and 4 sequences of 128 packed into one call (what the
//! engine does when it batches). Run with
//! `cargo bench -p dimple-model --bench forward -- --quick`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dimple_model::{DimpleModel, SeqInput};

fn positions(len: usize) -> Vec<[i64; 3]> {
    (0..len as i64).map(|i| [i, i, i]).collect()
}

fn ids(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    // Ordinary vocabulary ids, away from the special ids at the top.
    (0..len)
        .map(|i| ((i * 7919 + salt * 104_729) % (vocab - 16)) as u32)
        .collect()
}

fn forward(model: &DimpleModel, seqs: &[(Vec<u32>, Vec<[i64; 3]>)]) -> usize {
    let inputs: Vec<SeqInput<'_>> = seqs
        .iter()
        .map(|(ids, pos)| SeqInput {
            embeds: model.text.embed_tokens(ids).expect("ids in the vocabulary"),
            positions: pos,
            key_valid: None,
            prefix: None,
            keep_prefix: 0,
            suffix: None,
            keep_suffix: 0,
            logit_rows: (0..ids.len()).into(),
        })
        .collect();
    let out = model.text.forward(&inputs, None).expect("forward pass");
    out.iter().map(|o| o.logits.dims()[0]).sum()
}

fn bench_forward(c: &mut Criterion) {
    let shape = common::BENCH;
    let ckpt = common::Checkpoint::write(&shape);
    let model = ckpt.load();
    eprintln!(
        "random Dimple-shaped model: {shape:?}, {:.1}M text parameters, f32, CPU",
        shape.text_params() as f64 / 1e6
    );

    let mut group = c.benchmark_group("text_forward");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for (label, count, len) in [
        ("1x128", 1, 128),
        ("1x512", 1, 512),
        ("4x128_packed", 4, 128),
    ] {
        let seqs: Vec<(Vec<u32>, Vec<[i64; 3]>)> = (0..count)
            .map(|s| (ids(len, shape.vocab, s), positions(len)))
            .collect();
        group.throughput(Throughput::Elements((count * len) as u64));
        group.bench_function(label, |b| {
            b.iter(|| black_box(forward(&model, black_box(&seqs))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
