/* util: bounded buffers, JSON escaping, parsing. */
#include "unit.h"

#include "log.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

START_TEST(test_buf_refuses_to_grow_past_its_cap)
{
    buf b;
    buf_init(&b, 8);
    ck_assert_int_eq(buf_adds(&b, "12345678"), 0);
    ck_assert_int_eq(buf_addc(&b, '9'), -1);
    ck_assert_uint_eq(b.len, 8);
    ck_assert_str_eq(b.data, "12345678");
    buf_free(&b);
}
END_TEST

/* A reservation takes one block of exactly the room asked for, which the
 * appends then fill without moving it. */
START_TEST(test_buf_reserve_takes_the_room_at_once)
{
    buf b;
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(buf_reserve(&b, 5000), 0);
    ck_assert_uint_eq(b.cap, 5001);
    const char *block = b.data;
    char chunk[1000];
    memset(chunk, 'x', sizeof chunk);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(buf_add(&b, chunk, sizeof chunk), 0);
    ck_assert_ptr_eq(b.data, block);
    ck_assert_uint_eq(b.len, 5000);
    ck_assert_int_eq(buf_addc(&b, 'y'), 0);
    ck_assert_uint_ge(b.cap, 5002);
    ck_assert_int_eq(buf_reserve(&b, 1 << 20), -1);
    ck_assert_uint_eq(b.len, 5001);
    buf_free(&b);
}
END_TEST

START_TEST(test_json_string_escapes_quotes_controls_and_backslashes)
{
    buf b;
    buf_init(&b, 1024);
    const char in[] = "a\"b\\c\n\t\x01z";
    ck_assert_int_eq(buf_json_str(&b, in, sizeof in - 1), 0);
    ck_assert_str_eq(b.data, "\"a\\\"b\\\\c\\n\\t\\u0001z\"");
    buf_free(&b);
}
END_TEST

START_TEST(test_buf_json_str_escapes_every_control_byte_and_delete)
{
    buf b;
    buf_init(&b, 1024);
    const char in[] = "\b\f\r\x1f\x7f/\xc3\xa9";
    ck_assert_int_eq(buf_json_str(&b, in, sizeof in - 1), 0);
    ck_assert_str_eq(b.data, "\"\\b\\f\\r\\u001f\\u007f/\xc3\xa9\"");
    buf_free(&b);
}
END_TEST

/* JSON text must be UTF-8: what is not becomes U+FFFD, a byte at a time,
 * and well-formed sequences of every length pass unchanged. */
