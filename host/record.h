/*
 * record: the plain data that travels from the rules to the queue and from the
 * queue to the sender. No module dependency beyond util.
 *
 * A record is one mapped event, ready to be batched at send time:
 *   feed      which mParticle input (credentials) carries it
 *   user      the batching key: events of one user on one feed share a batch
 *   batch     batch-level fields as lines  "section"<TAB>"key"<TAB>json-value<LF>
 *             (key is "" for a top-level scalar). Several records of one user
 *             merge line by line, later records winning, without a JSON parser.
 *   event     the mParticle event object, JSON
 *   raw       the Braze event, JSON, so a dead letter can run through the rules again
 *   workspace the request's `?workspace=` (which Braze workspace sent it), or
 *             none, so that the rules see it again when they map it again
 */
#ifndef TRIBUTARY_RECORD_H
#define TRIBUTARY_RECORD_H

#include "util.h"

#include <stdint.h>

enum feed { FEED_IOS, FEED_ANDROID, FEED_WEB, FEED_UNBOUND, FEED_COUNT };

extern const char *const FEED_NAMES[FEED_COUNT];

/* Returns the feed for a name such as "ios", or -1. */
int feed_from_name(const char *name, size_t n);

struct record {
    enum feed feed;
    str user;
    str batch;
    str event;
    str raw;
    str workspace; /* STR_NULL: none */
    str event_id;
    str event_type;
    const char *rules_version;
    int64_t received_ms; /* when tributary took the event (0: now, as it is stored) */
};

/* Why an event went to the dead-letter store. */
#define DEAD_RULE_ERROR "rule_error"         /* a rule raised an error */
#define DEAD_RULE_LIMIT "rule_limit"         /* a rule hit its memory or instruction limit */
#define DEAD_INVALID_OUTPUT "invalid_output" /* a rule returned an output that is not valid */
#define DEAD_REJECTED "rejected"             /* mParticle answered 400 for its batch */
#define DEAD_MAX_AGE "max_age"               /* older than retry.max_age_s, never delivered */
#define DEAD_FAILING "failing"               /* mParticle kept failing it, took others */
#define DEAD_REASON_COUNT 6
extern const char *const DEAD_REASONS[DEAD_REASON_COUNT]; /* the six above, in that order */

struct dead_letter {
    const char *reason; /* one of DEAD_* */
    str detail;         /* what went wrong, with rule file and line when known */
    int feed;           /* enum feed, or -1 when not mapped */
    str raw;
    str workspace; /* STR_NULL: none */
    str event_id;
    str event_type;
    const char *rules_version;
    int stored; /* set by queue_commit: 0 when it was a duplicate */
};

/* A custom event name sent for the first time (see event_names.h), on its way
 * to the queue: the text between its quotes as the JSON writer wrote it. */
struct event_name {
    str name;
    int64_t first_ms; /* UNIX milliseconds */
};

/* Why an event was not forwarded, when that is by design rather than an error. */
enum drop_reason {
    DROP_UNSUPPORTED_TYPE, /* not one of the mapped event types */
    DROP_NOT_SELECTED,     /* excluded by the `events` setting */
    DROP_RULE,             /* a rule dropped it */
    DROP_NO_EXTERNAL_ID,   /* user without external_user_id: skipped */
    DROP_REASON_COUNT
};

extern const char *const DROP_REASON_NAMES[DROP_REASON_COUNT];

/* What happened to one input event (kept when mapping.keep_outcomes is set). */
enum outcome_kind { OUTCOME_RECORD, OUTCOME_DROPPED, OUTCOME_DEAD };

struct outcome {
    enum outcome_kind kind;
    size_t index;            /* into records or dead */
    enum drop_reason reason; /* OUTCOME_DROPPED */
    str detail;              /* OUTCOME_DROPPED: the rule's explanation, if any */
    str dropped_by;          /* OUTCOME_DROPPED: the name of the rule file that dropped it */
    str event_id;
    str event_type;
};

/* What the rules made of one request. Strings live in `mem`. */
struct mapping {
    arena mem;
    struct record *records;
    size_t nrecords, records_cap;
    struct dead_letter *dead;
    size_t ndead, dead_cap;
    size_t nevents;
    size_t dropped[DROP_REASON_COUNT];
    int keep_outcomes;
    struct outcome *outcomes; /* one per input event, when keep_outcomes */
    size_t noutcomes, outcomes_cap;
};

void mapping_init(struct mapping *m);
void mapping_free(struct mapping *m);
/* Append a zeroed slot; NULL when out of memory. */
struct record *mapping_add_record(struct mapping *m);
struct dead_letter *mapping_add_dead(struct mapping *m);
struct outcome *mapping_add_outcome(struct mapping *m);
/* Copies bytes into the mapping's arena; STR_NULL on failure with *failed set. */
str mapping_copy(struct mapping *m, const char *p, size_t n, int *failed);
/* Appends a copy of r (its strings in m's arena); -1 when out of memory. */
int mapping_add_copy(struct mapping *m, const struct record *r) WUR;

#endif
