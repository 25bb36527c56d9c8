"""The Gradio workbench: layout and event wiring over the library. No generation or scoring here.

The form becomes a study dict (the YAML schema of presets/), `parse_study` validates it, and one
job per Generate runs `run_study` in a worker thread while the event streams the grid, the score
table and the frontier. Every generate event shares one queue (`concurrency_id="gpu"`, limit 1):
one pipeline serves every user, and each job attaches its own adapters and scales.
"""

from __future__ import annotations

import functools
import hashlib
import html
import importlib.util
import inspect
import json
import math
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gradio as gr
import pandas as pd
import yaml

from .errors import StudyError
from .export import reference_images, saved_study, stored_studies, unzip_run, zip_run
from .frontier import metric_label, summarize
from .images import MAX_IMAGE_PIXELS, load_image
from .paths import inside
from .report import grid_column_at, grid_images, read_csv
from .runner import RunResult
from .safe_yaml import MAX_MANIFEST_BYTES, MAX_STUDY_BYTES, load_yaml, read_study_file
from .spec import DTYPES, MAX_SIDE, SCHEDULERS, parse_study

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "presets"
ASSETS = REPO / "assets"
DEFAULT_PRESET = PRESETS / "ip-adapter-weights-sd15.yaml"
TINY_PRESET = PRESETS / "tiny.yaml"
MAX_REFERENCES = 5
STOP_FILE = ".stop"  # a file, not an Event: it reaches a ZeroGPU worker process too
X_AXES = [("DINO", "dino"), ("CLIP-I", "clip_i")]
TABLE_METRICS = ("dino", "clip_i", "clip_t", "diversity")
# "front" second: on a phone only the first columns show without scrolling
TABLE_HEADERS = ["method@weight", "front", "DINO", "CLIP-I", "CLIP-T", "diversity", "n"]
PUBLIC_MAX_CELLS = 64
PUBLIC_MAX_STEPS = 50
PUBLIC_MAX_SIZE = 1024
GPU_MAX_SECONDS = 300
# Events that read files or validate (and may raise gr.Error, which only a queued event shows as a
# toast): queued, but on their own group so they never wait behind a GPU job.
QUICK = dict(queue=True, concurrency_id="io", concurrency_limit=8, show_progress="hidden")
KNOWN_BASES = [
    ("SD 1.5 (stable-diffusion-v1-5)", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("SDXL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("tiny (offline, random weights)", "tiny"),
    ("tiny-xl (offline, random weights)", "tiny-xl"),
]
KNOWN_ADAPTERS = [
    ("default (h94 for SD1.5 / SDXL)", "default"),
    ("tiny", "tiny"),
    ("h94 ip-adapter_sd15", "h94/IP-Adapter:models/ip-adapter_sd15.safetensors"),
    ("h94 ip-adapter-plus_sd15", "h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors"),
    ("h94 ip-adapter_sdxl", "h94/IP-Adapter:sdxl_models/ip-adapter_sdxl.safetensors"),
]
MODEL_FOLDERS = {"base": "checkpoints", "lora": "loras", "adapter": "ip_adapter", "embedding": "embeddings",
                 "checkpoint": "dreambooth"}


@dataclass(frozen=True)
class AppConfig:
    """How the app is served. `public`: allow-listed models only, no typed paths, capped studies."""

    preset: Path | None = None
    public: bool = False
    runs_dir: Path = REPO / "runs" / "app"
    models_dir: Path = REPO / "models"
    queue_size: int = 16
    max_file_size: str | None = None  # default: 10 MB when public
    redraw_seconds: float = 0.5

    @property
    def upload_limit(self) -> str | None:
        return self.max_file_size or ("10mb" if self.public else None)


# ---------------------------------------------------------------- models on offer


@dataclass(frozen=True)
class ModelChoices:
    """Dropdown choices (label, value) per field; in public mode also the allow-list."""

    base: tuple = ()
    lora: tuple = ()
    adapter: tuple = ()
    embedding: tuple = ()
    checkpoint: tuple = ()

    def values(self, name: str) -> set[str]:
        return {value for _, value in getattr(self, name)}


def _sdxl_tag(path: Path) -> str:
    from .models import _is_sdxl_single_file

    try:
        return "SDXL" if _is_sdxl_single_file(path) else "SD1.5"
    except Exception:  # not a readable safetensors file: let the spec say so when it is picked
        return "?"


def discover_models(models_dir: Path) -> ModelChoices:
    """Known hub ids plus the .safetensors files in models_dir/{checkpoints,loras,ip_adapter,embeddings,dreambooth}.

    Base checkpoints may also lie directly in models_dir. DreamBooth entries may be diffusers folders.
    """
    found: dict[str, list] = {name: [] for name in MODEL_FOLDERS}
    if models_dir.is_dir():
        for name, folder in MODEL_FOLDERS.items():
            root = models_dir / folder
            files = sorted(root.rglob("*.safetensors")) if root.is_dir() else []
            if name == "base":
                files = sorted(models_dir.glob("*.safetensors")) + files
                found[name] = [(f"local: {p.name} ({_sdxl_tag(p)})", str(p.resolve())) for p in files]
            elif name == "checkpoint":
                folders = sorted(p.parent for p in root.glob("*/model_index.json")) if root.is_dir() else []
                found[name] = [(f"local: {p.name}", str(p.resolve())) for p in folders + files]
            else:
                found[name] = [(f"local: {p.name}", str(p.resolve())) for p in files]
    tiny = [("tiny", "tiny")]
    return ModelChoices(
        base=tuple(KNOWN_BASES + found["base"]), lora=tuple(tiny + found["lora"]),
        adapter=tuple(KNOWN_ADAPTERS + found["adapter"]), embedding=tuple(tiny + found["embedding"]),
        checkpoint=tuple(tiny + found["checkpoint"]),
    )


def check_public(data: dict, choices: ModelChoices, trusted_references: set[str] = frozenset(),
                 base_dir: Path = REPO) -> dict:
    """Refuse what a public app must not accept: models off the allow-list, typed file paths, huge studies.

    Reference images (relative ones resolve against `base_dir`) must be demo assets (`assets/NAME.png`)
    or files the app itself wrote (`trusted_references`); none is opened, so a refusal says nothing
    about the server's files. Returns `data` with max_cells capped.
    """
    def refuse(field_name: str, value, offered: set[str]) -> StudyError:
        shown = ", ".join(sorted(v for v in offered if v))
        return StudyError(f"{field_name}: {value!r} is not offered on this public app (offered: {shown})")

    if str(data.get("base", "")) not in choices.values("base"):
        raise refuse("base", data.get("base"), choices.values("base"))
    loras = data.get("lora") or []
    for index, item in enumerate(loras if isinstance(loras, list) else [loras]):
        path = item.get("path") if isinstance(item, dict) else item
        if str(path) not in choices.values("lora"):
            raise refuse(f"lora[{index}].path", path, choices.values("lora"))
    options = {"adapter": "adapter", "path": "lora", "embedding": "embedding", "checkpoint": "checkpoint"}
    methods = data.get("methods") or []
    for index, method in enumerate(methods if isinstance(methods, list) else []):  # parse_study names a non-list
        if not isinstance(method, dict):
            continue
        for option, kind in options.items():
            if option in method and str(method[option]) not in choices.values(kind) | {"None"}:
                raise refuse(f"methods[{index}].{option}", method[option], choices.values(kind))
    assets = {str(p.resolve()) for p in ASSETS.glob("*.png")}
    subject = data.get("subject") or {}
    if not isinstance(subject, dict):
        raise StudyError("subject: expected a mapping with reference_images, token, class_noun")
    references = subject.get("reference_images") or []
    for index, ref in enumerate(references if isinstance(references, list) else [references]):
        resolved = str((Path(base_dir) / str(ref)).resolve())
        if resolved not in assets and resolved not in {str(Path(t).resolve()) for t in trusted_references}:
            raise StudyError(f"subject.reference_images[{index}]: {ref!r}: on this public app, upload reference "
                             "images or name a demo subject (assets/chelsea.png, ...); file paths are not accepted")
    # Only numbers are compared here; parse_study names any other value in one line.
    if _above(data.get("steps", 30), PUBLIC_MAX_STEPS):
        raise StudyError(f"steps: at most {PUBLIC_MAX_STEPS} on this public app")
    size = data.get("size", 512)
    if any(_above(side, PUBLIC_MAX_SIZE) for side in (size if isinstance(size, list) else [size])):
        raise StudyError(f"size: at most {PUBLIC_MAX_SIZE} px on this public app")
    max_cells = data.get("max_cells", PUBLIC_MAX_CELLS)
    return {**data, "max_cells": PUBLIC_MAX_CELLS if _above(max_cells, PUBLIC_MAX_CELLS) else max_cells}


def _above(value, limit) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit


# ---------------------------------------------------------------- small parsers and files


def parse_numbers(text: str, field_name: str, kind=float) -> list:
    """'0.3, 0.5 0.7' -> [0.3, 0.5, 0.7]; a StudyError names the field and the bad item."""
    values = []
    for item in re.split(r"[,\s;]+", str(text or "").strip()):
        if not item:
            continue
        try:
            number = float(item)
        except ValueError:
            raise StudyError(f"{field_name}: {item!r} is not a number") from None
        if not math.isfinite(number):
            raise StudyError(f"{field_name}: {item!r} is not a finite number")
        if kind is int:
            if not number.is_integer():
                raise StudyError(f"{field_name}: {item!r} is not a whole number")
            number = int(number)
        values.append(number)
    return values


def _form_number(value, field_name: str, default, kind=int):
    """A gr.Number's value (None: `default`) as `kind`; NaN, infinity or a fraction for a whole number is refused."""
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StudyError(f"{field_name}: {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise StudyError(f"{field_name}: {value!r} is not a finite number")
    if kind is int and not number.is_integer():
        raise StudyError(f"{field_name}: {value!r} is not a whole number")
    return kind(number)


def _numbers_text(values) -> str:
    values = values if isinstance(values, list) else [values]
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def normalize_reference(source: str | Path, folder: Path, field_name: str) -> Path:
    """Decode an upload (any mode, EXIF-rotated, alpha) into an 8-bit RGB PNG named by its content."""
    # bytes, not the path: messages then name the field, not a temp path the user never saw
    try:
        image = load_image(Path(source).read_bytes() if Path(source).is_file() else source, field=field_name)
    except StudyError as error:
        raise StudyError(_upload_message(str(error), field_name)) from None
    folder.mkdir(parents=True, exist_ok=True)
    data = image.tobytes()
    digest = hashlib.sha256(f"{image.size}".encode() + data).hexdigest()[:16]
    path = folder / f"{digest}.png"
    if not path.exists():
        from .files import atomic_write

        atomic_write(path, lambda partial: image.save(partial, format="PNG"))
    return path


def _upload_message(message: str, field_name: str) -> str:
    """load_image's message for bytes, said about the named file and ending in what to do.

    'F: upload is not an image PIL can decode (cannot identify image file <_io.BytesIO ...>)'
    -> 'F is not an image PIL can decode: upload a PNG, JPEG or WebP file'
    """
    message = message.replace(f"{field_name}: upload is ", f"{field_name} is ", 1)
    message = re.sub(r" \(cannot identify image file <_io\.BytesIO object at 0x[0-9a-fA-F]+>\)", "", message)
    bomb = re.search(r"Image size \((\d+) pixels\) exceeds .*decompression bomb", message)
    if bomb:
        return (f"{field_name} is {int(bomb.group(1)) / 1e6:.0f} MP, far over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP "
                "limit (refused unread as a possible decompression bomb): downscale it first")
    if "not an image" in message:
        message += ": upload a PNG, JPEG or WebP file"
    elif "corrupt or truncated" in message:
        message += ": re-save it as PNG or JPEG and upload it again"
    return message


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """A new run folder `<time>-<name>-<128 random bits>`: no one finds another's run by guessing its name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "study").strip("-")[:40] or "study"
    path = runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(16)}"
    path.mkdir(parents=True)
    return path


def served_file(path: str | Path) -> str:
    """A copy of `path` in Gradio's cache, in a folder named by a salted hash of its bytes: what a client gets.

    Run folders are not among the app's allowed_paths, so a client fetches only the copies handed to
    its own session, never a run file by its path.
    """
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    return save_file_to_cache(path, get_upload_folder())


def _stop_file(run_dir: Path, job: str = "") -> Path:
    # one file per session's job: a Stop pressed in another session, in the same folder, reaches nothing
    return Path(run_dir) / (f"{STOP_FILE}-{job}" if job else STOP_FILE)


def request_stop(run_dir: str | None, job: str = "") -> bool:
    """Ask the job `job` writing into run_dir to stop at its next denoising step."""
    if not run_dir or not Path(run_dir).is_dir():
        return False
    _stop_file(run_dir, job).touch()
    return True


def _stop_requested(run_dir: Path, job: str = "") -> bool:
    return _stop_file(run_dir, job).exists()


def _user_errors(fn):
    """StudyError (a study or upload the user can fix) -> gr.Error with its one-line message."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StudyError as error:
                raise gr.Error(str(error)) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudyError as error:
            raise gr.Error(str(error)) from None
    return plain


# ---------------------------------------------------------------- the job


def count_cells(data: dict) -> int:
    methods = data.get("methods") or [{"kind": "baseline"}]
    columns = sum(len(m.get("weights") or [0]) if isinstance(m, dict) else 1 for m in methods)
    return len(data.get("prompts") or []) * len(data.get("seeds") or [0]) * columns


def gpu_seconds(data: dict, run_dir: str, score: bool = True, job: str = "") -> int:
    """ZeroGPU duration for one grid: model load, then per image ~ steps x pixels (SDXL ~2.5x)."""
    size = data.get("size", 512)
    height, width = (size, size) if isinstance(size, int) else size
    sdxl = "xl" in str(data.get("base", "")).lower()
    per_image = int(data.get("steps", 30)) * 0.06 * height * width / 512**2 * (2.5 if sdxl else 1.0)
    per_image += 0.05 if score else 0.0
    methods = len(data.get("methods") or [1])
    return int(min(GPU_MAX_SECONDS, 30 + 10 * methods + count_cells(data) * per_image))


def job_events(data: dict, run_dir: str, score: bool = True, tick: float = 0.25, job: str = "") -> Iterator:
    """Run the study in a worker thread; yield each ProgressEvent, None every `tick` s of quiet, then the RunResult.

    `request_stop(run_dir, job)` stops it within a denoising step.

    Everything yielded is a CPU object (paths, frames, dataclasses), so this can run as one ZeroGPU call.
    An exception in the worker is re-raised here after the run folder's outputs were written.
    """
    from .runner import RunResult, run_study

    run_dir = Path(run_dir)
    study = parse_study(data, source="study", base_dir=REPO)
    events: queue.Queue = queue.Queue()

    def work():
        try:
            events.put(run_study(study, run_dir, progress=events.put,
                                 should_stop=lambda: _stop_requested(run_dir, job),
                                 show_progress_bar=False, score=score))
        except BaseException as error:  # handed to the consumer, which raises it in the request
            events.put(error)

    worker = threading.Thread(target=work, name="workbench-job", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = events.get(timeout=tick)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, RunResult):
                return
    finally:
        if worker.is_alive():  # the consumer went away (closed tab, cancelled): stop within a step
            _stop_file(run_dir, job).touch()
            worker.join(timeout=60)


def _on_gpu(fn):
    """fn as one ZeroGPU call (duration from the grid's size) when the `spaces` package is present."""
    if importlib.util.find_spec("spaces") is None:
        return fn
    import spaces

    return spaces.GPU(duration=gpu_seconds)(fn)


def _scorer_available(study) -> str | None:
    """None when the scoring backbones load; else why not (the grid then runs unscored)."""
    from .models import pick_device
    from .scoring import ScoringSpec, load_scorer

    try:
        load_scorer(ScoringSpec.for_study(study), pick_device())
    except StudyError as error:
        return str(error)
    return None


# ---------------------------------------------------------------- views of a run


@dataclass
class Views:
    """What the result panels show for a run, from a live RunResult or from the run folder."""

    grid: object = None  # PIL image
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_HEADERS))
    figure: object = None
    suggestion: str = ""
    columns: list[str] = field(default_factory=list)
    suggested: str | None = None  # the column of the first suggested weight


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():.3f}" if len(values) < 2 else f"{values.mean():.3f} ± {values.std():.3f}"


