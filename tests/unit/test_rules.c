/*
 * rules: request validation, the shipped default mapping, the rule contract
 * (errors, invalid outputs, limits), the sandbox, and rule self-tests.
 *
 * Every test builds an engine from rule files written into a fresh directory
 * (TRIBUTARY_RULES_DIR), with that directory as the working directory so that
 * no ./tributary.conf.lua is picked up. Calls that would hang if a limit did
 * not hold run in a child process under a deadline (bounded_run), so a hang
 * fails one test instead of stalling the suite, even under CK_FORK=no.
 */
#include "unit.h"

#include "attributes.h"
#include "config.h"
#include "metrics.h"
#include "mparticle.h"
#include "record.h"
#include "rules.h"
#include "sandbox.h"

#include <dirent.h>
#include <errno.h>
#include <lauxlib.h>
#include <lua-cjson.h>
#include <lualib.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>

/* ---- fixture ------------------------------------------------------------ */

/* The shipped default mapping, read once in main() (rules/10-mparticle.lua). */
static char *default_rules_src;

static struct {
    char root[64];
    char rules_dir[128];
    struct config *cfg;
    ruleset *rs;
    rules *r;
    struct mapping m;
    struct input_error ie;
    buf report;   /* of self_test */
    buf warnings; /* of self_test */
    int ntests;
} F;

static void setup(void)
{
    memset(&F, 0, sizeof F);
    unit_tmpdir(F.root, sizeof F.root);
    snprintf(F.rules_dir, sizeof F.rules_dir, "%s/rules", F.root);
    ck_assert_int_eq(mkdir(F.rules_dir, 0700), 0);
    ck_assert_int_eq(chdir(F.root), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_DIR", F.rules_dir, 1), 0);
    /* Under CK_FORK=no, settings of an earlier test must not leak in. */
    unsetenv("TRIBUTARY_INBOUND_MAX_EVENTS");
    unsetenv("TRIBUTARY_RULES_INSTRUCTIONS");
    unsetenv("TRIBUTARY_RULES_MEMORY_MB");
    unsetenv("TRIBUTARY_EVENTS");
    mapping_init(&F.m);
    F.m.keep_outcomes = 1;
}

/* Frees the engine, ruleset, configuration and mapping. */
static void release(void)
{
    rules_free(F.r);
    ruleset_unref(F.rs);
    config_unref(F.cfg);
    mapping_free(&F.m);
    buf_free(&F.report);
    buf_free(&F.warnings);
    F.r = NULL;
    F.rs = NULL;
    F.cfg = NULL;
}

static void teardown(void)
{
    release();
    ck_assert_int_eq(chdir("/"), 0);
    unit_rmdir(F.root);
}

/* Writes one rule file into the rules directory. */
static void rule(const char *name, const char *src)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", F.rules_dir, name);
    unit_write(path, src);
}

static void default_rules(void)
{
    ck_assert_msg(default_rules_src != NULL, "rules/10-mparticle.lua not found");
    rule("10-mparticle.lua", default_rules_src);
}

/* Loads the configuration and the rule files, without building an engine. */
static void prepare(void)
{
    char err[ERR_LEN] = "";
    ck_assert_msg(config_load(&F.cfg, NULL, err, sizeof err) == 0, "config_load: %s", err);
    ck_assert_msg(ruleset_load(&F.rs, F.cfg, err, sizeof err) == 0, "ruleset_load: %s", err);
}

static void build(void)
{
    char err[ERR_LEN] = "";
    prepare();
    ck_assert_msg(rules_new(&F.r, F.rs, err, sizeof err) == 0, "rules_new: %s", err);
}

static int map(const char *body, enum input_shape shape)
{
    return rules_map(F.r, body, strlen(body), shape, STR_NULL, &F.m, &F.ie);
}

static int contains(const char *hay, const char *needle)
{
    return hay != NULL && strstr(hay, needle) != NULL;
}

/* Runs the rule files' own tests: the failures, with the tests run in
 * F.ntests, the report in F.report and the warnings in F.warnings ("" when
 * there is none). */
static int self_test(void)
{
    buf_free(&F.report);
    buf_init(&F.report, 1 << 16);
    buf_free(&F.warnings);
    buf_init(&F.warnings, 1 << 16);
    F.ntests = 0;
    int failures = rules_self_test(F.r, &F.report, &F.warnings, &F.ntests);
    if (!F.report.data)
        ck_assert_int_eq(buf_adds(&F.report, ""), 0);
    if (!F.warnings.data)
        ck_assert_int_eq(buf_adds(&F.warnings, ""), 0);
    return failures;
}

/* A rule that maps every event to the unbound feed. */
#define PASS_RULE                                                                                  \
    "return function(event, out)\n"                                                                \
    "  return {feed = \"unbound\", batch = {},\n"                                                  \
    "          event = {event_type = \"uninstall\", data = {}, id = event.id}}\n"                  \
    "end\n"

/* One valid Braze event with the given id. */
#define EV(id)                                                                                     \
    "{\"event_type\":\"users.messages.email.Send\",\"id\":\"" id "\",\"time\":1732800000,"         \
    "\"user\":{\"external_user_id\":\"c-1\"}}"

#define ENVELOPE(events) "{\"events\":[" events "]}"

#define PUSH_ID "a1b2c3d4-0000-4000-8000-000000000001"

#define PUSH_SEND_IOS                                                                              \
    ENVELOPE("{\"event_type\":\"users.messages.pushnotification.Send\",\"id\":\"" PUSH_ID "\","    \
             "\"time\":1732800000,"                                                                \
             "\"user\":{\"user_id\":\"5f8a9b0c1d2e3f4a5b6c7d8e\","                                 \
             "\"external_user_id\":\"customer-1234\",\"device_id\":\"2E3C1F4A\"},"                 \
             "\"properties\":{\"platform\":\"ios\",\"campaign_name\":\"Winter sale\"}}")

/* ---- calls under a deadline --------------------------------------------- */

/* What a call in a child process reported back. */
struct bounded {
    int finished; /* the child reported before the deadline */
    long ms;      /* how long the call took */
    int rc;
    int status; /* input_error.status */
    size_t nrecords, ndead;
    char reason[32];      /* the first dead letter's reason */
    char detail[ERR_LEN]; /* its detail */
    char err[ERR_LEN];    /* rules_new's message */
    int rebuild;          /* rules_needs_rebuild afterwards */
};

static const char *bounded_body;

static void child_map(struct bounded *res)
{
    res->rc = map(bounded_body, INPUT_ENVELOPE);
    res->status = F.ie.status;
    res->nrecords = F.m.nrecords;
    res->ndead = F.m.ndead;
    if (F.m.ndead > 0) {
        str_copy(res->reason, sizeof res->reason, F.m.dead[0].reason);
        str_copy(res->detail, sizeof res->detail, F.m.dead[0].detail.p);
    }
    res->rebuild = rules_needs_rebuild(F.r) != NULL;
}

static void child_rules_new(struct bounded *res)
{
    rules *r = NULL;
    res->rc = rules_new(&r, F.rs, res->err, sizeof res->err);
    rules_free(r);
}

/* Runs fn in a child process; res->finished stays 0 when it did not report
 * within deadline_ms (the child is then killed). */
static void bounded_run(void (*fn)(struct bounded *), long deadline_ms, struct bounded *res)
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        struct bounded r;
        memset(&r, 0, sizeof r);
        int64_t t0 = clock_mono_ms();
        fn(&r);
        r.ms = (long)(clock_mono_ms() - t0);
        r.finished = 1;
        release(); /* so that valgrind sees nothing held at _exit */
        ssize_t w = write(fds[1], &r, sizeof r);
        _exit(w == (ssize_t)sizeof r ? 0 : 1);
    }
    close(fds[1]);
    memset(res, 0, sizeof *res);
    int64_t deadline = clock_mono_ms() + deadline_ms;
    int ready = 0;
    for (;;) {
        int64_t left = deadline - clock_mono_ms();
        struct pollfd p = {fds[0], POLLIN, 0};
        ready = poll(&p, 1, left > 0 ? (int)left : 0);
        if (ready >= 0 || errno != EINTR)
            break;
    }
    if (ready > 0) {
        ssize_t n = read(fds[0], res, sizeof *res);
        if (n != (ssize_t)sizeof *res)
            memset(res, 0, sizeof *res);
    }
    if (!res->finished)
        kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(fds[0]);
}

/* Maps body with the built engine under a deadline. */
static void map_bounded(const char *body, long deadline_ms, struct bounded *res)
{
    bounded_body = body;
    bounded_run(child_map, deadline_ms, res);
}

/* Builds the engine, maps one event under a deadline and expects it in the
 * dead-letter store with reason rule_limit; returns its detail. */
static const char *one_event_dead_within(long deadline_ms, const char *reason, struct bounded *res)
{
    build();
    map_bounded(ENVELOPE(EV("l-1")), deadline_ms, res);
    ck_assert_msg(res->finished, "rules_map did not return within %ld ms", deadline_ms);
    ck_assert_int_eq(res->rc, 0);
    ck_assert_uint_eq(res->nrecords, 0);
    ck_assert_uint_eq(res->ndead, 1);
    ck_assert_str_eq(res->reason, reason);
    return res->detail;
}

static const char *one_event_hits_a_limit(long deadline_ms, struct bounded *res)
{
    return one_event_dead_within(deadline_ms, DEAD_RULE_LIMIT, res);
}

/* The rule file `name` must end its event at the time limit, within a minute
 * (valgrind included); returns the detail. */
static const char *one_event_meets_the_time_limit(const char *name, const char *src)
{
    static struct bounded res;
    rule(name, src);
    const char *detail = one_event_hits_a_limit(60000, &res);
    ck_assert_msg(contains(detail, "time limit exceeded"), "detail: %s", detail);
    return detail;
}

/* ---- probes ------------------------------------------------------------- */

/* Builds an engine whose only rule drops every event with tostring(expr) as the
 * reason, maps one event, and returns what the rule saw: the string, or
 * "dead:<reason>:<detail>" when the rule failed. */
static const char *probe(const char *expr)
{
    static char seen[ERR_LEN + 64];
    char src[1024];
    snprintf(src, sizeof src, "return function(event, out)\n  return false, tostring(%s)\nend\n",
             expr);
    release(); /* what an earlier probe of the test built and mapped */
    mapping_init(&F.m);
    F.m.keep_outcomes = 1;
    rule("50-probe.lua", src);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("p-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.noutcomes, 1);
    const struct outcome *o = &F.m.outcomes[0];
    if (o->kind == OUTCOME_DROPPED)
        str_copy(seen, sizeof seen, o->detail.p);
    else if (o->kind == OUTCOME_DEAD)
        snprintf(seen, sizeof seen, "dead:%s:%s", F.m.dead[o->index].reason,
                 F.m.dead[o->index].detail.p);
    else
        str_copy(seen, sizeof seen, "record");
    return seen;
}

/* Builds an engine from one rule file and maps one event; the event must end up
 * as a dead letter, which is returned. */
static const struct dead_letter *dead_from(const char *src)
{
    rule("50-rule.lua", src);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("d-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 1);
    return &F.m.dead[0];
}

/* Maps the body, which must give one record and no dead letter. */
static void maps_to_one_record(const char *body)
{
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    ck_assert_msg(F.m.ndead == 0, "dead letter: %s", F.m.ndead ? F.m.dead[0].detail.p : "");
    ck_assert_uint_eq(F.m.nrecords, 1);
}

/* Like dead_from, and the dead letter must have reason and a detail that
 * says `says`. */
static void dead_as(const char *src, const char *reason, const char *says)
{
    const struct dead_letter *d = dead_from(src);
    ck_assert_str_eq(d->reason, reason);
    ck_assert_msg(contains(d->detail.p, says), "for %s: detail: %s", src, d->detail.p);
}

/* ==== request validation ================================================== */

START_TEST(test_malformed_json_is_refused_with_400)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("{\"events\": [", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_msg(contains(F.ie.reason, "malformed JSON"), "reason: %s", F.ie.reason);
}
END_TEST

/* One event whose properties.subject is the JSON string text. */
#define WITH_SUBJECT(id, text)                                                                     \
    "{\"event_type\":\"users.messages.email.Send\",\"id\":\"" id "\",\"time\":1,"                  \
    "\"user\":{\"external_user_id\":\"c-1\"},\"properties\":{\"subject\":\"" text "\"}}"

START_TEST(test_a_lone_surrogate_escape_becomes_the_replacement_character)
{
    default_rules();
    build();
    /* cut in the middle of an emoji; a whole pair; an escaped backslash before
     * "ud83d", which is text, not an escape */
    const char *cut = WITH_SUBJECT("s-1", "sale \\ud83d!");
    const char *pair = WITH_SUBJECT("s-2", "\\ud83d\\ude00 \\udc00");
    const char *text = WITH_SUBJECT("s-3", "\\\\ud83d");
    char body[1024];
    snprintf(body, sizeof body, "{\"events\":[%s,%s,%s]}", cut, pair, text);
    ck_assert_msg(map(body, INPUT_ENVELOPE) == 0, "%s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 3);
    ck_assert_msg(contains(F.m.records[0].event.p, "\"subject\":\"sale \xef\xbf\xbd!\""), "%s",
                  F.m.records[0].event.p);
    ck_assert_msg(contains(F.m.records[1].event.p, "\"subject\":\"\xf0\x9f\x98\x80 \xef\xbf\xbd\""),
                  "%s", F.m.records[1].event.p);
    ck_assert_msg(contains(F.m.records[2].event.p, "\"subject\":\"\\\\ud83d\""), "%s",
                  F.m.records[2].event.p);
    /* the event is kept as Braze sent it */
    ck_assert_uint_eq(F.m.records[0].raw.n, strlen(cut));
    ck_assert_int_eq(memcmp(F.m.records[0].raw.p, cut, strlen(cut)), 0);
}
END_TEST

/* lua-cjson takes bytes that are not UTF-8 as they come; mParticle would
 * refuse the JSON text that carries them. */
START_TEST(test_bytes_that_are_not_utf8_reach_the_output_as_the_replacement_character)
{
    default_rules();
    build();
    ck_assert_msg(map(ENVELOPE(WITH_SUBJECT("u-1", "b\xc3(\xff")), INPUT_ENVELOPE) == 0, "%s",
                  F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 1);
    ck_assert_msg(contains(F.m.records[0].event.p, "\"subject\":\"b\xef\xbf\xbd(\xef\xbf\xbd\""),
                  "%s", F.m.records[0].event.p);
}
END_TEST

/* 1e400 decodes to infinity, which JSON cannot write: the attribute is left
 * out and counted, and the event goes on. */
START_TEST(test_a_number_json_cannot_write_is_a_dropped_attribute_not_a_dead_event)
{
    default_rules();
    build();
    ck_assert_msg(
        map(ENVELOPE(
                "{\"event_type\":\"users.messages.email.Send\",\"id\":\"n-1\",\"time\":1,"
                "\"user\":{\"external_user_id\":\"c\"},"
                "\"properties\":{\"huge\":1e400,\"tiny\":-1e400,\"list\":[1e400,2],\"ok\":3}}"),
            INPUT_ENVELOPE) == 0,
        "%s", F.ie.reason);
    ck_assert_msg(F.m.ndead == 0, "dead letter: %s", F.m.ndead ? F.m.dead[0].detail.p : "");
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *ev = F.m.records[0].event.p;
    ck_assert_msg(!contains(ev, "huge") && !contains(ev, "tiny"), "%s", ev);
    ck_assert_msg(contains(ev, "\"list\":\"2\"") && contains(ev, "\"ok\":3"), "%s", ev);
}
END_TEST

/* ==== tributary.custom_attributes ========================================= */

/* A rule that checks the helper's results itself and raises on the first
 * difference: the event is then a dead letter naming it. */
#define ATTRIBUTES_CHECK_RULE                                                                      \
    "local ca, null = tributary.custom_attributes, cjson.null\n"                                   \
    "local function eq(got, want, what)\n"                                                         \
    "  if got ~= want then\n"                                                                      \
    "    error(what .. ': expected ' .. tostring(want) .. ', got ' .. tostring(got))\n"            \
    "  end\n"                                                                                      \
    "end\n"                                                                                        \
    "return function(event, out)\n"                                                                \
    "  local a = ca({a = 1, b = 2, c = 3, d = null, e = 5}, nil, 'a', {b = true, e = false},\n"    \
    "               nil, false)\n"                                                                 \
    "  eq(a.a, nil, 'a name skips'); eq(a.b, nil, 'a set skips'); eq(a.c, 3, 'kept')\n"            \
    "  eq(a.d, nil, 'null'); eq(a.e, 5, 'a false value in a set does not skip')\n"                 \
    "  a = ca({x = 'own', y = null}, {x = 'extra', y = 'filled', z = 'new', w = null})\n"          \
    "  eq(a.x, 'own', 'own value wins'); eq(a.y, 'filled', 'null is no value of its own')\n"       \
    "  eq(a.z, 'new', 'extra added'); eq(a.w, nil, 'extra null')\n"                                \
    "  local n300, e300 = ('n'):rep(300), ('\\u{e9}'):rep(300)\n"                                  \
    "  a = ca({[n300] = 1, [e300] = 2, v = ('x'):rep(5000), u = ('\\u{65e5}'):rep(5000),\n"        \
    "          ok = ('\\u{65e5}'):rep(4096), bad = '\\x80' .. ('y'):rep(5000),\n"                  \
    "          inner = ('x'):rep(4095) .. '\\xff' .. ('y'):rep(10),\n"                             \
    "          after = ('\\u{e9}'):rep(5000) .. '\\xff'})\n"                                       \
    "  eq(a[('n'):rep(256)], 1, 'name cut'); eq(a[('\\u{e9}'):rep(256)], 2, 'name cut by "         \
    "chars')\n"                                                                                    \
    "  eq(a.v, ('x'):rep(4096), 'value cut'); eq(a.u, ('\\u{65e5}'):rep(4096), 'by chars')\n"      \
    "  eq(a.ok, ('\\u{65e5}'):rep(4096), 'at the limit')\n"                                        \
    "  eq(a.bad, '\\x80' .. ('y'):rep(4095), 'not UTF-8: bytes')\n"                                \
    "  eq(a.inner, ('x'):rep(4095) .. '\\xff', 'not UTF-8 inside: bytes')\n"                       \
    "  eq(a.after, ('\\u{e9}'):rep(4096), 'not UTF-8 past the cut: characters')\n"                 \
    "  a = ca({l = {'a', 1, 1.5, true, null, {k = 1}}, e = {}, o = {k = 'v'},\n"                   \
    "          inf = math.huge, nl = {math.huge, 2}})\n"                                           \
    "  eq(a.l, 'a,1,1.5,true,{\"k\":1}', 'list'); eq(a.e, '', 'empty table')\n"                    \
    "  eq(a.o, '{\"k\":\"v\"}', 'object'); eq(a.inf, nil, 'infinity'); eq(a.nl, '2', 'in list')\n" \
    "  local p = {}\n"                                                                             \
    "  for i = 1, 120 do p[('k%03d'):format(i)] = i end\n"                                         \
    "  a = ca(p, {a_extra = 'x'}, 'k001')\n"                                                       \
    "  local n = 0\n"                                                                              \
    "  for _ in pairs(a) do n = n + 1 end\n"                                                       \
    "  eq(n, 100, 'at most 100'); eq(a.a_extra, 'x', 'extra sorted in'); eq(a.k001, nil, "         \
    "'skip')\n"                                                                                    \
    "  eq(a.k100, 100, 'first 100 by name'); eq(a.k101, nil, 'past the first 100')\n"              \
    "  return {feed = 'unbound', batch = {}, event = {event_type = 'uninstall', data = {}}}\n"     \
    "end\n"

/* A budget of instructions for tests of what library calls do, not of what
 * they cost: a call is charged its time, and the host's code is slower under
 * AddressSanitizer, which the calibration on Debian's Lua does not see. */
#define LIBRARY_TEST_INSTRUCTIONS "50000000"

START_TEST(test_custom_attributes_keeps_skips_adds_and_cuts_as_documented)
{
    setenv("TRIBUTARY_RULES_INSTRUCTIONS", LIBRARY_TEST_INSTRUCTIONS, 1);
    rule("50-attributes.lua", ATTRIBUTES_CHECK_RULE);
    build();
    maps_to_one_record(ENVELOPE(EV("a-1")));
}
END_TEST

/* The value of tributary_rule_counts_total{name=...}, 0 when absent. */
static unsigned long long rule_count(const char *name)
{
    buf b;
    buf_init(&b, 1u << 20);
    struct metrics_gauges g = {.rules_version = ""};
    ck_assert_int_eq(metrics_render(&b, &g), 0);
    ck_assert_int_eq(buf_addc(&b, '\0'), 0);
    char needle[96];
    snprintf(needle, sizeof needle, "tributary_rule_counts_total{name=\"%s\"} ", name);
    const char *at = strstr(b.data, needle);
    unsigned long long n = at ? strtoull(at + strlen(needle), NULL, 10) : 0;
    buf_free(&b);
    return n;
}

/* Maps one event with the rule file src; *dropped and *cut are what it added
 * to the counts attribute_dropped and attribute_truncated. */
static void map_counting_attributes(const char *src, unsigned long long *dropped,
                                    unsigned long long *cut)
{
    rule("50-attributes.lua", src);
    build();
    unsigned long long dropped0 = rule_count("attribute_dropped");
    unsigned long long cut0 = rule_count("attribute_truncated");
    ck_assert_int_eq(map(ENVELOPE(EV("a-1")), INPUT_ENVELOPE), 0);
    *dropped = rule_count("attribute_dropped") - dropped0;
    *cut = rule_count("attribute_truncated") - cut0;
}

/* What is cut or left out is counted: each cut name or value, and each
 * attribute left out. */
START_TEST(test_custom_attributes_counts_what_it_cuts_and_leaves_out)
{
    unsigned long long dropped, cut;
    map_counting_attributes(
        "return function(event, out)\n"
        "  local p = {inf = math.huge, v = ('x'):rep(5000), [('n'):rep(300)] = ('y'):rep(5000)}\n"
        "  for i = 1, 105 do p[('k%03d'):format(i)] = i end\n"
        "  tributary.custom_attributes(p)\n"
        "  tributary.custom_attributes({inf = -math.huge, v = ('x'):rep(5000),\n"
        "                               [('n'):rep(300)] = ('y'):rep(5000)})\n"
        "  return {feed = 'unbound', batch = {}, event = {event_type = 'uninstall', data = {}}}\n"
        "end\n",
        &dropped, &cut);
    ck_assert_uint_eq(F.m.nrecords, 1);
    /* the first call drops inf, keeps k001..k100 (by name), and leaves out
     * k101..k105, the long name and v: 8; the second drops -inf, cuts v, and
     * the long name and its value */
    ck_assert_uint_eq(dropped, 9);
    ck_assert_uint_eq(cut, 3);
}
END_TEST

/* Maps one event with the rule file src, which returns false and a reason:
 * that reason must be detail, and what it added to the counts
 * attribute_dropped and attribute_truncated dropped and cut. */
static void attributes_outcome_is(const char *src, const char *detail, unsigned long long dropped,
                                  unsigned long long cut)
{
    unsigned long long got_dropped, got_cut;
    map_counting_attributes(src, &got_dropped, &got_cut);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.noutcomes, 1);
    ck_assert_str_eq(F.m.outcomes[0].detail.p, detail);
    ck_assert_uint_eq(got_dropped, dropped);
    ck_assert_uint_eq(got_cut, cut);
}

/* A rule that makes attributes of props (after setup) and says how many it
 * got, the value under name and that of `short`. */
#define KEPT_ONCE_RULE(setup, props, name)                                                         \
    "return function(event, out)\n" setup "  local a = tributary.custom_attributes(" props ")\n"   \
    "  local n = 0\n"                                                                              \
    "  for k in pairs(a) do n = n + 1 end\n"                                                       \
    "  return false, n .. ' ' .. tostring(a[" name "]) .. ' ' .. tostring(a.short)\n"              \
    "end\n"

/* Names cut to mParticle's 256 characters can become one: the first of them
 * by name is kept, the others are left out and counted, whatever the order of
 * the table (two values were lost uncounted, and which one stayed depended on
 * the order). */
START_TEST(test_names_cut_to_the_same_one_keep_the_first_by_name)
{
    attributes_outcome_is(
        KEPT_ONCE_RULE(
            "  local stem = ('\\u{e4}'):rep(256)\n",
            "{[stem .. 'Z'] = 'z', [stem .. 'X'] = 'x', [stem .. 'Y'] = 'y', short = 's'}", "stem"),
        "2 x s", 2, 1);
}
END_TEST

/* A byte that is not UTF-8 is written as U+FFFD, so names that differ only
 * there are one as written: the first of them by their bytes is kept (here
 * one not UTF-8 before the one that is), the others are left out and counted.
 * They went out as the same name up to four times in one JSON object. */
START_TEST(test_names_one_as_written_keep_the_first_by_name)
{
    attributes_outcome_is(
        KEPT_ONCE_RULE("",
                       "{['a\\xff'] = 'ff', ['a\\xfe'] = 'fe', ['a\\xef\\xbf\\xbd'] = 'valid', "
                       "['a\\xc0'] = 'c0', short = 's'}",
                       "'a\\u{fffd}'"),
        "2 c0 s", 3, 0);
}
END_TEST

/* Names and values are cut after 256 and 4,096 characters as the JSON
 * writer writes them, each byte that is not UTF-8 one: a stray byte made the
 * cut count bytes, and cut a value of 3,001 characters to 2,049, and a
 * character in two. */
START_TEST(test_text_with_bytes_not_utf8_is_cut_by_its_characters)
{
    attributes_outcome_is("return function(event, out)\n"
                          "  local e, r = '\\u{e9}', '\\u{fffd}'\n"
                          "  local a = tributary.custom_attributes({\n"
                          "    within = '\\xff' .. e:rep(3000), at = '\\xff' .. e:rep(4095),\n"
                          "    over = 'a' .. ('\\x80'):rep(10) .. e:rep(4090),\n"
                          "    ['\\xff' .. e:rep(255)] = 'name of 256'})\n"
                          "  local got = {}\n"
                          "  got[1] = a.within == '\\xff' .. e:rep(3000)\n"
                          "  got[2] = a.at == '\\xff' .. e:rep(4095)\n"
                          "  got[3] = a.over == 'a' .. ('\\x80'):rep(10) .. e:rep(4085)\n"
                          "  got[4] = a[r .. e:rep(255)] == 'name of 256'\n"
                          "  for i = 1, 4 do got[i] = tostring(got[i]) end\n"
                          "  return false, table.concat(got, ' ')\n"
                          "end\n",
                          "true true true true", 0, 1);
}
END_TEST

/* 31 values of 4,096 characters that take two bytes as JSON text (a two-byte
 * character, and a quote, which is escaped) are each within mParticle's
 * limits, and 254 KB together: the event would have been invalid_output (a
 * batch over 128 KB). Taken in name order, those that fit in ATTRIBUTES_MAX_BYTES as JSON
 * text go out. */
static const char *const TWO_BYTE_CHARACTERS[] = {"\xc3\xa9", "\\\""};

START_TEST(test_attributes_over_100_kb_together_keep_those_that_fit_by_name)
{
    default_rules();
    build();
    const char *ch = TWO_BYTE_CHARACTERS[_i];
    size_t chlen = strlen(ch);
    char *body = malloc(400 * 1024);
    ck_assert_ptr_nonnull(body);
    size_t n = (size_t)sprintf(body, "{\"events\":[{\"event_type\":\"users.messages.email.Send\","
                                     "\"id\":\"big-1\",\"time\":1,"
                                     "\"user\":{\"external_user_id\":\"c\"},\"properties\":{");
    for (int i = 0; i < 31; i++) {
        n += (size_t)sprintf(body + n, "%s\"a%02d\":\"", i ? "," : "", 30 - i);
        for (int c = 0; c < 4096; c++) {
            memcpy(body + n, ch, chlen);
            n += chlen;
        }
        body[n++] = '"';
    }
    /* small ones after them by name still fit */
    strcpy(body + n, ",\"campaign_id\":\"c-1\",\"send_id\":\"s-1\"}}]}");
    unsigned long long dropped = rule_count("attribute_dropped");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    free(body);
    ck_assert_msg(F.m.ndead == 0, "%s", F.m.ndead ? F.m.dead[0].detail.p : "");
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *ev = F.m.records[0].event.p;
    ck_assert_msg(strlen(ev) <= ATTRIBUTES_MAX_BYTES + 1024, "%zu bytes", strlen(ev));
    /* "a00":"...", is 8,201 bytes: a00 to a11 fit, a12 would pass 100 KB, and
     * so would each after it but the two small ones */
    ck_assert_msg(contains(ev, "\"a00\"") && contains(ev, "\"a11\"") && !contains(ev, "\"a12\"") &&
                      !contains(ev, "\"a30\""),
                  "%.200s", ev);
    ck_assert_msg(contains(ev, "\"campaign_id\":\"c-1\"") && contains(ev, "\"send_id\":\"s-1\""),
                  "%s", ev + strlen(ev) - 200);
    ck_assert_uint_eq(rule_count("attribute_dropped") - dropped, 19);
}
END_TEST

/* A property that is an object becomes its JSON text, which an event's own
 * data can keep from being written whole: a number JSON cannot write inside
 * it, or a text that grows past what the writer takes (a C1 character takes 6
 * bytes escaped, and DEL 6 for 1). It is written as far as an attribute keeps
 * (that number as null), and the event goes on: it was a dead letter that a
 * requeue could not mend. */
START_TEST(test_an_object_json_cannot_write_whole_is_an_attribute_not_a_dead_event)
{
    default_rules();
    build();
    static const char head[] = "{\"events\":[{\"event_type\":\"users.messages.email.Send\","
                               "\"id\":\"o-1\",\"time\":1,\"user\":{\"external_user_id\":\"c\"},"
                               "\"properties\":{\"extras\":{\"score\":1e400,\"k\":\"v\"},"
                               "\"big\":{\"body\":\"";
    enum { C1 = 180000, DEL = 200000 };
    char *body = malloc(sizeof head + C1 * 6 + DEL + 64);
    ck_assert_ptr_nonnull(body);
    size_t n = strlen(strcpy(body, head));
    for (int i = 0; i < C1; i++)
        n += (size_t)sprintf(body + n, "\\u0092");
    n += (size_t)sprintf(body + n, "\"},\"list\":[{\"a\":\"");
    memset(body + n, 0x7f, DEL);
    strcpy(body + n + DEL, "\"}]}}]}");
    unsigned long long cut = rule_count("attribute_truncated");
    maps_to_one_record(body);
    free(body);
    const char *ev = F.m.records[0].event.p;
    ck_assert_msg(contains(ev, "\"extras\":\"{\\\"k\\\":\\\"v\\\",\\\"score\\\":null}\""), "%.300s",
                  ev);
    ck_assert_msg(contains(ev, "\"big\":\"{\\\"body\\\":\\\"\\\\u0092"), "%.300s", ev);
    ck_assert_msg(contains(ev, "\"list\":\"{\\\"a\\\":\\\"\\\\u007f"), "%.300s", ev);
    ck_assert_uint_eq(rule_count("attribute_truncated") - cut, 2);
}
END_TEST

/* Such texts are cut where any long text is, at 4,096 characters, whatever
 * the table holds: a string too long to write whole, a list of too many items
 * (written from its first), an object of too many names (not sorted to be
 * cut), characters of four bytes (two UTF-16 units each: `{"e":"` and 2,045
 * of them are 4,096 units, 2,051 characters). The budget is not what is tested: building
 * these tables and five texts of 16 KB takes some 40% of the default one, and
 * all of it under AddressSanitizer on a busy machine. */
START_TEST(test_an_object_too_large_to_write_is_cut_at_4096_characters)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    rule("50-objects.lua",
         "return function(event, out)\n"
         "  local long, many, names = ('\\u{92}'):rep(200000), {}, {}\n"
         "  for i = 1, 20000 do many[i] = i; names['k' .. i] = i end\n"
         "  local a = tributary.custom_attributes({\n"
         "    long = {s = long}, list = {x = many}, names = names,\n"
         "    wide = {e = ('\\u{1F600}'):rep(5000)}, joined = {{s = long}, 'after'}})\n"
         "  local got = {}\n"
         "  for _, k in ipairs({'joined', 'list', 'long', 'names', 'wide'}) do\n"
         "    got[#got + 1] = k .. '=' .. utf8.len(a[k]) .. ':' .. a[k]:sub(1, 3)\n"
         "  end\n"
         "  return false, table.concat(got, ' ')\n"
         "end\n");
    build();
    unsigned long long cut = rule_count("attribute_truncated");
    ck_assert_int_eq(map(ENVELOPE(EV("o-2")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.noutcomes, 1);
    ck_assert_str_eq(F.m.outcomes[0].detail.p,
                     "joined=4096:{\"s list=4096:{\"x long=4096:{\"s names=4096:{\"k "
                     "wide=2051:{\"e");
    ck_assert_uint_eq(rule_count("attribute_truncated") - cut, 5);
}
END_TEST

/* props may be a weak table: the names of more than 100 attributes are held
 * while they are sorted, though the collector takes the entries meanwhile
 * (AddressSanitizer saw a use after free). */
START_TEST(test_custom_attributes_of_a_weak_table_holds_the_names_it_sorts)
{
    rule("50-weak.lua",
         "return function(event, out)\n"
         "  local big = {}\n"
         "  for i = 1, 40000 do big[i] = 'value-value-' .. i end\n"
         "  local extra = {}\n"
         "  for i = 1, 6 do extra['\\1first-by-name-' .. i] = {big} end\n"
         "  local props = setmetatable({}, {__mode = 'v'})\n"
         "  for i = 1, 150 do props[('n'):rep(290) .. ('%09d'):format(i)] = {} end\n"
         "  local a = tributary.custom_attributes(props, extra)\n"
         "  return {feed = 'unbound', batch = {}, event = {event_type = 'uninstall', data = {}}}\n"
         "end\n");
    build();
    maps_to_one_record(ENVELOPE(EV("w-1")));
}
END_TEST

/* 3,000 properties, each a list of 100 tables of some 30 KB as JSON: joining
 * each list whole (3 MB) to keep 4,096 characters, and trying every name
 * after the 100 KB were full, took 32 s in one call. */
START_TEST(test_custom_attributes_of_large_lists_stops_at_what_it_keeps)
{
    rule("50-lists.lua",
         "return function(event, out)\n"
         "  local item = {}\n"
         "  for i = 1, 2000 do item['k' .. i] = i end\n"
         "  local list = {}\n"
         "  for i = 1, 100 do list[i] = item end\n"
         "  local props = {}\n"
         "  for i = 1, 3000 do props['p' .. i] = list end\n"
         "  local a = tributary.custom_attributes(props)\n"
         "  return {feed = 'unbound', batch = {},\n"
         "          event = {event_type = 'custom_event', data = {event_name = 'E',\n"
         "                   custom_event_type = 'other', custom_attributes = a}}}\n"
         "end\n");
    build();
    struct bounded res;
    map_bounded(ENVELOPE(EV("l-1")), 20000, &res);
    ck_assert_msg(res.finished, "rules_map did not return within 20 s");
    ck_assert_uint_eq(res.ndead, 0);
    ck_assert_uint_eq(res.nrecords, 1);
}
END_TEST

/* A misuse is the rule's error: the event is a dead letter that says why. */
static const struct {
    const char *call, *says;
} ATTRIBUTE_MISUSES[] = {
    {"tributary.custom_attributes({[1] = 'x'})", "property names must be strings"},
    {"tributary.custom_attributes({}, {[1] = 'x'})", "names in extra must be strings"},
    {"tributary.custom_attributes({a = 1}, nil, 7)", "a name, a set of names, nil or false"},
    {"tributary.custom_attributes('x')", "table expected"},
    {"tributary.custom_attributes({a = {print}})", "cannot encode a function"},
};

START_TEST(test_custom_attributes_misused_is_a_rule_error_that_says_why)
{
    char src[512];
    snprintf(src, sizeof src, "return function(event, out)\n  %s\nend\n",
             ATTRIBUTE_MISUSES[_i].call);
    dead_as(src, DEAD_RULE_ERROR, ATTRIBUTE_MISUSES[_i].says);
}
END_TEST

/* When the body's events cannot be found as bytes (an escaped key), each is
 * written from its table: before the rules run, which may change it, so that
 * a dead letter keeps the event as received and can be run again. */
START_TEST(test_a_dead_letter_keeps_the_event_as_received_when_its_bytes_are_not_found)
{
    rule("50-rule.lua", "return function(event, out)\n"
                        "  event.properties = nil\n"
                        "  error('boom')\n"
                        "end\n");
    build();
    ck_assert_int_eq(map("{\"\\u0065vents\":[{\"event_type\":\"users.messages.email.Send\","
                         "\"id\":\"k-1\",\"time\":1,\"user\":{\"external_user_id\":\"c\"},"
                         "\"properties\":{\"keep\":\"me\"}}]}",
                         INPUT_ENVELOPE),
                     0);
    ck_assert_uint_eq(F.m.ndead, 1);
    const str *raw = &F.m.dead[0].raw;
    static const char keep[] = "\"keep\":\"me\"";
    ck_assert_msg(memmem(raw->p, raw->n, keep, sizeof keep - 1) != NULL, "%.*s", (int)raw->n,
                  raw->p);
}
END_TEST

/* Its milliseconds must be exact in a double: from 0 to 2^53 ms. */
START_TEST(test_a_time_outside_what_milliseconds_can_hold_is_refused)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    static const char *const times[] = {"1e300", "-1", "9007199254741", "1e400"};
    for (size_t i = 0; i < ARRAY_LEN(times); i++) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"events\":[{\"event_type\":\"x\",\"id\":\"t\",\"time\":%s}]}", times[i]);
        ck_assert_int_eq(map(body, INPUT_ENVELOPE), -1);
        ck_assert_int_eq(F.ie.status, 400);
        ck_assert_msg(contains(F.ie.reason, "time must be UNIX seconds from 0 to 9007199254740"),
                      "%s: %s", times[i], F.ie.reason);
    }
    ck_assert_int_eq(
        map("{\"events\":[{\"event_type\":\"x\",\"id\":\"t\",\"time\":9007199254740}]}",
            INPUT_ENVELOPE),
        0);
}
END_TEST

