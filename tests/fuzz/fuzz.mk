# Fuzz targets of tributary: libFuzzer runs, and a replay of their corpora that
# the normal test suite uses. Run from the repository root.
#
#   make -f tests/fuzz/fuzz.mk run [FUZZ_SECONDS=60] [TARGETS="fuzz_map ..."]
#       (what `make fuzz` does) builds every target with clang, libFuzzer,
#       ASan and UBSan into build/fuzz/<target>, then fuzzes each for
#       FUZZ_SECONDS on a working copy of its corpus (build/fuzz/corpus/<target>,
#       seeded from tests/fuzz/corpus/<target>). Crashes land in
#       build/fuzz/crashes/<target>/, logs in build/fuzz/logs/<target>.log.
#       Fails when any target found a crash; once the bug is fixed, add the
#       crash file to tests/fuzz/corpus/<target>/ as a regression input.
#       Needs clang and libclang-rt-14-dev (scripts/setup.sh installs them).
#
#   make -f tests/fuzz/fuzz.mk replay [BUILD=build/release]
#       builds each target with tests/fuzz/replay.c instead of libFuzzer, with
#       $(CC) and the project's flags, linked with the objects of
#       $(BUILD)/host (all but main.o; missing or stale ones are made by the
#       main Makefile with the same BUILD, CFLAGS and LDFLAGS), into
#       $(BUILD)/fuzz-replay/<target>, and runs each over
#       tests/fuzz/corpus/<target>. Exits non-zero when any input fails.
#       TEST_WRAPPER (e.g. valgrind ...) prefixes each run.
#
#   make -f tests/fuzz/fuzz.mk fuzz_map        one libFuzzer binary
#   make -f tests/fuzz/fuzz.mk clean           removes build/fuzz
#
# Reproduce one crash:  build/fuzz/<target> build/fuzz/crashes/<target>/crash-...
# Minimise it:          build/fuzz/<target> -minimize_crash=1 -runs=10000 FILE

TARGETS ?= fuzz_request fuzz_map fuzz_retry_after fuzz_signature fuzz_config
FUZZ_SECONDS ?= 60

PKGS := lua5.4 lua5.4-cjson libmicrohttpd gnutls libcurl sqlite3 libcrypto
# Recursive (=) so that pkg-config runs only when a recipe needs it.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS))
PKG_LIBS = $(shell pkg-config --libs $(PKGS))

