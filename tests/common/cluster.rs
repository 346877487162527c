//! A throwaway PostgreSQL cluster of a test's own: initdb into a temporary directory, a free
//! port, settings of the test's choosing. Tests that stop the database or kill its sessions
//! use one, so the machine's main PostgreSQL is never touched. Stopped and deleted when
//! dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::postgres::PgConnectOptions;

/// The newest PostgreSQL major version installed the Debian way (`/usr/lib/postgresql/<major>`
/// with an `initdb`), else the one `pg_config` names: scripts/test installs pg_cron for the
/// newest.
pub fn pg_major() -> String {
    newest_major_with_initdb(Path::new("/usr/lib/postgresql"))
        .or_else(|| {
            let output = Command::new("pg_config").arg("--version").output().ok()?;
            // "PostgreSQL 15.20 (Debian 15.20-0+deb12u1)"
            let text = String::from_utf8(output.stdout).ok()?;
            let version = text.split_whitespace().nth(1)?;
            Some(version.split('.').next()?.to_owned())
        })
        .expect("no PostgreSQL found under /usr/lib/postgresql nor through pg_config")
}

/// Numerically newest (`16` after `9.6`), among the versions that have `bin/initdb`.
pub fn newest_major_with_initdb(root: &Path) -> Option<String> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("bin/initdb").is_file())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter_map(|name| {
            let key: Vec<u32> = name
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some((key, name))
        })
        .max()
        .map(|(_, name)| name)
}

fn pg_bin(program: &str) -> String {
    format!("/usr/lib/postgresql/{}/bin/{program}", pg_major())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// `program` run as the postgres user when the tests run as root (PostgreSQL refuses root).
fn as_postgres(program: &str, args: &[&str]) -> Command {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    };
    command.args(args);
    command
}

pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
    /// The server options given to `pg_ctl start -o`.
    options: String,
}

impl Cluster {
    /// initdb into a new directory named after `prefix`, then start with `settings`
    /// (`-c name=value …`) on top of a free port and a socket directory of its own.
    pub fn start(prefix: &str, settings: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if is_root() {
            assert!(
                Command::new("chown")
                    .args(["postgres", dir.to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let data = dir.join("data");
        let initdb = as_postgres(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .output()
        .unwrap();
        assert!(
            initdb.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 {settings}",
            dir.display()
        );
        let cluster = Cluster { dir, port, options };
        cluster.start_again();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    /// Starts the (stopped) cluster and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.join("log");
        let start = as_postgres(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &self.options,
                "start",
            ],
        )
        .output()
        .unwrap();
        assert!(
            start.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&start.stderr)
        );
    }

    /// Stops the cluster in fast mode, as `pg_ctlcluster … restart -m fast` does first: every
    /// session is terminated (SQLSTATE 57P01) and the transactions in flight roll back.
    pub fn stop_fast(&self) {
        let stop = as_postgres(
            &pg_bin("pg_ctl"),
            &["-D", &self.data(), "-m", "fast", "-w", "stop"],
        )
        .output()
        .unwrap();
        assert!(
            stop.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&stop.stderr)
        );
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates and migrates the database `amethyst` on this cluster; answers its options.
    pub async fn migrated_database(&self) -> PgConnectOptions {
        let options = amethyst_credits::db::connect_options(&self.url("amethyst")).unwrap();
        amethyst_credits::db::ensure_database(&options)
            .await
            .unwrap();
        amethyst_credits::db::migrate(&options).await.unwrap();
        options
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &pg_bin("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "stop"],
        )
        .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