START_TEST(test_buf_json_str_writes_what_is_not_utf8_as_the_replacement_character)
{
    static const struct {
        const char *in, *want;
    } cases[] = {
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
         "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""},
        {"c\xff", "\"c\xef\xbf\xbd\""},                                 /* never UTF-8 */
        {"b\xc3(", "\"b\xef\xbf\xbd(\""},                               /* a sequence cut short */
        {"\xed\xa0\x80z", "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdz\""}, /* a surrogate */
        {"\xc0\xaf", "\"\xef\xbf\xbd\xef\xbf\xbd\""},                   /* overlong '/' */
        {"\xf4\x90\x80\x80",
         "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\""},     /* past U+10FFFF */
        {"abcdefgh\xe2\x82", "\"abcdefgh\xef\xbf\xbd\xef\xbf\xbd\""}, /* cut at the end */
        {"\"\x80\n", "\"\\\"\xef\xbf\xbd\\n\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        buf b;
        buf_init(&b, 1024);
        ck_assert_int_eq(buf_json_str(&b, cases[i].in, strlen(cases[i].in)), 0);
        ck_assert_msg(strcmp(b.data, cases[i].want) == 0, "case %zu: %s", i, b.data);
        buf_free(&b);
    }
}
END_TEST

/* Long strings pass 8 bytes at a time: every byte value at every position of
 * a 19-byte string (two words and a tail) must come out as the escape table says. */
START_TEST(test_buf_json_str_escapes_every_byte_at_every_position_of_a_long_string)
{
    for (int c = 0; c < 256; c++) {
        char expect_mid[8];
        if (c == '"' || c == '\\')
            snprintf(expect_mid, sizeof expect_mid, "\\%c", c);
        else if (c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t')
            snprintf(expect_mid, sizeof expect_mid, "\\%c",
                     c == '\b'   ? 'b'
                     : c == '\f' ? 'f'
                     : c == '\n' ? 'n'
                     : c == '\r' ? 'r'
                                 : 't');
        else if (c < 0x20 || c == 0x7f)
            snprintf(expect_mid, sizeof expect_mid, "\\u%04x", c);
        else if (c >= 0x80) /* alone, no byte of 0x80 and up is UTF-8: U+FFFD */
            snprintf(expect_mid, sizeof expect_mid, "\xEF\xBF\xBD");
        else
            snprintf(expect_mid, sizeof expect_mid, "%c", c);
        for (size_t pos = 0; pos < 19; pos++) {
            char in[19], expect[64];
            memset(in, 'a', sizeof in);
            in[pos] = (char)c;
            int n = snprintf(expect, sizeof expect, "\"%.*s%s%.*s\"", (int)pos, in, expect_mid,
                             (int)(sizeof in - pos - 1), in + pos + 1);
            buf b;
            buf_init(&b, 1024);
            ck_assert_int_eq(buf_json_str(&b, in, sizeof in), 0);
            ck_assert_uint_eq(b.len, (size_t)n);
            ck_assert_msg(memcmp(b.data, expect, (size_t)n) == 0, "byte 0x%02x at %zu: %s", c, pos,
                          b.data);
            buf_free(&b);
        }
    }
}
END_TEST

/* The escape of one byte, as JSON_ESCAPE in util.c says, written out here. */
static void escape_byte(buf *b, unsigned char c)
{
    static const char with_short[] = "\"\\\b\f\n\r\t", letters[] = "\"\\bfnrt";
    const char *short_escape = strchr(with_short, c);
    if (c && short_escape)
        (void)!buf_printf(b, "\\%c", letters[short_escape - with_short]);
    else if (c < 0x20 || c == 0x7f)
        (void)!buf_printf(b, "\\u%04x", c);
    else
        (void)!buf_addc(b, (char)c);
}

/* Random strings of bytes that need an escape and bytes that do not, next to
 * each other in every arrangement, against the byte-by-byte reference (and
 * json_str_len against the length of what it wrote, json_str_chars against
 * the characters it holds, json_str_prefix against where each ends, and
 * utf8_valid against whether it wrote U+FFFD). Of the
 * bytes of 0x80 and up here, 0xc2 or 0xc3 followed by 0x80, 0x9b, 0xa0 or
 * 0xa9 is UTF-8 (U+0080 - U+00FF), of which 0xc2 followed by 0x80 or 0x9b is
 * a C1 control character, escaped; every other such byte is written as
 * U+FFFD. */
START_TEST(test_buf_json_str_matches_a_byte_by_byte_escape_on_random_strings)
{
    static const unsigned char alphabet[] = {'a',  '"',  '\\', 0,   0x1f, '\n', 0x7f, 0x80,
                                             0xc3, 0xa9, ' ',  '~', 0xc2, 0x9b, 0xa0};
    unsigned seed = 12345;
    for (int round = 0; round < 5000; round++) {
        char in[48];
        size_t n = (size_t)(round % 48);
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            in[i] = (char)alphabet[(seed >> 16) % sizeof alphabet];
        }
        buf got, want;
        buf_init(&got, 1024);
        buf_init(&want, 1024);
        ck_assert_int_eq(buf_json_str(&got, in, n), 0);
        (void)!buf_addc(&want, '"');
        size_t chars = 0;   /* of the string the text holds */
        size_t ends[48];    /* where each of them ends in `in` */
        int valid_utf8 = 1; /* no U+FFFD written */
        for (size_t i = 0; i < n; i++, chars++) {
            unsigned char c = (unsigned char)in[i];
            unsigned char next = i + 1 < n ? (unsigned char)in[i + 1] : 0;
            int two = (c == 0xc2 || c == 0xc3) && next >= 0x80 && next <= 0xbf;
            if (two && c == 0xc2 && next <= 0x9f) {
                (void)!buf_printf(&want, "\\u%04x", next);
                i++;
            } else if (two) {
                (void)!buf_add(&want, in + i, 2);
                i++;
            } else if (c >= 0x80) {
                (void)!buf_adds(&want, "\xEF\xBF\xBD");
                valid_utf8 = 0;
            } else {
                escape_byte(&want, c);
            }
            ends[chars] = i + 1;
        }
        (void)!buf_addc(&want, '"');
        ck_assert_uint_eq(got.len, want.len);
        ck_assert_msg(memcmp(got.data, want.data, want.len) == 0, "round %d: %s against %s", round,
                      got.data, want.data);
        /* json_str_len tells the length beforehand */
        ck_assert_uint_eq(json_str_len(in, n), want.len);
        /* and json_str_chars the characters a reader of the text counts */
        ck_assert_uint_eq(json_str_chars(in, n), chars);
        /* json_str_prefix where the first so many of them end */
        for (size_t max = 0; max <= chars + 1; max++)
            ck_assert_uint_eq(json_str_prefix(in, n, max), max == 0      ? 0
                                                           : max > chars ? n
                                                                         : ends[max - 1]);
        ck_assert_int_eq(utf8_valid(in, n), valid_utf8);
        buf_free(&got);
        buf_free(&want);
    }
}
END_TEST

/* mParticle's "characters" read as UTF-16 code units, the stricter reading: a
 * character beyond U+FFFF (an emoji) counts two, so 4,096 of them cut to
 * 4,096 characters were 8,192 units, and the batch was refused. */
START_TEST(test_characters_beyond_the_basic_plane_count_two)
{
    static const char grin[] = "\xF0\x9F\x98\x80"; /* U+1F600 */
    char s[64];
    snprintf(s, sizeof s, "a%s\xC3\xA9%s", grin, grin); /* a, U+1F600, U+00E9, U+1F600 */
    size_t n = strlen(s);
    ck_assert_uint_eq(json_str_chars(s, n), 6);
    ck_assert_uint_eq(json_str_chars(grin, 4), 2);
    /* a prefix never ends within a character, and never holds half of one */
    static const size_t ends[] = {0, 1, 1, 5, 7, 7, 11, 11};
    for (size_t max = 0; max < ARRAY_LEN(ends); max++)
        ck_assert_uint_eq(json_str_prefix(s, n, max), ends[max]);
}
END_TEST

/* A stored event is JSON as lua-cjson took it: control characters and bytes
 * that are not UTF-8 inside its strings are made JSON any reader takes; the
 * whitespace between values, escapes and UTF-8 stay as they are. */
START_TEST(test_buf_json_strict_escapes_what_only_a_lenient_reader_takes)
{
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"{\"a\":\"x\ty\",\"b\":1}", "{\"a\":\"x\\u0009y\",\"b\":1}"},
        {"{\n\t\"a\": [1, \"\x1b[2J\"]\r\n}", "{\n\t\"a\": [1, \"\\u001b[2J\"]\r\n}"},
        {"{\"a\":\"\xff\xc3\xa9\"}", "{\"a\":\"\xef\xbf\xbd\xc3\xa9\"}"},
        {"{\"a\":\"q\\\"\x01\"}", "{\"a\":\"q\\\"\\u0001\"}"},
        {"{\"a\":\"b\\\\\",\"c\":\"\x02\"}", "{\"a\":\"b\\\\\",\"c\":\"\\u0002\"}"},
        {"{\"ok\":\"\\u00e9 \xe2\x82\xac\"}", "{\"ok\":\"\\u00e9 \xe2\x82\xac\"}"},
        {"{\"c1\":\"\xc2\x9b"
         "31m\xc2\xa0\"}",
         "{\"c1\":\"\\u009b31m\xc2\xa0\"}"},
        /* bidirectional formatting characters, which reorder a terminal's line;
         * U+2010 and U+2030 beside them stay */
        {"{\"id\":\"a\xe2\x80\xaexe.txt\xe2\x81\xa9\xd8\x9c\xe2\x80\x90\xe2\x80\xb0\"}",
         "{\"id\":\"a\\u202exe.txt\\u2069\\u061c\xe2\x80\x90\xe2\x80\xb0\"}"},
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        buf b;
        buf_init(&b, 1024);
        ck_assert_int_eq(buf_json_strict(&b, cases[i].in, strlen(cases[i].in)), 0);
        ck_assert_int_eq(buf_addc(&b, '\0'), 0);
        ck_assert_msg(strcmp(b.data, cases[i].out) == 0, "case %zu: %s", i, b.data);
        buf_free(&b);
    }
}
END_TEST