HOST_SRCS := $(filter-out host/main.c,$(wildcard host/*.c))
HOST_HDRS := $(wildcard host/*.h)

# `make V=1` shows the commands.
Q := $(if $(V),,@)

# ---- libFuzzer (clang) -------------------------------------------------------

FUZZ_CC := clang
FUZZ_OUT := build/fuzz
FUZZ_CFLAGS = -std=c11 -D_GNU_SOURCE -pthread -g -O1 \
	-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined $(PKG_CFLAGS)
FUZZ_LDFLAGS := -fsanitize=fuzzer,address,undefined
FUZZ_OBJS := $(patsubst host/%.c,$(FUZZ_OUT)/host/%.o,$(HOST_SRCS))
FUZZ_BINS := $(addprefix $(FUZZ_OUT)/,$(TARGETS))
# Seconds one input may take before it counts as a hang (a crash of its own).
FUZZ_TIMEOUT ?= 20
# Rule and configuration inputs may each fill a Lua state to its limit (64 MiB);
# ASan's allocator keeps freed memory of every size class, so with its
# defaults a target's RSS climbs to -rss_limit_mb within a minute without a
# leak. A smaller quarantine and releasing memory to the OS keep it below.
# ASAN_OPTIONS from the environment come last and win.
FUZZ_ASAN_OPTIONS ?= allocator_release_to_os_interval_ms=500:quarantine_size_mb=64$(if $(ASAN_OPTIONS),:$(ASAN_OPTIONS))
# More libFuzzer options for every run, e.g. FUZZ_ARGS="-max_len=65536".
FUZZ_ARGS ?=

# The objects stay after a build (they are not intermediate files to remove).
.SECONDARY:

.PHONY: all run replay clean $(TARGETS)

all: $(FUZZ_BINS)

$(TARGETS): %: $(FUZZ_OUT)/%

$(FUZZ_OUT)/host/%.o: host/%.c $(HOST_HDRS) tests/fuzz/fuzz.mk
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC    $@")
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -c -o $@ $<

$(FUZZ_BINS:=.o): $(FUZZ_OUT)/%.o: tests/fuzz/%.c $(HOST_HDRS) tests/fuzz/fuzz.mk
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC    $@")
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -Ihost -c -o $@ $<

$(FUZZ_OUT)/fuzz_engine.o: tests/fuzz/fuzz_engine.c tests/fuzz/fuzz_engine.h $(HOST_HDRS) tests/fuzz/fuzz.mk
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC    $@")
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -Ihost -c -o $@ $<

$(FUZZ_BINS): $(FUZZ_OUT)/%: $(FUZZ_OUT)/%.o $(FUZZ_OUT)/fuzz_engine.o $(FUZZ_OBJS)
	@$(if $(Q),echo "  LD    $@")
	$(Q)$(FUZZ_CC) $(FUZZ_LDFLAGS) -o $@ $< $(FUZZ_OUT)/fuzz_engine.o $(FUZZ_OBJS) $(PKG_LIBS) \
		-pthread -lm

# Each target in turn; all of them run even when one fails, then the verdict.
# A fresh stamp tells this run's crashes from those of earlier runs.
run: $(FUZZ_BINS)
	@failed=""; \
	for t in $(TARGETS); do \
		work=$(FUZZ_OUT)/corpus/$$t; crashes=$(FUZZ_OUT)/crashes/$$t; \
		log=$(FUZZ_OUT)/logs/$$t.log; stamp=$(FUZZ_OUT)/logs/$$t.stamp; \
		mkdir -p $$work $$crashes $(FUZZ_OUT)/logs; \
		if [ -d tests/fuzz/corpus/$$t ]; then cp -p tests/fuzz/corpus/$$t/* $$work/ 2>/dev/null; fi; \
		touch $$stamp; \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s (log: $$log)"; \
		if ASAN_OPTIONS="$(FUZZ_ASAN_OPTIONS)" $(FUZZ_OUT)/$$t -max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=2048 -timeout=$(FUZZ_TIMEOUT) -artifact_prefix=$$crashes/ \
			-print_final_stats=1 $(FUZZ_ARGS) $$work >$$log 2>&1; then \
			grep -E '^#[0-9]+[[:space:]]+DONE' $$log | tail -n 1 | sed "s/^/fuzz: $$t: /"; \
			grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' $$log \
				| sed "s/^/fuzz: $$t: /"; \
		else \
			failed="$$failed $$t"; \
			echo "fuzz: $$t FAILED; the end of its log:"; \
			tail -n 60 $$log | sed 's/^/    /'; \
			new=$$(find $$crashes -type f -newer $$stamp 2>/dev/null); \
			if [ -n "$$new" ]; then \
				for f in $$new; do echo "fuzz: $$t: crash input: $$f"; done; \
				echo "fuzz: reproduce with $(FUZZ_OUT)/$$t FILE; once the bug is fixed, add" \
					"the file to tests/fuzz/corpus/$$t/ as a regression input"; \
			fi; \
		fi; \
		rm -f $$stamp; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: FAILED:$$failed"; exit 1; fi; \
	echo "fuzz: all targets ran clean for $(FUZZ_SECONDS) s each"

# ---- replay (the project's compiler and flags) -------------------------------

BUILD ?= build/release
CC ?= cc
CFLAGS ?= -O2 -g
WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Werror
REPLAY_CFLAGS = -std=c11 -D_GNU_SOURCE -pthread $(WARN) $(CFLAGS) $(PKG_CFLAGS) -Ihost
REPLAY_OUT := $(BUILD)/fuzz-replay
REPLAY_BINS := $(addprefix $(REPLAY_OUT)/,$(TARGETS))
LIB_OBJS := $(patsubst host/%.c,$(BUILD)/host/%.o,$(HOST_SRCS))

# The objects are the main Makefile's: it builds them when missing or stale,
# with the same rule and flags as for the binary of this BUILD.
$(BUILD)/host/%.o: host/%.c $(HOST_HDRS)
	$(Q)$(MAKE) --no-print-directory -f Makefile BUILD=$(BUILD) $@

$(REPLAY_BINS): $(REPLAY_OUT)/%: tests/fuzz/%.c tests/fuzz/replay.c tests/fuzz/fuzz_engine.c \
		tests/fuzz/fuzz_engine.h $(HOST_HDRS) $(LIB_OBJS) tests/fuzz/fuzz.mk
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC    $@")
	$(Q)$(CC) $(REPLAY_CFLAGS) -o $@ tests/fuzz/replay.c tests/fuzz/fuzz_engine.c $< $(LIB_OBJS) $(LDFLAGS) \
		$(PKG_LIBS) -pthread -lm

replay: $(REPLAY_BINS)
	@failed=""; \
	for t in $(TARGETS); do \
		if ! $(TEST_WRAPPER) $(REPLAY_OUT)/$$t $$t tests/fuzz/corpus/$$t; then \
			failed="$$failed $$t"; \
		fi; \
	done; \
	if [ -n "$$failed" ]; then echo "replay: FAILED:$$failed"; exit 1; fi

clean:
	rm -rf $(FUZZ_OUT)
