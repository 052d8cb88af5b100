#include "ingest.h"

#include "auth.h"
#include "log.h"
#include "metrics.h"
#include "reload.h"
#include "rules.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Seconds Braze is asked to wait, by kind of trouble. */
#define RETRY_AFTER_DRAINING 5
#define RETRY_AFTER_FULL 30
#define RETRY_AFTER_ERROR 10
#define RETRY_AFTER_WORKSPACE 60

/* A pool of rules engines (Lua states): a request borrows one for its mapping.
 * At most `size` exist, which bounds the requests mapped at once and the memory
 * of the states; a request waits for a free engine otherwise. An engine built
 * for an older ruleset is rebuilt when borrowed, so a reload reaches every
 * engine between requests and no request is cut in half; one that a limit may
 * have damaged is dropped on return.
 *
 * A ruleset passed its checks when it was loaded, but building an engine runs
 * its files' top level again, which can fail later (code that reads the time,
 * a time limit met on a busy machine). Then requests that find no idle engine of
 * the rules in force are mapped with the rules before them (the newest
 * ruleset of another version an engine was built for), and the rules in force
 * are tried again every ENGINE_RETRY_MS. */
#define ENGINE_RETRY_MS 1000

struct ingest_engines {
    pthread_mutex_t mu;
    pthread_cond_t freed;
    rules **idle;
    size_t nidle;
    size_t size, out;  /* capacity; borrowed or being built */
    ruleset *current;  /* the newest ruleset an engine was built for, or NULL */
    ruleset *previous; /* the newest before it of another version, or NULL */
    ruleset *failed;   /* the newest one that failed to build, or NULL */
    int64_t failed_at; /* when it was last tried (monotonic ms) */
    char failed_err[ERR_LEN];
    int unavailable; /* the last borrow found no engine: its request got 503 */
};

int ingest_init(struct ingest *in, queue *q, int engines)
{
    memset(in, 0, sizeof(*in));
    in->q = q;
    struct ingest_engines *e = calloc(1, sizeof(*e));
    if (!e)
        return -1;
    e->idle = calloc((size_t)engines, sizeof(*e->idle));
    if (!e->idle) {
        free(e);
        return -1;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->freed, NULL);
    e->size = (size_t)engines;
    in->engines = e;
    return 0;
}

void ingest_fini(struct ingest *in)
{
    struct ingest_engines *e = in->engines;
    if (!e)
        return;
    for (size_t i = 0; i < e->nidle; i++)
        rules_free(e->idle[i]);
    free(e->idle);
    ruleset_unref(e->current);
    ruleset_unref(e->previous);
    ruleset_unref(e->failed);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->freed);
    free(e);
    in->engines = NULL;
}

/* Returns a borrowed engine to the pool; NULL returns only the slot (an engine
 * that could not be built). */
static void give_back(struct ingest_engines *e, rules *r)
{
    /* A rule cut short by a limit may have left its globals half updated, and a
     * state that grew too large keeps its memory: the state is dropped and the
     * next borrower builds a fresh one. */
    const char *why = r ? rules_needs_rebuild(r) : NULL;
    if (why) {
        metrics_add(M_RULE_STATE_REBUILDS, 1);
        log_warn("rules state rebuilt", LOG_S("reason", why));
        rules_free(r);
        r = NULL;
    }
    pthread_mutex_lock(&e->mu);
    if (r)
        e->idle[e->nidle++] = r;
    e->out--;
    pthread_cond_signal(&e->freed);
    pthread_mutex_unlock(&e->mu);
}

/* Whether a and b are the same rule files and values (a reload that changed
 * nothing loads a new ruleset of the same version): a failure is logged once. */
static int same_rules(const ruleset *a, const ruleset *b)
{
    return a == b || (a && b && strcmp(ruleset_version(a), ruleset_version(b)) == 0);
}

/* [under e->mu] An idle engine built for rs, taken from the pool, or NULL. */
static rules *take_idle(struct ingest_engines *e, const ruleset *rs)
{
    for (size_t i = e->nidle; rs && i-- > 0;) {
        if (rules_ruleset(e->idle[i]) == rs) {
            rules *r = e->idle[i];
            e->idle[i] = e->idle[--e->nidle];
            return r;
        }
    }
    return NULL;
}

/* [under e->mu] Makes *slot hold a reference on rs (or NULL). */
static void set_ruleset(ruleset **slot, ruleset *rs)
{
    if (*slot == rs)
        return;
    ruleset_unref(*slot);
    *slot = rs ? ruleset_ref(rs) : NULL;
}

