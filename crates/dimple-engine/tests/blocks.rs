//! Block-wise decoding and the cache modes.
//!
//! - Exact and dual-cache block decoding through the engine equal a plain reference written
//!   here: the model's forward called directly, every step, with the block rule applied
//!   (only the current block's masked slots are scored and committed; the request's policy
//!   runs over the block's step budget and the block's mask count at its start). The
//!   reference's dual cache is cut out of a whole pass that keeps every position, so the
//!   engine's own prefix/suffix split is checked too; at every in-block step the reference
//!   also checks that caches refreshed from the current tokens would reproduce a fresh
//!   whole pass, and that the stale ones it uses differ from it somewhere.
//! - With one block, `dual` is the official prefilling and `block_length` = the response is
//!   today's decoding (golden histories).
//! - Mixed cache modes and block lengths share forward passes without changing any result.
//! - Dual caches are charged to the pool and given back on cancel.

mod support;

use candle_core::Tensor;
use dimple_core::params::{CacheMode, DecodeParams, Pipeline, StructurePrior};
use dimple_engine::policy::{Policy, StepOutcome, request_rng};
use dimple_engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest};
use dimple_model::{DimpleModel, KvCache, SeqInput, rope_index};
use support::*;

/// What the reference produced: the response after each step and the block of each step.
#[derive(Debug)]
struct RefRun {
    history: Vec<Vec<u32>>,
    blocks: Vec<usize>,
    /// In-block dual steps whose stale caches gave logits away from a fresh whole pass.
    stale_steps: usize,
    window_steps: usize,
}

fn input<'a>(
    embeds: Tensor,
    positions: &'a [[i64; 3]],
    prefix: Option<&'a KvCache>,
    suffix: Option<&'a KvCache>,
    keep_prefix: usize,
    rows: Vec<usize>,
) -> SeqInput<'a> {
    SeqInput {
        embeds,
        positions,
        key_valid: None,
        prefix,
        keep_prefix,
        suffix,
        keep_suffix: 0,
        logit_rows: rows.into(),
    }
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// Keys/values of positions `[from, from + n)` of a whole-sequence cache (`None` when empty).
fn cut(all: &KvCache, from: usize, n: usize) -> Option<KvCache> {
    (n > 0).then(|| {
        KvCache::new(
            all.layers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.narrow(1, from, n).unwrap().contiguous().unwrap(),
                        v.narrow(1, from, n).unwrap().contiguous().unwrap(),
                    )
                })
                .collect(),
        )
    })
}

fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = b.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Text-only requests decoded by calling the model directly (exact or dual cache).
fn reference(model: &DimpleModel, req: &GenerateRequest) -> RefRun {
    let params = &req.params;
    let mode = params.cache_mode();
    assert!(
        mode != CacheMode::Prefix,
        "the reference covers exact and dual"
    );
    let cfg = model.config();
    let text = &model.text;
    let p = req.prompt_ids.len();
    let n = params.max_new_tokens;
    let mut ids = req.prompt_ids.clone();
    ids.extend(params.initial_response(cfg.mask_token_id));
    let l = ids.len();
    let fixed: Vec<bool> = (0..n)
        .map(|j| params.prior.fixed.iter().any(|&(q, _)| q == j))
        .collect();
    let positions = rope_index(&ids, None, &[], cfg).unwrap().positions;
    let plan = params.block_plan();
    let policy = Policy::new(&DecodeParams {
        steps: plan.steps_per_block,
        ..params.clone()
    })
    .unwrap();
    let mut rng = request_rng(params.seed);
    let mask = cfg.mask_token_id;
    let masked_in = |ids: &[u32], r: std::ops::Range<usize>| -> Vec<usize> {
        r.filter(|&j| !fixed[j] && ids[p + j] == mask).collect()
    };
    let full_rows = |ids: &[u32], slots: &[usize]| -> Vec<Vec<f32>> {
        let out = text
            .forward(
                &[input(
                    text.embed_tokens(ids).unwrap(),
                    &positions,
                    None,
                    None,
                    0,
                    slots.iter().map(|&j| p - 1 + j).collect(),
                )],
                None,
            )
            .unwrap();
        rows_of(&out[0].logits)
    };
    let mut run = RefRun {
        history: Vec::new(),
        blocks: Vec::new(),
        stale_steps: 0,
        window_steps: 0,
    };
    for b in 0..plan.num_blocks {
        let r = plan.block(b, n);
        let total = masked_in(&ids, r.clone()).len();
        if total == 0 {
            continue;
        }
        let (before, after) = (p - 1 + r.start, p + r.end);
        let mut caches: Option<(Option<KvCache>, Option<KvCache>)> = None;
        for k in 0..plan.steps_per_block {
            let slots = masked_in(&ids, r.clone());
            let logits = match (&caches, mode) {
                (Some((pre, suf)), CacheMode::Dual) => {
                    let window = |pre: Option<&KvCache>, suf: Option<&KvCache>| {
                        let out = text
                            .forward(
                                &[input(
                                    text.embed_tokens(&ids[before..after]).unwrap(),
                                    &positions[before..after],
                                    pre,
                                    suf,
                                    0,
                                    slots.iter().map(|&j| j - r.start).collect(),
                                )],
                                None,
                            )
                            .unwrap();
                        rows_of(&out[0].logits)
                    };
                    let got = window(pre.as_ref(), suf.as_ref());
                    if !slots.is_empty() {
                        // Caches refreshed from the current tokens reproduce a fresh pass;
                        // the stale ones in use are the approximation.
                        let fresh = full_rows(&ids, &slots);
                        let all = keep_all(model, &ids, &positions);
                        let (fp, fs) = (cut(&all, 0, before), cut(&all, after, l - after));
                        let refreshed = window(fp.as_ref(), fs.as_ref());
                        let d = max_rel_diff(&refreshed, &fresh);
                        assert!(d <= 1e-4, "refreshed window vs whole pass: {d:.2e}");
                        run.window_steps += 1;
                        if max_rel_diff(&got, &fresh) > 1e-3 {
                            run.stale_steps += 1;
                        }
                    }
                    got
                }
                _ => {
                    if mode == CacheMode::Dual {
                        // The block's first step: a whole pass that refreshes the caches.
                        let all = keep_all(model, &ids, &positions);
                        caches = Some((cut(&all, 0, before), cut(&all, after, l - after)));
                    }
                    full_rows(&ids, &slots)
                }
            };
            let scores: Vec<_> = logits
                .iter()
                .map(|row| policy.score(row, &mut rng).unwrap())
                .collect();
            let d = policy.decide(k, total, &scores, &mut rng).unwrap();
            let mut committed = 0;
            for &i in &d.commit {
                ids[p + slots[i]] = scores[i].x0;
                committed += usize::from(scores[i].x0 != mask);
            }
            run.history.push(ids[p..].to_vec());
            run.blocks.push(b);
            if let StepOutcome::Finished(_) = policy.after_step(k, slots.len() - committed) {
                break;
            }
        }
    }
    run
}

/// Keys/values of every position of `ids` from one whole pass.
fn keep_all(model: &DimpleModel, ids: &[u32], positions: &[[i64; 3]]) -> KvCache {
    let out = model
        .text
        .forward(
            &[input(
                model.text.embed_tokens(ids).unwrap(),
                positions,
                None,
                None,
                ids.len(),
                vec![0],
            )],
            None,
        )
        .unwrap();
    out.into_iter().next().unwrap().cache.unwrap()
}

