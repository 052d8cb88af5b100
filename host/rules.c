#include "rules.h"

#include "attributes.h"
#include "digest.h"
#include "log.h"
#include "metrics.h"
#include "mparticle.h"
#include "sandbox.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua-cjson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Batch keys the sender owns; rules cannot set them. */
static const char *const HOST_BATCH_KEYS[] = {"events", "source_request_id", "schema_version",
                                              "batch_id"};

/* ---- ruleset ------------------------------------------------------------ */

struct rule_file {
    char *name; /* path as shown in messages: rules_dir/file.lua */
    char *src;
    size_t len;
};

struct ruleset {
    _Atomic int refs;
    struct config *cfg;
    struct rule_file *files;
    size_t nfiles;
    char version[17];
};

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n > m && strcmp(s + n - m, suffix) == 0;
}

/* name in the directory open as dirfd; path is how messages show it. */
static char *slurp(int dirfd, const char *name, const char *path, size_t max, size_t *len,
                   char *err, size_t errlen)
{
    int opened;
    char *src = read_at(dirfd, name, max, len, &opened);
    if (!src && !opened)
        str_printf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    else if (!src && errno == EFBIG)
        str_printf(err, errlen, "%s: file larger than %zu KiB", path, max >> 10);
    else if (!src)
        str_printf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
    return src;
}

/* The version covers the rule files and every configuration value rules can
 * read, so two events with the same version were mapped the same way. */
static void compute_version(ruleset *rs)
{
    uint64_t h = DIGEST_FNV64_INIT;
    for (size_t i = 0; i < rs->nfiles; i++) {
        const char *base = strrchr(rs->files[i].name, '/');
        base = base ? base + 1 : rs->files[i].name;
        h = digest_fnv64(h, base, strlen(base) + 1);
        h = digest_fnv64(h, rs->files[i].src, rs->files[i].len);
        h = digest_fnv64(h, "\0", 1);
    }
    struct config *c = rs->cfg;
    h = digest_fnv64(h, c->environment, strlen(c->environment) + 1);
    for (size_t i = 0; i < c->events.n; i++)
        h = digest_fnv64(h, c->events.items[i], strlen(c->events.items[i]) + 1);
    uint64_t apps = 0; /* order-independent */
    for (size_t i = 0; i < c->napps; i++) {
        uint64_t a = digest_fnv64(DIGEST_FNV64_INIT, c->apps[i].app_id, strlen(c->apps[i].app_id));
        apps += digest_fnv64(a, &c->apps[i].feed, sizeof c->apps[i].feed);
    }
    h = digest_fnv64(h, &apps, sizeof apps);
    for (int f = 0; f < FEED_COUNT; f++) {
        char ready = (char)config_feed_ready(c, (enum feed)f);
        h = digest_fnv64(h, &ready, 1);
    }
    snprintf(rs->version, sizeof rs->version, "%012llx",
             (unsigned long long)(h & 0xffffffffffffULL));
}

int ruleset_load(ruleset **out, struct config *cfg, char *err, size_t errlen)
{
    *out = NULL;
    int rc = -1;
    char **names = NULL;
    size_t nnames = 0;
    int dirfd = -1;
    ruleset *rs = calloc(1, sizeof(*rs));
    if (!rs) {
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    atomic_store(&rs->refs, 1);
    rs->cfg = config_ref(cfg);

    /* Every file is read through one descriptor of the directory: a rules_dir
     * that is a link switched to a new version's directory meanwhile (as the
     * README advises for a change to several files) gives the files of one
     * version or of the other, never some of each. */
    dirfd = open(cfg->rules_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int listfd = dirfd >= 0 ? dup(dirfd) : -1;
    DIR *d = listfd >= 0 ? fdopendir(listfd) : NULL;
    if (!d) {
        int e = errno;
        char cwd[PATH_MAX];
        /* the default, ./rules, is found from where the command runs */
        if (cfg->rules_dir[0] != '/' && getcwd(cwd, sizeof cwd))
            str_printf(err, errlen, "rules_dir %s (in %s): %s", cfg->rules_dir, cwd, strerror(e));
        else
            str_printf(err, errlen, "rules_dir %s: %s", cfg->rules_dir, strerror(e));
        if (listfd >= 0)
            close(listfd);
        goto done;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || !has_suffix(de->d_name, ".lua"))
            continue;
        if (nnames == RULES_MAX_FILES) {
            str_printf(err, errlen, "rules_dir %s: more than %d rule files", cfg->rules_dir,
                       RULES_MAX_FILES);
            closedir(d);
            goto done;
        }
        char **n2 = realloc(names, (nnames + 1) * sizeof(*names));
        if (!n2 || !(n2[nnames] = strdup(de->d_name))) {
            names = n2 ? n2 : names;
            str_copy(err, errlen, "out of memory");
            closedir(d);
            goto done;
        }
        names = n2;
        nnames++;
    }
    closedir(d);
    if (nnames == 0) {
        str_printf(err, errlen, "rules_dir %s: no rule files (*.lua)", cfg->rules_dir);
        goto done;
    }
    qsort(names, nnames, sizeof(*names), cmp_names);

    rs->files = calloc(nnames, sizeof(*rs->files));
    if (!rs->files) {
        str_copy(err, errlen, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < nnames; i++) {
        size_t n = strlen(cfg->rules_dir) + strlen(names[i]) + 2;
        char *path = malloc(n);
        if (!path) {
            str_copy(err, errlen, "out of memory");
            goto done;
        }
        snprintf(path, n, "%s/%s", cfg->rules_dir, names[i]);
        /* a directory named *.lua is not a rule; a rule file that cannot be read
         * (a dangling link) refuses the set, as leaving it out could forward
         * what it would have dropped */
        struct stat st;
        int st_rc = fstatat(dirfd, names[i], &st, 0);
        if (st_rc == 0 && S_ISDIR(st.st_mode)) {
            free(path);
            continue;
        }
        if (st_rc != 0 || !S_ISREG(st.st_mode)) {
            str_printf(err, errlen, "%s: cannot read: %s", path,
                       st_rc != 0 ? strerror(errno) : "not a regular file");
            free(path);
            goto done;
        }
        struct rule_file *f = &rs->files[rs->nfiles];
        f->name = path;
        f->src = slurp(dirfd, names[i], path, RULES_MAX_FILE_BYTES, &f->len, err, errlen);
        if (!f->src) {
            free(path);
            f->name = NULL;
            goto done;
        }
        rs->nfiles++;
    }
    if (rs->nfiles == 0) {
        str_printf(err, errlen, "rules_dir %s: no rule files (*.lua)", cfg->rules_dir);
        goto done;
    }
    compute_version(rs);
    *out = rs;
    rs = NULL;
    rc = 0;
done:
    if (dirfd >= 0)
        close(dirfd);
    for (size_t i = 0; i < nnames; i++)
        free(names[i]);
    free(names);
    ruleset_unref(rs);
    return rc;
}

ruleset *ruleset_ref(ruleset *rs)
{
    if (rs)
        atomic_fetch_add(&rs->refs, 1);
    return rs;
}

void ruleset_unref(ruleset *rs)
{
    if (!rs || atomic_fetch_sub(&rs->refs, 1) > 1)
        return;
    for (size_t i = 0; i < rs->nfiles; i++) {
        free(rs->files[i].name);
        free(rs->files[i].src);
    }
    free(rs->files);
    config_unref(rs->cfg);
    free(rs);
}

const char *ruleset_version(const ruleset *rs)
{
    return rs->version;
}

struct config *ruleset_config(const ruleset *rs)
{
    return rs->cfg;
}

size_t ruleset_files(const ruleset *rs)
{
    return rs->nfiles;
}

const char *ruleset_file_name(const ruleset *rs, size_t i)
{
    return rs->files[i].name;
}

/* ---- engine ------------------------------------------------------------- */

/* [-0, +1] Pushes t[name] without metamethods: rules may return tables with
 * metatables, and host code must never run script code outside sandbox_call. */
static int rawfield(lua_State *L, int idx, const char *name)
{
    idx = lua_absindex(L, idx);
    lua_pushstring(L, name);
    return lua_rawget(L, idx);
}

struct rules {
    ruleset *rs;
    sandbox *sb;
    int *process_refs; /* one per file */
    int *tests_refs;   /* LUA_NOREF when the file has no tests */
    size_t n;
    int decode_ref;
    int tributary_ref; /* the table behind the read-only `tributary` global */
    int absent_ref;    /* tributary.absent, the "must be missing" marker in tests */
    struct sandbox_limits limits;
    size_t memory_cap; /* state memory between requests before a rebuild: what the
                          top levels left, plus rules.memory_mb */
    size_t ceiling;    /* what the state may hold while the events of a request run
                          (see begin_events) */
    int testing;       /* running rule tests: tributary.count counts nothing */
    /* tests whose events the files after theirs send to the dead-letter
     * store (see after_files_keep), and the first of them */
    int dead_after;
    char dead_after_first[ERR_LEN];
    /* tests whose events the service would refuse (see check_event), and the
     * first of them */
    int refused;
    char refused_first[ERR_LEN];
    int uncounted; /* nor for events mapped again (rules_uncounted) */
    buf scratch;
    buf encoded; /* cjson.encode's text while a rule calls it */
    /* see rules_tests_cancelled_by */
    const atomic_int *cancel;
};

/* The view of the configuration that rules read through `tributary`. */
struct rule_context {
    const char *environment;
    int feeds[FEED_COUNT];
};

static int tributary_count(lua_State *L)
{
    size_t n;
    const char *name = luaL_checklstring(L, 1, &n);
    lua_Integer by = luaL_optinteger(L, 2, 1);
    luaL_argcheck(L, n > 0 && n <= 32, 1, "counter names have 1 to 32 characters");
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        luaL_argcheck(L, (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_', 1,
                      "counter names use a-z, 0-9 and _");
    }
    luaL_argcheck(L, by >= 0, 2, "must not be negative");
    const rules *r = lua_touserdata(L, lua_upvalueindex(1));
    if (!r->testing && !r->uncounted)
        metrics_rule_count(name, (uint64_t)by);
    return 0;
}

/* [-0, +0] Fills the `tributary` table from the configuration, with `over` (a
 * test's `config` table at stack index `over`, or 0) taking precedence. */
static void set_context(rules *r, lua_State *L, int over)
{
    struct config *c = r->rs->cfg;
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->tributary_ref); /* T */
    int T = lua_gettop(L);

    lua_pushstring(L, ruleset_version(r->rs));
    lua_setfield(L, T, "version");

    if (over && rawfield(L, over, "environment") == LUA_TSTRING) {
        lua_setfield(L, T, "environment");
    } else {
        if (over)
            lua_pop(L, 1);
        lua_pushstring(L, c->environment);
        lua_setfield(L, T, "environment");
    }

    if (over && rawfield(L, over, "apps") == LUA_TTABLE) {
        sandbox_readonly(L);
    } else {
        if (over)
            lua_pop(L, 1);
        lua_createtable(L, 0, (int)c->napps);
        for (size_t i = 0; i < c->napps; i++) {
            lua_pushstring(L, FEED_NAMES[c->apps[i].feed]);
            lua_setfield(L, -2, c->apps[i].app_id);
        }
        sandbox_readonly(L);
    }
    lua_setfield(L, T, "apps");

    if (over && rawfield(L, over, "events") == LUA_TTABLE) {
        /* a list of names in tests, a set for rules */
        lua_newtable(L);
        lua_Integer len = (lua_Integer)lua_rawlen(L, -2);
        for (lua_Integer i = 1; i <= len; i++) {
            lua_rawgeti(L, -2, i);
            lua_pushboolean(L, 1);
            lua_settable(L, -3);
        }
        lua_remove(L, -2);
        sandbox_readonly(L);
    } else {
        if (over)
            lua_pop(L, 1);
        if (!over && c->events.n > 0) {
            lua_createtable(L, 0, (int)c->events.n);
            for (size_t i = 0; i < c->events.n; i++) {
                lua_pushboolean(L, 1);
                lua_setfield(L, -2, c->events.items[i]);
            }
            sandbox_readonly(L);
        } else {
            lua_pushnil(L);
        }
    }
    lua_setfield(L, T, "events");

    /* feeds: which have credentials; tests assume all unless they say otherwise */
    lua_createtable(L, 0, FEED_COUNT);
    for (int f = 0; f < FEED_COUNT; f++) {
        int ready = over ? 1 : config_feed_ready(c, (enum feed)f);
        if (over) {
            if (rawfield(L, over, "feeds") == LUA_TTABLE) {
                if (rawfield(L, -1, FEED_NAMES[f]) != LUA_TNIL)
                    ready = lua_toboolean(L, -1);
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
        }
        lua_pushboolean(L, ready);
        lua_setfield(L, -2, FEED_NAMES[f]);
    }
    sandbox_readonly(L);
    lua_setfield(L, T, "feeds");
    lua_pop(L, 1);
}

static int rules_encode(lua_State *L);
static int rules_attribute_text(lua_State *L);

/* cjson.decode as rules see it. lua-cjson keeps a copy of the text outside
 * Lua while it decodes, and a memory error (the rule's memory limit) unwinds
 * past its free: each such call lost the text's size for good. So a text is
 * decoded only when the rule has the memory its values can take at most (see
 * RULES_DECODE_BYTES_PER_BYTE). */
static int rules_decode(lua_State *L)
{
    size_t n = lua_type(L, 1) == LUA_TSTRING ? lua_rawlen(L, 1) : 0;
    size_t need = n > (SIZE_MAX - RULES_DECODE_BYTES_FIXED) / RULES_DECODE_BYTES_PER_BYTE
                      ? SIZE_MAX
                      : n * RULES_DECODE_BYTES_PER_BYTE + RULES_DECODE_BYTES_FIXED;
    if (sandbox_memory_left(L) < need) {
        lua_gc(L, LUA_GCCOLLECT); /* garbage counts until it is collected */
        if (sandbox_memory_left(L) < need)
            return luaL_error(L,
                              "cjson.decode: a text of %I bytes may take up to %I bytes "
                              "decoded, more than the rule has left of rules.memory_mb",
                              (lua_Integer)n,
                              (lua_Integer)(need > LUA_MAXINTEGER ? LUA_MAXINTEGER : need));
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* Runs inside lua_pcall: opens cjson and builds the `tributary` global. */
static int setup_state(lua_State *L)
{
    rules *r = lua_touserdata(L, 1);

    luaL_requiref(L, "cjson", luaopen_cjson, 0); /* cjson */
    static const struct {
        const char *fn;
        int arg;
    } settings[] = {{"decode_max_depth", RULES_MAX_JSON_DEPTH}, {"decode_invalid_numbers", 0}};
    for (size_t i = 0; i < ARRAY_LEN(settings); i++) {
        lua_getfield(L, -1, settings[i].fn);
        if (strstr(settings[i].fn, "depth"))
            lua_pushinteger(L, settings[i].arg);
        else
            lua_pushboolean(L, settings[i].arg);
        lua_call(L, 1, 0);
    }
    lua_getfield(L, -1, "decode");
    r->decode_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    /* cjson view; its encode is the host's (see write_json). Both pay for
     * their time, as the string functions do: a loop of them ran for seconds
     * past the instruction limit. */
    lua_createtable(L, 0, 3);
    lua_pushlightuserdata(L, r);
    lua_pushcclosure(L, rules_encode, 1);
    sandbox_timed(L, "cjson", "encode");
    lua_setfield(L, -2, "encode");
    lua_getfield(L, -2, "decode");
    lua_pushcclosure(L, rules_decode, 1);
    sandbox_timed(L, "cjson", "decode");
    lua_setfield(L, -2, "decode");
    lua_getfield(L, -2, "null");
    lua_setfield(L, -2, "null");
    sandbox_readonly(L);
    sandbox_expose(r->sb, "cjson");
    lua_pop(L, 1);

    lua_newtable(L); /* T */
    lua_pushlightuserdata(L, r);
    lua_pushcclosure(L, tributary_count, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "count"); /* T count */
    lua_pushlightuserdata(L, r);
    lua_pushcclosure(L, rules_attribute_text, 1);
    lua_insert(L, -2); /* T text count */
    attributes_push(L);
    sandbox_timed(L, "tributary", "custom_attributes");
    lua_setfield(L, -2, "custom_attributes");
    lua_newtable(L);
    sandbox_readonly(L);
    lua_pushvalue(L, -1);
    r->absent_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_setfield(L, -2, "absent");
    lua_pushvalue(L, -1);
    r->tributary_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    sandbox_readonly(L);
    sandbox_expose(r->sb, "tributary");
    return 0;
}

/* Whether a call met the memory limit; its message then names the setting
 * (the sandbox knows it in bytes). */
static int name_memory_limit(const rules *r, enum sandbox_rc rc, struct sandbox_error *serr)
{
    if (rc != SANDBOX_LIMIT || strncmp(serr->msg, "memory", 6) != 0)
        return 0;
    str_printf(serr->msg, sizeof serr->msg, "memory limit exceeded (rules.memory_mb: %zu MiB)",
               r->limits.memory_bytes >> 20);
    return 1;
}

/* An error raised by a rule file's code, as a dead letter or a refusal says
 * it: with the line it was raised at when the message lacks it, else the file. */
static void describe_error(char *out, size_t len, const char *fname, enum sandbox_rc rc,
                           const struct sandbox_error *serr)
{
    if (serr->where[0] && !strstr(serr->msg, serr->where))
        str_printf(out, len, "%s (at %s)", serr->msg, serr->where);
    else if (rc == SANDBOX_LIMIT || !serr->where[0])
        str_printf(out, len, "%s: %s", fname, serr->msg);
    else
        str_copy(out, len, serr->msg);
}

/* [-0, +0] 0 when every key of the table at idx is one of names; otherwise
 * says in err which key is not (and the nearest name, when one is near), after
 * `what`, and returns -1: a misspelt key would be passed over in silence, and
 * with it a test, or what a test sets. With only_near, the table may hold
 * other keys, but none a few edits from one of names (`test` for `tests`). */
#define NEAR_EDITS 2
static int known_keys(lua_State *L, int idx, const char *const *names, size_t count, int only_near,
                      const char *what, char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        size_t n = 0;
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
        int known = 0;
        for (size_t i = 0; k && i < count && !known; i++)
            known = str_eq((str){k, n}, names[i]);
        if (known || (only_near && !(k && nearest_name(k, n, names, count, NEAR_EDITS))))
            continue;
        char list[200] = "";
        for (size_t i = 0; i < count; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s`%s`",
                     i == 0           ? ""
                     : i + 1 == count ? " or "
                                      : ", ",
                     names[i]);
        const char *near = k ? nearest_name(k, n, names, count, NEAR_EDITS + 1) : NULL;
        if (!k)
            str_printf(err, errlen, "%s has a key that is a %s; its keys are %s", what,
                       luaL_typename(L, -1), list);
        else if (near)
            str_printf(err, errlen, "%s has an unknown key `%.*s` (did you mean `%s`?)", what,
                       (int)(n > 64 ? 64 : n), k, near);
        else
            str_printf(err, errlen, "%s has an unknown key `%.*s`; its keys are %s", what,
                       (int)(n > 64 ? 64 : n), k, list);
        lua_pop(L, 1);
        return -1;
    }
    return 0;
}

/* How the table at idx is shaped, read raw: a list (keys 1 to its length,
 * without a gap; an empty table too), an object (text keys only) or neither. */
enum table_shape { SHAPE_LIST, SHAPE_OBJECT, SHAPE_OTHER };

static enum table_shape table_shape(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_Integer len = (lua_Integer)lua_rawlen(L, idx), items = 0;
    int texts = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING)
            texts = 1;
        else if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1 && lua_tointeger(L, -1) <= len)
            items++;
        else
            items = -1; /* a key of neither */
        if (items < 0 || (texts && items)) {
            lua_pop(L, 1);
            return SHAPE_OTHER;
        }
    }
    if (texts)
        return SHAPE_OBJECT;
    /* a border of a list with a gap counts the items past the gap too */
    return items == len ? SHAPE_LIST : SHAPE_OTHER;
}

