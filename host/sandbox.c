#include "sandbox.h"

#include "log.h"
#include "pool.h"

#include <ctype.h>
#include <float.h>
#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The count hook fires every HOOK_STEP instructions; a tripped limit makes it
 * fire on every instruction. */
#define HOOK_STEP 1000

/* Work done inside one C function is invisible to the count hook. Library
 * functions charge the instruction budget for their worst case on the given
 * arguments before they do it, and raise the instruction limit instead when
 * the budget cannot pay; the allocator charges for the bytes it hands out. A
 * charge is in instructions that take as long: a simple instruction takes
 * about 4 ns (Lua 5.4.4, x86-64), and each figure below is what was measured
 * there, rounded to the safe side. */
#define COST_STEP 1        /* a step of a C loop: a memchr/memcpy call, a pattern test: 2-7 ns */
#define COST_VALUE 1       /* a value a C function pushes or takes: 2-5 ns */
#define COST_DECODED 1     /* a byte utf8.len or utf8.codepoint decodes: 3 ns */
#define COST_ELEMENT 6     /* a table element read or written from C: 10-25 ns */
#define COST_COMPARISON 12 /* table.sort, for each of its n log2 n comparisons: 26-47 ns */
#define COST_CONVERSION 32 /* a string.format conversion (an snprintf): 50-150 ns */
#define COST_DIGIT 8       /* each digit %f, %e or %g prints: 20-30 ns (%99.99f of 1e308) */
#define COST_QUOTED 16     /* each byte string.format("%q") quotes: 60 ns for a control byte */
#define COST_DATE 64       /* os.date: gmtime, and strftime for each conversion: 100-200 ns */
#define COST_MKTIME 1024   /* os.time of a table (mktime): 2.7 us */
#define BYTES_SCANNED 4    /* bytes a C loop takes one at a time, per instruction: 1 ns each */
#define BYTES_COMPARED 64  /* bytes memcmp compares per instruction */
#define BYTES_ALLOCATED 8  /* bytes allocated per instruction: fresh pages cost 0.6 ns a byte */

/* Pattern matching is charged a COST_STEP for each step of its worst case
 * (pattern_cost). A pattern whose worst case is beyond PATTERN_COST_MAX steps
 * is refused whatever the budget, and so is one longer than PATTERN_MAX_LEN. */
#define PATTERN_MAX_LEN 512
#define PATTERN_COST_MAX 1e9
/* lstrlib's LUA_MAXCAPTURES */
#define PATTERN_CAPTURES 32

/* print() from scripts goes to the log, at most this many lines per second. */
#define PRINT_LINES_PER_SECOND 20

enum trip { TRIP_NONE, TRIP_INSTRUCTIONS, TRIP_MEMORY };

struct sandbox {
    lua_State *L;
    pool *pool;    /* the state's small objects */
    size_t used;   /* bytes held by the state */
    size_t limit;  /* SIZE_MAX outside sandbox_call */
    int64_t steps; /* instructions run and charged in this call */
    int64_t budget;
    size_t unpaid; /* bytes allocated in this call not yet charged (< BYTES_ALLOCATED) */
    int running;   /* inside sandbox_call: charges count */
    enum trip tripped;
    int damaged;
    int base_ref; /* registry reference to the table behind every chunk's globals */
    char where[256];
};

static sandbox *from_lua(lua_State *L)
{
    return *(sandbox **)lua_getextraspace(L);
}

/* ---- limits ------------------------------------------------------------- */

static void sb_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    sandbox *sb = from_lua(L);
    sb->steps += HOOK_STEP;
    if (sb->tripped == TRIP_NONE && sb->steps > sb->budget)
        sb->tripped = TRIP_INSTRUCTIONS;
    if (sb->tripped != TRIP_NONE) {
        /* From now on every instruction raises: handlers cannot keep running. */
        lua_sethook(L, sb_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "%s limit exceeded", sb->tripped == TRIP_MEMORY ? "memory" : "instruction");
    }
}

/* Whether the state may grow by `more` bytes: not beyond the memory limit, and
 * during a call not beyond the instruction budget either, which pays for the
 * bytes (BYTES_ALLOCATED): filling fresh memory is work no instruction counts,
 * and it is how the functions that build strings (string.rep, table.concat,
 * "..") pay for their output. When the budget cannot pay, this allocation and
 * every later one in the call are refused, so the C function that asked stops
 * there. */
static int may_grow(sandbox *sb, size_t more)
{
    if (more > sb->limit || sb->used > sb->limit - more) {
        if (sb->tripped == TRIP_NONE)
            sb->tripped = TRIP_MEMORY;
        return 0;
    }
    if (!sb->running)
        return 1;
    sb->unpaid += more;
    sb->steps += (int64_t)(sb->unpaid / BYTES_ALLOCATED);
    sb->unpaid %= BYTES_ALLOCATED;
    if (sb->tripped == TRIP_NONE && sb->steps > sb->budget) {
        sb->tripped = TRIP_INSTRUCTIONS;
        sb->limit = 0; /* nothing more: the call is over */
        return 0;
    }
    return 1;
}

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    sandbox *sb = ud;
    if (!ptr)
        osize = 0; /* osize then encodes the object type, not a size */
    if (nsize == 0) {
        pool_resize(sb->pool, ptr, osize, 0);
        sb->used -= osize;
        return NULL;
    }
    if (nsize > osize && !may_grow(sb, nsize - osize))
        return NULL;
    void *p = pool_resize(sb->pool, ptr, osize, nsize);
    if (!p)
        return NULL;
    sb->used = sb->used - osize + nsize;
    return p;
}

/* Charges `cost` instructions for work a C function is about to do. When the
 * budget cannot pay, trips the instruction limit and raises instead, so the
 * work is never done. Outside sandbox_call nothing is counted. */
static void charge(lua_State *L, double cost)
{
    sandbox *sb = from_lua(L);
    if (!sb->running || cost <= 0)
        return;
    if (!(cost <= (double)(sb->budget - sb->steps))) { /* NaN too */
        if (sb->tripped == TRIP_NONE)
            sb->tripped = TRIP_INSTRUCTIONS;
        lua_sethook(L, sb_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "instruction limit exceeded");
    }
    sb->steps += (int64_t)cost;
}

