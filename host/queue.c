#include "queue.h"

#include "claim.h"
#include "dedup.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define QUEUE_FILE "queue.db"
#define QUEUE_LOCK_FILE "serve.lock"
/* Tries of the lock, 10 ms apart, before data_dir is taken for another
 * service's */
#define LOCK_TRIES 20
#define SCHEMA_VERSION "7"
/* Large pages make the WAL writes of ~2 KB rows sequential and cheap: about
 * three times the insert rate of 4 KiB pages with synchronous=FULL. */
#define PAGE_SIZE 16384
#define BUSY_TIMEOUT_MS 10000
/* Dedup ids are pruned in slices so no transaction grows large, often enough
 * to keep up with any ingest rate (up to 200,000 ids a second): a slice takes
 * the log's rows (one per stored request) up to that many ids, and at least
 * one row. */
#define PRUNE_SLICE_IDS 200000
/* The most ids a migration from schema 4 puts in one row of the dedup log:
 * a row of 16,320 bytes still fits a page of PAGE_SIZE. */
#define MIGRATE_DEDUP_ROW_IDS 1020
#define PRUNE_EVERY_MS 1000
#define GAUGES_EVERY_MS 1000
/* A background operation (an acknowledgement) that failed is tried again
 * after this long. */
#define RETRY_OPS_MS 1000
/* Free space on the disk is read this often (see check_disk). */
#define DISK_CHECK_EVERY_MS 50
/* After a backlog most of the file is free pages. The queue gives them back
 * with VACUUM, which rewrites the pages in use (requests wait for it: about
 * 0.3 s for 64 MiB), so only while few are (COMPACT_MAX_USED_BYTES) and many
 * are free (queue_options.compact_min_free_bytes). A steady flow keeps its
 * free pages: its emptied ring tables are filled again within seconds.
 * (auto_vacuum would give pages back a few at a time, but it keeps a map of
 * page owners that commits write too: 4 - 7% more CPU per event in `make
 * bench`.) */
#define COMPACT_EVERY_MS 10000
#define COMPACT_RETRY_MS (10 * 60 * 1000) /* after a failure (a full disk, most likely) */
#define COMPACT_MIN_FREE_BYTES (512LL << 20)
#define COMPACT_MAX_USED_BYTES (64LL << 20)
/* Once the WAL holds CHECKPOINT_PAGES pages (a third of its limit at most), a
 * checkpoint thread with its own connection copies it back into the database
 * while the writer goes on committing (a checkpoint writes 16 MB and syncs the
 * database file: tens of milliseconds that no request should wait for). The WAL
 * starts over from its beginning only when a commit finds it wholly copied and
 * unread, which the checkpoint thread racing the writer seldom leaves it; at its
 * limit (queue_options.wal_max_bytes) the writer copies the rest itself after
 * its commit and waits up to RESTART_WAIT_MS for the reads still in the WAL (the
 * sender's scans take a millisecond or two), so that the next commit starts the
 * WAL over. A read that outlasts the wait (a paged `dlq list`) keeps the WAL
 * growing until it ends; the writer then tries without waiting, and waits again
 * only RESTART_RETRY_MS later, so that commits do not pay the wait each time. */
#define CHECKPOINT_PAGES 1000
#define RESTART_WAIT_MS 20
#define RESTART_RETRY_MS 1000
#define RESTART_LOG_EVERY_MS 60000
/* The service's last checkpoint, as it stops, empties the WAL, and for that
 * waits for every read of the queue; another process's read (a paged `dlq
 * list`) can last for as long as its user likes, and the stop waits for it
 * this long only: the WAL, all of it committed, then stays for the next start
 * to read. */
#define CLOSE_CHECKPOINT_WAIT_MS 100
/* A writer step (a group commit, a checkpoint, housekeeping) that takes longer
 * than this holds up every request behind it: it is logged, at most once per
 * SLOW_LOG_EVERY_MS, with the number of such steps since the last line. */
#define SLOW_STEP_MS 250
#define SLOW_LOG_EVERY_MS 10000
/* Expiry moves at most this many records per transaction. */
#define EXPIRE_SLICE 10000
/* The rows of moves (see moved) read at a time. */
#define MOVED_PAGE 64

/* What each group a command (`tributary dlq requeue`, `purge`) committed
 * beside the service changed in the depth of each feed and in the dead
 * letters, for the service to add to its counts (see add_deltas), which
 * deletes the rows it added. AUTOINCREMENT: the ids of deleted rows are never
 * given again, or the service would take a new row for one it added. */
#define COUNT_DELTAS_TABLE                                                                         \
    "CREATE TABLE IF NOT EXISTS count_deltas("                                                     \
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"                                                      \
    "  ios INTEGER NOT NULL,"                                                                      \
    "  android INTEGER NOT NULL,"                                                                  \
    "  web INTEGER NOT NULL,"                                                                      \
    "  unbound INTEGER NOT NULL,"                                                                  \
    "  dead INTEGER NOT NULL);"

static const char *const SCHEMA =
    "CREATE TABLE IF NOT EXISTS meta("
    "  key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
    /* batches persisted before they are sent, one row per claim (see claim.h),
     * and which of a claim's batches are finished (delivered, dead-lettered or
     * split): a row here only once one is */
    "CREATE TABLE IF NOT EXISTS claims("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  feed INTEGER NOT NULL,"
    "  created_ms INTEGER NOT NULL,"
    "  batches BLOB NOT NULL);"
    "CREATE TABLE IF NOT EXISTS claim_done("
    "  id INTEGER PRIMARY KEY,"
    "  done BLOB NOT NULL);"
    /* fingerprints of the ids seen within the dedup window (see dedup.h), an
     * append-only log: rowid order is time order. A row holds the ids a
     * request stored, DEDUP_FP_BYTES each. */
    "CREATE TABLE IF NOT EXISTS dedup_log("
    "  id INTEGER PRIMARY KEY,"
    "  at_ms INTEGER NOT NULL,"
    "  fingerprints BLOB NOT NULL);"
    "CREATE TABLE IF NOT EXISTS dead("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  at_ms INTEGER NOT NULL,"
    "  reason TEXT NOT NULL,"
    "  detail TEXT NOT NULL,"
    "  feed INTEGER,"
    "  event_id TEXT NOT NULL,"
    "  event_type TEXT NOT NULL,"
    "  rules_version TEXT NOT NULL,"
    "  received_ms INTEGER,"
    "  raw TEXT NOT NULL,"
    "  event TEXT,"
    "  workspace TEXT);"
    "CREATE INDEX IF NOT EXISTS dead_reason ON dead(reason, id);"
    /* per feed: `below`, the line under which every record is delivered or
     * dead (see queue_ack), and `claimed`, the largest id put in a batch. A
     * record at or under `claimed` that no batch holds is delivered or dead. */
    "CREATE TABLE IF NOT EXISTS settled("
    "  feed INTEGER PRIMARY KEY,"
    "  below INTEGER NOT NULL,"
    "  claimed INTEGER NOT NULL);"
    /* the changes a command noted: see COUNT_DELTAS_TABLE */
    COUNT_DELTAS_TABLE "CREATE TABLE IF NOT EXISTS feed_state("
    "  feed INTEGER PRIMARY KEY,"
    "  reason TEXT NOT NULL,"
    "  since_ms INTEGER NOT NULL);"
    /* Records that queue_move stored on a feed keep the time they first came,
     * so they are out of the time order of the feed's ids, which expiry and
     * the oldest-age gauge read: each move is a row here, its ids lo..hi of
     * the feed and the oldest received_ms among those not claimed yet
     * (MOVED_NONE: all are), until the feed's settled line passes hi. */
    "CREATE TABLE IF NOT EXISTS moved("
    "  feed INTEGER NOT NULL,"
    "  lo INTEGER NOT NULL,"
    "  hi INTEGER NOT NULL,"
    "  oldest_ms INTEGER NOT NULL,"
    "  PRIMARY KEY(feed, lo)) WITHOUT ROWID;"
    /* custom event names sent, in the order they first were (see
     * event_names.h) */
    "CREATE TABLE IF NOT EXISTS event_names("
    "  id INTEGER PRIMARY KEY,"
    "  name TEXT NOT NULL UNIQUE,"
    "  first_ms INTEGER NOT NULL);";

/* Each feed keeps its records in RING tables, records_<feed>_0 .. _<RING-1>,
 * read together through the view records_<feed>: one mapped event per row, id
 * its order of arrival on the feed, never reused (the sender claims records
 * above a cursor). The writer fills one table until it holds SEGMENT_RECORDS
 * and the next one is empty, then moves on. Delivered records are not deleted
 * one by one: a table is emptied whole once its feed's settled line (see
 * queue_ack) has passed its last record. SQLite frees an emptied table's pages
 * without writing them, where deleting records one by one, or as a range,
 * rewrote the pages they shared with records still waiting. */
#define RING 2
#define SEGMENT_RECORDS 8192 /* queue_options.segment_records */

#define RECORDS_COLUMNS_4                                                                          \
    "CREATE TABLE IF NOT EXISTS records_%1$s_%2$d("                                                \
    "  id INTEGER PRIMARY KEY,"                                                                    \
    "  received_ms INTEGER NOT NULL,"                                                              \
    "  event_id TEXT NOT NULL,"                                                                    \
    "  event_type TEXT NOT NULL,"                                                                  \
    "  rules_version TEXT NOT NULL,"                                                               \
    "  user TEXT NOT NULL,"                                                                        \
    "  batch TEXT NOT NULL,"                                                                       \
    "  event TEXT NOT NULL,"                                                                       \
    "  raw TEXT NOT NULL"
static const char *const RECORDS_TABLE = RECORDS_COLUMNS_4 ", workspace TEXT)";
/* The same as schema 4 and 5 had them: what the step to schema 4 creates, so
 * that a queue whose upgrade stops between two steps is one that the version
 * of that step reads (the view over the ring needs its tables alike). */
static const char *const RECORDS_TABLE_4 = RECORDS_COLUMNS_4 ")";

/* Statements on a feed's view of its records: %1$s is the feed's name, %2$d
 * its number. */
enum feed_stmt_id { F_TO_DEAD, F_OLDEST, F_COUNT_RANGE, F_IDS_RANGE, F_COUNT };

static const char *const FEED_STMTS[F_COUNT] = {
    [F_TO_DEAD] = "INSERT INTO dead(at_ms, reason, detail, feed, event_id, event_type, "
                  "rules_version, received_ms, raw, event, workspace) "
                  "SELECT ?2, ?3, ?4, ?5, event_id, event_type, rules_version, received_ms, "
                  "raw, event, workspace FROM records_%1$s WHERE id = ?1",
    /* ?1: the feed's settled line. id is selected too: SQLite merges the
     * tables in id order only when the ORDER BY term is in the result
     * (otherwise it sorts every row) */
    [F_OLDEST] = "SELECT received_ms, id FROM records_%1$s WHERE id >= ?1 ORDER BY id LIMIT 1",
    [F_COUNT_RANGE] = "SELECT count(*) FROM (SELECT id FROM records_%1$s WHERE id > ?1 AND "
                      "id <= ?2)",
    [F_IDS_RANGE] = "SELECT id FROM records_%1$s WHERE id > ?1 AND id <= ?2 ORDER BY id",
};

/* Statements on one table of the ring: %1$s is the feed's name, %2$d the
 * table's place in the ring. */
enum ring_stmt_id { R_INSERT, R_DELETE, R_CLEAR, R_COUNT };

static const char *const RING_STMTS[R_COUNT] = {
    [R_INSERT] = "INSERT INTO records_%1$s_%2$d(id, received_ms, event_id, event_type, "
                 "rules_version, user, batch, event, raw, workspace) "
                 "VALUES(?9, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?10)",
    [R_DELETE] = "DELETE FROM records_%1$s_%2$d WHERE id = ?1",
    [R_CLEAR] = "DELETE FROM records_%1$s_%2$d",
};

/* Prepares a FEED_STMTS template for feed f, or a RING_STMTS one for table n
 * of its ring. */
static int prepare_table(sqlite3 *db, const char *tmpl, enum feed f, int n, sqlite3_stmt **out)
{
    char sql[512];
    /* a template uses the number only when it needs it */
    /* cppcheck-suppress wrongPrintfScanfArgNum */
    snprintf(sql, sizeof sql, tmpl, FEED_NAMES[f], n);
    return sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, out, NULL) == SQLITE_OK ? 0
                                                                                              : -1;
}

static int prepare_feed(sqlite3 *db, const char *tmpl, enum feed f, sqlite3_stmt **out)
{
    return prepare_table(db, tmpl, f, (int)f, out);
}

/* A move's oldest_ms when all of its records are claimed (see moved). */
#define MOVED_NONE INT64_MAX
/* ?1 feed, ?2 its settled line, ?3 its claimed line: the oldest moved record
 * not claimed yet (see moved), and whether some moved record above the
 * settled line is claimed. */
#define MOVED_OLDEST_SQL                                                                           \
    "SELECT min(oldest_ms), coalesce(max(lo <= ?3 AND ?2 <= ?3), 0) FROM moved "                   \
    "WHERE feed = ?1 AND hi >= ?2"

enum stmt_id {
    S_SEEN,
    S_INSERT_DEAD,
    S_INSERT_CLAIM,
    S_GET_CLAIM,
    S_SET_DONE,
    S_DELETE_CLAIM,
    S_DELETE_DONE,
    S_FEED_STATE_SET,
    S_FEED_STATE_CLEAR,
    S_FEED_STATE_GET,
    S_DELETE_DEAD,
    S_SET_LINE,
    S_SET_CLAIMED,
    S_DATA_VERSION,
    S_MOVED_ADD,
    S_MOVED_OLDEST,
    S_EVENT_NAME_ADD,
    S_EVENT_NAME_FORGET,
    S_COUNT
};

static const char *const STMTS[S_COUNT] = {
    [S_SEEN] = "INSERT INTO dedup_log(at_ms, fingerprints) VALUES(?1, ?2)",
    [S_INSERT_DEAD] = "INSERT INTO dead(at_ms, reason, detail, feed, event_id, event_type, "
                      "rules_version, received_ms, raw, event, workspace) "
                      "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    [S_INSERT_CLAIM] = "INSERT INTO claims(feed, created_ms, batches) VALUES(?1, ?2, ?3)",
    [S_GET_CLAIM] = "SELECT c.feed, c.batches, d.done FROM claims AS c "
                    "LEFT JOIN claim_done AS d ON d.id = c.id WHERE c.id = ?1",
    [S_SET_DONE] = "INSERT INTO claim_done(id, done) VALUES(?1, ?2) "
                   "ON CONFLICT(id) DO UPDATE SET done = excluded.done",
    [S_DELETE_CLAIM] = "DELETE FROM claims WHERE id = ?1",
    [S_DELETE_DONE] = "DELETE FROM claim_done WHERE id = ?1",
    [S_FEED_STATE_SET] = "INSERT INTO feed_state(feed, reason, since_ms) VALUES(?1, ?2, ?3) "
                         "ON CONFLICT(feed) DO UPDATE SET reason = excluded.reason, "
                         "since_ms = CASE WHEN feed_state.reason = excluded.reason "
                         "THEN feed_state.since_ms ELSE excluded.since_ms END",
    [S_FEED_STATE_CLEAR] = "DELETE FROM feed_state WHERE feed = ?1",
    [S_FEED_STATE_GET] = "SELECT reason FROM feed_state WHERE feed = ?1",
    [S_DELETE_DEAD] = "DELETE FROM dead WHERE id = ?1",
    [S_SET_LINE] = "INSERT INTO settled(feed, below, claimed) VALUES(?1, ?2, 0) "
                   "ON CONFLICT(feed) DO UPDATE SET below = max(below, excluded.below)",
    [S_DATA_VERSION] = "PRAGMA data_version",
    [S_SET_CLAIMED] = "INSERT INTO settled(feed, below, claimed) VALUES(?1, 0, ?2) "
                      "ON CONFLICT(feed) DO UPDATE SET claimed = max(claimed, excluded.claimed)",
    [S_MOVED_ADD] = "INSERT INTO moved(feed, lo, hi, oldest_ms) VALUES(?1, ?2, ?3, ?4)",
    [S_MOVED_OLDEST] = MOVED_OLDEST_SQL,
    [S_EVENT_NAME_ADD] = "INSERT INTO event_names(name, first_ms) VALUES(?1, ?2) "
                         "ON CONFLICT(name) DO NOTHING",
    [S_EVENT_NAME_FORGET] = "DELETE FROM event_names WHERE name = ?1",
};

enum op_kind {
    OP_COMMIT,
    OP_PERSIST,
    OP_ACK,
    OP_DEAD_BATCH,
    OP_SPLIT,
    OP_EXPIRE,
    OP_FEED_STATE,
    OP_EVENT_NAMES,
    OP_FORGET_NAMES,
    OP_REQUEUE,
    OP_PURGE,
};

struct op {
    enum op_kind kind;
    enum queue_status status;
    int done;
    struct op *next;
    int async; /* nobody waits: the writer frees the operation */
    /* effects applied to the in-memory gauges once the commit is durable */
    int64_t depth_delta[FEED_COUNT];
    int64_t dead_delta;
    /* fingerprints this operation added to the dedup set (at added_ms), undone
     * on rollback */
    struct dedup_fp *added;
    size_t nadded, added_cap;
    int64_t added_ms;
    union {
        struct {
            struct mapping *m;
            struct commit_result *res;
            int dedup; /* 0 for requeue */
            /* with dedup: the fingerprints of the records' event ids, then
             * of the dead letters', made by the submitting thread so that
             * the writer, which every request waits for, does not hash */
            const struct dedup_fp *fps;
            const int64_t *dead_ids;
            size_t ndead_ids;
            /* OP_REQUEUE of records (queue_move): these, of feed from_feed */
            const int64_t *record_ids;
            size_t nrecord_ids;
            enum feed from_feed;
        } commit;
        struct {
            struct queue_batch *b;
            size_t n;
            int64_t replaces; /* OP_SPLIT: the batch they replace */
            /* OP_PERSIST: event names to keep in the same commit, if
             * they can be: a failure leaves the batches persisted */
            const struct event_name *names;
            size_t nnames;
            int *names_stored;
        } persist;
        struct {
            const int64_t *ids;
            size_t n;
            const char *reason; /* OP_DEAD_BATCH */
            const char *detail;
            enum feed feed;        /* OP_ACK: the feed of the batches */
            int64_t settled_below; /* OP_ACK: see queue_ack */
        } batches;
        struct {
            int64_t cutoff_ms;
            size_t *moved; /* FEED_COUNT of them */
        } expire;
        struct {
            enum feed feed;
            const char *reason;
        } feed_state;
        struct {
            const struct event_name *names; /* OP_EVENT_NAMES */
            const char *const *forget;      /* OP_FORGET_NAMES (NULL: all) */
            size_t n;
            size_t *forgotten;
            unsigned char *found; /* may be NULL */
        } event_names;
        struct {
            const struct dead_filter *f;
            int64_t *after; /* the page's ids are larger; moved past them */
            size_t *deleted;
        } purge;
    } u;
};

/* The writer's view of a feed's records. An operation that is rolled back
 * takes its changes to this view back with it (run_group): a claimed id left
 * ahead of the database would skip storing the next claim's, and after a
 * restart the feed's claims would be refused. */
struct feed_ring {
    int64_t next_id;
    int64_t line;       /* settled line: every record below it is delivered or dead */
    int64_t claimed;    /* the largest id put in a batch */
    int64_t moved_hi;   /* the largest id of a move (see moved), or less */
    int filling;        /* the table taking new records */
    int64_t rows[RING]; /* records stored in each table since it was emptied */
    int64_t last[RING]; /* the largest id each table has held */
    /* Ids from dense_from on were given out by this writer one by one, and
     * those deleted unclaimed lie within [deleted_lo, deleted_hi] (none when
     * deleted_hi is 0): how many records a range of them holds is known
     * without reading the table (stored_between). */
    int64_t dense_from;
    int64_t deleted_lo, deleted_hi;
};

struct queue {
    sqlite3 *db; /* the writer's connection */
    /* The dedup window's clock (dedup_now): wall-clock milliseconds that
     * advance with the monotonic clock from the queue's opening, so that a step
     * of the wall clock (a virtual machine resumed, a clock set at boot or by
     * hand) neither expires the window's ids at once nor keeps them. Anchored
     * at the wall clock, or at the log's last stamp when that is later, so that
     * stamps never go back: the log stays in time order (prune_dedup relies on
     * it), and the segments of the set stay in step. */
    int64_t dedup_anchor_wall, dedup_anchor_mono;
    sqlite3_stmt *st[S_COUNT];
    sqlite3_stmt *fst[FEED_COUNT][F_COUNT];
    sqlite3_stmt *rst[FEED_COUNT][RING][R_COUNT];
    char *path;
    struct queue_options opt;
    int lock_fd; /* holds the service's lock on data_dir (-1: none) */
    int dir_fd;  /* and on data_dir itself (see take_lock) */

    pthread_t writer;
    int writer_started;
    pthread_mutex_t mu;
    pthread_cond_t work;
    pthread_cond_t done;
    struct op *pending, *pending_tail;
    struct op *retry; /* failed background operations, the writer's own */
    int64_t retry_at_ms;
    int disk_low;         /* the file system has less than opt.min_free_bytes free */
    int64_t refused_need; /* new events of the last commit refused as over max_depth (under mu) */
    int64_t last_disk_check_ms;
    int64_t disk_logged_ms, retry_logged_ms, commit_logged_ms, checkpoint_logged_ms; /* log_due */
    int stopping;

