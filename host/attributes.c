#include "attributes.h"

#include "mparticle.h"
#include "util.h"

#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The arguments of custom_attributes; the skip arguments follow. */
enum { PROPS = 1, EXTRA = 2, FIRST_SKIP = 3 };

/* What a number or boolean value takes as text, at most (%.17g). */
#define NUMBER_BYTES 24

/* Upvalues: what writes a table as an attribute's JSON text, and
 * tributary.count. */
enum { TEXT = 1, COUNT = 2 };

/* The skip arguments that can skip something (names and sets), at most. */
#define MAX_SKIPS 16
/* Attributes left out for want of room that are tried before the rest are
 * left out too: each costs the making of its text, and an event may have
 * thousands. */
#define MAX_TOO_LARGE 100

struct job {
    const char *names[MAX_SKIPS]; /* the names among them */
    size_t name_lens[MAX_SKIPS];
    int nnames;
    int sets[MAX_SKIPS]; /* stack indices of the sets among them */
    int nsets;
    int out;           /* index of the attributes table */
    int exact;         /* sizes measured as JSON text, not bounded from the lengths */
    int names_changed; /* a name was cut, or had bytes that are not UTF-8: two may
                          now be one (see keep_first_by_name) */
    lua_Integer cuts, dropped;
};

/* A name of a kept attribute, for choosing 100 of more (its string is also in
 * a table on the stack: props may be a weak table, whose entries the collector
 * can take meanwhile). */
struct name {
    const char *s;
    size_t len;
    int extra;
};

static int is_null(lua_State *L, int idx)
{
    return lua_type(L, idx) == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == NULL;
}

static int is_absent(lua_State *L, int idx)
{
    return lua_isnil(L, idx) || is_null(L, idx);
}

static int is_finite_number(lua_State *L, int idx)
{
    return lua_isinteger(L, idx) || isfinite((double)lua_tonumber(L, idx));
}

/* Whether a skip argument leaves out the property named by the string at idx. */
static int is_skipped(lua_State *L, const struct job *j, int idx)
{
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    for (int i = 0; i < j->nnames; i++) {
        /* short strings are interned: mostly the same pointer */
        if (n == j->name_lens[i] && (s == j->names[i] || memcmp(s, j->names[i], n) == 0))
            return 1;
    }
    for (int i = 0; i < j->nsets; i++) {
        lua_pushvalue(L, idx);
        lua_rawget(L, j->sets[i]);
        int hit = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (hit)
            return 1;
    }
    return 0;
}

/* Takes in the skip arguments, from FIRST_SKIP to the top. */
static void read_skips(lua_State *L, struct job *j)
{
    int top = lua_gettop(L);
    for (int i = FIRST_SKIP; i <= top; i++) {
        int t = lua_type(L, i);
        luaL_argexpected(L,
                         t == LUA_TSTRING || t == LUA_TTABLE || t == LUA_TNIL ||
                             (t == LUA_TBOOLEAN && !lua_toboolean(L, i)),
                         i, "a name, a set of names, nil or false");
        if (t != LUA_TSTRING && t != LUA_TTABLE)
            continue;
        if (j->nnames + j->nsets == MAX_SKIPS)
            luaL_error(L, "custom_attributes: more than %d names and sets to skip", MAX_SKIPS);
        if (t == LUA_TSTRING) {
            j->names[j->nnames] = lua_tolstring(L, i, &j->name_lens[j->nnames]);
            j->nnames++;
        } else {
            j->sets[j->nsets++] = i;
        }
    }
}

/* Whether the entry of extra whose key is at idx is added: props has no value
 * of its own under that name. Extra's value is on top. */
static int adds_extra(lua_State *L, int idx)
{
    if (is_absent(L, -1))
        return 0;
    if (lua_type(L, idx) != LUA_TSTRING)
        return luaL_error(L, "custom_attributes: the names in extra must be strings, not %s",
                          luaL_typename(L, idx));
    lua_pushvalue(L, idx);
    lua_rawget(L, PROPS);
    int own = !is_absent(L, -1);
    lua_pop(L, 1);
    return !own;
}

