#include "config.h"

#include "digest.h"
#include "http_in.h"
#include "log.h"
#include "mparticle.h"
#include "queue.h"
#include "sandbox.h"
#include "tls.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <lauxlib.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <strings.h>
#include <sys/stat.h>

extern char **environ;

/* The configuration file may compute values, but within bounds. */
#define CONFIG_MEMORY (64u << 20)
#define CONFIG_INSTRUCTIONS 10000000
#define CONFIG_FILE_MAX (4u << 20)
/* queue.min_free_mb that leaves room for the WAL to reach its limit (a warning under it) */
#define MIN_FREE_SAFE_MB ((int)(QUEUE_WAL_MAX_BYTES >> 20) + 16)

enum ktype { K_STR, K_SECRET, K_INT, K_LIST, K_SECRET_LIST, K_ENUM, K_APPS };

struct key {
    const char *path;
    enum ktype type;
    size_t off;
    int64_t min, max;
    const char *const *choices; /* K_ENUM, NULL-terminated */
};

/* String keys without a default may be unset (NULL); the others must not be empty. */
static int optional(const struct key *k)
{
    return k->type == K_SECRET || (strncmp(k->path, "feeds.", 6) == 0 && strstr(k->path, ".url")) ||
           strncmp(k->path, "tls.", 4) == 0 || strcmp(k->path, "mparticle.ca_bundle") == 0;
}

static const char *const SYNC_MODES[] = {"full", "normal", NULL};
static const char *const LOG_LEVELS[] = {"debug", "info", "warn", "error", NULL};
static const char *const LOG_FORMATS[] = {"logfmt", "json", NULL};
static const char *const REQUIRE_MODES[] = {"either", "token", "signature", "both", NULL};

#define OFF(field) offsetof(struct config, field)
/* clang-format cannot lay out a list of initializers made by a macro. */
/* clang-format off */
#define FEED_KEYS(name, i)                                                                   \
    {"feeds." name ".key", K_SECRET, OFF(feeds[i].key), 0, 0, NULL},                         \
    {"feeds." name ".secret", K_SECRET, OFF(feeds[i].secret), 0, 0, NULL},                   \
    {"feeds." name ".url", K_STR, OFF(feeds[i].url), 0, 0, NULL},                            \
    {"feeds." name ".rate_limit", K_INT, OFF(feeds[i].rate_limit), 1, 100000, NULL}
/* clang-format on */

static const struct key KEYS[] = {
    {"listen", K_STR, OFF(listen), 0, 0, NULL},
    {"data_dir", K_STR, OFF(data_dir), 0, 0, NULL},
    {"rules_dir", K_STR, OFF(rules_dir), 0, 0, NULL},
    {"environment", K_ENUM, OFF(environment), 0, 0, MPARTICLE_ENVIRONMENTS},
    {"inbound.tokens", K_SECRET_LIST, OFF(inbound_tokens), 0, 0, NULL},
    {"inbound.hmac_secrets", K_SECRET_LIST, OFF(inbound_hmac_secrets), 0, 0, NULL},
    {"inbound.require", K_ENUM, OFF(inbound_require), 0, 0, REQUIRE_MODES},
    {"inbound.replay_window_s", K_INT, OFF(inbound_replay_window_s), 1, 86400, NULL},
    {"inbound.max_body_bytes", K_INT, OFF(inbound_max_body_bytes), 1024, 1LL << 30, NULL},
    {"inbound.max_events", K_INT, OFF(inbound_max_events), 1, 1000000, NULL},
    {"inbound.body_memory_mb", K_INT, OFF(inbound_body_memory_mb), 1, 1 << 20, NULL},
    {"inbound.workspaces", K_LIST, OFF(inbound_workspaces), 0, 0, NULL},
    {"mparticle.url", K_STR, OFF(mparticle_url), 0, 0, NULL},
    {"mparticle.rate_limit", K_INT, OFF(mparticle_rate_limit), 1, 100000, NULL},
    {"mparticle.event_names_limit", K_INT, OFF(mparticle_event_names_limit), 1, 100000, NULL},
    FEED_KEYS("ios", FEED_IOS),
    FEED_KEYS("android", FEED_ANDROID),
    FEED_KEYS("web", FEED_WEB),
    FEED_KEYS("unbound", FEED_UNBOUND),
    {"events", K_LIST, OFF(events), 0, 0, NULL},
    {"apps", K_APPS, 0, 0, 0, NULL},
    {"batch.linger_ms", K_INT, OFF(batch_linger_ms), 0, 60000, NULL},
    {"retry.base_ms", K_INT, OFF(retry_base_ms), 1, 3600000, NULL},
    {"retry.max_ms", K_INT, OFF(retry_max_ms), 1, 86400000, NULL},
    {"retry.max_age_s", K_INT, OFF(retry_max_age_s), 1, 90 * 86400, NULL},
    {"retry.failing_s", K_INT, OFF(retry_failing_s), 1, 90 * 86400, NULL},
    {"retry.pause_ms", K_INT, OFF(retry_pause_ms), 100, 86400000, NULL},
    {"queue.sync", K_ENUM, OFF(queue_sync), 0, 0, SYNC_MODES},
    {"queue.max_depth", K_INT, OFF(queue_max_depth), 1, INT64_C(1) << 40, NULL},
    {"queue.min_free_mb", K_INT, OFF(queue_min_free_mb), 0, INT64_C(1) << 30, NULL},
    {"dedup.window_s", K_INT, OFF(dedup_window_s), 0, 30 * 86400, NULL},
    {"http.threads", K_INT, OFF(http_threads), 1, 256, NULL},
    {"http.max_connections", K_INT, OFF(http_max_connections), 1, 100000, NULL},
    {"http.timeout_s", K_INT, OFF(http_timeout_s), 1, 3600, NULL},
    {"http.request_timeout_s", K_INT, OFF(http_request_timeout_s), 1, 3600, NULL},
    {"http.max_connections_per_ip", K_INT, OFF(http_max_connections_per_ip), 0, 100000, NULL},
    {"http.trusted_proxies", K_LIST, OFF(http_trusted_proxies), 0, 0, NULL},
    {"tls.cert", K_STR, OFF(tls_cert), 0, 0, NULL},
    {"tls.key", K_STR, OFF(tls_key), 0, 0, NULL},
    {"mparticle.ca_bundle", K_STR, OFF(mparticle_ca_bundle), 0, 0, NULL},
    {"rules.memory_mb", K_INT, OFF(rules_memory_mb), 1, 4096, NULL},
    {"rules.instructions", K_INT, OFF(rules_instructions), 1000, INT64_C(1) << 40, NULL},
    {"log.level", K_ENUM, OFF(log_level), 0, 0, LOG_LEVELS},
    {"log.format", K_ENUM, OFF(log_format), 0, 0, LOG_FORMATS},
    {"admin.token", K_SECRET, OFF(admin_token), 0, 0, NULL},
    {"metrics.token", K_SECRET, OFF(metrics_token), 0, 0, NULL},
};

_Static_assert(ARRAY_LEN(KEYS) <= CONFIG_KEYS_MAX, "room for every key's sources");

/* A value read from TRIBUTARY_<KEY>_FILE: at most this long. */
#define VALUE_FILE_MAX (64u << 10)

/* ---- small helpers ------------------------------------------------------ */

static void list_free(struct string_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->n = 0;
}

static int list_has(const struct string_list *l, const char *s)
{
    for (size_t i = 0; i < l->n; i++) {
        if (strcmp(l->items[i], s) == 0)
            return 1;
    }
    return 0;
}

static int list_add(struct string_list *l, const char *s, size_t n)
{
    char **items = realloc(l->items, (l->n + 1) * sizeof(*items));
    if (!items)
        return -1;
    l->items = items;
    char *copy = strndup(s, n);
    if (!copy)
        return -1;
    l->items[l->n++] = copy;
    return 0;
}

static void apps_free(struct config *c)
{
    for (size_t i = 0; i < c->napps; i++)
        free(c->apps[i].app_id);
    free(c->apps);
    c->apps = NULL;
    c->napps = 0;
}

static char **str_field(struct config *c, const struct key *k)
{
    return (char **)((char *)c + k->off);
}

static int64_t *int_field(struct config *c, const struct key *k)
{
    return (int64_t *)((char *)c + k->off);
}

static struct string_list *list_field(struct config *c, const struct key *k)
{
    return (struct string_list *)((char *)c + k->off);
}

static const struct key *find_key(const char *path)
{
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        if (strcmp(KEYS[i].path, path) == 0)
            return &KEYS[i];
    }
    return NULL;
}

/* True when `path` is a section (a prefix of some key followed by '.'). */
static int is_section(const char *path)
{
    size_t n = strlen(path);
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        if (strncmp(KEYS[i].path, path, n) == 0 && KEYS[i].path[n] == '.')
            return 1;
    }
    return 0;
}

static void env_name(const char *path, char *out, size_t outlen)
{
    size_t j = 0;
    const char *prefix = "TRIBUTARY_";
    for (const char *p = prefix; *p && j + 1 < outlen; p++)
        out[j++] = *p;
    for (const char *p = path; *p && j + 1 < outlen; p++)
        out[j++] = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
    out[j] = '\0';
}

/* Accumulates error lines. */
struct errs {
    buf b;
    int count;
};

/* Appends a line to b, after those it holds. */
static void add_linev(buf *b, const char *fmt, va_list ap)
{
    if (b->len)
        (void)!buf_addc(b, '\n');
    (void)!buf_vprintf(b, fmt, ap);
}

static void PRINTF(2, 3) errs_add(struct errs *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    add_linev(&e->b, fmt, ap);
    va_end(ap);
    e->count++;
}

/* Adds a line to the warnings said at start. */
static void PRINTF(2, 3) warn_add(buf *warnings, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    add_linev(warnings, fmt, ap);
    va_end(ap);
}

static int find_line(const char *src, const char *path);
static int find_line_in(const char *src, const char *sections, const char *name, size_t n);

struct loader {
    struct config *c;
    struct errs *e;
    const char *file; /* NULL: none */
    const char *src;  /* its text, NULL when not at hand */
    /* for the checks after loading: each key's default fingerprint, and
     * the line that sets it once looked for (0: not yet, -1: none found) */
    const uint64_t *defaults;
    int lines[CONFIG_KEYS_MAX];
};

static void PRINTF(3, 4) file_err(struct loader *ld, const char *path, const char *fmt, ...)
{
    char msg[ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int line = find_line(ld->src, path);
    if (line)
        errs_add(ld->e, "%s:%d: %s", ld->file, line, msg);
    else
        errs_add(ld->e, "%s: %s", ld->file, msg);
}

static int choice_ok(const struct key *k, const char *v)
{
    for (const char *const *c = k->choices; *c; c++) {
        if (strcmp(*c, v) == 0)
            return 1;
    }
    return 0;
}

static void choices_text(const struct key *k, char *out, size_t outlen)
{
    out[0] = '\0';
    size_t used = 0;
    for (const char *const *c = k->choices; *c; c++) {
        int n = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "", *c);
        if (n < 0 || (size_t)n >= outlen - used)
            break;
        used += (size_t)n;
    }
}

