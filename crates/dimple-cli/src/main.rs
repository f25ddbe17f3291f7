//! `dimple`: the command-line entry point. Each subcommand parses its flags (every flag can
//! also come from a `DIMPLE_*` environment variable) and calls into the library crates.

mod generate;
mod model_source;
mod sweep;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dimple", version, about = "Serving cluster for discrete-diffusion multimodal language models (Dimple)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode one request in-process and print the answer (or the step history as JSON).
    Generate(generate::GenerateArgs),
    /// Run a dataset under a grid of decoding settings and loads; write CSV, JSON, Markdown
    /// and PNG plots.
    Sweep(sweep::SweepArgs),
    /// Throughput at several concurrency levels (default 1, 4, 16) on the embedded model.
    Bench(sweep::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DIMPLE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Sweep(args) => sweep::run_sweep(args),
        Command::Bench(args) => sweep::run_bench(args),
    }
}
