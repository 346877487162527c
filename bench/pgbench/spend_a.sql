-- POST /v1/credits/spend as the service sends it without an Idempotency-Key (credits::spend).
\set n random(:first, :last)
select * from public.spend_credits(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 1, 'bench', null);
