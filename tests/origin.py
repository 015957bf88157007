"""A real local origin for end-to-end tests: responses shaped by query parameters.

Every request is counted per path+query (``origin.count("/a?x=1")``) and recorded, so a test
can tell exactly what reached the origin. Parameters:

  cc=…         Cache-Control value          status=N      status code (default 200)
  etag=…       ETag (quoted for you)        lm=N          Last-Modified N seconds ago
  expires=N    Expires N seconds from Date  age=N         Age header
  date=N       Date N seconds in the past   vary=…        Vary value
  cookie=1     add Set-Cookie               location=…    Location header
  cloc=…       Content-Location header      size=N        body of N bytes
  delay=MS     wait before answering        no304=1       ignore conditionals
  hdr=N: v|…   raw extra header fields (replacing Date if one is given)
  nodate=1     no Date field at all        wetag=…       weak ETag W/"…"
  big=N        a body of N bytes of ``big_body_chunks`` (bytes 0..255 repeated), written 1 MiB at a
               time and never held whole: for streaming tests with hundreds of MiB
  chunked=1    with big=: Transfer-Encoding: chunked instead of Content-Length
  barrier=N    from the second request for the path+query on, hold each until N of them are in
               (at most 5 s; a broken barrier answers 504): proves requests ran concurrently
  echo=N,…     append " N=<request field N>" for each named request field to the body
  h304=N: v|…  fields of 304 answers (replacing ours of the same name)
  hhead=N: v|… fields of HEAD answers (replacing ours of the same name)
  then_status=N, then_cc=…   status / Cache-Control from the second request for the path+query on
  xhdr=N: v|…  extra fields as raw bytes: percent-decoded as Latin-1, so each %XX is one byte
               on the wire (non-UTF-8 and UTF-8 values alike)
Every request's raw request line is kept too (``Seen.line``, bytes as received).
The body is "<path> #<count> <vary values>" unless size= is given, so a fresh origin fetch is
visible in the body.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import ipaddress
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    line: bytes = b""  # the request line exactly as received (no CRLF)


@dataclass
class Origin:
    server: ThreadingHTTPServer
    counts: Counter[str] = field(default_factory=Counter)
    failing: dict[str, int] = field(default_factory=dict)  # path (no query) → status to answer
    cert_file: Path | None = None  # the self-signed certificate of a TLS origin
    extra: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # path → fields replacing ours
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    barriers: dict[str, threading.Barrier] = field(default_factory=dict)  # path+query → barrier=N

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str, method: str | None = None) -> int:
        with self.lock:
            if method is None:
                return self.counts[path]
            return sum(1 for s in self.seen if s.path == path and s.method == method)

    def requests_for(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]

    @contextlib.contextmanager
    def failing_with(self, path: str, status: int) -> Iterator[None]:
        """Answer every request for ``path`` (any query) with ``status`` inside the block."""
        self.failing[path] = status
        try:
            yield
        finally:
            del self.failing[path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    origin: Origin

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # No automatic Date header: the test decides (date=N).
        self.send_response_only(code, message)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        origin = self.server.origin  # type: ignore[attr-defined]
        with origin.lock:
            origin.counts[self.path] += 1
            n = origin.counts[self.path]
            origin.seen.append(
                Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                     self.raw_requestline.rstrip(b"\r\n"))
            )
        query = urlsplit(self.path).query
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if n > 1 and "then_status" in q:
            q["status"] = q["then_status"]
        if n > 1 and "then_cc" in q:
            q["cc"] = q["then_cc"]
        if "delay" in q:
            time.sleep(int(q["delay"]) / 1000)
        if n > 1 and "barrier" in q:
            with origin.lock:
                barrier = origin.barriers.setdefault(self.path, threading.Barrier(int(q["barrier"])))
            try:
                barrier.wait(timeout=5.0)
            except threading.BrokenBarrierError:
                q["status"], q["cc"] = "504", "no-store"
        now = time.time()
        date = now - int(q.get("date", 0))
        status = origin.failing.get(urlsplit(self.path).path, int(q.get("status", 200)))
        headers: list[tuple[str, str]] = [] if "nodate" in q else [("Date", email.utils.formatdate(date, usegmt=True))]
        if "cc" in q:
            headers.append(("Cache-Control", q["cc"]))
        etag = f'"{q["etag"]}"' if "etag" in q else f'W/"{q["wetag"]}"' if "wetag" in q else None
        if etag:
            headers.append(("ETag", etag))
        lm = email.utils.formatdate(now - int(q["lm"]), usegmt=True) if "lm" in q else None
        if lm:
            headers.append(("Last-Modified", lm))
        if "expires" in q:
            headers.append(("Expires", email.utils.formatdate(date + int(q["expires"]), usegmt=True)))
        if "age" in q:
            headers.append(("Age", q["age"]))
        if "vary" in q:
            headers.append(("Vary", q["vary"]))
        if "cookie" in q:
            headers.append(("Set-Cookie", f"session=user{n}; Path=/"))
        if "location" in q:
            headers.append(("Location", q["location"]))
        if "cloc" in q:
            headers.append(("Content-Location", q["cloc"]))
        if "hdr" in q:  # raw extra fields: "Name: value|Name: value"
            headers = [h for h in headers if h[0] != "Date"] if "Date:" in q["hdr"] else headers
            headers += [tuple(x.strip() for x in f.split(":", 1)) for f in q["hdr"].split("|")]  # type: ignore[misc]
        if "xhdr" in q:  # Latin-1 str: send_header encodes it back to exactly these bytes
            raw = parse_qs(query, keep_blank_values=True, encoding="latin-1")["xhdr"][-1]
            headers += [tuple(x.strip() for x in f.split(":", 1)) for f in raw.split("|")]  # type: ignore[misc]
        if self.command == "HEAD" and "hhead" in q:
            headers = _replace_fields(headers, q["hhead"])

        for name, value in origin.extra.get(urlsplit(self.path).path, []):
            headers = [h for h in headers if h[0].lower() != name.lower()] + [(name, value)]

        not_modified = False
        if "no304" not in q and status == 200 and urlsplit(self.path).path not in origin.failing:
            inm = self.headers.get("If-None-Match")
            ims = self.headers.get("If-Modified-Since")
            if inm is not None and etag is not None:
                not_modified = etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*"
            elif ims is not None and lm is not None:
                not_modified = ims == lm
        if not_modified:
            if "h304" in q:
                headers = _replace_fields(headers, q["h304"])
            self.send_response(304)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            return

        if "big" in q and self.command == "GET":
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", "application/octet-stream")
            chunked = "chunked" in q
            self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", q["big"])))
            self.end_headers()
            try:
                for chunk in big_body_chunks(int(q["big"])):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left mid-body
            return
        if "size" in q:
            body = b"x" * int(q["size"])
        else:
            vary_vals = ""
            if "vary" in q:
                vary_vals = " " + ",".join(
                    f"{name.strip()}={self.headers.get(name.strip(), '')}" for name in q["vary"].split(",")
                )
            echo_vals = ""
            if "echo" in q:
                echo_vals = "".join(
                    f" {name.strip()}={self.headers.get(name.strip(), '')}" for name in q["echo"].split(",")
                )
            body = f"{urlsplit(self.path).path} #{n}{vary_vals}{echo_vals}".encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


_PATTERN = bytes(range(256)) * 4096  # 1 MiB


def big_body_chunks(size: int) -> Iterator[bytes]:
    """The body of ``big=size``, 1 MiB at a time (tests hash it the same way)."""
    while size > 0:
        chunk = _PATTERN[: min(size, len(_PATTERN))]
        size -= len(chunk)
        yield chunk


def _replace_fields(headers: list[tuple[str, str]], spec: str) -> list[tuple[str, str]]:
    """``Name: v|Name: v`` replaces our fields of those names (several of one name allowed)."""
    new = [tuple(x.strip() for x in f.split(":", 1)) for f in spec.split("|")]
    names = {n.lower() for n, _ in new}
    return [h for h in headers if h[0].lower() not in names] + new  # type: ignore[misc]


def _self_signed_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A TLS server context with a throwaway self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "origin-cert.pem", directory / "origin-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of connections beyond it waits for
    # SYN retransmits (a second each), which would look like the proxy serialising requests.
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exception(), OSError):
            return  # the client (the proxy) left first, e.g. after giving up on a slow answer
        super().handle_error(request, client_address)  # type: ignore[arg-type]


def start_origin(port: int = 0, tls: bool = False) -> Origin:
    server = _Server(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    cert_file = None
    if tls:
        context, cert_file = _self_signed_context(Path(tempfile.mkdtemp(prefix="origin-tls-")))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    origin = Origin(server, cert_file=cert_file)
    server.origin = origin  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True, name="origin").start()
    return origin
