//! Golden generation cases of the official implementation, turned into engine requests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use dimple_core::params::{DecodeParams, StructurePrior};
use dimple_engine::{
    EngineConfig, EngineEvent, EngineHandle, EngineImage, Finished, GenerateRequest,
};
use dimple_model::DimpleModel;
use serde_json::Value;

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/golden"
    ))
    .join(name)
}

pub fn model() -> DimpleModel {
    DimpleModel::load(&golden(""), DType::F32, &Device::Cpu).expect("golden model loads")
}

/// The golden model on the tensor-op path (the GPU's path, forced on the CPU in f32): its
/// passes run every sequence's attention as one padded batch.
pub fn tensor_path_model() -> DimpleModel {
    let mut m = model();
    m.text.set_host_kernels(false).unwrap();
    m
}

pub fn engine(cfg: EngineConfig) -> EngineHandle {
    dimple_engine::start(model(), cfg, None)
}

/// One single-request golden generation: the request and what the reference produced.
pub struct Case {
    pub name: String,
    pub request: GenerateRequest,
    /// Response row after each step.
    pub history: Vec<Vec<u32>>,
    pub steps_taken: usize,
}

/// Every golden generation case with one row (the batched ones decode jointly).
pub fn single_cases() -> Vec<Case> {
    let mut names: Vec<String> = std::fs::read_dir(golden(""))
        .expect("golden fixtures present")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen_") && n.ends_with(".json") && !n.starts_with("gen_batch"))
        .map(|n| n.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    assert!(
        names.len() >= 30,
        "expected the full golden set, found {}",
        names.len()
    );
    names.iter().map(|n| load_case(n)).collect()
}

pub fn load_case(name: &str) -> Case {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{name}.json"))).unwrap())
            .unwrap();
    let t = candle_core::safetensors::load(golden(&format!("{name}.safetensors")), &Device::Cpu)
        .unwrap();
    let p = &json["params"];
    let mut params = DecodeParams {
        max_new_tokens: p["max_new_tokens"].as_u64().unwrap() as usize,
        steps: p["steps"].as_u64().unwrap() as usize,
        threshold: p["alg_p_threshold"].as_f64().map(|x| x as f32),
        alg: p["alg"].as_str().unwrap().parse().unwrap(),
        pipeline: p["decoding_pipeline"].as_str().unwrap().parse().unwrap(),
        temperature: p["temperature"].as_f64().unwrap() as f32,
        use_original_confidence: p["use_original_confidence"].as_bool().unwrap(),
        use_cache: p["use_cache"].as_bool().unwrap(),
        ..DecodeParams::default()
    };
    if let Some(fixed) = json["tokens_hook"]["fixed_response_positions"].as_object() {
        let mut f: Vec<(usize, u32)> = fixed
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap() as u32))
            .collect();
        f.sort();
        params.prior = StructurePrior { fixed: f };
    }
    let prompt_ids: Vec<u32> = json["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let images = match json["pixel_values_source"].as_str() {
        None => Vec::new(),
        Some(src) => {
            assert!(
                src.contains("image1") && !src.contains("image2"),
                "unexpected source {src}"
            );
            vec![golden_image(1)]
        }
    };
    let n = params.max_new_tokens;
    let hist = t["history"].to_dtype(DType::I64).unwrap();
    let (steps, b, l) = hist.dims3().unwrap();
    assert_eq!(b, 1);
    let flat: Vec<i64> = hist.flatten_all().unwrap().to_vec1().unwrap();
    let history = (0..steps)
        .map(|s| {
            flat[s * l + l - n..(s + 1) * l]
                .iter()
                .map(|&x| x as u32)
                .collect()
        })
        .collect();
    Case {
        name: name.to_string(),
        request: GenerateRequest {
            prompt_ids,
            images,
            params,
            deadline: None,
        },
        history,
        steps_taken: json["steps_taken"].as_u64().unwrap() as usize,
    }
}

pub fn golden_image(k: usize) -> EngineImage {
    let pre = candle_core::safetensors::load(golden("preproc_default.safetensors"), &Device::Cpu)
        .unwrap();
    let pv = &pre[&format!("image{k}.pixel_values")];
    let (_, patch_dim) = pv.dims2().unwrap();
    let g: Vec<i64> = pre[&format!("image{k}.image_grid_thw")]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    EngineImage {
        pixel_values: pv.flatten_all().unwrap().to_vec1().unwrap(),
        patch_dim,
        grid_thw: [g[0] as usize, g[1] as usize, g[2] as usize],
    }
}

