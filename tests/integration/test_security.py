"""Security: request signatures, inbound.require, throttling of authentication
failures, the admin endpoint, the TLS listener and the bounds on requests and
connections (host/auth.h, host/http_in.c)."""

import collections
import gzip
import hashlib
import hmac
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
import warnings

from harness import (BIN, RULES, SLOW, TOKEN, WRAPPER, Service, ServiceTest, clean_env, event,
                     request, run_cli)

SECRET = "hmac-secret-4f1c9a7e2b"
OTHER_SECRET = "hmac-secret-rotated-8d3e"
ADMIN = "admin-token-security-6a1f"
METRICS = "metrics-token-security-3c8e"


def sign(secret, body, t):
    """The Tributary-Signature value for body, made the way a producer makes it."""
    if isinstance(body, str):
        body = body.encode()
    return "t=%d,v1=%s" % (t, mac(secret, body, t))


def mac(secret, body, t):
    return hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()


def now_s():
    """The current UNIX second, taken early enough in that second that a request
    sent right away is answered before the service's clock moves on."""
    frac = time.time() % 1
    if frac > 0.7:
        time.sleep(1.02 - frac)
    return int(time.time())


def envelope(*events):
    return json.dumps({"events": list(events)}).encode()


def signed_post(s, body, secret=SECRET, t=None, token=None, headers=None):
    h = {"Tributary-Signature": sign(secret, body, now_s() if t is None else t)}
    h.update(headers or {})
    return s.post(body=body, token=token, headers=h)


