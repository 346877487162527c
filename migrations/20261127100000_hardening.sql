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
