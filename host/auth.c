#include "auth.h"

#include "digest.h"
#include "log.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <unistd.h>

/* ---- tokens ------------------------------------------------------------- */

/* 1 when presented is one of accepted, 0 when not, -1 when the hash failed:
 * then nothing is known of the token, and it must not count as wrong. */
static int secret_matches(const struct string_list *accepted, const char *presented, size_t n)
{
    unsigned char want[32], got[32];
    if (digest_sha256(presented, n, got) != 0)
        return -1;
    int match = 0;
    /* Compare against every entry, so the time does not tell which one matched. */
    for (size_t i = 0; i < accepted->n; i++) {
        if (digest_sha256(accepted->items[i], strlen(accepted->items[i]), want) != 0)
            return -1;
        match |= digest_equal(want, sizeof want, got, sizeof got);
    }
    return match;
}

/* The token of an "Authorization: Bearer <token>" header, or NULL. */
static const char *bearer_token(const char *authorization, size_t *n)
{
    const char *p = authorization;
    while (*p == ' ')
        p++;
    if (strncasecmp(p, "Bearer", 6) != 0 || (p[6] != ' ' && p[6] != '\t'))
        return NULL;
    p += 7;
    while (*p == ' ' || *p == '\t')
        p++;
    size_t len = strlen(p);
    while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
        len--;
    *n = len;
    return p;
}

static enum auth_result check_token(const struct string_list *accepted, const char *authorization)
{
    if (!authorization)
        return AUTH_MISSING;
    size_t n = 0;
    const char *token = bearer_token(authorization, &n);
    if (!token)
        return AUTH_INVALID;
    if (n == 0)
        return AUTH_MISSING;
    int match = secret_matches(accepted, token, n);
    return match < 0 ? AUTH_ERROR : match ? AUTH_OK : AUTH_INVALID;
}

enum auth_result auth_check_bearer(const char *token, const char *authorization)
{
    if (!token)
        return AUTH_INVALID;
    char *items[1] = {(char *)token};
    struct string_list one = {items, 1};
    return check_token(&one, authorization);
}

/* ---- signatures --------------------------------------------------------- */

int auth_parse_signature(const char *header, struct auth_signature *out)
{
    memset(out, 0, sizeof(*out));
    int have_t = 0;
    const char *p = header;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (!*p)
            break;
        const char *item = p;
        while (*p && *p != ',')
            p++;
        size_t n = (size_t)(p - item);
        while (n && (item[n - 1] == ' ' || item[n - 1] == '\t'))
            n--;
        if (n > 2 && item[0] == 't' && item[1] == '=') {
            if (have_t)
                return -1;
            int64_t t = 0;
            for (size_t i = 2; i < n; i++) {
                if (item[i] < '0' || item[i] > '9' || t > (INT64_MAX - 9) / 10)
                    return -1;
                t = t * 10 + (item[i] - '0');
            }
            out->t = t;
            have_t = 1;
        } else if (n > 3 && item[0] == 'v' && item[1] == '1' && item[2] == '=') {
            if (n - 3 != 64 || out->n == AUTH_MAX_SIGNATURES)
                return -1;
            for (size_t i = 0; i < 32; i++) {
                int hi = hex_digit(item[3 + 2 * i]), lo = hex_digit(item[4 + 2 * i]);
                if (hi < 0 || lo < 0)
                    return -1;
                out->v1[out->n][i] = (unsigned char)(hi << 4 | lo);
            }
            out->n++;
        }
        /* other schemes (v0, v2, ...) are ignored, as a later version may add them */
    }
    return have_t && out->n > 0 ? 0 : -1;
}

static int mac(const char *secret, int64_t t, const char *body, size_t len, unsigned char out[32])
{
    char prefix[32];
    int n = snprintf(prefix, sizeof prefix, "%lld.", (long long)t);
    /* HMAC over "<t>." followed by the raw body, without copying the body */
    int rc =
        digest_hmac_sha256_2(secret, strlen(secret), prefix, (size_t)n, body ? body : "", len, out);
    return rc;
}

int auth_sign(const char *secret, int64_t t, const char *body, size_t len, char *out, size_t outlen)
{
    unsigned char m[32];
    if (mac(secret, t, body, len, m) != 0)
        return -1;
    char hex[65];
    digest_hex(m, sizeof m, hex);
    int n = snprintf(out, outlen, "t=%lld,v1=%s", (long long)t, hex);
    return n > 0 && (size_t)n < outlen ? 0 : -1;
}

static enum auth_result check_signature(const struct config *c, const struct auth_request *r)
{
    if (!r->signature)
        return AUTH_MISSING;
    struct auth_signature sig;
    if (auth_parse_signature(r->signature, &sig) != 0)
        return AUTH_INVALID;
    int64_t skew = r->now_s - sig.t;
    if (skew > c->inbound_replay_window_s || -skew > c->inbound_replay_window_s)
        return AUTH_EXPIRED;
    if (!r->have_body)
        return AUTH_PENDING;
    int match = 0;
    for (size_t s = 0; s < c->inbound_hmac_secrets.n; s++) {
        unsigned char want[32];
        if (mac(c->inbound_hmac_secrets.items[s], sig.t, r->body, r->len, want) != 0)
            return AUTH_ERROR;
        for (int i = 0; i < sig.n; i++)
            match |= digest_equal(want, sizeof want, sig.v1[i], sizeof sig.v1[i]);
    }
    return match ? AUTH_OK : AUTH_INVALID;
}

