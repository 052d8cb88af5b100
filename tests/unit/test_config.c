/* config: the Lua configuration file, TRIBUTARY_* environment variables and the checks. */
#include "unit.h"

#include "config.h"
#include "mparticle.h"

#include <sys/stat.h>

extern char **environ;

/* One directory per test case (made in the parent process, so it is removed
 * even when a test fails); each test writes its files there under its own name. */
static char root[64];

static void make_root(void)
{
    unit_tmpdir(root, sizeof root);
}

static void remove_root(void)
{
    unit_rmdir(root);
}

/* No TRIBUTARY_* variable of the surrounding shell may leak into a test. */
static void clear_env(void)
{
    for (;;) {
        char name[256] = "";
        for (char **e = environ; e && *e; e++) {
            if (strncmp(*e, "TRIBUTARY_", 10) == 0) {
                size_t n = strcspn(*e, "=");
                if (n < sizeof name) {
                    memcpy(name, *e, n);
                    name[n] = '\0';
                }
                break;
            }
        }
        if (!name[0])
            break;
        ck_assert_int_eq(unsetenv(name), 0);
    }
    unsetenv("UNIT_MP_KEY");
    unsetenv("UNIT_MP_SECRET");
}

/* Each test starts in an empty directory, so config_load(NULL) finds no file. */
static void enter_root(void)
{
    clear_env();
    ck_assert_int_eq(chdir(root), 0);
}

static void leave_root(void)
{
    clear_env();
    ck_assert_int_eq(chdir("/"), 0);
}

/* Writes `lua` to root/name and returns the path (valid until the next call). */
static const char *conf(const char *name, const char *lua)
{
    static char path[128];
    snprintf(path, sizeof path, "%s/%s", root, name);
    unit_write(path, lua);
    return path;
}

/* err is msg after the file and line that gave the values it is about. */
#define ck_assert_err_at(err, path, line, msg)                                                     \
    do {                                                                                           \
        char want_[1024];                                                                          \
        snprintf(want_, sizeof want_, "%s:%d: %s", (path), (line), (msg));                         \
        ck_assert_str_eq((err), want_);                                                            \
    } while (0)

static int has_app(const struct config *c, const char *app_id, enum feed f)
{
    for (size_t i = 0; i < c->napps; i++) {
        if (strcmp(c->apps[i].app_id, app_id) == 0)
            return c->apps[i].feed == f;
    }
    return 0;
}

/* ---- defaults ------------------------------------------------------------ */

START_TEST(test_defaults_without_file_or_environment)
{
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_null(c->file);
    ck_assert_ptr_null(c->warnings);
    ck_assert_str_eq(c->listen, "127.0.0.1:8080");
    ck_assert_str_eq(c->data_dir, "./var");
    ck_assert_str_eq(c->rules_dir, "./rules");
    ck_assert_str_eq(c->environment, "production");
    ck_assert_str_eq(c->mparticle_url, "https://s2s.mparticle.com");
    ck_assert_int_eq(c->batch_linger_ms, 500);
    ck_assert_int_eq(c->retry_base_ms, 1000);
    ck_assert_int_eq(c->retry_max_ms, 300000);
    ck_assert_int_eq(c->retry_max_age_s, 172800);
    ck_assert_int_eq(c->retry_pause_ms, 120000);
    ck_assert_str_eq(c->queue_sync, "full");
    ck_assert_int_eq(c->dedup_window_s, 3600);
    ck_assert_int_eq(c->inbound_max_body_bytes, 16 * 1024 * 1024);
    ck_assert_int_eq(c->inbound_max_events, 10000);
    ck_assert_int_eq(c->http_request_timeout_s, 120);
    ck_assert_int_eq(c->http_threads, 8);
    ck_assert_int_eq(c->retry_failing_s, 3600);
    ck_assert_int_eq(c->queue_max_depth, 5000000);
    ck_assert_int_eq(c->queue_min_free_mb, 256);
    /* mParticle's documented throughput per account */
    ck_assert_int_eq(c->mparticle_rate_limit, 270);
    for (int f = 0; f < FEED_COUNT; f++)
        ck_assert_int_eq(c->feeds[f].rate_limit, 270);
    ck_assert_uint_eq(c->inbound_tokens.n, 0);
    ck_assert_uint_eq(c->events.n, 0);
    ck_assert_uint_eq(c->napps, 0);
    for (int f = 0; f < FEED_COUNT; f++) {
        ck_assert_int_eq(config_feed_ready(c, (enum feed)f), 0);
        ck_assert_str_eq(config_feed_url(c, (enum feed)f), "https://s2s.mparticle.com");
    }
    config_unref(c);
}
END_TEST

/* A queue.min_free_mb under what the WAL takes before it is copied back leaves
 * a nearly full disk no room to drain: a warning at start; 0 (off) is none. */
START_TEST(test_a_min_free_mb_under_the_wals_room_is_a_warning)
{
    static const struct {
        const char *src;
        int warned;
    } cases[] = {{"return { queue = { min_free_mb = 24 } }\n", 1},
                 {"return { queue = { min_free_mb = 64 } }\n", 0},
                 {"return { queue = { min_free_mb = 0 } }\n", 0}};
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_msg(config_load(&c, conf("min_free.lua", cases[i].src), err, sizeof err) == 0,
                      "%s", err);
        const char *w = c->warnings ? c->warnings : "";
        ck_assert_msg((strstr(w, "queue.min_free_mb (24) leaves the queue little room to drain") !=
                       NULL) == cases[i].warned,
                      "%s: %s", cases[i].src, w);
        config_unref(c);
    }
}
END_TEST

/* A token read with os.getenv from a variable not set is nil, which is no
 * token: /metrics answered anyone, and nothing said so. */
START_TEST(test_a_variable_the_file_reads_and_that_is_not_set_is_a_warning)
{
    unsetenv("UNIT_UNSET_METRICS_TOKEN");
    setenv("UNIT_SET_METRICS_TOKEN", "metrics-token-0123456789", 1);
    struct config *c = NULL;
    char err[4096] = "";
    const char *path = conf("getenv.lua", "return { metrics = { token = "
                                          "os.getenv('UNIT_UNSET_METRICS_TOKEN') } }\n");
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_null(c->metrics_token);
    ck_assert_ptr_nonnull(c->warnings);
    ck_assert_msg(strstr(c->warnings, "the configuration file gives "
                                      "os.getenv(\"UNIT_UNSET_METRICS_TOKEN\") as a value, and "
                                      "UNIT_UNSET_METRICS_TOKEN is not set: the file gives no "
                                      "value there"),
                  "%s", c->warnings);
    config_unref(c);
    /* set, only written in a comment, with a default of the file's own, or
     * asked whether it is set: no warning */
    static const char *const quiet[] = {
        "-- os.getenv('UNIT_UNSET_METRICS_TOKEN')\n"
        "return { metrics = { token = os.getenv('UNIT_SET_METRICS_TOKEN') } }\n",
        "return { metrics = { token = os.getenv('UNIT_UNSET_METRICS_TOKEN') or "
        "'metrics-token-0123456789' } }\n",
        "local t = 'metrics-token-0123456789'\n"
        "if os.getenv('UNIT_UNSET_METRICS_TOKEN') then t = nil end\n"
        "return { metrics = { token = t } }\n",
    };
    for (size_t i = 0; i < ARRAY_LEN(quiet); i++) {
        c = NULL;
        path = conf("getenv-quiet.lua", quiet[i]);
        ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
        ck_assert_str_eq(c->metrics_token, "metrics-token-0123456789");
        ck_assert_msg(!c->warnings || !strstr(c->warnings, "os.getenv"), "%zu: %s", i, c->warnings);
        config_unref(c);
    }
    unsetenv("UNIT_SET_METRICS_TOKEN");
}
END_TEST

/* The room of their own that signed bodies from senders served before get
 * (see http_in.h) needs 128 MiB beside the largest body: without it they
 * share everyone's, and a warning says so. */
