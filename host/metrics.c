#include "metrics.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#ifndef TRIBUTARY_VERSION
#define TRIBUTARY_VERSION "dev"
#endif

/* Status codes tracked one by one; the rest count under their class ("4xx"),
 * and anything outside 100-599 under "other". */
static const int INBOUND_CODES[] = {200, 400, 401, 403, 404, 405, 411,
                                    431, 413, 415, 429, 500, 501, 503};
static const int OUTBOUND_CODES[] = {0, 202, 400, 401, 403, 413, 429, 500, 502, 503, 504};
static const char *const CODE_CLASSES[] = {"1xx", "2xx", "3xx", "4xx", "5xx", "other"};
#define NINBOUND (ARRAY_LEN(INBOUND_CODES) + ARRAY_LEN(CODE_CLASSES))
#define NOUTBOUND (ARRAY_LEN(OUTBOUND_CODES) + ARRAY_LEN(CODE_CLASSES))

static const double BUCKETS[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                 0.1,    0.25,  0.5,    1,     2.5,  5,     10};
#define NBUCKETS (ARRAY_LEN(BUCKETS))

struct histogram {
    _Atomic uint64_t buckets[NBUCKETS + 1];
    _Atomic uint64_t count;
    _Atomic uint64_t sum_us;
};

_Static_assert(MD_COUNT == DEAD_REASON_COUNT, "one counter per dead-letter reason");

/* Counters by names that come as the service runs (see METRICS_NAMES). */
struct named {
    _Atomic uint64_t counts[METRICS_NAMES + 1]; /* the last: names past the first ones */
    char names[METRICS_NAMES][METRICS_NAME_MAX + 1];
    _Atomic int used;
    _Atomic int lock;
};

static struct {
    _Atomic uint64_t counters[M_COUNTER_COUNT];
    _Atomic uint64_t dropped[DROP_REASON_COUNT];
    _Atomic uint64_t dead[MD_COUNT];
    _Atomic uint64_t inbound[NINBOUND];
    struct histogram inbound_time;
    struct histogram rules_time;
    _Atomic uint64_t out_requests[FEED_COUNT][NOUTBOUND];
    _Atomic uint64_t out_batches[FEED_COUNT][NOUTBOUND];
    _Atomic uint64_t delivered[FEED_COUNT];
    _Atomic uint64_t past_name_limit[FEED_COUNT];
    _Atomic uint64_t retries[FEED_COUNT];
    struct named rule_counts;
    struct named workspace_events;
    pthread_mutex_t versions_mu;
    struct {
        char version[24];
        uint64_t events;
        uint64_t last_use;
    } versions[METRICS_VERSIONS];
    uint64_t versions_clock;
} M = {.versions_mu = PTHREAD_MUTEX_INITIALIZER};

static const char *const COUNTER_HELP[M_COUNTER_COUNT][3] = {
    {"tributary_events_received_total", "counter", "Events in accepted inbound requests."},
    {"tributary_events_queued_total", "counter", "Events mapped and stored for delivery."},
    {"tributary_events_duplicate_total", "counter",
     "Events acknowledged but not stored again (same id within the dedup window)."},
    {"tributary_events_moved_total", "counter",
     "Events held on a feed without credentials, moved to the feed the rules route them to "
     "after a change of rules or credentials."},
    {"tributary_rule_reloads_total", "counter", "Rule sets loaded and put in force."},
    {"tributary_rule_reload_failures_total", "counter",
     "Rule reloads refused because the new rules failed validation or their tests."},
    {"tributary_rule_state_rebuilds_total", "counter",
     "Worker Lua states rebuilt after a rule hit a limit or a state outgrew rules.memory_mb."},
    {"tributary_rule_engine_failures_total", "counter",
     "Engines for the rules in force that failed to build: the previous rules map meanwhile."},
    {"tributary_rule_prints_dropped_total", "counter",
     "Lines rules wrote with print() that were left out of the log: over 20 a second."},
    {"tributary_auth_failures_total", "counter",
     "Inbound requests (POST /currents) refused for authentication."},
    {"tributary_auth_throttled_total", "counter",
     "Requests refused (429) because their address failed authentication repeatedly."},
    {"tributary_admin_auth_failures_total", "counter",
     "POST /admin/reload refused (401) for want of the admin token."},
    {"tributary_metrics_auth_failures_total", "counter",
     "GET /metrics refused (401) for want of the metrics token."},
    {"tributary_workspace_refused_total", "counter",
     "Inbound requests refused (503) for their ?workspace=: not one of inbound.workspaces, none "
     "while that list is set, malformed, or given twice with different names."},
    {"tributary_http_server_refused_total", "counter",
     "Requests the HTTP server answered with an error itself, before tributary read them: a "
     "request line or headers too large (414, 431) or malformed (400, 505)."},
    {"tributary_http_connections_refused_total", "counter",
     "Connections closed as they came because http.max_connections were open."},
    {"tributary_http_connections_refused_per_ip_total", "counter",
     "Connections closed as they came because http.max_connections_per_ip were open from their "
     "address."},
    {"tributary_http_requests_timed_out_total", "counter",
     "Requests cut off, their connection closed, because they had not arrived whole within "
     "http.request_timeout_s, or their client sent nothing for http.timeout_s."},
    {"tributary_http_requests_abandoned_total", "counter",
     "Requests whose client closed the connection before their answer, most of them in the "
     "middle of the body: nothing of them was stored, and Braze sends them again."},
    {"tributary_http_refused_bodies_cut_total", "counter",
     "Refused requests (413, 401, 415, 503) whose body of unknown length (chunked) went on past "
     "what is read before their answer: their connection closed, unanswered."},
    {"tributary_http_unknown_path_total", "counter",
     "Requests for a path tributary does not serve, answered 404 (Braze's connector posts to "
     "/currents)."},
    {"tributary_tls_handshake_failures_total", "counter",
     "Connections closed in their TLS handshake: a client that does not trust the certificate, "
     "plain HTTP sent to the HTTPS port, or a TCP connection closed without one (a health "
     "check)."},
};

