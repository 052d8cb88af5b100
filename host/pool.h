/*
 * pool: size-class storage for the small objects of one Lua state.
 *
 * A mapped event allocates and frees a few hundred small blocks (table
 * headers, hash parts, strings of 16 - 256 bytes). Through malloc each one
 * costs a locked call into a shared arena, and the connection threads contend
 * for those locks. A pool hands out blocks of 16-byte size classes from 64 KiB
 * slabs and keeps freed blocks on a list per class for the next allocation of
 * that class: no locks, no search, no coalescing. Larger blocks go to malloc.
 *
 * The slabs stay with the pool until pool_free: the pool holds the state's peak
 * of small objects. pool_idle reports what it holds beyond the blocks in use,
 * so that the owner can count it and rebuild a state that grew too large.
 *
 * Not thread-safe: one pool serves one Lua state, used by one thread at a time.
 * Under AddressSanitizer a free block is poisoned until it is handed out again.
 *
 * Uses only libc.
 */
#ifndef TRIBUTARY_POOL_H
#define TRIBUTARY_POOL_H

#include <stddef.h>

/* Blocks up to this size come from the pool. */
#define POOL_MAX_BLOCK 256

typedef struct pool pool;

/* Returns a new, empty pool, or NULL when out of memory. Free with pool_free. */
pool *pool_new(void);
/* Releases every slab; every block handed out becomes invalid. Accepts NULL. */
void pool_free(pool *p);

/* The lua_Alloc contract for a block of osize bytes at ptr (ptr NULL: none):
 * nsize 0 frees it and returns NULL; otherwise returns a block of nsize bytes
 * holding the first min(osize, nsize) bytes of the old one, or NULL when out
 * of memory (the old block is then untouched). */
void *pool_resize(pool *p, void *ptr, size_t osize, size_t nsize);

/* Bytes of slabs not handed out: free blocks, and the unused ends of slabs. */
size_t pool_idle(const pool *p);

#endif
