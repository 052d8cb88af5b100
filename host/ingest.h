/*
 * ingest: one Currents request, from its bytes to Braze's status code.
 *
 *   authenticate -> map with this thread's rules engine -> commit to the queue
 *   -> 200 with a summary, or the code Braze reacts to correctly:
 *      401 missing/wrong credentials (Braze stops; the customer must fix them)
 *      400 malformed input (Braze splits the batch and drops what stays bad)
 *      413 too large (Braze splits the batch)
 *      503 + Retry-After for our own trouble (Braze retries later), and for a
 *          `?workspace=` this service does not take
 * Nothing is answered 2xx before it is durable, and no failure of ours is
 * answered 4xx.
 *
 * Independent of HTTP, so tests and fuzzers drive it directly. Uses auth, rules,
 * queue, reload, metrics, log.
 */
#ifndef TRIBUTARY_INGEST_H
#define TRIBUTARY_INGEST_H

#include "queue.h"
#include "util.h"

#include <stdatomic.h>

struct ingest_engines;

struct ingest {
    queue *q;
    _Atomic int draining; /* set on shutdown: new batches get 503 */
    struct ingest_engines *engines;
};

/* engines: the most rules engines (Lua states) mapping requests at once. */
int ingest_init(struct ingest *in, queue *q, int engines) WUR;
void ingest_fini(struct ingest *in);

/* Whether requests are mapped: 0 from a request that got 503 "rules
 * unavailable" (neither the rules in force nor the rules before them built an
 * engine) until an engine builds. While 0, it tries to build one, as a request
 * would (at most once a second), so that the answer comes back to 1 without
 * traffic once they build. */
int ingest_rules_available(struct ingest *in);

struct ingest_request {
    const char *authorization; /* Authorization header or NULL */
    const char *signature;     /* Tributary-Signature header or NULL */
    const char *client;        /* peer address, for throttling and logs */
    const char *workspace;     /* the URL's `workspace` parameter, or NULL, */
    size_t workspace_len;      /* of this many bytes (a NUL among them: %00) */
    int workspace_repeated;    /* the URL gives `workspace` more than once, differently */
    const char *body;
    size_t len;
    /* ingest_precheck admitted it by its headers (1): the request is not
     * checked again when its body is in, so that a reload meanwhile (a token
     * rotated out) does not refuse it */
    int authenticated;
};

struct ingest_response {
    int status;
    int retry_after_s; /* 0: no Retry-After header */
    buf body;          /* JSON; caller frees with buf_free */
};

/* The checks that need no body (shutting down, throttled client, credentials
 * that cannot succeed), so a refused request is answered before its body is
 * read. 1: authenticated, go on; 2: go on, but only a signature over the body
 * can admit it; 0: refused, resp filled. body and len of req are ignored. */
int ingest_precheck(struct ingest *in, const struct ingest_request *req,
                    struct ingest_response *resp);

void ingest_handle(struct ingest *in, const struct ingest_request *req,
                   struct ingest_response *resp);

#endif
