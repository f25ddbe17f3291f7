//! Sweep outputs in one directory: `run.json` (the resume key and metadata of the run that
//! made the folder), `configs/<key>.json` per configuration (status, summary and records;
//! complete ones are skipped by a re-run, failed ones are run again), `results.csv`,
//! `results.json`, `report.md` and the plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::grid::Load;
use crate::meta::{Metadata, ResumeKey, key_differences};
use crate::plots::{self, PlotFormat};
use crate::runner::Record;
use crate::stats::Summary;
use crate::{Result, SweepError, file_err};

/// One configuration as saved: its summary (as measured when it ran) and its records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub summary: Summary,
    pub records: Vec<Record>,
}

#[derive(Serialize, Deserialize)]
struct RunFile {
    resume_key: ResumeKey,
    metadata: Metadata,
}

pub struct OutputDir {
    root: PathBuf,
}

impl OutputDir {
    /// Opens (or creates) `root` for a run with `meta`. A folder written by a run with a
    /// different resume key is refused, naming each difference, unless `force`, which
    /// discards its saved configurations.
    pub fn open(root: &Path, meta: &Metadata, force: bool) -> Result<Self> {
        let configs = root.join("configs");
        let run = root.join("run.json");
        let key = meta.resume_key();
        let has_configs = std::fs::read_dir(&configs).is_ok_and(|mut d| d.next().is_some());
        // `Some(Err)`: a run.json that does not parse, refused like other settings.
        let saved: Option<std::result::Result<ResumeKey, String>> =
            std::fs::read_to_string(&run).ok().map(|text| {
                serde_json::from_str::<RunFile>(&text)
                    .map(|f| f.resume_key)
                    .map_err(|e| format!("its run.json does not parse: {e}"))
            });
        let refusal = match &saved {
            Some(Ok(saved)) => {
                let diffs = key_differences(saved, &key);
                (!diffs.is_empty()).then(|| diffs.join("; "))
            }
            Some(Err(e)) => Some(e.clone()),
            None if has_configs => Some("it has results but no run.json".to_string()),
            None => None,
        };
        if let Some(why) = refusal {
            if !force {
                return Err(SweepError::Resume(format!(
                    "{} was written by a run with other settings ({why}); give another \
                     --out, or --force to discard its results",
                    root.display()
                )));
            }
            std::fs::remove_dir_all(&configs).map_err(|e| file_err(&configs, e))?;
        }
        std::fs::create_dir_all(&configs).map_err(|e| file_err(root, e))?;
        let text = serde_json::to_string_pretty(&RunFile {
            resume_key: key,
            metadata: meta.clone(),
        })
        .map_err(|e| file_err(&run, e))?;
        write_atomic(&run, text.as_bytes())?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Every saved configuration, complete or failed, by key.
    pub fn saved(&self) -> Result<BTreeMap<String, Saved>> {
        let dir = self.root.join("configs");
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| file_err(&dir, e))? {
            let path = entry.map_err(|e| file_err(&dir, e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
                // A file that does not parse (interrupted write, older format) is redone.
                if let Ok(d) = serde_json::from_str::<Saved>(&text) {
                    out.insert(d.summary.key.clone(), d);
                }
            }
        }
        Ok(out)
    }

    /// Saves a configuration (written to a temporary name, then renamed).
    pub fn save(&self, saved: &Saved) -> Result<()> {
        let path = self
            .root
            .join("configs")
            .join(format!("{}.json", saved.summary.key));
        let text = serde_json::to_string(saved).map_err(|e| file_err(&path, e))?;
        write_atomic(&path, text.as_bytes())
    }

    /// Writes the tables, the Markdown report and the plots (complete configurations only)
    /// in each of `formats`.
    pub fn write_reports(
        &self,
        summaries: &[Summary],
        meta: &Metadata,
        formats: &[PlotFormat],
    ) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        let csv = self.path("results.csv");
        write_atomic(&csv, to_csv(summaries).as_bytes())?;
        written.push(csv);
        let json = self.path("results.json");
        let text = serde_json::to_string_pretty(&ResultsFile {
            metadata: meta,
            configurations: summaries.iter().map(row_json).collect(),
        })
        .map_err(|e| file_err(&json, e))?;
        write_atomic(&json, text.as_bytes())?;
        written.push(json);
        let complete: Vec<Summary> = summaries.iter().filter(|s| s.complete).cloned().collect();
        let mut drawn = Vec::new();
        for plot in plots::PLOTS {
            let mut made = false;
            for format in formats {
                let name = format!("{}.{}", plot.name, format.extension());
                let p = self.path(&name);
                // A chart with no data (no references, no open-loop points) is skipped.
                if (plot.draw)(&p, &complete, *format).is_ok() {
                    written.push(p);
                    made = true;
                }
            }
            if made {
                drawn.push(plot);
            }
        }
        let image_ext = formats
            .iter()
            .find(|f| **f == PlotFormat::Png)
            .or(formats.first())
            .map_or("png", |f| f.extension());
        let md = self.path("report.md");
        write_atomic(
            &md,
            to_markdown(summaries, meta, &drawn, image_ext).as_bytes(),
        )?;
        written.push(md);
        Ok(written)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

/// `results.json`: the metadata first, then one row per configuration.
#[derive(Serialize)]
struct ResultsFile<'a> {
    metadata: &'a Metadata,
    configurations: Vec<serde_json::Value>,
}

const COLUMNS: &[&str] = &[
    "key",
    "status",
    "pipeline",
    "alg",
    "threshold",
    "cache_mode",
    "max_new_tokens",
    "block_length",
    "steps",
    "load",
    "requests",
    "ok",
    "accuracy",
    "accuracy_ci95_low",
    "accuracy_ci95_high",
    "accuracy_answered",
    "nfe_mean",
    "answer_tokens_per_forward",
    "latency_mean_s",
    "latency_p50_s",
    "latency_p90_s",
    "latency_p99_s",
    "first_commit_p50_s",
    "first_commit_p99_s",
    "step_latency_p50_s",
    "answer_tokens_per_s",
    "slots_per_s",
    "requests_per_s",
    "goodput_rps",
    "slo_attainment",
    "errors",
];

fn load_str(load: Load) -> String {
    match load {
        Load::Concurrency(c) => format!("concurrency {c}"),
        Load::Rate(r) => format!("rate {r}/s"),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |x| format!("{x:.digits$}"))
}

fn status(s: &Summary) -> &'static str {
    if s.complete { "complete" } else { "failed" }
}

