//! `dlq`: the poison-message tool.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber_init();
    match dlq::cli::run(dlq::cli::Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dlq: {}", topology::report::describe(&e));
            ExitCode::from(2)
        }
    }
}

/// Logs only warnings by default: the output is for the operator.
fn tracing_subscriber_init() {
    runtime::telemetry::init_with_default("warn");
}
