/*
 * http_in: the inbound HTTP server (libmicrohttpd).
 *
 *   POST /currents       Braze Currents batches -> ingest (?workspace=NAME: which
 *                        Braze workspace sent them)
 *   GET  /healthz        the process serves
 *   GET  /readyz         rules loaded and storage healthy (200), else 503
 *   GET  /metrics        Prometheus text
 *   POST /admin/reload   reload configuration and rules (admin token; 404 without one)
 *
 * One thread per connection (at most max_connections), so a request waiting for
 * its commit never holds up another connection's.
 *
 * Only POST /currents reads a body: every other request is answered from its
 * headers (404, 405, admin token refused, 413 when it brings a body) before any
 * of its body is read, so no body is held for a route that has no use for it.
 *
 * Bounded: body size (413 as soon as Content-Length says so), header sizes,
 * connections (in all and per address), idle time per connection and the time a
 * whole request may take. Optional TLS (TLS 1.2 and 1.3 only). The only module
 * that includes libmicrohttpd.
 */
#ifndef TRIBUTARY_HTTP_IN_H
#define TRIBUTARY_HTTP_IN_H

#include "ingest.h"
#include "metrics.h"
#include "util.h"

/* Bodies of requests that only a signature over the body can admit are read
 * before anybody is authenticated: all of them together get this much of the
 * option body_memory, and never the room of the largest body that is left
 * for the others. Those from an address a request authenticated from within
 * AUTH_TRUSTED_S (Braze's, once it has been served) get a room of their own
 * as large, where body_memory leaves room for both: clients elsewhere that
 * never complete a body cannot hold a signing sender out. */
#define UNAUTHENTICATED_BODY_BUDGET ((size_t)64 << 20)

/* The room of bodies awaiting a signature check from senders not served
 * before, and from those served before (0: none of their own, they share the
 * first), of a body_memory that takes bodies of at most max_body. */
void http_in_pool_budgets(size_t body_memory, size_t max_body, size_t *unknown, size_t *trusted);

typedef struct http_in http_in;

struct http_in_options {
    const char *host;
    int port;
    int max_connections;
    int max_connections_per_ip; /* 0: no limit */
    int timeout_s;              /* idle connection */
    /* a whole request (request line, headers, body), however slowly it
     * trickles: timed from the connection's acceptance, or on a kept-alive
     * connection from the end of the previous request plus timeout_s */
    int request_timeout_s;
    size_t max_body;
    size_t body_memory; /* the bodies held at once, all requests together */
    int tls;            /* HTTPS with tls's certificate and key (see tls.h), else plain HTTP */
};

/* What the server asks of the running service. */
struct http_in_hooks {
    void *ctx;
    /* 1 when ready; otherwise appends the reasons (JSON strings, comma-separated). */
    int (*ready)(void *ctx, buf *reasons);
    void (*gauges)(void *ctx, struct metrics_gauges *g);
};

int http_in_start(http_in **out, struct ingest *in, const struct http_in_options *o,
                  const struct http_in_hooks *hooks, char *err, size_t errlen) WUR;
/* The port actually bound (useful with port 0). */
int http_in_port(const http_in *h);
/* For shutdown, once new batches are refused (ingest's draining): every answer
 * now closes its connection, and this waits, for up to grace_ms, until the
 * requests that began before are answered (one waiting for its commit gets
 * its 200, one still arriving its 503), so none is cut off mid-way. */
void http_in_drain(http_in *h, int64_t grace_ms);
/* Stops the server (open connections are closed) and frees it. Accepts NULL. */
void http_in_stop(http_in *h);

#endif
