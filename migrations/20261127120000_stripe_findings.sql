-- Stripe, after review: payments of 0 grant only when their pack says so, a dispute the
-- merchant wins gives back what it took, and grants know the charge that paid them so that a
-- refund or dispute naming only the charge finds them.

-- A trial invoice or a 100 % coupon pays 0. Whether that still grants the pack's credits is
-- the pack's choice; by default it does not, so a coupon cannot mint credits by accident.
alter table public.credit_packs add column grants_when_free boolean not null default false;

-- The disputed amount given back to the merchant by a dispute the merchant won: that money did
-- not go back to the buyer after all. Like the other amounts, it only grows.
alter table public.stripe_charges
  add column amount_reinstated integer not null default 0 check (amount_reinstated >= 0);

-- Brings a grant to the share of its payment that went back to the buyer: refunds, plus
-- disputes not won. When that share grows, credits are taken back down to a zero balance at
-- most, and what the balance could not cover is recorded as the grant's shortfall. When it
-- shrinks (a won dispute), the shortfall (never taken) is forgiven first and the rest given
-- back. Answers the change to the balance: negative when credits were taken, positive when
-- given back.
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
  return -taken;
end;
$$;

-- The outcome now says why nothing was granted, so the return type changes.
drop function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text);

-- Grants a Stripe object's credits once. Answers 'granted'; 'already_granted' when this object
-- has granted before; 'free_not_granted' when it paid 0 and its pack does not grant when free
-- (an unknown amount, null, is not a payment of 0). The grant records the charge that paid it:
-- the one given, else one Stripe already reported for the payment intent. A refund that arrived
-- before the grant is settled right away.
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
  free boolean default null
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
                              stripe_grant.description, stripe_grant.stripe_object_id);
  update public.stripe_grants sg set transaction_id = entry.id where sg.id = new_grant;
  perform public.stripe_settle_grant(new_grant);
  return 'granted';
end;
$$;

-- A new argument (the reinstated amount) and a new meaning for the answer (signed).
drop function public.stripe_record_charge(text, text, integer, integer, integer);

-- Records a charge's cumulative refunded, disputed and reinstated amounts, records the charge
-- on the grants its payment intent paid, then settles those grants. A null amount (a dispute,
-- which does not carry its charge's amount) is taken from what is known of the charge or of
-- the purchase it paid, read under the payment's lock; failing both, the whole charge is taken
-- as disputed. Answers the change to balances: negative for credits taken back, positive for
-- credits given back.
create function public.stripe_record_charge(
  charge_id text,
  payment_intent text,
  amount integer,
  amount_refunded integer,
  amount_disputed integer,
  amount_reinstated integer
) returns integer
language plpgsql security definer
set search_path = ''
as $$
declare
  affected uuid;
  balance_change integer := 0;
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

  insert into public.stripe_charges as c
    (id, payment_intent, amount, amount_refunded, amount_disputed, amount_reinstated)
  values (stripe_record_charge.charge_id, stripe_record_charge.payment_intent, charge_amount,
          coalesce(stripe_record_charge.amount_refunded, 0), coalesce(stripe_record_charge.amount_disputed, 0),
          coalesce(stripe_record_charge.amount_reinstated, 0))
  on conflict (id) do update
     set payment_intent = coalesce(c.payment_intent, excluded.payment_intent),
         amount = greatest(c.amount, excluded.amount),
         amount_refunded = greatest(c.amount_refunded, excluded.amount_refunded),
         amount_disputed = greatest(c.amount_disputed, excluded.amount_disputed),
         amount_reinstated = greatest(c.amount_reinstated, excluded.amount_reinstated),
         updated_at = now();

  -- A grant known by its payment intent learns its charge here, so that a later event naming
  -- only the charge (a dispute, often) finds it.
  if stripe_record_charge.payment_intent is not null then
    update public.stripe_grants sg set charge = stripe_record_charge.charge_id
     where sg.payment_intent = stripe_record_charge.payment_intent and sg.charge is null;
  end if;

  for affected in
    select sg.id from public.stripe_grants sg
     where sg.charge = stripe_record_charge.charge_id
        or (stripe_record_charge.payment_intent is not null
            and sg.payment_intent = stripe_record_charge.payment_intent)
     order by sg.id
  loop
    balance_change := balance_change + public.stripe_settle_grant(affected);
  end loop;
  return balance_change;
end;
$$;

revoke all on function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text, boolean)
  from public, anon, authenticated;
revoke all on function public.stripe_record_charge(text, text, integer, integer, integer, integer)
  from public, anon, authenticated;
grant execute on function public.stripe_grant(text, text, uuid, uuid, integer, integer, text, text, text, text, text, text, boolean)
  to service_role;
grant execute on function public.stripe_record_charge(text, text, integer, integer, integer, integer)
  to service_role;
