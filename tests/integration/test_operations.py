"""Operating tributary: metrics against a scenario, logs, install, alert rules."""

import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import unittest

from harness import BIN, ROOT, SLOW, TOKEN, WRAPPER, Service, ServiceTest, event, preload
from mparticle_double import MParticleDouble

FEEDS = {"unbound": ("u-key", "u-secret"), "ios": ("i-key", "i-secret")}


class Metrics(ServiceTest):
    def test_metrics_count_what_a_scenario_did(self):
        d = MParticleDouble(feeds=FEEDS).start()
        self.addCleanup(d.stop)
        d.fail(500, times=1)
        d.poison("POISONED")
        rules = self.rules_dir({"20-fail.lua": (
            "return function(e, out)\n"
            "  if e.properties.boom then error('boom') end\n"
            "  if e.properties.drop_me then return false, 'not wanted' end\n"
            "end\n")})
        s = self.service(rules_dir=rules, env={
            "TRIBUTARY_MPARTICLE_URL": d.url, "TRIBUTARY_BATCH_LINGER_MS": "50",
            "TRIBUTARY_RETRY_BASE_MS": "20", "TRIBUTARY_RETRY_MAX_MS": "50",
            "TRIBUTARY_FEEDS_UNBOUND_KEY": "u-key", "TRIBUTARY_FEEDS_UNBOUND_SECRET": "u-secret",
            "TRIBUTARY_FEEDS_IOS_KEY": "i-key", "TRIBUTARY_FEEDS_IOS_SECRET": "i-secret"})
        forwarded = [event("users.messages.email.Send", user="m%d" % i) for i in range(6)]
        ios = [event("users.messages.pushnotification.Send", platform="ios", user="p%d" % i)
               for i in range(4)]
        poisoned = event("users.messages.email.Send", user="poison-user", note="POISONED")
        filtered = [event("users.behaviors.CustomEvent") for _ in range(3)]
        dropped = [event("users.messages.email.Send", drop_me=True) for _ in range(2)]
        skipped = [event("users.messages.email.Send", user=None) for _ in range(5)]
        boom = [event("users.messages.email.Send", boom=True)]
        first = forwarded + ios + [poisoned] + filtered + dropped + skipped + boom
        self.assertEqual(s.post(first).status, 200)
        self.assertEqual(s.post(forwarded[:2]).status, 200)  # duplicates
        self.assertEqual(s.post(body="{", token="x").status, 401)
        self.assertEqual(s.post(body="{").status, 400)
        self.assertTrue(d.wait_for_events(10, 20 * SLOW))
        deadline = time.time() + 20 * SLOW
        while time.time() < deadline:
            m = s.metrics()
            if (m['tributary_dead_letters_total{reason="rejected"}'] == 1
                    and sum(m['tributary_queue_depth{feed="%s"}' % f]
                            for f in ("ios", "android", "web", "unbound")) == 0):
                break
            time.sleep(0.1)
        m = s.metrics()
        self.assertEqual(m["tributary_events_received_total"], len(first) + 2)
        self.assertEqual(m["tributary_events_queued_total"], 11)
        self.assertEqual(m["tributary_events_duplicate_total"], 2)
        self.assertEqual(m['tributary_events_filtered_total{reason="unsupported_type"}'], 3)
        self.assertEqual(m['tributary_events_filtered_total{reason="rule_drop"}'], 2)
        self.assertEqual(m['tributary_events_filtered_total{reason="not_selected"}'], 0)
        self.assertEqual(m['tributary_events_skipped_total{reason="no_external_id"}'], 5)
        self.assertEqual(m['tributary_dead_letters_total{reason="rule_error"}'], 1)
        self.assertEqual(m['tributary_dead_letters_total{reason="rejected"}'], 1)
        self.assertEqual(m["tributary_dead_letters"], 2)
        self.assertEqual(m['tributary_events_delivered_total{feed="unbound"}'], 6)
        self.assertEqual(m['tributary_events_delivered_total{feed="ios"}'], 4)
        self.assertGreaterEqual(m['tributary_mparticle_requests_total{feed="unbound",code="500"}']
                                + m['tributary_mparticle_requests_total{feed="ios",code="500"}'], 1)
        self.assertGreaterEqual(m['tributary_mparticle_requests_total{feed="unbound",code="400"}'], 1)
        self.assertEqual(sum(v for k, v in m.items()
                             if k.startswith("tributary_mparticle_requests_total")),
                         len(d.requests))
        self.assertGreaterEqual(sum(v for k, v in m.items()
                                    if k.startswith("tributary_mparticle_retries_total")), 1)
        self.assertEqual(m['tributary_http_requests_total{code="200"}'], 2)
        self.assertEqual(m['tributary_http_requests_total{code="400"}'], 1)
        self.assertEqual(m['tributary_http_requests_total{code="401"}'], 1)
        self.assertEqual(m["tributary_auth_failures_total"], 1)
        self.assertEqual(m["tributary_http_request_duration_seconds_count"], 4)
        self.assertEqual(m["tributary_rules_duration_seconds_count"], 3)
        self.assertEqual(m['tributary_queue_depth{feed="unbound"}'], 0)
        self.assertEqual(m['tributary_feed_paused{feed="unbound",reason="refused"}'], 0)
        self.assertEqual(m['tributary_feed_paused{feed="web",reason="no_credentials"}'], 1)
        self.assertEqual(m["tributary_ready"], 1)
        # ids of what was stored: 11 queued events and the rule error's dead letter
        self.assertEqual(m["tributary_dedup_ids"], 12)
        self.assertGreaterEqual(m["tributary_dedup_memory_bytes"], 12 * 16)
        version = s.post([]).json()["rules_version"]
        self.assertEqual(m['tributary_events_mapped_total{rules_version="%s"}' % version],
                         len(first) + 2)
        self.assertTrue(any(k.startswith("tributary_build_info{") for k in m))

    def test_the_free_space_of_data_dir_and_its_floor_are_gauges(self):
        s = self.service(env={"TRIBUTARY_QUEUE_MIN_FREE_MB": "100"})
        m = s.metrics()
        self.assertEqual(m["tributary_queue_min_free_bytes"], 100 << 20)
        fs = os.statvfs(s.data_dir)
        # read every 50 ms, while this machine's other writers go on
        self.assertLess(abs(m["tributary_queue_disk_free_bytes"] - fs.f_bavail * fs.f_frsize),
                        256 << 20)
        s2 = self.service(env={"TRIBUTARY_QUEUE_MIN_FREE_MB": "0"})
        m = s2.metrics()
        self.assertEqual(m["tributary_queue_min_free_bytes"], 0)
        self.assertNotIn("tributary_queue_disk_free_bytes", m)  # not read without a floor

    def test_metric_names_follow_prometheus_conventions(self):
        s = self.service()
        text = s.get("/metrics").body
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        self.assertGreater(len(types), 15)
        for name, kind in types.items():
            self.assertTrue(name.startswith("tributary_"), name)
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), name)
            if kind == "histogram":
                self.assertTrue(name.endswith("_seconds"), name)
        self.assertIn("# HELP tributary_queue_depth", text)

    def test_the_start_time_is_when_the_service_started(self):
        before = time.time()
        s = self.service()
        started = s.metrics()["tributary_start_time_seconds"]
        self.assertGreaterEqual(started, before - 1)
        self.assertLessEqual(started, time.time())
        time.sleep(1.1)
        self.assertEqual(s.metrics()["tributary_start_time_seconds"], started)

    def test_alert_rules_use_only_exported_metrics(self):
        s = self.service()
        exported = set(re.findall(r"^# TYPE (\S+) ", s.get("/metrics").body, re.M))
        with open(os.path.join(ROOT, "docs", "prometheus-alerts.yml")) as f:
            rules = f.read()
        used = set(re.findall(r"\b(tributary_[a-z_]+)", rules))
        self.assertGreaterEqual(len(used), 6)
        self.assertEqual(used - exported, set())
        for alert in re.findall(r"alert: (\w+)", rules):
            with open(os.path.join(ROOT, "docs", "operations.md")) as f:
                self.assertIn("### " + alert, f.read())

    def test_every_exported_metric_is_documented(self):
        s = self.service()
        exported = set(re.findall(r"^# TYPE (\S+) ", s.get("/metrics").body, re.M))
        self.assertGreaterEqual(len(exported), 50)
        documented = set()
        with open(os.path.join(ROOT, "docs", "operations.md")) as f:
            for first_cell in re.findall(r"^\| (`tributary_[^|]*)\|", f.read(), re.M):
                documented.update(re.findall(r"`(tributary_[a-z_]+)[`{]", first_cell))
        self.assertEqual(exported - documented, set())

    def test_alert_rules_fire_as_their_runbooks_say(self):
        """promtool's unit tests of the alerts: a start after a long downtime
        that dead-letters at once, a feed held without credentials, no target."""
        promtool = shutil.which("promtool")
        if not promtool:
            self.skipTest("promtool is not installed (Debian package prometheus)")
        rules = os.path.join(ROOT, "docs", "prometheus-alerts.yml")
        tests = os.path.join(ROOT, "tests", "data", "prometheus-alerts-test.yml")
        for args in (["check", "rules", rules], ["test", "rules", tests]):
            run = subprocess.run([promtool] + args, capture_output=True, text=True, timeout=60)
            self.assertEqual(run.returncode, 0, run.stdout + run.stderr)


