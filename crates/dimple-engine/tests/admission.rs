//! Admission, memory and request lifetimes: the prefix-cache budget turns load into
//! queueing, cancellation and deadlines give memory back, a full queue and impossible or
//! invalid requests are refused at submission with an error that names the field. Every
//! wait is bounded, so a broken engine fails these tests instead of hanging them.

mod support;

use std::time::{Duration, Instant};

use dimple_core::params::{DecodeParams, FinishReason, ParamError, StructurePrior};
use dimple_engine::{EngineConfig, EngineError, EngineEvent, GenerateRequest};
use support::*;
use tokio::sync::mpsc::error::TryRecvError;

/// Prefix-cache bytes of a cache-mode request with a `p`-token prompt on the golden model:
/// K and V for the first `p - 1` positions, in each of 2 layers, 2 kv heads of 16 dims,
/// f32 (README "Model" and "use_cache").
fn golden_cache_bytes(p: usize) -> usize {
    2 * 2 * 2 * 16 * (p - 1) * 4
}

/// A cache-mode request on `p_text` that decodes one token per step for `n` steps: long
/// enough to still be running while a test looks at the engine.
fn long_request(n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: golden_prompt("p_text"),
        images: Vec::new(),
        params: DecodeParams {
            max_new_tokens: n,
            steps: n,
            use_cache: true,
            ..DecodeParams::default()
        },
        deadline: None,
    }
}

fn first_step(rx: &mut tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) {
    match recv_within(rx, WAIT) {
        Some(EngineEvent::Step { step: 0, .. }) => {}
        other => panic!("expected the first step event, got {other:?}"),
    }
}

#[test]
fn dropping_the_receiver_cancels_and_frees_the_cache() {
    let engine = engine(EngineConfig::default());
    let n = 1000;
    let prompts: Vec<Vec<u32>> = vec![
        golden_prompt("p_text"),
        golden_prompt("p_text_b"),
        golden_prompt("p_text")[..7].to_vec(),
    ];
    let mut rxs = Vec::new();
    for p in &prompts {
        let mut req = long_request(n);
        req.prompt_ids = p.clone();
        rxs.push(engine.submit(req).unwrap());
    }
    for rx in &mut rxs {
        first_step(rx);
    }
    let held: usize = prompts.iter().map(|p| golden_cache_bytes(p.len())).sum();
    wait_until("all three caches are accounted", WAIT, || {
        let s = engine.stats();
        s.cache_used_bytes == held && s.active == 3
    });
    drop(rxs);
    wait_until(
        "cancelled requests leave and free their cache",
        WAIT,
        || {
            let s = engine.stats();
            s.cache_used_bytes == 0 && s.active == 0 && s.waiting == 0
        },
    );
    assert!(
        engine.stats().forward_passes < n as u64,
        "the requests were cancelled, not completed"
    );

    // The engine goes on serving.
    let case = load_case("gen_text_n16_thrnone_cache1");
    let out = collect_within(
        engine.submit(case.request.clone()).unwrap(),
        initial_row(&case.request, GOLDEN_MASK_ID),
    );
    assert_eq!(out.history, case.history);
}

#[test]
fn a_waiting_request_whose_client_left_frees_its_queue_slot() {
    let engine = engine(EngineConfig {
        max_active: 1,
        max_waiting: 1,
        ..EngineConfig::default()
    });
    let mut running = engine.submit(long_request(1000)).unwrap();
    first_step(&mut running);
    let gone = engine.submit(long_request(16)).unwrap();
    assert_eq!(engine.stats().waiting, 1);
    drop(gone);
    wait_until("the abandoned request leaves the queue", WAIT, || {
        engine.stats().waiting == 0
    });
    // Its slot is free again although the first request still runs.
    assert_eq!(engine.stats().active, 1);
    let case = load_case("gen_text_n16_thrnone_cache0");
    let rx = engine.submit(case.request.clone()).unwrap();
    drop(running);
    let out = collect_within(rx, initial_row(&case.request, GOLDEN_MASK_ID));
    assert_eq!(out.history, case.history);
}