/* Message handler: records where in a script the error happened and turns a
 * non-string error object into a readable message. */
static int sb_msgh(lua_State *L)
{
    sandbox *sb = from_lua(L);
    sb->where[0] = '\0';
    lua_Debug ar;
    for (int level = 1; lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0) {
            snprintf(sb->where, sizeof sb->where, "%s:%d", ar.short_src, ar.currentline);
            break;
        }
    }
    if (!lua_isstring(L, 1)) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            return 1;
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    return 1;
}

/* pcall and xpcall for scripts: like the standard ones, except that a tripped
 * limit is raised again instead of being caught. */
static int sb_pcall(lua_State *L)
{
    luaL_checkany(L, 1);
    int status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    if (from_lua(L)->tripped != TRIP_NONE)
        return luaL_error(L, "limit exceeded");
    lua_pushboolean(L, status == LUA_OK);
    lua_insert(L, 1);
    return lua_gettop(L);
}

static int sb_xpcall(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushboolean(L, 1);
    lua_pushvalue(L, 1);
    lua_rotate(L, 3, 2); /* f msgh true f args... */
    int status = lua_pcall(L, n - 2, LUA_MULTRET, 2);
    if (from_lua(L)->tripped != TRIP_NONE)
        return luaL_error(L, "limit exceeded");
    if (status != LUA_OK) {
        lua_pushboolean(L, 0);
        lua_pushvalue(L, -2);
        return 2;
    }
    return lua_gettop(L) - 2;
}

