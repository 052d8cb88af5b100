/*
 * alloc_errors.so: out of memory in one function of the service,
 * LD_PRELOADed into `tributary serve` by tests/integration/test_crash.py.
 *
 *   FAIL_CALLOC_FROM=lo-hi  calloc() called from the executable's code at
 *                           offsets lo to hi (hex, from `nm -S`: one
 *                           function) returns NULL
 *   FAIL_CALLOC_TIMES=n     the first n such calls; later ones succeed
 *
 * An uninstrumented build only: a sanitizer's runtime owns calloc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <stdatomic.h>
#include <stdlib.h>

extern void *__libc_calloc(size_t n, size_t size);

static atomic_int failed;

/* The executable's load address: the first object dl_iterate_phdr names. */
static int first_object(struct dl_phdr_info *info, size_t size, void *out)
{
    (void)size;
    *(ElfW(Addr) *)out = info->dlpi_addr;
    return 1;
}

void *calloc(size_t n, size_t size)
{
    const char *from = getenv("FAIL_CALLOC_FROM"), *times = getenv("FAIL_CALLOC_TIMES");
    Dl_info info;
    void *caller = __builtin_return_address(0);
    ElfW(Addr) program = 0;
    if (from && times)
        dl_iterate_phdr(first_object, &program);
    if (from && times && dladdr(caller, &info) && (ElfW(Addr))info.dli_fbase == program) {
        char *dash;
        unsigned long lo = strtoul(from, &dash, 16), hi = strtoul(dash + 1, NULL, 16);
        unsigned long at = (unsigned long)((char *)caller - (char *)info.dli_fbase);
        if (*dash == '-' && at >= lo && at < hi && atomic_fetch_add(&failed, 1) < atoi(times)) {
            errno = ENOMEM;
            return NULL;
        }
    }
    return __libc_calloc(n, size);
}
