"""make chaos: a randomized durability run.

Rounds of a few minutes each, every one from its own seed: client threads post Currents
batches (all 54 mapped event types, several users, every platform and so all four feeds,
recent events, old ones for mParticle's historical endpoint and some that cross into it while
they wait, a few of about 100 KB; some re-sent as Braze does, also while the first try is
still being stored, some filtered or skipped), the mParticle double fails at random (5xx, 429
with Retry-After, 413, 401/403, answers slower than the sender waits, dropped connections and
answers lost after the batch was stored, a 400 for marked events), and the service is killed
(-9), stopped (SIGTERM, then maybe killed or interrupted during the shutdown) or reloaded
(SIGHUP, /admin/reload, a rules_dir change; rules and feed credentials changed) at random
moments, and started again on the same data_dir. Each round makes one or two kinds of fault
more frequent. Then the double heals, the service drains, and the round checks:

- every event acknowledged with 200 reached the double in a batch it accepted, or is in the
  dead-letter store (tributary dlq list --json);
- nothing was delivered or dead-lettered that was never posted, nor an event the rules filter
  or skip;
- the queue depth ends at 0, with no batch in flight, and a start after that sends nothing;
- the service never exited unless told to, a SIGTERM ended in exit 0, and no sanitizer
  report is in its log (TEST_TRIBUTARY_BIN=build/asan/tributary);
- mParticle would have dropped nothing (no request over its limits, no source_request_id
  re-used for other content).

Duplicates (an event in two accepted batches) are allowed, at least once, and counted by
the fault that explains them.

    CHAOS_SECONDS   rounds start until this many seconds passed (default 300)
    CHAOS_SEED      the first round's seed (default random); round k has seed + k, so
                    CHAOS_SEED=<a round's seed> CHAOS_SECONDS=1 replays that round's schedule
    CHAOS_KEEP      1: keep every round's directory (a failed round's is always kept)

Exit status 0 when every round passed, 1 otherwise.
"""

import collections
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import harness  # noqa: E402
from harness import RULES, SLOW, TOKEN, Service, load_event_map, request, tool_errors  # noqa: E402
from mparticle_double import MParticleDouble  # noqa: E402

FEEDS = {
    "ios": ("chaos-ios-key", "chaos-ios-secret"),
    "android": ("chaos-android-key", "chaos-android-secret"),
    "web": ("chaos-web-key", "chaos-web-secret"),
    "unbound": ("chaos-unbound-key", "chaos-unbound-secret"),
}
ADMIN_TOKEN = "chaos-admin-token-0123456789"
APPS = {"ios": "11111111-2222-4333-8444-000000000001",
        "android": "11111111-2222-4333-8444-000000000002",
        "web": "11111111-2222-4333-8444-000000000003"}
MAPPED_TYPES = [braze for braze, _, _ in load_event_map()]
FILTERED_TYPES = ["users.behaviors.CustomEvent", "users.behaviors.Purchase",
                  "users.behaviors.app.SessionStart", "users.messages.email.Deferral"]
PLATFORMS = ["ios", "android", "web", "tvos", "kindle", None]
EXTRA_RULES = ["50-rename-event.lua", "50-route-feed.lua", "50-tag-workspace.lua"]
POISON = "chaos-poison-marker"
SENDER_TIMEOUT_S = 60  # host/sender.c REQUEST_TIMEOUT_MS
LATE_MAX_S = 2
DRAIN_STALL_S = 120  # the queue must shrink at least this often while it drains
DRAIN_TIMEOUT_S = 900
USERS = 40
# Errors the service logs for what the faults do: anything else it logs at error is shown.
EXPECTED_ERRORS = ("ALERT: mParticle refused this feed's credentials",
                   "mParticle rejected a batch; moved to the dead-letter store",
                   "mParticle keeps failing batches sent alone",
                   "unexpected answer from mParticle")
LOG_ERROR = re.compile(r'level=error msg="([^"]*)"')
# What the service said it did, counted for each round: which paths the faults took.
SEEN = {
    "restored": "re-sending the batches the last run made and did not see delivered",
    "restored_empty": "a persisted batch had no records left",
    "held_moved": "held events moved to the feeds the rules now route them to",
    "split_400_413": "mParticle refused a bulk request; splitting it",
    "split_batch_400": "mParticle refused a batch; splitting it",
    "queue_full_or_stopping": "request not stored; Braze will retry",
    "in_flight_at_stop": "stopped with requests in flight",
    "expired_batches": "batches older than retry.max_age_s moved",
    "expired_unclaimed": "events older than retry.max_age_s moved",
}
CLIENTS = 4


