/*
 * fuzz_request: the inbound request validator on arbitrary bytes, as POST
 * /currents runs it: rules_map(INPUT_ENVELOPE) with the shipped rules.
 *
 * Checks what rules.h promises: an answer of 0 or -1; a refusal carries 400,
 * 413 or 503 and a reason, and adds nothing to the mapping; an accepted body
 * accounts for every event exactly once (a record, a dead letter or a drop).
 *
 * The engine is fuzz_engine.h's: the shipped rules, as the service runs them.
 */
#include "fuzz_engine.h"
#include "log.h"
#include "record.h"
#include "rules.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) FUZZ_CHECK("fuzz_request", cond)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_engine_init("fuzz_request");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct mapping m;
    mapping_init(&m);
    struct input_error e;
    /* every other input as a workspace's request (?workspace=brand-a) */
    str workspace = size % 2 ? (str){"brand-a", 7} : STR_NULL;
    int rc = rules_map(fuzz_engine(), (const char *)data, size, INPUT_ENVELOPE, workspace, &m, &e);
    CHECK(rc == 0 || rc == -1);
    if (rc != 0) {
        CHECK(e.status == 400 || e.status == 413 || e.status == 503);
        CHECK(e.reason[0] != '\0');
        CHECK(memchr(e.reason, '\0', sizeof e.reason) != NULL);
        CHECK(e.index >= -1);
        CHECK(m.nrecords == 0 && m.ndead == 0 && m.nevents == 0 && m.noutcomes == 0);
        for (size_t i = 0; i < DROP_REASON_COUNT; i++)
            CHECK(m.dropped[i] == 0);
    } else {
        size_t accounted = m.nrecords + m.ndead;
        for (size_t i = 0; i < DROP_REASON_COUNT; i++)
            accounted += m.dropped[i];
        CHECK(accounted == m.nevents);
        CHECK(m.noutcomes == 0); /* keep_outcomes is off */
        for (size_t i = 0; i < m.nrecords; i++) {
            const struct record *r = &m.records[i];
            CHECK((int)r->feed >= 0 && (int)r->feed < FEED_COUNT);
            CHECK(r->event.p != NULL && r->event.n > 0);
            CHECK(r->event_id.n > 0 && r->event_type.n > 0);
            CHECK(workspace.p ? str_eq(r->workspace, "brand-a") : r->workspace.p == NULL);
        }
        for (size_t i = 0; i < m.ndead; i++)
            CHECK(workspace.p ? str_eq(m.dead[i].workspace, "brand-a") : !m.dead[i].workspace.p);
    }
    mapping_free(&m);
    return 0;
}
