"""Test harness: starts the real tributary binary on loopback and talks to it.

Each Service runs in its own temporary directory (queue, logs) on a free port.
The binary comes from TEST_TRIBUTARY_BIN (default host/tributary); TEST_WRAPPER
(e.g. valgrind) is put in front of it.
"""

import collections
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import time
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.abspath(os.path.join(ROOT, os.environ.get("TEST_TRIBUTARY_BIN", "host/tributary")))
WRAPPER = shlex.split(os.environ.get("TEST_WRAPPER", ""))
# A sanitizer build (make asan): freed memory waits in ASan's quarantine, so a
# process's peak memory says nothing about what it keeps.
SANITIZED = "-fsanitize" in os.environ.get("CFLAGS", "")
RULES = os.path.join(ROOT, "rules")
DATA = os.path.join(ROOT, "tests", "data")
# Under valgrind everything is much slower.
SLOW = 10 if WRAPPER else 1

TOKEN = "test-token-0123456789abcdef"

FEEDS = ("ios", "android", "web", "unbound")
# Every feed's records as one table (the queue keeps a view over a ring of
# tables per feed).
RECORDS = "(%s)" % " UNION ALL ".join(
    "SELECT %d AS feed, * FROM records_%s" % (i, f) for i, f in enumerate(FEEDS))
# What AddressSanitizer, UndefinedBehaviorSanitizer, LeakSanitizer, ThreadSanitizer and
# valgrind print when they find something.
TOOL_ERRORS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
               "WARNING: ThreadSanitizer",
               "== Invalid ", "== Conditional jump", "definitely lost in", "== Mismatched free",
               "== Syscall param")


# Everything the service said during this test run (logs, response bodies, CLI
# output, metrics) and every secret configured, for test_zz_secrets.
ARTIFACTS = []
SECRETS = set()
# The variables that hold secrets (paths such as TRIBUTARY_TLS_KEY do not).
_SECRET_ENV = re.compile(r"^TRIBUTARY_(INBOUND_TOKENS|INBOUND_HMAC_SECRETS|ADMIN_TOKEN|METRICS_TOKEN|"
                         r"FEEDS_[A-Z]+_(KEY|SECRET))$")


def register_secret(value):
    """Declares a secret a test configured some other way than the environment."""
    if value and len(value) >= 6:
        SECRETS.add(value)


def register_env_secrets(env):
    for k, v in (env or {}).items():
        if _SECRET_ENV.match(k):
            for part in str(v).split(","):
                register_secret(part.strip())


def collect(label, text):
    if text:
        ARTIFACTS.append((label, text if isinstance(text, str) else text.decode(errors="replace")))


def tool_errors(text):
    """The lines of text in which a sanitizer or valgrind reports an error."""
    return [line for line in text.splitlines() if any(m in line for m in TOOL_ERRORS)]


# Services listen on ports of a range below the kernel's ephemeral ports (which
# the doubles and clients take), handed out in turn. Each worker process of
# run.py has a range of its own, so two workers never hand out the same port
# between its check here and the service's bind.
PORT_RANGE_START = 20000
PORT_RANGE_SIZE = 1000
_ports = {"first": PORT_RANGE_START, "next": 0}


def use_port_range(index):
    """Makes this process hand out the ports of range index (0, 1, ...)."""
    _ports["first"] = PORT_RANGE_START + index * PORT_RANGE_SIZE
    _ports["next"] = 0


def free_port():
    """The next port of this process's range that nothing listens on or holds."""
    for _ in range(PORT_RANGE_SIZE):
        port = _ports["first"] + _ports["next"] % PORT_RANGE_SIZE
        _ports["next"] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in %d..%d" % (_ports["first"], _ports["first"] + PORT_RANGE_SIZE))


