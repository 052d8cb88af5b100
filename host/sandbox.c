#include "sandbox.h"

#include "log.h"
#include "metrics.h"
#include "pool.h"

#include <ctype.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The count hook fires every HOOK_STEP instructions; a tripped limit makes it
 * fire on every instruction. */
#define HOOK_STEP 1000

/* Pattern matching runs in C where the hook cannot interrupt it, and Lua's
 * matcher backtracks: an item quantified with *, + or - is tried with each
 * length of the run of subject bytes it matches from where it stands, one with
 * ? twice, and the rest of the pattern (up to its whole length) is walked again
 * after each try; %b and a back-reference compare up to the whole subject. So
 * a call costs at most: the pattern's length, times the product over those
 * items of the longest run in the subject of bytes the item matches, plus one
 * (2 for ?, n + 1 for %b and back-references), times the places it starts
 * from. Anchored with ^, that is one; otherwise n + 1, of which only those
 * where an unquantified first item matches go further; each of the others
 * costs what the matcher reads of the pattern up to that item's end (a [set]
 * is read through at each: 500 bytes of it on 25 MB took 27 s). gsub adds its
 * replacement's length for each place. Calls whose bound exceeds
 * PATTERN_COST_MAX are refused (a step takes 1 - 2 ns: a second or two at
 * most); what a call took is charged afterwards (see timed). The runs make the
 * bound follow the subject: the common trim, ^%s*(.-)%s*$, is bounded by 12 n
 * steps on text without long runs of spaces, whatever its length, and by
 * 12 (n + 1)^3 on n spaces, refused from 436 of them. A run is measured only
 * while the bound from the subject's length alone is too high, over at most
 * PATTERN_SCAN_MAX bytes of subject per call. */
#define PATTERN_MAX_LEN 512
#define PATTERN_COST_MAX 1e9
#define PATTERN_SCAN_MAX (64 * 1024 * 1024)

/* os.date works through its format in C, one conversion at a time. */
#define DATE_FORMAT_MAX 256

/* C loops the hook cannot interrupt are bounded: string.rep of empty strings,
 * table.move over a range. */
#define TABLE_MOVE_MAX 10000000

/* The library functions (string, table, math, utf8, os, tonumber, and the
 * arithmetic on strings) do their work in C, where the count hook cannot see
 * it: each call is timed and pays for its time afterwards, as instructions of
 * the same time. What an instruction takes is measured once per process
 * (calibrate): so the charge follows the machine, and a run under valgrind,
 * where everything is some 50 times slower, charges the same instructions. A
 * loop that calls library functions then runs out of budget as a loop of Lua
 * instructions would; what one call may do is bounded beforehand (patterns
 * and plain searches by PATTERN_COST_MAX, table.move by TABLE_MOVE_MAX,
 * os.date's format by DATE_FORMAT_MAX, everything by the memory limit). */
#define CALIBRATION_LOOPS 50000

/* What a call is charged is its wall-clock time: the thread's own CPU time
 * takes a system call to read (some 500 ns, more than most library calls
 * cost). So that a thread the host deschedules during a call (a busy machine:
 * tens of milliseconds) is not charged for other threads' time, a call pays at
 * most 1/TIMED_CALL_SHARE of the budget by the wall clock; after such a call
 * the rest of the sandbox_call, and of the calls that share its budget (see
 * struct sandbox_share), is timed by the thread's CPU time, exactly, so that a
 * loop of costly calls runs out of budget at its second, and so do the rule
 * files of one event that make one costly call each. */
#define TIMED_CALL_SHARE 8

/* Some VM instructions cost what their operands hold: comparing or joining
 * two long strings is one instruction. So a call also has a time limit: what
 * its instructions take at the measured speed, DEADLINE_FACTOR times over,
 * plus DEADLINE_SLACK_NS for a thread the host deschedules. Calls that share
 * a budget share one, from the start of the first: each rule file of an event
 * had its own, and the event ran for as many. The count hook reads the clock
 * each time it fires (a vDSO read, some 20 ns per HOOK_STEP instructions),
 * and so does every allocation of LARGE_ALLOC bytes or more outside a timed
 * library call: the instructions that cost the most build long strings. (A
 * library call pays for its time afterwards, at most an eighth of the budget
 * when the host descheduled it: a slow one must not lose its event.) */
#define DEADLINE_FACTOR 10
#define DEADLINE_SLACK_NS (250 * 1000 * 1000LL)
#define LARGE_ALLOC (64 * 1024)

/* Yet one instruction can take a second (comparing two long strings of NUL
 * bytes: strcoll once per NUL), and a thousand of them pass between two count
 * hooks. So a watchdog thread looks at every call under way each WATCH_MS and
 * signals the thread of one past its deadline (WATCH_SIGNAL, ignored by
 * default); while no call is under way, it sleeps until one begins. The
 * handler sets the count hook to fire at the next instruction, as lua.c does
 * for SIGINT. A call then ends within WATCH_MS and one instruction of its
 * deadline. The time of a library call is not the time limit's: the call pays
 * for it in instructions (see timed), and the deadline moves on by as much. */
#define WATCH_MS 20
#define WATCH_SIGNAL SIGURG

/* print() from scripts goes to the log, at most this many lines per second,
 * of at most PRINT_MAX_BYTES of text each. */
#define PRINT_LINES_PER_SECOND 20
#define PRINT_MAX_BYTES 8192

enum trip { TRIP_NONE, TRIP_INSTRUCTIONS, TRIP_MEMORY, TRIP_TIME };

struct sandbox {
    lua_State *L;
    pool *pool;   /* the state's small objects */
    size_t used;  /* bytes held by the state */
    size_t limit; /* SIZE_MAX outside sandbox_call */
    struct {
        void *ptr;
        size_t osize, nsize; /* 0: an allocation succeeded since */
    } refused;               /* the last allocation refused for the limit */
    int refused_twice;       /* one was asked again and refused again (see trip_on_memory_error) */
    int64_t steps;           /* run by the call, and by the calls before it that share its budget */
    int64_t budget;          /* of the call, or of all the calls that share it */
    _Atomic int64_t deadline_ns; /* clock_mono_ns the call must end by (INT64_MAX: none,
                                    or outside a call); the watchdog reads it */
    int cpu_timed; /* library calls timed by the thread's CPU time (see TIMED_CALL_SHARE) */
    int in_timed;  /* timed library calls under way: they pay for their time after */
    enum trip tripped;
    int damaged;
    int quiet;    /* see sandbox_quiet */
    int base_ref; /* registry reference to the table behind every chunk's globals */
    char where[256];
    /* Past near (the last eighth of the memory limit), the count hook notes
     * where a script runs in mem_where, and a library call or pcall that met
     * a memory error notes the line that made it when none is noted yet: a
     * memory error calls no message handler, and a memory limit met names
     * that line. (Not from the allocator: Lua's stack is not always one it
     * can walk while it allocates.) */
    size_t near;
    char mem_where[256];
    /* the call under way, as the watchdog sees it (under call_lock) */
    pthread_mutex_t call_lock;
    pthread_t caller;
    int calling;
    volatile sig_atomic_t armed;      /* the count hook set to fire at once by the signal */
    sandbox *watch_prev, *watch_next; /* every sandbox (under watch.lock) */
};

static sandbox *from_lua(lua_State *L)
{
    return *(sandbox **)lua_getextraspace(L);
}

/* ---- limits ------------------------------------------------------------- */

static void sb_hook(lua_State *L, lua_Debug *ar);

static int64_t deadline_of(const sandbox *sb)
{
    return atomic_load_explicit(&sb->deadline_ns, memory_order_relaxed);
}

static void set_deadline(sandbox *sb, int64_t ns)
{
    atomic_store_explicit(&sb->deadline_ns, ns, memory_order_relaxed);
}

