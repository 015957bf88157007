"""The Valkey value format: round trip, and garbage is a DecodeError, never anything else."""

from __future__ import annotations

import json
import random
import struct

import pytest

from mitmcache import codec
from mitmcache import semantics as sem

NOW = 1_800_000_000.0


def variant(lang: str, body: bytes) -> sem.StoredResponse:
    return sem.make_stored_response(
        200, "OK", [("Accept-Language", lang)],
        [("Cache-Control", "max-age=60, stale-if-error=30"), ("Vary", "Accept-Language"), ("ETag", '"e"')],
        body, NOW, NOW,
    )


def test_round_trip_keeps_every_field_and_raw_body() -> None:
    variants = (variant("en", b"\x00\xffbinary"), variant("de", b""))
    data = codec.encode(variants)
    assert b"\x00\xffbinary" in data  # raw, not base64
    assert codec.decode(data) == variants


def test_missing_vary_value_round_trips_as_none() -> None:
    v = sem.make_stored_response(200, "OK", [], [("Vary", "Origin"), ("Cache-Control", "max-age=1")], b"x", NOW, NOW)
    assert codec.decode(codec.encode((v,)))[0].vary == (("origin", None),)


GARBAGE = [
    b"",
    b"hello world",
    b"MCR",
    b"MCR\x02\x00\x01",  # unknown version
    b"MCR\x01\x00\x00",  # no variants
    b"MCR\x01\x00\x01\x00\x00\x00\x05{}",  # truncated
    b"\x80\x04\x95pickle",  # a pickle is just bytes to us
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode(data)


def _with_meta(meta: object) -> bytes:
    m = json.dumps(meta).encode()
    return b"MCR\x01\x00\x01" + struct.pack(">I", len(m)) + m + struct.pack(">I", 1) + b"x"


def test_wrong_types_in_metadata_are_rejected() -> None:
    good = json.loads(codec.encode((variant("en", b"x"),))[10:].split(b"\x00\x00\x00\x01x")[0])
    assert codec.decode(_with_meta(good))[0].status == 200
    for field, bad in [("status", "200"), ("freshness", None), ("headers", [["a"]]), ("never_serve_stale", 1),
                       ("status", 99999), ("etag", 5), ("vary", [["a", 1]]), ("freshness", 1e999)]:
        meta = dict(good, **{field: bad})
        with pytest.raises(codec.DecodeError):
            codec.decode(_with_meta(meta))
    with pytest.raises(codec.DecodeError):
        codec.decode(_with_meta([1, 2]))


def test_random_mutations_never_raise_anything_but_decode_error() -> None:
    data = codec.encode((variant("en", b"body" * 10),))
    rng = random.Random(7)
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        try:
            codec.decode(bytes(mutated))
        except codec.DecodeError:
            pass
