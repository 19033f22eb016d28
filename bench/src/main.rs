//! webhook-delivery-bench: the service against the original consumer on local Postgres, Kafka
//! (Tansu) and HTTP receivers. `scripts/bench.sh` is the way in; see docs/performance.md.

mod analysis;
mod baseline;
mod cpu;
mod driver;
mod error;
mod event;
mod lag;
mod producer;
mod report;
mod run;
mod scenario;
mod settings;
mod sink;
mod soak;
mod sut;
mod world;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "webhook-delivery-bench",
    about = "Benchmarks webhook-delivery against the original inline consumer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios and print the results table.
    Run(driver::RunArgs),
    /// Redraw lag.svg from a lag.csv.
    Chart(driver::ChartArgs),
    /// (internal) One system under test, in its own process; stops when stdin closes.
    #[command(hide = true)]
    Sut(sut::SutArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => return fail(&error),
            };
            match runtime.block_on(driver::run(args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(error) => fail(&error),
            }
        }
        Command::Chart(args) => match driver::chart(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error),
        },
        Command::Sut(args) => match sut::run_child(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error),
        },
    }
}

fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("webhook-delivery-bench: {}", error::describe(error));
    ExitCode::from(2)
}
