"""Backbones: what turns images (and prompts) into the features metrics read; a registry by name.

A backbone is a class registered with `register_backbone("name")`. It says which feature kinds it
produces and what each reads (`produces = {"clip_image": "image", "clip_text": "prompt"}`), takes
its configuration as keyword arguments (`ClipBackbone(name=..., pretrained=...)`, plus `device`),
and returns [N, D] float rows from `features(kind, inputs, batch_size)`. It is loaded once per
configuration (`load_backbone`), and every image is run through it once.

CLIP and DINO rows are L2-normalised, so the cosine of two rows is their dot product; a backbone
without learned weights may return any per-image feature (see examples/plugins/brightness.py).
`pretrained="tiny"` (CLIP) and `model_id="tiny"` (DINO) build a tiny random-weight model from a
config, save it under the workbench cache and load it back through the very call that loads the real
weights, so tests run the real loading and preprocessing code offline.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Protocol, Sequence

import torch
from PIL import Image

from ..models import pick_device
from ..registry import register
from ..tiny import TINY_VERSION, _build_once

TINY = "tiny"

# A ViT-B-32-shaped CLIP shrunk to width 16 (2 heads of 8). The vocabulary and context length stay
# real so the BPE tokenizer open_clip ships with works unchanged.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "workbench-tiny-clip"  # its open_clip model name once registered
TINY_CLIP_WEIGHTS = "open_clip_model.safetensors"
# DINO's input stays 224 px (DreamBooth's crop); 32 px patches keep the sequence at 49 tokens.
TINY_DINO_CONFIG = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=224, patch_size=32
)
TINY_SEED = 0

# DreamBooth's DINO metric: shorter side to 256 (bicubic), centre crop 224, ImageNet statistics.
DINO_RESIZE = 256
DINO_CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


BACKBONES: dict[str, type] = {}


class Backbone(Protocol):
    name: ClassVar[str]  # set by register_backbone
    produces: ClassVar[Mapping[str, Literal["image", "prompt"]]]  # feature kind -> what it reads
    description: str  # what produced the numbers, shown as provenance ("open_clip ViT-B-32 openai")
    identity: str  # which weights: "sha256:..." (local), "repo@commit" (hub), "tiny-dino-v2" (tiny); keys caches

    def __init__(self, *, device: str, **options: Any) -> None: ...

    def features(self, kind: str, inputs: Sequence, batch_size: int = 64) -> torch.Tensor:
        """[N, D] float rows of `kind` for N inputs (RGB PIL images, or prompt strings), in input order."""

    # Optional: @classmethod local_weights(cls, **options) -> "sha256:..." of local weight files, or None;
    # load_backbone loads such a backbone again once its files change.


def register_backbone(name: str):
    """Class decorator: make the backbone available to metrics as `backbone = "<name>"`."""

    def decorate(cls):
        produces = getattr(cls, "produces", None)
        if produces is not None and (not produces or set(produces.values()) - {"image", "prompt"}):
            raise TypeError(f"backbone {name!r}: produces must map feature kinds to 'image' or 'prompt', got "
                            f"{dict(produces)!r}")
        register(BACKBONES, "backbone", name, cls, ("produces", "features"), "workbench.metrics.Backbone")
        cls.name = name
        return cls

    return decorate


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _embed_in_batches(encode, preprocess, images, batch_size: int, device: torch.device,
                      threads: bool | None = None) -> torch.Tensor:
    """Stack `preprocess(image)` batch by batch, encode, L2-normalise; float32 rows on `device`.

    With a GPU encoder the CPU-side PIL resize is what limits images per second, so a thread per
    core preprocesses (PIL resizes outside the GIL; the tensors are the same as one thread's). On a
    CPU-only machine the threads were measured to slow the UNet sharing those cores (tiny benchmark,
    2 cores: batched UNet 5.5 s -> 9.2 s), so there `threads` defaults to off.
    """
    threads = device.type == "cuda" if threads is None else threads
    rows = []
    prepare = lambda image: preprocess(_rgb(image))  # noqa: E731
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            prepared = _preprocess_pool().map(prepare, chunk) if threads and len(chunk) > 1 else map(prepare, chunk)
            rows.append(encode(torch.stack(list(prepared)).to(device)).float())
    if not rows:
        raise ValueError("embed_images: got no images")
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


@lru_cache(maxsize=1)
def _preprocess_pool() -> ThreadPoolExecutor:
    """Threads for image preprocessing, made once per process (stateless, shared by every scorer)."""
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="preprocess")


def _write_tiny_clip(folder: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):  # a fixed seed without moving the caller's RNG
        torch.manual_seed(TINY_SEED)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    (folder / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / TINY_CLIP_WEIGHTS)


def tiny_clip_dir() -> Path:
    """Folder of the tiny CLIP (its open_clip model config and weights), built once and reused after."""
    return _build_once("tiny-clip", _write_tiny_clip)


def _register_tiny_clip_config(folder: Path) -> None:
    """Add the tiny config to open_clip's model configs once, the way open_clip adds any model."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(folder / f"{TINY_CLIP_NAME}.json")


def _write_tiny_dino(folder: Path) -> None:
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = ViTModel(ViTConfig(**TINY_DINO_CONFIG), add_pooling_layer=False)
    model.save_pretrained(folder, safe_serialization=True)


def tiny_dino_dir() -> Path:
    """Folder of the tiny DINO ViT (transformers layout), built on first use and reused after."""
    return _build_once("tiny-dino", _write_tiny_dino)


def _unloadable(what: str, offline_choice: str, error: Exception) -> str:
    return (
        f"could not load {what}: {str(error).rstrip('.')}. Without network its weights must already be in the "
        f"Hugging Face cache (download them once on a machine with network); for the tiny offline model use "
        f"{offline_choice}"
    )


def local_weights_identity(kind: str, name: str, pretrained: str | None = None) -> str | None:
    """'sha256:...' of a backbone's local weight file or folder; None for hub and tiny weights.

    Cheap after the first call (hashes are cached by size and mtime), so it can key caches.
    """
    where = pretrained if kind == "clip" else name  # open_clip: a tag or file; transformers: an id or folder
    if not where or where == TINY or not Path(where).exists():
        return None
    path = Path(where)
    from ..weights import sha256_file, tree_sha256

    return "sha256:" + (tree_sha256(path) if path.is_dir() else sha256_file(path))


def _hub_identity(repo: str) -> str:
    from ..weights import WeightSource, resolved_revision

    return f"{repo}@{resolved_revision(WeightSource(repo))}"


def clip_weights_identity(name: str, pretrained: str) -> str:
    """What identifies open_clip weights `pretrained` of model `name` (see Backbone.identity)."""
    import open_clip

    if pretrained == TINY:
        return f"tiny-clip-{TINY_VERSION}"
    local = local_weights_identity("clip", name, pretrained)
    if local:
        return local
    config = open_clip.get_pretrained_cfg(name, pretrained)
    if config.get("hf_hub"):
        return _hub_identity("/".join(config["hf_hub"].strip("/").split("/")[:2]))
    return config.get("url") or f"open_clip {name} {pretrained}"


def dino_weights_identity(model_id: str) -> str:
    """What identifies the DINO weights `model_id` (see Backbone.identity)."""
    if model_id == TINY:
        return f"tiny-dino-{TINY_VERSION}"
    return local_weights_identity("dino", model_id) or _hub_identity(model_id)


def trained_with_quick_gelu(name: str, pretrained: str) -> bool:
    """Whether open_clip's record of these weights says QuickGELU (OpenAI's CLIPs were trained with it)."""
    import open_clip

    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


@register_backbone("clip")
class ClipBackbone:
    """open_clip model: images and texts into one space; rows are L2-normalised, D = embed_dim."""

    produces = {"clip_image": "image", "clip_text": "prompt"}

    def __init__(self, name: str = "ViT-B-32", pretrained: str = "openai", device: str | torch.device = "cpu"):
        import open_clip

        self.device = torch.device(device)
        if pretrained == TINY:
            folder = tiny_clip_dir()
            _register_tiny_clip_config(folder)
            source, weights = TINY_CLIP_NAME, str(folder / TINY_CLIP_WEIGHTS)
            self.description = f"open_clip tiny random-weight CLIP (tiny-clip-{TINY_VERSION})"
        else:
            source, weights = name, pretrained
            self.description = f"open_clip {name} {pretrained}"
        try:
            # open_clip builds "ViT-B-32" with plain GELU and only warns when the weights were
            # trained with QuickGELU ("openai"); the embeddings would then be subtly wrong.
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                source, pretrained=weights, device=self.device,
                force_quick_gelu=pretrained != TINY and trained_with_quick_gelu(name, pretrained),
            )
        except (OSError, RuntimeError) as error:
            raise RuntimeError(_unloadable(f"CLIP {name} {pretrained}", "clip=('ViT-B-32', 'tiny')", error)) from error
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(source)
        self.identity = clip_weights_identity(name, pretrained)  # after loading: hub weights are cached now

    @classmethod
    def local_weights(cls, name: str = "ViT-B-32", pretrained: str = "openai") -> str | None:
        return local_weights_identity("clip", name, pretrained)

    def features(self, kind: str, inputs: Sequence, batch_size: int = 64) -> torch.Tensor:
        if kind == "clip_image":
            return self.embed_images(inputs, batch_size)
        if kind == "clip_text":
            return self.embed_texts(inputs)  # texts are cheap: batched by embed_texts' own size
        raise ValueError(f"clip: no feature {kind!r} (produces {', '.join(self.produces)})")

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """[N, D] unit-norm image embeddings, in input order."""
        return _embed_in_batches(self.model.encode_image, self.preprocess, list(images), batch_size, self.device)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[N, D] unit-norm text embeddings, in input order (texts past 77 tokens are truncated)."""
        texts = list(texts)
        if not texts:
            raise ValueError("embed_texts: got no texts")
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
                rows.append(self.model.encode_text(tokens).float())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


def dino_preprocess():
    """The DreamBooth DINO transform: PIL RGB image -> [3, 224, 224] ImageNet-normalised tensor."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(DINO_RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(DINO_CROP),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@register_backbone("dino")
