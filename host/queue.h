/*
 * queue: the durable store between ingestion and delivery, in SQLite (WAL).
 *
 * Holds mapped records (one row per event in a ring of tables per feed, grouped
 * for batching by feed and user at send time, and deleted a table at a time
 * once delivered), the batches being sent (one row per claim, see claim.h, with
 * each batch's source_request_id, so a batch re-sent after a crash is
 * byte-for-byte the same), the ids seen within the dedup window, the
 * dead-letter store, and the state of paused feeds.
 *
 * One writer thread owns the only write connection. Callers hand it operations
 * and wait: the writer takes everything pending, applies it in one transaction
 * (each operation in its own savepoint, so one failure spoils nothing else),
 * commits once, and wakes every waiter. Under load many requests share one fsync
 * (group commit); alone, a request pays one.
 *
 * Reads (the sender's scans, the CLI's listings) go through a queue_reader, one
 * per thread.
 *
 * A checkpoint thread copies the WAL back into the database while the writer
 * commits. The WAL file stays under QUEUE_WAL_MAX_BYTES plus a few group
 * commits, except while a long read (a dead-letter listing paged in a terminal)
 * keeps it from starting over: commits then go on and the WAL grows until the
 * read ends.
 *
 * The only module that includes SQLite.
 */
#ifndef TRIBUTARY_QUEUE_H
#define TRIBUTARY_QUEUE_H

#include "record.h"
#include "util.h"

#include <stdint.h>

typedef struct queue queue;
typedef struct queue_reader queue_reader;

/* The WAL's usual limit: 48 MiB, 3,072 pages of 16 KiB. */
#define QUEUE_WAL_MAX_BYTES (48LL << 20)

struct queue_options {
    const char *dir;   /* data_dir; created (0700) when missing */
    int sync_full;     /* synchronous=FULL, else NORMAL */
    int64_t max_depth; /* records; a commit beyond it is refused (QUEUE_FULL) */
    int64_t dedup_window_ms;
    int readonly;                   /* CLI listings: no writer thread, no schema changes */
    int existing;                   /* CLI changes: open data_dir's queue, never create one,
                                     * and leave the delivered records on disk to the
                                     * service's next start */
    int64_t wal_max_bytes;          /* 0: QUEUE_WAL_MAX_BYTES */
    int64_t segment_records;        /* records per table of a feed's ring; 0: 8192 */
    int exclusive;                  /* the service: refuse when another holds data_dir */
    int64_t compact_min_free_bytes; /* free space that makes the file compact; 0: 512 MiB */
    int64_t min_free_bytes;         /* new events are refused (QUEUE_NO_SPACE) while the file
                                     * system of dir has less free: the room that sending
                                     * and acknowledging need to drain the queue */
};

enum queue_status {
    QUEUE_OK,
    QUEUE_FULL,     /* over max_depth: try again later */
    QUEUE_NO_SPACE, /* the disk is full, or under queue.min_free_mb: try again later */
    QUEUE_ERROR,    /* storage error */
    QUEUE_CLOSED,   /* shutting down */
    QUEUE_CHANGED,  /* queue_move, queue_requeue: what it read changed; nothing done */
};

const char *queue_status_name(enum queue_status s);

/* Opens (creating when needed) data_dir/queue.db and starts the writer: 0, or
 * -1 (err), or QUEUE_OPEN_REFUSED (err) for a file this version must leave as
 * it is, whatever the retries: another program's database, the queue of a
 * newer tributary, or (for the service) a queue.db that may be another
 * data_dir's too (a symbolic link, or one of several names). */
#define QUEUE_OPEN_REFUSED (-2)
int queue_open(queue **out, const struct queue_options *o, char *err, size_t errlen) WUR;
/* Stops the writer after the pending operations and closes. Accepts NULL. */
void queue_free(queue *q);
int queue_healthy(queue *q); /* 0 after a storage error until the next good commit */
/* Whether the service's last run on this queue ended without a clean stop. */
int queue_unclean_stop(queue *q);
/* How the writer's commits reach the disk, as SQLite reads its setting back
 * (PRAGMA synchronous): "full" (each commit synced), "normal", or another. */
