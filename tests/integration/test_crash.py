"""kill -9 during ingestion: every acknowledged event is still queued, exactly once;
read errors while the batches in flight are restored lose nothing; a full disk."""

import collections
import json
import os
import subprocess
import threading
import time
import types
import unittest

from harness import (BIN, SANITIZED, SLOW, WRAPPER, Service, ServiceTest, busiest_second,
                     claim_batches, claim_blob, event, preload)
from mparticle_double import MParticleDouble
from test_delivery import FEEDS, feed_env


class Crash(ServiceTest):
    def test_kill9_during_ingestion_keeps_every_acknowledged_event_exactly_once(self):
        s = self.service()
        acknowledged, stop = [], threading.Event()
        lock = threading.Lock()

        def client(n):
            i = 0
            while not stop.is_set():
                batch = [event("users.messages.email.Send", user="u%d" % n,
                               id="crash-%d-%d-%d" % (n, i, k)) for k in range(50)]
                i += 1
                try:
                    r = s.post(batch)
                except OSError:
                    return  # the service died mid-request: not acknowledged
                if r.status == 200:
                    with lock:
                        acknowledged.extend(e["id"] for e in batch)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        # Let the clients run for a while, then kill at an arbitrary moment.
        started = time.time()
        while time.time() - started < 30:
            with lock:
                if len(acknowledged) >= 20000 and time.time() - started > 1.5:
                    break
            time.sleep(0.05)
        s.kill9()
        stop.set()
        for t in threads:
            t.join()
        self.assertGreater(len(acknowledged), 1000)

        # After a restart the queue holds every acknowledged event exactly once.
        s.start()
        queued = s.queued_ids()
        self.assertEqual(len(queued), len(set(queued)), "an event is queued twice")
        missing = set(acknowledged) - set(queued)
        self.assertEqual(missing, set(), "%d acknowledged events lost" % len(missing))
        # The restarted service knows the depth it found on disk.
        depth = sum(v for k, v in s.metrics().items() if k.startswith("tributary_queue_depth{"))
        self.assertEqual(depth, len(queued))
        deadline = time.time() + 30
        while "tributary started" not in s.logs() and time.time() < deadline:
            time.sleep(0.05)
        self.assertRegex(s.logs(), r"queue_depth=%d" % len(queued))
        # and still recognises the acknowledged ids as duplicates
        again = s.post([{"event_type": "users.messages.email.Send", "id": acknowledged[0],
                         "time": 1, "user": {"external_user_id": "u0"}}])
        self.assertEqual(again.json()["duplicates"], 1)


class LastStop(ServiceTest):
    def test_a_start_after_a_kill_says_the_last_run_ended_without_a_clean_stop(self):
        said = "the last run ended without a clean stop"
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        self.assertEqual(s.stop(), 0)
        s.start()
        self.assertNotIn(said, s.logs())
        s.kill9()
        s.start()
        self.assertEqual(s.logs().count(said), 1)
        self.assertEqual(s.stop(), 0)
        s.start()
        self.assertEqual(s.logs().count(said), 1)

    def test_a_wal_removed_after_a_kill_does_not_hide_that_the_run_ended_so(self):
        # the mark was in the WAL alone until the first checkpoint: with the
        # WAL removed (taken for a leftover), the queue came back empty and
        # the start said nothing
        s = self.service()
        self.assertEqual(s.post([event() for _ in range(50)]).status, 200)
        s.kill9()
        for suffix in ("-wal", "-shm"):
            path = os.path.join(s.data_dir, "queue.db" + suffix)
            if os.path.exists(path):
                os.unlink(path)
        s.start()
        self.assertEqual(s.logs().count("the last run ended without a clean stop"), 1, s.logs())