/* [-0, +0] 0 when the table at idx is a list of values of type `of`, else -1
 * with the first text key or other item in err, and `hint` when its keys are
 * all text (a table meant as one item, or a set). */
static int must_be_list(lua_State *L, int idx, const char *what, int of, const char *hint,
                        char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    enum table_shape shape = table_shape(L, idx);
    if (shape == SHAPE_OBJECT) {
        lua_pushnil(L);
        lua_next(L, idx);
        str_printf(err, errlen, "%s must be a list of %ss, and has a key `%.64s`%s", what,
                   lua_typename(L, of), lua_tostring(L, -2), hint);
        lua_pop(L, 2);
        return -1;
    }
    if (shape == SHAPE_OTHER) {
        str_printf(err, errlen, "%s must be a list of %ss, without gaps or other keys", what,
                   lua_typename(L, of));
        return -1;
    }
    lua_Integer len = (lua_Integer)lua_rawlen(L, idx);
    for (lua_Integer i = 1; i <= len; i++) {
        int t = lua_rawgeti(L, idx, i);
        lua_pop(L, 1);
        if (t != of) {
            str_printf(err, errlen, "%s must be a list of %ss, and item %lld is a %s", what,
                       lua_typename(L, of), (long long)i, lua_typename(L, t));
            return -1;
        }
    }
    return 0;
}

static const char *const FILE_KEYS[] = {"process", "tests"};
static const char *const TEST_KEYS[] = {"name",        "event",     "expect",
                                        "expect_drop", "workspace", "config"};
static const char *const TEST_CONFIG_KEYS[] = {"apps", "feeds", "events", "environment"};

/* A test's `config.feeds` (the table at idx): whether each feed has
 * credentials, a boolean, as the rules see it (a 0 or "false" would be true). */
static int test_feeds_valid(lua_State *L, int idx, char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    for (int f = 0; f < FEED_COUNT; f++) {
        int t = rawfield(L, idx, FEED_NAMES[f]);
        lua_pop(L, 1);
        if (t != LUA_TNIL && t != LUA_TBOOLEAN) {
            str_printf(err, errlen, "the test's `config.feeds.%s` must be a boolean, not %s",
                       FEED_NAMES[f], lua_typename(L, t));
            return -1;
        }
    }
    return 0;
}

/* A test's `config.apps` (the table at idx): app ids to feed names, as the
 * configuration's `apps` must be. */
static int test_apps_valid(lua_State *L, int idx, char *err, size_t errlen)
{
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t n = 0;
        const char *feed = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
        if (lua_type(L, -2) != LUA_TSTRING) {
            str_printf(err, errlen,
                       "the test's `config.apps` keys must be app ids (strings), not %s",
                       luaL_typename(L, -2));
            lua_pop(L, 2);
            return -1;
        }
        if (!feed || feed_from_name(feed, n) < 0) {
            str_printf(err, errlen,
                       "the test's `config.apps[\"%.64s\"]` must be \"ios\", \"android\", \"web\" "
                       "or \"unbound\"",
                       lua_tostring(L, -2));
            lua_pop(L, 2);
            return -1;
        }
        lua_pop(L, 1);
    }
    return 0;
}

/* [-1, +0] Takes the value a file returned and records its process function and
 * tests. */
static int register_file(rules *r, lua_State *L, size_t i, const char *name, char *err,
                         size_t errlen)
{
    int rc = -1;
    r->tests_refs[i] = LUA_NOREF;
    if (lua_isfunction(L, -1)) {
        r->process_refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
        return 0;
    }
    if (!lua_istable(L, -1)) {
        str_printf(err, errlen,
                   "%s: must return a function or a table with a `process` function (returned %s)",
                   name, luaL_typename(L, -1));
        goto done;
    }
    char what[300];
    snprintf(what, sizeof what, "%s: the returned table", name);
    if (known_keys(L, -1, FILE_KEYS, ARRAY_LEN(FILE_KEYS), 1, what, err, errlen) != 0)
        goto done;
    if (rawfield(L, -1, "process") != LUA_TFUNCTION) {
        str_printf(err, errlen, "%s: the returned table has no `process` function", name);
        lua_pop(L, 1);
        goto done;
    }
    r->process_refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
    int t = rawfield(L, -1, "tests");
    snprintf(what, sizeof what, "%s: `tests`", name);
    if (t == LUA_TTABLE &&
        must_be_list(L, -1, what, LUA_TTABLE, " (one test? put it in a list: tests = { { ... } })",
                     err, errlen) != 0) {
        lua_pop(L, 1);
        goto done;
    }
    if (t == LUA_TTABLE) {
        r->tests_refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        lua_pop(L, 1);
        if (t != LUA_TNIL) {
            str_printf(err, errlen, "%s: `tests` must be a list of tables", name);
            goto done;
        }
    }
    rc = 0;
done:
    lua_pop(L, 1);
    return rc;
}

int rules_new(rules **out, ruleset *rs, char *err, size_t errlen)
{
    *out = NULL;
    rules *r = calloc(1, sizeof(*r));
    if (!r) {
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    r->rs = ruleset_ref(rs);
    struct config *c = rs->cfg;
    r->limits.memory_bytes = (size_t)c->rules_memory_mb << 20;
    r->limits.instructions = c->rules_instructions;
    r->decode_ref = r->tributary_ref = r->absent_ref = LUA_NOREF;
    buf_init(&r->scratch, 1u << 24);
    buf_init(&r->encoded, RULES_MAX_ENCODE_BYTES + 64);
    r->n = rs->nfiles;
    r->process_refs = calloc(r->n, sizeof(int));
    r->tests_refs = calloc(r->n, sizeof(int));
    r->sb = sandbox_new(0);
    if (!r->process_refs || !r->tests_refs || !r->sb) {
        str_copy(err, errlen, "out of memory");
        goto fail;
    }
    lua_State *L = sandbox_lua(r->sb);
    lua_pushcfunction(L, setup_state);
    lua_pushlightuserdata(L, r);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        str_printf(err, errlen, "cannot set up the rules state: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        goto fail;
    }
    set_context(r, L, 0);

    struct sandbox_limits load = {r->limits.memory_bytes, RULES_LOAD_INSTRUCTIONS};
    for (size_t i = 0; i < r->n; i++) {
        const struct rule_file *f = &rs->files[i];
        char chunk[512];
        snprintf(chunk, sizeof chunk, "@%s", f->name);
        if (sandbox_load(r->sb, chunk, f->src, f->len, err, errlen) != 0)
            goto fail;
        struct sandbox_error serr;
        enum sandbox_rc rc = sandbox_call(r->sb, 0, 1, &load, &serr);
        (void)name_memory_limit(r, rc, &serr);
        if (rc != SANDBOX_OK) {
            describe_error(err, errlen, f->name, rc, &serr);
            goto fail;
        }
        if (register_file(r, L, i, f->name, err, errlen) != 0)
            goto fail;
    }
    lua_gc(L, LUA_GCCOLLECT);
    /* what the files' top levels keep (lookup tables) is the state's own:
     * rules.memory_mb bounds what requests add to it */
    r->memory_cap = sandbox_memory(r->sb) + r->limits.memory_bytes;
    *out = r;
    return 0;
fail:
    rules_free(r);
    return -1;
}

void rules_free(rules *r)
{
    if (!r)
        return;
    sandbox_free(r->sb);
    free(r->process_refs);
    free(r->tests_refs);
    buf_free(&r->scratch);
    buf_free(&r->encoded);
    ruleset_unref(r->rs);
    free(r);
}

void rules_uncounted(rules *r)
{
    r->uncounted = 1;
}

ruleset *rules_ruleset(const rules *r)
{
    return r->rs;
}

const char *rules_needs_rebuild(const rules *r)
{
    if (sandbox_damaged(r->sb))
        return "a rule hit a limit";
    if (sandbox_memory(r->sb) > r->memory_cap)
        return "the state holds more than rules.memory_mb beyond what its files' top level left";
    return NULL;
}

/* ---- JSON between Lua and C --------------------------------------------- */

/* JSON text of Lua values, written by the host rather than by cjson.encode:
 * cjson grows its output buffer outside the Lua allocator, without a bound,
 * and exits the process when that allocation fails, so a rule returning (or
 * encoding) a table that expands to gigabytes of text (a table nested in
 * itself twice per level, say) would take the service down. This writer stops
 * at a byte limit instead. It follows cjson's conventions: a table whose keys
 * are all positive integers is an array (holes up to twice its size, or any
 * up to 10 items, become null; sparser ones are an error), any other table an
 * object with string or number keys, an empty table {}, cjson.null null.
 * Integers are written whole, other numbers with 14 significant digits. */

/* The time the writer may take over one or more texts (an event's output and
 * its batch fields). A table's walk costs what it was ever sized for, not what
 * it holds: a table of a million emptied slots is written as {} in two bytes,
 * so the byte limit does not bound the work when rules put it in many places.
 * The clock is read every JSON_CLOCK_TABLES tables, so an output of a few
 * tables, the usual one, never reads it. */
struct json_clock {
    int64_t deadline_ns;  /* clock_mono_ns to be done by; 0: from the first reading */
    int64_t instructions; /* whose time it is, when deadline_ns is 0 */
    unsigned tables;      /* tables written so far */
};

#define JSON_CLOCK_TABLES 8

/* Whether the writer is past its time (read every JSON_CLOCK_TABLES tables). */
static int json_clock_passed(struct json_clock *c)
{
    if (++c->tables % JSON_CLOCK_TABLES != 0)
        return 0;
    int64_t now = clock_mono_ns();
    if (c->deadline_ns == 0)
        c->deadline_ns = sandbox_deadline_for(now, c->instructions);
    return now > c->deadline_ns;
}

struct json_out {
    buf *out;
    size_t limit; /* out->len may not pass it */
    size_t max;   /* the bytes this text may take */
    struct json_clock *clock;
    char *err;
    size_t errlen;
    unsigned mode; /* JSON_SORTED, JSON_ATTRIBUTE */
    int too_large; /* it stopped for want of room */
};

/* How write_json_as writes. */
enum {
    JSON_SORTED = 1,    /* objects with names only in their order (json_object_sorted) */
    JSON_ATTRIBUTE = 2, /* the text of an attribute (rules_attribute_text) */
};

/* Why a text was not written when it would take more than its room. */
static const char JSON_TOO_LARGE[] = "the JSON text is too large";

#define JSON_SPARSE_RATIO 2
#define JSON_SPARSE_SAFE 10

static int json_fail(struct json_out *j, const char *what)
{
    if (!j->err[0])
        str_copy(j->err, j->errlen, what);
    return -1;
}

static int json_too_large(struct json_out *j)
{
    j->too_large = 1;
    return json_fail(j, JSON_TOO_LARGE);
}

static int json_room(struct json_out *j)
{
    if (j->out->len > j->limit) {
        j->too_large = 1;
        str_printf(j->err, j->errlen, "the JSON text is larger than %zu bytes", j->max);
        return -1;
    }
    return 0;
}

/* Numbers as text that reads back as the same number. cjson decodes every
 * JSON number as a float: a whole one is written as an integer (a property
 * 1700000000123 stays that, not 1.7e+12), others in the fewest digits, 15 to
 * 17, that read back the same. */
static int json_number(struct json_out *j, lua_State *L, int idx)
{
    if (lua_isinteger(L, idx))
        return buf_int(j->out, (long long)lua_tointeger(L, idx));
    double v = lua_tonumber(L, idx);
    if (!isfinite(v) && (j->mode & JSON_ATTRIBUTE))
        return buf_adds(j->out, "null");
    if (!isfinite(v))
        return json_fail(j, "numbers must be finite");
    if (v == floor(v) && fabs(v) < 0x1p63)
        return buf_int(j->out, (long long)v);
    char text[32];
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, v);
        if (strtod(text, NULL) == v)
            break;
    }
    return buf_adds(j->out, text);
}

