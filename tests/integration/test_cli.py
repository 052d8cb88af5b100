"""The command line: check, --help, --version, errors that name file and line;
dlq requeue and purge over many dead letters and at the limits of their input."""

import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import unittest

from harness import (BIN, ROOT, RULES, SANITIZED, SLOW, TIME, WRAPPER, ServiceTest, clean_env,
                     event, preload_env, run_cli, run_cli_peak_rss, tool_errors)

# dlq requeue reads, maps and commits this many dead letters at a time, fewer
# when their Braze events reach REQUEUE_PAGE_BYTES (host/dlq.c).
REQUEUE_PAGE = 500
REQUEUE_PAGE_BYTES = 8 << 20
# dlq purge deletes this many dead letters per transaction (host/queue.h).
PURGE_PAGE = 2000


def run_cli_as_nobody(args, env, cwd):
    """Runs the binary once as uid and gid 65534 (from root); None when the
    binary is out of that user's reach here."""
    def as_nobody():
        os.setgid(65534)
        os.setuid(65534)
    try:
        p = subprocess.run(WRAPPER + [BIN] + args, capture_output=True, text=True,
                           env=clean_env(env), cwd=cwd, timeout=60, preexec_fn=as_nobody)
    except PermissionError:
        return None
    return None if p.returncode == 126 else p