/* s[0..n) for a message: printable ASCII as it is, '\\' and the other bytes
 * (a NUL among them) as Lua writes them in a string (\\, \x00); cut short
 * with "..." to fit outlen (at least 4). */
static void printable(const char *s, size_t n, char *out, size_t outlen)
{
    size_t j = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        char c[8] = {(char)b, '\0'};
        if (b == '\\')
            str_copy(c, sizeof c, "\\\\");
        else if (b < 0x20 || b >= 0x7f)
            snprintf(c, sizeof c, "\\x%02X", b);
        size_t m = strlen(c);
        if (j + m + 4 > outlen) { /* no room for it and "..." */
            str_copy(out + j, outlen - j, "...");
            return;
        }
        memcpy(out + j, c, m + 1);
        j += m;
    }
}

/* [*a, *b) without the white space at either end. */
static void trim_space(const char **a, const char **b)
{
    while (*a < *b && isspace((unsigned char)**a))
        (*a)++;
    while (*b > *a && isspace((unsigned char)(*b)[-1]))
        (*b)--;
}

/* ---- values from the Lua file ------------------------------------------- */

static void set_from_lua(struct loader *ld, lua_State *L, const struct key *k, const char *path);

static void set_apps_from_lua(struct loader *ld, lua_State *L)
{
    /* ... apps */
    if (!lua_istable(L, -1)) {
        file_err(ld, "apps",
                 "'apps' must be a table of app_id = \"ios\"|\"android\"|\"web\"|\"unbound\"");
        return;
    }
    apps_free(ld->c);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        /* ... apps app_id platform */
        if (lua_type(L, -2) != LUA_TSTRING) {
            file_err(ld, "apps", "'apps' keys must be app_id strings");
        } else if (memchr(lua_tostring(L, -2), '\0', lua_rawlen(L, -2))) {
            /* read as C text, it would be another app_id */
            char shown[128];
            printable(lua_tostring(L, -2), lua_rawlen(L, -2), shown, sizeof shown);
            file_err(ld, "apps", "'apps' keys must be app_ids without a NUL byte, found '%s'",
                     shown);
        } else if (lua_type(L, -1) != LUA_TSTRING ||
                   feed_from_name(lua_tostring(L, -1), lua_rawlen(L, -1)) < 0) {
            file_err(ld, lua_tostring(L, -2),
                     "apps[\"%s\"] must be \"ios\", \"android\", \"web\" or \"unbound\"",
                     lua_tostring(L, -2));
        } else {
            struct app_entry *a = realloc(ld->c->apps, (ld->c->napps + 1) * sizeof(*a));
            if (!a) {
                errs_add(ld->e, "out of memory");
                lua_pop(L, 2);
                return;
            }
            ld->c->apps = a;
            a[ld->c->napps].app_id = strdup(lua_tostring(L, -2));
            a[ld->c->napps].feed =
                (enum feed)feed_from_name(lua_tostring(L, -1), lua_rawlen(L, -1));
            ld->c->napps++;
        }
        lua_pop(L, 1);
    }
}

static void set_list_from_lua(struct loader *ld, lua_State *L, const struct key *k,
                              const char *path)
{
    struct string_list *l = list_field(ld->c, k);
    list_free(l);
    if (lua_type(L, -1) == LUA_TSTRING) {
        /* "a,b,c" as in the environment */
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        if (memchr(s, '\0', n)) {
            file_err(ld, path, "'%s' must not hold a NUL byte", path);
            return;
        }
        const char *p = s;
        while (p <= s + n) {
            const char *comma = memchr(p, ',', (size_t)(s + n - p));
            const char *end = comma ? comma : s + n;
            const char *a = p, *b = end;
            trim_space(&a, &b);
            if (b > a && list_add(l, a, (size_t)(b - a)) != 0)
                errs_add(ld->e, "out of memory");
            if (!comma)
                break;
            p = comma + 1;
        }
        return;
    }
    if (!lua_istable(L, -1)) {
        file_err(ld, path, "'%s' must be a list of strings", path);
        return;
    }
    lua_Integer len = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= len; i++) {
        lua_rawgeti(L, -1, i);
        size_t n;
        const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
        if (lua_isnil(L, -1))
            file_err(ld, path,
                     "'%s' item %lld is nil: an os.getenv of a variable that is not set? (set "
                     "it, or leave the item out)",
                     path, (long long)i);
        else if (!s || n == 0)
            file_err(ld, path, "'%s' item %lld must be a non-empty string", path, (long long)i);
        else if (memchr(s, '\0', n))
            file_err(ld, path, "'%s' item %lld must not hold a NUL byte", path, (long long)i);
        else if (list_add(l, s, n) != 0)
            errs_add(ld->e, "out of memory");
        lua_pop(L, 1);
    }
    /* a list has only 1..n */
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 || lua_tointeger(L, -1) > len) {
            file_err(ld, path, "'%s' must be a list (found a non-index key)", path);
            lua_pop(L, 1);
            break;
        }
    }
}

static void set_from_lua(struct loader *ld, lua_State *L, const struct key *k, const char *path)
{
    int secret = k->type == K_SECRET || k->type == K_SECRET_LIST;
    switch (k->type) {
    case K_STR:
    case K_SECRET:
    case K_ENUM: {
        if (lua_type(L, -1) != LUA_TSTRING) {
            file_err(ld, path, "'%s' must be a string, not %s", path, luaL_typename(L, -1));
            return;
        }
        size_t n;
        const char *v = lua_tolstring(L, -1, &n);
        if (memchr(v, '\0', n)) {
            /* read as C text it would be cut there: another value */
            file_err(ld, path, "'%s' must not hold a NUL byte", path);
            return;
        }
        if (k->type == K_ENUM && !choice_ok(k, v)) {
            char choices[200];
            choices_text(k, choices, sizeof choices);
            file_err(ld, path, "'%s' must be one of %s", path, choices);
            return;
        }
        if (*v == '\0' && secret) {
            file_err(ld, path, "'%s' must not be empty", path);
            return;
        }
        if (*v == '\0' && optional(k)) {
            /* an empty path or URL would be used as one (an empty CA
             * bundle failed every send): unset is leaving it out */
            file_err(ld, path, "'%s' must not be empty (leave it out to use none)", path);
            return;
        }
        char **f = str_field(ld->c, k);
        free(*f);
        *f = strdup(v);
        return;
    }
    case K_INT: {
        int isnum = 0;
        lua_Integer v = lua_tointegerx(L, -1, &isnum);
        if (!isnum || lua_type(L, -1) != LUA_TNUMBER) {
            file_err(ld, path, "'%s' must be an integer, not %s", path, luaL_typename(L, -1));
            return;
        }
        if (v < k->min || v > k->max) {
            file_err(ld, path, "'%s' must be between %lld and %lld, not %lld", path,
                     (long long)k->min, (long long)k->max, (long long)v);
            return;
        }
        *int_field(ld->c, k) = v;
        return;
    }
    case K_LIST:
    case K_SECRET_LIST:
        set_list_from_lua(ld, L, k, path);
        return;
    case K_APPS:
        set_apps_from_lua(ld, L);
        return;
    }
}

/* Walks the table on top of the stack; prefix is the section path ("" at the top). */
static void walk(struct loader *ld, lua_State *L, const char *prefix)
{
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        /* ... t key value */
        if (lua_type(L, -2) != LUA_TSTRING) {
            errs_add(ld->e, "%s: keys in %s must be names, found a %s key", ld->file,
                     *prefix ? prefix : "the configuration table", luaL_typename(L, -2));
            lua_pop(L, 1);
            continue;
        }
        /* a '.' would name a key of a section ("http.threads") beside the
         * section's table, one of the two taken as hashing orders them, and
         * past the check of keys given twice; read as C text, a name is cut
         * at a NUL byte: "listen\0x" would be taken as listen */
        size_t n;
        const char *name = lua_tolstring(L, -2, &n);
        int nul = memchr(name, '\0', n) != NULL;
        if (nul || memchr(name, '.', n)) {
            char shown[128];
            printable(name, n, shown, sizeof shown);
            const char *table = *prefix ? prefix : "the configuration table";
            int line = nul ? 0 : find_line_in(ld->src, prefix, name, n);
            char where[300];
            if (line)
                snprintf(where, sizeof where, "%s:%d", ld->file, line);
            else
                str_copy(where, sizeof where, ld->file);
            if (nul)
                errs_add(ld->e, "%s: keys in %s must be names without a NUL byte, found '%s'",
                         where, table, shown);
            else
                errs_add(ld->e,
                         "%s: keys in %s must be names without '.' (sections are nested tables: "
                         "http = { threads = 8 }), found '%s'",
                         where, table, shown);
            lua_pop(L, 1);
            continue;
        }
        char path[256];
        snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", name);
        const struct key *k = find_key(path);
        if (k)
            set_from_lua(ld, L, k, path);
        else if (is_section(path) && lua_istable(L, -1))
            walk(ld, L, path);
        else if (is_section(path))
            file_err(ld, path, "'%s' must be a table, not %s", path, luaL_typename(L, -1));
        else
            file_err(ld, path, "unknown key '%s'", path);
        lua_pop(L, 1);
    }
}

static char *read_file(const char *path, size_t *len, struct errs *e)
{
    int opened;
    char *src = read_path(path, CONFIG_FILE_MAX, len, &opened);
    if (!src && !opened)
        errs_add(e, "%s: cannot open: %s", path, strerror(errno));
    else if (!src && errno == EFBIG)
        errs_add(e, "%s: file larger than %u MiB", path, CONFIG_FILE_MAX >> 20);
    else if (!src)
        errs_add(e, "%s: cannot read: %s", path, strerror(errno));
    return src;
}

/* ---- scanning the file's text -------------------------------------------- */

/* Lua keeps the last of two values given to one key in a table constructor,
 * silently: a section written twice (`inbound = {...}` near the top and again
 * below) loses the first, tokens and all. The file's text is scanned for it,
 * token by token (strings and comments skipped); the keys are those of the
 * fields of each constructor (`name =`, `["name"] =`), not assignments inside
 * a function's body or brackets. */

#define SCAN_DEPTH 32 /* constructors nested deeper are not looked into */
#define SCAN_KEYS 64  /* keys remembered per constructor */

enum token_kind { TK_END, TK_NAME, TK_STRING, TK_NUMBER, TK_PUNCT, TK_OTHER };

struct token {
    enum token_kind kind;
    const char *s; /* a name; a string's text when it is plain (no escape) */
    size_t n;
    int plain;
    char c; /* TK_PUNCT */
    int line;
};

struct scan_key {
    const char *s;
    size_t n;
    int line;
};