def probe(sock, data, timeout=1.0):
    """Sends data on an open connection; the first bytes of the answer, b"" when
    the server closed the connection, None when nothing came within timeout."""
    sock.settimeout(timeout * SLOW)
    try:
        if data:
            sock.sendall(data)
        return sock.recv(4096)
    except socket.timeout:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def own_address():
    """This machine's non-loopback IPv4 address (the one a default route uses),
    or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.connect(("192.0.2.1", 9))  # no packet is sent
            address = u.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


# ---- HMAC request signatures ----------------------------------------------


class Signatures(ServiceTest):
    def test_signed_request_without_token_is_accepted_when_only_secrets_are_configured(self):
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        e = event()
        r = signed_post(s, envelope(e))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_signed_request_without_token_is_accepted_when_tokens_are_configured_too(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        e = event()
        r = signed_post(s, envelope(e))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_request_without_token_or_signature_is_401_when_only_secrets_are_configured(self):
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        r = s.post([event()], token=None)
        self.assertEqual(r.status, 401, r)
        self.assertEqual(s.queued_ids(), [])

    def test_signature_made_with_a_wrong_secret_is_401(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        r = signed_post(s, envelope(event()), secret="not-the-secret")
        self.assertEqual(r.status, 401, r)
        self.assertEqual(r.json()["error"], "invalid credentials")
        self.assertEqual(s.queued_ids(), [])

    def test_body_changed_after_signing_is_401(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        e = event(campaign_name="Winter sale")
        t = now_s()
        header = sign(SECRET, envelope(e), t)
        e["properties"]["campaign_name"] = "Winter sail"
        r = s.post(body=envelope(e), token=None, headers={"Tributary-Signature": header})
        self.assertEqual(r.status, 401, r)
        self.assertEqual(s.queued_ids(), [])

    def test_timestamp_301_s_in_the_past_is_401_outside_the_replay_window(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        r = signed_post(s, envelope(event()), t=now_s() - 301)
        self.assertEqual(r.status, 401, r)
        self.assertIn("replay window", r.json()["error"])
        self.assertEqual(s.queued_ids(), [])

    def test_timestamp_303_s_in_the_future_is_401_outside_the_replay_window(self):
        # not 301: a request that takes the service's clock into the next
        # second would be 300 s ahead, inside the window
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        r = signed_post(s, envelope(event()), t=now_s() + 303)
        self.assertEqual(r.status, 401, r)
        self.assertIn("replay window", r.json()["error"])
        self.assertEqual(s.queued_ids(), [])

    def test_timestamps_299_s_in_the_past_and_in_the_future_are_accepted(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        past, future = event(), event()
        self.assertEqual(signed_post(s, envelope(past), t=now_s() - 299).status, 200)
        self.assertEqual(signed_post(s, envelope(future), t=now_s() + 299).status, 200)
        self.assertEqual(s.queued_ids(), [past["id"], future["id"]])

    def test_replay_window_s_narrows_the_accepted_timestamps(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET,
                              "TRIBUTARY_INBOUND_REPLAY_WINDOW_S": "10"})
        self.assertEqual(signed_post(s, envelope(event()), t=now_s() - 8).status, 200)
        r = signed_post(s, envelope(event()), t=now_s() - 12)
        self.assertEqual(r.status, 401, r)
        self.assertIn("replay window", r.json()["error"])

    def test_a_signature_made_with_either_of_two_rotated_secrets_is_accepted(self):
        s = self.service(tokens=(), env={
            "TRIBUTARY_INBOUND_HMAC_SECRETS": "%s,%s" % (SECRET, OTHER_SECRET)})
        old, new = event(), event()
        self.assertEqual(signed_post(s, envelope(old), secret=SECRET).status, 200)
        self.assertEqual(signed_post(s, envelope(new), secret=OTHER_SECRET).status, 200)
        self.assertEqual(s.queued_ids(), [old["id"], new["id"]])

    def test_a_header_with_a_wrong_and_a_right_v1_is_accepted(self):
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        e = event()
        body, t = envelope(e), now_s()
        header = "t=%d,v1=%s,v1=%s" % (t, mac("an-old-secret", body, t), mac(SECRET, body, t))
        r = s.post(body=body, token=None, headers={"Tributary-Signature": header})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_malformed_signature_headers_are_401(self):
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        body = envelope(event())
        t = now_s()
        good = mac(SECRET, body, t)
        malformed = {
            "no t": "v1=%s" % good,
            "no v1": "t=%d" % t,
            "t not a number": "t=%sx,v1=%s" % (t, good),
            "bad hex": "t=%d,v1=%s" % (t, "zz" + good[2:]),
            "v1 too short": "t=%d,v1=%s" % (t, good[:-2]),
            "v1 too long": "t=%d,v1=%s" % (t, good + "00"),
            "empty": "",
        }
        for what, header in malformed.items():
            with self.subTest(what):
                r = s.post(body=body, token=None, headers={"Tributary-Signature": header})
                self.assertEqual(r.status, 401, r)
        self.assertEqual(s.queued_ids(), [])


class RequireModes(ServiceTest):
    def both_configured(self, require):
        return self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET,
                                 "TRIBUTARY_INBOUND_REQUIRE": require})

    def test_require_token_refuses_a_valid_signature_without_token(self):
        s = self.both_configured("token")
        self.assertEqual(signed_post(s, envelope(event())).status, 401)
        self.assertEqual(s.post([event()]).status, 200)

    def test_require_signature_refuses_a_valid_token_without_signature(self):
        s = self.both_configured("signature")
        self.assertEqual(s.post([event()]).status, 401)
        self.assertEqual(signed_post(s, envelope(event())).status, 200)

    def test_require_both_needs_token_and_signature(self):
        s = self.both_configured("both")
        self.assertEqual(s.post([event()]).status, 401)
        self.assertEqual(signed_post(s, envelope(event())).status, 401)
        self.assertEqual(signed_post(s, envelope(event()), token="wrong-token").status, 401)
        r = signed_post(s, envelope(event()), secret="wrong-secret", token=TOKEN)
        self.assertEqual(r.status, 401)
        e = event()
        self.assertEqual(signed_post(s, envelope(e), token=TOKEN).status, 200)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_require_either_accepts_a_token_or_a_signature(self):
        s = self.both_configured("either")
        by_token, by_signature = event(), event()
        self.assertEqual(s.post([by_token]).status, 200)
        self.assertEqual(signed_post(s, envelope(by_signature)).status, 200)
        self.assertEqual(s.post([event()], token=None).status, 401)
        self.assertEqual(s.queued_ids(), [by_token["id"], by_signature["id"]])

    def test_a_wrong_token_without_a_signature_is_invalid_not_missing(self):
        # with secrets configured too, a wrong token was taken for no
        # credentials at all
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        r = s.post([event()], token="wrong-token")
        self.assertEqual((r.status, r.json()["error"]), (401, "invalid credentials"), r)
        r = s.post([event()], token=None)
        self.assertEqual((r.status, r.json()["error"]), (401, "missing credentials"), r)

    def test_require_signature_without_secrets_is_a_config_error(self):
        p = run_cli(["check"], cwd=self.tmpdir(), env={
            "TRIBUTARY_RULES_DIR": RULES, "TRIBUTARY_INBOUND_TOKENS": TOKEN,
            "TRIBUTARY_INBOUND_REQUIRE": "signature"})
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn('inbound.require = "signature" needs inbound.hmac_secrets', p.stderr)


class SignCommand(ServiceTest):
    def write_body(self, body):
        path = os.path.join(self.tmpdir(), "body.json")
        with open(path, "wb") as f:
            f.write(body)
        return path

    def test_sign_prints_the_header_python_computes(self):
        body = envelope(event(id="sign-1"))
        path = self.write_body(body)
        p = run_cli(["sign", "--timestamp", "1732800000", path], cwd=self.tmpdir(),
                    env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout, "Tributary-Signature: t=1732800000,v1=%s\n"
                         % mac(SECRET, body, 1732800000))

    def test_a_request_signed_by_the_sign_command_is_accepted(self):
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        e = event()
        body = envelope(e)
        t = now_s()
        p = run_cli(["sign", "--timestamp", str(t), self.write_body(body)], cwd=self.tmpdir(),
                    env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        self.assertEqual(p.returncode, 0, p.stderr)
        name, _, value = p.stdout.strip().partition(": ")
        self.assertEqual(name, "Tributary-Signature")
        r = s.post(body=body, token=None, headers={name: value})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])


class Secrecy(ServiceTest):
    def test_presented_credentials_never_appear_in_responses_or_the_log(self):
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        wrong_token = "wrong-token-7f3a9c0d"
        body, t = envelope(event()), now_s()
        good_sig = sign(SECRET, body, t)
        bad_sig = sign("guessed-secret-11aa", body, t)
        old_sig = sign(SECRET, body, t - 1000)
        answers = [
            s.post(body=body, token=wrong_token),
            s.post(body=body, token=None, headers={"Tributary-Signature": bad_sig}),
            s.post(body=body, token=None, headers={"Tributary-Signature": old_sig}),
            s.post(body=body, token=None, headers={"Tributary-Signature": good_sig}),
            s.post([event()]),
        ]
        self.assertEqual([r.status for r in answers], [401, 401, 401, 200, 200])
        texts = [r.body for r in answers] + [json.dumps(r.headers) for r in answers]
        texts.append(s.logs())
        secrets = [wrong_token, TOKEN, SECRET, "guessed-secret-11aa",
                   good_sig.split("v1=")[1], bad_sig.split("v1=")[1], old_sig.split("v1=")[1]]
        for text in texts:
            for secret in secrets:
                self.assertNotIn(secret, text)


class StoredData(ServiceTest):
    def test_queue_files_are_private_whatever_the_umask_and_an_open_data_dir_is_named(self):
        s = Service()
        self.addCleanup(s.cleanup)
        os.makedirs(s.data_dir, mode=0o755)
        os.chmod(s.data_dir, 0o755)
        old = os.umask(0o022)
        try:
            s.start()
        finally:
            os.umask(old)
        self.assertEqual(s.post([event()]).status, 200)
        for name in os.listdir(s.data_dir):
            mode = os.stat(os.path.join(s.data_dir, name)).st_mode & 0o777
            self.assertEqual(mode, 0o600, "%s is %o" % (name, mode))
        self.assertIn("data_dir can be read by other users", s.logs())
        self.assertIn("mode=0755", s.logs())

    def test_log_lines_never_land_in_the_queue_files_when_stderr_is_closed(self):
        s = Service()
        self.addCleanup(s.cleanup)
        s.log = open(s.log_path, "ab")
        # without TEST_WRAPPER: valgrind needs the stderr this test closes
        s.proc = subprocess.Popen([BIN, "serve"], env=clean_env(s.env), cwd=s.dir,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, close_fds=True,
                                  preexec_fn=lambda: os.close(2))
        s.wait_healthy()
        self.assertEqual(s.post([event()]).status, 200)
        s.post([event()], token="wrong")  # a warning
        self.assertEqual(s.stop(), 0)
        self.assertEqual(os.path.getsize(os.path.join(s.data_dir, "serve.lock")), 0)


# ---- throttling of authentication failures ---------------------------------


class Throttling(ServiceTest):
    def fail_ten_times(self, s, xff):
        statuses = [s.post([event()], token="wrong-token", headers={"X-Forwarded-For": xff}).status
                    for _ in range(10)]
        self.assertEqual(statuses, [401] * 10)

    def test_the_eleventh_failure_of_one_client_is_429_with_retry_after(self):
        s = self.service()
        self.fail_ten_times(s, "203.0.113.7")
        r = s.post([event()], token="wrong-token", headers={"X-Forwarded-For": "203.0.113.7"})
        self.assertEqual(r.status, 429, r)
        self.assertIn("too many authentication failures", r.json()["error"])
        # the refusal lasts a minute from the tenth failure, a few moments ago
        self.assertTrue(55 <= int(r.headers["retry-after"]) <= 60, r.headers)

    def test_failures_from_a_trusted_address_write_at_most_20_lines_a_second(self):
        # an address a request authenticated from is never refused (Braze's
        # serve every customer): another customer's wrong token wrote a line
        # per request there, as fast as it could send
        s = self.service()
        self.assertEqual(s.post([event()]).status, 200)
        start = time.monotonic()
        statuses = [s.post([event()], token="wrong-token").status for _ in range(60)]
        elapsed = time.monotonic() - start
        self.assertEqual(statuses, [401] * 60)
        self.assertEqual(s.metrics()["tributary_auth_failures_total"], 60)
        # at most 20 in any second of the log's clock, and lines left out are said
        seconds = collections.Counter(
            re.match(r"ts=(\S+?)\.", line).group(1) for line in s.logs().splitlines()
            if 'msg="authentication failed"' in line)
        self.assertLessEqual(max(seconds.values()), 20, seconds)
        if sum(seconds.values()) < 60:
            self.assertIn("authentication failures: more this second than the log takes",
                          s.logs())
        if elapsed < 1:
            self.assertLess(sum(seconds.values()), 60)

    def test_a_throttled_client_is_refused_even_with_the_right_token(self):
        s = self.service()
        self.fail_ten_times(s, "203.0.113.7")
        r = s.post([event()], headers={"X-Forwarded-For": "203.0.113.7"})
        self.assertEqual(r.status, 429, r)
        self.assertEqual(s.queued_ids(), [])

    def test_failures_from_an_address_that_also_authenticates_do_not_refuse_it(self):
        # Braze sends every customer's Currents from the same addresses: another
        # customer's wrong token must not have ours refused; whether our success
        # came after the first failure or before any (only an address with
        # failures kept a note of its successes, so one that authenticated first
        # was refused all the same)
        s = self.service()
        for xff, first in (("203.0.113.30", 401), ("203.0.113.31", 200)):
            headers = {"X-Forwarded-For": xff}
            if first == 401:
                self.assertEqual(s.post([event()], token="wrong-token", headers=headers).status, 401)
            self.assertEqual(s.post([event()], headers=headers).status, 200)
            statuses = [s.post([event()], token="wrong-token", headers=headers).status
                        for _ in range(15)]
            self.assertEqual(statuses, [401] * 15, xff)
            e = event()
            self.assertEqual(s.post([e], headers=headers).status, 200)
            self.assertIn(e["id"], s.queued_ids())
        self.assertEqual(s.metrics()["tributary_auth_throttled_total"], 0)

    def test_short_inbound_secrets_are_named_in_a_warning_at_start_but_not_shown(self):
        s = self.service(tokens=("br4ze-7q", TOKEN),
                         env={"TRIBUTARY_INBOUND_HMAC_SECRETS": "k9-short," + SECRET,
                              "TRIBUTARY_ADMIN_TOKEN": "adm1n-x"})
        logs = s.logs()
        self.assertIn("inbound.tokens: token 1 has 8 characters; one that short can be guessed",
                      logs)
        self.assertIn("inbound.hmac_secrets: secret 1 has 8 characters", logs)
        self.assertIn("admin.token: token 1 has 7 characters", logs)
        self.assertNotIn("token 2", logs)
        self.assertNotIn("secret 2", logs)
        for secret in ("br4ze-7q", "k9-short", "adm1n-x"):
            self.assertNotIn(secret, logs)
        self.assertEqual(s.post([event()], token="br4ze-7q").status, 200)

    def test_a_dedup_window_shorter_than_the_replay_window_is_a_warning(self):
        # only the dedup window keeps a signed request, good for the replay
        # window, from being delivered again when replayed
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET,
                              "TRIBUTARY_DEDUP_WINDOW_S": "60"})
        self.assertIn("dedup.window_s (60) is shorter than inbound.replay_window_s (300)",
                      s.logs())
        s2 = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        self.assertNotIn("is shorter than inbound.replay_window_s", s2.logs())

    def test_another_client_is_served_while_one_is_throttled(self):
        s = self.service()
        self.fail_ten_times(s, "203.0.113.7")
        e = event()
        r = s.post([e], headers={"X-Forwarded-For": "203.0.113.8"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_failures_and_refusals_are_counted_in_metrics(self):
        s = self.service()
        self.fail_ten_times(s, "203.0.113.7")
        for _ in range(2):
            s.post([event()], token="wrong-token", headers={"X-Forwarded-For": "203.0.113.7"})
        m = s.metrics()
        self.assertEqual(m["tributary_auth_failures_total"], 10)
        self.assertEqual(m["tributary_auth_throttled_total"], 2)

    def test_signature_failures_count_towards_throttling(self):
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        xff = {"X-Forwarded-For": "203.0.113.20"}
        statuses = [signed_post(s, envelope(event()), secret="guess-%d" % i, headers=xff).status
                    for i in range(10)]
        self.assertEqual(statuses, [401] * 10)
        self.assertEqual(signed_post(s, envelope(event()), headers=xff).status, 429)

    def test_only_the_last_x_forwarded_for_entry_is_the_client(self):
        s = self.service()
        self.fail_ten_times(s, "1.2.3.4, 203.0.113.9")
        r = s.post([event()], headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(r.status, 429, r)
        e = event()
        r = s.post([e], headers={"X-Forwarded-For": "203.0.113.9, 1.2.3.4"})
        self.assertEqual(r.status, 200, r)
        self.assertIn("client=203.0.113.9 ", s.logs())
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_x_forwarded_for_from_a_non_loopback_peer_is_ignored(self):
        address = own_address()
        if not address:
            self.skipTest("no non-loopback IPv4 address on this machine")
        s = Service()
        s.env["TRIBUTARY_LISTEN"] = "0.0.0.0:%d" % s.port
        self.addCleanup(s.cleanup)
        s.start()
        port = s.port

        def post(token, n):
            conn = http.client.HTTPConnection(address, port, timeout=30 * SLOW)
            try:
                conn.request("POST", "/currents", envelope(event()), {
                    "Authorization": "Bearer " + token, "Content-Type": "application/json",
                    "X-Forwarded-For": "203.0.113.%d" % n})
                return conn.getresponse().status
            finally:
                conn.close()

        self.assertEqual([post("wrong-token", n) for n in range(10)], [401] * 10)
        self.assertEqual(post(TOKEN, 99), 429)
        self.assertIn("client=%s " % address, s.logs())

    def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(self):
        address = own_address()
        if not address:
            self.skipTest("no non-loopback IPv4 address on this machine")
        s = Service(env={"TRIBUTARY_HTTP_TRUSTED_PROXIES": "192.0.2.1," + address})
        s.env["TRIBUTARY_LISTEN"] = "0.0.0.0:%d" % s.port
        self.addCleanup(s.cleanup)
        s.start()

        def post(token, client):
            conn = http.client.HTTPConnection(address, s.port, timeout=30 * SLOW)
            try:
                conn.request("POST", "/currents", envelope(event()), {
                    "Authorization": "Bearer " + token, "Content-Type": "application/json",
                    "X-Forwarded-For": client})
                return conn.getresponse().status
            finally:
                conn.close()

        # a load balancer's failures are its clients' own: the real sender stays served
        self.assertEqual([post("wrong-token", "203.0.113.66") for _ in range(10)], [401] * 10)
        self.assertEqual(post("wrong-token", "203.0.113.66"), 429)
        self.assertEqual(post(TOKEN, "203.0.113.99"), 200)
        self.assertIn("client=203.0.113.66 ", s.logs())


# ---- the admin endpoint ----------------------------------------------------


class Admin(ServiceTest):
    def admin_reload(self, s, token, xff="203.0.113.50"):
        headers = {"X-Forwarded-For": xff}
        if token:
            headers["Authorization"] = "Bearer " + token
        return request(s.port, "POST", "/admin/reload", b"", headers)

    def test_admin_failures_are_throttled_even_for_the_right_token(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        statuses = [self.admin_reload(s, "wrong-admin-%d" % i).status for i in range(10)]
        self.assertEqual(statuses, [401] * 10)
        r = self.admin_reload(s, ADMIN)
        self.assertEqual(r.status, 429, r)
        self.assertTrue(1 <= int(r.headers["retry-after"]) <= 60, r.headers)
        self.assertEqual(self.admin_reload(s, ADMIN, xff="203.0.113.51").status, 200)

    def test_the_admin_token_does_not_authenticate_currents(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        r = s.post([event()], token=ADMIN)
        self.assertEqual(r.status, 401, r)
        self.assertEqual(s.queued_ids(), [])

    def test_a_wrong_admin_token_is_not_echoed_or_logged(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        r = self.admin_reload(s, "wrong-admin-c0ffee42")
        self.assertEqual(r.status, 401, r)
        self.assertNotIn("wrong-admin-c0ffee42", r.body)
        self.assertNotIn("wrong-admin-c0ffee42", s.logs())
        self.assertNotIn(ADMIN, s.logs())


class MetricsToken(ServiceTest):
    def scrape(self, s, token, xff="203.0.113.60"):
        headers = {"X-Forwarded-For": xff}
        if token:
            headers["Authorization"] = "Bearer " + token
        return request(s.port, "GET", "/metrics", headers=headers)

    def test_metrics_answer_only_the_metrics_token_once_one_is_set(self):
        s = self.service(env={"TRIBUTARY_METRICS_TOKEN": METRICS, "TRIBUTARY_ADMIN_TOKEN": ADMIN})
        for token in (None, "wrong-metrics-5e1d", TOKEN, ADMIN):
            r = self.scrape(s, token)
            self.assertEqual(r.status, 401, (token, r))
            self.assertEqual(r.json(), {"error": "metrics token required"})
            self.assertNotIn("tributary_", r.body)
        r = self.scrape(s, METRICS)
        self.assertEqual(r.status, 200, r)
        # counted apart from Braze's refusals, which TributaryInboundAuthFailing reads
        self.assertIn("tributary_metrics_auth_failures_total 4", r.body)
        self.assertIn("tributary_auth_failures_total 0", r.body)
        # the health checks of load balancers and orchestrators need nothing
        self.assertEqual(s.get("/healthz").status, 200)
        self.assertIn(s.get("/readyz").status, (200, 503))
        # nor does the metrics token open anything else
        self.assertEqual(s.post([event()], token=METRICS).status, 401)
        refused = [line for line in s.logs().splitlines()
                   if "request refused: no valid token" in line]
        self.assertEqual(len(refused), 4, refused)
        self.assertTrue(all("path=/metrics" in line for line in refused), refused)
        self.assertNotIn("wrong-metrics-5e1d", s.logs())
        self.assertNotIn(METRICS, s.logs())

    def test_metrics_failures_are_throttled_as_other_authentication_failures(self):
        s = self.service(env={"TRIBUTARY_METRICS_TOKEN": METRICS})
        self.assertEqual([self.scrape(s, "wrong-%d" % i).status for i in range(10)], [401] * 10)
        r = self.scrape(s, METRICS)
        self.assertEqual(r.status, 429, r)
        self.assertTrue(1 <= int(r.headers["retry-after"]) <= 60, r.headers)
        self.assertEqual(self.scrape(s, METRICS, xff="203.0.113.61").status, 200)

    def test_a_good_scrape_does_not_make_its_address_trusted_by_the_throttle(self):
        # an address that authenticated on /currents is never throttled (Braze
        # shares its addresses); a scraper's token must not buy that
        s = self.service(env={"TRIBUTARY_METRICS_TOKEN": METRICS})
        self.assertEqual(self.scrape(s, METRICS, xff="203.0.113.62").status, 200)
        xff = {"X-Forwarded-For": "203.0.113.62"}
        statuses = [s.post([event()], token="wrong-token-%02d-abcdef" % i, headers=xff).status
                    for i in range(11)]
        self.assertEqual(statuses, [401] * 10 + [429])

    def test_a_reload_sets_and_takes_away_the_metrics_token(self):
        s = self.service(config="return {}\n")
        self.assertEqual(self.scrape(s, None).status, 200)
        self.assertTrue(s.reload('return { metrics = { token = "%s" } }\n' % METRICS))
        self.assertEqual(self.scrape(s, None).status, 401)
        self.assertEqual(self.scrape(s, METRICS).status, 200)
        self.assertTrue(s.reload("return {}\n"))
        self.assertEqual(self.scrape(s, None).status, 200)


# ---- the TLS listener ------------------------------------------------------


class TLSService(Service):
    """A service with tls.cert / tls.key: health is checked over HTTPS."""

    def __init__(self, cert, key, **kw):
        env = kw.pop("env", {})
        env.update({"TRIBUTARY_TLS_CERT": cert, "TRIBUTARY_TLS_KEY": key})
        super().__init__(env=env, **kw)
        self.cert = cert

    def wait_healthy(self, timeout=15):
        deadline = time.time() + timeout * SLOW
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("service exited with %d:\n%s"
                                     % (self.proc.returncode, self.logs()))
            try:
                if https_request(self.port, self.cert, "GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("service did not become healthy over HTTPS:\n" + self.logs())


def tls_connect(port, context, timeout=10):
    """A TLS socket to 127.0.0.1:port that verifies the name localhost."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout * SLOW)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def https_request(port, cafile, method, path, body=None, headers=None, context=None,
                  timeout=10):
    """(status, body, TLS version) of one HTTPS request."""
    context = context or ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("localhost", port, timeout=timeout * SLOW)
    conn.sock = tls_connect(port, context, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        version = conn.sock.version()  # gone once an answer that closes is read
        r = conn.getresponse()
        return r.status, r.read().decode(), version
    finally:
        conn.close()


class TLS(ServiceTest):
    @classmethod
    def setUpClass(cls):
        cls.pki = tempfile.mkdtemp(prefix="tributary-it-tls-")
        cls.cert = os.path.join(cls.pki, "cert.pem")
        cls.key = os.path.join(cls.pki, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", cls.key, "-out", cls.cert, "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                       check=True, capture_output=True)
        os.chmod(cls.key, 0o600)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.pki, ignore_errors=True)

    def tls_service(self, key=None, **kw):
        s = TLSService(self.cert, key or self.key, **kw)
        self.addCleanup(s.cleanup)
        return s

    def test_currents_is_served_over_https_with_the_configured_certificate(self):
        s = self.tls_service().start()
        e = event()
        status, body, version = https_request(
            s.port, self.cert, "POST", "/currents", envelope(e),
            {"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"})
        self.assertEqual(status, 200, body)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(s.queued_ids(), [e["id"]])
        self.assertIn("listen=https://", s.logs())

    def test_failed_handshakes_are_counted_and_said_once_a_minute(self):
        # what an operator sees when Braze cannot connect: a certificate
        # renewed without its intermediates, or an http:// connector URL
        s = self.tls_service().start()
        with self.assertRaises(ssl.SSLCertVerificationError):
            https_request(s.port, None, "GET", "/healthz", context=ssl.create_default_context())
        with self.assertRaises((ConnectionError, http.client.HTTPException)):
            request(s.port, "POST", "/currents", envelope(event()),
                    {"Authorization": "Bearer " + TOKEN})

        def failures():
            _, body, _ = https_request(s.port, self.cert, "GET", "/metrics")
            return int(float(re.search(r"^tributary_tls_handshake_failures_total (\S+)$", body,
                                       re.M).group(1)))

        self.wait(lambda: failures() == 2, what="two handshake failures counted")
        said = [line for line in s.logs().splitlines() if "TLS handshakes failed" in line]
        self.assertEqual(len(said), 1, said)
        self.assertIn("level=info", said[0])
        # the second may come before the first is said
        self.assertRegex(said[0], r" failures=[12] ")

    def test_open_metrics_on_an_address_others_reach_are_named_in_a_warning(self):
        said = "GET /metrics answers anyone who reaches 0.0.0.0:"
        s = self.tls_service()
        s.env["TRIBUTARY_LISTEN"] = "0.0.0.0:%d" % s.port
        s.start()
        self.assertIn(said, s.logs())
        self.assertIn("set metrics.token (TRIBUTARY_METRICS_TOKEN)", s.logs())
        status, _, _ = https_request(s.port, self.cert, "GET", "/metrics")
        self.assertEqual(status, 200)
        s.stop()
        guarded = self.tls_service(env={"TRIBUTARY_METRICS_TOKEN": METRICS})
        guarded.env["TRIBUTARY_LISTEN"] = "0.0.0.0:%d" % guarded.port
        guarded.start()
        self.assertNotIn(said, guarded.logs())
        status, body, _ = https_request(guarded.port, self.cert, "GET", "/metrics")
        self.assertEqual((status, json.loads(body)), (401, {"error": "metrics token required"}))
        status, _, _ = https_request(guarded.port, self.cert, "GET", "/metrics",
                                     headers={"Authorization": "Bearer " + METRICS})
        self.assertEqual(status, 200)

    def test_tls_1_2_is_accepted(self):
        s = self.tls_service().start()
        ctx = ssl.create_default_context(cafile=self.cert)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        status, _, version = https_request(s.port, None, "GET", "/healthz", context=ctx)
        self.assertEqual((status, version), (200, "TLSv1.2"))

    def test_only_elliptic_curve_key_exchange_is_offered(self):
        # a finite-field group (TLS 1.3 took ffdhe2048 to ffdhe8192) costs the
        # server up to 0.3 s of CPU per handshake, the client nothing (DHEat)
        s = self.tls_service().start()

        def handshake(group):
            p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % s.port,
                                "-tls1_3", "-groups", group, "-brief"],
                               input=b"", capture_output=True, timeout=30 * SLOW)
            return p.returncode == 0 and b"Protocol version: TLSv1.3" in p.stderr + p.stdout

        for group in ("ffdhe2048", "ffdhe8192"):
            self.assertFalse(handshake(group), group)
        for group in ("X25519", "P-256", "P-384"):
            self.assertTrue(handshake(group), group)

    def test_tls_1_1_is_refused(self):
        s = self.tls_service().start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            # Let this client really offer TLS 1.0/1.1 (OpenSSL 3 disables them at
            # its default security level), so a failure is the server's refusal.
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with self.assertRaises((ssl.SSLError, ConnectionError)) as caught:
            with tls_connect(s.port, ctx) as t:
                self.fail("handshake succeeded with %s" % t.version())
        self.assertNotIn("NO_PROTOCOLS_AVAILABLE", str(caught.exception))
        # and the listener still serves modern clients
        self.assertEqual(https_request(s.port, self.cert, "GET", "/healthz")[0], 200)

    def test_a_key_readable_by_group_or_others_stops_the_start(self):
        loose = os.path.join(self.tmpdir(), "key.pem")
        shutil.copy(self.key, loose)
        # readable by its group only is refused too
        os.chmod(loose, 0o640)
        p = run_cli(["check"], env={"TRIBUTARY_TLS_CERT": self.cert, "TRIBUTARY_TLS_KEY": loose,
                                    "TRIBUTARY_RULES_DIR": RULES})
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("must not be readable by group or others (chmod 600)", p.stderr)
        os.chmod(loose, 0o644)
        s = self.tls_service(key=loose)
        s.expected_exit = 78  # EX_CONFIG
        s.start(wait=False)
        try:
            code = s.proc.wait(timeout=15 * SLOW)
        except subprocess.TimeoutExpired:
            self.fail("service started with a world-readable key:\n" + s.logs())
        self.assertEqual(code, 78, s.logs())
        self.assertIn("chmod 600", s.logs())
        # and `check` says so before a start is tried
        p = run_cli(["check"], env={"TRIBUTARY_TLS_CERT": self.cert, "TRIBUTARY_TLS_KEY": loose,
                                    "TRIBUTARY_RULES_DIR": RULES})
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("tls.key: %s must not be readable by group or others (chmod 600)" % loose,
                      p.stderr)

    def pair(self, cn, days=1):
        """A new self-signed certificate for localhost and its key, in a
        directory of their own: (cert, key)."""
        d = self.tmpdir()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                        "-days", str(days), "-subj", "/CN=" + cn,
                        "-addext", "subjectAltName=DNS:localhost"],
                       check=True, capture_output=True)
        os.chmod(key, 0o600)
        return cert, key

    def dated_pair(self, cn, start, end):
        """A self-signed certificate valid from start to end (YYYYMMDDHHMMSSZ)
        and its key: (cert, key)."""
        d = self.tmpdir()
        cert, key, csr = (os.path.join(d, n) for n in ("cert.pem", "key.pem", "csr.pem"))
        subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr,
                        "-subj", "/CN=" + cn], check=True, capture_output=True)
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca = d\n[d]\ndatabase = %s/index.txt\nnew_certs_dir = %s\n"
                    "serial = %s/serial\ndefault_md = sha256\npolicy = p\n[p]\n"
                    "commonName = supplied\n" % (d, d, d))
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "serial"), "w") as f:
            f.write("01\n")
        subprocess.run(["openssl", "ca", "-batch", "-notext", "-selfsign", "-keyfile", key,
                        "-in", csr, "-out", cert, "-startdate", start, "-enddate", end,
                        "-config", os.path.join(d, "ca.cnf")], check=True, capture_output=True)
        os.chmod(key, 0o600)
        return cert, key

    def dsa_pair(self):
        d = self.tmpdir()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(["openssl", "dsaparam", "-genkey", "-out", key, "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "req", "-x509", "-key", key, "-subj", "/CN=dsa", "-days", "2",
                        "-out", cert], check=True, capture_output=True)
        os.chmod(key, 0o600)
        return cert, key

    def rsa_pair(self, bits, *ext):
        """A self-signed RSA certificate of `bits` for localhost, with more
        extensions (-addext values), and its key: (cert, key)."""
        d = self.tmpdir()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        extra = [a for e in ext for a in ("-addext", e)]
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:%d" % bits, "-nodes",
                        "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost"] + extra,
                       check=True, capture_output=True)
        os.chmod(key, 0o600)
        return cert, key

    def served_certificate(self, port):
        """The DER of the certificate the listener presents to a new connection."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with tls_connect(port, ctx) as t:
            return t.getpeercert(binary_form=True)

    @staticmethod
    def der(cert):
        with open(cert) as f:
            return ssl.PEM_cert_to_DER_cert(f.read())

    def test_a_reload_serves_a_renewed_certificate_to_new_connections(self):
        old_cert, old_key = self.pair("old.example", days=5)
        d = self.tmpdir()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        shutil.copy(old_cert, cert)
        shutil.copy(old_key, key)
        # the kept connection below stays idle through the renewal
        s = TLSService(cert, key, env={"TRIBUTARY_HTTP_TIMEOUT_S": "600"})
        self.addCleanup(s.cleanup)
        s.cert = old_cert
        s.start()
        self.assertEqual(self.served_certificate(s.port), self.der(old_cert))
        self.assertIn("the TLS certificate expires soon", s.logs())
        # a connection kept from before the renewal goes on working
        ctx = ssl.create_default_context(cafile=old_cert)
        kept = http.client.HTTPSConnection("localhost", s.port, timeout=10 * SLOW)
        kept.sock = tls_connect(s.port, ctx)
        self.addCleanup(kept.close)
        new_cert, new_key = self.pair("new.example", days=90)
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        self.assertTrue(s.reload(), s.logs())
        self.assertEqual(self.served_certificate(s.port), self.der(new_cert))
        self.assertIn('msg="TLS certificate replaced; new connections get it" '
                      'subject="CN=new.example"', s.logs())
        kept.request("GET", "/healthz")
        self.assertEqual(kept.getresponse().status, 200)
        status, body, _ = https_request(s.port, new_cert, "GET", "/metrics")
        self.assertEqual(status, 200)
        expiry = float(re.search(r"^tributary_tls_certificate_expiry_timestamp_seconds (\S+)$",
                                 body, re.M).group(1))
        self.assertAlmostEqual(expiry, time.time() + 90 * 86400, delta=2 * 86400)
        # the same files again change nothing
        self.assertTrue(s.reload(), s.logs())
        self.assertEqual(s.logs().count("TLS certificate replaced"), 1)

    def test_a_replaced_certificate_is_released_once_no_connection_may_hold_it(self):
        # every replaced pair, its private key too, stayed in memory until the
        # service stopped: 8 KiB a renewal, and every key it ever served
        first_cert, first_key = self.pair("first.example")
        d = self.tmpdir()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        shutil.copy(first_cert, cert)
        shutil.copy(first_key, key)
        s = TLSService(cert, key, env={"TRIBUTARY_HTTP_TIMEOUT_S": "600",
                                       "TRIBUTARY_LOG_LEVEL": "debug"})
        self.addCleanup(s.cleanup)
        s.cert = first_cert
        s.start()
        released = "replaced TLS certificates released"
        # a connection accepted before the renewal may still be in its handshake
        kept = http.client.HTTPSConnection("localhost", s.port, timeout=10 * SLOW)
        kept.sock = tls_connect(s.port, ssl.create_default_context(cafile=first_cert))
        self.addCleanup(kept.close)
        for name in ("second.example", "third.example"):
            new_cert, new_key = self.pair(name)
            shutil.copy(new_cert, cert)
            shutil.copy(new_key, key)
            self.assertTrue(s.reload(), s.logs())
            self.assertEqual(self.served_certificate(s.port), self.der(new_cert))
        time.sleep(2.5)  # two turns of the watchdog
        self.assertNotIn(released, s.logs())
        kept.request("GET", "/healthz")
        self.assertEqual(kept.getresponse().status, 200)
        kept.close()
        # both replaced pairs go once it has closed
        self.wait(lambda: released in s.logs(), 10, "the replaced pairs released")
        self.assertIn('msg="%s: no connection may hold them any more" pairs=2' % released,
                      s.logs())
        # with no connection open, the next one goes within a turn or two
        shutil.copy(first_cert, cert)
        shutil.copy(first_key, key)
        self.assertTrue(s.reload(), s.logs())
        self.wait(lambda: s.logs().count(released) == 2, 10, "the third pair released")
        self.assertIn("%s: no connection may hold them any more\" pairs=1" % released, s.logs())
        status, _, _ = https_request(s.port, first_cert, "GET", "/healthz")
        self.assertEqual(status, 200)

    def serving_copies(self):
        """A started service whose certificate and key are copies of the
        class's pair, for a reload to replace: (service, cert, key)."""
        d = self.tmpdir()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        shutil.copy(self.cert, cert)
        shutil.copy(self.key, key)
        s = TLSService(cert, key)
        self.addCleanup(s.cleanup)
        s.start()
        return s, cert, key

    def test_a_reload_with_a_key_of_another_certificate_keeps_the_one_in_use(self):
        s, cert, key = self.serving_copies()
        other_cert, _ = self.pair("other.example")
        shutil.copy(other_cert, cert)  # renewed halfway: the key is still the old one
        self.assertTrue(s.reload(outcome="reload refused"), s.logs())
        self.assertIn("tls.key: %s is not the key of the certificate in %s" % (key, cert), s.logs())
        self.assertEqual(self.served_certificate(s.port), self.der(self.cert))
        self.assertEqual(https_request(s.port, self.cert, "GET", "/healthz")[0], 200)

    def test_a_reload_with_a_certificate_no_handshake_can_use_keeps_the_one_in_use(self):
        s, cert, key = self.serving_copies()
        for (new_cert, new_key), says in (
                (self.dated_pair("expired", "20200101000000Z", "20200201000000Z"),
                 "expired at 2020-02-01T00:00:00Z"),
                (self.dated_pair("later", "20990101000000Z", "20990201000000Z"),
                 "is not valid before 2099-01-01T00:00:00Z"),
                (self.dsa_pair(), "is a DSA key"),
                # signs nothing: every handshake would fail
                (self.rsa_pair(2048, "keyUsage=critical,keyEncipherment"),
                 "its key usage lacks digitalSignature"),
                (self.rsa_pair(1024), "is an RSA key of 1024 bits; the listener takes 2048")):
            with self.subTest(says=says):
                shutil.copy(new_cert, cert)
                shutil.copy(new_key, key)
                self.assertTrue(s.reload(outcome="reload refused"), s.logs())
                self.assertIn(says, s.logs())
                self.assertEqual(self.served_certificate(s.port), self.der(self.cert))
                self.assertEqual(https_request(s.port, self.cert, "GET", "/healthz")[0], 200)
        self.assertNotIn("TLS certificate replaced", s.logs())

    def test_a_start_with_a_certificate_outside_its_dates_serves_it_and_raises_the_alarm(self):
        # Braze cannot connect, but what is queued still goes to mParticle
        for (start, end), alert in (
                (("20200101000000Z", "20200201000000Z"),
                 "ALERT: the TLS certificate has expired; Braze cannot connect"),
                (("20990101000000Z", "20990201000000Z"),
                 "ALERT: the TLS certificate is not valid yet; Braze cannot connect")):
            with self.subTest(alert=alert):
                cert, key = self.dated_pair("dated", start, end)
                s = TLSService(cert, key)
                self.addCleanup(s.cleanup)
                s.start(wait=False)  # a client that verifies it cannot say it is healthy
                self.wait(lambda: alert in s.logs(), what="the alert")
                served = None
                deadline = time.time() + 10 * SLOW
                while served is None and time.time() < deadline:
                    try:
                        served = self.served_certificate(s.port)
                    except OSError:
                        time.sleep(0.05)
                self.assertEqual(served, self.der(cert))
                self.assertIsNone(s.proc.poll())

    def test_check_refuses_tls_and_ca_files_that_cannot_be_used(self):
        d = self.tmpdir()
        garbage = os.path.join(d, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        os.chmod(garbage, 0o600)
        encrypted = os.path.join(d, "encrypted.pem")
        subprocess.run(["openssl", "pkey", "-in", self.key, "-aes256", "-passout", "pass:pw",
                        "-out", encrypted], check=True, capture_output=True)
        os.chmod(encrypted, 0o600)
        _, other_key = self.pair("other.example")
        # a revocation list alone: curl loads it, and then trusts no server
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca = d\n[d]\ndatabase = %s/index.txt\ndefault_md = sha256\n"
                    "default_crl_days = 1\n" % d)
        open(os.path.join(d, "index.txt"), "w").close()
        crl = os.path.join(d, "crl.pem")
        subprocess.run(["openssl", "ca", "-gencrl", "-keyfile", self.key, "-cert", self.cert,
                        "-out", crl, "-config", os.path.join(d, "ca.cnf")],
                       check=True, capture_output=True)
        cases = (
            ({"TRIBUTARY_TLS_CERT": garbage, "TRIBUTARY_TLS_KEY": self.key},
             "tls.cert: %s holds no PEM certificate that can be read" % garbage),
            ({"TRIBUTARY_TLS_CERT": self.cert, "TRIBUTARY_TLS_KEY": garbage},
             "tls.key: %s is not a PEM private key that can be read" % garbage),
            ({"TRIBUTARY_TLS_CERT": self.cert, "TRIBUTARY_TLS_KEY": encrypted},
             "(an encrypted key is not supported)"),
            ({"TRIBUTARY_TLS_CERT": self.cert, "TRIBUTARY_TLS_KEY": other_key},
             "tls.key: %s is not the key of the certificate in %s" % (other_key, self.cert)),
            (dict(zip(("TRIBUTARY_TLS_CERT", "TRIBUTARY_TLS_KEY"),
                      self.dated_pair("expired", "20200101000000Z", "20200201000000Z"))),
             "the certificate in %s expired at 2020-02-01T00:00:00Z"),
            (dict(zip(("TRIBUTARY_TLS_CERT", "TRIBUTARY_TLS_KEY"), self.dsa_pair())),
             "is a DSA key; the listener signs its key exchange with an RSA, ECDSA or EdDSA key"),
            ({"TRIBUTARY_MPARTICLE_CA_BUNDLE": garbage},
             "mparticle.ca_bundle: %s holds no PEM certificate that can be read" % garbage),
            ({"TRIBUTARY_MPARTICLE_CA_BUNDLE": crl},
             "mparticle.ca_bundle: %s holds no PEM certificate that can be read" % crl),
        )
        for env, message in cases:
            with self.subTest(message=message):
                if "%s" in message:
                    message = message % env["TRIBUTARY_TLS_CERT"]
                env["TRIBUTARY_RULES_DIR"] = RULES
                p = run_cli(["check"], cwd=self.tmpdir(), env=env)
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertIn(message, p.stderr)
                self.assertNotIn("PRIVATE KEY", p.stderr)
        # and a good CA bundle passes
        p = run_cli(["check"], cwd=self.tmpdir(), env={"TRIBUTARY_RULES_DIR": RULES,
                                                       "TRIBUTARY_MPARTICLE_CA_BUNDLE": self.cert})
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_tls_cert_without_key_is_a_config_error(self):
        p = run_cli(["check"], cwd=self.tmpdir(), env={
            "TRIBUTARY_RULES_DIR": RULES, "TRIBUTARY_TLS_CERT": self.cert})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("tls: cert and key must be set together (only the cert is set)", p.stderr)

    def test_tls_key_without_cert_is_a_config_error(self):
        p = run_cli(["check"], cwd=self.tmpdir(), env={
            "TRIBUTARY_RULES_DIR": RULES, "TRIBUTARY_TLS_KEY": self.key})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("tls: cert and key must be set together (only the key is set)", p.stderr)