/* ---- the decision ------------------------------------------------------- */

/* The more telling of two failures. */
static enum auth_result worse(enum auth_result a, enum auth_result b)
{
    if (a == AUTH_MISSING)
        return b;
    if (b == AUTH_MISSING)
        return a;
    return a == AUTH_EXPIRED ? a : b;
}

enum auth_result auth_check(const struct config *c, const struct auth_request *r)
{
    int tokens = c->inbound_tokens.n > 0, secrets = c->inbound_hmac_secrets.n > 0;
    if (!tokens && !secrets)
        return r->client_local ? AUTH_OK : AUTH_REMOTE;
    enum auth_result tok =
        tokens ? check_token(&c->inbound_tokens, r->authorization) : AUTH_MISSING;
    enum auth_result sig = secrets ? check_signature(c, r) : AUTH_MISSING;
    const char *mode = c->inbound_require;
    if (strcmp(mode, "token") == 0)
        return tok;
    if (strcmp(mode, "signature") == 0)
        return sig;
    if (strcmp(mode, "both") == 0)
        return tok != AUTH_OK ? tok : sig;
    /* either */
    if (tok == AUTH_OK || sig == AUTH_OK)
        return AUTH_OK;
    if (tok == AUTH_ERROR || sig == AUTH_ERROR)
        return AUTH_ERROR;
    if (sig == AUTH_PENDING)
        return AUTH_PENDING;
    return worse(tok, sig);
}

const char *auth_result_text(enum auth_result r)
{
    switch (r) {
    case AUTH_OK:
        return "ok";
    case AUTH_PENDING:
        return "pending";
    case AUTH_MISSING:
        return "missing credentials";
    case AUTH_INVALID:
        return "invalid credentials";
    case AUTH_EXPIRED:
        return "signature timestamp outside the replay window";
    case AUTH_ERROR:
        return "temporarily unable to authenticate";
    case AUTH_REMOTE:
        return "no inbound credentials configured: only clients on this machine are accepted";
    }
    return "?";
}

void auth_log_error(void)
{
    log_repeated(LOG_ERROR,
                 "cannot check a request's credentials: the cryptography library failed");
}

/* ---- throttling --------------------------------------------------------- */

#define SLOTS 1024

