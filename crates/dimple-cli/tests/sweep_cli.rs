//! `dimple sweep` and `dimple bench` end to end, in-process and against a `dimple serve`
//! child process over gRPC: outputs and their measures checked against the official
//! outputs of the demo model, the cache mode and block length as grid dimensions,
//! failed configurations (a server killed mid-run), resumption and its refusal, default
//! folders, the built-in dataset from a copied binary, checkpoint generation configs, and a
//! closed stdout.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/demo_eval"
    ))
    .join(rel)
}

fn jsonl(rel: &str) -> Vec<Value> {
    std::fs::read_to_string(fixture(rel))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Items whose official NFE is lower at threshold 0.5 than at 0.9, some answered right and
/// some wrong by the official implementation (so accuracy is neither 0 nor 1), written as a
/// JSONL dataset into `dir`. Returns them and the official outputs.
fn known_dataset(dir: &std::path::Path) -> (Vec<Value>, Vec<Value>) {
    let items = jsonl("eval.jsonl");
    let reference = jsonl("reference_outputs.jsonl");
    let official = |id: &str, config: &str| -> Value {
        reference
            .iter()
            .find(|r| r["id"] == id && r["config"] == config)
            .unwrap()
            .clone()
    };
    let mut chosen = Vec::new();
    let (mut right, mut wrong) = (0, 0);
    for it in &items {
        let id = it["id"].as_str().unwrap();
        let lo = official(id, "dim_thr0.5_cache0");
        let hi = official(id, "dim_thr0.9_cache0");
        if lo["nfe"].as_u64() >= hi["nfe"].as_u64() {
            continue;
        }
        let ok = hi["correct"].as_bool().unwrap();
        if (ok && right < 3) || (!ok && wrong < 2) {
            if ok {
                right += 1
            } else {
                wrong += 1
            }
            chosen.push(it.clone());
        }
    }
    assert_eq!(chosen.len(), 5, "the fixture holds such items");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut ds = String::new();
    for it in &chosen {
        let mut it = it.clone();
        if let Some(img) = it["image"].as_str() {
            it["image"] = Value::String(fixture(img).display().to_string());
        }
        ds.push_str(&it.to_string());
        ds.push('\n');
    }
    std::fs::write(dir.join("ds.jsonl"), ds).unwrap();
    (chosen, reference)
}

fn dimple() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dimple"))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dimple-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `results.json`: the metadata and the configuration rows.
fn results(out: &std::path::Path) -> (Value, Vec<Value>) {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = v["configurations"].as_array().unwrap().clone();
    (v["metadata"].clone(), rows)
}

/// A saved configuration (`configs/<key>.json`): summary and records.
fn saved(out: &std::path::Path, key: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(out.join("configs").join(format!("{key}.json"))).unwrap(),
    )
    .unwrap()
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `dimple serve` as a child process, killed when dropped.
struct Server(Child);

impl Server {
    fn start(listen: std::net::SocketAddr, metrics: std::net::SocketAddr) -> Self {
        let mut child = dimple()
            .args([
                "serve",
                "--listen",
                &listen.to_string(),
                "--metrics-listen",
                &metrics.to_string(),
                // Tests run side by side: no fixed HTTP port.
                "--http-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "`dimple serve` did not start"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "`dimple serve` exited early"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The demo model's end token, from its generation config.
fn eos() -> u64 {
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/dimple-demo/generation_config.json"
        ))
        .unwrap(),
    )
    .unwrap();
    cfg["eos_token_id"].as_u64().unwrap()
}

/// The official response's answer length: its tokens before the end token.
fn official_answer_tokens(r: &Value) -> usize {
    let eos = eos();
    let ids: Vec<u64> = r["response_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    ids.iter().position(|&t| t == eos).unwrap_or(ids.len())
}

fn official<'a>(reference: &'a [Value], id: &str, config: &str) -> &'a Value {
    reference
        .iter()
        .find(|r| r["id"] == id && r["config"] == config)
        .unwrap()
}

/// The official accuracy of `chosen` under a setting name such as `dim_thr0.9_cache1`.
fn expected_accuracy(chosen: &[Value], reference: &[Value], name: &str) -> f64 {
    chosen
        .iter()
        .filter(|it| official(reference, it["id"].as_str().unwrap(), name)["correct"] == true)
        .count() as f64
        / chosen.len() as f64
}

#[test]
fn small_sweep_writes_every_output_and_measures_right() {
    let dir = std::env::temp_dir().join(format!("dimple-sweep-test-{}", std::process::id()));
    let (chosen, reference) = known_dataset(&dir);
    let official = |id: &str, config: &str| official(&reference, id, config).clone();
    let out = dir.join("out");
    let run = || {
        let o = Command::new(env!("CARGO_BIN_EXE_dimple"))
            .args(["sweep", "--dataset"])
            .arg(dir.join("ds.jsonl"))
            .args([
                "--threshold",
                "0.5,0.9",
                "--concurrency",
                "1,2",
                "--cache",
                "false,true",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "sweep failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let log = run();
    assert!(
        log.contains("8 configurations (0 already done, 8 to run)"),
        "{log}"
    );
    // One progress line per configuration, with the overall count and an ETA, though
    // stderr is not a terminal here.
    for k in 1..=8 {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("[{k}/8] ")))
            .unwrap_or_else(|| panic!("no line for configuration {k}: {log}"));
        assert!(line.contains(", eta "), "{line}");
    }

    let (meta, rows) = results(&out);
    assert_eq!(rows.len(), 8);
    assert_eq!(meta["dataset"]["items"], 5);
    assert_eq!(meta["dataset"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(meta["model"]["name"], "dimple-demo");
    assert_eq!(meta["target"]["kind"], "in-process");
    assert!(
        meta["command_line"]
            .as_str()
            .unwrap()
            .contains("--threshold 0.5,0.9")
    );
    let mut nfe: BTreeMap<(String, bool), Vec<f64>> = BTreeMap::new();
    for r in &rows {
        let c = &r["config"];
        let thr = c["threshold"].as_f64().unwrap();
        // `--cache false,true` is the older spelling of `--cache-mode exact,prefix`.
        let cache = match c["cache_mode"].as_str().unwrap() {
            "exact" => false,
            "prefix" => true,
            other => panic!("cache mode {other}"),
        };
        assert!(c["block_length"].is_null(), "one whole-response block");
        let name = format!(
            "dim_thr{}_cache{}",
            if thr < 0.7 { "0.5" } else { "0.9" },
            u8::from(cache)
        );
        let expected = expected_accuracy(&chosen, &reference, &name);
        assert_eq!(r["requests"], 5);
        assert_eq!(r["ok"], 5);
        assert_eq!(r["status"], "complete");
        let acc = r["accuracy"].as_f64().unwrap();
        assert!(
            (acc - expected).abs() < 1e-9,
            "{name}: {} vs {expected}",
            r["accuracy"]
        );
        let ci = &r["accuracy_ci95"];
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!(
            lo < acc && acc < hi && hi - lo < 0.9,
            "{name}: interval {ci}"
        );
        // Answer tokens are counted up to the end token, as in the official responses;
        // the response slots (padding included) are all 16.
        let key = r["key"].as_str().unwrap();
        let records = saved(&out, key)["records"].as_array().unwrap().clone();
        assert_eq!(records.len(), 5);
        let mut answer_tokens = 0;
        for rec in &records {
            let off = official(rec["item"].as_str().unwrap(), &name);
            assert_eq!(rec["tokens"], 16);
            assert_eq!(
                rec["answer_tokens"].as_u64().unwrap() as usize,
                official_answer_tokens(&off),
                "{name} {}",
                rec["item"]
            );
            answer_tokens += official_answer_tokens(&off);
        }
        let wall = r["wall_s"].as_f64().unwrap();
        let tps = r["answer_tokens_per_s"].as_f64().unwrap();
        assert!((tps - answer_tokens as f64 / wall).abs() < 1e-6 * tps.max(1.0));
        assert!(
            r["slots_per_s"].as_f64().unwrap() > 2.0 * tps,
            "slots include the padding"
        );
        let official_nfe: f64 = chosen
            .iter()
            .map(|it| {
                official(it["id"].as_str().unwrap(), &name)["nfe"]
                    .as_f64()
                    .unwrap()
            })
            .sum::<f64>()
            / chosen.len() as f64;
        assert!(
            (r["nfe_mean"].as_f64().unwrap() - official_nfe).abs() < 1e-9,
            "{name} NFE"
        );
        nfe.entry((if thr < 0.7 { "lo" } else { "hi" }.to_string(), cache))
            .or_default()
            .push(r["nfe_mean"].as_f64().unwrap());
        assert!(
            r["first_commit_p99_s"].as_f64().unwrap() >= r["first_commit_p50_s"].as_f64().unwrap()
        );
        assert!(r["latency_p99_s"].as_f64().unwrap() >= r["latency_p50_s"].as_f64().unwrap());
    }
    for cache in [false, true] {
        let lo = &nfe[&("lo".to_string(), cache)];
        let hi = &nfe[&("hi".to_string(), cache)];
        assert!(
            lo.iter().all(|l| hi.iter().all(|h| l < h)),
            "NFE lower at the lower threshold: {lo:?} vs {hi:?}"
        );
    }

    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    let first_key = lines[1].split(',').next().unwrap().to_string();
    assert_eq!(lines.len(), 9, "header + 8 rows");
    assert!(lines[0].starts_with("key,status,pipeline,alg,threshold"));
    let keys: HashSet<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(keys.len(), 8);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("# Dimple sweep\n\n| run | |"), "{md}");
    assert!(md.contains("--threshold 0.5,0.9"), "the command line: {md}");
    assert!(
        md.contains("| pipeline |") && md.matches("\n| complete | dim |").count() == 8,
        "{md}"
    );
    assert!(md.contains("accuracy by kind"), "{md}");
    // No open-loop point: no latency-vs-rate chart.
    assert!(!out.join("latency_vs_rate.png").exists());
    for png in [
        "accuracy_vs_nfe.png",
        "throughput_vs_concurrency.png",
        "latency_cdf.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png} is a PNG");
        assert!(md.contains(png));
    }

    // A re-run finds everything done and leaves the records as they were.
    let before = std::fs::read_dir(out.join("configs")).unwrap().count();
    let stamp = std::fs::metadata(out.join("configs").join(format!("{first_key}.json")))
        .unwrap()
        .modified()
        .unwrap();
    let log = run();
    assert!(log.contains("(8 already done, 0 to run)"), "{log}");
    assert_eq!(
        std::fs::read_dir(out.join("configs")).unwrap().count(),
        before
    );
    let stamp2 = std::fs::metadata(out.join("configs").join(format!("{first_key}.json")))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(stamp, stamp2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Block length and cache mode as grid dimensions, in-process: both appear in every
/// output, a block of 4 slots takes at least one forward pass per block (so more than one
/// whole-response block at the same threshold), a repeated grid does no new work, and a
/// widened block list runs only its new points (a block as long as the response is the
/// whole-response point). A block longer than the response is refused by the engine,
/// naming the field, and reported as failed; misspelt values are refused up front.
#[test]
fn block_length_and_cache_mode_are_grid_dimensions() {
    let dir = temp_dir("sweep-blocks");
    let out = dir.join("out");
    let sweep = |args: &[&str], out: &std::path::Path| {
        let o = dimple()
            .args([
                "sweep",
                "--limit",
                "6",
                "--threshold",
                "0.9",
                "--warmup",
                "0",
            ])
            .args(["--format", "svg"])
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!log.contains("panicked"), "{log}");
        (o.status.success(), log)
    };
    let grid = ["--cache-mode", "exact,dual", "--block-length", "whole,4"];
    let (ok, log) = sweep(&grid, &out);
    assert!(ok, "{log}");
    assert!(
        log.contains("4 configurations (0 already done, 4 to run)"),
        "{log}"
    );
    let (_, rows) = results(&out);
    let mut nfe: BTreeMap<(String, u64), f64> = BTreeMap::new();
    for r in &rows {
        assert_eq!(r["status"], "complete", "{r}");
        let c = &r["config"];
        let mode = c["cache_mode"].as_str().unwrap().to_string();
        // `null`: the whole response of 16 slots is one block.
        let block = c["block_length"].as_u64().unwrap_or(16);
        let records = saved(&out, r["key"].as_str().unwrap())["records"].clone();
        for rec in records.as_array().unwrap() {
            // At least one pass per block (every block starts with masks), at most the
            // 16 steps shared among the blocks.
            let steps = rec["steps"].as_u64().unwrap();
            assert!(
                (16 / block..=16).contains(&steps),
                "{mode} block {block}: {rec}"
            );
            assert_eq!(rec["tokens"], 16);
        }
        nfe.insert((mode, block), r["nfe_mean"].as_f64().unwrap());
    }
    let points: Vec<(&str, u64)> = nfe.keys().map(|(m, b)| (m.as_str(), *b)).collect();
    assert_eq!(
        points,
        [("dual", 4), ("dual", 16), ("exact", 4), ("exact", 16)]
    );
    for mode in ["exact", "dual"] {
        assert!(
            nfe[&(mode.to_string(), 4)] > nfe[&(mode.to_string(), 16)],
            "{nfe:?}"
        );
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let col = |name: &str| lines[0].iter().position(|c| *c == name).unwrap();
    let (mode, block) = (col("cache_mode"), col("block_length"));
    let cells: HashSet<(&str, &str)> = lines[1..].iter().map(|r| (r[mode], r[block])).collect();
    let expected: HashSet<(&str, &str)> = [
        ("exact", "16"),
        ("exact", "4"),
        ("dual", "16"),
        ("dual", "4"),
    ]
    .into();
    assert_eq!(cells, expected);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| cache | n | block |"), "{md}");
    assert!(md.contains("| 0.9 | dual | 16 | 4 |"), "{md}");
    let chart = std::fs::read_to_string(out.join("accuracy_vs_nfe.svg")).unwrap();
    assert!(
        chart.contains("cache dual, block 4") && chart.contains("cache exact, block 16"),
        "the legend names the points"
    );

    // The same grid again: nothing to run. A block of 16 is the whole response, so only
    // the blocks of 8 are new.
    let (ok, log) = sweep(&grid, &out);
    assert!(ok && log.contains("(4 already done, 0 to run)"), "{log}");
    let (ok, log) = sweep(
        &["--cache-mode", "exact,dual", "--block-length", "16,8,4"],
        &out,
    );
    assert!(ok, "{log}");
    assert!(
        log.contains("6 configurations (4 already done, 2 to run)"),
        "{log}"
    );
    for k in [5, 6] {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("[{k}/6] ")))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(line.contains("_b8_"), "{line}");
    }
    assert_eq!(results(&out).1.len(), 6);

    // Longer than the 16-slot response: the engine refuses every request.
    let bad = dir.join("bad");
    let (ok, log) = sweep(&["--cache-mode", "dual", "--block-length", "32"], &bad);
    assert!(!ok, "{log}");
    let (_, rows) = results(&bad);
    let e = &rows[0]["errors"]["INVALID_ARGUMENT"];
    assert_eq!(
        (rows[0]["status"].as_str(), e["count"].as_u64()),
        (Some("failed"), Some(6))
    );
    let msg = e["messages"][0].as_str().unwrap();
    assert!(msg.contains("block_length"), "{msg}");

    for (args, refusal) in [
        (
            vec!["--block-length", "0"],
            "block_length must be an integer >= 1 or `whole`",
        ),
        (
            vec!["--cache-mode", "full"],
            "unknown `cache` mode \"full\"; expected one of: exact, prefix, dual",
        ),
        (
            vec!["--cache-mode", "dual", "--cache", "true"],
            "`cache_mode` (`--cache-mode`) and `use_cache` (`--cache`) both set the cache",
        ),
    ] {
        let (ok, log) = sweep(&args, &dir.join("refused"));
        assert!(!ok && log.contains(refusal), "{args:?}: {log}");
    }
    assert!(!dir.join("refused").exists(), "nothing written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same kind of sweep sent to a running `dimple serve` over gRPC, with the server's
/// metrics read before and after: the answers are the official ones, the server counted
/// every measured request (warm-up excluded) under its labels, gauges come as before/after
/// values, and a request the router refuses keeps its canonical code and message.
#[test]
fn sweep_against_a_running_router() {
    let dir = temp_dir("sweep-router");
    let (chosen, reference) = known_dataset(&dir);
    let (listen, metrics) = (free_port(), free_port());
    let _server = Server::start(listen, metrics);
    let out = dir.join("out");
    let sweep = |extra: &[&str], out: &std::path::Path| {
        dimple()
            .args(["sweep", "--dataset"])
            .arg(dir.join("ds.jsonl"))
            .args(["--concurrency", "2", "--cache", "true"])
            .args([
                "--router",
                &format!("http://{listen}"),
                "--metrics-url",
                &format!("http://{metrics}/metrics"),
            ])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let o = sweep(&["--threshold", "0.9", "--warmup", "3"], &out);
    assert!(
        o.status.success(),
        "sweep failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (meta, rows) = results(&out);
    assert_eq!(meta["target"]["kind"], "router");
    assert_eq!(meta["target"]["server"]["model"], "dimple-demo");
    assert_eq!(meta["model"]["default_max_new_tokens"], 16);
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["ok"], 5);
    let acc = r["accuracy"].as_f64().unwrap();
    assert!(
        (acc - expected_accuracy(&chosen, &reference, "dim_thr0.9_cache1")).abs() < 1e-9,
        "accuracy {acc}"
    );
    let official_nfe: f64 = chosen
        .iter()
        .map(|it| {
            official(&reference, it["id"].as_str().unwrap(), "dim_thr0.9_cache1")["nfe"]
                .as_f64()
                .unwrap()
        })
        .sum::<f64>()
        / 5.0;
    assert!((r["nfe_mean"].as_f64().unwrap() - official_nfe).abs() < 1e-9);
    let records = saved(&out, r["key"].as_str().unwrap())["records"].clone();
    for rec in records.as_array().unwrap() {
        let off = official(
            &reference,
            rec["item"].as_str().unwrap(),
            "dim_thr0.9_cache1",
        );
        assert_eq!(
            rec["answer_tokens"].as_u64().unwrap() as usize,
            official_answer_tokens(off)
        );
    }
    assert!(r["first_commit_p50_s"].as_f64().unwrap() > 0.0);
    let counters = r["server"]["counters"].as_object().unwrap();
    let requests: Vec<(&String, f64)> = counters
        .iter()
        .filter(|(k, _)| k.starts_with("dimple_router_requests_total{"))
        .map(|(k, v)| (k, v.as_f64().unwrap()))
        .collect();
    let ok_stream = requests
        .iter()
        .find(|(k, _)| k.contains("rpc=\"generate_stream\"") && k.contains("outcome=\"ok\""))
        .unwrap_or_else(|| panic!("labels kept: {requests:?}"));
    assert_eq!(
        ok_stream.1, 5.0,
        "the router counted the measured requests, not the warm-up: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .filter(|(k, _)| *k != ok_stream.0)
            .all(|(_, v)| *v == 0.0),
        "{requests:?}"
    );
    let passes = counters["dimple_engine_forward_passes_total"]
        .as_f64()
        .unwrap();
    assert!(
        passes >= 1.0 && passes <= official_nfe * 5.0,
        "forward passes {passes}"
    );
    let workers = &r["server"]["gauges"]["dimple_router_workers_count"];
    assert_eq!(workers["before"], 1.0, "{workers}");
    assert_eq!(workers["after"], 1.0, "{workers}");
    assert!(
        !counters.contains_key("dimple_router_workers_count"),
        "gauges are not counters"
    );

    // Block length and cache mode travel over gRPC to the worker: with blocks of 4 slots
    // and no threshold, the dual cache runs a block's later passes on its window alone
    // (the token before the block and the block), the exact mode every pass on the whole
    // sequence.
    let blocks = dir.join("blocks");
    let o = dimple()
        .args(["sweep", "--dataset"])
        .arg(dir.join("ds.jsonl"))
        .args(["--cache-mode", "exact,dual", "--block-length", "4"])
        .args([
            "--max-new-tokens",
            "8",
            "--threshold",
            "none",
            "--warmup",
            "0",
        ])
        .args([
            "--router",
            &format!("http://{listen}"),
            "--metrics-url",
            &format!("http://{metrics}/metrics"),
        ])
        .arg("--out")
        .arg(&blocks)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, rows) = results(&blocks);
    let mut tokens_per_pass = BTreeMap::new();
    for r in &rows {
        assert_eq!(
            (r["ok"].as_u64(), r["config"]["block_length"].as_u64()),
            (Some(5), Some(4))
        );
        let counters = &r["server"]["counters"];
        let passes = counters["dimple_engine_step_tokens_count"]
            .as_f64()
            .unwrap();
        assert_eq!(
            passes,
            r["nfe_mean"].as_f64().unwrap() * 5.0,
            "one pass per step, one request at a time"
        );
        // Two blocks: at least a pass each.
        assert!(passes >= 10.0, "{passes}");
        let tokens = counters["dimple_engine_step_tokens_sum"].as_f64().unwrap();
        tokens_per_pass.insert(
            r["config"]["cache_mode"].as_str().unwrap().to_string(),
            tokens / passes,
        );
    }
    assert!(
        tokens_per_pass["dual"] < tokens_per_pass["exact"],
        "{tokens_per_pass:?}"
    );

    // A response length beyond the server's limit: every request is refused, with the
    // canonical code name and the server's message, and the run fails.
    let bad = dir.join("bad");
    let o = sweep(&["--threshold", "0.9", "--max-new-tokens", "100000"], &bad);
    assert!(!o.status.success());
    let (_, rows) = results(&bad);
    let e = &rows[0]["errors"]["INVALID_ARGUMENT"];
    assert_eq!(e["count"], 5, "{}", rows[0]["errors"]);
    let msg = e["messages"][0].as_str().unwrap();
    assert!(msg.contains("max_new_tokens"), "{msg}");
    assert_eq!(rows[0]["status"], "failed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server killed while a configuration runs: that configuration is saved as failed with
/// its error counts, its accuracy counts the unanswered items as wrong, it is left out of
/// the plots, the command fails, and a re-run against a restarted server redoes only it.
#[test]
fn a_server_killed_mid_configuration_fails_it_and_resume_redoes_it() {
    let dir = temp_dir("sweep-kill");
    let (listen, metrics) = (free_port(), free_port());
    let mut server = Server::start(listen, metrics);
    let out = dir.join("out");
    let sweep = || {
        let mut c = dimple();
        c.args(["sweep", "--limit", "60", "--threshold", "0.9,none"])
            .args(["--cache", "true", "--concurrency", "1", "--warmup", "0"])
            .args(["--format", "svg", "--router", &format!("http://{listen}")])
            .arg("--out")
            .arg(&out);
        c
    };
    let mut child = sweep().stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.starts_with("[1/2]") {
            // The first configuration is saved; the second has just started.
            server.kill();
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "an incomplete run fails: {log}");
    assert!(
        log.contains("did not get an answer to every request"),
        "{log}"
    );

    let (_, rows) = results(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["status"], "complete", "{log}");
    let failed = &rows[1];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["complete"], false);
    let ok = failed["ok"].as_u64().unwrap();
    assert!(ok < 60, "{log}");
    // Requests sent after the kill cannot connect (UNAVAILABLE); the one in flight may end
    // with another code. Every request is counted once.
    let errors = failed["errors"].as_object().unwrap();
    let failures: u64 = errors.values().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(failures + ok, 60, "{}", failed["errors"]);
    let unavailable = &errors["UNAVAILABLE"];
    assert!(unavailable["count"].as_u64().unwrap() > 0);
    assert!(!unavailable["messages"][0].as_str().unwrap().is_empty());
    // Accuracy over all 60 items (unanswered = wrong) and over the answered ones.
    let records = saved(&out, failed["key"].as_str().unwrap())["records"].clone();
    let correct = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["correct"] == true)
        .count() as f64;
    assert_eq!(failed["scored"], 60);
    assert!((failed["accuracy"].as_f64().unwrap() - correct / 60.0).abs() < 1e-12);
    if ok > 0 {
        assert!(
            (failed["accuracy_answered"].as_f64().unwrap() - correct / ok as f64).abs() < 1e-12
        );
    }
    // Plots hold the complete configuration only.
    let cdf = std::fs::read_to_string(out.join("latency_cdf.svg")).unwrap();
    assert!(
        cdf.contains("thr 0.9") && !cdf.contains("thr none"),
        "{cdf}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Failed configurations") && md.contains("UNAVAILABLE x"),
        "{md}"
    );

    // Resume against a restarted server: only the failed configuration runs again.
    let _server = Server::start(listen, metrics);
    let o = sweep().output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("(1 already done, 1 to run)"), "{log}");
    let (_, rows) = results(&out);
    assert!(
        rows.iter()
            .all(|r| r["status"] == "complete" && r["ok"] == 60)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A folder written with other settings is refused, naming the difference, and `--force`
/// discards it.
#[test]
fn resume_refuses_a_folder_of_other_settings() {
    let dir = temp_dir("sweep-resume");
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        dimple()
            .args([
                "sweep",
                "--threshold",
                "0.9",
                "--cache",
                "true",
                "--warmup",
                "0",
            ])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run(&["--limit", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = std::fs::read(out.join("results.json")).unwrap();
    for (flags, difference) in [
        (vec!["--limit", "3"], "limit: was 2, now 3"),
        (
            vec!["--limit", "2", "--repeats", "2"],
            "repeats: was 1, now 2",
        ),
        (vec!["--synthetic", "2"], "synthetic: was none, now 2"),
    ] {
        let o = run(&flags);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flags:?} must be refused");
        assert!(err.contains(difference) && err.contains("--force"), "{err}");
        assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
    }
    let o = run(&["--limit", "3", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (meta, rows) = results(&out);
    assert_eq!(meta["dataset"]["items"], 3);
    assert_eq!(rows[0]["requests"], 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// From a directory with nothing in it and a copy of the binary elsewhere: the default
/// dataset is the built-in one (images included: the answers are the official ones),
/// `sweep` and `bench` write separate timestamped folders, and `--threshold none` works.
#[test]
fn defaults_work_from_anywhere_and_do_not_collide() {
    let dir = temp_dir("sweep-defaults");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_dimple"), bin.join("dimple")).unwrap();
    let cwd = dir.join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(bin.join("dimple"))
            .args(args)
            .current_dir(&cwd)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "sweep",
        "--limit",
        "6",
        "--threshold",
        "none,0.9",
        "--cache",
        "true",
    ]);
    run(&[
        "bench",
        "--limit",
        "2",
        "--concurrency",
        "1",
        "--threshold",
        "0.9",
        "--cache-mode",
        "dual",
        "--block-length",
        "4",
    ]);
    let folders: Vec<String> = std::fs::read_dir(&cwd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(folders.len(), 2, "{folders:?}");
    let sweep = folders.iter().find(|f| f.starts_with("sweep-")).unwrap();
    let bench = folders.iter().find(|f| f.starts_with("bench-")).unwrap();
    let (meta, rows) = results(&cwd.join(sweep));
    assert!(
        meta["dataset"]["name"]
            .as_str()
            .unwrap()
            .contains("built in")
    );
    assert_eq!(meta["dataset"]["items"], 6);
    assert_eq!(rows.len(), 2);
    assert!(
        rows[0]["config"]["threshold"].is_null(),
        "none: {}",
        rows[0]["config"]
    );
    let reference = jsonl("reference_outputs.jsonl");
    let items = jsonl("eval.jsonl");
    for r in &rows {
        let name = match r["config"]["threshold"].as_f64() {
            None => "dim_thrnone_cache1",
            Some(_) => "dim_thr0.9_cache1",
        };
        let expected = items[..6]
            .iter()
            .filter(|it| official(&reference, it["id"].as_str().unwrap(), name)["correct"] == true)
            .count() as f64
            / 6.0;
        assert!(
            (r["accuracy"].as_f64().unwrap() - expected).abs() < 1e-9,
            "{name}"
        );
    }
    assert!(
        items[..6].iter().any(|it| it["image"].is_string()),
        "images are used"
    );
    let (meta, bench_rows) = results(&cwd.join(bench));
    assert_eq!(meta["title"], "Dimple bench");
    // The bench's cache mode and block length reach its configuration and its decoding:
    // with blocks of 4, every request takes at least one pass per block.
    assert_eq!(bench_rows.len(), 1);
    assert_eq!(bench_rows[0]["config"]["cache_mode"], "dual");
    assert_eq!(bench_rows[0]["config"]["block_length"], 4);
    let nfe = bench_rows[0]["nfe_mean"].as_f64().unwrap();
    assert!(nfe >= 4.0, "mean NFE {nfe} with 4 blocks");
    assert!(cwd.join(bench).join("report.md").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--model DIR` takes the response length from the checkpoint's generation config; an
/// open-loop point gets its latency-vs-rate chart.
#[test]
fn a_checkpoint_generation_config_sets_the_response_length() {
    let dir = temp_dir("sweep-model");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let src = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/dimple-demo"
    ));
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    let gen_path = model.join("generation_config.json");
    let mut gen_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    gen_cfg["max_new_tokens"] = 8.into();
    std::fs::write(&gen_path, gen_cfg.to_string()).unwrap();
    let out = dir.join("out");
    let o = dimple()
        .args([
            "sweep",
            "--limit",
            "2",
            "--threshold",
            "0.9",
            "--warmup",
            "0",
            "--model",
        ])
        .arg(&model)
        .args(["--concurrency", "1", "--rate", "20", "--format", "png,svg"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (meta, rows) = results(&out);
    assert_eq!(meta["model"]["default_max_new_tokens"], 8);
    assert_eq!(rows[0]["config"]["max_new_tokens"], 8);
    let records = saved(&out, rows[0]["key"].as_str().unwrap())["records"].clone();
    assert!(records.as_array().unwrap().iter().all(|r| r["tokens"] == 8));
    assert_eq!(rows.len(), 2);
    let by_rate = std::fs::read_to_string(out.join("latency_vs_rate.svg")).unwrap();
    assert!(
        by_rate.contains("p50") && by_rate.contains("p99"),
        "{by_rate}"
    );
    assert!(out.join("latency_vs_rate.png").exists());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("latency_vs_rate.png"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output piped into a reader that goes away (`| head`): the run goes on and writes its
/// report.
#[test]
fn a_closed_stdout_does_not_stop_the_run() {
    let dir = temp_dir("sweep-pipe");
    let out = dir.join("out");
    let mut child = dimple()
        .args([
            "bench",
            "--limit",
            "2",
            "--concurrency",
            "1,2",
            "--threshold",
            "0.9",
        ])
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close both read ends at once: every write the command makes hits a broken pipe.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let (_, rows) = results(&out);
    assert_eq!(rows.len(), 2);
    assert!(out.join("report.md").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every flag of `sweep` and `bench` has help text, and the default thresholds are stated.
#[test]
fn every_flag_is_documented() {
    for cmd in ["sweep", "bench"] {
        let o = dimple().args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with("--") && !t.starts_with("-h") {
                continue;
            }
            // clap puts the text on the flag's line (short help) or on the next line.
            let flag_only = t.split("  ").filter(|s| !s.trim().is_empty()).count() == 1;
            let next = lines.get(i + 1).map_or("", |l| l.trim());
            assert!(
                !flag_only
                    || (!next.is_empty() && !next.starts_with("--") && !next.starts_with('[')),
                "`{cmd} {t}` has no help:\n{help}"
            );
        }
        if cmd == "sweep" {
            assert!(help.contains("none,0.5,0.7,0.9,0.95"), "{help}");
        }
    }
}
