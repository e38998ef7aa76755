-- wrk script for every row of the benchmark. Environment:
--   MODE     tokenize | tokenize_idempotent | detokenize | batch_tokenize | batch_detokenize | lookup
--   API_KEY  the caller's key (empty for the floor)
--   TOKENS   file with one token per line (detokenize modes)
--   BATCH    items per batch request (default 100)
-- Every request names a distinct customer (or token): no cache can flatter a row.
-- tokenize_idempotent sends a new Idempotency-Key with each: every one is a first claim, never a replay.
local mode = os.getenv("MODE") or "tokenize"
local batch = tonumber(os.getenv("BATCH") or "100")
local tokens = {}
local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  wrk.headers["Content-Type"] = "application/json"
  local key = os.getenv("API_KEY")
  if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
  local path = os.getenv("TOKENS")
  if path and path ~= "" then
    for line in io.lines(path) do table.insert(tokens, line) end
  end
  -- threads start at different places in the token list
  counter = id * 7919
  math.randomseed(os.time() + id)
  run = string.format("%d%d", os.time() % 100000, math.random(1000, 9999))
end

local function item()
  counter = counter + 1
  return string.format('{"customer_id":"c%s-%d-%d","data_type":"DriverLicense","value":"D1234-56789-%05d"}',
    run, id, counter, counter % 100000)
end

local function next_token()
  counter = counter + 1
  return tokens[(counter % #tokens) + 1]
end

function request()
  if mode == "tokenize" then
    return wrk.format("POST", "/v1/tokens", nil, item())
  elseif mode == "tokenize_idempotent" then
    local body = item()
    -- Unique as the customer is: run (start second and a random number), thread, counter; the
    -- bench's wrk runs last a second or more, one after another. Set on this thread's own
    -- wrk.headers: a headers table passed to wrk.format would replace them.
    wrk.headers["Idempotency-Key"] = string.format("bench-%s-%d-%d", run, id, counter)
    return wrk.format("POST", "/v1/tokens", nil, body)
  elseif mode == "detokenize" then
    return wrk.format("GET", "/v1/tokens/" .. next_token(), nil, nil)
  elseif mode == "lookup" then
    -- The values make_tokens stored (D-00000 .. D-00499, each for several customers): every
    -- lookup finds the same number of records, whatever else the table holds.
    counter = counter + 1
    return wrk.format("POST", "/v1/tokens/lookup", nil,
      string.format('{"data_type":"DriverLicense","value":"D-%05d"}', counter % 500))
  elseif mode == "batch_tokenize" then
    local items = {}
    for i = 1, batch do items[i] = item() end
    return wrk.format("POST", "/v1/tokens/batch", nil, '{"items":[' .. table.concat(items, ",") .. ']}')
  else
    local list = {}
    for i = 1, batch do list[i] = '"' .. next_token() .. '"' end
    return wrk.format("POST", "/v1/tokens/detokenize", nil, '{"tokens":[' .. table.concat(list, ",") .. ']}')
  end
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"socket_errors":%d,"status_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
