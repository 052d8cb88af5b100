#include "http_in.h"

#include "auth.h"
#include "digest.h"
#include "log.h"
#include "reload.h"
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

/* The room a body awaiting its signature check is taken from. */
enum pool { POOL_NONE, POOL_UNKNOWN, POOL_TRUSTED, POOLS };

/* Headers and the read buffer of one connection: larger headers get 431. */
#define CONNECTION_MEMORY (64 * 1024)
/* The answer's headers are made in the same memory: a request whose own take
 * more than this gets 431 from tributary, while there is room to say so
 * (libmicrohttpd would close the connection without an answer). */
#define HEADERS_MAX (CONNECTION_MEMORY - 4 * 1024)
/* TLS 1.2 and 1.3 with forward-secret AEAD ciphers only (GnuTLS priorities),
 * and elliptic-curve key exchange only: TLS 1.3 took SECURE128's finite-field
 * groups too, and a client that offers only ffdhe8192 costs the server about
 * 0.3 s of CPU per handshake for nothing of its own (DHEat). */
#define TLS_PRIORITIES                                                                             \
    "SECURE128:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:"         \
    "+CHACHA20-POLY1305:-KX-ALL:+ECDHE-ECDSA:+ECDHE-RSA:-GROUP-ALL:+GROUP-X25519:"                 \
    "+GROUP-SECP256R1:+GROUP-SECP384R1:%SERVER_PRECEDENCE"

/* One TCP connection, for the request-time watchdog. What it knows of the
 * current request is for the line it writes when it cuts one off. */
struct conn {
    struct conn *next, *prev;
    int fd;              /* a dup() of the socket: ours until the connection closes */
    int64_t deadline;    /* monotonic ms by which the current request must have arrived; 0: none */
    int cut;             /* shut down by the watchdog */
    int64_t accepted_ms; /* monotonic, before its TLS handshake (see tls_release_retired) */
    char peer[INET6_ADDRSTRLEN];
    /* the current request's, under conns_mu: its client (the peer until its
     * headers name another, see client_address), its path once its request
     * line came (NULL before), its id once its headers came ("" before) */
    char client[INET6_ADDRSTRLEN];
    const char *path;
    char id[40];
};

struct http_in {
    struct MHD_Daemon *d;
    struct ingest *in;
    struct http_in_options opt;
    struct http_in_hooks hooks;
    int port;
    /* UNAUTHENTICATED_BODY_BUDGET for each pool, or less so that bodies
     * awaiting their signature check always leave room in body_memory for a
     * body of max_body: authenticated requests are never locked out by them.
     * POOL_TRUSTED's is 0 where there is no room for it beside POOL_UNKNOWN's
     * whole: its requests share that one. */
    size_t pool_budget[POOLS];
    /* Requests that trickle in (request line, headers or body) are cut off by
     * shutting their socket down from a watchdog, which checks every second.
     * libmicrohttpd's idle timeout cannot do it: every byte resets it. */
    pthread_mutex_t conns_mu;
    pthread_cond_t conns_cv;
    struct conn *conns;
    int untracked; /* connections without a struct conn (out of memory) */
    int watchdog_started;
    int stopping;
    pthread_t watchdog;
    /* Requests that began before the drain at shutdown and are not over yet
     * (under conns_mu); http_in_drain waits for them. */
    int in_progress;
    int draining;
    pthread_cond_t drained_cv;
    /* The first complaint of libmicrohttpd while the daemon starts (why it
     * could not listen), for the error http_in_start returns. */
    pthread_mutex_t start_mu;
    int starting;
    char start_error[256];
};

enum route { R_NONE, R_CURRENTS, R_HEALTHZ, R_READYZ, R_METRICS, R_ADMIN_RELOAD };

/* How the log names a route: only paths the service serves, never the text a
 * client sent. */
static const char *const ROUTE_PATHS[] = {
    [R_NONE] = "other",     [R_CURRENTS] = "/currents", [R_HEALTHZ] = "/healthz",
    [R_READYZ] = "/readyz", [R_METRICS] = "/metrics",   [R_ADMIN_RELOAD] = "/admin/reload"};

/* One request in progress. */
struct req {
    enum route route;
    int method_ok;
    int answered; /* a response was queued early (400, 401, 404, 405, 413, 415, 429, 501, 503) */
    int replied;  /* a response was queued, early or not */
    int too_large;
    int no_memory;     /* the body could not be kept: our trouble, 503 */
    int busy;          /* the body would pass a budget (enum budget): read, dropped, then 503 */
    int unwanted_body; /* a body came for a route that takes none (never stored) */
    int admitted;      /* ingest_precheck: 1 by its headers, 2 only by a signature over
                          the body */
    enum pool pool;    /* admitted 2: where its body is counted (pool_bytes) */
    int tracked;       /* counted in in_progress */
    int close;         /* the answer closes the connection */
    size_t counted;    /* bytes taken from the budgets for the body (take_body) */
    uint64_t dropped;  /* bytes of the body read and dropped (see drop) */
    int taken;         /* the whole body's bytes were taken at its headers */
    struct {
        int status; /* 0: none */
        int retry_after;
        char json[256];
    } after_body; /* an answer decided at the headers, sent once the body is read
                     and dropped (see answer_after_body) */
    struct timespec start;
    buf body;
    char id[40];
    char client[INET6_ADDRSTRLEN];
};

static _Atomic uint64_t request_seq;
/* The bytes taken for request bodies, all requests together (bounded by the
 * option body_memory), and for those awaiting a signature check. */
static _Atomic size_t body_bytes;
static _Atomic size_t pool_bytes[POOLS];
/* Set by http_in_drain: every answer closes its connection. */
static _Atomic int closing_connections;

/* What a body is refused for. */
enum budget { B_FITS, B_ALL, B_UNAUTHENTICATED };

void http_in_pool_budgets(size_t body_memory, size_t max_body, size_t *unknown, size_t *trusted)
{
    size_t spare = body_memory > max_body ? body_memory - max_body : 0;
    *unknown = spare < UNAUTHENTICATED_BODY_BUDGET ? spare : UNAUTHENTICATED_BODY_BUDGET;
    *trusted = spare - *unknown >= *unknown ? *unknown : 0;
}

/* Adds n to *used unless the sum would pass limit; 1 when added. */
static int reserve(_Atomic size_t *used, size_t n, size_t limit)
{
    size_t cur = atomic_load(used);
    do {
        if (n > limit || cur > limit - n)
            return 0;
    } while (!atomic_compare_exchange_weak(used, &cur, cur + n));
    return 1;
}

/* Takes n bytes for r's body from the budgets, all or nothing: a request
 * whose length is known takes its whole body before reading it, a chunked one
 * or one only its signature can admit each piece as it comes. */
static enum budget take_body(const http_in *h, struct req *r, size_t n)
{
    if (!reserve(&body_bytes, n, h->opt.body_memory))
        return B_ALL;
    if (r->pool && !reserve(&pool_bytes[r->pool], n, h->pool_budget[r->pool])) {
        atomic_fetch_sub(&body_bytes, n);
        return B_UNAUTHENTICATED;
    }
    r->counted += n;
    return B_FITS;
}

/* The largest body r may have: one that only its signature can admit must
 * fit in the room of those (a 503 for it would be retried as it is, never
 * split). */
static size_t body_limit(const http_in *h, const struct req *r)
{
    if (r->pool && h->pool_budget[r->pool] < h->opt.max_body)
        return h->pool_budget[r->pool];
    return h->opt.max_body;
}

/* The body r held leaves the budgets: it was dropped, or r is over. */
static void release_body(struct req *r)
{
    atomic_fetch_sub(&body_bytes, r->counted);
    if (r->pool)
        atomic_fetch_sub(&pool_bytes[r->pool], r->counted);
    r->counted = 0;
    buf_free(&r->body);
}

