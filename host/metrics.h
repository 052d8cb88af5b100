/*
 * metrics: process-wide counters and histograms, rendered in the Prometheus text
 * format for GET /metrics. Updates are lock-free atomics, cheap enough for the
 * per-request path; nothing here is per event unless batched by the caller.
 *
 * Gauges that live elsewhere (queue depth, paused feeds) are supplied at render
 * time through metrics_gauge callbacks.
 */
#ifndef TRIBUTARY_METRICS_H
#define TRIBUTARY_METRICS_H

#include "record.h"
#include "util.h"

#include <stdint.h>

enum counter {
    M_EVENTS_RECEIVED,  /* events in accepted (2xx) requests */
    M_EVENTS_QUEUED,    /* stored for delivery */
    M_EVENTS_DUPLICATE, /* seen before within the dedup window */
    M_EVENTS_MOVED, /* held on a feed without credentials, moved where the rules now send them */
    M_RULE_RELOADS,
    M_RULE_RELOAD_FAILURES,
    M_RULE_STATE_REBUILDS,
    M_RULE_ENGINE_FAILURES, /* an engine for the rules in force failed to build */
    M_RULE_PRINTS_DROPPED,  /* print() lines of rules over the log's limit */
    M_AUTH_FAILURES,        /* POST /currents */
    M_AUTH_THROTTLED,
    M_ADMIN_AUTH_FAILURES,      /* POST /admin/reload without admin.token */
    M_METRICS_AUTH_FAILURES,    /* GET /metrics without metrics.token */
    M_WORKSPACE_REFUSED,        /* a `?workspace=` not taken (see config_workspace_problem) */
    M_HTTP_SERVER_REFUSED,      /* answered by libmicrohttpd itself (431, 414, ...) */
    M_HTTP_CONNECTIONS_REFUSED, /* closed at http.max_connections */
    M_HTTP_CONNECTIONS_REFUSED_PER_IP, /* closed at http.max_connections_per_ip */
    M_HTTP_REQUESTS_TIMED_OUT,         /* cut off at http.request_timeout_s or http.timeout_s */
    M_HTTP_REQUESTS_ABANDONED,         /* their client closed the connection before the answer */
    M_HTTP_REFUSED_BODIES_CUT, /* a refused request's body went on past what is read of it */
    M_HTTP_UNKNOWN_PATH,       /* answered 404 */
    M_TLS_HANDSHAKE_FAILURES,  /* connections closed in their TLS handshake */
    M_COUNTER_COUNT
};

enum dead_reason_index {
    MD_RULE_ERROR,
    MD_RULE_LIMIT,
    MD_INVALID_OUTPUT,
    MD_REJECTED,
    MD_MAX_AGE,
    MD_FAILING,
    MD_COUNT
};

void metrics_add(enum counter c, uint64_t n);
void metrics_add_dropped(enum drop_reason r, uint64_t n);
void metrics_add_dead(const char *reason, uint64_t n); /* reason: one of DEAD_* */
/* Inbound Currents requests by status code, and their latency. */
void metrics_inbound(int status, double seconds);
/* Time spent in the rules for one request. */
void metrics_rules_time(double seconds);
/* Outbound to mParticle: one request answered `status` (0: transport failure),
 * carrying `batches` batches and `events` events. */
void metrics_outbound(enum feed f, int status, uint64_t batches, uint64_t events);
void metrics_delivered(enum feed f, uint64_t events);
/* Events put in batches whose custom event name came past mParticle's limit
 * of unique names: accepted (202) and dropped by mParticle. */
void metrics_past_name_limit(enum feed f, uint64_t events);
void metrics_retry(enum feed f);
/* Counters by a name known only as it comes: at most METRICS_NAMES names
 * each (of at most METRICS_NAME_MAX bytes); later names count together under
 * the empty name. */
#define METRICS_NAMES 32
#define METRICS_NAME_MAX 128
/* A named counter a rule increments with tributary.count(name, n). */
void metrics_rule_count(const char *name, uint64_t n);
/* Events in an accepted request that named this workspace (?workspace=). */
void metrics_workspace_events(const char *workspace, uint64_t n);

/* Events mapped by a rule version (the most recent METRICS_VERSIONS versions). */
#define METRICS_VERSIONS 8
void metrics_mapped(const char *rules_version, uint64_t events);

uint64_t metrics_get(enum counter c);
uint64_t metrics_get_dropped(enum drop_reason r);
uint64_t metrics_get_dead(const char *reason);

/* Gauges supplied by the running service at render time. */
struct metrics_gauges {
    int64_t queue_depth[FEED_COUNT];
    double oldest_age_s[FEED_COUNT];
    int paused[FEED_COUNT];         /* 0 sending, 1 no credentials, 2 refused by mParticle */
    int send_failures[FEED_COUNT];  /* failed rounds in a row (see sender_status) */
    double resume_in_s[FEED_COUNT]; /* until a feed waiting out a backoff or a 429 sends */
    double send_rate[FEED_COUNT];   /* batches a second a feed allows itself */
    double account_rate;            /* the same for all feeds together */
    int64_t dead_letters;
    int64_t requeued;        /* see queue_gauges */
    int64_t letters_removed; /* see queue_gauges */
    int64_t queue_commits;
    int64_t queue_operations;
    int64_t dedup_ids;
    int64_t dedup_bytes;
    int64_t disk_free_bytes;   /* see queue_gauges; -1: not read */
    int64_t min_free_bytes;    /* queue.min_free_mb */
    int64_t event_names;       /* see event_names.h */
    int64_t event_names_limit; /* mparticle.event_names_limit */
    int ready;
    int64_t tls_not_after; /* UNIX seconds; 0 without TLS */
    int64_t request_body_bytes;
    int reload_ok;            /* see reload_status */
    int64_t reload_loaded_ms; /* UNIX milliseconds */
    const char *rules_version;
};

/* When the service started (UNIX milliseconds), for tributary_start_time_seconds. */
void metrics_set_start_time(int64_t unix_ms);

/* Appends the exposition text. */
int metrics_render(buf *out, const struct metrics_gauges *g) WUR;

#endif
