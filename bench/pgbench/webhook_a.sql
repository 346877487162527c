-- POST /v1/webhooks/stripe (checkout.session.completed, paid) as the service sends it
-- (stripe::webhook::receive): claim the event, handle it in a savepoint, record the outcome.
\set n random(:first, :last)
\set r random(1, 1000000000000)
BEGIN;
insert into public.stripe_events (id, type, api_version, livemode, stripe_created_at, status, payload) values ('evt_pgb_' || :r, 'checkout.session.completed', '2025-03-31.basil', false, to_timestamp(1700000000), 'processing', '{"object": "event"}') on conflict (id) do update set status = 'processing', attempts = public.stripe_events.attempts + 1, error = null, payload = excluded.payload where public.stripe_events.status = 'failed' returning 1;
SAVEPOINT _sqlx_savepoint_1;
select id, credits, name from public.credit_packs where id = '00000000-0000-4000-9000-000000000001';
select public.stripe_grant('checkout_session', 'cs_pgb_' || :r, ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, '00000000-0000-4000-9000-000000000001', 100, 999, 'usd', 'pi_pgb_' || :r, null, 'stripe', 'Credit pack: Bench pack', 'evt_pgb_' || :r);
RELEASE SAVEPOINT _sqlx_savepoint_1;
update public.stripe_events set status = 'processed', error = null, processed_at = case when 'processed' in ('processed', 'ignored') then now() end where id = 'evt_pgb_' || :r;
COMMIT;
