#include "service.h"

#include "config.h"
#include "http_in.h"
#include "ingest.h"
#include "log.h"
#include "metrics.h"
#include "queue.h"
#include "reload.h"
#include "rules.h"
#include "sender.h"
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sysexits.h>
#include <unistd.h>

#ifndef TRIBUTARY_VERSION
#define TRIBUTARY_VERSION "dev"
#endif

/* In-flight requests to mParticle may finish for this long after SIGTERM. */
#define SHUTDOWN_GRACE_MS 10000

/*
 * glibc gives each busy thread its own malloc arena, up to eight per core.
 * Every connection has a thread and maps its requests there, so a burst of
 * connections left a dozen arenas each holding megabytes of freed,
 * fragmented memory: a 10,000 events/s soak reached 350 MiB of RSS, 150 MiB
 * with one arena per core. MALLOC_ARENA_MAX in the environment still wins.
 */
static void limit_malloc_arenas(void)
{
    if (getenv("MALLOC_ARENA_MAX"))
        return;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int arenas = cpus < 2 ? 2 : cpus > 8 ? 8 : (int)cpus;
    (void)mallopt(M_ARENA_MAX, arenas);
}

/*
 * Requests that pile up behind a slow commit (a storage stall of a second
 * holds some 200 of them, each with its body and mapped events) leave tens of
 * MiB free inside malloc's arenas afterwards, which glibc keeps: a soak's RSS
 * stayed 40 – 70 MiB higher after each stall. So every TRIM_EVERY_MS the main
 * thread looks at the process's size, and when it has grown by TRIM_GROWTH
 * since it last gave memory back (or since its smallest), malloc_trim returns
 * the free pages. A trim takes 1 – 10 ms, under the arenas' locks.
 */
#define TRIM_EVERY_MS 10000
#define TRIM_GROWTH (16L << 20)

struct trim {
    int64_t next_ms;
    long low; /* resident bytes after the last trim, or the fewest since */
};

static long resident_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return -1;
    long size, resident;
    int n = fscanf(f, "%ld %ld", &size, &resident);
    fclose(f);
    return n == 2 ? resident * sysconf(_SC_PAGESIZE) : -1;
}

static void trim_memory(struct trim *t)
{
    int64_t now = clock_mono_ms();
    if (now < t->next_ms)
        return;
    t->next_ms = now + TRIM_EVERY_MS;
    long before = resident_bytes();
    if (before < 0)
        return;
    if (t->low < 0 || before < t->low)
        t->low = before;
    if (before - t->low < TRIM_GROWTH)
        return;
    int64_t start = clock_mono_ns();
    malloc_trim(0);
    long after = resident_bytes();
    t->low = after >= 0 ? after : before;
    log_debug("returned free memory to the system",
              LOG_I("resident_mib_before", before >> 20) LOG_I("resident_mib_after", t->low >> 20)
                  LOG_I("us", (clock_mono_ns() - start) / 1000));
}

struct service {
    queue *q;
    struct ingest in;
    sender *sender;
    http_in *http;
};

/* Adds one reason (a JSON string) to the list of why the service is not ready. */
static void not_ready(int *ready, buf *reasons, const char *reason)
{
    if (!*ready)
        (void)!buf_addc(reasons, ',');
    *ready = 0;
    (void)!buf_adds(reasons, reason);
}

static int hook_ready(void *ctx, buf *reasons)
{
    struct service *s = ctx;
    int ready = 1;
    struct snapshot snap;
    reload_get(&snap);
    if (!snap.rs)
        not_ready(&ready, reasons, "\"rules not loaded\"");
    else if (!ingest_rules_available(&s->in))
        not_ready(&ready, reasons, "\"no rules engine builds (see the log): new events get 503\"");
    reload_put(&snap);
    if (!queue_healthy(s->q))
        not_ready(&ready, reasons, "\"storage failing\"");
    /* New events are refused (503): a load balancer sends them elsewhere. */
    struct queue_gauges qg;
    queue_gauges(s->q, &qg);
    if (qg.disk_low)
        not_ready(&ready, reasons, "\"disk nearly full (queue.min_free_mb): new events get 503\"");
    if (qg.full)
        not_ready(&ready, reasons, "\"queue full (queue.max_depth): new events get 503\"");
    /* Nothing can leave: better that Braze keeps its events than that they pile up here. */
    struct feed_status st[FEED_COUNT];
    sender_status(s->sender, st);
    int all = 1;
    for (int f = 0; f < FEED_COUNT; f++)
        all &= st[f].pause != PAUSE_NONE;
    if (all)
        not_ready(&ready, reasons,
                  "\"every feed is paused (no credentials, or refused by mParticle)\"");
    return ready;
}

