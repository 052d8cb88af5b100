/* auth: the throttle of authentication failures, on a clock the tests give. */
#define UNIT_DIGEST_FAULTS
#include "unit.h"

#include "auth.h"
#include "config.h"

/* Fails client n times at now_s; how many of the failures started a refusal. */
static int fail_times(const char *client, int n, int64_t now_s)
{
    int started = 0;
    for (int i = 0; i < n; i++)
        started += auth_failed(client, now_s);
    return started;
}

static int refused(const char *client, int64_t now_s)
{
    int64_t wait = 0;
    return auth_throttled(client, now_s, &wait);
}

#define T0 1800000000

START_TEST(test_an_address_is_refused_at_its_tenth_failure_within_a_minute)
{
    const char *client = "198.51.100.1";
    ck_assert_int_eq(fail_times(client, AUTH_THROTTLE_FAILURES - 1, T0), 0);
    ck_assert(!refused(client, T0));
    ck_assert_int_eq(fail_times(client, 1, T0), 1);
    ck_assert(refused(client, T0));
    ck_assert(!refused(client, T0 + AUTH_THROTTLE_BLOCK_S + 1));
}
END_TEST

/* The failures of another sender behind the address of one that
 * authenticated (Braze's addresses serve all its customers) do not have it
 * refused, also when the real sender was quiet for hours: refused, its own
 * requests could not lift the refusal. */
START_TEST(test_an_address_that_authenticated_within_a_day_is_not_refused)
{
    const char *client = "198.51.100.2";
    auth_succeeded(client, T0);
    ck_assert_int_eq(fail_times(client, 3 * AUTH_THROTTLE_FAILURES, T0 + 3600), 0);
    ck_assert(!refused(client, T0 + 3600));
    ck_assert_int_eq(fail_times(client, 3 * AUTH_THROTTLE_FAILURES, T0 + AUTH_TRUSTED_S - 1), 0);
    ck_assert(!refused(client, T0 + AUTH_TRUSTED_S - 1));
    /* a day later, it is an address like any */
    int64_t later = T0 + AUTH_TRUSTED_S + AUTH_THROTTLE_WINDOW_S + 1;
    ck_assert_int_eq(fail_times(client, AUTH_THROTTLE_FAILURES, later), 1);
    ck_assert(refused(client, later));
}
END_TEST

/* Whoever holds a /64 could take a new address for every guess. */
START_TEST(test_the_addresses_of_one_ipv6_64_count_together)
{
    char client[64];
    for (int i = 0; i < AUTH_THROTTLE_FAILURES; i++) {
        snprintf(client, sizeof client, "2001:db8:0:7::%x", i + 1);
        ck_assert_int_eq(auth_failed(client, T0), i == AUTH_THROTTLE_FAILURES - 1);
    }
    ck_assert(refused("2001:db8:0:7:ffff:1:2:3", T0));
    ck_assert(!refused("2001:db8:0:8::1", T0));
    /* text that is no IPv6 address is a name of its own */
    ck_assert(!refused("unknown", T0));
}
END_TEST

/* The table of addresses is bounded: failures from thousands of others must
 * not push out the note that an address authenticated. */
START_TEST(test_failures_from_many_addresses_do_not_evict_a_trusted_one)
{
    const char *client = "198.51.100.3";
    auth_succeeded(client, T0);
    char other[64];
    for (int i = 0; i < 4000; i++) {
        snprintf(other, sizeof other, "203.0.%d.%d", i / 250, i % 250 + 1);
        auth_failed(other, T0 + 2);
    }
    ck_assert_int_eq(fail_times(client, 3 * AUTH_THROTTLE_FAILURES, T0 + 3), 0);
    ck_assert(!refused(client, T0 + 3));
    ck_assert(auth_trusted(client, T0 + 3));
}
END_TEST

/* Addresses refused in every slot a sender's address could take kept its
 * success from being noted: its signed bodies stayed with everyone's, and its
 * failures could be refused. A success takes the refusal's slot that ends
 * first; failures still cannot lift a refusal. */
START_TEST(test_a_table_full_of_refusals_still_notes_a_success)
{
    /* its own time: the notes and refusals of the tests before it (in one
     * process under valgrind, CK_FORK=no) are over */
    const int64_t t = T0 + 4 * AUTH_TRUSTED_S;
    char other[64];
    int blocked = 0;
    for (int i = 0; i < 4000; i++) {
        snprintf(other, sizeof other, "2001:db8:%x:%x::1", i / 256, i % 256);
        blocked += fail_times(other, AUTH_THROTTLE_FAILURES, t);
    }
    ck_assert_int_ge(blocked, 1024); /* every slot refuses somebody */
    const char *sender = "198.51.100.9";
    ck_assert(!auth_trusted(sender, t + 1));
    auth_succeeded(sender, t + 1);
    ck_assert(auth_trusted(sender, t + 1));
    ck_assert_int_eq(fail_times(sender, 3 * AUTH_THROTTLE_FAILURES, t + 2), 0);
    ck_assert(!refused(sender, t + 2));
    /* failures from one more address do not push a refusal out */
    int still = 0;
    for (int i = 0; i < 4000; i++) {
        snprintf(other, sizeof other, "2001:db8:%x:%x::1", i / 256, i % 256);
        still += refused(other, t + 3);
    }
    fail_times("203.0.113.250", AUTH_THROTTLE_FAILURES, t + 3);
    int after = 0;
    for (int i = 0; i < 4000; i++) {
        snprintf(other, sizeof other, "2001:db8:%x:%x::1", i / 256, i % 256);
        after += refused(other, t + 3);
    }
    ck_assert_int_eq(after, still);
    /* nor do other senders' successes push its note out before a refusal */
    for (int i = 0; i < 200; i++) {
        snprintf(other, sizeof other, "192.0.2.%d", i);
        auth_succeeded(other, t + 4);
    }
    ck_assert(auth_trusted(sender, t + 4));
}
END_TEST

