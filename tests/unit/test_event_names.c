/* event_names: the event names sent to mParticle, against its limit. */
#include "unit.h"

#include "event_names.h"

#include <fcntl.h>

static str name_of(char *out, size_t len, int i)
{
    snprintf(out, len, "Campaign %d", i);
    return (str){out, strlen(out)};
}

/* The log lines written while fn runs, in a buffer the caller frees. */
static char *logged(void (*fn)(event_names *), event_names *s)
{
    char path[] = "/tmp/tributary-unit-log-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
    log_setup(LOG_DEBUG, LOG_LOGFMT);
    fn(s);
    fflush(stderr);
    log_setup(LOG_ERROR, LOG_LOGFMT);
    dup2(saved, STDERR_FILENO);
    close(saved);
    off_t size = lseek(fd, 0, SEEK_END);
    char *text = calloc(1, (size_t)size + 1);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(pread(fd, text, (size_t)size, 0), size);
    close(fd);
    return text;
}

static size_t count(const char *text, const char *what)
{
    size_t n = 0;
    for (const char *p = text; (p = strstr(p, what)) != NULL; p += strlen(what))
        n++;
    return n;
}

START_TEST(test_a_name_is_new_once_and_waits_to_be_stored)
{
    event_names *s = event_names_new();
    ck_assert_ptr_nonnull(s);
    char a[32], b[32];
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 1), 1000), 1);
    ck_assert_int_eq(event_names_note(s, name_of(b, sizeof b, 1), 1000), 0);
    ck_assert_int_eq(event_names_note(s, name_of(b, sizeof b, 2), 1000), 1);
    ck_assert_int_eq(event_names_count(s), 2);
    /* the unstored names are the set's copies, not the caller's text */
    memset(a, 'x', sizeof a);
    memset(b, 'x', sizeof b);
    size_t n;
    const str *unstored = event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 2);
    ck_assert(str_eq(unstored[0], "Campaign 1"));
    ck_assert(str_eq(unstored[1], "Campaign 2"));
    event_names_stored(s);
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 2), 1000), 0);
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 0);
    event_names_free(s);
}
END_TEST

START_TEST(test_names_stored_before_are_known_and_not_stored_again)
{
    event_names *s = event_names_new();
    char a[32];
    for (int i = 0; i < 3000; i++)
        ck_assert_int_eq(event_names_load(s, name_of(a, sizeof a, i)), 0);
    ck_assert_int_eq(event_names_load(s, name_of(a, sizeof a, 7)), 0);
    ck_assert_int_eq(event_names_count(s), 3000);
    size_t n;
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 0);
    for (int i = 0; i < 3000; i++)
        ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, i), 100000), 0);
    ck_assert_int_eq(event_names_note(s, name_of(a, sizeof a, 3000), 100000), 1);
    ck_assert_int_eq(event_names_count(s), 3001);
    /* the empty name is a name */
    ck_assert_int_eq(event_names_note(s, (str){"", 0}, 100000), 1);
    ck_assert_int_eq(event_names_note(s, (str){"", 0}, 100000), 0);
    event_names_free(s);
}
END_TEST

static void note_twelve_of_limit_5(event_names *s)
{
    char a[32];
    for (int i = 1; i <= 12; i++)
        event_names_note(s, name_of(a, sizeof a, i), 5);
    for (int i = 1; i <= 12; i++)
        event_names_note(s, name_of(a, sizeof a, i), 5);
}

START_TEST(test_the_limit_is_warned_of_at_90_percent_and_past_it_each_10_s)
{
    event_names *s = event_names_new();
    char *text = logged(note_twelve_of_limit_5, s);
    /* under 90% of 5: at debug only */
    ck_assert_uint_eq(count(text, "msg=\"new event name sent to mParticle\""), 5);
    ck_assert_uint_eq(count(text, "level=warn msg=\"event names near mParticle's limit"), 1);
    ck_assert_ptr_nonnull(strstr(text, "names=5 limit=5"));
    /* past it: one error line (then at most one per 10 s, counted) */
    ck_assert_uint_eq(count(text, "level=error msg=\"new event name past mParticle's limit"), 1);
    ck_assert_ptr_nonnull(strstr(text, "name=\"Campaign 6\" names=6 limit=5 times=1"));
    /* twice the limit kept: the 11th and 12th are not, said once */
    ck_assert_int_eq(event_names_count(s), 10);
    ck_assert_uint_eq(count(text, "msg=\"more new event names than tributary counts"), 1);
    size_t n;
    event_names_unstored(s, &n);
    ck_assert_uint_eq(n, 10);
    free(text);
    event_names_free(s);
}
END_TEST

static void check_limit_5(event_names *s)
{
    event_names_check(s, 5);
    event_names_check(s, 5);
}

START_TEST(test_names_read_back_at_90_percent_are_warned_of_once)
{
    event_names *s = event_names_new();
    char a[32];
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(event_names_load(s, name_of(a, sizeof a, i)), 0);
    char *text = logged(check_limit_5, s);
    ck_assert_uint_eq(count(text, "event names near mParticle's limit"), 0);
    free(text);
    ck_assert_int_eq(event_names_load(s, name_of(a, sizeof a, 4)), 0);
    text = logged(check_limit_5, s);
    ck_assert_uint_eq(count(text, "event names near mParticle's limit"), 1);
    free(text);
    event_names_free(s);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("event_names");
    TCase *tc = tcase_create("event_names");
    tcase_add_test(tc, test_a_name_is_new_once_and_waits_to_be_stored);
    tcase_add_test(tc, test_names_stored_before_are_known_and_not_stored_again);
    tcase_add_test(tc, test_the_limit_is_warned_of_at_90_percent_and_past_it_each_10_s);
    tcase_add_test(tc, test_names_read_back_at_90_percent_are_warned_of_once);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
