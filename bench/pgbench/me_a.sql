-- GET /v1/me as the service sends it (db::begin_as_user, then profiles::fetch): four round trips.
\set n random(:first, :last)
BEGIN;
select set_config('role', 'authenticated', true), set_config('request.jwt.claims', '{"sub":"00000000-0000-4000-8000-' || lpad(:n::text, 12, '0') || '","role":"authenticated","aud":"authenticated"}', true);
select p.id, p.email, p.display_name, p.avatar_url, p.credits, p.is_admin, p.subscription_status, p.subscription_plan, p.subscription_current_period_end, case when p.ad_views_date = (now() at time zone 'utc')::date then p.ad_views_today else 0 end as ad_views_today, public.ad_daily_limit() as ad_daily_limit, (now() at time zone 'utc')::date as today, p.created_at, p.updated_at from public.profiles p where p.id = ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid;
COMMIT;