/* Trips the time limit once the call's deadline has passed (outside a call
 * there is none); from then on every instruction raises. Returns whether a
 * limit has tripped. */

static int past_deadline(sandbox *sb)
{
    if (sb->tripped == TRIP_NONE && clock_mono_ns() > deadline_of(sb)) {
        sb->tripped = TRIP_TIME;
        lua_sethook(sb->L, sb_hook, LUA_MASKCOUNT, 1);
    }
    return sb->tripped != TRIP_NONE;
}

/* Writes to where ("file:line") the innermost line of a script on the stack,
 * from level on (a C function has none); 0 when there is none, where
 * unchanged. */
static int note_where(char *where, size_t len, lua_State *L, int level)
{
    lua_Debug ar;
    for (; lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0) {
            snprintf(where, len, "%s:%d", ar.short_src, ar.currentline);
            return 1;
        }
    }
    return 0;
}

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    sandbox *sb = ud;
    if (!ptr)
        osize = 0; /* osize then encodes the object type, not a size */
    if (nsize == 0) {
        pool_resize(sb->pool, ptr, osize, 0);
        sb->used -= osize;
        return NULL;
    }
    if (nsize > osize && (nsize - osize > sb->limit || sb->used > sb->limit - (nsize - osize))) {
        /* Lua collects and asks again; a second no is a memory error (see
         * trip_on_memory_error) */
        if (sb->refused.ptr == ptr && sb->refused.osize == osize && sb->refused.nsize == nsize)
            sb->refused_twice = 1;
        sb->refused.ptr = ptr;
        sb->refused.osize = osize;
        sb->refused.nsize = nsize;
        return NULL;
    }
    if (nsize >= LARGE_ALLOC && nsize > osize && sb->in_timed == 0 && past_deadline(sb))
        return NULL;
    void *p = pool_resize(sb->pool, ptr, osize, nsize);
    if (!p)
        return NULL;
    sb->used = sb->used - osize + nsize;
    sb->refused.nsize = 0;
    return p;
}

static void sb_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    sandbox *sb = from_lua(L);
    int armed = sb->armed; /* by the watchdog's signal, not HOOK_STEP instructions on */
    if (armed)
        sb->armed = 0;
    else
        sb->steps += HOOK_STEP;
    if (sb->tripped == TRIP_NONE && sb->steps > sb->budget)
        sb->tripped = TRIP_INSTRUCTIONS;
    if (sb->used > sb->near)
        (void)note_where(sb->mem_where, sizeof sb->mem_where, L, 0);
    if (past_deadline(sb)) {
        /* From now on every instruction raises: handlers cannot keep running. */
        lua_sethook(L, sb_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "%s limit exceeded",
                   sb->tripped == TRIP_MEMORY ? "memory"
                   : sb->tripped == TRIP_TIME ? "time"
                                              : "instruction");
    }
    if (armed) /* the deadline moved on during a library call */
        lua_sethook(L, sb_hook, LUA_MASKCOUNT, HOOK_STEP);
}

/* ---- the watchdog (see WATCH_MS) ----------------------------------------- */

/* The handler reads the deadline with a plain load. */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2 && ATOMIC_LONG_LOCK_FREE == 2,
               "the signal handler needs lock-free 64-bit atomics");

/* One thread for the process, started with its first sandbox and stopped at
 * exit; the child of a fork starts its own at its first call. While no call is
 * under way it sleeps until one begins. */
static struct {
    pthread_mutex_t lock;
    sandbox *head;      /* every sandbox, under lock */
    atomic_int running; /* the thread was started (set under lock) */
    int started;        /* and thread is it (under lock) */
    int stop;           /* at exit (under lock) */
    pthread_t thread;
    sem_t ready;         /* posted once it is in its loop */
    pthread_cond_t wake; /* a call began, or stop */
    atomic_int asleep;   /* waiting for wake (set under lock) */
} watch = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};
static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static int watch_ready; /* the handler and the fork handlers are in place */

/* The sandbox whose call this thread runs, for the signal handler (static TLS:
 * a plain load there). */
static _Thread_local __attribute__((tls_model("initial-exec"))) sandbox *volatile calling_here;

static void on_watch_signal(int signo)
{
    (void)signo;
    int saved = errno;
    sandbox *sb = calling_here;
    if (sb && clock_mono_ns() > deadline_of(sb)) {
        sb->armed = 1;
        lua_sethook(sb->L, sb_hook, LUA_MASKCOUNT, 1);
    }
    errno = saved;
}

static void *watch_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "rules-watch");
    sem_post(&watch.ready);
    for (;;) {
        pthread_mutex_lock(&watch.lock);
        if (watch.stop) {
            pthread_mutex_unlock(&watch.lock);
            return NULL;
        }
        /* asleep before the look: a call that begins after it sees asleep
         * (the call_lock orders the two) and wakes the thread */
        atomic_store(&watch.asleep, 1);
        int64_t now = clock_mono_ns();
        int calls = 0;
        for (sandbox *sb = watch.head; sb; sb = sb->watch_next) {
            pthread_mutex_lock(&sb->call_lock);
            calls += sb->calling;
            /* again each time: a library call may move the deadline on */
            if (sb->calling && now > deadline_of(sb))
                pthread_kill(sb->caller, WATCH_SIGNAL);
            pthread_mutex_unlock(&sb->call_lock);
        }
        while (calls == 0 && atomic_load(&watch.asleep) && !watch.stop)
            pthread_cond_wait(&watch.wake, &watch.lock);
        atomic_store(&watch.asleep, 0);
        pthread_mutex_unlock(&watch.lock);
        struct timespec pause = {0, WATCH_MS * 1000000L};
        nanosleep(&pause, NULL);
    }
}

static void watch_stop_at_exit(void)
{
    pthread_mutex_lock(&watch.lock);
    int started = watch.started;
    watch.started = 0;
    watch.stop = 1;
    pthread_cond_signal(&watch.wake);
    pthread_mutex_unlock(&watch.lock);
    if (started)
        pthread_join(watch.thread, NULL);
}

static void watch_before_fork(void)
{
    pthread_mutex_lock(&watch.lock);
}

static void watch_after_fork(void)
{
    pthread_mutex_unlock(&watch.lock);
}

static void watch_in_child(void)
{
    pthread_mutex_unlock(&watch.lock);
    sem_destroy(&watch.ready);
    if (sem_init(&watch.ready, 0, 0) != 0)
        watch_ready = 0;
    /* the parent's thread may have been waiting on it, and is not here to
     * leave it (pthread_cond_destroy would wait for it) */
    pthread_cond_t fresh = PTHREAD_COND_INITIALIZER;
    watch.wake = fresh;
    atomic_store(&watch.running, 0);
    atomic_store(&watch.asleep, 0);
    watch.started = 0;
}

static void watch_init(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_watch_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    watch_ready = sem_init(&watch.ready, 0, 0) == 0 && sigaction(WATCH_SIGNAL, &sa, NULL) == 0 &&
                  pthread_atfork(watch_before_fork, watch_after_fork, watch_in_child) == 0 &&
                  atexit(watch_stop_at_exit) == 0;
}

/* Starts the thread unless it was; returns once it is in its loop, so that no
 * fork finds it starting (a sanitizer's locks of a starting thread would stay
 * taken in the child). Without it, the count hook's checks remain. */
static void watch_start(void)
{
    pthread_mutex_lock(&watch.lock);
    int start = !atomic_load(&watch.running) && !watch.stop;
    if (start) {
        atomic_store(&watch.running, 1);
        watch.started = watch_ready && pthread_create(&watch.thread, NULL, watch_main, NULL) == 0;
    }
    int started = watch.started;
    pthread_mutex_unlock(&watch.lock);
    if (!start)
        return;
    if (!started) {
        log_warn("cannot start the rules' watchdog thread; a rule's time limit is checked every "
                 "1,000 instructions only");
        return;
    }
    while (sem_wait(&watch.ready) != 0 && errno == EINTR)
        ;
}

