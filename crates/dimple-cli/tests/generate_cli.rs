//! `dimple generate` end to end: the real binary, run on the golden checkpoint with the
//! golden prompts and flags, prints the reference's response, step count and step history;
//! on the built-in demo model it answers a question; bad flags fail with a message that
//! names the flag. `dimple bench-random` on a small random model checks batch invariance
//! and reports every level.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use serde_json::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(rel)
}

fn golden(name: &str) -> PathBuf {
    repo("tests/fixtures/golden").join(name)
}

/// The binary with a clean environment: every flag can also come from a `DIMPLE_*`
/// variable, and a stray one must not change what the test asks for.
fn dimple(args: &[String]) -> Output {
    dimple_command()
        .args(args)
        .output()
        .expect("the dimple binary runs")
}

/// The same, as a command to add arguments to.
fn dimple_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dimple"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DIMPLE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_BACKTRACE", "0").current_dir(repo(""));
    cmd
}

fn json_output(args: &[String]) -> Value {
    let out = dimple(args);
    assert!(
        out.status.success(),
        "dimple {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("--json output {stdout:?}: {e}"))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// The command line that reproduces golden case `name`, built from its recorded call.
fn golden_args(name: &str, case: &Value) -> Vec<String> {
    let p = &case["params"];
    let n = p["max_new_tokens"].as_u64().unwrap();
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        "tests/fixtures/golden".into(),
        "--input-ids".into(),
        join(&ids(&case["input_ids"][0])),
        "--max-new-tokens".into(),
        n.to_string(),
        "--steps".into(),
        p["steps"].as_u64().unwrap().to_string(),
        "--alg".into(),
        p["alg"].as_str().unwrap().into(),
        "--pipeline".into(),
        p["decoding_pipeline"].as_str().unwrap().into(),
        "--json".into(),
    ];
    assert_eq!(
        p["temperature"].as_f64(),
        Some(0.0),
        "{name}: golden runs are greedy"
    );
    if let Some(t) = p["alg_p_threshold"].as_f64() {
        args.extend(["--threshold".into(), t.to_string()]);
    }
    if p["use_cache"].as_bool().unwrap() {
        args.push("--cache".into());
    }
    if !p["use_original_confidence"].as_bool().unwrap() {
        args.push("--no-original-confidence".into());
    }
    if let Some(fixed) = case["tokens_hook"]["fixed_response_positions"].as_object() {
        let mut items: Vec<(u64, u64)> = fixed
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
            .collect();
        items.sort();
        let prior: Vec<String> = items.iter().map(|(p, t)| format!("{p}:{t}")).collect();
        args.extend(["--prior".into(), prior.join(",")]);
    }
    if let Some(src) = case["pixel_values_source"].as_str() {
        // The binary preprocesses the PNG itself; the reference tensors came from image1.
        assert!(
            src.contains("image1"),
            "{name}: unexpected image source {src}"
        );
        args.extend(["--image".into(), "tests/fixtures/golden/image1.png".into()]);
    }
    args
}

fn check_golden(name: &str, expect_flag: Option<&str>) {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{name}.json"))).unwrap())
            .unwrap();
    let args = golden_args(name, &case);
    if let Some(flag) = expect_flag {
        assert!(
            args.iter().any(|a| a == flag),
            "{name}: the case should exercise {flag}"
        );
    }
    let out = json_output(&args);

    let n = case["params"]["max_new_tokens"].as_u64().unwrap() as usize;
    let tensors =
        candle_core::safetensors::load(golden(&format!("{name}.safetensors")), &Device::Cpu)
            .unwrap();
    let hist = tensors["history"].to_dtype(DType::I64).unwrap();
    let (steps, _, l) = hist.dims3().unwrap();
    let flat: Vec<i64> = hist.flatten_all().unwrap().to_vec1().unwrap();
    let want_history: Vec<Vec<u64>> = (0..steps)
        .map(|s| {
            flat[s * l + l - n..(s + 1) * l]
                .iter()
                .map(|&x| x as u64)
                .collect()
        })
        .collect();

    assert_eq!(
        ids(&out["response_ids"]),
        ids(&case["response"][0]),
        "{name}: response_ids"
    );
    assert_eq!(
        out["steps"].as_u64(),
        case["steps_taken"].as_u64(),
        "{name}: steps"
    );
    let got_history: Vec<Vec<u64>> = out["history"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(
        got_history.len(),
        want_history.len(),
        "{name}: history length"
    );
    for (s, (got, want)) in got_history.iter().zip(&want_history).enumerate() {
        assert_eq!(got, want, "{name}: response after step {s}");
    }
}

#[test]
fn text_cases_match_the_reference() {
    check_golden("gen_text_n16_thrnone_cache0", None);
    check_golden("gen_text_n24_thr0p9_cache1", Some("--cache"));
    check_golden("gen_text_n24_steps5_thr0p9_cache0", Some("--threshold"));
}

#[test]
fn image_cases_match_the_reference() {
    check_golden("gen_image_n16_thr0p5_cache1", Some("--image"));
    check_golden("gen_image_n24_thrnone_cache0", Some("--image"));
}

#[test]
fn prior_cases_match_the_reference() {
    check_golden("gen_prior_n24_thr0p9_cache0", Some("--prior"));
    check_golden("gen_prior_n24_thrnone_cache1", Some("--prior"));
    // The brief's spelling of the same prior.
    let case: Value = serde_json::from_str(
        &std::fs::read_to_string(golden("gen_prior_n24_thr0p9_cache0.json")).unwrap(),
    )
    .unwrap();
    let args = golden_args("gen_prior_n24_thr0p9_cache0", &case);
    let at = args.iter().position(|a| a == "--prior").unwrap();
    assert_eq!(args[at + 1], "0:11,1:22,2:33,10:307");
}

#[test]
fn other_algorithms_and_dream_match_the_reference() {
    check_golden("gen_text_n16_dream_cache1", Some("dream"));
    check_golden("gen_text_n24_steps8_dream_cache0", Some("dream"));
    check_golden("gen_text_n16_autoregressive_cache0", Some("autoregressive"));
    check_golden("gen_text_n16_entropy_cache0", Some("entropy"));
    check_golden("gen_text_n16_topk_margin_cache0", Some("topk_margin"));
}

fn demo(extra: &[&str]) -> Value {
    let mut args: Vec<String> = vec![
        "generate".into(),
        "What is 3 plus 4?".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    json_output(&args)
}

#[test]
fn the_builtin_demo_model_answers() {
    let out = dimple(&["generate".into(), "What is 3 plus 4?".into()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "7");

    let plain = demo(&[]);
    let confident = demo(&["--threshold", "0.9"]);
    assert_eq!(plain["text"], "7");
    assert_eq!(confident["text"], "7");
    let (a, b) = (
        plain["steps"].as_u64().unwrap(),
        confident["steps"].as_u64().unwrap(),
    );
    assert!(
        b < a,
        "--threshold 0.9 takes fewer forward passes ({b}) than the schedule alone ({a})"
    );
    assert_eq!(plain["history"].as_array().unwrap().len() as u64, a);
    assert_eq!(plain["finish_reason"], "completed");
}

#[test]
fn bad_flags_fail_naming_the_flag() {
    for (flag, value, needle) in [
        ("--threshold", "1.5", "threshold"),
        ("--alg", "greedy", "alg"),
        ("--pipeline", "llada", "pipeline"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--prior", "0:11,zz", "prior"),
        ("--block-length", "0", "block_length"),
        ("--cache-mode", "full", "cache"),
    ] {
        let out = dimple(&[
            "generate".into(),
            "What is 3 plus 4?".into(),
            flag.into(),
            value.into(),
        ]);
        assert!(!out.status.success(), "{flag} {value} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{flag} {value}: stderr {err:?} should name {needle}"
        );
        assert!(out.stdout.is_empty(), "{flag} {value}: nothing on stdout");
    }
}

/// `--block-length` and `--cache-mode` reach the engine: the step log shows the blocks in
/// order, no step commits outside its block, and one whole-response dual block is the
/// official prefilling (`--cache`).
#[test]
fn block_and_cache_mode_flags() {
    let name = "gen_text_n24_thr0p9_cache1";
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{name}.json"))).unwrap())
            .unwrap();
    let base = golden_args(name, &case);
    let without_cache: Vec<String> = base.iter().filter(|a| *a != "--cache").cloned().collect();
    let mut one_block = without_cache.clone();
    one_block.extend([
        "--cache-mode".into(),
        "dual".into(),
        "--block-length".into(),
        "24".into(),
    ]);
    assert_eq!(
        json_output(&one_block)["history"],
        json_output(&base)["history"]
    );

    let mut blocks = without_cache;
    blocks.extend([
        "--cache-mode".into(),
        "dual".into(),
        "--block-length".into(),
        "8".into(),
    ]);
    let out = json_output(&blocks);
    let per_step: Vec<u64> = ids(&out["blocks"]);
    let history = out["history"].as_array().unwrap();
    assert_eq!(per_step.len(), history.len());
    assert!(per_step.windows(2).all(|w| w[0] <= w[1]), "{per_step:?}");
    assert_eq!(per_step.last(), Some(&2));
    let mut before = vec![301u64; 24];
    for (row, &b) in history.iter().map(ids).zip(&per_step) {
        for (j, (x, y)) in before.iter().zip(&row).enumerate() {
            if x != y {
                assert_eq!(j as u64 / 8, b, "slot {j} committed during block {b}");
            }
        }
        before = row;
    }
    assert_eq!(out["finish_reason"], "completed");
}

#[test]
fn bench_random_checks_invariance_and_reports_each_level() {
    let out = dimple_command()
        .args([
            "bench-random",
            "--shape",
            "small",
            "--device",
            "cpu",
            "--concurrency",
            "1,3",
            "--prompt-tokens",
            "12",
            "--response-tokens",
            "8",
            "--steps",
            "4",
            "--modes",
            "exact,cached",
            "--check-invariance",
            "3",
            "--peak-tflops",
            "1",
            "--matmul-seconds",
            "0.02",
        ])
        .output()
        .expect("the dimple binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench-random failed:\n{stdout}\n{stderr}"
    );
    for mode in ["exact", "cached"] {
        assert!(
            stdout.contains(&format!(
                "batch invariance ({mode}): alone and with 3 others, the same 8 tokens"
            )),
            "{stdout}"
        );
    }
    assert!(stdout.contains("best:"), "no matmul rate: {stdout}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| exact |") || l.starts_with("| cached |"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 4, "one row per mode and level: {stdout}");
    for r in &rows {
        // | mode | concurrency | forward passes | ... | useful GFLOP/s | of matmul best | MFU |
        let passes: usize = r[3].parse().expect("forward passes");
        let slots_per_s: f64 = r[7].parse().expect("slots/s");
        let gflops: f64 = r[8].parse().expect("useful GFLOP/s");
        assert!(passes >= 4, "4 steps per request: {r:?}");
        assert!(slots_per_s > 0.0 && gflops > 0.0, "{r:?}");
        assert!(r[9].ends_with('%') && r[10].ends_with('%'), "{r:?}");
    }
}

#[test]
fn prior_templates_decode_in_process() {
    // The front-end tokenises the template into fixed slots, in-process as on a router.
    let builder = dimple_router::prompt::PromptBuilder::builtin().unwrap();
    let out = demo(&["--prior-template", "ab<mask>c"]);
    let got = ids(&out["response_ids"]);
    let ab: Vec<u64> = builder
        .encode_text("ab")
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    let c: Vec<u64> = builder
        .encode_text("c")
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(got[..ab.len()], ab[..]);
    assert_eq!(got[ab.len() + 1..ab.len() + 1 + c.len()], c[..]);
    let first = ids(&out["history"][0]);
    assert_eq!(first[..ab.len()], ab[..], "fixed before the first step");
}

#[test]
fn a_saved_random_model_directory_serves_prompts_end_to_end() {
    let dir = std::env::temp_dir().join(format!("dimple-random-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let saved = dimple_command()
        .args([
            "bench-random",
            "--shape",
            "small",
            "--device",
            "cpu",
            "--save-model",
        ])
        .arg(&dir)
        .output()
        .expect("the dimple binary runs");
    assert!(
        saved.status.success(),
        "saving failed: {}",
        String::from_utf8_lossy(&saved.stderr)
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "preprocessor_config.json",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }

    // A chat prompt (the template's special tokens must resolve to the shape's ids) decodes
    // over the saved weights, and every id the model produces decodes to text.
    let out = dimple_command()
        .args(["generate", "--device", "cpu", "--model"])
        .arg(&dir)
        .args([
            "What is in the picture?",
            "--max-new-tokens",
            "8",
            "--steps",
            "4",
            "--json",
        ])
        .output()
        .expect("the dimple binary runs");
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let ids: Vec<u64> = v["response_ids"]
        .as_array()
        .expect("response ids")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 8, "{v}");
    let text = v["text"].as_str().expect("text");
    for id in ids.iter().filter(|&&id| id < 8192 - 16) {
        assert!(text.contains(&format!("<t{id}>")), "{id} not in {text:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
