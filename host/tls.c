#include "tls.h"

#include "digest.h"
#include "log.h"

#include <errno.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <openssl/err.h>
#include <openssl/x509_vfy.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A PEM file larger than this is not a certificate chain or a key. */
#define PEM_FILE_MAX (1u << 20)
/* A certificate that expires within this many seconds is named in a warning. */
#define EXPIRY_WARN_S (14 * 86400)

struct pair {
    struct pair *older;
    gnutls_pcert_st *certs;
    unsigned int ncerts;
    gnutls_privkey_t key;
    uint64_t fingerprint; /* of both files' bytes: a reload of the same files changes nothing */
    int64_t not_after;
    int64_t retired_ms; /* monotonic ms when another pair replaced it; 0 while in use */
};

static _Atomic(struct pair *) current;
static pthread_mutex_t use_mu = PTHREAD_MUTEX_INITIALIZER; /* tls_use, tls_shutdown */
static struct pair *loaded;                                /* every pair, newest first */

/* What a pair is parsed from, before it becomes one. */
struct parsed {
    gnutls_x509_crt_t *crts;
    unsigned int ncrts;
    gnutls_privkey_t key;
    uint64_t fingerprint;
};

static int read_pem(const char *what, const char *path, gnutls_datum_t *d, char *err, size_t errlen)
{
    size_t len = 0;
    int opened;
    char *p = read_path(path, PEM_FILE_MAX, &len, &opened);
    if (!p) {
        str_printf(err, errlen, "%s: cannot read %s: %s", what, path,
                   errno == EFBIG ? "larger than 1 MiB" : strerror(errno));
        return -1;
    }
    d->data = (unsigned char *)p;
    d->size = (unsigned int)len;
    return 0;
}

/* The bytes of a key file are a secret: wiped before they are freed, as
 * read_stream wipes its chunk (a file over its 16 KiB chunk may leave copies
 * where the buffer grew; keys are a few KiB). */
static void free_pem(gnutls_datum_t *d)
{
    if (d->data) {
        explicit_bzero(d->data, d->size);
        free(d->data);
    }
    d->data = NULL;
}

static void free_crts(gnutls_x509_crt_t *crts, unsigned int n)
{
    for (unsigned int i = 0; i < n; i++)
        gnutls_x509_crt_deinit(crts[i]);
    gnutls_free(crts);
}

static void parsed_free(struct parsed *p)
{
    free_crts(p->crts, p->ncrts);
    if (p->key)
        gnutls_privkey_deinit(p->key);
    memset(p, 0, sizeof *p);
}

/* 0 when crt's public key is key's. */
static int key_matches(gnutls_x509_crt_t crt, gnutls_privkey_t key)
{
    gnutls_pubkey_t a = NULL, b = NULL;
    unsigned char ida[64], idb[64];
    size_t la = sizeof ida, lb = sizeof idb;
    int rc = -1;
    if (gnutls_pubkey_init(&a) == 0 && gnutls_pubkey_init(&b) == 0 &&
        gnutls_pubkey_import_x509(a, crt, 0) == 0 &&
        gnutls_pubkey_import_privkey(b, key, 0, 0) == 0 &&
        gnutls_pubkey_get_key_id(a, GNUTLS_KEYID_USE_SHA256, ida, &la) == 0 &&
        gnutls_pubkey_get_key_id(b, GNUTLS_KEYID_USE_SHA256, idb, &lb) == 0 && la == lb &&
        memcmp(ida, idb, la) == 0)
        rc = 0;
    if (a)
        gnutls_pubkey_deinit(a);
    if (b)
        gnutls_pubkey_deinit(b);
    return rc;
}