def _table_value(row: pd.Series, metric: str) -> str:
    """'0.412 Δ +0.0310 [+0.0120, +0.0500]': the mean, then the paired difference against the baseline
    with its 95% interval (the mean alone on the baseline's row)."""
    from .stats import delta_text

    mean = row[f"{metric}_mean"]
    if pd.isna(mean):
        return ""
    delta = delta_text(row[f"{metric}_delta"], row[f"{metric}_delta_lo"], row[f"{metric}_delta_hi"],
                       row[f"{metric}_delta_n"])
    return f"{mean:.3f}\u202f{delta}" if delta else f"{mean:.3f}"


def score_views(scores: pd.DataFrame | None, provenance: dict, columns: dict, x: str) -> Views:
    """Table, figure and suggested weight from the long score table; `columns` maps (method, weight) -> label."""
    from .plots import frontier_figure
    from .report import frontier_axes, suggestions
    from .stats import baseline_methods

    views = Views()
    if scores is None or scores.empty:
        return views
    axes = frontier_axes(scores)
    if axes is None:
        return views
    metrics = set(scores["metric"])
    x = x if x in metrics else axes[0]
    y = axes[1]
    summary = summarize(scores, x=x, y=y)
    rows = []
    for _, row in summary.iterrows():
        key = (row["method"], float(row["weight"]))
        item = {"method@weight": columns.get(key, f"{row['method']}@{row['weight']:g}"),
                "front": "★" if row["on_pareto_front"] else ""}
        for metric in TABLE_METRICS:
            if f"{metric}_mean" in summary:
                item[metric_label(metric)] = _table_value(row, metric)
        item["n"] = int(row[f"{x}_n"])
        rows.append(item)
    views.table = pd.DataFrame(rows)
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


