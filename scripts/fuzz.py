"""Seeded, bounded fuzzing of mitmcache through real mitmdump proxies on a real Valkey ring.

    .venv/bin/python scripts/fuzz.py --seed 1 --exchanges 5000 [--proxies 2] [--time-limit 600]

It starts its own origin (a threaded HTTP server on 127.0.0.1, ephemeral port) whose answers are
chosen by a seeded generator from what each request names, a 3-node Valkey ring and N mitmdump
proxies with the addon in reverse mode in front of that origin. It then sends a seeded sequence
of requests through the proxies over raw sockets (odd bytes go out as they are), reads every
response whole with a per-request timeout, and checks:

  (a) addon-error      "Addon error" / "Traceback" in mitmdump's output
  (b) proxy-5xx        5xx responses the origin did not send (a 504 for only-if-cached is
                       legitimate and counted apart as only-if-cached-504; with
                       --origin-timeout-ms, so is the cache's 504 detail=origin-timeout for a
                       URL the origin was slower than that on, as origin-timeout-504)
  (c) wrong-answer     a response whose body (or, without a body, whose X-Fuzz-Answer header)
                       names an origin answer made for another target / authority / method /
                       Vary'd variant than this request should get, or a body that is not
                       byte for byte one the origin sent
  (d) timeout          no complete response within --request-timeout
  (e) cookie-leak      a Set-Cookie received by a client whose request did not trigger the
                       origin response carrying it
  (f) shared-private   an answer marked private / no-store / Vary: * made for another request
  (g) 5xx-over-stored  a 5xx the origin gave to a request that went past a stored response
                       (a revalidation: validators the client did not send; or its own
                       Cache-Status says fwd=stale / fwd=request, e.g. a Range or no-cache
                       request) served to another request: it replaced or stood in for the
                       stored response (README: a 5xx never replaces a stored entry); not
                       counted when the response it replaced was itself a 5xx
  no-response          the connection closed without a response (informational, like (d))
  origin-crash         a 5xx after the fuzz origin itself failed (a harness bug, reported apart)

Exit status 1 when any of (a), (b), (c), (e), (f), (g) is non-zero. Given a seed, the request
sequence and the origin's behaviour are deterministic; only timing (ports, interleaving, what is
fresh when) varies between runs.

Every response the origin sends names the request it answers (first body line ``answer #<serial>
to <method> <target> <request id>``, a JSON line with what it saw, then padding to the chosen
size; and an ``X-Fuzz-Answer: <serial>`` field), and the origin records each answer (request as
received, status, fields, body hash) by serial. Every client request carries a unique
``X-Fuzz-Id``. Set-Cookie values are ``fz=<serial>.<request id>``.

Other options: --workers (concurrent client connections, 8), --rate (exchanges started per
second, 100; bursts of requests for one URL start together), --request-timeout (10 s),
--nodes (Valkey nodes, 0 = L1 only), --origin-timeout-ms (the proxies' cache_origin_timeout_ms:
below the origin's slowest answers, 300 ms, it drives the cache's deadline on forwarded requests), --addon (another checkout's entry file, e.g. to check
that an older commit's faults are found), --dump FILE (every exchange as a JSON line),
--json FILE (the result), --only ID,ID (send only those exchanges of the same plan, one at a
time, on fresh proxies: to reproduce a finding), --print-requests N (show the plan).

A cache may legitimately serve an answer made for an earlier request of the same URL, so (c)
compares what the answer was made for — the request as the origin saw it: method (HEAD counts as
GET), authority, target with percent-encoding normalised (RFC 3986 §6.2.2), and the values of
the fields its Vary names (normalised like the cache does) — with what this request should get.
What a request "should get" is what the origin saw for it when it reached the origin; otherwise
what the origin saw for another request spelled the same way; otherwise mitmproxy's reverse-mode
rewriting (origin-form: the Host becomes the origin's; absolute-form: the authority is kept).
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mitmcache.valkey_nodes import ValkeyNode, start_nodes  # noqa: E402
from tests.conftest import ENTRY, Proxy, start_proxy, stop_process  # noqa: E402

RID_HEADER = "X-Fuzz-Id"
ANSWER_HEADER = "X-Fuzz-Answer"
MAX_EXAMPLES = 10
KINDS = (
    "addon-error", "proxy-5xx", "only-if-cached-504", "wrong-answer", "timeout", "cookie-leak",
    "shared-private", "5xx-over-stored", "no-response", "origin-crash", "origin-timeout-504",
)
FAILING = ("addon-error", "proxy-5xx", "wrong-answer", "cookie-leak", "shared-private", "5xx-over-stored")
PROXY_TOKEN = b"{PROXY}"
ORIGIN_TOKEN = b"{ORIGIN}"


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by the parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode("utf-8", "surrogateescape")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def latin1(b: bytes) -> str:
    return b.decode("latin-1")


# --------------------------------------------------------------------------- normalisation

_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ABSOLUTE = re.compile(rb"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)$", re.S)


def norm_pct(target: bytes) -> bytes:
    """RFC 3986 §6.2.2.1/2: %xx in upper case, unreserved characters decoded; raw bytes stay."""
    def sub(m: re.Match[bytes]) -> bytes:
        byte = int(m.group(1), 16)
        return bytes([byte]) if byte in _UNRESERVED else b"%%%02X" % byte
    return _PCT.sub(sub, target)


def norm_authority(auth: bytes) -> str:
    a = latin1(auth).strip().lower()
    if "@" in a:
        a = a.rsplit("@", 1)[1]
    for default in (":80", ":443"):
        if a.endswith(default) and not a.endswith("]" + default[1:]):
            a = a[: -len(default)]
    return a


def method_class(method: str) -> str:
    return "GET" if method in ("GET", "HEAD") else method


View = tuple[str, str, bytes]  # (method class, authority, normalised path+query)


def origin_view(method: str, target: bytes, host: bytes | None) -> View:
    """What a request names, as the origin sees it (RFC 9112 §3.2: absolute-form wins over Host)."""
    m = _ABSOLUTE.match(target)
    if m:
        path = m.group(3) or b"/"
        return method_class(method), norm_authority(m.group(2)), norm_pct(path)
    return method_class(method), norm_authority(host or b""), norm_pct(target)


def split_list(values: list[str]) -> list[str]:
    """RFC 9110 §5.6.1 lists. The oracle's own copy on purpose: reusing the cache's would hide
    a bug in it."""
    out: list[str] = []
    for value in values:
        buf: list[str] = []
        quoted = escaped = False
        for ch in value:
            if escaped:
                escaped = False
            elif ch == "\\" and quoted:
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == "," and not quoted:
                item = "".join(buf).strip()
                if item:
                    out.append(item)
                buf = []
                continue
            buf.append(ch)
        item = "".join(buf).strip()
        if item:
            out.append(item)
    return out


def norm_vary_value(name: str, values: list[str]) -> str | None:
    """Vary'd request values compared as RFC 9111 §4.1 allows (and as the cache documents):
    lines combined, whitespace collapsed, Accept* case-insensitive; absent ≠ empty."""
    if not values:
        return None
    members = [re.sub(r"\s*;\s*", ";", re.sub(r"[ \t]+", " ", m)) for m in split_list(values)]
    joined = ",".join(members)
    return joined.lower() if name.startswith("accept") else joined


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def vary_names(headers: list[tuple[str, str]]) -> list[str] | None:
    names = []
    for item in split_list(header_values(headers, "vary")):
        if item == "*":
            return None
        names.append(item.lower())
    return sorted(set(names))


# --------------------------------------------------------------------------- the origin

@dataclass
class Profile:
    """How the origin answers one URL (by its normalised path): chosen by the seed."""
    status: int
    cc: list[str]
    date: str          # now | past | bad | none
    expires: str       # none | future | past | bad
    lm: str            # none | old | bad
    age: str | None
    etag: str          # none | strong | weak | bytes
    vary: list[str]    # Vary lines
    cookie_p: float
    weird: bool
    size: int
    delay_p: float
    flap_p: float      # 5xx with freshness, mostly on revalidations
    honour_conditionals: bool
    range_206: bool
    location: bytes | None


HUGE = "9" * 5000

# Most URLs get a plain freshness lifetime (short ones expire during a run and get revalidated)…
CC_BASE = ["max-age=1", "max-age=2", "max-age=3", "max-age=60", "s-maxage=2", "s-maxage=300", "max-age=0", None]
CC_BASE_WEIGHTS = [8, 8, 6, 6, 3, 2, 2, 5]  # None: no Cache-Control (heuristic or Expires)
# … and some get odd or restrictive directives on top.
CC_ODD = [
    "max-age=99999999999999999999", "max-age=-5", "max-age=abc", f"max-age={HUGE}", f"s-maxage={'1' * 5000}",
    "max-age=4300" + "0" * 4300, "max-age=5, max-age=600", "max-age=\"30\"", "no-store", "private", "no-cache",
    'no-cache="Set-Cookie"', "must-revalidate", "proxy-revalidate", "stale-while-revalidate=30",
    f"stale-while-revalidate={HUGE}", "stale-while-revalidate=abc", "stale-if-error=60", f"stale-if-error={HUGE}",
    "public", "immutable", "max-age", "max-age=", ",,", "max-age=1\xe9",
]
CC_ODD_WEIGHTS = [
    1, 1, 1, 1, 1,
    1, 1, 1, 2, 2, 3,
    1, 2, 1, 5,
    1, 1, 4, 1,
    3, 1, 1, 1, 1, 1,
]
STATUSES = [200, 203, 204, 206, 301, 304, 404, 410, 500, 503]
STATUS_WEIGHTS = [70, 4, 3, 1, 3, 1, 6, 2, 2, 2]
SIZES = [0, 1, 64, 200, 1000, 4000, 20000, 100_000, 300_000]
SIZE_WEIGHTS = [3, 10, 20, 20, 15, 10, 6, 2, 1]
AGES = [None, None, None, None, "5", "7200, 0", "99999999999999999999", "abc", "-3", HUGE, "0"]
VARYS: list[list[str]] = [
    [], [], [], [], [], [], ["Accept"], ["accept"], ["*"], ["Accept, Accept-Language"], ["Accept", "Accept-Encoding"],
    ["Accept-Encoding"], ["Accept-Language, *"],
]


def profile_for(seed: int, key: bytes) -> Profile:
    r = rng_for(seed, "profile", key)
    base = r.choices(CC_BASE, CC_BASE_WEIGHTS)[0]
    odd = r.choices(CC_ODD, CC_ODD_WEIGHTS, k=r.choice([0, 0, 1, 1, 2, 3]))
    cc = ([base] if base else []) + odd
    r.shuffle(cc)
    return Profile(
        status=r.choices(STATUSES, STATUS_WEIGHTS)[0],
        cc=cc,
        date=r.choices(["now", "past", "bad", "none"], [10, 2, 1, 1])[0],
        expires=r.choices(["none", "future", "past", "bad"], [8, 2, 1, 1])[0],
        lm=r.choices(["none", "old", "bad"], [4, 5, 1])[0],
        age=r.choice(AGES),
        etag=r.choices(["none", "strong", "weak", "bytes"], [3, 5, 2, 1])[0],
        vary=r.choice(VARYS),
        cookie_p=r.choice([0.0] * 8 + [0.3, 1.0]),
        weird=r.random() < 0.2,
        size=r.choices(SIZES, SIZE_WEIGHTS)[0],
        delay_p=r.choice([0.0, 0.0, 0.0, 0.1, 0.5]),
        flap_p=r.choice([0.0, 0.0, 0.0, 0.3, 0.7]),
        honour_conditionals=r.random() < 0.8,
        range_206=r.random() < 0.5,
        location=r.choice([None, b"/p/0/item", b"http://{ORIGIN}/p/1/item", b"http://other.example/p/2/item", b"/p/3/caf%C3%A9"]),
    )


def variant_tag(names: list[str] | None, headers: list[tuple[str, str]]) -> str:
    if not names:
        return "0"
    values = [(n, norm_vary_value(n, header_values(headers, n))) for n in names]
    return hashlib.sha1(repr(values).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def etag_for(p: Profile, key: bytes, variant: str) -> str | None:
    base = hashlib.sha1(key).hexdigest()[:8] + "-" + variant
    return {
        "none": None, "strong": f'"{base}"', "weak": f'W/"{base}"', "bytes": f'"\xe9t\xe4g\xff-{base}"',
    }[p.etag]


def opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


@dataclass
class Record:
    """One answer the origin sent."""
    serial: int
    rid: str
    method: str
    target: bytes
    host: bytes | None
    headers: list[tuple[str, str]]  # request fields as the origin received them (Latin-1)
    status: int
    response_headers: list[tuple[str, str]]
    body_sha: str
    body_len: int  # bytes sent (0 for HEAD)
    full_len: int  # the body a GET would have got
    head: bytes  # status line + fields as sent
    body_start: bytes
    time: float
    delay: float = 0.0  # seconds the origin waited before answering

    @property
    def view(self) -> View:
        return origin_view(self.method, self.target, self.host)


class FuzzOrigin:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.lock = threading.Lock()
        self.records: dict[int, Record] = {}
        self.by_rid: dict[str, list[int]] = defaultdict(list)
        self.crashes: dict[str, str] = {}  # request id → the origin's own exception (a harness bug)
        self.serial = 0
        self.t0 = time.time()
        handler = type("Handler", (_OriginHandler,), {"origin": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fuzz-origin")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def next_serial(self) -> int:
        with self.lock:
            self.serial += 1
            return self.serial

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, target: bytes, headers: list[tuple[str, str]], rid: str,
               serial: int) -> tuple[int, list[tuple[str, str]], bytes, float]:
        """Status, fields (Latin-1 strings), body, delay: a pure function of the seed and the request."""
        view = origin_view(method, target, (header_values(headers, "host") or [""])[0].encode("latin-1"))
        m = _ABSOLUTE.match(target)
        key = norm_pct((m.group(3) or b"/") if m else target)
        p = profile_for(self.seed, key)
        inm = header_values(headers, "if-none-match")
        ims = header_values(headers, "if-modified-since")
        r = rng_for(self.seed, "answer", rid, method, target, tuple(inm), tuple(ims),
                    tuple(header_values(headers, "range")))
        now = time.time()
        names = vary_names([("Vary", v) for v in p.vary])
        variant = variant_tag(names, headers)
        etag = etag_for(p, key, variant)
        lm_ts = self.t0 - 86400 * (1 + int(hashlib.sha1(key).hexdigest()[:4], 16) % 30)
        fields: list[tuple[str, str]] = []
        if p.date == "now":
            fields.append(("Date", email.utils.formatdate(now, usegmt=True)))
        elif p.date == "past":
            fields.append(("Date", email.utils.formatdate(now - 3600, usegmt=True)))
        elif p.date == "bad":
            fields.append(("Date", r.choice(["yesterday", "Mon, 32 Foo 2020 25:61:61 GMT", "0", "\xe9\xff"])))
        for line in _cc_lines(p.cc, r):
            fields.append(("Cache-Control", line))
        if p.expires == "future":
            fields.append(("Expires", email.utils.formatdate(now + 30, usegmt=True)))
        elif p.expires == "past":
            fields.append(("Expires", email.utils.formatdate(now - 30, usegmt=True)))
        elif p.expires == "bad":
            fields.append(("Expires", r.choice(["0", "-1", "never", "Thu, 01 Jan 2099 00:00:00 +0000", HUGE])))
        if p.lm == "old":
            fields.append(("Last-Modified", email.utils.formatdate(lm_ts, usegmt=True)))
        elif p.lm == "bad":
            fields.append(("Last-Modified", r.choice(["long ago", "Sun, 06 Nov 1994 08:49:37", "\xff"])))
        if p.age is not None:
            fields.append(("Age", p.age))
        if etag is not None:
            fields.append(("ETag", etag))
        for v in p.vary:
            fields.append(("Vary", v))
        if p.weird:
            fields.append(("X-Fuzz-Bytes", "caf\xe9 \x80\xff " + r.choice(["", "\xe9" * 50])))
        fields.append((ANSWER_HEADER, str(serial)))

        status = p.status
        safe = method in ("GET", "HEAD")
        conditional_hit = False
        if safe and p.honour_conditionals and (inm or ims):
            if inm and etag is not None:
                tags = split_list(inm)
                conditional_hit = "*" in tags or opaque(etag) in {opaque(t) for t in tags}
            elif ims and p.lm == "old":
                when = email.utils.parsedate_to_datetime(ims[0]) if _is_date(ims[0]) else None
                conditional_hit = when is not None and when.timestamp() >= lm_ts
        if not safe:
            # Not the URL's representation: none of its validators either (an honest origin).
            status = r.choice([200, 200, 204, 404, 500])
            fields = [f for f in fields if f[0] not in ("ETag", "Last-Modified")]
            if r.random() < 0.5:
                fields.append(("Location", r.choice(["/p/0/item", "/p/1/item", f"http://{self.authority}/p/2/item"])))
            if r.random() < 0.3:
                fields.append(("Content-Location", r.choice(["/p/3/caf%c3%a9", "/p/4/item?a=1"])))
        elif r.random() < p.flap_p * (1.0 if (inm or ims or header_values(headers, "range")
                                               or header_values(headers, "cache-control")) else 0.15):
            # A failing origin, its error fresh for 10 minutes. Without the URL's validators: an
            # honest origin never validates (304) a stored error as the current representation.
            status = r.choice([500, 503])
            fields = [f for f in fields if f[0] not in ("Cache-Control", "ETag", "Last-Modified")]
            fields.append(("Cache-Control", "max-age=600"))
        elif conditional_hit and status in (200, 203):
            status = 304
        elif header_values(headers, "range") and p.range_206 and status == 200:
            status = 206
        if status == 301 and p.location:
            fields.append(("Location", latin1(p.location.replace(ORIGIN_TOKEN, self.authority.encode()))))
        if r.random() < p.cookie_p:
            fields.append(("Set-Cookie", f"fz={serial}.{rid}; Path=/"))

        if status in (204, 304):
            body = b""
        else:
            body = self.body_for(method, target, view, headers, names, serial, rid, p.size)
            if status == 206:
                fields.append(("Content-Range", f"bytes 0-{max(len(body) - 1, 0)}/{len(body) + 10}"))
        delay = r.uniform(0.02, 0.3) if r.random() < p.delay_p else 0.0
        return status, fields, body, delay

    @staticmethod
    def body_for(method: str, target: bytes, view: View, headers: list[tuple[str, str]],
                 names: list[str] | None, serial: int, rid: str, size: int) -> bytes:
        if size == 0:
            return b""
        variant = {n: header_values(headers, n) for n in (names or [])}
        line = b"answer #%d to %s %s %s\n" % (serial, method.encode("latin-1"), target, rid.encode("latin-1"))
        detail = json.dumps({"serial": serial, "rid": rid, "method": method, "authority": view[1],
                             "target": latin1(view[2]), "vary": variant}).encode() + b"\n"
        body = line + detail
        return body + b"." * max(0, size - len(body))


def _cc_lines(cc: list[str], r: random.Random) -> list[str]:
    if not cc:
        return []
    if len(cc) > 1 and r.random() < 0.3:
        return [", ".join(cc[: len(cc) // 2]), ", ".join(cc[len(cc) // 2:])]
    return [", ".join(cc)]


def _is_date(value: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    origin: FuzzOrigin
    timeout = 300  # an idle keep-alive connection is dropped after 5 min: nothing waits forever

    def log_message(self, format: str, *args: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method token, also lower-case and unknown ones
            return self._handle
        raise AttributeError(name)

    def _read_body(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            for _ in range(100_000):
                size = int(self.rfile.readline(1000).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(1000):  # trailer fields, then the empty line
                        if self.rfile.readline(65537) in (b"\r\n", b"\n", b""):
                            break
                    return
                self.rfile.read(size + 2)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= 50_000_000:
            self.rfile.read(length)

    def _handle(self) -> None:
        try:
            self._answer()
        except Exception as e:  # a harness fault: recorded so a proxy's 502 is not blamed on the cache
            rid = (header_values(list(self.headers.items()), RID_HEADER) or ["-"])[0]
            with self.origin.lock:
                self.origin.crashes[rid] = f"{type(e).__name__}: {e}"
            raise

    def _answer(self) -> None:
        self._read_body()
        origin = self.origin
        parts = self.raw_requestline.rstrip(b"\r\n").split(b" ")
        target = parts[1] if len(parts) > 1 else b""
        headers = list(self.headers.items())  # Latin-1 decoded by http.client: bytes preserved
        host = header_values(headers, "host")
        rid = (header_values(headers, RID_HEADER) or ["-"])[0]
        serial = origin.next_serial()
        status, fields, body, delay = origin.answer(self.command, target, headers, rid, serial)
        if delay:
            time.sleep(delay)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Whatever"))]
        for k, v in fields:
            head.append(k.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n")
        if status not in (204, 304):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        sent = body if self.command != "HEAD" and status not in (204, 304) else b""
        raw_head = b"".join(head)
        with origin.lock:
            origin.records[serial] = Record(
                serial, rid, self.command, target, host[0].encode("latin-1") if host else None, headers, status,
                fields, hashlib.sha256(sent).hexdigest(), len(sent), len(body), raw_head, sent[:300], time.time(),
                delay,
            )
            origin.by_rid[rid].append(serial)
        self.wfile.write(raw_head + sent)
        self.wfile.flush()


_REASONS = {200: b"OK", 203: b"Non-Authoritative Information", 204: b"No Content", 206: b"Partial Content",
            301: b"Moved Permanently", 304: b"Not Modified", 404: b"Not Found", 410: b"Gone",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


# --------------------------------------------------------------------------- requests

@dataclass
class Exchange:
    index: int
    rid: str
    proxy: int
    method: str
    target: bytes  # may hold {PROXY} / {ORIGIN}
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    only_if_cached: bool = False
    slot: int = 0  # started not before slot / rate seconds (a burst shares its first request's slot)
    # filled in when sent
    raw: bytes = b""
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes = b""
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0

    def sent_headers(self) -> list[tuple[str, str]]:
        return [(latin1(k), latin1(v)) for k, v in self.headers]

    def render(self, proxy_auth: bytes, origin_auth: bytes) -> bytes:
        def sub(b: bytes) -> bytes:
            return b.replace(PROXY_TOKEN, proxy_auth).replace(ORIGIN_TOKEN, origin_auth)
        lines = [self.method.encode("latin-1") + b" " + sub(self.target) + b" HTTP/1.1\r\n"]
        for k, v in self.headers:
            lines.append(k + b": " + sub(v) + b"\r\n")
        if self.body:
            lines.append(b"Content-Length: %d\r\n" % len(self.body))
        lines.append(b"\r\n")
        return b"".join(lines) + self.body


METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "get", "FUZZ", "Get", "PURGE", "OPTIONS"]
METHOD_WEIGHTS = [62, 10, 4, 3, 3, 5, 2, 2, 2, 1]
AUTHORITIES = [b"{ORIGIN}", b"{PROXY}", b"other.example", b"OTHER.Example:80", b"127.0.0.1:1"]
HOSTS = [b"{PROXY}", b"{PROXY}", b"{PROXY}", b"other.example", b"OTHER.Example:80", b"127.0.0.1", b"\xe9x.example",
         b"{ORIGIN}"]
ACCEPTS = [None, None, b"text/html", b"TEXT/HTML", b" text/html ", b"application/json", b"text/html, application/json",
           b"text/html,application/json", b"*/*", b"text/plain;q=0.5", b"t\xe9xt/html"]
LANGS = [None, None, b"en", b"EN", b"fr", b"en, fr"]
ENCODINGS = [None, None, b"gzip", b"identity", b"GZIP"]
RANGES = [b"bytes=0-99", b"bytes=-50", b"bytes=10-", b"bytes=\xc2\xb2-", b"bytes=" + HUGE.encode() + b"-",
          b"bytes=0-" + HUGE.encode(), b"bytes=-" + HUGE.encode(), b"bytes=0-0,5-9", b"bytes=0-1,1-2,-1",
          b"bytes=abc", b"items=0-1", b"bytes=5-1", b"bytes=\xd9\xa1-", b"bytes= 0-9"]
REQUEST_CC = [b"max-age=0", b"max-age=" + HUGE.encode(), b"max-stale", b"max-stale=" + HUGE.encode(),
              b"min-fresh=" + HUGE.encode(), b"min-fresh=5", b"only-if-cached", b"no-cache", b"no-store",
              b"max-age=abc", b"max-age=10, max-age=0", b"max-stale=30, only-if-cached", b"max-age=4300" + b"0" * 4300]
DATES = [b"Sat, 01 Jan 2000 00:00:00 GMT", b"Fri, 01 Jan 2100 00:00:00 GMT", b"garbage", b"Sunday, 06-Nov-94 08:49:37 GMT",
         b"Sun Nov  6 08:49:37 1994", b"\xe9"]


def url_paths(seed: int, count: int) -> list[list[bytes]]:
    """For each URL, its spellings (all normalising to the same target)."""
    out = []
    for k in range(count):
        r = rng_for(seed, "url", k)
        kind = r.choices(["plain", "pct", "raw", "query", "long", "tilde"], [8, 3, 2, 3, 1, 1])[0]
        if kind == "plain":
            spellings = [b"/p/%d/item" % k]
        elif kind == "pct":
            spellings = [b"/p/%d/caf%%c3%%a9" % k, b"/p/%d/caf%%C3%%A9" % k, b"/p/%d/caf%%c3%%A9" % k]
        elif kind == "raw":
            spellings = [b"/p/%d/caf\xe9" % k, b"/p/%d/\x80\xff\xe9" % k]
        elif kind == "query":
            spellings = [b"/p/%d/q?a=1&b=%%7e" % k, b"/p/%d/q?a=1&b=~" % k, b"/p/%d/q?a=1&b=%%7E" % k]
        elif kind == "long":
            n = r.choice([1000, 3000, 6000])
            spellings = [b"/p/%d/" % k + b"L" * n, b"/p/%d/" % k + b"L" * (n - 1) + b"%4C", b"/p/%d/" % k + b"L" * (n - 1) + b"%4c"]
        else:
            spellings = [b"/p/%d/%%7Euser" % k, b"/p/%d/~user" % k, b"/p/%d/%%7euser" % k]
        out.append(spellings)
    return out


def make_exchanges(seed: int, count: int, proxies: int) -> list[Exchange]:
    r = rng_for(seed, "requests")
    urls = url_paths(seed, max(10, count // 12))
    hot = urls[: max(5, len(urls) // 5)]  # a fifth of the URLs get most requests
    out = []
    burst_left, burst_urls, slot = 0, urls[0], 0
    for i in range(count):
        rid = f"s{seed}-{i}"
        if burst_left:  # a burst: several requests for one URL, started together (coalescing, leases)
            burst_left -= 1
            spellings = burst_urls
            method = r.choices(["GET", "HEAD", "get", "POST"], [85, 10, 3, 2])[0]
        else:
            slot = i
            if r.random() < 0.06:
                burst_left = r.randint(3, 9)
            method = r.choices(METHODS, METHOD_WEIGHTS)[0]
            spellings = burst_urls = r.choice(hot) if r.random() < 0.6 else r.choice(urls)
        path = r.choice(spellings)
        if r.random() < 0.15:
            scheme = r.choice([b"http", b"http", b"HTTP", b"https"])
            target = scheme + b"://" + r.choice(AUTHORITIES) + path
        else:
            target = path
        headers: list[tuple[bytes, bytes]] = []
        if r.random() < 0.95:
            headers.append((b"Host", r.choice(HOSTS)))
        headers.append((RID_HEADER.encode(), rid.encode()))
        for name, pool, p in ((b"Accept", ACCEPTS, 0.6), (b"Accept-Language", LANGS, 0.3),
                              (b"Accept-Encoding", ENCODINGS, 0.3)):
            if r.random() < p:
                v = r.choice(pool)
                if v is not None:
                    headers.append((name, v))
        if r.random() < 0.15:
            headers.append((b"Range", r.choice(RANGES)))
            if r.random() < 0.3:
                headers.append((b"If-Range", r.choice([b'"x"', b'W/"x"', DATES[0], b"\xe9"])))
        if r.random() < 0.12:
            headers.append((b"If-None-Match", r.choice([b"*", b'"nope"', b'W/"nope"', b"garbage", b'"\xe9"',
                                                        b'"a", "b", W/"c"', guess_etag(seed, path, r)])))
        if r.random() < 0.08:
            headers.append((b"If-Modified-Since", r.choice(DATES)))
        only_if_cached = False
        if r.random() < 0.15:
            cc = r.choice(REQUEST_CC)
            headers.append((b"Cache-Control", cc))
            only_if_cached = b"only-if-cached" in cc
        if r.random() < 0.03:
            headers.append((b"Pragma", b"no-cache"))
        if r.random() < 0.05:
            headers.append((b"Cookie", b"session=" + rid.encode()))
        if r.random() < 0.1:
            headers.append((b"X-Fuzz-Junk", bytes(r.randrange(0x80, 0x100) for _ in range(r.randint(1, 20)))))
        if r.random() < 0.05:
            headers.append((b"Connection", b"close"))
        body = b"data for " + rid.encode() if method in ("POST", "PUT") else b""
        out.append(Exchange(i, rid, r.randrange(proxies), method, target, headers, body, only_if_cached, slot))
    return out


def guess_etag(seed: int, path: bytes, r: random.Random) -> bytes:
    """An If-None-Match the origin may well match (its ETag for the variant without Vary'd fields)."""
    key = norm_pct(path)
    tag = etag_for(profile_for(seed, key), key, "0") or '"none"'
    return tag.encode("latin-1")


# --------------------------------------------------------------------------- the client

class Conn:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=min(timeout, 5.0))
        self.buf = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request timed out")
        self.sock.settimeout(min(left, 5.0))
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise TimeoutError("request timed out") from None
            return True
        if not data:
            return False
        self.buf += data
        return True

    def read_line(self, deadline: float, limit: int = 1 << 20) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > limit:
                raise ValueError("line too long")
            if not self._fill(deadline):
                raise ConnectionError("closed mid-line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise ConnectionError(f"closed after {len(self.buf)} of {n} body bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_to_close(self, deadline: float, limit: int = 50_000_000) -> bytes:
        while self._fill(deadline):
            if len(self.buf) > limit:
                raise ValueError("body too long")
        data, self.buf = self.buf, b""
        return data


def read_response(conn: Conn, method: str, deadline: float) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    """(status, fields, body, must_close): framing by RFC 9112 §6.3."""
    for _ in range(10):  # skip interim 1xx
        try:
            status_line = conn.read_line(deadline)
        except ConnectionError:
            if not conn.buf:
                raise ConnectionError("closed before a response") from None
            raise
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError(f"bad status line {status_line[:100]!r}")
        status = int(parts[1])
        fields: list[tuple[str, str]] = []
        for _ in range(10_000):
            line = conn.read_line(deadline)
            if not line:
                break
            name, _, value = line.partition(b":")
            fields.append((latin1(name.strip()), latin1(value.strip())))
        if 100 <= status < 200:
            continue
        close = any(v.lower() == "close" for v in header_values(fields, "connection")) or parts[0] == b"HTTP/1.0"
        if method == "HEAD" or status in (204, 304):
            return status, fields, b"", close
        te = ",".join(header_values(fields, "transfer-encoding")).lower()
        if "chunked" in te:
            chunks = []
            for _ in range(1_000_000):
                size = int(conn.read_line(deadline).split(b";")[0].strip(), 16)
                if size == 0:
                    while conn.read_line(deadline):
                        pass
                    break
                chunks.append(conn.read_exact(size, deadline))
                conn.read_exact(2, deadline)
            return status, fields, b"".join(chunks), close
        lengths = set(header_values(fields, "content-length"))
        if lengths:
            if len(lengths) != 1:
                raise ValueError(f"several Content-Length values {sorted(lengths)}")
            return status, fields, conn.read_exact(int(lengths.pop()), deadline), close
        return status, fields, conn.read_to_close(deadline), True
    raise ValueError("too many interim responses")


def run_exchanges(exchanges: list[Exchange], proxies: list[Proxy], origin: FuzzOrigin, workers: int,
                  request_timeout: float, deadline: float, rate: float = 0.0) -> int:
    """Send every exchange (in order, ``workers`` at a time, exchange i not before i/rate seconds
    when rate > 0, so entries with short lifetimes go stale during the run); returns how many
    were sent."""
    lock = threading.Lock()
    next_index = [0]
    origin_auth = origin.authority.encode()
    t0 = time.monotonic()

    def worker() -> None:
        conns: dict[int, Conn] = {}
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= len(exchanges) or time.monotonic() >= deadline:
                        return
                    next_index[0] += 1
                if rate > 0:
                    time.sleep(max(0.0, min(t0 + exchanges[i].slot / rate, deadline) - time.monotonic()))
                ex = exchanges[i]
                proxy = proxies[ex.proxy]
                ex.raw = ex.render(f"127.0.0.1:{proxy.port}".encode(), origin_auth)
                ex.started = time.time()
                req_deadline = time.monotonic() + request_timeout
                close = False
                for _attempt in range(2):  # a reused keep-alive connection may have been closed
                    conn = conns.get(ex.proxy)
                    reused = conn is not None
                    try:
                        if conn is None:
                            conn = conns[ex.proxy] = Conn(proxy.port, request_timeout)
                        conn.sock.settimeout(5.0)
                        conn.sock.sendall(ex.raw)
                        ex.status, ex.response_headers, ex.response_body, close = read_response(
                            conn, ex.method, req_deadline)
                        ex.error = None
                        break
                    except TimeoutError as e:
                        ex.error, close = f"timeout: {e}", True
                        break
                    except (OSError, ValueError) as e:
                        ex.error, close = f"{type(e).__name__}: {e}", True
                        if conn is not None:
                            conn.close()
                        conns.pop(ex.proxy, None)
                        if not (reused and isinstance(e, ConnectionError) and "before a response" in str(e)):
                            break
                        if ex.method not in ("GET", "HEAD"):
                            break  # never resend a non-idempotent request
                ex.ended = time.time()
                if close or b"Connection: close" in ex.raw:
                    c = conns.pop(ex.proxy, None)
                    if c is not None:
                        c.close()
        finally:
            for c in conns.values():
                c.close()

    threads = [threading.Thread(target=worker, daemon=True, name=f"fuzz-client-{n}") for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + request_timeout + 10))
    return min(next_index[0], len(exchanges))


