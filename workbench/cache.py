"""The cell cache: a cell's key, its PNG in the run folder, what is on disk, what is missing, twins.

A cell's key is the hash of everything that determines its image. Its PNG is
`images/LABEL/pPROMPT_wWEIGHT_sSEED_KEY16.png` (KEY16: the key's first 16 hex digits) and carries
the generation parameters as metadata. Cells that share a key (the baseline and IP-Adapter at scale
0) are twins: the image is generated once, and each twin gets its own copy.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_write
from .methods import NEUTRAL_IDENTITY, is_neutral
from .spec import Cell, Study
from .weights import sha256_file, source_identity

PNG_KEY = "workbench"


@dataclass
class CellResult:
    """A cell's image on disk."""

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


def source_key(study: Study, cell: Cell, *, device: str, base_identity: dict, identities: dict | None = None) -> str:
    """Hash of everything that determines a cell's image: the cache key of its PNG.

    `identities` (from `study_identities`) saves hashing the same weight files again for every cell.
    """
    identities = identities or study_identities(study)
    method = study.methods[cell.method_index].method
    neutral = is_neutral(method, cell.weight)  # neutral cells all share the baseline's key
    uses_references = method.uses_references and not neutral
    payload = {
        "v": 1,
        "base": base_identity,
        "loras": identities["loras"],
        "method": NEUTRAL_IDENTITY if neutral else identities["methods"][cell.method_index],
        "references": identities["references"] if uses_references else None,
        "prompt": study.render_prompt(cell), "negative_prompt": study.negative_prompt,
        "weight": 0.0 if neutral else cell.weight, "seed": cell.seed, "steps": study.steps, "guidance": study.guidance,
        "size": list(study.size), "scheduler": study.scheduler, "dtype": study.dtype, "device": device,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def study_identities(study: Study) -> dict:
    """What identifies the study's weight files and references, the same for every cell of it."""
    uses_references = any(spec.method.uses_references for spec in study.methods)
    return {"loras": [[source_identity(l.source), l.weight] for l in study.loras],
            "methods": [spec.method.identity() for spec in study.methods],
            "references": [sha256_file(p) for p in study.subject.reference_images] if uses_references else None}


def images_by_key(run_dir: Path) -> dict[str, list[Path]]:
    """Every image file of a run folder, by cache key (the key's first 16 hex digits end each file name)."""
    found: dict[str, list[Path]] = {}
    for path in sorted((run_dir / "images").glob("*/*.png")):
        match = re.search(r"_([0-9a-f]{16})\.png$", path.name)
        if match:
            found.setdefault(match.group(1), []).append(path)
    return found


def read_png_metadata(path: Path) -> dict:
    """The generation parameters a workbench PNG carries ({} for a PNG without them)."""
    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else {}


class CellCache:
    """The cells of a study in one run folder: their keys and files, which are on disk, which are missing.

    `find()` reads the folder; `save(...)` writes a generated image, `save_twins(...)` its twins' copies.
    `truncated` holds the cells whose prompt is longer than the text encoder reads.
    """

    def __init__(self, study: Study, run_dir: Path, *, device_type: str, base_identity: dict,
                 truncated: frozenset[Cell] = frozenset()):
        self.study, self.run_dir, self.truncated = study, Path(run_dir), truncated
        self.cells = study.cells()
        identities = study_identities(study)
        self.keys = {cell: source_key(study, cell, device=device_type, base_identity=base_identity,
                                      identities=identities) for cell in self.cells}
        self.twins: dict[Cell, list[Cell]] = {}  # a cell to generate -> the missing cells with its key

    def path(self, cell: Cell) -> Path:
        label = slug_of(self.study.methods[cell.method_index].label)
        return (self.run_dir / "images" / label
                / f"p{cell.prompt_index:02d}_w{cell.weight:g}_s{cell.seed}_{self.keys[cell][:16]}.png")

    def result(self, cell: Cell, seconds: float = 0.0, generated: bool = False) -> CellResult:
        spec = self.study.methods[cell.method_index]
        return CellResult(cell, self.keys[cell], self.study.render_prompt(cell), spec.label, spec.method.kind,
                          spec.column(cell.weight), self.path(cell), seconds, generated, cell in self.truncated)

    def find(self) -> tuple[list[CellResult], list[Cell]]:
        """The cells on disk (study order) and the cells to generate (one per key; the rest are twins).

        A cell whose image is on disk under another path (a neutral weight, a renamed method, a moved
        prompt) gets its own file; a damaged PNG counts as missing.
        """
        on_disk = images_by_key(self.run_dir)
        claimed = {self.path(cell) for cell in self.cells}
        metadata: dict[Path, dict | None] = {}

        def readable(path: Path) -> bool:
            if path not in metadata:
                metadata[path] = _png_metadata_or_none(path)
            return metadata[path] is not None

        found, missing = [], []
        for cell in self.cells:
            key = self.keys[cell][:16]
            copies = on_disk[key] = [p for p in on_disk.get(key, []) if readable(p)]
            if not copies:
                missing.append(cell)
            elif self.path(cell) in copies:
                found.append(self.result(cell, float(metadata[self.path(cell)].get("seconds", 0.0))))
            else:
                found.append(self._adopt(copies, claimed, self.result(cell)))
        _remove_stale_copies(on_disk, claimed, {self.keys[cell][:16] for cell in self.cells})
        first_with_key: dict[str, Cell] = {}
        for cell in missing:
            source = first_with_key.setdefault(self.keys[cell], cell)
            if source is not cell:
                self.twins.setdefault(source, []).append(cell)
        return found, [cell for cell in missing if first_with_key[self.keys[cell]] is cell]

    def save(self, cell: Cell, image: Image.Image, seconds: float, loaded) -> CellResult:
        """Write a generated cell's PNG, with the generation parameters of `loaded` (a LoadedBase)."""
        made = self.result(cell, seconds, generated=True)
        _write_png(image, made.image_path, _cell_meta(self.study, made, loaded))
        return made

    def save_twins(self, made: CellResult, image: Image.Image, loaded) -> list[CellResult]:
        """Write a copy of a generated cell's image for each missing cell with its key."""
        meta = _cell_meta(self.study, made, loaded)
        copies = []
        for twin in self.twins.get(made.cell, []):
            copy = self.result(twin)
            _write_png(image, copy.image_path, _twin_meta(meta, copy, self.study, self.run_dir, made.image_path))
            copies.append(copy)
        return copies

    def _adopt(self, copies: list[Path], claimed: set[Path], cell: CellResult) -> CellResult:
        """Give `cell` its file of an image found under other paths (`copies`, updated in place).

        A copy that no current cell names (left by a reordered prompt or a renamed method) is moved, so
        the folder keeps one file per cell; otherwise the image is copied (a twin, such as IP-Adapter@0).
        """
        study, run_dir = self.study, self.run_dir
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


def slug_of(text: str) -> str:
    """`text` as a file-name part: letters, digits, '.', '_' and '-' ('method' when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "method"


def _png_metadata_or_none(path: Path) -> dict | None:
    """A cached PNG's metadata, or None when the file is damaged (its cell is then generated again)."""
    try:
        return read_png_metadata(path)
    except (OSError, ValueError, SyntaxError):
        return None


def _remove_stale_copies(on_disk: dict[str, list[Path]], claimed: set[Path], current_keys: set[str]) -> None:
    """Delete the files no current cell names whose image a current cell holds in its own file.

    Images of cells the study no longer has (a dropped method or weight) stay: they are the cache
    when those cells come back.
    """
    for key in current_keys:
        for path in [p for p in on_disk.get(key, []) if p not in claimed]:
            path.unlink(missing_ok=True)
            on_disk[key].remove(path)


def _cell_meta(study: Study, result: CellResult, loaded) -> dict:
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


def _copy_png(source: Path, twin: CellResult, study: Study, run_dir: Path) -> None:
    with Image.open(source) as image:
        image.load()
        _write_png(image, twin.image_path, _twin_meta(read_png_metadata(source), twin, study, run_dir, source))


def _a1111_parameters(meta: dict) -> str:
    """The `parameters` text other tools (A1111, civitai) read from PNGs."""
    return (
        f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\n"
        f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['base']}, "
        f"Method: {meta['method']}, Weight: {meta['weight']:g}"
    )


def _write_png(image: Image.Image, path: Path, meta: dict) -> None:
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(meta))
    info.add_text("parameters", _a1111_parameters(meta))
    # Atomic: a crash mid-write never leaves a PNG that looks cached.
    atomic_write(path, lambda partial: image.save(partial, format="PNG", pnginfo=info))
