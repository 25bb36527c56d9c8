"""The study runner: cells on disk -> generate the missing ones -> scores -> the run folder's outputs.

One runner under the CLI, the app and the Python API: `run_study(study, out_dir, ...)` generates what
is missing; `score_run(run_dir)` (re)scores what is on disk without generating. The stages are
their own modules: `cache` (keys, PNGs, twins), `generate` (batches, pipeline calls), `run_scores`
(the score table), `report` (the files of a run folder).
"""

from __future__ import annotations

import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .cache import CellCache, CellResult, read_png_metadata  # noqa: F401  (read_png_metadata: public here too)
from .errors import StudyError
from .files import output_error, remove_partials, run_folder_lock
from .generate import MethodStats, StopRequested, default_batch_size, generate_cells  # noqa: F401
from .models import LoadedBase, base_identity, load_base, pick_device
from .prompts import cell_truncated, long_texts
from .run_scores import RunScores, ScoreTable, ScoringSpec, load_scorer
from .spec import Cell, Study

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class RunResult:
    study: Study
    run_dir: Path
    results: list[CellResult]
    stats: dict[str, MethodStats] = field(default_factory=dict)
    wall_seconds: float = 0.0
    generated: int = 0
    stopped: bool = False
    score_table: ScoreTable | None = field(default=None, repr=False)  # None: not scored
    provenance: dict = field(default_factory=dict)  # metric -> axis, direction, backbone, scale
    scoring_seconds: float = 0.0
    truncated_prompts: list[int] = field(default_factory=list)  # indices of prompts cut at the token limit

    @property
    def scores(self) -> "pd.DataFrame | None":
        """The long score table so far: prompt_index, prompt, method, kind, weight, seed, key, metric, value
        (None before the first image is scored, and without scoring)."""
        return self.score_table.frame() if self.score_table is not None and len(self.score_table) else None

    def summary(self, x: str = "dino", y: str = "clip_t") -> "pd.DataFrame | None":
        """One row per method@weight with mean/std/n of each metric and `on_pareto_front` (x vs y)."""
        from .frontier import summarize

        scores = self.scores
        if scores is None or scores.empty:
            return None
        return summarize(scores, x=x, y=y)

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


def run_study(study: Study, out_dir: str | Path, *, loaded: LoadedBase | None = None, batch_size: int | None = None,
              device: str | None = None, offload: str = "none", progress: Callable[[ProgressEvent], None] | None = None,
              should_stop: Callable[[], bool] | None = None, show_progress_bar: bool = True,
              write_outputs: bool = True, score: bool = True, scoring: ScoringSpec | None = None) -> RunResult:
    """Generate every missing cell of `study` into `out_dir`; cells already on disk are reused.

    `progress(event)` is called after each image (cached ones first), with the run so far. `should_stop()`
    is polled at every denoising step: when it returns True the batch in flight is dropped and the
    run returns with `stopped=True`. Finished images are on disk whatever happens, so running the
    same study again generates only what is missing. Ctrl-C behaves like Stop, then re-raises.
    `offload="model"` keeps the models in CPU RAM between uses, for smaller GPUs; `batch_size` is
    the most images per pipeline call (default: generate.default_batch_size).

    With `score`, every image is scored as its batch finishes (`result.scores`), with the metrics and
    backbones of `scoring` (default: ScoringSpec.for_study). With `write_outputs`, cells.csv, the
    score tables, the grids and manifest.json are written once, when the run ends (stopped or failed too).

    One run at a time per folder: a second waits for the first (files.LOCK_WAIT_SECONDS), then fails
    with StudyError. A folder that cannot be written (read-only, full) is a StudyError naming it.
    """
    with _run_folder(out_dir) as run_dir:
        start = time.perf_counter()
        run = _Run(study, run_dir, loaded, device, (scoring or ScoringSpec.for_study(study)) if score else None,
                   progress)
        todo = run.take_cached()
        run.show_bar(show_progress_bar)
        interrupted: BaseException | None = None
        try:
            if todo:
                run.loaded = run.loaded or load_base(study.base, study.dtype, device, offload)
                batches = generate_cells(run.loaded, study, todo, batch_size=batch_size, should_stop=should_stop,
                                         stats=run.result.stats)
                with closing(batches):  # releases the methods before the outputs are written
                    for batch, images, seconds in batches:
                        run.take_generated(batch, images, seconds)
        except StopRequested:
            run.result.stopped = True
        except KeyboardInterrupt as error:
            run.result.stopped, interrupted = True, error
        finally:
            run.finish(start, write_outputs)
        if interrupted is not None:
            raise interrupted
        return run.result


