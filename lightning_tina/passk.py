"""pass@k from per-problem correctness: the mean over samples with its standard error, and the unbiased estimator.

Notation: P problems; problem i has n_i samples of which c_i are correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al., 2021): the chance that k of the n samples, drawn without
    replacement, contain at least one correct one.

        pass@k = 1 - C(n - c, k) / C(n, k)

    which is 1 when n - c < k. Computed with exact integer binomials.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (samples per problem), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _counts(per_problem: Sequence[Sequence[bool]]) -> list[tuple[int, int]]:
    """(n_i, c_i) for every problem; every problem must have at least one sample."""
    if not per_problem:
        raise ValueError("no problems to score")
    counts = []
    for i, samples in enumerate(per_problem):
        if len(samples) == 0:
            raise ValueError(f"problem {i} has no samples")
        counts.append((len(samples), sum(bool(s) for s in samples)))
    return counts


def pass_at_1(per_problem: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """pass@1 as the mean over problems of the per-problem accuracy, and its standard error.

        p_i = c_i / n_i
        pass@1 = (1/P) sum_i p_i
        stderr = std(p_1..p_P, ddof=1) / sqrt(P)

    The standard error is that of a mean over problems: it counts the spread between problems together with the
    sampling noise inside each p_i, and shrinks with more problems, not with more samples per problem alone.
    It is NaN for a single problem (no spread can be measured).
    """
    p = [c / n for n, c in _counts(per_problem)]
    mean = sum(p) / len(p)
    if len(p) < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in p) / (len(p) - 1)
    return mean, math.sqrt(var / len(p))


def mean_pass_at_k(per_problem: Sequence[Sequence[bool]], k: int) -> float:
    """Benchmark pass@k: (1/P) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)] (see `pass_at_k`)."""
    counts = _counts(per_problem)
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def reported_ks(n: int) -> list[int]:
    """The k values worth reporting for n samples per problem: powers of two below n, and n itself."""
    if n < 1:
        raise ValueError(f"samples per problem must be >= 1, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return ks + [n]
