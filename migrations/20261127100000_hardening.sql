-- Security review, second round: what users can reach through Supabase's REST API (their own
-- token, role `authenticated`) is narrowed further, and every function pins its search_path.

------------------------------------------------------------------------------------------------
-- Images: a user registers only objects of the `images` bucket inside their own folder.
------------------------------------------------------------------------------------------------

-- Storage policies give each user the folder named after their id (`<user id>/…`). A row here
-- claiming a path elsewhere would let a user point "their" image at someone else's object (or
-- take its (bucket, path) first, so the real owner could no longer register it). `.` and `..`
-- segments are refused as well: `<own id>/../<other id>/x.png` starts in the right folder but
-- names another one.
alter policy images_insert_own on public.images
  with check (
    user_id = (select auth.uid())
    and transaction_id is null
    and storage_bucket = 'images'
    and pg_catalog.starts_with(storage_path, (select auth.uid())::text || '/')
    and storage_path !~ '(^|/)\.\.?(/|$)'
  );

-- images_update_own stays as it is: users may update only prompt, model, width, height,
-- mime_type, metadata and analysis (column privileges), none of which moves a row to another
-- user, bucket or path.

-- No one, service_role included, has a reason to store a path with dot segments. NOT VALID:
-- rows stored before are not checked (there is nothing sound to rewrite them to), every new or
-- changed row is.
alter table public.images
  add constraint images_storage_path_without_dot_segments
  check (storage_path !~ '(^|/)\.\.?(/|$)') not valid;

------------------------------------------------------------------------------------------------
-- Profiles: display names and avatar URLs the frontend can render safely.
------------------------------------------------------------------------------------------------

-- Users update these two columns directly through the REST API, so the service's validation
-- (src/profiles.rs) is not enough on its own. Control characters are Unicode's Cc category
-- (what Rust's char::is_control means); whitespace is Unicode's White_Space property (Rust's
-- char::is_whitespace), spelled out so that the result does not depend on the server's locale.

-- No writes while the rows are cleaned and the constraints added, so that no row that does
-- not fit can slip in between (reads go on until the constraints need their exclusive lock).
lock table public.profiles in share row exclusive mode;

update public.profiles p set display_name = null
 where p.display_name ~ '[\u0001-\u001f\u007f-\u009f]';

update public.profiles p set avatar_url = null
 where p.avatar_url !~ '^https?://'
    or p.avatar_url ~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]';

alter table public.profiles
  add constraint profiles_display_name_without_control_characters
    check (display_name !~ '[\u0001-\u001f\u007f-\u009f]'),
  add constraint profiles_avatar_url_is_http
    check (avatar_url ~ '^https?://'
           and avatar_url !~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]');

-- The sign-up trigger must never fail a sign-up: metadata is whatever the client sent, so a
-- name or avatar that the constraints above would refuse is dropped, not stored.
-- (sync_profile_email writes only the email, which these constraints do not concern.)
create or replace function public.create_profile_on_signup() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  name text := nullif(left(btrim(coalesce(new.raw_user_meta_data ->> 'display_name',
                                          new.raw_user_meta_data ->> 'full_name',
                                          new.raw_user_meta_data ->> 'name', '')), 100), '');
  avatar text := new.raw_user_meta_data ->> 'avatar_url';
begin
  if name ~ '[\u0001-\u001f\u007f-\u009f]' then
    name := null;
  end if;
  if not (pg_catalog.char_length(avatar) between 1 and 2048
          and avatar ~ '^https?://'
          and avatar !~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]') then
    avatar := null;
  end if;

  insert into public.profiles (id, email, display_name, avatar_url, is_admin)
  values (new.id, new.email, name, avatar, false)
  on conflict (id) do nothing;
  return new;
end;
$$;

------------------------------------------------------------------------------------------------
-- Sequences: not users' business.
------------------------------------------------------------------------------------------------

-- Supabase's default privileges grant anon and authenticated every privilege on each new
-- sequence in public. With USAGE or UPDATE a user could call nextval()/setval() on a ledger or
-- maintenance sequence (burning or rewinding identity values); with SELECT read how busy the
-- service is. Nothing a user does needs them: identity columns draw their values whatever the
-- inserting role's privileges on the sequence. service_role keeps what it has.
revoke all on all sequences in schema public from public, anon, authenticated;