static void hook_gauges(void *ctx, struct metrics_gauges *g)
{
    struct service *s = ctx;
    struct queue_gauges qg;
    queue_gauges(s->q, &qg);
    int64_t now = clock_wall_ms();
    for (int f = 0; f < FEED_COUNT; f++) {
        g->queue_depth[f] = qg.depth[f];
        /* a record stamped before the wall clock went back seems to come
         * from the future: none is younger than now */
        g->oldest_age_s[f] =
            qg.oldest_ms[f] && now > qg.oldest_ms[f] ? (double)(now - qg.oldest_ms[f]) / 1000.0 : 0;
    }
    g->dead_letters = qg.dead;
    g->requeued = qg.requeued;
    g->letters_removed = qg.letters_removed;
    g->queue_commits = qg.commits;
    g->queue_operations = qg.operations;
    g->dedup_ids = qg.dedup_ids;
    g->dedup_bytes = qg.dedup_bytes;
    g->disk_free_bytes = qg.disk_free_bytes;
    g->min_free_bytes = qg.min_free_bytes;
    g->event_names = sender_event_names(s->sender);
    struct feed_status st[FEED_COUNT];
    sender_status(s->sender, st);
    int64_t mono = clock_mono_ms();
    for (int f = 0; f < FEED_COUNT; f++) {
        g->paused[f] = st[f].pause == PAUSE_NO_CREDENTIALS ? 1 : st[f].pause == PAUSE_AUTH ? 2 : 0;
        g->send_failures[f] = st[f].failures;
        g->resume_in_s[f] = st[f].resume_ms > mono ? (double)(st[f].resume_ms - mono) / 1000.0 : 0;
        g->send_rate[f] = st[f].rate;
    }
    g->account_rate = st[0].account_rate;
    buf ignored;
    buf_init(&ignored, 1024);
    g->ready = hook_ready(ctx, &ignored);
    buf_free(&ignored);
    g->tls_not_after = tls_not_after();
}

static void log_feeds(const struct config *c, char *names, size_t len)
{
    names[0] = '\0';
    size_t used = 0;
    for (int f = 0; f < FEED_COUNT; f++) {
        if (!config_feed_ready(c, (enum feed)f))
            continue;
        int n = snprintf(names + used, len - used, "%s%s", used ? "," : "", FEED_NAMES[f]);
        if (n > 0 && (size_t)n < len - used)
            used += (size_t)n;
    }
    if (!used)
        str_copy(names, len, "none");
}

/* The signals the service takes, through a signalfd (main() blocked them in
 * every thread); -1 when it cannot. */
static int take_signals(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    if (sfd < 0)
        log_error("cannot take signals", LOG_S("error", strerror(errno)));
    return sfd;
}

/* A change in rules_dir: the reload waits for RELOAD_SETTLE_MS of quiet;
 * *changed_at is the first change it waits for. Changes that go on and on (a
 * file written to without a pause) hold it no longer than a file being
 * written may: RELOAD_WRITING_MAX_MS. */
static void settle(int64_t *reload_at, int64_t *changed_at)
{
    int64_t now = clock_mono_ms();
    if (!*reload_at)
        *changed_at = now;
    int64_t quiet = now + RELOAD_SETTLE_MS, latest = *changed_at + RELOAD_WRITING_MAX_MS;
    *reload_at = quiet < latest ? quiet : latest;
}

/* Reloads run on a thread of their own: their rule tests may take up to a
 * minute, and the main thread must stay free to read a SIGTERM (a stop that
 * waited for a reload answered batches 200 meanwhile, and its shutdown could
 * outlast the unit's TimeoutStopSec). Asks made during a reload make one more
 * after it. */
