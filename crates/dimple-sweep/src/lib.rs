//! Load-tested evaluation sweeps: run a dataset under a grid of decoding settings and load
//! levels against a serving target, and report accuracy against speed.
//!
//! Layout: `dataset` (JSONL items, scoring, a synthetic generator, the built-in demo set
//! from `builtin`), `grid` (the product of settings, from flags or TOML), `target` (what a
//! sweep sends requests to: a trait the binary implements for a router address or an
//! in-process engine), `runner` (closed- and open-loop load with warm-up and progress),
//! `stats` (per-configuration measures), `meta` (run metadata and the resume key),
//! `report` (CSV, JSON, Markdown, resumable output folders), `plots` (PNG and SVG charts),
//! `scrape` (server metrics before and after).

pub mod builtin;
pub mod dataset;
pub mod grid;
pub mod meta;
pub mod plots;
pub mod report;
pub mod runner;
pub mod scrape;
pub mod stats;
pub mod target;

pub use dataset::{AnswerType, Item, load_jsonl, synthetic};
pub use grid::{Config, Grid, Load};
pub use runner::{RunOptions, run_config, warm_up};
pub use stats::Summary;
pub use target::{Response, SweepRequest, Target, TargetError};

/// Errors of a sweep: bad input files or grids, or output that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("grid: {0}")]
    Grid(String),
    #[error("dataset: {0}")]
    Dataset(String),
    /// An output folder written by a run with other settings.
    #[error("{0}")]
    Resume(String),
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T> = std::result::Result<T, SweepError>;

pub(crate) fn file_err(path: &std::path::Path, e: impl std::fmt::Display) -> SweepError {
    SweepError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}
