-- The smallest SQL for an ad view: one call of the function.
-- Each client walks its own users in turn (variables persist between transactions), so no
-- user passes the daily limit of 10 views within a run.
\set i :i + 1
\set n :first + ((:i * :clients + :client_id) % (:last - :first + 1))
select public.handle_ad_view(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 31);
