-- listen = 1 in a comment
local x = "listen" return { listen = 2, ["listen"] = 3 }