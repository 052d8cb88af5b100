/*
 * log: the one logging family. Each call writes one structured line to stderr,
 * as logfmt (the default, easy on a terminal) or JSON (one object per line), with
 * a timestamp, the level, a message and typed fields:
 *
 *     log_info("feed paused", LOG_S("feed", "ios") LOG_I("status", 401));
 *
 * The request id of the calling thread (log_set_request) is added to every line.
 * Callers never pass secrets; a test greps the logs for every configured one.
 */
#ifndef TRIBUTARY_LOG_H
#define TRIBUTARY_LOG_H

#include <stdatomic.h>
#include <stdint.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };
enum log_format { LOG_LOGFMT, LOG_JSON };

enum log_field_kind { LOG_FIELD_END, LOG_FIELD_STR, LOG_FIELD_INT };

struct log_field {
    const char *key;
    enum log_field_kind kind;
    const char *s;
    long long i;
};

#define LOG_S(k, v) {(k), LOG_FIELD_STR, (v), 0},
#define LOG_I(k, v) {(k), LOG_FIELD_INT, NULL, (long long)(v)},

void log_setup(enum log_level level, enum log_format format);
/* log_setup from the configuration's words (log.level, log.format); a word it
 * does not know leaves info, or logfmt (the configuration has checked them). */
void log_configure(const char *level, const char *format);
int log_enabled(enum log_level level);
/* fields ends with an entry of kind LOG_FIELD_END; the macros below add it. */
void log_emit(enum log_level level, const char *msg, const struct log_field *fields);
/* Sets the request id added to this thread's lines; NULL clears it. Borrowed:
 * must stay valid until cleared. */
void log_set_request(const char *request_id);

#define LOG_FIELDS(...) ((const struct log_field[]){__VA_ARGS__{0, LOG_FIELD_END, 0, 0}})
#define log_debug(msg, ...) log_emit(LOG_DEBUG, (msg), LOG_FIELDS(__VA_ARGS__))
#define log_info(msg, ...) log_emit(LOG_INFO, (msg), LOG_FIELDS(__VA_ARGS__))
#define log_warn(msg, ...) log_emit(LOG_WARN, (msg), LOG_FIELDS(__VA_ARGS__))
#define log_error(msg, ...) log_emit(LOG_ERROR, (msg), LOG_FIELDS(__VA_ARGS__))

/* A warning per line of text (NULL: none). */
void log_warn_lines(const char *text);
/* The same for a command: each line of text (NULL: none) on stderr, after
 * "warning: ". */
void log_print_warnings(const char *text);

/* For lines that a lasting failure repeats (a full disk): 1 when at least
 * LOG_REPEAT_MS passed since *last_ms (the caller's own, 0 at first; its
 * owner's thread only), which it then updates; 0 to skip the line. */
#define LOG_REPEAT_MS 10000
int log_due(int64_t *last_ms);
/* The same for a line any thread may write: one of them is let through. */
int log_due_shared(_Atomic int64_t *last_ms);
/* The same, once per every_ms. */
int log_due_shared_every(_Atomic int64_t *last_ms, int64_t every_ms);

/* For a line every request repeats while a failure lasts (a full disk, rules
 * that do not build): at most one line per LOG_REPEAT_MS, from any thread,
 * which says how many times it happened meanwhile. Zero-initialised. */
struct log_repeat {
    _Atomic int64_t last_ms;
    _Atomic uint64_t times;
    _Atomic int64_t seen_ms; /* the last time it happened */
    /* for log_repeats_flush (log_repeat_due_line): the line, and the list of
     * the places that have one */
    _Atomic int listed;
    enum log_level level;
    const char *msg;
    struct log_repeat *next;
};
/* Counts one more time. 0: skip the line; else write it, with this many
 * times since the last line written (this one included). */
uint64_t log_repeat_due(struct log_repeat *r);
/* The same for a line log_repeats_flush can write: level and msg, a literal. */
uint64_t log_repeat_due_line(struct log_repeat *r, enum log_level level, const char *msg);
/* Writes, for each place of log_repeated whose times after its last line are
 * untold and that has not happened for LOG_REPEAT_MS (or, with all, at once:
 * at a stop), its line with `times` alone: the end of a burst would otherwise
 * wait for the next time, which may never come. While it goes on happening,
 * its own lines, with their fields, tell the times. The service calls it
 * about once a second. */
void log_repeats_flush(int all);
/* Such a line, at level, with its fields and `times`: one counter per place
 * the macro is written. */
#define log_repeated(level, msg, ...)                                                              \
    do {                                                                                           \
        static struct log_repeat log_repeat_here_;                                                 \
        uint64_t log_times_ = log_repeat_due_line(&log_repeat_here_, (level), (msg));              \
        if (log_times_)                                                                            \
            log_emit((level), (msg),                                                               \
                     LOG_FIELDS(__VA_ARGS__ LOG_I("times", (long long)log_times_)));               \
    } while (0)

/* For lines a flood could write one per event (a rule failing for every
 * event): a count of the lines of the current second, from any thread.
 * Zero-initialised. */
struct log_budget {
    _Atomic uint64_t state; /* the second << 24 | the lines counted in it */
};
/* How many lines this second came before this one: under the caller's limit,
 * write it; at the limit, say that the rest of the second's are left out. */
int log_budget_take(struct log_budget *b);
/* log_budget_take in the given second of the wall clock */
int log_budget_take_in(struct log_budget *b, uint64_t second);
/* The same for lines of `level`, at most limit a second: 1 to write this one;
 * the first past the limit writes `more` instead, a warning (with
 * limit_per_second) that says the rest of the second's are left out. 0, with
 * nothing counted, when the log leaves that level out: a line not written
 * takes none of the budget, nor says that others were left out. */
int log_budget_allows(struct log_budget *b, enum log_level level, int limit, const char *more);

int log_level_parse(const char *s, enum log_level *out);
int log_format_parse(const char *s, enum log_format *out);

#endif