/* Whether the property whose key and value are on top is kept. */
static int keeps_property(lua_State *L, const struct job *j)
{
    int key = lua_gettop(L) - 1;
    if (is_null(L, -1))
        return 0;
    if (lua_type(L, key) != LUA_TSTRING)
        return luaL_error(L, "custom_attributes: property names must be strings, not %s",
                          luaL_typename(L, key));
    return !is_skipped(L, j, key);
}

/* How many bytes of s[0..n) to keep for at most max characters, counted as
 * the JSON writer writes them (a byte that begins no UTF-8 sequence is one,
 * U+FFFD); *cut says whether that is fewer than n. */
static size_t cut_length(const char *s, size_t n, size_t max, int *cut)
{
    size_t keep = n > max ? json_str_prefix(s, n, max) : n;
    *cut = keep < n;
    return keep;
}

void attributes_push_as_written(lua_State *L, const char *s, size_t n)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n;) {
        size_t len = utf8_sequence((const unsigned char *)s + i, n - i);
        if (len > 0)
            luaL_addlstring(&b, s + i, len);
        else
            luaL_addlstring(&b, "\xEF\xBF\xBD", 3);
        i += len > 0 ? len : 1;
    }
    luaL_pushresult(&b);
}

/* [-0, +1] Pushes the JSON text of the table at idx, as far as an attribute
 * keeps it; returns whether it stopped short. */
static int push_json(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_pushvalue(L, lua_upvalueindex(TEXT));
    lua_pushvalue(L, idx);
    lua_call(L, 1, 2);
    int stopped = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stopped;
}

/* [-0, +1] Pushes the text of the table at idx: a list's items joined with
 * ",", an object's JSON text; returns whether it stopped short of the whole
 * (when the text has fewer characters than an attribute keeps: a text longer
 * than that is cut anyway). Joining stops at ATTRIBUTE_TEXT_BYTES, which would
 * otherwise write every item of a list of large tables to keep 4,096
 * characters. */
static int push_table_text(lua_State *L, int idx)
{
    if (lua_rawlen(L, idx) == 0) {
        lua_pushnil(L);
        if (lua_next(L, idx)) {
            lua_pop(L, 2);
            return push_json(L, idx);
        }
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int any = 0, stopped = 0;
    for (lua_Integer i = 1; !stopped && luaL_bufflen(&b) <= ATTRIBUTE_TEXT_BYTES; i++) {
        int t = lua_rawgeti(L, idx, i);
        if (t == LUA_TNIL) {
            lua_pop(L, 1);
            break;
        }
        if (is_null(L, -1) || (t == LUA_TNUMBER && !is_finite_number(L, -1))) {
            lua_pop(L, 1);
            continue;
        }
        if (t == LUA_TBOOLEAN) {
            int v = lua_toboolean(L, -1);
            lua_pop(L, 1);
            lua_pushstring(L, v ? "true" : "false");
        } else if (t != LUA_TSTRING) {
            stopped = push_json(L, -1);
            lua_remove(L, -2);
        }
        luaL_addvalue(&b);
        luaL_addchar(&b, ',');
        any = 1;
    }
    if (any)
        luaL_buffsub(&b, 1);
    luaL_pushresult(&b);
    return stopped;
}

/* The size of a string as JSON text: measured, or at most. */
static size_t text_size(const struct job *j, const char *s, size_t n)
{
    return j->exact ? json_str_len(s, n) : n * JSON_MAX_BYTES_PER_BYTE + 2;
}

/* The size of the attribute on top (name, value) as JSON text, with its colon
 * and comma: measured, or at most. */
static size_t attribute_size(lua_State *L, const struct job *j)
{
    size_t n;
    const char *s = lua_tolstring(L, -2, &n);
    size_t size = text_size(j, s, n) + 2;
    if (lua_type(L, -1) != LUA_TSTRING)
        return size + NUMBER_BYTES;
    s = lua_tolstring(L, -1, &n);
    return size + text_size(j, s, n);
}

/* [-0, +2, or +0 when it returns 0] Pushes the name (a string at index k) and
 * the value (at v) of an attribute as they go out, within mParticle's limits;
 * *cuts says how many of the two were cut. Returns their size as JSON text
 * (see attribute_size), or 0 for a value left out (counted). */
static size_t push_attribute(lua_State *L, struct job *j, int k, int v, int *cuts)
{
    int t = lua_type(L, v);
    if (t == LUA_TNUMBER && !is_finite_number(L, v)) {
        j->dropped++;
        return 0;
    }
    int cut;
    size_t n;
    const char *s = lua_tolstring(L, k, &n);
    size_t keep = cut_length(s, n, MPARTICLE_MAX_NAME_CHARS, &cut);
    int replaced = !utf8_valid(s, keep);
    *cuts = cut;
    j->names_changed |= cut || replaced;
    if (replaced)
        attributes_push_as_written(L, s, keep);
    else if (cut)
        lua_pushlstring(L, s, keep);
    else
        lua_pushvalue(L, k);
    size_t size = text_size(j, s, keep) + 2;
    int stopped = 0;
    if (t == LUA_TTABLE)
        stopped = push_table_text(L, v);
    else
        lua_pushvalue(L, v);
    if (lua_type(L, -1) != LUA_TSTRING)
        return size + NUMBER_BYTES;
    s = lua_tolstring(L, -1, &n);
    keep = cut_length(s, n, MPARTICLE_MAX_VALUE_CHARS, &cut);
    if (cut) {
        lua_pushlstring(L, s, keep);
        lua_replace(L, -2);
    }
    *cuts += cut || stopped;
    return size + text_size(j, s, keep);
}

/* The size of the attributes in out as JSON text, measured. */
static size_t measure(lua_State *L, const struct job *j)
{
    size_t size = 0;
    lua_pushnil(L);
    while (lua_next(L, j->out)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2); /* key key value */
        size += attribute_size(L, j);
        lua_pop(L, 2);
    }
    return size;
}