/* An open table constructor. */
struct scan_table {
    struct scan_key keys[SCAN_KEYS];
    int nkeys;
    int nesting; /* open brackets and blocks (function ... end) inside it */
    int field_start;
    const char *name; /* the key it is the value of ("?": none) */
    size_t name_len;
};

/* The level of a long bracket at p ("[[" 0, "[==[" 2), or -1. */
static int long_bracket(const char *p)
{
    if (*p != '[')
        return -1;
    int level = 0;
    while (p[1 + level] == '=')
        level++;
    return p[1 + level] == '[' ? level : -1;
}

/* Past the long string or comment whose opening bracket of `level` is at p. */
static const char *skip_long(const char *p, int level, int *line)
{
    for (p += level + 2; *p; p++) {
        if (*p == '\n')
            (*line)++;
        else if (*p == ']' && p[1 + level] == ']') {
            int i = 0;
            while (i < level && p[1 + i] == '=')
                i++;
            if (i == level)
                return p + level + 2;
        }
    }
    return p;
}

static int is_word(const struct token *t, const char *w)
{
    return t->kind == TK_NAME && t->n == strlen(w) && memcmp(t->s, w, t->n) == 0;
}

/* The next token at or after *p. */
static void next_token(const char **pp, int *line, struct token *t)
{
    const char *p = *pp;
    for (;;) {
        if (*p == '\n')
            (*line)++;
        if (isspace((unsigned char)*p)) {
            p++;
        } else if (p[0] == '-' && p[1] == '-') {
            int level = long_bracket(p + 2);
            if (level >= 0)
                p = skip_long(p + 2, level, line);
            else
                while (*p && *p != '\n')
                    p++;
        } else {
            break;
        }
    }
    *t = (struct token){.kind = TK_OTHER, .line = *line};
    int level = long_bracket(p);
    if (!*p) {
        t->kind = TK_END;
    } else if (level >= 0) {
        t->kind = TK_STRING;
        p = skip_long(p, level, line);
    } else if (*p == '"' || *p == '\'') {
        char quote = *p++;
        t->kind = TK_STRING;
        t->s = p;
        t->plain = 1;
        for (; *p && *p != quote && *p != '\n'; p++) {
            if (*p != '\\' || !p[1])
                continue;
            t->plain = 0;
            p++;
            if (*p == 'z') { /* skips the blanks that follow, line ends too */
                for (; isspace((unsigned char)p[1]); p++)
                    *line += p[1] == '\n';
            } else if (*p == '\r' || *p == '\n') { /* \r\n and \n\r are one line end */
                if ((p[1] == '\r' || p[1] == '\n') && p[1] != *p)
                    p++;
                (*line)++;
            }
        }
        t->n = (size_t)(p - t->s);
        if (*p == quote)
            p++;
    } else if (isalpha((unsigned char)*p) || *p == '_') {
        t->kind = TK_NAME;
        t->s = p;
        while (isalnum((unsigned char)*p) || *p == '_')
            p++;
        t->n = (size_t)(p - t->s);
    } else if (isdigit((unsigned char)*p) || (*p == '.' && isdigit((unsigned char)p[1]))) {
        t->kind = TK_NUMBER;
        for (p++; isalnum((unsigned char)*p) || *p == '.' ||
                  ((*p == '+' || *p == '-') && strchr("eEpP", p[-1]));
             p++)
            ;
    } else if (strchr("=<>~", *p) && p[1] == '=') {
        p += 2; /* ==, <=, >=, ~= */
    } else {
        t->kind = TK_PUNCT;
        t->c = *p++;
    }
    *pp = p;
}

/* The line of the first assignment to `name` (name = or ["name"] =) at or
 * after *p, with *p moved past it; 0 when there is none. Comments and strings
 * are passed over as tokens: a commented-out example of a key is not it. */
static int find_assignment(const char **p, int *line, const char *name, size_t n)
{
    struct token t[4] = {{0}}; /* the last four tokens, the newest last */
    for (;;) {
        memmove(&t[0], &t[1], 3 * sizeof t[0]);
        next_token(p, line, &t[3]);
        if (t[3].kind == TK_END)
            return 0;
        if (t[3].kind != TK_PUNCT || t[3].c != '=')
            continue;
        if (t[2].kind == TK_NAME && t[2].n == n && memcmp(t[2].s, name, n) == 0)
            return t[2].line;
        if (t[2].kind == TK_PUNCT && t[2].c == ']' && t[1].kind == TK_STRING && t[1].plain &&
            t[1].n == n && memcmp(t[1].s, name, n) == 0 && t[0].kind == TK_PUNCT && t[0].c == '[')
            return t[0].line;
    }
}

/* The line where name[0..n) is assigned, taken whole, within the section
 * `sections` ("" for the top; each of its components is looked for after the
 * previous one, so feeds.web's key is found inside `web = {...}`). 0 when not
 * found. */
static int find_line_in(const char *src, const char *sections, const char *name, size_t n)
{
    if (!src)
        return 0;
    const char *p = src;
    int line = 1;
    for (const char *c = sections; *c;) {
        const char *dot = strchr(c, '.');
        size_t m = dot ? (size_t)(dot - c) : strlen(c);
        if (!find_assignment(&p, &line, c, m))
            return 0;
        c += m + (dot ? 1 : 0);
    }
    return find_assignment(&p, &line, name, n);
}

/* The line where a key path is assigned (feeds.web.key inside `web = {...}`
 * inside `feeds = {...}`); 0 when not found. */
static int find_line(const char *src, const char *path)
{
    const char *last = strrchr(path, '.');
    char sections[256] = "";
    if (last && (size_t)(last - path) >= sizeof sections)
        return 0;
    if (last)
        memcpy(sections, path, (size_t)(last - path));
    const char *name = last ? last + 1 : path;
    return find_line_in(src, sections, name, strlen(name));
}

static void key_given_twice(const char *file, struct scan_table *stack, int depth,
                            const struct scan_key *k, const struct scan_key *first, struct errs *e)
{
    char path[256] = "";
    for (int i = 1; i <= depth; i++) {
        size_t used = strlen(path);
        snprintf(path + used, sizeof path - used, "%.*s.", (int)stack[i].name_len, stack[i].name);
    }
    errs_add(e,
             "%s:%d: '%s%.*s' is given twice in one table (first on line %d); Lua keeps "
             "only the last",
             file, k->line, path, (int)k->n, k->s, first->line);
}

/* The state of a call os.getenv("NAME") as its tokens come: 1 after os, 2
 * after the dot, 3 after getenv, 4 after its parenthesis. */
static int getenv_call(int state, const struct token *t)
{
    if (is_word(t, "os"))
        return 1;
    if (state == 1 && t->kind == TK_PUNCT && t->c == '.')
        return 2;
    if (state == 2 && is_word(t, "getenv"))
        return 3;
    if (state == 3 && t->kind == TK_PUNCT && t->c == '(')
        return 4;
    return 0;
}

/* Scans the file for keys given twice (errors in e) and adds to read the
 * names the file passes to os.getenv as text: a variable it reads, whether or
 * not this load ran the call (`os.getenv("A") or os.getenv("B")`); and to
 * whole those of them whose call is a table's item or field value as it
 * stands (followed by ",", ";" or "}"; not `os.getenv("A") or "default"`). */
static void scan_source(const char *file, const char *src, struct errs *e, struct string_list *read,
                        struct string_list *whole)
{
    struct scan_table *stack = calloc(SCAN_DEPTH, sizeof(*stack));
    if (!stack)
        return;
    int depth = -1, line = 1;
    const char *p = src;
    /* a field's key as it is read: 1 a name, 2 "[", 3 "[" string, 4 "[" string "]" */
    struct scan_key key = {0};
    int key_state = 0;
    struct scan_key value_of = {0}; /* the key of the value that begins now */
    int getenv_state = 0;
    /* the name of the call just read: 1 inside its parentheses, 2 after */
    struct scan_key named_var = {0};
    int var_state = 0;
    struct token t;
    do {
        next_token(&p, &line, &t);
        int punct = t.kind == TK_PUNCT ? t.c : 0;
        if (var_state == 2 && (punct == ',' || punct == ';' || punct == '}') &&
            list_add(whole, named_var.s, named_var.n) != 0)
            errs_add(e, "out of memory");
        var_state = var_state == 1 && punct == ')' ? 2 : 0;
        if (t.kind == TK_STRING && t.plain && getenv_state >= 3) {
            if (list_add(read, t.s, t.n) != 0)
                errs_add(e, "out of memory");
            named_var = (struct scan_key){t.s, t.n, t.line};
            var_state = getenv_state == 4 ? 1 : 2; /* os.getenv("A") or os.getenv "A" */
        }
        getenv_state = getenv_call(getenv_state, &t);
        struct scan_table *top = depth >= 0 && depth < SCAN_DEPTH ? &stack[depth] : NULL;
        int at_field = top && top->nesting == 0 && top->field_start;
        struct scan_key named = value_of;
        value_of.s = NULL;
        if (top)
            top->field_start = 0;
        int state = key_state;
        key_state = 0;
        if (t.kind == TK_NAME && at_field) {
            key = (struct scan_key){t.s, t.n, t.line};
            key_state = 1;
        } else if (t.kind == TK_STRING && state == 2 && t.plain) {
            key = (struct scan_key){t.s, t.n, t.line};
            key_state = 3;
        }
        if (!top) { /* outside every constructor, or deeper than SCAN_DEPTH */
            if (t.kind == TK_PUNCT && t.c == '{' && ++depth < SCAN_DEPTH)
                stack[depth] = (struct scan_table){.field_start = 1, .name = "?", .name_len = 1};
            else if (t.kind == TK_PUNCT && t.c == '}' && depth >= 0)
                depth--;
            continue;
        }
        if (is_word(&t, "function") || is_word(&t, "if") || is_word(&t, "do") ||
            is_word(&t, "repeat"))
            top->nesting++;
        else if (is_word(&t, "end") || is_word(&t, "until"))
            top->nesting--;
        if (t.kind != TK_PUNCT)
            continue;
        switch (t.c) {
        case '=':
            if (top->nesting == 0 && (state == 1 || state == 4)) {
                for (int i = 0; i < top->nkeys; i++) {
                    if (top->keys[i].n == key.n && memcmp(top->keys[i].s, key.s, key.n) == 0) {
                        key_given_twice(file, stack, depth, &key, &top->keys[i], e);
                        break;
                    }
                }
                if (top->nkeys < SCAN_KEYS)
                    top->keys[top->nkeys++] = key;
                value_of = key;
            }
            break;
        case '{':
            if (++depth < SCAN_DEPTH)
                stack[depth] = (struct scan_table){.field_start = 1,
                                                   .name = named.s ? named.s : "?",
                                                   .name_len = named.s ? named.n : 1};
            break;
        case '}':
            depth--;
            break;
        case '[':
            key_state = at_field ? 2 : 0;
            top->nesting++;
            break;
        case '(':
            top->nesting++;
            break;
        case ']':
            key_state = state == 3 ? 4 : 0;
            top->nesting--;
            break;
        case ')':
            top->nesting--;
            break;
        case ',':
        case ';':
            top->field_start = top->nesting == 0;
            break;
        default:
            break;
        }
    } while (t.kind != TK_END);
    free(stack);
}

