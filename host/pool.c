#include "pool.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* gcc says __SANITIZE_ADDRESS__, clang __has_feature(address_sanitizer) */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define POOL_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(POOL_ASAN)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* Size classes are multiples of GRAIN, which is also every block's alignment
 * (enough for any type Lua stores). */
#define GRAIN 16
#define CLASSES (POOL_MAX_BLOCK / GRAIN)
#define SLAB_BYTES (64 * 1024)

struct slab {
    struct slab *next;
    _Alignas(GRAIN) unsigned char data[];
};

struct free_block {
    struct free_block *next;
};

struct pool {
    struct free_block *free[CLASSES]; /* free blocks of each class */
    unsigned char *bump;              /* the newest slab's unused part */
    size_t left;
    struct slab *slabs;
    size_t footprint; /* bytes of slabs */
    size_t lent;      /* bytes of the blocks handed out, by class size */
};

pool *pool_new(void)
{
    return calloc(1, sizeof(pool));
}

void pool_free(pool *p)
{
    if (!p)
        return;
    for (struct slab *s = p->slabs, *next; s; s = next) {
        next = s->next;
        UNPOISON(s, SLAB_BYTES);
        free(s);
    }
    free(p);
}

size_t pool_idle(const pool *p)
{
    return p->footprint - p->lent;
}

static size_t class_of(size_t n)
{
    return (n - 1) / GRAIN;
}

/* A block of class c, n bytes of it usable; NULL when out of memory. */
static void *take(pool *p, size_t c, size_t n)
{
    size_t size = (c + 1) * GRAIN;
    unsigned char *b;
    if (p->free[c]) {
        struct free_block *f = p->free[c];
        UNPOISON(f, sizeof *f);
        p->free[c] = f->next;
        /* Free blocks were mostly freed by a collection long before they are
         * taken again, so reading a block's link is a cache miss; fetching the
         * next block now hides the miss from the next allocation of the class
         * (`perf` in `make bench`: two thirds of this function's time waited
         * on the link before). */
        if (f->next)
            __builtin_prefetch(f->next, 1);
        b = (unsigned char *)f;
    } else {
        if (p->left < size) {
            /* what is left of the old slab (under one block) is not used */
            struct slab *s = malloc(SLAB_BYTES);
            if (!s)
                return NULL;
            s->next = p->slabs;
            p->slabs = s;
            p->footprint += SLAB_BYTES;
            p->bump = s->data;
            p->left = SLAB_BYTES - offsetof(struct slab, data);
            POISON(p->bump, p->left);
        }
        b = p->bump;
        p->bump += size;
        p->left -= size;
    }
    p->lent += size;
    UNPOISON(b, n);
    return b;
}

static void give(pool *p, void *ptr, size_t c)
{
    struct free_block *f = ptr;
    p->lent -= (c + 1) * GRAIN;
    UNPOISON(f, sizeof *f); /* the block may have been smaller than the link */
    f->next = p->free[c];
    p->free[c] = f;
    POISON(f, (c + 1) * GRAIN);
}

void *pool_resize(pool *p, void *ptr, size_t osize, size_t nsize)
{
    if (!ptr)
        osize = 0;
    int small_old = ptr && osize <= POOL_MAX_BLOCK;
    if (nsize == 0) {
        if (small_old)
            give(p, ptr, class_of(osize));
        else
            free(ptr);
        return NULL;
    }
    if (nsize > POOL_MAX_BLOCK) {
        if (!small_old)
            return realloc(ptr, nsize);
        void *q = malloc(nsize);
        if (!q)
            return NULL;
        memcpy(q, ptr, osize);
        give(p, ptr, class_of(osize));
        return q;
    }
    size_t c = class_of(nsize);
    if (small_old && class_of(osize) == c) {
        UNPOISON(ptr, nsize);
        return ptr;
    }
    void *q = take(p, c, nsize);
    if (!q)
        return NULL;
    if (ptr) {
        memcpy(q, ptr, osize < nsize ? osize : nsize);
        if (small_old)
            give(p, ptr, class_of(osize));
        else
            free(ptr);
    }
    return q;
}
