"""A study, as frozen data: loaded from presets/*.yaml (or YAML text), validated before any GPU work."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StudyError
from .images import load_image
from .safe_yaml import load_yaml, read_study_file
from .text import TEXT_LIMITS, fill, source_text
from .weights import WeightSource, parse_weight_source

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_MAX_CELLS = 1000
SCHEDULERS = ("default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm")
DTYPES = ("auto", "float16", "bfloat16", "float32")
# The valid range of each number, checked before any model loads.
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes -2**63..2**64-1, and a negative s is the seed 2**64 + s
MAX_STEPS = 1000  # num_train_timesteps of the SD1.5 and SDXL schedulers; DDIM refuses more steps
MAX_SIDE = 2048  # px per side (SDXL is trained at 1024); a multiple of 8, the VAE's downsampling
GUIDANCE_RANGE = (1.0, 100.0)  # diffusers applies classifier-free guidance above 1; 1 (or less) is CFG off
MAX_CELLS_LIMIT = 1_000_000


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA applied to every cell of the study, at a fixed weight."""

    source: WeightSource
    weight: float = 1.0


@dataclass(frozen=True)
class Subject:
    reference_images: tuple[str, ...]
    token: str = "sks"
    class_noun: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """One column group: a method (its options are the method object's fields) and its weights."""

    label: str
    method: Any  # a registered method instance (frozen dataclass)
    weights: tuple[float, ...]

    def column(self, weight: float) -> str:
        return self.label if self.method.kind == "baseline" else f"{self.label}@{weight:g}"


@dataclass(frozen=True)
class Study:
    name: str
    base: str
    subject: Subject
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[MethodSpec, ...]
    description: str = ""
    loras: tuple[LoraSpec, ...] = ()
    steps: int = 30
    guidance: float = 7.5
    size: tuple[int, int] = (512, 512)
    scheduler: str = "default"
    negative_prompt: str = ""
    dtype: str = "auto"
    max_cells: int = DEFAULT_MAX_CELLS
    source: str = "<study>"

    @property
    def is_tiny(self) -> bool:
        return self.base in ("tiny", "tiny-xl")

    def cells(self) -> list["Cell"]:
        """Every image of the study, ordered method (outer) > prompt > weight > seed."""
        return [
            Cell(prompt_index=p, template=template, method_index=m, weight=w, seed=s)
            for m, spec in enumerate(self.methods)
            for p, template in enumerate(self.prompts)
            for w in spec.weights
            for s in self.seeds
        ]

    def render_prompt(self, cell: "Cell") -> str:
        return self.methods[cell.method_index].method.render_prompt(cell.template, self.subject)

    def scoring_prompt(self, template: str) -> str:
        """The prompt with the identifier token removed, naming only the class (for CLIP-T)."""
        return fill(template, "", self.subject.class_noun)

    def to_dict(self) -> dict:
        """The resolved spec, as written to manifest.json and accepted back by parse_study."""
        return {
            "name": self.name, "description": self.description, "base": self.base,
            "lora": [{"path": source_text(l.source), "weight": l.weight} for l in self.loras],
            "subject": {"reference_images": list(self.subject.reference_images), "token": self.subject.token,
                        "class_noun": self.subject.class_noun},
            "prompts": list(self.prompts), "seeds": list(self.seeds), "steps": self.steps,
            "guidance": self.guidance, "size": list(self.size), "scheduler": self.scheduler,
            "negative_prompt": self.negative_prompt, "dtype": self.dtype, "max_cells": self.max_cells,
            "methods": [
                {"kind": m.method.kind, "label": m.label, "weights": list(m.weights), **m.method.options()}
                for m in self.methods
            ],
        }


@dataclass(frozen=True)
class Cell:
    prompt_index: int
    template: str
    method_index: int
    weight: float
    seed: int


# ---------------------------------------------------------------- loading

_TOP_KEYS = {
    "name", "description", "base", "lora", "subject", "prompts", "seeds", "steps", "guidance", "size",
    "scheduler", "negative_prompt", "dtype", "max_cells", "methods",
}
_SUBJECT_KEYS = {"reference_images", "token", "class_noun"}
_LORA_KEYS = {"path", "weight"}