/* [under e->mu] What maps while rs cannot be built: the rules before it. */
static ruleset *fallback_for(const struct ingest_engines *e, const ruleset *rs)
{
    return same_rules(e->current, rs) ? e->previous : e->current;
}

/* An engine for rs, or, while rs cannot be built, for the rules before it (see
 * above). NULL when neither can be built, with the reason in err. */
static rules *borrow(struct ingest_engines *e, ruleset *rs, char *err, size_t errlen)
{
    int64_t now = clock_mono_ms();
    pthread_mutex_lock(&e->mu);
    while (e->nidle == 0 && e->out >= e->size)
        pthread_cond_wait(&e->freed, &e->mu);
    e->out++;
    rules *r = take_idle(e, rs);
    int retry = same_rules(e->failed, rs);
    int try_rs = !r && (!retry || now - e->failed_at >= ENGINE_RETRY_MS);
    if (try_rs && retry)
        e->failed_at = now; /* one borrower tries again; the others map as before */
    ruleset *fallback = NULL;
    if (!r && !try_rs) {
        str_copy(err, errlen, e->failed_err);
        fallback = fallback_for(e, rs);
        r = take_idle(e, fallback);
    }
    /* an engine of an older ruleset: replaced, or the fallback's */
    rules *spare = !r && e->nidle ? e->idle[--e->nidle] : NULL;
    fallback = fallback ? ruleset_ref(fallback) : NULL;
    if (r)
        e->unavailable = 0;
    pthread_mutex_unlock(&e->mu);
    if (r) {
        ruleset_unref(fallback);
        return r;
    }

    if (try_rs) {
        if (rules_new(&r, rs, err, errlen) == 0) {
            pthread_mutex_lock(&e->mu);
            if (!same_rules(e->current, rs))
                set_ruleset(&e->previous, e->current);
            set_ruleset(&e->current, rs);
            int recovered = same_rules(e->failed, rs);
            set_ruleset(&e->failed, NULL); /* or one no longer in force */
            e->unavailable = 0;
            pthread_mutex_unlock(&e->mu);
            if (recovered)
                log_info("the rules in force build again",
                         LOG_S("rules_version", ruleset_version(rs)));
            rules_free(spare);
            return r;
        }
        metrics_add(M_RULE_ENGINE_FAILURES, 1);
        pthread_mutex_lock(&e->mu);
        int first = !same_rules(e->failed, rs);
        set_ruleset(&e->failed, rs);
        e->failed_at = now;
        str_copy(e->failed_err, sizeof e->failed_err, err);
        fallback = fallback_for(e, rs) ? ruleset_ref(fallback_for(e, rs)) : NULL;
        pthread_mutex_unlock(&e->mu);
        if (first)
            log_error("cannot build an engine for the rules in force; the rules before them map "
                      "until they build (tried again every second)",
                      LOG_S("rules_version", ruleset_version(rs)) LOG_S("error", err)
                          LOG_S("previous_rules_version",
                                fallback ? ruleset_version(fallback) : "(none)"));
    }
    if (fallback) {
        if (spare && rules_ruleset(spare) == fallback) {
            r = spare;
            spare = NULL;
        } else {
            char fallback_err[ERR_LEN]; /* err keeps why the rules in force failed */
            if (rules_new(&r, fallback, fallback_err, sizeof fallback_err) != 0)
                r = NULL;
        }
    }
    rules_free(spare);
    ruleset_unref(fallback);
    pthread_mutex_lock(&e->mu);
    e->unavailable = r == NULL;
    pthread_mutex_unlock(&e->mu);
    if (!r)
        give_back(e, NULL);
    return r;
}

int ingest_rules_available(struct ingest *in)
{
    struct ingest_engines *e = in->engines;
    pthread_mutex_lock(&e->mu);
    int unavailable = e->unavailable;
    /* a build was tried within the second: its answer stands (probes may
     * come often, and the rules before them would be built at each) */
    int tried = clock_mono_ms() - e->failed_at < ENGINE_RETRY_MS;
    pthread_mutex_unlock(&e->mu);
    if (!unavailable)
        return 1;
    if (tried)
        return 0;
    struct snapshot s;
    reload_get(&s);
    char err[ERR_LEN];
    rules *r = s.rs ? borrow(e, s.rs, err, sizeof err) : NULL;
    reload_put(&s);
    if (r)
        give_back(e, r);
    return r != NULL;
}