# --------------------------------------------------------------------------- checks

@dataclass
class Result:
    seed: int
    exchanges: int
    sent: int = 0
    seconds: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    cache_status: Counter[str] = field(default_factory=Counter)
    origin_requests: int = 0
    other_output: list[str] = field(default_factory=list)

    subkinds: Counter[tuple[str, str]] = field(default_factory=Counter)
    _by_sub: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, example: str, sub: str = "") -> None:
        self.counts[kind] += 1
        self.subkinds[(kind, sub)] += 1
        if len(self._by_sub[(kind, sub)]) < MAX_EXAMPLES:
            self._by_sub[(kind, sub)].append(example)
        # up to MAX_EXAMPLES per kind, taken round-robin over its sub-kinds (so every sub-kind shows)
        subs = [v for (k, _), v in sorted(self._by_sub.items()) if k == kind]
        picked: list[str] = []
        for n in range(MAX_EXAMPLES):
            picked += [v[n] for v in subs if n < len(v)]
        self.examples[kind] = picked[:MAX_EXAMPLES]

    @property
    def failed(self) -> bool:
        return any(self.counts[k] for k in FAILING)

    def summary(self) -> str:
        out = [f"mitmcache fuzz: seed {self.seed}, {self.sent}/{self.exchanges} exchanges sent in "
               f"{self.seconds:.1f} s, {self.origin_requests} origin requests"]
        out.append("statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())))
        out.append("X-Cache-Status: " + ", ".join(f"{k}={v}" for k, v in sorted(self.cache_status.items())))
        for kind in KINDS:
            tag = " (failure)" if kind in FAILING and self.counts[kind] else ""
            out.append(f"  {kind:<20} {self.counts[kind]}{tag}")
            for (k, sub), n in sorted(self.subkinds.items()):
                if k == kind and sub:
                    out.append(f"    {sub:<26} {n}")
        for kind in KINDS:
            if self.examples.get(kind):
                out.append(f"\n== {kind}: {self.counts[kind]} (up to {MAX_EXAMPLES} examples)")
                for e in self.examples[kind]:
                    out.append("- " + e)
        if self.other_output:
            out.append(f"\n== other mitmdump output: {len(self.other_output)} lines (first 10)")
            out += ["  " + line[:300] for line in self.other_output[:10]]
        out.append("\nRESULT: " + ("FAIL" if self.failed else "ok"))
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "exchanges": self.exchanges, "sent": self.sent, "seconds": self.seconds,
                "counts": {k: self.counts[k] for k in KINDS},
                "subkinds": {f"{k}/{s}": n for (k, s), n in self.subkinds.items() if s}, "examples": dict(self.examples),
                "statuses": dict(self.statuses), "x_cache_status": dict(self.cache_status),
                "origin_requests": self.origin_requests, "failed": self.failed}