static int watch_add(sandbox *sb)
{
    pthread_once(&watch_once, watch_init);
    if (pthread_mutex_init(&sb->call_lock, NULL) != 0)
        return -1;
    watch_start();
    pthread_mutex_lock(&watch.lock);
    sb->watch_next = watch.head;
    if (watch.head)
        watch.head->watch_prev = sb;
    watch.head = sb;
    pthread_mutex_unlock(&watch.lock);
    return 0;
}

static void watch_remove(sandbox *sb)
{
    pthread_mutex_lock(&watch.lock);
    if (sb->watch_prev)
        sb->watch_prev->watch_next = sb->watch_next;
    else
        watch.head = sb->watch_next;
    if (sb->watch_next)
        sb->watch_next->watch_prev = sb->watch_prev;
    pthread_mutex_unlock(&watch.lock);
    pthread_mutex_destroy(&sb->call_lock);
}

/* A call begins: the watchdog may signal this thread once it is past its
 * deadline (set before). Returns the call it runs within, if any. */
static sandbox *watch_begin(sandbox *sb)
{
    if (!atomic_load_explicit(&watch.running, memory_order_relaxed))
        watch_start(); /* in the child of a fork */
    pthread_mutex_lock(&sb->call_lock);
    sb->caller = pthread_self();
    sb->calling = 1;
    pthread_mutex_unlock(&sb->call_lock);
    if (atomic_load(&watch.asleep)) {
        pthread_mutex_lock(&watch.lock);
        atomic_store(&watch.asleep, 0);
        pthread_cond_signal(&watch.wake);
        pthread_mutex_unlock(&watch.lock);
    }
    atomic_signal_fence(memory_order_seq_cst); /* the deadline before the handler's view */
    sandbox *outer = calling_here;
    calling_here = sb;
    return outer;
}

static void watch_end(sandbox *sb, sandbox *outer)
{
    calling_here = outer;
    atomic_signal_fence(memory_order_seq_cst);
    pthread_mutex_lock(&sb->call_lock);
    sb->calling = 0;
    pthread_mutex_unlock(&sb->call_lock);
}

/* A refused allocation is not yet the memory limit: Lua then runs an
 * emergency collection and asks again, which may well succeed. Only an
 * allocation refused after that raises a memory error (LUA_ERRMEM), which trips
 * the limit wherever a protected call sees it, so that pcall cannot catch it.
 * A __close handler that raises an error of its own as the stack unwinds
 * replaces the memory error with its own: a protected call that fails after an
 * allocation was refused twice inside it trips the limit too. (Lua leaves its
 * string table as it is when its growth is refused twice: a rule that comes
 * that close to its limit and fails in the same protected call meets it.) */
static void trip_on_memory_error(lua_State *L, int status)
{
    sandbox *sb = from_lua(L);
    if (status == LUA_OK || sb->tripped != TRIP_NONE ||
        (status != LUA_ERRMEM && !sb->refused_twice))
        return;
    sb->tripped = TRIP_MEMORY;
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, 1);
}

/* lua_pcall for the sandbox's own protected calls (pcall, xpcall, a timed
 * library call): an allocation refused twice counts for the call it happened
 * in (see trip_on_memory_error), not for a later one that fails for another
 * reason. */
static int protected_call(lua_State *L, int nargs, int nresults, int msgh)
{
    sandbox *sb = from_lua(L);
    int outer = sb->refused_twice;
    sb->refused_twice = 0;
    int status = lua_pcall(L, nargs, nresults, msgh);
    trip_on_memory_error(L, status);
    sb->refused_twice |= outer;
    /* one large allocation refused (string.rep), before the hook saw the
     * state near its limit: the line that called */
    if (status == LUA_ERRMEM && !sb->mem_where[0])
        (void)note_where(sb->mem_where, sizeof sb->mem_where, L, 0);
    return status;
}

/* Charges cost instructions to the call's budget; beyond it the instruction
 * limit trips, as in the count hook. */
static void charge(lua_State *L, int64_t cost)
{
    sandbox *sb = from_lua(L);
    sb->steps += cost;
    if (sb->tripped == TRIP_NONE && sb->steps > sb->budget) {
        sb->tripped = TRIP_INSTRUCTIONS;
        lua_sethook(L, sb_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "instruction limit exceeded");
    }
}

static double ns_per_instruction = 4; /* until calibrated: Lua 5.4 on x86-64 */
static pthread_once_t calibrated = PTHREAD_ONCE_INIT;
static int64_t calibration_steps;

static void count_steps(lua_State *L, lua_Debug *ar)
{
    (void)L;
    (void)ar;
    calibration_steps += HOOK_STEP;
}

/* Times a loop of plain Lua instructions, counted by the same hook rules run
 * under; the fastest of three runs (the others met a busy machine). */
static void calibrate(void)
{
    lua_State *L = luaL_newstate();
    if (!L)
        return;
    double best = 0;
    for (int run = 0; run < 3; run++) {
        char src[128];
        snprintf(src, sizeof src, "local x = 0 for i = 1, %d do x = x + i %% 7 end return x",
                 CALIBRATION_LOOPS);
        if (luaL_loadstring(L, src) != LUA_OK)
            break;
        calibration_steps = 0;
        lua_sethook(L, count_steps, LUA_MASKCOUNT, HOOK_STEP);
        int64_t start = clock_mono_ns();
        int rc = lua_pcall(L, 0, 1, 0);
        int64_t took = clock_mono_ns() - start;
        lua_sethook(L, NULL, 0, 0);
        lua_settop(L, 0);
        if (rc != LUA_OK || calibration_steps == 0)
            break;
        double ns = (double)took / (double)calibration_steps;
        if (best == 0 || ns < best)
            best = ns;
    }
    lua_close(L);
    if (best >= 0.5 && best <= 10000)
        ns_per_instruction = best;
}

/* The tail of every wrapper: calls the original function (upvalue 1) with the
 * arguments as they are and returns how many results it left (nresults, or all
 * of them with LUA_MULTRET). */
static int call_original(lua_State *L, int nresults)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, nresults);
    return lua_gettop(L);
}

/* Calls upvalue 1 with the arguments and returns its results, charging the
 * time it took, also when it fails (a pattern found malformed halfway through
 * a long subject has done the work all the same). */
static int timed(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    sandbox *sb = from_lua(L);
    int cpu = sb->cpu_timed;
    int64_t began = clock_mono_ns();
    int64_t start = cpu ? clock_thread_ns() : began;
    int64_t steps = sb->steps;
    sb->in_timed++;
    int status = protected_call(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    sb->in_timed--;
    int64_t ended = clock_mono_ns();
    int64_t took = (cpu ? clock_thread_ns() : ended) - start;
    /* it pays in instructions, not in the time limit's time (see WATCH_MS) */
    int64_t deadline = deadline_of(sb);
    if (sb->in_timed == 0 && deadline != INT64_MAX && ended - began < INT64_MAX - deadline)
        set_deadline(sb, deadline + (ended - began));
    /* Lua that the call ran (a gsub replacement function, a sort comparator)
     * was counted by the hook, and the calls timed within it charged: the call
     * pays for the rest of its time, or it paid them twice */
    int64_t cost = (int64_t)((double)took / ns_per_instruction) - (sb->steps - steps);
    if (cost < 0)
        cost = 0;
    int64_t most = sb->budget / TIMED_CALL_SHARE > 0 ? sb->budget / TIMED_CALL_SHARE : 1;
    if (!cpu && cost > most) {
        cost = most;
        sb->cpu_timed = 1;
    }
    charge(L, cost);
    if (status != LUA_OK)
        return lua_error(L);
    return lua_gettop(L);
}

static void name_for_errors(lua_State *L, const char *lib, const char *name);

void sandbox_timed(lua_State *L, const char *lib, const char *name)
{
    name_for_errors(L, lib, name);
    lua_pushcclosure(L, timed, 1);
}

/* string.gmatch: the work is in the iterator it returns, which is timed too. */
static int timed_gmatch(lua_State *L)
{
    call_original(L, 1);
    lua_pushcclosure(L, timed, 1);
    return 1;
}

/* [-0, +0] Times every function of the library table on top (see timed). */
static void time_lib(lua_State *L)
{
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        /* lib key value */
        if (lua_iscfunction(L, -1)) {
            int gmatch =
                lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), "gmatch") == 0;
            lua_pushcclosure(L, gmatch ? timed_gmatch : timed, 1);
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, -4); /* replacing an existing key's value keeps lua_next valid */
        } else {
            lua_pop(L, 1);
        }
    }
}

