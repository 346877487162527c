-- The business rules. Every function that changes a balance locks the profile row with a
-- conditional UPDATE (never a read-then-write), writes the ledger row in the same transaction,
-- and is executable by service_role only.
--
-- Errors the service maps to answers use their own SQLSTATE class `AC`:
--   AC402 insufficient credits, AC404 profile not found, AC429 daily ad limit reached.

create function public.is_admin() returns boolean
language sql stable security definer
set search_path = ''
as $$
  select coalesce((select p.is_admin from public.profiles p where p.id = auth.uid()), false)
$$;

comment on function public.is_admin() is
  'Whether the caller (auth.uid()) is an admin; used by the RLS policies.';

-- The ad rules, written once and read by handle_ad_view and by the profile endpoint.
create function public.ad_daily_limit() returns integer
language sql immutable parallel safe
set search_path = ''
as $$ select 10 $$;

create function public.ad_view_reward(duration_seconds integer) returns integer
language sql immutable parallel safe
set search_path = ''
as $$
  select case
    when duration_seconds >= 30 then 2
    when duration_seconds >= 15 then 1
    else 0
  end
$$;

create function public.add_credits(
  user_id uuid,
  amount integer,
  source text,
  description text default null,
  reference text default null
) returns public.credit_transactions
language plpgsql security definer
set search_path = ''
as $$
declare
  new_balance integer;
  entry public.credit_transactions;
begin
  if add_credits.amount is null or add_credits.amount = 0 then
    raise exception 'amount must be a non-zero integer' using errcode = '22023';
  end if;

  update public.profiles p
     set credits = p.credits + add_credits.amount
   where p.id = add_credits.user_id
     and p.credits + add_credits.amount >= 0
  returning p.credits into new_balance;

  if not found then
    if exists (select 1 from public.profiles p where p.id = add_credits.user_id) then
      raise exception 'insufficient credits' using errcode = 'AC402';
    end if;
    raise exception 'profile not found' using errcode = 'AC404';
  end if;

  insert into public.credit_transactions (user_id, amount, balance_after, source, description, reference)
  values (add_credits.user_id, add_credits.amount, new_balance, add_credits.source,
          add_credits.description, add_credits.reference)
  returning * into entry;

  return entry;
end;
$$;

comment on function public.add_credits(uuid, integer, text, text, text) is
  'Changes a balance by amount (negative takes credits away, never below zero) and records it in the ledger.';

create function public.spend_credits(
  user_id uuid,
  amount integer,
  description text default null,
  reference text default null
) returns public.credit_transactions
language plpgsql security definer
set search_path = ''
as $$
begin
  if spend_credits.amount is null or spend_credits.amount <= 0 then
    raise exception 'amount must be positive' using errcode = '22023';
  end if;
  return public.add_credits(spend_credits.user_id, -spend_credits.amount, 'spend',
                            spend_credits.description, spend_credits.reference);
end;
$$;

comment on function public.spend_credits(uuid, integer, text, text) is
  'Spends credits; fails with AC402 when the balance is short.';

create function public.handle_ad_view(
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
      raise exception 'daily ad view limit reached' using errcode = 'AC429';
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

comment on function public.handle_ad_view(uuid, integer, text, text) is
  'Records a rewarded ad view: at most ad_daily_limit() per UTC day, reward by ad_view_reward().';

create function public.create_profile_on_signup() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  -- Metadata is user-supplied at sign-up: take what fits and never fail the sign-up over it.
  insert into public.profiles (id, email, display_name, avatar_url, is_admin)
  values (
    new.id,
    new.email,
    nullif(left(btrim(coalesce(new.raw_user_meta_data ->> 'display_name',
                               new.raw_user_meta_data ->> 'full_name',
                               new.raw_user_meta_data ->> 'name', '')), 100), ''),
    case
      when char_length(new.raw_user_meta_data ->> 'avatar_url') between 1 and 2048
        then new.raw_user_meta_data ->> 'avatar_url'
    end,
    false
  )
  on conflict (id) do nothing;
  return new;
end;
$$;

create function public.sync_profile_email() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  update public.profiles p set email = new.email where p.id = new.id;
  return new;
end;
$$;

drop trigger if exists on_auth_user_created on auth.users;
create trigger on_auth_user_created
  after insert on auth.users
  for each row execute function public.create_profile_on_signup();

drop trigger if exists on_auth_user_email_changed on auth.users;
create trigger on_auth_user_email_changed
  after update of email on auth.users
  for each row when (old.email is distinct from new.email)
  execute function public.sync_profile_email();

-- Users who signed up before this migration get their profile now.
insert into public.profiles (id, email, display_name, avatar_url, is_admin)
select u.id,
       u.email,
       nullif(left(btrim(coalesce(u.raw_user_meta_data ->> 'display_name',
                                  u.raw_user_meta_data ->> 'full_name',
                                  u.raw_user_meta_data ->> 'name', '')), 100), ''),
       case
         when char_length(u.raw_user_meta_data ->> 'avatar_url') between 1 and 2048
           then u.raw_user_meta_data ->> 'avatar_url'
       end,
       false
  from auth.users u
on conflict (id) do nothing;

-- Supabase grants EXECUTE on new functions to anon and authenticated by default privileges,
-- so revoking from PUBLIC alone is not enough.
revoke all on function public.add_credits(uuid, integer, text, text, text) from public, anon, authenticated;
revoke all on function public.spend_credits(uuid, integer, text, text) from public, anon, authenticated;
revoke all on function public.handle_ad_view(uuid, integer, text, text) from public, anon, authenticated;
revoke all on function public.create_profile_on_signup() from public, anon, authenticated;
revoke all on function public.sync_profile_email() from public, anon, authenticated;
revoke all on function public.touch_updated_at() from public, anon, authenticated;
revoke all on function public.is_admin() from public, anon;

grant execute on function public.add_credits(uuid, integer, text, text, text) to service_role;
grant execute on function public.spend_credits(uuid, integer, text, text) to service_role;
grant execute on function public.handle_ad_view(uuid, integer, text, text) to service_role;
grant execute on function public.is_admin() to authenticated, service_role;
grant execute on function public.ad_daily_limit() to anon, authenticated, service_role;
grant execute on function public.ad_view_reward(integer) to anon, authenticated, service_role;