struct reloader {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    const char *trigger; /* a reload asked for and not begun (a literal); NULL: none */
    int stop;
    int started;
    pthread_t thread;
};

static void *reloader_main(void *arg)
{
    struct reloader *w = arg;
    pthread_setname_np(pthread_self(), "reload");
    char err[4096];
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->trigger && !w->stop)
            pthread_cond_wait(&w->wake, &w->mu);
        if (w->stop)
            break;
        const char *trigger = w->trigger;
        w->trigger = NULL;
        pthread_mutex_unlock(&w->mu);
        (void)!reload_now(trigger, err, sizeof err);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Its signals are blocked, as every thread's (see main): the main thread
 * reads them. */
static void reloader_start(struct reloader *w)
{
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->wake, NULL);
    w->started = pthread_create(&w->thread, NULL, reloader_main, w) == 0;
    if (!w->started)
        log_warn("cannot start the reload thread; reloads run on the main thread");
}

static void reloader_ask(struct reloader *w, const char *trigger)
{
    if (!w->started) {
        char err[4096];
        (void)!reload_now(trigger, err, sizeof err);
        return;
    }
    pthread_mutex_lock(&w->mu);
    w->trigger = trigger;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->mu);
}

/* After reload_cancel: a reload under way ends at its next rule test. */
static void reloader_stop(struct reloader *w)
{
    if (!w->started)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->mu);
    w->started = 0;
}

/* The main thread's loop: signals (sfd), changes in rules_dir, watched through
 * wfd (-1: not watched), and memory to give back (trim_memory); reloads go to
 * the reloader. Returns when told to stop. */
static int wait_for_stop(int sfd, int wfd, struct reloader *reloader)
{
    if (sfd < 0)
        return 1;
    int64_t reload_at = 0;  /* a rules_dir change waits to settle */
    int64_t changed_at = 0; /* the first change since the last such reload */
    struct trim trim = {clock_mono_ms() + TRIM_EVERY_MS, -1};
    for (;;) {
        struct pollfd fds[2] = {{sfd, POLLIN, 0}, {wfd, POLLIN, 0}};
        /* follow a rules_dir changed by any reload (also /admin/reload), and
         * one that comes back after it was replaced or removed */
        if (reload_watch_refresh())
            settle(&reload_at, &changed_at);
        int timeout = 1000;
        if (reload_at) {
            int64_t left = reload_at - clock_mono_ms();
            timeout = left > 0 ? (int)left : 0;
        }
        int n = poll(fds, wfd >= 0 ? 2 : 1, timeout);
        if (n < 0 && errno != EINTR)
            break;
        if (n > 0 && (fds[0].revents & POLLIN)) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
                if (si.ssi_signo == SIGHUP) {
                    reloader_ask(reloader, "SIGHUP");
                } else {
                    log_info("stopping",
                             LOG_S("signal", si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT"));
                    break;
                }
            }
        }
        if (n > 0 && wfd >= 0 && (fds[1].revents & POLLIN) && reload_watch_changed())
            settle(&reload_at, &changed_at);
        int64_t now = clock_mono_ms();
        if (reload_at && now >= reload_at && reload_watch_writing() &&
            now - changed_at < RELOAD_WRITING_MAX_MS) {
            reload_at = now + RELOAD_SETTLE_MS; /* a file half written is not loaded */
        } else if (reload_at && now >= reload_at) {
            reload_at = 0;
            reloader_ask(reloader, "rules_dir changed");
        }
        trim_memory(&trim);
        log_repeats_flush(0);
    }
    return 0;
}

/* During the shutdown, a SIGINT (Ctrl-C again) ends the process at once, by
 * that signal; a SIGTERM a supervisor sends again does not. Nothing accepted
 * is lost (each 200 was answered once its
 * events were committed; batches in flight to mParticle are sent again after
 * a restart, under the same ids), and Braze sends again a request left
 * unanswered. */
struct second_signal {
    int sfd;
    int stop[2]; /* a pipe, written when the shutdown is over */
    pthread_t thread;
    int started;
};

