-- GET /v1/me as the service sends it (profiles::get_me): one call that reads as the user.
\set n random(:first, :last)
select * from public.profile_as_user('{"sub":"00000000-0000-4000-8000-' || lpad(:n::text, 12, '0') || '","role":"authenticated","aud":"authenticated"}');
