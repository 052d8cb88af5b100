/*
 * util: small building blocks shared by every module.
 *
 * - buf: a growable byte buffer with a hard cap, for everything that grows from
 *   input (request bodies, batch bodies, responses). Appending past the cap
 *   fails instead of growing without bound.
 * - arena: stable-address storage for the strings of one request; freed at once.
 * - JSON string escaping for the few places that write JSON by hand.
 * - clocks, strict number parsing, constant names.
 *
 * Uses only libc.
 */
#ifndef TRIBUTARY_UTIL_H
#define TRIBUTARY_UTIL_H

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define WUR __attribute__((warn_unused_result))
#define PRINTF(a, b) __attribute__((format(printf, a, b)))
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Size of the caller-owned error buffers passed through the code base. */
#define ERR_LEN 512

/* A borrowed byte string: not NUL-terminated unless said so. */
typedef struct str {
    const char *p;
    size_t n;
} str;

#define STR_NULL ((str){NULL, 0})

/* A C string as a str; NULL and "" as STR_NULL (an optional text left out). */
static inline str str_opt(const char *s)
{
    return s && *s ? (str){s, strlen(s)} : STR_NULL;
}

/* ---- buf ---------------------------------------------------------------- */

typedef struct buf {
    char *data; /* NUL-terminated after every successful append */
    size_t len;
    size_t cap;
    size_t max; /* hard cap on len */
} buf;

void buf_init(buf *b, size_t max);
void buf_free(buf *b);
void buf_reset(buf *b);
/* The slow path of buf_reserve: a larger block. */
int buf_grow(buf *b, size_t extra) WUR;

/* Makes room for extra more bytes at once: -1 past the cap or out of memory.
 * Inline, with the appends below: JSON is written a few bytes at a time, and
 * the common case is a comparison and a copy. */
WUR static inline int buf_reserve(buf *b, size_t extra)
{
    if (extra <= b->max && b->len <= b->max - extra && b->len + extra < b->cap)
        return 0;
    return buf_grow(b, extra);
}