-- And for sequences that later migrations create (this applies to objects the migrating role
-- creates, which is who runs migrations).
alter default privileges in schema public revoke all on sequences from anon, authenticated;

------------------------------------------------------------------------------------------------
-- Maintenance: every function pins its search_path, so the batching loop moves to the callers.
------------------------------------------------------------------------------------------------

-- public.run_maintenance was a procedure so that the monthly archival could COMMIT between
-- batches; PostgreSQL refuses transaction control in a procedure that has a SET clause, so it
-- could not pin its search_path (Supabase's linter reports it). The work is now three pinned
-- functions, each of which runs in its caller's transaction:
--
--   maintenance_start(task)          takes the task's lock, records the run; caller commits
--   maintenance_archive_batch(run)   moves one batch (monthly); caller commits, loops until 0
--   maintenance_finish(run)          does the daily/weekly work, records the outcome, unlocks
--
-- The callers are `amethyst-credits maintenance …` (src/maintenance.rs) and the pg_cron jobs
-- below, whose command is a DO block: an anonymous block is no function to pin, and may COMMIT.
-- An interrupted run keeps the batches it committed, and the next run marks it interrupted, as
-- before. The lock is a session-level advisory lock: it outlives the commits in between, and
-- a caller that dies releases it with its session.

drop procedure public.run_maintenance(text, bigint, interval, integer, double precision);

-- The run, if it is under way and this session holds its task's lock: the other steps act only
-- on a run that this session started.
create function public.maintenance_running(run_id bigint) returns public.maintenance_runs
language plpgsql volatile
set search_path = ''
as $$
declare
  run public.maintenance_runs;
  lock_key bigint;
begin
  select * into run from public.maintenance_runs r where r.id = maintenance_running.run_id;
  if not found or run.outcome <> 'running' then
    raise exception 'maintenance run % is not under way', run_id using errcode = '22023';
  end if;
  lock_key := pg_catalog.hashtext('amethyst-credits maintenance ' || run.task);
  -- pg_locks shows a bigint advisory key as its high and low 32 bits, with objsubid 1.
  if not exists (
    select 1 from pg_catalog.pg_locks l
     where l.locktype = 'advisory' and l.granted and l.objsubid = 1
       and l.pid = pg_catalog.pg_backend_pid()
       and l.database = (select d.oid from pg_catalog.pg_database d
                          where d.datname = pg_catalog.current_database())
       and l.classid::bigint = (lock_key >> 32) & 4294967295
       and l.objid::bigint = lock_key & 4294967295
  ) then
    raise exception 'maintenance run % belongs to another session', run_id using errcode = '55P03';
  end if;
  return run;
end;
$$;

-- The archival defaults have this one home: callers that pass null (the CLI without
-- --archive-after-months, the pg_cron jobs) get 12 months and batches of 5000.
create function public.maintenance_start(
  task text,
  archive_older_than interval default null
) returns bigint
language plpgsql volatile
set search_path = ''
as $$
declare
  -- The same key as run_maintenance used, so a run of the old procedure still in flight
  -- during a deploy does not overlap a new one.
  lock_key bigint := pg_catalog.hashtext('amethyst-credits maintenance ' || task);
  new_run bigint;
begin
  archive_older_than := coalesce(archive_older_than, interval '12 months');
  if task is null or task not in ('daily', 'weekly', 'monthly') then
    raise exception 'unknown maintenance task %; expected daily, weekly or monthly', task
      using errcode = '22023';
  end if;
  if task = 'monthly' and (archive_older_than is null or archive_older_than <= interval '0') then
    raise exception 'archive_older_than must be a positive interval' using errcode = '22023';
  end if;
  if not pg_catalog.pg_try_advisory_lock(lock_key) then
    raise exception 'maintenance % is already running', task using errcode = '55P03';
  end if;

  begin
    -- Runs of this task still marked running belong to sessions that died (we hold the lock).
    update public.maintenance_runs r set outcome = 'interrupted', finished_at = pg_catalog.now()
     where r.task = maintenance_start.task and r.outcome = 'running';
    -- The archival's cut-off is fixed for the whole run, whenever its batches happen.
    insert into public.maintenance_runs (task, findings)
    values (maintenance_start.task,
            case when task = 'monthly' then pg_catalog.jsonb_build_object(
              'archived', 0, 'batches', 0, 'cutoff', pg_catalog.now() - archive_older_than,
              'older_than', archive_older_than::text)
            else '{}'::jsonb end)
    returning id into new_run;
  exception when others then
    -- A session-level lock survives the rollback: give it back.
    perform pg_catalog.pg_advisory_unlock(lock_key);
    raise;
  end;
  return new_run;
end;
$$;

create function public.maintenance_archive_batch(run_id bigint, batch_size integer default null)
returns integer
language plpgsql volatile
set search_path = ''
as $$
declare
  run public.maintenance_runs := public.maintenance_running(run_id);
  cutoff timestamptz;
  n integer;
begin
  if run.task <> 'monthly' then
    raise exception 'maintenance run % is %, and only monthly runs archive', run_id, run.task
      using errcode = '22023';
  end if;
  batch_size := coalesce(batch_size, 5000);
  if batch_size < 1 then
    raise exception 'batch_size must be positive' using errcode = '22023';
  end if;
  cutoff := (run.findings ->> 'cutoff')::timestamptz;

  -- Oldest first; rows locked by a writer are left for the next batch or run.
  with batch as (
    select t.id from public.credit_transactions t
     where t.created_at < cutoff
     order by t.seq
     limit batch_size
     for update skip locked
  ),
  moved_rows as (
    delete from public.credit_transactions t using batch b where t.id = b.id
    returning t.id, t.seq, t.user_id, t.amount, t.balance_after, t.source, t.description, t.reference, t.created_at
  )
  insert into public.credit_transactions_archive
    (id, seq, user_id, amount, balance_after, source, description, reference, created_at)
  select * from moved_rows;
  get diagnostics n = row_count;

  if n > 0 then
    update public.maintenance_runs r
       set findings = r.findings || pg_catalog.jsonb_build_object(
             'archived', (r.findings ->> 'archived')::bigint + n,
             'batches', (r.findings ->> 'batches')::integer + 1)
     where r.id = run_id;
  end if;
  return n;
end;
$$;

create function public.maintenance_finish(run_id bigint) returns public.maintenance_runs
language plpgsql volatile
set search_path = ''
as $$
declare
  run public.maintenance_runs := public.maintenance_running(run_id);
  lock_key bigint := pg_catalog.hashtext('amethyst-credits maintenance ' || run.task);
  run_findings jsonb := '{}'::jsonb;
  run_outcome text := 'ok';
  n bigint;
  details jsonb;
  stats_schema text;
begin
  if run.task = 'daily' then
    -- The ledger, as `verify` checks it.
    begin
      select pg_catalog.count(*), coalesce(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(d)) filter (where d.rn <= 20), '[]')
        into n, details
        from (select l.*, pg_catalog.row_number() over (order by l.user_id) as rn
                from public.ledger_discrepancies() l) d;
      run_findings := run_findings || pg_catalog.jsonb_build_object('ledger', pg_catalog.jsonb_build_object(
        'discrepancies', n, 'users', details));
      if n > 0 then run_outcome := 'findings'; end if;
    exception when others then
      run_findings := run_findings || pg_catalog.jsonb_build_object('ledger', pg_catalog.jsonb_build_object('error', sqlerrm));
      run_outcome := 'failed';
    end;

    -- Stripe events that failed, were rejected as malformed, or never finished.
    begin
      select pg_catalog.count(*),
             coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
               'id', e.id, 'type', e.type, 'status', e.status, 'attempts', e.attempts,
               'error', e.error, 'received_at', e.received_at) order by e.received_at desc)
               filter (where e.rn <= 20), '[]')
        into n, details
        from (select s.*, pg_catalog.row_number() over (order by s.received_at desc) as rn
                from public.stripe_events s
               where s.status in ('failed', 'rejected', 'processing')) e;
      run_findings := run_findings || pg_catalog.jsonb_build_object('stripe_events', pg_catalog.jsonb_build_object(
        'unsettled', n, 'events', details));
      if n > 0 and run_outcome = 'ok' then run_outcome := 'findings'; end if;
    exception when others then
      run_findings := run_findings || pg_catalog.jsonb_build_object('stripe_events', pg_catalog.jsonb_build_object('error', sqlerrm));
      run_outcome := 'failed';
    end;

    -- Idempotency records live for the idempotency window.
    begin
      delete from public.idempotency_keys k where k.created_at < pg_catalog.now() - public.idempotency_window();
      get diagnostics n = row_count;
      run_findings := run_findings || pg_catalog.jsonb_build_object('idempotency_keys_removed', n);
    exception when others then
      run_findings := run_findings || pg_catalog.jsonb_build_object('idempotency_keys', pg_catalog.jsonb_build_object('error', sqlerrm));
      run_outcome := 'failed';
    end;

    -- Fresh statistics for the planner on the tables that change all day.
    begin
      analyze public.profiles, public.credit_transactions, public.ad_views, public.idempotency_keys,
              public.stripe_events, public.stripe_grants;
      run_findings := run_findings || pg_catalog.jsonb_build_object('analyzed', pg_catalog.jsonb_build_array(
        'profiles', 'credit_transactions', 'ad_views', 'idempotency_keys', 'stripe_events', 'stripe_grants'));
    exception when others then
      run_findings := run_findings || pg_catalog.jsonb_build_object('analyze', pg_catalog.jsonb_build_object('error', sqlerrm));
      run_outcome := 'failed';
    end;

  elsif run.task = 'weekly' then
    -- Slow queries, where pg_stat_statements is installed (in whatever schema) and loaded.
    select ns.nspname into stats_schema
      from pg_catalog.pg_extension x join pg_catalog.pg_namespace ns on ns.oid = x.extnamespace
     where x.extname = 'pg_stat_statements';
    if stats_schema is null then
      run_findings := run_findings || pg_catalog.jsonb_build_object('slow_queries',
        pg_catalog.jsonb_build_object('skipped', 'pg_stat_statements is not installed in this database'));
    else
      begin
        execute pg_catalog.format(
          'select coalesce(pg_catalog.jsonb_agg(q), ''[]'') from (
             select pg_catalog.left(s.query, 500) as query, s.calls,
                    pg_catalog.round(s.mean_exec_time::numeric, 2) as mean_ms,
                    pg_catalog.round(s.total_exec_time::numeric, 2) as total_ms
               from %I.pg_stat_statements s
              where s.dbid = (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database())
              order by s.mean_exec_time desc limit 10) q', stats_schema)
          into details;
        run_findings := run_findings || pg_catalog.jsonb_build_object('slow_queries', details);
      exception when others then
        run_findings := run_findings || pg_catalog.jsonb_build_object('slow_queries',
          pg_catalog.jsonb_build_object('skipped', sqlerrm));
      end;
    end if;

    -- Indexes never scanned since statistics were last reset (informational).
    select coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
             'index', s.indexrelname, 'table', s.relname,
             'size', pg_catalog.pg_size_pretty(pg_catalog.pg_relation_size(s.indexrelid))) order by s.indexrelname), '[]')
      into details
      from pg_catalog.pg_stat_user_indexes s
      join pg_catalog.pg_index i on i.indexrelid = s.indexrelid
     where s.schemaname = 'public' and s.idx_scan = 0 and not i.indisunique and not i.indisprimary;
    run_findings := run_findings || pg_catalog.jsonb_build_object('unused_indexes', details);

    -- Indexes that repeat another one exactly (same table, columns, operators, predicate).
    select coalesce(pg_catalog.jsonb_agg(d.names), '[]') into details
      from (select pg_catalog.jsonb_agg(c.relname::text order by c.relname) as names
              from pg_catalog.pg_index i
              join pg_catalog.pg_class c on c.oid = i.indexrelid
              join pg_catalog.pg_class t on t.oid = i.indrelid
             where t.relnamespace = 'public'::regnamespace
             group by i.indrelid, i.indkey::text, i.indclass::text, coalesce(i.indexprs::text, ''),
                      coalesce(i.indpred::text, '')
            having pg_catalog.count(*) > 1) d;
    run_findings := run_findings || pg_catalog.jsonb_build_object('duplicate_indexes', details);
    if pg_catalog.jsonb_array_length(details) > 0 then run_outcome := 'findings'; end if;

    -- Bloat, estimated: an index of over 1 MB holding more than twice the bytes its live
    -- entries need (8 bytes of header and 8 of pointer per entry, 90 % leaf fill).
    select coalesce(pg_catalog.jsonb_agg(b order by b.size_bytes desc), '[]') into details
      from (select c.relname as index, t.relname as "table",
                   pg_catalog.pg_relation_size(c.oid) as size_bytes,
                   pg_catalog.round(pg_catalog.pg_relation_size(c.oid)::numeric
                     / greatest(1, (c.reltuples * (16 + coalesce(w.width, 8)) / 0.9)::numeric), 1) as ratio
              from pg_catalog.pg_class c
              join pg_catalog.pg_index i on i.indexrelid = c.oid
              join pg_catalog.pg_class t on t.oid = i.indrelid
              left join lateral (
                select pg_catalog.sum(st.avg_width)::numeric as width
                  from pg_catalog.pg_attribute a
                  join pg_catalog.pg_stats st
                    on st.schemaname = 'public' and st.tablename = t.relname and st.attname = a.attname
                 where a.attrelid = t.oid and a.attnum = any (i.indkey::int2[])
              ) w on true
             where c.relnamespace = 'public'::regnamespace and c.relkind = 'i' and c.reltuples > 0
               and pg_catalog.pg_relation_size(c.oid) > 1024 * 1024) b
     where b.ratio > 2;
    run_findings := run_findings || pg_catalog.jsonb_build_object('bloated_indexes', details);
    if pg_catalog.jsonb_array_length(details) > 0 then run_outcome := 'findings'; end if;

    -- Every public table must have Row Level Security.
    select coalesce(pg_catalog.jsonb_agg(t.tablename order by t.tablename), '[]') into details
      from pg_catalog.pg_tables t where t.schemaname = 'public' and not t.rowsecurity;
    run_findings := run_findings || pg_catalog.jsonb_build_object('tables_without_rls', details);
    if pg_catalog.jsonb_array_length(details) > 0 then run_outcome := 'findings'; end if;

  else
    -- Monthly: the batches did the work and kept count.
    run_findings := run.findings;
  end if;

  update public.maintenance_runs r
     set finished_at = pg_catalog.now(), outcome = run_outcome, findings = run_findings
   where r.id = run_id
  returning * into run;
  -- Unlocked before this transaction commits: a run starting in between waits on this row
  -- before it looks at its outcome, so it never takes this run for an interrupted one.
  perform pg_catalog.pg_advisory_unlock(lock_key);
  raise log 'amethyst-credits maintenance %: % %', run.task, run_outcome, run_findings;
  return run;
