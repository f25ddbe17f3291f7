//! Batch invariance: a request's step history and final tokens do not depend on what it is
//! decoded with. Every request is first decoded alone (an engine that admits one at a time);
//! then all of them go to one engine at once, at staggered times, and with a token budget
//! per forward pass small enough to split steps. Each run must reproduce the solo results
//! exactly. The requests are the golden single cases plus random ones that mix every
//! algorithm, both pipelines, thresholds, the prefix cache, sampling and structure priors.

mod support;

use std::collections::HashSet;

use dimple_core::params::{Alg, DecodeParams, Pipeline, StructurePrior};
use dimple_engine::{EngineConfig, EngineHandle, GenerateRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;

/// Random text ids of the tiny golden model lie in [0, 300) (README section B).
const TEXT_IDS: u32 = 300;
/// The end-of-text id, a typical structure-prior token (README, `gen_prior_*`).
const EOS: u32 = 307;

const DIM_ALGS: [Alg; 6] = [
    Alg::MaskgitPlus,
    Alg::TopkMargin,
    Alg::Entropy,
    Alg::Autoregressive,
    Alg::Origin,
    Alg::OriginRatio,
];
const THRESHOLDS: [Option<f32>; 4] = [None, Some(0.3), Some(0.7), Some(0.9)];

/// Request `i` of the random set. Features cycle with different periods so that they mix;
/// lengths, seeds and sampling settings are drawn.
fn random_request(rng: &mut StdRng, i: usize) -> GenerateRequest {
    let p = rng.random_range(1..=40);
    let prompt_ids = (0..p).map(|_| rng.random_range(0..TEXT_IDS)).collect();
    let n = rng.random_range(4..=24);
    let alg = DIM_ALGS[i % DIM_ALGS.len()];
    // `origin-ratio` exists only in the dim loop.
    let pipeline = if i % 5 == 2 && alg != Alg::OriginRatio {
        Pipeline::Dream
    } else {
        Pipeline::Dim
    };
    let threshold = if pipeline == Pipeline::Dim {
        THRESHOLDS[i % THRESHOLDS.len()]
    } else {
        None
    };
    let sampled = i % 3 == 1;
    let mut prior = Vec::new();
    if i % 4 == 2 {
        let mut taken = HashSet::new();
        for _ in 0..rng.random_range(1..=3.min(n - 1)) {
            let pos = rng.random_range(0..n);
            let tok = if rng.random_bool(0.25) {
                EOS
            } else {
                rng.random_range(0..TEXT_IDS)
            };
            if taken.insert(pos) {
                prior.push((pos, tok));
            }
        }
    }
    let params = DecodeParams {
        max_new_tokens: n,
        steps: if rng.random_bool(0.5) {
            n
        } else {
            rng.random_range(1..=n)
        },
        threshold,
        alg,
        pipeline,
        temperature: if sampled {
            rng.random_range(0.3..1.5)
        } else {
            0.0
        },
        top_p: (sampled && rng.random_bool(0.7)).then(|| rng.random_range(0.5..0.95)),
        top_k: (sampled && rng.random_bool(0.3)).then(|| rng.random_range(2..50)),
        alg_temp: (i % 7 == 3).then_some(0.5),
        use_original_confidence: !sampled || rng.random_bool(0.5),
        seed: rng.random(),
        use_cache: rng.random_bool(0.5),
        prior: StructurePrior { fixed: prior },
        block_length: None,
        cache: None,
    };
    GenerateRequest {
        prompt_ids,
        images: Vec::new(),
        params,
        deadline: None,
    }
}

fn random_requests(count: usize) -> Vec<GenerateRequest> {
    let mut rng = StdRng::seed_from_u64(0x0d1e_5eed);
    let reqs: Vec<_> = (0..count).map(|i| random_request(&mut rng, i)).collect();
    // The set must exercise what it claims to, whatever the draws.
    let ps: Vec<&DecodeParams> = reqs.iter().map(|r| &r.params).collect();
    for alg in DIM_ALGS {
        assert!(ps.iter().any(|p| p.alg == alg), "no request uses {alg}");
    }
    for thr in THRESHOLDS {
        assert!(
            ps.iter().any(|p| p.threshold == thr),
            "no request uses threshold {thr:?}"
        );
    }
    assert!(
        ps.iter()
            .any(|p| p.pipeline == Pipeline::Dream && p.alg == Alg::Origin)
    );
    assert!(ps.iter().any(|p| p.use_cache) && ps.iter().any(|p| !p.use_cache));
    assert!(ps.iter().any(|p| p.temperature > 0.0 && p.top_p.is_some()));
    assert!(ps.iter().any(|p| p.temperature > 0.0 && p.use_cache));
    assert!(ps.iter().any(|p| !p.prior.is_empty() && p.use_cache));
    assert!(ps.iter().any(|p| p.steps < p.max_new_tokens));
    assert!(ps.iter().any(|p| p.alg_temp.is_some()));
    reqs
}

/// The golden single cases (checked against the reference as well) and the random set.
fn all_requests() -> (Vec<Case>, Vec<GenerateRequest>) {
    let cases = single_cases();
    let mut reqs: Vec<GenerateRequest> = cases.iter().map(|c| c.request.clone()).collect();
    reqs.extend(random_requests(24));
    (cases, reqs)
}

/// Submits `reqs` in `waves`, each wave after the engine has run two more forward passes,
/// so later requests join sequences that are mid-decoding. Returns the outcomes in order.
fn run(engine: &EngineHandle, reqs: &[GenerateRequest], waves: usize) -> Vec<Outcome> {
    let per_wave = reqs.len().div_ceil(waves);
    let mut rxs = Vec::with_capacity(reqs.len());
    for (w, chunk) in reqs.chunks(per_wave).enumerate() {
        if w > 0 {
            let f0 = engine.stats().forward_passes;
            wait_until("two more forward passes (or an idle engine)", WAIT, || {
                let s = engine.stats();
                s.forward_passes >= f0 + 2 || (s.active == 0 && s.waiting == 0)
            });
        }
        for r in chunk {
            rxs.push(engine.submit(r.clone()).expect("valid request"));
        }
    }
    rxs.into_iter()
        .zip(reqs)
        .map(|(rx, r)| collect_within(rx, initial_row(r, GOLDEN_MASK_ID)))
        .collect()
}

fn assert_same(label: &str, solo: &[Outcome], got: &[Outcome]) {
    for (i, (a, b)) in solo.iter().zip(got).enumerate() {
        assert_eq!(
            b.history, a.history,
            "{label}: request {i}: step history differs from its solo run"
        );
        assert_eq!(
            b.finished.response_ids, a.finished.response_ids,
            "{label}: request {i}: final tokens"
        );
        assert_eq!(
            b.finished.steps, a.finished.steps,
            "{label}: request {i}: steps"
        );
        assert_eq!(
            b.finished.finish_reason, a.finished.finish_reason,
            "{label}: request {i}: finish reason"
        );
    }
}

#[test]
fn batching_never_changes_a_result() {
    let (cases, reqs) = all_requests();

    let (solo_engine, solo_log) = engine_with_log(EngineConfig {
        max_active: 1,
        ..EngineConfig::default()
    });
    let solo = run(&solo_engine, &reqs, 1);
    assert!(
        solo_log.lock().unwrap().iter().all(|r| r.batch_size == 1),
        "the solo engine runs one sequence per pass"
    );
    for (case, out) in cases.iter().zip(&solo) {
        assert_eq!(
            out.history, case.history,
            "{}: solo run differs from the reference",
            case.name
        );
        assert_eq!(out.finished.steps, case.steps_taken, "{}: steps", case.name);
    }
    solo_engine.shutdown();

    // All at once.
    let (engine, log) = engine_with_log(EngineConfig {
        max_active: 256,
        ..EngineConfig::default()
    });
    let together = run(&engine, &reqs, 1);
    assert_same("all at once", &solo, &together);
    let widest = log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.batch_size)
        .max()
        .unwrap();
    assert!(
        widest >= reqs.len() / 2,
        "requests were decoded together (widest pass {widest})"
    );
    let budget = 96;
    assert!(
        log.lock().unwrap().iter().any(|r| r.tokens > budget),
        "unsplit passes exceed the budget used below"
    );
    assert_eq!(engine.stats().active, 0);

    // Joining mid-flight, on the same engine.
    let staggered = run(&engine, &reqs, 6);
    assert_same("staggered", &solo, &staggered);
    engine.shutdown();

    // A token budget per pass smaller than the active set: steps are split over passes.
    let (engine, log) = engine_with_log(EngineConfig {
        max_active: 256,
        max_step_tokens: budget,
        ..EngineConfig::default()
    });
    let split = run(&engine, &reqs, 4);
    assert_same("split steps", &solo, &split);
    let log = log.lock().unwrap();
    assert!(
        log.iter().any(|r| r.batch_size > 1),
        "some passes still pack several sequences"
    );
    for r in log.iter().filter(|r| r.batch_size > 1) {
        assert!(
            r.tokens <= budget,
            "a packed pass of {} tokens exceeds the budget of {budget}",
            r.tokens
        );
    }
    engine.shutdown();
}

