#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- buf ---------------------------------------------------------------- */

void buf_init(buf *b, size_t max)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max;
}

void buf_free(buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void buf_reset(buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

int buf_grow(buf *b, size_t extra)
{
    if (extra > b->max || b->len > b->max - extra)
        return -1;
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    /* the first block fits the first request exactly when that is large (a
     * reservation for the whole), then doubles */
    size_t cap = b->cap ? b->cap : need > 256 ? need : 256;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

int buf_adds(buf *b, const char *s)
{
    return buf_add(b, s, strlen(s));
}

int buf_vprintf(buf *b, const char *fmt, va_list ap)
{
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (n < 0 || buf_reserve(b, (size_t)n) != 0)
        return -1;
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int buf_printf(buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = buf_vprintf(b, fmt, ap);
    va_end(ap);
    return rc;
}

/* Bytes JSON text cannot hold as they are: 0 for those that pass, else the
 * letter of their short escape, or 'u' for \u00XX. */
static const char JSON_ESCAPE[256] = {
    ['\0'] = 'u', [1] = 'u',    [2] = 'u',    [3] = 'u',     [4] = 'u',    [5] = 'u',
    [6] = 'u',    [7] = 'u',    ['\b'] = 'b', ['\t'] = 't',  ['\n'] = 'n', [11] = 'u',
    ['\f'] = 'f', ['\r'] = 'r', [14] = 'u',   [15] = 'u',    [16] = 'u',   [17] = 'u',
    [18] = 'u',   [19] = 'u',   [20] = 'u',   [21] = 'u',    [22] = 'u',   [23] = 'u',
    [24] = 'u',   [25] = 'u',   [26] = 'u',   [27] = 'u',    [28] = 'u',   [29] = 'u',
    [30] = 'u',   [31] = 'u',   ['"'] = '"',  ['\\'] = '\\', [127] = 'u',
};

/* The bytes of w that need a look, as the high bit of each: a control byte
 * (under 0x20), '"', '\\', DEL, or a byte of 0x80 and up (UTF-8, checked for
 * well-formed sequences). The classic zero-byte test, (x - 0x01..) & ~x &
 * 0x80.., marks the first such byte exactly; a borrow can mark bytes after it
 * too, never before. */
static uint64_t bytes_to_look_at(uint64_t w)
{
    const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
    uint64_t quote = w ^ (ones * '"'), backslash = w ^ (ones * '\\'), del = w ^ (ones * 0x7f);
    uint64_t found = ((w - ones * 0x20) & ~w) | ((quote - ones) & ~quote) |
                     ((backslash - ones) & ~backslash) | ((del - ones) & ~del) | w;
    return found & highs;
}

/* The position in its word of the first byte marked in mask (not 0). */
static size_t first_marked(uint64_t mask)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (size_t)__builtin_ctzll(mask) / 8;
#else
    return (size_t)__builtin_clzll(mask) / 8;
#endif
}

size_t utf8_sequence(const unsigned char *p, size_t n)
{
    unsigned c = p[0], lo = 0x80, hi = 0xBF;
    size_t len;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        lo = c == 0xE0 ? 0xA0 : lo; /* no overlong forms */
        hi = c == 0xED ? 0x9F : hi; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        lo = c == 0xF0 ? 0x90 : lo;
        hi = c == 0xF4 ? 0x8F : hi; /* nothing past U+10FFFF */
    } else {
        return 0;
    }
    if (n < len || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
    }
    return len;
}

/* U+FFFD, written for a byte that begins no UTF-8 sequence. */
static const char REPLACEMENT[] = "\xEF\xBF\xBD";

/* Appends s[*run..i) as it is, then `with` in place of the byte at i; the
 * bytes that pass as they are start again after it. */
static int replace_byte(buf *b, const char *s, size_t *run, size_t i, const char *with, size_t len)
{
    if (buf_add(b, s + *run, i - *run) != 0 || buf_add(b, with, len) != 0)
        return -1;
    *run = i + 1;
    return 0;
}

/* replace_byte with the JSON escape of the byte at i: \e, or \u00XX for 'u'. */
static int escape_byte(buf *b, const char *s, size_t *run, size_t i, char e)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char c = (unsigned char)s[i];
    char u[6] = {'\\', e, '0', '0', hex[c >> 4], hex[c & 15]};
    return replace_byte(b, s, run, i, u, e == 'u' ? 6 : 2);
}

int utf8_is_c1(const char *s, size_t n)
{
    return n >= 2 && (unsigned char)s[0] == 0xc2 && (unsigned char)s[1] >= 0x80 &&
           (unsigned char)s[1] <= 0x9f;
}

unsigned utf8_bidi_control(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    if (n >= 2 && p[0] == 0xd8 && p[1] == 0x9c)
        return 0x061c;
    if (n < 3 || p[0] != 0xe2)
        return 0;
    unsigned cp = 0x2000u | ((p[1] & 0x3fu) << 6) | (p[2] & 0x3fu);
    if ((p[1] == 0x80 || p[1] == 0x81) && (p[2] & 0xc0) == 0x80 &&
        (cp == 0x200e || cp == 0x200f || (cp >= 0x202a && cp <= 0x202e) ||
         (cp >= 0x2066 && cp <= 0x2069)))
        return cp;
    return 0;
}

/* Appends s[*run..i), then \u00XX for the C1 character at i: the escape of
 * its second byte, its code point, in place of both. */
static int escape_c1(buf *b, const char *s, size_t *run, size_t i)
{
    if (buf_add(b, s + *run, i - *run) != 0)
        return -1;
    *run = i + 1;
    return escape_byte(b, s, run, i + 1, 'u');
}

/* JSON text is UTF-8 (RFC 8259): a byte that does not start a well-formed
 * sequence is written as U+FFFD, so that no reader refuses the whole text; a C1
 * control character is escaped, as C0 ones are. */
int buf_json_str(buf *b, const char *s, size_t n)
{
    /* room for the common case, no escapes, at once */
    if (n > SIZE_MAX - 2 || buf_reserve(b, n + 2) != 0)
        return -1;
    b->data[b->len++] = '"';
    size_t i = 0, run = 0; /* run: start of the pending bytes that pass as they are */
    for (;;) {
        /* most text is ASCII without a byte to escape: pass it 8 bytes at a time */
        uint64_t marked = 0;
        while (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if ((marked = bytes_to_look_at(w)) != 0)
                break;
            i += 8;
        }
        if (marked)
            i += first_marked(marked);
        else if (i == n)
            break;
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            /* text in another script: one sequence after the other */
            do {
                size_t len = utf8_sequence((const unsigned char *)s + i, n - i);
                if (len == 2 && utf8_is_c1(s + i, len)) {
                    if (escape_c1(b, s, &run, i) != 0)
                        return -1;
                    i += len;
                    continue;
                }
                if (len > 0) {
                    i += len;
                    continue;
                }
                if (replace_byte(b, s, &run, i++, REPLACEMENT, 3) != 0)
                    return -1;
            } while (i < n && (unsigned char)s[i] >= 0x80);
            continue;
        }
        char e = JSON_ESCAPE[c];
        if (e && escape_byte(b, s, &run, i, e) != 0)
            return -1;
        i++;
    }
    if (buf_add(b, s + run, n - run) != 0)
        return -1;
    return buf_addc(b, '"');
}

