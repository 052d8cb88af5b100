#include "dlq.h"

#include "config.h"
#include "log.h"
#include "metrics.h"
#include "queue.h"
#include "reload.h"
#include "rules.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* How a command uses the queue: reads it, deletes from it, or adds to it
 * (within the bounds the service keeps: the disk's reserve is for sending and
 * acknowledging, and a full queue for the events waiting). */
enum queue_use { USE_READ, USE_PURGE, USE_REQUEUE };

/* The most an event name's text takes as stored: 256 characters, each
 * written as at most a 6-byte escape, its quotes and a NUL. */
#define NAME_TEXT_MAX (256 * 6 + 3)

static queue *open_queue(const struct config *c, enum queue_use use)
{
    char err[ERR_LEN];
    queue *q = NULL;
    int adds = use == USE_REQUEUE;
    struct queue_options qo = {
        .dir = c->data_dir,
        .sync_full = strcmp(c->queue_sync, "full") == 0,
        .max_depth = adds ? c->queue_max_depth : INT64_MAX,
        .min_free_bytes = adds ? c->queue_min_free_mb << 20 : 0,
        /* requeue stores without a dedup check and purge needs none: the
         * dedup log (hundreds of MB for an hour at 10,000 events/s) is not read */
        .dedup_window_ms = 0,
        .readonly = use == USE_READ,
        .existing = 1, /* a mistaken data_dir gets no new queue */
    };
    if (queue_open(&q, &qo, err, sizeof err) != 0) {
        fprintf(stderr, "tributary: %s\n", err);
        return NULL;
    }
    return q;
}

/* UNIX milliseconds as an ISO 8601 time in UTC, to the second. */
static void utc_text(int64_t ms, char *out, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Says that what (the queue, the dead-letter store) cannot be read, with the
 * cause when one was given: a reader that could not open says why in err. */
static void say_unreadable(const char *what, const char *cause)
{
    if (cause && *cause)
        fprintf(stderr, "tributary: cannot read %s: %s\n", what, cause);
    else
        fprintf(stderr, "tributary: cannot read %s\n", what);
}

static void age_text(int64_t ms, char *out, size_t len)
{
    int64_t s = ms / 1000;
    if (s < 0)
        s = 0;
    if (s < 120)
        snprintf(out, len, "%llds", (long long)s);
    else if (s < 7200)
        snprintf(out, len, "%lldm", (long long)(s / 60));
    else if (s < 172800)
        snprintf(out, len, "%lldh", (long long)(s / 3600));
    else
        snprintf(out, len, "%lldd", (long long)(s / 86400));
}

static void print_json_str(const char *s)
{
    buf b;
    buf_init(&b, 64u << 20);
    if (buf_json_str(&b, s ? s : "", s ? strlen(s) : 0) == 0)
        fwrite(b.data, 1, b.len, stdout);
    else
        fputs("\"\"", stdout);
    buf_free(&b);
}

/* Appends the JSON text s[0..n) with a 0 added beside each decimal point
 * outside strings that has no digit on one side: lua-cjson reads numbers with
 * strtod, which takes "1.", "1.e3" and "-.5", where RFC 8259 wants a digit on
 * both sides ("1.0", "1.0e3", "-0.5": the same values). Every other byte is
 * appended as it is. */
static int json_numbers_strict(buf *b, const char *s, size_t n)
{
    int in_string = 0;
    size_t run = 0; /* start of the bytes that pass as they are */
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\')
                i++; /* an escape: its byte is not the string's end */
            else if (c == '"')
                in_string = 0;
            continue;
        }
        if (c == '"')
            in_string = 1;
        if (c != '.')
            continue;
        int before = i > 0 && s[i - 1] >= '0' && s[i - 1] <= '9';
        int after = i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '9';
        if (before == after)
            continue; /* "1.5", or no number at all */
        size_t at = before ? i + 1 : i;
        if (buf_add(b, s + run, at - run) != 0 || buf_addc(b, '0') != 0)
            return -1;
        run = at;
    }
    return buf_add(b, s + run, n - run);
}

/* A stored JSON text (a Braze event as received, a mapped event) as JSON any
 * reader takes, or null; not a terminal's control sequence either. What is
 * stored stays as it was (requeue reads it again). */
static void print_json_text(const char *s)
{
    buf numbers, b;
    buf_init(&numbers, 64u << 20);
    buf_init(&b, 64u << 20);
    if (s && *s && json_numbers_strict(&numbers, s, strlen(s)) == 0 &&
        buf_json_strict(&b, numbers.data, numbers.len) == 0)
        fwrite(b.data, 1, b.len, stdout);
    else
        fputs("null", stdout);
    buf_free(&numbers);
    buf_free(&b);
}

