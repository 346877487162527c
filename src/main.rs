//! `amethyst-credits`: see `cli.rs` for the verbs.

use std::process::ExitCode;

use clap::Parser;

/// Requests allocate and free many small buffers across the runtime's threads, where
/// mimalloc costs a fraction of glibc's malloc (bench/README.md, "Where the time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the runtime is built, so that .env may set TOKIO_WORKER_THREADS too. A missing
    // .env is normal; a malformed one is reported.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("error: could not read .env: {err}");
        return ExitCode::FAILURE;
    }
    let cli = amethyst_credits::cli::Cli::parse();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(amethyst_credits::cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One worker per core, or as many as `TOKIO_WORKER_THREADS` says (tokio reads it). With
/// `TOKIO_WORKER_THREADS=1` everything runs on the main thread instead (tokio's current-thread
/// runtime): no second thread to wake or to steal work from, which costs a fifth less CPU per
/// request where the database shares a small machine's cores (bench/README.md).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let one_thread = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}
