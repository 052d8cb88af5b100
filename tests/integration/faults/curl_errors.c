/*
 * curl_errors.so: libcurl out of memory, LD_PRELOADed into `tributary serve`
 * by tests/integration/test_crash.py.
 *
 *   FAIL_HEADER_AT=n   the n-th curl_slist_append() (the sender builds each
 *                      request's headers with it) returns NULL, once, as it
 *                      does when it cannot allocate
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>

static atomic_int appends;

struct curl_slist *curl_slist_append(struct curl_slist *list, const char *data)
{
    static struct curl_slist *(*real)(struct curl_slist *, const char *);
    if (!real)
        real = (struct curl_slist * (*)(struct curl_slist *, const char *))
            dlsym(RTLD_NEXT, "curl_slist_append");
    const char *at = getenv("FAIL_HEADER_AT");
    if (at && atomic_fetch_add(&appends, 1) + 1 == atoi(at))
        return NULL;
    return real(list, data);
}
