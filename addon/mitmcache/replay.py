"""Record and replay (VCR's vocabulary): the cassette, the matcher, redaction, date refresh and
the report, as plain values (sans-I/O; the ``Replay`` addon reads and writes the files).

A recorded exchange is a ``Recorded`` (request + the origin's ``Response``). The cassette keeps
a dict from a normalized *match key* to the recorded answers for that key, in recorded order,
so a lookup is one dict access; only the message for a miss scans (for the closest recording).

Match key (README, "Record and replay"): method (as sent), scheme, host, port, path, the query
as a multiset without ignored and redacted parameters, the body (exact bytes; JSON compared as
JSON; form bodies as multisets without ignored/redacted parameters) and the values of the
request headers listed in ``cache_replay_match_headers`` (never a redacted one).
"""

from __future__ import annotations

import difflib
import email.utils
import fnmatch
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote_plus

from .messages import Headers, Response

MODES = ("off", "none", "once", "new_episodes", "all")
REDACTED = "REDACTED"
DEFAULT_REDACT = "authorization,proxy-authorization,cookie,set-cookie"
# Shifted by the time since recording, as mitmproxy's Response.refresh does.
REFRESHED = ("date", "expires", "last-modified")

MatchKey = tuple[object, ...]
# The parts of a match key, in order, for "differs in: …" in a miss message.
KEY_PARTS = ("method", "scheme", "host", "port", "path", "query", "body", "headers")


def split_list(value: str) -> tuple[str, ...]:
    """A comma list option: items stripped, empty ones dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class Spec:
    """The compiled ``cache_replay_*`` matching and redaction options.

    ``ignore_params``/``redact_params``: case-sensitive ``fnmatch`` globs on parameter names;
    ``match_headers``/``redact_headers``: lower-case header names."""

    ignore_params: tuple[str, ...] = ()
    redact_params: tuple[str, ...] = ()
    match_headers: tuple[str, ...] = ()
    redact_headers: frozenset[str] = frozenset(split_list(DEFAULT_REDACT))
    refresh: bool = True

    @staticmethod
    def parse(ignore_params: str, redact_params: str, match_headers: str, redact: str, refresh: bool) -> Spec:
        redact_headers = frozenset(h.lower() for h in split_list(redact))
        return Spec(
            split_list(ignore_params), split_list(redact_params),
            # A redacted header is REDACTED in the file: matching on it could never work.
            tuple(h.lower() for h in split_list(match_headers) if h.lower() not in redact_headers),
            redact_headers, refresh,
        )

    def dropped(self, name: str) -> bool:
        """A parameter left out of matching (ignored or redacted)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.ignore_params + self.redact_params)

    def redacted(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.redact_params)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as matched and recorded. ``path`` includes the query; ``body`` is decoded
    (no Content-Encoding)."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    headers: Headers
    body: bytes

    @property
    def url(self) -> str:
        """``scheme://host[:port]path`` with the default port left out, as mitmproxy spells it."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host if self.port == default else f'{host}:{self.port}'}{self.path}"


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded exchange; ``index`` is its position in the cassette file."""

    index: int
    request: RecordedRequest
    response: Response


def _header(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _params(text: str, spec: Spec) -> tuple[tuple[str, str], ...]:
    """Parameters as a sorted multiset (order-insensitive), without dropped ones."""
    return tuple(sorted((k, v) for k, v in parse_qsl(text, keep_blank_values=True) if not spec.dropped(k)))


def _body_key(headers: Headers, body: bytes, spec: Spec) -> tuple[str, object]:
    """JSON bodies compare as JSON, form bodies as multisets, anything else as exact bytes."""
    if not body:
        return ("bytes", b"")
    ctype = (_header(headers, "content-type") or "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return ("json", json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")))
        except (ValueError, RecursionError):
            pass  # not JSON after all: compared as bytes
    elif ctype == "application/x-www-form-urlencoded":
        return ("form", _params(body.decode("utf-8", "surrogateescape"), spec))
    return ("bytes", body)


def match_key(req: RecordedRequest, spec: Spec) -> MatchKey:
    """The normalized key a request is looked up by (see the module docstring)."""
    path, _, query = req.path.partition("?")
    headers = tuple(
        (name, tuple(v for k, v in req.headers if k.lower() == name)) for name in spec.match_headers
    )
    return (
        req.method, req.scheme.lower(), req.host.lower(), req.port, path,
        _params(query, spec), _body_key(req.headers, req.body, spec), headers,
    )


def redact_query(path: str, spec: Spec) -> str:
    """``path?query`` with the values of redacted parameters replaced by ``REDACTED`` (the
    rest of the query kept byte for byte)."""
    if not spec.redact_params or "?" not in path:
        return path
    base, _, query = path.partition("?")
    return f"{base}?{_redact_pairs(query, spec)}"


def _redact_pairs(text: str, spec: Spec) -> str:
    out = []
    for piece in text.split("&"):
        name, eq, _ = piece.partition("=")
        out.append(f"{name}={REDACTED}" if spec.redacted(unquote_plus(name)) else piece)
    return "&".join(out)


def redact_form(headers: Headers, body: bytes, spec: Spec) -> bytes:
    """A form body with redacted parameters' values replaced (other bodies unchanged)."""
    ctype = (_header(headers, "content-type") or "").split(";")[0].strip().lower()
    if not spec.redact_params or ctype != "application/x-www-form-urlencoded" or not body:
        return body
    return _redact_pairs(body.decode("utf-8", "surrogateescape"), spec).encode("utf-8", "surrogateescape")


def redact_headers(headers: Headers, spec: Spec) -> Headers:
    return tuple((k, REDACTED if k.lower() in spec.redact_headers else v) for k, v in headers)


