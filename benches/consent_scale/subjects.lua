-- wrk script: each request reads /payments/u{n}/2026-01.json for a random subject n of
-- 0..N-1 (env CONSENTS), drawn uniformly or by Zipf(1.1) (env DIST = uniform | zipf), as the
-- bureau (X-Purpose: credit_scoring). Zipf: the continuous approximation of its distribution
-- function inverted, ranks scattered over the subjects by a multiplication modulo N (as the
-- in-process bench does).
local n = tonumber(os.getenv("CONSENTS") or "10000000")
local zipf = os.getenv("DIST") == "zipf"
local s = 1.1
local h_max = ((n + 1) ^ (1 - s) - 1) / (1 - s)
local spread = 2654435761 % n
if spread % 2 == 0 then spread = spread + 1 end
local counter = 0

wrk.headers["X-Purpose"] = "credit_scoring"

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter * 7919 + os.time())
end

function init(args)
  math.randomseed(seed)
end

-- (a * b) % m without losing precision in doubles: a and b below 2^32, m below 2^31.
local function mulmod(a, b, m)
  local hi, lo = math.floor(b / 65536), b % 65536
  return ((a * hi % m) * 65536 + a * lo) % m
end

function request()
  local i
  if zipf then
    local u = math.random() * h_max
    local x = (1 + u * (1 - s)) ^ (1 / (1 - s))
    local rank = math.floor(x)
    if rank < 1 then rank = 1 elseif rank > n then rank = n end
    i = mulmod(rank - 1, spread, n)
  else
    i = math.random(0, n - 1)
  end
  return wrk.format("GET", "/payments/u" .. i .. "/2026-01.json")
end