void metrics_add(enum counter c, uint64_t n)
{
    atomic_fetch_add_explicit(&M.counters[c], n, memory_order_relaxed);
}

void metrics_add_dropped(enum drop_reason r, uint64_t n)
{
    atomic_fetch_add_explicit(&M.dropped[r], n, memory_order_relaxed);
}

static int dead_index(const char *reason)
{
    for (int i = 0; i < MD_COUNT; i++) {
        if (strcmp(DEAD_REASONS[i], reason) == 0)
            return i;
    }
    return MD_RULE_ERROR;
}

void metrics_add_dead(const char *reason, uint64_t n)
{
    atomic_fetch_add_explicit(&M.dead[dead_index(reason)], n, memory_order_relaxed);
}

static void observe(struct histogram *h, double seconds)
{
    size_t i = 0;
    while (i < NBUCKETS && seconds > BUCKETS[i])
        i++;
    atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, (uint64_t)(seconds * 1e6), memory_order_relaxed);
}

static size_t code_index(const int *codes, size_t n, int status)
{
    for (size_t i = 0; i < n; i++) {
        if (codes[i] == status)
            return i;
    }
    return status >= 100 && status < 600 ? n + (size_t)(status / 100 - 1)
                                         : n + ARRAY_LEN(CODE_CLASSES) - 1;
}

void metrics_inbound(int status, double seconds)
{
    atomic_fetch_add_explicit(
        &M.inbound[code_index(INBOUND_CODES, ARRAY_LEN(INBOUND_CODES), status)], 1,
        memory_order_relaxed);
    observe(&M.inbound_time, seconds);
}

void metrics_rules_time(double seconds)
{
    observe(&M.rules_time, seconds);
}

