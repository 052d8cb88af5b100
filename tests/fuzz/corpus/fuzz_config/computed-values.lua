local t = {}
for i = 1, 3 do t[#t + 1] = "tok" .. i end
return { inbound = { tokens = t, max_events = 10 * 10 }, listen = ("0.0.0.0:" .. 8080) }