class Systemd(ServiceTest):
    def notify_socket(self, abstract=False):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = "@tributary-test-%d-%d" % (os.getpid(), time.monotonic_ns())
            sock.bind("\0" + name[1:])
        else:
            name = os.path.join(self.tmpdir(), "notify")
            sock.bind(name)
        sock.settimeout(15 * SLOW)
        return sock, name

    def test_ready_once_listening_and_stopping_at_a_stop(self):
        for abstract in (False, True):
            sock, name = self.notify_socket(abstract)
            s = Service(env={"NOTIFY_SOCKET": name})
            self.addCleanup(s.cleanup)
            s.start(wait=False)
            self.assertEqual(sock.recv(256), b"READY=1")
            # ready means listening: the first request is answered
            self.assertEqual(s.get("/healthz").status, 200)
            s.proc.send_signal(signal.SIGTERM)
            self.assertEqual(sock.recv(256), b"STOPPING=1")
            self.assertEqual(s.proc.wait(timeout=20 * SLOW), 0)

    def test_a_configuration_refused_exits_78_before_ready(self):
        sock, name = self.notify_socket()
        sock.settimeout(0.5)
        s = Service(env={"NOTIFY_SOCKET": name, "TRIBUTARY_QUEUE_MAX_DEPTH": "3"})
        self.addCleanup(s.cleanup)
        s.expected_exit = 78
        s.start(wait=False)
        self.assertEqual(s.proc.wait(timeout=15 * SLOW), 78, s.logs())
        self.assertIn("configuration error; not started", s.logs())
        with self.assertRaises(socket.timeout):
            sock.recv(256)
        # the unit leaves it stopped instead of starting it again every 2 s
        with open(os.path.join(ROOT, "scripts", "tributary.service")) as f:
            unit = f.read()
        self.assertIn("\nRestartPreventExitStatus=78\n", unit)
        self.assertIn("\nType=notify\n", unit)

    def test_a_queue_this_version_must_not_open_exits_78_and_is_left_as_it_is(self):
        # a newer tributary's queue (a binary rolled back) or another program's
        # database: every restart would meet the same file
        for sql, says in (
                ("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                 "INSERT INTO meta VALUES('schema_version', '99');"
                 "INSERT INTO meta VALUES('running', '1');",
                 "queue schema version 99 is unknown to this version of tributary"),
                ("CREATE TABLE invoices(id INTEGER PRIMARY KEY, total REAL);",
                 "not a tributary queue")):
            with self.subTest(says=says):
                s = Service()
                self.addCleanup(s.cleanup)
                os.makedirs(s.data_dir, mode=0o700)
                path = os.path.join(s.data_dir, "queue.db")
                db = sqlite3.connect(path)
                db.executescript(sql)
                db.close()
                with open(path, "rb") as f:
                    before = f.read()
                s.expected_exit = 78
                s.start(wait=False)
                self.assertEqual(s.proc.wait(timeout=15 * SLOW), 78, s.logs())
                self.assertIn(says, s.logs())
                with open(path, "rb") as f:
                    self.assertEqual(f.read(), before)


