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

/// One worker per core, or as many as `TOKIO_WORKER_THREADS` says. With one
/// (`TOKIO_WORKER_THREADS=1`, or a single core, a container's CPU quota included) everything
/// runs on the main thread instead (tokio's current-thread runtime): no second thread to wake or
/// to steal work from, which costs a fifth less CPU per request where the database shares a
/// small machine's cores (bench/README.md).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let setting = std::env::var("TOKIO_WORKER_THREADS").ok();
    let cores = std::thread::available_parallelism().ok().map(|n| n.get());
    let mut builder = match shape(setting.as_deref(), cores) {
        Ok(Shape::MainThread) => tokio::runtime::Builder::new_current_thread(),
        Ok(Shape::Workers(workers)) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(workers) = workers {
                builder.worker_threads(workers);
            }
            builder
        }
        Err(message) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                message,
            ));
        }
    };
    builder.enable_all().build()
}

/// How the runtime is built.
#[derive(Debug, PartialEq, Eq)]
enum Shape {
    /// Everything on the main thread (tokio's current-thread runtime).
    MainThread,
    /// Worker threads: as many as given, or tokio's default of one per core.
    Workers(Option<usize>),
}

/// The runtime for a `TOKIO_WORKER_THREADS` setting (if any) on a process that may use
/// `cores` cores (if known): one worker is the main thread, whether set or all there is.
fn shape(setting: Option<&str>, cores: Option<usize>) -> Result<Shape, String> {
    let workers = setting.map(worker_threads).transpose()?;
    Ok(if workers.or(cores) == Some(1) {
        Shape::MainThread
    } else {
        Shape::Workers(workers)
    })
}

/// `TOKIO_WORKER_THREADS` read as tokio would, with an error rather than tokio's panic.
fn worker_threads(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "TOKIO_WORKER_THREADS must be a whole number of at least 1, not {value:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{Shape, shape, worker_threads};

    #[test]
    fn one_worker_set_or_one_core_is_the_main_thread() {
        assert_eq!(shape(Some("1"), Some(8)), Ok(Shape::MainThread));
        assert_eq!(shape(None, Some(1)), Ok(Shape::MainThread));
        // A setting wins over the cores, either way.
        assert_eq!(shape(Some("2"), Some(1)), Ok(Shape::Workers(Some(2))));
        assert_eq!(shape(None, Some(4)), Ok(Shape::Workers(None)));
        assert_eq!(shape(None, None), Ok(Shape::Workers(None)));
        assert!(shape(Some("0"), Some(1)).is_err());
    }

    #[test]
    fn worker_threads_are_a_whole_number_of_at_least_one() {
        assert_eq!(worker_threads("1"), Ok(1));
        assert_eq!(worker_threads(" 4 "), Ok(4));
        for bad in ["0", "", "two", "-1", "1.5"] {
            let message = worker_threads(bad).unwrap_err();
            assert!(message.contains("TOKIO_WORKER_THREADS"), "{message}");
        }
    }
}
