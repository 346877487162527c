-- Reads (and the profile update) as the user, in one round trip.
--
-- Each function switches to role `authenticated` with the caller's claims, exactly as
-- PostgREST does per transaction, runs its statement under RLS, and switches back before it
-- returns, so nothing outlives the call even inside a longer transaction. SECURITY INVOKER (a
-- definer could not switch roles) and executable by service_role only: this service calls them
-- after verifying the token whose claims it passes.

-- Inside, the user is compared as `(select auth.uid())`: an init plan, so the comparison can use
-- the primary key and index while RLS stays in force; `auth.uid()` itself is not leakproof and
-- would force a sequential scan under RLS.

-- Becomes the user; answers the role and claims to restore afterwards.
create function public.enter_user_session(claims text) returns text[]
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := array[pg_catalog.current_setting('role'),
                           coalesce(pg_catalog.current_setting('request.jwt.claims', true), '')];
begin
  perform pg_catalog.set_config('role', 'authenticated', true);
  perform pg_catalog.set_config('request.jwt.claims', enter_user_session.claims, true);
  return previous;
end;
$$;

create function public.profile_as_user(claims text)
returns setof public.profiles
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(profile_as_user.claims);
begin
  return query select p.* from public.profiles p where p.id = (select auth.uid());
  -- Back to the caller's role (set_config is everyone's; SET ROLE is checked against the
  -- session user, so no user-callable function is needed, and none is offered).
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

create function public.update_profile_as_user(
  claims text,
  set_display_name boolean,
  new_display_name text,
  set_avatar_url boolean,
  new_avatar_url text
)
returns setof public.profiles
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(update_profile_as_user.claims);
begin
  -- Column privileges allow these two columns only, whatever this statement says.
  return query
    update public.profiles p
       set display_name = case when set_display_name then new_display_name else p.display_name end,
           avatar_url = case when set_avatar_url then new_avatar_url else p.avatar_url end
     where p.id = (select auth.uid())
    returning p.*;
  -- Back to the caller's role (set_config is everyone's; SET ROLE is checked against the
  -- session user, so no user-callable function is needed, and none is offered).
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

create function public.transactions_as_user(claims text, before_seq bigint, max_rows integer)
returns setof public.credit_transactions
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(transactions_as_user.claims);
begin
  -- The user_id condition lets the (user_id, seq) index serve the page; RLS would allow no
  -- other rows anyway.
  return query
    select t.* from public.credit_transactions t
     where t.user_id = (select auth.uid()) and (before_seq is null or t.seq < before_seq)
     order by t.seq desc
     limit max_rows;
  -- Back to the caller's role (set_config is everyone's; SET ROLE is checked against the
  -- session user, so no user-callable function is needed, and none is offered).
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

create function public.images_as_user(claims text, after_created_at timestamptz, after_id uuid, max_rows integer)
returns setof public.images
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(images_as_user.claims);
begin
  return query
    select i.* from public.images i
     where i.user_id = (select auth.uid())
       and (after_created_at is null or (i.created_at, i.id) < (after_created_at, after_id))
     order by i.created_at desc, i.id desc
     limit max_rows;
  -- Back to the caller's role (set_config is everyone's; SET ROLE is checked against the
  -- session user, so no user-callable function is needed, and none is offered).
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

create function public.image_as_user(claims text, image_id uuid)
returns setof public.images
language plpgsql volatile
set search_path = ''
as $$
declare
  previous text[] := public.enter_user_session(image_as_user.claims);
begin
  -- No owner condition here: RLS alone decides that another user's image is not found.
  return query select i.* from public.images i where i.id = image_id;
  -- Back to the caller's role (set_config is everyone's; SET ROLE is checked against the
  -- session user, so no user-callable function is needed, and none is offered).
  perform pg_catalog.set_config('request.jwt.claims', previous[2], true);
  perform pg_catalog.set_config('role', previous[1], true);
end;
$$;

revoke all on function public.enter_user_session(text) from public, anon, authenticated;
revoke all on function public.profile_as_user(text) from public, anon, authenticated;
revoke all on function public.update_profile_as_user(text, boolean, text, boolean, text) from public, anon, authenticated;
revoke all on function public.transactions_as_user(text, bigint, integer) from public, anon, authenticated;
revoke all on function public.images_as_user(text, timestamptz, uuid, integer) from public, anon, authenticated;
revoke all on function public.image_as_user(text, uuid) from public, anon, authenticated;
grant execute on function public.enter_user_session(text) to service_role;
grant execute on function public.profile_as_user(text) to service_role;
grant execute on function public.update_profile_as_user(text, boolean, text, boolean, text) to service_role;
grant execute on function public.transactions_as_user(text, bigint, integer) to service_role;
grant execute on function public.images_as_user(text, timestamptz, uuid, integer) to service_role;
grant execute on function public.image_as_user(text, uuid) to service_role;
