-- tributary configuration. Every value below is the built-in default, so this
-- file changes nothing until you edit it. Any key can also be set from the
-- environment: TRIBUTARY_ + the key path in capitals with _ for ., for example
-- TRIBUTARY_FEEDS_IOS_KEY or TRIBUTARY_BATCH_LINGER_MS. The environment wins.
-- TRIBUTARY_<KEY>_FILE=path reads the value from a file instead, again at
-- every reload (the environment itself stays as it was at start).
--
-- Keep secrets out of this file: pass them as environment variables or files,
-- or read them here with os.getenv("NAME").
return {
  listen = "127.0.0.1:8080",  -- a non-loopback address requires inbound.tokens or hmac_secrets
  data_dir = "./var",         -- the SQLite queue and dead-letter store
  rules_dir = "./rules",      -- *.lua files, run in name order
  environment = "production", -- or "development": sent with every batch

  inbound = {
    -- Bearer tokens Braze may present (several during a rotation), e.g.
    -- tokens = { os.getenv("BRAZE_CURRENTS_TOKEN") },
    -- Secrets for signed requests (Tributary-Signature), e.g.
    -- hmac_secrets = { os.getenv("TRIBUTARY_HMAC_SECRET") },
    require = "either",       -- token or signature; or "token", "signature", "both"
    replay_window_s = 300,
    max_body_bytes = 16 * 1024 * 1024,
    max_events = 10000,       -- events in one request; beyond: 413, Braze splits
    -- body_memory_mb = 256,  -- request bodies held at once (unset: 256, or twice
                              -- max_body_bytes if more); beyond: 503, Braze retries
    -- Braze workspaces sharing this endpoint, each posting to /currents?workspace=NAME;
    -- a request naming another, or none, gets 503 and Braze retries (empty: any), e.g.
    -- workspaces = { "brand-a", "brand-b" },
  },

  -- admin = { token = os.getenv("TRIBUTARY_ADMIN_TOKEN") },  -- enables POST /admin/reload
  -- metrics = { token = os.getenv("TRIBUTARY_METRICS_TOKEN") },  -- GET /metrics needs it
  -- tls = { cert = "/etc/tributary/tls/fullchain.pem", key = "/etc/tributary/tls/privkey.pem" },

  mparticle = {
    url = "https://s2s.mparticle.com", -- or https://s2s.us2|eu1|au1.mparticle.com
    rate_limit = 270,                   -- batches/s, all feeds together (the account's limit)
    -- event_names_limit = 1000,        -- the workspace's unique event names, warned of at 90%
    -- ca_bundle = "/etc/tributary/egress-ca.pem", -- PEM CAs to verify mParticle (unset: system store)
  },

  -- One mParticle input per feed, each with its own server-to-server key and
  -- secret (and optionally its own pod url, and rate_limit: batches/s, 270 by
  -- default). A feed without credentials holds its events until they are configured.
  feeds = {
    -- ios     = { key = os.getenv("MP_IOS_KEY"),     secret = os.getenv("MP_IOS_SECRET") },
    -- android = { key = os.getenv("MP_ANDROID_KEY"), secret = os.getenv("MP_ANDROID_SECRET") },
    -- web     = { key = os.getenv("MP_WEB_KEY"),     secret = os.getenv("MP_WEB_SECRET") },
    -- unbound = { key = os.getenv("MP_UNBOUND_KEY"), secret = os.getenv("MP_UNBOUND_SECRET") },
  },

  -- Forward only these event types (default: all 54 the rules map), e.g.
  -- events = { "users.messages.email.Open", "users.messages.pushnotification.Send" },

  -- app_id -> platform, for events without properties.platform (uninstalls):
  apps = {
    -- ["11111111-2222-4333-8444-555555555555"] = "ios",
  },

  batch = { linger_ms = 500 },  -- events of one user within this time share a batch
  retry = {
    base_ms = 1000, max_ms = 300000, -- exponential backoff with full jitter
    max_age_s = 172800,              -- then the dead-letter store (48 hours)
    pause_ms = 120000,               -- probe a feed paused by 401/403 this often
    failing_s = 3600,                -- a batch failing alone this long: dead letter "failing"
  },
  queue = {
    sync = "full",            -- "normal" trades the last commits on power loss for speed
    max_depth = 5000000,      -- events; beyond it Braze gets 503 and retries later
    min_free_mb = 256,        -- free disk under which new events get 503 (sending goes on)
  },
  dedup = { window_s = 3600 },
  http = {
    threads = 8,              -- Lua states mapping requests at once
    max_connections = 1024, max_connections_per_ip = 0,
    timeout_s = 30,           -- idle connections
    request_timeout_s = 120,  -- a whole request, request line included, however slowly it arrives
    trusted_proxies = {},     -- load balancers on other hosts: their X-Forwarded-For names the client
  },
  rules = { memory_mb = 64, instructions = 1000000 }, -- limits per event
  log = { level = "info", format = "logfmt" },        -- or format = "json"
}
