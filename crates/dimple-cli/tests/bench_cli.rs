//! `dimple bench-random` end to end on a small random model: it measures the plain matmul
//! rate, checks that a request decodes the same alone and in a batch, and prints one table
//! row per mode and concurrency with a useful FLOP rate.

use std::process::Command;

#[test]
fn bench_random_checks_invariance_and_reports_each_level() {
    let out = Command::new(env!("CARGO_BIN_EXE_dimple"))
        .env_remove("DIMPLE_TP")
        .env_remove("DIMPLE_DEVICE")
        .env_remove("DIMPLE_DTYPE")
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
