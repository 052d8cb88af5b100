#include "sender.h"

#include "claim.h"
#include "digest.h"
#include "event_names.h"
#include "log.h"
#include "metrics.h"
#include "mparticle.h"
#include "reload.h"
#include "rules.h"

#include <ctype.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#ifndef TRIBUTARY_VERSION
#define TRIBUTARY_VERSION "dev"
#endif

/* Requests in flight per feed. */
#define MAX_IN_FLIGHT 8
/* Of them, requests of a batch that failed and goes alone (see suspect): the
 * rest stay for the feed's other batches, which eight such batches at the
 * head of the feed kept from going at all. */
#define MAX_SUSPECTS_IN_FLIGHT (MAX_IN_FLIGHT / 2)
/* Batches held in memory per feed (waiting or in flight) with their bodies
 * before claiming more. Beyond them, those that cannot go for a while (their
 * endpoint backing off, a batch failing alone) are parked: their bodies are
 * dropped, and built again from their records when they may go. So a feed
 * whose historical endpoint is down, or that holds many batches mParticle
 * fails for their content, goes on claiming and sending its other events,
 * up to MAX_HELD_ALL batches (about 200 bytes each parked, and 8 a record). */
#define MAX_HELD_BATCHES 2000
#define MAX_HELD_BYTES (32u << 20)
#define MAX_HELD_ALL 20000
/* A batch is parked when it cannot go for at least this long. */
#define PARK_MIN_MS 1000
/* One claim reads at most this many records. */
#define CLAIM_RECORDS 5000
#define CLAIM_BYTES (8u << 20)
/* How often an idle feed looks for new records. */
#define IDLE_POLL_MS 20
/* Sweep for records past retry.max_age_s that were never claimed, at most this
 * rarely. */
#define EXPIRE_EVERY_MS 60000
/* Held batches are checked against retry.max_age_s this often. */
#define EXPIRE_HELD_EVERY_MS 1000
/* Held events read, and time spent mapping them, in a turn (see reroute). */
#define REROUTE_RECORDS 500
#define REROUTE_TURN_MS 20
/* A feed's held events stored since its last pass are looked at this often,
 * and a pass that failed is tried again as soon. */
#define REROUTE_EVERY_MS 1000
/* Persisted batches that could not be restored are tried again this often. */
#define RESTORE_RETRY_MS 1000
/* The event names stored before are read, and new ones that a claim's commit
 * did not take are stored, again this long after a failure. */
#define NAMES_RETRY_MS 1000
/* Retry-After from mParticle is honoured within these bounds. */
#define RETRY_AFTER_MIN_S 1
#define RETRY_AFTER_MAX_S 600
/* mParticle's answer body is kept up to this size (for dead-letter details). */
#define RESPONSE_MAX 16384
#define CONNECT_TIMEOUT_MS 10000
#define REQUEST_TIMEOUT_MS 60000
/* A rate-limit usage at or above this makes the feeds slow down. */
#define RATE_USAGE_HIGH 90
/* A feed whose endpoint delivered nothing for this long is down there (an
 * outage): the failures of a batch then say nothing of its content (see
 * note_failures). */
#define FEED_STALLED_MS 60000

/* A persisted batch, waiting or in flight. */
struct pbatch {
    int64_t id;
    enum feed feed;
    char srid[40];
    int64_t *record_ids;
    size_t nrecords;
    int64_t first_id;             /* the smallest of record_ids */
    int64_t oldest_ms, newest_ms; /* when its records were received, wall ms */
    char *body;                   /* NULL while parked (see park) */
    size_t len;
    int parked;
    int limit; /* most batches it may share a request with (see halve_limit: on 400/413,
                  and on a failure again or while the feed works, see note_failures) */
    int in_flight;
    int delivered;    /* its deletion could not be queued: in flight until it is (ack_again) */
    int64_t retry_at; /* monotonic ms: failing alone while the feed works, it waits by itself */
    /* the endpoints a request may have carried it to under its srid, one bit
     * each (1 << enum endpoint; restored batches too, see load_batch):
     * mParticle may hold it already (an answer lost, a 5xx after it stored
     * the batch), and would not know its parts for the batch it has, so such
     * a batch is not split by age (see class_of, expire_batches): it stays
     * whole until its newest record is past retry.max_age_s */
    unsigned sent;
    /* sent as it was before the request in flight: a refusal of that request
     * (401, 403, 429, 400, 413) says mParticle stored none of it (see refused) */
    unsigned sent_before;
    /* requests with it that mParticle failed (a 5xx, no answer, an unexpected
     * answer), and when the last of those was (monotonic ms); since when each
     * of its failures came while the feed worked, from the first it met alone
     * (0: none yet, or the last one did not);
     * and for the detail of its dead letter, the requests not accepted, those
     * refused for the feed's sake (401, 403, 429) too, and what the last of
     * them got: its status (0: no answer) and error. Its parts after a split
     * inherit them. */
    struct {
        int count;
        int64_t last_ms;
        int64_t since_ms;
        int answers;
        int last_status;
        const char *last_error; /* static text */
    } failed;
    /* its events' timestamp_unixtime_ms: the smallest and largest (-1: none
     * has one), and how many have none; they choose the endpoint (see class_of) */
    int64_t ev_min_ms, ev_max_ms;
    size_t untimed;
    struct pbatch *next, *prev;
};

/* At most `rate` batches in any second as mParticle counts them, when they
 * arrive: a send may go while the batches in flight and those that arrived in
 * the last RATE_SLOTS slots of RATE_SLOT_MS stay under the rate. A batch
 * arrives between its send and its answer: it is taken to have arrived at its
 * answer, or ARRIVAL_MAX_MS after its send when it is not answered by then (a
 * slow answer is mostly the server's work, and the others must not wait for
 * it). So a batch counts until a second after its answer, and one that took
 * long on its way (a connection and TLS session opened first, a slow network)
 * cannot share a second with the batches sent after it; counted from its send,
 * it could. The slots cover a second and one slot: a batch that arrived in the
 * oldest is at least 1,001 ms old when it leaves the count. A token bucket with
 * a second of burst let twice the rate through in the second after a quiet
 * spell. */
#define RATE_SLOT_MS 50
#define RATE_SLOTS 21
#define ARRIVAL_MAX_MS 500
/* Which of mParticle's endpoints a batch goes to (see class_of); EP_MIXED: a
 * batch of both, split before it is sent. */
enum endpoint { EP_REALTIME, EP_HISTORICAL, EP_MIXED };
/* The endpoints a request goes to, and their names in the log. */
#define EP_ENDPOINTS 2
static const char *const ENDPOINT_NAMES[EP_ENDPOINTS] = {"realtime", "historical"};

/* How one endpoint has answered a feed lately. Each has its own: an outage of
 * the historical one, while the other accepts, neither holds back the feed's
 * recent events nor makes its old ones fail "while the feed works" (see
 * note_failures), and its backoff grows as any outage's. */
struct endpoint_state {
    int failures;            /* consecutive failed rounds (see count_failure) */
    int64_t failed_ns;       /* when the last failure was counted, clock_mono_ns: whether a
                              * request started before it must hold within a millisecond */
    int64_t delivered_ms;    /* the last delivery, monotonic */
    int64_t not_before;      /* backoff or Retry-After, monotonic ms */
    int64_t rate_limited_to; /* the part of not_before a 429 asked for */
    int last_status;         /* of the last failed round (0: no answer) */
    const char *last_error;  /* and its error (a static text) */
};

struct bucket {
    double rate;                  /* batches a second */
    int64_t next_cut;             /* monotonic ms: the rate drops again from then (see slow_down) */
    int64_t recovered;            /* monotonic ms: the last cut or recovery (see recover) */
    int64_t slot;                 /* the newest slot: monotonic ms / RATE_SLOT_MS */
    uint32_t arrived[RATE_SLOTS]; /* batches that arrived in each of the last slots, a ring */
    uint32_t in_flight;           /* batches sent, not taken to have arrived yet */
};

struct feed_state {
    enum feed feed;
    int64_t cursor; /* highest record id claimed */
    /* the smallest record id of the persisted batches that could not be
     * restored yet (0: none): the settled line stays below their records */
    int64_t unrestored;
    struct pbatch *head, *tail;
    size_t nbatches, bytes;
    size_t parked; /* of nbatches, those without their bodies (see park) */
    /* monotonic ms: the next look for batches to park, and after a parked
     * batch's records could not be read, the next try of any */
    int64_t park_at, unpark_at;
    int64_t park_logged_ms, unpark_logged_ms; /* see log_due */
    size_t delivered;                         /* batches whose deletion is still to be queued */
    int in_flight;
    int suspects_in_flight; /* of in_flight, requests of one suspect batch */
    enum feed_pause pause;
    int64_t probe_at;
    int probing;
    unsigned char cred_fp[32]; /* fingerprint of key, secret and url */
    int64_t persist_logged_ms; /* see log_due */
    int64_t probe_logged_ms;   /* log_due of probes failed while paused for credentials */
    int has_fp;
    struct endpoint_state ep[EP_ENDPOINTS];
    int unexpected;     /* answers outside the API's contract since the last delivery */
    struct bucket rate; /* the feed's own, lowered on 429s and high usage */
    int64_t next_claim; /* monotonic ms */
    /* held without credentials: its events are mapped again, and those now
     * routed to another feed move there (see reroute) */
    int rerouting;         /* a pass is under way */
    int64_t reroute_at;    /* monotonic ms: the next pass is due (0: now) */
    int64_t reroute_after; /* the last record id this pass looked at */
    size_t rerouted;       /* events this pass moved */
    char pass_version[32]; /* the rules this pass maps with */
    /* the held events up to this id were mapped with these rules and stayed */
    int64_t checked_upto;
    char checked_version[32];
};

struct request {
    struct request *next; /* in flight */
    struct sender *s;
    CURL *easy;
    struct feed_state *f;
    struct pbatch **batches;
    size_t n;
    size_t events;
    /* The body, "[" b0 "," b1 ... "]", is read from the batches' own bodies:
     * its length, and where the upload stands (batch, byte of "," and body). */
    size_t len;
    size_t at_batch, at_byte;
    buf response;
    struct curl_slist *headers;
    char retry_after[64];
    char rate_exceeded[32]; /* X-mp-rate-limit-exceeded: which limit a 429 is for */
    int rate_usage;
    int probe;
    int suspect;       /* one batch, a suspect one (see suspect) */
    int alone_failing; /* failed alone while mParticle accepts the feed's others */
    int arrived;       /* its batches count as arrived in the rate windows (see arrive) */
    enum endpoint ep;
    int64_t started_ns;        /* clock_mono_ns */
    unsigned char cred_fp[32]; /* the feed's cred_fp when it was sent */
    /* the key and secret it was sent with: masked in its answer also when a
     * reload has replaced them since (wiped when it is freed) */
    struct {
        char key[MPARTICLE_MAX_CREDENTIAL_CHARS + 1];
        char secret[MPARTICLE_MAX_CREDENTIAL_CHARS + 1];
    } sent_with;
};

/* A growing list of batch ids. */
struct id_list {
    int64_t *ids;
    size_t n, cap;
};

struct sender {
    queue *q;
    queue_reader *reader;
    CURLM *multi;
    pthread_t thread;
    pthread_mutex_t mu;
    _Atomic int stopping;
    _Atomic int64_t grace_until;
    struct feed_state feeds[FEED_COUNT];
    struct feed_status status[FEED_COUNT]; /* copy for other threads, under mu */
    int in_flight;
    struct request *requests; /* in flight */
    int joined;
    struct config *cfg; /* the configuration this loop iteration uses */
    uint64_t rng;
    int64_t last_expire;
    int64_t expiry_logged_ms; /* log_due of failed reads at expiry */
    int64_t ack_logged_ms;    /* log_due of deletions that could not be queued */
    int64_t alone_logged_ms;  /* log_due of batches failing alone */
    int64_t start_logged_ms;  /* log_due of requests that could not be started */
    int64_t last_expire_held;
    uint64_t cfg_generation; /* of the configuration the feeds follow (0: none yet) */
    /* mParticle's limit is per account: all feeds together stay within
     * mparticle.rate_limit */
    struct bucket account;
    int64_t account_not_before; /* a 429 for the whole account: monotonic ms */
    int turn;                   /* the feed that dispatches first this turn */
    /* at start: persisted batches whose records were all delivered, removed
     * once the read that restores the batches is over */
    struct id_list emptied[FEED_COUNT];
    /* at start: persisted batches that could not be restored, and since when
     * (monotonic ms) each pass failed to */
    struct id_list unreadable, unreadable_since;
    /* those of them past retry.max_age_s that failed for retry.failing_s,
     * moved to the dead-letter store once the read is over; with the events
     * of each */
    struct id_list past_age[FEED_COUNT], past_age_events[FEED_COUNT];
    /* restoring the batches persisted before the last stop: */
    int restore_pending;       /* the last pass left batches behind: another follows */
    int restore_unread;        /* the last pass could not read them all: claim nothing */
    int64_t restore_next;      /* monotonic ms of the next pass */
    int64_t restore_logged_ms; /* log_due */
    int64_t reroute_logged_ms; /* log_due */
    int restore_passes;
    int64_t restore_claims_upto; /* claims persisted before the start: rows up to this
                                  * (-1: not read yet); later ones are this run's */
    struct id_list restored;     /* the batches passes restored or removed */
    size_t restored_sorted;      /* the first restored_sorted of them in order */
    ruleset *router_rs;          /* the rules reroute maps with, and their engine */
    rules *router;
    event_names *names;      /* the custom event names sent (see event_names.h) */
    int names_loaded;        /* those stored before are read */
    int names_failing;       /* the last read or store of them failed */
    int64_t names_next;      /* monotonic ms of the next try to read or store them */
    int64_t names_logged_ms; /* log_due */
};

/* ---- small helpers ------------------------------------------------------ */

static uint64_t next_random(struct sender *s)
{
    /* xorshift64*: jitter needs spread, not secrecy */
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    return s->rng * 0x2545F4914F6CDD1DULL;
}

