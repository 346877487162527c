-- The smallest SQL for a paid checkout: one grant, exactly once per session.
\set n random(:first, :last)
\set r random(1, 1000000000000)
select public.stripe_grant('checkout_session', 'cs_pgbb_' || :r, ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, '00000000-0000-4000-9000-000000000001', 100, 999, 'usd', 'pi_pgbb_' || :r, null, 'stripe', 'Credit pack: Bench pack', 'evt_pgbb_' || :r);
