#include "reload.h"

#include "log.h"
#include "metrics.h"
#include "tls.h"

#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

static struct {
    pthread_mutex_t mu;
    pthread_mutex_t reloading; /* one reload at a time */
    char *config_path;
    struct config *cfg;
    struct config *started; /* the configuration the service started with: what a
                             * restart-only setting still is */
    ruleset *rs;
    uint64_t generation;
    int watch_fd;
    int watch_wd;
    char *watched;
    char *watched_real; /* where watched led when the watch was set, or NULL */
    int watch_warned;   /* the watch failed, and it was said */
    /* the last reload put its pair in force (or none came since the start),
     * and when the pair in force was loaded: what /metrics says, since a
     * refused reload leaves on disk files a restart may refuse too */
    int last_ok;
    int64_t loaded_ms;
} R = {PTHREAD_MUTEX_INITIALIZER,
       PTHREAD_MUTEX_INITIALIZER,
       NULL,
       NULL,
       NULL,
       NULL,
       0,
       -1,
       -1,
       NULL,
       NULL,
       0,
       0,
       0};

/* Rule files being written: created empty or written to, and not closed
 * since (no IN_CLOSE_WRITE yet), as an upload that stalls halfway (see
 * RELOAD_WRITING_MAX_MS). One whose last write is older than that does not
 * count (a truncate(2), a close the queue lost). More at once than WRITING_MAX
 * do not hold a reload. */
#define WRITING_MAX 16
static struct {
    struct {
        char name[NAME_MAX + 1];
        int64_t at_ms; /* its last change, clock_mono_ms */
    } file[WRITING_MAX];
    int n;
} writing;

/* Set by reload_cancel at a stop: a reload under way ends without taking
 * effect. */
static atomic_int cancelled;

void reload_cancel(void)
{
    atomic_store(&cancelled, 1);
}

int reload_validate(ruleset *rs, buf *report, buf *warnings, int *ntests)
{
    char err[ERR_LEN];
    rules *r = NULL;
    *ntests = 0;
    if (rules_new(&r, rs, err, sizeof err) != 0) {
        (void)!buf_printf(report, "%s\n", err);
        return -1;
    }
    rules_tests_cancelled_by(r, &cancelled);
    int failures = rules_self_test(r, report, warnings, ntests);
    rules_free(r);
    return failures == 0 ? 0 : -1;
}

void reload_report_excerpt(const buf *report, char *out, size_t outlen)
{
    static const char more[] = "\n... and more: `tributary check` lists every failure";
    size_t n = report->data ? report->len : 0;
    while (n > 0 && report->data[n - 1] == '\n')
        n--;
    if (n == 0) {
        str_copy(out, outlen, "the rules failed validation");
        return;
    }
    if (n < outlen || outlen <= sizeof more) {
        str_printf(out, outlen, "%.*s", (int)n, report->data);
        return;
    }
    size_t keep = outlen - sizeof more;
    const char *nl = memrchr(report->data, '\n', keep);
    if (nl)
        keep = (size_t)(nl - report->data);
    str_printf(out, outlen, "%.*s%s", (int)keep, report->data, more);
}

void reload_init(const char *config_path, struct config *cfg, ruleset *rs)
{
    pthread_mutex_lock(&R.mu);
    free(R.config_path);
    R.config_path = config_path ? strdup(config_path) : NULL;
    R.cfg = cfg;
    config_unref(R.started);
    R.started = config_ref(cfg);
    R.rs = rs;
    R.generation = 1;
    R.last_ok = 1;
    R.loaded_ms = clock_wall_ms();
    pthread_mutex_unlock(&R.mu);
}

void reload_shutdown(void)
{
    pthread_mutex_lock(&R.mu);
    ruleset_unref(R.rs);
    config_unref(R.cfg);
    config_unref(R.started);
    free(R.config_path);
    R.rs = NULL;
    R.cfg = NULL;
    R.started = NULL;
    R.config_path = NULL;
    pthread_mutex_unlock(&R.mu);
}

void reload_get(struct snapshot *s)
{
    pthread_mutex_lock(&R.mu);
    s->cfg = config_ref(R.cfg);
    s->rs = ruleset_ref(R.rs);
    s->generation = R.generation;
    pthread_mutex_unlock(&R.mu);
}

void reload_status(int *last_ok, int64_t *loaded_ms)
{
    pthread_mutex_lock(&R.mu);
    *last_ok = R.last_ok;
    *loaded_ms = R.loaded_ms;
    pthread_mutex_unlock(&R.mu);
}

void reload_put(struct snapshot *s)
{
    ruleset_unref(s->rs);
    config_unref(s->cfg);
    s->rs = NULL;
    s->cfg = NULL;
}