/* Full jitter: uniform in [0, min(max, base * 2^(failures-1))]. */
static int64_t backoff_ms(struct sender *s, int failures)
{
    int64_t base = s->cfg->retry_base_ms, cap = s->cfg->retry_max_ms;
    int64_t ceiling = base;
    for (int i = 1; i < failures && ceiling < cap; i++)
        ceiling *= 2;
    if (ceiling > cap)
        ceiling = cap;
    return (int64_t)(next_random(s) % (uint64_t)(ceiling + 1));
}

/* A batch that mParticle failed and that goes alone (see note_failures):
 * mParticle may fail it for its content. */
static int suspect(const struct pbatch *b)
{
    return b->limit == 1 && b->failed.count > 0;
}

static void pbatch_free(struct pbatch *b)
{
    if (!b)
        return;
    free(b->record_ids);
    free(b->body);
    free(b);
}

/* Adds b to the feed's batches, which stay in order of their smallest record
 * id: the head holds the smallest (see settled_below), and the oldest records
 * are sent first. A new claim's batches go at the tail; the walk back is for
 * the parts of a split batch. */
static void feed_insert(struct feed_state *f, struct pbatch *b)
{
    struct pbatch *after = f->tail;
    while (after && after->first_id > b->first_id)
        after = after->prev;
    b->prev = after;
    b->next = after ? after->next : f->head;
    if (b->next)
        b->next->prev = b;
    else
        f->tail = b;
    if (after)
        after->next = b;
    else
        f->head = b;
    f->nbatches++;
    f->bytes += b->len;
    f->parked += (size_t)b->parked;
}

static void feed_remove(struct feed_state *f, struct pbatch *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else
        f->head = b->next;
    if (b->next)
        b->next->prev = b->prev;
    else
        f->tail = b->prev;
    b->next = b->prev = NULL;
    f->nbatches--;
    f->bytes -= b->len;
    f->parked -= (size_t)b->parked;
}

/* Each feed's pause, failures and waits, for sender_status: once a turn. */
static void publish_status(struct sender *s)
{
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < FEED_COUNT; i++) {
        const struct feed_state *f = &s->feeds[i];
        struct feed_status *st = &s->status[i];
        st->pause = f->pause;
        st->failures = 0;
        st->resume_ms = s->account_not_before;
        for (int e = 0; e < EP_ENDPOINTS; e++) {
            if (f->ep[e].failures > st->failures)
                st->failures = f->ep[e].failures;
            if (f->ep[e].not_before > st->resume_ms)
                st->resume_ms = f->ep[e].not_before;
        }
        st->rate = f->rate.rate;
        st->account_rate = s->account.rate;
    }
    pthread_mutex_unlock(&s->mu);
}

/* -1 when the hash failed: the credentials are then taken for changed. */
static int credential_fingerprint(const struct config *c, enum feed f, unsigned char out[32])
{
    buf b;
    buf_init(&b, 64 * 1024);
    const struct feed_config *fc = &c->feeds[f];
    (void)!buf_printf(&b, "%s\n%s\n%s", fc->key ? fc->key : "", fc->secret ? fc->secret : "",
                      config_feed_url(c, f));
    int rc = digest_sha256(b.data ? b.data : "", b.len, out);
    if (b.data)
        explicit_bzero(b.data, b.len);
    buf_free(&b);
    return rc;
}

/* ---- building batches --------------------------------------------------- */

/* Builds b->body from the records it names. */
static int build_body(struct sender *s, struct pbatch *b, const struct queue_items *items,
                      size_t from, size_t n)
{
    struct batch_part *parts = calloc(n ? n : 1, sizeof(*parts));
    if (!parts)
        return -1;
    for (size_t i = 0; i < n; i++) {
        const struct queue_item *it = &items->items[from + i];
        parts[i] = (struct batch_part){it->batch, it->event, it->event_id};
    }
    if (!b->srid[0] && mparticle_source_request_id(parts, n, b->srid) != 0) {
        free(parts);
        return -1;
    }
    buf body;
    buf_init(&body, MPARTICLE_MAX_REQUEST_BYTES * 4);
    /* room for the whole body at once (a hint: building checks every append) */
    (void)!buf_reserve(&body, mparticle_batch_size_bound(parts, n));
    /* the configured environment only for records stored before they carried
     * theirs (see emit) */
    int rc = mparticle_build_batch(&body, s->cfg->environment, b->srid, parts, n);
    free(parts);
    if (rc != 0) {
        buf_free(&body);
        return -1;
    }
    b->len = body.len;
    b->body = buf_take(&body);
    return 0;
}

static int64_t smallest_id(const int64_t *ids, size_t n)
{
    int64_t m = INT64_MAX;
    for (size_t i = 0; i < n; i++)
        m = ids[i] < m ? ids[i] : m;
    return m;
}

/* Which endpoint takes an event: mParticle's historical one for data older
 * than 30 days (each event at least 72 hours old), the real-time one for the
 * rest. An event goes historical once it is a day short of 30 days old, so
 * that one waiting in a batch (retries, a pause) or a clock a little off does
 * not carry it past the line on the real-time endpoint. */
#define HISTORICAL_AFTER_MS (MPARTICLE_HISTORICAL_AGE_MS - 86400LL * 1000)

static int event_historical(int64_t t, int64_t now_ms)
{
    return t >= 0 && now_ms - t > HISTORICAL_AFTER_MS;
}

/* A batch sent to the real-time endpoint (or restored from the last run, which
 * may have sent it) stays whole there, with its source_request_id, until its
 * oldest event is this old (see pbatch.sent). */
#define SENT_REALTIME_UNTIL_MS (MPARTICLE_HISTORICAL_AGE_MS - 3600LL * 1000)
#define SENT_TO(ep) (1u << (ep))

/* The endpoint of a batch now, from its events' times: EP_MIXED when some of
 * its events belong on each (a batch that waited while some crossed the line,
 * or one persisted before batches were made per endpoint): it is split first.
 * One sent to the historical endpoint stays there: its events were past the
 * line by an earlier reading of the clock, which has gone back since. */
static enum endpoint class_of(const struct pbatch *b, int64_t now_ms)
{
    if (b->sent & SENT_TO(EP_HISTORICAL))
        return EP_HISTORICAL;
    if (b->untimed == b->nrecords || !event_historical(b->ev_min_ms, now_ms))
        return EP_REALTIME;
    if ((b->sent & SENT_TO(EP_REALTIME)) && now_ms - b->ev_min_ms < SENT_REALTIME_UNTIL_MS)
        return EP_REALTIME;
    return b->untimed == 0 && event_historical(b->ev_max_ms, now_ms) ? EP_HISTORICAL : EP_MIXED;
}

/* Notes the event times of records items[idx[0..n)] (idx NULL: items[0..n));
 * times, when not NULL, holds each item's already (by item index). */
static void note_event_times(struct pbatch *b, const struct queue_items *items, const size_t *idx,
                             size_t n, const int64_t *times)
{
    b->ev_min_ms = b->ev_max_ms = -1;
    b->untimed = 0;
    for (size_t i = 0; i < n; i++) {
        size_t x = idx ? idx[i] : i;
        const struct queue_item *it = &items->items[x];
        int64_t t = times ? times[x] : mparticle_event_time_ms(it->event.p, it->event.n);
        if (t < 0) {
            b->untimed++;
            continue;
        }
        b->ev_min_ms = b->ev_min_ms < 0 || t < b->ev_min_ms ? t : b->ev_min_ms;
        b->ev_max_ms = t > b->ev_max_ms ? t : b->ev_max_ms;
    }
}

/* A batch of records items[idx[0..n)]; times as for note_event_times. */
static struct pbatch *new_batch(enum feed f, const struct queue_items *items, const size_t *idx,
                                size_t n, const int64_t *times)
{
    struct pbatch *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->feed = f;
    b->limit = MPARTICLE_MAX_BATCHES_PER_REQUEST;
    b->record_ids = malloc(n * sizeof(int64_t));
    if (!b->record_ids) {
        free(b);
        return NULL;
    }
    b->nrecords = n;
    b->oldest_ms = INT64_MAX;
    b->newest_ms = INT64_MIN;
    for (size_t i = 0; i < n; i++) {
        const struct queue_item *it = &items->items[idx[i]];
        b->record_ids[i] = it->id;
        if (it->received_ms < b->oldest_ms)
            b->oldest_ms = it->received_ms;
        if (it->received_ms > b->newest_ms)
            b->newest_ms = it->received_ms;
    }
    b->first_id = smallest_id(b->record_ids, n);
    note_event_times(b, items, idx, n, times);
    return b;
}

/* Replaces batch b, whose records are items (in its order), by two: the first
 * `first` records and the rest, persisted in one step; parts receives them,
 * held by the feed. b is freed. On failure (-1) nothing changed. */
static int split_in_two(struct sender *s, struct feed_state *f, struct pbatch *b,
                        const struct queue_items *items, size_t first, struct pbatch *parts[2])
{
    parts[0] = parts[1] = NULL;
    struct queue_batch qb[2];
    memset(qb, 0, sizeof qb);
    size_t from[2] = {0, first}, count[2] = {first, items->n - first};
    for (int i = 0; i < 2; i++) {
        size_t *idx = malloc(count[i] * sizeof(*idx));
        if (!idx)
            goto fail;
        for (size_t k = 0; k < count[i]; k++)
            idx[k] = from[i] + k;
        parts[i] = new_batch(f->feed, items, idx, count[i], NULL);
        free(idx);
        if (!parts[i] || build_body(s, parts[i], items, from[i], count[i]) != 0)
            goto fail;
        parts[i]->limit = b->limit;
        parts[i]->failed = b->failed;
        qb[i].feed = f->feed;
        str_copy(qb[i].source_request_id, sizeof qb[i].source_request_id, parts[i]->srid);
        qb[i].record_ids = parts[i]->record_ids;
        qb[i].nrecords = parts[i]->nrecords;
        qb[i].oldest_ms = parts[i]->oldest_ms;
    }
    if (queue_split_batch(s->q, b->id, qb, 2) != QUEUE_OK)
        goto fail;
    for (int i = 0; i < 2; i++) {
        parts[i]->id = qb[i].id;
        feed_insert(f, parts[i]);
    }
    feed_remove(f, b);
    pbatch_free(b);
    return 0;
fail:
    pbatch_free(parts[0]);
    pbatch_free(parts[1]);
    parts[0] = parts[1] = NULL;
    return -1;
}

/* The line below which every record of the feed is delivered or dead: each
 * record up to the cursor is in a batch the feed still holds, or is settled.
 * The head of the batches has the smallest record id of them all. */
static int64_t settled_below(const struct feed_state *f)
{
    int64_t line = f->cursor + 1;
    if (f->unrestored > 0 && f->unrestored < line)
        line = f->unrestored;
    if (f->head && f->head->first_id < line)
        line = f->head->first_id;
    return line;
}

static _Thread_local const struct queue_items *sort_items;

static _Thread_local const unsigned char *sort_historical;

/* By user, then endpoint (a user's old and recent events make two batches,
 * not one per change), then arrival. */
static int cmp_user(const void *a, const void *b)
{
    size_t i = *(const size_t *)a, j = *(const size_t *)b;
    const struct queue_item *x = &sort_items->items[i];
    const struct queue_item *y = &sort_items->items[j];
    size_t n = x->user.n < y->user.n ? x->user.n : y->user.n;
    int c = memcmp(x->user.p, y->user.p, n);
    if (c == 0 && x->user.n != y->user.n)
        c = x->user.n < y->user.n ? -1 : 1;
    if (c == 0)
        c = (int)sort_historical[i] - (int)sort_historical[j];
    if (c == 0)
        c = x->id < y->id ? -1 : x->id > y->id;
    return c;
}

static int same_user(const struct queue_items *items, size_t a, size_t b)
{
    str x = items->items[a].user, y = items->items[b].user;
    return x.n == y.n && memcmp(x.p, y.p, x.n) == 0;
}

static int cmp_first_id(const void *a, const void *b)
{
    const struct pbatch *x = *(struct pbatch *const *)a, *y = *(struct pbatch *const *)b;
    return x->first_id < y->first_id ? -1 : x->first_id > y->first_id;
}

/* One feed's share of a claim: new batches, in order of their first record. */
struct claim_part {
    struct pbatch **made;
    size_t n;
    int64_t cursor;      /* the last record the claim covers */
    uint64_t past_limit; /* its events of names past mParticle's limit */
};

static void claim_part_free(struct claim_part *c)
{
    for (size_t i = 0; i < c->n; i++)
        pbatch_free(c->made[i]);
    free(c->made);
    memset(c, 0, sizeof(*c));
}

/* Groups a window of records into one batch per user (split at 128 KB and at
 * 100 user attributes) and builds their bodies. */
static int build_claim(struct sender *s, struct feed_state *f, struct queue_items *items,
                       struct claim_part *c)
{
    size_t n = items->n;
    size_t *order = malloc(n * sizeof(*order));
    unsigned char *old_event = NULL; /* per record: 1 for the historical endpoint */
    int64_t *times = NULL;           /* per record: its event's time (-1: none) */
    c->made = calloc(n, sizeof(*c->made));
    c->n = 0;
    int rc = -1;
    if (!order || !c->made)
        goto done;
    /* each record's endpoint, read once */
    int64_t now_ms = clock_wall_ms();
    int64_t names_limit = s->cfg->mparticle_event_names_limit;
    old_event = malloc(n ? n : 1);
    times = malloc((n ? n : 1) * sizeof(*times));
    if (!old_event || !times)
        goto done;
    c->past_limit = 0; /* counted once the claim is persisted */
    for (size_t i = 0; i < n; i++) {
        const struct queue_item *it = &items->items[i];
        struct mparticle_event_fields ev;
        mparticle_event_fields(it->event.p, it->event.n, &ev);
        times[i] = ev.time_ms;
        old_event[i] = (unsigned char)event_historical(times[i], now_ms);
        int past = 0;
        if (ev.name.p)
            (void)event_names_note(s->names, ev.name, names_limit, now_ms, &past);
        c->past_limit += (uint64_t)past;
    }
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    sort_items = items;
    sort_historical = old_event;
    qsort(order, n, sizeof(*order), cmp_user);