class Cli(ServiceTest):
    def write_file(self, name, text):
        """Writes text to a new file name in a directory of its own; (dir, path)."""
        d = self.tmpdir()
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        return d, path

    def test_version_and_help(self):
        p = run_cli(["--version"])
        self.assertEqual(p.returncode, 0)
        self.assertRegex(p.stdout, r"^tributary \d+\.\d+\.\d+")
        p = run_cli(["--help"])
        self.assertEqual(p.returncode, 0)
        for command in ("serve", "check", "map"):
            self.assertIn(command, p.stdout)

    def test_queue_stats_says_whether_the_service_runs(self):
        # feeds showed "sending" with the service stopped
        s = self.service(env={"TRIBUTARY_FEEDS_UNBOUND_KEY": "unbound-key-7c1d",
                              "TRIBUTARY_FEEDS_UNBOUND_SECRET": "unbound-secret-4e9a",
                              "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        self.assertEqual(s.post([event()]).status, 200)
        stats = json.loads(s.cli(["queue", "stats", "--json"]).stdout)
        self.assertIs(stats["service_running"], True)
        self.assertEqual(stats["service_pid"], s.proc.pid)
        text = s.cli(["queue", "stats"]).stdout
        self.assertIn("service: running (pid %d)" % s.proc.pid, text)
        self.assertRegex(text, r"unbound +\d+ +\S+ +\d+  sending")
        if os.geteuid() == 0 and shutil.which("unshare"):
            # from another pid namespace (a debug container on the same
            # volume) /proc/locks lists no lock of the service's
            p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", BIN, "queue",
                                "stats", "--json"], env=clean_env(s.env), cwd=s.dir,
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
            stats = json.loads(p.stdout)
            self.assertIs(stats["service_running"], True)
            self.assertNotIn("service_pid", stats)
        self.assertEqual(s.stop(), 0)
        stats = json.loads(s.cli(["queue", "stats", "--json"]).stdout)
        self.assertIs(stats["service_running"], False)
        self.assertNotIn("service_pid", stats)
        text = s.cli(["queue", "stats"]).stdout
        self.assertIn("service: not running", text)
        self.assertRegex(text, r"unbound +\d+ +\S+ +\d+  stopped")
        self.assertNotIn("sending", text)

    @unittest.skipUnless(os.geteuid() == 0, "needs root")
    def test_serve_run_as_root_leaves_data_dir_to_its_owner(self):
        # started by hand as root on the service user's data_dir, it left
        # serve.lock and the queue root's: the service could not start after it
        d = self.tmpdir()
        data_dir = os.path.join(d, "var")
        os.mkdir(data_dir, 0o700)
        os.chown(data_dir, 65534, 65534)
        s = self.service(env={"TRIBUTARY_DATA_DIR": data_dir})
        self.assertEqual(s.post([event()]).status, 200)
        names = sorted(os.listdir(data_dir))
        self.assertIn("serve.lock", names)
        self.assertIn("queue.db", names)
        for name in names:
            st = os.stat(os.path.join(data_dir, name))
            self.assertEqual((st.st_uid, st.st_gid), (65534, 65534), name)
        self.assertEqual(s.stop(), 0)
        for name in os.listdir(data_dir):
            self.assertEqual(os.stat(os.path.join(data_dir, name)).st_uid, 65534, name)

    def test_secrets_in_files_every_user_can_read_are_named_in_a_warning(self):
        d = self.tmpdir()
        conf = os.path.join(d, "tributary.conf.lua")
        with open(conf, "w") as f:
            f.write('return { inbound = { tokens = { "token-in-the-file-5d2e9a" } },\n'
                    '  feeds = { ios = { key = "ios-key-in-the-file", secret = os.getenv("S") },\n'
                    '            android = { key = "android-key-in-the-file",\n'
                    '                        secret = "android-secret-in-the-file" } } }\n')
        admin = os.path.join(d, "admin-token")
        with open(admin, "w") as f:
            f.write("admin-token-in-a-file-8c3b\n")
        # the environment's secret is in force, but the file's is in the file
        env = {"S": "ios-secret-from-the-environment", "TRIBUTARY_ADMIN_TOKEN_FILE": admin,
               "TRIBUTARY_FEEDS_ANDROID_SECRET": "android-secret-from-the-environment",
               "TRIBUTARY_RULES_DIR": RULES}
        for path in (conf, admin):
            os.chmod(path, 0o644)
        p = run_cli(["check", "--config", conf], env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("%s holds secrets (inbound.tokens, feeds.ios.key, feeds.android.key, "
                      "feeds.android.secret) and every user of this machine can read it "
                      "(mode 0644)" % conf, p.stderr)
        self.assertIn("TRIBUTARY_ADMIN_TOKEN_FILE names %s, which every user of this machine can "
                      "read (mode 0644)" % admin, p.stderr)
        for secret in ("token-in-the-file", "key-in-the-file", "secret-in-the-file",
                       "secret-from-the-environment", "admin-token-in"):
            self.assertNotIn(secret, p.stdout + p.stderr)
        # the files of the user checking: 600 is the fix, but for root's, which
        # may be checked for a service of its own user
        mine = ("chmod 600 it if the service runs as root; for a service of its own user, "
                "give it that user's group (chgrp) and chmod 640 it") if os.geteuid() == 0 else "chmod 600 it"
        self.assertIn("(mode 0644): %s; or give them in the environment" % mine, p.stderr)
        self.assertIn("read (mode 0644): %s\n" % mine, p.stderr)
        if os.geteuid() == 0:
            # root checks a file of another user's: it may be the service's
            for path in (conf, admin):
                os.chown(path, 65534, -1)
            p = run_cli(["check", "--config", conf], env=env)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(p.stderr.count(
                "(mode 0644): chmod 600 it if uid 65534 is the service's user; else give it the "
                "service's group (chgrp) and chmod 640 it"), 2, p.stderr)
            # the service's own user, uid 65534 here, reads a file of root's:
            # 600 would lock it out
            for path in (conf, admin):
                os.chown(path, 0, -1)
            os.chmod(os.path.dirname(conf), 0o755)
            p = run_cli_as_nobody(["check", "--config", conf], env, d)
            if p is not None:
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertNotIn("(mode 0644): chmod 600 it", p.stderr)
                self.assertEqual(p.stderr.count(
                    "it and chmod 640 it (it belongs to uid 0, not to the service's user, uid "
                    "65534: with 600 the service could not read it)"), 2, p.stderr)
        # the service's own, or its group's: nothing to say
        for path in (conf, admin):
            os.chmod(path, 0o640)
        p = run_cli(["check", "--config", conf], env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("every user of this machine", p.stderr)

    def test_help_and_version_after_double_dash_are_arguments(self):
        # `map -- -h` printed the usage instead of mapping the file -h
        d, _ = self.write_file("-h", json.dumps({"events": [event(user="dash")]}))
        env = {"TRIBUTARY_RULES_DIR": RULES}
        p = run_cli(["map", "--", "-h"], env=env, cwd=d)
        self.assertEqual(p.returncode, 0, p)
        self.assertEqual(json.loads(p.stdout.splitlines()[0])["batch"]["user_identities"]
                         ["customer_id"], "dash")
        # no such file: an error, not the version
        p = run_cli(["map", "--", "--version"], env=env, cwd=d)
        self.assertEqual(p.returncode, 1, p)
        self.assertNotIn("tributary 0.", p.stdout)

    def test_a_runtime_error_in_the_configuration_never_shows_the_value_involved(self):
        path = os.path.join(self.tmpdir(), "c.lua")
        with open(path, "w") as f:
            f.write('return { feeds = { ios = { key = ("ios-key-in-the-file")() } } }\n')
        p = run_cli(["check", "--config", path])
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("c.lua:1: attempt to call a string value", p.stderr)
        self.assertNotIn("ios-key-in-the-file", p.stderr + p.stdout)

    def test_serve_with_a_configuration_error_writes_one_line_in_the_log_format_asked_for(self):
        p = run_cli(["serve"], env={"TRIBUTARY_HTTP_THREADS": "abc",
                                    "TRIBUTARY_LOG_FORMAT": "json"}, cwd=self.tmpdir())
        self.assertEqual(p.returncode, 78, p)  # EX_CONFIG
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        record = json.loads(lines[0])
        self.assertEqual(record["level"], "error")
        self.assertEqual(record["msg"], "configuration error; not started")
        self.assertIn("TRIBUTARY_HTTP_THREADS: must be an integer", record["error"])

    def test_queue_stats_on_a_read_only_file_system_says_why_it_cannot_read(self):
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        self.assertEqual(s.stop(), 0)
        mnt = self.tmpdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt],
                          capture_output=True).returncode != 0:
            self.skipTest("cannot mount a file system here")
        self.addCleanup(subprocess.run, ["umount", mnt], capture_output=True)
        shutil.copytree(s.data_dir, os.path.join(mnt, "var"))
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        p = run_cli(["queue", "stats"], env={"TRIBUTARY_DATA_DIR": os.path.join(mnt, "var")},
                    cwd=self.tmpdir())
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("data_dir is on a read-only file system", p.stderr)
        # the commands that write, and the service, say it too (they said
        # "unable to open database file"; the service named its file twice)
        ro = {"TRIBUTARY_DATA_DIR": os.path.join(mnt, "var"), "TRIBUTARY_RULES_DIR": RULES}
        p = run_cli(["dlq", "requeue", "--all"], env=ro, cwd=self.tmpdir())
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("(data_dir is on a read-only file system)", p.stderr)
        p = run_cli(["serve"], env=dict(ro, TRIBUTARY_LISTEN="127.0.0.1:%d" % s.port),
                    cwd=self.tmpdir())
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("(data_dir is on a read-only file system)", p.stderr)
        self.assertEqual(p.stderr.count(mnt), 1, p.stderr)

    def test_a_queue_of_another_owner_is_named_with_its_owner(self):
        # a queue.db restored by root, beside a service of its own user:
        # SQLite said only "unable to open database file"
        if os.geteuid() != 0:
            self.skipTest("needs root to make a file of another user's")
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        self.assertEqual(s.stop(), 0)
        top = self.tmpdir()
        os.chmod(top, 0o755)
        data = os.path.join(top, "var")
        os.mkdir(data, 0o700)
        os.chown(data, 65534, 65534)
        shutil.copy(os.path.join(s.data_dir, "queue.db"), data)  # root's, 0600
        os.chmod(os.path.join(data, "queue.db"), 0o600)
        p = run_cli_as_nobody(["queue", "stats"], {"TRIBUTARY_DATA_DIR": data}, top)
        if p is None:
            self.skipTest("the binary is not reachable by another user here")
        if "Permission denied" in p.stderr and "queue.db" not in p.stderr:
            self.skipTest("the binary is not reachable by another user here: %s" % p.stderr)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("queue.db: unable to open database file (Permission denied: it belongs to "
                      "uid 0, mode 0600, and this process runs as uid 65534: chown it and its -wal "
                      "and -shm files to the service's user)", p.stderr)

    def test_an_option_the_command_does_not_take_is_refused_not_ignored(self):
        for args, option, command in ((["check", "--force"], "--force", "check"),
                                      (["dlq", "list", "--older-than", "7d"], "--older-than",
                                       "dlq list"),
                                      (["dlq", "purge", "--older-than", "7d", "--all"], "--all",
                                       "dlq purge"),
                                      (["sign", "--json"], "--json", "sign")):
            p = run_cli(args, cwd=self.tmpdir())
            self.assertEqual(p.returncode, 2, p)
            self.assertIn("%s does not apply to %s" % (option, command), p.stderr)

    def test_map_runs_the_rules_as_for_a_requests_workspace(self):
        rules = self.rules_dir({"20-workspace.lua": (
            "return function(event, out, workspace)\n"
            "  out.event.data.custom_attributes.braze_workspace = workspace or 'none'\n"
            "end\n")})
        env = {"TRIBUTARY_RULES_DIR": rules}
        stdin = json.dumps(event(platform="web"))
        for args, want in ((["--workspace", "brand-a"], "brand-a"), ([], "none")):
            p = run_cli(["map", "-"] + args, env=env, stdin=stdin, cwd=self.tmpdir())
            self.assertEqual(p.returncode, 0, p.stderr)
            out = json.loads(p.stdout)
            self.assertEqual(
                out["batch"]["events"][0]["data"]["custom_attributes"]["braze_workspace"], want)
        env["TRIBUTARY_INBOUND_WORKSPACES"] = "brand-a"
        p = run_cli(["map", "-", "--workspace=brand-b"], env=env, stdin=stdin, cwd=self.tmpdir())
        self.assertEqual(p.returncode, 2, p)
        self.assertIn("--workspace: not one of inbound.workspaces", p.stderr)
        # without --workspace, as a request without one (an event stored before workspaces)
        # with a note: the service would refuse such a request
        p = run_cli(["map", "-"], env=env, stdin=stdin, cwd=self.tmpdir())
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("note: inbound.workspaces is set, and the service answers a request "
                      "without ?workspace= with 503", p.stderr)
        p = run_cli(["map", "-", "--workspace", "brand-a"], env=env, stdin=stdin,
                    cwd=self.tmpdir())
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        p = run_cli(["check", "--workspace", "brand-a"], env=env, cwd=self.tmpdir())
        self.assertEqual(p.returncode, 2, p)
        self.assertIn("--workspace does not apply to check", p.stderr)

    def test_an_argument_the_command_does_not_take_is_refused_not_ignored(self):
        for args, what in ((["check", "tributary.conf.lua"], "check takes no arguments"),
                           (["serve", "tributary.conf.lua"], "serve takes no arguments"),
                           (["map", "a.json", "b.json"], "map takes at most one input file"),
                           (["sign", "a.json", "b.json"], "sign takes at most one input file")):
            p = run_cli(args)
            self.assertEqual(p.returncode, 2, p)
            self.assertIn(what, p.stderr)
            self.assertEqual(p.stdout, "")

    def test_an_option_given_twice_or_empty_is_refused(self):
        # the second --config won unseen: `check` said ok of another file
        d = self.tmpdir()
        conf = os.path.join(d, "c.lua")
        with open(conf, "w") as f:
            f.write("return {}\n")
        for args, what in ((["check", "--config", "/nonexistent.lua", "--config", conf],
                            "--config given twice"),
                           (["check", "--config=" + conf, "--config=" + conf],
                            "--config given twice"),
                           (["check", "--config="], "--config needs a value"),
                           (["dlq", "list", "--reason", ""], "--reason needs a value")):
            p = run_cli(args, cwd=d)
            self.assertEqual(p.returncode, 2, p)
            self.assertIn(what, p.stderr)

    def test_unknown_command_is_a_usage_error(self):
        p = run_cli(["frobnicate"])
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown command", p.stderr)

    def test_a_relative_rules_dir_not_found_says_where_it_was_looked_for(self):
        # the default, ./rules, is read from where the command runs
        d = self.tmpdir()
        for command in (["check"], ["map", "-"]):
            p = run_cli(command, cwd=d, stdin="[]")
            self.assertEqual(p.returncode, 1, p)
            self.assertIn("rules_dir ./rules (in %s): No such file or directory"
                          % os.path.realpath(d), p.stderr)

    def test_check_passes_on_the_shipped_configuration_and_rules(self):
        p = run_cli(["check", "--config", "tributary.conf.lua"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"ok: .* rule tests? passed, rules version [0-9a-f]{12}")

    def test_dlq_and_queue_commands_run_without_the_services_inbound_secrets(self):
        # the service's file, whose token comes from an environment the operator's
        # shell does not have
        d = self.tmpdir()
        conf = os.path.join(d, "prod.lua")
        with open(conf, "w") as f:
            f.write('return { listen = "0.0.0.0:8080", data_dir = "%s/var",\n'
                    '  inbound = { tokens = { os.getenv("BRAZE_CURRENTS_TOKEN") } } }\n' % d)
        for command in (["queue", "stats"], ["dlq", "list"]):
            p = run_cli(command + ["--config", conf], cwd=d)
            self.assertNotIn("refusing to listen", p.stderr)
            self.assertIn("no queue at", p.stderr)
        p = run_cli(["check", "--config", conf], cwd=d)
        self.assertEqual(p.returncode, 1)
        self.assertIn("refusing to listen on non-loopback address 0.0.0.0", p.stderr)

    def test_dlq_refuses_what_it_would_misread(self):
        s = self.service()
        cases = [
            (["dlq", "purge", "--older-than", "7"], "with its unit"),
            (["dlq", "purge", "--older-than", "7d", "extra"], "takes no argument"),
            (["dlq", "list", "--reason", "rule-error"], "unknown --reason 'rule-error' (rule_error,"),
            (["dlq", "requeue", "--reason", "maxage"], "unknown --reason"),
            (["dlq", "list", "extra"], "takes no argument"),
            # an ID, --reason and --all are each the whole selection
            (["dlq", "requeue", "1", "--all"], "needs one of an ID, --reason REASON or --all"),
            (["dlq", "requeue", "1", "--reason", "max_age"], "needs one of an ID"),
            (["dlq", "requeue", "--reason", "max_age", "--all"], "needs one of an ID"),
            (["dlq", "requeue"], "needs one of an ID"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                p = s.cli(args)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertIn(message, p.stderr)
        # nothing to requeue is still a summary, in JSON with --json
        p = s.cli(["dlq", "requeue", "--all", "--json"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["requeued"], 0)

    def test_output_that_cannot_be_written_fails_the_command(self):
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        sample = os.path.join(ROOT, "docs", "sample-currents-batch.json")
        for args in (["queue", "stats"], ["dlq", "list", "--json"], ["map", sample], ["--version"]):
            with self.subTest(args=args), open("/dev/full", "w") as full:
                p = subprocess.run(WRAPPER + [BIN] + args, stdout=full, stderr=subprocess.PIPE,
                                   text=True, env=clean_env(s.env), cwd=s.dir, timeout=60 * SLOW)
                self.assertEqual(tool_errors(p.stderr), [])
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn("tributary: cannot write the output: No space left on device",
                              p.stderr)

    def test_dlq_changes_never_create_a_queue_in_a_mistaken_data_dir(self):
        d = self.tmpdir()
        for args in (["dlq", "purge", "--older-than", "1d"], ["dlq", "requeue", "--all"]):
            p = run_cli(args, env={"TRIBUTARY_DATA_DIR": os.path.join(d, "var"),
                                   "TRIBUTARY_RULES_DIR": RULES}, cwd=d)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn("no queue at", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(d, "var")))
        # a data_dir that cannot be read is not "no queue"
        with open(os.path.join(d, "file"), "w") as f:
            f.write("not a directory")
        p = run_cli(["dlq", "list"], env={"TRIBUTARY_DATA_DIR": os.path.join(d, "file")}, cwd=d)
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot read", p.stderr)
        self.assertIn("Not a directory", p.stderr)

    def test_check_refuses_an_events_setting_that_names_no_mapped_type(self):
        p = run_cli(["check"], env={"TRIBUTARY_EVENTS": "users.messages.email.Opened"})
        self.assertEqual(p.returncode, 1)
        self.assertIn('"users.messages.email.Opened" is not one of the mapped event types',
                      p.stderr)
        p = run_cli(["check"], env={"TRIBUTARY_EVENTS": "users.messages.email.Open,users_canvas_abort"})
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_check_names_file_and_line_of_a_rule_syntax_error(self):
        rules = self.rules_dir({"20-broken.lua": "return function(e, out)\n  if then\nend\n"})
        p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
        self.assertEqual(p.returncode, 1)
        self.assertIn("20-broken.lua:2:", p.stderr)

    def test_check_warns_of_a_later_rule_file_that_fails_on_the_tests_events(self):
        # no tests of its own: check said ok, and every event without the
        # property became a dead letter
        lower = ("return function(event, out)\n"
                 "  out.event.data.custom_attributes.campaign_name = "
                 "event.properties.campaign_name:lower()\n"
                 "end\n")
        rules = self.rules_dir({"50-lower.lua": lower})
        p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stderr, r"^warning: the events of \d+ rule tests pass their own file "
                                   r"and go to the dead-letter store in the files after it")
        self.assertIn("50-lower.lua:2: attempt to index a nil value", p.stderr)
        s = self.service(rules_dir=rules)
        self.assertIn("rule tests pass their own file and go to the dead-letter store", s.logs())

    def test_a_configuration_path_that_is_a_directory_says_so(self):
        d = self.tmpdir()
        p = run_cli(["check", "--config", d])
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("%s: cannot read: Is a directory" % d, p.stderr)

    def test_check_names_file_and_line_of_an_unknown_config_key(self):
        _, conf = self.write_file("c.lua", "return {\n  batch = {\n    lingr_ms = 5,\n  },\n}\n")
        p = run_cli(["check", "--config", conf])
        self.assertEqual(p.returncode, 1)
        self.assertIn("c.lua:3: unknown key 'batch.lingr_ms'", p.stderr)

    def test_check_reports_a_wrong_type_without_echoing_secrets(self):
        _, conf = self.write_file(
            "c.lua", 'return { feeds = { ios = { key = "super-secret-key-value" } } }\n')
        p = run_cli(["check", "--config", conf])
        self.assertEqual(p.returncode, 1)
        self.assertIn("feeds.ios", p.stderr)
        self.assertNotIn("super-secret-key-value", p.stderr + p.stdout)

    def test_check_warns_of_a_key_of_another_data_pod_than_its_url(self):
        # newer mParticle keys begin with their pod; another pod's URL refuses them
        key = "us2-0123456789abcdef0123456789abcdef"
        creds = {"TRIBUTARY_FEEDS_ANDROID_KEY": key, "TRIBUTARY_FEEDS_ANDROID_SECRET": "s-123456"}
        p = run_cli(["check"], env=creds)
        self.assertEqual(p.returncode, 0, p)
        self.assertIn("feeds.android.key is a key of mParticle's us2 data pod, but the feed sends "
                      "to s2s.mparticle.com (us1), which will refuse it: set feeds.android.url or "
                      "mparticle.url to https://s2s.us2.mparticle.com", p.stderr)
        self.assertNotIn(key, p.stderr + p.stdout)
        for url in ("https://s2s.us2.mparticle.com", "http://127.0.0.1:9"):
            p = run_cli(["check"], env=dict(creds, TRIBUTARY_FEEDS_ANDROID_URL=url))
            self.assertEqual(p.returncode, 0, p)
            self.assertNotIn("data pod", p.stderr, url)

    def test_check_fails_when_a_rule_test_fails(self):
        rules = self.rules_dir({"20-rename.lua": (
            "return {\n"
            "  process = function(e, out) out.event.data.event_name = 'Renamed' end,\n"
            "  tests = { { name = 'renames', event = { event_type = 'users.messages.email.Open',\n"
            "    id = '1', time = 1, user = { external_user_id = 'c' } },\n"
            "    expect = { event = { data = { event_name = 'Something else' } } } } },\n"
            "}\n")})
        p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
        self.assertEqual(p.returncode, 1)
        self.assertIn("20-rename.lua: test 'renames' failed", p.stderr)
        self.assertIn('expected "Something else", got "Renamed"', p.stderr)

    def test_every_shipped_rule_example_passes_its_tests_with_the_default_rules(self):
        examples = os.path.join(os.path.dirname(__file__), "..", "..", "rules", "examples")
        names = sorted(n for n in os.listdir(examples) if n.endswith(".lua"))
        self.assertGreaterEqual(len(names), 5)
        for name in names:
            with self.subTest(example=name):
                with open(os.path.join(examples, name)) as f:
                    rules = self.rules_dir({name: f.read()})
                p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn("2 rule files", p.stdout)

    def test_the_readme_worked_examples_are_the_shipped_rule_files(self):
        root = os.path.join(os.path.dirname(__file__), "..", "..")
        with open(os.path.join(root, "README.md")) as f:
            readme = f.read()
        section = readme.split("### Worked examples", 1)[1].split("\n## ", 1)[0]
        blocks = re.findall(r"\(`(50-[a-z-]+\.lua)`.*?```lua\n(.*?)```", section, re.S)
        self.assertEqual(len(blocks), 6)
        events = [event("users.messages.email.Delivery", user="u1"),
                  event("users.messages.email.Open", user="u2", dispatch_id="d", send_id="s"),
                  event("users.messages.inappmessage.Click", user="u3", platform="web"),
                  event("users.messages.email.Click", user="test-4"),
                  event("users.messages.email.Send", user="x@example.com")]
        stdin = "\n".join(json.dumps(e) for e in events)
        for name, block in blocks:
            with self.subTest(example=name):
                text = "\n".join(line[3:] for line in block.splitlines())
                with open(os.path.join(root, "rules", "examples", name)) as f:
                    shipped = f.read()
                # the file without its opening comment and its tests
                code = re.sub(r"\A(--[^\n]*\n)+", "", shipped)
                self.assertEqual(text, code.split("  tests = {", 1)[0] + "}\n")
                outputs = []
                for source in (text, shipped):
                    rules = self.rules_dir({name: source})
                    self.assertEqual(run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
                                     .returncode, 0, source)
                    for workspace in ([], ["--workspace", "brand-a"]):
                        p = run_cli(["map", "-"] + workspace, stdin=stdin,
                                    env={"TRIBUTARY_RULES_DIR": rules})
                        self.assertEqual(p.returncode, 0, p.stderr)
                        outputs.append([{k: v for k, v in json.loads(line).items()
                                         if k != "rules_version"}
                                        for line in p.stdout.splitlines()])
                self.assertEqual(outputs[:2], outputs[2:])

    def test_a_rule_test_with_bad_data_fails_cleanly_instead_of_crashing(self):
        tests = {
            "nil key in config.events": ("config = { events = { 'a', nil, 'b' } },",
                                         "must be a list of strings, without gaps"),
            "NaN key in config.events": ("config = { events = { 0/0 } },",
                                         "must be a list of strings, and item 1 is a number"),
        }
        for name, (config, why) in tests.items():
            with self.subTest(case=name):
                rules = self.rules_dir({"20-t.lua": (
                    "return { process = function(e, out) end, tests = { {\n"
                    "  " + config + "\n"
                    "  event = { event_type = 'users.messages.email.Open', id = '1', time = 1,\n"
                    "            user = { external_user_id = 'c' } },\n"
                    "  expect = { feed = 'unbound' } } } }\n")})
                p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn("20-t.lua: test #1 failed: the test's `config.events` " + why,
                              p.stderr)

    def test_a_deeply_nested_or_cyclic_expectation_fails_cleanly(self):
        rules = self.rules_dir({"20-t.lua": (
            "local deep = {}\nlocal x = deep\nfor i = 1, 60 do x.n = {} x = x.n end\n"
            "local cyc = {}\ncyc.self = cyc\n"
            "return { process = function(e, out) if out then out.event.data.self = out.event.data end end,\n"
            "  tests = {\n"
            "  { name = 'deep', event = { event_type = 'users.messages.email.Open', id = '1', time = 1,\n"
            "    user = { external_user_id = 'c' } }, expect = { event = deep } },\n"
            "  { name = 'cyclic', event = { event_type = 'users.messages.email.Open', id = '2', time = 1,\n"
            "    user = { external_user_id = 'c' } }, expect = { event = { data = cyc } } } } }\n")})
        p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("test 'deep' failed", p.stderr)
        self.assertIn("test 'cyclic' failed", p.stderr)

    def test_finalizers_are_refused_so_they_cannot_run_outside_the_limits(self):
        rules = self.rules_dir({"20-gc.lua": (
            "setmetatable({}, { __gc = function() while true do end end })\n"
            "return function(e, out) end\n")})
        p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules}, timeout=20)
        self.assertEqual(p.returncode, 1)
        self.assertIn("finalizers (__gc) are not allowed", p.stderr)

    def test_bad_environment_value_is_an_error_naming_the_variable(self):
        p = run_cli(["check"], env={"TRIBUTARY_BATCH_LINGER_MS": "soon"})
        self.assertEqual(p.returncode, 1)
        self.assertIn("TRIBUTARY_BATCH_LINGER_MS", p.stderr)

    def test_a_misspelt_environment_variable_stops_check_and_serve(self):
        # TRIBUTARY_INBOUND_TOKEN left the service without authentication
        env = {"TRIBUTARY_INBOUND_TOKEN": "token-0123456789abcdef"}
        want = ("unknown environment variable TRIBUTARY_INBOUND_TOKEN (did you mean "
                "TRIBUTARY_INBOUND_TOKENS?)")
        p = run_cli(["check"], env=env)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn(want, p.stderr)
        d, _ = self.write_file("unused", "")
        p = run_cli(["serve"], env=dict(env, TRIBUTARY_DATA_DIR=d + "/var"), timeout=30)
        self.assertEqual(p.returncode, 78, p)
        self.assertIn(want, p.stderr)
        self.assertNotIn("token-0123456789abcdef", p.stderr + p.stdout)

    def test_kubernetes_service_links_do_not_stop_check(self):
        # what Kubernetes gives every pod of a namespace with a Service named tributary
        links = {"TRIBUTARY_SERVICE_HOST": "10.96.0.12", "TRIBUTARY_SERVICE_PORT": "8080",
                 "TRIBUTARY_SERVICE_PORT_HTTP": "8080",
                 "TRIBUTARY_PORT": "tcp://10.96.0.12:8080",
                 "TRIBUTARY_PORT_8080_TCP": "tcp://10.96.0.12:8080",
                 "TRIBUTARY_PORT_8080_TCP_PROTO": "tcp", "TRIBUTARY_PORT_8080_TCP_PORT": "8080",
                 "TRIBUTARY_PORT_8080_TCP_ADDR": "10.96.0.12"}
        p = run_cli(["check"], env=links)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stderr, "")
        p = run_cli(["check"], env=dict(links, TRIBUTARY_LISTNE="0.0.0.0:8080"))
        self.assertEqual(p.returncode, 1, p)
        self.assertEqual(p.stderr.strip(), "unknown environment variable TRIBUTARY_LISTNE (did you "
                                           "mean TRIBUTARY_LISTEN?)")

    def test_the_environment_overriding_a_value_the_file_changed_is_named_not_silent(self):
        d, conf = self.write_file(
            "tributary.conf.lua",
            'return { data_dir = "/srv/from-file", batch = { linger_ms = 900 },\n'
            '         inbound = { tokens = { "file-token-0123456789abcdef" } } }\n')
        _, token_file = self.write_file("token", "env-token-0123456789abcdef\n")
        p = run_cli(["check", "--config", conf],
                    env={"TRIBUTARY_DATA_DIR": d + "/from-env",
                         "TRIBUTARY_INBOUND_TOKENS_FILE": token_file,
                         "TRIBUTARY_BATCH_LINGER_MS": "900",      # the file's own value
                         "TRIBUTARY_HTTP_THREADS": "2"})          # the file leaves it default
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("TRIBUTARY_DATA_DIR overrides data_dir of %s" % conf, p.stderr)
        self.assertIn("TRIBUTARY_INBOUND_TOKENS_FILE overrides inbound.tokens of %s" % conf,
                      p.stderr)
        self.assertNotIn("linger_ms", p.stderr)
        self.assertNotIn("http.threads", p.stderr)
        self.assertNotIn("token-0123456789abcdef", p.stderr)

    def test_an_empty_variable_does_not_remove_the_files_secrets(self):
        # a template's TRIBUTARY_INBOUND_TOKENS= left the service without its
        # tokens, with a warning only
        d, conf = self.write_file(
            "tributary.conf.lua",
            'return { inbound = { tokens = { "file-token-0123456789abcdef" } },\n'
            '         feeds = { ios = { key = "ios-key", secret = "ios-secret" } } }\n')
        os.chmod(conf, 0o600)
        for var, key in (("TRIBUTARY_INBOUND_TOKENS", "inbound.tokens"),
                         ("TRIBUTARY_FEEDS_IOS_KEY", "feeds.ios.key")):
            for value in ("", " , "):
                p = run_cli(["check", "--config", conf], env={var: value})
                self.assertEqual(p.returncode, 1, p)
                self.assertIn("%s is empty, and would remove %s of %s" % (var, key, conf),
                              p.stderr)
        # without the file's value, an empty variable changes nothing
        _, bare = self.write_file("bare.conf.lua", "return {}\n")
        p = run_cli(["check", "--config", bare], env={"TRIBUTARY_INBOUND_TOKENS": ""})
        self.assertEqual(p.returncode, 0, p.stderr)


