/* dedup: the in-memory set of ids seen within the window, and the queue's
 * migration of the old on-disk id index to it. */
#include "unit.h"

#include "dedup.h"
#include "queue.h"

#include <sqlite3.h>

static struct dedup_fp fp_of(const char *id)
{
    struct dedup_fp fp;
    ck_assert_int_eq(dedup_fingerprint(id, strlen(id), &fp), 0);
    return fp;
}

START_TEST(test_fingerprints_are_stable_and_differ_between_ids)
{
    struct dedup_fp a = fp_of("a1b2c3d4-0000-4000-8000-000000000001");
    struct dedup_fp b = fp_of("a1b2c3d4-0000-4000-8000-000000000001");
    struct dedup_fp c = fp_of("a1b2c3d4-0000-4000-8000-000000000002");
    ck_assert(a.a == b.a && a.b == b.b);
    ck_assert(a.a != c.a || a.b != c.b);
    ck_assert(a.a != 0 && c.a != 0);
}
END_TEST

START_TEST(test_an_added_id_is_contained_and_others_are_not)
{
    dedup *d = dedup_new(3600 * 1000);
    struct dedup_fp x = fp_of("x"), y = fp_of("y");
    ck_assert_int_eq(dedup_add(d, &x, 1000000), 0);
    ck_assert_int_eq(dedup_contains(d, &x, 1000001), 1);
    ck_assert_int_eq(dedup_contains(d, &y, 1000001), 0);
    ck_assert_uint_eq(dedup_size(d), 1);
    dedup_free(d);
}
END_TEST

START_TEST(test_a_removed_id_is_forgotten_and_can_be_added_again)
{
    dedup *d = dedup_new(60000);
    struct dedup_fp x = fp_of("x");
    ck_assert_int_eq(dedup_add(d, &x, 5000), 0);
    dedup_remove(d, &x, 5000);
    ck_assert_int_eq(dedup_contains(d, &x, 5001), 0);
    ck_assert_int_eq(dedup_add(d, &x, 5002), 0);
    ck_assert_int_eq(dedup_contains(d, &x, 5003), 1);
    ck_assert_uint_eq(dedup_size(d), 1);
    dedup_free(d);
}
END_TEST

START_TEST(test_undoing_a_new_sighting_keeps_an_older_one)
{
    int64_t window = 40000, t0 = 1732800000000;
    dedup *d = dedup_new(window);
    struct dedup_fp x = fp_of("x");
    ck_assert_int_eq(dedup_add(d, &x, t0), 0);
    /* the same id again a segment later, then that commit is rolled back */
    ck_assert_int_eq(dedup_add(d, &x, t0 + window / 2), 0);
    dedup_remove(d, &x, t0 + window / 2);
    ck_assert_int_eq(dedup_contains(d, &x, t0 + window / 2), 1);
    dedup_free(d);
}
END_TEST

START_TEST(test_ids_are_kept_for_the_window_and_forgotten_after)
{
    int64_t window = 40000, t0 = 1732800000000;
    dedup *d = dedup_new(window);
    struct dedup_fp x = fp_of("x");
    ck_assert_int_eq(dedup_add(d, &x, t0), 0);
    ck_assert_int_eq(dedup_contains(d, &x, t0 + window), 1);
    /* up to one segment (window/4) beyond the window, and no longer: its
     * segment began at t0 */
    ck_assert_int_eq(dedup_contains(d, &x, t0 + window + window / 4 - 1), 1);
    ck_assert_int_eq(dedup_contains(d, &x, t0 + window + window / 4), 0);
    dedup_free(d);
}
END_TEST

START_TEST(test_memory_follows_the_ids_in_the_window)
{
    int64_t window = 40000, t0 = 1732800000000; /* segments of 10 s; t0 starts one */
    dedup *d = dedup_new(window);
    ck_assert_uint_eq(dedup_memory(d), 0);
    char id[64];
    for (int i = 0; i < 400000; i++) {
        snprintf(id, sizeof id, "id-%d", i);
        struct dedup_fp fp = fp_of(id);
        ck_assert_int_eq(dedup_add(d, &fp, t0 + i % 1000), 0);
    }
    size_t full = dedup_memory(d);
    ck_assert_uint_ge(full, 400000 * sizeof(struct dedup_fp));
    ck_assert_uint_le(full, 4 * 400000 * sizeof(struct dedup_fp));
    /* one id per segment for two windows: the full table, and the one sized
     * after it for the next segment, are both reused for a handful of ids */
    for (int k = 1; k <= 10; k++) {
        snprintf(id, sizeof id, "late-%d", k);
        struct dedup_fp fp = fp_of(id);
        ck_assert_int_eq(dedup_add(d, &fp, t0 + k * 10000), 0);
    }
    ck_assert_uint_lt(dedup_memory(d), full / 10);
    dedup_free(d);
}
END_TEST

START_TEST(test_a_segment_is_sized_from_the_one_before_and_does_not_grow)
{
    int64_t window = 40000, t0 = 1732800000000; /* segments of 10 s; t0 starts one */
    dedup *d = dedup_new(window);
    char id[64];
    for (int i = 0; i < 100000; i++) {
        snprintf(id, sizeof id, "first-%d", i);
        struct dedup_fp fp = fp_of(id);
        ck_assert_int_eq(dedup_add(d, &fp, t0 + i % 1000), 0);
    }
    size_t one = dedup_memory(d);
    struct dedup_fp fp = fp_of("second-0");
    ck_assert_int_eq(dedup_add(d, &fp, t0 + 10000), 0);
    size_t two = dedup_memory(d);
    ck_assert_uint_ge(two - one, 150000 * sizeof(struct dedup_fp));
    for (int i = 1; i < 100000; i++) {
        snprintf(id, sizeof id, "second-%d", i);
        fp = fp_of(id);
        ck_assert_int_eq(dedup_add(d, &fp, t0 + 10000 + i % 1000), 0);
    }
    ck_assert_uint_eq(dedup_memory(d), two); /* the same rate: no growth */
    ck_assert_uint_eq(dedup_size(d), 200000);
    for (int i = 0; i < 100000; i += 101) {
        snprintf(id, sizeof id, "first-%d", i);
        fp = fp_of(id);
        ck_assert_int_eq(dedup_contains(d, &fp, t0 + 20000), 1);
        snprintf(id, sizeof id, "second-%d", i);
        fp = fp_of(id);
        ck_assert_int_eq(dedup_contains(d, &fp, t0 + 20000), 1);
    }
    dedup_free(d);
}
END_TEST

