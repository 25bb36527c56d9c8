"""How the app is served, which models it offers, and what a public app refuses. No Gradio here."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StudyError

REPO = Path(__file__).resolve().parent.parent.parent
PRESETS = REPO / "presets"
ASSETS = REPO / "assets"
DEFAULT_PRESET = PRESETS / "ip-adapter-weights-sd15.yaml"
TINY_PRESET = PRESETS / "tiny.yaml"
MAX_REFERENCES = 5
PUBLIC_MAX_CELLS = 64
PUBLIC_MAX_STEPS = 50
PUBLIC_MAX_SIZE = 1024
KNOWN_BASES = [
    ("SD 1.5 (stable-diffusion-v1-5)", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("SDXL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("tiny (offline, random weights)", "tiny"),
    ("tiny-xl (offline, random weights)", "tiny-xl"),
]
BASE_FOLDER, LORA_FOLDER = "checkpoints", "loras"  # under models/; base checkpoints may also lie in models/ itself


@dataclass(frozen=True)
class WeightFiles:
    """Where the app finds the weight files of one kind (a method's `weight_file_kind`) and what it offers besides."""

    folder: str  # models/<folder>/ offers its .safetensors files (and diffusers folders)
    known: tuple = (("tiny", "tiny"),)  # (label, value) offered besides the files found
    unset: str = ""  # what the option's dropdown shows for a study that does not set it


# The app's one table about weight files: the folder each kind lives in (ComfyUI's layout) and the hub
# choices worth offering. Everything else about a method (title, option, weights) is its class's.
WEIGHT_FILES = {
    "adapter": WeightFiles("ip_adapter", known=(
        ("default (h94 for SD1.5 / SDXL)", "default"),
        ("tiny", "tiny"),
        ("h94 ip-adapter_sd15", "h94/IP-Adapter:models/ip-adapter_sd15.safetensors"),
        ("h94 ip-adapter-plus_sd15", "h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors"),
        ("h94 ip-adapter_sdxl", "h94/IP-Adapter:sdxl_models/ip-adapter_sdxl.safetensors"),
    ), unset="default"),
    "lora": WeightFiles(LORA_FOLDER),
    "embedding": WeightFiles("embeddings"),
    "checkpoint": WeightFiles("dreambooth"),
}


def weight_files(kind: str | None) -> WeightFiles:
    """The folder and known choices of a weight-file kind; a plugin's own kind gets models/<kind>/."""
    return WEIGHT_FILES.get(kind) or WeightFiles(str(kind))


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
    plugins: tuple[str, ...] = ()  # modules adding methods or metrics (besides $WORKBENCH_PLUGINS, entry points)

    @property
    def upload_limit(self) -> str | None:
        return self.max_file_size or ("10mb" if self.public else None)


def default_config(preset: str | None = None, public: bool = False, **overrides) -> AppConfig:
    """The app's config for `python app.py`: on a Space, public with runs in a temp folder."""
    public = public or bool(os.environ.get("SPACE_ID"))
    runs_dir = Path(tempfile.gettempdir()) / "workbench-runs" if public else REPO / "runs" / "app"
    return AppConfig(preset=Path(preset) if preset else None, public=public, runs_dir=runs_dir, **overrides)


# ---------------------------------------------------------------- models on offer


@dataclass(frozen=True)
class ModelChoices:
    """Dropdown choices (label, value): the base, the study's LoRAs, and each method option naming a
    weights file ("adapter", "path", ...). In public mode also the allow-list."""

    base: tuple = ()
    lora: tuple = ()
    options: dict = field(default_factory=dict)  # method option -> ((label, value), ...)

    def values(self, name: str) -> set[str]:
        """The values offered for "base", "lora" or a method option."""
        offered = getattr(self, name) if name in ("base", "lora") else self.options.get(name, ())
        return {value for _, value in offered}


def _sdxl_tag(path: Path) -> str:
    from ..models import is_sdxl_single_file

    try:
        return "SDXL" if is_sdxl_single_file(path) else "SD1.5"
    except Exception:  # not a readable safetensors file: let the spec say so when it is picked
        return "?"


def _local(paths) -> list[tuple[str, str]]:
    return [(f"local: {p.name}", str(p.resolve())) for p in paths]


def discover_models(models_dir: Path) -> ModelChoices:
    """Known hub ids plus the .safetensors files in models_dir/checkpoints, loras and each method's folder.

    Base checkpoints may also lie directly in models_dir; a method's folder may also hold
    diffusers folders (DreamBooth).
    """
    def files(folder: str) -> list[Path]:
        root = models_dir / folder
        return sorted(root.rglob("*.safetensors")) if root.is_dir() else []

    def folders(folder: str) -> list[Path]:
        root = models_dir / folder
        return sorted(p.parent for p in root.glob("*/model_index.json")) if root.is_dir() else []

    present = models_dir.is_dir()
    bases = sorted(models_dir.glob("*.safetensors")) + files(BASE_FOLDER) if present else []
    base = [(f"local: {p.name} ({_sdxl_tag(p)})", str(p.resolve())) for p in bases]
    from ..methods import METHODS

    options = {}
    for cls in METHODS.values():
        if cls.weight_option:
            where = weight_files(cls.weight_file_kind)
            found = _local(folders(where.folder) + files(where.folder)) if present else []
            options[cls.weight_option] = tuple(list(where.known) + found)
    lora = [("tiny", "tiny")] + (_local(files(LORA_FOLDER)) if present else [])
    return ModelChoices(base=tuple(KNOWN_BASES + base), lora=tuple(lora), options=options)


# ---------------------------------------------------------------- public mode


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
    methods = data.get("methods") or []
    for index, method in enumerate(methods if isinstance(methods, list) else []):  # parse_study names a non-list
        if not isinstance(method, dict):
            continue
        for option in choices.options:
            if option in method and str(method[option]) not in choices.values(option) | {"None"}:
                raise refuse(f"methods[{index}].{option}", method[option], choices.values(option))
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


def preset_data(path: Path) -> tuple[dict, list[str]]:
    """A preset's raw dict (weight options as written, e.g. `tiny`) and its resolved reference images."""
    from ..safe_yaml import read_study_file
    from ..spec import load_study

    study = load_study(path)
    return read_study_file(path), list(study.subject.reference_images)


def device_banner(base: str) -> str:
    """A warning for a CPU-only machine about to run real models; "" where it does not apply."""
    import importlib.util

    from ..models import pick_device

    if base in ("tiny", "tiny-xl") or pick_device().startswith("cuda") or importlib.util.find_spec("spaces"):
        return ""
    return ("**No GPU here.** Real SD1.5/SDXL models would take minutes per image on this CPU. "
            "Load the **tiny preset** to try every method offline in seconds (random-weight models: "
            "the images are noise, the machinery is real).")