/* What a reloaded configuration must respect of the settings that stay as the
 * service started until it restarts:
 * - the listener stays on its address, so off loopback inbound credentials
 *   are required (a new `listen` alone must not switch them off);
 * - the queue keeps its queue.max_depth, so a request of inbound.max_events
 *   events must fit in it (Braze does not split a batch answered 503). */
static int check_against_started(const struct config *started, const struct config *cfg, char *err,
                                 size_t errlen)
{
    if (!started)
        return 0;
    if (cfg->inbound_max_events > started->queue_max_depth) {
        str_printf(err, errlen,
                   "inbound.max_events (%lld) exceeds the queue.max_depth the service runs with "
                   "until it restarts (%lld): a request that large could never be queued",
                   (long long)cfg->inbound_max_events, (long long)started->queue_max_depth);
        return -1;
    }
    char host[256];
    int port;
    if (config_listen_addr(started, host, sizeof host, &port) != 0)
        return 0;
    if (config_host_is_loopback(host) || cfg->inbound_tokens.n > 0 ||
        cfg->inbound_hmac_secrets.n > 0)
        return 0;
    str_printf(err, errlen,
               "the service listens on non-loopback address %s until it restarts; refusing a "
               "configuration without inbound.tokens or inbound.hmac_secrets",
               host);
    return -1;
}

/* Settings read only at start whose new value differs from the one the
 * service started with, which stays in force until a restart. */
static void warn_restart_only(const struct config *old, const struct config *neu)
{
    static const struct {
        const char *key;
        size_t off;
    } strs[] = {{"listen", offsetof(struct config, listen)},
                {"data_dir", offsetof(struct config, data_dir)},
                {"queue.sync", offsetof(struct config, queue_sync)}};
    static const struct {
        const char *key;
        size_t off;
    } ints[] = {
        {"http.threads", offsetof(struct config, http_threads)},
        {"http.max_connections", offsetof(struct config, http_max_connections)},
        {"http.max_connections_per_ip", offsetof(struct config, http_max_connections_per_ip)},
        {"http.timeout_s", offsetof(struct config, http_timeout_s)},
        {"http.request_timeout_s", offsetof(struct config, http_request_timeout_s)},
        {"inbound.max_body_bytes", offsetof(struct config, inbound_max_body_bytes)},
        {"inbound.body_memory_mb", offsetof(struct config, inbound_body_memory_mb)},
        {"queue.max_depth", offsetof(struct config, queue_max_depth)},
        {"queue.min_free_mb", offsetof(struct config, queue_min_free_mb)},
        {"dedup.window_s", offsetof(struct config, dedup_window_s)}};
    for (size_t i = 0; i < ARRAY_LEN(strs); i++) {
        const char *a = *(char *const *)((const char *)old + strs[i].off);
        const char *b = *(char *const *)((const char *)neu + strs[i].off);
        if ((a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0))
            log_warn("setting changed but takes effect only after a restart",
                     LOG_S("key", strs[i].key));
    }
    /* the listener speaks HTTPS or not from its start; a new certificate is
     * taken on reload */
    if (!old->tls_cert != !neu->tls_cert)
        log_warn("setting changed but takes effect only after a restart", LOG_S("key", "tls"));
    for (size_t i = 0; i < ARRAY_LEN(ints); i++) {
        int64_t a = *(const int64_t *)((const char *)old + ints[i].off);
        int64_t b = *(const int64_t *)((const char *)neu + ints[i].off);
        if (a != b)
            log_warn("setting changed but takes effect only after a restart",
                     LOG_S("key", ints[i].key));
    }
}

/* A key the configuration file changed while the environment sets it: the
 * environment wins, and a reload cannot change it, so the change would have
 * no effect, while the reload said it succeeded (a token added for a
 * rotation would still get 401). -1 with the keys in err. */
static int refuse_shadowed_changes(const struct config *old, const struct config *neu, char *err,
                                   size_t errlen)
{
    char keys[512];
    if (config_shadowed_changes(old, neu, keys, sizeof keys) == 0)
        return 0;
    str_printf(err, errlen,
               "changed in the configuration file, but the environment sets these keys and wins, "
               "so the change would have no effect: %s. A reload does not change the "
               "environment: set each key in one place, the file or TRIBUTARY_<KEY>_FILE (read "
               "again at every reload), or change the environment and restart",
               keys);
    return -1;
}

/* 1, with err saying so, once the service is stopping. */
static int stopping(char *err, size_t errlen)
{
    if (!atomic_load(&cancelled))
        return 0;
    str_copy(err, errlen, "the service is stopping");
    return 1;
}

