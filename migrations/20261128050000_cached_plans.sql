-- The small functions every request calls, rewritten so PostgreSQL plans them once per
-- connection instead of once per call.
--
-- A `language sql` function with a `set search_path` (which every function here has, so that
-- nobody's search_path can redirect it) is never inlined into the query that calls it, and
-- PostgreSQL 15 keeps no plan for it between statements: every statement that calls it parses
-- and plans its body again. `public.clock_now()`, called by every balance rule, cost about 60 µs
-- of the database's time per call that way; `public.ad_allowance`, in every profile read, about
-- 130 µs. PL/pgSQL keeps its statements' plans for the life of the connection, so the same
-- bodies in PL/pgSQL cost a few µs. What each function answers is unchanged.

create or replace function public.clock_now() returns timestamptz
language plpgsql stable security definer set search_path = '' as $$
begin
  return pg_catalog.now() + coalesce((select c.offset_by from public.clock_settings c), interval '0');
end;
$$;

create or replace function public.is_admin() returns boolean
language plpgsql stable security definer set search_path = '' as $$
begin
  return coalesce((select p.is_admin from public.profiles p where p.id = auth.uid()), false);
end;
$$;

create or replace function public.ad_allowance(views_date date, views_count integer)
returns table (views_today integer, daily_limit integer, views_remaining integer,
               resets_at timestamptz, retry_after_seconds integer)
language plpgsql stable rows 1 set search_path = '' as $$
declare
  today date := (pg_catalog.now() at time zone 'utc')::date;
begin
  views_today := case when ad_allowance.views_date = today
                      then coalesce(ad_allowance.views_count, 0) else 0 end;
  daily_limit := public.ad_daily_limit();
  views_remaining := greatest(daily_limit - views_today, 0);
  resets_at := (today + 1)::timestamp at time zone 'utc';
  retry_after_seconds :=
    greatest(1, pg_catalog.ceil(extract(epoch from (resets_at - pg_catalog.now()))))::integer;
  return next;
end;
$$;

create or replace function public.ad_session_status(status text, expires_at timestamptz) returns text
language plpgsql stable parallel safe set search_path = '' as $$
begin
  if ad_session_status.status in ('open', 'verified', 'pending_verification')
     and ad_session_status.expires_at <= pg_catalog.now() then
    return 'expired';
  end if;
  return ad_session_status.status;
end;
$$;

create or replace function public.balance_alert(available_before integer, available_after integer,
                                                threshold integer) returns text
language plpgsql immutable set search_path = '' as $$
begin
  return case
    when threshold <= 0 then null
    when available_before >= threshold and available_after < threshold then 'low_balance'
    when available_before < threshold and available_after >= threshold then 'balance_recovered'
  end;
end;
$$;

-- The balance read: one question (is anything due?) where there were two.
create or replace function public.credit_balance(user_id uuid)
returns table (credits integer, available integer, held integer, paid integer,
               promotional integer, expiring jsonb)
language plpgsql security definer rows 1 set search_path = '' as $$
declare
  at timestamptz := public.clock_now();
  total integer;
  on_hold integer;
begin
  if exists (select 1 from public.credit_lots l
              where l.user_id = credit_balance.user_id and l.remaining > 0 and l.expires_at <= at
             union all
             select 1 from public.credit_holds h
              where h.user_id = credit_balance.user_id and h.status = 'active' and h.expires_at <= at) then
    select l.credits, l.held into total, on_hold from public.lots_lock(credit_balance.user_id, at) l;
    perform public.lots_settle(credit_balance.user_id, at, total, on_hold);
  end if;

  return query
    with held_now as (
      select coalesce(sum(h.amount), 0)::integer as n
        from public.credit_holds h
       where h.user_id = credit_balance.user_id and h.status = 'active' and h.expires_at > at
    ),
    parts as (
      select coalesce(sum(l.remaining) filter (where l.source in ('stripe', 'subscription', 'opening')), 0)::integer as paid,
             coalesce(sum(l.remaining) filter (where l.source not in ('stripe', 'subscription', 'opening')), 0)::integer as promotional
        from public.credit_lots l
       where l.user_id = credit_balance.user_id and l.remaining > 0
    ),
    soon as (
      select coalesce(jsonb_agg(jsonb_build_object('amount', e.amount, 'expires_at', e.expires_at)
                                order by e.expires_at), '[]'::jsonb) as expiring
        from (select sum(l.remaining)::integer as amount, l.expires_at
                from public.credit_lots l
               where l.user_id = credit_balance.user_id and l.remaining > 0 and l.expires_at > at
               group by l.expires_at
               order by l.expires_at
               limit 3) e
    )
    select p.credits, p.credits - h.n, h.n, parts.paid, parts.promotional, soon.expiring
      from public.profiles p, held_now h, parts, soon
     where p.id = credit_balance.user_id;
end;
$$;

-- Spends that arrive together, in one statement and one commit (the service's batches, see
-- src/batch.rs). Each is `public.spend_credits` in a subtransaction of its own: a refusal
-- (insufficient credits, an unknown user) undoes that spend alone and is reported by its
-- SQLSTATE in `failure`; the others stand. They run in the order of their users' ids, the
-- order in which every batch takes its users' locks, so two batches never wait on each other
-- in a cycle. `item` is the spend's place in the arrays (from 1).
create function public.spend_credits_together(user_ids uuid[], amounts integer[],
                                              descriptions text[], refs text[])
returns table (item integer, id uuid, amount integer, balance_after integer, source text,
               description text, reference text, created_at timestamptz, seq bigint,
               failure text)
language plpgsql security definer set search_path = '' as $$
declare
  i integer;
  entry public.credit_transactions;
begin
  if pg_catalog.cardinality(user_ids) <> pg_catalog.cardinality(amounts)
     or pg_catalog.cardinality(user_ids) <> pg_catalog.cardinality(descriptions)
     or pg_catalog.cardinality(user_ids) <> pg_catalog.cardinality(refs) then
    raise exception 'one user, amount, description and reference per spend' using errcode = '22023';
  end if;
  for i in
    select u.n from unnest(user_ids) with ordinality as u(user_id, n) order by u.user_id, u.n
  loop
    item := i;
    failure := null;
    begin
      entry := public.spend_credits(user_ids[i], amounts[i], descriptions[i], refs[i]);
    exception when others then
      entry := null;
      failure := sqlstate;
    end;
    id := entry.id;
    amount := entry.amount;
    balance_after := entry.balance_after;
    source := entry.source;
    description := entry.description;
    reference := entry.reference;
    created_at := entry.created_at;
    seq := entry.seq;
    return next;
  end loop;
end;
$$;

revoke all on function public.spend_credits_together(uuid[], integer[], text[], text[]) from public, anon, authenticated;
grant execute on function public.spend_credits_together(uuid[], integer[], text[], text[]) to service_role;

-- The daily sweep takes its users' locks in the same order as the batches.
create or replace function public.expire_due_credits(out users integer, out credits bigint)
language plpgsql security definer set search_path = '' as $$
declare
  at timestamptz := public.clock_now();
  who uuid;
  had integer;
  held integer;
  has integer;
begin
  users := 0;
  credits := 0;
  for who in
    select l.user_id from public.credit_lots l where l.remaining > 0 and l.expires_at <= at
    union
    select h.user_id from public.credit_holds h where h.status = 'active' and h.expires_at <= at
    order by 1
  loop
    select l.credits, l.held into had, held from public.lots_lock(who, at) l;
    has := public.lots_settle(who, at, had, held);
    if has < had then
      users := users + 1;
      credits := credits + (had - has);
    end if;
  end loop;
end;
$$;
