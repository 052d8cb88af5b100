/*
 * fuzz_config: config_load_source on arbitrary configuration texts (Lua that
 * returns a table). The loader runs them sandboxed under memory and
 * instruction limits; it must answer 0 with a configuration or -1 with a
 * message, never crash, and a loaded configuration must pass its own checks.
 *
 * The text is passed as it comes, with its length and without a NUL after it:
 * config_load_source takes (src, len).
 */
#include "config.h"
#include "log.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_config: check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_setup(LOG_ERROR, LOG_LOGFMT);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct config *cfg = NULL;
    char err[4096];
    err[0] = '\0';
    int rc = config_load_source(&cfg, "fuzz.lua", (const char *)data, size, err, sizeof err);
    CHECK(rc == 0 || rc == -1);
    if (rc != 0) {
        CHECK(cfg == NULL);
        CHECK(err[0] != '\0');
        CHECK(memchr(err, '\0', sizeof err) != NULL);
        return 0;
    }
    CHECK(cfg != NULL);
    /* what check() guarantees to the rest of the service */
    CHECK(cfg->listen && cfg->listen[0] && cfg->rules_dir && cfg->rules_dir[0]);
    CHECK(cfg->environment && cfg->mparticle_url && cfg->inbound_require);
    char host[256];
    int port;
    CHECK(config_listen_addr(cfg, host, sizeof host, &port) == 0);
    CHECK(port >= 0 && port <= 65535);
    CHECK(!cfg->tls_cert == !cfg->tls_key);
    for (int f = 0; f < FEED_COUNT; f++) {
        CHECK(!cfg->feeds[f].key == !cfg->feeds[f].secret);
        CHECK(config_feed_url(cfg, (enum feed)f) != NULL);
    }
    for (size_t i = 0; i < cfg->napps; i++)
        CHECK(cfg->apps[i].app_id != NULL && (int)cfg->apps[i].feed < FEED_COUNT);
    CHECK(cfg->retry_base_ms <= cfg->retry_max_ms);
    config_unref(cfg);
    return 0;
}