int reload_now(const char *trigger, char *err, size_t errlen)
{
    pthread_mutex_lock(&R.reloading);
    pthread_mutex_lock(&R.mu);
    char *path = R.config_path ? strdup(R.config_path) : NULL;
    struct config *old = config_ref(R.cfg);
    struct config *started = config_ref(R.started);
    pthread_mutex_unlock(&R.mu);

    int rc = -1;
    struct config *cfg = NULL;
    ruleset *rs = NULL;
    buf report, warnings;
    buf_init(&report, 64 * 1024);
    buf_init(&warnings, 64 * 1024);
    int ntests = 0;
    if (stopping(err, errlen) || config_load_again(&cfg, path, err, errlen) != 0)
        goto done;
    if (old && refuse_shadowed_changes(old, cfg, err, errlen) != 0)
        goto done;
    if (ruleset_load(&rs, cfg, err, errlen) != 0)
        goto done;
    if (check_against_started(started, cfg, err, errlen) != 0)
        goto done;
    if (reload_validate(rs, &report, &warnings, &ntests) != 0) {
        reload_report_excerpt(&report, err, errlen);
        goto done;
    }
    if (stopping(err, errlen))
        goto done;
    if (started)
        warn_restart_only(started, cfg);
    /* a renewed certificate: the next handshakes get it */
    if (started && started->tls_cert && cfg->tls_cert &&
        tls_use(cfg->tls_cert, cfg->tls_key, err, errlen) < 0)
        goto done;
    if (old) {
        if (old->inbound_tokens.n + old->inbound_hmac_secrets.n > 0 &&
            cfg->inbound_tokens.n + cfg->inbound_hmac_secrets.n == 0)
            log_warn("inbound credentials removed: requests are accepted without them, from "
                     "clients on this machine only");
    }
    log_configure(cfg->log_level, cfg->log_format); /* before the line saying it is done */
    log_warn_lines(cfg->warnings); /* a key of another pod, a short token: as at start */
    log_warn_lines(warnings.data);
    pthread_mutex_lock(&R.mu);
    struct config *prev_cfg = R.cfg;
    ruleset *prev_rs = R.rs;
    R.cfg = cfg;
    R.rs = rs;
    R.generation++;
    R.last_ok = 1;
    R.loaded_ms = clock_wall_ms();
    uint64_t gen = R.generation;
    char version[32];
    str_copy(version, sizeof version, ruleset_version(rs));
    pthread_mutex_unlock(&R.mu);
    cfg = NULL;
    rs = NULL;
    ruleset_unref(prev_rs);
    config_unref(prev_cfg);
    metrics_add(M_RULE_RELOADS, 1);
    log_info("configuration and rules reloaded",
             LOG_S("trigger", trigger) LOG_I("generation", (long long)gen)
                 LOG_S("rules_version", version) LOG_I("rule_tests", ntests));
    rc = 0;
done:
    if (rc != 0 && atomic_load(&cancelled)) {
        log_info("reload left unfinished: the service is stopping", LOG_S("trigger", trigger));
        (void)stopping(err, errlen); /* not the rule test it did not run */
        rc = RELOAD_STOPPING;
    } else if (rc != 0) {
        pthread_mutex_lock(&R.mu);
        R.last_ok = 0;
        pthread_mutex_unlock(&R.mu);
        metrics_add(M_RULE_RELOAD_FAILURES, 1);
        log_error("reload refused; the previous rules stay in force",
                  LOG_S("trigger", trigger) LOG_S("error", err));
    }
    buf_free(&report);
    buf_free(&warnings);
    ruleset_unref(rs);
    config_unref(cfg);
    config_unref(old);
    config_unref(started);
    free(path);
    pthread_mutex_unlock(&R.reloading);
    return rc;
}

/* ---- watching rules_dir ------------------------------------------------- */

/* Watches the rules_dir in force. Returns 1 when the directory being watched
 * had been lost (replaced, or missing for a while) and is watched again: what
 * it holds now was never loaded. */