fn threshold_str(t: Option<f32>) -> String {
    t.map_or("none".into(), |t| t.to_string())
}

fn errors_str(s: &Summary) -> String {
    s.errors
        .iter()
        .map(|(k, v)| format!("{k}={}", v.count))
        .collect::<Vec<_>>()
        .join(" ")
}

fn cells(s: &Summary) -> Vec<String> {
    let c = &s.config;
    vec![
        s.key.clone(),
        status(s).into(),
        c.pipeline.to_string(),
        c.alg.to_string(),
        threshold_str(c.threshold),
        c.cache_mode.to_string(),
        c.max_new_tokens.to_string(),
        c.slots_per_block().to_string(),
        c.steps.to_string(),
        load_str(c.load),
        s.requests.to_string(),
        s.ok.to_string(),
        opt(s.accuracy, 4),
        opt(s.accuracy_ci95.map(|c| c.0), 4),
        opt(s.accuracy_ci95.map(|c| c.1), 4),
        opt(s.accuracy_answered, 4),
        format!("{:.3}", s.nfe_mean),
        format!("{:.3}", s.answer_tokens_per_forward),
        format!("{:.4}", s.latency_mean_s),
        format!("{:.4}", s.latency_p50_s),
        format!("{:.4}", s.latency_p90_s),
        format!("{:.4}", s.latency_p99_s),
        opt(s.first_commit_p50_s, 4),
        opt(s.first_commit_p99_s, 4),
        format!("{:.5}", s.step_latency_p50_s),
        format!("{:.2}", s.answer_tokens_per_s),
        format!("{:.2}", s.slots_per_s),
        format!("{:.3}", s.requests_per_s),
        opt(s.goodput_rps, 3),
        opt(s.slo_attainment, 4),
        errors_str(s),
    ]
}

pub fn to_csv(summaries: &[Summary]) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for s in summaries {
        let row: Vec<String> = cells(s)
            .into_iter()
            .map(|c| {
                if c.contains([',', '"', '\n']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c
                }
            })
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

fn row_json(s: &Summary) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("latencies_s");
        m.insert("status".into(), status(s).into());
    }
    v
}

fn metadata_md(meta: &Metadata) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        (
            "command",
            format!("`{}`", meta.command_line.replace('`', "'")),
        ),
        ("date", meta.date.clone()),
        ("software", meta.software.clone()),
        (
            "dataset",
            format!(
                "{}: {} items{}, sha256 `{}`",
                meta.dataset.name,
                meta.dataset.items,
                meta.dataset
                    .limit
                    .map_or(String::new(), |l| format!(" (--limit {l})")),
                meta.dataset.sha256
            ),
        ),
        (
            "model",
            format!(
                "{}, sha256 `{}`, default response length {}",
                meta.model.name, meta.model.sha256, meta.model.default_max_new_tokens
            ),
        ),
    ];
    let target = match (&meta.target.url, &meta.target.server) {
        (Some(url), Some(info)) => format!("{} {url}; GetModelInfo: `{info}`", meta.target.kind),
        (Some(url), None) => format!("{} {url}", meta.target.kind),
        _ => meta.target.kind.clone(),
    };
    rows.push(("target", target));
    rows.push(("seed", meta.seed.to_string()));
    rows.push(("repeats", meta.repeats.to_string()));
    rows.push(("warm-up requests", meta.warmup.to_string()));
    rows.push((
        "latency SLO",
        meta.slo_ms.map_or("none".into(), |s| format!("{s} ms")),
    ));
    let mut md = String::from("| run | |\n|---|---|\n");
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {} |", v.replace('|', "\\|"));
    }
    md
}

