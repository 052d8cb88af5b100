#include "auth.h"

#include "digest.h"

#include <string.h>
#include <strings.h>

int auth_secret_matches(const struct string_list *accepted, const char *presented, size_t n)
{
    unsigned char want[32], got[32];
    digest_sha256(presented, n, got);
    int match = 0;
    /* Compare against every entry, so the time does not tell which one matched. */
    for (size_t i = 0; i < accepted->n; i++) {
        digest_sha256(accepted->items[i], strlen(accepted->items[i]), want);
        match |= digest_equal(want, sizeof want, got, sizeof got);
    }
    return match;
}

/* The token of an "Authorization: Bearer <token>" header, or NULL. */
static const char *bearer_token(const char *authorization, size_t *n)
{
    const char *p = authorization;
    while (*p == ' ')
        p++;
    if (strncasecmp(p, "Bearer", 6) != 0 || (p[6] != ' ' && p[6] != '\t'))
        return NULL;
    p += 7;
    while (*p == ' ' || *p == '\t')
        p++;
    size_t len = strlen(p);
    while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
        len--;
    *n = len;
    return p;
}

static enum auth_result check_token(const struct string_list *accepted, const char *authorization)
{
    if (!authorization)
        return AUTH_MISSING;
    size_t n = 0;
    const char *token = bearer_token(authorization, &n);
    if (!token)
        return AUTH_INVALID;
    if (n == 0)
        return AUTH_MISSING;
    return auth_secret_matches(accepted, token, n) ? AUTH_OK : AUTH_INVALID;
}

enum auth_result auth_check_admin(const struct config *c, const char *authorization)
{
    if (!c->admin_token)
        return AUTH_INVALID;
    char *items[1] = {c->admin_token};
    struct string_list one = {items, 1};
    return check_token(&one, authorization);
}

enum auth_result auth_check_bearer(const struct config *c, const char *authorization)
{
    if (c->inbound_tokens.n == 0)
        return AUTH_OK;
    return check_token(&c->inbound_tokens, authorization);
}

const char *auth_result_text(enum auth_result r)
{
    switch (r) {
    case AUTH_OK:
        return "ok";
    case AUTH_MISSING:
        return "missing bearer token";
    case AUTH_INVALID:
        return "invalid credentials";
    }
    return "?";
}
