"""Runs the integration tests in parallel worker processes.

    python3 tests/integration/run.py [-j JOBS] [-k PATTERN ...]

Most integration tests spend their time waiting (for a retry's backoff, a
batch's linger, a rate limit's second), so several run side by side. Each
worker process takes the next test from the shared list as it finishes one, so
that a long test does not hold the others back. Every worker hands out the
service ports of a range of its own (harness.use_port_range), apart from the
kernel's ephemeral ports, which the mParticle doubles and the clients take.

test_zz_secrets runs last, in this process, over everything the services said
in all the workers: its check covers the whole run, as with unittest alone.

JOBS defaults to TEST_JOBS, else three per CPU (one under TEST_WRAPPER), at
most 8.
-k selects tests as unittest's -k does (a substring of the test's id, or a
pattern with *). Exits 1 when a test fails or a worker dies.
"""

import argparse
import fnmatch
import multiprocessing
import os
import queue
import sys
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

LAST = "test_zz_secrets"
# The whole suite keeps about a third of a CPU busy per worker (half of that
# under the sanitizers' build, which takes about 0.9 of 2 CPUs at 8 workers).
JOBS_PER_CPU = 3
MAX_JOBS = 8


def flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from flatten(item)
        else:
            yield item


def selected(test_id, patterns):
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(test_id, p if "*" in p else "*%s*" % p) for p in patterns)


def discover(patterns):
    """The ids of the selected tests, in name order; a module that fails to
    import is an error of the run, as with unittest."""
    loader = unittest.TestLoader()
    suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    if loader.errors:
        sys.exit("integration tests: discovery failed:\n" + "\n".join(loader.errors))
    return [t.id() for t in flatten(suite) if selected(t.id(), patterns)]


def outcome(result):
    """One test's outcome from its unittest result: (status, details)."""
    details = ["%s\n%s" % (test, text) for test, text in result.errors + result.failures]
    if result.errors:
        return "ERROR", details
    if result.failures or result.unexpectedSuccesses:
        return "FAIL", details or ["unexpected success"]
    if result.skipped:
        return "skipped", [reason for _, reason in result.skipped]
    return "ok", []


def run_one(test_id):
    started = time.monotonic()
    result = unittest.TestResult()
    try:
        unittest.defaultTestLoader.loadTestsFromName(test_id).run(result)
    except Exception:  # a test that cannot even be loaded
        result.errors.append((test_id, traceback.format_exc()))
    status, details = outcome(result)
    return status, details, time.monotonic() - started


def worker(index, ids, next_index, current, results):
    harness.use_port_range(index)
    while True:
        with next_index.get_lock():
            i = next_index.value
            next_index.value += 1
        if i >= len(ids):
            break
        current[index] = i  # shared memory: known even if this process dies at once
        status, details, seconds = run_one(ids[i])
        results.put(("result", index, (ids[i], status, details, seconds)))
    # what this worker's services said, for the secrets check of the whole run
    results.put(("done", index, (harness.ARTIFACTS, sorted(harness.SECRETS))))


def run_parallel(ids, jobs, report):
    """Runs ids in jobs workers; calls report(...) for each result."""
    ctx = multiprocessing.get_context("fork")
    next_index = ctx.Value("i", 0)
    current = ctx.Array("i", [-1] * jobs)  # the index of the test each worker runs
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, ids, next_index, current, results), daemon=True)
             for i in range(jobs)]
    for p in procs:
        p.start()
    reported = set()
    done = set()
    while len(done) < len(procs):
        try:
            kind, index, payload = results.get(timeout=1)
        except queue.Empty:
            ended = [i for i, p in enumerate(procs) if i not in done and p.exitcode is not None]
            if not ended:
                continue
            # what an ended worker put on the queue may still be on its way
            try:
                kind, index, payload = results.get(timeout=5)
            except queue.Empty:
                for i in ended:
                    # a worker that died without saying so: its test failed
                    done.add(i)
                    why = ["worker %d died with exit code %s" % (i, procs[i].exitcode)]
                    t = current[i]
                    if t >= 0 and ids[t] not in reported:
                        report((ids[t], "ERROR", why, 0.0))
                    else:
                        report(("worker %d" % i, "ERROR", why, 0.0))
                continue
        if kind == "result":
            reported.add(payload[0])
            report(payload)
        else:
            done.add(index)
            artifacts, secrets = payload
            harness.ARTIFACTS.extend(artifacts)
            harness.SECRETS.update(secrets)
    for p in procs:
        p.join()


def main():
    parser = argparse.ArgumentParser(description="Runs the integration tests in parallel.")
    parser.add_argument("-j", "--jobs", type=int, default=None)
    parser.add_argument("-k", dest="patterns", action="append", default=[])
    args = parser.parse_args()
    # under valgrind (TEST_WRAPPER) every worker keeps a CPU busy
    per_cpu = 1 if harness.WRAPPER else JOBS_PER_CPU
    jobs = args.jobs or int(os.environ.get("TEST_JOBS") or 0) or \
        min(MAX_JOBS, per_cpu * (os.cpu_count() or 1))

    ids = discover(args.patterns)
    if not ids:
        sys.exit("integration tests: no test matches %s" % " or ".join(args.patterns))
    first = [t for t in ids if not t.startswith(LAST + ".")]
    last = [t for t in ids if t.startswith(LAST + ".")]
    jobs = max(1, min(jobs, MAX_JOBS, len(first) or 1))
    print("integration tests: %d tests, %d workers" % (len(ids), jobs), flush=True)

    start = time.monotonic()
    outcomes = []

    def report(item):
        test_id, status, details, seconds = item
        outcomes.append(item)
        print("%s ... %s (%.1fs)" % (test_id, status, seconds), flush=True)

    if first:
        run_parallel(first, jobs, report)
    for test_id in last:
        report((test_id,) + run_one(test_id))

    failed = [o for o in outcomes if o[1] in ("FAIL", "ERROR")]
    for test_id, status, details, _ in failed:
        print("=" * 70)
        print("%s: %s" % (status, test_id))
        print("-" * 70)
        print("\n".join(details))
    slowest = sorted(outcomes, key=lambda o: -o[3])[:10]
    print("slowest: " + ", ".join("%s %.0fs" % (o[0].rsplit(".", 1)[-1], o[3]) for o in slowest))
    skipped = sum(1 for o in outcomes if o[1] == "skipped")
    print("Ran %d tests in %.1fs with %d workers" % (len(outcomes), time.monotonic() - start, jobs))
    if failed or len(outcomes) < len(ids):
        print("FAILED (%d failed, %d not run)" % (len(failed), len(ids) - len(outcomes)))
        return 1
    print("OK" + (" (skipped=%d)" % skipped if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
