/*
 * fuzz_signature: auth_parse_signature on arbitrary Tributary-Signature
 * header values. A value that parses has a timestamp and 1 to
 * AUTH_MAX_SIGNATURES v1 digests; one that does not must not leave a count
 * that a caller could loop over.
 *
 * The input is copied and NUL-terminated, as libmicrohttpd hands header
 * values over.
 */
#include "auth.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *header = malloc(size + 1);
    if (!header)
        return 0;
    memcpy(header, data, size);
    header[size] = '\0';
    struct auth_signature sig;
    int rc = auth_parse_signature(header, &sig);
    if (rc != 0 && rc != -1) {
        fprintf(stderr, "fuzz_signature: \"%s\" returned %d\n", header, rc);
        abort();
    }
    if (rc == 0 && (sig.n < 1 || sig.n > AUTH_MAX_SIGNATURES || sig.t < 0)) {
        fprintf(stderr, "fuzz_signature: \"%s\" parsed with n=%d t=%lld\n", header, sig.n,
                (long long)sig.t);
        abort();
    }
    if (sig.n < 0 || sig.n > AUTH_MAX_SIGNATURES) {
        fprintf(stderr, "fuzz_signature: \"%s\" left n=%d\n", header, sig.n);
        abort();
    }
    free(header);
    return 0;
}
