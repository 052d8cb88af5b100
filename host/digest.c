#include "digest.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* The algorithms, fetched from OpenSSL's default provider once. Passing
 * EVP_sha256() instead makes OpenSSL look the implementation up again on every
 * call, which costs more than hashing an event id. They stay for the life of the
 * process. */
static pthread_once_t fetch_once = PTHREAD_ONCE_INIT;
static EVP_MD *sha1_md, *sha256_md;

static void fetch_algorithms(void)
{
    sha1_md = EVP_MD_fetch(NULL, "SHA1", NULL);
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

static const EVP_MD *sha1(void)
{
    pthread_once(&fetch_once, fetch_algorithms);
    return sha1_md ? sha1_md : EVP_sha1();
}

static const EVP_MD *sha256(void)
{
    pthread_once(&fetch_once, fetch_algorithms);
    return sha256_md ? sha256_md : EVP_sha256();
}

/* tributary's UUID namespace for source_request_id values. */
static const unsigned char NAMESPACE[16] = {0x6f, 0x2b, 0x1c, 0x5e, 0x3a, 0x47, 0x4d, 0x8b,
                                            0x9e, 0x10, 0x7c, 0x21, 0xd4, 0x55, 0xa3, 0x0f};

struct uuid5 {
    EVP_MD_CTX *ctx;
    int failed;
};

uuid5 *uuid5_new(void)
{
    uuid5 *u = malloc(sizeof(*u));
    if (!u)
        return NULL;
    u->ctx = EVP_MD_CTX_new();
    u->failed = 0;
    if (!u->ctx || EVP_DigestInit_ex(u->ctx, sha1(), NULL) != 1) {
        EVP_MD_CTX_free(u->ctx);
        free(u);
        return NULL;
    }
    uuid5_add(u, NAMESPACE, sizeof NAMESPACE);
    return u;
}

void uuid5_add(uuid5 *u, const void *p, size_t n)
{
    u->failed |= EVP_DigestUpdate(u->ctx, p, n) != 1;
}

int uuid5_finish(uuid5 *u, char out[UUID_STR_LEN])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int failed = u->failed || EVP_DigestFinal_ex(u->ctx, md, &mdlen) != 1 || mdlen < 16;
    EVP_MD_CTX_free(u->ctx);
    free(u);
    out[0] = '\0';
    if (failed)
        return -1;
    md[6] = (unsigned char)((md[6] & 0x0f) | 0x50); /* version 5 */
    md[8] = (unsigned char)((md[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    static const char hex[] = "0123456789abcdef";
    size_t j = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[j++] = '-';
        out[j++] = hex[md[i] >> 4];
        out[j++] = hex[md[i] & 15];
    }
    out[j] = '\0';
    return 0;
}

int digest_sha256(const void *p, size_t n, unsigned char out[32])
{
    unsigned int len = 0;
    if (EVP_Digest(p, n, out, &len, sha256(), NULL) == 1 && len == 32)
        return 0;
    memset(out, 0, 32);
    return -1;
}

int digest_hmac_sha256_2(const void *key, size_t keylen, const void *a, size_t alen, const void *b,
                         size_t blen, unsigned char out[32])
{
    int rc = -1;
    HMAC_CTX *ctx = NULL;
    unsigned int len = 0;
    /* EVP_MAC is the OpenSSL 3 way; HMAC_CTX stays available and is simpler here. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
    ctx = HMAC_CTX_new();
    if (!ctx)
        goto done;
    if (HMAC_Init_ex(ctx, key, (int)keylen, sha256(), NULL) != 1)
        goto done;
    if (alen && HMAC_Update(ctx, a, alen) != 1)
        goto done;
    if (blen && HMAC_Update(ctx, b, blen) != 1)
        goto done;
    if (HMAC_Final(ctx, out, &len) != 1 || len != 32)
        goto done;
    rc = 0;
done:
    HMAC_CTX_free(ctx);
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
    return rc;
}

int digest_hmac_sha256(const void *key, size_t keylen, const void *msg, size_t msglen,
                       unsigned char out[32])
{
    return digest_hmac_sha256_2(key, keylen, msg, msglen, NULL, 0, out);
}

int digest_equal(const void *a, size_t alen, const void *b, size_t blen)
{
    if (alen != blen)
        return 0;
    return CRYPTO_memcmp(a, b, alen) == 0;
}

void digest_hex(const unsigned char *in, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[in[i] >> 4];
        out[2 * i + 1] = hex[in[i] & 15];
    }
    out[2 * n] = '\0';
}

void digest_base64(const unsigned char *in, size_t n, char *out)
{
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

uint64_t digest_fnv64(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}
