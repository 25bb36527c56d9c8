"""The read side of a run folder: what `run_study` wrote, read back by the app, the CLI `score` and export.

Every reader is tolerant: a missing or damaged table reads as None (the run writes it anew), and
a file a table names is opened only when it lies inside the folder (a loaded zip is a client's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import StudyError
from .paths import inside
from .report import read_csv
from .safe_yaml import MAX_MANIFEST_BYTES, MAX_STUDY_BYTES, read_study_file

STUDY_FILE = "study.yaml"  # the portable study an export adds
MANIFEST = "manifest.json"


class RunFolder:
    """A run folder on disk: `RunFolder(path).cells()`, `.scores()`, `.manifest()`, `.study()`, `.column(label)`.

    Each table is read once per RunFolder object: make a new one to see what a running job wrote since.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tables: dict[str, pd.DataFrame | None] = {}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------ tables

    def table(self, name: str) -> pd.DataFrame | None:
        """A CSV of the run (`cells.csv`, `scores.csv`, `summary.csv`), or None when missing, empty or damaged."""
        if name not in self._tables:
            self._tables[name] = _read_table(self.path / name)
        return self._tables[name]

    def cells(self) -> pd.DataFrame | None:
        """cells.csv: one row per image on disk (prompt, method, kind, weight, seed, column, image, one column per metric)."""
        return self.table("cells.csv")

    def scores(self) -> pd.DataFrame | None:
        """scores.csv: the long score table (prompt_index, method, kind, weight, seed, key, metric, value)."""
        return self.table("scores.csv")

    def summary(self) -> pd.DataFrame | None:
        """summary.csv: one row per method@weight (mean, std, n, Δ of each metric, on_pareto_front)."""
        return self.table("summary.csv")

    def column(self, label: str) -> pd.DataFrame:
        """The cells.csv rows of one method@weight column, prompt by prompt, seed by seed (empty when none)."""
        cells = self.cells()
        if cells is None or not label:
            return pd.DataFrame()
        return cells[cells["column"] == label].sort_values(["prompt_index", "seed"])

    def column_labels(self) -> dict[tuple[str, float], str]:
        """(method, weight) -> the column label of the images on disk, in the order of cells.csv."""
        cells = self.cells()
        if cells is None:
            return {}
        return {(m, float(w)): c for m, w, c in zip(cells["method"], cells["weight"], cells["column"])}

    def image(self, name: str, what: str = "cells.csv: image") -> Path | None:
        """The image file a row names, if it is a file inside the folder; else None."""
        try:
            path = inside(self.path, name, what)
        except StudyError:
            return None
        return path if path.is_file() else None

    def grid(self):
        """grid.png as an RGB PIL image, or None before the first image."""
        from PIL import Image

        if not (self.path / "grid.png").is_file():
            return None
        with Image.open(self.path / "grid.png") as grid:
            return grid.convert("RGB")

    # ------------------------------------------------------------ the study

    def manifest(self) -> dict:
        """manifest.json (the study, runs, metric definitions), or {} when missing or damaged."""
        try:
            data = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def study(self, contained: bool = False):
        """The study the run ran (the manifest's), parsed; relative reference images resolve inside the folder.

        `contained`: every reference image must lie inside the folder (a folder from a client).
        Raises StudyError naming the folder when it has no readable manifest.
        """
        from .spec import parse_study

        path = self.path / MANIFEST
        if not path.is_file():
            raise StudyError(f"{self.path}: no manifest.json here; is it a run folder written by `workbench run`?")
        data = self.manifest().get("study")
        if not isinstance(data, dict):
            raise StudyError(f"{path} is damaged (no readable study in it); run the study again with "
                             f"`python -m workbench run PRESET --out {self.path}`, which rewrites it")
        if contained:
            data = self.references_inside(data, str(path))
        return parse_study(data, source=str(path), base_dir=self.path)

    def stored_studies(self) -> dict[str, dict]:
        """The studies the folder holds, as written: {"study.yaml": ..., "manifest.json": ...} for those present.

        Read with the safe YAML loader and its size caps: a folder may come from a client's zip.
        """
        found = {}
        for source in (STUDY_FILE, MANIFEST):
            path = self.path / source
            if not path.is_file():
                continue
            data = read_study_file(path, max_bytes=MAX_STUDY_BYTES if source == STUDY_FILE else MAX_MANIFEST_BYTES)
            if source != STUDY_FILE:
                data = data.get("study") if isinstance(data, dict) else None
            if not isinstance(data, dict):
                raise StudyError(f"{path}: expected a mapping of study fields")
            found[source] = data
        return found

    def references_inside(self, data: dict, what: str) -> dict:
        """A study dict of this folder with its reference images resolved inside it (StudyError for one outside)."""
        references = [str(inside(self.path, ref, f"{what}: subject.reference_images[{index}]"))
                      for index, ref in enumerate(reference_images(data))]
        return {**data, "subject": {**(data.get("subject") or {}), "reference_images": references}}


def _read_table(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None


def reference_images(study: dict) -> list:
    """subject.reference_images of a study dict as written (a list; a lone string becomes one item)."""
    subject = study.get("subject") if isinstance(study, dict) else None
    references = (subject.get("reference_images") if isinstance(subject, dict) else None) or []
    if isinstance(references, str):
        return [references]
    return list(references) if isinstance(references, list) else []


def saved_runs(runs_dir: Path) -> list[tuple[str, str]]:
    """(name, path) of the run folders in runs_dir, newest first."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if (p / MANIFEST).is_file()]
    return [(p.name, str(p)) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]