/* A table of more items than this cannot be written within room bytes: each
 * takes two at least (a value and a comma). */
#define JSON_MAX_ITEMS(room) ((lua_Integer)((room) / 2 + 1))
_Static_assert(RULES_MAX_OUTPUT_BYTES == MPARTICLE_MAX_BATCH_BYTES,
               "an output is written up to the size of a batch");

/* The most items of a table an output (RULES_MAX_OUTPUT_BYTES) can hold. */
#define OUTPUT_MAX_ITEMS JSON_MAX_ITEMS(RULES_MAX_OUTPUT_BYTES)
#define JSON_TOO_MANY_ITEMS (-2)

/* A string as JSON text; in an attribute's text, a string of more than
 * ATTRIBUTE_TEXT_BYTES only as far as that, which holds more characters than
 * the attribute keeps. */
static int json_string(struct json_out *j, const char *s, size_t n)
{
    if ((j->mode & JSON_ATTRIBUTE) && n > ATTRIBUTE_TEXT_BYTES)
        n = ATTRIBUTE_TEXT_BYTES;
    return buf_json_str(j->out, s, n);
}

/* The length of the table at idx as a JSON array, 0 when it is empty or an
 * object, -1 when it is an array too sparse to write, JSON_TOO_MANY_ITEMS when
 * it has more than max_items items (a rule's table of millions is not walked
 * to its end, nor written). */
static lua_Integer json_array_length(lua_State *L, int idx, lua_Integer max_items)
{
    lua_Integer max = 0, items = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (items == max_items) {
            lua_pop(L, 1);
            return JSON_TOO_MANY_ITEMS;
        }
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
            lua_pop(L, 1);
            return 0;
        }
        lua_Integer k = lua_tointeger(L, -1);
        max = k > max ? k : max;
        items++;
    }
    if (max > JSON_SPARSE_SAFE && max > items * JSON_SPARSE_RATIO)
        return -1;
    return max;
}

static int json_value(struct json_out *j, lua_State *L, int idx, int depth);

struct json_name {
    const char *s;
    size_t n;
};

static int json_name_order(const void *a, const void *b)
{
    const struct json_name *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->n < y->n ? x->n : y->n);
    return c ? c : (x->n > y->n) - (x->n < y->n);
}

/* Whether the table at idx is weak (__mode): the collector may take its
 * entries, and with them their names, at any allocation. */
static int is_weak(lua_State *L, int idx)
{
    if (!lua_getmetatable(L, idx))
        return 0;
    lua_pushliteral(L, "__mode");
    int weak = lua_rawget(L, -2) != LUA_TNIL;
    lua_pop(L, 2);
    return weak;
}

/* The object at idx with its names in byte order, so that the same table is
 * always the same text (a table's own order changes from one Lua state to the
 * next). 1 when it has a name that is not a string, or is weak (then written
 * in its own order), 0 when written, -1 on failure. Raises a Lua error when
 * out of memory: only where a rule calls it. */
static int json_object_sorted(struct json_out *j, lua_State *L, int idx, int depth)
{
    /* names are held by the table while it is written: not by a weak one */
    if (is_weak(L, idx))
        return 1;
    size_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pop(L, 1);
            return 1;
        }
        count++;
    }
    /* each name takes 4 bytes at least ("":0): more cannot fit, but for an
     * attribute's text, which stops at its room (its names in the table's
     * order, then: not sorted to be cut) */
    if (count > j->max / 4)
        return (j->mode & JSON_ATTRIBUTE) ? 1 : json_too_large(j);
    struct json_name *names = lua_newuserdatauv(L, count * sizeof(*names) + 1, 0);
    int anchor = lua_gettop(L);
    size_t k = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        names[k].s = lua_tolstring(L, -1, &names[k].n); /* anchored by the table */
        k++;
    }
    qsort(names, count, sizeof(*names), json_name_order);
    int rc = buf_addc(j->out, '{');
    for (size_t i = 0; i < count && rc == 0; i++) {
        rc = (i ? buf_addc(j->out, ',') : 0) || json_string(j, names[i].s, names[i].n) ||
             buf_addc(j->out, ':');
        lua_pushlstring(L, names[i].s, names[i].n);
        lua_rawget(L, idx);
        rc = rc || json_value(j, L, lua_gettop(L), depth + 1) || json_room(j);
        lua_pop(L, 1);
    }
    lua_remove(L, anchor);
    return rc ? -1 : buf_addc(j->out, '}');
}

static int json_table(struct json_out *j, lua_State *L, int idx, int depth)
{
    if (json_clock_passed(j->clock)) {
        str_copy(j->err, j->errlen,
                 "writing it as JSON took longer than the time limit (tables that were large once "
                 "walked again and again)");
        return -1;
    }
    if (depth > RULES_MAX_JSON_DEPTH) {
        str_printf(j->err, j->errlen, "tables nested deeper than %d levels", RULES_MAX_JSON_DEPTH);
        return -1;
    }
    if (!lua_checkstack(L, 3))
        return json_fail(j, "out of Lua stack");
    size_t room = j->out->len < j->limit ? j->limit - j->out->len : 0;
    lua_Integer n = json_array_length(L, idx, JSON_MAX_ITEMS(room));
    if (n == JSON_TOO_MANY_ITEMS && (j->mode & JSON_ATTRIBUTE))
        n = (lua_Integer)lua_rawlen(L, idx); /* its first items, as far as the room goes */
    if (n == JSON_TOO_MANY_ITEMS)
        return json_too_large(j);
    if (n < 0)
        return json_fail(j, "a table is too sparse an array to write as JSON");
    if (n > 0) {
        if (buf_addc(j->out, '['))
            return -1;
        for (lua_Integer i = 1; i <= n; i++) {
            if (i > 1 && buf_addc(j->out, ','))
                return -1;
            lua_rawgeti(L, idx, i);
            int rc = lua_isnil(L, -1) ? buf_adds(j->out, "null")
                                      : json_value(j, L, lua_gettop(L), depth + 1);
            lua_pop(L, 1);
            if (rc != 0 || json_room(j) != 0)
                return -1;
        }
        return buf_addc(j->out, ']');
    }
    if (j->mode & JSON_SORTED) {
        int rc = json_object_sorted(j, L, idx, depth);
        if (rc <= 0)
            return rc;
    }
    if (buf_addc(j->out, '{'))
        return -1;
    int first = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        /* key value */
        int rc = first ? 0 : buf_addc(j->out, ',');
        first = 0;
        if (rc == 0 && lua_type(L, -2) == LUA_TSTRING) {
            size_t kn;
            const char *k = lua_tolstring(L, -2, &kn);
            rc = json_string(j, k, kn);
        } else if (rc == 0 && lua_type(L, -2) == LUA_TNUMBER) {
            rc = buf_addc(j->out, '"') || json_number(j, L, -2) || buf_addc(j->out, '"');
        } else if (rc == 0) {
            rc = json_fail(j, "table keys must be strings or numbers");
        }
        rc = rc || buf_addc(j->out, ':') || json_value(j, L, lua_gettop(L), depth + 1) ||
             json_room(j);
        lua_pop(L, 1);
        if (rc != 0) {
            lua_pop(L, 1);
            return -1;
        }
    }
    return buf_addc(j->out, '}');
}

static int json_value(struct json_out *j, lua_State *L, int idx, int depth)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        return json_string(j, s, n);
    }
    case LUA_TNUMBER:
        return json_number(j, L, idx);
    case LUA_TBOOLEAN:
        return buf_adds(j->out, lua_toboolean(L, idx) ? "true" : "false");
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL)
            return buf_adds(j->out, "null"); /* cjson.null */
        break;
    case LUA_TTABLE:
        return json_table(j, L, idx, depth);
    default:
        break;
    }
    str_printf(j->err, j->errlen, "cannot encode a %s value as JSON", luaL_typename(L, idx));
    return -1;
}

/* What write_json_as returns for a text that would take more than its room. */
#define JSON_WRITE_TOO_LARGE (-2)

/* [-0, +0] Appends the value at idx to out as JSON text of at most limit
 * bytes, within the time of clock, written as mode says. On failure returns -1,
 * or JSON_WRITE_TOO_LARGE, with the reason in err; out then holds a part. */
static int write_json_as(lua_State *L, int idx, buf *out, size_t limit, struct json_clock *clock,
                         unsigned mode, char *err, size_t errlen)
{
    struct json_out j = {out, out->len + limit, limit, clock, err, errlen, mode, 0};
    err[0] = '\0';
    if (json_value(&j, L, lua_absindex(L, idx), 0) == 0 && json_room(&j) == 0)
        return 0;
    if (!err[0]) /* an append found no room in out */
        json_too_large(&j);
    return j.too_large ? JSON_WRITE_TOO_LARGE : -1;
}

/* The same, objects in the table's own order: the host's writing of outputs
 * and events, where the order does not matter and costs nothing. */
static int write_json(lua_State *L, int idx, buf *out, size_t limit, struct json_clock *clock,
                      char *err, size_t errlen)
{
    return write_json_as(L, idx, out, limit, clock, 0, err, errlen);
}

/* The clock of host work on what the rules of an event made (writing their
 * output): the time a call of the event's instruction budget has. */
static struct json_clock host_clock(const rules *r)
{
    return (struct json_clock){0, r->limits.instructions, 0};
}

/* cjson.encode as rules see it, through write_json_as: an object's names in
 * order, so that the same table is always the same text (an attribute made of
 * a nested object, a text a rule compares or hashes). */
static int rules_encode(lua_State *L)
{
    rules *r = lua_touserdata(L, lua_upvalueindex(1));
    luaL_checkany(L, 1);
    char err[ERR_LEN];
    buf_reset(&r->encoded);
    struct json_clock clock = {sandbox_deadline(L), 0, 0};
    if (write_json_as(L, 1, &r->encoded, RULES_MAX_ENCODE_BYTES, &clock, JSON_SORTED, err,
                      sizeof err) != 0) {
        buf_reset(&r->encoded);
        if (sandbox_overdue(L)) /* the event's time is up: it ends as rule_limit */
            return luaL_error(L, "cjson.encode: time limit exceeded");
        return luaL_error(L, "cjson.encode: %s", err);
    }
    lua_pushlstring(L, r->encoded.data ? r->encoded.data : "", r->encoded.len);
    if (r->encoded.cap > RULES_MAX_OUTPUT_BYTES)
        buf_free(&r->encoded); /* a rare large text does not stay */
    return 1;
}

/* The text of an attribute made of a table (tributary.custom_attributes): its
 * JSON text as cjson.encode writes it, but that a number JSON cannot write
 * (1e400) is null, and that the text stops once it holds more than an
 * attribute keeps (ATTRIBUTE_TEXT_BYTES), to be cut as any long text is: an
 * event's own data makes an attribute, never a dead letter. Returns the text
 * and whether it stopped short. */
static int rules_attribute_text(lua_State *L)
{
    rules *r = lua_touserdata(L, lua_upvalueindex(1));
    char err[ERR_LEN];
    buf_reset(&r->encoded);
    struct json_clock clock = {sandbox_deadline(L), 0, 0};
    int rc = write_json_as(L, 1, &r->encoded, ATTRIBUTE_TEXT_BYTES, &clock,
                           JSON_SORTED | JSON_ATTRIBUTE, err, sizeof err);
    if (rc != 0 && rc != JSON_WRITE_TOO_LARGE) {
        buf_reset(&r->encoded);
        if (sandbox_overdue(L))
            return luaL_error(L, "tributary.custom_attributes: time limit exceeded");
        return luaL_error(L, "tributary.custom_attributes: %s", err);
    }
    lua_pushlstring(L, r->encoded.data ? r->encoded.data : "", r->encoded.len);
    lua_pushboolean(L, rc != 0);
    return 2;
}

static int is_host_key(const char *k)
{
    for (size_t i = 0; i < ARRAY_LEN(HOST_BATCH_KEYS); i++) {
        if (strcmp(k, HOST_BATCH_KEYS[i]) == 0)
            return 1;
    }
    return 0;
}

/* [-0, +0] Writes the value on top of the stack as the record line of batch
 * field k (and its name sk in it when the field is a table of names, else
 * NULL). */
static int batch_line(lua_State *L, buf *out, const char *k, size_t kn, const char *sk, size_t sn,
                      struct json_clock *clock, char *err, size_t errlen)
{
    if (buf_json_str(out, k, kn) || buf_addc(out, '\t') || (sk && buf_json_str(out, sk, sn)) ||
        buf_addc(out, '\t') ||
        write_json(L, lua_gettop(L), out, RULES_MAX_OUTPUT_BYTES, clock, err, errlen) ||
        buf_addc(out, '\n')) {
        if (!err[0])
            str_copy(err, errlen, "batch too large");
        return -1;
    }
    return 0;
}

/* [-0, +0] Writes the batch table at idx as record lines (see record.h).
 * Adds to *whole a fingerprint of each line of a field written whole (not a
 * table of names: environment, ...), of which a batch holds one value; sets
 * *has_env when it has an environment field. */
static int flatten_batch(lua_State *L, int idx, buf *out, struct json_clock *clock, uint64_t *whole,
                         int *has_env, char *err, size_t errlen)
{
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        /* key value */
        if (lua_type(L, -2) != LUA_TSTRING) {
            str_copy(err, errlen, "out.batch keys must be strings");
            lua_pop(L, 2);
            return -1;
        }
        size_t kn;
        const char *k = lua_tolstring(L, -2, &kn);
        if (is_host_key(k)) {
            lua_pop(L, 1);
            continue;
        }
        *has_env |= kn == 11 && memcmp(k, "environment", 11) == 0;
        int object = lua_istable(L, -1) && lua_rawlen(L, -1) == 0;
        if (object) {
            int vi = lua_gettop(L);
            lua_pushnil(L);
            while (lua_next(L, vi)) {
                if (lua_type(L, -2) != LUA_TSTRING) {
                    str_printf(err, errlen, "out.batch.%s keys must be strings", k);
                    lua_pop(L, 4);
                    return -1;
                }
                size_t sn;
                const char *sk = lua_tolstring(L, -2, &sn);
                if (batch_line(L, out, k, kn, sk, sn, clock, err, errlen) != 0) {
                    lua_pop(L, 4);
                    return -1;
                }
                lua_pop(L, 1);
            }
        } else {
            size_t at = out->len;
            if (batch_line(L, out, k, kn, NULL, 0, clock, err, errlen) != 0) {
                lua_pop(L, 2);
                return -1;
            }
            *whole += digest_fnv64(DIGEST_FNV64_INIT, out->data + at, out->len - at);
        }
        lua_pop(L, 1);
    }
    return 0;
}

/* ---- one event through the chain ---------------------------------------- */

enum chain_kind { CHAIN_OUT, CHAIN_DROP, CHAIN_DEAD };

struct chain_result {
    enum chain_kind kind;
    const char *dead_reason;
    const char *dropped_by; /* CHAIN_DROP: the file that dropped the event */
    char detail[ERR_LEN];
};