/* Message handler: records where in a script the error happened and turns a
 * non-string error object into a readable message. */
static int sb_msgh(lua_State *L)
{
    sandbox *sb = from_lua(L);
    sb->where[0] = '\0';
    (void)note_where(sb->where, sizeof sb->where, L, 1);
    if (!lua_isstring(L, 1)) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            return 1;
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    return 1;
}

/* pcall and xpcall for scripts: like the standard ones, except that a tripped
 * limit is raised again instead of being caught. */
static int sb_pcall(lua_State *L)
{
    luaL_checkany(L, 1);
    int status = protected_call(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    if (from_lua(L)->tripped != TRIP_NONE)
        return luaL_error(L, "limit exceeded");
    lua_pushboolean(L, status == LUA_OK);
    lua_insert(L, 1);
    return lua_gettop(L);
}

/* xpcall's message handler, guarded: the error of a tripped limit is raised
 * inside the count hook, where hooks are off, and a handler run from there
 * would run without any limit. Once a limit tripped, the error goes on as it
 * is and the rule's handler is not run. */
static int guarded_msgh(lua_State *L)
{
    if (from_lua(L)->tripped != TRIP_NONE)
        return 1;
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

static int sb_xpcall(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    lua_pushcclosure(L, guarded_msgh, 1);
    lua_replace(L, 2);
    lua_pushboolean(L, 1);
    lua_pushvalue(L, 1);
    lua_rotate(L, 3, 2); /* f msgh true f args... */
    int status = protected_call(L, n - 2, LUA_MULTRET, 2);
    if (from_lua(L)->tripped != TRIP_NONE)
        return luaL_error(L, "limit exceeded");
    if (status != LUA_OK) {
        lua_pushboolean(L, 0);
        lua_pushvalue(L, -2);
        return 2;
    }
    return lua_gettop(L) - 2;
}

static atomic_int g_prints_unlimited;

void sandbox_prints_unlimited(void)
{
    atomic_store(&g_prints_unlimited, 1);
}

void sandbox_quiet(sandbox *sb, int on)
{
    sb->quiet = on;
}

static int sb_print(lua_State *L)
{
    static struct log_budget printed;
    if (!log_enabled(LOG_INFO) || from_lua(L)->quiet)
        return 0; /* its line would not be written */
    if (!atomic_load(&g_prints_unlimited) &&
        !log_budget_allows(&printed, LOG_INFO, PRINT_LINES_PER_SECOND,
                           "script print: more lines this second than the log takes; the rest of "
                           "them are left out (see tributary_rule_prints_dropped_total)")) {
        metrics_add(M_RULE_PRINTS_DROPPED, 1);
        return 0;
    }
    /* where the rule called it: the file, whole (short_src cuts a long path),
     * and the line; none through pcall, a C function */
    char at[PATH_MAX + 24] = "";
    lua_Debug ar;
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar) && ar.currentline > 0)
        snprintf(at, sizeof at, "%s:%d",
                 ar.source[0] == '@' || ar.source[0] == '=' ? ar.source + 1 : ar.source,
                 ar.currentline);
    int n = lua_gettop(L); /* before luaL_buffinit, which pushes a placeholder */
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        if (i > 1)
            luaL_addchar(&b, '\t');
        luaL_tolstring(L, i, NULL);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    size_t len, shown;
    const char *text = lua_tolstring(L, -1, &len);
    shown = len;
    if (memchr(text, '\0', len)) {
        /* a log line's fields end at a NUL: each is shown as U+2400, in what
         * is logged of the text only (a cut one is read no further) */
        luaL_buffinit(L, &b);
        for (size_t i = 0; i < len && i < PRINT_MAX_BYTES + 4; i++) {
            if (text[i])
                luaL_addchar(&b, text[i]);
            else
                luaL_addstring(&b, "\u2400");
        }
        luaL_pushresult(&b);
        text = lua_tolstring(L, -1, &shown);
    }
    if (len <= PRINT_MAX_BYTES) {
        if (at[0])
            log_info("script print", LOG_S("text", text) LOG_S("at", at));
        else
            log_info("script print", LOG_S("text", text));
        return 0;
    }
    /* the start of it, between two characters (the character across the cut
     * is read whole to find its end); the log line has a cap */
    char start[PRINT_MAX_BYTES + 4];
    size_t head = shown < sizeof start - 1 ? shown : sizeof start - 1;
    memcpy(start, text, head);
    start[utf8_sanitize(start, head, PRINT_MAX_BYTES)] = '\0';
    if (at[0])
        log_info("script print, cut",
                 LOG_S("text", start) LOG_I("bytes", (long long)len) LOG_S("at", at));
    else
        log_info("script print, cut", LOG_S("text", start) LOG_I("bytes", (long long)len));
    return 0;
}

/* ---- pattern guard ------------------------------------------------------ */

/* Where the single-byte item at p ends, as Lua's matcher reads it: '.', %x, a
 * [set] or a literal byte. NULL when the pattern is malformed there; the
 * matcher raises its own error the first time it gets there. */
static const char *item_end(const char *p, const char *end)
{
    char c = *p++;
    if (c == '%')
        return p < end ? p + 1 : NULL;
    if (c == '[') {
        if (p < end && *p == '^')
            p++;
        do { /* a ']' first in a set is literal; %x escapes */
            if (p >= end)
                return NULL;
            if (*p++ == '%' && p < end)
                p++;
        } while (p >= end || *p != ']');
        return p + 1;
    }
    return p;
}

/* Whether byte c is in class %cl (%a, %d, ...; upper case is the complement;
 * any other character stands for itself), as in Lua's lstrlib. */
static int class_matches(int c, int cl)
{
    int res;
    switch (tolower(cl)) {
    case 'a':
        res = isalpha(c);
        break;
    case 'c':
        res = iscntrl(c);
        break;
    case 'd':
        res = isdigit(c);
        break;
    case 'g':
        res = isgraph(c);
        break;
    case 'l':
        res = islower(c);
        break;
    case 'p':
        res = ispunct(c);
        break;
    case 's':
        res = isspace(c);
        break;
    case 'u':
        res = isupper(c);
        break;
    case 'w':
        res = isalnum(c);
        break;
    case 'x':
        res = isxdigit(c);
        break;
    case 'z': /* Lua's deprecated class of the NUL byte */
        res = c == 0;
        break;
    default:
        return cl == c;
    }
    return isupper(cl) ? !res : res != 0;
}