static int sb_print(lua_State *L)
{
    static _Atomic int64_t window;
    static _Atomic int lines;
    int64_t now = clock_mono_ms() / 1000;
    if (atomic_exchange(&window, now) != now)
        atomic_store(&lines, 0);
    if (atomic_fetch_add(&lines, 1) >= PRINT_LINES_PER_SECOND)
        return 0;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int n = lua_gettop(L);
    for (int i = 1; i <= n; i++) {
        if (i > 1)
            luaL_addchar(&b, '\t');
        luaL_tolstring(L, i, NULL);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    log_info("script print", LOG_S("text", lua_tostring(L, -1)));
    return 0;
}

/* ---- what C functions cost ---------------------------------------------- */

/* Calls the original function (upvalue 1) with the arguments as they are and
 * returns all its results. */
static int forward(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* The length of the argument at idx when it is a string, else 0. */
static double string_arg(lua_State *L, int idx)
{
    return lua_type(L, idx) == LUA_TSTRING ? (double)lua_rawlen(L, idx) : 0;
}

/* Where s[pos..] starts for lstrlib (posrelatI), 1-based; len + 1 past the end. */
static size_t start_of(lua_Integer pos, size_t len)
{
    if (pos > 0)
        return (lua_Unsigned)pos > len ? len + 1 : (size_t)pos;
    if (pos == 0 || pos < -(lua_Integer)len)
        return 1;
    return (size_t)((lua_Integer)len + pos + 1);
}

/* Where s[..pos] ends for lstrlib (getendpos), 1-based; 0 before the start. */
static size_t end_of(lua_Integer pos, size_t len)
{
    if (pos > (lua_Integer)len)
        return len;
    if (pos >= 0)
        return (size_t)pos;
    if (pos < -(lua_Integer)len)
        return 0;
    return (size_t)((lua_Integer)len + pos + 1);
}

/* A position as the utf8 library takes it (u_posrelat). */
static lua_Integer utf8_position(lua_Integer pos, size_t len)
{
    if (pos >= 0)
        return pos;
    if (0u - (size_t)pos > len)
        return 0;
    return (lua_Integer)len + pos + 1;
}

/* ---- pattern matching --------------------------------------------------- */

/* One item of a Lua pattern, as lstrlib's match() takes them. */
enum item_kind {
    ITEM_SINGLE,   /* a byte, '.', %class or [set], maybe with a quantifier */
    ITEM_OPEN,     /* '(' */
    ITEM_CLOSE,    /* ')' */
    ITEM_POSITION, /* '()' */
    ITEM_END,      /* '$' last */
    ITEM_BALANCE,  /* %bxy */
    ITEM_FRONTIER, /* %f[set] */
    ITEM_BACKREF,  /* %0 .. %9 */
    ITEM_BROKEN,   /* malformed: matching raises an error when it gets there */
};

struct item {
    const char *text;      /* ITEM_SINGLE: its class, without the quantifier */
    double reach;          /* a quantified single: 1 + the most bytes it can take */
    double width;          /* ITEM_BACKREF: the most bytes its capture can hold */
    unsigned short test;   /* steps to test a byte against the single or frontier */
    unsigned char kind;    /* enum item_kind */
    char quantifier;       /* '*', '+', '-', '?', or 0 */
    unsigned char any;     /* the single is '.', which every byte matches */
    unsigned char capture; /* ITEM_BACKREF: the capture it repeats */
};

struct pattern {
    struct item items[PATTERN_MAX_LEN];
    int count;
    int anchored;
    const struct item *first; /* see first_test */
    double first_matches;     /* subject bytes `first` matches (all when not scanned) */
};

/* The end of the class at p (lstrlib's classEnd), or NULL when it is malformed. */
static const char *class_end(const char *p, const char *end)
{
    char c = *p++;
    if (c == '%')
        return p < end ? p + 1 : NULL;
    if (c != '[')
        return p;
    if (p < end && *p == '^')
        p++;
    do { /* the first byte of a set may be ']' */
        if (p >= end)
            return NULL;
        if (*p++ == '%' && p < end)
            p++;
    } while (p >= end || *p != ']');
    return p + 1;
}

/* Splits p..end into items; returns how many (at most max). */
static int pattern_items(const char *p, const char *end, struct item *items, int max)
{
    int n = 0;
    while (p < end && n < max) {
        struct item *it = &items[n++];
        memset(it, 0, sizeof *it);
        it->test = 1;
        it->kind = ITEM_BROKEN;
        if (*p == '(') {
            int position = p + 1 < end && p[1] == ')';
            it->kind = position ? ITEM_POSITION : ITEM_OPEN;
            p += position ? 2 : 1;
            continue;
        }
        if (*p == ')' || (*p == '$' && p + 1 == end)) {
            it->kind = *p++ == ')' ? ITEM_CLOSE : ITEM_END;
            continue;
        }
        if (*p == '%' && p + 1 < end && p[1] == 'b') {
            if (p + 3 >= end)
                break;
            it->kind = ITEM_BALANCE;
            p += 4;
            continue;
        }
        if (*p == '%' && p + 1 < end && p[1] == 'f') {
            const char *e = p + 2 < end && p[2] == '[' ? class_end(p + 2, end) : NULL;
            if (!e)
                break;
            it->kind = ITEM_FRONTIER;
            it->test = (unsigned short)(e - p - 2);
            p = e;
            continue;
        }
        if (*p == '%' && p + 1 < end && p[1] >= '0' && p[1] <= '9') {
            it->kind = ITEM_BACKREF;
            it->capture = (unsigned char)(p[1] - '0');
            p += 2;
            continue;
        }
        const char *e = class_end(p, end);
        if (!e)
            break;
        it->kind = ITEM_SINGLE;
        it->text = p;
        it->any = *p == '.' && e == p + 1;
        it->test = (unsigned short)(e - p);
        if (e < end && *e != '\0' && strchr("*+-?", *e))
            it->quantifier = *e++;
        p = e;
    }
    return n;
}

/* A quantified single that may take more than one byte. */
static int repeats(const struct item *it)
{
    return it->kind == ITEM_SINGLE && it->quantifier && it->quantifier != '?';
}

/* The item a match attempt tests first (past captures), when the attempt fails
 * at once on a byte it does not match: a single without quantifier or with '+',
 * other than '.'. NULL when there is none. */
static const struct item *first_test(const struct item *items, int count)
{
    int i = 0;
    while (i < count && (items[i].kind == ITEM_OPEN || items[i].kind == ITEM_POSITION))
        i++;
    if (i == count || items[i].kind != ITEM_SINGLE || items[i].any)
        return NULL;
    if (items[i].quantifier != 0 && items[i].quantifier != '+')
        return NULL;
    return &items[i];
}

/* Parses p for a subject of n bytes, before anything is known of the subject:
 * a quantifier may take all of it, the first test may match everywhere. */
static void pattern_parse(struct pattern *pt, const char *p, size_t plen, size_t n, int anchorable)
{
    pt->anchored = anchorable && plen > 0 && p[0] == '^';
    pt->count = pattern_items(p + pt->anchored, p + plen, pt->items, PATTERN_MAX_LEN);
    for (int i = 0; i < pt->count; i++)
        pt->items[i].reach = (double)n + 1;
    pt->first = pt->anchored ? NULL : first_test(pt->items, pt->count);
    pt->first_matches = (double)n;
}

/* Whether byte c is in the class %cl (lstrlib's match_class; a letter that
 * names no class, or another byte, stands for itself). */
static int in_class(int c, int cl)
{
    int in;
    switch (tolower(cl)) {
    case 'a':
        in = isalpha(c);
        break;
    case 'c':
        in = iscntrl(c);
        break;
    case 'd':
        in = isdigit(c);
        break;
    case 'g':
        in = isgraph(c);
        break;
    case 'l':
        in = islower(c);
        break;
    case 'p':
        in = ispunct(c);
        break;
    case 's':
        in = isspace(c);
        break;
    case 'u':
        in = isupper(c);
        break;
    case 'w':
        in = isalnum(c);
        break;
    case 'x':
        in = isxdigit(c);
        break;
    case 'z': /* deprecated, still there */
        in = c == 0;
        break;
    default:
        return cl == c;
    }
    return isupper(cl) ? !in : in != 0;
}

/* Whether byte c matches the single `it`: a byte, %class or [set] (lstrlib's
 * singlematch and matchbracketclass). */
static int in_single(int c, const struct item *it)
{
    const char *p = it->text;
    if (*p == '%')
        return in_class(c, (unsigned char)p[1]);
    if (*p != '[')
        return (unsigned char)*p == c;
    const char *last = p + it->test - 1; /* the closing ']' */
    int in = 1;
    if (p[1] == '^') {
        in = 0;
        p++;
    }
    while (++p < last) {
        if (*p == '%') {
            p++;
            if (in_class(c, (unsigned char)*p))
                return in;
        } else if (p[1] == '-' && p + 2 < last) {
            p += 2;
            if ((unsigned char)p[-2] <= c && c <= (unsigned char)*p)
                return in;
        } else if ((unsigned char)*p == c) {
            return in;
        }
    }
    return !in;
}

/* Steps pattern_scan takes: a pass over the subject for each repeating single
 * but '.', and for the first test. */
static double scan_cost(const struct pattern *pt, size_t n)
{
    double passes = pt->first ? 1 : 0;
    for (int i = 0; i < pt->count; i++)
        passes += repeats(&pt->items[i]) && !pt->items[i].any;
    return passes * (double)n / BYTES_SCANNED;
}

/* Looks at the subject: a quantifier can take at most the longest run of bytes
 * its class matches, and the first test matches where its class does. */
static void pattern_scan(struct pattern *pt, const char *s, size_t n)
{
    for (int i = 0; i < pt->count; i++) {
        struct item *it = &pt->items[i];
        if (!repeats(it) || it->any)
            continue;
        size_t run = 0, longest = 0;
        for (size_t k = 0; k < n; k++) {
            run = in_single((unsigned char)s[k], it) ? run + 1 : 0;
            if (run > longest)
                longest = run;
        }
        it->reach = (double)longest + 1;
    }
    if (pt->first) {
        size_t matches = 0;
        for (size_t k = 0; k < n; k++)
            matches += in_single((unsigned char)s[k], pt->first) != 0;
        pt->first_matches = (double)matches;
    }
}

/* Sets each back-reference's width: the most bytes its capture can hold, from
 * the items inside it. */
static void backref_widths(struct pattern *pt, double n)
{
    double width[PATTERN_CAPTURES + 1]; /* by capture number; -1 while open */
    double sum[PATTERN_CAPTURES + 1];   /* the items inside an open capture so far */
    int open[PATTERN_CAPTURES];
    int depth = 0, captures = 0;
    for (int i = 0; i < pt->count; i++) {
        struct item *it = &pt->items[i];
        double w = 0;
        switch (it->kind) {
        case ITEM_SINGLE:
            w = repeats(it) ? it->reach - 1 : 1;
            break;
        case ITEM_BALANCE:
            w = n;
            break;
        case ITEM_BACKREF:
            it->width = it->capture >= 1 && it->capture <= captures && width[it->capture] >= 0
                            ? width[it->capture]
                            : n;
            w = it->width;
            break;
        case ITEM_OPEN:
        case ITEM_POSITION:
            if (captures == PATTERN_CAPTURES)
                break; /* too many captures: matching raises an error */
            captures++;
            width[captures] = it->kind == ITEM_OPEN ? -1 : 0;
            sum[captures] = 0;
            if (it->kind == ITEM_OPEN)
                open[depth++] = captures;
            break;
        case ITEM_CLOSE:
            if (depth > 0) {
                int c = open[--depth];
                width[c] = sum[c] < n ? sum[c] : n;
            }
            break;
        default:
            break;
        }
        for (int d = 0; d < depth; d++)
            sum[open[d]] += w;
    }
}

/* The most steps lstrlib can take to match the pattern on an n-byte subject.
 * The items are walked from the last: `rest` is the worst work from an item to
 * the end of the pattern. A quantifier multiplies the rest by the places where
 * it may stop (its reach), unless the rest is sure to match wherever it starts:
 * then the first place tried is the last, and counting how far the quantifier
 * reaches is work on bytes the match takes, paid once in all (`once`), since
 * matches do not overlap. global: the function goes on after a match (gmatch,
 * gsub). */
static double pattern_cost(struct pattern *pt, size_t n, int global)
{
    double places = (double)n + 1;
    backref_widths(pt, (double)n);
    double rest = 1, once = 0;
    int sure = 1;   /* the rest matches wherever it starts */
    int at_end = 1; /* the rest matches the empty string at the end of the subject */
    for (int i = pt->count - 1; i >= 0; i--) {
        const struct item *it = &pt->items[i];
        double test = (double)it->test, reach = it->reach;
        switch (it->kind) {
        case ITEM_OPEN:
        case ITEM_CLOSE:
        case ITEM_POSITION:
            rest += 1;
            break;
        case ITEM_END:
            rest = 1;
            sure = 0;
            at_end = 1;
            break;
        case ITEM_BROKEN:
            rest = 1;
            sure = at_end = 0;
            break;
        case ITEM_FRONTIER:
            rest += test;
            sure = at_end = 0;
            break;
        case ITEM_BALANCE: /* scans ahead for the closing byte */
            rest += 1 + places / BYTES_SCANNED;
            sure = at_end = 0;
            break;
        case ITEM_BACKREF: /* compares the capture */
            rest += 1 + it->width / BYTES_COMPARED;
            sure = at_end = 0;
            break;
        case ITEM_SINGLE:
            if (it->quantifier == 0) {
                rest += test;
                sure = at_end = 0;
            } else if (it->quantifier == '?') {
                rest = test + (sure ? 1 : 2) * rest;
            } else if (it->quantifier == '-') { /* tries the rest, then one more byte */
                if (!sure) {
                    rest = reach * (rest + test);
                    sure = it->any && at_end;
                }
            } else { /* '*' or '+': counts how far it reaches, then tries the rest from there back
                      */
                if (sure) {
                    once += 2 * reach * test;
                    rest += test;
                } else if (it->any && at_end) { /* the rest matches at the end, tried first */
                    rest = reach * test + rest;
                    sure = 1;
                } else {
                    rest = reach * (test + rest);
                }
                if (it->quantifier == '+')
                    sure = at_end = 0;
            }
            break;
        }
    }
    if (pt->anchored || (sure && !global))
        return rest + once;
    /* Tried from every place; where the first test fails, at once. */
    if (!pt->first)
        return places * rest + once;
    double failing = 1 + (double)(pt->first - pt->items) + (double)pt->first->test;
    return places * failing + pt->first_matches * rest + once;
}

/* The refusal of a pattern too long or too complex, or NULL; else its worst
 * case (steps) in *cost. subject: the n bytes it is matched against, or NULL
 * when unknown; looking at it is charged first when L is not NULL.
 * anchorable: a leading '^' anchors (not in gmatch). pt is scratch space. */
static const char *pattern_refusal(lua_State *L, struct pattern *pt, const char *p, size_t plen,
                                   const char *subject, size_t n, int anchorable, int global,
                                   double *cost, char *err, size_t errlen)
{
    if (plen > PATTERN_MAX_LEN) {
        str_printf(err, errlen, "pattern longer than %d bytes", PATTERN_MAX_LEN);
        return err;
    }
    pattern_parse(pt, p, plen, n, anchorable);
    if (subject) {
        if (L)
            charge(L, scan_cost(pt, n));
        pattern_scan(pt, subject, n);
    }
    *cost = pattern_cost(pt, n, global);
    if (!(*cost <= PATTERN_COST_MAX)) {
        str_printf(err, errlen, "pattern too complex for a %zu-byte subject (%.1e steps at worst)",
                   n, *cost);
        return err;
    }
    return NULL;
}

int sandbox_pattern_check(const char *p, size_t plen, size_t n, int global, char *err,
                          size_t errlen)
{
    struct pattern pt;
    double cost = 0;
    return pattern_refusal(NULL, &pt, p, plen, NULL, n, !global, global, &cost, err, errlen) ? -1
                                                                                             : 0;
}

/* Refuses, or charges for, matching the pattern at argument 2 against the n
 * bytes at subject, plus `per_match` for each match there can be. */
static void charge_pattern(lua_State *L, const char *subject, size_t n, int anchorable, int global,
                           double per_match)
{
    size_t plen;
    const char *p = luaL_checklstring(L, 2, &plen);
    struct pattern pt; /* about 16 KiB, on the stack so that an error cannot leak it */
    double cost = 0;
    char err[200];
    if (pattern_refusal(L, &pt, p, plen, subject, n, anchorable, global, &cost, err, sizeof err))
        luaL_error(L, "%s", err);
    charge(L, cost * COST_STEP + per_match * ((double)n + 1));
}

/* Whether lstrlib treats p as a pattern rather than plain text (nospecials). */
static int has_specials(const char *p, size_t plen)
{
    for (size_t i = 0; i < plen; i++)
        if (p[i] != '\0' && strchr("^$*+?.([%-", p[i]))
            return 1;
    return 0;
}

/* The subject of find, match and gmatch (arguments 1 and 3, init): the bytes
 * from init on, and how many. */
static const char *subject_from_init(lua_State *L, size_t *n)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    size_t from = start_of(luaL_optinteger(L, 3, 1), len);
    *n = len + 1 - from;
    return s + from - 1;
}

/* string.find(s, p, init, plain): a plain search (also a pattern without
 * specials) looks with memchr for p's first byte and compares the rest at each
 * place it is found. */
static int sb_find(lua_State *L)
{
    size_t n, m;
    const char *subject = subject_from_init(L, &n);
    const char *p = luaL_checklstring(L, 2, &m);
    if (lua_toboolean(L, 4) || !has_specials(p, m)) {
        if (m > 0 && m <= n)
            charge(L, (double)(n - m + 1) * (COST_STEP + (double)m / BYTES_COMPARED));
    } else {
        charge_pattern(L, subject, n, 1, 0, 0);
    }
    return forward(L);
}

static int sb_match(lua_State *L)
{
    size_t n;
    const char *subject = subject_from_init(L, &n);
    charge_pattern(L, subject, n, 1, 0, 0);
    return forward(L);
}

/* string.gmatch: charged when it is called for every match its iterator finds. */
static int sb_gmatch(lua_State *L)
{
    size_t n;
    const char *subject = subject_from_init(L, &n);
    charge_pattern(L, subject, n, 0, 1, 0);
    return forward(L);
}

/* string.gsub(s, p, repl, max): a string repl is read through for each match. */
static int sb_gsub(lua_State *L)
{
    size_t n;
    const char *subject = luaL_checklstring(L, 1, &n);
    double per_match = COST_STEP * (1 + string_arg(L, 3));
    lua_Integer max = luaL_optinteger(L, 4, (lua_Integer)n + 1);
    if (max < (lua_Integer)n + 1)
        per_match = max > 0 ? per_match * (double)max / ((double)n + 1) : 0;
    charge_pattern(L, subject, n, 1, 1, per_match);
    return forward(L);
}

/* ---- other library functions -------------------------------------------- */

/* string.rep: Lua loops n times even when the result is empty (and needs no
 * memory), so an empty result is answered here. Otherwise a memcpy for each
 * copy of s and of sep; the bytes are charged as they are allocated. */
static int sb_rep(lua_State *L)
{
    size_t l, lsep = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);
    if (n <= 0 || (l == 0 && (lsep == 0 || n == 1))) {
        lua_pushliteral(L, "");
        return 1;
    }
    charge(L, (double)n * (lsep > 0 ? 2 : 1) * COST_STEP);
    return forward(L);
}