static void respond_error(struct ingest_response *resp, int status, int retry_after,
                          const char *error, long index, const char *reason)
{
    resp->status = status;
    resp->retry_after_s = retry_after;
    buf_reset(&resp->body);
    int rc = buf_adds(&resp->body, "{\"error\":");
    rc |= buf_json_str(&resp->body, error, strlen(error));
    if (index >= 0)
        rc |= buf_printf(&resp->body, ",\"index\":%ld", index);
    if (reason) {
        rc |= buf_adds(&resp->body, ",\"reason\":");
        rc |= buf_json_str(&resp->body, reason, strlen(reason));
    }
    rc |= buf_addc(&resp->body, '}');
    (void)rc;
}

/* Shutdown, throttling and authentication, with the configuration cfg.
 * have_body: the signature can be verified. 1: go on; 0: refused, resp
 * filled. */
static int admit(struct ingest *in, const struct config *cfg, const struct ingest_request *req,
                 int have_body, struct ingest_response *resp)
{
    if (atomic_load(&in->draining)) {
        respond_error(resp, 503, RETRY_AFTER_DRAINING, "shutting down", -1, NULL);
        return 0;
    }
    if (have_body && req->authenticated)
        return 1;
    /* the throttle's time is the monotonic clock's: a step of the wall clock
     * neither lengthens a refusal nor forgets a trusted address */
    int64_t now = clock_mono_ms() / 1000, wait_s = 0;
    if (auth_throttled(req->client, now, &wait_s)) {
        metrics_add(M_AUTH_THROTTLED, 1);
        respond_error(resp, 429, (int)(wait_s > 0 ? wait_s : 1), "too many authentication failures",
                      -1, NULL);
        return 0;
    }
    struct auth_request ar = {.authorization = req->authorization,
                              .signature = req->signature,
                              .body = req->body,
                              .len = req->len,
                              .have_body = have_body,
                              .client_local = config_host_is_loopback(req->client),
                              .now_s = clock_wall_ms() / 1000};
    enum auth_result a = auth_check(cfg, &ar);
    if (a == AUTH_OK) {
        auth_succeeded(req->client, now);
        return 1;
    }
    if (a == AUTH_PENDING && !have_body)
        return 2;
    if (a == AUTH_ERROR) {
        auth_log_error();
        respond_error(resp, 503, RETRY_AFTER_ERROR, auth_result_text(a), -1, NULL);
        return 0;
    }
    if (a == AUTH_REMOTE) {
        /* no credentials are configured: the client's are not wrong, the
         * configuration is, and a 401 would make Braze stop sending */
        log_repeated(LOG_INFO,
                     "refusing a client on another machine: no inbound credentials are "
                     "configured (inbound.tokens, inbound.hmac_secrets)",
                     LOG_S("client", req->client));
        respond_error(resp, 503, RETRY_AFTER_ERROR, auth_result_text(a), -1, NULL);
        return 0;
    }
    metrics_add(M_AUTH_FAILURES, 1);
    static struct log_budget failed_lines;
    if (log_budget_allows(&failed_lines, LOG_INFO, AUTH_LINES_PER_SECOND,
                          "authentication failures: more this second than the log takes; the "
                          "rest of them are left out of it (tributary_auth_failures_total counts "
                          "them)"))
        log_info("authentication failed",
                 LOG_S("client", req->client) LOG_S("reason", auth_result_text(a)));
    if (auth_failed(req->client, now))
        auth_log_refusal(req->client);
    respond_error(resp, 401, 0, auth_result_text(a), -1, NULL);
    return 0;
}

/* Whether the request's workspace is one this service takes (see
 * config_workspace_problem); 0: refused with 503, resp filled. A connector's
 * URL with a wrong name and a name missing from inbound.workspaces look the
 * same from here, and the second is ours to fix: Braze keeps the events and
 * retries, where a 404 would make it disable the connector. */