class SlowClaims(ServiceTest):
    @unittest.skipIf(WRAPPER, "times mParticle's one-second windows, which valgrind's delays "
                              "in the sender decide")
    def test_no_second_carries_more_batches_than_the_rate_limit_when_claims_are_slow(self):
        # Each claim of batches waits for its commit (400 ms here, a slow
        # disk). Requests sent after one were counted in the rate window of the
        # time before it, and left it that much early: 20 batches within
        # 0.8 s against a limit of 10.
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        d.rate_limit = 10
        s = Service(env=feed_env(d, TRIBUTARY_MPARTICLE_RATE_LIMIT=10,
                                 TRIBUTARY_BATCH_LINGER_MS=50, SLOW_CLAIM_MS=400))
        self.addCleanup(s.cleanup)
        preload(s, "read_errors")
        s.start()
        first = [event("users.messages.email.Send", user="n%d" % i) for i in range(40)]
        self.assertEqual(s.post(first).status, 200)
        later = []
        for k in range(12):  # one new user at a time, each claim slow again
            time.sleep(0.37)
            later.append(event("users.messages.email.Send", user="t%d" % k))
            self.assertEqual(s.post(later[-1:]).status, 200)
        self.assertTrue(d.wait_for_events(len(first) + len(later), 30 * SLOW))
        sent = sorted((r["time"], r["batches"]) for r in d.requests if r["status"] == 202)
        self.assertLessEqual(busiest_second(sent), 10, sent)
        self.assertEqual([r for r in d.requests if r["status"] == 429], [])


class SlowDns(ServiceTest):
    def test_a_name_server_that_does_not_answer_holds_a_stop_no_longer_than_its_grace(self):
        # libcurl waited for its resolver thread when a request timed out:
        # with name servers that do not answer, a stop took as long as
        # glibc's tries (30 s with three servers), past systemd's
        # TimeoutStopSec, and the sender stood still as long in service
        mparticle = types.SimpleNamespace(url="https://mparticle.slow-dns.test")  # no double
        s = Service(env=feed_env(mparticle, TRIBUTARY_LOG_LEVEL="debug",
                                 SLOW_DNS_HOST="mparticle.slow-dns.test", SLOW_DNS_MS="120000"))
        self.addCleanup(s.cleanup)
        preload(s, "slow_dns")
        s.start()
        self.assertEqual(s.post([event("users.messages.email.Send", user="dns")]).status, 200)
        self.wait(lambda: 'msg="sending"' in s.logs(), what="the request resolving its name")
        time.sleep(2)
        started = time.monotonic()
        s.proc.terminate()
        # requests in flight get 10 s at a stop
        s.proc.wait(timeout=10 + 20 * SLOW)
        took = time.monotonic() - started
        self.assertLess(took, 10 + 5 * SLOW, s.logs()[-2000:])
        # the request failed at its connect timeout (10 s, before the grace
        # of the stop ended), not when the resolver gave up
        self.assertIn('error="Timeout was reached"', s.logs())
        # the event was not delivered: it waits for the next start
        with s.db() as db:
            self.assertEqual(db.execute("SELECT count(*) FROM records_unbound").fetchone()[0], 1)


class HeadersOutOfMemory(ServiceTest):
    def test_a_request_whose_headers_cannot_all_be_made_is_not_sent_without_them(self):
        # the first request's Authorization header cannot be allocated: it went
        # without it (and without its Content-Type), was answered 401, and the
        # feed was paused with an ALERT about its credentials
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        s = Service(env=feed_env(d, FAIL_HEADER_AT=2))
        self.addCleanup(s.cleanup)
        preload(s, "curl_errors")
        s.start()
        e = event("users.messages.email.Send", user="headers")
        self.assertEqual(s.post([e]).status, 200)
        self.wait(lambda: e["id"] in d.source_message_ids(), 20, "the event delivered")
        self.assertEqual([r["status"] for r in d.requests], [202])
        self.assertNotIn("refused this feed's credentials", s.logs())
        self.assertIn("cannot start a request to mParticle", s.logs())


def function_range(name):
    """'lo-hi' (hex offsets) of a function of the binary, from nm -S; None when
    nm or the symbol is missing."""
    try:
        out = subprocess.run(["nm", "-S", BIN], capture_output=True, text=True).stdout
    except OSError:
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == name:
            lo, size = int(parts[0], 16), int(parts[1], 16)
            return "%x-%x" % (lo, lo + size)
    return None


