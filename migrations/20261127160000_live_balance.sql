-- Live balance (docs/api.md, "Live balance"), first: the user's alert threshold.

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