def load_study(path: str | Path, **overrides) -> Study:
    """Read and validate presets/NAME.yaml. Raises StudyError('FILE: field: what is wrong')."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: preset file not found")
    data = read_study_file(path)
    return parse_study(data, source=str(path), base_dir=path.resolve().parent, **overrides)


def parse_study(data: Any, source: str = "<study>", base_dir: Path | None = None, **overrides) -> Study:
    """Validate a study dict (the YAML schema of presets/). Every error names the field."""
    from .methods import METHODS, build_method

    def fail(where: str, what: str) -> StudyError:
        return StudyError(f"{source}: {_cut(where, 80)}: {_cut(what, 300)}")

    if isinstance(data, str):
        data = load_yaml(data, source)
    if not isinstance(data, dict):
        raise StudyError(f"{source}: expected a mapping of study fields, got {type(data).__name__}")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(sorted(map(str, unknown))[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")

    base = str(data.get("base") or DEFAULT_BASE)
    if base.lower().endswith(".safetensors") or base.startswith((".", "/", "~")):
        local = parse_weight_source(base, "base", base_dir)
        base = local.repo
    elif base not in ("tiny", "tiny-xl"):
        parse_weight_source(base, "base", base_dir)

    subject_data = data.get("subject") or {}
    if not isinstance(subject_data, dict):
        raise fail("subject", "expected a mapping with reference_images, token, class_noun")
    if set(subject_data) - _SUBJECT_KEYS:
        raise fail(f"subject.{sorted(map(str, set(subject_data) - _SUBJECT_KEYS))[0]}", f"unknown key (known: {', '.join(sorted(_SUBJECT_KEYS))})")
    references = subject_data.get("reference_images") or []
    if isinstance(references, str):
        references = [references]
    resolved_refs = []
    for index, ref in enumerate(references):
        where = f"subject.reference_images[{index}]"
        found = _resolve_path(str(ref), base_dir)
        if found is None:
            raise fail(where, f"file not found: {ref}")
        try:
            load_image(found, field=where)
        except StudyError as error:
            raise StudyError(f"{source}: {error}") from None
        resolved_refs.append(str(found))
    subject = Subject(tuple(resolved_refs), _text(subject_data.get("token", "sks"), "subject.token", fail),
                      _text(subject_data.get("class_noun"), "subject.class_noun", fail))

    prompts = data.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not isinstance(prompts, list):
        raise fail("prompts", "expected a non-empty list of prompts")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise fail(f"prompts[{index}]", "empty prompt")
        _text(prompt, f"prompts[{index}]", fail, "prompt")
        if subject.token.strip() and re.search(rf"(?<!\w){re.escape(subject.token.strip())}(?!\w)", prompt):
            raise fail(f"prompts[{index}]", f"writes the identifier {subject.token!r} literally; write {{subject}} so "
                                            "the baseline, IP-Adapter and CLIP-T prompts can leave it out")

    seeds = _seeds(data.get("seeds", [0]), fail)
    if not seeds:
        raise fail("seeds", "expected at least one seed")
    size = _size(data.get("size", 512), fail)
    scheduler = str(data.get("scheduler", "default"))
    if scheduler not in SCHEDULERS:
        raise fail("scheduler", f"unknown scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    dtype = str(data.get("dtype", "auto"))
    if dtype not in DTYPES:
        raise fail("dtype", f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")

    loras = []
    lora_items = data.get("lora") or []
    if isinstance(lora_items, (dict, str)):
        lora_items = [lora_items]
    for index, item in enumerate(lora_items):
        where = f"lora[{index}]"
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "path" not in item:
            raise fail(where, "expected {path: ..., weight: ...}")
        if set(item) - _LORA_KEYS:
            raise fail(f"{where}.{sorted(map(str, set(item) - _LORA_KEYS))[0]}", "unknown key (known: path, weight)")
        path = str(item["path"])
        if path == "tiny":
            from .tiny import resolve_tiny

            path = _tiny_or_fail(resolve_tiny, "lora", base, fail, where)
        loras.append(LoraSpec(parse_weight_source(path, f"{where}.path", base_dir),
                              _weight(item.get("weight", 1.0), f"{where}.weight", METHODS["lora"], fail)))

    methods_data = data.get("methods") or [{"kind": "baseline"}]
    if not isinstance(methods_data, list):
        raise fail("methods", "expected a list of {kind: ..., weights: [...]}")
    methods, labels = [], set()
    for index, item in enumerate(methods_data):
        where = f"methods[{index}]"
        item = {"kind": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "kind" not in item:
            raise fail(where, "expected a mapping with a 'kind'")
        options = {k: v for k, v in item.items() if k not in ("kind", "weights", "label")}
        method = build_method(str(item["kind"]), options, base=base, base_dir=base_dir,
                              fail=lambda what, w=where: fail(w, what))
        weights = item.get("weights", method.default_weights)
        if weights is None:
            raise fail(f"{where}.weights", f"{method.kind} needs a list of weights, e.g. [0.3, 0.5, 0.7]")
        weights = [weights] if isinstance(weights, (int, float)) else list(weights) if isinstance(weights, tuple) else weights
        if not isinstance(weights, list) or not weights:
            raise fail(f"{where}.weights", f"expected a non-empty list of numbers, got {_shown(weights)}")
        weights = tuple(_weight(w, f"{where}.weights[{i}]", method, fail) for i, w in enumerate(weights))
        if len(set(weights)) != len(weights):
            raise fail(f"{where}.weights", f"duplicate weights in {list(weights)}")
        label = _text(item.get("label"), f"{where}.label", fail) or method.kind
        if label in labels:
            raise fail(f"{where}.label", f"two methods are labelled {label!r}; give each a distinct 'label'")
        labels.add(label)
        if method.uses_references and not subject.reference_images:
            raise fail(where, f"{method.kind} needs subject.reference_images")
        methods.append(MethodSpec(label, method, weights))

    max_cells = _whole(data.get("max_cells", DEFAULT_MAX_CELLS), "max_cells", fail, 1, MAX_CELLS_LIMIT)
    study = Study(
        name=_text(data.get("name"), "name", fail) or Path(source).stem,
        description=_text(data.get("description"), "description", fail),
        base=base, loras=tuple(loras), subject=subject, prompts=tuple(p.strip() for p in prompts),
        seeds=tuple(seeds), methods=tuple(methods),
        steps=_whole(data.get("steps", 30), "steps", fail, 1, MAX_STEPS, " (the schedulers' training timesteps)"),
        guidance=_number(data.get("guidance", 7.5), "guidance", fail, *GUIDANCE_RANGE,
                         " (1 turns classifier-free guidance off)"),
        size=size, scheduler=scheduler, negative_prompt=_text(data.get("negative_prompt"), "negative_prompt", fail),
        dtype=dtype, max_cells=max_cells, source=source,
    )
    count = len(study.prompts) * len(study.seeds) * sum(len(m.weights) for m in study.methods)
    if count > max_cells:
        raise fail("max_cells", f"the study has {count} cells, more than max_cells={max_cells}: "
                   "drop seeds, weights or prompts, or raise max_cells")
    return study


def _tiny_or_fail(resolver, kind, base, fail, where):
    try:
        return resolver(kind, base)
    except ValueError as error:
        raise fail(where, str(error)) from None


def _resolve_path(text: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(text).expanduser()]
    if base_dir is not None and not Path(text).is_absolute():
        candidates += [base_dir / text, base_dir.parent / text]
    return next((c.resolve() for c in candidates if _is_file(c)), None)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the filesystem allows
        return False


def _cut(text: str, limit: int) -> str:
    """`text` on one line, at most about `limit` characters: a message never repeats a megabyte of input."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(value) -> str:
    return _cut(repr(value), 50)


