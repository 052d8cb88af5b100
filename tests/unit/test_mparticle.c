/* mparticle: batch bodies, source_request_id, answers, Retry-After, Basic auth. */
#include "unit.h"

#include "mparticle.h"

/* A str over a string literal. */
#define S(lit) ((str){(lit), sizeof(lit) - 1})

/* A part with only an event id (for source_request_id). */
#define ID(lit) ((struct batch_part){STR_NULL, STR_NULL, S(lit)})

static const char SRID[] = "0d3c7f4e-5b1a-5c2d-9e8f-7a6b5c4d3e2f";

/* ---- Basic auth ---------------------------------------------------------- */

START_TEST(test_basic_auth_matches_documented_test_vector)
{
    char out[128];
    ck_assert_int_eq(mparticle_basic_auth("example-api-key", "example-api-secret", out, sizeof out),
                     0);
    ck_assert_str_eq(out, "Basic ZXhhbXBsZS1hcGkta2V5OmV4YW1wbGUtYXBpLXNlY3JldA==");
}
END_TEST

START_TEST(test_basic_auth_into_too_small_buffer_fails_and_writes_empty_string)
{
    char out[16];
    memset(out, 'x', sizeof out);
    ck_assert_int_eq(mparticle_basic_auth("example-api-key", "example-api-secret", out, sizeof out),
                     -1);
    ck_assert_str_eq(out, "");
}
END_TEST

START_TEST(test_basic_auth_of_the_longest_credentials_fits_its_bound)
{
    char key[MPARTICLE_MAX_CREDENTIAL_CHARS + 1], secret[MPARTICLE_MAX_CREDENTIAL_CHARS + 1];
    memset(key, 'k', sizeof key - 1);
    memset(secret, 's', sizeof secret - 1);
    key[sizeof key - 1] = secret[sizeof secret - 1] = '\0';
    char out[MPARTICLE_AUTH_MAX];
    ck_assert_int_eq(mparticle_basic_auth(key, secret, out, sizeof out), 0);
    ck_assert_uint_eq(strlen(out), 6 + 4 * ((2 * MPARTICLE_MAX_CREDENTIAL_CHARS + 1 + 2) / 3));
}
END_TEST

/* ---- credentials in answers --------------------------------------------- */

/* Two feeds' credentials: the base64 of the first pair holds '+' and '=', the
 * second pair a '/' (JSON may write it "\/") and a "%41" that is no escape. */
static const struct mparticle_credentials MASK_CREDS[] = {
    {"key-ab?", "sec>>?zz"}, /* base64 a2V5LWFiPzpzZWM+Pj96eg== */
    {"mask-key/+=", "s3cr>t&x%41"},
};

static const struct {
    const char *answer, *shown;
} MASK_CASES[] = {
    {"auth: Basic a2V5LWFiPzpzZWM+Pj96eg== end", "auth: Basic ************************ end"},
    /* URL-encoded, as a query string or a form */
    {"Basic%20a2V5LWFiPzpzZWM%2BPj96eg%3D%3D end", "Basic%20****************************** end"},
    {"basic+a2V5LWFiPzpzZWM%2bPj96eg%3d%3d end", "basic+****************************** end"},
    {"token a2V5LWFiPzpzZWM%2BPj96eg%3D%3D end", "token ****************************** end"},
    {"mixed a2V5LWFiPzpzZWM+Pj96eg%3D= end", "mixed ************************** end"},
    {"k=key-ab%3F end", "k=********* end"},
    /* JSON escapes of ASCII (an encoder that escapes <, >, & and /) */
    {"{\"s\":\"sec\\u003e\\u003E?zz\"}", "{\"s\":\"******************\"}"},
    {"{\"k\":\"mask-key\\/+=\"}", "{\"k\":\"************\"}"},
    /* as sent, though it reads as an escape */
    {"x s3cr>t&x%41 y", "x *********** y"},
    /* nothing to mask */
    {"Basically fine %2F \\/ \\u0041 basic", "Basically fine %2F \\/ \\u0041 basic"},
};

START_TEST(test_credentials_in_an_answer_are_masked_in_every_spelling)
{
    char text[256];
    str_copy(text, sizeof text, MASK_CASES[_i].answer);
    mparticle_mask_credentials(text, strlen(text), MASK_CREDS, ARRAY_LEN(MASK_CREDS));
    ck_assert_str_eq(text, MASK_CASES[_i].shown);
}
END_TEST