/* Stored text (from Braze, mParticle or a rule's error) as a terminal shows it,
 * on one line: a blank for a line end or tab, '?' for another control character
 * (C0, DEL, C1: a terminal would act on them), for each byte of a bidirectional
 * formatting character (it would reorder the line) and for a byte that is not
 * UTF-8; at most max bytes, cut between two characters. The caller frees it;
 * NULL when out of memory. */
static char *terminal_text(const char *s, size_t max)
{
    size_t n = s ? strlen(s) : 0;
    char *t = malloc(n + 1);
    if (!t)
        return NULL;
    memcpy(t, s ? s : "", n);
    size_t keep = utf8_sanitize(t, n, max);
    t[keep] = '\0';
    for (size_t i = 0; i < keep; i++) {
        unsigned char c = (unsigned char)t[i];
        if (c == '\n' || c == '\r' || c == '\t')
            t[i] = ' ';
        else if (c < 0x20 || c == 0x7f)
            t[i] = '?';
        else if (utf8_is_c1(t + i, keep - i))
            t[i] = t[i + 1] = '?';
        else if (utf8_bidi_control(t + i, keep - i)) {
            size_t len = utf8_sequence((const unsigned char *)t + i, keep - i);
            memset(t + i, '?', len);
            i += len - 1;
        }
    }
    return t;
}

/* The fields of a dead letter that hold text from outside, for a terminal. */
struct row_text {
    char *detail, *event_id, *event_type, *workspace;
};

static int row_text(const struct dead_row *r, size_t max, struct row_text *t)
{
    t->detail = terminal_text(r->detail, max);
    t->event_id = terminal_text(r->event_id, max);
    t->event_type = terminal_text(r->event_type, max);
    t->workspace = r->workspace ? terminal_text(r->workspace, max) : NULL;
    return t->detail && t->event_id && t->event_type && (!r->workspace || t->workspace) ? 0 : -1;
}

static void row_text_free(struct row_text *t)
{
    free(t->detail);
    free(t->event_id);
    free(t->event_type);
    free(t->workspace);
}

static void print_row_json(const struct dead_row *r, int full)
{
    printf("{\"id\":%lld,\"at_ms\":%lld,\"reason\":", (long long)r->id, (long long)r->at_ms);
    print_json_str(r->reason);
    printf(",\"detail\":");
    print_json_str(r->detail);
    printf(",\"feed\":");
    if (r->feed >= 0 && r->feed < FEED_COUNT)
        printf("\"%s\"", FEED_NAMES[r->feed]);
    else
        printf("null");
    printf(",\"event_id\":");
    print_json_str(r->event_id);
    printf(",\"event_type\":");
    print_json_str(r->event_type);
    printf(",\"rules_version\":");
    print_json_str(r->rules_version);
    printf(",\"workspace\":");
    if (r->workspace)
        print_json_str(r->workspace);
    else
        printf("null");
    if (full) {
        /* raw and event are JSON texts themselves */
        printf(",\"raw\":");
        print_json_text(r->raw);
        printf(",\"event\":");
        print_json_text(r->event);
    }
    printf("}");
}

struct list_ctx {
    int json;
    int count;
    int64_t now;
};

static int list_row(void *ctx, const struct dead_row *r)
{
    struct list_ctx *l = ctx;
    if (l->json) {
        printf("%s", l->count ? ",\n " : "[");
        print_row_json(r, 0);
    } else {
        if (l->count == 0)
            printf("%-8s %-6s %-15s %-8s %-42s %-38s %s\n", "ID", "AGE", "REASON", "FEED",
                   "EVENT TYPE", "EVENT ID", "DETAIL");
        char age[16];
        age_text(l->now - r->at_ms, age, sizeof age);
        struct row_text t;
        if (row_text(r, 80, &t) != 0) {
            row_text_free(&t);
            fprintf(stderr, "tributary: out of memory\n");
            return 1;
        }
        printf("%-8lld %-6s %-15s %-8s %-42s %-38s %s\n", (long long)r->id, age, r->reason,
               r->feed >= 0 && r->feed < FEED_COUNT ? FEED_NAMES[r->feed] : "-", t.event_type,
               t.event_id, t.detail);
        row_text_free(&t);
    }
    l->count++;
    return 0;
}

static int cmd_list(const struct cli_options *o, const struct config *c)
{
    if (o->nargs > 0) {
        fprintf(stderr, "tributary: dlq list takes no argument ('%s'); see --reason, --limit\n",
                o->args[0]);
        return 2;
    }
    struct dead_filter f = {0};
    f.reason = o->reason;
    int64_t limit = 0;
    if (o->limit && parse_int64(o->limit, 1, INT64_MAX, &limit) != 0) {
        fprintf(stderr, "tributary: --limit needs a positive number\n");
        return 2;
    }
    f.limit = (size_t)limit;
    queue *q = open_queue(c, USE_READ);
    if (!q)
        return 1;
    char err[ERR_LEN] = "";
    queue_reader *r = queue_reader_new(q, err, sizeof err);
    int rc = 1;
    struct list_ctx l = {o->json, 0, clock_wall_ms()};
    if (r && queue_dead_each(r, &f, list_row, &l) == 0) {
        rc = 0;
        if (o->json)
            printf("%s]\n", l.count ? "" : "[");
        else if (l.count == 0)
            printf("the dead-letter store is empty%s\n", o->reason ? " for this reason" : "");
    } else {
        say_unreadable("the dead-letter store", r ? queue_reader_error(r) : err);
    }
    queue_reader_free(r);
    queue_free(q);
    return rc;
}

