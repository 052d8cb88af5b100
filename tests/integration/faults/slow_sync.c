/*
 * slow_sync.so: a disk slow to sync, LD_PRELOADed into a command by
 * tests/integration/test_cli.py.
 *
 *   SLOW_SYNC_MS=n       every fsync() and fdatasync() takes n ms more
 *   SLOW_SYNC_MARK=path  created as the first of them begins (a test waits
 *                        for it to act while the process is inside one)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void slow(void)
{
    const char *mark = getenv("SLOW_SYNC_MARK");
    if (mark) {
        int fd = open(mark, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0)
            close(fd);
    }
    const char *ms = getenv("SLOW_SYNC_MS");
    long n = ms ? atol(ms) : 0;
    struct timespec ts = {n / 1000, (n % 1000) * 1000000L};
    while (n > 0 && nanosleep(&ts, &ts) != 0) {
    }
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow();
    return real(fd);
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow();
    return real(fd);
}