START_TEST(test_a_body_memory_without_room_for_trusted_signed_bodies_is_a_warning)
{
#define SIGNED "hmac_secrets = { 'hmac-secret-0123456789' }"
    static const struct {
        const char *src;
        const char *warning; /* NULL: none */
    } cases[] = {
        {"return { inbound = { " SIGNED ", body_memory_mb = 128 } }\n", "(128)"},
        {"return { inbound = { " SIGNED ", body_memory_mb = 143 } }\n", "(143)"},
        {"return { inbound = { " SIGNED ", body_memory_mb = 144 } }\n", NULL},
        {"return { inbound = { " SIGNED " } }\n", NULL},
        /* a body of 16 MiB and a byte takes a MiB more */
        {"return { inbound = { " SIGNED ", max_body_bytes = 16777217, body_memory_mb = 144 } }\n",
         "(144)"},
        {"return { inbound = { " SIGNED ", max_body_bytes = 16777217, body_memory_mb = 145 } }\n",
         NULL},
        /* no body is read before authentication: no room needed */
        {"return { inbound = { " SIGNED ", require = 'token', tokens = { 'tok-0123456789abcdef' }, "
         "body_memory_mb = 128 } }\n",
         NULL},
        {"return { inbound = { body_memory_mb = 128 } }\n", NULL},
    };
#undef SIGNED
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_msg(config_load(&c, conf("room.lua", cases[i].src), err, sizeof err) == 0, "%s",
                      err);
        const char *w = c->warnings ? c->warnings : "";
        const char *at = strstr(w, "leaves signed requests from senders served before no room of "
                                   "their own: clients that never finish a body can hold them out");
        if (cases[i].warning) {
            char says[128];
            snprintf(says, sizeof says, "inbound.body_memory_mb %s leaves", cases[i].warning);
            ck_assert_msg(at && strstr(w, says), "%zu: %s", i, w);
        } else {
            ck_assert_msg(!at, "%zu: %s", i, w);
        }
        config_unref(c);
    }
}
END_TEST

START_TEST(test_null_path_reads_tributary_conf_lua_in_current_directory)
{
    char sub[128];
    snprintf(sub, sizeof sub, "%s/cwd", root);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    ck_assert_int_eq(chdir(sub), 0);
    unit_write("tributary.conf.lua", "return { batch = { linger_ms = 42 } }\n");

    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->file, "tributary.conf.lua");
    ck_assert_int_eq(c->batch_linger_ms, 42);
    config_unref(c);
}
END_TEST

/* ---- values from the file ------------------------------------------------ */

START_TEST(test_file_values_are_read_from_nested_sections)
{
    const char *path = conf(
        "nested.lua", "return {\n"
                      "  listen = \"127.0.0.1:9999\",\n"
                      "  data_dir = \"/srv/trib/var\",\n"
                      "  environment = \"development\",\n"
                      "  mparticle = { url = \"https://s2s.eu1.mparticle.com\" },\n"
                      "  feeds = { ios = { key = \"k\", secret = \"s\",\n"
                      "                    url = \"https://s2s.us2.mparticle.com\",\n"
                      "                    rate_limit = 50 } },\n"
                      "  batch = { linger_ms = 250 },\n"
                      "  retry = { base_ms = 10, max_ms = 20, max_age_s = 30, pause_ms = 400 },\n"
                      "  queue = { sync = \"normal\" },\n"
                      "  dedup = { window_s = 0 },\n"
                      "}\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->file, path);
    ck_assert_str_eq(c->listen, "127.0.0.1:9999");
    ck_assert_str_eq(c->data_dir, "/srv/trib/var");
    ck_assert_str_eq(c->rules_dir, "./rules");
    ck_assert_str_eq(c->environment, "development");
    ck_assert_str_eq(c->mparticle_url, "https://s2s.eu1.mparticle.com");
    ck_assert_str_eq(c->feeds[FEED_IOS].key, "k");
    ck_assert_str_eq(c->feeds[FEED_IOS].secret, "s");
    ck_assert_int_eq(c->feeds[FEED_IOS].rate_limit, 50);
    ck_assert_int_eq(config_feed_ready(c, FEED_IOS), 1);
    ck_assert_int_eq(config_feed_ready(c, FEED_WEB), 0);
    ck_assert_str_eq(config_feed_url(c, FEED_IOS), "https://s2s.us2.mparticle.com");
    ck_assert_str_eq(config_feed_url(c, FEED_WEB), "https://s2s.eu1.mparticle.com");
    ck_assert_int_eq(c->batch_linger_ms, 250);
    ck_assert_int_eq(c->retry_base_ms, 10);
    ck_assert_int_eq(c->retry_max_ms, 20);
    ck_assert_int_eq(c->retry_max_age_s, 30);
    ck_assert_int_eq(c->retry_pause_ms, 400);
    ck_assert_str_eq(c->queue_sync, "normal");
    ck_assert_int_eq(c->dedup_window_s, 0);
    config_unref(c);
}
END_TEST

START_TEST(test_file_lists_are_read_in_order)
{
    const char *path =
        conf("lists.lua", "return {\n"
                          "  inbound = { tokens = { \"tok-one\", \"tok-two\" } },\n"
                          "  events = { \"users.messages.email.Open\",\n"
                          "             \"users.messages.pushnotification.Send\" },\n"
                          "}\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(c->inbound_tokens.n, 2);
    ck_assert_str_eq(c->inbound_tokens.items[0], "tok-one");
    ck_assert_str_eq(c->inbound_tokens.items[1], "tok-two");
    ck_assert_uint_eq(c->events.n, 2);
    ck_assert_str_eq(c->events.items[0], "users.messages.email.Open");
    ck_assert_str_eq(c->events.items[1], "users.messages.pushnotification.Send");
    config_unref(c);
}
END_TEST

/* Without inbound.workspaces any workspace name is taken; with them, only
 * theirs. A name with a control character or over 128 bytes never is. */
static const char *ws_problem(const struct config *c, const char *name)
{
    return config_workspace_problem(c, name, strlen(name));
}

/* Without inbound.workspaces any workspace name, or none, is taken; with
 * them, only theirs. A name with a control character (a NUL too) or over 128
 * bytes never is. */
START_TEST(test_workspaces_take_the_listed_names_or_any_name)
{
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_null(config_workspace_problem(c, NULL, 0));
    ck_assert_ptr_null(ws_problem(c, ""));
    ck_assert_ptr_nonnull(config_workspace_problem(c, "a\0b", 3));
    ck_assert_ptr_null(ws_problem(c, "Brand A"));
    ck_assert_ptr_nonnull(ws_problem(c, "brand\tb"));
    ck_assert_ptr_nonnull(ws_problem(c, "\xff\xfe")); /* not UTF-8 */
    ck_assert_ptr_null(ws_problem(c, "Marke \xc3\xa9t\xc3\xa9"));
    char longest[CONFIG_WORKSPACE_MAX + 2];
    memset(longest, 'w', sizeof longest - 1);
    longest[sizeof longest - 1] = '\0';
    ck_assert_ptr_nonnull(ws_problem(c, longest));
    longest[CONFIG_WORKSPACE_MAX] = '\0';
    ck_assert_ptr_null(ws_problem(c, longest));
    config_unref(c);

    ck_assert_int_eq(setenv("TRIBUTARY_INBOUND_WORKSPACES", "brand-a, brand-b", 1), 0);
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(c->inbound_workspaces.n, 2);
    ck_assert_ptr_null(ws_problem(c, "brand-b"));
    const char *why = config_workspace_problem(c, NULL, 0);
    ck_assert_msg(why && strstr(why, "none given"), "%s", why ? why : "(taken)");
    ck_assert_ptr_nonnull(
        config_workspace_problem(c, "brand-b\0x", 9)); /* ?workspace=brand-b%00x */
    why = ws_problem(c, "brand-c");
    ck_assert_msg(why && strstr(why, "inbound.workspaces"), "%s", why ? why : "(taken)");
    config_unref(c);
    unsetenv("TRIBUTARY_INBOUND_WORKSPACES");

    const char *path =
        conf("ws.lua", "return { inbound = { workspaces = { \"ok\", \"bad\\n\" } } }\n");
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "inbound.workspaces") && strstr(err, "not a workspace name"), "%s",
                  err);
}
END_TEST

/* Read as C text, a value would be cut at a NUL byte: another value than the
 * file's. */
START_TEST(test_a_string_value_with_a_nul_byte_is_refused)
{
    const char *cases[] = {
        "return { listen = \"127.0.0.1:8080\\0junk\" }\n",
        "return { inbound = { workspaces = { \"brand-a\\0x\" } } }\n",
        "return { inbound = { tokens = \"tok-one-0123456789\\0,x\" } }\n",
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_int_eq(config_load(&c, conf("nul.lua", cases[i]), err, sizeof err), -1);
        ck_assert_msg(strstr(err, "must not hold a NUL byte"), "%s", err);
        ck_assert_ptr_null(strstr(err, "junk"));
    }
}
END_TEST

