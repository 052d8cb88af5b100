"""A test double of mParticle's server-to-server Events API (see
/work/shared/reference/mparticle-events-api.md), for the integration tests.

    with MParticleDouble(feeds={"ios": ("ios-key", "ios-secret")}) as d:
        ...  # point the service at d.url
        assert d.wait_for_events(3, timeout=10)
        d.events("ios")

Endpoints: POST /v2/bulkevents (JSON array of batches), POST /v2/bulkevents/historical
(the same, for events older than 30 days: each needs a timestamp at least 72 hours old) and
POST /v2/events (one batch object); anything else is 404. An event older than 30 days on a
real-time endpoint, or too young for the historical one, fails its batch. HTTP Basic auth with a feed's key and secret decides the feed:
no (usable) Basic credentials -> 401, credentials matching no feed -> 403.

Order of checks for a request on an endpoint:
  auth (401/403 faults replace its result) -> slow / drop / fail faults (only for requests that
  passed auth) -> size limits (413) -> JSON and schema validation -> poison markers (400)
  -> 202 and recording. A 400 or 413 rejects the whole request: nothing of it is stored.
Schema validation: /v2/events answers 400 for an invalid batch, /v2/bulkevents for a body
that is not an array of objects. Otherwise /v2/bulkevents, as the real API, answers 202 also
when some batches inside failed: those are dropped, and kept in
`rejected` for the tests. stop() fails (AssertionError) while any batch was rejected, so
that a test whose service sent one cannot pass unnoticed; a test that means to send one
reads and clears them with take_rejected(). A request over the API's limits (256 KB, 100
batches, a batch over 128 KB) is answered 413 or 400, as mParticle may, and kept in `rejected`
too: mParticle does not document its answer, which may as well be a 202 that drops the batch,
so a service that counts on splitting after such an answer would lose events there.
Deduplication: a batch whose source_request_id the same API key sent before is answered 202
and not stored again, as mParticle does; it is kept in `repeats`, and stop() fails while one
differs from the batch first sent with its id (mParticle would have dropped its events).
A fail fault may hold its answers until the test sets an event (fail(..., hold=event)).
Limits of the account: rate_limit batches per second (270 by default, mParticle's default; a
request over it is 429), and event_names_limit unique event names (data.event_name) over all
feeds (1000 by default): as mParticle, the double answers 202 and drops an event whose name is
new past it; such events are kept in `name_dropped`, and stop() fails while any is, unless the
test read them with take_name_dropped().

Everything is thread-safe and may be changed while the server runs. The Authorization header
and the secrets are never logged nor recorded (request headers are stored redacted).
"""

import base64
import binascii
import collections
import copy
import http.server
import json
import re
import socket
import sys
import threading
import time
import urllib.parse

# "KB" read as thousands of bytes, the stricter reading of the documentation
MAX_REQUEST_BYTES = 256000  # a request must be *under* 256 KB
MAX_BATCH_BYTES = 128000  # a batch at most 128 KB
MAX_BATCHES = 100
MAX_ATTRIBUTES = 100
MAX_NAME_CHARS = 256
MAX_VALUE_CHARS = 4096
HOLD_MAX_S = 30  # longest a held answer waits for its event
RATE_LIMIT = 270  # batches per second per account, by default
EVENT_NAMES_LIMIT = 1000  # unique event names per workspace

ENVIRONMENTS = ("production", "development")

# The documented list plus the two more the published JSON schema knows (first_run, profile).
EVENT_TYPES = frozenset([
    "custom_event", "screen_view", "commerce_event", "session_start", "session_end", "uninstall",
    "opt_out", "push_registration", "push_message", "application_state_transition", "crash_report",
    "breadcrumb", "network_performance", "user_attribute_change", "user_identity_change",
    "first_run", "profile",
])

CUSTOM_EVENT_TYPES = frozenset([
    "navigation", "location", "search", "transaction", "user_content", "user_preference", "social",
    "media", "other",
])

