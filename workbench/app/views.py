"""What the result panels show for a run: the grid, the score table, the frontier, one column's images.

Views are built from a live RunResult while a job runs and from the run folder (`RunFolder`)
afterwards. Which metrics the table and the x-axis menu offer follows the scores and the metric
registry: a metric the run scored shows, written by `frontier.metric_label`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..frontier import frontier_axes, metric_levels, metric_label, scored_metrics, summarize, x_axis_metrics
from ..report import grid_column_at, grid_images
from ..run_folder import RunFolder

NAME, FRONT, COUNT = "method@weight", "front", "n"  # "front" second: on a phone only the first columns show


# ---------------------------------------------------------------- which metrics


def x_axis_choices(scores: pd.DataFrame | None = None) -> list[tuple[str, str]]:
    return [(metric_label(name), name) for name in x_axis_metrics(scores)]


def table_headers(metrics: list[str]) -> list[str]:
    return [NAME, FRONT, *(metric_label(m) for m in metrics), COUNT]


def table_widths(metrics: list[str], levels: dict[str, str]) -> list[str]:
    return ["140px", "58px", *("124px" if levels.get(m) == "image" else "102px" for m in metrics), "36px"]


# ---------------------------------------------------------------- views


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=table_headers(scored_metrics()))


def _empty_widths() -> list[str]:
    return table_widths(scored_metrics(), metric_levels(None))


@dataclass
class Views:
    """What the result panels show for a run, from a live RunResult or from the run folder."""

    grid: object = None  # PIL image
    table: pd.DataFrame = field(default_factory=_empty_table)
    figure: object = None
    suggestion: str = ""
    columns: list[str] = field(default_factory=list)
    suggested: str | None = None  # the column of the first suggested weight
    axes: list[tuple[str, str]] = field(default_factory=list)  # x-axis choices (label, metric); [] before scores
    widths: list[str] = field(default_factory=_empty_widths)  # the table's column widths


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():.3f}" if len(values) < 2 else f"{values.mean():.3f} ± {values.std():.3f}"


def _table_value(row: pd.Series, metric: str) -> str:
    """'0.412 Δ +0.0310 [+0.0120, +0.0500]': the mean, then the paired difference against the baseline
    with its 95% interval (the mean alone on the baseline's row)."""
    from ..stats import delta_text

    mean = row[f"{metric}_mean"]
    if pd.isna(mean):
        return ""
    delta = delta_text(row[f"{metric}_delta"], row[f"{metric}_delta_lo"], row[f"{metric}_delta_hi"],
                       row[f"{metric}_delta_n"])
    return f"{mean:.3f}\u202f{delta}" if delta else f"{mean:.3f}"


def score_views(scores: pd.DataFrame | None, provenance: dict, columns: dict, x: str) -> Views:
    """Table, figure and suggested weight from the long score table; `columns` maps (method, weight) -> label."""
    from ..plots import frontier_figure
    from ..report import suggestions
    from ..stats import baseline_methods

    views = Views()
    if scores is None or scores.empty:
        return views
    axes = frontier_axes(scores)
    if axes is None:
        return views
    views.axes = x_axis_choices(scores)
    x = x if x in {metric for _, metric in views.axes} else axes[0]
    y = axes[1]
    summary = summarize(scores, x=x, y=y)
    metrics = [m for m in scored_metrics(scores) if f"{m}_mean" in summary]
    rows = []
    for _, row in summary.iterrows():
        key = (row["method"], float(row["weight"]))
        item = {NAME: columns.get(key, f"{row['method']}@{row['weight']:g}"),
                FRONT: "★" if row["on_pareto_front"] else ""}
        for metric in metrics:
            item[metric_label(metric)] = _table_value(row, metric)
        item[COUNT] = int(row[f"{x}_n"])
        rows.append(item)
    views.table = pd.DataFrame(rows)
    views.widths = table_widths(metrics, metric_levels(scores))
    figure = frontier_figure(summary, x=x, y=y, scores=scores, provenance=provenance)
    # The figure's title and subtitle overflow a phone screen; the app says the same beside the plot.
    figure.update_layout(height=440, margin=dict(l=10, r=10, t=10, b=10), title=None,
                         legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, title_text=""))
    views.figure = figure
    found = suggestions(summary, x, y)
    baselines = baseline_methods(summary)
    if found:
        views.suggested = columns.get((found[0].method, found[0].weight))
        views.suggestion = "\n".join(f"- **Suggested:** {s.sentence}" for s in found)
    elif baselines and set(summary["method"]) <= set(baselines):  # stopped, or running, before any method cell
        views.suggestion = "The suggested weight appears once a method's cells are scored beside the baseline."
    elif baselines:
        views.suggestion = (f"Every weight of every method has {metric_label(x)} significantly below the "
                            "baseline's (the 95% interval of the paired difference is below 0); try higher weights.")
    else:
        views.suggestion = "Tick **baseline** to get a suggested weight: each weight is compared with it, cell by cell."
    return views


def live_columns(result) -> dict:
    """(method, weight) -> column label of a live RunResult's cells."""
    return {(r.method, float(r.cell.weight)): r.column for r in result.results}


