-- Rules the service used to recompute with its own clock, given one home here: the ad day
-- (views today, views remaining, when the count starts again) and the idempotency window.

-- How long an Idempotency-Key's answer is kept and replayed; the claim and the daily clean-up
-- both read it.
create function public.idempotency_window() returns interval
language sql immutable parallel safe
set search_path = ''
as $$ select interval '24 hours' $$;

-- The ad allowance as of now, from the profile's counter (views_date, views_count): the count
-- only counts on its own UTC day. Every read of a profile and every ad view answers with it.
create function public.ad_allowance(views_date date, views_count integer)
returns table (
  views_today integer,
  daily_limit integer,
  views_remaining integer,
  resets_at timestamptz,
  retry_after_seconds integer
)
language sql stable
set search_path = ''
as $$
  with day as (
    select (pg_catalog.now() at time zone 'utc')::date as today
  ), counted as (
    select case when ad_allowance.views_date = d.today then coalesce(ad_allowance.views_count, 0) else 0 end as n,
           (d.today + 1)::timestamp at time zone 'utc' as next_day
      from day d
  )
  select c.n,
         public.ad_daily_limit(),
         greatest(public.ad_daily_limit() - c.n, 0),
         c.next_day,
         greatest(1, pg_catalog.ceil(extract(epoch from (c.next_day - pg_catalog.now()))))::integer
    from counted c
$$;

create or replace function public.handle_ad_view(
  user_id uuid,
  duration_seconds integer,
  ad_unit_id text default null,
  provider text default null
) returns table (
  view_id uuid,
  credits_awarded integer,
  balance integer,
  views_today integer,
  transaction_id uuid
)
language plpgsql security definer
set search_path = ''
as $$
declare
  today date := (now() at time zone 'utc')::date;
  reward integer;
  new_balance integer;
  new_count integer;
  new_view_id uuid := gen_random_uuid();
  entry_id uuid;
begin
  if handle_ad_view.duration_seconds is null
     or handle_ad_view.duration_seconds not between 0 and 86400 then
    raise exception 'duration_seconds must be between 0 and 86400' using errcode = '22023';
  end if;

  reward := public.ad_view_reward(handle_ad_view.duration_seconds);

  -- One statement counts the view, checks the limit and pays the reward under the row lock;
  -- a concurrent view of the same user waits here and re-checks against the new count.
  update public.profiles p
     set ad_views_today = case when p.ad_views_date = today then p.ad_views_today + 1 else 1 end,
         ad_views_date = today,
         credits = p.credits + reward
   where p.id = handle_ad_view.user_id
     and (p.ad_views_date is distinct from today or p.ad_views_today < public.ad_daily_limit())
  returning p.credits, p.ad_views_today into new_balance, new_count;

  if not found then
    if exists (select 1 from public.profiles p where p.id = handle_ad_view.user_id) then
      -- The detail is the wait until the ad day ends, in whole seconds: the service sends it
      -- as Retry-After without knowing when a day ends.
      raise exception 'daily ad view limit reached' using errcode = 'AC429',
        detail = (select a.retry_after_seconds from public.ad_allowance(today, 0) a)::text;
    end if;
    raise exception 'profile not found' using errcode = 'AC404';
  end if;

  if reward > 0 then
    insert into public.credit_transactions (user_id, amount, balance_after, source, description, reference)
    values (handle_ad_view.user_id, reward, new_balance, 'ad_view', 'Rewarded ad view', new_view_id::text)
    returning id into entry_id;
  end if;

  insert into public.ad_views (id, user_id, viewed_on, duration_seconds, credits_awarded,
                               ad_unit_id, provider, transaction_id)
  values (new_view_id, handle_ad_view.user_id, today, handle_ad_view.duration_seconds, reward,
          handle_ad_view.ad_unit_id, handle_ad_view.provider, entry_id);

  return query select new_view_id, reward, new_balance, new_count, entry_id;
end;
$$;


revoke all on function public.idempotency_window() from public, anon, authenticated;
revoke all on function public.ad_allowance(date, integer) from public, anon, authenticated;
grant execute on function public.idempotency_window() to service_role;
grant execute on function public.ad_allowance(date, integer) to service_role;
