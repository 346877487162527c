//! `verify`: the post-migration checks (functions, triggers, RLS on every public table),
//! pinned search paths, the privileges that keep balances and sequences out of users' reach,
//! and the ledger invariant (docs/api.md, "The ledger"), naming every user it does not hold
//! for.

use std::fmt;

use sqlx::PgConnection;

/// One check and what it found.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What failed (one line per finding), empty when passed.
    pub findings: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    fn add(&mut self, name: &str, findings: Vec<String>) {
        self.checks.push(Check {
            name: name.to_owned(),
            passed: findings.is_empty(),
            findings,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(
                f,
                "{} {}",
                if check.passed { "ok  " } else { "FAIL" },
                check.name
            )?;
            for finding in &check.findings {
                writeln!(f, "       {finding}")?;
            }
        }
        let failed = self.checks.iter().filter(|c| !c.passed).count();
        if failed == 0 {
            write!(f, "all {} checks passed", self.checks.len())
        } else {
            write!(f, "{failed} of {} checks failed", self.checks.len())
        }
    }
}

/// Functions the service and the schema's design rely on (README, "Design").
const REQUIRED_FUNCTIONS: &[&str] = &[
    "is_admin",
    "add_credits",
    "spend_credits",
    "spend_credits_together",
    "handle_ad_view",
    "create_profile_on_signup",
    "open_ad_session",
    "complete_ad_session",
    "pay_ad_session",
    "record_admob_callback",
    "reserve_credits",
    "capture_hold",
    "release_hold",
    "credit_balance",
    "expire_due_credits",
];

/// Functions that change balances, or act as any user given their claims: never executable by
/// anon, authenticated or PUBLIC.
const PRIVILEGED_FUNCTIONS: &[&str] = &[
    "add_credits",
    "spend_credits",
    "spend_credits_together",
    "handle_ad_view",
    "open_ad_session",
    "complete_ad_session",
    "pay_ad_session",
    "record_admob_callback",
    "stripe_grant",
    "stripe_record_charge",
    "stripe_settle_grant",
    "enter_user_session",
    "profile_as_user",
    "update_profile_as_user",
    "transactions_as_user",
    "images_as_user",
    "image_as_user",
    "reserve_credits",
    "capture_hold",
    "release_hold",
    "credit_balance",
    "expire_due_credits",
    "lots_lock",
    "lots_draw",
    "lots_settle",
    "lots_create",
    "ledger_write",
    "hold_lock",
    "lots_as_user",
    "holds_as_user",
    "ledger_position_as_user",
    "ledger_events_as_user",
];

