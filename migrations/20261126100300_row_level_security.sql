-- Row Level Security on every public table, and table privileges narrowed to what each role
-- needs. Supabase's default privileges give anon and authenticated everything on new public
-- tables, so each table starts by taking that back; RLS then decides which rows are visible
-- and column privileges decide what a user may change. Nothing money-like is writable by a
-- user through any path (this service, PostgREST, or a direct connection with their token).

alter table public.profiles enable row level security;
alter table public.credit_transactions enable row level security;
alter table public.ad_views enable row level security;
alter table public.credit_packs enable row level security;
alter table public.images enable row level security;
alter table public.idempotency_keys enable row level security;
-- sqlx keeps its migration history in public too; it is nobody's business but the owner's.
alter table public._sqlx_migrations enable row level security;

revoke all on table public.profiles, public.credit_transactions, public.ad_views,
  public.credit_packs, public.images, public.idempotency_keys, public._sqlx_migrations
  from public, anon, authenticated;
revoke all on sequence public.credit_transactions_seq_seq from public, anon, authenticated;

grant select, insert, update, delete on table public.profiles, public.credit_transactions,
  public.ad_views, public.credit_packs, public.images, public.idempotency_keys to service_role;
grant usage, select on sequence public.credit_transactions_seq_seq to service_role;
grant select on table public._sqlx_migrations to service_role;

-- profiles: a user reads their own row and may change their display name and avatar only.
grant select on table public.profiles to authenticated;
grant update (display_name, avatar_url) on table public.profiles to authenticated;

create policy profiles_select_own_or_admin on public.profiles
  for select to authenticated
  using (id = (select auth.uid()) or (select public.is_admin()));

create policy profiles_update_own on public.profiles
  for update to authenticated
  using (id = (select auth.uid()))
  with check (id = (select auth.uid()));

-- credit_transactions and ad_views: read-only history, own rows (admins: all rows).
grant select on table public.credit_transactions, public.ad_views to authenticated;

create policy credit_transactions_select_own_or_admin on public.credit_transactions
  for select to authenticated
  using (user_id = (select auth.uid()) or (select public.is_admin()));

create policy ad_views_select_own_or_admin on public.ad_views
  for select to authenticated
  using (user_id = (select auth.uid()) or (select public.is_admin()));

-- credit_packs: the active catalogue is public; admins also see retired packs.
grant select on table public.credit_packs to anon, authenticated;

create policy credit_packs_select_active on public.credit_packs
  for select to anon
  using (active);

create policy credit_packs_select_active_or_admin on public.credit_packs
  for select to authenticated
  using (active or (select public.is_admin()));

-- images: owner only, for every command; the link to the ledger is not the user's to set.
grant select, insert, delete on table public.images to authenticated;
grant update (prompt, model, width, height, mime_type, metadata, analysis)
  on table public.images to authenticated;

create policy images_select_own on public.images
  for select to authenticated
  using (user_id = (select auth.uid()));

create policy images_insert_own on public.images
  for insert to authenticated
  with check (user_id = (select auth.uid()) and transaction_id is null);

create policy images_update_own on public.images
  for update to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

create policy images_delete_own on public.images
  for delete to authenticated
  using (user_id = (select auth.uid()));

-- idempotency_keys and _sqlx_migrations: RLS on and no policy, so only the owner and
-- service_role (which bypasses RLS) reach them.