/* Whether byte c is in the set from p ('[') to ec (its ']'). */
static int set_matches(int c, const char *p, const char *ec)
{
    int in = 1;
    if (p[1] == '^') {
        in = 0;
        p++;
    }
    while (++p < ec) {
        if (*p == '%') {
            p++;
            if (class_matches(c, (unsigned char)*p))
                return in;
        } else if (p[1] == '-' && p + 2 < ec) {
            p += 2;
            if ((unsigned char)p[-2] <= c && c <= (unsigned char)*p)
                return in;
        } else if ((unsigned char)*p == c) {
            return in;
        }
    }
    return !in;
}

/* Whether byte c matches the single-byte item from p to ep. */
static int item_matches(int c, const char *p, const char *ep)
{
    switch (*p) {
    case '.':
        return 1;
    case '%':
        return class_matches(c, (unsigned char)p[1]);
    case '[':
        return set_matches(c, p, ep - 1);
    default:
        return (unsigned char)*p == c;
    }
}

/* A backtracking item and the tries it may take at one place: n + 1 until the
 * run of the item from p to ep is measured (p is NULL for those that may take
 * the whole subject whatever it holds: '.', %b, back-references). */
struct backtrack {
    const char *p, *ep;
    double tries;
};

/* Scans s for the bytes that match the item from p to ep: returns how many
 * there are, and their longest run in *longest. */
static size_t matching_bytes(const char *p, const char *ep, const char *s, size_t n,
                             size_t *longest)
{
    unsigned char in[256];
    for (int c = 0; c < 256; c++)
        in[c] = (unsigned char)item_matches(c, p, ep);
    size_t count = 0, run = 0;
    *longest = 0;
    for (size_t i = 0; i < n; i++) {
        run = in[(unsigned char)s[i]] ? run + 1 : 0;
        count += run > 0;
        *longest = run > *longest ? run : *longest;
    }
    return count;
}

/* The bound of the call (see PATTERN_COST_MAX): `fails`, what the places where
 * the match ends at once cost, and `places` where it may go on, each with its
 * tries, a walk of the pattern for each, and `per_place` more (gsub's
 * replacement). */
static double pattern_cost(const struct backtrack *b, int nb, double fails, double places,
                           double walk, double per_place)
{
    double tries = 1;
    for (int k = 0; k < nb; k++)
        tries *= b[k].tries;
    return fails + places * (tries * walk + per_place);
}

int sandbox_pattern_check(const char *p, size_t plen, const char *s, size_t n, int gmatch,
                          size_t replacement, char *err, size_t errlen)
{
    if (plen > PATTERN_MAX_LEN) {
        str_printf(err, errlen, "pattern longer than %d bytes", PATTERN_MAX_LEN);
        return -1;
    }
    struct backtrack b[PATTERN_MAX_LEN / 2]; /* an item takes two bytes at least */
    int nb = 0;
    const char *end = p + plen;
    int anchored = !gmatch && plen > 0 && p[0] == '^';
    double whole = (double)n + 1;
    const char *first = NULL, *first_end = NULL; /* an unquantified first item */
    int at_first = !anchored;
    for (const char *q = anchored ? p + 1 : p; q < end;) {
        if (*q == '(' || *q == ')') {
            q++;
            continue;
        }
        int is_first = at_first;
        at_first = 0;
        if (*q == '$' && q + 1 == end) {
            q++;
        } else if (*q == '%' && q + 1 < end && q[1] == 'b') {
            /* %bxy scans ahead for the balance */
            if (end - q < 4)
                break;
            b[nb++] = (struct backtrack){NULL, NULL, whole};
            q += 4;
        } else if (*q == '%' && q + 1 < end && isdigit((unsigned char)q[1])) {
            /* a back-reference compares up to the whole capture */
            b[nb++] = (struct backtrack){NULL, NULL, whole};
            q += 2;
        } else if (*q == '%' && q + 1 < end && q[1] == 'f') {
            /* %f[set]: a frontier, tried once */
            if (q + 2 >= end || q[2] != '[' || !(q = item_end(q + 2, end)))
                break;
        } else {
            const char *ep = item_end(q, end);
            if (!ep)
                break;
            if (ep < end && *ep == '?') {
                b[nb++] = (struct backtrack){NULL, NULL, 2};
                ep++;
            } else if (ep < end && (*ep == '*' || *ep == '+' || *ep == '-')) {
                b[nb++] = (struct backtrack){*q == '.' ? NULL : q, ep, whole};
                ep++;
            } else if (is_first && *q != '.') {
                /* from a place this item fails, the match ends at once */
                first = q;
                first_end = ep;
            }
            q = ep;
        }
    }
    double fails = anchored ? 0 : whole, places = anchored ? 1 : whole;
    double walk = plen > 0 ? (double)plen : 1;
    size_t scanned = 0, longest;
    for (int k = 0;
         pattern_cost(b, nb, fails, places, walk, (double)replacement) > PATTERN_COST_MAX;) {
        if (first && n <= PATTERN_SCAN_MAX - scanned) {
            places = (double)matching_bytes(first, first_end, s, n, &longest);
            /* where the first item fails, the matcher has read the pattern up
             * to its end: the captures it opens and the whole item (a [set] up
             * to its ']') */
            fails = (whole - places) * (double)(first_end - p);
            first = NULL;
            scanned += n;
            continue;
        }
        while (k < nb && !b[k].p)
            k++;
        if (k == nb || n > PATTERN_SCAN_MAX - scanned) {
            char with[64] = "";
            if (replacement)
                str_printf(with, sizeof with, " and a %zu-byte replacement", replacement);
            str_printf(err, errlen,
                       "pattern too complex for a %zu-byte subject%s (%d backtracking items%s)", n,
                       with, nb, anchored ? "" : ", unanchored");
            return -1;
        }
        (void)matching_bytes(b[k].p, b[k].ep, s, n, &longest);
        b[k].tries = (double)longest + 1;
        scanned += n;
        k++;
    }
    return 0;
}

/* gsub's replacement when it is a function (upvalue 1), called for each
 * match with its captures: a look at the time limit, then the function. gsub
 * calls a C function (pcall) from C, where the count hook cannot stop it. */