/* Retry-After of a request refused for the bodies held by others. */
#define RETRY_AFTER_BUSY 5

static double elapsed(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

static enum MHD_Result reply(struct MHD_Connection *c, struct req *r, int status, const char *type,
                             const char *body, size_t len, int retry_after)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(resp, "X-Request-Id", r->id);
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", retry_after);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    if (r->close || atomic_load(&closing_connections))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    if (status == 405)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW,
                                r->route == R_CURRENTS || r->route == R_ADMIN_RELOAD ? "POST"
                                                                                     : "GET");
    enum MHD_Result rc = MHD_queue_response(c, (unsigned int)status, resp);
    MHD_destroy_response(resp);
    r->replied = rc == MHD_YES;
    if (r->route == R_CURRENTS)
        metrics_inbound(status, elapsed(&r->start));
    /* a 503 from /readyz is a state a probe polls, said in its body; other
     * answers of 500 and more come with a line that says why */
    static struct log_repeat failed;
    uint64_t times;
    if (status >= 500 && r->route != R_READYZ &&
        (times = log_repeat_due_line(&failed, LOG_WARN, "answered")) != 0)
        log_warn("answered", LOG_I("status", status) LOG_S("path", ROUTE_PATHS[r->route])
                                 LOG_I("times", (long long)times));
    else
        log_debug("answered", LOG_I("status", status) LOG_S("path", ROUTE_PATHS[r->route]));
    return rc;
}

static enum MHD_Result reply_json(struct MHD_Connection *c, struct req *r, int status,
                                  const char *json, int retry_after)
{
    return reply(c, r, status, "application/json", json, strlen(json), retry_after);
}

/* Retry-After when a body could not be kept in memory: our trouble, so 503,
 * which Braze retries (a 413 would make it split a batch for nothing). */
#define RETRY_AFTER_NO_MEMORY 10

/* An answer sent before the body is read closes the connection with the body
 * unread, and the kernel then resets it: a client that writes its whole body
 * before it reads the answer, as Braze's may, sees a broken connection instead
 * of the 413, and sends the same batch again instead of splitting it. So the
 * body of an authenticated request over inbound.max_body_bytes is read and
 * dropped, up to this size (Braze's largest batch, 100 events of 900 KB, is
 * some 90 MB), and then answered. */
#define TOO_LARGE_READ_MAX ((uint64_t)128 << 20)

/* Whether the client sends its body only once told to (Expect:
 * 100-continue): an answer at the headers reaches it whole, and saves it the
 * upload. */
static int waits_to_send(struct MHD_Connection *c)
{
    return MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT) != NULL;
}

/* The most of a body that is read and dropped before its answer: up to
 * TOO_LARGE_READ_MAX when its headers authenticated it or its signature may
 * yet (as Braze's, it gets its answer and acts on it), up to what body_limit
 * lets it send when they refused it. (With a Content-Length over body_limit, a
 * body only a signature can admit is answered 413 at once: see on_request.) */
static uint64_t drop_most(const http_in *h, const struct req *r)
{
    return r->admitted ? TOO_LARGE_READ_MAX : (uint64_t)body_limit(h, r);
}

/* n more bytes of a body read and dropped before its answer. A body of
 * unknown length (chunked) that goes on past drop_most has its connection
 * closed, unanswered. */
static enum MHD_Result drop(const http_in *h, struct req *r, size_t n)
{
    static _Atomic int64_t logged_ms;
    r->dropped += n;
    if (r->dropped <= drop_most(h, r))
        return MHD_YES;
    metrics_add(M_HTTP_REFUSED_BODIES_CUT, 1);
    if (log_due_shared(&logged_ms))
        log_warn("a refused request's body went on past what is read before its answer; "
                 "connection closed (see tributary_http_refused_bodies_cut_total)",
                 LOG_S("client", r->client) LOG_I("bytes", (long long)r->dropped));
    return MHD_NO;
}

/* 401 and 415 tell Braze to stop (the token is wrong) or what to change (send
 * plain JSON); sent before the body is read, they reach a client that writes
 * its whole body first as a broken connection, which it only retries (see
 * TOO_LARGE_READ_MAX). So such an answer is sent after the body (of length
 * len, -1 when chunked) is read and dropped, when it is within drop_most (a
 * chunked body: see drop). A client that asked to send its body only once the
 * headers are accepted (Expect: 100-continue) gets it at once. Returns 1 when
 * the answer is kept for then. */
static int answer_after_body(const http_in *h, struct MHD_Connection *c, struct req *r, int status,
                             const char *json, size_t json_len, int retry_after, int64_t len)
{
    if ((status != 401 && status != 415) || len == 0 ||
        (len > 0 && (uint64_t)len > drop_most(h, r)) || json_len >= sizeof r->after_body.json ||
        waits_to_send(c))
        return 0;
    r->after_body.status = status;
    r->after_body.retry_after = retry_after;
    memcpy(r->after_body.json, json, json_len);
    r->after_body.json[json_len] = '\0';
    return 1;
}

static enum MHD_Result refuse_busy(struct MHD_Connection *c, struct req *r)
{
    static _Atomic int64_t logged_ms[2];
    if (r->busy == B_ALL && log_due_shared(&logged_ms[0]))
        log_warn("request bodies held in memory reached inbound.body_memory_mb; answered 503",
                 LOG_S("client", r->client));
    else if (r->busy == B_UNAUTHENTICATED && log_due_shared(&logged_ms[1]))
        log_warn("too many request bodies awaiting their signature check; answered 503",
                 LOG_S("client", r->client));
    return reply_json(c, r, 503, "{\"error\":\"busy\"}", RETRY_AFTER_BUSY);
}

/* A 413 makes Braze split the batch and send it again: said now and then, so
 * that a producer that keeps sending bodies too large for the limit shows in
 * the log, with the length it declared (Content-Length; none when chunked). */
static enum MHD_Result refuse_too_large(const http_in *h, struct MHD_Connection *c, struct req *r)
{
    static _Atomic int64_t logged_ms;
    size_t limit = body_limit(h, r);
    if (log_due_shared(&logged_ms)) {
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        int64_t len = 0;
        if (cl && parse_int64(cl, 0, INT64_MAX, &len) == 0)
            log_warn("request refused: body too large; answered 413",
                     LOG_S("client", r->client) LOG_I("limit_bytes", limit)
                         LOG_I("content_length", len));
        else
            log_warn("request refused: body too large; answered 413",
                     LOG_S("client", r->client) LOG_I("limit_bytes", limit));
    }
    char msg[128];
    snprintf(msg, sizeof msg, "{\"error\":\"body larger than %zu bytes\"}", limit);
    return reply_json(c, r, 413, msg, 0);
}

/* Content-Encoding: only none or `identity` is read. */
static int identity_encoding(const char *v)
{
    size_t n;
    v = str_trim_blanks(v, &n);
    return n == 0 || (n == 8 && strncasecmp(v, "identity", 8) == 0);
}

static enum MHD_Result note_encoding(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
    (void)kind;
    const char **found = cls;
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_ENCODING) != 0 ||
        identity_encoding(value ? value : ""))
        return MHD_YES;
    *found = value ? value : "";
    return MHD_NO;
}

/* The first Content-Encoding line that is not identity, or NULL. Every line
 * counts: "identity" then "gzip" is a gzip body (RFC 9110, 5.3). */
static const char *unsupported_encoding(struct MHD_Connection *c)
{
    const char *found = NULL;
    MHD_get_connection_values(c, MHD_HEADER_KIND, note_encoding, &found);
    return found;
}

/* A compressed body would reach the JSON decoder as garbage and be answered
 * 400, after which Braze drops its events; a 415 is retried, until the
 * producer that compresses is set to send plain JSON. */