START_TEST(test_utf8_sanitize_replaces_what_is_not_utf8_and_cuts_between_characters)
{
    /* é, then an overlong '/', a surrogate, a code point past U+10FFFF, a lone
     * continuation byte and a truncated sequence */
    char s[] = "\xc3\xa9-\xc0\xaf-\xed\xa0\x80-\xf4\x90\x80\x80-\x80-\xe2\x82";
    size_t n = sizeof s - 1;
    ck_assert_uint_eq(utf8_sanitize(s, n, n), n);
    /* (split so that no "??" followed by '-' reads as a trigraph) */
    ck_assert_str_eq(s, "\xc3\xa9-?"
                        "?-?"
                        "?"
                        "?-?"
                        "?"
                        "?"
                        "?-?-?"
                        "?");
    char t[] = "ab\xe2\x82\xac\xe2\x82\xac"; /* ab€€ */
    ck_assert_uint_eq(utf8_sanitize(t, 8, 8), 8);
    ck_assert_uint_eq(utf8_sanitize(t, 8, 7), 5); /* not in the middle of the second € */
    ck_assert_uint_eq(utf8_sanitize(t, 8, 4), 2);
    ck_assert_uint_eq(utf8_sanitize(t, 8, 0), 0);
}
END_TEST

/* A timed wait on the monotonic clock: it returns after its time, counted
 * from the monotonic clock it reads (one on CLOCK_REALTIME lasted as long as
 * a step of the wall clock back). */
