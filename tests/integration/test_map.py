"""`tributary map` with the shipped rules against event-map.md."""

import json
import os
import shutil
import tempfile
import unittest

from harness import DATA, RULES, event, load_event_map, run_cli

EVENT_MAP = load_event_map()


def map_events(events, env=None, as_ndjson=True, config=None, cwd=None):
    """Runs map on the events; returns the parsed output lines."""
    if as_ndjson:
        stdin = "\n".join(json.dumps(e) for e in events) + "\n"
    else:
        stdin = json.dumps({"events": events})
    args = ["map", "-"]
    if config:
        args += ["--config", config]
    p = run_cli(args, env=env, stdin=stdin, cwd=cwd)
    if p.returncode != 0:
        raise AssertionError("map failed (%d): %s" % (p.returncode, p.stderr))
    return [json.loads(line) for line in p.stdout.splitlines()]


class EventTypes(unittest.TestCase):
    def test_reference_table_has_54_event_types(self):
        self.assertEqual(len(EVENT_MAP), 54)

    def test_all_54_event_types_map_to_their_mparticle_event(self):
        events = []
        for i, (braze, _, _) in enumerate(EVENT_MAP):
            events.append(event(braze, user="customer-%d" % i, id="id-%d" % i,
                                time_s=1732800000 + i, campaign_id="camp-%d" % i))
        out = map_events(events)
        self.assertEqual(len(out), 54)
        for (braze, name, kind), line, e in zip(EVENT_MAP, out, events):
            with self.subTest(event_type=braze):
                self.assertEqual(line["event_type"], braze)
                self.assertIn("batch", line, line)
                batch = line["batch"]
                self.assertEqual(batch["schema_version"], 2)
                self.assertEqual(batch["environment"], "production")
                self.assertNotIn("batch_id", batch)
                self.assertRegex(batch["source_request_id"],
                                 r"^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
                self.assertEqual(batch["user_identities"]["customer_id"], e["user"]["external_user_id"])
                self.assertEqual(len(batch["events"]), 1)
                mp = batch["events"][0]
                self.assertEqual(mp["event_type"], kind)
                data = mp["data"]
                if kind == "custom_event":
                    self.assertEqual(data["event_name"], name)
                    self.assertEqual(data["custom_event_type"], "other")
                else:
                    self.assertNotIn("event_name", data)
                self.assertEqual(data["timestamp_unixtime_ms"], e["time"] * 1000)
                self.assertEqual(data["source_message_id"], e["id"])
                self.assertEqual(data["custom_attributes"]["campaign_id"], e["properties"]["campaign_id"])
                # no platform, no app: unbound, and no device_info.platform
                self.assertEqual(line["feed"], "unbound")
                self.assertNotIn("platform", batch.get("device_info", {}))

    def test_other_event_types_are_filtered_not_rejected(self):
        out = map_events([event("users.behaviors.CustomEvent"), event("users.behaviors.Purchase"),
                          event("users.messages.email.Deferral"), event("users.future.Thing")])
        self.assertEqual([o["dropped"] for o in out], ["unsupported_type"] * 4)
        # the file that dropped each: a drop ends the chain, later files do not see it
        self.assertEqual([o["rule"] for o in out], ["10-mparticle.lua"] * 4)

    def test_braze_doc_spellings_select_the_abort_events(self):
        env = {"TRIBUTARY_EVENTS": "users_campaigns_abort,users_canvas_abort"}
        out = map_events([event("users.campaigns.Abort"), event("users.canvas.Abort"),
                          event("users.canvas.Entry")], env=env)
        self.assertIn("batch", out[0])
        self.assertIn("batch", out[1])
        self.assertEqual(out[2]["dropped"], "not_selected")


class Users(unittest.TestCase):
    def test_user_without_external_id_is_skipped(self):
        absent = event(user=None)
        null = event()
        null["user"]["external_user_id"] = None
        empty = event(user="")
        # true was forwarded as the customer id "true", one customer for all
        boolean = event()
        boolean["user"]["external_user_id"] = True
        listed = event()
        listed["user"]["external_user_id"] = ["c-1"]
        out = map_events([absent, null, empty, boolean, listed])
        self.assertEqual([o["dropped"] for o in out], ["no_external_id"] * 5)
        number = event()
        number["user"]["external_user_id"] = 12345
        out = map_events([number])[0]
        self.assertEqual(out["batch"]["user_identities"]["customer_id"], "12345")

    def test_a_numeric_external_id_without_exact_text_is_a_dead_letter(self):
        # read as a float, 9007199254740993 would be written 9007199254740992:
        # another user's id
        events = []
        for value in (9007199254740993, 12345678901234567890, 12.5, -9007199254740992):
            e = event()
            e["user"]["external_user_id"] = value
            events.append(e)
        exact = event()
        exact["user"]["external_user_id"] = 9007199254740991
        out = map_events(events + [exact])
        for line in out[:-1]:
            self.assertEqual(line.get("dead_letter"), "rule_error", line)
            self.assertIn("external_user_id is a number that has no exact text", line["detail"])
        self.assertEqual(out[-1]["batch"]["user_identities"]["customer_id"], "9007199254740991")

    def test_text_that_is_not_utf8_never_makes_two_users_or_two_names_one(self):
        # a byte that is not UTF-8 is written as U+FFFD: "u\xff" and "u\xfe"
        # would both be the customer "u\ufffd", and the names "a\xff" and
        # "a\xfe" one name twice in the same JSON object
        def raw(user, props):
            e = event(user="placeholder")
            del e["properties"]
            text = json.dumps(e).replace('"placeholder"', '"@USER@"')
            text = text[:-1] + ', "properties": @PROPS@}'
            return text.encode().replace(b"@USER@", user).replace(b"@PROPS@", props)

        body = b"\n".join([
            raw(b"u\xff", b"{}"),
            raw(b"u-1", b'{"a\xff": 1, "a\xfe": 2, "a\xef\xbf\xbd": 3, "b": 4}'),
        ]) + b"\n"
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(body)
            f.flush()
            p = run_cli(["map", f.name])
        self.assertEqual(p.returncode, 0, p.stderr)

        def unique(pairs):
            names = [k for k, _ in pairs]
            self.assertEqual(len(names), len(set(names)), names)
            return dict(pairs)

        out = [json.loads(line, object_pairs_hook=unique) for line in p.stdout.splitlines()]
        self.assertEqual(out[0].get("dead_letter"), "invalid_output", out[0])
        self.assertIn("user_identities.customer_id: not UTF-8 text", out[0]["detail"])
        attrs = out[1]["batch"]["events"][0]["data"]["custom_attributes"]
        # the first by its bytes: "a\xef\xbf\xbd" is before "a\xfe" and "a\xff"
        self.assertEqual(attrs["a\ufffd"], 3)
        self.assertEqual(attrs["b"], 4)

    def test_internal_ids_timezone_and_os_version_are_not_forwarded(self):
        e = event("users.messages.pushnotification.Send", platform="android", os_version="14")
        out = map_events([e])[0]
        text = json.dumps(out["batch"])
        self.assertNotIn("5f8a9b0c1d2e3f4a5b6c7d8e", text)
        self.assertNotIn("Europe/Berlin", text)
        self.assertNotIn("os_version", text)


class Feeds(unittest.TestCase):
    def feed_of(self, env=None, config=None, cwd=None, **props):
        e = event("users.messages.pushnotification.Send", **props)
        return map_events([e], env=env, config=config, cwd=cwd)[0]

    def test_platform_decides_the_feed(self):
        expected = {"ios": ("ios", "iOS"), "tvos": ("ios", "iOS"), "android": ("android", "Android"),
                    "kindle": ("android", "Android"), "web": ("web", "web"), "roku": ("unbound", None)}
        for platform, (feed, device_platform) in expected.items():
            with self.subTest(platform=platform):
                out = self.feed_of(platform=platform)
                self.assertEqual(out["feed"], feed)
                self.assertEqual(out["batch"].get("device_info", {}).get("platform"), device_platform)

    def test_app_table_routes_events_without_platform(self):
        d = tempfile.mkdtemp(prefix="tributary-it-")
        self.addCleanup(shutil.rmtree, d, True)
        conf = os.path.join(d, "apps.conf.lua")
        with open(conf, "w") as f:
            f.write('return { apps = { ["app-ios"] = "ios", ["app-web"] = "web" } }\n')
        e1 = event("users.behaviors.Uninstall", app_id="app-ios")
        e2 = event("users.messages.inappmessage.Click", app_id="app-web")
        e3 = event("users.behaviors.Uninstall", app_id="app-unknown")
        out = map_events([e1, e2, e3], config=conf)
        self.assertEqual([o["feed"] for o in out], ["ios", "web", "unbound"])
        self.assertEqual(out[0]["batch"]["events"][0]["event_type"], "uninstall")
        self.assertEqual(out[0]["batch"]["device_info"]["platform"], "iOS")

    def test_platform_without_credentials_falls_back_to_unbound_when_unbound_has_them(self):
        env = {"TRIBUTARY_FEEDS_UNBOUND_KEY": "k", "TRIBUTARY_FEEDS_UNBOUND_SECRET": "s"}
        out = self.feed_of(env=env, platform="ios")
        self.assertEqual(out["feed"], "unbound")
        self.assertNotIn("platform", out["batch"].get("device_info", {}))
        env.update({"TRIBUTARY_FEEDS_IOS_KEY": "k2", "TRIBUTARY_FEEDS_IOS_SECRET": "s2"})
        self.assertEqual(self.feed_of(env=env, platform="ios")["feed"], "ios")

    def test_without_any_credentials_the_event_stays_on_its_platform_feed(self):
        self.assertEqual(self.feed_of(platform="android")["feed"], "android")


class Fields(unittest.TestCase):
    def test_device_info_from_properties_and_user(self):
        e = event("users.messages.pushnotification.Open", platform="ios", device_model="iPhone15,2",
                  ad_id="AAAA", ad_id_type="ios_idfa", ad_tracking_enabled=False)
        e["user"]["device_id"] = "DEV-1"
        info = map_events([e])[0]["batch"]["device_info"]
        self.assertEqual(info, {"platform": "iOS", "device_model": "iPhone15,2", "ios_idfv": "DEV-1",
                                "ios_advertising_id": "AAAA", "limit_ad_tracking": True})

    def test_advertising_id_field_follows_its_type(self):
        for kind, field in [("google_ad_id", "android_advertising_id"),
                            ("windows_ad_id", "microsoft_advertising_id"),
                            ("roku_ad_id", "roku_advertising_id")]:
            with self.subTest(kind=kind):
                e = event("users.messages.pushnotification.Send", platform="android",
                          ad_id="X", ad_id_type=kind)
                e["user"]["device_id"] = "DEV-A"
                info = map_events([e])[0]["batch"]["device_info"]
                self.assertEqual(info[field], "X")
                self.assertEqual(info["android_uuid"], "DEV-A")

    def test_email_and_mobile_identities(self):
        email = event("users.messages.email.Click", email_address="jane@example.com")
        sub = event("users.behaviors.subscription.GlobalStateChange", email_address="sub@example.com")
        sms_out = event("users.messages.sms.Send", to_phone_number="+4915112345678")
        sms_in = event("users.messages.sms.InboundReceive", user_phone_number="+4915100000000")
        out = map_events([email, sub, sms_out, sms_in])
        self.assertEqual(out[0]["batch"]["user_identities"]["email"], "jane@example.com")
        self.assertEqual(out[1]["batch"]["user_identities"]["email"], "sub@example.com")
        self.assertEqual(out[2]["batch"]["user_attributes"]["$mobile"], "+4915112345678")
        self.assertEqual(out[3]["batch"]["user_attributes"]["$mobile"], "+4915100000000")

    def test_custom_attributes_rules(self):
        e = event("users.messages.contentcard.Click", content_card_id="card-1",
                  suspected_bot_click_reason=["ua", "ip"], media_urls=["https://x/a.png"],
                  nested={"a": 1}, nothing=None, count=3, flag=True)
        e["user"]["device_id"] = "dev-9"
        attrs = map_events([e])[0]["batch"]["events"][0]["data"]["custom_attributes"]
        self.assertEqual(attrs["card_id"], "card-1")
        self.assertNotIn("content_card_id", attrs)
        self.assertEqual(attrs["suspected_bot_click_reason"], "ua,ip")
        self.assertNotIn("media_urls", attrs)
        self.assertEqual(json.loads(attrs["nested"]), {"a": 1})
        self.assertNotIn("nothing", attrs)
        self.assertEqual(attrs["count"], 3)
        self.assertIs(attrs["flag"], True)
        self.assertEqual(attrs["device_id"], "dev-9")
        for v in attrs.values():
            self.assertNotIsInstance(v, (dict, list))

    def test_custom_attribute_limits(self):
        props = {"attr_%03d" % i: "v" for i in range(150)}
        props["attr_000"] = "x" * 5000
        props["n" * 300] = "long name"
        e = event("users.messages.email.Send", **props)
        attrs = map_events([e])[0]["batch"]["events"][0]["data"]["custom_attributes"]
        self.assertEqual(len(attrs), 100)
        self.assertEqual(len(attrs["attr_000"]), 4096)
        self.assertTrue(all(len(k) <= 256 for k in attrs))
        # the first 100 in name order are kept
        self.assertIn("attr_098", attrs)
        self.assertNotIn("attr_149", attrs)

    def test_a_value_of_megabytes_is_cut_within_the_rules_budget(self):
        e = event("users.messages.email.Send", huge="x" * 2000000, accented="é" * 5000,
                  party="\U0001F389" * 5000, **{"\U0001F389" * 200: "name"})
        out = map_events([e])[0]
        self.assertNotIn("dead_letter", out)
        attrs = out["batch"]["events"][0]["data"]["custom_attributes"]
        self.assertEqual(attrs["huge"], "x" * 4096)
        self.assertEqual(attrs["accented"], "é" * 4096)  # characters, not bytes
        # UTF-16 units, as Java or JavaScript count a string: an emoji counts two
        self.assertEqual(attrs["party"], "\U0001F389" * 2048)
        self.assertEqual(attrs["\U0001F389" * 128], "name")


class Inputs(unittest.TestCase):
    def test_map_reads_an_envelope_an_array_one_event_or_ndjson(self):
        e1, e2 = event(), event()
        forms = {
            "envelope": json.dumps({"events": [e1, e2]}),
            "array": json.dumps([e1, e2]),
            "ndjson": json.dumps(e1) + "\n" + json.dumps(e2) + "\n",
        }
        for name, text in forms.items():
            with self.subTest(form=name):
                p = run_cli(["map", "-"], stdin=text)
                self.assertEqual(p.returncode, 0, p.stderr)
                ids = [json.loads(line)["event_id"] for line in p.stdout.splitlines()]
                self.assertEqual(ids, [e1["id"], e2["id"]])
        p = run_cli(["map", "-"], stdin=json.dumps(e1))
        self.assertEqual(json.loads(p.stdout)["event_id"], e1["id"])

    def test_map_reports_the_rules_version_with_every_event(self):
        p = run_cli(["check"])
        version = p.stdout.strip().rsplit(" ", 1)[-1]
        out = map_events([event(), event("users.behaviors.CustomEvent")])
        self.assertEqual({o["rules_version"] for o in out}, {version})

    def test_the_sample_batch_the_readme_maps_maps_as_it_shows(self):
        path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "sample-currents-batch.json")
        p = run_cli(["map", path])
        self.assertEqual(p.returncode, 0, p.stderr)
        out = [json.loads(line) for line in p.stdout.splitlines()]
        self.assertEqual([o.get("feed") for o in out], ["ios", "unbound", "unbound", "unbound",
                                                         "unbound", None])
        self.assertEqual(out[0]["batch"]["events"][0]["data"]["event_name"],
                         "Push Notification Sends")
        self.assertEqual(out[-1]["dropped"], "no_external_id")

    def test_map_of_malformed_input_fails_with_the_reason(self):
        p = run_cli(["map", "-"], stdin='{"events": [{"id": "x", "time": 1}]}')
        self.assertEqual(p.returncode, 1)
        self.assertIn("event 0: missing event_type", p.stderr)


