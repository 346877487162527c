-- The tables of the credits service. Balances and their history are the money-like part:
-- they change only through the functions of the next migration.

create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  email text,
  display_name text check (char_length(display_name) between 1 and 100),
  avatar_url text check (char_length(avatar_url) between 1 and 2048),
  credits integer not null default 0
    constraint profiles_credits_non_negative check (credits >= 0),
  is_admin boolean not null default false,
  -- The day's ad counter lives on the profile so that one conditional UPDATE both enforces
  -- the daily limit and takes the row lock; it restarts itself on a new UTC day.
  ad_views_date date,
  ad_views_today integer not null default 0 check (ad_views_today >= 0),
  stripe_customer_id text unique,
  stripe_subscription_id text,
  subscription_status text,
  subscription_plan text,
  subscription_current_period_end timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

comment on column public.profiles.credits is
  'Current balance; always equals the sum of the user''s credit_transactions.';

create table public.credit_transactions (
  id uuid primary key default gen_random_uuid(),
  -- Ledger order. Writers hold the profile's row lock while inserting, so within one user
  -- this grows in the same order as balance_after is computed; created_at alone cannot
  -- promise that (it is the transaction's start time).
  seq bigint generated always as identity,
  user_id uuid not null references public.profiles (id) on delete cascade,
  amount integer not null check (amount <> 0),
  balance_after integer not null check (balance_after >= 0),
  source text not null
    check (source in ('stripe', 'subscription', 'ad_view', 'admin', 'system', 'spend', 'refund')),
  description text check (char_length(description) <= 500),
  reference text check (char_length(reference) <= 255),
  created_at timestamptz not null default now()
);

-- History pages (keyset on seq) and the ledger check (newest row per user).
create index credit_transactions_user_seq_idx on public.credit_transactions (user_id, seq desc);
-- Daily statistics and archival by age.
create index credit_transactions_created_at_idx on public.credit_transactions (created_at);

create table public.ad_views (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  viewed_on date not null,
  duration_seconds integer not null check (duration_seconds between 0 and 86400),
  credits_awarded integer not null check (credits_awarded >= 0),
  ad_unit_id text check (char_length(ad_unit_id) <= 255),
  provider text check (char_length(provider) <= 100),
  -- The ledger row this links to. No foreign key: ledger rows move to the archive (monthly
  -- maintenance), and the link must survive that untouched.
  transaction_id uuid,
  created_at timestamptz not null default now()
);

create index ad_views_user_created_idx on public.ad_views (user_id, created_at desc);
create index ad_views_viewed_on_idx on public.ad_views (viewed_on);

create table public.credit_packs (
  id uuid primary key,
  name text not null check (char_length(name) between 1 and 100),
  credits integer not null check (credits > 0),
  kind text not null check (kind in ('one_time', 'subscription')),
  stripe_price_id text unique check (char_length(stripe_price_id) between 1 and 255),
  unit_amount integer not null check (unit_amount >= 0),
  currency text not null check (currency ~ '^[a-z]{3}$'),
  active boolean not null default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create table public.images (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  kind text not null check (kind in ('generated', 'reference')),
  storage_bucket text not null default 'images',
  storage_path text not null check (char_length(storage_path) between 1 and 1024),
  prompt text,
  model text,
  width integer check (width > 0),
  height integer check (height > 0),
  mime_type text,
  metadata jsonb not null default '{}'::jsonb,
  analysis jsonb,
  -- The ledger row this links to. No foreign key: ledger rows move to the archive (monthly
  -- maintenance), and the link must survive that untouched.
  transaction_id uuid,
  created_at timestamptz not null default now(),
  unique (storage_bucket, storage_path)
);

create index images_user_created_idx on public.images (user_id, created_at desc, id desc);

-- One row per (caller, Idempotency-Key). The row is inserted inside the transaction that does
-- the work, so a concurrent request with the same key waits on it and then replays the answer.
create table public.idempotency_keys (
  owner text not null,
  key text not null check (char_length(key) between 1 and 255),
  request_hash bytea not null,
  -- Filled in before the claiming transaction commits; other sessions never see them empty.
  status_code smallint,
  response_body bytea,
  created_at timestamptz not null default now(),
  primary key (owner, key)
);

create index idempotency_keys_created_at_idx on public.idempotency_keys (created_at);

-- updated_at is kept by the database, so a user allowed to change only their display name
-- still gets it right without being granted the column.
create function public.touch_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end;
$$;

create trigger profiles_touch_updated_at before update on public.profiles
  for each row execute function public.touch_updated_at();
create trigger credit_packs_touch_updated_at before update on public.credit_packs
  for each row execute function public.touch_updated_at();
