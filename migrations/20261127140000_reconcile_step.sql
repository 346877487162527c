-- Maintenance steps done outside SQL. The daily run reconciles with Stripe's events (the CLI,
-- in Rust: SQL cannot call Stripe's API); what that found belongs to the run like every other
-- finding, and a reconciliation that failed must make the run's outcome not `ok`.
--
-- The caller records such a step between maintenance_start and maintenance_finish:
--
--   maintenance_record_step(run, step, outcome, details)
--
-- which puts `details` (plus `"outcome"`) under `step` in the run's findings. Finishing keeps
-- the recorded steps beside the findings of the SQL tasks, and the run's outcome is the worst
-- of both (failed > findings > ok). pg_cron jobs record no steps, and finish as before.

create function public.maintenance_record_step(
  run_id bigint,
  step text,
  outcome text,
  details jsonb
) returns void
language plpgsql volatile
set search_path = ''
as $$
declare
  -- Only the session that started the run, while it is under way.
  run public.maintenance_runs := public.maintenance_running(run_id);
begin
  if step is null or step !~ '^[a-z_]{1,40}$' then
    raise exception 'a step is named in lower-case letters and _, not %', step using errcode = '22023';
  end if;
  if outcome is null or outcome not in ('ok', 'findings', 'failed') then
    raise exception 'a step''s outcome is ok, findings or failed, not %', outcome using errcode = '22023';
  end if;
  update public.maintenance_runs r
     set findings = r.findings || pg_catalog.jsonb_build_object(
           maintenance_record_step.step,
           coalesce(maintenance_record_step.details, '{}'::jsonb)
             || pg_catalog.jsonb_build_object('outcome', maintenance_record_step.outcome),
           'recorded_steps', coalesce(r.findings -> 'recorded_steps', '[]'::jsonb)
                             || pg_catalog.to_jsonb(maintenance_record_step.step))
   where r.id = run.id;
end;
$$;

-- The SQL tasks stay as they were, under a new name; maintenance_finish wraps them so that the
-- recorded steps survive the findings they write and count in the outcome.
alter function public.maintenance_finish(bigint) rename to maintenance_finish_tasks;

comment on function public.maintenance_finish_tasks(bigint) is
  'The SQL work of maintenance_finish: the daily or weekly checks, the outcome, the unlock.';

create function public.maintenance_finish(run_id bigint) returns public.maintenance_runs
language plpgsql volatile
set search_path = ''
as $$
declare
  started public.maintenance_runs := public.maintenance_running(run_id);
  recorded jsonb := '{}'::jsonb;
  steps_outcome text := 'ok';
  step text;
  run public.maintenance_runs;
begin
  for step in
    select s.value from pg_catalog.jsonb_array_elements_text(
      coalesce(started.findings -> 'recorded_steps', '[]'::jsonb)) s
  loop
    recorded := recorded || pg_catalog.jsonb_build_object(step, started.findings -> step);
    if started.findings -> step ->> 'outcome' = 'failed' then
      steps_outcome := 'failed';
    elsif started.findings -> step ->> 'outcome' = 'findings' and steps_outcome = 'ok' then
      steps_outcome := 'findings';
    end if;
  end loop;

  -- Writes the tasks' findings and outcome and releases the task's lock. This transaction
  -- keeps the run's row locked until it commits, so the update below is seen with it.
  run := public.maintenance_finish_tasks(run_id);
  if recorded = '{}'::jsonb then
    return run;
  end if;

  update public.maintenance_runs r
     set findings = recorded || r.findings,
         outcome = case
           when 'failed' in (r.outcome, steps_outcome) then 'failed'
           when 'findings' in (r.outcome, steps_outcome) then 'findings'
           else r.outcome end
   where r.id = run_id
  returning * into run;
  raise log 'amethyst-credits maintenance % steps: % %', run.task, run.outcome, recorded;
  return run;
end;
$$;

comment on function public.maintenance_record_step(bigint, text, text, jsonb) is
  'Records a step of a maintenance run done outside SQL (the daily reconciliation with Stripe): its findings and outcome, kept by maintenance_finish.';
comment on function public.maintenance_finish(bigint) is
  'Does the run''s remaining work, records its outcome in maintenance_runs (the worst of its tasks and its recorded steps) and releases the task''s lock.';

revoke all on function public.maintenance_record_step(bigint, text, text, jsonb) from public, anon, authenticated;
revoke all on function public.maintenance_finish_tasks(bigint) from public, anon, authenticated;
revoke all on function public.maintenance_finish(bigint) from public, anon, authenticated;
