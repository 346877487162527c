-- Ad rewards the client cannot farm: a view pays only through an ad session the server opened,
-- for no more seconds than the server saw pass since then, at most once; in `admob` mode only
-- once AdMob's signed callback for the session has arrived. The reward table and the daily
-- limit stay in handle_ad_view, which every path below calls under the profile's row lock.
--
-- Every function that pays locks the profile's row first and the session's second, in that
-- order, so a completion and a callback for the same session (or many sessions of one user)
-- take turns instead of deadlocking.

-- Sessions carry the ad unit and network a view records; both are at most 255 characters, on
-- views too, so that a session's values always fit the view it pays.
alter table public.ad_views drop constraint ad_views_provider_check;
alter table public.ad_views add constraint ad_views_provider_check
  check (char_length(provider) <= 255);

create table public.ad_sessions (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  -- 'expired' is also what any unfinished session reads as once expires_at has passed
  -- (public.ad_session_status); it is written when a new session sweeps the old ones.
  status text not null default 'open'
    check (status in ('open', 'verified', 'pending_verification', 'completed', 'expired')),
  provider text check (char_length(provider) <= 255),
  ad_unit_id text check (char_length(ad_unit_id) <= 255),
  started_at timestamptz not null default now(),
  expires_at timestamptz not null,
  check (expires_at > started_at),
  completed_at timestamptz,
  claimed_seconds integer check (claimed_seconds between 0 and 86400),
  -- least(claimed, seconds the server saw pass between started_at and completed_at)
  credited_seconds integer check (credited_seconds between 0 and 86400),
  -- The AdMob callback that verified the session; one callback verifies one session.
  ssv_transaction_id text unique,
  -- The view that paid it. No foreign key, as for ad_views.transaction_id: the link is history.
  ad_view_id uuid,
  paid_at timestamptz,
  -- The AdViewResult of the payment, answered again on every later read of the session.
  result jsonb
);

-- Counting a user's unfinished sessions.
create index ad_sessions_user_unfinished_idx on public.ad_sessions (user_id)
  where status in ('open', 'verified', 'pending_verification');
-- Clean-up by age.
create index ad_sessions_started_at_idx on public.ad_sessions (started_at);

-- Every AdMob callback whose signature verified, by its transaction_id: the same transaction
-- is answered `duplicate` and pays nothing, however often AdMob retries it.
create table public.admob_ssv_callbacks (
  transaction_id text primary key check (char_length(transaction_id) between 1 and 1024),
  key_id bigint not null,
  ad_unit text check (char_length(ad_unit) <= 1024),
  user_id text check (char_length(user_id) <= 1024),
  custom_data text check (char_length(custom_data) <= 1024),
  signed_at timestamptz not null,
  received_at timestamptz not null default now(),
  outcome text not null check (outcome in ('accepted', 'refused')),
  reason text,
  session_id uuid
);

create index admob_ssv_callbacks_received_at_idx on public.admob_ssv_callbacks (received_at);

alter table public.ad_sessions enable row level security;
alter table public.admob_ssv_callbacks enable row level security;
revoke all on table public.ad_sessions, public.admob_ssv_callbacks from public, anon, authenticated;
grant all on table public.ad_sessions, public.admob_ssv_callbacks to service_role;

-- What a session reads as now: an unfinished session past its lifetime is expired.
create function public.ad_session_status(status text, expires_at timestamptz) returns text
language sql stable parallel safe
set search_path = ''
as $$
  select case
    when ad_session_status.status in ('open', 'verified', 'pending_verification')
         and ad_session_status.expires_at <= pg_catalog.now() then 'expired'
    else ad_session_status.status
  end
$$;

-- Opens a session with the server's clock. Refused (AC429, the wait as detail) when no view is
-- left today, and (ACS09) when the user already has max_open unfinished sessions.
create function public.open_ad_session(
  user_id uuid,
  ad_unit_id text,
  provider text,
  ttl_seconds integer,
  max_open integer
) returns setof public.ad_sessions
language plpgsql security definer
set search_path = ''
as $$
declare
  counted_on date;
  counted integer;
  unfinished integer;
  allowance record;