static int workspace_taken(const struct config *c, const struct ingest_request *req,
                           struct ingest_response *resp)
{
    static _Atomic int64_t logged_ms;
    const char *why = req->workspace_repeated
                          ? "given more than once"
                          : config_workspace_problem(c, req->workspace, req->workspace_len);
    if (!why)
        return 1;
    metrics_add(M_WORKSPACE_REFUSED, 1);
    if (log_due_shared(&logged_ms)) {
        /* the name as it came, control characters (a NUL too) as '?', cut
         * past what a name may hold */
        char name[CONFIG_WORKSPACE_MAX + 4];
        size_t n =
            req->workspace_len < CONFIG_WORKSPACE_MAX ? req->workspace_len : CONFIG_WORKSPACE_MAX;
        for (size_t i = 0; i < n; i++)
            name[i] = (unsigned char)req->workspace[i] < 0x20 ? '?' : req->workspace[i];
        str_copy(name + n, sizeof name - n, req->workspace_len > n ? "..." : "");
        log_warn("request for a workspace this service does not take; answered 503 (Braze "
                 "retries)",
                 LOG_S("workspace", name) LOG_S("reason", why) LOG_S("client", req->client));
    }
    respond_error(resp, 503, RETRY_AFTER_WORKSPACE, "unknown workspace", -1, why);
    return 0;
}

int ingest_precheck(struct ingest *in, const struct ingest_request *req,
                    struct ingest_response *resp)
{
    struct snapshot s;
    reload_get(&s);
    int admitted = admit(in, s.cfg, req, 0, resp);
    if (admitted == 1)
        admitted = workspace_taken(s.cfg, req, resp);
    reload_put(&s);
    return admitted;
}

/* Counts the events filtered or skipped; at debug, says each with its reason
 * (a rule's own, when it gave one). */
static void count_dropped(const struct mapping *m)
{
    for (int r = 0; r < DROP_REASON_COUNT; r++) {
        if (m->dropped[r])
            metrics_add_dropped((enum drop_reason)r, m->dropped[r]);
    }
    for (size_t i = 0; m->keep_outcomes && i < m->noutcomes; i++) {
        const struct outcome *o = &m->outcomes[i];
        if (o->kind == OUTCOME_DROPPED)
            log_debug("event not forwarded",
                      LOG_S("reason", DROP_REASON_NAMES[o->reason])
                          LOG_S("detail", o->detail.p ? o->detail.p : "")
                              LOG_S("rule", o->dropped_by.p ? o->dropped_by.p : "")
                                  LOG_S("event_id", o->event_id.p ? o->event_id.p : "")
                                      LOG_S("event_type", o->event_type.p ? o->event_type.p : ""));
    }
}

/* Says each event put in the dead-letter store, up to QUARANTINE_LINES_PER_SECOND
 * lines a second for the whole service: a rule that fails for every event would
 * otherwise write a line per event. The store and the metric keep them all. */
#define QUARANTINE_LINES_PER_SECOND 20
static void log_dead_letters(const struct mapping *m)
{
    static struct log_budget logged;
    for (size_t i = 0; i < m->ndead; i++) {
        const struct dead_letter *d = &m->dead[i];
        if (!d->stored)
            continue;
        metrics_add_dead(d->reason, 1);
        if (!log_budget_allows(&logged, LOG_WARN, QUARANTINE_LINES_PER_SECOND,
                               "events quarantined: more this second than the log takes; the rest "
                               "of them are left out of it (tributary_dead_letters_total counts "
                               "them, the dead-letter store keeps them)"))
            continue;
        log_warn("event quarantined",
                 LOG_S("reason", d->reason) LOG_S("event_id", d->event_id.p)
                     LOG_S("event_type", d->event_type.p) LOG_S("detail", d->detail.p)
                         LOG_S("rules_version", d->rules_version));
    }
}

/* Says a request refused as invalid (400, 413), up to
 * QUARANTINE_LINES_PER_SECOND lines a second: Braze sends the events of a 400
 * again one by one, and drops one refused again for good, so each may be a
 * loss (see currents-http.md); a producer sending nothing but such requests
 * would otherwise write a line each. tributary_http_requests_total counts
 * them all. */
static void log_refused(const struct input_error *ie)
{
    static struct log_budget logged;
    if (!log_budget_allows(&logged, LOG_WARN, QUARANTINE_LINES_PER_SECOND,
                           "requests refused: more this second than the log takes; the rest of "
                           "them are left out of it (tributary_http_requests_total counts them)"))
        return;
    log_warn(ie->status == 400 ? "request refused as invalid; Braze sends its events again one "
                                 "by one, and drops one that is refused again"
                               : "request refused; Braze sends its events again, fewer at a time",
             LOG_I("status", ie->status) LOG_S("reason", ie->reason) LOG_I("index", ie->index));
}