    for (size_t i = 0; i < n;) {
        /* records [i, j) belong to one user, in arrival order */
        size_t j = i + 1;
        while (j < n && same_user(items, order[i], order[j]))
            j++;
        for (size_t k = i; k < j;) {
            size_t used = 0, m = 0;
            struct mparticle_attr_names attrs = {.n = 0};
            /* a batch goes to one endpoint: its events are all recent or all historical */
            int old = old_event[order[k]];
            while (k + m < j) {
                const struct queue_item *it = &items->items[order[k + m]];
                if (m > 0 && old_event[order[k + m]] != old)
                    break;
                struct batch_part part = {it->batch, it->event, it->event_id};
                size_t add = mparticle_batch_size_bound(&part, 1);
                if (m > 0 && used + add > MPARTICLE_MAX_BATCH_BYTES)
                    break;
                if (mparticle_attr_names_add(&attrs, it->batch) != 0) {
                    /* over the limit alone (queued before the rules refused
                     * such events): a batch of its own, to mParticle's 400 */
                    if (m == 0)
                        m = 1;
                    break;
                }
                used += add;
                m++;
            }
            struct pbatch *b = new_batch(f->feed, items, order + k, m, times);
            if (!b)
                goto done;
            c->made[c->n++] = b;
            /* the body needs the parts in batch order, contiguous */
            struct queue_items one = {0};
            one.items = malloc(m * sizeof(*one.items));
            if (!one.items)
                goto done;
            for (size_t x = 0; x < m; x++)
                one.items[x] = items->items[order[k + x]];
            int brc = build_body(s, b, &one, 0, m);
            free(one.items);
            if (brc != 0)
                goto done;
            k += m;
        }
        i = j;
    }
    /* keep the order of arrival across users */
    qsort(c->made, c->n, sizeof(*c->made), cmp_first_id);
    c->cursor = items->items[n - 1].id;
    rc = 0;
done:
    free(order);
    free(old_event);
    free(times);
    if (rc != 0)
        claim_part_free(c);
    return rc;
}

/* ---- event names -------------------------------------------------------- */

struct name_load {
    event_names *into;
    int failed; /* out of memory */
};

static int load_name(void *ctx, const char *name, size_t n, int64_t first_ms)
{
    (void)first_ms;
    struct name_load *l = ctx;
    l->failed = event_names_load(l->into, (str){name, n}) != 0;
    return l->failed;
}

/* After a read or store of the event names failed: tried again later. */
static void names_failed(struct sender *s, int64_t now, const char *msg, const char *error)
{
    if (log_due(&s->names_logged_ms))
        log_error(msg, LOG_S("error", error));
    s->names_failing = 1;
    s->names_next = now + NAMES_RETRY_MS;
}

/* Reads the event names stored before (at the start, and at a reload: a
 * `tributary queue forget-names` is then seen), and stores the new ones that
 * a claim's commit did not take (it failed). */
static void keep_names(struct sender *s, int64_t now)
{
    if (now < s->names_next)
        return;
    if (!s->names_loaded) {
        /* read into a set of their own: the count stays whole until it worked */
        struct name_load l = {event_names_new(), 0};
        int read = l.into && queue_event_names(s->reader, load_name, &l) == 0;
        int oom = !l.into || l.failed || (read && event_names_replace(s->names, l.into) != 0);
        event_names_free(l.into);
        if (!read || oom) {
            names_failed(s, now,
                         "cannot read the event names sent before; new ones are counted "
                         "meanwhile, tried again every second",
                         oom ? "out of memory" : queue_reader_error(s->reader));
            return;
        }
        s->names_loaded = 1;
        event_names_check(s->names, s->cfg->mparticle_event_names_limit);
    }
    size_t n;
    const struct event_name *names = event_names_unstored(s->names, &n);
    enum queue_status st = queue_add_event_names(s->q, names, n);
    if (st != QUEUE_OK) {
        names_failed(s, now, "cannot store new event names; tried again every second",
                     queue_status_name(st));
        return;
    }
    event_names_stored(s->names);
    if (s->names_failing) {
        s->names_failing = 0;
        log_info("event names read and stored again");
    }
}

/* ---- feeds -------------------------------------------------------------- */

static void set_pause(struct sender *s, struct feed_state *f, enum feed_pause p, const char *reason)
{
    if (f->pause == p)
        return;
    f->pause = p;
    /* a paused feed sends nothing: its batches' time of failing (see
     * failing) starts over once it sends again */
    for (struct pbatch *b = f->head; b && p != PAUSE_NONE; b = b->next)
        b->failed.since_ms = 0;
    enum queue_status st = queue_set_feed_state(s->q, f->feed, p == PAUSE_NONE ? NULL : reason);
    if (st != QUEUE_OK)
        log_warn("cannot record the feed state", LOG_S("feed", FEED_NAMES[f->feed]));
}

static int any_feed_ready(const struct config *c)
{
    for (int i = 0; i < FEED_COUNT; i++) {
        if (config_feed_ready(c, (enum feed)i))
            return 1;
    }
    return 0;
}

/* Follows configuration changes: credentials arriving, changing or going. */
static void update_credentials(struct sender *s, struct feed_state *f)
{
    int ready = config_feed_ready(s->cfg, f->feed);
    unsigned char fp[32];
    int known = credential_fingerprint(s->cfg, f->feed, fp) == 0;
    int changed = !known || !f->has_fp || memcmp(fp, f->cred_fp, sizeof fp) != 0;
    memcpy(f->cred_fp, fp, sizeof fp);
    f->has_fp = known;
    double limit = (double)s->cfg->feeds[f->feed].rate_limit;
    if (f->rate.rate <= 0 || f->rate.rate > limit)
        f->rate.rate = limit;
    if (!changed && ready && f->pause == PAUSE_AUTH && f->probe_at > 0) {
        /* the same credentials, which mParticle may take again (enabled
         * again in its UI): a reload is how an operator says so */
        log_info("reloaded; probing the feed whose credentials mParticle refused now",
                 LOG_S("feed", FEED_NAMES[f->feed]));
        f->probe_at = 0;
    }
    if (!changed)
        return;
    if (!ready) {
        /* with no feed configured at all, the service's start-up line says it once */
        int any = any_feed_ready(s->cfg);
        int fallback = f->feed != FEED_UNBOUND && config_feed_ready(s->cfg, FEED_UNBOUND);
        if (f->pause != PAUSE_NO_CREDENTIALS && any && fallback)
            log_info("feed has no credentials: the shipped rules send its events to unbound; "
                     "events rules still route to it are held until feeds.<feed>.key and "
                     ".secret are set",
                     LOG_S("feed", FEED_NAMES[f->feed]));
        else if (f->pause != PAUSE_NO_CREDENTIALS && any)
            log_warn("feed has no credentials: its events are held until feeds.<feed>.key and "
                     ".secret are set",
                     LOG_S("feed", FEED_NAMES[f->feed]));
        set_pause(s, f, PAUSE_NO_CREDENTIALS, QUEUE_PAUSED_NO_CREDENTIALS);
        return;
    }
    /* the failures so far were those of the old key, secret or URL (a wrong
     * URL is fixed this way): the new ones are tried at once, but for what a
     * 429 asked to wait (the limit may be the key's, or the account's) */
    int64_t now = clock_mono_ms();
    for (int ep = 0; ep < EP_ENDPOINTS; ep++) {
        struct endpoint_state *e = &f->ep[ep];
        if (e->failures > 0)
            log_info("feed credentials or URL changed; sending now",
                     LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("endpoint", ENDPOINT_NAMES[ep]));
        e->failures = 0;
        e->not_before = e->rate_limited_to > now ? e->rate_limited_to : 0;
    }
    for (struct pbatch *b = f->head; b; b = b->next)
        b->retry_at = 0; /* a batch failing alone too: the fix may be for it */
    if (f->pause == PAUSE_NO_CREDENTIALS) {
        log_info("feed credentials configured; sending", LOG_S("feed", FEED_NAMES[f->feed]));
        set_pause(s, f, PAUSE_NONE, NULL);
    } else if (f->pause == PAUSE_AUTH) {
        /* a probe is one of the feed's batches: without any, the next event's */
        log_info(f->head ? "feed credentials changed; probing now"
                         : "feed credentials changed; probing with the feed's next event",
                 LOG_S("feed", FEED_NAMES[f->feed]));
        f->probe_at = 0;
    }
}

static int64_t wall_to_age_ms(int64_t wall_ms)
{
    return clock_wall_ms() - wall_ms;
}

/* Reads batch b's records and splits b in two by a test of each: those that
 * pass first, each part in its order (split_in_two; parts receives them).
 * Returns how many pass; parts stay NULL (and b whole) when all or none do.
 * SPLIT_UNREADABLE: its records cannot be read whole now; SPLIT_FAILED: the
 * split could not be made. Either way b is unchanged. */
#define SPLIT_UNREADABLE (-1)
#define SPLIT_FAILED (-2)
static long split_by(struct sender *s, struct feed_state *f, struct pbatch *b,
                     int (*pass)(const struct queue_item *, int64_t), int64_t arg,
                     struct pbatch *parts[2])
{
    parts[0] = parts[1] = NULL;
    struct queue_items items;
    queue_items_init(&items);
    struct queue_item *sorted = NULL;
    long rc = SPLIT_UNREADABLE;
    if (queue_fetch(s->reader, b->feed, b->record_ids, b->nrecords, &items) != 0 ||
        items.n != b->nrecords)
        goto done;
    size_t passed = 0;
    for (size_t i = 0; i < items.n; i++)
        passed += pass(&items.items[i], arg) != 0;
    rc = (long)passed;
    if (passed == 0 || passed == items.n)
        goto done;
    rc = SPLIT_FAILED;
    if (!(sorted = malloc(items.n * sizeof(*sorted))))
        goto done;
    size_t p = 0, q = passed;
    for (size_t i = 0; i < items.n; i++)
        sorted[pass(&items.items[i], arg) ? p++ : q++] = items.items[i];
    memcpy(items.items, sorted, items.n * sizeof(*sorted));
    if (split_in_two(s, f, b, &items, passed, parts) == 0)
        rc = (long)passed;
done:
    free(sorted);
    queue_items_free(&items);
    return rc;
}

static int received_before(const struct queue_item *it, int64_t cutoff)
{
    return it->received_ms < cutoff;
}

/* The part of batch b (past retry.max_age_s) to dead-letter: b itself when
 * all its records were received before cutoff (or they cannot be read to be
 * told apart); when some came later, b is split in two and the older part is
 * returned, so that a young event does not go with an old one of its user.
 * NULL: nothing now (the split failed; b stays whole until the next sweep).
 * Not for a batch that may have been sent (see pbatch.sent): its parts would
 * carry its events to mParticle again under other ids. */
static struct pbatch *expired_part(struct sender *s, struct feed_state *f, struct pbatch *b,
                                   int64_t cutoff)
{
    struct pbatch *parts[2];
    long old = split_by(s, f, b, received_before, cutoff, parts);
    if (old == SPLIT_FAILED) {
        if (log_due(&s->expiry_logged_ms))
            log_error("cannot split a batch past retry.max_age_s by age; tried again in a moment",
                      LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("batch", b->srid));
        return NULL;
    }
    return parts[0] ? parts[0] : b;
}

static int realtime_event(const struct queue_item *it, int64_t now_ms)
{
    return !event_historical(mparticle_event_time_ms(it->event.p, it->event.n), now_ms);
}

/* Splits the batches whose events now belong on both endpoints (see
 * class_of): recent events first, then the historical ones. */
static void split_mixed(struct sender *s, struct feed_state *f)
{
    int64_t now = clock_wall_ms();
    for (struct pbatch *b = f->head, *next; b; b = next) {
        next = b->next; /* the parts go in by their first record: next stays valid */
        if (b->in_flight || class_of(b, now) != EP_MIXED)
            continue;
        struct pbatch *parts[2];
        long recent = split_by(s, f, b, realtime_event, now, parts);
        if (recent < 0 && log_due(&s->expiry_logged_ms))
            log_error("cannot split a batch whose events belong on both of mParticle's endpoints; "
                      "tried again in a moment",
                      LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("batch", b->srid));
    }
}

/* Moves a batch the feed holds to the dead-letter store and out of the feed,
 * the settled line with it; -1 (the batch stays) when that fails. */
static int dead_batch(struct sender *s, struct feed_state *f, struct pbatch *b, const char *reason,
                      const char *detail)
{
    feed_remove(f, b);
    if (queue_dead_batch(s->q, b->id, f->feed, settled_below(f), reason, detail) != QUEUE_OK) {
        feed_insert(f, b);
        return -1;
    }
    metrics_add_dead(reason, b->nrecords);
    return 0;
}

/* Appends to the text in detail what the failed requests of b were, when there
 * were any. */
static void describe_failures(const struct pbatch *b, char *detail, size_t size)
{
    size_t used = strlen(detail);
    if (b->failed.answers == 0 || used >= size)
        return;
    if (b->failed.last_status > 0)
        snprintf(detail + used, size - used, "; %d failed requests, the last answered %d (%s)",
                 b->failed.answers, b->failed.last_status, b->failed.last_error);
    else
        snprintf(detail + used, size - used,
                 "; %d failed requests, the last without an answer (%s)", b->failed.answers,
                 b->failed.last_error);
}

/* A batch that goes alone (see note_failures) and that mParticle failed, each
 * time while it accepted the feed's other batches, for retry.failing_s:
 * mParticle fails on its content. It would stay until retry.max_age_s, and
 * hold the feed's settled line, and with it the queue's space of every record
 * after it, for as long. */
static int failing(const struct sender *s, const struct pbatch *b, int64_t now)
{
    return b->limit == 1 && b->failed.since_ms > 0 &&
           now - b->failed.since_ms >= s->cfg->retry_failing_s * 1000;
}

/* Moves waiting batches past retry.max_age_s, and those mParticle keeps
 * failing (see failing), to the dead-letter store. */