static void *second_signal_main(void *arg)
{
    struct second_signal *w = arg;
    pthread_setname_np(pthread_self(), "stop-watch");
    for (;;) {
        struct pollfd fds[2] = {{w->sfd, POLLIN, 0}, {w->stop[0], POLLIN, 0}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        if (fds[1].revents)
            return NULL;
        struct signalfd_siginfo si;
        if (!(fds[0].revents & POLLIN) || read(w->sfd, &si, sizeof si) != (ssize_t)sizeof si ||
            si.ssi_signo != SIGINT)
            continue;
        int signo = (int)si.ssi_signo;
        log_warn("stopping at once on SIGINT during the shutdown; unanswered requests are sent "
                 "again by Braze, batches in flight to mParticle after the restart");
        signal(signo, SIG_DFL);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, signo);
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
        raise(signo);
        _exit(128 + signo); /* not reached */
    }
}

static void second_signal_start(struct second_signal *w, int sfd)
{
    w->sfd = sfd;
    w->started = sfd >= 0 && pipe2(w->stop, O_CLOEXEC) == 0;
    if (w->started && pthread_create(&w->thread, NULL, second_signal_main, w) != 0) {
        close(w->stop[0]);
        close(w->stop[1]);
        w->started = 0;
    }
}

static void second_signal_stop(struct second_signal *w)
{
    if (!w->started)
        return;
    (void)!write(w->stop[1], "x", 1);
    pthread_join(w->thread, NULL);
    close(w->stop[0]);
    close(w->stop[1]);
    w->started = 0;
}

/* Tells systemd (a unit of Type=notify) how the service stands: READY=1 once
 * it listens and takes signals, STOPPING=1 as it stops. The protocol is a
 * datagram to the socket NOTIFY_SOCKET names, a path, or an abstract name
 * after '@'; without it, nothing. */
static void systemd_notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t len = path ? strlen(path) : 0;
    if (len < 2 || len >= sizeof sa.sun_path || (path[0] != '/' && path[0] != '@'))
        return;
    memcpy(sa.sun_path, path, len);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = '\0';
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    if (sendto(fd, state, strlen(state), MSG_NOSIGNAL, (const struct sockaddr *)&sa,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) < 0)
        log_warn("cannot tell systemd how the service stands",
                 LOG_S("state", state) LOG_S("error", strerror(errno)));
    close(fd);
}

/* Open files the service takes besides its connections: the queue's (three
 * SQLite connections with their WAL and shared memory), the sender's
 * connections to mParticle (8 a feed in flight, twice that kept), libcurl's
 * resolver threads left to finish a lookup that timed out (a socket pair
 * each), the log, signals, the rules' watch, with room to spare. */
#define FILES_RESERVED 128
/* A connection's: its socket, and the copy the request-time watchdog closes
 * it by (see http_in.c, on_connection). */
#define FILES_PER_CONNECTION 2
/* The fewest connections worth starting with. */
#define MIN_CONNECTIONS 16

/* Every connection takes FILES_PER_CONNECTION open files: the soft limit of
 * open files is raised to the hard one, and http.max_connections kept within
 * it, less FILES_RESERVED (past the limit, the server could accept no
 * connection, nor the queue open a file, and said nothing). Returns the
 * connections to take, or -1 when the limit leaves too few. */
static int connection_limit(int wanted)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return wanted;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < rl.rlim_max) {
        struct rlimit raised = {rl.rlim_max, rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
            rl.rlim_cur = rl.rlim_max;
    }
    if (rl.rlim_cur == RLIM_INFINITY ||
        rl.rlim_cur >= (rlim_t)wanted * FILES_PER_CONNECTION + FILES_RESERVED)
        return wanted;
    long long room = ((long long)rl.rlim_cur - FILES_RESERVED) / FILES_PER_CONNECTION;
    if (room < MIN_CONNECTIONS) {
        log_error("the open files this process may have leave no room for connections: raise "
                  "the limit (LimitNOFILE= of the unit, or ulimit -n)",
                  LOG_I("open_files_limit", (long long)rl.rlim_cur)
                      LOG_I("reserved", FILES_RESERVED) LOG_I("min_connections", MIN_CONNECTIONS));
        return -1;
    }
    log_warn("http.max_connections is more than the open files this process may have allow; "
             "fewer connections are taken (raise LimitNOFILE= of the unit, or ulimit -n)",
             LOG_I("max_connections", wanted) LOG_I("open_files_limit", (long long)rl.rlim_cur)
                 LOG_I("connections", room));
    return (int)room;
}

