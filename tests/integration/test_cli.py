"""The command line: check, --help, --version, errors that name file and line."""

import os
import unittest

from harness import ServiceTest, run_cli


class Cli(ServiceTest):
    def test_version_and_help(self):
        p = run_cli(["--version"])
        self.assertEqual(p.returncode, 0)
        self.assertRegex(p.stdout, r"^tributary \d+\.\d+\.\d+")
        p = run_cli(["--help"])
        self.assertEqual(p.returncode, 0)
        for command in ("serve", "check", "map"):
            self.assertIn(command, p.stdout)

    def test_unknown_command_is_a_usage_error(self):
        p = run_cli(["frobnicate"])
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown command", p.stderr)

    def test_check_passes_on_the_shipped_configuration_and_rules(self):
        p = run_cli(["check", "--config", "tributary.conf.lua"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"ok: .* rule tests? passed, rules version [0-9a-f]{12}")

    def test_check_names_file_and_line_of_a_rule_syntax_error(self):
        rules = self.rules_dir({"20-broken.lua": "return function(e, out)\n  if then\nend\n"})
        p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
        self.assertEqual(p.returncode, 1)
        self.assertIn("20-broken.lua:2:", p.stderr)

    def test_check_names_file_and_line_of_an_unknown_config_key(self):
        d = self.tmpdir()
        conf = os.path.join(d, "c.lua")
        with open(conf, "w") as f:
            f.write("return {\n  batch = {\n    lingr_ms = 5,\n  },\n}\n")
        p = run_cli(["check", "--config", conf])
        self.assertEqual(p.returncode, 1)
        self.assertIn("c.lua:3: unknown key 'batch.lingr_ms'", p.stderr)

    def test_check_reports_a_wrong_type_without_echoing_secrets(self):
        d = self.tmpdir()
        conf = os.path.join(d, "c.lua")
        with open(conf, "w") as f:
            f.write('return { feeds = { ios = { key = "super-secret-key-value" } } }\n')
        p = run_cli(["check", "--config", conf])
        self.assertEqual(p.returncode, 1)
        self.assertIn("feeds.ios", p.stderr)
        self.assertNotIn("super-secret-key-value", p.stderr + p.stdout)

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

    def test_a_rule_test_with_bad_data_fails_cleanly_instead_of_crashing(self):
        tests = {
            "nil key in config.events": "config = { events = { 'a', nil, 'b' } },",
            "NaN key in config.events": "config = { events = { 0/0 } },",
        }
        for name, config in tests.items():
            with self.subTest(case=name):
                rules = self.rules_dir({"20-t.lua": (
                    "return { process = function(e, out) end, tests = { {\n"
                    "  " + config + "\n"
                    "  event = { event_type = 'users.messages.email.Open', id = '1', time = 1,\n"
                    "            user = { external_user_id = 'c' } },\n"
                    "  expect = { feed = 'unbound' } } } }\n")})
                p = run_cli(["check"], env={"TRIBUTARY_RULES_DIR": rules})
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn("20-t.lua: test #1 cannot run", p.stderr)

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
