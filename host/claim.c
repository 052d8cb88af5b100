#include "claim.h"

#include <stdlib.h>
#include <string.h>

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_i64(unsigned char *p, int64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)((uint64_t)v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static int64_t get_i64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return (int64_t)v;
}

static size_t srid_len(const struct queue_batch *b)
{
    size_t n = strnlen(b->source_request_id, sizeof b->source_request_id);
    return n > 255 ? 255 : n;
}

unsigned char *claim_encode(const struct queue_batch *b, size_t n, size_t *len)
{
    size_t total = 4;
    for (size_t i = 0; i < n; i++)
        total += 1 + srid_len(&b[i]) + 8 + 4 + 8 * b[i].nrecords;
    unsigned char *out = malloc(total), *p = out;
    if (!out)
        return NULL;
    put_u32(p, (uint32_t)n);
    p += 4;
    for (size_t i = 0; i < n; i++) {
        size_t s = srid_len(&b[i]);
        *p++ = (unsigned char)s;
        memcpy(p, b[i].source_request_id, s);
        p += s;
        put_i64(p, b[i].oldest_ms);
        p += 8;
        put_u32(p, (uint32_t)b[i].nrecords);
        p += 4;
        for (size_t k = 0; k < b[i].nrecords; k++, p += 8)
            put_i64(p, b[i].record_ids[k]);
    }
    *len = total;
    return out;
}

const char *claim_parse_failure(long rc)
{
    return rc == CLAIM_NO_MEMORY ? "queue: out of memory to read a persisted claim of batches"
                                 : "queue: a persisted claim of batches is unreadable";
}

long claim_parse(const unsigned char *p, size_t len, struct claim_batch **out)
{
    *out = NULL;
    if (!p || len < 4)
        return -1;
    size_t n = get_u32(p), at = 4;
    if (n > CLAIM_MAX_BATCHES)
        return -1;
    struct claim_batch *b = calloc(n ? n : 1, sizeof(*b));
    if (!b)
        return CLAIM_NO_MEMORY;
    for (size_t i = 0; i < n; i++) {
        if (len - at < 1 || len - at - 1 < (size_t)p[at] + 12)
            goto bad;
        b[i].srid_len = p[at];
        b[i].srid = (const char *)p + at + 1;
        at += 1 + b[i].srid_len;
        b[i].oldest_ms = get_i64(p + at);
        b[i].nrecords = get_u32(p + at + 8);
        at += 12;
        if ((len - at) / 8 < b[i].nrecords)
            goto bad;
        b[i].ids = p + at;
        at += 8 * b[i].nrecords;
    }
    if (at != len)
        goto bad;
    *out = b;
    return (long)n;
bad:
    free(b);
    return -1;
}

int64_t claim_record(const struct claim_batch *b, size_t i)
{
    return get_i64(b->ids + 8 * i);
}

int64_t claim_batch_id(int64_t row, size_t i)
{
    return (int64_t)((uint64_t)row << CLAIM_INDEX_BITS | i);
}

int64_t claim_row_of(int64_t batch_id)
{
    return (int64_t)((uint64_t)batch_id >> CLAIM_INDEX_BITS);
}

size_t claim_index_of(int64_t batch_id)
{
    return (size_t)((uint64_t)batch_id & (CLAIM_MAX_BATCHES - 1));
}

int claim_finished(const unsigned char *bits, size_t nbytes, size_t i)
{
    return i / 8 < nbytes && bits && (bits[i / 8] >> (i % 8) & 1);
}

void claim_finish(unsigned char *bits, size_t i)
{
    bits[i / 8] = (unsigned char)(bits[i / 8] | 1u << (i % 8));
}
