"""Summaries of a scored grid, the Pareto front between two metrics, and a suggested weight.

Everything here reads the long score table (`prompt, method, weight, seed, metric, value`) or the
summary built from it; nothing touches a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .stats import DELTA_COLUMNS, delta_text, paired_deltas, verdict

CELL_KEYS = ["method", "weight"]


def metric_label(name: str) -> str:
    """How a metric is written for people, as its class declares it: 'dino' -> 'DINO' (unknown: the name)."""
    from .metrics import METRICS  # loads torch: only when a label is asked for

    return getattr(METRICS.get(name), "label", name)


def frontier_axes(scores: pd.DataFrame) -> tuple[str, str] | None:
    """(x, y) for the frontier: DINO (else CLIP-I) against CLIP-T; None if those were not scored."""
    metrics = set(scores["metric"])
    x = "dino" if "dino" in metrics else "clip_i" if "clip_i" in metrics else None
    return (x, "clip_t") if x and "clip_t" in metrics else None


def metric_levels(scores: pd.DataFrame | None) -> dict[str, str]:
    """metric -> "image" or "group": from the scores (a group value has no image key), else the registry."""
    from .metrics import METRICS

    if scores is None or scores.empty:
        return {name: getattr(cls, "level", "image") for name, cls in METRICS.items()}
    keyed = scores.groupby("metric", sort=False)["key"].apply(lambda keys: keys.notna().any())
    return {name: "image" if has_key else "group" for name, has_key in keyed.items()}


def scored_metrics(scores: pd.DataFrame | None = None) -> list[str]:
    """The metrics a table or plot menu shows, in order: every metric scored (before a run, every registered one).

    The default x axis first, the other image-fidelity metrics, then prompt fidelity, other
    per-image metrics, and group metrics (diversity) last.
    """
    from .metrics import METRICS

    levels = metric_levels(scores)
    axes = frontier_axes(pd.DataFrame({"metric": list(levels)})) or (None, None)
    registry = list(METRICS)

    def axis(name: str) -> str | None:
        return getattr(METRICS.get(name), "axis", None)

    def rank(name: str) -> int:
        if name == axes[0]:
            return 0
        if levels[name] != "image":
            return 4
        return {"image_fidelity": 1, "prompt_fidelity": 2}.get(axis(name), 2 if name == axes[1] else 3)

    return sorted(levels, key=lambda name: (rank(name), registry.index(name) if name in registry else len(registry),
                                            name))


def x_axis_metrics(scores: pd.DataFrame | None = None) -> list[str]:
    """The image-fidelity axes a frontier may use: every per-image metric scored, except prompt fidelity."""
    from .metrics import METRICS

    levels = metric_levels(scores)
    y = (frontier_axes(pd.DataFrame({"metric": list(levels)})) or (None, None))[1]
    return [name for name in scored_metrics(scores) if levels[name] == "image" and name != y
            and getattr(METRICS.get(name), "axis", None) != "prompt_fidelity"]


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Boolean mask over `points`: True where no other point is >= on both columns and > on one.

    Both columns are maximised. Equal points do not dominate each other, so duplicates on the
    front are all on it, and duplicates behind it are all off it. A point with NaN in x or y is
    off the front and dominates nothing.
    """
    xs = points[x].to_numpy(dtype=float)
    ys = points[y].to_numpy(dtype=float)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    # dominated_by[i, j]: point j dominates point i.
    at_least = (xs[None, :] >= xs[:, None]) & (ys[None, :] >= ys[:, None])
    better = (xs[None, :] > xs[:, None]) | (ys[None, :] > ys[:, None])
    dominated_by = at_least & better & valid[None, :]
    return pd.Series(valid & ~dominated_by.any(axis=1), index=points.index, name="on_pareto_front")