class AcknowledgementsOutOfMemory(ServiceTest):
    @unittest.skipIf(SANITIZED or WRAPPER, "the shim replaces calloc, which a sanitizer or "
                     "valgrind owns")
    def test_delivered_batches_whose_deletion_cannot_be_queued_are_deleted_at_a_later_turn(self):
        # out of memory to queue their deletion: they left the sender's memory
        # but stayed in the queue, in flight and counted in its depth, until a
        # restart sent them again
        span = function_range("queue_ack_async")
        if not span:
            self.skipTest("nm finds no queue_ack_async in %s" % BIN)
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        s = Service(env=feed_env(d, FAIL_CALLOC_FROM=span, FAIL_CALLOC_TIMES=5))
        self.addCleanup(s.cleanup)
        preload(s, "alloc_errors")
        s.start()
        events = [event("users.messages.email.Send", user="ack%d" % i) for i in range(10)]
        self.assertEqual(s.post(events).status, 200)
        self.assertTrue(d.wait_for_events(10, 20 * SLOW))
        self.wait(lambda: "delivered batches" in s.logs(), 10, "the failed deletion")

        def left():
            stats = json.loads(s.cli(["queue", "stats", "--json"]).stdout)["feeds"]["unbound"]
            return stats["depth"], stats["in_flight_batches"]

        self.wait(lambda: left() == (0, 0), 10, "the batches deleted")
        # and nothing is sent again after a restart (a repeat of a batch's id)
        self.assertEqual(s.stop(), 0)
        s.start()
        time.sleep(1)
        self.assertEqual(set(d.source_request_ids().values()), {1})


class WallClockSteps(ServiceTest):
    def test_a_step_of_the_wall_clock_neither_expires_nor_forgets_the_dedup_window(self):
        offset = os.path.join(self.tmpdir(), "offset")
        with open(offset, "w") as f:
            f.write("0")
        s = Service(env={"TRIBUTARY_DEDUP_WINDOW_S": "3600", "WALL_CLOCK_OFFSET_FILE": offset})
        self.addCleanup(s.cleanup)
        preload(s, "wall_clock")
        s.start()
        x = event("users.messages.email.Send", user="u1")
        self.assertEqual(s.post([x]).json()["forwarded"], 1)
        # the clock jumps two hours ahead (a virtual machine resumed) for long
        # enough for the housekeeping to run, and a request comes meanwhile
        with open(offset, "w") as f:
            f.write("7200")
        time.sleep(2.5)
        self.assertEqual(s.post([event("users.messages.email.Send", user="u2")]).status, 200)
        with open(offset, "w") as f:
            f.write("0")
        time.sleep(0.1)
        # a second ago in real time: still within the window
        self.assertEqual(s.post([x]).json()["duplicates"], 1)
        self.assertEqual(s.stop(), 0)
        s.start()
        self.assertEqual(s.post([x]).json()["duplicates"], 1)

    def test_the_oldest_event_seems_no_younger_than_now_after_the_clock_went_back(self):
        offset = os.path.join(self.tmpdir(), "offset")
        with open(offset, "w") as f:
            f.write("3600")
        s = Service(env={"WALL_CLOCK_OFFSET_FILE": offset})  # no feed: the events stay
        self.addCleanup(s.cleanup)
        preload(s, "wall_clock")
        s.start()
        self.assertEqual(s.post([event("users.messages.email.Send", user="u1")]).status, 200)
        with open(offset, "w") as f:
            f.write("0")  # an hour back
        time.sleep(1.5)
        self.assertEqual(s.metrics()['tributary_queue_oldest_age_seconds{feed="unbound"}'], 0)
        with open(offset, "w") as f:
            f.write("3610")
        self.wait(lambda: s.metrics()['tributary_queue_oldest_age_seconds{feed="unbound"}'] >= 9,
                  timeout=5, what="the age counted again")

    def test_a_step_of_the_wall_clock_neither_lengthens_a_refusal_nor_forgets_trust(self):
        offset = os.path.join(self.tmpdir(), "offset")
        with open(offset, "w") as f:
            f.write("0")
        s = Service(env={"WALL_CLOCK_OFFSET_FILE": offset})
        self.addCleanup(s.cleanup)
        preload(s, "wall_clock")
        s.start()
        braze = {"X-Forwarded-For": "203.0.113.8"}
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        self.assertEqual(s.post([event()], headers=braze).status, 200)
        statuses = [s.post([event()], token="wrong-token", headers=guesser).status
                    for _ in range(10)]
        self.assertEqual(statuses, [401] * 10)
        # set back an hour, the clock does not make the refusal last an hour more
        with open(offset, "w") as f:
            f.write("-3600")
        time.sleep(0.1)
        r = s.post([event()], headers=guesser)
        self.assertEqual(r.status, 429, r)
        self.assertLessEqual(int(r.headers["retry-after"]), 60, r.headers)
        # two days ahead, it does not forget the address that authenticated
        with open(offset, "w") as f:
            f.write("172800")
        time.sleep(0.1)
        statuses = [s.post([event()], token="wrong-token", headers=braze).status
                    for _ in range(11)]
        self.assertEqual(statuses, [401] * 11)
        self.assertEqual(s.post([event()], headers=braze).status, 200)


