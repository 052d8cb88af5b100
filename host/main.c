/*
 * main: the command line.
 *
 *   tributary serve [--config FILE]
 *   tributary check [--config FILE]
 *   tributary map   [--config FILE] [--workspace NAME] [FILE|-]
 *   tributary dlq ..., tributary queue stats|names   (see dlq.h)
 *   tributary sign  [--config FILE] [--timestamp T] [FILE|-]
 *   tributary --help | --version
 */
#include "auth.h"
#include "config.h"
#include "dlq.h"
#include "log.h"
#include "mparticle.h"
#include "reload.h"
#include "rules.h"
#include "sender.h"
#include "service.h"
#include "tls.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef TRIBUTARY_VERSION
#define TRIBUTARY_VERSION "dev"
#endif

/* map reads at most this much input. */
#define MAP_INPUT_MAX (256u << 20)

static const char USAGE[] =
    "usage: tributary <command> [--config FILE] [arguments]\n"
    "\n"
    "Receives Braze Currents batches over HTTP, maps them with Lua rules, keeps them\n"
    "durably and delivers them to mParticle's server-to-server Events API.\n"
    "\n"
    "commands:\n"
    "  serve             run the service (SIGTERM stops, SIGHUP reloads)\n"
    "  check             validate the configuration and the rules, run the rule tests\n"
    "  map [FILE|-] [--workspace NAME]   dry run: print what the rules make of\n"
    "                    Currents JSON (an envelope, a JSON array, one event, or\n"
    "                    NDJSON), as sent with ?workspace=NAME; sends nothing\n"
    "  dlq list [--reason R] [--limit N]      dead letters, oldest first\n"
    "  dlq show ID                            one dead letter, with its Braze event\n"
    "  dlq requeue ID | --reason R | --all    run dead letters through the current rules\n"
    "                                         again and queue them for delivery (refused\n"
    "                                         when this command sees other feed credentials\n"
    "                                         than the service: --force routes with them)\n"
    "  dlq purge --older-than DURATION [--reason R]   delete old dead letters\n"
    "                                         (DURATION: a number and s, m, h, d or w: 7d)\n"
    "  queue stats       depth per feed, oldest event, batches not yet delivered,\n"
    "                    paused feeds and why\n"
    "  queue names       the custom event names sent to mParticle, in the order they\n"
    "                    first were (mParticle drops the events of new names past\n"
    "                    mparticle.event_names_limit)\n"
    "  queue forget-names [--] NAME... | --all   forget names cleaned up in mParticle,\n"
    "                    as `queue names` shows them (the service reads them again\n"
    "                    at its next reload)\n"
    "  sign [FILE|-] [--timestamp T]   print the Tributary-Signature header for a body,\n"
    "                    signed with the first of inbound.hmac_secrets at T (UNIX\n"
    "                    seconds; default now)\n"
    "\n"
    "options:\n"
    "  --config FILE     configuration file (default: ./" CONFIG_DEFAULT_FILE " when present;\n"
    "                    TRIBUTARY_* environment variables override it)\n"
    "  --json            machine-readable output (dlq, queue)\n"
    "  --force           dlq requeue: route with this command's feed credentials\n"
    "  -h, --help        this text\n"
    "  --version         print the version\n";

struct args {
    const char *command;
    const char *config;
    const char *positional[64]; /* queue forget-names takes many */
    int npositional;
    int json;
    int all;
    int force;
    const char *reason;
    const char *older_than;
    const char *limit;
    const char *timestamp;
    const char *workspace;
};

/* The configuration `make install` and its systemd unit use. */
#define INSTALLED_CONFIG "/etc/tributary/tributary.conf.lua"

/* Options that take a value: --name VALUE or --name=VALUE. */
static int value_option(int argc, char **argv, int *i, const char *name, const char **out)
{
    size_t n = strlen(name);
    const char *s = argv[*i];
    if (strncmp(s, name, n) != 0 || (s[n] != '=' && s[n] != '\0'))
        return 0;
    /* the second of two would win unseen: `--config A --config B` */
    if (*out) {
        fprintf(stderr, "tributary: %s given twice\n", name);
        return -1;
    }
    const char *v = s[n] == '=' ? s + n + 1 : *i + 1 < argc ? argv[++*i] : NULL;
    if (!v || !*v) {
        fprintf(stderr, "tributary: %s needs a value\n", name);
        return -1;
    }
    *out = v;
    return 1;
}

