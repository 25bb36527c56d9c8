from __future__ import annotations

import os
from dataclasses import dataclass

from . import register_method
from .common import fill_prompt, source_identity, source_text, weight_source_option
from ..errors import StudyError
from ..weights import WeightSource, missing_model_message

SUBJECT_ADAPTER = "workbench_subject"


def base_adapter_name(index: int) -> str:
    return f"workbench_base_{index}"


def load_lora(pipe, source: WeightSource, adapter_name: str, field: str) -> None:
    """pipe.load_lora_weights for a local file, a local folder or a hub `repo[:file]`."""
    if source.local_file is not None and not source.filename:
        repo, weight_name = os.path.split(source.repo)
    else:
        repo, weight_name = source.repo, source.filename
    try:
        pipe.load_lora_weights(repo, weight_name=weight_name, adapter_name=adapter_name, revision=source.revision)
    except (OSError, EnvironmentError) as error:
        if os.path.exists(repo):
            raise StudyError(f"{field}: cannot load LoRA {source_text(source)}: {error}") from None
        raise StudyError(missing_model_message(source, field)) from None
    except ValueError as error:
        raise StudyError(f"{field}: {source_text(source)} is not a LoRA this pipeline accepts ({error})") from None


def activate_loras(pipe, study, extra: dict[str, float] | None = None) -> None:
    """Make exactly the study's LoRAs (and `extra`) active, at their weights."""
    scales = {base_adapter_name(i): lora.weight for i, lora in enumerate(study.loras)}
    scales.update(extra or {})
    if scales:
        pipe.set_adapters(list(scales), list(scales.values()))


def remove_lora(pipe, adapter_name: str, study) -> None:
    remaining = [n for n in pipe.get_list_adapters().get("unet", []) if n != adapter_name]
    if remaining:
        pipe.delete_adapters(adapter_name)
        activate_loras(pipe, study)
    else:  # the last adapter: take the LoRA layers out entirely, as a fresh pipeline has none
        pipe.unload_lora_weights()


class BaseLoras:
    """The study-level LoRAs (`lora:` in a preset), attached for the whole run."""

    def __init__(self, pipe, study):
        self.pipe, self.study = pipe, study
        self.loaded = []
        try:
            for index, lora in enumerate(study.loras):
                load_lora(pipe, lora.source, base_adapter_name(index), f"lora[{index}]")
                self.loaded.append(base_adapter_name(index))
            activate_loras(pipe, study)
        except BaseException:
            self.release()
            raise

    def call_kwargs(self, weights):
        return {}

    def release(self):
        if self.loaded:
            self.pipe.unload_lora_weights()
            self.loaded = []


@register_method("lora")
@dataclass(frozen=True)
class Lora:
    """A subject LoRA (DreamBooth-LoRA); weight = its adapter scale. Prompt keeps the identifier token."""

    path: WeightSource | None = None

    default_weights = None
    uses_references = False
    per_sample_weights = False

    @classmethod
    def from_options(cls, options, *, base, base_dir, fail):
        return cls(weight_source_option(options.get("path"), "path", kind="lora", base=base, base_dir=base_dir, fail=fail))

    def render_prompt(self, template, subject):
        return fill_prompt(template, subject.token, subject.class_noun)

    def options(self):
        return {"path": source_text(self.path)}

    def identity(self):
        return {"kind": "lora", "path": source_identity(self.path)}

    def attach(self, pipe, study):
        return _LoraAttachment(self, pipe, study)


class _LoraAttachment:
    def __init__(self, method: Lora, pipe, study):
        self.pipe, self.study = pipe, study
        load_lora(pipe, method.path, SUBJECT_ADAPTER, "lora.path")

    def call_kwargs(self, weights):
        if len(set(weights)) != 1:
            raise ValueError("lora: one weight per batch")
        activate_loras(self.pipe, self.study, {SUBJECT_ADAPTER: weights[0]})
        return {}

    def release(self):
        remove_lora(self.pipe, SUBJECT_ADAPTER, self.study)