static const char UNSUPPORTED_ENCODING[] =
    "{\"error\":\"unsupported Content-Encoding: send uncompressed JSON\"}";

static void log_unsupported_encoding(const char *v)
{
    /* a producer that compresses retries every request: said now and then */
    static _Atomic int64_t logged_ms;
    if (log_due_shared(&logged_ms)) {
        char shown[33];
        size_t n = strcspn(v, "\r\n");
        snprintf(shown, sizeof shown, "%.*s", (int)(n < 32 ? n : 32), v);
        log_warn("request refused: Content-Encoding not supported (send uncompressed JSON)",
                 LOG_S("content_encoding", shown));
    }
}

/* Keeps the last X-Forwarded-For header line: a proxy that adds its own line
 * rather than extending the client's puts it last. */
static enum MHD_Result last_forwarded_for(void *cls, enum MHD_ValueKind kind, const char *key,
                                          const char *value)
{
    (void)kind;
    if (key && value && strcasecmp(key, "X-Forwarded-For") == 0)
        *(const char **)cls = value;
    return MHD_YES;
}

/* The text of an IPv6 address; an IPv4-mapped one (an IPv4 client of a
 * listener on "[::]") as the IPv4 address it is, so that it is that client
 * for the loopback check, the trusted proxies and the throttling. */
static void ipv6_text(const struct in6_addr *a, char *out, size_t len)
{
    if (IN6_IS_ADDR_V4MAPPED(a))
        inet_ntop(AF_INET, &a->s6_addr[12], out, (socklen_t)len);
    else
        inet_ntop(AF_INET6, a, out, (socklen_t)len);
}

/* The address of the connection's peer; -1 when libmicrohttpd has none. */
static int peer_address(struct MHD_Connection *c, char *out, size_t len)
{
    out[0] = '\0';
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!info || !info->client_addr)
        return -1;
    const struct sockaddr *sa = info->client_addr;
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)len);
    else if (sa->sa_family == AF_INET6)
        ipv6_text(&((const struct sockaddr_in6 *)sa)->sin6_addr, out, len);
    return 0;
}

/* The client's address. Behind a reverse proxy on the same host (a loopback
 * peer), or one of http.trusted_proxies, it is the last X-Forwarded-For entry,
 * the one the proxy itself added, without the port some proxies add
 * (203.0.113.5:5678, [2001:db8::1]:5678). An entry that is no address is
 * "unknown": someone the proxy forwarded, not the proxy's own machine. */
static void client_address(struct MHD_Connection *c, char *out, size_t len)
{
    if (peer_address(c, out, len) != 0)
        return;
    struct snapshot s;
    reload_get(&s);
    int trusted = config_proxy_trusted(s.cfg, out);
    reload_put(&s);
    if (!trusted)
        return;
    const char *xff = NULL;
    MHD_get_connection_values(c, MHD_HEADER_KIND, last_forwarded_for, &xff);
    if (!xff)
        return;
    const char *last = strrchr(xff, ',');
    last = last ? last + 1 : xff;
    while (*last == ' ' || *last == '\t')
        last++;
    char addr[INET6_ADDRSTRLEN + 8];
    size_t n = strcspn(last, " \t");
    str_copy(out, len, "unknown");
    if (n == 0 || n >= sizeof addr)
        return;
    memcpy(addr, last, n);
    addr[n] = '\0';
    char *a = addr, *colon = strchr(addr, ':');
    if (a[0] == '[') { /* [v6] or [v6]:port */
        char *close = strchr(a, ']');
        if (!close || (close[1] != '\0' && close[1] != ':'))
            return;
        *close = '\0';
        a++;
    } else if (colon && !strchr(colon + 1, ':')) { /* v4:port */
        *colon = '\0';
    }
    struct in_addr v4;
    struct in6_addr v6;
    if (inet_pton(AF_INET, a, &v4) == 1)
        str_copy(out, len, a);
    else if (inet_pton(AF_INET6, a, &v6) == 1)
        ipv6_text(&v6, out, len);
}

/* The URL's `workspace` parameter: the first, with its length (decoded, it
 * may hold a NUL), and whether another differs. */
static enum MHD_Result workspace_arg(void *cls, enum MHD_ValueKind kind, const char *key,
                                     size_t key_size, const char *value, size_t value_size)
{
    (void)kind;
    struct ingest_request *q = cls;
    if (key_size != 9 || memcmp(key, "workspace", 9) != 0)
        return MHD_YES;
    if (!value)
        value_size = 0;
    if (!q->workspace) {
        q->workspace = value ? value : "";
        q->workspace_len = value_size;
    } else if (q->workspace_len != value_size ||
               memcmp(q->workspace, value ? value : "", value_size) != 0) {
        q->workspace_repeated = 1;
    }
    return MHD_YES;
}

static struct ingest_request headers_of(struct MHD_Connection *c, const struct req *r)
{
    struct ingest_request q = {0};
    MHD_get_connection_values_n(c, MHD_GET_ARGUMENT_KIND, workspace_arg, &q);
    q.authorization =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    q.signature = MHD_lookup_connection_value(c, MHD_HEADER_KIND, AUTH_SIGNATURE_HEADER);
    q.client = r->client;
    q.authenticated = r->admitted == 1;
    return q;
}

/* The path of a request target: an absolute-form target (RFC 9112 3.2.2,
 * "http://host/currents", which a proxy may pass on) is taken as its path. */
static const char *target_path(const char *url)
{
    size_t scheme = strncasecmp(url, "http://", 7) == 0    ? 7
                    : strncasecmp(url, "https://", 8) == 0 ? 8
                                                           : 0;
    if (!scheme)
        return url;
    const char *path = strchr(url + scheme, '/');
    return path ? path : "/";
}

/* Whether /admin/reload exists: only with admin.token. */
static int admin_enabled(void)
{
    struct snapshot s;
    reload_get(&s);
    int enabled = s.cfg->admin_token != NULL;
    reload_put(&s);
    return enabled;
}

static enum route route_of(const char *target)
{
    const char *url = target_path(target);
    if (strcmp(url, "/currents") == 0 || strcmp(url, "/currents/") == 0)
        return R_CURRENTS;
    if (strcmp(url, "/healthz") == 0)
        return R_HEALTHZ;
    if (strcmp(url, "/readyz") == 0)
        return R_READYZ;
    if (strcmp(url, "/metrics") == 0)
        return R_METRICS;
    if (strcmp(url, "/admin/reload") == 0)
        return admin_enabled() ? R_ADMIN_RELOAD : R_NONE;
    return R_NONE;
}

static enum MHD_Result answer_ingest(http_in *h, struct MHD_Connection *c, struct req *r,
                                     const struct ingest_response *resp)
{
    return reply(c, r, resp->status, "application/json", resp->body.data ? resp->body.data : "{}",
                 resp->body.data ? resp->body.len : 2, resp->retry_after_s);
    (void)h;
}

static enum MHD_Result answer_ready(http_in *h, struct MHD_Connection *c, struct req *r)
{
    buf reasons, out;
    buf_init(&reasons, 4096);
    buf_init(&out, 8192);
    int ready = h->hooks.ready ? h->hooks.ready(h->hooks.ctx, &reasons) : 1;
    if (atomic_load(&h->in->draining)) {
        ready = 0;
        if (reasons.len)
            (void)!buf_addc(&reasons, ',');
        (void)!buf_adds(&reasons, "\"shutting down\"");
    }
    (void)!buf_printf(&out, "{\"ready\":%s,\"reasons\":[%s]}", ready ? "true" : "false",
                      reasons.data ? reasons.data : "");
    enum MHD_Result rc = reply_json(c, r, ready ? 200 : 503, out.data ? out.data : "{}", 0);
    buf_free(&reasons);
    buf_free(&out);
    return rc;
}

