#include "mparticle.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* An event id as hashed for a source_request_id: a newline and a backslash
 * escaped, so that the newline after each id ends it and no other list of
 * ids hashes the same text. Any id without them (Braze's UUIDs) is itself. */
static void add_id(uuid5 *u, str id)
{
    size_t from = 0;
    for (size_t i = 0; i < id.n; i++) {
        if (id.p[i] == '\n' || id.p[i] == '\\') {
            uuid5_add(u, id.p + from, i - from);
            uuid5_add(u, id.p[i] == '\n' ? "\\n" : "\\\\", 2);
            from = i + 1;
        }
    }
    uuid5_add(u, id.p + from, id.n - from);
}

int mparticle_source_request_id(const struct batch_part *parts, size_t n, char out[UUID_STR_LEN])
{
    uuid5 *u = uuid5_new();
    if (!u)
        return -1;
    for (size_t i = 0; i < n; i++) {
        add_id(u, parts[i].event_id);
        uuid5_add(u, "\n", 1);
    }
    return uuid5_finish(u, out);
}

/* One merged batch-level value. */
struct entry {
    str section; /* JSON string, quotes included */
    str key;     /* JSON string, or empty for a top-level scalar */
    str value;   /* JSON */
};

struct entries {
    struct entry *e;
    size_t n, cap;
};

static int str_same(str a, str b)
{
    return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0);
}

static int entries_put(struct entries *es, str section, str key, str value)
{
    for (size_t i = 0; i < es->n; i++) {
        if (str_same(es->e[i].section, section) && str_same(es->e[i].key, key)) {
            es->e[i].value = value;
            return 0;
        }
    }
    if (es->n == es->cap) {
        size_t cap = es->cap ? es->cap * 2 : 32;
        struct entry *e = realloc(es->e, cap * sizeof(*e));
        if (!e)
            return -1;
        es->e = e;
        es->cap = cap;
    }
    es->e[es->n++] = (struct entry){section, key, value};
    return 0;
}

/* Reads the line at *p of lines ending at end, "section\tkey\tvalue\n", and
 * moves *p past it. Returns 0 when the line has no two tabs (skipped). */
static int next_line(const char **p, const char *end, struct entry *e)
{
    const char *nl = memchr(*p, '\n', (size_t)(end - *p));
    const char *le = nl ? nl : end;
    const char *t1 = memchr(*p, '\t', (size_t)(le - *p));
    const char *t2 = t1 ? memchr(t1 + 1, '\t', (size_t)(le - t1 - 1)) : NULL;
    if (t1 && t2) {
        e->section = (str){*p, (size_t)(t1 - *p)};
        e->key = (str){t1 + 1, (size_t)(t2 - t1 - 1)};
        e->value = (str){t2 + 1, (size_t)(le - t2 - 1)};
    }
    *p = le + 1;
    return t1 && t2;
}

/* Splits "section\tkey\tvalue\n" lines into entries. */
static int parse_lines(struct entries *es, str lines)
{
    struct entry e;
    for (const char *p = lines.p, *end = lines.p + lines.n; p < end;) {
        if (next_line(&p, end, &e) && entries_put(es, e.section, e.key, e.value) != 0)
            return -1;
    }
    return 0;
}

int mparticle_attr_names_add(struct mparticle_attr_names *set, str lines)
{
    static const str SECTION = {"\"user_attributes\"", 17};
    if (!lines.n || !memmem(lines.p, lines.n, SECTION.p, SECTION.n))
        return 0; /* most records have none */
    size_t before = set->n;
    struct entry e;
    for (const char *p = lines.p, *end = lines.p + lines.n; p < end;) {
        if (!next_line(&p, end, &e) || e.key.n == 0 || !str_same(e.section, SECTION))
            continue;
        size_t i = 0;
        while (i < set->n && !str_same(set->names[i], e.key))
            i++;
        if (i < set->n)
            continue;
        if (set->n == MPARTICLE_MAX_USER_ATTRIBUTES) {
            set->n = before;
            return -1;
        }
        set->names[set->n++] = e.key;
    }
    return 0;
}