fn by_kind(s: &Summary) -> String {
    s.accuracy_by_kind
        .iter()
        .map(|(k, a)| format!("{k} {:.2}", a.accuracy))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn to_markdown(
    summaries: &[Summary],
    meta: &Metadata,
    plots: &[&plots::Plot],
    image_ext: &str,
) -> String {
    let failed: Vec<&Summary> = summaries.iter().filter(|s| !s.complete).collect();
    let mut md = format!("# {}\n\n", meta.title);
    md.push_str(&metadata_md(meta));
    let _ = writeln!(
        md,
        "\n{} configurations: {} complete, {} failed.\n",
        summaries.len(),
        summaries.len() - failed.len(),
        failed.len()
    );
    let head = [
        "status",
        "pipeline",
        "alg",
        "threshold",
        "cache",
        "n",
        "block",
        "load",
        "ok/req",
        "accuracy [95% CI]",
        "acc. answered",
        "accuracy by kind",
        "NFE",
        "ans. tok/fwd",
        "p50 s",
        "p90 s",
        "p99 s",
        "TTFC p50 s",
        "TTFC p99 s",
        "step p50 ms",
        "answer tok/s",
        "slots/s",
        "req/s",
        "goodput req/s",
        "errors",
    ];
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(
        md,
        "|{}|",
        head.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for s in summaries {
        let c = &s.config;
        let acc = match (s.accuracy, s.accuracy_ci95) {
            (Some(a), Some((lo, hi))) => format!("{a:.3} [{lo:.3}, {hi:.3}]"),
            _ => "-".into(),
        };
        let row = [
            status(s).to_string(),
            c.pipeline.to_string(),
            c.alg.to_string(),
            threshold_str(c.threshold),
            c.cache_mode.to_string(),
            c.max_new_tokens.to_string(),
            c.slots_per_block().to_string(),
            load_str(c.load),
            format!("{}/{}", s.ok, s.requests),
            acc,
            opt(s.accuracy_answered, 3),
            by_kind(s),
            format!("{:.2}", s.nfe_mean),
            format!("{:.3}", s.answer_tokens_per_forward),
            format!("{:.3}", s.latency_p50_s),
            format!("{:.3}", s.latency_p90_s),
            format!("{:.3}", s.latency_p99_s),
            opt(s.first_commit_p50_s, 3),
            opt(s.first_commit_p99_s, 3),
            format!("{:.1}", s.step_latency_p50_s * 1e3),
            format!("{:.1}", s.answer_tokens_per_s),
            format!("{:.1}", s.slots_per_s),
            format!("{:.2}", s.requests_per_s),
            opt(s.goodput_rps, 2),
            errors_str(s),
        ];
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    if !failed.is_empty() {
        md.push_str(
            "\n## Failed configurations\n\nNot every request was answered, so these are \
             left out of the plots and run again when the sweep is resumed.\n\n",
        );
        for s in &failed {
            let _ = writeln!(md, "- `{}`: answered {}/{}", s.key, s.ok, s.requests);
            for (code, e) in &s.errors {
                let msgs = e
                    .messages
                    .iter()
                    .map(|m| format!("\"{m}\""))
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = writeln!(md, "  - {code} x{}: {msgs}", e.count);
            }
        }
    }
    if !plots.is_empty() {
        md.push_str("\n## Plots\n");
        for p in plots {
            let _ = write!(
                md,
                "\n### {}\n\n{}\n\n![{}]({}.{image_ext})\n",
                p.title, p.about, p.title, p.name
            );
        }
    }
    md.push_str(COLUMN_NOTES);
    md
}

const COLUMN_NOTES: &str = "
## Columns

- **cache**: what each step recomputes (`exact`, `prefix` or `dual`). **n**: response
  slots. **block**: slots per block (`n` when the whole response is one block).
- **accuracy**: correct answers over every item with a reference; an unanswered item counts
  as wrong. The interval is the 95% Wilson score interval. **acc. answered**: over the
  answered items only.
- **NFE**: forward passes per answered request. **ans. tok/fwd**: answer tokens (before the
  end token) per forward pass.
- **p50/p90/p99**: request latency quantiles (answered requests, warm-up excluded).
  **TTFC**: time from sending a request until its first response slot was committed.
  **step**: median of each request's latency divided by its forward passes.
- **answer tok/s**: answer tokens per second of wall time. **slots/s**: response slots
  decoded per second, the padding after the end token included.
- **goodput**: requests answered within the latency SLO, per second of wall time.
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Grid;
    use crate::meta::{DatasetInfo, ModelInfo, TargetInfo};

    pub(crate) fn meta(items: usize) -> Metadata {
        Metadata {
            title: "t".into(),
            command_line: "dimple sweep".into(),
            date: "2026-12-01T00:00:00Z".into(),
            software: "dimple 0".into(),
            seed: 0,
            dataset: DatasetInfo {
                name: "d".into(),
                items,
                sha256: format!("h{items}"),
                limit: None,
                synthetic: None,
            },
            model: ModelInfo {
                name: "m".into(),
                sha256: "mh".into(),
                default_max_new_tokens: 16,
            },
            target: TargetInfo {
                kind: "in-process".into(),
                url: None,
                server: None,
            },
            repeats: 1,
            warmup: 0,
            slo_ms: None,
        }
    }

    fn saved(ok: bool) -> Saved {
        let config = Grid::default().configs(16).unwrap().remove(0);
        let records = vec![Record {
            item: "a".into(),
            kind: None,
            code: if ok { "OK" } else { "UNAVAILABLE" }.into(),
            message: (!ok).then(|| "gone".to_string()),
            reference: true,
            latency_s: 0.5,
            first_commit_s: None,
            steps: 2,
            tokens: 16,
            answer_tokens: 1,
            correct: Some(ok),
            answer: None,
        }];
        Saved {
            summary: Summary::from_records(&config, &records, 1.0, None),
            records,
        }
    }

    #[test]
    fn a_folder_of_another_run_is_refused_unless_forced() {
        let dir = std::env::temp_dir().join(format!("dimple-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = OutputDir::open(&dir, &meta(20), false).unwrap();
        out.save(&saved(true)).unwrap();
        // Same settings: resumed, the configuration is still there.
        let out = OutputDir::open(&dir, &meta(20), false).unwrap();
        assert_eq!(out.saved().unwrap().len(), 1);
        let err = OutputDir::open(&dir, &meta(100), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("dataset items: was 20, now 100") && err.contains("--force"),
            "{err}"
        );
        let out = OutputDir::open(&dir, &meta(100), true).unwrap();
        assert!(out.saved().unwrap().is_empty(), "forced: old results gone");
        // A damaged run.json is refused too, and --force recovers the folder.
        std::fs::write(dir.join("run.json"), "{").unwrap();
        let err = OutputDir::open(&dir, &meta(100), false).err().unwrap();
        assert!(err.to_string().contains("does not parse"), "{err}");
        assert!(OutputDir::open(&dir, &meta(100), true).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_configurations_are_reported_as_failed() {
        let (good, bad) = (saved(true), saved(false));
        let md = to_markdown(
            &[good.summary.clone(), bad.summary.clone()],
            &meta(1),
            &[],
            "png",
        );
        assert!(md.starts_with("# t\n\n| run | |"), "{md}");
        assert!(md.contains("1 complete, 1 failed"));
        assert!(md.contains("UNAVAILABLE x1: \"gone\""), "{md}");
        let csv = to_csv(&[bad.summary]);
        assert!(csv.lines().nth(1).unwrap().contains(",failed,"));
    }

    #[test]
    fn cache_mode_and_block_length_are_columns() {
        let records = saved(true).records;
        let summaries: Vec<Summary> = Grid {
            cache_mode: vec!["dual".into(), "exact".into()],
            block_length: vec![Some(4), None],
            ..Grid::default()
        }
        .configs(16)
        .unwrap()
        .iter()
        .map(|c| Summary::from_records(c, &records, 1.0, None))
        .collect();
        let csv = to_csv(&summaries);
        let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
        let col = |name: &str| lines[0].iter().position(|c| *c == name).unwrap();
        let (mode, block) = (col("cache_mode"), col("block_length"));
        let cells: Vec<(&str, &str)> = lines[1..].iter().map(|r| (r[mode], r[block])).collect();
        // The whole response is one block of n = 16 slots.
        assert_eq!(
            cells,
            vec![
                ("dual", "4"),
                ("dual", "16"),
                ("exact", "4"),
                ("exact", "16")
            ]
        );
        let md = to_markdown(&summaries, &meta(1), &[], "png");
        assert!(
            md.contains("| threshold | cache | n | block | load |"),
            "{md}"
        );
        assert!(
            md.contains("| none | dual | 16 | 4 | concurrency 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| none | exact | 16 | 16 | concurrency 1 |"),
            "{md}"
        );
    }
}
