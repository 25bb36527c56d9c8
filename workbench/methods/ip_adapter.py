from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import register_method
from .common import fill_prompt, source_identity, source_text, weight_source_option
from ..errors import StudyError
from ..images import load_image
from ..weights import WeightSource, check_weight_folder, missing_model_message, resolved_revision, tree_sha256

DEFAULT_ADAPTERS = {
    "sd15": WeightSource("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors"),
    "sdxl": WeightSource("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl.safetensors"),
}


class PerSampleScale:
    """An IP-Adapter scale with one value per sample, usable where diffusers expects a float.

    diffusers' IP-Adapter processors compute `hidden + scale * ip_hidden` and skip the adapter when
    `scale == 0`; this object broadcasts its values over the batch (tiled for the CFG halves), so
    one UNet pass serves a whole weight sweep.
    """

    def __init__(self, values: torch.Tensor):
        self.values = values

    def __eq__(self, other):
        return bool((self.values == other).all())

    __hash__ = None

    def __mul__(self, hidden: torch.Tensor) -> torch.Tensor:
        values = self.values.to(device=hidden.device, dtype=hidden.dtype)
        repeats = hidden.shape[0] // values.shape[0]
        return hidden * values.repeat(repeats).view(-1, *([1] * (hidden.ndim - 1)))

    __rmul__ = __mul__


def is_ip_processor(processor) -> bool:
    return type(processor).__name__.startswith("IPAdapter")


@register_method("ip_adapter")
@dataclass(frozen=True)
class IPAdapter:
    """IP-Adapter conditioned on the reference images; weight = the adapter scale.

    `adapter` is `repo:path/in/repo.safetensors` (default h94/IP-Adapter for SD1.5 or SDXL, picked
    from the pipeline) or a local file with an `image_encoder/` folder beside it. `block_scales`
    (InstantStyle) is a per-block dict such as {"up": {"block_0": [0.0, 1.0, 0.0]}}; the weight
    multiplies it.
    """

    adapter: WeightSource | None = None
    block_scales: tuple | None = None  # frozen form of the InstantStyle dict

    title = "IP-Adapter"
    weight_option, weight_file_kind = "adapter", "adapter"
    default_weights = None
    suggested_weights = (0.3, 0.5, 0.7)
    weight_range = (0.0, 2.0)  # adapter scale (0 = the baseline's image); also bounds each block_scales value
    uses_references = True

    @classmethod
    def from_options(cls, options, *, base, base_dir, fail):
        adapter = options.get("adapter")
        source = None if adapter in (None, "default") else weight_source_option(
            adapter, "adapter", kind="ip_adapter", base=base, base_dir=base_dir, fail=fail)
        if source is not None and source.is_local:
            try:  # load_ip_adapter also loads the image_encoder/ beside a local adapter file
                _check_image_encoder(source)
            except StudyError as error:
                raise fail(str(error)) from None
        block_scales = options.get("block_scales")
        if block_scales is not None:
            if not isinstance(block_scales, dict):
                raise fail('block_scales: expected a dict like {"up": {"block_0": [0.0, 1.0, 0.0]}}')
            _check_block_scales(block_scales, cls.weight_range, fail)
            block_scales = _freeze(block_scales)
        return cls(source, block_scales)

    def render_prompt(self, template, subject):
        return fill_prompt(template, "", subject.class_noun)

    def options(self):
        options = {"adapter": source_text(self.adapter) if self.adapter else "default"}
        if self.block_scales is not None:
            options["block_scales"] = _thaw(self.block_scales)
        return options

    def identity(self):
        return {"kind": "ip_adapter", "adapter": source_identity(self.adapter) if self.adapter else "default",
                "image_encoder": image_encoder_identity(self.adapter),
                "block_scales": _thaw(self.block_scales) if self.block_scales else None}

    def neutral(self, weight):
        # diffusers' processors skip the adapter at scale 0, and a zero per-sample scale adds exactly 0.
        return weight == 0

    def attach(self, pipe, study):
        return _IPAdapterAttachment(self, pipe, study)


def _load_arguments(source: WeightSource) -> tuple[str, str, str]:
    """(repo, subfolder, weight_name) for diffusers' `load_ip_adapter`."""
    folder, weight_name = os.path.split(source.filename or "")
    if not weight_name:  # a local file given directly
        repo, weight_name = os.path.split(source.repo)
        return repo, "", weight_name
    return source.repo, folder, weight_name


