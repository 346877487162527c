-- Maintenance (source document, "Maintenance"): the daily, weekly and monthly tasks, written
-- once as a procedure that `amethyst-credits maintenance …` and pg_cron both call, and the
-- table where every run is recorded.

-- Old ledger rows move here (monthly). Balances never change; the ledger invariant counts
-- these rows as well.
create table public.credit_transactions_archive (
  id uuid primary key,
  seq bigint not null,
  user_id uuid not null references public.profiles (id) on delete cascade,
  amount integer not null,
  balance_after integer not null,
  source text not null,
  description text,
  reference text,
  created_at timestamptz not null,
  archived_at timestamptz not null default now()
);

create index credit_transactions_archive_user_seq_idx on public.credit_transactions_archive (user_id, seq desc);

create table public.maintenance_runs (
  id bigint generated always as identity primary key,
  task text not null check (task in ('daily', 'weekly', 'monthly')),
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  -- running: under way (or its session died: the next run of the task marks it interrupted);
  -- ok: nothing to report; findings: something needs a look; failed: a task could not run.
  outcome text not null default 'running'
    check (outcome in ('running', 'ok', 'findings', 'failed', 'interrupted')),
  findings jsonb not null default '{}'::jsonb
);

create index maintenance_runs_task_started_idx on public.maintenance_runs (task, started_at desc);

-- Profiles whose balance disagrees with their ledger (archived rows included): the balance
-- must equal the sum of the amounts and the newest row's balance_after.
create function public.ledger_discrepancies()
returns table (user_id uuid, credits integer, ledger_total bigint, newest_balance_after integer)
language sql stable
set search_path = ''
as $$
  with entries as (
    select t.user_id, t.amount, t.balance_after, t.seq from public.credit_transactions t
    union all
    select a.user_id, a.amount, a.balance_after, a.seq from public.credit_transactions_archive a
  ),
  totals as (
    select e.user_id, sum(e.amount)::bigint as total from entries e group by e.user_id
  ),
  newest as (
    select distinct on (e.user_id) e.user_id, e.balance_after from entries e order by e.user_id, e.seq desc
  )
  select p.id, p.credits, coalesce(t.total, 0), n.balance_after
    from public.profiles p
    left join totals t on t.user_id = p.id
    left join newest n on n.user_id = p.id
   where p.credits <> coalesce(t.total, 0)
      or p.credits <> coalesce(n.balance_after, 0)
$$;

-- One run of a maintenance task. A procedure, not a function, so that archival can commit
-- between batches: an interrupted run keeps what it moved and the next run finishes the job.
-- (Procedures that commit cannot pin search_path, so every name below is qualified.)
create procedure public.run_maintenance(
  task text,
  inout run_id bigint default null,
  archive_older_than interval default interval '12 months',
  archive_batch_size integer default 5000,
  archive_pause_seconds double precision default 0
)
language plpgsql
as $$
declare
  lock_key bigint := pg_catalog.hashtext('amethyst-credits maintenance ' || task);
  run_findings jsonb := '{}'::jsonb;
  run_outcome text := 'ok';
  n bigint;
  details jsonb;
  cutoff timestamptz;
  moved bigint := 0;
  batches integer := 0;
  stats_schema text;
begin
  if task is null or task not in ('daily', 'weekly', 'monthly') then
    raise exception 'unknown maintenance task %; expected daily, weekly or monthly', task
      using errcode = '22023';
  end if;
  if not pg_catalog.pg_try_advisory_lock(lock_key) then
    raise exception 'maintenance % is already running', task using errcode = '55P03';
  end if;

  -- Runs of this task still marked running belong to sessions that died (we hold the lock).
  update public.maintenance_runs r set outcome = 'interrupted', finished_at = pg_catalog.now()
   where r.task = run_maintenance.task and r.outcome = 'running';
  insert into public.maintenance_runs (task) values (run_maintenance.task) returning id into run_id;
  commit;

  if task = 'daily' then
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

    -- Idempotency records live 24 hours.
    begin
      delete from public.idempotency_keys k where k.created_at < pg_catalog.now() - interval '24 hours';
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

  elsif task = 'weekly' then
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
    -- Archive ledger rows older than the cut-off, a batch per transaction, oldest first.
    cutoff := pg_catalog.now() - archive_older_than;
    loop
      with batch as (
        select t.id from public.credit_transactions t
         where t.created_at < cutoff
         order by t.seq
         limit archive_batch_size
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
      exit when n = 0;
      moved := moved + n;
      batches := batches + 1;
      update public.maintenance_runs r
         set findings = pg_catalog.jsonb_build_object('archived', moved, 'batches', batches, 'cutoff', cutoff)
       where r.id = run_id;
      commit;
      if archive_pause_seconds > 0 then
        perform pg_catalog.pg_sleep(archive_pause_seconds);
      end if;
    end loop;
    run_findings := pg_catalog.jsonb_build_object('archived', moved, 'batches', batches, 'cutoff', cutoff,
      'older_than', archive_older_than::text);
  end if;

  update public.maintenance_runs r
     set finished_at = pg_catalog.now(), outcome = run_outcome, findings = run_findings
   where r.id = run_id;
  commit;
  perform pg_catalog.pg_advisory_unlock(lock_key);
  raise log 'amethyst-credits maintenance %: % %', task, run_outcome, run_findings;
end;
$$;

comment on procedure public.run_maintenance(text, bigint, interval, integer, double precision) is
  'Runs the daily, weekly or monthly maintenance once and records it in maintenance_runs.';

alter table public.credit_transactions_archive enable row level security;
alter table public.maintenance_runs enable row level security;

revoke all on table public.credit_transactions_archive, public.maintenance_runs from public, anon, authenticated;
grant select, insert, update, delete on table public.credit_transactions_archive, public.maintenance_runs to service_role;
grant select on table public.credit_transactions_archive to authenticated;

create policy credit_transactions_archive_select_own_or_admin on public.credit_transactions_archive
  for select to authenticated
  using (user_id = (select auth.uid()) or (select public.is_admin()));

revoke all on function public.ledger_discrepancies() from public, anon, authenticated;
grant execute on function public.ledger_discrepancies() to service_role;
revoke all on procedure public.run_maintenance(text, bigint, interval, integer, double precision)
  from public, anon, authenticated;
