"""The scores of a run: embed each image once (cached in the run folder by cell key), derive every
metric, and keep THE long score table, grown by appending as batches finish.

The runner calls `RunScores.add` after each batch, so scores arrive as cells finish; rescoring a
run (`score_run`, `python -m workbench score RUN_DIR`) embeds only images it has not embedded before.
The metrics themselves live in `workbench.metrics` (`metrics.scorer.Scorer` embeds and scores).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .files import atomic_write
from .images import load_image
from .spec import Cell

DEFAULT_METRICS = ("clip_i", "clip_t", "dino", "diversity")
SCORING_COST_FILE = "scoring_cost.json"  # in RUN_DIR/scores: images embedded and seconds of the last scoring
CELL_COLUMNS = ["prompt_index", "prompt", "method", "kind", "weight", "seed", "key"]
SCORE_COLUMNS = [*CELL_COLUMNS, "metric", "value"]
GROUP_COLUMNS = ["prompt_index", "method", "weight"]  # a group metric's group: the seeds of one grid cell


@dataclass(frozen=True)
class ScoringSpec:
    """Which metrics, on which backbones. `tiny` backbones serve tiny bases (offline tests)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    clip: tuple[str, str] = ("ViT-B-32", "openai")
    dino: str = "facebook/dino-vits16"

    @classmethod
    def for_study(cls, study, metrics=None, clip: str | None = None) -> "ScoringSpec":
        metrics = tuple(metrics or DEFAULT_METRICS)
        if study.is_tiny:
            if clip not in (None, "ViT-B-32"):
                from .errors import StudyError

                raise StudyError(f"clip: a tiny study scores with tiny random CLIP and DINO models; {clip} applies "
                                 "only to real bases")
            return cls(metrics, ("ViT-B-32", "tiny"), "tiny")
        clip_model = clip or "ViT-B-32"
        return cls(metrics, (clip_model, "openai"), "facebook/dino-vits16")


def load_scorer(spec: ScoringSpec, device: str | None = None):
    """A Scorer with its backbones loaded once (kept while the app or process lives, and while local
    backbone weights keep their content)."""
    from .metrics.backbones import local_weights_identity

    local = (local_weights_identity("clip", *spec.clip), local_weights_identity("dino", spec.dino))
    return _load_scorer(spec, device, local)


@lru_cache(maxsize=2)
def _load_scorer(spec: ScoringSpec, device: str | None, local_weights: tuple):
    from .errors import StudyError
    from .metrics.scorer import Scorer

    try:
        return Scorer(spec.metrics, clip=spec.clip, dino=spec.dino, device=device)
    except ValueError as error:
        raise StudyError(f"metrics: {error}") from None
    except (OSError, RuntimeError) as error:
        raise StudyError(
            f"metrics: cannot load the scoring backbones {spec.clip[0]}/{spec.clip[1]} and {spec.dino} "
            f"({str(error).splitlines()[0]}). On a machine with network, run the study once to cache them, "
            "or pass --no-score") from None


load_scorer.cache_clear = _load_scorer.cache_clear


