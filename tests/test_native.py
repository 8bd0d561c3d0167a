"""The Cython modules: compiled and loaded, and in agreement with their pure-Python twins."""

import os
import random

import pytest

import shoalmq._native as native
from shoalmq._native import hashing_py, segment_py

IMPLEMENTATIONS = [pytest.param(native.hashing, id="native"), pytest.param(hashing_py, id="pure")]

# Published FNV-1a 32-bit test vectors.
FNV1A_32_VECTORS = {
    b"": 0x811C9DC5,
    b"a": 0xE40C292C,
    b"foobar": 0xBF9CF968,
    b"chongo was here!\n": 0xD49930D5,
}


def test_compiled_module_is_loaded() -> None:
    if os.environ.get("SHOALMQ_PURE_PYTHON"):
        pytest.skip("suite asked to run against the pure-Python twins")
    assert not native.PURE_PYTHON
    for module in (native.hashing, native.mqtt_codec, native.ring, native.segment):
        assert module.__file__.endswith(".so"), module.__file__


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_fnv1a_32_vectors(impl) -> None:
    for data, expected in FNV1A_32_VECTORS.items():
        assert impl.fnv1a_32(data) == expected, data


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_accepts_any_bytes_like(impl) -> None:
    assert impl.fnv1a_32(bytearray(b"foobar")) == impl.fnv1a_32(memoryview(b"xfoobar")[1:]) == 0xBF9CF968


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_partition_of_is_in_range_and_rejects_bad_counts(impl) -> None:
    for n in (1, 2, 7, 8, 1024):
        for key in (b"", b"k", b"orders/eu/42"):
            assert 0 <= impl.partition_of(key, n) < n
    with pytest.raises(ValueError, match="partitions must be positive"):
        impl.partition_of(b"k", 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_rejects_what_is_not_bytes_like(impl) -> None:
    for bad in ("text", None, 5):
        with pytest.raises(TypeError):
            impl.fnv1a_32(bad)
        with pytest.raises(TypeError):
            impl.partition_of(bad, 8)


def test_native_and_pure_agree_on_random_input() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(0, 80))
        n = rng.randrange(1, 64)
        assert native.hashing.fnv1a_32(data) == hashing_py.fnv1a_32(data)
        assert native.hashing.partition_of(data, n) == hashing_py.partition_of(data, n)


def test_keys_spread_evenly_over_partitions() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[native.partition_of(f"key-{i}".encode(), 8)] += 1
    assert min(counts) > 800 and max(counts) < 1200, counts


SEGMENT_IMPLEMENTATIONS = [pytest.param(native.segment, id="native"), pytest.param(segment_py, id="pure")]


@pytest.mark.parametrize("impl", SEGMENT_IMPLEMENTATIONS)
def test_segment_round_trip(impl) -> None:
    for payloads in ([], [b""], [b"a"], [b"", b"abc", b"\x00" * 70_000, b"z"]):
        value = impl.pack(payloads)
        assert len(value) == 4 + 4 * len(payloads) + sum(map(len, payloads))
        assert impl.unpack(value) == payloads


@pytest.mark.parametrize("impl", SEGMENT_IMPLEMENTATIONS)
def test_segment_layout_is_big_endian_count_lengths_payloads(impl) -> None:
    assert impl.pack([b"ab", b"c"]) == b"\x00\x00\x00\x02" b"\x00\x00\x00\x02" b"\x00\x00\x00\x01" b"abc"


@pytest.mark.parametrize("impl", SEGMENT_IMPLEMENTATIONS)
def test_corrupt_segments_are_refused(impl) -> None:
    good = impl.pack([b"abc", b"de"])
    for bad in (b"", b"\x00\x00", good[:-1], good + b"x", b"\xff\xff\xff\xff" + good[4:], b"\x00\x00\x00\x01"):
        with pytest.raises(ValueError, match="corrupt segment"):
            impl.unpack(bad)


@pytest.mark.parametrize("impl", SEGMENT_IMPLEMENTATIONS)
def test_segment_type_errors(impl) -> None:
    for bad in ([b"ok", "text"], [bytearray(b"x")], [None]):
        with pytest.raises(TypeError):
            impl.pack(bad)
    with pytest.raises(TypeError):
        impl.pack((b"a",))
    with pytest.raises(TypeError):
        impl.unpack(bytearray(b"\x00\x00\x00\x00"))


def test_segment_native_and_pure_agree_on_random_input() -> None:
    rng = random.Random(11)
    for _ in range(300):
        payloads = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(0, 40))]
        value = native.segment.pack(payloads)
        assert value == segment_py.pack(payloads)
        assert native.segment.unpack(value) == segment_py.unpack(value) == payloads