int buf_json_strict(buf *b, const char *s, size_t n)
{
    int in_string = 0;
    size_t run = 0; /* start of the bytes that pass as they are */
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (!in_string) {
            in_string = c == '"';
            i++;
        } else if (c == '\\') {
            i += i + 1 < n ? 2 : 1; /* an escape: its byte is not the string's end */
        } else if (c == '"') {
            in_string = 0;
            i++;
        } else if (c < 0x20) {
            if (escape_byte(b, s, &run, i++, 'u') != 0)
                return -1;
        } else if (c >= 0x80) {
            size_t len = utf8_sequence((const unsigned char *)s + i, n - i);
            if (len == 0 && replace_byte(b, s, &run, i, REPLACEMENT, 3) != 0)
                return -1;
            if (len == 2 && utf8_is_c1(s + i, len) && escape_c1(b, s, &run, i) != 0)
                return -1;
            unsigned bidi = len >= 2 ? utf8_bidi_control(s + i, len) : 0;
            if (bidi) {
                /* the same text, escaped: a terminal shows it in order */
                char u[12];
                snprintf(u, sizeof u, "\\u%04x", bidi);
                if (buf_add(b, s + run, i - run) != 0 || buf_add(b, u, 6) != 0)
                    return -1;
                run = i + len;
            }
            i += len ? len : 1;
        } else {
            i++;
        }
    }
    return buf_add(b, s + run, n - run);
}

/* Walks the first max characters of s[0..n) as buf_json_str writes them,
 * counted in UTF-16 code units, as Java and JavaScript count a string's
 * length: a character beyond U+FFFF (most emoji) counts two. mParticle's
 * limits say "characters" without saying which: this is the stricter reading.
 * Returns the bytes they take, and their count in *chars. */
static size_t json_str_walk(const char *s, size_t n, size_t max, size_t *chars)
{
    size_t i = 0, c = 0;
    while (i < n) {
        size_t seq = utf8_sequence((const unsigned char *)s + i, n - i);
        size_t units = seq == 4 ? 2 : 1;
        if (c + units > max)
            break;
        c += units;
        i += seq ? seq : 1; /* U+FFFD for the byte */
    }
    *chars = c;
    return i;
}