_RUN = re.compile(rb"(.)\1{19,}", re.S)


def short(b: bytes, limit: int = 400) -> str:
    """repr of bytes with long runs written as <N×'c'> and the middle cut beyond ``limit``."""
    parts: list[str] = []
    pos = 0
    for m in _RUN.finditer(b):
        parts.append(repr(b[pos:m.start()])[2:-1])
        parts.append(f"<{len(m.group(0))}×{repr(m.group(1))[2:-1]}>")
        pos = m.end()
    parts.append(repr(b[pos:])[2:-1])
    text = "".join(parts)
    if len(text) > limit:
        text = text[: limit // 2] + f"…<{len(text) - limit} chars>…" + text[-limit // 2:]
    return "b'" + text + "'"


def describe(ex: Exchange) -> str:
    cache = ", ".join(f"{k}: {v}" for k, v in ex.response_headers if k.lower() in ("x-cache-status", "cache-status"))
    return f"[{ex.rid} via proxy {ex.proxy}] request {short(ex.raw)} -> {ex.status} ({cache})"


def describe_record(rec: Record) -> str:
    return (f"origin answer #{rec.serial} (for {rec.rid}: {rec.method} {short(rec.target, 200)} host={rec.host!r}) "
            f"{short(rec.head, 600)} body {short(rec.body_start, 120)}")


_SERIAL = re.compile(rb"^answer #(\d+) to ")


def check(result: Result, exchanges: list[Exchange], origin: FuzzOrigin, origin_timeout_ms: int | None = None) -> None:
    records = origin.records
    # Paths the origin was slower on than the cache's deadline (origin-timeout-504 is legitimate there).
    slow_paths = {
        path_of(rec.target) for rec in records.values()
        if origin_timeout_ms is not None and rec.delay * 1000 >= origin_timeout_ms
    }
    by_rid = origin.by_rid
    ex_by_rid = {ex.rid: ex for ex in exchanges if ex.raw}
    origin_auth = norm_authority(origin.authority.encode())

    # What each spelling of a request became at the origin, learned from the requests that got there.
    learned: dict[tuple[str, bytes], set[View]] = defaultdict(set)
    absolute_kept = absolute_rewritten = 0
    for rec in records.values():
        ex = ex_by_rid.get(rec.rid)
        if ex is None or rec.method != ex.method:
            continue
        learned[signature(ex)].add(rec.view)
        if _ABSOLUTE.match(client_target(ex)):
            if _ABSOLUTE.match(rec.target):
                absolute_kept += 1
            else:
                absolute_rewritten += 1

    # Answers known to have been stored: served from the cache, or stored by their own request.
    stored_serials: set[int] = set()
    for ex in exchanges:
        serial = named_serial(ex, records)
        if serial is None:
            continue
        label = (header_values(ex.response_headers, "x-cache-status") or [""])[0]
        stored_here = any(re.search(r"(^|;)\s*stored\s*(;|$)", v)
                          for v in header_values(ex.response_headers, "cache-status"))
        if label in ("HIT", "STALE") or (stored_here and records[serial].rid == ex.rid):
            stored_serials.add(serial)
    stored_by_view: dict[View, list[Record]] = defaultdict(list)
    for serial in sorted(stored_serials):
        stored_by_view[records[serial].view].append(records[serial])

    def stored_before(rec: Record) -> Record | None:
        """The latest answer for rec's view known to have been stored before rec was made."""
        earlier = [p for p in stored_by_view.get(rec.view, []) if p.time < rec.time and p.serial != rec.serial]
        return max(earlier, key=lambda p: p.time) if earlier else None

    def expected_views(ex: Exchange) -> set[View]:
        own = {records[s].view for s in by_rid.get(ex.rid, ()) if records[s].method == ex.method}
        if own:
            return own
        if learned.get(signature(ex)):
            return learned[signature(ex)]
        target = client_target(ex)
        m = _ABSOLUTE.match(target)
        if m and absolute_kept >= absolute_rewritten:
            return {(method_class(ex.method), norm_authority(m.group(2)), norm_pct(m.group(3) or b"/"))}
        path = (m.group(3) or b"/") if m else target
        return {(method_class(ex.method), origin_auth, norm_pct(path))}

    for rid, error in origin.crashes.items():
        result.add("origin-crash", f"the fuzz origin failed answering {rid}: {error}"
                   + (f" ({describe(ex_by_rid[rid])})" if rid in ex_by_rid else ""))

    for ex in exchanges:
        if not ex.raw:
            continue
        if ex.error is not None:
            kind = "timeout" if ex.error.startswith("timeout") else "no-response"
            result.add(kind, f"{describe(ex)}: {ex.error}")
            continue
        assert ex.status is not None
        result.statuses[str(ex.status)] += 1
        result.cache_status[(header_values(ex.response_headers, "x-cache-status") or ["-"])[0]] += 1
        answer_hdr = header_values(ex.response_headers, ANSWER_HEADER)
        hdr_serial = int(answer_hdr[0]) if answer_hdr and answer_hdr[0].isdigit() else None
        if hdr_serial is not None and hdr_serial not in records:
            hdr_serial = None

        # (e) Set-Cookie from an origin answer to another request
        for cookie in header_values(ex.response_headers, "set-cookie"):
            m = re.match(r"fz=(\d+)\.([^;]*)", cookie)
            if m and m.group(2) != ex.rid:
                rec = records.get(int(m.group(1)))
                result.add("cookie-leak", f"{describe(ex)} got Set-Cookie {cookie!r} made for {m.group(2)}; "
                           + (describe_record(rec) if rec else "no origin record"))

        # (f) PURGE is the cache's own verb (the fuzz client is on 127.0.0.1, which may purge):
        # answered by the cache with its JSON count, never forwarded to the origin.
        if ex.method == "PURGE":
            if by_rid.get(ex.rid):
                result.add("wrong-answer", f"{describe(ex)}: a PURGE reached the origin", "purge-forwarded")
            elif not ex.response_body.startswith(b'{"purged": '):
                result.add("wrong-answer", f"{describe(ex)}: not the cache's PURGE answer: "
                           f"{short(ex.response_body, 200)}", "purge-answer")
            continue

        # (b) 5xx the origin did not send
        if ex.status >= 500:
            m = _SERIAL.match(ex.response_body)
            named = [records.get(int(m.group(1))) if m else None, records.get(hdr_serial) if hdr_serial else None]
            if not any(rec is not None and rec.status == ex.status for rec in named):
                if ex.rid in origin.crashes:
                    pass  # reported as origin-crash
                elif ex.status == 504 and ex.only_if_cached:
                    result.add("only-if-cached-504", describe(ex))
                elif (
                    ex.status == 504 and path_of(client_target(ex)) in slow_paths
                    and "origin-timeout" in ",".join(header_values(ex.response_headers, "cache-status"))
                ):
                    result.add("origin-timeout-504", describe(ex))
                else:
                    result.add("proxy-5xx", f"{describe(ex)} body {short(ex.response_body, 300)}; origin answers to "
                               f"this request: {[records[s].status for s in by_rid.get(ex.rid, [])]}")
                continue

        # (c) which origin answer is this?
        serial: int | None = None
        has_body = ex.method != "HEAD" and ex.status not in (204, 304) and ex.status >= 200
        if has_body and ex.status != 206:
            m = _SERIAL.match(ex.response_body)
            if m and int(m.group(1)) in records:
                serial = int(m.group(1))
                rec = records[serial]
                if hashlib.sha256(ex.response_body).hexdigest() != rec.body_sha:
                    result.add("wrong-answer", f"{describe(ex)}: body ({len(ex.response_body)} B) is not the one "
                               f"the origin sent ({rec.body_len} B): {describe_record(rec)}", "corrupt-body")
                    continue
            elif not ex.response_body and hdr_serial is not None:
                serial = hdr_serial
                if records[serial].full_len:
                    rec = records[serial]
                    result.add("wrong-answer", f"{describe(ex)}: empty body, the origin's answer has "
                               f"{rec.full_len} B ({rec.method} answer): {describe_record(rec)}", "empty-body")
                    continue
            elif ex.status in (200, 203):
                result.add("wrong-answer", f"{describe(ex)}: body names no origin answer: "
                           f"{short(ex.response_body, 200)}", "unidentified-body")
                continue
        elif has_body:  # 206: an origin 206 is checked, a range cut by the cache is not
            m = _SERIAL.match(ex.response_body)
            if m and int(m.group(1)) in records and \
                    hashlib.sha256(ex.response_body).hexdigest() == records[int(m.group(1))].body_sha:
                serial = int(m.group(1))
        else:
            serial = hdr_serial
        if serial is None:
            continue
        rec = records[serial]
        if rec.rid == ex.rid:
            continue  # its own answer
        want = expected_views(ex)
        if rec.view not in want:
            differs = [name for i, name in enumerate(("method", "authority", "target"))
                       if all(rec.view[i] != v[i] for v in want)]
            result.add("wrong-answer", f"{describe(ex)} names {fmt_view(rec.view)}, expected "
                       f"{' or '.join(fmt_view(v) for v in sorted(want))}: {describe_record(rec)}",
                       "+".join(differs) or "view")
            continue
        names = vary_names(rec.response_headers)
        if names is None:
            result.add("shared-private", f"{describe(ex)} got a Vary: * answer made for {rec.rid}: "
                       f"{describe_record(rec)}", "vary-star")
            continue
        sent = ex.sent_headers()
        mismatch = [(n, norm_vary_value(n, header_values(rec.headers, n)), norm_vary_value(n, header_values(sent, n)))
                    for n in names
                    if norm_vary_value(n, header_values(rec.headers, n)) != norm_vary_value(n, header_values(sent, n))]
        if mismatch:
            result.add("wrong-answer", f"{describe(ex)} got another variant (field, made for, this request): "
                       f"{mismatch}: {describe_record(rec)}", "variant")
            continue
        cc = {d.split("=", 1)[0].strip().lower() for d in split_list(header_values(rec.response_headers, "cache-control"))}
        if cc & {"private", "no-store"}:
            result.add("shared-private", f"{describe(ex)} got a {'/'.join(sorted(cc & {'private', 'no-store'}))} "
                       f"answer made for {rec.rid}: {describe_record(rec)}", "/".join(sorted(cc & {"private", "no-store"})))
            continue
        if rec.status >= 500 and went_past_stored(rec, ex_by_rid.get(rec.rid)):
            s_ex = ex_by_rid[rec.rid]
            prior = stored_before(rec)
            if prior is not None and prior.status >= 500:
                continue  # it stood in for an error the cache held anyway: no harm done
            how = "revalidation" if cache_added_validators(rec, s_ex) else "fwd-past-stored"
            result.add("5xx-over-stored", f"{describe(ex)} got the {rec.status} the origin gave to {rec.rid}, which "
                       f"went past a stored response ({describe(s_ex)}; the stored one was "
                       f"{describe_record(prior) if prior else 'not identified'}): {describe_record(rec)}",
                       how + ("" if prior else "/prior-unknown"))


def named_serial(ex: Exchange, records: dict[int, Record]) -> int | None:
    """The origin answer a response names: its body's first line, else its X-Fuzz-Answer field."""
    m = _SERIAL.match(ex.response_body)
    if m and int(m.group(1)) in records:
        return int(m.group(1))
    answer = header_values(ex.response_headers, ANSWER_HEADER)
    if answer and answer[0].isdigit() and int(answer[0]) in records:
        return int(answer[0])
    return None


def path_of(target: bytes) -> bytes:
    """The path of a request target in origin or absolute form (no query)."""
    if b"://" in target[:16]:
        target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
    return target.split(b"?")[0]


def client_target(ex: Exchange) -> bytes:
    return ex.raw.split(b" ", 2)[1] if ex.raw else ex.target


def signature(ex: Exchange) -> tuple[str, bytes]:
    target = client_target(ex)
    m = _ABSOLUTE.match(target)
    if m:
        target = m.group(1).lower() + b"://" + norm_authority(m.group(2)).encode("latin-1") + norm_pct(m.group(3) or b"/")
    else:
        target = norm_pct(target)
    return method_class(ex.method), target


def fmt_view(v: View) -> str:
    return f"{v[0]} {v[1]}{short(v[2], 120)}"


_FWD_PAST_STORED = re.compile(r"(^|;)\s*fwd=(stale|request)\s*(;|$)")


def went_past_stored(rec: Record, ex: Exchange | None) -> bool:
    """Did the request the origin answered with ``rec`` go past a stored response?"""
    if ex is None:
        return False
    return cache_added_validators(rec, ex) or any(
        _FWD_PAST_STORED.search(v) for v in header_values(ex.response_headers, "cache-status"))


def cache_added_validators(rec: Record, ex: Exchange | None) -> bool:
    """The origin saw If-None-Match / If-Modified-Since values the client did not send."""
    if ex is None:
        return False
    sent = ex.sent_headers()
    for name in ("if-none-match", "if-modified-since"):
        seen = header_values(rec.headers, name)
        if seen and seen != header_values(sent, name):
            return True
    return False


# --------------------------------------------------------------------------- processes

_EXC_LINE = re.compile(r"^[\w.]+(Error|Exception|Warning|Exit|Interrupt|Group)\b")


class OutputDrain:
    """Reads a mitmdump's combined output continuously (a full pipe would stall it)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run, args=(proc,), daemon=True, name="fuzz-drain")
        self.thread.start()

    def _run(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            self.lines.append((time.time(), raw.decode("utf-8", "replace").rstrip("\n")))


def scan_output(result: Result, name: str, drain: OutputDrain, exchanges: list[Exchange], proxy_index: int) -> None:
    lines = drain.lines
    i = 0
    while i < len(lines):
        when, line = lines[i]
        if "Addon error" in line or "Traceback" in line:
            block = [line]
            j = i + 1
            while j < len(lines) and (lines[j][1].startswith((" ", "\t", "Traceback")) or not lines[j][1].strip()
                                      or _EXC_LINE.match(lines[j][1])):
                block.append(lines[j][1])
                j += 1
            in_flight = [ex.rid for ex in exchanges
                         if ex.proxy == proxy_index and ex.raw and ex.started - 0.05 <= when <= (ex.ended or when) + 0.5]
            tail = " | ".join(b.strip() for b in block[-3:])
            result.add("addon-error", f"{name}: {line.strip()[:300]} … {tail[:600]} "
                       f"(exchanges in flight on this proxy then: {in_flight[:8]})")
            i = max(j, i + 1)
            continue
        if line.strip():
            result.other_output.append(f"{name}: {line}")
        i += 1


def run(seed: int, exchanges: int, proxies: int = 2, time_limit: float = 600.0, workers: int = 8,
        request_timeout: float = 10.0, rate: float = 100.0, tmp: Path | None = None, nodes: int = 3,
        verbose: bool = False, dump: Path | None = None, addon: Path = ENTRY,
        only: set[str] | None = None, origin_timeout_ms: int | None = None) -> Result:
    """Start origin, ring and proxies, run the exchanges, stop everything, check; returns the result."""
    t_start = time.monotonic()
    deadline = t_start + time_limit
    result = Result(seed, exchanges)
    plan = make_exchanges(seed, exchanges, proxies)
    if only:  # a reproduction: just these, one at a time, in plan order
        plan = [ex for ex in plan if ex.rid in only]
        workers, rate = 1, 0.0
    tmp = tmp or Path(tempfile.mkdtemp(prefix="mitmcache-fuzz-"))
    origin = FuzzOrigin(seed)
    ring: list[ValkeyNode] = []
    running: list[tuple[Proxy, OutputDrain]] = []
    try:
        ring = start_nodes(nodes) if nodes else []
        urls = ",".join(n.url for n in ring)
        for i in range(proxies):
            sets = [f"cache_valkey_urls={urls}"] if urls else []
            if origin_timeout_ms is not None:
                sets.append(f"cache_origin_timeout_ms={origin_timeout_ms}")
            p = start_proxy(tmp / f"proxy{i}", f"reverse:http://{origin.authority}", *sets, script=addon)
            running.append((p, OutputDrain(p.proc)))
        if verbose:
            print(f"origin {origin.authority}, ring {urls or '-'}, proxies "
                  f"{[p.port for p, _ in running]}", file=sys.stderr)
        t_run = time.monotonic()
        result.sent = run_exchanges(plan, [p for p, _ in running], origin, workers, request_timeout, deadline, rate)
        result.seconds = time.monotonic() - t_run
        time.sleep(1.0)  # let background revalidations finish and their errors reach the output
    finally:
        for p, drain in running:
            stop_process(p.proc)
            drain.thread.join(10)
        for n in ring:
            n.stop()
        origin.stop()
    for i, (_, drain) in enumerate(running):
        scan_output(result, f"proxy {i}", drain, plan, i)
    result.origin_requests = len(origin.records)
    check(result, plan, origin, origin_timeout_ms)
    if dump is not None:
        write_dump(dump, plan, origin)
    return result


def write_dump(path: Path, plan: list[Exchange], origin: FuzzOrigin) -> None:
    """One JSON line per exchange (request bytes, response, the origin answers to it), Latin-1 text."""
    with path.open("w") as f:
        for ex in plan:
            if not ex.raw:
                continue
            f.write(json.dumps({
                "rid": ex.rid, "proxy": ex.proxy, "request": latin1(ex.raw), "status": ex.status,
                "error": ex.error, "headers": ex.response_headers, "body": latin1(ex.response_body[:400]),
                "body_len": len(ex.response_body), "t": [ex.started, ex.ended],
                "origin": [{"serial": s, "method": origin.records[s].method, "target": latin1(origin.records[s].target),
                            "seen": origin.records[s].headers, "head": latin1(origin.records[s].head), "t": origin.records[s].time}
                           for s in origin.by_rid.get(ex.rid, [])],
            }) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--exchanges", type=int, default=1000)
    parser.add_argument("--proxies", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for sending (then stop)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent client connections")
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="at most this many exchanges started per second (0 = no limit)")
    parser.add_argument("--nodes", type=int, default=3, help="Valkey nodes in the ring (0 = L1 only)")
    parser.add_argument("--origin-timeout-ms", type=int, help="the proxies' cache_origin_timeout_ms (default: theirs)")
    parser.add_argument("--dump", type=Path, help="write every exchange as a JSON line here")
    parser.add_argument("--addon", type=Path, default=ENTRY,
                        help="the -s entry file (e.g. another checkout's addon/mitmcache_addon.py)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--only", help="send only these exchanges of the plan (comma-separated ids like s1-225), "
                        "in plan order, on fresh proxies: to reproduce a finding")
    parser.add_argument("--print-requests", type=int, metavar="N",
                        help="print the first N planned requests (placeholders unresolved) and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.print_requests:
        for ex in make_exchanges(args.seed, args.exchanges, args.proxies)[: args.print_requests]:
            print(ex.proxy, short(ex.render(PROXY_TOKEN, ORIGIN_TOKEN), 2000))
        return 0
    result = run(args.seed, args.exchanges, args.proxies, args.time_limit, args.workers, args.request_timeout,
                 args.rate, nodes=args.nodes, verbose=args.verbose, dump=args.dump, addon=args.addon.resolve(),
                 only=set(args.only.split(",")) if args.only else None, origin_timeout_ms=args.origin_timeout_ms)
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1))
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
