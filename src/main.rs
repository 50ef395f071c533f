use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match braidinfer::cli::run(braidinfer::cli::Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