static enum MHD_Result answer_metrics(http_in *h, struct MHD_Connection *c, struct req *r)
{
    struct metrics_gauges g = {0};
    struct snapshot s;
    reload_get(&s);
    g.rules_version = s.rs ? ruleset_version(s.rs) : "";
    g.event_names_limit = s.cfg ? s.cfg->mparticle_event_names_limit : 0;
    reload_status(&g.reload_ok, &g.reload_loaded_ms);
    if (h->hooks.gauges)
        h->hooks.gauges(h->hooks.ctx, &g);
    if (atomic_load(&h->in->draining))
        g.ready = 0; /* as /readyz says: "shutting down" */
    g.request_body_bytes = (int64_t)atomic_load(&body_bytes);
    buf out;
    buf_init(&out, 1 << 20);
    enum MHD_Result rc;
    if (metrics_render(&out, &g) != 0)
        rc = reply_json(c, r, 500, "{\"error\":\"metrics too large\"}", 0);
    else
        rc = reply(c, r, 200, "text/plain; version=0.0.4", out.data, out.len, 0);
    buf_free(&out);
    reload_put(&s);
    return rc;
}

/* A route other than /currents, as soon as its headers are known: 1 with the
 * request answered (404 for /admin/reload without admin.token, 429 for a
 * throttled client, 401 without the route's token), 0 when it may go on:
 * /admin/reload with admin.token, /metrics with metrics.token when one is set,
 * and the health checks. Nothing of a body has been read. */
static int refuse_without_token(struct MHD_Connection *c, struct req *r, enum MHD_Result *rc)
{
    if (r->route != R_ADMIN_RELOAD && r->route != R_METRICS)
        return 0;
    struct snapshot s;
    reload_get(&s);
    const char *token = r->route == R_ADMIN_RELOAD ? s.cfg->admin_token : s.cfg->metrics_token;
    enum auth_result a =
        token ? auth_check_bearer(token, MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                                     MHD_HTTP_HEADER_AUTHORIZATION))
              : AUTH_INVALID;
    reload_put(&s);
    if (!token && r->route == R_METRICS)
        return 0;
    if (!token) { /* a reload took admin.token away since route_of */
        metrics_add(M_HTTP_UNKNOWN_PATH, 1);
        *rc = reply_json(c, r, 404, "{\"error\":\"not found\"}", 0);
        return 1;
    }
    int64_t now = clock_mono_ms() / 1000, wait_s = 0; /* as ingest's throttle */
    if (auth_throttled(r->client, now, &wait_s)) {
        metrics_add(M_AUTH_THROTTLED, 1);
        *rc = reply_json(c, r, 429, "{\"error\":\"too many authentication failures\"}",
                         (int)(wait_s > 0 ? wait_s : 1));
        return 1;
    }
    if (a == AUTH_ERROR) {
        auth_log_error();
        *rc = reply_json(c, r, 503, "{\"error\":\"temporarily unable to authenticate\"}", 1);
        return 1;
    }
    if (a != AUTH_OK) {
        /* not Braze's: TributaryInboundAuthFailing reads M_AUTH_FAILURES */
        metrics_add(r->route == R_ADMIN_RELOAD ? M_ADMIN_AUTH_FAILURES : M_METRICS_AUTH_FAILURES,
                    1);
        static struct log_budget failed_lines;
        if (log_budget_allows(&failed_lines, LOG_WARN, AUTH_LINES_PER_SECOND,
                              "requests refused without a valid token: more this second than the "
                              "log takes; the rest of them are left out of it "
                              "(tributary_metrics_auth_failures_total and "
                              "tributary_admin_auth_failures_total count them)"))
            log_warn("request refused: no valid token",
                     LOG_S("path", ROUTE_PATHS[r->route]) LOG_S("client", r->client)
                         LOG_S("reason", auth_result_text(a)));
        if (auth_failed(r->client, now))
            auth_log_refusal(r->client);
        *rc = reply_json(c, r, 401,
                         r->route == R_ADMIN_RELOAD ? "{\"error\":\"admin token required\"}"
                                                    : "{\"error\":\"metrics token required\"}",
                         0);
        return 1;
    }
    /* no auth_succeeded: an address earns the throttle's trust on /currents
     * alone, or a scraper's token would let it guess inbound tokens freely */
    return 0;
}

/* POST /admin/reload once the request is complete; refuse_without_token let it in. */
static enum MHD_Result answer_admin_reload(struct MHD_Connection *c, struct req *r)
{
    struct snapshot s;
    char err[4096];
    buf out;
    buf_init(&out, 16384);
    int status, reloaded = reload_now("admin request", err, sizeof err);
    if (reloaded == 0) {
        reload_get(&s);
        (void)!buf_printf(&out, "{\"reloaded\":true,\"rules_version\":\"%s\",\"generation\":%llu}",
                          ruleset_version(s.rs), (unsigned long long)s.generation);
        reload_put(&s);
        status = 200;
    } else {
        (void)!buf_adds(&out, "{\"reloaded\":false,\"error\":");
        (void)!buf_json_str(&out, err, strlen(err));
        (void)!buf_addc(&out, '}');
        status = reloaded == RELOAD_STOPPING ? 503 : 422; /* a stop is our state, not the files' */
    }
    enum MHD_Result rc = reply_json(c, r, status, out.data ? out.data : "{}", 0);
    buf_free(&out);
    return rc;
}

/* What the headers say of the body's length, and their size (see head_problem). */
struct framing {
    size_t bytes;   /* the header lines' length, about */
    int te_lines;   /* Transfer-Encoding header lines */
    int te_other;   /* one of them is not exactly "chunked" */
    int cl_lines;   /* Content-Length header lines */
    int cl_differ;  /* one differs from the first */
    int folded;     /* a line folded under a header (obs-fold) */
    int spaced;     /* blanks between a header's name and its colon */
    const char *cl; /* the first Content-Length, without its surrounding blanks */
    size_t cl_n;
};

static enum MHD_Result note_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                    const char *value)
{
    (void)kind;
    struct framing *f = cls;
    if (!key || !value)
        return MHD_YES;
    f->bytes += strlen(key) + strlen(value) + 4; /* ": " and CRLF */
    /* libmicrohttpd joins a line folded under a header to the header's name:
     * "Content-Length: 100" then " Content-Length: 100" is a header named
     * "Content-LengthContent-Length: 100", and the request one without a body */
    size_t kn = strlen(key);
    int spaced = kn && (key[kn - 1] == ' ' || key[kn - 1] == '\t') && !strchr(key, ':');
    f->spaced |= spaced;
    f->folded |= !spaced && (strpbrk(key, ": \t") != NULL ||
                             (strncasecmp(key, "Content-Length", 14) == 0 && key[14]) ||
                             (strncasecmp(key, "Transfer-Encoding", 17) == 0 && key[17]));
    size_t n;
    const char *v = str_trim_blanks(value, &n);
    if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        /* read as libmicrohttpd reads it, which skips the blanks before a
         * value but not those after: "chunked " is not chunked to it, and it
         * would read such a body to the end of the connection */
        f->te_lines++;
        f->te_other |= strcasecmp(value + strspn(value, " \t"), "chunked") != 0;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
        if (f->cl_lines++ == 0) {
            f->cl = v;
            f->cl_n = n;
        }
        f->cl_differ |= n != f->cl_n || memcmp(v, f->cl, n) != 0;
    }
    return MHD_YES;
}

