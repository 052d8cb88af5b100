/*
 * sandbox: Lua 5.4 states that run untrusted scripts safely.
 *
 * Provides a state with an allow-listed environment (base functions without
 * load/dofile/loadfile/collectgarbage/rawset, read-only string/table/math/utf8,
 * os.time/date/clock), text-only loading, one environment table per chunk so
 * scripts cannot change each other's globals, and limits that a script cannot
 * escape:
 *   - memory: a custom allocator caps what a call may allocate (a caller can
 *     share one budget between calls, see struct sandbox_limits);
 *   - instructions: a count hook ends a call after its budget; once a limit
 *     trips, every further instruction raises again, so `pcall` cannot swallow it;
 *   - time: a deadline from the budget, for single instructions that cost what
 *     their operands hold; a watchdog thread (started with the first sandbox,
 *     stopped at exit, asleep while no call is under way) signals a call past
 *     it with SIGURG, whose handler is the sandbox's;
 *   - C functions the hook cannot interrupt (pattern matching, plain find,
 *     table.move, table.insert/remove) refuse inputs whose worst-case cost is
 *     beyond a bound; table.sort's comparisons, and gsub's replacements by a
 *     table or a function, look at the time limit each time; and every
 *     function of string, table, utf8 and math pays its budget for the time
 *     it took, in instructions of that time (by the wall clock at most an
 *     eighth of the budget; after such a call, the rest of the sandbox_call,
 *     and of the calls that share its budget, pays the thread's CPU time in
 *     full).
 *
 * Used by rules (the rule scripts) and config (the configuration file). Besides
 * those two, no module includes Lua headers.
 */
#ifndef TRIBUTARY_SANDBOX_H
#define TRIBUTARY_SANDBOX_H

#include "util.h"

#include <lua.h>
#include <stdint.h>

typedef struct sandbox sandbox;

enum sandbox_flags {
    SANDBOX_GETENV = 1, /* expose os.getenv (configuration files only) */
};

/* With SANDBOX_GETENV, the registry's table of this name holds each name
 * os.getenv was asked for (name = true). */
#define SANDBOX_ENV_READ "sandbox.env_read"

/* What one call may use. Calls share a memory budget when the caller lowers
 * `memory_bytes` from one call to the next by what sandbox_used grew since the
 * budget began; they share instructions and a time limit through
 * sandbox_call_shared. */
struct sandbox_limits {
    size_t memory_bytes;  /* the most the state may grow by during the call */
    int64_t instructions; /* Lua VM instructions per call (per shared budget) */
};

/* What the calls that share a budget (the rules of one event, a call per rule
 * file) have used of it, carried from each to the next: the instructions they
 * ran, their time limit, which began with the first and which the time of
 * library calls moved on, and whether a library call has paid its most by the
 * wall clock, after which the library calls of all of them pay the thread's
 * CPU time (see sandbox_timed). All zero before the first call. */
struct sandbox_share {
    int64_t steps;
    int64_t deadline_ns; /* clock_mono_ns; 0 before the first call */
    int cpu_timed;
};

enum sandbox_rc { SANDBOX_OK, SANDBOX_ERROR, SANDBOX_LIMIT };

/* An error raised inside the sandbox. */
struct sandbox_error {
    char msg[ERR_LEN]; /* the message, usually "file:line: text" */
    char where[256];   /* innermost script position "file:line", or "" */
};

/* Returns a new state, or NULL when out of memory. Caller frees with sandbox_free. */
sandbox *sandbox_new(int flags);
void sandbox_free(sandbox *sb);
lua_State *sandbox_lua(sandbox *sb);

/* From now on, every print of a rule is written (see rules_prints_unlimited). */
void sandbox_prints_unlimited(void);
/* While on, the rules' print writes nothing (a run that only looks for
 * errors). */
void sandbox_quiet(sandbox *sb, int on);

/* [-1, +0] Makes the value on top a global of every chunk loaded afterwards.
 * Tables should be made read-only first (sandbox_readonly). */
void sandbox_expose(sandbox *sb, const char *name);

/* [-1, +1] Replaces the C function on top with one that pays for the time it
 * takes from the call's instruction budget, as the string and table functions
 * do: for a host function whose work the count hook cannot see. Its argument
 * errors name it lib.name. */
void sandbox_timed(lua_State *L, const char *lib, const char *name);

/* [-1, +1] Replaces the table on top with a read-only view of it (pairs, # and
 * indexing work; assignment raises an error). Nested tables are not wrapped. */
void sandbox_readonly(lua_State *L);

/* [-0, +1] Loads a text chunk (never bytecode) with a fresh environment table and
 * pushes the function. On a syntax error returns -1 with "file:line: message". */
int sandbox_load(sandbox *sb, const char *chunkname, const char *src, size_t len, char *err,
                 size_t errlen) WUR;

/* [-(nargs+1), +nresults] Calls the function below the arguments under the limits.
 * On failure the stack is left as it was before the function was pushed. */
enum sandbox_rc sandbox_call(sandbox *sb, int nargs, int nresults, const struct sandbox_limits *lim,
                             struct sandbox_error *err);
/* sandbox_call for one of calls that share a budget (see struct sandbox_share;
 * borrowed, updated by the call): lim->instructions, its time limit and the
 * eighth of it that a library call pays at most by the wall clock are for all
 * of them together; a call that begins past that time limit ends at once. */
enum sandbox_rc sandbox_call_shared(sandbox *sb, int nargs, int nresults,
                                    const struct sandbox_limits *lim, struct sandbox_share *share,
                                    struct sandbox_error *err);

/* The clock_mono_ns by which a call of `instructions` started at start_ns
 * must end (its time limit; INT64_MAX for none): for host work on what rules
 * made, outside the call, that should end as a call would. */
int64_t sandbox_deadline_for(int64_t start_ns, int64_t instructions);
/* The running call's deadline, INT64_MAX outside a call: host functions that
 * loop in C, where the count hook cannot stop them, raise an error past it. */
int64_t sandbox_deadline(lua_State *L);
/* Whether the running call has tripped a limit, its time limit checked now:
 * once it has, every further instruction raises and the call ends as a
 * limit, whatever pcall catches. */
int sandbox_overdue(lua_State *L);

/* What the running call may still allocate before its memory limit (SIZE_MAX
 * outside a call): for host functions whose allocations must not fail. */
size_t sandbox_memory_left(lua_State *L);

/* Bytes in the state's objects, live or garbage not yet collected: what the
 * memory limit counts. */
size_t sandbox_used(const sandbox *sb);
/* Bytes the state holds: its objects, and the freed small blocks its pool keeps
 * for reuse. */
size_t sandbox_memory(const sandbox *sb);
/* True once a limit tripped: the state's scripts may have been cut halfway and
 * their globals may be inconsistent, so the owner should rebuild it. */
int sandbox_damaged(const sandbox *sb);

/* Pattern guard, exposed for tests: 0 when matching `pattern` against `subject`
 * is within the complexity bound, else -1 with a reason. gmatch: a leading '^'
 * is the byte itself, not an anchor; replacement: the length of gsub's
 * replacement text (0 otherwise). */
int sandbox_pattern_check(const char *pattern, size_t plen, const char *subject, size_t subject_len,
                          int gmatch, size_t replacement, char *err, size_t errlen);

#endif
