/*
 * digest: hashes, MACs and constant-time comparison, with OpenSSL's libcrypto
 * (which tls also uses, to read the CA bundle as libcurl does).
 */
#ifndef TRIBUTARY_DIGEST_H
#define TRIBUTARY_DIGEST_H

#include "util.h"

#include <stddef.h>

#define UUID_STR_LEN 37 /* 36 characters and NUL */

/* Incremental name-based UUID (version 5, SHA-1) in tributary's namespace. */
typedef struct uuid5 uuid5;
uuid5 *uuid5_new(void);
void uuid5_add(uuid5 *u, const void *p, size_t n);
/* Writes the UUID ("xxxxxxxx-xxxx-5xxx-yxxx-xxxxxxxxxxxx") and frees u; -1
 * (out empty) when the library failed at any step since uuid5_new. */
int uuid5_finish(uuid5 *u, char out[UUID_STR_LEN]) WUR;

/* SHA-256 of the input; out receives 32 bytes. -1 when the library failed
 * (out zeroed; it cannot allocate, for one): never take out for a hash then. */
int digest_sha256(const void *p, size_t n, unsigned char out[32]) WUR;

/* HMAC-SHA256 of msg under key; out receives 32 bytes. */
int digest_hmac_sha256(const void *key, size_t keylen, const void *msg, size_t msglen,
                       unsigned char out[32]) WUR;
/* HMAC-SHA256 over the concatenation of two parts (e.g. "<t>." and the body). */
int digest_hmac_sha256_2(const void *key, size_t keylen, const void *a, size_t alen, const void *b,
                         size_t blen, unsigned char out[32]) WUR;

/* Compares in time that depends only on the lengths; 1 when equal. */
int digest_equal(const void *a, size_t alen, const void *b, size_t blen);

void digest_hex(const unsigned char *in, size_t n, char *out); /* out: 2n+1 bytes */
/* Standard base64 of in; out needs 4*((n+2)/3)+1 bytes. */
void digest_base64(const unsigned char *in, size_t n, char *out);
/* 64-bit FNV-1a, for non-security fingerprints such as the rules version. */
uint64_t digest_fnv64(uint64_t h, const void *p, size_t n);
#define DIGEST_FNV64_INIT 0xcbf29ce484222325ULL

#endif
