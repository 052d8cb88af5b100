"""Inbound HTTP: Currents batches in, Braze's status codes out (currents-http.md)."""

import hashlib
import hmac
import http.client
import json
import os
import re
import socket
import threading
import time

from harness import (SLOW, TOKEN, Service, ServiceTest, event, lines_per_second, request,
                     run_cli)


# a rule that prints 50 lines for each event
PRINT_50_LINES = ("return function(event, out)\n"
                  "  for i = 1, 50 do print('line', i) end\n"
                  "end\n")


class Ingest(ServiceTest):
    def test_valid_batch_is_committed_and_summarised(self):
        s = self.service()
        events = [
            event("users.messages.pushnotification.Send", platform="ios", user="c-1"),
            event("users.messages.email.Open", user=None),  # skipped: no external id
            event("users.behaviors.CustomEvent", user="c-2"),  # filtered: not mapped
        ]
        r = s.post(events)
        self.assertEqual(r.status, 200, r)
        summary = r.json()
        self.assertEqual(summary["accepted"], 3)
        self.assertEqual(summary["forwarded"], 1)
        self.assertEqual(summary["skipped"], 1)
        self.assertEqual(summary["filtered"], 1)
        self.assertEqual(summary["duplicates"], 0)
        self.assertEqual(summary["quarantined"], 0)
        self.assertEqual(s.queued_ids(), [events[0]["id"]])

    def test_every_event_of_a_large_batch_is_queued_in_order(self):
        s = self.service()
        events = [event("users.messages.email.Send", user="u-%d" % i) for i in range(100)]
        r = s.post(events)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["forwarded"], 100)
        self.assertEqual(s.queued_ids(), [e["id"] for e in events])

    def test_a_request_target_in_absolute_form_is_served_as_its_path(self):
        # RFC 9112 3.2.2: a server takes "POST http://host/currents"; a proxy
        # may pass it on, and a 404 would make Braze disable the connector
        s = self.service()
        events = [event("users.messages.email.Send", user="u-%d" % i) for i in range(2)]
        for e, target in zip(events, ("http://127.0.0.1:%d/currents" % s.port,
                                      "HTTPS://tributary.example/currents?workspace=a")):
            r = s.post([e], path=target)
            self.assertEqual(r.status, 200, (target, r))
        self.assertEqual(s.queued_ids(), [e["id"] for e in events])
        self.assertEqual(s.post([event()], path="http://127.0.0.1:%d/other" % s.port).status, 404)
        self.assertEqual(s.get("http://127.0.0.1:%d" % s.port).status, 404)

    def test_duplicate_ids_are_acknowledged_and_stored_once(self):
        s = self.service()
        e = event("users.messages.email.Send")
        self.assertEqual(s.post([e]).json()["forwarded"], 1)
        again = s.post([e, e])
        self.assertEqual(again.status, 200)
        self.assertEqual(again.json()["duplicates"], 2)
        self.assertEqual(again.json()["forwarded"], 0)
        self.assertEqual(s.queued_ids(), [e["id"]])
        self.assertEqual(s.metrics()["tributary_events_duplicate_total"], 2)
        # the log says so too, at debug (the harness's level)
        self.assertRegex(s.logs(), r'level=debug msg="events not forwarded: already stored '
                                   r'within the dedup window" request_id=\S+ duplicates=2 events=2')

    def test_unknown_fields_and_unknown_event_types_are_accepted(self):
        s = self.service()
        e = event("users.messages.email.Open", brand_new_field={"x": [1, 2]})
        e["top_level_novelty"] = True
        e["user"]["new_user_field"] = "v"
        future = event("users.messages.hologram.Projected")
        r = s.post([e, future])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["forwarded"], 1)
        self.assertEqual(r.json()["filtered"], 1)
        m = s.metrics()
        self.assertEqual(m['tributary_events_filtered_total{reason="unsupported_type"}'], 1)

    def test_rule_error_quarantines_the_event_and_the_rest_succeeds(self):
        rules = self.rules_dir({"20-explode.lua": (
            "return function(event, out)\n"
            "  if event.properties.explode then\n"
            "    error('cannot handle this one')\n"
            "  end\n"
            "end\n")})
        s = self.service(rules_dir=rules)
        bad = event("users.messages.email.Open", explode=True)
        good = event("users.messages.email.Open")
        r = s.post([bad, good])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 1)
        self.assertEqual(r.json()["forwarded"], 1)
        with s.db() as db:
            rows = db.execute("SELECT event_id, reason, detail, raw FROM dead").fetchall()
        self.assertEqual(len(rows), 1)
        event_id, reason, detail, raw = rows[0]
        self.assertEqual(event_id, bad["id"])
        self.assertEqual(reason, "rule_error")
        self.assertIn("20-explode.lua:3:", detail)
        self.assertIn("cannot handle this one", detail)
        self.assertEqual(json.loads(raw)["id"], bad["id"])
        self.assertEqual(s.metrics()['tributary_dead_letters_total{reason="rule_error"}'], 1)

    def test_a_dead_letter_with_a_very_long_id_is_logged_with_its_reason_and_the_ids_start(self):
        # the log line's cap: the id is cut (between characters), the line keeps
        # its other fields
        rules = self.rules_dir({"20-explode.lua": (
            "return function(event, out)\n"
            "  error('cannot handle this one')\n"
            "end\n")})
        s = self.service(rules_dir=rules)
        # a two-byte character across byte 8,192: the cut falls before it
        long_id = "i" * 8191 + "\u00e9" + "i" * 61808
        r = s.post([event("users.messages.email.Open", id=long_id)])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 1)
        lines = [l for l in s.logs().splitlines() if 'msg="event quarantined"' in l]
        self.assertEqual(len(lines), 1, s.logs()[-3000:])
        self.assertIn("reason=rule_error", lines[0])
        self.assertIn("cannot handle this one", lines[0])
        self.assertIn("event_type=users.messages.email.Open", lines[0])
        self.assertIn('event_id="' + "i" * 8191 + '... (cut, 70001 bytes)"', lines[0])
        self.assertLess(len(lines[0]), 10000)
        self.assertNotIn("log line too long", s.logs())

    def test_a_rule_failing_for_every_event_writes_at_most_20_quarantine_lines_a_second(self):
        rules = self.rules_dir({"20-explode.lua": (
            "return function(event, out)\n"
            "  error('cannot handle this one')\n"
            "end\n")})
        s = self.service(rules_dir=rules)
        started = time.time()
        r = s.post([event("users.messages.email.Open") for _ in range(100)])
        seconds = int(time.time()) - int(started) + 1  # the clock seconds the mapping may span
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 100)
        logs = s.logs()
        lines = logs.count('msg="event quarantined"')
        self.assertGreaterEqual(lines, 20, logs[-3000:])
        self.assertLessEqual(lines, 20 * seconds, logs[-3000:])
        self.assertIn('msg="events quarantined: more this second than the log takes; the rest of '
                      'them are left out of it', logs)
        # every one of them is kept and counted all the same
        self.assertEqual(s.metrics()['tributary_dead_letters_total{reason="rule_error"}'], 100)
        with s.db() as db:
            self.assertEqual(db.execute("SELECT count(*) FROM dead").fetchone()[0], 100)

    def test_at_debug_each_event_not_forwarded_is_said_with_its_reason(self):
        rules = self.rules_dir({"20-drop.lua": (
            "return function(event, out)\n"
            "  if event.properties and event.properties.drop then\n"
            "    return false, 'campaign excluded by ops'\n"
            "  end\n"
            "end\n")})
        s = self.service(rules_dir=rules)  # the harness logs at debug
        dropped = event("users.messages.email.Open", drop=True)
        anonymous = event("users.messages.email.Open")
        del anonymous["user"]["external_user_id"]
        unknown = event("users.behaviors.BrandNewThing")
        r = s.post([dropped, anonymous, unknown, event("users.messages.email.Open")])
        self.assertEqual((r.json()["filtered"], r.json()["skipped"], r.json()["forwarded"]),
                         (2, 1, 1), r)
        lines = {re.search(r"event_id=(\S+)", l).group(1): l
                 for l in s.logs().splitlines() if 'msg="event not forwarded"' in l}
        self.assertEqual(set(lines), {dropped["id"], anonymous["id"], unknown["id"]})
        self.assertIn('reason=rule_drop detail="campaign excluded by ops" rule=20-drop.lua',
                      lines[dropped["id"]])
        self.assertIn("reason=no_external_id", lines[anonymous["id"]])
        self.assertIn("reason=unsupported_type", lines[unknown["id"]])
        self.assertIn("rule=10-mparticle.lua", lines[unknown["id"]])
        self.assertIn("level=debug", lines[unknown["id"]])
        # at info: no line per event
        quiet = self.service(rules_dir=rules, env={"TRIBUTARY_LOG_LEVEL": "info"})
        self.assertEqual(quiet.post([dropped]).status, 200)
        self.assertNotIn("event not forwarded", quiet.logs())

    def test_a_requeued_event_dead_lettered_again_keeps_the_bytes_braze_sent(self):
        # the rule changes the event before it fails; numbers JSON cannot round
        # through a double and an empty list must come back as they were sent
        rules = self.rules_dir({"20-explode.lua": (
            "return function(event, out)\n"
            "  event.properties.touched = true\n"
            "  error('still failing')\n"
            "end\n")})
        s = self.service(rules_dir=rules)
        raw = ('{"event_type": "users.messages.email.Open", "id": "keep-bytes-1",'
               ' "time": 1732800000.123456, "user": {"external_user_id": "c-1"},'
               ' "properties": {"n": 12345678901234567890, "l": [], "url": "https://x/y"}}')
        r = s.post(body='{"events": [%s]}' % raw)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 1)
        for _ in range(2):
            p = s.cli(["dlq", "requeue", "--reason", "rule_error"])
            self.assertEqual(p.returncode, 0, p.stderr)
            with s.db() as db:
                rows = db.execute("SELECT raw FROM dead").fetchall()
            self.assertEqual([row[0] for row in rows], [raw])

    def test_print_in_a_rule_logs_exactly_its_arguments(self):
        rules = self.rules_dir({"20-print.lua": (
            "return function(event, out)\n"
            "  print('mapped', event.id, 42)\n"
            "  print('a\\0b', 'after')\n"
            "end\n")})
        s = self.service(rules_dir=rules)
        e = event("users.messages.email.Open")
        self.assertEqual(s.post([e]).status, 200)
        lines = [l for l in s.logs().splitlines() if "script print" in l]
        self.assertIn('text="mapped\\t%s\\t42"' % e["id"], lines[0])
        # a NUL ended the text there, and what came after it was lost
        self.assertIn('text="a\u2400b\\tafter"', lines[1])

    def test_print_of_a_long_text_logs_its_start_and_its_length(self):
        rules = self.rules_dir({"20-print.lua": (
            "return function(event, out)\n"
            "  print('a' .. ('\\u{e9}'):rep(5000))\n"
            "  print(('x'):rep(8193))\n"
            "end\n")})
        s = self.service(rules_dir=rules)
        self.assertEqual(s.post([event("users.messages.email.Open")]).status, 200)
        line = next(l for l in s.logs().splitlines() if "script print" in l)
        self.assertIn('msg="script print, cut"', line)
        # 8,191 bytes: the character across the cut is left out whole
        self.assertIn("text=a%s bytes=10001" % ("\u00e9" * 4095), line)
        self.assertIn("text=%s bytes=8193" % ("x" * 8192), s.logs())

    def test_prints_above_the_log_level_are_neither_written_nor_counted(self):
        # at warn, prints never written were counted past 20 a second as
        # left out, and a warning said so
        rules = self.rules_dir({"20-print.lua": PRINT_50_LINES})
        s = self.service(rules_dir=rules, env={"TRIBUTARY_LOG_LEVEL": "warn"})
        self.assertEqual(s.post([event("users.messages.email.Open")]).status, 200)
        self.assertEqual(s.metrics()["tributary_rule_prints_dropped_total"], 0)
        self.assertNotIn("script print", s.logs())

    def test_print_lines_over_the_limit_are_counted_and_said_once_a_second(self):
        rules = self.rules_dir({"20-print.lua": PRINT_50_LINES})
        s = self.service(rules_dir=rules)
        self.assertEqual(s.post([event("users.messages.email.Open")]).status, 200)
        logs = s.logs().splitlines()
        printed = [l for l in logs if 'msg="script print"' in l]
        dropped = s.metrics()["tributary_rule_prints_dropped_total"]
        self.assertEqual(len(printed) + dropped, 50)
        # 20 a second: the 50 lines span two seconds at most, even on a slow host
        self.assertGreaterEqual(dropped, 10)
        said = [l for l in logs if "script print: more lines this second" in l]
        self.assertIn(len(said), (1, 2))
        self.assertIn("limit_per_second=20", said[0])
        self.assertRegex(printed[0], r'text="line\\t1" at=\S*/20-print\.lua:2$')

    def test_concurrent_requests_are_all_committed(self):
        s = self.service()
        results, ids = [], []
        lock = threading.Lock()

        def worker(n):
            for _ in range(10):
                batch = [event("users.messages.email.Send", user="w%d" % n) for _ in range(20)]
                r = s.post(batch)
                with lock:
                    results.append(r.status)
                    ids.extend(e["id"] for e in batch)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(set(results), {200})
        self.assertEqual(sorted(s.queued_ids()), sorted(ids))
        # group commit: concurrent requests shared transactions (and fsyncs)
        m = s.metrics()
        self.assertGreaterEqual(m["tributary_queue_operations_total"], 80)
        self.assertLess(m["tributary_queue_commits_total"], m["tributary_queue_operations_total"])


