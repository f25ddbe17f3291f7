//! `dimple sweep` end to end on the embedded demo model: a 2 thresholds x 2 concurrencies x
//! cache on/off grid over a small dataset whose official answers are known, checking the
//! CSV, JSON, Markdown and PNG outputs, the accuracy, the NFE ordering and resumption.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

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

    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 8);
    let mut nfe: BTreeMap<(String, bool), Vec<f64>> = BTreeMap::new();
    for r in &rows {
        let c = &r["config"];
        let thr = c["threshold"].as_f64().unwrap();
        let cache = c["use_cache"].as_bool().unwrap();
        let name = format!(
            "dim_thr{}_cache{}",
            if thr < 0.7 { "0.5" } else { "0.9" },
            u8::from(cache)
        );
        let expected = expected_accuracy(&chosen, &reference, &name);
        assert_eq!(r["requests"], 5);
        assert_eq!(r["ok"], 5);
        assert!(
            (r["accuracy"].as_f64().unwrap() - expected).abs() < 1e-9,
            "{name}: {} vs {expected}",
            r["accuracy"]
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
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
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
    assert_eq!(lines.len(), 9, "header + 8 rows");
    assert!(lines[0].starts_with("key,pipeline,alg,threshold"));
    let keys: HashSet<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(keys.len(), 8);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| pipeline |") && md.matches("\n| dim |").count() == 8,
        "{md}"
    );
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
    let stamp = std::fs::metadata(
        out.join("configs")
            .join(format!("{}.json", lines[1].split(',').next().unwrap())),
    )
    .unwrap()
    .modified()
    .unwrap();
    let log = run();
    assert!(log.contains("(8 already done, 0 to run)"), "{log}");
    assert_eq!(
        std::fs::read_dir(out.join("configs")).unwrap().count(),
        before
    );
    let stamp2 = std::fs::metadata(
        out.join("configs")
            .join(format!("{}.json", lines[1].split(',').next().unwrap())),
    )
    .unwrap()
    .modified()
    .unwrap();
    assert_eq!(stamp, stamp2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same kind of sweep sent to a running `dimple serve` over gRPC, with the server's
/// metrics read before and after: the answers are the official ones and the server counted
/// every request.
#[test]
fn sweep_against_a_running_router() {
    let dir = std::env::temp_dir().join(format!("dimple-sweep-router-test-{}", std::process::id()));
    let (chosen, reference) = known_dataset(&dir);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, metrics) = (free(), free());
    let mut server = Command::new(env!("CARGO_BIN_EXE_dimple"))
        .args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "`dimple serve` did not start"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "`dimple serve` exited early"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = dir.join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_dimple"))
        .args(["sweep", "--dataset"])
        .arg(dir.join("ds.jsonl"))
        .args([
            "--threshold",
            "0.9",
            "--concurrency",
            "2",
            "--cache",
            "true",
        ])
        .args([
            "--router",
            &format!("http://{listen}"),
            "--metrics-url",
            &format!("http://{metrics}/metrics"),
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        o.status.success(),
        "sweep failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
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
    assert!(r["first_commit_mean_s"].as_f64().unwrap() > 0.0);
    let server_requests = r["server"]["dimple_router_requests_total"]
        .as_f64()
        .unwrap();
    assert_eq!(
        server_requests, 5.0,
        "the router counted the sweep's requests: {}",
        r["server"]
    );
    let passes = r["server"]["dimple_engine_forward_passes_total"]
        .as_f64()
        .unwrap();
    assert!(
        passes >= 1.0 && passes <= official_nfe * 5.0,
        "forward passes {passes}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
