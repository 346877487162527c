//! pg_cron, for real: a throwaway PostgreSQL cluster of this test's own (initdb into a temp
//! directory, a free port, pg_cron preloaded), migrated, then a scheduled job run. The
//! machine's main PostgreSQL is not touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

/// The newest PostgreSQL major version installed the Debian way (`/usr/lib/postgresql/<major>`
/// with an `initdb`), else the one `pg_config` names: scripts/test installs pg_cron for the
/// newest.
fn pg_major() -> String {
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
fn newest_major_with_initdb(root: &Path) -> Option<String> {
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

#[test]
fn the_newest_installed_postgresql_with_initdb_is_the_one_used() {
    let root =
        std::env::temp_dir().join(format!("amethyst-pg-lib-{}", uuid::Uuid::new_v4().simple()));
    for (version, has_initdb) in [("9.6", true), ("14", true), ("15", true), ("17", false)] {
        let bin = root.join(version).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        if has_initdb {
            std::fs::write(bin.join("initdb"), "").unwrap();
        }
    }
    let chosen = newest_major_with_initdb(&root);
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(chosen.as_deref(), Some("15"));
    assert_eq!(newest_major_with_initdb(&root), None, "nothing installed");
}

struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        let major = pg_major();
        assert!(
            Path::new(&format!(
                "/usr/share/postgresql/{major}/extension/pg_cron.control"
            ))
            .exists(),
            "pg_cron is not installed: scripts/test installs Debian's postgresql-{major}-cron"
        );
        let dir = std::env::temp_dir().join(format!(
            "amethyst-pg-cron-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // PostgreSQL refuses to run as root; the cluster belongs to the postgres user.
        let as_postgres = |program: &str, args: &[&str]| {
            let mut command = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--", program]);
                c
            } else {
                Command::new(program)
            };
            command.args(args);
            command
        };
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
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_cron \
             -c cron.database_name=postgres -c cron.host=127.0.0.1",
            dir.display()
        );
        let start = as_postgres(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                dir.join("log").to_str().unwrap(),
                "-w",
                "-o",
                &options,
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
        Cluster { dir, port }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let mut stop = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &pg_bin("pg_ctl")]);
            c
        } else {
            Command::new(pg_bin("pg_ctl"))
        };
        let _ = stop
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn migrating_a_cluster_with_pg_cron_schedules_the_maintenance_and_a_job_runs() {
    let cluster = Cluster::start();
    let mut conn = PgConnection::connect(&cluster.url()).await.unwrap();
    amethyst_credits::MIGRATOR
        .run(&mut conn)
        .await
        .expect("migrations apply on a pg_cron cluster");

    let jobs: Vec<(String, String, String)> =
        sqlx::query_as("select jobname, schedule, command from cron.job order by jobname")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let schedules: Vec<(&str, &str)> = jobs
        .iter()
        .map(|(name, schedule, _)| (name.as_str(), schedule.as_str()))
        .collect();
    assert_eq!(
        schedules,
        vec![
            ("amethyst-credits-daily", "10 0 * * *"),
            ("amethyst-credits-monthly", "0 3 1 * *"),
            ("amethyst-credits-weekly", "30 1 * * 1"),
        ]
    );
    // Each job runs the steps in a DO block that commits between them (no function that pins
    // its search_path may commit); only the monthly one archives.
    for (name, _, command) in &jobs {
        let task = name.trim_start_matches("amethyst-credits-");
        assert!(
            command.starts_with("do $job$")
                && command.contains(&format!("public.maintenance_start('{task}')"))
                && command.contains("public.maintenance_finish(run)")
                && command.contains("maintenance_archive_batch") == (task == "monthly"),
            "{name}: {command}"
        );
    }

    // Scheduling again under the same name (a later deploy) keeps exactly these jobs.
    sqlx::query(
        "select cron.schedule(jobname, schedule, command) from cron.job where jobname = 'amethyst-credits-daily'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let count: i64 = sqlx::query_scalar("select count(*) from cron.job")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 3);

    // One ledger row old enough to archive.
    let user = uuid::Uuid::new_v4();
    sqlx::query("insert into auth.users (id, email) values ($1, 'cron@example.com')")
        .bind(user)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("select public.add_credits($1, 5, 'system')")
        .bind(user)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("update public.credit_transactions set created_at = now() - interval '13 months'")
        .execute(&mut conn)
        .await
        .unwrap();

    // Run the daily and monthly jobs every minute and wait for pg_cron to run them.
    sqlx::query(
        "select cron.alter_job(jobid, schedule => '* * * * *') from cron.job
          where jobname in ('amethyst-credits-daily', 'amethyst-credits-monthly')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    let runs = loop {
        let runs: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
            "select distinct on (task) task, outcome, findings from public.maintenance_runs
              where outcome <> 'running' order by task, id",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        if runs.len() == 2 {
            break runs;
        }
        assert!(
            Instant::now() < deadline,
            "pg_cron did not run the daily and monthly jobs within 150 s: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!((runs[0].0.as_str(), runs[0].1.as_str()), ("daily", "ok"));
    assert_eq!((runs[1].0.as_str(), runs[1].1.as_str()), ("monthly", "ok"));
    assert_eq!(runs[1].2["archived"], 1, "{}", runs[1].2);
    let archived: i64 =
        sqlx::query_scalar("select count(*) from public.credit_transactions_archive")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(archived, 1);
    // pg_cron records a job's status once its command has returned, just after the commit.
    let statuses = loop {
        let statuses: Vec<Option<String>> = sqlx::query_scalar(
            "select (select d.status from cron.job_run_details d where d.jobid = j.jobid
                      order by d.runid limit 1)
               from cron.job j where j.jobname in ('amethyst-credits-daily', 'amethyst-credits-monthly')
              order by j.jobname",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let done = statuses
            .iter()
            .all(|s| !matches!(s.as_deref(), None | Some("starting" | "running")));
        if done || Instant::now() >= deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        statuses,
        vec![Some("succeeded".to_owned()), Some("succeeded".to_owned())]
    );
}