class ScoreTable:
    """The long score table of a run: prompt_index, prompt, method, kind, weight, seed, key, metric, value.

    Rows: one per image and per-image metric (metric by metric, images in the order they were added),
    then one per seed group (prompt x method x weight) and group metric, with seed and key empty. It
    grows by appending: a batch adds the rows of its own cells and rewrites the rows of the groups it
    joined; earlier rows are left alone. `frame()` builds the pandas view when it is read (kept until
    the next change), so a run that nobody watches never builds it between batches.

    Plain lists and dicts: the table pickles (a ZeroGPU worker sends it back) and can be read from
    another thread while a batch is being added (a reader sees the rows up to the last whole batch).
    """

    def __init__(self):
        self._cells: dict[str, list] = {column: [] for column in CELL_COLUMNS}
        self._values: dict[str, list[float]] = {}  # per-image metric -> one value per cell row
        self._dtypes: dict[str, np.dtype] = {}
        self._row_of: dict[Cell, int] = {}
        self._count = 0  # rows complete in every column
        self._groups: dict[str, list[dict]] = {}  # group metric -> its rows
        self._group_row: dict[tuple, int] = {}
        self._version = 0
        self._built: tuple[int, pd.DataFrame | None] = (-1, None)
        self.batches = 0  # add() calls: the values of one call come from one pass of the metrics
        self.rows_built = 0  # rows appended or rewritten so far: grows with the new cells, not with the table

    def __len__(self) -> int:
        return self._count

    def keys(self) -> list[str]:
        return self._cells["key"][:self._count]

    def add(self, cells: list[Cell], records: list[dict], values: dict[str, torch.Tensor]) -> None:
        """Rows for `cells` (described by `records`) with per-image `values` ({metric: [N]}).

        A cell already in the table keeps its place and gets the new values."""
        self.batches += 1
        for name, tensor in values.items():
            self._values.setdefault(name, [])
            self._dtypes.setdefault(name, tensor.numpy().dtype)
        lists = {name: tensor.tolist() for name, tensor in values.items()}
        new = 0
        for index, (cell, record) in enumerate(zip(cells, records)):
            row = self._row_of.get(cell)
            if row is None:
                row = self._row_of[cell] = self._count + new
                new += 1
                for column in CELL_COLUMNS:
                    self._cells[column].append(record[column])
                for name, column_values in lists.items():
                    self._values[name].append(column_values[index])
            else:
                for column in CELL_COLUMNS:
                    self._cells[column][row] = record[column]
                for name, column_values in lists.items():
                    self._values[name][row] = column_values[index]
        self._count += new  # after every column has the new rows: a reader slices whole rows
        self.rows_built += len(cells) * len(values)
        self._version += 1

    def set_group(self, metric: str, group: tuple, row: dict) -> None:
        """The row of `group` for group metric `metric`: appended the first time, rewritten after."""
        rows = self._groups.setdefault(metric, [])
        index = self._group_row.setdefault((metric, group), len(rows))
        if index == len(rows):
            rows.append(row)
        else:
            rows[index] = row
        self.rows_built += 1
        self._version += 1

    def replace_values(self, values: dict[str, torch.Tensor]) -> None:
        """New per-image values for every row, in row order (see RunScores.finish)."""
        for name, tensor in values.items():
            self._values[name][:] = tensor.tolist()
        self._version += 1

    def frame(self) -> pd.DataFrame:
        """The table as a pandas frame (SCORE_COLUMNS)."""
        version = self._version
        if self._built[0] == version:
            return self._built[1]
        count = self._count
        frames = []
        if count:
            cells = pd.DataFrame({column: values[:count] for column, values in self._cells.items()})
            frames = [cells.assign(metric=name, value=np.asarray(values[:count], dtype=self._dtypes[name]))
                      for name, values in list(self._values.items())]
        group_rows = [row for rows in list(self._groups.values()) for row in list(rows)]
        if group_rows:
            frames.append(pd.DataFrame(group_rows))
        frame = pd.concat(frames, ignore_index=True)[SCORE_COLUMNS] if frames else pd.DataFrame(columns=SCORE_COLUMNS)
        self._built = (version, frame)
        return frame


