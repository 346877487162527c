-- Ledger v2: every grant is a lot (source, amount, remaining, priority, expiry), every debit
-- draws from lots in one order and records which, and trusted callers hold credits for an image
-- generation, then capture or release them (docs/api.md, "Lots, expiry and holds").
--
-- The rules, all under the profile's row lock (FOR NO KEY UPDATE, taken first by every function
-- that changes a balance, so one user's changes are serialized and ledger order is lock order):
--
-- * profiles.credits is the total: the sum of the remaining credits of the user's lots, and the
--   sum of the ledger. Active holds never exceed it.
-- * A debit (spend, capture, negative adjustment, refund, expiry) draws from lots ordered by
--   priority (lower first), then the soonest expiry (never-expiring last), then the oldest.
--   A refund draws first on its purchase's own lot. The ledger row's `lots` records the draws.
-- * Before anything else, a lot past its expiry is expired: an `expiry` ledger row takes what it
--   has left, except what active holds still need (those credits go when the hold does). So no
--   read and no debit counts a credit past its expiry, whether or not a job ran.
-- * A hold is active until captured, released, or its expires_at passes; a lapsed hold needs no
--   job to free its credits: every sum of active holds leaves it out.
--
-- The balance-changing functions answer the same errors as before: AC402 when the available
-- balance (credits − active holds) is short, AC404 without a profile; ACH04 for an unknown hold,
-- ACH09 for a hold that is not active, AC422 (the field in the detail) for a value out of range.

-- The database's clock. Production leaves this table empty; tests and drills move time forward
-- by setting an offset, which every rule below reads through clock_now().
create table public.clock_settings (
  id boolean primary key default true check (id),
  offset_by interval not null default interval '0'
);

comment on table public.clock_settings is
  'An offset added to now() by clock_now(), for tests and drills. Empty in production.';

alter table public.clock_settings enable row level security;
revoke all on table public.clock_settings from public, anon, authenticated, service_role;

create function public.clock_now() returns timestamptz
language sql stable security definer
set search_path = ''
as $$
  select pg_catalog.now() + coalesce((select c.offset_by from public.clock_settings c), interval '0')
$$;

comment on function public.clock_now() is
  'The time the lot and hold rules go by: now(), plus the offset in clock_settings if any.';

-- How each source's lots are spent and when they expire. An admin can change both.
create table public.credit_sources (
  source text primary key
    check (source in ('opening', 'stripe', 'subscription', 'ad_view', 'admin', 'system')),
  priority integer not null check (priority between 0 and 1000),
  expires_after_days integer check (expires_after_days between 1 and 36500),
  updated_at timestamptz not null default now()
);

comment on table public.credit_sources is
  'Per source of credits: priority (lower is spent first) and days until a new lot expires (null: never). Subscription lots expire at the end of their paid period when it is known.';

insert into public.credit_sources (source, priority, expires_after_days) values
  ('ad_view', 10, 30),
  ('admin', 20, null),
  ('system', 20, null),
  ('subscription', 50, null),
  ('stripe', 100, null),
  ('opening', 100, null);

create trigger credit_sources_touch_updated_at
  before update on public.credit_sources
  for each row execute function public.touch_updated_at();

create table public.credit_lots (
  id uuid primary key default gen_random_uuid(),
  -- Creation order, the last tie-break of the spend order and the lists' cursor.
  seq bigint generated always as identity,
  user_id uuid not null references public.profiles (id) on delete cascade,
  source text not null
    check (source in ('opening', 'stripe', 'subscription', 'ad_view', 'admin', 'system')),
  amount integer not null check (amount > 0),
  remaining integer not null,
  priority integer not null,
  expires_at timestamptz,
  -- The ledger row that granted it (none for an opening lot).
  transaction_id uuid,
  created_at timestamptz not null default now(),
  constraint credit_lots_remaining_within_amount check (remaining between 0 and amount)
);

comment on table public.credit_lots is
  'Credits by where they came from. remaining sums to profiles.credits; debits draw on them in spend order.';

-- The spend order, on live lots only.
create index credit_lots_spend_order_idx on public.credit_lots (user_id, priority, expires_at, seq)
  where remaining > 0;
create index credit_lots_user_seq_idx on public.credit_lots (user_id, seq desc);
create index credit_lots_due_idx on public.credit_lots (expires_at)
  where remaining > 0 and expires_at is not null;
create index credit_lots_transaction_idx on public.credit_lots (transaction_id)
  where transaction_id is not null;

create table public.credit_holds (
  id uuid primary key default gen_random_uuid(),
  seq bigint generated always as identity,
  user_id uuid not null references public.profiles (id) on delete cascade,
  amount integer not null check (amount between 1 and 1000000),
  captured_amount integer not null default 0,
  status text not null default 'active'
    check (status in ('active', 'captured', 'released', 'expired')),
  reference text check (char_length(reference) <= 255),
  description text check (char_length(description) <= 500),
  -- The spend a capture wrote.
  transaction_id uuid,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  settled_at timestamptz,
  constraint credit_holds_captured_within_amount check (captured_amount between 0 and amount)
);