/* string.byte(s, i, j): a value for each byte. */
static int sb_byte(lua_State *L)
{
    size_t l;
    luaL_checklstring(L, 1, &l);
    lua_Integer i = luaL_optinteger(L, 2, 1);
    size_t first = start_of(i, l), last = end_of(luaL_optinteger(L, 3, i), l);
    if (first <= last && last - first < LUAI_MAXSTACK) /* beyond, the library refuses */
        charge(L, (double)(last - first + 1) * COST_VALUE);
    return forward(L);
}

/* string.char, utf8.char, table.pack: a value for each argument. */
static int sb_each_argument(lua_State *L)
{
    charge(L, lua_gettop(L) * COST_VALUE);
    return forward(L);
}

/* string.lower, upper, reverse; tonumber; string arithmetic ("10" + 1), which
 * converts its string operands: a pass over the bytes of the strings. */
static int sb_each_byte(lua_State *L)
{
    charge(L, (string_arg(L, 1) + string_arg(L, 2)) / BYTES_SCANNED);
    return forward(L);
}

/* string.pack, packsize, unpack: an element for each byte of the format (the
 * data they copy is charged as it is allocated). */
static int sb_pack(lua_State *L)
{
    charge(L, string_arg(L, 1) * COST_ELEMENT);
    return forward(L);
}