def live_views(result, x: str, with_scores: bool = True) -> Views:
    views = score_views(result.scores, result.provenance, live_columns(result), x) if with_scores else Views()
    views.grid = grid_images(result)[0][1]
    views.columns = list(dict.fromkeys(r.column for r in sorted(
        result.results, key=lambda r: (r.cell.method_index, r.cell.weight))))
    return views


def disk_views(run_dir: Path, x: str) -> Views:
    """Views of a finished (or stopped, or loaded) run folder: grid.png, scores.csv, manifest metrics."""
    run = RunFolder(run_dir)
    columns = run.column_labels()
    views = score_views(run.scores(), run.manifest().get("metrics", {}), columns, x)
    views.grid = run.grid()
    views.columns = list(dict.fromkeys(columns.values()))
    return views


# ---------------------------------------------------------------- one column, clicks


def column_detail(run_dir: Path, column: str) -> tuple[list, str]:
    """The images of one method@weight column (every prompt and seed), captioned with their scores."""
    run = RunFolder(run_dir)
    if run.cells() is None or not column:
        return [], ""
    rows = run.column(column)
    if rows.empty:
        return [], f"No images for `{column}` in this run yet."
    levels = metric_levels(run.scores())
    metrics = [m for m in scored_metrics(run.scores()) if levels[m] == "image" and m in rows]
    items = []
    for _, row in rows.iterrows():
        image = run.image(row["image"])  # cells.csv may be a client's (a loaded zip): only files of the run
        if image is None:
            continue
        # scores first: a narrow screen cuts the end of a caption
        scores = " · ".join(f"{metric_label(m)} {row[m]:.3f}" for m in metrics if pd.notna(row[m]))
        caption = (f"{scores} · " if scores else "") + f"seed {row['seed']} · {row['prompt']}"
        items.append((str(image), caption))
    means = " · ".join(f"{metric_label(m)} {_mean_std(rows[m])}" for m in metrics if rows[m].notna().any())
    layout = " (prompt by prompt, one per seed)" if rows["seed"].nunique() > 1 else ""
    return items, f"`{column}` — {len(rows)} images{layout}" + (f" · {means}" if means else "")


def column_seeds(run_dir: Path, column: str) -> int:
    """How many seeds one column has: the gallery shows one row per prompt, one image per seed."""
    rows = RunFolder(run_dir).column(column)
    return 0 if rows.empty else int(rows["seed"].nunique())


def grid_click_column(run_dir: Path, study, x: float) -> str | None:
    """The column under a click at pixel column `x` of the run's grid, if it has images yet.

    The grid on disk is drawn from the run's own study (the manifest's); `study` serves before there is one.
    """
    run = RunFolder(run_dir)
    try:
        if (run.path / "manifest.json").is_file():  # a loaded zip's manifest names its references relative to it
            study = run.study()
    except (ValueError, KeyError):  # StudyError is a ValueError
        return None
    if study is None:
        return None
    column = grid_column_at(study, x)
    cells = run.cells()
    return column if cells is not None and column in set(cells["column"]) else None


def column_for_click(run_dir: Path, text: str) -> str | None:
    """'method|weight|nonce' from a click on the frontier -> that method@weight's column label."""
    cells = RunFolder(run_dir).cells()
    method, _, rest = (text or "").partition("|")
    weight_text = rest.partition("|")[0]
    if cells is None or not method:
        return None
    rows = cells[cells["method"] == method]
    if rows.empty:
        return None
    if rows["kind"].iloc[0] == "baseline" or rows["column"].nunique() == 1:
        return str(rows["column"].iloc[0])
    try:
        weight = float(weight_text)
    except ValueError:
        return None
    match = rows[(rows["weight"] - weight).abs() < 1e-9]
    return str(match["column"].iloc[0]) if not match.empty else None


# ---------------------------------------------------------------- the status line


def failure_text(done: int, total: int, message: str) -> str:
    """What the status line says after a failed job; it promises kept images only when there are some."""
    if not done:
        return f"Failed before the first image: {message}. Fix that and press Generate."
    return (f"Failed after {done}/{total} cells: {message}. The {done} finished images are kept; "
            "press Generate to make the rest.")


def progress_text(event, seconds: float, stopping: bool) -> str:
    """'5/8 cells · last: lora@1, prompt 1, seed 0 · 1.2 s/image · ~4 s left'."""
    cell = event.cell
    rate = seconds / max(1, event.run.generated) if event.run.generated else None
    left = (event.total - event.done) * rate if rate else None
    text = (f"{event.done}/{event.total} cells · last: {cell.column}, prompt {cell.cell.prompt_index + 1}, "
            f"seed {cell.cell.seed}")
    if rate:
        text += f" · {rate:.1f} s/image" + (f" · ~{left:.0f} s left" if left else "")
    return text + (" · stopping …" if stopping else "")


def progress_html(done: int, total: int, text: str, state: str = "running") -> str:
    percent = 100.0 * done / total if total else 0.0
    return (f'<div class="wb-progress {state}"><div class="wb-bar"><div style="width:{percent:.1f}%"></div></div>'
            f'<div class="wb-text">{html.escape(text)}</div></div>')