comment on table public.credit_holds is
  'Credits reserved for work under way (an image generation). Active until captured, released, or expires_at passes.';

create index credit_holds_active_idx on public.credit_holds (user_id) include (amount, expires_at)
  where status = 'active';
create index credit_holds_user_seq_idx on public.credit_holds (user_id, seq desc);

-- The ledger learns which lots each row drew on or created, and a new source: expiry.
alter table public.credit_transactions add column lots jsonb;
alter table public.credit_transactions_archive add column lots jsonb;
comment on column public.credit_transactions.lots is
  'The lots this row changed: [{"lot": id, "amount": n}], n negative for draws, positive for the lot a grant created. Null before lots existed.';

alter table public.credit_transactions drop constraint credit_transactions_source_check;
alter table public.credit_transactions add constraint credit_transactions_source_check
  check (source in ('stripe', 'subscription', 'ad_view', 'admin', 'system', 'spend', 'refund', 'expiry'));
do $$
declare
  c record;
begin
  for c in
    select con.conname from pg_catalog.pg_constraint con
     where con.conrelid = 'public.credit_transactions_archive'::regclass and con.contype = 'c'
       and pg_catalog.pg_get_constraintdef(con.oid) like '%source%'
  loop
    execute pg_catalog.format('alter table public.credit_transactions_archive drop constraint %I', c.conname);
  end loop;
end;
$$;
alter table public.credit_transactions_archive add constraint credit_transactions_archive_source_check
  check (source in ('stripe', 'subscription', 'ad_view', 'admin', 'system', 'spend', 'refund', 'expiry'));

-- Row Level Security: users read their own lots and holds; only service_role writes.
alter table public.credit_sources enable row level security;
alter table public.credit_lots enable row level security;
alter table public.credit_holds enable row level security;

revoke all on table public.credit_sources, public.credit_lots, public.credit_holds from public, anon, authenticated;
grant select, insert, update, delete on table public.credit_sources, public.credit_lots, public.credit_holds to service_role;
grant select on table public.credit_lots, public.credit_holds to authenticated;

create policy credit_lots_select_own_or_admin on public.credit_lots
  for select to authenticated
  using (user_id = (select auth.uid()) or (select public.is_admin()));
create policy credit_holds_select_own_or_admin on public.credit_holds
  for select to authenticated
  using (user_id = (select auth.uid()) or (select public.is_admin()));

-- ---------------------------------------------------------------------------------------------
-- The building blocks. Each expects the profile locked by lots_lock; none is callable from
-- outside (the public functions below are SECURITY DEFINER and call them as the owner).

-- Locks the profile; answers its credits and the sum of its active holds. AC404 without one.
create function public.lots_lock(user_id uuid, at timestamptz, out credits integer, out held integer)
language plpgsql security definer
set search_path = ''
as $$
begin
  select p.credits into lots_lock.credits
    from public.profiles p where p.id = lots_lock.user_id
     for no key update;
  if not found then
    raise exception 'profile not found' using errcode = 'AC404';
  end if;
  select coalesce(sum(h.amount), 0)::integer into lots_lock.held
    from public.credit_holds h
   where h.user_id = lots_lock.user_id and h.status = 'active' and h.expires_at > lots_lock.at;
end;
$$;

-- Draws `amount` from the user's lots and answers the draws. `mode`: 'live' draws on unexpired
-- lots; 'due' on expired ones (for an expiry); 'capture' on expired ones first (credits a hold
-- kept from expiring), then unexpired. Within that, `first_lot` first, then the spend order.
-- One statement: the running sum says how much each lot gives.
create function public.lots_draw(user_id uuid, amount integer, at timestamptz, mode text,
                                 first_lot uuid default null)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  draws jsonb;
  drawn bigint;
begin
  with candidates as (
    select l.id, l.remaining,
           (first_lot is not null and l.id = first_lot) as is_first,
           (l.expires_at is not null and l.expires_at <= at) as is_due,
           l.priority, l.expires_at, l.seq
      from public.credit_lots l
     where l.user_id = lots_draw.user_id and l.remaining > 0
       and case mode
             when 'live' then l.expires_at is null or l.expires_at > at
             when 'due' then l.expires_at <= at
             else true
           end
  ),
  ordered as (
    select c.id, c.remaining,
           sum(c.remaining) over (order by c.is_first desc, c.is_due desc, c.priority,
                                           c.expires_at nulls last, c.seq
                                  rows between unbounded preceding and current row)
             - c.remaining as before
      from candidates c
  ),
  taken as (
    select o.id, least(o.remaining, lots_draw.amount - o.before)::integer as n
      from ordered o
     where o.before < lots_draw.amount
  ),
  changed as (
    update public.credit_lots l
       set remaining = l.remaining - t.n
      from taken t
     where l.id = t.id
    returning l.id, l.seq, t.n
  )
  select coalesce(jsonb_agg(jsonb_build_object('lot', c.id, 'amount', -c.n) order by c.seq), '[]'::jsonb),
         coalesce(sum(c.n), 0)
    into draws, drawn
    from changed c;

  if drawn <> amount then
    -- The lots no longer add up to the balance: never paper over it.
    raise exception 'the lots of % hold % where % was to be drawn', user_id, drawn, amount
      using errcode = 'XX000';
  end if;
  return draws;
