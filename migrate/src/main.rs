//! `migrate`: the database's schema, and one role per binary.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = migrate::Cli::parse();
    let run = async {
        runtime::telemetry::init()?;
        migrate::run(cli, &settings::Source::environment()).await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: {}", topology::report::describe(&e));
            ExitCode::from(2)
        }
    }
}