/* rawequal: two long strings of the same length are compared byte by byte. */
static int sb_rawequal(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TSTRING && lua_type(L, 2) == LUA_TSTRING &&
        lua_rawlen(L, 1) == lua_rawlen(L, 2))
        charge(L, string_arg(L, 1) / BYTES_COMPARED);
    return forward(L);
}

/* string.format: a conversion for each '%', the bytes of the strings that %s
 * copies and %q quotes, and the digits %f prints for a large number. */
static int sb_format(lua_State *L)
{
    size_t flen;
    const char *f = luaL_checklstring(L, 1, &flen);
    const char *end = f + flen;
    double cost = (double)flen / BYTES_SCANNED;
    int arg = 1;
    while ((f = memchr(f, '%', (size_t)(end - f))) != NULL && ++f < end) {
        if (*f == '%') {
            f++;
            continue;
        }
        arg++;
        while (f < end && *f != '\0' && strchr("-+ #0123456789", *f))
            f++;
        double precision = 6;
        if (f < end && *f == '.') {
            precision = 0;
            for (f++; f < end && *f >= '0' && *f <= '9' && precision < 100; f++)
                precision = precision * 10 + (*f - '0');
        }
        if (f >= end)
            break;
        char conversion = *f++;
        cost += COST_CONVERSION;
        if (conversion == 's') {
            cost += string_arg(L, arg) / BYTES_SCANNED;
        } else if (conversion == 'q') {
            cost += string_arg(L, arg) * COST_QUOTED;
        } else if (conversion != '\0' && strchr("aAeEfFgG", conversion)) {
            double digits = precision;
            double x = lua_type(L, arg) == LUA_TNUMBER ? fabs(lua_tonumber(L, arg)) : 0;
            if ((conversion == 'f' || conversion == 'F') && x >= 1 && x <= DBL_MAX)
                digits += floor(log10(x)) + 1;
            cost += digits * COST_DIGIT;
        }
    }
    charge(L, cost);
    return forward(L);
}