START_TEST(test_malformed_json_with_a_lone_surrogate_is_still_refused)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("{\"events\": [\"\\ud800\"", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    /* the reason is the one the text as sent got */
    ck_assert_msg(contains(F.ie.reason, "malformed JSON") && contains(F.ie.reason, "unicode"),
                  "reason: %s", F.ie.reason);
}
END_TEST

/* cjson reads every JSON number as a float; what reaches mParticle is the
 * number as sent. */
START_TEST(test_numbers_keep_their_value_and_whole_numbers_stay_integers)
{
    default_rules();
    build();
    const char *body =
        ENVELOPE("{\"event_type\":\"users.messages.email.Send\",\"id\":\"n-1\",\"time\":1,"
                 "\"user\":{\"external_user_id\":12345},"
                 "\"properties\":{\"ids\":[1,2,2.5,0.1],\"at\":1700000000123,\"big\":1e14,"
                 "\"pi\":3.141592653589793,\"tenth\":0.1,\"neg\":-7}}");
    ck_assert_msg(map(body, INPUT_ENVELOPE) == 0, "%s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *ev = F.m.records[0].event.p;
    const char *want[] = {"\"ids\":\"1,2,2.5,0.1\"", "\"at\":1700000000123",
                          "\"big\":100000000000000", "\"pi\":3.141592653589793",
                          "\"tenth\":0.1",           "\"neg\":-7"};
    for (size_t i = 0; i < ARRAY_LEN(want); i++)
        ck_assert_msg(contains(ev, want[i]), "%s not in %s", want[i], ev);
    ck_assert_msg(contains(F.m.records[0].batch.p, "\"customer_id\"\t\"12345\""), "%s",
                  F.m.records[0].batch.p);
    ck_assert_msg(strncmp(F.m.records[0].user.p, "12345\x1f", 6) == 0, "%s", F.m.records[0].user.p);
}
END_TEST

/* absent and null are the same: a null properties.device_id leaves the user's */
START_TEST(test_a_null_device_id_property_keeps_the_users_device_id)
{
    default_rules();
    build();
    const char *body =
        ENVELOPE("{\"event_type\":\"users.messages.email.Send\",\"id\":\"d-1\",\"time\":1,"
                 "\"user\":{\"external_user_id\":\"c-1\",\"device_id\":\"DEV-1\"},"
                 "\"properties\":{\"device_id\":null}}");
    ck_assert_msg(map(body, INPUT_ENVELOPE) == 0, "%s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 1);
    ck_assert_msg(contains(F.m.records[0].event.p, "\"device_id\":\"DEV-1\""), "%s",
                  F.m.records[0].event.p);
}
END_TEST

START_TEST(test_a_json_array_is_not_an_envelope)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("[" EV("a-1") "]", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_uint_eq(F.m.nrecords, 0);
}
END_TEST

START_TEST(test_an_object_without_events_is_not_an_envelope)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("{\"foo\":1}", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
}
END_TEST

/* A rule whose output holds its event data only through a weak table: the
 * data the check saw is what is written, whenever the collector runs (each
 * event waits for a collection, then allocates up to just before the next, so
 * that one falls between the check and the writing). Once with the Braze id
 * written in by the host, once with the rule's own. */
#define WEAK_OUTPUT_RULE(message_id)                                                               \
    "local sentinel\n"                                                                             \
    "local function arm() sentinel = setmetatable({}, {__mode = 'v'}); sentinel[1] = {} end\n"     \
    "arm()\n"                                                                                      \
    "local seed = 0\n"                                                                             \
    "return function(event, out)\n"                                                                \
    "  while sentinel[1] ~= nil do local t = {} end\n"                                             \
    "  arm()\n"                                                                                    \
    "  local m = 0\n"                                                                              \
    "  while sentinel[1] ~= nil do local t = {} m = m + 1 end\n"                                   \
    "  arm()\n"                                                                                    \
    "  seed = (seed * 1103515245 + 12345) % 2147483648\n"                                          \
    "  for i = 1, m - (4 + seed % 12) do local t = {} end\n"                                       \
    "  local ev = setmetatable({event_type = 'custom_event'}, {__mode = 'v'})\n"                   \
    "  ev.data = {event_name = 'x', custom_event_type = 'other'" message_id "}\n"                  \
    "  return {feed = 'web', event = ev, batch = {}}\n"                                            \
    "end\n"

START_TEST(test_an_output_held_in_a_weak_table_is_written_as_it_was_checked)
{
    static const char *const rules_src[] = {WEAK_OUTPUT_RULE(""),
                                            WEAK_OUTPUT_RULE(", source_message_id = 'm'")};
    rule("10-weak.lua", rules_src[_i]);
    build();
    enum { EVENTS = 150 };
    buf body;
    buf_init(&body, 1 << 20);
    ck_assert_int_eq(buf_printf(&body, "{\"events\":["), 0);
    for (int i = 0; i < EVENTS; i++)
        ck_assert_int_eq(buf_printf(&body,
                                    "%s{\"event_type\":\"users.messages.email.Send\",\"id\":"
                                    "\"w-%d\",\"time\":1732800000}",
                                    i ? "," : "", i),
                         0);
    ck_assert_int_eq(buf_printf(&body, "]}"), 0);
    ck_assert_int_eq(rules_map(F.r, body.data, body.len, INPUT_ENVELOPE, STR_NULL, &F.m, &F.ie), 0);
    buf_free(&body);
    /* gone before the check: a dead letter, as any output without data */
    ck_assert_uint_eq(F.m.nrecords + F.m.ndead, EVENTS);
    ck_assert_uint_gt(F.m.nrecords, 0);
    for (size_t i = 0; i < F.m.ndead; i++)
        ck_assert_msg(strcmp(F.m.dead[i].reason, DEAD_INVALID_OUTPUT) == 0 &&
                          contains(F.m.dead[i].detail.p, "out.event.data must be a table"),
                      "%s: %s", F.m.dead[i].reason, F.m.dead[i].detail.p);
    for (size_t i = 0; i < F.m.nrecords; i++)
        ck_assert_msg(contains(F.m.records[i].event.p, "\"data\":{") &&
                          contains(F.m.records[i].event.p, "\"event_name\":\"x\""),
                      "event %zu: %s", i, F.m.records[i].event.p);
}
END_TEST

START_TEST(test_events_that_is_an_object_is_refused)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("{\"events\":{\"a\":" EV("a-1") "}}", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_msg(contains(F.ie.reason, "\"events\" must be a list"), "reason: %s", F.ie.reason);
    /* an empty object too, which cjson decodes as it decodes [] */
    ck_assert_int_eq(map("{\"events\": {} }", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_msg(contains(F.ie.reason, "\"events\" must be a list"), "reason: %s", F.ie.reason);
    ck_assert_int_eq(map("{\"events\": [ ] }", INPUT_ENVELOPE), 0);
}
END_TEST

/* cjson keeps the last "events" list: the events of the others would be
 * answered 200 and lost. Also when the lists differ in length, or the last is
 * empty. */
START_TEST(test_events_given_twice_is_refused)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    static const char *const bodies[] = {
        "{\"events\":[" EV("a-1") "],\"events\":[" EV("a-2") "]}",
        "{\"events\":[" EV("a-1") "," EV("a-3") "],\"n\":1,\"events\":[" EV("a-2") "]}",
        "{\"events\":[" EV("a-1") "],\"events\":[]}",
        /* escapes spell the same key for cjson, and one elsewhere changes nothing */
        "{\"events\":[" EV("a-1") "],\"event\\u0073\":[" EV("a-2") "]}",
        "{\"x\\n\":1,\"events\":[" EV("a-1") "],\"events\":[" EV("a-2") "]}",
    };
    for (size_t i = 0; i < ARRAY_LEN(bodies); i++) {
        ck_assert_int_eq(map(bodies[i], INPUT_ENVELOPE), -1);
        ck_assert_int_eq(F.ie.status, 400);
        ck_assert_str_eq(F.ie.reason, "\"events\" is given more than once");
        ck_assert_uint_eq(F.m.nrecords, 0);
    }
    /* keys that only look like it: "eve<LF>ts", "Events" */
    ck_assert_int_eq(map("{\"eve\\nts\":[" EV("a-1") "],\"Events\":[],\"events\":[" EV("a-2") "]}",
                         INPUT_ENVELOPE),
                     0);
    ck_assert_uint_eq(F.m.nrecords, 1);
}
END_TEST

START_TEST(test_events_that_is_a_number_is_refused)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("{\"events\":5}", INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
}
END_TEST

START_TEST(test_event_without_event_type_is_refused_naming_its_index)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    const char *body = ENVELOPE(EV("a-1") ",{\"id\":\"a-2\",\"time\":1}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_int_eq(F.ie.index, 1);
    ck_assert_msg(contains(F.ie.reason, "missing event_type"), "reason: %s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.nevents, 0);
}
END_TEST

START_TEST(test_event_without_id_is_refused_naming_its_index)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    const char *body = ENVELOPE(EV("a-1") "," EV("a-2") ",{\"event_type\":\"x\",\"time\":1}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_int_eq(F.ie.index, 2);
    ck_assert_msg(contains(F.ie.reason, "missing id"), "reason: %s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 0);
}
END_TEST

START_TEST(test_event_without_time_is_refused_naming_its_index)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    const char *body = ENVELOPE("{\"event_type\":\"x\",\"id\":\"a-0\"}," EV("a-1"));
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_int_eq(F.ie.index, 0);
    ck_assert_msg(contains(F.ie.reason, "missing time"), "reason: %s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 0);
}
END_TEST

START_TEST(test_time_as_a_string_is_refused)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    const char *body =
        ENVELOPE(EV("a-1") ",{\"event_type\":\"x\",\"id\":\"a-2\",\"time\":\"1732800000\"}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
    ck_assert_int_eq(F.ie.index, 1);
    ck_assert_msg(contains(F.ie.reason, "time must be a number"), "reason: %s", F.ie.reason);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 0);
}
END_TEST

START_TEST(test_empty_body_is_a_no_op)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(rules_map(F.r, "", 0, INPUT_ENVELOPE, STR_NULL, &F.m, &F.ie), 0);
    ck_assert_uint_eq(F.m.nevents, 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_int_eq(F.ie.status, 0);
}
END_TEST

START_TEST(test_empty_event_list_is_a_no_op)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("{\"events\":[]}", INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nevents, 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
}
END_TEST

START_TEST(test_max_events_is_accepted)
{
    ck_assert_int_eq(setenv("TRIBUTARY_INBOUND_MAX_EVENTS", "2", 1), 0);
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("a-1") "," EV("a-2")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 2);
}
END_TEST

START_TEST(test_one_event_over_max_events_is_413)
{
    ck_assert_int_eq(setenv("TRIBUTARY_INBOUND_MAX_EVENTS", "2", 1), 0);
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("a-1") "," EV("a-2") "," EV("a-3")), INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 413);
    ck_assert_uint_eq(F.m.nrecords, 0);
}
END_TEST

START_TEST(test_unknown_fields_are_accepted)
{
    default_rules();
    build();
    const char *body =
        ENVELOPE("{\"event_type\":\"users.messages.email.Send\",\"id\":\"u-1\",\"time\":1,"
                 "\"brand_new_top_level\":{\"x\":[1,2]},"
                 "\"user\":{\"external_user_id\":\"c-1\",\"brand_new_user_field\":true},"
                 "\"properties\":{\"brand_new_property\":\"v\"}}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
}
END_TEST

/* The three events below as they appear in the body: strings with escaped
 * quotes, backslashes (one ending a string), brackets and braces. */
#define TRICKY_1                                                                                   \
    "{\"event_type\":\"users.messages.email.Send\",\"id\":\"q-1\",\"time\":1,"                     \
    "\"user\":{\"external_user_id\":\"c-1\"},"                                                     \
    "\"properties\":{\"subject\":\"say \\\"hi\\\" ]},{\",\"path\":\"C:\\\\dir\\\\\"}}"
#define TRICKY_2                                                                                   \
    "{ \"event_type\" : \"users.messages.email.Send\", \"id\" : \"q-2\", \"time\" : 2,"            \
    " \"user\" : { \"external_user_id\" : \"c-\\\\\\\"2\" }, \"properties\" : { \"n\" : [1, {}] "  \
    "} }"
#define TRICKY_3                                                                                   \
    "{\"event_type\":\"users.messages.email.Send\",\"id\":\"q-3\",\"time\":3,"                     \
    "\"user\":{\"external_user_id\":\"\\\\\"}}"

START_TEST(test_records_keep_each_event_exactly_as_received)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    const char *events[] = {TRICKY_1, TRICKY_2, TRICKY_3};
    ck_assert_int_eq(
        map("{\"events\": [ " TRICKY_1 " ,\n" TRICKY_2 "," TRICKY_3 " ]}", INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 3);
    for (size_t i = 0; i < 3; i++) {
        ck_assert_uint_eq(F.m.records[i].raw.n, strlen(events[i]));
        ck_assert_msg(memcmp(F.m.records[i].raw.p, events[i], strlen(events[i])) == 0,
                      "record %zu: %.*s", i, (int)F.m.records[i].raw.n, F.m.records[i].raw.p);
    }
}
END_TEST

/* A 400 would have Braze split the batch and drop each event, which would
 * start with the same mark. */
START_TEST(test_a_body_that_starts_with_a_byte_order_mark_is_mapped)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("\xEF\xBB\xBF" ENVELOPE(EV("bom-1") "," EV("bom-2")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 2);
    ck_assert_uint_eq(F.m.records[1].raw.n, strlen(EV("bom-2")));
    ck_assert(memcmp(F.m.records[1].raw.p, EV("bom-2"), strlen(EV("bom-2"))) == 0);
    mapping_free(&F.m);
    mapping_init(&F.m);
    ck_assert_int_eq(map("\xEF\xBB\xBF", INPUT_ENVELOPE), 0); /* blank */
    ck_assert_uint_eq(F.m.nevents, 0);
    /* a mark anywhere else is no JSON */
    ck_assert_int_eq(map(" \xEF\xBB\xBF" ENVELOPE(EV("bom-3")), INPUT_ENVELOPE), -1);
    ck_assert_int_eq(F.ie.status, 400);
}
END_TEST

START_TEST(test_unknown_event_type_is_counted_as_unsupported_not_refused)
{
    default_rules();
    build();
    const char *body = ENVELOPE("{\"event_type\":\"users.behaviors.BrandNewThing\",\"id\":\"n-1\","
                                "\"time\":1,\"user\":{\"external_user_id\":\"c-1\"}}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nevents, 1);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 0);
    ck_assert_uint_eq(F.m.dropped[DROP_UNSUPPORTED_TYPE], 1);
}
END_TEST

START_TEST(test_any_input_accepts_a_json_array)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map("[" EV("a-1") "," EV("a-2") "]", INPUT_ANY), 0);
    ck_assert_uint_eq(F.m.nevents, 2);
    ck_assert_uint_eq(F.m.nrecords, 2);
}
END_TEST

START_TEST(test_any_input_accepts_a_single_event)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map(EV("a-1"), INPUT_ANY), 0);
    ck_assert_uint_eq(F.m.nevents, 1);
    ck_assert_uint_eq(F.m.nrecords, 1);
}
END_TEST