/// The engine's step history, block of each step, and final message.
fn decode(engine: &EngineHandle, req: &GenerateRequest) -> (Outcome, Vec<usize>) {
    let mut rx = engine.submit(req.clone()).expect("valid request");
    let mut row = initial_row(req, GOLDEN_MASK_ID);
    let mut history = Vec::new();
    let mut blocks = Vec::new();
    loop {
        match recv_within(&mut rx, WAIT).expect("the request ends in time") {
            EngineEvent::Step {
                step,
                block,
                committed,
            } => {
                assert_eq!(step, history.len());
                for (pos, tok) in committed {
                    row[pos] = tok;
                }
                history.push(row.clone());
                blocks.push(block);
            }
            EngineEvent::Finished(f) => {
                assert_eq!(f.response_ids, row);
                return (
                    Outcome {
                        history,
                        finished: f,
                    },
                    blocks,
                );
            }
            EngineEvent::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

fn request(
    prompt: &str,
    n: usize,
    steps: usize,
    block: usize,
    threshold: Option<f32>,
    cache: CacheMode,
) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: golden_prompt(prompt),
        images: Vec::new(),
        params: DecodeParams {
            max_new_tokens: n,
            steps,
            threshold,
            block_length: Some(block),
            cache: Some(cache),
            ..DecodeParams::default()
        },
        deadline: None,
    }
}

/// Block settings that cover even blocks, a ragged last block, fewer steps than slots, a
/// threshold, a structure prior (one block wholly fixed) and the dream pipeline.
fn block_requests(cache: CacheMode) -> Vec<GenerateRequest> {
    let mut reqs = vec![
        request("p_text", 24, 24, 8, None, cache),
        request("p_text", 24, 24, 8, Some(0.9), cache),
        request("p_text_b", 22, 12, 10, None, cache),
        request("p_text", 16, 16, 4, Some(0.5), cache),
    ];
    let mut prior = request("p_text_b", 16, 16, 4, Some(0.7), cache);
    prior.params.prior = StructurePrior {
        fixed: vec![(4, 11), (5, 22), (6, 33), (7, 307), (12, 307)],
    };
    reqs.push(prior);
    let mut dream = request("p_text", 16, 8, 8, None, cache);
    dream.params.pipeline = Pipeline::Dream;
    dream.params.use_original_confidence = false;
    reqs.push(dream);
    reqs
}

fn check_against_reference(cache: CacheMode) -> Vec<RefRun> {
    let model = model();
    let engine = engine(EngineConfig::default());
    let mut runs = Vec::new();
    for (i, req) in block_requests(cache).iter().enumerate() {
        let want = reference(&model, req);
        let (got, blocks) = decode(&engine, req);
        assert_eq!(got.history, want.history, "{cache} request {i}: history");
        assert_eq!(
            blocks, want.blocks,
            "{cache} request {i}: block of each step"
        );
        assert_eq!(
            got.finished.steps,
            want.history.len(),
            "{cache} request {i}"
        );
        let plan = req.params.block_plan();
        assert!(
            blocks.last() == Some(&(plan.num_blocks - 1)),
            "{cache} request {i}: decoding reaches the last block"
        );
        runs.push(want);
    }
    engine.shutdown();
    runs
}

#[test]
fn exact_block_decoding_equals_the_reference() {
    let runs = check_against_reference(CacheMode::Exact);
    // The block rule is in force: the first step of a multi-block request commits
    // nothing outside block 0.
    let first = &runs[0].history[0];
    assert!(first[8..].iter().all(|&t| t == GOLDEN_MASK_ID));
    assert!(first[..8].iter().any(|&t| t != GOLDEN_MASK_ID));
}

#[test]
fn dual_cache_decoding_equals_the_reference_and_is_stale_only_within_blocks() {
    let runs = check_against_reference(CacheMode::Dual);
    let window_steps: usize = runs.iter().map(|r| r.window_steps).sum();
    let stale_steps: usize = runs.iter().map(|r| r.stale_steps).sum();
    assert!(
        window_steps > 10,
        "in-block window steps ran ({window_steps})"
    );
    assert!(
        stale_steps > 0,
        "the dual cache is an approximation within blocks ({stale_steps} stale steps)"
    );
}

/// With one block, `dual` is the official prefilling and an explicit whole-response block
/// changes nothing: both reproduce the golden histories.
#[test]
fn one_block_is_the_official_decoding() {
    let engine = engine(EngineConfig::default());
    let mut checked = 0;
    for case in single_cases() {
        if case.name.contains("image") || case.name.contains("n24") {
            continue;
        }
        let mut req = case.request.clone();
        req.params.block_length = Some(req.params.max_new_tokens);
        if req.params.use_cache {
            req.params.cache = Some(CacheMode::Dual);
        }
        let (out, blocks) = decode(&engine, &req);
        assert_eq!(out.history, case.history, "{}", case.name);
        assert!(blocks.iter().all(|&b| b == 0));
        checked += 1;
    }
    assert!(checked >= 8, "{checked} cases");
    engine.shutdown();
}

/// Exact, prefix and dual requests with different block lengths (some sampling) decode
/// alone, all together, and with passes split by a token budget: every history is the same.
#[test]
fn mixed_cache_modes_share_passes_without_changing_results() {
    mixed_cache_modes(model);
}

/// The same on the tensor-op path, where a pass's prefix and suffix caches of every
/// sequence feed one padded attention batch.
#[test]
fn mixed_cache_modes_share_passes_on_the_tensor_path() {
    mixed_cache_modes(tensor_path_model);
}

fn mixed_cache_modes(model: fn() -> DimpleModel) {
    let mut reqs = block_requests(CacheMode::Exact);
    reqs.extend(block_requests(CacheMode::Dual));
    reqs.extend(block_requests(CacheMode::Prefix).into_iter().take(3));
    for (i, r) in reqs.iter_mut().enumerate().filter(|(i, _)| i % 4 == 1) {
        r.params.temperature = 0.8;
        r.params.top_p = Some(0.9);
        r.params.seed = i as u64;
    }
    let modes: Vec<CacheMode> = reqs.iter().map(|r| r.params.cache_mode()).collect();
    for m in [CacheMode::Exact, CacheMode::Prefix, CacheMode::Dual] {
        assert!(modes.contains(&m));
    }
    let run_all = |engine: &EngineHandle| -> Vec<Outcome> {
        let rxs: Vec<_> = reqs
            .iter()
            .map(|r| engine.submit(r.clone()).expect("valid request"))
            .collect();
        rxs.into_iter()
            .zip(&reqs)
            .map(|(rx, r)| collect_within(rx, initial_row(r, GOLDEN_MASK_ID)))
            .collect()
    };
    let solo_engine = dimple_engine::start(
        model(),
        EngineConfig {
            max_active: 1,
            ..EngineConfig::default()
        },
        None,
    );
    let solo = run_all(&solo_engine);
    solo_engine.shutdown();
    let budget = 64;
    for (label, cfg) in [
        ("together", EngineConfig::default()),
        (
            "split",
            EngineConfig {
                max_step_tokens: budget,
                ..EngineConfig::default()
            },
        ),
    ] {
        let (engine, log) = engine_with_log_on(model(), cfg);
        let got = run_all(&engine);
        for (i, (a, b)) in solo.iter().zip(&got).enumerate() {
            assert_eq!(b.history, a.history, "{label}: request {i} ({})", modes[i]);
            assert_eq!(b.finished.steps, a.finished.steps, "{label}: request {i}");
            assert_eq!(b.finished.finish_reason, a.finished.finish_reason);
        }
        let log = log.lock().unwrap();
        assert!(
            log.iter().any(|r| r.batch_size >= 3),
            "{label}: requests shared passes"
        );
        if label == "split" {
            // Packed passes keep to the budget (dual windows are only block + 1 tokens).
            assert!(log.iter().any(|r| r.batch_size > 1));
            for r in log.iter().filter(|r| r.batch_size > 1) {
                assert!(r.tokens <= budget, "{label}: a pass of {} tokens", r.tokens);
            }
        }
        engine.shutdown();
    }
}

/// Keys/values one position of the golden model takes: K and V, 2 layers, 2 kv heads of 16
/// dims, f32 (README "Model").
const BYTES_PER_POSITION: usize = 2 * 2 * 2 * 16 * 4;

#[test]
fn dual_caches_are_charged_to_the_pool_and_freed_on_cancel() {
    let p = golden_prompt("p_text").len();
    // Blocks of 100, 100 and 50: between steps the dual cache holds everything outside the
    // window, most in the short last block: p - 1 + 250 - 50 positions.
    let dual = request("p_text", 250, 250, 100, None, CacheMode::Dual);
    let dual_bytes = (p - 1 + 250 - 50) * BYTES_PER_POSITION;
    let prefix = request("p_text", 250, 250, 100, None, CacheMode::Prefix);
    let prefix_bytes = (p - 1) * BYTES_PER_POSITION;
    let exact = request("p_text", 250, 250, 100, None, CacheMode::Exact);
    assert_eq!(
        dimple_engine::cached_positions(&dual.params, p) * BYTES_PER_POSITION,
        dual_bytes
    );

    // A budget that holds the prefix cache but not the dual one refuses the dual request.
    let small = engine(EngineConfig {
        cache_budget_bytes: dual_bytes - 1,
        ..EngineConfig::default()
    });
    match small.submit(dual.clone()) {
        Err(dimple_engine::EngineError::CacheImpossible { needed, .. }) => {
            assert_eq!(needed, dual_bytes)
        }
        other => panic!("expected CacheImpossible, got {:?}", other.map(|_| ())),
    }
    assert!(small.submit(prefix.clone()).is_ok());
    small.shutdown();

    let engine = engine(EngineConfig::default());
    let mut rxs: Vec<_> = [&dual, &dual, &prefix, &exact]
        .iter()
        .map(|r| engine.submit((*r).clone()).unwrap())
        .collect();
    for rx in &mut rxs {
        match recv_within(rx, WAIT) {
            Some(EngineEvent::Step { step: 0, .. }) => {}
            other => panic!("expected the first step, got {other:?}"),
        }
    }
    let held = 2 * dual_bytes + prefix_bytes;
    wait_until("every cache is accounted", WAIT, || {
        let s = engine.stats();
        s.cache_used_bytes == held && s.active == 4
    });
    // Cancel one dual request mid-block: exactly its reservation comes back.
    drop(rxs.remove(0));
    wait_until("the cancelled dual request frees its cache", WAIT, || {
        let s = engine.stats();
        s.cache_used_bytes == held - dual_bytes && s.active == 3
    });
    drop(rxs);
    wait_until("all caches are free", WAIT, || {
        let s = engine.stats();
        s.cache_used_bytes == 0 && s.active == 0
    });
    assert!(
        engine.stats().forward_passes < 250,
        "the requests were cancelled, not completed"
    );
    // The engine goes on serving dual requests exactly.
    let model = model();
    let req = &block_requests(CacheMode::Dual)[0];
    let (out, _) = decode(&engine, req);
    assert_eq!(out.history, reference(&model, req).history);
    engine.shutdown();
}

/// Under tensor parallelism each rank keeps its kv heads of the dual cache: a group of two
/// decodes the block requests of every cache mode as the single model does.
#[test]
fn block_decoding_across_two_ranks() {
    let mut reqs = block_requests(CacheMode::Dual);
    reqs.extend(block_requests(CacheMode::Exact).into_iter().take(2));
    let one = engine(EngineConfig::default());
    let two = dimple_engine::start_group(
        &dimple_model::Checkpoint::Dir(golden("")),
        dimple_engine::GroupConfig::cpu(2),
        EngineConfig::default(),
        None,
    )
    .expect("group starts");
    for (i, req) in reqs.iter().enumerate() {
        let (a, blocks_a) = decode(&one, req);
        let (b, blocks_b) = decode(&two, req);
        assert_eq!(b.history, a.history, "request {i}");
        assert_eq!(blocks_b, blocks_a, "request {i}");
    }
    // Each rank holds half of the kv heads.
    let dual = &reqs[0];
    let rx = two.submit(dual.clone()).unwrap();
    let p = dual.prompt_ids.len();
    let half = dimple_engine::cached_positions(&dual.params, p) * BYTES_PER_POSITION / 2;
    let mut rx = rx;
    assert!(matches!(
        recv_within(&mut rx, WAIT),
        Some(EngineEvent::Step { .. })
    ));
    wait_until("the rank share is accounted", WAIT, || {
        two.stats().cache_used_bytes == half
    });
    drop(rx);
    wait_until("the cache is free", WAIT, || {
        two.stats().cache_used_bytes == 0
    });
    one.shutdown();
    two.shutdown();
}