/* ---- source_request_id --------------------------------------------------- */

START_TEST(test_source_request_id_is_deterministic_for_same_event_ids)
{
    struct batch_part a[] = {ID("evt-1"), ID("evt-2")};
    struct batch_part b[] = {ID("evt-1"), ID("evt-2")};
    char ida[UUID_STR_LEN], idb[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(a, 2, ida), 0);
    ck_assert_int_eq(mparticle_source_request_id(b, 2, idb), 0);
    ck_assert_str_eq(ida, idb);
}
END_TEST

START_TEST(test_source_request_id_differs_when_an_event_id_differs)
{
    struct batch_part a[] = {ID("evt-1"), ID("evt-2")};
    struct batch_part b[] = {ID("evt-1"), ID("evt-3")};
    char ida[UUID_STR_LEN], idb[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(a, 2, ida), 0);
    ck_assert_int_eq(mparticle_source_request_id(b, 2, idb), 0);
    ck_assert_str_ne(ida, idb);
}
END_TEST

START_TEST(test_source_request_id_differs_when_event_order_differs)
{
    struct batch_part a[] = {ID("evt-1"), ID("evt-2")};
    struct batch_part b[] = {ID("evt-2"), ID("evt-1")};
    char ida[UUID_STR_LEN], idb[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(a, 2, ida), 0);
    ck_assert_int_eq(mparticle_source_request_id(b, 2, idb), 0);
    ck_assert_str_ne(ida, idb);
}
END_TEST

START_TEST(test_source_request_id_differs_when_ids_are_regrouped)
{
    /* "ab" alone is not the same batch as "a" then "b". */
    struct batch_part a[] = {ID("ab")};
    struct batch_part b[] = {ID("a"), ID("b")};
    char ida[UUID_STR_LEN], idb[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(a, 1, ida), 0);
    ck_assert_int_eq(mparticle_source_request_id(b, 2, idb), 0);
    ck_assert_str_ne(ida, idb);
}
END_TEST

/* Ids were joined with newlines as they were: an id with a newline in it
 * made two other batches' id. An id without one hashes as before. */
START_TEST(test_source_request_id_differs_when_a_newline_in_an_id_regroups_them)
{
    static const struct {
        const char *one, *a, *b;
    } cases[] = {
        {"ev-1\nev-2", "ev-1", "ev-2"}, {"ev-1\\nev-2", "ev-1", "ev-2"}, {"ev-1\\", "ev-1\\", ""}};
    for (size_t c = 0; c < ARRAY_LEN(cases); c++) {
        struct batch_part one[] = {{STR_NULL, STR_NULL, str_opt(cases[c].one)}};
        struct batch_part two[] = {{STR_NULL, STR_NULL, str_opt(cases[c].a)},
                                   {STR_NULL, STR_NULL, str_opt(cases[c].b)}};
        char ida[UUID_STR_LEN], idb[UUID_STR_LEN];
        ck_assert_int_eq(mparticle_source_request_id(one, 1, ida), 0);
        ck_assert_int_eq(mparticle_source_request_id(two, 2, idb), 0);
        ck_assert_msg(strcmp(ida, idb) != 0, "case %zu", c);
    }
    /* "ev-1\\n" + "ev-2" against "ev-1\\" + "nev-2" */
    struct batch_part x[] = {ID("ev-1\\n"), ID("ev-2")};
    struct batch_part y[] = {ID("ev-1\\"), ID("nev-2")};
    char idx[UUID_STR_LEN], idy[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(x, 2, idx), 0);
    ck_assert_int_eq(mparticle_source_request_id(y, 2, idy), 0);
    ck_assert_str_ne(idx, idy);
    /* Braze's ids keep the ids batches were sent under */
    struct batch_part braze[] = {ID("a1b2c3d4-0000-4000-8000-000000000001")};
    char idz[UUID_STR_LEN], bare[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(braze, 1, idz), 0);
    uuid5 *u = uuid5_new();
    ck_assert_ptr_nonnull(u);
    uuid5_add(u, "a1b2c3d4-0000-4000-8000-000000000001\n", 37);
    ck_assert_int_eq(uuid5_finish(u, bare), 0);
    ck_assert_str_eq(idz, bare);
}
END_TEST