struct show_ctx {
    int json;
    int found;
};

static int show_row(void *ctx, const struct dead_row *r)
{
    struct show_ctx *sc = ctx;
    sc->found = 1;
    if (sc->json) {
        print_row_json(r, 1);
        printf("\n");
        return 1;
    }
    char when[32];
    utc_text(r->at_ms, when, sizeof when);
    struct row_text text;
    if (row_text(r, SIZE_MAX, &text) != 0) {
        row_text_free(&text);
        fprintf(stderr, "tributary: out of memory\n");
        return 1;
    }
    printf("id:            %lld\n", (long long)r->id);
    printf("dead-lettered: %s\n", when);
    printf("reason:        %s\n", r->reason);
    printf("detail:        %s\n", text.detail);
    printf("feed:          %s\n", r->feed >= 0 && r->feed < FEED_COUNT ? FEED_NAMES[r->feed] : "-");
    printf("event id:      %s\n", text.event_id);
    printf("event type:    %s\n", text.event_type);
    printf("rules version: %s\n", r->rules_version);
    if (text.workspace)
        printf("workspace:     %s\n", text.workspace);
    row_text_free(&text);
    printf("braze event:   ");
    print_json_text(r->raw);
    if (r->event && *r->event) {
        printf("\nmapped event:  ");
        print_json_text(r->event);
    }
    printf("\n");
    return 1;
}

static int parse_id(const struct cli_options *o, int64_t *id)
{
    if (o->nargs != 1 || parse_int64(o->args[0], 1, INT64_MAX, id) != 0) {
        fprintf(stderr, "tributary: expected a dead-letter ID (see `tributary dlq list`)\n");
        return -1;
    }
    return 0;
}

static int cmd_show(const struct cli_options *o, const struct config *c)
{
    struct dead_filter f = {0};
    if (parse_id(o, &f.id) != 0)
        return 2;
    f.limit = 1;
    queue *q = open_queue(c, USE_READ);
    if (!q)
        return 1;
    char err[ERR_LEN] = "";
    queue_reader *r = queue_reader_new(q, err, sizeof err);
    struct show_ctx sc = {o->json, 0};
    int rc = 1;
    if (!r || queue_dead_each(r, &f, show_row, &sc) != 0)
        say_unreadable("the dead-letter store", r ? queue_reader_error(r) : err);
    else if (!sc.found)
        fprintf(stderr, "tributary: no dead letter %lld\n", (long long)f.id);
    else
        rc = 0;
    queue_reader_free(r);
    queue_free(q);
    return rc;
}

/* requeue reads, maps and commits dead letters a page at a time: a page ends
 * at REQUEUE_PAGE dead letters or once their Braze events reach
 * REQUEUE_PAGE_BYTES (at least one). Memory stays bounded by a page however
 * many the store holds (millions after a feed was paused past retry.max_age_s),
 * and a page committed stays committed should a later one fail. */
#define REQUEUE_PAGE 500
/* Times in a row a page is read again because another command took some of
 * its dead letters. */
#define REQUEUE_CHANGED_MAX 100
#define REQUEUE_PAGE_BYTES (8u << 20)

/* One page: the ids, Braze events and workspaces of its dead letters, copied
 * (a row's strings live only during the callback). */
struct page {
    int64_t ids[REQUEUE_PAGE];
    char *raws[REQUEUE_PAGE];
    char *workspaces[REQUEUE_PAGE]; /* NULL: none */
    size_t n;
    size_t most; /* REQUEUE_PAGE, fewer once the queue had no room for a page */
    size_t bytes;
    int failed;
};

static int page_row(void *ctx, const struct dead_row *r)
{
    struct page *p = ctx;
    const char *raw = r->raw ? r->raw : "";
    p->raws[p->n] = strdup(raw);
    p->workspaces[p->n] = r->workspace ? strdup(r->workspace) : NULL;
    if (!p->raws[p->n] || (r->workspace && !p->workspaces[p->n])) {
        free(p->raws[p->n]);
        free(p->workspaces[p->n]);
        p->failed = 1;
        return 1;
    }
    p->ids[p->n++] = r->id;
    p->bytes += strlen(raw);
    return p->n == p->most || p->bytes >= REQUEUE_PAGE_BYTES;
}