end;
$$;

comment on function public.maintenance_start(text, interval) is
  'Starts a daily, weekly or monthly maintenance run: takes the task''s lock and records the run. Commit, then maintenance_archive_batch (monthly) and maintenance_finish.';
comment on function public.maintenance_archive_batch(bigint, integer) is
  'Monthly run: moves one batch of old credit transactions to the archive and answers how many; commit after each, until 0.';
comment on function public.maintenance_finish(bigint) is
  'Does the run''s remaining work, records its outcome in maintenance_runs and releases the task''s lock.';

revoke all on function public.maintenance_running(bigint) from public, anon, authenticated;
revoke all on function public.maintenance_start(text, interval) from public, anon, authenticated;
revoke all on function public.maintenance_archive_batch(bigint, integer) from public, anon, authenticated;
revoke all on function public.maintenance_finish(bigint) from public, anon, authenticated;

-- The pg_cron jobs, where they were scheduled, now run the same steps (same names: scheduling
-- again replaces the command). Each job runs in a session of its own, so the lock goes with it.
do $$
declare
  job record;
begin
  if not exists (select 1 from pg_catalog.pg_extension where extname = 'pg_cron') then
    return;
  end if;
  for job in
    select * from (values
      ('amethyst-credits-daily', '10 0 * * *', 'daily'),
      ('amethyst-credits-weekly', '30 1 * * 1', 'weekly'),
      ('amethyst-credits-monthly', '0 3 1 * *', 'monthly')) as j (name, schedule, task)
  loop
    perform cron.schedule(job.name, job.schedule, pg_catalog.format(
      'do $job$ declare run bigint := public.maintenance_start(%L); begin commit;%s '
      'perform public.maintenance_finish(run); end $job$',
      job.task,
      case when job.task = 'monthly'
        then ' while public.maintenance_archive_batch(run) > 0 loop commit; end loop;' else '' end));
  end loop;
end
$$;