int service_run(const char *config_path)
{
    metrics_set_start_time(clock_wall_ms());
    limit_malloc_arenas();
    char err[4096];
    struct config *cfg = NULL;
    if (config_load(&cfg, config_path, err, sizeof err) != 0) {
        /* one structured line, in the format asked for where it can be read */
        const char *format = getenv("TRIBUTARY_LOG_FORMAT");
        log_configure("info", format ? format : "logfmt");
        log_error("configuration error; not started", LOG_S("error", err));
        return EX_CONFIG;
    }
    log_configure(cfg->log_level, cfg->log_format);
    log_warn_lines(cfg->warnings);

    ruleset *rs = NULL;
    if (ruleset_load(&rs, cfg, err, sizeof err) != 0) {
        log_error("cannot load the rules", LOG_S("error", err));
        config_unref(cfg);
        return EX_CONFIG;
    }
    buf report, warnings;
    buf_init(&report, 64 * 1024);
    buf_init(&warnings, 64 * 1024);
    int ntests = 0;
    if (reload_validate(rs, &report, &warnings, &ntests) != 0) {
        char why[4096];
        reload_report_excerpt(&report, why, sizeof why);
        log_error("the rules failed validation", LOG_S("error", why));
        buf_free(&report);
        buf_free(&warnings);
        ruleset_unref(rs);
        config_unref(cfg);
        return EX_CONFIG;
    }
    log_warn_lines(warnings.data);
    buf_free(&report);
    buf_free(&warnings);
    /* for the start-up line: once the server is up, a reload may free rs */
    char rules_version[64];
    str_copy(rules_version, sizeof rules_version, ruleset_version(rs));
    long long rule_files = (long long)ruleset_files(rs);
    reload_init(config_path ? config_path : cfg->file, config_ref(cfg), rs);
    rs = NULL;

    struct service s = {0};
    int rc = 1, sfd = -1;
    struct second_signal stop_watch = {0};
    struct reloader reloader = {0};
    struct queue_options qo = {
        .dir = cfg->data_dir,
        .sync_full = strcmp(cfg->queue_sync, "full") == 0,
        .max_depth = cfg->queue_max_depth,
        .dedup_window_ms = cfg->dedup_window_s * 1000,
        .exclusive = 1,
        .min_free_bytes = cfg->queue_min_free_mb << 20,
    };
    int opened = queue_open(&s.q, &qo, err, sizeof err);
    if (opened != 0) {
        log_error("cannot open the queue", LOG_S("error", err));
        if (opened == QUEUE_OPEN_REFUSED)
            rc = EX_CONFIG; /* a restart would meet the same file */
        goto done;
    }
    if (queue_unclean_stop(s.q))
        log_warn("the last run ended without a clean stop (killed, crashed, or the machine went "
                 "down); what it acknowledged is in the queue (with queue.sync=normal, but for its "
                 "last commits before a power loss), and batches it had sent are sent again with "
                 "the same source_request_id");
    if (ingest_init(&s.in, s.q, (int)cfg->http_threads) != 0) {
        log_error("out of memory");
        goto done;
    }
    if (sender_start(&s.sender, s.q, err, sizeof err) != 0) {
        log_error("cannot start the sender", LOG_S("error", err));
        goto done;
    }

    char host[256];
    int port = 0;
    if (config_listen_addr(cfg, host, sizeof host, &port) != 0) {
        log_error("invalid listen address", LOG_S("listen", cfg->listen));
        rc = EX_CONFIG;
        goto done;
    }
    if (cfg->inbound_tokens.n == 0 && cfg->inbound_hmac_secrets.n == 0)
        log_warn("no inbound.tokens or inbound.hmac_secrets configured: requests are accepted "
                 "without authentication (allowed on a loopback address only)");
    if (cfg->tls_cert && tls_use(cfg->tls_cert, cfg->tls_key, err, sizeof err) < 0) {
        log_error("cannot use the TLS certificate", LOG_S("error", err));
        rc = EX_CONFIG;
        goto done;
    }
    int max_connections = connection_limit((int)cfg->http_max_connections);
    if (max_connections < 0) {
        rc = EX_CONFIG;
        goto done;
    }
    struct http_in_options ho = {
        .host = host,
        .port = port,
        .max_connections = max_connections,
        .max_connections_per_ip = (int)cfg->http_max_connections_per_ip,
        .timeout_s = (int)cfg->http_timeout_s,
        .request_timeout_s = (int)cfg->http_request_timeout_s,
        .max_body = (size_t)cfg->inbound_max_body_bytes,
        .body_memory = (size_t)cfg->inbound_body_memory_mb << 20,
        .tls = cfg->tls_cert != NULL,
    };
    /* Watched before the first request can be answered: a rule written as soon
     * as the service is up is not missed. */
    int wfd = reload_watch_start();
    struct http_in_hooks hooks = {&s, hook_ready, hook_gauges};
    if (http_in_start(&s.http, &s.in, &ho, &hooks, err, sizeof err) != 0) {
        log_error("cannot start the HTTP server", LOG_S("error", err));
        goto done;
    }

    char feeds[64];
    log_feeds(cfg, feeds, sizeof feeds);
    struct queue_gauges qg;
    queue_gauges(s.q, &qg);
    long long depth = 0;
    for (int f = 0; f < FEED_COUNT; f++)
        depth += qg.depth[f];
    char listen[300];
    int bracket = strchr(host, ':') != NULL; /* an IPv6 address */
    snprintf(listen, sizeof listen, "%s://%s%s%s:%d", cfg->tls_cert ? "https" : "http",
             bracket ? "[" : "", host, bracket ? "]" : "", http_in_port(s.http));
    /* as a path from /: a relative one depends on the working directory */
    char *data_dir = realpath(cfg->data_dir, NULL);
    log_info("tributary started",
             LOG_S("version", TRIBUTARY_VERSION) LOG_S("listen", listen)
                 LOG_S("rules_version", rules_version) LOG_I("rule_files", rule_files)
                     LOG_S("feeds", feeds) LOG_I("queue_depth", depth)
                         LOG_S("queue_sync", queue_sync_mode(s.q))
                             LOG_S("data_dir", data_dir ? data_dir : cfg->data_dir));
    free(data_dir);
    if (strcmp(feeds, "none") == 0)
        log_warn("no mParticle credentials configured: events are accepted, queued and held "
                 "until feeds.<name>.key and .secret are set");

    sfd = take_signals();
    reloader_start(&reloader);
    if (sfd >= 0)
        systemd_notify("READY=1");
    rc = wait_for_stop(sfd, wfd, &reloader);
    systemd_notify("STOPPING=1");
done:
    reload_cancel();
    second_signal_start(&stop_watch, sfd);
    /* New batches get 503; the requests in progress are answered, then the
     * sender finishes its in-flight requests, and then the server stops and
     * the queue closes. Each wait is at most SHUTDOWN_GRACE_MS, within the
     * unit's TimeoutStopSec. */
    atomic_store(&s.in.draining, 1);
    http_in_drain(s.http, SHUTDOWN_GRACE_MS);
    sender_stop(s.sender, SHUTDOWN_GRACE_MS);
    http_in_stop(s.http);
    sender_free(s.sender); /* after the server: /readyz and /metrics ask it */
    reloader_stop(&reloader);
    reload_watch_stop();
    ingest_fini(&s.in);
    queue_free(s.q);
    reload_shutdown();
    tls_shutdown(); /* after the server: a handshake may hold a certificate */
    config_unref(cfg);
    second_signal_stop(&stop_watch);
    if (sfd >= 0)
        close(sfd);
    log_repeats_flush(1); /* what the limited lines have not told yet */
    if (rc == 0)
        log_info("stopped");
    return rc;
}