# A rule that builds a table which, written as JSON, would take 2^30 copies of
# "x": tens of gigabytes of text from a few kilobytes of Lua memory.
EXPANDING_RULE = """
return function(event, out)
  local d = {"x"}
  for _ = 1, 30 do d = {d, d} end
  local how = event.properties.how
  if how == "return" then
    out.event.data.expanding = d
  elseif how == "encode" then
    out.event.data.custom_attributes = { big = cjson.encode(d) }
  else
    out.event.data.custom_attributes = {
      small = cjson.encode({ a = { 1, 2, cjson.null }, b = "q\\"/", n = 12345678901234 }) }
  end
  return out
end
"""


class RuleOutput(unittest.TestCase):
    def setUp(self):
        self.rules = tempfile.mkdtemp(prefix="tributary-rules-")
        self.addCleanup(shutil.rmtree, self.rules, True)
        shutil.copy(os.path.join(RULES, "10-mparticle.lua"), self.rules)
        with open(os.path.join(self.rules, "20-expand.lua"), "w") as f:
            f.write(EXPANDING_RULE)

    def map_one(self, how):
        e = event("users.messages.email.Send", how=how)
        p = run_cli(["map", "-"], stdin=json.dumps(e),
                    env={"TRIBUTARY_RULES_DIR": self.rules})
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)

    def test_an_output_too_large_to_write_is_invalid_output_not_a_crash(self):
        out = self.map_one("return")
        self.assertEqual(out["dead_letter"], "invalid_output")
        self.assertIn("128 KB", out["detail"])

    def test_cjson_encode_in_a_rule_refuses_a_text_over_its_limit(self):
        out = self.map_one("encode")
        self.assertEqual(out["dead_letter"], "rule_error")
        self.assertIn("cjson.encode: the JSON text is larger than 1048576 bytes", out["detail"])

    def test_map_writes_every_print_with_where_it_was_called(self):
        # the service writes 20 a second; map is run by hand, to see them all
        with open(os.path.join(self.rules, "30-print.lua"), "w") as f:
            f.write("return function(event, out)\n"
                    "  for i = 1, 50 do print('line', i) end\n"
                    "end\n")
        p = run_cli(["map", "-"], stdin=json.dumps(event("users.messages.email.Send")),
                    env={"TRIBUTARY_RULES_DIR": self.rules})
        self.assertEqual(p.returncode, 0, p.stderr)
        printed = [l for l in p.stderr.splitlines() if 'msg="script print"' in l]
        self.assertEqual(len(printed), 50, p.stderr[-2000:])
        self.assertIn('text="line\\t50" at=%s/30-print.lua:2' % self.rules, printed[-1])
        self.assertNotIn("more lines this second", p.stderr)

    def test_cjson_encode_in_a_rule_writes_what_cjson_writes(self):
        out = self.map_one("small")
        text = out["batch"]["events"][0]["data"]["custom_attributes"]["small"]
        self.assertEqual(json.loads(text), {"a": [1, 2, None], "b": 'q"/', "n": 12345678901234})
