-- wrk script: a video-like access pattern, 16 KiB ranges of one 256 KiB object at random
-- offsets (a player seeking), for edge-filter's Range answers from a stored 200.
--
--   wrk ... -s bench/ranges.lua http://127.0.0.1:PORT/big -- SEED

local chunk = 16384
local chunks = 16

function init(args)
   math.randomseed((tonumber(args[1]) or os.time()) * 64 + (id or 0))
end

function request()
   local first = math.random(0, chunks - 1) * chunk
   return wrk.format(nil, nil, { Range = string.format("bytes=%d-%d", first, first + chunk - 1) })
end
