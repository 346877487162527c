-- wrk script for bench/run: one request shape per scenario, a different caller per request.
-- Non-2xx answers are counted by wrk itself (summary.errors.status).
-- Arguments (after `--`): <mode> <file> <threads>
--   mode: get (GET path with a random token), spend, ad_view (POST with a JSON body),
--         webhook (pre-signed Stripe events, one per request)
--   file: tokens, one per line (token modes) or "<signature>\t<body>" lines (webhook)
-- The path comes from the URL given to wrk.

local mode, lines, path
local counter, step = 0, 1
local thread_id = 0

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

function request()
  if mode == "webhook" then
    local line = next_line()
    local tab = line:find("\t", 1, true)
    return wrk.format("POST", path, {
      ["Content-Type"] = "application/json",
      ["Stripe-Signature"] = line:sub(1, tab - 1),
    }, line:sub(tab + 1))
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
