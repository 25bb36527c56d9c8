"""The study runner: cells -> batches -> PNGs on disk, with a cache, resume, progress and stop.

One runner under the CLI, the app and the Python API: `run_study(study, out_dir, ...)`.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import pandas as pd

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_write, output_error, remove_partials, run_folder_lock
from .methods import attached
from .methods.lora import BaseLoras
from .models import LoadedBase, base_identity, load_base, make_scheduler, pick_device
from .prompts import cell_truncated, long_texts
from .scoring import RunScores, ScoringSpec, load_scorer
from .spec import Cell, Study, source_key

PNG_KEY = "workbench"


@dataclass
class CellResult:
    cell: Cell
    key: str
    prompt: str
    method: str
    kind: str
    column: str
    image_path: Path
    seconds: float
    generated: bool  # False: found in the cache
    prompt_truncated: bool = False  # the prompt (or its CLIP-T text) is longer than the text encoder reads

    def record(self, study: Study, run_dir: Path) -> dict:
        return {
            "prompt_index": self.cell.prompt_index, "prompt": self.prompt, "template": self.cell.template,
            "scoring_prompt": study.scoring_prompt(self.cell.template),
            "method": self.method, "kind": self.kind, "weight": self.cell.weight, "seed": self.cell.seed,
            "column": self.column, "image": str(self.image_path.relative_to(run_dir)),
            "seconds": round(self.seconds, 4), "key": self.key, "prompt_truncated": self.prompt_truncated,
        }


@dataclass
class MethodStats:
    images: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


@dataclass
class RunResult:
    study: Study
    run_dir: Path
    results: list[CellResult]
    stats: dict[str, MethodStats] = field(default_factory=dict)
    wall_seconds: float = 0.0
    generated: int = 0
    stopped: bool = False
    scores: "pd.DataFrame | None" = None  # long: prompt_index, prompt, method, kind, weight, seed, key, metric, value
    provenance: dict = field(default_factory=dict)  # metric -> axis, direction, backbone, scale
    scoring_seconds: float = 0.0
    truncated_prompts: list[int] = field(default_factory=list)  # indices of prompts cut at the token limit

    def summary(self, x: str = "dino", y: str = "clip_t") -> "pd.DataFrame | None":
        """One row per method@weight with mean/std/n of each metric and `on_pareto_front` (x vs y)."""
        from .frontier import summarize

        if self.scores is None or self.scores.empty:
            return None
        return summarize(self.scores, x=x, y=y)

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.study.cells())


@dataclass
class ProgressEvent:
    """What a progress callback gets after each image (cached images are reported first)."""

    cell: CellResult
    done: int
    total: int
    run: RunResult  # the run so far: results, scores (when scoring), stats

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class StopRequested(Exception):
    """Raised inside a pipeline call to abandon the batch when the user pressed Stop."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "method"


def images_by_key(run_dir: Path) -> dict[str, list[Path]]:
    """Every image file of a run folder, by cache key (the key's first 16 hex digits end each file name)."""
    found: dict[str, list[Path]] = {}
    for path in sorted((run_dir / "images").glob("*/*.png")):
        match = re.search(r"_([0-9a-f]{16})\.png$", path.name)
        if match:
            found.setdefault(match.group(1), []).append(path)
    return found


def read_png_metadata(path: Path) -> dict:
    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else {}


def _png_metadata_or_none(path: Path) -> dict | None:
    """A cached PNG's metadata, or None when the file is damaged (its cell is then generated again)."""
    try:
        return read_png_metadata(path)
    except (OSError, ValueError, SyntaxError):
        return None


def _a1111_parameters(meta: dict) -> str:
    """The `parameters` text other tools (A1111, civitai) read from PNGs."""
    return (
        f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\n"
        f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['base']}, "
        f"Method: {meta['method']}, Weight: {meta['weight']:g}"
    )