/* Adds to read the names of the environment variables the file read
 * (os.getenv), and to unset those of them that are not set and that whole
 * names (see scan_source). */
static void collect_env_read(lua_State *L, struct string_list *read,
                             const struct string_list *whole, struct string_list *unset,
                             struct errs *e)
{
    if (lua_getfield(L, LUA_REGISTRYINDEX, SANDBOX_ENV_READ) == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            size_t n;
            const char *name = lua_tolstring(L, -2, &n);
            if (list_add(read, name, n) != 0 ||
                (!getenv(name) && list_has(whole, name) && list_add(unset, name, n) != 0))
                errs_add(e, "out of memory");
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
}

/* read: receives the names of the environment variables the file read, and
 * unset those of them its run read and found not set where the file gives
 * one as a value as it stands. */
static void load_source(struct config *c, const char *path, const char *src, size_t len,
                        struct errs *e, struct string_list *read, struct string_list *unset)
{
    struct loader ld = {.c = c, .e = e, .file = path, .src = src};
    sandbox *sb = sandbox_new(SANDBOX_GETENV);
    if (!sb) {
        errs_add(e, "out of memory");
        return;
    }
    lua_State *L = sandbox_lua(sb);
    char chunk[300], err[ERR_LEN];
    snprintf(chunk, sizeof chunk, "@%s", path);
    if (sandbox_load(sb, chunk, src, len, err, sizeof err) != 0) {
        /* Lua quotes the offending token ("near '...'"), which may be a secret. */
        char *near = strstr(err, " near ");
        if (near)
            *near = '\0';
        errs_add(e, "%s", err);
        goto done;
    }
    struct sandbox_limits lim = {CONFIG_MEMORY, CONFIG_INSTRUCTIONS};
    struct sandbox_error serr;
    enum sandbox_rc rc = sandbox_call(sb, 0, 1, &lim, &serr);
    if (rc == SANDBOX_LIMIT) {
        errs_add(e, "%s: %s", path, serr.msg);
        goto done;
    }
    if (rc != SANDBOX_OK) {
        /* and a runtime error names the constant involved ("(constant '...')") */
        char *constant = strstr(serr.msg, " (constant ");
        if (constant)
            *constant = '\0';
        /* an error a library function raised has no position of its own:
         * the file's line that called it */
        size_t wn = strlen(serr.where);
        if (wn && strncmp(serr.msg, serr.where, wn) != 0)
            errs_add(e, "%s: %s", serr.where, serr.msg);
        else
            errs_add(e, "%s", serr.msg);
        goto done;
    }
    if (!lua_istable(L, -1)) {
        errs_add(e, "%s: the file must return a table, not %s", path, luaL_typename(L, -1));
        goto done;
    }
    walk(&ld, L, "");
    struct string_list whole = {0};
    scan_source(path, src, e, read, &whole);
    collect_env_read(L, read, &whole, unset, e);
    list_free(&whole);
done:
    sandbox_free(sb);
}

/* ---- values from the environment ---------------------------------------- */

/* A number or a word of the environment, without the blanks around it, at
 * either end (an env file or `docker -e` may leave one after it, or a "\r"),
 * in out; 0 when it does not fit. */
static int env_word(const char *v, char *out, size_t outlen)
{
    const char *a = v, *b = v + strlen(v);
    trim_space(&a, &b);
    size_t len = (size_t)(b - a);
    if (len >= outlen)
        return 0;
    memcpy(out, a, len);
    out[len] = '\0';
    return 1;
}

/* from_file: v is the content of the file the variable name names. */
static void set_from_env(struct config *c, const struct key *k, const char *name, const char *v,
                         int from_file, struct errs *e)
{
    char word[64];
    switch (k->type) {
    case K_STR:
    case K_SECRET:
    case K_ENUM: {
        if (k->type == K_ENUM) {
            char choices[200];
            choices_text(k, choices, sizeof choices);
            if (!env_word(v, word, sizeof word) || !choice_ok(k, word)) {
                char shown[128];
                printable(v, strlen(v), shown, sizeof shown);
                /* a file named by a variable holds a secret, as a rule */
                if (from_file)
                    errs_add(e, "%s: must be one of %s", name, choices);
                else
                    errs_add(e, "%s: must be one of %s, not \"%s\"", name, choices, shown);
                return;
            }
            v = word;
        }
        char **f = str_field(c, k);
        free(*f);
        *f = *v || !optional(k) ? strdup(v) : NULL;
        return;
    }
    case K_INT: {
        /* blanks around the number are not part of it; a '+' is refused, as in
         * the file (Lua has no unary plus) */
        int64_t n;
        int ok = env_word(v, word, sizeof word) && parse_int64(word, k->min, k->max, &n) == 0;
        if (!ok && from_file) {
            /* a file named by a variable holds a secret, as a rule: one named
             * here by mistake stays out of the message */
            errs_add(e, "%s: must be an integer between %lld and %lld", name, (long long)k->min,
                     (long long)k->max);
            return;
        }
        if (!ok) {
            char shown[128];
            printable(v, strlen(v), shown, sizeof shown);
            errs_add(e, "%s: must be an integer between %lld and %lld, not \"%s\"", name,
                     (long long)k->min, (long long)k->max, shown);
            return;
        }
        *int_field(c, k) = n;
        return;
    }
    case K_LIST:
    case K_SECRET_LIST: {
        struct string_list *l = list_field(c, k);
        list_free(l);
        const char *p = v;
        for (;;) {
            const char *comma = strchr(p, ',');
            const char *end = comma ? comma : p + strlen(p);
            const char *a = p, *b = end;
            trim_space(&a, &b);
            if (b > a && list_add(l, a, (size_t)(b - a)) != 0)
                errs_add(e, "out of memory");
            if (!comma)
                break;
            p = comma + 1;
        }
        return;
    }
    case K_APPS:
        return;
    }
}

/* The value in the file TRIBUTARY_<KEY>_FILE names, without its trailing
 * newline; a list may hold an item per line. NULL with an error naming the
 * variable and the file, never the content. */
static char *value_from_file(const struct key *k, const char *var, const char *path, struct errs *e)
{
    size_t len = 0;
    int opened;
    char *v = read_path(path, VALUE_FILE_MAX, &len, &opened);
    if (!v) {
        if (!opened)
            errs_add(e, "%s: cannot open %s: %s", var, path, strerror(errno));
        else if (errno == EFBIG)
            errs_add(e, "%s: %s is larger than %u KiB", var, path, VALUE_FILE_MAX >> 10);
        else
            errs_add(e, "%s: cannot read %s: %s", var, path, strerror(errno));
        return NULL;
    }
    while (len && isspace((unsigned char)v[len - 1]))
        len--;
    v[len] = '\0';
    if (len == 0) {
        /* a file caught halfway through a rewrite (truncated, not yet
         * written): read as empty, it would remove every token */
        errs_add(e, "%s: %s is empty", var, path);
        free(v);
        return NULL;
    }
    int list = k->type == K_LIST || k->type == K_SECRET_LIST;
    for (size_t i = 0; i < len; i++) {
        if (v[i] == '\0') {
            errs_add(e, "%s: %s is not text", var, path);
            explicit_bzero(v, len);
            free(v);
            return NULL;
        }
        if ((v[i] == '\n' || v[i] == '\r') && !list) {
            errs_add(e, "%s: %s holds more than one line", var, path);
            explicit_bzero(v, len);
            free(v);
            return NULL;
        }
        if (v[i] == '\n' || v[i] == '\r')
            v[i] = ',';
    }
    return v;
}

/* What a key's value is now, as a number that changes when it does. */
static uint64_t fingerprint(struct config *c, const struct key *k)
{
    uint64_t h = digest_fnv64(0, &k->type, sizeof k->type);
    switch (k->type) {
    case K_STR:
    case K_SECRET:
    case K_ENUM: {
        const char *v = *str_field(c, k);
        return v ? digest_fnv64(h, v, strlen(v) + 1) : h;
    }
    case K_INT:
        return digest_fnv64(h, int_field(c, k), sizeof(int64_t));
    case K_LIST:
    case K_SECRET_LIST: {
        const struct string_list *l = list_field(c, k);
        for (size_t i = 0; i < l->n; i++)
            h = digest_fnv64(h, l->items[i], strlen(l->items[i]) + 1);
        return h;
    }
    case K_APPS:
        return h;
    }
    return h;
}

/* How a load takes the environment: not at all (a text in memory), as a start
 * or command does, or as a reload does. */
enum env_use { ENV_NONE, ENV_FIRST, ENV_AGAIN };

/* Kubernetes gives every container of a pod variables for each Service of its
 * namespace ("service links", on unless the pod sets enableServiceLinks:
 * false), named after the Service in capitals with '_' for '-'. A Service
 * named tributary, or tributary-<more>, gives variables in TRIBUTARY_ that
 * name no key of ours: no key's variable has SERVICE or PORT in it. They are
 * left alone, as their names and values have these shapes exactly (so that
 * TRIBUTARY_PORT=9000, meant for listen, is still refused):
 *
 *   TRIBUTARY_SERVICE_HOST=10.96.0.12            the Service's address
 *   TRIBUTARY_SERVICE_PORT=8080                  its first port
 *   TRIBUTARY_SERVICE_PORT_<PORT NAME>=8080      each named port
 *   TRIBUTARY_PORT=tcp://10.96.0.12:8080         the first port, Docker's way
 *   TRIBUTARY_PORT_8080_TCP=tcp://10.96.0.12:8080, and with _PROTO=tcp,
 *   _PORT=8080 and _ADDR=10.96.0.12: each port (TCP, UDP or SCTP)
 *
 * An IPv6 address is in brackets in a URL (tcp://[fd00::c]:8080). */
static const char *const LINK_PROTOCOLS[] = {"tcp", "udp", "sctp"};

/* A port number, 1 to 65535, in s[0..n) as Kubernetes writes it. */
static int link_port(const char *s, size_t n)
{
    long port = 0;
    for (size_t i = 0; i < n && i < 5; i++) {
        if (!isdigit((unsigned char)s[i]))
            return 0;
        port = port * 10 + (s[i] - '0');
    }
    return n > 0 && n <= 5 && *s != '0' && port <= 65535;
}

/* An address of family (AF_INET, AF_INET6, or 0 for either) in s[0..n). */
static int link_addr(const char *s, size_t n, int family)
{
    char text[INET6_ADDRSTRLEN];
    unsigned char addr[16];
    if (n == 0 || n >= sizeof text)
        return 0;
    memcpy(text, s, n);
    text[n] = '\0';
    return (family != AF_INET6 && inet_pton(AF_INET, text, addr) == 1) ||
           (family != AF_INET && inet_pton(AF_INET6, text, addr) == 1);
}

/* The protocol s[0..n) names, in capitals or not as upper says: its index in
 * LINK_PROTOCOLS, or -1. */
static int link_protocol(const char *s, size_t n, int upper)
{
    for (size_t i = 0; i < ARRAY_LEN(LINK_PROTOCOLS); i++) {
        const char *p = LINK_PROTOCOLS[i];
        if (strlen(p) != n)
            continue;
        size_t j = 0;
        while (j < n && s[j] == (upper ? (char)toupper((unsigned char)p[j]) : p[j]))
            j++;
        if (j == n)
            return (int)i;
    }
    return -1;
}

/* v is <protocol>://<address>:<port> (an IPv6 address in brackets), of the
 * protocol of index proto when proto >= 0 and of the port s[0..n) when n > 0. */
static int link_url(const char *v, int proto, const char *port, size_t n)
{
    const char *sep = strstr(v, "://");
    int q = sep ? link_protocol(v, (size_t)(sep - v), 0) : -1;
    if (q < 0 || (proto >= 0 && q != proto))
        return 0;
    const char *host = sep + 3, *colon = strrchr(host, ':');
    if (!colon || !link_port(colon + 1, strlen(colon + 1)) ||
        (n && (strlen(colon + 1) != n || memcmp(colon + 1, port, n) != 0)))
        return 0;
    size_t hn = (size_t)(colon - host);
    if (*host == '[')
        return hn >= 2 && colon[-1] == ']' && link_addr(host + 1, hn - 2, AF_INET6);
    return link_addr(host, hn, AF_INET);
}

/* Whether rest, what follows a Service's name in a variable's name (from
 * its '_'), and the value v are those of a service link. */
static int link_variable(const char *rest, const char *v)
{
    size_t vn = strlen(v);
    if (strcmp(rest, "_SERVICE_HOST") == 0)
        return link_addr(v, vn, 0);
    if (strcmp(rest, "_SERVICE_PORT") == 0)
        return link_port(v, vn);
    if (strncmp(rest, "_SERVICE_PORT_", 14) == 0)
        return rest[14] &&
               strspn(rest + 14, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") == strlen(rest + 14) &&
               link_port(v, vn);
    if (strcmp(rest, "_PORT") == 0)
        return link_url(v, -1, NULL, 0);
    if (strncmp(rest, "_PORT_", 6) != 0)
        return 0;
    /* _PORT_<port>_<PROTOCOL>, then nothing, _PROTO, _PORT or _ADDR */
    const char *port = rest + 6;
    size_t pn = strspn(port, "0123456789");
    if (!link_port(port, pn) || port[pn] != '_')
        return 0;
    const char *proto = port + pn + 1;
    size_t qn = strcspn(proto, "_");
    int p = link_protocol(proto, qn, 1);
    if (p < 0)
        return 0;
    const char *what = proto + qn;
    if (*what == '\0')
        return link_url(v, p, port, pn);
    if (strcmp(what, "_PROTO") == 0)
        return strcmp(v, LINK_PROTOCOLS[p]) == 0;
    if (strcmp(what, "_PORT") == 0)
        return vn == pn && memcmp(v, port, pn) == 0;
    if (strcmp(what, "_ADDR") == 0)
        return link_addr(v, vn, 0);
    return 0;
}

/* Whether the environment entry env (NAME=value) is a Kubernetes service link
 * of a Service named tributary or tributary-<more>. */
static int service_link(const char *env)
{
    const char *eq = strchr(env, '=');
    if (!eq || strncmp(env, "TRIBUTARY", 9) != 0)
        return 0;
    char name[256];
    size_t n = (size_t)(eq - env);
    if (n >= sizeof name)
        return 0;
    memcpy(name, env, n);
    name[n] = '\0';
    /* the Service's name ends at some '_': tributary, or tributary-<more>
     * (letters, digits and '-', the last not a '-') */
    for (size_t i = 9; i < n; i++) {
        if (name[i] != '_')
            continue;
        int service =
            i == 9 || (i > 10 && name[i - 1] != '_' &&
                       strspn(name + 10, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") >= i - 10);
        if (service && link_variable(name + i, eq + 1))
            return 1;
    }
    return 0;
}

/* Whether env[0..n) is the variable of the key path, or its _FILE. */
static int key_variable(const char *env, size_t n, const char *path)
{
    char name[128];
    env_name(path, name, sizeof name);
    size_t len = strlen(name);
    return n >= len && strncmp(name, env, len) == 0 &&
           (n == len || (n == len + 5 && strncmp(env + len, "_FILE", 5) == 0));
}

/* Whether a variable's value holds nothing: blanks and commas only. */
static int no_items(const char *v)
{
    for (; *v; v++) {
        if (*v != ',' && !isspace((unsigned char)*v))
            return 0;
    }
    return 1;
}

/* Sets what the environment gives, and which keys it set in c->from_env.
 * `defaults` holds each key's fingerprint before the file was read, and
 * c->file_value after: a key the file changed from its default and the
 * environment sets to another value is named in a warning, as an edit of the
 * file would otherwise have no effect without a word. read: the environment
 * variables the configuration file reads itself (os.getenv). */
static void load_env(struct config *c, const uint64_t *defaults, struct errs *e, buf *warnings,
                     const struct string_list *read, enum env_use use)
{
    char name[128], file_var[140];
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        if (KEYS[i].type == K_APPS)
            continue;
        env_name(KEYS[i].path, name, sizeof name);
        snprintf(file_var, sizeof file_var, "%s_FILE", name);
        const char *v = getenv(name), *path = getenv(file_var);
        if (v && path) {
            errs_add(e, "%s and %s are both set; keep one", name, file_var);
        } else if (v) {
            set_from_env(c, &KEYS[i], name, v, 0, e);
        } else if (path) {
            char *from_file = value_from_file(&KEYS[i], file_var, path, e);
            if (from_file) {
                set_from_env(c, &KEYS[i], file_var, from_file, 1, e);
                explicit_bzero(from_file, strlen(from_file)); /* a secret, as a rule */
            }
            free(from_file);
        }
        c->from_env[i] = v ? 1 : path ? 2 : 0;
        c->overridden[i] = c->from_env[i] && c->file && c->file_value[i] != defaults[i] &&
                           fingerprint(c, &KEYS[i]) != c->file_value[i];
        if (c->overridden[i] && v && no_items(v) &&
            (KEYS[i].type == K_SECRET || KEYS[i].type == K_SECRET_LIST))
            /* a variable left empty (a template's NAME=) would remove the
             * file's tokens or credentials, with a warning only */
            errs_add(e,
                     "%s is empty, and would remove %s of %s: unset it, or remove the key "
                     "from the file",
                     name, KEYS[i].path, c->file);
        else if (c->overridden[i])
            warn_add(warnings, "%s overrides %s of %s", v ? name : file_var, KEYS[i].path, c->file);
    }
    /* A mistyped variable would silently leave a default in force (with
     * TRIBUTARY_INBOUND_TOKEN, no authentication): an error, as an unknown key
     * in the file is, unless the file reads it itself (os.getenv) or it is a
     * Kubernetes service link. */
    for (char **env = environ; env && *env; env++) {
        if (strncmp(*env, "TRIBUTARY_", 10) != 0)
            continue;
        const char *eq = strchr(*env, '=');
        size_t n = eq ? (size_t)(eq - *env) : strlen(*env);
        int known = 0;
        const char *file_only = NULL; /* the key it would name, which has no variable */
        for (size_t i = 0; i < ARRAY_LEN(KEYS) && !known; i++) {
            if (!key_variable(*env, n, KEYS[i].path))
                continue;
            known = KEYS[i].type != K_APPS;
            file_only = KEYS[i].path;
        }
        for (size_t i = 0; i < read->n && !known; i++)
            known = strlen(read->items[i]) == n && strncmp(read->items[i], *env, n) == 0;
        if (known || service_link(*env))
            continue;
        size_t best = SIZE_MAX;
        char nearest[140] = "";
        for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
            if (KEYS[i].type == K_APPS)
                continue;
            env_name(KEYS[i].path, name, sizeof name);
            snprintf(file_var, sizeof file_var, "%s_FILE", name);
            const char *forms[] = {name, file_var};
            for (int f = 0; f < 2; f++) {
                size_t d = edit_distance(*env, n, forms[f]);
                if (d < best) {
                    best = d;
                    str_copy(nearest, sizeof nearest, forms[f]);
                }
            }
        }
        char msg[512];
        if (file_only)
            snprintf(msg, sizeof msg,
                     "environment variable %.*s: %s can be set only in the configuration file "
                     "(apps = { [\"<app_id>\"] = \"ios\" }), not from the environment",
                     (int)n, *env, file_only);
        else if (best <= 3)
            snprintf(msg, sizeof msg, "unknown environment variable %.*s (did you mean %s?)",
                     (int)n, *env, nearest);
        else
            snprintf(msg, sizeof msg,
                     "unknown environment variable %.*s: it names no key (see the README, "
                     "Configuration), and the configuration file does not read it",
                     (int)n, *env);
        /* at a reload the environment is the one checked at start: a file that
         * stopped naming a variable could otherwise never be reloaded again */
        if (use == ENV_AGAIN)
            warn_add(warnings, "%s", msg);
        else
            errs_add(e, "%s", msg);
    }
}

/* ---- defaults and checks ------------------------------------------------ */

static int set_defaults(struct config *c)
{
    c->listen = strdup("127.0.0.1:8080");
    c->data_dir = strdup("./var");
    c->rules_dir = strdup("./rules");
    c->environment = strdup("production");
    c->inbound_max_body_bytes = 16 << 20;
    c->inbound_max_events = 10000;
    c->inbound_body_memory_mb = 0; /* see check */
    c->inbound_require = strdup("either");
    c->inbound_replay_window_s = 300;
    c->http_request_timeout_s = 120;
    c->http_max_connections_per_ip = 0;
    c->mparticle_url = strdup("https://s2s.mparticle.com");
    c->mparticle_rate_limit = 270;
    c->mparticle_event_names_limit = 1000;
    for (int f = 0; f < FEED_COUNT; f++)
        c->feeds[f].rate_limit = 270;
    c->batch_linger_ms = 500;
    c->retry_base_ms = 1000;
    c->retry_max_ms = 300000;
    c->retry_max_age_s = 172800;
    c->retry_failing_s = 3600;
    c->retry_pause_ms = 120000;
    c->queue_sync = strdup("full");
    c->queue_max_depth = 5000000;
    c->queue_min_free_mb = 256;
    c->dedup_window_s = 3600;
    c->http_threads = 8;
    c->http_max_connections = 1024;
    c->http_timeout_s = 30;
    c->rules_memory_mb = 64;
    c->rules_instructions = 1000000;
    c->log_level = strdup("info");
    c->log_format = strdup("logfmt");
    if (!c->listen || !c->data_dir || !c->rules_dir || !c->environment || !c->mparticle_url ||
        !c->inbound_require || !c->queue_sync || !c->log_level || !c->log_format)
        return -1;
    return 0;
}

/* "a.b.c.d", "a.b.c.d/n", an IPv6 address, "x::y/n"; an IPv4-mapped IPv6
 * address ("::ffff:a.b.c.d", a peer on a dual-stack socket) is its IPv4 one. */
static int parse_ip_net(const char *s, struct ip_net *out)
{
    char text[INET6_ADDRSTRLEN + 8];
    if (strlen(s) >= sizeof text)
        return -1;
    str_copy(text, sizeof text, s);
    char *slash = strchr(text, '/');
    if (slash)
        *slash = '\0';
    const char *addr = text;
    if (strncasecmp(addr, "::ffff:", 7) == 0 && strchr(addr + 7, '.'))
        addr += 7;
    out->family = strchr(addr, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(out->family, addr, out->addr) != 1)
        return -1;
    int bits = out->family == AF_INET6 ? 128 : 32;
    out->prefix = bits;
    if (slash) {
        int64_t n;
        if (parse_int64(slash + 1, 0, bits, &n) != 0)
            return -1;
        out->prefix = (int)n;
    }
    return 0;
}

static int net_contains(const struct ip_net *net, const struct ip_net *a)
{
    if (net->family != a->family)
        return 0;
    int whole = net->prefix / 8, rest = net->prefix % 8;
    if (memcmp(net->addr, a->addr, (size_t)whole) != 0)
        return 0;
    unsigned char mask = (unsigned char)(0xFF << (8 - rest));
    return rest == 0 || (net->addr[whole] & mask) == (a->addr[whole] & mask);
}

int config_proxy_trusted(const struct config *c, const char *peer)
{
    if (config_host_is_loopback(peer))
        return 1;
    struct ip_net a;
    if (parse_ip_net(peer, &a) != 0)
        return 0;
    for (size_t i = 0; i < c->ntrusted_nets; i++) {
        if (net_contains(&c->trusted_nets[i], &a))
            return 1;
    }
    return 0;
}

int config_host_is_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (strcmp(host, "localhost") == 0)
        return 1;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return 0;
}

int config_listen_addr(const struct config *c, char *host, size_t hostlen, int *port)
{
    const char *s = c->listen;
    const char *colon;
    size_t hn;
    if (*s == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':')
            return -1;
        hn = (size_t)(close - s - 1);
        s++;
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon)
            return -1;
        hn = (size_t)(colon - s);
    }
    if (hn == 0 || hn >= hostlen)
        return -1;
    memcpy(host, s, hn);
    host[hn] = '\0';
    int64_t p;
    if (parse_int64(colon + 1, 0, 65535, &p) != 0)
        return -1;
    *port = (int)p;
    return 0;
}