class DeadLetterCommands(ServiceTest):
    FAILING_RULE = {"20-fail.lua": "return function(e) error('nope') end\n"}

    def dead_letters(self, count, blob_bytes=100):
        """A service whose rules fail for every event, and `count` events it put
        in the dead-letter store (reason rule_error); returns (service, ids)."""
        s = self.service(rules_dir=self.rules_dir(self.FAILING_RULE))
        ids = []
        while len(ids) < count:
            events = [event("users.messages.email.Send", user="u%d" % (len(ids) + i),
                            blob="x" * blob_bytes)
                      for i in range(min(5000, count - len(ids)))]
            self.assertEqual(s.post(events).status, 200)
            ids += [e["id"] for e in events]
        return s, ids

    @unittest.skipIf(WRAPPER, "the fault shim is preloaded into the binary, not into valgrind")
    def test_a_requeue_beside_the_service_does_not_stop_on_ctrl_z(self):
        # stopped inside its write, it held the queue's lock: every request
        # to the service waited 10 s and got 503 until the command went on
        s, ids = self.dead_letters(3)
        mark = os.path.join(self.tmpdir(), "syncing")
        env = clean_env(dict(s.env, SLOW_SYNC_MS="1000", SLOW_SYNC_MARK=mark,
                             **preload_env("slow_sync")))
        config = ["--config", s.config] if s.config else []
        p = subprocess.Popen([BIN, "dlq", "requeue", "--all"] + config, env=env, cwd=s.dir,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and (p.send_signal(signal.SIGCONT), p.kill()))
        self.wait(lambda: os.path.exists(mark), 30, "the command's first sync")
        p.send_signal(signal.SIGTSTP)  # inside its write
        out, err = p.communicate(timeout=30 * SLOW)
        self.assertEqual(tool_errors(err), [])
        self.assertEqual(p.returncode, 0, err)
        self.assertIn("requeued 3 events", out)
        self.assertEqual(s.post([event()]).status, 200)

    def test_requeue_routes_as_the_service_or_says_why_not(self):
        s = self.service(rules_dir=self.rules_dir(self.FAILING_RULE),
                         env={"TRIBUTARY_FEEDS_UNBOUND_KEY": "requeue-key-1",
                              "TRIBUTARY_FEEDS_UNBOUND_SECRET": "requeue-secret-1",
                              "TRIBUTARY_MPARTICLE_URL": "http://127.0.0.1:9"})
        ios = event("users.messages.pushnotification.Send", user="r1", platform="ios")
        self.assertEqual(s.post([ios]).status, 200)

        def feeds_without_credentials():
            with s.db() as db:
                return db.execute("SELECT count(*) FROM feed_state WHERE reason = ?",
                                  ("no credentials configured",)).fetchone()[0]
        # the service records them shortly after its start (slowly under valgrind)
        self.wait(lambda: feeds_without_credentials() == 3, what="the feeds without credentials")
        s.stop()
        env = {k: v for k, v in s.env.items() if not k.startswith("TRIBUTARY_FEEDS_")}
        env["TRIBUTARY_RULES_DIR"] = RULES
        # without the service's credentials, the ios event would be held on ios
        p = run_cli(["dlq", "requeue", "--all"], env=env, cwd=s.dir)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("the service has credentials for unbound, this command for none", p.stderr)
        self.assertEqual(s.queued_ids(), [])
        # with them it goes where the service sends it: unbound, which has them
        p = run_cli(["dlq", "requeue", "--all"], env=dict(s.env, TRIBUTARY_RULES_DIR=RULES),
                    cwd=s.dir)
        self.assertEqual(p.returncode, 0, p.stderr)
        with s.db() as db:
            self.assertEqual(db.execute("SELECT count(*) FROM records_unbound").fetchone()[0], 1)
        # --force routes with what the command sees
        self.assertEqual(run_cli(["dlq", "requeue", "--all", "--force"], env=env,
                                 cwd=s.dir).returncode, 0)

    def test_show_writes_an_event_with_raw_control_bytes_as_json_any_reader_takes(self):
        # lua-cjson accepts a raw TAB, ESC or a byte that is not UTF-8 inside a
        # string; the event is kept as received, and shown as valid JSON
        s = self.service(rules_dir=self.rules_dir(self.FAILING_RULE))
        e = event("users.messages.email.Send", user="raw-bytes", note="PLACEHOLDER")
        body = json.dumps({"events": [e]}).encode().replace(
            b"PLACEHOLDER", b"tab\there \x1b[2J and \xff")
        self.assertEqual(s.post(body=body).status, 200)
        [row] = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        p = s.cli(["dlq", "show", str(row["id"]), "--json"])
        self.assertEqual(p.returncode, 0, p.stderr)
        shown = json.loads(p.stdout)
        self.assertEqual(shown["raw"]["properties"]["note"], "tab\there \x1b[2J and \ufffd")
        text = s.cli(["dlq", "show", str(row["id"])]).stdout
        self.assertNotIn("\x1b", text)
        self.assertIn("\\u001b[2J", text)

    def test_show_writes_numbers_only_a_lenient_reader_takes_as_json_any_reader_takes(self):
        # lua-cjson reads numbers with strtod, which takes a decimal point with
        # no digit on one side; the event is kept as received, and shown as
        # valid JSON with the same values
        s = self.service(rules_dir=self.rules_dir(self.FAILING_RULE))
        lenient = {"a": "1.", "b": "-.5", "c": "1.e3", "d": "-2.E-1", "e": "0.e0", "f": "-.0"}
        e = event("users.messages.email.Send", user="numbers", note='a "1." and -.5 in a string',
                  valid=[1.5, -0.25, 7, 1e3], **{k: "N-" + k for k in lenient})
        body = json.dumps({"events": [e]})
        for k, number in lenient.items():
            body = body.replace('"N-%s"' % k, number)
        self.assertEqual(s.post(body=body.encode()).status, 200)
        [row] = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        p = s.cli(["dlq", "show", str(row["id"]), "--json"])
        self.assertEqual(p.returncode, 0, p.stderr)
        properties = json.loads(p.stdout)["raw"]["properties"]
        for k, number in lenient.items():
            self.assertEqual(properties[k], float(number), k)
        self.assertEqual(properties["note"], 'a "1." and -.5 in a string')
        # valid numbers are written as they came
        self.assertIn('"valid": [1.5, -0.25, 7, 1000.0]', p.stdout)
        text = s.cli(["dlq", "show", str(row["id"])]).stdout
        [shown] = [line for line in text.splitlines() if line.startswith("braze event:")]
        self.assertEqual(json.loads(shown[len("braze event:"):])["properties"], properties)
        self.assertIn('"a": 1.0, "b": -0.5, "c": 1.0e3, "d": -2.0E-1, "e": 0.0e0, "f": -0.0',
                      text)
        # the store keeps the event as received, for requeue to read again
        with s.db() as db:
            [raw] = db.execute("SELECT raw FROM dead").fetchone()
        self.assertIn('"a": 1., "b": -.5, "c": 1.e3', raw)

    def test_a_read_that_fails_after_the_queue_opened_names_its_cause(self):
        # short of descriptors, a command opens the queue and then fails to
        # open the reader it reads with, at each open-file limit up to the one
        # it runs with
        if WRAPPER or SANITIZED:
            self.skipTest("the tool around the binary needs descriptors of its own")
        s, _ = self.dead_letters(1)
        self.assertEqual(s.stop(), 0)
        [row] = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        unread = []
        for args in (["queue", "stats"], ["dlq", "list"], ["dlq", "show", str(row["id"])],
                     ["dlq", "requeue", "--all"]):
            for limit in range(3, 64):
                p = subprocess.run(
                    [BIN] + args, env=clean_env(s.env), cwd=s.dir, capture_output=True, text=True,
                    preexec_fn=lambda n=limit: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
                if p.returncode == 0:
                    break
                unread += [(args, limit, line) for line in p.stderr.splitlines()
                           if line.startswith("tributary: cannot read the ")]
            self.assertEqual(p.returncode, 0, p)
        self.assertEqual({tuple(args) for args, _, _ in unread},
                         {("queue", "stats"), ("dlq", "list"), ("dlq", "show", str(row["id"])),
                          ("dlq", "requeue", "--all")})
        for args, limit, line in unread:
            self.assertRegex(line, r"^tributary: cannot read the (queue|dead-letter store): "
                             r"(.*/queue\.db: )?unable to open database file"
                             r"( \(Too many open files\))?$", (args, limit))

    def test_a_damaged_dead_letter_store_is_named_as_the_cause_of_a_failed_read(self):
        s, _ = self.dead_letters(1, blob_bytes=50000)
        self.assertEqual(s.stop(), 0)
        with s.db() as db:
            [[page_size]] = db.execute("PRAGMA page_size").fetchall()
            # the pages that hold the rest of the dead letter's Braze event
            pages = [p for [p] in db.execute("SELECT pageno FROM dbstat "
                                             "WHERE name = 'dead' AND pagetype = 'overflow'")]
        self.assertTrue(pages)
        with open(os.path.join(s.data_dir, "queue.db"), "r+b") as f:
            f.seek((pages[0] - 1) * page_size)
            f.write(b"\xff" * page_size)
        for args in (["dlq", "list"], ["dlq", "show", "1"], ["dlq", "requeue", "--all"]):
            p = s.cli(args)
            self.assertEqual(p.returncode, 1, p)
            self.assertIn("tributary: cannot read the dead-letter store: database disk image is "
                          "malformed", p.stderr)

    def test_list_and_show_write_no_control_sequence_from_stored_text_to_a_terminal(self):
        # whoever can post an event (or answer for mParticle) chooses these bytes
        rule = {"20-fail.lua": "return function(e) error(e.properties.note, 0) end\n"}
        s = self.service(rules_dir=self.rules_dir(rule))
        e = event("users.messages.email.Send", user="terminal", note="PLACEHOLDER")
        e["id"] = "ID-PLACEHOLDER"
        body = json.dumps({"events": [e]}).encode().replace(
            b"ID-PLACEHOLDER", b"id\x1b]0;title\x07-1").replace(
            b"PLACEHOLDER", b"line\nend \x1b[2J csi \xc2\x9b31m bad \xff rtl \xe2\x80\xae done")
        self.assertEqual(s.post(body=body).status, 200)
        [row] = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        listed = s.cli(["dlq", "list"]).stdout
        shown = s.cli(["dlq", "show", str(row["id"])]).stdout
        for text in (listed, shown):
            self.assertIsNone(re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), repr(text))
            self.assertIn("id?]0;title?-1", text)
            self.assertNotIn("\u202e", text)
        self.assertIn("line end ?[2J csi ??31m bad ? rtl ??? done", listed)
        self.assertIn("line end ?[2J csi ??31m bad ? rtl ??? done", shown)
        self.assertEqual(len(listed.splitlines()), 2, listed)
        self.assertIn('"note": "line\\u000aend \\u001b[2J csi \\u009b31m bad \ufffd rtl \\u202e done"',
                      shown)
        # --json keeps what was stored, escaped
        self.assertEqual(row["event_id"], "id\x1b]0;title\x07-1")

    def test_requeue_queues_an_event_with_an_events_field_of_its_own_as_itself(self):
        # Braze's fields beyond the documented ones are accepted and kept: an
        # "events" field must not make the stored event read as an envelope
        s = self.service(rules_dir=self.rules_dir(self.FAILING_RULE))
        inner = event("users.messages.email.Send", user="someone-else")
        own = [event("users.messages.email.Send", user="own-%d" % i) for i in range(3)]
        for e, value in zip(own, [[], "x", [inner]]):
            e["events"] = value
        self.assertEqual(s.post(own).status, 200)
        self.assertEqual(len(json.loads(s.cli(["dlq", "list", "--json"]).stdout)), 3)
        s.env["TRIBUTARY_RULES_DIR"] = RULES  # the rule is fixed
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("3 queued for delivery", p.stdout)
        self.assertEqual(sorted(s.queued_ids()), sorted(e["id"] for e in own))
        self.assertEqual(json.loads(s.cli(["dlq", "list", "--json"]).stdout), [])

    def test_requeue_of_more_dead_letters_than_a_page_queues_each_exactly_once(self):
        count = 2 * REQUEUE_PAGE + REQUEUE_PAGE // 2
        s, ids = self.dead_letters(count)
        s.env["TRIBUTARY_RULES_DIR"] = RULES  # the rule is fixed
        p = s.cli(["dlq", "requeue", "--reason", "rule_error"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("requeued %d events" % count, p.stdout)
        self.assertIn("%d queued for delivery, 0 dropped by the rules, 0 dead-lettered again"
                      % count, p.stdout)
        self.assertEqual(sorted(s.queued_ids()), sorted(ids))
        self.assertEqual(json.loads(s.cli(["dlq", "list", "--json"]).stdout), [])

    def test_two_requeues_at_once_queue_each_dead_letter_exactly_once(self):
        # each read a page before the other deleted it, and queued it again
        count = 6 * REQUEUE_PAGE
        s, ids = self.dead_letters(count)
        s.env["TRIBUTARY_RULES_DIR"] = RULES
        results = [None, None]

        def requeue(i):
            results[i] = s.cli(["dlq", "requeue", "--all", "--json"], timeout=120)
        threads = [threading.Thread(target=requeue, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in results:
            self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(sum(json.loads(p.stdout)["forwarded"] for p in results), count)
        queued = s.queued_ids()
        self.assertEqual(len(queued), count)
        self.assertEqual(sorted(queued), sorted(ids))
        self.assertEqual(json.loads(s.cli(["dlq", "list", "--json"]).stdout), [])

    def test_two_requeues_of_one_dead_letter_at_once_queue_it_once_and_one_says_so(self):
        s, ids = self.dead_letters(5)
        s.env["TRIBUTARY_RULES_DIR"] = RULES
        for letter in json.loads(s.cli(["dlq", "list", "--json"]).stdout):
            results = [None, None]

            def requeue(i):
                results[i] = s.cli(["dlq", "requeue", str(letter["id"])])
            threads = [threading.Thread(target=requeue, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(sorted(p.returncode for p in results), [0, 1], results)
            loser = [p for p in results if p.returncode == 1][0]
            # gone when it looked, or taken between its read and its commit
            self.assertRegex(loser.stderr, r"no matching dead letters|dead letter %d was "
                             r"requeued or purged by another command meanwhile" % letter["id"])
        self.assertEqual(sorted(s.queued_ids()), sorted(ids))

    def test_requeue_of_dead_letters_larger_than_a_page_in_bytes_queues_each_exactly_once(self):
        blob_bytes = 1536 * 1024
        count = REQUEUE_PAGE_BYTES // blob_bytes + 2  # 7 events, 10.5 MiB
        s, ids = self.dead_letters(count, blob_bytes)
        s.env["TRIBUTARY_RULES_DIR"] = RULES
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("%d queued for delivery" % count, p.stdout)
        self.assertEqual(sorted(s.queued_ids()), sorted(ids))
        self.assertEqual(json.loads(s.cli(["dlq", "list", "--json"]).stdout), [])

    def test_requeue_refuses_rules_whose_tests_fail(self):
        s, ids = self.dead_letters(3)
        s.env["TRIBUTARY_RULES_DIR"] = self.rules_dir({"50-tested.lua": (
            "return { process = function(e, out) end, tests = {\n"
            "  { name = 'always wrong', event = { event_type = 'users.messages.email.Open',\n"
            "    id = '1', time = 1, user = { external_user_id = 'c' } },\n"
            "    expect = { feed = 'ios' } } } }\n")})
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 1)
        self.assertIn("fail their tests", p.stderr)
        self.assertIn("test 'always wrong' failed", p.stderr)
        self.assertEqual(s.queued_ids(), [])
        dead = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        self.assertEqual(sorted(d["event_id"] for d in dead), sorted(ids))

    def test_requeue_keeps_the_queue_bounds_of_the_service(self):
        s, ids = self.dead_letters(2 * REQUEUE_PAGE + 100)
        s.env["TRIBUTARY_RULES_DIR"] = RULES  # the rule is fixed
        # the reserve of the disk: nothing is requeued
        s.env["TRIBUTARY_QUEUE_MIN_FREE_MB"] = str(1 << 29)
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("the disk of data_dir is full, or has less free than queue.min_free_mb",
                      p.stderr)
        self.assertIn("nothing was requeued, the dead letters are still in the store", p.stderr)
        self.assertNotIn("refusing new events", p.stderr)  # the service's words
        self.assertEqual(s.queued_ids(), [])
        # purge frees the disk: the reserve neither stops it nor is said
        p = s.cli(["dlq", "purge", "--older-than", "7d", "--reason", "max_age"])
        self.assertEqual((p.returncode, p.stderr), (0, ""), p)
        del s.env["TRIBUTARY_QUEUE_MIN_FREE_MB"]
        # queue.max_depth: as many as it has room for are requeued, the rest stay
        depth = REQUEUE_PAGE + 100
        s.env.update(TRIBUTARY_INBOUND_MAX_EVENTS="100", TRIBUTARY_QUEUE_MAX_DEPTH=str(depth))
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("the queue would hold more than queue.max_depth (%d)" % depth, p.stderr)
        self.assertIn("the %d requeued up to there are committed" % depth, p.stderr)
        self.assertEqual(sorted(s.queued_ids()), sorted(ids[:depth]))
        dead = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        self.assertEqual(sorted(d["event_id"] for d in dead), sorted(ids[depth:]))

    def test_requeue_ends_when_the_rules_dead_letter_every_event_again(self):
        count = 2 * REQUEUE_PAGE + REQUEUE_PAGE // 2
        s, ids = self.dead_letters(count)
        p = s.cli(["dlq", "requeue", "--all", "--json"], timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["dead_lettered_again"], count)
        dead = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
        self.assertEqual(sorted(d["event_id"] for d in dead), sorted(ids))
        self.assertEqual(s.queued_ids(), [])

    @unittest.skipIf(WRAPPER or SANITIZED, "measures the binary's own memory")
    @unittest.skipUnless(os.access(TIME, os.X_OK), "needs GNU time")
    def test_requeue_peak_memory_does_not_grow_with_the_number_of_dead_letters(self):
        blob_bytes = 2000
        peak = {}
        for count in (6 * REQUEUE_PAGE, 24 * REQUEUE_PAGE):
            s, ids = self.dead_letters(count, blob_bytes)
            s.stop()
            env = dict(s.env, TRIBUTARY_RULES_DIR=RULES)
            p, peak[count] = run_cli_peak_rss(["dlq", "requeue", "--all"], env=env, cwd=s.dir)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("%d queued for delivery" % count, p.stdout)
        # 18 pages more Braze events, 18 * 500 * 2 KB = 18 MB, may not show in
        # the peak: a third of it is the margin (caches, allocator).
        extra_kib = (24 - 6) * REQUEUE_PAGE * blob_bytes // 1024
        self.assertLess(peak[24 * REQUEUE_PAGE] - peak[6 * REQUEUE_PAGE], extra_kib // 3,
                        "peak KiB by dead letters: %r" % peak)

    def test_the_service_gauge_follows_a_purge_while_no_request_comes(self):
        s, ids = self.dead_letters(3)
        self.assertEqual(s.metrics()["tributary_dead_letters"], 3)
        time.sleep(1.1)
        p = s.cli(["dlq", "purge", "--older-than", "1s"])
        self.assertIn("purged 3 dead letters", p.stdout)
        deadline = time.time() + 5 * SLOW
        while s.metrics()["tributary_dead_letters"] != 0 and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(s.metrics()["tributary_dead_letters"], 0)
        # and the service's log says what the command changed
        lines = [l for l in s.logs().splitlines() if "counts changed by a command beside" in l]
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertIn("dead_letters=-3", lines[0])
        self.assertIn("unbound=0", lines[0])
        self.assertIn("removed=3", lines[0])
        m = s.metrics()
        self.assertEqual(m["tributary_dead_letters_removed_total"], 3)
        self.assertEqual(m["tributary_events_requeued_total"], 0)

    def test_counts_of_a_command_that_do_not_add_up_are_said_and_left_out(self):
        # what no dlq requeue or purge writes: events taken out of a feed
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        with s.db() as db:
            db.execute("INSERT INTO count_deltas(ios, android, web, unbound, dead) "
                       "VALUES (0, 0, 0, -1, 1)")
        self.wait(lambda: "do not add up" in s.logs(), what="the error line")
        m = s.metrics()
        self.assertEqual(m["tributary_events_requeued_total"], 0)
        self.assertEqual(m["tributary_dead_letters_removed_total"], 0)
        self.assertEqual(m["tributary_dead_letters"], 1)

    def test_a_requeue_beside_the_service_is_in_its_counts(self):
        # the events the rules dropped left the store with no count of the
        # service, and those queued were in none of its counters of queued
        s = self.service(rules_dir=self.rules_dir(self.FAILING_RULE))
        kept = [event("users.messages.email.Send", user="u%d" % i) for i in range(4)]
        marked = [event("users.messages.email.Send", user="v%d" % i, drop_me="yes")
                  for i in range(3)]
        self.assertEqual(s.post(kept + marked).status, 200)
        self.assertEqual(s.metrics()["tributary_dead_letters"], 7)
        # fixed, and the marked are dropped
        s.env["TRIBUTARY_RULES_DIR"] = self.rules_dir({"90-drop.lua": (
            "return function(e, out)\n"
            "  if e.properties.drop_me then return false, 'marked' end\n"
            "end\n")})
        p = s.cli(["dlq", "requeue", "--all"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("4 queued for delivery, 3 dropped by the rules", p.stdout)
        self.wait(lambda: s.metrics()["tributary_dead_letters"] == 0, what="the service's count")
        m = s.metrics()
        self.assertEqual(m["tributary_events_requeued_total"], 4)
        self.assertEqual(m["tributary_dead_letters_removed_total"], 3)
        self.assertEqual(m["tributary_events_queued_total"], 0)
        lines = [l for l in s.logs().splitlines() if "counts changed by a command beside" in l]
        self.assertEqual(len(lines), 1, lines)
        for part in ("dead_letters=-7", "requeued=4", "removed=3", "unbound=4"):
            self.assertIn(part, lines[0])

    def test_purge_over_several_pages_deletes_exactly_the_matching_dead_letters(self):
        s, ids = self.dead_letters(1)
        s.stop()
        now_ms = int(time.time() * 1000)
        db = sqlite3.connect(os.path.join(s.data_dir, "queue.db"))
        rows = []
        for i in range(2 * PURGE_PAGE + 700):
            reason = ("max_age", "rule_error", "max_age")[i % 3]
            at_ms = now_ms - (3 if i % 7 else 0) * 86400 * 1000   # every 7th is recent
            rows.append((at_ms, reason, "detail", "e-%d" % i, "users.messages.email.Send", "v1",
                         "{}"))
        db.executemany("INSERT INTO dead(at_ms, reason, detail, event_id, event_type, "
                       "rules_version, raw) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.commit()
        before = db.execute("SELECT id, reason, at_ms FROM dead").fetchall()
        db.close()
        cutoff = now_ms - 86400 * 1000
        kept = sorted(i for i, reason, at in before if reason != "max_age" or at >= cutoff)
        p = run_cli(["dlq", "purge", "--older-than", "1d", "--reason", "max_age"], env=s.env,
                    cwd=s.dir)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("purged %d dead letters" % (len(before) - len(kept)), p.stdout)
        db = sqlite3.connect(os.path.join(s.data_dir, "queue.db"))
        self.addCleanup(db.close)
        self.assertEqual(sorted(r[0] for r in db.execute("SELECT id FROM dead")), kept)

    def test_purge_older_than_a_duration_beyond_the_epoch_purges_nothing(self):
        s, ids = self.dead_letters(1)
        # seconds * 1000 overflows int64 for each of these
        for duration in ("9223372036854775807s", "150000000000d", "300000000000d",
                         "15250284452471w"):
            with self.subTest(duration=duration):
                p = s.cli(["dlq", "purge", "--older-than", duration])
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn("purged 0 dead letters", p.stdout)
                dead = json.loads(s.cli(["dlq", "list", "--json"]).stdout)
                self.assertEqual([d["event_id"] for d in dead], ids)

    def test_purge_duration_beyond_64_bit_seconds_is_a_usage_error(self):
        s, ids = self.dead_letters(1)
        p = s.cli(["dlq", "purge", "--older-than", "9223372036854775808s"])
        self.assertEqual(p.returncode, 2)
        self.assertIn("--older-than DURATION", p.stderr)
        self.assertEqual(len(json.loads(s.cli(["dlq", "list", "--json"]).stdout)), 1)

    def test_a_command_beside_a_long_read_does_not_hold_up_the_service(self):
        s = self.service()
        self.assertEqual(s.post([event("users.messages.email.Send")]).status, 200)
        # a long read of the queue, as a paged `dlq list` in a terminal
        reader = sqlite3.connect(os.path.join(s.data_dir, "queue.db"), isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM dead").fetchone()
        self.assertEqual(s.post([event("users.messages.email.Send")]).status, 200)
        done = []
        cli = threading.Thread(target=lambda: done.append(
            s.cli(["dlq", "purge", "--older-than", "30d"]).returncode))
        cli.start()
        time.sleep(0.3)
        took = []
        for _ in range(3):
            started = time.time()
            self.assertEqual(s.post([event("users.messages.email.Send")]).status, 200)
            took.append(time.time() - started)
        cli.join()
        reader.execute("COMMIT")
        self.assertEqual(done, [0])
        self.assertLess(max(took), 3.0, "requests waited for the command's checkpoint: %s" % took)