static int gsub_call(lua_State *L)
{
    if (past_deadline(from_lua(L)))
        return luaL_error(L, "time limit exceeded");
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* The __index of an empty stand-in for gsub's replacement table (upvalue 1),
 * looked up by gsub for each match with its first capture, as the table
 * would be: a look at the time limit, then the table's value, through its
 * __index as gsub reads it. gsub looks a table up from C, where the count
 * hook cannot stop it: through a chain of some 2,000 tables linked by
 * __index, one gsub over a megabyte took 22 s. */
static int gsub_index(lua_State *L)
{
    if (past_deadline(from_lua(L)))
        return luaL_error(L, "time limit exceeded");
    lua_settop(L, 2);
    lua_gettable(L, lua_upvalueindex(1));
    return 1;
}

/* [-0, +0] Puts gsub's replacement (argument 3), when it is a function or a
 * table, behind one that looks at the time limit before each match (see
 * gsub_call and gsub_index): what gsub does with it is the same. */
static void gsub_timed_replacement(lua_State *L)
{
    int type = lua_type(L, 3);
    if (type == LUA_TFUNCTION) {
        lua_pushvalue(L, 3);
        lua_pushcclosure(L, gsub_call, 1);
    } else if (type == LUA_TTABLE) {
        lua_createtable(L, 0, 0); /* the stand-in */
        lua_createtable(L, 0, 1); /* its metatable */
        lua_pushvalue(L, 3);
        lua_pushcclosure(L, gsub_index, 1);
        lua_setfield(L, -2, "__index");
        lua_setmetatable(L, -2);
    } else {
        return;
    }
    lua_replace(L, 3);
}

/* Wraps string.find/match/gmatch/gsub: checks the bound, then calls the original
 * (upvalue 1). Upvalue 2 is the function's name: gmatch reads a leading '^' as
 * itself, find's fourth argument asks for a plain search, and gsub's third may
 * be a replacement text, walked for each match, or a table or a function,
 * looked up or called for each match behind a look at the time limit. */
static int sb_pattern_fn(lua_State *L)
{
    size_t n, plen, replacement = 0;
    const char *s = luaL_checklstring(L, 1, &n);
    const char *p = luaL_checklstring(L, 2, &plen);
    const char *name = lua_tostring(L, lua_upvalueindex(2));
    /* string.find(s, p, init, plain): a plain search compares the needle at
     * every place it could start */
    int plain = strcmp(name, "find") == 0 && lua_toboolean(L, 4);
    if (plain && (double)n * (double)plen > PATTERN_COST_MAX)
        return luaL_error(L, "plain search of a %I-byte needle in a %I-byte subject is too large",
                          (lua_Integer)plen, (lua_Integer)n);
    int gsub = strcmp(name, "gsub") == 0;
    /* a number is its text (lua_tolstring makes it that text in place) */
    if (gsub && (lua_type(L, 3) == LUA_TSTRING || lua_type(L, 3) == LUA_TNUMBER))
        lua_tolstring(L, 3, &replacement);
    if (!plain) {
        char err[200];
        if (sandbox_pattern_check(p, plen, s, n, strcmp(name, "gmatch") == 0, replacement, err,
                                  sizeof err) != 0)
            return luaL_error(L, "%s", err);
    }
    if (gsub)
        gsub_timed_replacement(L);
    return call_original(L, LUA_MULTRET);
}

/* string.rep: Lua loops n times even when the result is empty (and needs no
 * memory), so an empty result is answered here. Larger results are bounded by
 * the memory limit when the buffer is allocated. */
static int sb_rep(lua_State *L)
{
    size_t l, lsep = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);
    if (n <= 0 || (l == 0 && (lsep == 0 || n == 1))) {
        lua_pushliteral(L, "");
        return 1;
    }
    return call_original(L, 1);
}

/* The table functions read and write elements in C, where the count hook
 * cannot stop them: a __len metamethod could claim any length (and another at
 * the next call), and an __index or __newindex chain of tables makes every
 * element walk it (2,000 tables deep: minutes for one table.move). Tables
 * with any of them are refused; idx is an argument, which may be absent. */
static void plain_table(lua_State *L, int idx)
{
    static const char *const FIELDS[] = {"__len", "__index", "__newindex"};
    if (lua_type(L, idx) != LUA_TTABLE)
        return;
    for (size_t i = 0; i < ARRAY_LEN(FIELDS); i++) {
        if (luaL_getmetafield(L, idx, FIELDS[i]) != LUA_TNIL)
            luaL_error(L, "tables with a %s metamethod are not supported here", FIELDS[i]);
    }
}

/* table.move(a1, f, e, t [, a2]) copies element by element in C: bounded. */
static int sb_move(lua_State *L)
{
    plain_table(L, 1);
    plain_table(L, 5);
    lua_Integer f = luaL_checkinteger(L, 2);
    lua_Integer e = luaL_checkinteger(L, 3);
    if (e >= f && (e - f >= TABLE_MOVE_MAX || e - f < 0))
        return luaL_error(L, "table.move over more than %d elements", TABLE_MOVE_MAX);
    return call_original(L, LUA_MULTRET);
}

/* table.insert, table.remove, table.concat and table.unpack: on a plain
 * table only (see plain_table). */
static int sb_plain_table(lua_State *L)
{
    plain_table(L, 1);
    return call_original(L, LUA_MULTRET);
}

/* table.sort's comparator for every sort: the rule's own (upvalue 1; nil for
 * <), after a look at the clock. The comparisons run in C, where the count hook
 * cannot stop them: a comparator that is a C function, or long strings
 * compared (Lua compares strings with strcoll, once per NUL byte), kept a sort
 * going for minutes. */
static int sort_compare(lua_State *L)
{
    if (past_deadline(from_lua(L)))
        return luaL_error(L, "time limit exceeded");
    if (lua_isnil(L, lua_upvalueindex(1))) {
        lua_pushboolean(L, lua_compare(L, 1, 2, LUA_OPLT));
        return 1;
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 2, 1);
    return 1;
}

/* table.sort(t [, comp]): on a plain table only (see plain_table), and every
 * comparison goes through sort_compare. */
static int sb_sort(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TFUNCTION);
    plain_table(L, 1);
    lua_settop(L, 2);
    lua_pushcclosure(L, sort_compare, 1);
    return call_original(L, 0);
}

/* os.date: a format longer than DATE_FORMAT_MAX is refused. */
static int sb_date(lua_State *L)
{
    size_t n = 0;
    if (lua_type(L, 1) == LUA_TSTRING)
        (void)lua_tolstring(L, 1, &n);
    if (n > DATE_FORMAT_MAX)
        return luaL_error(L, "os.date: a format of more than %d bytes", DATE_FORMAT_MAX);
    return call_original(L, 1);
}

/* os.getenv, which keeps the names it is asked for (SANDBOX_ENV_READ). */
static int sb_getenv(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TSTRING) {
        if (lua_getfield(L, LUA_REGISTRYINDEX, SANDBOX_ENV_READ) != LUA_TTABLE) {
            lua_pop(L, 1);
            lua_newtable(L);
            lua_pushvalue(L, -1);
            lua_setfield(L, LUA_REGISTRYINDEX, SANDBOX_ENV_READ);
        }
        lua_pushvalue(L, 1);
        lua_pushboolean(L, 1);
        lua_rawset(L, -3);
        lua_pop(L, 1);
    }
    return call_original(L, 1);
}

/* [-0, +0] Names the function on top "lib.name" in the registry's table of
 * loaded libraries, where lauxlib looks for the name of a function called from C
 * when it raises an argument error. A wrapper is called from C (by timed), and
 * its errors would otherwise say "bad argument #1 to '?'"; the originals are
 * found under their library there already. */
static void name_for_errors(lua_State *L, const char *lib, const char *name)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushfstring(L, "%s.%s", lib, name);
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

/* [-0, +0] Replaces lib[name] (lib on top, called lib_name) by a C closure over
 * the original. */
static void wrap(lua_State *L, const char *lib_name, const char *name, lua_CFunction fn)
{
    lua_getfield(L, -1, name);
    lua_pushcclosure(L, fn, 1);
    name_for_errors(L, lib_name, name);
    lua_setfield(L, -2, name);
}

/* setmetatable, without finalizers: a __gc metamethod would run whenever the
 * collector gets to it, in host code, outside every limit. */
static int sb_setmetatable(lua_State *L)
{
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        int t = lua_rawget(L, 2);
        lua_pop(L, 1);
        if (t != LUA_TNIL)
            return luaL_error(L, "finalizers (__gc) are not allowed in scripts");
    }
    return call_original(L, 1);
}

/* ---- environment -------------------------------------------------------- */

static int ro_newindex(lua_State *L)
{
    return luaL_error(L, "attempt to modify a read-only table (field '%s')",
                      lua_isstring(L, 2) ? lua_tostring(L, 2) : "?");
}

static int ro_next(lua_State *L)
{
    /* upvalue 1: the real table; arguments: (proxy, key) */
    lua_settop(L, 2);
    lua_pushvalue(L, 2);
    if (lua_next(L, lua_upvalueindex(1)))
        return 2;
    lua_pushnil(L);
    return 1;
}

static int ro_pairs(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, ro_next, 1);
    lua_pushvalue(L, 1); /* the proxy, never the real table */
    lua_pushnil(L);
    return 3;
}

static int ro_len(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)luaL_len(L, lua_upvalueindex(1)));
    return 1;
}

/* next, through a read-only view to the table it shows: `next(tributary.apps)
 * == nil`, the usual test of emptiness, read the view, always empty. */