/* A dead letter's or a held record's event is one event as Braze sent it:
 * an "events" field of its own (fields Braze adds are accepted) once made it
 * read as an envelope, and requeue lost the event or queued another. */
#define OWN_EVENTS(events)                                                                         \
    "{\"event_type\":\"users.messages.email.Send\",\"id\":\"own-1\",\"time\":1732800000,"          \
    "\"user\":{\"external_user_id\":\"c-1\"},\"events\":" events "}"

static const char *const OWN_EVENTS_BODIES[] = {
    OWN_EVENTS("[]"),
    OWN_EVENTS("\"x\""),
    OWN_EVENTS("[" EV("inner") "]"),
};

START_TEST(test_one_event_input_is_the_event_whatever_fields_it_has)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    const char *body = OWN_EVENTS_BODIES[_i];
    ck_assert_int_eq(map(body, INPUT_EVENT), 0);
    ck_assert_uint_eq(F.m.nevents, 1);
    ck_assert_uint_eq(F.m.nrecords, 1);
    ck_assert_str_eq(F.m.records[0].event_id.p, "own-1");
    ck_assert_uint_eq(F.m.records[0].raw.n, strlen(body));
}
END_TEST

START_TEST(test_one_event_input_refuses_anything_but_one_event)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    static const char *const bodies[] = {"[" EV("a") "," EV("b") "]", EV("a") "\n" EV("b"),
                                         "\"text\""};
    for (size_t i = 0; i < ARRAY_LEN(bodies); i++) {
        ck_assert_int_ne(map(bodies[i], INPUT_EVENT), 0);
        ck_assert_int_eq(F.ie.status, 400);
        ck_assert_uint_eq(F.m.nrecords, 0);
    }
}
END_TEST

START_TEST(test_any_input_accepts_ndjson)
{
    rule("10-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map(EV("a-1") "\n" EV("a-2") "\n", INPUT_ANY), 0);
    ck_assert_uint_eq(F.m.nevents, 2);
    ck_assert_uint_eq(F.m.nrecords, 2);
    ck_assert_str_eq(F.m.records[1].event_id.p, "a-2");
}
END_TEST

/* ==== the default mapping ================================================= */

START_TEST(test_ios_push_send_goes_to_the_ios_feed)
{
    default_rules();
    build();
    ck_assert_int_eq(map(PUSH_SEND_IOS, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    ck_assert_int_eq(F.m.records[0].feed, FEED_IOS);
}
END_TEST

START_TEST(test_push_send_event_carries_its_name_and_source_message_id)
{
    default_rules();
    build();
    ck_assert_int_eq(map(PUSH_SEND_IOS, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *event = F.m.records[0].event.p;
    ck_assert_msg(contains(event, "\"event_name\":\"Push Notification Sends\""), "event: %s",
                  event);
    ck_assert_msg(contains(event, "\"source_message_id\":\"" PUSH_ID "\""), "event: %s", event);
}
END_TEST

START_TEST(test_push_send_batch_carries_the_customer_id)
{
    default_rules();
    build();
    ck_assert_int_eq(map(PUSH_SEND_IOS, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *batch = F.m.records[0].batch.p;
    ck_assert_msg(contains(batch, "\"user_identities\"\t\"customer_id\"\t\"customer-1234\"\n"),
                  "batch: %s", batch);
}
END_TEST

/* The key the sender batches by: the external_user_id, the device when the
 * batch has device_info (a fingerprint of its fields, in whatever order), and
 * the batch's own scalar fields (environment). */
START_TEST(test_user_key_is_the_external_user_id_and_the_device)
{
    default_rules();
    build();
    ck_assert_int_eq(map(PUSH_SEND_IOS, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *key = F.m.records[0].user.p;
    ck_assert_msg(strncmp(key, "customer-1234\x1f", 14) == 0 && strlen(key) == 14 + 16, "%s", key);
    release();
    mapping_init(&F.m);
    F.m.keep_outcomes = 1;
    rule("50-device.lua",
         "return function(event, out)\n"
         "  local d = {}\n"
         "  if event.id == 'd-1' then d.platform = 'iOS' d.ios_idfv = 'A'\n"
         "  else d.ios_idfv = 'A' d.platform = 'iOS' end\n"
         "  if event.id == 'd-3' then d.ios_idfv = 'B' end\n"
         "  if event.id == 'd-4' then d = nil end\n"
         "  local env = event.id == 'd-5' and 'development' or nil\n"
         "  if event.id == 'd-6' then d = {environment = 'production'} end\n"
         "  local own = event.id == 'd-7' and 'dropped by the sender' or nil\n"
         "  return {feed = 'unbound', batch = {user_identities = {customer_id = 'c'},\n"
         "          device_info = d, environment = env, source_request_id = own},\n"
         "          event = {event_type = 'uninstall', data = {}}}\n"
         "end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("d-1") "," EV("d-2") "," EV("d-3") "," EV("d-4") "," EV(
                             "d-5") "," EV("d-6") "," EV("d-7")),
                         INPUT_ENVELOPE),
                     0);
    ck_assert_uint_eq(F.m.nrecords, 7);
    ck_assert_str_eq(F.m.records[0].user.p, F.m.records[1].user.p);
    /* a field the sender owns, and drops, tells no batch apart */
    ck_assert_str_eq(F.m.records[0].user.p, F.m.records[6].user.p);
    /* no device, and the configured environment, which the host stores with
     * an event whose rules name none */
    ck_assert_msg(strncmp(F.m.records[3].user.p, "c\x1f", 2) == 0 &&
                      strlen(F.m.records[3].user.p) == 2 + 16,
                  "%s", F.m.records[3].user.p);
    ck_assert_msg(contains(F.m.records[3].batch.p, "\"environment\"\t\t\"production\"\n"), "%s",
                  F.m.records[3].batch.p);
    ck_assert_msg(contains(F.m.records[4].batch.p, "\"environment\"\t\t\"development\"\n") &&
                      !contains(F.m.records[4].batch.p, "production"),
                  "%s", F.m.records[4].batch.p);
    for (size_t i = 2; i < 6; i++) {
        for (size_t j = 0; j < i; j++)
            ck_assert_str_ne(F.m.records[i].user.p, F.m.records[j].user.p);
    }
}
END_TEST

/* An output without source_message_id goes out with the Braze id (mParticle
 * recognises a repeat by it), and the rule's table is left as it was: here one
 * table serves every event. An id that is not UTF-8, written with U+FFFD,
 * could be another event's: that one is a dead letter. */
START_TEST(test_an_output_without_source_message_id_takes_the_event_id)
{
    rule("50-shared.lua",
         "local shared = {feed = 'unbound', batch = {user_identities = {customer_id = 'c'}},\n"
         "                event = {event_type = 'uninstall', data = {}}}\n"
         "return function(event, out)\n"
         "  assert(shared.event.data.source_message_id == nil, 'the table was changed')\n"
         "  return shared\n"
         "end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("s-1") "," EV("s-\xff") "," EV("s-2")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 2);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.dead[0].reason, DEAD_INVALID_OUTPUT);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "source_message_id: not UTF-8 text"), "%s",
                  F.m.dead[0].detail.p);
    ck_assert_msg(contains(F.m.records[0].event.p, "\"source_message_id\":\"s-1\""), "%s",
                  F.m.records[0].event.p);
    ck_assert_msg(contains(F.m.records[1].event.p, "\"source_message_id\":\"s-2\""), "%s",
                  F.m.records[1].event.p);
}
END_TEST

/* A drop says why: `false` alone (or with an empty or non-string reason),
 * as a rule's `return cond and out` gives, was a silent drop; and Lua's
 * `return nil, err`, meant as a drop, kept the event without a word. Each is
 * a dead letter, which a requeue can mend. */
#define DROP_HOW "return false and a reason (a non-empty string) to drop the event"
static const char *const UNCLEAR_RETURNS[][2] = {
    {"false", "process returned false without a reason; " DROP_HOW},
    {"false, ''", "process returned false with an empty reason; " DROP_HOW},
    {"false, 42", "process returned false with a reason that is not a string; " DROP_HOW},
    {"false, nil", "process returned false without a reason; " DROP_HOW},
    {"nil, 'test user'", "process returned nil and a string; " DROP_HOW ", or nothing to keep it"},
    {"nil, false", "process returned nil and a boolean; " DROP_HOW ", or nothing to keep it"},
};

START_TEST(test_a_return_neither_an_output_nor_a_drop_is_a_dead_letter)
{
    char src[256], detail[256];
    snprintf(src, sizeof src, "return function(event, out) return %s end\n",
             UNCLEAR_RETURNS[_i][0]);
    snprintf(detail, sizeof detail, "50-rule.lua: %s", UNCLEAR_RETURNS[_i][1]);
    dead_as(src, DEAD_INVALID_OUTPUT, detail);
}
END_TEST

/* The host's functions are called through their timing, from C: an argument
 * error said "bad argument #1 to '?'". */
START_TEST(test_an_argument_error_of_a_host_function_names_it)
{
    static const char *const calls[][2] = {
        {"tributary.custom_attributes(nil)", "bad argument #1 to 'tributary.custom_attributes' "
                                             "(table expected, got nil)"},
        {"cjson.encode()", "bad argument #1 to 'cjson.encode' (value expected)"},
    };
    char src[256];
    snprintf(src, sizeof src, "return function(event, out) local x = %s end\n", calls[_i][0]);
    dead_as(src, DEAD_RULE_ERROR, calls[_i][1]);
}
END_TEST

START_TEST(test_event_without_external_user_id_is_skipped)
{
    default_rules();
    build();
    const char *body = ENVELOPE("{\"event_type\":\"users.messages.email.Send\",\"id\":\"x-1\","
                                "\"time\":1,\"user\":{\"user_id\":\"5f8a\"}}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 0);
    ck_assert_uint_eq(F.m.dropped[DROP_NO_EXTERNAL_ID], 1);
}
END_TEST

START_TEST(test_event_with_null_external_user_id_is_skipped)
{
    default_rules();
    build();
    const char *body = ENVELOPE("{\"event_type\":\"users.messages.email.Send\",\"id\":\"x-1\","
                                "\"time\":1,\"user\":{\"external_user_id\":null}}");
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 0);
    ck_assert_uint_eq(F.m.dropped[DROP_NO_EXTERNAL_ID], 1);
}
END_TEST

START_TEST(test_shipped_rules_pass_their_own_tests)
{
    default_rules();
    build();
    int failures = self_test();
    ck_assert_msg(failures == 0, "%d failures:\n%s", failures, F.report.data);
    ck_assert_int_gt(F.ntests, 0);
}
END_TEST

/* A later file without tests that fails on events it takes for granted was
 * accepted by `check` and a reload without a word; every such event became a
 * dead letter. Its failure on the shipped tests' events is a warning (rules
 * that passed before are not refused at a start for it). */
START_TEST(test_a_later_file_failing_on_earlier_tests_events_is_a_warning)
{
    default_rules();
    rule("50-lower.lua", "return function(event, out)\n"
                         "  out.event.data.custom_attributes.campaign = "
                         "event.properties.campaign_name:lower()\n"
                         "end\n");
    build();
    int failures = self_test();
    ck_assert_msg(failures == 0, "%d failures:\n%s", failures, F.report.data);
    ck_assert_msg(contains(F.warnings.data, "rule tests pass their own file and go to the "
                                            "dead-letter store in the files after it"),
                  "%s", F.warnings.data);
    ck_assert_msg(contains(F.warnings.data, "50-lower.lua:2: attempt to index a nil value"), "%s",
                  F.warnings.data);
    ck_assert_msg(contains(F.warnings.data, "10-mparticle.lua: test '"), "%s", F.warnings.data);
}
END_TEST

/* A test's event the service refuses (400) passed, or failed in the rules
 * with an error that blamed them. */
START_TEST(test_a_tests_event_the_service_refuses_is_said)
{
    default_rules();
    rule("20-t.lua",
         "return { process = function(event, out) end, tests = {\n"
         "  { name = 'no id', event = { event_type = 'users.messages.email.Open', time = 1,\n"
         "    user = { external_user_id = 'u' } }, expect = {} },\n"
         "  { name = 'no time', event = { event_type = 'users.messages.email.Open', id = 'x',\n"
         "    user = { external_user_id = 'u' } }, expect = {} },\n"
         "} }\n");
    build();
    ck_assert_int_eq(self_test(), 1);
    ck_assert_msg(contains(F.report.data, "20-t.lua: test 'no time' failed: ") &&
                      contains(F.report.data, "(and its event is one the service refuses: "
                                              "missing time)"),
                  "%s", F.report.data);
    ck_assert_msg(contains(F.warnings.data, "the events of 1 rule test are ones the service "
                                            "refuses (400)") &&
                      contains(F.warnings.data, "20-t.lua: test 'no id': missing id"),
                  "%s", F.warnings.data);
}
END_TEST

/* The run through later files comes after every test: a file that keeps a
 * set in a global saw the shipped tests' users first, and its own test of the
 * first event of a user failed, refusing rules that had passed. */
START_TEST(test_the_run_through_later_files_comes_after_every_test)
{
    default_rules();
    rule("50-first-only.lua",
         "local seen = {}\n"
         "return { process = function(event, out)\n"
         "  local id = event.user and event.user.external_user_id\n"
         "  if id and not seen[id] then\n"
         "    seen[id] = true\n"
         "    out.event.data.custom_attributes.first_seen_here = true\n"
         "  end\n"
         "end, tests = {\n"
         "  { name = 'first event of a user is marked',\n"
         "    event = { event_type = 'users.messages.email.Open', id = 'f-1', time = 1,\n"
         "              user = { external_user_id = 'customer-1234' } },\n"
         "    expect = { event = { data = { custom_attributes = { first_seen_here = true } } } } "
         "},\n"
         "} }\n");
    build();
    ck_assert_msg(self_test() == 0, "%s", F.report.data);
    ck_assert_str_eq(F.warnings.data, "");
}
END_TEST

START_TEST(test_a_later_file_that_keeps_earlier_tests_events_warns_of_nothing)
{
    default_rules();
    rule("50-tag.lua", "return function(event, out)\n"
                       "  local p = event.properties\n"
                       "  if type(p) == 'table' and p.campaign_name == 'x' then return false, "
                       "'tagged' end\n"
                       "end\n");
    build();
    ck_assert_int_eq(self_test(), 0);
    ck_assert_str_eq(F.warnings.data, "");
}
END_TEST

/* ==== rule errors and limits ============================================== */

#define BAD_RULE_LINE_3                                                                            \
    "return function(event, out)\n"                                                                \
    "  if event.id == \"e-2\" then\n"                                                              \
    "    error(\"boom\")\n"                                                                        \
    "  end\n"                                                                                      \
    "  return {feed = \"unbound\", batch = {},\n"                                                  \
    "          event = {event_type = \"uninstall\", data = {}, id = event.id}}\n"                  \
    "end\n"

START_TEST(test_rule_error_dead_letters_the_event_with_file_and_line)
{
    rule("50-bad.lua", BAD_RULE_LINE_3);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("e-2")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.dead[0].reason, DEAD_RULE_ERROR);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "50-bad.lua:3:"), "detail: %s",
                  F.m.dead[0].detail.p);
    ck_assert_str_eq(F.m.dead[0].event_id.p, "e-2");
}
END_TEST

/* A library function the sandbox wraps is called from C, where Lua finds no
 * name for it: its argument errors must still name it, as Lua's own do. */
START_TEST(test_an_argument_error_names_the_library_function)
{
    static const struct {
        const char *expr, *says;
    } cases[] = {
        {"string.rep(nil, 3)", "bad argument #1 to 'string.rep' (string expected, got nil)"},
        {"('x'):rep({})", "bad argument #2 to 'string.rep' (number expected, got table)"},
        {"string.find(nil, 'x')", "bad argument #1 to 'string.find' (string expected, got nil)"},
        {"string.gsub('x', {}, '')", "bad argument #2 to 'string.gsub'"},
        {"table.sort(1)", "bad argument #1 to 'table.sort' (table expected, got number)"},
        {"table.move({}, 'a', 1, 1)", "bad argument #2 to 'table.move'"},
        {"table.concat(nil)", "bad argument #1 to 'table.concat'"},
        {"os.date({})", "bad argument #1 to 'os.date'"},
        {"setmetatable(1, {})", "bad argument #1 to 'setmetatable'"},
        {"string.format(nil)", "bad argument #1 to 'string.format'"},
        /* called from C by pcall: the same name */
        {"select(2, pcall(string.rep, nil))", "bad argument #1 to 'string.rep'"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        const char *seen = probe(cases[i].expr);
        ck_assert_msg(contains(seen, cases[i].says) && !contains(seen, "'?'"), "%s: %s",
                      cases[i].expr, seen);
    }
}
END_TEST

START_TEST(test_rule_error_leaves_the_other_events_mapped)
{
    rule("50-bad.lua", BAD_RULE_LINE_3);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("e-1") "," EV("e-2") "," EV("e-3")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nevents, 3);
    ck_assert_uint_eq(F.m.nrecords, 2);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.records[0].event_id.p, "e-1");
    ck_assert_str_eq(F.m.records[1].event_id.p, "e-3");
}
END_TEST

START_TEST(test_rule_returning_a_number_is_invalid_output)
{
    const struct dead_letter *d = dead_from("return function(event, out) return 42 end\n");
    ck_assert_str_eq(d->reason, DEAD_INVALID_OUTPUT);
    ck_assert_msg(contains(d->detail.p, "50-rule.lua"), "detail: %s", d->detail.p);
}
END_TEST

/* Only `return false, reason` drops an event: a chain that ends without an
 * output (a rule that forgot its return) was counted as filtered, and the
 * event was gone. */
START_TEST(test_no_output_from_any_rule_is_invalid_output)
{
    const struct dead_letter *d =
        dead_from("return function(event, out)\n"
                  "  if event.event_type == 'never' then return {feed = 'unbound'} end\n"
                  "end\n");
    ck_assert_str_eq(d->reason, DEAD_INVALID_OUTPUT);
    ck_assert_msg(contains(d->detail.p, "no rule produced an output (last: 50-rule.lua)"),
                  "detail: %s", d->detail.p);
}
END_TEST

START_TEST(test_output_with_an_unknown_feed_is_invalid_output)
{
    const struct dead_letter *d =
        dead_from("return function(event, out)\n"
                  "  return {feed = \"mars\", batch = {},\n"
                  "          event = {event_type = \"uninstall\", data = {}, id = event.id}}\n"
                  "end\n");
    ck_assert_str_eq(d->reason, DEAD_INVALID_OUTPUT);
    ck_assert_msg(contains(d->detail.p, "feed"), "detail: %s", d->detail.p);
}
END_TEST

/* mParticle takes at most 100 user attributes per batch: an event with more
 * could never be delivered, so it is refused at once, naming the limit. */
START_TEST(test_an_output_with_more_than_100_user_attributes_is_invalid_output)
{
    const struct dead_letter *d =
        dead_from("return function(event, out)\n"
                  "  local attrs = {}\n"
                  "  for i = 1, 101 do attrs['a' .. i] = i end\n"
                  "  return {feed = 'unbound', batch = {user_attributes = attrs},\n"
                  "          event = {event_type = 'custom_event', data = {event_name = 'E', "
                  "custom_event_type = 'other'}}}\n"
                  "end\n");
    ck_assert_str_eq(d->reason, DEAD_INVALID_OUTPUT);
    ck_assert_msg(contains(d->detail.p, "user_attributes: more than 100 attributes"), "detail: %s",
                  d->detail.p);
}
END_TEST

/* Their number is checked before each list's items: 20,000 names of one
 * 20,000-item list took 21 s of checks outside every limit. */
START_TEST(test_an_output_with_many_user_attribute_lists_is_invalid_output_at_once)
{
    rule("50-rule.lua", "return function(event, out)\n"
                        "  local list, attrs = {}, {}\n"
                        "  for i = 1, 20000 do list[i] = 'x' end\n"
                        "  for i = 1, 20000 do attrs['a' .. i] = list end\n"
                        "  return {feed = 'unbound', batch = {user_attributes = attrs},\n"
                        "          event = {event_type = 'uninstall', data = {}}}\n"
                        "end\n");
    struct bounded res;
    one_event_dead_within(10000, DEAD_INVALID_OUTPUT, &res);
}
END_TEST

/* A table too large for any output is refused without walking it whole: 100
 * names of one list of 500,000 items took 11 s of checks per event, outside
 * every limit. */
START_TEST(test_an_output_table_larger_than_any_output_is_invalid_at_its_first_items)
{
    static const char *const outputs[][2] = {
        {"batch = {user_attributes = UA}", "out.batch.user_attributes.a"},
        {"batch = {device_info = NAMES}", "out.batch.device_info: more items"},
        {"batch = {user_identities = NAMES}", "out.batch.user_identities: more items"},
    };
    for (size_t i = 0; i < sizeof outputs / sizeof *outputs; i++) {
        char src[1024];
        snprintf(src, sizeof src,
                 "local BIG, NAMES, UA = {}, {}, {}\n"
                 "for i = 1, 500000 do BIG[i] = i end\n"
                 "for i = 1, 100000 do NAMES['n' .. i] = 'v' end\n"
                 "for i = 1, 100 do UA['a' .. i] = BIG end\n"
                 "return function(event, out)\n"
                 "  return {feed = 'unbound', %s,\n"
                 "          event = {event_type = 'uninstall', data = {}}}\n"
                 "end\n",
                 outputs[i][0]);
        dead_as(src, DEAD_INVALID_OUTPUT, outputs[i][1]);
        ck_assert_msg(contains(F.m.dead[0].detail.p, "more items than an output can hold"),
                      "detail: %s", F.m.dead[0].detail.p);
        release();
        mapping_init(&F.m);
        F.m.keep_outcomes = 1;
    }
}
END_TEST

START_TEST(test_an_output_with_100_user_attributes_is_a_record)
{
    rule("50-rule.lua", "return function(event, out)\n"
                        "  local attrs = {}\n"
                        "  for i = 1, 100 do attrs['a' .. i] = i end\n"
                        "  return {feed = 'unbound', batch = {user_attributes = attrs},\n"
                        "          event = {event_type = 'custom_event', data = {event_name = 'E', "
                        "custom_event_type = 'other'}}}\n"
                        "end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("e-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.ndead, 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
}
END_TEST

/* mParticle's bulk endpoint answers 202 and drops a batch it refuses: an
 * output it would refuse is a dead letter naming the field, never queued. */
#define SCHEMA_BASE                                                                                \
    "return function(event, out)\n"                                                                \
    "  local o = {feed = 'unbound', batch = {user_attributes = {}, device_info = {}},\n"           \
    "    event = {event_type = 'custom_event', data = {event_name = 'E',\n"                        \
    "      custom_event_type = 'other', custom_attributes = {}}}}\n"                               \
    "  local a = o.event.data.custom_attributes\n"

static const struct {
    const char *change;
    const char *detail;
} SCHEMA_CASES[] = {
    {"a.obj = {x = 1}",
     "custom_attributes.obj: a value must be a string, number, boolean or null, not a table"},
    {"for i = 1, 101 do a['a' .. i] = i end", "custom_attributes: more than 100 attributes"},
    {"a[string.rep('n', 257)] = 1", "custom_attributes: a name of more than 256 characters"},
    {"a.v = string.rep('v', 4097)", "custom_attributes.v: a value of more than 4096 characters"},
    /* each byte that is not UTF-8 is a character of its own (U+FFFD) */
    {"a.v = string.rep('\\x80', 4097)",
     "custom_attributes.v: a value of more than 4096 characters"},
    {"o.batch.user_attributes.v = 'x' .. string.rep('\\xe9', 4096)",
     "user_attributes.v: a value of more than 4096 characters"},
    {"o.event.data.custom_attributes = 'text'", "custom_attributes must be a table, not string"},
    {"o.event.data.event_name = string.rep('e', 257)", "event_name: more than 256 characters"},
    {"o.event.data.event_name = nil", "event_name: a custom event needs a name"},
    {"o.event.data.custom_event_type = 'bogus'",
     "custom_event_type: \"bogus\" is not one of mParticle's names"},
    {"o.event.event_type = 'bogus_type'", "event_type: \"bogus_type\" is not one of"},
    {"o.event.event_type = 'custom_event\\0x'", "event_type: \"custom_event\" is not one of"},
    {"o.batch.environment = 'production\\0junk'", "environment: \"production\" is not one of"},
    {"o.event.event_type = nil", "out.event.event_type: a string is required, not nil"},
    {"o.event.data = nil", "out.event.data must be a table, not nil"},
    {"o.batch.device_info.platform = 'Windows'", "platform: \"Windows\" is not one of"},
    {"o.batch.environment = 'staging'", "environment: \"staging\" is not one of"},
    {"o.batch.user_attributes.u = {x = 1}", "user_attributes.u: a value must be a string"},
    {"o.batch.user_attributes[string.rep('n', 257)] = 1",
     "user_attributes: a name of more than 256 characters"},
    {"o.batch.user_attributes.l = {'a', {}}", "user_attributes.l: a value must be a string"},
    {"o.batch.user_attributes.l = {1, 2, x = 3}", "user_attributes.l: a value must be a string"},
    {"o.batch.user_attributes = {'a', 'b'}",
     "user_attributes must be a table of names, not a list"},
    {"o.event.data.custom_attributes = {'a', 'b'}",
     "custom_attributes must be a table of names, not a list"},
    {"o.event.data = {'x'}", "out.event.data must be a table of names, not a list"},
    {"o.batch.user_identities = {email = {a = 1}}",
     "out.batch.user_identities.email: a string is required, not a table"},
    {"o.batch.user_identities = {customer_id = 12}",
     "out.batch.user_identities.customer_id: a string is required, not a number"},
    {"o.batch.user_identities = {customer_id = cjson.null}",
     "out.batch.user_identities.customer_id: a string is required, not null"},
    {"o.batch.user_identities = {customerid = cjson.null}",
     "out.batch.user_identities.customerid: a string is required, not null"},
    /* mParticle drops a batch whose object fields are not objects, and with
     * it the same user's other events the sender put into that batch */
    {"o.batch.device_info = 'iOS'", "out.batch.device_info must be a table of names, not string"},
    {"o.batch.device_info = cjson.null",
     "out.batch.device_info must be a table of names, not null"},
    {"o.batch.device_info = {'iOS'}", "out.batch.device_info must be a table of names, not a list"},
    {"o.batch.user_identities = 'x'",
     "out.batch.user_identities must be a table of names, not string"},
    {"o.batch.user_identities = {'c-1'}",
     "out.batch.user_identities must be a table of names, not a list"},
    {"o.batch.user_attributes = 7",
     "out.batch.user_attributes must be a table of names, not number"},
    {"o.batch.user_attributes = true",
     "out.batch.user_attributes must be a table of names, not boolean"},
    {"o.batch.device_info.device_model = {'m1'}",
     "out.batch.device_info.device_model: a value must be a string, number or boolean, not a "
     "table"},
    {"o.event.data.timestamp_unixtime_ms = 'yesterday'",
     "timestamp_unixtime_ms: whole milliseconds since 1970 are required"},
    {"o.event.data.timestamp_unixtime_ms = 1732800000000.5",
     "timestamp_unixtime_ms: whole milliseconds since 1970 are required"},
    {"o.event.data.timestamp_unixtime_ms = -1",
     "timestamp_unixtime_ms: whole milliseconds since 1970 are required"},
    {"o.event.data.timestamp_unixtime_ms = 9007199254740993",
     "timestamp_unixtime_ms: whole milliseconds since 1970 are required"},
    {"o.event.data.timestamp_unixtime_ms = 0/0",
     "timestamp_unixtime_ms: whole milliseconds since 1970 are required"},
    {"o.event.data.source_message_id = {1, 2}",
     "source_message_id: a non-empty string is required"},
    {"o.event.data.source_message_id = ''", "source_message_id: a non-empty string is required"},
    /* written with U+FFFD, identifiers that differ only in bytes that are
     * not UTF-8 would be one: two users, or two events mParticle takes for
     * a repeat */
    {"o.batch.user_identities = {customer_id = 'c\\xff'}",
     "out.batch.user_identities.customer_id: not UTF-8 text"},
    {"o.batch.user_identities = {customer_id = 'c', email = 'e\\xc3@x'}",
     "out.batch.user_identities.email: not UTF-8 text"},
    {"o.event.data.source_message_id = 'm-\\xed\\xa0\\x80'", "source_message_id: not UTF-8 text"},
    /* names that are one as written would be the same name twice in a JSON
     * object, of which mParticle keeps one it does not say */
    {"a['n\\xff'] = 1; a['n\\xfe'] = 2", "custom_attributes: two names are one as written"},
    /* a number name is written as text, which another name may be */
    {"a[2] = 'number'; a['2'] = 'string'",
     "custom_attributes: names must be strings, not numbers (2)"},
    {"a[0.5] = 'f'", "custom_attributes: names must be strings, not numbers (0.5)"},
    {"o.batch.user_attributes['n\\xef\\xbf\\xbd'] = 1; o.batch.user_attributes['n\\x80'] = 2",
     "user_attributes: two names are one as written"},
};

START_TEST(test_an_output_mparticle_would_drop_is_invalid_output_naming_the_field)
{
    char src[1024];
    snprintf(src, sizeof src, SCHEMA_BASE "  %s\n  return o\nend\n", SCHEMA_CASES[_i].change);
    dead_as(src, DEAD_INVALID_OUTPUT, SCHEMA_CASES[_i].detail);
}
END_TEST

START_TEST(test_outputs_at_mparticles_limits_are_records)
{
    rule("50-rule.lua", SCHEMA_BASE
         "  for i = 1, 99 do a['a' .. i] = i end\n"
         "  a[string.rep('n', 256)] = string.rep('\\u{e9}', 4096)\n" /* 8192 bytes */
         "  o.event.data.event_name = string.rep('e', 256)\n"
         "  o.batch.user_attributes.list = {'a', 1, true, nil, 'e'}\n"
         "  o.batch.user_attributes[string.rep('u', 256)] = 1\n"
         "  o.batch.user_attributes.bytes = string.rep('\\x80', 4096)\n"
         "  o.batch.user_attributes['name\\xff'] = 'a name not UTF-8, one of its kind'\n"
         "  o.batch.device_info.platform = 'Android'\n"
         "  o.batch.device_info.limit_ad_tracking = false\n"
         "  o.batch.device_info.screen_height = 1920\n"
         "  o.batch.user_identities = {customer_id = 'c', email = 'e@x', other = cjson.null}\n"
         "  o.batch.environment = 'development'\n"
         "  o.event.data.timestamp_unixtime_ms = 9007199254740992\n"
         "  o.event.data.source_message_id = event.id\n"
         "  if event.id == 'u-2' then o.event = {event_type = 'uninstall', data = {}} end\n"
         "  return o\nend\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("u-1") "," EV("u-2")), INPUT_ENVELOPE), 0);
    ck_assert_msg(F.m.ndead == 0, "dead letter: %s", F.m.ndead ? F.m.dead[0].detail.p : "");
    ck_assert_uint_eq(F.m.nrecords, 2);
}
END_TEST

/* Maps one event whose custom attributes take about 124,000 bytes and pad
 * more (its id "p-<pad>"): 1 when it is a record, 0 when it is invalid output
 * for its size. */
static int padded_output_taken(long pad)
{
    char body[256];
    snprintf(body, sizeof body, ENVELOPE(EV("p-%ld")), pad);
    mapping_free(&F.m);
    mapping_init(&F.m);
    ck_assert_int_eq(map(body, INPUT_ENVELOPE), 0);
    if (F.m.nrecords == 1)
        return 1;
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "an mParticle batch holds at most 128 KB"),
                  "pad %ld: %s", pad, F.m.dead[0].detail.p);
    return 0;
}

/* An output was refused past 120 KB of event and batch fields, 5 KB short of
 * what an mParticle batch holds: the largest taken makes a batch of its own
 * within 128,000 bytes, and close to them. */
START_TEST(test_the_largest_output_taken_fits_an_mparticle_batch_of_its_own)
{
    /* string.rep pays for its time in instructions: a loaded machine under
     * AddressSanitizer took the default budget */
    setenv("TRIBUTARY_RULES_INSTRUCTIONS", LIBRARY_TEST_INSTRUCTIONS, 1);
    rule("50-rule.lua", SCHEMA_BASE "  for i = 1, 31 do a['p' .. i] = string.rep('p', 4000) end\n"
                                    "  a.pad = string.rep('r', tonumber(event.id:match('%d+$')))\n"
                                    "  return o\nend\n");
    build();
    long lo = 0, hi = 4096; /* taken at lo, refused at hi */
    ck_assert(padded_output_taken(lo));
    ck_assert(!padded_output_taken(hi));
    while (hi - lo > 1) {
        long mid = lo + (hi - lo) / 2;
        if (padded_output_taken(mid))
            lo = mid;
        else
            hi = mid;
    }
    ck_assert(padded_output_taken(lo));
    const struct record *rec = &F.m.records[0];
    struct batch_part part = {rec->batch, rec->event, rec->event_id};
    buf batch;
    buf_init(&batch, 1 << 17);
    ck_assert_int_eq(mparticle_build_batch(&batch, "production",
                                           "0d3c7f4e-5b1a-5c2d-9e8f-7a6b5c4d3e2f", &part, 1),
                     0);
    ck_assert_uint_le(batch.len, MPARTICLE_MAX_BATCH_BYTES);
    ck_assert_uint_ge(batch.len, MPARTICLE_MAX_BATCH_BYTES - 512);
    buf_free(&batch);
}
END_TEST

#define LOOP_RULE "return function(event, out)\n  while true do end\nend\n"

START_TEST(test_infinite_loop_hits_the_instruction_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000", 1), 0);
    rule("50-loop.lua", LOOP_RULE);
    struct bounded res;
    const char *detail = one_event_hits_a_limit(10000, &res);
    ck_assert_msg(contains(detail, "instruction"), "detail: %s", detail);
}
END_TEST

/* A rule that calls a library function in a loop, each call doing work in C
 * that the count hook does not see; it must end as a limit hit within two
 * costly calls (the first pays at most an eighth of the budget, see
 * TIMED_CALL_SHARE), not after minutes. Natively that is under half a second,
 * and 30 s the bound; under a tool (TEST_WRAPPER), where one table.move over
 * its bound takes some 7 s and a call's time says little of its
 * instructions, 180 s. */
static void assert_library_loop_hits_the_limit(const char *body)
{
    char src[512];
    snprintf(src, sizeof src, "return function(event, out)\n%s\nend\n", body);
    rule("50-lib.lua", src);
    build();
    const char *wrapper = getenv("TEST_WRAPPER");
    long bound_ms = wrapper && *wrapper ? 180000 : 30000;
    struct bounded res;
    map_bounded(ENVELOPE(EV("c-1")), bound_ms, &res);
    ck_assert_msg(res.finished, "rules_map did not return within %ld s", bound_ms / 1000);
    ck_assert_uint_eq(res.ndead, 1);
    ck_assert_str_eq(res.reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(res.detail, "instruction limit exceeded"), "detail: %s", res.detail);
}

START_TEST(test_a_loop_of_costly_pattern_searches_hits_the_instruction_limit)
{
    /* each search: about 9 million steps, some 30 ms, for a handful of instructions */
    assert_library_loop_hits_the_limit("  local s = (\"a\"):rep(3000)\n"
                                       "  for i = 1, 100000 do s:find(\".-b\") end");
}
END_TEST

/* Its work is in C, where the count hook cannot see it: it pays for its time. */
START_TEST(test_a_loop_of_custom_attributes_calls_hits_the_instruction_limit)
{
    /* each call: 2,000 properties to sort, some 0.3 ms, for a handful of
     * instructions; without the charge, the time limit would stop it */
    assert_library_loop_hits_the_limit("  local p = {}\n"
                                       "  for i = 1, 2000 do p['k' .. i] = i end\n"
                                       "  for i = 1, 100000 do tributary.custom_attributes(p) end");
}
END_TEST

/* table.sort compares in C: a thousand references to one 2 MiB string of NUL
 * bytes (Lua compares strings with strcoll, once per NUL) sorted for minutes.
 * Each comparison now looks at the deadline. */
START_TEST(test_a_sort_of_costly_comparisons_stops_at_the_time_limit)
{
    one_event_meets_the_time_limit("50-sort.lua",
                                   "return function(event, out)\n"
                                   "  local s, t = ('\\0'):rep(2 * 1024 * 1024), {}\n"
                                   "  for i = 1, 1000 do t[i] = s end\n"
                                   "  table.sort(t)\n"
                                   "end\n");
}
END_TEST

/* A table's walk costs what it was once sized for: a million emptied slots
 * are written as {} in two bytes, so the output's byte limit let 38,000
 * references to such a table run for 30 s, in the host's writing of the
 * output and in cjson.encode. The writer now looks at the clock. */
#define HOLLOW_REFS(into)                                                                          \
    "  local hollow, refs = {table.unpack({}, 1, 999000)}, {}\n"                                   \
    "  for i = 1, 38000 do refs['k' .. i] = hollow end\n"                                          \
    "  " into " = refs\n"

static const char *const HOLLOW_OUTPUTS[] = {"o.event.data.hollow", "o.batch.hollow"};

START_TEST(test_an_output_walking_an_emptied_table_in_many_places_ends_at_the_time_limit)
{
    char src[1024], body[512];
    snprintf(body, sizeof body, HOLLOW_REFS("%s"), HOLLOW_OUTPUTS[_i]);
    snprintf(src, sizeof src,
             "return function(event, out)\n"
             "  local o = {feed = 'unbound', batch = {}, event = {event_type = 'uninstall', "
             "data = {}}}\n%s  return o\nend\n",
             body);
    /* the rule's own part (a library call charged by its time, 38,000
     * assignments) far within its limits on a loaded machine too; the
     * walk takes minutes whatever they are */
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "4000000", 1), 0);
    rule("50-hollow.lua", src);
    static struct bounded res;
    const char *detail = one_event_dead_within(60000, DEAD_INVALID_OUTPUT, &res);
    ck_assert_msg(contains(detail, "took longer than the time limit"), "detail: %s", detail);
}
END_TEST