def open_files_limit(soft, hard):
    """A preexec for Service: the child's limit of open files."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@unittest.skipIf(WRAPPER, "valgrind keeps open files of its own and sets the limit the "
                          "process sees")
class OpenFiles(ServiceTest):
    def limits(self, s):
        with open("/proc/%d/limits" % s.proc.pid) as f:
            line = [l for l in f if l.startswith("Max open files")][0]
        return tuple(int(x) for x in line.split()[3:5])

    def test_the_soft_limit_of_open_files_is_raised_to_the_hard_one(self):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard <= 1200:
            self.skipTest("the hard limit of open files is %s" % hard)
        s = Service()
        self.addCleanup(s.cleanup)
        s.preexec = open_files_limit(256, hard)
        s.start()
        self.assertEqual(self.limits(s), (hard, hard))
        self.assertNotIn("http.max_connections is more than", s.logs())

    def test_connections_are_kept_within_the_open_files_allowed(self):
        # 1,024 connections by default, and 200 open files: without the
        # bound, the server took connections until it had no file left, and
        # spun on accept() without a word
        s = Service()
        self.addCleanup(s.cleanup)
        s.preexec = open_files_limit(200, 200)
        s.start()
        # (a tool running the binary, valgrind, keeps a few files of the limit)
        m = re.search(r"http\.max_connections is more than the open files this process may have "
                      r"allow.* max_connections=1024 open_files_limit=(\d+) connections=(\d+)",
                      s.logs())
        self.assertTrue(m, s.logs())
        limit, connections = int(m.group(1)), int(m.group(2))
        self.assertLessEqual(limit, 200)
        # two files a connection: its socket and the watchdog's copy of it
        self.assertEqual(connections, (limit - 128) // 2)
        held = []
        try:
            for _ in range(connections):
                held.append(socket.create_connection(("127.0.0.1", s.port), timeout=5 * SLOW))
            # past them: accepted and closed at once, counted
            for _ in range(5):
                extra = socket.create_connection(("127.0.0.1", s.port), timeout=5 * SLOW)
                extra.settimeout(5 * SLOW)
                self.assertEqual(extra.recv(1), b"")
                extra.close()
        finally:
            for c in held:
                c.close()
        def refused_counted():
            try:
                return s.metrics()["tributary_http_connections_refused_total"] >= 5
            except OSError:  # refused too: the server has not yet seen every close
                return False
        self.wait(refused_counted, 10 * SLOW, "the refused connections counted")
        self.assertEqual(s.post([event()]).status, 200)
        self.assertIn("connection refused: http.max_connections are open", s.logs())

    def test_a_connection_without_a_file_left_to_watch_it_by_is_closed_and_counted(self):
        # the request-time limit closes a connection by a copy of its socket;
        # without that copy, a connection trickling its request was never cut
        s = Service()
        self.addCleanup(s.cleanup)
        s.env["FAIL_SOCKET_DUPS"] = "2"
        preload(s, "dup_errors")
        s.start()  # its first two checks of /healthz were closed unanswered
        self.assertEqual(s.metrics()["tributary_http_connections_refused_total"], 2)
        self.assertIn("connection refused: no open file left to watch it by", s.logs())
        self.assertEqual(s.post([event()]).status, 200)

    def test_too_few_open_files_for_connections_stops_the_start(self):
        s = Service()
        self.addCleanup(s.cleanup)
        s.preexec = open_files_limit(100, 100)
        s.expected_exit = 78
        s.start(wait=False)
        self.assertEqual(s.proc.wait(timeout=15 * SLOW), 78, s.logs())
        self.assertIn("the open files this process may have leave no room for connections",
                      s.logs())


class Logs(ServiceTest):
    def test_json_logs_are_one_object_per_line_with_level_and_request_id(self):
        s = self.service(env={"TRIBUTARY_LOG_FORMAT": "json", "TRIBUTARY_LOG_LEVEL": "debug"})
        s.post([event()])
        s.post([event()], token="wrong")
        lines = [l for l in s.logs().splitlines() if l.strip()]
        self.assertGreater(len(lines), 3)
        records = [json.loads(l) for l in lines]
        for r in records:
            self.assertIn(r["level"], ("debug", "info", "warn", "error"))
            self.assertRegex(r["ts"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertTrue(r["msg"])
        self.assertTrue(any("request_id" in r for r in records))

    def test_info_level_is_quiet_under_normal_load(self):
        s = self.service(env={"TRIBUTARY_LOG_LEVEL": "info"})
        # the start's last line (slow to come under valgrind)
        self.wait(lambda: "no mParticle credentials configured" in s.logs(), 10,
                  "the start's lines")
        before = len(s.logs().splitlines())
        for _ in range(50):
            self.assertEqual(s.post([event() for _ in range(20)]).status, 200)
        self.assertEqual(len(s.logs().splitlines()), before)

    def test_startup_line_names_version_listen_rules_feeds_and_depth(self):
        s = self.service(env={"TRIBUTARY_FEEDS_WEB_KEY": "web-k", "TRIBUTARY_FEEDS_WEB_SECRET": "web-s",
                              "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        deadline = time.time() + 10 * SLOW
        while "tributary started" not in s.logs() and time.time() < deadline:
            time.sleep(0.05)
        line = [l for l in s.logs().splitlines() if "tributary started" in l][0]
        self.assertRegex(line, r'version="\d+\.\d+\.\d+')
        self.assertIn("listen=http://127.0.0.1:%d" % s.port, line)
        self.assertRegex(line, r"rules_version=[0-9a-f]{12}")
        self.assertIn("feeds=web", line)
        self.assertIn("queue_depth=0", line)
        self.assertNotIn("web-k", line)
        # the durability in force, as SQLite reads it back: full by default
        self.assertIn("queue_sync=full", line)

    def test_startup_line_says_a_queue_sync_of_normal(self):
        s = self.service(env={"TRIBUTARY_QUEUE_SYNC": "normal"})
        self.wait(lambda: "tributary started" in s.logs(), what="the startup line")
        line = [l for l in s.logs().splitlines() if "tributary started" in l][0]
        self.assertIn("queue_sync=normal", line)


class Listening(ServiceTest):
    def test_a_second_service_on_the_same_address_fails_to_start_and_the_first_keeps_serving(self):
        first = self.service()
        second = Service(env={"TRIBUTARY_LISTEN": "127.0.0.1:%d" % first.port})
        self.addCleanup(second.cleanup)
        second.start(wait=False)
        try:
            code = second.proc.wait(timeout=10 * SLOW)
        except subprocess.TimeoutExpired:
            self.fail("a second service started on port %d:\n%s" % (first.port, second.logs()[-2000:]))
        second.expected_exit = code
        # 1, not 78: a port in use may be free at the unit's next try
        self.assertEqual(code, 1)
        self.assertRegex(second.logs(), r"cannot listen on 127\.0\.0\.1:%d: .*in use" % first.port)
        events = [event() for _ in range(8)]
        for e in events:
            self.assertEqual(first.post([e]).status, 200)
        self.assertEqual(first.queued_ids(), [e["id"] for e in events])

    def test_a_second_service_on_the_same_data_dir_is_refused_also_without_its_lock_file(self):
        # serve.lock removed as a stale lock let a second service take the
        # same queue: both sent the same events, stored twice in mParticle
        first = self.service()
        os.unlink(os.path.join(first.data_dir, "serve.lock"))
        second = Service(env={"TRIBUTARY_DATA_DIR": first.data_dir})
        self.addCleanup(second.cleanup)
        second.start(wait=False)
        try:
            code = second.proc.wait(timeout=10 * SLOW)
        except subprocess.TimeoutExpired:
            self.fail("a second service started on %s:\n%s" % (first.data_dir,
                                                                second.logs()[-2000:]))
        second.expected_exit = code
        self.assertEqual(code, 1)
        self.assertIn("another tributary serve (pid %d) is using data_dir %s"
                      % (first.proc.pid, first.data_dir), second.logs())
        # and the commands still see it running
        stats = json.loads(first.cli(["queue", "stats", "--json"]).stdout)
        self.assertIs(stats["service_running"], True)
        self.assertEqual(stats["service_pid"], first.proc.pid)
        self.assertEqual(first.post([event()]).status, 200)

    def test_a_queue_db_that_may_be_another_data_dirs_too_is_refused(self):
        # a queue.db linked from another data_dir let a second service take
        # the queue of a running one: the lock is the directory's
        first = self.service()
        for kind in ("symlink", "link"):
            other = os.path.join(self.tmpdir(), "var")
            os.mkdir(other, 0o700)
            getattr(os, kind)(os.path.join(first.data_dir, "queue.db"),
                              os.path.join(other, "queue.db"))
            second = Service(env={"TRIBUTARY_DATA_DIR": other})
            self.addCleanup(second.cleanup)
            second.expected_exit = 78
            second.start(wait=False)
            self.assertEqual(second.proc.wait(timeout=15 * SLOW), 78, second.logs())
            self.assertIn("could use the same queue", second.logs())
        self.assertEqual(first.post([event()]).status, 200)

    def test_listening_on_every_ipv6_address_takes_ipv4_clients_as_themselves(self):
        # "[::]" listens on IPv4 too; an IPv4 client is its IPv4 address (not
        # ::ffff:127.0.0.1), so it is still a loopback peer whose proxy header
        # is taken
        s = Service()
        s.env["TRIBUTARY_LISTEN"] = "[::]:%d" % s.port
        self.addCleanup(s.cleanup)
        s.start()
        # the line follows the start of the listener, which may answer first
        self.wait(lambda: "listen=http://[::]:%d" % s.port in s.logs(), timeout=5,
                  what="the startup line")
        self.assertEqual(s.post([event()]).status, 200)  # over IPv4
        conn = http.client.HTTPConnection("::1", s.port, timeout=10 * SLOW)
        try:
            conn.request("GET", "/healthz")
            self.assertEqual(conn.getresponse().status, 200)
        finally:
            conn.close()
        r = s.post([event()], token="wrong-token-0123456789",
                   headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(r.status, 401)
        self.assertIn("client=203.0.113.9", s.logs())
        self.assertNotIn("::ffff:", s.logs())

    def test_a_start_refused_for_many_failing_rule_tests_logs_the_first_of_them(self):
        # 800 failures make a report of some 90 KB, past what one log line holds
        failing = ("local tests = {}\n"
                   "for i = 1, 800 do tests[i] = {name = 'always fails, number ' .. i .. '"
                   + "x" * 40 + "',\n"
                   "  event = {event_type = 'users.messages.email.Send', id = 'f', time = 1,\n"
                   "           user = {external_user_id = 'c'}}, expect_drop = 'never'} end\n"
                   "return {process = function(e, out) return out end, tests = tests}\n")
        s = Service(rules_dir=self.rules_dir({"90-failing.lua": failing}))
        self.addCleanup(s.cleanup)
        s.start(wait=False)
        code = s.proc.wait(timeout=30 * SLOW)
        s.expected_exit = code
        self.assertEqual(code, 78)  # EX_CONFIG: the unit does not restart it
        logs = s.logs()
        self.assertIn("the rules failed validation", logs)
        self.assertIn("90-failing.lua: test 'always fails, number 1x", logs)
        self.assertIn("`tributary check` lists every failure", logs)
        self.assertNotIn("log line too long", logs)

    def test_a_restart_right_after_closing_connections_listens_on_the_same_port(self):
        s = self.service()
        # A connection the service closes itself (on SIGTERM) lingers in
        # TIME_WAIT on its port: the next start must bind regardless.
        client = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(client.close)
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(client.recv(4096).startswith(b"HTTP/1.1 200"))
        self.assertEqual(s.stop(), 0)
        client.close()
        s.start()
        self.assertEqual(s.post([event()]).status, 200)


class Shutdown(ServiceTest):
    def test_a_request_still_arriving_at_sigterm_gets_503_instead_of_a_cut_connection(self):
        s = self.service()
        body = json.dumps({"events": [event()]}).encode()
        client = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(client.close)
        client.sendall(b"POST /currents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.3 * SLOW)  # the headers are read: the request has begun
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5 * SLOW)
        self.assertIsNone(s.proc.poll(), "the service stopped before the request was answered")
        client.sendall(body[10:])
        client.settimeout(10 * SLOW)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = client.recv(4096)
            if not chunk:
                break
            answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        self.assertIn(b"shutting down", answer)
        self.assertIn(b"Connection: close", answer)
        self.assertIn(b"Retry-After:", answer)
        self.assertEqual(s.stop(), 0)

    def test_sigterm_beside_a_long_read_of_the_queue_stops_at_once_and_keeps_the_events(self):
        s = self.service()
        # a long read of the queue, as a paged `dlq list` in a terminal
        reader = sqlite3.connect(os.path.join(s.data_dir, "queue.db"), isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM dead").fetchone()
        e = event()
        self.assertEqual(s.post([e]).status, 200)
        started = time.monotonic()
        self.assertEqual(s.stop(), 0)
        took = time.monotonic() - started
        # the WAL, which the reader kept from being emptied, stays for the next start
        self.assertGreater(os.path.getsize(os.path.join(s.data_dir, "queue.db-wal")), 0)
        reader.execute("COMMIT")
        # waiting for the reader takes the queue's busy timeout, 10 s on any host; a stop
        # takes well under a second, under valgrind too
        self.assertLess(took, 5.0, "the stop waited for the reader")
        s.start()
        self.assertEqual(s.queued_ids(), [e["id"]])


class Install(ServiceTest):
    def test_make_install_places_binary_rules_config_and_unit(self):
        if os.path.abspath(BIN) != os.path.join(ROOT, "host", "tributary"):
            self.skipTest("installs the release build only")
        # as a package build does: into DESTDIR, which creates no user on this machine
        destdir = self.tmpdir()
        p = subprocess.run(["make", "-s", "install", "DESTDIR=" + destdir, "PREFIX=/opt/trib"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        prefix = destdir + "/opt/trib"
        for path in ("bin/tributary", "share/tributary/rules/10-mparticle.lua",
                     "share/tributary/rules/examples/50-route-feed.lua",
                     "share/tributary/tributary.conf.lua.example",
                     "share/tributary/prometheus-alerts.yml",
                     "share/doc/tributary/operations.md", "share/doc/tributary/README.md",
                     "share/doc/tributary/performance.md",
                     "share/doc/tributary/sample-currents-batch.json",
                     "lib/systemd/system/tributary.service", "lib/sysusers.d/tributary.conf"):
            self.assertTrue(os.path.exists(os.path.join(prefix, path)), path)
        with open(os.path.join(prefix, "lib/systemd/system/tributary.service")) as f:
            unit = f.read()
        self.assertIn("ExecStart=/opt/trib/bin/tributary serve", unit)
        # the example names the unit's directories, and the unit leaves them to
        # it, so that the service and every command given its file agree
        with open(os.path.join(prefix, "share/tributary/tributary.conf.lua.example")) as f:
            example = f.read()
        self.assertIn('data_dir = "/var/lib/tributary"', example)
        # the journal's lines, as before
        self.assertRegex(example, r'log = \{ level = "info", format = "json" \}')
        self.assertIn('rules_dir = "/etc/tributary/rules"', example)
        self.assertNotIn("Environment=", unit)
        self.assertIn("file changes nothing else until you edit it", example)
        # a static user, so that files the service reads itself can be its own
        for option in ("ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                       "ProtectSystem=strict", "User=tributary", "StateDirectory=tributary",
                       "LimitCORE=0"):
            self.assertIn(option, unit)
        self.assertNotIn("DynamicUser=yes", unit)
        # a reload the files would refuse fails `systemctl reload` itself
        self.assertIn("ExecReload=/opt/trib/bin/tributary check --config "
                      "/etc/tributary/tributary.conf.lua\nExecReload=/bin/kill -HUP $MAINPID\n",
                      unit)
        with open(os.path.join(prefix, "lib/sysusers.d/tributary.conf")) as f:
            self.assertRegex(f.read(), r"^u tributary - .* /var/lib/tributary ")
        v = subprocess.run([os.path.join(prefix, "bin/tributary"), "--version"],
                           capture_output=True, text=True)
        self.assertEqual(v.returncode, 0)
