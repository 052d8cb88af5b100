/*
 * reload: the configuration and rule set in force, and their replacement.
 *
 * Holds the current (config, ruleset) pair. Readers take references with
 * reload_get and keep a consistent pair for a whole request, so a request in
 * flight finishes on the rules it started with. reload_now loads the
 * configuration file and the rules again, validates them (every file compiles
 * and runs its top level within the limits, and every rule test passes) and only
 * then swaps; on failure the old pair stays in force.
 *
 * Workers notice a new generation by comparing the ruleset pointer and rebuild
 * their Lua state between requests (see ingest).
 */
#ifndef TRIBUTARY_RELOAD_H
#define TRIBUTARY_RELOAD_H

#include "config.h"
#include "rules.h"

struct snapshot {
    struct config *cfg;
    ruleset *rs;
    uint64_t generation;
};

/* Validates a ruleset: builds an engine and runs the rule tests. Appends the
 * reasons to report, and what is worth a warning to warnings (a line each);
 * returns 0 when good. *ntests receives the number of tests. */
int reload_validate(ruleset *rs, buf *report, buf *warnings, int *ntests) WUR;
/* The start of such a report that fits out (whole lines, and a note when
 * failures are left out), for a log line or an error message. */
void reload_report_excerpt(const buf *report, char *out, size_t outlen);

/* Installs the first pair (takes both references). config_path may be NULL. */
void reload_init(const char *config_path, struct config *cfg, ruleset *rs);
/* Releases the pair in force. */
void reload_shutdown(void);
/* Takes references on the pair in force; release with reload_put. */
void reload_get(struct snapshot *s);
void reload_put(struct snapshot *s);
/* *last_ok: 1 when the last reload succeeded, or none was tried since the
 * start, 0 when it was refused (the files on disk would refuse a restart
 * too); *loaded_ms: when the pair in force was loaded, at the start or that
 * reload (milliseconds since the UNIX epoch). */
void reload_status(int *last_ok, int64_t *loaded_ms);

/* Loads, validates and installs the configuration and rules. On failure the old
 * ones stay in force and err says why (file and line): -1, or RELOAD_STOPPING
 * when the service is stopping (see reload_cancel). `trigger` is logged. */
#define RELOAD_STOPPING (-2)
int reload_now(const char *trigger, char *err, size_t errlen) WUR;
/* At a stop: a reload under way ends at its next rule test without taking
 * effect, and any later one is refused. */
void reload_cancel(void);

/* Watching rules_dir (inotify): a file written, renamed, created or removed
 * there asks for a reload. Editors write in several steps, so the caller waits
 * RELOAD_SETTLE_MS after the last change before reloading, and while a rule
 * file written to is not closed yet (an upload that stalls), up to
 * RELOAD_WRITING_MAX_MS after the first change. */
#define RELOAD_SETTLE_MS 200
#define RELOAD_WRITING_MAX_MS 10000

/* Starts watching the rules_dir in force; returns a file descriptor to poll, or -1. */
int reload_watch_start(void);
/* Reads the pending notifications; 1 when one of them concerns a rule file. */
int reload_watch_changed(void);
/* 1 while a rule file is being written: created empty or written to, not
 * closed since, and written to within RELOAD_WRITING_MAX_MS. */
int reload_watch_writing(void);
/* Follows a rules_dir changed by a reload, and watches again one that was
 * replaced or missing: 1 then, as its rules need loading. */
int reload_watch_refresh(void);
void reload_watch_stop(void);

#endif