/// Runs every check.
pub async fn run(conn: &mut PgConnection) -> Result<Report, sqlx::Error> {
    let mut report = Report::default();

    // The rule functions exist, plus how they are declared.
    let functions: Vec<(String, bool, bool)> = sqlx::query!(
        r#"select p.proname::text as "name!", p.prosecdef as "definer!",
                  coalesce('search_path=""' = any (p.proconfig), false) as "pinned!"
             from pg_proc p
            where p.pronamespace = 'public'::regnamespace and p.proname = any ($1)"#,
        REQUIRED_FUNCTIONS as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.name, r.definer, r.pinned))
    .collect();
    let mut findings = Vec::new();
    for name in REQUIRED_FUNCTIONS {
        match functions.iter().find(|f| f.0 == *name) {
            None => findings.push(format!("public.{name} is missing")),
            Some((_, false, _)) => findings.push(format!("public.{name} is not SECURITY DEFINER")),
            Some((_, _, false)) => {
                findings.push(format!("public.{name} does not pin search_path to ''"))
            }
            _ => {}
        }
    }
    report.add(
        "functions exist, are SECURITY DEFINER and pin search_path",
        findings,
    );

    let exposed: Vec<(String, String)> = sqlx::query!(
        r#"select p.proname::text as "function!", r.rolname::text as "role!"
             from pg_proc p
            cross join (values ('anon'), ('authenticated'), ('public')) as r(rolname)
            where p.pronamespace = 'public'::regnamespace and p.proname = any ($1)
              and case when r.rolname = 'public'
                       then exists (select 1 from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                                     where a.grantee = 0 and a.privilege_type = 'EXECUTE')
                       else has_function_privilege(r.rolname, p.oid, 'EXECUTE') end
            order by 1, 2"#,
        PRIVILEGED_FUNCTIONS as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.function, r.role))
    .collect();
    report.add(
        "balance-changing and act-as-user functions are not executable by anon, authenticated or PUBLIC",
        exposed
            .into_iter()
            .map(|(f, r)| format!("public.{f} is executable by {r}"))
            .collect(),
    );

    // Supabase's linter (function_search_path_mutable): a function that takes the caller's
    // search_path can be made to call the caller's objects. Extensions' functions are theirs.
    let unpinned = sqlx::query_scalar!(
        r#"select p.proname::text || '(' || pg_get_function_identity_arguments(p.oid) || ')' as "function!"
             from pg_proc p
            where p.pronamespace = 'public'::regnamespace
              and not exists (select 1 from pg_depend d
                               where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
              and not exists (select 1 from unnest(coalesce(p.proconfig, '{}')) s where s like 'search_path=%')
            order by 1"#
    )
    .fetch_all(&mut *conn)
    .await?;
    report.add(
        "every function and procedure in public pins its search_path",
        unpinned
            .into_iter()
            .map(|f| format!("public.{f} runs with the caller's search_path"))
            .collect(),
    );

    let sequences: Vec<(String, String)> = sqlx::query!(
        r#"select c.relname::text as "sequence!", r.rolname as "role!"
             from pg_class c
            cross join (values ('anon'), ('authenticated')) as r(rolname)
            where c.relkind = 'S' and c.relnamespace = 'public'::regnamespace
              and has_sequence_privilege(r.rolname, c.oid, 'USAGE, SELECT, UPDATE')
            order by 1, 2"#
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.sequence, r.role))
    .collect();
    report.add(
        "no sequence in public is usable by anon or authenticated",
        sequences
            .into_iter()
            .map(|(s, r)| format!("public.{s} is usable by {r}"))
            .collect(),
    );

    // The sign-up trigger exists and is enabled, and no user is left without a profile.
    let trigger = sqlx::query_scalar!(
        r#"select tgenabled::text as "enabled!" from pg_trigger
            where tgname = 'on_auth_user_created' and tgrelid = 'auth.users'::regclass
              and not tgisinternal"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    report.add(
        "trigger on_auth_user_created is on auth.users and enabled",
        match trigger.as_deref() {
            None => vec!["the trigger is missing".to_owned()],
            Some("D") => vec!["the trigger is disabled".to_owned()],
            Some(_) => vec![],
        },
    );

    let missing_profiles = sqlx::query_scalar!(
        "select u.id from auth.users u
          where not exists (select 1 from public.profiles p where p.id = u.id)
          order by u.created_at limit 100"
    )
    .fetch_all(&mut *conn)
    .await?;
    report.add(
        "every auth user has a profile",
        missing_profiles
            .into_iter()
            .map(|id| format!("user {id} has no profile"))
            .collect(),
    );

    // Row level security on every table.
    let without_rls = sqlx::query_scalar!(
        r#"select tablename::text as "table!" from pg_tables
            where schemaname = 'public' and not rowsecurity order by 1"#
    )
    .fetch_all(&mut *conn)
    .await?;
    report.add(
        "row level security is enabled on every public table",
        without_rls
            .into_iter()
            .map(|t| format!("public.{t} has RLS disabled"))
            .collect(),
    );

    // Users may change their display name, avatar and low balance threshold, nothing else.
    let writable: Vec<(String, String)> = sqlx::query!(
        r#"select c.table_name::text as "table!", c.column_name::text as "column!"
             from information_schema.columns c
            where c.table_schema = 'public'
              and c.table_name in ('profiles', 'credit_transactions', 'ad_views', 'credit_packs',
                                   'idempotency_keys', 'stripe_events', 'stripe_grants', 'stripe_charges')
              and (has_column_privilege('authenticated', format('public.%I', c.table_name), c.column_name, 'UPDATE')
                   or has_column_privilege('authenticated', format('public.%I', c.table_name), c.column_name, 'INSERT')
                   or has_column_privilege('anon', format('public.%I', c.table_name), c.column_name, 'UPDATE')
                   or has_column_privilege('anon', format('public.%I', c.table_name), c.column_name, 'INSERT'))
              and not (c.table_name = 'profiles' and c.column_name in ('display_name', 'avatar_url', 'low_balance_threshold'))
            order by 1, 2"#
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.table, r.column))
    .collect();
    report.add(
        "users cannot write balances, ledgers or money-like columns",
        writable
            .into_iter()
            .map(|(t, c)| format!("public.{t}.{c} is writable by users"))
            .collect(),
    );

    // The ledger (docs/api.md, "The ledger"): credits = sum(amount) = newest balance_after =
    // the lots' remaining credits, active holds within credits, and every lot's remaining is
    // what the ledger says is left of it; for every profile, archived transactions included
    // (the same check as the daily maintenance).
    let broken = sqlx::query!(
        r#"select user_id as "user_id!", credits as "credits!", ledger_total as "ledger_total!",
                  newest_balance_after, lots_remaining as "lots_remaining!", held as "held!",
                  lots_off_ledger as "lots_off_ledger!"
             from public.ledger_discrepancies() order by user_id limit 1000"#
    )
    .fetch_all(&mut *conn)
    .await?;
    report.add(
        "ledger: every balance equals the sum of its transactions (archive included), the newest balance_after and the remaining credits of its lots; active holds stay within it; every lot agrees with its draws",
        broken
            .into_iter()
            .map(|r| {
                format!(
                    "user {}: balance {}, sum of transactions {}, newest balance_after {}, lots remaining {}, held {}, lots disagreeing with their draws {}",
                    r.user_id,
                    r.credits,
                    r.ledger_total,
                    r.newest_balance_after.map_or("none".to_owned(), |b| b.to_string()),
                    r.lots_remaining,
                    r.held,
                    r.lots_off_ledger,
                )
            })
            .collect(),
    );

    // The lot and hold rules go by clock_now(): now(), plus an offset only tests and drills
    // set. Left behind in production, it would expire credits and holds at the wrong time.
    let moved = sqlx::query_scalar!(
        r#"select offset_by::text as "offset_by!" from public.clock_settings
            where offset_by <> interval '0'"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    report.add(
        "the lot and hold rules go by the real time (public.clock_settings holds no offset)",
        moved
            .into_iter()
            .map(|by| {
                format!(
                    "public.clock_settings moves their clock by {by}: delete its row unless this \
                     database is for tests or a drill"
                )
            })
            .collect(),
    );

    Ok(report)
}