# ---- bounds ----------------------------------------------------------------


def envelope_of_size(n):
    """A valid one-event envelope of exactly n bytes, and its event."""
    e = event(pad="")
    e["properties"]["pad"] = "x" * (n - len(envelope(e)))
    body = envelope(e)
    assert len(body) == n, len(body)
    return body, e


def nested(levels):
    """An object nested `levels` deep: {"k": {"k": ... "x"}}."""
    v = "x"
    for _ in range(levels):
        v = {"k": v}
    return v


def post_chunked(port, body, chunk=512):
    """POSTs body to /currents with Transfer-Encoding: chunked (no Content-Length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30 * SLOW)
    try:
        chunks = (body[i:i + chunk] for i in range(0, len(body), chunk))
        conn.request("POST", "/currents", body=chunks, encode_chunked=True, headers={
            "Authorization": "Bearer " + TOKEN, "Content-Type": "application/json",
            "Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


class BodyBounds(ServiceTest):
    LIMIT = {"TRIBUTARY_INBOUND_MAX_BODY_BYTES": "2048"}

    def test_a_request_whose_events_take_more_than_128_mib_decoded_is_413(self):
        # 6 MB of empty objects: 2 million Lua tables, about 150 MB; eight
        # requests of 16 MiB (http.threads) decoded at once took gigabytes. The
        # size is judged from the text, before decoding: lua-cjson leaks its
        # copy of the text when a memory error stops it (LeakSanitizer and
        # valgrind runs of this test say so)
        s = self.service()
        events = [event("users.messages.email.Send", user="u-%d" % i, tables="PLACEHOLDER")
                  for i in range(8)]
        body = json.dumps({"events": events}).replace(
            '"PLACEHOLDER"', "[" + ",".join(["{}"] * 250000) + "]").encode()
        r = s.post(body=body)
        self.assertEqual(r.status, 413, r)   # Braze sends the events again, fewer at a time
        self.assertIn("may take more than 128 MiB decoded", r.body)
        self.assertEqual(s.queued_ids(), [])
        # fewer at a time, as Braze splits them, pass
        pair = json.dumps({"events": events[:2]}).replace(
            '"PLACEHOLDER"', "[" + ",".join(["{}"] * 250000) + "]").encode()
        self.assertEqual(s.post(body=pair).status, 200)
        self.assertEqual(sorted(s.queued_ids()), sorted(e["id"] for e in events[:2]))
        # a large request of ordinary events is far from the bound: 4 MB, about 30 MiB
        large = [event("users.messages.email.Send", user="l-%d" % i, padding="p" * 900)
                 for i in range(4000)]
        self.assertEqual(s.post(large).status, 200)
        self.assertEqual(len(s.queued_ids()), 2 + len(large))
        # text is text: empty objects written inside a string (escaped quotes
        # and backslashes too) are its bytes, not 2 million tables
        text = event("users.messages.email.Send", user="t-1", note='\\"' + "{}," * 1000000 + '\\')
        self.assertEqual(s.post([text]).status, 200)

    def test_a_body_of_exactly_max_body_bytes_is_accepted(self):
        s = self.service(env=self.LIMIT)
        body, e = envelope_of_size(2048)
        r = s.post(body=body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_a_body_one_byte_over_max_body_bytes_is_413(self):
        s = self.service(env=self.LIMIT)
        body, _ = envelope_of_size(2049)
        r = s.post(body=body)
        self.assertEqual(r.status, 413, r)
        self.assertIn("2048", r.json()["error"])
        self.assertEqual(s.queued_ids(), [])

    def test_a_body_over_max_body_bytes_is_a_warning_naming_client_limit_and_length(self):
        s = self.service(env=self.LIMIT)
        body, _ = envelope_of_size(2049)
        self.assertEqual(s.post(body=body).status, 413)
        lines = [l for l in s.logs().splitlines() if "body too large" in l]
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertRegex(lines[0], r'level=warn msg="request refused: body too large; answered '
                                   r'413" request_id=\S+ client=127\.0\.0\.1 limit_bytes=2048 '
                                   r'content_length=2049$')
        self.assertNotIn(TOKEN, lines[0])

    def test_a_chunked_body_over_max_body_bytes_is_a_warning_without_a_length(self):
        s = self.service(env=self.LIMIT)
        body, _ = envelope_of_size(2049)
        self.assertEqual(post_chunked(s.port, body)[0], 413)
        lines = [l for l in s.logs().splitlines() if "body too large" in l]
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertRegex(lines[0], r'level=warn msg="request refused: body too large; answered '
                                   r'413" request_id=\S+ client=127\.0\.0\.1 limit_bytes=2048$')

    def test_a_chunked_body_of_exactly_max_body_bytes_is_accepted(self):
        s = self.service(env=self.LIMIT)
        body, e = envelope_of_size(2048)
        status, text = post_chunked(s.port, body)
        self.assertEqual(status, 200, text)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_a_chunked_body_one_byte_over_max_body_bytes_is_413(self):
        s = self.service(env=self.LIMIT)
        body, _ = envelope_of_size(2049)
        status, text = post_chunked(s.port, body)
        self.assertEqual(status, 413, text)
        self.assertEqual(s.queued_ids(), [])

    def test_a_signed_request_over_max_body_bytes_is_413_whatever_its_size(self):
        # before its signature can be checked, a body counts against a shared
        # budget (busy: 503); one that is too large anyway gets 413 first
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        for size in (20 << 20, 70 << 20):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
            try:
                sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\n"
                              "Tributary-Signature: t=%d,v1=%s\r\nContent-Length: %d\r\n\r\n"
                              % (int(time.time()), "0" * 64, size)).encode())
                line = sock.recv(4096).decode(errors="replace").split("\r\n")[0]
            finally:
                sock.close()
            self.assertIn(" 413 ", line, size)


    def test_a_dropped_chunked_body_leaves_the_budget_of_unauthenticated_bodies(self):
        # Bodies awaiting their signature check share a 64 MiB budget. The
        # bytes of a chunked body read on past max_body bytes were still
        # charged to it: two such bodies of 36 MiB, never authenticated, got
        # the second one's connection closed for the budget. Each gets its 413.
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        socks = []
        try:
            for _ in range(2):
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=30 * SLOW)
                socks.append(sock)
                sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\n"
                              "Tributary-Signature: t=%d,v1=%s\r\n"
                              "Transfer-Encoding: chunked\r\n\r\n"
                              % (int(time.time()), "0" * 64)).encode())
                chunk = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
                for _ in range(36):
                    sock.sendall(chunk)
            for sock in socks:
                sock.sendall(b"0\r\n\r\n")
                line = sock.recv(4096).decode(errors="replace").split("\r\n")[0]
                self.assertIn(" 413 ", line)
        finally:
            for sock in socks:
                sock.close()
        self.assertNotIn("too many request bodies awaiting their signature check", s.logs())

    # The bodies held at once, all requests together, share inbound.body_memory_mb.
    MEMORY = {"TRIBUTARY_INBOUND_MAX_BODY_BYTES": str(1 << 20),
              "TRIBUTARY_INBOUND_BODY_MEMORY_MB": "2"}

    @staticmethod
    def head(length=None, signature=None):
        framing = ("Content-Length: %d" % length) if length is not None else \
            "Transfer-Encoding: chunked"
        auth = ("Tributary-Signature: t=%d,v1=%s" % (int(time.time()), "0" * 64) if signature
                else "Authorization: Bearer " + TOKEN)
        return ("POST /currents HTTP/1.1\r\nHost: x\r\n%s\r\n"
                "Content-Type: application/json\r\n%s\r\n\r\n" % (auth, framing)).encode()

    def connect(self, s):
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30 * SLOW)
        self.addCleanup(sock.close)
        return sock

    def held_bytes(self, s, want):
        """Waits until the service has taken `want` bytes for request bodies."""
        deadline = time.time() + 10 * SLOW
        while time.time() < deadline:
            held = s.metrics()["tributary_http_request_body_bytes"]
            if held == want:
                return
            time.sleep(0.05)
        self.fail("request bodies held: %d bytes, not %d" % (held, want))

    def busy(self, answer):
        self.assertTrue(answer and answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"Retry-After: 5\r\n", answer)
        self.assertIn(b'{"error":"busy"}', answer)

    def test_bodies_held_at_once_share_inbound_body_memory_mb(self):
        s = self.service(env=self.MEMORY)
        # a length known takes its room at the headers: two of 1,000,000 take
        # all but 97,152 bytes of the 2 MiB, one of them half sent
        body, e = envelope_of_size(1000000)
        a = self.connect(s)
        a.sendall(self.head(len(body)) + body[:600000])
        other, e2 = envelope_of_size(1000000)
        a2 = self.connect(s)
        a2.sendall(self.head(len(other)))
        self.held_bytes(s, 2000000)
        # 200,000 more would pass it: answered at once, before the body
        self.busy(probe(self.connect(s), self.head(200000), timeout=10))
        # without a length it is known only as it comes: read, dropped, then answered
        status, text = post_chunked(s.port, envelope_of_size(200000)[0], chunk=1 << 16)
        self.assertEqual((status, json.loads(text)), (503, {"error": "busy"}))
        self.held_bytes(s, 2000000)  # the dropped body left at once
        # what fits still comes in, and the held requests complete
        small = event()
        self.assertEqual(s.post([small]).status, 200)
        for sock, rest in ((a, body[600000:]), (a2, other)):
            answer = probe(sock, rest, timeout=10)
            self.assertTrue(answer and answer.startswith(b"HTTP/1.1 200 "), answer)
        self.held_bytes(s, 0)
        self.assertEqual(sorted(s.queued_ids()), sorted([e["id"], e2["id"], small["id"]]))
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="503"}'], 2)
        self.assertIn("request bodies held in memory reached inbound.body_memory_mb", s.logs())

    def test_bodies_awaiting_their_signature_check_leave_room_for_the_largest_body(self):
        # 2 MiB for bodies, 1 MiB at most: those awaiting a signature check
        # may take 1 MiB of it, never the room of a largest authenticated body
        s = self.service(env=dict(self.MEMORY, TRIBUTARY_INBOUND_HMAC_SECRETS=SECRET))
        unsigned = self.connect(s)
        unsigned.sendall(self.head(1000000, signature=True) + b"x" * 999999)
        self.held_bytes(s, 999999)
        self.busy(probe(self.connect(s), self.head(100000, signature=True), timeout=10))
        body, e = envelope_of_size(1 << 20)
        r = s.post(body=body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])
        self.assertIn("too many request bodies awaiting their signature check", s.logs())

    def test_headers_alone_take_no_room_from_signed_requests(self):
        # a request only its signature can admit takes the room of the bytes
        # it sends: four that send 16 MiB headers and nothing more held the
        # whole 64 MiB of such requests
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET})
        for _ in range(4):
            self.connect(s).sendall(self.head(16 << 20, signature=True))
        time.sleep(0.3)
        self.held_bytes(s, 0)
        body = envelope(event())
        self.assertEqual(signed_post(s, body).status, 200)

    def test_a_signed_body_larger_than_the_room_of_signed_requests_is_413(self):
        # max_body_bytes over their 64 MiB: a 503 would be retried unsplit for ever
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET,
                                         "TRIBUTARY_INBOUND_MAX_BODY_BYTES": str(70 << 20)})
        answer = probe(self.connect(s), self.head((64 << 20) + 1, signature=True), timeout=10)
        self.assertTrue(answer and answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"body larger than %d bytes" % (64 << 20), answer)

    def test_a_body_memory_smaller_than_two_bodies_is_a_configuration_error(self):
        p = run_cli(["check"], env={"TRIBUTARY_INBOUND_BODY_MEMORY_MB": "31"})
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("inbound.body_memory_mb (31) must hold two bodies of "
                      "inbound.max_body_bytes (16777216)", p.stderr)
        p = run_cli(["check"], env={"TRIBUTARY_INBOUND_BODY_MEMORY_MB": "32"})
        self.assertEqual(p.returncode, 0, p)
        # unset, it holds two of the largest bodies when 256 MiB would not
        p = run_cli(["check"], env={"TRIBUTARY_INBOUND_MAX_BODY_BYTES": str(200 << 20)})
        self.assertEqual(p.returncode, 0, p)


class Framing(ServiceTest):
    """A body's length must be plain to see: where a proxy in front reads one
    header and the server another, they see different requests on one
    connection (request smuggling). RFC 9112, 6.1 and 6.3: refuse such a
    request, and close the connection."""

    def refused(self, s, head, status):
        """Sends the request head alone; asserts the answer and that the
        connection is then closed. Returns the answer."""
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
        try:
            reply = probe(sock, head, timeout=10)
            self.assertTrue(reply and reply.startswith(b"HTTP/1.1 %d " % status), (head, reply))
            self.assertIn(b"Connection: close", reply, head)
            self.assertEqual(probe(sock, b"", timeout=10), b"", head)  # closed
            return reply
        finally:
            sock.close()

    @staticmethod
    def head(*lines, path="/currents"):
        return (("POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % (path, TOKEN))
                + "".join(line + "\r\n" for line in lines) + "\r\n").encode()

    def test_both_content_length_and_transfer_encoding_is_400(self):
        s = self.service()
        for te in ("chunked", "Chunked", "gzip, chunked"):
            reply = self.refused(s, self.head("Content-Length: 100", "Transfer-Encoding: " + te), 400)
            self.assertIn(b"Content-Length and Transfer-Encoding", reply, te)
        # other paths too
        self.refused(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n", 400)
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="400"}'], 3)
        self.assertIn("reason=\"Content-Length and Transfer-Encoding together", s.logs())

    def test_content_length_values_that_differ_are_400(self):
        # libmicrohttpd read the first of two lines and served what followed
        s = self.service()
        reply = self.refused(s, self.head("Content-Length: 2", "Content-Length: 70"), 400)
        self.assertIn(b"Content-Length values that differ", reply)
        # a list in one line
        for value in ("2, 70", "5, 5"):
            self.refused(s, self.head("Content-Length: " + value), 400)

    def test_a_post_to_currents_without_a_length_is_411(self):
        # an HTTP/1.0 body without Content-Length was read as no body: 200,
        # nothing stored
        s = self.service()
        body = envelope(event())
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
        try:
            reply = probe(sock, b"POST /currents HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer "
                          + TOKEN.encode() + b"\r\n\r\n" + body, timeout=10)
        finally:
            sock.close()
        self.assertTrue(reply and reply.startswith(b"HTTP/1.1 411 "), reply)
        self.assertIn(b"needs Content-Length or Transfer-Encoding", reply)
        self.refused(s, self.head(), 411)
        self.assertEqual(s.queued_ids(), [])
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="411"}'], 2)
        # other paths are not concerned, and an empty body with its length is read
        self.assertEqual(s.post([], token=TOKEN).status, 200)

    def test_the_same_content_length_twice_is_read(self):
        s = self.service()
        e = event()
        body = envelope(e)
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
        try:
            cl = "Content-Length: %d" % len(body)
            reply = probe(sock, self.head(cl, cl) + body, timeout=10)
        finally:
            sock.close()
        self.assertTrue(reply and reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_a_header_line_folded_onto_the_next_is_400(self):
        # libmicrohttpd joined the folded line to the header's name, read the
        # request as one without a body, and the body as the next request
        s = self.service()
        for lines in (("Content-Length: 100", " Content-Length: 100"),
                      ("Content-Length: 100", "\tx"), ("Transfer-Encoding: chunked", " gzip"),
                      ("X-Note: a", " b: c")):
            reply = self.refused(s, self.head(*lines), 400)
            self.assertIn(b"obs-fold", reply, lines)
        self.assertEqual(s.queued_ids(), [])

    def test_blanks_before_a_headers_colon_are_400_saying_so(self):
        s = self.service()
        for lines in (("X-Note : a",), ("Content-Length\t: 100",)):
            reply = self.refused(s, self.head(*lines), 400)
            self.assertIn(b"blanks between a header's name and its colon", reply, lines)
        self.assertEqual(s.queued_ids(), [])

    def test_a_transfer_coding_other_than_chunked_is_501_at_once(self):
        # libmicrohttpd would read such a body to the end of the connection
        s = self.service()
        # blanks after "chunked" too: libmicrohttpd keeps them, and takes the
        # value for a coding it does not know
        cases = (("Transfer-Encoding: gzip",), ("Transfer-Encoding: chunked, gzip",),
                 ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
                 ("Transfer-Encoding: chunked ",), ("Transfer-Encoding: chunked\t",))
        for te in cases:
            reply = self.refused(s, self.head(*te), 501)
            self.assertIn(b"Transfer-Encoding other than chunked", reply, te)
        self.assertEqual(s.queued_ids(), [])
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="501"}'], len(cases))

    def test_blanks_before_chunked_are_read_as_libmicrohttpd_reads_them(self):
        s = self.service()
        body = envelope(event())
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
        try:
            sock.sendall(self.head("Transfer-Encoding:  \tchunked") + chunked)
            reply = probe(sock, b"", timeout=10)
        finally:
            sock.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:300])
        self.assertEqual(len(s.queued_ids()), 1)

    def test_a_request_hidden_behind_both_framings_is_not_served(self):
        # a chunked body of an envelope, then bytes that a server reading the
        # chunks would take for a second request on the same connection
        s = self.service()
        body, hidden = envelope(event()), envelope(event())
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        second = (b"POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden)
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
        try:
            sock.sendall(self.head("Content-Length: %d" % len(chunked), "Transfer-Encoding: chunked")
                         + chunked + second)
            replies = b""
            while True:
                more = probe(sock, b"", timeout=10)
                if not more:  # closed, or reset for the bytes it left unread
                    break
                replies += more
        finally:
            sock.close()
        if replies:  # the 400 may be lost to the reset
            self.assertTrue(replies.startswith(b"HTTP/1.1 400 "), replies[:300])
        self.assertNotIn(b"HTTP/1.1 200 ", replies)
        self.assertEqual(s.queued_ids(), [])


class Encodings(ServiceTest):
    def test_a_compressed_body_is_415_which_braze_retries_and_nothing_is_stored(self):
        s = self.service()
        body = gzip.compress(envelope(event()))
        for encoding in ("gzip", "br", "deflate"):
            r = s.post(body=body, headers={"Content-Encoding": encoding})
            self.assertEqual(r.status, 415, r)  # not 400: Braze drops what keeps getting 400
            self.assertIn("Content-Encoding", r.json()["error"])
        self.assertEqual(s.queued_ids(), [])
        # said once, not for each retry
        self.assertEqual(s.logs().count("Content-Encoding not supported"), 1)
        self.assertIn("content_encoding=gzip", s.logs())
        # counted under its own code, which the alert on refused requests matches
        self.assertEqual(s.metrics()['tributary_http_requests_total{code="415"}'], 3)

    def test_an_identity_encoding_is_read_as_plain_json(self):
        s = self.service()
        e = event()
        r = s.post(body=envelope(e), headers={"Content-Encoding": " Identity "})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_every_content_encoding_line_counts(self):
        # "identity" then "gzip" is a gzip body (RFC 9110): read as JSON it
        # was a 400, after which Braze drops its events
        s = self.service()
        body = gzip.compress(envelope(event()))
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30 * SLOW)
        try:
            conn.putrequest("POST", "/currents")
            for name, value in (("Authorization", "Bearer " + TOKEN),
                                ("Content-Type", "application/json"),
                                ("Content-Encoding", "identity"), ("Content-Encoding", "gzip"),
                                ("Content-Length", str(len(body)))):
                conn.putheader(name, value)
            conn.endheaders(body)
            self.assertEqual(conn.getresponse().status, 415)
        finally:
            conn.close()
        self.assertEqual(s.queued_ids(), [])

    def test_the_token_is_checked_before_the_encoding(self):
        s = self.service()
        r = s.post(body=b"x", token="wrong-token-000", headers={"Content-Encoding": "gzip"})
        self.assertEqual(r.status, 401, r)


class TokenReloadedDuringARequest(ServiceTest):
    def test_a_request_admitted_by_its_token_is_served_though_a_reload_removes_the_token(self):
        # it was checked again when its body was in, against the new tokens: 401,
        # which Braze does not retry
        config = 'return { inbound = { tokens = { "%s" } } }\n'
        s = self.service(tokens=(), config=config % TOKEN)
        e = event()
        body = envelope(e)
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30 * SLOW)
        try:
            # 100 Continue comes once the headers were checked: the reload comes after
            sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                          "Expect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                          % (TOKEN, len(body))).encode())
            interim = sock.recv(4096)
            self.assertTrue(interim.startswith(b"HTTP/1.1 100 "), interim[:300])
            sock.sendall(body[:10])
            self.assertTrue(s.reload(config % "the-next-token"), s.logs())
            sock.sendall(body[10:])
            reply = sock.recv(4096)
        finally:
            sock.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:300])
        self.assertEqual(s.queued_ids(), [e["id"]])
        # a new request with the old token is refused
        self.assertEqual(s.post([event()]).status, 401)


class WithoutCredentials(ServiceTest):
    """No inbound tokens or secrets: only clients on this machine are served,
    also through a reverse proxy on the same host."""

    def test_a_client_forwarded_from_another_machine_is_503(self):
        # the client's credentials are not wrong, the configuration is: a 401
        # would make Braze stop sending, a 503 has it retry until it is fixed
        s = self.service(tokens=())
        r = s.post([event()], token=None, headers={"X-Forwarded-For": "203.0.113.5"})
        self.assertEqual(r.status, 503, r)
        self.assertIn("retry-after", r.headers)
        self.assertIn("only clients on this machine", r.json()["error"])
        self.assertEqual(s.queued_ids(), [])
        self.assertIn("no inbound credentials are configured", s.logs())
        self.assertEqual(s.metrics()["tributary_auth_failures_total"], 0)

    def test_a_forwarded_entry_with_a_port_or_no_address_is_not_this_machine(self):
        # it was taken for the proxy's own loopback address, and served
        s = self.service(tokens=())
        for xff in ("203.0.113.5:5678", "[2001:db8::1]:443", "unknown", "203.0.113.5, _hidden",
                    "[::1"):
            r = s.post([event()], token=None, headers={"X-Forwarded-For": xff})
            self.assertEqual(r.status, 503, (xff, r))
        self.assertEqual(s.queued_ids(), [])
        # the first is said (the others within 10 s are counted in its next line)
        self.assertRegex(s.logs(), r"client=203\.0\.113\.5(\s|$)")
        # a local one with a port is still local
        r = s.post([event()], token=None, headers={"X-Forwarded-For": "127.0.0.1:5678"})
        self.assertEqual(r.status, 200, r)

    def test_a_flood_from_another_machine_is_said_once_with_how_many(self):
        # the line a forwarded request gets is at most one per 10 s: a client
        # on another machine cannot fill the log through a local proxy
        s = self.service(tokens=())
        start = time.monotonic()
        for i in range(10):
            r = s.post([event()], token=None, headers={"X-Forwarded-For": "203.0.113.%d" % i})
            self.assertEqual(r.status, 503, r)
        if time.monotonic() - start >= 9:
            self.skipTest("the requests took longer than the line's 10 s")
        self.assertEqual(s.logs().count("refusing a client on another machine"), 1, s.logs())
        self.assertEqual(s.stop(), 0)
        lines = [l for l in s.logs().splitlines() if "refusing a client on another machine" in l]
        self.assertEqual(len(lines), 2, s.logs())
        self.assertIn("times=9", lines[1])

    def test_a_local_client_direct_or_forwarded_is_served(self):
        s = self.service(tokens=())
        self.assertEqual(s.post([event()], token=None).status, 200)
        r = s.post([event()], token=None, headers={"X-Forwarded-For": "127.0.0.1"})
        self.assertEqual(r.status, 200, r)

    def test_a_reload_that_removes_every_credential_says_so(self):
        s = self.service(tokens=(), config='return { inbound = { tokens = { "%s" } } }\n' % TOKEN)
        self.assertEqual(s.post([event()]).status, 200)
        self.assertTrue(s.reload("return {}\n"), s.logs())
        self.assertIn("inbound credentials removed", s.logs())
        self.assertEqual(s.post([event()], token=None).status, 200)


class NestingBounds(ServiceTest):
    # envelope {} > events [] > event {} > properties {} = 4 levels, plus the nesting
    def test_json_nested_64_levels_in_total_is_accepted(self):
        s = self.service()
        e = event(deep=nested(60))
        r = s.post([e])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_json_nested_65_levels_is_400(self):
        s = self.service()
        r = s.post([event(deep=nested(61))])
        self.assertEqual(r.status, 400, r)
        self.assertIn("nested", r.json()["reason"])
        self.assertEqual(s.queued_ids(), [])


class HeaderBounds(ServiceTest):
    def test_a_30_kb_header_is_answered_normally(self):
        s = self.service()
        e = event()
        r = s.post([e], headers={"X-Padding": "p" * (30 * 1024)})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.queued_ids(), [e["id"]])

    def test_a_100_kb_header_is_refused(self):
        s = self.service()
        try:
            status = s.post([event()], headers={"X-Padding": "p" * (100 * 1024)}).status
        except (ConnectionError, http.client.HTTPException):
            status = None  # closed without an answer
        self.assertIn(status, (431, None))
        self.assertEqual(s.queued_ids(), [])
        self.assertEqual(s.get("/healthz").status, 200)
        # answered by libmicrohttpd, not by tributary: counted and said all the same
        self.assertEqual(s.metrics()["tributary_http_server_refused_total"], 1)
        self.assertRegex(s.logs(), r"level=warn msg=\"the HTTP server refused a request before "
                                   r"reading it.*HTTP response code is 431")

    def test_headers_over_60_kb_are_refused_before_anything_is_stored(self):
        # the answer's headers take room in the connection's 64 KiB too: a
        # request must be refused while there is room to say so, and one too
        # close to the limit for any answer must not be stored unanswered
        s = self.service()
        answers = {}
        for size in [59 * 1024, 62 * 1024] + list(range(64600, 65300, 25)):
            body = envelope(event())
            head = ("POST /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                    "Content-Type: application/json\r\nX-Padding: %s\r\n"
                    "Content-Length: %d\r\n\r\n" % (TOKEN, "p" * size, len(body))).encode()
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10 * SLOW)
            try:
                answers[size] = probe(sock, head + body, timeout=10) or b""
            finally:
                sock.close()
        self.assertTrue(answers[59 * 1024].startswith(b"HTTP/1.1 200 "), answers[59 * 1024][:200])
        self.assertTrue(answers[62 * 1024].startswith(b"HTTP/1.1 431 "), answers[62 * 1024][:200])
        self.assertIn(b"request headers over 60 KiB", answers[62 * 1024])
        for size, answer in answers.items():
            if size > 59 * 1024:
                self.assertTrue(answer == b"" or answer.startswith(b"HTTP/1.1 431 "),
                                (size, answer[:200]))
        self.assertEqual(len(s.queued_ids()), 1)
        # each 431 is counted under its own code, as "What Braze gets back" lists it
        ours = sum(1 for a in answers.values() if a.startswith(b"HTTP/1.1 431 "))
        self.assertGreater(ours, 0)
        self.assertEqual(s.metrics().get('tributary_http_requests_total{code="431"}'), ours)

    def test_a_request_line_too_long_is_refused_counted_and_logged(self):
        s = self.service()
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        answer = probe(sock, b"POST /currents?workspace=" + b"w" * (80 * 1024) +
                       b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 414"), answer[:100])
        self.assertEqual(s.metrics()["tributary_http_server_refused_total"], 1)
        self.assertIn("HTTP response code is 414", s.logs())


def peak_rss_kib(pid):
    """The peak resident memory of a process (VmHWM), in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/%d/status" % pid)