START_TEST(test_source_request_id_has_uuid_v5_shape)
{
    struct batch_part parts[] = {ID("a1b2c3d4-0000-4000-8000-000000000001")};
    char id[UUID_STR_LEN];
    ck_assert_int_eq(mparticle_source_request_id(parts, 1, id), 0);
    ck_assert_uint_eq(strlen(id), 36);
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23)
            ck_assert_msg(id[i] == '-', "%s: no '-' at %d", id, i);
        else
            ck_assert_msg(strchr("0123456789abcdef", id[i]) != NULL, "%s: not hex at %d", id, i);
    }
    ck_assert_msg(id[14] == '5', "%s: version is not 5", id);
    ck_assert_msg(strchr("89ab", id[19]) != NULL, "%s: variant is not RFC 4122", id);
}
END_TEST

/* ---- building a batch ---------------------------------------------------- */

START_TEST(test_build_batch_of_one_part_renders_envelope_sections_and_event)
{
    struct batch_part parts[] = {{
        S("\"user_identities\"\t\"customer_id\"\t\"customer-1234\"\n"
          "\"device_info\"\t\"platform\"\t\"iOS\"\n"),
        S("{\"event_type\":\"custom_event\",\"data\":{\"event_name\":\"Push Notification "
          "Sends\"}}"),
        S("evt-1"),
    }};
    buf b;
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(mparticle_build_batch(&b, "production", SRID, parts, 1), 0);
    ck_assert_str_eq(b.data, "{\"environment\":\"production\",\"schema_version\":2,"
                             "\"source_request_id\":\"0d3c7f4e-5b1a-5c2d-9e8f-7a6b5c4d3e2f\","
                             "\"user_identities\":{\"customer_id\":\"customer-1234\"},"
                             "\"device_info\":{\"platform\":\"iOS\"},"
                             "\"events\":[{\"event_type\":\"custom_event\","
                             "\"data\":{\"event_name\":\"Push Notification Sends\"}}]}");
    buf_free(&b);
}
END_TEST

START_TEST(test_build_batch_merges_sections_of_two_parts_later_value_wins)
{
    struct batch_part parts[] = {
        {
            S("\"user_attributes\"\t\"a\"\t1\n"
              "\"user_attributes\"\t\"b\"\t2\n"),
            S("{\"n\":1}"),
            S("evt-1"),
        },
        {
            S("\"user_attributes\"\t\"b\"\t3\n"
              "\"user_attributes\"\t\"c\"\t4\n"),
            S("{\"n\":2}"),
            S("evt-2"),
        },
    };
    buf b;
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(mparticle_build_batch(&b, "production", SRID, parts, 2), 0);
    ck_assert_str_eq(b.data, "{\"environment\":\"production\",\"schema_version\":2,"
                             "\"source_request_id\":\"0d3c7f4e-5b1a-5c2d-9e8f-7a6b5c4d3e2f\","
                             "\"user_attributes\":{\"a\":1,\"b\":3,\"c\":4},"
                             "\"events\":[{\"n\":1},{\"n\":2}]}");
    buf_free(&b);
}
END_TEST

/* Batch-level lines naming user attributes first .. first + n - 1, and others. */
static str attr_lines(buf *b, int first, int n)
{
    buf_init(b, 1 << 20);
    (void)!buf_adds(b, "\"user_identities\"\t\"customer_id\"\t\"c\"\n");
    for (int i = first; i < first + n; i++)
        (void)!buf_printf(b, "\"user_attributes\"\t\"a%d\"\t%d\n", i, i);
    (void)!buf_adds(b, "\"environment\"\t\t\"production\"\n");
    return (str){b->data, b->len};
}

START_TEST(test_user_attribute_names_of_records_add_up_to_100_and_no_further)
{
    buf x, y, z;
    struct mparticle_attr_names set = {.n = 0};
    ck_assert_int_eq(mparticle_attr_names_add(&set, attr_lines(&x, 1, 60)), 0);
    ck_assert_uint_eq(set.n, 60);
    /* a1..a60 again and a61..a100: only the 40 new names count */
    ck_assert_int_eq(mparticle_attr_names_add(&set, attr_lines(&y, 1, 100)), 0);
    ck_assert_uint_eq(set.n, 100);
    /* one more name is one too many; the set stays as it was */
    ck_assert_int_eq(mparticle_attr_names_add(&set, attr_lines(&z, 50, 52)), -1);
    ck_assert_uint_eq(set.n, 100);
    buf_free(&x);
    buf_free(&y);
    buf_free(&z);
}
END_TEST

