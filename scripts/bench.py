"""Benchmark: the cache's paths against mitmproxy's own baselines, side by side, as ratios.

Starts one fast origin (nginx when installed, else a small asyncio origin), a local 3-node
Valkey ring, and one proxy per target, all in reverse mode to the origin (``-q``,
``connection_strategy=lazy``):

  upstream          stock mitmdump, no addon: every request goes to the origin
  ceiling           stock mitmdump + an addon answering from memory in the request hook
                    (mitmproxy's ceiling for any hit: scripts/baseline_memory_addon.py)
  ceiling-get       the same answer after one bare GET round trip to a ring node, on the
                    leanest client there is (the floor for any L2 hit:
                    scripts/baseline_valkey_get_addon.py)
  l1                stock mitmdump -s the cache, L1 only: every request an L1 hit
  l2                stock mitmdump -s the cache, cache_l1_ttl=0: every hit read from Valkey
  nostore-l1/-l2    the l1 / l2 proxies asked for a ``Cache-Control: no-store`` URL
  nostore-noop      stock mitmdump + an addon shaped like the cache (same nesting, same hooks)
                    doing nothing, asked for the no-store URL: what mitmproxy charges for
                    such an addon (scripts/baseline_noop_addon.py)
  fast-ceiling      the same memory answer under the fast launcher (scripts/run's default)
  fast-ceiling-asyncio  the same on asyncio's own event loop instead of uvloop
  fast-l1           scripts/run --l1-only (the fast launcher, uvloop when installed)
  fast-l1-asyncio   scripts/run --l1-only --no-uvloop
  l1-before         (--before DIR) another checkout's cache, L1 only, stock mitmdump
  l2-before         (--before DIR) another checkout's cache as ``l2`` (its own key prefix)
  l1-rules          (--rules N) the l1 proxy's config plus N cache_policy rules, the last matching

Every round measures every target once, the order rotated each round; a target's figure is
the median over rounds with its min–max, a ratio the median of the per-round ratios (min–max);
each target also shows the proxy's CPU per request (utime + stime from /proc over the requests
counted: what a hit costs the proxy, whatever else the machine runs).
Load: ``wrk -t1 -c16`` (keep-alive) when installed, else an asyncio load generator with the
same connection count. Install both tools with ``apt-get install -y nginx wrk``.

    .venv/bin/python scripts/bench.py [--rounds 5] [--seconds 5] [--conns 16] [--size 1024]
        [--only l1,fast-l1] [--before DIR] [--rules 50] [--python-load] [--python-origin]
    .venv/bin/python scripts/bench.py --flood [flood_cold_key.py options]   # origin requests per cold key
    .venv/bin/python scripts/bench.py --burst [--batches 5]   # 16 concurrent no-store requests, hit-for-pass on/off

A benchmark, not a test: it checks each target answers as expected (HIT/MISS) before measuring,
and prints a table in the README's format.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from mitmcache.valkey_nodes import ValkeyNode, die_with_parent, free_port, start_nodes  # noqa: E402
from tests.conftest import ENTRY, MITMDUMP, stop_process, wait_for_port  # noqa: E402

PYTHON = sys.executable
BASELINE = ROOT / "scripts" / "baseline_memory_addon.py"
BASELINE_GET = ROOT / "scripts" / "baseline_valkey_get_addon.py"
NOOP = ROOT / "scripts" / "baseline_noop_addon.py"
HOT, NOSTORE = "/hot", "/nostore"

# Ratios printed under the table: (label, numerator, denominator).
RATIOS = [
    ("L1 hit / ceiling", "l1", "ceiling"),
    ("L2 hit / ceiling", "l2", "ceiling"),
    ("ceiling with a bare GET / ceiling", "ceiling-get", "ceiling"),
    ("L2 hit / ceiling with a bare GET", "l2", "ceiling-get"),
    ("no-store, L1 only / no addon", "nostore-l1", "upstream"),
    ("no-store, with L2 / no addon", "nostore-l2", "upstream"),
    ("no-op addon with the cache's hooks / no addon", "nostore-noop", "upstream"),
    ("no-store, L1 only / no-op addon", "nostore-l1", "nostore-noop"),
    ("no-store, with L2 / no-op addon", "nostore-l2", "nostore-noop"),
    ("fast ceiling / stock ceiling", "fast-ceiling", "ceiling"),
    ("fast L1 hit / stock L1 hit", "fast-l1", "l1"),
    ("fast L1 hit / stock ceiling", "fast-l1", "ceiling"),
    ("fast L1 hit / fast ceiling", "fast-l1", "fast-ceiling"),
    ("fast L1 hit (asyncio loop) / stock L1 hit", "fast-l1-asyncio", "l1"),
    ("fast ceiling: uvloop / asyncio loop", "fast-ceiling", "fast-ceiling-asyncio"),
    ("fast L1 hit: uvloop / asyncio loop", "fast-l1", "fast-l1-asyncio"),
    ("L1 hit / before", "l1", "l1-before"),
    ("L2 hit / before", "l2", "l2-before"),
    ("L2 hit before / ceiling", "l2-before", "ceiling"),
    ("L1 hit with rules / L1 hit", "l1-rules", "l1"),
]


# ---------------------------------------------------------------- origins


def start_nginx(tmp: Path, port: int, size: int) -> subprocess.Popen[bytes]:
    """nginx serving two static 1 KiB bodies: /hot (max-age=3600) and /nostore (no-store)."""
    site = tmp / "site"
    site.mkdir(parents=True)
    for name in ("hot", "nostore"):
        (site / name).write_bytes(b"x" * size)
    for p in (tmp.parent, tmp, site, *site.iterdir()):
        p.chmod(0o755)  # nginx's workers run as nobody
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {site};
        default_type text/plain;
        location = /hot {{ add_header Cache-Control "max-age=3600"; }}
        location = /nostore {{ add_header Cache-Control "no-store"; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    wait_for_port(port, proc)
    return proc


def serve_python_origin(port: int, size: int) -> None:
    """A small keep-alive HTTP/1.1 origin on asyncio (when nginx is not installed)."""
    body = b"x" * size

    def response(cc: str) -> bytes:
        return (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: {cc}\r\n"
                f"Content-Length: {size}\r\n\r\n").encode() + body

    answers = {HOT: response("max-age=3600"), NOSTORE: response("no-store")}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1].decode(errors="replace").split("?")[0]
                writer.write(answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    """One proxy process (shared by the targets that use it) and the URL path it is asked for."""

    name: str
    port: int
    path: str
    expect: str | None  # X-Cache-Status the warm-up must see (None: no header)
    proc: subprocess.Popen[bytes]
    samples: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # proxy CPU (user + system) per request


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0.0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(argv: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    try:
        wait_for_port(port, proc, timeout=60)
    except Exception:
        stop_process(proc)
        raise RuntimeError(f"{argv[:3]} did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
    return proc


def proxy_args(port: int, origin: str, confdir: Path, *sets: str) -> list[str]:
    args = ["-q", "--mode", f"reverse:{origin}", "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", "connection_strategy=lazy", "--set", f"confdir={confdir}"]
    for s in sets:
        args += ["--set", s]
    return args


def fast_ceiling_main(argv: list[str]) -> int:
    """``bench.py _fast_ceiling [--no-uvloop] MITMDUMP-ARGS``: the fast launcher's chain with the
    memory-answering addon in the cache's place."""
    import importlib.util

    from mitmcache import fastdump

    spec = importlib.util.spec_from_file_location("baseline_memory_addon", BASELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    use_uvloop = "--no-uvloop" not in argv
    argv = [a for a in argv if a != "--no-uvloop"]
    return fastdump.run(argv, lambda: module.addons[0], use_uvloop)


def start_targets(args: argparse.Namespace, origin: str, nodes: list[ValkeyNode], tmp: Path) -> list[Target]:
    urls = ",".join(n.url for n in nodes)
    wanted = set(args.only.split(",")) if args.only else None

    def want(*names: str) -> bool:
        return wanted is None or any(n in wanted for n in names)

    targets: list[Target] = []

    def add(names: list[tuple[str, str, str | None]], argv_for: Callable[[int, Path], list[str]]) -> None:
        chosen = [n for n in names if want(n[0])]
        if not chosen:
            return
        port = free_port()
        work = tmp / chosen[0][0]
        work.mkdir()
        proc = spawn(argv_for(port, work / "conf"), port, work / "log.txt")
        targets.extend(Target(name, port, path, expect, proc) for name, path, expect in chosen)

    stock = [str(MITMDUMP)]
    add([("upstream", HOT, None)], lambda p, c: [*stock, *proxy_args(p, origin, c)])
    add([("ceiling", HOT, "HIT")], lambda p, c: [*stock, "-s", str(BASELINE), *proxy_args(p, origin, c)])
    add([("ceiling-get", HOT, "HIT")], lambda p, c: [*stock, "-s", str(BASELINE_GET),
                                                     *proxy_args(p, origin, c, f"bench_valkey_port={nodes[0].port}")])
    add([("nostore-noop", NOSTORE, None)], lambda p, c: [*stock, "-s", str(NOOP), *proxy_args(p, origin, c)])
    add([("l1", HOT, "HIT"), ("nostore-l1", NOSTORE, "MISS")],
        lambda p, c: [*stock, "-s", str(ENTRY), *proxy_args(p, origin, c)])
    add([("l2", HOT, "HIT"), ("nostore-l2", NOSTORE, "MISS")],
        lambda p, c: [*stock, "-s", str(ENTRY), *proxy_args(p, origin, c, f"cache_valkey_urls={urls}", "cache_l1_ttl=0")])
    if args.before is not None:
        before = args.before / "addon" / "mitmcache_addon.py"
        add([("l1-before", HOT, "HIT")], lambda p, c: [*stock, "-s", str(before), *proxy_args(p, origin, c)])
        add([("l2-before", HOT, "HIT")], lambda p, c: [*stock, "-s", str(before), *proxy_args(
            p, origin, c, f"cache_valkey_urls={urls}", "cache_l1_ttl=0", "cache_key_prefix=before")])
    if args.rules:
        rules = [f"cache_policy=|~d host{i}.example & ~u /api/v{i}/|ttl=5m swr=30s" for i in range(args.rules - 1)]
        rules.append(f"cache_policy=|~u {HOT}|ttl=1h name=bench")
        add([("l1-rules", HOT, "HIT")], lambda p, c: [*stock, "-s", str(ENTRY), *proxy_args(p, origin, c, *rules)])
    # The fast launcher's targets run as scripts/run starts it: with -O (no __debug__ type checks).
    me = [PYTHON, "-O", str(Path(__file__).resolve()), "_fast_ceiling"]
    add([("fast-ceiling", HOT, "HIT")], lambda p, c: [*me, *proxy_args(p, origin, c)])
    add([("fast-ceiling-asyncio", HOT, "HIT")], lambda p, c: [*me, "--no-uvloop", *proxy_args(p, origin, c)])
    launch = [PYTHON, "-O", "-m", "mitmcache.launch", "--l1-only"]
    add([("fast-l1", HOT, "HIT")], lambda p, c: [*launch, *proxy_args(p, origin, c)])
    add([("fast-l1-asyncio", HOT, "HIT")], lambda p, c: [*launch, "--no-uvloop", *proxy_args(p, origin, c)])
    return targets


# ---------------------------------------------------------------- load


def wrk_rps(port: int, path: str, seconds: float, conns: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{m.group(1)} error responses from 127.0.0.1:{port}{path}:\n{out}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk said:\n{out}")
    return float(m.group(1))


async def _connection(port: int, request: bytes, deadline: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"error response: {head[:200]!r}")
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            await reader.readexactly(int(m.group(1)) if m else 0)
            done += 1
    finally:
        writer.close()
    return done


def python_rps(port: int, path: str, seconds: float, conns: int) -> float:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def run() -> int:
        deadline = time.perf_counter() + seconds
        return sum(await asyncio.gather(*(_connection(port, request, deadline) for _ in range(conns))))

    return asyncio.run(run()) / seconds


# ---------------------------------------------------------------- report


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def report(targets: list[Target], rounds: int, how: str) -> None:
    by_name = {t.name: t for t in targets}
    print(f"\n{how}; {rounds} rounds, medians (min–max)\n")
    print("| target | req/s | min–max | proxy CPU µs/req |")
    print("|---|---|---|---|")
    for t in targets:
        print(f"| {t.name} | {statistics.median(t.samples):.0f} | {spread(t.samples, '{:.0f}')} "
              f"| {statistics.median(t.cpu_us):.0f} ({spread(t.cpu_us, '{:.0f}')}) |")
    print("\n| ratio | median | min–max |")
    print("|---|---|---|")
    for label, num, den in RATIOS:
        if num in by_name and den in by_name:
            per_round = [a / b for a, b in zip(by_name[num].samples, by_name[den].samples)]
            print(f"| {label} | {statistics.median(per_round):.2f} | {spread(per_round, '{:.2f}')} |")


# ---------------------------------------------------------------- burst (hit-for-pass)

BURST = 16
BURST_DELAY_MS = 200


async def _burst(port: int, path: str) -> float:
    """Seconds until all of BURST concurrent requests for ``path`` are answered."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=httpx.Limits(max_connections=BURST)) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(client.get(path) for _ in range(BURST)))
        elapsed = time.perf_counter() - start
    if any(a.status_code != 200 for a in answers):
        raise RuntimeError(f"burst: {[a.status_code for a in answers]}")
    return elapsed


def burst_main(batches: int) -> int:
    """16 concurrent requests for a ``no-store`` URL behind a 200 ms origin, in batches, with
    hit-for-pass on (the default) and off (``cache_hit_for_pass=0``: every batch waits behind
    one request's fetch first), each proxy on a Valkey ring. The first batch finds nothing;
    later ones find the marker."""
    from tests.conftest import start_proxy
    from tests.origin import start_origin

    origin = start_origin()
    nodes = start_nodes(3)
    tmp = Path(tempfile.mkdtemp(prefix="mitmcache-burst-"))
    urls = ",".join(n.url for n in nodes)
    proxies = {
        "hit-for-pass": start_proxy(tmp / "on", f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_metrics_port=0"),
        "off": start_proxy(tmp / "off", f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_metrics_port=0",
                           "cache_hit_for_pass=0"),
    }
    try:
        print(f"{BURST} concurrent GETs of a no-store URL, origin {BURST_DELAY_MS} ms; seconds per batch "
              "(first batch: nothing known yet) and origin requests\n")
        print("| proxy | first batch | later batches, median (min–max) | origin requests |")
        print("|---|---|---|---|")
        for name, proxy in proxies.items():
            path = f"/burst-{name}?cc=no-store&delay={BURST_DELAY_MS}"
            times = [asyncio.run(_burst(proxy.port, path)) for _ in range(batches)]
            later = times[1:]
            print(f"| {name} | {times[0]:.2f} | {statistics.median(later):.2f} ({min(later):.2f}–{max(later):.2f}) "
                  f"| {origin.count(path)} of {BURST * batches} |")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for n in nodes:
            n.stop()
        origin.stop()
    return 0


def main() -> int:
    if sys.argv[1:2] == ["_fast_ceiling"]:
        return fast_ceiling_main(sys.argv[2:])
    if sys.argv[1:2] == ["--flood"]:
        sys.path.insert(0, str(ROOT / "scripts"))
        import flood_cold_key

        sys.argv = [str(ROOT / "scripts" / "flood_cold_key.py"), *sys.argv[2:]]
        flood_cold_key.main()
        return 0
    if sys.argv[1:2] == ["--burst"]:
        batches = int(sys.argv[3]) if sys.argv[2:3] == ["--batches"] else 5
        return burst_main(batches)
    if sys.argv[1:2] == ["_origin"]:
        serve_python_origin(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5, help="seconds of load per target and round")
    parser.add_argument("--conns", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument("--only", help="comma-separated target names (default: all)")
    parser.add_argument("--before", type=Path, help="a checkout whose cache runs as 'l1-before'")
    parser.add_argument("--rules", type=int, default=0, help="also run 'l1-rules' with this many cache_policy rules")
    parser.add_argument("--python-load", action="store_true", help="the asyncio load generator even if wrk is installed")
    parser.add_argument("--python-origin", action="store_true", help="the asyncio origin even if nginx is installed")
    args = parser.parse_args()
    if args.before is not None and not (args.before / "addon" / "mitmcache_addon.py").is_file():
        parser.error(f"--before: no addon/mitmcache_addon.py in {args.before}")

    tmp = Path(tempfile.mkdtemp(prefix="mitmcache-bench-"))
    origin_port = free_port()
    if shutil.which("nginx") and not args.python_origin:
        origin_proc, origin_kind = start_nginx(tmp / "nginx", origin_port, args.size), "nginx"
    else:
        origin_proc = subprocess.Popen([PYTHON, __file__, "_origin", str(origin_port), str(args.size)],
                                       preexec_fn=die_with_parent)
        wait_for_port(origin_port, origin_proc)
        origin_kind = "asyncio origin"
    use_wrk = shutil.which("wrk") is not None and not args.python_load
    measure = wrk_rps if use_wrk else python_rps
    nodes: list[ValkeyNode] = start_nodes(3)
    targets: list[Target] = []
    try:
        targets = start_targets(args, f"http://127.0.0.1:{origin_port}", nodes, tmp)
        for t in targets:  # fill the cache, check the answer, warm up
            with httpx.Client(timeout=10) as c:
                for _ in range(2):
                    r = c.get(f"http://127.0.0.1:{t.port}{t.path}")
            got = r.headers.get("x-cache-status")
            if r.status_code != 200 or got != t.expect or len(r.content) != args.size:
                raise RuntimeError(f"{t.name}: expected 200 with X-Cache-Status {t.expect}, got {r.status_code} {got}")
            measure(t.port, t.path, 1.0, args.conns)
        for r_ in range(args.rounds):
            order = targets[r_ % len(targets):] + targets[: r_ % len(targets)]
            for t in order:
                cpu = proc_cpu_seconds(t.proc.pid)
                t.samples.append(measure(t.port, t.path, args.seconds, args.conns))
                t.cpu_us.append((proc_cpu_seconds(t.proc.pid) - cpu) / (t.samples[-1] * args.seconds) * 1e6)
                print(f"round {r_ + 1} {t.name:16} {t.samples[-1]:8.0f} req/s {t.cpu_us[-1]:6.0f} µs CPU/req", flush=True)
        how = (f"{'wrk -t1' if use_wrk else 'asyncio load'} -c{args.conns}, {args.size} B bodies, "
               f"{args.seconds:g} s per target and round, origin: {origin_kind}")
        report(targets, args.rounds, how)
    finally:
        for proc in {id(t.proc): t.proc for t in targets}.values():
            stop_process(proc)
        for n in nodes:
            n.stop()
        stop_process(origin_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
