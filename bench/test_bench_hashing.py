"""FNV-1a key hashing, compiled vs pure Python (run: make bench). It runs once per keyed publish."""

import pytest

from shoalmq._native import hashing, hashing_py

KEY = b"orders/eu-west/customer-4711"


@pytest.mark.parametrize("impl", [hashing, hashing_py], ids=["native", "pure"])
def test_partition_of_one_key(benchmark, impl) -> None:
    assert benchmark(impl.partition_of, KEY, 8) == hashing_py.partition_of(KEY, 8)