#[test]
fn a_request_over_the_cache_budget_waits_then_completes() {
    let budget = golden_cache_bytes(golden_prompt("p_text").len());
    let engine = engine(EngineConfig {
        cache_budget_bytes: budget,
        ..EngineConfig::default()
    });
    let n = 150;
    let first = engine.submit(long_request(n)).unwrap();
    // Without reading its events (they are collected in full below): one pass ran, so the
    // first request is admitted and holds the whole budget.
    wait_until("the first request runs", WAIT, || {
        engine.stats().forward_passes >= 1
    });

    let case = load_case("gen_text_n16_thrnone_cache1");
    assert!(case.request.params.use_cache);
    let mut second = engine.submit(case.request.clone()).unwrap();
    // Two passes after submission the engine has certainly tried to admit it.
    let f0 = engine.stats().forward_passes;
    wait_until("two more forward passes", WAIT, || {
        engine.stats().forward_passes >= f0 + 2
    });
    let s = engine.stats();
    assert!(
        s.forward_passes < n as u64,
        "the first request must still be running for this check"
    );
    assert_eq!(s.waiting, 1, "the second request waits for cache memory");
    assert_eq!(s.active, 1);
    assert_eq!(s.cache_used_bytes, budget);
    assert!(
        matches!(second.try_recv(), Err(TryRecvError::Empty)),
        "the waiting request has not started"
    );

    let first = collect_within(first, initial_row(&long_request(n), GOLDEN_MASK_ID));
    assert_eq!(first.finished.finish_reason, FinishReason::Completed);
    let out = collect_within(second, initial_row(&case.request, GOLDEN_MASK_ID));
    assert_eq!(
        out.history, case.history,
        "the queued request decodes exactly as alone"
    );
    wait_until("the cache is free", WAIT, || {
        engine.stats().cache_used_bytes == 0
    });
}

#[test]
fn a_cache_larger_than_the_whole_budget_is_refused_at_submit() {
    let needed = golden_cache_bytes(golden_prompt("p_text").len());
    assert_eq!(needed, 9728);
    let engine = engine(EngineConfig {
        cache_budget_bytes: needed - 1,
        ..EngineConfig::default()
    });
    let case = load_case("gen_text_n16_thrnone_cache1");
    match engine.submit(case.request.clone()) {
        Err(EngineError::CacheImpossible {
            needed: n,
            budget: b,
        }) => {
            assert_eq!((n, b), (needed, needed - 1));
        }
        other => panic!("expected CacheImpossible, got {:?}", other.map(|_| ())),
    }
    assert_eq!(engine.stats().waiting, 0);
    // The same prompt without the cache needs no pool memory and runs.
    let case = load_case("gen_text_n16_thrnone_cache0");
    let out = collect_within(
        engine.submit(case.request.clone()).unwrap(),
        initial_row(&case.request, GOLDEN_MASK_ID),
    );
    assert_eq!(out.history, case.history);
}

#[test]
fn a_full_queue_refuses_new_requests() {
    let engine = engine(EngineConfig {
        max_active: 1,
        max_waiting: 2,
        ..EngineConfig::default()
    });
    let mut busy = engine.submit(long_request(1000)).unwrap();
    first_step(&mut busy);
    let queued = [
        engine.submit(long_request(16)).unwrap(),
        engine.submit(long_request(16)).unwrap(),
    ];
    match engine.submit(long_request(16)) {
        Err(e @ EngineError::QueueFull { limit: 2 }) => {
            assert!(e.to_string().contains("queue"), "{e}")
        }
        other => panic!("expected QueueFull, got {:?}", other.map(|_| ())),
    }
    assert_eq!(engine.stats().waiting, 2);
    drop(busy);
    drop(queued);
    wait_until("the engine is idle", WAIT, || {
        let s = engine.stats();
        s.waiting == 0 && s.active == 0 && s.cache_used_bytes == 0
    });
    assert!(
        engine.submit(long_request(4)).is_ok(),
        "room again once the queue drained"
    );
}