class Auth(ServiceTest):
    def test_missing_token_is_401(self):
        s = self.service()
        r = s.post([event()], token=None)
        self.assertEqual(r.status, 401)
        self.assertEqual(s.queued_ids(), [])

    def test_wrong_token_is_401_and_not_echoed(self):
        s = self.service()
        r = s.post([event()], token="not-the-token")
        self.assertEqual(r.status, 401)
        self.assertNotIn("not-the-token", r.body)
        self.assertNotIn("not-the-token", s.logs())

    def test_any_configured_token_is_accepted_for_rotation(self):
        s = self.service(tokens=("old-token-aaaaaaaa", "new-token-bbbbbbbb"))
        self.assertEqual(s.post([event()], token="old-token-aaaaaaaa").status, 200)
        self.assertEqual(s.post([event()], token="new-token-bbbbbbbb").status, 200)
        self.assertEqual(s.post([event()], token="new-token-bbbbbbb").status, 401)

    def test_empty_body_with_good_token_is_a_2xx_no_op(self):
        s = self.service()
        r = s.post(body="")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["accepted"], 0)

    def test_empty_list_with_good_token_is_a_2xx_no_op(self):
        s = self.service()
        r = s.post([])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["accepted"], 0)

    def test_empty_probe_with_bad_token_is_401(self):
        s = self.service()
        self.assertEqual(s.post(body="", token="bad").status, 401)
        self.assertEqual(s.post([], token=None).status, 401)

    def test_without_configured_tokens_loopback_accepts_requests(self):
        s = self.service(tokens=())
        self.assertEqual(s.post([event()], token=None).status, 200)
        self.assertIn("without authentication", s.logs())

    def test_non_loopback_listen_without_token_refuses_to_start(self):
        s = Service(tokens=(), env={"TRIBUTARY_LISTEN": "0.0.0.0:0"})
        s.expected_exit = 78  # EX_CONFIG: a configuration error
        self.addCleanup(s.cleanup)
        s.start(wait=False)
        self.assertEqual(s.proc.wait(timeout=30), 78)
        self.assertIn("without inbound.tokens", s.logs())