START_TEST(test_a_million_ids_are_all_found)
{
    dedup *d = dedup_new(3600 * 1000);
    char id[64];
    for (int i = 0; i < 1000000; i++) {
        snprintf(id, sizeof id, "id-%d", i);
        struct dedup_fp fp = fp_of(id);
        ck_assert_int_eq(dedup_add(d, &fp, 1000 + i / 1000), 0);
    }
    ck_assert_uint_eq(dedup_size(d), 1000000);
    for (int i = 0; i < 1000000; i += 997) {
        snprintf(id, sizeof id, "id-%d", i);
        struct dedup_fp fp = fp_of(id);
        ck_assert_int_eq(dedup_contains(d, &fp, 2000), 1);
    }
    struct dedup_fp other = fp_of("not-there");
    ck_assert_int_eq(dedup_contains(d, &other, 2000), 0);
    dedup_free(d);
}
END_TEST

START_TEST(test_an_old_queue_is_migrated_and_keeps_its_ids_and_records)
{
    char dir[256], path[320], err[ERR_LEN];
    unit_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/queue.db", dir);
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    char sql[2048];
    snprintf(sql, sizeof sql,
             "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
             "INSERT INTO meta VALUES('schema_version', '1');"
             "CREATE TABLE seen(id INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,"
             " at_ms INTEGER NOT NULL);"
             "INSERT INTO seen(event_id, at_ms) VALUES('old-event', %lld);"
             "CREATE TABLE records(id INTEGER PRIMARY KEY AUTOINCREMENT, feed INTEGER NOT NULL,"
             " received_ms INTEGER NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,"
             " rules_version TEXT NOT NULL, user TEXT NOT NULL, batch TEXT NOT NULL,"
             " event TEXT NOT NULL, raw TEXT NOT NULL);"
             "INSERT INTO records VALUES(7, 0, 1, 'ios-1', 't', 'v', 'u', '', '{}', '{}');"
             "INSERT INTO records VALUES(9, 2, 1, 'web-1', 't', 'v', 'u', '', '{}', '{}');",
             (long long)clock_wall_ms());
    ck_assert_int_eq(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);

    queue *q;
    struct queue_options o = {
        .dir = dir, .sync_full = 1, .max_depth = 100, .dedup_window_ms = 3600000};
    ck_assert_msg(queue_open(&q, &o, err, sizeof err) == 0, "%s", err);
    struct mapping m;
    mapping_init(&m);
    int failed = 0;
    struct record *r = mapping_add_record(&m);
    r->feed = FEED_IOS;
    r->event_id = mapping_copy(&m, "old-event", 9, &failed);
    r->rules_version = "v";
    struct commit_result res;
    ck_assert_int_eq(queue_commit(q, &m, &res), QUEUE_OK);
    ck_assert_uint_eq(res.duplicates, 1);
    ck_assert_uint_eq(res.queued, 0);
    mapping_free(&m);
    /* the records moved to their feed's table, with their ids */
    queue_reader *rd = queue_reader_new(q, err, sizeof err);
    ck_assert_ptr_nonnull(rd);
    struct queue_items ios, web;
    queue_items_init(&ios);
    queue_items_init(&web);
    ck_assert_int_eq(queue_scan(rd, FEED_IOS, 0, 10, 1 << 20, &ios), 0);
    ck_assert_int_eq(queue_scan(rd, FEED_WEB, 0, 10, 1 << 20, &web), 0);
    ck_assert_uint_eq(ios.n, 1);
    ck_assert_int_eq(ios.items[0].id, 7);
    ck_assert(str_eq(ios.items[0].event_id, "ios-1"));
    ck_assert_uint_eq(web.n, 1);
    ck_assert_int_eq(web.items[0].id, 9);
    queue_items_free(&ios);
    queue_items_free(&web);
    queue_reader_free(rd);
    struct queue_gauges g;
    queue_gauges(q, &g);
    ck_assert_int_eq(g.depth[FEED_IOS], 1);
    ck_assert_int_eq(g.depth[FEED_WEB], 1);
    queue_free(q);
    unit_rmdir(dir);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("dedup");
    TCase *tc = tcase_create("dedup");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_fingerprints_are_stable_and_differ_between_ids);
    tcase_add_test(tc, test_an_added_id_is_contained_and_others_are_not);
    tcase_add_test(tc, test_a_removed_id_is_forgotten_and_can_be_added_again);
    tcase_add_test(tc, test_ids_are_kept_for_the_window_and_forgotten_after);
    tcase_add_test(tc, test_undoing_a_new_sighting_keeps_an_older_one);
    tcase_add_test(tc, test_a_million_ids_are_all_found);
    tcase_add_test(tc, test_memory_follows_the_ids_in_the_window);
    tcase_add_test(tc, test_a_segment_is_sized_from_the_one_before_and_does_not_grow);
    tcase_add_test(tc, test_an_old_queue_is_migrated_and_keeps_its_ids_and_records);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