#[test]
fn a_deadline_in_the_past_ends_the_request_before_any_step() {
    let engine = engine(EngineConfig::default());
    let mut req = long_request(16);
    req.deadline = Some(
        Instant::now()
            .checked_sub(Duration::from_millis(1))
            .unwrap_or_else(Instant::now),
    );
    let (history, done) = finish_within(
        engine.submit(req.clone()).unwrap(),
        initial_row(&req, GOLDEN_MASK_ID),
        WAIT,
    );
    let done = done.expect("a finished event");
    assert_eq!(done.finish_reason, FinishReason::DeadlineExceeded);
    assert!(history.is_empty() && done.steps == 0);
    assert_eq!(done.response_ids, vec![GOLDEN_MASK_ID; 16]);
    wait_until("the cache is free", WAIT, || {
        let s = engine.stats();
        s.cache_used_bytes == 0 && s.active == 0
    });
}

#[test]
fn a_short_deadline_stops_a_running_request_and_frees_its_cache() {
    let engine = engine(EngineConfig::default());
    let n = 1000;
    let mut req = long_request(n);
    req.deadline = Some(Instant::now() + Duration::from_millis(100));
    let rx = engine.submit(req.clone()).unwrap();
    let (history, done) = finish_within(rx, initial_row(&req, GOLDEN_MASK_ID), WAIT);
    let done = done.expect("a finished event");
    assert_eq!(done.finish_reason, FinishReason::DeadlineExceeded);
    assert!(
        done.steps >= 1 && done.steps < n,
        "stopped while running, after {} steps",
        done.steps
    );
    assert_eq!(history.len(), done.steps);
    assert!(
        done.response_ids.contains(&GOLDEN_MASK_ID),
        "the response is unfinished"
    );
    wait_until("the cache is free", WAIT, || {
        let s = engine.stats();
        s.cache_used_bytes == 0 && s.active == 0
    });
}

/// A request whose deadline passes while it waits for admission ends with
/// `DeadlineExceeded` and gives its queue place back, without waiting for the request ahead.
#[test]
fn a_deadline_that_passes_while_waiting_ends_the_request() {
    let engine = engine(EngineConfig {
        max_active: 1,
        ..EngineConfig::default()
    });
    let mut ahead = engine.submit(long_request(1000)).unwrap();
    first_step(&mut ahead);
    let mut req = long_request(16);
    req.deadline = Some(Instant::now() + Duration::from_millis(20));
    let (history, done) = finish_within(
        engine.submit(req.clone()).unwrap(),
        initial_row(&req, GOLDEN_MASK_ID),
        WAIT,
    );
    let done = done.expect("a finished event while the first request still runs");
    assert_eq!(done.finish_reason, FinishReason::DeadlineExceeded);
    assert!(history.is_empty() && done.steps == 0);
    assert!(
        matches!(
            ahead.try_recv(),
            Ok(EngineEvent::Step { .. }) | Err(TryRecvError::Empty)
        ),
        "the first request is still decoding"
    );
    assert_eq!(engine.stats().waiting, 0);
    drop(ahead);
}

/// Submits `req` and returns the error message; the request must be refused at submit.
fn refused(engine: &dimple_engine::EngineHandle, req: GenerateRequest) -> EngineError {
    match engine.submit(req) {
        Err(e) => e,
        Ok(_) => panic!("an invalid request was accepted"),
    }
}