size_t mparticle_batch_size_bound(const struct batch_part *parts, size_t n)
{
    size_t total = 160; /* envelope, environment, schema_version, source_request_id */
    for (size_t i = 0; i < n; i++) {
        total += parts[i].batch.n + parts[i].event.n + 8;
        /* a line "s"\t"k"\tv\n renders at most 2 bytes longer: ,"s":{"k":v} */
        for (const char *p = parts[i].batch.p, *end = p + parts[i].batch.n;
             p && (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++)
            total += 2;
    }
    return total;
}

int mparticle_build_batch(buf *out, const char *environment, const char *srid,
                          const struct batch_part *parts, size_t n)
{
    struct entries es = {0};
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        if (parse_lines(&es, parts[i].batch) != 0)
            goto done;
    }
    static const str ENV = {"\"environment\"", 13};
    int has_env = 0;
    for (size_t i = 0; i < es.n; i++)
        has_env |= str_same(es.e[i].section, ENV) && es.e[i].key.n == 0;

    rc = buf_addc(out, '{');
    if (!has_env) {
        rc |= buf_adds(out, "\"environment\":");
        rc |= buf_json_str(out, environment, strlen(environment));
        rc |= buf_addc(out, ',');
    }
    rc |= buf_adds(out, "\"schema_version\":2,\"source_request_id\":");
    rc |= buf_json_str(out, srid, strlen(srid));
    /* sections in order of first appearance */
    for (size_t i = 0; i < es.n; i++) {
        int first = 1;
        for (size_t j = 0; j < i && first; j++)
            first = !str_same(es.e[j].section, es.e[i].section);
        if (!first)
            continue;
        int keyed = 0;
        const struct entry *scalar = NULL;
        for (size_t j = i; j < es.n; j++) {
            if (!str_same(es.e[j].section, es.e[i].section))
                continue;
            if (es.e[j].key.n)
                keyed = 1;
            else
                scalar = &es.e[j];
        }
        rc |= buf_addc(out, ',');
        rc |= buf_add(out, es.e[i].section.p, es.e[i].section.n);
        rc |= buf_addc(out, ':');
        if (!keyed && scalar) {
            rc |= buf_add(out, scalar->value.p, scalar->value.n);
            continue;
        }
        rc |= buf_addc(out, '{');
        int sep = 0;
        for (size_t j = i; j < es.n; j++) {
            if (!str_same(es.e[j].section, es.e[i].section) || !es.e[j].key.n)
                continue;
            if (sep)
                rc |= buf_addc(out, ',');
            sep = 1;
            rc |= buf_add(out, es.e[j].key.p, es.e[j].key.n);
            rc |= buf_addc(out, ':');
            rc |= buf_add(out, es.e[j].value.p, es.e[j].value.n);
        }
        rc |= buf_addc(out, '}');
    }
    rc |= buf_adds(out, ",\"events\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            rc |= buf_addc(out, ',');
        rc |= buf_add(out, parts[i].event.p, parts[i].event.n);
    }
    rc |= buf_adds(out, "]}");
    rc = rc ? -1 : 0;
done:
    free(es.e);
    return rc;
}

/* Only the answers the API documents mean what they say. A 200 from a proxy
 * or from a wrong URL is no delivery, and a 404, 405 or 410 says nothing about
 * the batch: taking them for a delivery or a rejection would lose or
 * dead-letter the whole backlog at sending speed. */
enum mp_action mparticle_classify(int status)
{
    switch (status) {
    case 202:
        return MP_DELIVERED;
    case 400:
        return MP_REJECTED;
    case 401:
    case 403:
        return MP_AUTH;
    case 413:
        return MP_SPLIT;
    case 429:
        return MP_RATE_LIMITED;
    case 0:   /* no answer: transport failure */
    case 408: /* request timeout */
        return MP_RETRY;
    default:
        return status >= 500 && status <= 599 ? MP_RETRY : MP_UNEXPECTED;
    }
}

const char *mparticle_action_name(enum mp_action a)
{
    static const char *const names[] = {"delivered", "retry", "rate_limited", "split",
                                        "rejected",  "auth",  "unexpected"};
    return names[a];
}