static void expire_batches(struct sender *s, struct feed_state *f)
{
    int64_t cutoff = clock_wall_ms() - s->cfg->retry_max_age_s * 1000, now = clock_mono_ms();
    size_t batches = 0, events = 0, failing_batches = 0, failing_events = 0;
    char failing_detail[256] = "";
    for (struct pbatch *b = f->head, *next; b; b = next) {
        next = b->next;
        if (b->in_flight)
            continue;
        /* one that may have been sent goes whole, once all of it is past */
        if ((b->sent ? b->newest_ms : b->oldest_ms) >= cutoff) {
            if (!failing(s, b, now))
                continue;
            char detail[256];
            snprintf(detail, sizeof detail,
                     "mParticle failed it for retry.failing_s (%llds) while it accepted the "
                     "feed's other batches",
                     (long long)s->cfg->retry_failing_s);
            describe_failures(b, detail, sizeof detail);
            if (dead_batch(s, f, b, DEAD_FAILING, detail) != 0)
                break;
            if (failing_batches++ == 0)
                str_copy(failing_detail, sizeof failing_detail, detail);
            failing_events += b->nrecords;
            pbatch_free(b);
            continue;
        }
        if (!b->sent && !(b = expired_part(s, f, b, cutoff))) /* next stays in the list */
            continue;
        char detail[256];
        str_printf(detail, sizeof detail, "%s%s", QUEUE_MAX_AGE_DETAIL,
                   b->sent ? ", sent before (mParticle may hold it)" : "");
        describe_failures(b, detail, sizeof detail);
        if (dead_batch(s, f, b, DEAD_MAX_AGE, detail) != 0)
            break;
        batches++;
        events += b->nrecords;
        pbatch_free(b);
    }
    /* one line for all of them: after a long outage they are thousands */
    if (batches)
        log_warn("batches older than retry.max_age_s moved to the dead-letter store",
                 LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("batches", (long long)batches)
                     LOG_I("events", (long long)events));
    if (failing_batches)
        log_error("mParticle keeps failing batches sent alone while it accepts the feed's "
                  "others; moved to the dead-letter store",
                  LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("batches", (long long)failing_batches)
                      LOG_I("events", (long long)failing_events) LOG_S("first", failing_detail));
}

/* ---- parked batches ----------------------------------------------------- */

static int held_full(const struct feed_state *f)
{
    return f->nbatches - f->parked >= MAX_HELD_BATCHES || f->bytes >= MAX_HELD_BYTES;
}

/* Whether batch b cannot go for PARK_MIN_MS or more while the feed's other
 * batches may: it fails alone and waits by itself (see back_off), or its
 * endpoint backs off while the other does not. The other endpoint need not
 * have delivered: its events may be the ones waiting behind the parked (an
 * outage of one endpoint so parks that endpoint's batches until MAX_HELD_ALL).
 * A whole feed's wait, a pause or a 429, parks nothing: claiming more would
 * not send more. */
static int waits_alone(const struct feed_state *f, const struct pbatch *b, int64_t now,
                       int64_t wall)
{
    if (b->retry_at - now >= PARK_MIN_MS)
        return 1;
    enum endpoint ep = class_of(b, wall);
    return ep != EP_MIXED && f->ep[ep].not_before - now >= PARK_MIN_MS &&
           f->ep[ep == EP_REALTIME ? EP_HISTORICAL : EP_REALTIME].not_before <= now;
}

/* Drops the bodies of the feed's batches that wait alone, oldest first, until
 * those with bodies are within MAX_HELD_BATCHES and MAX_HELD_BYTES (see there). */
static void park(struct feed_state *f, int64_t now)
{
    if (f->pause != PAUSE_NONE)
        return;
    int64_t wall = clock_wall_ms();
    size_t parked = 0;
    for (struct pbatch *b = f->head; b && held_full(f); b = b->next) {
        if (b->parked || b->in_flight || !waits_alone(f, b, now, wall))
            continue;
        f->bytes -= b->len;
        free(b->body);
        b->body = NULL;
        b->len = 0;
        b->parked = 1;
        f->parked++;
        parked++;
    }
    if (parked && log_due(&f->park_logged_ms))
        log_info("batches that cannot go for now parked, their bodies built again when they can; "
                 "the feed's other events go on",
                 LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("parked", (long long)f->parked)
                     LOG_I("held", (long long)f->nbatches));
}

/* Builds the body of batch b again when it is parked, from its records, as it
 * was (its srid and its records' order kept, and their environment); 0 when b
 * has its body.
 * A failure to read them holds every parked batch of the feed for a second:
 * a sick database is not asked again for each at every turn. */
static int unpark(struct sender *s, struct feed_state *f, struct pbatch *b, int64_t now)
{
    if (!b->parked)
        return 0;
    if (now < f->unpark_at)
        return -1;
    struct queue_items items;
    queue_items_init(&items);
    int rc = -1;
    if (queue_fetch(s->reader, f->feed, b->record_ids, b->nrecords, &items) == 0 &&
        items.n == b->nrecords && build_body(s, b, &items, 0, items.n) == 0) {
        b->parked = 0;
        f->parked--;
        f->bytes += b->len;
        rc = 0;
    } else {
        f->unpark_at = now + 1000;
        if (log_due(&f->unpark_logged_ms))
            log_error("cannot read the records of a parked batch to send it; tried again in a "
                      "second",
                      LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("batch", b->srid));
    }
    queue_items_free(&items);
    return rc;
}

/* Reads feed f's next window of records when it is due, into c. */
static void claim_feed(struct sender *s, struct feed_state *f, int64_t now, struct claim_part *c)
{
    if (f->pause == PAUSE_NO_CREDENTIALS || now < f->next_claim)
        return;
    if (held_full(f) && now >= f->park_at) {
        park(f, now); /* what waits a second or more: looked for once a second */
        f->park_at = now + PARK_MIN_MS;
    }
    if (held_full(f) || f->nbatches >= MAX_HELD_ALL) {
        f->next_claim = now + IDLE_POLL_MS;
        return;
    }
    struct queue_items peek;
    queue_items_init(&peek);
    if (queue_scan(s->reader, f->feed, f->cursor, 1, 1, &peek) != 0 || peek.n == 0) {
        queue_items_free(&peek);
        f->next_claim = now + IDLE_POLL_MS;
        return;
    }
    int64_t waited = wall_to_age_ms(peek.items[0].received_ms);
    queue_items_free(&peek);
    if (waited < 0)
        waited = INT64_MAX; /* the clock went back: they came before, they are due */
    int64_t linger = s->cfg->batch_linger_ms;
    if (waited < linger) {
        f->next_claim = now + (linger - waited);
        return;
    }
    struct queue_items items;
    queue_items_init(&items);
    if (queue_scan(s->reader, f->feed, f->cursor, CLAIM_RECORDS, CLAIM_BYTES, &items) == 0 &&
        items.n > 0) {
        if (build_claim(s, f, &items, c) != 0)
            f->next_claim = now + 1000;
    }
    queue_items_free(&items);
}

/* Claims the due windows of every feed and persists their batches in one
 * commit, then hands the batches to their feeds. Should that commit fail, each
 * feed's claim is tried alone, so that one feed's refusal holds up no other;
 * a feed whose claim cannot be persisted tries again a second later. */
static void claim(struct sender *s, int64_t now)
{
    struct claim_part parts[FEED_COUNT];
    memset(parts, 0, sizeof parts);
    size_t total = 0, from[FEED_COUNT];
    int feeds = 0;
    for (int i = 0; i < FEED_COUNT; i++) {
        claim_feed(s, &s->feeds[i], now, &parts[i]);
        from[i] = total;
        total += parts[i].n;
        feeds += parts[i].n > 0;
    }
    if (total == 0)
        return;
    struct queue_batch *qb = calloc(total, sizeof(*qb));
    enum queue_status all = QUEUE_ERROR;
    if (qb) {
        for (int i = 0; i < FEED_COUNT; i++) {
            for (size_t j = 0; j < parts[i].n; j++) {
                const struct pbatch *b = parts[i].made[j];
                struct queue_batch *out = &qb[from[i] + j];
                out->feed = b->feed;
                str_copy(out->source_request_id, sizeof out->source_request_id, b->srid);
                out->record_ids = b->record_ids;
                out->nrecords = b->nrecords;
                out->oldest_ms = b->oldest_ms;
            }
        }
        size_t nnames;
        const struct event_name *names = event_names_unstored(s->names, &nnames);
        int stored = 0;
        all = queue_persist_batches(s->q, qb, total, names, nnames, &stored);
        if (stored)
            event_names_stored(s->names);
    }
    for (int i = 0; i < FEED_COUNT; i++) {
        struct feed_state *f = &s->feeds[i];
        if (parts[i].n == 0)
            continue;
        enum queue_status st = all;
        if (st != QUEUE_OK && qb && feeds > 1)
            st = queue_persist_batches(s->q, qb + from[i], parts[i].n, NULL, 0, NULL);
        if (st != QUEUE_OK) {
            if (log_due(&f->persist_logged_ms))
                log_error("cannot persist batches; will try again",
                          LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("queue", queue_status_name(st)));
            f->next_claim = now + 1000;
            claim_part_free(&parts[i]);
            continue;
        }
        for (size_t j = 0; j < parts[i].n; j++) {
            parts[i].made[j]->id = qb[from[i] + j].id;
            feed_insert(f, parts[i].made[j]);
            parts[i].made[j] = NULL;
        }
        f->cursor = parts[i].cursor;
        if (parts[i].past_limit > 0)
            metrics_past_name_limit(f->feed, parts[i].past_limit);
        claim_part_free(&parts[i]);
    }
    free(qb);
}

/* ---- requests ----------------------------------------------------------- */

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    struct request *r = ud;
    size_t len = size * n;
    if (r->response.len < RESPONSE_MAX)
        (void)!buf_add(&r->response, p,
                       len < RESPONSE_MAX - r->response.len ? len : RESPONSE_MAX - r->response.len);
    return len;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    struct request *r = ud;
    size_t len = size * n;
    char line[256];
    size_t m = len < sizeof line - 1 ? len : sizeof line - 1;
    memcpy(line, p, m);
    line[m] = '\0';
    line[strcspn(line, "\r\n")] = '\0';
    if (strncasecmp(line, "Retry-After:", 12) == 0)
        str_copy(r->retry_after, sizeof r->retry_after, line + 12);
    else if (strncasecmp(line, "X-mp-rate-limit-percentage-used:", 32) == 0)
        r->rate_usage = atoi(line + 32);
    else if (strncasecmp(line, "X-mp-rate-limit-exceeded:", 25) == 0) {
        size_t k;
        const char *v = str_trim_blanks(line + 25, &k);
        str_printf(r->rate_exceeded, sizeof r->rate_exceeded, "%.*s", (int)k, v);
    }
    return len;
}

/* libcurl reads the request body here: each batch's body, preceded by "[" or
 * ",", then "]". The batches stay in memory until the request has finished. */
static size_t read_body(char *dst, size_t size, size_t n, void *ud)
{
    struct request *r = ud;
    size_t want = size * n, got = 0;
    while (got < want && r->at_batch <= r->n) {
        if (r->at_batch == r->n) {
            dst[got++] = ']';
            r->at_batch++;
            break;
        }
        const struct pbatch *b = r->batches[r->at_batch];
        if (r->at_byte == 0) {
            dst[got++] = r->at_batch == 0 ? '[' : ',';
            r->at_byte = 1;
            continue;
        }
        size_t left = 1 + b->len - r->at_byte, take = want - got < left ? want - got : left;
        memcpy(dst + got, b->body + r->at_byte - 1, take);
        got += take;
        r->at_byte += take;
        if (r->at_byte == 1 + b->len) {
            r->at_batch++;
            r->at_byte = 0;
        }
    }
    return got;
}

/* libcurl rewinds the body to send it again (a reused connection that the
 * server had closed). */
static int seek_body(void *ud, curl_off_t offset, int origin)
{
    struct request *r = ud;
    if (origin != SEEK_SET || offset < 0 || (size_t)offset > r->len)
        return CURL_SEEKFUNC_CANTSEEK;
    size_t skip = (size_t)offset;
    r->at_batch = 0;
    r->at_byte = 0;
    while (r->at_batch < r->n && skip >= 1 + r->batches[r->at_batch]->len) {
        skip -= 1 + r->batches[r->at_batch]->len;
        r->at_batch++;
    }
    if (r->at_batch < r->n)
        r->at_byte = skip;
    else
        r->at_batch += skip; /* past "]" when skip is 1 */
    return CURL_SEEKFUNC_OK;
}

static void request_free(struct request *r)
{
    if (!r)
        return;
    if (r->easy)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->headers);
    buf_free(&r->response);
    free(r->batches);
    explicit_bzero(&r->sent_with, sizeof r->sent_with);
    free(r);
}

/* Sends batches[0..n) to endpoint ep, the one dispatch found them for (read
 * again, the clock could have moved a batch over the line since: EP_MIXED). */
static int start_request(struct sender *s, struct feed_state *f, struct pbatch **batches, size_t n,
                         enum endpoint ep, int probe)
{
    struct request *r = n > 0 ? calloc(1, sizeof(*r)) : NULL;
    if (!r)
        goto fail;
    r->s = s;
    r->f = f;
    r->probe = probe;
    r->suspect = n == 1 && suspect(batches[0]);
    r->rate_usage = -1;
    r->started_ns = clock_mono_ns();
    memcpy(r->cred_fp, f->cred_fp, sizeof r->cred_fp);
    r->n = n;
    r->batches = malloc(n * sizeof(*r->batches));
    buf_init(&r->response, RESPONSE_MAX + 1);
    if (!r->batches)
        goto fail;
    r->len = 2 + (n - 1);
    for (size_t i = 0; i < n; i++) {
        r->batches[i] = batches[i];
        r->events += batches[i]->nrecords;
        r->len += batches[i]->len;
    }

