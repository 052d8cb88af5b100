#!/usr/bin/env bash
# scripts/bench-instructions.sh: instructions per event, by thread, of a short
# `make bench` run with the service under callgrind.
#
# Wall-clock figures on a shared or virtual machine move by 10 - 15% from one
# run to the next; instruction counts do not depend on the host's speed, so a
# change of a few percent shows here where `make bench` cannot tell it from
# noise. Prints, as `name value unit`:
#
#   instructions_per_event_connection   HTTP, authentication, decode, rules, encode
#   instructions_per_event_writer       queue-writer: the group commits
#   instructions_per_event_checkpoint   queue-checkpt
#   instructions_per_event_sender       sender: reading back, batching, curl
#   instructions_per_event_other        start-up, listener, watchdog, shutdown
#   instructions_per_event_total
#   events_per_batch                    (batching changes the sender's share)
#
# The run is small (4 connections for 8 s, then 300 events/s for 2 s: a few
# thousand events under valgrind) and takes about a minute. Counts vary by a
# percent or so between runs, as batching and group commits follow timing.
# INSTR_KEEP=1 keeps the callgrind files (one per thread) for
# callgrind_annotate; they are listed on stderr.

set -euo pipefail

SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
ROOT=$PWD

command -v valgrind >/dev/null || {
    echo "bench-instructions: valgrind is missing (apt-get install valgrind)" >&2
    exit 1
}

OUT=$(mktemp -d "${TMPDIR:-/tmp}/tributary-instr.XXXXXX")
cleanup() {
    if [[ ${INSTR_KEEP:-0} == 1 ]]; then
        echo "bench-instructions: callgrind files kept in $OUT" >&2
    else
        rm -rf "$OUT"
    fi
}
trap cleanup EXIT

BENCH_SERVICE_WRAPPER="valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=$OUT/callgrind.out.%p" \
    BENCH_SECONDS=8 BENCH_CONNS=4 BENCH_RATE=300 BENCH_RATE_SECONDS=2 BENCH_DRAIN_TIMEOUT=120 \
    "$ROOT/scripts/bench.sh" >"$OUT/bench.out" 2>"$OUT/bench.err" || {
    echo "bench-instructions: the benchmark failed:" >&2
    tail -n 20 "$OUT/bench.err" >&2
    exit 1
}

# events the service accepted in both phases
accepted=$(sed -n 's/^bench: phase 1: \([0-9]*\) events accepted.*/\1/p' "$OUT/bench.err")
answered=$(sed -n 's/^bench: phase 2: \([0-9]*\) of [0-9]* requests answered 200.*/\1/p' "$OUT/bench.err")
per_request=${BENCH_EVENTS:-100}
events=$((${accepted:-0} + ${answered:-0} * per_request))
((events > 0)) || {
    echo "bench-instructions: no events were accepted" >&2
    exit 1
}

shopt -s nullglob
profiles=("$OUT"/callgrind.out.*)
((${#profiles[@]} > 0)) || {
    echo "bench-instructions: callgrind wrote no profiles (did the service exit?)" >&2
    exit 1
}

# A thread's role is the entry point in its profile; its total is the file's
# "summary:" line.
for f in "${profiles[@]}"; do
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$f")
    role=other
    if grep -qE '^c?fn=\([0-9]+\) on_request$' "$f"; then
        role=connection
    elif grep -qE '^c?fn=\([0-9]+\) writer_main$' "$f"; then
        role=writer
    elif grep -qE '^c?fn=\([0-9]+\) checkpointer_main$' "$f"; then
        role=checkpoint
    elif grep -qE '^c?fn=\([0-9]+\) sender_main$' "$f"; then
        role=sender
    fi
    echo "$role ${total:-0}"
done | awk -v n="$events" '
    { sum[$1] += $2; all += $2 }
    END {
        split("connection writer checkpoint sender other", roles, " ")
        for (i = 1; i <= 5; i++)
            printf "instructions_per_event_%s %.0f instructions\n", roles[i], sum[roles[i]] / n
        printf "instructions_per_event_total %.0f instructions\n", all / n
    }'
grep '^events_per_batch ' "$OUT/bench.out" || true
echo "events $events events"