def clean_env(extra=None):
    """The test's environment without any TRIBUTARY_* variable of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUTARY_")}
    env.update(extra or {})
    return env


def run_cli(args, env=None, stdin=None, cwd=None, timeout=60):
    """Runs the binary once; returns CompletedProcess with text output. A
    sanitizer or valgrind report fails the calling test."""
    p = subprocess.run(
        WRAPPER + [BIN] + args,
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=cwd or ROOT,
        timeout=timeout * SLOW,
    )
    register_env_secrets(env)
    collect("cli %s stdout" % args[:2], p.stdout)
    collect("cli %s stderr" % args[:2], p.stderr)
    errors = tool_errors(p.stderr)
    if errors or p.returncode == 99:
        raise AssertionError("%s reported errors:\n%s" % (args, p.stderr))
    return p


# GNU time, to read a command's peak memory.
TIME = "/usr/bin/time"


def fault_shim(name):
    """Builds tests/integration/faults/<name>.c once per run; the path of the
    library, for LD_PRELOAD."""
    if name not in _SHIMS:
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults", name + ".c")
        path = os.path.join(tempfile.mkdtemp(prefix="tributary-shim-"), name + ".so")
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", path, src, "-ldl", "-lpthread"],
                       check=True)
        _SHIMS[name] = path
    return _SHIMS[name]


_SHIMS = {}


def preload_env(name):
    """The environment that preloads the fault shim <name> into the binary."""
    # a sanitizer build wants its runtime first; the shim only wraps a call
    return {"LD_PRELOAD": fault_shim(name),
            "ASAN_OPTIONS": (os.environ.get("ASAN_OPTIONS", "") +
                             ":verify_asan_link_order=0").lstrip(":")}


def preload(s, name):
    """Preloads the fault shim <name> into the next start of s."""
    s.env.update(preload_env(name))


def run_cli_peak_rss(args, env=None, cwd=None, timeout=60):
    """Runs the binary once under GNU time, without TEST_WRAPPER (whose memory
    is not the binary's); returns (CompletedProcess, peak resident memory in
    KiB). Through time, a small process: a process started from this one would
    count this one's memory too (the peak survives fork and exec)."""
    with tempfile.NamedTemporaryFile("r") as peak:
        p = subprocess.run([TIME, "-f", "%M", "-o", peak.name, BIN] + args, capture_output=True,
                           text=True, env=clean_env(env), cwd=cwd or ROOT, timeout=timeout)
        kib = int(peak.read().split()[-1])
    register_env_secrets(env)
    collect("cli %s stdout" % args[:2], p.stdout)
    collect("cli %s stderr" % args[:2], p.stderr)
    return p, kib


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "Response(%d, %r)" % (self.status, self.body[:300])


def request(port, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout * SLOW)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        resp = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        collect("%s %s -> %d" % (method, path, resp.status), resp.body)
        collect("%s %s headers" % (method, path), json.dumps(resp.headers))
        return resp
    finally:
        conn.close()


def claim_batches(blob):
    """The record ids of each batch of a claim as the queue stores it (host/claim.h)."""
    (n,) = struct.unpack_from("<I", blob, 0)
    at, out = 4, []
    for _ in range(n):
        at += 1 + blob[at] + 8
        (count,) = struct.unpack_from("<I", blob, at)
        at += 4
        out.append(list(struct.unpack_from("<%dq" % count, blob, at)))
        at += 8 * count
    return out


def claim_blob(batches, oldest_ms=0):
    """A claim of batches [(source_request_id, [record ids])] as the queue stores it,
    their oldest record received at oldest_ms (0: long ago)."""
    out = struct.pack("<I", len(batches))
    for srid, ids in batches:
        out += bytes([len(srid)]) + srid.encode() + struct.pack("<qI", oldest_ms, len(ids))
        out += struct.pack("<%dq" % len(ids), *ids)
    return out


