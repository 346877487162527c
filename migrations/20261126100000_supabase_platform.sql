-- What a Supabase project already provides, created here only where it is missing, so the
-- same migrations run unchanged on Supabase and on a plain PostgreSQL. Nothing existing is
-- replaced: on Supabase every branch below is skipped.

-- Roles are cluster-wide. Every database on the server (one per test, say) runs this
-- migration, possibly at the same moment, so losing the race to create a role is not an error.
do $$
declare
  wanted record;
begin
  for wanted in
    select * from (values ('anon', false), ('authenticated', false), ('service_role', true))
      as t (role_name, bypass_rls)
  loop
    if not exists (select 1 from pg_catalog.pg_roles where rolname = wanted.role_name) then
      begin
        execute format(
          'create role %I nologin noinherit%s',
          wanted.role_name,
          case when wanted.bypass_rls then ' bypassrls' else '' end
        );
      exception
        when duplicate_object or unique_violation then
          null; -- another database created it first
      end;
    end if;
  end loop;
end
$$;

-- The service connects as the migrating role and switches to `authenticated` for user reads
-- and to `service_role` for everything else, so it must be able to become both. A superuser
-- already can; on Supabase `postgres` is already a member.
do $$
declare
  target text;
begin
  if (select rolsuper from pg_catalog.pg_roles where rolname = current_user) then
    return;
  end if;
  foreach target in array array['anon', 'authenticated', 'service_role'] loop
    if not pg_catalog.pg_has_role(current_user, target, 'member') then
      begin
        execute format('grant %I to %I', target, current_user);
      exception
        when others then
          raise warning 'could not grant % to %: %', target, current_user, sqlerrm;
      end;
    end if;
  end loop;
end
$$;

do $$
begin
  if not exists (select 1 from pg_catalog.pg_namespace where nspname = 'auth') then
    create schema auth;
    grant usage on schema auth to anon, authenticated, service_role;
  end if;

  if pg_catalog.to_regclass('auth.users') is null then
    -- The columns of Supabase's auth.users that this service reads.
    create table auth.users (
      id uuid primary key default gen_random_uuid(),
      email text,
      raw_user_meta_data jsonb not null default '{}'::jsonb,
      is_anonymous boolean not null default false,
      created_at timestamptz not null default now(),
      updated_at timestamptz not null default now()
    );
  end if;

  -- Supabase's own definitions: claims come from the `request.jwt.claims` setting that
  -- PostgREST (and this service) set per transaction.
  if pg_catalog.to_regprocedure('auth.uid()') is null then
    create function auth.uid() returns uuid
    language sql stable
    as $fn$
      select coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
      )::uuid
    $fn$;
  end if;

  if pg_catalog.to_regprocedure('auth.role()') is null then
    create function auth.role() returns text
    language sql stable
    as $fn$
      select coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
      )::text
    $fn$;
  end if;

  if pg_catalog.to_regprocedure('auth.jwt()') is null then
    create function auth.jwt() returns jsonb
    language sql stable
    as $fn$
      select coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
      )::jsonb
    $fn$;
  end if;
end
$$;