size_t json_str_chars(const char *s, size_t n)
{
    size_t chars;
    json_str_walk(s, n, SIZE_MAX, &chars);
    return chars;
}

size_t json_str_prefix(const char *s, size_t n, size_t max)
{
    size_t chars;
    return json_str_walk(s, n, max, &chars);
}

const char *json_skip_value(const char *p, const char *end)
{
    if (p >= end)
        return NULL;
    if (*p == '"')
        return json_skip_string(p, end);
    if (*p != '{' && *p != '[') {
        while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' &&
               *p != '\t' && *p != '\r')
            p++;
        return p;
    }
    int depth = 0;
    while (p < end) {
        if (*p == '"') {
            p = json_skip_string(p, end);
            if (!p)
                return NULL;
            continue;
        }
        if (*p == '{' || *p == '[')
            depth++;
        else if ((*p == '}' || *p == ']') && --depth == 0)
            return p + 1;
        p++;
    }
    return NULL;
}

size_t json_str_len(const char *s, size_t n)
{
    size_t len = 2;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            size_t seq = utf8_sequence((const unsigned char *)s + i, n - i);
            len += !seq                                 ? 3 /* U+FFFD */
                   : seq == 2 && utf8_is_c1(s + i, seq) ? 6 /* \u00XX */
                                                        : seq;
            i += seq ? seq : 1;
            continue;
        }
        char e = JSON_ESCAPE[c];
        len += e == 0 ? 1 : e == 'u' ? 6 : 2;
        i++;
    }
    return len;
}

size_t utf8_sanitize(char *s, size_t n, size_t max)
{
    size_t i = 0, keep = 0;
    while (i < n) {
        size_t len = utf8_sequence((const unsigned char *)s + i, n - i);
        if (len == 0) {
            s[i] = '?';
            len = 1;
        }
        i += len;
        if (i <= max)
            keep = i;
    }
    return keep;
}

size_t utf8_bom_len(const char *s, size_t n)
{
    return n >= 3 && memcmp(s, "\xEF\xBB\xBF", 3) == 0 ? 3 : 0;
}

int utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        /* most text is ASCII: 8 bytes at a time while none has its high bit */
        uint64_t w;
        if (n - i >= 8 && (memcpy(&w, s + i, 8), (w & UINT64_C(0x8080808080808080)) == 0)) {
            i += 8;
        } else if ((unsigned char)s[i] < 0x80) {
            i++;
        } else {
            size_t len = utf8_sequence((const unsigned char *)s + i, n - i);
            if (len == 0)
                return 0;
            i += len;
        }
    }
    return 1;
}

int buf_int(buf *b, long long v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--i] = '-';
    return buf_add(b, tmp + i, sizeof tmp - i);
}

char *buf_take(buf *b)
{
    char *p = b->data;
    if (!p)
        p = calloc(1, 1);
    b->data = NULL;
    b->len = b->cap = 0;
    return p;
}

/* What read_stream read and will not return: wiped, as it may be a key. */
static void read_stream_drop(buf *b, char *chunk, size_t n)
{
    explicit_bzero(chunk, n);
    if (b->data)
        explicit_bzero(b->data, b->len);
    buf_free(b);
}

char *read_stream(FILE *f, size_t max, size_t *len)
{
    buf b;
    buf_init(&b, max);
    char chunk[16384];
    size_t n;
    errno = 0;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (buf_add(&b, chunk, n) != 0) {
            int too_big = b.len + n > max;
            read_stream_drop(&b, chunk, sizeof chunk);
            errno = too_big ? EFBIG : ENOMEM;
            return NULL;
        }
    }
    if (ferror(f)) {
        int failure = errno; /* such as EISDIR: a directory opens, and fails its read */
        read_stream_drop(&b, chunk, sizeof chunk);
        errno = failure ? failure : EIO;
        return NULL;
    }
    explicit_bzero(chunk, sizeof chunk); /* it may have held a key */
    *len = b.len;
    char *p = buf_take(&b);
    if (!p)
        errno = ENOMEM;
    return p;
}

char *read_path(const char *path, size_t max, size_t *len, int *opened)
{
    return read_at(AT_FDCWD, path, max, len, opened);
}

char *read_at(int dirfd, const char *name, size_t max, size_t *len, int *opened)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    FILE *f = fd >= 0 ? fdopen(fd, "rb") : NULL;
    *opened = f != NULL;
    if (!f) {
        int failure = errno;
        if (fd >= 0)
            close(fd);
        errno = failure;
        return NULL;
    }
    setvbuf(f, NULL, _IONBF, 0);
    char *p = read_stream(f, max, len);
    int failure = errno;
    fclose(f);
    errno = failure;
    return p;
}

