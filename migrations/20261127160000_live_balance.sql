-- Live balance (docs/api.md, "Live balance"): every ledger row is announced to the service's
-- listeners, which wake the user's event streams; the streams then read what is new from the
-- ledger themselves. The announcement only says "look": a listener that misses one (a lost
-- connection, a restart) loses nothing, because the next read starts from the stream's last
-- sequence number, not from the announcement.

------------------------------------------------------------------------------------------------
-- The user's alert threshold.
------------------------------------------------------------------------------------------------

-- Null: the service's LOW_BALANCE_THRESHOLD. 0 turns the alerts off.
alter table public.profiles
  add column low_balance_threshold integer
    constraint profiles_low_balance_threshold_range
    check (low_balance_threshold between 0 and 1000000);

comment on column public.profiles.low_balance_threshold is
  'Balance under which the live stream sends low_balance; null: the service default; 0: no alerts.';

-- A preference of the user's own, like the display name: theirs to change, through this service
-- or Supabase's REST API alike (the check above holds either way).
grant update (low_balance_threshold) on table public.profiles to authenticated;

-- The update gains the threshold: a function returning a table is dropped and created again.
drop function public.update_profile_as_user(text, boolean, text, boolean, text);

create function public.update_profile_as_user(
  claims text,
  set_display_name boolean,
  new_display_name text,
  set_avatar_url boolean,
  new_avatar_url text,
  set_low_balance_threshold boolean,
  new_low_balance_threshold integer
)
returns setof public.profiles
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(update_profile_as_user.claims);
begin
  -- Column privileges allow these three columns only, whatever this statement says.
  return query
    update public.profiles p
       set display_name = case when set_display_name then new_display_name else p.display_name end,
           avatar_url = case when set_avatar_url then new_avatar_url else p.avatar_url end,
           low_balance_threshold = case when set_low_balance_threshold
                                        then new_low_balance_threshold
                                        else p.low_balance_threshold end
     where p.id = (select auth.uid())
    returning p.*;
  -- Back to the caller's role (set_config is everyone's; SET ROLE is checked against the
  -- session user, so no user-callable function is needed, and none is offered).
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

revoke all on function public.update_profile_as_user(text, boolean, text, boolean, text, boolean, integer)
  from public, anon, authenticated;
grant execute on function public.update_profile_as_user(text, boolean, text, boolean, text, boolean, integer)
  to service_role;

------------------------------------------------------------------------------------------------
-- The announcement.
------------------------------------------------------------------------------------------------

-- Channel `amethyst_live`, payload {"kind", "user_id", "seq"}: small (PostgreSQL caps a payload
-- at 8000 bytes), and a kind so that other changes (holds) can be announced the same way.
-- Sent at commit, in commit order; a rolled-back row is never announced.
create function public.announce_ledger_row() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_catalog.pg_notify(
    'amethyst_live',
    pg_catalog.json_build_object('kind', 'transaction', 'user_id', new.user_id, 'seq', new.seq)::text
  );
  return null;
end;
$$;

revoke all on function public.announce_ledger_row() from public, anon, authenticated;

create trigger credit_transactions_announce
  after insert on public.credit_transactions
  for each row execute function public.announce_ledger_row();

------------------------------------------------------------------------------------------------
-- The alert rule: the one place that says when a balance crosses its threshold.
------------------------------------------------------------------------------------------------

-- `low_balance` when the available balance falls from at or above the threshold to below it,
-- `balance_recovered` when it climbs from below to at or above it; nothing otherwise, and
-- nothing with a threshold of 0. Each ledger row crosses at most once, so an alert is sent once
-- per crossing, and a replay sends the same alerts after the same rows.
create function public.balance_alert(available_before integer, available_after integer, threshold integer)
returns text
language sql immutable
set search_path = ''
as $$
  select case
    when threshold <= 0 then null
    when available_before >= threshold and available_after < threshold then 'low_balance'
    when available_before < threshold and available_after >= threshold then 'balance_recovered'
  end
$$;

revoke all on function public.balance_alert(integer, integer, integer) from public, anon, authenticated;
grant execute on function public.balance_alert(integer, integer, integer) to service_role, authenticated;

------------------------------------------------------------------------------------------------
-- What a stream reads, as the user (RLS in force, as the other *_as_user reads).
------------------------------------------------------------------------------------------------

-- Where a stream starts. `head`: the user's newest sequence number (archived rows included; 0
-- when there is none). `replayable`: whether the rows after `last_seen` can all be sent again:
-- none of them archived, at most `max_replay` of them, and `last_seen` not past the head (an id
-- from another database). With `last_seen` null, true.
create function public.ledger_position_as_user(claims text, last_seen bigint, max_replay integer)
returns table (head bigint, replayable boolean)
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(ledger_position_as_user.claims);
  me uuid := (select auth.uid());
  newest bigint;
  archived_newest bigint;
  missed integer;
begin
  select max(t.seq) into newest from public.credit_transactions t where t.user_id = me;
  select max(a.seq) into archived_newest from public.credit_transactions_archive a where a.user_id = me;
  head := greatest(coalesce(newest, 0), coalesce(archived_newest, 0));
  if last_seen is null then
    replayable := true;
  else
    select count(*) into missed
      from (select 1 from public.credit_transactions t
             where t.user_id = me and t.seq > last_seen
             limit max_replay + 1) m;
    replayable := last_seen >= 0 and last_seen <= head and missed <= max_replay
                  and coalesce(archived_newest, 0) <= last_seen;
  end if;
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
  return next;
end;
$$;

-- The user's ledger rows after `after_seq`, oldest first, each with the available balance after
-- it, the threshold in force and the alert it causes. `default_threshold` is the service's
-- LOW_BALANCE_THRESHOLD. Available is the balance (credits) until credits can be held.
create function public.ledger_events_as_user(
  claims text,
  after_seq bigint,
  max_rows integer,
  default_threshold integer
)
returns table (
  seq bigint,
  id uuid,
  amount integer,
  balance_after integer,
  source text,
  description text,
  reference text,
  created_at timestamptz,
  available integer,
  threshold integer,
  alert text
)
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(ledger_events_as_user.claims);
  me uuid := (select auth.uid());
  limit_in_force integer;
begin
  select coalesce(p.low_balance_threshold, default_threshold) into limit_in_force
    from public.profiles p where p.id = me;
  return query
    select t.seq, t.id, t.amount, t.balance_after, t.source, t.description, t.reference,
           t.created_at, t.balance_after, limit_in_force,
           public.balance_alert(t.balance_after - t.amount, t.balance_after, limit_in_force)
      from public.credit_transactions t
     where t.user_id = me and t.seq > after_seq
     order by t.seq
     limit max_rows;
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

revoke all on function public.ledger_position_as_user(text, bigint, integer) from public, anon, authenticated;
revoke all on function public.ledger_events_as_user(text, bigint, integer, integer) from public, anon, authenticated;
grant execute on function public.ledger_position_as_user(text, bigint, integer) to service_role;
grant execute on function public.ledger_events_as_user(text, bigint, integer, integer) to service_role;