class BodiesOutsideCurrents(ServiceTest):
    """Only POST /currents reads a request body: every other request is answered
    from its headers, and a body sent anyway is never held in memory."""

    BODY = 16 << 20  # inbound.max_body_bytes by default

    def send_body_anyway(self, s, head):
        """Sends the request head announcing a BODY-byte body, takes the answer
        that comes before any of the body, then sends the body regardless, as an
        attacker would. Returns that early answer (None: there was none) and the
        growth of the service's peak resident memory in bytes."""
        before = peak_rss_kib(s.proc.pid)
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % self.BODY)
        early = probe(sock, b"", timeout=1.0)
        sock.settimeout(2 * SLOW)
        chunk, sent = b"x" * (1 << 20), 0
        try:
            while sent < self.BODY:
                sock.sendall(chunk)
                sent += len(chunk)
            if early is None:  # answered (if at all) only once the whole body was read
                probe(sock, b"", timeout=5.0)
        except OSError:
            pass  # the service closed the connection: the body went nowhere
        time.sleep(0.3)
        return early, (peak_rss_kib(s.proc.pid) - before) * 1024

    def assert_answered_unread(self, early, growth, status):
        self.assertIsNotNone(early, "no answer before the body was sent")
        self.assertTrue(early.startswith(b"HTTP/1.1 %d" % status), early)
        # under valgrind the tool's own bookkeeping for a connection takes a few
        # MB (8.6 seen); a body that was read would take all of its 16 MiB
        self.assertLess(growth, self.BODY * 3 // 4 if WRAPPER else self.BODY // 8,
                        "peak RSS grew by %d bytes" % growth)

    def test_a_large_body_to_an_unknown_path_is_404_before_it_is_read(self):
        s = self.service()
        early, growth = self.send_body_anyway(s, b"POST /nope HTTP/1.1\r\nHost: x\r\n")
        self.assert_answered_unread(early, growth, 404)

    def test_a_large_body_with_a_wrong_method_on_currents_is_405_before_it_is_read(self):
        s = self.service()
        early, growth = self.send_body_anyway(
            s, b"PUT /currents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\n")
        self.assert_answered_unread(early, growth, 405)

    def test_a_large_body_to_healthz_is_413_before_it_is_read(self):
        s = self.service()
        early, growth = self.send_body_anyway(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        self.assert_answered_unread(early, growth, 413)
        self.assertEqual(s.get("/healthz").status, 200)

    def test_a_large_body_to_admin_reload_without_token_is_401_before_it_is_read(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        early, growth = self.send_body_anyway(s, b"POST /admin/reload HTTP/1.1\r\nHost: x\r\n")
        self.assert_answered_unread(early, growth, 401)

    def test_admin_reload_with_the_right_token_and_a_body_is_413_without_reloading(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        r = request(s.port, "POST", "/admin/reload", b"{}",
                    {"Authorization": "Bearer " + ADMIN})
        self.assertEqual(r.status, 413, r)
        self.assertIn("no request body", r.json()["error"])
        self.assertEqual(s.metrics()["tributary_rule_reloads_total"], 0)

    def test_admin_reload_with_the_right_token_and_no_body_reloads(self):
        s = self.service(env={"TRIBUTARY_ADMIN_TOKEN": ADMIN})
        r = request(s.port, "POST", "/admin/reload", None, {"Authorization": "Bearer " + ADMIN})
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.json()["reloaded"])
        r = request(s.port, "POST", "/admin/reload", b"", {"Authorization": "Bearer " + ADMIN})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(s.metrics()["tributary_rule_reloads_total"], 2)


class ConnectionBounds(ServiceTest):
    def open_idle(self, port, n):
        socks = []
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port))
            self.addCleanup(sock.close)
            socks.append(sock)
            time.sleep(0.05)  # accepted in this order
        return socks

    def test_a_fifth_connection_is_not_served_while_max_connections_4_are_open(self):
        # http.threads=2: with fewer connections than threads the service does not
        # stop (see test_sigterm_stops_the_service_with_max_connections_below_threads).
        s = self.service(env={"TRIBUTARY_HTTP_MAX_CONNECTIONS": "4",
                              "TRIBUTARY_HTTP_THREADS": "2"})
        time.sleep(0.2)  # the health check's connection is gone
        socks = self.open_idle(s.port, 5)
        for sock in socks[:4]:
            self.assertTrue(probe(sock, HEALTHZ).startswith(b"HTTP/1.1 200"))
        fifth = probe(socks[4], HEALTHZ, timeout=1.0)
        self.assertIn(fifth, (None, b""), "a fifth connection was served")
        for sock in socks:
            sock.close()
        time.sleep(0.2)
        self.assertEqual(request(s.port, "GET", "/healthz", timeout=5).status, 200)
        self.assertEqual(s.metrics()["tributary_http_connections_refused_total"], 1)
        self.assertEqual(s.metrics()["tributary_http_connections_refused_per_ip_total"], 0)
        self.assertIn("connection refused: http.max_connections are open", s.logs())

    def test_the_fifth_connection_from_one_address_is_counted_at_the_total_limit_when_both_are_set(self):
        s = self.service(env={"TRIBUTARY_HTTP_MAX_CONNECTIONS": "4",
                              "TRIBUTARY_HTTP_MAX_CONNECTIONS_PER_IP": "6",
                              "TRIBUTARY_HTTP_THREADS": "2"})
        time.sleep(0.2)
        socks = self.open_idle(s.port, 5)
        for sock in socks[:4]:
            self.assertTrue(probe(sock, HEALTHZ).startswith(b"HTTP/1.1 200"))
        self.assertIn(probe(socks[4], HEALTHZ, timeout=1.0), (None, b""))
        for sock in socks:
            sock.close()
        time.sleep(0.2)
        m = s.metrics()
        self.assertEqual(m["tributary_http_connections_refused_total"], 1)
        self.assertEqual(m["tributary_http_connections_refused_per_ip_total"], 0)

    def test_sigterm_stops_the_service_with_max_connections_below_threads(self):
        s = self.service(env={"TRIBUTARY_HTTP_MAX_CONNECTIONS": "4"})  # http.threads = 8
        self.assertEqual(s.get("/healthz").status, 200)
        s.proc.send_signal(signal.SIGTERM)
        try:
            code = s.proc.wait(timeout=5 * SLOW)
        except subprocess.TimeoutExpired:
            s.kill9()
            self.fail("no exit within 5 s of SIGTERM with http.max_connections=4 and "
                      "http.threads=8:\n" + s.logs()[-1500:])
        self.assertEqual(code, 0)

    def test_a_third_connection_from_one_address_is_closed_with_max_connections_per_ip_2(self):
        s = self.service(env={"TRIBUTARY_HTTP_MAX_CONNECTIONS_PER_IP": "2"})
        time.sleep(0.2)
        socks = self.open_idle(s.port, 3)
        for sock in socks[:2]:
            self.assertTrue(probe(sock, HEALTHZ).startswith(b"HTTP/1.1 200"))
        self.assertEqual(probe(socks[2], HEALTHZ), b"")
        for sock in socks:
            sock.close()
        time.sleep(0.2)
        self.assertEqual(request(s.port, "GET", "/healthz", timeout=5).status, 200)
        m = s.metrics()
        self.assertEqual(m["tributary_http_connections_refused_per_ip_total"], 1)
        self.assertEqual(m["tributary_http_connections_refused_total"], 0)
        self.assertIn("connection refused: http.max_connections_per_ip are open from its address",
                      s.logs())
        self.assertNotIn("http.max_connections are open", s.logs())

    def test_a_half_sent_request_line_is_closed_after_timeout_s(self):
        s = self.service(env={"TRIBUTARY_HTTP_TIMEOUT_S": "1"})
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        start = time.time()
        answer = probe(sock, b"POST /curr", timeout=3.0)
        self.assertEqual(answer, b"", "connection still open after 3 s")
        self.assertLess(time.time() - start, 3.0 * SLOW)

    def test_a_trickling_body_is_cut_off_after_request_timeout_s(self):
        s = self.service(env={"TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "2",
                              "TRIBUTARY_HTTP_TIMEOUT_S": "30"})
        e = event()
        body = envelope(e)
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        sock.sendall(b"POST /currents HTTP/1.1\r\nHost: localhost\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        start, sent, answer = time.time(), 0, None
        while time.time() - start < 6 * SLOW and sent < len(body):
            try:
                sock.sendall(body[sent:sent + 4])
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            sent += 4
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                answer = probe(sock, b"")
                break
        self.assertIsNotNone(answer, "still reading after %.1f s" % (time.time() - start))
        self.assertFalse(answer.startswith(b"HTTP/1.1 2"), answer)
        self.assertLess(time.time() - start, 5 * SLOW)
        self.assertLess(sent, len(body))
        self.assertIn("request took too long", s.logs())
        self.assertEqual(s.queued_ids(), [])
        self.assertEqual(s.post([event()]).status, 200)

    def test_trickling_headers_are_cut_off_after_request_timeout_s(self):
        # README, Bounds: "one request, however slowly it trickles" is closed after
        # http.request_timeout_s; here the request never gets past its headers.
        s = self.service(env={"TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "2",
                              "TRIBUTARY_HTTP_TIMEOUT_S": "30"})
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        sock.sendall(b"POST /currents HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        start, answer = time.time(), None
        while time.time() - start < 6 * SLOW:
            try:
                sock.sendall(b"abcd")
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                answer = probe(sock, b"")
                break
        self.assertIsNotNone(answer, "still reading headers after %.1f s" % (time.time() - start))
        self.assertLess(time.time() - start, 5 * SLOW)

    def test_a_request_line_trickled_a_byte_a_second_is_cut_off_after_request_timeout_s(self):
        # Every byte resets the idle timeout (30 s): only the request timeout,
        # counted from the connection's acceptance, ends this.
        s = self.service(env={"TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "2",
                              "TRIBUTARY_HTTP_TIMEOUT_S": "30"})
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        start, answer = time.time(), None
        for byte in b"POST /currents?workspace=a-slow-one HTTP/1.1\r\n":
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable:
                answer = probe(sock, b"")
                break
            if time.time() - start > 6 * SLOW:
                break
        elapsed = time.time() - start
        self.assertEqual(answer, b"", "request line still read after %.1f s" % elapsed)
        self.assertLess(elapsed, 4.5 * SLOW)
        self.assertIn("request took too long", s.logs())
        self.assertEqual(s.get("/healthz").status, 200)

    CUT = {"TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "1", "TRIBUTARY_HTTP_TIMEOUT_S": "30"}
    CUT_LINE = (r'level=warn msg="request took too long to arrive; connection closed \(see '
                r'tributary_http_requests_timed_out_total\)" ')

    def stall_a_body(self, s, request_id):
        """Sends a POST's headers and the first 10 bytes of its body, then nothing; the
        connection must be closed without an answer within 5 s."""
        body = envelope(event())
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        answer = probe(sock, b"POST /currents HTTP/1.1\r\nHost: localhost\r\n"
                             b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                             b"X-Request-Id: " + request_id.encode() + b"\r\n"
                             b"Content-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body[:10], timeout=5.0)
        self.assertEqual(answer, b"", "connection still open after 5 s")

    def test_a_body_cut_off_at_request_timeout_s_is_counted_and_names_client_path_and_id(self):
        s = self.service(env=self.CUT)
        self.stall_a_body(s, "slow-body-1")
        self.assertEqual(s.metrics()["tributary_http_requests_timed_out_total"], 1)
        # cut by tributary, not abandoned by its client
        self.assertEqual(s.metrics()["tributary_http_requests_abandoned_total"], 0)
        lines = [l for l in s.logs().splitlines() if "took too long" in l]
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertRegex(lines[0], self.CUT_LINE + r"request_id=slow-body-1 client=127\.0\.0\.1 "
                                                   r"path=/currents limit_s=1$")
        self.assertNotIn(TOKEN, lines[0])

    def test_a_body_whose_client_goes_silent_is_cut_off_at_timeout_s_and_counted(self):
        s = self.service(env={"TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "30",
                              "TRIBUTARY_HTTP_TIMEOUT_S": "1"})
        self.stall_a_body(s, "silent-body-1")
        self.wait(lambda: s.metrics()["tributary_http_requests_timed_out_total"] == 1,
                  what="the cut counted")
        lines = [l for l in s.logs().splitlines() if "sent nothing" in l]
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertRegex(lines[0], r'level=warn msg="client sent nothing for http.timeout_s in the '
                                   r'middle of a request; connection closed \(see '
                                   r'tributary_http_requests_timed_out_total\)" '
                                   r"request_id=silent-body-1 client=127\.0\.0\.1 "
                                   r"path=/currents limit_s=1$")
        self.assertEqual(s.queued_ids(), [])

    def test_a_post_to_a_path_not_served_is_counted_and_said(self):
        s = self.service()
        for path in ("/currents/v1", "/Currents", "/"):
            self.assertEqual(s.post([event()], path=path).status, 404)
        self.assertEqual(s.get("/favicon.ico").status, 404)
        self.assertEqual(s.metrics()["tributary_http_unknown_path_total"], 4)
        lines = [l for l in s.logs().splitlines() if "path not served" in l]
        # one line per 10 s at most, and only for a POST
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertIn("level=warn", lines[0])
        self.assertIn("client=127.0.0.1", lines[0])
        self.assertNotIn("/currents/v1", lines[0])
        self.assertEqual(s.queued_ids(), [])

    def test_headers_cut_off_at_request_timeout_s_are_logged_with_the_path_of_the_request_line(self):
        s = self.service(env=self.CUT)
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        answer = probe(sock, b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
                       timeout=5.0)
        self.assertEqual(answer, b"", "connection still open after 5 s")
        self.assertEqual(s.metrics()["tributary_http_requests_timed_out_total"], 1)
        lines = [l for l in s.logs().splitlines() if "took too long" in l]
        self.assertEqual(len(lines), 1, s.logs()[-2000:])
        self.assertRegex(lines[0], self.CUT_LINE + r"client=127\.0\.0\.1 path=/metrics limit_s=1$")

    def test_a_kept_alive_client_pausing_less_than_timeout_s_between_requests_is_served(self):
        # Pauses longer than http.request_timeout_s but shorter than the idle
        # timeout (http.timeout_s) are the idle wait between requests, not part
        # of a request.
        s = self.service(env={"TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "1",
                              "TRIBUTARY_HTTP_TIMEOUT_S": "4"})
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        for i in range(3):
            if i:
                time.sleep(2.2)
            answer = probe(sock, HEALTHZ, timeout=2.0)
            self.assertIsNotNone(answer, "no answer to request %d" % (i + 1))
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), "request %d: %r" % (i + 1, answer))
            self.assertNotIn(b"Connection: close", answer)
        self.assertNotIn("request took too long", s.logs())



class UnauthenticatedBodies(ServiceTest):
    def test_bodies_awaiting_a_signature_check_share_a_bounded_budget(self):
        secret = "budget-secret-123456"
        s = self.service(tokens=(), env={"TRIBUTARY_INBOUND_HMAC_SECRETS": secret,
                                         "TRIBUTARY_INBOUND_MAX_BODY_BYTES": str(60 << 20),
                                         "TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "60"})
        header = "t=%d,v1=%s" % (int(time.time()), "0" * 64)
        # A holds 40 MiB that only its signature could admit
        a = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(a.close)
        a.sendall(b"POST /currents HTTP/1.1\r\nHost: x\r\nTributary-Signature: " +
                  header.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (41 << 20))
        chunk = b"x" * (1 << 20)
        for _ in range(40):
            a.sendall(chunk)
        time.sleep(0.5)
        # B wants 40 MiB more: beyond the 64 MiB budget
        b = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(b.close)
        b.sendall(b"POST /currents HTTP/1.1\r\nHost: x\r\nTributary-Signature: " +
                  header.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (40 << 20))
        b.settimeout(10)
        answer = b.recv(200)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        # a small signed request still gets through
        body = json.dumps({"events": [event()]}).encode()
        t = int(time.time())
        mac = hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()
        r = s.post(body=body.decode(), token=None,
                   headers={"Tributary-Signature": "t=%d,v1=%s" % (t, mac)})
        self.assertEqual(r.status, 200, r)

    def test_clients_that_never_complete_a_body_cannot_hold_out_a_sender_served_before(self):
        # Four connections that send all but a few bytes of 16 MiB bodies with
        # a made-up signature held the whole 64 MiB of bodies awaiting a
        # signature check, for as long as they trickled: every signed request
        # got 503. An address a request authenticated from has a room of its
        # own, as bounded: clients behind it cannot lock token requests out.
        s = self.service(env={"TRIBUTARY_INBOUND_HMAC_SECRETS": SECRET,
                              "TRIBUTARY_HTTP_REQUEST_TIMEOUT_S": "120",
                              "TRIBUTARY_HTTP_TIMEOUT_S": "120"})
        braze = {"X-Forwarded-For": "198.51.100.7"}
        self.assertEqual(signed_post(s, envelope(event()), headers=braze).status, 200)
        length = 16 << 20

        def trickle(client, send):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30 * SLOW)
            self.addCleanup(sock.close)
            sock.sendall(("POST /currents HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n"
                          "Tributary-Signature: t=%d,v1=%s\r\nContent-Length: %d\r\n\r\n"
                          % (client, now_s(), "0" * 64, length)).encode())
            sock.sendall(b"x" * send)
            return sock

        def held(want):
            deadline = time.time() + 20 * SLOW
            while s.metrics()["tributary_http_request_body_bytes"] < want:
                self.assertLess(time.time(), deadline, "the bodies were not taken")
                time.sleep(0.05)

        for _ in range(4):
            trickle("203.0.113.9", length - 10)
        held(4 * (length - 10))
        # the room of unproven bodies is full: another address's waits
        r = signed_post(s, envelope(event()), headers={"X-Forwarded-For": "203.0.113.10"})
        self.assertEqual((r.status, r.json()), (503, {"error": "busy"}))
        # the sender served before is served
        e = event()
        r = signed_post(s, envelope(e), headers=braze)
        self.assertEqual(r.status, 200, r)
        # its own room is bounded too: what shares its address cannot take
        # the room of token requests
        for _ in range(4):
            trickle(braze["X-Forwarded-For"], length - 10)
        held(8 * (length - 10))
        fifth = trickle(braze["X-Forwarded-For"], 100)
        fifth.settimeout(10 * SLOW)
        answer = fifth.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b'{"error":"busy"}', answer)
        token = event()
        self.assertEqual(s.post([token]).status, 200)
        self.assertIn(e["id"], s.queued_ids())
        self.assertIn(token["id"], s.queued_ids())

if __name__ == "__main__":
    unittest.main()