class DinoBackbone:
    """Self-supervised ViT (DINO): the CLS token of the last layer; rows are L2-normalised."""

    produces = {"dino_image": "image"}

    def __init__(self, model_id: str = "facebook/dino-vits16", device: str | torch.device = "cpu"):
        from transformers import ViTModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise in the CLI output

        self.device = torch.device(device)
        if model_id == TINY:
            source = tiny_dino_dir()
            self.description = f"transformers tiny random-weight ViT (tiny-dino-{TINY_VERSION})"
        else:
            source, self.description = model_id, f"transformers {model_id}"
        try:
            # The CLS token is read from last_hidden_state (after the final layernorm, as DINO and the
            # DreamBooth evaluation read it), so no pooler is built and a checkpoint's pooler is ignored.
            model, info = ViTModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True)
        except OSError as error:
            raise RuntimeError(_unloadable(f"DINO {model_id}", "dino='tiny'", error)) from error
        if info["missing_keys"] or info["mismatched_keys"]:
            # transformers would fill these with random values and only log it: every score would be wrong.
            wrong = sorted(info["missing_keys"]) + sorted(str(key[0] if isinstance(key, tuple) else key)
                                                          for key in info["mismatched_keys"])
            raise RuntimeError(f"DINO {model_id}: the checkpoint lacks or misshapes {len(wrong)} weights of the "
                               f"ViT ({', '.join(wrong[:4])}{', ...' if len(wrong) > 4 else ''}); refusing to "
                               "score with randomly initialised layers. Is it a ViT checkpoint of this "
                               "transformers version's layout?")
        self.model = model.to(self.device).eval()
        self.preprocess = dino_preprocess()
        self.identity = dino_weights_identity(model_id)  # after loading: hub weights are cached now

    @classmethod
    def local_weights(cls, model_id: str = "facebook/dino-vits16") -> str | None:
        return local_weights_identity("dino", model_id)

    def features(self, kind: str, inputs: Sequence, batch_size: int = 64) -> torch.Tensor:
        if kind != "dino_image":
            raise ValueError(f"dino: no feature {kind!r} (produces dino_image)")
        return self.embed_images(inputs, batch_size)

    def _cls_token(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """[N, D] unit-norm CLS embeddings, in input order."""
        return _embed_in_batches(self._cls_token, self.preprocess, list(images), batch_size, self.device)


def resolve_device(device: str | torch.device | None) -> str:
    """`device`, else $WORKBENCH_DEVICE, else cuda when present, else cpu; 'cuda' becomes 'cuda:0'."""
    device = torch.device(pick_device(str(device) if device is not None else None))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@lru_cache(maxsize=4)
def _load_backbone(name: str, options: tuple, device: str, local_weights: str | None):
    return BACKBONES[name](**dict(options), device=device)


def load_backbone(name: str, options: Mapping[str, Any] | None = None, device: str | torch.device | None = None):
    """The backbone registered as `name`, configured by `options` (its keyword arguments, hashable values).

    Loaded once per (name, options, device); local weights are loaded again once their content changes
    (new weights at the same path). Call `load_backbone.cache_clear()` to drop the loaded models and
    free their memory.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    options = dict(options or {})
    local_weights = getattr(BACKBONES[name], "local_weights", None)
    return _load_backbone(name, tuple(sorted(options.items())), resolve_device(device),
                          local_weights(**options) if local_weights else None)


load_backbone.cache_clear = _load_backbone.cache_clear
load_backbone.cache_info = _load_backbone.cache_info