class DedupReadErrors(ServiceTest):
    def test_a_read_error_in_the_dedup_ids_at_start_stops_the_start_instead_of_forgetting_them(self):
        s = self.service()
        events = [event("users.messages.email.Send", user="u1") for _ in range(10)]
        for e in events:  # a row of the dedup log each
            self.assertEqual(s.post([e]).status, 200)
        s.kill9()
        preload(s, "read_errors")
        s.env["FAIL_DEDUP_AT"] = "4"
        s.start(wait=False)
        code = s.proc.wait(timeout=20 * SLOW)
        s.log.close()
        self.assertEqual(code, 1, s.logs()[-2000:])
        self.assertIn("cannot read the dedup ids", s.logs())
        # the next start reads them all: a re-send is known
        del s.env["LD_PRELOAD"], s.env["FAIL_DEDUP_AT"]
        s.start()
        r = s.post(events)
        self.assertEqual((r.status, r.json()["duplicates"], r.json()["forwarded"]), (200, 10, 0))


class RestoreReadErrors(ServiceTest):
    """Batches in flight at a kill -9 are restored at the next start; a read
    error on the way is tried again, and until then nothing they hold is taken
    for delivered."""

    def in_flight_at_kill(self, events):
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        d.fail(503)
        s = self.service(env=feed_env(d))
        self.assertEqual(s.post(events).status, 200)
        self.wait(lambda: len(d.requests) >= 1, 20, "a first (failed) send")
        s.kill9()
        d.clear_faults()
        return s, d

    def restart_with_faults(self, s, **faults):
        preload(s, "read_errors")
        s.env.update({k: str(v) for k, v in faults.items()})
        s.start()

    def settled_below(self, s):
        with s.db() as db:
            return db.execute("SELECT below FROM settled WHERE feed = 3").fetchone()[0]

    def test_a_batch_that_cannot_be_read_at_start_is_restored_at_the_next_try(self):
        stuck = ([event("users.messages.email.Send", user="stuck-a") for _ in range(25)] +
                 [event("users.messages.email.Send", user="stuck-b") for _ in range(25)])
        s, d = self.in_flight_at_kill(stuck)
        self.restart_with_faults(s, FAIL_FETCH=1)
        self.wait(lambda: "cannot restore a persisted batch" in s.logs(), 10,
                  "the failed restore")
        # both batches are sent within the run, the one that failed a second later
        ids = {e["id"] for e in stuck}
        self.wait(lambda: ids <= set(d.source_message_ids()), 20, "every restored event sent")
        self.assertIn("every persisted batch is restored", s.logs())
        # and the line moves past them as new events are delivered
        fresh = [event("users.messages.email.Send", user="u%d" % (k % 20)) for k in range(300)]
        self.assertEqual(s.post(fresh).status, 200)
        self.wait(lambda: {e["id"] for e in fresh} <= set(d.source_message_ids()), 20,
                  "new events delivered")
        self.wait(lambda: self.settled_below(s) > 350, 10, "the settled line past every event")

    def test_a_batch_delivered_before_the_next_try_is_not_restored_again(self):
        events = ([event("users.messages.email.Send", user="once-a") for _ in range(5)] +
                  [event("users.messages.email.Send", user="once-b") for _ in range(5)])
        s, d = self.in_flight_at_kill(events)
        # one batch fails to restore; the other is delivered, and its
        # acknowledgement takes the writer longer than the second try waits
        self.restart_with_faults(s, FAIL_FETCH=1, SLOW_ACK_MS=1500)
        self.wait(lambda: {e["id"] for e in events} <= set(d.source_message_ids()), 20,
                  "every event sent")
        time.sleep(2 * SLOW)
        counts = collections.Counter(d.source_message_ids())
        self.assertEqual(sorted(counts.values()), [1] * len(events), counts)

    def test_a_batch_that_can_never_be_restored_is_dead_lettered_past_max_age(self):
        # Every other event waits at most retry.max_age_s: a batch in memory
        # (expire_batches) and a record not claimed (queue_expire) alike. A
        # persisted batch whose records cannot be read at start is neither:
        # it would be tried again every second, for ever, holding its feed's
        # settled line (and the disk of every record after it) meanwhile.
        # Once every read failed for retry.failing_s, it is given up.
        events = [event("users.messages.email.Send", user="never") for _ in range(3)]
        s, d = self.in_flight_at_kill(events)
        s.env["TRIBUTARY_RETRY_MAX_AGE_S"] = "2"
        s.env["TRIBUTARY_RETRY_FAILING_S"] = "3"  # a batch whose every read fails this long
        self.restart_with_faults(s, FAIL_FETCH=1000000000)
        self.wait(lambda: "cannot restore a persisted batch" in s.logs(), 10, "the failed restore")
        ids = sorted(e["id"] for e in events)

        def settled():
            dead = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
            return sorted([x["event_id"] for x in dead] + list(set(d.source_message_ids()))) == ids
        self.wait(settled, 20, "the batch dead-lettered (max_age) or delivered")
        dead = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        self.assertEqual(sorted(x["event_id"] for x in dead), ids)
        self.assertEqual({x["reason"] for x in dead}, {"max_age"})
        self.assertIn("persisted batches that could not be read for retry.failing_s, older than "
                      "retry.max_age_s, moved to the dead-letter store", s.logs())
        self.assertEqual(s.metrics()['tributary_dead_letters_total{reason="max_age"}'], 3)
        # and the feed's records after it are no longer held back: the restore is over
        self.wait(lambda: "every persisted batch is restored" in s.logs(), 10, "the restore done")

    def test_a_read_hiccup_at_start_does_not_dead_letter_events_younger_than_max_age(self):
        # One user's events held on a feed without credentials, received 8 s
        # apart, go in one batch once credentials come; the batch is in flight
        # at a kill -9. At the next start (retry.max_age_s 6: the older event
        # is past it, the younger one a few seconds old) the first read of the
        # batch fails once. A batch restored in memory is split by age
        # (expired_part): only the older event may be a dead letter. The
        # younger one, readable a second later, is sent; it must not go to
        # the dead-letter store with reason max_age seconds after it came.
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        d.fail(503)
        s = self.service(env=feed_env(d, feeds={}), config="return {}\n")
        old = event("users.messages.email.Send", user="mixed")
        self.assertEqual(s.post([old]).status, 200)
        time.sleep(8)
        young = event("users.messages.email.Send", user="mixed")
        self.assertEqual(s.post([young]).status, 200)
        self.assertTrue(s.reload('return { feeds = { unbound = { key = "unbound-key", '
                                 'secret = "unbound-secret" } } }\n'))
        self.wait(lambda: len(d.requests) >= 1, 20, "a first (failed) send")
        s.kill9()
        with s.db() as db:
            made = [b for (blob,) in db.execute("SELECT batches FROM claims")
                    for b in claim_batches(blob)]
        self.assertEqual([len(b) for b in made], [2], "both events in one batch")
        d.clear_faults()
        s.env["TRIBUTARY_RETRY_MAX_AGE_S"] = "6"
        self.restart_with_faults(s, FAIL_FETCH=1)
        self.wait(lambda: "cannot restore a persisted batch" in s.logs(), 10, "the failed restore")

        def dead_ids():
            return [x["event_id"] for x in json.loads(s.cli(["dlq", "list", "--json"]).stdout)]
        self.wait(lambda: young["id"] in d.source_message_ids() or young["id"] in dead_ids(),
                  10, "the young event delivered or dead-lettered")
        self.assertNotIn(young["id"], dead_ids(), "an event 2 s old dead-lettered as max_age")
        self.assertIn(young["id"], d.source_message_ids())

    def test_a_failed_read_of_the_persisted_batches_loses_none_of_them(self):
        events = [event("users.messages.email.Send", user="x") for _ in range(20)]
        s, d = self.in_flight_at_kill(events)
        # the claims as a split leaves them: the part with the smaller record
        # ids persisted after the one with the larger ids
        with s.db() as db:
            (blob,) = db.execute("SELECT batches FROM claims").fetchone()
            ids = sorted(sum(claim_batches(blob), []))
            self.assertEqual(len(ids), 20)
            now_ms = int(time.time() * 1000)
            db.execute("DELETE FROM claims")
            db.execute("DELETE FROM claim_done")
            for srid, part in (("high-part", ids[10:]), ("low-part", ids[:10])):
                db.execute("INSERT INTO claims(feed, created_ms, batches) VALUES(3, ?, ?)",
                           (now_ms, claim_blob([(srid, part)], oldest_ms=now_ms)))
        # the read of the claims fails at its second row: the first part is
        # restored and sent; the second is read at the next try
        self.restart_with_faults(s, FAIL_CLAIMS_AT=2)
        self.wait(lambda: "cannot read the persisted batches" in s.logs(), 10,
                  "the failed read")
        self.wait(lambda: {e["id"] for e in events} <= set(d.source_message_ids()), 20,
                  "every event sent")
        self.wait(lambda: self.settled_below(s) > ids[-1], 10, "the settled line past them")
        # nothing left behind for the next start
        s.stop()
        with s.db() as db:
            self.assertEqual(db.execute("SELECT count(*) FROM records_unbound").fetchone()[0], 0)
            self.assertEqual(db.execute("SELECT count(*) FROM dead").fetchone()[0], 0)


