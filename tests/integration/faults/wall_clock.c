/*
 * wall_clock.so: a wall clock that steps, LD_PRELOADed into `tributary serve`
 * by tests/integration/test_crash.py and test_delivery.py.
 *
 *   WALL_CLOCK_OFFSET_FILE=path   CLOCK_REALTIME is moved by the number of
 *                                 seconds the file holds (may be negative),
 *                                 read again every 20 ms of the monotonic clock
 *
 * The monotonic clock is left alone, as a step of the system's clock (a
 * virtual machine resumed, a clock set at boot or by hand) leaves it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define REREAD_NS 20000000LL

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long long offset_s, read_at_ns = -REREAD_NS;

int clock_gettime(clockid_t id, struct timespec *ts)
{
    static int (*real)(clockid_t, struct timespec *);
    if (!real)
        real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc != 0 || id != CLOCK_REALTIME)
        return rc;
    struct timespec mono;
    real(CLOCK_MONOTONIC, &mono);
    long long now_ns = (long long)mono.tv_sec * 1000000000LL + mono.tv_nsec;
    pthread_mutex_lock(&mu);
    if (now_ns - read_at_ns >= REREAD_NS) {
        read_at_ns = now_ns;
        const char *path = getenv("WALL_CLOCK_OFFSET_FILE");
        FILE *f = path ? fopen(path, "r") : NULL;
        long long v = 0;
        if (f) {
            if (fscanf(f, "%lld", &v) == 1)
                offset_s = v;
            fclose(f);
        }
    }
    ts->tv_sec += offset_s;
    pthread_mutex_unlock(&mu);
    return rc;
}
