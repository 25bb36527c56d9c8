"""A study as a job: run it in a worker thread, stream its events, stop it, size it for ZeroGPU.

No Gradio here: the app, a notebook or any other front end starts a job with `job_events(study,
run_dir)` and reads ProgressEvents (then the RunResult) as cells finish. Stop is a file in the
run folder, one per job token, so it reaches a ZeroGPU worker process too and a Stop pressed in
another session (another token) reaches nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import queue
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

from .cache import slug_of
from .errors import StudyError
from .runner import ProgressEvent, RunResult
from .spec import Study

STOP_FILE = ".stop"  # a file, not an Event: it reaches a ZeroGPU worker process too
GPU_MAX_SECONDS = 300


RUN_FOLDER_NAME = re.compile(r"\d{8}-\d{6}-.+-[0-9a-f]{32}")  # what new_run_dir names, and nothing else


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """A new run folder `<time>-<name>-<128 random bits>`: no one finds another's run by guessing its name."""
    slug = slug_of(name or "study")[:40]
    path = Path(runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(16)}"
    path.mkdir(parents=True)
    return path


UNUSED_RUN_FOLDER_SECONDS = 2 * 3600  # longer than a full public queue waits for its turn


def sweep_unused_run_folders(runs_dir: Path, older_than_s: float = UNUSED_RUN_FOLDER_SECONDS) -> list[Path]:
    """Delete run folders that never got a cell and have not changed for `older_than_s`; return them.

    Such a folder is left by a job whose client went away while queued, or that stopped or failed
    before its first image. Only folders new_run_dir made are candidates (never the sessions'
    uploads beside them), and a folder a run holds (its lock) is never touched.
    """
    from .files import run_folder_lock

    removed = []
    horizon = time.time() - older_than_s
    for folder in Path(runs_dir).glob("*/"):
        if not RUN_FOLDER_NAME.fullmatch(folder.name) or any(folder.glob("images/*/*.png")):
            continue
        if max((p.stat().st_mtime for p in [folder, *folder.rglob("*")]), default=0.0) > horizon:
            continue
        try:
            with run_folder_lock(folder, wait_seconds=0):
                shutil.rmtree(folder)
        except (StudyError, OSError):
            continue  # in use, or already gone
        removed.append(folder)
    return removed


def with_references(study: Study, references: list[str | Path]) -> Study:
    """`study` with other reference images (copies of the same pictures), without parsing it again."""
    resolved = tuple(str(Path(path).resolve()) for path in references)
    return dataclasses.replace(study, subject=dataclasses.replace(study.subject, reference_images=resolved))


# ---------------------------------------------------------------- stop


def stop_file(run_dir: str | Path, job: str = "") -> Path:
    """The file whose presence stops the job `job` writing into run_dir."""
    return Path(run_dir) / (f"{STOP_FILE}-{job}" if job else STOP_FILE)


def request_stop(run_dir: str | Path | None, job: str = "") -> bool:
    """Ask the job `job` writing into run_dir to stop at its next denoising step."""
    if not run_dir or not Path(run_dir).is_dir():
        return False
    stop_file(run_dir, job).touch()
    return True


def stop_requested(run_dir: str | Path, job: str = "") -> bool:
    return stop_file(run_dir, job).exists()


def clear_stop(run_dir: str | Path, job: str = "") -> None:
    """Forget an earlier Stop, before the next job of this token starts."""
    stop_file(run_dir, job).unlink(missing_ok=True)


# ---------------------------------------------------------------- the job


def job_events(study: Study, run_dir: str | Path, score: bool = True, tick: float = 0.25,
               job: str = "") -> Iterator:
    """Run the study in a worker thread; yield each ProgressEvent, None every `tick` s of quiet, then the RunResult.

    `request_stop(run_dir, job)` stops it within a denoising step. Everything yielded is a CPU
    object (paths, frames, dataclasses), so this can run as one ZeroGPU call. An exception in the
    worker is re-raised here after the run folder's outputs were written.
    """
    from .runner import run_study

    run_dir = Path(run_dir)
    events: queue.Queue = queue.Queue()

    def work():
        try:
            events.put(run_study(study, run_dir, progress=events.put, should_stop=lambda: stop_requested(run_dir, job),
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
            stop_file(run_dir, job).touch()
            worker.join(timeout=60)


class JobStream:
    """A job's events thinned for a screen: the latest ProgressEvent at most every `every` seconds.

    Iterate it for the events to draw; the time a consumer spends between two of them is taken
    as its drawing time, and drawing gets at most a third of the time (big grids redraw less
    often). Afterwards `result` is the RunResult; `last` is the latest event seen, drawn or not.
    """

    def __init__(self, events: Iterator, every: float = 0.5):
        self.events, self.every = events, every
        self.last: ProgressEvent | None = None
        self.result: RunResult | None = None

    @property
    def done(self) -> int:
        """Cells on disk so far (finished and cached)."""
        return len(self.last.run.results) if self.last is not None else 0

    def __iter__(self) -> Iterator[ProgressEvent]:
        shown, interval = 0.0, self.every
        for item in self.events:
            if isinstance(item, RunResult):
                self.result = item
                return
            self.last = item if item is not None else self.last
            if self.last is None or time.perf_counter() - shown < interval:
                continue
            begun = time.perf_counter()
            yield self.last
            shown = time.perf_counter()
            interval = max(self.every, 2.0 * (shown - begun))


def why_unscored(study: Study) -> str | None:
    """None when the study's scoring backbones load; else why not (a job then runs unscored)."""
    from .models import pick_device
    from .run_scores import ScoringSpec, load_scorer

    try:
        load_scorer(ScoringSpec.for_study(study), pick_device())
    except StudyError as error:
        return str(error)
    return None


# ---------------------------------------------------------------- ZeroGPU


def is_sdxl(study: Study) -> bool:
    """Does the study run on an SDXL base? (tiny-xl, an SDXL single file or folder, or a hub id naming XL)"""
    from .models import base_source, is_sdxl_single_file

    try:
        source = base_source(study.base)
        if isinstance(source, str):
            return source == "tiny-xl"
        if source.local_file is not None and source.local_file.suffix == ".safetensors":
            return is_sdxl_single_file(source.local_file)
        index = Path(source.repo) / "model_index.json"
        if source.is_local and index.is_file():
            return "XL" in str(json.loads(index.read_text()).get("_class_name", ""))
    except Exception:  # unreadable: size it by its name
        pass
    return "xl" in study.base.lower()


def gpu_seconds(study: Study, run_dir: str = "", score: bool = True, tick: float = 0.25, job: str = "") -> int:
    """ZeroGPU duration for one grid (`job_events`' arguments): model load, then per image ~ steps x pixels (SDXL ~2.5x)."""
    height, width = study.size
    per_image = study.steps * 0.06 * height * width / 512**2 * (2.5 if is_sdxl(study) else 1.0)
    per_image += 0.05 if score else 0.0
    return int(min(GPU_MAX_SECONDS, 30 + 10 * len(study.methods) + len(study.cells()) * per_image))


def on_gpu(fn):
    """fn as one ZeroGPU call (duration from the grid's size, `gpu_seconds`) when the `spaces` package is present."""
    if importlib.util.find_spec("spaces") is None:
        return fn
    import spaces

    return spaces.GPU(duration=gpu_seconds)(fn)
