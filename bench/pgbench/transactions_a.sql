-- GET /v1/me/transactions?limit=20 as the service sends it (credits::my_transactions).
\set n random(:first, :last)
select * from public.transactions_as_user('{"sub":"00000000-0000-4000-8000-' || lpad(:n::text, 12, '0') || '","role":"authenticated","aud":"authenticated"}', null, 21);