end;
$$;

-- Changes the balance and writes the ledger row.
create function public.ledger_write(user_id uuid, amount integer, source text, description text,
                                    reference text, lots jsonb)
returns public.credit_transactions
language plpgsql security definer
set search_path = ''
as $$
declare
  new_balance integer;
  entry public.credit_transactions;
begin
  update public.profiles p
     set credits = p.credits + ledger_write.amount
   where p.id = ledger_write.user_id
  returning p.credits into new_balance;

  insert into public.credit_transactions (user_id, amount, balance_after, source, description, reference, lots)
  values (ledger_write.user_id, ledger_write.amount, new_balance, ledger_write.source,
          ledger_write.description, ledger_write.reference, ledger_write.lots)
  returning * into entry;
  return entry;
end;
$$;

-- Expires what the user's lots have left past their expiry, except what active holds still need,
-- marks lapsed holds expired, and answers the balance after.
create function public.lots_settle(user_id uuid, at timestamptz, credits integer, held integer)
returns integer
language plpgsql security definer
set search_path = ''
as $$
declare
  due bigint;
  expiring integer;
  entry public.credit_transactions;
begin
  update public.credit_holds h
     set status = 'expired', settled_at = h.expires_at
   where h.user_id = lots_settle.user_id and h.status = 'active' and h.expires_at <= lots_settle.at;

  select coalesce(sum(l.remaining), 0) into due
    from public.credit_lots l
   where l.user_id = lots_settle.user_id and l.remaining > 0 and l.expires_at <= lots_settle.at;
  expiring := least(due, greatest(credits - held, 0))::integer;
  if expiring <= 0 then
    return credits;
  end if;

  entry := public.ledger_write(lots_settle.user_id, -expiring, 'expiry', 'Credits expired', null,
                               public.lots_draw(lots_settle.user_id, expiring, lots_settle.at, 'due'));
  return entry.balance_after;
end;
$$;

-- Creates a lot for a grant: the source's priority, and its expiry unless one is given.
create function public.lots_create(user_id uuid, amount integer, source text, expires_at timestamptz,
                                   at timestamptz)
returns uuid
language plpgsql security definer
set search_path = ''
as $$
declare
  kind public.credit_sources;
  lot uuid;
begin
  select * into kind from public.credit_sources s where s.source = lots_create.source;
  if not found then
    raise exception 'credits cannot be granted with source %', lots_create.source using errcode = '22023';
  end if;
  if lots_create.expires_at is not null and lots_create.expires_at <= at then
    raise exception 'must be in the future' using errcode = 'AC422', detail = 'expires_at';
  end if;
  insert into public.credit_lots (user_id, source, amount, remaining, priority, expires_at)
  values (lots_create.user_id, lots_create.source, lots_create.amount, lots_create.amount, kind.priority,
          coalesce(lots_create.expires_at, at + make_interval(days => kind.expires_after_days)))
  returning id into lot;
  return lot;
end;
$$;

-- ---------------------------------------------------------------------------------------------
-- Balance changes, as before, now through lots.

drop function public.add_credits(uuid, integer, text, text, text);

create function public.add_credits(
  user_id uuid,
  amount integer,
  source text,
  description text default null,
  reference text default null,
  expires_at timestamptz default null,
  first_lot uuid default null
) returns public.credit_transactions
language plpgsql security definer
set search_path = ''
as $$
declare
  at timestamptz := public.clock_now();
  credits integer;
  held integer;
  lot uuid;
  entry public.credit_transactions;
begin
  if add_credits.amount is null or add_credits.amount = 0 then
    raise exception 'amount must be a non-zero integer' using errcode = '22023';
  end if;
  select l.credits, l.held into credits, held from public.lots_lock(add_credits.user_id, at) l;
  credits := public.lots_settle(add_credits.user_id, at, credits, held);

  if add_credits.amount > 0 then
    lot := public.lots_create(add_credits.user_id, add_credits.amount, add_credits.source,
                              add_credits.expires_at, at);
    entry := public.ledger_write(add_credits.user_id, add_credits.amount, add_credits.source,
                                 add_credits.description, add_credits.reference,
                                 jsonb_build_array(jsonb_build_object('lot', lot, 'amount', add_credits.amount)));
    update public.credit_lots l set transaction_id = entry.id where l.id = lot;
    return entry;
  end if;

  if add_credits.expires_at is not null then
    raise exception 'applies to credits added, not taken' using errcode = 'AC422', detail = 'expires_at';
  end if;
  if credits - held < -add_credits.amount then
    raise exception 'insufficient credits' using errcode = 'AC402';
  end if;
  return public.ledger_write(add_credits.user_id, add_credits.amount, add_credits.source,
                             add_credits.description, add_credits.reference,
                             public.lots_draw(add_credits.user_id, -add_credits.amount, at, 'live',
                                              add_credits.first_lot));
