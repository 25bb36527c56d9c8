from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch

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

    per_sample_weights = True  # nothing per sample: call_kwargs ignores the weights

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

    title = "Subject LoRA"
    weight_option, weight_file_kind = "path", "lora"
    default_weights = None
    suggested_weights = (0.6, 1.0)
    weight_range = (-2.0, 2.0)  # adapter scale; negative subtracts the subject (also the study-level `lora:`)
    uses_references = False

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
    """The subject LoRA on the pipeline; a batch may mix weights when the LoRA touches only the UNet.

    A mixed batch runs the adapter at scale 1 and multiplies each UNet LoRA layer's delta per sample
    (a forward hook on its `lora_B`), with the factor peft itself computes for each weight, so every
    sample gets `base(x) + lora_B(lora_A(x)) * scaling(weight)`, the sum a batch of that weight alone
    computes. Text-encoder LoRA layers see the prompt batch, not the samples; such a LoRA (or one with
    DoRA-style variant layers) runs one weight per pipeline call (`per_sample_weights` False).
    """

    def __init__(self, method: Lora, pipe, study):
        self.pipe, self.study = pipe, study
        load_lora(pipe, method.path, SUBJECT_ADAPTER, "lora.path")
        self.layers = _lora_layers(pipe.unet)
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        self.per_sample_weights = not any(_lora_layers(e) for e in encoders if e is not None) and not any(
            SUBJECT_ADAPTER in getattr(layer, "lora_variant", {}) for layer in self.layers)
        self.hooks = []

    def call_kwargs(self, weights):
        self._remove_hooks()
        if len(set(weights)) == 1:
            activate_loras(self.pipe, self.study, {SUBJECT_ADAPTER: weights[0]})
            return {}
        if not self.per_sample_weights:
            raise ValueError("lora: this LoRA has text-encoder or variant layers; one weight per batch")
        activate_loras(self.pipe, self.study, {SUBJECT_ADAPTER: 1.0})
        for layer in self.layers:
            factors = []
            for weight in weights:
                layer.set_scale(SUBJECT_ADAPTER, weight)
                factors.append(layer.scaling[SUBJECT_ADAPTER])
            layer.scaling[SUBJECT_ADAPTER] = 1.0
            lora_b = layer.lora_B[SUBJECT_ADAPTER]
            factors = torch.tensor(factors, dtype=torch.float32, device=lora_b.weight.device)
            self.hooks.append(lora_b.register_forward_hook(partial(_scale_rows, factors)))
        return {}

    def _remove_hooks(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def release(self):
        self._remove_hooks()
        remove_lora(self.pipe, SUBJECT_ADAPTER, self.study)


def _lora_layers(model) -> list:
    """The peft LoRA layers of `model` that carry the subject adapter."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and SUBJECT_ADAPTER in m.lora_B]


def _scale_rows(factors: torch.Tensor, module, inputs, output):
    """Sample i's rows of a LoRA delta times factors[i], tiled over the CFG halves of the UNet batch.

    Multiplied in float32, as torch multiplies a half or bfloat16 tensor by peft's Python-float scale.
    """
    repeats, rest = divmod(output.shape[0], factors.shape[0])
    if rest:
        raise ValueError(f"lora: a layer saw a batch of {output.shape[0]} for {factors.shape[0]} weights")
    return (output.float() * factors.repeat(repeats).view(-1, *[1] * (output.ndim - 1))).to(output.dtype)