/* What is wrong with a request's head, if anything: headers over HEADERS_MAX
 * (431), or a body whose length is not plain to see. Where a proxy in front
 * frames a body by one header and this server by another, the two see
 * different requests on the connection (request smuggling). So, as RFC 9112
 * lets a server do (6.1, 6.3), a request is refused, and its connection
 * closed, when it has both
 * Content-Length and Transfer-Encoding (400), Content-Length values that differ
 * (400; libmicrohttpd refuses one that is not a number), a header line folded
 * onto the next (obs-fold, 400, RFC 9112 5.2), blanks before a header's colon
 * (400, RFC 9112 5.1: "Content-Length : 5" may be the length to one reader and
 * an unknown header to another), or a transfer coding other than
 * chunked alone, which libmicrohttpd cannot read (501; it would read to the end
 * of the connection). A request that should bring a body (body_expected) and
 * says nothing of its length gets 411. Returns the reason and sets *status,
 * or NULL. */
static const char *head_problem(struct MHD_Connection *c, const char *url, int body_expected,
                                int *status)
{
    struct framing f = {0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, note_framing, &f);
    *status = 431;
    if (f.bytes + strlen(url) > HEADERS_MAX)
        return "request headers over 60 KiB";
    _Static_assert(HEADERS_MAX == 60 * 1024, "the message above says 60 KiB");
    *status = 400;
    if (f.folded)
        return "a header line folded onto the next (obs-fold): the body's length is ambiguous";
    if (f.spaced)
        return "blanks between a header's name and its colon, which HTTP forbids (RFC 9112 5.1)";
    if (f.te_lines && f.cl_lines)
        return "Content-Length and Transfer-Encoding together: the body's length is ambiguous";
    if (f.cl_differ)
        return "Content-Length values that differ: the body's length is ambiguous";
    *status = 501;
    if (f.te_lines > 1 || f.te_other)
        return "a Transfer-Encoding other than chunked is not supported";
    /* without either, a request has no body: what an HTTP/1.0 client sends
     * after the headers would be read as nothing, and answered 200 */
    *status = 411;
    if (body_expected && !f.cl_lines && !f.te_lines)
        return "a POST to /currents needs Content-Length or Transfer-Encoding: chunked";
    return NULL;
}

/* Whether the request brings a body: HTTP/1.1 has one exactly when it says so
 * with Content-Length (above 0) or Transfer-Encoding. */
static int has_body(struct MHD_Connection *c)
{
    const char *te =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    const char *cl =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    int64_t len = 0;
    return te != NULL || (cl != NULL && (parse_int64(cl, 0, INT64_MAX, &len) != 0 || len > 0));
}

static enum MHD_Result refuse_body(struct MHD_Connection *c, struct req *r)
{
    return reply_json(c, r, 413, "{\"error\":\"this path takes no request body\"}", 0);
}

/* Every request but POST /currents, as soon as its headers are known. Only
 * /currents reads a body: everything else is decided on the headers, so no
 * body is ever held for a route that has no use for it (bodies read before
 * authentication are bounded by UNAUTHENTICATED_BODY_BUDGET, and only
 * /currents has them). An unknown path (404), a wrong method (405), a request
 * without the token its route needs and a request that brings a body (413)
 * are answered at once;
 * libmicrohttpd then reads none of the body and closes the connection after
 * the answer. The rest is answered once the (empty) request is complete. */
static enum MHD_Result begin_other(struct MHD_Connection *c, struct req *r, int post)
{
    enum MHD_Result rc = MHD_YES;
    log_set_request(r->id);
    r->answered = 1;
    if (r->route == R_NONE) {
        /* Braze takes a 404 for a configuration error and stops: a POST there
         * is most likely a connector set up with a wrong URL */
        static _Atomic int64_t logged_ms;
        metrics_add(M_HTTP_UNKNOWN_PATH, 1);
        if (post && log_due_shared(&logged_ms))
            log_warn("POST to a path not served (404); Braze's Currents connector posts to "
                     "/currents (see tributary_http_unknown_path_total)",
                     LOG_S("client", r->client));
        rc = reply_json(c, r, 404, "{\"error\":\"not found\"}", 0);
    } else if (!r->method_ok) {
        rc = reply_json(c, r, 405, "{\"error\":\"method not allowed\"}", 0);
    } else if (!refuse_without_token(c, r, &rc)) {
        if (has_body(c))
            rc = refuse_body(c, r);
        else
            r->answered = 0;
    }
    log_set_request(NULL);
    return rc;
}

/* ---- request-time watchdog ---------------------------------------------- */

static struct conn *conn_of(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return info ? info->socket_context : NULL;
}

/* Sets when the connection's current request must have arrived whole, at the
 * latest (only_earlier: unless it already must sooner). Nothing tells when a
 * request's first byte came, so the clock starts at what is known: a
 * connection's first request must be in request_timeout_s after the
 * connection was accepted (on_connection); a later one on a kept-alive
 * connection gets the idle wait allowed between requests (timeout_s, after
 * which libmicrohttpd closes the connection anyway) plus request_timeout_s
 * from the end of the one before (on_completed); a request line, once there,
 * brings the deadline forward to request_timeout_s from then
 * (on_request_line). */
static void watch_until(http_in *h, struct conn *k, int64_t deadline, int only_earlier)
{
    pthread_mutex_lock(&h->conns_mu);
    if (!k->cut && (!only_earlier || !k->deadline || deadline < k->deadline))
        k->deadline = deadline;
    pthread_mutex_unlock(&h->conns_mu);
}

/* The request is complete: the watchdog leaves the connection alone while it
 * is answered. */
static void received(struct MHD_Connection *c, http_in *h)
{
    struct conn *k = conn_of(c);
    if (!k)
        return;
    pthread_mutex_lock(&h->conns_mu);
    k->deadline = 0;
    pthread_mutex_unlock(&h->conns_mu);
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    http_in *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *info =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        struct conn *k = calloc(1, sizeof(*k));
        if (!k) {
            /* its TLS handshake cannot be followed (no replaced pair is
             * released while it is open), nor can the watchdog cut it:
             * closed at once */
            pthread_mutex_lock(&h->conns_mu);
            h->untracked++;
            pthread_mutex_unlock(&h->conns_mu);
            if (info)
                (void)shutdown(info->connect_fd, SHUT_RDWR);
            return;
        }
        k->fd = info ? dup(info->connect_fd) : -1;
        if (info && k->fd < 0) {
            /* no open file left to watch it by: a connection the watchdog
             * cannot cut could trickle for ever. Closed at once, as one
             * past http.max_connections is (the files of connections are
             * counted at start, see connection_limit: only files taken
             * by others bring this) */
            int dup_errno = errno;
            static _Atomic int64_t logged_ms;
            metrics_add(M_HTTP_CONNECTIONS_REFUSED, 1);
            if (log_due_shared(&logged_ms))
                log_warn("connection refused: no open file left to watch it by (raise "
                         "LimitNOFILE= of the unit, or ulimit -n; see "
                         "tributary_http_connections_refused_total)",
                         LOG_S("error", strerror(dup_errno)));
            (void)shutdown(info->connect_fd, SHUT_RDWR);
        }
        k->accepted_ms = clock_mono_ms();
        k->deadline = k->accepted_ms + (int64_t)h->opt.request_timeout_s * 1000;
        (void)peer_address(c, k->peer, sizeof k->peer);
        str_copy(k->client, sizeof k->client, k->peer);
        pthread_mutex_lock(&h->conns_mu);
        k->next = h->conns;
        if (h->conns)
            h->conns->prev = k;
        h->conns = k;
        pthread_mutex_unlock(&h->conns_mu);
        *socket_context = k;
        return;
    }
    struct conn *k = *socket_context;
    pthread_mutex_lock(&h->conns_mu);
    if (!k) {
        h->untracked--;
        pthread_mutex_unlock(&h->conns_mu);
        return;
    }
    if (k->prev)
        k->prev->next = k->next;
    else
        h->conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    pthread_mutex_unlock(&h->conns_mu);
    if (k->fd >= 0)
        close(k->fd);
    free(k);
    *socket_context = NULL;
}