end;
$$;

comment on function public.add_credits(uuid, integer, text, text, text, timestamptz, uuid) is
  'Changes a balance by amount and records it in the ledger. A positive amount creates a lot (expiring at expires_at, else as its source says); a negative one draws on the available credits (AC402 when short), first_lot first.';

-- spend_credits keeps its signature; it calls the new add_credits.

-- The ad view: counted and limited as before, the reward granted as a lot.
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
  at timestamptz := public.clock_now();
  today date := (now() at time zone 'utc')::date;
  reward integer;
  credits integer;
  held integer;
  new_count integer;
  new_view_id uuid := gen_random_uuid();
  entry public.credit_transactions;
begin
  if handle_ad_view.duration_seconds is null
     or handle_ad_view.duration_seconds not between 0 and 86400 then
    raise exception 'duration_seconds must be between 0 and 86400' using errcode = '22023';
  end if;

  reward := public.ad_view_reward(handle_ad_view.duration_seconds);

  select l.credits, l.held into credits, held from public.lots_lock(handle_ad_view.user_id, at) l;

  update public.profiles p
     set ad_views_today = case when p.ad_views_date = today then p.ad_views_today + 1 else 1 end,
         ad_views_date = today
   where p.id = handle_ad_view.user_id
     and (p.ad_views_date is distinct from today or p.ad_views_today < public.ad_daily_limit())
  returning p.ad_views_today into new_count;

  if not found then
    -- The detail is the wait until the ad day ends, in whole seconds (sent as Retry-After).
    raise exception 'daily ad view limit reached' using errcode = 'AC429',
      detail = (select a.retry_after_seconds from public.ad_allowance(today, 0) a)::text;
  end if;

  if reward > 0 then
    entry := public.add_credits(handle_ad_view.user_id, reward, 'ad_view', 'Rewarded ad view',
                                new_view_id::text);
    credits := entry.balance_after;
  else
    credits := public.lots_settle(handle_ad_view.user_id, at, credits, held);
  end if;

  insert into public.ad_views (id, user_id, viewed_on, duration_seconds, credits_awarded,
                               ad_unit_id, provider, transaction_id)
  values (new_view_id, handle_ad_view.user_id, today, handle_ad_view.duration_seconds, reward,
          handle_ad_view.ad_unit_id, handle_ad_view.provider, entry.id);

  return query select new_view_id, reward, credits, new_count, entry.id;
end;
$$;

-- Refunds and disputes take back from the purchase's own lot first, and never credits under an
-- active hold (what they cannot take is the grant's shortfall, as when the balance is short).
create or replace function public.stripe_settle_grant(grant_id uuid) returns integer
language plpgsql security definer
set search_path = ''
as $$
declare
  g public.stripe_grants;
  paid bigint;
  returned bigint;
  target integer;
  owed integer;
  available integer;
  held integer;
  at timestamptz := public.clock_now();
  taken integer;
  forgiven integer;
  given integer;
begin
  select * into g from public.stripe_grants sg where sg.id = stripe_settle_grant.grant_id for update;
  if not found then
    return 0;
  end if;

  select coalesce(sum(c.amount), 0),
         coalesce(sum(least(c.amount,
                            c.amount_refunded + greatest(c.amount_disputed - c.amount_reinstated, 0))), 0)
    into paid, returned
    from public.stripe_charges c
   where (g.charge is not null and c.id = g.charge)
      or (g.payment_intent is not null and c.payment_intent = g.payment_intent);
  if paid = 0 then
    return 0;
  end if;

  target := least(g.credits, floor(g.credits::numeric * returned / paid))::integer;
  owed := target - g.credits_revoked;
  if owed = 0 then
    return 0;
  end if;

  if owed < 0 then
    forgiven := least(-owed, g.shortfall);
    given := -owed - forgiven;
    if given > 0 then
      -- Given back under the purchase's own source: it is the purchase's credits returning.
      perform public.add_credits(g.user_id, given,
                                 case g.kind when 'invoice' then 'subscription' else 'stripe' end,
                                 'Stripe dispute won: credits given back',
                                 coalesce(g.charge, g.payment_intent, g.stripe_object_id));
    end if;
    update public.stripe_grants sg
       set credits_revoked = target, shortfall = sg.shortfall - forgiven
     where sg.id = g.id;
    return given;
  end if;

  -- Takes what is available (credits not under an active hold), first from what remains of
  -- the purchase's own lot; the rest is the shortfall.
  select l.credits, l.held into available, held from public.lots_lock(g.user_id, at) l;
  available := public.lots_settle(g.user_id, at, available, held) - held;
  taken := least(owed, greatest(available, 0));
  if taken > 0 then
    perform public.add_credits(g.user_id, -taken, 'refund',
                               'Stripe refund or dispute', coalesce(g.charge, g.payment_intent, g.stripe_object_id),
                               first_lot => (select l.id from public.credit_lots l
                                              where l.transaction_id = g.transaction_id));
  end if;

  update public.stripe_grants sg
     set credits_revoked = target, shortfall = sg.shortfall + (owed - taken)
   where sg.id = g.id;
  return -taken;
end;
$$;

-- Grants may now carry the expiry of what they grant: a subscription's credits expire at the end
-- of the period paid for.
drop function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text, boolean);

