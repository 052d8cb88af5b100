/* fuzz_engine: see fuzz_engine.h. */
#include "fuzz_engine.h"

#include "log.h"

#include <string.h>

extern char **environ;

static const char *name = "fuzz";
static ruleset *rs;
static rules *engine;

/* Defaults (or ./tributary.conf.lua), rules_dir from TRIBUTARY_RULES_DIR or
 * "rules", and nothing else from the environment. */
static struct config *load_config(void)
{
    const char *env = getenv("TRIBUTARY_RULES_DIR");
    char *dir = strdup(env && *env ? env : "rules");
    FUZZ_CHECK(name, dir != NULL);
    /* collect first: unsetenv changes environ */
    char *names[256];
    size_t n = 0;
    for (char **e = environ; e && *e && n < ARRAY_LEN(names); e++) {
        if (strncmp(*e, "TRIBUTARY_", 10) == 0)
            names[n++] = strndup(*e, strcspn(*e, "="));
    }
    for (size_t i = 0; i < n; i++) {
        if (names[i])
            unsetenv(names[i]);
        free(names[i]);
    }
    FUZZ_CHECK(name, setenv("TRIBUTARY_RULES_DIR", dir, 1) == 0);
    free(dir);
    struct config *c = NULL;
    char err[4096];
    if (config_load(&c, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "%s: configuration: %s\n", name, err);
        exit(1);
    }
    return c;
}

static void release(void)
{
    rules_free(engine);
    engine = NULL;
    ruleset_unref(rs);
    rs = NULL;
}

void fuzz_engine_init(const char *target)
{
    name = target;
    log_setup(LOG_ERROR, LOG_LOGFMT);
    struct config *c = load_config();
    char err[ERR_LEN];
    if (ruleset_load(&rs, c, err, sizeof err) != 0 ||
        rules_new(&engine, rs, err, sizeof err) != 0) {
        fprintf(stderr, "%s: rules: %s\n", name, err);
        exit(1);
    }
    config_unref(c); /* the ruleset holds a reference */
    atexit(release);
}

rules *fuzz_engine(void)
{
    if (rules_needs_rebuild(engine)) {
        char err[ERR_LEN];
        rules_free(engine);
        if (rules_new(&engine, rs, err, sizeof err) != 0) {
            fprintf(stderr, "%s: rebuilding the engine: %s\n", name, err);
            abort();
        }
    }
    return engine;
}

const struct config *fuzz_engine_config(void)
{
    return ruleset_config(rs);
}
