//! `dimple`: the command-line entry point. Each subcommand parses its flags (every flag can
//! also come from a `DIMPLE_*` environment variable) and calls into the library crates.

mod assets;
mod bench_random;
mod device;
mod generate;
mod logging;
mod model_source;
mod random_model;
mod remote;
mod router;
mod serve;
mod serving;
mod sweep;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dimple",
    version,
    about = "Serving cluster for discrete-diffusion multimodal language models (Dimple)"
)]
struct Cli {
    /// Log lines as text or as one JSON object each (level from `DIMPLE_LOG`, default warn).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "DIMPLE_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode one request (in-process, or on a router with `--router`) and print the answer
    /// (or the step history as JSON).
    Generate(generate::GenerateArgs),
    /// Router and one worker in one process: the gRPC service on one machine (built-in demo
    /// model unless `--model`).
    Serve(serve::ServeArgs),
    /// The public gRPC service in front of workers (static list or etcd).
    Router(router::RouterArgs),
    /// One tensor-parallel group serving the internal worker service (registers in etcd).
    Worker(worker::WorkerArgs),
    /// Run a dataset under a grid of decoding settings and loads (in-process or against a
    /// router); write CSV, JSON, a Markdown report and PNG/SVG plots into a resumable folder.
    Sweep(sweep::SweepArgs),
    /// Throughput at several concurrency levels (default 1, 4, 16), in-process or against a
    /// router; the same outputs as `sweep` plus a table on stdout.
    Bench(sweep::BenchArgs),
    /// Step time and tokens/s on random weights of a real model shape (GPU checks).
    #[command(hide = true)]
    BenchRandom(bench_random::BenchRandomArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Router(args) => router::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Sweep(args) => sweep::run_sweep(args),
        Command::Bench(args) => sweep::run_bench(args),
        Command::BenchRandom(args) => bench_random::run(args),
    }
}
