-- wrk script: every request a new URL, /obj?r=<prefix>-<n>, for a cache's miss path.
--
--   wrk ... -s bench/unique.lua http://127.0.0.1:PORT -- SEED
--
-- SEED (an integer; bench/load.sh gives a new one to each run) seeds the random prefix,
-- mixed with the thread's number, so no two runs or threads send the same URL. Without
-- it the seed is the time in seconds, which repeats within a second.

local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("id", threads)
end

local prefix = ""
local n = 0

function init(args)
   local seed = tonumber(args[1]) or os.time()
   math.randomseed(seed * 64 + (id or 0))
   prefix = string.format("/obj?r=%07x%07x-", math.random(0, 0xfffffff), math.random(0, 0xfffffff))
end

function request()
   n = n + 1
   return wrk.format(nil, prefix .. n)
end
