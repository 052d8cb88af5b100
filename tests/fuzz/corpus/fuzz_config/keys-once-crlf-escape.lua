local t = { a = "x\
y" }
local x, a = 1, 2
return { http = { threads = x + a } }
