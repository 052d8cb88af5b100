/*
 * config: the service configuration, from a Lua file that returns a table and
 * from TRIBUTARY_* environment variables (which win). Every key has a default,
 * a type and, except `apps`, an environment variable: TRIBUTARY_ plus the key
 * path in capitals with '_' for '.', e.g. batch.linger_ms -> TRIBUTARY_BATCH_LINGER_MS.
 * TRIBUTARY_<KEY>_FILE instead names a file holding the value, read at every
 * load: a secret replaced in that file takes effect on a reload, where the
 * process's own environment cannot change.
 *
 * Unknown keys and wrong types are errors naming the file and line; values
 * found wrong once all are read name it too, or the variable that gave them.
 * Values of secret keys (tokens, keys, secrets) never appear in messages.
 *
 * A loaded config is immutable and reference counted, so a reload can swap it
 * while requests still hold the old one.
 */
#ifndef TRIBUTARY_CONFIG_H
#define TRIBUTARY_CONFIG_H

#include "record.h"
#include "util.h"

#include <stdatomic.h>
#include <stdint.h>

#define CONFIG_DEFAULT_FILE "tributary.conf.lua"

struct feed_config {
    char *key;          /* NULL when not configured */
    char *secret;       /* NULL when not configured */
    char *url;          /* base URL; NULL means mparticle.url */
    int64_t rate_limit; /* batches per second */
};

struct app_entry {
    char *app_id;
    enum feed feed;
};

/* An IPv4 or IPv6 network: addr/prefix (an address alone: all its bits). */
struct ip_net {
    int family; /* AF_INET, AF_INET6 */
    unsigned char addr[16];
    int prefix;
};

struct string_list {
    char **items;
    size_t n;
};

/* Room for every key (config.c checks it). */
#define CONFIG_KEYS_MAX 64

struct config {
    _Atomic int refs;
    char *file;     /* the file read, NULL when running on defaults */
    char *warnings; /* newline-separated notes for the log, or NULL */
    /* per key: a fingerprint of the value the file gave (or the default),
     * whether the environment set it instead (1 its variable, 2 its
     * TRIBUTARY_<KEY>_FILE), and whether the file gave it a value of its own
     * that the environment's overrides (see config_shadowed_changes) */
    uint64_t file_value[CONFIG_KEYS_MAX];
    unsigned char from_env[CONFIG_KEYS_MAX];
    unsigned char overridden[CONFIG_KEYS_MAX];

    char *listen;
    char *data_dir;
    char *rules_dir;
    char *environment;
    struct string_list inbound_tokens;
    struct string_list inbound_hmac_secrets;
    char *inbound_require; /* token, signature, either, both */
    int64_t inbound_replay_window_s;
    int64_t inbound_max_body_bytes;
    int64_t inbound_body_memory_mb; /* request bodies held at once, all requests together */
    int64_t inbound_max_events;
    /* names the `?workspace=` of a request may give; n == 0: any */
    struct string_list inbound_workspaces;
    char *mparticle_url;
    int64_t mparticle_rate_limit; /* batches per second, all feeds together (the account) */
    /* mParticle's unique event names per workspace (see event_names.h) */
    int64_t mparticle_event_names_limit;
    struct feed_config feeds[FEED_COUNT];
    struct string_list events; /* n == 0: every type the rules map */
    struct app_entry *apps;
    size_t napps;
    int64_t batch_linger_ms;
    int64_t retry_base_ms;
    int64_t retry_max_ms;
    int64_t retry_max_age_s;
    int64_t retry_failing_s;
    int64_t retry_pause_ms;
    char *queue_sync;
    int64_t queue_max_depth;
    int64_t queue_min_free_mb;
    int64_t dedup_window_s;
    int64_t http_threads;
    int64_t http_max_connections;
    int64_t http_timeout_s;
    int64_t rules_memory_mb;
    int64_t rules_instructions;
    char *log_level;
    char *log_format;
    char *admin_token;
    char *metrics_token; /* GET /metrics needs it when set */
    char *tls_cert;      /* PEM file paths; both or neither */
    char *tls_key;
    char *mparticle_ca_bundle;
    int64_t http_request_timeout_s;
    int64_t http_max_connections_per_ip;
    /* peers (addresses or CIDR networks) whose last X-Forwarded-For entry is
     * the client, as a loopback peer's is: a load balancer on another host */
    struct string_list http_trusted_proxies;
    struct ip_net *trusted_nets; /* the same, parsed */
    size_t ntrusted_nets;
};

/* Loads `path`, or ./tributary.conf.lua when path is NULL and that file exists,
 * else the defaults; then applies the environment. On error returns -1 and
 * writes one message per line into err. Caller releases with config_unref. */
int config_load(struct config **out, const char *path, char *err, size_t errlen) WUR;
/* config_load for a reload: the environment is the one the service started
 * with, checked then, so a TRIBUTARY_* variable the file no longer names is a
 * warning, not an error that no reload could mend. */
int config_load_again(struct config **out, const char *path, char *err, size_t errlen) WUR;

/* config_load for a one-shot command: errors and warnings go to stderr. NULL on
 * error. Without serving, what only `serve` needs is not checked (inbound
 * credentials for the listen address): dlq and queue commands run with the
 * service's file where its secrets come from the service's environment. */
struct config *config_load_for_command(const char *path, int serving);

/* The same from a configuration text in memory (name is used in messages),
 * without the environment: for tests and fuzzing. */
int config_load_source(struct config **out, const char *name, const char *src, size_t len,
                       char *err, size_t errlen) WUR;

/* The keys whose value in the configuration file changed from old to neu, to
 * a value of the file's own (not the default, not the environment's) that the
 * environment overrides in neu, so the change has no effect: their names,
 * comma-separated, in out (truncated to fit). Returns how many. Taking a key
 * out of the file, or giving it the environment's value, is no such change. */
size_t config_shadowed_changes(const struct config *old, const struct config *neu, char *out,
                               size_t outlen);

struct config *config_ref(struct config *c);
void config_unref(struct config *c);

/* Feeds that have both key and secret. */
int config_feed_ready(const struct config *c, enum feed f);
const char *config_feed_url(const struct config *c, enum feed f);

/* Splits `listen` into host and port; 0 or -1. */
int config_listen_addr(const struct config *c, char *host, size_t hostlen, int *port) WUR;
int config_host_is_loopback(const char *host);
/* Why a request's `?workspace=`, len bytes at name (NULL or 0: none), is not
 * taken, or NULL when it is: none, or UTF-8 of at most CONFIG_WORKSPACE_MAX
 * bytes without control characters (NUL included); when inbound.workspaces
 * is set, one of them. */
#define CONFIG_WORKSPACE_MAX 128
const char *config_workspace_problem(const struct config *c, const char *name, size_t len);

/* Whether the peer address (text) may name the client in X-Forwarded-For: a
 * loopback address or one of http.trusted_proxies. */
int config_proxy_trusted(const struct config *c, const char *peer);

#endif
