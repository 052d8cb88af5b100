#include "dedup.h"

#include "digest.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* SEGMENTS - 1 segments cover the window; the last one is being filled. */
#define SEGMENTS 5
#define MIN_CAPACITY 4096
/* A table grows by half once 4/5 full. */
#define MAX_LOAD_NUM 4
#define MAX_LOAD_DEN 5
/* Growing moves this many slots per insert into the bigger table, so no insert
 * ever waits for a whole table to be copied (a copy of millions of ids would
 * hold up every request behind it for a second). Moving at least two slots per
 * insert finishes the move long before the new table fills. */
#define MOVE_PER_INSERT 8

/* Open addressing with linear probing. Slots with a == 0 are free (b == 0) or
 * removed (b == 1). */
struct table {
    struct dedup_fp *fps;
    size_t cap;
    size_t used; /* live and removed */
    size_t live;
};

struct segment {
    int64_t slot;     /* at_ms / segment_ms of its ids; -1 when unused */
    struct table t;   /* where new ids go */
    struct table old; /* while growing: the table being copied into t */
    size_t moved;     /* slots of old already copied */
    size_t old_moved; /* ids of old already in t (counted once) */
};

struct dedup {
    int64_t segment_ms;
    struct segment seg[SEGMENTS];
};

void dedup_fp_encode(const struct dedup_fp *fp, unsigned char *out)
{
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(fp->a >> (56 - 8 * i));
        out[8 + i] = (unsigned char)(fp->b >> (56 - 8 * i));
    }
}

void dedup_fp_decode(const unsigned char *in, struct dedup_fp *out)
{
    uint64_t a = 0, b = 0;
    for (int i = 0; i < 8; i++) {
        a = a << 8 | in[i];
        b = b << 8 | in[8 + i];
    }
    out->a = a;
    out->b = b;
}

int dedup_fingerprint(const char *id, size_t n, struct dedup_fp *out)
{
    unsigned char md[32];
    if (digest_sha256(id, n, md) != 0)
        return -1;
    dedup_fp_decode(md, out);
    out->a |= 1; /* 0 marks free slots */
    return 0;
}

/* Tables come straight from the kernel: zeroed lazily, page by page, and given
 * back whole when freed (calloc may zero a large block at once, a stall). */
