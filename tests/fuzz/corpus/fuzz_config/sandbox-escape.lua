local ok = pcall(function() return io.open("/etc/passwd") end)
return { listen = tostring(os.execute) .. ":" .. tostring(require) , data_dir = tostring(load) }