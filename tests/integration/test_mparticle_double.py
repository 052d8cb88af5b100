"""Tests of the mParticle Events API double itself, over real HTTP."""

import http.client
import json
import threading
import time
import unittest

from mparticle_double import MParticleDouble, basic_auth

FEEDS = {
    "ios": ("ios-key", "ios-secret"),
    "android": ("android-key", "android-secret"),
    "unbound": ("unbound-key", "unbound-secret"),
    "example": ("example-api-key", "example-api-secret"),
}

_seq = [0]


def custom_event(name="Push Notification Sends", **attrs):
    _seq[0] += 1
    return {
        "event_type": "custom_event",
        "data": {
            "event_name": name,
            "custom_event_type": "other",
            "timestamp_unixtime_ms": int(time.time() * 1000) - 3600 * 1000,  # an hour ago
            "source_message_id": "msg-%d" % _seq[0],
            "custom_attributes": dict(attrs or {"campaign_id": "c1"}),
        },
    }


def batch(events=None, user="customer-1234", **extra):
    _seq[0] += 1
    b = {
        "environment": "production",
        "schema_version": 2,
        "source_request_id": "req-%d" % _seq[0],
        "user_identities": {"customer_id": user},
        "device_info": {"platform": "iOS"},
        "events": events if events is not None else [custom_event()],
    }
    b.update(extra)
    return b