/* A word that is not an option: the command, then its arguments. */
static int add_argument(struct args *a, const char *s)
{
    if (!a->command) {
        a->command = s;
    } else if (a->npositional < (int)ARRAY_LEN(a->positional)) {
        a->positional[a->npositional++] = s;
    } else {
        fprintf(stderr, "tributary: too many arguments\n");
        return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, struct args *a)
{
    memset(a, 0, sizeof(*a));
    int options = 1; /* until "--": what follows it is an argument, "-x" too */
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (options && strcmp(s, "--") == 0) {
            options = 0;
            continue;
        }
        if (!options) {
            if (add_argument(a, s) != 0)
                return -1;
            continue;
        }
        int v;
        if ((v = value_option(argc, argv, &i, "--config", &a->config)) != 0 ||
            (v = value_option(argc, argv, &i, "--reason", &a->reason)) != 0 ||
            (v = value_option(argc, argv, &i, "--older-than", &a->older_than)) != 0 ||
            (v = value_option(argc, argv, &i, "--limit", &a->limit)) != 0 ||
            (v = value_option(argc, argv, &i, "--timestamp", &a->timestamp)) != 0 ||
            (v = value_option(argc, argv, &i, "--workspace", &a->workspace)) != 0) {
            if (v < 0)
                return -1;
        } else if (strcmp(s, "--json") == 0) {
            a->json = 1;
        } else if (strcmp(s, "--all") == 0) {
            a->all = 1;
        } else if (strcmp(s, "--force") == 0) {
            a->force = 1;
        } else if (s[0] == '-' && s[1] != '\0') {
            fprintf(stderr, "tributary: unknown option %s (see --help; -- ends the options)\n", s);
            return -1;
        } else if (add_argument(a, s) != 0) {
            return -1;
        }
    }
    return 0;
}

enum option_bit {
    O_REASON = 1,
    O_OLDER_THAN = 2,
    O_LIMIT = 4,
    O_TIMESTAMP = 8,
    O_JSON = 16,
    O_ALL = 32,
    O_FORCE = 64,
    O_WORKSPACE = 128
};

/* The options each command takes: another one given is refused rather than
 * ignored, as the command line meant something else than what would run. */
static int options_fit(const struct args *a)
{
    static const struct {
        const char *command, *sub;
        unsigned takes;
    } TAKES[] = {
        {"serve", NULL, 0},
        {"check", NULL, 0},
        {"map", NULL, O_WORKSPACE},
        {"sign", NULL, O_TIMESTAMP},
        {"dlq", "list", O_REASON | O_LIMIT | O_JSON},
        {"dlq", "show", O_JSON},
        {"dlq", "requeue", O_REASON | O_ALL | O_FORCE | O_JSON},
        {"dlq", "purge", O_OLDER_THAN | O_REASON | O_JSON},
        {"queue", "stats", O_JSON},
        {"queue", "names", O_JSON},
        {"queue", "forget-names", O_ALL | O_JSON},
    };
    static const struct {
        unsigned bit;
        const char *name;
    } NAMES[] = {{O_REASON, "--reason"}, {O_OLDER_THAN, "--older-than"},
                 {O_LIMIT, "--limit"},   {O_TIMESTAMP, "--timestamp"},
                 {O_JSON, "--json"},     {O_ALL, "--all"},
                 {O_FORCE, "--force"},   {O_WORKSPACE, "--workspace"}};
    unsigned given = (a->reason ? O_REASON : 0) | (a->older_than ? O_OLDER_THAN : 0) |
                     (a->limit ? O_LIMIT : 0) | (a->timestamp ? O_TIMESTAMP : 0) |
                     (a->json ? O_JSON : 0) | (a->all ? O_ALL : 0) | (a->force ? O_FORCE : 0) |
                     (a->workspace ? O_WORKSPACE : 0);
    const char *sub = a->npositional ? a->positional[0] : NULL;
    for (size_t i = 0; i < ARRAY_LEN(TAKES); i++) {
        if (strcmp(TAKES[i].command, a->command) != 0 ||
            (TAKES[i].sub && (!sub || strcmp(sub, TAKES[i].sub) != 0)))
            continue;
        for (size_t j = 0; j < ARRAY_LEN(NAMES); j++) {
            if (given & ~TAKES[i].takes & NAMES[j].bit) {
                fprintf(stderr, "tributary: %s does not apply to %s%s%s (see --help)\n",
                        NAMES[j].name, a->command, TAKES[i].sub ? " " : "",
                        TAKES[i].sub ? TAKES[i].sub : "");
                return 0;
            }
        }
        return 1;
    }
    return 1; /* an unknown command or subcommand is named where it is dispatched */
}

