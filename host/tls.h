/*
 * tls: the listener's certificate and key, and checks of the PEM files the
 * service is given (tls.cert, tls.key, mparticle.ca_bundle).
 *
 * libmicrohttpd asks tls_retrieve for the pair at every handshake, so that a
 * reload can replace it (a renewed certificate) without a restart: tls_use
 * parses the files and makes them the pair of the next handshakes when their
 * content changed. A pair replaced stays allocated while a handshake may
 * still hold it: until every connection accepted before its replacement has
 * closed (tls_release_retired, which the listener calls), or tls_shutdown.
 *
 * The listener's side is GnuTLS, libmicrohttpd's TLS library (the project's
 * only use of it); the CA bundle is read with OpenSSL, as libcurl reads it.
 * Errors name the file, never its content.
 */
#ifndef TRIBUTARY_TLS_H
#define TRIBUTARY_TLS_H

#include "util.h"

#include <gnutls/abstract.h>
#include <stdint.h>

/* 0 when cert holds a PEM certificate chain and key the PEM private key of
 * its first certificate, not encrypted, of a kind the listener can use; and,
 * with dates, the certificate valid now. */
int tls_check_pair(const char *cert, const char *key, int dates, char *err, size_t errlen) WUR;

/* 0 when path holds at least one PEM certificate. */
int tls_check_ca_bundle(const char *path, char *err, size_t errlen) WUR;

/* Makes the files the pair of the next handshakes, when their content differs
 * from the pair in use (and logs the certificate's subject and expiry): 1 when
 * it changed, 0 when it is the same, -1 with err set when a file is not usable,
 * or when a certificate outside its validity dates would replace one in use. */
int tls_use(const char *cert, const char *key, char *err, size_t errlen) WUR;

/* When the certificate in use expires (UNIX seconds), 0 without one. */
int64_t tls_not_after(void);

/* libmicrohttpd's MHD_OPTION_HTTPS_CERT_CALLBACK. */
int tls_retrieve(gnutls_session_t session, const gnutls_datum_t *req_ca_dn, int nreqs,
                 const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length,
                 gnutls_pcert_st **pcert, unsigned int *pcert_length, gnutls_privkey_t *pkey);

/* Frees the pairs replaced before oldest_open_ms (monotonic ms): the time the
 * oldest open connection was accepted, or, with none open, a time read before
 * any connection still to come is accepted. A connection takes its pair in
 * its handshake, after it was accepted: one accepted after a pair was replaced
 * never holds it. */
void tls_release_retired(int64_t oldest_open_ms);

/* Frees every pair; after the listener has stopped. */
void tls_shutdown(void);

#endif
