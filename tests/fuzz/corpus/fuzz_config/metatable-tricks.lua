local t = setmetatable({}, { __index = function() error("x") end, __pairs = function() error("y") end })
return t