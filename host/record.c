#include "record.h"

#include <stdlib.h>
#include <string.h>

const char *const FEED_NAMES[FEED_COUNT] = {"ios", "android", "web", "unbound"};

const char *const DEAD_REASONS[DEAD_REASON_COUNT] = {DEAD_RULE_ERROR,     DEAD_RULE_LIMIT,
                                                     DEAD_INVALID_OUTPUT, DEAD_REJECTED,
                                                     DEAD_MAX_AGE,        DEAD_FAILING};

const char *const DROP_REASON_NAMES[DROP_REASON_COUNT] = {"unsupported_type", "not_selected",
                                                          "rule_drop", "no_external_id"};

int feed_from_name(const char *name, size_t n)
{
    for (int i = 0; i < FEED_COUNT; i++) {
        if (strlen(FEED_NAMES[i]) == n && memcmp(FEED_NAMES[i], name, n) == 0)
            return i;
    }
    return -1;
}

void mapping_init(struct mapping *m)
{
    memset(m, 0, sizeof(*m));
    arena_init(&m->mem);
}

void mapping_free(struct mapping *m)
{
    if (!m)
        return;
    arena_free(&m->mem);
    free(m->records);
    free(m->dead);
    free(m->outcomes);
    memset(m, 0, sizeof(*m));
}

static void *grow(void *arr, size_t *cap, size_t n, size_t size)
{
    if (n < *cap)
        return arr;
    size_t ncap = *cap ? *cap * 2 : 64;
    void *p = realloc(arr, ncap * size);
    if (!p)
        return NULL;
    *cap = ncap;
    return p;
}

struct record *mapping_add_record(struct mapping *m)
{
    struct record *r = grow(m->records, &m->records_cap, m->nrecords, sizeof(*r));
    if (!r)
        return NULL;
    m->records = r;
    r = &m->records[m->nrecords++];
    memset(r, 0, sizeof(*r));
    return r;
}

struct dead_letter *mapping_add_dead(struct mapping *m)
{
    struct dead_letter *d = grow(m->dead, &m->dead_cap, m->ndead, sizeof(*d));
    if (!d)
        return NULL;
    m->dead = d;
    d = &m->dead[m->ndead++];
    memset(d, 0, sizeof(*d));
    d->feed = -1;
    return d;
}

struct outcome *mapping_add_outcome(struct mapping *m)
{
    struct outcome *o = grow(m->outcomes, &m->outcomes_cap, m->noutcomes, sizeof(*o));
    if (!o)
        return NULL;
    m->outcomes = o;
    o = &m->outcomes[m->noutcomes++];
    memset(o, 0, sizeof(*o));
    return o;
}

str mapping_copy(struct mapping *m, const char *p, size_t n, int *failed)
{
    const char *c = arena_strndup(&m->mem, p ? p : "", p ? n : 0);
    if (!c) {
        *failed = 1;
        return STR_NULL;
    }
    return (str){c, p ? n : 0};
}

int mapping_add_copy(struct mapping *m, const struct record *r)
{
    int failed = 0;
    struct record c = *r;
    c.user = mapping_copy(m, r->user.p, r->user.n, &failed);
    c.batch = mapping_copy(m, r->batch.p, r->batch.n, &failed);
    c.event = mapping_copy(m, r->event.p, r->event.n, &failed);
    c.raw = mapping_copy(m, r->raw.p, r->raw.n, &failed);
    if (r->workspace.p)
        c.workspace = mapping_copy(m, r->workspace.p, r->workspace.n, &failed);
    c.event_id = mapping_copy(m, r->event_id.p, r->event_id.n, &failed);
    c.event_type = mapping_copy(m, r->event_type.p, r->event_type.n, &failed);
    struct record *slot = failed ? NULL : mapping_add_record(m);
    if (!slot)
        return -1;
    *slot = c;
    return 0;
}