/* Called when a request line has arrived, before the headers: the request has
 * begun by now. Its path is taken from the target as it came (the headers,
 * once there, say it for sure: see watch_request); a target too long to look
 * at here (an absolute-form one with a long host) waits for them. */
static void *on_request_line(void *cls, const char *uri, struct MHD_Connection *c)
{
    http_in *h = cls;
    struct conn *k = conn_of(c);
    if (!k)
        return NULL;
    watch_until(h, k, clock_mono_ms() + (int64_t)h->opt.request_timeout_s * 1000, 1);
    char target[256];
    size_t n = strcspn(uri, "?");
    if (n >= sizeof target)
        return NULL;
    memcpy(target, uri, n);
    target[n] = '\0';
    pthread_mutex_lock(&h->conns_mu);
    k->path = ROUTE_PATHS[route_of(target)];
    pthread_mutex_unlock(&h->conns_mu);
    return NULL;
}

/* The request's headers have come: the watchdog's line names its client, path
 * and id. */
static void watch_request(http_in *h, struct MHD_Connection *c, const struct req *r)
{
    struct conn *k = conn_of(c);
    if (!k)
        return;
    pthread_mutex_lock(&h->conns_mu);
    str_copy(k->client, sizeof k->client, r->client);
    str_copy(k->id, sizeof k->id, r->id);
    k->path = ROUTE_PATHS[r->route];
    pthread_mutex_unlock(&h->conns_mu);
}

/* A request cut off, because it had not arrived whole within limit_s
 * (http.request_timeout_s) or its client sent nothing for limit_s
 * (http.timeout_s): counted always, said now and then (a client that trickles
 * may open connection after connection). Under conns_mu. */
static void log_cut(const struct conn *k, const char *msg, int limit_s)
{
    static _Atomic int64_t logged_ms;
    metrics_add(M_HTTP_REQUESTS_TIMED_OUT, 1);
    if (!log_due_shared(&logged_ms))
        return;
    log_set_request(k->id[0] ? k->id : NULL);
    if (k->path)
        log_warn(msg, LOG_S("client", k->client) LOG_S("path", k->path) LOG_I("limit_s", limit_s));
    else
        log_warn(msg, LOG_S("client", k->client) LOG_I("limit_s", limit_s));
    log_set_request(NULL);
}

static void *watchdog_main(void *arg)
{
    http_in *h = arg;
    pthread_setname_np(pthread_self(), "http-watchdog");
    pthread_mutex_lock(&h->conns_mu);
    while (!h->stopping) {
        int64_t now = clock_mono_ms();
        /* read under conns_mu: a connection accepted later is accepted at now
         * or after */
        int64_t oldest = now;
        for (struct conn *k = h->conns; k; k = k->next) {
            if (k->accepted_ms < oldest)
                oldest = k->accepted_ms;
            if (k->deadline && now > k->deadline && k->fd >= 0) {
                log_cut(k,
                        "request took too long to arrive; connection closed (see "
                        "tributary_http_requests_timed_out_total)",
                        h->opt.request_timeout_s);
                /* the socket is shut down, not closed: its number stays ours until
                 * libmicrohttpd reports the connection closed */
                shutdown(k->fd, SHUT_RDWR);
                k->deadline = 0;
                k->cut = 1;
            }
        }
        if (h->opt.tls && h->untracked == 0) {
            pthread_mutex_unlock(&h->conns_mu);
            tls_release_retired(oldest);
            pthread_mutex_lock(&h->conns_mu);
            if (h->stopping)
                break;
        }
        cond_wait_ms(&h->conns_cv, &h->conns_mu, 1000);
    }
    pthread_mutex_unlock(&h->conns_mu);
    return NULL;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    (void)version;
    http_in *h = cls;
    struct req *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof(*r));
        if (!r)
            return MHD_NO;
        *con_cls = r;
        clock_gettime(CLOCK_MONOTONIC, &r->start);
        pthread_mutex_lock(&h->conns_mu);
        if (!h->draining) {
            h->in_progress++;
            r->tracked = 1;
        }
        pthread_mutex_unlock(&h->conns_mu);
        const char *rid = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Request-Id");
        if (rid && strlen(rid) < sizeof r->id &&
            strspn(rid, "abcdefghijklmnopqrstuvwxyz"
                        "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789-_.") == strlen(rid))
            str_copy(r->id, sizeof r->id, rid);
        else
            snprintf(r->id, sizeof r->id, "%08x-%06llx", (unsigned)time(NULL),
                     (unsigned long long)(atomic_fetch_add(&request_seq, 1) & 0xffffff));
        r->route = route_of(url);
        client_address(c, r->client, sizeof r->client);
        watch_request(h, c, r);
        int status;
        const char *why = head_problem(
            c, url, r->route == R_CURRENTS && strcmp(method, MHD_HTTP_METHOD_POST) == 0, &status);
        if (why) {
            static _Atomic int64_t logged_ms;
            log_set_request(r->id);
            if (log_due_shared(&logged_ms))
                log_warn("request refused, connection closed",
                         LOG_S("reason", why) LOG_S("client", r->client));
            r->answered = 1;
            r->close = 1;
            char msg[160];
            snprintf(msg, sizeof msg, "{\"error\":\"%s\"}", why);
            enum MHD_Result rc = reply_json(c, r, status, msg, 0);
            log_set_request(NULL);
            return rc;
        }
        int post = r->route == R_CURRENTS || r->route == R_ADMIN_RELOAD;
        r->method_ok = post ? strcmp(method, MHD_HTTP_METHOD_POST) == 0
                            : (strcmp(method, MHD_HTTP_METHOD_GET) == 0 ||
                               strcmp(method, MHD_HTTP_METHOD_HEAD) == 0);
        buf_init(&r->body, h->opt.max_body);
        if (r->route != R_CURRENTS || !r->method_ok)
            return begin_other(c, r, strcmp(method, MHD_HTTP_METHOD_POST) == 0);
        log_set_request(r->id);
        /* Answer before reading a body that will be refused anyway. */
        struct ingest_response resp = {0};
        buf_init(&resp.body, 4096);
        enum MHD_Result rc = MHD_YES;
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        int64_t len = 0;
        struct ingest_request q = headers_of(c, r);
        int admitted = ingest_precheck(h->in, &q, &resp);
        r->admitted = admitted;
        if (admitted == 2)
            r->pool =
                h->pool_budget[POOL_TRUSTED] && auth_trusted(r->client, clock_mono_ms() / 1000)
                    ? POOL_TRUSTED
                    : POOL_UNKNOWN;
        int has_length = cl && parse_int64(cl, 0, INT64_MAX, &len) == 0;
        const char *encoding = unsupported_encoding(c);
        int64_t known = has_length ? len : -1;
        if (!admitted) {
            const char *json = resp.body.data ? resp.body.data : "{}";
            size_t json_len = resp.body.data ? resp.body.len : 2;
            if (!answer_after_body(h, c, r, resp.status, json, json_len, resp.retry_after_s,
                                   known)) {
                r->answered = 1;
                rc = answer_ingest(h, c, r, &resp);
            }
        } else if (encoding) {
            log_unsupported_encoding(encoding);
            if (!answer_after_body(h, c, r, 415, UNSUPPORTED_ENCODING, strlen(UNSUPPORTED_ENCODING),
                                   0, known)) {
                r->answered = 1;
                rc = reply_json(c, r, 415, UNSUPPORTED_ENCODING, 0);
            }
        } else if (has_length && (uint64_t)len > body_limit(h, r)) {
            if (admitted == 1 && (uint64_t)len <= TOO_LARGE_READ_MAX && !waits_to_send(c)) {
                /* read and dropped, then answered (see TOO_LARGE_READ_MAX) */
                r->too_large = 1;
            } else {
                r->answered = 1;
                rc = refuse_too_large(h, c, r);
            }
        } else if (has_length) {
            /* refused before it is read when there is no room for it:
             * Braze retries a 503 and a broken connection alike. The room
             * is taken now for the whole body, but for a request only its
             * signature can admit: it takes the room of the bytes it sends,
             * or headers alone would hold the room of signed requests. */
            r->busy = take_body(h, r, (size_t)len);
            if (r->busy != B_FITS) {
                r->answered = 1;
                rc = refuse_busy(c, r);
            } else if (admitted == 2) {
                release_body(r); /* there is room now; taken as it comes */
            } else {
                r->taken = 1;
            }
        }
        buf_free(&resp.body);
        log_set_request(NULL);
        return rc;
    }

    if (*upload_size) {
        if (r->route != R_CURRENTS) {
            /* not expected (begin_other answers a request with a body), and
             * never stored */
            r->unwanted_body = 1;
            *upload_size = 0;
            return MHD_YES;
        }
        size_t n = *upload_size;
        *upload_size = 0;
        if (r->answered || r->after_body.status || r->too_large || r->no_memory || r->busy)
            return drop(h, r, n);
        if (n > body_limit(h, r) - r->body.len)
            r->too_large = 1; /* 413 before busy: Braze splits it */
        else if (!r->taken)
            r->busy = take_body(h, r, n); /* not taken at its headers: piece by piece */
        if (!r->too_large && !r->busy && buf_add(&r->body, upload, n) != 0)
            r->no_memory = 1;
        /* the rest is read and dropped: what is not kept leaves the budgets
         * at once (a chunked body over max_body held them to its end) */
        if (r->busy || r->too_large || r->no_memory)
            release_body(r);
        return MHD_YES;
    }
    if (r->answered)
        return MHD_YES;
    received(c, h);

    log_set_request(r->id);
    enum MHD_Result rc;
    if (r->unwanted_body) {
        rc = refuse_body(c, r);
    } else if (r->route == R_HEALTHZ) {
        rc = reply_json(c, r, 200, "{\"status\":\"ok\"}", 0);
    } else if (r->route == R_READYZ) {
        rc = answer_ready(h, c, r);
    } else if (r->route == R_METRICS) {
        rc = answer_metrics(h, c, r);
    } else if (r->route == R_ADMIN_RELOAD) {
        rc = answer_admin_reload(c, r);
    } else if (r->after_body.status) {
        rc = reply_json(c, r, r->after_body.status, r->after_body.json, r->after_body.retry_after);
    } else if (r->too_large) {
        rc = refuse_too_large(h, c, r);
    } else if (r->busy) {
        rc = refuse_busy(c, r);
    } else if (r->no_memory) {
        log_repeated(LOG_ERROR, "out of memory for a request body; answered 503");
        rc = reply_json(c, r, 503, "{\"error\":\"out of memory\"}", RETRY_AFTER_NO_MEMORY);
    } else {
        struct ingest_request req = headers_of(c, r);
        req.body = r->body.data ? r->body.data : "";
        req.len = r->body.len;
        struct ingest_response resp = {0};
        buf_init(&resp.body, 1 << 16);
        ingest_handle(h->in, &req, &resp);
        rc = answer_ingest(h, c, r, &resp);
        buf_free(&resp.body);
    }
    log_set_request(NULL);
    return rc;
}

