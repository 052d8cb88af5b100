/*
 * read_errors.so: transient read errors for the sender's restore at start,
 * LD_PRELOADed into `tributary serve` by tests/integration/test_crash.py.
 *
 *   FAIL_FETCH=n        the first n reads of the sender thread that fetch a
 *                       batch's records ("... WHERE id = ?1") fail
 *   FAIL_CLAIMS_AT=n    the n-th row of the sender's read of the persisted
 *                       claims fails, once
 *   SLOW_ACK_MS=n       the writer takes n ms over each step on the claims'
 *                       bitmaps of finished batches (a busy disk)
 *   SLOW_CLAIM_MS=n     the writer takes n ms over each claim of batches it
 *                       stores (the sender waits for that commit)
 *   FAIL_DEDUP_AT=n     the n-th row of the read of the dedup ids at start
 *                       fails, once
 *   FAIL_DELETE=n       the first n deletions of a record by id in the writer
 *                       (a move, an expiry, a dead-lettered batch) fail
 *   FAIL_NAMES_LOAD=n   the first n reads of the stored event names by the
 *                       sender fail
 *   FAIL_NAMES_STORE=n  the first n inserts of an event name by the writer fail
 *   FAIL_CLAIMS_STORE=n the first n inserts of a claim by the writer fail
 *   FAIL_RECORD_AT=n    the n-th insert of a record by the writer fails, once
 *   FAIL_UNDO=1         and the writer's next "ROLLBACK TO op", which undoes
 *                       that request's records, fails too (SQLITE_NOMEM, as a
 *                       failed allocation to parse it does)
 *
 * A failed step answers SQLITE_IOERR, as a disk or memory hiccup would.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_int fetches, claim_rows, dedup_rows, deletes, names_loads, names_stores, claim_stores,
    record_inserts, undo_armed;

static int env_int(const char *name)
{
    const char *v = getenv(name);
    return v ? atoi(v) : 0;
}

int sqlite3_step(sqlite3_stmt *st)
{
    static int (*real)(sqlite3_stmt *);
    if (!real)
        real = (int (*)(sqlite3_stmt *))dlsym(RTLD_NEXT, "sqlite3_step");
    char thread[16] = "";
    pthread_getname_np(pthread_self(), thread, sizeof thread);
    const char *sql = sqlite3_sql(st);
    if (sql && strcmp(thread, "queue-writer") == 0 && strstr(sql, "claim_done") &&
        env_int("SLOW_ACK_MS") > 0)
        usleep((useconds_t)env_int("SLOW_ACK_MS") * 1000);
    if (sql && strcmp(thread, "queue-writer") == 0 && strstr(sql, "INSERT INTO claims") &&
        env_int("SLOW_CLAIM_MS") > 0)
        usleep((useconds_t)env_int("SLOW_CLAIM_MS") * 1000);
    if (sql && strcmp(thread, "queue-writer") == 0 &&
        strncmp(sql, "DELETE FROM records_", 20) == 0 && strstr(sql, "WHERE id = ?1") &&
        atomic_fetch_add(&deletes, 1) < env_int("FAIL_DELETE"))
        return SQLITE_IOERR;
    if (sql && strcmp(thread, "queue-writer") == 0 && strstr(sql, "INSERT INTO event_names") &&
        atomic_fetch_add(&names_stores, 1) < env_int("FAIL_NAMES_STORE"))
        return SQLITE_IOERR;
    if (sql && strcmp(thread, "queue-writer") == 0 && strstr(sql, "INSERT INTO claims") &&
        atomic_fetch_add(&claim_stores, 1) < env_int("FAIL_CLAIMS_STORE"))
        return SQLITE_IOERR;
    if (sql && strcmp(thread, "queue-writer") == 0 &&
        strncmp(sql, "INSERT INTO records_", 20) == 0 && env_int("FAIL_RECORD_AT") > 0 &&
        atomic_fetch_add(&record_inserts, 1) + 1 == env_int("FAIL_RECORD_AT")) {
        atomic_store(&undo_armed, env_int("FAIL_UNDO"));
        return SQLITE_IOERR;
    }
    int dedup_at = env_int("FAIL_DEDUP_AT");
    if (sql && dedup_at > 0 && strstr(sql, "FROM dedup_log WHERE at_ms") &&
        atomic_fetch_add(&dedup_rows, 1) + 1 == dedup_at)
        return SQLITE_IOERR;
    if (!sql || strcmp(thread, "sender") != 0)
        return real(st);
    int at = env_int("FAIL_CLAIMS_AT");
    if (at > 0 && strstr(sql, "FROM claims") && atomic_fetch_add(&claim_rows, 1) + 1 == at)
        return SQLITE_IOERR;
    if (strstr(sql, "FROM event_names ORDER BY") &&
        atomic_fetch_add(&names_loads, 1) < env_int("FAIL_NAMES_LOAD"))
        return SQLITE_IOERR;
    if (strstr(sql, "WHERE id = ?1") && atomic_fetch_add(&fetches, 1) < env_int("FAIL_FETCH"))
        return SQLITE_IOERR;
    return real(st);
}

int sqlite3_exec(sqlite3 *db, const char *sql, int (*callback)(void *, int, char **, char **),
                 void *arg, char **errmsg)
{
    static int (*real)(sqlite3 *, const char *, int (*)(void *, int, char **, char **), void *,
                       char **);
    if (!real)
        real = (int (*)(sqlite3 *, const char *, int (*)(void *, int, char **, char **), void *,
                        char **))dlsym(RTLD_NEXT, "sqlite3_exec");
    if (strcmp(sql, "ROLLBACK TO op") == 0 && atomic_exchange(&undo_armed, 0)) {
        if (errmsg)
            *errmsg = NULL;
        return SQLITE_NOMEM;
    }
    return real(db, sql, callback, arg, errmsg);
}