static enum drop_reason classify_drop(const char *reason)
{
    if (strcmp(reason, "unsupported_type") == 0)
        return DROP_UNSUPPORTED_TYPE;
    if (strcmp(reason, "not_selected") == 0)
        return DROP_NOT_SELECTED;
    if (strcmp(reason, "no_external_id") == 0)
        return DROP_NO_EXTERNAL_ID;
    return DROP_RULE;
}

static const char *file_base(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* A memory limit met by an event is said to be the earlier events' when they
 * took at least 1/MEMORY_BLAME_SHARE of rules.memory_mb. */
#define MEMORY_BLAME_SHARE 8

/* Before the events of a request (their input decoded): memory that rules
 * keep from one event to the next (in a global or an upvalue) counts towards
 * the event that allocated it, and all the events of the request together may
 * not leave the state more than rules.memory_mb larger than this. */
static void begin_events(rules *r)
{
    r->ceiling = sandbox_used(r->sb) + r->limits.memory_bytes;
}

/* What the rules of an event that began with the state at `base` bytes may
 * still add to it: rules.memory_mb for the event, within the request's
 * ceiling (*by_ceiling says whether that is the bound). At least 1: a limit of
 * 0 would mean none. */
static size_t memory_left(const rules *r, size_t base, int *by_ceiling)
{
    size_t used = sandbox_used(r->sb);
    size_t held = used > base ? used - base : 0;
    size_t left = held < r->limits.memory_bytes ? r->limits.memory_bytes - held : 1;
    size_t room = r->ceiling > used ? r->ceiling - used : 1;
    *by_ceiling = room < left;
    return *by_ceiling ? room : left;
}

/* [-0, +1] Runs files 0..upto on the event at evi, with the workspace at wsi
 * (a string, or nil). Pushes the final out (or nil). */
static void run_chain(rules *r, lua_State *L, int evi, int wsi, size_t upto,
                      struct chain_result *res)
{
    lua_pushnil(L);
    int outi = lua_gettop(L);
    res->kind = CHAIN_OUT;
    res->detail[0] = '\0';
    /* one instruction budget, one time limit and one memory budget for the
     * event, shared by all its rules */
    struct sandbox_limits lim = r->limits;
    struct sandbox_share share = {0, 0, 0};
    size_t base = sandbox_used(r->sb);
    int by_ceiling;
    lim.memory_bytes = memory_left(r, base, &by_ceiling);
    for (size_t k = 0; k <= upto && k < r->n; k++) {
        const char *fname = r->rs->files[k].name;
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->process_refs[k]);
        lua_pushvalue(L, evi);
        lua_pushvalue(L, outi);
        lua_pushvalue(L, wsi);
        struct sandbox_error serr;
        enum sandbox_rc rc = sandbox_call_shared(r->sb, 3, 2, &lim, &share, &serr);
        if (name_memory_limit(r, rc, &serr)) {
            /* named by the request's earlier events only when they took a
             * good part of it: an event's garbage stays until a collection */
            size_t whole = r->limits.memory_bytes, start = r->ceiling - whole;
            size_t before = base > start ? base - start : 0;
            if (by_ceiling && before >= whole / MEMORY_BLAME_SHARE)
                str_printf(serr.msg, sizeof serr.msg,
                           "memory limit exceeded: %zu bytes of rules.memory_mb (%zu MiB) were "
                           "taken by what the rules keep from the request's earlier events (in "
                           "globals or upvalues) or by their garbage not collected yet",
                           before, whole >> 20);
        }
        lim.memory_bytes = memory_left(r, base, &by_ceiling);
        if (rc != SANDBOX_OK) {
            res->kind = CHAIN_DEAD;
            res->dead_reason = rc == SANDBOX_LIMIT ? DEAD_RULE_LIMIT : DEAD_RULE_ERROR;
            describe_error(res->detail, sizeof res->detail, fname, rc, &serr);
            lua_pushnil(L);
            lua_replace(L, outi);
            return;
        }
        int t = lua_type(L, -2);
        if (t == LUA_TBOOLEAN && !lua_toboolean(L, -2)) {
            /* a drop says why; `false` alone is most likely `cond and out`
             * of a rule that meant to keep the event: a dead letter, which a
             * requeue can mend */
            size_t whylen = 0;
            const char *why = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &whylen) : NULL;
            if (whylen > 0) {
                res->kind = CHAIN_DROP;
                res->dropped_by = file_base(fname);
                str_copy(res->detail, sizeof res->detail, why);
            } else {
                res->kind = CHAIN_DEAD;
                res->dead_reason = DEAD_INVALID_OUTPUT;
                int why_type = lua_type(L, -1);
                str_printf(res->detail, sizeof res->detail,
                           "%s: process returned false %s; return false and a reason (a "
                           "non-empty string) to drop the event",
                           fname,
                           why_type == LUA_TNIL      ? "without a reason"
                           : why_type == LUA_TSTRING ? "with an empty reason"
                                                     : "with a reason that is not a string");
            }
            lua_pop(L, 2);
            lua_pushnil(L);
            lua_replace(L, outi);
            return;
        }
        if (t == LUA_TTABLE) {
            lua_pushvalue(L, -2);
            lua_replace(L, outi);
        } else if (t == LUA_TNIL && lua_type(L, -1) != LUA_TNIL) {
            /* Lua's `return nil, err`: meant as a drop, it would keep the
             * event without a word */
            res->kind = CHAIN_DEAD;
            res->dead_reason = DEAD_INVALID_OUTPUT;
            str_printf(res->detail, sizeof res->detail,
                       "%s: process returned nil and a %s; return false and a reason (a "
                       "non-empty string) to drop the event, or nothing to keep it",
                       fname, lua_typename(L, lua_type(L, -1)));
            lua_pop(L, 2);
            lua_pushnil(L);
            lua_replace(L, outi);
            return;
        } else if (t != LUA_TNIL) {
            res->kind = CHAIN_DEAD;
            res->dead_reason = DEAD_INVALID_OUTPUT;
            str_printf(res->detail, sizeof res->detail,
                       "%s: process returned a %s; expected a table, nil, or false", fname,
                       lua_typename(L, t));
            lua_pop(L, 2);
            lua_pushnil(L);
            lua_replace(L, outi);
            return;
        }
        lua_pop(L, 2);
    }
    if (lua_isnil(L, outi)) {
        /* a rule that forgot its return, never a drop of its own: only
         * `return false, reason` drops an event */
        res->kind = CHAIN_DEAD;
        res->dead_reason = DEAD_INVALID_OUTPUT;
        str_printf(res->detail, sizeof res->detail,
                   "no rule produced an output (last: %s); return a table, or false and a "
                   "reason to drop the event",
                   file_base(r->rs->files[r->n - 1].name));
    }
}

/* The identity of the event being mapped, captured before any rule runs, its
 * bytes as received when known, and the workspace of its request. */
struct event_ids {
    str id;
    str type;
    str raw;
    str workspace;
};

/* Copies the event's bytes into m for its record or dead letter: as received
 * when known, else encoded from the table at evi. -1 (err) when it cannot be
 * encoded. */
static int copy_raw(rules *r, lua_State *L, int evi, const struct event_ids *ids, struct mapping *m,
                    str *out, int *failed, char *err, size_t errlen)
{
    if (ids->raw.p) {
        *out = mapping_copy(m, ids->raw.p, ids->raw.n, failed);
        return 0;
    }
    buf_reset(&r->scratch);
    struct json_clock clock = host_clock(r);
    if (write_json(L, evi, &r->scratch, RULES_MAX_ENCODE_BYTES, &clock, err, errlen) != 0)
        return -1;
    *out = mapping_copy(m, r->scratch.data, r->scratch.len, failed);
    return 0;
}

static int add_dead(rules *r, lua_State *L, int evi, const struct event_ids *ids, struct mapping *m,
                    int feed, const char *reason, const char *detail)
{
    int failed = 0;
    struct dead_letter *d = mapping_add_dead(m);
    if (!d)
        return -1;
    char err[ERR_LEN];
    if (copy_raw(r, L, evi, ids, m, &d->raw, &failed, err, sizeof err) != 0)
        d->raw = mapping_copy(m, "{}", 2, &failed);
    d->reason = reason;
    d->feed = feed;
    d->rules_version = ruleset_version(r->rs);
    d->detail = mapping_copy(m, detail, strlen(detail), &failed);
    d->event_id = ids->id;
    d->event_type = ids->type;
    d->workspace = ids->workspace;
    return failed ? -1 : 0;
}

/* ---- what mParticle takes ------------------------------------------------ */

/* mParticle's bulk endpoint answers 202 for a request even when it drops
 * batches inside it, so an output it refuses must not be queued: it would be
 * counted as delivered and lost. These checks make it a dead letter
 * (invalid_output) naming the field instead. */

/* The characters s[0..n) takes in the JSON text, where each byte that is not
 * UTF-8 is one (U+FFFD), exceed max. */
static int too_long(const char *s, size_t n, size_t max)
{
    return n > max && json_str_chars(s, n) > max;
}

/* A scalar as mParticle takes it: a string of at most max characters, a
 * number, a boolean or null. 0, or -1 with the problem in err. */
static int check_scalar(lua_State *L, int idx, const char *what, const char *name, size_t max,
                        char *err, size_t errlen)
{
    int t = lua_type(L, idx);
    size_t n;
    if (t == LUA_TSTRING) {
        const char *v = lua_tolstring(L, idx, &n);
        if (!too_long(v, n, max))
            return 0;
        str_printf(err, errlen, "%s.%.64s: a value of more than %zu characters", what, name, max);
        return -1;
    }
    if (t == LUA_TNUMBER || t == LUA_TBOOLEAN ||
        (t == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == NULL))
        return 0;
    str_printf(err, errlen, "%s.%.64s: a value must be a string, number, boolean or null, not a %s",
               what, name, luaL_typename(L, idx));
    return -1;
}

/* The name of the key at idx for messages (a number key is written as text). */
static const char *key_text(lua_State *L, int idx, char *tmp, size_t tmplen, size_t *n)
{
    if (lua_type(L, idx) == LUA_TSTRING)
        return lua_tolstring(L, idx, n);
    if (lua_type(L, idx) == LUA_TNUMBER) {
        lua_Number v = lua_tonumber(L, idx);
        str_printf(tmp, tmplen, "%.17g", (double)v);
        *n = strlen(tmp);
        return tmp;
    }
    *n = 0;
    return NULL; /* write_json refuses it */
}

/* Whether the name s[0..n) of the table at idx, which is not UTF-8, is as
 * written (U+FFFD for each byte that is not) a name of the table, or one that
 * another such name was written as (the set at seen, nil until the first). */
static int one_as_written(lua_State *L, int idx, const char *s, size_t n, int seen)
{
    attributes_push_as_written(L, s, n);
    lua_pushvalue(L, -1);
    int taken = lua_rawget(L, idx) != LUA_TNIL;
    lua_pop(L, 1);
    if (!taken && lua_istable(L, seen)) {
        lua_pushvalue(L, -1);
        taken = lua_rawget(L, seen) != LUA_TNIL;
        lua_pop(L, 1);
    }
    if (!lua_istable(L, seen)) {
        lua_newtable(L);
        lua_replace(L, seen);
    }
    lua_pushboolean(L, 1);
    lua_rawset(L, seen);
    return taken;
}

/* The attributes table at idx (`what` in messages): at most max names of at
 * most max_name characters, no two of them one as written, values scalars of
 * at most 4096 characters, or with lists, lists of them; names are strings. */
static int check_attributes(lua_State *L, int idx, const char *what, size_t max, size_t max_name,
                            int lists, char *err, size_t errlen)
{
    /* written as JSON the way write_json decides: a table of items 1..n is a
     * list, which mParticle does not take here */
    lua_Integer shape = json_array_length(L, idx, OUTPUT_MAX_ITEMS);
    if (shape == JSON_TOO_MANY_ITEMS) {
        str_printf(err, errlen, "%s: more items than an output can hold", what);
        return -1;
    }
    if (shape != 0) {
        str_printf(err, errlen, "%s must be a table of names, not a list", what);
        return -1;
    }
    size_t count = 0;
    lua_pushnil(L); /* the names written with U+FFFD, when there are */
    int seen = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        char tmp[32];
        size_t n;
        const char *name = key_text(L, -2, tmp, sizeof tmp, &n);
        int bad = 0;
        lua_Integer items = 0;
        if (++count > max) {
            str_printf(err, errlen, "%s: more than %zu attributes", what, max);
            bad = 1;
        } else if (lua_type(L, -2) == LUA_TNUMBER) {
            /* written as text, it could be another of the names: [1] and ["1"]
             * would be one name twice in a JSON object */
            str_printf(err, errlen, "%s: names must be strings, not numbers (%.64s)", what, name);
            bad = 1;
        } else if (name && too_long(name, n, max_name)) {
            str_printf(err, errlen, "%s: a name of more than %zu characters (%.64s...)", what,
                       max_name, name);
            bad = 1;
        } else if (name && !utf8_valid(name, n) && one_as_written(L, idx, name, n, seen)) {
            /* duplicate names in a JSON object: which one mParticle keeps
             * is not said */
            str_printf(err, errlen,
                       "%s: two names are one as written (each byte that is not UTF-8 is "
                       "U+FFFD)",
                       what);
            bad = 1;
        } else if (name && lists && lua_istable(L, -1) &&
                   (items = json_array_length(L, lua_gettop(L), OUTPUT_MAX_ITEMS)) ==
                       JSON_TOO_MANY_ITEMS) {
            str_printf(err, errlen, "%s.%.64s: more items than an output can hold", what, name);
            bad = 1;
        } else if (name && lists && items > 0) {
            /* a list: only items 1..n, as write_json writes it (holes are null) */
            int list = lua_gettop(L);
            for (lua_Integer i = 1; !bad && i <= items; i++) {
                lua_rawgeti(L, list, i);
                bad = !lua_isnil(L, -1) &&
                      check_scalar(L, -1, what, name, MPARTICLE_MAX_VALUE_CHARS, err, errlen) != 0;
                lua_pop(L, 1);
            }
        } else if (name) {
            bad = check_scalar(L, -1, what, name, MPARTICLE_MAX_VALUE_CHARS, err, errlen) != 0;
        }
        lua_pop(L, 1);
        if (bad) {
            lua_pop(L, 2);
            return -1;
        }
    }
    lua_pop(L, 1);
    return 0;
}

/* [-0, +1] Pushes the field of the batch at batchi that mParticle takes as an
 * object (device_info, user_identities, user_attributes) and returns its type:
 * absent, or a table of names. Anything else (a string, a list, null) makes
 * mParticle drop the whole batch, the user's other events with it: -1 with the
 * problem in err. */
static int object_field(lua_State *L, int batchi, const char *field, char *err, size_t errlen)
{
    int t = rawfield(L, batchi, field);
    if (t == LUA_TNIL || (t == LUA_TTABLE && lua_rawlen(L, -1) == 0))
        return t;
    int null = t == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL;
    str_printf(err, errlen, "out.batch.%s must be a table of names, not %s", field,
               t == LUA_TTABLE ? "a list"
               : null          ? "null"
                               : luaL_typename(L, -1));
    return -1;
}

/* An identifier written with U+FFFD for a byte that is not UTF-8 could be
 * another's: two users (or two events) would become one. */
#define NOT_UTF8_ID                                                                                \
    "not UTF-8 text (each byte that is not would be written as U+FFFD, and another "               \
    "identifier could be written the same)"

/* Whether the string at idx is well-formed UTF-8. */
static int is_utf8(lua_State *L, int idx)
{
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return utf8_valid(s, n);
}

