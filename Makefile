# tributary: Braze Currents -> mParticle.
#
#   make run        install what is missing, build, start on the embedded defaults
#   make test       install what is missing, build, run every test
#   make asan       the test suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   make chaos      kills, reloads and mParticle failures at random (CHAOS_SECONDS, CHAOS_SEED);
#                   make chaos-asan against the sanitizer build
#   make valgrind   the test suite under valgrind (memcheck)
#   make bench      the benchmark (figures as "name value unit" lines)
#   make bench-instructions   instructions per event by thread (callgrind)
#   make fuzz       libFuzzer targets, about a minute each
#   make install    PREFIX=/usr/local DESTDIR=  (as root without DESTDIR, it also creates
#                   the system user tributary that the unit runs as)
#   make fmt lint clean

VERSION := 0.1.0
REVISION := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)

PKGS := lua5.4 lua5.4-cjson libmicrohttpd gnutls libcurl sqlite3 libcrypto
CC ?= cc
CFLAGS ?= -O2 -g
WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Werror
# Recursive (=) so that pkg-config runs after scripts/setup.sh installed the packages.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS))
PKG_LIBS = $(shell pkg-config --libs $(PKGS))
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE -pthread $(WARN) $(CFLAGS) $(PKG_CFLAGS) \
	-DTRIBUTARY_VERSION='"$(VERSION) ($(REVISION))"'
LIBS = $(PKG_LIBS) -pthread -lm

BUILD ?= build/release
BIN ?= host/tributary

