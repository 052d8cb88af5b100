/*
 * sender: drains the queue into mParticle.
 *
 * One thread with one curl multi handle (keep-alive connections, several
 * requests in flight, timeouts always set). For each feed it
 *   - claims a window of queued records once the oldest has waited
 *     batch.linger_ms, groups them into one batch per user (at most 128 KB),
 *     and persists the batches with their source_request_id before sending;
 *   - packs waiting batches into bulk requests (at most 100 batches, under
 *     256 KB) within the feed's rate limit (token bucket, lowered by 429s and by
 *     X-mp-rate-limit-percentage-used near 100);
 *   - acts on each answer: 202 (only) deletes; 429 waits Retry-After; 5xx, 408
 *     and transport failures back off exponentially with full jitter; 400 and
 *     413 split the request (and a lone batch) until the bad batch is isolated
 *     and dead-lettered with mParticle's message (400 only); 401/403 pause only
 *     that feed, keep everything queued and probe again after retry.pause_ms or
 *     as soon as its credentials change (an answer to credentials that a reload
 *     has replaced since only puts the batches back); any other status (a 200
 *     from a proxy, a 404 from a wrong mparticle.url) keeps the batches, backs
 *     off as for a 5xx and logs an error.
 * A feed without credentials is paused the same way. Batches whose oldest event
 * is older than retry.max_age_s go to the dead-letter store.
 *
 * A batch is removed only after its 202; after a crash the persisted batches are
 * sent again with the same bytes and source_request_id.
 *
 * Uses queue, mparticle, reload (configuration), metrics, log. The only module
 * that includes curl.
 */
#ifndef TRIBUTARY_SENDER_H
#define TRIBUTARY_SENDER_H

#include "queue.h"
#include "record.h"

typedef struct sender sender;

/* Why a feed is not sending. */
enum feed_pause { PAUSE_NONE, PAUSE_NO_CREDENTIALS, PAUSE_AUTH };

/* Process-wide set-up of the HTTP client; once, before any thread starts. */
int sender_global_init(void) WUR;

/* Starts the sender thread (after sender_global_init). */
int sender_start(sender **out, queue *q, char *err, size_t errlen) WUR;
/* Stops claiming, lets in-flight requests finish for up to grace_ms, stops the
 * thread. What is not acknowledged stays queued. sender_status keeps working
 * until sender_free. Accepts NULL. */
void sender_stop(sender *s, int64_t grace_ms);
void sender_free(sender *s);
/* What a feed is doing, as the sender's last turn left it. */
struct feed_status {
    enum feed_pause pause;
    int failures;        /* failed rounds in a row, the more of its two endpoints' */
    int64_t resume_ms;   /* monotonic ms: it waits (a backoff, a 429's) until then */
    double rate;         /* batches a second it allows itself (lowered after 429s) */
    double account_rate; /* the same for all feeds together */
};
/* Every feed's status; any thread. */
void sender_status(sender *s, struct feed_status out[FEED_COUNT]);
/* How many event names the sender has seen (see event_names.h); any thread. */
int64_t sender_event_names(sender *s);

#endif