class RerouteErrors(ServiceTest):
    def test_held_events_move_once_a_failed_move_can_be_made(self):
        # iOS events held while no feed has credentials; a reload gives unbound
        # credentials, and the first move of the held events to unbound fails
        # (a storage error, a CLI holding the write lock beyond the busy
        # timeout): they are moved at a later try, not left on ios until
        # retry.max_age_s
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        s = Service(env=feed_env(d, feeds={}, FAIL_DELETE=1), config="return {}\n")
        self.addCleanup(s.cleanup)
        preload(s, "read_errors")
        s.start()
        ios = [event("users.messages.pushnotification.Send", user="m%d" % i, platform="ios")
               for i in range(3)]
        self.assertEqual(s.post(ios).status, 200)
        self.assertTrue(s.reload('return { feeds = { unbound = { key = "unbound-key", '
                                 'secret = "unbound-secret" } } }\n'))
        self.wait(lambda: "cannot move held events" in s.logs(), 10, "the failed move")
        self.wait(lambda: sorted(set(d.source_message_ids())) == sorted(e["id"] for e in ios),
                  15, "the held events delivered on unbound")


class UndoFailure(ServiceTest):
    def test_a_failed_request_whose_records_cannot_be_undone_fails_its_group_and_loses_nothing(self):
        # A request's third record fails, and so does undoing its first two
        # (out of memory to parse "ROLLBACK TO op"). They stayed in the
        # transaction and were committed with the group, while the writer took
        # each feed's next id back: later requests met UNIQUE errors, and some
        # answered 200 were never delivered.
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        s = Service(env=feed_env(d, FAIL_RECORD_AT=3, FAIL_UNDO=1, TRIBUTARY_BATCH_LINGER_MS=10))
        self.addCleanup(s.cleanup)
        preload(s, "read_errors")
        s.start()
        acknowledged, statuses = [], []
        for i in range(20):
            events = [event("users.messages.email.Send", user="u%d-%d" % (i, j)) for j in range(5)]
            for _ in range(3):  # Braze sends a 5xx again
                r = s.post(events)
                statuses.append(r.status)
                if r.status == 200:
                    break
            self.assertEqual(r.status, 200, r)
            acknowledged += [e["id"] for e in events]
        self.assertEqual(statuses.count(503), 1, statuses)
        self.wait(lambda: set(acknowledged) <= set(d.source_message_ids()), 20,
                  "every acknowledged event delivered")
        self.assertEqual(sorted(d.source_message_ids()), sorted(acknowledged))
        self.assertIn("cannot undo a failed operation; its group fails", s.logs())
        self.assertNotIn("UNIQUE", s.logs())


