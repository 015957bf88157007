"""Client-side rendezvous (HRW) hashing over Valkey nodes.

Every proxy computes the same owner for a key from the same node list, in any order: a node's
score for a key depends only on the node's name and the key. Adding or removing one node moves
only the keys whose highest score changes, about 1/N of them (peers.md §3: the minimal fraction,
balance within ~1 %), unlike the reference's contiguous slot ranges (W11).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import xxhash


class ValkeyURLError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One ring node parsed from ``valkey[s]://[user:password@]host:port[/db]``."""

    host: str
    port: int
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def name(self) -> str:
        """Identity on the ring and in logs/metrics: never contains credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'valkeys' if self.tls else 'valkey'}://{host}:{self.port}/{self.db}"

    def __repr__(self) -> str:  # keep passwords out of reprs and tracebacks
        return f"NodeAddress({self.name})"


def parse_valkey_url(url: str) -> NodeAddress:
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValkeyURLError(f"invalid Valkey URL {_redact(url)!r}: {e}") from None
    if parts.scheme not in ("valkey", "valkeys"):
        raise ValkeyURLError(f"invalid Valkey URL {_redact(url)!r}: scheme must be valkey:// or valkeys://")
    if not parts.hostname:
        raise ValkeyURLError(f"invalid Valkey URL {_redact(url)!r}: no host")
    if port is None:
        raise ValkeyURLError(f"invalid Valkey URL {_redact(url)!r}: no port")
    if parts.query or parts.fragment:
        raise ValkeyURLError(f"invalid Valkey URL {_redact(url)!r}: query strings are not supported")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValkeyURLError(f"invalid Valkey URL {_redact(url)!r}: the path must be a database number")
    return NodeAddress(
        host=parts.hostname,
        port=port,
        db=int(path) if path else 0,
        tls=parts.scheme == "valkeys",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def parse_valkey_urls(value: str) -> list[NodeAddress]:
    """Comma-separated URLs → nodes, rejecting duplicates (same node twice skews the ring)."""
    nodes = [parse_valkey_url(u) for u in value.split(",") if u.strip()]
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValkeyURLError(f"cache_valkey_urls lists the same node twice: {', '.join(dupes)}")
    return nodes


def _redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, hostpart = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}" if ":" in creds else url


class Ring:
    """Rendezvous hashing: owner(key) = the node with the highest xxh64(key, seed=node)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        self._seeds = {n: xxhash.xxh64_intdigest(n.encode()) for n in self.names}

    def ranked(self, key: bytes) -> list[str]:
        """All nodes, best first (a natural fallback order)."""
        return sorted(self.names, key=lambda n: xxhash.xxh64_intdigest(key, seed=self._seeds[n]), reverse=True)

    def owner(self, key: bytes) -> str:
        if not self.names:
            raise LookupError("the ring has no nodes")
        best, best_score = "", -1
        for name, seed in self._seeds.items():
            score = xxhash.xxh64_intdigest(key, seed=seed)
            if score > best_score:
                best, best_score = name, score
        return best

