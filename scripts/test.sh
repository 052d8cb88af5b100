#!/bin/sh
# Runs the whole test suite: every Check unit test binary, then the integration
# tests (which start the real binary). Exits non-zero when anything fails.
#
#   scripts/test.sh BUILD BINARY
#
# BUILD is the build directory (unit tests in BUILD/tests, objects in
# BUILD/host); the fuzz corpora replay against those objects.
# TEST_WRAPPER (e.g. "valgrind ...") runs the binary and the unit tests under a
# tool. TEST_FILTER selects integration tests by name (unittest -k); TEST_JOBS
# sets how many run side by side (tests/integration/run.py).
set -u
build=$1
unit_dir=$build/tests
bin=$2
failed=0
start=$(date +%s)

echo "== unit tests ($unit_dir)"
for t in "$unit_dir"/test_*; do
    [ -x "$t" ] || continue
    # CK_FORK=no under a wrapper, so valgrind sees the test code itself.
    if [ -n "${TEST_WRAPPER:-}" ]; then
        CK_FORK=no CK_DEFAULT_TIMEOUT=300 timeout 900 $TEST_WRAPPER "$t" || { echo "FAILED: $t"; failed=1; }
    else
        CK_DEFAULT_TIMEOUT=60 timeout 300 "$t" || { echo "FAILED: $t"; failed=1; }
    fi
done

echo "== fuzz corpora (regression inputs)"
make -s --no-print-directory -f tests/fuzz/fuzz.mk replay BUILD="$build" || { echo "FAILED: fuzz corpus replay"; failed=1; }

echo "== integration tests ($bin)"
export TEST_TRIBUTARY_BIN="$bin"
export TEST_WRAPPER="${TEST_WRAPPER:-}"
set -- python3 tests/integration/run.py
if [ -n "${TEST_FILTER:-}" ]; then
    set -- "$@" -k "$TEST_FILTER"
fi
timeout 1800 "$@" || failed=1

echo "== suite finished in $(( $(date +%s) - start ))s: $([ $failed = 0 ] && echo PASS || echo FAIL)"
exit $failed
