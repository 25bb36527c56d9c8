"""Paired differences against the baseline with confidence intervals, and where variance comes from.

Everything here reads the long score table (`prompt_index, prompt, method, kind, weight, seed, key,
metric, value`; `prompt_index` and `kind` are optional). A method@weight is compared with the
baseline on the same cells: the same (prompt, seed) for per-image metrics, the same prompt for
group metrics (diversity, one value per prompt's seed group). Pairing removes what the prompt and
the seed contribute to both, which is most of the spread of the pooled values.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
DELTA_COLUMNS = ("delta", "delta_lo", "delta_hi", "delta_n")
VARIANCE_SOURCES = ("prompt", "seed", "method@weight", "residual")


@lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (t_quantile(0.975, 3) = 3.182446...).

    Found by bisection on the tail probability P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2, with the
    regularized incomplete beta function I computed by its continued fraction: exact to ~1e-10.
    """
    if not (0.0 < p < 1.0) or not df > 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if _t_upper_tail(middle, df) > tail:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2.0


def _t_upper_tail(t: float, df: float) -> float:
    return 0.5 * _regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) (Numerical Recipes 6.4: continued fraction on the side where it converges fast)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def mean_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the non-missing `values`: the t-interval mean ± t(1 - α/2, n-1) · sd / √n.

    sd is the sample standard deviation (ddof=1). With n = 1 the interval is undefined (NaN, NaN);
    with n = 0 everything is NaN.
    """
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def baseline_methods(frame: pd.DataFrame) -> list[str]:
    """Labels of the methods of kind "baseline" in a score table or summary, in order.

    Tables without a `kind` column (written before it existed) fall
    back to the label "baseline"."""
    if "kind" in frame.columns:
        rows = frame[frame["kind"] == "baseline"]
    else:
        rows = frame[frame["method"] == "baseline"]
    return list(dict.fromkeys(rows["method"]))


def _prompt_column(scores: pd.DataFrame) -> str:
    return "prompt_index" if "prompt_index" in scores.columns and scores["prompt_index"].notna().all() else "prompt"


def paired_deltas(scores: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per (method, weight, metric): the mean paired difference against the baseline and its t-interval.

    Columns: method, weight, metric, delta, delta_lo, delta_hi, delta_n. A difference is this
    method@weight's value minus the baseline's on the same cell: the same (prompt, seed) for
    per-image metrics, the same prompt for group metrics (rows without a seed). `delta_n` counts
    the cells both have; lo and hi are NaN when delta_n < 2. The baseline is the first method of
    kind "baseline" (see `baseline_methods`); other baselines are compared with it like any
    method. Empty when the table has no baseline.
    """
    columns = ["method", "weight", "metric", *DELTA_COLUMNS]
    baselines = baseline_methods(scores)
    if not baselines:
        return pd.DataFrame(columns=columns)
    prompt = _prompt_column(scores)
    rows = []
    for metric, table in scores.dropna(subset=["value"]).groupby("metric", sort=False):
        units = [prompt] if table["seed"].isna().all() else [prompt, "seed"]
        reference = table[table["method"] == baselines[0]].groupby(units)["value"].mean()
        others = table[table["method"] != baselines[0]]
        for (method, weight), cell in others.groupby(["method", "weight"], sort=False, dropna=False):
            differences = cell.groupby(units)["value"].mean() - reference
            delta, low, high, n = mean_interval(differences.to_numpy(), confidence)
            rows.append((method, weight, metric, delta, low, high, n))
    return pd.DataFrame(rows, columns=columns)


def variance_shares(scores: pd.DataFrame) -> pd.DataFrame:
    """Per per-image metric, the share of its variance that comes from prompt, seed and method@weight.

    Columns: metric, source, share, n. A main-effects decomposition of the table of values indexed
    by (prompt, seed, method@weight): each source's sum of squares is Σ over its levels of
    (level size) × (level mean − grand mean)², and `residual` is what is left of the total sum of
    squares (the interactions: a seed that suits one method and not another, a prompt one method
    follows better). In a balanced table the four shares are ≥ 0 and sum to 1; to keep it
    balanced, method@weights that lack a (prompt, seed) cell present elsewhere are left out, and
    `n` says how many values were used. Group metrics (no seed) are not decomposed. Shares are
    NaN when every value is equal.
    """
    prompt = _prompt_column(scores)
    rows = []
    per_image = scores.dropna(subset=["seed", "value"])
    for metric, table in per_image.groupby("metric", sort=False):
        grid = table.groupby([prompt, "seed", "method", "weight"], dropna=False)["value"].mean().unstack(
            ["method", "weight"])
        prompts, seeds = table[prompt].unique(), table["seed"].unique()
        grid = grid.reindex(pd.MultiIndex.from_product([prompts, seeds])).dropna(axis=1, how="any")
        if grid.empty:
            continue
        values = grid.to_numpy(dtype=float).reshape(len(prompts), len(seeds), grid.shape[1])
        for source, share in zip(VARIANCE_SOURCES, _shares(values)):
            rows.append((metric, source, share, values.size))
    return pd.DataFrame(rows, columns=["metric", "source", "share", "n"])


def _shares(values: np.ndarray) -> list[float]:
    """Shares of the total sum of squares of a balanced 3-way table from its three main effects."""
    grand = values.mean()
    total = float(((values - grand) ** 2).sum())
    effects = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        level_means = values.mean(axis=others)
        effects.append(float(((level_means - grand) ** 2).sum()) * values.size / values.shape[axis])
    if total == 0.0:
        return [math.nan] * 4
    shares = [effect / total for effect in effects]
    return shares + [max(0.0, 1.0 - sum(shares))]


def delta_text(delta: float, low: float, high: float, n: int) -> str:
    """'Δ +0.0310 [+0.0120, +0.0500]'; 'Δ +0.0310 (1 pair: no interval)'; '' without paired cells.

    Four decimals: paired differences are often a hundred times smaller than the pooled spread."""
    if n == 0 or pd.isna(delta):
        return ""
    if pd.isna(low):
        return f"Δ {delta:+.4f} ({n} pair: no interval)"
    return f"Δ {delta:+.4f} [{low:+.4f}, {high:+.4f}]"


def verdict(low: float, high: float) -> str:
    """How an interval of a difference against the baseline reads: '' when it is undefined."""
    if pd.isna(low) or pd.isna(high):
        return ""
    if low > 0:
        return "above the baseline"
    if high < 0:
        return "below the baseline"
    return "not distinguishable from the baseline"
