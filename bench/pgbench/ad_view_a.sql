-- POST /v1/ads/views as the service sends it without an Idempotency-Key (ads::record_view).
-- Each client walks its own users in turn (variables persist between transactions), so no
-- user passes the daily limit of 10 views within a run.
\set i :i + 1
\set n :first + ((:i * :clients + :client_id) % (:last - :first + 1))
select v.view_id, v.credits_awarded, v.balance, v.views_today, public.ad_daily_limit() as daily_limit, (now() at time zone 'utc')::date as today from public.handle_ad_view(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 31, null, null) v;