    /* the checkpoint thread: requested by the writer, under mu */
    pthread_t checkpointer;
    int checkpointer_started;
    pthread_cond_t checkpoint_wanted;
    pthread_cond_t checkpoint_idle;
    int checkpoint_requested;
    int checkpoint_running;
    int restart_pending; /* the writer waits to restart the WAL: no new checkpoint */
    sqlite3 *checkpoint_db;

    /* writer-side bookkeeping, also read under mu */
    int healthy;
    int unclean_stop;   /* the service's last run ended without a clean stop (see mark_running) */
    int synchronous;    /* PRAGMA synchronous of the writer's connection, as SQLite reads it */
    int marked_running; /* this run's mark, taken away at its clean stop */
    struct queue_gauges gauges;
    dedup *seen; /* NULL when the dedup window is 0 */
    int64_t last_prune_ms;
    int64_t last_gauges_ms;
    int64_t last_group_ms; /* when the writer last ran a group commit (writer only) */
    int64_t next_compact_ms;
    int64_t compact_min_free_bytes;
    int wal_pages; /* set by the WAL hook after each commit */
    int64_t slow_logged_ms;
    int64_t slow_steps;
    int wal_limit_pages;
    int checkpoint_pages;
    int64_t segment_records;
    int64_t data_version; /* PRAGMA data_version when the rings were last read */
    int64_t deltas_added; /* the service: the last row of count_deltas in its counts */
    int64_t counted_ms;   /* a command: when it last counted the records (see recount) */
    int64_t restart_logged_ms;
    int64_t restart_busy_ms; /* when a restart last waited in vain */
    struct feed_ring ring[FEED_COUNT];
};

struct queue_reader {
    sqlite3 *db;
    sqlite3_stmt *scan[FEED_COUNT];
    sqlite3_stmt *scan_raw[FEED_COUNT]; /* prepared when first used */
    sqlite3_stmt *fetch[FEED_COUNT];
    char error[ERR_LEN]; /* why the last read failed, "" when none did */
};

const char *queue_status_name(enum queue_status s)
{
    switch (s) {
    case QUEUE_OK:
        return "ok";
    case QUEUE_FULL:
        return "full";
    case QUEUE_NO_SPACE:
        return "disk full";
    case QUEUE_ERROR:
        return "storage error";
    case QUEUE_CLOSED:
        return "closed";
    case QUEUE_CHANGED:
        return "changed meanwhile";
    }
    return "?";
}

/* ---- helpers ------------------------------------------------------------ */

static enum queue_status status_of(int rc)
{
    if (rc == SQLITE_FULL)
        return QUEUE_NO_SPACE;
    return QUEUE_ERROR;
}

static int exec(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        str_printf(err, errlen, "%s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

static int step_done(sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

static void bind_str(sqlite3_stmt *s, int i, str v)
{
    sqlite3_bind_text(s, i, v.p ? v.p : "", (int)v.n, SQLITE_STATIC);
}

/* A text that may be absent: NULL then. */
static void bind_opt_str(sqlite3_stmt *s, int i, str v)
{
    if (v.p)
        sqlite3_bind_text(s, i, v.p, (int)v.n, SQLITE_STATIC);
    else
        sqlite3_bind_null(s, i);
}

static int open_db(const char *path, int create, sqlite3 **out, char *err, size_t errlen)
{
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(path, &db, flags, NULL);
    if (rc != SQLITE_OK) {
        /* SQLite's "unable to open database file" says neither why nor
         * what to do: a queue.db restored by root, the service's own user
         * kept out, is the usual case */
        int sys = db ? sqlite3_system_errno(db) : 0;
        struct stat st;
        if (sys == EACCES && stat(path, &st) == 0 && st.st_uid != geteuid())
            str_printf(err, errlen,
                       "%s: %s (%s: it belongs to uid %u, mode %04o, and this process runs as uid "
                       "%u: chown it and its -wal and -shm files to the service's user)",
                       path, sqlite3_errmsg(db), strerror(sys), (unsigned)st.st_uid,
                       (unsigned)(st.st_mode & 07777), (unsigned)geteuid());
        else if (sys != 0)
            str_printf(err, errlen, "%s: %s (%s)", path, sqlite3_errmsg(db), strerror(sys));
        else
            str_printf(err, errlen, "%s: %s", path, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return -1;
    }
    sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS);
    sqlite3_extended_result_codes(db, 0);
    *out = db;
    return 0;
}

/* ---- writer: operations ------------------------------------------------- */

static int insert_record(queue *q, const struct record *r, int64_t now)
{
    struct feed_ring *ring = &q->ring[r->feed];
    int t = ring->filling, next = (t + 1) % RING;
    if (ring->rows[t] >= q->segment_records && ring->rows[next] == 0)
        ring->filling = t = next;
    sqlite3_stmt *s = q->rst[r->feed][t][R_INSERT];
    sqlite3_bind_int64(s, 9, ring->next_id);
    sqlite3_bind_int64(s, 1, r->received_ms > 0 ? r->received_ms : now);
    bind_str(s, 2, r->event_id);
    bind_str(s, 3, r->event_type);
    sqlite3_bind_text(s, 4, r->rules_version, -1, SQLITE_STATIC);
    bind_str(s, 5, r->user);
    bind_str(s, 6, r->batch);
    bind_str(s, 7, r->event);
    bind_str(s, 8, r->raw);
    bind_opt_str(s, 10, r->workspace);
    int rc = step_done(s);
    if (rc == SQLITE_OK) {
        ring->rows[t]++;
        ring->last[t] = ring->next_id++;
    }
    return rc;
}

static int insert_dead(queue *q, const struct dead_letter *d, int64_t now)
{
    sqlite3_stmt *s = q->st[S_INSERT_DEAD];
    sqlite3_bind_int64(s, 1, now);
    sqlite3_bind_text(s, 2, d->reason, -1, SQLITE_STATIC);
    bind_str(s, 3, d->detail);
    if (d->feed >= 0)
        sqlite3_bind_int(s, 4, d->feed);
    else
        sqlite3_bind_null(s, 4);
    bind_str(s, 5, d->event_id);
    bind_str(s, 6, d->event_type);
    sqlite3_bind_text(s, 7, d->rules_version ? d->rules_version : "", -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 8, now);
    bind_str(s, 9, d->raw);
    sqlite3_bind_null(s, 10);
    bind_opt_str(s, 11, d->workspace);
    return step_done(s);
}

static int64_t dedup_now(const queue *q)
{
    return q->dedup_anchor_wall + (clock_mono_ms() - q->dedup_anchor_mono);
}

/* 1 when the id of fingerprint fp is new (and now recorded in memory, and in
 * the operation's list for log_sightings), 0 when it was seen within the
 * window, -1 on error. */
static int first_sighting(queue *q, struct op *op, const struct dedup_fp *fp, int64_t now)
{
    if (dedup_contains(q->seen, fp, now))
        return 0;
    if (op->nadded == op->added_cap) {
        size_t cap = op->added_cap ? op->added_cap * 2 : 64;
        struct dedup_fp *a = realloc(op->added, cap * sizeof(*a));
        if (!a)
            return -1;
        op->added = a;
        op->added_cap = cap;
    }
    if (dedup_add(q->seen, fp, now) != 0)
        return -1;
    op->added[op->nadded++] = *fp;
    op->added_ms = now;
    return 1;
}

/* Writes the ids the operation saw first to the dedup log, as one row. */
static int log_sightings(queue *q, const struct op *op)
{
    if (op->nadded == 0)
        return SQLITE_OK;
    if (op->nadded > INT_MAX / DEDUP_FP_BYTES)
        return SQLITE_TOOBIG;
    unsigned char *fps = malloc(op->nadded * DEDUP_FP_BYTES);
    if (!fps)
        return SQLITE_NOMEM;
    for (size_t i = 0; i < op->nadded; i++)
        dedup_fp_encode(&op->added[i], fps + i * DEDUP_FP_BYTES);
    sqlite3_stmt *s = q->st[S_SEEN];
    sqlite3_bind_int64(s, 1, op->added_ms);
    sqlite3_bind_blob(s, 2, fps, (int)(op->nadded * DEDUP_FP_BYTES), SQLITE_STATIC);
    int rc = step_done(s);
    sqlite3_clear_bindings(s);
    free(fps);
    return rc;
}

/* Under q->mu. */
static void dedup_gauges(queue *q)
{
    if (!q->seen)
        return;
    q->gauges.dedup_ids = (int64_t)dedup_size(q->seen);
    q->gauges.dedup_bytes = (int64_t)dedup_memory(q->seen);
}

/* The operation's writes were rolled back: so are its dedup entries. */
static void undo_sightings(queue *q, struct op *op)
{
    for (size_t i = 0; i < op->nadded; i++)
        dedup_remove(q->seen, &op->added[i], op->added_ms);
    op->nadded = 0;
}

static int64_t depth_total(queue *q)
{
    int64_t t = 0;
    for (int f = 0; f < FEED_COUNT; f++)
        t += q->gauges.depth[f];
    return t;
}

static enum queue_status apply_commit(queue *q, struct op *op, int64_t now, int64_t depth)
{
    struct mapping *m = op->u.commit.m;
    struct commit_result *res = op->u.commit.res;
    memset(res, 0, sizeof(*res));
    const struct dedup_fp *fps = op->u.commit.fps;
    int check = op->u.commit.dedup && q->seen;
    int64_t seen_at = check ? dedup_now(q) : 0;
    /* A move changes neither the depth nor what is kept; its records are
     * noted in `moved` */
    int moving = op->kind == OP_REQUEUE && op->u.commit.nrecord_ids > 0;
    struct {
        int64_t lo, hi, oldest_ms;
    } span[FEED_COUNT] = {{0}};
    for (size_t i = 0; i < m->nrecords; i++) {
        const struct record *r = &m->records[i];
        if (check) {
            int first = first_sighting(q, op, &fps[i], seen_at);
            if (first < 0)
                return status_of(sqlite3_errcode(q->db));
            if (!first) {
                res->duplicates++;
                continue;
            }
        }
        int rc = insert_record(q, r, now);
        if (rc != SQLITE_OK)
            return status_of(rc);
        res->queued++;
        op->depth_delta[r->feed]++;
        if (moving) {
            int64_t id = q->ring[r->feed].next_id - 1;
            int64_t at = r->received_ms > 0 ? r->received_ms : now;
            if (!span[r->feed].lo) {
                span[r->feed].lo = id;
                span[r->feed].oldest_ms = at;
            }
            span[r->feed].hi = id;
            if (at < span[r->feed].oldest_ms)
                span[r->feed].oldest_ms = at;
        }
    }
    for (int f = 0; f < FEED_COUNT; f++) {
        if (!span[f].lo)
            continue;
        sqlite3_stmt *s = q->st[S_MOVED_ADD];
        sqlite3_bind_int(s, 1, f);
        sqlite3_bind_int64(s, 2, span[f].lo);
        sqlite3_bind_int64(s, 3, span[f].hi);
        sqlite3_bind_int64(s, 4, span[f].oldest_ms);
        int rc = step_done(s);
        if (rc != SQLITE_OK)
            return status_of(rc);
        q->ring[f].moved_hi = span[f].hi;
    }
    /* Checked after dedup, so a retry of stored events is still acknowledged;
     * the savepoint of this operation is rolled back on a refusal. */
    if (res->queued > 0 && !moving && depth + (int64_t)res->queued > q->opt.max_depth) {
        pthread_mutex_lock(&q->mu);
        q->refused_need = (int64_t)res->queued;
        pthread_mutex_unlock(&q->mu);
        memset(res, 0, sizeof(*res));
        return QUEUE_FULL;
    }
    for (size_t i = 0; i < m->ndead; i++) {
        struct dead_letter *d = &m->dead[i];
        d->stored = 0;
        if (check) {
            int first = first_sighting(q, op, &fps[m->nrecords + i], seen_at);
            if (first < 0)
                return status_of(sqlite3_errcode(q->db));
            if (!first) {
                res->duplicates++;
                continue;
            }
        }
        int rc = insert_dead(q, d, now);
        if (rc != SQLITE_OK)
            return status_of(rc);
        res->quarantined++;
        op->dead_delta++;
        d->stored = 1;
    }
    /* the reserve is kept for sending and acknowledging: rules that make
     * every event a dead letter must not fill the disk either */
    if (((res->queued > 0 && !moving) || res->quarantined > 0) && q->disk_low) {
        memset(res, 0, sizeof(*res));
        return QUEUE_NO_SPACE;
    }
    for (size_t i = 0; i < op->u.commit.ndead_ids; i++) {
        sqlite3_stmt *s = q->st[S_DELETE_DEAD];
        sqlite3_bind_int64(s, 1, op->u.commit.dead_ids[i]);
        int rc = step_done(s);
        if (rc != SQLITE_OK)
            return status_of(rc);
        /* requeued or purged by another command since this one read it: its
         * events are queued already, or meant to be gone */
        if (sqlite3_changes(q->db) == 0)
            return QUEUE_CHANGED;
        op->dead_delta--;
    }
    int rc = log_sightings(q, op);
    return rc == SQLITE_OK ? QUEUE_OK : status_of(rc);
}

typedef int (*record_fn)(queue *, struct op *, int64_t id, int feed, int64_t now);

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* A claim as stored: its feed, its batches (parsed, pointing into blob) and
 * its bitmap of finished batches, room for CLAIM_MAX_BATCHES. n is 0 when the
 * claim is gone. */
struct claim_row {
    int feed;
    unsigned char *blob;
    unsigned char *done;
    struct claim_batch *b;
    long n;
};

static void claim_row_free(struct claim_row *c)
{
    free(c->b);
    free(c->blob);
    free(c->done);
}

/* Reads claim `row` into c, copied: the statements that follow would
 * invalidate the columns. */
static enum queue_status read_claim(queue *q, int64_t row, struct claim_row *c)
{
    memset(c, 0, sizeof(*c));
    sqlite3_stmt *s = q->st[S_GET_CLAIM];
    sqlite3_bind_int64(s, 1, row);
    int rc = sqlite3_step(s);
    enum queue_status st = rc == SQLITE_DONE ? QUEUE_OK : status_of(rc);
    if (rc == SQLITE_ROW) {
        size_t len = (size_t)sqlite3_column_bytes(s, 1);
        size_t nbytes = (size_t)sqlite3_column_bytes(s, 2);
        c->feed = sqlite3_column_int(s, 0);
        c->blob = malloc(len ? len : 1);
        c->done = calloc(1, CLAIM_BITMAP_BYTES(CLAIM_MAX_BATCHES));
        if (c->blob && c->done) {
            memcpy(c->blob, sqlite3_column_blob(s, 1), len);
            if (nbytes > 0 && nbytes <= CLAIM_BITMAP_BYTES(CLAIM_MAX_BATCHES))
                memcpy(c->done, sqlite3_column_blob(s, 2), nbytes);
            c->n = claim_parse(c->blob, len, &c->b);
            st = QUEUE_OK;
            if (c->n < 0) {
                log_error(claim_parse_failure(c->n),
                          LOG_I("claim", row) LOG_I("bytes", (long long)len));
                c->n = 0;
                st = QUEUE_ERROR;
            }
        } else {
            st = QUEUE_ERROR;
        }
    }
    sqlite3_reset(s);
    return st;
}

/* Stores which of claim `row`'s batches are finished, or deletes the claim
 * once all are. */
static int write_claim_done(queue *q, int64_t row, const struct claim_row *c)
{
    size_t nbytes = CLAIM_BITMAP_BYTES((size_t)c->n), left = 0;
    for (long x = 0; x < c->n; x++)
        left += !claim_finished(c->done, nbytes, (size_t)x);
    sqlite3_stmt *s;
    if (left > 0) {
        s = q->st[S_SET_DONE];
        sqlite3_bind_int64(s, 1, row);
        sqlite3_bind_blob(s, 2, c->done, (int)nbytes, SQLITE_STATIC);
        return step_done(s);
    }
    s = q->st[S_DELETE_CLAIM];
    sqlite3_bind_int64(s, 1, row);
    int rc = step_done(s);
    if (rc != SQLITE_OK)
        return rc;
    s = q->st[S_DELETE_DONE];
    sqlite3_bind_int64(s, 1, row);
    return step_done(s);
}

/* Marks batches finished in their claims, calling fn (when not NULL) for each
 * record of each batch not finished before; a claim whose batches are all
 * finished is deleted. */
static enum queue_status finish_batches(queue *q, struct op *op, const int64_t *batch_ids, size_t n,
                                        int64_t now, record_fn fn)
{
    int64_t *ids = malloc((n ? n : 1) * sizeof(*ids));
    if (!ids)
        return QUEUE_ERROR;
    if (n > 0)
        memcpy(ids, batch_ids, n * sizeof(*ids));
    qsort(ids, n, sizeof(*ids), cmp_i64);
    enum queue_status st = QUEUE_OK;
    for (size_t i = 0, j; i < n && st == QUEUE_OK; i = j) {
        /* ids[i, j) belong to one claim */
        int64_t row = claim_row_of(ids[i]);
        for (j = i + 1; j < n && claim_row_of(ids[j]) == row;)
            j++;
        struct claim_row c;
        st = read_claim(q, row, &c);
        size_t nbytes = CLAIM_BITMAP_BYTES((size_t)c.n);
        for (size_t k = i; k < j && st == QUEUE_OK; k++) {
            size_t x = claim_index_of(ids[k]);
            if (x >= (size_t)c.n || claim_finished(c.done, nbytes, x))
                continue; /* gone, or finished before (a repeated acknowledgement) */
            for (size_t r = 0; fn && r < c.b[x].nrecords && st == QUEUE_OK; r++) {
                int rc = fn(q, op, claim_record(&c.b[x], r), c.feed, now);
                if (rc != SQLITE_OK)
                    st = status_of(rc);
            }
            claim_finish(c.done, x);
        }
        if (st == QUEUE_OK && c.n > 0) {
            int rc = write_claim_done(q, row, &c);
            if (rc != SQLITE_OK)
                st = status_of(rc);
        }
        claim_row_free(&c);
    }
    free(ids);
    return st;
}

/* Stores batches b[0..n) of one claim, in rows of at most CLAIM_MAX_BATCHES,
 * and fills their ids. */
static int insert_claims(queue *q, struct queue_batch *b, size_t n, int64_t now)
{
    for (size_t at = 0; at < n;) {
        size_t m = n - at < CLAIM_MAX_BATCHES ? n - at : CLAIM_MAX_BATCHES;
        size_t len;
        unsigned char *blob = claim_encode(b + at, m, &len);
        if (!blob)
            return SQLITE_NOMEM;
        sqlite3_stmt *s = q->st[S_INSERT_CLAIM];
        sqlite3_bind_int(s, 1, (int)b[at].feed);
        sqlite3_bind_int64(s, 2, now);
        sqlite3_bind_blob(s, 3, blob, (int)len, SQLITE_STATIC);
        int rc = step_done(s);
        free(blob);
        if (rc != SQLITE_OK)
            return rc;
        int64_t row = sqlite3_last_insert_rowid(q->db);
        for (size_t i = 0; i < m; i++)
            b[at + i].id = claim_batch_id(row, i);
        at += m;
    }
    return SQLITE_OK;
}

/* Whether the records of feed f with ids in (after, upto] are ids[0..n)
 * (sorted, distinct, all in that range): 1 or 0, with how many there are in
 * *stored, or -1 on a storage error. Ids are given out in order, one per
 * record, so a range the writer gave out itself, with none of its records
 * deleted, holds one record per id; any other range (ids from before the rings
 * were last read, held records moved to another feed, expired ones) is read
 * from the table, every page of it. */
static int records_are(queue *q, enum feed f, int64_t after, int64_t upto, const int64_t *ids,
                       size_t n, int64_t *stored)
{
    const struct feed_ring *ring = &q->ring[f];
    int dense = after >= ring->dense_from - 1 && upto < ring->next_id &&
                (ring->deleted_hi == 0 || ring->deleted_hi <= after || ring->deleted_lo > upto);
    if (dense) {
        *stored = upto - after;
        return *stored == (int64_t)n;
    }
    sqlite3_stmt *s = q->fst[f][F_IDS_RANGE];
    sqlite3_bind_int64(s, 1, after);
    sqlite3_bind_int64(s, 2, upto);
    int same = 1, rc;
    *stored = 0;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        /* both in id order: the same set is the same sequence */
        size_t at = (size_t)(*stored)++;
        same = same && at < n && ids[at] == sqlite3_column_int64(s, 0);
    }
    sqlite3_reset(s);
    if (rc != SQLITE_DONE)
        return -1;
    return same && *stored == (int64_t)n;
}

/* Persists the batches of feed f among b[0..n) as one claim, and raises the
 * feed's claimed id once sure no record up to it is left out. */
static int moved_update(queue *q, int f, int64_t from, int64_t to, int64_t cutoff, int64_t *ids,
                        size_t room, size_t *n);

static enum queue_status persist_feed(queue *q, enum feed f, struct queue_batch *b, size_t n,
                                      int64_t now)
{
    size_t m = 0, nids = 0;
    for (size_t i = 0; i < n; i++) {
        m += b[i].feed == f;
        nids += b[i].feed == f ? b[i].nrecords : 0;
    }
    if (m == 0)
        return QUEUE_OK;
    struct queue_batch *mine = malloc(m * sizeof(*mine));
    int64_t *ids = malloc((nids ? nids : 1) * sizeof(*ids));
    if (!mine || !ids) {
        free(mine);
        free(ids);
        return QUEUE_ERROR;
    }
    /* the largest id claimed now, and how many different ids above the
     * previous claim the batches hold (an id named twice must not make up
     * for one left out) */
    int64_t claimed = 0, fresh = 0;
    size_t above = 0;
    for (size_t i = 0, k = 0; i < n; i++) {
        if (b[i].feed != f)
            continue;
        mine[k++] = b[i];
        for (size_t r = 0; r < b[i].nrecords; r++) {
            int64_t id = b[i].record_ids[r];
            claimed = id > claimed ? id : claimed;
            if (id > q->ring[f].claimed)
                ids[above++] = id;
        }
    }
    qsort(ids, above, sizeof(*ids), cmp_i64);
    for (size_t i = 0; i < above; i++) {
        if (i == 0 || ids[i] != ids[i - 1])
            ids[fresh++] = ids[i];
    }
    int rc = insert_claims(q, mine, m, now);
    for (size_t i = 0, k = 0; i < n && rc == SQLITE_OK; i++) {
        if (b[i].feed == f)
            b[i].id = mine[k++].id;
    }
    free(mine);
    if (rc != SQLITE_OK || claimed <= q->ring[f].claimed) {
        free(ids);
        return rc == SQLITE_OK ? QUEUE_OK : status_of(rc);
    }
    /* a record left out here would count as delivered */
    int64_t stored;
    int same = records_are(q, f, q->ring[f].claimed, claimed, ids, (size_t)fresh, &stored);
    free(ids);
    if (same < 0) {
        log_error("queue: cannot read the records a claim covers",
                  LOG_S("feed", FEED_NAMES[f]) LOG_S("error", sqlite3_errmsg(q->db)));
        return QUEUE_ERROR;
    }
    if (same == 0) {
        log_error("queue: refused batches that leave out records of their feed, or name others",
                  LOG_S("feed", FEED_NAMES[f]) LOG_I("records", stored) LOG_I("in_batches", fresh));
        return QUEUE_ERROR;
    }
    sqlite3_stmt *s = q->st[S_SET_CLAIMED];
    sqlite3_bind_int(s, 1, (int)f);
    sqlite3_bind_int64(s, 2, claimed);
    rc = step_done(s);
    if (rc != SQLITE_OK)
        return status_of(rc);
    struct feed_ring *ring = &q->ring[f];
    int64_t was = ring->claimed;
    ring->claimed = claimed;
    if (ring->deleted_hi <= claimed)
        ring->deleted_lo = ring->deleted_hi = 0;
    /* moved records claimed now leave their moves' oldest times */
    size_t none;
    if (ring->moved_hi > was && moved_update(q, (int)f, was + 1, claimed, 0, NULL, 0, &none) != 0)
        return status_of(sqlite3_errcode(q->db));
    return QUEUE_OK;
}

/* Keeps event names sent for the first time (see queue_add_event_names). */
static enum queue_status add_event_names(queue *q, const struct event_name *names, size_t n)
{
    sqlite3_stmt *s = q->st[S_EVENT_NAME_ADD];
    for (size_t i = 0; i < n; i++) {
        str name = names[i].name;
        sqlite3_bind_text(s, 1, name.p ? name.p : "", (int)name.n, SQLITE_STATIC);
        sqlite3_bind_int64(s, 2, names[i].first_ms);
        int rc = step_done(s);
        if (rc != SQLITE_OK)
            return status_of(rc);
    }
    return QUEUE_OK;
}

/* A claim's new event names, in a savepoint of their own: names that cannot
 * be kept leave the batches persisted (the sender stores them later). But a
 * failure that ended the transaction (SQLite rolls it all back on a full disk
 * or an I/O error) fails the operation, for its group to be rolled back. */
static enum queue_status persist_names(queue *q, struct op *op)
{
    char err[ERR_LEN];
    if (exec(q->db, "SAVEPOINT names", err, sizeof err) != 0)
        return status_of(sqlite3_errcode(q->db));
    enum queue_status st = add_event_names(q, op->u.persist.names, op->u.persist.nnames);
    if (sqlite3_get_autocommit(q->db))
        return st == QUEUE_OK ? QUEUE_ERROR : st;
    /* names that cannot be undone must not commit with the claim: the
     * operation fails, and its savepoint in run_group undoes them */
    if ((st != QUEUE_OK && exec(q->db, "ROLLBACK TO names", err, sizeof err) != 0) ||
        exec(q->db, "RELEASE names", err, sizeof err) != 0)
        return status_of(sqlite3_errcode(q->db));
    *op->u.persist.names_stored = st == QUEUE_OK;
    return QUEUE_OK;
}

static enum queue_status apply_persist(queue *q, struct op *op, int64_t now)
{
    enum queue_status st = QUEUE_OK;
    if (op->kind == OP_SPLIT)
        st = finish_batches(q, op, &op->u.persist.replaces, 1, now, NULL);
    for (size_t i = 0; i < op->u.persist.n && st == QUEUE_OK; i++) {
        if (op->u.persist.b[i].feed >= FEED_COUNT)
            st = QUEUE_ERROR;
    }
    for (int f = 0; f < FEED_COUNT && st == QUEUE_OK; f++)
        st = persist_feed(q, (enum feed)f, op->u.persist.b, op->u.persist.n, now);
    if (st == QUEUE_OK && op->u.persist.nnames)
        st = persist_names(q, op);
    return st;
}

static int delete_record(queue *q, struct op *op, int64_t id, int feed, int64_t now)
{
    (void)now;
    if (feed < 0 || feed >= FEED_COUNT)
        return SQLITE_OK;
    for (int t = 0; t < RING; t++) {
        sqlite3_stmt *s = q->rst[feed][t][R_DELETE];
        sqlite3_bind_int64(s, 1, id);
        int rc = step_done(s);
        if (rc != SQLITE_OK)
            return rc;
        if (sqlite3_changes(q->db) > 0) {
            op->depth_delta[feed]--;
            struct feed_ring *ring = &q->ring[feed];
            if (id > ring->claimed) {
                if (ring->deleted_hi == 0 || id < ring->deleted_lo)
                    ring->deleted_lo = id;
                if (id > ring->deleted_hi)
                    ring->deleted_hi = id;
            }
            break;
        }
    }
    return SQLITE_OK;
}

/* With its batch gone, a delivered record is one that no batch holds at or
 * under the feed's claimed id: nothing more to write. The records of a batch
 * are there until the batch is acknowledged or dead-lettered (expiry takes
 * only unclaimed records, a restart keeps them), so each one leaves the
 * depth. */
static int record_delivered(queue *q, struct op *op, int64_t id, int feed, int64_t now)
{
    (void)q;
    (void)id;
    (void)now;
    if (feed >= 0 && feed < FEED_COUNT)
        op->depth_delta[feed]--;
    return SQLITE_OK;
}

/* Raises feed f's settled line: every table of the ring whose records all lie
 * below it is emptied. */
static enum queue_status raise_line(queue *q, enum feed f, int64_t below)
{
    struct feed_ring *ring = &q->ring[f];
    if (below > ring->claimed + 1)
        below = ring->claimed + 1; /* nothing unclaimed is delivered */
    if (below <= ring->line)
        return QUEUE_OK;
    sqlite3_stmt *s = q->st[S_SET_LINE];
    sqlite3_bind_int(s, 1, (int)f);
    sqlite3_bind_int64(s, 2, below);
    int rc = step_done(s);
    if (rc != SQLITE_OK)
        return status_of(rc);
    ring->line = below;
    for (int t = 0; t < RING; t++) {
        if (ring->rows[t] == 0 || ring->last[t] >= below)
            continue;
        if ((rc = step_done(q->rst[f][t][R_CLEAR])) != SQLITE_OK)
            return status_of(rc);
        ring->rows[t] = 0;
    }
    return QUEUE_OK;
}

static int record_to_dead(queue *q, struct op *op, int64_t id, int feed, int64_t now)
{
    if (feed < 0 || feed >= FEED_COUNT)
        return SQLITE_OK;
    sqlite3_stmt *s = q->fst[feed][F_TO_DEAD];
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, now);
    sqlite3_bind_text(s, 3, op->u.batches.reason, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 4, op->u.batches.detail ? op->u.batches.detail : "", -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 5, feed);
    int rc = step_done(s);
    if (rc != SQLITE_OK)
        return rc;
    op->dead_delta += sqlite3_changes(q->db);
    return delete_record(q, op, id, feed, now);
}

/* Brings feed f's moves (see moved) that meet the ids from..to up to date:
 * each one's oldest_ms becomes the oldest of its records not claimed yet, and
 * a move with no record left at or above the settled line goes. With ids,
 * only the moves that may hold records older than cutoff are read, and those
 * whose records were claimed since; their unclaimed records older than cutoff
 * go into ids (at most room, *n of them), for the caller to expire, and are
 * left out of oldest_ms. -1 on a storage error. */
static int moved_update(queue *q, int f, int64_t from, int64_t to, int64_t cutoff, int64_t *ids,
                        size_t room, size_t *n)
{
    *n = 0;
    int64_t line = q->ring[f].line, claimed = q->ring[f].claimed;
    char sql[256];
    /* the moves settled whole are done with, and those with no record left
     * above the claimed line once it is settled */
    snprintf(sql, sizeof sql,
             "DELETE FROM moved WHERE feed = %d AND (hi < %lld OR (oldest_ms = %lld AND %lld < "
             "%lld))",
             f, (long long)line, (long long)MOVED_NONE, (long long)claimed, (long long)line);
    if (sqlite3_exec(q->db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return -1;
    char only[128] = "";
    if (ids)
        snprintf(only, sizeof only, " AND (oldest_ms < %lld OR (lo <= %lld AND oldest_ms < %lld))",
                 (long long)cutoff, (long long)claimed, (long long)MOVED_NONE);
    sqlite3_stmt *rows = NULL, *s = NULL;
    snprintf(sql, sizeof sql,
             "SELECT lo, hi FROM moved WHERE feed = %d AND lo >= ?1 AND lo <= %lld%s "
             "ORDER BY lo LIMIT %d",
             f, (long long)to, only, MOVED_PAGE);
    int rc = sqlite3_prepare_v2(q->db, sql, -1, &rows, NULL);
    snprintf(sql, sizeof sql,
             "SELECT id, received_ms FROM records_%s WHERE id >= ?1 AND id <= ?2 ORDER BY id",
             FEED_NAMES[f]);
    if (rc != SQLITE_OK || sqlite3_prepare_v2(q->db, sql, -1, &s, NULL) != SQLITE_OK)
        goto fail;
    /* the move that holds from, if any, then the later ones, a page of rows
     * at a time, read before they change (spans do not overlap) */
    int64_t first = 0;
    snprintf(sql, sizeof sql,
             "SELECT coalesce(max(lo), 0) FROM moved WHERE feed = %d AND lo <= %lld", f,
             (long long)from);
    sqlite3_stmt *at = NULL;
    if (sqlite3_prepare_v2(q->db, sql, -1, &at, NULL) != SQLITE_OK)
        goto fail;
    rc = sqlite3_step(at);
    if (rc == SQLITE_ROW)
        first = sqlite3_column_int64(at, 0);
    sqlite3_finalize(at);
    if (rc != SQLITE_ROW)
        goto fail;
    int64_t spans[MOVED_PAGE][2], next = first;
    size_t nspans;
    do {
        nspans = 0;
        sqlite3_bind_int64(rows, 1, next);
        while ((rc = sqlite3_step(rows)) == SQLITE_ROW) {
            spans[nspans][0] = sqlite3_column_int64(rows, 0);
            spans[nspans++][1] = sqlite3_column_int64(rows, 1);
        }
        sqlite3_reset(rows);
        if (rc != SQLITE_DONE)
            goto fail;
        for (size_t k = 0; k < nspans; k++) {
            next = spans[k][0] + 1;
            if (spans[k][1] < from)
                continue; /* the one before from, ending before it */
            sqlite3_bind_int64(s, 1, spans[k][0] > line ? spans[k][0] : line);
            sqlite3_bind_int64(s, 2, spans[k][1]);
            int64_t oldest = MOVED_NONE; /* of the unclaimed records that stay */
            int kept = 0;                /* records that stay, claimed or not */
            while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                int64_t id = sqlite3_column_int64(s, 0), t = sqlite3_column_int64(s, 1);
                if (ids && id > claimed && t < cutoff) {
                    if (*n == room)
                        break; /* the next sweep goes on */
                    ids[(*n)++] = id;
                    continue;
                }
                kept = 1;
                if (id > claimed && t < oldest)
                    oldest = t;
            }
            sqlite3_reset(s);
            if (rc == SQLITE_ROW)
                goto done;
            if (rc != SQLITE_DONE)
                goto fail;
            if (!kept)
                snprintf(sql, sizeof sql, "DELETE FROM moved WHERE feed = %d AND lo = %lld", f,
                         (long long)spans[k][0]);
            else
                snprintf(sql, sizeof sql,
                         "UPDATE moved SET oldest_ms = %lld WHERE feed = %d AND lo = %lld",
                         (long long)oldest, f, (long long)spans[k][0]);
            if (sqlite3_exec(q->db, sql, NULL, NULL, NULL) != SQLITE_OK)
                goto fail;
        }
    } while (nspans == MOVED_PAGE);
done:
    sqlite3_finalize(s);
    sqlite3_finalize(rows);
    return 0;
fail:
    sqlite3_finalize(s);
    sqlite3_finalize(rows);
    return -1;
}

/* Dead letters or records mapped again: the records (queue_move) are deleted
 * first, each still there and in no batch, else nothing happens; then the
 * mapping is stored and the dead letters deleted as for a commit. */
static enum queue_status apply_requeue(queue *q, struct op *op, int64_t now, int64_t depth)
{
    enum feed f = op->u.commit.from_feed;
    size_t n = op->u.commit.nrecord_ids;
    int64_t lo = INT64_MAX, hi = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t id = op->u.commit.record_ids[i];
        int64_t before = op->depth_delta[f];
        if (id <= q->ring[f].claimed)
            return QUEUE_CHANGED;
        int rc = delete_record(q, op, id, (int)f, now);
        if (rc != SQLITE_OK)
            return status_of(rc);
        if (op->depth_delta[f] == before)
            return QUEUE_CHANGED; /* gone meanwhile (expired) */
        lo = id < lo ? id : lo;
        hi = id > hi ? id : hi;
    }
    /* records moved here before, and now on again, leave their moves */
    size_t none;
    if (n && moved_update(q, (int)f, lo, hi, 0, NULL, 0, &none) != 0)
        return status_of(sqlite3_errcode(q->db));
    return apply_commit(q, op, now, depth);
}

static enum queue_status apply_batches(queue *q, struct op *op, int64_t now)
{
    enum queue_status st = finish_batches(q, op, op->u.batches.ids, op->u.batches.n, now,
                                          op->kind == OP_ACK ? record_delivered : record_to_dead);
    if (st != QUEUE_OK)
        return st;
    if (op->u.batches.settled_below > 0)
        return raise_line(q, op->u.batches.feed, op->u.batches.settled_below);
    return QUEUE_OK;
}

/* The detail of feed f's events that expired unclaimed: why, when the feed is
 * paused (no credentials, or refused ones). */
static void expired_detail(queue *q, int f, char *out, size_t size)
{
    str_copy(out, size, QUEUE_MAX_AGE_DETAIL);
    sqlite3_stmt *s = q->st[S_FEED_STATE_GET];
    sqlite3_bind_int(s, 1, f);
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0)) {
        size_t n = strlen(out);
        snprintf(out + n, size - n, "; the feed is paused: %s",
                 (const char *)sqlite3_column_text(s, 0));
    }
    sqlite3_reset(s);
}