/* A request is over (answered, or cut short). On a kept-alive connection the
 * next request is timed from here. */
static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    http_in *h = cls;
    struct conn *k = conn_of(c);
    struct req *r = *con_cls;
    /* one whose client went away first (not one the watchdog cut): a load
     * balancer or proxy in between that closes connections shows here. Only
     * a request admitted by its headers (a token), and not already refused:
     * anyone can send a signature, checked once the body is whole, or a
     * wrong token, and then go */
    int cut = 0;
    if (k) {
        pthread_mutex_lock(&h->conns_mu);
        cut = k->cut;
        pthread_mutex_unlock(&h->conns_mu);
    }
    if (r && !r->replied && !cut && r->admitted == 1 && !r->after_body.status && !r->too_large &&
        !r->busy && !r->no_memory &&
        (toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT || toe == MHD_REQUEST_TERMINATED_READ_ERROR)) {
        metrics_add(M_HTTP_REQUESTS_ABANDONED, 1);
        log_debug("request abandoned: its client closed the connection before the answer",
                  LOG_S("client", r->client)
                      LOG_I("body_bytes", (long long)(r->body.len + r->dropped)));
    }
    /* a request, not its answer, that its client stopped sending (the
     * watchdog's own cut, k->cut, is counted where it is made) */
    if (k && toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED && !(r && r->replied)) {
        pthread_mutex_lock(&h->conns_mu);
        if (!k->cut)
            log_cut(k,
                    "client sent nothing for http.timeout_s in the middle of a request; "
                    "connection closed (see tributary_http_requests_timed_out_total)",
                    h->opt.timeout_s);
        pthread_mutex_unlock(&h->conns_mu);
    }
    if (k) {
        watch_until(h, k,
                    clock_mono_ms() + ((int64_t)h->opt.timeout_s + h->opt.request_timeout_s) * 1000,
                    0);
        /* the next request on the connection is not known yet */
        pthread_mutex_lock(&h->conns_mu);
        str_copy(k->client, sizeof k->client, k->peer);
        k->path = NULL;
        k->id[0] = '\0';
        pthread_mutex_unlock(&h->conns_mu);
    }
    if (!r)
        return;
    if (r->tracked) {
        pthread_mutex_lock(&h->conns_mu);
        if (--h->in_progress == 0)
            pthread_cond_broadcast(&h->drained_cv);
        pthread_mutex_unlock(&h->conns_mu);
    }
    release_body(r);
    free(r);
    *con_cls = NULL;
}

/* libmicrohttpd says what it refused only in its log: requests it answered
 * itself, which never reach on_request (Braze retries each as it is, so one
 * that never fits fails until Braze gives up), connections past
 * http.max_connections or http.max_connections_per_ip (one message for both:
 * with fewer than http.max_connections open, it was the address's limit), and
 * accepting put off for want of open files (once each time, not per
 * connection). Counted, and said at warn level. */
static int server_refusal(http_in *h, const char *msg)
{
    enum { FULL, PER_IP, ANSWERED, NO_FILES, KINDS };
    static _Atomic int64_t logged_ms[KINDS];
    static const char *const lines[KINDS] = {
        [FULL] = "connection refused: http.max_connections are open (see "
                 "tributary_http_connections_refused_total)",
        [PER_IP] = "connection refused: http.max_connections_per_ip are open from its address "
                   "(see tributary_http_connections_refused_per_ip_total)",
        [ANSWERED] = "the HTTP server refused a request before reading it (see "
                     "tributary_http_server_refused_total)",
        [NO_FILES] = "connections not accepted for a while: the process has no open file left "
                     "(raise LimitNOFILE= of the unit, or ulimit -n; see "
                     "tributary_http_connections_refused_total)",
    };
    int kind;
    if (strstr(msg, "HTTP response code is ") != NULL)
        kind = ANSWERED;
    else if (strncmp(msg, "Server reached connection limit", 31) == 0)
        kind = FULL;
    else if (strncmp(msg, "Hit process or system resource limit", 36) == 0)
        kind = NO_FILES;
    else
        return 0;
    if (kind == FULL && h->opt.max_connections_per_ip > 0) {
        pthread_mutex_lock(&h->conns_mu);
        int open = h->untracked;
        for (const struct conn *k = h->conns; k && open < h->opt.max_connections; k = k->next)
            open++;
        if (open < h->opt.max_connections)
            kind = PER_IP;
        pthread_mutex_unlock(&h->conns_mu);
    }
    static const enum counter counters[KINDS] = {
        [FULL] = M_HTTP_CONNECTIONS_REFUSED,
        [PER_IP] = M_HTTP_CONNECTIONS_REFUSED_PER_IP,
        [ANSWERED] = M_HTTP_SERVER_REFUSED,
        [NO_FILES] = M_HTTP_CONNECTIONS_REFUSED,
    };
    metrics_add(counters[kind], 1);
    if (log_due_shared(&logged_ms[kind]))
        log_warn(lines[kind], LOG_S("detail", msg));
    return 1;
}