START_TEST(test_cjson_encode_of_an_emptied_table_in_many_places_ends_at_the_time_limit)
{
    /* at the time limit, not charged for its 30 s afterwards (an instruction
     * limit); pcall cannot keep the rule going past it */
    static const char src[] =
        "return function(event, out)\n" HOLLOW_REFS("local _") "  pcall(cjson.encode, refs)\n"
                                                               "  while true do end\n"
                                                               "end\n";
    one_event_meets_the_time_limit("50-hollow.lua", src);
}
END_TEST

/* lua-cjson's copy of the text outside Lua was lost at each memory error in a
 * rule's cjson.decode: a text the memory left cannot take is refused first,
 * with an error the rule can catch. */
START_TEST(test_cjson_decode_refuses_a_text_larger_than_the_memory_left_can_take)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "16", 1), 0);
    for (int i = 0; i < 3; i++) {
        const char *seen =
            probe("select(2, pcall(cjson.decode, '[' .. ('1,'):rep(1500000) .. '1]'))");
        ck_assert_msg(contains(seen, "cjson.decode: a text of 3000003 bytes may take up to "
                                     "144004240 bytes decoded, more than the rule has left"),
                      "seen: %s", seen);
    }
    /* a text within the memory left decodes */
    ck_assert_str_eq(probe("#cjson.decode('[' .. ('1,'):rep(1000) .. '1]')"), "1001");
}
END_TEST

/* What RULES_DECODE_BYTES_PER_BYTE promises: the texts that decode into the
 * most memory per byte decode within it, so the refusal above leaves none to
 * fail half-way. */
static const char *const DECODE_SHAPES[] = {
    "[]",      "{}",
    "[[]]",    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "[{}]",    "1",
    "\"\"",    "null",
    "[[],[]]", "{\"k\":[]}",
    "[1,1]",
};

START_TEST(test_cjson_decode_takes_at_most_the_memory_the_refusal_counts)
{
    const char *shape = DECODE_SHAPES[_i];
    static const int counts[] = {1, 2, 16385, 32769};
    for (size_t c = 0; c < ARRAY_LEN(counts); c++) {
        buf text;
        buf_init(&text, 8 << 20);
        ck_assert_int_eq(buf_addc(&text, '['), 0);
        for (int k = 0; k < counts[c]; k++)
            ck_assert_int_eq(buf_adds(&text, k ? "," : "") | buf_adds(&text, shape), 0);
        ck_assert_int_eq(buf_addc(&text, ']'), 0);
        sandbox *sb = sandbox_new(0);
        ck_assert_ptr_nonnull(sb);
        lua_State *L = sandbox_lua(sb);
        luaL_requiref(L, "cjson", luaopen_cjson, 0);
        lua_getfield(L, -1, "decode");
        lua_pushlstring(L, text.data, text.len);
        lua_gc(L, LUA_GCCOLLECT);
        /* no instruction budget, hence no time limit: a test of memory that
         * a loaded machine cannot fail */
        struct sandbox_limits lim = {
            text.len * RULES_DECODE_BYTES_PER_BYTE + RULES_DECODE_BYTES_FIXED, 0};
        struct sandbox_error serr;
        ck_assert_msg(sandbox_call(sb, 1, 1, &lim, &serr) == SANDBOX_OK,
                      "%d times %s (%zu bytes) in %zu bytes: %s", counts[c], shape, text.len,
                      lim.memory_bytes, serr.msg);
        sandbox_free(sb);
        buf_free(&text);
    }
}
END_TEST

/* The host's own use of a state outside a rule call (decoding, checking an
 * output) can meet an allocation failure: the service stops, and says why. */
START_TEST(test_a_lua_error_outside_a_protected_call_is_logged_before_the_abort)
{
    char path[] = "/tmp/tributary-unit-panic-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    unlink(path);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        struct rlimit no_core = {0, 0}; /* the abort is expected: no core file */
        setrlimit(RLIMIT_CORE, &no_core);
        dup2(fd, STDERR_FILENO);
        sandbox *sb = sandbox_new(0);
        if (!sb)
            _exit(2);
        lua_State *L = sandbox_lua(sb);
        lua_pushliteral(L, "not enough memory");
        lua_error(L);
        _exit(3);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "status %d", status);
    char text[1024] = "";
    ck_assert_int_ge(pread(fd, text, sizeof text - 1, 0), 0);
    close(fd);
    ck_assert_msg(strstr(text, "level=error msg=\"rules: Lua failed outside a protected call, "
                               "stopping\" error=\"not enough memory\""),
                  "%s", text);
}
END_TEST

/* A __len metamethod could make sort and concat go through any length. */
START_TEST(test_sort_and_concat_refuse_a_table_with_a_length_of_its_own)
{
    const char *seen =
        probe("(function()\n"
              "  local long = setmetatable({}, {__len = function() return 2^31 end})\n"
              "  local t, u = {3, 1, 2}, {3, 1, 2}\n"
              "  table.sort(t)\n"
              "  table.sort(u, function(a, b) return a > b end)\n"
              "  return select(2, pcall(table.sort, long)) .. '|' .. select(2, pcall(table.concat, "
              "long))\n"
              "    .. '|' .. table.concat(t) .. table.concat(u)\n"
              "end)()");
    ck_assert_str_eq(seen, "tables with a __len metamethod are not supported here|tables with a "
                           "__len metamethod are not supported here|123321");
}
END_TEST

/* An __index (or __newindex) chain of tables makes every element the table
 * functions read in C walk it, where the count hook cannot stop them:
 * table.move over such a table took minutes. They refuse it at once. */
START_TEST(test_table_functions_refuse_a_table_that_reads_through_a_chain)
{
    const char *seen = probe(
        "(function()\n"
        "  local src = {} for i = 1, 2000 do src = setmetatable({}, {__index = src}) end\n"
        "  local dst = setmetatable({}, {__newindex = function() end})\n"
        "  local out = {}\n"
        "  for _, call in ipairs({\n"
        "      function() return table.move(src, 1, 9999999, 1, {}) end,\n"
        "      function() return table.move({1, 2}, 1, 2, 1, dst) end,\n"
        "      function() return select('#', table.unpack(src, 1, 900000)) end,\n"
        "      function() return table.concat(src, ',', 1, 100000) end,\n"
        "      function() return table.insert(src, 1) end,\n"
        "      function() return table.sort(src) end}) do\n"
        "    out[#out + 1] = select(2, pcall(call)):match('a (__%a+) metamethod') or '?'\n"
        "  end\n"
        "  return table.concat(out, ',') .. '|' .. table.concat(table.move({1, 2}, 1, 2, 1, {}))\n"
        "end)()");
    ck_assert_str_eq(seen, "__index,__newindex,__index,__index,__index,__index|12");
}
END_TEST

/* cjson.encode writes an object's names in order: the same table is the same
 * text in every Lua state (an attribute made of a nested object kept changing
 * its text); a table with other keys than names keeps its own order. */
START_TEST(test_cjson_encode_writes_names_in_order)
{
    const char *seen = probe("(function()\n"
                             "  local t = {}\n"
                             "  for _, k in ipairs({'zeta', 'b', 'a', 'ab', 'Z', ''}) do\n"
                             "    t[k] = {y = 1, x = {2, {d = 1, c = 2}}}\n"
                             "  end\n"
                             "  local mixed = cjson.decode(cjson.encode({[1] = 'a', k = 'b'}))\n"
                             "  return cjson.encode(t) .. '|' .. cjson.encode({}) .. '|' .. "
                             "tostring(mixed['1']) .. tostring(mixed.k)\n"
                             "end)()");
    const char *one = "{\"x\":[2,{\"c\":2,\"d\":1}],\"y\":1}";
    char want[512];
    snprintf(want, sizeof want, "{\"\":%s,\"Z\":%s,\"a\":%s,\"ab\":%s,\"b\":%s,\"zeta\":%s}|{}|ab",
             one, one, one, one, one, one);
    ck_assert_str_eq(seen, want);
    /* a weak table's entries, and their names, may go at any allocation: it
     * is written in its own order (sorting it read names already freed) */
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    seen = probe("(function()\n"
                 "  local keep = {}\n"
                 "  for round = 1, 100 do\n"
                 "    local t = setmetatable({}, {__mode = 'v'})\n"
                 "    for i = 1, 1000 do\n"
                 "      local v = {i}\n"
                 "      t['k' .. i] = v\n"
                 "      if i % 2 == 0 then keep[#keep + 1] = v end\n"
                 "    end\n"
                 "    local back = cjson.decode(cjson.encode(t))\n"
                 "    if back.k1000[1] ~= 1000 then return 'lost k1000' end\n"
                 "  end\n"
                 "  return 'written'\n"
                 "end)()");
    ck_assert_str_eq(seen, "written");
}
END_TEST