def log(msg):
    print("%s %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def config_text(feeds, apps=APPS):
    """A configuration file with these feed credentials ({feed: (key, secret)})."""
    lines = ["return {", "  feeds = {"]
    for name, (key, secret) in sorted(feeds.items()):
        lines.append('    %s = { key = "%s", secret = "%s" },' % (name, key, secret))
    lines.append("  },")
    lines.append("  apps = {")
    for platform, app in sorted(apps.items()):
        lines.append('    ["%s"] = "%s",' % (app, platform))
    lines.append("  },")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_atomically(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


class Ledger:
    """What the clients posted and what was acknowledged, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.posted = set()          # every id sent in any request
        self.forwardable = set()     # ids of events the rules forward
        self.acked = set()           # forwardable ids in a request answered 200
        self.acked_other = set()     # filtered or skipped ids in a request answered 200
        self.acked_twice = set()     # ids acknowledged by more than one request
        self.requests = collections.Counter()  # status (or "error") -> count
        self.unexpected = []         # (status, body) of answers Braze would not retry
        self.resent_batches = 0


class Client(threading.Thread):
    """Posts batches as Braze does: a batch not answered 200 (5xx, 429, no answer) is sent
    again until it is, or the round's traffic ends."""

    def __init__(self, index, seed, port, ledger, stop, poison, old_events):
        super().__init__(name="client-%d" % index, daemon=True)
        self.rng = random.Random("%s-client-%d" % (seed, index))
        self.port = port
        self.ledger = ledger
        self.stop = stop
        self.poison = poison
        self.old_events = old_events
        self.conn = None
        self.sent = []  # batches acknowledged, for re-sends

    def event(self):
        rng = self.rng
        user = "customer-%d" % rng.randrange(USERS)
        etype = rng.choice(MAPPED_TYPES)
        forwardable = True
        if rng.random() < 0.03:
            etype = rng.choice(FILTERED_TYPES)
            forwardable = False
        r = rng.random()
        if r < 0.80:
            age = rng.uniform(0, 48 * 3600)
        elif r < 0.94 or not self.old_events:
            age = rng.uniform(4 * 86400, 27 * 86400)
        elif r < 0.96:
            # the sender sends events from 29 days on to the historical endpoint: these
            # cross the line while they wait, and their batches are split
            age = 29 * 86400 - rng.uniform(0, 120)
        else:
            age = rng.uniform(31 * 86400, 60 * 86400)  # mParticle's historical endpoint
        e = {
            "event_type": etype,
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "time": int(time.time() - age),
            "user": {"user_id": hashlib.md5(user.encode()).hexdigest()[:24],
                     "external_user_id": user,
                     "device_id": "device-%s-%d" % (user, rng.randrange(2)),
                     "timezone": rng.choice(["Europe/Berlin", "America/New_York", "UTC"])},
            "properties": {
                "campaign_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "campaign_name": rng.choice(["Winter sale", "Welcome", "Win-back", "Ünïcode ✓"]),
                "send_id": "send-%d" % rng.randrange(10 ** 6),
                "dispatch_id": "dispatch-%d" % rng.randrange(10 ** 6),
                "message_variation_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            },
        }
        p = e["properties"]
        platform = rng.choice(PLATFORMS)
        if etype == "users.behaviors.Uninstall":
            p["app_id"] = APPS[rng.choice(sorted(APPS))]
        elif platform is not None:
            p["platform"] = platform
            p["app_id"] = APPS.get({"tvos": "ios", "kindle": "android"}.get(platform, platform))
            p["device_model"] = rng.choice(["iPhone15,2", "Pixel 8", "Chrome"])
            p["os_version"] = rng.choice(["iOS 17.6.1", "Android 14", "macOS"])
        if ".email." in etype:
            p["email_address"] = "%s@example.com" % user
            p["user_agent"] = "Mozilla/5.0"
        elif ".sms." in etype or ".whatsapp." in etype:
            p["to_phone_number"] = "+4915112%06d" % rng.randrange(10 ** 6)
        elif ".contentcard." in etype:
            p["content_card_id"] = "card-%d" % rng.randrange(1000)
        elif ".pushnotification." in etype:
            p["push_token"] = "%064x" % rng.getrandbits(256)
        if rng.random() < 0.05:
            p["suspected_bot_click_reason"] = ["user_agent", "ip_address"]
        if rng.random() < 0.05:
            p["custom_properties"] = {"tier": "gold", "nested": {"n": rng.randrange(100)}}
        if rng.random() < 0.03:
            p["note"] = "x" * rng.randrange(1000, 4000)  # larger batches, requests split
        elif rng.random() < 0.003:
            # about 100 KB once mapped: batches of one or two events, split at 128 KB
            for k in range(30):
                p["long_%02d" % k] = chr(ord("a") + k % 26) * 3900
        if self.poison and rng.random() < 0.002:
            p["note"] = POISON
        if rng.random() < 0.02:
            e["user"].pop("external_user_id")  # skipped by the rules
            forwardable = False
        return e, forwardable

    def post(self, body, path, timeout):
        headers = {"Content-Type": "application/json", "Braze-Currents-Version": "1",
                   "Authorization": "Bearer " + TOKEN}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port)
            self.conn.timeout = timeout
            if self.conn.sock is not None:
                self.conn.sock.settimeout(timeout)
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return r.status, data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def run(self):
        rng, ledger = self.rng, self.ledger
        try:
            while not self.stop.is_set():
                batch, fwd = [], []
                for _ in range(rng.choice([1, 2, 5, 10, 20, 50, 100])):
                    e, forwardable = self.event()
                    batch.append(e)
                    fwd.append(forwardable)
                if rng.random() < 0.01:  # an event twice in one batch
                    k = rng.randrange(len(batch))
                    batch.append(batch[k])
                    fwd.append(fwd[k])
                if self.sent and rng.random() < 0.05:  # at least once: Braze sends again
                    old_batch, old_fwd = rng.choice(self.sent)
                    k = rng.randrange(1, len(old_batch) + 1)
                    batch += old_batch[:k]
                    fwd += old_fwd[:k]
                    with ledger.lock:
                        ledger.resent_batches += 1
                path = "/currents?workspace=brand-%d" % rng.randrange(3) if rng.random() < 0.3 \
                    else "/currents"
                body = json.dumps({"events": batch})
                with ledger.lock:
                    for e, f in zip(batch, fwd):
                        ledger.posted.add(e["id"])
                        if f:
                            ledger.forwardable.add(e["id"])
                backoff = 0.05
                while not self.stop.is_set():
                    # now and then Braze gives up waiting, and sends the batch again while
                    # the first one is still being stored
                    timeout = rng.uniform(0.001, 0.05) if rng.random() < 0.03 else 60 * SLOW
                    try:
                        status, data = self.post(body, path, timeout)
                    except (OSError, http.client.HTTPException):
                        status, data = "error", b""
                        self.close()
                    with ledger.lock:
                        ledger.requests[status] += 1
                    if status == 200:
                        with ledger.lock:
                            for eid, f in dict((e["id"], f) for e, f in zip(batch, fwd)).items():
                                target = ledger.acked if f else ledger.acked_other
                                if eid in target:
                                    ledger.acked_twice.add(eid)
                                target.add(eid)
                        self.sent.append((batch, fwd))
                        if len(self.sent) > 50:
                            self.sent.pop(0)
                        break
                    if status not in ("error", 429) and not (500 <= status < 600):
                        with ledger.lock:
                            ledger.unexpected.append((status, data[:300]))
                        break
                    self.stop.wait(backoff * rng.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, 1.0)
                self.stop.wait(rng.uniform(0.1, 1.0))
        finally:
            self.close()


# How often each fault comes, before a round's emphasis.
WEIGHTS = {
    "fail5xx": 10, "fail429": 5, "fail413": 3, "slow": 5, "slow_past_timeout": 1.5, "drop": 4,
    "lost_answer": 5, "late": 2, "auth": 2, "outage": 1, "kill9": 4, "sigterm": 2,
    "sigterm_kill": 1, "sigterm_int": 1, "reload_rules": 3, "reload_credentials": 2,
    "reload_kill9": 1, "kill9_twice": 1.5,
}
# A round makes one or two of these come four times as often.
EMPHASES = {
    "mparticle": ["fail5xx", "fail413", "slow", "slow_past_timeout", "drop", "lost_answer"],
    "kills": ["kill9", "kill9_twice", "sigterm_kill", "reload_kill9"],
    "stops": ["sigterm", "sigterm_int", "sigterm_kill"],
    "reloads": ["reload_rules", "reload_credentials", "reload_kill9"],
    "refusals": ["auth", "fail429", "outage", "reload_credentials"],
}


class Abort(Exception):
    """The round cannot go on (the service does not start); its failure is recorded."""


class Round:
    def __init__(self, seed, keep):
        self.seed = seed
        self.rng = random.Random(seed)
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix="tributary-chaos-%d-" % seed)
        self.failures = []
        self.timeline = []  # (monotonic time, action)
        self.actions = collections.Counter()
        self.figures = {}

    def fail(self, what):
        log("  FAIL: " + what)
        self.failures.append(what)

    def note(self, action):
        self.timeline.append((time.monotonic(), action))
        self.actions[action] += 1

    # ---- the service's life ---------------------------------------------------------

    def alive(self):
        """True when the service runs; a service that exited on its own is a failure."""
        s = self.s
        if s.proc is not None and s.proc.poll() is not None:
            code = s.proc.returncode
            self.fail("the service exited on its own with %s:\n%s" % (code, s.logs()[-3000:]))
            s.log.close()
            self.start()
            return False
        return True

    def start(self):
        try:
            self.s.start()
        except AssertionError as e:
            self.fail("the service did not start on its data_dir: %s" % str(e)[-3000:])
            raise Abort()

    def terminate(self, then=None, after=0.0):
        """SIGTERM; then (None, "kill", "int") after `after` seconds, if it still runs."""
        s = self.s
        s.proc.send_signal(signal.SIGTERM)
        if then is not None:
            try:
                s.proc.wait(timeout=after)
            except subprocess.TimeoutExpired:
                s.proc.send_signal(signal.SIGKILL if then == "kill" else signal.SIGINT)
        try:
            code = s.proc.wait(timeout=60 * SLOW)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            code = s.proc.wait()
            self.fail("the service did not stop within 60 s of SIGTERM")
        s.log.close()
        allowed = {None: (0,), "kill": (0, -signal.SIGKILL), "int": (0, -signal.SIGINT)}[then]
        if code not in allowed:
            self.fail("SIGTERM%s ended the service with %s, not %s:\n%s"
                      % ("" if then is None else " then SIG" + then.upper(), code, allowed,
                         s.logs()[-3000:]))

    def set_rules(self, extras):
        for name in EXTRA_RULES:
            path = os.path.join(self.rules, name)
            if name in extras and not os.path.exists(path):
                shutil.copy(os.path.join(RULES, "examples", name), path + ".tmp")
                os.rename(path + ".tmp", path)
            elif name not in extras and os.path.exists(path):
                os.unlink(path)

    def reload(self, how):
        s = self.s
        if how == "sighup":
            s.proc.send_signal(signal.SIGHUP)
        elif how == "admin":
            try:
                request(s.port, "POST", "/admin/reload", b"",
                        {"Authorization": "Bearer " + ADMIN_TOKEN}, timeout=30)
            except OSError:
                pass

    # ---- chaos actions --------------------------------------------------------------

    def act(self):
        rng, d, s = self.rng, self.d, self.s
        feed = rng.choice([None, None] + sorted(FEEDS))
        actions = sorted(self.weights)
        action = rng.choices(actions, weights=[self.weights[a] for a in actions])[0]
        self.note(action)
        if action == "fail5xx":
            d.fail(rng.choice([500, 502, 503, 504]), feed=feed, times=rng.randint(1, 20))
        elif action == "fail429":
            d.fail(429, feed=feed, times=rng.randint(1, 5), retry_after=rng.choice([None, 1, 2, 3]),
                   rate_limit_exceeded=rng.choice([None, "account", "feed", "app"]))
        elif action == "fail413":
            d.fail(413, feed=feed, times=rng.randint(1, 6))
        elif action == "slow":
            d.slow(rng.uniform(0.5, 5), times=rng.randint(1, 10), feed=feed)
        elif action == "slow_past_timeout":
            d.slow(SENDER_TIMEOUT_S + rng.uniform(1, 8), times=rng.randint(1, 2), feed=feed)
        elif action == "drop":
            d.drop_connections(times=rng.randint(1, 5), feed=feed)
        elif action == "lost_answer":
            d.drop_connections(times=rng.randint(1, 5), feed=feed, after_processing=True)
        elif action == "late":
            d.late(rng.uniform(0.2, LATE_MAX_S), times=rng.randint(1, 10))
        elif action == "auth":
            d.fail(rng.choice([401, 403]), feed=rng.choice(sorted(FEEDS)), times=rng.randint(1, 4))
        elif action == "outage":
            d.fail(503, times=rng.randint(50, 300))
        elif action == "kill9":
            time.sleep(rng.uniform(0, 0.5))
            s.kill9()
            time.sleep(rng.uniform(0, 2))
            self.start()
        elif action == "kill9_twice":
            # the second kill comes while the service restores what the first left
            s.kill9()
            self.start()
            time.sleep(rng.uniform(0, 1))
            s.kill9()
            time.sleep(rng.uniform(0, 1))
            self.start()
        elif action == "sigterm":
            self.terminate()
            time.sleep(rng.uniform(0, 2))
            self.start()
        elif action == "sigterm_kill":
            self.terminate("kill", rng.uniform(0, 3))
            self.start()
        elif action == "sigterm_int":
            self.terminate("int", rng.uniform(0, 2))
            self.start()
        elif action == "reload_rules":
            self.set_rules([r for r in EXTRA_RULES if rng.random() < 0.5])
            time.sleep(0.1)  # rules_dir is watched, and a signal too may come
            self.reload(rng.choice(["sighup", "admin", "none"]))
        elif action == "reload_credentials":
            # one feed's credentials revoked, removed or put back; the others stay as the
            # reloads before left them
            feeds = self.feeds
            victim = rng.choice(sorted(FEEDS))
            change = rng.choice(["wrong", "missing", "restore"])
            if change == "wrong":
                feeds[victim] = (FEEDS[victim][0], "revoked-" + FEEDS[victim][1])
            elif change == "missing":
                feeds.pop(victim, None)
            else:
                feeds[victim] = FEEDS[victim]
            write_atomically(s.config, config_text(feeds))
            self.reload(rng.choice(["sighup", "admin"]))
        elif action == "reload_kill9":
            self.set_rules([r for r in EXTRA_RULES if rng.random() < 0.5])
            s.proc.send_signal(signal.SIGHUP)
            time.sleep(rng.uniform(0, 0.3))
            s.kill9()
            self.start()

    # ---- the round ------------------------------------------------------------------

    def run(self):
        rng = self.rng
        chaos_s = rng.uniform(60, 120)
        poison = rng.random() < 0.4
        emphasis = rng.sample(sorted(EMPHASES), rng.randint(1, 2))
        self.weights = dict(WEIGHTS)
        for e in emphasis:
            for a in EMPHASES[e]:
                self.weights[a] = WEIGHTS[a] * 4
        env = {
            "TRIBUTARY_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "info"),
            "TRIBUTARY_ADMIN_TOKEN": ADMIN_TOKEN,
            "TRIBUTARY_BATCH_LINGER_MS": str(rng.choice([0, 50, 200, 500])),
            "TRIBUTARY_RETRY_BASE_MS": "50",
            "TRIBUTARY_RETRY_MAX_MS": str(rng.choice([500, 2000])),
            "TRIBUTARY_RETRY_PAUSE_MS": str(rng.choice([300, 1000, 3000])),
            "TRIBUTARY_RETRY_FAILING_S": str(rng.choice([3600, 30, 5])),
            "TRIBUTARY_RETRY_MAX_AGE_S": str(rng.choice([172800, 172800, 60])),
            "TRIBUTARY_MPARTICLE_RATE_LIMIT": str(rng.choice([270, 270, 100])),
            "TRIBUTARY_QUEUE_SYNC": rng.choice(["full", "normal"]),
            "TRIBUTARY_QUEUE_MIN_FREE_MB": "64",
            # a small queue fills while mParticle fails: Braze gets 503 and sends again
            "TRIBUTARY_QUEUE_MAX_DEPTH": str(rng.choice([5000000, 5000000, 12000])),
        }
        self.d = d = MParticleDouble(feeds=dict(FEEDS)).start()
        d.rate_limit = rng.choice([None, None, 80])
        if poison:
            d.poison(POISON)
        env["TRIBUTARY_MPARTICLE_URL"] = d.url
        self.rules = os.path.join(self.dir, "rules")
        os.makedirs(self.rules)
        shutil.copy(os.path.join(RULES, "10-mparticle.lua"), self.rules)
        os.makedirs(os.path.join(self.dir, "service"))
        self.s = s = Service(env=env, rules_dir=self.rules, config=config_text(FEEDS),
                             workdir=os.path.join(self.dir, "service"))
        settings = {k[len("TRIBUTARY_"):].lower(): v for k, v in env.items()
                    if k not in ("TRIBUTARY_ADMIN_TOKEN", "TRIBUTARY_MPARTICLE_URL",
                                 "TRIBUTARY_LOG_LEVEL")}
        log("round seed %d: %.0f s of chaos, more %s, poison=%s, double rate_limit=%s, %s"
            % (self.seed, chaos_s, "+".join(emphasis), poison, d.rate_limit,
               " ".join("%s=%s" % kv for kv in sorted(settings.items()))))
        self.ledger = Ledger()
        self.feeds = dict(FEEDS)  # the credentials in the configuration file
        try:
            self.start()
            self.traffic(chaos_s, poison)
            self.heal()
            self.drain()
            self.check()
            self.restart_drained()
        finally:
            self.finish()

    def restart_drained(self):
        """A drained service stopped and started again finds nothing to send."""
        if self.s.proc.poll() is None:
            self.terminate()
        requests = len(self.d.requests)
        self.start()
        time.sleep(3)
        depth = self.depth()
        if depth != 0:
            self.fail("started again after draining, the service finds %s events queued" % depth)
        sent = self.d.requests[requests:]
        if sent:
            self.fail("started again after draining, the service sent %d requests (%d batches)"
                      % (len(sent), sum(r["batches"] or 0 for r in sent)))

    def traffic(self, chaos_s, poison):
        stop = threading.Event()
        clients = [Client(i, self.seed, self.s.port, self.ledger, stop, poison,
                          old_events=self.rng.random() < 0.7) for i in range(CLIENTS)]
        for c in clients:
            c.start()
        end = time.monotonic() + chaos_s
        try:
            while time.monotonic() < end:
                wait = min(self.rng.expovariate(1 / 2.5), max(0, end - time.monotonic()))
                t = time.monotonic() + wait
                while time.monotonic() < t:
                    self.alive()
                    time.sleep(0.1)
                if time.monotonic() >= end:
                    break
                if self.alive():
                    self.act()
        finally:
            stop.set()
        for c in clients:
            c.join(120)
            if c.is_alive():
                self.fail("client %s did not finish its request within 120 s" % c.name)
        self.alive()

    def heal(self):
        """Faults cleared, rules and credentials as at the start (by a reload, or a start if
        the service is down)."""
        self.d.clear_faults()
        self.d.rate_limit = None
        self.set_rules([])
        self.feeds = dict(FEEDS)
        write_atomically(self.s.config, config_text(FEEDS))
        self.note("heal")
        if self.s.proc.poll() is None:
            if not self.s.reload(timeout=30):
                self.fail("the healing reload did not come:\n%s" % self.s.logs()[-2000:])

    def accounted(self):
        delivered = {e["data"].get("source_message_id") for _, _, e in self.d.events()}
        dead = {row["event_id"] for row in self.dead_letters()}
        return delivered, dead

    def dead_letters(self):
        p = self.s.cli(["dlq", "list", "--json"], timeout=120)
        if p.returncode != 0:
            raise AssertionError("dlq list failed: %s" % p.stderr)
        return json.loads(p.stdout)

    def depth(self):
        m = self.s.metrics()
        return sum(v for k, v in m.items() if k.startswith("tributary_queue_depth{"))

    def drain(self):
        """Waits until the queue is empty and every acknowledged event is accounted for;
        fails when the queue stops shrinking for DRAIN_STALL_S or takes DRAIN_TIMEOUT_S."""
        started = time.monotonic()
        acked = self.ledger.acked
        missing, depth = None, None
        smallest, shrunk, said = None, started, started
        while time.monotonic() - started < DRAIN_TIMEOUT_S * SLOW and \
                time.monotonic() - shrunk < DRAIN_STALL_S * SLOW:
            if not self.alive():
                continue
            try:
                depth = self.depth()
            except OSError:
                time.sleep(1)
                continue
            if smallest is None or depth < smallest:
                smallest, shrunk = depth, time.monotonic()
            if time.monotonic() - said >= 30:
                log("  draining: depth %d after %.0f s" % (depth, time.monotonic() - started))
                said = time.monotonic()
            if depth == 0:
                delivered, dead = self.accounted()
                missing = acked - delivered - dead
                stats = json.loads(self.s.cli(["queue", "stats", "--json"]).stdout)
                in_flight = sum(f["in_flight_batches"] for f in stats["feeds"].values())
                if not missing and in_flight == 0:
                    self.figures["drain_s"] = round(time.monotonic() - started, 1)
                    return
            time.sleep(1)
        self.figures["drain_s"] = None
        stats = self.s.cli(["queue", "stats", "--json"]).stdout.strip()
        self.fail("the queue did not drain (%.0f s, the last %.0f s without shrinking): depth %s, "
                  "%s acknowledged events unaccounted for; queue stats: %s"
                  % (time.monotonic() - started, time.monotonic() - shrunk, depth,
                     "?" if missing is None else len(missing), stats))

    def check(self):
        d, s, L = self.d, self.s, self.ledger
        with L.lock:
            acked, posted = set(L.acked), set(L.posted)
            acked_other, forwardable = set(L.acked_other), set(L.forwardable)
        try:
            depth = self.depth()
        except OSError:
            depth = None
        if depth != 0:
            self.fail("tributary_queue_depth ends at %s, not 0" % depth)
        dead_rows = self.dead_letters()
        dead = collections.Counter(r["event_id"] for r in dead_rows)
        reasons = collections.Counter(r["reason"] for r in dead_rows)
        stored = d.batches
        requests = {r["request_id"]: r for r in d.requests}
        deliveries = collections.defaultdict(list)  # event id -> [request ids]
        for b in stored:
            for e in b["batch"]["events"]:
                deliveries[e["data"].get("source_message_id")].append(b["request_id"])
        delivered = set(deliveries)

        lost = acked - delivered - set(dead)
        if lost:
            path = os.path.join(self.dir, "lost-ids.txt")
            with open(path, "w") as f:
                f.write("".join(i + "\n" for i in sorted(lost)))
            self.fail("%d acknowledged events neither delivered nor dead-lettered (all in %s), "
                      "e.g. %s" % (len(lost), path, sorted(lost)[:10]))
        never_posted = (delivered | set(dead)) - posted
        if never_posted:
            self.fail("%d events delivered or dead-lettered that were never posted, e.g. %s"
                      % (len(never_posted), sorted(never_posted)[:10]))
        not_forwardable = (delivered | set(dead)) & (posted - forwardable)
        if not_forwardable:
            self.fail("%d filtered or skipped events were delivered or dead-lettered, e.g. %s"
                      % (len(not_forwardable), sorted(not_forwardable)[:10]))
        twice_dead = [i for i, n in dead.items() if n > 1]
        if twice_dead:
            self.fail("%d events are in the dead-letter store more than once, e.g. %s"
                      % (len(twice_dead), twice_dead[:10]))
        rejected = d.take_rejected()
        if rejected:
            self.fail("mParticle would have dropped %d batches the service sent: %r"
                      % (len(rejected), rejected[:5]))
        changed = [r for r in d.repeats if not r["same"]]
        if changed:
            self.fail("%d batches re-used a source_request_id with other content (mParticle "
                      "drops them): %r" % (len(changed), changed[:3]))
        if L.unexpected:
            self.fail("%d posts got an answer Braze would not send again: %r"
                      % (len(L.unexpected), L.unexpected[:5]))

        duplicates = collections.Counter()
        for eid, reqs in deliveries.items():
            for later in reqs[1:]:
                duplicates[self.cause(requests[reqs[0]], requests[later]["time"], eid)] += 1
        resends = collections.Counter()
        first_request = {}
        for b in stored:
            first_request[(b["feed"], b["batch"].get("source_request_id"))] = b["request_id"]
        for r in d.repeats:
            first = first_request.get((r["feed"], r["batch"].get("source_request_id")))
            if first is not None:
                resends[self.cause(requests[first], requests[r["request_id"]]["time"], None)] += \
                    len(r["batch"]["events"])
        # delivered, and then dead-lettered: the service did not learn of the delivery
        both = collections.Counter()
        wall_to_mono = time.time() - time.monotonic()
        for row in dead_rows:
            reqs = deliveries.get(row["event_id"])
            if reqs:
                why = self.cause(requests[reqs[0]], row["at_ms"] / 1000.0 - wall_to_mono,
                                 row["event_id"])
                both["%s, then %s" % (why, row["reason"])] += 1
        if any(k.startswith("unexplained") for k in both):
            self.figures["delivered_then_dead_lettered_ids"] = sorted(
                r["event_id"] for r in dead_rows if r["event_id"] in deliveries)[:20]
        statuses = collections.Counter(r["status"] if not r["dropped"] else "dropped"
                                       for r in requests.values())
        self.figures.update({
            "posted": len(posted), "acknowledged": len(acked),
            "acknowledged_filtered_or_skipped": len(acked_other),
            "acknowledged_by_two_posts": len(L.acked_twice),
            "batches_sent_again_after_200": L.resent_batches,
            "delivered": len(delivered & acked), "dead_lettered": len(set(dead) & acked),
            "dead_letter_reasons": dict(reasons),
            "delivered_and_dead_lettered": dict(both),
            "delivered_unacknowledged": len((delivered | set(dead)) - acked),
            "duplicates": dict(duplicates),
            "resends_absorbed_by_source_request_id": dict(resends),
            "braze_requests": {str(k): v for k, v in L.requests.items()},
            "mparticle_answers": {str(k): v for k, v in statuses.items()},
            "actions": dict(self.actions),
        })

    def cause(self, first, later_time, eid):
        """The fault that explains what happened at later_time (a second delivery, a dead
        letter) to what the first request, accepted by the double, carried."""
        if first["dropped"]:
            return "lost answer"
        answered = first["answered"] if first["answered"] is not None else time.monotonic()
        if answered - first["time"] >= SENDER_TIMEOUT_S:
            return "answer past the sender's timeout"
        # the double takes a request's arrival after any "late" delay: one sent just
        # before a kill may arrive after it
        for t, action in self.timeline:
            if first["time"] - LATE_MAX_S - 1 <= t <= later_time and action in (
                    "kill9", "kill9_twice", "reload_kill9", "sigterm_kill", "sigterm_int",
                    "sigterm"):
                return action
        if answered > later_time:
            return "sent again before its answer came"
        if eid is not None and eid in self.ledger.acked_twice:
            return "posted again by the client"
        return "unexplained"

    def finish(self):
        s, d = self.s, self.d
        try:
            if s.proc is not None and s.proc.poll() is None:
                self.terminate()
            logs = s.logs()
            other = collections.Counter(m for m in LOG_ERROR.findall(logs)
                                        if not m.startswith(EXPECTED_ERRORS))
            if other:
                self.figures["other_log_errors"] = dict(other)
            self.figures["service_said"] = {k: logs.count(m) for k, m in SEEN.items()
                                            if m in logs}
            errors = tool_errors(logs)
            if errors:
                self.fail("sanitizer reports in the service log:\n" + "\n".join(errors[:30]))
        finally:
            try:
                d.stop()
            except AssertionError:
                pass  # already reported by check()
            harness.ARTIFACTS.clear()
            if self.failures or self.keep:
                log("  round directory kept: " + self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)


def interrupted(signum, frame):
    raise KeyboardInterrupt()  # the round's service is stopped on the way out


def main():
    signal.signal(signal.SIGTERM, interrupted)
    seconds = float(os.environ.get("CHAOS_SECONDS") or 300)
    seed = os.environ.get("CHAOS_SEED")
    seed = int(seed) if seed else random.SystemRandom().randrange(10 ** 9)
    keep = os.environ.get("CHAOS_KEEP") == "1"
    log("chaos: CHAOS_SEED=%d CHAOS_SECONDS=%g binary %s" % (seed, seconds, harness.BIN))
    started = time.monotonic()
    totals = collections.Counter()
    causes = collections.Counter()
    both = collections.Counter()
    failed = []
    k = 0
    while k == 0 or time.monotonic() - started < seconds:
        r = Round(seed + k, keep)
        try:
            r.run()
        except Abort:
            pass
        except Exception as e:  # a round that breaks is a failed round, the run goes on
            import traceback
            r.fail("the round broke: %s\n%s" % (e, traceback.format_exc()))
        f = r.figures
        log("  figures: " + json.dumps(f, sort_keys=True))
        for key in ("posted", "acknowledged", "delivered", "dead_lettered",
                    "delivered_unacknowledged"):
            totals[key] += f.get(key, 0)
        for c, n in f.get("duplicates", {}).items():
            causes[c] += n
        for c, n in f.get("delivered_and_dead_lettered", {}).items():
            both[c] += n
        if r.failures:
            failed.append(r.seed)
            log("  round seed %d FAILED; replay: make chaos CHAOS_SEED=%d CHAOS_SECONDS=1"
                % (r.seed, r.seed))
        else:
            log("  round seed %d passed" % r.seed)
        k += 1
    log("chaos: %d rounds in %.0f s (seeds %d..%d): %s; duplicates by cause %s; delivered, "
        "then dead-lettered: %s"
        % (k, time.monotonic() - started, seed, seed + k - 1,
           json.dumps(dict(totals), sort_keys=True), json.dumps(dict(causes), sort_keys=True),
           json.dumps(dict(both), sort_keys=True)))
    if failed:
        log("chaos: FAILED rounds, seeds %s" % failed)
        return 1
    log("chaos: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