static void page_free(struct page *p)
{
    for (size_t i = 0; i < p->n; i++) {
        free(p->raws[i]);
        free(p->workspaces[i]);
    }
    p->n = 0;
    p->bytes = 0;
}

struct requeue_counts {
    size_t forwarded, dropped, dead, skipped;
    size_t done;     /* dead letters requeued and deleted, committed */
    int64_t done_id; /* the last id of the last page committed, 0: none */
};

/* What requeue_page returns, but for 0 (committed) and -1 (stopped, said). */
enum {
    PAGE_CHANGED = 1, /* another command requeued or purged some of it meanwhile */
    PAGE_TOO_MANY = 2 /* more than queue.max_depth has room for */
};

/* Maps a page with the rules and commits it: its records stored and its dead
 * letters deleted in one transaction. A dead letter the rules cannot take as
 * input is kept (and counted as skipped). Nothing is done when the page
 * returns PAGE_CHANGED (it is read again without the dead letters taken) or
 * PAGE_TOO_MANY (read again as a smaller page). */
static int requeue_page(const struct config *c, rules *engine, queue *q, const struct page *p,
                        struct requeue_counts *n)
{
    struct mapping m;
    mapping_init(&m);
    int64_t ids[REQUEUE_PAGE];
    size_t nids = 0, skipped = 0;
    buf kept; /* what is said of the dead letters kept, once the page is done */
    buf_init(&kept, 1 << 20);
    for (size_t i = 0; i < p->n; i++) {
        struct input_error ie;
        if (rules_map(engine, p->raws[i], strlen(p->raws[i]), INPUT_EVENT,
                      str_opt(p->workspaces[i]), &m, &ie) != 0) {
            (void)!buf_printf(&kept, "tributary: dead letter %lld cannot be requeued (kept): %s\n",
                              (long long)p->ids[i], ie.reason);
            skipped++;
            continue;
        }
        ids[nids++] = p->ids[i];
    }
    enum queue_status st = queue_requeue(q, &m, ids, nids);
    int again = st == QUEUE_CHANGED            ? PAGE_CHANGED
                : st == QUEUE_FULL && p->n > 1 ? PAGE_TOO_MANY
                                               : 0;
    if (!again && kept.len)
        fwrite(kept.data, 1, kept.len, stderr);
    buf_free(&kept);
    if (again) {
        mapping_free(&m);
        return again;
    }
    n->skipped += skipped;
    if (st == QUEUE_FULL)
        fprintf(stderr,
                "tributary: cannot store requeued events: the queue would hold more than "
                "queue.max_depth (%lld) events waiting for delivery\n",
                (long long)c->queue_max_depth);
    else if (st == QUEUE_NO_SPACE)
        fprintf(stderr,
                "tributary: cannot store requeued events: the disk of data_dir is full, or has "
                "less free than queue.min_free_mb (%lld MiB), kept for sending and "
                "acknowledging\n",
                (long long)c->queue_min_free_mb);
    else if (st != QUEUE_OK)
        fprintf(stderr, "tributary: cannot store requeued events: %s\n", queue_status_name(st));
    if (st != QUEUE_OK) {
        mapping_free(&m);
        return -1;
    }
    n->forwarded += m.nrecords;
    n->dead += m.ndead;
    for (int r = 0; r < DROP_REASON_COUNT; r++)
        n->dropped += m.dropped[r];
    n->done += nids;
    n->done_id = p->ids[p->n - 1];
    mapping_free(&m);
    return 0;
}

/* The rules route by which feeds have credentials (a platform feed without
 * them falls back to unbound), so a requeue must see the ones the service
 * sees: a command run without the service's environment would hold events on
 * feeds the service cannot send. The service records the feeds it has no
 * credentials for; 0 when this command sees the same, else -1 with both. */
static int same_feeds_as_service(const struct config *c, queue_reader *reader)
{
    struct queue_stats st;
    if (queue_stats(reader, &st) != 0)
        return 0; /* nothing recorded to compare with */
    char service[64] = "", here[64] = "";
    int differ = 0;
    for (int f = 0; f < FEED_COUNT; f++) {
        int theirs = strcmp(st.paused[f], QUEUE_PAUSED_NO_CREDENTIALS) != 0;
        int ours = config_feed_ready(c, (enum feed)f);
        differ |= theirs != ours;
        if (theirs)
            str_printf(service + strlen(service), sizeof service - strlen(service), "%s%s",
                       service[0] ? ", " : "", FEED_NAMES[f]);
        if (ours)
            str_printf(here + strlen(here), sizeof here - strlen(here), "%s%s", here[0] ? ", " : "",
                       FEED_NAMES[f]);
    }
    if (!differ)
        return 0;
    fprintf(stderr,
            "tributary: the rules route events by which feeds have credentials, and this command "
            "sees other ones than the service: the service has credentials for %s, this command "
            "for %s. Run it with the service's environment (with the systemd unit, in a subshell "
            "that keeps the secrets out of yours: (set -a; . /etc/tributary/env; exec tributary "
            "dlq requeue ...)), or add --force to route with what this command sees. Nothing "
            "requeued.\n",
            service[0] ? service : "none", here[0] ? here : "none");
    return -1;
}

