//! Tensor-parallel engines on CPU rank threads: every single-request golden generation is
//! reproduced exactly at degrees 1, 2 and 4 (4 exceeds the golden model's 2 kv heads: the
//! replication path); a rank that fails mid-step fails every request without a hang; a
//! degree the model cannot take is refused with the valid ones.

mod support;

use std::time::{Duration, Instant};

use dimple_core::params::DecodeParams;
use dimple_engine::{
    EngineConfig, EngineError, EngineEvent, EngineHandle, FaultInjection, FaultKind,
    GenerateRequest, GroupConfig,
};
use dimple_model::Checkpoint;
use support::*;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;

fn group_engine(world: usize, cfg: EngineConfig) -> EngineHandle {
    dimple_engine::start_group(
        &Checkpoint::Dir(golden("")),
        GroupConfig::cpu(world),
        cfg,
        None,
    )
    .expect("group starts")
}

/// Every event of a request until its last one, failing the test instead of hanging.
fn drain(mut rx: UnboundedReceiver<EngineEvent>, within: Duration) -> Vec<EngineEvent> {
    let until = Instant::now() + within;
    let mut events = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(ev) => {
                let last = matches!(ev, EngineEvent::Finished(_) | EngineEvent::Failed(_));
                events.push(ev);
                if last {
                    return events;
                }
            }
            Err(TryRecvError::Disconnected) => {
                panic!("the engine closed a request without a final event")
            }
            Err(TryRecvError::Empty) => {
                assert!(
                    Instant::now() < until,
                    "no final event within {within:?} ({} events so far)",
                    events.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn check(world: usize, case: &Case, out: &Outcome) {
    assert_eq!(
        out.finished.steps, case.steps_taken,
        "tp {world} {}: steps taken",
        case.name
    );
    assert_eq!(
        out.history, case.history,
        "tp {world} {}: the response after every step",
        case.name
    );
}

#[test]
fn every_golden_case_alone_at_every_degree() {
    let cases = single_cases();
    for world in [1, 2, 4] {
        let engine = group_engine(
            world,
            EngineConfig {
                max_active: 1,
                ..EngineConfig::default()
            },
        );
        assert_eq!(engine.world_size(), world);
        for case in &cases {
            let rx = engine.submit(case.request.clone()).unwrap();
            let out = collect(rx, initial_row(&case.request, GOLDEN_MASK_ID));
            check(world, case, &out);
        }
        assert_eq!(
            engine.stats().cache_used_bytes,
            0,
            "tp {world}: all caches released"
        );
        assert!(engine.stats().healthy);
        engine.shutdown();
    }
}

#[test]
fn golden_cases_decoded_together_on_two_ranks() {
    together_on_two_ranks(GroupConfig::cpu(2));
}

/// The same on the tensor-op path: logits stay on the ranks' devices, each step's greedy
/// rows of every sequence are reduced together, full rows (sampling) gathered together,
/// entropy parts computed together.
#[test]
fn golden_cases_decoded_together_on_two_ranks_on_the_tensor_path() {
    together_on_two_ranks(GroupConfig {
        tensor_ops: true,
        ..GroupConfig::cpu(2)
    });
}

fn together_on_two_ranks(group: GroupConfig) {
    // Many sequences per step, mixing cache modes, images, priors and confidence kinds (the
    // entropy case needs the second exchange).
    let engine = dimple_engine::start_group(
        &Checkpoint::Dir(golden("")),
        group,
        EngineConfig::default(),
        None,
    )
    .expect("group starts");
    let cases = single_cases();
    let rxs: Vec<_> = cases
        .iter()
        .map(|c| engine.submit(c.request.clone()).unwrap())
        .collect();
    for (case, rx) in cases.iter().zip(rxs) {
        let out = collect(rx, initial_row(&case.request, GOLDEN_MASK_ID));
        check(2, case, &out);
    }
    assert_eq!(engine.stats().cache_used_bytes, 0);
}

#[test]
fn cache_budget_counts_each_ranks_share() {
    // 19 cached prompt positions x 2 layers x (k, v) x 16 x 4 bytes: 2 kv heads at tp 1,
    // one per rank at tp 2 and 4.
    let case = load_case("gen_text_n16_thrnone_cache1");
    for (world, per_rank) in [
        (1, 19 * 2 * 2 * 2 * 16 * 4),
        (2, 19 * 2 * 2 * 16 * 4),
        (4, 19 * 2 * 2 * 16 * 4),
    ] {
        let engine = group_engine(
            world,
            EngineConfig {
                cache_budget_bytes: per_rank,
                ..EngineConfig::default()
            },
        );
        let out = collect(
            engine.submit(case.request.clone()).unwrap(),
            initial_row(&case.request, GOLDEN_MASK_ID),
        );
        check(world, &case, &out);
        let small = group_engine(
            world,
            EngineConfig {
                cache_budget_bytes: per_rank - 1,
                ..EngineConfig::default()
            },
        );
        let err = small.submit(case.request.clone()).unwrap_err();
        assert!(
            matches!(err, EngineError::CacheImpossible { needed, .. } if needed == per_rank),
            "tp {world}: {err}"
        );
    }
}

#[test]
fn sampling_gathers_rows_and_matches_one_rank() {
    // Temperature sampling scores whole rows with the request's own generator; the rows are
    // gathered from the vocabulary shards. The same seed gives the same tokens at any degree.
    let base = load_case("gen_text_n16_thrnone_cache0").request;
    let run = |world: usize| {
        let engine = group_engine(world, EngineConfig::default());
        let rxs: Vec<_> = (0..3u64)
            .map(|seed| {
                let params = DecodeParams {
                    temperature: 1.0,
                    top_k: Some(50),
                    seed,
                    ..base.params.clone()
                };
                engine
                    .submit(GenerateRequest {
                        params,
                        ..base.clone()
                    })
                    .unwrap()
            })
            .collect();
        rxs.into_iter()
            .map(|rx| collect(rx, initial_row(&base, GOLDEN_MASK_ID)).history)
            .collect::<Vec<_>>()
    };
    let one = run(1);
    assert_ne!(one[0], one[1], "different seeds sample differently");
    assert_eq!(run(2), one);
}

fn fault_fails_every_request(kind: FaultKind) {
    let group = GroupConfig {
        fault: Some(FaultInjection {
            rank: 1,
            forward_pass: 3,
            kind,
        }),
        ..GroupConfig::cpu(2)
    };
    let engine = dimple_engine::start_group(
        &Checkpoint::Dir(golden("")),
        group,
        EngineConfig::default(),
        None,
    )
    .unwrap();
    let cases: Vec<Case> = [
        "gen_text_n24_thrnone_cache0",
        "gen_text_n24_thrnone_cache1",
        "gen_image_n24_thrnone_cache1",
    ]
    .iter()
    .map(|n| load_case(n))
    .collect();
    let rxs: Vec<_> = cases
        .iter()
        .map(|c| engine.submit(c.request.clone()).unwrap())
        .collect();
    for (case, rx) in cases.iter().zip(rxs) {
        let events = drain(rx, Duration::from_secs(30));
        match events.last() {
            Some(EngineEvent::Failed(EngineError::Unavailable(msg))) => {
                // The cause, not a peer's echo of it.
                assert!(
                    msg.contains("rank 1: ")
                        && msg.contains("injected")
                        && !msg.contains("aborted"),
                    "{kind:?} {}: {msg}",
                    case.name
                )
            }
            other => panic!("{kind:?} {}: expected a failure, got {other:?}", case.name),
        }
        // 24-step decodes cannot have finished in 3 forward passes.
        assert!(
            events.len() <= 4,
            "{kind:?} {}: {} events",
            case.name,
            events.len()
        );
    }
    let stats = engine.stats();
    assert!(!stats.healthy, "{kind:?}: the group is marked unhealthy");
    assert_eq!(
        (stats.active, stats.waiting, stats.cache_used_bytes),
        (0, 0, 0)
    );
    assert_eq!(stats.forward_passes, 3, "{kind:?}: the fourth pass failed");
    let err = engine.submit(cases[0].request.clone()).unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
}

#[test]
fn a_rank_that_errs_mid_step_fails_every_request() {
    fault_fails_every_request(FaultKind::Error);
}

#[test]
fn a_rank_that_panics_mid_step_fails_every_request() {
    fault_fails_every_request(FaultKind::Panic);
}

#[test]
fn a_degree_the_model_cannot_take_is_refused_with_the_valid_ones() {
    for world in [3, 8] {
        let err = dimple_engine::start_group(
            &Checkpoint::Dir(golden("")),
            GroupConfig::cpu(world),
            EngineConfig::default(),
            None,
        )
        .err()
        .expect("refused");
        match err {
            EngineError::Invalid(msg) => {
                assert!(msg.contains(&format!("degree {world}")), "{msg}");
                assert!(msg.contains("valid degrees: 1, 2, 4"), "{msg}");
            }
            other => panic!("tp {world}: {other}"),
        }
    }
}

#[test]
fn start_refuses_a_shard() {
    // `start` takes a whole model; a rank's shard alone would wait for peers forever.
    let comm = dimple_model::LocalComm::group(2, Duration::from_secs(1)).swap_remove(0);
    let shard = Checkpoint::Dir(golden(""))
        .load(
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            std::sync::Arc::new(comm),
        )
        .unwrap();
    let engine = dimple_engine::start(shard, EngineConfig::default(), None);
    assert!(!engine.stats().healthy);
    let err = engine
        .submit(load_case("gen_text_n16_thrnone_cache0").request)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Unavailable(ref m) if m.contains("start_group")),
        "{err}"
    );
}