void ingest_handle(struct ingest *in, const struct ingest_request *req,
                   struct ingest_response *resp)
{
    resp->status = 500;
    resp->retry_after_s = 0;
    struct snapshot s;
    reload_get(&s);
    struct mapping m;
    mapping_init(&m);
    m.keep_outcomes = log_enabled(LOG_DEBUG); /* for count_dropped's lines */
    char err[ERR_LEN] = "";
    ruleset *mapped_by = NULL;
    rules *r = NULL;
    if (!admit(in, s.cfg, req, 1, resp) || !workspace_taken(s.cfg, req, resp))
        goto done;

    r = borrow(in->engines, s.rs, err, sizeof err);
    struct input_error ie;
    if (!r) {
        log_repeated(LOG_ERROR, "cannot build the rules engine", LOG_S("error", err));
        respond_error(resp, 503, RETRY_AFTER_ERROR, "rules unavailable", -1, NULL);
        goto done;
    }
    /* the ruleset that maps: the fallback's while the one in force cannot */
    mapped_by = ruleset_ref(rules_ruleset(r));
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    int mapped =
        rules_map(r, req->body, req->len, INPUT_ENVELOPE, str_opt(req->workspace), &m, &ie);
    clock_gettime(CLOCK_MONOTONIC, &b);
    metrics_rules_time((double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9);
    if (mapped != 0) {
        if (ie.status == 503) {
            log_repeated(LOG_ERROR, "cannot map a request", LOG_S("error", ie.reason));
            respond_error(resp, 503, RETRY_AFTER_ERROR, "temporarily unable to map", -1, NULL);
        } else {
            log_refused(&ie);
            respond_error(resp, ie.status, 0,
                          ie.status == 413 ? "too many events" : "invalid request", ie.index,
                          ie.reason);
        }
        goto done;
    }

    /* The mapping lives in its own memory: the engine can serve another request
     * while this one waits for its commit. */
    give_back(in->engines, r);
    r = NULL;

    struct commit_result res = {0};
    enum queue_status qs = QUEUE_OK;
    if (m.nrecords || m.ndead)
        qs = queue_commit(in->q, &m, &res);
    if (qs != QUEUE_OK) {
        int full = qs == QUEUE_FULL || qs == QUEUE_NO_SPACE;
        int retry = full                 ? RETRY_AFTER_FULL
                    : qs == QUEUE_CLOSED ? RETRY_AFTER_DRAINING
                                         : RETRY_AFTER_ERROR;
        log_repeated(LOG_WARN, "request not stored; Braze will retry",
                     LOG_S("queue", queue_status_name(qs)) LOG_I("events", (long long)m.nevents));
        respond_error(resp, 503, retry,
                      qs == QUEUE_FULL       ? "queue full"
                      : qs == QUEUE_NO_SPACE ? "disk full"
                      : qs == QUEUE_CLOSED   ? "shutting down"
                                             : "storage error",
                      -1, NULL);
        goto done;
    }

    metrics_add(M_EVENTS_RECEIVED, m.nevents);
    if (req->workspace_len)
        metrics_workspace_events(req->workspace, m.nevents);
    if (m.nevents)
        metrics_mapped(ruleset_version(mapped_by), m.nevents);
    metrics_add(M_EVENTS_QUEUED, res.queued);
    metrics_add(M_EVENTS_DUPLICATE, res.duplicates);
    if (res.duplicates)
        log_debug("events not forwarded: already stored within the dedup window",
                  LOG_I("duplicates", (long long)res.duplicates)
                      LOG_I("events", (long long)m.nevents));
    count_dropped(&m);
    log_dead_letters(&m);

    size_t filtered =
        m.dropped[DROP_UNSUPPORTED_TYPE] + m.dropped[DROP_NOT_SELECTED] + m.dropped[DROP_RULE];
    resp->status = 200;
    buf_reset(&resp->body);
    if (buf_printf(&resp->body,
                   "{\"accepted\":%zu,\"forwarded\":%zu,\"filtered\":%zu,\"skipped\":%zu,"
                   "\"duplicates\":%zu,\"quarantined\":%zu,\"rules_version\":\"%s\"}",
                   m.nevents, res.queued, filtered, m.dropped[DROP_NO_EXTERNAL_ID], res.duplicates,
                   res.quarantined, ruleset_version(mapped_by)) != 0)
        buf_reset(&resp->body);
done:
    if (r)
        give_back(in->engines, r);
    mapping_free(&m);
    ruleset_unref(mapped_by);
    reload_put(&s);
}