static struct dedup_fp *table_alloc(size_t cap)
{
    void *p = mmap(NULL, cap * sizeof(struct dedup_fp), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void table_free(struct table *t)
{
    if (t->fps)
        munmap(t->fps, t->cap * sizeof(struct dedup_fp));
    memset(t, 0, sizeof(*t));
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
    table_free(&s->t);
    table_free(&s->old);
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

/* The slot holding fp, or where it would go (a free or removed slot), or
 * SIZE_MAX when the table is empty. */
static size_t probe(const struct table *t, const struct dedup_fp *fp, int *found)
{
    *found = 0;
    if (!t->cap)
        return SIZE_MAX;
    /* the fingerprint is already uniform: scale it to the capacity */
    size_t i = (size_t)(((unsigned __int128)fp->b * t->cap) >> 64);
    size_t reuse = SIZE_MAX;
    for (size_t n = 0; n < t->cap; n++) {
        const struct dedup_fp *e = &t->fps[i];
        if (e->a == fp->a && e->b == fp->b) {
            *found = 1;
            return i;
        }
        if (e->a == 0) {
            if (e->b == 0)
                return reuse != SIZE_MAX ? reuse : i;
            if (reuse == SIZE_MAX)
                reuse = i;
        }
        if (++i == t->cap)
            i = 0;
    }
    return reuse;
}

static void put(struct table *t, const struct dedup_fp *fp)
{
    int found;
    size_t at = probe(t, fp, &found);
    if (found)
        return;
    if (t->fps[at].a == 0 && t->fps[at].b == 0)
        t->used++;
    t->fps[at] = *fp;
    t->live++;
}

static int erase(struct table *t, const struct dedup_fp *fp)
{
    int found;
    size_t at = probe(t, fp, &found);
    if (!found)
        return 0;
    t->fps[at].a = 0;
    t->fps[at].b = 1;
    t->live--;
    return 1;
}

/* Moves a few slots of the old table into the new one; frees the old table
 * once it is empty. */
static void move_some(struct segment *s)
{
    for (int n = 0; n < MOVE_PER_INSERT && s->moved < s->old.cap; n++, s->moved++) {
        /* A moved id stays in the old table too: turning it into a removed slot
         * would lengthen every probe that misses there. */
        struct dedup_fp *e = &s->old.fps[s->moved];
        if (e->a != 0) {
            size_t before = s->t.live;
            put(&s->t, e);
            s->old_moved += s->t.live - before;
        }
    }
    if (s->moved == s->old.cap) {
        table_free(&s->old);
        s->moved = 0;
        s->old_moved = 0;
    }
}

static int start_growing(struct segment *s)
{
    size_t cap = s->t.cap ? s->t.cap + s->t.cap / 2 : MIN_CAPACITY;
    if (s->t.used - s->t.live > s->t.live)
        cap = s->t.cap; /* mostly removed slots: same size, cleaned */
    struct dedup_fp *fps = table_alloc(cap);
    if (!fps)
        return -1;
    s->old = s->t;
    s->moved = 0;
    s->old_moved = 0;
    s->t = (struct table){fps, cap, 0, 0};
    return 0;
}

static size_t segment_size(const struct segment *s)
{
    return s->t.live + s->old.live - s->old_moved;
}

/* A new segment gets room for as many ids as the one before it held, at two
 * thirds load: at a steady rate no table ever grows, and memory stays flat once
 * the window is full. */
static int presize(dedup *d, struct segment *s)
{
    if (s->slot < 1)
        return 0;
    const struct segment *prev = &d->seg[(s->slot - 1) % SEGMENTS];
    if (prev->slot != s->slot - 1)
        return 0;
    size_t n = segment_size(prev);
    size_t cap = n + n / 2;
    if (cap <= MIN_CAPACITY)
        return 0;
    struct dedup_fp *fps = table_alloc(cap);
    if (!fps)
        return -1;
    s->t = (struct table){fps, cap, 0, 0};
    return 0;
}

static int live_segment(const dedup *d, const struct segment *s, int64_t now_ms)
{
    return s->slot >= 0 && s->slot > now_ms / d->segment_ms - SEGMENTS;
}

static int segment_contains(const struct segment *s, const struct dedup_fp *fp)
{
    int found;
    probe(&s->t, fp, &found);
    if (!found && s->old.cap)
        probe(&s->old, fp, &found);
    return found;
}

int dedup_contains(const dedup *d, const struct dedup_fp *fp, int64_t now_ms)
{
    for (int i = 0; i < SEGMENTS; i++) {
        const struct segment *s = &d->seg[i];
        if (live_segment(d, s, now_ms) && (s->t.live || s->old.live) && segment_contains(s, fp))
            return 1;
    }
    return 0;
}

int dedup_add(dedup *d, const struct dedup_fp *fp, int64_t at_ms)
{
    int64_t slot = at_ms / d->segment_ms;
    struct segment *s = &d->seg[slot % SEGMENTS];
    if (s->slot != slot) {
        /* older than anything kept: already outside the window */
        if (s->slot > slot)
            return 0;
        /* its ids are SEGMENTS segments old: past the window */
        segment_clear(s);
        s->slot = slot;
        if (presize(d, s) != 0)
            return -1;
    }
    if (segment_contains(s, fp))
        return 0;
    if (s->old.cap)
        move_some(s);
    else if ((s->t.used + 1) * MAX_LOAD_DEN > s->t.cap * MAX_LOAD_NUM && start_growing(s) != 0)
        return -1;
    put(&s->t, fp);
    return 0;
}

void dedup_remove(dedup *d, const struct dedup_fp *fp, int64_t at_ms)
{
    int64_t slot = at_ms / d->segment_ms;
    struct segment *s = &d->seg[slot % SEGMENTS];
    if (s->slot != slot)
        return;
    int in_new = erase(&s->t, fp);
    int in_old = s->old.cap && erase(&s->old, fp);
    if (in_new && in_old)
        s->old_moved--; /* it had been copied: it was counted once */
}

size_t dedup_size(const dedup *d)
{
    size_t n = 0;
    for (int i = 0; i < SEGMENTS; i++)
        n += segment_size(&d->seg[i]);
    return n;
}

size_t dedup_memory(const dedup *d)
{
    size_t n = 0;
    for (int i = 0; i < SEGMENTS; i++)
        n += (d->seg[i].t.cap + d->seg[i].old.cap) * sizeof(struct dedup_fp);
    return n;
}
