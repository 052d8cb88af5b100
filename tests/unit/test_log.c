/* log: the lines written to stderr. */
#include "unit.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>

#define WRITERS 4
#define LINES 40
#define VALUE_BASE 6000 /* past PIPE_BUF (4 KiB), under the log's 8 KiB cut */

/* The value of writer w's line i: "w<w>-l<i>-" and a letter of its own up to
 * its length, a different one for each line. */
static size_t value_len(int w, int i)
{
    return VALUE_BASE + (size_t)w * 300 + (size_t)i * 7;
}

static char value_fill(int w, int i)
{
    return (char)('a' + (w * LINES + i) % 26);
}

static void value_of(char *out, int w, int i)
{
    size_t len = value_len(w, i);
    int head = snprintf(out, len + 1, "w%d-l%d-", w, i);
    memset(out + head, value_fill(w, i), len - (size_t)head);
    out[len] = '\0';
}

static void *write_lines(void *arg)
{
    int w = (int)(intptr_t)arg;
    char *value = malloc(value_len(w, LINES) + 1);
    if (!value)
        return NULL;
    for (int i = 0; i < LINES; i++) {
        value_of(value, w, i);
        log_error("long line", LOG_S("v", value) LOG_I("w", w) LOG_I("i", i));
    }
    free(value);
    return NULL;
}

/* Reads the pipe to its end a little at a time, so that the writers find it
 * full and their lines go in several pieces. */
struct slow_reader {
    int fd;
    buf got;
    int failed;
};

static void *read_slowly(void *arg)
{
    struct slow_reader *r = arg;
    char chunk[512];
    for (;;) {
        ssize_t n = read(r->fd, chunk, sizeof chunk);
        if (n == 0)
            return NULL;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            r->failed = 1;
            return NULL;
        }
        if (buf_add(&r->got, chunk, (size_t)n) != 0)
            r->failed = 1;
        struct timespec pause = {0, 20000};
        nanosleep(&pause, NULL);
    }
}

/* 1 when line (without its newline) is one of the lines write_lines writes,
 * whole: "ts=<24 characters>", the level, the message and its fields, nothing
 * else; it is then marked seen. */
static int line_is_whole(const char *line, size_t len, int seen[WRITERS][LINES])
{
    static const char head[] = " level=error msg=\"long line\" v=";
    const size_t at = 3 + 24;
    int w = -1, i = -1;
    if (len < at + sizeof head - 1 || memcmp(line, "ts=", 3) != 0 ||
        memcmp(line + at, head, sizeof head - 1) != 0)
        return 0;
    const char *v = line + at + sizeof head - 1;
    if (sscanf(v, "w%d-l%d-", &w, &i) != 2 || w < 0 || w >= WRITERS || i < 0 || i >= LINES)
        return 0;
    char *want = malloc(value_len(w, i) + 64);
    ck_assert_ptr_nonnull(want);
    value_of(want, w, i);
    size_t n = strlen(want);
    snprintf(want + n, 64, " w=%d i=%d", w, i);
    n = strlen(want);
    int whole = (size_t)(line + len - v) == n && memcmp(v, want, n) == 0;
    free(want);
    seen[w][i] += whole;
    return whole;
}

/* Lines longer than a pipe takes at once, from several threads, reach a pipe
 * whose reader is behind each whole, none inside another. */
START_TEST(test_long_lines_from_several_threads_reach_a_pipe_whole)
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    (void)fcntl(fds[1], F_SETPIPE_SZ, 4096); /* the smallest: every line goes in pieces */
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    ck_assert_int_ge(saved, 0);
    ck_assert_int_ge(dup2(fds[1], STDERR_FILENO), 0);
    close(fds[1]);

    struct slow_reader r = {.fd = fds[0]};
    buf_init(&r.got, (size_t)64 << 20);
    pthread_t reader, writers[WRITERS];
    int reading = pthread_create(&reader, NULL, read_slowly, &r) == 0, started = 0;
    for (; reading && started < WRITERS; started++)
        if (pthread_create(&writers[started], NULL, write_lines, (void *)(intptr_t)started) != 0)
            break;
    for (int w = 0; w < started; w++)
        pthread_join(writers[w], NULL);
    /* stderr back before any assertion: the reader then sees the pipe's end */
    dup2(saved, STDERR_FILENO);
    close(saved);
    if (reading)
        pthread_join(reader, NULL);
    close(fds[0]);
    ck_assert(reading);
    ck_assert_int_eq(started, WRITERS);
    ck_assert_int_eq(r.failed, 0);

    static int seen[WRITERS][LINES];
    memset(seen, 0, sizeof seen);
    size_t lines = 0, broken = 0;
    for (const char *p = r.got.data, *end = p + r.got.len, *nl; p < end; p = nl + 1) {
        nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl)
            nl = end;
        lines++;
        if (!line_is_whole(p, (size_t)(nl - p), seen))
            broken++;
    }
    buf_free(&r.got);
    ck_assert_msg(broken == 0, "%zu of %zu lines were not whole", broken, lines);
    ck_assert_uint_eq(lines, WRITERS * LINES);
    for (int w = 0; w < WRITERS; w++)
        for (int i = 0; i < LINES; i++)
            ck_assert_int_eq(seen[w][i], 1);
}
END_TEST