begin
  -- The row lock makes the count of open sessions exact against a concurrent open.
  select p.ad_views_date, p.ad_views_today into counted_on, counted
    from public.profiles p where p.id = open_ad_session.user_id for no key update;
  if not found then
    raise exception 'profile not found' using errcode = 'AC404';
  end if;
  select * into allowance from public.ad_allowance(counted_on, counted);
  if allowance.views_remaining = 0 then
    raise exception 'daily ad view limit reached' using errcode = 'AC429',
      detail = allowance.retry_after_seconds::text;
  end if;

  update public.ad_sessions s set status = 'expired'
   where s.user_id = open_ad_session.user_id
     and s.status in ('open', 'verified', 'pending_verification')
     and s.expires_at <= pg_catalog.now();
  select count(*) into unfinished from public.ad_sessions s
   where s.user_id = open_ad_session.user_id
     and s.status in ('open', 'verified', 'pending_verification');
  if unfinished >= open_ad_session.max_open then
    raise exception 'too many open ad sessions' using errcode = 'ACS09';
  end if;

  return query
    insert into public.ad_sessions (user_id, ad_unit_id, provider, expires_at)
    values (open_ad_session.user_id, open_ad_session.ad_unit_id, open_ad_session.provider,
            pg_catalog.now() + pg_catalog.make_interval(secs => open_ad_session.ttl_seconds))
    returning *;
end;
$$;

-- Pays a session whose credited_seconds are set: one view through handle_ad_view (the reward
-- table, the daily limit, the ledger), the session marked completed with the view's result.
-- The callers hold the profile's and the session's row locks.
create function public.pay_ad_session(session_id uuid) returns setof public.ad_sessions
language plpgsql security definer
set search_path = ''
as $$
declare
  s public.ad_sessions;
  v record;
  a record;
begin
  select * into strict s from public.ad_sessions x where x.id = pay_ad_session.session_id;
  -- A session pays once: a second call, however it came, pays nothing.
  if s.paid_at is not null or s.credited_seconds is null then
    return query select x.* from public.ad_sessions x where x.id = s.id;
    return;
  end if;
  select * into v from public.handle_ad_view(s.user_id, s.credited_seconds, s.ad_unit_id, s.provider);
  select * into a from public.ad_allowance((pg_catalog.now() at time zone 'utc')::date, v.views_today);
  return query
    update public.ad_sessions x
       set status = 'completed', ad_view_id = v.view_id, paid_at = pg_catalog.now(),
           result = pg_catalog.jsonb_build_object(
             'view_id', v.view_id, 'duration_seconds', s.credited_seconds,
             'credits_awarded', v.credits_awarded, 'balance', v.balance,
             'views_today', a.views_today, 'views_remaining', a.views_remaining,
             'resets_at', a.resets_at)
     where x.id = s.id
    returning x.*;
end;
$$;

-- Completes a user's session with the seconds the client claims. The credited duration is at
-- most the time the server saw pass since the session opened. With require_verification (the
-- `admob` mode) a session without its callback waits as pending_verification, and the callback
-- pays it. A completed or pending session answers as it is: a repeat pays nothing.
-- Refused: ACS04 (no such session of this user), ACS10 (expired), AC429 (no view left today;
-- nothing changes).
create function public.complete_ad_session(
  session_id uuid,
  user_id uuid,
  claimed_seconds integer,
  require_verification boolean
) returns setof public.ad_sessions
language plpgsql security definer
set search_path = ''
as $$
declare
  s public.ad_sessions;
begin
  if complete_ad_session.claimed_seconds is null
     or complete_ad_session.claimed_seconds not between 0 and 86400 then
    raise exception 'claimed_seconds must be between 0 and 86400' using errcode = '22023';
  end if;
  perform 1 from public.profiles p where p.id = complete_ad_session.user_id for no key update;
  select * into s from public.ad_sessions x
   where x.id = complete_ad_session.session_id and x.user_id = complete_ad_session.user_id
     for update;
  if not found then
    raise exception 'ad session not found' using errcode = 'ACS04';
  end if;
  if s.status in ('completed', 'pending_verification') then
    return next s;
    return;
  end if;
  if public.ad_session_status(s.status, s.expires_at) = 'expired' then
    raise exception 'ad session expired' using errcode = 'ACS10';
  end if;

  update public.ad_sessions x
     set claimed_seconds = complete_ad_session.claimed_seconds,
         credited_seconds = least(
           complete_ad_session.claimed_seconds,
           greatest(0, floor(extract(epoch from pg_catalog.now() - x.started_at)))::integer),
         completed_at = pg_catalog.now(),
         status = case when complete_ad_session.require_verification and x.status = 'open'
                       then 'pending_verification' else x.status end
   where x.id = s.id
  returning x.* into s;
  if s.status = 'pending_verification' then
    return next s;
    return;
  end if;
  return query select * from public.pay_ad_session(s.id);
end;
$$;

