"""kill -9 during ingestion: every acknowledged event is still queued, exactly once."""

import threading
import time

from harness import ServiceTest, event


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
