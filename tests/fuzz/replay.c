/*
 * replay: runs a fuzz target over its corpus without libFuzzer, so the corpora
 * (seeds and the regression inputs of fixed crashes) run in the normal suite
 * with the project's own compiler and flags.
 *
 *     replay TARGET PATH...
 *
 * Links with exactly one target .c file: every regular file of each PATH (a
 * directory, read in name order, or a single file) is read into a buffer of
 * exactly its size, as libFuzzer does, and passed to LLVMFuzzerTestOneInput.
 * LLVMFuzzerInitialize runs first when the target defines it.
 *
 * A failing input aborts the process (the targets abort() on a broken
 * invariant; ASan and UBSan end the process themselves), so the exit status is
 * non-zero; the input's path is printed first. Exits 0 when every input ran
 * clean, 1 on a missing path or an empty corpus.
 */
#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional in a target: weak, NULL when the target does not define it. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));
/* Present only when a sanitizer runtime is linked in (make asan). */
void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

static const char *target = "fuzz";
/* The input being run, for the message when it kills the process. */
static char current[4096];

/* Async-signal-safe: write(2) only. */
static void say_current(void)
{
    static const char a[] = "replay: ";
    static const char b[] = ": died on ";
    static const char c[] = "\n";
    if (!current[0])
        return;
    (void)!write(STDERR_FILENO, a, sizeof a - 1);
    (void)!write(STDERR_FILENO, target, strlen(target));
    (void)!write(STDERR_FILENO, b, sizeof b - 1);
    (void)!write(STDERR_FILENO, current, strlen(current));
    (void)!write(STDERR_FILENO, c, sizeof c - 1);
}

/* Names the input, then lets the signal do what it would have done. */
static void on_fatal_signal(int sig)
{
    say_current();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Installs on_fatal_signal where nobody (a sanitizer runtime) handles the
 * signal already, so their reports stay intact. */
static void catch_fatal_signals(void)
{
    static const int sigs[] = {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction old;
        if (sigaction(sigs[i], NULL, &old) != 0 || old.sa_handler != SIG_DFL)
            continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_fatal_signal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESETHAND | SA_NODEFER;
        (void)sigaction(sigs[i], &sa, NULL);
    }
    if (__sanitizer_set_death_callback)
        __sanitizer_set_death_callback(say_current);
}

/* Runs one file; 0, or -1 when it cannot be read or the target refused it
 * with a value libFuzzer does not accept. */
static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        perror(path);
        fclose(f);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    /* exactly the input's size, so that ASan sees a read past its end */
    uint8_t *data = malloc(size ? size : 1);
    if (!data || fread(data, 1, size, f) != size) {
        fprintf(stderr, "replay: %s: cannot read\n", path);
        free(data);
        fclose(f);
        return -1;
    }
    fclose(f);
    snprintf(current, sizeof current, "%s", path);
    int rc = LLVMFuzzerTestOneInput(data, size);
    current[0] = '\0';
    free(data);
    if (rc != 0 && rc != -1) {
        fprintf(stderr, "replay: %s: %s: LLVMFuzzerTestOneInput returned %d\n", target, path, rc);
        return -1;
    }
    return 0;
}

static int skip_dotfiles(const struct dirent *de)
{
    return de->d_name[0] != '.';
}

/* Runs a file, or every regular file of a directory in name order. Adds the
 * inputs run to *count. */
static int run_path(const char *path, long *count)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        perror(path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        if (run_file(path) != 0)
            return -1;
        ++*count;
        return 0;
    }
    struct dirent **names = NULL;
    int n = scandir(path, &names, skip_dotfiles, alphasort);
    if (n < 0) {
        perror(path);
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        char file[4096];
        snprintf(file, sizeof file, "%s/%s", path, names[i]->d_name);
        struct stat fst;
        if (rc == 0 && stat(file, &fst) == 0 && S_ISREG(fst.st_mode)) {
            if (run_file(file) != 0)
                rc = -1;
            else
                ++*count;
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s TARGET CORPUS_DIR|FILE...\n", argv[0]);
        return 2;
    }
    target = argv[1];
    catch_fatal_signals();
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    long count = 0;
    for (int i = 2; i < argc; i++) {
        if (run_path(argv[i], &count) != 0)
            return 1;
    }
    if (count == 0) {
        fprintf(stderr, "replay: %s: no inputs in the corpus\n", target);
        return 1;
    }
    printf("replay: %s: %ld input%s ran clean\n", target, count, count == 1 ? "" : "s");
    return 0;
}
