#include "log.h"

#include "util.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static _Atomic int g_level = LOG_INFO;
static _Atomic int g_format = LOG_LOGFMT;
static _Thread_local const char *t_request;

static const char *const LEVEL_NAMES[] = {"debug", "info", "warn", "error"};

void log_setup(enum log_level level, enum log_format format)
{
    atomic_store(&g_level, (int)level);
    atomic_store(&g_format, (int)format);
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

/* A field: the string s, or the number i when s is NULL. */
static int add_field(buf *b, int json, const char *key, const char *s, long long i)
{
    int rc = 0;
    if (json) {
        rc |= buf_addc(b, ',');
        rc |= buf_json_str(b, key, strlen(key));
        rc |= buf_addc(b, ':');
        if (s)
            rc |= buf_json_str(b, s, strlen(s));
        else
            rc |= buf_printf(b, "%lld", i);
    } else {
        rc |= buf_printf(b, " %s=", key);
        if (s)
            rc |= logfmt_value(b, s);
        else
            rc |= buf_printf(b, "%lld", i);
    }
    return rc;
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

    char stack[1024];
    buf b;
    buf_init(&b, 64 * 1024);
    int rc = 0;
    if (json) {
        rc |= buf_printf(&b, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":", ts, LEVEL_NAMES[level]);
        rc |= buf_json_str(&b, msg, strlen(msg));
    } else {
        rc |= buf_printf(&b, "ts=%s level=%s msg=", ts, LEVEL_NAMES[level]);
        rc |= buf_json_str(&b, msg, strlen(msg));
    }
    if (t_request)
        rc |= add_field(&b, json, "request_id", t_request, 0);
    for (const struct log_field *f = fields; f && f->kind != LOG_FIELD_END; f++) {
        if (f->kind == LOG_FIELD_STR)
            rc |= add_field(&b, json, f->key, f->s ? f->s : "", 0);
        else
            rc |= add_field(&b, json, f->key, NULL, f->i);
    }
    if (json)
        rc |= buf_addc(&b, '}');
    rc |= buf_addc(&b, '\n');
    if (rc != 0) {
        /* The line hit the cap: say so rather than write half a line. */
        snprintf(stack, sizeof stack, "ts=%s level=error msg=\"log line too long\"\n", ts);
        buf_free(&b);
        (void)!write(STDERR_FILENO, stack, strlen(stack));
        return;
    }
    /* One write per line, so lines from several threads never interleave; the
     * rest of one a signal cut short (a pipe's reader behind) follows it. */
    for (size_t off = 0; off < b.len;) {
        ssize_t wrote = write(STDERR_FILENO, b.data + off, b.len - off);
        if (wrote > 0)
            off += (size_t)wrote;
        else if (wrote == 0 || errno != EINTR)
            break;
    }
    buf_free(&b);
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
    int64_t now = clock_mono_ms(), last = atomic_load(last_ms);
    if (last && now - last < LOG_REPEAT_MS)
        return 0;
    return atomic_compare_exchange_strong(last_ms, &last, now);
}
