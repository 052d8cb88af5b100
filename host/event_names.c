#include "event_names.h"

#include "digest.h"
#include "log.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* At this share of the limit (in tenths) and past it, a warning. */
#define NEAR_TENTHS 9

/* The set holds a 64-bit fingerprint of each name, not the name, with its
 * place in the order names were first sent: its memory stays 32 bytes a name
 * however long the names a rule makes (two names of one fingerprint, about
 * one chance in a billion at 200,000 names, would count as one). A new name's
 * text is kept only until it is stored. */
struct slot {
    uint64_t h;    /* 0: empty */
    uint64_t rank; /* 1 for the first name sent */
};

struct event_names {
    struct slot *slots;
    size_t cap; /* a power of two, at least twice the names counted */
    size_t n;
    _Atomic int64_t count;       /* n, for other threads */
    struct event_name *unstored; /* their text: copies, freed once stored */
    size_t nunstored, unstored_cap;
    int64_t warned_limit; /* the limit the count is warned of (0: not at 90% of one) */
    int warned_full;      /* the line that the count stops is written */
};

event_names *event_names_new(void)
{
    return calloc(1, sizeof(event_names));
}

void event_names_stored(event_names *s)
{
    for (size_t i = 0; i < s->nunstored; i++)
        free((char *)s->unstored[i].name.p);
    s->nunstored = 0;
}

void event_names_free(event_names *s)
{
    if (!s)
        return;
    event_names_stored(s);
    free(s->slots);
    free(s->unstored);
    free(s);
}

static uint64_t hash_of(str name)
{
    uint64_t h = digest_fnv64(DIGEST_FNV64_INIT, name.p, name.n);
    return h ? h : 1;
}

/* The slot of fingerprint h: the one holding it, or the empty one it would take. */
static struct slot *find(const event_names *s, uint64_t h)
{
    size_t mask = s->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        if (s->slots[i].h == 0 || s->slots[i].h == h)
            return &s->slots[i];
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
        if (old[i].h)
            *find(s, old[i].h) = old[i];
    }
    free(old);
    return 0;
}

/* The place of fingerprint h in the order of names sent, 0 when not held. */
static uint64_t rank_of(const event_names *s, uint64_t h)
{
    return s->cap ? find(s, h)->rank : 0;
}

/* Adds a fingerprint the set does not hold, after the others; -1 when out of
 * memory. */
static int add(event_names *s, uint64_t h)
{
    if ((s->n + 1) * 2 > s->cap && grow(s) != 0)
        return -1;
    s->n++;
    *find(s, h) = (struct slot){h, s->n};
    atomic_store(&s->count, (int64_t)s->n);
    return 0;
}

int event_names_load(event_names *s, str name)
{
    uint64_t h = hash_of(name);
    return rank_of(s, h) ? 0 : add(s, h);
}

int event_names_replace(event_names *s, event_names *read)
{
    for (size_t i = 0; i < s->nunstored; i++) {
        uint64_t h = hash_of(s->unstored[i].name);
        if (!rank_of(read, h) && add(read, h) != 0)
            return -1;
    }
    free(s->slots);
    s->slots = read->slots;
    s->cap = read->cap;
    s->n = read->n;
    atomic_store(&s->count, (int64_t)s->n);
    s->warned_full = 0;
    read->slots = NULL;
    read->cap = read->n = 0;
    atomic_store(&read->count, 0);
    return 0;
}

void event_names_check(event_names *s, int64_t limit)
{
    if ((int64_t)s->n * 10 < limit * NEAR_TENTHS) {
        s->warned_limit = 0; /* under it (again): the next time at it is said */
        return;
    }
    if (s->warned_limit == limit)
        return;
    s->warned_limit = limit;
    if ((int64_t)s->n > limit)
        log_error("event names past mParticle's limit: it drops the events of names new past it "
                  "(tributary queue names lists them)",
                  LOG_I("names", (long long)s->n) LOG_I("limit", (long long)limit));
    else
        log_warn("event names near mParticle's limit: it drops the events of new names past it "
                 "(tributary queue names lists them)",
                 LOG_I("names", (long long)s->n) LOG_I("limit", (long long)limit));
}

/* Keeps the text of a new name until it is stored; -1 when out of memory. */
static int keep_unstored(event_names *s, str name, int64_t now_ms)
{
    if (s->nunstored == s->unstored_cap) {
        size_t cap = s->unstored_cap ? s->unstored_cap * 2 : 16;
        struct event_name *grown = realloc(s->unstored, cap * sizeof(*grown));
        if (!grown)
            return -1;
        s->unstored = grown;
        s->unstored_cap = cap;
    }
    struct event_name *e = &s->unstored[s->nunstored];
    e->name.p = malloc(name.n + 1);
    if (!e->name.p)
        return -1;
    if (name.n)
        memcpy((char *)e->name.p, name.p, name.n);
    ((char *)e->name.p)[name.n] = '\0';
    e->name.n = name.n;
    e->first_ms = now_ms;
    s->nunstored++;
    return 0;
}

int event_names_note(event_names *s, str name, int64_t limit, int64_t now_ms, int *past)
{
    uint64_t h = hash_of(name);
    uint64_t rank = rank_of(s, h);
    *past = rank > (uint64_t)limit;
    if (rank)
        return 0;
    *past = (int64_t)s->n >= limit; /* as a new name, at n + 1 */
    if ((int64_t)s->n >= EVENT_NAMES_COUNTED_PER_LIMIT * limit) {
        if (!s->warned_full) {
            s->warned_full = 1;
            log_error("more new event names than tributary counts (twice the limit); the count "
                      "stops here",
                      LOG_I("names", (long long)s->n) LOG_I("limit", (long long)limit));
        }
        return 0;
    }
    int kept_text = keep_unstored(s, name, now_ms) == 0;
    if (!kept_text || add(s, h) != 0) {
        if (kept_text)
            free((char *)s->unstored[--s->nunstored].name.p);
        log_repeated(LOG_ERROR, "out of memory for a new event name; it is not counted");
        return 0;
    }
    /* the name itself only at debug: a rule may have put a user in it */
    log_debug("new event name sent to mParticle",
              LOG_S("name", s->unstored[s->nunstored - 1].name.p) LOG_I("names", (long long)s->n));
    if ((int64_t)s->n > limit)
        log_repeated(LOG_ERROR,
                     "new event name past mParticle's limit of unique event names: mParticle "
                     "drops its events (tributary queue names lists it)",
                     LOG_I("names", (long long)s->n) LOG_I("limit", (long long)limit));
    event_names_check(s, limit);
    return 1;
}

const struct event_name *event_names_unstored(const event_names *s, size_t *n)
{
    *n = s->nunstored;
    return s->unstored;
}

int64_t event_names_count(const event_names *s)
{
    return atomic_load(&s->count);
}
