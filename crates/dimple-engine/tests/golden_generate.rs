//! Every single-request golden generation, decoded through the engine: the whole step
//! history and the final tokens equal the official implementation's, alone and batched.

mod support;

use std::time::Duration;

use dimple_engine::EngineConfig;
use support::*;

fn check(case: &Case, out: &Outcome) {
    assert_eq!(
        out.finished.steps, case.steps_taken,
        "{}: steps taken",
        case.name
    );
    assert_eq!(
        out.history.len(),
        case.history.len(),
        "{}: history length",
        case.name
    );
    for (s, (got, want)) in out.history.iter().zip(&case.history).enumerate() {
        assert_eq!(got, want, "{}: response after step {s}", case.name);
    }
}

#[test]
fn each_golden_case_alone_matches_the_reference() {
    let engine = engine(EngineConfig {
        max_active: 1,
        ..EngineConfig::default()
    });
    for case in single_cases() {
        let rx = engine.submit(case.request.clone()).unwrap();
        let out = collect(rx, initial_row(&case.request, GOLDEN_MASK_ID));
        check(&case, &out);
    }
    assert_eq!(engine.stats().cache_used_bytes, 0, "all caches released");
}

#[test]
fn golden_cases_decoded_together_match_the_reference() {
    let engine = engine(EngineConfig::default());
    let cases = single_cases();
    // Half submitted at once, the rest while the first ones are mid-decoding.
    let mut rxs = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if i == cases.len() / 2 {
            std::thread::sleep(Duration::from_millis(30));
        }
        rxs.push(engine.submit(case.request.clone()).unwrap());
    }
    for (case, rx) in cases.iter().zip(rxs) {
        let out = collect(rx, initial_row(&case.request, GOLDEN_MASK_ID));
        check(case, &out);
    }
    assert_eq!(engine.stats().cache_used_bytes, 0);
}