/* cjson's functions work in C too: each call pays for its time. */
START_TEST(test_a_loop_of_cjson_calls_hits_the_instruction_limit)
{
    assert_library_loop_hits_the_limit("  local t = {}\n"
                                       "  for i = 1, 2000 do t[i] = 'item ' .. i end\n"
                                       "  local text = cjson.encode(t)\n"
                                       "  for i = 1, 100000 do cjson.decode(cjson.encode(t)) end");
}
END_TEST

START_TEST(test_a_loop_of_large_table_moves_hits_the_instruction_limit)
{
    assert_library_loop_hits_the_limit("  for i = 1, 100000 do table.move({}, 1, 9999999, 1) end");
}
END_TEST

START_TEST(test_a_loop_of_matches_through_gmatch_hits_the_instruction_limit)
{
    /* one iterator call scans a whole 300 KB subject that has no match */
    assert_library_loop_hits_the_limit(
        "  local s = (\"b\"):rep(300000)\n"
        "  for i = 1, 100000 do for w in s:gmatch(\"a\") do end end");
}
END_TEST

/* The end of a rule that returns one event, carrying the length of its string s. */
#define RETURN_AN_EVENT_OF_S                                                                       \
    "  return {feed = 'unbound', batch = {},\n"                                                    \
    "          event = {event_type = 'custom_event', data = {event_name = 'E', "                   \
    "custom_event_type = 'other', n = #s}}}\n"

/* Library calls are charged their wall-clock time; a thread descheduled during
 * one (a busy host) must not lose its event for it. One call, however long,
 * pays at most an eighth of the budget: here a string.rep of 8 MiB, over a
 * millisecond, against a budget of 20,000 instructions (some 0.1 ms). */
START_TEST(test_one_slow_library_call_pays_at_most_an_eighth_of_the_budget)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "20000", 1), 0);
    rule("50-rule.lua", "return function(event, out)\n"
                        "  local s = ('x'):rep(8 * 1024 * 1024)\n" RETURN_AN_EVENT_OF_S "end\n");
    build();
    maps_to_one_record(ENVELOPE(EV("e-1")));
}
END_TEST

/* Lua that a library call runs (a gsub replacement function, a sort
 * comparator) is counted by the count hook; the call's time took it in again,
 * and such rules met the limit at about half their budget. Six gsubs whose
 * function runs 900,000 instructions in all fit a budget of 1,500,000 (under a
 * tool, TEST_WRAPPER, which makes a call's time say little of its
 * instructions, twice that). */
START_TEST(test_lua_run_inside_a_library_call_is_charged_once)
{
    const char *wrapper = getenv("TEST_WRAPPER");
    ck_assert_int_eq(
        setenv("TRIBUTARY_RULES_INSTRUCTIONS", wrapper && *wrapper ? "3000000" : "1500000", 1), 0);
    rule("50-rule.lua", "local function cb(c)\n"
                        "  local n = 0\n"
                        "  for i = 1, 400 do n = n + i end\n"
                        "  return c\n"
                        "end\n"
                        "return function(event, out)\n"
                        "  local s = ('x'):rep(188)\n"
                        "  for i = 1, 6 do s = s:gsub('.', cb) end\n" RETURN_AN_EVENT_OF_S "end\n");
    build();
    /* a call's time says more than its instructions on a busy host (another
     * process takes the core mid-call): up to three tries, where charging the
     * Lua twice fails every one */
    for (int tries = 1;; tries++) {
        ck_assert_int_eq(map(ENVELOPE(EV("e-1")), INPUT_ENVELOPE), 0);
        if (F.m.ndead == 0 || tries == 3)
            break;
        mapping_free(&F.m);
        mapping_init(&F.m);
        F.m.keep_outcomes = 1;
    }
    ck_assert_msg(F.m.ndead == 0, "dead letter: %s", F.m.ndead ? F.m.dead[0].detail.p : "");
    ck_assert_uint_eq(F.m.nrecords, 1);
}
END_TEST

/* After a call that took longer than its share, the event's next calls are
 * timed by the thread's CPU time and pay it in full: a second slow call ends
 * the event. */
START_TEST(test_a_second_slow_library_call_pays_its_cpu_time_in_full)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "20000", 1), 0);
    const struct dead_letter *d =
        dead_from("return function(event, out)\n"
                  "  for i = 1, 2 do local s = ('x'):rep(8 * 1024 * 1024) end\n"
                  "end\n");
    ck_assert_str_eq(d->reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(d->detail.p, "instruction"), "detail: %s", d->detail.p);
}
END_TEST

/* A rule file that makes a slow library call, 8 MiB of string.rep, and
 * returns what it was given. */
#define SLOW_CALL_RULE                                                                             \
    "return function(event, out)\n"                                                                \
    "  local s = ('x'):rep(8 * 1024 * 1024)\n"                                                     \
    "  return out\n"                                                                               \
    "end\n"

/* The budget is the event's, for all its rules together: after one slow call
 * paid its eighth by the wall clock, the next, in another file, pays its CPU
 * time in full. Each file began afresh, and eight files with one slow call each
 * (1.1 s apiece) mapped an event in 10 s. */
START_TEST(test_a_slow_library_call_in_the_next_file_pays_its_cpu_time_in_full)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "20000", 1), 0);
    rule("10-slow.lua", SLOW_CALL_RULE);
    rule("20-slow.lua", SLOW_CALL_RULE);
    rule("30-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("s-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.dead[0].reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "instruction limit exceeded") &&
                      contains(F.m.dead[0].detail.p, "20-slow.lua"),
                  "detail: %s", F.m.dead[0].detail.p);
}
END_TEST

/* A slow call pays at most an eighth of the event's budget, not of what the
 * files before it left: that share shrank with what was left, so that the
 * budget was never used up by such calls. Here the first file runs 96% of
 * the budget, and the slow call of the second takes it past. */
START_TEST(test_a_slow_library_call_pays_an_eighth_of_the_events_budget_after_other_files)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000", 1), 0);
    rule("10-loop.lua", "return function(event, out)\n"
                        "  for i = 1, 96000 do end\n"
                        "end\n");
    rule("20-slow.lua", SLOW_CALL_RULE);
    rule("30-pass.lua", PASS_RULE);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("s-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.dead[0].reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "20-slow.lua"), "detail: %s",
                  F.m.dead[0].detail.p);
    /* the loop alone is within the budget */
    release();
    mapping_init(&F.m);
    char path[256];
    snprintf(path, sizeof path, "%s/20-slow.lua", F.rules_dir);
    ck_assert_int_eq(unlink(path), 0);
    build();
    maps_to_one_record(ENVELOPE(EV("s-2")));
}
END_TEST

START_TEST(test_a_plain_search_too_large_for_one_call_is_refused)
{
    /* refused before any work: the budget only keeps building the strings from
     * counting, however slow the build (sanitizers, valgrind) */
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "1000000000", 1), 0);
    const struct dead_letter *d = dead_from("return function(event, out)\n"
                                            "  local s = (\"a\"):rep(400000)\n"
                                            "  s:find((\"a\"):rep(200000) .. \"b\", 1, true)\n"
                                            "end\n");
    ck_assert_str_eq(d->reason, DEAD_RULE_ERROR);
    ck_assert_msg(contains(d->detail.p, "plain search"), "detail: %s", d->detail.p);
}
END_TEST

START_TEST(test_table_insert_refuses_a_table_with_a_len_metamethod)
{
    const struct dead_letter *d =
        dead_from("return function(event, out)\n"
                  "  local t = setmetatable({}, {__len = function() return 2^40 end})\n"
                  "  table.insert(t, 1, \"x\")\n"
                  "end\n");
    ck_assert_str_eq(d->reason, DEAD_RULE_ERROR);
    ck_assert_msg(contains(d->detail.p, "__len"), "detail: %s", d->detail.p);
}
END_TEST

START_TEST(test_instruction_limit_asks_for_a_rebuild)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000", 1), 0);
    rule("50-loop.lua", LOOP_RULE);
    build();
    ck_assert_ptr_null(rules_needs_rebuild(F.r));
    struct bounded res;
    map_bounded(ENVELOPE(EV("l-1")), 10000, &res);
    ck_assert_msg(res.finished, "rules_map did not return within 10 s");
    ck_assert_int_ne(res.rebuild, 0);
}
END_TEST

START_TEST(test_a_state_that_outgrows_its_memory_asks_for_a_rebuild)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "2", 1), 0);
    /* about 0.8 MB more for every request, each within the limit of a call */
    rule("50-hoard.lua",
         "local keep = {}\n"
         "return function(event, out)\n"
         "  for i = 1, 10000 do keep[#keep + 1] = {i} end\n"
         "  return {feed = \"unbound\", batch = {},\n"
         "          event = {event_type = \"uninstall\", data = {}, id = event.id}}\n"
         "end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("h-1")), INPUT_ENVELOPE), 0);
    ck_assert_ptr_null(rules_needs_rebuild(F.r));
    ck_assert_int_eq(map(ENVELOPE(EV("h-2")), INPUT_ENVELOPE), 0);
    ck_assert_int_eq(map(ENVELOPE(EV("h-3")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 3);
    ck_assert_uint_eq(F.m.ndead, 0);
    const char *why = rules_needs_rebuild(F.r);
    ck_assert_ptr_nonnull(why);
    ck_assert_str_eq(
        why, "the state holds more than rules.memory_mb beyond what its files' top level left");
}
END_TEST

/* Lookup tables built at the top level of two files hold more than
 * rules.memory_mb together, each file within it: they are the state's own,
 * and a request that adds nothing does not make it be rebuilt. */
START_TEST(test_top_level_tables_over_the_memory_limit_together_need_no_rebuild)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "2", 1), 0);
    const char *big = "local T = {}\n"
                      "for i = 1, 20000 do T[i] = string.format('%08d-padding', i) end\n"
                      "return function(event, out)\n"
                      "  return {feed = 'unbound', batch = {}, event = {event_type = 'uninstall',\n"
                      "          data = {n = #T}}}\n"
                      "end\n";
    rule("50-a.lua", big);
    rule("60-b.lua", big);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("t-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    ck_assert_ptr_null(rules_needs_rebuild(F.r));
}
END_TEST

START_TEST(test_infinite_loop_returns_well_under_a_second)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000", 1), 0);
    rule("50-loop.lua", LOOP_RULE);
    build();
    struct bounded res;
    map_bounded(ENVELOPE(EV("l-1")), 10000, &res);
    ck_assert_msg(res.finished, "rules_map did not return within 10 s");
    ck_assert_int_lt(res.ms, 500);
}
END_TEST

START_TEST(test_pcall_cannot_swallow_the_instruction_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000", 1), 0);
    rule("50-pcall.lua", "return function(event, out)\n"
                         "  while true do\n"
                         "    pcall(function() while true do end end)\n"
                         "  end\n"
                         "  return {feed = \"unbound\", batch = {},\n"
                         "          event = {event_type = \"uninstall\", data = {}}}\n"
                         "end\n");
    struct bounded res;
    one_event_hits_a_limit(10000, &res);
}
END_TEST

/* xpcall cannot swallow the limit, nor can its handler run past it: the error
 * of a tripped limit is raised in the count hook, where hooks are off, and a
 * handler run from there looped without any limit. */
static const char *const XPCALL_HANDLERS[] = {"function(m) return m end",
                                              "function(m) while true do end end"};

START_TEST(test_xpcall_cannot_swallow_the_instruction_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000", 1), 0);
    char src[512];
    snprintf(src, sizeof src,
             "return function(event, out)\n"
             "  local ok = xpcall(function() while true do end end, %s)\n"
             "  return {feed = \"unbound\", batch = {},\n"
             "          event = {event_type = \"uninstall\", data = {}, ok = ok}}\n"
             "end\n",
             XPCALL_HANDLERS[_i]);
    rule("50-xpcall.lua", src);
    struct bounded res;
    one_event_hits_a_limit(10000, &res);
}
END_TEST

/* The memory limit trips where a protected call sees the memory error: pcall
 * and xpcall cannot catch it. */
START_TEST(test_pcall_and_xpcall_cannot_swallow_the_memory_limit)
{
    /* each rep is charged its time, up to an eighth of the budget: a budget
     * that a loaded machine (a sanitizer build beside other work) cannot
     * spend in the rep calls up to the memory limit */
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "10000000000", 1), 0);
    static const char *const calls[] = {
        "pcall(grow)", "xpcall(grow, function(m) return m end)", "pcall(string.rep, 'x', 2^28)",
        /* an error of its own as the stack unwinds replaced the memory error */
        "pcall(function()\n"
        "    local c <close> = setmetatable({}, {__close = function() error('mine') end})\n"
        "    local a = ('x'):rep(16)\n"
        "    while true do a = a .. a end\n"
        "  end)"};
    for (size_t i = 0; i < ARRAY_LEN(calls); i++) {
        char src[1024];
        snprintf(src, sizeof src,
                 "local function grow()\n"
                 "  local t = {}\n"
                 "  while true do t[#t + 1] = ('x'):rep(10000000) .. #t end\n"
                 "end\n"
                 "return function(event, out)\n"
                 "  %s\n"
                 "  return {feed = 'unbound', batch = {},\n"
                 "          event = {event_type = 'uninstall', data = {}}}\n"
                 "end\n",
                 calls[i]);
        if (i > 0) { /* a new engine for each */
            release();
            mapping_init(&F.m);
            F.m.keep_outcomes = 1;
        }
        rule("50-rule.lua", src);
        struct bounded res;
        const char *detail = one_event_hits_a_limit(30000, &res);
        ck_assert_msg(contains(detail, "memory limit exceeded"), "%s: %s", calls[i], detail);
    }
}
END_TEST

/* Lua collects its garbage and asks again when an allocation is refused: a
 * rule that keeps 48 MiB while it makes 8 MiB of garbage at a time is within
 * 64 MiB, though an allocation was refused on the way (it was dead-lettered
 * as rule_limit, its state marked damaged). Only memory is tested: joining
 * strings of 8 MiB runs past the default budget's time limit under
 * AddressSanitizer on a busy machine. */
START_TEST(test_memory_the_collector_frees_on_a_refusal_is_within_the_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    rule("50-rule.lua", "return function(event, out)\n"
                        "  local s = ('x'):rep(1024)\n"
                        "  for i = 1, 13 do s = s .. s end\n"
                        "  local parts = {}\n"
                        "  for i = 1, 4 do parts[i] = s .. i end\n"
                        "  for j = 1, 20 do local g = s .. 'g' .. j end\n"
                        "  return {feed = 'unbound', batch = {},\n"
                        "          event = {event_type = 'uninstall', data = {}}}\n"
                        "end\n");
    build();
    maps_to_one_record(ENVELOPE(EV("g-1")));
}
END_TEST

START_TEST(test_growing_string_hits_the_memory_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "8", 1), 0);
    /* Only memory can stop it. */
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    const struct dead_letter *d = dead_from("return function(event, out)\n"
                                            "  local keep, n = {}, 1024\n"
                                            "  while true do\n"
                                            "    keep[#keep + 1] = string.rep(\"x\", n)\n"
                                            "    n = n * 2\n"
                                            "  end\n"
                                            "end\n");
    ck_assert_str_eq(d->reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(d->detail.p, "memory"), "detail: %s", d->detail.p);
}
END_TEST

START_TEST(test_growing_table_hits_the_memory_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "8", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    const struct dead_letter *d = dead_from("return function(event, out)\n"
                                            "  local t, i = {}, 0\n"
                                            "  while true do\n"
                                            "    i = i + 1\n"
                                            "    t[i] = {i}\n"
                                            "  end\n"
                                            "end\n");
    ck_assert_str_eq(d->reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(d->detail.p, "memory"), "detail: %s", d->detail.p);
}
END_TEST

/* With rules.memory_mb = 1: each file keeps 60% of it alive in `out` until the
 * event's rules are done, in strings of 1% so that no one allocation comes near
 * the limit. */
#define KEEP_60_PERCENT_A                                                                          \
    "return function(event, out)\n"                                                                \
    "  local keep = {}\n"                                                                          \
    "  for i = 1, 60 do keep[i] = string.rep(\"a\", 10485) end\n"                                  \
    "  return {feed = \"unbound\", batch = {}, keep_a = keep,\n"                                   \
    "          event = {event_type = \"uninstall\", data = {}, id = event.id}}\n"                  \
    "end\n"

#define KEEP_60_PERCENT_B                                                                          \
    "return function(event, out)\n"                                                                \
    "  local keep = {}\n"                                                                          \
    "  for i = 1, 60 do keep[i] = string.rep(\"b\", 10485) end\n"                                  \
    "  out.keep_a = nil\n"                                                                         \
    "  return out\n"                                                                               \
    "end\n"

START_TEST(test_one_file_using_60_percent_of_the_memory_limit_is_within_it)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "1", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    rule("10-a.lua", KEEP_60_PERCENT_A);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("m-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.ndead, 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
}
END_TEST

