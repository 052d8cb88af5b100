"""Secrets never appear in logs, metrics or error bodies.

Runs last (run.py runs it after every worker has finished, and unittest runs
modules in name order): it checks everything the service said during the whole
integration suite against every secret configured anywhere in it, after a
scenario of its own that touches every secret: inbound tokens, HMAC secrets,
the admin and metrics tokens and mParticle keys and secrets, with failures of
each.
"""

import base64
import os
import signal
import time

import harness
from harness import ServiceTest, event, request
from mparticle_double import MParticleDouble

INBOUND = "inbound-token-7c1e9a5d3b"
HMAC = "hmac-secret-4f8a2c6e0d"
ADMIN = "admin-token-9d3b7f1a5c"
METRICS = "metrics-token-1e7c5a3f9b"
KEY, SECRET = "mp-key-2b6d0f4a8e", "mp-secret-6a0e4c8b2f"


class Secrets(ServiceTest):
    def test_no_secret_appears_in_logs_metrics_or_error_bodies(self):
        d = MParticleDouble(feeds={"unbound": (KEY, SECRET)}).start()
        self.addCleanup(d.stop)
        d.fail(401, times=1)
        s = self.service(tokens=(INBOUND,), env={
            "TRIBUTARY_INBOUND_HMAC_SECRETS": HMAC, "TRIBUTARY_ADMIN_TOKEN": ADMIN,
            "TRIBUTARY_METRICS_TOKEN": METRICS,
            "TRIBUTARY_MPARTICLE_URL": d.url, "TRIBUTARY_FEEDS_UNBOUND_KEY": KEY,
            "TRIBUTARY_FEEDS_UNBOUND_SECRET": SECRET, "TRIBUTARY_RETRY_PAUSE_MS": "300",
            "TRIBUTARY_BATCH_LINGER_MS": "10", "TRIBUTARY_LOG_LEVEL": "debug"})
        # failures of every kind of credential, then successes
        s.post([event()], token=INBOUND[:-1] + "x")
        s.post([event()], token=None, headers={"Tributary-Signature": "t=1,v1=" + "0" * 64})
        request(s.port, "POST", "/admin/reload", b"", {"Authorization": "Bearer " + ADMIN + "x"})
        request(s.port, "GET", "/metrics", None, {"Authorization": "Bearer " + METRICS + "x"})
        self.assertEqual(request(s.port, "POST", "/admin/reload", b"",
                                 {"Authorization": "Bearer " + ADMIN}).status, 200)
        self.assertEqual(s.post([event("users.messages.email.Send")], token=INBOUND).status, 200)
        self.assertTrue(d.wait_for_events(1, 20 * harness.SLOW))
        # a 400 whose body echoes the credentials (a proxy's or a debugging
        # endpoint's): logged and dead-lettered without them
        basic = base64.b64encode(("%s:%s" % (KEY, SECRET)).encode()).decode()
        d.fail(400, times=1, message="Authorization: Basic %s (key %s, secret %s)"
               % (basic, KEY, SECRET))
        self.assertEqual(s.post([event("users.messages.email.Send")], token=INBOUND).status, 200)
        deadline = time.time() + 20 * harness.SLOW
        while time.time() < deadline and \
                s.metrics().get('tributary_dead_letters_total{reason="rejected"}') != 1:
            time.sleep(0.05)
        listing = s.cli(["dlq", "list", "--json"]).stdout
        harness.collect("dlq list --json", listing)
        self.assertIn("Basic ***", listing)
        harness.collect("dlq show", s.cli(["dlq", "show", "1"]).stdout)
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        harness.collect("metrics", s.get("/metrics").body)
        harness.collect("queue stats", s.cli(["queue", "stats", "--json"]).stdout)
        harness.collect("dlq list", s.cli(["dlq", "list"]).stdout)
        s.cleanup()

        secrets = set(harness.SECRETS) | {INBOUND, HMAC, ADMIN, METRICS, KEY, SECRET}
        # the Basic credentials as they travel to mParticle
        secrets.add(base64.b64encode(("%s:%s" % (KEY, SECRET)).encode()).decode())
        self.assertGreater(len(harness.ARTIFACTS), 5)
        leaks = []
        for label, text in harness.ARTIFACTS:
            for secret in secrets:
                if secret in text:
                    leaks.append("%s contains %s..." % (label, secret[:4]))
        self.assertEqual(leaks, [])