int64_t mparticle_retry_after(const char *value, int64_t now_s, int64_t min_s, int64_t max_s)
{
    if (!value)
        return -1;
    while (*value == ' ' || *value == '\t')
        value++;
    if (!*value)
        return -1;
    int64_t secs;
    if (*value >= '0' && *value <= '9') {
        char *end;
        unsigned long long v = strtoull(value, &end, 10);
        while (*end == ' ' || *end == '\t')
            end++;
        if (*end != '\0')
            return -1;
        secs = v > (unsigned long long)INT64_MAX ? INT64_MAX : (int64_t)v;
    } else {
        /* HTTP-date: IMF-fixdate, or the obsolete RFC 850 and asctime forms */
        static const char *const formats[] = {"%a, %d %b %Y %H:%M:%S GMT",
                                              "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"};
        struct tm tm;
        const char *end = NULL;
        for (size_t i = 0; i < ARRAY_LEN(formats) && (!end || *end); i++) {
            memset(&tm, 0, sizeof tm);
            end = strptime(value, formats[i], &tm);
        }
        if (!end || *end != '\0')
            return -1;
        time_t at = timegm(&tm);
        if (at == (time_t)-1)
            return -1;
        secs = (int64_t)at - now_s;
    }
    if (secs < min_s)
        secs = min_s;
    if (secs > max_s)
        secs = max_s;
    return secs;
}

int mparticle_basic_auth(const char *key, const char *secret, char *out, size_t outlen)
{
    size_t kn = strlen(key), sn = strlen(secret);
    size_t n = kn + 1 + sn;
    unsigned char *plain = malloc(n + 1);
    size_t need = 6 + 4 * ((n + 2) / 3) + 1;
    if (!plain || outlen < need) {
        free(plain);
        if (outlen)
            out[0] = '\0';
        return -1;
    }
    memcpy(plain, key, kn);
    plain[kn] = ':';
    memcpy(plain + kn + 1, secret, sn);
    memcpy(out, "Basic ", 6);
    digest_base64(plain, n, out + 6);
    /* the plain credentials never linger in freed memory */
    explicit_bzero(plain, n);
    free(plain);
    return 0;
}

/* The number at p as the host writes a time; -1 when it is not one. */
static int64_t time_value(const char *p, const char *end)
{
    char num[32];
    size_t k = 0;
    while (p + k < end && p[k] && strchr("+-0123456789.eE", p[k])) {
        if (++k == sizeof num)
            return -1; /* longer than any time the host writes */
    }
    if (p + k >= end)
        return -1; /* cut off */
    memcpy(num, p, k);
    num[k] = '\0';
    char *stop;
    double t = strtod(num, &stop);
    return k > 0 && *stop == '\0' && t >= 0 && t < 9e18 ? (int64_t)t : -1;
}

/* The fields of an event; with want_name 0, its time only (a shorter walk).
 * Keys count at the depth they belong: the event's own (1, event_type) and
 * those of its data object (2); a nested object or array is gone over whole. */