/// What a client saw: the response after each step (rebuilt from the streamed commits) and
/// the final message.
#[derive(Debug)]
pub struct Outcome {
    pub history: Vec<Vec<u32>>,
    pub finished: Finished,
}

/// Drains a request's events. `initial` is the response row before step 0 (masks + prior).
pub fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
    initial: Vec<u32>,
) -> Outcome {
    let mut row = initial;
    let mut history = Vec::new();
    loop {
        match rx
            .blocking_recv()
            .expect("the engine always ends a request with a final event")
        {
            EngineEvent::Step {
                step, committed, ..
            } => {
                assert_eq!(step, history.len(), "steps arrive in order");
                for (pos, tok) in committed {
                    row[pos] = tok;
                }
                history.push(row.clone());
            }
            EngineEvent::Finished(f) => {
                assert_eq!(
                    f.response_ids, row,
                    "the final response equals the streamed commits"
                );
                return Outcome {
                    history,
                    finished: f,
                };
            }
            EngineEvent::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

pub fn initial_row(req: &GenerateRequest, mask_id: u32) -> Vec<u32> {
    let mut row = vec![mask_id; req.params.max_new_tokens];
    for &(p, t) in &req.params.prior.fixed {
        row[p] = t;
    }
    row
}

pub const GOLDEN_MASK_ID: u32 = 301;

/// How long any test waits for the engine before declaring it stuck.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The next event of a request, or `None` if none arrived within `timeout`. A channel the
/// engine closed without a final event is a bug and panics.
pub fn recv_within(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
    timeout: std::time::Duration,
) -> Option<EngineEvent> {
    use tokio::sync::mpsc::error::TryRecvError;
    let until = std::time::Instant::now() + timeout;
    loop {
        match rx.try_recv() {
            Ok(ev) => return Some(ev),
            Err(TryRecvError::Disconnected) => {
                panic!("the engine closed a request without a final event")
            }
            Err(TryRecvError::Empty) if std::time::Instant::now() >= until => return None,
            Err(TryRecvError::Empty) => std::thread::sleep(std::time::Duration::from_micros(200)),
        }
    }
}

/// The final event of a request (success or failure) and the response after each step,
/// within `timeout` overall.
pub fn finish_within(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
    initial: Vec<u32>,
    timeout: std::time::Duration,
) -> (Vec<Vec<u32>>, Result<Finished, dimple_engine::EngineError>) {
    let until = std::time::Instant::now() + timeout;
    let mut row = initial;
    let mut history = Vec::new();
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match recv_within(&mut rx, left) {
            None => panic!(
                "no final event within {timeout:?} (after {} steps)",
                history.len()
            ),
            Some(EngineEvent::Step {
                step, committed, ..
            }) => {
                assert_eq!(step, history.len(), "steps arrive in order");
                for (pos, tok) in committed {
                    row[pos] = tok;
                }
                history.push(row.clone());
            }
            Some(EngineEvent::Finished(f)) => {
                assert_eq!(
                    f.response_ids, row,
                    "the final response equals the streamed commits"
                );
                return (history, Ok(f));
            }
            Some(EngineEvent::Failed(e)) => return (history, Err(e)),
        }
    }
}

/// [`collect`] with a bound on the wait: a request that does not finish in [`WAIT`] fails
/// the test instead of hanging it.
pub fn collect_within(
    rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
    initial: Vec<u32>,
) -> Outcome {
    match finish_within(rx, initial, WAIT) {
        (history, Ok(finished)) => Outcome { history, finished },
        (_, Err(e)) => panic!("request failed: {e}"),
    }
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < until,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// An engine over the golden model whose every step report is appended to the returned log.
pub fn engine_with_log(
    cfg: EngineConfig,
) -> (
    EngineHandle,
    std::sync::Arc<std::sync::Mutex<Vec<dimple_engine::StepReport>>>,
) {
    engine_with_log_on(model(), cfg)
}

/// [`engine_with_log`] over `model`.
pub fn engine_with_log_on(
    model: DimpleModel,
    cfg: EngineConfig,
) -> (
    EngineHandle,
    std::sync::Arc<std::sync::Mutex<Vec<dimple_engine::StepReport>>>,
) {
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    let hook = Box::new(move |r: &dimple_engine::StepReport| sink.lock().unwrap().push(*r));
    (dimple_engine::start(model, cfg, Some(hook)), log)
}

/// Token ids of a golden prompt from `info.json` (`p_text`, `p_text_b`, ...).
pub fn golden_prompt(name: &str) -> Vec<u32> {
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(golden("info.json")).unwrap()).unwrap();
    info["prompts"][name]
        .as_array()
        .unwrap_or_else(|| panic!("info.json has no prompt {name}"))
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}
