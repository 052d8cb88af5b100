/*
 * fuzz_request: the inbound request validator on arbitrary bytes, as POST
 * /currents runs it: rules_map(INPUT_ENVELOPE) with the shipped rules.
 *
 * Checks what rules.h promises: an answer of 0 or -1; a refusal carries 400,
 * 413 or 503 and a reason, and adds nothing to the mapping; an accepted body
 * accounts for every event exactly once (a record, a dead letter or a drop).
 *
 * The engine is built once (LLVMFuzzerInitialize) from TRIBUTARY_RULES_DIR, or
 * ./rules, with every other TRIBUTARY_* variable ignored; it is rebuilt when a
 * limit damaged it, as the service does.
 */
#include "config.h"
#include "log.h"
#include "record.h"
#include "rules.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

extern char **environ;

static ruleset *rs;
static rules *engine;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_request: check failed: %s (%s:%d)\n", #cond, __FILE__,           \
                    __LINE__);                                                                     \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* The configuration the fuzzer runs on: defaults (or ./tributary.conf.lua),
 * with rules_dir from TRIBUTARY_RULES_DIR or "rules", and nothing else taken
 * from the environment. */
static struct config *fuzz_config(void)
{
    const char *env = getenv("TRIBUTARY_RULES_DIR");
    char *dir = strdup(env && *env ? env : "rules");
    CHECK(dir != NULL);
    /* collect first: unsetenv changes environ */
    char *names[256];
    size_t n = 0;
    for (char **e = environ; e && *e && n < ARRAY_LEN(names); e++) {
        if (strncmp(*e, "TRIBUTARY_", 10) == 0)
            names[n++] = strndup(*e, strcspn(*e, "="));
    }
    for (size_t i = 0; i < n; i++) {
        if (names[i])
            unsetenv(names[i]);
        free(names[i]);
    }
    CHECK(setenv("TRIBUTARY_RULES_DIR", dir, 1) == 0);
    free(dir);
    struct config *c = NULL;
    char err[4096];
    if (config_load(&c, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_request: configuration: %s\n", err);
        exit(1);
    }
    return c;
}

/* At exit, so that valgrind and LeakSanitizer see nothing left behind. */
static void release_engine(void)
{
    rules_free(engine);
    engine = NULL;
    ruleset_unref(rs);
    rs = NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_setup(LOG_ERROR, LOG_LOGFMT);
    struct config *c = fuzz_config();
    char err[ERR_LEN];
    if (ruleset_load(&rs, c, err, sizeof err) != 0 ||
        rules_new(&engine, rs, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_request: rules: %s\n", err);
        exit(1);
    }
    atexit(release_engine);
    config_unref(c); /* the ruleset holds a reference */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (rules_needs_rebuild(engine)) {
        char err[ERR_LEN];
        rules_free(engine);
        if (rules_new(&engine, rs, err, sizeof err) != 0) {
            fprintf(stderr, "fuzz_request: rebuilding the engine: %s\n", err);
            abort();
        }
    }
    struct mapping m;
    mapping_init(&m);
    struct input_error e;
    int rc = rules_map(engine, (const char *)data, size, INPUT_ENVELOPE, &m, &e);
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
        }
    }
    mapping_free(&m);
    return 0;
}