static void scan_event(const char *s, size_t n, int want_name, struct mparticle_event_fields *out)
{
    static const char time_key[] = "timestamp_unixtime_ms", name_key[] = "event_name",
                      type_key[] = "event_type", custom[] = "\"custom_event\"";
    const char *end = s + n;
    out->time_ms = -1;
    out->name = STR_NULL;
    str name = STR_NULL;
    int depth = 0, in_data = 0, data_next = 0, have_time = 0;
    /* custom_type -1: event_type not read yet (the time alone needs none) */
    int have_name = !want_name, custom_type = want_name ? -1 : 0;
    for (const char *p = s; p < end && !(have_time && have_name && custom_type >= 0);) {
        char c = *p;
        if (c == '"') {
            const char *key = p + 1;
            p = json_skip_string(p, end);
            if (!p)
                break;
            size_t len = (size_t)(p - 1 - key);
            const char *colon = json_skip_ws(p, end);
            if (colon == end || *colon != ':')
                continue; /* a value, not a key */
            const char *v = json_skip_ws(colon + 1, end);
            if (depth == 1 && !in_data && len == 4 && memcmp(key, "data", 4) == 0) {
                data_next = 1;
            } else if (depth == 1 && custom_type < 0 && len == sizeof type_key - 1 &&
                       memcmp(key, type_key, len) == 0) {
                custom_type = (size_t)(end - v) >= sizeof custom - 1 &&
                              memcmp(v, custom, sizeof custom - 1) == 0;
                have_name |= !custom_type;
            } else if (in_data && depth == 2 && !have_time && len == sizeof time_key - 1 &&
                       memcmp(key, time_key, len) == 0) {
                have_time = 1;
                out->time_ms = time_value(v, end);
            } else if (in_data && depth == 2 && !have_name && len == sizeof name_key - 1 &&
                       memcmp(key, name_key, len) == 0) {
                /* the string's text as written, escapes and all */
                have_name = 1;
                if (v == end || *v != '"')
                    continue;
                p = json_skip_string(v, end);
                if (!p)
                    break;
                name = (str){v + 1, (size_t)(p - 1 - (v + 1))};
            }
            continue;
        }
        if (c == '{' || c == '[') {
            int enter = depth == 0 || (depth == 1 && data_next && c == '{');
            data_next = 0;
            if (!enter) {
                /* no key looked for is in it (custom_attributes): over it */
                p = json_skip_value(p, end);
                if (!p)
                    break;
                continue;
            }
            in_data = depth == 1;
            depth++;
        } else if (c == '}' || c == ']') {
            in_data = 0;
            if (--depth <= 0)
                break; /* the event's end */
        } else if (c == ',') {
            data_next = 0;
        }
        p++;
    }
    if (custom_type == 1)
        out->name = name;
}

void mparticle_event_fields(const char *s, size_t n, struct mparticle_event_fields *out)
{
    scan_event(s, n, 1, out);
}

int64_t mparticle_event_time_ms(const char *s, size_t n)
{
    struct mparticle_event_fields f;
    scan_event(s, n, 0, &f);
    return f.time_ms;
}

/* ---- names mParticle takes ---------------------------------------------- */

static int one_of(const char *const *names, const char *s)
{
    for (; *names; names++) {
        if (strcmp(*names, s) == 0)
            return 1;
    }
    return 0;
}

int mparticle_event_type_known(const char *s)
{
    /* the documented list and the two more mParticle's JSON schema knows */
    static const char *const types[] = {"custom_event",
                                        "screen_view",
                                        "commerce_event",
                                        "session_start",
                                        "session_end",
                                        "uninstall",
                                        "opt_out",
                                        "push_registration",
                                        "push_message",
                                        "application_state_transition",
                                        "crash_report",
                                        "breadcrumb",
                                        "network_performance",
                                        "user_attribute_change",
                                        "user_identity_change",
                                        "first_run",
                                        "profile",
                                        NULL};
    return one_of(types, s);
}

int mparticle_custom_event_type_known(const char *s)
{
    static const char *const types[] = {
        "navigation",      "location", "search", "transaction", "user_content",
        "user_preference", "social",   "media",  "other",       NULL};
    return one_of(types, s);
}

int mparticle_platform_known(const char *s)
{
    static const char *const platforms[] = {"iOS",     "Android",     "web",   "tvOS",
                                            "roku",    "out_of_band", "alexa", "smart_tv",
                                            "fire_tv", "xbox",        NULL};
    return one_of(platforms, s);
}

const char *const MPARTICLE_ENVIRONMENTS[] = {"production", "development", NULL};

int mparticle_environment_known(const char *s)
{
    return one_of(MPARTICLE_ENVIRONMENTS, s);
}

/* ---- credentials in answers -------------------------------------------- */

/* An answer as its reader would take it: percent-escapes (%XX) and JSON's
 * escapes (\/, \", \\, \uXXXX of ASCII) decoded, each byte remembering
 * the bytes of the answer it came from, so that a credential echoed in any
 * spelling, or in a mix of them, is masked where it stands. */