PLATFORMS = frozenset([
    "iOS", "Android", "web", "tvOS", "roku", "out_of_band", "alexa", "smart_tv", "fire_tv", "xbox",
])

ENDPOINTS = {"/v2/bulkevents": "bulk", "/v2/events": "single", "/v2/bulkevents/historical": "historical"}
HISTORICAL_AGE_S = 30 * 86400  # older data belongs on /v2/bulkevents/historical
HISTORICAL_MIN_AGE_S = 72 * 3600  # younger data is refused there


def check_age(batch, where, historical, now=None):
    """Raises Rejected(400, ...) for an event on the wrong endpoint for its age: older than
    30 days on the real-time endpoints; without a timestamp or younger than 72 hours on the
    historical one."""
    now = time.time() if now is None else now
    for i, e in enumerate(batch.get("events") or []):
        ts = (e.get("data") or {}).get("timestamp_unixtime_ms") if isinstance(e, dict) else None
        age = now - ts / 1000.0 if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None
        w = "%s.events[%d]" % (where, i)
        if historical and (age is None or age < HISTORICAL_MIN_AGE_S):
            raise Rejected(400, "%s: the historical endpoint takes events with a "
                           "timestamp_unixtime_ms at least 72 hours old" % w)
        if not historical and age is not None and age > HISTORICAL_AGE_S:
            raise Rejected(400, "%s is older than 30 days: send it to /v2/bulkevents/historical" % w)

_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    413: "PAYLOAD_TOO_LARGE",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_SERVER_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}

_WS = re.compile(r"[ \t\n\r]*")


def error_body(status, message):
    """The documented error body: {"errors":[{"code":..., "message":...}]} as bytes."""
    code = _ERROR_CODES.get(status, "HTTP_%d" % status)
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def basic_auth(key, secret):
    """The Authorization header value for key and secret."""
    return "Basic " + base64.b64encode(("%s:%s" % (key, secret)).encode()).decode()


