/*
 * dedup: the event ids seen within the dedup window, in memory.
 *
 * Braze delivers at least once, so an id may come again; an id seen within
 * dedup.window_s is acknowledged but not stored twice. Keeping the ids in an
 * on-disk index would dirty one random page per event (ids are random UUIDs), so
 * the queue keeps an append-only log on disk, written in the same transaction as
 * the events, and this set in memory, rebuilt from the log at start.
 *
 * An id is kept as a 128-bit fingerprint (SHA-256, truncated): about 20 bytes
 * per id in memory, and a false match is as likely as guessing a 128-bit key.
 * Ids live in time segments; a segment older than the window is dropped whole.
 *
 * Not thread-safe: the queue's writer thread owns it.
 */
#ifndef TRIBUTARY_DEDUP_H
#define TRIBUTARY_DEDUP_H

#include "util.h"

#include <stdint.h>

typedef struct dedup dedup;

struct dedup_fp {
    uint64_t a; /* never 0 */
    uint64_t b;
};

/* -1 when the hash failed (see digest_sha256): out is then no fingerprint. */
int dedup_fingerprint(const char *id, size_t n, struct dedup_fp *out) WUR;

/* A fingerprint as the queue stores it: a, then b, each big-endian. */
#define DEDUP_FP_BYTES 16
void dedup_fp_encode(const struct dedup_fp *fp, unsigned char *out);
void dedup_fp_decode(const unsigned char *in, struct dedup_fp *out);

/* window_ms > 0. NULL when out of memory. */
dedup *dedup_new(int64_t window_ms);
void dedup_free(dedup *d);
/* 1 when fp was added within the window (as of now_ms). */
int dedup_contains(const dedup *d, const struct dedup_fp *fp, int64_t now_ms);
/* Records fp as seen at at_ms; -1 when out of memory. */
int dedup_add(dedup *d, const struct dedup_fp *fp, int64_t at_ms) WUR;
/* Forgets fp added at at_ms (the commit that added it was rolled back); an
 * older sighting of the same id stays. */
void dedup_remove(dedup *d, const struct dedup_fp *fp, int64_t at_ms);
/* Fingerprints held. */
size_t dedup_size(const dedup *d);
/* Bytes of memory its tables take (what dedup.window_s costs). */
size_t dedup_memory(const dedup *d);

#endif