SRCS := $(wildcard host/*.c)
OBJS := $(patsubst host/%.c,$(BUILD)/host/%.o,$(SRCS))
LIB_OBJS := $(filter-out $(BUILD)/host/main.o,$(OBJS))
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRCS))

PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all setup run test check-suite unit asan valgrind bench bench-instructions soak fuzz install \
	chaos chaos-asan fmt lint clean

all: $(BIN)

setup:
	@scripts/setup.sh

# `make V=1` shows the commands.
Q := $(if $(V),,@)

$(BUILD)/host/%.o: host/%.c $(wildcard host/*.h) Makefile
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC    $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BIN): $(OBJS)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD    $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(LIBS)

$(BUILD)/tests/%: tests/unit/%.c tests/unit/unit.h $(LIB_OBJS)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  TEST  $@")
	$(Q)$(CC) $(ALL_CFLAGS) -Ihost $$(pkg-config --cflags check) -o $@ $< $(LIB_OBJS) \
		$(LDFLAGS) $$(pkg-config --libs check) $(LIBS)

unit: $(UNIT_BINS)

run: setup
	@$(MAKE) --no-print-directory all
	exec $(BIN) serve --config tributary.conf.lua

test: setup
	@$(MAKE) --no-print-directory check-suite

# The whole suite against the binary and unit tests of this BUILD.
check-suite: $(BIN) $(UNIT_BINS)
	@TEST_WRAPPER="$(TEST_WRAPPER)" CFLAGS="$(CFLAGS)" LDFLAGS="$(LDFLAGS)" scripts/test.sh $(BUILD) $(BIN)

ASAN_CFLAGS := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
ASAN_LDFLAGS := -fsanitize=address,undefined

asan: setup
	@$(MAKE) --no-print-directory check-suite BUILD=build/asan BIN=build/asan/tributary \
		CFLAGS="$(ASAN_CFLAGS)" LDFLAGS="$(ASAN_LDFLAGS)"

valgrind: setup
	@scripts/setup.sh valgrind
	@$(MAKE) --no-print-directory check-suite BUILD=build/valgrind BIN=build/valgrind/tributary \
		CFLAGS="-O1 -g" TEST_WRAPPER="valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --track-fds=no"

# Rounds of random kills (-9), stops, reloads and mParticle failures against the
# double, for CHAOS_SECONDS (default 300); each round checks that every event
# acknowledged to Braze was delivered or dead-lettered. It prints each round's
# seed: CHAOS_SEED=<seed> CHAOS_SECONDS=1 runs that round again. Not part of
# `make test`. `make chaos-asan` runs it against the sanitizer build.
CHAOS_SECONDS ?= 300
CHAOS_SEED ?=

chaos: setup
	@$(MAKE) --no-print-directory $(BIN)
	@TEST_TRIBUTARY_BIN="$(BIN)" CFLAGS="$(CFLAGS)" CHAOS_SECONDS="$(CHAOS_SECONDS)" \
		CHAOS_SEED="$(CHAOS_SEED)" python3 tests/chaos/chaos.py

chaos-asan: setup
	@$(MAKE) --no-print-directory chaos BUILD=build/asan BIN=build/asan/tributary \
		CFLAGS="$(ASAN_CFLAGS)" LDFLAGS="$(ASAN_LDFLAGS)"

# The benchmark: throughput, then latency at a fixed rate (figures as
# "name value unit" lines; see scripts/bench.sh). It never fails the build.
bench: setup
	@$(MAKE) --no-print-directory all
	@scripts/bench.sh

# Instructions per event by thread, with the service under callgrind: steadier
# than timings for comparing two versions (see scripts/bench-instructions.sh).
bench-instructions: setup
	@$(MAKE) --no-print-directory all
	@scripts/setup.sh valgrind
	@scripts/bench-instructions.sh

# Ten minutes at a constant rate, sampling the service's memory.
soak: setup
	@$(MAKE) --no-print-directory all
	@scripts/bench.sh --soak

# libFuzzer targets (clang): tests/fuzz/fuzz.mk builds them and runs each for
# FUZZ_SECONDS (default 60); their corpora replay in the normal suite.
fuzz: setup
	@scripts/setup.sh clang libclang-rt-14-dev
	@$(MAKE) --no-print-directory -f tests/fuzz/fuzz.mk run

# Installs the binary, the default rules (and examples), the example
# configuration, the systemd unit, the alerts and the documents an operator
# reads (share/doc/tributary). See docs/operations.md for the rest.
install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/tributary/rules/examples \
		$(DESTDIR)$(PREFIX)/lib/systemd/system
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/tributary
	install -m 0644 rules/*.lua $(DESTDIR)$(PREFIX)/share/tributary/rules/
	install -m 0644 rules/examples/*.lua $(DESTDIR)$(PREFIX)/share/tributary/rules/examples/
	sed -e 's|^-- tributary configuration\. Every value below is the built-in default, so this$$|-- tributary configuration, installed: data_dir and rules_dir are where the\n-- systemd unit keeps them, so that commands given this file find them, and\n-- the log is JSON lines for the journal. Every other value below is the\n-- built-in default, so this|' \
		-e 's|^-- file changes nothing until you edit it\.|-- file changes nothing else until you edit it.|' \
		-e 's|data_dir = "./var", |data_dir = "/var/lib/tributary",|' \
		-e 's|rules_dir = "./rules", |rules_dir = "/etc/tributary/rules",|' \
		-e 's|log = { level = "info", format = "logfmt" },        -- or format = "json"|log = { level = "info", format = "json" },            -- or format = "logfmt"|' \
		tributary.conf.lua > $(DESTDIR)$(PREFIX)/share/tributary/tributary.conf.lua.example
	chmod 0644 $(DESTDIR)$(PREFIX)/share/tributary/tributary.conf.lua.example
	install -m 0644 docs/prometheus-alerts.yml $(DESTDIR)$(PREFIX)/share/tributary/
	install -d $(DESTDIR)$(PREFIX)/share/doc/tributary
	install -m 0644 README.md docs/operations.md docs/performance.md \
		docs/sample-currents-batch.json $(DESTDIR)$(PREFIX)/share/doc/tributary/
	sed 's|@BINDIR@|$(PREFIX)/bin|g' scripts/tributary.service \
		> $(DESTDIR)$(PREFIX)/lib/systemd/system/tributary.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/tributary.service
	install -d $(DESTDIR)$(PREFIX)/lib/sysusers.d
	echo 'u tributary - "tributary service" /var/lib/tributary /usr/sbin/nologin' \
		> $(DESTDIR)$(PREFIX)/lib/sysusers.d/tributary.conf
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/sysusers.d/tributary.conf
	@# the unit's user, on this machine (a package build with DESTDIR leaves it to sysusers.d)
	@if [ -n "$(DESTDIR)" ] || getent passwd tributary > /dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		useradd --system --user-group --home-dir /var/lib/tributary --no-create-home \
			--shell /usr/sbin/nologin tributary; \
	else echo "make install: the systemd unit runs as the user tributary; as root: systemd-sysusers $(PREFIX)/lib/sysusers.d/tributary.conf"; fi

FORMATTED = host/*.c host/*.h tests/unit/*.c tests/unit/*.h tests/bench/*.c tests/fuzz/*.c \
	tests/fuzz/*.h tests/integration/faults/*.c

fmt:
	@scripts/setup.sh clang-format
	clang-format -i $(FORMATTED)

lint:
	@scripts/setup.sh clang-format cppcheck
	clang-format --dry-run --Werror $(FORMATTED)
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
		--std=c11 --inline-suppr -D_GNU_SOURCE -I host host tests/unit

clean:
	rm -rf build host/tributary