/* The API path a URL's path ends in (trailing slashes aside), or NULL. The
 * sender appends /v2/bulkevents to the base URL: a URL that already names an
 * endpoint would be sent to .../v2/bulkevents/v2/bulkevents and only ever be
 * answered 404. */
static const char *api_path_of(const char *url)
{
    static const char *const paths[] = {MPARTICLE_BULK_PATH, "/v2/events"};
    const char *p = strstr(url, "://");
    p = p ? p + 3 : url;
    p += strcspn(p, "/?#"); /* past the authority */
    size_t n = strcspn(p, "?#");
    while (n && p[n - 1] == '/')
        n--;
    for (size_t i = 0; i < ARRAY_LEN(paths); i++) {
        size_t m = strlen(paths[i]);
        if (n >= m && strncasecmp(p + n - m, paths[i], m) == 0)
            return paths[i];
    }
    return NULL;
}

/* Whether a token is printable ASCII without spaces. */
static int token_text(const char *t)
{
    for (const char *p = t; *p; p++) {
        if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
            return 0;
    }
    return 1;
}

/* An error found in values that passed one by one, after where the keys
 * involved (key, and other unless NULL) got them: the TRIBUTARY_* variable
 * that set one, the file (and the line that sets one, when it is found) that
 * did; a key at its default adds nothing. Values are never shown here. */
