-- The smallest SQL for an ad view: one call of the function.
\set n random(:first, :last)
select public.handle_ad_view(('00000000-0000-4000-8000-' || lpad(:n::text, 12, '0'))::uuid, 31);