static int sb_next(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TTABLE && lua_getmetatable(L, 1)) {
        lua_pushliteral(L, "__newindex");
        lua_rawget(L, -2);
        int view = lua_tocfunction(L, -1) == ro_newindex;
        lua_pop(L, 1);
        if (view) {
            lua_pushliteral(L, "__index");
            lua_rawget(L, -2);
            lua_replace(L, 1);
        }
        lua_pop(L, 1);
    }
    return call_original(L, LUA_MULTRET);
}

void sandbox_readonly(lua_State *L)
{
    /* t */
    lua_newtable(L);          /* t proxy */
    lua_createtable(L, 0, 5); /* t proxy mt */
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, ro_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushvalue(L, -3);
    lua_pushcclosure(L, ro_pairs, 1);
    lua_setfield(L, -2, "__pairs");
    lua_pushvalue(L, -3);
    lua_pushcclosure(L, ro_len, 1);
    lua_setfield(L, -2, "__len");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2); /* t proxy */
    lua_remove(L, -2);       /* proxy */
}

/* [-0, +1] Pushes a copy of the library table `lib` (from the real globals) with
 * only the listed names (all when names is NULL, minus `skip`). */
static void copy_lib(lua_State *L, const char *lib, const char *const *names, const char *skip)
{
    lua_getglobal(L, lib); /* lib */
    lua_newtable(L);       /* lib copy */
    if (names) {
        for (; *names; names++) {
            lua_getfield(L, -2, *names);
            lua_setfield(L, -2, *names);
        }
    } else {
        lua_pushnil(L);
        while (lua_next(L, -3)) {
            if (skip && lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), skip) == 0) {
                lua_pop(L, 1);
                continue;
            }
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, -4);
        }
    }
    lua_remove(L, -2); /* copy */
}

static void guard_pattern(lua_State *L, const char *name)
{
    /* string-copy */
    lua_getfield(L, -1, name);
    lua_pushstring(L, name);
    lua_pushcclosure(L, sb_pattern_fn, 2);
    name_for_errors(L, LUA_STRLIBNAME, name);
    lua_setfield(L, -2, name);
}

/* The arithmetic metamethods lstrlib puts in the string metatable. */
static const char *const STRING_ARITH[] = {"__add", "__sub", "__mul", "__div",
                                           "__mod", "__pow", "__unm", "__idiv"};

static int build_env(lua_State *L)
{
    sandbox *sb = from_lua(L);
    int flags = (int)lua_tointeger(L, 1);

    luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
    luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
    luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
    luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
    luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 1);
    luaL_requiref(L, LUA_OSLIBNAME, luaopen_os, 1);
    lua_settop(L, 1);

    static const char *const base_names[] = {"assert",   "error",        "ipairs",       "next",
                                             "pairs",    "rawequal",     "rawget",       "rawlen",
                                             "select",   "setmetatable", "getmetatable", "tonumber",
                                             "tostring", "type",         "_VERSION",     NULL};
    copy_lib(L, LUA_GNAME, base_names, NULL); /* base */
    lua_pushcfunction(L, sb_pcall);
    lua_setfield(L, -2, "pcall");
    lua_pushcfunction(L, sb_xpcall);
    lua_setfield(L, -2, "xpcall");
    lua_pushcfunction(L, sb_print);
    lua_setfield(L, -2, "print");
    wrap(L, LUA_GNAME, "setmetatable", sb_setmetatable);
    wrap(L, LUA_GNAME, "next", sb_next);
    /* converting text of any length to a number */
    wrap(L, LUA_GNAME, "tonumber", timed);

    /* string: without dump, with guarded pattern functions, reachable from
     * string values only through a read-only view. The library's metatable for
     * strings gives way to one whose __index is that view; its arithmetic
     * metamethods stay, since Lua 5.4 converts strings in arithmetic ("10" + 1)
     * with them. */
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1); /* base "" lib-mt */
    lua_remove(L, -2);
    int lib_mt = lua_gettop(L);
    copy_lib(L, LUA_STRLIBNAME, NULL, "dump"); /* base lib-mt string */
    guard_pattern(L, "find");
    guard_pattern(L, "match");
    guard_pattern(L, "gmatch");
    guard_pattern(L, "gsub");
    wrap(L, LUA_STRLIBNAME, "rep", sb_rep);
    time_lib(L);
    sandbox_readonly(L); /* base lib-mt string-ro */
    lua_pushliteral(L, "");
    lua_createtable(L, 0, 2 + (int)(sizeof STRING_ARITH / sizeof *STRING_ARITH));
    lua_pushvalue(L, -3); /* base lib-mt string-ro "" mt string-ro */
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    for (size_t i = 0; i < sizeof STRING_ARITH / sizeof *STRING_ARITH; i++) {
        lua_getfield(L, lib_mt, STRING_ARITH[i]);
        lua_pushcclosure(L, timed, 1); /* they convert text of any length */
        lua_setfield(L, -2, STRING_ARITH[i]);
    }
    lua_setmetatable(L, -2);
    lua_pop(L, 1);
    lua_setfield(L, -3, "string"); /* base lib-mt */
    lua_pop(L, 1);

    copy_lib(L, LUA_TABLIBNAME, NULL, NULL);
    wrap(L, LUA_TABLIBNAME, "move", sb_move);
    wrap(L, LUA_TABLIBNAME, "insert", sb_plain_table);
    wrap(L, LUA_TABLIBNAME, "remove", sb_plain_table);
    wrap(L, LUA_TABLIBNAME, "concat", sb_plain_table);
    wrap(L, LUA_TABLIBNAME, "unpack", sb_plain_table);
    wrap(L, LUA_TABLIBNAME, "sort", sb_sort);
    time_lib(L);
    sandbox_readonly(L);
    lua_setfield(L, -2, "table");
    copy_lib(L, LUA_MATHLIBNAME, NULL, NULL);
    time_lib(L);
    sandbox_readonly(L);
    lua_setfield(L, -2, "math");
    copy_lib(L, LUA_UTF8LIBNAME, NULL, NULL);
    time_lib(L);
    sandbox_readonly(L);
    lua_setfield(L, -2, "utf8");
    static const char *const os_names[] = {"time", "date", "clock", NULL};
    static const char *const os_env_names[] = {"time", "date", "clock", "getenv", NULL};
    copy_lib(L, LUA_OSLIBNAME, (flags & SANDBOX_GETENV) ? os_env_names : os_names, NULL);
    wrap(L, LUA_OSLIBNAME, "date", sb_date);
    if (flags & SANDBOX_GETENV)
        wrap(L, LUA_OSLIBNAME, "getenv", sb_getenv);
    time_lib(L);
    sandbox_readonly(L);
    lua_setfield(L, -2, "os");

    sb->base_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* A Lua error outside any protected call: only an allocation the pool could
 * not get (outside a rule call no limit applies) can raise one in the host's
 * own use of a state. Lua aborts when this returns; the log says why first. */
static int on_panic(lua_State *L)
{
    const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "not a string";
    log_error("rules: Lua failed outside a protected call, stopping", LOG_S("error", msg));
    return 0;
}

sandbox *sandbox_new(int flags)
{
    pthread_once(&calibrated, calibrate);
    sandbox *sb = calloc(1, sizeof(*sb));
    if (!sb)
        return NULL;
    sb->limit = sb->near = SIZE_MAX;
    set_deadline(sb, INT64_MAX);
    sb->base_ref = LUA_NOREF;
    sb->pool = pool_new();
    sb->L = sb->pool ? lua_newstate(sb_alloc, sb) : NULL;
    if (!sb->L) {
        pool_free(sb->pool);
        free(sb);
        return NULL;
    }
    if (watch_add(sb) != 0) {
        lua_close(sb->L);
        pool_free(sb->pool);
        free(sb);
        return NULL;
    }
    *(sandbox **)lua_getextraspace(sb->L) = sb;
    lua_atpanic(sb->L, on_panic);
    lua_gc(sb->L, LUA_GCGEN, 0, 0);
    lua_pushcfunction(sb->L, build_env);
    lua_pushinteger(sb->L, flags);
    if (lua_pcall(sb->L, 1, 0, 0) != LUA_OK) {
        sandbox_free(sb);
        return NULL;
    }
    return sb;
}