def default_batch_size(loaded: LoadedBase, study: Study) -> int:
    """1 on CPU (a cell then equals itself inside any run, bit for bit); on GPU, from free memory."""
    if not loaded.device.startswith("cuda"):
        return 1
    free, _ = torch.cuda.mem_get_info()
    pixels = study.size[0] * study.size[1] / (512 * 512)
    per_sample = 0.35e9 * pixels * (2.0 if loaded.is_sdxl else 1.0)
    return int(max(1, min(16, (free * 0.6) // per_sample)))


def _batches(cells: list[Cell], per_sample_weights: bool, batch_size: int):
    """Consecutive chunks of one prompt (and one weight, unless the method mixes weights per sample)."""
    group: list[Cell] = []
    for cell in cells:
        same = group and group[0].prompt_index == cell.prompt_index and (
            per_sample_weights or group[0].weight == cell.weight)
        if group and (not same or len(group) == batch_size):
            yield group
            group = []
        group.append(cell)
    if group:
        yield group


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


def run_study(study: Study, out_dir: str | Path, **options) -> RunResult:
    """Generate every missing cell of `study` into `out_dir`; cells already on disk are reused.

    `progress(event)` is called after each image (cached ones first), with the run so far. `should_stop()`
    is polled at every denoising step: when it returns True the batch in flight is dropped and the
    run returns with `stopped=True`. Finished images are on disk whatever happens, so running the
    same study again generates only what is missing. Ctrl-C behaves like Stop, then re-raises.
    `offload="model"` keeps the models in CPU RAM between uses, for smaller GPUs.

    With `score`, every image is scored as its batch finishes (`result.scores`), with the metrics and
    backbones of `scoring` (default: ScoringSpec.for_study). `generate=False` only (re)scores and
    redraws what is on disk. Options: see `_run_locked`.

    One run at a time per folder: a second waits for the first (files.LOCK_WAIT_SECONDS), then fails
    with StudyError. A folder that cannot be written (read-only, full) is a StudyError naming it.
    """
    run_dir = Path(out_dir)
    try:
        with run_folder_lock(run_dir):
            remove_partials(run_dir)
            return _run_locked(study, run_dir, **options)
    except OSError as error:
        problem = output_error(run_dir, error)
        if problem is None:
            raise
        raise problem from None


def _run_locked(
    study: Study,
    out_dir: str | Path,
    *,
    loaded: LoadedBase | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    offload: str = "none",
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_progress_bar: bool = True,
    write_outputs: bool = True,
    score: bool = True,
    scoring: ScoringSpec | None = None,
    generate: bool = True,
) -> RunResult:
    """run_study's work, with the run folder locked."""
    from . import report

    start = time.perf_counter()
    run_dir = Path(out_dir)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    # Keys need only the base's identity, so a fully cached run never loads a model.
    device_type = (loaded.device if loaded else pick_device(device)).split(":")[0]
    identity = loaded.identity if loaded else base_identity(study.base)
    cells = study.cells()
    keys = {cell: source_key(study, cell, device=device_type, base_identity=identity) for cell in cells}
    on_disk = images_by_key(run_dir)
    result = RunResult(study, run_dir, [])
    by_cell: dict[Cell, CellResult] = {}
    total = len(cells)
    long = long_texts(study, loaded.pipe.tokenizer if loaded else None)
    truncated = {cell for cell in cells if cell_truncated(study, cell, long)}
    result.truncated_prompts = sorted({cell.prompt_index for cell in truncated})

    def describe(cell: Cell, path: Path, seconds: float, generated: bool) -> CellResult:
        spec = study.methods[cell.method_index]
        return CellResult(cell, keys[cell], study.render_prompt(cell), spec.label, spec.method.kind,
                          spec.column(cell.weight), path, seconds, generated, cell in truncated)

    run_scores = None
    if score:
        run_scores = RunScores(load_scorer(scoring or ScoringSpec.for_study(study), device), study, run_dir)
        result.provenance = run_scores.scorer.provenance()

    def cell_path(cell: Cell) -> Path:
        label = _slug(study.methods[cell.method_index].label)
        return run_dir / "images" / label / f"p{cell.prompt_index:02d}_w{cell.weight:g}_s{cell.seed}_{keys[cell][:16]}.png"

    missing = []
    claimed = {cell_path(cell) for cell in cells}
    metadata: dict[Path, dict | None] = {}  # a damaged PNG reads as None: its cell is generated again

    def readable(path: Path) -> bool:
        if path not in metadata:
            metadata[path] = _png_metadata_or_none(path)
        return metadata[path] is not None

    for cell in cells:
        key = keys[cell][:16]
        copies = on_disk[key] = [p for p in on_disk.get(key, []) if readable(p)]
        if not copies:
            missing.append(cell)
            continue
        path = cell_path(cell)
        if path in copies:
            by_cell[cell] = describe(cell, path, float(metadata[path].get("seconds", 0.0)), False)
        else:  # the same image under another path (a neutral weight, a renamed method, a moved prompt)
            by_cell[cell] = _adopt_png(copies, claimed, describe(cell, path, 0.0, False), study, run_dir)
    _remove_stale_copies(on_disk, claimed, {keys[cell][:16] for cell in cells})
    # Cells with one key (the baseline and IP-Adapter@0) are generated once; the twins copy the image.
    first_with_key: dict[str, Cell] = {}
    twins: dict[Cell, list[Cell]] = {}
    for cell in missing:
        source = first_with_key.setdefault(keys[cell], cell)
        if source is not cell:
            twins.setdefault(source, []).append(cell)
    result.results = [by_cell[c] for c in cells if c in by_cell]
    if run_scores is not None and result.results:
        run_scores.add(result.results)
        result.scores = run_scores.frame()
    if progress:
        for done, cached in enumerate(result.results, start=1):
            progress(ProgressEvent(cached, done, total, result))
    if not generate:
        missing = []

    bar = None
    if show_progress_bar and missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"{study.name}", unit="img")
    interrupted: BaseException | None = None
    try:
        if missing:
            loaded = loaded or load_base(study.base, study.dtype, device, offload)
            pipe = loaded.pipe
            pipe.scheduler = make_scheduler(loaded, study.scheduler)
            with attached(_BaseLorasMethod(), pipe, study):
                for method_index, spec in enumerate(study.methods):
                    todo = [c for c in missing if c.method_index == method_index and first_with_key[keys[c]] is c]
                    if not todo:
                        continue
                    stats = result.stats.setdefault(spec.label, MethodStats())
                    if loaded.device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    fit = BatchFit(batch_size or default_batch_size(loaded, study))
                    with attached(spec.method, pipe, study) as attachment:
                        for batch in _batches(todo, spec.method.per_sample_weights, fit.size):
                            images, seconds = _generate(pipe, study, batch, attachment, should_stop, fit)
                            finished, finished_images = [], []
                            for cell, image in zip(batch, images):
                                cell_result = describe(cell, cell_path(cell), seconds / len(batch), True)
                                meta = _cell_meta(study, cell_result, loaded)
                                _write_png(image, cell_result.image_path, meta)
                                result.generated += 1
                                made = [cell_result]
                                for twin in twins.get(cell, []):
                                    twin_result = describe(twin, cell_path(twin), 0.0, False)
                                    twin_meta = _twin_meta(meta, twin_result, study, run_dir, cell_result.image_path)
                                    _write_png(image, twin_result.image_path, twin_meta)
                                    made.append(twin_result)
                                for done in made:
                                    by_cell[done.cell] = done
                                    finished.append(done)
                                    finished_images.append(image)
                                    if bar:
                                        bar.update(1)
                            result.results = [by_cell[c] for c in cells if c in by_cell]
                            if run_scores is not None:
                                run_scores.add(finished, finished_images)
                                result.scores = run_scores.frame()
                            for index, cell_result in enumerate(finished):
                                if progress:
                                    progress(ProgressEvent(cell_result, len(by_cell) - len(finished) + index + 1,
                                                           total, result))
                            stats.images += len(batch)
                            stats.seconds += seconds
                            stats.peak_memory_mb = max(stats.peak_memory_mb, _peak_memory_mb(loaded.device))
                            if write_outputs:
                                report.write_cells_csv(study, run_dir, [by_cell[c] for c in cells if c in by_cell])
    except StopRequested:
        result.stopped = True
    except KeyboardInterrupt as error:
        result.stopped, interrupted = True, error
    finally:
        if bar:
            bar.close()
        result.results = [by_cell[c] for c in cells if c in by_cell]
        result.wall_seconds = time.perf_counter() - start
        if run_scores is not None:
            run_scores.save()
            result.scoring_seconds = run_scores.seconds
        if write_outputs:
            report.write_run_outputs(result, loaded, device_type=device_type, base_identity=identity)
    if interrupted is not None:
        raise interrupted
    return result


class _BaseLorasMethod:
    """Adapter so the study-level LoRAs use the same attached(...) context as methods."""

    def attach(self, pipe, study):
        return BaseLoras(pipe, study)


@dataclass
class BatchFit:
    """The most cells one pipeline call may take: the chosen batch size, halved at each out-of-memory error."""

    size: int


def _generate(pipe, study: Study, batch: list[Cell], attachment, should_stop, fit: BatchFit | None = None,
              output_type: str = "pil") -> tuple[list, float]:
    """The images of `batch`, in order, and the seconds they took.

    Pipeline calls take at most `fit.size` cells (and one weight per call when the attachment cannot
    mix weights). A call that runs out of GPU memory is retried at half the size, and `fit` keeps the
    smaller size for the rest of the method; only a single cell that does not fit fails the study.
    """
    start = time.perf_counter()
    fit = fit or BatchFit(len(batch))
    mixes_weights = getattr(attachment, "per_sample_weights", True)
    images: list = []
    while len(images) < len(batch):
        chunk = batch[len(images):len(images) + fit.size]
        if not mixes_weights:
            chunk = [cell for cell in chunk if cell.weight == chunk[0].weight]
        out_of_memory = False
        try:
            images += _pipe_call(pipe, study, chunk, attachment, should_stop, output_type)
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the failed call's tensors are already released
            fit.size = len(chunk) // 2
            torch.cuda.empty_cache()
            warnings.warn(f"out of GPU memory at batch size {len(chunk)}; retrying at {fit.size}")
    return images, time.perf_counter() - start


def _pipe_call(pipe, study: Study, cells: list[Cell], attachment, should_stop, output_type: str) -> list:
    """One pipeline call for cells of one method: one CPU generator per image, seeded from its cell."""
    kwargs = attachment.call_kwargs([cell.weight for cell in cells])
    generators = [torch.Generator("cpu").manual_seed(cell.seed) for cell in cells]

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if should_stop is not None and should_stop():
            raise StopRequested()
        return callback_kwargs

    # no_grad, not inference_mode: under CPU offload the hooks move weights inside this block, and
    # inference tensors would then refuse the next set_adapters (peft sets requires_grad).
    with torch.no_grad():
        negative_prompt = study.negative_prompt if study.guidance > 1.0 else None
        kwargs.update(_prompt_embeds(pipe, [study.render_prompt(cell) for cell in cells], negative_prompt))
        output = pipe(
            num_inference_steps=study.steps,
            guidance_scale=study.guidance,
            height=study.size[0],
            width=study.size[1],
            generator=generators,
            callback_on_step_end=on_step_end,
            output_type=output_type,
            **kwargs,
        )
    return list(output.images)


def _prompt_embeds(pipe, prompts: list[str], negative_prompt: str | None) -> dict[str, torch.Tensor]:
    """Pipeline arguments with the text embeddings of `prompts`: each distinct prompt encoded once, alone.

    Encoding a prompt alone and repeating it per sample gives a sample the same embeddings in a
    batch of any size, and spares the text encoder a batch of copies.
    """
    device = pipe._execution_device
    cfg = negative_prompt is not None
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if hasattr(pipe, "text_encoder_2"):  # SDXL: two encoders, plus pooled embeddings
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    encoded = {}
    for prompt in dict.fromkeys(prompts):
        encoded[prompt] = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
    return {name: torch.cat([encoded[prompt][index] for prompt in prompts])
            for index, name in enumerate(names) if encoded[prompts[0]][index] is not None}


def _cell_meta(study: Study, result: CellResult, loaded: LoadedBase) -> dict:
    """The generation parameters written into a cell's PNG."""
    return {
        "prompt": result.prompt, "negative_prompt": study.negative_prompt, "method": result.method,
        "kind": result.kind, "weight": result.cell.weight, "seed": result.cell.seed, "steps": study.steps,
        "guidance": study.guidance, "height": study.size[0], "width": study.size[1], "scheduler": study.scheduler,
        "base": study.base, "dtype": str(loaded.dtype).replace("torch.", ""), "device": loaded.device,
        "options": study.methods[result.cell.method_index].method.options(), "key": result.key,
        "seconds": round(result.seconds, 4), "study": study.name,
    }


def _retold_meta(meta: dict, cell: CellResult, study: Study) -> dict:
    """`meta` of an image, retold for another cell with the same key (same image, other method/label/index)."""
    return {**meta, "method": cell.method, "kind": cell.kind, "weight": cell.cell.weight, "prompt": cell.prompt,
            "options": study.methods[cell.cell.method_index].method.options(), "key": cell.key, "study": study.name}


def _twin_meta(meta: dict, twin: CellResult, study: Study, run_dir: Path, source: Path) -> dict:
    """`meta` of an image, retold for a twin cell that holds a copy of it."""
    return {**_retold_meta(meta, twin, study), "seconds": 0.0, "same_image_as": str(source.relative_to(run_dir))}


def _adopt_png(copies: list[Path], claimed: set[Path], cell: CellResult, study: Study, run_dir: Path) -> CellResult:
    """Give `cell` its file of an image found under other paths (`copies`, updated in place).

    A copy that no current cell names (left by a reordered prompt or a renamed method) is moved, so
    the folder keeps one file per cell; otherwise the image is copied (a twin, such as IP-Adapter@0).
    """
    spare = next((path for path in copies if path not in claimed), None)
    if spare is None:
        _copy_png(copies[0], cell, study, run_dir)
    else:
        meta = read_png_metadata(spare)
        retold = _retold_meta(meta, cell, study)
        if "same_image_as" in meta:  # it was a twin's copy: point at a copy that stays
            others = [path for path in copies if path != spare]
            retold.pop("same_image_as")
            if others:
                retold["same_image_as"] = str(others[0].relative_to(run_dir))
        cell.image_path.parent.mkdir(parents=True, exist_ok=True)
        if retold == meta:
            spare.replace(cell.image_path)
        else:
            with Image.open(spare) as image:
                image.load()
                _write_png(image, cell.image_path, retold)
            spare.unlink()
        copies.remove(spare)
        cell.seconds = float(meta.get("seconds", 0.0))
    copies.append(cell.image_path)
    return cell


def _remove_stale_copies(on_disk: dict[str, list[Path]], claimed: set[Path], current_keys: set[str]) -> None:
    """Delete the files no current cell names whose image a current cell holds in its own file.

    Images of cells the study no longer has (a dropped method or weight) stay: they are the cache
    when those cells come back.
    """
    for key in current_keys:
        for path in [p for p in on_disk.get(key, []) if p not in claimed]:
            path.unlink(missing_ok=True)
            on_disk[key].remove(path)


def _copy_png(source: Path, twin: CellResult, study: Study, run_dir: Path) -> None:
    with Image.open(source) as image:
        image.load()
        _write_png(image, twin.image_path, _twin_meta(read_png_metadata(source), twin, study, run_dir, source))


def _write_png(image: Image.Image, path: Path, meta: dict) -> None:
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(meta))
    info.add_text("parameters", _a1111_parameters(meta))
    # Atomic: a crash mid-write never leaves a PNG that looks cached.
    atomic_write(path, lambda partial: image.save(partial, format="PNG", pnginfo=info))
