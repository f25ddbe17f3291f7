//! Model-free parity of the unmasking policy with the official Dimple runs.
//!
//! Each single-request golden case (`tests/fixtures/golden/gen_*`, all but `gen_batch_*`)
//! records, for every step, the masked slots with the confidence and greedy token the
//! reference computed. Feeding those to [`Policy::decide`] must turn each recorded sequence
//! into the next one exactly, take the recorded branch, and stop after the recorded number
//! of steps. The confidences come from the files, so this checks the decision logic alone.

use std::path::PathBuf;

use dimple_core::params::{
    Alg, DecodeLimits, DecodeParams, FinishReason, Pipeline, StructurePrior,
};
use dimple_engine::policy::{Policy, SlotScore, StepOutcome, request_rng, timesteps};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// `mask_token_id` of the tiny model (`generation_config.json`).
const MASK: i64 = 301;

fn golden_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/golden"
    ))
}

fn single_request_cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("golden fixture folder")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".json")?;
            (stem.starts_with("gen_") && !stem.starts_with("gen_batch_")).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    names
}

fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str, dtype: Dtype) -> (Vec<usize>, &'a [u8]) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), dtype, "{name}");
    (t.shape().to_vec(), t.data())
}

fn i64s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<i64>) {
    let (shape, data) = tensor(st, name, Dtype::I64);
    let v = data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, v)
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let (_, data) = tensor(st, name, Dtype::F32);
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn params_from_json(j: &Value) -> DecodeParams {
    let p = &j["params"];
    // The golden runs are greedy; the sampling knobs are covered by unit tests.
    assert_eq!(p["temperature"].as_f64(), Some(0.0));
    for knob in ["top_p", "top_k", "alg_temp"] {
        assert!(p[knob].is_null(), "{knob}");
    }
    let n = p["max_new_tokens"].as_u64().unwrap() as usize;
    let mut fixed: Vec<(usize, u32)> =
        match j["tokens_hook"]["fixed_response_positions"].as_object() {
            Some(map) => map
                .iter()
                .map(|(pos, tok)| (pos.parse().unwrap(), tok.as_u64().unwrap() as u32))
                .collect(),
            None => Vec::new(),
        };
    fixed.sort_unstable();
    DecodeParams {
        max_new_tokens: n,
        steps: p["steps"].as_u64().unwrap() as usize,
        threshold: p["alg_p_threshold"].as_f64().map(|t| t as f32),
        alg: p["alg"].as_str().unwrap().parse::<Alg>().unwrap(),
        pipeline: p["decoding_pipeline"]
            .as_str()
            .unwrap()
            .parse::<Pipeline>()
            .unwrap(),
        temperature: 0.0,
        top_p: None,
        top_k: None,
        alg_temp: None,
        use_original_confidence: p["use_original_confidence"].as_bool().unwrap(),
        seed: 0,
        use_cache: p["use_cache"].as_bool().unwrap(),
        prior: StructurePrior { fixed },
        block_length: None,
        cache: None,
    }
}

fn count_masks(seq: &[i64]) -> usize {
    seq.iter().filter(|&&t| t == MASK).count()
}