START_TEST(test_a_record_of_more_than_100_user_attributes_does_not_fit_even_alone)
{
    buf x;
    struct mparticle_attr_names set = {.n = 0};
    ck_assert_int_eq(mparticle_attr_names_add(&set, attr_lines(&x, 1, 101)), -1);
    ck_assert_uint_eq(set.n, 0);
    buf_free(&x);
}
END_TEST

START_TEST(test_build_batch_part_setting_environment_overrides_default)
{
    struct batch_part parts[] = {{
        S("\"environment\"\t\t\"development\"\n"),
        S("{\"n\":1}"),
        S("evt-1"),
    }};
    buf b;
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(mparticle_build_batch(&b, "production", SRID, parts, 1), 0);
    ck_assert_str_eq(b.data, "{\"schema_version\":2,"
                             "\"source_request_id\":\"0d3c7f4e-5b1a-5c2d-9e8f-7a6b5c4d3e2f\","
                             "\"environment\":\"development\","
                             "\"events\":[{\"n\":1}]}");
    buf_free(&b);
}
END_TEST

START_TEST(test_build_batch_top_level_scalar_renders_as_plain_value)
{
    struct batch_part parts[] = {{
        S("\"mpid\"\t\t8675309\n"),
        S("{\"n\":1}"),
        S("evt-1"),
    }};
    buf b;
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(mparticle_build_batch(&b, "production", SRID, parts, 1), 0);
    ck_assert_str_eq(b.data, "{\"environment\":\"production\",\"schema_version\":2,"
                             "\"source_request_id\":\"0d3c7f4e-5b1a-5c2d-9e8f-7a6b5c4d3e2f\","
                             "\"mpid\":8675309,"
                             "\"events\":[{\"n\":1}]}");
    buf_free(&b);
}
END_TEST

START_TEST(test_build_batch_fails_when_output_cap_is_reached)
{
    struct batch_part parts[] = {{
        S("\"user_identities\"\t\"customer_id\"\t\"customer-1234\"\n"),
        S("{\"event_type\":\"custom_event\"}"),
        S("evt-1"),
    }};
    buf b;
    buf_init(&b, 64);
    ck_assert_int_eq(mparticle_build_batch(&b, "production", SRID, parts, 1), -1);
    buf_free(&b);
}
END_TEST

START_TEST(test_batch_size_bound_covers_the_built_batch)
{
    struct batch_part parts[] = {
        {
            S("\"user_identities\"\t\"customer_id\"\t\"customer-1234\"\n"
              "\"user_attributes\"\t\"$mobile\"\t\"+4915112345678\"\n"
              "\"device_info\"\t\"platform\"\t\"iOS\"\n"),
            S("{\"event_type\":\"custom_event\",\"data\":{\"event_name\":\"a\"}}"),
            S("evt-1"),
        },
        {
            S("\"environment\"\t\t\"development\"\n"),
            S("{\"event_type\":\"custom_event\",\"data\":{\"event_name\":\"b\"}}"),
            S("evt-2"),
        },
    };
    buf b;
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(mparticle_build_batch(&b, "production", SRID, parts, 2), 0);
    ck_assert_uint_le(b.len, mparticle_batch_size_bound(parts, 2));
    buf_free(&b);
}
END_TEST

/* ---- what an answer means ------------------------------------------------ */

START_TEST(test_202_is_delivered)
{
    ck_assert_int_eq(mparticle_classify(202), MP_DELIVERED);
    ck_assert_str_eq(mparticle_action_name(MP_DELIVERED), "delivered");
}
END_TEST

START_TEST(test_400_is_rejected)
{
    ck_assert_int_eq(mparticle_classify(400), MP_REJECTED);
    ck_assert_str_eq(mparticle_action_name(MP_REJECTED), "rejected");
}
END_TEST

