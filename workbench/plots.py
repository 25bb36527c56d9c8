"""Plotly figures of a scored grid. Each function takes tables and returns a Figure; no models here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from .frontier import metric_label, pareto_front
from .stats import baseline_methods, delta_text

BASELINE = "baseline"
BASELINE_COLOR = "#222222"
METHOD_COLORS = qualitative.Plotly
FRONT_COLOR = "#888888"
IMAGE_CLOUD_OPACITY = 0.15
IMAGE_CLOUD = "image cloud"  # the `meta` of the per-image traces, so a menu can show or hide them


def _weight_text(weight: float) -> str:
    return "" if pd.isna(weight) else f"{weight:g}"


def _mean_std_text(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _n_text(n_x: int, n_y: int, x: str, y: str) -> str:
    return f"n = {n_x}" if n_x == n_y else f"n = {n_x} ({metric_label(x)}), {n_y} ({metric_label(y)})"


def axis_title(metric: str, provenance: dict | None) -> str:
    """'DINO (cosine in [-1, 1]) — image fidelity →' and, on a second smaller line, the backbone
    ('transformers facebook/dino-vits16') when provenance knows the metric; else just 'DINO'."""
    info = (provenance or {}).get(metric)
    if not info:
        return metric_label(metric)
    arrow = " →" if info.get("direction") == "higher is better" else ""
    title = f"{metric_label(metric)} ({info['scale']}) — {info['axis'].replace('_', ' ')}{arrow}"
    return f"{title}<br><sup>{info['backbone']}</sup>" if info.get("backbone") else title


def method_colors(methods, baselines=(BASELINE,)) -> dict[str, str]:
    """A fixed colour per method, in order; the baselines are always near-black."""
    others = [method for method in methods if method not in baselines]
    colors = {method: METHOD_COLORS[index % len(METHOD_COLORS)] for index, method in enumerate(others)}
    colors.update({baseline: BASELINE_COLOR for baseline in baselines})
    return colors


def _hover_value(row: pd.Series, metric: str) -> str:
    """'0.412 ± 0.031, Δ +0.0310 [+0.0120, +0.0500] against the baseline' (no Δ on the baseline)."""
    text = _mean_std_text(row[f"{metric}_mean"], row[f"{metric}_std"])
    if f"{metric}_delta" not in row:
        return text
    delta = delta_text(row[f"{metric}_delta"], row[f"{metric}_delta_lo"], row[f"{metric}_delta_hi"],
                       row[f"{metric}_delta_n"])
    return f"{text}, {delta} against the baseline (95% t-interval, paired)" if delta else text


def _method_trace(rows: pd.DataFrame, method: str, x: str, y: str, color: str, baseline: bool = False) -> go.Scatter:
    rows = rows.sort_values("weight")
    customdata = np.array([
        [method, _weight_text(row["weight"]) or "—", _hover_value(row, x), _hover_value(row, y),
         _n_text(row[f"{x}_n"], row[f"{y}_n"], x, y)]
        for _, row in rows.iterrows()
    ], dtype=object)
    return go.Scatter(
        x=rows[f"{x}_mean"].to_numpy(),
        y=rows[f"{y}_mean"].to_numpy(),
        error_x=dict(type="data", array=rows[f"{x}_std"].to_numpy(), thickness=1, width=3),
        error_y=dict(type="data", array=rows[f"{y}_std"].to_numpy(), thickness=1, width=3),
        mode="lines+markers+text",
        name=method,
        legendgroup=method,
        text=["" if baseline else _weight_text(weight) for weight in rows["weight"]],
        # Alternate above/below along the sweep, so the labels of neighbouring weights do not collide.
        textposition=["top right" if index % 2 == 0 else "bottom right" for index in range(len(rows))],
        textfont=dict(color=color, size=11),
        marker=dict(symbol="star" if baseline else "circle", size=18 if baseline else 9, color=color,
                    line=dict(color="white", width=1)),
        line=dict(color=color, width=1.5),
        customdata=customdata,
        hovertemplate=(
            "<b>%{customdata[0]}</b> @ weight %{customdata[1]}<br>"
            f"{metric_label(x)}: %{{customdata[2]}}<br>{metric_label(y)}: %{{customdata[3]}}<br>"
            "%{customdata[4]}<extra></extra>"
        ),
    )


def _image_cloud_trace(scores: pd.DataFrame, method: str, x: str, y: str, color: str) -> go.Scatter | None:
    per_image = (
        scores[(scores["method"] == method) & scores["metric"].isin([x, y]) & scores["seed"].notna()]
        .groupby(["prompt", "weight", "seed", "metric"], dropna=False)["value"].mean()
        .unstack("metric")
    )
    if x not in per_image or y not in per_image:
        return None
    per_image = per_image.dropna(subset=[x, y]).reset_index()
    return go.Scatter(
        x=per_image[x].to_numpy(),
        y=per_image[y].to_numpy(),
        mode="markers",
        name=f"{method} (images)",
        meta=IMAGE_CLOUD,
        legendgroup=method,
        showlegend=False,
        opacity=IMAGE_CLOUD_OPACITY,
        marker=dict(color=color, size=5),
        customdata=np.column_stack([
            per_image["prompt"].astype(str), [_weight_text(w) for w in per_image["weight"]], per_image["seed"]
        ]),
        hovertemplate=(
            f"{method} @ weight %{{customdata[1]}}, seed %{{customdata[2]}}<br>%{{customdata[0]}}<extra></extra>"
        ),
    )


def _pareto_trace(summary: pd.DataFrame, x: str, y: str) -> go.Scatter:
    on_front = pareto_front(summary, f"{x}_mean", f"{y}_mean")
    # Drawn right to left with horizontal-then-vertical steps, the line is the edge of the region
    # the front dominates: each corner sits at (next point's x, this point's y).
    front = summary[on_front].sort_values([f"{x}_mean", f"{y}_mean"], ascending=[False, True])
    return go.Scatter(
        x=front[f"{x}_mean"].to_numpy(),
        y=front[f"{y}_mean"].to_numpy(),
        mode="lines",
        line_shape="hv",
        line=dict(color=FRONT_COLOR, dash="dash", width=1.5),
        name="Pareto front",
        legendrank=2000,  # listed after the methods (default rank 1000)
        hoverinfo="skip",
    )


def frontier_figure(
    summary: pd.DataFrame,
    x: str = "dino",
    y: str = "clip_t",
    scores: pd.DataFrame | None = None,
    provenance: dict | None = None,
) -> go.Figure:
    """Image fidelity (x) against prompt fidelity (y), one line per method through its weights.

    Markers are means over prompts and seeds with ± 1 sample std error bars, labelled with their
    weight; the baseline (of kind "baseline") is a star. Hovering a marker gives each metric's paired
    difference against the baseline with its 95% interval. The dashed step line is the Pareto front of the means (both
    metrics maximised, so up and right is better). With `scores`, each image is a faint dot.
    """
    methods = list(dict.fromkeys(summary["method"]))
    baselines = baseline_methods(summary)
    colors = method_colors(methods, baselines)
    figure = go.Figure()
    if scores is not None:
        for method in methods:
            cloud = _image_cloud_trace(scores, method, x, y, colors[method])
            if cloud is not None:
                figure.add_trace(cloud)
    figure.add_trace(_pareto_trace(summary, x, y))
    for method in methods:
        figure.add_trace(_method_trace(summary[summary["method"] == method], method, x, y, colors[method],
                                       baseline=method in baselines))
    figure.update_layout(
        template="plotly_white",
        # A <sup> line rather than title.subtitle, which needs plotly >= 5.23.
        title_text=(
            f"{metric_label(x)} vs {metric_label(y)} by method and weight<br><sup>mean ± std over prompts and "
            "seeds; labels are weights; up and right is better</sup>"
        ),
        xaxis_title=axis_title(x, provenance),
        yaxis_title=axis_title(y, provenance),
        legend_title_text="method",
        hovermode="closest",
        margin=dict(t=90),
    )
    return figure


def frontier_figure_with_x_menu(
    summary: pd.DataFrame,
    xs: list[str],
    y: str = "clip_t",
    scores: pd.DataFrame | None = None,
    provenance: dict | None = None,
) -> go.Figure:
    """`frontier_figure` for each x in `xs` in one figure, with a menu to pick the x axis (and, with
    `scores`, to show or hide the per-image dots). The first x is shown first, with its dots."""
    panels = [frontier_figure(summary, x=x, y=y, scores=scores, provenance=provenance) for x in xs]
    figure = go.Figure(layout=panels[0].layout)
    owner = []  # which panel each trace of `figure` comes from
    for index, panel in enumerate(panels):
        for trace in panel.data:
            trace.visible = index == 0
            figure.add_trace(trace)
            owner.append(index)
    clouds = [trace.meta == IMAGE_CLOUD for trace in figure.data]
    buttons = []
    for index, (x, panel) in enumerate(zip(xs, panels)):
        for with_cloud in ([True, False] if any(clouds) else [False]):
            visible = [mine == index and (with_cloud or not cloud) for mine, cloud in zip(owner, clouds)]
            label = f"x = {metric_label(x)}" + (", with each image" if with_cloud else "")
            buttons.append(dict(label=label, method="update", args=[
                {"visible": visible},
                {"xaxis.title.text": panel.layout.xaxis.title.text, "title.text": panel.layout.title.text},
            ]))
    figure.update_layout(updatemenus=[dict(
        type="dropdown", buttons=buttons, active=0, direction="down", showactive=True,
        x=1.0, xanchor="right", y=1.0, yanchor="bottom", pad=dict(b=6),
    )])
    return figure


def write_frontier_html(figure: go.Figure, path: str | Path) -> Path:
    """A self-contained HTML file (plotly.js inlined, so it opens offline)."""
    from .files import atomic_write

    return atomic_write(path, lambda partial: figure.write_html(partial, include_plotlyjs=True, full_html=True))