/* The identity mParticle requires as text when it is there: null is refused. */
static int is_customer_id(lua_State *L, int key)
{
    if (lua_type(L, key) != LUA_TSTRING)
        return 0;
    const char *k = lua_tostring(L, key);
    return strcmp(k, "customer_id") == 0 || strcmp(k, "customerid") == 0;
}

/* The fields of the table at idx (`what` in messages): identities are strings
 * (or null, but for the customer id); device fields are scalars (strings,
 * numbers, booleans, null). */
static int check_fields(lua_State *L, int idx, const char *what, int strings, char *err,
                        size_t errlen)
{
    lua_Integer items = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (++items > OUTPUT_MAX_ITEMS) {
            str_printf(err, errlen, "%s: more items than an output can hold", what);
            lua_pop(L, 2);
            return -1;
        }
        int t = lua_type(L, -1);
        int null = t == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL;
        int ok = t == LUA_TSTRING || (null && !(strings && is_customer_id(L, -2))) ||
                 (!strings && (t == LUA_TNUMBER || t == LUA_TBOOLEAN));
        if (!ok || (strings && t == LUA_TSTRING && !is_utf8(L, -1))) {
            char tmp[32];
            size_t n;
            const char *name = key_text(L, -2, tmp, sizeof tmp, &n);
            const char *want =
                strings ? "a string is required" : "a value must be a string, number or boolean";
            if (ok)
                str_printf(err, errlen, "%s.%.64s: %s", what, name ? name : "?", NOT_UTF8_ID);
            else
                str_printf(err, errlen, "%s.%.64s: %s, not %s%s", what, name ? name : "?", want,
                           null ? "" : "a ", null ? "null" : luaL_typename(L, -1));
            lua_pop(L, 2);
            return -1;
        }
        lua_pop(L, 1);
    }
    return 0;
}

/* A string field of the table at idx that must be one of mParticle's names
 * (required: absent is an error too). *value, when given, receives it (the
 * table keeps it alive), or NULL. */
static int check_name(lua_State *L, int idx, const char *field, const char *what, int required,
                      int (*known)(const char *), const char **value, char *err, size_t errlen)
{
    int t = rawfield(L, idx, field);
    size_t n = 0;
    const char *v = t == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
    if (value)
        *value = v;
    /* a NUL inside would pass strcmp: "custom_event\0x" is no name of mParticle's */
    int ok = t == LUA_TNIL ? !required : v && strlen(v) == n && known(v);
    if (!ok && t == LUA_TSTRING)
        str_printf(err, errlen, "%s.%s: \"%.64s\" is not one of mParticle's names", what, field,
                   lua_tostring(L, -1));
    else if (!ok)
        str_printf(err, errlen, "%s.%s: a string is required, not %s", what, field,
                   luaL_typename(L, -1));
    lua_pop(L, 1);
    return ok ? 0 : -1;
}

/* [-0, +0] A fingerprint of the fields of the table at idx (names and scalar
 * values, as the output check leaves device_info), whatever their order. */
static uint64_t fields_fingerprint(lua_State *L, int idx)
{
    uint64_t sum = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t kn = 0, vn = 0;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kn) : "";
        const char *v;
        int t = lua_type(L, -1);
        if (t == LUA_TSTRING || t == LUA_TNUMBER) {
            v = lua_tolstring(L, -1, &vn); /* the value's copy on the stack */
        } else {
            v = t == LUA_TBOOLEAN ? (lua_toboolean(L, -1) ? "true" : "false") : "null";
            vn = strlen(v);
        }
        uint64_t h = digest_fnv64(DIGEST_FNV64_INIT, k, kn);
        h = digest_fnv64(h, "", 1);
        sum += digest_fnv64(h, v, vn);
        lua_pop(L, 1);
    }
    return sum;
}

/* The largest whole number of milliseconds every JSON reader holds exactly. */
#define MAX_EVENT_TIME_MS (INT64_C(1) << 53)

/* [-0, +0] data.timestamp_unixtime_ms and data.source_message_id of the event
 * data at data, when they are there: whole milliseconds from 0 to 2^53, and a
 * non-empty string. mParticle fails a batch with another kind of value, and
 * its bulk endpoint answers 202 all the same. *no_message_id: it is not there. */
static int check_event_ids(lua_State *L, int data, int *no_message_id, char *err, size_t errlen)
{
    int t = rawfield(L, data, "timestamp_unixtime_ms");
    int ok = t == LUA_TNIL;
    if (t == LUA_TNUMBER && lua_isinteger(L, -1)) {
        lua_Integer ms = lua_tointeger(L, -1);
        ok = ms >= 0 && ms <= MAX_EVENT_TIME_MS;
    } else if (t == LUA_TNUMBER) {
        lua_Number ms = lua_tonumber(L, -1);
        ok = ms >= 0 && ms <= (lua_Number)MAX_EVENT_TIME_MS && ms == floor(ms);
    }
    lua_pop(L, 1);
    if (!ok) {
        str_copy(err, errlen,
                 "out.event.data.timestamp_unixtime_ms: whole milliseconds since 1970 are "
                 "required (a number from 0 to 2^53)");
        return -1;
    }
    t = rawfield(L, data, "source_message_id");
    *no_message_id = t == LUA_TNIL;
    ok = t == LUA_TNIL || (t == LUA_TSTRING && lua_rawlen(L, -1) > 0);
    int utf8 = t != LUA_TSTRING || is_utf8(L, -1);
    lua_pop(L, 1);
    if (!ok) {
        str_copy(err, errlen, "out.event.data.source_message_id: a non-empty string is required");
        return -1;
    }
    if (!utf8) {
        str_copy(err, errlen, "out.event.data.source_message_id: " NOT_UTF8_ID);
        return -1;
    }
    return 0;
}

/* [-0, +k] The event table at eventi and the batch table at batchi (or nil)
 * against mParticle's schema; 0, or -1 with the field and the problem in err.
 * *no_message_id: the event data has no source_message_id. The tables it
 * checks stay on the stack, for the caller to pop once they are written: a
 * rule may hold them only in a weak table (__mode), and a collection between
 * the check and the writing would take them out of the output. */
static int check_output(lua_State *L, int eventi, int batchi, int *no_message_id, char *err,
                        size_t errlen)
{
    if (!lua_checkstack(L, 16)) {
        str_copy(err, errlen, "out of memory while checking the output");
        return -1;
    }
    const char *type;
    if (check_name(L, eventi, "event_type", "out.event", 1, mparticle_event_type_known, &type, err,
                   errlen) != 0)
        return -1;
    int custom = strcmp(type, "custom_event") == 0;
    int rc = 0;
    int dt = rawfield(L, eventi, "data");
    int data = lua_gettop(L);
    if (dt != LUA_TTABLE) {
        str_printf(err, errlen, "out.event.data must be a table, not %s", luaL_typename(L, data));
        rc = -1;
    } else if (json_array_length(L, data, OUTPUT_MAX_ITEMS) != 0) {
        str_copy(err, errlen, "out.event.data must be a table of names, not a list");
        rc = -1;
    } else {
        if (custom) {
            int nt = rawfield(L, data, "event_name");
            size_t n = 0;
            const char *name = nt == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
            if (!name || n == 0) {
                str_copy(err, errlen, "out.event.data.event_name: a custom event needs a name");
                rc = -1;
            } else if (too_long(name, n, MPARTICLE_MAX_NAME_CHARS)) {
                str_printf(err, errlen, "out.event.data.event_name: more than %d characters",
                           MPARTICLE_MAX_NAME_CHARS);
                rc = -1;
            }
            lua_pop(L, 1);
            if (rc == 0)
                rc = check_name(L, data, "custom_event_type", "out.event.data", 1,
                                mparticle_custom_event_type_known, NULL, err, errlen);
        }
        if (rc == 0)
            rc = check_event_ids(L, data, no_message_id, err, errlen);
        if (rc == 0) {
            int at = rawfield(L, data, "custom_attributes");
            if (at == LUA_TTABLE) {
                rc = check_attributes(L, lua_gettop(L), "out.event.data.custom_attributes",
                                      MPARTICLE_MAX_CUSTOM_ATTRIBUTES, MPARTICLE_MAX_NAME_CHARS, 0,
                                      err, errlen);
            } else if (at != LUA_TNIL) {
                str_printf(err, errlen, "out.event.data.custom_attributes must be a table, not %s",
                           luaL_typename(L, -1));
                rc = -1;
            }
        }
    }
    if (rc != 0 || lua_type(L, batchi) != LUA_TTABLE)
        return rc;
    if (check_name(L, batchi, "environment", "out.batch", 0, mparticle_environment_known, NULL, err,
                   errlen) != 0)
        return -1;
    int t = object_field(L, batchi, "device_info", err, errlen);
    if (t == LUA_TTABLE) {
        rc = check_name(L, lua_gettop(L), "platform", "out.batch.device_info", 0,
                        mparticle_platform_known, NULL, err, errlen);
        if (rc == 0)
            rc = check_fields(L, lua_gettop(L), "out.batch.device_info", 0, err, errlen);
    }
    if (t < 0 || rc != 0)
        return -1;
    t = object_field(L, batchi, "user_identities", err, errlen);
    if (t == LUA_TTABLE)
        rc = check_fields(L, lua_gettop(L), "out.batch.user_identities", 1, err, errlen);
    if (t < 0 || rc != 0)
        return -1;
    t = object_field(L, batchi, "user_attributes", err, errlen);
    if (t == LUA_TTABLE)
        /* more than mParticle takes in a batch: the event could never be
         * delivered (counted before each list's items are read) */
        rc = check_attributes(L, lua_gettop(L), "out.batch.user_attributes",
                              MPARTICLE_MAX_USER_ATTRIBUTES, MPARTICLE_MAX_NAME_CHARS, 1, err,
                              errlen);
    return t < 0 ? -1 : rc;
}

/* [-0, +0] Turns the out table at outi into a record. Returns 0, 1 when the
 * output is invalid (reason in err), or -1 when out of memory. */
static int emit(rules *r, lua_State *L, int evi, const struct event_ids *ids, int outi,
                struct mapping *m, char *err, size_t errlen)
{
    int top = lua_gettop(L);
    int rc = 1;
    int failed = 0;
    err[0] = '\0';
    size_t n;

    rawfield(L, outi, "feed");
    const char *feedname = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
    int feed = feedname ? feed_from_name(feedname, n) : -1;
    if (feed < 0) {
        str_copy(err, errlen, "out.feed must be \"ios\", \"android\", \"web\" or \"unbound\"");
        goto done;
    }
    if (rawfield(L, outi, "event") != LUA_TTABLE) {
        str_copy(err, errlen, "out.event must be a table");
        goto done;
    }
    int bt = rawfield(L, outi, "batch");
    if (bt != LUA_TTABLE && bt != LUA_TNIL) {
        str_copy(err, errlen, "out.batch must be a table");
        goto done;
    }
    /* stack: feed event batch, then the tables the check read, kept there
     * until the output is written */
    int no_message_id = 0;
    if (check_output(L, top + 2, top + 3, &no_message_id, err, errlen) != 0)
        goto done;
    struct record tmp = {0};
    tmp.feed = (enum feed)feed;
    tmp.rules_version = ruleset_version(r->rs);

    /* mParticle recognises an event sent twice by its source_message_id: an
     * output without one (a rule made its own) is written with the Braze id,
     * which leaves the table as it was (a rule may return the same one for
     * every event) */
    int filled = no_message_id && ids->id.n > 0, data = 0;
    if (filled && !utf8_valid(ids->id.p, ids->id.n)) {
        str_copy(err, errlen, "the event's id, its source_message_id: " NOT_UTF8_ID);
        goto done;
    }
    if (filled) {
        /* a table, as checked, and held on the stack since */
        if (rawfield(L, top + 2, "data") != LUA_TTABLE) {
            str_copy(err, errlen, "out.event.data must be a table");
            goto done;
        }
        data = lua_gettop(L);
        lua_pushliteral(L, "source_message_id");
        lua_pushlstring(L, ids->id.p, ids->id.n);
        lua_rawset(L, data);
    }
    buf_reset(&r->scratch);
    struct json_clock clock = host_clock(r); /* for the event and its batch fields */
    int written = write_json(L, top + 2, &r->scratch, RULES_MAX_OUTPUT_BYTES, &clock, err, errlen);
    if (filled) {
        lua_pushliteral(L, "source_message_id");
        lua_pushnil(L);
        lua_rawset(L, data);
    }
    if (written != 0) {
        char why[ERR_LEN];
        str_copy(why, sizeof why, err);
        if (r->scratch.len > RULES_MAX_OUTPUT_BYTES || strcmp(why, JSON_TOO_LARGE) == 0)
            str_printf(err, errlen,
                       "out.event takes more than %u bytes as JSON; an mParticle batch holds at "
                       "most 128 KB",
                       (unsigned)RULES_MAX_OUTPUT_BYTES);
        else
            str_printf(err, errlen, "out.event: %s", why);
        goto done;
    }
    tmp.event = mapping_copy(m, r->scratch.data, r->scratch.len, &failed);

    buf_reset(&r->scratch);
    uint64_t whole = 0; /* the batch's fields of one value: environment, ... */
    int has_env = 0;
    if (bt == LUA_TTABLE &&
        flatten_batch(L, top + 3, &r->scratch, &clock, &whole, &has_env, err, errlen) != 0) {
        char why[ERR_LEN];
        str_copy(why, sizeof why, err);
        if (r->scratch.len > RULES_MAX_OUTPUT_BYTES || strcmp(why, JSON_TOO_LARGE) == 0)
            str_printf(err, errlen,
                       "out.batch takes more than %u bytes as JSON; an mParticle batch holds at "
                       "most 128 KB",
                       (unsigned)RULES_MAX_OUTPUT_BYTES);
        else if (strncmp(why, "out.batch", 9) != 0)
            str_printf(err, errlen, "out.batch: %s", why);
        goto done;
    }
    /* the configured environment, for a batch that names none, stored with
     * the event as the rules' own would be: a reload or a restart that changes
     * it sends a batch built again (after a restart, or parked) as it was,
     * under its source_request_id, and keeps it from events mapped since */
    size_t at = r->scratch.len;
    if (!has_env) {
        const char *env = r->rs->cfg->environment;
        if (buf_adds(&r->scratch, "\"environment\"\t\t") != 0 ||
            buf_json_str(&r->scratch, env, strlen(env)) != 0 || buf_addc(&r->scratch, '\n') != 0)
            failed = 1;
        else
            whole += digest_fnv64(DIGEST_FNV64_INIT, r->scratch.data + at, r->scratch.len - at);
    }
    tmp.batch = mapping_copy(m, r->scratch.data, r->scratch.len, &failed);

    /* as the sender counts a batch of this event alone: it fits, so that
     * mParticle does not refuse it for its size */
    struct batch_part alone = {{r->scratch.data, r->scratch.len}, tmp.event, STR_NULL};
    size_t size = mparticle_batch_size_bound(&alone, 1);
    if (size > MPARTICLE_MAX_BATCH_BYTES) {
        str_printf(err, errlen,
                   "the mapped event and its batch fields take %zu bytes in a batch; an "
                   "mParticle batch holds at most 128 KB",
                   size);
        goto done;
    }
    /* the user, whose events the sender puts in one batch: customer_id, the
     * device (its device_info's fingerprint) and the batch's fields of one
     * value (environment, ...), so that a batch never joins the events of two
     * devices or environments, which would all take the last one's; without a
     * customer_id, every batch field together */
    const char *user = NULL;
    size_t ulen = 0;
    /* the customer_id stays on the stack while user points into it (the
     * output check leaves identities strings) */
    if (bt == LUA_TTABLE && rawfield(L, top + 3, "user_identities") == LUA_TTABLE &&
        rawfield(L, -1, "customer_id") == LUA_TSTRING)
        user = lua_tolstring(L, -1, &ulen);
    if (user) {
        uint64_t device = 0;
        if (rawfield(L, top + 3, "device_info") == LUA_TTABLE)
            device = fields_fingerprint(L, lua_gettop(L));
        lua_pop(L, 1);
        /* mixed, so that the two sums cannot cancel out */
        device ^= whole * UINT64_C(0x9e3779b97f4a7c15);
        buf_reset(&r->scratch);
        char tail[24];
        int tn =
            device ? snprintf(tail, sizeof tail, "\x1f%016llx", (unsigned long long)device) : 0;
        if (buf_add(&r->scratch, user, ulen) != 0 || buf_add(&r->scratch, tail, (size_t)tn) != 0)
            failed = 1;
        else
            tmp.user = mapping_copy(m, r->scratch.data, r->scratch.len, &failed);
    } else {
        tmp.user = tmp.batch;
    }