START_TEST(test_401_and_403_are_auth_problems)
{
    ck_assert_int_eq(mparticle_classify(401), MP_AUTH);
    ck_assert_int_eq(mparticle_classify(403), MP_AUTH);
    ck_assert_str_eq(mparticle_action_name(MP_AUTH), "auth");
}
END_TEST

START_TEST(test_413_splits)
{
    ck_assert_int_eq(mparticle_classify(413), MP_SPLIT);
    ck_assert_str_eq(mparticle_action_name(MP_SPLIT), "split");
}
END_TEST

START_TEST(test_429_is_rate_limited)
{
    ck_assert_int_eq(mparticle_classify(429), MP_RATE_LIMITED);
    ck_assert_str_eq(mparticle_action_name(MP_RATE_LIMITED), "rate_limited");
}
END_TEST

START_TEST(test_5xx_408_and_transport_failure_retry)
{
    ck_assert_int_eq(mparticle_classify(500), MP_RETRY);
    ck_assert_int_eq(mparticle_classify(503), MP_RETRY);
    ck_assert_int_eq(mparticle_classify(599), MP_RETRY);
    ck_assert_int_eq(mparticle_classify(408), MP_RETRY);
    ck_assert_int_eq(mparticle_classify(0), MP_RETRY);
    ck_assert_str_eq(mparticle_action_name(MP_RETRY), "retry");
}
END_TEST

/* Only 202 means mParticle has the batches: a proxy or a wrong URL answering
 * 200 must not make the sender delete them. */
START_TEST(test_2xx_other_than_202_is_unexpected_not_delivered)
{
    ck_assert_int_eq(mparticle_classify(200), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(201), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(204), MP_UNEXPECTED);
    ck_assert_str_eq(mparticle_action_name(MP_UNEXPECTED), "unexpected");
}
END_TEST

/* Only 400 says a batch is malformed: a 404 from a wrong URL, a 405, 407 or 410
 * must not dead-letter the backlog. */
START_TEST(test_4xx_other_than_400_401_403_408_413_429_is_unexpected_not_rejected)
{
    ck_assert_int_eq(mparticle_classify(404), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(405), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(407), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(410), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(422), MP_UNEXPECTED);
}
END_TEST

START_TEST(test_1xx_3xx_and_out_of_range_statuses_are_unexpected)
{
    ck_assert_int_eq(mparticle_classify(100), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(301), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(302), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(600), MP_UNEXPECTED);
    ck_assert_int_eq(mparticle_classify(-1), MP_UNEXPECTED);
}
END_TEST

/* ---- Retry-After --------------------------------------------------------- */

START_TEST(test_retry_after_delta_seconds)
{
    ck_assert_int_eq(mparticle_retry_after("120", 0, 0, 3600), 120);
}
END_TEST

START_TEST(test_retry_after_below_min_is_raised_to_min)
{
    ck_assert_int_eq(mparticle_retry_after("5", 0, 10, 3600), 10);
}
END_TEST

START_TEST(test_retry_after_above_max_is_lowered_to_max)
{
    ck_assert_int_eq(mparticle_retry_after("99999", 0, 1, 3600), 3600);
}
END_TEST

START_TEST(test_retry_after_imf_fixdate_is_relative_to_now)
{
    /* Sun, 06 Nov 1994 08:49:37 GMT is 784111777; now is 90 s earlier. */
    ck_assert_int_eq(
        mparticle_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111777 - 90, 0, 3600), 90);
}
END_TEST

/* data.timestamp_unixtime_ms, and no other key of that name */
START_TEST(test_event_time_is_read_from_data_only)
{
    const char *ev[] = {
        "{\"event_type\":\"custom_event\",\"data\":{\"timestamp_unixtime_ms\":1732800000000}}",
        "{\"data\":{\"custom_attributes\":{\"timestamp_unixtime_ms\":5,\"s\":\"}{\\\"\"},"
        "\"timestamp_unixtime_ms\":1732800000001,\"event_name\":\"x\"},\"event_type\":\"x\"}",
        "{\"event_type\":\"uninstall\",\"data\":{\"custom_attributes\":{\"timestamp_unixtime_ms\":"
        "5}}}",
        "{\"timestamp_unixtime_ms\":7,\"data\":{}}",
        "{\"data\":{\"timestamp_unixtime_ms\":\"1732800000000\"}}",
        "{\"data\":{\"timestamp_unixtime_ms\":1.7328e12}}",
        /* an even run of backslashes ends the string before the key */
        "{\"data\":{\"k\":\"a\\\\\",\"timestamp_unixtime_ms\":1732800000002}}",
        "{\"data\":{\"timestamp_unixtime_ms\":17",
        "{\"data\":{\"timestamp_unixtime_ms\":1.732800000000000000000000000000000000e12}}",
    };
    const int64_t want[] = {1732800000000, 1732800000001, -1, -1, -1,
                            1732800000000, 1732800000002, -1, -1};
    for (size_t i = 0; i < ARRAY_LEN(ev); i++)
        ck_assert_msg(mparticle_event_time_ms(ev[i], strlen(ev[i])) == want[i], "%s", ev[i]);
}
END_TEST

