/*
 * mparticle: what mParticle's server-to-server Events API expects and answers.
 *
 * - Builds a batch (one user, one feed) from queued records: the batch-level
 *   lines of every record merged in order (later records win), the events in
 *   order, environment, schema_version 2 and a source_request_id that is a
 *   name-based UUID over the event ids, so a re-sent batch is recognised.
 * - Classifies answers (what the sender does with each status: only 202 is a
 *   delivery, only 400 a malformed batch) and parses Retry-After.
 *
 * Plain C; the HTTP transport itself is in sender.
 */
#ifndef TRIBUTARY_MPARTICLE_H
#define TRIBUTARY_MPARTICLE_H

#include "digest.h"
#include "record.h"
#include "util.h"

/* mParticle's limits. Its "128 KB" and "256 KB" are read as thousands of
 * bytes, the smaller of the two readings: a batch over the limit may be
 * answered 202 and dropped. */
#define MPARTICLE_MAX_BATCH_BYTES 128000
#define MPARTICLE_MAX_REQUEST_BYTES (256000 - 1)
#define MPARTICLE_MAX_BATCHES_PER_REQUEST 100
#define MPARTICLE_MAX_USER_ATTRIBUTES 100   /* per batch */
#define MPARTICLE_MAX_CUSTOM_ATTRIBUTES 100 /* per event */
#define MPARTICLE_MAX_NAME_CHARS 256        /* an attribute's name, an event_name */
#define MPARTICLE_MAX_VALUE_CHARS 4096      /* an attribute's value */
#define MPARTICLE_BULK_PATH "/v2/bulkevents"
/* Data older than 30 days goes to the historical endpoint instead. */
#define MPARTICLE_HISTORICAL_PATH "/v2/bulkevents/historical"
#define MPARTICLE_HISTORICAL_AGE_MS (30LL * 86400 * 1000)
/* The longest base URL taken (mparticle.url, feeds.<feed>.url), and room for
 * it with either path appended. */
#define MPARTICLE_URL_MAX 1024
#define MPARTICLE_REQUEST_URL_MAX (MPARTICLE_URL_MAX + sizeof MPARTICLE_HISTORICAL_PATH)

/* One event's parts as stored in the queue. */
struct batch_part {
    str batch; /* batch-level lines */
    str event; /* event JSON */
    str event_id;
};

/* The user_attributes names of one batch being put together: records of one
 * user merge their attributes, and the union must stay within mParticle's 100. */
struct mparticle_attr_names {
    str names[MPARTICLE_MAX_USER_ATTRIBUTES]; /* borrowed from the records' lines */
    size_t n;
};

/* Adds the user_attributes names of a record's batch-level lines to `set`.
 * Returns 0, or -1 with `set` unchanged when the union would hold more than
 * MPARTICLE_MAX_USER_ATTRIBUTES: the record belongs in another batch. */
int mparticle_attr_names_add(struct mparticle_attr_names *set, str lines) WUR;

/* source_request_id for a batch holding these events, in order; -1 when out of
 * memory (a fixed id would make mParticle drop every such batch as a repeat). */
int mparticle_source_request_id(const struct batch_part *parts, size_t n,
                                char out[UUID_STR_LEN]) WUR;

/* Appends the batch JSON object. environment is used unless a record sets it. */
int mparticle_build_batch(buf *out, const char *environment, const char *source_request_id,
                          const struct batch_part *parts, size_t n) WUR;

/* Bytes a batch of these parts takes at most (for sizing before building). */
size_t mparticle_batch_size_bound(const struct batch_part *parts, size_t n);

/* The names mParticle takes for an event's event_type, a custom event's
 * custom_event_type, device_info.platform and environment: 1 when `s` is one. */
int mparticle_event_type_known(const char *s);
int mparticle_custom_event_type_known(const char *s);
int mparticle_platform_known(const char *s);
int mparticle_environment_known(const char *s);
/* The environments, NULL-terminated (the configuration's `environment` too). */
extern const char *const MPARTICLE_ENVIRONMENTS[];

/* What the sender does with an answer. Only the statuses of the API's contract
 * (mparticle-events-api.md, "Responses") have a meaning; anything else did not
 * come from the Events API as configured (a wrong mparticle.url, a proxy in
 * between) and proves nothing about the batches: they are kept. */
enum mp_action {
    MP_DELIVERED,    /* 202 only: delete */
    MP_RETRY,        /* 5xx, 408, transport failure (0): back off and retry */
    MP_RATE_LIMITED, /* 429: wait Retry-After or back off, slow down */
    MP_SPLIT,        /* 413: smaller requests */
    MP_REJECTED,     /* 400 only: isolate the bad batch, dead-letter it */
    MP_AUTH,         /* 401/403: pause the feed */
    MP_UNEXPECTED,   /* any other status (other 2xx, 1xx, 3xx, other 4xx): keep the
                      * batches, back off as for MP_RETRY, log an error */
};

enum mp_action mparticle_classify(int status);
const char *mparticle_action_name(enum mp_action a);

/* Parses a Retry-After value (delta seconds or an HTTP date) relative to now
 * (UNIX seconds) and clamps it to [min_s, max_s]. -1 when absent or invalid. */
int64_t mparticle_retry_after(const char *value, int64_t now_s, int64_t min_s, int64_t max_s);

/* Feed keys and secrets are refused above this length (mParticle's are far
 * shorter), so that an Authorization header always fits MPARTICLE_AUTH_MAX. */
#define MPARTICLE_MAX_CREDENTIAL_CHARS 256
#define MPARTICLE_AUTH_MAX (6 + 4 * ((2 * MPARTICLE_MAX_CREDENTIAL_CHARS + 3) / 3) + 1)

/* "Basic base64(key:secret)" into out (at least 4*((klen+slen+3)/3)+8 bytes).
 * -1, with out empty, when it does not fit or memory runs out. */
int mparticle_basic_auth(const char *key, const char *secret, char *out, size_t outlen) WUR;

/* A feed's credentials (either NULL when it has none). */
struct mparticle_credentials {
    const char *key, *secret;
};

/* The first bytes of an answer mparticle_mask_credentials looks at. */
#define MPARTICLE_MASK_MAX 4096

/* Overwrites with '*' whatever in the answer s[0..n) (its first
 * MPARTICLE_MASK_MAX bytes) could be a credential, so that it can be logged
 * and kept: "Basic <credentials>" in any case, and each key, secret and base64
 * of "key:secret", as sent, percent-escaped or JSON-escaped, or in a mix of
 * these spellings (a proxy or server echoing the request). */
void mparticle_mask_credentials(char *s, size_t n, const struct mparticle_credentials *creds,
                                size_t ncreds);

/* What the sender reads of an event object's JSON (as the rules' output is
 * written), without a parser. */
struct mparticle_event_fields {
    int64_t time_ms; /* data.timestamp_unixtime_ms; -1 when it has none */
    str name;        /* a custom_event's data.event_name, the text between its
                      * quotes as written (escapes and all), borrowed from the
                      * event's text; STR_NULL when none */
};
void mparticle_event_fields(const char *event, size_t n, struct mparticle_event_fields *out);

/* The event's data.timestamp_unixtime_ms; -1 when it has none. */
int64_t mparticle_event_time_ms(const char *event, size_t n);

#endif