/* A UTC time as text for a message. */
static void utc_text(time_t t, char *out, size_t outlen)
{
    struct tm tm;
    if (!gmtime_r(&t, &tm) || strftime(out, outlen, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        str_copy(out, outlen, "unknown");
}

/* The certificate crt (read from cert) outside its validity dates: -1 with
 * why in err. */
static int check_dates(gnutls_x509_crt_t crt, const char *cert, char *err, size_t errlen)
{
    time_t now = (time_t)(clock_wall_ms() / 1000);
    time_t from = gnutls_x509_crt_get_activation_time(crt);
    time_t until = gnutls_x509_crt_get_expiration_time(crt);
    char when[32];
    if (until != (time_t)-1 && until < now) {
        utc_text(until, when, sizeof when);
        str_printf(err, errlen, "tls.cert: the certificate in %s expired at %s", cert, when);
        return -1;
    }
    if (from != (time_t)-1 && from > now) {
        utc_text(from, when, sizeof when);
        str_printf(err, errlen, "tls.cert: the certificate in %s is not valid before %s", cert,
                   when);
        return -1;
    }
    return 0;
}

/* RSA keys shorter than this are refused: clients at today's default security
 * levels (OpenSSL's level 2, Debian's default) refuse them, and one of 512
 * bits cannot make the signatures TLS 1.2 and 1.3 ask for at all. */
#define RSA_MIN_BITS 2048

/* A key or certificate the listener's key exchanges (ECDHE signed with RSA,
 * ECDSA or EdDSA, see TLS_PRIORITIES in http_in.c) cannot sign with: no
 * handshake could use it, and every one would fail. */
static int check_key_use(gnutls_x509_crt_t crt, gnutls_privkey_t k, const char *cert,
                         const char *key, char *err, size_t errlen)
{
    unsigned bits = 0;
    int pk = gnutls_privkey_get_pk_algorithm(k, &bits);
    if (pk != GNUTLS_PK_RSA && pk != GNUTLS_PK_RSA_PSS && pk != GNUTLS_PK_ECDSA &&
        pk != GNUTLS_PK_EDDSA_ED25519 && pk != GNUTLS_PK_EDDSA_ED448) {
        const char *name = gnutls_pk_get_name((gnutls_pk_algorithm_t)pk);
        str_printf(err, errlen,
                   "tls.key: %s is a%s %s key; the listener signs its key exchange with an RSA, "
                   "ECDSA or EdDSA key only",
                   key, !name || strchr("AEIOU", name[0]) ? "n" : "", name ? name : "unknown");
        return -1;
    }
    if ((pk == GNUTLS_PK_RSA || pk == GNUTLS_PK_RSA_PSS) && bits < RSA_MIN_BITS) {
        str_printf(err, errlen,
                   "tls.key: %s is an RSA key of %u bits; the listener takes %d or more, as "
                   "clients refuse shorter ones",
                   key, bits, RSA_MIN_BITS);
        return -1;
    }
    /* without the extension a certificate may serve any use */
    unsigned usage = 0, critical = 0;
    if (gnutls_x509_crt_get_key_usage(crt, &usage, &critical) >= 0 &&
        !(usage & GNUTLS_KEY_DIGITAL_SIGNATURE)) {
        str_printf(err, errlen,
                   "tls.cert: the certificate in %s may not sign (its key usage lacks "
                   "digitalSignature), and every key exchange the listener offers is signed: "
                   "ask its issuer for one with digitalSignature",
                   cert);
        return -1;
    }
    return 0;
}

static int parse_pair(const char *cert, const char *key, struct parsed *p, char *err, size_t errlen)
{
    memset(p, 0, sizeof *p);
    gnutls_datum_t c = {0}, k = {0};
    int rc = -1;
    if (read_pem("tls.cert", cert, &c, err, errlen) != 0 ||
        read_pem("tls.key", key, &k, err, errlen) != 0)
        goto done;
    p->fingerprint = digest_fnv64(digest_fnv64(DIGEST_FNV64_INIT, c.data, c.size), k.data, k.size);
    if (gnutls_x509_crt_list_import2(&p->crts, &p->ncrts, &c, GNUTLS_X509_FMT_PEM, 0) < 0 ||
        p->ncrts == 0) {
        p->crts = NULL;
        p->ncrts = 0;
        str_printf(err, errlen, "tls.cert: %s holds no PEM certificate that can be read", cert);
        goto done;
    }
    if (gnutls_privkey_init(&p->key) != 0) {
        str_copy(err, errlen, "tls.key: out of memory");
        goto done;
    }
    /* plain keys only: no password, and no callback asked for one */
    int imported =
        gnutls_privkey_import_x509_raw(p->key, &k, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN);
    if (imported != 0) {
        str_printf(err, errlen,
                   "tls.key: %s is not a PEM private key that can be read (an encrypted key "
                   "is not supported): %s",
                   key, gnutls_strerror(imported));
        goto done;
    }
    if (key_matches(p->crts[0], p->key) != 0) {
        str_printf(err, errlen, "tls.key: %s is not the key of the certificate in %s", key, cert);
        goto done;
    }
    if (check_key_use(p->crts[0], p->key, cert, key, err, errlen) != 0)
        goto done;
    rc = 0;
done:
    if (rc != 0)
        parsed_free(p);
    free_pem(&c);
    free_pem(&k);
    return rc;
}

int tls_check_pair(const char *cert, const char *key, int dates, char *err, size_t errlen)
{
    struct parsed p;
    if (parse_pair(cert, key, &p, err, errlen) != 0)
        return -1;
    int rc = dates ? check_dates(p.crts[0], cert, err, errlen) : 0;
    parsed_free(&p);
    return rc;
}

/* Read as libcurl's OpenSSL reads it (CURLOPT_CAINFO): what it refuses, every
 * send would fail on. */
int tls_check_ca_bundle(const char *path, char *err, size_t errlen)
{
    X509_STORE *store = X509_STORE_new();
    int ok = 0;
    if (store && X509_STORE_load_file(store, path) == 1) {
        /* certificates, not only revocation lists */
        STACK_OF(X509_OBJECT) *objects = X509_STORE_get0_objects(store);
        for (int i = 0; i < sk_X509_OBJECT_num(objects) && !ok; i++)
            ok = X509_OBJECT_get_type(sk_X509_OBJECT_value(objects, i)) == X509_LU_X509;
    }
    X509_STORE_free(store);
    ERR_clear_error();
    if (!ok) {
        str_printf(err, errlen, "mparticle.ca_bundle: %s holds no PEM certificate that can be read",
                   path);
        return -1;
    }
    return 0;
}

static void log_certificate(gnutls_x509_crt_t crt, int64_t not_after, int replaced)
{
    time_t from = gnutls_x509_crt_get_activation_time(crt);
    gnutls_datum_t dn = {0};
    int have_dn = gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0;
    char expires[32] = "unknown";
    if (not_after > 0)
        utc_text((time_t)not_after, expires, sizeof expires);
    const char *subject = have_dn ? (const char *)dn.data : "unknown";
    int64_t left = not_after - clock_wall_ms() / 1000;
    log_info(replaced ? "TLS certificate replaced; new connections get it"
                      : "TLS certificate in use",
             LOG_S("subject", subject) LOG_S("expires", expires));
    if (not_after > 0 && left < 0)
        log_error("ALERT: the TLS certificate has expired; Braze cannot connect",
                  LOG_S("subject", subject) LOG_S("expires", expires));
    else if (from != (time_t)-1 && from > clock_wall_ms() / 1000) {
        char valid_from[32];
        utc_text(from, valid_from, sizeof valid_from);
        log_error("ALERT: the TLS certificate is not valid yet; Braze cannot connect",
                  LOG_S("subject", subject) LOG_S("valid_from", valid_from));
    } else if (not_after > 0 && left < EXPIRY_WARN_S)
        log_warn("the TLS certificate expires soon; renew it and reload",
                 LOG_S("subject", subject) LOG_S("expires", expires)
                     LOG_I("days_left", (long long)(left / 86400)));
    if (have_dn)
        gnutls_free(dn.data);
}

int tls_use(const char *cert, const char *key, char *err, size_t errlen)
{
    struct parsed p;
    if (parse_pair(cert, key, &p, err, errlen) != 0)
        return -1;
    pthread_mutex_lock(&use_mu);
    struct pair *now = atomic_load(&current);
    if (now && now->fingerprint == p.fingerprint) {
        pthread_mutex_unlock(&use_mu);
        parsed_free(&p);
        return 0;
    }
    /* a replacement outside its dates would turn away every connection the
     * one in use serves; at a start there is none to keep (log_certificate
     * raises the alarm), and what is queued is delivered all the same */
    if (now && check_dates(p.crts[0], cert, err, errlen) != 0) {
        pthread_mutex_unlock(&use_mu);
        parsed_free(&p);
        return -1;
    }
    struct pair *n = calloc(1, sizeof *n);
    gnutls_pcert_st *certs = calloc(p.ncrts, sizeof *certs);
    unsigned int ncerts = p.ncrts;
    if (!n || !certs || gnutls_pcert_import_x509_list(certs, p.crts, &ncerts, 0) != 0) {
        pthread_mutex_unlock(&use_mu);
        str_copy(err, errlen, "tls: cannot prepare the certificate chain");
        free(n);
        free(certs);
        parsed_free(&p);
        return -1;
    }
    n->certs = certs;
    n->ncerts = ncerts;
    n->key = p.key;
    p.key = NULL;
    n->fingerprint = p.fingerprint;
    time_t expires = gnutls_x509_crt_get_expiration_time(p.crts[0]);
    n->not_after = expires == (time_t)-1 ? 0 : (int64_t)expires;
    n->older = loaded;
    loaded = n;
    atomic_store(&current, n);
    if (now)
        now->retired_ms = clock_mono_ms();
    pthread_mutex_unlock(&use_mu);
    log_certificate(p.crts[0], n->not_after, now != NULL);
    parsed_free(&p);
    return 1;
}

int64_t tls_not_after(void)
{
    struct pair *p = atomic_load(&current);
    return p ? p->not_after : 0;
}

int tls_retrieve(gnutls_session_t session, const gnutls_datum_t *req_ca_dn, int nreqs,
                 const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length,
                 gnutls_pcert_st **pcert, unsigned int *pcert_length, gnutls_privkey_t *pkey)
{
    (void)session;
    (void)req_ca_dn;
    (void)nreqs;
    (void)pk_algos;
    (void)pk_algos_length;
    struct pair *p = atomic_load(&current);
    if (!p)
        return -1;
    /* gnutls neither frees nor changes what it is given here */
    *pcert = p->certs;
    *pcert_length = p->ncerts;
    *pkey = p->key;
    return 0;
}

static void pair_free(struct pair *p)
{
    for (unsigned int i = 0; i < p->ncerts; i++)
        gnutls_pcert_deinit(&p->certs[i]);
    free(p->certs);
    gnutls_privkey_deinit(p->key);
    free(p);
}

void tls_release_retired(int64_t oldest_open_ms)
{
    long long released = 0;
    pthread_mutex_lock(&use_mu);
    for (struct pair **pp = &loaded; *pp;) {
        struct pair *p = *pp;
        if (p->retired_ms > 0 && p->retired_ms < oldest_open_ms) {
            *pp = p->older;
            pair_free(p);
            released++;
        } else {
            pp = &p->older;
        }
    }
    pthread_mutex_unlock(&use_mu);
    if (released > 0)
        log_debug("replaced TLS certificates released: no connection may hold them any more",
                  LOG_I("pairs", released));
}

void tls_shutdown(void)
{
    pthread_mutex_lock(&use_mu);
    atomic_store(&current, NULL);
    while (loaded) {
        struct pair *p = loaded;
        loaded = p->older;
        pair_free(p);
    }
    pthread_mutex_unlock(&use_mu);
}