/* [-0, +0] Sets out[name] = value within mParticle's limits (name a string at
 * index k, the value at v); returns the attribute's size as text. */
static size_t put(lua_State *L, struct job *j, int k, int v)
{
    int cuts;
    size_t size = push_attribute(L, j, k, v, &cuts);
    if (size > 0) {
        lua_rawset(L, j->out);
        j->cuts += cuts;
    }
    return size;
}

static int by_name(const void *a, const void *b)
{
    const struct name *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
    if (c != 0)
        return c;
    return (x->len > y->len) - (x->len < y->len);
}

/* [-0, +0] With more than 100 attributes (n), or more than
 * ATTRIBUTES_MAX_BYTES of them, or names that may be one as written (cut to
 * 256 characters, or with U+FFFD for bytes that are not UTF-8): makes out the
 * first of them in name order, up to the first that would pass either limit,
 * and of names that are one as written the first, so that the choice does not
 * depend on the order of the JSON. */
static void keep_first_by_name(lua_State *L, struct job *j, lua_Integer n)
{
    struct name *names = lua_newuserdatauv(L, (size_t)n * sizeof(*names), 0);
    lua_createtable(L, (int)(n < INT_MAX ? n : INT_MAX), 0);
    int anchor = lua_gettop(L);
    size_t k = 0;
    for (int from = PROPS; from <= EXTRA; from++) {
        if (!lua_istable(L, from))
            continue;
        lua_pushnil(L);
        while (lua_next(L, from)) {
            int key = lua_gettop(L) - 1;
            if (k < (size_t)n && (from == PROPS ? keeps_property(L, j) : adds_extra(L, key))) {
                size_t len;
                const char *s = lua_tolstring(L, key, &len);
                names[k++] = (struct name){s, len, from == EXTRA};
                lua_pushvalue(L, key);
                lua_rawseti(L, anchor, (lua_Integer)k);
            }
            lua_pop(L, 1);
        }
    }
    qsort(names, k, sizeof(*names), by_name);
    lua_createtable(L, 0, MPARTICLE_MAX_CUSTOM_ATTRIBUTES);
    lua_replace(L, j->out);
    j->cuts = j->dropped = 0;
    size_t kept = 0, bytes = 0, too_large = 0;
    for (size_t i = 0; i < k; i++) {
        if (kept == MPARTICLE_MAX_CUSTOM_ATTRIBUTES || too_large > MAX_TOO_LARGE) {
            j->dropped += (lua_Integer)(k - i);
            break;
        }
        lua_pushlstring(L, names[i].s, names[i].len);
        lua_pushvalue(L, -1);
        lua_rawget(L, names[i].extra ? EXTRA : PROPS);
        int cuts;
        size_t size = push_attribute(L, j, lua_gettop(L) - 1, lua_gettop(L), &cuts);
        if (size > 0) {
            /* a name as written that an earlier one became already: cut, or
             * with U+FFFD for bytes that are not UTF-8 (an earlier name by
             * its bytes can be a later one as written) */
            lua_pushvalue(L, -2);
            int taken = lua_rawget(L, j->out) != LUA_TNIL;
            lua_pop(L, 1);
            if (taken) {
                lua_pop(L, 4);
                j->dropped++;
                continue;
            }
        }
        if (size > 0 && bytes + size > ATTRIBUTES_MAX_BYTES) {
            /* left out; a smaller one after it may still fit */
            lua_pop(L, 4);
            j->dropped++;
            too_large++;
            continue;
        }
        if (size > 0) {
            lua_rawset(L, j->out);
            j->cuts += cuts;
            kept++;
            bytes += size;
        }
        lua_pop(L, 2);
    }
    lua_pop(L, 2); /* names and their anchor */
}