START_TEST(test_file_apps_table_maps_app_id_to_feed)
{
    const char *path =
        conf("apps.lua", "return {\n"
                         "  apps = {\n"
                         "    [\"11111111-2222-4333-8444-555555555555\"] = \"ios\",\n"
                         "    android_app = \"android\",\n"
                         "    [\"web-app\"] = \"web\",\n"
                         "  },\n"
                         "}\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(c->napps, 3);
    ck_assert(has_app(c, "11111111-2222-4333-8444-555555555555", FEED_IOS));
    ck_assert(has_app(c, "android_app", FEED_ANDROID));
    ck_assert(has_app(c, "web-app", FEED_WEB));
    config_unref(c);
}
END_TEST

START_TEST(test_os_getenv_is_available_in_config_file)
{
    ck_assert_int_eq(setenv("UNIT_MP_KEY", "key-from-env", 1), 0);
    ck_assert_int_eq(setenv("UNIT_MP_SECRET", "secret-from-env", 1), 0);
    const char *path = conf("getenv.lua", "return { feeds = { unbound = {\n"
                                          "  key = os.getenv(\"UNIT_MP_KEY\"),\n"
                                          "  secret = os.getenv(\"UNIT_MP_SECRET\"),\n"
                                          "} } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->feeds[FEED_UNBOUND].key, "key-from-env");
    ck_assert_str_eq(c->feeds[FEED_UNBOUND].secret, "secret-from-env");
    config_unref(c);
}
END_TEST

/* A rotation's { os.getenv("OLD"), "new" } once OLD is unset: the message
 * said only that the item must be a non-empty string. */
START_TEST(test_a_list_item_an_unset_variable_left_nil_is_named_as_such)
{
    ck_assert_int_eq(unsetenv("UNIT_UNSET_TOKEN"), 0);
    const char *path = conf("rotation.lua", "return { inbound = {\n"
                                            "  tokens = { os.getenv(\"UNIT_UNSET_TOKEN\"), "
                                            "\"new-token-1234\" },\n"
                                            "} }\n");
    struct config *c = NULL;
    char err[4096] = "", want[512];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want,
             "%s:2: 'inbound.tokens' item 1 is nil: an os.getenv of a variable that is not set? "
             "(set it, or leave the item out)",
             path);
    ck_assert_str_eq(err, want);
    ck_assert_ptr_null(strstr(err, "new-token-1234"));
}
END_TEST

/* ---- the environment wins ------------------------------------------------ */

START_TEST(test_environment_integer_overrides_file)
{
    const char *path = conf("linger.lua", "return { batch = { linger_ms = 250 } }\n");
    ck_assert_int_eq(setenv("TRIBUTARY_BATCH_LINGER_MS", "1234", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c->batch_linger_ms, 1234);
    config_unref(c);
}
END_TEST

/* An env file or `docker -e` may leave a blank or a "\r" after a value: an
 * integer is read without the blanks around it, at either end alike (" 500"
 * was taken, "500 " refused); a '+', which Lua does not take in the file, is
 * refused; a refused value is shown, escaped, unless a file held it. */
START_TEST(test_environment_integers_are_read_without_blanks_and_a_refused_one_is_shown)
{
    static const char *const taken[] = {" 500", "500 ", "\t500\r\n", " 500 "};
    for (size_t i = 0; i < ARRAY_LEN(taken); i++) {
        ck_assert_int_eq(setenv("TRIBUTARY_BATCH_LINGER_MS", taken[i], 1), 0);
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "'%s': %s", taken[i], err);
        ck_assert_int_eq(c->batch_linger_ms, 500);
        config_unref(c);
    }
    static const struct {
        const char *value, *want;
    } refused[] = {
        {"+5", "TRIBUTARY_BATCH_LINGER_MS: must be an integer between 0 and 60000, not \"+5\""},
        {"5 00", "TRIBUTARY_BATCH_LINGER_MS: must be an integer between 0 and 60000, not \"5 00\""},
        {"500ms\r",
         "TRIBUTARY_BATCH_LINGER_MS: must be an integer between 0 and 60000, not \"500ms\\x0D\""},
        {" 60001 ",
         "TRIBUTARY_BATCH_LINGER_MS: must be an integer between 0 and 60000, not \" 60001 \""},
        {"", "TRIBUTARY_BATCH_LINGER_MS: must be an integer between 0 and 60000, not \"\""},
    };
    for (size_t i = 0; i < ARRAY_LEN(refused); i++) {
        ck_assert_int_eq(setenv("TRIBUTARY_BATCH_LINGER_MS", refused[i].value, 1), 0);
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
        ck_assert_str_eq(err, refused[i].want);
    }
    ck_assert_int_eq(unsetenv("TRIBUTARY_BATCH_LINGER_MS"), 0);
    /* from a file: the same rule, and what it holds is not shown */
    char path[128];
    snprintf(path, sizeof path, "%s/linger", root);
    unit_write(path, " 250 \n");
    ck_assert_int_eq(setenv("TRIBUTARY_BATCH_LINGER_MS_FILE", path, 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c->batch_linger_ms, 250);
    config_unref(c);
    unit_write(path, "secret-5d2e\n");
    ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
    ck_assert_str_eq(err, "TRIBUTARY_BATCH_LINGER_MS_FILE: must be an integer between 0 and 60000");
}
END_TEST

/* A word such as log.format the same way: its blanks left out, and a refused
 * one shown. */
START_TEST(test_environment_words_are_read_without_blanks_and_a_refused_one_is_shown)
{
    ck_assert_int_eq(setenv("TRIBUTARY_LOG_FORMAT", "json \r\n", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->log_format, "json");
    config_unref(c);
    ck_assert_int_eq(setenv("TRIBUTARY_LOG_FORMAT", "jsn", 1), 0);
    ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
    ck_assert_str_eq(err, "TRIBUTARY_LOG_FORMAT: must be one of logfmt, json, not \"jsn\"");
    ck_assert_int_eq(unsetenv("TRIBUTARY_LOG_FORMAT"), 0);
}
END_TEST

START_TEST(test_environment_token_list_is_split_on_commas_and_trimmed)
{
    const char *path = conf("tokens.lua", "return { inbound = { tokens = { \"from-file\" } } }\n");
    ck_assert_int_eq(setenv("TRIBUTARY_INBOUND_TOKENS", "a, b", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(c->inbound_tokens.n, 2);
    ck_assert_str_eq(c->inbound_tokens.items[0], "a");
    ck_assert_str_eq(c->inbound_tokens.items[1], "b");
    config_unref(c);
}
END_TEST

START_TEST(test_environment_feed_credentials_override_file)
{
    const char *path =
        conf("creds.lua",
             "return { feeds = { ios = { key = \"file-key\", secret = \"file-secret\" } } }\n");
    ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_IOS_KEY", "env-key", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_IOS_SECRET", "env-secret", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->feeds[FEED_IOS].key, "env-key");
    ck_assert_str_eq(c->feeds[FEED_IOS].secret, "env-secret");
    ck_assert_int_eq(config_feed_ready(c, FEED_IOS), 1);
    config_unref(c);
}
END_TEST

/* Lua keeps the last value of a key given twice in one constructor: the
 * first section, and the tokens in it, would be lost without a word. */
START_TEST(test_a_key_given_twice_in_one_table_is_an_error_naming_both_lines)
{
    const char *path = conf("twice.lua", "return {\n"
                                         "  inbound = { tokens = { \"tok-0123456789abcdef\" } },\n"
                                         "  feeds = { ios = { key = \"k\", secret = \"s\",\n"
                                         "                    [\"key\"] = \"k2\" } },\n"
                                         "  inbound = { max_events = 5000 },\n"
                                         "}\n");
    struct config *c = NULL;
    char err[4096] = "", want[1024];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want,
             "%s:4: 'feeds.ios.key' is given twice in one table (first on line 3); Lua keeps "
             "only the last\n"
             "%s:5: 'inbound' is given twice in one table (first on line 2); Lua keeps only the "
             "last",
             path, path);
    ck_assert_str_eq(err, want);
}
END_TEST

/* A '.' in a key's name named a key of a section beside the section's own
 * table, past the check of keys given twice, and which of the two was taken
 * hung on the order of Lua's hashing; a name read as C text was cut at a NUL
 * byte and taken for another key. */
START_TEST(test_a_key_name_with_a_dot_or_a_nul_byte_is_refused_naming_it)
{
    static const struct {
        const char *src, *want;
    } cases[] = {
        {"return {\n  http = { threads = 8 },\n  [\"http.threads\"] = 2,\n}\n",
         "%s:3: keys in the configuration table must be names without '.' (sections are nested "
         "tables: http = { threads = 8 }), found 'http.threads'"},
        {"return { inbound = { tokens = { \"a-token-0123456789\" } },\n"
         "  [\"inbound.tokens\"] = { \"b-token-0123456789\" } }\n",
         "%s:2: keys in the configuration table must be names without '.' (sections are nested "
         "tables: http = { threads = 8 }), found 'inbound.tokens'"},
        {"return { feeds = {\n  [\"ios.key\"] = \"k\", ios = { secret = \"s\" } } }\n",
         "%s:2: keys in feeds must be names without '.' (sections are nested tables: http = { "
         "threads = 8 }), found 'ios.key'"},
        {"return { [\"listen\\0x\"] = \"0.0.0.0:8080\" }\n",
         "%s: keys in the configuration table must be names without a NUL byte, found "
         "'listen\\x00x'"},
        {"return { log = { [\"level\\0\\\\\\n\"] = \"debug\" } }\n",
         "%s: keys in log must be names without a NUL byte, found 'level\\x00\\\\\\x0A'"},
        {"return {\n  apps = { [\"app\\0x\"] = \"ios\" } }\n",
         "%s:2: 'apps' keys must be app_ids without a NUL byte, found 'app\\x00x'"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        const char *path = conf("key-name.lua", cases[i].src);
        struct config *c = NULL;
        char err[4096] = "", want[512];
        ck_assert_msg(config_load(&c, path, err, sizeof err) == -1, "accepted: %s", cases[i].src);
        snprintf(want, sizeof want, cases[i].want, path);
        ck_assert_str_eq(err, want);
        ck_assert_ptr_null(strstr(err, "token-0123456789"));
    }
}
END_TEST

START_TEST(test_names_in_comments_strings_functions_and_other_tables_are_not_keys_given_twice)
{
    const char *path = conf(
        "once.lua",
        "-- inbound = {}, inbound = {}\n"
        "--[==[ http = 1, http = 2 ]==]\n"
        "local s = [[ log = 1, log = 2 ]] .. \"batch = 1, batch = 2\"\n"
        "local z = { a = \"x\\z\n   y\" }\n"
        "local q, a = 1, 2\n"
        "local w = { b = \"c\\\r\nd\" }\r\n"
        "local r, b = 1, 2\n"
        "local function f(x) local a = 1; a = 2; if x then a = 3 end return { a = a } end\n"
        "return {\n"
        "  http = { threads = 2, timeout_s = (function() local t = 5; t = 6; return t end)() },\n"
        "  retry = { base_ms = 100, max_ms = 1 <= 2 and 60000 or 1 },\n"
        "  log = { level = \"info\"; format = \"logfmt\" },\n"
        "  feeds = { ios = { key = \"k\", secret = \"s\" }, web = { key = \"k\", secret = \"s\" } "
        "},\n"
        "  inbound = { tokens = { \"a-token-0123456789\", \"b-token-0123456789\" } },\n"
        "}\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c->http_timeout_s, 6);
    config_unref(c);
}
END_TEST

START_TEST(test_an_unknown_environment_variable_is_an_error_naming_the_nearest_key)
{
    struct {
        const char *name, *want;
    } cases[] = {
        {"TRIBUTARY_BATCH_LINGER",
         "unknown environment variable TRIBUTARY_BATCH_LINGER (did you mean "
         "TRIBUTARY_BATCH_LINGER_MS?)"},
        {"TRIBUTARY_INBOUND_TOKEN",
         "unknown environment variable TRIBUTARY_INBOUND_TOKEN (did you mean "
         "TRIBUTARY_INBOUND_TOKENS?)"},
        {"TRIBUTARY_ADMIN_TOKEN_FIEL",
         "unknown environment variable TRIBUTARY_ADMIN_TOKEN_FIEL (did you mean "
         "TRIBUTARY_ADMIN_TOKEN_FILE?)"},
        {"TRIBUTARY_SOMETHING_ELSE_ENTIRELY",
         "unknown environment variable TRIBUTARY_SOMETHING_ELSE_ENTIRELY: it names no key (see "
         "the README, Configuration), and the configuration file does not read it"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ck_assert_int_eq(setenv(cases[i].name, "value-5c1d", 1), 0);
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
        ck_assert_str_eq(err, cases[i].want);
        ck_assert_int_eq(unsetenv(cases[i].name), 0);
    }
}
END_TEST

/* apps, a table, has no variable: TRIBUTARY_APPS names a key all the same, and
 * the message says where it is set instead of that it names none. */
START_TEST(test_tributary_apps_is_refused_as_a_key_set_only_in_the_file)
{
    static const char *const names[] = {"TRIBUTARY_APPS", "TRIBUTARY_APPS_FILE"};
    for (size_t i = 0; i < ARRAY_LEN(names); i++) {
        ck_assert_int_eq(setenv(names[i], "web-app=web", 1), 0);
        struct config *c = NULL;
        char err[4096] = "", want[512];
        ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
        snprintf(want, sizeof want,
                 "environment variable %s: apps can be set only in the configuration file (apps = "
                 "{ [\"<app_id>\"] = \"ios\" }), not from the environment",
                 names[i]);
        ck_assert_str_eq(err, want);
        ck_assert_int_eq(unsetenv(names[i]), 0);
    }
}
END_TEST

START_TEST(test_an_environment_variable_the_file_reads_is_not_unknown)
{
    ck_assert_int_eq(setenv("TRIBUTARY_HMAC_SECRET", "hmac-secret-0123456789", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_UNSET_FALLBACK", "x", 1), 0);
    const char *path = conf("reads.lua", "local s = os.getenv(\"TRIBUTARY_HMAC_SECRET\")\n"
                                         "local f = os.getenv(\"TRIBUTARY_UNSET_FALLBACK\")\n"
                                         "return { inbound = { hmac_secrets = { s } } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->inbound_hmac_secrets.items[0], "hmac-secret-0123456789");
    ck_assert_ptr_null(c->warnings);
    config_unref(c);
    /* named in the file, read or not in this load: a rotation's old token */
    ck_assert_int_eq(unsetenv("TRIBUTARY_HMAC_SECRET"), 0);
    ck_assert_int_eq(unsetenv("TRIBUTARY_UNSET_FALLBACK"), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_TOKEN_NEW", "token-new-0123456789", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_TOKEN_OLD", "token-old-0123456789", 1), 0);
    path = conf("either.lua",
                "return { inbound = { tokens = {\n"
                "  os.getenv(\"TRIBUTARY_TOKEN_NEW\") or os.getenv 'TRIBUTARY_TOKEN_OLD' } } }\n");
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->inbound_tokens.items[0], "token-new-0123456789");
    config_unref(c);
}
END_TEST

/* Kubernetes gives every pod variables for each Service of its namespace: a
 * Service named tributary (or tributary-<more>) gives TRIBUTARY_* names that
 * name no key. Left alone, they no longer stop the service; the same names
 * with values Kubernetes does not write, and mistyped keys, are still refused. */
START_TEST(test_kubernetes_service_links_are_not_unknown_variables)
{
    static const char *const links[][2] = {
        {"TRIBUTARY_SERVICE_HOST", "10.96.0.12"},
        {"TRIBUTARY_SERVICE_PORT", "8080"},
        {"TRIBUTARY_SERVICE_PORT_HTTP", "8080"},
        {"TRIBUTARY_SERVICE_PORT_STATSD_UDP", "8125"},
        {"TRIBUTARY_PORT", "tcp://10.96.0.12:8080"},
        {"TRIBUTARY_PORT_8080_TCP", "tcp://10.96.0.12:8080"},
        {"TRIBUTARY_PORT_8080_TCP_PROTO", "tcp"},
        {"TRIBUTARY_PORT_8080_TCP_PORT", "8080"},
        {"TRIBUTARY_PORT_8080_TCP_ADDR", "10.96.0.12"},
        {"TRIBUTARY_PORT_8125_UDP", "udp://10.96.0.12:8125"},
        {"TRIBUTARY_PORT_8125_UDP_PROTO", "udp"},
        {"TRIBUTARY_PORT_9000_SCTP_PROTO", "sctp"},
        {"TRIBUTARY_METRICS_SERVICE_HOST", "fd00::c"},
        {"TRIBUTARY_METRICS_PORT", "tcp://[fd00::c]:9090"},
        {"TRIBUTARY_METRICS_PORT_9090_TCP", "tcp://[fd00::c]:9090"},
        {"TRIBUTARY_METRICS_PORT_9090_TCP_ADDR", "fd00::c"},
    };
    for (size_t i = 0; i < ARRAY_LEN(links); i++)
        ck_assert_int_eq(setenv(links[i][0], links[i][1], 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert_ptr_null(c->warnings);
    ck_assert_str_eq(c->listen, "127.0.0.1:8080");
    config_unref(c);

    static const char *const refused[][2] = {
        {"TRIBUTARY_PORT", "9000"},
        {"TRIBUTARY_SERVICE_HOST", "tributary.example"},
        {"TRIBUTARY_SERVICE_PORT", "80a"},
        {"TRIBUTARY_PORT_8080_TCP", "tcp://10.96.0.12:8081"},
        {"TRIBUTARY_PORT_8080_TCP_PROTO", "udp"},
        {"TRIBUTARY_PORT_8080_HTTP", "http://10.96.0.12:8080"},
        {"TRIBUTARY_METRICS_PORT", "tcp://fd00::c:9090"},
        {"TRIBUTARY_LISTNE", "0.0.0.0:8080"},
    };
    for (size_t i = 0; i < ARRAY_LEN(refused); i++) {
        ck_assert_int_eq(setenv(refused[i][0], refused[i][1], 1), 0);
        char want[256];
        snprintf(want, sizeof want, "unknown environment variable %s", refused[i][0]);
        ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
        ck_assert_msg(strncmp(err, want, strlen(want)) == 0 && !strchr(err, '\n'), "%s=%s: %s",
                      refused[i][0], refused[i][1], err);
        ck_assert_int_eq(unsetenv(refused[i][0]), 0);
        for (size_t j = 0; j < ARRAY_LEN(links); j++) /* one may have replaced a link */
            ck_assert_int_eq(setenv(links[j][0], links[j][1], 1), 0);
    }
}
END_TEST

START_TEST(test_empty_environment_data_dir_is_an_error_not_a_crash)
{
    /* data_dir = "" in the file is refused with "data_dir must not be empty";
     * the same value from the environment must be refused the same way. */
    ck_assert_int_eq(setenv("TRIBUTARY_DATA_DIR", "", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
    ck_assert_ptr_null(c);
    ck_assert_ptr_nonnull(strstr(err, "data_dir"));
}
END_TEST

/* ---- errors in the file -------------------------------------------------- */

START_TEST(test_unknown_key_names_file_and_line)
{
    const char *path = conf("typo.lua", "return {\n"
                                        "  batch = {\n"
                                        "    lingr_ms = 100,\n"
                                        "  },\n"
                                        "}\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_ptr_null(c);
    snprintf(want, sizeof want, "%s:3: unknown key 'batch.lingr_ms'", path);
    ck_assert_str_eq(err, want);
}
END_TEST

/* An empty path or URL in the file was kept and used as one: every send
 * failed on an empty CA bundle. Leaving the key out unsets it. */
static const char *const EMPTY_OPTIONAL_KEYS[] = {"mparticle = { ca_bundle = \"\" }",
                                                  "tls = { cert = \"\", key = \"\" }",
                                                  "feeds = { web = { url = \"\" } }"};

START_TEST(test_an_empty_optional_path_or_url_in_the_file_is_refused)
{
    char src[256];
    snprintf(src, sizeof src, "return {\n  %s,\n}\n", EMPTY_OPTIONAL_KEYS[_i]);
    const char *path = conf("empty.lua", src);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_ptr_null(c);
    ck_assert_msg(strstr(err, ":2: '") &&
                      strstr(err, "' must not be empty (leave it out to use none)"),
                  "%s", err);
}
END_TEST

/* Errors raised inside a library function (string.format, arithmetic on a
 * string) carry no position of their own: the file's line is added. */
START_TEST(test_a_runtime_error_in_a_library_function_names_file_and_line)
{
    static const struct {
        const char *expr, *says;
    } cases[] = {
        {"string.format('%d', 'x')", "bad argument #2 to"},
        {"('x') + 0", "attempt to"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        char src[256];
        snprintf(src, sizeof src, "return {\n  admin = { token = %s },\n}\n", cases[i].expr);
        const char *path = conf("runtime.lua", src);
        struct config *c = NULL;
        char err[4096] = "", want[512];
        ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
        snprintf(want, sizeof want, "%s:2: ", path);
        ck_assert_msg(strncmp(err, want, strlen(want)) == 0, "%s", err);
        ck_assert_msg(strstr(err, cases[i].says) != NULL, "%s", err);
    }
}
END_TEST

START_TEST(test_wrong_type_names_key_and_line)
{
    const char *path = conf("type.lua", "return {\n"
                                        "  batch = { linger_ms = \"500\" },\n"
                                        "}\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:2: 'batch.linger_ms' must be an integer, not string", path);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_wrong_type_names_line_of_its_own_section_not_an_earlier_same_name)
{
    /* Both feeds have a `key`; the error is on line 3, not on line 2. */
    const char *path = conf("same-name.lua", "return { feeds = {\n"
                                             "  ios = { key = \"k\", secret = \"s\" },\n"
                                             "  web = { key = 7, secret = \"s\" },\n"
                                             "} }\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:3: 'feeds.web.key' must be a string, not number", path);
    ck_assert_str_eq(err, want);
}
END_TEST

/* The shipped file holds commented-out examples of keys, and a string may hold
 * "name = ": neither is where the key is given. */
START_TEST(test_wrong_type_names_its_line_not_a_comment_or_string_that_looks_like_it)
{
    const char *path =
        conf("commented.lua", "return {\n"
                              "  -- admin = { token = os.getenv(\"T\") },\n"
                              "  --[[ admin = { token = 1 } ]]\n"
                              "  log = { level = \"info\", format = \"admin = 1\" },\n"
                              "  admin = { [\"token\"] = true },\n"
                              "}\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:5: 'admin.token' must be a string, not boolean", path);
    ck_assert_msg(strstr(err, want) != NULL, "%s", err);
}
END_TEST

START_TEST(test_out_of_range_integer_is_refused_with_its_bounds)
{
    const char *path = conf("range.lua", "return { batch = { linger_ms = 60001 } }\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:1: 'batch.linger_ms' must be between 0 and 60000, not 60001",
             path);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_integer_at_its_upper_bound_is_accepted)
{
    const char *path = conf("bound.lua", "return { batch = { linger_ms = 60000 } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c->batch_linger_ms, 60000);
    config_unref(c);
}
END_TEST

/* retry.failing_s: at least a second (0 would make every batch that fails while
 * others are delivered a dead letter at once), 3,600 by default. */
START_TEST(test_retry_failing_s_is_bounded_and_defaults_to_an_hour)
{
    struct config *c = NULL;
    char err[4096] = "", want[256];
    const char *path = conf("failing.lua", "return { retry = { failing_s = 0 } }\n");
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:1: 'retry.failing_s' must be between 1 and 7776000, not 0",
             path);
    ck_assert_str_eq(err, want);
    path = conf("failing1.lua", "return { retry = { failing_s = 1 } }\n");
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c->retry_failing_s, 1);
    config_unref(c);
    path = conf("default.lua", "return {}\n");
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c->retry_failing_s, 3600);
    config_unref(c);
}
END_TEST

START_TEST(test_bad_enum_value_is_refused_with_the_choices)
{
    const char *path = conf("enum.lua", "return { environment = \"staging\" }\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:1: 'environment' must be one of production, development", path);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_retry_base_above_max_is_refused)
{
    const char *path = conf("retry.lua", "return { retry = { base_ms = 5000, max_ms = 4000 } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1, "retry.base_ms (5000) must not exceed retry.max_ms (4000)");
}
END_TEST

/* The limits between two keys, at their edges: equal is taken, one past is
 * refused. */
START_TEST(test_limits_between_two_keys_hold_at_their_edges)
{
    static const struct {
        const char *src;
        const char *err; /* NULL: loads */
    } cases[] = {
        {"return { retry = { base_ms = 4000, max_ms = 4000 } }\n", NULL},
        {"return { retry = { base_ms = 4001, max_ms = 4000 } }\n",
         "retry.base_ms (4001) must not exceed retry.max_ms (4000)"},
        {"return { queue = { max_depth = 10000 }, inbound = { max_events = 10000 } }\n", NULL},
        {"return { queue = { max_depth = 9999 }, inbound = { max_events = 10000 } }\n",
         "queue.max_depth (9999) must be at least inbound.max_events (10000)"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        const char *path = conf("edge.lua", cases[i].src);
        struct config *c = NULL;
        char err[4096] = "";
        int rc = config_load(&c, path, err, sizeof err);
        if (!cases[i].err) {
            ck_assert_msg(rc == 0, "case %zu: %s", i, err);
            config_unref(c);
        } else {
            ck_assert_int_eq(rc, -1);
            ck_assert_msg(strstr(err, cases[i].err), "case %zu: %s", i, err);
        }
    }
}
END_TEST

/* An error in values that passed one by one names where they came from: the
 * file and the line that sets them, or the variable; a key at its default
 * adds nothing. */
START_TEST(test_errors_after_loading_name_the_file_and_line_or_the_variable_of_the_values)
{
    const char *path = conf("checked.lua", "return {\n"
                                           "  retry = {\n"
                                           "    base_ms = 5000,\n"
                                           "    max_ms = 4000,\n"
                                           "  },\n"
                                           "  listen = \"localhost\",\n"
                                           "  feeds = { web = {\n"
                                           "    secret = \"web-secret-5f3a\" } },\n"
                                           "}\n");
    struct config *c = NULL;
    char err[4096] = "", want[1024];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want,
             "%s:6: listen: must be HOST:PORT (127.0.0.1:8080, [::1]:8080)\n"
             "%s:8: feeds.web: key and secret must be set together (only the secret is set)\n"
             "%s:3: retry.base_ms (5000) must not exceed retry.max_ms (4000)",
             path, path, path);
    ck_assert_str_eq(err, want);

    /* the environment, alone or beside the file */
    path = conf("max.lua", "return {\n  retry = { max_ms = 4000 } }\n");
    ck_assert_int_eq(setenv("TRIBUTARY_RETRY_BASE_MS", "5000", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_LISTEN", "localhost", 1), 0);
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want,
             "TRIBUTARY_LISTEN: listen: must be HOST:PORT (127.0.0.1:8080, [::1]:8080)\n"
             "TRIBUTARY_RETRY_BASE_MS, %s:2: retry.base_ms (5000) must not exceed retry.max_ms "
             "(4000)",
             path);
    ck_assert_str_eq(err, want);
    ck_assert_int_eq(unsetenv("TRIBUTARY_LISTEN"), 0);
    ck_assert_int_eq(unsetenv("TRIBUTARY_RETRY_BASE_MS"), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_RETRY_MAX_MS", "500", 1), 0);
    ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
    ck_assert_str_eq(err, "TRIBUTARY_RETRY_MAX_MS: retry.base_ms (1000) must not exceed "
                          "retry.max_ms (500)");
    ck_assert_int_eq(unsetenv("TRIBUTARY_RETRY_MAX_MS"), 0);
    char depth[128];
    snprintf(depth, sizeof depth, "%s/depth", root);
    unit_write(depth, "3\n");
    ck_assert_int_eq(setenv("TRIBUTARY_QUEUE_MAX_DEPTH_FILE", depth, 1), 0);
    ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
    ck_assert_str_eq(err, "TRIBUTARY_QUEUE_MAX_DEPTH_FILE: queue.max_depth (3) must be at least "
                          "inbound.max_events (10000): a request that large could never be "
                          "queued");
    ck_assert_int_eq(unsetenv("TRIBUTARY_QUEUE_MAX_DEPTH_FILE"), 0);

    /* a value the file gives where no line says it: the file alone */
    path = conf("computed.lua", "local t = {}\nt[\"list\" .. \"en\"] = \"localhost\"\nreturn t\n");
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: listen: must be HOST:PORT (127.0.0.1:8080, [::1]:8080)", path);
    ck_assert_str_eq(err, want);
}
END_TEST

/* ---- secrets stay out of messages ---------------------------------------- */

START_TEST(test_wrong_type_secret_does_not_echo_key_or_secret)
{
    const char *path = conf("secret-type.lua", "return { feeds = { ios = {\n"
                                               "  key = \"ios-key-do-not-log\",\n"
                                               "  secret = 424242,\n"
                                               "} } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "'feeds.ios.secret' must be a string, not number"));
    ck_assert_ptr_null(strstr(err, "ios-key-do-not-log"));
    ck_assert_ptr_null(strstr(err, "424242"));
}
END_TEST

START_TEST(test_key_without_secret_is_refused_without_echoing_key)
{
    const char *path = conf(
        "key-only.lua", "return { feeds = { android = { key = \"android-key-do-not-log\" } } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "feeds.android: key and secret must be set together (only the key is set)");
    ck_assert_ptr_null(strstr(err, "android-key-do-not-log"));
}
END_TEST

/* The Authorization header is built in a buffer of fixed size: a longer
 * credential is refused here instead of being sent as an empty header. */
START_TEST(test_a_feed_secret_over_256_characters_is_refused_without_echoing_it)
{
    char src[1024];
    snprintf(src, sizeof src, "return { feeds = { ios = { key = \"k\", secret = \"%0257d\" } } }\n",
             42);
    const char *path = conf("long-secret.lua", src);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "feeds.ios.secret: longer than 256 characters (mParticle's are far shorter)");
    snprintf(src, sizeof src, "return { feeds = { ios = { key = \"k\", secret = \"%0256d\" } } }\n",
             42);
    path = conf("secret-at-the-limit.lua", src);
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), 0);
    config_unref(c);
}
END_TEST

/* A credential is sent as it is: a line end or a space copied with it would
 * only show as mParticle refusing the feed. */
START_TEST(test_a_feed_credential_with_a_blank_or_a_colon_in_the_key_is_refused)
{
    struct {
        const char *key, *secret, *want;
    } cases[] = {
        {"ios-key-5e1f\r", "s", "feeds.ios.key contains a space, a control character"},
        {"ios-key-5e1f", "secret 9d2a", "feeds.ios.secret contains a space, a control character"},
        {"ios:key-5e1f", "s", "feeds.ios.key contains ':', which Basic auth cannot carry"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_IOS_KEY", cases[i].key, 1), 0);
        ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_IOS_SECRET", cases[i].secret, 1), 0);
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
        ck_assert_msg(strstr(err, cases[i].want), "%s", err);
        ck_assert_ptr_null(strstr(err, "5e1f"));
        ck_assert_ptr_null(strstr(err, "9d2a"));
    }
    /* a secret may hold a colon: Basic auth splits at the first one */
    ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_IOS_KEY", "ios-key", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_IOS_SECRET", "se:cret", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    config_unref(c);
    unsetenv("TRIBUTARY_FEEDS_IOS_KEY");
    unsetenv("TRIBUTARY_FEEDS_IOS_SECRET");
}
END_TEST

START_TEST(test_secret_without_key_from_environment_is_refused_without_echoing_secret)
{
    ck_assert_int_eq(setenv("TRIBUTARY_FEEDS_WEB_SECRET", "web-secret-do-not-log", 1), 0);
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, NULL, err, sizeof err), -1);
    ck_assert_str_eq(err, "TRIBUTARY_FEEDS_WEB_SECRET: feeds.web: key and secret must be set "
                          "together (only the secret is set)");
    ck_assert_ptr_null(strstr(err, "web-secret-do-not-log"));
}
END_TEST

START_TEST(test_syntax_error_in_unfinished_secret_string_does_not_echo_secret)
{
    /* The closing quote is missing: Lua's message quotes the token it stopped at. */
    const char *path = conf("unfinished.lua", "return { feeds = { ios = {\n"
                                              "  key = \"k\",\n"
                                              "  secret = \"secret-do-not-log\n"
                                              "} } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, path));
    ck_assert_msg(strstr(err, "secret-do-not-log") == NULL, "secret in message: %s", err);
}
END_TEST

/* ---- files that are not a configuration ---------------------------------- */

START_TEST(test_lua_syntax_error_names_file_and_line)
{
    const char *path = conf("syntax.lua", "return {\n"
                                          "  listen = \"127.0.0.1:8080\"\n"
                                          "  data_dir = \"./var\",\n"
                                          "}\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_ptr_null(c);
    snprintf(want, sizeof want, "%s:3:", path);
    ck_assert_msg(strncmp(err, want, strlen(want)) == 0, "want prefix %s, got %s", want, err);
}
END_TEST

START_TEST(test_file_that_does_not_return_a_table_is_refused)
{
    const char *path = conf("number.lua", "return 42\n");
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: the file must return a table, not number", path);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_missing_file_is_an_error_naming_it)
{
    char path[128];
    snprintf(path, sizeof path, "%s/does-not-exist.lua", root);
    struct config *c = NULL;
    char err[4096] = "", want[256];
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_endless_loop_in_file_hits_instruction_limit)
{
    const char *path = conf("loop.lua", "while true do end\nreturn {}\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_ptr_null(c);
    ck_assert_msg(strstr(err, "instruction limit exceeded") != NULL, "%s", err);
}
END_TEST

/* ---- listen and inbound tokens ------------------------------------------- */

START_TEST(test_non_loopback_listen_without_tokens_is_refused)
{
    const char *path = conf("open.lua", "return { listen = \"0.0.0.0:8080\" }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "listen: refusing to listen on non-loopback address 0.0.0.0 without "
                     "inbound.tokens (TRIBUTARY_INBOUND_TOKENS) or inbound.hmac_secrets");
}
END_TEST

START_TEST(test_non_loopback_listen_with_a_token_is_accepted)
{
    const char *path =
        conf("open-token.lua",
             "return { listen = \"0.0.0.0:8080\", inbound = { tokens = { \"t1\" } } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->listen, "0.0.0.0:8080");
    ck_assert_uint_eq(c->inbound_tokens.n, 1);
    config_unref(c);
}
END_TEST

/* A bearer token is read without the spaces around it: a configured token
 * with a space or control character could never match, and every admin
 * request was refused. The message does not show the token. */
START_TEST(test_tokens_with_a_space_or_control_character_are_refused)
{
    static const struct {
        const char *src, *says;
    } cases[] = {
        {"return { admin = { token = \"abcdefghijklmnopqrstu \" } }\n",
         "admin.token contains a space or control character"},
        {"return { admin = { token = \"abcdefghij\\tklmnopqrstu\" } }\n",
         "admin.token contains a space or control character"},
        {"return { metrics = { token = \"abcdefghij klmnopqrstu\" } }\n",
         "metrics.token contains a space or control character"},
        {"return { inbound = { tokens = { \"good-token\", \" abcdefghijklmnopqrstu\" } } }\n",
         "inbound.tokens: token 2 contains a space or control character"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        const char *path = conf("tokens.lua", cases[i].src);
        struct config *c = NULL;
        char err[4096] = "";
        ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
        ck_assert_msg(strstr(err, cases[i].says) != NULL, "%s", err);
        ck_assert_msg(strstr(err, "abcdefghij") == NULL, "%s", err);
    }
}
END_TEST

START_TEST(test_listen_addr_parses_bracketed_ipv6)
{
    struct config c = {0};
    c.listen = "[::1]:9000";
    char host[64] = "";
    int port = -1;
    ck_assert_int_eq(config_listen_addr(&c, host, sizeof host, &port), 0);
    ck_assert_str_eq(host, "::1");
    ck_assert_int_eq(port, 9000);
}
END_TEST

START_TEST(test_listen_addr_parses_ipv4)
{
    struct config c = {0};
    c.listen = "127.0.0.1:80";
    char host[64] = "";
    int port = -1;
    ck_assert_int_eq(config_listen_addr(&c, host, sizeof host, &port), 0);
    ck_assert_str_eq(host, "127.0.0.1");
    ck_assert_int_eq(port, 80);
}
END_TEST

START_TEST(test_listen_addr_rejects_host_without_port)
{
    struct config c = {0};
    c.listen = "nohost";
    char host[64] = "";
    int port = -1;
    ck_assert_int_eq(config_listen_addr(&c, host, sizeof host, &port), -1);
}
END_TEST

/* ---- mParticle URLs ------------------------------------------------------ */

START_TEST(test_https_url_is_accepted)
{
    const char *path =
        conf("https.lua", "return { mparticle = { url = \"https://s2s.us2.mparticle.com\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->mparticle_url, "https://s2s.us2.mparticle.com");
    config_unref(c);
}
END_TEST

START_TEST(test_plain_http_to_loopback_is_accepted)
{
    const char *path =
        conf("http-local.lua", "return { mparticle = { url = \"http://127.0.0.1:9/\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->mparticle_url, "http://127.0.0.1:9/");
    config_unref(c);
}
END_TEST

START_TEST(test_a_ca_bundle_that_cannot_be_read_is_refused)
{
    const char *path =
        conf("ca.lua", "return { mparticle = { ca_bundle = \"/nonexistent/ca.pem\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(
        err, path, 1,
        "mparticle.ca_bundle: cannot read /nonexistent/ca.pem: No such file or directory");
    /* one that holds no certificate, as curl would find at the first send */
    path = conf("ca-empty.lua", "return { mparticle = { ca_bundle = \"/dev/null\" } }\n");
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "mparticle.ca_bundle: /dev/null holds no PEM certificate that can be read");
    /* the system's bundle (package ca-certificates) is taken */
    path = conf("ca-ok.lua", "return { mparticle = { ca_bundle = "
                             "\"/etc/ssl/certs/ca-certificates.crt\" } }\n");
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    config_unref(c);
}
END_TEST

START_TEST(test_trusted_proxies_must_be_ip_addresses_or_networks)
{
    const char *path =
        conf("proxies.lua",
             "return { http = { trusted_proxies = { \"10.0.0.5\", \"lb.internal\" } } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "http.trusted_proxies: item 2 is not an IP address or CIDR network");
    path =
        conf("proxies-cidr.lua", "return { http = { trusted_proxies = { \"10.0.0.0/33\" } } }\n");
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    path =
        conf("proxies-ok.lua", "return { http = { trusted_proxies = { \"10.0.0.5\", \"fd00::5\", "
                               "\"172.16.0.0/12\", \"::ffff:192.0.2.7\" } } }\n");
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    const char *trusted[] = {"10.0.0.5",   "::ffff:10.0.0.5", "fd00:0::5", "127.0.0.1",
                             "172.16.0.1", "172.31.255.254",  "192.0.2.7"};
    const char *not_trusted[] = {"172.32.0.1", "10.0.0.6", "203.0.113.9", "fd00::6", "junk"};
    for (size_t i = 0; i < ARRAY_LEN(trusted); i++)
        ck_assert_msg(config_proxy_trusted(c, trusted[i]), "%s", trusted[i]);
    for (size_t i = 0; i < ARRAY_LEN(not_trusted); i++)
        ck_assert_msg(!config_proxy_trusted(c, not_trusted[i]), "%s", not_trusted[i]);
    config_unref(c);
}
END_TEST

START_TEST(test_plain_http_to_remote_host_is_refused)
{
    const char *path =
        conf("http-remote.lua", "return { mparticle = { url = \"http://example.com\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "mparticle.url: plain http:// is only allowed to a loopback address; "
                     "use https://");
}
END_TEST

START_TEST(test_plain_http_to_dns_name_starting_with_127_is_refused)
{
    /* "127.0.0.1.example.com" is a DNS name that resolves anywhere. */
    const char *path = conf("http-127-name.lua",
                            "return { mparticle = { url = \"http://127.0.0.1.example.com/\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "mparticle.url: plain http:// is only allowed to a loopback address; "
                     "use https://");
}
END_TEST

START_TEST(test_plain_http_with_loopback_userinfo_is_refused)
{
    /* The host of http://127.0.0.1@example.com/ is example.com; 127.0.0.1 is a user name. */
    const char *path = conf("http-userinfo.lua",
                            "return { mparticle = { url = \"http://127.0.0.1@example.com/\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "mparticle.url: plain http:// is only allowed to a loopback address; "
                     "use https://");
}
END_TEST

START_TEST(test_plain_http_feed_url_to_remote_host_is_refused)
{
    const char *path = conf(
        "feed-http.lua", "return { feeds = { web = { url = \"http://s2s.mparticle.com\" } } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "feeds.web.url: plain http:// is only allowed to a loopback address; "
                     "use https://");
}
END_TEST

START_TEST(test_mparticle_url_ending_in_the_bulk_path_is_refused_as_not_a_base_url)
{
    /* the sender appends /v2/bulkevents: this URL would only ever be answered 404 */
    const char *path = conf("bulk-path.lua", "return { mparticle = { url = "
                                             "\"https://s2s.mparticle.com/v2/bulkevents\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "mparticle.url: ends in /v2/bulkevents, but it is the base URL (such as "
                     "https://s2s.mparticle.com): tributary appends /v2/bulkevents itself");
}
END_TEST

START_TEST(test_feed_url_ending_in_the_events_path_and_a_slash_is_refused_as_not_a_base_url)
{
    const char *path =
        conf("events-path.lua", "return { feeds = { ios = { url = "
                                "\"https://s2s.us2.mparticle.com/v2/events/\" } } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "feeds.ios.url: ends in /v2/events, but it is the base URL (such as "
                     "https://s2s.mparticle.com): tributary appends /v2/bulkevents itself");
}
END_TEST

/* a URL of n characters: https://s2s.mparticle.com/ and a path of x's */
static const char *url_conf(const char *name, size_t n)
{
    static char text[MPARTICLE_URL_MAX + 256];
    char url[MPARTICLE_URL_MAX + 16];
    const char *base = "https://s2s.mparticle.com/";
    size_t bl = strlen(base);
    ck_assert_uint_lt(n, sizeof url);
    memcpy(url, base, bl);
    memset(url + bl, 'x', n - bl);
    url[n] = '\0';
    snprintf(text, sizeof text, "return { feeds = { android = { url = \"%s\" } } }\n", url);
    return conf(name, text);
}

START_TEST(test_a_url_over_the_length_taken_is_refused)
{
    /* the sender appends its path into a buffer of this bound: a longer URL
     * would lose it and be answered 404 forever */
    struct config *c = NULL;
    char err[4096] = "";
    const char *path = url_conf("url-max.lua", MPARTICLE_URL_MAX);
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), 0);
    ck_assert_uint_eq(strlen(config_feed_url(c, FEED_ANDROID)), MPARTICLE_URL_MAX);
    config_unref(c);
    c = NULL;
    path = url_conf("url-long.lua", MPARTICLE_URL_MAX + 1);
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1, "feeds.android.url: longer than 1024 characters");
}
END_TEST

START_TEST(test_loopback_url_ending_in_the_bulk_path_and_a_slash_is_refused)
{
    const char *path =
        conf("loopback-bulk-path.lua", "return { mparticle = { url = "
                                       "\"http://127.0.0.1:9/v2/bulkevents/\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_int_eq(config_load(&c, path, err, sizeof err), -1);
    ck_assert_err_at(err, path, 1,
                     "mparticle.url: ends in /v2/bulkevents, but it is the base URL (such as "
                     "https://s2s.mparticle.com): tributary appends /v2/bulkevents itself");
}
END_TEST

START_TEST(test_base_url_with_a_path_of_its_own_is_accepted)
{
    /* an egress proxy may serve mParticle under a path prefix */
    const char *path = conf("prefix.lua", "return { mparticle = { url = "
                                          "\"http://127.0.0.1:9/mparticle/v2/\" } }\n");
    struct config *c = NULL;
    char err[4096] = "";
    ck_assert_msg(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    ck_assert_str_eq(c->mparticle_url, "http://127.0.0.1:9/mparticle/v2/");
    config_unref(c);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_unchecked_fixture(tc, make_root, remove_root);
    tcase_add_checked_fixture(tc, enter_root, leave_root);

    tcase_add_test(tc, test_defaults_without_file_or_environment);
    tcase_add_test(tc, test_null_path_reads_tributary_conf_lua_in_current_directory);
    tcase_add_test(tc, test_a_min_free_mb_under_the_wals_room_is_a_warning);

    tcase_add_test(tc, test_file_values_are_read_from_nested_sections);
    tcase_add_test(tc, test_file_lists_are_read_in_order);
    tcase_add_test(tc, test_workspaces_take_the_listed_names_or_any_name);
    tcase_add_test(tc, test_a_string_value_with_a_nul_byte_is_refused);
    tcase_add_test(tc, test_file_apps_table_maps_app_id_to_feed);
    tcase_add_test(tc, test_os_getenv_is_available_in_config_file);
    tcase_add_test(tc, test_a_list_item_an_unset_variable_left_nil_is_named_as_such);

    tcase_add_test(tc, test_environment_integer_overrides_file);
    tcase_add_test(tc,
                   test_environment_integers_are_read_without_blanks_and_a_refused_one_is_shown);
    tcase_add_test(tc, test_environment_words_are_read_without_blanks_and_a_refused_one_is_shown);
    tcase_add_test(tc, test_environment_token_list_is_split_on_commas_and_trimmed);
    tcase_add_test(tc, test_environment_feed_credentials_override_file);
    tcase_add_test(tc, test_a_key_given_twice_in_one_table_is_an_error_naming_both_lines);
    tcase_add_test(
        tc, test_names_in_comments_strings_functions_and_other_tables_are_not_keys_given_twice);
    tcase_add_test(tc, test_a_key_name_with_a_dot_or_a_nul_byte_is_refused_naming_it);
    tcase_add_test(tc, test_an_unknown_environment_variable_is_an_error_naming_the_nearest_key);
    tcase_add_test(tc, test_tributary_apps_is_refused_as_a_key_set_only_in_the_file);
    tcase_add_test(tc, test_an_environment_variable_the_file_reads_is_not_unknown);
    tcase_add_test(tc, test_kubernetes_service_links_are_not_unknown_variables);
    tcase_add_test(tc, test_empty_environment_data_dir_is_an_error_not_a_crash);

    tcase_add_test(tc, test_unknown_key_names_file_and_line);
    tcase_add_test(tc, test_a_runtime_error_in_a_library_function_names_file_and_line);
    tcase_add_loop_test(tc, test_an_empty_optional_path_or_url_in_the_file_is_refused, 0,
                        (int)ARRAY_LEN(EMPTY_OPTIONAL_KEYS));
    tcase_add_test(tc, test_wrong_type_names_key_and_line);
    tcase_add_test(tc, test_wrong_type_names_line_of_its_own_section_not_an_earlier_same_name);
    tcase_add_test(tc, test_wrong_type_names_its_line_not_a_comment_or_string_that_looks_like_it);
    tcase_add_test(tc, test_out_of_range_integer_is_refused_with_its_bounds);
    tcase_add_test(tc, test_integer_at_its_upper_bound_is_accepted);
    tcase_add_test(tc, test_retry_failing_s_is_bounded_and_defaults_to_an_hour);
    tcase_add_test(tc, test_bad_enum_value_is_refused_with_the_choices);
    tcase_add_test(tc, test_retry_base_above_max_is_refused);
    tcase_add_test(tc, test_limits_between_two_keys_hold_at_their_edges);
    tcase_add_test(tc,
                   test_errors_after_loading_name_the_file_and_line_or_the_variable_of_the_values);

    tcase_add_test(tc, test_wrong_type_secret_does_not_echo_key_or_secret);
    tcase_add_test(tc, test_key_without_secret_is_refused_without_echoing_key);
    tcase_add_test(tc, test_a_feed_secret_over_256_characters_is_refused_without_echoing_it);
    tcase_add_test(tc, test_a_feed_credential_with_a_blank_or_a_colon_in_the_key_is_refused);
    tcase_add_test(tc, test_secret_without_key_from_environment_is_refused_without_echoing_secret);
    tcase_add_test(tc, test_syntax_error_in_unfinished_secret_string_does_not_echo_secret);

    tcase_add_test(tc, test_lua_syntax_error_names_file_and_line);
    tcase_add_test(tc, test_file_that_does_not_return_a_table_is_refused);
    tcase_add_test(tc, test_missing_file_is_an_error_naming_it);
    tcase_add_test(tc, test_endless_loop_in_file_hits_instruction_limit);

    tcase_add_test(tc, test_non_loopback_listen_without_tokens_is_refused);
    tcase_add_test(tc, test_non_loopback_listen_with_a_token_is_accepted);
    tcase_add_test(tc, test_tokens_with_a_space_or_control_character_are_refused);
    tcase_add_test(tc, test_listen_addr_parses_bracketed_ipv6);
    tcase_add_test(tc, test_listen_addr_parses_ipv4);
    tcase_add_test(tc, test_listen_addr_rejects_host_without_port);

    tcase_add_test(tc, test_https_url_is_accepted);
    tcase_add_test(tc, test_plain_http_to_loopback_is_accepted);
    tcase_add_test(tc, test_plain_http_to_remote_host_is_refused);
    tcase_add_test(tc, test_plain_http_to_dns_name_starting_with_127_is_refused);
    tcase_add_test(tc, test_plain_http_with_loopback_userinfo_is_refused);
    tcase_add_test(tc, test_plain_http_feed_url_to_remote_host_is_refused);
    tcase_add_test(tc, test_mparticle_url_ending_in_the_bulk_path_is_refused_as_not_a_base_url);
    tcase_add_test(
        tc, test_feed_url_ending_in_the_events_path_and_a_slash_is_refused_as_not_a_base_url);
    tcase_add_test(tc, test_a_url_over_the_length_taken_is_refused);
    tcase_add_test(tc, test_a_variable_the_file_reads_and_that_is_not_set_is_a_warning);
    tcase_add_test(tc, test_a_body_memory_without_room_for_trusted_signed_bodies_is_a_warning);
    tcase_add_test(tc, test_loopback_url_ending_in_the_bulk_path_and_a_slash_is_refused);
    tcase_add_test(tc, test_base_url_with_a_path_of_its_own_is_accepted);
    tcase_add_test(tc, test_a_ca_bundle_that_cannot_be_read_is_refused);
    tcase_add_test(tc, test_trusted_proxies_must_be_ip_addresses_or_networks);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