/* table.move(a1, f, e, t [, a2]) copies element by element. */
static int sb_move(lua_State *L)
{
    lua_Integer f = luaL_checkinteger(L, 2);
    lua_Integer e = luaL_checkinteger(L, 3);
    if (e >= f)
        charge(L, ((double)e - (double)f + 1) * COST_ELEMENT);
    return forward(L);
}

/* The functions below take the length of a table as the table library does:
 * a __len metamethod then runs twice, here and in the library. */

/* table.concat(t, sep, i, j): an element for each of t[i..j]. */
static int sb_concat(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TTABLE) {
        lua_Integer last = luaL_len(L, 1);
        lua_Integer i = luaL_optinteger(L, 3, 1);
        last = luaL_optinteger(L, 4, last);
        if (last >= i)
            charge(L, ((double)last - (double)i + 1) * COST_ELEMENT);
    }
    return forward(L);
}

/* table.insert(t, pos, v) moves t[pos..#t] up. */
static int sb_insert(lua_State *L)
{
    if (lua_gettop(L) == 3 && lua_type(L, 1) == LUA_TTABLE) {
        double moved = (double)luaL_len(L, 1) + 1 - (double)luaL_checkinteger(L, 2);
        if (moved > 0)
            charge(L, moved * COST_ELEMENT);
    }
    return forward(L);
}

/* table.remove(t, pos) moves t[pos + 1..#t] down. */
static int sb_remove(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TTABLE) {
        lua_Integer size = luaL_len(L, 1);
        double moved = (double)size - (double)luaL_optinteger(L, 2, size);
        if (moved > 0)
            charge(L, moved * COST_ELEMENT);
    }
    return forward(L);
}

/* table.sort(t, comp): n log2 n comparisons; a comparison function's own
 * instructions are counted as it runs. */
static int sb_sort(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TTABLE) {
        double n = (double)luaL_len(L, 1);
        if (n > 1)
            charge(L, n * ceil(log2(n)) * COST_COMPARISON);
    }
    return forward(L);
}

/* table.unpack(t, i, j): an element for each of t[i..j]. The bounds go to the
 * library explicitly, so that a __len metamethod runs once. */
static int sb_unpack(lua_State *L)
{
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer j = luaL_opt(L, luaL_checkinteger, 3, luaL_len(L, 1));
    double count = (double)j - (double)i + 1;
    if (count > 0 && count <= LUAI_MAXSTACK) /* beyond, the library refuses */
        charge(L, count * COST_ELEMENT);
    lua_settop(L, 1);
    lua_pushinteger(L, i);
    lua_pushinteger(L, j);
    return forward(L);
}

/* utf8.len(s, i, j) and utf8.codepoint(s, i, j) decode s[i..j]; j defaults to
 * the end for len and to i for codepoint. */
static void charge_utf8_decode(lua_State *L, int to_the_end)
{
    size_t len;
    luaL_checklstring(L, 1, &len);
    lua_Integer i = utf8_position(luaL_optinteger(L, 2, 1), len);
    lua_Integer j = utf8_position(luaL_optinteger(L, 3, to_the_end ? -1 : i), len);
    double bytes = fmin((double)j - (double)i + 1, (double)len);
    /* codepoint refuses a slice beyond the stack's size */
    if (bytes > 0 && (to_the_end || bytes <= LUAI_MAXSTACK))
        charge(L, bytes * COST_DECODED);
}

static int sb_utf8_len(lua_State *L)
{
    charge_utf8_decode(L, 1);
    return forward(L);
}

static int sb_utf8_codepoint(lua_State *L)
{
    charge_utf8_decode(L, 0);
    return forward(L);
}

/* utf8.offset(s, n, i) walks from i to the end (n > 0) or to the start. */
static int sb_utf8_offset(lua_State *L)
{
    size_t len;
    luaL_checklstring(L, 1, &len);
    lua_Integer n = luaL_checkinteger(L, 2);
    lua_Integer i = utf8_position(luaL_optinteger(L, 3, n >= 0 ? 1 : (lua_Integer)len + 1), len);
    double bytes = n > 0 ? (double)len - (double)i + 1 : (double)i;
    if (bytes > 0)
        charge(L, bytes / BYTES_SCANNED);
    return forward(L);
}

/* The iterator of utf8.codes(s): before each character it skips continuation
 * bytes, as many as there are. */
static int sb_utf8_next(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_Unsigned i = (lua_Unsigned)lua_tointeger(L, 2);
    size_t run = 0;
    while (i < len && run < len - i && ((unsigned char)s[i + run] & 0xC0) == 0x80)
        run++;
    charge(L, COST_VALUE + (double)run / BYTES_SCANNED);
    return forward(L);
}

static int sb_utf8_codes(lua_State *L)
{
    int n = forward(L); /* iterator s 0 */
    if (n >= 1 && lua_isfunction(L, 1)) {
        lua_pushvalue(L, 1);
        lua_pushcclosure(L, sb_utf8_next, 1);
        lua_replace(L, 1);
    }
    return n;
}

/* os.date(format, t): gmtime or localtime, then strftime for each conversion. */
static int sb_date(lua_State *L)
{
    size_t flen;
    const char *f = luaL_optlstring(L, 1, "%c", &flen);
    double conversions = 1;
    for (const char *p = f; (p = memchr(p, '%', flen - (size_t)(p - f))) != NULL; p++)
        conversions++;
    charge(L, conversions * COST_DATE + (double)flen / BYTES_SCANNED);
    return forward(L);
}

/* os.time(t): mktime when given a table. */
static int sb_time(lua_State *L)
{
    if (lua_istable(L, 1))
        charge(L, COST_MKTIME);
    return forward(L);
}

