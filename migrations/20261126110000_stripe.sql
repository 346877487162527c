-- Stripe: the events received, the credits granted per Stripe object, and what Stripe has
-- told us about charges (refunds, disputes). Grants and take-backs happen in the transaction
-- that records the event, through the functions below.

-- Subscription events can arrive out of order; only a newer event changes the profile.
alter table public.profiles add column stripe_subscription_event_at timestamptz;

create table public.stripe_events (
  id text primary key check (char_length(id) between 1 and 255),
  type text not null check (char_length(type) between 1 and 255),
  api_version text,
  livemode boolean not null default false,
  stripe_created_at timestamptz,
  -- processed: handled; ignored: a type this service does not act on; failed: the handler
  -- failed and Stripe will retry; rejected: permanently malformed, kept for the report.
  status text not null check (status in ('processing', 'processed', 'ignored', 'failed', 'rejected')),
  error text,
  attempts integer not null default 1,
  payload jsonb not null,
  received_at timestamptz not null default now(),
  processed_at timestamptz
);

create index stripe_events_unsettled_idx on public.stripe_events (received_at)
  where status in ('processing', 'failed', 'rejected');

-- One row per Stripe object that granted credits: the unique key is what makes a grant
-- exactly-once, whichever event (completed, async_payment_succeeded, a redelivery) comes first.
create table public.stripe_grants (
  id uuid primary key default gen_random_uuid(),
  kind text not null check (kind in ('checkout_session', 'invoice')),
  stripe_object_id text not null check (char_length(stripe_object_id) between 1 and 255),
  user_id uuid not null references public.profiles (id) on delete cascade,
  pack_id uuid references public.credit_packs (id) on delete set null,
  credits integer not null check (credits > 0),
  amount integer not null check (amount >= 0),
  currency text,
  payment_intent text,
  charge text,
  -- Credits taken back so far because of refunds and disputes, and the part of that which the
  -- balance could not cover (it is never taken below zero).
  credits_revoked integer not null default 0 check (credits_revoked between 0 and credits),
  shortfall integer not null default 0 check (shortfall >= 0),
  -- The ledger row this links to. No foreign key: ledger rows move to the archive (monthly
  -- maintenance), and the link must survive that untouched.
  transaction_id uuid,
  event_id text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint stripe_grants_object_key unique (kind, stripe_object_id)
);

create index stripe_grants_user_idx on public.stripe_grants (user_id);
create index stripe_grants_payment_intent_idx on public.stripe_grants (payment_intent) where payment_intent is not null;
create index stripe_grants_charge_idx on public.stripe_grants (charge) where charge is not null;
create index stripe_grants_pack_idx on public.stripe_grants (pack_id);

create trigger stripe_grants_touch_updated_at before update on public.stripe_grants
  for each row execute function public.touch_updated_at();

-- What Stripe reported about each charge. Refund and dispute amounts only grow: a late,
-- older event never lowers them.
create table public.stripe_charges (
  id text primary key check (char_length(id) between 1 and 255),
  payment_intent text,
  amount integer not null check (amount >= 0),
  amount_refunded integer not null default 0 check (amount_refunded >= 0),
  amount_disputed integer not null default 0 check (amount_disputed >= 0),
  updated_at timestamptz not null default now()
);

create index stripe_charges_payment_intent_idx on public.stripe_charges (payment_intent) where payment_intent is not null;

-- Takes back the share of a grant that its charges' refunds and disputes cover, down to a zero
-- balance at most; what the balance could not cover is recorded as the grant's shortfall.
-- Answers the credits taken from the balance.
create function public.stripe_settle_grant(grant_id uuid) returns integer
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
  taken integer;
begin
  select * into g from public.stripe_grants sg where sg.id = stripe_settle_grant.grant_id for update;
  if not found then
    return 0;
  end if;

  select coalesce(sum(c.amount), 0), coalesce(sum(least(c.amount, c.amount_refunded + c.amount_disputed)), 0)
    into paid, returned
    from public.stripe_charges c
   where (g.charge is not null and c.id = g.charge)
      or (g.payment_intent is not null and c.payment_intent = g.payment_intent);
  if paid = 0 then
    return 0;
  end if;

  target := least(g.credits, floor(g.credits::numeric * returned / paid))::integer;
  owed := target - g.credits_revoked;
  if owed <= 0 then
    return 0;
  end if;

  -- FOR NO KEY UPDATE, as add_credits' UPDATE takes: it does not conflict with the key-share
  -- locks that inserts referencing the profile take (the archival's, for one).
  select p.credits into available from public.profiles p where p.id = g.user_id for no key update;
  taken := least(owed, coalesce(available, 0));
  if taken > 0 then
    perform public.add_credits(g.user_id, -taken, 'refund',
                               'Stripe refund or dispute', coalesce(g.charge, g.payment_intent, g.stripe_object_id));
  end if;

  update public.stripe_grants sg
     set credits_revoked = target, shortfall = sg.shortfall + (owed - taken)
   where sg.id = g.id;
  return taken;
end;
$$;

-- Serializes everything done about one payment: a grant and a refund of the same payment
-- intent or charge, handled by two concurrent events, must not each miss the other's row.
create function public.stripe_lock_payment(payment_intent text, charge text) returns void
language plpgsql volatile
set search_path = ''
as $$
begin
  -- Payment intent first, then charge, in every caller: no lock-order deadlock.
  if stripe_lock_payment.payment_intent is not null then
    perform pg_catalog.pg_advisory_xact_lock(
      pg_catalog.hashtextextended('stripe payment ' || stripe_lock_payment.payment_intent, 0));
  end if;
  if stripe_lock_payment.charge is not null then
    perform pg_catalog.pg_advisory_xact_lock(
      pg_catalog.hashtextextended('stripe payment ' || stripe_lock_payment.charge, 0));
  end if;
end;
$$;

-- Grants a Stripe object's credits once. Returns the grant's id, or null when this object has
-- granted before. A refund that arrived before the grant is settled right away.
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
  event_id text
) returns uuid
language plpgsql security definer
set search_path = ''
as $$
declare
  new_grant uuid;
  entry public.credit_transactions;