static enum queue_status records_to_dead(queue *q, struct op *op, const int64_t *ids, size_t n,
                                         int f, int64_t now)
{
    for (size_t i = 0; i < n; i++) {
        int rc = record_to_dead(q, op, ids[i], f, now);
        if (rc != SQLITE_OK)
            return status_of(rc);
    }
    return QUEUE_OK;
}

static enum queue_status apply_expire(queue *q, struct op *op, int64_t now)
{
    /* only unclaimed records: those in batches belong to the sender, and the
     * claimed ones no batch holds are delivered */
    int64_t *ids = malloc((EXPIRE_SLICE + 1) * sizeof(*ids));
    sqlite3_stmt *s = NULL;
    enum queue_status st = QUEUE_ERROR;
    if (!ids)
        goto done;
    op->u.batches.reason = DEAD_MAX_AGE;
    char detail[256];
    op->u.batches.detail = detail;
    size_t moved = 0, by_feed[FEED_COUNT] = {0};
    for (int f = 0; f < FEED_COUNT && moved < EXPIRE_SLICE; f++) {
        expired_detail(q, f, detail, sizeof detail);
        /* Records are stamped when stored and ids ascend, so the expired ones
         * come first: the scan stops at the first one young enough (a WHERE on
         * received_ms would read a whole backlog when none has expired). */
        char sql[160];
        snprintf(sql, sizeof sql,
                 "SELECT id, received_ms FROM records_%s WHERE id > ?2 ORDER BY id LIMIT ?1",
                 FEED_NAMES[f]);
        if (sqlite3_prepare_v2(q->db, sql, -1, &s, NULL) != SQLITE_OK)
            goto done;
        sqlite3_bind_int64(s, 1, (sqlite3_int64)(EXPIRE_SLICE - moved));
        sqlite3_bind_int64(s, 2, q->ring[f].claimed);
        size_t n = 0;
        while (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int64(s, 1) < op->u.expire.cutoff_ms)
            ids[n++] = sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
        s = NULL;
        enum queue_status dead = records_to_dead(q, op, ids, n, f, now);
        if (dead != QUEUE_OK) {
            st = dead;
            goto done;
        }
        moved += n;
        by_feed[f] = n;
        /* then the records moved in from another feed, which the scan above
         * meets only once every record before them has gone */
        if (moved_update(q, f, 0, INT64_MAX, op->u.expire.cutoff_ms, ids, EXPIRE_SLICE - moved,
                         &n) != 0) {
            st = status_of(sqlite3_errcode(q->db));
            goto done;
        }
        dead = records_to_dead(q, op, ids, n, f, now);
        if (dead != QUEUE_OK) {
            st = dead;
            goto done;
        }
        moved += n;
        by_feed[f] += n;
    }
    memcpy(op->u.expire.moved, by_feed, sizeof by_feed);
    st = QUEUE_OK;
done:
    op->u.batches.detail = NULL; /* detail is this function's */
    sqlite3_finalize(s);
    free(ids);
    return st;
}

static enum queue_status apply_feed_state(queue *q, struct op *op, int64_t now)
{
    sqlite3_stmt *s;
    if (op->u.feed_state.reason) {
        s = q->st[S_FEED_STATE_SET];
        sqlite3_bind_int(s, 1, (int)op->u.feed_state.feed);
        sqlite3_bind_text(s, 2, op->u.feed_state.reason, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, now);
    } else {
        s = q->st[S_FEED_STATE_CLEAR];
        sqlite3_bind_int(s, 1, (int)op->u.feed_state.feed);
    }
    int rc = step_done(s);
    return rc == SQLITE_OK ? QUEUE_OK : status_of(rc);
}

static enum queue_status forget_event_names(queue *q, struct op *op)
{
    *op->u.event_names.forgotten = 0;
    if (!op->u.event_names.forget) {
        int rc = sqlite3_exec(q->db, "DELETE FROM event_names", NULL, NULL, NULL);
        if (rc != SQLITE_OK)
            return status_of(rc);
        *op->u.event_names.forgotten = (size_t)sqlite3_changes(q->db);
        return QUEUE_OK;
    }
    sqlite3_stmt *s = q->st[S_EVENT_NAME_FORGET];
    for (size_t i = 0; i < op->u.event_names.n; i++) {
        sqlite3_bind_text(s, 1, op->u.event_names.forget[i], -1, SQLITE_STATIC);
        int rc = step_done(s);
        if (rc != SQLITE_OK)
            return status_of(rc);
        int changes = sqlite3_changes(q->db);
        *op->u.event_names.forgotten += (size_t)changes;
        if (op->u.event_names.found)
            op->u.event_names.found[i] = changes > 0;
    }
    return QUEUE_OK;
}

/* The WHERE clause of a dead-letter filter, bound by dead_bind. */
#define DEAD_WHERE                                                                                 \
    "WHERE (?1 = 0 OR id = ?1) AND (?2 IS NULL OR reason = ?2) AND (?3 = 0 OR at_ms < ?3)"

static void dead_bind(sqlite3_stmt *s, const struct dead_filter *f)
{
    sqlite3_bind_int64(s, 1, f->id);
    if (f->reason)
        sqlite3_bind_text(s, 2, f->reason, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(s, 2);
    sqlite3_bind_int64(s, 3, f->before_ms);
}

/* One page of a purge: the matching dead letters among the next PURGE_PAGE
 * after op->u.purge.after, which moves past them. A page of PURGE_PAGE
 * matches read on through every dead letter that did not match (a table of
 * millions, none of them old enough) while the service's commits waited. */
static enum queue_status apply_purge(queue *q, struct op *op)
{
    int64_t after = *op->u.purge.after, through = 0;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(q->db,
                           "SELECT max(id) FROM (SELECT id FROM dead WHERE id > ?1 ORDER BY id "
                           "LIMIT ?2)",
                           -1, &s, NULL) != SQLITE_OK)
        return QUEUE_ERROR;
    sqlite3_bind_int64(s, 1, after);
    sqlite3_bind_int(s, 2, PURGE_PAGE);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW)
        through = sqlite3_column_int64(s, 0); /* NULL: none left, 0 */
    sqlite3_finalize(s);
    if (rc != SQLITE_ROW)
        return status_of(rc);
    *op->u.purge.deleted = 0;
    if (through == 0) {
        *op->u.purge.after = INT64_MAX;
        return QUEUE_OK;
    }
    if (sqlite3_prepare_v2(q->db, "DELETE FROM dead " DEAD_WHERE " AND id > ?4 AND id <= ?5", -1,
                           &s, NULL) != SQLITE_OK)
        return QUEUE_ERROR;
    dead_bind(s, op->u.purge.f);
    sqlite3_bind_int64(s, 4, after);
    sqlite3_bind_int64(s, 5, through);
    rc = sqlite3_step(s);
    sqlite3_finalize(s);
    if (rc != SQLITE_DONE)
        return status_of(rc);
    *op->u.purge.deleted = (size_t)sqlite3_changes(q->db);
    *op->u.purge.after = through;
    op->dead_delta -= sqlite3_changes(q->db);
    return QUEUE_OK;
}