START_TEST(test_two_files_using_60_percent_each_for_one_event_exceed_the_memory_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "1", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    rule("10-a.lua", KEEP_60_PERCENT_A);
    rule("20-b.lua", KEEP_60_PERCENT_B);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("m-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 0);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.dead[0].reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "memory"), "detail: %s", F.m.dead[0].detail.p);
}
END_TEST

/* Memory a rule keeps from one event to the next counts towards the event that
 * allocated it, and all the events of a request together may keep no more than
 * rules.memory_mb: the state grew by that much per event, without a bound
 * over a request of thousands. */
START_TEST(test_memory_kept_from_earlier_events_is_bounded_per_request)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_MEMORY_MB", "1", 1), 0);
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "100000000", 1), 0);
    /* each event keeps 40% of rules.memory_mb in a global (README, Limits) */
    rule("10-hoard.lua",
         "kept = {}\n"
         "return function(event, out)\n"
         "  local keep = {}\n"
         "  for i = 1, 40 do keep[i] = string.rep(\"k\", 10485) end\n"
         "  kept[#kept + 1] = keep\n"
         "  return {feed = \"unbound\", batch = {},\n"
         "          event = {event_type = \"uninstall\", data = {}, id = event.id}}\n"
         "end\n");
    build();
    ck_assert_int_eq(
        map(ENVELOPE(EV("k-1") "," EV("k-2") "," EV("k-3") "," EV("k-4")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 2);
    ck_assert_uint_eq(F.m.ndead, 2);
    for (size_t i = 0; i < F.m.ndead; i++) {
        ck_assert_str_eq(F.m.dead[i].reason, DEAD_RULE_LIMIT);
        ck_assert_msg(contains(F.m.dead[i].detail.p, "from the request's earlier events"), "%s",
                      F.m.dead[i].detail.p);
    }
    ck_assert_ptr_nonnull(rules_needs_rebuild(F.r));
}
END_TEST

/* An event that meets the memory limit by itself is not said to meet it for
 * what earlier events kept: their garbage, not yet collected, is no reason. */
START_TEST(test_memory_an_event_takes_by_itself_is_not_blamed_on_earlier_events)
{
    /* the memory limit, before the time limit: copying 64 MiB of string
     * under AddressSanitizer outlasted the default's */
    setenv("TRIBUTARY_RULES_INSTRUCTIONS", LIBRARY_TEST_INSTRUCTIONS, 1);
    rule("10-grow.lua", "return function(event, out)\n"
                        "  local s = 'x'\n"
                        "  if event.id == 'g-2' then for i = 1, 27 do s = s .. s end end\n"
                        "  for i = 1, 20 do s = s .. i end\n"
                        "  return {feed = 'unbound', batch = {},\n"
                        "          event = {event_type = 'uninstall', data = {}, id = event.id}}\n"
                        "end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("g-1") "," EV("g-2")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert_str_eq(F.m.dead[0].reason, DEAD_RULE_LIMIT);
    ck_assert_msg(contains(F.m.dead[0].detail.p, "memory limit exceeded (rules.memory_mb: 64 MiB)"),
                  "detail: %s", F.m.dead[0].detail.p);
}
END_TEST

/* A memory error calls no message handler: the line that met the limit is
 * noted by the count hook once the state is near its limit, or by the library
 * call or pcall that met it. */
START_TEST(test_memory_limit_met_names_the_line)
{
    setenv("TRIBUTARY_RULES_INSTRUCTIONS", LIBRARY_TEST_INSTRUCTIONS, 1);
    setenv("TRIBUTARY_RULES_MEMORY_MB", "8", 1);
    static const struct {
        const char *src, *line;
    } cases[] = {
        {"local t = {}\n"
         "return function(event, out)\n"
         "  for i = 1, 1e7 do\n"
         "    t[#t + 1] = { i }\n"
         "  end\n"
         "end\n",
         "10-mem.lua:4)"},
        {"local function deep(n, acc)\n"
         "  local t = { n, acc }\n"
         "  return 1 + deep(n + 1, t)\n"
         "end\n"
         "return function(event, out) deep(1, {}) end\n",
         "10-mem.lua:2)"},
        {"local t = {}\n"
         "return function(event, out)\n"
         "  pcall(function()\n"
         "    for i = 1, 1e7 do\n"
         "      t[#t + 1] = { i }\n"
         "    end\n"
         "  end)\n"
         "end\n",
         "10-mem.lua:5)"},
        {"return function(event, out)\n"
         "  local s = string.rep('x', 1e9)\n"
         "end\n",
         "10-mem.lua:2)"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        rule("10-mem.lua", cases[i].src);
        build();
        ck_assert_int_eq(map(ENVELOPE(EV("m-1")), INPUT_ENVELOPE), 0);
        ck_assert_uint_eq(F.m.ndead, 1);
        ck_assert_str_eq(F.m.dead[0].reason, DEAD_RULE_LIMIT);
        ck_assert_msg(
            contains(F.m.dead[0].detail.p, "memory limit exceeded (rules.memory_mb: 8 MiB)"),
            "case %zu: %s", i, F.m.dead[0].detail.p);
        ck_assert_msg(contains(F.m.dead[0].detail.p, cases[i].line), "case %zu: %s", i,
                      F.m.dead[0].detail.p);
        release();
    }
}
END_TEST

/* Loads the rules and expects building an engine to fail within deadline_ms,
 * or three times the top level's time limit when that is longer (the limit
 * scales with the speed this process measured: under valgrind on a slow host,
 * a minute or more); returns rules_new's message. */
static const char *rules_new_fails(long deadline_ms, struct bounded *res)
{
    long limit_ms = (long)(sandbox_deadline_for(0, RULES_LOAD_INSTRUCTIONS) / 1000000);
    if (deadline_ms < 3 * limit_ms)
        deadline_ms = 3 * limit_ms;
    prepare();
    bounded_run(child_rules_new, deadline_ms, res);
    ck_assert_msg(res->finished, "rules_new did not return within %ld ms", deadline_ms);
    ck_assert_int_eq(res->rc, -1);
    return res->err;
}

START_TEST(test_top_level_infinite_loop_fails_rules_new_naming_the_file)
{
    rule("30-forever.lua", "while true do end\nreturn function() end\n");
    struct bounded res;
    const char *err = rules_new_fails(30000, &res);
    ck_assert_msg(contains(err, "30-forever.lua"), "err: %s", err);
}
END_TEST

/* Comparing two long strings is one VM instruction that costs what the
 * strings hold: a loop of them stays within the instruction budget for
 * minutes, so a call also has a time limit. */
#define LONG_COMPARE                                                                               \
    "local a = 'a' for i = 1, 20 do a = a .. a end\n"                                              \
    "local b = a .. ''\n"

START_TEST(test_a_rule_comparing_long_strings_in_a_loop_meets_the_time_limit)
{
    const char *detail = one_event_meets_the_time_limit(
        "50-compare.lua", LONG_COMPARE "return function(event, out)\n"
                                       "  local n = 0\n"
                                       "  while true do if a < b then n = n + 1 end end\n"
                                       "end\n");
    ck_assert_msg(contains(detail, "50-compare.lua"), "detail: %s", detail);
}
END_TEST

/* Converting text to a number works through the text in C: each conversion
 * pays for its time, so that a loop of them on megabytes of digits runs out of
 * instructions at once instead of running on to the time limit and past it
 * (the clock is read between instructions). The same for arithmetic on such
 * text, which converts it. */
#define LONG_DIGITS "local digits = string.rep('7', 4 * 1024 * 1024)\n"

static const char *const LONG_TEXT_CONVERSIONS[] = {"tonumber(digits)", "digits + 0"};

START_TEST(test_converting_long_text_to_a_number_pays_for_its_time)
{
    char src[256];
    snprintf(src, sizeof src,
             LONG_DIGITS "return function(event, out)\n"
                         "  while true do local x = %s end\n"
                         "end\n",
             LONG_TEXT_CONVERSIONS[_i]);
    rule("50-convert.lua", src);
    struct bounded res;
    const char *detail = one_event_hits_a_limit(60000, &res);
    ck_assert_msg(contains(detail, "instruction limit exceeded"), "%s: %s",
                  LONG_TEXT_CONVERSIONS[_i], detail);
}
END_TEST

START_TEST(test_os_date_refuses_a_long_format)
{
    /* string.rep pays for its time in instructions: a loaded machine under
     * AddressSanitizer took the default budget */
    setenv("TRIBUTARY_RULES_INSTRUCTIONS", LIBRARY_TEST_INSTRUCTIONS, 1);
    /* 256 bytes are a format; 257, and 400,000, are refused */
    const char *seen = probe("(os.date(('x'):rep(256), 0) == ('x'):rep(256) and 'ok' or 'no')"
                             " .. ' | ' .. select(2, pcall(os.date, ('x'):rep(257), 0))"
                             " .. ' | ' .. select(2, pcall(os.date, ('%Y'):rep(200000), 0))");
    ck_assert_msg(strncmp(seen, "ok | ", 5) == 0, "%s", seen);
    const char *first = strstr(seen, "os.date: a format of more than 256 bytes");
    ck_assert_msg(first && strstr(first + 1, "os.date: a format of more than 256 bytes"), "%s",
                  seen);
}
END_TEST

/* The rule file `name` must end its event at the time limit, and a second
 * event within half of it and half a second more (under a tool, TEST_WRAPPER,
 * 10 s more: one such instruction takes a second there, and a signal waits for
 * the tool's scheduler). */
static void assert_stops_soon_after_the_time_limit(const char *name, const char *src)
{
    const char *wrapper = getenv("TEST_WRAPPER");
    long slack_ms = wrapper && *wrapper ? 10000 : 500;
    const char *detail = one_event_meets_the_time_limit(name, src);
    const char *p = strstr(detail, "ran for more than ");
    ck_assert_ptr_nonnull(p);
    long limit_ms = strtol(p + strlen("ran for more than "), NULL, 10);
    ck_assert_int_gt(limit_ms, 0);
    struct bounded res;
    map_bounded(ENVELOPE(EV("l-2")), 60000, &res);
    ck_assert(res.finished);
    ck_assert_uint_eq(res.ndead, 1);
    ck_assert_msg(res.ms < limit_ms + slack_ms + limit_ms / 2, "took %ld ms, limit %ld ms", res.ms,
                  limit_ms);
}

/* Joining two 16 MiB strings takes milliseconds in one instruction: between
 * two readings of the clock by the count hook, a loop of them ran for seconds
 * past the time limit. An allocation that large reads the clock itself. */
START_TEST(test_building_long_strings_in_a_loop_stops_soon_after_the_time_limit)
{
    assert_stops_soon_after_the_time_limit("50-join.lua",
                                           "local a = string.rep('a', 16 * 1024 * 1024)\n"
                                           "return function(event, out)\n"
                                           "  while true do local x = a .. a end\n"
                                           "end\n");
}
END_TEST

/* Comparing a string of NUL bytes is one instruction that takes what it holds
 * (Lua compares with strcoll, once per NUL): 16 ms for 2 MiB, and a thousand
 * instructions pass between two readings of the clock by the count hook, so
 * the loop ran for seconds past its time limit (a minute with 32 MiB). The
 * watchdog ends it at its next instruction. */
START_TEST(test_a_loop_of_costly_comparisons_stops_soon_after_the_time_limit)
{
    assert_stops_soon_after_the_time_limit("50-nul.lua",
                                           "local s = string.rep('\\0', 2 * 1024 * 1024)\n"
                                           "return function(event, out)\n"
                                           "  while true do if s < s then end end\n"
                                           "end\n");
}
END_TEST

/* gsub looks its replacement table up, or calls its replacement function, in
 * C for each match, where the count hook cannot stop it: through a chain of
 * 1,990 tables linked by __index, a gsub over a megabyte ran for 22 s; with
 * pcall for replacement, one over 8 MB for 3 s; and the event went on within
 * every limit. Each match now looks at the time limit. */
static const char *const SLOW_REPLACEMENTS[] = {
    "local s, chain = string.rep('a', 1000000), {}\n"
    "for i = 1, 1990 do chain = setmetatable({}, {__index = chain}) end\n"
    "return function(event, out)\n"
    "  string.gsub(s, '.', chain)\n"
    "  return false, 'done'\n"
    "end\n",
    "local s = string.rep('a', 8000000)\n"
    "return function(event, out)\n"
    "  string.gsub(s, '.', pcall)\n"
    "  return false, 'done'\n"
    "end\n",
};

START_TEST(test_a_gsub_whose_replacement_works_in_c_stops_soon_after_the_time_limit)
{
    assert_stops_soon_after_the_time_limit("50-gsub.lua", SLOW_REPLACEMENTS[_i]);
}
END_TEST

/* The replacement behind the look at the time limit is what gsub makes of it:
 * a table looked up with the first capture (or the match, or its position),
 * through __index; a function called with every capture; false or nil keeps
 * the match; anything else is an error. */
START_TEST(test_gsub_with_a_table_or_a_function_replaces_as_lua_does)
{
    const char *seen =
        probe("(function()\n"
              "  local upper = setmetatable({}, {__index = function(t, k) return k:upper() end})\n"
              "  local parts = {\n"
              "    ('abc'):gsub('%a', upper),\n"
              "    ('abc'):gsub('%a', {a = '1', b = 2, c = false}),\n"
              "    ('k=v, x=y'):gsub('(%w)=(%w)', {k = 'K'}),\n"
              "    ('ab'):gsub('()', {[1] = '<', [3] = '>'}),\n"
              "    ('a b'):gsub('%a', string.upper),\n"
              "    ('k=v'):gsub('(%w)=(%w)', function(k, v) return v .. '=' .. k end),\n"
              "    ('aaa'):gsub('a', function() end, 2),\n"
              "    ('ab'):gsub('a', 1.5),\n"
              "    select(2, pcall(string.gsub, 'a', 'a', {a = {}})),\n"
              "    select(2, pcall(string.gsub, 'a', 'a', function() return {} end)),\n"
              "  }\n"
              "  return table.concat(parts, '|')\n"
              "end)()");
    ck_assert_str_eq(seen, "ABC|12c|K, x=y|<ab>|A B|v=k|aaa|1.5b|invalid replacement value (a "
                           "table)|invalid replacement value (a table)");
}
END_TEST

/* The time limit is the event's too, from the start of its first rule: each
 * file had one of its own, so that files comparing long strings for most of
 * it each ran an event for as many times the limit. Here each of two files
 * compares for 60% of it (by os.clock, the time the process ran). */
START_TEST(test_the_rule_files_of_an_event_share_one_time_limit)
{
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "1000000", 1), 0);
    double limit_s = (double)sandbox_deadline_for(0, 1000000) / 1e9;
    char src[512];
    snprintf(src, sizeof src,
             "local s = ('\\0'):rep(256 * 1024)\n"
             "return function(event, out)\n"
             "  local start = os.clock()\n"
             "  while os.clock() - start < %.3f do if s < s then end end\n"
             "end\n",
             0.6 * limit_s);
    rule("10-compare.lua", src);
    rule("20-compare.lua", src);
    rule("30-pass.lua", PASS_RULE);
    struct bounded res;
    const char *detail = one_event_hits_a_limit(60000, &res);
    ck_assert_msg(contains(detail, "time limit exceeded"), "detail: %s", detail);
}
END_TEST

/* The context switches of this process's thread called name, or -1 when none
 * is. */
static long thread_switches(const char *name)
{
    DIR *tasks = opendir("/proc/self/task");
    ck_assert_ptr_nonnull(tasks);
    long switches = -1;
    for (struct dirent *e; switches < 0 && (e = readdir(tasks)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        int named = fgets(comm, sizeof comm, f) != NULL;
        comm[strcspn(comm, "\n")] = '\0';
        named = named && strcmp(comm, name) == 0;
        fclose(f);
        snprintf(path, sizeof path, "/proc/self/task/%s/status", e->d_name);
        if (!named || !(f = fopen(path, "r")))
            continue;
        char line[256];
        long n;
        switches = 0;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "voluntary_ctxt_switches: %ld", &n) == 1 ||
                sscanf(line, "nonvoluntary_ctxt_switches: %ld", &n) == 1)
                switches += n;
        fclose(f);
    }
    closedir(tasks);
    return switches;
}

/* The watchdog looks at the calls under way every 20 ms; with none, it sleeps
 * until one begins, instead of waking 50 times a second. */
START_TEST(test_the_watchdog_sleeps_while_no_rule_runs)
{
    rule("50-pass.lua", "return function(event, out) return out end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("w-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.noutcomes, 1);
    usleep(200 * 1000); /* its look after that call */
    long before = thread_switches("rules-watch");
    ck_assert_int_ge(before, 0);
    usleep(600 * 1000);
    long after = thread_switches("rules-watch");
    ck_assert_msg(after - before <= 1, "the watchdog woke %ld times in 0.6 s", after - before);
    /* and it still watches: a rule past its time limit ends there */
    release();
    mapping_init(&F.m);
    F.m.keep_outcomes = 1;
    assert_stops_soon_after_the_time_limit("50-nul.lua",
                                           "local s = string.rep('\\0', 2 * 1024 * 1024)\n"
                                           "return function(event, out)\n"
                                           "  while true do if s < s then end end\n"
                                           "end\n");
}
END_TEST

START_TEST(test_top_level_code_comparing_long_strings_meets_the_time_limit)
{
    rule("30-compare.lua", LONG_COMPARE "while true do if a < b then end end\n"
                                        "return function() end\n");
    struct bounded res;
    const char *err = rules_new_fails(60000, &res);
    ck_assert_msg(contains(err, "30-compare.lua"), "err: %s", err);
    ck_assert_msg(contains(err, "time limit exceeded"), "err: %s", err);
}
END_TEST

/* Leaving out a rule file that cannot be read (a link whose target is gone)
 * could forward what it would drop: the set is refused, naming the file. A
 * directory named *.lua is no rule file and is passed over. */
START_TEST(test_a_dangling_rule_file_link_refuses_the_set_and_a_directory_is_passed_over)
{
    rule("10-pass.lua", PASS_RULE);
    char path[512];
    snprintf(path, sizeof path, "%s/20-dir.lua", F.rules_dir);
    ck_assert_int_eq(mkdir(path, 0700), 0);
    prepare();
    ck_assert_uint_eq(ruleset_files(F.rs), 1);
    ruleset_unref(F.rs);
    F.rs = NULL;
    snprintf(path, sizeof path, "%s/50-drop-test-users.lua", F.rules_dir);
    ck_assert_int_eq(symlink("/nonexistent/shared-rule.lua", path), 0);
    char err[ERR_LEN] = "";
    ck_assert_int_eq(ruleset_load(&F.rs, F.cfg, err, sizeof err), -1);
    ck_assert_msg(contains(err, "50-drop-test-users.lua: cannot read: No such file or directory"),
                  "%s", err);
}
END_TEST

/* Switches the link F.root/current between F.root/v1 and F.root/v2 until
 * told to stop. */
static _Atomic int switching;

static void *switch_link(void *arg)
{
    (void)arg;
    char link[160], tmp[160];
    snprintf(link, sizeof link, "%s/current", F.root);
    snprintf(tmp, sizeof tmp, "%s/current.tmp", F.root);
    for (int i = 0; atomic_load(&switching); i++) {
        if (symlink(i % 2 ? "v1" : "v2", tmp) != 0 || rename(tmp, link) != 0)
            return (void *)1;
    }
    return NULL;
}

/* The version of the rules in F.root/current (config and ruleset loaded). */
static void current_version(char *out, size_t len)
{
    release();
    prepare();
    str_copy(out, len, ruleset_version(F.rs));
}

/* The README's way to change several files at once: a new directory, switched
 * in through a link. A reload while the link switches loads the files of one
 * directory or of the other, never some of each (each file was read through
 * the link before, which could change between two files). */
START_TEST(test_rules_dir_switched_through_a_link_while_loading_gives_one_version_or_the_other)
{
    char dir[160], link[160], path[192];
    const char *const versions[] = {"v1", "v2"};
    char want[2][32];
    snprintf(link, sizeof link, "%s/current", F.root);
    for (int v = 0; v < 2; v++) {
        snprintf(dir, sizeof dir, "%s/%s", F.root, versions[v]);
        ck_assert_int_eq(mkdir(dir, 0700), 0);
        for (int k = 0; k < 8; k++) {
            char src[128];
            snprintf(path, sizeof path, "%s/%d0-stamp.lua", dir, k);
            snprintf(src, sizeof src, "return function(e, out) e.stamp_%d = '%s' end\n", k,
                     versions[v]);
            unit_write(path, src);
        }
        unlink(link);
        ck_assert_int_eq(symlink(versions[v], link), 0);
        ck_assert_int_eq(setenv("TRIBUTARY_RULES_DIR", link, 1), 0);
        current_version(want[v], sizeof want[v]);
    }
    ck_assert_str_ne(want[0], want[1]);

    atomic_store(&switching, 1);
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, switch_link, NULL), 0);
    int mixed = 0, loads = 0;
    char got[32] = "";
    for (; loads < 2000 && !mixed; loads++) {
        char err[ERR_LEN] = "";
        ruleset_unref(F.rs);
        F.rs = NULL;
        ck_assert_msg(ruleset_load(&F.rs, F.cfg, err, sizeof err) == 0, "%s", err);
        str_copy(got, sizeof got, ruleset_version(F.rs));
        mixed = strcmp(got, want[0]) != 0 && strcmp(got, want[1]) != 0;
    }
    atomic_store(&switching, 0);
    void *failed;
    ck_assert_int_eq(pthread_join(t, &failed), 0);
    ck_assert_ptr_null(failed);
    ck_assert_msg(!mixed, "load %d: version %s is neither %s nor %s", loads, got, want[0], want[1]);
}
END_TEST

/* Loads the rule file name and expects rules_new to refuse it; returns why. */
static const char *rules_new_refuses(const char *name, const char *src)
{
    static char err[ERR_LEN];
    rule(name, src);
    prepare();
    err[0] = '\0';
    ck_assert_int_eq(rules_new(&F.r, F.rs, err, sizeof err), -1);
    ck_assert_ptr_null(F.r);
    return err;
}

/* A file's top level that meets the memory limit: the setting and the line. */
START_TEST(test_memory_limit_at_a_files_top_level_names_the_setting_and_the_line)
{
    const char *err = rules_new_refuses("20-big.lua", "local keep = {}\n"
                                                      "local s = string.rep('x', 1e9)\n"
                                                      "return function(event, out) end\n");
    ck_assert_msg(contains(err, "memory limit exceeded (rules.memory_mb: 64 MiB)"), "err: %s", err);
    ck_assert_msg(contains(err, "20-big.lua:2)"), "err: %s", err);
    release();
}
END_TEST

START_TEST(test_syntax_error_fails_rules_new_with_file_and_line)
{
    const char *err = rules_new_refuses("30-syntax.lua",
                                        "return function(event, out)\n  return {feed = }\nend\n");
    ck_assert_msg(contains(err, "30-syntax.lua:2:"), "err: %s", err);
}
END_TEST

/* An error raised by a file's top level names the file and line, whatever the
 * error object: check, a reload's refusal and the start say where to look. */
static const char *const TOP_LEVEL_ERRORS[] = {"error({code = 1})", "error('bad setting', 0)",
                                               "local x = os.date(string.rep('%c', 300))"};

START_TEST(test_a_top_level_error_fails_rules_new_with_file_and_line)
{
    char src[256];
    snprintf(src, sizeof src, "local n = 1\n%s\nreturn function() end\n", TOP_LEVEL_ERRORS[_i]);
    const char *err = rules_new_refuses("30-top.lua", src);
    ck_assert_msg(contains(err, "30-top.lua:2"), "%s: %s", TOP_LEVEL_ERRORS[_i], err);
}
END_TEST

/* Lua's own loader of files skips a UTF-8 byte-order mark, as some editors write. */
START_TEST(test_a_rule_file_with_a_byte_order_mark_loads)
{
    rule("30-bom.lua", "\xEF\xBB\xBF" PASS_RULE);
    prepare();
    char err[ERR_LEN] = "";
    ck_assert_msg(rules_new(&F.r, F.rs, err, sizeof err) == 0, "%s", err);
}
END_TEST

START_TEST(test_a_compiled_chunk_fails_rules_new_naming_the_file)
{
    const char *err = rules_new_refuses("30-compiled.lua", "\x1bLua\x54");
    ck_assert_msg(contains(err, "30-compiled.lua: a compiled (binary) chunk"), "%s", err);
}
END_TEST

/* ==== the sandbox ========================================================= */

/* The control for the probes below: what the sandbox offers is seen as such. */
START_TEST(test_allowed_functions_are_reachable)
{
    ck_assert_str_eq(probe("type(os.time) .. type(string.format) .. type(pcall)"),
                     "functionfunctionfunction");
}
END_TEST

START_TEST(test_io_is_not_reachable)
{
    ck_assert_str_eq(probe("io"), "nil");
}
END_TEST

START_TEST(test_os_execute_is_not_reachable)
{
    ck_assert_str_eq(probe("os.execute"), "nil");
}
END_TEST

START_TEST(test_os_getenv_is_not_reachable)
{
    ck_assert_str_eq(probe("os.getenv"), "nil");
}
END_TEST

START_TEST(test_require_is_not_reachable)
{
    ck_assert_str_eq(probe("require"), "nil");
}
END_TEST

START_TEST(test_debug_is_not_reachable)
{
    ck_assert_str_eq(probe("debug"), "nil");
}
END_TEST

START_TEST(test_load_is_not_reachable)
{
    ck_assert_str_eq(probe("load"), "nil");
}
END_TEST

START_TEST(test_loadstring_is_not_reachable)
{
    ck_assert_str_eq(probe("loadstring"), "nil");
}
END_TEST

START_TEST(test_dofile_is_not_reachable)
{
    ck_assert_str_eq(probe("dofile"), "nil");
}
END_TEST

START_TEST(test_loadfile_is_not_reachable)
{
    ck_assert_str_eq(probe("loadfile"), "nil");
}
END_TEST

START_TEST(test_collectgarbage_is_not_reachable)
{
    ck_assert_str_eq(probe("collectgarbage"), "nil");
}
END_TEST

START_TEST(test_rawset_is_not_reachable)
{
    ck_assert_str_eq(probe("rawset"), "nil");
}
END_TEST

START_TEST(test_string_dump_is_not_reachable)
{
    ck_assert_str_eq(probe("string.dump"), "nil");
}
END_TEST

START_TEST(test_string_dump_is_not_reachable_through_a_string_value)
{
    ck_assert_str_eq(probe("(\"\").dump"), "nil");
}
END_TEST

START_TEST(test_string_metatable_is_hidden)
{
    const char *seen = probe("getmetatable(\"\")");
    ck_assert_msg(strncmp(seen, "table", 5) != 0 && strncmp(seen, "dead:", 5) != 0,
                  "getmetatable(\"\") gave %s", seen);
}
END_TEST

/* A shared table is a read-only view: `next` reads what it shows, as `pairs`
 * does (`next(tributary.feeds) == nil`, a test of emptiness, was always
 * true), and it still cannot be changed. */
START_TEST(test_next_reads_a_shared_table_through_its_view)
{
    rule("10-next.lua",
         "return function(event, out)\n"
         "  local n = 0\n"
         "  for _ in next, tributary.feeds do n = n + 1 end\n"
         "  local changed = pcall(function() tributary.feeds.ios = true end)\n"
         "  return {feed = 'unbound', batch = {}, event = {event_type = 'uninstall', data = {},\n"
         "    first = type(next(tributary.feeds)), n = n, changed = changed,\n"
         "    own = next({}) == nil}}\n"
         "end\n");
    build();
    maps_to_one_record(ENVELOPE(EV("a")));
    const char *ev = F.m.records[0].event.p;
    ck_assert_msg(contains(ev, "\"first\":\"string\"") && contains(ev, "\"n\":4") &&
                      contains(ev, "\"changed\":false") && contains(ev, "\"own\":true"),
                  "%s", ev);
}
END_TEST

START_TEST(test_string_library_is_read_only)
{
    const struct dead_letter *d = dead_from("return function(event, out)\n"
                                            "  string.upper = nil\n"
                                            "end\n");
    ck_assert_str_eq(d->reason, DEAD_RULE_ERROR);
    ck_assert_msg(contains(d->detail.p, "read-only"), "detail: %s", d->detail.p);
}
END_TEST

