/* event_names: the custom event names sent to mParticle, against its limit. */
#include "unit.h"

#include "event_names.h"

#define T0 1796000000000LL /* a time to note names at */

static str name_of(char *out, size_t len, int i)
{
    snprintf(out, len, "Campaign %d", i);
    return (str){out, strlen(out)};
}

static int note(event_names *s, int i, int64_t limit)
{
    char a[32];
    int past;
    return event_names_note(s, name_of(a, sizeof a, i), limit, T0 + i, &past);
}

static void load(event_names *s, int from, int to)
{
    char a[32];
    for (int i = from; i < to; i++)
        ck_assert_int_eq(event_names_load(s, name_of(a, sizeof a, i)), 0);
}

struct logged_call {
    void (*fn)(event_names *, int64_t);
    event_names *s;
    int64_t limit;
};

static void run_logged(void *arg)
{
    const struct logged_call *c = arg;
    log_setup(LOG_DEBUG, LOG_LOGFMT);
    c->fn(c->s, c->limit);
    log_setup(LOG_ERROR, LOG_LOGFMT);
}

/* The log lines written while fn(s, limit) runs, in a buffer the caller frees. */
static char *logged(void (*fn)(event_names *, int64_t), event_names *s, int64_t limit)
{
    struct logged_call c = {fn, s, limit};
    return unit_stderr_of(run_logged, &c);
}

static size_t count(const char *text, const char *what)
{
    size_t n = 0;
    for (const char *p = text; (p = strstr(p, what)) != NULL; p += strlen(what))
        n++;
    return n;
}

#define NEAR "level=warn msg=\"event names near mParticle's limit"
#define PAST_AT_CHECK "level=error msg=\"event names past mParticle's limit"
#define PAST_NEW "level=error msg=\"new event name past mParticle's limit"

START_TEST(test_a_name_is_new_once_and_waits_to_be_stored_with_when_it_came)
{
    event_names *s = event_names_new();
    ck_assert_ptr_nonnull(s);
    char a[32], b[32];
    int past;
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 1), 1000, T0, &past), 1);
    ck_assert_int_eq(event_names_note(s, name_of(b, sizeof b, 1), 1000, T0 + 5, &past), 0);
    ck_assert_int_eq(event_names_note(s, name_of(b, sizeof b, 2), 1000, T0 + 7, &past), 1);
    ck_assert_int_eq(event_names_count(s), 2);
    /* the unstored names are copies, not the caller's text */
    memset(a, 'x', sizeof a);
    memset(b, 'x', sizeof b);
    size_t n;
    const struct event_name *unstored = event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 2);
    ck_assert(str_eq(unstored[0].name, "Campaign 1"));
    ck_assert_int_eq(unstored[0].first_ms, T0);
    ck_assert(str_eq(unstored[1].name, "Campaign 2"));
    ck_assert_int_eq(unstored[1].first_ms, T0 + 7);
    event_names_stored(s);
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(note(s, 2, 1000), 0);
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 0);
    event_names_free(s);
}
END_TEST

START_TEST(test_names_stored_before_are_known_and_not_stored_again)
{
    event_names *s = event_names_new();
    load(s, 0, 3000);
    load(s, 7, 8);
    ck_assert_int_eq(event_names_count(s), 3000);
    size_t n;
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 0);
    for (int i = 0; i < 3000; i++)
        ck_assert_int_eq(note(s, i, 100000), 0);
    ck_assert_int_eq(note(s, 3000, 100000), 1);
    ck_assert_int_eq(event_names_count(s), 3001);
    /* the empty name is a name */
    int past;
    ck_assert_int_eq(event_names_note(s, (str){"", 0}, 100000, T0, &past), 1);
    ck_assert_int_eq(event_names_note(s, (str){"", 0}, 100000, T0, &past), 0);
    event_names_free(s);
}
END_TEST

/* Whether an event's name came past the limit, in the order names were
 * first sent (stored ones first, in their order): mParticle drops the events
 * of those names, again at every event, and counted them as delivered. */