class DoubleTest(unittest.TestCase):
    def setUp(self):
        self.d = MParticleDouble(feeds=FEEDS).start()
        self.addCleanup(self.d.stop)

    def assertOverLimit(self, says):
        """The request went over a limit of the API: kept in `rejected` (and cleared), so that
        a service that sent it fails its test."""
        rejected = self.d.take_rejected()
        self.assertEqual(len(rejected), 1, rejected)
        self.assertTrue(rejected[0]["limit"])
        self.assertIn(says, rejected[0]["message"])

    def post(self, body, feed="ios", path="/v2/bulkevents", auth=None, headers=None, conn=None, timeout=5):
        """POSTs body (a JSON-able value, str or bytes); returns (status, headers, body bytes)."""
        if not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        h = {"Content-Type": "application/json"}
        if auth is not None:
            h["Authorization"] = auth
        elif feed is not None:
            h["Authorization"] = basic_auth(*FEEDS[feed])
        h.update(headers or {})
        own = conn is None
        if own:
            conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            if own:
                conn.close()

    def assertError(self, response, status, mentions=None):
        st, headers, body = response
        self.assertEqual(st, status, body)
        self.assertEqual(headers.get("content-type"), "application/json")
        err = json.loads(body)["errors"]
        self.assertEqual(len(err), 1)
        if status == 400:
            self.assertEqual(err[0]["code"], "BAD_REQUEST")
        self.assertIsInstance(err[0]["message"], str)
        if mentions:
            self.assertIn(mentions, err[0]["message"])
        return err[0]["message"]

    def post_one(self, b):
        """POSTs one batch to /v2/events, where an invalid batch is a 400."""
        return self.post(b, path="/v2/events")

    def assertNothingStored(self):
        self.assertEqual(self.d.batches, [])
        self.assertEqual(self.d.events(), [])

    # ---- success and recording -----------------------------------------------------------

    def test_bulk_request_is_accepted_with_202_empty_body_and_recorded(self):
        b1, b2 = batch(), batch(events=[custom_event(), custom_event()])
        st, headers, body = self.post([b1, b2])
        self.assertEqual(st, 202)
        self.assertEqual(body, b"")
        self.assertNotIn("x-mp-rate-limit-percentage-used", headers)
        batches = self.d.batches
        self.assertEqual([b["batch"] for b in batches], [b1, b2])
        self.assertEqual({b["feed"] for b in batches}, {"ios"})
        self.assertEqual(batches[0]["request_id"], self.d.requests[0]["request_id"])
        self.assertEqual(len(self.d.events()), 3)
        self.assertEqual(self.d.source_message_ids(),
                         [e["data"]["source_message_id"] for e in b1["events"] + b2["events"]])
        req = self.d.requests[0]
        self.assertEqual((req["feed"], req["status"], req["batches"], req["path"]), ("ios", 202, 2, "/v2/bulkevents"))
        self.assertEqual(req["headers"]["content-type"], "application/json")

    def test_single_batch_endpoint_accepts_one_batch_object(self):
        b = batch()
        st, _, body = self.post(b, path="/v2/events")
        self.assertEqual((st, body), (202, b""))
        self.assertEqual([x["batch"] for x in self.d.batches], [b])

    def test_single_batch_endpoint_refuses_an_array(self):
        self.assertError(self.post([batch()], path="/v2/events"), 400)
        self.assertNothingStored()

    def test_empty_bulk_request_is_accepted(self):
        self.assertEqual(self.post([])[0], 202)
        self.assertNothingStored()

    def test_unknown_path_is_404(self):
        self.assertEqual(self.post([batch()], path="/v1/events")[0], 404)
        self.assertEqual(self.post([batch()], path="/v2/bulkevents/historic")[0], 404)
        self.assertNothingStored()

    def test_events_older_than_30_days_belong_on_the_historical_endpoint(self):
        old = custom_event()
        old["data"]["timestamp_unixtime_ms"] = int(time.time() * 1000) - 31 * 86400 * 1000
        # on the real-time endpoint the batch is dropped behind a 202
        self.assertEqual(self.post([batch(events=[old])])[0], 202)
        self.assertIn("older than 30 days", self.d.take_rejected()[0]["message"])
        self.assertError(self.post_one(batch(events=[old])), 400, "historical")
        # on the historical endpoint it is taken, and a recent event is not
        self.assertEqual(self.post([batch(events=[old])], path="/v2/bulkevents/historical")[0], 202)
        self.assertEqual(len(self.d.batches), 1)
        self.assertEqual(self.post([batch()], path="/v2/bulkevents/historical")[0], 202)
        self.assertIn("72 hours", self.d.take_rejected()[0]["message"])
        self.assertEqual(len(self.d.batches), 1)
        # an empty batch is ignored there: not stored, its id not remembered
        empty = batch(events=[])
        self.assertEqual(self.post([empty], path="/v2/bulkevents/historical")[0], 202)
        self.assertEqual(len(self.d.batches), 1)
        empty["events"] = [old]
        self.assertEqual(self.post([empty], path="/v2/bulkevents/historical")[0], 202)
        self.assertEqual(len(self.d.batches), 2)

    def test_get_is_404(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("GET", "/v2/bulkevents", headers={"Authorization": basic_auth(*FEEDS["ios"])})
        r = conn.getresponse()
        r.read()
        self.assertEqual(r.status, 404)

    def test_keep_alive_serves_several_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        self.addCleanup(conn.close)
        for _ in range(3):
            self.assertEqual(self.post([batch()], conn=conn)[0], 202)
        self.assertEqual(len(self.d.batches), 3)

    def test_stop_is_prompt_with_an_idle_keep_alive_connection_open(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        self.addCleanup(conn.close)
        self.assertEqual(self.post([batch()], conn=conn)[0], 202)
        t = time.monotonic()
        self.d.stop()
        self.assertLess(time.monotonic() - t, 1.0)

    def test_chunked_request_body_is_accepted(self):
        body = json.dumps([batch()]).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("POST", "/v2/bulkevents", body=iter([body[:10], body[10:]]), encode_chunked=True,
                     headers={"Authorization": basic_auth(*FEEDS["ios"]), "Transfer-Encoding": "chunked",
                              "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        self.assertEqual(r.status, 202)
        self.assertEqual(len(self.d.batches), 1)

    def test_context_manager_starts_and_stops(self):
        with MParticleDouble(feeds={"f": ("k", "s")}) as d:
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
            conn.request("POST", "/v2/events", body=json.dumps(batch()),
                         headers={"Authorization": basic_auth("k", "s"), "Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().status, 202)
            conn.close()
            self.assertTrue(d.url.startswith("http://127.0.0.1:"))
        self.assertEqual(len(d.batches), 1)

    # ---- authentication ------------------------------------------------------------------

    def test_missing_authorization_is_401(self):
        self.assertError(self.post([batch()], feed=None), 401)
        self.assertNothingStored()
        self.assertEqual(self.d.requests[0]["status"], 401)
        self.assertIsNone(self.d.requests[0]["feed"])

    def test_bearer_authorization_is_401(self):
        self.assertEqual(self.post([batch()], auth="Bearer ios-secret")[0], 401)

    def test_wrong_secret_is_403(self):
        self.assertError(self.post([batch()], auth=basic_auth("ios-key", "android-secret")), 403)
        self.assertNothingStored()

    def test_unknown_key_is_403(self):
        self.assertEqual(self.post([batch()], auth=basic_auth("nobody", "ios-secret"))[0], 403)

    def test_feed_is_chosen_by_credentials_not_by_body(self):
        b = batch(device_info={"platform": "iOS"})
        self.assertEqual(self.post([b], feed="android")[0], 202)
        self.assertEqual(self.post([batch()], feed="unbound")[0], 202)
        self.assertEqual([x["feed"] for x in self.d.batches], ["android", "unbound"])
        self.assertEqual(len(self.d.events("android")), 1)
        self.assertEqual(self.d.events("ios"), [])

    def test_documented_basic_test_vector_is_accepted(self):
        auth = "Basic ZXhhbXBsZS1hcGkta2V5OmV4YW1wbGUtYXBpLXNlY3JldA=="
        self.assertEqual(basic_auth("example-api-key", "example-api-secret"), auth)
        self.assertEqual(self.post([batch()], auth=auth)[0], 202)
        self.assertEqual(self.d.batches[0]["feed"], "example")

    def test_authorization_header_name_and_scheme_are_case_insensitive(self):
        token = basic_auth(*FEEDS["ios"]).split(" ", 1)[1]
        self.assertEqual(self.post([batch()], feed=None, headers={"authorization": "basic " + token})[0], 202)
        self.assertEqual(self.post([batch()], feed=None, headers={"AUTHORIZATION": "BASIC " + token})[0], 202)

    def test_authorization_and_secrets_are_not_recorded(self):
        self.post([batch()])
        self.post([batch()], auth=basic_auth("ios-key", "wrong-secret"))
        text = repr(self.d.requests) + repr(self.d)
        self.assertNotIn("ios-secret", text)
        self.assertNotIn("wrong-secret", text)
        self.assertNotIn(basic_auth(*FEEDS["ios"]).split()[1], text)
        self.assertEqual(self.d.requests[0]["headers"]["authorization"], "Basic <redacted>")

    def test_removed_feed_credentials_are_403(self):
        self.d.remove_feed("ios")
        self.assertEqual(self.post([batch()])[0], 403)

    # ---- validation ----------------------------------------------------------------------

    def test_a_body_not_declared_as_json_is_415(self):
        for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
            self.assertError(self.post([batch()], headers={"Content-Type": ctype}), 415,
                             "Content-Type must be application/json")
        self.assertNothingStored()
        self.assertEqual(self.post([batch()], headers={"Content-Type": "application/json; charset=utf-8"})[0],
                         202)

    def test_malformed_json_is_400_with_documented_body(self):
        self.assertError(self.post(b'[{"environment": "production",'), 400)
        self.assertNothingStored()

    def test_bulk_body_that_is_not_an_array_is_400(self):
        self.assertError(self.post(batch()), 400)

    def test_batch_that_is_not_an_object_is_400(self):
        self.assertError(self.post([batch(), "batch"]), 400)

    def test_batch_id_is_400(self):
        self.assertError(self.post_one(batch(batch_id=123)), 400, "batch_id")
        self.assertNothingStored()

    def test_missing_environment_is_400(self):
        b = batch()
        del b["environment"]
        self.assertError(self.post_one(b), 400, "environment")

    def test_invalid_environment_is_400(self):
        self.assertError(self.post_one(batch(environment="staging")), 400, "environment")

    def test_development_environment_is_accepted(self):
        self.assertEqual(self.post_one(batch(environment="development"))[0], 202)

    def test_missing_events_is_400(self):
        b = batch()
        del b["events"]
        self.assertError(self.post_one(b), 400, "events")

    def test_event_without_event_type_is_400(self):
        self.assertError(self.post_one(batch(events=[{"data": {}}])), 400, '"event_type"')

    def test_event_without_data_is_400(self):
        self.assertError(self.post_one(batch(events=[{"event_type": "uninstall"}])), 400, '"data"')

    def test_unknown_event_type_is_400(self):
        self.assertError(self.post_one(batch(events=[{"event_type": "email_open", "data": {}}])), 400, "email_open")

    def test_uninstall_event_needs_no_name(self):
        self.assertEqual(self.post_one(batch(events=[{"event_type": "uninstall", "data": {}}]))[0], 202)

    def test_custom_event_without_event_name_is_400(self):
        e = custom_event()
        del e["data"]["event_name"]
        self.assertError(self.post_one(batch(events=[e])), 400, "event_name")

    def test_custom_event_name_over_256_chars_is_400(self):
        self.assertError(self.post_one(batch(events=[custom_event("x" * 257)])), 400, "event_name")

    def test_custom_event_name_of_256_chars_is_accepted(self):
        self.assertEqual(self.post_one(batch(events=[custom_event("x" * 256)]))[0], 202)

    def test_invalid_custom_event_type_is_400(self):
        e = custom_event()
        e["data"]["custom_event_type"] = "push"
        self.assertError(self.post_one(batch(events=[e])), 400, "custom_event_type")

    def test_nested_custom_attribute_object_is_400(self):
        self.assertError(self.post_one(batch(events=[custom_event(campaign={"id": "c1"})])), 400, "campaign")
        self.assertNothingStored()

    def test_array_custom_attribute_is_400(self):
        self.assertError(self.post_one(batch(events=[custom_event(tags=["a", "b"])])), 400, "tags")

    def test_scalar_custom_attributes_are_accepted(self):
        e = custom_event(s="x", n=1.5, i=2, b=True, z=None)
        self.assertEqual(self.post_one(batch(events=[e]))[0], 202)

    def test_more_than_100_custom_attributes_is_400(self):
        attrs = {"a%d" % i: "v" for i in range(101)}
        self.assertError(self.post_one(batch(events=[custom_event(**attrs)])), 400, "attributes")

    def test_custom_attribute_name_over_256_chars_is_400(self):
        self.assertError(self.post_one(batch(events=[custom_event(**{"n" * 257: "v"})])), 400)

    def test_custom_attribute_value_over_4096_chars_is_400(self):
        self.assertError(self.post_one(batch(events=[custom_event(v="x" * 4097)])), 400)

    def test_characters_are_counted_in_utf16_units(self):
        # the stricter reading of "characters": an emoji counts two
        self.assertEqual(self.post_one(batch(events=[custom_event(v="\U0001F389" * 2048)]))[0], 202)
        self.assertError(self.post_one(batch(events=[custom_event(v="\U0001F389" * 2049)])), 400)

    def test_user_attribute_arrays_are_accepted(self):
        self.assertEqual(self.post_one(batch(user_attributes={"$mobile": "+49151", "tags": ["a", 1]}))[0], 202)

    def test_user_attribute_object_is_400(self):
        self.assertError(self.post_one(batch(user_attributes={"x": {"y": 1}})), 400, "user_attributes")

    def test_user_identities_must_be_an_object(self):
        self.assertError(self.post_one(batch(user_identities=["customer-1"])), 400, "user_identities")

    def test_customer_id_must_be_a_string(self):
        self.assertError(self.post_one(batch(user_identities={"customer_id": 1234})), 400, "customer_id")

    def test_customerid_spelling_is_accepted(self):
        b = batch(user_identities={"customerid": "customer-9"})
        self.assertEqual(self.post_one(b)[0], 202)
        self.assertEqual(self.d.batches[0]["batch"]["user_identities"], {"customerid": "customer-9"})

    def test_unknown_device_platform_is_400(self):
        self.assertError(self.post_one(batch(device_info={"platform": "ios"})), 400, "platform")

    def test_a_bad_batch_in_a_bulk_request_is_dropped_behind_a_202(self):
        # "202 ... For /bulkevents also when some batches inside failed"
        good, bad = batch(), batch(batch_id=1)
        self.assertEqual(self.post([good, batch(), bad])[0], 202)
        self.assertEqual(len(self.d.batches), 2)
        rejected = self.d.take_rejected()
        self.assertEqual([(r["index"], r["source_request_id"]) for r in rejected],
                         [(2, bad["source_request_id"])])
        self.assertIn("batch_id", rejected[0]["message"])
        self.assertEqual(self.d.take_rejected(), [])

    def test_stop_fails_while_a_dropped_batch_is_unread(self):
        d = MParticleDouble(feeds=FEEDS).start()
        self.d, outer = d, self.d
        try:
            self.assertEqual(self.post([batch(environment="staging")])[0], 202)
        finally:
            self.d = outer
        with self.assertRaises(AssertionError):
            d.stop()

    # ---- limits --------------------------------------------------------------------------

    def test_oversize_request_is_413(self):
        # 4 batches of ~70 KB: each under the batch limit, together over 256 KB.
        bs = [batch(events=[custom_event(**{"a%d" % i: "x" * 4000 for i in range(17)})]) for _ in range(4)]
        body = json.dumps(bs).encode()
        self.assertGreaterEqual(len(body), 256000)
        self.assertError(self.post(body), 413)
        self.assertNothingStored()
        self.assertOverLimit("request body")

    def test_request_just_under_256_kb_is_accepted(self):
        b = batch(events=[custom_event(**{"a%d" % i: "x" * 4000 for i in range(20)})])
        body = json.dumps([b, b, b]).encode()
        body = body[:-1] + b" " * (256000 - 1 - len(body)) + b"]"
        self.assertEqual(len(body), 256000 - 1)
        self.assertEqual(self.post(body)[0], 202)

    def test_oversize_batch_is_413(self):
        # One batch of ~140 KB: over 128 KB but the request is under 256 KB.
        events = [custom_event(**{"a%d" % i: "x" * 4000 for i in range(35)}) for _ in range(1)]
        big = batch(events=events)
        size = len(json.dumps(big))
        self.assertGreater(size, 128000)
        self.assertLess(size, 256000)
        self.assertError(self.post([batch(), big]), 413)
        self.assertNothingStored()
        self.assertOverLimit("batch 1 is")

    def test_rate_limit_answers_429_with_retry_after_over_the_last_second(self):
        self.d.rate_limit = 3
        self.assertEqual(self.post([batch(), batch()])[0], 202)
        st, headers, _ = self.post([batch(), batch()])
        self.assertEqual(st, 429)
        self.assertEqual((headers["retry-after"], headers["x-mp-rate-limit-exceeded"]), ("1", "account"))
        self.assertEqual(self.post([batch()])[0], 202)
        time.sleep(1.05)
        self.assertEqual(self.post([batch(), batch(), batch()])[0], 202)
        self.assertEqual(len(self.d.batches), 6)

    def test_the_account_takes_270_batches_a_second_by_default(self):
        self.assertEqual(self.d.rate_limit, 270)
        self.d.rate_window_s = 60  # the count, not the clock, is tested here
        self.assertEqual(self.post([batch() for _ in range(100)])[0], 202)
        self.assertEqual(self.post([batch() for _ in range(100)])[0], 202)
        self.assertEqual(self.post([batch() for _ in range(70)])[0], 202)
        st, headers, _ = self.post([batch()])
        self.assertEqual((st, headers["retry-after"]), (429, "1"))
        self.assertEqual(len(self.d.batches), 270)

    def test_events_of_new_names_past_the_limit_are_answered_202_and_dropped(self):
        self.assertEqual(self.d.event_names_limit, 1000)
        self.d.event_names_limit = 2
        self.assertEqual(self.post([batch(events=[custom_event("A"), custom_event("B")])])[0], 202)
        # a third name is dropped on every feed (the workspace's limit), known ones still pass
        c = custom_event("C")
        st, _, _ = self.post([batch(events=[custom_event("A"), c, custom_event("B")])],
                             feed="android")
        self.assertEqual(st, 202)
        self.assertEqual([e["data"]["event_name"] for _, _, e in self.d.events()], ["A", "B", "A", "B"])
        self.assertEqual(self.d.event_count(), 4)
        self.assertEqual(self.d.event_names, {"A", "B"})
        # an event without a name is not limited
        self.assertEqual(self.post([batch(events=[{"event_type": "uninstall", "data": {
            "source_message_id": "u-1", "timestamp_unixtime_ms": int(time.time() * 1000)}}])])[0],
            202)
        self.assertEqual(self.d.event_count(), 5)
        self.assertEqual(self.d.take_name_dropped(),
                         [{"feed": "android", "name": "C",
                           "source_message_id": c["data"]["source_message_id"]}])
        self.assertEqual(self.d.take_name_dropped(), [])

    def test_stop_fails_while_an_event_was_dropped_for_its_name(self):
        d = MParticleDouble(feeds=FEEDS).start()
        d.event_names_limit = 1
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
        try:
            self.assertEqual(self.post([batch(events=[custom_event("A"), custom_event("B")])],
                                       conn=conn)[0], 202)
        finally:
            conn.close()
            with self.assertRaisesRegex(AssertionError, "limit of 1 event names"):
                d.stop()

    def test_more_than_100_batches_is_400(self):
        self.assertError(self.post([batch() for _ in range(101)]), 400, "batches")
        self.assertOverLimit("too many batches")
        self.assertNothingStored()
        self.assertEqual(self.d.requests[0]["batches"], 101)

    def test_100_batches_are_accepted(self):
        self.assertEqual(self.post([batch() for _ in range(100)])[0], 202)
        self.assertEqual(len(self.d.batches), 100)

    # ---- fault injection -----------------------------------------------------------------

    def test_fault_401_replaces_auth_result(self):
        self.d.fail(401, times=1)
        self.assertError(self.post([batch()]), 401)
        self.assertEqual(self.post([batch()])[0], 202)
        self.assertEqual(len(self.d.batches), 1)

    def test_fault_403_for_one_feed_leaves_other_feeds_alone(self):
        self.d.fail(403, feed="ios")
        self.assertEqual(self.post([batch()], feed="android")[0], 202)
        self.assertEqual(self.post([batch()], feed="ios")[0], 403)
        self.assertEqual(self.post([batch()], feed="ios")[0], 403)
        self.assertEqual([b["feed"] for b in self.d.batches], ["android"])

    def test_faults_are_consumed_only_by_authenticated_requests(self):
        self.d.fail(500, times=1)
        self.assertEqual(self.post([batch()], feed=None)[0], 401)
        self.assertEqual(self.post([batch()], auth=basic_auth("ios-key", "nope"))[0], 403)
        self.assertEqual(self.post([batch()])[0], 500)
        self.assertEqual(self.post([batch()])[0], 202)

    def test_fault_429_with_retry_after_header(self):
        self.d.fail(429, times=1, retry_after=2, rate_limit_exceeded="feed")
        st, headers, _ = r = self.post([batch()])
        self.assertError(r, 429)
        self.assertEqual(headers.get("retry-after"), "2")
        self.assertEqual(headers.get("x-mp-rate-limit-exceeded"), "feed")
        self.assertNothingStored()
        self.assertEqual(self.post([batch()])[0], 202)

    def test_fault_429_without_retry_after_header(self):
        self.d.fail(429, times=1)
        st, headers, _ = r = self.post([batch()])
        self.assertError(r, 429)
        self.assertNotIn("retry-after", headers)
        self.assertNotIn("x-mp-rate-limit-exceeded", headers)

    def test_fault_500(self):
        self.d.fail(500, times=1)
        self.assertError(self.post([batch()]), 500)
        self.assertNothingStored()

    def test_fault_503_lasts_given_times_then_recovers(self):
        self.d.fail(503, times=2)
        self.assertEqual([self.post([batch()])[0] for _ in range(3)], [503, 503, 202])

    def test_fault_without_times_lasts_until_cleared(self):
        self.d.fail(503)
        self.assertEqual([self.post([batch()])[0] for _ in range(3)], [503, 503, 503])
        self.d.clear_faults()
        self.assertEqual(self.post([batch()])[0], 202)

    def test_fault_200_is_answered_with_an_empty_body_and_stores_nothing(self):
        # what a proxy or a wrong URL may answer: not mParticle's 202
        self.d.fail(200, times=1)
        st, _, body = self.post([batch()])
        self.assertEqual((st, body), (200, b""))
        self.assertNothingStored()
        self.assertEqual(self.post([batch()])[0], 202)

    def test_held_fault_is_answered_only_once_its_event_is_set(self):
        released = threading.Event()
        self.addCleanup(released.set)
        self.d.fail(503, times=1, hold=released)
        answers = []
        t = threading.Thread(target=lambda: answers.append(self.post([batch()])[0]))
        t.start()
        time.sleep(0.3)
        self.assertEqual(answers, [])
        self.assertIsNone(self.d.requests[0]["status"])
        released.set()
        t.join(5)
        self.assertEqual(answers, [503])

    def test_held_auth_fault_is_answered_only_once_its_event_is_set(self):
        released = threading.Event()
        self.addCleanup(released.set)
        self.d.fail(401, times=1, hold=released)
        answers = []
        t = threading.Thread(target=lambda: answers.append(self.post([batch()])[0]))
        t.start()
        time.sleep(0.3)
        self.assertEqual(answers, [])
        released.set()
        t.join(5)
        self.assertEqual(answers, [401])

    def test_request_arrival_times_are_recorded(self):
        self.d.fail(429, times=1, retry_after=1)
        t0 = time.monotonic()
        self.post([batch()])
        time.sleep(0.2)
        self.post([batch()])
        t1 = time.monotonic()
        r1, r2 = self.d.requests
        self.assertTrue(t0 <= r1["time"] <= r1["answered"] <= r2["time"] <= t1)
        self.assertGreaterEqual(r2["time"] - r1["answered"], 0.2)
        self.assertEqual((r1["status"], r2["status"]), (429, 202))

    def test_slow_delays_the_answer(self):
        self.d.slow(0.4, times=1)
        t = time.monotonic()
        self.assertEqual(self.post([batch()])[0], 202)
        self.assertGreaterEqual(time.monotonic() - t, 0.4)
        t = time.monotonic()
        self.assertEqual(self.post([batch()])[0], 202)
        self.assertLess(time.monotonic() - t, 0.3)

    def test_late_moves_the_arrival_of_the_next_requests(self):
        self.d.late(0.4, times=1)
        t = time.monotonic()
        self.assertEqual(self.post([batch()])[0], 202)
        self.assertGreaterEqual(self.d.requests[0]["time"] - t, 0.4)
        t = time.monotonic()
        self.assertEqual(self.post([batch()])[0], 202)
        self.assertLess(self.d.requests[1]["time"] - t, 0.3)

    def test_slow_answer_times_out_the_client_but_batch_is_recorded(self):
        self.d.slow(1.0, times=1)
        with self.assertRaises(TimeoutError):
            self.post([batch()], timeout=0.2)
        self.assertEqual(len(self.d.batches), 1)

    def test_dropped_connection_gives_no_response_and_stores_nothing(self):
        self.d.drop_connections(times=1)
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError)):
            self.post([batch()])
        self.assertTrue(self.d.wait_for_requests(1, 2))
        self.assertNothingStored()
        req = self.d.requests[0]
        self.assertTrue(req["dropped"])
        self.assertIsNone(req["status"])
        self.assertEqual(self.post([batch()])[0], 202)

    def test_dropped_connection_after_processing_stores_the_batch(self):
        self.d.drop_connections(times=1, after_processing=True)
        b = batch()
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError)):
            self.post([b])
        self.assertEqual(self.post([b])[0], 202)
        self.assertEqual(self.d.source_request_ids()[b["source_request_id"]], 2)

    def test_poison_rejects_whole_request_naming_the_batch(self):
        self.d.poison("POISON-123")
        good = batch()
        bad = batch(events=[custom_event(note="has POISON-123 inside")])
        msg = self.assertError(self.post([good, bad, good]), 400)
        self.assertIn("batch[1]", msg)
        self.assertIn(bad["source_request_id"], msg)
        self.assertNothingStored()
        self.assertEqual(self.post([good, batch()])[0], 202)
        self.assertEqual(len(self.d.batches), 2)

    def test_clear_faults_removes_all_faults(self):
        self.d.fail(500)
        self.d.slow(5)
        self.d.drop_connections()
        self.d.poison("source_request_id")
        self.d.clear_faults()
        t = time.monotonic()
        self.assertEqual(self.post([batch()])[0], 202)
        self.assertLess(time.monotonic() - t, 1)

    def test_faults_can_be_set_while_requests_are_in_flight(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        self.addCleanup(conn.close)
        self.assertEqual(self.post([batch()], conn=conn)[0], 202)
        self.d.fail(503, times=1)
        self.assertEqual(self.post([batch()], conn=conn)[0], 503)
        self.assertEqual(self.post([batch()], conn=conn)[0], 202)

    # ---- hints and helpers ---------------------------------------------------------------

    def test_rate_limit_percentage_header_on_success(self):
        self.d.rate_limit_percentage = 85
        st, headers, _ = self.post([batch()])
        self.assertEqual(st, 202)
        self.assertEqual(headers.get("x-mp-rate-limit-percentage-used"), "85")

    def test_rate_limit_percentage_header_absent_on_errors(self):
        self.d.rate_limit_percentage = 85
        _, headers, _ = self.post("not json")
        self.assertNotIn("x-mp-rate-limit-percentage-used", headers)

    def test_source_request_ids_show_duplicates(self):
        b = batch()
        self.post([b])
        self.post([b, batch()])
        ids = self.d.source_request_ids()
        self.assertEqual(ids[b["source_request_id"]], 2)
        self.assertEqual(sum(ids.values()), 3)

    def test_a_repeated_source_request_id_is_answered_202_and_not_stored_again(self):
        # mParticle deduplicates requests by source_request_id per API key
        b = batch()
        self.assertEqual(self.post([b])[0], 202)
        self.assertEqual(self.post([b])[0], 202)
        self.assertEqual([x["batch"] for x in self.d.batches], [b])
        self.assertEqual(self.d.event_count(), 1)
        self.assertEqual([(r["batch"], r["same"]) for r in self.d.repeats], [(b, True)])
        # another key's batch with the same id is its own
        self.assertEqual(self.post([b], feed="android")[0], 202)
        self.assertEqual([x["feed"] for x in self.d.batches], ["ios", "android"])
        self.assertEqual(self.d.event_count(), 2)

    def test_stop_fails_on_a_source_request_id_re_used_for_other_events(self):
        # mParticle would drop the second batch's events as a repeat: lost
        b = batch()
        self.post([b])
        other = dict(b, events=[custom_event(), custom_event()])
        self.assertEqual(self.post([other])[0], 202)
        self.assertEqual(self.d.event_count(), 1)
        self.assertFalse(self.d.repeats[0]["same"])
        with self.assertRaisesRegex(AssertionError, "re-used a source_request_id"):
            self.d.stop()
        self.d.clear_records()  # the cleanup stops it again

    def test_wait_for_events_returns_true_when_events_arrive(self):
        t = threading.Timer(0.1, self.post, args=([batch(events=[custom_event(), custom_event()])],))
        t.start()
        self.addCleanup(t.join)
        self.assertTrue(self.d.wait_for_events(2, timeout=5))
        self.assertEqual(len(self.d.events()), 2)

    def test_wait_for_events_returns_false_on_timeout(self):
        self.post([batch()])
        t = time.monotonic()
        self.assertFalse(self.d.wait_for_events(2, timeout=0.2))
        self.assertGreaterEqual(time.monotonic() - t, 0.2)


if __name__ == "__main__":
    unittest.main()
