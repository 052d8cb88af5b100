/*
 * event_names: the custom event names this service has sent to mParticle,
 * against mParticle's limit of unique event names per workspace
 * (mparticle.event_names_limit, 1,000 by default). mParticle answers 202 for
 * an event whose name is past that limit, and drops the event: rules that put
 * a campaign, a product or a user in event_name lose events there silently.
 *
 * The sender notes the name of each event it puts in a batch. A name seen for
 * the first time is kept, in memory as a fingerprint and (through the queue)
 * in queue.db, so that the count outlives a restart, and logged:
 *   - at debug, each new name while under 90% of the limit;
 *   - a warning once the count reaches 90% of the limit;
 *   - an error for new names past the limit (at most one line per 10 s, with
 *     how many): mParticle drops their events.
 * At most twice the limit are kept; past that the count stops, said once.
 *
 * The count is of this service's names only: other inputs of the same
 * mParticle workspace have their own. A name is kept as the JSON writer wrote
 * it between its quotes, escapes and all.
 *
 * A set belongs to one thread (the sender's); event_names_count may be read
 * from any.
 */
#ifndef TRIBUTARY_EVENT_NAMES_H
#define TRIBUTARY_EVENT_NAMES_H

#include "util.h"

#include <stddef.h>
#include <stdint.h>

typedef struct event_names event_names;

event_names *event_names_new(void);
void event_names_free(event_names *s);

/* Adds a name stored before (read from queue.db at start), without a log
 * line. 0, or -1 when out of memory. */
int event_names_load(event_names *s, str name);

/* The warning of a count at 90% of `limit` or more, once per process: after
 * the stored names are loaded, and after a reload changes the limit. */
void event_names_check(event_names *s, int64_t limit);

/* Notes the name of a batched event: 1 when it is new (then kept, and among
 * the unstored names), 0 when known, or not kept (out of memory, or twice the
 * limit kept already). */
int event_names_note(event_names *s, str name, int64_t limit);

/* The new names not in queue.db yet (NUL-terminated copies); event_names_stored
 * once they are, which frees them. */
const str *event_names_unstored(const event_names *s, size_t *n);
void event_names_stored(event_names *s);

/* How many names are kept. Any thread. */
int64_t event_names_count(const event_names *s);

#endif
