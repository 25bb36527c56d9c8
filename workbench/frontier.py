"""Summaries of a scored grid, the Pareto front between two metrics, and a suggested weight.

Everything here reads the long score table (`prompt, method, weight, seed, metric, value`) or the
summary built from it; nothing touches a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

CELL_KEYS = ["method", "weight"]
METRIC_LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "diversity": "diversity"}


def metric_label(name: str) -> str:
    """How a metric is written for people: 'dino' -> 'DINO'."""
    return METRIC_LABELS.get(name, name)


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
    diversity). `on_pareto_front` is the front of the x and y means (both maximised). Methods keep
    the order they first appear in; weights ascend within a method.
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
    summary = summary.reset_index()
    method_order = {method: rank for rank, method in enumerate(dict.fromkeys(scores["method"]))}
    summary = summary.sort_values(
        ["method", "weight"], key=lambda column: column.map(method_order) if column.name == "method" else column
    ).reset_index(drop=True)
    summary["on_pareto_front"] = pareto_front(summary, f"{x}_mean", f"{y}_mean")
    return summary


@dataclass(frozen=True)
class WeightSuggestion:
    """The weight of `method` with the best `optimised` mean among weights meeting the threshold."""

    method: str
    weight: float
    constrained: str  # the metric held to the threshold
    threshold: float
    optimised: str  # the metric maximised
    constrained_mean: float
    constrained_std: float
    optimised_mean: float
    optimised_std: float
    n: int  # values pooled for the optimised metric at this weight
    threshold_source: str = ""  # where the threshold came from, e.g. "the baseline's"

    @property
    def sentence(self) -> str:
        source = f" ({self.threshold_source})" if self.threshold_source else ""
        return (
            f"{self.method} at weight {self.weight:g} gives the best {metric_label(self.optimised)} "
            f"({_mean_std(self.optimised_mean, self.optimised_std)}, n={self.n}) among weights with "
            f"{metric_label(self.constrained)} ≥ {self.threshold:.3f}{source}; at this weight "
            f"{metric_label(self.constrained)} is {_mean_std(self.constrained_mean, self.constrained_std)}."
        )


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def suggest_weight(
    summary: pd.DataFrame,
    method: str,
    x: str = "dino",
    y: str = "clip_t",
    min_x: float | None = None,
    min_y: float | None = None,
) -> WeightSuggestion | None:
    """The weight of `method` with the best mean y among weights whose mean x >= min_x.

    With min_y instead: the best mean x among weights whose mean y >= min_y. Give exactly one.
    Ties go to the other metric's mean, then to the lower weight (the gentler setting). None when
    no weight of `method` meets the threshold.
    """
    if (min_x is None) == (min_y is None):
        raise ValueError("suggest_weight: give exactly one of min_x (keep image fidelity) or min_y "
                         "(keep prompt fidelity)")
    constrained, optimised, threshold = (x, y, min_x) if min_x is not None else (y, x, min_y)
    rows = summary[(summary["method"] == method) & (summary[f"{constrained}_mean"] >= threshold)]
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
    )