const char *queue_sync_mode(queue *q);

/* ---- ingestion ---------------------------------------------------------- */

struct commit_result {
    size_t queued;      /* records stored */
    size_t quarantined; /* dead letters stored */
    size_t duplicates;  /* records and dead letters whose id was already seen */
};

/* Stores a request's records and dead letters, recording their ids for dedup,
 * and returns once durable. All or nothing. Marks each stored dead letter. */
enum queue_status queue_commit(queue *q, struct mapping *m, struct commit_result *res);

/* ---- delivery ----------------------------------------------------------- */

struct queue_item {
    int64_t id;
    int64_t received_ms;
    str user;
    str batch;
    str event;
    str event_id;
    str raw;           /* queue_scan_raw only: the Braze event as received, */
    str rules_version; /* the rules that mapped it, */
    str workspace;     /* and its workspace (STR_NULL: none) */
};

/* A run of items read from the queue; strings live in mem. */
struct queue_items {
    arena mem;
    struct queue_item *items;
    size_t n, cap;
};

void queue_items_init(struct queue_items *it);
void queue_items_free(struct queue_items *it);

/* A batch as persisted before sending: its records, in order. */
struct queue_batch {
    int64_t id; /* assigned by queue_persist_batches */
    enum feed feed;
    char source_request_id[40];
    int64_t *record_ids;
    size_t nrecords;
    int64_t oldest_ms; /* received_ms of its oldest record */
};

queue_reader *queue_reader_new(queue *q, char *err, size_t errlen);
void queue_reader_free(queue_reader *r);
/* Why the last of queue_dead_each, queue_dead_each_between, queue_dead_last_id
 * and queue_stats that failed on r did (SQLite's message); "" when none did.
 * Borrowed: lives as long as r. */
const char *queue_reader_error(const queue_reader *r);

/* Reads up to `limit` records of feed f with id > after_id, in id order, that
 * are at most max_bytes in total (at least one). Delivered records stay on disk
 * until their table is emptied (see queue_ack): they lie at or under the
 * sender's cursor, and a scan from below it may return them. */
int queue_scan(queue_reader *r, enum feed f, int64_t after_id, size_t limit, size_t max_bytes,
               struct queue_items *out) WUR;
/* queue_scan, with each record's Braze event as received (item.raw). */
int queue_scan_raw(queue_reader *r, enum feed f, int64_t after_id, size_t limit, size_t max_bytes,
                   struct queue_items *out) WUR;
/* Reads the records of feed f with the given ids, in that order (missing ones
 * are skipped). */
int queue_fetch(queue_reader *r, enum feed f, const int64_t *ids, size_t n,
                struct queue_items *out) WUR;
/* The newest claim's row (0: none); the batches of claims persisted later have
 * larger rows (claim_row_of). */
int queue_last_claim(queue_reader *r, int64_t *last) WUR;
/* Calls fn for every persisted batch (after a restart: the ones in flight). */
int queue_load_batches(queue_reader *r, void (*fn)(void *ctx, struct queue_batch *b),
                       void *ctx) WUR;
/* The received time of the oldest record of f, or 0 when none. */
int64_t queue_oldest_ms(queue_reader *r, enum feed f);

/* Persists batches before they are sent, as one claim per feed; fills their
 * ids. Claiming is in id order and leaves nothing out: once a batch holds a
 * record, every earlier record of its feed is in a batch (this call's or an
 * earlier one's) or delivered. Batches that would leave a record out are
 * refused (QUEUE_ERROR). The event names new in them (names[0..nnames), borrowed
 * for the call) are kept in the same commit, as queue_add_event_names does,
 * when they can be: *names_stored (may be NULL) says whether they were; the
 * batches do not wait for them. */