-- Records an AdMob callback whose signature the service verified, and acts on it: the first
-- callback of a transaction verifies the session it names (custom_data) for the user it names
-- (user_id), paying it when its completion is already waiting. Refused, and paying nothing:
-- a timestamp more than max_age_seconds away from now, an ad unit outside the allow-list, an
-- unknown or expired session, another user's session, a session verified by another
-- transaction, no view left today. A transaction seen before answers `duplicate`.
create function public.record_admob_callback(
  transaction_id text,
  key_id bigint,
  ad_unit text,
  raw_user_id text,
  raw_custom_data text,
  user_id uuid,
  session_id uuid,
  signed_at timestamptz,
  max_age_seconds integer,
  ad_unit_allowed boolean
) returns table (outcome text, reason text, session uuid, paid boolean, credits_awarded integer)
language plpgsql security definer
set search_path = ''
as $$
declare
  s public.ad_sessions;
  why text;
  did_pay boolean := false;
  awarded integer;
begin
  -- A concurrent callback of the same transaction waits here on the key, then finds it taken.
  insert into public.admob_ssv_callbacks as c (transaction_id, key_id, ad_unit, user_id,
                                               custom_data, signed_at, outcome)
  values (record_admob_callback.transaction_id, record_admob_callback.key_id,
          record_admob_callback.ad_unit, record_admob_callback.raw_user_id,
          record_admob_callback.raw_custom_data, record_admob_callback.signed_at, 'refused')
  on conflict on constraint admob_ssv_callbacks_pkey do nothing;
  if not found then
    return query select 'duplicate'::text, null::text,
      (select c.session_id from public.admob_ssv_callbacks c
        where c.transaction_id = record_admob_callback.transaction_id), false, null::integer;
    return;
  end if;

  why := case
    when abs(extract(epoch from pg_catalog.now() - record_admob_callback.signed_at))
         > record_admob_callback.max_age_seconds then 'stale_timestamp'
    when not record_admob_callback.ad_unit_allowed then 'ad_unit_not_allowed'
    when record_admob_callback.user_id is null or record_admob_callback.session_id is null
      then 'unknown_session'
  end;
  if why is null then
    perform 1 from public.profiles p where p.id = record_admob_callback.user_id for no key update;
    select * into s from public.ad_sessions x where x.id = record_admob_callback.session_id
      for update;
    if not found then
      why := 'unknown_session';
    elsif s.user_id <> record_admob_callback.user_id then
      why := 'other_user';
    elsif s.ssv_transaction_id is not null then
      why := 'session_already_verified';
    elsif s.status <> 'completed' and public.ad_session_status(s.status, s.expires_at) = 'expired' then
      why := 'session_expired';
    end if;
  end if;

  if why is null then
    begin
      update public.ad_sessions x
         set ssv_transaction_id = record_admob_callback.transaction_id,
             status = case when x.status = 'open' then 'verified' else x.status end
       where x.id = s.id;
      if s.status = 'pending_verification' then
        select (p.result ->> 'credits_awarded')::integer into awarded
          from public.pay_ad_session(s.id) p;
        did_pay := true;
      end if;
    exception when sqlstate 'AC429' then
      why := 'daily_ad_limit_reached';
    end;
  end if;

  update public.admob_ssv_callbacks c
     set outcome = case when why is null then 'accepted' else 'refused' end,
         reason = why,
         session_id = case when s.user_id = record_admob_callback.user_id then s.id end
   where c.transaction_id = record_admob_callback.transaction_id;
  return query select case when why is null then 'accepted' else 'refused' end, why,
    case when s.user_id = record_admob_callback.user_id then s.id end, did_pay, awarded;
end;
$$;

revoke all on function public.ad_session_status(text, timestamptz) from public, anon, authenticated;
revoke all on function public.open_ad_session(uuid, text, text, integer, integer) from public, anon, authenticated;
revoke all on function public.pay_ad_session(uuid) from public, anon, authenticated;
revoke all on function public.complete_ad_session(uuid, uuid, integer, boolean) from public, anon, authenticated;
revoke all on function public.record_admob_callback(text, bigint, text, text, text, uuid, uuid, timestamptz, integer, boolean) from public, anon, authenticated;
grant execute on function public.ad_session_status(text, timestamptz) to service_role;
grant execute on function public.open_ad_session(uuid, text, text, integer, integer) to service_role;
-- pay_ad_session is called only by the functions above (as their owner): no role may call it.
grant execute on function public.complete_ad_session(uuid, uuid, integer, boolean) to service_role;
grant execute on function public.record_admob_callback(text, bigint, text, text, text, uuid, uuid, timestamptz, integer, boolean) to service_role;