START_TEST(test_a_custom_events_name_is_read_from_data_as_written_with_the_time)
{
#define CUSTOM "{\"event_type\":\"custom_event\","
    const char *ev[] = {
        CUSTOM "\"data\":{\"event_name\":\"Email Opens\",\"timestamp_unixtime_ms\":1732800000000}}",
        /* the type after data; a name inside the attributes is not the event's */
        "{\"data\":{\"timestamp_unixtime_ms\":5,\"custom_attributes\":{\"event_name\":\"no\"},"
        "\"event_name\" : \"Say \\\"hi\\\" \\\\\"},\"event_type\":\"custom_event\"}",
        /* only a custom event's name is one */
        "{\"event_type\":\"screen_view\",\"data\":{\"event_name\":\"Home\","
        "\"timestamp_unixtime_ms\":7}}",
        "{\"data\":{\"event_name\":\"no type\"}}",
        CUSTOM "\"event_name\":\"top\",\"data\":{\"custom_attributes\":{\"event_name\":\"no\"}}}",
        CUSTOM "\"data\":{\"event_name\":7}}",
        CUSTOM "\"data\":{\"event_name\":\"\"}}",
        CUSTOM "\"data\":{\"event_name\":\"cut",
        /* brackets in strings and nested containers are gone over whole */
        CUSTOM "\"x\":[{\"data\":{\"event_name\":\"no\"}}],\"data\":{\"custom_attributes\":"
               "{\"a\":\"}]{[\\\"\",\"b\":[[1],{\"event_name\":\"no\"}]},\"event_name\":\"yes\","
               "\"timestamp_unixtime_ms\":6}}",
        CUSTOM "\"data\":{\"custom_attributes\":{\"a\":[1,2",
        /* past the event's end, nothing counts */
        CUSTOM "\"data\":{}}}\"event_name\":\"no\",\"timestamp_unixtime_ms\":8",
        "{}}\"event_type\":\"custom_event\",\"data\":{\"event_name\":\"no\"}",
        /* data that is not an object */
        CUSTOM "\"data\":[{\"event_name\":\"no\",\"timestamp_unixtime_ms\":9}]}",
    };
#undef CUSTOM
    const char *want_name[] = {"Email Opens",
                               "Say \\\"hi\\\" \\\\",
                               NULL,
                               NULL,
                               NULL,
                               NULL,
                               "",
                               NULL,
                               "yes",
                               NULL,
                               NULL,
                               NULL,
                               NULL};
    const int64_t want_time[] = {1732800000000, 5, 7, -1, -1, -1, -1, -1, 6, -1, -1, -1, -1};
    _Static_assert(ARRAY_LEN(want_name) == ARRAY_LEN(ev), "a name for each event");
    _Static_assert(ARRAY_LEN(want_time) == ARRAY_LEN(ev), "a time for each event");
    for (size_t i = 0; i < ARRAY_LEN(ev); i++) {
        struct mparticle_event_fields f;
        mparticle_event_fields(ev[i], strlen(ev[i]), &f);
        ck_assert_msg(f.time_ms == want_time[i], "%s", ev[i]);
        /* the time alone is read the same */
        ck_assert_msg(mparticle_event_time_ms(ev[i], strlen(ev[i])) == want_time[i], "%s", ev[i]);
        if (!want_name[i]) {
            ck_assert_msg(f.name.p == NULL, "%s", ev[i]);
            continue;
        }
        ck_assert_msg(f.name.p != NULL, "%s", ev[i]);
        ck_assert_msg(f.name.n == strlen(want_name[i]) &&
                          memcmp(f.name.p, want_name[i], f.name.n) == 0,
                      "%s: %.*s", ev[i], (int)f.name.n, f.name.p);
    }
}
END_TEST