begin
  if not exists (select 1 from public.profiles p where p.id = stripe_grant.user_id) then
    raise exception 'profile not found' using errcode = 'AC404';
  end if;
  perform public.stripe_lock_payment(stripe_grant.payment_intent, stripe_grant.charge);

  insert into public.stripe_grants (kind, stripe_object_id, user_id, pack_id, credits, amount, currency,
                                    payment_intent, charge, event_id)
  values (stripe_grant.kind, stripe_grant.stripe_object_id, stripe_grant.user_id, stripe_grant.pack_id,
          stripe_grant.credits, stripe_grant.amount, stripe_grant.currency, stripe_grant.payment_intent,
          stripe_grant.charge, stripe_grant.event_id)
  on conflict on constraint stripe_grants_object_key do nothing
  returning id into new_grant;

  if new_grant is null then
    return null;
  end if;

  entry := public.add_credits(stripe_grant.user_id, stripe_grant.credits, stripe_grant.source,
                              stripe_grant.description, stripe_grant.stripe_object_id);
  update public.stripe_grants sg set transaction_id = entry.id where sg.id = new_grant;
  perform public.stripe_settle_grant(new_grant);
  return new_grant;
end;
$$;

-- Records a charge's cumulative refunded and disputed amounts, then settles the grants it paid.
-- A null amount (a dispute, which does not carry its charge's amount) is taken from what is known
-- of the charge or of the purchase it paid, read under the payment's lock; failing both, the
-- whole charge is taken as disputed. Answers the credits taken back from balances.
create function public.stripe_record_charge(
  charge_id text,
  payment_intent text,
  amount integer,
  amount_refunded integer,
  amount_disputed integer
) returns integer
language plpgsql security definer
set search_path = ''
as $$
declare
  affected uuid;
  taken integer := 0;
  charge_amount integer := stripe_record_charge.amount;
begin
  perform public.stripe_lock_payment(stripe_record_charge.payment_intent, stripe_record_charge.charge_id);
  if charge_amount is null then
    charge_amount := greatest(
      coalesce(
        (select c.amount from public.stripe_charges c where c.id = stripe_record_charge.charge_id),
        (select g.amount from public.stripe_grants g
          where g.charge = stripe_record_charge.charge_id
             or (stripe_record_charge.payment_intent is not null
                 and g.payment_intent = stripe_record_charge.payment_intent)
          order by g.created_at limit 1),
        0),
      coalesce(stripe_record_charge.amount_disputed, 0),
      coalesce(stripe_record_charge.amount_refunded, 0));
  end if;

  insert into public.stripe_charges as c (id, payment_intent, amount, amount_refunded, amount_disputed)
  values (stripe_record_charge.charge_id, stripe_record_charge.payment_intent, charge_amount,
          coalesce(stripe_record_charge.amount_refunded, 0), coalesce(stripe_record_charge.amount_disputed, 0))
  on conflict (id) do update
     set payment_intent = coalesce(c.payment_intent, excluded.payment_intent),
         amount = greatest(c.amount, excluded.amount),
         amount_refunded = greatest(c.amount_refunded, excluded.amount_refunded),
         amount_disputed = greatest(c.amount_disputed, excluded.amount_disputed),
         updated_at = now();

  for affected in
    select sg.id from public.stripe_grants sg
     where sg.charge = stripe_record_charge.charge_id
        or (stripe_record_charge.payment_intent is not null
            and sg.payment_intent = stripe_record_charge.payment_intent)
     order by sg.id
  loop
    taken := taken + public.stripe_settle_grant(affected);
  end loop;
  return taken;
end;
$$;

alter table public.stripe_events enable row level security;
alter table public.stripe_grants enable row level security;
alter table public.stripe_charges enable row level security;

revoke all on table public.stripe_events, public.stripe_grants, public.stripe_charges
  from public, anon, authenticated;
grant select, insert, update, delete on table public.stripe_events, public.stripe_grants,
  public.stripe_charges to service_role;

-- A user may see the purchases that credited them; events and charges stay private.
grant select on table public.stripe_grants to authenticated;
create policy stripe_grants_select_own_or_admin on public.stripe_grants
  for select to authenticated
  using (user_id = (select auth.uid()) or (select public.is_admin()));

revoke all on function public.stripe_settle_grant(uuid) from public, anon, authenticated;
revoke all on function public.stripe_lock_payment(text, text) from public, anon, authenticated;
revoke all on function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text)
  from public, anon, authenticated;
revoke all on function public.stripe_record_charge(text, text, integer, integer, integer) from public, anon, authenticated;
grant execute on function public.stripe_settle_grant(uuid) to service_role;
grant execute on function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text)
  to service_role;
grant execute on function public.stripe_record_charge(text, text, integer, integer, integer) to service_role;
