"""Hot reload: SIGHUP, /admin/reload, rules_dir changes; the sandbox limits."""

import json
import math
import os
import shutil
import signal
import threading
import time

from harness import (RECORDS, RULES, SLOW, TOKEN, Service, ServiceTest, event, register_secret,
                     request, run_cli)

ADMIN = "admin-token-5b2f0c9e1d"

STAMP = """return function(event, out)
  if out then out.event.data.custom_attributes.stamp_{part} = "{version}" end
end
"""


# A rule that renames every mapped event; see Reload.mapped_name_once_reloaded.
RENAME = """return function(e, out)
  if out then out.event.data.event_name = 'Renamed By Rule' end
end
"""


def write_atomically(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def shipped_rules_in(base, *names):
    """Directories base/name holding the shipped rules; returns their paths."""
    dirs = [os.path.join(base, name) for name in names]
    for d in dirs:
        os.mkdir(d)
        shutil.copy(os.path.join(RULES, "10-mparticle.lua"), d)
    return dirs


class Reload(ServiceTest):
    def admin_reload(self, s, token=ADMIN):
        headers = {"Authorization": "Bearer " + token} if token else {}
        return request(s.port, "POST", "/admin/reload", b"", headers)

    def test_50_reloads_under_load_fail_no_request_lose_no_event_mix_no_versions(self):
        # Each version is a directory of its own, switched in through a link
        # as the README asks of a change to several files: the watch of
        # rules_dir may reload between two files written in place.
        def stamped(version):
            return self.rules_dir({"20-stamp-a.lua": STAMP.format(part="a", version=version),
                                   "30-stamp-b.lua": STAMP.format(part="b", version=version)})

        rules = os.path.join(self.tmpdir(), "rules")
        os.symlink(stamped("v0"), rules)
        s = self.service(rules_dir=rules, env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        stop = threading.Event()
        lock = threading.Lock()
        sent, statuses, latencies = [], [], []

        def load(n):
            i = 0
            while not stop.is_set():
                batch = [event("users.messages.email.Send", user="l%d" % n,
                               id="reload-%d-%d-%d" % (n, i, k)) for k in range(20)]
                i += 1
                started = time.monotonic()
                r = s.post(batch)
                with lock:
                    latencies.append(time.monotonic() - started)
                    statuses.append(r.status)
                    if r.status == 200:
                        sent.extend(e["id"] for e in batch)

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            for version in range(1, 51):
                os.symlink(stamped("v%d" % version), rules + ".tmp")
                os.rename(rules + ".tmp", rules)
                r = self.admin_reload(s)
                self.assertEqual(r.status, 200, r)
                time.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join()

        self.assertEqual(set(statuses), {200})
        self.assertGreater(len(sent), 1000)
        self.assertLess(max(latencies), 2.0 * SLOW, "a request waited too long")
        with s.db() as db:
            rows = db.execute("SELECT event_id, rules_version, event FROM %s" % RECORDS).fetchall()
        self.assertEqual(sorted(r[0] for r in rows), sorted(sent))
        stamp_of_version = {}
        for event_id, version, mapped in rows:
            attrs = json.loads(mapped)["data"]["custom_attributes"]
            self.assertEqual(attrs["stamp_a"], attrs["stamp_b"], "mixed rule versions")
            stamp_of_version.setdefault(version, attrs["stamp_a"])
            self.assertEqual(stamp_of_version[version], attrs["stamp_a"])
        self.assertGreater(len(stamp_of_version), 5)
        self.assertGreaterEqual(s.metrics()["tributary_rule_reloads_total"], 50)

    def test_admin_reload_needs_the_admin_token(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        self.assertEqual(self.admin_reload(s, token=None).status, 401)
        self.assertEqual(self.admin_reload(s, token="wrong").status, 401)
        self.assertEqual(self.admin_reload(s, token=TOKEN).status, 401)
        r = self.admin_reload(s)
        self.assertEqual(r.status, 200)
        self.assertTrue(r.json()["reloaded"])
        self.assertRegex(r.json()["rules_version"], "^[0-9a-f]{12}$")
        self.assertNotIn(ADMIN, s.logs())

    def test_admin_endpoints_are_disabled_without_an_admin_token(self):
        s = self.service()
        self.assertEqual(self.admin_reload(s, token="anything").status, 404)
        # there is no such path, whatever the method (it was 405 for a GET)
        self.assertEqual(request(s.port, "GET", "/admin/reload").status, 404)

    def test_broken_rules_are_refused_and_the_old_ones_stay_in_force(self):
        rules = self.rules_dir()
        s = self.service(rules_dir=rules, env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        before = s.post([event()]).json()["rules_version"]
        with open(os.path.join(rules, "40-broken.lua"), "w") as f:
            f.write("return function(e, out)\n  local x = \nend\n")
        r = self.admin_reload(s)
        self.assertEqual(r.status, 422)
        self.assertIn("40-broken.lua:3:", r.json()["error"])
        after = s.post([event()])
        self.assertEqual(after.status, 200)
        self.assertEqual(after.json()["rules_version"], before)
        self.assertGreaterEqual(s.metrics()["tributary_rule_reload_failures_total"], 1)
        self.assertIn("reload refused", s.logs())

    def test_reload_last_successful_is_0_from_a_refused_reload_until_one_succeeds(self):
        # the broken file stays on disk, and a restart would refuse it: the
        # gauge says so for as long as it lasts, not for some minutes
        rules = self.rules_dir()
        s = self.service(rules_dir=rules, env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        m = s.metrics()
        self.assertEqual(m["tributary_reload_last_successful"], 1)
        started = m["tributary_reload_last_success_timestamp_seconds"]
        self.assertLessEqual(started, time.time())
        self.assertGreater(started, time.time() - 60 * SLOW)
        broken = os.path.join(rules, "40-broken.lua")
        with open(broken, "w") as f:
            f.write("return function(e, out)\n  local x = \nend\n")
        self.assertEqual(self.admin_reload(s).status, 422)
        m = s.metrics()
        self.assertEqual(m["tributary_reload_last_successful"], 0)
        self.assertEqual(m["tributary_reload_last_success_timestamp_seconds"], started)
        os.remove(broken)
        self.assertEqual(self.admin_reload(s).status, 200)
        m = s.metrics()
        self.assertEqual(m["tributary_reload_last_successful"], 1)
        self.assertGreater(m["tributary_reload_last_success_timestamp_seconds"], started)

    def test_rules_whose_engines_stop_building_after_the_reload_map_with_the_previous_ones(self):
        # The reload builds the new rules once and accepts them; each worker
        # builds its own engine when it needs one, running the files' top level
        # again. Here that top level fails during a window of time, after an
        # engine of the new rules has mapped, and that engine is then dropped
        # (its rule hits the instruction limit), so a new one is needed.
        rules = self.rules_dir()
        s = self.service(rules_dir=rules)
        before = s.post([event()]).json()["rules_version"]
        start = math.ceil(time.time() + 2 * SLOW)
        end = start + math.ceil(2 * SLOW)
        # one rename: one reload, by the watch of rules_dir
        write_atomically(os.path.join(rules, "60-window.lua"),
                         "local now = os.time()\n"
                         "if now >= %d and now < %d then error('campaign paused') end\n"
                         "return function(e, out)\n"
                         "  if e.id == 'loop-forever' then while true do end end\n"
                         "end\n" % (start, end))
        self.wait(lambda: s.post([event()]).json()["rules_version"] != before,
                  what="the new rules in force")
        in_force = s.post([event()]).json()["rules_version"]

        time.sleep(max(0.0, start - time.time()) + 0.2)
        r = s.post([event(id="loop-forever")])
        self.assertEqual((r.status, r.json()["quarantined"]), (200, 1), r)
        for _ in range(3):
            r = s.post([event()])
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["rules_version"], before)
        self.assertEqual(s.logs().count("cannot build an engine for the rules in force"), 1)
        self.assertIn("previous_rules_version=" + before, s.logs())
        self.assertIn("campaign paused", s.logs())
        self.assertGreaterEqual(s.metrics()["tributary_rule_engine_failures_total"], 1)

        time.sleep(max(0.0, end - time.time()) + 1.2)  # past the window, and a retry due
        r = s.post([event()])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["rules_version"], in_force)
        self.assertIn("the rules in force build again", s.logs())

    def test_rules_that_build_no_engine_and_have_none_before_them_make_the_service_unready(self):
        # The rules pass their checks at the start; from `start` on, their top
        # level fails, and no rules were built before them to map instead:
        # requests get 503 "rules unavailable", and /readyz must say so, then
        # come back by itself (without requests) once the rules build again.
        rules = self.rules_dir()
        start = math.ceil(time.time() + 2 * SLOW)
        end = start + math.ceil(2 * SLOW)
        with open(os.path.join(rules, "60-window.lua"), "w") as f:
            f.write("local now = os.time()\n"
                    "if now >= %d and now < %d then error('campaign paused') end\n"
                    "return function(e, out) end\n" % (start, end))
        s = self.service(rules_dir=rules, env={"TRIBUTARY_FEEDS_UNBOUND_KEY": "k-123456",
                                               "TRIBUTARY_FEEDS_UNBOUND_SECRET": "s-123456",
                                               "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        self.assertEqual(s.get("/readyz").status, 200)
        time.sleep(max(0.0, start - time.time()) + 0.2)
        r = s.post([event()])
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.json()["error"], "rules unavailable")
        r = s.get("/readyz")
        self.assertEqual(r.status, 503, r)
        self.assertIn("no rules engine builds", r.json()["reasons"][0])
        self.assertEqual(s.metrics()["tributary_ready"], 0)
        self.assertIn("campaign paused", s.logs())
        # past the window: the readiness check itself builds an engine again
        time.sleep(max(0.0, end - time.time()) + 1.2)
        self.wait(lambda: s.get("/readyz").status == 200, what="ready again")
        self.assertEqual(s.post([event()]).status, 200)

    def test_a_failing_rule_test_refuses_the_reload(self):
        rules = self.rules_dir()
        s = self.service(rules_dir=rules, env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        with open(os.path.join(rules, "50-tested.lua"), "w") as f:
            f.write("return { process = function(e, out) end, tests = {\n"
                    "  { name = 'always wrong', event = { event_type = 'users.messages.email.Open',\n"
                    "    id = '1', time = 1, user = { external_user_id = 'c' } },\n"
                    "    expect = { feed = 'ios' } } } }\n")
        r = self.admin_reload(s)
        self.assertEqual(r.status, 422)
        self.assertIn("test 'always wrong' failed", r.json()["error"])
        self.assertIn('out.feed: expected "ios", got "unbound"', r.json()["error"])

    def mapped_name_once_reloaded(self, s, deadline):
        """Posts an email open until the rules name it "Renamed By Rule" (RENAME
        is in force) or deadline passes; returns the last name."""
        name = None
        while name != "Renamed By Rule" and time.time() < deadline:
            e = event("users.messages.email.Open")
            self.assertEqual(s.post([e]).status, 200)
            with s.db() as db:
                (mapped,) = db.execute("SELECT event FROM %s WHERE event_id = ?" % RECORDS,
                                       (e["id"],)).fetchone()
            name = json.loads(mapped)["data"]["event_name"]
            if name != "Renamed By Rule":
                time.sleep(0.05)
        return name

    def test_a_change_in_rules_dir_is_picked_up_without_a_signal(self):
        rules = self.rules_dir()
        s = self.service(rules_dir=rules)
        with open(os.path.join(rules, "60-rename.lua"), "w") as f:
            f.write(RENAME)
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline and "rules_dir changed" not in s.logs():
            time.sleep(0.05)
        # The trigger is also logged when a reload is refused: the watch can
        # fire while the file is still empty, and the reload of the complete
        # file follows. Under valgrind a post can fall between the two.
        self.assertEqual(self.mapped_name_once_reloaded(s, deadline), "Renamed By Rule")

    def test_a_rule_file_written_with_a_pause_is_loaded_once_closed(self):
        # an upload (scp, sftp) that stalls halfway: the half is not loaded
        rules = self.rules_dir()
        s = self.service(rules_dir=rules)
        with open(os.path.join(rules, "60-rename.lua"), "w") as f:
            f.write(RENAME[:len(RENAME) // 2])
            f.flush()
            time.sleep(1)
            f.write(RENAME[len(RENAME) // 2:])
        deadline = time.time() + 10 * SLOW
        self.assertEqual(self.mapped_name_once_reloaded(s, deadline), "Renamed By Rule")
        self.assertNotIn("reload refused", s.logs())
        self.assertEqual(s.metrics()["tributary_rule_reload_failures_total"], 0)

    def test_a_rule_file_written_on_and_on_holds_the_reload_for_ten_seconds_at_most(self):
        rules = self.rules_dir()
        s = self.service(rules_dir=rules)
        with open(os.path.join(rules, "60-rename.lua"), "w") as f:
            f.write(RENAME)
            f.flush()
            written = time.time()
            deadline = written + 10 + 5 * SLOW
            name = None
            while name != "Renamed By Rule" and time.time() < deadline:
                f.write("--\n")  # a writer that never closes the file
                f.flush()
                name = self.mapped_name_once_reloaded(s, time.time() + 0.1)
                if time.time() - written < 2:
                    self.assertNotEqual(name, "Renamed By Rule")
            self.assertEqual(name, "Renamed By Rule")
            self.assertGreater(time.time() - written, 9)

    def test_a_rule_file_changed_in_place_and_left_open_is_loaded_within_ten_seconds(self):
        # no create and no close: only its writes say it changed
        noop = "return function(e, out) end\n"
        rules = self.rules_dir({"60-rename.lua": noop + "-" * (len(RENAME) - len(noop) - 1) + "\n"})
        s = self.service(rules_dir=rules)
        with open(os.path.join(rules, "60-rename.lua"), "r+") as f:
            f.write(RENAME)
            f.flush()
            written = time.time()
            self.assertEqual(self.mapped_name_once_reloaded(s, written + 10 + 5 * SLOW),
                             "Renamed By Rule")

    def test_a_file_written_to_long_ago_and_never_closed_holds_no_reload(self):
        # truncate(2) changes a file without opening it: no close follows
        rules = self.rules_dir({"70-other.lua": "return function(e, out) end\n-- cut\n"})
        s = self.service(rules_dir=rules)
        os.truncate(os.path.join(rules, "70-other.lua"), len("return function(e, out) end\n"))
        time.sleep(10.5)
        with open(os.path.join(rules, "60-rename.lua"), "w") as f:
            f.write(RENAME)
        self.assertEqual(self.mapped_name_once_reloaded(s, time.time() + 2 * SLOW),
                         "Renamed By Rule")

    def test_a_configmap_update_through_its_data_link_is_picked_up(self):
        # kubelet's atomic writer: the files are links through ..data, and an
        # update points ..data at a new directory with one rename
        cm = self.tmpdir()
        _, second = shipped_rules_in(cm, "..2026_11_01", "..2026_11_02")
        with open(os.path.join(second, "60-rename.lua"), "w") as f:
            f.write(RENAME)
        os.symlink("..2026_11_01", os.path.join(cm, "..data"))
        os.symlink(os.path.join("..data", "10-mparticle.lua"), os.path.join(cm, "10-mparticle.lua"))
        s = self.service(rules_dir=cm)
        os.symlink(os.path.join("..data", "60-rename.lua"), os.path.join(cm, "60-rename.lua"))
        time.sleep(0.5)  # the dangling link is refused, and the old rules stay
        os.symlink("..2026_11_02", os.path.join(cm, "..data_tmp"))
        os.rename(os.path.join(cm, "..data_tmp"), os.path.join(cm, "..data"))
        self.assertEqual(self.mapped_name_once_reloaded(s, time.time() + 10 * SLOW),
                         "Renamed By Rule")

    def test_a_rules_dir_link_switched_to_another_directory_is_followed(self):
        base = self.tmpdir()
        old, new = shipped_rules_in(base, "release-1", "release-2")
        current = os.path.join(base, "current")
        os.symlink(old, current)
        s = self.service(rules_dir=current)
        os.symlink(new, current + ".tmp")
        os.rename(current + ".tmp", current)  # mv -T
        time.sleep(1.5)  # the switch is seen; the next change is in the new directory
        with open(os.path.join(new, "60-rename.lua"), "w") as f:
            f.write(RENAME)
        self.assertEqual(self.mapped_name_once_reloaded(s, time.time() + 10 * SLOW),
                         "Renamed By Rule")

    def test_a_rules_dir_replaced_after_a_gap_is_loaded_when_it_comes_back(self):
        rules = self.rules_dir()
        s = self.service(rules_dir=rules)
        os.rename(rules, rules + ".prev")
        self.addCleanup(shutil.rmtree, rules + ".prev", True)
        time.sleep(2.5)  # the service finds no rules_dir for a while
        fresh = self.rules_dir({"60-rename.lua": RENAME})
        os.rename(fresh, rules)
        self.assertEqual(self.mapped_name_once_reloaded(s, time.time() + 10 * SLOW),
                         "Renamed By Rule")
        self.assertEqual(s.logs().count("cannot watch rules_dir"), 1)

    def service_with_slow_rule_tests_to_load(self, env=None):
        """A service whose rules_dir then gets a file of 20 rule tests of some
        0.2 s each, which its next reload runs."""
        rules = self.rules_dir()
        s = self.service(rules_dir=rules,
                         env=dict(env or {}, TRIBUTARY_RULES_INSTRUCTIONS="1000000000"))
        slow = ("  { name = 'slow %d', event = { event_type = 'users.messages.email.Open',\n"
                "    id = '%d', time = 1, user = { external_user_id = 'c' } },\n"
                "    expect_drop = 'slow' },\n")
        with open(os.path.join(rules, "05-slow.lua"), "w") as f:
            f.write("return { process = function(e, out)\n"
                    "  local n = 0\n"
                    "  for i = 1, 3e7 do n = n + i end\n"
                    "  return false, 'slow'\n"
                    "end, tests = {\n" + "".join(slow % (i, i) for i in range(20)) + "} }\n")
        return s

    def test_a_stop_during_a_reload_does_not_wait_for_it(self):
        # The reload ran on the main thread, which reads the signals: a SIGTERM
        # during rule tests of seconds was read only once they were done, and
        # batches got 200 meanwhile.
        s = self.service_with_slow_rule_tests_to_load()
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        self.assertNotIn("configuration and rules reloaded", s.logs())
        stopped_at = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3 * SLOW)
        try:
            status = s.post([event()]).status
        except OSError:
            status = None  # already gone
        self.assertIn(status, (503, None))
        self.assertEqual(s.proc.wait(timeout=30 * SLOW), 0)
        self.assertLess(time.monotonic() - stopped_at, 5 * SLOW)
        self.assertIn("reload left unfinished: the service is stopping", s.logs())
        self.assertNotIn("reload refused", s.logs())

    def test_an_admin_reload_under_way_at_a_stop_is_answered_503(self):
        s = self.service_with_slow_rule_tests_to_load(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        answer = {}
        caller = threading.Thread(target=lambda: answer.update(r=self.admin_reload(s)))
        caller.start()
        time.sleep(0.5 * SLOW)  # the reload is under way: its rule tests take seconds
        s.proc.send_signal(signal.SIGTERM)
        caller.join(30 * SLOW)
        self.assertEqual(answer["r"].status, 503)
        self.assertEqual(answer["r"].json()["error"], "the service is stopping")
        self.assertEqual(s.proc.wait(timeout=30 * SLOW), 0)

    def test_sighup_reloads_inbound_tokens_for_rotation(self):
        d = self.tmpdir()
        conf = 'return { inbound = { tokens = { "%s" } } }\n'
        s = self.service(tokens=(), config=conf % "first-token-aaaaaaaa")
        self.assertEqual(s.post([event()], token="first-token-aaaaaaaa").status, 200)
        with open(s.config, "w") as f:
            f.write('return { inbound = { tokens = { "first-token-aaaaaaaa", "second-token-bbbbbbb" } } }\n')
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline and s.post([event()], token="second-token-bbbbbbb").status != 200:
            time.sleep(0.05)
        self.assertEqual(s.post([event()], token="second-token-bbbbbbb").status, 200)
        with open(s.config, "w") as f:
            f.write(conf % "second-token-bbbbbbb")
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline and s.post([event()], token="first-token-aaaaaaaa").status != 401:
            time.sleep(0.05)
        self.assertEqual(s.post([event()], token="first-token-aaaaaaaa").status, 401)
        self.assertNotIn("second-token-bbbbbbb", s.logs())
        self.assertTrue(os.path.isdir(d))

    def test_sighup_applies_the_log_format_and_names_settings_that_need_a_restart(self):
        s = self.service(config="return { queue = { min_free_mb = 1 } }\n")
        with open(s.config, "w") as f:
            f.write('return { log = { format = "json" }, queue = { min_free_mb = 0 } }\n')
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline and "configuration and rules reloaded" not in s.logs():
            time.sleep(0.05)
        lines = s.logs().splitlines()
        reloaded = next(i for i, line in enumerate(lines) if "configuration and rules reloaded" in line)
        self.assertEqual(json.loads(lines[reloaded])["msg"], "configuration and rules reloaded")
        warning = next(line for line in lines if "only after a restart" in line)
        self.assertIn("queue.min_free_mb", warning)

    def test_a_reload_cannot_switch_off_the_credentials_the_bound_address_needs(self):
        # bound to every address with a token; the new file moves to loopback
        # without one, but the socket stays where it is until a restart
        s = Service(tokens=(), config="")
        self.addCleanup(s.cleanup)
        del s.env["TRIBUTARY_LISTEN"]
        conf = 'return { listen = "%s:%d", inbound = { tokens = { %s } } }\n'
        with open(s.config, "w") as f:
            f.write(conf % ("0.0.0.0", s.port, '"bound-token-aaaaaaaa"'))
        s.start()
        self.assertEqual(s.post([event()], token=None).status, 401)
        with open(s.config, "w") as f:
            f.write(conf % ("127.0.0.1", s.port, ""))
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline and "reload refused" not in s.logs():
            time.sleep(0.05)
        self.assertIn("listens on non-loopback address 0.0.0.0 until it restarts", s.logs())
        self.assertEqual(s.post([event()], token=None).status, 401)
        self.assertEqual(s.post([event()], token="bound-token-aaaaaaaa").status, 200)


class Limits(ServiceTest):
    def test_a_rule_over_its_instruction_limit_fails_only_that_event(self):
        rules = self.rules_dir({"20-loop.lua": (
            "return function(event, out)\n"
            "  if event.properties.spin then while true do end end\n"
            "end\n")})
        s = self.service(rules_dir=rules, env={"TRIBUTARY_RULES_INSTRUCTIONS": "200000"})
        bad = event("users.messages.email.Open", spin=True)
        good = event("users.messages.email.Open")
        r = s.post([bad, good])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 1)
        self.assertEqual(r.json()["forwarded"], 1)
        with s.db() as db:
            (reason, detail) = db.execute("SELECT reason, detail FROM dead").fetchone()
        self.assertEqual(reason, "rule_limit")
        self.assertIn("instruction limit", detail)
        # the service keeps serving, on a rebuilt state
        for _ in range(3):
            self.assertEqual(s.post([event()]).status, 200)
        self.assertGreaterEqual(s.metrics()["tributary_rule_state_rebuilds_total"], 1)

    def test_a_memory_bomb_fails_only_that_event(self):
        rules = self.rules_dir({"20-bomb.lua": (
            "return function(event, out)\n"
            "  if event.properties.bomb then\n"
            "    local t = {}\n"
            "    for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end\n"
            "  end\n"
            "end\n")})
        # only memory may stop it: the collector's work is charged to the
        # string.rep calls, and a sanitizer makes it dear
        s = self.service(rules_dir=rules, env={"TRIBUTARY_RULES_MEMORY_MB": "16",
                                               "TRIBUTARY_RULES_INSTRUCTIONS": "1000000000"})
        r = s.post([event("users.messages.email.Open", bomb=True), event()])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["quarantined"], 1)
        with s.db() as db:
            (reason, detail) = db.execute("SELECT reason, detail FROM dead").fetchone()
        self.assertEqual(reason, "rule_limit")
        self.assertIn("memory limit", detail)
        self.assertEqual(s.post([event()]).status, 200)


class SecretsFromFiles(ServiceTest):
    """TRIBUTARY_<KEY>_FILE: a value read from a file at every load, so that a
    secret replaced in place takes effect on a reload; the process's own
    environment cannot change."""

    OLD, NEW = "rotated-token-old-5a1c", "rotated-token-new-9e4d"

    def setUp(self):
        super().setUp()
        register_secret(self.OLD)
        register_secret(self.NEW)

    def reloaded(self, s, times):
        self.assertTrue(s.reload(), s.logs()[-2000:])
        self.assertEqual(s.logs().count("configuration and rules reloaded"), times)

    def test_a_token_rotated_in_its_file_takes_effect_on_a_reload(self):
        tokens = os.path.join(self.tmpdir(), "tokens")
        with open(tokens, "w") as f:
            f.write(self.OLD + "\n")
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_TOKENS_FILE": tokens})
        self.assertEqual(s.post([event()], token=self.OLD).status, 200)
        self.assertEqual(s.post([event()], token=self.NEW).status, 401)
        # the new token beside the old, one per line; Braze switches; the old goes
        write_atomically(tokens, self.OLD + "\n" + self.NEW + "\n")
        self.reloaded(s, 1)
        self.assertEqual(s.post([event()], token=self.OLD).status, 200)
        self.assertEqual(s.post([event()], token=self.NEW).status, 200)
        write_atomically(tokens, self.NEW + "\n")
        self.reloaded(s, 2)
        self.assertEqual(s.post([event()], token=self.NEW).status, 200)
        self.assertEqual(s.post([event()], token=self.OLD).status, 401)
        self.assertNotIn("unknown environment variable", s.logs())

    def test_a_reload_that_finds_the_tokens_file_empty_keeps_the_tokens(self):
        # a file rewritten in place is empty for a moment: read then, it removed
        # every token, and a proxied Braze got 401 for everything
        tokens = os.path.join(self.tmpdir(), "tokens")
        with open(tokens, "w") as f:
            f.write(self.OLD + "\n")
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_TOKENS_FILE": tokens})
        open(tokens, "w").close()
        self.assertTrue(s.reload(outcome="reload refused"), s.logs())
        self.assertIn("TRIBUTARY_INBOUND_TOKENS_FILE: %s is empty" % tokens, s.logs())
        xff = {"X-Forwarded-For": "203.0.113.40"}
        self.assertEqual(s.post([event()], token=self.OLD, headers=xff).status, 200)
        self.assertEqual(s.post([event()], token=self.NEW, headers=xff).status, 401)

    def test_a_restart_only_setting_is_named_while_it_differs_from_the_running_value(self):
        s = self.service(config="return { http = { threads = 8 } }\n")
        for threads, reloads in ((4, 1), (8, 2)):
            with open(s.config, "w") as f:
                f.write("return { http = { threads = %d } }\n" % threads)
            self.reloaded(s, reloads)
        # 8 -> 4 is not in force until a restart; back to 8 is what runs
        self.assertEqual(s.logs().count('only after a restart" key=http.threads'), 1)

    def test_a_reload_cannot_take_requests_the_running_queue_could_never_hold(self):
        s = self.service(config="return { queue = { max_depth = 5 }, inbound = { max_events = 5 } }\n")
        self.assertTrue(s.reload("return { queue = { max_depth = 100 }, inbound = { max_events = 50 } }\n",
                                 outcome="reload refused"), s.logs())
        self.assertIn("inbound.max_events (50) exceeds the queue.max_depth the service runs with "
                      "until it restarts (5)", s.logs())
        self.assertEqual(s.post([event() for _ in range(10)]).status, 413)  # still 5 per request

    def test_a_reload_warns_of_what_a_start_would_warn_of(self):
        # a key rotated to another pod's: refused at the first send; said at the reload
        key = "us2-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
        register_secret(key)
        s = self.service(tokens=(), config='return { inbound = { tokens = { "%s" } } }\n' % self.OLD)
        s.reload('return { inbound = { tokens = { "%s", "shrt" } },\n'
                 '  feeds = { ios = { key = "%s", secret = "ios-secret-1b2c" } } }\n' % (self.OLD, key))
        self.assertEqual(s.logs().count("configuration and rules reloaded"), 1, s.logs())
        self.assertRegex(s.logs(), r"level=warn msg=\"feeds.ios.key is a key of mParticle's us2 "
                                   r"data pod, but the feed sends to s2s.mparticle.com \(us1\)")
        self.assertRegex(s.logs(), r"level=warn msg=\"inbound.tokens: token 2 has 4 characters")
        self.assertNotIn(key, s.logs())
        self.assertNotIn("ios-secret-1b2c", s.logs())

    def test_a_variable_the_file_stops_reading_is_a_warning_at_a_reload(self):
        # the environment is fixed at start: an error would refuse every reload
        conf = 'return { inbound = { tokens = { os.getenv("TRIBUTARY_CURRENTS_TOKEN") } } }\n'
        s = self.service(tokens=(), config=conf, env={"TRIBUTARY_CURRENTS_TOKEN": self.OLD})
        self.assertEqual(s.post([event()], token=self.OLD).status, 200)
        s.reload('return { inbound = { tokens = { "%s" } } }\n' % self.NEW)
        self.assertEqual(s.logs().count("configuration and rules reloaded"), 1, s.logs())
        self.assertRegex(s.logs(), r"level=warn msg=\"unknown environment variable "
                                   r"TRIBUTARY_CURRENTS_TOKEN: it names no key")
        self.assertEqual(s.post([event()], token=self.NEW).status, 200)
        # a start is stricter
        p = run_cli(["check", "--config", s.config],
                    env={"TRIBUTARY_CURRENTS_TOKEN": self.OLD})
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("unknown environment variable TRIBUTARY_CURRENTS_TOKEN", p.stderr)

    def test_a_file_change_the_environment_overrides_refuses_the_reload(self):
        # a reload that said it succeeded while the token added for a rotation
        # still got 401: the operator would switch Braze to it, and Braze
        # stops a connector that gets 401
        s = self.service(tokens=(self.OLD,), env={"TRIBUTARY_ADMIN_TOKEN": ADMIN},
                         config='return { inbound = { tokens = { "%s" } } }\n' % self.OLD)
        with open(s.config, "w") as f:
            f.write('return { inbound = { tokens = { "%s", "%s" } } }\n' % (self.OLD, self.NEW))
        self.assertTrue(s.reload(outcome="reload refused"), s.logs()[-2000:])
        self.assertRegex(s.logs(), r"changed in the configuration file, but the environment sets "
                                   r"these keys and wins, so the change would have no effect: "
                                   r"inbound.tokens\.")
        answer = request(s.port, "POST", "/admin/reload", b"",
                         {"Authorization": "Bearer " + ADMIN})
        self.assertEqual(answer.status, 422, answer.body)
        self.assertIn("inbound.tokens", answer.body)
        metrics = s.get("/metrics").body
        self.assertIn("tributary_reload_last_successful 0", metrics)
        self.assertEqual(s.post([event()], token=self.OLD).status, 200)
        self.assertNotIn(self.NEW, s.logs())
        # the file as the environment has it again: reloads go through
        with open(s.config, "w") as f:
            f.write('return { inbound = { tokens = { "%s" } } }\n' % self.OLD)
        self.reloaded(s, 1)
        # and so does the key taken out of the file, as the refusal advises
        with open(s.config, "w") as f:
            f.write('return { }\n')
        self.reloaded(s, 2)
        self.assertEqual(s.post([event()], token=self.OLD).status, 200)

    def test_file_errors_name_the_variable_and_the_file_never_its_content(self):
        d = self.tmpdir()
        two_lines = os.path.join(d, "key")
        with open(two_lines, "w") as f:
            f.write(self.OLD + "\n" + self.NEW + "\n")
        empty = os.path.join(d, "empty")
        with open(empty, "w") as f:
            f.write(" \n")
        cases = [
            ({"TRIBUTARY_ADMIN_TOKEN": self.OLD, "TRIBUTARY_ADMIN_TOKEN_FILE": two_lines},
             "TRIBUTARY_ADMIN_TOKEN and TRIBUTARY_ADMIN_TOKEN_FILE are both set; keep one"),
            ({"TRIBUTARY_ADMIN_TOKEN_FILE": os.path.join(d, "missing")},
             "TRIBUTARY_ADMIN_TOKEN_FILE: cannot open %s: No such file or directory"
             % os.path.join(d, "missing")),
            ({"TRIBUTARY_ADMIN_TOKEN_FILE": two_lines},
             "TRIBUTARY_ADMIN_TOKEN_FILE: %s holds more than one line" % two_lines),
            ({"TRIBUTARY_ADMIN_TOKEN_FILE": empty},
             "TRIBUTARY_ADMIN_TOKEN_FILE: %s is empty" % empty),
        ]
        for env, message in cases:
            p = run_cli(["check"], env=env)
            self.assertEqual(p.returncode, 1, p)
            self.assertIn(message, p.stderr)
            self.assertNotIn(self.OLD, p.stderr + p.stdout)
            self.assertNotIn(self.NEW, p.stderr + p.stdout)

    def test_a_setting_read_from_a_file_is_checked_like_any_other(self):
        path = os.path.join(self.tmpdir(), "depth")
        with open(path, "w") as f:
            f.write("lots\n")
        p = run_cli(["check"], env={"TRIBUTARY_QUEUE_MAX_DEPTH_FILE": path})
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("TRIBUTARY_QUEUE_MAX_DEPTH_FILE: must be an integer", p.stderr)
        # the file may be a secret's, named by mistake: its content is never shown
        self.assertNotIn("lots", p.stderr + p.stdout)
