from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_method
from .common import fill_prompt, source_identity, source_text, weight_source_option

SWAPPED = ("unet", "text_encoder", "text_encoder_2")


@register_method("dreambooth")
@dataclass(frozen=True)
class DreamBooth:
    """A fine-tuned full checkpoint of the same architecture, compared against the base.

    Its UNet and text encoder(s) replace the base's for these cells. Weight w interpolates the UNet
    between base (0) and fine-tuned (1); the default sweep is [1.0].
    """

    checkpoint: object = None  # WeightSource: a diffusers folder / hub id, or a single .safetensors file

    title = "DreamBooth"
    weight_option, weight_file_kind = "checkpoint", "checkpoint"
    default_weights = suggested_weights = (1.0,)
    weight_range = (0.0, 2.0)  # 0 = base UNet, 1 = fine-tuned, above 1 extrapolates
    uses_references = False

    @classmethod
    def from_options(cls, options, *, base, base_dir, fail):
        return cls(weight_source_option(options.get("checkpoint"), "checkpoint", kind="dreambooth", base=base,
                                        base_dir=base_dir, fail=fail))

    def render_prompt(self, template, subject):
        return fill_prompt(template, subject.token, subject.class_noun)

    def options(self):
        return {"checkpoint": source_text(self.checkpoint)}

    def identity(self):
        return {"kind": "dreambooth", "checkpoint": source_identity(self.checkpoint)}

    def attach(self, pipe, study):
        return _DreamBoothAttachment(self, pipe)


class _DreamBoothAttachment:
    per_sample_weights = False  # the weight blends the UNet's own parameters: one per pipeline call

    def __init__(self, method: DreamBooth, pipe):
        from ..models import load_pipeline_uncached

        self.pipe = pipe
        model_offload = bool(getattr(pipe, "_all_hooks", None))
        device = "cpu" if model_offload else str(pipe._execution_device)
        tuned = load_pipeline_uncached(method.checkpoint, dtype=pipe.dtype, device=device,
                                       field="dreambooth.checkpoint")
        self.originals = {name: getattr(pipe, name) for name in SWAPPED if getattr(pipe, name, None) is not None}
        self.tuned_unet_state = None
        for name in self.originals:
            setattr(pipe, name, getattr(tuned, name))
        pipe.maybe_free_model_hooks()  # under model offload, hooks for the swapped-in models (else a no-op)
        self.current_weight = 1.0

    def call_kwargs(self, weights):
        if len(set(weights)) != 1:
            raise ValueError("dreambooth: one weight per batch")
        weight = weights[0]
        if weight != self.current_weight:
            unet = self.pipe.unet
            if self.tuned_unet_state is None:
                self.tuned_unet_state = {k: v.clone() for k, v in unet.state_dict().items()}
            base_state = self.originals["unet"].state_dict()
            with torch.no_grad():
                for key, value in unet.state_dict().items():
                    value.copy_(torch.lerp(base_state[key], self.tuned_unet_state[key], weight)
                                if value.is_floating_point() else self.tuned_unet_state[key])
            self.current_weight = weight
        return {}

    def release(self):
        for name, module in self.originals.items():
            setattr(self.pipe, name, module)
        self.pipe.maybe_free_model_hooks()
