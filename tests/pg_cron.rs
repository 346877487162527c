//! pg_cron, for real: a throwaway PostgreSQL cluster of this test's own (initdb into a temp
//! directory, a free port, pg_cron preloaded), migrated, then a scheduled job run. The
//! machine's main PostgreSQL is not touched.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{self, Cluster, newest_major_with_initdb};
use sqlx::{Connection, PgConnection};

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

/// A cluster with pg_cron preloaded; Debian's package must be installed.
fn pg_cron_cluster() -> Cluster {
    let major = cluster::pg_major();
    assert!(
        Path::new(&format!(
            "/usr/share/postgresql/{major}/extension/pg_cron.control"
        ))
        .exists(),
        "pg_cron is not installed: scripts/test installs Debian's postgresql-{major}-cron"
    );
    Cluster::start(
        "amethyst-pg-cron",
        "-c shared_preload_libraries=pg_cron -c cron.database_name=postgres \
         -c cron.host=127.0.0.1",
    )
}

#[tokio::test]
async fn migrating_a_cluster_with_pg_cron_schedules_the_maintenance_and_a_job_runs() {
    let cluster = pg_cron_cluster();
    let mut conn = PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
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