#[test]
fn invalid_requests_are_refused_naming_the_field() {
    let engine = engine(EngineConfig {
        max_prompt_tokens: 64,
        ..EngineConfig::default()
    });
    let base = load_case("gen_text_n16_thrnone_cache0").request;
    let with = |f: &dyn Fn(&mut GenerateRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let check = |what: &str, req: GenerateRequest, needles: &[&str]| {
        let e = refused(&engine, req);
        let msg = e.to_string();
        for n in needles {
            assert!(
                msg.contains(n),
                "{what}: message {msg:?} should contain {n:?}"
            );
        }
        e
    };

    let e = check(
        "threshold",
        with(&|r| r.params.threshold = Some(1.5)),
        &["`threshold`", "1.5"],
    );
    assert!(matches!(
        e,
        EngineError::Params(ParamError::OutOfRange {
            field: "threshold",
            ..
        })
    ));
    let e = check(
        "max_new_tokens",
        with(&|r| r.params.max_new_tokens = 0),
        &["`max_new_tokens`"],
    );
    assert!(matches!(
        e,
        EngineError::Params(ParamError::OutOfRange {
            field: "max_new_tokens",
            ..
        })
    ));
    check("steps", with(&|r| r.params.steps = 0), &["`steps`"]);
    check(
        "dream threshold",
        with(&|r| {
            r.params.pipeline = dimple_core::params::Pipeline::Dream;
            r.params.threshold = Some(0.5);
        }),
        &["`threshold`", "dream"],
    );
    let e = check(
        "prior position",
        with(&|r| {
            r.params.prior = StructurePrior {
                fixed: vec![(16, 5)],
            }
        }),
        &["`prior`", "16"],
    );
    assert!(matches!(
        e,
        EngineError::Params(ParamError::PriorPositionOutOfRange { position: 16, .. })
    ));
    check(
        "prior mask id",
        with(&|r| {
            r.params.prior = StructurePrior {
                fixed: vec![(3, GOLDEN_MASK_ID)],
            }
        }),
        &["`prior`", "301"],
    );
    check(
        "prior outside vocab",
        with(&|r| {
            r.params.prior = StructurePrior {
                fixed: vec![(3, 384)],
            }
        }),
        &["`prior`"],
    );
    check(
        "empty prompt",
        with(&|r| r.prompt_ids.clear()),
        &["`prompt`", "empty"],
    );
    check(
        "token outside vocab",
        with(&|r| r.prompt_ids[4] = 384),
        &["`prompt`", "384"],
    );
    check(
        "prompt too long",
        with(&|r| r.prompt_ids = vec![7; 65]),
        &["`prompt`", "65", "64"],
    );

    let image_case = load_case("gen_image_n16_thrnone_cache0");
    let mut short = image_case.request.clone();
    let im = &mut short.images[0];
    im.pixel_values
        .truncate(im.pixel_values.len() - im.patch_dim);
    check("image pixels", short, &["image 0", "pixel values"]);
    let mut bad_dim = image_case.request.clone();
    bad_dim.images[0].patch_dim -= 1;
    check("image patch size", bad_dim, &["image 0", "patch"]);

    let s = engine.stats();
    assert_eq!(
        (s.waiting, s.active, s.forward_passes),
        (0, 0, 0),
        "no refused request reached the engine"
    );
    assert!(s.healthy);
}

#[test]
fn a_prompt_whose_image_tokens_do_not_match_its_image_fails_with_a_message() {
    let engine = engine(EngineConfig::default());
    let case = load_case("gen_image_n16_thrnone_cache0");
    let mut req = case.request.clone();
    // Drop one of the 12 image tokens: the image gives 12 feature rows, the prompt has 11.
    let at = req.prompt_ids.iter().position(|&t| t == 302).unwrap();
    req.prompt_ids.remove(at);
    let outcome = match engine.submit(req.clone()) {
        Err(e) => e,
        Ok(rx) => finish_within(rx, initial_row(&req, GOLDEN_MASK_ID), WAIT)
            .1
            .expect_err("the request must fail"),
    };
    let msg = outcome.to_string();
    assert!(matches!(outcome, EngineError::Invalid(_)), "{outcome:?}");
    assert!(
        msg.contains("image tokens") && msg.contains("11") && msg.contains("12"),
        "{msg}"
    );
    // The engine survives the bad request.
    let out = collect_within(
        engine.submit(case.request.clone()).unwrap(),
        initial_row(&case.request, GOLDEN_MASK_ID),
    );
    assert_eq!(out.history, case.history);
}
