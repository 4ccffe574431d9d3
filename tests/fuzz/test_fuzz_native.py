"""A short run of the native codec's fuzz target (the long one: see fuzz_native.py)."""

from __future__ import annotations

from tests.fuzz.fuzz_native import hypothesis_test, run_mutations


def test_hypothesis_2000_examples() -> None:
    hypothesis_test(2000)()


def test_mutations_20000_inputs() -> None:
    count, slowest = run_mutations(20_000, seed=1)
    assert count == 20_000
    assert slowest < 0.25