create function public.stripe_grant(
  kind text,
  stripe_object_id text,
  user_id uuid,
  pack_id uuid,
  credits integer,
  amount integer,
  currency text,
  payment_intent text,
  charge text,
  source text,
  description text,
  event_id text,
  -- Whether the purchase cost nothing (a trial, a 100 % coupon), as the caller reads Stripe's
  -- object; null: judged from amount. A payment made from the customer's Stripe balance cost
  -- something even when amount (what was charged) is 0.
  free boolean default null,
  -- When the credits expire (a subscription's paid period end); null: as the source says.
  expires_at timestamptz default null
) returns text
language plpgsql security definer
set search_path = ''
as $$
declare
  new_grant uuid;
  paid_by text := stripe_grant.charge;
  entry public.credit_transactions;
begin
  if not exists (select 1 from public.profiles p where p.id = stripe_grant.user_id) then
    raise exception 'profile not found' using errcode = 'AC404';
  end if;
  if coalesce(stripe_grant.free, stripe_grant.amount = 0)
     and not coalesce((select p.grants_when_free from public.credit_packs p
                        where p.id = stripe_grant.pack_id), false) then
    return 'free_not_granted';
  end if;
  perform public.stripe_lock_payment(stripe_grant.payment_intent, stripe_grant.charge);

  if paid_by is null and stripe_grant.payment_intent is not null then
    select c.id into paid_by from public.stripe_charges c
     where c.payment_intent = stripe_grant.payment_intent
     order by c.id limit 1;
  end if;

  insert into public.stripe_grants (kind, stripe_object_id, user_id, pack_id, credits, amount, currency,
                                    payment_intent, charge, event_id)
  values (stripe_grant.kind, stripe_grant.stripe_object_id, stripe_grant.user_id, stripe_grant.pack_id,
          stripe_grant.credits, coalesce(stripe_grant.amount, 0), stripe_grant.currency,
          stripe_grant.payment_intent, paid_by, stripe_grant.event_id)
  on conflict on constraint stripe_grants_object_key do nothing
  returning id into new_grant;

  if new_grant is null then
    return 'already_granted';
  end if;

  entry := public.add_credits(stripe_grant.user_id, stripe_grant.credits, stripe_grant.source,
                              stripe_grant.description, stripe_grant.stripe_object_id,
                              -- A period already over (an invoice processed late) cannot expire
                              -- the credits it paid for at once: then the source's rule applies.
                              case when stripe_grant.expires_at > public.clock_now()
                                   then stripe_grant.expires_at end);
  update public.stripe_grants sg set transaction_id = entry.id where sg.id = new_grant;
  perform public.stripe_settle_grant(new_grant);
  return 'granted';
end;
$$;

revoke all on function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text, boolean, timestamptz)
  from public, anon, authenticated;
grant execute on function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text, boolean, timestamptz)
  to service_role;

-- ---------------------------------------------------------------------------------------------
-- Holds.

-- A hold as callers see it: an active hold whose time has passed is expired, settled when it lapsed.
create function public.hold_seen(h public.credit_holds, at timestamptz) returns public.credit_holds
language sql stable
set search_path = ''
as $$
  select h.id, h.seq, h.user_id, h.amount, h.captured_amount,
         case when h.status = 'active' and h.expires_at <= at then 'expired' else h.status end,
         h.reference, h.description, h.transaction_id, h.created_at, h.expires_at,
         case when h.status = 'active' and h.expires_at <= at then h.expires_at else h.settled_at end
$$;

-- Reserves credits for a user: AC402 when the available balance is short, AC404 without a profile.
create function public.reserve_credits(
  user_id uuid,
  amount integer,
  ttl_seconds integer default 600,
  reference text default null,
  description text default null
) returns public.credit_holds
language plpgsql security definer
set search_path = ''
as $$
declare
  at timestamptz := public.clock_now();
  credits integer;
  held integer;
  hold public.credit_holds;
