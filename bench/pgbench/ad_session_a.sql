-- POST /v1/ads/sessions then POST /v1/ads/sessions/{id}/complete {"duration_seconds": 31},
-- as the service sends them (ads::sessions::open_session and complete_session, with the
-- defaults ADS_SESSION_TTL_SECONDS=600, ADS_MAX_OPEN_SESSIONS=3, and require_verification
-- false outside the admob mode): two statements, each its own transaction. The columns are
-- named without sqlx's "!" markers, which pgbench refuses as \gset variable names; the
-- statements are otherwise the service's.
-- Each client walks its own users in turn (variables persist between transactions), and
-- completes a session before it opens the next, so no user passes the daily limit of 10 views
-- or has more than one session open.
\set i :i + 1
\set n :first + ((:i * :clients + :client_id) % (:last - :first + 1))
select s.id as id, s.user_id as user_id, public.ad_session_status(s.status, s.expires_at) as status, s.provider, s.ad_unit_id, s.started_at as started_at, s.expires_at as expires_at, s.result, false as paid_now from public.open_ad_session(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, null, null, 600, 3) s \gset
select s.id as id, s.user_id as user_id, public.ad_session_status(s.status, s.expires_at) as status, s.provider, s.ad_unit_id, s.started_at as started_at, s.expires_at as expires_at, s.result, coalesce(s.paid_at = now(), false) as paid_now from public.complete_ad_session(:id, ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 31, false) s;
