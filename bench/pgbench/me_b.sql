-- The smallest SQL for GET /v1/me: the profile row, without the switch to the user's role.
\set n random(:first, :last)
select p.* from public.profiles p where p.id = ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid;