class MalformedInput(ServiceTest):
    def assert_400(self, s, body, index=None, reason=None):
        r = s.post(body=body)
        self.assertEqual(r.status, 400, r)
        err = r.json()
        if index is not None:
            self.assertEqual(err["index"], index)
        if reason is not None:
            self.assertIn(reason, err["reason"])
        self.assertEqual(s.queued_ids(), [])
        return err

    def test_malformed_json_is_400(self):
        s = self.service()
        self.assert_400(s, '{"events": [', reason="malformed JSON")

    def test_not_an_envelope_is_400(self):
        s = self.service()
        self.assert_400(s, json.dumps([event()]))
        self.assert_400(s, '{"data": []}')
        self.assert_400(s, '"events"')

    def test_events_not_a_list_is_400(self):
        s = self.service()
        self.assert_400(s, '{"events": {"a": 1}}', reason="list")
        self.assert_400(s, '{"events": 7}', reason="list")

    def test_events_given_twice_is_400_and_queues_nothing(self):
        # cjson keeps the last list: the events of the first were answered
        # 200 and lost; an empty last list lost them all
        s = self.service()
        first, last = json.dumps([event()]), json.dumps([event()])
        for body in ('{"events": %s, "events": %s}' % (first, last),
                     '{"events": %s, "other": 1, "events": []}' % first):
            with self.subTest(body=body[:40]):
                self.assert_400(s, body, reason='"events" is given more than once')
        self.assertEqual(s.queued_ids(), [])

    def test_event_without_id_is_400_naming_its_index(self):
        s = self.service()
        e = event()
        del e["id"]
        self.assert_400(s, json.dumps({"events": [event(), e]}), index=1, reason="missing id")
        # Braze drops an event refused again: a warning, which names the event at fault
        self.assertRegex(s.logs(), r'level=warn msg="request refused as invalid; Braze sends its '
                                   r'events again one by one, and drops one that is refused '
                                   r'again" .*status=400 reason="missing id" '
                                   r'index=1')

    def test_refused_requests_are_logged_up_to_20_a_second(self):
        s = self.service()
        for _ in range(45):
            self.assertEqual(s.post(body='{"events": [').status, 400)
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="400"}'], 45)
        # per second of the log's clock: the refusals (each answer is at debug)
        # and their lines; 45 within two seconds put 23 or more in one. A
        # line and its answer are stamped apart, so either may fall in the
        # next second: the counts are compared with one line of leeway, the
        # limit exactly
        counts = lines_per_second(s.logs(), answers=('msg="answered"', "status=400"),
                                  lines=('msg="request refused as invalid',))
        answers, lines = counts["answers"], counts["lines"]
        self.assertEqual(sum(answers.values()), 45)
        seconds = sorted(set(answers) | set(lines))
        for second in seconds:
            self.assertLessEqual(lines[second], 20, (second, answers, lines))
            self.assertLessEqual(abs(lines[second] - min(answers[second], 20)), 1,
                                 (second, answers, lines))
        if not any(n > 21 for n in answers.values()):
            self.skipTest("the requests were spread over more than two seconds (%s)" % answers)
        self.assertLess(sum(lines.values()), 45)
        self.assertIn("requests refused: more this second than the log takes", s.logs())

    def test_event_without_event_type_is_400(self):
        s = self.service()
        e = event()
        del e["event_type"]
        self.assert_400(s, json.dumps({"events": [e]}), index=0, reason="event_type")

    def test_event_without_time_is_400(self):
        s = self.service()
        e = event()
        del e["time"]
        self.assert_400(s, json.dumps({"events": [e]}), index=0, reason="missing time")

    def test_time_that_is_not_a_number_is_400(self):
        s = self.service()
        e = event()
        e["time"] = "yesterday"
        self.assert_400(s, json.dumps({"events": [e]}), index=0, reason="time")

    def test_event_that_is_not_an_object_is_400(self):
        s = self.service()
        self.assert_400(s, '{"events": [42]}', index=0, reason="not a JSON object")

    def test_one_bad_event_rejects_the_whole_request_with_no_partial_write(self):
        s = self.service()
        good = [event() for _ in range(5)]
        bad = event()
        bad["id"] = ""
        self.assert_400(s, json.dumps({"events": good + [bad]}), index=5)
        # Braze then re-sends the good ones alone
        self.assertEqual(s.post(good).status, 200)
        self.assertEqual(len(s.queued_ids()), 5)

    def test_body_over_the_limit_is_413(self):
        s = self.service(env={"TRIBUTARY_INBOUND_MAX_BODY_BYTES": "4096"})
        big = [event(padding="x" * 1000) for _ in range(10)]
        r = s.post(big)
        self.assertEqual(r.status, 413, r)
        small = [event()]
        self.assertEqual(s.post(small).status, 200)

    def test_a_body_over_the_limit_written_whole_before_the_answer_is_read_gets_413(self):
        # answered before it was read, the body met a reset, and the 413 with it
        s = self.service(env={"TRIBUTARY_INBOUND_MAX_BODY_BYTES": "4096"})
        body = json.dumps({"events": [event(padding="x" * 1000) for _ in range(8000)]}).encode()
        reply = self.send_whole_then_read(s, "Authorization: Bearer %s\r\n" % TOKEN, body)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply[:200])
        self.assertEqual(s.queued_ids(), [])
        # a client that waits to be told to send its body is told no at once
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        try:
            sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                          "Expect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                          % (TOKEN, len(body))).encode())
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 413 "))
        finally:
            sock.close()

    def test_a_request_its_client_abandons_mid_body_is_counted(self):
        # a load balancer that closes connections left no trace: nothing is
        # lost (Braze got no answer and sends it again), but it was unseen
        s = self.service()
        body = json.dumps({"events": [event()]}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                      "Content-Length: %d\r\n\r\n" % (TOKEN, len(body))).encode() + body[:20])
        time.sleep(0.2)
        sock.close()
        self.wait(lambda: s.metrics()["tributary_http_requests_abandoned_total"] == 1,
                  what="the abandoned request counted")
        self.assertRegex(s.logs(), r'level=debug msg="request abandoned: its client closed the '
                                   r'connection before the answer" .*body_bytes=20')
        self.assertEqual(s.queued_ids(), [])
        # an answered request is not counted, nor a health check
        self.assertEqual(s.post([event()]).status, 200)
        self.assertEqual(s.metrics()["tributary_http_requests_abandoned_total"], 1)
        # nor one with a wrong token (its 401 waits for the body): anyone could
        # send those, and nothing of theirs was for delivery
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                      "Content-Length: %d\r\n\r\n" % len(body)).encode() + body[:20])
        time.sleep(0.2)
        sock.close()
        self.wait(lambda: "authentication failed" in s.logs(), what="the failed authentication")
        time.sleep(0.3)
        self.assertEqual(s.metrics()["tributary_http_requests_abandoned_total"], 1)

    def send_whole_then_read(self, s, headers, body, chunked=False):
        """Writes the request with its whole body (chunked: in chunks of 64 KiB)
        before reading; the status line."""
        if chunked:
            framing = "Transfer-Encoding: chunked"
            body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                            for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
        else:
            framing = "Content-Length: %d" % len(body)
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        try:
            sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\n%s%s\r\n\r\n"
                          % (headers, framing)).encode() + body)
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            reply = b"reset"
        finally:
            sock.close()
        return reply.split(b"\r\n")[0]

    def test_a_401_or_415_reaches_a_client_that_writes_its_whole_body_first(self):
        # sent before the body was read, it met a reset: Braze saw a broken
        # connection and retried, instead of stopping on a wrong token
        s = self.service()
        body = json.dumps({"events": [event(padding="x" * 1000) for _ in range(3000)]}).encode()
        self.assertEqual(self.send_whole_then_read(s, "Authorization: Bearer wrong-token\r\n", body),
                         b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(self.send_whole_then_read(
            s, "Authorization: Bearer %s\r\nContent-Encoding: gzip\r\n" % TOKEN, body),
            b"HTTP/1.1 415 Unsupported Media Type")
        self.assertEqual(s.queued_ids(), [])
        m = s.metrics()
        self.assertEqual(m['tributary_http_requests_total{code="401"}'], 1)
        self.assertEqual(m['tributary_http_requests_total{code="415"}'], 1)
        # a client that waits to be told to send its body is told no at once
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        try:
            sock.sendall(b"POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 401 "))
        finally:
            sock.close()

    def test_a_401_or_415_reaches_a_client_that_writes_a_chunked_body_whole_first(self):
        # answered at the headers, a body of megabytes met a broken pipe
        s = self.service()
        body = json.dumps({"events": [event(padding="x" * 1000) for _ in range(5000)]}).encode()
        self.assertEqual(self.send_whole_then_read(s, "Authorization: Bearer wrong-token\r\n",
                                                   body, chunked=True),
                         b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(self.send_whole_then_read(
            s, "Authorization: Bearer %s\r\nContent-Encoding: gzip\r\n" % TOKEN, body,
            chunked=True), b"HTTP/1.1 415 Unsupported Media Type")
        self.assertEqual(s.queued_ids(), [])

    def test_a_refused_chunked_body_is_read_no_further_than_a_body_may_be_long(self):
        # unbounded by any header, it was read and dropped for as long as it came
        s = self.service(env={"TRIBUTARY_INBOUND_MAX_BODY_BYTES": "4096"})
        self.assertEqual(self.send_whole_then_read(s, "Authorization: Bearer wrong-token\r\n",
                                                   b"x" * 4096, chunked=True),
                         b"HTTP/1.1 401 Unauthorized")
        self.assertNotIn("connection closed", s.logs())
        self.assertEqual(s.metrics()["tributary_http_refused_bodies_cut_total"], 0)
        self.assertNotEqual(self.send_whole_then_read(s, "Authorization: Bearer wrong-token\r\n",
                                                      b"x" * 4097, chunked=True),
                            b"HTTP/1.1 401 Unauthorized")
        self.wait(lambda: "read before its answer; connection closed" in s.logs(),
                  what="the log line")
        # unanswered, it is counted apart (a 401 answered is in requests_total)
        m = s.metrics()
        self.assertEqual(m["tributary_http_refused_bodies_cut_total"], 1)
        self.assertEqual(m['tributary_http_requests_total{code="401"}'], 1)

    def test_chunked_body_over_the_limit_is_413(self):
        s = self.service(env={"TRIBUTARY_INBOUND_MAX_BODY_BYTES": "4096"})
        body = json.dumps({"events": [event(padding="x" * 1000) for _ in range(10)]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.putrequest("POST", "/currents")
        conn.putheader("Authorization", "Bearer " + TOKEN)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 1000):
            chunk = body[i:i + 1000]
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        r = conn.getresponse()
        self.assertEqual(r.status, 413)
        conn.close()
        self.assertEqual(s.queued_ids(), [])

    def test_more_events_than_allowed_is_413(self):
        s = self.service(env={"TRIBUTARY_INBOUND_MAX_EVENTS": "3"})
        self.assertEqual(s.post([event() for _ in range(4)]).status, 413)
        self.assertEqual(s.post([event() for _ in range(3)]).status, 200)


class OwnTrouble(ServiceTest):
    def test_queue_over_its_limit_is_503_with_retry_after(self):
        s = self.service(env={"TRIBUTARY_QUEUE_MAX_DEPTH": "3", "TRIBUTARY_INBOUND_MAX_EVENTS": "3"})
        self.assertEqual(s.post([event(), event()]).status, 200)
        r = s.post([event(), event()])
        self.assertEqual(r.status, 503, r)
        # room comes as the queue drains: Braze waits half a minute, not a few seconds
        self.assertEqual(r.headers["retry-after"], "30")
        self.assertEqual(len(s.queued_ids()), 2)

    def test_a_lasting_refusal_is_logged_once_per_10_s_with_how_many_it_refused(self):
        # Braze retries every refused request: a line for each would flood the log
        s = self.service(env={"TRIBUTARY_QUEUE_MAX_DEPTH": "3", "TRIBUTARY_INBOUND_MAX_EVENTS": "3"})
        self.assertEqual(s.post([event(), event(), event()]).status, 200)
        for _ in range(20):
            self.assertEqual(s.post([event()]).status, 503)
        logs = s.logs()
        self.assertEqual(logs.count("msg=\"request not stored; Braze will retry\""), 1, logs)
        self.assertEqual(logs.count('level=warn msg="answered"'), 1, logs)
        self.assertIn("times=1", logs)
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="503"}'], 20)
        # the next line, 10 s after the first, counts the requests refused
        # meanwhile; they go on every half second, as Braze's retries would, so
        # that the place is never quiet long enough for the untold times to be
        # written on their own (see log_repeats_flush)
        # (each place keeps its own 10 s: the two may come due at two requests)
        places = {"stored": 'msg="request not stored; Braze will retry"',
                  "answered": 'level=warn msg="answered"'}
        posted, started, due = 20, time.monotonic(), {}
        while len(due) < 2:
            self.assertLess(time.monotonic() - started, 30 * SLOW, "no second lines in 30 s")
            time.sleep(0.5)
            self.assertEqual(s.post([event()]).status, 503)
            posted += 1
            logs = s.logs()
            for place, line in places.items():
                if place not in due and logs.count(line) >= 2:
                    due[place] = posted - 1  # the refused requests after the first line
        self.assertRegex(logs, r'msg="request not stored; Braze will retry" request_id=\S+ '
                               r'queue=full events=1 times=%d' % due["stored"])
        self.assertRegex(logs, r'level=warn msg="answered" request_id=\S+ status=503 '
                               r'path=/currents times=%d' % due["answered"])

    def test_a_service_refusing_new_events_is_not_ready(self):
        s = self.service(env={"TRIBUTARY_QUEUE_MAX_DEPTH": "5", "TRIBUTARY_INBOUND_MAX_EVENTS": "3",
                              "TRIBUTARY_FEEDS_UNBOUND_KEY": "k-123456",
                              "TRIBUTARY_FEEDS_UNBOUND_SECRET": "s-123456",
                              "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        self.assertEqual(s.get("/readyz").status, 200)
        self.assertEqual(s.post([event(), event(), event()]).status, 200)
        self.assertEqual(s.get("/readyz").status, 200)  # two more would fit
        # three do not: refused, and not ready while they would be refused again
        self.assertEqual(s.post([event(), event(), event()]).status, 503)
        r = s.get("/readyz")
        self.assertEqual(r.status, 503, r)
        self.assertIn("queue full (queue.max_depth)", r.json()["reasons"][0])
        # polling a service that is not ready says nothing in the log
        for _ in range(3):
            s.get("/readyz")
        self.assertNotRegex(s.logs(), r'level=warn msg="answered" .*path=/readyz')
        self.assertRegex(s.logs(), r'level=debug msg="answered" .*status=503 path=/readyz')

    def test_a_disk_nearly_full_is_not_ready(self):
        s = self.service(env={"TRIBUTARY_QUEUE_MIN_FREE_MB": str(1 << 29),
                              "TRIBUTARY_FEEDS_UNBOUND_KEY": "k-123456",
                              "TRIBUTARY_FEEDS_UNBOUND_SECRET": "s-123456",
                              "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        deadline = time.time() + 5 * SLOW
        while s.get("/readyz").status == 200 and time.time() < deadline:
            time.sleep(0.1)
        r = s.get("/readyz")
        self.assertEqual(r.status, 503, r)
        self.assertIn("disk nearly full (queue.min_free_mb)", r.json()["reasons"][0])
        self.assertEqual(s.post([event()]).status, 503)

    def test_a_disk_nearly_full_refuses_dead_letters_too(self):
        # rules that make every event a dead letter would otherwise fill the
        # reserve kept for sending and acknowledging
        s = self.service(rules_dir=self.rules_dir({"20-fail.lua":
                                                   "return function(e) error('nope') end\n"}),
                         env={"TRIBUTARY_QUEUE_MIN_FREE_MB": str(1 << 29)})
        r = s.post([event(), event()])
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.json()["error"], "disk full")
        self.assertEqual(r.headers["retry-after"], "30")
        with s.db() as db:
            self.assertEqual(db.execute("SELECT count(*) FROM dead").fetchone()[0], 0)
        self.assertEqual(s.metrics()['tributary_dead_letters_total{reason="rule_error"}'], 0)

    def test_a_queue_smaller_than_a_request_is_a_configuration_error(self):
        # Braze does not split a batch answered 503: it would be retried for days
        p = run_cli(["check"], env={"TRIBUTARY_QUEUE_MAX_DEPTH": "3"})
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("queue.max_depth (3) must be at least inbound.max_events (10000)", p.stderr)

    def test_storage_failure_is_503_never_4xx(self):
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        # The sender records each feed's pause (no credentials) once at start: a
        # write that succeeds after the failing one would make storage healthy
        # again, so wait for those first.
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline:
            with s.db() as db:
                if db.execute("SELECT count(*) FROM feed_state").fetchone()[0] == 4:
                    break
            time.sleep(0.05)
        # Make every later write fail: replace the tables of the feed these events
        # travel on with views (writes to a view raise an error inside SQLite).
        with s.db() as db:
            for t in (0, 1):
                db.execute("ALTER TABLE records_unbound_%d RENAME TO moved_%d" % (t, t))
                db.execute("CREATE VIEW records_unbound_%d AS SELECT * FROM moved_%d" % (t, t))
        r = s.post([event()])
        self.assertEqual(r.status, 503, r)
        self.assertIn("retry-after", r.headers)
        ready = s.get("/readyz")
        self.assertEqual(ready.status, 503)
        self.assertIn("storage failing", ready.body)


class Probes(ServiceTest):
    def test_healthz_and_readyz(self):
        s = self.service(env={"TRIBUTARY_FEEDS_UNBOUND_KEY": "k", "TRIBUTARY_FEEDS_UNBOUND_SECRET": "s",
                              "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        self.assertEqual(s.get("/healthz").status, 200)
        r = s.get("/readyz")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.json()["ready"])

    def test_readyz_is_503_while_every_feed_is_paused_and_healthz_stays_200(self):
        s = self.service()
        deadline = time.time() + 5
        while s.get("/readyz").status != 503 and time.time() < deadline:
            time.sleep(0.05)
        r = s.get("/readyz")
        self.assertEqual(r.status, 503)
        self.assertIn("every feed is paused", r.body)
        self.assertEqual(s.get("/healthz").status, 200)
        # still accepting and holding events
        self.assertEqual(s.post([event()]).status, 200)

    def test_unknown_path_is_404_and_wrong_method_405(self):
        s = self.service()
        self.assertEqual(s.get("/nope").status, 404)
        self.assertEqual(s.get("/currents").status, 405)
        self.assertEqual(request(s.port, "POST", "/healthz", b"").status, 405)

    def test_query_parameters_are_accepted_on_currents(self):
        s = self.service()
        r = s.post([event()], path="/currents?workspace=brand-a")
        self.assertEqual(r.status, 200)


# Tags every mapped event with its request's workspace; fails events that ask
# for it, until the file is replaced.
WORKSPACE_RULE = (
    "return function(event, out, workspace)\n"
    "  if event.properties.explode then error('cannot handle this one') end\n"
    "  out.event.data.custom_attributes.braze_workspace = workspace or 'none'\n"
    "end\n")


class Workspaces(ServiceTest):
    """`?workspace=` tells apart the Braze workspaces that share one endpoint
    (currents-http.md): the rules get it, and so does every later mapping."""

    def test_rules_see_the_workspace_and_a_requeue_maps_with_it_again(self):
        rules = self.rules_dir({"20-workspace.lua": WORKSPACE_RULE})
        s = self.service(rules_dir=rules)
        good, bad = event(platform="ios"), event(platform="ios", explode=True)
        plain = event(platform="ios")
        r = s.post([good, bad], path="/currents?workspace=brand-a&other=1")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 1)
        self.assertEqual(s.post([plain]).status, 200)
        with s.db() as db:
            rows = dict((e, (w, json.loads(m))) for e, w, m in db.execute(
                "SELECT event_id, workspace, event FROM records_ios"))
            dead = db.execute("SELECT id, workspace FROM dead").fetchall()
        self.assertEqual(rows[good["id"]][0], "brand-a")
        self.assertEqual(rows[good["id"]][1]["data"]["custom_attributes"]["braze_workspace"],
                         "brand-a")
        self.assertIsNone(rows[plain["id"]][0])
        self.assertEqual(rows[plain["id"]][1]["data"]["custom_attributes"]["braze_workspace"],
                         "none")
        self.assertEqual([w for _, w in dead], ["brand-a"])

        p = s.cli(["dlq", "show", str(dead[0][0]), "--json"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["workspace"], "brand-a")
        p = s.cli(["dlq", "show", str(dead[0][0])])
        self.assertIn("workspace:     brand-a", p.stdout)

        # the rule fixed, the requeued event is mapped as its request was
        with open(os.path.join(rules, "20-workspace.lua"), "w") as f:
            f.write(WORKSPACE_RULE.replace("if event.properties.explode", "if false"))
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 0, p.stderr)
        with s.db() as db:
            w, m = db.execute("SELECT workspace, event FROM records_ios WHERE event_id = ?",
                              (bad["id"],)).fetchone()
        self.assertEqual(w, "brand-a")
        self.assertEqual(json.loads(m)["data"]["custom_attributes"]["braze_workspace"], "brand-a")

    def test_a_workspace_not_taken_is_503_and_stores_nothing(self):
        s = self.service(env={"TRIBUTARY_INBOUND_WORKSPACES": "brand-a,brand-b",
                              "TRIBUTARY_INBOUND_HMAC_SECRETS": "hmac-secret-ws-5b1e9c"})
        refused = [
            ("/currents?workspace=brand-c", "not one of inbound.workspaces"),
            ("/currents", "none given"),
            ("/currents?Workspace=brand-a", "none given"),
            ("/currents?workspace=", "none given"),
            ("/currents?workspace=brand-a&workspace=brand-b", "given more than once"),
            ("/currents?workspace=brand%0Aa", "not a workspace name"),
            ("/currents?workspace=brand-a%00x", "not a workspace name"),
            ("/currents?workspace=" + "w" * 129, "not a workspace name"),
        ]
        for path, why in refused:
            r = s.post([event()], path=path)
            # Braze keeps the events and retries: the list or the URL can be fixed
            self.assertEqual(r.status, 503, (path, r))
            self.assertEqual(r.headers.get("retry-after"), "60", path)
            self.assertEqual(r.json()["error"], "unknown workspace")
            self.assertTrue(r.json()["reason"].startswith(why), (path, r))
        # credentials are checked first: a wrong token gets 401 whatever the workspace
        self.assertEqual(s.post([event()], token="wrong-token-123456",
                                path="/currents?workspace=brand-c").status, 401)
        # a request a signature admits, once its body is in, is checked the same
        body = json.dumps({"events": [event()]})
        t = int(time.time())
        mac = hmac.new(b"hmac-secret-ws-5b1e9c", b"%d." % t + body.encode(),
                       hashlib.sha256).hexdigest()
        signed = {"Tributary-Signature": "t=%d,v1=%s" % (t, mac)}
        r = s.post(body=body, token=None, headers=signed, path="/currents?workspace=brand-c")
        self.assertEqual((r.status, r.json()["error"]), (503, "unknown workspace"), r)
        r = s.post(body=body, token=None, headers=signed, path="/currents?workspace=brand-b")
        self.assertEqual(r.status, 200, r)
        for path in ("/currents?workspace=brand-b", "/currents?workspace=brand-a&workspace=brand-a"):
            self.assertEqual(s.post([event()], path=path).status, 200, path)
        with s.db() as db:
            stored = db.execute("SELECT workspace, count(*) FROM (SELECT workspace FROM "
                                "records_unbound UNION ALL SELECT workspace FROM records_ios "
                                "UNION ALL SELECT workspace FROM records_android UNION ALL "
                                "SELECT workspace FROM records_web) GROUP BY workspace").fetchall()
        self.assertEqual(dict(stored), {"brand-a": 1, "brand-b": 2})
        self.assertEqual(s.metrics()["tributary_workspace_refused_total"], len(refused) + 1)
        self.assertIn("request for a workspace this service does not take", s.logs())
        self.assertIn("brand-c", s.logs())

    def test_events_are_counted_by_the_workspace_that_sent_them(self):
        s = self.service()
        self.assertEqual(s.post([event(), event()], path="/currents?workspace=brand-a").status, 200)
        self.assertEqual(s.post([event()], path="/currents?workspace=brand-b").status, 200)
        self.assertEqual(s.post([], path="/currents?workspace=brand-b").status, 200)  # a probe
        self.assertEqual(s.post([event()], path='/currents?workspace=say%20%22hi%22%5C').status, 200)
        self.assertEqual(s.post([event()]).status, 200)
        m = s.metrics()
        self.assertEqual(m['tributary_workspace_events_total{workspace="brand-a"}'], 2)
        self.assertEqual(m['tributary_workspace_events_total{workspace="brand-b"}'], 1)
        # the text format's escapes in a label
        self.assertEqual(m['tributary_workspace_events_total{workspace="say \\"hi\\"\\\\"}'], 1)
        self.assertEqual(sum(v for k, v in m.items()
                             if k.startswith("tributary_workspace_events_total")), 4)
        self.assertEqual(m["tributary_events_received_total"], 5)

    def test_past_32_workspaces_the_others_are_counted_together(self):
        s = self.service()
        for i in range(34):
            self.assertEqual(s.post([event()], path="/currents?workspace=w%02d" % i).status, 200)
        m = s.metrics()
        named = {k: v for k, v in m.items() if k.startswith("tributary_workspace_events_total")}
        self.assertEqual(len(named), 33)
        self.assertEqual(named['tributary_workspace_events_total{workspace="w31"}'], 1)
        # the rest together, under a value no name has
        self.assertEqual(named['tributary_workspace_events_total{workspace=""}'], 2)

    def test_without_a_list_any_workspace_or_none_is_taken(self):
        s = self.service()
        for path in ("/currents?workspace=Brand%20A", "/currents?workspace=", "/currents"):
            self.assertEqual(s.post([event()], path=path).status, 200, path)
        self.assertEqual(s.post([event()], path="/currents?workspace=a%01b").status, 503)
        # not UTF-8: it could not be a label value in /metrics
        self.assertEqual(s.post([event()], path="/currents?workspace=%FF%FE").status, 503)
        self.assertEqual(s.get("/metrics").status, 200)
        self.assertNotIn("\ufffd", s.get("/metrics").body)

    def test_a_workspace_added_by_a_reload_is_taken(self):
        s = Service(config='return { inbound = { workspaces = { "brand-a" } } }\n')
        self.addCleanup(s.cleanup)
        s.start()
        self.assertEqual(s.post([event()], path="/currents?workspace=brand-b").status, 503)
        self.assertTrue(s.reload('return { inbound = { workspaces = { "brand-a", "brand-b" } } }\n'))
        self.assertEqual(s.post([event()], path="/currents?workspace=brand-b").status, 200)