void metrics_outbound(enum feed f, int status, uint64_t batches, uint64_t events)
{
    (void)events;
    size_t i = code_index(OUTBOUND_CODES, ARRAY_LEN(OUTBOUND_CODES), status);
    atomic_fetch_add_explicit(&M.out_requests[f][i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&M.out_batches[f][i], batches, memory_order_relaxed);
}

void metrics_delivered(enum feed f, uint64_t events)
{
    atomic_fetch_add_explicit(&M.delivered[f], events, memory_order_relaxed);
}

void metrics_past_name_limit(enum feed f, uint64_t events)
{
    atomic_fetch_add_explicit(&M.past_name_limit[f], events, memory_order_relaxed);
}

void metrics_retry(enum feed f)
{
    atomic_fetch_add_explicit(&M.retries[f], 1, memory_order_relaxed);
}

static void named_add(struct named *set, const char *name, uint64_t n)
{
    int used = atomic_load(&set->used);
    for (int i = 0; i < used; i++) {
        if (strcmp(set->names[i], name) == 0) {
            atomic_fetch_add_explicit(&set->counts[i], n, memory_order_relaxed);
            return;
        }
    }
    /* New names are rare: claim a slot under a simple spin on the set. */
    while (atomic_exchange(&set->lock, 1))
        ;
    used = atomic_load(&set->used);
    int slot = METRICS_NAMES;
    for (int i = 0; i < used; i++) {
        if (strcmp(set->names[i], name) == 0)
            slot = i;
    }
    if (slot == METRICS_NAMES && used < METRICS_NAMES && strlen(name) <= METRICS_NAME_MAX) {
        str_copy(set->names[used], sizeof set->names[used], name);
        slot = used;
        atomic_store(&set->used, used + 1);
    }
    atomic_store(&set->lock, 0);
    atomic_fetch_add_explicit(&set->counts[slot], n, memory_order_relaxed);
}

void metrics_rule_count(const char *name, uint64_t n)
{
    named_add(&M.rule_counts, name, n);
}

void metrics_workspace_events(const char *workspace, uint64_t n)
{
    named_add(&M.workspace_events, workspace, n);
}

void metrics_mapped(const char *version, uint64_t events)
{
    pthread_mutex_lock(&M.versions_mu);
    int slot = -1, oldest = 0;
    for (int i = 0; i < METRICS_VERSIONS; i++) {
        if (strcmp(M.versions[i].version, version) == 0) {
            slot = i;
            break;
        }
        if (M.versions[i].last_use < M.versions[oldest].last_use)
            oldest = i;
    }
    if (slot < 0) {
        /* a new version replaces the one used longest ago */
        slot = oldest;
        str_copy(M.versions[slot].version, sizeof M.versions[slot].version, version);
        M.versions[slot].events = 0;
    }
    M.versions[slot].events += events;
    M.versions[slot].last_use = ++M.versions_clock;
    pthread_mutex_unlock(&M.versions_mu);
}

uint64_t metrics_get(enum counter c)
{
    return atomic_load(&M.counters[c]);
}

uint64_t metrics_get_dropped(enum drop_reason r)
{
    return atomic_load(&M.dropped[r]);
}

uint64_t metrics_get_dead(const char *reason)
{
    return atomic_load(&M.dead[dead_index(reason)]);
}

/* ---- rendering ---------------------------------------------------------- */

static int header(buf *b, const char *name, const char *type, const char *help)
{
    return buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label's value, escaped as the text format asks (\\, \", \n). */
static int label_value(buf *b, const char *v)
{
    int rc = buf_addc(b, '"');
    for (; *v && rc == 0; v++) {
        if (*v == '\\' || *v == '"')
            rc = buf_addc(b, '\\') | buf_addc(b, *v);
        else if (*v == '\n')
            rc = buf_adds(b, "\\n");
        else
            rc = buf_addc(b, *v);
    }
    return rc | buf_addc(b, '"');
}

static int render_sample(buf *b, const char *metric, const char *label, const char *value,
                         uint64_t v)
{
    int rc = buf_printf(b, "%s{%s=", metric, label);
    rc |= label_value(b, value);
    return rc | buf_printf(b, "} %llu\n", (unsigned long long)v);
}

static int render_named(buf *b, const char *metric, const char *label, struct named *set)
{
    int rc = 0, used = atomic_load(&set->used);
    for (int i = 0; i < used; i++)
        rc |= render_sample(b, metric, label, set->names[i], atomic_load(&set->counts[i]));
    /* the names past METRICS_NAMES together, under an empty value, which no
     * name has */
    uint64_t rest = atomic_load(&set->counts[METRICS_NAMES]);
    if (rest)
        rc |= render_sample(b, metric, label, "", rest);
    return rc;
}

static int render_histogram(buf *b, const char *name, const char *help, struct histogram *h)
{
    int rc = header(b, name, "histogram", help);
    uint64_t cum = 0;
    for (size_t i = 0; i <= NBUCKETS; i++) {
        cum += atomic_load(&h->buckets[i]);
        if (i < NBUCKETS)
            rc |= buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, BUCKETS[i],
                             (unsigned long long)cum);
        else
            rc |= buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    }
    rc |= buf_printf(b, "%s_sum %.6f\n%s_count %llu\n", name, (double)atomic_load(&h->sum_us) / 1e6,
                     name, (unsigned long long)atomic_load(&h->count));
    return rc;
}

static void code_label(const int *codes, size_t n, size_t i, char *out, size_t outlen)
{
    if (i < n)
        str_printf(out, outlen, "%d", codes[i]);
    else
        str_copy(out, outlen, CODE_CLASSES[i - n]);
}

/* One counter family labelled by feed and by outbound status code. */
static int render_by_feed_and_code(buf *b, const char *name, const char *help,
                                   _Atomic uint64_t (*counters)[NOUTBOUND])
{
    int rc = header(b, name, "counter", help);
    for (int f = 0; f < FEED_COUNT; f++) {
        for (size_t i = 0; i < NOUTBOUND; i++) {
            char code[16];
            code_label(OUTBOUND_CODES, ARRAY_LEN(OUTBOUND_CODES), i, code, sizeof code);
            rc |= buf_printf(b, "%s{feed=\"%s\",code=\"%s\"} %llu\n", name, FEED_NAMES[f], code,
                             (unsigned long long)atomic_load(&counters[f][i]));
        }
    }
    return rc;
}

static int render_by_feed(buf *b, const char *name, const char *help,
                          const _Atomic uint64_t *counters)
{
    int rc = header(b, name, "counter", help);
    for (int f = 0; f < FEED_COUNT; f++)
        rc |= buf_printf(b, "%s{feed=\"%s\"} %llu\n", name, FEED_NAMES[f],
                         (unsigned long long)atomic_load(&counters[f]));
    return rc;
}

/* One metric of one integer value. */
static int render_int(buf *b, const char *name, const char *type, const char *help, long long v)
{
    return header(b, name, type, help) | buf_printf(b, "%s %lld\n", name, v);
}

static _Atomic int64_t start_ms;

void metrics_set_start_time(int64_t unix_ms)
{
    atomic_store(&start_ms, unix_ms);
}

int metrics_render(buf *b, const struct metrics_gauges *g)
{
    int rc = 0;
    rc |= header(b, "tributary_build_info", "gauge", "Version of the running tributary.");
    rc |= buf_printf(b, "tributary_build_info{version=\"%s\",rules_version=\"%s\"} 1\n",
                     TRIBUTARY_VERSION, g && g->rules_version ? g->rules_version : "");
    for (int c = 0; c < M_COUNTER_COUNT; c++) {
        rc |= header(b, COUNTER_HELP[c][0], COUNTER_HELP[c][1], COUNTER_HELP[c][2]);
        rc |= buf_printf(b, "%s %llu\n", COUNTER_HELP[c][0],
                         (unsigned long long)atomic_load(&M.counters[c]));
    }
    rc |= header(b, "tributary_events_filtered_total", "counter",
                 "Events not forwarded by design, by reason.");
    for (int r = 0; r < DROP_REASON_COUNT; r++) {
        if (r == DROP_NO_EXTERNAL_ID)
            continue;
        rc |= buf_printf(b, "tributary_events_filtered_total{reason=\"%s\"} %llu\n",
                         DROP_REASON_NAMES[r], (unsigned long long)atomic_load(&M.dropped[r]));
    }
    rc |= header(b, "tributary_events_skipped_total", "counter",
                 "Events not forwarded because the user has no external_user_id.");
    rc |= buf_printf(b, "tributary_events_skipped_total{reason=\"no_external_id\"} %llu\n",
                     (unsigned long long)atomic_load(&M.dropped[DROP_NO_EXTERNAL_ID]));
    rc |= header(b, "tributary_dead_letters_total", "counter",
                 "Events moved to the dead-letter store, by reason.");
    for (int r = 0; r < MD_COUNT; r++)
        rc |= buf_printf(b, "tributary_dead_letters_total{reason=\"%s\"} %llu\n", DEAD_REASONS[r],
                         (unsigned long long)atomic_load(&M.dead[r]));
    rc |= header(b, "tributary_http_requests_total", "counter",
                 "Answers on the path /currents (any method) by status.");
    for (size_t i = 0; i < NINBOUND; i++) {
        char code[16];
        code_label(INBOUND_CODES, ARRAY_LEN(INBOUND_CODES), i, code, sizeof code);
        rc |= buf_printf(b, "tributary_http_requests_total{code=\"%s\"} %llu\n", code,
                         (unsigned long long)atomic_load(&M.inbound[i]));
    }
    rc |=
        render_histogram(b, "tributary_http_request_duration_seconds",
                         "Time from a Currents request's arrival to its answer.", &M.inbound_time);
    rc |= render_histogram(b, "tributary_rules_duration_seconds",
                           "Time spent in the rules per inbound request.", &M.rules_time);

    rc |= render_by_feed_and_code(b, "tributary_mparticle_requests_total",
                                  "Requests to mParticle by feed and status (0: no answer).",
                                  M.out_requests);
    rc |= render_by_feed_and_code(b, "tributary_mparticle_batches_total",
                                  "Batches sent to mParticle by feed and status of their request.",
                                  M.out_batches);
    rc |= render_by_feed(b, "tributary_events_delivered_total",
                         "Events accepted by mParticle (202), by feed.", M.delivered);
    rc |= render_by_feed(b, "tributary_events_past_name_limit_total",
                         "Events put in batches whose event name came past mParticle's limit of "
                         "unique names (mparticle.event_names_limit): mParticle answers 202 for "
                         "them and drops them, so once sent they count as delivered too.",
                         M.past_name_limit);
    rc |= render_by_feed(b, "tributary_mparticle_retries_total",
                         "Requests to mParticle sent again after a failure, by feed.", M.retries);

    rc |= header(b, "tributary_events_mapped_total", "counter",
                 "Events mapped, by the rules version that mapped them (recent versions).");
    pthread_mutex_lock(&M.versions_mu);
    for (int i = 0; i < METRICS_VERSIONS; i++) {
        if (M.versions[i].version[0])
            rc |= buf_printf(b, "tributary_events_mapped_total{rules_version=\"%s\"} %llu\n",
                             M.versions[i].version, (unsigned long long)M.versions[i].events);
    }
    pthread_mutex_unlock(&M.versions_mu);

    rc |= header(b, "tributary_rule_counts_total", "counter",
                 "Counters incremented by rules with tributary.count(name).");
    rc |= render_named(b, "tributary_rule_counts_total", "name", &M.rule_counts);
    rc |= header(b, "tributary_workspace_events_total", "counter",
                 "Events in accepted inbound requests, by the workspace they named (?workspace=).");
    rc |= render_named(b, "tributary_workspace_events_total", "workspace", &M.workspace_events);

    if (g) {
        rc |= header(b, "tributary_queue_depth", "gauge", "Events waiting for delivery, by feed.");
        for (int f = 0; f < FEED_COUNT; f++)
            rc |= buf_printf(b, "tributary_queue_depth{feed=\"%s\"} %lld\n", FEED_NAMES[f],
                             (long long)g->queue_depth[f]);
        rc |= header(b, "tributary_queue_oldest_age_seconds", "gauge",
                     "Age of the oldest undelivered event, by feed.");
        for (int f = 0; f < FEED_COUNT; f++)
            rc |= buf_printf(b, "tributary_queue_oldest_age_seconds{feed=\"%s\"} %.3f\n",
                             FEED_NAMES[f], g->oldest_age_s[f]);
        rc |= header(b, "tributary_feed_paused", "gauge",
                     "1 when a feed is paused, by reason: no_credentials (none configured) or "
                     "refused (mParticle answered 401/403).");
        for (int f = 0; f < FEED_COUNT; f++) {
            rc |= buf_printf(b, "tributary_feed_paused{feed=\"%s\",reason=\"no_credentials\"} %d\n",
                             FEED_NAMES[f], g->paused[f] == 1);
            rc |= buf_printf(b, "tributary_feed_paused{feed=\"%s\",reason=\"refused\"} %d\n",
                             FEED_NAMES[f], g->paused[f] == 2);
        }
        rc |= header(b, "tributary_mparticle_failures", "gauge",
                     "Failed rounds of requests in a row to mParticle, by feed (5xx, no answer, "
                     "an answer outside the API, a 429 without Retry-After); 0 once a request "
                     "is accepted.");
        for (int f = 0; f < FEED_COUNT; f++)
            rc |= buf_printf(b, "tributary_mparticle_failures{feed=\"%s\"} %d\n", FEED_NAMES[f],
                             g->send_failures[f]);
        rc |= header(b, "tributary_mparticle_retry_in_seconds", "gauge",
                     "Seconds until a feed sends again after a backoff or a 429's Retry-After, "
                     "by feed; 0 when it is not waiting.");
        for (int f = 0; f < FEED_COUNT; f++)
            rc |= buf_printf(b, "tributary_mparticle_retry_in_seconds{feed=\"%s\"} %.3f\n",
                             FEED_NAMES[f], g->resume_in_s[f]);
        rc |= header(b, "tributary_mparticle_rate_limit_batches_per_second", "gauge",
                     "Batches a second a feed allows itself now (feeds.<feed>.rate_limit, lowered "
                     "after a 429 that names the feed or app, then recovering towards it).");
        for (int f = 0; f < FEED_COUNT; f++)
            rc |= buf_printf(
                b, "tributary_mparticle_rate_limit_batches_per_second{feed=\"%s\"} %.1f\n",
                FEED_NAMES[f], g->send_rate[f]);
        rc |= header(b, "tributary_mparticle_account_rate_limit_batches_per_second", "gauge",
                     "Batches a second all feeds together allow themselves now "
                     "(mparticle.rate_limit, lowered after a 429 that names no level or the "
                     "account's, or an answer with a rate limit usage of 90% or more).");
        rc |= buf_printf(b, "tributary_mparticle_account_rate_limit_batches_per_second %.1f\n",
                         g->account_rate);
        rc |= render_int(b, "tributary_events_requeued_total", "counter",
                         "Events stored for delivery by tributary dlq requeue beside the service "
                         "(not in tributary_events_queued_total).",
                         g->requeued);
        rc |= render_int(
            b, "tributary_dead_letters_removed_total", "counter",
            "Dead letters that left the store by a command beside the service other than "
            "for delivery: deleted by tributary dlq purge, or dropped by the rules at "
            "tributary dlq requeue.",
            g->letters_removed);
        rc |= render_int(b, "tributary_queue_commits_total", "counter",
                         "Queue transactions committed; concurrent requests share them.",
                         g->queue_commits);
        rc |= render_int(b, "tributary_queue_operations_total", "counter",
                         "Operations carried by those transactions (requests, sent batches, ...).",
                         g->queue_operations);
        rc |= render_int(b, "tributary_dedup_ids", "gauge",
                         "Event ids remembered to recognise a repeat within dedup.window_s.",
                         g->dedup_ids);
        rc |= render_int(b, "tributary_dedup_memory_bytes", "gauge",
                         "Memory the remembered event ids take.", g->dedup_bytes);
        if (g->disk_free_bytes >= 0)
            rc |= render_int(b, "tributary_queue_disk_free_bytes", "gauge",
                             "Space free for the service on the file system of data_dir, read "
                             "every 50 ms (queue.db's own free pages not counted).",
                             g->disk_free_bytes);
        rc |= render_int(b, "tributary_queue_min_free_bytes", "gauge",
                         "queue.min_free_mb in bytes: with less free (queue.db's free pages "
                         "counted), new events are refused.",
                         g->min_free_bytes);
        rc |= render_int(b, "tributary_event_names", "gauge",
                         "Unique custom event names put in batches for mParticle, all feeds "
                         "together (new ones counted up to twice the limit); mParticle drops the "
                         "events of new names past its limit.",
                         g->event_names);
        rc |= render_int(b, "tributary_event_names_limit", "gauge",
                         "mParticle's limit of unique event names per workspace "
                         "(mparticle.event_names_limit).",
                         g->event_names_limit);
        rc |= render_int(b, "tributary_dead_letters", "gauge", "Events in the dead-letter store.",
                         g->dead_letters);
        rc |= header(b, "tributary_start_time_seconds", "gauge",
                     "When the service started (UNIX seconds).");
        rc |= buf_printf(b, "tributary_start_time_seconds %.3f\n",
                         (double)atomic_load(&start_ms) / 1000.0);
        rc |= header(b, "tributary_ready", "gauge", "1 when the service is ready.");
        rc |= buf_printf(b, "tributary_ready %d\n", g->ready);
        rc |= header(b, "tributary_reload_last_successful", "gauge",
                     "1 after the start and a reload that put its configuration and rules in "
                     "force, 0 after a reload refused (the files may refuse a restart too).");
        rc |= buf_printf(b, "tributary_reload_last_successful %d\n", g->reload_ok);
        rc |= header(b, "tributary_reload_last_success_timestamp_seconds", "gauge",
                     "When the configuration and rules in force were loaded, at the start or the "
                     "last successful reload (UNIX seconds).");
        rc |= buf_printf(b, "tributary_reload_last_success_timestamp_seconds %.3f\n",
                         (double)g->reload_loaded_ms / 1000.0);
        rc |= render_int(b, "tributary_http_request_body_bytes", "gauge",
                         "Memory taken for request bodies (at most inbound.body_memory_mb).",
                         g->request_body_bytes);
        rc |=
            render_int(b, "tributary_tls_certificate_expiry_timestamp_seconds", "gauge",
                       "When the listener's TLS certificate expires (UNIX seconds; 0 without TLS).",
                       g->tls_not_after);
    }
    return rc ? -1 : 0;
}