static struct {
    pthread_mutex_t mu;
    struct {
        char client[INET6_ADDRSTRLEN + 8]; /* an address, or an IPv6 /64 */
        int64_t window_start;
        int failures;
        int64_t blocked_until;
        int64_t last_ok; /* when a request from it last authenticated */
    } slot[SLOTS];
    /* the slots' hash is keyed at random, so that no one can tell which
     * addresses share an address's slots (see slot_of) */
    uint64_t key;
    int keyed;
} T = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* A 64-bit finalizer (splitmix64's): every bit of x moves the slot. */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Caller holds T.mu. */
static uint64_t slot_hash(const char *client)
{
    if (!T.keyed) {
        if (getrandom(&T.key, sizeof T.key, GRND_NONBLOCK) != (ssize_t)sizeof T.key)
            T.key = mix64((uint64_t)clock_mono_ns() ^ ((uint64_t)getpid() << 32));
        T.keyed = 1;
    }
    return mix64(digest_fnv64(DIGEST_FNV64_INIT, client, strlen(client)) ^ T.key);
}

/* The name of client's slot: the address, or for an IPv6 one its /64. */
static const char *throttle_key(const char *client, char *out, size_t outlen)
{
    unsigned char a[16];
    if (!strchr(client, ':') || inet_pton(AF_INET6, client, a) != 1)
        return client;
    memset(a + 8, 0, 8);
    char text[INET6_ADDRSTRLEN];
    if (!inet_ntop(AF_INET6, a, text, sizeof text))
        return client;
    snprintf(out, outlen, "%s/64", text);
    return out;
}

/* Whether a request from the slot's client authenticated within
 * AUTH_TRUSTED_S. Caller holds T.mu. */
static int trusted(int i, int64_t now_s)
{
    return T.slot[i].last_ok > 0 && now_s - T.slot[i].last_ok <= AUTH_TRUSTED_S;
}

/* When a slot's client last failed or authenticated (the window starts with a
 * failure). Caller holds T.mu. */
static int64_t last_seen(int i)
{
    return T.slot[i].last_ok > T.slot[i].window_start ? T.slot[i].last_ok : T.slot[i].window_start;
}

/* What slot_of does when the client has no slot. */
enum slot_create { SLOT_FIND, SLOT_FOR_FAILURE, SLOT_FOR_SUCCESS };

/* The slot of a client: its own, else a free or idle one (neither seen
 * within the window nor trusted), else the least recently seen one that is not
 * refusing anybody: a refusal in force is never evicted by another failure,
 * so flooding the table from many addresses cannot lift it; nor, for a
 * failure, is a trusted client (one that authenticated within
 * AUTH_TRUSTED_S), so failures from many addresses cannot make it one to
 * refuse. A success, which no flood can bring, takes the slot of the refusal
 * that ends first when there is no other, and only then another trusted
 * client's: addresses refused in every slot of a sender's cannot keep its
 * trust from being noted, nor make senders push out each other's. -1 when
 * there is no room (a failure goes unrecorded). Caller holds T.mu. */
static int slot_of(const char *address, int64_t now_s, enum slot_create create)
{
    char key[sizeof T.slot[0].client];
    const char *client = throttle_key(address, key, sizeof key);
    uint64_t h = slot_hash(client);
    int idle = -1, oldest = -1, ending = -1, oldest_trusted = -1;
    for (int probe = 0; probe < 16; probe++) {
        int i = (int)((h + (uint64_t)probe) % SLOTS);
        if (strcmp(T.slot[i].client, client) == 0)
            return i;
        if (T.slot[i].blocked_until > now_s) {
            if (ending < 0 || T.slot[i].blocked_until < T.slot[ending].blocked_until)
                ending = i;
            continue;
        }
        if (idle < 0 && (T.slot[i].client[0] == '\0' ||
                         (now_s - last_seen(i) > AUTH_THROTTLE_WINDOW_S && !trusted(i, now_s))))
            idle = i;
        if (trusted(i, now_s)) {
            if (oldest_trusted < 0 || last_seen(i) < last_seen(oldest_trusted))
                oldest_trusted = i;
            continue;
        }
        if (oldest < 0 || last_seen(i) < last_seen(oldest))
            oldest = i;
    }
    int victim = idle >= 0 ? idle : oldest;
    if (victim < 0 && create == SLOT_FOR_SUCCESS)
        victim = ending >= 0 ? ending : oldest_trusted;
    if (create == SLOT_FIND || victim < 0)
        return -1;
    str_copy(T.slot[victim].client, sizeof T.slot[victim].client, client);
    T.slot[victim].window_start = now_s;
    T.slot[victim].failures = 0;
    T.slot[victim].blocked_until = 0;
    T.slot[victim].last_ok = 0;
    return victim;
}

int auth_throttled(const char *client, int64_t now_s, int64_t *retry_after_s)
{
    if (!client || !*client)
        return 0;
    pthread_mutex_lock(&T.mu);
    int i = slot_of(client, now_s, SLOT_FIND);
    int blocked = i >= 0 && T.slot[i].blocked_until > now_s;
    if (blocked)
        *retry_after_s = T.slot[i].blocked_until - now_s;
    pthread_mutex_unlock(&T.mu);
    return blocked;
}

int auth_failed(const char *client, int64_t now_s)
{
    if (!client || !*client)
        return 0;
    pthread_mutex_lock(&T.mu);
    int i = slot_of(client, now_s, SLOT_FOR_FAILURE);
    if (i < 0) {
        pthread_mutex_unlock(&T.mu);
        return 0;
    }
    if (now_s - T.slot[i].window_start > AUTH_THROTTLE_WINDOW_S) {
        T.slot[i].window_start = now_s;
        T.slot[i].failures = 0;
    }
    int started = 0;
    if (++T.slot[i].failures >= AUTH_THROTTLE_FAILURES && T.slot[i].blocked_until <= now_s &&
        !trusted(i, now_s)) {
        T.slot[i].blocked_until = now_s + AUTH_THROTTLE_BLOCK_S;
        T.slot[i].failures = 0;
        T.slot[i].window_start = now_s;
        started = 1;
    }
    pthread_mutex_unlock(&T.mu);
    return started;
}

void auth_log_refusal(const char *client)
{
    static struct log_budget lines;
    if (log_budget_allows(&lines, LOG_WARN, AUTH_LINES_PER_SECOND,
                          "clients refused after repeated authentication failures: more this "
                          "second than the log takes; the rest of them are left out of it"))
        log_warn("refusing a client for a while after repeated authentication failures",
                 LOG_S("client", client) LOG_I("seconds", AUTH_THROTTLE_BLOCK_S));
}

int auth_trusted(const char *client, int64_t now_s)
{
    if (!client || !*client)
        return 0;
    pthread_mutex_lock(&T.mu);
    int i = slot_of(client, now_s, SLOT_FIND);
    int yes = i >= 0 && trusted(i, now_s);
    pthread_mutex_unlock(&T.mu);
    return yes;
}

void auth_succeeded(const char *client, int64_t now_s)
{
    if (!client || !*client)
        return;
    pthread_mutex_lock(&T.mu);
    /* a slot for the note also before any failure: failures that come after
     * it must not have the address refused */
    int i = slot_of(client, now_s, SLOT_FOR_SUCCESS);
    if (i >= 0)
        T.slot[i].last_ok = now_s;
    pthread_mutex_unlock(&T.mu);
}