/* [-0, +0] Replaces lib[name] (lib on top) by a C closure over the original. */
static void wrap(lua_State *L, const char *name, lua_CFunction fn)
{
    lua_getfield(L, -1, name);
    lua_pushcclosure(L, fn, 1);
    lua_setfield(L, -2, name);
}

/* setmetatable, without finalizers: a __gc metamethod would run whenever the
 * collector gets to it, in host code, outside every limit. */
static int sb_setmetatable(lua_State *L)
{
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        int t = lua_rawget(L, 2);
        lua_pop(L, 1);
        if (t != LUA_TNIL)
            return luaL_error(L, "finalizers (__gc) are not allowed in scripts");
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* ---- environment -------------------------------------------------------- */

static int ro_newindex(lua_State *L)
{
    return luaL_error(L, "attempt to modify a read-only table (field '%s')",
                      lua_isstring(L, 2) ? lua_tostring(L, 2) : "?");
}

static int ro_next(lua_State *L)
{
    /* upvalue 1: the real table; arguments: (proxy, key) */
    lua_settop(L, 2);
    lua_pushvalue(L, 2);
    if (lua_next(L, lua_upvalueindex(1)))
        return 2;
    lua_pushnil(L);
    return 1;
}

static int ro_pairs(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, ro_next, 1);
    lua_pushvalue(L, 1); /* the proxy, never the real table */
    lua_pushnil(L);
    return 3;
}

static int ro_len(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)luaL_len(L, lua_upvalueindex(1)));
    return 1;
}

void sandbox_readonly(lua_State *L)
{
    /* t */
    lua_newtable(L);          /* t proxy */
    lua_createtable(L, 0, 5); /* t proxy mt */
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, ro_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushvalue(L, -3);
    lua_pushcclosure(L, ro_pairs, 1);
    lua_setfield(L, -2, "__pairs");
    lua_pushvalue(L, -3);
    lua_pushcclosure(L, ro_len, 1);
    lua_setfield(L, -2, "__len");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2); /* t proxy */
    lua_remove(L, -2);       /* proxy */
}

/* [-0, +1] Pushes a copy of the library table `lib` (from the real globals) with
 * only the listed names (all when names is NULL, minus `skip`). */
static void copy_lib(lua_State *L, const char *lib, const char *const *names, const char *skip)
{
    lua_getglobal(L, lib); /* lib */
    lua_newtable(L);       /* lib copy */
    if (names) {
        for (; *names; names++) {
            lua_getfield(L, -2, *names);
            lua_setfield(L, -2, *names);
        }
    } else {
        lua_pushnil(L);
        while (lua_next(L, -3)) {
            if (skip && lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), skip) == 0) {
                lua_pop(L, 1);
                continue;
            }
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, -4);
        }
    }
    lua_remove(L, -2); /* copy */
}

/* The arithmetic metamethods lstrlib puts in the string metatable. */
static const char *const STRING_ARITH[] = {"__add", "__sub", "__mul", "__div",
                                           "__mod", "__pow", "__unm", "__idiv"};

static int build_env(lua_State *L)
{
    sandbox *sb = from_lua(L);
    int flags = (int)lua_tointeger(L, 1);

    luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
    luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
    luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
    luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
    luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 1);
    luaL_requiref(L, LUA_OSLIBNAME, luaopen_os, 1);
    lua_settop(L, 1);

    static const char *const base_names[] = {"assert",   "error",        "ipairs",       "next",
                                             "pairs",    "rawequal",     "rawget",       "rawlen",
                                             "select",   "setmetatable", "getmetatable", "tonumber",
                                             "tostring", "type",         "_VERSION",     NULL};
    copy_lib(L, LUA_GNAME, base_names, NULL); /* base */
    lua_pushcfunction(L, sb_pcall);
    lua_setfield(L, -2, "pcall");
    lua_pushcfunction(L, sb_xpcall);
    lua_setfield(L, -2, "xpcall");
    lua_pushcfunction(L, sb_print);
    lua_setfield(L, -2, "print");
    wrap(L, "setmetatable", sb_setmetatable);
    wrap(L, "tonumber", sb_each_byte);
    wrap(L, "rawequal", sb_rawequal);

    /* string: without dump, with functions that pay for their work, reachable
     * from string values only through a read-only view. The library's metatable for
     * strings gives way to one whose __index is that view; its arithmetic
     * metamethods stay, since Lua 5.4 converts strings in arithmetic ("10" + 1)
     * with them. */
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1); /* base "" lib-mt */
    lua_remove(L, -2);
    int lib_mt = lua_gettop(L);
    copy_lib(L, LUA_STRLIBNAME, NULL, "dump"); /* base lib-mt string */
    static const struct {
        const char *name;
        lua_CFunction fn;
    } string_costs[] = {
        {"find", sb_find},          {"match", sb_match},     {"gmatch", sb_gmatch},
        {"gsub", sb_gsub},          {"rep", sb_rep},         {"byte", sb_byte},
        {"char", sb_each_argument}, {"lower", sb_each_byte}, {"upper", sb_each_byte},
        {"reverse", sb_each_byte},  {"format", sb_format},   {"pack", sb_pack},
        {"packsize", sb_pack},      {"unpack", sb_pack},
    };
    for (size_t i = 0; i < sizeof string_costs / sizeof *string_costs; i++)
        wrap(L, string_costs[i].name, string_costs[i].fn);
    sandbox_readonly(L); /* base lib-mt string-ro */
    lua_pushliteral(L, "");
    lua_createtable(L, 0, 2 + (int)(sizeof STRING_ARITH / sizeof *STRING_ARITH));
    lua_pushvalue(L, -3); /* base lib-mt string-ro "" mt string-ro */
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    for (size_t i = 0; i < sizeof STRING_ARITH / sizeof *STRING_ARITH; i++) {
        lua_getfield(L, lib_mt, STRING_ARITH[i]);
        lua_pushcclosure(L, sb_each_byte, 1);
        lua_setfield(L, -2, STRING_ARITH[i]);
    }
    lua_setmetatable(L, -2);
    lua_pop(L, 1);
    lua_setfield(L, -3, "string"); /* base lib-mt */
    lua_pop(L, 1);

    copy_lib(L, LUA_TABLIBNAME, NULL, NULL);
    wrap(L, "move", sb_move);
    wrap(L, "concat", sb_concat);
    wrap(L, "insert", sb_insert);
    wrap(L, "remove", sb_remove);
    wrap(L, "sort", sb_sort);
    wrap(L, "unpack", sb_unpack);
    wrap(L, "pack", sb_each_argument);
    sandbox_readonly(L);
    lua_setfield(L, -2, "table");
    copy_lib(L, LUA_MATHLIBNAME, NULL, NULL);
    sandbox_readonly(L);
    lua_setfield(L, -2, "math");
    copy_lib(L, LUA_UTF8LIBNAME, NULL, NULL);
    wrap(L, "char", sb_each_argument);
    wrap(L, "len", sb_utf8_len);
    wrap(L, "codepoint", sb_utf8_codepoint);
    wrap(L, "offset", sb_utf8_offset);
    wrap(L, "codes", sb_utf8_codes);
    sandbox_readonly(L);
    lua_setfield(L, -2, "utf8");
    static const char *const os_names[] = {"time", "date", "clock", NULL};
    static const char *const os_env_names[] = {"time", "date", "clock", "getenv", NULL};
    copy_lib(L, LUA_OSLIBNAME, (flags & SANDBOX_GETENV) ? os_env_names : os_names, NULL);
    wrap(L, "date", sb_date);
    wrap(L, "time", sb_time);
    sandbox_readonly(L);
    lua_setfield(L, -2, "os");

    sb->base_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

