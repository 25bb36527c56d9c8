"""Run outputs: cells.csv, grid PNG(s), manifest.json. All are views of the cells on disk."""

from __future__ import annotations

import json
import math
import platform
import time
import warnings
from importlib import metadata
from pathlib import Path

import pandas as pd
from PIL import Image

from .files import atomic_write
from .frontier import frontier_axes, x_axis_metrics
from .grid import grid_layout, make_grid
from .images import load_image
from .run_scores import GROUP_COLUMNS, SCORING_COST_FILE
from .weights import source_identity

LIBRARIES = ("torch", "diffusers", "transformers", "open_clip_torch", "peft", "accelerate", "safetensors",
             "gradio", "plotly", "pandas", "pillow")


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_cells_csv(study, run_dir: Path, results, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """cells.csv: one row per image on disk, one column per metric.

    A per-image metric is the image's own value; a group metric (diversity) is the value of the
    image's seed group (its prompt x method x weight), repeated on each row of the group.
    Without `scores`, score columns already in the file are kept for the same keys."""
    frame = pd.DataFrame([r.record(study, run_dir) for r in results])
    path = run_dir / "cells.csv"
    if scores is not None and len(frame):
        per_image = scores.dropna(subset=["key"]).pivot_table(index="key", columns="metric", values="value",
                                                              aggfunc="first")
        frame = frame.merge(per_image.reset_index(), on="key", how="left")
        groups = scores[scores["key"].isna()]
        if len(groups):
            per_group = groups.pivot_table(index=GROUP_COLUMNS, columns="metric", values="value",
                                           aggfunc="first", dropna=False)
            per_group.columns = list(per_group.columns)
            frame = frame.merge(per_group.reset_index(), on=GROUP_COLUMNS, how="left")
    elif path.exists() and len(frame):
        previous = _read_previous_csv(path)
        extra = [c for c in previous.columns if c not in frame.columns]
        if extra and "key" in previous:
            frame = frame.merge(previous[["key", *extra]].drop_duplicates("key"), on="key", how="left")
    _atomic_csv(frame, path)
    return frame


# Text a spreadsheet would run as a formula (OWASP CSV injection); a leading ' escapes it, and is
# itself escaped (doubled) so that `read_csv` gives every text back exactly.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def _escape_text(value):
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _unescape_text(value):
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def _text_columns(frame: pd.DataFrame) -> list:
    return [c for c in frame.columns if pd.api.types.is_object_dtype(frame[c]) or pd.api.types.is_string_dtype(frame[c])]


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` atomically with text cells escaped; numbers are written as numbers."""
    text = _text_columns(frame)
    if text:
        frame = frame.assign(**{c: frame[c].map(_escape_text) for c in text})
    atomic_write(path, lambda partial: frame.to_csv(partial, index=False))


def _read_previous_csv(path: Path) -> pd.DataFrame:
    """A previous output table, or an empty one when it is damaged (it is rewritten from the cells)."""
    try:
        return read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        warnings.warn(f"{path} is damaged ({str(error).splitlines()[0]}); writing it anew")
        return pd.DataFrame()


def read_previous_json(path: Path, shaped=lambda data: True) -> dict:
    """A previous JSON output, or {} when it is missing or damaged (kept aside, hidden, as .NAME.damaged).

    Damaged: not JSON, not an object, or not `shaped` (a file of another shape would break the
    code that reads it on every rerun)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and shaped(data):
            return data
    except (ValueError, UnicodeDecodeError):
        pass
    aside = path.with_name(f".{path.name}.damaged")
    warnings.warn(f"{path} is damaged; kept as {aside.name} and written anew")
    path.replace(aside)
    return {}


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV of a run folder, with the text `_atomic_csv` escaped given back as written."""
    frame = pd.read_csv(path)
    text = _text_columns(frame)
    return frame.assign(**{c: frame[c].map(_unescape_text) for c in text}) if text else frame


def _overview_cell_size(study) -> int | None:
    """grid.png shrinks its cells when it has many rows."""
    return min(256, study.size[1]) if len(study.prompts) * len(study.seeds) > 16 else None


def grid_column_at(study, x: float) -> str | None:
    """The method@weight column under pixel column `x` of the study's grid.png (None: margins)."""
    labels = [spec.column(w) for spec in study.methods for w in spec.weights]
    height, width = study.size
    layout = grid_layout(len(labels), (width, height), bool(study.subject.reference_images),
                         _overview_cell_size(study))
    index = layout.column_at(x)
    return None if index is None else labels[index]


def grid_images(result) -> list[tuple[str, Image.Image]]:
    """(file name, image) of the grids: grid.png with every prompt, and one per prompt when several."""
    study = result.study
    columns = [(m, w) for m, spec in enumerate(study.methods) for w in spec.weights]
    labels = [study.methods[m].column(w) for m, w in columns]
    images = {(r.cell.prompt_index, r.cell.method_index, r.cell.weight, r.cell.seed): r.image_path for r in result.results}

    def group(prompt_index: int):
        template = study.prompts[prompt_index]
        rows = []
        for seed in study.seeds:
            row = []
            for m, w in columns:
                path = images.get((prompt_index, m, w, seed))
                row.append(Image.open(path).convert("RGB") if path else None)
            rows.append(row)
        return (f"{prompt_index + 1}. {study.scoring_prompt(template)}", [f"seed {s}" for s in study.seeds], rows)

    references = [load_image(p) for p in study.subject.reference_images]
    title = f"{study.name} | {study.base}, {study.steps} steps, CFG {study.guidance:g}"
    groups = [group(p) for p in range(len(study.prompts))]
    grids = [("grid.png", make_grid(labels, groups, references, title, _overview_cell_size(study)))]
    if len(study.prompts) > 1:
        for index, prompt_group in enumerate(groups):
            grids.append((f"grids/prompt_{index + 1:02d}.png", make_grid(labels, [prompt_group], references, title)))
    return grids


def write_manifest(result, loaded, *, device_type: str, base_identity: dict) -> dict:
    """manifest.json: the resolved spec, model identities, versions, device, timings per method.

    `loaded` is None when every cell came from the cache (no model was loaded this time)."""
    study = result.study
    path = result.run_dir / "manifest.json"
    previous = read_previous_json(path, _manifest_shaped)
    run = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": round(result.wall_seconds, 3),
        "generated": result.generated, "cells_on_disk": len(result.results), "stopped": result.stopped,
        "methods": {label: {"images": s.images, "seconds": round(s.seconds, 3),
                            "seconds_per_image": round(s.seconds / s.images, 4) if s.images else None,
                            "peak_memory_mb": round(s.peak_memory_mb, 1),
                            "peak_memory_kind": "cuda max_memory_allocated" if device_type == "cuda"
                            else "process peak RSS"}
                    for label, s in result.stats.items()},
    }
    manifest = {
        **previous,
        "study": study.to_dict(),
        "source": study.source,
        "models": {
            "base": base_identity,
            "loras": [source_identity(l.source) | {"weight": l.weight} for l in study.loras],
            "methods": {spec.label: spec.method.identity() for spec in study.methods},
        },
        **({"pipeline": type(loaded.pipe).__name__, "device": loaded.device,
            "device_name": _device_name(loaded.device), "dtype": str(loaded.dtype).replace("torch.", "")}
           if loaded else {}),
        "libraries": library_versions(),
        "cells_total": len(study.cells()), "cells_on_disk": len(result.results),
        "runs": previous.get("runs", []) + [run],
    }
    if result.provenance:
        manifest["metrics"] = result.provenance
        axes = frontier_axes(result.scores) if result.scores is not None and not result.scores.empty else None
        manifest["columns"] = column_definitions(*(axes or (None, None)))
        run["scoring"] = scoring_cost(result, previous.get("runs", []))
        run["scoring_seconds"] = run["scoring"]["seconds"]
        run["scoring_to_generation_ratio"] = run["scoring"]["ratio_per_image"]
    atomic_write(path, strict_json(manifest))
    return manifest


def strict_json(data) -> str:
    """JSON any parser reads: NaN and infinity (which json.dumps writes bare) become null."""
    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=2, default=str, allow_nan=False)


def _manifest_shaped(manifest: dict) -> bool:
    """Has a previous manifest.json the shape a rerun reads: a list of runs, each a mapping whose
    `methods` (when present) is a mapping of mappings."""
    runs = manifest.get("runs", [])
    return isinstance(runs, list) and all(
        isinstance(run, dict) and isinstance(run.get("methods", {}), dict)
        and all(isinstance(stats, dict) for stats in run.get("methods", {}).values()) for run in runs)


def column_definitions(x: str | None, y: str | None) -> dict:
    """How to read the columns of cells.csv and summary.csv (written to manifest.json)."""
    front = (f"True where no other method@weight has {x}_mean and {y}_mean both >= and one >; both are "
             "maximised, and equal points do not dominate each other" if x and y else "not computed")
    return {
        "cells.csv": {
            "<metric>": "per-image metrics: the image's value; diversity: the value of the image's seed group "
                        "(prompt x method x weight), repeated on each image of the group",
            "prompt_truncated": "True where the cell's prompt (or its CLIP-T text) is longer than the 77 tokens "
                                "the CLIP text encoder reads: the rest was ignored",
        },
        "summary.csv": {
            "rows": "one per method@weight: means and stds pool every prompt and seed (so the std holds the "
                    "spread between prompts and between seeds); the paired <metric>_delta columns remove that spread",
            "<metric>_mean": "mean of the pooled values",
            "<metric>_std": "sample standard deviation (ddof=1) of the pooled values: over images (seeds x "
                            "prompts) for per-image metrics, over seed groups (one per prompt) for diversity; "
                            "empty when n = 1; the frontier's error bars are +/- 1 std",
            "<metric>_n": "number of pooled non-missing values: images for per-image metrics, seed groups "
                          "(prompts) for diversity",
            "<metric>_delta": "mean paired difference against the baseline: this method@weight's value minus the "
                              "baseline's on the same cell (same prompt and seed for per-image metrics, same "
                              "prompt for diversity), averaged over the cells both have; empty on the baseline's "
                              "row and without a baseline",
            "<metric>_delta_lo": "lower end of the 95% confidence interval of <metric>_delta: a Student t-interval "
                                 "on the paired differences, delta - t(0.975, n-1) * sd / sqrt(n) (sd with ddof=1); "
                                 "empty when <metric>_delta_n < 2",
            "<metric>_delta_hi": "upper end of the same interval; an interval holding 0 means the method@weight "
                                 "does not differ from the baseline on this metric at this sample size",
            "<metric>_delta_n": "number of paired cells behind <metric>_delta",
            "kind": "the method's kind; the baseline is the first method of kind 'baseline'",
            "on_pareto_front": front,
        },
        "variance.csv": {
            "rows": "one per per-image metric and source of variance (diversity, one value per seed group, is "
                    "left out)",
            "source": "prompt, seed, method@weight, or residual (interactions: a seed or a prompt that suits "
                      "one method@weight more than another)",
            "share": "the source's sum of squares over the metric's total, from a main-effects decomposition of "
                     "the balanced (prompt x seed x method@weight) table: sum over the source's levels of "
                     "(values at that level) x (level mean - grand mean)^2; the four shares sum to 1",
            "n": "values used; method@weights missing a (prompt, seed) cell are left out to keep the table "
                 "balanced",
        },
    }


def scoring_cost(result, earlier_runs: list) -> dict:
    """What scoring cost this run, against what generation costs per image.

    Scoring seconds cover embedding generated images and computing metrics; loading the backbones
    (once per process) and embedding the references (once per study) are left out. Generation
    seconds per image come from this run, else from the latest earlier run that generated images.
    """
    cost_path = result.run_dir / "scores" / SCORING_COST_FILE
    embedded = read_previous_json(cost_path).get("images_embedded")
    generated = [(s.images, s.seconds) for s in result.stats.values()]
    for run in reversed(earlier_runs):
        if sum(images for images, _ in generated):
            break
        generated = [(m.get("images", 0), m.get("seconds", 0.0)) for m in run.get("methods", {}).values()]
    images, seconds = sum(i for i, _ in generated), sum(s for _, s in generated)
    generation_per_image = seconds / images if images else None
    scoring_per_image = result.scoring_seconds / embedded if embedded else None
    return {
        "seconds": round(result.scoring_seconds, 3),
        "images_embedded": embedded,
        "seconds_per_image": round(scoring_per_image, 5) if scoring_per_image is not None else None,
        "images_per_second": round(embedded / result.scoring_seconds, 2) if embedded and result.scoring_seconds else None,
        "generation_seconds_per_image": round(generation_per_image, 5) if generation_per_image else None,
        "ratio_per_image": (round(scoring_per_image / generation_per_image, 5)
                            if scoring_per_image is not None and generation_per_image else None),
        "excludes": "loading the scoring backbones and embedding the reference images",
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def suggestions(summary: pd.DataFrame, x: str, y: str, min_x: float | None = None,
                min_y: float | None = None) -> list:
    """Per method (baselines aside), the suggested weights: first, for every method, the best-y weight
    among those keeping x; then the reverse, the best-x weight among those keeping y. A metric is kept
    when its mean is >= the floor given (min_x, min_y), else when its paired difference against the
    baseline is not significantly below 0 (`frontier.not_below_baseline`; no baseline, no suggestion).
    The baseline is found by kind ("baseline"), not by its label.
    """
    from dataclasses import replace

    from .frontier import suggest_weight
    from .stats import baseline_methods

    baselines = baseline_methods(summary)
    rules = []
    for metric, given, keyword in ((x, min_x, "min_x"), (y, min_y, "min_y")):
        if given is not None:
            rules.append(({keyword: float(given)}, "given"))
        elif baselines:
            rules.append(({"keep": metric}, ""))
    found = []
    for rule, source in rules:
        for method in dict.fromkeys(summary["method"]):
            if method in baselines:
                continue
            suggestion = suggest_weight(summary, method, x=x, y=y, **rule)
            if suggestion is not None:
                found.append(replace(suggestion, threshold_source=source))
    return found


def write_scores(result) -> None:
    """scores.csv (long), summary.csv (per method@weight, with the Pareto front and the paired
    differences against the baseline), variance.csv (where each metric's variance comes from),
    frontier.html."""
    from .plots import frontier_figure_with_x_menu, write_frontier_html
    from .stats import variance_shares

    scores = result.scores
    _atomic_csv(scores, result.run_dir / "scores.csv")
    axes = frontier_axes(scores)
    if axes is None:
        return
    summary = result.summary(*axes)
    _atomic_csv(summary, result.run_dir / "summary.csv")
    _atomic_csv(variance_shares(scores), result.run_dir / "variance.csv")
    # The HTML file's x menu offers every per-image metric the run scored, as the app's does.
    xs = x_axis_metrics(scores)
    figure = frontier_figure_with_x_menu(summary, xs, y=axes[1], scores=scores, provenance=result.provenance)
    write_frontier_html(figure, result.run_dir / "frontier.html")


def write_run_outputs(result, loaded, *, device_type: str, base_identity: dict) -> None:
    """cells.csv, grid(s), scores and manifest.json for what is on disk now (also after a stop)."""
    write_cells_csv(result.study, result.run_dir, result.results, result.scores)
    if result.scores is not None and not result.scores.empty:
        write_scores(result)
    if result.results:
        for name, image in grid_images(result):
            atomic_write(result.run_dir / name, lambda partial: image.save(partial, format="PNG"))
    write_manifest(result, loaded, device_type=device_type, base_identity=base_identity)
