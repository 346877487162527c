-- wrk script for bench/run: one request shape per scenario, a different caller per request.
-- Non-2xx answers are counted by wrk itself (summary.errors.status).
-- Arguments (after `--`): <mode> <file> <threads>
--   mode: plain (GET path, no token), get (GET path with a random token), spend, ad_view (POST with a JSON body),
--         ad_session (open an ad session, then complete it), webhook (pre-signed Stripe
--         events, one per request), hold (reserve a credit, then capture it)
--   file: tokens, one per line (token modes), "<user id>\t<token>" lines (ad_session) or
--         "<signature>\t<body>" lines (webhook)
-- The path comes from the URL given to wrk.

local mode, lines, path
local counter, step = 0, 1
local thread_id = 0

-- ad_session: wrk's script has no handle on the connection a response came on, and calls
-- request() for a connection only after other connections' responses may have come in. So
-- the pairing goes by the session itself: response() reads the session id and its user id
-- (ssv.user_id) from the 201 body of an open and queues the completion; the next request()
-- on this thread, on whichever connection, sends it with that user's token. A user is busy
-- from the open request until its completion comes back as completed, and is not opened for
-- again meanwhile, so no user has two sessions open at once (the service allows 3 each).
local token_of = {}   -- user id -> token
local users = {}      -- user ids, in file order
local busy = {}       -- user id -> true while a session of theirs is unfinished
local ready = {}      -- completions to send: { session id, user id }, first in first out
local ready_head, ready_tail = 1, 0
-- hold: the holds reserved and not yet captured, first in first out.
local hold_token
local captures = {}
local captures_head, captures_tail = 1, 0

function setup(thread)
  thread:set("id", thread_id)
  thread_id = thread_id + 1
end

function init(args)
  mode = args[1]
  lines = {}
  for line in io.lines(args[2]) do
    lines[#lines + 1] = line
  end
  if mode == "hold" then
    -- The service_role token, then the users to reserve for.
    hold_token = table.remove(lines, 1)
  elseif mode ~= "ad_session" then
    -- wrk reads bodies only when the script has a response(); the other modes need none.
    response = nil
  else
    for _, line in ipairs(lines) do
      local tab = line:find("\t", 1, true)
      local user = line:sub(1, tab - 1)
      users[#users + 1] = user
      token_of[user] = line:sub(tab + 1)
    end
  end
  path = wrk.path
  -- Threads take interleaved lines, so no line is used twice across threads (ad views stay
  -- within the daily limit, webhook events stay distinct).
  counter = id
  step = tonumber(args[3]) or 1
  math.randomseed(os.time() + id * 7919)
end

local function next_line()
  counter = counter + step
  return lines[(counter % #lines) + 1]
end

-- The next of this thread's users (interleaved lines, as next_line) without an unfinished
-- session; nil when every one of them is busy.
local function next_free_user()
  for _ = 1, #users do
    counter = counter + step
    local user = users[(counter % #users) + 1]
    if not busy[user] then
      return user
    end
  end
  return nil
end

local function ad_session_request()
  local json = { ["Content-Type"] = "application/json" }
  if ready_head <= ready_tail then
    local item = ready[ready_head]
    ready[ready_head] = nil
    ready_head = ready_head + 1
    json["Authorization"] = "Bearer " .. token_of[item[2]]
    return wrk.format("POST", path .. "/" .. item[1] .. "/complete", json, '{"duration_seconds": 31}')
  end
  local user = next_free_user()
  if user == nil then
    -- Every user of this thread has an unfinished session (fewer users than connections, or
    -- answers that never came as 201): open for the next one anyway, and let the service's
    -- cap of 3 open sessions a user answer 409, counted as errors.
    counter = counter + step
    user = users[(counter % #users) + 1]
  end
  busy[user] = true
  json["Authorization"] = "Bearer " .. token_of[user]
  return wrk.format("POST", path, json, '{}')
end

function response(status, headers, body)
  if mode == "hold" then
    local hold = status == 201 and body:match('^{"id":"([%x%-]+)"')
    if hold then
      captures_tail = captures_tail + 1
      captures[captures_tail] = hold
    end
    return
  end
  if mode ~= "ad_session" or status ~= 201 then
    return
  end
  local session = body:match('"custom_data":"([%x%-]+)"')
  local user = body:match('"user_id":"([%x%-]+)"')
  local state = body:match('"status":"([%a_]+)"')
  if not session or not user then
    return
  end
  if state == "open" then
    ready_tail = ready_tail + 1
    ready[ready_tail] = { session, user }
  else
    busy[user] = nil
  end
end

local function hold_request()
  local headers = {
    ["Authorization"] = "Bearer " .. hold_token,
    ["Content-Type"] = "application/json",
  }
  if captures_head <= captures_tail then
    local hold = captures[captures_head]
    captures[captures_head] = nil
    captures_head = captures_head + 1
    return wrk.format("POST", path .. "/" .. hold .. "/capture", headers, '{}')
  end
  local user = lines[math.random(#lines)]
  return wrk.format("POST", path, headers,
    '{"user_id": "' .. user .. '", "amount": 1, "ttl_seconds": 600, "reference": "bench"}')
end

function request()
  if mode == "ad_session" then
    return ad_session_request()
  end
  if mode == "hold" then
    return hold_request()
  end
  if mode == "webhook" then
    local line = next_line()
    local tab = line:find("\t", 1, true)
    return wrk.format("POST", path, {
      ["Content-Type"] = "application/json",
      ["Stripe-Signature"] = line:sub(1, tab - 1),
    }, line:sub(tab + 1))
  end
  if mode == "plain" then
    return wrk.format("GET", path)
  end
  local token
  if mode == "ad_view" then
    token = next_line()
  else
    token = lines[math.random(#lines)]
  end
  local headers = { ["Authorization"] = "Bearer " .. token }
  if mode == "spend" then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", path, headers, '{"amount": 1, "description": "bench"}')
  elseif mode == "ad_view" then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", path, headers, '{"duration_seconds": 31}')
  end
  return wrk.format("GET", path, headers)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"non_2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, errors.status, errors.connect, errors.read,
    errors.write, errors.timeout))
end