enum queue_status queue_persist_batches(queue *q, struct queue_batch *b, size_t n,
                                        const struct event_name *names, size_t nnames,
                                        int *names_stored);
/* Delivered: removes the batches (all of feed f). Their records stay on disk
 * but no longer count: a record at or under the largest id ever persisted in
 * a batch that no batch holds is delivered (or dead), and is deleted with the
 * table of the feed's ring that holds it, once settled_below has passed every
 * record of that table (or at the next start). settled_below is the sender's
 * word that every record of f with a smaller id is delivered or dead (0: no
 * such word). Deleting records one by one would rewrite every page they share
 * with records still waiting. */
enum queue_status queue_ack(queue *q, const int64_t *batch_ids, size_t n, enum feed f,
                            int64_t settled_below);
/* The same without waiting for the commit (the ids are copied). Should it fail,
 * the batches stay persisted and are sent again, unchanged, after a restart. */
enum queue_status queue_ack_async(queue *q, const int64_t *batch_ids, size_t n, enum feed f,
                                  int64_t settled_below);
/* Moves a batch's records to the dead-letter store with reason and detail;
 * settled_below as for queue_ack (0: unchanged). */
enum queue_status queue_dead_batch(queue *q, int64_t batch_id, enum feed f, int64_t settled_below,
                                   const char *reason, const char *detail);
/* Replaces one batch by several (a 413 split); fills the new ids. */
enum queue_status queue_split_batch(queue *q, int64_t batch_id, struct queue_batch *parts,
                                    size_t n);
/* Moves records received before cutoff_ms that are not part of a persisted
 * batch to the dead-letter store (max_age); moved receives the count of each
 * feed. The sender expires its own batches with queue_dead_batch. */
enum queue_status queue_expire(queue *q, int64_t cutoff_ms, size_t moved[FEED_COUNT]);
/* Records a feed's pause (reason NULL: resumed) for `queue stats`. */
enum queue_status queue_set_feed_state(queue *q, enum feed f, const char *reason);
/* Keeps event names sent for the first time (see event_names.h), in order,
 * with their first_ms; a name kept already keeps its place and time. names is
 * borrowed for the call. */
enum queue_status queue_add_event_names(queue *q, const struct event_name *names, size_t n);
/* Forgets the event names names[0..n) (NUL-terminated, as queue_event_names
 * gives them), or all of them when names is NULL; *forgotten receives how many
 * were kept, and found[i], when found is not NULL, whether names[i] was. */
enum queue_status queue_forget_event_names(queue *q, const char *const *names, size_t n,
                                           size_t *forgotten, unsigned char *found);
/* Calls fn for each kept event name (NUL-terminated, n bytes), in the order
 * they were first sent; fn returns non-zero to stop. A queue that no service
 * of this version has opened has none. */
int queue_event_names(queue_reader *r,
                      int (*fn)(void *ctx, const char *name, size_t n, int64_t first_ms),
                      void *ctx) WUR;
/* The reason of a feed paused because it has no credentials. */
#define QUEUE_PAUSED_NO_CREDENTIALS "no credentials configured"
/* The detail of a max_age dead letter, to which what is known of why is added. */
#define QUEUE_MAX_AGE_DETAIL "not delivered within retry.max_age_s"

/* In-memory figures kept by the writer (cheap, for /metrics and /readyz). */
struct queue_gauges {
    int64_t depth[FEED_COUNT];
    int64_t oldest_ms[FEED_COUNT]; /* 0 when empty */
    int64_t dead;
    int64_t commits;    /* transactions committed (each one fsync with sync=full) */
    int64_t operations; /* operations they carried: requests, batches sent, ... */
    /* since the start, by commands beside the service (see add_deltas):
     * events requeued from the dead letters, and dead letters that left the
     * store otherwise (purged, or dropped by the rules at their requeue) */
    int64_t requeued;
    int64_t letters_removed;
    int64_t dedup_ids;   /* event ids remembered for the dedup window */
    int64_t dedup_bytes; /* the memory they take */
    int disk_low;        /* new events are refused: less than min_free_bytes free */
    /* space free for the service on the file system of data_dir, as last read
     * (without queue.db's free pages; -1: not read, as without min_free_bytes) */
    int64_t disk_free_bytes;
    int64_t min_free_bytes; /* queue.min_free_mb, as the queue was opened with */
    int full;               /* new events are refused: max_depth events queued, or too many
                             * for the last request refused to fit */
};
void queue_gauges(queue *q, struct queue_gauges *g);