/* What http_in asks before it counts a signed body as an authenticated one's:
 * a success within AUTH_TRUSTED_S, never a failure. */
START_TEST(test_an_address_is_trusted_for_a_day_after_it_authenticated)
{
    const char *client = "198.51.100.4";
    ck_assert(!auth_trusted(client, T0));
    fail_times(client, 1, T0);
    ck_assert(!auth_trusted(client, T0));
    auth_succeeded(client, T0 + 10);
    ck_assert(auth_trusted(client, T0 + 10));
    ck_assert(auth_trusted(client, T0 + 10 + AUTH_TRUSTED_S));
    ck_assert(!auth_trusted(client, T0 + 11 + AUTH_TRUSTED_S));
    ck_assert(!auth_trusted("198.51.100.5", T0 + 10));
    ck_assert(!auth_trusted("", T0 + 10));
    ck_assert(!auth_trusted(NULL, T0 + 10));
}
END_TEST

static struct config *config_of(const char *src)
{
    struct config *c = NULL;
    char err[ERR_LEN] = "";
    int rc = config_load_source(&c, "auth.lua", src, strlen(src), err, sizeof err);
    ck_assert_msg(rc == 0, "config: %s", err);
    return c;
}

#define TOKEN "tok-0123456789abcdef0123"

/* A token that cannot be checked is neither right nor wrong: the request gets
 * 503 (Braze retries) instead of 401 (Braze stops the connector), and the
 * client's address collects no failure. */
START_TEST(test_a_failing_hash_makes_credentials_unknown_not_wrong)
{
    struct config *c =
        config_of("return { inbound = { tokens = { \"" TOKEN "\" }, require = \"token\" },\n"
                  "  admin = { token = \"" TOKEN "\" } }\n");
    struct auth_request r = {.authorization = "Bearer " TOKEN, .have_body = 1, .now_s = T0};
    ck_assert_int_eq(auth_check(c, &r), AUTH_OK);
    ck_assert_int_eq(auth_check_bearer(c->admin_token, "Bearer " TOKEN), AUTH_OK);
    atomic_store(&unit_digest_fails, 1);
    ck_assert_int_eq(auth_check(c, &r), AUTH_ERROR);
    r.authorization = "Bearer wrong-token";
    ck_assert_int_eq(auth_check(c, &r), AUTH_ERROR);
    ck_assert_int_eq(auth_check_bearer(c->admin_token, "Bearer " TOKEN), AUTH_ERROR);
    atomic_store(&unit_digest_fails, 0);
    ck_assert_int_eq(auth_check(c, &r), AUTH_INVALID);
    config_unref(c);

    /* either credential: a wrong signature does not decide while the token is
     * unknown */
    c = config_of(
        "return { inbound = { tokens = { \"" TOKEN "\" },\n"
        "  hmac_secrets = { \"secret-0123456789abcdef0123\" }, require = \"either\" } }\n");
    char sig[128];
    snprintf(sig, sizeof sig, "t=%d,v1=%064d", T0, 0);
    struct auth_request e = {.authorization = "Bearer " TOKEN,
                             .signature = sig,
                             .body = "{}",
                             .len = 2,
                             .have_body = 1,
                             .now_s = T0};
    atomic_store(&unit_digest_fails, 1);
    ck_assert_int_eq(auth_check(c, &e), AUTH_ERROR);
    atomic_store(&unit_digest_fails, 0);
    ck_assert_int_eq(auth_check(c, &e), AUTH_OK);
    config_unref(c);
}
END_TEST

/* inbound.replay_window_s is how far a signature's time may be from now:
 * that far is taken, one second more is not, either way. */
START_TEST(test_a_signature_exactly_the_replay_window_away_is_taken)
{
    struct config *c =
        config_of("return { inbound = { hmac_secrets = "
                  "{ \"secret-0123456789abcdef0123\" }, replay_window_s = 300 } }\n");
    char sig[128];
    ck_assert_int_eq(auth_sign("secret-0123456789abcdef0123", T0, "{}", 2, sig, sizeof sig), 0);
    static const struct {
        int64_t off;
        enum auth_result want;
    } cases[] = {{-300, AUTH_OK}, {300, AUTH_OK}, {-301, AUTH_EXPIRED}, {301, AUTH_EXPIRED}};
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        struct auth_request r = {
            .signature = sig, .body = "{}", .len = 2, .have_body = 1, .now_s = T0 + cases[i].off};
        ck_assert_msg(auth_check(c, &r) == cases[i].want, "now %+lld s from the signature",
                      (long long)cases[i].off);
    }
    config_unref(c);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("throttle");
    tcase_add_test(tc, test_an_address_is_refused_at_its_tenth_failure_within_a_minute);
    tcase_add_test(tc, test_an_address_that_authenticated_within_a_day_is_not_refused);
    tcase_add_test(tc, test_the_addresses_of_one_ipv6_64_count_together);
    tcase_add_test(tc, test_failures_from_many_addresses_do_not_evict_a_trusted_one);
    tcase_add_test(tc, test_an_address_is_trusted_for_a_day_after_it_authenticated);
    tcase_add_test(tc, test_a_table_full_of_refusals_still_notes_a_success);
    tcase_add_test(tc, test_a_failing_hash_makes_credentials_unknown_not_wrong);
    tcase_add_test(tc, test_a_signature_exactly_the_replay_window_away_is_taken);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