START_TEST(test_events_of_names_past_the_limit_are_told_every_time)
{
    event_names *s = event_names_new();
    load(s, 0, 3); /* Campaign 0, 1, 2 stored before: the first three */
    char a[32];
    int past = -1;
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 1), 3, T0, &past), 0);
    ck_assert_int_eq(past, 0);
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 3), 3, T0, &past), 1);
    ck_assert_int_eq(past, 1); /* the fourth */
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 3), 3, T0, &past), 0);
    ck_assert_int_eq(past, 1); /* and again */
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 2), 3, T0, &past), 0);
    ck_assert_int_eq(past, 0);
    /* a higher limit takes the fourth in */
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 3), 4, T0, &past), 0);
    ck_assert_int_eq(past, 0);
    /* past twice the limit a new name is not counted, and past it all the same */
    for (int i = 4; i < 6; i++)
        ck_assert_int_eq(note(s, i, 3), 1);
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 6), 3, T0, &past), 0);
    ck_assert_int_eq(past, 1);
    ck_assert_int_eq(event_names_count(s), 6);
    event_names_free(s);
}
END_TEST

static void note_1_to_4(event_names *s, int64_t limit)
{
    for (int i = 1; i <= 4; i++)
        note(s, i, limit);
}

static void note_5_to_7(event_names *s, int64_t limit)
{
    for (int i = 5; i <= 7; i++)
        note(s, i, limit);
}

START_TEST(test_new_names_under_90_percent_of_the_limit_are_said_at_debug_only)
{
    event_names *s = event_names_new();
    char *text = logged(note_1_to_4, s, 5);
    ck_assert_uint_eq(count(text, "level=debug msg=\"new event name sent to mParticle\""), 4);
    ck_assert_ptr_nonnull(strstr(text, "name=\"Campaign 4\" names=4"));
    ck_assert_uint_eq(count(text, "level=warn"), 0);
    ck_assert_uint_eq(count(text, "level=error"), 0);
    free(text);
    event_names_free(s);
}
END_TEST

static void note_8_to_10(event_names *s, int64_t limit)
{
    for (int i = 8; i <= 10; i++)
        note(s, i, limit);
}

START_TEST(test_90_percent_of_the_limit_is_warned_of_once)
{
    event_names *s = event_names_new();
    load(s, 1, 8); /* 7 names; the 8th is 80% of 10, the 9th 90% */
    char *text = logged(note_8_to_10, s, 10);
    ck_assert_uint_eq(count(text, NEAR), 1);
    ck_assert_ptr_nonnull(strstr(text, "names=9 limit=10"));
    ck_assert_uint_eq(count(text, "level=error"), 0);
    free(text);
    event_names_free(s);
}
END_TEST

START_TEST(test_each_new_name_past_the_limit_is_an_error_at_most_every_10_s)
{
    event_names *s = event_names_new();
    load(s, 1, 5);
    /* the 5th reaches the limit (a warning), the 6th and 7th pass it: one
     * line for both within 10 s, the count of the next line says so */
    char *text = logged(note_5_to_7, s, 5);
    ck_assert_uint_eq(count(text, NEAR), 1);
    ck_assert_uint_eq(count(text, PAST_NEW), 1);
    ck_assert_ptr_nonnull(
        strstr(text, "(tributary queue names lists it)\" names=6 limit=5 times=1"));
    /* the names themselves only at debug */
    ck_assert_uint_eq(count(text, "Campaign"), 3);
    ck_assert_uint_eq(count(text, "level=debug msg=\"new event name sent to mParticle\" "
                                  "name=\"Campaign 7\""),
                      1);
    ck_assert_int_eq(event_names_count(s), 7);
    free(text);
    event_names_free(s);
}
END_TEST

static void note_up_to_12(event_names *s, int64_t limit)
{
    for (int i = 1; i <= 12; i++)
        note(s, i, limit);
}

