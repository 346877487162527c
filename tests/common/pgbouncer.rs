//! PgBouncer in transaction mode, as Debian ships it (the pooling model of Supabase's pooler on
//! port 6543), in front of the tests' PostgreSQL: a process of the test's own, with its
//! configuration in a temporary directory and a free port; stopped and deleted when dropped.
//!
//! Where PgBouncer is missing it is installed from Debian's packages (as root); when it still
//! cannot be found the tests that need it are skipped with a message, except under `CI=true`,
//! where that is a failure: the cluster tests must run in CI.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts it.
const DEBIAN_PATH: &str = "/usr/sbin/pgbouncer";

pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    /// `host:port` of the PostgreSQL server behind it.
    upstream: String,
}

/// The PgBouncer executable, installed first if need be; `None` (outside CI) when there is
/// none and it cannot be installed.
pub fn executable() -> Option<PathBuf> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            locate().or_else(|| {
                install();
                locate()
            })
        })
        .clone()
        .or_else(|| {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "CI=true and PgBouncer is not installed, and `apt-get install pgbouncer` failed: \
                 the replica tests cannot be skipped in CI"
            );
            eprintln!(
                "SKIPPED: PgBouncer is not installed (apt-get install pgbouncer); \
                 the tests through a transaction-mode pooler did not run"
            );
            None
        })
}

fn locate() -> Option<PathBuf> {
    if Path::new(DEBIAN_PATH).is_file() {
        return Some(PathBuf::from(DEBIAN_PATH));
    }
    let output = Command::new("sh")
        .args(["-c", "command -v pgbouncer"])
        .output()
        .ok()?;
    let path = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// `apt-get install -y pgbouncer`, after an `apt-get update` when the package lists are stale.
/// The package's own service is not started here (there is no init system in a container), and
/// it is not used: each test runs its own process.
fn install() {
    if !super::cluster::is_root() {
        return;
    }
    eprintln!("installing PgBouncer from Debian's packages for the replica tests");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "-q", "pgbouncer"]) {
        let _ = apt(&["update", "-q"]);
        let _ = apt(&["install", "-y", "-q", "pgbouncer"]);
    }
}

impl PgBouncer {
    /// Transaction mode in front of the server of `database_url` (the tests' `DATABASE_URL`),
    /// with at most `pool_size` server connections per database; `None` when PgBouncer is
    /// missing outside CI.
    pub fn start(database_url: &str, pool_size: u32) -> Option<PgBouncer> {
        let executable = executable()?;
        // postgres://user@host:port/database
        let authority = database_url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .expect("DATABASE_URL is a postgres:// URL");
        let (user, upstream) = authority
            .rsplit_once('@')
            .unwrap_or(("postgres", authority));
        let user = user.split(':').next().unwrap_or("postgres").to_owned();
        let (upstream_host, upstream_port) =
            upstream.rsplit_once(':').unwrap_or((upstream, "5432"));
        let dir = std::env::temp_dir().join(format!(
            "amethyst-pgbouncer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The tests' server trusts local connections; PgBouncer passes the user through.
        let mut users = std::fs::File::create(dir.join("userlist.txt")).unwrap();
        writeln!(users, "\"{user}\" \"\"").unwrap();
        let config = format!(
            "[databases]\n\
             * = host={upstream_host} port={upstream_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = transaction\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             max_client_conn = 1000\n\
             default_pool_size = {pool_size}\n\
             max_db_connections = {pool_size}\n\
             server_lifetime = 3600\n\
             logfile =\n\
             pidfile =\n",
            users = dir.join("userlist.txt").display(),
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).unwrap();
        let mut command = Command::new(executable);
        // PgBouncer refuses to run as root; it reads its files first, then switches user.
        if super::cluster::is_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("PgBouncer starts");
        let bouncer = PgBouncer {
            child,
            dir,
            port,
            upstream: upstream.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PgBouncer did not listen on {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(bouncer)
    }

    /// `url` (a database on the server behind PgBouncer) as reached through PgBouncer.
    pub fn url_of(&self, url: &str) -> String {
        let replaced = url.replacen(&self.upstream, &format!("127.0.0.1:{}", self.port), 1);
        assert_ne!(replaced, url, "{url} is not on the server behind PgBouncer");
        replaced
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
