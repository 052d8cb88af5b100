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

/* What stderr gets while fn(arg) runs (log lines), in a buffer the caller
 * frees. */
static inline char *unit_stderr_of(void (*fn)(void *), void *arg)
{
    char path[] = "/tmp/tributary-unit-log-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
    fn(arg);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    off_t size = lseek(fd, 0, SEEK_END);
    char *text = calloc(1, (size_t)size + 1);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(pread(fd, text, (size_t)size, 0), size);
    close(fd);
    return text;
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

#ifdef UNIT_DIGEST_FAULTS
#include <dlfcn.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdint.h>

/* While set, SHA-256 fails, as OpenSSL's does when it cannot allocate. The
 * test binary's EVP_Digest is the one the host's objects linked into it call. */
static atomic_int unit_digest_fails;

int EVP_Digest(const void *data, size_t count, unsigned char *md, unsigned int *size,
               const EVP_MD *type, ENGINE *impl)
{
    typedef int (*digest_fn)(const void *, size_t, unsigned char *, unsigned int *, const EVP_MD *,
                             ENGINE *);
    if (atomic_load(&unit_digest_fails))
        return 0;
    digest_fn real = (digest_fn)(uintptr_t)dlsym(RTLD_NEXT, "EVP_Digest");
    return real(data, count, md, size, type, impl);
}
#endif

#endif
