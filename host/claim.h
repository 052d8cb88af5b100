/*
 * claim: the batches the sender persists at once (one claim of records), kept
 * by the queue as one row, and which of them are finished.
 *
 * One row instead of one per batch: persisting a claim is one insert, and the
 * acknowledgement of a request's batches updates the claim's small bitmap of
 * finished batches, where a row per batch cost an insert and a delete each.
 *
 * Encoding (integers little-endian): u32 count, then per batch u8 length of
 * the source_request_id, its bytes, i64 oldest_ms, u32 number of records and
 * the record ids as i64. Batch i of the claim in row r has the id
 * r << CLAIM_INDEX_BITS | i.
 */
#ifndef TRIBUTARY_CLAIM_H
#define TRIBUTARY_CLAIM_H

#include "queue.h"

#include <stddef.h>
#include <stdint.h>

#define CLAIM_INDEX_BITS 16
#define CLAIM_MAX_BATCHES ((size_t)1 << CLAIM_INDEX_BITS)

/* One batch of a parsed claim; srid and ids point into the encoded bytes. */
struct claim_batch {
    const char *srid;
    size_t srid_len;
    int64_t oldest_ms;
    size_t nrecords;
    const unsigned char *ids; /* nrecords little-endian i64 */
};

/* Encodes batches b[0..n) (n <= CLAIM_MAX_BATCHES). Returns malloc'd bytes and
 * their length in *len, or NULL when out of memory. */
unsigned char *claim_encode(const struct queue_batch *b, size_t n, size_t *len);

/* Parses an encoded claim into a malloc'd array (*out, free it). Returns the
 * number of batches, -1 when the bytes are malformed, or CLAIM_NO_MEMORY. */
#define CLAIM_NO_MEMORY (-2)
long claim_parse(const unsigned char *p, size_t len, struct claim_batch **out);
/* How the log says why claim_parse failed (rc < 0). */
const char *claim_parse_failure(long rc);

/* Record i of a parsed batch. */
int64_t claim_record(const struct claim_batch *b, size_t i);

/* The batch id of batch i of the claim in row `row`, and back. */
int64_t claim_batch_id(int64_t row, size_t i);
int64_t claim_row_of(int64_t batch_id);
size_t claim_index_of(int64_t batch_id);

/* Finished batches: bit i of byte i / 8 of a bitmap of CLAIM_BITMAP_BYTES(n). */
#define CLAIM_BITMAP_BYTES(n) (((n) + 7) / 8)
int claim_finished(const unsigned char *bits, size_t nbytes, size_t i);
void claim_finish(unsigned char *bits, size_t i);

#endif