START_TEST(test_cond_wait_ms_waits_its_time_on_the_monotonic_clock)
{
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c;
    cond_init_monotonic(&c);
    pthread_mutex_lock(&mu);
    int64_t start = clock_mono_ms();
    cond_wait_ms(&c, &mu, 1200); /* over a second: the nanoseconds carry */
    int64_t waited = clock_mono_ms() - start;
    pthread_mutex_unlock(&mu);
    ck_assert_msg(waited >= 1199 && waited < 60000, "waited %lld ms", (long long)waited);
    pthread_cond_destroy(&c);
}
END_TEST

START_TEST(test_log_due_lets_one_line_through_per_period)
{
    int64_t last = 0;
    ck_assert_int_eq(log_due(&last), 1);
    ck_assert_int_eq(log_due(&last), 0);
    ck_assert_int_eq(log_due(&last), 0);
    last -= LOG_REPEAT_MS; /* as if the period had passed */
    ck_assert_int_eq(log_due(&last), 1);
    ck_assert_int_eq(log_due(&last), 0);
}
END_TEST

START_TEST(test_buf_int_writes_the_whole_range)
{
    buf b;
    buf_init(&b, 1024);
    ck_assert_int_eq(buf_int(&b, 0), 0);
    ck_assert_int_eq(buf_addc(&b, ' '), 0);
    ck_assert_int_eq(buf_int(&b, -42), 0);
    ck_assert_int_eq(buf_addc(&b, ' '), 0);
    ck_assert_int_eq(buf_int(&b, LLONG_MAX), 0);
    ck_assert_int_eq(buf_addc(&b, ' '), 0);
    ck_assert_int_eq(buf_int(&b, LLONG_MIN), 0);
    ck_assert_str_eq(b.data, "0 -42 9223372036854775807 -9223372036854775808");
    buf_free(&b);
}
END_TEST

START_TEST(test_parse_int64_is_strict)
{
    int64_t v;
    ck_assert_int_eq(parse_int64("42", 0, 100, &v), 0);
    ck_assert_int_eq(v, 42);
    ck_assert_int_eq(parse_int64("42x", 0, 100, &v), -1);
    ck_assert_int_eq(parse_int64("", 0, 100, &v), -1);
    ck_assert_int_eq(parse_int64("101", 0, 100, &v), -1);
    ck_assert_int_eq(parse_int64("-1", 0, 100, &v), -1);
    ck_assert_int_eq(parse_int64("-1", -5, 100, &v), 0);
    ck_assert_int_eq(v, -1);
    /* digits alone: strtoll would take the blanks before them and a '+' */
    static const char *const refused[] = {" 42", "+42", "42 ", "\t42", "-", "- 1", "0x2a", "4 2"};
    for (size_t i = 0; i < ARRAY_LEN(refused); i++)
        ck_assert_msg(parse_int64(refused[i], -100, 100, &v) == -1, "took \"%s\"", refused[i]);
}
END_TEST

