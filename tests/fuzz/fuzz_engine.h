/*
 * fuzz_engine: the rules engine of the fuzz targets that map events
 * (fuzz_map, fuzz_request), built as the service builds it.
 *
 * The engine comes from TRIBUTARY_RULES_DIR, or ./rules, on the defaults (or
 * ./tributary.conf.lua) with every other TRIBUTARY_* variable ignored, so a
 * developer's environment cannot change what a corpus input does. It is
 * rebuilt when a limit damaged it, as the service does, and released at exit
 * so that valgrind and LeakSanitizer see nothing left behind.
 */
#ifndef TRIBUTARY_FUZZ_ENGINE_H
#define TRIBUTARY_FUZZ_ENGINE_H

#include "config.h"
#include "rules.h"

#include <stdio.h>
#include <stdlib.h>

/* Aborts with the failed condition, so that the fuzzer keeps the input. */
#define FUZZ_CHECK(target, cond)                                                                   \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s: check failed: %s (%s:%d)\n", target, #cond, __FILE__, __LINE__);  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Builds the engine once; exits with a message naming target on failure. */
void fuzz_engine_init(const char *target);

/* The engine for the next input (rebuilt first when it needs it). */
rules *fuzz_engine(void);

/* The configuration the engine runs on. */
const struct config *fuzz_engine_config(void);

#endif