class EventNamesStorage(ServiceTest):
    """The event names are kept beside delivery: a failure to read or store
    them holds up no batch, and is tried again until it works."""

    def start(self, **faults):
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        s = Service(env=feed_env(d))
        self.addCleanup(s.cleanup)
        preload(s, "read_errors")
        s.env.update({k: str(v) for k, v in faults.items()})
        return s.start(), d

    def test_names_that_cannot_be_stored_are_stored_once_they_can_be(self):
        s, d = self.start(FAIL_NAMES_STORE=3)
        self.assertEqual(s.post([event("users.messages.email.Open"),
                                 event("users.messages.email.Send")]).status, 200)
        # delivery does not wait for them
        self.assertTrue(d.wait_for_events(2, 10 * SLOW))
        self.wait(lambda: "event names read and stored again" in s.logs(), 20, "the store")
        self.assertIn("cannot store new event names; tried again every second", s.logs())
        self.assertNotIn("cannot persist batches", s.logs())
        self.assertEqual(s.metrics()["tributary_event_names"], 2)
        names = json.loads(s.cli(["queue", "names", "--json"]).stdout)["names"]
        self.assertEqual(sorted(n["name"] for n in names), ["Email Opens", "Email Sends"])

    def test_events_past_the_names_limit_are_counted_once_when_a_claim_is_tried_again(self):
        # counted as the claim was built, its events counted again at each
        # try after a failed commit
        s, d = self.start(FAIL_CLAIMS_STORE=2, TRIBUTARY_MPARTICLE_EVENT_NAMES_LIMIT=1)
        d.event_names_limit = 1
        self.assertEqual(s.post([event("users.messages.email.Open", user="a"),
                                 event("users.messages.email.Send", user="b")]).status, 200)
        self.assertTrue(d.wait_for_events(1, 20 * SLOW))
        self.wait(lambda: len(d.take_name_dropped()) == 1, what="the event mParticle drops")
        self.assertIn("cannot persist batches; will try again", s.logs())
        self.assertEqual(s.metrics()['tributary_events_past_name_limit_total{feed="unbound"}'], 1)

    def test_names_that_cannot_be_read_at_start_are_read_once_they_can_be(self):
        s, d = self.start()
        self.assertEqual(s.post([event("users.messages.email.Open")]).status, 200)
        self.assertTrue(d.wait_for_events(1, 10 * SLOW))
        self.wait(lambda: s.metrics()["tributary_event_names"] == 1, what="1 name")
        self.assertEqual(s.stop(), 0)
        s.env["FAIL_NAMES_LOAD"] = "2"
        s.start()
        self.assertEqual(s.post([event("users.messages.email.Send")]).status, 200)
        self.assertTrue(d.wait_for_events(2, 10 * SLOW))
        self.wait(lambda: "event names read and stored again" in s.logs(), 20, "the read")
        self.assertIn("cannot read the event names sent before", s.logs())
        self.wait(lambda: s.metrics()["tributary_event_names"] == 2, what="2 names")


