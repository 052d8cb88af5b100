return {
  listen = "127.0.0.1:9090", data_dir = "./var", rules_dir = "./rules", environment = "development",
  inbound = { tokens = { "t-one", "t-two" }, hmac_secrets = "s1, s2", require = "either",
              replay_window_s = 300, max_body_bytes = 1048576, max_events = 500 },
  mparticle = { url = "http://127.0.0.1:8081", ca_bundle = "/etc/ssl/certs/ca-certificates.crt" },
  feeds = {
    ios = { key = "k", secret = "s", url = "https://s2s.eu1.mparticle.com", rate_limit = 100 },
    android = { key = "k2", secret = os.getenv("HOME") or "x" },
    web = { rate_limit = 1 }, unbound = { url = "http://[::1]:8081/" },
  },
  events = { "users.messages.email.Open", "users_canvas_abort" },
  apps = { ["11111111-2222-4333-8444-555555555555"] = "ios", other = "unbound" },
  batch = { linger_ms = 0 }, retry = { base_ms = 10, max_ms = 20, max_age_s = 60, pause_ms = 100 },
  queue = { sync = "normal", max_depth = 10 }, dedup = { window_s = 0 },
  http = { threads = 2, max_connections = 8, timeout_s = 5, request_timeout_s = 10, max_connections_per_ip = 4 },
  tls = { cert = "/tmp/c.pem", key = "/tmp/k.pem" },
  rules = { memory_mb = 8, instructions = 1000 }, log = { level = "debug", format = "json" },
  admin = { token = "adm" },
}