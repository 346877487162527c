-- The smallest SQL for an ad session: the two function calls, open then complete, each its
-- own round trip as in the app (the ad plays between them).
-- Each client walks its own users in turn (variables persist between transactions), and
-- completes a session before it opens the next, so no user passes the daily limit of 10 views
-- or has more than one session open.
\set i :i + 1
\set n :first + ((:i * :clients + :client_id) % (:last - :first + 1))
select id from public.open_ad_session(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, null, null, 600, 3) \gset
select from public.complete_ad_session(:id, ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 31, false);