/* ---- arena -------------------------------------------------------------- */

struct arena_chunk {
    struct arena_chunk *next;
    size_t used;
    size_t size;
    _Alignas(16) char mem[];
};

#define ARENA_CHUNK (64 * 1024)

void arena_init(arena *a)
{
    a->head = NULL;
}

void arena_free(arena *a)
{
    struct arena_chunk *c = a->head;
    while (c) {
        struct arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
}

void *arena_alloc(arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    struct arena_chunk *c = a->head;
    if (!c || c->size - c->used < n) {
        size_t size = n > ARENA_CHUNK / 4 ? n : ARENA_CHUNK;
        c = malloc(sizeof(*c) + size);
        if (!c)
            return NULL;
        c->size = size;
        c->used = 0;
        if (size == n && a->head) {
            /* A large allocation gets its own chunk behind the current one, so the
             * remaining space of the current chunk stays usable. */
            c->next = a->head->next;
            a->head->next = c;
        } else {
            c->next = a->head;
            a->head = c;
        }
    }
    void *p = c->mem + c->used;
    c->used += n;
    return p;
}

const char *arena_strndup(arena *a, const char *s, size_t n)
{
    char *p = arena_alloc(a, n + 1);
    if (!p)
        return NULL;
    if (n)
        memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* ---- clocks and parsing ------------------------------------------------- */

int64_t clock_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t clock_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t clock_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t clock_thread_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void cond_init_monotonic(pthread_cond_t *c)
{
    pthread_condattr_t monotonic;
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
    pthread_cond_init(c, &monotonic);
    pthread_condattr_destroy(&monotonic);
}

void cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *mu, int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(c, mu, &ts);
}

void clock_sleep_ms(int64_t ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int parse_int64(const char *s, int64_t min, int64_t max, int64_t *out)
{
    /* digits alone, after a '-' at most: strtoll would take blanks before
     * them and a '+' too ("127.0.0.1: +80") */
    size_t sign = s && *s == '-';
    if (!s || !s[sign] || strspn(s + sign, "0123456789") != strlen(s + sign))
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || end == s || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int parse_duration_s(const char *s, int64_t *out)
{
    if (!s || !*s)
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || v < 0)
        return -1;
    int64_t unit = 1;
    if (*end == 's')
        unit = 1;
    else if (*end == 'm')
        unit = 60;
    else if (*end == 'h')
        unit = 3600;
    else if (*end == 'd')
        unit = 86400;
    else if (*end == 'w')
        unit = 7 * 86400;
    else
        return -1;
    if (end[1] != '\0')
        return -1;
    if (v > INT64_MAX / unit)
        return -1;
    *out = v * unit;
    return 0;
}

const char *str_trim_blanks(const char *s, size_t *n)
{
    s += strspn(s, " \t");
    size_t k = strlen(s);
    while (k && (s[k - 1] == ' ' || s[k - 1] == '\t'))
        k--;
    *n = k;
    return s;
}

void str_copy(char *dst, size_t dstlen, const char *src)
{
    if (!dstlen)
        return;
    size_t n = strlen(src);
    if (n >= dstlen)
        n = dstlen - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void str_printf(char *dst, size_t dstlen, const char *fmt, ...)
{
    if (!dstlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, dstlen, fmt, ap);
    va_end(ap);
}

int str_eq(str a, const char *b)
{
    size_t n = strlen(b);
    return a.n == n && (n == 0 || memcmp(a.p, b, n) == 0);
}

size_t edit_distance(const char *a, size_t n, const char *b)
{
    size_t m = strlen(b);
    if (n > 63 || m > 63)
        return n == m && memcmp(a, b, n) == 0 ? 0 : SIZE_MAX;
    size_t row[64];
    for (size_t j = 0; j <= m; j++)
        row[j] = j;
    for (size_t i = 1; i <= n; i++) {
        size_t diagonal = row[0];
        row[0] = i;
        for (size_t j = 1; j <= m; j++) {
            size_t above = row[j];
            size_t best = diagonal + (a[i - 1] != b[j - 1]);
            if (above + 1 < best)
                best = above + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diagonal = above;
        }
    }
    return row[m];
}

const char *nearest_name(const char *name, size_t n, const char *const *names, size_t count,
                         size_t within)
{
    const char *best = NULL;
    size_t best_d = within + 1;
    for (size_t i = 0; i < count; i++) {
        size_t d = edit_distance(name, n, names[i]);
        if (d < best_d) {
            best_d = d;
            best = names[i];
        }
    }
    return best;
}