def refresh_dates(headers: Headers, delta: float) -> Headers:
    """Date, Expires and Last-Modified shifted by ``delta`` seconds (the time since recording),
    as mitmproxy's ``server_replay_refresh``; values that are not HTTP dates stay as they are."""
    out = []
    for k, v in headers:
        if k.lower() in REFRESHED:
            parsed = email.utils.parsedate_tz(v)
            if parsed is not None:
                try:
                    v = email.utils.formatdate(email.utils.mktime_tz(parsed) + delta, usegmt=True)
                except (OverflowError, ValueError, OSError):
                    pass
        out.append((k, v))
    return tuple(out)


def describe(req: RecordedRequest, spec: Spec) -> str:
    """``METHOD URL`` with redacted parameters shown as REDACTED (safe for a CI log)."""
    return f"{req.method} {redact_query(req.url, spec)}"


@dataclass
class Cassette:
    """The recorded exchanges of one file, indexed by match key, and what this run did with
    them. ``lookup`` is O(1); answers for one key come in recorded order, then the last
    repeats."""

    spec: Spec
    recorded: list[Recorded] = field(default_factory=list)
    _index: dict[MatchKey, list[Recorded]] = field(default_factory=dict)
    _served: Counter[MatchKey] = field(default_factory=Counter)
    _used: set[int] = field(default_factory=set)
    matched: int = 0
    unmatched: Counter[str] = field(default_factory=Counter)  # describe() -> times

    def __post_init__(self) -> None:
        for rec in self.recorded:
            self._index.setdefault(match_key(rec.request, self.spec), []).append(rec)

    @staticmethod
    def of(spec: Spec, exchanges: Iterable[tuple[RecordedRequest, Response]]) -> Cassette:
        return Cassette(spec, [Recorded(i, req, resp) for i, (req, resp) in enumerate(exchanges)])

    def lookup(self, req: RecordedRequest) -> Recorded | None:
        """The next recorded answer for ``req``, or None (counted as unmatched)."""
        key = match_key(req, self.spec)
        answers = self._index.get(key)
        if answers is None:
            self.unmatched[describe(req, self.spec)] += 1
            return None
        n = self._served[key]
        self._served[key] = n + 1
        rec = answers[min(n, len(answers) - 1)]
        self._used.add(rec.index)
        self.matched += 1
        return rec

    def closest(self, req: RecordedRequest) -> Recorded | None:
        """The recorded request most like ``req`` (for a miss message; a scan, misses only):
        same method and origin first, then the same path, then the most similar ``METHOD URL``,
        then the most equal key parts (query, body, headers)."""
        if not self.recorded:
            return None
        key = match_key(req, self.spec)
        wanted = describe(req, self.spec)

        def score(answers: list[Recorded]) -> tuple[int, bool, float, int]:
            other = match_key(answers[0].request, self.spec)
            same = [a == b for a, b in zip(key, other)]
            similar = difflib.SequenceMatcher(None, wanted, describe(answers[0].request, self.spec)).ratio()
            return sum(same[:4]), same[4], similar, sum(same)

        return max(self._index.values(), key=score)[0]

    def differences(self, req: RecordedRequest, rec: Recorded) -> list[str]:
        """The key parts in which ``req`` differs from a recorded request."""
        return [name for name, a, b in zip(KEY_PARTS, match_key(req, self.spec), match_key(rec.request, self.spec)) if a != b]

    def miss_message(self, req: RecordedRequest, mode: str) -> str:
        """The plain-text body of the 504 for an unmatched request (redacted values hidden)."""
        lines = [
            f"mitmcache: no recorded response matches this request (cache_replay_mode={mode}; "
            "replay only, the origin was not contacted).",
            f"Request:  {describe(req, self.spec)}",
        ]
        closest = self.closest(req)
        if closest is None:
            lines.append("Closest recorded request: none (the recording is empty)")
        else:
            lines.append(f"Closest recorded request: {describe(closest.request, self.spec)}")
            diff = self.differences(req, closest)
            if diff:
                lines.append(f"Differs in: {', '.join(diff)}")
        return "\n".join(lines) + "\n"

    def unused(self) -> list[Recorded]:
        return [rec for rec in self.recorded if rec.index not in self._used]


def report(cassette: Cassette | None, mode: str, effective: str, path: str, recorded: int) -> dict[str, object]:
    """The run's summary (``cache.replay.report``; logged at exit). ``replay_only`` says an
    unmatched request got a 504 instead of being recorded."""
    c = cassette
    return {
        "file": path,
        "mode": mode,
        "effective_mode": effective,
        "replay_only": effective == "none",
        "matched": c.matched if c else 0,
        "unmatched": [{"request": desc, "count": n} for desc, n in c.unmatched.items()] if c else [],
        "recorded_but_unused": [describe(r.request, c.spec) for r in c.unused()] if c else [],
        "recorded": recorded,
    }


def summary_line(rep: dict[str, object]) -> str:
    """The one-line exit summary, e.g. ``replay (none, tests.har): 12 matched, 1 unmatched, …``."""
    unmatched = rep["unmatched"]
    assert isinstance(unmatched, list)
    unused = rep["recorded_but_unused"]
    assert isinstance(unused, list)
    line = (
        f"mitmcache replay ({rep['effective_mode']}, {rep['file']}): {rep['matched']} matched, "
        f"{sum(u['count'] for u in unmatched)} unmatched, {len(unused)} recorded but unused, "
        f"{rep['recorded']} newly recorded"
    )
    if unmatched:
        line += "; unmatched: " + ", ".join(u["request"] for u in unmatched[:5]) + (" …" if len(unmatched) > 5 else "")
    return line
