"""The Valkey value format: versioned, self-describing, raw bodies, nothing executable.

    b"MCR" version:u8=2 count:u16 key:16 bytes checksum:u64
    { meta_len:u32 meta:JSON body_len:u32 body:bytes }*count

A hit-for-pass marker (``store.HitForPass``) lives under the same key, so the one L2 read a
lookup makes finds either:

    b"MCP" version:u8=1 key:16 bytes until:f64 (epoch seconds) reason:ASCII (≤ 32 bytes)

``key`` is the xxh3-128 digest of the cache key the value was written for, and ``checksum`` the
xxh3-64 of everything after the header: a value copied under another key, or bytes that changed
and still decode, is refused. JSON metadata is parsed with ``json.loads`` and every field is
type-checked; bodies are raw bytes (no base64, reference W22). Nothing is unpickled or
evaluated. Anything that does not match exactly raises DecodeError, which the store counts as a
miss. (The checksum finds accidents and copies, not forgery: whoever can write to Valkey can
compute it; see README, Security model.)
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import OrderedDict
from typing import Any

import xxhash

from .semantics import StoredResponse

MAGIC = b"MCR"
VERSION = 2
PASS_MAGIC = b"MCP"
PASS_VERSION = 1
_PASS_HEAD = struct.Struct(">3sB16sd")
_HEAD = struct.Struct(">3sBH16sQ")
_LEN = struct.Struct(">I")

# field → accepted types (bool is checked before int, since bool is an int subclass)
_SCALARS: dict[str, tuple[type, ...]] = {
    "status": (int,),
    "reason": (str,),
    "request_time": (int, float),
    "response_time": (int, float),
    "initial_age": (int, float),
    "freshness": (int, float),
    "stale_while_revalidate": (int, float),
    "stale_if_error": (int, float),
    "never_serve_stale": (bool,),
    "requires_revalidation": (bool,),
    "heuristic": (bool,),
}


class DecodeError(ValueError):
    pass


def _meta(entry: StoredResponse) -> bytes:
    meta: dict[str, Any] = {name: getattr(entry, name) for name in _SCALARS}
    meta["headers"] = [list(h) for h in entry.headers]
    meta["vary"] = [list(v) for v in entry.vary]
    meta["etag"] = entry.etag
    meta["last_modified"] = entry.last_modified
    return json.dumps(meta, separators=(",", ":")).encode()


def key_digest(key: str) -> bytes:
    return xxhash.xxh3_128_digest(key.encode("utf-8", "surrogateescape"))


def encode(variants: tuple[StoredResponse, ...], key: str) -> bytes:
    """The value of ``key`` holding ``variants``."""
    parts: list[bytes] = []
    for entry in variants:
        meta = _meta(entry)
        parts += [_LEN.pack(len(meta)), meta, _LEN.pack(len(entry.body)), entry.body]
    payload = b"".join(parts)
    return _HEAD.pack(MAGIC, VERSION, len(variants), key_digest(key), xxhash.xxh3_64_intdigest(payload)) + payload


def _pairs(value: Any, second_optional: bool) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, list):
        raise DecodeError("expected a list of pairs")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not (isinstance(item[1], str) or (second_optional and item[1] is None))
        ):
            raise DecodeError("malformed pair")
        out.append((item[0], item[1]))
    return tuple(out)


def _entry(meta_bytes: bytes, body: bytes) -> StoredResponse:
    try:
        meta = json.loads(meta_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DecodeError(f"metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DecodeError("metadata is not an object")
    fields: dict[str, Any] = {}
    for name, types in _SCALARS.items():
        value = meta.get(name)
        if types == (bool,):
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, types) and not isinstance(value, bool)
            ok = ok and (not isinstance(value, float) or math.isfinite(value))
        if not ok:
            raise DecodeError(f"field {name!r} missing or of the wrong type")
        fields[name] = value
    if not 100 <= fields["status"] <= 999:
        raise DecodeError("status out of range")
    for name in ("etag", "last_modified"):
        value = meta.get(name)
        if value is not None and not isinstance(value, str):
            raise DecodeError(f"field {name!r} of the wrong type")
        fields[name] = value
    fields["headers"] = _pairs(meta.get("headers"), second_optional=False)
    fields["vary"] = _pairs(meta.get("vary"), second_optional=True)
    return StoredResponse(body=body, **fields)


def decode(data: bytes, key: str) -> tuple[StoredResponse, ...]:
    """The variants stored under ``key``. Raises DecodeError for anything else."""
    view = memoryview(data)
    if len(view) < 4:
        raise DecodeError("value too short")
    if bytes(view[:3]) != MAGIC:
        raise DecodeError("not a mitmcache value")
    if view[3] != VERSION:
        raise DecodeError(f"unsupported format version {view[3]}")
    if len(view) < _HEAD.size:
        raise DecodeError("value too short")
    _, _, count, digest, checksum = _HEAD.unpack_from(view, 0)
    if count == 0:
        raise DecodeError("no variants")
    if digest != key_digest(key):
        raise DecodeError("value written for another key")
    if xxhash.xxh3_64_intdigest(view[_HEAD.size :]) != checksum:
        raise DecodeError("checksum mismatch")
    offset = _HEAD.size
    variants = []

    def take() -> bytes:
        nonlocal offset
        if offset + _LEN.size > len(view):
            raise DecodeError("truncated value")
        (length,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if offset + length > len(view):
            raise DecodeError("truncated value")
        chunk = bytes(view[offset : offset + length])
        offset += length
        return chunk

    for _ in range(count):
        meta = take()
        body = take()
        variants.append(_entry(meta, body))
    if offset != len(view):
        raise DecodeError("trailing bytes after the last variant")
    return tuple(variants)


class DecodeMemo:
    """Values decoded recently, by header (format, variant count, key digest, checksum): an L2
    hit on bytes already decoded costs one checksum of the payload instead of a JSON parse and
    type checks per variant (issue 12, "a cheaper L2 hit"). A value that changed in any byte
    fails the checksum and is decoded afresh, so this holds nothing L2 does not. Bounded by
    ``max_bytes`` of encoded values; values above 1/16 of it are never kept."""

    def __init__(self, max_bytes: int = 16 << 20) -> None:
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[bytes, tuple[str, int, tuple[StoredResponse, ...]]] = OrderedDict()

    def decode(self, data: bytes, key: str) -> tuple[StoredResponse, ...]:
        """``decode(data, key)``, from memory when these exact bytes were decoded for ``key``.
        Raises DecodeError like ``decode``."""
        head = bytes(data[: _HEAD.size])
        known = self._items.get(head)
        if known is not None and known[0] == key and known[1] == len(data):
            (checksum,) = struct.unpack_from(">Q", head, _HEAD.size - 8)
            if xxhash.xxh3_64_intdigest(memoryview(data)[_HEAD.size :]) == checksum:
                self._items.move_to_end(head)
                return known[2]
        variants = decode(data, key)
        if len(data) <= self.max_bytes // 16:
            old = self._items.pop(head, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[head] = (key, len(data), variants)
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (_, size, _) = self._items.popitem(last=False)
                self._bytes -= size
        return variants


def is_pass_marker(data: bytes) -> bool:
    return data[:3] == PASS_MAGIC


def encode_pass(key: str, until: float, reason: str) -> bytes:
    """The hit-for-pass marker of ``key``: pass until ``until`` (epoch seconds) because of
    ``reason`` (a Cache-Status not-stored detail)."""
    return _PASS_HEAD.pack(PASS_MAGIC, PASS_VERSION, key_digest(key), until) + reason.encode("ascii")[:32]


def decode_pass(data: bytes, key: str) -> tuple[float, str]:
    """(until, reason) of a marker written for ``key``. Raises DecodeError for anything else."""
    if len(data) < _PASS_HEAD.size or len(data) > _PASS_HEAD.size + 32:
        raise DecodeError("malformed hit-for-pass marker")
    magic, version, digest, until = _PASS_HEAD.unpack_from(data, 0)
    if magic != PASS_MAGIC or version != PASS_VERSION:
        raise DecodeError("not a hit-for-pass marker")
    if digest != key_digest(key):
        raise DecodeError("value written for another key")
    reason = data[_PASS_HEAD.size :]
    if not math.isfinite(until) or not re.fullmatch(rb"[a-z0-9-]*", reason):
        raise DecodeError("malformed hit-for-pass marker")
    return until, reason.decode("ascii")
