/*
 * event_names: the custom event names this service has sent to mParticle,
 * against mParticle's limit of unique event names per workspace
 * (mparticle.event_names_limit, 1,000 by default). mParticle answers 202 for
 * an event whose name is past that limit, and drops the event: rules that put
 * a campaign, a product or a user in event_name lose events there silently.
 *
 * The sender notes the name of each custom event it puts in a batch. A name
 * seen for the first time is kept, in memory as a fingerprint and (through the
 * queue) in queue.db, so that the count outlives a restart, and logged:
 *   - at debug, each new name, with its text (only at debug: a rule may have
 *     put a user in it);
 *   - a warning when the count reaches 90% of the limit (an error when it is
 *     past it), once, and again after a start, a change of the limit, or a
 *     count that fell under 90% (names forgotten);
 *   - an error for new names past the limit, without the name (at most one
 *     line per 10 s, with how many): mParticle drops their events.
 * At most twice the limit are counted; past that the count stops, said once.
 *
 * The count is of the names this service put in batches, on all feeds
 * together: an event that then becomes a dead letter counted its name too, and
 * other inputs of the same mParticle workspace have their own names.
 *
 * A set belongs to one thread (the sender's); event_names_count may be read
 * from any.
 */
#ifndef TRIBUTARY_EVENT_NAMES_H
#define TRIBUTARY_EVENT_NAMES_H

#include "record.h"
#include "util.h"

#include <stddef.h>
#include <stdint.h>

/* New names are counted up to this many times the limit. */
#define EVENT_NAMES_COUNTED_PER_LIMIT 2

typedef struct event_names event_names;

/* NULL when out of memory; event_names_free accepts NULL. */
event_names *event_names_new(void);
void event_names_free(event_names *s);

/* Adds a name stored before (read from queue.db), without a log line. name
 * is borrowed for the call. 0, or -1 when out of memory. */
int event_names_load(event_names *s, str name) WUR;

/* Takes the names of `read` (a set the stored names were read into, at a
 * start or a reload: some may have been forgotten with `tributary queue
 * forget-names`) in place of its own, with its unstored ones. `read` is left
 * empty (the caller frees it). 0, or -1 when out of memory (s unchanged). */
int event_names_replace(event_names *s, event_names *read) WUR;

/* The warning (90% of limit) or error (past it) of the count, as above:
 * after each new name, after the stored names are read, and after a reload. */
void event_names_check(event_names *s, int64_t limit);

/* Notes the name of a batched custom event at now_ms (UNIX ms): 1 when it is
 * new (then counted, and among the unstored names, copied), 0 when known or
 * not counted (twice the limit counted already, or out of memory: logged).
 * *past: whether the name came past the limit, so that mParticle drops the
 * event. name is borrowed for the call. */
int event_names_note(event_names *s, str name, int64_t limit, int64_t now_ms, int *past);

/* The new names not in queue.db yet, NUL-terminated. Borrowed: valid until
 * the next event_names_note or event_names_stored, which frees them once
 * they are stored. */
const struct event_name *event_names_unstored(const event_names *s, size_t *n);
void event_names_stored(event_names *s);

/* How many names are counted. Any thread. */
int64_t event_names_count(const event_names *s);

#endif