struct unescaped {
    char text[MPARTICLE_MASK_MAX];
    unsigned short from[MPARTICLE_MASK_MAX], to[MPARTICLE_MASK_MAX]; /* answer[from, to) */
    size_t n;
};

static void unescape(const char *s, size_t n, struct unescaped *u)
{
    u->n = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t len = 1;
        int hi, lo;
        if (c == '%' && i + 2 < n && (hi = hex_digit(s[i + 1])) >= 0 &&
            (lo = hex_digit(s[i + 2])) >= 0) {
            c = (unsigned char)(hi << 4 | lo);
            len = 3;
        } else if (c == '\\' && i + 1 < n &&
                   (s[i + 1] == '/' || s[i + 1] == '"' || s[i + 1] == '\\')) {
            c = (unsigned char)s[i + 1];
            len = 2;
        } else if (c == '\\' && i + 5 < n && s[i + 1] == 'u' && s[i + 2] == '0' &&
                   s[i + 3] == '0' && (hi = hex_digit(s[i + 4])) >= 0 && hi < 8 &&
                   (lo = hex_digit(s[i + 5])) >= 0) {
            c = (unsigned char)(hi << 4 | lo);
            len = 6;
        }
        u->text[u->n] = (char)c;
        u->from[u->n] = (unsigned short)i;
        u->to[u->n] = (unsigned short)(i + len);
        u->n++;
        i += len;
    }
}

/* Overwrites with '*' the answer's bytes behind u's text[a, b). */
static void mask_span(char *answer, const struct unescaped *u, size_t a, size_t b)
{
    if (b > a)
        memset(answer + u->from[a], '*', u->to[b - 1] - u->from[a]);
}

/* Masks every occurrence of secret, as sent or escaped (see unescape). */
static void mask(char *answer, size_t n, const struct unescaped *u, const char *secret)
{
    size_t k = secret ? strlen(secret) : 0;
    if (k == 0)
        return;
    for (char *p = answer; (p = memmem(p, n - (size_t)(p - answer), secret, k)) != NULL; p += k)
        memset(p, '*', k); /* as sent: a secret can hold what reads as an escape */
    for (const char *t = u->text; (t = memmem(t, u->n - (size_t)(t - u->text), secret, k)) != NULL;
         t += k)
        mask_span(answer, u, (size_t)(t - u->text), (size_t)(t - u->text) + k);
}

/* "Basic <credentials>", any case, after spaces or tabs (or a form's '+'):
 * masked up to the first byte that cannot be part of them. */
static void mask_basic(char *answer, const struct unescaped *u)
{
    const char *t = u->text;
    for (size_t i = 0; i + 5 < u->n; i++) {
        if (strncasecmp(t + i, "basic", 5) != 0 || (i > 0 && isalnum((unsigned char)t[i - 1])))
            continue;
        size_t j = i + 5;
        if (t[j] != ' ' && t[j] != '\t' && t[j] != '+')
            continue;
        while (j < u->n && (t[j] == ' ' || t[j] == '\t' || t[j] == '+'))
            j++;
        size_t from = j;
        while (j < u->n && t[j] && (isalnum((unsigned char)t[j]) || strchr("+/=\\%-_", t[j])))
            j++;
        mask_span(answer, u, from, j);
        i = j;
    }
}

void mparticle_mask_credentials(char *s, size_t n, const struct mparticle_credentials *creds,
                                size_t ncreds)
{
    if (n > MPARTICLE_MASK_MAX)
        n = MPARTICLE_MASK_MAX;
    struct unescaped u;
    unescape(s, n, &u);
    mask_basic(s, &u);
    for (size_t i = 0; i < ncreds; i++) {
        mask(s, n, &u, creds[i].key);
        mask(s, n, &u, creds[i].secret);
        /* the credentials of the Authorization header without the scheme */
        char auth[MPARTICLE_AUTH_MAX];
        if (!creds[i].key || !creds[i].secret ||
            mparticle_basic_auth(creds[i].key, creds[i].secret, auth, sizeof auth) != 0)
            continue;
        mask(s, n, &u, auth + 6);
        explicit_bzero(auth, sizeof auth);
    }
    explicit_bzero(&u, sizeof u);
}