def image_encoder_identity(adapter: WeightSource | None) -> dict:
    """The image encoder `load_ip_adapter` loads with `adapter`: `image_encoder/` in the adapter's folder.

    diffusers loads it without the adapter's revision, so a hub encoder is the repo's main commit.
    """
    if adapter is None:  # the default adapter: SD1.5 or SDXL, whichever the pipeline is
        default = DEFAULT_ADAPTERS["sd15"]
        subfolders = sorted(f"{os.path.dirname(s.filename)}/image_encoder" for s in DEFAULT_ADAPTERS.values())
        return {"hub": default.repo, "subfolders": subfolders, "revision": resolved_revision(WeightSource(default.repo))}
    repo, subfolder, _ = _load_arguments(adapter)
    encoder = Path(subfolder, "image_encoder").as_posix()  # as diffusers joins them
    if adapter.is_local:
        folder = Path(repo, encoder)
        return {"local": str(folder), "sha256": tree_sha256(folder) if folder.is_dir() else None}
    return {"hub": repo, "subfolder": encoder, "revision": resolved_revision(WeightSource(repo))}


class _IPAdapterAttachment:
    def __init__(self, method: IPAdapter, pipe, study):
        self.pipe = pipe
        self.block_scales = _thaw(method.block_scales) if method.block_scales else None
        # A per-sample scale multiplies every IP layer alike; per-block scales are set one weight at a time.
        self.per_sample_weights = self.block_scales is None
        source = method.adapter or DEFAULT_ADAPTERS["sdxl" if _is_sdxl(pipe) else "sd15"]
        repo, subfolder, weight_name = _load_arguments(source)
        try:
            pipe.load_ip_adapter(repo, subfolder=subfolder, weight_name=weight_name, revision=source.revision)
        except (OSError, EnvironmentError) as error:
            if os.path.exists(repo):
                raise StudyError(f"ip_adapter: cannot load {source_text(source)}: {error}") from None
            raise StudyError(missing_model_message(source, "ip_adapter.adapter")) from None
        try:
            references = [load_image(p, "subject.reference_images") for p in study.subject.reference_images]
            device = pipe._execution_device
            self.image_embeds = pipe.prepare_ip_adapter_image_embeds(
                [references], None, device, 1, study.guidance > 1.0)
        except BaseException:
            pipe.unload_ip_adapter()
            raise

    def call_kwargs(self, weights):
        if len(set(weights)) > 1 and not self.per_sample_weights:
            raise ValueError("ip_adapter: block_scales take one weight per batch")
        if len(set(weights)) == 1:
            self.pipe.set_ip_adapter_scale(_scaled(self.block_scales, weights[0]) if self.block_scales else weights[0])
        else:
            scale = PerSampleScale(torch.tensor(weights, dtype=torch.float32))
            for processor in self.pipe.unet.attn_processors.values():
                if is_ip_processor(processor):
                    processor.scale = [scale]
        return {"ip_adapter_image_embeds": self.image_embeds}

    def release(self):
        self.pipe.unload_ip_adapter()


def _check_image_encoder(source: WeightSource) -> None:
    if source.filename:
        folder = Path(source.repo) / Path(source.filename).parent / "image_encoder"
    else:
        folder = Path(source.repo).parent / "image_encoder"
    if folder.is_dir():
        check_weight_folder(folder, "adapter")


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _check_block_scales(block_scales: dict, weight_range, fail) -> None:
    """Keys down/mid/up (diffusers' UNet parts); every value a finite number within `weight_range`."""
    unknown = set(block_scales) - {"down", "mid", "up"}
    if unknown:
        raise fail(f"block_scales: unknown part {sorted(map(str, unknown))[0]!r} (known: down, mid, up)")
    low, high = weight_range
    stack = [("block_scales", block_scales)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{where}.{key}", item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise fail(f"{where}: expected a number from {low:g} to {high:g}, got {str(value)[:40]}")


def _freeze(value):
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value):
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    if isinstance(value, tuple):
        return {k: _thaw(v) for k, v in value}
    return value


def _scaled(block_scales, weight):
    if isinstance(block_scales, dict):
        return {k: _scaled(v, weight) for k, v in block_scales.items()}
    if isinstance(block_scales, list):
        return [_scaled(v, weight) for v in block_scales]
    return float(block_scales) * weight