    const struct feed_config *fc = &s->cfg->feeds[f->feed];
    char url[MPARTICLE_REQUEST_URL_MAX];
    const char *base = config_feed_url(s->cfg, f->feed);
    size_t bl = strlen(base);
    while (bl && base[bl - 1] == '/')
        bl--;
    r->ep = ep;
    snprintf(url, sizeof url, "%.*s%s", (int)bl, base,
             r->ep == EP_HISTORICAL ? MPARTICLE_HISTORICAL_PATH : MPARTICLE_BULK_PATH);
    char auth[MPARTICLE_AUTH_MAX], header[MPARTICLE_AUTH_MAX + 32];
    /* a feed without credentials is paused, and credentials over the
     * configuration's limit cannot get here */
    if (!fc->key || !fc->secret ||
        mparticle_basic_auth(fc->key, fc->secret, auth, sizeof auth) != 0)
        goto fail;
    str_copy(r->sent_with.key, sizeof r->sent_with.key, fc->key ? fc->key : "");
    str_copy(r->sent_with.secret, sizeof r->sent_with.secret, fc->secret ? fc->secret : "");
    snprintf(header, sizeof header, "Authorization: %s", auth);
    /* each header or none: a request sent without its Authorization (out of
     * memory for one item) would be answered 401, and pause the feed */
    const char *const headers[] = {"Content-Type: application/json", header, "Expect:"};
    int appended = 1;
    for (size_t i = 0; i < ARRAY_LEN(headers) && appended; i++) {
        struct curl_slist *h = curl_slist_append(r->headers, headers[i]);
        appended = h != NULL;
        r->headers = h ? h : r->headers;
    }
    explicit_bzero(auth, sizeof auth);
    explicit_bzero(header, sizeof header);
    if (!appended)
        goto fail;

    r->easy = curl_easy_init();
    if (!r->easy)
        goto fail;
    CURL *e = r->easy;
    /* the options libcurl copies can fail (out of memory); without the CA
     * bundle's, libcurl would verify against the system's store instead */
    if (curl_easy_setopt(e, CURLOPT_URL, url) != CURLE_OK ||
        curl_easy_setopt(e, CURLOPT_USERAGENT, "tributary/" TRIBUTARY_VERSION) != CURLE_OK ||
        curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK ||
        (s->cfg->mparticle_ca_bundle &&
         curl_easy_setopt(e, CURLOPT_CAINFO, s->cfg->mparticle_ca_bundle) != CURLE_OK))
        goto fail;
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_READFUNCTION, read_body);
    curl_easy_setopt(e, CURLOPT_READDATA, r);
    curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, seek_body);
    curl_easy_setopt(e, CURLOPT_SEEKDATA, r);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)REQUEST_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    /* a name not resolved within the connect timeout: its resolver thread is
     * left to end by itself instead of waited for (name servers that do not
     * answer held the sender, every feed, and a stop, for glibc's 10 s a
     * server). Such a thread keeps a socket pair until glibc gives up; the
     * feed's backoff bounds how many lookups are left so at once. */
    curl_easy_setopt(e, CURLOPT_QUICK_EXIT, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    if (curl_multi_add_handle(s->multi, e) != CURLM_OK)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        batches[i]->in_flight = 1;
        batches[i]->sent_before = batches[i]->sent;
        batches[i]->sent |= SENT_TO(r->ep);
    }
    f->in_flight++;
    f->suspects_in_flight += r->suspect;
    s->in_flight++;
    r->next = s->requests;
    s->requests = r;
    log_debug("sending", LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("batches", (long long)n)
                             LOG_I("events", (long long)r->events) LOG_I("bytes", (long long)r->len)
                                 LOG_S("batch", batches[0]->srid));
    return 0;
fail:
    /* its batches wait for the next turn */
    if (log_due(&s->start_logged_ms))
        log_error("cannot start a request to mParticle (out of memory, or libcurl refused an "
                  "option); tried again at the next turn",
                  LOG_S("feed", FEED_NAMES[f->feed]));
    request_free(r);
    return -1;
}

/* A 429 or a high usage: the rate drops by factor, once in RATE_CUT_MS, to
 * RATE_FLOOR of its limit at the least. The answers to the requests in flight
 * together (8 per feed) tell of the same moment of the account: each cutting
 * the rate took it to 1 batch/s within a second of usage at 90%, where it
 * stayed for as long as mParticle's usage did, with that of every other
 * source of the account. */
#define RATE_CUT_MS 1000
#define RATE_FLOOR 0.1
static int slow_down(struct bucket *b, double factor, double limit, int64_t now)
{
    double floor = limit * RATE_FLOOR > 1 ? limit * RATE_FLOOR : 1;
    if (now < b->next_cut || b->rate <= floor)
        return 0;
    b->next_cut = now + RATE_CUT_MS;
    b->recovered = now;
    b->rate = b->rate * factor > floor ? b->rate * factor : floor;
    return 1;
}

/* A delivery: the rate recovers towards its limit by RATE_RECOVERY of the
 * limit for each second since the last delivery or cut, a second at most: a
 * long spell without deliveries (a 429's wait) counts as one. Recovering per
 * answer, ten answers undid a halving within the second after a 429, and an
 * account provisioned under the limit met a 429 in nearly every second. */
#define RATE_RECOVERY 0.05
static void recover(struct bucket *b, double limit, int64_t now)
{
    int64_t since = now - b->recovered;
    b->recovered = now;
    if (b->rate >= limit)
        return;
    if (since > 1000)
        since = 1000;
    double up = limit * RATE_RECOVERY * (double)since / 1000.0;
    b->rate = b->rate + up < limit ? b->rate + up : limit;
}

/* How many batches may go now. */
static double available(struct bucket *b, int64_t now)
{
    int64_t k = now / RATE_SLOT_MS;
    if (k - b->slot >= RATE_SLOTS)
        memset(b->arrived, 0, sizeof b->arrived);
    else
        for (int64_t i = b->slot + 1; i <= k; i++)
            b->arrived[i % RATE_SLOTS] = 0;
    if (k > b->slot)
        b->slot = k;
    double used = b->in_flight;
    for (int i = 0; i < RATE_SLOTS; i++)
        used += b->arrived[i];
    return b->rate - used;
}

static void spend(struct bucket *b, size_t n)
{
    b->in_flight += (uint32_t)n;
}

/* n batches of b in flight taken to have arrived now. */
static void arrive(struct bucket *b, size_t n, int64_t now)
{
    (void)available(b, now); /* the ring up to now */
    b->in_flight -= (uint32_t)n;
    b->arrived[b->slot % RATE_SLOTS] += (uint32_t)n;
}

/* Nothing more goes in the second to come (a 429). */
static void use_up(struct bucket *b, int64_t now)
{
    double room = available(b, now);
    if (room >= 1)
        b->arrived[b->slot % RATE_SLOTS] += (uint32_t)room;
}

/* r's batches taken to have arrived now, in the windows of its feed and of the
 * account, unless they were already. */
static void arrived(struct sender *s, struct request *r, int64_t now)
{
    if (r->arrived)
        return;
    r->arrived = 1;
    arrive(&r->f->rate, r->n, now);
    arrive(&s->account, r->n, now);
}

/* The requests on their way for ARRIVAL_MAX_MS are taken to have arrived. */
static void arrived_late(struct sender *s, int64_t now)
{
    for (struct request *r = s->requests; r; r = r->next) {
        if (now - r->started_ns / 1000000 >= ARRIVAL_MAX_MS)
            arrived(s, r, now);
    }
}

static void dispatch(struct sender *s, struct feed_state *f, int64_t now)
{
    int64_t wall = clock_wall_ms(); /* for the endpoint of each batch (class_of) */
    if (f->pause == PAUSE_NO_CREDENTIALS)
        return;
    if (f->pause == PAUSE_AUTH) {
        /* one batch, alone, to learn whether the credentials work again (after any
         * backoff or Retry-After that the last probe earned) */
        if (f->probing || now < f->probe_at || now < s->account_not_before ||
            available(&f->rate, now) < 1 || available(&s->account, now) < 1)
            return;
        /* the batch that failed least: one that fails whatever the
         * credentials (a 5xx) would keep the feed paused */
        struct pbatch *probe = NULL;
        enum endpoint probe_ep = EP_MIXED;
        for (struct pbatch *b = f->head; b && !(probe && probe->failed.count == 0); b = b->next) {
            enum endpoint ep = class_of(b, wall);
            if (!b->in_flight && ep != EP_MIXED && now >= f->ep[ep].not_before &&
                (!probe || b->failed.count < probe->failed.count)) {
                probe = b;
                probe_ep = ep;
            }
        }
        if (probe && unpark(s, f, probe, now) == 0 &&
            start_request(s, f, &probe, 1, probe_ep, 1) == 0) {
            f->probing = 1;
            spend(&f->rate, 1); /* a probe is a batch sent like any */
            spend(&s->account, 1);
        }
        return;
    }
    if (now < s->account_not_before)
        return;
    struct pbatch *pick[MPARTICLE_MAX_BATCHES_PER_REQUEST];
    for (;;) {
        /* the request holds at most: 100 batches, what the feed's rate and the
         * account's allow now, and the limit of every batch in it (halved
         * after a 400 or 413) */
        double feed_room = available(&f->rate, now), account_room = available(&s->account, now);
        double room = feed_room < account_room ? feed_room : account_room;
        if (f->in_flight >= MAX_IN_FLIGHT || room < 1)
            return;
        size_t n = 0, bytes = 2;
        size_t cap = MPARTICLE_MAX_BATCHES_PER_REQUEST;
        if (room < (double)cap)
            cap = (size_t)room;
        enum endpoint first = EP_MIXED;
        for (struct pbatch *b = f->head; b; b = b->next) {
            /* one endpoint per request; a batch for both waits to be split */
            enum endpoint ep = class_of(b, wall);
            if (b->in_flight || ep == EP_MIXED || (n > 0 && ep != first) ||
                now < f->ep[ep].not_before || now < b->retry_at ||
                (suspect(b) && f->suspects_in_flight >= MAX_SUSPECTS_IN_FLIGHT))
                continue;
            first = ep;
            size_t c = cap < (size_t)b->limit ? cap : (size_t)b->limit;
            if (n + 1 > c)
                break;
            if (unpark(s, f, b, now) != 0)
                continue;
            if (n > 0 && bytes + b->len + 1 > MPARTICLE_MAX_REQUEST_BYTES)
                break;
            pick[n++] = b;
            bytes += b->len + 1;
            cap = c;
        }
        if (n == 0)
            return;
        if (start_request(s, f, pick, n, first, 0) != 0)
            return;
        spend(&f->rate, n);
        spend(&s->account, n);
    }
}

/* ---- answers ------------------------------------------------------------ */

static void release(struct request *r)
{
    for (size_t i = 0; i < r->n; i++)
        r->batches[i]->in_flight = 0;
}

/* Delivered batches leave the queue (without waiting for the commit: were it
 * lost, they would be sent again unchanged after a restart, and mParticle
 * recognises them by source_request_id) and memory. When their deletion cannot
 * be queued (out of memory), they stay in the feed, marked delivered and in
 * flight (never sent again), holding the settled line, and ack_again tries
 * again at the next turn. 0, or -1 when they stay. */
static int acknowledge(struct sender *s, struct feed_state *f, struct pbatch **done, size_t n)
{
    int64_t ids[MPARTICLE_MAX_BATCHES_PER_REQUEST];
    for (size_t i = 0; i < n; i++) {
        ids[i] = done[i]->id;
        feed_remove(f, done[i]);
    }
    if (queue_ack_async(s->q, ids, n, f->feed, settled_below(f)) != QUEUE_OK) {
        for (size_t i = 0; i < n; i++) {
            f->delivered += !done[i]->delivered;
            done[i]->delivered = 1;
            done[i]->in_flight = 1;
            feed_insert(f, done[i]);
        }
        if (log_due(&s->ack_logged_ms))
            log_error("cannot queue the deletion of delivered batches; tried again at the next "
                      "turn",
                      LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("batches", (long long)f->delivered));
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        f->delivered -= done[i]->delivered;
        pbatch_free(done[i]);
    }
    return 0;
}

/* The delivered batches acknowledge could not delete, a request's worth at a
 * time. */
static void ack_again(struct sender *s, struct feed_state *f)
{
    while (f->delivered > 0) {
        struct pbatch *done[MPARTICLE_MAX_BATCHES_PER_REQUEST];
        size_t n = 0;
        for (struct pbatch *b = f->head; b && n < ARRAY_LEN(done); b = b->next) {
            if (b->delivered)
                done[n++] = b;
        }
        if (n == 0 || acknowledge(s, f, done, n) != 0)
            return;
    }
}

static void on_delivered(struct sender *s, struct request *r)
{
    struct feed_state *f = r->f;
    (void)acknowledge(s, f, r->batches, r->n);
    for (size_t i = 0; i < r->n; i++)
        r->batches[i] = NULL;
    metrics_delivered(f->feed, r->events);
    struct endpoint_state *e = &f->ep[r->ep];
    int64_t now = clock_mono_ms();
    e->delivered_ms = now;
    if (e->failures > 0)
        log_info("mParticle accepts again",
                 LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("endpoint", ENDPOINT_NAMES[r->ep])
                     LOG_I("failures", e->failures));
    e->failures = 0;
    f->unexpected = 0;
    /* A probe resumes a feed paused for refused credentials, if they are still
     * the feed's: a reload may have taken them away (the feed is then paused
     * for having none) or replaced them (their own probe is due) meanwhile. */
    if (r->probe && f->pause == PAUSE_AUTH &&
        memcmp(r->cred_fp, f->cred_fp, sizeof r->cred_fp) == 0) {
        log_info("feed credentials accepted; feed resumed", LOG_S("feed", FEED_NAMES[f->feed]));
        set_pause(s, f, PAUSE_NONE, NULL);
    }
    /* the usage names no level: taken, as a 429 without one, for the
     * account's, which every feed shares */
    if (r->rate_usage >= RATE_USAGE_HIGH) {
        if (slow_down(&s->account, 0.8, (double)s->cfg->mparticle_rate_limit, now))
            log_info("mParticle rate limit usage high; slowing down every feed",
                     LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("usage_percent", r->rate_usage)
                         LOG_I("batches_per_s", (long long)s->account.rate));
    } else {
        recover(&s->account, (double)s->cfg->mparticle_rate_limit, now);
    }
    recover(&f->rate, (double)s->cfg->feeds[f->feed].rate_limit, now);
}

/* Counts one failure per round. The requests in flight together fail together
 * (a network blip, an outage): counting each would push the backoff ceiling to
 * base * 2^7 after a single blip of 8 requests. So the failure of a request
 * that started before the last counted failure is part of that round and not
 * counted again, also when its answer comes after a success has ended the
 * round. Returns 1 when this one was counted. */