/* Refuses positional arguments a command does not take: an operator who wrote
 * `check FILE` for `check --config FILE` must not read "ok" for the wrong file. */
static int too_many_arguments(const struct args *a, int max, const char *what)
{
    if (a->npositional <= max)
        return 0;
    fprintf(stderr,
            "tributary: %s takes %s; '%s' is not one (the configuration is --config FILE)\n",
            a->command, what, a->positional[max]);
    return 1;
}

static int cmd_check(const struct args *a)
{
    if (too_many_arguments(a, 0, "no arguments"))
        return 2;
    rules_prints_unlimited();
    struct config *c = config_load_for_command(a->config, 1);
    if (!c)
        return 1;
    char err[ERR_LEN];
    /* a start serves a certificate outside its dates (and raises an alarm);
     * a reload keeps the one in use instead: either way, say so now */
    if (c->tls_cert && c->tls_key && tls_check_pair(c->tls_cert, c->tls_key, 1, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        config_unref(c);
        return 1;
    }
    ruleset *rs = NULL;
    if (ruleset_load(&rs, c, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        config_unref(c);
        return 1;
    }
    buf report, warnings;
    buf_init(&report, 1 << 20);
    buf_init(&warnings, 1 << 20);
    int ntests = 0;
    int rc = reload_validate(rs, &report, &warnings, &ntests);
    log_print_warnings(warnings.data);
    buf_free(&warnings);
    if (rc != 0) {
        fputs(report.data ? report.data : "rules failed validation\n", stderr);
    } else {
        printf("ok: configuration %s, %zu rule file%s, %d rule test%s passed, rules version %s\n",
               c->file ? c->file : "(defaults)", ruleset_files(rs),
               ruleset_files(rs) == 1 ? "" : "s", ntests, ntests == 1 ? "" : "s",
               ruleset_version(rs));
    }
    buf_free(&report);
    ruleset_unref(rs);
    config_unref(c);
    return rc == 0 ? 0 : 1;
}

static char *read_input(const char *path, size_t *len)
{
    FILE *f = stdin;
    if (path && strcmp(path, "-") != 0) {
        f = fopen(path, "rb");
        if (!f) {
            perror(path);
            return NULL;
        }
    }
    char *input = read_stream(f, MAP_INPUT_MAX, len);
    if (!input && errno == EFBIG)
        fprintf(stderr, "tributary: input larger than %u MiB\n", MAP_INPUT_MAX >> 20);
    else if (!input)
        fprintf(stderr, "tributary: cannot read %s: %s\n", f == stdin ? "standard input" : path,
                strerror(errno));
    if (f != stdin)
        fclose(f);
    return input;
}

static int print_outcome(const struct mapping *m, size_t i, const char *environment,
                         const char *version, buf *line)
{
    const struct outcome *o = &m->outcomes[i];
    int rc = buf_printf(line, "{\"index\":%zu,", i);
    rc |= buf_adds(line, "\"event_id\":");
    rc |= buf_json_str(line, o->event_id.p, o->event_id.n);
    rc |= buf_adds(line, ",\"event_type\":");
    rc |= buf_json_str(line, o->event_type.p, o->event_type.n);
    rc |= buf_addc(line, ',');
    rc |= buf_printf(line, "\"rules_version\":\"%s\",", version);
    if (o->kind == OUTCOME_RECORD) {
        const struct record *r = &m->records[o->index];
        struct batch_part part = {r->batch, r->event, r->event_id};
        char srid[UUID_STR_LEN];
        rc |= mparticle_source_request_id(&part, 1, srid);
        rc |= buf_printf(line, "\"feed\":\"%s\",\"batch\":", FEED_NAMES[r->feed]);
        rc |= mparticle_build_batch(line, environment, srid, &part, 1);
    } else if (o->kind == OUTCOME_DROPPED) {
        rc |= buf_printf(line, "\"dropped\":\"%s\",\"detail\":", DROP_REASON_NAMES[o->reason]);
        rc |= buf_json_str(line, o->detail.p, o->detail.n);
        rc |= buf_adds(line, ",\"rule\":");
        rc |= buf_json_str(line, o->dropped_by.p, o->dropped_by.n);
    } else {
        const struct dead_letter *d = &m->dead[o->index];
        rc |= buf_printf(line, "\"dead_letter\":\"%s\",\"detail\":", d->reason);
        rc |= buf_json_str(line, d->detail.p, d->detail.n);
    }
    rc |= buf_adds(line, "}\n");
    return rc ? -1 : 0;
}

static int cmd_map(const struct args *a)
{
    if (too_many_arguments(a, 1, "at most one input file"))
        return 2;
    rules_prints_unlimited();
    struct config *c = config_load_for_command(a->config, 0);
    if (!c)
        return 1;
    /* without --workspace: as a request without one, whatever the list */
    const char *why = a->workspace && *a->workspace
                          ? config_workspace_problem(c, a->workspace, strlen(a->workspace))
                          : NULL;
    if (why) {
        fprintf(stderr, "tributary: --workspace: %s\n", why);
        config_unref(c);
        return 2;
    }
    if (!(a->workspace && *a->workspace) && config_workspace_problem(c, NULL, 0))
        fprintf(stderr, "tributary: note: inbound.workspaces is set, and the service answers a "
                        "request without ?workspace= with 503; mapped as an event stored before "
                        "the list was (--workspace NAME maps as for a request naming one)\n");
    int rc = 1;
    char err[ERR_LEN];
    ruleset *rs = NULL;
    rules *r = NULL;
    char *input = NULL;
    size_t len = 0;
    struct mapping m;
    mapping_init(&m);
    m.keep_outcomes = 1;
    if (ruleset_load(&rs, c, err, sizeof err) != 0 || rules_new(&r, rs, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        goto done;
    }
    input = read_input(a->npositional ? a->positional[0] : NULL, &len);
    if (!input)
        goto done;
    struct input_error ie;
    if (rules_map(r, input, len, INPUT_ANY, str_opt(a->workspace), &m, &ie) != 0) {
        if (ie.index >= 0)
            fprintf(stderr, "tributary: event %ld: %s\n", ie.index, ie.reason);
        else
            fprintf(stderr, "tributary: %s\n", ie.reason);
        goto done;
    }
    buf line;
    buf_init(&line, 64u << 20);
    rc = 0;
    for (size_t i = 0; i < m.noutcomes; i++) {
        buf_reset(&line);
        if (print_outcome(&m, i, c->environment, ruleset_version(rs), &line) != 0) {
            fprintf(stderr, "tributary: output for event %zu too large\n", i);
            rc = 1;
            break;
        }
        fwrite(line.data, 1, line.len, stdout);
    }
    buf_free(&line);
done:
    mapping_free(&m);
    free(input);
    rules_free(r);
    ruleset_unref(rs);
    config_unref(c);
    return rc;
}

/* Prints a Tributary-Signature header for a request body, signed with the first
 * of inbound.hmac_secrets, so producers can test their setup. */
static int cmd_sign(const struct args *a)
{
    if (too_many_arguments(a, 1, "at most one input file"))
        return 2;
    struct config *c = config_load_for_command(a->config, 0);
    if (!c)
        return 1;
    int rc = 1;
    size_t len = 0;
    char *body = NULL;
    if (c->inbound_hmac_secrets.n == 0) {
        fprintf(stderr, "tributary: no inbound.hmac_secrets configured "
                        "(TRIBUTARY_INBOUND_HMAC_SECRETS)\n");
        goto done;
    }
    int64_t t = clock_wall_ms() / 1000;
    if (a->timestamp && parse_int64(a->timestamp, 0, INT64_MAX / 2, &t) != 0) {
        fprintf(stderr, "tributary: --timestamp needs UNIX seconds\n");
        rc = 2;
        goto done;
    }
    body = read_input(a->npositional ? a->positional[0] : NULL, &len);
    if (!body)
        goto done;
    char value[256];
    if (auth_sign(c->inbound_hmac_secrets.items[0], t, body, len, value, sizeof value) != 0) {
        fprintf(stderr, "tributary: cannot sign\n");
        goto done;
    }
    printf("%s: %s\n", AUTH_SIGNATURE_HEADER, value);
    rc = 0;
done:
    free(body);
    config_unref(c);
    return rc;
}

/* A closed standard stream would be taken by the next file opened (the lock
 * file, the queue), and log lines would be written into it. */
static void open_standard_streams(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
            int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
            if (n >= 0 && n != fd)
                close(n); /* not the lowest free number: leave it */
        }
    }
}

/* rc, or 1 when the command's output could not be written whole (a full
 * disk): a truncated file must not look like a command that succeeded. */
static int output_written(int rc)
{
    int flushed = fflush(stdout) == 0;
    if (flushed && !ferror(stdout))
        return rc;
    fprintf(stderr, "tributary: cannot write the output: %s\n",
            flushed ? "a write failed" : strerror(errno));
    return rc ? rc : 1;
}

/* Blocks three signals in this thread and every thread it starts. */
static void block_signals(int a, int b, int c)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, a);
    sigaddset(&set, b);
    sigaddset(&set, c);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

