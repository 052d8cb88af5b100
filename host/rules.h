/*
 * rules: runs the Lua rule scripts on Braze Currents events.
 *
 * A ruleset is the immutable input of a rule generation: every *.lua file of
 * rules_dir (in name order) plus the configuration values rules may read. Its
 * version is a fingerprint of both, recorded with every event it maps.
 *
 * A rules engine is one Lua state (sandboxed, with memory and instruction limits)
 * running a ruleset. Engines are not thread-safe: each worker thread owns one.
 *
 * The rule contract (documented for users in the README): each file returns a
 * function, or a table with a `process` function and optional `tests`:
 *
 *     process(event, out) -> out' | nil | false, reason
 *
 * `event` is the decoded Braze event, `out` what earlier files produced (nil at
 * first). Returning a table replaces out, nil keeps it, false drops the event
 * with a reason. The final out is {feed = "ios"|"android"|"web"|"unbound",
 * batch = {...batch-level fields...}, event = {...mParticle event...}}.
 *
 * Uses sandbox (Lua), lua-cjson, config, record, metrics.
 */
#ifndef TRIBUTARY_RULES_H
#define TRIBUTARY_RULES_H

#include "config.h"
#include "record.h"
#include "util.h"

#include <stdatomic.h>

#define RULES_MAX_FILES 256
#define RULES_MAX_FILE_BYTES (1u << 20)
/* The instruction budget of a file's top level: it may set up tables, but a
 * loop without end must fail fast. */
#define RULES_LOAD_INSTRUCTIONS 20000000
/* The decoded events of one request may take this much of their Lua state,
 * at most, as judged from their JSON text before it is decoded (see
 * decoded_bound): a larger request is 413, which Braze answers by sending its
 * events in smaller ones. http.threads requests are decoded at once, at most. */
#define RULES_DECODE_MEMORY_MB 128
/* Rule tests run by `check`, a reload and `dlq requeue`: at most this many,
 * for at most this long together (each may take an event's time limit). */
#define RULES_MAX_TESTS 1000
#define RULES_TESTS_TIME_S 60
/* JSON nesting accepted in requests and produced by rules. */
#define RULES_MAX_JSON_DEPTH 64
/* A mapped event, and its batch-level fields, are written up to the size of
 * an mParticle batch (MPARTICLE_MAX_BATCH_BYTES, 128 KB); together they must
 * fit a batch of their own as the sender counts it
 * (mparticle_batch_size_bound), or the event is invalid output. */
#define RULES_MAX_OUTPUT_BYTES 128000
/* cjson.encode called by a rule refuses to make a longer text. */
#define RULES_MAX_ENCODE_BYTES (1u << 20)
/* cjson.decode called by a rule refuses a text of n bytes unless the rule has
 * n * RULES_DECODE_BYTES_PER_BYTE + RULES_DECODE_BYTES_FIXED bytes of memory
 * left: the most the decoded values can take (36 per byte measured, for lists
 * of empty lists nested deep). */
#define RULES_DECODE_BYTES_PER_BYTE 48
#define RULES_DECODE_BYTES_FIXED 4096

typedef struct ruleset ruleset;

/* Reads the rule files of cfg->rules_dir. Takes a reference on cfg. Caller
 * releases with ruleset_unref. */
int ruleset_load(ruleset **out, struct config *cfg, char *err, size_t errlen) WUR;
ruleset *ruleset_ref(ruleset *rs);
void ruleset_unref(ruleset *rs);
const char *ruleset_version(const ruleset *rs);
struct config *ruleset_config(const ruleset *rs); /* borrowed */
size_t ruleset_files(const ruleset *rs);
const char *ruleset_file_name(const ruleset *rs, size_t i);

typedef struct rules rules;

/* Builds an engine: compiles and runs every file's top level under the limits.
 * Errors name the file and line. Takes a reference on rs. */
int rules_new(rules **out, ruleset *rs, char *err, size_t errlen) WUR;
void rules_free(rules *r);
/* From now on tributary.count counts nothing: for events mapped again, which
 * were counted when they came. */
void rules_uncounted(rules *r);
ruleset *rules_ruleset(const rules *r); /* borrowed */
/* Why the owner should build a fresh engine before the next request (a limit
 * tripped, or the state holds more memory than allowed), or NULL. */
const char *rules_needs_rebuild(const rules *r);

/* What a request body may hold. */
enum input_shape {
    INPUT_ENVELOPE, /* {"events": [...]}: what Braze sends */
    INPUT_ANY,      /* envelope, JSON array, a single event, or NDJSON (map) */
    INPUT_EVENT,    /* one event as Braze sent it (a dead letter's, a held record's):
                       an "events" field of its own is one of its fields */
};

/* Why a request was refused; status is the HTTP answer (400 or 413). */
struct input_error {
    int status;
    long index; /* the event at fault, or -1 */
    char reason[ERR_LEN];
};

/* Decodes and validates a request body, then runs every event through the rules
 * into m. workspace: the request's `?workspace=` (STR_NULL: none), the rules'
 * third argument, kept with every record and dead letter. On invalid input
 * returns -1 with e filled and nothing added to m. On an internal failure (out
 * of memory) returns -1 with e->status 503. */
int rules_map(rules *r, const char *body, size_t len, enum input_shape shape, str workspace,
              struct mapping *m, struct input_error *e) WUR;

/* Runs the examples that rule files carry in their `tests` tables. Appends one
 * report per failure to report (with a readable difference), and to warnings
 * a line when the events of tests that pass go to the dead-letter store in the
 * files after theirs. Returns the number of failures, or -1 on an internal
 * error. */
int rules_self_test(rules *r, buf *report, buf *warnings, int *ntests);
/* While *cancel (NULL: never) is set, rules_self_test runs no further test and
 * fails, saying why. */
void rules_tests_cancelled_by(rules *r, const atomic_int *cancel);

/* From now on, every print of a rule is written, none left out by the limit
 * of lines a second: for the commands run by hand (map, check), whose output
 * is their reader's. */
void rules_prints_unlimited(void);

#endif
