/*
 * slow_dns.so: a name server that does not answer, LD_PRELOADed into
 * `tributary serve` by tests/integration/test_crash.py.
 *
 *   SLOW_DNS_HOST=name   getaddrinfo() of this name waits SLOW_DNS_MS, then
 *   SLOW_DNS_MS=n        fails with EAI_AGAIN, as glibc's resolver does when
 *                        no server of resolv.conf answers (5 s a try, twice
 *                        for each server by default); other names resolve
 *
 * libcurl resolves in a thread of its own; a timeout waits for that thread
 * unless told not to (CURLOPT_QUICK_EXIT).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    static int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
    if (!real)
        real = (int (*)(const char *, const char *, const struct addrinfo *,
                        struct addrinfo **))dlsym(RTLD_NEXT, "getaddrinfo");
    const char *slow = getenv("SLOW_DNS_HOST");
    if (node && slow && strcmp(node, slow) == 0) {
        const char *ms = getenv("SLOW_DNS_MS");
        long n = ms ? atol(ms) : 0;
        struct timespec ts = {n / 1000, (n % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0)
            ;
        return EAI_AGAIN;
    }
    return real(node, service, hints, res);
}