START_TEST(test_retry_after_date_in_the_past_is_raised_to_min)
{
    ck_assert_int_eq(
        mparticle_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111777 + 600, 1, 3600), 1);
}
END_TEST

START_TEST(test_retry_after_garbage_is_invalid)
{
    ck_assert_int_eq(mparticle_retry_after("soon", 0, 0, 3600), -1);
    ck_assert_int_eq(mparticle_retry_after("12abc", 0, 0, 3600), -1);
    ck_assert_int_eq(mparticle_retry_after("", 0, 0, 3600), -1);
}
END_TEST

START_TEST(test_retry_after_absent_is_invalid)
{
    ck_assert_int_eq(mparticle_retry_after(NULL, 0, 0, 3600), -1);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("mparticle");
    TCase *tc = tcase_create("mparticle");
    tcase_add_test(tc, test_basic_auth_matches_documented_test_vector);
    tcase_add_test(tc, test_basic_auth_into_too_small_buffer_fails_and_writes_empty_string);
    tcase_add_test(tc, test_basic_auth_of_the_longest_credentials_fits_its_bound);
    tcase_add_loop_test(tc, test_credentials_in_an_answer_are_masked_in_every_spelling, 0,
                        (int)ARRAY_LEN(MASK_CASES));

    tcase_add_test(tc, test_source_request_id_is_deterministic_for_same_event_ids);
    tcase_add_test(tc, test_source_request_id_differs_when_an_event_id_differs);
    tcase_add_test(tc, test_source_request_id_differs_when_event_order_differs);
    tcase_add_test(tc, test_source_request_id_differs_when_ids_are_regrouped);
    tcase_add_test(tc, test_source_request_id_differs_when_a_newline_in_an_id_regroups_them);
    tcase_add_test(tc, test_source_request_id_has_uuid_v5_shape);

    tcase_add_test(tc, test_build_batch_of_one_part_renders_envelope_sections_and_event);
    tcase_add_test(tc, test_build_batch_merges_sections_of_two_parts_later_value_wins);
    tcase_add_test(tc, test_build_batch_part_setting_environment_overrides_default);
    tcase_add_test(tc, test_user_attribute_names_of_records_add_up_to_100_and_no_further);
    tcase_add_test(tc, test_a_record_of_more_than_100_user_attributes_does_not_fit_even_alone);
    tcase_add_test(tc, test_build_batch_top_level_scalar_renders_as_plain_value);
    tcase_add_test(tc, test_build_batch_fails_when_output_cap_is_reached);
    tcase_add_test(tc, test_batch_size_bound_covers_the_built_batch);

    tcase_add_test(tc, test_202_is_delivered);
    tcase_add_test(tc, test_400_is_rejected);
    tcase_add_test(tc, test_401_and_403_are_auth_problems);
    tcase_add_test(tc, test_413_splits);
    tcase_add_test(tc, test_429_is_rate_limited);
    tcase_add_test(tc, test_5xx_408_and_transport_failure_retry);
    tcase_add_test(tc, test_2xx_other_than_202_is_unexpected_not_delivered);
    tcase_add_test(tc, test_4xx_other_than_400_401_403_408_413_429_is_unexpected_not_rejected);
    tcase_add_test(tc, test_1xx_3xx_and_out_of_range_statuses_are_unexpected);

    tcase_add_test(tc, test_retry_after_delta_seconds);
    tcase_add_test(tc, test_retry_after_below_min_is_raised_to_min);
    tcase_add_test(tc, test_retry_after_above_max_is_lowered_to_max);
    tcase_add_test(tc, test_retry_after_imf_fixdate_is_relative_to_now);
    tcase_add_test(tc, test_retry_after_date_in_the_past_is_raised_to_min);
    tcase_add_test(tc, test_retry_after_garbage_is_invalid);
    tcase_add_test(tc, test_retry_after_absent_is_invalid);
    tcase_add_test(tc, test_event_time_is_read_from_data_only);
    tcase_add_test(tc, test_a_custom_events_name_is_read_from_data_as_written_with_the_time);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