static enum queue_status apply(queue *q, struct op *op, int64_t now, int64_t depth)
{
    switch (op->kind) {
    case OP_COMMIT:
        return apply_commit(q, op, now, depth);
    case OP_REQUEUE:
        return apply_requeue(q, op, now, depth);
    case OP_PERSIST:
    case OP_SPLIT:
        return apply_persist(q, op, now);
    case OP_ACK:
    case OP_DEAD_BATCH:
        return apply_batches(q, op, now);
    case OP_EXPIRE:
        return apply_expire(q, op, now);
    case OP_FEED_STATE:
        return apply_feed_state(q, op, now);
    case OP_EVENT_NAMES:
        return add_event_names(q, op->u.event_names.names, op->u.event_names.n);
    case OP_FORGET_NAMES:
        return forget_event_names(q, op);
    case OP_PURGE:
        return apply_purge(q, op);
    }
    return QUEUE_ERROR;
}

/* ---- writer: housekeeping ----------------------------------------------- */

/* Deletes the dedup log's rows older than the window, one slice per call.
 * Rowid order is time order (one writer, one clock), so the boundary is found by bisection. */
static void prune_dedup(queue *q, int64_t now)
{
    if (q->opt.dedup_window_ms <= 0)
        return;
    int64_t cutoff = now - q->opt.dedup_window_ms;
    sqlite3_stmt *s = NULL;
    int64_t lo = 0, hi = 0, oldest = INT64_MAX;
    /* Two subqueries: SQLite finds a lone min() or max() of the rowid in one
     * seek, but min() and max() together in one query scan the whole table,
     * millions of rows with an hour's window, every second. */
    if (sqlite3_prepare_v2(q->db,
                           "SELECT (SELECT id FROM dedup_log ORDER BY id LIMIT 1),"
                           " (SELECT at_ms FROM dedup_log ORDER BY id LIMIT 1),"
                           " (SELECT max(id) FROM dedup_log)",
                           -1, &s, NULL) != SQLITE_OK)
        return;
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL) {
        lo = sqlite3_column_int64(s, 0);
        oldest = sqlite3_column_int64(s, 1);
        hi = sqlite3_column_int64(s, 2);
    }
    sqlite3_finalize(s);
    if (hi == 0 || oldest >= cutoff)
        return; /* empty, or nothing older than the window */
    if (sqlite3_prepare_v2(q->db, "SELECT at_ms FROM dedup_log WHERE id >= ?1 ORDER BY id LIMIT 1",
                           -1, &s, NULL) != SQLITE_OK)
        return;
    /* first id whose at_ms >= cutoff lies in (lo-1, hi+1] */
    int64_t a = lo, b = hi + 1;
    while (a < b) {
        int64_t mid = a + (b - a) / 2;
        sqlite3_bind_int64(s, 1, mid);
        int64_t at = INT64_MAX;
        if (sqlite3_step(s) == SQLITE_ROW)
            at = sqlite3_column_int64(s, 0);
        sqlite3_reset(s);
        if (at < cutoff)
            a = mid + 1;
        else
            b = mid;
    }
    sqlite3_finalize(s);
    int64_t end = a;
    if (end <= lo)
        return;
    /* rows up to PRUNE_SLICE_IDS ids (length() reads no overflow page) */
    if (sqlite3_prepare_v2(q->db,
                           "SELECT id, length(fingerprints) FROM dedup_log WHERE id >= ?1 AND "
                           "id < ?2 ORDER BY id",
                           -1, &s, NULL) != SQLITE_OK)
        return;
    sqlite3_bind_int64(s, 1, lo);
    sqlite3_bind_int64(s, 2, end);
    int64_t ids = 0;
    while (sqlite3_step(s) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(s, 0);
        if (id > lo && ids >= PRUNE_SLICE_IDS) {
            end = id;
            break;
        }
        ids += sqlite3_column_int64(s, 1) / DEDUP_FP_BYTES;
    }
    sqlite3_finalize(s);
    char sql[96], err[ERR_LEN];
    snprintf(sql, sizeof sql, "DELETE FROM dedup_log WHERE id < %lld", (long long)end);
    if (exec(q->db, sql, err, sizeof err) != 0)
        log_warn("cannot prune dedup ids", LOG_S("error", err));
}

static int64_t pragma_value(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *s;
    int64_t v = 0;
    if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) != SQLITE_OK)
        return 0;
    if (sqlite3_step(s) == SQLITE_ROW)
        v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return v;
}

/* Calls fn for every batch not finished, claim by claim, in id order. fn
 * returns non-zero to stop, and that is returned; -1 on a storage error or an
 * unreadable claim. */
static int each_live_batch(sqlite3 *db,
                           int (*fn)(void *ctx, int64_t id, int feed, const struct claim_batch *b),
                           void *ctx)
{
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(db,
                           "SELECT c.id, c.feed, c.batches, d.done FROM claims AS c "
                           "LEFT JOIN claim_done AS d ON d.id = c.id ORDER BY c.id",
                           -1, &s, NULL) != SQLITE_OK)
        return -1;
    int rc, out = 0;
    while (out == 0 && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        int64_t row = sqlite3_column_int64(s, 0);
        struct claim_batch *b;
        long nb = claim_parse(sqlite3_column_blob(s, 2), (size_t)sqlite3_column_bytes(s, 2), &b);
        if (nb < 0) {
            log_error(claim_parse_failure(nb), LOG_I("claim", row));
            out = -1;
            break;
        }
        const unsigned char *done = sqlite3_column_blob(s, 3);
        size_t nd = (size_t)sqlite3_column_bytes(s, 3);
        for (long x = 0; x < nb && out == 0; x++) {
            if (!claim_finished(done, nd, (size_t)x))
                out = fn(ctx, claim_batch_id(row, (size_t)x), sqlite3_column_int(s, 1), &b[x]);
        }
        free(b);
    }
    sqlite3_finalize(s);
    return out ? out : rc == SQLITE_DONE ? 0 : -1;
}

static int add_live_records(void *ctx, int64_t id, int feed, const struct claim_batch *b)
{
    (void)id;
    struct queue_gauges *g = ctx;
    if (feed >= 0 && feed < FEED_COUNT)
        g->depth[feed] += (int64_t)b->nrecords;
    return 0;
}

/* Feed f's settled line and claimed id as stored (either pointer may be
 * NULL), 0 when none yet. -1 when they cannot be read: a caller must not take
 * the zeros for the stored values. */
static int read_settled(sqlite3 *db, enum feed f, int64_t *below, int64_t *claimed)
{
    sqlite3_stmt *s;
    int64_t v[2] = {0, 0};
    if (sqlite3_prepare_v2(db, "SELECT below, claimed FROM settled WHERE feed = ?1", -1, &s,
                           NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int(s, 1, (int)f);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        v[0] = sqlite3_column_int64(s, 0);
        v[1] = sqlite3_column_int64(s, 1);
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return -1;
    if (below)
        *below = v[0];
    if (claimed)
        *claimed = v[1];
    return 0;
}

/* When the oldest record of feed f at or above its settled line came, but for
 * moved records in batches: the first in id order (first: F_OLDEST), or one
 * moved in from another feed and not claimed yet (moved: MOVED_OLDEST_SQL;
 * NULL for a queue opened read-only that has no such table yet); 0 for none.
 * *claimed_moved: whether moved records above the settled line are claimed,
 * which the first in id order may not be the oldest of either (see
 * batches_oldest). */
static int64_t oldest_of(sqlite3_stmt *first, sqlite3_stmt *moved, enum feed f, int64_t line,
                         int64_t claimed, int *claimed_moved)
{
    *claimed_moved = 0;
    sqlite3_bind_int64(first, 1, line);
    int64_t v = sqlite3_step(first) == SQLITE_ROW ? sqlite3_column_int64(first, 0) : 0;
    sqlite3_reset(first);
    if (moved) {
        sqlite3_bind_int(moved, 1, (int)f);
        sqlite3_bind_int64(moved, 2, line);
        sqlite3_bind_int64(moved, 3, claimed);
        if (sqlite3_step(moved) == SQLITE_ROW) {
            int64_t m = sqlite3_column_type(moved, 0) == SQLITE_NULL
                            ? MOVED_NONE
                            : sqlite3_column_int64(moved, 0);
            if (m != MOVED_NONE && (!v || m < v))
                v = m;
            *claimed_moved = sqlite3_column_int(moved, 1);
        }
        sqlite3_reset(moved);
    }
    return v;
}

static int oldest_batch(void *ctx, int64_t id, int feed, const struct claim_batch *b)
{
    (void)id;
    int64_t *oldest = ctx;
    if (feed >= 0 && feed < FEED_COUNT && b->oldest_ms > 0 &&
        (!oldest[feed] || b->oldest_ms < oldest[feed]))
        oldest[feed] = b->oldest_ms;
    return 0;
}

/* Lowers oldest[f] of each feed with claimed_moved[f] to the oldest record of
 * the feed's batches waiting to be sent (their records are claimed: a moved
 * one among them may be older than the feed's first record). The batches are
 * read only then: while records that moved wait in batches. */
static void batches_oldest(sqlite3 *db, int64_t oldest[FEED_COUNT],
                           const int claimed_moved[FEED_COUNT])
{
    int any = 0;
    for (int f = 0; f < FEED_COUNT; f++)
        any |= claimed_moved[f];
    int64_t in_batches[FEED_COUNT] = {0};
    if (!any || each_live_batch(db, oldest_batch, in_batches) != 0)
        return;
    for (int f = 0; f < FEED_COUNT; f++) {
        if (claimed_moved[f] && in_batches[f] && (!oldest[f] || in_batches[f] < oldest[f]))
            oldest[f] = in_batches[f];
    }
}

static void refresh_oldest(queue *q)
{
    int64_t oldest[FEED_COUNT];
    int claimed_moved[FEED_COUNT];
    for (int f = 0; f < FEED_COUNT; f++)
        oldest[f] = oldest_of(q->fst[f][F_OLDEST], q->st[S_MOVED_OLDEST], (enum feed)f,
                              q->ring[f].line, q->ring[f].claimed, &claimed_moved[f]);
    batches_oldest(q->db, oldest, claimed_moved);
    pthread_mutex_lock(&q->mu);
    memcpy(q->gauges.oldest_ms, oldest, sizeof oldest);
    pthread_mutex_unlock(&q->mu);
}

static int count_rows(sqlite3 *db, struct queue_gauges *g)
{
    sqlite3_stmt *s;
    memset(g->depth, 0, sizeof g->depth);
    for (int f = 0; f < FEED_COUNT; f++) {
        /* the records not claimed yet, then those in batches */
        int64_t claimed;
        if (read_settled(db, (enum feed)f, NULL, &claimed) != 0 ||
            prepare_feed(db, FEED_STMTS[F_COUNT_RANGE], (enum feed)f, &s) != 0)
            return -1;
        sqlite3_bind_int64(s, 1, claimed);
        sqlite3_bind_int64(s, 2, INT64_MAX);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW)
            g->depth[f] = sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
        if (rc != SQLITE_ROW) /* a count has its row: anything else failed */
            return -1;
    }
    if (each_live_batch(db, add_live_records, g) != 0)
        return -1;
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM dead", -1, &s, NULL) != SQLITE_OK)
        return -1;
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW)
        g->dead = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return rc == SQLITE_ROW ? 0 : -1;
}

/* ---- writer: the loop --------------------------------------------------- */

static int on_wal_commit(void *arg, sqlite3 *db, const char *name, int pages)
{
    (void)db;
    (void)name;
    ((queue *)arg)->wal_pages = pages;
    return SQLITE_OK;
}

static void *checkpointer_main(void *arg)
{
    queue *q = arg;
    pthread_setname_np(pthread_self(), "queue-checkpt");
    int64_t checkpointer_logged_ms = 0; /* see log_due */
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while ((!q->checkpoint_requested || q->restart_pending) && !q->stopping)
            pthread_cond_wait(&q->checkpoint_wanted, &q->mu);
        if (q->stopping)
            break; /* queue_free checkpoints once the writer has stopped */
        q->checkpoint_requested = 0;
        q->checkpoint_running = 1;
        pthread_mutex_unlock(&q->mu);
        int rc = sqlite3_wal_checkpoint_v2(q->checkpoint_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL,
                                           NULL);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY && log_due(&checkpointer_logged_ms))
            log_warn("queue: checkpoint failed", LOG_S("error", sqlite3_errmsg(q->checkpoint_db)));
        pthread_mutex_lock(&q->mu);
        q->checkpoint_running = 0;
        pthread_cond_broadcast(&q->checkpoint_idle);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

static void request_checkpoint(queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->checkpoint_requested = 1;
    pthread_cond_signal(&q->checkpoint_wanted);
    pthread_mutex_unlock(&q->mu);
}

/* After a commit: asks the checkpoint thread to copy the WAL back or, once the
 * WAL has reached its limit, copies the rest itself so that a following commit
 * starts the WAL over. A passive checkpoint never waits for readers: while a
 * long read holds the WAL, commits go on and the WAL grows until it ends. */
static void checkpoint(queue *q)
{
    if (q->wal_pages < q->checkpoint_pages)
        return;
    if (q->wal_pages < q->wal_limit_pages) {
        request_checkpoint(q);
        return;
    }
    /* SQLite answers BUSY at once while another checkpoint runs: let the
     * checkpoint thread finish its pass and hold off its next one */
    pthread_mutex_lock(&q->mu);
    q->restart_pending = 1;
    while (q->checkpoint_running)
        pthread_cond_wait(&q->checkpoint_idle, &q->mu);
    pthread_mutex_unlock(&q->mu);
    int64_t now = clock_mono_ms();
    int wait_for_readers = now - q->restart_busy_ms >= RESTART_RETRY_MS;
    int rc;
    if (wait_for_readers) {
        /* RESTART waits for the readers through the busy handler */
        sqlite3_busy_timeout(q->db, RESTART_WAIT_MS);
        rc = sqlite3_wal_checkpoint_v2(q->db, NULL, SQLITE_CHECKPOINT_RESTART, NULL, NULL);
        sqlite3_busy_timeout(q->db, BUSY_TIMEOUT_MS);
        if (rc == SQLITE_BUSY)
            q->restart_busy_ms = now;
    } else {
        rc = sqlite3_wal_checkpoint_v2(q->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    }
    pthread_mutex_lock(&q->mu);
    q->restart_pending = 0;
    pthread_mutex_unlock(&q->mu);
    if (rc != SQLITE_OK && rc != SQLITE_BUSY && log_due(&q->checkpoint_logged_ms))
        log_warn("queue: checkpoint failed", LOG_S("error", sqlite3_errmsg(q->db)));
    now = clock_mono_ms();
    if (q->wal_pages >= 2 * q->wal_limit_pages &&
        now - q->restart_logged_ms >= RESTART_LOG_EVERY_MS) {
        q->restart_logged_ms = now;
        log_warn("queue: a long read keeps the WAL from starting over; it grows until the read "
                 "ends",
                 LOG_I("wal_pages", q->wal_pages) LOG_I("limit_pages", q->wal_limit_pages));
    }
}

/* A commit that did not happen reports nothing stored. */
static void reset_commit(struct op *op)
{
    if (op->kind != OP_COMMIT && op->kind != OP_REQUEUE)
        return;
    memset(op->u.commit.res, 0, sizeof(*op->u.commit.res));
    for (size_t i = 0; i < op->u.commit.m->ndead; i++)
        op->u.commit.m->dead[i].stored = 0;
}

static int load_rings(queue *q);

/* The columns of count_deltas follow enum feed. */
_Static_assert(FEED_IOS == 0 && FEED_ANDROID == 1 && FEED_WEB == 2 && FEED_UNBOUND == 3 &&
                   FEED_COUNT == 4,
               "count_deltas has a column per feed, in this order");

/* A command's group, about to commit: what its operations changed in the
 * counts, for the service beside it (see add_deltas). */
static int note_deltas(queue *q, const struct op *ops)
{
    int64_t depth[FEED_COUNT] = {0}, dead = 0;
    int any = 0;
    for (const struct op *op = ops; op; op = op->next) {
        if (op->status != QUEUE_OK)
            continue;
        for (int f = 0; f < FEED_COUNT; f++)
            depth[f] += op->depth_delta[f];
        dead += op->dead_delta;
    }
    for (int f = 0; f < FEED_COUNT; f++)
        any |= depth[f] != 0;
    if (!any && dead == 0)
        return 0;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(q->db,
                           "INSERT INTO count_deltas(ios, android, web, unbound, dead) "
                           "VALUES(?1, ?2, ?3, ?4, ?5)",
                           -1, &s, NULL) != SQLITE_OK)
        return -1;
    for (int f = 0; f < FEED_COUNT; f++)
        sqlite3_bind_int64(s, f + 1, depth[f]);
    sqlite3_bind_int64(s, FEED_COUNT + 1, dead);
    int rc = step_done(s);
    sqlite3_finalize(s);
    return rc == SQLITE_OK ? 0 : -1;
}

/* The service: the rows commands added to count_deltas since it last looked,
 * added to its counts; in a write transaction (writing), those rows are
 * deleted. Counting the rows again instead read every record waiting, in the
 * writer, after each command's page: with millions waiting, requests waited
 * seconds for each page of a `dlq requeue`. */
static int add_deltas(queue *q, int writing)
{
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(q->db,
                           "SELECT id, ios, android, web, unbound, dead FROM count_deltas "
                           "WHERE id > ?1 ORDER BY id",
                           -1, &s, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_int64(s, 1, q->deltas_added);
    int64_t depth[FEED_COUNT] = {0}, dead = 0, last = q->deltas_added;
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        last = sqlite3_column_int64(s, 0);
        for (int f = 0; f < FEED_COUNT; f++)
            depth[f] += sqlite3_column_int64(s, f + 1);
        dead += sqlite3_column_int64(s, FEED_COUNT + 1);
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_DONE)
        return -1;
    if (writing && last > 0) {
        /* should the transaction not commit, they are deleted with a later one */
        if (sqlite3_prepare_v2(q->db, "DELETE FROM count_deltas WHERE id <= ?1", -1, &s, NULL) !=
            SQLITE_OK)
            return -1;
        sqlite3_bind_int64(s, 1, last);
        rc = step_done(s);
        sqlite3_finalize(s);
        if (rc != SQLITE_OK)
            return -1;
    }
    /* a command only adds to the feeds (requeue), and each dead letter it
     * takes out goes to a feed, back to the store (its rules failed again),
     * or nowhere (purged, or dropped by the rules) */
    int64_t requeued = 0;
    int odd = 0;
    for (int f = 0; f < FEED_COUNT; f++) {
        requeued += depth[f];
        odd |= depth[f] < 0;
    }
    int64_t removed = -(dead + requeued);
    if (odd || removed < 0) {
        log_error("counts changed by a command beside the service do not add up; "
                  "tributary_events_requeued_total and tributary_dead_letters_removed_total "
                  "leave them out (a command of another version?)",
                  LOG_I("dead_letters", (long long)dead) LOG_I("requeued", (long long)requeued));
        requeued = removed = 0;
    }
    if (last > q->deltas_added)
        log_info("counts changed by a command beside the service (tributary dlq requeue or "
                 "purge)",
                 LOG_I("dead_letters", (long long)dead) LOG_I("requeued", (long long)requeued)
                     LOG_I("removed", (long long)removed) LOG_I("ios", (long long)depth[FEED_IOS])
                         LOG_I("android", (long long)depth[FEED_ANDROID])
                             LOG_I("web", (long long)depth[FEED_WEB])
                                 LOG_I("unbound", (long long)depth[FEED_UNBOUND]));
    q->deltas_added = last;
    pthread_mutex_lock(&q->mu);
    for (int f = 0; f < FEED_COUNT; f++)
        q->gauges.depth[f] += depth[f];
    q->gauges.dead += dead;
    q->gauges.requeued += requeued;
    q->gauges.letters_removed += removed;
    pthread_mutex_unlock(&q->mu);
    return 0;
}

/* Inside a transaction (a write transaction: writing). When another process
 * (`tributary dlq requeue` or `purge` beside the service) committed since the
 * last look, where the rings stand is read again, so that ids are not reused,
 * and the service adds what it changed to its depth and dead-letter counts (a
 * command counts again now and then: see recount). On an error nothing
 * changes and the next look reads them again. */
static enum queue_status follow_other_writers(queue *q, int writing)
{
    sqlite3_stmt *s = q->st[S_DATA_VERSION];
    int rc = sqlite3_step(s);
    int64_t version = rc == SQLITE_ROW ? sqlite3_column_int64(s, 0) : -1;
    sqlite3_reset(s);
    if (rc != SQLITE_ROW)
        return status_of(sqlite3_errcode(q->db));
    if (version == q->data_version)
        return QUEUE_OK;
    if (load_rings(q) != 0 || (!q->opt.existing && add_deltas(q, writing) != 0)) {
        log_error("queue: cannot read what another process changed",
                  LOG_S("error", sqlite3_errmsg(q->db)));
        return status_of(sqlite3_errcode(q->db));
    }
    q->data_version = version;
    return QUEUE_OK;
}

/* Whether storage works, as the last commit found (/readyz reports it). */
static void set_healthy(queue *q, int healthy)
{
    pthread_mutex_lock(&q->mu);
    int was = q->healthy;
    q->healthy = healthy;
    pthread_mutex_unlock(&q->mu);
    if (healthy && !was)
        log_info("queue: storage works again");
}

