"""The study form: its components, form values -> study dict (the schema of presets/), and back."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gradio as gr

from ..errors import StudyError
from ..spec import DTYPES, MAX_SIDE, SCHEDULERS
from .config import ASSETS, KNOWN_BASES, MAX_REFERENCES, PRESETS, PUBLIC_MAX_CELLS, PUBLIC_MAX_STEPS, \
    ModelChoices, weight_files

CHECKED = ("baseline", "ip_adapter")  # the methods a new form starts with


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


def form_number(value, field_name: str, default, kind=int):
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


def numbers_text(values) -> str:
    values = values if isinstance(values, list) else [values]
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class MethodForm:
    """What the form shows for a method kind, all from its registered class."""

    title: str
    option: str | None  # the option naming its weights file, None for none
    weights: str  # the weights the form starts with ("": the kind has no weight)
    unset: str  # what the option's dropdown shows for a study that does not set it


def method_forms() -> dict[str, MethodForm]:
    """Every registered method kind, in registry order, as the form shows it."""
    from ..methods import METHODS

    return {kind: MethodForm(cls.title, cls.weight_option,
                             numbers_text(list(cls.suggested_weights)) if cls.suggested_weights else "",
                             weight_files(cls.weight_file_kind).unset)
            for kind, cls in METHODS.items()}


@dataclass
class MethodRow:
    kind: str
    title: str
    option: str | None
    unset: str
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
            self.methods = [self._method_row(kind, form, choices, custom) for kind, form in method_forms().items()]
            self.ti_token = gr.Textbox("<subject>", label="Textual-inversion token", max_lines=1)
        self.notes = gr.Markdown("", elem_classes="wb-notes")

    @staticmethod
    def _method_row(kind: str, form: MethodForm, choices: ModelChoices, custom: bool) -> MethodRow:
        with gr.Row(elem_classes="wb-method", equal_height=True):
            use = gr.Checkbox(label=form.title, value=kind in CHECKED, min_width=150, scale=2, elem_id=f"use-{kind}")
            weights = gr.Textbox(form.weights, label="weights", max_lines=1, min_width=110, scale=2,
                                 elem_id=f"weights-{kind}") if form.weights else None
            options = list(choices.options.get(form.option, ())) if form.option else []
            choice = gr.Dropdown(options, value=options[0][1] if options else None, label=form.option,
                                 allow_custom_value=custom, min_width=130, scale=3,
                                 elem_id=f"option-{kind}") if form.option else None
            if weights is None:
                gr.HTML("", min_width=0, scale=5)
        return MethodRow(kind, form.title, form.option, form.unset, use, weights, choice)

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
        height, width = form_number(v[self.height], "height", 0), form_number(v[self.width], "width", 0)
        prompts = [line.strip() for line in (v[self.prompts] or "").splitlines() if line.strip()]
        lora_weight = form_number(v[self.lora_weight], "LoRA weight", 1.0, float)
        return {
            "name": (v[self.name] or "study").strip(),
            "base": v[self.base],
            "lora": [{"path": path, "weight": lora_weight} for path in (v[self.loras] or [])],
            "subject": {"reference_images": list(references), "token": (v[self.token] or "").strip(),
                        "class_noun": (v[self.class_noun] or "").strip()},
            "prompts": prompts,
            "seeds": parse_numbers(v[self.seeds], "seeds", int),
            "steps": form_number(v[self.steps], "steps", 0),
            "guidance": form_number(v[self.guidance], "guidance", 7.5, float),
            "size": height if height == width else [height, width],
            "scheduler": v[self.scheduler],
            "negative_prompt": v[self.negative_prompt] or "",
            "dtype": v[self.dtype],
            "max_cells": form_number(v[self.max_cells], "max cells", 1000) or 1000,
            "methods": methods,
        }

    def fill(self, data: dict) -> dict:
        """Form updates for a study dict, and notes on what the form cannot show (edit those as YAML)."""
        from ..methods import METHODS

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
            self.prompts: "\n".join(data.get("prompts") or []), self.seeds: numbers_text(data.get("seeds", [0])),
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
                weights = first.get("weights", METHODS[row.kind].default_weights)
                if weights is not None:
                    updates[row.weights] = numbers_text(list(weights) if isinstance(weights, tuple) else weights)
            if row.option:
                updates[row.choice] = str(first.get(row.option, row.unset))
            if row.kind == "textual_inversion" and "token" in first:
                updates[self.ti_token] = first["token"]
        updates[self.notes] = ("**Note:** " + "; ".join(notes) + ". Run it from **Study YAML** to keep every "
                               "detail.") if notes else ""
        return updates