static int count_failure(struct endpoint_state *e, const struct request *r)
{
    if (r->started_ns < e->failed_ns)
        return 0;
    e->failures++;
    e->failed_ns = clock_mono_ns();
    return 1;
}

/* Holds the endpoint until at least `at` (monotonic ms): a wait already set,
 * such as a 429's Retry-After, is never cut short by a shorter one. */
static void hold_until(struct endpoint_state *e, int64_t at)
{
    if (at > e->not_before)
        e->not_before = at;
}

/* Batch b, refused or failed in a request of n batches, goes on in requests of
 * at most half as many, so that repeated halving leaves a bad batch alone (one
 * that went alone stays alone). */
static void halve_limit(struct pbatch *b, size_t n)
{
    int half = n > 1 ? (int)(n / 2) : 1;
    if (b->limit > half)
        b->limit = half;
}

/* A request with b that mParticle did not accept (status 0: no answer), for
 * the detail of its dead letter (see describe_failures). */
static void count_answer(struct pbatch *b, int status, const char *why)
{
    b->failed.answers++;
    b->failed.last_status = status;
    b->failed.last_error = why;
}

/* The same for every batch of r, for an answer about the feed (401, 403,
 * 429), not about its batches: not a failure of theirs (see note_failures),
 * but the dead letters of a feed refused until retry.max_age_s say why. Their
 * time of failing (see failing) starts over: mParticle did not fail them. */
static void count_answers(struct request *r, int status, const char *why)
{
    for (size_t i = 0; i < r->n; i++) {
        count_answer(r->batches[i], status, why);
        r->batches[i]->failed.since_ms = 0;
    }
}

/* mParticle failed request r (status 0: no answer). Its batches go on in
 * halves, as after a 400, once they failed twice or while the feed works
 * (mParticle accepted a batch of it at the same endpoint since the batch's
 * previous failure, or since the request started): a batch that mParticle fails for its content
 * ends up alone and holds back no other. The same neighbours went with it at
 * every try until retry.max_age_s, and with the feed held back after each
 * failure, so did every new batch of a quiet feed. In an outage this only
 * makes requests smaller for a while. A batch alone that mParticle fails, each
 * time while the feed works, for retry.failing_s from its first failure alone
 * is a dead letter (see failing); once the feed delivered nothing at that
 * endpoint for FEED_STALLED_MS, its time of failing starts over. */
static void note_failures(struct feed_state *f, struct request *r, int status, const char *why)
{
    int64_t now = clock_mono_ms(), started = r->started_ns / 1000000;
    const struct endpoint_state *e = &f->ep[r->ep];
    for (size_t i = 0; i < r->n; i++) {
        struct pbatch *b = r->batches[i];
        int64_t since = b->failed.last_ms > 0 ? b->failed.last_ms : started;
        int works = e->delivered_ms >= since; /* answers of one turn can share a ms */
        /* failing counts from its first failure alone: one that fails only
         * beside others (which may be the ones at fault), and then waits for
         * a request of its own behind them, is not judged on that wait */
        if (works && r->n == 1 && b->failed.since_ms == 0)
            b->failed.since_ms = now;
        else if (!works && now - e->delivered_ms > FEED_STALLED_MS)
            b->failed.since_ms = 0;
        if (works || b->failed.count >= 1)
            halve_limit(b, r->n);
        r->alone_failing = r->n == 1 && works;
        b->failed.count++;
        b->failed.last_ms = now;
        count_answer(b, status, why);
    }
}

/* A failed request: its batches wait out a backoff that grows with the failed
 * rounds. Returns 1 when the failure was counted (the first of its round). A
 * batch that failed alone while mParticle accepts the feed's other batches
 * waits by itself, with a backoff of its own failures, and holds back no
 * other: the feed's backoff after each of its failures held every batch. */
static int back_off(struct sender *s, struct request *r)
{
    struct feed_state *f = r->f;
    struct endpoint_state *e = &f->ep[r->ep];
    release(r);
    metrics_retry(f->feed);
    if (r->alone_failing) {
        struct pbatch *b = r->batches[0];
        b->retry_at = clock_mono_ms() + backoff_ms(s, b->failed.count);
        return 0;
    }
    int counted = count_failure(e, r);
    /* a late answer of a round a success has ended since holds nothing back */
    if (counted || e->failures > 0)
        hold_until(e, clock_mono_ms() + backoff_ms(s, e->failures));
    return counted;
}

static void retry_later(struct sender *s, struct request *r, int status, const char *why)
{
    struct feed_state *f = r->f;
    struct endpoint_state *e = &f->ep[r->ep];
    int counted = back_off(s, r);
    int64_t wait = e->not_before - clock_mono_ms();
    if (r->alone_failing && log_due(&s->alone_logged_ms)) {
        const struct pbatch *b = r->batches[0];
        log_warn("mParticle fails a batch sent alone while it accepts the feed's others; it "
                 "waits by itself, and goes to the dead-letter store after retry.failing_s",
                 LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("endpoint", ENDPOINT_NAMES[r->ep])
                     LOG_S("batch", b->srid) LOG_I("status", status) LOG_S("error", why)
                         LOG_I("failures", b->failed.count)
                             LOG_I("retry_in_ms", b->retry_at - clock_mono_ms()));
    }
    /* the first failure of a streak, every 10th, and a change of what fails
     * (a 503 that becomes a refused connection) */
    int changed =
        counted && e->failures > 1 &&
        (status != e->last_status || (why && e->last_error && strcmp(why, e->last_error)));
    if (counted) {
        e->last_status = status;
        e->last_error = why;
    }
    if (counted && (e->failures == 1 || e->failures % 10 == 0 || changed))
        log_warn("mParticle request failed; backing off",
                 LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("endpoint", ENDPOINT_NAMES[r->ep])
                     LOG_I("status", status) LOG_S("error", why) LOG_I("failures", e->failures)
                         LOG_I("retry_in_ms", wait));
}

/* A status outside the API's contract did not come from mParticle's Events API
 * as configured: most likely mparticle.url (or feeds.<feed>.url) is wrong, such
 * as a URL that already ends in /v2/bulkevents (404), or a proxy answers in its
 * place (200, 3xx, 407). It says nothing about the batches, so they are kept
 * and sent again after a backoff, as for a retry. Logged at error, as nothing
 * is delivered until someone fixes it: the first such answer and every 10th. */
static void on_unexpected(struct sender *s, struct request *r, int status)
{
    struct feed_state *f = r->f;
    note_failures(f, r, status, "unexpected answer");
    back_off(s, r);
    int64_t wait = f->ep[r->ep].not_before - clock_mono_ms();
    f->unexpected++;
    if (f->unexpected == 1 || f->unexpected % 10 == 0)
        log_error("unexpected answer from mParticle; the batches are kept and sent again after "
                  "a backoff",
                  LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("status", status)
                      LOG_I("answers", f->unexpected) LOG_I("retry_in_ms", wait)
                          LOG_S("hint", "check mparticle.url and feeds.<feed>.url (the base URL, "
                                        "such as https://s2s.mparticle.com: tributary appends "
                                        "/v2/bulkevents) and any proxy in between"));
}

static void on_rate_limited(struct sender *s, struct request *r)
{
    struct feed_state *f = r->f;
    count_answers(r, 429, "rate limited");
    release(r);
    metrics_retry(f->feed);
    /* a limit of the feed's own key (`feed`, `app`) holds that feed back; any
     * other, or none named, every feed: mParticle's documented limit is the
     * account's, and a feed that went on would only be refused as well */
    static const char *const own[] = {"feed", "app"};
    int account = 1;
    for (size_t i = 0; i < ARRAY_LEN(own); i++)
        account &= strcasecmp(r->rate_exceeded, own[i]) != 0;
    struct bucket *b = account ? &s->account : &f->rate;
    int64_t now = clock_mono_ms();
    (void)slow_down(
        b, 0.5,
        (double)(account ? s->cfg->mparticle_rate_limit : s->cfg->feeds[f->feed].rate_limit), now);
    use_up(b, now);
    int64_t wait_s =
        mparticle_retry_after(r->retry_after[0] ? r->retry_after : NULL, clock_wall_ms() / 1000,
                              RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S);
    int64_t delay;
    if (wait_s >= 0) {
        delay = wait_s * 1000;
    } else {
        count_failure(&f->ep[r->ep], r);
        delay = backoff_ms(s, f->ep[r->ep].failures);
    }
    /* the rate is the feed's (or the account's), whichever endpoint */
    for (int i = 0; i < EP_ENDPOINTS; i++) {
        hold_until(&f->ep[i], now + delay);
        if (now + delay > f->ep[i].rate_limited_to)
            f->ep[i].rate_limited_to = now + delay;
    }
    if (account && now + delay > s->account_not_before)
        s->account_not_before = now + delay;
    log_warn("mParticle rate limit reached (429); waiting",
             LOG_S("feed", FEED_NAMES[f->feed])
                 LOG_S("limit", r->rate_exceeded[0] ? r->rate_exceeded : "unknown")
                     LOG_I("retry_in_ms", f->ep[r->ep].not_before - now)
                         LOG_I("batches_per_s", (long long)b->rate));
}

/* 401/403: the feed's credentials are refused, unless the request went out
 * with credentials that a reload has replaced since: that answer says nothing
 * about the current ones, and pausing the feed would override the immediate
 * probe the reload asked for (or stop a feed whose new credentials work). Its
 * batches only go back to the queue. */
static void on_auth_refused(struct sender *s, struct request *r, int status)
{
    struct feed_state *f = r->f;
    release(r);
    if (memcmp(r->cred_fp, f->cred_fp, sizeof r->cred_fp) != 0) {
        log_info("mParticle refused credentials that a reload has replaced since; the batches "
                 "are sent again with the current ones",
                 LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("status", status));
        return;
    }
    count_answers(r, status, "credentials refused");
    f->probe_at = clock_mono_ms() + s->cfg->retry_pause_ms;
    char reason[128];
    snprintf(reason, sizeof reason, "mParticle answered %d: credentials missing or invalid",
             status);
    if (f->pause != PAUSE_AUTH)
        log_error("ALERT: mParticle refused this feed's credentials; the feed is paused and its "
                  "events are kept",
                  LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("status", status)
                      LOG_I("probe_in_ms", s->cfg->retry_pause_ms));
    set_pause(s, f, PAUSE_AUTH, reason);
}

/* Splits a lone batch in two halves (413); rebuilds both bodies. */
static int split_batch(struct sender *s, struct feed_state *f, struct pbatch *b)
{
    struct queue_items items;
    queue_items_init(&items);
    struct pbatch *parts[2];
    int rc = -1;
    if (queue_fetch(s->reader, b->feed, b->record_ids, b->nrecords, &items) == 0 &&
        items.n == b->nrecords && split_in_two(s, f, b, &items, b->nrecords / 2, parts) == 0) {
        parts[0]->limit = parts[1]->limit = 1;
        rc = 0;
    }
    queue_items_free(&items);
    return rc;
}

/* What mParticle answered r, fit for a log line and a dead letter: whatever
 * could be a credential masked (mparticle_mask_credentials, with every feed's
 * and those r was sent with), bytes that are not UTF-8 replaced, at most
 * ANSWER_EXCERPT bytes. */
#define ANSWER_EXCERPT 900
static void answer_excerpt(const struct config *cfg, const struct request *r, char *out,
                           size_t outlen)
{
    size_t n = r->response.data ? r->response.len : 0;
    if (n > outlen - 1)
        n = outlen - 1;
    if (n)
        memcpy(out, r->response.data, n);
    struct mparticle_credentials creds[FEED_COUNT + 1];
    for (int i = 0; i < FEED_COUNT; i++) {
        creds[i].key = cfg->feeds[i].key;
        creds[i].secret = cfg->feeds[i].secret;
    }
    creds[FEED_COUNT].key = r->sent_with.key;
    creds[FEED_COUNT].secret = r->sent_with.secret;
    mparticle_mask_credentials(out, n, creds, FEED_COUNT + 1);
    out[utf8_sanitize(out, n, ANSWER_EXCERPT)] = '\0';
}

/* The lines of refused batches, at most REFUSED_LINES_PER_SECOND a second for
 * the whole sender, each kind its own: something in between that answers 400
 * to everything would otherwise write two lines per event (a split, then a
 * dead letter). tributary_dead_letters_total and the dead-letter store keep
 * them all. */
#define REFUSED_LINES_PER_SECOND 20
static struct log_budget split_lines, rejected_lines;

static int refused_line_allowed(struct log_budget *b, enum log_level level)
{
    return log_budget_allows(b, level, REFUSED_LINES_PER_SECOND,
                             "mParticle refused batches: more lines this second than the log "
                             "takes; the rest of them are left out of it "
                             "(tributary_dead_letters_total counts the events dead-lettered, the "
                             "dead-letter store keeps them)");
}

static void dead_letter(struct sender *s, struct request *r, int status)
{
    struct feed_state *f = r->f;
    struct pbatch *b = r->batches[0];
    char msg[4096], detail[1024];
    answer_excerpt(s->cfg, r, msg, sizeof msg);
    snprintf(detail, sizeof detail, "mParticle answered %d: %.*s", status, ANSWER_EXCERPT, msg);
    if (dead_batch(s, f, b, DEAD_REJECTED, detail) != 0) {
        retry_later(s, r, status, "cannot move the rejected batch to the dead-letter store");
        return;
    }
    if (refused_line_allowed(&rejected_lines, LOG_ERROR))
        log_error("mParticle rejected a batch; moved to the dead-letter store",
                  LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("batch", b->srid) LOG_I("status", status)
                      LOG_I("events", (long long)b->nrecords) LOG_S("detail", msg));
    pbatch_free(b);
}

/* 400 or 413: halve the requests these batches may travel in (halve_limit); a
 * lone batch of several events is split, so that a 400 ends up with the one
 * event mParticle refuses (a user's batch holds that user's events, good ones
 * too); a lone event refused with 400 is dead-lettered. A 413 for one event, within
 * mParticle's batch limit, says that something in between limits bodies: the
 * event is kept, as for any unexpected answer (and failing so alone while the
 * feed's other batches get through, it becomes a dead letter: see failing).
 * A batch that may have been sent before (pbatch.sent) is split too, unlike
 * at retry.max_age_s: mParticle answers the same bytes the same way, so an
 * earlier request of it that reached mParticle was refused as well, and
 * stored nothing (only something in between that refused these bytes once
 * and passed them once could have; see docs/operations.md). */