begin
  if reserve_credits.amount is null or reserve_credits.amount not between 1 and 1000000 then
    raise exception 'amount must be between 1 and 1000000' using errcode = '22023';
  end if;
  if reserve_credits.ttl_seconds is null or reserve_credits.ttl_seconds not between 1 and 86400 then
    raise exception 'ttl_seconds must be between 1 and 86400' using errcode = '22023';
  end if;
  select l.credits, l.held into credits, held from public.lots_lock(reserve_credits.user_id, at) l;
  credits := public.lots_settle(reserve_credits.user_id, at, credits, held);
  if credits - held < reserve_credits.amount then
    raise exception 'insufficient credits' using errcode = 'AC402';
  end if;
  insert into public.credit_holds (user_id, amount, reference, description, created_at, expires_at)
  values (reserve_credits.user_id, reserve_credits.amount, reserve_credits.reference,
          reserve_credits.description, at, at + make_interval(secs => reserve_credits.ttl_seconds))
  returning * into hold;
  return hold;
end;
$$;

-- Locks a hold and its user's profile (in that order of discovery, the profile's lock first, as
-- every balance change takes it); AC404 for an unknown hold, AC409 when it is not active.
create function public.hold_lock(hold_id uuid, at timestamptz, out hold public.credit_holds,
                                 out credits integer, out held integer)
language plpgsql security definer
set search_path = ''
as $$
declare
  owner uuid;
begin
  select h.user_id into owner from public.credit_holds h where h.id = hold_lock.hold_id;
  if not found then
    raise exception 'hold not found' using errcode = 'ACH04';
  end if;
  select l.credits, l.held into hold_lock.credits, hold_lock.held from public.lots_lock(owner, at) l;
  -- Settles first: credits the hold keeps from expiring stay while it is active.
  hold_lock.credits := public.lots_settle(owner, at, hold_lock.credits, hold_lock.held);
  select * into hold_lock.hold from public.credit_holds h where h.id = hold_lock.hold_id for update;
  if hold_lock.hold.status <> 'active' then
    raise exception 'hold % is %', hold_id, hold_lock.hold.status using errcode = 'ACH09';
  end if;
end;
$$;

-- Captures a hold: spends at most its amount (all by default) in one `spend` ledger row carrying
-- the hold's reference, and frees the rest. Answers the hold, the ledger row and the balance.
create function public.capture_hold(hold_id uuid, amount integer default null,
                                    description text default null)
returns table (
  h_id uuid, h_user_id uuid, h_amount integer, h_captured_amount integer, h_status text,
  h_reference text, h_description text, h_created_at timestamptz, h_expires_at timestamptz,
  h_settled_at timestamptz, t_id uuid, t_amount integer, t_balance_after integer, t_source text,
  t_description text, t_reference text, t_created_at timestamptz, t_seq bigint, balance integer
)
language plpgsql security definer
set search_path = ''
as $$
declare
  at timestamptz := public.clock_now();
  locked record;
  hold public.credit_holds;
  taking integer;
  entry public.credit_transactions;
  credits integer;
begin
  select * into locked from public.hold_lock(capture_hold.hold_id, at);
  hold := locked.hold;
  taking := coalesce(capture_hold.amount, hold.amount);
  if taking not between 1 and hold.amount then
    raise exception 'must be a whole number from 1 to the hold''s amount, %', hold.amount
      using errcode = 'AC422', detail = 'amount';
  end if;

  update public.credit_holds h
     set status = 'captured', captured_amount = taking, settled_at = at
   where h.id = hold.id;
  -- Credits the hold kept from expiring are spent first; then the spend order.
  entry := public.ledger_write(hold.user_id, -taking, 'spend',
                               coalesce(capture_hold.description, hold.description), hold.reference,
                               public.lots_draw(hold.user_id, taking, at, 'capture'));
  update public.credit_holds h set transaction_id = entry.id where h.id = hold.id
  returning * into hold;
  -- What the hold no longer keeps may expire now.
  select l.held into locked.held from public.lots_lock(hold.user_id, at) l;
  credits := public.lots_settle(hold.user_id, at, entry.balance_after, locked.held);

  return query select hold.id, hold.user_id, hold.amount, hold.captured_amount, hold.status,
                      hold.reference, hold.description, hold.created_at, hold.expires_at,
                      hold.settled_at, entry.id, entry.amount, entry.balance_after, entry.source,
                      entry.description, entry.reference, entry.created_at, entry.seq, credits;
end;
$$;

-- Releases a hold: its credits are available again. Answers the hold and the balance.
create function public.release_hold(hold_id uuid)
returns table (
  h_id uuid, h_user_id uuid, h_amount integer, h_captured_amount integer, h_status text,
  h_reference text, h_description text, h_created_at timestamptz, h_expires_at timestamptz,
  h_settled_at timestamptz, balance integer
)
language plpgsql security definer
set search_path = ''
as $$
declare
  at timestamptz := public.clock_now();
  locked record;
  hold public.credit_holds;
  credits integer;
begin
  select * into locked from public.hold_lock(release_hold.hold_id, at);
  update public.credit_holds h
     set status = 'released', settled_at = at
   where h.id = release_hold.hold_id
  returning * into hold;
  select l.held into locked.held from public.lots_lock(hold.user_id, at) l;
  credits := public.lots_settle(hold.user_id, at, locked.credits, locked.held);
  return query select hold.id, hold.user_id, hold.amount, hold.captured_amount, hold.status,
                      hold.reference, hold.description, hold.created_at, hold.expires_at,
                      hold.settled_at, credits;
