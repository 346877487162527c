-- The live balance learns about holds (docs/api.md, "Live balance"): every change of a hold is
-- announced like a ledger row, and each change gets a number, so that a stream woken by the
-- announcement (or after its listener was away) reads exactly the changes it has not sent.
-- Ledger rows record the holds in force when they were written, so that the available balance
-- each `transaction` event carries, and the alerts it causes, are those of that moment.

create sequence public.credit_hold_changes as bigint;
revoke all on sequence public.credit_hold_changes from public, anon, authenticated;

alter table public.credit_holds add column changed_seq bigint;
update public.credit_holds set changed_seq = nextval('public.credit_hold_changes');
alter table public.credit_holds alter column changed_seq set not null;
create index credit_holds_user_changed_idx on public.credit_holds (user_id, changed_seq);

create function public.number_hold_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.changed_seq := pg_catalog.nextval('public.credit_hold_changes');
  return new;
end;
$$;

create trigger credit_holds_number_change
  before insert or update on public.credit_holds
  for each row execute function public.number_hold_change();

create function public.announce_hold_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_catalog.pg_notify(
    'amethyst_live',
    pg_catalog.json_build_object('kind', 'hold', 'user_id', new.user_id, 'seq', new.changed_seq)::text
  );
  return null;
end;
$$;

create trigger credit_holds_announce
  after insert or update on public.credit_holds
  for each row execute function public.announce_hold_change();

revoke all on function public.number_hold_change() from public, anon, authenticated;
revoke all on function public.announce_hold_change() from public, anon, authenticated;

-- The credits under active holds when a ledger row was written (null before holds existed).
alter table public.credit_transactions add column held_after integer;
alter table public.credit_transactions_archive add column held_after integer;
comment on column public.credit_transactions.held_after is
  'Credits under active holds right after this row: balance_after - held_after was available.';

create or replace function public.ledger_write(user_id uuid, amount integer, source text, description text,
                                               reference text, lots jsonb)
returns public.credit_transactions
language plpgsql security definer
set search_path = ''
as $$
declare
  new_balance integer;
  held integer;
  entry public.credit_transactions;
begin
  update public.profiles p
     set credits = p.credits + ledger_write.amount
   where p.id = ledger_write.user_id
  returning p.credits into new_balance;

  select coalesce(sum(h.amount), 0)::integer into held
    from public.credit_holds h
   where h.user_id = ledger_write.user_id and h.status = 'active'
     and h.expires_at > public.clock_now();

  insert into public.credit_transactions (user_id, amount, balance_after, source, description,
                                          reference, lots, held_after)
  values (ledger_write.user_id, ledger_write.amount, new_balance, ledger_write.source,
          ledger_write.description, ledger_write.reference, ledger_write.lots, held)
  returning * into entry;
  return entry;
end;
$$;

-- The events' available balance is what was available then: credits less active holds.
create or replace function public.ledger_events_as_user(
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
           t.created_at, t.balance_after - coalesce(t.held_after, 0), limit_in_force,
           public.balance_alert(t.balance_after - coalesce(t.held_after, 0) - t.amount,
                                t.balance_after - coalesce(t.held_after, 0), limit_in_force)
      from public.credit_transactions t
     where t.user_id = me and t.seq > after_seq
     order by t.seq
     limit max_rows;
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

-- The hold changes of a user after a change number, as the user under RLS, oldest first; each
-- as callers see it (a lapsed hold reads expired).
create function public.hold_changes_as_user(claims text, after_change bigint, max_rows integer)
returns table (
  changed_seq bigint, id uuid, user_id uuid, amount integer, captured_amount integer,
  status text, reference text, description text, created_at timestamptz,
  expires_at timestamptz, settled_at timestamptz
)
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(hold_changes_as_user.claims);
  at timestamptz := public.clock_now();
begin
  return query
    select h.changed_seq, s.id, s.user_id, s.amount, s.captured_amount, s.status, s.reference,
           s.description, s.created_at, s.expires_at, s.settled_at
      from public.credit_holds h
     cross join lateral public.hold_seen(h, at) s
     where h.user_id = (select auth.uid())
       and h.changed_seq > coalesce(after_change, (select max(x.changed_seq) from public.credit_holds x
                                                    where x.user_id = (select auth.uid())), 0)
     order by h.changed_seq
     limit max_rows;
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

revoke all on function public.hold_changes_as_user(text, bigint, integer) from public, anon, authenticated;
grant execute on function public.hold_changes_as_user(text, bigint, integer) to service_role;

-- The hold's row type gained changed_seq: the view of a hold carries it too.
create or replace function public.hold_seen(h public.credit_holds, at timestamptz) returns public.credit_holds
language sql stable
set search_path = ''
as $$
  select h.id, h.seq, h.user_id, h.amount, h.captured_amount,
         case when h.status = 'active' and h.expires_at <= at then 'expired' else h.status end,
         h.reference, h.description, h.transaction_id, h.created_at, h.expires_at,
         case when h.status = 'active' and h.expires_at <= at then h.expires_at else h.settled_at end,
         h.changed_seq
$$;