class Rejected(Exception):
    """The request is answered with status and the documented error body."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def _reject_constant(name):
    raise ValueError("invalid JSON constant " + name)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text):
    value, end = _DECODER.raw_decode(text, _WS.match(text, 0).end())
    if _WS.match(text, end).end() != len(text):
        raise ValueError("extra data after JSON value at offset %d" % end)
    return value


def _array_items(text):
    """The raw JSON text of each element of a JSON array (text already known to be valid)."""
    i = _WS.match(text, 0).end() + 1  # past '['
    i = _WS.match(text, i).end()
    items = []
    if text[i] == "]":
        return items
    while True:
        _, end = _DECODER.raw_decode(text, i)
        items.append(text[i:end])
        i = _WS.match(text, end).end()
        if text[i] == "]":
            return items
        i = _WS.match(text, i + 1).end()  # past ','


def _chars(s):
    """A string's length as mParticle's limits are read here: UTF-16 code units, as Java
    and JavaScript count them (a character beyond U+FFFF, most emoji, counts two), the
    stricter reading of "characters"."""
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def _is_scalar(v):
    return v is None or isinstance(v, (str, int, float, bool))


def _check_attributes(attrs, where, allow_arrays):
    if attrs is None:
        return
    if not isinstance(attrs, dict):
        raise Rejected(400, "%s must be an object" % where)
    if len(attrs) > MAX_ATTRIBUTES:
        raise Rejected(400, "%s has %d attributes, at most %d are allowed" % (where, len(attrs), MAX_ATTRIBUTES))
    for name, value in attrs.items():
        if _chars(name) > MAX_NAME_CHARS:
            raise Rejected(400, "%s: attribute name longer than %d characters" % (where, MAX_NAME_CHARS))
        values = [value]
        if allow_arrays and isinstance(value, list):
            values = value
        for v in values:
            if not _is_scalar(v):
                raise Rejected(400, "%s.%s: value must be a string, number, boolean or null, not %s"
                               % (where, name, "an array" if isinstance(v, list) else "an object"))
            if isinstance(v, str) and _chars(v) > MAX_VALUE_CHARS:
                raise Rejected(400, "%s.%s: value longer than %d characters" % (where, name, MAX_VALUE_CHARS))


def validate_batch(batch, where="batch"):
    """Raises Rejected(400, message) when the batch would be refused by the API."""
    if not isinstance(batch, dict):
        raise Rejected(400, "%s must be a JSON object" % where)
    if "batch_id" in batch:
        raise Rejected(400, '%s: field "batch_id" is not allowed' % where)
    env = batch.get("environment")
    if env not in ENVIRONMENTS:
        if env is None:
            raise Rejected(400, 'Required batch field "environment" is missing or empty (%s)' % where)
        raise Rejected(400, '%s: invalid environment %s (production or development)' % (where, json.dumps(env)))
    ids = batch.get("user_identities")
    if ids is not None:
        if not isinstance(ids, dict):
            raise Rejected(400, "%s.user_identities must be an object" % where)
        for name in ("customer_id", "customerid"):
            if name in ids and not isinstance(ids[name], str):
                raise Rejected(400, "%s.user_identities.%s must be a string" % (where, name))
    _check_attributes(batch.get("user_attributes"), where + ".user_attributes", allow_arrays=True)
    device = batch.get("device_info")
    if device is not None:
        if not isinstance(device, dict):
            raise Rejected(400, "%s.device_info must be an object" % where)
        if "platform" in device and device["platform"] is not None and device["platform"] not in PLATFORMS:
            raise Rejected(400, "%s.device_info.platform: unknown platform %s" % (where, json.dumps(device["platform"])))
    events = batch.get("events")
    if not isinstance(events, list):
        if events is None:
            raise Rejected(400, 'Required batch field "events" is missing (%s)' % where)
        raise Rejected(400, "%s.events must be an array" % where)
    for i, ev in enumerate(events):
        w = "%s.events[%d]" % (where, i)
        if not isinstance(ev, dict):
            raise Rejected(400, "%s must be an object" % w)
        et = ev.get("event_type")
        if not et:
            raise Rejected(400, 'Required event field "event_type" is missing or empty (%s)' % w)
        if et not in EVENT_TYPES:
            raise Rejected(400, "%s: unknown event_type %s" % (w, json.dumps(et)))
        data = ev.get("data")
        if not isinstance(data, dict):
            raise Rejected(400, 'Required event field "data" is missing or not an object (%s)' % w)
        if et == "custom_event":
            name = data.get("event_name")
            if not isinstance(name, str) or not name:
                raise Rejected(400, 'Required event field "event_name" is missing or empty (%s)' % w)
            if _chars(name) > MAX_NAME_CHARS:
                raise Rejected(400, "%s.data.event_name longer than %d characters" % (w, MAX_NAME_CHARS))
            if data.get("custom_event_type") not in CUSTOM_EVENT_TYPES:
                raise Rejected(400, "%s.data.custom_event_type: invalid value %s"
                               % (w, json.dumps(data.get("custom_event_type"))))
        ts = data.get("timestamp_unixtime_ms")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            raise Rejected(400, "%s.data.timestamp_unixtime_ms must be a number" % w)
        _check_attributes(data.get("custom_attributes"), w + ".data.custom_attributes", allow_arrays=False)


class _Fault:
    def __init__(self, kind, feed, times, **params):
        self.kind = kind
        self.feed = feed
        self.times = times
        self.params = params

    def matches(self, feed):
        return self.times != 0 and (self.feed is None or self.feed == feed)

    def consume(self):
        if self.times is not None:
            self.times -= 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive connections
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that resets its connection (the service stopped or killed
        # in a test) is not an error of the double; anything else is printed.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mParticleDouble/1.0"

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        self.server.double._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.double._track(self.connection, False)

    def log_message(self, format, *args):  # never log (no headers, no credentials)
        pass

    def _dispatch(self):
        try:
            self.server.double._handle(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch


class MParticleDouble:
    """An in-process mParticle Events API on 127.0.0.1 (see the module docstring).

    feeds: {name: (key, secret)}; default one feed "default" with the documented test vector.
    Attributes: url, port, rate_limit_percentage (None or int, sent on 202s), idle_timeout,
    rate_limit (batches per second for the whole account, 270 by default, None for none: a
    request that would take the last rate_window_s (1.0) seconds over it is 429 with
    Retry-After: 1, as mParticle's provisioned rate), event_names_limit (unique event names
    of the workspace, 1000 by default: the events of new names past it are dropped).
    """

    def __init__(self, feeds=None, idle_timeout=None):
        if feeds is None:
            feeds = {"default": ("example-api-key", "example-api-secret")}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._feeds = {}
        for name, (key, secret) in feeds.items():
            self._feeds[name] = (key, secret)
        self.rate_limit_percentage = None
        self.rate_limit = RATE_LIMIT
        self.rate_window_s = 1.0
        self.event_names_limit = EVENT_NAMES_LIMIT
        self._event_names = set()  # of the workspace: every feed's
        self._name_dropped = []
        self._accepted_at = []  # (time, batches) of the last second, for rate_limit
        self.idle_timeout = idle_timeout
        self._faults = []
        self._poison = []
        self._requests = []
        self._batches = []
        self._rejected = []
        # (API key, source_request_id) -> the batch first accepted with them
        self._seen = {}
        self._repeats = []
        self._event_count = 0
        self._done_requests = 0
        self._connections = set()
        self._stopping = threading.Event()
        self._server = None
        self._thread = None
        self.port = None
        self.url = None

    def __repr__(self):
        return "MParticleDouble(url=%r, feeds=%r)" % (self.url, sorted(self._feeds))

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self):
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.double = self
        self.port = self._server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="mparticle-double", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops serving and closes open (keep-alive) connections; idempotent."""
        if self._server is None:
            return
        self._stopping.set()
        # shutdown() waits for serve_forever's select() to wake up: wake it with a connection.
        t = threading.Thread(target=self._server.shutdown, daemon=True)
        t.start()
        while t.is_alive():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                pass
            t.join(0.02)
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(5)
        self._server = None
        with self._cond:
            self._cond.notify_all()
            rejected = list(self._rejected)
            changed = [r for r in self._repeats if not r["same"]]
            name_dropped = list(self._name_dropped)
        if name_dropped:
            raise AssertionError("mParticle dropped events for their name, new past its limit "
                                 "of %d event names: %r" % (self.event_names_limit, name_dropped))
        if rejected:
            raise AssertionError("mParticle would have dropped batches the service sent: %r" % rejected)
        if changed:
            raise AssertionError("batches re-used a source_request_id with other content, which "
                                 "mParticle drops as repeats: %r" % changed)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _track(self, conn, add):
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ---- feeds -----------------------------------------------------------------------------

    def set_feed(self, name, key, secret):
        """Adds or replaces a feed's credentials (e.g. to rotate a secret)."""
        with self._lock:
            self._feeds[name] = (key, secret)

    def remove_feed(self, name):
        """Removes a feed: its credentials are answered 403 from now on (revoked)."""
        with self._lock:
            self._feeds.pop(name, None)

    def auth_header(self, feed):
        """The Authorization header value for a configured feed (for tests)."""
        with self._lock:
            key, secret = self._feeds[feed]
        return basic_auth(key, secret)

    # ---- fault injection -------------------------------------------------------------------

    def fail(self, status, feed=None, times=None, retry_after=None, rate_limit_exceeded=None, message=None,
             hold=None, path=None):
        """The next `times` requests (None: until cleared) of `feed` (None: any) to `path` (None:
        either endpoint) get `status`.

        401/403 replace the auth result (they also hit requests without valid credentials when
        feed is None); other statuses are consumed only by requests that passed auth. For 429,
        retry_after adds "Retry-After: <retry_after>" and rate_limit_exceeded adds
        "X-mp-rate-limit-exceeded: <value>". Any status may be injected, 2xx included (answered
        with an empty body; nothing is recorded as accepted). hold: a threading.Event; the
        requests that took this fault are answered only once it is set (at most HOLD_MAX_S
        seconds later), so that a test decides when, and in which order, answers arrive.
        """
        with self._lock:
            self._faults.append(_Fault("fail", feed, times, status=int(status), retry_after=retry_after,
                                       rate_limit_exceeded=rate_limit_exceeded, message=message,
                                       hold=hold, path=path))

    def slow(self, seconds, times=None, feed=None):
        """Delays the answers of the next `times` authenticated requests by `seconds` (the
        request is processed, and its batches recorded, before the delay)."""
        with self._lock:
            self._faults.append(_Fault("slow", feed, times, seconds=float(seconds)))

    def late(self, seconds, times=None):
        """The next `times` requests, of any feed, arrive `seconds` late: the double waits
        before it takes their arrival time and handles them, as when a request's way is slow
        (a new connection and TLS session, a congested network)."""
        with self._lock:
            self._faults.append(_Fault("late", None, times, seconds=float(seconds)))

    def drop_connections(self, times=None, feed=None, after_processing=False):
        """Closes the connection without any response after reading the request.

        after_processing=True: the request is processed (and recorded if valid) first, as when
        the response is lost on the way back (a resend then shows up as a duplicate).
        """
        with self._lock:
            self._faults.append(_Fault("drop", feed, times, after_processing=after_processing))

    def poison(self, marker, status=400):
        """Requests with a batch whose JSON text contains `marker` are answered 400 naming the
        batch; with another status (a 5xx), that status, as a server that fails on the content
        of one batch does, whatever the other batches of the request."""
        with self._lock:
            self._poison.append((marker, int(status)))

    def clear_faults(self):
        """Removes all fail/slow/late/drop faults and poison markers."""
        with self._lock:
            self._faults = []
            self._poison = []

    def _take_fault(self, kinds, feed, pred=None):
        # called with the lock held
        for f in self._faults:
            if f.kind in kinds and f.matches(feed) and (pred is None or pred(f)):
                f.consume()
                return f
        return None

    # ---- recordings ------------------------------------------------------------------------

    @property
    def requests(self):
        """Every request seen, in arrival order: dicts with request_id, method, path, feed (or
        None), status (None while pending or when dropped), dropped, batches (count or None),
        headers (lower-case names, authorization redacted), body_size, error (message of a
        refusal), time (time.monotonic() at arrival), answered (time.monotonic() of the answer)."""
        with self._lock:
            return [copy.deepcopy(r) for r in self._requests]

    @property
    def batches(self):
        """Accepted batches, each source_request_id once per API key:
        [{"feed", "batch", "request_id"}]."""
        with self._lock:
            return [dict(b) for b in self._batches]

    @property
    def repeats(self):
        """Batches answered 202 but not stored, as their source_request_id was seen before:
        [{"feed", "batch", "request_id", "same"}], same: the first one's content."""
        with self._lock:
            return [dict(b) for b in self._repeats]

    def take_rejected(self):
        """Batches a bulk request carried that the API would have dropped despite its 202:
        [{"feed", "index", "message", "source_request_id"}]; forgets them."""
        with self._lock:
            rejected, self._rejected = self._rejected, []
            return rejected

    def take_name_dropped(self):
        """Events answered 202 and dropped, as their name was new past event_names_limit:
        [{"feed", "name", "source_message_id"}]; forgets them."""
        with self._lock:
            dropped, self._name_dropped = self._name_dropped, []
            return dropped

    @property
    def event_names(self):
        """The event names the workspace knows."""
        with self._lock:
            return set(self._event_names)

    def events(self, feed=None):
        """[(feed, batch, event)] of all accepted events, in order."""
        with self._lock:
            return [(b["feed"], b["batch"], e) for b in self._batches
                    if feed is None or b["feed"] == feed
                    for e in (b["batch"].get("events") or [])]

    def source_message_ids(self, feed=None):
        return [e.get("data", {}).get("source_message_id") for _, _, e in self.events(feed)]

    def source_request_ids(self, feed=None):
        """collections.Counter of the source_request_id of batches answered 202, repeats
        included (counts > 1: resent)."""
        with self._lock:
            return collections.Counter(b["batch"].get("source_request_id")
                                       for b in self._batches + self._repeats
                                       if feed is None or b["feed"] == feed)

    def event_count(self):
        with self._lock:
            return self._event_count

    def wait_for_events(self, n, timeout):
        """True once at least n events were accepted in total; False after timeout seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._event_count >= n, timeout)

    def wait_for_requests(self, n, timeout):
        """True once at least n requests were finished (answered or dropped)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done_requests >= n, timeout)

    def clear_records(self):
        """Forgets recorded requests and batches (faults and feeds stay)."""
        with self._cond:
            self._requests = []
            self._batches = []
            self._repeats = []
            self._event_count = 0
            self._done_requests = 0

    # ---- request handling ------------------------------------------------------------------

    def _authenticate(self, headers):
        """(feed, None) or (None, 401|403)."""
        value = headers.get("Authorization")
        if value is None:
            return None, 401
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic" or not token.strip():
            return None, 401
        try:
            raw = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None, 401
        key, sep, secret = raw.partition(":")
        if not sep:
            return None, 401
        with self._lock:
            for name, (k, s) in self._feeds.items():
                if k == key and s == secret:
                    return name, None
        return None, 403

    @staticmethod
    def _read_body(h):
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = h.rfile.readline(65537)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline(65537)
        n = int(h.headers.get("Content-Length") or 0)
        if n < 0:
            raise ValueError("negative Content-Length")
        body = h.rfile.read(n)
        if len(body) != n:
            raise ConnectionResetError("request body cut short")
        return body

    def _handle(self, h):
        with self._lock:
            late = self._take_fault(("late",), None)
        if late is not None:
            self._delay(late.params["seconds"])
        arrived = time.monotonic()
        if self.idle_timeout is not None:
            h.connection.settimeout(self.idle_timeout)
        headers = {}
        for k, v in h.headers.items():
            headers[k.lower()] = v
        if "authorization" in headers:
            scheme = headers["authorization"].strip().partition(" ")[0]
            headers["authorization"] = scheme + " <redacted>"
        path = urllib.parse.urlsplit(h.path).path
        rec = {"method": h.command, "path": path, "feed": None, "status": None, "dropped": False,
               "batches": None, "headers": headers, "body_size": None, "error": None,
               "time": arrived, "answered": None}
        with self._lock:
            rec["request_id"] = len(self._requests) + 1
            self._requests.append(rec)
        try:
            body = self._read_body(h)
        except (ValueError, IndexError):
            self._answer(h, rec, 400, error_body(400, "unreadable request body"), close=True)
            return
        rec["body_size"] = len(body)

        if h.command != "POST" or path not in ENDPOINTS:
            self._answer(h, rec, 404, error_body(404, "no such endpoint: %s %s" % (h.command, path)))
            return

        feed, auth_status = self._authenticate(h.headers)
        rec["feed"] = feed
        with self._lock:
            auth_fault = self._take_fault(("fail",), feed, lambda f: f.params["status"] in (401, 403)
                                          and f.params["path"] in (None, path))
        if auth_fault is not None:
            self._hold(auth_fault)
            st = auth_fault.params["status"]
            msg = auth_fault.params["message"] or ("Authorization header missing or invalid" if st == 401
                                                   else "API key/secret are present but not valid")
            self._answer(h, rec, st, error_body(st, msg))
            return
        if auth_status == 401:
            self._answer(h, rec, 401, error_body(401, "Authorization header missing or invalid"))
            return
        if auth_status == 403:
            self._answer(h, rec, 403, error_body(403, "API key/secret are present but not valid"))
            return

        with self._lock:
            slow = self._take_fault(("slow",), feed)
            drop = self._take_fault(("drop",), feed)
            fail = None if drop is not None else self._take_fault(
                ("fail",), feed, lambda f: f.params["status"] not in (401, 403)
                and f.params["path"] in (None, path))
        delay = slow.params["seconds"] if slow is not None else 0.0

        if drop is not None and not drop.params["after_processing"]:
            self._delay(delay)
            self._drop(h, rec)
            return

        extra = []
        if fail is not None:
            st = fail.params["status"]
            if st == 429:
                if fail.params["retry_after"] is not None:
                    extra.append(("Retry-After", str(fail.params["retry_after"])))
                if fail.params["rate_limit_exceeded"] is not None:
                    extra.append(("X-mp-rate-limit-exceeded", str(fail.params["rate_limit_exceeded"])))
            default = {429: "Too many requests - rate limiting is being applied",
                       503: "Service unavailable - the message should be retried after a back off"}
            msg = fail.params["message"] or default.get(st, "injected failure %d" % st)
            status, body = st, (error_body(st, msg) if st >= 300 else b"")
        else:
            status, body, extra = self._process(body, path, feed, rec)

        self._delay(delay)
        self._hold(fail)
        if drop is not None:
            self._drop(h, rec)
            return
        self._answer(h, rec, status, body, extra)

    def _over_limit(self, feed, status, message):
        """The Rejected to raise for a request over the API's limits, kept in `rejected`."""
        with self._cond:
            self._rejected.append({"feed": feed, "limit": True, "message": message})
        return Rejected(status, message)

    def _process(self, body, path, feed, rec):
        """Validates and records; returns (status, body, extra headers)."""
        try:
            # the API takes JSON and says so ("Send Content-Type: application/json")
            ctype = rec["headers"].get("content-type", "").partition(";")[0].strip().lower()
            if ctype != "application/json":
                raise Rejected(415, "Content-Type must be application/json, not %s"
                               % json.dumps(rec["headers"].get("content-type")))
            if len(body) >= MAX_REQUEST_BYTES:
                raise self._over_limit(feed, 413, "request body of %d bytes, must be under %d"
                                       % (len(body), MAX_REQUEST_BYTES))
            try:
                text = body.decode("utf-8")
                value = _loads(text)
            except (UnicodeDecodeError, ValueError) as e:
                raise Rejected(400, "malformed JSON: %s" % e)
            if ENDPOINTS[path] in ("bulk", "historical"):
                if not isinstance(value, list):
                    raise Rejected(400, "%s expects a JSON array of batches" % path)
                batches, raws = value, _array_items(text)
                rec["batches"] = len(batches)
                if len(batches) > MAX_BATCHES:
                    raise self._over_limit(feed, 400, "too many batches in one request: %d, at most %d"
                                           % (len(batches), MAX_BATCHES))
            else:
                if not isinstance(value, dict):
                    raise Rejected(400, "/v2/events expects one batch object")
                batches, raws = [value], [text]
                rec["batches"] = 1
            for i, raw in enumerate(raws):
                size = len(raw.encode("utf-8"))
                if size > MAX_BATCH_BYTES:
                    raise self._over_limit(feed, 413, "batch %d is %d bytes, at most %d"
                                           % (i, size, MAX_BATCH_BYTES))
            dropped = []
            for i, batch in enumerate(batches):
                try:
                    validate_batch(batch, "batch[%d]" % i)
                    check_age(batch, "batch[%d]" % i, ENDPOINTS[path] == "historical")
                except Rejected as r:
                    # a body that is not an array of objects is malformed as a whole
                    if ENDPOINTS[path] == "single" or not isinstance(batch, dict):
                        raise
                    dropped.append({"feed": feed, "index": i, "message": r.message,
                                    "source_request_id": batch.get("source_request_id")})
            if dropped:
                keep = set(range(len(batches))) - {d["index"] for d in dropped}
                batches = [b for i, b in enumerate(batches) if i in keep]
                raws = [r for i, r in enumerate(raws) if i in keep]
            if ENDPOINTS[path] == "historical":
                # "empty batches are ignored": neither stored nor remembered
                # by their source_request_id
                kept = [i for i, b in enumerate(batches) if b.get("events")]
                batches = [batches[i] for i in kept]
                raws = [raws[i] for i in kept]
            with self._lock:
                markers = list(self._poison)
            for i, (batch, raw) in enumerate(zip(batches, raws)):
                canon = json.dumps(batch, ensure_ascii=False)
                for m, status in markers:
                    if (m in raw or m in canon) and status != 400:
                        raise Rejected(status, "internal error")
                    if m in raw or m in canon:
                        raise Rejected(400, "batch[%d] (source_request_id %s) rejected: invalid batch"
                                       % (i, json.dumps(batch.get("source_request_id"))))
        except Rejected as r:
            rec["error"] = r.message
            return r.status, error_body(r.status, r.message), []
        if self._over_rate(rec["batches"]):
            rec["error"] = "over the provisioned rate"
            return 429, error_body(429, "Too many requests - rate limiting is being applied"), [
                ("Retry-After", "1"), ("X-mp-rate-limit-exceeded", "account")]
        with self._cond:
            self._rejected.extend(dropped)
            key = self._feeds.get(feed, (feed,))[0]
            for b in batches:
                entry = {"feed": feed, "batch": b, "request_id": rec["request_id"]}
                srid = b.get("source_request_id")
                first = self._seen.get((key, srid)) if srid is not None else None
                if first is not None:
                    self._repeats.append(dict(entry, same=b == first))
                    continue
                if srid is not None:
                    self._seen[(key, srid)] = b
                kept = self._keep_named(feed, b["events"])
                if len(kept) != len(b["events"]):
                    entry["batch"] = dict(b, events=kept)
                self._batches.append(entry)
                self._event_count += len(kept)
            self._cond.notify_all()
        extra = []
        pct = self.rate_limit_percentage
        if pct is not None:
            extra.append(("X-mp-rate-limit-percentage-used", str(int(pct))))
        return 202, b"", extra

    def _keep_named(self, feed, events):
        """The events mParticle keeps: those whose data.event_name is known, or new within
        event_names_limit (which it then knows). Under the lock."""
        kept = []
        for e in events:
            name = e.get("data", {}).get("event_name")
            if isinstance(name, str) and name not in self._event_names:
                if len(self._event_names) >= self.event_names_limit:
                    self._name_dropped.append({"feed": feed, "name": name,
                                               "source_message_id":
                                                   e["data"].get("source_message_id")})
                    continue
                self._event_names.add(name)
            kept.append(e)
        return kept

    def _over_rate(self, n):
        """True when n more batches would take the last second over rate_limit; else
        counts them."""
        limit = self.rate_limit
        if limit is None:
            return False
        now = time.monotonic()
        with self._lock:
            self._accepted_at = [(t, k) for t, k in self._accepted_at if now - t < self.rate_window_s]
            if sum(k for _, k in self._accepted_at) + n > limit:
                return True
            self._accepted_at.append((now, n))
            return False

    def _delay(self, seconds):
        if seconds > 0:
            self._stopping.wait(seconds)

    def _hold(self, fault):
        """Waits until the fault's hold event is set (if it has one), the double stops, or
        HOLD_MAX_S passed."""
        hold = fault.params.get("hold") if fault is not None else None
        deadline = time.monotonic() + HOLD_MAX_S
        while hold is not None and not hold.wait(0.02):
            if self._stopping.is_set() or time.monotonic() >= deadline:
                return

    def _finish(self, rec, status=None, dropped=False):
        with self._cond:
            rec["status"] = status
            rec["dropped"] = dropped
            rec["answered"] = time.monotonic()
            self._done_requests += 1
            self._cond.notify_all()

    def _drop(self, h, rec):
        h.close_connection = True
        self._finish(rec, dropped=True)
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _answer(self, h, rec, status, body, extra=(), close=False):
        if status >= 400 and not rec["error"]:
            try:
                rec["error"] = json.loads(body)["errors"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                pass
        self._finish(rec, status)  # recorded before the client can see the answer
        h.send_response(status)
        for k, v in extra:
            h.send_header(k, v)
        if body:
            h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        if close or self._stopping.is_set():
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if body and h.command != "HEAD":
            h.wfile.write(body)
        h.wfile.flush()