end;
$$;

-- ---------------------------------------------------------------------------------------------
-- Reads.

-- The user's balance in parts, after expiring what is due (so no read counts an expired
-- credit): credits (the total), available (credits − active holds), held, paid (lots bought:
-- stripe, subscription, opening), promotional (the others), and the next three expiries.
create function public.credit_balance(user_id uuid)
returns table (credits integer, available integer, held integer, paid integer, promotional integer,
               expiring jsonb)
language plpgsql security definer
set search_path = ''
as $$
declare
  at timestamptz := public.clock_now();
  total integer;
  on_hold integer;
begin
  if exists (select 1 from public.credit_lots l
              where l.user_id = credit_balance.user_id and l.remaining > 0 and l.expires_at <= at)
     or exists (select 1 from public.credit_holds h
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

-- The user's lots (live ones unless all), newest first, as the user under RLS.
create function public.lots_as_user(claims text, include_all boolean, before_seq bigint, max_rows integer)
returns setof public.credit_lots
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(lots_as_user.claims);
  at timestamptz := public.clock_now();
begin
  return query
    select l.* from public.credit_lots l
     where l.user_id = (select auth.uid())
       and (include_all or (l.remaining > 0 and (l.expires_at is null or l.expires_at > at)))
       and (before_seq is null or l.seq < before_seq)
     order by l.seq desc
     limit max_rows;
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

-- The user's holds (active ones only if asked), newest first, as the user under RLS.
create function public.holds_as_user(claims text, only_active boolean, before_seq bigint, max_rows integer)
returns setof public.credit_holds
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(holds_as_user.claims);
  at timestamptz := public.clock_now();
begin
  return query
    select (public.hold_seen(h, at)).* from public.credit_holds h
     where h.user_id = (select auth.uid())
       and (not only_active or (h.status = 'active' and h.expires_at > at))
       and (before_seq is null or h.seq < before_seq)
     order by h.seq desc
     limit max_rows;
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

-- ---------------------------------------------------------------------------------------------
-- Expiry for everyone (the daily maintenance), and the invariant.

-- Expires what is due for every user with an expired lot or a lapsed hold, one user at a time
-- under that user's lock. Answers how many users and credits.
create function public.expire_due_credits(out users integer, out credits bigint)
language plpgsql security definer
set search_path = ''
as $$
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
    select distinct l.user_id from public.credit_lots l where l.remaining > 0 and l.expires_at <= at
    union
    select distinct h.user_id from public.credit_holds h where h.status = 'active' and h.expires_at <= at
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

comment on function public.expire_due_credits() is
  'Writes the expiry of every lot past its expires_at (except what active holds keep) and marks lapsed holds expired. The daily maintenance runs it; every balance change and read does the same for its user.';

-- The ledger check gains the lots and holds: for every user, ledger sum = credits = newest
-- balance_after = the remaining credits of the lots, active holds ≤ credits, and every lot's
-- remaining is its amount less what the ledger says was drawn from it.
drop function public.ledger_discrepancies();

create function public.ledger_discrepancies()
returns table (user_id uuid, credits integer, ledger_total bigint, newest_balance_after integer,
               lots_remaining bigint, held bigint, lots_off_ledger bigint)
language sql stable
set search_path = ''
as $$
  with entries as (
    select t.user_id, t.amount, t.balance_after, t.seq, t.lots from public.credit_transactions t
    union all
    select a.user_id, a.amount, a.balance_after, a.seq, a.lots from public.credit_transactions_archive a
  ),
  totals as (
    select e.user_id, sum(e.amount)::bigint as total from entries e group by e.user_id
  ),
  newest as (
    select distinct on (e.user_id) e.user_id, e.balance_after from entries e order by e.user_id, e.seq desc
  ),
  draws as (
    select (d ->> 'lot')::uuid as lot, sum((d ->> 'amount')::bigint) as drawn
      from entries e, pg_catalog.jsonb_array_elements(e.lots) d
     where e.amount < 0 and e.lots is not null
     group by 1
  ),
  lots as (
    select l.user_id, sum(l.remaining)::bigint as remaining,
           count(*) filter (where l.remaining <> l.amount + coalesce(d.drawn, 0)) as off_ledger
      from public.credit_lots l
      left join draws d on d.lot = l.id
     group by l.user_id
  ),
  holds as (
    select h.user_id, sum(h.amount)::bigint as held
      from public.credit_holds h
     where h.status = 'active' and h.expires_at > public.clock_now()
     group by h.user_id
  )
  select p.id, p.credits, coalesce(t.total, 0), n.balance_after, coalesce(l.remaining, 0),
         coalesce(h.held, 0), coalesce(l.off_ledger, 0)
    from public.profiles p
    left join totals t on t.user_id = p.id
    left join newest n on n.user_id = p.id
    left join lots l on l.user_id = p.id
    left join holds h on h.user_id = p.id
   where p.credits <> coalesce(t.total, 0)
      or p.credits <> coalesce(n.balance_after, 0)
      or p.credits <> coalesce(l.remaining, 0)
      or p.credits < coalesce(h.held, 0)
      or coalesce(l.off_ledger, 0) > 0
$$;

comment on function public.ledger_discrepancies() is
  'Users whose balance disagrees with their ledger, their lots, or their active holds. Empty when all is well.';

-- The archive keeps which lots each row drew on.
create or replace function public.maintenance_archive_batch(run_id bigint, batch_size integer default null)
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
    returning t.id, t.seq, t.user_id, t.amount, t.balance_after, t.source, t.description, t.reference, t.created_at, t.lots
  )
  insert into public.credit_transactions_archive
    (id, seq, user_id, amount, balance_after, source, description, reference, created_at, lots)
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