/* Pages continue strictly after the last id read and stop at the largest id
 * there was at the start: the dead letters the rules put back in the store
 * during the run (and any the service adds meanwhile) get larger ids and wait
 * for the next run, so the run ends. */
static int cmd_requeue(const struct cli_options *o, struct config *c)
{
    struct dead_filter f = {0};
    int selectors = (o->nargs > 0) + (o->reason != NULL) + (o->all != 0);
    if (o->nargs > 1 || selectors != 1) {
        fprintf(stderr, "tributary: dlq requeue needs one of an ID, --reason REASON or --all\n");
        return 2;
    }
    if (o->nargs == 1 && parse_id(o, &f.id) != 0)
        return 2;
    f.reason = o->reason;
    f.limit = REQUEUE_PAGE;
    char err[ERR_LEN];
    ruleset *rs = NULL;
    rules *engine = NULL;
    queue *q = NULL;
    queue_reader *reader = NULL;
    struct page *page = calloc(1, sizeof(*page));
    struct requeue_counts n = {0};
    int64_t through = 0;
    int rc = 1;
    if (!page) {
        fprintf(stderr, "tributary: out of memory\n");
        goto done;
    }
    page->most = REQUEUE_PAGE;
    if (ruleset_load(&rs, c, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        goto done;
    }
    /* rules that the service would refuse (their tests fail) map nothing */
    buf report, warnings;
    buf_init(&report, 1 << 20);
    buf_init(&warnings, 1 << 20);
    int ntests = 0;
    int invalid = reload_validate(rs, &report, &warnings, &ntests);
    log_print_warnings(warnings.data);
    buf_free(&warnings);
    if (invalid)
        fprintf(stderr,
                "tributary: the rules in %s fail their tests, as a reload would find; nothing "
                "requeued:\n%s",
                c->rules_dir, report.data ? report.data : "");
    buf_free(&report);
    if (invalid)
        goto done;
    if (rules_new(&engine, rs, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        goto done;
    }
    q = open_queue(c, USE_REQUEUE);
    if (!q)
        goto done;
    err[0] = '\0';
    reader = queue_reader_new(q, err, sizeof err);
    if (!reader || queue_dead_last_id(reader, &through) != 0) {
        say_unreadable("the dead-letter store", reader ? queue_reader_error(reader) : err);
        goto done;
    }
    if (!o->force && same_feeds_as_service(c, reader) != 0)
        goto done;
    int64_t after = 0;
    int pages = 0, changed = 0, raced = 0;
    rc = 0;
    for (;;) {
        if (queue_dead_each_between(reader, &f, after, through, page_row, page) != 0 ||
            page->failed) {
            say_unreadable("the dead-letter store",
                           page->failed ? "out of memory" : queue_reader_error(reader));
            rc = 1;
            break;
        }
        if (page->n == 0)
            break;
        pages++;
        int taken = requeue_page(c, engine, q, page, &n);
        if (taken == PAGE_TOO_MANY)
            page->most = page->n / 2; /* the same range again, as fewer */
        raced |= taken == PAGE_CHANGED;
        if (taken == PAGE_CHANGED && ++changed > REQUEUE_CHANGED_MAX)
            fprintf(stderr,
                    "tributary: requeue stopped: another command keeps requeuing or "
                    "purging the same dead letters; the %zu requeued so far are "
                    "committed, run the command again once it is done\n",
                    n.done);
        if (taken < 0 || changed > REQUEUE_CHANGED_MAX) {
            rc = 1;
            break;
        }
        if (taken == 0) {
            after = page->ids[page->n - 1];
            changed = 0;
        } /* else the same range again, without what another command took */
        page_free(page);
        /* as the service does after a request: a state a rule left damaged
         * or grown too large is not used for the next page */
        if (rules_needs_rebuild(engine)) {
            rules_free(engine);
            engine = NULL;
            if (rules_new(&engine, rs, err, sizeof err) != 0) {
                fprintf(stderr, "%s\n", err);
                rc = 1;
                break;
            }
        }
    }
    if (pages == 0 && (rc != 0 || f.id)) {
        if (rc == 0) {
            fprintf(stderr, "tributary: no matching dead letters\n");
            rc = 1;
        }
        goto done;
    }
    if (rc == 0 && f.id && n.done == 0 && raced) {
        fprintf(stderr,
                "tributary: dead letter %lld was requeued or purged by another command "
                "meanwhile\n",
                (long long)f.id);
        rc = 1;
        goto done;
    }
    if (pages == 0)
        fprintf(stderr, "tributary: no matching dead letters\n"); /* and a summary of none */
    int crowded = changed > REQUEUE_CHANGED_MAX;                  /* said where it stopped */
    if (rc != 0 && !crowded && n.done_id == 0)
        fprintf(stderr, "tributary: requeue stopped: nothing was requeued, the dead letters are "
                        "still in the store\n");
    else if (rc != 0 && !crowded)
        fprintf(stderr,
                "tributary: requeue stopped after dead letter %lld: the %zu requeued up to there "
                "are committed, the rest are still in the store: run the command again\n",
                (long long)n.done_id, n.done);
    size_t requeued = n.forwarded + n.dropped + n.dead;
    if (o->json)
        printf("{\"requeued\":%zu,\"forwarded\":%zu,\"dropped\":%zu,\"dead_lettered_again\":%zu,"
               "\"kept\":%zu,\"rules_version\":\"%s\"}\n",
               requeued, n.forwarded, n.dropped, n.dead, n.skipped, ruleset_version(rs));
    else
        printf("requeued %zu event%s with rules %s: %zu queued for delivery, %zu dropped by the "
               "rules, %zu dead-lettered again%s\n",
               requeued, requeued == 1 ? "" : "s", ruleset_version(rs), n.forwarded, n.dropped,
               n.dead, n.skipped ? " (some could not be requeued and were kept)" : "");
done:
    if (page)
        page_free(page);
    free(page);
    queue_reader_free(reader);
    queue_free(q);
    rules_free(engine);
    ruleset_unref(rs);
    return rc;
}

/* The purge cutoff, now_ms less `seconds`. A duration reaching back to the
 * epoch or beyond (parse_duration_s accepts up to INT64_MAX seconds, where
 * seconds * 1000 overflowed and the wrapped cutoff could lie in the future)
 * is older than every dead letter: the cutoff is then the earliest time there
 * is, and nothing is purged (0 would mean no cutoff at all). */
static int64_t purge_cutoff_ms(int64_t now_ms, int64_t seconds)
{
    if (seconds >= now_ms / 1000)
        return INT64_MIN;
    return now_ms - seconds * 1000;
}

static int cmd_purge(const struct cli_options *o, const struct config *c)
{
    int64_t seconds;
    if (!o->older_than || parse_duration_s(o->older_than, &seconds) != 0) {
        fprintf(stderr, "tributary: dlq purge needs --older-than DURATION with its unit (s, m, "
                        "h, d, w: 7d, 12h, 30m)\n");
        return 2;
    }
    if (o->nargs > 0) {
        fprintf(stderr, "tributary: dlq purge takes no argument ('%s')\n", o->args[0]);
        return 2;
    }
    struct dead_filter f = {0};
    f.reason = o->reason;
    f.before_ms = purge_cutoff_ms(clock_wall_ms(), seconds);
    queue *q = open_queue(c, USE_PURGE);
    if (!q)
        return 1;
    size_t deleted = 0;
    enum queue_status st = queue_dead_purge(q, &f, &deleted);
    queue_free(q);
    if (st != QUEUE_OK) {
        fprintf(stderr, "tributary: cannot purge: %s (%zu dead letters purged before it)\n",
                queue_status_name(st), deleted);
        return 1;
    }
    if (o->json)
        printf("{\"purged\":%zu}\n", deleted);
    else
        printf("purged %zu dead letter%s older than %s\n", deleted, deleted == 1 ? "" : "s",
               o->older_than);
    return 0;
}

static int known_reason(const char *reason)
{
    for (size_t i = 0; i < DEAD_REASON_COUNT; i++) {
        if (strcmp(reason, DEAD_REASONS[i]) == 0)
            return 1;
    }
    return 0;
}

int dlq_main(const struct cli_options *o)
{
    if (o->nargs < 1) {
        fprintf(stderr, "usage: tributary dlq list|show|requeue|purge ...\n");
        return 2;
    }
    if (o->reason && !known_reason(o->reason)) {
        fprintf(stderr, "tributary: unknown --reason '%s' (", o->reason);
        for (size_t i = 0; i < DEAD_REASON_COUNT; i++)
            fprintf(stderr, "%s%s", i ? ", " : "", DEAD_REASONS[i]);
        fprintf(stderr, ")\n");
        return 2;
    }
    const char *sub = o->args[0];
    struct cli_options rest = *o;
    rest.args = o->args + 1;
    rest.nargs = o->nargs - 1;
    struct config *c = config_load_for_command(o->config, 0);
    if (!c)
        return 1;
    int rc;
    if (strcmp(sub, "list") == 0)
        rc = cmd_list(&rest, c);
    else if (strcmp(sub, "show") == 0)
        rc = cmd_show(&rest, c);
    else if (strcmp(sub, "requeue") == 0)
        rc = cmd_requeue(&rest, c);
    else if (strcmp(sub, "purge") == 0)
        rc = cmd_purge(&rest, c);
    else {
        fprintf(stderr, "tributary: unknown dlq command '%s' (list, show, requeue, purge)\n", sub);
        rc = 2;
    }
    config_unref(c);
    return rc;
}

struct names_ctx {
    int json;
    int failed;
    int64_t count, limit;
    buf quoted;
};

static int name_row(void *ctx, const char *name, size_t n, int64_t first_ms)
{
    struct names_ctx *nc = ctx;
    /* kept as the JSON writer wrote it between its quotes */
    nc->quoted.len = 0;
    if (buf_addc(&nc->quoted, '"') != 0 || buf_add(&nc->quoted, name, n) != 0 ||
        buf_add(&nc->quoted, "\"", 2) != 0) {
        nc->failed = 1;
        return 1;
    }
    nc->count++;
    /* mParticle took the first `limit` (of this service's: it may have
     * others), and dropped the events of the later ones */
    int past = nc->count > nc->limit;
    if (nc->json) {
        /* name: the name; text: as stored, what forget-names takes */
        printf("%s{\"name\":", nc->count > 1 ? ",\n " : "");
        print_json_text(nc->quoted.data);
        printf(",\"text\":");
        print_json_str(name);
        printf(",\"first_sent_ms\":%lld,\"past_limit\":%s}", (long long)first_ms,
               past ? "true" : "false");
        return 0;
    }
    char when[32];
    utc_text(first_ms, when, sizeof when);
    char *shown = terminal_text(name, SIZE_MAX);
    if (!shown) {
        nc->failed = 1;
        return 1;
    }
    if (nc->count == 1)
        printf("%-6s %-20s  %-10s  %s\n", "#", "FIRST SENT", "LIMIT", "EVENT NAME");
    printf("%-6lld %-20s  %-10s  %s\n", (long long)nc->count, when, past ? "past it" : "within",
           shown);
    free(shown);
    return 0;
}

/* The event names sent to mParticle (see event_names.h), in the order they
 * first were. */
static int print_names(queue_reader *r, const struct config *c, int json)
{
    struct names_ctx nc = {.json = json, .limit = c->mparticle_event_names_limit};
    buf_init(&nc.quoted, NAME_TEXT_MAX);
    if (json)
        printf("{\"limit\":%lld,\"names\":[", (long long)nc.limit);
    int rc = queue_event_names(r, name_row, &nc);
    buf_free(&nc.quoted);
    if (json)
        printf("]}\n");
    if (rc != 0 || nc.failed) {
        say_unreadable("the event names", nc.failed ? "out of memory" : queue_reader_error(r));
        return 1;
    }
    if (!json)
        printf("%s%lld event name%s sent; mParticle keeps %lld per workspace "
               "(mparticle.event_names_limit)\n",
               nc.count ? "\n" : "", (long long)nc.count, nc.count == 1 ? "" : "s",
               (long long)nc.limit);
    return 0;
}

static void print_stats(const struct queue_stats *st, const struct config *c, int json)
{
    int64_t now = clock_wall_ms();
    /* the feeds' states are as the service left them: say whether it runs */
    int pid;
    int running = queue_service_running(c->data_dir, &pid);
    if (json) {
        printf("{\"service_running\":%s,", running > 0 ? "true" : running == 0 ? "false" : "null");
        if (running > 0 && pid > 0)
            printf("\"service_pid\":%d,", pid);
        printf("\"feeds\":{");
        for (int f = 0; f < FEED_COUNT; f++) {
            printf("%s\"%s\":{\"depth\":%lld,\"oldest_age_s\":%lld,\"in_flight_batches\":%lld,"
                   "\"paused\":%s",
                   f ? "," : "", FEED_NAMES[f], (long long)st->depth[f],
                   st->oldest_ms[f] ? (long long)((now - st->oldest_ms[f]) / 1000) : 0LL,
                   (long long)st->in_flight_batches[f], st->paused[f][0] ? "true" : "false");
            if (st->paused[f][0]) {
                printf(",\"reason\":");
                print_json_str(st->paused[f]);
                printf(",\"paused_since_ms\":%lld", (long long)st->paused_since_ms[f]);
            }
            printf("}");
        }
        printf("},\"dead_letters\":%lld,\"dedup_ids\":%lld,\"event_names\":%lld,"
               "\"bytes\":%lld}\n",
               (long long)st->dead, (long long)st->dedup_ids, (long long)st->event_names,
               (long long)st->bytes);
        return;
    }
    if (running > 0 && pid > 0)
        printf("service: running (pid %d)\n\n", pid);
    else if (running > 0)
        printf("service: running (in another pid namespace)\n\n");
    else if (running == 0)
        printf("service: not running; feeds show the state it left them in\n\n");
    else
        printf("service: unknown (its lock, serve.lock in data_dir, cannot be read)\n\n");
    printf("%-8s %10s %10s %10s  %s\n", "FEED", "DEPTH", "OLDEST", "BATCHES", "STATE");
    for (int f = 0; f < FEED_COUNT; f++) {
        char age[16] = "-";
        if (st->oldest_ms[f])
            age_text(now - st->oldest_ms[f], age, sizeof age);
        char state[200];
        if (st->paused[f][0]) {
            char since[16];
            age_text(now - st->paused_since_ms[f], since, sizeof since);
            snprintf(state, sizeof state, "paused %s: %s", since, st->paused[f]);
        } else {
            str_copy(state, sizeof state, running == 0 ? "stopped" : "sending");
        }
        printf("%-8s %10lld %10s %10lld  %s\n", FEED_NAMES[f], (long long)st->depth[f], age,
               (long long)st->in_flight_batches[f], state);
    }
    printf("\ndead letters: %lld\ndedup ids:    %lld\nevent names:  %lld of mParticle's "
           "%lld (tributary queue names)\non disk:      %.1f MiB\n",
           (long long)st->dead, (long long)st->dedup_ids, (long long)st->event_names,
           (long long)c->mparticle_event_names_limit, (double)st->bytes / 1048576.0);
}

/* Whether argument i repeats an earlier one (forgotten by it, if known). */
static int given_before(const struct cli_options *o, int i)
{
    for (int j = 0; j < i; j++) {
        if (strcmp(o->args[j], o->args[i]) == 0)
            return 1;
    }
    return 0;
}

/* Forgets event names (after they were cleaned up in mParticle): the service
 * reads the names again at its next reload or start. */
static int forget_names(const struct cli_options *o, const struct config *c)
{
    if (o->all == (o->nargs > 0)) {
        fprintf(stderr, "usage: tributary queue forget-names [--] NAME... | --all\n");
        return 2;
    }
    unsigned char *found = o->all ? NULL : calloc((size_t)o->nargs, 1);
    if (!o->all && !found) {
        fprintf(stderr, "tributary: out of memory\n");
        return 1;
    }
    queue *q = open_queue(c, USE_PURGE);
    if (!q) {
        free(found);
        return 1;
    }
    size_t forgotten = 0;
    enum queue_status st =
        queue_forget_event_names(q, o->all ? NULL : o->args, (size_t)o->nargs, &forgotten, found);
    queue_free(q);
    if (st != QUEUE_OK) {
        fprintf(stderr, "tributary: cannot forget event names: %s\n", queue_status_name(st));
        free(found);
        return 1;
    }
    /* a name mistyped, or forgotten already: said, not passed over */
    if (o->json) {
        printf("{\"forgotten\":%zu", forgotten);
        int unknown = 0;
        for (int i = 0; found && i < o->nargs; i++) {
            if (!found[i] && !given_before(o, i)) {
                fputs(unknown++ ? "," : ",\"unknown\":[", stdout);
                print_json_str(o->args[i]);
            }
        }
        puts(unknown ? "]}" : "}");
    } else {
        printf("forgot %zu event name%s; a running service reads the names again at its next "
               "reload\n",
               forgotten, forgotten == 1 ? "" : "s");
        for (int i = 0; found && i < o->nargs; i++) {
            char *shown =
                found[i] || given_before(o, i) ? NULL : terminal_text(o->args[i], SIZE_MAX);
            if (shown)
                printf("not among the names sent (see tributary queue names): %s\n", shown);
            free(shown);
        }
    }
    free(found);
    return 0;
}

int queue_main(const struct cli_options *o)
{
    const char *sub = o->nargs ? o->args[0] : "";
    int stats = strcmp(sub, "stats") == 0, names = strcmp(sub, "names") == 0,
        forget = strcmp(sub, "forget-names") == 0;
    if (!stats && !names && !forget) {
        fprintf(stderr, "usage: tributary queue stats|names [--json], "
                        "tributary queue forget-names NAME... | --all\n");
        return 2;
    }
    if (!forget && o->nargs > 1) {
        fprintf(stderr, "tributary: queue %s takes no argument ('%s')\n", sub, o->args[1]);
        return 2;
    }
    struct config *c = config_load_for_command(o->config, 0);
    if (!c)
        return 1;
    int rc = 1;
    if (forget) {
        struct cli_options rest = *o;
        rest.args = o->args + 1;
        rest.nargs = o->nargs - 1;
        rc = forget_names(&rest, c);
        config_unref(c);
        return rc;
    }
    queue *q = open_queue(c, USE_READ);
    if (!q) {
        config_unref(c);
        return 1;
    }
    char err[ERR_LEN] = "";
    queue_reader *r = queue_reader_new(q, err, sizeof err);
    struct queue_stats st;
    if (r && names) {
        rc = print_names(r, c, o->json);
    } else if (r && queue_stats(r, &st) == 0) {
        print_stats(&st, c, o->json);
        rc = 0;
    } else {
        say_unreadable("the queue", r ? queue_reader_error(r) : err);
    }
    queue_reader_free(r);
    queue_free(q);
    config_unref(c);
    return rc;
}