    if (copy_raw(r, L, evi, ids, m, &tmp.raw, &failed, err, errlen) != 0)
        goto done;
    tmp.event_id = ids->id;
    tmp.event_type = ids->type;
    tmp.workspace = ids->workspace;

    struct record *rec = failed ? NULL : mapping_add_record(m);
    if (!rec) {
        rc = -1;
        goto done;
    }
    *rec = tmp;
    rc = 0;
done:
    lua_settop(L, top);
    return rc;
}

/* [-0, +0] Maps the event at evi, of the workspace at wsi (its text in
 * workspace, in m), into m. -1 only when out of memory. */
static int map_event(rules *r, lua_State *L, int evi, int wsi, str raw, str workspace,
                     struct mapping *m)
{
    int top = lua_gettop(L);
    int failed = 0;
    struct event_ids ids;
    ids.raw = raw;
    ids.workspace = workspace;
    size_t n;
    rawfield(L, evi, "id");
    const char *s = lua_tolstring(L, -1, &n);
    ids.id = mapping_copy(m, s, n, &failed);
    rawfield(L, evi, "event_type");
    s = lua_tolstring(L, -1, &n);
    ids.type = mapping_copy(m, s, n, &failed);
    lua_settop(L, top);
    if (!ids.raw.p) {
        /* the event's bytes are not known (the body was read the slow way):
         * written before the rules run, which may change the table */
        char err[ERR_LEN];
        buf_reset(&r->scratch);
        struct json_clock clock = host_clock(r);
        if (write_json(L, evi, &r->scratch, RULES_MAX_ENCODE_BYTES, &clock, err, sizeof err) == 0)
            ids.raw = mapping_copy(m, r->scratch.data, r->scratch.len, &failed);
    }
    if (failed)
        return -1;
    struct chain_result res;
    run_chain(r, L, evi, wsi, r->n - 1, &res);
    struct outcome *o = m->keep_outcomes ? mapping_add_outcome(m) : NULL;
    if (m->keep_outcomes && !o)
        return -1;
    if (o) {
        o->event_id = ids.id;
        o->event_type = ids.type;
    }
    int rc = 0;
    if (res.kind == CHAIN_OUT) {
        char err[ERR_LEN];
        int e = emit(r, L, evi, &ids, top + 1, m, err, sizeof err);
        if (e < 0) {
            rc = -1;
        } else if (e > 0) {
            res.kind = CHAIN_DEAD;
            res.dead_reason = DEAD_INVALID_OUTPUT;
            str_copy(res.detail, sizeof res.detail, err);
        } else if (o) {
            o->kind = OUTCOME_RECORD;
            o->index = m->nrecords - 1;
        }
    }
    if (res.kind == CHAIN_DROP) {
        enum drop_reason why = classify_drop(res.detail);
        m->dropped[why]++;
        if (o) {
            o->kind = OUTCOME_DROPPED;
            o->reason = why;
            o->detail = mapping_copy(m, res.detail, strlen(res.detail), &failed);
            o->dropped_by = mapping_copy(m, res.dropped_by, strlen(res.dropped_by), &failed);
        }
    } else if (res.kind == CHAIN_DEAD) {
        int feed = -1;
        if (lua_istable(L, top + 1) && rawfield(L, top + 1, "feed") == LUA_TSTRING)
            feed = feed_from_name(lua_tostring(L, -1), lua_rawlen(L, -1));
        lua_settop(L, top + 1);
        if (add_dead(r, L, evi, &ids, m, feed, res.dead_reason, res.detail) != 0)
            rc = -1;
        if (o) {
            o->kind = OUTCOME_DEAD;
            o->index = m->ndead - 1;
        }
    }
    lua_settop(L, top);
    return failed ? -1 : rc;
}

/* ---- where each event's bytes are ---------------------------------------- */

/* How the events were laid out in a body. */
enum body_form { FORM_ENVELOPE, FORM_LIST, FORM_EVENT, FORM_LINES };

/* cjson validates and decodes the body; this finds the byte range of every
 * element of the top-level "events" list, so a record keeps the event exactly as
 * Braze sent it without encoding it again. Structural only: it trusts cjson for
 * validity and gives up (-1) on anything unexpected, and the caller then falls
 * back to encoding. */

/* Splits the list at p into its elements; returns the end of the list, or NULL
 * when it is not a list of exactly n elements. */
static const char *split_list(const char *p, const char *end, str *slices, size_t n)
{
    if (p >= end || *p != '[')
        return NULL;
    p++;
    size_t i = 0;
    for (;;) {
        p = json_skip_ws(p, end);
        if (p < end && *p == ']')
            break;
        const char *v = p;
        p = json_skip_value(p, end);
        if (!p || i == n)
            return NULL;
        slices[i++] = (str){v, (size_t)(p - v)};
        p = json_skip_ws(p, end);
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        if (p < end && *p == ']')
            break;
        return NULL;
    }
    return i == n ? p + 1 : NULL;
}

static int hex4(const char *p, unsigned *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hex_digit(p[i]);
        if (d < 0)
            return -1;
        *v = *v << 4 | (unsigned)d;
    }
    return 0;
}

/* Whether the JSON string key[0..n) (between its quotes, as it came, escapes
 * and all) is "events". A key spelt with escapes ("event\u0073") is one too:
 * cjson reads it so. */
static int key_is_events(const char *key, size_t n)
{
    static const char want[] = "events";
    size_t k = 0;
    for (size_t i = 0; i < n; k++) {
        unsigned c = (unsigned char)key[i++];
        if (c == '\\' && i < n) {
            char e = key[i++];
            if (e == 'u' && n - i >= 4) {
                if (hex4(key + i, &c) != 0)
                    return 0;
                i += 4;
            } else if (e == '"' || e == '\\' || e == '/') {
                c = (unsigned char)e;
            } else {
                return 0; /* \b \f \n \r \t: not a letter */
            }
        }
        if (k >= sizeof want - 1 || c != (unsigned char)want[k])
            return 0;
    }
    return k == sizeof want - 1;
}

/* What event_slices returns for an envelope that gives "events" twice: cjson
 * keeps the last list, and the events of the others would be answered 200 and
 * lost. */
#define SLICES_EVENTS_TWICE (-2)
/* And for "events": {}, which cjson decodes as it decodes an empty list. */
#define SLICES_NOT_A_LIST (-3)

/* Fills slices (n of them, the length of the decoded list) or returns -1,
 * SLICES_EVENTS_TWICE or SLICES_NOT_A_LIST. */
static int event_slices(const char *body, size_t len, str *slices, size_t n)
{
    const char *p = body, *end = body + len;
    int found = 0, seen = 0;
    p = json_skip_ws(p, end);
    if (p >= end || *p != '{')
        return -1;
    p++;
    for (;;) {
        p = json_skip_ws(p, end);
        if (p < end && *p == '}')
            break;
        if (p >= end || *p != '"')
            return -1;
        const char *key = p + 1, *key_end = json_skip_string(p, end);
        if (!key_end)
            return -1;
        p = json_skip_ws(key_end, end);
        if (p >= end || *p != ':')
            return -1;
        p = json_skip_ws(p + 1, end);
        if (key_is_events(key, (size_t)(key_end - key - 1))) {
            if (seen++)
                return SLICES_EVENTS_TWICE;
            if (p < end && *p == '{')
                return SLICES_NOT_A_LIST;
            const char *list_end = split_list(p, end, slices, n);
            found = list_end != NULL;
            p = found ? list_end : json_skip_value(p, end); /* on, to a second "events" */
        } else {
            p = json_skip_value(p, end);
        }
        if (!p)
            return -1;
        p = json_skip_ws(p, end);
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        if (p < end && *p == '}')
            break;
        return -1;
    }
    return found ? 0 : -1;
}

/* ---- requests ----------------------------------------------------------- */

/* The byte range of every event of a body decoded as form, so that each is
 * kept as it came (a dead letter stored again by `dlq requeue` stays the
 * event Braze sent, not its re-encoding after the rules ran). -1 when they
 * cannot be told apart; the events are then encoded from their tables.
 * SLICES_EVENTS_TWICE for an envelope that gives "events" twice,
 * SLICES_NOT_A_LIST for one whose "events" is an empty object. */
static int body_slices(const char *body, size_t len, enum body_form form, str *slices, size_t n)
{
    const char *p = json_skip_ws(body, body + len), *end = body + len;
    switch (form) {
    case FORM_ENVELOPE:
        return event_slices(body, len, slices, n);
    case FORM_LIST:
        p = split_list(p, end, slices, n);
        return p && json_skip_ws(p, end) == end ? 0 : -1;
    case FORM_EVENT: {
        const char *v = json_skip_value(p, end);
        if (n != 1 || !v || json_skip_ws(v, end) != end)
            return -1;
        slices[0] = (str){p, (size_t)(v - p)};
        return 0;
    }
    case FORM_LINES:
        break;
    }
    size_t i = 0;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *v = json_skip_ws(p, le);
        if (v < le) {
            const char *ve = json_skip_value(v, le);
            if (i == n || !ve || json_skip_ws(ve, le) != le)
                return -1;
            slices[i++] = (str){v, (size_t)(ve - v)};
        }
        p = le + 1;
    }
    return i == n ? 0 : -1;
}

static int PRINTF(4, 5)
    input_fail(struct input_error *e, int status, long index, const char *fmt, ...)
{
    e->status = status;
    e->index = index;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->reason, sizeof e->reason, fmt, ap);
    va_end(ap);
    return -1;
}

static int is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n')
            return 0;
    }
    return 1;
}

#define DECODE_NO_MEMORY (-2)

struct text_arg {
    rules *r;
    const char *s;
    size_t n;
    int decode; /* push it decoded from JSON */
};

/* Under lua_pcall: the text is copied into Lua there too, so that running out
 * of memory is an error, not a panic. */
static int protected_text(lua_State *L)
{
    const struct text_arg *a = lua_touserdata(L, 1);
    if (a->decode)
        lua_rawgeti(L, LUA_REGISTRYINDEX, a->r->decode_ref);
    lua_pushlstring(L, a->s, a->n);
    if (a->decode)
        lua_call(L, 1, 1);
    return 1;
}

/* [-0, +1 on success] Pushes the n bytes at s as a Lua string, or the value
 * they decode to as JSON (decode). On failure pushes nothing and returns the
 * lua_pcall status, the error message in err. */
static int push_text(rules *r, lua_State *L, const char *s, size_t n, int decode, char *err,
                     size_t errlen)
{
    struct text_arg a = {r, s, n, decode};
    lua_pushcfunction(L, protected_text);
    lua_pushlightuserdata(L, &a);
    int rc = lua_pcall(L, 1, 1, 0);
    if (rc != LUA_OK) {
        str_copy(err, errlen, lua_isstring(L, -1) ? lua_tostring(L, -1) : "invalid JSON");
        lua_pop(L, 1);
    }
    return rc;
}

/* Replaces every \u escape of a UTF-16 surrogate that is not one half of a
 * pair by \ufffd, the replacement character, in place (both are six bytes, so
 * each event keeps its place in the body); returns how many. The JSON grammar
 * allows such escapes (text cut in the middle of an emoji by a producer), cjson
 * refuses them, and a 400 would make Braze drop the event for good. */
static size_t repair_lone_surrogates(char *s, size_t n)
{
    size_t repaired = 0;
    char *p = s, *end = s + n;
    while ((p = memchr(p, '\\', (size_t)(end - p))) != NULL) {
        unsigned hi, lo;
        if (end - p < 6 || p[1] != 'u' || hex4(p + 2, &hi) != 0) {
            p += end - p < 2 ? 1 : 2; /* another escape, \\ among them */
            continue;
        }
        if (hi >= 0xD800 && hi <= 0xDBFF && end - p >= 12 && p[6] == '\\' && p[7] == 'u' &&
            hex4(p + 8, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
            p += 12; /* a pair */
            continue;
        }
        if (hi >= 0xD800 && hi <= 0xDFFF) {
            memcpy(p + 2, "fffd", 4);
            repaired++;
        }
        p += 6;
    }
    return repaired;
}

static int decode_text(rules *r, lua_State *L, const char *s, size_t n, char *err, size_t errlen)
{
    int rc = push_text(r, L, s, n, 1, err, errlen);
    if (rc != LUA_OK)
        return rc == LUA_ERRMEM ? DECODE_NO_MEMORY : -1;
    return 0;
}

/* [-0, +1] Pushes the decoded text; on failure pushes nothing and returns -1
 * (invalid JSON, reason in err) or DECODE_NO_MEMORY (our own trouble: the
 * request may succeed when tried again, so it is not the sender's fault). Text
 * that cjson refuses only for its lone surrogates is decoded once they are
 * repaired (see repair_lone_surrogates). */
static int decode(rules *r, lua_State *L, const char *s, size_t n, char *err, size_t errlen)
{
    int rc = decode_text(r, L, s, n, err, errlen);
    if (rc != -1 || !memchr(s, '\\', n))
        return rc;
    char *copy = malloc(n ? n : 1);
    if (!copy)
        return DECODE_NO_MEMORY;
    memcpy(copy, s, n);
    char first_err[ERR_LEN];
    str_copy(first_err, sizeof first_err, err);
    if (repair_lone_surrogates(copy, n) > 0)
        rc = decode_text(r, L, copy, n, err, errlen);
    if (rc == -1)
        str_copy(err, errlen, first_err); /* the reason the text as sent was refused */
    free(copy);
    return rc;
}

/* The memory a JSON text takes decoded into Lua values, at most: every value
 * a slot of its table (a hash node, with the table's growth to the next power
 * of two and the copy while it grows), every table its header, every string
 * its bytes and header. The values are counted from what comes before them
 * outside strings ('[', ',', ':' and a line end, and the first), an
 * overcount; and the text, which the decoding holds as a Lua string. `[]` in
 * a list, the most per byte, counts 259 bytes for its 3 ("[],"; it takes
 * about 40); Braze events of about 1 KB 9 times their text (they take 2 or
 * 3). Decoding is not cut short instead: lua-cjson keeps a copy of the text
 * outside Lua, which a memory error in the middle leaks. */
#define DECODED_SLOT_BYTES 96
#define DECODED_TABLE_BYTES 64
#define DECODED_STRING_BYTES 64
#define DECODED_MAX_BYTES ((size_t)RULES_DECODE_MEMORY_MB << 20)
/* A text of up to this many bytes cannot take more than DECODED_MAX_BYTES
 * (64 bytes a byte; measured, at most 40): not scanned. */
#define DECODED_BOUND_FREE_BYTES (DECODED_MAX_BYTES / 64)

static size_t decoded_bound(const char *s, size_t n)
{
    size_t slots = 1, tables = 0, strings = 0, string_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        switch (s[i]) {
        case '"': {
            const char *after = json_skip_string(s + i, s + n);
            size_t j = after ? (size_t)(after - s) - 1 : n; /* its closing quote */
            strings++;
            string_bytes += j - i;
            i = j;
            break;
        }
        case '[':
            slots++;
            tables++;
            break;
        case '{':
            tables++;
            break;
        case ',':
        case ':':
        case '\n': /* a line of NDJSON is an item of the list it is decoded into */
            slots++;
            break;
        default:
            break;
        }
    }
    /* and the text itself, held as a Lua string while it is decoded */
    return slots * DECODED_SLOT_BYTES + tables * DECODED_TABLE_BYTES +
           strings * DECODED_STRING_BYTES + string_bytes + n;
}

