-- The smallest SQL for a page of history: 20 rows by the (user_id, seq) index.
\set n random(:first, :last)
select id, amount, balance_after, source, description, reference, created_at from public.credit_transactions where user_id = ('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid order by seq desc limit 20;