static void PRINTF(4, 5)
    check_err(struct loader *ld, const char *key, const char *other, const char *fmt, ...)
{
    char msg[ERR_LEN], where[400] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *keys[] = {key, other};
    int file_named = 0;
    for (size_t i = 0; i < ARRAY_LEN(keys); i++) {
        const struct key *k = keys[i] ? find_key(keys[i]) : NULL;
        if (!k)
            continue;
        size_t at = strlen(where), j = (size_t)(k - KEYS);
        const char *sep = at ? ", " : "";
        if (ld->c->from_env[j]) {
            char name[128];
            env_name(k->path, name, sizeof name);
            snprintf(where + at, sizeof where - at, "%s%s%s", sep, name,
                     ld->c->from_env[j] == 2 ? "_FILE" : "");
            continue;
        }
        if (!ld->file || file_named)
            continue;
        if (!ld->lines[j]) {
            int found = find_line(ld->src, k->path);
            ld->lines[j] = found ? found : -1;
        }
        int line = ld->lines[j];
        if (line > 0)
            snprintf(where + at, sizeof where - at, "%s%s:%d", sep, ld->file, line);
        else if (ld->c->file_value[j] != ld->defaults[j])
            snprintf(where + at, sizeof where - at, "%s%s", sep, ld->file);
        file_named = strlen(where) > at;
    }
    if (*where)
        errs_add(ld->e, "%s: %s", where, msg);
    else
        errs_add(ld->e, "%s", msg);
}

/* A base URL such as https://s2s.mparticle.com. http:// is allowed only towards
 * loopback (test doubles, local proxies). The URL itself is not echoed: it may
 * hold a user name and password. */
static void check_url(struct loader *ld, const char *what, const char *url)
{
    if (strlen(url) > MPARTICLE_URL_MAX) {
        check_err(ld, what, NULL, "%s: longer than %d characters", what, MPARTICLE_URL_MAX);
        return;
    }
    const char *api = api_path_of(url);
    if (api)
        check_err(ld, what, NULL,
                  "%s: ends in %s, but it is the base URL (such as https://s2s.mparticle.com): "
                  "tributary appends " MPARTICLE_BULK_PATH " itself",
                  what, api);
    if (strncmp(url, "https://", 8) == 0 && url[8])
        return;
    if (strncmp(url, "http://", 7) == 0) {
        char host[256];
        const char *h = url + 7;
        size_t n;
        /* skip user:password@ of the authority */
        const char *auth_end = h + strcspn(h, "/?#");
        const char *at = memchr(h, '@', (size_t)(auth_end - h));
        if (at)
            h = at + 1;
        if (*h == '[') {
            const char *close = strchr(h, ']');
            n = close ? (size_t)(close - h - 1) : 0;
            h++;
        } else {
            n = strcspn(h, ":/");
        }
        if (n > 0 && n < sizeof host) {
            memcpy(host, h, n);
            host[n] = '\0';
            if (config_host_is_loopback(host))
                return;
        }
        check_err(ld, what, NULL,
                  "%s: plain http:// is only allowed to a loopback address; use https://", what);
        return;
    }
    check_err(ld, what, NULL, "%s: must be an https:// URL", what);
}

/* n bytes of name: UTF-8 (it is a label value in /metrics, which must be)
 * without control characters (a NUL among them is one) */
static int workspace_name_ok(const char *name, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)name[i];
        if (b < 0x20 || b == 0x7f)
            return 0;
    }
    return n > 0 && n <= CONFIG_WORKSPACE_MAX && utf8_valid(name, n);
}

const char *config_workspace_problem(const struct config *c, const char *name, size_t len)
{
    if (!name || len == 0)
        return c->inbound_workspaces.n ? "none given, and inbound.workspaces lists the names taken"
                                       : NULL;
    if (!workspace_name_ok(name, len))
        return "not a workspace name (UTF-8, at most 128 bytes, no control characters)";
    /* (len is strlen(name): it has no NUL) */
    if (c->inbound_workspaces.n == 0 || list_has(&c->inbound_workspaces, name))
        return NULL;
    return "not one of inbound.workspaces";
}

/* serving: also what only `serve` needs (how requests are authenticated for
 * the address it listens on); the other commands read data_dir and rules_dir
 * with the service's file, where the inbound secrets may come from an
 * environment they do not have. */