sandbox *sandbox_new(int flags)
{
    sandbox *sb = calloc(1, sizeof(*sb));
    if (!sb)
        return NULL;
    sb->limit = SIZE_MAX;
    sb->base_ref = LUA_NOREF;
    sb->pool = pool_new();
    sb->L = sb->pool ? lua_newstate(sb_alloc, sb) : NULL;
    if (!sb->L) {
        pool_free(sb->pool);
        free(sb);
        return NULL;
    }
    *(sandbox **)lua_getextraspace(sb->L) = sb;
    lua_gc(sb->L, LUA_GCGEN, 0, 0);
    lua_pushcfunction(sb->L, build_env);
    lua_pushinteger(sb->L, flags);
    if (lua_pcall(sb->L, 1, 0, 0) != LUA_OK) {
        sandbox_free(sb);
        return NULL;
    }
    return sb;
}

void sandbox_free(sandbox *sb)
{
    if (!sb)
        return;
    if (sb->L)
        lua_close(sb->L);
    pool_free(sb->pool);
    free(sb);
}

lua_State *sandbox_lua(sandbox *sb)
{
    return sb->L;
}

void sandbox_expose(sandbox *sb, const char *name)
{
    lua_State *L = sb->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->base_ref); /* v base */
    lua_insert(L, -2);                               /* base v */
    lua_setfield(L, -2, name);
    lua_pop(L, 1);
}

int sandbox_load(sandbox *sb, const char *chunkname, const char *src, size_t len, char *err,
                 size_t errlen)
{
    lua_State *L = sb->L;
    if (luaL_loadbufferx(L, src, len, chunkname, "t") != LUA_OK) {
        str_copy(err, errlen, lua_isstring(L, -1) ? lua_tostring(L, -1) : "cannot load");
        lua_pop(L, 1);
        return -1;
    }
    /* fn */
    lua_newtable(L);          /* fn env */
    lua_createtable(L, 0, 2); /* fn env mt */
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->base_ref);
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    if (!lua_setupvalue(L, -2, 1)) /* fn */
        lua_pop(L, 1);
    return 0;
}

enum sandbox_rc sandbox_call(sandbox *sb, int nargs, int nresults, const struct sandbox_limits *lim,
                             struct sandbox_error *err)
{
    lua_State *L = sb->L;
    int fn = lua_gettop(L) - nargs;
    lua_pushcfunction(L, sb_msgh);
    lua_insert(L, fn); /* msgh fn args */

    sb->tripped = TRIP_NONE;
    sb->steps = 0;
    sb->unpaid = 0;
    sb->budget = lim && lim->instructions > 0 ? lim->instructions : INT64_MAX;
    sb->limit = lim && lim->memory_bytes > 0 ? sb->used + lim->memory_bytes : SIZE_MAX;
    sb->where[0] = '\0';
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, HOOK_STEP);
    sb->running = 1;

    int status = lua_pcall(L, nargs, nresults, fn);

    sb->running = 0;
    lua_sethook(L, NULL, 0, 0);
    sb->limit = SIZE_MAX;
    enum trip tripped = sb->tripped;
    sb->tripped = TRIP_NONE;

    if (status == LUA_OK && tripped == TRIP_NONE) {
        lua_remove(L, fn);
        return SANDBOX_OK;
    }
    if (err) {
        const char *msg = status != LUA_OK && lua_isstring(L, -1) ? lua_tostring(L, -1) : "error";
        str_copy(err->msg, sizeof err->msg, msg);
        str_copy(err->where, sizeof err->where, sb->where);
    }
    lua_settop(L, fn - 1);
    if (tripped == TRIP_NONE)
        return SANDBOX_ERROR;
    sb->damaged = 1;
    if (err) {
        if (tripped == TRIP_MEMORY)
            str_printf(err->msg, sizeof err->msg, "memory limit exceeded (%zu bytes)",
                       lim ? lim->memory_bytes : 0);
        else
            str_printf(err->msg, sizeof err->msg, "instruction limit exceeded (%lld instructions)",
                       (long long)(lim ? lim->instructions : 0));
    }
    return SANDBOX_LIMIT;
}

int64_t sandbox_steps(const sandbox *sb)
{
    return sb->steps;
}

size_t sandbox_used(const sandbox *sb)
{
    return sb->used;
}

size_t sandbox_memory(const sandbox *sb)
{
    return sb->used + pool_idle(sb->pool);
}

int sandbox_damaged(const sandbox *sb)
{
    return sb->damaged;
}