static void count(lua_State *L, const char *name, lua_Integer by)
{
    if (by <= 0)
        return;
    lua_pushvalue(L, lua_upvalueindex(COUNT));
    lua_pushstring(L, name);
    lua_pushinteger(L, by);
    lua_call(L, 2, 0);
}

static int custom_attributes(lua_State *L)
{
    luaL_checktype(L, PROPS, LUA_TTABLE);
    if (!lua_isnoneornil(L, EXTRA))
        luaL_checktype(L, EXTRA, LUA_TTABLE);
    if (lua_gettop(L) < EXTRA)
        lua_settop(L, EXTRA);
    struct job j = {.nnames = 0};
    read_skips(L, &j);

    /* sized for every entry of props and extra: growing it on the way would
     * rebuild it four or five times */
    int size = 0;
    for (int from = PROPS; from <= EXTRA; from++) {
        if (!lua_istable(L, from))
            continue;
        lua_pushnil(L);
        while (size < MPARTICLE_MAX_CUSTOM_ATTRIBUTES && lua_next(L, from)) {
            size++;
            lua_pop(L, 1);
        }
        if (size == MPARTICLE_MAX_CUSTOM_ATTRIBUTES)
            lua_pop(L, 1); /* the key lua_next left */
    }
    lua_createtable(L, 0, size);
    j.out = lua_gettop(L);

    lua_Integer n = 0;
    size_t bytes = 0;
    lua_pushnil(L);
    while (lua_next(L, PROPS)) {
        int key = lua_gettop(L) - 1;
        if (keeps_property(L, &j) && ++n <= MPARTICLE_MAX_CUSTOM_ATTRIBUTES)
            bytes += put(L, &j, key, key + 1);
        lua_pop(L, 1);
    }
    if (lua_istable(L, EXTRA)) {
        lua_pushnil(L);
        while (lua_next(L, EXTRA)) {
            int key = lua_gettop(L) - 1;
            if (adds_extra(L, key) && ++n <= MPARTICLE_MAX_CUSTOM_ATTRIBUTES)
                bytes += put(L, &j, key, key + 1);
            lua_pop(L, 1);
        }
    }
    /* the sizes so far are bounds from the lengths, which the usual event is
     * far within; text full of escapes is measured */
    j.exact = 1;
    if (n > MPARTICLE_MAX_CUSTOM_ATTRIBUTES || j.names_changed ||
        (bytes > ATTRIBUTES_MAX_BYTES && measure(L, &j) > ATTRIBUTES_MAX_BYTES))
        keep_first_by_name(L, &j, n);

    count(L, "attribute_dropped", j.dropped);
    count(L, "attribute_truncated", j.cuts);
    lua_pushvalue(L, j.out);
    return 1;
}

void attributes_push(lua_State *L)
{
    lua_pushcclosure(L, custom_attributes, 2);
}