/* ---- dead letters and stats (CLI) --------------------------------------- */

struct dead_row {
    int64_t id;
    int64_t at_ms;
    const char *reason;
    const char *detail;
    int feed;
    const char *event_id;
    const char *event_type;
    const char *rules_version;
    const char *raw;
    const char *event;     /* mapped form, or NULL */
    const char *workspace; /* or NULL */
};

struct dead_filter {
    int64_t id;         /* 0: any */
    const char *reason; /* NULL: any */
    int64_t before_ms;  /* 0: any */
    size_t limit;       /* 0: no limit */
};

/* Calls fn for each matching dead letter, oldest first; fn returns non-zero to stop. */
int queue_dead_each(queue_reader *r, const struct dead_filter *f,
                    int (*fn)(void *ctx, const struct dead_row *row), void *ctx) WUR;
/* The largest dead-letter id ever given out is at most *last (0: none), read
 * once: ids are never reused, so later dead letters get larger ones. */
int queue_dead_last_id(queue_reader *r, int64_t *last) WUR;
/* queue_dead_each restricted to the ids in (after_id, through_id]: a page of a
 * long run (`dlq requeue`), each page a read of its own, so no read stays open
 * across the run. f->limit bounds the page. */
int queue_dead_each_between(queue_reader *r, const struct dead_filter *f, int64_t after_id,
                            int64_t through_id, int (*fn)(void *ctx, const struct dead_row *row),
                            void *ctx) WUR;
/* Stores the mapping's records (no dedup: they were seen before) and deletes the
 * dead letters `ids` in one transaction. QUEUE_CHANGED, with nothing done, when
 * one of ids is gone meanwhile (another requeue or a purge took it). */
enum queue_status queue_requeue(queue *q, struct mapping *m, const int64_t *ids, size_t n);
/* The same for records of feed `from` that no batch holds, mapped again to
 * another feed: in one transaction the records ids are deleted and those of m
 * inserted (received when theirs say, not now). QUEUE_CHANGED when one of ids
 * was claimed or is gone meanwhile. */
enum queue_status queue_move(queue *q, struct mapping *m, enum feed from, const int64_t *ids,
                             size_t n);
/* Deletes dead letters matching the filter, oldest first, looking at
 * PURGE_PAGE of them in a transaction: the service beside it waits for one
 * page at most, and the WAL stays within its bound. *deleted receives the
 * count, also of the pages deleted before an error. */
#define PURGE_PAGE 2000
enum queue_status queue_dead_purge(queue *q, const struct dead_filter *f, size_t *deleted);

struct queue_stats {
    int64_t depth[FEED_COUNT];
    int64_t oldest_ms[FEED_COUNT];
    int64_t in_flight_batches[FEED_COUNT];
    char paused[FEED_COUNT][128]; /* reason, or "" */
    int64_t paused_since_ms[FEED_COUNT];
    int64_t dead;
    int64_t dedup_ids;
    int64_t event_names; /* see queue_add_event_names */
    int64_t bytes;       /* database file and WAL */
};
int queue_stats(queue_reader *r, struct queue_stats *s) WUR;

/* Whether a tributary serve holds the lock of data_dir dir: 1 (*pid its pid
 * from /proc/locks, or 0 when it runs in another pid namespace), 0, or -1
 * when it cannot be told (the lock file cannot be read). */
int queue_service_running(const char *dir, int *pid);

#endif