static void check(struct loader *ld, int serving)
{
    struct config *c = ld->c;
    struct errs *e = ld->e;
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        const struct key *k = &KEYS[i];
        if ((k->type == K_STR || k->type == K_ENUM) && !optional(k) && !**str_field(c, k))
            check_err(ld, k->path, NULL, "%s must not be empty", k->path);
    }
    if (e->count)
        return;
    char host[256];
    int port;
    if (config_listen_addr(c, host, sizeof host, &port) != 0)
        check_err(ld, "listen", NULL, "listen: must be HOST:PORT (127.0.0.1:8080, [::1]:8080)");
    else if (serving && !config_host_is_loopback(host) && c->inbound_tokens.n == 0 &&
             c->inbound_hmac_secrets.n == 0)
        check_err(ld, "listen", NULL,
                  "listen: refusing to listen on non-loopback address %s without "
                  "inbound.tokens (TRIBUTARY_INBOUND_TOKENS) or inbound.hmac_secrets",
                  host);
    const char *req = c->inbound_require;
    if (serving && (strcmp(req, "token") == 0 || strcmp(req, "both") == 0) &&
        c->inbound_tokens.n == 0)
        check_err(ld, "inbound.require", NULL, "inbound.require = \"%s\" needs inbound.tokens",
                  req);
    if (serving && (strcmp(req, "signature") == 0 || strcmp(req, "both") == 0) &&
        c->inbound_hmac_secrets.n == 0)
        check_err(ld, "inbound.require", NULL,
                  "inbound.require = \"%s\" needs inbound.hmac_secrets", req);
    /* Braze does not split a batch answered 503: one that could never fit
     * would be retried for days */
    if (c->queue_max_depth < c->inbound_max_events)
        check_err(ld, "queue.max_depth", "inbound.max_events",
                  "queue.max_depth (%lld) must be at least inbound.max_events (%lld): a request "
                  "that large could never be queued",
                  (long long)c->queue_max_depth, (long long)c->inbound_max_events);
    /* room for the largest body besides one awaiting its signature check,
     * which never takes that room (a 503 busy is retried as it is, unsplit);
     * unset, 256 MiB or two such bodies */
    int64_t two_bodies_mb = ((c->inbound_max_body_bytes * 2) + (1 << 20) - 1) >> 20;
    if (c->inbound_body_memory_mb == 0)
        c->inbound_body_memory_mb = two_bodies_mb > 256 ? two_bodies_mb : 256;
    if ((c->inbound_body_memory_mb << 20) / 2 < c->inbound_max_body_bytes)
        check_err(ld, "inbound.body_memory_mb", "inbound.max_body_bytes",
                  "inbound.body_memory_mb (%lld) must hold two bodies of inbound.max_body_bytes "
                  "(%lld): the largest request, and as much besides for the others",
                  (long long)c->inbound_body_memory_mb, (long long)c->inbound_max_body_bytes);
    free(c->trusted_nets);
    c->ntrusted_nets = 0;
    c->trusted_nets = calloc(c->http_trusted_proxies.n + 1, sizeof(*c->trusted_nets));
    if (!c->trusted_nets)
        errs_add(e, "out of memory");
    for (size_t i = 0; c->trusted_nets && i < c->http_trusted_proxies.n; i++) {
        const char *a = c->http_trusted_proxies.items[i];
        if (parse_ip_net(a, &c->trusted_nets[c->ntrusted_nets]) == 0)
            c->ntrusted_nets++;
        else
            check_err(ld, "http.trusted_proxies", NULL,
                      "http.trusted_proxies: item %zu is not an IP address or CIDR network", i + 1);
    }
    /* files the service reads later, found missing now rather than at the first
     * TLS handshake */
    const char *files[] = {"mparticle.ca_bundle",
                           c->mparticle_ca_bundle,
                           "tls.cert",
                           c->tls_cert,
                           "tls.key",
                           c->tls_key};
    int unreadable = 0;
    for (size_t i = 0; serving && i < ARRAY_LEN(files); i += 2) {
        int fd = files[i + 1] && *files[i + 1] ? open(files[i + 1], O_RDONLY | O_CLOEXEC) : -2;
        struct stat st;
        if (fd == -1)
            check_err(ld, files[i], NULL, "%s: cannot read %s: %s", files[i], files[i + 1],
                      strerror(errno));
        else if (fd >= 0 && files[i + 1] == c->tls_key && fstat(fd, &st) == 0 && (st.st_mode & 077))
            check_err(ld, "tls.key", NULL,
                      "tls.key: %s must not be readable by group or others (chmod 600)",
                      files[i + 1]);
        unreadable |= fd == -1;
        if (fd >= 0)
            close(fd);
    }
    if (!c->tls_cert != !c->tls_key)
        check_err(ld, c->tls_cert ? "tls.cert" : "tls.key", NULL,
                  "tls: cert and key must be set together (only the %s is set)",
                  c->tls_cert ? "cert" : "key");
    /* what they hold, as the listener and curl will read it: a certificate
     * and its key, trusted certificates */
    char pem_err[512];
    if (serving && !unreadable && c->tls_cert && c->tls_key &&
        tls_check_pair(c->tls_cert, c->tls_key, 0, pem_err, sizeof pem_err) != 0)
        check_err(ld, "tls.cert", "tls.key", "%s", pem_err);
    if (serving && !unreadable && c->mparticle_ca_bundle && *c->mparticle_ca_bundle &&
        tls_check_ca_bundle(c->mparticle_ca_bundle, pem_err, sizeof pem_err) != 0)
        check_err(ld, "mparticle.ca_bundle", NULL, "%s", pem_err);
    check_url(ld, "mparticle.url", c->mparticle_url);
    for (int f = 0; f < FEED_COUNT; f++) {
        struct feed_config *fc = &c->feeds[f];
        char key[64], secret[64];
        snprintf(key, sizeof key, "feeds.%s.key", FEED_NAMES[f]);
        snprintf(secret, sizeof secret, "feeds.%s.secret", FEED_NAMES[f]);
        if (!fc->key != !fc->secret)
            check_err(ld, fc->key ? key : secret, NULL,
                      "feeds.%s: key and secret must be set together (only the %s is set)",
                      FEED_NAMES[f], fc->key ? "key" : "secret");
        const char *parts[] = {fc->key, fc->secret}, *names[] = {"key", "secret"};
        const char *paths[] = {key, secret};
        for (int i = 0; i < 2; i++) {
            if (!parts[i])
                continue;
            if (strlen(parts[i]) > MPARTICLE_MAX_CREDENTIAL_CHARS)
                check_err(ld, paths[i], NULL,
                          "feeds.%s.%s: longer than %d characters (mParticle's are far shorter)",
                          FEED_NAMES[f], names[i], MPARTICLE_MAX_CREDENTIAL_CHARS);
            /* sent as they are in Basic auth: a line end copied with one
             * would make mParticle refuse the feed at its first send */
            if (!token_text(parts[i]))
                check_err(ld, paths[i], NULL,
                          "feeds.%s.%s contains a space, a control character or a byte that is "
                          "not ASCII (mParticle's have none)",
                          FEED_NAMES[f], names[i]);
            else if (i == 0 && strchr(parts[i], ':'))
                check_err(ld, paths[i], NULL,
                          "feeds.%s.key contains ':', which Basic auth cannot carry in a user name",
                          FEED_NAMES[f]);
        }
        if (fc->url) {
            char what[64];
            snprintf(what, sizeof what, "feeds.%s.url", FEED_NAMES[f]);
            check_url(ld, what, fc->url);
        }
    }
    if (c->retry_base_ms > c->retry_max_ms)
        check_err(ld, "retry.base_ms", "retry.max_ms",
                  "retry.base_ms (%lld) must not exceed retry.max_ms (%lld)",
                  (long long)c->retry_base_ms, (long long)c->retry_max_ms);
    for (size_t i = 0; i < c->inbound_workspaces.n; i++) {
        const char *w = c->inbound_workspaces.items[i];
        if (!workspace_name_ok(w, strlen(w)))
            check_err(ld, "inbound.workspaces", NULL,
                      "inbound.workspaces: item %zu is not a workspace name (UTF-8, 1 to %d "
                      "bytes, no control characters)",
                      i + 1, CONFIG_WORKSPACE_MAX);
    }
    /* a bearer token is read without the spaces around it: one with a space
     * or a control character in it could never be presented */
    for (size_t i = 0; i < c->inbound_tokens.n; i++) {
        if (!token_text(c->inbound_tokens.items[i]))
            check_err(ld, "inbound.tokens", NULL,
                      "inbound.tokens: token %zu contains a space or control character", i + 1);
    }
    if (c->admin_token && !token_text(c->admin_token))
        check_err(ld, "admin.token", NULL, "admin.token contains a space or control character");
    if (c->metrics_token && !token_text(c->metrics_token))
        check_err(ld, "metrics.token", NULL, "metrics.token contains a space or control character");
}

/* Inbound secrets shorter than this are named in a warning at start: one that
 * short can be guessed, and nothing else stands against guessing from an
 * address shared with a real sender (see auth_failed). */
#define SHORT_SECRET_CHARS 16

static void warn_short(buf *warnings, const char *key, const char *what, char *const *items,
                       size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(items[i]);
        if (len < SHORT_SECRET_CHARS)
            warn_add(warnings,
                     "%s: %s %zu has %zu characters; one that short can be guessed (use openssl "
                     "rand -base64 32)",
                     key, what, i + 1, len);
    }
}

/* Serving TLS itself on an address others reach, the service has no proxy in
 * front to keep /metrics internal: it answers whoever reaches the port. */
static void warn_open_metrics(buf *warnings, const struct config *c)
{
    char host[256];
    int port;
    if (c->metrics_token || !c->tls_cert || config_listen_addr(c, host, sizeof host, &port) != 0 ||
        config_host_is_loopback(host))
        return;
    warn_add(warnings,
             "GET /metrics answers anyone who reaches %s: with TLS served here, no proxy "
             "keeps it internal; set metrics.token (TRIBUTARY_METRICS_TOKEN) or limit "
             "the port to your network",
             c->listen);
}

/* Whether the file (its text) holds the value of secret key k itself, not
 * read from the environment (os.getenv). */
static int file_holds_secret(struct config *c, const struct key *k, const char *text)
{
    if (k->type == K_SECRET) {
        const char *v = *str_field(c, k);
        return v && *v && strstr(text, v);
    }
    const struct string_list *l = list_field(c, k);
    for (size_t i = 0; i < l->n; i++) {
        if (*l->items[i] && strstr(text, l->items[i]))
            return 1;
    }
    return 0;
}

/* What makes a file of secrets (st) that every user can read the service's
 * alone, without locking the service out: chmod 600 only for the file of its
 * own user; a file of another owner (root's, most often) goes to the service's
 * group, mode 640. Root, who may be checking for a service of its own user,
 * is given both. */
static void private_file_advice(const struct stat *st, char *out, size_t n)
{
    if (geteuid() == 0) {
        /* root checking (`tributary check`) for a service that may run as
         * a user of its own */
        if (st->st_uid == 0)
            snprintf(out, n,
                     "chmod 600 it if the service runs as root; for a service of its own "
                     "user, give it that user's group (chgrp) and chmod 640 it");
        else
            snprintf(out, n,
                     "chmod 600 it if uid %u is the service's user; else give it the service's "
                     "group (chgrp) and chmod 640 it",
                     (unsigned)st->st_uid);
        return;
    }
    if (st->st_uid == geteuid()) {
        snprintf(out, n, "chmod 600 it");
        return;
    }
    char group[64], room[1024];
    struct group g, *found = NULL;
    if (getgrgid_r(getegid(), &g, room, sizeof room, &found) == 0 && found &&
        strlen(found->gr_name) < sizeof group)
        snprintf(group, sizeof group, "%s", found->gr_name);
    else
        snprintf(group, sizeof group, "%u", (unsigned)getegid());
    snprintf(out, n,
             "chgrp %s it and chmod 640 it (it belongs to uid %u, not to the service's user, uid "
             "%u: with 600 the service could not read it), or chown it to the service's user and "
             "chmod 600 it",
             group, (unsigned)st->st_uid, (unsigned)geteuid());
}

/* Secrets in a file that every user of this machine can read: the
 * configuration file (text is its content) holding them, or a
 * TRIBUTARY_<KEY>_FILE. A warning, not an error as for the TLS key: a volume
 * of secrets mounted 0644 (Kubernetes' default) is read only inside its
 * container. */
static void warn_readable_secrets(buf *warnings, struct config *c, const char *text)
{
    char in_file[512] = ""; /* room for every secret key's name */
    size_t at = 0;
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        const struct key *k = &KEYS[i];
        if (k->type != K_SECRET && k->type != K_SECRET_LIST)
            continue;
        if (c->from_env[i] == 2) {
            char name[128], file_var[140];
            env_name(k->path, name, sizeof name);
            snprintf(file_var, sizeof file_var, "%s_FILE", name);
            const char *path = getenv(file_var);
            struct stat st;
            if (path && stat(path, &st) == 0 && (st.st_mode & S_IROTH)) {
                char advice[300];
                private_file_advice(&st, advice, sizeof advice);
                warn_add(warnings,
                         "%s names %s, which every user of this machine can read (mode %04o): %s",
                         file_var, path, (unsigned)(st.st_mode & 07777), advice);
            }
        }
        /* in the file: the secret in force, or one the environment overrides */
        if (c->overridden[i] || (!c->from_env[i] && text && file_holds_secret(c, k, text))) {
            int w = snprintf(in_file + at, sizeof in_file - at, "%s%s", at ? ", " : "", k->path);
            if (w > 0 && (size_t)w < sizeof in_file - at)
                at += (size_t)w;
        }
    }
    struct stat st;
    if (at > 0 && c->file && stat(c->file, &st) == 0 && (st.st_mode & S_IROTH)) {
        char advice[300];
        private_file_advice(&st, advice, sizeof advice);
        warn_add(warnings,
                 "%s holds secrets (%s) and every user of this machine can read it (mode %04o): "
                 "%s; or give them in the environment",
                 c->file, in_file, (unsigned)(st.st_mode & 07777), advice);
    }
}

