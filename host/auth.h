/*
 * auth: decides whether an inbound request may be accepted.
 *
 * Braze sends `Authorization: Bearer <token>`; the token must equal one of
 * inbound.tokens (several during a rotation). Comparison is constant-time over
 * SHA-256 digests, so neither the content nor the length of a configured token
 * leaks through timing. With no token configured, requests are accepted (the
 * configuration only allows that on a loopback listener).
 *
 * Uses digest (libcrypto) and config. Never logs or returns a presented secret.
 */
#ifndef TRIBUTARY_AUTH_H
#define TRIBUTARY_AUTH_H

#include "config.h"

enum auth_result {
    AUTH_OK,
    AUTH_MISSING, /* no credentials presented */
    AUTH_INVALID, /* credentials presented but wrong */
};

/* authorization: the Authorization header value, or NULL. */
enum auth_result auth_check_bearer(const struct config *c, const char *authorization);
/* The admin token (admin.token): AUTH_OK, or why not. Callers treat a missing
 * admin.token as "admin endpoints disabled" before calling this. */
enum auth_result auth_check_admin(const struct config *c, const char *authorization);
/* Constant-time check of a presented secret against a list of accepted ones. */
int auth_secret_matches(const struct string_list *accepted, const char *presented, size_t n);
const char *auth_result_text(enum auth_result r);

#endif
