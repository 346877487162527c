-- wrk script for scripts/cluster: each request from a random user of the token file.
-- Arguments (after `--`): <mode> <tokens file>; mode: spend (POST one credit) or me (GET).
-- Prints one line, CLUSTER_JSON {...}, with the counts and the latency percentiles.

local mode, tokens = "me", {}

function init(args)
  mode = args[1]
  for line in io.lines(args[2]) do
    tokens[#tokens + 1] = line
  end
  math.randomseed(os.time() + math.random(1, 1000000))
end

function request()
  local token = tokens[math.random(#tokens)]
  if mode == "spend" then
    return wrk.format("POST", nil, {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
    }, '{"amount":1,"description":"cluster run"}')
  end
  return wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. token })
end

function done(summary, latency, requests)
  io.write(string.format(
    'CLUSTER_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