/* The data pod of an mParticle key ("us2-..."), or of an mParticle S2S URL
 * (https://s2s.mparticle.com is US1's; its host in *hostp, *hostlen),
 * lower-case in pod; 0 when it names none. */
static int key_pod(const char *key, char pod[4])
{
    if (!isalpha((unsigned char)key[0]) || !isalpha((unsigned char)key[1]) ||
        !isdigit((unsigned char)key[2]) || key[3] != '-')
        return 0;
    for (int i = 0; i < 3; i++)
        pod[i] = (char)tolower((unsigned char)key[i]);
    pod[3] = '\0';
    return 1;
}

static int url_pod(const char *url, char pod[4], const char **hostp, int *hostlen)
{
    const char *host = strstr(url, "://");
    host = host ? host + 3 : url;
    size_t n = strcspn(host, ":/?#");
    *hostp = host;
    *hostlen = (int)n;
    static const char S2S[] = "s2s.", DOMAIN[] = ".mparticle.com";
    if (n == strlen("s2s.mparticle.com") && strncasecmp(host, "s2s.mparticle.com", n) == 0) {
        memcpy(pod, "us1", 4);
        return 1;
    }
    if (n != strlen(S2S) + 3 + strlen(DOMAIN) || strncasecmp(host, S2S, strlen(S2S)) != 0 ||
        strncasecmp(host + strlen(S2S) + 3, DOMAIN, strlen(DOMAIN)) != 0)
        return 0;
    for (int i = 0; i < 3; i++)
        pod[i] = (char)tolower((unsigned char)host[strlen(S2S) + (size_t)i]);
    pod[3] = '\0';
    return 1;
}

/* A feed whose key names a data pod that its URL is not of: mParticle refuses
 * the key there (401/403, and the feed pauses). Said without the key. */
static void warn_pods(buf *warnings, const struct config *c)
{
    for (int f = 0; f < FEED_COUNT; f++) {
        const char *key = c->feeds[f].key;
        const char *url = config_feed_url(c, (enum feed)f);
        char kp[4], up[4];
        const char *host;
        int hn;
        if (key && url && key_pod(key, kp) && url_pod(url, up, &host, &hn) && strcmp(kp, up) != 0)
            warn_add(warnings,
                     "feeds.%s.key is a key of mParticle's %s data pod, but the feed sends to "
                     "%.*s (%s), which will refuse it: set feeds.%s.url or mparticle.url to "
                     "https://s2s.%s.mparticle.com",
                     FEED_NAMES[f], kp, hn, host, up, FEED_NAMES[f], kp);
    }
}

/* ---- public ------------------------------------------------------------- */

static int load(struct config **out, const char *path, const char *src, size_t len,
                enum env_use env, int serving, char *err, size_t errlen)
{
    *out = NULL;
    struct errs e = {0};
    buf_init(&e.b, 16 * 1024);
    buf warnings;
    buf_init(&warnings, 16 * 1024);

    struct config *c = calloc(1, sizeof(*c));
    if (!c || set_defaults(c) != 0) {
        str_copy(err, errlen, "out of memory");
        config_unref(c);
        buf_free(&e.b);
        buf_free(&warnings);
        return -1;
    }
    atomic_store(&c->refs, 1);
    uint64_t defaults[ARRAY_LEN(KEYS)];
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++)
        defaults[i] = fingerprint(c, &KEYS[i]);

    struct string_list env_read = {0}, env_unset = {0};
    char *text = NULL; /* the file's, kept for the lines the checks name */
    if (src) {
        load_source(c, path, src, len, &e, &env_read, &env_unset);
    } else {
        struct stat st;
        if (!path && stat(CONFIG_DEFAULT_FILE, &st) == 0)
            path = CONFIG_DEFAULT_FILE;
        if (path) {
            c->file = strdup(path);
            text = read_file(path, &len, &e);
            if (text)
                load_source(c, path, text, len, &e, &env_read, &env_unset);
            src = text;
        }
    }
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++)
        c->file_value[i] = fingerprint(c, &KEYS[i]);
    if (e.count == 0 && env)
        load_env(c, defaults, &e, &warnings, &env_read, env);
    list_free(&env_read);
    struct loader ld = {.c = c, .e = &e, .file = path, .src = src, .defaults = defaults};
    if (e.count == 0)
        check(&ld, serving);
    if (e.count == 0)
        warn_pods(&warnings, c);
    if (e.count == 0 && serving) {
        warn_short(&warnings, "inbound.tokens", "token", c->inbound_tokens.items,
                   c->inbound_tokens.n);
        warn_short(&warnings, "inbound.hmac_secrets", "secret", c->inbound_hmac_secrets.items,
                   c->inbound_hmac_secrets.n);
        if (c->admin_token)
            warn_short(&warnings, "admin.token", "token", &c->admin_token, 1);
        if (c->metrics_token)
            warn_short(&warnings, "metrics.token", "token", &c->metrics_token, 1);
        warn_open_metrics(&warnings, c);
        warn_readable_secrets(&warnings, c, src);
        /* os.getenv of a variable not set gives nil, which is a key not
         * given: a token so read leaves its endpoint open without a word */
        for (size_t i = 0; i < env_unset.n; i++)
            warn_add(&warnings,
                     "the configuration file gives os.getenv(\"%s\") as a value, and %s is "
                     "not set: the file gives no value there",
                     env_unset.items[i], env_unset.items[i]);
        /* the room of signed bodies from senders served before, which
         * clients that never finish theirs cannot take (see http_in.h);
         * only a signature reads a body before authentication */
        size_t unknown, trusted;
        http_in_pool_budgets((size_t)c->inbound_body_memory_mb << 20,
                             (size_t)c->inbound_max_body_bytes, &unknown, &trusted);
        long long room_mb = (long long)(2 * UNAUTHENTICATED_BODY_BUDGET >> 20) +
                            (c->inbound_max_body_bytes + (1 << 20) - 1) / (1 << 20);
        if (c->inbound_hmac_secrets.n > 0 && strcmp(c->inbound_require, "token") != 0 &&
            trusted == 0)
            warn_add(&warnings,
                     "inbound.body_memory_mb (%lld) leaves signed requests from senders served "
                     "before no room of their own: clients that never finish a body can hold "
                     "them out; %lld or more gives it (see README, Bounds)",
                     (long long)c->inbound_body_memory_mb, room_mb);
        /* a signed request is good for the replay window, and only the dedup
         * window keeps a replay of it from being delivered again */
        if (c->inbound_hmac_secrets.n > 0 && c->dedup_window_s < c->inbound_replay_window_s)
            warn_add(&warnings,
                     "dedup.window_s (%lld) is shorter than inbound.replay_window_s (%lld): a "
                     "signed request replayed between the two is delivered again",
                     (long long)c->dedup_window_s, (long long)c->inbound_replay_window_s);
        /* sending and acknowledging fill the WAL up to its limit before a
         * checkpoint copies it back, and a full disk stops that copy */
        if (c->queue_min_free_mb > 0 && c->queue_min_free_mb < MIN_FREE_SAFE_MB)
            warn_add(&warnings,
                     "queue.min_free_mb (%lld) leaves the queue little room to drain on a nearly "
                     "full disk: its WAL grows to %lld MiB before it is copied into queue.db; %d "
                     "or more is safe",
                     (long long)c->queue_min_free_mb, (long long)(QUEUE_WAL_MAX_BYTES >> 20),
                     MIN_FREE_SAFE_MB);
    }
    list_free(&env_unset);

    free(text);
    if (e.count) {
        str_copy(err, errlen, e.b.data ? e.b.data : "invalid configuration");
        buf_free(&e.b);
        buf_free(&warnings);
        config_unref(c);
        return -1;
    }
    buf_free(&e.b);
    c->warnings = warnings.len ? buf_take(&warnings) : NULL;
    buf_free(&warnings);
    *out = c;
    return 0;
}

int config_load(struct config **out, const char *path, char *err, size_t errlen)
{
    return load(out, path, NULL, 0, ENV_FIRST, 1, err, errlen);
}

int config_load_again(struct config **out, const char *path, char *err, size_t errlen)
{
    return load(out, path, NULL, 0, ENV_AGAIN, 1, err, errlen);
}

struct config *config_load_for_command(const char *path, int serving)
{
    char err[4096];
    struct config *c = NULL;
    if (load(&c, path, NULL, 0, ENV_FIRST, serving, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return NULL;
    }
    log_print_warnings(c->warnings);
    return c;
}

int config_load_source(struct config **out, const char *name, const char *src, size_t len,
                       char *err, size_t errlen)
{
    /* the loader's line finder reads up to a NUL, as in a file read whole */
    char *copy = malloc(len + 1);
    if (!copy) {
        str_copy(err, errlen, "out of memory");
        *out = NULL;
        return -1;
    }
    memcpy(copy, src, len);
    copy[len] = '\0';
    int rc = load(out, name, copy, len, ENV_NONE, 1, err, errlen);
    free(copy);
    return rc;
}

size_t config_shadowed_changes(const struct config *old, const struct config *neu, char *out,
                               size_t outlen)
{
    size_t n = 0, at = 0;
    if (outlen)
        out[0] = '\0';
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        if (!neu->overridden[i] || old->file_value[i] == neu->file_value[i])
            continue;
        int w = snprintf(out + at, outlen - at, "%s%s", n ? "," : "", KEYS[i].path);
        if (w > 0 && (size_t)w < outlen - at)
            at += (size_t)w;
        n++;
    }
    return n;
}

struct config *config_ref(struct config *c)
{
    if (c)
        atomic_fetch_add(&c->refs, 1);
    return c;
}

void config_unref(struct config *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) > 1)
        return;
    for (size_t i = 0; i < ARRAY_LEN(KEYS); i++) {
        const struct key *k = &KEYS[i];
        if (k->type == K_STR || k->type == K_SECRET || k->type == K_ENUM)
            free(*str_field(c, k));
        else if (k->type == K_LIST || k->type == K_SECRET_LIST)
            list_free(list_field(c, k));
    }
    apps_free(c);
    free(c->trusted_nets);
    free(c->file);
    free(c->warnings);
    free(c);
}

int config_feed_ready(const struct config *c, enum feed f)
{
    return c->feeds[f].key != NULL && c->feeds[f].secret != NULL;
}

const char *config_feed_url(const struct config *c, enum feed f)
{
    return c->feeds[f].url ? c->feeds[f].url : c->mparticle_url;
}
