"""The statistics of an evaluation, on per-sample values: scipy does the resampling.

A metric is a ratio over samples, `sum(values) / sum(weights)`: a mean score (every weight 1), or a
token-weighted loss (per-sample NLL sums over per-sample target-token counts), optionally mapped
through a monotone `transform` (exp for perplexity). Models are compared on the samples both
scored, paired by sample id:

- `estimate`: the metric of one model with a bootstrap confidence interval (BCa; percentile when
  BCa is undefined), resampling samples with their weights.
- `paired`: the difference candidate - baseline with a paired bootstrap interval, and a two-sided
  paired permutation test (each sample's two values swapped at random: exact for up to 13 samples,
  Monte Carlo beyond). Both share the weights, so the statistic's numerator is what is permuted.
- `pass_at_k`: the unbiased estimator of Chen et al. (2021) from n samples of which c passed.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
from scipy import stats


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from the n passes), c of n passing:
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _identity(x):
    return x


def _interval(data: tuple, statistic: Callable, *, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Bootstrap CI of `statistic(*data, axis)` with the samples resampled jointly (paired)."""
    kw = dict(paired=True, vectorized=True, confidence_level=confidence, n_resamples=resamples,
              random_state=np.random.default_rng(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate data: BCa is undefined, handled below
        ci = stats.bootstrap(data, statistic, method="BCa", **kw).confidence_interval
        if not (np.isfinite(ci.low) and np.isfinite(ci.high)):
            ci = stats.bootstrap(data, statistic, method="percentile", **kw).confidence_interval
    return float(ci.low), float(ci.high)


def estimate(values, weights=None, *, transform: Callable = _identity, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> dict:
    """{value, n, ci_low, ci_high} of transform(sum(values) / sum(weights))."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"value": None, "n": 0, "ci_low": None, "ci_high": None}
    value = float(transform(v.sum() / w.sum()))
    if n < 2 or np.ptp(v / w) == 0:  # one sample, or all the same: no spread to resample
        return {"value": value, "n": n, "ci_low": value, "ci_high": value}

    def stat(v, w, axis=-1):
        return transform(v.sum(axis=axis) / w.sum(axis=axis))

    low, high = _interval((v, w), stat, confidence=confidence, resamples=resamples, seed=seed)
    return {"value": value, "n": n, "ci_low": low, "ci_high": high}


def paired(baseline, candidate, weights=None, *, transform: Callable = _identity, confidence: float = 0.95,
           resamples: int = 2000, permutations: int = 9999, seed: int = 0) -> dict:
    """{difference, ci_low, ci_high, p_value, n} of the candidate's metric minus the baseline's on
    the same samples (aligned arrays; `weights` shared, e.g. the same target tokens)."""
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired: {len(a)} baseline values and {len(b)} candidate values")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    n = len(a)
    if n == 0:
        return {"difference": None, "ci_low": None, "ci_high": None, "p_value": None, "n": 0}
    diff = float(transform(b.sum() / w.sum()) - transform(a.sum() / w.sum()))
    if np.all(a == b):  # identical on every sample (a model against itself): nothing differs
        return {"difference": diff, "ci_low": diff, "ci_high": diff, "p_value": 1.0, "n": n}
    if n < 2:
        return {"difference": diff, "ci_low": None, "ci_high": None, "p_value": None, "n": n}

    def stat(a, b, w, axis=-1):
        total = w.sum(axis=axis)
        return transform(b.sum(axis=axis) / total) - transform(a.sum(axis=axis) / total)

    low, high = _interval((a, b, w), stat, confidence=confidence, resamples=resamples, seed=seed)

    def numerator(x, y, axis=-1):  # with the weights fixed, a monotone function of the difference
        return y.sum(axis=axis) - x.sum(axis=axis)

    test = stats.permutation_test((a, b), numerator, permutation_type="samples", vectorized=True,
                                  n_resamples=permutations, alternative="two-sided", random_state=np.random.default_rng(seed))
    return {"difference": diff, "ci_low": low, "ci_high": high, "p_value": float(test.pvalue), "n": n}