/* Each append returns 0, or -1 (nothing appended) when the cap or memory runs out. */
WUR static inline int buf_add(buf *b, const void *p, size_t n)
{
    if (buf_reserve(b, n) != 0)
        return -1;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

WUR static inline int buf_addc(buf *b, char c)
{
    if (buf_reserve(b, 1) != 0)
        return -1;
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
    return 0;
}

int buf_adds(buf *b, const char *s) WUR;
int buf_printf(buf *b, const char *fmt, ...) PRINTF(2, 3) WUR;
int buf_vprintf(buf *b, const char *fmt, va_list ap) WUR;
/* Appends s as a quoted, escaped JSON string. A byte that does not begin a
 * well-formed UTF-8 sequence is written as U+FFFD; control characters, C0 and
 * C1, are escaped (\u00XX). */
int buf_json_str(buf *b, const char *s, size_t n) WUR;
/* Appends the JSON text s[0..n), which a lenient reader took (lua-cjson
 * takes control characters and bytes that are not UTF-8 inside strings as
 * they are), as JSON any reader takes and a terminal can show: in strings,
 * control characters (C0 and C1) escaped (\u00XX) and each byte that begins
 * no UTF-8 sequence as U+FFFD. */
int buf_json_strict(buf *b, const char *s, size_t n) WUR;
/* The characters buf_json_str writes for s[0..n), in UTF-16 code units, as
 * mParticle's limits are read: one per well-formed UTF-8 sequence (two for one
 * of four bytes, beyond U+FFFF), and one (U+FFFD) per byte that begins none. */
size_t json_str_chars(const char *s, size_t n);
/* The bytes of s[0..n) that hold its first max characters, counted as
 * json_str_chars counts them (a character of two units that would pass max is
 * left out): n when it has no more. */
size_t json_str_prefix(const char *s, size_t n, size_t max);
/* What buf_json_str appends for s[0..n), quotes included. */
size_t json_str_len(const char *s, size_t n);
/* Walking JSON text without a parser (slicing a body, reading a field of a
 * written event): each takes p within [p, end) and returns where the thing
 * at p ends, or NULL when the text is cut off first.
 * json_skip_ws: past blanks (never NULL). json_skip_string: p at a string's
 * opening quote, past its closing one (a quote ends it unless an odd number of
 * backslashes precedes it). json_skip_value: past the value at p, a string,
 * an object or array whole, or a scalar's text. */
static inline const char *json_skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* Inline, as most of a text is strings: memchr finds each quote. */
static inline const char *json_skip_string(const char *p, const char *end)
{
    const char *open = p;
    for (p++; p < end; p++) {
        p = memchr(p, '"', (size_t)(end - p));
        if (!p)
            return NULL;
        size_t slashes = 0;
        for (const char *b = p - 1; b > open && *b == '\\'; b--)
            slashes++;
        if (slashes % 2 == 0)
            return p + 1;
    }
    return NULL;
}

const char *json_skip_value(const char *p, const char *end);
/* A byte takes at most this many in JSON text (\u00XX). */
#define JSON_MAX_BYTES_PER_BYTE 6
/* Makes s[0..n) valid UTF-8 in place: each byte that does not begin a
 * well-formed sequence (RFC 3629) becomes '?'. Returns the length of the
 * longest prefix of at most max bytes that ends between two characters. */
size_t utf8_sanitize(char *s, size_t n, size_t max);
/* Whether s[0..n) begins with a C1 control character (U+0080 - U+009F, two
 * bytes): JSON may hold it as it is, but a terminal showing the text acts on
 * it (U+009B begins a control sequence). */
int utf8_is_c1(const char *s, size_t n);
/* The code point of the bidirectional formatting character s[0..n) begins
 * with (U+061C, U+200E, U+200F, U+202A - U+202E, U+2066 - U+2069), or 0: a
 * terminal showing text with one reorders what follows it, so that an id can
 * show as another. */
unsigned utf8_bidi_control(const char *s, size_t n);
/* The length of the well-formed UTF-8 sequence (RFC 3629) at p, n > 0 bytes
 * left, or 0 when the byte at p begins none. */
size_t utf8_sequence(const unsigned char *p, size_t n);
/* Whether s[0..n) is well-formed UTF-8 (RFC 3629), as Lua's utf8.len takes it. */
int utf8_valid(const char *s, size_t n);
/* The length of the UTF-8 byte-order mark s[0..n) starts with (3), or 0: some
 * editors and writers put one before text that is otherwise plain. */
size_t utf8_bom_len(const char *s, size_t n);
/* Appends v in decimal. */
int buf_int(buf *b, long long v) WUR;
/* Detaches the data: the caller frees it with free(); b is left empty. */
char *buf_take(buf *b);
/* Reads the rest of f into a new NUL-terminated string of at most max bytes, its length in *len.
 * Returns NULL with errno EFBIG (longer than max), EIO (read error) or ENOMEM. */
char *read_stream(FILE *f, size_t max, size_t *len);
/* The same for the file at path, read unbuffered (no copy of what it holds, a
 * key say, stays behind in stdio's buffer). NULL with errno set, and *opened
 * 0 when the file could not be opened, 1 when it could but not be read whole. */
char *read_path(const char *path, size_t max, size_t *len, int *opened);
/* read_path of name in the directory open as dirfd (AT_FDCWD: the working
 * directory), so that every file read through one dirfd comes from the same
 * directory even when a link to it is switched meanwhile. */
char *read_at(int dirfd, const char *name, size_t max, size_t *len, int *opened);

/* ---- arena -------------------------------------------------------------- */

typedef struct arena {
    struct arena_chunk *head;
} arena;

void arena_init(arena *a);
void arena_free(arena *a);
/* Returns memory that stays valid until arena_free, or NULL when out of memory. */
void *arena_alloc(arena *a, size_t n);
/* Copies n bytes and a NUL terminator. */
const char *arena_strndup(arena *a, const char *s, size_t n);

/* ---- clocks and parsing ------------------------------------------------- */

int64_t clock_wall_ms(void);   /* milliseconds since the UNIX epoch */
int64_t clock_mono_ms(void);   /* monotonic milliseconds, for timeouts */
int64_t clock_mono_ns(void);   /* monotonic nanoseconds, to time or order short steps */
int64_t clock_thread_ns(void); /* CPU time of the calling thread (a system call: ~0.5 us) */
void clock_sleep_ms(int64_t ms);
/* A condition variable whose timed waits run on the monotonic clock: a wall
 * clock stepped back does not stretch them (a wait on CLOCK_REALTIME for 1 s
 * lasts as long as the step). cond_wait_ms waits at most ms for c, mu held. */
void cond_init_monotonic(pthread_cond_t *c);
void cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *mu, int64_t ms);

/* Parses a whole decimal integer within [min, max], its digits alone (after a
 * '-' at most: no blanks, no '+'); 0 or -1. */
int parse_int64(const char *s, int64_t min, int64_t max, int64_t *out) WUR;
/* Parses a duration such as "90s", "15m", "12h", "7d" or "2w": the unit is
 * required (a bare number is too easily meant as days). */
int parse_duration_s(const char *s, int64_t *out) WUR;
/* The value of a hexadecimal digit, either case; -1 for any other character. */
int hex_digit(char c);

/* s without the spaces and tabs around it (a header's value): its start, its
 * length in *n. */
const char *str_trim_blanks(const char *s, size_t *n);
/* The Levenshtein distance between a[0..n) and b, for names of up to 63 bytes
 * (longer ones are far from every name: SIZE_MAX). */
size_t edit_distance(const char *a, size_t n, const char *b);
/* Of names[0..count), the one nearest to name[0..n) within `within` edits (the
 * first of those as near), or NULL: for "did you mean" in errors. */
const char *nearest_name(const char *name, size_t n, const char *const *names, size_t count,
                         size_t within);
/* Copies a string into a fixed buffer, always terminating it (truncates). */
void str_copy(char *dst, size_t dstlen, const char *src);
/* snprintf into a fixed buffer; never fails, truncates. */
void str_printf(char *dst, size_t dstlen, const char *fmt, ...) PRINTF(3, 4);
int str_eq(str a, const char *b);

#endif
