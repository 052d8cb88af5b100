/*
 * fuzz_map: JSON -> Lua -> JSON, as `tributary map` and the sender see it.
 * rules_map(INPUT_ANY) (an envelope, a list, one event or NDJSON) with the
 * shipped rules and outcomes kept; then every record becomes an mParticle
 * batch (mparticle_build_batch, as cmd_map prints it), and all records
 * together one more batch (as the sender merges one user's events).
 *
 * Checks: one outcome per event, pointing at a record, a drop or a dead letter
 * that exists; every batch is built, is a syntactically valid JSON object, and
 * fits mparticle_batch_size_bound (the sender sizes requests with it).
 *
 * The engine is fuzz_engine.h's: the shipped rules, as the service runs them.
 */
#include "fuzz_engine.h"
#include "log.h"
#include "mparticle.h"
#include "record.h"
#include "rules.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *environment;

#define CHECK(cond) FUZZ_CHECK("fuzz_map", cond)

/* ---- a strict JSON syntax check (RFC 8259; bytes >= 0x80 are not decoded) -- */

struct json {
    const char *p, *end;
    int depth;
};

static void json_ws(struct json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int json_lit(struct json *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return -1;
    j->p += n;
    return 0;
}

static int json_digits(struct json *j)
{
    const char *s = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    return j->p > s ? 0 : -1;
}

static int json_number(struct json *j)
{
    if (j->p < j->end && *j->p == '-')
        j->p++;
    if (j->p < j->end && *j->p == '0')
        j->p++;
    else if (json_digits(j) != 0)
        return -1;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (json_digits(j) != 0)
            return -1;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (json_digits(j) != 0)
            return -1;
    }
    return 0;
}

static int json_string(struct json *j)
{
    if (j->p >= j->end || *j->p != '"')
        return -1;
    j->p++;
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p++;
        if (c == '"')
            return 0;
        if (c < 0x20)
            return -1;
        if (c != '\\')
            continue;
        if (j->p >= j->end)
            return -1;
        c = (unsigned char)*j->p++;
        if (c == 'u') {
            for (int i = 0; i < 4; i++, j->p++) {
                if (j->p >= j->end || !strchr("0123456789abcdefABCDEF", *j->p) || !*j->p)
                    return -1;
            }
        } else if (!strchr("\"\\/bfnrt", c) || c == '\0') {
            return -1;
        }
    }
    return -1;
}

static int json_value(struct json *j);

static int json_container(struct json *j, char close, int object)
{
    if (++j->depth > 512)
        return -1;
    j->p++;
    json_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        j->depth--;
        return 0;
    }
    for (;;) {
        json_ws(j);
        if (object) {
            if (json_string(j) != 0)
                return -1;
            json_ws(j);
            if (json_lit(j, ":") != 0)
                return -1;
        }
        if (json_value(j) != 0)
            return -1;
        json_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == close) {
            j->p++;
            j->depth--;
            return 0;
        }
        return -1;
    }
}

static int json_value(struct json *j)
{
    json_ws(j);
    if (j->p >= j->end)
        return -1;
    switch (*j->p) {
    case '{':
        return json_container(j, '}', 1);
    case '[':
        return json_container(j, ']', 0);
    case '"':
        return json_string(j);
    case 't':
        return json_lit(j, "true");
    case 'f':
        return json_lit(j, "false");
    case 'n':
        return json_lit(j, "null");
    default:
        return json_number(j);
    }
}

/* 1 when s is exactly one JSON object (surrounding white space allowed). */
static int json_is_object(const char *s, size_t n)
{
    struct json j = {s, s + n, 0};
    json_ws(&j);
    if (j.p >= j.end || *j.p != '{' || json_value(&j) != 0)
        return 0;
    json_ws(&j);
    return j.p == j.end;
}

/* ---- the engine --------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_engine_init("fuzz_map");
    environment = fuzz_engine_config()->environment;
    return 0;
}

/* Builds the batch of these parts and checks it. */
static void check_batch(const struct batch_part *parts, size_t n)
{
    char srid[UUID_STR_LEN];
    if (mparticle_source_request_id(parts, n, srid) != 0)
        abort();
    CHECK(strlen(srid) == UUID_STR_LEN - 1);
    buf out;
    buf_init(&out, 64u << 20);
    CHECK(mparticle_build_batch(&out, environment, srid, parts, n) == 0);
    CHECK(out.len > 0 && out.data != NULL);
    if (!json_is_object(out.data, out.len)) {
        fprintf(stderr, "fuzz_map: the batch is not a JSON object:\n%s\n", out.data);
        abort();
    }
    size_t bound = mparticle_batch_size_bound(parts, n);
    if (out.len > bound) {
        fprintf(stderr, "fuzz_map: batch of %zu bytes exceeds its bound of %zu:\n%s\n", out.len,
                bound, out.data);
        abort();
    }
    buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct mapping m;
    mapping_init(&m);
    m.keep_outcomes = 1;
    struct input_error e;
    int rc = rules_map(fuzz_engine(), (const char *)data, size, INPUT_ANY, STR_NULL, &m, &e);
    CHECK(rc == 0 || rc == -1);
    if (rc != 0) {
        CHECK(e.status == 400 || e.status == 413 || e.status == 503);
        CHECK(e.reason[0] != '\0');
        CHECK(m.nrecords == 0 && m.ndead == 0 && m.noutcomes == 0 && m.nevents == 0);
        mapping_free(&m);
        return 0;
    }
    CHECK(m.noutcomes == m.nevents);
    size_t accounted = m.nrecords + m.ndead;
    for (size_t i = 0; i < DROP_REASON_COUNT; i++)
        accounted += m.dropped[i];
    CHECK(accounted == m.nevents);

    struct batch_part *parts = calloc(m.nrecords ? m.nrecords : 1, sizeof(*parts));
    CHECK(parts != NULL);
    size_t nparts = 0;
    for (size_t i = 0; i < m.noutcomes; i++) {
        const struct outcome *o = &m.outcomes[i];
        CHECK(o->event_id.p != NULL && o->event_type.p != NULL);
        if (o->kind == OUTCOME_RECORD) {
            CHECK(o->index < m.nrecords);
            const struct record *r = &m.records[o->index];
            CHECK((int)r->feed >= 0 && (int)r->feed < FEED_COUNT);
            CHECK(r->event.n > 0 && r->raw.n > 0);
            struct batch_part part = {r->batch, r->event, r->event_id};
            check_batch(&part, 1);
            parts[nparts++] = part;
        } else if (o->kind == OUTCOME_DROPPED) {
            CHECK((int)o->reason >= 0 && (int)o->reason < DROP_REASON_COUNT);
        } else {
            CHECK(o->kind == OUTCOME_DEAD);
            CHECK(o->index < m.ndead);
            const struct dead_letter *d = &m.dead[o->index];
            CHECK(d->reason != NULL && d->detail.p != NULL);
            CHECK(d->feed >= -1 && d->feed < FEED_COUNT);
        }
    }
    CHECK(nparts == m.nrecords);
    if (nparts > 1)
        check_batch(parts, nparts);
    free(parts);
    mapping_free(&m);
    return 0;
}