-- The daily run expires what is due (recorded as its `expiry` step), then checks as before.
create or replace function public.maintenance_finish(run_id bigint) returns public.maintenance_runs
language plpgsql volatile
set search_path = ''
as $$
declare
  started public.maintenance_runs := public.maintenance_running(run_id);
  recorded jsonb := '{}'::jsonb;
  steps_outcome text := 'ok';
  step text;
  run public.maintenance_runs;
  expired record;
begin
  -- The daily run writes the expiry of every lot past its time before checking the ledger.
  if started.task = 'daily' then
    select * into expired from public.expire_due_credits();
    perform public.maintenance_record_step(run_id, 'expiry', 'ok',
      pg_catalog.jsonb_build_object('users', expired.users, 'credits', expired.credits));
    started := public.maintenance_running(run_id);
  end if;

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

-- ---------------------------------------------------------------------------------------------
-- Balances that predate lots: one lot per user, source `opening`, never expiring. Writers wait
-- for this migration (SHARE mode lets reads through) so no balance changes between its read and
-- the new functions taking over at commit; no balance changes.
lock table public.profiles in share mode;

insert into public.credit_lots (user_id, source, amount, remaining, priority, expires_at, created_at)
select p.id, 'opening', p.credits, p.credits,
       (select s.priority from public.credit_sources s where s.source = 'opening'), null, now()
  from public.profiles p
 where p.credits > 0;

-- ---------------------------------------------------------------------------------------------
-- Privileges: the building blocks are no one's to call; the rest is service_role's.
revoke all on function public.clock_now() from public, anon, authenticated;
revoke all on function public.lots_lock(uuid, timestamptz) from public, anon, authenticated, service_role;
revoke all on function public.lots_draw(uuid, integer, timestamptz, text, uuid) from public, anon, authenticated, service_role;
revoke all on function public.ledger_write(uuid, integer, text, text, text, jsonb) from public, anon, authenticated, service_role;
revoke all on function public.lots_settle(uuid, timestamptz, integer, integer) from public, anon, authenticated, service_role;
revoke all on function public.lots_create(uuid, integer, text, timestamptz, timestamptz) from public, anon, authenticated, service_role;
revoke all on function public.hold_lock(uuid, timestamptz) from public, anon, authenticated, service_role;
revoke all on function public.add_credits(uuid, integer, text, text, text, timestamptz, uuid) from public, anon, authenticated;
revoke all on function public.handle_ad_view(uuid, integer, text, text) from public, anon, authenticated;
revoke all on function public.hold_seen(public.credit_holds, timestamptz) from public, anon;
revoke all on function public.reserve_credits(uuid, integer, integer, text, text) from public, anon, authenticated;
revoke all on function public.capture_hold(uuid, integer, text) from public, anon, authenticated;
revoke all on function public.release_hold(uuid) from public, anon, authenticated;
revoke all on function public.credit_balance(uuid) from public, anon, authenticated;
revoke all on function public.lots_as_user(text, boolean, bigint, integer) from public, anon, authenticated;
revoke all on function public.holds_as_user(text, boolean, bigint, integer) from public, anon, authenticated;
revoke all on function public.expire_due_credits() from public, anon, authenticated;
revoke all on function public.ledger_discrepancies() from public, anon, authenticated;

grant execute on function public.clock_now() to service_role, authenticated;
grant execute on function public.add_credits(uuid, integer, text, text, text, timestamptz, uuid) to service_role;
grant execute on function public.handle_ad_view(uuid, integer, text, text) to service_role;
grant execute on function public.hold_seen(public.credit_holds, timestamptz) to service_role, authenticated;
grant execute on function public.reserve_credits(uuid, integer, integer, text, text) to service_role;
grant execute on function public.capture_hold(uuid, integer, text) to service_role;
grant execute on function public.release_hold(uuid) to service_role;
grant execute on function public.credit_balance(uuid) to service_role;
grant execute on function public.lots_as_user(text, boolean, bigint, integer) to service_role;
grant execute on function public.holds_as_user(text, boolean, bigint, integer) to service_role;
grant execute on function public.expire_due_credits() to service_role;
grant execute on function public.ledger_discrepancies() to service_role;
