-- GET /v1/me/transactions?limit=20 as the service sends it (db::begin_as_user, then credits::history).
\set n random(:first, :last)
BEGIN;
select set_config('role', 'authenticated', true), set_config('request.jwt.claims', '{"sub":"00000000-0000-4000-8000-' || lpad(:n::text, 12, '0') || '","role":"authenticated","aud":"authenticated"}', true);
select id, amount, balance_after, source, description, reference, created_at, seq from public.credit_transactions where user_id = ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid and (null::bigint is null or seq < null) order by seq desc limit 21;
COMMIT;