def _live_columns(result) -> dict:
    return {(r.method, float(r.cell.weight)): r.column for r in result.results}


def live_views(result, x: str, with_scores: bool = True) -> Views:
    views = score_views(result.scores, result.provenance, _live_columns(result), x) if with_scores else Views()
    views.grid = grid_images(result)[0][1]
    views.columns = list(dict.fromkeys(r.column for r in sorted(
        result.results, key=lambda r: (r.cell.method_index, r.cell.weight))))
    return views


def _read_cells(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "cells.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


def disk_views(run_dir: Path, x: str) -> Views:
    """Views of a finished (or stopped, or loaded) run folder: grid.png, scores.csv, manifest metrics."""
    from PIL import Image

    cells = _read_cells(run_dir)
    columns = {}
    if cells is not None:
        columns = {(m, float(w)): c for m, w, c in zip(cells["method"], cells["weight"], cells["column"])}
    scores = read_csv(run_dir / "scores.csv") if (run_dir / "scores.csv").is_file() else None
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    views = score_views(scores, manifest.get("metrics", {}), columns, x)
    if (run_dir / "grid.png").is_file():
        with Image.open(run_dir / "grid.png") as grid:
            views.grid = grid.convert("RGB")
    views.columns = list(dict.fromkeys(columns.values()))
    return views


def column_detail(run_dir: Path, column: str) -> tuple[list, str]:
    """The images of one method@weight column (every prompt and seed), captioned with their scores."""
    cells = _read_cells(run_dir)
    if cells is None or not column:
        return [], ""
    rows = cells[cells["column"] == column].sort_values(["prompt_index", "seed"])
    if rows.empty:
        return [], f"No images for `{column}` in this run yet."
    metrics = [m for m in ("dino", "clip_i", "clip_t") if m in rows]
    items = []
    for _, row in rows.iterrows():
        try:  # cells.csv is a file a client may have written (a loaded zip): its rows name files of the run only
            image = inside(run_dir, row["image"], "cells.csv: image")
        except StudyError:
            continue
        if not image.is_file():
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
    cells = _read_cells(run_dir)
    return 0 if cells is None else int(cells.loc[cells["column"] == column, "seed"].nunique())


def grid_click_column(run_dir: Path, data: dict | None, x: float) -> str | None:
    """The column under a click at pixel column `x` of the run's grid, if it has images yet."""
    manifest = run_dir / "manifest.json"
    try:
        if manifest.is_file():  # a loaded zip's manifest names its references relative to the run folder
            study = parse_study(json.loads(manifest.read_text())["study"], source=str(manifest), base_dir=run_dir)
        elif data:
            study = parse_study(data, source="study", base_dir=REPO)
        else:
            return None
    except (StudyError, KeyError, ValueError):
        return None
    column = grid_column_at(study, x)
    cells = _read_cells(run_dir)
    return column if cells is not None and column in set(cells["column"]) else None


def column_for_click(run_dir: Path, text: str) -> str | None:
    """'method|weight|nonce' from a click on the frontier -> that method@weight's column label."""
    cells = _read_cells(run_dir)
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


def _references_inside(data: dict, run_dir: Path, what: str) -> dict:
    """A run folder's study with its reference images resolved inside the folder (StudyError for one outside)."""
    references = [str(inside(run_dir, ref, f"{what}: subject.reference_images[{index}]"))
                  for index, ref in enumerate(reference_images(data))]
    return {**data, "subject": {**(data.get("subject") or {}), "reference_images": references}}


def failure_text(done: int, total: int, message: str) -> str:
    """What the status line says after a failed job; it promises kept images only when there are some."""
    if not done:
        return f"Failed before the first image: {message}. Fix that and press Generate."
    return (f"Failed after {done}/{total} cells: {message}. The {done} finished images are kept; "
            "press Generate to make the rest.")


def progress_html(done: int, total: int, text: str, state: str = "running") -> str:
    percent = 100.0 * done / total if total else 0.0
    return (f'<div class="wb-progress {state}"><div class="wb-bar"><div style="width:{percent:.1f}%"></div></div>'
            f'<div class="wb-text">{html.escape(text)}</div></div>')


# ---------------------------------------------------------------- the form

METHOD_ROWS = [
    # kind, title, option field, option choices name, default weights
    ("baseline", "Baseline (text only)", None, None, None),
    ("ip_adapter", "IP-Adapter", "adapter", "adapter", "0.3, 0.5, 0.7"),
    ("lora", "Subject LoRA", "path", "lora", "0.6, 1.0"),
    ("textual_inversion", "Textual inversion", "embedding", "embedding", "1.0"),
    ("dreambooth", "DreamBooth", "checkpoint", "checkpoint", "1.0"),
]


@dataclass
class MethodRow:
    kind: str
    title: str
    option: str | None
    use: gr.Checkbox
    weights: gr.Textbox | None
    choice: gr.Dropdown | None


class Form:
    """The study form: components, form values -> study dict, and study dict -> form values."""

    def __init__(self, choices: ModelChoices, public: bool):
        custom = not public
        self.name = gr.Textbox(label="Study name", value="study", max_lines=1)
        with gr.Accordion("1 · Model", open=True):
            self.base = gr.Dropdown(list(choices.base), label="Base checkpoint", allow_custom_value=custom,
                                    info=None if public else "hub id, or a local .safetensors (SD1.5 or SDXL) "
                                    "found in models/")
            with gr.Row():
                self.loras = gr.Dropdown(list(choices.lora), label="LoRA(s) on every cell", multiselect=True,
                                         allow_custom_value=custom, scale=3, min_width=200)
                self.lora_weight = gr.Number(1.0, label="LoRA weight", minimum=-2, maximum=2, step=0.05,
                                             scale=2, min_width=120)
        with gr.Accordion("2 · Subject", open=True):
            self.demo_subject = gr.Dropdown(
                [("— upload your own —", "")] + [(p.stem, str(p.resolve())) for p in sorted(ASSETS.glob("*.png"))],
                value="", label="Demo subject")
            # A button, not gr.File: a refused file left in a file box would go along with the next upload.
            self.uploads = gr.UploadButton(f"Upload reference images (1–{MAX_REFERENCES})", file_count="multiple",
                                           file_types=["image"], elem_id="reference-upload", size="md")
            # shown as the methods see them: upright, 8-bit RGB, transparency on white
            self.reference_gallery = gr.Gallery(label="References", show_label=False, columns=5,
                                                height="auto", object_fit="cover", allow_preview=False,
                                                preview=False, interactive=False, fit_columns=False,
                                                elem_id="reference-gallery", buttons=[])
            with gr.Row():
                self.token = gr.Textbox(label="Identifier token", value="sks", max_lines=1, min_width=100)
                self.class_noun = gr.Textbox(label="Class noun", value="", max_lines=1, min_width=100)
        with gr.Accordion("3 · Prompts and sampling", open=True):
            self.prompts = gr.Textbox(label="Prompts, one per line ({subject} and {class} are filled in)", lines=3,
                                      max_lines=12, elem_id="prompts")
            self.prompt_list = gr.Dropdown([("—", "")] + [(p.stem, str(p)) for p in sorted(PRESETS.glob("*.yaml"))],
                                           value="", label="Replace the prompts with a preset's list")
            with gr.Row():
                self.seeds = gr.Textbox(label="Seeds", value="0, 1", max_lines=1, min_width=90, elem_id="seeds")
                self.steps = gr.Number(30, label="Steps", precision=0, minimum=1, maximum=PUBLIC_MAX_STEPS if public
                                       else 200, min_width=70)
                self.guidance = gr.Number(7.5, label="Guidance", minimum=1, maximum=30, step=0.5, min_width=70)
            with gr.Row():
                self.height = gr.Number(512, label="Height", precision=0, minimum=8, maximum=MAX_SIDE, step=8,
                                        min_width=70)
                self.width = gr.Number(512, label="Width", precision=0, minimum=8, maximum=MAX_SIDE, step=8,
                                       min_width=70)
            with gr.Accordion("More settings", open=False):
                self.negative_prompt = gr.Textbox(label="Negative prompt", value="lowres, blurry", max_lines=2)
                with gr.Row():
                    self.scheduler = gr.Dropdown(list(SCHEDULERS), value="default", label="Scheduler", min_width=100)
                    self.dtype = gr.Dropdown(list(DTYPES), value="auto", label="dtype", min_width=100)
                    self.max_cells = gr.Number(PUBLIC_MAX_CELLS if public else 1000, label="max cells", precision=0,
                                               minimum=1, interactive=not public, min_width=90)
        with gr.Accordion("4 · Methods and weights", open=True):
            gr.Markdown("Tick methods and type their weights, e.g. `0.3, 0.5, 0.7`.", elem_classes="wb-hint")
            self.methods: list[MethodRow] = []
            for kind, title, option, choice_name, default_weights in METHOD_ROWS:
                with gr.Row(elem_classes="wb-method", equal_height=True):
                    use = gr.Checkbox(label=title, value=kind in ("baseline", "ip_adapter"), min_width=150, scale=2,
                                      elem_id=f"use-{kind}")
                    weights = gr.Textbox(default_weights, label="weights", max_lines=1, min_width=110, scale=2,
                                         elem_id=f"weights-{kind}") if default_weights else None
                    options = list(getattr(choices, choice_name)) if choice_name else []
                    choice = gr.Dropdown(options, value=options[0][1], label=option, allow_custom_value=custom,
                                         min_width=130, scale=3, elem_id=f"option-{kind}") if option else None
                    if kind == "baseline":
                        gr.HTML("", min_width=0, scale=5)
                self.methods.append(MethodRow(kind, title, option, use, weights, choice))
            self.ti_token = gr.Textbox("<subject>", label="Textual-inversion token", max_lines=1)
        self.notes = gr.Markdown("", elem_classes="wb-notes")

    def components(self) -> set:
        parts = {self.name, self.base, self.loras, self.lora_weight, self.token, self.class_noun, self.prompts,
                 self.seeds, self.steps, self.guidance, self.height, self.width, self.negative_prompt,
                 self.scheduler, self.dtype, self.max_cells, self.ti_token}
        for row in self.methods:
            parts |= {c for c in (row.use, row.weights, row.choice) if c is not None}
        return parts

    def read(self, v: dict, references: list[str]) -> dict:
        """The study dict (presets/ schema) the form describes."""
        methods = []
        for row in self.methods:
            if not v[row.use]:
                continue
            item = {"kind": row.kind}
            if row.weights is not None:
                item["weights"] = parse_numbers(v[row.weights], f"{row.title} weights")
                if not item["weights"]:
                    raise StudyError(f"{row.title} weights: type at least one weight, e.g. 0.5")
            if row.option:
                item[row.option] = v[row.choice]
            if row.kind == "textual_inversion":
                item["token"] = (v[self.ti_token] or "").strip() or "<subject>"
            methods.append(item)
        if not methods:
            raise StudyError("methods: tick at least one method")
        height, width = _form_number(v[self.height], "height", 0), _form_number(v[self.width], "width", 0)
        prompts = [line.strip() for line in (v[self.prompts] or "").splitlines() if line.strip()]
        lora_weight = _form_number(v[self.lora_weight], "LoRA weight", 1.0, float)
        return {
            "name": (v[self.name] or "study").strip(),
            "base": v[self.base],
            "lora": [{"path": path, "weight": lora_weight} for path in (v[self.loras] or [])],
            "subject": {"reference_images": list(references), "token": (v[self.token] or "").strip(),
                        "class_noun": (v[self.class_noun] or "").strip()},
            "prompts": prompts,
            "seeds": parse_numbers(v[self.seeds], "seeds", int),
            "steps": _form_number(v[self.steps], "steps", 0),
            "guidance": _form_number(v[self.guidance], "guidance", 7.5, float),
            "size": height if height == width else [height, width],
            "scheduler": v[self.scheduler],
            "negative_prompt": v[self.negative_prompt] or "",
            "dtype": v[self.dtype],
            "max_cells": _form_number(v[self.max_cells], "max cells", 1000) or 1000,
            "methods": methods,
        }

    def fill(self, data: dict) -> dict:
        """Form updates for a study dict, and notes on what the form cannot show (edit those as YAML)."""
        notes = []
        size = data.get("size", 512)
        height, width = (size, size) if isinstance(size, int) else (size + size)[:2]
        loras = data.get("lora") or []
        loras = [loras] if isinstance(loras, (dict, str)) else loras
        lora_paths = [item["path"] if isinstance(item, dict) else item for item in loras]
        lora_weights = {float(item.get("weight", 1.0)) if isinstance(item, dict) else 1.0 for item in loras}
        if len(lora_weights) > 1:
            notes.append("the LoRAs have different weights; the form shows one")
        subject = data.get("subject") or {}
        updates = {
            self.name: data.get("name", "study"), self.base: data.get("base", KNOWN_BASES[0][1]),
            self.loras: lora_paths, self.lora_weight: next(iter(lora_weights), 1.0),
            self.token: subject.get("token", "sks"), self.class_noun: subject.get("class_noun", ""),
            self.prompts: "\n".join(data.get("prompts") or []), self.seeds: _numbers_text(data.get("seeds", [0])),
            self.steps: data.get("steps", 30), self.guidance: data.get("guidance", 7.5),
            self.height: height, self.width: width, self.negative_prompt: data.get("negative_prompt") or "",
            self.scheduler: data.get("scheduler", "default"), self.dtype: data.get("dtype", "auto"),
            self.max_cells: data.get("max_cells", 1000),
        }
        methods = [m if isinstance(m, dict) else {"kind": m} for m in data.get("methods") or [{"kind": "baseline"}]]
        for row in self.methods:
            mine = [m for m in methods if m.get("kind") == row.kind]
            updates[row.use] = bool(mine)
            if not mine:
                continue
            first = mine[0]
            if len(mine) > 1:
                notes.append(f"{len(mine)} {row.kind} entries; the form shows the first")
            extra = set(first) - {"kind", "weights", "label", row.option, "token"}
            if extra or first.get("label", row.kind) != row.kind:
                notes.append(f"{row.kind} has {', '.join(sorted(extra)) or 'a label'}, which the form does not show")
            if row.weights is not None:
                from .methods import METHODS

                weights = first.get("weights", METHODS[row.kind].default_weights)
                if weights is not None:
                    updates[row.weights] = _numbers_text(list(weights) if isinstance(weights, tuple) else weights)
            if row.option:
                updates[row.choice] = str(first.get(row.option, "default" if row.kind == "ip_adapter" else ""))
            if row.kind == "textual_inversion" and "token" in first:
                updates[self.ti_token] = first["token"]
        updates[self.notes] = ("**Note:** " + "; ".join(notes) + ". Run it from **Study YAML** to keep every "
                               "detail.") if notes else ""
        return updates


# ---------------------------------------------------------------- layout and wiring

CSS = """
.wb-progress { margin: 2px 0 4px; }
.wb-bar { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
.wb-bar > div { height: 100%; background: var(--color-accent); transition: width .25s; }
.wb-progress.done .wb-bar > div { background: #2e9e5b; }
.wb-progress.stopped .wb-bar > div, .wb-progress.failed .wb-bar > div { background: #d9822b; }
.wb-text { font-size: 0.9em; margin-top: 4px; color: var(--body-text-color); }
.wb-hint p, .wb-notes p { font-size: 0.9em; margin: 0; }
.wb-method .form { flex-wrap: wrap; align-items: end; background: transparent; border: none; box-shadow: none; }
.wb-method [id^="use-"] { flex: 2 1 150px !important; min-width: 150px !important; }
.wb-method [id^="use-"] label { background: none !important; border: none !important; box-shadow: none !important; }
.wb-method [id^="weights-"] { flex: 2 1 100px !important; }
.wb-method [id^="option-"] { flex: 3 1 140px !important; }
.wb-banner { border-left: 4px solid #d9822b; padding: 6px 10px; background: var(--neutral-50); flex-wrap: wrap; }
#banner-text { flex: 1 1 260px !important; min-width: 240px !important; }
#plot-click { display: none !important; }
#grid-image img { object-fit: contain; }
/* room above the grid for the download / fullscreen buttons, which would cover its column headers */
#grid-image .image-frame { padding-top: 34px; }
#column-gallery .caption-label { white-space: normal; max-width: calc(100% - 2 * var(--block-label-margin));
  font-size: 12px; line-height: 1.3; }
#score-table [role=gridcell], #score-table [role=columnheader] { font-size: 12.5px; }
#column-gallery .grid-wrap, #reference-gallery .grid-wrap { height: auto !important; min-height: 0 !important; }
#column-gallery .grid-wrap { max-height: 720px !important; }
#frontier-title p { margin: 0; }
#frontier-note p { font-size: 0.85em; margin: 0; color: var(--body-text-color-subdued); }
@media (max-width: 640px) {
  #column-gallery .grid-container { grid-template-columns: 1fr !important; }
  #frontier .xtitle, #frontier .ytitle { font-size: 11px !important; }  /* the x title overran the right edge */
}
"""

# Plotly click -> hidden button: gr.Plot has no select event, so the page script keeps the clicked
# point in window.workbenchClick and clicks the button, whose event reads it through `js`.
HEAD = """
<style>
  /* Unscoped (css= is scoped inside .contain): 32 px a side is a tenth of a phone's width. */
  @media (max-width: 640px) { .gradio-container .main.fillable { padding: 8px !important; } }
</style>
<script>
(() => {
  function bind() {
    document.querySelectorAll('#frontier .js-plotly-plot').forEach((plot) => {
      if (plot.dataset.wbBound === '1' || typeof plot.on !== 'function') return;
      plot.dataset.wbBound = '1';
      plot.on('plotly_click', (event) => {
        const point = event && event.points && event.points[0];
        if (!point) return;
        const method = point.data.legendgroup || point.data.name;
        const weight = point.customdata ? point.customdata[1] : '';
        const button = document.querySelector('#plot-click');
        if (!button || !method) return;
        window.workbenchClick = method + '|' + weight;
        button.click();
      });
    });
  }
  setInterval(bind, 400);
})();
</script>
"""


def launch_options(config: AppConfig) -> dict:
    """Keyword arguments for `demo.launch(...)` that belong to the app (theme, CSS, files it may serve).

    Run folders are not served by path: handlers hand out copies (`served_file`).
    """
    return dict(css=CSS, head=HEAD, theme=gr.themes.Soft(), allowed_paths=[str(ASSETS)],
                max_file_size=config.upload_limit, footer_links=["api", "gradio"])


def _preset_data(path: Path) -> tuple[dict, list[str]]:
    """A preset's raw dict (weight options as written, e.g. `tiny`) and its resolved reference images."""
    from .spec import load_study

    study = load_study(path)
    data = read_study_file(path)
    return data, list(study.subject.reference_images)


def _device_banner(base: str) -> str:
    from .models import pick_device

    if base in ("tiny", "tiny-xl") or pick_device().startswith("cuda") or importlib.util.find_spec("spaces"):
        return ""
    return ("**No GPU here.** Real SD1.5/SDXL models would take minutes per image on this CPU. "
            "Load the **tiny preset** to try every method offline in seconds (random-weight models: "
            "the images are noise, the machinery is real).")


def build_app(config: AppConfig = AppConfig()) -> gr.Blocks:
    """The workbench Blocks app, queued (one GPU queue); launch it with `launch_options(config)`."""
    return Workbench(config).build()


class Workbench:
    """One app: its config, its components and the handlers wired to them.

    Per-session data lives in gr.State (reference images, the prepared study, the run folder);
    this object holds only configuration and component handles, shared by every session.
    """

    def __init__(self, config: AppConfig):
        self.config = config
        config.runs_dir.mkdir(parents=True, exist_ok=True)
        self.choices = discover_models(config.models_dir)
        self.preset_path = (Path(config.preset) if config.preset else DEFAULT_PRESET).resolve()
        self.initial, self.initial_refs = _preset_data(self.preset_path)
        self.demo_assets = {str(p.resolve()) for p in ASSETS.glob("*.png")}
        self.gpu_job = _on_gpu(job_events)

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Personalization workbench", analytics_enabled=False) as demo:
            self.layout()
            self.wire(demo)
        demo.queue(max_size=self.config.queue_size, default_concurrency_limit=1)
        return demo

    # ------------------------------------------------------------ layout

    def layout(self) -> None:
        config = self.config
        self.refs_state = gr.State(self.initial_refs)  # reference image paths of this session
        self.study_state = gr.State(None)  # the study dict of the job being prepared / run
        self.run_state = gr.State(None)  # this session's run folder (reused: cached cells come back at once)
        self.job_state = gr.State(None)  # this session's job token: its Stop reaches only the jobs it started

        gr.Markdown("# Personalization workbench\nCompare personalization methods side by side: a grid of "
                    "method × weight × seed × prompt, scored live (CLIP-I, CLIP-T, DINO) on a fidelity frontier.")
        banner_text = _device_banner(str(self.initial.get("base", "")))
        with gr.Row(visible=bool(banner_text), elem_classes="wb-banner") as self.banner:
            gr.Markdown(banner_text, elem_id="banner-text")
            self.tiny_button = gr.Button("Load the tiny preset", size="sm", scale=0, min_width=160)

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                with gr.Accordion("Load a preset or a saved run", open=False):
                    presets = sorted(PRESETS.glob("*.yaml"))
                    with gr.Row(equal_height=True):
                        self.preset_pick = gr.Dropdown(
                            [(p.stem, str(p)) for p in presets], label="Preset", scale=3, min_width=160,
                            value=str(self.preset_path) if self.preset_path in presets else None)
                        self.preset_button = gr.Button("Load preset", scale=1, min_width=100)
                    self.load_file = gr.File(label="…or a study .yaml, a manifest.json, or an exported run .zip",
                                             file_types=[".yaml", ".yml", ".json", ".zip"], height=90)
                    self.run_pick = self.run_button = None
                    if not config.public:  # no browsing of the server's folders on a public app
                        with gr.Row(equal_height=True):
                            self.run_pick = gr.Dropdown(_saved_runs(config.runs_dir), scale=3, min_width=160,
                                                        label=f"…or a run folder in {config.runs_dir.name}/")
                            self.run_button = gr.Button("Open run", scale=1, min_width=100)
                self.form = Form(self.choices, config.public)

            with gr.Column(scale=3, min_width=340):
                with gr.Row():
                    self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate", scale=2,
                                                     min_width=110, size="md")
                    self.stop_button = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=70,
                                                 size="md")
                    self.new_button = gr.Button("New run", elem_id="new-run", scale=1, min_width=90, size="md")
                self.status = gr.HTML(progress_html(0, 0, "Set up a study and press Generate."), elem_id="status")
                self.grid = gr.Image(label="Grid (columns method@weight, rows seeds by prompt)", show_label=False,
                                     type="pil", format="png", interactive=False, elem_id="grid-image",
                                     buttons=["download", "fullscreen"])
                self.x_axis = gr.Radio(X_AXES, value="dino", label="Image-fidelity axis", elem_id="x-axis")
                gr.Markdown("**Fidelity frontier** · click a point to inspect its images", elem_id="frontier-title")
                self.plot = gr.Plot(label="Fidelity frontier", show_label=False, elem_id="frontier")
                gr.Markdown("Means ± std over prompts and seeds, labelled with their weight; the baseline is the "
                            "star; the dashed line is the Pareto front. Up and right is better.",
                            elem_id="frontier-note")
                self.suggestion = gr.Markdown("", elem_id="suggestion")
                self.table = gr.Dataframe(
                    Views().table, label="Scores per method@weight (mean ± std over prompts and seeds; click a row "
                    "to inspect it)", interactive=False, elem_id="score-table", max_height=420,
                    column_widths=["140px", "58px", "124px", "124px", "124px", "102px", "36px"])
                with gr.Accordion("Inspect one method@weight", open=True):
                    self.column_pick = gr.Dropdown([], label="Column", elem_id="column-pick")
                    self.column_info = gr.Markdown("")
                    self.column_gallery = gr.Gallery(label="Images", show_label=False, columns=2, height="auto",
                                                     object_fit="contain", fit_columns=False, elem_id="column-gallery")
                # clicked by the page script (HEAD) when a frontier point is clicked; hidden by CSS
                self.plot_click = gr.Button("inspect the clicked point", elem_id="plot-click", size="sm")
                with gr.Accordion("Export", open=False):
                    self.export_button = gr.Button("Export the run as .zip")
                    self.export_file = gr.File(label="Run zip: grids, images with metadata, cells.csv, summary.csv, "
                                               "frontier.html, manifest.json", interactive=False)
                with gr.Accordion("Study YAML", open=False):
                    gr.Markdown("The same schema as `presets/*.yaml` and the `/run` API.", elem_classes="wb-hint")
                    self.yaml_code = gr.Code(_yaml(self.initial), language="yaml", lines=14, max_lines=40,
                                             interactive=True)
                    with gr.Row():
                        self.yaml_run_button = gr.Button("Run this YAML", variant="primary")
                        self.yaml_form_button = gr.Button("Put it in the form")

        with gr.Row(visible=False):  # the scripted entry point /run, and the clicked point's text
            self.api_yaml = gr.Textbox(label="study_yaml")
            self.api_refs = gr.File(label="reference_images", file_count="multiple")
            self.api_grids = gr.Gallery(label="grids", format="png")
            self.api_table = gr.Dataframe(label="summary")
            self.api_plot = gr.Plot(label="frontier")
            self.api_button = gr.Button("run")
            self.plot_text = gr.Textbox(label="clicked point")

    # ------------------------------------------------------------ wiring

    def wire(self, demo: gr.Blocks) -> None:
        form = self.form
        private = dict(api_visibility="private")
        quick = {**QUICK, **private}
        instant = dict(queue=False, **private)
        form_inputs = form.components()
        self.panels = {self.status, self.grid, self.table, self.plot, self.suggestion, self.column_pick}
        self.load_outputs = form_inputs | self.panels | {
            form.notes, self.refs_state, form.reference_gallery, form.demo_subject, self.run_state, self.yaml_code,
            self.banner}

        # subject
        form.uploads.upload(self.on_upload, form.uploads, self.reference_outputs, **quick)
        form.demo_subject.input(self.on_demo_subject, form.demo_subject, self.reference_outputs, **instant)
        form.prompt_list.input(self.on_prompt_list, form.prompt_list, form.prompts, **quick)

        # presets, files, runs
        self.preset_button.click(self.on_preset, self.preset_pick, self.load_outputs, **quick)
        self.tiny_button.click(lambda: self.on_preset(str(TINY_PRESET)), None, self.load_outputs, **quick)
        self.load_file.upload(self.on_load_file, self.load_file, self.load_outputs, **quick)
        if self.run_pick is not None:
            self.run_button.click(self.on_open_run, self.run_pick, self.load_outputs, **quick)
            self.run_pick.focus(lambda: gr.update(choices=_saved_runs(self.config.runs_dir)), None, self.run_pick,
                                **instant)
        self.yaml_form_button.click(self.on_yaml_to_form, [self.yaml_code, self.refs_state],
                                    self.load_outputs - self.panels - {self.run_state}, **quick)
        demo.load(lambda: self.filled(self.initial, self.initial_refs, message="Set up a study and press Generate."),
                  None, self.load_outputs, **instant)

        # generate (validate at once, then wait for the GPU queue), stop, start over
        prepared = {self.study_state, self.run_state, self.job_state, self.yaml_code, self.status}
        job = dict(fn=self.run_job, inputs=[self.study_state, self.run_state, self.job_state, self.x_axis,
                                            self.column_pick],
                   outputs=[*self.panels, self.generate_button], concurrency_id="gpu", concurrency_limit=1,
                   show_progress="hidden", **private)
        self.generate_button.click(self.on_generate, form_inputs | {self.refs_state, self.run_state, self.job_state},
                                   prepared, **quick).success(**job)
        self.yaml_run_button.click(self.on_yaml_run, [self.yaml_code, self.refs_state, self.run_state,
                                                      self.job_state], prepared, **quick).success(**job)
        self.stop_button.click(self.on_stop, [self.run_state, self.job_state], None, **instant)
        self.new_button.click(self.on_new_run, None, self.panels | {self.run_state, self.column_gallery,
                                                                    self.column_info, self.export_file}, **instant)

        # explore
        self.x_axis.input(self.on_axis, [self.run_state, self.x_axis], {self.plot, self.table, self.suggestion},
                          **instant)
        self.column_pick.change(self.on_column, [self.run_state, self.column_pick],
                                [self.column_gallery, self.column_info], **instant)
        self.table.select(self.on_table_select, None, self.column_pick, **instant)
        self.grid.select(self.on_grid_select, [self.study_state, self.run_state], self.column_pick, **instant)
        self.plot_click.click(self.on_plot_click, [self.run_state, self.plot_text], self.column_pick, **instant,
                              js="(run_dir, text) => [run_dir, window.workbenchClick || '']")
        self.export_button.click(self.on_export, self.run_state, self.export_file, **quick)

        self.api_button.click(self.api_run, [self.api_yaml, self.api_refs], [self.api_grids, self.api_table,
                                                                            self.api_plot], api_name="run",
                              api_description="Run a study given as YAML text (the schema of presets/; optional "
                              "reference images replace subject.reference_images). Returns the grid image(s), the "
                              "summary table (one row per method@weight: mean, std, n of each metric, "
                              "on_pareto_front) and the Plotly frontier.",
                              concurrency_id="gpu", concurrency_limit=1)

    # ------------------------------------------------------------ subject

    @property
    def reference_outputs(self) -> set:
        return {self.refs_state, self.form.reference_gallery, self.form.demo_subject}

    def set_references(self, paths: list[str]) -> dict:
        demo = paths[0] if len(paths) == 1 and paths[0] in self.demo_assets else ""
        return {self.refs_state: paths, self.form.reference_gallery: [(served_file(p), None) for p in paths],
                self.form.demo_subject: demo}

    @_user_errors
    def on_upload(self, files: list[str] | None, request: gr.Request) -> dict:
        files = files or []
        if len(files) > MAX_REFERENCES:
            raise StudyError(f"reference images: {len(files)} uploaded; use at most {MAX_REFERENCES}")
        session = hashlib.sha256(str(request.session_hash).encode()).hexdigest()[:16]
        folder = self.config.runs_dir / "uploads" / session
        return self.set_references([str(normalize_reference(f, folder, f"reference image {Path(f).name}"))
                                    for f in files])

    @_user_errors
    def on_demo_subject(self, path: str) -> dict:
        return self.set_references([str(inside(ASSETS, path, "demo subject"))]) if path else {}

    @_user_errors
    def on_prompt_list(self, path: str):
        if not path:
            return gr.update()
        data, _ = _preset_data(inside(PRESETS, path, "prompts preset"))
        return "\n".join(data.get("prompts") or [])

    # ------------------------------------------------------------ presets, files, runs

    def filled(self, data: dict, references: list[str], run_dir: Path | None = None, message: str = "") -> dict:
        """Every load output for a study (and the run folder it continues, if any)."""
        views = disk_views(run_dir, "dino") if run_dir else Views()
        return {
            **self.form.fill(data), **self.set_references(references), self.yaml_code: _yaml(data),
            self.banner: gr.update(visible=bool(_device_banner(str(data.get("base", ""))))),
            self.run_state: str(run_dir) if run_dir else None, **self.render(views, progress_html(
                0, 0, message or "Loaded. Press Generate.")),
            self.column_pick: gr.update(choices=views.columns, value=None),
        }

    def checked(self, data: dict, trusted: set[str] = frozenset(), base_dir: Path = REPO) -> dict:
        return check_public(data, self.choices, trusted, base_dir) if self.config.public else data

    @_user_errors
    def on_preset(self, path: str) -> dict:
        if not path:
            raise StudyError("preset: pick one first")
        data, references = _preset_data(inside(PRESETS, path, "preset"))
        return self.filled(data, references, message=f"Loaded preset {Path(path).stem}. Press Generate.")

    def open_run(self, run_dir: Path, what: str) -> dict:
        """A run folder's study in the form, its views in the panels; its references must be files inside it."""
        data = _references_inside(saved_study(run_dir), run_dir, what)
        trusted = set(data["subject"]["reference_images"])
        study = parse_study(self.checked(data, trusted, run_dir), source=what, base_dir=run_dir)
        if self.config.public and (run_dir / "manifest.json").is_file():  # its study draws the grid's click map
            saved = _references_inside(stored_studies(run_dir)["manifest.json"], run_dir, f"{what}: manifest.json")
            self.checked(saved, set(saved["subject"]["reference_images"]), run_dir)
        cells = _read_cells(run_dir)
        on_disk, total = 0 if cells is None else len(cells), len(study.cells())
        return self.filled(data, list(study.subject.reference_images), run_dir,
                           f"Loaded run {run_dir.name}: {on_disk}/{total} cells on disk. Press Generate to "
                           "continue (only missing cells are generated).")

    @_user_errors
    def on_load_file(self, path: str | None) -> dict:
        if not path:
            return {}
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".zip":
            # "20261123-133925-tiny-14d978.zip" (a run exported here) -> a folder "<now>-tiny-<new id>"
            run_dir = new_run_dir(self.config.runs_dir, re.sub(r"^\d{8}-\d{6}-(.*)-[0-9a-f]{6,32}$", r"\1", path.stem))
            try:
                return self.open_run(unzip_run(path, run_dir), path.name)
            except StudyError:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
        # a manifest.json grows a little with every rerun; its study is capped like any other
        data = read_study_file(path, path.name, max_bytes=MAX_MANIFEST_BYTES if suffix == ".json" else MAX_STUDY_BYTES)
        if suffix == ".json":
            if not isinstance(data, dict) or "study" not in data:
                raise StudyError(f"{path.name}: not a manifest.json (no 'study' key)")
            data = data["study"]
        study = parse_study(self.checked(_mapping(data, path.name)), source=path.name, base_dir=REPO)
        return self.filled(data, list(study.subject.reference_images), message=f"Loaded {path.name}. Press Generate.")

    @_user_errors
    def on_open_run(self, path: str | None) -> dict:
        if not path:
            raise StudyError("run folder: pick one first")
        run_dir = inside(self.config.runs_dir, path, "run folder")
        return self.open_run(run_dir, run_dir.name)

    @_user_errors
    def on_yaml_to_form(self, text: str, references: list[str]) -> dict:
        data = self.checked(_mapping(_load_yaml(text), "Study YAML"), set(references or []))
        study = parse_study(data, source="Study YAML", base_dir=REPO)
        updates = self.filled(data, list(study.subject.reference_images) or list(references or []))
        # same session, same run folder: cells already made stay cached
        return {key: value for key, value in updates.items() if key not in self.panels | {self.run_state}}

    # ------------------------------------------------------------ generate, stop

    def prepare(self, data: dict, run_dir: str | None, trusted: set[str], job: str | None = None) -> dict:
        """Validate (before any GPU work), pick the run folder, copy the references into it.

        A new run folder is made only for a valid study. `job` is the session's job token (a new one
        when it has none yet): its Stop reaches only the jobs it started.
        """
        data = self.checked(data, trusted)
        study = parse_study(data, source="study", base_dir=REPO)
        fresh = not (run_dir and Path(run_dir).is_dir())
        run_dir = new_run_dir(self.config.runs_dir, study.name) if fresh else Path(run_dir)
        job = job or secrets.token_hex(16)
        _stop_file(run_dir, job).unlink(missing_ok=True)
        try:
            refs = [str(normalize_reference(p, run_dir / "references", f"subject.reference_images[{i}]"))
                    for i, p in enumerate(study.subject.reference_images)]
        except StudyError:
            if fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        data = {**data, "subject": {**(data.get("subject") or {}), "reference_images": refs}}
        total = len(study.cells())
        return {self.study_state: data, self.run_state: str(run_dir), self.job_state: job, self.yaml_code: _yaml(data),
                self.status: progress_html(0, total, f"Queued: {total} cells into {run_dir.name}/ …")}

    @_user_errors
    def on_generate(self, v: dict) -> dict:
        references = v[self.refs_state] or []
        if not references:
            raise StudyError("reference images: upload 1–5 images of the subject or pick a demo subject")
        return self.prepare(self.form.read(v, references), v[self.run_state], set(references), v[self.job_state])

    @_user_errors
    def on_yaml_run(self, text: str, references: list[str], run_dir: str | None, job: str | None = None) -> dict:
        data = _mapping(_load_yaml(text), "Study YAML")
        trusted = set(references or [])
        if run_dir:  # the YAML shown after a Generate names the copies in the run folder
            trusted |= {str(p) for p in (Path(run_dir) / "references").glob("*.png")}
        subject = data.get("subject") if isinstance(data.get("subject"), dict) else {}
        if not subject.get("reference_images"):
            data["subject"] = {**subject, "reference_images": list(references or [])}
        return self.prepare(data, run_dir, trusted, job)

    def on_stop(self, run_dir: str | None, job: str | None) -> None:
        """Stop this session's job; a session that opened another's run folder has another job token."""
        if job and request_stop(run_dir, job):
            gr.Info("Stopping within one denoising step; finished images are kept.")

    def on_new_run(self) -> dict:
        return {**self.render(Views(), progress_html(0, 0, "New run: the next Generate starts a fresh run folder.")),
                self.column_pick: gr.update(choices=[], value=None), self.run_state: None, self.column_gallery: [],
                self.column_info: "", self.export_file: None}

    def render(self, views: Views, status_html: str) -> dict:
        return {self.status: status_html, self.grid: views.grid, self.table: views.table, self.plot: views.figure,
                self.suggestion: views.suggestion, self.column_pick: gr.update(choices=views.columns)}

    @_user_errors
    def run_job(self, data: dict | None, run_dir: str | None, job: str | None, x: str,
                picked: str | None) -> Iterator[dict]:
        """The GPU job: stream the grid, scores and frontier as cells finish; keep everything on failure."""
        if not data or not run_dir:
            raise StudyError("press Generate to prepare a study first")
        run_dir = Path(run_dir)
        study = parse_study(data, source="study", base_dir=REPO)
        total = len(study.cells())
        why_unscored = _scorer_available(study)
        if why_unscored:  # the CLI's way out means nothing here: the run goes on, unscored
            gr.Warning(f"Scores are off for this run: {why_unscored.replace(', or pass --no-score', '')}")
        yield {**self.render(live_views(RunResult(study, run_dir, []), x, False),
                             progress_html(0, total, "Loading the base model …")),
               self.generate_button: gr.update(interactive=False)}
        last, shown, interval, start = None, 0.0, self.config.redraw_seconds, time.perf_counter()
        try:
            for item in self.gpu_job(data, str(run_dir), why_unscored is None, job=job or ""):
                if isinstance(item, RunResult):
                    last = item
                    break
                last = item if item is not None else last
                if last is None or time.perf_counter() - shown < interval:
                    continue
                begun = time.perf_counter()
                text = _progress_text(last, begun - start, _stop_requested(run_dir, job or ""))
                yield self.render(live_views(last.run, x, why_unscored is None),
                                  progress_html(last.done, last.total, text))
                shown = time.perf_counter()
                # drawing takes at most a third of the time: big grids redraw less often
                interval = max(self.config.redraw_seconds, 2.0 * (shown - begun))
        except Exception as error:
            done = len(last.run.results) if last is not None else 0
            message = (str(error) if isinstance(error, StudyError) else f"{type(error).__name__}: {error}").rstrip(".")
            text = failure_text(done, total, message)
            yield {**self.render(disk_views(run_dir, x), progress_html(done, total, text, "failed")),
                   self.generate_button: gr.update(interactive=True)}
            raise gr.Error(text) from None  # the status line may be scrolled off a phone's screen
        result: RunResult = last
        _stop_file(run_dir, job or "").unlink(missing_ok=True)
        cached = len(result.results) - result.generated
        if result.stopped:
            text, state = (f"Stopped: {len(result.results)}/{total} cells on disk ({result.generated} new, {cached} "
                           "cached). Press Generate to continue with the missing ones."), "stopped"
        else:
            text, state = (f"Done: {total} cells ({result.generated} generated, {cached} cached) in "
                           f"{time.perf_counter() - start:.1f} s → {run_dir.name}/"), "done"
        if result.truncated_prompts:
            from .prompts import truncation_note

            text += " " + truncation_note(result.truncated_prompts)
        views = disk_views(run_dir, x)
        pick = picked if picked in views.columns else views.suggested or next(iter(views.columns), None)
        yield {**self.render(views, progress_html(len(result.results), total, text, state)),
               self.column_pick: gr.update(choices=views.columns, value=pick),
               self.generate_button: gr.update(interactive=True)}

    # ------------------------------------------------------------ explore, export

    def on_axis(self, run_dir: str | None, x: str) -> dict:
        if not run_dir:
            return {}
        views = disk_views(Path(run_dir), x)
        return {self.plot: views.figure, self.table: views.table, self.suggestion: views.suggestion}

    def on_column(self, run_dir: str | None, column: str | None):
        if not (run_dir and column):
            return [], ""
        items, info = column_detail(Path(run_dir), column)
        # 2 to 4 across: one image alone would fill the whole panel
        columns = min(4, max(2, column_seeds(Path(run_dir), column)))
        return gr.update(value=[(served_file(path), caption) for path, caption in items], columns=columns), info

    def on_table_select(self, event: gr.SelectData):
        row = event.row_value or []
        return gr.update(value=row[0]) if row else gr.update()

    def on_grid_select(self, data: dict | None, run_dir: str | None, event: gr.SelectData):
        column = grid_click_column(Path(run_dir), data, event.index[0]) if run_dir and event.index else None
        return gr.update(value=column) if column else gr.update()

    def on_plot_click(self, run_dir: str | None, text: str):
        column = column_for_click(Path(run_dir), text) if run_dir else None
        return gr.update(value=column) if column else gr.update()

    @_user_errors
    def on_export(self, run_dir: str | None) -> str:
        if not run_dir:
            raise StudyError("export: generate something first")
        return served_file(zip_run(run_dir))

    # ------------------------------------------------------------ /run

    @_user_errors
    def api_run(self, study_yaml: str, reference_images: list[str] | None = None):
        """Run a study given as YAML text (the schema of presets/); stream its grid, then grids, summary, frontier.

        `reference_images` (optional files) replace subject.reference_images. The summary has one row
        per method@weight with the mean, std and n of each metric and `on_pareto_front`.
        """
        data = _mapping(_load_yaml(study_yaml, "study_yaml"), "study_yaml")
        with tempfile.TemporaryDirectory() as uploads:  # the run folder is made once the study is valid
            trusted = set()
            if reference_images:
                if len(reference_images) > MAX_REFERENCES:
                    raise StudyError(f"reference_images: at most {MAX_REFERENCES}")
                trusted = {str(normalize_reference(p, Path(uploads), f"reference_images[{i}]"))
                           for i, p in enumerate(reference_images)}
                subject = data.get("subject") if isinstance(data.get("subject"), dict) else {}
                data["subject"] = {**subject, "reference_images": sorted(trusted)}
            prepared = self.prepare(data, None, trusted)
        run_dir = Path(prepared[self.run_state])
        last, shown = None, 0.0
        try:
            for item in self.gpu_job(prepared[self.study_state], str(run_dir), True, job=prepared[self.job_state]):
                if isinstance(item, RunResult):
                    last = item
                elif item is not None and time.perf_counter() - shown > 1.0:
                    shown = time.perf_counter()
                    yield [(grid_images(item.run)[0][1], "grid.png")], None, None
        finally:
            if not any((run_dir / "images").glob("*/*.png")):  # nothing made: leave no empty run folder
                shutil.rmtree(run_dir, ignore_errors=True)
        if last is None or not last.results:
            raise StudyError("the study produced no images")
        summary = run_dir / "summary.csv"  # numbers, not display strings: this is for scripts
        yield ([(image, name) for name, image in grid_images(last)],
               read_csv(summary) if summary.is_file() else None, disk_views(run_dir, "dino").figure)


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _load_yaml(text: str | None, where: str = "Study YAML"):
    return load_yaml(text, where) if text and text.strip() else None


