-- What ad views and profile reads cost the database, brought back down (bench/README.md,
-- "Seventh pass").
--
-- The three constants below were `language sql` functions with a `set search_path`: PostgreSQL
-- never inlines such a function and keeps no plan for it, so each transaction that evaluates
-- one parses and plans its body again. `ad_view_reward` is evaluated by every ad view,
-- `ad_daily_limit` by every profile read (`public.ad_allowance`) and `idempotency_window` by
-- the expiry of idempotency keys. In PL/pgSQL they are planned once per connection, like
-- `public.clock_now()` since 20261128050000_cached_plans.sql. What each returns is unchanged.

create or replace function public.ad_daily_limit() returns integer
language plpgsql immutable parallel safe set search_path = '' as $$
begin
  return 10;
end;
$$;

create or replace function public.ad_view_reward(duration_seconds integer) returns integer
language plpgsql immutable parallel safe set search_path = '' as $$
begin
  return case
    when ad_view_reward.duration_seconds >= 30 then 2
    when ad_view_reward.duration_seconds >= 15 then 1
    else 0
  end;
end;
$$;

create or replace function public.idempotency_window() returns interval
language plpgsql immutable parallel safe set search_path = '' as $$
begin
  return interval '24 hours';
end;
$$;
