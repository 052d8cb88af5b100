#include "event_names.h"

#include "digest.h"
#include "log.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Past this share of the limit (in tenths), a warning. */
#define NEAR_TENTHS 9

struct slot {
    uint64_t hash; /* 0: empty */
    const char *name;
    size_t len;
};

struct event_names {
    arena mem; /* the names kept */
    struct slot *slots;
    size_t cap; /* a power of two, at least twice the names kept */
    size_t n;
    _Atomic int64_t count; /* n, for other threads */
    str *unstored;
    size_t nunstored, unstored_cap;
    int warned_near; /* the warning of 90% is written */
    int warned_full; /* the line that the count stops is written */
};

event_names *event_names_new(void)
{
    event_names *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    arena_init(&s->mem);
    return s;
}

void event_names_free(event_names *s)
{
    if (!s)
        return;
    arena_free(&s->mem);
    free(s->slots);
    free(s->unstored);
    free(s);
}

static uint64_t hash_of(str name)
{
    uint64_t h = digest_fnv64(DIGEST_FNV64_INIT, name.p, name.n);
    return h ? h : 1;
}

/* The slot of `name`: the one holding it, or the empty one it would take. */
static struct slot *find(const event_names *s, str name, uint64_t h)
{
    size_t mask = s->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        struct slot *e = &s->slots[i];
        if (e->hash == 0 ||
            (e->hash == h && e->len == name.n && memcmp(e->name, name.p, name.n) == 0))
            return e;
    }
}

static int grow(event_names *s)
{
    size_t cap = s->cap ? s->cap * 2 : 256;
    struct slot *old = s->slots, *slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return -1;
    size_t old_cap = s->cap;
    s->slots = slots;
    s->cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].hash)
            *find(s, (str){old[i].name, old[i].len}, old[i].hash) = old[i];
    }
    free(old);
    return 0;
}

/* Whether the set holds `name` (of hash h). */
static int holds(const event_names *s, str name, uint64_t h)
{
    return s->cap && find(s, name, h)->hash != 0;
}

/* Keeps a name the set does not hold: its copy (NUL-terminated), or NULL
 * when out of memory. */
static const char *add(event_names *s, str name, uint64_t h)
{
    if ((s->n + 1) * 2 > s->cap && grow(s) != 0)
        return NULL;
    const char *copy = arena_strndup(&s->mem, name.p ? name.p : "", name.n);
    if (!copy)
        return NULL;
    *find(s, name, h) = (struct slot){h, copy, name.n};
    s->n++;
    atomic_store(&s->count, (int64_t)s->n);
    return copy;
}

int event_names_load(event_names *s, str name)
{
    uint64_t h = hash_of(name);
    return holds(s, name, h) || add(s, name, h) ? 0 : -1;
}

void event_names_check(event_names *s, int64_t limit)
{
    if (s->warned_near || (int64_t)s->n * 10 < limit * NEAR_TENTHS)
        return;
    s->warned_near = 1;
    log_warn("event names near mParticle's limit: it drops the events of new names past it "
             "(tributary queue names lists them)",
             LOG_I("names", (long long)s->n) LOG_I("limit", (long long)limit));
}

int event_names_note(event_names *s, str name, int64_t limit)
{
    uint64_t h = hash_of(name);
    if (holds(s, name, h))
        return 0;
    if ((int64_t)s->n >= 2 * limit) {
        if (!s->warned_full) {
            s->warned_full = 1;
            log_error("more new event names than tributary counts (twice the limit); the count "
                      "stops here",
                      LOG_I("names", (long long)s->n) LOG_I("limit", (long long)limit));
        }
        return 0;
    }
    if (s->nunstored == s->unstored_cap) {
        size_t cap = s->unstored_cap ? s->unstored_cap * 2 : 16;
        str *grown = realloc(s->unstored, cap * sizeof(*grown));
        if (!grown)
            return 0;
        s->unstored = grown;
        s->unstored_cap = cap;
    }
    const char *kept = add(s, name, h);
    if (!kept)
        return 0;
    s->unstored[s->nunstored++] = (str){kept, name.n};
    if ((int64_t)s->n > limit)
        log_repeated(LOG_ERROR,
                     "new event name past mParticle's limit of unique event names: mParticle "
                     "drops its events",
                     LOG_S("name", kept) LOG_I("names", (long long)s->n)
                         LOG_I("limit", (long long)limit));
    else
        log_debug("new event name sent to mParticle",
                  LOG_S("name", kept) LOG_I("names", (long long)s->n));
    event_names_check(s, limit);
    return 1;
}

const str *event_names_unstored(const event_names *s, size_t *n)
{
    *n = s->nunstored;
    return s->unstored;
}

void event_names_stored(event_names *s)
{
    s->nunstored = 0;
}

int64_t event_names_count(const event_names *s)
{
    return atomic_load(&s->count);
}
