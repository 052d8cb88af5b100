#include "log.h"

#include "util.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static _Atomic int g_level = LOG_INFO;
static _Atomic int g_format = LOG_LOGFMT;
static _Thread_local const char *t_request;

/* Held across the writes of one line (see write_line). */
static pthread_mutex_t g_write_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const LEVEL_NAMES[] = {"debug", "info", "warn", "error"};
/* syslog's priorities of the levels: debug, info, warning, err */
static const char *const LEVEL_PRIORITIES[] = {"<7>", "<6>", "<4>", "<3>"};

/* Whether stderr is journald's stream (systemd names it in JOURNAL_STREAM,
 * "device:inode"): each line then starts with its syslog priority, which
 * journald takes off and keeps, so that `journalctl -p err` finds errors. */
static _Atomic int g_journal;

static int stderr_is_journal(void)
{
    const char *stream = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (!stream || sscanf(stream, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) != 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_setup(enum log_level level, enum log_format format)
{
    atomic_store(&g_level, (int)level);
    atomic_store(&g_format, (int)format);
    atomic_store(&g_journal, stderr_is_journal());
}

void log_configure(const char *level, const char *format)
{
    enum log_level l = LOG_INFO;
    enum log_format f = LOG_LOGFMT;
    (void)log_level_parse(level, &l);
    (void)log_format_parse(format, &f);
    log_setup(l, f);
}

int log_enabled(enum log_level level)
{
    return (int)level >= atomic_load(&g_level);
}

void log_set_request(const char *request_id)
{
    t_request = request_id;
}

int log_level_parse(const char *s, enum log_level *out)
{
    for (size_t i = 0; i < ARRAY_LEN(LEVEL_NAMES); i++) {
        if (strcmp(s, LEVEL_NAMES[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

int log_format_parse(const char *s, enum log_format *out)
{
    if (strcmp(s, "logfmt") == 0)
        *out = LOG_LOGFMT;
    else if (strcmp(s, "json") == 0)
        *out = LOG_JSON;
    else
        return -1;
    return 0;
}

/* The most bytes of one line, and of one string field in it (see log_emit):
 * a long value (an event id a client made up, a rule's message) is cut, so
 * that it costs the line none of its other fields. */
#define LOG_LINE_MAX (64 * 1024)
/* journald splits a longer line (LineMax=, 48K by default), and files the
 * rest without its priority */
#define JOURNAL_LINE_MAX (48 * 1024 - 1)
#define LOG_VALUE_MAX 8192
#define LOG_VALUE_SHORT 256

/* logfmt values are bare when they are simple words, quoted otherwise. */
static int logfmt_value(buf *b, const char *s)
{
    int plain = *s != '\0';
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f) {
            plain = 0;
            break;
        }
    }
    if (plain)
        return buf_adds(b, s);
    return buf_json_str(b, s, strlen(s));
}

/* A string value longer than the line's cap (see log_emit) is cut to its
 * first `cap` bytes, between two characters, and says how long it was. */
static int add_value(buf *b, int json, const char *s, size_t cap)
{
    size_t n = strlen(s);
    char *cut = NULL;
    if (n > cap) {
        /* the character across the cut is read whole, to find its end */
        size_t head = n < cap + 4 ? n : cap + 4;
        cut = malloc(head + 48);
        if (!cut)
            return -1;
        memcpy(cut, s, head);
        size_t keep = utf8_sanitize(cut, head, cap);
        snprintf(cut + keep, 48, "... (cut, %zu bytes)", n);
        s = cut;
    }
    int rc = json ? buf_json_str(b, s, strlen(s)) : logfmt_value(b, s);
    free(cut);
    return rc;
}

/* A field: the string s (cut to cap bytes), or the number i when s is NULL. */
static int add_field(buf *b, int json, const char *key, const char *s, long long i, size_t cap)
{
    int rc = 0;
    if (json) {
        rc |= buf_addc(b, ',');
        rc |= buf_json_str(b, key, strlen(key));
        rc |= buf_addc(b, ':');
    } else {
        rc |= buf_printf(b, " %s=", key);
    }
    if (s)
        rc |= add_value(b, json, s, cap);
    else
        rc |= buf_printf(b, "%lld", i);
    return rc;
}

/* One line into b, each string field cut to cap bytes; -1 when it does not fit
 * the line's cap. */
static int format_line(buf *b, int json, const char *ts, enum log_level level, const char *msg,
                       const struct log_field *fields, size_t cap)
{
    int rc = 0;
    if (json) {
        rc |= buf_printf(b, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":", ts, LEVEL_NAMES[level]);
        rc |= buf_json_str(b, msg, strlen(msg));
    } else {
        rc |= buf_printf(b, "ts=%s level=%s msg=", ts, LEVEL_NAMES[level]);
        rc |= buf_json_str(b, msg, strlen(msg));
    }
    if (t_request)
        rc |= add_field(b, json, "request_id", t_request, 0, cap);
    for (const struct log_field *f = fields; f && f->kind != LOG_FIELD_END; f++) {
        if (f->kind == LOG_FIELD_STR)
            rc |= add_field(b, json, f->key, f->s ? f->s : "", 0, cap);
        else
            rc |= add_field(b, json, f->key, NULL, f->i, cap);
    }
    if (json)
        rc |= buf_addc(b, '}');
    rc |= buf_addc(b, '\n');
    return rc ? -1 : 0;
}

/* Writes one line to stderr whole, the rest of it after a write cut short (a
 * pipe's reader behind, a signal). A pipe takes a write of up to PIPE_BUF
 * (4 KiB) in one piece only, a longer one in as many as its reader makes room
 * for: the lock keeps every other line, short ones too, from landing between
 * them. log_emit is never called from a signal handler, so a thread never
 * waits here for itself. */
static void write_line(const char *line, size_t len)
{
    pthread_mutex_lock(&g_write_lock);
    for (size_t off = 0; off < len;) {
        ssize_t wrote = write(STDERR_FILENO, line + off, len - off);
        if (wrote > 0)
            off += (size_t)wrote;
        else if (wrote == 0 || errno != EINTR)
            break;
    }
    pthread_mutex_unlock(&g_write_lock);
}

void log_emit(enum log_level level, const char *msg, const struct log_field *fields)
{
    if (!log_enabled(level))
        return;
    int json = atomic_load(&g_format) == LOG_JSON;

    char ts[40];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    size_t n = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof ts - n, ".%03ldZ", now.tv_nsec / 1000000);

    /* A line holds at most LOG_LINE_MAX bytes: each string field is cut to
     * LOG_VALUE_MAX bytes, and, should the line still not fit (many long
     * fields, or text escaped to several times its length), to
     * LOG_VALUE_SHORT; a line is never written in part. */
    int journal = atomic_load(&g_journal);
    const char *priority = journal ? LEVEL_PRIORITIES[level] : "";
    buf b;
    buf_init(&b, journal ? JOURNAL_LINE_MAX : LOG_LINE_MAX);
    int rc = buf_add(&b, priority, strlen(priority));
    rc |= format_line(&b, json, ts, level, msg, fields, LOG_VALUE_MAX);
    if (rc != 0) {
        buf_reset(&b);
        rc = buf_add(&b, priority, strlen(priority));
        rc |= format_line(&b, json, ts, level, msg, fields, LOG_VALUE_SHORT);
    }
    if (rc != 0) {
        char stack[1024];
        snprintf(stack, sizeof stack,
                 json ? "%s{\"ts\":\"%s\",\"level\":\"error\",\"msg\":\"log line too long\"}\n"
                      : "%sts=%s level=error msg=\"log line too long\"\n",
                 journal ? LEVEL_PRIORITIES[LOG_ERROR] : "", ts);
        buf_free(&b);
        write_line(stack, strlen(stack));
        return;
    }
    /* Lines from several threads never interleave: each is written whole
     * under one lock (see write_line). */
    write_line(b.data, b.len);
    buf_free(&b);
}

void log_print_warnings(const char *text)
{
    for (const char *w = text, *nl; w && *w; w = nl ? nl + 1 : NULL) {
        nl = strchr(w, '\n');
        fprintf(stderr, "warning: %.*s\n", nl ? (int)(nl - w) : (int)strlen(w), w);
    }
}

void log_warn_lines(const char *text)
{
    for (const char *w = text, *nl; w && *w; w = nl ? nl + 1 : NULL) {
        nl = strchr(w, '\n');
        char line[1024];
        snprintf(line, sizeof line, "%.*s", nl ? (int)(nl - w) : (int)strlen(w), w);
        log_warn(line);
    }
}

int log_due(int64_t *last_ms)
{
    int64_t now = clock_mono_ms();
    if (*last_ms && now - *last_ms < LOG_REPEAT_MS)
        return 0;
    *last_ms = now;
    return 1;
}

int log_due_shared(_Atomic int64_t *last_ms)
{
    return log_due_shared_every(last_ms, LOG_REPEAT_MS);
}

int log_due_shared_every(_Atomic int64_t *last_ms, int64_t every_ms)
{
    int64_t now = clock_mono_ms(), last = atomic_load(last_ms);
    if (last && now - last < every_ms)
        return 0;
    return atomic_compare_exchange_strong(last_ms, &last, now);
}

uint64_t log_repeat_due(struct log_repeat *r)
{
    atomic_store(&r->seen_ms, clock_mono_ms());
    atomic_fetch_add(&r->times, 1);
    if (!log_due_shared(&r->last_ms))
        return 0;
    /* one thread per period gets here, after its own count */
    return atomic_exchange(&r->times, 0);
}

/* The places of log_repeated that have had a line, for log_repeats_flush. */
static pthread_mutex_t g_repeats_lock = PTHREAD_MUTEX_INITIALIZER;
static struct log_repeat *g_repeats;

uint64_t log_repeat_due_line(struct log_repeat *r, enum log_level level, const char *msg)
{
    if (!atomic_load(&r->listed)) {
        pthread_mutex_lock(&g_repeats_lock);
        if (!atomic_load(&r->listed)) {
            r->level = level;
            r->msg = msg;
            r->next = g_repeats;
            g_repeats = r;
            atomic_store(&r->listed, 1);
        }
        pthread_mutex_unlock(&g_repeats_lock);
    }
    return log_repeat_due(r);
}

void log_repeats_flush(int all)
{
    int64_t now = clock_mono_ms();
    pthread_mutex_lock(&g_repeats_lock);
    for (struct log_repeat *r = g_repeats; r; r = r->next) {
        /* after a line of its own (whose fields say what happened), and
         * quiet since: a place still happening tells its times itself */
        if (atomic_load(&r->times) == 0 || atomic_load(&r->last_ms) == 0 ||
            !(all ||
              (now - atomic_load(&r->seen_ms) >= LOG_REPEAT_MS && log_due_shared(&r->last_ms))))
            continue;
        uint64_t times = atomic_exchange(&r->times, 0);
        if (times)
            log_emit(r->level, r->msg, LOG_FIELDS(LOG_I("times", (long long)times)));
    }
    pthread_mutex_unlock(&g_repeats_lock);
}

#define BUDGET_LINES_MASK 0xffffffu
int log_budget_take_in(struct log_budget *b, uint64_t now)
{
    uint64_t old = atomic_load(&b->state), next, lines;
    /* the second and its count change together; a thread whose clock read is
     * older than the second another one started counts in that one (by a
     * second, or more when it was held up since: the clock read again says
     * so); a clock set back starts a second of its own */
    int set_back = -1;
    do {
        uint64_t second = old >> 24;
        if (second > now + 1 && set_back < 0)
            set_back = (uint64_t)clock_wall_ms() / 1000 < second;
        if (second < now || (second > now + 1 && set_back == 1)) {
            lines = 0;
            next = now << 24 | 1;
        } else {
            lines = old & BUDGET_LINES_MASK;
            next = lines < BUDGET_LINES_MASK ? old + 1 : old;
        }
    } while (!atomic_compare_exchange_weak(&b->state, &old, next));
    return (int)lines;
}

int log_budget_take(struct log_budget *b)
{
    /* the second of the lines' own stamps, so that a reader counting the
     * lines of a second finds the limit there */
    return log_budget_take_in(b, (uint64_t)clock_wall_ms() / 1000);
}

int log_budget_allows(struct log_budget *b, enum log_level level, int limit, const char *more)
{
    if (!log_enabled(level))
        return 0;
    int line = log_budget_take(b);
    if (line == limit)
        log_warn(more, LOG_I("limit_per_second", limit));
    return line < limit;
}
