-- wrk script of loadtest/wrk.py: POSTs prebuilt binary bodies in turn, then prints a JSON summary.
--
--   wrk -c N -d 10s -s loadtest/wrk_bodies.lua URL -- BODIES_FILE BODY_BYTES PATH [Name:value ...]
--
-- BODIES_FILE holds equally long request bodies back to back (written by loadtest/wrk.py from the
-- same bytes the project's own client sends); each request takes the next one. Requests are formatted
-- once in init(): request() only picks one, so the client costs little per request. No response()
-- hook: wrk then skips parsing bodies and counts any status > 399 as an error.

local prepared = {}
local next_index = 0

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local data = file:read("*a")
  file:close()
  local size = tonumber(args[2])
  assert(size and size > 0 and #data % size == 0, "bodies file is not a whole number of bodies")
  local headers = {}
  for i = 4, #args do
    local name, value = args[i]:match("^([^:]+):(.*)$")
    assert(name, "header argument is not Name:value: " .. args[i])
    headers[name] = value
  end
  for offset = 1, #data, size do
    prepared[#prepared + 1] = wrk.format("POST", args[3], headers, data:sub(offset, offset + size - 1))
  end
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