def _number(value, where, fail, low=-math.inf, high=math.inf, note="") -> float:
    """A finite number in [low, high]; `note` (' for ip_adapter') says whose range it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(where, f"expected a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        number = math.inf
    if not math.isfinite(number):
        raise fail(where, f"expected a finite number, got {_shown(value)}")
    if not low <= number <= high:
        expected = f"{low:g}" if low == high else f"a number from {low:g} to {high:g}"
        raise fail(where, f"expected {expected}{note}, got {number:g}")
    return number


def _weight(value, where, method, fail) -> float:
    """A method's weight: finite, within the `weight_range` its class states (any finite number without one)."""
    low, high = getattr(method, "weight_range", (-math.inf, math.inf))
    return _number(value, where, fail, low, high, f" for {method.kind}")


def _whole(value, where, fail, low: int, high: int, note="") -> int:
    """A whole number in [low, high]; 30.0 counts as 30, 2.5 is refused rather than rounded."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(where, f"expected a whole number from {low} to {high}{note}, got {_shown(value)}")
    return value


def _size(value, fail) -> tuple[int, int]:
    sides = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and 8 <= s <= MAX_SIDE
                                  and s % 8 == 0 for s in sides):
        raise fail("size", f"expected a multiple of 8 from 8 to {MAX_SIDE} px, or [height, width] of such, "
                           f"got {_shown(value)}")
    return sides[0], sides[1]


def _text(value, where, fail, limit_name: str | None = None) -> str:
    """Free text (None is empty), at most TEXT_LIMITS[limit_name or the field's last word] characters."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise fail(where, f"expected text, got {_shown(value)}")
    text, limit = str(value), TEXT_LIMITS[limit_name or where.rsplit(".", 1)[-1]]
    if len(text) > limit:
        raise fail(where, f"{len(text)} characters, more than the {limit} allowed")
    return text


def _seeds(values, fail) -> list[int]:
    values = [values] if isinstance(values, int) and not isinstance(values, bool) else values
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise fail("seeds", f"expected a list of integers, got {_shown(values)}")
    for index, value in enumerate(values):
        if not 0 <= value <= MAX_SEED:
            raise fail(f"seeds[{index}]", f"expected a seed from 0 to 2**64-1 (torch.Generator's range), "
                                          f"got {_shown(value)}")
    if len(set(values)) != len(values):
        raise fail("seeds", f"duplicate seeds in {_shown(values)}")
    return values