/* The commands on the queue write beside the service: stopped inside a
 * write (Ctrl-Z, or a background job's terminal I/O), one would hold the
 * queue's lock, and every request to the service would fail with it until
 * the command went on. They do not stop; Ctrl-C ends them, and what they did
 * not commit is undone. */
static void hold_job_control(void)
{
    block_signals(SIGTSTP, SIGTTIN, SIGTTOU);
}

int main(int argc, char **argv)
{
    open_standard_streams();
    /* The queue, its WAL and the lock file hold event data (PII): private to
     * the service's user, whatever umask it was started with. */
    umask(077);
    /* anywhere among the options, but not after "--": a name or file there
     * may be spelt so */
    for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(USAGE, stdout);
            return output_written(0);
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("tributary %s\n", TRIBUTARY_VERSION);
            return output_written(0);
        }
    }
    struct args a;
    if (parse_args(argc, argv, &a) != 0)
        return 2;
    if (!a.command) {
        fputs(USAGE, stderr);
        return 2;
    }
    if (!options_fit(&a))
        return 2;
    int serve = strcmp(a.command, "serve") == 0;
    if (serve) {
        /* Signals are taken synchronously by the main thread (a signalfd), so
         * every thread started afterwards must have them blocked; from the
         * start, so that a SIGHUP sent as the service starts is a reload, not
         * the default action's exit (which systemd counts as a clean stop). */
        block_signals(SIGTERM, SIGINT, SIGHUP);
    }
    if (serve) {
        /* a client or mParticle that closes its connection is an error of
         * that call, not the end of the service */
        signal(SIGPIPE, SIG_IGN);
        if (sender_global_init() != 0) {
            fprintf(stderr, "tributary: cannot initialise the HTTP client library\n");
            return 1;
        }
        if (too_many_arguments(&a, 0, "no arguments"))
            return 2;
        return service_run(a.config);
    }
    /* A command's output read by `head` ends it, as any filter's (SIGPIPE);
     * output that cannot be written otherwise (a full disk) is its failure. */
    int rc;
    struct cli_options o = {a.config, a.positional, a.npositional, a.reason, a.older_than,
                            a.limit,  a.all,        a.json,        a.force};
    if (strcmp(a.command, "check") == 0) {
        rc = cmd_check(&a);
    } else if (strcmp(a.command, "map") == 0) {
        rc = cmd_map(&a);
    } else if (strcmp(a.command, "sign") == 0) {
        rc = cmd_sign(&a);
    } else if (strcmp(a.command, "dlq") == 0) {
        hold_job_control();
        rc = dlq_main(&o);
    } else if (strcmp(a.command, "queue") == 0) {
        hold_job_control();
        rc = queue_main(&o);
    } else {
        fprintf(stderr, "tributary: unknown command '%s' (see --help)\n", a.command);
        return 2;
    }
    if (rc == 1 && !a.config && access(CONFIG_DEFAULT_FILE, F_OK) != 0 &&
        access(INSTALLED_CONFIG, F_OK) == 0)
        fprintf(stderr,
                "tributary: no --config given, and no ./%s here: the installed service's is "
                "--config %s\n",
                CONFIG_DEFAULT_FILE, INSTALLED_CONFIG);
    return output_written(rc);
}