/* [-0, +1 on success] Pushes the list of events in the body. */
static int decode_events(rules *r, lua_State *L, const char *body, size_t len,
                         enum input_shape shape, enum body_form *form, struct input_error *e)
{
    char err[ERR_LEN];
    int rc = decode(r, L, body, len, err, sizeof err);
    if (rc == DECODE_NO_MEMORY)
        return input_fail(e, 503, -1, "out of memory while decoding");
    if (rc != 0) {
        if (shape != INPUT_ANY)
            return input_fail(e, 400, -1, "malformed JSON: %s", err);
        /* NDJSON: one event per line */
        *form = FORM_LINES;
        lua_newtable(L);
        lua_Integer k = 0;
        const char *p = body, *end = body + len;
        long line = 0;
        while (p < end) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            const char *le = nl ? nl : end;
            line++;
            if (!is_blank(p, (size_t)(le - p))) {
                rc = decode(r, L, p, (size_t)(le - p), err, sizeof err);
                if (rc != 0) {
                    lua_pop(L, 1);
                    if (rc == DECODE_NO_MEMORY)
                        return input_fail(e, 503, -1, "out of memory while decoding");
                    return input_fail(e, 400, -1, "malformed JSON on line %ld: %s", line, err);
                }
                lua_rawseti(L, -2, ++k);
            }
            p = le + 1;
        }
        return 0;
    }
    int top = lua_gettop(L);
    if (!lua_istable(L, top)) {
        lua_pop(L, 1);
        return input_fail(e, 400, -1,
                          shape == INPUT_EVENT ? "expected an event (a JSON object)"
                                               : "expected a JSON object {\"events\": [...]}");
    }
    if (shape == INPUT_EVENT) {
        *form = FORM_EVENT;
        lua_createtable(L, 1, 0);
        lua_insert(L, top);
        lua_rawseti(L, top, 1);
        return 0;
    }
    int t = rawfield(L, top, "events");
    if (t == LUA_TTABLE) {
        *form = FORM_ENVELOPE;
        lua_remove(L, top);
        if (table_shape(L, top) != SHAPE_LIST) {
            lua_pop(L, 1);
            return input_fail(e, 400, -1, "\"events\" must be a list");
        }
        return 0;
    }
    lua_pop(L, 1);
    if (t != LUA_TNIL) {
        lua_pop(L, 1);
        return input_fail(e, 400, -1, "\"events\" must be a list");
    }
    if (shape == INPUT_ENVELOPE) {
        lua_pop(L, 1);
        return input_fail(e, 400, -1, "expected a JSON object {\"events\": [...]}");
    }
    if (rawfield(L, top, "event_type") != LUA_TNIL) {
        /* a single event */
        *form = FORM_EVENT;
        lua_pop(L, 1);
        lua_createtable(L, 1, 0);
        lua_insert(L, top);
        lua_rawseti(L, top, 1);
        return 0;
    }
    lua_pop(L, 1);
    if (table_shape(L, top) != SHAPE_LIST) {
        lua_pop(L, 1);
        return input_fail(e, 400, -1, "expected events: an envelope, a list, an event or NDJSON");
    }
    *form = FORM_LIST;
    return 0;
}

/* The latest event time taken: its milliseconds are exact in a double, the
 * way every JSON reader holds them (2^53 ms, in the year 287396). */
#define MAX_EVENT_TIME_S 9007199254740
#define STR_(x) #x
#define STR(x) STR_(x)

/* Why the event at idx has no non-empty string in field `key` (missing, or
 * not_text), or NULL. A JSON null reads as missing. */
static const char *check_text_field(lua_State *L, int idx, const char *key, const char *missing,
                                    const char *not_text)
{
    int t = rawfield(L, idx, key);
    const char *why = NULL;
    if (t == LUA_TNIL || t == LUA_TLIGHTUSERDATA)
        why = missing;
    else if (t != LUA_TSTRING || lua_rawlen(L, -1) == 0)
        why = not_text;
    lua_pop(L, 1);
    return why;
}

/* A required field: a non-empty string (number for time). */
static const char *check_event(lua_State *L, int idx)
{
    if (!lua_istable(L, idx) || lua_rawlen(L, idx) > 0)
        return "event is not a JSON object";
    const char *why = check_text_field(L, idx, "event_type", "missing event_type",
                                       "event_type must be a non-empty string");
    if (!why)
        why = check_text_field(L, idx, "id", "missing id", "id must be a non-empty string");
    if (why)
        return why;
    int t = rawfield(L, idx, "time");
    if (t == LUA_TNIL || t == LUA_TLIGHTUSERDATA)
        why = "missing time";
    else if (t != LUA_TNUMBER)
        why = "time must be a number (UNIX seconds)";
    else if (!(lua_tonumber(L, -1) >= 0 && lua_tonumber(L, -1) <= MAX_EVENT_TIME_S))
        why = "time must be UNIX seconds from 0 to " STR(MAX_EVENT_TIME_S); /* or NaN */
    lua_pop(L, 1);
    return why;
}

int rules_map(rules *r, const char *body, size_t len, enum input_shape shape, str workspace,
              struct mapping *m, struct input_error *e)
{
    e->status = 0;
    e->index = -1;
    e->reason[0] = '\0';
    /* RFC 8259 lets a parser ignore a byte-order mark: refused, each event
     * would be refused alone too */
    size_t bom = utf8_bom_len(body, len);
    body += bom;
    len -= bom;
    if (is_blank(body, len))
        return 0;
    lua_State *L = sandbox_lua(r->sb);
    int top = lua_gettop(L);
    enum body_form form = FORM_ENVELOPE; /* set by decode_events */
    if (len > DECODED_BOUND_FREE_BYTES && decoded_bound(body, len) > DECODED_MAX_BYTES)
        return input_fail(e, 413, -1,
                          "the request's events may take more than %d MiB decoded; send fewer "
                          "at a time",
                          RULES_DECODE_MEMORY_MB);
    if (decode_events(r, L, body, len, shape, &form, e) != 0) {
        lua_settop(L, top);
        return -1;
    }
    int evs = lua_gettop(L);
    lua_Integer n = (lua_Integer)lua_rawlen(L, evs);
    struct config *c = r->rs->cfg;
    if (n > c->inbound_max_events) {
        lua_settop(L, top);
        return input_fail(e, 413, -1, "%lld events in one request; at most %lld", (long long)n,
                          (long long)c->inbound_max_events);
    }
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, evs, i);
        const char *why = check_event(L, lua_gettop(L));
        lua_pop(L, 1);
        if (why) {
            lua_settop(L, top);
            return input_fail(e, 400, (long)(i - 1), "%s", why);
        }
    }
    /* the rules' third argument, and the text each record and dead letter keeps */
    int failed = 0;
    str ws = workspace.p ? mapping_copy(m, workspace.p, workspace.n, &failed) : STR_NULL;
    char err[ERR_LEN];
    if (!workspace.p) {
        lua_pushnil(L);
    } else if (failed || push_text(r, L, workspace.p, workspace.n, 0, err, sizeof err) != LUA_OK) {
        lua_settop(L, top);
        return input_fail(e, 503, -1, "out of memory while mapping");
    }
    int wsi = lua_gettop(L);
    begin_events(r);
    size_t nrec = m->nrecords, ndead = m->ndead, nout = m->noutcomes;
    size_t dropped[DROP_REASON_COUNT];
    memcpy(dropped, m->dropped, sizeof dropped);
    /* the events' own bytes, when the scanner can follow the body */
    str *raws = n > 0 ? calloc((size_t)n, sizeof(*raws)) : NULL;
    int sliced = raws || n == 0 ? body_slices(body, len, form, raws, (size_t)n) : -1;
    if (sliced == SLICES_EVENTS_TWICE) {
        free(raws);
        lua_settop(L, top);
        return input_fail(e, 400, -1, "\"events\" is given more than once");
    }
    if (sliced == SLICES_NOT_A_LIST) {
        free(raws);
        lua_settop(L, top);
        return input_fail(e, 400, -1, "\"events\" must be a list");
    }
    if (sliced != 0) {
        free(raws);
        raws = NULL;
    }
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, evs, i);
        int rc = map_event(r, L, lua_gettop(L), wsi, raws ? raws[i - 1] : STR_NULL, ws, m);
        lua_pop(L, 1);
        if (rc != 0) {
            free(raws);
            m->nrecords = nrec;
            m->ndead = ndead;
            m->noutcomes = nout;
            memcpy(m->dropped, dropped, sizeof dropped);
            lua_settop(L, top);
            return input_fail(e, 503, -1, "out of memory while mapping");
        }
    }
    free(raws);
    m->nevents += (size_t)n;
    lua_settop(L, top);
    return 0;
}

/* ---- rule tests --------------------------------------------------------- */

/* A value for a test report, without running metamethods. */
static void show(lua_State *L, int idx, char *out, size_t outlen)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        str_printf(out, outlen, "\"%s\"", lua_tostring(L, idx));
        break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            str_printf(out, outlen, "%lld", (long long)lua_tointeger(L, idx));
        else
            str_printf(out, outlen, "%.14g", (double)lua_tonumber(L, idx));
        break;
    case LUA_TBOOLEAN:
        str_copy(out, outlen, lua_toboolean(L, idx) ? "true" : "false");
        break;
    case LUA_TLIGHTUSERDATA:
        str_copy(out, outlen, lua_touserdata(L, idx) ? "userdata" : "null");
        break;
    default:
        str_copy(out, outlen, luaL_typename(L, idx));
        break;
    }
}

/* Compares actual (at a) with expected (at x): every field of expected must be
 * equal in actual; tributary.absent requires the field to be missing. Writes the
 * first difference into diff and returns 0 when they differ. */
#define TEST_MAX_DEPTH 32

static int matches(rules *r, lua_State *L, int a, int x, char *path, size_t pathlen, char *diff,
                   size_t difflen, int depth)
{
    a = lua_absindex(L, a);
    x = lua_absindex(L, x);
    if (depth > TEST_MAX_DEPTH || !lua_checkstack(L, 8)) {
        str_printf(diff, difflen, "%s: the expectation is nested more than %d levels deep", path,
                   TEST_MAX_DEPTH);
        return 0;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->absent_ref);
    int absent = lua_rawequal(L, -1, x);
    lua_pop(L, 1);
    if (absent) {
        if (lua_isnil(L, a))
            return 1;
        char got[120];
        show(L, a, got, sizeof got);
        str_printf(diff, difflen, "%s: expected to be absent, got %s", path, got);
        return 0;
    }
    if (lua_istable(L, x)) {
        if (!lua_istable(L, a)) {
            str_printf(diff, difflen, "%s: expected a table, got %s", path, luaL_typename(L, a));
            return 0;
        }
        size_t plen = strlen(path);
        lua_pushnil(L);
        while (lua_next(L, x)) {
            lua_pushvalue(L, -2);
            lua_rawget(L, a); /* key xv av */
            if (lua_type(L, -3) == LUA_TNUMBER)
                snprintf(path + plen, pathlen - plen, "[%lld]", (long long)lua_tointeger(L, -3));
            else if (lua_type(L, -3) == LUA_TSTRING)
                snprintf(path + plen, pathlen - plen, ".%s", lua_tostring(L, -3));
            else
                snprintf(path + plen, pathlen - plen, "[%s]", luaL_typename(L, -3));
            int ok = matches(r, L, -1, -2, path, pathlen, diff, difflen, depth + 1);
            path[plen] = '\0';
            lua_pop(L, 2);
            if (!ok) {
                lua_pop(L, 1);
                return 0;
            }
        }
        return 1;
    }
    if (lua_rawequal(L, a, x) || (lua_type(L, a) == LUA_TNUMBER && lua_type(L, x) == LUA_TNUMBER &&
                                  lua_compare(L, a, x, LUA_OPEQ)))
        return 1;
    char want[120], got[120];
    show(L, x, want, sizeof want);
    show(L, a, got, sizeof got);
    str_printf(diff, difflen, "%s: expected %s, got %s", path, want, got);
    return 0;
}

#define TEST_EVENT_MAX_DEPTH (RULES_MAX_JSON_DEPTH - 2)

/* [-0, +1] Pushes a copy of the value at idx as cjson.decode gives it from its
 * JSON text: numbers as floats (a decoded 3 is 3.0, and "step-" .. 3.0 is
 * "step-3.0"), so that a rule meets in its tests the values it meets in
 * service. Returns 0, or -1 (with nothing pushed) and in err the path (in
 * `path`) of a value JSON cannot carry. The event is at depth 0. */
static int push_as_decoded(lua_State *L, int idx, char *path, size_t pathlen, char *err,
                           size_t errlen, int depth)
{
    idx = lua_absindex(L, idx);
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER: {
        lua_Number v = lua_tonumber(L, idx);
        if (v != v)
            break; /* NaN: no JSON number reads as one */
        lua_pushnumber(L, v);
        return 0;
    }
    case LUA_TSTRING:
    case LUA_TBOOLEAN:
        lua_pushvalue(L, idx);
        return 0;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) { /* cjson.null */
            lua_pushvalue(L, idx);
            return 0;
        }
        break;
    case LUA_TTABLE:
        /* the depth to which the service decodes a Currents request, whose
         * object and list of events take two levels */
        if (depth >= TEST_EVENT_MAX_DEPTH) {
            str_printf(err, errlen,
                       "%s is nested more than %d levels deep, as no event of a Currents request "
                       "is",
                       path, TEST_EVENT_MAX_DEPTH);
            return -1;
        }
        luaL_checkstack(L, 6, "a test's event");
        if (table_shape(L, idx) == SHAPE_OTHER) {
            str_printf(err, errlen,
                       "%s is neither a list (keys 1 to n, no gaps: a JSON null in a list is "
                       "cjson.null) nor an object (text keys), which is all JSON gives",
                       path);
            return -1;
        }
        lua_newtable(L);
        size_t plen = strlen(path);
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            if (lua_type(L, -2) == LUA_TSTRING)
                snprintf(path + plen, pathlen - plen, ".%s", lua_tostring(L, -2));
            else if (lua_isinteger(L, -2))
                snprintf(path + plen, pathlen - plen, "[%lld]", (long long)lua_tointeger(L, -2));
            else
                snprintf(path + plen, pathlen - plen, "[%s]", luaL_typename(L, -2));
            if (push_as_decoded(L, -1, path, pathlen, err, errlen, depth + 1) != 0) {
                lua_pop(L, 3);
                return -1;
            }
            path[plen] = '\0';
            lua_pushvalue(L, -3);
            lua_insert(L, -2); /* t key value key copy */
            lua_rawset(L, -5); /* t key value */
            lua_pop(L, 1);
        }
        return 0;
    default:
        break;
    }
    str_printf(err, errlen, "%s is a %s, which JSON cannot carry: an event comes as JSON", path,
               lua_type(L, idx) == LUA_TNUMBER ? "NaN" : luaL_typename(L, idx));
    return -1;
}

/* Whether the event of the test at ti, run through every rule file, comes out
 * as anything but a dead letter (a drop or an output the host can store);
 * else diff says why. */
