//! `amethyst-credits`: see `cli.rs` for the verbs.

use std::process::ExitCode;

use clap::Parser;

/// Requests allocate and free many small buffers across the runtime's threads, where
/// mimalloc costs a fraction of glibc's malloc (bench/README.md, "Where the time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // A missing .env is normal; a malformed one is reported.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("error: could not read .env: {err}");
        return ExitCode::FAILURE;
    }
    let cli = amethyst_credits::cli::Cli::parse();
    match amethyst_credits::cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