START_TEST(test_string_values_keep_their_methods_after_an_attempt_to_replace_them)
{
    rule("50-probe.lua", "return function(event, out)\n"
                         "  pcall(function() string.upper = function() return \"pwned\" end end)\n"
                         "  return false, (\"abc\"):upper()\n"
                         "end\n");
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("p-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.noutcomes, 1);
    ck_assert_int_eq(F.m.outcomes[0].kind, OUTCOME_DROPPED);
    ck_assert_str_eq(F.m.outcomes[0].detail.p, "ABC");
}
END_TEST

START_TEST(test_a_numeric_string_plus_a_number_is_that_sum)
{
    ck_assert_str_eq(probe("\"10\" + 1 == 11"), "true");
}
END_TEST

START_TEST(test_two_numeric_strings_multiply_as_numbers)
{
    ck_assert_str_eq(probe("\"3\" * \"4\" == 12"), "true");
}
END_TEST

START_TEST(test_arithmetic_on_a_non_numeric_string_is_an_error)
{
    ck_assert_str_eq(probe("pcall(function() return \"ten\" + 1 end)"), "false");
}
END_TEST

#define MARKER_A                                                                                   \
    "marker = \"a\"\n"                                                                             \
    "return function(event, out)\n"                                                                \
    "  return {feed = \"unbound\", batch = {},\n"                                                  \
    "          event = {event_type = \"uninstall\", data = {}, a_sees = marker}}\n"                \
    "end\n"

#define MARKER_B                                                                                   \
    "local seen_at_load = tostring(marker)\n"                                                      \
    "marker = \"b\"\n"                                                                             \
    "return function(event, out)\n"                                                                \
    "  out.event.b_saw_at_load = seen_at_load\n"                                                   \
    "  return out\n"                                                                               \
    "end\n"

START_TEST(test_one_files_globals_are_invisible_to_another)
{
    rule("10-a.lua", MARKER_A);
    rule("20-b.lua", MARKER_B);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("g-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *event = F.m.records[0].event.p;
    ck_assert_msg(contains(event, "\"b_saw_at_load\":\"nil\""), "event: %s", event);
}
END_TEST

START_TEST(test_one_file_cannot_change_another_files_globals)
{
    rule("10-a.lua", MARKER_A);
    rule("20-b.lua", MARKER_B);
    build();
    ck_assert_int_eq(map(ENVELOPE(EV("g-1")), INPUT_ENVELOPE), 0);
    ck_assert_uint_eq(F.m.nrecords, 1);
    const char *event = F.m.records[0].event.p;
    ck_assert_msg(contains(event, "\"a_sees\":\"a\""), "event: %s", event);
}
END_TEST

/* A rule that drops every event with the result of `call` as the reason. */
#define CALL_RULE(call) "return function(event, out)\n  return false, tostring(" call ")\nend\n"

START_TEST(test_pathological_pattern_is_refused_not_run)
{
    rule("50-pattern.lua", CALL_RULE("string.find(string.rep(\"a\", 20000), \"a*a*a*a*b\")"));
    struct bounded res;
    one_event_dead_within(3000, DEAD_RULE_ERROR, &res);
    ck_assert_msg(contains(res.detail, "too complex"), "detail: %s", res.detail);
}
END_TEST

START_TEST(test_pathological_pattern_is_refused_as_a_string_method)
{
    rule("50-pattern.lua", CALL_RULE("(\"a\"):rep(20000):find(\"a*a*a*a*b\")"));
    struct bounded res;
    one_event_dead_within(3000, DEAD_RULE_ERROR, &res);
    ck_assert_msg(contains(res.detail, "too complex"), "detail: %s", res.detail);
}
END_TEST

/* n bytes of c, for the pattern guard's subjects (at most 100,000). */
static const char *bytes_of(int c, size_t n)
{
    static char subject[100000];
    ck_assert_uint_le(n, sizeof subject);
    memset(subject, c, n);
    return subject;
}

/* The guard on n bytes of c; gmatch: as gmatch sees the pattern. */
static int pattern_check(const char *pattern, int c, size_t n, int gmatch, char *err, size_t errlen)
{
    return sandbox_pattern_check(pattern, strlen(pattern), bytes_of(c, n), n, gmatch, 0, err,
                                 errlen);
}

START_TEST(test_pattern_check_allows_short_plain_patterns)
{
    char err[200] = "";
    ck_assert_int_eq(pattern_check("abc", 'a', 100000, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("^users%.messages%.", 'u', 100000, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("%d+", '7', 1000, 1, err, sizeof err), 0);
}
END_TEST

START_TEST(test_pattern_check_refuses_many_quantifiers_on_long_subjects)
{
    char err[200] = "";
    ck_assert_int_eq(pattern_check("a*a*a*a*b", 'a', 20000, 0, err, sizeof err), -1);
    ck_assert_msg(contains(err, "too complex"), "err: %s", err);
    /* at the bound: 12 (n + 1)^3 of 10^9 steps is let through, one byte more is not */
    ck_assert_int_eq(pattern_check("^%s*(.-)%s*$", ' ', 435, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("^%s*(.-)%s*$", ' ', 436, 0, err, sizeof err), -1);
}
END_TEST

/* Each quantified item may only take as many tries as the longest run of
 * subject bytes it matches: the same patterns on text they hardly match cost
 * n steps, whatever its length. */
START_TEST(test_pattern_check_bounds_each_item_by_its_runs_in_the_subject)
{
    char err[200] = "";
    ck_assert_int_eq(pattern_check("a*a*a*a*b", 'x', 100000, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("^%s*(.-)%s*$", 'x', 100000, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("%s+", 'x', 100000, 1, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("([^,]*),([^,]*)", ',', 100000, 0, err, sizeof err), 0);
    /* words with single spaces: runs of one space, of four letters */
    char text[20000];
    for (size_t i = 0; i < sizeof text; i++)
        text[i] = i % 5 == 4 ? ' ' : "word"[i % 5];
    const char *trim = "^%s*(.-)%s*$", *words = "(%a+)%s+(%a+)%s+(%a+)";
    ck_assert_int_eq(
        sandbox_pattern_check(trim, strlen(trim), text, sizeof text, 0, 0, err, sizeof err), 0);
    ck_assert_int_eq(
        sandbox_pattern_check(words, strlen(words), text, sizeof text, 1, 0, err, sizeof err), 0);
    /* unanchored, a match goes on only from the places its first item matches */
    ck_assert_int_eq(pattern_check("id=(.-);", 'x', 100000, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("i(.-)(.-);", 'x', 100000, 0, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("i(.-)(.-);", 'i', 1000, 0, err, sizeof err), -1);
    /* each try walks the rest of the pattern: a long tail counts */
    char tail[600] = ".-";
    memset(tail + 2, 'a', 500);
    strcpy(tail + 502, "b");
    ck_assert_int_eq(pattern_check(tail, 'a', 3000, 0, err, sizeof err), -1);
    ck_assert_int_eq(pattern_check(tail + 2, 'a', 3000, 0, err, sizeof err), 0);
    /* a leading '^' anchors find, match and gsub; gmatch reads it as the byte */
    ck_assert_int_eq(pattern_check("^%s*%s*%s*x", ' ', 3000, 0, err, sizeof err), -1);
    ck_assert_int_eq(pattern_check("^%s*%s*%s*x", ' ', 3000, 1, err, sizeof err), 0);
    /* gsub walks its replacement text for each match */
    const char *empty = "";
    ck_assert_int_eq(
        sandbox_pattern_check(empty, 0, bytes_of('x', 20000), 20000, 0, 100000, err, sizeof err),
        -1);
    ck_assert_msg(contains(err, "100000-byte replacement"), "err: %s", err);
    ck_assert_int_eq(
        sandbox_pattern_check(empty, 0, bytes_of('x', 20000), 20000, 0, 100, err, sizeof err), 0);
    /* what matches anything is bounded by the whole subject, whatever it holds */
    ck_assert_int_eq(pattern_check("(.-)x(.-)y", 'q', 2000, 0, err, sizeof err), -1);
    ck_assert_int_eq(pattern_check("^(.*)(.*)(.*)$", 'q', 1000, 0, err, sizeof err), -1);
}
END_TEST

/* Where an unquantified first item fails, the match ends, but Lua has read the
 * item through: a set of 500 bytes on 25 MB that holds none of them was let
 * through as 25 million steps, and took 27 s. Each such place costs the
 * item's length. */
START_TEST(test_pattern_check_counts_a_failed_first_set_at_its_length)
{
    size_t n = 1992031; /* 502 (n + 1) is just over 10^9 */
    char *subject = malloc(n);
    ck_assert_ptr_nonnull(subject);
    memset(subject, 'a', n);
    char set[503] = "[";
    memset(set + 1, 'b', 500);
    strcpy(set + 501, "]");
    char err[200] = "";
    ck_assert_int_eq(sandbox_pattern_check(set, strlen(set), subject, n, 0, 0, err, sizeof err),
                     -1);
    ck_assert_msg(contains(err, "too complex"), "err: %s", err);
    ck_assert_int_eq(sandbox_pattern_check(set, strlen(set), subject, n - 1, 0, 0, err, sizeof err),
                     0);
    /* a short set on the same subject, and the long one where it matches */
    ck_assert_int_eq(sandbox_pattern_check("[bc]", 4, subject, n, 0, 0, err, sizeof err), 0);
    memset(subject, 'b', n);
    ck_assert_int_eq(sandbox_pattern_check(set, strlen(set), subject, n - 1, 0, 0, err, sizeof err),
                     0);
    free(subject);
    /* refused before any work: the budget only keeps the rest from counting,
     * however slow (the guard's look at the subject pays for its time) */
    ck_assert_int_eq(setenv("TRIBUTARY_RULES_INSTRUCTIONS", "1000000000", 1), 0);
    ck_assert_msg(contains(probe("select(2, pcall(string.find, ('a'):rep(4000000), "
                                 "'[' .. ('b'):rep(500) .. ']'))"),
                           "too complex"),
                  "a set of 500 bytes read through at 4 million places was not refused");
}
END_TEST

/* Which bytes an item matches decides its runs: for every byte, the guard
 * must see a run where Lua's own matcher finds a match, for every kind of
 * item (classes, their complements, escapes, sets with ranges, classes and a
 * leading ']' or '^'). A class read as matching less than Lua's would let a
 * costly pattern through. */
START_TEST(test_pattern_check_reads_items_as_lua_matches_them)
{
    static const char *const items[] = {
        ".",     "a",      "%a",     "%A",     "%c",     "%C",          "%d",    "%D",
        "%g",    "%G",     "%l",     "%L",     "%p",     "%P",          "%s",    "%S",
        "%u",    "%U",     "%w",     "%W",     "%x",     "%X",          "%%",    "%.",
        "%]",    "%z",     "[abc]",  "[^abc]", "[a-f]",  "[^a-f%d]",    "[%a_]", "[]]",
        "[^]]",  "[%]x]",  "[a-]",   "[-a]",   "[%w%-]", "[\x80-\xff]", "[z-a]", "[%^]",
        "[^%s]", "[%%a-]", "[a%-z]", "[.]",    "[%.]",   "[^-]",        "$",
    };
    lua_State *L = luaL_newstate();
    ck_assert_ptr_nonnull(L);
    luaL_openlibs(L);
    char err[200];
    for (size_t i = 0; i < ARRAY_LEN(items); i++) {
        char pattern[64], anchored[64];
        /* 3 quantifiers: over (n + 1)^4 steps when the item matches a
         * 1,000-byte run, about 10 n when it matches none */
        snprintf(pattern, sizeof pattern, "%s*%s*%s*", items[i], items[i], items[i]);
        snprintf(anchored, sizeof anchored, "^%s$", items[i]);
        for (int c = 0; c < 256; c++) {
            char one = (char)c;
            lua_getglobal(L, "string");
            lua_getfield(L, -1, "find");
            lua_pushlstring(L, &one, 1);
            lua_pushstring(L, anchored);
            ck_assert_int_eq(lua_pcall(L, 2, 1, 0), LUA_OK);
            int lua_match = !lua_isnil(L, -1);
            lua_pop(L, 2);
            int refused = pattern_check(pattern, c, 1000, 0, err, sizeof err) != 0;
            ck_assert_msg(refused == lua_match, "item %s, byte %d: Lua %s, guard %s", items[i], c,
                          lua_match ? "matches" : "does not match",
                          refused ? "sees a run" : "sees none");
        }
    }
    lua_close(L);
}
END_TEST

/* A set whose first character is an escape ([%%]) read as still open hid the
 * quantifiers after it; a back-reference compares its capture at every try. */
START_TEST(test_pattern_check_sees_past_escaped_sets_and_counts_back_references)
{
    char err[200] = "";
    ck_assert_int_eq(pattern_check("[%%].-.-.-.-.-.-]", '%', 400, 0, err, sizeof err), -1);
    ck_assert_int_eq(pattern_check("%f[%%].-.-.-.-.-.-]", 'a', 400, 0, err, sizeof err), -1);
    ck_assert_int_eq(pattern_check("(.-)%1b", 'a', 30000, 0, err, sizeof err), -1);
    /* still allowed: a set with an escape, a back-reference on a short subject */
    ck_assert_int_eq(pattern_check("[%%%]]+", '%', 1000, 1, err, sizeof err), 0);
    ck_assert_int_eq(pattern_check("^(%a)%1", 'a', 100000, 0, err, sizeof err), 0);
}
END_TEST

/* A rule that trims a long text, or collapses its spaces, gets its answer:
 * these patterns were refused on text of 1,000 bytes or more (a rule_error
 * dead letter), although they cost a step per byte on it. */
START_TEST(test_rules_trim_long_text)
{
    setenv("TRIBUTARY_RULES_INSTRUCTIONS", LIBRARY_TEST_INSTRUCTIONS, 1);
    ck_assert_str_eq(probe("#((\" x\"):rep(5000) .. \"  \"):match(\"^%s*(.-)%s*$\")"), "9999");
    ck_assert_str_eq(probe("#select(1, (\"a  b \"):rep(20000):gsub(\"%s+\", \" \"))"), "80000");
    /* gsub anchors at a leading '^', and walks its replacement for each match */
    ck_assert_msg(contains(probe("(\" \"):rep(3000):gsub(\"^%s*%s*%s*x\", \"\")"), "too complex"),
                  "an anchored gsub that may backtrack 3000^3 times was not refused");
    ck_assert_msg(contains(probe("(\"x\"):rep(20000):gsub(\"\", (\"%0\"):rep(50000))"),
                           "100000-byte replacement"),
                  "a replacement walked 20,000 times was not refused");
    /* on as many spaces the same pattern may backtrack (n + 1)^3 times */
    ck_assert_msg(contains(probe("(\" \"):rep(5000):match(\"^%s*(.-)%s*$\")"), "too complex"),
                  "a trim of 5,000 spaces was not refused");
}
END_TEST

START_TEST(test_pattern_check_refuses_overlong_patterns)
{
    char p[600];
    memset(p, 'a', sizeof p - 1);
    p[sizeof p - 1] = '\0';
    char err[200] = "";
    ck_assert_int_eq(sandbox_pattern_check(p, strlen(p), "abc", 3, 0, 0, err, sizeof err), -1);
}
END_TEST

/* ==== C functions the instruction hook cannot interrupt ===================== */

/* Each call below runs inside one C function, so the count hook never fires: it
 * must be refused (or be cheap) rather than hang the worker. */

START_TEST(test_pattern_starting_with_a_nul_byte_is_still_checked)
{
    /* "\0*a*a*a*a*b": the same backtracking as above behind a NUL byte */
    rule("50-pattern.lua", CALL_RULE("string.find(string.rep(\"a\", 20000), \"\\0*a*a*a*a*b\")"));
    struct bounded res;
    one_event_dead_within(3000, DEAD_RULE_ERROR, &res);
}
END_TEST

START_TEST(test_optional_items_count_towards_pattern_cost)
{
    /* 40 "a?" before a "b" that never comes: 2^40 ways to fail */
    rule("50-pattern.lua",
         CALL_RULE("string.find(string.rep(\"a\", 40), string.rep(\"a?\", 40) .. \"b\")"));
    build();
    struct bounded res;
    map_bounded(ENVELOPE(EV("r-1")), 3000, &res);
    ck_assert_msg(res.finished, "string.find did not return within 3 s");
}
END_TEST

START_TEST(test_balance_pattern_on_a_long_subject_is_bounded)
{
    /* %b() from every start of a megabyte of "(" that never closes: n^2/2 steps */
    rule("50-pattern.lua", CALL_RULE("string.find(string.rep(\"(\", 1000000), \"%b()\")"));
    build();
    struct bounded res;
    map_bounded(ENVELOPE(EV("r-1")), 3000, &res);
    ck_assert_msg(res.finished, "string.find did not return within 3 s");
}
END_TEST

START_TEST(test_repeating_an_empty_string_is_bounded)
{
    rule("50-rep.lua", CALL_RULE("#string.rep(\"\", 1000000000000000)"));
    build();
    struct bounded res;
    map_bounded(ENVELOPE(EV("r-1")), 3000, &res);
    ck_assert_msg(res.finished, "string.rep did not return within 3 s");
}
END_TEST

START_TEST(test_table_move_over_a_huge_range_is_bounded)
{
    rule("50-move.lua", CALL_RULE("#table.move({}, 1, 1000000000000000, 2)"));
    build();
    struct bounded res;
    map_bounded(ENVELOPE(EV("r-1")), 3000, &res);
    ck_assert_msg(res.finished, "table.move did not return within 3 s");
}
END_TEST

/* ==== rule self-tests ===================================================== */

#define TESTED_RULE_HEAD                                                                           \
    "local function process(event, out)\n"                                                         \
    "  if event.id == \"skip\" then return false, \"too_old\" end\n"                               \
    "  return {feed = \"unbound\", batch = {},\n"                                                  \
    "          event = {event_type = \"uninstall\", data = {}, name = \"Seen \" .. event.id}}\n"   \
    "end\n"                                                                                        \
    "return { process = process, tests = {\n"

START_TEST(test_wrong_expectation_is_reported_with_file_field_and_values)
{
    rule("20-tested.lua", TESTED_RULE_HEAD
         "  { name = \"right\", event = {event_type = \"t\", id = \"a\", time = 1},\n"
         "    expect = {event = {name = \"Seen a\"}} },\n"
         "  { name = \"wrong\", event = {event_type = \"t\", id = \"b\", time = 1},\n"
         "    expect = {event = {name = \"Seen z\"}} },\n"
         "} }\n");
    build();
    int failures = self_test();
    const char *text = F.report.data;
    ck_assert_int_eq(F.ntests, 2);
    ck_assert_int_eq(failures, 1);
    ck_assert_msg(contains(text, "20-tested.lua"), "report: %s", text);
    ck_assert_msg(contains(text, "'wrong'"), "report: %s", text);
    ck_assert_msg(!contains(text, "'right'"), "report: %s", text);
    ck_assert_msg(contains(text, "out.event.name"), "report: %s", text);
    ck_assert_msg(contains(text, "expected \"Seen z\", got \"Seen b\""), "report: %s", text);
}
END_TEST

/* Builds a rule file of TESTED_RULE_HEAD with the one test `test` (a table
 * constructor and its comma), runs it, which must fail; the report. */
static const char *one_failing_test(const char *test)
{
    char src[2048];
    snprintf(src, sizeof src, "%s%s} }\n", TESTED_RULE_HEAD, test);
    rule("20-tested.lua", src);
    build();
    ck_assert_int_eq(self_test(), 1);
    return F.report.data;
}

START_TEST(test_expected_drop_of_a_mapped_event_is_reported)
{
    const char *text =
        one_failing_test("  { name = \"should drop\", event = {event_type = \"t\", id = \"a\", "
                         "time = 1},\n"
                         "    expect_drop = \"no_external_id\" },\n");
    ck_assert_msg(contains(text, "'should drop'"), "report: %s", text);
    ck_assert_msg(contains(text, "expected a drop (no_external_id)"), "report: %s", text);
}
END_TEST

START_TEST(test_wrong_drop_reason_is_reported)
{
    const char *text =
        one_failing_test("  { name = \"drop reason\", event = {event_type = \"t\", id = \"skip\", "
                         "time = 1},\n"
                         "    expect_drop = \"no_external_id\" },\n");
    ck_assert_msg(contains(text, "expected drop reason \"no_external_id\", got \"too_old\" "
                                 "(from 20-tested.lua)"),
                  "report: %s", text);
}
END_TEST

/* A drop ends the chain: the test of a later file that expects an output is
 * told which file dropped the event. */
START_TEST(test_an_output_expected_of_a_dropped_event_names_the_file_that_dropped_it)
{
    rule("30-later.lua", "return { process = function(event, out) return out end, tests = {\n"
                         "  { name = 'kept', event = {event_type = 't', id = 'skip', time = 1},\n"
                         "    expect = {event = {name = 'Seen skip'}} } } }\n");
    rule("20-tested.lua", TESTED_RULE_HEAD "} }\n");
    build();
    ck_assert_int_eq(self_test(), 1);
    const char *text = F.report.data;
    ck_assert_msg(contains(text, "30-later.lua: test 'kept' failed: expected an output, but "
                                 "20-tested.lua dropped the event (too_old); a drop ends the "
                                 "chain"),
                  "report: %s", text);
}
END_TEST

/* Test events are what cjson.decode makes of JSON: numbers are floats, as in
 * service, so that "step-" .. 3 is "step-3.0" in the test as it is live. */
START_TEST(test_a_test_event_has_numbers_as_decoded_json_has_them)
{
    rule("20-step.lua",
         "return { process = function(event, out)\n"
         "  return {feed = 'unbound', batch = {}, event = {event_type = 'uninstall', data = {},\n"
         "    name = 'step-' .. event.properties.step, kind = math.type(event.time),\n"
         "    first = math.type(event.properties.list[1]), null = event.properties.none}}\n"
         "end, tests = {\n"
         "  { name = 'floats', event = {event_type = 't', id = 'a', time = 1,\n"
         "      properties = {step = 3, list = {7, 'x'}, none = cjson.null}},\n"
         "    expect = {event = {name = 'step-3.0', kind = 'float', first = 'float',\n"
         "                       null = cjson.null}} },\n"
         "  { name = 'as written', event = {event_type = 't', id = 'b', time = 1,\n"
         "      properties = {step = 3, list = {}}},\n"
         "    expect = {event = {name = 'step-3'}} } } }\n");
    build();
    ck_assert_int_eq(self_test(), 1);
    const char *text = F.report.data;
    ck_assert_msg(!contains(text, "'floats'"), "report: %s", text);
    ck_assert_msg(contains(text, "test 'as written' failed: out.event.name: expected \"step-3\", "
                                 "got \"step-3.0\""),
                  "report: %s", text);
}
END_TEST

/* What no JSON text decodes to: a test passed on it where the service could
 * never meet it (a list with a gap: ipairs stops there, the live list of a
 * null has cjson.null). */
START_TEST(test_a_test_event_holding_what_json_cannot_carry_is_reported)
{
    static const char *const cases[][2] = {
        {"list = {1, print}", "event.properties.list[2] is a function, which JSON cannot carry"},
        {"list = {'a', nil, 'c'}", "event.properties.list is neither a list (keys 1 to n, no "
                                   "gaps: a JSON null in a list is cjson.null) nor an object"},
        {"tags = {[2] = 'internal'}", "event.properties.tags is neither a list"},
        {"mixed = {1, a = 2}", "event.properties.mixed is neither a list"},
        {"keyed = {[true] = 1}", "event.properties.keyed is neither a list"},
        {"n = 0/0", "event.properties.n is a NaN, which JSON cannot carry"},
    };
    char test[512];
    snprintf(test, sizeof test,
             "  { name = 'shape', event = {event_type = 't', id = 'a', time = 1,\n"
             "      properties = {%s}},\n"
             "    expect = {event = {name = 'Seen a'}} },\n",
             cases[_i][0]);
    const char *text = one_failing_test(test);
    ck_assert_msg(contains(text, "test 'shape' failed: ") && contains(text, cases[_i][1]),
                  "report: %s", text);
}
END_TEST

/* A test's event is nested as deep as the service decodes the event of a
 * Currents request: 62 levels (the event itself the first; the request's
 * object and list take 2 of 64), and no deeper. */
START_TEST(test_a_test_event_nested_past_the_decoding_depth_is_reported)
{
    char src[4096];
    for (int levels = RULES_MAX_JSON_DEPTH - 2; levels <= RULES_MAX_JSON_DEPTH - 1; levels++) {
        /* the event, properties, and levels - 2 more tables */
        char nest[1024] = "";
        for (int i = 0; i < levels - 2; i++)
            strcat(nest, "{");
        for (int i = 0; i < levels - 2; i++)
            strcat(nest, "}");
        snprintf(src, sizeof src,
                 "%s  { name = 'deep', event = {event_type = 't', id = 'a', time = 1,\n"
                 "      properties = {deep = %s}},\n"
                 "    expect = {event = {name = 'Seen a'}} },\n} }\n",
                 TESTED_RULE_HEAD, nest);
        rule("20-tested.lua", src);
        build();
        int failures = self_test();
        if (levels == RULES_MAX_JSON_DEPTH - 2)
            ck_assert_msg(failures == 0, "report: %s", F.report.data);
        else
            ck_assert_msg(failures == 1 &&
                              contains(F.report.data, "is nested more than 62 levels deep"),
                          "report: %s", F.report.data);
        release();
    }
}
END_TEST

/* A misspelt key was passed over: the test ran with defaults, or not at all,
 * and `check` said ok. */
START_TEST(test_a_misspelt_key_of_a_test_or_its_config_is_reported)
{
    static const struct {
        const char *test, *report;
    } cases[] = {
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1}, confg = {},\n"
         "    expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test has an unknown key `confg` (did you mean `config`?)"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {environmnet = 'development'}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config` has an unknown key `environmnet` (did you mean "
         "`environment`?)"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {feeds = {iso = false}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.feeds` has an unknown key `iso` (did you mean "
         "`ios`?)"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1}, [1] = 2,\n"
         "    expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test has a key that is a number; its keys are `name`, `event`, "
         "`expect`, `expect_drop`, `workspace` or `config`"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1}, config = 'dev',\n"
         "    expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config` must be a table, not string"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {feeds = 'ios'}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.feeds` must be a table, not string"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {environment = {}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.environment` must be a string, not table"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {events = {t = true}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.events` must be a list of strings, and has a key "
         "`t` (a set? list the names"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {events = {'t', 7}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.events` must be a list of strings, and item 2 is a "
         "number"},
        /* values the configuration refuses: the rules would have seen a feed
         * with credentials, or an app on a feed that does not exist */
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {feeds = {ios = 0}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.feeds.ios` must be a boolean, not number"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {feeds = {web = 'false'}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.feeds.web` must be a boolean, not string"},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {apps = {A1 = 'iphone'}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.apps[\"A1\"]` must be \"ios\", \"android\", \"web\" "
         "or \"unbound\""},
        {"  { name = 'k', event = {event_type = 't', id = 'a', time = 1},\n"
         "    config = {apps = {'ios'}}, expect = {event = {name = 'Seen a'}} },\n",
         "test 'k' failed: the test's `config.apps` keys must be app ids (strings), not number"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        const char *text = one_failing_test(cases[i].test);
        ck_assert_msg(contains(text, cases[i].report), "case %zu, report: %s", i, text);
        release();
    }
}
END_TEST

START_TEST(test_a_misspelt_key_of_a_rule_file_fails_its_load)
{
    const char *err = rules_new_refuses(
        "20-keys.lua", "return { process = function(event, out) end, test = {} }\n");
    ck_assert_msg(contains(err, "20-keys.lua: the returned table has an unknown key `test` (did "
                                "you mean `tests`?)"),
                  "err: %s", err);
    release();
    err = rules_new_refuses("20-keys.lua",
                            "return { process = function(event, out) end,\n"
                            "  tests = { name = 'one', event = {event_type = 't', id = 'a'},\n"
                            "            expect_drop = 'x' } }\n");
    ck_assert_msg(contains(err, "20-keys.lua: `tests` must be a list of tables, and has a key `") &&
                      contains(err, "(one test? put it in a list: tests = { { ... } })"),
                  "err: %s", err);
    release();
    err = rules_new_refuses("20-keys.lua",
                            "return { process = function(event, out) end, tests = { 'one' } }\n");
    ck_assert_msg(contains(err, "20-keys.lua: `tests` must be a list of tables, and item 1 is a "
                                "string"),
                  "err: %s", err);
    release();
    /* other keys, far from `process` and `tests`, are the file's own */
    rule("20-keys.lua", "local M = { description = 'tags', version = 2 }\n"
                        "function M.helper(x) return x end\n"
                        "function M.process(event, out) return M.helper(out) end\n"
                        "return M\n");
    build();
}
END_TEST

/* `expect_drop = false` reads as "not dropped", yet passed for any drop. */
START_TEST(test_expect_drop_that_is_not_a_reason_is_reported)
{
    const char *text = one_failing_test(
        "  { name = \"kept\", event = {event_type = \"t\", id = \"skip\", time = 1},\n"
        "    expect_drop = false },\n");
    ck_assert_msg(contains(text, "`expect_drop` must be the reason of the drop (a string), not "
                                 "boolean"),
                  "report: %s", text);
}
END_TEST

START_TEST(test_a_test_with_both_expect_and_expect_drop_is_reported)
{
    const char *text = one_failing_test(
        "  { name = \"both\", event = {event_type = \"t\", id = \"skip\", time = 1},\n"
        "    expect = {event = {name = \"Seen skip\"}}, expect_drop = \"too_old\" },\n");
    ck_assert_msg(contains(text, "the test has both `expect` and `expect_drop`"), "report: %s",
                  text);
}
END_TEST

/* Each test may take an event's time limit: their number is bounded, or a
 * file of a million slow tests held `check` and a reload for days. */
START_TEST(test_more_rule_tests_than_the_bound_fail_without_running_the_rest)
{
    rule("20-many.lua",
         "local T = { name = 'drop', event = {event_type = 't', id = 'skip', time = 1},\n"
         "            expect_drop = 'too_old' }\n"
         "local tests = {}\n"
         "for i = 1, 1000000 do tests[i] = T end\n"
         "return { process = function(event, out)\n"
         "  if event.id == 'skip' then return false, 'too_old' end\n"
         "end, tests = tests }\n");
    build();
    int failures = self_test();
    const char *text = F.report.data;
    ck_assert_int_eq(failures, 1);
    ck_assert_int_eq(F.ntests, RULES_MAX_TESTS);
    ck_assert_msg(contains(text, "20-many.lua: test #1001 not run: more rule tests than 1000"),
                  "report: %s", text);
}
END_TEST

/* ---- the workspace ------------------------------------------------------ */

/* Maps every event to the unbound feed with its workspace as an attribute;
 * drops those of workspace "muted". */
#define WORKSPACE_RULE                                                                             \
    "return { process = function(event, out, workspace)\n"                                         \
    "  if workspace == 'muted' then return false, 'muted workspace' end\n"                         \
    "  return {feed = 'unbound', batch = {}, event = {event_type = 'custom_event',\n"              \
    "    data = {event_name = 'e', custom_event_type = 'other',\n"                                 \
    "            custom_attributes = {workspace = workspace or 'none'}}}}\n"                       \
    "end,\n"                                                                                       \
    "tests = {\n"                                                                                  \
    "  { name = 'tagged', workspace = 'brand-a', event = {event_type = 't', id = 'a', time = "     \
    "1},\n"                                                                                        \
    "    expect = {event = {data = {custom_attributes = {workspace = 'brand-a'}}}} },\n"           \
    "  { name = 'untagged', event = {event_type = 't', id = 'b', time = 1},\n"                     \
    "    expect = {event = {data = {custom_attributes = {workspace = 'none'}}}} },\n"              \
    "  { name = 'muted', workspace = 'muted', event = {event_type = 't', id = 'c', time = 1},\n"   \
    "    expect_drop = 'muted workspace' },\n"                                                     \
    "} }\n"

static int map_in(const char *workspace, const char *body)
{
    return rules_map(F.r, body, strlen(body), INPUT_ENVELOPE, str_opt(workspace), &F.m, &F.ie);
}

START_TEST(test_rules_get_the_workspace_and_records_keep_it)
{
    rule("20-workspace.lua", WORKSPACE_RULE);
    build();
    ck_assert_int_eq(map_in("brand-a", ENVELOPE(EV("e-1"))), 0);
    ck_assert_int_eq(map_in(NULL, ENVELOPE(EV("e-2"))), 0);
    ck_assert_int_eq(map_in("muted", ENVELOPE(EV("e-3"))), 0);
    ck_assert_uint_eq(F.m.nrecords, 2);
    ck_assert(str_eq(F.m.records[0].workspace, "brand-a"));
    ck_assert_msg(contains(F.m.records[0].event.p, "\"workspace\":\"brand-a\""), "%s",
                  F.m.records[0].event.p);
    ck_assert_ptr_null(F.m.records[1].workspace.p);
    ck_assert_msg(contains(F.m.records[1].event.p, "\"workspace\":\"none\""), "%s",
                  F.m.records[1].event.p);
    ck_assert_uint_eq(F.m.dropped[DROP_RULE], 1);
}
END_TEST

START_TEST(test_a_dead_letter_keeps_the_workspace)
{
    rule("50-bad.lua", BAD_RULE_LINE_3);
    build();
    ck_assert_int_eq(map_in("brand-b", ENVELOPE(EV("e-2"))), 0);
    ck_assert_uint_eq(F.m.ndead, 1);
    ck_assert(str_eq(F.m.dead[0].workspace, "brand-b"));
}
END_TEST

START_TEST(test_rule_tests_can_give_a_workspace)
{
    rule("20-workspace.lua", WORKSPACE_RULE);
    build();
    int failures = self_test();
    ck_assert_int_eq(F.ntests, 3);
    ck_assert_msg(failures == 0, "report: %s", F.report.data);
    release();
    /* and a test that expects another workspace's output fails */
    rule("20-workspace.lua",
         "return { process = function(event, out, workspace)\n"
         "  return {feed = 'unbound', batch = {}, event = {event_type = 'custom_event',\n"
         "    data = {event_name = workspace or 'none', custom_event_type = 'other'}}}\n"
         "end,\n"
         "tests = { { name = 'named', workspace = 'brand-b',\n"
         "            event = {event_type = 't', id = 'a', time = 1},\n"
         "            expect = {event = {data = {event_name = 'brand-a'}}} },\n"
         "          { name = 'not text', workspace = 7,\n"
         "            event = {event_type = 't', id = 'a', time = 1},\n"
         "            expect = {event = {data = {event_name = '7'}}} } } }\n");
    build();
    failures = self_test();
    const char *text = F.report.data;
    ck_assert_int_eq(failures, 2);
    ck_assert_msg(contains(text, "expected \"brand-a\", got \"brand-b\""), "report: %s", text);
    ck_assert_msg(contains(text, "`workspace` must be a string"), "report: %s", text);
}
END_TEST

/* ---- suite -------------------------------------------------------------- */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    buf b;
    buf_init(&b, 1u << 20);
    char chunk[8192];
    size_t n;
    int ok = 1;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (buf_add(&b, chunk, n) != 0) {
            ok = 0;
            break;
        }
    }
    fclose(f);
    if (!ok || b.len == 0) {
        buf_free(&b);
        return NULL;
    }
    return buf_take(&b);
}

/* rules/10-mparticle.lua from the working directory, else from the nearest
 * directory above the test binary that has it. */
static char *find_default_rules(void)
{
    char *src = read_file("rules/10-mparticle.lua");
    if (src)
        return src;
    char dir[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (n <= 0)
        return NULL;
    dir[n] = '\0';
    char *slash;
    while ((slash = strrchr(dir, '/')) != NULL) {
        *slash = '\0';
        char path[PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/rules/10-mparticle.lua", dir);
        if ((src = read_file(path)) != NULL)
            return src;
    }
    return NULL;
}

static TCase *tcase(Suite *s, const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, setup, teardown);
    /* calls that could hang run under their own deadline (bounded_run) */
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    return tc;
}

static Suite *suite(void)
{
    Suite *s = suite_create("rules");

    TCase *tc = tcase(s, "requests");
    tcase_add_test(tc, test_malformed_json_is_refused_with_400);
    tcase_add_test(tc, test_a_lone_surrogate_escape_becomes_the_replacement_character);
    tcase_add_test(tc, test_malformed_json_with_a_lone_surrogate_is_still_refused);
    tcase_add_test(tc, test_bytes_that_are_not_utf8_reach_the_output_as_the_replacement_character);
    tcase_add_test(tc, test_a_number_json_cannot_write_is_a_dropped_attribute_not_a_dead_event);
    tcase_add_test(tc, test_an_object_json_cannot_write_whole_is_an_attribute_not_a_dead_event);
    tcase_add_test(tc, test_an_object_too_large_to_write_is_cut_at_4096_characters);
    tcase_add_test(tc, test_a_dead_letter_keeps_the_event_as_received_when_its_bytes_are_not_found);
    tcase_add_test(tc, test_a_time_outside_what_milliseconds_can_hold_is_refused);
    tcase_add_test(tc, test_numbers_keep_their_value_and_whole_numbers_stay_integers);
    tcase_add_test(tc, test_a_null_device_id_property_keeps_the_users_device_id);
    tcase_add_test(tc, test_a_json_array_is_not_an_envelope);
    tcase_add_test(tc, test_an_object_without_events_is_not_an_envelope);
    tcase_add_test(tc, test_events_that_is_an_object_is_refused);
    tcase_add_loop_test(tc, test_an_output_held_in_a_weak_table_is_written_as_it_was_checked, 0, 2);
    tcase_add_test(tc, test_events_given_twice_is_refused);
    tcase_add_test(tc, test_events_that_is_a_number_is_refused);
    tcase_add_test(tc, test_event_without_event_type_is_refused_naming_its_index);
    tcase_add_test(tc, test_event_without_id_is_refused_naming_its_index);
    tcase_add_test(tc, test_event_without_time_is_refused_naming_its_index);
    tcase_add_test(tc, test_time_as_a_string_is_refused);
    tcase_add_test(tc, test_empty_body_is_a_no_op);
    tcase_add_test(tc, test_empty_event_list_is_a_no_op);
    tcase_add_test(tc, test_max_events_is_accepted);
    tcase_add_test(tc, test_one_event_over_max_events_is_413);
    tcase_add_test(tc, test_unknown_fields_are_accepted);
    tcase_add_test(tc, test_records_keep_each_event_exactly_as_received);
    tcase_add_test(tc, test_a_body_that_starts_with_a_byte_order_mark_is_mapped);
    tcase_add_test(tc, test_unknown_event_type_is_counted_as_unsupported_not_refused);
    tcase_add_test(tc, test_any_input_accepts_a_json_array);
    tcase_add_test(tc, test_any_input_accepts_a_single_event);
    tcase_add_test(tc, test_any_input_accepts_ndjson);
    tcase_add_loop_test(tc, test_one_event_input_is_the_event_whatever_fields_it_has, 0,
                        (int)ARRAY_LEN(OWN_EVENTS_BODIES));
    tcase_add_test(tc, test_one_event_input_refuses_anything_but_one_event);

    tc = tcase(s, "custom_attributes");
    tcase_add_test(tc, test_custom_attributes_keeps_skips_adds_and_cuts_as_documented);
    tcase_add_test(tc, test_custom_attributes_counts_what_it_cuts_and_leaves_out);
    tcase_add_test(tc, test_names_cut_to_the_same_one_keep_the_first_by_name);
    tcase_add_test(tc, test_names_one_as_written_keep_the_first_by_name);
    tcase_add_test(tc, test_text_with_bytes_not_utf8_is_cut_by_its_characters);
    tcase_add_loop_test(tc, test_attributes_over_100_kb_together_keep_those_that_fit_by_name, 0,
                        (int)ARRAY_LEN(TWO_BYTE_CHARACTERS));
    tcase_add_test(tc, test_custom_attributes_of_a_weak_table_holds_the_names_it_sorts);
    tcase_add_test(tc, test_custom_attributes_of_large_lists_stops_at_what_it_keeps);
    tcase_add_loop_test(tc, test_custom_attributes_misused_is_a_rule_error_that_says_why, 0,
                        (int)ARRAY_LEN(ATTRIBUTE_MISUSES));

    tc = tcase(s, "default_mapping");
    tcase_add_test(tc, test_ios_push_send_goes_to_the_ios_feed);
    tcase_add_test(tc, test_push_send_event_carries_its_name_and_source_message_id);
    tcase_add_test(tc, test_push_send_batch_carries_the_customer_id);
    tcase_add_test(tc, test_user_key_is_the_external_user_id_and_the_device);
    tcase_add_test(tc, test_an_output_without_source_message_id_takes_the_event_id);
    tcase_add_test(tc, test_event_without_external_user_id_is_skipped);
    tcase_add_loop_test(tc, test_a_return_neither_an_output_nor_a_drop_is_a_dead_letter, 0,
                        (int)ARRAY_LEN(UNCLEAR_RETURNS));
    tcase_add_loop_test(tc, test_an_argument_error_of_a_host_function_names_it, 0, 2);
    tcase_add_test(tc, test_event_with_null_external_user_id_is_skipped);
    tcase_add_test(tc, test_shipped_rules_pass_their_own_tests);
    tcase_add_test(tc, test_a_later_file_failing_on_earlier_tests_events_is_a_warning);
    tcase_add_test(tc, test_a_later_file_that_keeps_earlier_tests_events_warns_of_nothing);
    tcase_add_test(tc, test_the_run_through_later_files_comes_after_every_test);
    tcase_add_test(tc, test_a_tests_event_the_service_refuses_is_said);

    tc = tcase(s, "errors_and_limits");
    tcase_add_test(tc, test_rule_error_dead_letters_the_event_with_file_and_line);
    tcase_add_test(tc, test_an_argument_error_names_the_library_function);
    tcase_add_test(tc, test_rule_error_leaves_the_other_events_mapped);
    tcase_add_test(tc, test_rule_returning_a_number_is_invalid_output);
    tcase_add_test(tc, test_no_output_from_any_rule_is_invalid_output);
    tcase_add_test(tc, test_output_with_an_unknown_feed_is_invalid_output);
    tcase_add_test(tc, test_an_output_with_more_than_100_user_attributes_is_invalid_output);
    tcase_add_test(tc, test_an_output_with_100_user_attributes_is_a_record);
    tcase_add_test(tc, test_an_output_with_many_user_attribute_lists_is_invalid_output_at_once);
    tcase_add_test(tc, test_an_output_table_larger_than_any_output_is_invalid_at_its_first_items);
    tcase_add_loop_test(tc, test_an_output_mparticle_would_drop_is_invalid_output_naming_the_field,
                        0, (int)ARRAY_LEN(SCHEMA_CASES));
    tcase_add_test(tc, test_outputs_at_mparticles_limits_are_records);
    tcase_add_test(tc, test_the_largest_output_taken_fits_an_mparticle_batch_of_its_own);
    tcase_add_loop_test(
        tc, test_an_output_walking_an_emptied_table_in_many_places_ends_at_the_time_limit, 0,
        (int)ARRAY_LEN(HOLLOW_OUTPUTS));
    tcase_add_test(tc, test_cjson_encode_of_an_emptied_table_in_many_places_ends_at_the_time_limit);
    tcase_add_test(tc, test_cjson_encode_writes_names_in_order);
    tcase_add_test(tc, test_cjson_decode_refuses_a_text_larger_than_the_memory_left_can_take);
    tcase_add_loop_test(tc, test_cjson_decode_takes_at_most_the_memory_the_refusal_counts, 0,
                        (int)ARRAY_LEN(DECODE_SHAPES));
    tcase_add_test(tc, test_a_lua_error_outside_a_protected_call_is_logged_before_the_abort);
    tcase_add_test(tc, test_infinite_loop_hits_the_instruction_limit);
    tcase_add_test(tc, test_instruction_limit_asks_for_a_rebuild);
    tcase_add_test(tc, test_a_state_that_outgrows_its_memory_asks_for_a_rebuild);
    tcase_add_test(tc, test_top_level_tables_over_the_memory_limit_together_need_no_rebuild);
    tcase_add_test(tc, test_infinite_loop_returns_well_under_a_second);
    tcase_add_test(tc, test_pcall_cannot_swallow_the_instruction_limit);
    tcase_add_loop_test(tc, test_xpcall_cannot_swallow_the_instruction_limit, 0,
                        (int)ARRAY_LEN(XPCALL_HANDLERS));
    tcase_add_test(tc, test_growing_string_hits_the_memory_limit);
    tcase_add_test(tc, test_memory_the_collector_frees_on_a_refusal_is_within_the_limit);
    tcase_add_test(tc, test_pcall_and_xpcall_cannot_swallow_the_memory_limit);
    tcase_add_test(tc, test_growing_table_hits_the_memory_limit);
    tcase_add_test(tc, test_one_file_using_60_percent_of_the_memory_limit_is_within_it);
    tcase_add_test(tc, test_two_files_using_60_percent_each_for_one_event_exceed_the_memory_limit);
    tcase_add_test(tc, test_memory_kept_from_earlier_events_is_bounded_per_request);
    tcase_add_test(tc, test_memory_an_event_takes_by_itself_is_not_blamed_on_earlier_events);
    tcase_add_test(tc, test_memory_limit_met_names_the_line);
    tcase_add_test(tc, test_memory_limit_at_a_files_top_level_names_the_setting_and_the_line);
    tcase_add_test(tc, test_top_level_infinite_loop_fails_rules_new_naming_the_file);
    tcase_add_test(tc, test_syntax_error_fails_rules_new_with_file_and_line);
    tcase_add_loop_test(tc, test_a_top_level_error_fails_rules_new_with_file_and_line, 0,
                        (int)ARRAY_LEN(TOP_LEVEL_ERRORS));
    tcase_add_test(tc, test_a_rule_file_with_a_byte_order_mark_loads);
    tcase_add_test(tc, test_a_compiled_chunk_fails_rules_new_naming_the_file);
    tcase_add_test(tc,
                   test_a_dangling_rule_file_link_refuses_the_set_and_a_directory_is_passed_over);
    tcase_add_test(
        tc, test_rules_dir_switched_through_a_link_while_loading_gives_one_version_or_the_other);

    tc = tcase(s, "sandbox");
    tcase_add_test(tc, test_allowed_functions_are_reachable);
    tcase_add_test(tc, test_io_is_not_reachable);
    tcase_add_test(tc, test_os_execute_is_not_reachable);
    tcase_add_test(tc, test_os_getenv_is_not_reachable);
    tcase_add_test(tc, test_require_is_not_reachable);
    tcase_add_test(tc, test_debug_is_not_reachable);
    tcase_add_test(tc, test_load_is_not_reachable);
    tcase_add_test(tc, test_loadstring_is_not_reachable);
    tcase_add_test(tc, test_dofile_is_not_reachable);
    tcase_add_test(tc, test_loadfile_is_not_reachable);
    tcase_add_test(tc, test_collectgarbage_is_not_reachable);
    tcase_add_test(tc, test_rawset_is_not_reachable);
    tcase_add_test(tc, test_string_dump_is_not_reachable);
    tcase_add_test(tc, test_string_dump_is_not_reachable_through_a_string_value);
    tcase_add_test(tc, test_string_metatable_is_hidden);
    tcase_add_test(tc, test_next_reads_a_shared_table_through_its_view);
    tcase_add_test(tc, test_string_library_is_read_only);
    tcase_add_test(tc, test_string_values_keep_their_methods_after_an_attempt_to_replace_them);
    tcase_add_test(tc, test_a_numeric_string_plus_a_number_is_that_sum);
    tcase_add_test(tc, test_two_numeric_strings_multiply_as_numbers);
    tcase_add_test(tc, test_arithmetic_on_a_non_numeric_string_is_an_error);
    tcase_add_test(tc, test_a_loop_of_costly_pattern_searches_hits_the_instruction_limit);
    tcase_add_test(tc, test_a_loop_of_large_table_moves_hits_the_instruction_limit);
    tcase_add_test(tc, test_a_loop_of_cjson_calls_hits_the_instruction_limit);
    tcase_add_test(tc, test_a_sort_of_costly_comparisons_stops_at_the_time_limit);
    tcase_add_loop_test(tc,
                        test_a_gsub_whose_replacement_works_in_c_stops_soon_after_the_time_limit, 0,
                        ARRAY_LEN(SLOW_REPLACEMENTS));
    tcase_add_test(tc, test_gsub_with_a_table_or_a_function_replaces_as_lua_does);
    tcase_add_test(tc, test_a_loop_of_costly_comparisons_stops_soon_after_the_time_limit);
    tcase_add_test(tc, test_the_watchdog_sleeps_while_no_rule_runs);
    tcase_add_test(tc, test_sort_and_concat_refuse_a_table_with_a_length_of_its_own);
    tcase_add_test(tc, test_table_functions_refuse_a_table_that_reads_through_a_chain);
    tcase_add_test(tc, test_a_loop_of_custom_attributes_calls_hits_the_instruction_limit);
    tcase_add_test(tc, test_a_loop_of_matches_through_gmatch_hits_the_instruction_limit);
    tcase_add_test(tc, test_a_plain_search_too_large_for_one_call_is_refused);
    tcase_add_test(tc, test_one_slow_library_call_pays_at_most_an_eighth_of_the_budget);
    tcase_add_test(tc, test_lua_run_inside_a_library_call_is_charged_once);
    tcase_add_test(tc, test_a_rule_comparing_long_strings_in_a_loop_meets_the_time_limit);
    tcase_add_loop_test(tc, test_converting_long_text_to_a_number_pays_for_its_time, 0,
                        ARRAY_LEN(LONG_TEXT_CONVERSIONS));
    tcase_add_test(tc, test_os_date_refuses_a_long_format);
    tcase_add_test(tc, test_building_long_strings_in_a_loop_stops_soon_after_the_time_limit);
    tcase_add_test(tc, test_top_level_code_comparing_long_strings_meets_the_time_limit);
    tcase_add_test(tc, test_a_second_slow_library_call_pays_its_cpu_time_in_full);
    tcase_add_test(tc, test_a_slow_library_call_in_the_next_file_pays_its_cpu_time_in_full);
    tcase_add_test(tc,
                   test_a_slow_library_call_pays_an_eighth_of_the_events_budget_after_other_files);
    tcase_add_test(tc, test_the_rule_files_of_an_event_share_one_time_limit);
    tcase_add_test(tc, test_table_insert_refuses_a_table_with_a_len_metamethod);
    tcase_add_test(tc, test_one_files_globals_are_invisible_to_another);
    tcase_add_test(tc, test_one_file_cannot_change_another_files_globals);
    tcase_add_test(tc, test_pathological_pattern_is_refused_not_run);
    tcase_add_test(tc, test_pathological_pattern_is_refused_as_a_string_method);
    tcase_add_test(tc, test_pattern_check_allows_short_plain_patterns);
    tcase_add_test(tc, test_pattern_check_refuses_many_quantifiers_on_long_subjects);
    tcase_add_test(tc, test_pattern_check_refuses_overlong_patterns);
    tcase_add_test(tc, test_pattern_check_sees_past_escaped_sets_and_counts_back_references);
    tcase_add_test(tc, test_pattern_check_bounds_each_item_by_its_runs_in_the_subject);
    tcase_add_test(tc, test_pattern_check_counts_a_failed_first_set_at_its_length);
    tcase_add_test(tc, test_pattern_check_reads_items_as_lua_matches_them);
    tcase_add_test(tc, test_rules_trim_long_text);

    tc = tcase(s, "uninterruptible_c_functions");
    tcase_add_test(tc, test_pattern_starting_with_a_nul_byte_is_still_checked);
    tcase_add_test(tc, test_optional_items_count_towards_pattern_cost);
    tcase_add_test(tc, test_balance_pattern_on_a_long_subject_is_bounded);
    tcase_add_test(tc, test_repeating_an_empty_string_is_bounded);
    tcase_add_test(tc, test_table_move_over_a_huge_range_is_bounded);

    tc = tcase(s, "rule_tests");
    tcase_add_test(tc, test_wrong_expectation_is_reported_with_file_field_and_values);
    tcase_add_test(tc, test_expected_drop_of_a_mapped_event_is_reported);
    tcase_add_test(tc, test_wrong_drop_reason_is_reported);
    tcase_add_test(tc, test_expect_drop_that_is_not_a_reason_is_reported);
    tcase_add_test(tc, test_an_output_expected_of_a_dropped_event_names_the_file_that_dropped_it);
    tcase_add_test(tc, test_a_test_event_has_numbers_as_decoded_json_has_them);
    tcase_add_loop_test(tc, test_a_test_event_holding_what_json_cannot_carry_is_reported, 0, 6);
    tcase_add_test(tc, test_a_test_event_nested_past_the_decoding_depth_is_reported);
    tcase_add_test(tc, test_a_misspelt_key_of_a_test_or_its_config_is_reported);
    tcase_add_test(tc, test_a_misspelt_key_of_a_rule_file_fails_its_load);
    tcase_add_test(tc, test_a_test_with_both_expect_and_expect_drop_is_reported);
    tcase_add_test(tc, test_more_rule_tests_than_the_bound_fail_without_running_the_rest);
    tcase_add_test(tc, test_rules_get_the_workspace_and_records_keep_it);
    tcase_add_test(tc, test_a_dead_letter_keeps_the_workspace);
    tcase_add_test(tc, test_rule_tests_can_give_a_workspace);
    return s;
}

int main(void)
{
    default_rules_src = find_default_rules();
    int rc = unit_run(suite());
    free(default_rules_src);
    return rc;
}