static int after_files_keep(rules *r, lua_State *L, int ti, int wsi, char *diff, size_t difflen)
{
    int top = lua_gettop(L);
    char where[256] = "event", err[ERR_LEN];
    int kept = 0;
    rawfield(L, ti, "event");
    if (push_as_decoded(L, -1, where, sizeof where, diff, difflen, 0) != 0)
        goto done;
    int evi = lua_gettop(L);
    struct chain_result res;
    begin_events(r);
    sandbox_quiet(r->sb, 1); /* a file that prints would say each event a second time */
    run_chain(r, L, evi, wsi, r->n - 1, &res);
    sandbox_quiet(r->sb, 0);
    if (res.kind == CHAIN_DEAD) {
        str_printf(diff, difflen,
                   "the event passes this file, and then goes to the dead-letter store in the "
                   "files after it (%s): %s",
                   res.dead_reason, res.detail);
        goto done;
    }
    if (res.kind == CHAIN_OUT) {
        struct mapping scratch;
        mapping_init(&scratch);
        struct event_ids ids = {{"test", 4}, {"test", 4}, STR_NULL, STR_NULL};
        int e = emit(r, L, evi, &ids, lua_gettop(L), &scratch, err, sizeof err);
        mapping_free(&scratch);
        if (e != 0) {
            str_printf(diff, difflen,
                       "the event passes this file, and then the output of the files after it "
                       "is not valid: %s",
                       e > 0 ? err : "out of memory");
            goto done;
        }
    }
    kept = 1;
done:
    lua_settop(L, top);
    return kept;
}

/* [-0, +0] Runs one test (table at ti) of file k. Returns 1 passed, 0 failed.
 * after: the test passed, and its event goes through every file instead (see
 * rules_self_test): 1, and a warning noted when it becomes a dead letter. */
static int run_test(rules *r, lua_State *L, size_t k, int ti, long index, buf *report, int after)
{
    const char *fname = r->rs->files[k].name;
    int top = lua_gettop(L);
    char name[200];
    if (rawfield(L, ti, "name") == LUA_TSTRING)
        snprintf(name, sizeof name, "'%s'", lua_tostring(L, -1));
    else
        snprintf(name, sizeof name, "#%ld", index);
    lua_pop(L, 1);

    char diff[ERR_LEN];
    int ok = 0;
    const char *refused = NULL; /* what the service would answer 400 for */
    if (known_keys(L, ti, TEST_KEYS, ARRAY_LEN(TEST_KEYS), 0, "the test", diff, sizeof diff) != 0)
        goto done;
    /* Tests see every feed configured and no event selection, unless their
     * `config` says otherwise. */
    int ct = rawfield(L, ti, "config");
    if (ct == LUA_TTABLE) {
        if (known_keys(L, -1, TEST_CONFIG_KEYS, ARRAY_LEN(TEST_CONFIG_KEYS), 0,
                       "the test's `config`", diff, sizeof diff) != 0)
            goto done;
        for (size_t i = 0; i < ARRAY_LEN(TEST_CONFIG_KEYS); i++) {
            int want = strcmp(TEST_CONFIG_KEYS[i], "environment") == 0 ? LUA_TSTRING : LUA_TTABLE;
            int got = rawfield(L, -1, TEST_CONFIG_KEYS[i]);
            lua_pop(L, 1);
            if (got != LUA_TNIL && got != want) {
                str_printf(diff, sizeof diff, "the test's `config.%s` must be a %s, not %s",
                           TEST_CONFIG_KEYS[i], lua_typename(L, want), lua_typename(L, got));
                goto done;
            }
        }
        if (rawfield(L, -1, "feeds") == LUA_TTABLE &&
            (known_keys(L, -1, FEED_NAMES, FEED_COUNT, 0, "the test's `config.feeds`", diff,
                        sizeof diff) != 0 ||
             test_feeds_valid(L, -1, diff, sizeof diff) != 0))
            goto done;
        lua_pop(L, 1);
        if (rawfield(L, -1, "apps") == LUA_TTABLE && test_apps_valid(L, -1, diff, sizeof diff) != 0)
            goto done;
        lua_pop(L, 1);
        /* a list of names: a set of them selected nothing */
        if (rawfield(L, -1, "events") == LUA_TTABLE &&
            must_be_list(L, -1, "the test's `config.events`", LUA_TSTRING,
                         " (a set? list the names: events = { \"users.messages.email.Open\" })",
                         diff, sizeof diff) != 0)
            goto done;
        lua_pop(L, 1);
    } else if (ct == LUA_TNIL) {
        lua_pop(L, 1);
        lua_newtable(L);
    } else {
        str_printf(diff, sizeof diff, "the test's `config` must be a table, not %s",
                   lua_typename(L, ct));
        goto done;
    }
    set_context(r, L, lua_gettop(L));
    if (rawfield(L, ti, "event") != LUA_TTABLE) {
        str_copy(diff, sizeof diff, "the test has no `event` table");
        goto done;
    }
    char where[256] = "event";
    if (push_as_decoded(L, -1, where, sizeof where, diff, sizeof diff, 0) != 0)
        goto done;
    int evi = lua_gettop(L);
    /* a static text: checked before any rule can change the event */
    refused = check_event(L, evi);
    int wst = rawfield(L, ti, "workspace");
    if (wst != LUA_TNIL && wst != LUA_TSTRING) {
        str_copy(diff, sizeof diff, "the test's `workspace` must be a string");
        goto done;
    }
    int wsi = lua_gettop(L);
    if (after) {
        if (!after_files_keep(r, L, ti, wsi, diff, sizeof diff) && r->dead_after++ == 0)
            str_printf(r->dead_after_first, sizeof r->dead_after_first, "%s: test %s: %s", fname,
                       name, diff);
        lua_settop(L, top);
        return 1;
    }
    struct chain_result res;
    begin_events(r);
    run_chain(r, L, evi, wsi, k, &res);
    int outi = lua_gettop(L);
    int xt = rawfield(L, ti, "expect");
    int dt = rawfield(L, ti, "expect_drop");
    if (xt == LUA_TNIL && dt == LUA_TNIL) {
        str_copy(diff, sizeof diff, "the test has neither `expect` nor `expect_drop`");
        goto done;
    }
    if (xt != LUA_TNIL && dt != LUA_TNIL) {
        str_copy(diff, sizeof diff, "the test has both `expect` and `expect_drop`; give one");
        goto done;
    }
    if (dt != LUA_TNIL && dt != LUA_TSTRING) {
        /* `expect_drop = false` passed for any drop: it reads as "kept" */
        str_printf(diff, sizeof diff,
                   "`expect_drop` must be the reason of the drop (a string), not %s",
                   lua_typename(L, dt));
        goto done;
    }
    if (res.kind == CHAIN_DEAD) {
        str_printf(diff, sizeof diff, "the event went to the dead-letter store (%s): %s",
                   res.dead_reason, res.detail);
        goto done;
    }
    if (dt != LUA_TNIL) {
        const char *want = lua_tostring(L, -1);
        if (res.kind != CHAIN_DROP)
            str_printf(diff, sizeof diff, "expected a drop (%s), but the event was mapped", want);
        else if (strcmp(want, res.detail) != 0)
            str_printf(diff, sizeof diff, "expected drop reason \"%s\", got \"%s\" (from %s)", want,
                       res.detail, res.dropped_by);
        else
            ok = 1;
        goto done;
    }
    if (res.kind == CHAIN_DROP) {
        str_printf(diff, sizeof diff,
                   "expected an output, but %s dropped the event (%s); a drop ends the chain, "
                   "later files do not see the event",
                   res.dropped_by, res.detail);
        goto done;
    }
    char path[256] = "out";
    if (!matches(r, L, outi, outi + 1, path, sizeof path, diff, sizeof diff, 0))
        goto done;
    /* the output must also be something the host can store */
    struct mapping scratch;
    mapping_init(&scratch);
    char err[ERR_LEN];
    struct event_ids ids = {{"test", 4}, {"test", 4}, STR_NULL, STR_NULL};
    int e = emit(r, L, evi, &ids, outi, &scratch, err, sizeof err);
    mapping_free(&scratch);
    if (e != 0) {
        str_printf(diff, sizeof diff, "the output is not valid: %s", e > 0 ? err : "out of memory");
        goto done;
    }
    ok = 1;
done:
    if (!report) /* after: it passed before, and fails nothing now */
        ok = 1;
    else if (!ok && refused)
        (void)!buf_printf(report,
                          "%s: test %s failed: %s (and its event is one the service "
                          "refuses: %s)\n",
                          fname, name, diff, refused);
    else if (!ok)
        (void)!buf_printf(report, "%s: test %s failed: %s\n", fname, name, diff);
    else if (refused && r->refused++ == 0)
        str_printf(r->refused_first, sizeof r->refused_first, "%s: test %s: %s", fname, name,
                   refused);
    lua_settop(L, top);
    return ok;
}

struct test_call {
    rules *r;
    size_t k;
    long index;
    buf *report;
    int after; /* see run_test */
    int ok;
};

/* Runs one test (the table below the light userdata) under lua_pcall: a test's
 * own data (a nil key in config.events, a cyclic expectation) may raise. */
static int protected_test(lua_State *L)
{
    struct test_call *t = lua_touserdata(L, 1);
    t->ok = run_test(t->r, L, t->k, 2, t->index, t->report, t->after);
    return 0;
}

static int protected_context(lua_State *L)
{
    set_context(lua_touserdata(L, 1), L, 0);
    return 0;
}

/* Each rule test may take an event's time limit: together they are bounded,
 * so that `check` and a reload end. Says in the report why test #i of file is
 * not run, and returns 1; 0 when it may run. */
static int tests_stop(const rules *r, buf *report, const char *file, lua_Integer i, int ntests,
                      int64_t deadline)
{
    if (r->cancel && atomic_load(r->cancel))
        (void)!buf_printf(report, "%s: test #%lld not run: the service is stopping\n", file,
                          (long long)i);
    else if (ntests == RULES_MAX_TESTS)
        (void)!buf_printf(report,
                          "%s: test #%lld not run: more rule tests than %d; make them fewer\n",
                          file, (long long)i, RULES_MAX_TESTS);
    else if (clock_mono_ms() > deadline)
        (void)!buf_printf(report,
                          "%s: test #%lld not run: the rule tests took more than %d s together; "
                          "make them fewer or quicker\n",
                          file, (long long)i, RULES_TESTS_TIME_S);
    else
        return 0;
    return 1;
}

void rules_tests_cancelled_by(rules *r, const atomic_int *cancel)
{
    r->cancel = cancel;
}

void rules_prints_unlimited(void)
{
    sandbox_prints_unlimited();
}

/* Runs test i of file k (the table on top) under lua_pcall; whether it passed
 * (see run_test for after). */
static int call_test(rules *r, lua_State *L, size_t k, lua_Integer i, buf *report, int after)
{
    struct test_call t = {r, k, (long)i, report, after, 0};
    lua_pushcfunction(L, protected_test);
    lua_pushlightuserdata(L, &t);
    lua_pushvalue(L, -3);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        if (!after)
            (void)!buf_printf(report, "%s: test #%lld cannot run: %s\n", r->rs->files[k].name,
                              (long long)i, lua_isstring(L, -1) ? lua_tostring(L, -1) : "error");
        lua_pop(L, 1);
        return 0;
    }
    return t.ok;
}

/* Calls visit with test i of file k on top of the stack, for each test of the
 * first `files` files in order, until it returns nonzero (then 1). */
typedef int (*test_visit)(rules *r, lua_State *L, size_t k, lua_Integer i, void *ctx);
static int each_test(rules *r, lua_State *L, size_t files, test_visit visit, void *ctx)
{
    int top = lua_gettop(L);
    for (size_t k = 0; k < files; k++) {
        if (r->tests_refs[k] == LUA_NOREF)
            continue;
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->tests_refs[k]);
        int tt = lua_gettop(L);
        lua_Integer n = (lua_Integer)lua_rawlen(L, tt);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, tt, i);
            int stop = visit(r, L, k, i, ctx);
            lua_settop(L, tt);
            if (stop) {
                lua_settop(L, top);
                return 1;
            }
        }
        lua_settop(L, top);
    }
    return 0;
}

/* Once every test passed, runs the event of each test through the files after
 * its own too, which see such events in service: one that fails on them (a
 * field it takes for granted) would make each a dead letter, with no test of
 * its own to say so. Only warnings (rules that passed before still start),
 * after all the tests (the files' state, such as a set kept in a global, was
 * theirs to see first), within RULES_AFTER_TIME_S. */
#define RULES_AFTER_TIME_S 10

struct after_pass {
    int64_t deadline;
    int left; /* tests not run: past the deadline, or cancelled */
};

static int test_after(rules *r, lua_State *L, size_t k, lua_Integer i, void *ctx)
{
    struct after_pass *a = ctx;
    if (clock_mono_ms() > a->deadline || (r->cancel && atomic_load(r->cancel)))
        a->left++;
    else
        (void)call_test(r, L, k, i, NULL, 1);
    return 0;
}

static void run_tests_after(rules *r, lua_State *L, buf *warnings)
{
    struct after_pass a = {clock_mono_ms() + RULES_AFTER_TIME_S * 1000, 0};
    if (r->n > 1)
        (void)each_test(r, L, r->n - 1, test_after, &a);
    if (a.left)
        (void)!buf_printf(warnings,
                          "the events of %d rule test%s were not run through the files after "
                          "theirs: that took more than %d s\n",
                          a.left, a.left == 1 ? "" : "s", RULES_AFTER_TIME_S);
}

struct own_pass {
    buf *report;
    int *ntests;
    int failures;
    int64_t deadline;
};

/* A test in its own file: 1 (stop) when no more may run. */
static int test_own(rules *r, lua_State *L, size_t k, lua_Integer i, void *ctx)
{
    struct own_pass *o = ctx;
    const char *file = r->rs->files[k].name;
    if (tests_stop(r, o->report, file, i, *o->ntests, o->deadline)) {
        o->failures++;
        return 1;
    }
    (*o->ntests)++;
    if (!lua_istable(L, -1)) {
        (void)!buf_printf(o->report, "%s: test #%lld is not a table\n", file, (long long)i);
        o->failures++;
    } else if (!call_test(r, L, k, i, o->report, 0)) {
        o->failures++;
    }
    return 0;
}

int rules_self_test(rules *r, buf *report, buf *warnings, int *ntests)
{
    lua_State *L = sandbox_lua(r->sb);
    int top = lua_gettop(L);
    *ntests = 0;
    r->testing = 1;
    r->dead_after = 0;
    r->refused = 0;
    struct own_pass own = {report, ntests, 0, clock_mono_ms() + RULES_TESTS_TIME_S * 1000};
    int stopped = each_test(r, L, r->n, test_own, &own);
    int failures = own.failures;
    if (failures == 0 && !stopped)
        run_tests_after(r, L, warnings);
    r->testing = 0;
    if (r->refused)
        (void)!buf_printf(warnings,
                          "the events of %d rule test%s are ones the service refuses (400), which "
                          "the rules never see: give them what Braze sends; the first: %s\n",
                          r->refused, r->refused == 1 ? "" : "s", r->refused_first);
    if (r->dead_after)
        (void)!buf_printf(warnings,
                          "the events of %d rule test%s pass their own file and go to the "
                          "dead-letter store in the files after it: such events would be dead "
                          "letters; the first: %s\n",
                          r->dead_after, r->dead_after == 1 ? "" : "s", r->dead_after_first);
    lua_pushcfunction(L, protected_context);
    lua_pushlightuserdata(L, r);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        lua_settop(L, top);
        return -1;
    }
    lua_settop(L, top);
    return failures;
}
