return {
  feeds = {
    ios = { key = "k", secret = "s",
            key = "k2" },
  },
  http = { threads = 2 }, http = { timeout_s = 3 },
}