START_TEST(test_names_are_counted_up_to_twice_the_limit_said_once)
{
    event_names *s = event_names_new();
    char *text = logged(note_up_to_12, s, 5);
    ck_assert_int_eq(event_names_count(s), 10);
    ck_assert_uint_eq(count(text, "msg=\"more new event names than tributary counts"), 1);
    size_t n;
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 10);
    /* the 11th stays unknown, not stored */
    ck_assert_int_eq(note(s, 11, 5), 0);
    free(text);
    event_names_free(s);
}
END_TEST

static void check(event_names *s, int64_t limit)
{
    event_names_check(s, limit);
    event_names_check(s, limit);
}

START_TEST(test_a_count_read_back_is_said_once_per_limit_and_again_after_falling_under)
{
    event_names *s = event_names_new();
    load(s, 0, 4);
    char *text = logged(check, s, 5);
    ck_assert_uint_eq(count(text, "event names"), 0);
    free(text);
    load(s, 4, 6); /* 6 of 5: past it */
    text = logged(check, s, 5);
    ck_assert_uint_eq(count(text, PAST_AT_CHECK), 1);
    ck_assert_ptr_nonnull(strstr(text, "names=6 limit=5"));
    free(text);
    text = logged(check, s, 6); /* another limit: said again, as near */
    ck_assert_uint_eq(count(text, NEAR), 1);
    free(text);
    text = logged(check, s, 6);
    ck_assert_uint_eq(count(text, "event names"), 0);
    free(text);
    /* names forgotten (read again: 2 left), then at 90% again */
    event_names *read = event_names_new();
    load(read, 0, 2);
    ck_assert_int_eq(event_names_replace(s, read), 0);
    event_names_free(read);
    ck_assert_int_eq(event_names_count(s), 2);
    text = logged(check, s, 6);
    ck_assert_uint_eq(count(text, "event names"), 0);
    free(text);
    load(s, 2, 6);
    text = logged(check, s, 6);
    ck_assert_uint_eq(count(text, NEAR), 1);
    free(text);
    event_names_free(s);
}
END_TEST

START_TEST(test_names_read_again_take_the_place_of_the_set_but_for_the_unstored)
{
    event_names *s = event_names_new();
    load(s, 0, 5);
    ck_assert_int_eq(note(s, 5, 100), 1);
    /* read again: 0 and 1 were forgotten; 5 is not stored yet */
    event_names *read = event_names_new();
    load(read, 2, 5);
    ck_assert_int_eq(event_names_replace(s, read), 0);
    ck_assert_int_eq(event_names_count(read), 0);
    event_names_free(read);
    ck_assert_int_eq(event_names_count(s), 4);
    size_t n;
    const struct event_name *unstored = event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 1);
    ck_assert(str_eq(unstored[0].name, "Campaign 5"));
    ck_assert_int_eq(note(s, 5, 100), 0);
    ck_assert_int_eq(note(s, 3, 100), 0);
    ck_assert_int_eq(note(s, 1, 100), 1); /* forgotten: new again */
    ck_assert_int_eq(event_names_count(s), 5);
    event_names_free(s);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("event_names");
    TCase *tc = tcase_create("event_names");
    tcase_add_test(tc, test_a_name_is_new_once_and_waits_to_be_stored_with_when_it_came);
    tcase_add_test(tc, test_names_stored_before_are_known_and_not_stored_again);
    tcase_add_test(tc, test_new_names_under_90_percent_of_the_limit_are_said_at_debug_only);
    tcase_add_test(tc, test_90_percent_of_the_limit_is_warned_of_once);
    tcase_add_test(tc, test_each_new_name_past_the_limit_is_an_error_at_most_every_10_s);
    tcase_add_test(tc, test_names_are_counted_up_to_twice_the_limit_said_once);
    tcase_add_test(tc, test_a_count_read_back_is_said_once_per_limit_and_again_after_falling_under);
    tcase_add_test(tc, test_names_read_again_take_the_place_of_the_set_but_for_the_unstored);
    /* last: its new name past the limit takes the line of the next 10 s,
     * which test_each_new_name_past_the_limit_is_an_error_at_most_every_10_s
     * counts when the tests share a process (CK_FORK=no, under valgrind) */
    tcase_add_test(tc, test_events_of_names_past_the_limit_are_told_every_time);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
