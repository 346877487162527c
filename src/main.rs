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

/// One worker per core, or as many as `TOKIO_WORKER_THREADS` says (tokio reads it). With one
/// (`TOKIO_WORKER_THREADS=1`, or a single core, a container's CPU quota included) everything
/// runs on the main thread instead (tokio's current-thread runtime): no second thread to wake or
/// to steal work from, which costs a fifth less CPU per request where the database shares a
/// small machine's cores (bench/README.md).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let setting = std::env::var("TOKIO_WORKER_THREADS").ok();
    let mut builder = if one_worker(setting.as_deref(), || {
        std::thread::available_parallelism().ok().map(|n| n.get())
    }) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

/// Whether tokio's multi-thread runtime would have one worker: `TOKIO_WORKER_THREADS` when set,
/// else the cores this process may use (`available_parallelism` counts a cgroup's CPU quota).
fn one_worker(setting: Option<&str>, cores: impl FnOnce() -> Option<usize>) -> bool {
    match setting {
        Some(value) => value.trim().parse::<usize>() == Ok(1),
        None => cores() == Some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::one_worker;

    #[test]
    fn one_worker_when_set_to_one_or_given_one_core() {
        assert!(one_worker(Some("1"), || Some(8)), "the setting wins");
        assert!(one_worker(Some(" 1 "), || Some(8)));
        assert!(!one_worker(Some("2"), || Some(1)), "the setting wins");
        assert!(one_worker(None, || Some(1)), "one core");
        assert!(!one_worker(None, || Some(2)));
        assert!(!one_worker(None, || None), "unknown: tokio's default");
    }
}
