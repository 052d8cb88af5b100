#include "dedup.h"

#include "digest.h"

#include <stdlib.h>
#include <string.h>

/* SEGMENTS - 1 segments cover the window; the last one is being filled. */
#define SEGMENTS 5
#define MIN_CAPACITY 1024

/* slot states: a == 0 marks a free (b == 0) or removed (b == 1) slot */
struct segment {
    int64_t slot; /* at_ms / segment_ms of its ids; -1 when unused */
    struct dedup_fp *fps;
    size_t cap;  /* power of two */
    size_t used; /* live ids and removed slots */
    size_t live;
};

struct dedup {
    int64_t segment_ms;
    struct segment seg[SEGMENTS];
};

void dedup_fingerprint(const char *id, size_t n, struct dedup_fp *out)
{
    unsigned char md[32];
    digest_sha256(id, n, md);
    uint64_t a = 0, b = 0;
    for (int i = 0; i < 8; i++) {
        a = a << 8 | md[i];
        b = b << 8 | md[8 + i];
    }
    out->a = a | 1; /* 0 marks free slots */
    out->b = b;
}

dedup *dedup_new(int64_t window_ms)
{
    dedup *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->segment_ms = (window_ms + SEGMENTS - 2) / (SEGMENTS - 1);
    if (d->segment_ms < 1)
        d->segment_ms = 1;
    for (int i = 0; i < SEGMENTS; i++)
        d->seg[i].slot = -1;
    return d;
}

static void segment_clear(struct segment *s)
{
    free(s->fps);
    memset(s, 0, sizeof(*s));
    s->slot = -1;
}

void dedup_free(dedup *d)
{
    if (!d)
        return;
    for (int i = 0; i < SEGMENTS; i++)
        segment_clear(&d->seg[i]);
    free(d);
}

/* The slot holding fp, or where it would go (a free slot); SIZE_MAX when absent
 * and the table is full. */
static size_t probe(const struct segment *s, const struct dedup_fp *fp, int *found)
{
    *found = 0;
    if (!s->cap)
        return SIZE_MAX;
    size_t mask = s->cap - 1, i = (size_t)(fp->b ^ (fp->a >> 7)) & mask;
    size_t reuse = SIZE_MAX;
    for (size_t n = 0; n < s->cap; n++, i = (i + 1) & mask) {
        const struct dedup_fp *e = &s->fps[i];
        if (e->a == fp->a && e->b == fp->b) {
            *found = 1;
            return i;
        }
        if (e->a == 0) {
            if (e->b == 0)
                return reuse != SIZE_MAX ? reuse : i;
            if (reuse == SIZE_MAX)
                reuse = i; /* a removed slot: reusable, but keep looking */
        }
    }
    return reuse;
}

static int live_segment(const dedup *d, const struct segment *s, int64_t now_ms)
{
    return s->slot >= 0 && s->slot > now_ms / d->segment_ms - SEGMENTS;
}

int dedup_contains(const dedup *d, const struct dedup_fp *fp, int64_t now_ms)
{
    for (int i = 0; i < SEGMENTS; i++) {
        const struct segment *s = &d->seg[i];
        if (!live_segment(d, s, now_ms) || !s->live)
            continue;
        int found;
        probe(s, fp, &found);
        if (found)
            return 1;
    }
    return 0;
}

static int grow(struct segment *s)
{
    size_t cap = s->cap ? s->cap * 2 : MIN_CAPACITY;
    if (s->used - s->live > s->live)
        cap = s->cap; /* mostly removed slots: rehash in place size */
    struct dedup_fp *fps = calloc(cap, sizeof(*fps));
    if (!fps)
        return -1;
    struct segment next = {s->slot, fps, cap, 0, 0};
    for (size_t i = 0; i < s->cap; i++) {
        if (s->fps[i].a == 0)
            continue;
        int found;
        size_t at = probe(&next, &s->fps[i], &found);
        next.fps[at] = s->fps[i];
        next.used++;
        next.live++;
    }
    free(s->fps);
    *s = next;
    return 0;
}

int dedup_add(dedup *d, const struct dedup_fp *fp, int64_t at_ms)
{
    int64_t slot = at_ms / d->segment_ms;
    struct segment *s = &d->seg[slot % SEGMENTS];
    if (s->slot != slot) {
        if (s->slot > slot)
            return 0; /* older than anything kept: already outside the window */
        segment_clear(s); /* its ids are SEGMENTS segments old: past the window */
        s->slot = slot;
    }
    if ((s->used + 1) * 10 > s->cap * 7 && grow(s) != 0)
        return -1;
    int found;
    size_t at = probe(s, fp, &found);
    if (found)
        return 0;
    if (s->fps[at].a == 0 && s->fps[at].b == 0)
        s->used++;
    s->fps[at] = *fp;
    s->live++;
    return 0;
}

void dedup_remove(dedup *d, const struct dedup_fp *fp)
{
    for (int i = 0; i < SEGMENTS; i++) {
        struct segment *s = &d->seg[i];
        int found;
        size_t at = probe(s, fp, &found);
        if (found) {
            s->fps[at].a = 0;
            s->fps[at].b = 1;
            s->live--;
            return;
        }
    }
}

size_t dedup_size(const dedup *d)
{
    size_t n = 0;
    for (int i = 0; i < SEGMENTS; i++)
        n += d->seg[i].live;
    return n;
}
