/* sink: a fast mParticle Events API double for the tributary benchmark.
 *
 *   sink [--listen 127.0.0.1] [--port 0] [--port-file FILE] [--threads 2]
 *        --feed NAME:KEY:SECRET [--feed ...]
 *
 * POST /v2/bulkevents (a JSON array of batches) and POST /v2/events (one batch):
 *   no Authorization: Basic header -> 401; credentials of no --feed -> 403;
 *   else 202 with an empty body. Batches are counted as occurrences of
 *   "source_request_id" (one per batch in tributary's bodies) and events as
 *   occurrences of "source_message_id" (one per event); the body is not parsed.
 * GET /stats -> {"requests":..,"batches":..,"events":..,"bytes":..,
 *   "unauthorized":..,"forbidden":..,"last_event_ms":..,"feeds":{"ios":{...}}}
 *   last_event_ms is the wall clock (ms) when the last event arrived.
 * Anything else: 404 (405 for a wrong method). SIGINT/SIGTERM stop it.
 * With --port 0 the kernel picks the port; --port-file receives it.
 */

#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#define MAX_FEEDS 16
#define MAX_BODY (64u << 20)

struct feed {
    char name[32];
    char expect[1024]; /* "Basic base64(key:secret)" */
    _Atomic uint64_t requests, batches, events, bytes;
};

static struct feed feeds[MAX_FEEDS];
static int nfeeds;
static _Atomic uint64_t n_requests, n_batches, n_events, n_bytes, n_unauthorized, n_forbidden,
    n_too_large;
static _Atomic int64_t last_event_ms;

struct req {
    int kind; /* 1 events endpoint, 2 stats, 0 other */
    char *body;
    size_t len, cap;
    int too_large;
};

static int64_t wall_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void base64(const unsigned char *in, size_t n, char *out)
{
    static const char T[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)in[i] << 16;
        if (i + 1 < n)
            v |= (unsigned)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = T[(v >> 18) & 63];
        out[o++] = T[(v >> 12) & 63];
        out[o++] = i + 1 < n ? T[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? T[v & 63] : '=';
    }
    out[o] = '\0';
}

static size_t count(const char *hay, size_t n, const char *needle)
{
    size_t c = 0, k = strlen(needle);
    const char *p = hay, *end = hay + n;
    while (p < end && (p = memmem(p, (size_t)(end - p), needle, k))) {
        c++;
        p += k;
    }
    return c;
}

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned status, const char *type,
                                 const char *body)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    if (type)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result rc = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result send_stats(struct MHD_Connection *c)
{
    char out[8192];
    size_t o = 0;
    o += (size_t)snprintf(out + o, sizeof out - o,
                          "{\"requests\":%llu,\"batches\":%llu,\"events\":%llu,\"bytes\":%llu,"
                          "\"unauthorized\":%llu,\"forbidden\":%llu,\"too_large\":%llu,"
                          "\"last_event_ms\":%lld,\"feeds\":{",
                          (unsigned long long)n_requests, (unsigned long long)n_batches,
                          (unsigned long long)n_events, (unsigned long long)n_bytes,
                          (unsigned long long)n_unauthorized, (unsigned long long)n_forbidden,
                          (unsigned long long)n_too_large, (long long)last_event_ms);
    for (int i = 0; i < nfeeds && o < sizeof out - 256; i++)
        o += (size_t)snprintf(out + o, sizeof out - o,
                              "%s\"%s\":{\"requests\":%llu,\"batches\":%llu,\"events\":%llu,"
                              "\"bytes\":%llu}",
                              i ? "," : "", feeds[i].name, (unsigned long long)feeds[i].requests,
                              (unsigned long long)feeds[i].batches,
                              (unsigned long long)feeds[i].events,
                              (unsigned long long)feeds[i].bytes);
    snprintf(out + o, sizeof out - o, "}}\n");
    return send_text(c, 200, "application/json", out);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    (void)cls;
    (void)version;
    struct req *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof(*r));
        if (!r)
            return MHD_NO;
        if (!strcmp(url, "/v2/bulkevents") || !strcmp(url, "/v2/events"))
            r->kind = 1;
        else if (!strcmp(url, "/stats"))
            r->kind = 2;
        *con_cls = r;
        return MHD_YES;
    }
    if (*upload_size) {
        if (r->kind == 1 && !r->too_large) {
            if (r->len + *upload_size > MAX_BODY) {
                r->too_large = 1;
            } else {
                if (r->len + *upload_size > r->cap) {
                    size_t cap = r->cap ? r->cap : 65536;
                    while (cap < r->len + *upload_size)
                        cap *= 2;
                    char *p = realloc(r->body, cap);
                    if (!p)
                        return MHD_NO;
                    r->body = p;
                    r->cap = cap;
                }
                memcpy(r->body + r->len, upload, *upload_size);
                r->len += *upload_size;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->kind == 2) {
        if (strcmp(method, "GET"))
            return send_text(c, 405, NULL, "");
        return send_stats(c);
    }
    if (r->kind != 1)
        return send_text(c, 404, "application/json",
                         "{\"errors\":[{\"code\":\"NOT_FOUND\",\"message\":\"not found\"}]}");
    if (strcmp(method, "POST"))
        return send_text(c, 405, NULL, "");
    const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!auth || strncasecmp(auth, "Basic ", 6) != 0) {
        n_unauthorized++;
        return send_text(c, 401, "application/json",
                         "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"missing "
                         "credentials\"}]}");
    }
    const char *cred = auth + 6;
    while (*cred == ' ')
        cred++;
    int f = -1;
    for (int i = 0; i < nfeeds; i++)
        if (!strcmp(cred, feeds[i].expect + 6)) {
            f = i;
            break;
        }
    if (f < 0) {
        n_forbidden++;
        return send_text(c, 403, "application/json",
                         "{\"errors\":[{\"code\":\"FORBIDDEN\",\"message\":\"invalid "
                         "credentials\"}]}");
    }
    if (r->too_large) {
        n_too_large++;
        return send_text(c, 413, "application/json",
                         "{\"errors\":[{\"code\":\"PAYLOAD_TOO_LARGE\",\"message\":\"too "
                         "large\"}]}");
    }
    size_t batches = count(r->body ? r->body : "", r->len, "\"source_request_id\"");
    size_t events = count(r->body ? r->body : "", r->len, "\"source_message_id\"");
    n_requests++;
    n_batches += batches;
    n_bytes += r->len;
    feeds[f].requests++;
    feeds[f].batches += batches;
    feeds[f].bytes += r->len;
    if (events) {
        feeds[f].events += events;
        n_events += events;
        last_event_ms = wall_ms();
    }
    return send_text(c, 202, NULL, "");
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    struct req *r = *con_cls;
    if (r) {
        free(r->body);
        free(r);
        *con_cls = NULL;
    }
}

