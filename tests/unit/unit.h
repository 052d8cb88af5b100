/*
 * Shared helpers for the Check unit tests. Each test file builds one binary
 * (build/<mode>/tests/test_<name>) that runs its suite; Check forks every test
 * so one crash fails one test.
 */
#ifndef TRIBUTARY_UNIT_H
#define TRIBUTARY_UNIT_H

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

/* A fresh directory under /tmp, removed by unit_rmdir. */
static inline void unit_tmpdir(char *out, size_t len)
{
    snprintf(out, len, "/tmp/tributary-unit-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(out));
}

static inline void unit_rmdir(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static inline void unit_write(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    ck_assert_int_eq(fclose(f), 0);
}

/* Runs a suite; the test binary's exit code. */
static inline int unit_run(Suite *s)
{
    log_setup(LOG_ERROR, LOG_LOGFMT);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

#endif