class Service:
    """One running tributary serve."""

    def __init__(self, env=None, rules_dir=None, config=None, tokens=(TOKEN,), workdir=None):
        self.dir = workdir or tempfile.mkdtemp(prefix="tributary-it-")
        self.port = free_port()
        self.data_dir = os.path.join(self.dir, "var")
        self.log_path = os.path.join(self.dir, "service.log")
        self.env = {
            "TRIBUTARY_LISTEN": "127.0.0.1:%d" % self.port,
            "TRIBUTARY_DATA_DIR": self.data_dir,
            "TRIBUTARY_RULES_DIR": rules_dir or RULES,
            "TRIBUTARY_LOG_LEVEL": "debug",
        }
        if tokens:
            self.env["TRIBUTARY_INBOUND_TOKENS"] = ",".join(tokens)
        self.env.update(env or {})
        register_env_secrets(self.env)
        self.config = None
        if config is not None:
            self.config = os.path.join(self.dir, "tributary.conf.lua")
            with open(self.config, "w") as f:
                f.write(config)
        self.proc = None
        self.killed = False
        self.expected_exit = 0
        self.preexec = None  # run in the child before the binary (resource limits)

    def start(self, wait=True):
        self.killed = False
        args = WRAPPER + [BIN, "serve"]
        if self.config:
            args += ["--config", self.config]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, env=clean_env(self.env), cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=self.preexec
        )
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout=15):
        deadline = time.time() + timeout * SLOW
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("service exited with %d:\n%s" % (self.proc.returncode, self.logs()))
            try:
                if request(self.port, "GET", "/healthz", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("service did not become healthy:\n" + self.logs())

    def stop(self, timeout=30):
        """SIGTERM and wait; returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("service did not stop on SIGTERM:\n" + self.logs())
        if self.proc:
            self.log.close()
        return self.proc.returncode if self.proc else None

    def reload(self, config=None, outcome="configuration and rules reloaded", timeout=10):
        """Writes config (when given) to the service's file, sends SIGHUP and waits
        for one more log line with outcome; returns whether it came."""
        if config is not None:
            with open(self.config, "w") as f:
                f.write(config)
        seen = self.logs().count(outcome)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + timeout * SLOW
        while self.logs().count(outcome) == seen and time.time() < deadline:
            time.sleep(0.05)
        return self.logs().count(outcome) > seen

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        self.killed = True

    def cleanup(self):
        """Stops the service; fails when it did not exit cleanly or a sanitizer or
        valgrind reported an error at any point of its life."""
        try:
            if self.proc and self.proc.poll() is None:
                try:
                    collect("metrics at cleanup", self.get("/metrics").body)
                except OSError:
                    pass
            code = self.stop()
            collect("service log", self.logs())
            errors = tool_errors(self.logs())
            if errors:
                raise AssertionError("tool errors in the service log:\n" + "\n".join(errors[:20]))
            if code not in (0, None, -signal.SIGKILL, self.expected_exit):
                raise AssertionError("service exited with %s:\n%s" % (code, self.logs()[-3000:]))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def post(self, events=None, body=None, token=TOKEN, headers=None, path="/currents"):
        h = {"Content-Type": "application/json", "Braze-Currents-Version": "1"}
        if token is not None:
            h["Authorization"] = "Bearer " + token
        h.update(headers or {})
        if body is None:
            body = json.dumps({"events": events or []})
        return request(self.port, "POST", path, body, h)

    def get(self, path):
        token = self.env.get("TRIBUTARY_METRICS_TOKEN")
        headers = {"Authorization": "Bearer " + token} if token and path == "/metrics" else None
        return request(self.port, "GET", path, headers=headers)

    def metrics(self):
        """Prometheus text -> {'name{labels}': value}."""
        out = {}
        for line in self.get("/metrics").body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def db(self):
        """A read connection to the queue database."""
        return sqlite3.connect(os.path.join(self.data_dir, "queue.db"), timeout=30)

    def queued_ids(self):
        """Event ids waiting for delivery, in order of arrival: records above their
        feed's claimed id, or in a batch not yet delivered. (Delivered records
        stay in their table until it is emptied whole.)"""
        with self.db() as db:
            claimed = dict(db.execute("SELECT feed, claimed FROM settled").fetchall())
            held = set()
            for feed, batches, done in db.execute(
                    "SELECT c.feed, c.batches, d.done FROM claims AS c "
                    "LEFT JOIN claim_done AS d ON d.id = c.id"):
                for i, ids in enumerate(claim_batches(batches)):
                    if not (done and i // 8 < len(done) and done[i // 8] >> (i % 8) & 1):
                        held.update((feed, r) for r in ids)
            rows = db.execute("SELECT feed, id, event_id FROM %s ORDER BY received_ms, feed, id"
                              % RECORDS).fetchall()
        return [e for f, i, e in rows if i > claimed.get(f, 0) or (f, i) in held]

    def cli(self, args, **kw):
        env = dict(self.env)
        if self.config:
            # before a "--", after which it would be an argument
            at = args.index("--") if "--" in args else len(args)
            args = args[:at] + ["--config", self.config] + args[at:]
        return run_cli(args, env=env, cwd=self.dir, **kw)


class ServiceTest(unittest.TestCase):
    """Base class: self.service(...) starts a service that is cleaned up after the test."""

    def service(self, **kw):
        s = Service(**kw)
        self.addCleanup(s.cleanup)
        return s.start()

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix="tributary-it-")
        self.addCleanup(shutil.rmtree, d, True)
        return d

    def wait(self, condition, timeout=20, what="condition"):
        """Polls condition until it holds; fails the test after timeout * SLOW seconds."""
        deadline = time.time() + timeout * SLOW
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.05)
        self.fail("timed out waiting for " + what)

    def rules_dir(self, extra=None, default=True):
        """A rules directory: the shipped rules (unless default=False) plus extra {name: source}."""
        d = self.tmpdir()
        if default:
            for name in os.listdir(RULES):
                if name.endswith(".lua"):
                    shutil.copy(os.path.join(RULES, name), d)
        for name, src in (extra or {}).items():
            with open(os.path.join(d, name), "w") as f:
                f.write(src)
        return d


_seq = [0]


def event(event_type="users.messages.email.Open", user="customer-1", id=None, time_s=None,
          platform=None, **props):
    """A Currents event shaped like Braze's samples; by default an hour old (older than
    30 days it goes to mParticle's historical endpoint)."""
    _seq[0] += 1
    e = {
        "event_type": event_type,
        "id": id or "evt-%d-%d-%d" % (os.getpid(), int(time.time() * 1000), _seq[0]),
        "time": int(time.time()) - 3600 if time_s is None else time_s,
        "user": {"user_id": "5f8a9b0c1d2e3f4a5b6c7d8e", "timezone": "Europe/Berlin"},
        "properties": dict(props),
    }
    if user is not None:
        e["user"]["external_user_id"] = user
    if platform is not None:
        e["properties"]["platform"] = platform
    return e


def lines_per_second(logs, **kinds):
    """Per second of the log's stamps, the lines of each kind: kinds maps a
    name to the texts a line must all hold; a line counts for the first kind
    it fits. Returns {name: Counter(second -> lines)}."""
    counts = {name: collections.Counter() for name in kinds}
    for line in logs.splitlines():
        for name, texts in kinds.items():
            if all(t in line for t in texts):
                counts[name][line[3:22]] += 1
                break
    return counts


def busiest_second(sent):
    """The most batches that arrived within one second: sent is a list of
    (arrival time, batches), as mParticle counts them against its rate limit."""
    return max((sum(n for t, n in sent if start <= t < start + 1.0) for start, _ in sent),
               default=0)


def load_event_map():
    """[(braze_type, mparticle_name, mparticle_event_type)] from tests/data/event-map.tsv."""
    rows = []
    with open(os.path.join(DATA, "event-map.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            braze, name, kind = line.rstrip("\n").split("\t")
            rows.append((braze, name, kind))
    return rows