static void usage(void)
{
    fputs("usage: sink [--listen ADDR] [--port N] [--port-file FILE] [--threads N]\n"
          "            --feed NAME:KEY:SECRET [--feed ...]\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    const char *listen_addr = "127.0.0.1", *port_file = NULL;
    unsigned port = 0, threads = 2;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *a = argv[i], *v = argv[++i];
        if (!strcmp(a, "--listen"))
            listen_addr = v;
        else if (!strcmp(a, "--port"))
            port = (unsigned)atoi(v);
        else if (!strcmp(a, "--port-file"))
            port_file = v;
        else if (!strcmp(a, "--threads"))
            threads = (unsigned)atoi(v);
        else if (!strcmp(a, "--feed")) {
            if (nfeeds == MAX_FEEDS)
                usage();
            const char *c1 = strchr(v, ':');
            if (!c1 || c1 == v || (size_t)(c1 - v) >= sizeof feeds[0].name || !strchr(c1 + 1, ':'))
                usage();
            struct feed *f = &feeds[nfeeds++];
            memcpy(f->name, v, (size_t)(c1 - v));
            const char *cred = c1 + 1; /* key:secret, as Basic encodes it */
            size_t n = strlen(cred);
            if ((n + 2) / 3 * 4 + 7 > sizeof f->expect)
                usage();
            memcpy(f->expect, "Basic ", 6);
            base64((const unsigned char *)cred, n, f->expect + 6);
        } else
            usage();
    }
    if (!nfeeds)
        usage();
    if (threads < 1)
        threads = 1;

    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, listen_addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "sink: bad --listen address %s\n", listen_addr);
        return 2;
    }

    /* Signals are taken by sigwait in this thread only; MHD's threads inherit the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, 0, NULL, NULL, handler, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_NOTIFY_COMPLETED, completed, NULL, MHD_OPTION_THREAD_POOL_SIZE, threads,
        MHD_OPTION_CONNECTION_LIMIT, 4096u, MHD_OPTION_CONNECTION_TIMEOUT, 120u,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(256 * 1024), MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "sink: cannot listen on %s:%u\n", listen_addr, port);
        return 1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    unsigned bound = info ? info->port : port;
    if (port_file) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", port_file);
        FILE *f = fopen(tmp, "w");
        if (!f || fprintf(f, "%u\n", bound) < 0 || fclose(f) != 0 || rename(tmp, port_file) != 0) {
            fprintf(stderr, "sink: cannot write %s\n", port_file);
            MHD_stop_daemon(d);
            return 1;
        }
    }
    fprintf(stderr, "sink: listening on %s:%u with %d feeds\n", listen_addr, bound, nfeeds);
    int sig = 0;
    sigwait(&set, &sig);
    MHD_stop_daemon(d);
    fprintf(stderr, "sink: %llu requests, %llu batches, %llu events, %llu bytes\n",
            (unsigned long long)n_requests, (unsigned long long)n_batches,
            (unsigned long long)n_events, (unsigned long long)n_bytes);
    return 0;
}
