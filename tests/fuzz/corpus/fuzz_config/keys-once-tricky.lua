-- listen = 1, listen = 2
--[==[ http = {}, http = {} ]==]
local s = [=[ a = 1, a = 2 ]=] .. 'b = 1, b = "2"\'' .. "c = 1, c = \"2\""
local function f(x) local a = 1; a = 2; repeat a = a + 1 until a > 3; return { a = a } end
return {
  http = { threads = 2, timeout_s = (function() local t = 5; t = 6; for i = 1, 2 do t = t end return t end)() },
  retry = { base_ms = 100, max_ms = 1 <= 2 and 60000 or 1, ["max_age_s"] = 0x1p4 * 1e+1 },
  log = { level = "info"; format = "logfmt" },
}