def _mapping(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise StudyError(f"{where}: expected a mapping of study fields (see presets/)")
    return data


def _progress_text(event, seconds: float, stopping: bool) -> str:
    cell = event.cell
    rate = seconds / max(1, event.run.generated) if event.run.generated else None
    left = (event.total - event.done) * rate if rate else None
    text = (f"{event.done}/{event.total} cells · last: {cell.column}, prompt {cell.cell.prompt_index + 1}, "
            f"seed {cell.cell.seed}")
    if rate:
        text += f" · {rate:.1f} s/image" + (f" · ~{left:.0f} s left" if left else "")
    return text + (" · stopping …" if stopping else "")


def _saved_runs(runs_dir: Path) -> list[str]:
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if (p / "manifest.json").is_file()]
    return [(p.name, str(p)) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def default_config(preset: str | None = None, public: bool = False, **overrides) -> AppConfig:
    """The app's config for `python app.py`: on a Space, public with runs in a temp folder."""
    on_space = bool(os.environ.get("SPACE_ID"))
    public = public or on_space
    runs_dir = Path(tempfile.gettempdir()) / "workbench-runs" if public else REPO / "runs" / "app"
    return AppConfig(preset=Path(preset) if preset else None, public=public, runs_dir=runs_dir, **overrides)