def score_run(run: Study | str | Path, out_dir: str | Path | None = None, *, scoring: ScoringSpec | None = None,
              device: str | None = None, progress: Callable[[ProgressEvent], None] | None = None,
              write_outputs: bool = True) -> RunResult:
    """Score the images of a run folder without generating any.

    `score_run("runs/NAME")` scores the study in the folder's manifest.json; `score_run(study,
    "runs/NAME")` scores `study`'s cells found there (cells not on disk are left out). Embeddings
    cached in the folder are reused, so only new images, or new backbones, cost time. The folder's
    outputs are written again (a manifest entry with nothing generated).
    """
    if isinstance(run, Study):
        study, run_dir = run, Path(out_dir)
    else:
        from .run_folder import RunFolder

        run_dir = Path(run)
        study = RunFolder(run_dir).study()
    with _run_folder(run_dir):
        start = time.perf_counter()
        scored = _Run(study, run_dir, None, device, scoring or ScoringSpec.for_study(study), progress)
        scored.take_cached()
        if not scored.by_cell and any(run_dir.glob("images/*/*.png")):
            # Its outputs would be rewritten empty: refuse, and leave the folder as it is.
            raise StudyError(
                f"{run_dir}: found none of its {len(study.cells())} cells under the keys they have here (device "
                f"{scored.device_type}, base {scored.base_identity}); were they made on another device type or "
                "with other weights? Score them where they were made")
        scored.finish(start, write_outputs)
        return scored.result


@contextmanager
def _run_folder(out_dir: str | Path):
    """The run folder, locked for this run, without the partial files of a killed run."""
    run_dir = Path(out_dir)
    try:
        with run_folder_lock(run_dir):
            remove_partials(run_dir)
            (run_dir / "images").mkdir(parents=True, exist_ok=True)
            yield run_dir
    except OSError as error:
        problem = output_error(run_dir, error)
        if problem is None:
            raise
        raise problem from None


class _Run:
    """A run in progress: the cells on disk so far, their scores, and the callbacks told about them."""

    def __init__(self, study: Study, run_dir: Path, loaded: LoadedBase | None, device: str | None,
                 scoring: ScoringSpec | None, progress):
        # Keys need only the base's identity, so a fully cached run never loads a model.
        self.device_type = (loaded.device if loaded else pick_device(device)).split(":")[0]
        self.base_identity = loaded.identity if loaded else base_identity(study.base)
        long = long_texts(study, loaded.pipe.tokenizer if loaded else None)
        truncated = frozenset(cell for cell in study.cells() if cell_truncated(study, cell, long))
        self.cache = CellCache(study, run_dir, device_type=self.device_type, base_identity=self.base_identity,
                               truncated=truncated)
        self.result = RunResult(study, run_dir, [], truncated_prompts=sorted({c.prompt_index for c in truncated}))
        self.scores = None
        if scoring is not None:
            self.scores = RunScores(load_scorer(scoring, device), study, run_dir)
            self.result.provenance = self.scores.scorer.provenance()
            self.result.score_table = self.scores.table
        self.loaded, self.progress, self.bar = loaded, progress, None
        self.by_cell: dict[Cell, CellResult] = {}

    def take_cached(self) -> list[Cell]:
        """Take the cells already on disk (scored and reported first); return the cells to generate."""
        found, todo = self.cache.find()
        self._take(found)
        self._publish(found)
        return todo

    def show_bar(self, show: bool) -> None:
        missing = len(self.cache.cells) - len(self.by_cell)
        if show and missing:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=missing, desc=self.result.study.name, unit="img")

    def take_generated(self, batch: list[Cell], images: list, seconds: float) -> None:
        """Write a generated batch (and its twins' copies), score it, report it."""
        made, pictures = [], []
        for cell, image in zip(batch, images):
            saved = self.cache.save(cell, image, seconds / len(batch), self.loaded)
            self.result.generated += 1
            saved = [saved, *self.cache.save_twins(saved, image, self.loaded)]
            self._take(saved)
            made += saved
            pictures += [image] * len(saved)
        self._publish(made, pictures)

    def _take(self, results: list[CellResult]) -> None:
        for result in results:
            self.by_cell[result.cell] = result
        if self.bar and results:
            self.bar.update(len(results))

    def _publish(self, results: list[CellResult], images: list | None = None) -> None:
        self.result.results = [self.by_cell[c] for c in self.cache.cells if c in self.by_cell]
        if self.scores is not None:
            self.scores.add(results, images)
        if self.progress:
            done = len(self.by_cell) - len(results)
            for index, result in enumerate(results, start=done + 1):
                self.progress(ProgressEvent(result, index, len(self.cache.cells), self.result))

    def finish(self, start: float, write_outputs: bool) -> None:
        """Settle the scores and write the run folder's outputs (after a stop or a failure too)."""
        from . import report

        if self.bar:
            self.bar.close()
        self.result.results = [self.by_cell[c] for c in self.cache.cells if c in self.by_cell]
        self.result.wall_seconds = time.perf_counter() - start
        if self.scores is not None:
            self.scores.finish()
            self.result.scoring_seconds = self.scores.seconds
        if write_outputs:
            report.write_run_outputs(self.result, self.loaded, device_type=self.device_type,
                                     base_identity=self.base_identity)
