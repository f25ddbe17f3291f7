//! Engine throughput on CPU: response tokens per second for 1, 4 and 16 concurrent requests
//! against the same requests run one by one, with the prefix cache off and on, on a
//! Dimple-shaped random model (`common::BENCH`: hidden 512, 4 layers, 8/2 heads,
//! intermediate 1408, vocab 8192, f32). Every request has a 64-token prompt and 32 response
//! tokens, 32 steps, no threshold: the schedule commits one token per step (two on the
//! second-to-last), so every request takes 31 forward passes whatever its neighbours.
//!
//! A plain `harness = false` program that prints a table, because concurrent throughput is
//! one wall-clock measurement per configuration, not a closure to iterate:
//! `cargo bench -p dimple-engine --bench engine` runs one round (about 1 minute on 2 idle
//! cores; `--quick` is accepted and changes nothing); `-- --rounds N` keeps the best of N
//! rounds, cache off and on alternating so that load from other processes hits both alike.
//! Without `--bench` on its command line (as under `cargo test --benches`) it runs a
//! seconds-long smoke check on a tiny model instead.

#[path = "../../dimple-model/benches/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use dimple_core::params::DecodeParams;
use dimple_engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest};

const PROMPT: usize = 64;
const RESPONSE: usize = 32;
const CONCURRENCY: [usize; 3] = [1, 4, 16];

fn requests(
    count: usize,
    prompt: usize,
    response: usize,
    use_cache: bool,
    vocab: usize,
) -> Vec<GenerateRequest> {
    (0..count)
        .map(|r| GenerateRequest {
            // Ordinary ids, away from the special ids at the top of the vocabulary.
            prompt_ids: (0..prompt)
                .map(|i| ((i * 7919 + r * 104_729 + 13) % (vocab - 16)) as u32)
                .collect(),
            images: Vec::new(),
            params: DecodeParams {
                max_new_tokens: response,
                steps: response,
                use_cache,
                ..DecodeParams::default()
            },
            deadline: None,
        })
        .collect()
}

/// Submits all of `reqs` at once and waits for every answer; returns the wall time and the
/// responses (tokens, forward passes) in order.
fn run(engine: &EngineHandle, reqs: &[GenerateRequest]) -> (Duration, Vec<(Vec<u32>, usize)>) {
    let started = Instant::now();
    let rxs: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("valid request"))
        .collect();
    let mut out = Vec::with_capacity(reqs.len());
    for mut rx in rxs {
        loop {
            match rx.blocking_recv().expect("a final event") {
                EngineEvent::Step { .. } => {}
                EngineEvent::Finished(f) => {
                    out.push((f.response_ids, f.steps));
                    break;
                }
                EngineEvent::Failed(e) => panic!("request failed: {e}"),
            }
        }
    }
    (started.elapsed(), out)
}

struct Row {
    cache: bool,
    concurrency: usize,
    sequential: Duration,
    batched: Duration,
    /// Token rows the model processed in the batched run (prompt and response, all steps).
    batched_rows: usize,
}

impl Row {
    fn tokens(&self) -> f64 {
        (self.concurrency * RESPONSE) as f64
    }
    fn seq_rate(&self) -> f64 {
        self.tokens() / self.sequential.as_secs_f64()
    }
    fn batched_rate(&self) -> f64 {
        self.tokens() / self.batched.as_secs_f64()
    }
    fn batched_rows_rate(&self) -> f64 {
        self.batched_rows as f64 / self.batched.as_secs_f64()
    }
}

