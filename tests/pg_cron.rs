//! pg_cron, for real: a throwaway PostgreSQL cluster of this test's own (initdb into a temp
//! directory, a free port, pg_cron preloaded), migrated, then a scheduled job run. The
//! machine's main PostgreSQL is not touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        assert!(
            Path::new("/usr/share/postgresql/15/extension/pg_cron.control").exists(),
            "pg_cron is not installed: scripts/test installs Debian's postgresql-15-cron"
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
            &format!("{PG_BIN}/initdb"),
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
            &format!("{PG_BIN}/pg_ctl"),
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
            c.args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")]);
            c
        } else {
            Command::new(format!("{PG_BIN}/pg_ctl"))
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
    assert_eq!(
        jobs,
        vec![
            (
                "amethyst-credits-daily".to_owned(),
                "10 0 * * *".to_owned(),
                "call public.run_maintenance('daily')".to_owned()
            ),
            (
                "amethyst-credits-monthly".to_owned(),
                "0 3 1 * *".to_owned(),
                "call public.run_maintenance('monthly')".to_owned()
            ),
            (
                "amethyst-credits-weekly".to_owned(),
                "30 1 * * 1".to_owned(),
                "call public.run_maintenance('weekly')".to_owned()
            ),
        ]
    );

    // Migrating again (a later deploy) keeps exactly these jobs.
    sqlx::query("select cron.schedule('amethyst-credits-daily', '10 0 * * *', 'call public.run_maintenance(''daily'')')")
        .execute(&mut conn)
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("select count(*) from cron.job")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 3);

    // Run the daily job every minute and wait for pg_cron to run it.
    sqlx::query("select cron.alter_job(jobid, schedule => '* * * * *') from cron.job where jobname = 'amethyst-credits-daily'")
        .execute(&mut conn)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    let outcome = loop {
        let run: Option<(String, String)> = sqlx::query_as(
            "select task, outcome from public.maintenance_runs where outcome <> 'running' order by id desc limit 1",
        )
        .fetch_optional(&mut conn)
        .await
        .unwrap();
        if let Some(run) = run {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "pg_cron did not run the daily job within 150 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(outcome, ("daily".to_owned(), "ok".to_owned()));
    let status: String = sqlx::query_scalar(
        "select d.status from cron.job_run_details d join cron.job j using (jobid)
          where j.jobname = 'amethyst-credits-daily' order by d.runid desc limit 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(status, "succeeded");
}
