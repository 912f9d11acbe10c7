-- wrk script: one POST /v1/wallet/balance_transfer per request, each with a fresh UUID
-- transaction id, between random accounts lg-0000000 .. lg-(ACCOUNTS-1), which
-- `wallet loadgen --setup --accounts N` opens and funds. Used by tools/bench:
--   ACCOUNTS=10000 wrk -t1 -c64 -d10s -s tools/wrk-transfer.lua http://127.0.0.1:18180
local accounts = tonumber(os.getenv("ACCOUNTS") or "10000")
local counter = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tag", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (tag or 0))
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  counter = counter + 1
  local from = math.random(0, accounts - 1)
  local to = (from + math.random(1, accounts - 1)) % accounts
  -- Version-4 shaped; the thread tag and a per-thread counter keep ids unique within a run.
  local id = string.format("%08x-%04x-4%03x-8%03x-%04x%08x", math.random(0, 0x7fffffff), tag or 0,
    math.random(0, 0xfff), math.random(0, 0xfff), math.random(0, 0xffff), counter)
  local body = string.format(
    '{"from_account":"lg-%07d","to_account":"lg-%07d","amount":"0.01","currency":"USD","transaction_id":"%s"}',
    from, to, id)
  return wrk.format(nil, "/v1/wallet/balance_transfer", nil, body)
end

done = function(summary, latency, requests)
  -- Anything but 200 (a 422, a 503) counts here: a run with errors is not a throughput figure.
  io.write(string.format("non-2xx responses: %d, socket errors: %d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
