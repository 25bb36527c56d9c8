"""Base pipelines: hub id, local single file, or tiny. Loaded once and kept, one at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import StudyError
from .weights import WeightSource, missing_model_message, parse_weight_source, source_identity

SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


# The repos whose configs from_single_file reads to build a pipeline around a single checkpoint file.
SD15_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"


# How the pipeline sits in memory: all on the device, or in CPU RAM with each model moved to the
# device while it runs (diffusers' model offload), for smaller cards. Sequential (layer by layer)
# offload is left out: its weights live on the meta device, where textual inversion and DreamBooth
# weight edits cannot reach them.
OFFLOAD_MODES = ("none", "model")


@dataclass(frozen=True)
class LoadedBase:
    """A loaded base pipeline plus what the study runner needs to use it without mutating defaults."""

    pipe: object
    identity: dict
    default_scheduler_config: dict
    device: str
    dtype: torch.dtype
    offload: str = "none"

    @property
    def is_sdxl(self) -> bool:
        return hasattr(self.pipe, "text_encoder_2")


def pick_device(requested: str | None = None) -> str:
    """`requested`, else $WORKBENCH_DEVICE, else cuda when present, else cpu."""
    device = requested or os.environ.get("WORKBENCH_DEVICE")
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def base_source(base: str) -> WeightSource | str:
    if base in ("tiny", "tiny-xl"):
        return base
    return parse_weight_source(base, "base")


def base_identity(base: str) -> dict:
    """What identifies the base weights: tiny version, sha256 of a local file, or hub id@commit."""
    source = base_source(base)
    if isinstance(source, str):
        from .tiny import TINY_VERSION

        return {"tiny": source, "version": TINY_VERSION}
    return source_identity(source)


def is_sdxl_single_file(path: Path) -> bool:
    """Is this single-file .safetensors checkpoint an SDXL one (it has SDXL's second text encoder)?"""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1") for key in handle.keys())


def load_pipeline_uncached(source: WeightSource | str, *, dtype: torch.dtype, device: str, field: str = "base",
                           offload: str = "none"):
    """Load a text-to-image pipeline with diffusers' own loaders; the class follows the checkpoint."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        if isinstance(source, str):
            from .tiny import tiny_pipeline_dir

            pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(source), dtype=dtype)
        elif source.local_file is not None and source.local_file.suffix == ".safetensors":
            path = source.local_file
            pipeline_class = StableDiffusionXLPipeline if is_sdxl_single_file(path) else StableDiffusionPipeline
            extra = {} if pipeline_class is StableDiffusionXLPipeline else {"safety_checker": None}
            pipe = pipeline_class.from_single_file(str(path), dtype=dtype, **extra)
        else:
            # A local folder was checked at parse time (pickles without a .safetensors twin refused);
            # use_safetensors makes sure diffusers and transformers never fall back to one.
            local_folder = {"use_safetensors": True} if source.is_local else {}
            pipe = DiffusionPipeline.from_pretrained(source.repo, revision=source.revision, dtype=dtype, **local_folder)
    except (OSError, EnvironmentError, ValueError) as error:
        single_file = not isinstance(source, str) and source.local_file is not None
        if single_file and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            kind = SDXL_CONFIG_REPO if is_sdxl_single_file(source.local_file) else SD15_CONFIG_REPO
            raise StudyError(
                f"{field}: {source.local_file.name} is a single-file checkpoint; diffusers' from_single_file needs the "
                f"configs of {kind} in the local Hugging Face cache, and HF_HUB_OFFLINE is set. On a machine with "
                f"network run `huggingface-cli download {kind} --include '*.json' '*.txt'` once") from None
        local = not isinstance(source, str) and source.is_local
        if local or isinstance(source, str):
            raise StudyError(f"{field}: cannot load {getattr(source, 'repo', source)}: {str(error).splitlines()[0]}") from None
        raise StudyError(missing_model_message(source, field)) from None
    if getattr(pipe, "safety_checker", None) is not None:
        # A research grid must show what the model made; blacked-out cells would also poison the scores.
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return place_pipeline(pipe, device, offload)


def place_pipeline(pipe, device: str, offload: str = "none"):
    """Put `pipe` on `device` (or offload it there); channels-last convolutions on GPU."""
    if device.startswith("cuda"):
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "none":
        pipe.to(device)
    else:
        raise StudyError(f"offload: unknown mode {offload!r} (known: {', '.join(OFFLOAD_MODES)})")
    return pipe


@lru_cache(maxsize=1)
def load_base(base: str, dtype_name: str = "auto", device: str | None = None, offload: str = "none") -> LoadedBase:
    """The base pipeline for a study, cached: loading another base releases this one."""
    device = pick_device(device)
    dtype = pick_dtype(dtype_name, device)
    pipe = load_pipeline_uncached(base_source(base), dtype=dtype, device=device, offload=offload)
    return LoadedBase(pipe, base_identity(base), dict(pipe.scheduler.config), device, dtype, offload)


def make_scheduler(loaded: LoadedBase, name: str):
    """A fresh scheduler for one run: the checkpoint's own ('default') or a named one on its config."""
    import diffusers

    config = loaded.default_scheduler_config
    if name == "default":
        return getattr(diffusers, config["_class_name"]).from_config(config)
    class_name, extra = SCHEDULER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(config, **extra)
