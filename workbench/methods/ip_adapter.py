from __future__ import annotations

import os
import re
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
        if self.block_scales:
            _check_blocks_exist(self.block_scales, pipe.unet)
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
    """The shape diffusers' set_ip_adapter_scale reads, every scale a number within `weight_range`.

    {"down" | "up": scale or {"block_N": scale or [scale per attention layer]}, "mid": scale or [scale]}
    """
    low, high = weight_range

    def scale(where: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise fail(f"{where}: expected a number from {low:g} to {high:g}, got {str(value)[:40]}")

    def scales(where: str, value) -> None:
        if not isinstance(value, list):
            return scale(where, value)
        if not value:
            raise fail(f"{where}: expected a number or a non-empty list of numbers (one per attention layer)")
        for index, item in enumerate(value):
            scale(f"{where}[{index}]", item)

    for part, value in block_scales.items():
        where = f"block_scales.{part}"
        if part not in ("down", "mid", "up"):
            raise fail(f"block_scales: unknown part {str(part)[:40]!r} (known: down, mid, up)")
        if part == "mid" or not isinstance(value, dict):
            if isinstance(value, dict):
                raise fail(f"{where}: expected a number or [number]: the mid block has one attention layer")
            scales(where, value)
            continue
        for block, item in value.items():
            if not (isinstance(block, str) and re.fullmatch(r"block_\d+", block)):
                raise fail(f"{where}: {str(block)[:40]!r} is not a block name such as 'block_0'")
            scales(f"{where}.{block}", item)


def _check_blocks_exist(block_scales: dict, unet) -> None:
    """Refuse a block without attention layers: diffusers would skip it and leave the adapter off there."""
    for part in ("down", "up"):
        named = block_scales.get(part)
        if not isinstance(named, dict):
            continue
        blocks = getattr(unet, f"{part}_blocks")
        with_attention = [i for i, block in enumerate(blocks) if hasattr(block, "attentions")]
        for block in named:
            if int(block.split("_")[1]) not in with_attention:
                raise StudyError(
                    f"ip_adapter: block_scales.{part}.{block}: this UNet's {part} block {block.split('_')[1]} has no "
                    f"attention layers, so the adapter would be off there; name one of "
                    f"{', '.join(f'block_{i}' for i in with_attention)}")


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