static void on_refused_content(struct sender *s, struct request *r, int status,
                               enum mp_action action)
{
    struct feed_state *f = r->f;
    if (r->n > 1) {
        for (size_t i = 0; i < r->n; i++) {
            halve_limit(r->batches[i], r->n);
            r->batches[i]->in_flight = 0;
        }
        if (refused_line_allowed(&split_lines, LOG_INFO))
            log_info("mParticle refused a bulk request; splitting it",
                     LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("status", status)
                         LOG_I("batches", (long long)r->n));
        return;
    }
    struct pbatch *b = r->batches[0];
    b->in_flight = 0;
    if (b->nrecords > 1) {
        if (refused_line_allowed(&split_lines, LOG_INFO))
            log_info("mParticle refused a batch; splitting it to find the events it refused",
                     LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("batch", b->srid)
                         LOG_I("status", status) LOG_I("events", (long long)b->nrecords));
        if (split_batch(s, f, b) != 0)
            retry_later(s, r, status, "cannot split the batch");
        return;
    }
    if (action == MP_REJECTED)
        dead_letter(s, r, status);
    else
        on_unexpected(s, r, status);
}

/* Whether an answer refuses the whole request, so that mParticle stored none
 * of its batches: a request it may hold is one that got a 202, a 5xx (after it
 * stored the batches, say), an unexpected answer or none. */
static int refused(enum mp_action action)
{
    return action == MP_RATE_LIMITED || action == MP_AUTH || action == MP_SPLIT ||
           action == MP_REJECTED;
}

static void finish(struct sender *s, CURLMsg *msg)
{
    struct request *r = NULL;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
    struct feed_state *f = r->f;
    long status = 0;
    if (msg->data.result == CURLE_OK)
        curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(s->multi, msg->easy_handle);
    for (struct request **pp = &s->requests; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    f->in_flight--;
    f->suspects_in_flight -= r->suspect;
    s->in_flight--;
    arrived(s, r, clock_mono_ms());
    if (r->probe)
        f->probing = 0;
    metrics_outbound(f->feed, (int)status, r->n, r->events);
    enum mp_action action = mparticle_classify((int)status);
    if (refused(action)) {
        for (size_t i = 0; i < r->n; i++)
            r->batches[i]->sent = r->batches[i]->sent_before;
    }
    log_debug("answered",
              LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("status", status)
                  LOG_S("action", mparticle_action_name(action)) LOG_I("batches", (long long)r->n));
    switch (action) {
    case MP_DELIVERED:
        on_delivered(s, r);
        break;
    case MP_RETRY: {
        const char *why =
            msg->data.result != CURLE_OK ? curl_easy_strerror(msg->data.result) : "server error";
        note_failures(f, r, (int)status, why);
        retry_later(s, r, (int)status, why);
        if (r->probe && f->pause == PAUSE_AUTH && log_due(&f->probe_logged_ms))
            log_warn("the probe of a feed paused for refused credentials failed without an "
                     "answer on them; the feed stays paused until mParticle accepts a probe",
                     LOG_S("feed", FEED_NAMES[f->feed]) LOG_I("status", status)
                         LOG_S("error", why));
        break;
    }
    case MP_RATE_LIMITED:
        on_rate_limited(s, r);
        break;
    case MP_AUTH:
        on_auth_refused(s, r, (int)status);
        break;
    case MP_SPLIT:
    case MP_REJECTED:
        on_refused_content(s, r, (int)status, action);
        break;
    case MP_UNEXPECTED:
        on_unexpected(s, r, (int)status);
        break;
    }
    request_free(r);
}

/* ---- the loop ----------------------------------------------------------- */

static int id_list_add(struct id_list *l, int64_t id)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        int64_t *ids = realloc(l->ids, cap * sizeof(*ids));
        if (!ids)
            return -1;
        l->ids = ids;
        l->cap = cap;
    }
    l->ids[l->n++] = id;
    return 0;
}

static void id_list_free(struct id_list *l)
{
    free(l->ids);
    memset(l, 0, sizeof(*l));
}

/* The batches that had no records left go, one operation per feed; should it
 * fail (a full disk), the queue tries it again. */
static void remove_emptied(struct sender *s)
{
    for (int i = 0; i < FEED_COUNT; i++) {
        if (s->emptied[i].n &&
            queue_ack_async(s->q, s->emptied[i].ids, s->emptied[i].n, (enum feed)i, 0) != QUEUE_OK)
            log_error("cannot remove persisted batches that had no records left; they are "
                      "removed at the next start",
                      LOG_S("feed", FEED_NAMES[i]) LOG_I("batches", (long long)s->emptied[i].n));
        id_list_free(&s->emptied[i]);
    }
}

/* The batches load_batch gave up (see given_up) go to the dead-letter store,
 * one operation each; should one fail, the next pass finds it again. */
static void expire_unrestored(struct sender *s)
{
    for (int i = 0; i < FEED_COUNT; i++) {
        size_t batches = 0, events = 0;
        for (size_t k = 0; k < s->past_age[i].n; k++) {
            enum queue_status st = queue_dead_batch(
                s->q, s->past_age[i].ids[k], (enum feed)i, 0, DEAD_MAX_AGE,
                QUEUE_MAX_AGE_DETAIL "; after a restart, its records could not be read to be "
                                     "sent again for retry.failing_s");
            if (st != QUEUE_OK) {
                if (log_due(&s->restore_logged_ms))
                    log_error("cannot move a persisted batch that cannot be read to the "
                              "dead-letter store; tried again in a second",
                              LOG_S("feed", FEED_NAMES[i]) LOG_S("error", queue_status_name(st)));
                continue;
            }
            batches++;
            events += (size_t)s->past_age_events[i].ids[k];
        }
        if (batches) {
            metrics_add_dead(DEAD_MAX_AGE, events);
            log_warn("persisted batches that could not be read for retry.failing_s, older than "
                     "retry.max_age_s, moved to the dead-letter store",
                     LOG_S("feed", FEED_NAMES[i]) LOG_I("batches", (long long)batches)
                         LOG_I("events", (long long)events));
        }
        id_list_free(&s->past_age[i]);
        id_list_free(&s->past_age_events[i]);
    }
}