class RunScores:
    """Embeddings and scores of the images of one run folder; `table` holds the scores."""

    def __init__(self, scorer, study, run_dir: Path):
        self.scorer, self.study, self.run_dir = scorer, study, Path(run_dir)
        # Named by the backbones' weights, not their names: new weights at the same path get a new cache.
        made_by = {"provenance": scorer.provenance(), "weights": scorer.identity()}
        fingerprint = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:12]
        self.cache_path = self.run_dir / "scores" / f"embeddings-{fingerprint}.safetensors"
        self.embeddings: dict[str, dict[str, torch.Tensor]] = self._load_cache()
        references = [load_image(p, "subject.reference_images") for p in study.subject.reference_images]
        self.references = scorer.embed_references(references)
        self.table = ScoreTable()  # one row per cell: twins share an image (and its embedding), not a row
        self.groups: dict[tuple, dict[Cell, str]] = {}  # group -> its cells (in table order) and their keys
        self._group_heads: dict[tuple, dict] = {}  # group -> its row's cell columns (from its first cell)
        self.seconds = 0.0  # time spent embedding and scoring generated images (loading and references excluded)
        self.images_embedded = 0  # images embedded by this object (embedding-cache hits are not counted)

    def _load_cache(self) -> dict[str, dict[str, torch.Tensor]]:
        if not self.cache_path.exists():
            return {}
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.cache_path))
        except (SafetensorError, OSError) as error:  # a damaged cache only costs embedding again
            warnings.warn(f"{self.cache_path} is damaged ({error}); embedding the images again")
            return {}
        cached: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            key, kind = name.split("/", 1)
            cached.setdefault(key, {})[kind] = tensor
        return cached

    def add(self, results, images: list[Image.Image] | None = None) -> None:
        """Embed the images of `results` not embedded yet (one batch per backbone), and append their scores.

        `images[i]` is the image of `results[i]` in memory; without them the PNGs are read."""
        if not results:
            return
        start = time.perf_counter()
        records = [self._record(result) for result in results]
        todo = list({r.key: (i, r) for i, r in enumerate(results) if r.key not in self.embeddings}.values())
        if todo:
            pictures = [images[i] if images is not None else load_image(r.image_path, "cells.csv: image") for i, r in todo]
            embedded = self.scorer.embed_images(pictures, [records[i]["prompt"] for i, _ in todo])
            for row, (_, result) in enumerate(todo):
                self.embeddings[result.key] = {kind: rows[row].cpu() for kind, rows in embedded.items()}
            self.images_embedded += len(todo)
        cells = [result.cell for result in results]
        self.table.add(cells, records, self._score([result.key for result in results]))
        touched = {}
        for cell, record in zip(cells, records):
            group = tuple(record[column] for column in GROUP_COLUMNS)
            self._group_heads.setdefault(group, {**record, "seed": None, "key": None})
            self.groups.setdefault(group, {}).setdefault(cell, record["key"])
            touched[group] = True
        for group in touched:
            self._score_group(group)
        self.seconds += time.perf_counter() - start

    def _record(self, result) -> dict:
        return {"prompt_index": result.cell.prompt_index, "prompt": self.study.scoring_prompt(result.cell.template),
                "method": result.method, "kind": result.kind, "weight": result.cell.weight, "seed": result.cell.seed,
                "key": result.key}

    def _score(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """{per-image metric: [N] values} of the images with `keys`, from their embeddings, in one pass."""
        stacked = {kind: torch.stack([self.embeddings[key][kind] for key in keys]) for kind in self.embeddings[keys[0]]}
        return self.scorer.score_embedded(stacked, self.references)

    def _score_group(self, group: tuple) -> None:
        """Rewrite the rows of `group` for every group metric (the group got new cells)."""
        if not self.scorer.group_metrics:
            return
        keys = list(self.groups[group].values())
        subset = {kind: torch.stack([self.embeddings[key][kind] for key in keys]) for kind in self.embeddings[keys[0]]}
        for metric in self.scorer.group_metrics:
            row = {**self._group_heads[group], "metric": metric.name, "value": metric.score_group(subset)}
            self.table.set_group(metric.name, group, row)

    def frame(self) -> pd.DataFrame:
        """The long score table of every added image, plus one row per group for group metrics."""
        return self.table.frame()

    def finish(self) -> None:
        """Settle the per-image values in one pass over every image, then save embeddings and cost.

        Batches are scored as they arrive; a matrix product over one row can differ in the last bit
        from the same row inside a larger product, so the saved values are computed once more over
        the whole table, as a single rescoring of the folder computes them. Linear, once per run.
        """
        if self.table.batches > 1 and len(self.table):
            self.table.replace_values(self._score(self.table.keys()))
        self.save()

    def save(self) -> None:
        from safetensors.torch import save_file

        flat = {f"{key}/{kind}": tensor.contiguous().cpu() for key, kinds in self.embeddings.items()
                for kind, tensor in kinds.items()}
        atomic_write(self.cache_path, lambda partial: save_file(flat, str(partial)))
        # What this session's scoring cost, for the manifest (the run result carries only the seconds).
        cost = {"images_embedded": self.images_embedded, "seconds": round(self.seconds, 4)}
        atomic_write(self.cache_path.parent / SCORING_COST_FILE, json.dumps(cost))