static int same_text(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

static int watch_dir(void)
{
    struct snapshot snap;
    reload_get(&snap);
    const char *dir = snap.cfg ? snap.cfg->rules_dir : NULL;
    /* rules_dir may be a link switched to another directory (`mv -T`): the
     * watch follows the directory it was set on, so a new target is a new one */
    char *real = dir ? realpath(dir, NULL) : NULL;
    if (dir && R.watched && strcmp(dir, R.watched) == 0 && R.watch_wd >= 0 &&
        same_text(real, R.watched_real)) {
        free(real);
        reload_put(&snap);
        return 0;
    }
    int lost = dir && R.watched && strcmp(dir, R.watched) == 0;
    if (R.watch_wd >= 0)
        inotify_rm_watch(R.watch_fd, R.watch_wd);
    R.watch_wd = -1;
    writing.n = 0; /* names in the directory watched before */
    free(R.watched);
    R.watched = dir ? strdup(dir) : NULL;
    free(R.watched_real);
    R.watched_real = real;
    if (dir) {
        R.watch_wd = inotify_add_watch(R.watch_fd, dir,
                                       IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_TO | IN_MOVED_FROM |
                                           IN_DELETE | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF);
        /* once while it stays away: the main loop tries again every second */
        if (R.watch_wd < 0 && !R.watch_warned)
            log_warn("cannot watch rules_dir; reload with SIGHUP or /admin/reload",
                     LOG_S("rules_dir", dir) LOG_S("error", strerror(errno)));
        R.watch_warned = R.watch_wd < 0;
    }
    reload_put(&snap);
    return lost && R.watch_wd >= 0;
}

int reload_watch_start(void)
{
    R.watch_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (R.watch_fd < 0) {
        log_warn("inotify unavailable; reload with SIGHUP or /admin/reload",
                 LOG_S("error", strerror(errno)));
        return -1;
    }
    (void)watch_dir();
    return R.watch_fd;
}

/* A rule file, or `..data`: Kubernetes updates a mounted ConfigMap by
 * pointing that link at a new directory, which the files are links through. */
static int is_rule_file(const char *name)
{
    size_t n = strlen(name);
    return (name[0] != '.' && n > 4 && strcmp(name + n - 4, ".lua") == 0) ||
           strcmp(name, "..data") == 0;
}

static void writing_drop(int i)
{
    writing.file[i] = writing.file[--writing.n];
}

/* A file just created is being written when it is a regular file and empty:
 * not a link, nor a hard link to a file written before. */
static int created_empty(const char *name)
{
    char path[PATH_MAX];
    struct stat st;
    return R.watched && snprintf(path, sizeof path, "%s/%s", R.watched, name) < (int)sizeof path &&
           lstat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == 0;
}

/* Follows which rule files are being written, by the event `mask` on `name`. */
static void note_writing(const char *name, uint32_t mask)
{
    int at = -1;
    for (int i = 0; i < writing.n && at < 0; i++)
        at = strcmp(writing.file[i].name, name) == 0 ? i : -1;
    if (mask & (IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO)) {
        if (at >= 0)
            writing_drop(at);
        return;
    }
    if (!(mask & IN_MODIFY) && !((mask & IN_CREATE) && created_empty(name)))
        return;
    if (at < 0 && writing.n < WRITING_MAX && strlen(name) < sizeof writing.file[0].name) {
        at = writing.n++;
        strcpy(writing.file[at].name, name);
    }
    if (at >= 0)
        writing.file[at].at_ms = clock_mono_ms();
}

int reload_watch_writing(void)
{
    int64_t now = clock_mono_ms();
    for (int i = writing.n - 1; i >= 0; i--) {
        if (now - writing.file[i].at_ms >= RELOAD_WRITING_MAX_MS)
            writing_drop(i);
    }
    return writing.n > 0;
}

int reload_watch_changed(void)
{
    if (R.watch_fd < 0)
        return 0;
    int relevant = 0;
    _Alignas(struct inotify_event) char events[8192];
    for (;;) {
        ssize_t n = read(R.watch_fd, events, sizeof events);
        if (n <= 0)
            break;
        for (char *p = events; p < events + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            p += sizeof(*ev) + ev->len;
            if (ev->mask & IN_Q_OVERFLOW) {
                /* events were lost, a change or a close among them */
                writing.n = 0;
                relevant = 1;
                continue;
            }
            if (ev->wd != R.watch_wd || R.watch_wd < 0)
                continue; /* a directory watched before, since moved away or removed */
            if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED)) {
                /* the directory itself was replaced: watch its new incarnation
                 * (a directory moved away would go on reporting its changes) */
                if (ev->mask & IN_MOVE_SELF)
                    inotify_rm_watch(R.watch_fd, R.watch_wd);
                R.watch_wd = -1;
                relevant = 1;
            } else if (ev->len && is_rule_file(ev->name)) {
                /* a write too: a file changed in place and left open, or cut
                 * by truncate(2), is never closed; a file still being written
                 * holds the reload for a while (see wait_for_stop) */
                relevant = 1;
                note_writing(ev->name, ev->mask);
            }
        }
    }
    if (R.watch_wd < 0)
        relevant |= watch_dir();
    return relevant;
}

int reload_watch_refresh(void)
{
    return R.watch_fd >= 0 ? watch_dir() : 0;
}

void reload_watch_stop(void)
{
    if (R.watch_fd >= 0)
        close(R.watch_fd);
    R.watch_fd = -1;
    R.watch_wd = -1;
    free(R.watched);
    R.watched = NULL;
    free(R.watched_real);
    R.watched_real = NULL;
    R.watch_warned = 0;
}