def summarize(scores: pd.DataFrame, x: str = "dino", y: str = "clip_t") -> pd.DataFrame:
    """One row per (method, weight), pooling prompts and seeds.

    For each metric: `<metric>_mean`, `<metric>_std` (sample std, ddof=1; NaN for n=1) and
    `<metric>_n` (how many non-NaN values were pooled: images for per-image metrics, groups for
    diversity); then the paired difference against the baseline on matching cells,
    `<metric>_delta` with its 95% t-interval `<metric>_delta_lo`, `<metric>_delta_hi` and the
    number of pairs `<metric>_delta_n` (see `stats.paired_deltas`; NaN on the baseline's own row
    and without a baseline). `kind` follows `method` when the score table has it.
    `on_pareto_front` is the front of the x and y means (both maximised). Methods keep the order
    they first appear in; weights ascend within a method.
    """
    metrics = list(dict.fromkeys(scores["metric"]))
    for axis_name, metric in (("x", x), ("y", y)):
        if metric not in metrics:
            raise ValueError(f"summarize: {axis_name}={metric!r} was not scored (scored: {', '.join(metrics)}); "
                             f"pass {axis_name}= one of those")
    stats = (
        scores.groupby(CELL_KEYS + ["metric"], sort=False, dropna=False)["value"]
        .agg(mean="mean", std="std", n="count")  # pandas std is the sample std (ddof=1)
        .unstack("metric")
    )
    summary = pd.DataFrame(index=stats.index)
    for metric in metrics:
        summary[f"{metric}_mean"] = stats[("mean", metric)]
        summary[f"{metric}_std"] = stats[("std", metric)]
        summary[f"{metric}_n"] = stats[("n", metric)].fillna(0).astype(int)
    summary = _with_deltas(summary.reset_index(), paired_deltas(scores), metrics)
    if "kind" in scores.columns:
        summary.insert(1, "kind", summary["method"].map(scores.groupby("method", sort=False)["kind"].first()))
    method_order = {method: rank for rank, method in enumerate(dict.fromkeys(scores["method"]))}
    summary = summary.sort_values(
        ["method", "weight"], key=lambda column: column.map(method_order) if column.name == "method" else column
    ).reset_index(drop=True)
    summary["on_pareto_front"] = pareto_front(summary, f"{x}_mean", f"{y}_mean")
    return summary


