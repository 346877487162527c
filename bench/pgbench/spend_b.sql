-- The smallest SQL for a spend: one call of the function.
\set n random(:first, :last)
select public.spend_credits(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 1);