void sandbox_free(sandbox *sb)
{
    if (!sb)
        return;
    watch_remove(sb);
    lua_close(sb->L);
    pool_free(sb->pool);
    free(sb);
}

lua_State *sandbox_lua(sandbox *sb)
{
    return sb->L;
}

void sandbox_expose(sandbox *sb, const char *name)
{
    lua_State *L = sb->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->base_ref); /* v base */
    lua_insert(L, -2);                               /* base v */
    lua_setfield(L, -2, name);
    lua_pop(L, 1);
}

int sandbox_load(sandbox *sb, const char *chunkname, const char *src, size_t len, char *err,
                 size_t errlen)
{
    lua_State *L = sb->L;
    const char *name = chunkname[0] == '@' || chunkname[0] == '=' ? chunkname + 1 : chunkname;
    /* lua5.4 skips a byte-order mark in a file */
    size_t bom = utf8_bom_len(src, len);
    src += bom;
    len -= bom;
    if (len >= strlen(LUA_SIGNATURE) && memcmp(src, LUA_SIGNATURE, strlen(LUA_SIGNATURE)) == 0) {
        str_printf(err, errlen, "%s: a compiled (binary) chunk; only Lua source text is loaded",
                   name);
        return -1;
    }
    int rc = luaL_loadbufferx(L, src, len, chunkname, "t");
    if (rc != LUA_OK) {
        const char *msg = lua_isstring(L, -1) ? lua_tostring(L, -1) : "cannot load";
        if (rc == LUA_ERRSYNTAX) /* "file:line: ..." */
            str_copy(err, errlen, msg);
        else
            str_printf(err, errlen, "%s: %s", name, msg);
        lua_pop(L, 1);
        return -1;
    }
    /* fn */
    lua_newtable(L);          /* fn env */
    lua_createtable(L, 0, 2); /* fn env mt */
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->base_ref);
    lua_setfield(L, -2, "__index");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    if (!lua_setupvalue(L, -2, 1)) /* fn */
        lua_pop(L, 1);
    return 0;
}

enum sandbox_rc sandbox_call(sandbox *sb, int nargs, int nresults, const struct sandbox_limits *lim,
                             struct sandbox_error *err)
{
    return sandbox_call_shared(sb, nargs, nresults, lim, NULL, err);
}

enum sandbox_rc sandbox_call_shared(sandbox *sb, int nargs, int nresults,
                                    const struct sandbox_limits *lim, struct sandbox_share *share,
                                    struct sandbox_error *err)
{
    struct sandbox_share own = {0, 0, 0};
    if (!share)
        share = &own;
    lua_State *L = sb->L;
    int fn = lua_gettop(L) - nargs;
    lua_pushcfunction(L, sb_msgh);
    lua_insert(L, fn); /* msgh fn args */

    sb->tripped = TRIP_NONE;
    sb->refused.nsize = 0;
    sb->refused_twice = 0;
    sb->steps = share->steps;
    sb->cpu_timed = share->cpu_timed;
    sb->in_timed = 0;
    sb->budget = lim && lim->instructions > 0 ? lim->instructions : INT64_MAX;
    sb->armed = 0;
    int64_t started = clock_mono_ns();
    if (share->deadline_ns == 0)
        share->deadline_ns = sandbox_deadline_for(started, sb->budget);
    set_deadline(sb, share->deadline_ns);
    sb->limit = lim && lim->memory_bytes > 0 ? sb->used + lim->memory_bytes : SIZE_MAX;
    sb->near = lim && lim->memory_bytes > 0 ? sb->limit - lim->memory_bytes / 8 : SIZE_MAX;
    sb->mem_where[0] = '\0';
    sb->where[0] = '\0';
    /* a call that begins past the time limit of the calls before it ends at
     * its first instruction */
    if (started > share->deadline_ns)
        sb->tripped = TRIP_TIME;
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, sb->tripped == TRIP_NONE ? HOOK_STEP : 1);
    sandbox *outer = watch_begin(sb);

    int status = lua_pcall(L, nargs, nresults, fn);
    trip_on_memory_error(L, status);

    watch_end(sb, outer);
    lua_sethook(L, NULL, 0, 0);
    share->steps = sb->steps;
    share->cpu_timed = sb->cpu_timed;
    share->deadline_ns = deadline_of(sb); /* as library calls moved it on */
    sb->limit = sb->near = SIZE_MAX;
    set_deadline(sb, INT64_MAX);
    enum trip tripped = sb->tripped;
    sb->tripped = TRIP_NONE;

    if (status == LUA_OK && tripped == TRIP_NONE) {
        lua_remove(L, fn);
        return SANDBOX_OK;
    }
    if (err) {
        const char *msg = status != LUA_OK && lua_isstring(L, -1) ? lua_tostring(L, -1) : "error";
        str_copy(err->msg, sizeof err->msg, msg);
        str_copy(err->where, sizeof err->where, sb->where);
    }
    lua_settop(L, fn - 1);
    if (tripped == TRIP_NONE)
        return SANDBOX_ERROR;
    sb->damaged = 1;
    if (err) {
        if (tripped == TRIP_MEMORY) {
            str_printf(err->msg, sizeof err->msg, "memory limit exceeded (%zu bytes)",
                       lim ? lim->memory_bytes : 0);
            if (sb->mem_where[0])
                str_copy(err->where, sizeof err->where, sb->mem_where);
        } else if (tripped == TRIP_TIME)
            str_printf(err->msg, sizeof err->msg,
                       "time limit exceeded: ran for more than %lld ms, %d times what %lld "
                       "instructions take (steps the count does not see: long strings compared "
                       "or joined, the calls back of string.gsub or table.sort)",
                       (long long)(sandbox_deadline_for(0, sb->budget) / 1000000), DEADLINE_FACTOR,
                       (long long)(lim ? lim->instructions : 0));
        else
            str_printf(err->msg, sizeof err->msg, "instruction limit exceeded (%lld instructions)",
                       (long long)(lim ? lim->instructions : 0));
    }
    return SANDBOX_LIMIT;
}

int64_t sandbox_deadline_for(int64_t start_ns, int64_t instructions)
{
    pthread_once(&calibrated, calibrate);
    double allowed =
        (double)instructions * ns_per_instruction * DEADLINE_FACTOR + DEADLINE_SLACK_NS;
    if (instructions <= 0 || instructions == INT64_MAX || allowed >= (double)(INT64_MAX - start_ns))
        return INT64_MAX;
    return start_ns + (int64_t)allowed;
}

size_t sandbox_memory_left(lua_State *L)
{
    const sandbox *sb = from_lua(L);
    if (sb->limit == SIZE_MAX)
        return SIZE_MAX;
    return sb->used < sb->limit ? sb->limit - sb->used : 0;
}

int64_t sandbox_deadline(lua_State *L)
{
    return deadline_of(from_lua(L));
}

int sandbox_overdue(lua_State *L)
{
    return past_deadline(from_lua(L));
}

size_t sandbox_used(const sandbox *sb)
{
    return sb->used;
}

size_t sandbox_memory(const sandbox *sb)
{
    return sb->used + pool_idle(sb->pool);
}

int sandbox_damaged(const sandbox *sb)
{
    return sb->damaged;
}