/* A command's counts, which the service beside it changes, are read again
 * this often, before a group and outside its write transaction, in which the
 * service would wait for the count (seconds, with millions waiting). A
 * command's queue.max_depth is so as of then. */
#define COMMAND_RECOUNT_MS 10000

static void recount(queue *q)
{
    int64_t now = clock_mono_ms();
    if (now - q->counted_ms < COMMAND_RECOUNT_MS)
        return;
    struct queue_gauges counted;
    char err[ERR_LEN];
    if (exec(q->db, "BEGIN", err, sizeof err) != 0)
        return;
    int rc = count_rows(q->db, &counted);
    (void)exec(q->db, rc == 0 ? "COMMIT" : "ROLLBACK", err, sizeof err);
    if (rc != 0)
        return; /* the counts of before, and the next group tries again */
    q->counted_ms = now;
    pthread_mutex_lock(&q->mu);
    memcpy(q->gauges.depth, counted.depth, sizeof counted.depth);
    q->gauges.dead = counted.dead;
    pthread_mutex_unlock(&q->mu);
}

static void run_group(queue *q, struct op *ops)
{
    char err[ERR_LEN];
    int64_t now = clock_wall_ms();
    enum queue_status group = QUEUE_OK;
    if (q->opt.existing)
        recount(q);
    /* a transaction an earlier group could not roll back (out of memory to
     * parse the statement) must not take this group's writes along */
    if (!sqlite3_get_autocommit(q->db) && exec(q->db, "ROLLBACK", err, sizeof err) != 0)
        log_error("queue: cannot roll back a failed transaction", LOG_S("error", err));
    if (exec(q->db, "BEGIN IMMEDIATE", err, sizeof err) != 0) {
        log_error("queue: cannot begin a transaction", LOG_S("error", err));
        group = status_of(sqlite3_errcode(q->db));
    } else {
        group = follow_other_writers(q, 1);
    }
    /* the rings as the group found them, and as each operation found them */
    struct feed_ring group_rings[FEED_COUNT], op_rings[FEED_COUNT];
    memcpy(group_rings, q->ring, sizeof group_rings);
    int64_t depth = depth_total(q);
    for (struct op *op = ops; op && group == QUEUE_OK; op = op->next) {
        memset(op->depth_delta, 0, sizeof op->depth_delta);
        op->dead_delta = 0;
        op->nadded = 0;
        if (exec(q->db, "SAVEPOINT op", err, sizeof err) != 0) {
            group = QUEUE_ERROR;
            break;
        }
        memcpy(op_rings, q->ring, sizeof op_rings);
        op->status = apply(q, op, now, depth);
        if (op->status == QUEUE_OK) {
            for (int f = 0; f < FEED_COUNT; f++)
                depth += op->depth_delta[f];
            if (exec(q->db, "RELEASE op", err, sizeof err) != 0) {
                /* the transaction is gone: nothing of this group may commit */
                group = status_of(sqlite3_errcode(q->db));
                group = group == QUEUE_OK ? QUEUE_ERROR : group;
                break;
            }
        } else {
            if (op->status == QUEUE_ERROR && sqlite3_errcode(q->db) != SQLITE_OK)
                log_error("queue: operation failed",
                          LOG_S("error", sqlite3_errmsg(q->db)) LOG_I("kind", op->kind));
            undo_sightings(q, op);
            reset_commit(op);
            memcpy(q->ring, op_rings, sizeof op_rings);
            if (sqlite3_get_autocommit(q->db)) {
                /* SQLite rolled the whole transaction back (disk full, I/O
                 * error): nothing of this group may commit */
                group = op->status;
                break;
            }
            /* the operation's rows must go: a savepoint that cannot be
             * undone leaves them in the transaction, which must not commit */
            if (exec(q->db, "ROLLBACK TO op", err, sizeof err) != 0 ||
                exec(q->db, "RELEASE op", err, sizeof err) != 0) {
                log_error("queue: cannot undo a failed operation; its group fails",
                          LOG_S("error", err));
                group = QUEUE_ERROR;
                break;
            }
        }
    }
    if (group == QUEUE_OK && q->opt.existing && note_deltas(q, ops) != 0) {
        log_error("queue: cannot note the counts changed", LOG_S("error", sqlite3_errmsg(q->db)));
        group = status_of(sqlite3_errcode(q->db));
        group = group == QUEUE_OK ? QUEUE_ERROR : group;
    }
    if (group == QUEUE_OK && exec(q->db, "COMMIT", err, sizeof err) != 0) {
        if (log_due(&q->commit_logged_ms))
            log_error("queue: commit failed", LOG_S("error", err));
        group = status_of(sqlite3_errcode(q->db));
    }
    if (group != QUEUE_OK && !sqlite3_get_autocommit(q->db) &&
        exec(q->db, "ROLLBACK", err, sizeof err) != 0)
        log_error("queue: cannot roll back a failed transaction; the next one tries again",
                  LOG_S("error", err));
    if (group != QUEUE_OK)
        memcpy(q->ring, group_rings, sizeof group_rings);

    /* healthy: the last group committed, none of its operations met a storage
     * error, and no acknowledgement failed (a full disk) or waits to be tried
     * again (see q->retry): a small commit can fit where they do not */
    int healthy = group == QUEUE_OK && !q->retry;
    for (struct op *op = ops; op && healthy; op = op->next)
        healthy = op->status != QUEUE_ERROR && !(op->async && op->status != QUEUE_OK);
    set_healthy(q, healthy);
    pthread_mutex_lock(&q->mu);
    if (group == QUEUE_OK) {
        q->gauges.commits++;
        for (struct op *op = ops; op; op = op->next)
            q->gauges.operations++;
    }
    for (struct op *op = ops; op; op = op->next) {
        if (group != QUEUE_OK) {
            op->status = group;
            undo_sightings(q, op);
            reset_commit(op);
        } else if (op->status == QUEUE_OK) {
            for (int f = 0; f < FEED_COUNT; f++)
                q->gauges.depth[f] += op->depth_delta[f];
            q->gauges.dead += op->dead_delta;
        }
    }
    dedup_gauges(q);
    pthread_mutex_unlock(&q->mu);
}

/* Called after each writer step that began at start_ms (monotonic). */
static void note_step(queue *q, const char *step, int64_t start_ms)
{
    int64_t now = clock_mono_ms(), took = now - start_ms;
    if (took < SLOW_STEP_MS)
        return;
    q->slow_steps++;
    if (now - q->slow_logged_ms < SLOW_LOG_EVERY_MS)
        return;
    log_warn("queue: slow storage step; requests wait for it",
             LOG_S("step", step) LOG_I("ms", took) LOG_I("slow_steps", q->slow_steps)
                 LOG_I("wal_pages", q->wal_pages));
    q->slow_logged_ms = now;
    q->slow_steps = 0;
}

/* Returns -1 when a compaction failed. */
static int compact(queue *q)
{
    int64_t page = pragma_value(q->db, "PRAGMA page_size");
    int64_t free_bytes = pragma_value(q->db, "PRAGMA freelist_count") * page;
    int64_t used_bytes = pragma_value(q->db, "PRAGMA page_count") * page - free_bytes;
    if (free_bytes < q->compact_min_free_bytes || used_bytes > COMPACT_MAX_USED_BYTES)
        return 0;
    char err[ERR_LEN];
    int64_t t0 = clock_mono_ms();
    /* the copy VACUUM builds goes to a temporary file, not to memory */
    int rc = exec(q->db, "PRAGMA temp_store=FILE; VACUUM", err, sizeof err);
    (void)sqlite3_exec(q->db, "PRAGMA temp_store=MEMORY", NULL, NULL, NULL);
    if (rc != 0) {
        log_warn("queue: cannot give the file's free space back; trying again in 10 minutes",
                 LOG_S("error", err));
        return -1;
    }
    log_info("queue: gave the file's free space back",
             LOG_I("freed_mib", (long long)(free_bytes >> 20))
                 LOG_I("used_mib", (long long)(used_bytes >> 20))
                     LOG_I("ms", (long long)(clock_mono_ms() - t0)));
    checkpoint(q); /* the rewritten file is in the WAL until then */
    return 0;
}

/* Appends op to what the writer takes next. Under q->mu. */
static void enqueue(queue *q, struct op *op)
{
    op->next = NULL;
    op->status = QUEUE_ERROR;
    if (q->pending_tail)
        q->pending_tail->next = op;
    else
        q->pending = op;
    q->pending_tail = op;
}

static int64_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (int64_t)st.st_size : 0;
}

/* Storage that failed a commit is tried, while no commit runs, with a write
 * of a row as it is (one page of meta written again, through the WAL): its
 * health, which /readyz reports, comes back once the disk has room or works
 * again, without waiting for a request or the sender's next commit. While
 * commits run, or failed operations wait to be tried again, theirs is the
 * word (a disk with a few KB free takes this write and not a request's, nor
 * the deletion of delivered batches). */
static void probe_storage(queue *q)
{
    char err[ERR_LEN];
    int ok = exec(q->db,
                  "BEGIN IMMEDIATE; UPDATE meta SET value = value WHERE key = 'schema_version'; "
                  "COMMIT",
                  err, sizeof err) == 0;
    if (!ok) {
        if (!sqlite3_get_autocommit(q->db))
            (void)exec(q->db, "ROLLBACK", err, sizeof err);
        return;
    }
    set_healthy(q, 1);
}

/* Free space is read every DISK_CHECK_EVERY_MS between commits (statvfs, a
 * microsecond: at 250 MB/s of writes, 12 MB pass between two reads); while it is under
 * opt.min_free_bytes, commits of new events are refused, so that what drains
 * the queue (persisting claims, acknowledgements, checkpoints) still has room.
 * The file's own free pages count as free (a drained backlog leaves most of
 * the file free, given back only past compact_min_free_bytes), once the disk
 * has room for the WAL to reach its limit: new events reach those pages
 * through the WAL. */
static void check_disk(queue *q)
{
    int say = q->opt.exclusive; /* the service's words, not a command's */
    struct statvfs fs;
    if (q->opt.min_free_bytes <= 0 || statvfs(q->path, &fs) != 0)
        return;
    int64_t free_bytes = (int64_t)fs.f_bavail * (int64_t)fs.f_frsize, file_free = 0;
    int64_t wal_room = 0;
    if (free_bytes < q->opt.min_free_bytes) {
        file_free = pragma_value(q->db, "PRAGMA freelist_count") * PAGE_SIZE;
        char wal[4200];
        snprintf(wal, sizeof wal, "%s-wal", q->path);
        int64_t wal_bytes = file_size(wal);
        int64_t most = ((int64_t)q->wal_limit_pages + CHECKPOINT_PAGES / 8) * PAGE_SIZE;
        wal_room = most > wal_bytes ? most - wal_bytes : 0;
    }
    int low = free_bytes < wal_room || free_bytes + file_free < q->opt.min_free_bytes;
    if (low && say && log_due(&q->disk_logged_ms))
        log_warn("queue: refusing new events: the disk of data_dir is nearly full; sending "
                 "goes on",
                 LOG_I("free_mib", (long long)(free_bytes >> 20))
                     LOG_I("file_free_mib", (long long)(file_free >> 20))
                         LOG_I("wal_room_mib", (long long)(wal_room >> 20))
                             LOG_I("min_free_mib", (long long)(q->opt.min_free_bytes >> 20)));
    else if (!low && q->disk_low && say)
        log_info("queue: the disk of data_dir has room again; taking new events",
                 LOG_I("free_mib", (long long)(free_bytes >> 20))
                     LOG_I("file_free_mib", (long long)(file_free >> 20)));
    q->disk_low = low;
    pthread_mutex_lock(&q->mu);
    q->gauges.disk_low = low;
    q->gauges.disk_free_bytes = free_bytes;
    pthread_mutex_unlock(&q->mu);
}

static void *writer_main(void *arg)
{
    queue *q = arg;
    pthread_setname_np(pthread_self(), "queue-writer");
    for (;;) {
        pthread_mutex_lock(&q->mu);
        while (!q->pending && !q->stopping) {
            cond_wait_ms(&q->work, &q->mu, 1000);
            if (!q->pending)
                break; /* time for housekeeping */
        }
        struct op *ops = q->pending;
        q->pending = q->pending_tail = NULL;
        int stopping = q->stopping;
        pthread_mutex_unlock(&q->mu);

        if (ops) {
            int64_t t0 = clock_mono_ms();
            run_group(q, ops);
            q->last_group_ms = clock_mono_ms();
            note_step(q, "commit", t0);
            struct op *finished = NULL;
            pthread_mutex_lock(&q->mu);
            for (struct op *op = ops, *next; op; op = next) {
                next = op->next;
                free(op->added);
                op->added = NULL;
                if (op->async) {
                    /* nobody waits for it: free it once the lock is released */
                    op->next = finished;
                    finished = op;
                } else {
                    op->done = 1; /* from here the submitter owns op again */
                }
            }
            pthread_cond_broadcast(&q->done);
            pthread_mutex_unlock(&q->mu);
            t0 = clock_mono_ms();
            checkpoint(q);
            note_step(q, "checkpoint", t0);
            for (struct op *op = finished, *next; op; op = next) {
                next = op->next;
                if (op->status != QUEUE_OK && !stopping) {
                    /* an acknowledgement that failed (a full disk): applied again
                     * is the same, and until it is, delivered batches stay held */
                    op->next = q->retry;
                    q->retry = op;
                    q->retry_at_ms = clock_mono_ms() + RETRY_OPS_MS;
                    continue;
                }
                if (op->status != QUEUE_OK)
                    log_error("queue: a background operation failed; its batches are sent "
                              "again after a restart",
                              LOG_S("status", queue_status_name(op->status)));
                free((void *)op->u.batches.ids);
                free(op);
            }
        }
        int64_t now = clock_mono_ms();
        if (now - q->last_disk_check_ms >= DISK_CHECK_EVERY_MS) {
            q->last_disk_check_ms = now;
            check_disk(q);
        }
        int retrying = q->retry != NULL; /* failed acknowledgements wait or are tried now */
        if (q->retry && (now >= q->retry_at_ms || stopping)) {
            struct op *retry = q->retry;
            q->retry = NULL;
            size_t n = 0;
            pthread_mutex_lock(&q->mu);
            for (struct op *op = retry, *next; op; op = next, n++) {
                next = op->next;
                enqueue(q, op);
            }
            pthread_mutex_unlock(&q->mu);
            if (log_due(&q->retry_logged_ms))
                log_warn("queue: acknowledgements failed (storage); trying them again",
                         LOG_I("operations", (long long)n));
        }
        if (now - q->last_gauges_ms >= GAUGES_EVERY_MS) {
            q->last_gauges_ms = now;
            pthread_mutex_lock(&q->mu);
            int healthy = q->healthy;
            pthread_mutex_unlock(&q->mu);
            if (!healthy && !retrying && now - q->last_group_ms >= GAUGES_EVERY_MS)
                probe_storage(q);
            /* a command's changes show in the gauges while no request comes */
            char err[ERR_LEN];
            if (exec(q->db, "BEGIN", err, sizeof err) == 0) {
                (void)follow_other_writers(q, 0);
                /* left open, the next group's BEGIN would fail */
                if (exec(q->db, "COMMIT", err, sizeof err) != 0)
                    (void)exec(q->db, "ROLLBACK", err, sizeof err);
            }
            refresh_oldest(q);
            pthread_mutex_lock(&q->mu);
            dedup_gauges(q);
            pthread_mutex_unlock(&q->mu);
            note_step(q, "gauges", now);
        }
        if (now - q->last_prune_ms >= PRUNE_EVERY_MS) {
            q->last_prune_ms = now;
            char err[ERR_LEN];
            int64_t t0 = clock_mono_ms();
            if (exec(q->db, "BEGIN IMMEDIATE", err, sizeof err) == 0) {
                prune_dedup(q, dedup_now(q));
                if (exec(q->db, "COMMIT", err, sizeof err) != 0)
                    (void)exec(q->db, "ROLLBACK", err, sizeof err);
            }
            note_step(q, "dedup prune", t0);
        }
        if (now >= q->next_compact_ms) {
            int64_t t0 = clock_mono_ms();
            q->next_compact_ms = now + (compact(q) == 0 ? COMPACT_EVERY_MS : COMPACT_RETRY_MS);
            note_step(q, "compact", t0);
        }
        if (stopping && !ops) {
            pthread_mutex_lock(&q->mu);
            int empty = q->pending == NULL;
            pthread_mutex_unlock(&q->mu);
            if (empty)
                break;
        }
    }
    return NULL;
}

/* Hands op to the writer and, unless op->async, waits for its commit. An async
 * op (heap-allocated) belongs to the writer from here on. */
static enum queue_status submit(queue *q, struct op *op)
{
    op->done = 0;
    pthread_mutex_lock(&q->mu);
    if (q->stopping || !q->writer_started) {
        pthread_mutex_unlock(&q->mu);
        return QUEUE_CLOSED;
    }
    enqueue(q, op);
    pthread_cond_signal(&q->work);
    if (op->async) {
        pthread_mutex_unlock(&q->mu);
        return QUEUE_OK;
    }
    while (!op->done)
        pthread_cond_wait(&q->done, &q->mu);
    pthread_mutex_unlock(&q->mu);
    return op->status;
}

/* ---- open / close ------------------------------------------------------- */

static int mkdir_p(const char *dir, char *err, size_t errlen)
{
    char path[4096];
    str_copy(path, sizeof path, dir);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0700) != 0 && errno != EEXIST) {
            str_printf(err, errlen, "cannot create %s: %s", path, strerror(errno));
            return -1;
        }
        *p = '/';
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        str_printf(err, errlen, "cannot create %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Each feed's ring of tables, of the template `table`, and the view over them. */
static int create_records_tables(sqlite3 *db, const char *table, char *err, size_t errlen)
{
    for (int f = 0; f < FEED_COUNT; f++) {
        char sql[512];
        buf view;
        buf_init(&view, 4096);
        int rc = buf_printf(&view, "CREATE VIEW IF NOT EXISTS records_%s AS ", FEED_NAMES[f]);
        if (rc != 0)
            str_copy(err, errlen, "out of memory");
        for (int t = 0; t < RING && rc == 0; t++) {
            /* cppcheck-suppress wrongPrintfScanfArgNum */
            snprintf(sql, sizeof sql, table, FEED_NAMES[f], t);
            rc = exec(db, sql, err, errlen);
            if (rc == 0 && buf_printf(&view, "%sSELECT * FROM records_%s_%d",
                                      t ? " UNION ALL " : "", FEED_NAMES[f], t) != 0) {
                str_copy(err, errlen, "out of memory");
                rc = -1;
            }
        }
        if (rc == 0)
            rc = exec(db, view.data, err, errlen);
        buf_free(&view);
        if (rc != 0)
            return -1;
    }
    return 0;
}

/* Whether table exists (column NULL), or has that column. */
static int has_column(sqlite3 *db, const char *table, const char *column)
{
    sqlite3_stmt *s;
    int found = 0;
    if (sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info(?1) WHERE ?2 IS NULL OR name = ?2",
                           -1, &s, NULL) == SQLITE_OK) {
        sqlite3_bind_text(s, 1, table, -1, SQLITE_STATIC);
        if (column)
            sqlite3_bind_text(s, 2, column, -1, SQLITE_STATIC);
        found = sqlite3_step(s) == SQLITE_ROW;
        sqlite3_finalize(s);
    }
    return found;
}

/* Schema 2 kept every feed's records in one table; schema 3 has one per feed.
 * Record ids are kept, so persisted batches still name their records. */