static int compare_ids(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Whether a persisted batch that could not be restored now is given up: one
 * whose every pass failed for retry.failing_s (a damaged page, not a hiccup),
 * its oldest record past retry.max_age_s, goes to the dead-letter store whole
 * (the writer reads its records itself: see expire_unrestored); else it would
 * hold its feed's settled line, and the disk of every record after it, for as
 * long as the service runs. */
static int given_up(struct sender *s, const struct queue_batch *qb)
{
    int64_t now = clock_mono_ms(), since = now;
    size_t k = 0;
    while (k < s->unreadable.n && s->unreadable.ids[k] != qb->id)
        k++;
    if (k < s->unreadable.n)
        since = s->unreadable_since.ids[k];
    else if (id_list_add(&s->unreadable, qb->id) != 0)
        return 0;
    else if (id_list_add(&s->unreadable_since, now) != 0) {
        s->unreadable.n--;
        return 0;
    }
    return now - since >= s->cfg->retry_failing_s * 1000 &&
           qb->oldest_ms < clock_wall_ms() - s->cfg->retry_max_age_s * 1000;
}

static void load_batch(void *ctx, struct queue_batch *qb)
{
    struct sender *s = ctx;
    struct feed_state *f = &s->feeds[qb->feed];
    if (claim_row_of(qb->id) > s->restore_claims_upto ||
        (s->restored_sorted &&
         bsearch(&qb->id, s->restored.ids, s->restored_sorted, sizeof(int64_t), compare_ids))) {
        free(qb->record_ids); /* this run's, or restored by an earlier pass */
        qb->record_ids = NULL;
        return;
    }
    int64_t first = smallest_id(qb->record_ids, qb->nrecords);
    /* its records are claimed, whether or not it can be restored now: they
     * must not be claimed again into another batch */
    for (size_t i = 0; i < qb->nrecords; i++) {
        if (qb->record_ids[i] > f->cursor)
            f->cursor = qb->record_ids[i];
    }
    struct pbatch *b = calloc(1, sizeof(*b));
    struct queue_items items;
    queue_items_init(&items);
    if (!b)
        goto fail;
    b->id = qb->id;
    b->feed = qb->feed;
    b->limit = MPARTICLE_MAX_BATCHES_PER_REQUEST;
    str_copy(b->srid, sizeof b->srid, qb->source_request_id);
    b->record_ids = qb->record_ids;
    b->nrecords = qb->nrecords;
    b->first_id = first;
    b->oldest_ms = qb->oldest_ms;
    b->newest_ms = qb->oldest_ms; /* and the records' own, once read */
    qb->record_ids = NULL;
    if (queue_fetch(s->reader, b->feed, b->record_ids, b->nrecords, &items) != 0)
        goto fail;
    /* a later pass leaves it: the feed may have delivered it by then, its
     * acknowledgement still on the way to the disk */
    if (id_list_add(&s->restored, b->id) != 0)
        goto fail;
    if (items.n == 0) {
        /* its records were delivered, but the acknowledgement of the batch
         * itself did not reach the disk: it goes after the restoring read (a
         * write inside it, one per batch, kept the WAL from starting over) */
        if (id_list_add(&s->emptied[b->feed], b->id) != 0 &&
            queue_ack(s->q, &b->id, 1, b->feed, 0) != QUEUE_OK) {
            s->restored.n--;
            goto fail;
        }
        log_info("a persisted batch had no records left; removed",
                 LOG_S("feed", FEED_NAMES[b->feed]) LOG_S("batch", b->srid));
        queue_items_free(&items);
        pbatch_free(b);
        return;
    }
    if (build_body(s, b, &items, 0, items.n) != 0) {
        s->restored.n--;
        goto fail;
    }
    note_event_times(b, &items, NULL, items.n, NULL);
    for (size_t i = 0; i < items.n; i++) {
        if (items.items[i].received_ms > b->newest_ms)
            b->newest_ms = items.items[i].received_ms;
    }
    /* the last run may have sent it (a request cut off at its stop, or by a
     * crash): it keeps its endpoint (the real-time one unless all its events
     * are historical) and its id as one sent here would */
    b->sent = SENT_TO(class_of(b, clock_wall_ms()) == EP_HISTORICAL ? EP_HISTORICAL : EP_REALTIME);
    feed_insert(f, b);
    queue_items_free(&items);
    return;
fail:
    /* its records stay, the settled line stops below them, and the next pass
     * tries again */
    if (given_up(s, qb) && id_list_add(&s->past_age[qb->feed], qb->id) == 0 &&
        id_list_add(&s->past_age_events[qb->feed], (int64_t)qb->nrecords) != 0)
        s->past_age[qb->feed].n--;
    s->restore_pending = 1;
    if (log_due(&s->restore_logged_ms))
        log_error("cannot restore a persisted batch; it stays in the queue and is tried again",
                  LOG_S("feed", FEED_NAMES[qb->feed]) LOG_S("batch", qb->source_request_id));
    if (qb->nrecords > 0 && (f->unrestored == 0 || first < f->unrestored))
        f->unrestored = first;
    queue_items_free(&items);
    free(qb->record_ids);
    pbatch_free(b);
}

/* A feed without credentials holds its events; the rules chose it knowing
 * which feeds have credentials (a platform feed falls back to unbound when
 * unbound has them), or a rule routes its events elsewhere. While any feed can
 * send, its held events are mapped again, and those the rules now route to
 * another feed move there: all of them after a change of configuration or
 * rules, and every REROUTE_EVERY_MS those stored since the last pass (a
 * request mapped with the rules of before a change can be stored after the
 * pass that followed it). After a change, a pass starts over. */
static void plan_reroute(struct sender *s)
{
    for (int i = 0; i < FEED_COUNT; i++) {
        s->feeds[i].rerouting = 0;
        s->feeds[i].reroute_at = 0;
    }
}

static void drop_router(struct sender *s)
{
    rules_free(s->router);
    ruleset_unref(s->router_rs);
    s->router = NULL;
    s->router_rs = NULL;
}

/* The engine reroute maps with, for rs: built when the rules change or the
 * last one asks to be (a rule's state outgrew its limit), as a worker's is. */
static rules *router_for(struct sender *s, ruleset *rs, char *err, size_t errlen)
{
    if (s->router && (s->router_rs != rs || rules_needs_rebuild(s->router)))
        drop_router(s);
    if (!s->router) {
        if (rules_new(&s->router, rs, err, errlen) != 0)
            return NULL;
        rules_uncounted(s->router);
        s->router_rs = ruleset_ref(rs);
    }
    return s->router;
}

/* A pass that failed: tried again after REROUTE_EVERY_MS, from where the
 * last whole pass ended. */
static void reroute_failed(struct sender *s, struct feed_state *f, const char *msg,
                           const char *error)
{
    f->rerouting = 0;
    f->reroute_at = clock_mono_ms() + REROUTE_EVERY_MS;
    if (log_due(&s->reroute_logged_ms))
        log_error(msg, LOG_S("feed", FEED_NAMES[f->feed]) LOG_S("error", error));
}

/* The next held events of one feed (see plan_reroute): at most
 * REROUTE_RECORDS, and mapping for at most REROUTE_TURN_MS, a turn of the loop
 * at a time, so that sending goes on. An event the rules in force have mapped
 * already would map the same (the rules version covers the files, the
 * settings they read and which feeds have credentials): only the others are
 * mapped again. */
static void reroute(struct sender *s, ruleset *rs, int64_t now)
{
    const char *version = ruleset_version(rs);
    int any = any_feed_ready(s->cfg);
    struct feed_state *f = NULL;
    for (int i = 0; i < FEED_COUNT && !f; i++) {
        struct feed_state *g = &s->feeds[i];
        if (!any || g->pause != PAUSE_NO_CREDENTIALS) {
            g->rerouting = 0; /* nowhere to go, or its credentials came: it sends them itself */
            continue;
        }
        if (g->rerouting && strcmp(g->pass_version, version) != 0)
            g->rerouting = 0; /* the rules changed under the pass: a new one */
        if (!g->rerouting && now >= g->reroute_at) {
            g->rerouting = 1;
            g->reroute_after = strcmp(g->checked_version, version) == 0 ? g->checked_upto : 0;
            g->rerouted = 0;
            str_copy(g->pass_version, sizeof g->pass_version, version);
        }
        if (g->rerouting)
            f = g;
    }
    if (!f) {
        if (s->router)
            drop_router(s); /* built again when a held event needs it */
        return;
    }
    struct queue_items items;
    queue_items_init(&items);
    struct mapping moved;
    mapping_init(&moved);
    int64_t *ids = NULL;
    size_t n = 0, done = 0;
    int64_t after = f->reroute_after > f->cursor ? f->reroute_after : f->cursor;
    if (queue_scan_raw(s->reader, f->feed, after, REROUTE_RECORDS, CLAIM_BYTES, &items) != 0 ||
        (items.n && !(ids = malloc(items.n * sizeof(*ids))))) {
        reroute_failed(s, f, "cannot read held events to map them again; tried again in a second",
                       items.n ? "out of memory" : queue_reader_error(s->reader));
        goto done;
    }
    int64_t until = clock_mono_ms() + REROUTE_TURN_MS;
    for (; done < items.n && (done == 0 || clock_mono_ms() < until); done++) {
        const struct queue_item *it = &items.items[done];
        if (it->rules_version.p && strcmp(it->rules_version.p, version) == 0)
            continue;
        char err[ERR_LEN];
        rules *r = router_for(s, rs, err, sizeof err);
        if (!r) {
            reroute_failed(s, f, "cannot map held events again; tried again in a second", err);
            goto done;
        }
        struct mapping one;
        mapping_init(&one);
        struct input_error ie;
        if (rules_map(r, it->raw.p, it->raw.n, INPUT_EVENT, it->workspace, &one, &ie) == 0 &&
            one.nrecords == 1 && one.records[0].feed != f->feed) {
            one.records[0].received_ms = it->received_ms; /* its max_age counts on */
            if (mapping_add_copy(&moved, &one.records[0]) == 0)
                ids[n++] = it->id;
        }
        mapping_free(&one);
    }
    enum queue_status st = n ? queue_move(s->q, &moved, f->feed, ids, n) : QUEUE_OK;
    if (st != QUEUE_OK) {
        reroute_failed(s, f,
                       "cannot move held events to the feed the rules now route them to; tried "
                       "again in a second",
                       queue_status_name(st));
        goto done;
    }
    f->rerouted += n;
    metrics_add(M_EVENTS_MOVED, n);
    if (done) {
        f->reroute_after = items.items[done - 1].id;
    } else {
        f->rerouting = 0;
        f->reroute_at = now + REROUTE_EVERY_MS;
        f->checked_upto = f->reroute_after;
        str_copy(f->checked_version, sizeof f->checked_version, version);
        if (f->rerouted)
            log_info("held events moved to the feeds the rules now route them to",
                     LOG_S("from", FEED_NAMES[f->feed]) LOG_I("events", (long long)f->rerouted));
    }
done:
    free(ids);
    mapping_free(&moved);
    queue_items_free(&items);
}

static void sweep_unclaimed(struct sender *s, int64_t now)
{
    /* often enough that nothing outlives retry.max_age_s by much */
    int64_t every = s->cfg->retry_max_age_s * 1000 / 4;
    if (every > EXPIRE_EVERY_MS)
        every = EXPIRE_EVERY_MS;
    if (every < 250)
        every = 250;
    if (now - s->last_expire < every)
        return;
    s->last_expire = now;
    size_t moved[FEED_COUNT];
    int64_t cutoff = clock_wall_ms() - s->cfg->retry_max_age_s * 1000;
    if (queue_expire(s->q, cutoff, moved) != QUEUE_OK)
        return;
    for (int f = 0; f < FEED_COUNT; f++) {
        if (moved[f] == 0)
            continue;
        metrics_add_dead(DEAD_MAX_AGE, moved[f]);
        log_warn("events older than retry.max_age_s moved to the dead-letter store",
                 LOG_S("feed", FEED_NAMES[f]) LOG_I("events", (long long)moved[f]));
        s->last_expire = 0; /* more may be waiting: sweep again next round */
    }
}

/* Restores the batches persisted before the last stop, the ones no earlier
 * pass restored. Until a pass has them all, each feed's settled line stays
 * below the records of those it could not restore, and when the read itself
 * failed, which batches it did not reach is unknown: then every line stays
 * where it is and nothing is claimed, so no record of a persisted batch is
 * taken for delivered or claimed twice. */
static void restore(struct sender *s, int64_t now)
{
    size_t before = 0;
    for (int i = 0; i < FEED_COUNT; i++) {
        before += s->feeds[i].nbatches;
        s->feeds[i].unrestored = 0;
    }
    s->restore_pending = 0;
    int64_t upto;
    if (s->restore_claims_upto < 0 && queue_last_claim(s->reader, &upto) == 0)
        s->restore_claims_upto = upto;
    s->restore_unread =
        s->restore_claims_upto < 0 || queue_load_batches(s->reader, load_batch, s) != 0;
    if (s->restored.n)
        qsort(s->restored.ids, s->restored.n, sizeof(int64_t), compare_ids);
    s->restored_sorted = s->restored.n;
    remove_emptied(s);
    expire_unrestored(s);
    if (s->restore_unread) {
        s->restore_pending = 1;
        for (int i = 0; i < FEED_COUNT; i++)
            s->feeds[i].unrestored = 1;
        if (log_due(&s->restore_logged_ms))
            log_error("cannot read the persisted batches; nothing is claimed until they are "
                      "read, tried again every second");
    }
    s->restore_passes++;
    s->restore_next = now + RESTORE_RETRY_MS;
    size_t restored = 0;
    for (int i = 0; i < FEED_COUNT; i++)
        restored += s->feeds[i].nbatches;
    if (restored > before)
        log_info("re-sending the batches the last run made and did not see delivered",
                 LOG_I("batches", (long long)(restored - before)));
    if (!s->restore_pending) {
        if (s->restore_passes > 1)
            log_info("every persisted batch is restored",
                     LOG_I("attempts", (long long)s->restore_passes));
        id_list_free(&s->restored);
        id_list_free(&s->unreadable);
        id_list_free(&s->unreadable_since);
        s->restored_sorted = 0;
    }
}

static void *sender_main(void *arg)
{
    struct sender *s = arg;
    pthread_setname_np(pthread_self(), "sender");
    struct snapshot snap;
    reload_get(&snap);
    s->cfg = snap.cfg;
    /* the pauses the previous run recorded ended with it: this run starts
     * sending, and records its own (feeds without credentials at once) */
    for (int i = 0; i < FEED_COUNT; i++) {
        if (queue_set_feed_state(s->q, (enum feed)i, NULL) != QUEUE_OK)
            log_warn("cannot record the feed state", LOG_S("feed", FEED_NAMES[i]));
    }
    restore(s, clock_mono_ms());
    keep_names(s, clock_mono_ms());
    reload_put(&snap);

    for (;;) {
        reload_get(&snap);
        s->cfg = snap.cfg;
        int64_t now = clock_mono_ms();
        int stopping = atomic_load(&s->stopping);
        if (stopping && (s->in_flight == 0 || now >= atomic_load(&s->grace_until))) {
            reload_put(&snap);
            break;
        }
        int64_t wake = now + IDLE_POLL_MS;
        int cfg_changed = snap.generation != s->cfg_generation;
        s->cfg_generation = snap.generation;
        int expire_held = !stopping && now - s->last_expire_held >= EXPIRE_HELD_EVERY_MS;
        if (expire_held)
            s->last_expire_held = now;
        if (cfg_changed &&
            (s->account.rate <= 0 || s->account.rate > (double)s->cfg->mparticle_rate_limit))
            s->account.rate = (double)s->cfg->mparticle_rate_limit;
        for (int i = 0; i < FEED_COUNT; i++) {
            struct feed_state *f = &s->feeds[i];
            if (cfg_changed)
                update_credentials(s, f);
            ack_again(s, f);
            if (stopping)
                continue;
            if (expire_held) {
                expire_batches(s, f);
                split_mixed(s, f);
            }
        }
        if (cfg_changed)
            plan_reroute(s);
        if (!stopping && s->restore_pending && now >= s->restore_next)
            restore(s, now);
        if (!stopping && !s->restore_unread) {
            claim(s, now);
            reroute(s, snap.rs, now);
        }
        if (cfg_changed && s->cfg_generation > 1) {
            /* a reload: read them again (some may have been forgotten) */
            s->names_loaded = 0;
            s->names_next = 0;
        }
        keep_names(s, now);
        if (!stopping)
            sweep_unclaimed(s, now);
        /* the rate windows are read when the requests go out: the clock read
         * again after the steps above, which wait for commits (a slow disk:
         * hundreds of ms), and curl starts the requests right after */
        int64_t at = clock_mono_ms();
        arrived_late(s, at);
        /* the feeds take turns at going first: they share the account's rate */
        s->turn = (s->turn + 1) % FEED_COUNT;
        for (int i = 0; i < FEED_COUNT && !stopping; i++) {
            struct feed_state *f = &s->feeds[(s->turn + i) % FEED_COUNT];
            dispatch(s, f, at);
            for (int e = 0; e < EP_ENDPOINTS; e++) {
                if (f->ep[e].not_before > at && f->ep[e].not_before < wake)
                    wake = f->ep[e].not_before;
            }
            if (s->account_not_before > at && s->account_not_before < wake)
                wake = s->account_not_before;
        }
        int running = 0;
        curl_multi_perform(s->multi, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(s->multi, &left)) != NULL) {
            if (msg->msg == CURLMSG_DONE)
                finish(s, msg);
        }
        publish_status(s);
        int timeout = (int)(wake - clock_mono_ms());
        if (timeout < 1)
            timeout = 1;
        curl_multi_poll(s->multi, NULL, 0, timeout, NULL);
        reload_put(&snap);
        s->cfg = NULL;
    }

    /* deletions that could not be queued get a last try: otherwise their
     * batches go again after a restart */
    for (int i = 0; i < FEED_COUNT; i++)
        ack_again(s, &s->feeds[i]);
    /* What is still in flight is abandoned: persisted, re-sent after restart. */
    for (struct request *r = s->requests, *next; r; r = next) {
        next = r->next;
        curl_multi_remove_handle(s->multi, r->easy);
        request_free(r);
    }
    s->requests = NULL;
    if (s->in_flight)
        log_warn("stopped with requests in flight; their batches are re-sent after a restart",
                 LOG_I("requests", s->in_flight));
    return NULL;
}

int sender_global_init(void)
{
    return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1;
}

int sender_start(sender **out, queue *q, char *err, size_t errlen)
{
    *out = NULL;
    struct sender *s = calloc(1, sizeof(*s));
    if (!s) {
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    s->q = q;
    s->restore_claims_upto = -1;
    s->rng = (uint64_t)clock_wall_ms() ^ ((uint64_t)(uintptr_t)s << 16) ^ 0x9E3779B97F4A7C15ULL;
    pthread_mutex_init(&s->mu, NULL);
    /* the rates the configuration allows, in the metrics from the start (the
     * first turn of the sender comes after the restore, which takes a while) */
    struct snapshot snap;
    reload_get(&snap);
    s->account.rate = (double)snap.cfg->mparticle_rate_limit;
    for (int i = 0; i < FEED_COUNT; i++) {
        s->feeds[i].feed = (enum feed)i;
        s->feeds[i].rate.rate = (double)snap.cfg->feeds[i].rate_limit;
    }
    reload_put(&snap);
    publish_status(s);
    s->reader = queue_reader_new(q, err, errlen);
    if (!s->reader)
        goto fail;
    s->names = event_names_new();
    if (!s->names) {
        str_copy(err, errlen, "out of memory");
        goto fail;
    }
    s->multi = curl_multi_init();
    if (!s->multi) {
        str_copy(err, errlen, "cannot create the HTTP client");
        goto fail;
    }
    /* every feed may have all its requests in flight to the same host at once:
     * with fewer connections, slow answers on two feeds would hold another
     * feed's requests waiting inside curl for a connection */
    curl_multi_setopt(s->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)(MAX_IN_FLIGHT * FEED_COUNT));
    curl_multi_setopt(s->multi, CURLMOPT_MAXCONNECTS, (long)(MAX_IN_FLIGHT * FEED_COUNT * 2));
    if (pthread_create(&s->thread, NULL, sender_main, s) != 0) {
        str_copy(err, errlen, "cannot start the sender thread");
        goto fail;
    }
    *out = s;
    return 0;
fail:
    if (s->multi)
        curl_multi_cleanup(s->multi);
    event_names_free(s->names);
    queue_reader_free(s->reader);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return -1;
}

void sender_stop(sender *s, int64_t grace_ms)
{
    if (!s || s->joined)
        return;
    atomic_store(&s->grace_until, clock_mono_ms() + grace_ms);
    atomic_store(&s->stopping, 1);
    curl_multi_wakeup(s->multi);
    pthread_join(s->thread, NULL);
    s->joined = 1;
}

void sender_free(sender *s)
{
    if (!s)
        return;
    sender_stop(s, 0);
    for (int i = 0; i < FEED_COUNT; i++) {
        struct feed_state *f = &s->feeds[i];
        for (struct pbatch *b = f->head, *next; b; b = next) {
            next = b->next;
            pbatch_free(b);
        }
    }
    curl_multi_cleanup(s->multi);
    queue_reader_free(s->reader);
    pthread_mutex_destroy(&s->mu);
    id_list_free(&s->restored); /* a restore still pending at the stop */
    id_list_free(&s->unreadable);
    id_list_free(&s->unreadable_since);
    drop_router(s);
    event_names_free(s->names);
    free(s);
}

int64_t sender_event_names(sender *s)
{
    return event_names_count(s->names);
}

void sender_status(sender *s, struct feed_status out[FEED_COUNT])
{
    pthread_mutex_lock(&s->mu);
    memcpy(out, s->status, sizeof s->status);
    pthread_mutex_unlock(&s->mu);
}
