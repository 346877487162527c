-- Functions that answer one row say so. Without it the planner takes 1000 rows for each
-- function in FROM, so GET /v1/me (the profile, the ad allowance and the balance, three
-- functions joined) looked like 10^9 rows and was JIT-compiled on every call: about 30 ms of
-- the database's time for a read that takes 1 ms.
alter function public.profile_as_user(text) rows 1;
alter function public.update_profile_as_user(text, boolean, text, boolean, text, boolean, integer) rows 1;
alter function public.ad_allowance(date, integer) rows 1;
alter function public.credit_balance(uuid) rows 1;
alter function public.ledger_position_as_user(text, bigint, integer) rows 1;
alter function public.capture_hold(uuid, integer, text) rows 1;
alter function public.release_hold(uuid) rows 1;
alter function public.handle_ad_view(uuid, integer, text, text) rows 1;
alter function public.image_as_user(text, uuid) rows 1;