static int migrate_to_3(sqlite3 *db, char *err, size_t errlen)
{
    if (exec(db, "BEGIN IMMEDIATE", err, errlen) != 0)
        return -1;
    for (int f = 0; f < FEED_COUNT; f++) {
        char sql[512];
        snprintf(sql, sizeof sql,
                 "CREATE TABLE IF NOT EXISTS records_%s(id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "received_ms INTEGER NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL, "
                 "rules_version TEXT NOT NULL, user TEXT NOT NULL, batch TEXT NOT NULL, "
                 "event TEXT NOT NULL, raw TEXT NOT NULL)",
                 FEED_NAMES[f]);
        if (exec(db, sql, err, errlen) != 0)
            goto fail;
    }
    int had_records = has_column(db, "records", NULL);
    for (int f = 0; f < FEED_COUNT && had_records; f++) {
        char sql[512];
        snprintf(sql, sizeof sql,
                 "INSERT INTO records_%s(id, received_ms, event_id, event_type, rules_version, "
                 "user, batch, event, raw) SELECT id, received_ms, event_id, event_type, "
                 "rules_version, user, batch, event, raw FROM records WHERE feed = %d ORDER BY id",
                 FEED_NAMES[f], f);
        if (exec(db, sql, err, errlen) != 0)
            goto fail;
    }
    if ((had_records && exec(db, "DROP TABLE records", err, errlen) != 0) ||
        exec(db, "UPDATE meta SET value = '3' WHERE key = 'schema_version'; COMMIT", err, errlen) !=
            0)
        goto fail;
    return 0;
fail:
    (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* Schema 4 keeps each feed's records in a ring of tables emptied whole once
 * delivered (schema 3 deleted each delivered record at once), and batches by
 * claim: schema 3's records table becomes the first of the ring, each of its
 * batches a claim of one, and each feed's claimed id is the largest id its
 * batches hold (schema 3 batched every record up to it). */
static int migrate_to_4(sqlite3 *db, char *err, size_t errlen)
{
    int64_t claimed[FEED_COUNT] = {0};
    sqlite3_stmt *s = NULL, *ins = NULL;
    if (exec(db, "BEGIN IMMEDIATE", err, errlen) != 0)
        return -1;
    for (int f = 0; f < FEED_COUNT; f++) {
        char sql[160];
        snprintf(sql, sizeof sql, "ALTER TABLE records_%s RENAME TO records_%s_0", FEED_NAMES[f],
                 FEED_NAMES[f]);
        if (exec(db, sql, err, errlen) != 0)
            goto fail;
    }
    if (create_records_tables(db, RECORDS_TABLE_4, err, errlen) != 0 ||
        exec(db, SCHEMA, err, errlen) != 0)
        goto fail;
    /* (a queue from before schema 2 has no batches yet) */
    if (has_column(db, "batches", NULL) &&
        (sqlite3_prepare_v2(db,
                            "SELECT feed, source_request_id, created_ms, oldest_ms, record_ids "
                            "FROM batches ORDER BY id",
                            -1, &s, NULL) != SQLITE_OK ||
         sqlite3_prepare_v2(db, "INSERT INTO claims(feed, created_ms, batches) VALUES(?1, ?2, ?3)",
                            -1, &ins, NULL) != SQLITE_OK))
        goto sql_fail;
    while (s && sqlite3_step(s) == SQLITE_ROW) {
        struct queue_batch b = {0};
        int f = sqlite3_column_int(s, 0);
        if (f < 0 || f >= FEED_COUNT)
            continue;
        b.feed = (enum feed)f;
        str_copy(b.source_request_id, sizeof b.source_request_id,
                 (const char *)sqlite3_column_text(s, 1));
        b.oldest_ms = sqlite3_column_int64(s, 3);
        /* little-endian int64s, as a claim's record ids */
        struct claim_batch v3 = {.ids = sqlite3_column_blob(s, 4),
                                 .nrecords = (size_t)sqlite3_column_bytes(s, 4) / 8};
        b.nrecords = v3.nrecords;
        b.record_ids = malloc((b.nrecords ? b.nrecords : 1) * sizeof(int64_t));
        if (!b.record_ids)
            goto sql_fail;
        for (size_t i = 0; i < b.nrecords; i++) {
            b.record_ids[i] = claim_record(&v3, i);
            claimed[f] = b.record_ids[i] > claimed[f] ? b.record_ids[i] : claimed[f];
        }
        size_t len;
        unsigned char *enc = claim_encode(&b, 1, &len);
        free(b.record_ids);
        if (!enc)
            goto sql_fail;
        sqlite3_bind_int(ins, 1, f);
        sqlite3_bind_int64(ins, 2, sqlite3_column_int64(s, 2));
        sqlite3_bind_blob(ins, 3, enc, (int)len, SQLITE_STATIC);
        int rc = step_done(ins);
        free(enc);
        if (rc != SQLITE_OK)
            goto sql_fail;
    }
    sqlite3_finalize(s);
    sqlite3_finalize(ins);
    ins = NULL;
    if (sqlite3_prepare_v2(db, "INSERT INTO settled(feed, below, claimed) VALUES(?1, 0, ?2)", -1,
                           &s, NULL) != SQLITE_OK)
        goto sql_fail;
    for (int f = 0; f < FEED_COUNT; f++) {
        sqlite3_bind_int(s, 1, f);
        sqlite3_bind_int64(s, 2, claimed[f]);
        if (step_done(s) != SQLITE_OK)
            goto sql_fail;
    }
    sqlite3_finalize(s);
    s = NULL;
    if (exec(db,
             "DROP TABLE IF EXISTS batches; "
             "UPDATE meta SET value = '4' WHERE key = 'schema_version'; COMMIT",
             err, errlen) == 0)
        return 0;
    goto fail;
sql_fail:
    str_printf(err, errlen, "migrating the queue: %s",
               sqlite3_errcode(db) != SQLITE_OK ? sqlite3_errmsg(db) : "out of memory");
fail:
    sqlite3_finalize(s);
    sqlite3_finalize(ins);
    (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* Schema 1 kept the ids themselves under a unique index; schema 2 keeps their
 * fingerprints in an append-only log. */
static int migrate_to_2(sqlite3 *db, char *err, size_t errlen)
{
    sqlite3_stmt *s = NULL, *ins = NULL;
    int rc = -1;
    if (exec(db,
             "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS dedup(id INTEGER PRIMARY KEY, "
             "a INTEGER NOT NULL, b INTEGER NOT NULL, at_ms INTEGER NOT NULL)",
             err, errlen) != 0)
        return -1;
    if (sqlite3_prepare_v2(db, "SELECT event_id, at_ms FROM seen ORDER BY id", -1, &s, NULL) !=
            SQLITE_OK ||
        sqlite3_prepare_v2(db, "INSERT INTO dedup(a, b, at_ms) VALUES(?1, ?2, ?3)", -1, &ins,
                           NULL) != SQLITE_OK) {
        str_printf(err, errlen, "migrating the queue: %s", sqlite3_errmsg(db));
        goto done;
    }
    int step;
    while ((step = sqlite3_step(s)) == SQLITE_ROW) {
        struct dedup_fp fp;
        const char *id = (const char *)sqlite3_column_text(s, 0);
        if (dedup_fingerprint(id ? id : "", (size_t)sqlite3_column_bytes(s, 0), &fp) != 0) {
            str_printf(err, errlen, "migrating the queue: cannot hash an event id");
            goto done;
        }
        sqlite3_bind_int64(ins, 1, (sqlite3_int64)fp.a);
        sqlite3_bind_int64(ins, 2, (sqlite3_int64)fp.b);
        sqlite3_bind_int64(ins, 3, sqlite3_column_int64(s, 1));
        if (step_done(ins) != SQLITE_OK) {
            str_printf(err, errlen, "migrating the queue: %s", sqlite3_errmsg(db));
            goto done;
        }
    }
    if (step != SQLITE_DONE) { /* a read error: the ids not read yet would be lost */
        str_printf(err, errlen, "migrating the queue: %s", sqlite3_errmsg(db));
        goto done;
    }
    if (exec(db,
             "DROP TABLE seen; UPDATE meta SET value = '2' WHERE key = 'schema_version'; "
             "COMMIT",
             err, errlen) != 0)
        goto done;
    rc = 0;
done:
    sqlite3_finalize(s);
    sqlite3_finalize(ins);
    if (rc != 0)
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

/* Schema 5 logs the dedup ids a request stored in one row (schema 4 wrote a
 * row per id: a B-tree insert per event, and an hour's window of millions of
 * rows to read at every start). The rows of schema 4 that share a stamp, in
 * order, become one row. */
static int migrate_to_5(sqlite3 *db, char *err, size_t errlen)
{
    sqlite3_stmt *s = NULL, *ins = NULL;
    unsigned char *fps = malloc(MIGRATE_DEDUP_ROW_IDS * DEDUP_FP_BYTES);
    int rc = -1;
    if (!fps) {
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    if (exec(db,
             "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS dedup(id INTEGER PRIMARY KEY, "
             "a INTEGER NOT NULL, b INTEGER NOT NULL, at_ms INTEGER NOT NULL); "
             "CREATE TABLE IF NOT EXISTS dedup_log(id INTEGER PRIMARY KEY, "
             "at_ms INTEGER NOT NULL, fingerprints BLOB NOT NULL)",
             err, errlen) != 0) {
        free(fps);
        return -1;
    }
    if (sqlite3_prepare_v2(db, "SELECT a, b, at_ms FROM dedup ORDER BY id", -1, &s, NULL) !=
            SQLITE_OK ||
        sqlite3_prepare_v2(db, "INSERT INTO dedup_log(at_ms, fingerprints) VALUES(?1, ?2)", -1,
                           &ins, NULL) != SQLITE_OK)
        goto failed;
    size_t n = 0;
    int64_t at_ms = 0;
    for (;;) {
        int step = sqlite3_step(s);
        if (step != SQLITE_ROW && step != SQLITE_DONE)
            goto failed;
        int64_t at = step == SQLITE_ROW ? sqlite3_column_int64(s, 2) : 0;
        if (n > 0 && (step == SQLITE_DONE || at != at_ms || n == MIGRATE_DEDUP_ROW_IDS)) {
            sqlite3_bind_int64(ins, 1, at_ms);
            sqlite3_bind_blob(ins, 2, fps, (int)(n * DEDUP_FP_BYTES), SQLITE_STATIC);
            if (step_done(ins) != SQLITE_OK)
                goto failed;
            n = 0;
        }
        if (step == SQLITE_DONE)
            break;
        struct dedup_fp fp = {(uint64_t)sqlite3_column_int64(s, 0),
                              (uint64_t)sqlite3_column_int64(s, 1)};
        dedup_fp_encode(&fp, fps + n * DEDUP_FP_BYTES);
        n++;
        at_ms = at;
    }
    if (exec(db,
             "DROP TABLE dedup; UPDATE meta SET value = '5' WHERE key = 'schema_version'; "
             "COMMIT",
             err, errlen) != 0)
        goto done;
    rc = 0;
    goto done;
failed:
    str_printf(err, errlen, "migrating the queue: %s", sqlite3_errmsg(db));
done:
    sqlite3_finalize(s);
    sqlite3_finalize(ins);
    free(fps);
    if (rc != 0)
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

/* Schema 6 keeps the `?workspace=` of each event's request with its record
 * and its dead letter (NULL for those stored before). A table that a migration
 * from before schema 4 created has it already. */
static int migrate_to_6(sqlite3 *db, char *err, size_t errlen)
{
    if (exec(db, "BEGIN IMMEDIATE", err, errlen) != 0)
        return -1;
    char table[64], sql[160];
    for (int i = 0; i <= FEED_COUNT * RING; i++) {
        if (i == FEED_COUNT * RING)
            str_copy(table, sizeof table, "dead");
        else
            snprintf(table, sizeof table, "records_%s_%d", FEED_NAMES[i / RING], i % RING);
        if (!has_column(db, table, NULL) || has_column(db, table, "workspace"))
            continue; /* created with it, by this start's set-up or an earlier step */
        snprintf(sql, sizeof sql, "ALTER TABLE %s ADD COLUMN workspace TEXT", table);
        if (exec(db, sql, err, errlen) != 0) {
            (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return -1;
        }
    }
    if (exec(db, "UPDATE meta SET value = '6' WHERE key = 'schema_version'; COMMIT", err, errlen) !=
        0) {
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return 0;
}

/* count_deltas: a service of version 6 counted every record again after a
 * command's change, and its commands noted nothing. */
static int migrate_to_7(sqlite3 *db, char *err, size_t errlen)
{
    if (exec(db,
             "BEGIN IMMEDIATE; " COUNT_DELTAS_TABLE
             " UPDATE meta SET value = '7' WHERE key = 'schema_version'; COMMIT",
             err, errlen) != 0) {
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return 0;
}

/* What the file holds, read before anything writes to it: 0 for an empty
 * database or one whose first start stopped before its end (tributary's
 * tables without a version yet), else the schema version of a tributary
 * queue. QUEUE_OPEN_REFUSED (err) for a database of something else, or of a
 * newer tributary: opening such a file must leave it as it is. -1 (err) when
 * it could not be read. */
static int stored_version(sqlite3 *db, const char *path, char *err, size_t errlen)
{
    sqlite3_stmt *s = NULL;
    int version = -1;
    if (sqlite3_prepare_v2(db,
                           "SELECT count(*), coalesce(sum(name = 'meta'), 0) FROM sqlite_master "
                           "WHERE type = 'table'",
                           -1, &s, NULL) != SQLITE_OK ||
        sqlite3_step(s) != SQLITE_ROW) {
        str_printf(err, errlen, "%s: %s", path, sqlite3_errmsg(db));
        goto done;
    }
    if (sqlite3_column_int64(s, 0) == 0) {
        version = 0;
        goto done;
    }
    if (sqlite3_column_int64(s, 1) == 0) {
        str_printf(err, errlen,
                   "%s: not a tributary queue (the database holds other tables); choose "
                   "another data_dir",
                   path);
        version = QUEUE_OPEN_REFUSED;
        goto done;
    }
    sqlite3_finalize(s);
    s = NULL;
    int rc =
        sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = 'schema_version'", -1, &s, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) {
        version = 0;
        goto done;
    }
    if (rc != SQLITE_ROW) {
        str_printf(err, errlen, "%s: %s", path, sqlite3_errmsg(db));
        goto done;
    }
    const char *text = (const char *)sqlite3_column_text(s, 0);
    char *rest = NULL;
    long v = text ? strtol(text, &rest, 10) : 0;
    if (!text || rest == text || *rest || v < 1 || v > atoi(SCHEMA_VERSION)) {
        str_printf(err, errlen,
                   "%s: queue schema version %s is unknown to this version of tributary, which "
                   "reads versions 1 to " SCHEMA_VERSION "; the file was left unchanged",
                   path, text ? text : "(none)");
        version = QUEUE_OPEN_REFUSED;
        goto done;
    }
    version = (int)v;
done:
    sqlite3_finalize(s);
    return version;
}

/* The service marks the queue as in use until its clean stop (queue_free): a
 * mark found at its start tells that the last run ended without one (killed,
 * crashed, the machine down). */
static int mark_running(queue *q, char *err, size_t errlen)
{
    sqlite3_stmt *s = NULL;
    int rc =
        sqlite3_prepare_v2(q->db, "SELECT value FROM meta WHERE key = 'running'", -1, &s, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(s);
    q->unclean_stop = rc == SQLITE_ROW && sqlite3_column_int(s, 0) == 1;
    sqlite3_finalize(s);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
        return -1;
    }
    if (exec(q->db,
             "INSERT INTO meta(key, value) VALUES('running', '1') "
             "ON CONFLICT(key) DO UPDATE SET value = '1'",
             err, errlen) != 0)
        return -1;
    /* the mark in queue.db itself, not only in its WAL, which could hold
     * everything until the first checkpoint: a WAL lost with the commits of
     * a run that did not stop cleanly is said at the next start. Passive,
     * so a command reading beside the start can leave it to the first
     * checkpoint of the run */
    (void)sqlite3_wal_checkpoint_v2(q->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    q->marked_running = 1;
    return 0;
}

/* Brings a queue of schema `version` up to SCHEMA_VERSION, one step at a time,
 * each in its own transaction. */
static int migrate(sqlite3 *db, int version, char *err, size_t errlen)
{
    if (version < 1 || version >= 7)
        return 0; /* new or current */
    if (version == 1 && migrate_to_2(db, err, errlen) != 0)
        return -1;
    if (version <= 2 && migrate_to_3(db, err, errlen) != 0)
        return -1;
    if (version <= 3 && migrate_to_4(db, err, errlen) != 0)
        return -1;
    if (version <= 4 && migrate_to_5(db, err, errlen) != 0)
        return -1;
    if (version <= 5 && migrate_to_6(db, err, errlen) != 0)
        return -1;
    return migrate_to_7(db, err, errlen);
}

static int hold_batch(void *ctx, int64_t id, int feed, const struct claim_batch *b)
{
    (void)id;
    sqlite3_stmt *ins = ctx;
    sqlite3_bind_int(ins, 1, feed);
    for (size_t i = 0; i < b->nrecords; i++) {
        sqlite3_bind_int64(ins, 2, claim_record(b, i));
        if (step_done(ins) != SQLITE_OK)
            return -1;
    }
    return 0;
}

/* Records delivered before the last stop are deleted now, at the service's
 * start, while nothing else runs: each feed's records below its settled line,
 * and those at or under its claimed id that no batch holds. */
static int settle_delivered(sqlite3 *db, char *err, size_t errlen)
{
    if (exec(db,
             "BEGIN IMMEDIATE; CREATE TEMP TABLE IF NOT EXISTS held(feed INTEGER NOT NULL, "
             "id INTEGER NOT NULL, PRIMARY KEY(feed, id)) WITHOUT ROWID; DELETE FROM held",
             err, errlen) != 0)
        return -1;
    sqlite3_stmt *ins = NULL;
    if (sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO held(feed, id) VALUES(?1, ?2)", -1, &ins,
                           NULL) != SQLITE_OK ||
        each_live_batch(db, hold_batch, ins) != 0) {
        str_printf(err, errlen, "reading the persisted batches: %s",
                   sqlite3_errcode(db) != SQLITE_OK ? sqlite3_errmsg(db) : "a claim is unreadable");
        goto fail;
    }
    sqlite3_finalize(ins);
    ins = NULL;
    for (int f = 0; f < FEED_COUNT; f++) {
        int64_t below, claimed;
        if (read_settled(db, (enum feed)f, &below, &claimed) != 0) {
            str_printf(err, errlen, "reading where feed %s is settled: %s", FEED_NAMES[f],
                       sqlite3_errmsg(db));
            goto fail;
        }
        for (int t = 0; t < RING; t++) {
            char sql[400];
            snprintf(sql, sizeof sql,
                     "DELETE FROM records_%s_%d WHERE id < %lld OR (id <= %lld AND "
                     "id NOT IN (SELECT id FROM held WHERE feed = %d))",
                     FEED_NAMES[f], t, (long long)below, (long long)claimed, f);
            if (exec(db, sql, err, errlen) != 0)
                goto fail;
        }
    }
    if (exec(db, "DROP TABLE held; COMMIT", err, errlen) == 0)
        return 0;
fail:
    sqlite3_finalize(ins);
    (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* Whether the queue has a table: one that no service of this version has
 * opened yet has not the newer ones (moved, event_names). */
static int has_table(sqlite3 *db, const char *name)
{
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", -1,
                           &s, NULL) != SQLITE_OK)
        return 1; /* then the error is the caller's to report */
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int found = sqlite3_step(s) == SQLITE_ROW;
    sqlite3_finalize(s);
    return found;
}

/* Reads where each feed's ring stands: the writer goes on filling the table
 * that holds the newest records, with ids above every id stored, settled or
 * noted in a move (see moved: a move's row outlives records it names that
 * expired or moved on only until its next update, and must not name new ones).
 * The rings change only when all of them were read: on an error they stay as
 * they were and -1 is returned. */
static int load_rings(queue *q)
{
    struct feed_ring fresh[FEED_COUNT];
    memset(fresh, 0, sizeof fresh);
    for (int f = 0; f < FEED_COUNT; f++) {
        struct feed_ring *ring = &fresh[f];
        if (read_settled(q->db, (enum feed)f, &ring->line, &ring->claimed) != 0)
            return -1;
        int64_t newest = ring->line > 0 ? ring->line - 1 : 0;
        newest = ring->claimed > newest ? ring->claimed : newest;
        for (int t = 0; t < RING; t++) {
            char sql[128];
            sqlite3_stmt *s;
            snprintf(sql, sizeof sql, "SELECT count(*), coalesce(max(id), 0) FROM records_%s_%d",
                     FEED_NAMES[f], t);
            if (sqlite3_prepare_v2(q->db, sql, -1, &s, NULL) != SQLITE_OK)
                return -1;
            int rc = sqlite3_step(s);
            if (rc == SQLITE_ROW) {
                ring->rows[t] = sqlite3_column_int64(s, 0);
                ring->last[t] = sqlite3_column_int64(s, 1);
            }
            sqlite3_finalize(s);
            if (rc != SQLITE_ROW)
                return -1;
            if (ring->rows[t] > 0 && ring->last[t] > ring->last[ring->filling])
                ring->filling = t;
            newest = ring->last[t] > newest ? ring->last[t] : newest;
        }
        if (has_table(q->db, "moved")) {
            char sql[96];
            sqlite3_stmt *s;
            snprintf(sql, sizeof sql, "SELECT coalesce(max(hi), 0) FROM moved WHERE feed = %d", f);
            if (sqlite3_prepare_v2(q->db, sql, -1, &s, NULL) != SQLITE_OK)
                return -1;
            int rc = sqlite3_step(s);
            int64_t hi = rc == SQLITE_ROW ? sqlite3_column_int64(s, 0) : 0;
            sqlite3_finalize(s);
            if (rc != SQLITE_ROW)
                return -1;
            newest = hi > newest ? hi : newest;
            ring->moved_hi = hi;
        }
        ring->next_id = newest + 1;
        ring->dense_from = ring->next_id;
    }
    memcpy(q->ring, fresh, sizeof fresh);
    return 0;
}

/* Rebuilds the in-memory dedup set from the log. */
static int load_dedup(queue *q, char *err, size_t errlen)
{
    q->seen = dedup_new(q->opt.dedup_window_ms);
    if (!q->seen) {
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    sqlite3_stmt *s;
    /* the log's last stamp: later ones never go below it */
    if (sqlite3_prepare_v2(q->db, "SELECT at_ms FROM dedup_log ORDER BY id DESC LIMIT 1", -1, &s,
                           NULL) != SQLITE_OK) {
        str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
        return -1;
    }
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int64(s, 0) > q->dedup_anchor_wall)
        q->dedup_anchor_wall = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    if (sqlite3_prepare_v2(
            q->db, "SELECT at_ms, fingerprints, id FROM dedup_log WHERE at_ms >= ?1 ORDER BY id",
            -1, &s, NULL) != SQLITE_OK) {
        str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
        return -1;
    }
    sqlite3_bind_int64(s, 1, dedup_now(q) - q->opt.dedup_window_ms);
    int rc = 0, step;
    while (rc == 0 && (step = sqlite3_step(s)) == SQLITE_ROW) {
        int64_t at_ms = sqlite3_column_int64(s, 0);
        const unsigned char *fps = sqlite3_column_blob(s, 1);
        size_t n = (size_t)sqlite3_column_bytes(s, 1);
        if (n % DEDUP_FP_BYTES != 0 || (n > 0 && !fps)) {
            str_printf(err, errlen,
                       "%s: cannot read the dedup ids: row %lld of dedup_log is damaged (%zu "
                       "bytes); deleting that row lets the service start without its ids",
                       q->path, (long long)sqlite3_column_int64(s, 2), n);
            rc = -1;
        }
        for (size_t i = 0; rc == 0 && i < n; i += DEDUP_FP_BYTES) {
            struct dedup_fp fp;
            dedup_fp_decode(fps + i, &fp);
            fp.a |= 1; /* as dedup_fingerprint made it: 0 marks free slots */
            if (dedup_add(q->seen, &fp, at_ms) != 0) {
                str_copy(err, errlen, "out of memory loading the dedup ids");
                rc = -1;
            }
        }
    }
    /* a set read in part would let duplicates through unseen: the queue does
     * not open (the service does not start) rather than run with it */
    if (rc == 0 && step != SQLITE_DONE) {
        str_printf(err, errlen, "%s: cannot read the dedup ids: %s", q->path,
                   sqlite3_errmsg(q->db));
        rc = -1;
    }
    sqlite3_finalize(s);
    return rc;
}

/* The pid of the process that holds an flock on the file open at fd, where
 * this process sees it in /proc/locks: "1: FLOCK  ADVISORY  WRITE 1234
 * fe:00:5678 0 EOF" (a waiter's line has "->" after its number; a lock of
 * another pid namespace is not listed); 0 when not found. */
static int lock_holder(int fd)
{
    struct stat st;
    FILE *f = fstat(fd, &st) == 0 ? fopen("/proc/locks", "re") : NULL;
    if (!f)
        return 0;
    char line[256];
    int pid = 0;
    while (pid == 0 && fgets(line, sizeof line, f)) {
        char kind[16];
        int owner;
        unsigned maj, min;
        unsigned long ino;
        if (!strstr(line, "->") &&
            sscanf(line, "%*d: %15s %*s %*s %d %x:%x:%lu", kind, &owner, &maj, &min, &ino) == 5 &&
            strcmp(kind, "FLOCK") == 0 && maj == major(st.st_dev) && min == minor(st.st_dev) &&
            ino == st.st_ino && owner > 0)
            pid = owner;
    }
    fclose(f);
    return pid;
}

/* An exclusive flock on fd: a command's look at a lock (queue_service_running)
 * holds it for microseconds, so it is tried again for a while before another
 * service is blamed. 0, or -1 with errno (EWOULDBLOCK: another holds it). */
static int lock_exclusive(int fd)
{
    int rc;
    for (int tries = 0;
         (rc = flock(fd, LOCK_EX | LOCK_NB)) != 0 && errno == EWOULDBLOCK && tries < LOCK_TRIES;
         tries++)
        clock_sleep_ms(10);
    return rc;
}

/* One service per data_dir: a second one would send the same records again
 * and claim against the first one's batches. It locks the lock file and the
 * directory itself, which an operator cannot remove as a stale lock file;
 * the holder's pid is read from /proc/locks (lock_holder). The locks go with
 * the process (flock), so a crash leaves none behind. The CLI's writes do
 * not take them: they are meant to run beside the service. A file system
 * that cannot lock a directory (NFS emulates flock with locks that need a
 * file open for writing) leaves the lock file alone to it. */
static int take_lock(queue *q, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", q->opt.dir, QUEUE_LOCK_FILE);
    q->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (q->lock_fd < 0) {
        str_printf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    q->dir_fd = open(q->opt.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (q->dir_fd < 0) {
        str_printf(err, errlen, "%s: %s", q->opt.dir, strerror(errno));
        return -1;
    }
    int fds[] = {q->lock_fd, q->dir_fd};
    for (size_t i = 0; i < ARRAY_LEN(fds); i++) {
        if (lock_exclusive(fds[i]) == 0)
            continue;
        if (i == 1 && (errno == EBADF || errno == ENOLCK || errno == EOPNOTSUPP)) {
            close(q->dir_fd);
            q->dir_fd = -1;
            continue;
        }
        if (errno != EWOULDBLOCK) {
            str_printf(err, errlen, "%s: %s", i == 0 ? path : q->opt.dir, strerror(errno));
            return -1;
        }
        int pid = lock_holder(fds[i]);
        if (pid > 0)
            str_printf(err, errlen, "another tributary serve (pid %d) is using data_dir %s", pid,
                       q->opt.dir);
        else
            str_printf(err, errlen, "another tributary serve is using data_dir %s", q->opt.dir);
        return -1;
    }
    return 0;
}

/* The lock is data_dir's, and a queue.db that is a symbolic link, or has
 * another name, may be another data_dir's too: a service there would send
 * the same events. Refused; 0 when queue.db is data_dir's own (or not there
 * yet). */
static int shared_queue(const queue *q, char *err, size_t errlen)
{
    const char *path = q->path;
    struct stat st;
    if (lstat(path, &st) != 0)
        return 0;
    if (S_ISLNK(st.st_mode))
        str_printf(err, errlen,
                   "%s is a symbolic link: a service on another data_dir could use the same "
                   "queue; set data_dir to the directory that holds the file",
                   path);
    else if (st.st_nlink > 1)
        str_printf(err, errlen,
                   "%s has %ju names (hard links): a service on another data_dir could use the "
                   "same queue; remove the others (find / -xdev -samefile %s)",
                   path, (uintmax_t)st.st_nlink, path);
    else
        return 0;
    return -1;
}

/* Run as root on a data_dir that another user owns (a service started by
 * hand to look into something), the files the service creates would be
 * root's, and the service run as that user could not open them at its next
 * start: they are handed to the directory's owner, as SQLite hands a WAL it
 * creates to the owner of its database. Opened without following a symbolic
 * link, and left alone with more than one name: the directory's owner could
 * put either there, for another of root's files. */
static void hand_to_dir_owner(const queue *q)
{
    struct stat d;
    if (geteuid() != 0 || stat(q->opt.dir, &d) != 0 || d.st_uid == 0)
        return;
    /* the lock's own descriptor; the others' SQLite keeps to itself */
    static const char *const names[] = {QUEUE_LOCK_FILE, QUEUE_FILE, QUEUE_FILE "-wal",
                                        QUEUE_FILE "-shm"};
    for (size_t i = 0; i < ARRAY_LEN(names); i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", q->opt.dir, names[i]);
        int fd = i == 0 ? q->lock_fd : open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct stat f;
        if (fstat(fd, &f) == 0 && S_ISREG(f.st_mode) && f.st_nlink == 1 && f.st_uid == 0 &&
            fchown(fd, d.st_uid, d.st_gid) != 0)
            log_warn("cannot hand a file of data_dir to the directory's owner; the service run "
                     "as that user cannot open it",
                     LOG_S("file", path) LOG_S("error", strerror(errno)));
        if (fd != q->lock_fd)
            close(fd);
    }
}

/* Whether a service holds the flock of the file open at fd: a shared lock,
 * let go at once (a service that starts meanwhile tries its own again for a
 * while, see lock_exclusive). 1 (*pid its holder, or 0), 0, or -1. */
static int lock_held(int fd, int *pid)
{
    if (flock(fd, LOCK_SH | LOCK_NB) == 0) {
        (void)flock(fd, LOCK_UN);
        return 0;
    }
    if (errno != EWOULDBLOCK)
        return -1;
    *pid = lock_holder(fd);
    return 1;
}

int queue_service_running(const char *dir, int *pid)
{
    *pid = 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, QUEUE_LOCK_FILE);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno != ENOENT)
        return -1;
    int running = fd >= 0 ? lock_held(fd, pid) : 0;
    if (fd >= 0)
        close(fd);
    if (running != 0)
        return running;
    /* the lock file removed under a running service: the directory says it */
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -1; /* never started there */
    running = lock_held(fd, pid);
    close(fd);
    return running;
}

int queue_open(queue **out, const struct queue_options *o, char *err, size_t errlen)
{
    *out = NULL;
    int refused = 0;
    queue *q = calloc(1, sizeof(*q));
    if (!q) {
        str_copy(err, errlen, "out of memory");
        return -1;
    }
    q->opt = *o;
    q->lock_fd = q->dir_fd = -1;
    q->gauges.disk_free_bytes = -1;
    q->healthy = 1;
    q->wal_limit_pages =
        (int)((o->wal_max_bytes > 0 ? o->wal_max_bytes : QUEUE_WAL_MAX_BYTES) / PAGE_SIZE);
    if (q->wal_limit_pages < 3)
        q->wal_limit_pages = 3;
    q->segment_records = o->segment_records > 0 ? o->segment_records : SEGMENT_RECORDS;
    q->compact_min_free_bytes =
        o->compact_min_free_bytes > 0 ? o->compact_min_free_bytes : COMPACT_MIN_FREE_BYTES;
    q->checkpoint_pages =
        q->wal_limit_pages / 3 < CHECKPOINT_PAGES ? q->wal_limit_pages / 3 : CHECKPOINT_PAGES;
    pthread_mutex_init(&q->mu, NULL);
    cond_init_monotonic(&q->work); /* the writer's wait of a second for housekeeping */
    pthread_cond_init(&q->done, NULL);
    pthread_cond_init(&q->checkpoint_wanted, NULL);
    pthread_cond_init(&q->checkpoint_idle, NULL);
    size_t n = strlen(o->dir) + sizeof(QUEUE_FILE) + 2;
    q->path = malloc(n);
    if (!q->path) {
        str_copy(err, errlen, "out of memory");
        goto fail;
    }
    snprintf(q->path, n, "%s/%s", o->dir, QUEUE_FILE);

    struct stat st;
    if (o->readonly || o->existing) {
        if (stat(q->path, &st) != 0) {
            if (errno == ENOENT)
                str_printf(err, errlen, "no queue at %s (has the service run with this data_dir?)",
                           q->path);
            else
                str_printf(err, errlen, "cannot read %s: %s", q->path, strerror(errno));
            goto fail;
        }
    }
    if (!o->readonly &&
        (mkdir_p(o->dir, err, errlen) != 0 || (o->exclusive && take_lock(q, err, errlen))))
        goto fail;
    if (o->exclusive && shared_queue(q, err, errlen) != 0) {
        refused = 1; /* as it is, every start would meet it */
        goto fail;
    }
    struct stat dir_st;
    if (o->exclusive && stat(o->dir, &dir_st) == 0 && (dir_st.st_mode & 077)) {
        char mode[8];
        snprintf(mode, sizeof mode, "%04o", (unsigned)(dir_st.st_mode & 07777));
        log_warn("data_dir can be read by other users, and it holds event data (personal "
                 "data): chmod 700 it",
                 LOG_S("data_dir", o->dir) LOG_S("mode", mode));
    }
    if (open_db(q->path, !o->readonly, &q->db, err, errlen) != 0)
        goto fail;
    int version = stored_version(q->db, q->path, err, errlen);
    if (version < 0) {
        refused = version == QUEUE_OPEN_REFUSED;
        goto fail;
    }
    /* A cache of 16 MiB holds what the writer touches (the ends of each records
     * table and of the id log); 32 MiB measured slower and 15 MiB bigger.
     * secure_delete=FAST: deleted rows are zeroed in the pages a change writes
     * anyway, but a page freed whole is not written again only to zero it
     * (Debian's SQLite zeroes everything by default: 7% more bytes written per
     * event, for pages the next inserts overwrite within seconds). */
    char pragmas[256];
    snprintf(pragmas, sizeof pragmas,
             "PRAGMA page_size=%d; PRAGMA journal_mode=WAL; PRAGMA synchronous=%s; "
             "PRAGMA cache_size=-16384; PRAGMA temp_store=MEMORY; PRAGMA secure_delete=FAST;",
             PAGE_SIZE, o->sync_full ? "FULL" : "NORMAL");
    if (exec(q->db, pragmas, err, errlen) != 0)
        goto fail;
    {
        sqlite3_stmt *s = NULL;
        q->synchronous = -1;
        if (sqlite3_prepare_v2(q->db, "PRAGMA synchronous", -1, &s, NULL) == SQLITE_OK &&
            sqlite3_step(s) == SQLITE_ROW)
            q->synchronous = sqlite3_column_int(s, 0);
        sqlite3_finalize(s);
    }
    /* Only the service upgrades a queue: a CLI change (dlq purge, requeue)
     * beside an older service still running on it would break that service. */
    if (version != atoi(SCHEMA_VERSION) && (o->readonly || o->existing)) {
        if (version == 0)
            str_printf(err, errlen, "%s: not a tributary queue yet (has the service run?)",
                       q->path);
        else
            str_printf(err, errlen,
                       "%s: queue schema version %d is older than this version of tributary "
                       "reads; `tributary serve` upgrades it",
                       q->path, version);
        goto fail;
    }
    if (!o->readonly) {
        if (migrate(q->db, version, err, errlen) != 0)
            goto fail;
        /* an upgrade's one transaction can leave a WAL the size of what it
         * rewrote (the dedup log: hundreds of MB): the file takes it now */
        if (version >= 1 && version < atoi(SCHEMA_VERSION))
            (void)sqlite3_wal_checkpoint_v2(q->db, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL);
        /* one transaction: a first start that stops halfway leaves nothing */
        if (exec(q->db, "BEGIN IMMEDIATE", err, errlen) != 0)
            goto fail;
        if (exec(q->db, SCHEMA, err, errlen) != 0 ||
            create_records_tables(q->db, RECORDS_TABLE, err, errlen) != 0 ||
            exec(q->db,
                 "INSERT INTO meta(key, value) VALUES('schema_version', '" SCHEMA_VERSION "') "
                 "ON CONFLICT(key) DO NOTHING; COMMIT",
                 err, errlen) != 0) {
            (void)sqlite3_exec(q->db, "ROLLBACK", NULL, NULL, NULL);
            goto fail;
        }
    }
    if (o->exclusive && mark_running(q, err, errlen) != 0)
        goto fail;
    /* a command leaves them to the service's next start: beside a running
     * service, deleting them row by row held its writer for minutes */
    if (!o->readonly && !o->existing && settle_delivered(q->db, err, errlen) != 0)
        goto fail;
    for (int i = 0; i < S_COUNT; i++) {
        if (sqlite3_prepare_v3(q->db, STMTS[i], -1, SQLITE_PREPARE_PERSISTENT, &q->st[i], NULL) ==
            SQLITE_OK)
            continue;
        /* a command reads a queue that no service of this version has opened
         * yet: it has no moves (see moved), no event names */
        if (o->readonly &&
            (((i == S_MOVED_ADD || i == S_MOVED_OLDEST) && !has_table(q->db, "moved")) ||
             ((i == S_EVENT_NAME_ADD || i == S_EVENT_NAME_FORGET) &&
              !has_table(q->db, "event_names")))) {
            q->st[i] = NULL;
            continue;
        }
        str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
        goto fail;
    }
    if (!o->readonly) {
        /* a WAL that grew past twice its limit (a long read held it) is cut
         * back when it starts over, so that a disk gets that space back */
        char limit[64];
        snprintf(limit, sizeof limit, "PRAGMA journal_size_limit=%lld",
                 2LL * q->wal_limit_pages * PAGE_SIZE);
        if (exec(q->db, "PRAGMA wal_autocheckpoint=0", err, errlen) != 0 ||
            exec(q->db, limit, err, errlen) != 0)
            goto fail;
        sqlite3_wal_hook(q->db, on_wal_commit, q);
    }
    for (int f = 0; f < FEED_COUNT; f++) {
        int bad = 0;
        for (int i = 0; i < F_COUNT; i++)
            bad |= prepare_feed(q->db, FEED_STMTS[i], (enum feed)f, &q->fst[f][i]);
        for (int t = 0; t < RING; t++) {
            for (int i = 0; i < R_COUNT; i++)
                bad |= prepare_table(q->db, RING_STMTS[i], (enum feed)f, t, &q->rst[f][t][i]);
        }
        if (bad) {
            str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
            goto fail;
        }
    }
    if (load_rings(q) != 0) {
        str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
        goto fail;
    }
    q->data_version = pragma_value(q->db, "PRAGMA data_version");
    /* the counts in one read, and for the service, the last row of
     * count_deltas they include */
    int service = !o->readonly && !o->existing;
    if (exec(q->db, "BEGIN", err, errlen) != 0)
        goto fail;
    int counted = count_rows(q->db, &q->gauges);
    q->counted_ms = clock_mono_ms();
    if (service) {
        sqlite3_stmt *s = NULL;
        if (counted != 0 ||
            sqlite3_prepare_v2(q->db, "SELECT coalesce(max(id), 0) FROM count_deltas", -1, &s,
                               NULL) != SQLITE_OK ||
            sqlite3_step(s) != SQLITE_ROW)
            counted = -1;
        else
            q->deltas_added = sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
    }
    if (counted == 0 && exec(q->db, "COMMIT", err, errlen) != 0)
        counted = -1;
    if (counted != 0) {
        str_printf(err, errlen, "%s: %s", q->path, sqlite3_errmsg(q->db));
        if (!sqlite3_get_autocommit(q->db))
            (void)sqlite3_exec(q->db, "ROLLBACK", NULL, NULL, NULL);
        goto fail;
    }
    refresh_oldest(q);
    q->dedup_anchor_wall = clock_wall_ms();
    q->dedup_anchor_mono = clock_mono_ms();
    if (!o->readonly && o->dedup_window_ms > 0 && load_dedup(q, err, errlen) != 0)
        goto fail;
    dedup_gauges(q);
    if (!o->readonly) {
        /* before the first commit, not at the writer's next turn */
        check_disk(q);
        q->last_disk_check_ms = clock_mono_ms();
        if (open_db(q->path, 0, &q->checkpoint_db, err, errlen) != 0)
            goto fail;
        char sync[64];
        snprintf(sync, sizeof sync, "PRAGMA synchronous=%s", o->sync_full ? "FULL" : "NORMAL");
        if (exec(q->checkpoint_db, sync, err, errlen) != 0)
            goto fail;
        if (pthread_create(&q->checkpointer, NULL, checkpointer_main, q) != 0) {
            str_copy(err, errlen, "cannot start the queue checkpoint thread");
            goto fail;
        }
        q->checkpointer_started = 1;
        if (pthread_create(&q->writer, NULL, writer_main, q) != 0) {
            str_copy(err, errlen, "cannot start the queue writer thread");
            goto fail;
        }
        pthread_mutex_lock(&q->mu); /* submit reads it under mu */
        q->writer_started = 1;
        pthread_mutex_unlock(&q->mu);
    }
    if (o->exclusive)
        hand_to_dir_owner(q);
    *out = q;
    return 0;
fail:
    /* SQLite's own messages ("attempt to write a readonly database") name no
     * file; others name the queue, begin with another file of data_dir, or
     * name data_dir */
    if (q->path && !strstr(err, q->path) && strncmp(err, o->dir, strlen(o->dir)) != 0 &&
        !strstr(err, "data_dir ")) {
        char *msg = strdup(err);
        if (msg)
            str_printf(err, errlen, "%s: %s", q->path, msg);
        free(msg);
    }
    if (access(o->dir, W_OK) != 0 && errno == EROFS) {
        size_t used = strlen(err);
        /* SQLite writes queue.db-shm beside a WAL database even to read it */
        str_printf(err + used, errlen - used, "%s",
                   o->readonly ? " (data_dir is on a read-only file system; SQLite needs to write "
                                 "queue.db-shm beside the queue even to read it: copy data_dir "
                                 "elsewhere and point --config or TRIBUTARY_DATA_DIR at the copy)"
                               : " (data_dir is on a read-only file system)");
    }
    queue_free(q);
    return refused ? QUEUE_OPEN_REFUSED : -1;
}

void queue_free(queue *q)
{
    if (!q)
        return;
    pthread_mutex_lock(&q->mu);
    q->stopping = 1;
    pthread_cond_signal(&q->work);
    pthread_cond_signal(&q->checkpoint_wanted);
    pthread_mutex_unlock(&q->mu);
    if (q->writer_started)
        pthread_join(q->writer, NULL);
    if (q->checkpointer_started)
        pthread_join(q->checkpointer, NULL);
    sqlite3_close(q->checkpoint_db);
    for (int i = 0; i < S_COUNT; i++)
        sqlite3_finalize(q->st[i]);
    for (int f = 0; f < FEED_COUNT; f++) {
        for (int i = 0; i < F_COUNT; i++)
            sqlite3_finalize(q->fst[f][i]);
        for (int t = 0; t < RING; t++) {
            for (int i = 0; i < R_COUNT; i++)
                sqlite3_finalize(q->rst[f][t][i]);
        }
    }
    if (q->db) {
        /* The service leaves an empty WAL behind, unless another process
         * still reads the queue after CLOSE_CHECKPOINT_WAIT_MS. A command
         * beside it only copies what no one reads: TRUNCATE would take the
         * write lock and wait for the service's readers while the service's
         * writes wait. */
        if (!q->opt.readonly) {
            sqlite3_busy_timeout(q->db, CLOSE_CHECKPOINT_WAIT_MS);
            if (q->marked_running) /* not a file this version refused to change */
                sqlite3_exec(q->db, "UPDATE meta SET value = '0' WHERE key = 'running'", NULL, NULL,
                             NULL);
            sqlite3_exec(q->db,
                         q->opt.exclusive ? "PRAGMA wal_checkpoint(TRUNCATE)"
                                          : "PRAGMA wal_checkpoint(PASSIVE)",
                         NULL, NULL, NULL);
        }
        sqlite3_close(q->db);
    }
    pthread_cond_destroy(&q->work);
    pthread_cond_destroy(&q->done);
    pthread_cond_destroy(&q->checkpoint_wanted);
    pthread_cond_destroy(&q->checkpoint_idle);
    pthread_mutex_destroy(&q->mu);
    dedup_free(q->seen);
    if (q->lock_fd >= 0)
        close(q->lock_fd);
    if (q->dir_fd >= 0)
        close(q->dir_fd);
    free(q->path);
    free(q);
}

const char *queue_sync_mode(queue *q)
{
    static const char *const MODES[] = {"off", "normal", "full", "extra"};
    return q->synchronous >= 0 && q->synchronous < 4 ? MODES[q->synchronous] : "unknown";
}

int queue_unclean_stop(queue *q)
{
    return q->unclean_stop;
}

int queue_healthy(queue *q)
{
    pthread_mutex_lock(&q->mu);
    int h = q->healthy;
    pthread_mutex_unlock(&q->mu);
    return h;
}

void queue_gauges(queue *q, struct queue_gauges *g)
{
    pthread_mutex_lock(&q->mu);
    *g = q->gauges;
    int64_t need = q->refused_need;
    pthread_mutex_unlock(&q->mu);
    g->min_free_bytes = q->opt.min_free_bytes;
    int64_t depth = 0;
    for (int f = 0; f < FEED_COUNT; f++)
        depth += g->depth[f];
    /* full while the last request refused as too many would be refused again */
    g->full = depth + (need > 0 ? need : 1) > q->opt.max_depth;
}

/* ---- public operations -------------------------------------------------- */

enum queue_status queue_commit(queue *q, struct mapping *m, struct commit_result *res)
{
    struct op op = {.kind = OP_COMMIT};
    op.u.commit.m = m;
    op.u.commit.res = res;
    op.u.commit.dedup = 1;
    struct dedup_fp *fps = NULL;
    size_t n = m->nrecords + m->ndead;
    if (q->seen && n > 0) {
        fps = malloc(n * sizeof(*fps));
        if (!fps) {
            reset_commit(&op);
            return QUEUE_ERROR;
        }
        for (size_t i = 0; i < n; i++) {
            str id = i < m->nrecords ? m->records[i].event_id : m->dead[i - m->nrecords].event_id;
            if (dedup_fingerprint(id.p ? id.p : "", id.n, &fps[i]) != 0) {
                /* a fingerprint left as it was would match another id */
                log_error("cannot fingerprint event ids for deduplication: the cryptography "
                          "library failed; the request is not stored");
                free(fps);
                reset_commit(&op);
                return QUEUE_ERROR;
            }
        }
    }
    op.u.commit.fps = fps;
    enum queue_status st = submit(q, &op);
    free(fps);
    return st;
}

/* m stored without deduplication, in place of dead letters or of records of
 * feed `from`. */
static enum queue_status requeue(queue *q, struct mapping *m, const int64_t *dead_ids, size_t ndead,
                                 enum feed from, const int64_t *record_ids, size_t nrecords)
{
    struct commit_result res;
    struct op op = {.kind = OP_REQUEUE};
    op.u.commit.m = m;
    op.u.commit.res = &res;
    op.u.commit.dedup = 0;
    op.u.commit.dead_ids = dead_ids;
    op.u.commit.ndead_ids = ndead;
    op.u.commit.from_feed = from;
    op.u.commit.record_ids = record_ids;
    op.u.commit.nrecord_ids = nrecords;
    return submit(q, &op);
}

enum queue_status queue_requeue(queue *q, struct mapping *m, const int64_t *ids, size_t n)
{
    return requeue(q, m, ids, n, FEED_IOS /* no records: unused */, NULL, 0);
}

enum queue_status queue_move(queue *q, struct mapping *m, enum feed from, const int64_t *ids,
                             size_t n)
{
    return requeue(q, m, NULL, 0, from, ids, n);
}

enum queue_status queue_persist_batches(queue *q, struct queue_batch *b, size_t n,
                                        const struct event_name *names, size_t nnames,
                                        int *names_stored)
{
    int stored = 0;
    struct op op = {.kind = OP_PERSIST};
    op.u.persist.b = b;
    op.u.persist.n = n;
    op.u.persist.names = names;
    op.u.persist.nnames = nnames;
    op.u.persist.names_stored = &stored;
    enum queue_status st = submit(q, &op);
    if (names_stored)
        *names_stored = st == QUEUE_OK && stored;
    return st;
}

enum queue_status queue_split_batch(queue *q, int64_t batch_id, struct queue_batch *parts, size_t n)
{
    struct op op = {.kind = OP_SPLIT};
    op.u.persist.b = parts;
    op.u.persist.n = n;
    op.u.persist.replaces = batch_id;
    return submit(q, &op);
}

enum queue_status queue_ack(queue *q, const int64_t *batch_ids, size_t n, enum feed f,
                            int64_t settled_below)
{
    struct op op = {.kind = OP_ACK};
    op.u.batches.ids = batch_ids;
    op.u.batches.n = n;
    op.u.batches.feed = f;
    op.u.batches.settled_below = settled_below;
    return submit(q, &op);
}

enum queue_status queue_ack_async(queue *q, const int64_t *batch_ids, size_t n, enum feed f,
                                  int64_t settled_below)
{
    struct op *op = calloc(1, sizeof(*op));
    int64_t *ids = malloc((n ? n : 1) * sizeof(*ids));
    if (!op || !ids) {
        free(op);
        free(ids);
        return QUEUE_ERROR;
    }
    if (n > 0)
        memcpy(ids, batch_ids, n * sizeof(*ids));
    op->kind = OP_ACK;
    op->async = 1;
    op->u.batches.ids = ids;
    op->u.batches.n = n;
    op->u.batches.feed = f;
    op->u.batches.settled_below = settled_below;
    enum queue_status st = submit(q, op);
    if (st != QUEUE_OK) {
        free(ids);
        free(op);
    }
    return st;
}

enum queue_status queue_dead_batch(queue *q, int64_t batch_id, enum feed f, int64_t settled_below,
                                   const char *reason, const char *detail)
{
    struct op op = {.kind = OP_DEAD_BATCH};
    op.u.batches.ids = &batch_id;
    op.u.batches.n = 1;
    op.u.batches.feed = f;
    op.u.batches.settled_below = settled_below;
    op.u.batches.reason = reason;
    op.u.batches.detail = detail;
    return submit(q, &op);
}

enum queue_status queue_expire(queue *q, int64_t cutoff_ms, size_t moved[FEED_COUNT])
{
    memset(moved, 0, FEED_COUNT * sizeof(*moved));
    struct op op = {.kind = OP_EXPIRE};
    op.u.expire.cutoff_ms = cutoff_ms;
    op.u.expire.moved = moved;
    return submit(q, &op);
}

enum queue_status queue_set_feed_state(queue *q, enum feed f, const char *reason)
{
    struct op op = {.kind = OP_FEED_STATE};
    op.u.feed_state.feed = f;
    op.u.feed_state.reason = reason;
    return submit(q, &op);
}

enum queue_status queue_add_event_names(queue *q, const struct event_name *names, size_t n)
{
    if (n == 0)
        return QUEUE_OK;
    struct op op = {.kind = OP_EVENT_NAMES};
    op.u.event_names.names = names;
    op.u.event_names.n = n;
    return submit(q, &op);
}

enum queue_status queue_forget_event_names(queue *q, const char *const *names, size_t n,
                                           size_t *forgotten, unsigned char *found)
{
    struct op op = {.kind = OP_FORGET_NAMES};
    op.u.event_names.forget = names;
    op.u.event_names.n = n;
    op.u.event_names.forgotten = forgotten;
    op.u.event_names.found = found;
    return submit(q, &op);
}

enum queue_status queue_dead_purge(queue *q, const struct dead_filter *f, size_t *deleted)
{
    *deleted = 0;
    int64_t after = 0;
    while (after != INT64_MAX) {
        size_t page = 0;
        struct op op = {.kind = OP_PURGE};
        op.u.purge.f = f;
        op.u.purge.after = &after;
        op.u.purge.deleted = &page;
        enum queue_status st = submit(q, &op);
        if (st != QUEUE_OK)
            return st;
        *deleted += page;
    }
    return QUEUE_OK;
}

/* ---- readers ------------------------------------------------------------ */

void queue_items_init(struct queue_items *it)
{
    memset(it, 0, sizeof(*it));
    arena_init(&it->mem);
}

void queue_items_free(struct queue_items *it)
{
    arena_free(&it->mem);
    free(it->items);
    memset(it, 0, sizeof(*it));
}

queue_reader *queue_reader_new(queue *q, char *err, size_t errlen)
{
    queue_reader *r = calloc(1, sizeof(*r));
    if (!r) {
        str_copy(err, errlen, "out of memory");
        return NULL;
    }
    if (open_db(q->path, 0, &r->db, err, errlen) != 0)
        goto fail;
    for (int f = 0; f < FEED_COUNT; f++) {
        if (prepare_feed(r->db,
                         "SELECT id, received_ms, user, batch, event, event_id FROM records_%s "
                         "WHERE id > ?1 ORDER BY id LIMIT ?2",
                         (enum feed)f, &r->scan[f]) != 0 ||
            prepare_feed(r->db,
                         "SELECT id, received_ms, user, batch, event, event_id FROM records_%s "
                         "WHERE id = ?1",
                         (enum feed)f, &r->fetch[f]) != 0) {
            str_printf(err, errlen, "%s", sqlite3_errmsg(r->db));
            goto fail;
        }
    }
    return r;
fail:
    queue_reader_free(r);
    return NULL;
}

void queue_reader_free(queue_reader *r)
{
    if (!r)
        return;
    for (int f = 0; f < FEED_COUNT; f++) {
        sqlite3_finalize(r->scan[f]);
        sqlite3_finalize(r->scan_raw[f]);
        sqlite3_finalize(r->fetch[f]);
    }
    sqlite3_close(r->db);
    free(r);
}

static str col_str(sqlite3_stmt *s, int i, arena *a, int *failed)
{
    const char *p = (const char *)sqlite3_column_text(s, i);
    size_t n = (size_t)sqlite3_column_bytes(s, i);
    const char *c = arena_strndup(a, p ? p : "", p ? n : 0);
    if (!c) {
        *failed = 1;
        return STR_NULL;
    }
    return (str){c, p ? n : 0};
}

/* Appends the current row of s; returns the bytes it holds or -1. */
static long add_item(struct queue_items *out, sqlite3_stmt *s)
{
    if (out->n == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 256;
        struct queue_item *it = realloc(out->items, cap * sizeof(*it));
        if (!it)
            return -1;
        out->items = it;
        out->cap = cap;
    }
    int failed = 0;
    struct queue_item *it = &out->items[out->n];
    it->id = sqlite3_column_int64(s, 0);
    it->received_ms = sqlite3_column_int64(s, 1);
    it->user = col_str(s, 2, &out->mem, &failed);
    it->batch = col_str(s, 3, &out->mem, &failed);
    it->event = col_str(s, 4, &out->mem, &failed);
    it->event_id = col_str(s, 5, &out->mem, &failed);
    int raw = sqlite3_column_count(s) > 8;
    it->raw = raw ? col_str(s, 6, &out->mem, &failed) : STR_NULL;
    it->rules_version = raw ? col_str(s, 7, &out->mem, &failed) : STR_NULL;
    it->workspace = raw && sqlite3_column_type(s, 8) != SQLITE_NULL
                        ? col_str(s, 8, &out->mem, &failed)
                        : STR_NULL;
    if (failed)
        return -1;
    out->n++;
    return (long)(it->batch.n + it->event.n + it->event_id.n + it->raw.n);
}

static int scan_with(sqlite3_stmt *s, int64_t after_id, size_t limit, size_t max_bytes,
                     struct queue_items *out)
{
    sqlite3_bind_int64(s, 1, after_id);
    sqlite3_bind_int64(s, 2, (sqlite3_int64)limit);
    size_t bytes = 0;
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        long b = add_item(out, s);
        if (b < 0) {
            sqlite3_reset(s);
            return -1;
        }
        bytes += (size_t)b;
        if (bytes >= max_bytes)
            break;
    }
    sqlite3_reset(s);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : -1;
}

int queue_scan(queue_reader *r, enum feed f, int64_t after_id, size_t limit, size_t max_bytes,
               struct queue_items *out)
{
    return scan_with(r->scan[f], after_id, limit, max_bytes, out);
}

int queue_scan_raw(queue_reader *r, enum feed f, int64_t after_id, size_t limit, size_t max_bytes,
                   struct queue_items *out)
{
    if (!r->scan_raw[f] &&
        prepare_feed(r->db,
                     "SELECT id, received_ms, user, batch, event, event_id, raw, rules_version, "
                     "workspace FROM records_%s WHERE id > ?1 ORDER BY id LIMIT ?2",
                     f, &r->scan_raw[f]) != 0)
        return -1;
    return scan_with(r->scan_raw[f], after_id, limit, max_bytes, out);
}

int queue_fetch(queue_reader *r, enum feed f, const int64_t *ids, size_t n, struct queue_items *out)
{
    sqlite3_stmt *s = r->fetch[f];
    for (size_t i = 0; i < n; i++) {
        sqlite3_bind_int64(s, 1, ids[i]);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW && add_item(out, s) < 0)
            rc = SQLITE_NOMEM;
        sqlite3_reset(s);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
            return -1;
    }
    return 0;
}

struct load_ctx {
    void (*fn)(void *ctx, struct queue_batch *b);
    void *ctx;
};

static int load_one(void *ctx, int64_t id, int feed, const struct claim_batch *cb)
{
    struct load_ctx *l = ctx;
    if (feed < 0 || feed >= FEED_COUNT)
        return 0;
    struct queue_batch b = {0};
    b.id = id;
    b.feed = (enum feed)feed;
    size_t n =
        cb->srid_len < sizeof b.source_request_id ? cb->srid_len : sizeof b.source_request_id - 1;
    memcpy(b.source_request_id, cb->srid, n);
    b.oldest_ms = cb->oldest_ms;
    b.record_ids = malloc((cb->nrecords ? cb->nrecords : 1) * sizeof(int64_t));
    if (!b.record_ids)
        return -1;
    for (size_t i = 0; i < cb->nrecords; i++)
        b.record_ids[i] = claim_record(cb, i);
    b.nrecords = cb->nrecords;
    l->fn(l->ctx, &b); /* takes b.record_ids */
    return 0;
}

int queue_load_batches(queue_reader *r, void (*fn)(void *ctx, struct queue_batch *b), void *ctx)
{
    struct load_ctx l = {fn, ctx};
    return each_live_batch(r->db, load_one, &l) == 0 ? 0 : -1;
}

int64_t queue_oldest_ms(queue_reader *r, enum feed f)
{
    sqlite3_stmt *s, *moved = NULL;
    int64_t line, claimed;
    if (read_settled(r->db, f, &line, &claimed) != 0 ||
        prepare_feed(r->db, FEED_STMTS[F_OLDEST], f, &s) != 0)
        return 0;
    if (sqlite3_prepare_v2(r->db, MOVED_OLDEST_SQL, -1, &moved, NULL) != SQLITE_OK)
        moved = NULL;
    int64_t oldest[FEED_COUNT] = {0};
    int claimed_moved[FEED_COUNT] = {0};
    oldest[f] = oldest_of(s, moved, f, line, claimed, &claimed_moved[f]);
    sqlite3_finalize(moved);
    sqlite3_finalize(s);
    batches_oldest(r->db, oldest, claimed_moved);
    return oldest[f];
}

/* Keeps why a read of r failed for queue_reader_error; -1. */
static int reader_failed(queue_reader *r)
{
    str_copy(r->error, sizeof r->error, sqlite3_errmsg(r->db));
    return -1;
}

const char *queue_reader_error(const queue_reader *r)
{
    return r->error;
}

int queue_dead_each(queue_reader *r, const struct dead_filter *f,
                    int (*fn)(void *ctx, const struct dead_row *row), void *ctx)
{
    return queue_dead_each_between(r, f, 0, INT64_MAX, fn, ctx);
}

static int64_t scalar(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *s;
    int64_t v = 0;
    if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) != SQLITE_OK)
        return -1;
    if (sqlite3_step(s) == SQLITE_ROW)
        v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return v;
}

static int count_batch(void *ctx, int64_t id, int feed, const struct claim_batch *b)
{
    (void)id;
    (void)b;
    int64_t *n = ctx;
    if (feed >= 0 && feed < FEED_COUNT)
        n[feed]++;
    return 0;
}

static int stats_read(queue_reader *r, struct queue_stats *st)
{
    struct queue_gauges g;
    if (count_rows(r->db, &g) != 0)
        return -1;
    memcpy(st->depth, g.depth, sizeof st->depth);
    st->dead = g.dead;
    for (int f = 0; f < FEED_COUNT; f++)
        st->oldest_ms[f] = queue_oldest_ms(r, (enum feed)f);
    if (each_live_batch(r->db, count_batch, st->in_flight_batches) != 0)
        return -1;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(r->db, "SELECT feed, reason, since_ms FROM feed_state", -1, &s, NULL) !=
        SQLITE_OK)
        return -1;
    while (sqlite3_step(s) == SQLITE_ROW) {
        int f = sqlite3_column_int(s, 0);
        if (f >= 0 && f < FEED_COUNT) {
            str_copy(st->paused[f], sizeof st->paused[f], (const char *)sqlite3_column_text(s, 1));
            st->paused_since_ms[f] = sqlite3_column_int64(s, 2);
        }
    }
    sqlite3_finalize(s);
    st->dedup_ids =
        scalar(r->db, "SELECT coalesce(sum(length(fingerprints)), 0) / 16 FROM dedup_log");
    _Static_assert(DEDUP_FP_BYTES == 16, "the query above divides by DEDUP_FP_BYTES");
    if (has_table(r->db, "event_names"))
        st->event_names = scalar(r->db, "SELECT count(*) FROM event_names");
    return 0;
}

/* One read transaction for every figure, so that they all show the same
 * moment: a commit between two of them would count its records in one and
 * not the other. */
int queue_stats(queue_reader *r, struct queue_stats *st)
{
    memset(st, 0, sizeof(*st));
    int own = sqlite3_get_autocommit(r->db);
    if (own && sqlite3_exec(r->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
        return reader_failed(r);
    int rc = stats_read(r, st);
    if (rc != 0)
        reader_failed(r); /* before the COMMIT replaces SQLite's message */
    if (own)
        sqlite3_exec(r->db, "COMMIT", NULL, NULL, NULL); /* a read: nothing to lose */
    if (rc != 0)
        return -1;
    const char *path = sqlite3_db_filename(r->db, "main");
    if (path) {
        char wal[4200];
        snprintf(wal, sizeof wal, "%s-wal", path);
        st->bytes = file_size(path) + file_size(wal);
    }
    return 0;
}

/* ---- dead letters a page at a time (dlq requeue) ------------------------- */

/* The largest id of a table (0 when it is empty). */
static int last_id(queue_reader *r, const char *sql, int64_t *last)
{
    sqlite3_stmt *s;
    *last = 0;
    if (sqlite3_prepare_v2(r->db, sql, -1, &s, NULL) != SQLITE_OK)
        return -1;
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW)
        *last = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return rc == SQLITE_ROW ? 0 : -1;
}

int queue_dead_last_id(queue_reader *r, int64_t *last)
{
    return last_id(r, "SELECT max(id) FROM dead", last) == 0 ? 0 : reader_failed(r);
}

/* The end of a walk over the rows of s, whose last step answered rc
 * (SQLITE_DONE, also when the walk stopped early): 0, or -1 with the reader's
 * error. Finalizes s. */
static int rows_done(queue_reader *r, sqlite3_stmt *s, int rc)
{
    if (rc != SQLITE_DONE)
        reader_failed(r);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : -1;
}

int queue_event_names(queue_reader *r,
                      int (*fn)(void *ctx, const char *name, size_t n, int64_t first_ms), void *ctx)
{
    if (!has_table(r->db, "event_names"))
        return 0;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(r->db, "SELECT name, first_ms FROM event_names ORDER BY id", -1, &s,
                           NULL) != SQLITE_OK)
        return reader_failed(r);
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(s, 0);
        size_t n = (size_t)sqlite3_column_bytes(s, 0);
        if (fn(ctx, name ? name : "", n, sqlite3_column_int64(s, 1)) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    return rows_done(r, s, rc);
}

int queue_last_claim(queue_reader *r, int64_t *last)
{
    return last_id(r, "SELECT max(id) FROM claims", last);
}

int queue_dead_each_between(queue_reader *r, const struct dead_filter *f, int64_t after_id,
                            int64_t through_id, int (*fn)(void *ctx, const struct dead_row *row),
                            void *ctx)
{
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(r->db,
                           "SELECT id, at_ms, reason, detail, feed, event_id, event_type, "
                           "rules_version, raw, event, workspace FROM dead " DEAD_WHERE
                           " AND id > ?5 AND id <= ?6 ORDER BY id LIMIT ?4",
                           -1, &s, NULL) != SQLITE_OK)
        return reader_failed(r);
    dead_bind(s, f);
    sqlite3_bind_int64(s, 4, f->limit ? (sqlite3_int64)f->limit : -1);
    sqlite3_bind_int64(s, 5, after_id);
    sqlite3_bind_int64(s, 6, through_id);
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        struct dead_row row;
        row.id = sqlite3_column_int64(s, 0);
        row.at_ms = sqlite3_column_int64(s, 1);
        row.reason = (const char *)sqlite3_column_text(s, 2);
        row.detail = (const char *)sqlite3_column_text(s, 3);
        row.feed = sqlite3_column_type(s, 4) == SQLITE_NULL ? -1 : sqlite3_column_int(s, 4);
        row.event_id = (const char *)sqlite3_column_text(s, 5);
        row.event_type = (const char *)sqlite3_column_text(s, 6);
        row.rules_version = (const char *)sqlite3_column_text(s, 7);
        row.raw = (const char *)sqlite3_column_text(s, 8);
        row.event = (const char *)sqlite3_column_text(s, 9);
        row.workspace = (const char *)sqlite3_column_text(s, 10);
        if (fn(ctx, &row) != 0) {
            rc = SQLITE_DONE;
            break;
        }
    }
    return rows_done(r, s, rc);
}