fn measure(ckpt: &common::Checkpoint, cache: bool, vocab: usize) -> Vec<Row> {
    let most = *CONCURRENCY.iter().max().unwrap_or(&1);
    let reqs = requests(most, PROMPT, RESPONSE, cache, vocab);
    let engine = dimple_engine::start(ckpt.load(), EngineConfig::default(), None);
    // Warm-up: first-touch allocations and thread pools.
    run(&engine, &reqs[..1]);

    // One by one: each request alone on the engine.
    let mut alone = Vec::with_capacity(most);
    let mut alone_out = Vec::with_capacity(most);
    for r in &reqs {
        let (t, out) = run(&engine, std::slice::from_ref(r));
        alone.push(t);
        alone_out.extend(out);
    }

    let mut rows = Vec::new();
    for c in CONCURRENCY {
        let (batched, out) = run(&engine, &reqs[..c]);
        assert_eq!(out, alone_out[..c], "batching changed a result");
        // Step 0 runs the whole sequence; with the cache, later steps run the last prompt
        // token and the response only.
        let batched_rows = out
            .iter()
            .map(|(_, steps)| {
                let later = if cache {
                    RESPONSE + 1
                } else {
                    PROMPT + RESPONSE
                };
                PROMPT + RESPONSE + steps.saturating_sub(1) * later
            })
            .sum();
        rows.push(Row {
            cache,
            concurrency: c,
            sequential: alone[..c].iter().sum(),
            batched,
            batched_rows,
        });
    }
    engine.shutdown();
    rows
}

fn smoke() {
    let ckpt = common::Checkpoint::write(&common::TINY);
    let engine = dimple_engine::start(ckpt.load(), EngineConfig::default(), None);
    for cache in [false, true] {
        let reqs = requests(2, 8, 4, cache, common::TINY.vocab);
        let (_, together) = run(&engine, &reqs);
        let alone: Vec<(Vec<u32>, usize)> = reqs
            .iter()
            .flat_map(|r| run(&engine, std::slice::from_ref(r)).1)
            .collect();
        assert_eq!(together, alone, "batching changed a result");
    }
    engine.shutdown();
    println!(
        "engine bench: smoke check passed (run `cargo bench -p dimple-engine --bench engine` to measure)"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map_or(1, |n| n.parse().expect("--rounds takes a positive integer"))
        .max(1);
    let shape = common::BENCH;
    let ckpt = common::Checkpoint::write(&shape);
    println!(
        "engine throughput, random Dimple-shaped model {shape:?} ({:.1}M text parameters, f32, CPU, {} threads)",
        shape.text_params() as f64 / 1e6,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "requests: {PROMPT}-token prompt, {RESPONSE} response tokens, {RESPONSE} steps, no threshold; best of {rounds}"
    );
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for _ in 0..rounds {
        for cache in [false, true] {
            for r in measure(&ckpt, cache, shape.vocab) {
                match rows
                    .iter_mut()
                    .find(|b| b.cache == r.cache && b.concurrency == r.concurrency)
                {
                    None => rows.push(r),
                    Some(b) => {
                        b.sequential = b.sequential.min(r.sequential);
                        if r.batched < b.batched {
                            (b.batched, b.batched_rows) = (r.batched, r.batched_rows);
                        }
                    }
                }
            }
        }
    }
    rows.sort_by_key(|r| (r.cache, r.concurrency));

    println!();
    println!("response tokens per second; the last column counts every token row the model ran");
    println!(
        "| cache | concurrent | one by one tok/s | batched tok/s | batched / one by one | batched model rows/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2}x | {:.0} |",
            if r.cache { "on" } else { "off" },
            r.concurrency,
            r.seq_rate(),
            r.batched_rate(),
            r.batched_rate() / r.seq_rate(),
            r.batched_rows_rate()
        );
    }
    println!();
    println!("| concurrent | cache on / off, one by one | cache on / off, batched |");
    println!("|---:|---:|---:|");
    for c in CONCURRENCY {
        let off = rows.iter().find(|r| !r.cache && r.concurrency == c);
        let on = rows.iter().find(|r| r.cache && r.concurrency == c);
        if let (Some(off), Some(on)) = (off, on) {
            println!(
                "| {c} | {:.2}x | {:.2}x |",
                on.seq_rate() / off.seq_rate(),
                on.batched_rate() / off.batched_rate()
            );
        }
    }
    println!();
    println!(
        "total benchmark time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