class FullDisk(ServiceTest):
    """data_dir on a small tmpfs that fills up (needs root; skipped where mount is refused)."""

    def mount_small_disk(self, size):
        path = self.tmpdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", path],
                          capture_output=True).returncode != 0:
            self.skipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True)
        return path

    def fill(self, min_free_mb, size="64m"):
        """Events to a service whose mParticle answers 503, until the disk refuses more.
        Returns the service, the double, the disk, the acknowledged ids and the
        error of each refusal."""
        disk = self.mount_small_disk(size)
        with open(os.path.join(disk, "filler"), "wb") as f:
            f.write(b"\0" * (12 << 20))
        d = MParticleDouble(feeds=dict(FEEDS)).start()
        self.addCleanup(d.stop)
        d.fail(503)
        s = self.service(env=feed_env(d, TRIBUTARY_DATA_DIR=os.path.join(disk, "var"),
                                      TRIBUTARY_QUEUE_MIN_FREE_MB=min_free_mb))
        s.data_dir = os.path.join(disk, "var")
        acknowledged, refusals, n = [], [], 0
        while len(refusals) < 5 and n < 2000:
            batch = [event("users.messages.email.Send", user="full-%d" % (n % 50),
                           id="full-%d-%d" % (n, k), blob="x" * 400) for k in range(100)]
            n += 1
            r = s.post(batch)
            if r.status == 200:
                acknowledged += [e["id"] for e in batch]
            else:
                self.assertEqual(r.status, 503, r)
                refusals.append(r.json()["error"])
        self.assertTrue(refusals, "the disk never filled up")
        return s, d, disk, acknowledged, refusals

    def assert_all_delivered(self, s, d, acknowledged):
        self.assertTrue(d.wait_for_events(len(acknowledged), 60 * SLOW),
                        "%d of %d delivered" % (d.event_count(), len(acknowledged)))
        self.assertEqual(set(acknowledged) - set(d.source_message_ids()), set())

        def depth():
            return sum(v for k, v in s.metrics().items() if k.startswith("tributary_queue_depth{"))
        deadline = time.time() + 30 * SLOW
        while depth() and time.time() < deadline:
            time.sleep(0.2)
        self.assertEqual(depth(), 0, "delivered events still counted as queued")
        self.assertEqual(s.queued_ids(), [])

    def test_a_disk_filled_to_the_last_byte_delivers_everything_once_space_is_freed(self):
        s, d, disk, acknowledged, _ = self.fill(min_free_mb=0)
        # mParticle recovers, then the disk gets room again
        d.clear_faults()
        self.wait(lambda: "queue: acknowledgements failed" in s.logs(), timeout=10,
                  what="acknowledgements failing")
        time.sleep(2.5)
        # the write tried every second while storage fails takes a page already
        # there; while deletions wait to be tried again, theirs is the word
        since = s.logs().index("queue: acknowledgements failed")
        self.assertNotIn("queue: storage works again", s.logs()[since:])
        self.assertIn("storage failing", s.get("/readyz").json()["reasons"])
        os.unlink(os.path.join(disk, "filler"))
        self.assert_all_delivered(s, d, acknowledged)

    def test_storage_reported_failing_recovers_within_seconds_of_space_freed_without_requests(self):
        # no feed has credentials: nothing is sent, so nothing but requests
        # would commit and find the disk has room again
        disk = self.mount_small_disk("32m")
        with open(os.path.join(disk, "filler"), "wb") as f:
            f.write(b"\0" * (12 << 20))
        s = self.service(env={"TRIBUTARY_DATA_DIR": os.path.join(disk, "var"),
                              "TRIBUTARY_QUEUE_MIN_FREE_MB": "0"})
        n = 0
        while s.post([event("users.messages.email.Send", id="fill-%d-%d" % (n, k), blob="x" * 400)
                      for k in range(100)]).status == 200:
            n += 1
            self.assertLess(n, 2000, "the disk never filled up")

        def storage_failing():
            return "storage failing" in s.get("/readyz").json()["reasons"]
        self.assertTrue(storage_failing())
        os.unlink(os.path.join(disk, "filler"))
        freed = time.time()
        self.wait(lambda: not storage_failing(), timeout=5, what="storage working again")
        self.assertLess(time.time() - freed, 5 * SLOW)
        self.assertIn("queue: storage works again", s.logs())
        self.assertEqual(s.post([event()]).status, 200)

    def post_until(self, s, user, status):
        """Posts batches of new events until one is answered status; returns the
        ids answered 200."""
        deadline, n, taken = time.time() + 10 * SLOW, 0, []
        while True:
            batch = [event("users.messages.email.Send", user=user, id="%s-%d-%d" % (user, n, k))
                     for k in range(10)]
            n += 1
            got = s.post(batch).status
            if got == 200:
                taken += [e["id"] for e in batch]
            if got == status:
                return taken
            self.assertLess(time.time(), deadline, s.logs()[-2000:])
            time.sleep(0.1)

    def test_new_events_are_refused_before_the_disk_is_full_and_the_queue_drains(self):
        s, d, disk, acknowledged, refusals = self.fill(min_free_mb=64, size="160m")
        self.assertIn("refusing new events: the disk of data_dir is nearly full", s.logs())
        self.assertEqual(set(refusals), {"disk full"})
        # mParticle recovers; the disk keeps its filler
        d.clear_faults()
        self.assert_all_delivered(s, d, acknowledged)
        # the delivered events' pages are free in the file, and new events take
        # them: the disk counts as having room again
        acknowledged += self.post_until(s, "after", 200)
        self.assertTrue(d.wait_for_events(len(acknowledged), 30 * SLOW))
        self.assertIn("the disk of data_dir has room again", s.logs())
        # after a restart the WAL starts empty, and new events reach those pages
        # through it: with less free space than it may take, they are refused
        self.assertEqual(s.stop(), 0)
        s.start()
        st = os.statvfs(disk)
        with open(os.path.join(disk, "filler2"), "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (8 << 20)))
        taken = self.post_until(s, "later", 503)
        self.assertLessEqual(len(taken), 50, "refused only after %d events" % len(taken))
        self.assertIn("wal_room_mib=", s.logs())
        acknowledged += taken
        os.unlink(os.path.join(disk, "filler2"))
        acknowledged += self.post_until(s, "again", 200)
        self.assert_all_delivered(s, d, acknowledged)