START_TEST(test_parse_duration_units)
{
    int64_t v;
    ck_assert_int_eq(parse_duration_s("90s", &v), 0);
    ck_assert_int_eq(v, 90);
    ck_assert_int_eq(parse_duration_s("90", &v), -1); /* no unit */
    ck_assert_int_eq(parse_duration_s("15m", &v), 0);
    ck_assert_int_eq(v, 900);
    ck_assert_int_eq(parse_duration_s("7d", &v), 0);
    ck_assert_int_eq(v, 7 * 86400);
    ck_assert_int_eq(parse_duration_s("3x", &v), -1);
    ck_assert_int_eq(parse_duration_s("h", &v), -1);
}
END_TEST

START_TEST(test_read_stream_reads_whole_files_and_refuses_longer_ones)
{
    FILE *f = tmpfile();
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < 5000; i++)
        ck_assert_int_ge(fputs("0123456789", f), 0);
    rewind(f);
    size_t len = 0;
    char *all = read_stream(f, 50000, &len);
    ck_assert_ptr_nonnull(all);
    ck_assert_uint_eq(len, 50000);
    ck_assert_uint_eq(strlen(all), 50000);
    ck_assert(memcmp(all + 49990, "0123456789", 10) == 0);
    free(all);

    rewind(f);
    errno = 0;
    ck_assert_ptr_null(read_stream(f, 49999, &len));
    ck_assert_int_eq(errno, EFBIG);
    fclose(f);
}
END_TEST

/* read_path says which step failed, with its cause: the messages of its
 * callers name it ("cannot open", "cannot read: Is a directory"). */
START_TEST(test_read_path_tells_a_failed_open_from_a_failed_read)
{
    size_t len = 0;
    int opened = -1;
    char *text = read_path("/proc/self/comm", 4096, &len, &opened);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(opened, 1);
    ck_assert_uint_eq(len, strlen(text));
    free(text);
    ck_assert_ptr_null(read_path("/nonexistent/file", 4096, &len, &opened));
    ck_assert_int_eq(opened, 0);
    ck_assert_int_eq(errno, ENOENT);
    ck_assert_ptr_null(read_path("/", 4096, &len, &opened));
    ck_assert_int_eq(opened, 1);
    ck_assert_int_eq(errno, EISDIR);
}
END_TEST

START_TEST(test_arena_keeps_addresses_stable)
{
    arena a;
    arena_init(&a);
    const char *first = arena_strndup(&a, "hello", 5);
    for (int i = 0; i < 10000; i++)
        ck_assert_ptr_nonnull(arena_alloc(&a, 100));
    ck_assert_ptr_nonnull(arena_alloc(&a, 1 << 20));
    ck_assert_str_eq(first, "hello");
    arena_free(&a);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("util");
    TCase *tc = tcase_create("util");
    tcase_add_test(tc, test_buf_refuses_to_grow_past_its_cap);
    tcase_add_test(tc, test_buf_reserve_takes_the_room_at_once);
    tcase_add_test(tc, test_json_string_escapes_quotes_controls_and_backslashes);
    tcase_add_test(tc, test_buf_json_str_escapes_every_control_byte_and_delete);
    tcase_add_test(tc, test_buf_json_str_writes_what_is_not_utf8_as_the_replacement_character);
    tcase_add_test(tc, test_buf_json_str_escapes_every_byte_at_every_position_of_a_long_string);
    tcase_add_test(tc, test_buf_json_str_matches_a_byte_by_byte_escape_on_random_strings);
    tcase_add_test(tc, test_characters_beyond_the_basic_plane_count_two);
    tcase_add_test(tc, test_buf_json_strict_escapes_what_only_a_lenient_reader_takes);
    tcase_add_test(tc, test_utf8_sanitize_replaces_what_is_not_utf8_and_cuts_between_characters);
    tcase_add_test(tc, test_cond_wait_ms_waits_its_time_on_the_monotonic_clock);
    tcase_add_test(tc, test_log_due_lets_one_line_through_per_period);
    tcase_add_test(tc, test_buf_int_writes_the_whole_range);
    tcase_add_test(tc, test_parse_int64_is_strict);
    tcase_add_test(tc, test_parse_duration_units);
    tcase_add_test(tc, test_arena_keeps_addresses_stable);
    tcase_add_test(tc, test_read_stream_reads_whole_files_and_refuses_longer_ones);
    tcase_add_test(tc, test_read_path_tells_a_failed_open_from_a_failed_read);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
