-- Security review, second round: what users can reach through Supabase's REST API (their own
-- token, role `authenticated`) is narrowed further, and every function pins its search_path.

------------------------------------------------------------------------------------------------
-- Images: a user registers only objects of the `images` bucket inside their own folder.
------------------------------------------------------------------------------------------------

-- Storage policies give each user the folder named after their id (`<user id>/…`). A row here
-- claiming a path elsewhere would let a user point "their" image at someone else's object (or
-- take its (bucket, path) first, so the real owner could no longer register it). `.` and `..`
-- segments are refused as well: `<own id>/../<other id>/x.png` starts in the right folder but
-- names another one.
alter policy images_insert_own on public.images
  with check (
    user_id = (select auth.uid())
    and transaction_id is null
    and storage_bucket = 'images'
    and pg_catalog.starts_with(storage_path, (select auth.uid())::text || '/')
    and storage_path !~ '(^|/)\.\.?(/|$)'
  );

-- images_update_own stays as it is: users may update only prompt, model, width, height,
-- mime_type, metadata and analysis (column privileges), none of which moves a row to another
-- user, bucket or path.

-- No one, service_role included, has a reason to store a path with dot segments. NOT VALID:
-- rows stored before are not checked (there is nothing sound to rewrite them to), every new or
-- changed row is.
alter table public.images
  add constraint images_storage_path_without_dot_segments
  check (storage_path !~ '(^|/)\.\.?(/|$)') not valid;

------------------------------------------------------------------------------------------------
-- Profiles: display names and avatar URLs the frontend can render safely.
------------------------------------------------------------------------------------------------

-- Users update these two columns directly through the REST API, so the service's validation
-- (src/profiles.rs) is not enough on its own. Control characters are Unicode's Cc category
-- (what Rust's char::is_control means); whitespace is Unicode's White_Space property (Rust's
-- char::is_whitespace), spelled out so that the result does not depend on the server's locale.

-- No writes while the rows are cleaned and the constraints added, so that no row that does
-- not fit can slip in between (reads go on until the constraints need their exclusive lock).
lock table public.profiles in share row exclusive mode;

update public.profiles p set display_name = null
 where p.display_name ~ '[\u0001-\u001f\u007f-\u009f]';

update public.profiles p set avatar_url = null
 where p.avatar_url !~ '^https?://'
    or p.avatar_url ~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]';

alter table public.profiles
  add constraint profiles_display_name_without_control_characters
    check (display_name !~ '[\u0001-\u001f\u007f-\u009f]'),
  add constraint profiles_avatar_url_is_http
    check (avatar_url ~ '^https?://'
           and avatar_url !~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]');

-- The sign-up trigger must never fail a sign-up: metadata is whatever the client sent, so a
-- name or avatar that the constraints above would refuse is dropped, not stored.
-- (sync_profile_email writes only the email, which these constraints do not concern.)
create or replace function public.create_profile_on_signup() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  name text := nullif(left(btrim(coalesce(new.raw_user_meta_data ->> 'display_name',
                                          new.raw_user_meta_data ->> 'full_name',
                                          new.raw_user_meta_data ->> 'name', '')), 100), '');
  avatar text := new.raw_user_meta_data ->> 'avatar_url';
begin
  if name ~ '[\u0001-\u001f\u007f-\u009f]' then
    name := null;
  end if;
  if not (pg_catalog.char_length(avatar) between 1 and 2048
          and avatar ~ '^https?://'
          and avatar !~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]') then
    avatar := null;
  end if;

  insert into public.profiles (id, email, display_name, avatar_url, is_admin)
  values (new.id, new.email, name, avatar, false)
  on conflict (id) do nothing;
  return new;
end;
$$;

------------------------------------------------------------------------------------------------
-- Sequences: not users' business.
------------------------------------------------------------------------------------------------

-- Supabase's default privileges grant anon and authenticated every privilege on each new
-- sequence in public. With USAGE or UPDATE a user could call nextval()/setval() on a ledger or
-- maintenance sequence (burning or rewinding identity values); with SELECT read how busy the
-- service is. Nothing a user does needs them: identity columns draw their values whatever the
-- inserting role's privileges on the sequence. service_role keeps what it has.
revoke all on all sequences in schema public from public, anon, authenticated;

-- And for sequences that later migrations create (this applies to objects the migrating role
-- creates, which is who runs migrations).
alter default privileges in schema public revoke all on sequences from anon, authenticated;
