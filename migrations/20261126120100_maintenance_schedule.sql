-- Schedules the maintenance with pg_cron where it can run (as on Supabase, once the extension
-- is enabled), and says so and moves on where it cannot. Everywhere, the same work runs with
-- `amethyst-credits maintenance daily|weekly|monthly` from any scheduler.
do $$
begin
  if not exists (select 1 from pg_catalog.pg_extension where extname = 'pg_cron') then
    if not exists (select 1 from pg_catalog.pg_available_extensions where name = 'pg_cron') then
      raise notice 'pg_cron is not installed on this server: maintenance is not scheduled here; '
                   'run amethyst-credits maintenance daily|weekly|monthly from another scheduler';
      return;
    end if;
    -- pg_cron only loads through shared_preload_libraries and only lives in the database named
    -- by cron.database_name; anywhere else creating it fails, and that is not an error here.
    begin
      create extension pg_cron;
    exception when others then
      raise notice 'pg_cron cannot be enabled in this database (%): maintenance is not scheduled here; '
                   'run amethyst-credits maintenance daily|weekly|monthly from another scheduler', sqlerrm;
      return;
    end;
  end if;

  -- Named jobs: scheduling again under the same name replaces the job, so this is repeatable.
  perform cron.schedule('amethyst-credits-daily', '10 0 * * *', 'call public.run_maintenance(''daily'')');
  perform cron.schedule('amethyst-credits-weekly', '30 1 * * 1', 'call public.run_maintenance(''weekly'')');
  perform cron.schedule('amethyst-credits-monthly', '0 3 1 * *', 'call public.run_maintenance(''monthly'')');
  raise notice 'maintenance scheduled with pg_cron: daily 00:10, weekly Monday 01:30, monthly on the 1st at 03:00 (server time)';
end
$$;
