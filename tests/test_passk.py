"""pass@k maths against brute force and textbook values."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from lightning_tina.passk import mean_pass_at_k, pass_at_1, pass_at_k, reported_ks


def _brute_pass_at_k(samples: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n: int) -> None:
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(samples, k), abs=1e-12)


def test_pass_at_k_edge_values() -> None:
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 8) == 1.0  # only 7 wrong samples: any 8 contain a correct one
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_1_is_mean_of_problem_means_with_stderr() -> None:
    per_problem = [[True, True, False, False], [True, False, False, False], [True, True, True, True]]
    means = [0.5, 0.25, 1.0]
    mean, err = pass_at_1(per_problem)
    assert mean == pytest.approx(statistics.mean(means))
    assert err == pytest.approx(statistics.stdev(means) / math.sqrt(3))


def test_pass_at_1_single_problem_has_nan_stderr_and_empty_fails() -> None:
    mean, err = pass_at_1([[True, False]])
    assert mean == 0.5 and math.isnan(err)
    with pytest.raises(ValueError, match="no problems"):
        pass_at_1([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        pass_at_1([[True], []])


def test_mean_pass_at_k_averages_problems() -> None:
    per_problem = [[True, False, False, False], [False] * 4]
    assert mean_pass_at_k(per_problem, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert mean_pass_at_k(per_problem, 1) == pytest.approx(pass_at_1(per_problem)[0])


def test_reported_ks() -> None:
    assert reported_ks(1) == [1]
    assert reported_ks(4) == [1, 2, 4]
    assert reported_ks(6) == [1, 2, 4, 6]
    assert reported_ks(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError):
        reported_ks(0)