/// Replays one case; returns the number of steps checked.
fn replay(case: &str) -> Result<usize, String> {
    let dir = golden_dir();
    let json: Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("{case}.json"))).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let bytes =
        std::fs::read(dir.join(format!("{case}.safetensors"))).map_err(|e| e.to_string())?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;

    let params = params_from_json(&json);
    params
        .validate(&DecodeLimits::default())
        .map_err(|e| e.to_string())?;
    let policy = Policy::new(&params).map_err(|e| e.to_string())?;

    // The grid, bit for bit.
    let want_ts = f32s(&st, "timesteps");
    let got_ts = timesteps(params.steps);
    if want_ts
        .iter()
        .map(|t| t.to_bits())
        .ne(got_ts.iter().map(|t| t.to_bits()))
    {
        return Err(format!("timesteps differ: {got_ts:?} vs {want_ts:?}"));
    }
    assert_eq!(policy.timesteps(), &got_ts[..]);

    let (init_shape, initial) = i64s(&st, "initial_sequence");
    let (hist_shape, history) = i64s(&st, "history");
    let (_, sequences) = i64s(&st, "sequences");
    let (_, offsets) = i64s(&st, "step_mask_offsets");
    let (_, batch) = i64s(&st, "step_mask_batch");
    let (_, pos) = i64s(&st, "step_mask_pos");
    let (_, argmax) = i64s(&st, "step_argmax");
    let conf = f32s(&st, "step_confidence");
    assert_eq!(init_shape[0], 1, "single request");
    let len = init_shape[1];
    let n_steps = hist_shape[0];
    assert_eq!(offsets.len(), n_steps + 1);
    assert!(batch.iter().all(|&b| b == 0));

    // The structure prior sits in the response and is not counted as masks.
    let prompt_len = json["prompt_length"].as_u64().unwrap() as usize;
    assert_eq!(len, prompt_len + params.max_new_tokens);
    for &(p, tok) in &params.prior.fixed {
        assert_eq!(initial[prompt_len + p], i64::from(tok), "prior at {p}");
    }
    let num_total_mask = count_masks(&initial);
    assert_eq!(
        num_total_mask,
        params.max_new_tokens - params.prior.fixed.len()
    );
    assert_eq!(Some(num_total_mask as u64), json["num_total_mask"].as_u64());

    let per_step = json["per_step"].as_array().unwrap();
    let mut rng = request_rng(params.seed);
    let mut seq = initial.clone();
    for k in 0..n_steps {
        let rec = &per_step[k];
        let (lo, hi) = (offsets[k] as usize, offsets[k + 1] as usize);
        let mask_pos: Vec<usize> = (0..len).filter(|&c| seq[c] == MASK).collect();
        let rec_pos: Vec<usize> = pos[lo..hi].iter().map(|&p| p as usize).collect();
        if rec_pos != mask_pos {
            return Err(format!(
                "step {k}: recorded slots {rec_pos:?} vs masks {mask_pos:?}"
            ));
        }
        assert_eq!(rec["masks_before"].as_u64(), Some(mask_pos.len() as u64));
        let slots: Vec<SlotScore> = (lo..hi)
            .map(|r| SlotScore {
                x0: argmax[r] as u32,
                confidence: conf[r],
            })
            .collect();
        let d = policy
            .decide(k, num_total_mask, &slots, &mut rng)
            .map_err(|e| format!("step {k}: {e}"))?;
        if d.path.as_str() != rec["path"].as_str().unwrap() {
            return Err(format!("step {k}: path {:?} vs {}", d.path, rec["path"]));
        }
        if Some(d.commit.len() as u64) != rec["committed"].as_u64() {
            return Err(format!(
                "step {k}: committed {} vs {}",
                d.commit.len(),
                rec["committed"]
            ));
        }
        let want_s = rec["schedule"]["s_index"].as_u64().map(|s| s as usize);
        if d.s_index != want_s {
            return Err(format!("step {k}: s_index {:?} vs {want_s:?}", d.s_index));
        }
        for &i in &d.commit {
            seq[mask_pos[i]] = i64::from(slots[i].x0);
        }
        let want = &history[k * len..(k + 1) * len];
        if seq != want {
            return Err(format!("step {k}: sequence {seq:?}\n  vs history {want:?}"));
        }
        let outcome = policy.after_step(k, count_masks(&seq));
        let last = k + 1 == n_steps;
        match (outcome, last) {
            (StepOutcome::Continue, false) => {}
            (StepOutcome::Finished(r), true) => {
                let want = if count_masks(&seq) == 0 {
                    FinishReason::Completed
                } else {
                    FinishReason::StepLimit
                };
                assert_eq!(r, want);
            }
            _ => return Err(format!("step {k} of {n_steps}: loop rule said {outcome:?}")),
        }
    }
    assert_eq!(json["steps_taken"].as_u64(), Some(n_steps as u64));
    assert_eq!(seq, sequences);
    Ok(n_steps)
}

#[test]
fn decisions_match_every_single_request_golden_run() {
    let cases = single_request_cases();
    // 42 generate cases minus the 4 batched ones.
    assert_eq!(cases.len(), 38, "{cases:?}");
    let mut failures = Vec::new();
    let mut steps = 0;
    for case in &cases {
        match replay(case) {
            Ok(n) => steps += n,
            Err(e) => failures.push(format!("{case}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(steps > 400, "only {steps} steps replayed");
}

#[test]
fn params_round_trip_through_json() {
    let p = DecodeParams {
        threshold: Some(0.9),
        alg: Alg::OriginRatio,
        prior: StructurePrior {
            fixed: vec![(0, 11), (10, 307)],
        },
        ..Default::default()
    };
    let text = serde_json::to_string(&p).unwrap();
    assert!(text.contains("\"alg\":\"origin-ratio\""), "{text}");
    assert!(text.contains("\"pipeline\":\"dim\""), "{text}");
    let back: DecodeParams = serde_json::from_str(&text).unwrap();
    assert_eq!(back, p);
    // Missing fields take the defaults; unknown ones are rejected.
    let partial: DecodeParams = serde_json::from_str(r#"{"alg":"entropy","steps":8}"#).unwrap();
    assert_eq!(
        partial,
        DecodeParams {
            alg: Alg::Entropy,
            steps: 8,
            ..Default::default()
        }
    );
    assert!(serde_json::from_str::<DecodeParams>(r#"{"stepz":8}"#).is_err());
    assert_eq!(
        serde_json::to_string(&FinishReason::DeadlineExceeded).unwrap(),
        "\"deadline_exceeded\""
    );
}
