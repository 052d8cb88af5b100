/*
 * dup_errors.so: no open file left for a copy of a socket, LD_PRELOADed into
 * `tributary serve` by tests/integration/test_operations.py.
 *
 *   FAIL_SOCKET_DUPS=n   the first n dup() calls of a socket fail with
 *                        EMFILE, as when the process has no file left
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/stat.h>

static atomic_int failed;

int dup(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "dup");
    const char *n = getenv("FAIL_SOCKET_DUPS");
    struct stat st;
    if (n && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) &&
        atomic_fetch_add(&failed, 1) < atoi(n)) {
        errno = EMFILE;
        return -1;
    }
    return real(fd);
}
