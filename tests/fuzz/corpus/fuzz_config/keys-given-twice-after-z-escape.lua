return {
  log = { format = "log\z
     fmt", level = "info" },
  http = { threads = 2 },
  http = { timeout_s = 5 },
}