#define TAKERS 4
#define TAKES 2000
static struct log_budget budget;
static int taken[TAKERS][TAKES];

static void *take_lines(void *arg)
{
    int t = (int)(intptr_t)arg;
    for (int i = 0; i < TAKES; i++)
        taken[t][i] = log_budget_take(&budget);
    return NULL;
}

/* Lines at each level as journald would get them: JOURNAL_STREAM names
 * stderr, then a stream that is not stderr, then none. */
static void journal_lines(void *unused)
{
    (void)unused;
    struct stat st;
    ck_assert_int_eq(fstat(STDERR_FILENO, &st), 0);
    char stream[64];
    snprintf(stream, sizeof stream, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    setenv("JOURNAL_STREAM", stream, 1);
    log_setup(LOG_DEBUG, LOG_LOGFMT);
    log_debug("d");
    log_info("i");
    log_warn("w");
    log_error("e");
    log_setup(LOG_DEBUG, LOG_JSON);
    log_error("json");
    snprintf(stream, sizeof stream, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino + 1);
    setenv("JOURNAL_STREAM", stream, 1);
    log_setup(LOG_DEBUG, LOG_LOGFMT);
    log_error("another stream");
    unsetenv("JOURNAL_STREAM");
    log_setup(LOG_DEBUG, LOG_LOGFMT);
    log_error("none");
}

/* Under systemd, journald kept every line at priority info: `journalctl -p
 * err` showed no error. A line to journald's stream starts with its syslog
 * priority, which journald takes off. */
START_TEST(test_lines_to_journald_carry_their_syslog_priority)
{
    char *text = unit_stderr_of(journal_lines, NULL);
    log_setup(LOG_ERROR, LOG_LOGFMT);
    const char *want[] = {"<7>ts=",
                          " msg=\"d\"\n<6>ts=",
                          " msg=\"i\"\n<4>ts=",
                          " msg=\"w\"\n<3>ts=",
                          " msg=\"e\"\n<3>{\"ts\":",
                          "\"msg\":\"json\"}\nts=",
                          " msg=\"another stream\"\nts=",
                          " msg=\"none\"\n"};
    const char *at = text;
    for (size_t i = 0; i < ARRAY_LEN(want); i++) {
        const char *found = strstr(at, want[i]);
        ck_assert_msg(found != NULL, "%s not in order in:\n%s", want[i], text);
        at = found + strlen(want[i]);
    }
    free(text);
}
END_TEST

/* Within one second, the lines counted by threads at once are numbered 0, 1,
 * 2, ... each once; the next second starts again at 0. */
START_TEST(test_a_line_budget_counts_each_line_of_a_second_once)
{
    int tries = 0, counted = 0;
    for (; tries < 5 && !counted; tries++) {
        /* a run that straddles two seconds says nothing: try again */
        int64_t start = clock_wall_ms() / 1000;
        memset(&budget, 0, sizeof budget);
        pthread_t th[TAKERS];
        for (int t = 0; t < TAKERS; t++)
            ck_assert_int_eq(pthread_create(&th[t], NULL, take_lines, (void *)(intptr_t)t), 0);
        for (int t = 0; t < TAKERS; t++)
            pthread_join(th[t], NULL);
        if (clock_wall_ms() / 1000 != start)
            continue;
        static unsigned char seen[TAKERS * TAKES];
        memset(seen, 0, sizeof seen);
        for (int t = 0; t < TAKERS; t++)
            for (int i = 0; i < TAKES; i++) {
                ck_assert_int_ge(taken[t][i], 0);
                ck_assert_int_lt(taken[t][i], TAKERS * TAKES);
                seen[taken[t][i]]++;
            }
        for (int k = 0; k < TAKERS * TAKES; k++)
            ck_assert_int_eq(seen[k], 1);
        counted = 1;
    }
    ck_assert(counted);
    /* the next second */
    int64_t second = clock_wall_ms() / 1000;
    while (clock_wall_ms() / 1000 == second)
        usleep(10000);
    ck_assert_int_eq(log_budget_take(&budget), 0);
    ck_assert_int_eq(log_budget_take(&budget), 1);
}
END_TEST

/* The lines are counted in the second of their stamps; a thread that read
 * the clock before another started a second counts in that one, and a clock
 * set back starts a second of its own. */
START_TEST(test_a_line_budget_counts_in_the_wall_clock_second)
{
    struct log_budget b;
    memset(&b, 0, sizeof b);
    /* seconds ahead of the clock, which is then behind all of them: as after
     * the clock was set back by a minute */
    uint64_t now = (uint64_t)clock_wall_ms() / 1000, ahead = now + 60;
    ck_assert_int_eq(log_budget_take_in(&b, ahead), 0);
    ck_assert_int_eq(log_budget_take_in(&b, ahead), 1);
    ck_assert_int_eq(log_budget_take_in(&b, ahead - 1), 2);
    ck_assert_int_eq(log_budget_take_in(&b, ahead + 1), 0);
    ck_assert_int_eq(log_budget_take_in(&b, ahead + 1), 1);
    ck_assert_int_eq(log_budget_take_in(&b, ahead - 5), 0);
    ck_assert_int_eq(log_budget_take_in(&b, ahead - 5), 1);
    ck_assert_int_eq(log_budget_take(&b), 0);
    /* a thread held up seconds between its clock read and its count: the
     * clock is where the budget's second is, so it counts there */
    memset(&b, 0, sizeof b);
    ck_assert_int_eq(log_budget_take_in(&b, now), 0);
    ck_assert_int_eq(log_budget_take_in(&b, now - 3), 1);
}
END_TEST

/* A repeated line: the first is written and counts itself; the others of the
 * next 10 s are counted for the next one. */
START_TEST(test_a_repeated_line_is_written_once_and_counts_the_rest)
{
    struct log_repeat r;
    memset(&r, 0, sizeof r);
    ck_assert_uint_eq(log_repeat_due(&r), 1);
    for (int i = 0; i < 5; i++)
        ck_assert_uint_eq(log_repeat_due(&r), 0);
    /* as if LOG_REPEAT_MS had passed since the line */
    atomic_store(&r.last_ms, clock_mono_ms() - LOG_REPEAT_MS - 1);
    ck_assert_uint_eq(log_repeat_due(&r), 6);
    ck_assert_uint_eq(log_repeat_due(&r), 0);
}
END_TEST

/* The place of a repeated line, for the test below. */
static struct log_repeat *repeat_place;

static void repeat_line(void)
{
    static struct log_repeat here;
    repeat_place = &here;
    uint64_t times = log_repeat_due_line(&here, LOG_ERROR, "a burst");
    if (times)
        log_error("a burst", LOG_S("field", "f") LOG_I("times", (long long)times));
}

static void burst(void *unused)
{
    (void)unused;
    for (int i = 0; i < 3; i++)
        repeat_line();
    log_repeats_flush(0); /* within LOG_REPEAT_MS: nothing */
}

static void flush_busy(void *unused)
{
    (void)unused;
    /* as if LOG_REPEAT_MS had passed since the line, but not since the
     * last time: still happening, it tells its times itself, fields and all */
    atomic_store(&repeat_place->last_ms, clock_mono_ms() - LOG_REPEAT_MS - 1);
    log_repeats_flush(0);
}

static void flush_quiet(void *unused)
{
    (void)unused;
    /* and quiet since */
    atomic_store(&repeat_place->seen_ms, clock_mono_ms() - LOG_REPEAT_MS - 1);
    log_repeats_flush(0);
    log_repeats_flush(0); /* told once */
}

static void flush_all(void *unused)
{
    (void)unused;
    repeat_line(); /* counted for the next line */
    log_repeats_flush(1);
}

/* The times of a burst after the last line were told only by the next
 * occurrence, which may never come: a flush tells them, with `times` alone,
 * once the place has been quiet for 10 s, or at a stop. */
START_TEST(test_a_flush_tells_the_times_a_repeated_line_has_not_told)
{
    log_setup(LOG_DEBUG, LOG_LOGFMT);
    char *text = unit_stderr_of(burst, NULL);
    ck_assert_msg(strstr(text, "msg=\"a burst\" field=f times=1\n") != NULL, "%s", text);
    ck_assert_msg(strstr(text, "times=2") == NULL, "%s", text);
    free(text);
    text = unit_stderr_of(flush_busy, NULL);
    ck_assert_str_eq(text, "");
    free(text);
    text = unit_stderr_of(flush_quiet, NULL);
    ck_assert_msg(strstr(text, "level=error msg=\"a burst\" times=2\n") != NULL, "%s", text);
    ck_assert_msg(strstr(strstr(text, "times=2") + 1, "a burst") == NULL, "%s", text);
    free(text);
    text = unit_stderr_of(flush_all, NULL);
    ck_assert_msg(strstr(text, "level=error msg=\"a burst\" times=1\n") != NULL, "%s", text);
    free(text);
    log_setup(LOG_ERROR, LOG_LOGFMT);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("log");
    TCase *tc = tcase_create("log");
    tcase_add_test(tc, test_long_lines_from_several_threads_reach_a_pipe_whole);
    tcase_add_test(tc, test_lines_to_journald_carry_their_syslog_priority);
    tcase_add_test(tc, test_a_line_budget_counts_each_line_of_a_second_once);
    tcase_add_test(tc, test_a_line_budget_counts_in_the_wall_clock_second);
    tcase_add_test(tc, test_a_repeated_line_is_written_once_and_counts_the_rest);
    tcase_add_test(tc, test_a_flush_tells_the_times_a_repeated_line_has_not_told);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
