//! One forward step of the text decoder sharded over 1 and 2 CPU rank threads
//! (`LocalComm`), on a Dimple-shaped model with pseudo-random weights (hidden 512, 4 layers,
//! 8/2 heads, intermediate 1408, vocab 8192, f32; the shape of `benches/forward.rs`).
//!
//! A step is what the engine runs: 4 sequences of 128 tokens packed into one call, logits
//! for the 32 response rows of each. On a 2-core machine two ranks cannot gain much; the
//! point is the cost of the communication (two all-reduces of `[512, 512]` per layer, one
//! for the embeddings). `all_reduce_512x512` measures one such collective alone. Run with
//! `cargo bench -p dimple-model --bench tp -- --quick`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dimple_model::{Checkpoint, Comm, DimpleConfig, DimpleModel, LocalComm, SeqInput};

const SEQS: usize = 4;
const LEN: usize = 128;
const RESPONSE: usize = 32;

fn config() -> DimpleConfig {
    DimpleConfig::from_json(
        r#"{"num_key_value_heads": 2, "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
            "intermediate_size": 1408, "vocab_size": 8192, "mrope_section": [8, 12, 12],
            "image_token_id": 8186, "video_token_id": 8187, "vision_start_token_id": 8188,
            "vision_end_token_id": 8189, "vision_token_id": 8190, "mask_token_id": 8191,
            "pad_token_id": 8185, "eos_token_id": 8185,
            "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 512, "fullatt_block_indexes": [0]}}"#,
    )
    .expect("bench config is valid")
}

fn step(model: &DimpleModel, positions: &[[i64; 3]]) -> usize {
    let inputs: Vec<SeqInput<'_>> = (0..SEQS)
        .map(|s| {
            let ids: Vec<u32> = (0..LEN)
                .map(|i| ((i * 7919 + s * 104_729) % 8000) as u32)
                .collect();
            SeqInput {
                embeds: model
                    .text
                    .embed_tokens(&ids)
                    .expect("ids in the vocabulary"),
                positions,
                key_valid: None,
                prefix: None,
                keep_prefix: 0,
                suffix: None,
                keep_suffix: 0,
                logit_rows: (LEN - RESPONSE..LEN).into(),
            }
        })
        .collect();
    let out = model.text.forward(&inputs, None).expect("forward pass");
    out.iter().map(|o| o.logits.dims()[0]).sum()
}

/// Rank threads that run one step each time they are told to.
struct Ranks {
    go: Vec<Sender<()>>,
    done: Receiver<usize>,
}

impl Ranks {
    fn start(world: usize) -> Ranks {
        let (done_tx, done) = channel();
        let go = LocalComm::group(world, Duration::from_secs(60))
            .into_iter()
            .map(|comm| {
                let (tx, rx) = channel::<()>();
                let done_tx = done_tx.clone();
                std::thread::spawn(move || {
                    let comm: Arc<dyn Comm> = Arc::new(comm);
                    let model = Checkpoint::Random(Box::new(config()))
                        .load(DType::F32, &Device::Cpu, comm)
                        .expect("shard");
                    let positions: Vec<[i64; 3]> = (0..LEN as i64).map(|i| [i, i, i]).collect();
                    while rx.recv().is_ok() {
                        let _ = done_tx.send(step(&model, &positions));
                    }
                });
                tx
            })
            .collect();
        Ranks { go, done }
    }

    fn step(&self) -> usize {
        for g in &self.go {
            let _ = g.send(());
        }
        (0..self.go.len())
            .map(|_| self.done.recv().expect("rank alive"))
            .sum()
    }
}

fn bench_tp(c: &mut Criterion) {
    let mut group = c.benchmark_group("tp_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements((SEQS * LEN) as u64));
    for world in [1, 2] {
        let ranks = Ranks::start(world);
        ranks.step();
        group.bench_function(format!("tp{world}_4x128"), |b| {
            b.iter(|| black_box(ranks.step()))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("collective");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let (tx, rx) = channel::<()>();
    let (done_tx, done) = channel::<()>();
    let mut comms = LocalComm::group(2, Duration::from_secs(60));
    let peer = comms.pop().expect("two ranks");
    let me = comms.pop().expect("two ranks");
    let x = Tensor::ones((SEQS * LEN, 512), DType::F32, &Device::Cpu).expect("tensor");
    let xp = x.clone();
    std::thread::spawn(move || {
        while rx.recv().is_ok() {
            let _ = peer.all_reduce_sum(&xp);
            let _ = done_tx.send(());
        }
    });
    group.bench_function("all_reduce_512x512_tp2", |b| {
        b.iter(|| {
            let _ = tx.send(());
            let y = me.all_reduce_sum(&x).expect("all-reduce");
            done.recv().expect("peer alive");
            black_box(y)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_tp);
criterion_main!(benches);
