/*
 * fuzz_retry_after: mparticle_retry_after on arbitrary header values (delta
 * seconds, the three HTTP-date forms, garbage). The answer must be -1 (absent
 * or invalid) or clamped into [min, max]: the sender sleeps that long.
 *
 * The input is copied and NUL-terminated, as libcurl hands header values over.
 */
#include "mparticle.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A fixed clock keeps every run reproducible: 2023-11-14T22:13:20Z. */
#define NOW_S INT64_C(1700000000)
#define MIN_S 1
#define MAX_S 600

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *value = malloc(size + 1);
    if (!value)
        return 0;
    memcpy(value, data, size);
    value[size] = '\0';
    int64_t s = mparticle_retry_after(value, NOW_S, MIN_S, MAX_S);
    if (s != -1 && (s < MIN_S || s > MAX_S)) {
        fprintf(stderr, "fuzz_retry_after: \"%s\" gave %lld, outside [%d, %d]\n", value,
                (long long)s, MIN_S, MAX_S);
        abort();
    }
    free(value);
    return 0;
}