/* A TLS handshake that failed: libmicrohttpd says no more of it, nor of the
 * client (its message is the same whatever the cause). A load balancer's TCP
 * health check fails one every few seconds, so the log says how many failed,
 * at most once a minute. Returns whether msg says so. */
#define HANDSHAKE_LOG_EVERY_MS 60000

static int handshake_failure(const char *msg)
{
    static _Atomic int64_t logged_ms;
    static atomic_llong unsaid;
    if (!strstr(msg, "handshake"))
        return 0;
    metrics_add(M_TLS_HANDSHAKE_FAILURES, 1);
    atomic_fetch_add(&unsaid, 1);
    if (log_due_shared_every(&logged_ms, HANDSHAKE_LOG_EVERY_MS))
        log_info("TLS handshakes failed: a client that does not trust the certificate (one "
                 "renewed without its intermediate certificates?), plain HTTP sent to the HTTPS "
                 "port, or a TCP health check (see tributary_tls_handshake_failures_total)",
                 LOG_I("failures", (long long)atomic_exchange(&unsaid, 0)) LOG_S("detail", msg));
    return 1;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    http_in *h = cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    if (!server_refusal(h, msg) && !handshake_failure(msg))
        log_debug("http server", LOG_S("detail", msg));
    pthread_mutex_lock(&h->start_mu);
    if (h->starting && !h->start_error[0])
        str_copy(h->start_error, sizeof h->start_error, msg);
    pthread_mutex_unlock(&h->start_mu);
}

/* Frees h and what http_in_start made for it, but the daemon and threads. */
static void free_listener(http_in *h)
{
    pthread_mutex_destroy(&h->conns_mu);
    pthread_cond_destroy(&h->conns_cv);
    pthread_cond_destroy(&h->drained_cv);
    pthread_mutex_destroy(&h->start_mu);
    free(h);
}

int http_in_start(http_in **out, struct ingest *in, const struct http_in_options *o,
                  const struct http_in_hooks *hooks, char *err, size_t errlen)
{
    *out = NULL;
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    int gai = getaddrinfo(o->host, port, &hints, &ai);
    if (gai != 0) {
        str_printf(err, errlen, "listen %s: %s", o->host, gai_strerror(gai));
        return -1;
    }
    http_in *h = calloc(1, sizeof(*h));
    if (!h) {
        freeaddrinfo(ai);
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    h->in = in;
    h->opt = *o;
    http_in_pool_budgets(o->body_memory, o->max_body, &h->pool_budget[POOL_UNKNOWN],
                         &h->pool_budget[POOL_TRUSTED]);
    if (hooks)
        h->hooks = *hooks;
    pthread_mutex_init(&h->conns_mu, NULL);
    /* timed on the monotonic clock: a wall clock stepped back would hold
     * off the cut of requests past http.request_timeout_s, and stretch the
     * grace of a shutdown */
    cond_init_monotonic(&h->conns_cv);
    cond_init_monotonic(&h->drained_cv);
    pthread_mutex_init(&h->start_mu, NULL);
    /* A thread per connection: a request waiting for its commit holds only its
     * own connection, and requests of every connection can share a commit. The
     * Lua work is bounded separately by the engine pool (ingest). */
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                         MHD_USE_POLL | MHD_USE_ERROR_LOG;
    /* "[::]" is every address, IPv4 ones too (IPv4-mapped), as most servers
     * take it on Linux; any other IPv6 address is itself alone */
    if (ai->ai_family == AF_INET6)
        flags |= IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)ai->ai_addr)->sin6_addr)
                     ? MHD_USE_DUAL_STACK
                     : MHD_USE_IPv6;
    if (o->tls) {
        if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES ||
            MHD_is_feature_supported(MHD_FEATURE_HTTPS_CERT_CALLBACK) != MHD_YES) {
            str_copy(err, errlen, "this libmicrohttpd has no TLS support");
            freeaddrinfo(ai);
            free_listener(h);
            return -1;
        }
        flags |= MHD_USE_TLS;
    }
    struct MHD_OptionItem opts[] = {
        {MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_log, h},
        {MHD_OPTION_SOCK_ADDR, 0, ai->ai_addr},
        {MHD_OPTION_CONNECTION_LIMIT, o->max_connections, NULL},
        {MHD_OPTION_PER_IP_CONNECTION_LIMIT, o->max_connections_per_ip, NULL},
        {MHD_OPTION_CONNECTION_TIMEOUT, o->timeout_s, NULL},
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, CONNECTION_MEMORY, NULL},
        {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, h},
        {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, h},
        {MHD_OPTION_URI_LOG_CALLBACK, (intptr_t)on_request_line, h},
        /* No MHD_OPTION_LISTENING_ADDRESS_REUSE: without it the listening socket
         * gets SO_REUSEADDR only, so a restart binds at once despite connections
         * in TIME_WAIT, while a second process on the same address fails to
         * start. With it (SO_REUSEPORT) a second `tributary serve` would start
         * and the kernel would split the requests between the two. */
        /* without TLS the list ends here; with it, each handshake asks tls for
         * the certificate, which a reload can replace */
        {o->tls ? MHD_OPTION_HTTPS_CERT_CALLBACK : MHD_OPTION_END, 0, (void *)tls_retrieve},
        {MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)TLS_PRIORITIES},
        {MHD_OPTION_END, 0, NULL},
    };
    pthread_mutex_lock(&h->start_mu);
    h->starting = 1;
    pthread_mutex_unlock(&h->start_mu);
    h->d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, on_request, h, MHD_OPTION_ARRAY,
                            opts, MHD_OPTION_END);
    freeaddrinfo(ai);
    pthread_mutex_lock(&h->start_mu);
    h->starting = 0;
    pthread_mutex_unlock(&h->start_mu);
    if (!h->d) {
        /* e.g. "Failed to bind to port 8080: Address already in use" */
        str_printf(err, errlen, "cannot listen on %s:%d: %s", o->host, o->port,
                   h->start_error[0] ? h->start_error : "address in use or not available");
        free_listener(h);
        return -1;
    }
    if (pthread_create(&h->watchdog, NULL, watchdog_main, h) == 0)
        h->watchdog_started = 1;
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : o->port;
    *out = h;
    return 0;
}

int http_in_port(const http_in *h)
{
    return h->port;
}

void http_in_drain(http_in *h, int64_t grace_ms)
{
    if (!h)
        return;
    atomic_store(&closing_connections, 1);
    int64_t deadline = clock_mono_ms() + grace_ms;
    pthread_mutex_lock(&h->conns_mu);
    h->draining = 1;
    while (h->in_progress > 0) {
        int64_t left = deadline - clock_mono_ms();
        if (left <= 0)
            break;
        cond_wait_ms(&h->drained_cv, &h->conns_mu, left);
    }
    int left = h->in_progress;
    pthread_mutex_unlock(&h->conns_mu);
    if (left > 0)
        log_warn("stopping with requests still in progress; they are cut off, and Braze sends "
                 "them again",
                 LOG_I("requests", left) LOG_I("grace_ms", grace_ms));
}

void http_in_stop(http_in *h)
{
    if (!h)
        return;
    if (h->watchdog_started) {
        pthread_mutex_lock(&h->conns_mu);
        h->stopping = 1;
        pthread_cond_signal(&h->conns_cv);
        pthread_mutex_unlock(&h->conns_mu);
        pthread_join(h->watchdog, NULL);
    }
    MHD_stop_daemon(h->d);
    free_listener(h);
}
