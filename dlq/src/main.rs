//! `dlq`: the poison-message tool.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = dlq::cli::Cli::parse();
    // Logs only warnings by default: the output is for the operator.
    let run = async {
        runtime::telemetry::init_with_default("warn")?;
        dlq::cli::run(cli).await
    };
    match run.await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dlq: {}", topology::report::describe(&e));
            ExitCode::from(2)
        }
    }
}
