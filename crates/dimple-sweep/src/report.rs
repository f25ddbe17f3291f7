//! Sweep outputs in one directory: `configs/<key>.json` per finished configuration (its
//! summary and records; a re-run skips these), `results.csv`, `results.json`, `report.md`
//! and the PNG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runner::Record;
use crate::stats::Summary;
use crate::{Result, file_err, plots};

#[derive(Serialize, Deserialize)]
struct Done {
    summary: Summary,
    records: Vec<Record>,
}

pub struct OutputDir {
    root: PathBuf,
}

impl OutputDir {
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root.join("configs")).map_err(|e| file_err(root, e))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Summaries of configurations finished by earlier runs, by key.
    pub fn finished(&self) -> Result<BTreeMap<String, Summary>> {
        let dir = self.root.join("configs");
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| file_err(&dir, e))? {
            let path = entry.map_err(|e| file_err(&dir, e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
                // A half-written file (interrupted run) is ignored and redone.
                if let Ok(d) = serde_json::from_str::<Done>(&text) {
                    out.insert(d.summary.key.clone(), d.summary);
                }
            }
        }
        Ok(out)
    }

    /// Records a finished configuration (written to a temporary name, then renamed).
    pub fn save(&self, summary: &Summary, records: &[Record]) -> Result<()> {
        let path = self
            .root
            .join("configs")
            .join(format!("{}.json", summary.key));
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string(&Done {
            summary: summary.clone(),
            records: records.to_vec(),
        })
        .map_err(|e| file_err(&path, e))?;
        std::fs::write(&tmp, text).map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| file_err(&path, e))
    }

    /// Writes the tables, the Markdown report and the plots for `summaries`.
    pub fn write_reports(&self, summaries: &[Summary], title: &str) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        let csv = self.path("results.csv");
        std::fs::write(&csv, to_csv(summaries)).map_err(|e| file_err(&csv, e))?;
        written.push(csv);
        let json = self.path("results.json");
        let rows: Vec<serde_json::Value> = summaries.iter().map(row_json).collect();
        std::fs::write(
            &json,
            serde_json::to_string_pretty(&rows).unwrap_or_default(),
        )
        .map_err(|e| file_err(&json, e))?;
        written.push(json);
        let mut plotted = Vec::new();
        for (name, f) in [
            (
                "accuracy_vs_nfe.png",
                plots::accuracy_vs_nfe as fn(&Path, &[Summary]) -> Result<()>,
            ),
            (
                "throughput_vs_concurrency.png",
                plots::throughput_vs_concurrency,
            ),
            ("latency_cdf.png", plots::latency_cdf),
        ] {
            let p = self.path(name);
            // A chart with no data (no references, no closed-loop points) is skipped.
            if f(&p, summaries).is_ok() {
                plotted.push(name);
                written.push(p);
            }
        }
        let md = self.path("report.md");
        std::fs::write(&md, to_markdown(summaries, title, &plotted))
            .map_err(|e| file_err(&md, e))?;
        written.push(md);
        Ok(written)
    }
}

const COLUMNS: &[&str] = &[
    "key",
    "pipeline",
    "alg",
    "threshold",
    "use_cache",
    "max_new_tokens",
    "steps",
    "load",
    "requests",
    "ok",
    "accuracy",
    "nfe_mean",
    "tokens_per_forward",
    "latency_mean_s",
    "latency_p50_s",
    "latency_p90_s",
    "latency_p99_s",
    "first_commit_mean_s",
    "tokens_per_s",
    "requests_per_s",
    "errors",
];

fn load_str(s: &Summary) -> String {
    match s.config.load {
        crate::grid::Load::Concurrency(c) => format!("concurrency {c}"),
        crate::grid::Load::Rate(r) => format!("rate {r}/s"),
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.4}"))
}

fn cells(s: &Summary) -> Vec<String> {
    let c = &s.config;
    vec![
        s.key.clone(),
        c.pipeline.to_string(),
        c.alg.to_string(),
        c.threshold.map_or("none".into(), |t| t.to_string()),
        c.use_cache.to_string(),
        c.max_new_tokens.to_string(),
        c.steps.to_string(),
        load_str(s),
        s.requests.to_string(),
        s.ok.to_string(),
        opt(s.accuracy),
        format!("{:.3}", s.nfe_mean),
        format!("{:.3}", s.tokens_per_forward),
        format!("{:.4}", s.latency_mean_s),
        format!("{:.4}", s.latency_p50_s),
        format!("{:.4}", s.latency_p90_s),
        format!("{:.4}", s.latency_p99_s),
        opt(s.first_commit_mean_s),
        format!("{:.2}", s.tokens_per_s),
        format!("{:.3}", s.requests_per_s),
        s.errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
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
    }
    v
}

pub fn to_markdown(summaries: &[Summary], title: &str, plots: &[&str]) -> String {
    let mut md = format!("# {title}\n\n{} configurations.\n\n", summaries.len());
    let head = [
        "pipeline",
        "alg",
        "threshold",
        "cache",
        "n",
        "load",
        "ok/req",
        "accuracy",
        "NFE",
        "tok/fwd",
        "p50 s",
        "p99 s",
        "TTFC s",
        "tok/s",
        "req/s",
        "errors",
    ];
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(
        md,
        "|{}|",
        head.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for s in summaries {
        let c = cells(s);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c[1],
            c[2],
            c[3],
            if s.config.use_cache { "on" } else { "off" },
            c[5],
            c[7],
            s.ok,
            s.requests,
            c[10],
            c[11],
            c[12],
            c[14],
            c[16],
            c[17],
            c[18],
            c[19],
            c[20]
        );
    }
    for p in plots {
        let _ = write!(md, "\n![{p}]({p})\n");
    }
    md
}