def _with_deltas(summary: pd.DataFrame, deltas: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """`summary` with `<metric>_delta*` after each metric's mean, std and n (NaN where not paired)."""
    cells = pd.MultiIndex.from_frame(summary[CELL_KEYS])
    for metric in metrics:
        mine = deltas[deltas["metric"] == metric].set_index(CELL_KEYS)
        for column in DELTA_COLUMNS:
            values = mine[column].astype(float).reindex(cells).to_numpy() if len(mine) else np.nan
            summary[f"{metric}_{column}"] = values
        summary[f"{metric}_delta_n"] = summary[f"{metric}_delta_n"].fillna(0).astype(int)
    order = [f"{metric}_{column}" for metric in metrics for column in ("mean", "std", "n", *DELTA_COLUMNS)]
    return summary[CELL_KEYS + order]


@dataclass(frozen=True)
class WeightSuggestion:
    """The weight of `method` with the best `optimised` mean among the weights that qualify.

    A weight qualifies by its `constrained` metric: with `threshold` set, when its mean is >= the
    threshold; with `against_baseline`, when the 95% interval of its paired difference against the
    baseline is not wholly below 0 (above the baseline or not distinguishable from it).
    """

    method: str
    weight: float
    constrained: str  # the metric held to the threshold, or to the baseline
    threshold: float  # NaN when the rule is against_baseline
    optimised: str  # the metric maximised
    constrained_mean: float
    constrained_std: float
    optimised_mean: float
    optimised_std: float
    n: int  # values pooled for the optimised metric at this weight
    threshold_source: str = ""  # where the threshold came from, e.g. "given"
    against_baseline: bool = False
    constrained_delta: tuple[float, float, float, int] = (math.nan, math.nan, math.nan, 0)  # delta, lo, hi, n
    optimised_delta: tuple[float, float, float, int] = (math.nan, math.nan, math.nan, 0)

    @property
    def sentence(self) -> str:
        optimised, constrained = metric_label(self.optimised), metric_label(self.constrained)
        if not self.against_baseline:
            source = f" ({self.threshold_source})" if self.threshold_source else ""
            return (
                f"{self.method} at weight {self.weight:g} gives the best {optimised} "
                f"({_mean_std(self.optimised_mean, self.optimised_std)}, n={self.n}) among weights with "
                f"{constrained} ≥ {self.threshold:.3f}{source}; at this weight "
                f"{constrained} is {_mean_std(self.constrained_mean, self.constrained_std)}."
            )
        held = _against_baseline(self.constrained_delta) or "no cell paired with the baseline's"
        gained = _against_baseline(self.optimised_delta) or "no cell paired with the baseline's"
        return (
            f"{self.method} at weight {self.weight:g} gives the best {optimised} among weights whose "
            f"{constrained} is not significantly below the baseline's (95% t-interval of the paired difference "
            f"reaching 0 or above): {optimised} {self.optimised_mean:.3f}, {gained}; {constrained} "
            f"{self.constrained_mean:.3f}, {held}."
        )


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _against_baseline(delta: tuple[float, float, float, int]) -> str:
    """'Δ +0.0310 [+0.0120, +0.0500] over 4 pairs, above the baseline'."""
    text = delta_text(*delta)
    reading = verdict(delta[1], delta[2])
    if not reading:
        return f"{text} against the baseline" if text else ""
    return f"{text} over {delta[3]} pairs, {reading}"


def _delta(row: pd.Series, metric: str) -> tuple[float, float, float, int]:
    if f"{metric}_delta" not in row:
        return (math.nan, math.nan, math.nan, 0)
    return (float(row[f"{metric}_delta"]), float(row[f"{metric}_delta_lo"]), float(row[f"{metric}_delta_hi"]),
            int(row[f"{metric}_delta_n"]))


def not_below_baseline(summary: pd.DataFrame, metric: str) -> pd.Series:
    """True where the paired difference against the baseline on `metric` is not significantly below 0.

    That is, the upper end of its 95% interval is >= 0. With a single pair (no interval) the
    difference itself must be >= 0; without any pair (the baseline's own row) it is False.
    """
    high, delta = summary[f"{metric}_delta_hi"], summary[f"{metric}_delta"]
    return (high >= 0) | (high.isna() & (delta >= 0))


def suggest_weight(
    summary: pd.DataFrame,
    method: str,
    x: str = "dino",
    y: str = "clip_t",
    min_x: float | None = None,
    min_y: float | None = None,
    keep: str | None = None,
) -> WeightSuggestion | None:
    """The weight of `method` with the best mean y among weights whose mean x >= min_x.

    With min_y instead: the best mean x among weights whose mean y >= min_y. With keep=x (or y):
    the best mean of the other metric among weights whose paired difference against the baseline
    on `keep` is not significantly below 0 (`not_below_baseline`). Give exactly one of the three.
    Ties go to the other metric's mean, then to the lower weight (the gentler setting). None when
    no weight of `method` qualifies.
    """
    if sum(option is not None for option in (min_x, min_y, keep)) != 1:
        raise ValueError("suggest_weight: give exactly one of min_x (keep image fidelity), min_y "
                         "(keep prompt fidelity) or keep (the metric not to lose against the baseline)")
    if keep is not None and keep not in (x, y):
        raise ValueError(f"suggest_weight: keep={keep!r} must be x={x!r} or y={y!r}")
    if keep is not None:
        constrained, optimised, threshold = keep, (y if keep == x else x), math.nan
        qualifies = not_below_baseline(summary, constrained)
    else:
        constrained, optimised, threshold = (x, y, min_x) if min_x is not None else (y, x, min_y)
        qualifies = summary[f"{constrained}_mean"] >= threshold
    rows = summary[(summary["method"] == method) & qualifies]
    rows = rows.dropna(subset=[f"{optimised}_mean"])
    if rows.empty:
        return None
    best = rows.sort_values(
        [f"{optimised}_mean", f"{constrained}_mean", "weight"], ascending=[False, False, True]
    ).iloc[0]
    return WeightSuggestion(
        method=method,
        weight=float(best["weight"]),
        constrained=constrained,
        threshold=float(threshold),
        optimised=optimised,
        constrained_mean=float(best[f"{constrained}_mean"]),
        constrained_std=float(best[f"{constrained}_std"]),
        optimised_mean=float(best[f"{optimised}_mean"]),
        optimised_std=float(best[f"{optimised}_std"]),
        n=int(best[f"{optimised}_n"]),
        against_baseline=keep is not None,
        constrained_delta=_delta(best, constrained),
        optimised_delta=_delta(best, optimised),
    )