/// The same on the tensor-op path (the GPU's path, forced here on the CPU in f32), whose
/// passes run all their sequences' attention as one padded batch: the golden cases still
/// reproduce the reference, and the requests all at once or joining mid-flight reproduce
/// their solo runs.
#[test]
fn tensor_path_batching_never_changes_a_result() {
    let (cases, reqs) = all_requests();
    let start = |max_active| {
        let cfg = EngineConfig {
            max_active,
            ..EngineConfig::default()
        };
        dimple_engine::start(tensor_path_model(), cfg, None)
    };
    let solo_engine = start(1);
    let solo = run(&solo_engine, &reqs, 1);
    for (case, out) in cases.iter().zip(&solo) {
        assert_eq!(
            out.history, case.history,
            "{}: tensor-path solo run differs from the reference",
            case.name
        );
    }
    solo_engine.shutdown();

    let engine = start(256);
    assert_same("tensor path, all at once", &solo, &run(&engine, &reqs, 1));
    assert_same("tensor path, staggered", &solo, &run(&engine, &reqs, 6));
    engine.shutdown();
}

/// `gen_text2` is row 1 of the golden batch decoded on its own. The official batch decodes
/// rows jointly (one top-k across rows), so its row 1 differs; the engine decodes each
/// request alone, so next to the `p_text` request it must still give the `gen_text2` history.
#[test]
fn second_batch_row_decodes_as_if_alone_next_to_the_first() {
    let text2 = load_case("gen_text2_n16_thrnone_cache0");
    let text = load_case("gen_text_n16_thrnone_cache0");
    assert_eq!(text2.request.prompt_ids, golden_prompt("p_text_b"));
    assert_eq!(text.request.prompt_ids, golden_prompt("p_text"));
    let (engine, log) = engine_with_log(EngineConfig::default());
    let rx_text = engine.submit(text.request.clone()).unwrap();
    let rx_text2 = engine.submit(text2.request.clone()).unwrap();
    let out_text = collect_within(rx_text, initial_row(&text.request, GOLDEN_MASK_ID));
    let out_text2 = collect_within(rx_text2, initial_row(&text2.request, GOLDEN_MASK_ID));
    assert!(
        log.lock().unwrap().iter().any(|r| r.batch_size == 2),
        "the two requests shared forward passes"
    );
    assert_eq!(out_text2.history, text2.history, "p_text_b next to p_text");
    assert_eq!(out_text2.finished.steps, text2.steps_taken);
    assert_eq!(out_text.history, text.history, "p_text next to p_text_b");
    assert_eq!(out_text.finished.steps, text.steps_taken);
}
