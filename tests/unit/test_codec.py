"""The Valkey value format: round trip, and garbage is a DecodeError, never anything else."""

from __future__ import annotations

import json
import random
import struct

import pytest
import xxhash

from mitmcache import codec
from mitmcache import semantics as sem

NOW = 1_800_000_000.0
KEY = "http://o.example/r"


def variant(lang: str, body: bytes) -> sem.StoredResponse:
    return sem.make_stored_response(
        200, "OK", [("Accept-Language", lang)],
        [("Cache-Control", "max-age=60, stale-if-error=30"), ("Vary", "Accept-Language"), ("ETag", '"e"')],
        body, NOW, NOW,
    )


def test_round_trip_keeps_every_field_and_raw_body() -> None:
    variants = (variant("en", b"\x00\xffbinary"), variant("de", b""))
    data = codec.encode(variants, KEY)
    assert b"\x00\xffbinary" in data  # raw, not base64
    assert codec.decode(data, KEY) == variants


def test_missing_vary_value_round_trips_as_none() -> None:
    v = sem.make_stored_response(200, "OK", [], [("Vary", "Origin"), ("Cache-Control", "max-age=1")], b"x", NOW, NOW)
    assert codec.decode(codec.encode((v,), KEY), KEY)[0].vary == (("origin", None),)


def test_a_value_copied_under_another_key_is_refused() -> None:
    data = codec.encode((variant("en", b"tenant a's body"),), KEY)
    with pytest.raises(codec.DecodeError, match="another key"):
        codec.decode(data, "http://o.example/other")


def test_a_changed_byte_that_still_decodes_is_refused() -> None:
    data = bytearray(codec.encode((variant("en", b"body"),), KEY))
    data[data.index(b"body")] = ord("B")  # still a valid value, but not what was written
    with pytest.raises(codec.DecodeError, match="checksum"):
        codec.decode(bytes(data), KEY)


def test_a_version_1_value_is_a_clean_miss() -> None:
    with pytest.raises(codec.DecodeError, match="version 1"):
        codec.decode(b"MCR\x01\x00\x01" + b"\x00" * 40, KEY)


GARBAGE = [
    b"",
    b"hello world",
    b"MCR",
    b"MCR\x09\x00\x01",  # unknown version
    b"MCR\x02\x00\x00" + b"\x00" * 24,  # no variants
    b"MCR\x02\x00\x01" + codec.key_digest(KEY) + b"\x00" * 8 + b"\x00\x00\x00\x05{}",  # truncated
    b"\x80\x04\x95pickle",  # a pickle is just bytes to us
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode(data, KEY)


def _with_meta(meta: object) -> bytes:
    """A value with this metadata, a correct key digest and checksum (only the types are wrong)."""
    m = json.dumps(meta).encode()
    payload = struct.pack(">I", len(m)) + m + struct.pack(">I", 1) + b"x"
    head = b"MCR\x02\x00\x01" + codec.key_digest(KEY) + struct.pack(">Q", xxhash.xxh3_64_intdigest(payload))
    return head + payload


def test_wrong_types_in_metadata_are_rejected() -> None:
    data = codec.encode((variant("en", b"x"),), KEY)
    good = json.loads(data[34:].split(b"\x00\x00\x00\x01x")[0])
    assert codec.decode(_with_meta(good), KEY)[0].status == 200
    for field, bad in [("status", "200"), ("freshness", None), ("headers", [["a"]]), ("never_serve_stale", 1),
                       ("status", 99999), ("etag", 5), ("vary", [["a", 1]]), ("freshness", 1e999)]:
        meta = dict(good, **{field: bad})
        with pytest.raises(codec.DecodeError):
            codec.decode(_with_meta(meta), KEY)
    with pytest.raises(codec.DecodeError):
        codec.decode(_with_meta([1, 2]), KEY)


def test_random_mutations_never_raise_anything_but_decode_error() -> None:
    data = codec.encode((variant("en", b"body" * 10),), KEY)
    rng = random.Random(7)
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        try:
            codec.decode(bytes(mutated), KEY)
        except codec.DecodeError:
            pass


# ----------------------------------------------------------------------------- hit-for-pass


def test_pass_marker_round_trips_and_is_told_apart() -> None:
    data = codec.encode_pass(KEY, 1234.5, "no-store")
    assert codec.is_pass_marker(data) and not codec.is_pass_marker(codec.encode((), KEY))
    assert codec.decode_pass(data, KEY) == (1234.5, "no-store")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d[:-1] + b"!", id="reason outside [a-z0-9-]"),
        pytest.param(lambda d: d[:10], id="truncated"),
        pytest.param(lambda d: d + b"x" * 40, id="reason too long"),
        pytest.param(lambda d: d[:3] + b"\x09" + d[4:], id="unknown version"),
        pytest.param(lambda d: d[:20] + struct.pack(">d", float("nan")) + d[28:], id="until not finite"),
    ],
)
def test_malformed_pass_marker_is_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(codec.DecodeError):
        codec.decode_pass(mutate(codec.encode_pass(KEY, 1234.5, "no-store")), KEY)


def test_pass_marker_written_for_another_key_is_refused() -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_pass(codec.encode_pass("http://o.example/other", 1.0, "private"), KEY)


# ----------------------------------------------------------------------------- decode memo


def test_memo_answers_the_same_bytes_from_memory_and_nothing_else() -> None:
    memo = codec.DecodeMemo()
    data = codec.encode((variant("en", b"first"),), KEY)
    first = memo.decode(data, KEY)
    assert memo.decode(data, KEY) is first  # from memory: no second parse
    # Same header (count, key digest, checksum field) over other payload bytes: refused.
    tampered = bytearray(data)
    tampered[-1] ^= 1
    with pytest.raises(codec.DecodeError):
        memo.decode(bytes(tampered), KEY)
    with pytest.raises(codec.DecodeError):
        memo.decode(data, "http://o.example/other")  # remembered for KEY only


def test_memo_stays_within_its_budget() -> None:
    memo = codec.DecodeMemo(max_bytes=16 * 2000)
    for i in range(50):
        memo.decode(codec.encode((variant("en", b"x" * 1000 + str(i).encode()),), KEY), KEY)
    assert memo._bytes <= memo.max_bytes and len(memo._items) < 50
    big = codec.encode((variant("en", b"y" * 5000),), KEY)
    memo.decode(big, KEY)
    assert memo.decode(big, KEY) is not memo.decode(big, KEY)  # above 1/16 of the budget: never kept
