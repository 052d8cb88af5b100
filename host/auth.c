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

enum auth_result auth_check_bearer(const struct config *c, const char *authorization)
{
    if (c->inbound_tokens.n == 0)
        return AUTH_OK;
    if (!authorization)
        return AUTH_MISSING;
    const char *p = authorization;
    while (*p == ' ')
        p++;
    if (strncasecmp(p, "Bearer", 6) != 0 || (p[6] != ' ' && p[6] != '\t'))
        return AUTH_INVALID;
    p += 7;
    while (*p == ' ' || *p == '\t')
        p++;
    size_t n = strlen(p);
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    if (n == 0)
        return AUTH_MISSING;
    return auth_secret_matches(&c->inbound_tokens, p, n) ? AUTH_OK : AUTH_INVALID;
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
