/*
 * auth: decides whether an inbound request may be accepted.
 *
 * Two ways to authenticate, either enough by default (inbound.require):
 *   - `Authorization: Bearer <token>` (what Braze sends): the token must equal
 *     one of inbound.tokens (several during a rotation);
 *   - `Tributary-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
 *     "<t>.<raw body>")>` for producers that can sign: any v1 may match any of
 *     inbound.hmac_secrets (rotation), and t must lie within
 *     inbound.replay_window_s of now.
 * Comparisons are constant-time: tokens through their SHA-256 digests (so not
 * even the length leaks), signatures over the raw MAC bytes. With neither
 * tokens nor secrets configured, requests are accepted from clients on this
 * machine only (the configuration only allows that on a loopback listener,
 * and a proxy on the same host names its own client in X-Forwarded-For).
 *
 * A client address with repeated failures is refused for a while (429), so
 * guessing is slow; failures are counted and logged without the presented
 * credentials.
 *
 * Uses digest (libcrypto) and config. Never logs or returns a presented secret.
 */
#ifndef TRIBUTARY_AUTH_H
#define TRIBUTARY_AUTH_H

#include "config.h"

#define AUTH_SIGNATURE_HEADER "Tributary-Signature"
#define AUTH_MAX_SIGNATURES 8
/* Failures from one address within the window before it is refused. */
#define AUTH_THROTTLE_FAILURES 10
#define AUTH_THROTTLE_WINDOW_S 60
#define AUTH_THROTTLE_BLOCK_S 60
/* An address from which a request authenticated within this long is not
 * refused (see auth_failed): a connector may be quiet for hours. */
#define AUTH_TRUSTED_S 86400

enum auth_result {
    AUTH_OK,
    AUTH_PENDING, /* depends on the body's signature: decide once it is read */
    AUTH_MISSING, /* no credentials presented */
    AUTH_INVALID, /* credentials presented but wrong */
    AUTH_EXPIRED, /* a signature outside the replay window */
    AUTH_ERROR,   /* our own failure (cryptography library): not the client's */
    AUTH_REMOTE,  /* no credentials configured, and the client is on another machine */
};

struct auth_request {
    const char *authorization; /* header value or NULL */
    const char *signature;     /* Tributary-Signature value or NULL */
    const char *body;
    size_t len;
    int have_body;    /* 0: only the headers are known yet */
    int client_local; /* the client (after a trusted proxy's X-Forwarded-For) is loopback */
    int64_t now_s;
};

enum auth_result auth_check(const struct config *c, const struct auth_request *r);
/* One configured token, such as admin.token or metrics.token (NULL: none is
 * accepted), against an Authorization header. */
enum auth_result auth_check_bearer(const char *token, const char *authorization);
const char *auth_result_text(enum auth_result r);
/* Logs that AUTH_ERROR was answered: at most a line per 10 s, with how many
 * requests met it meanwhile. */
void auth_log_error(void);

/* A parsed Tributary-Signature header. */
struct auth_signature {
    int64_t t;
    unsigned char v1[AUTH_MAX_SIGNATURES][32];
    int n;
};

/* 0, or -1 when the header is malformed (no t, no v1, bad hex, too many). */
int auth_parse_signature(const char *header, struct auth_signature *out) WUR;
/* Writes "t=<t>,v1=<hex>" for body under secret. */
int auth_sign(const char *secret, int64_t t, const char *body, size_t len, char *out,
              size_t outlen) WUR;

/* The throttle counts per client address, and an IPv6 one per /64, which one
 * host or site holds whole (it could change address at every guess). Its
 * now_s is the monotonic clock's (clock_mono_ms() / 1000), not the wall
 * clock's, which steps.
 *
 * 1 when the client is refused for now (*retry_after_s set). */
int auth_throttled(const char *client, int64_t now_s, int64_t *retry_after_s);
/* The lines a second that say failed authentications, and the refusals they
 * start, each (log_budget_allows): a client with many addresses, or behind a
 * trusted one, would otherwise write one per request. The failures are all
 * counted (tributary_auth_failures_total and the metrics and admin ones). */
#define AUTH_LINES_PER_SECOND 20

/* Records a failure; returns 1 when it starts a refusal period. An address
 * from which a request authenticated within AUTH_TRUSTED_S is not refused:
 * its failures are another sender's behind the same address (Braze's
 * addresses serve all its customers, a NAT, a proxy), and refusing it would
 * refuse the real sender too, whose requests, refused, could not lift it. */
int auth_failed(const char *client, int64_t now_s);
/* Says that auth_failed started a refusal of client, within
 * AUTH_LINES_PER_SECOND lines a second. */
void auth_log_refusal(const char *client);
/* Notes that a request from client authenticated (see auth_failed). */
void auth_succeeded(const char *client, int64_t now_s);
/* Whether a request from client authenticated within AUTH_TRUSTED_S. */
int auth_trusted(const char *client, int64_t now_s);

#endif
