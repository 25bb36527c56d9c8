"""Scoring images: run each image through each needed backbone once, then derive every metric."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from ..images import _to_8bit_rgb
from . import Embeddings, get_metric
from .backbones import BACKBONES, load_backbone


def _rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    # The same conversion references get when decoded (alpha composited on white, 16-bit scaled).
    return [image if image.mode == "RGB" else _to_8bit_rgb(image) for image in images]


class Scorer:
    """Scores generated images against reference images and prompts with the chosen metrics.

    clip: (open_clip model name, pretrained tag or file); ("ViT-B-32", "tiny") is the tiny test model.
    dino: transformers model id or folder; "tiny" is the tiny test model.
    backbone_options: {backbone name: its keyword arguments}, for any registered backbone (a plugin's
    among them); for "clip" and "dino" it overrides `clip` and `dino`.
    device: None picks $WORKBENCH_DEVICE, else cuda when present, else cpu.
    Only the backbones the chosen metrics need are loaded, once, through `load_backbone`.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("clip_i", "clip_t", "dino", "diversity"),
        clip: tuple[str, str] = ("ViT-B-32", "openai"),
        dino: str = "facebook/dino-vits16",
        device: str | torch.device | None = None,
        batch_size: int = 64,
        backbone_options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        classes = [get_metric(name) for name in metrics]  # unknown names fail before any loading
        _check_backbones(classes)
        options = {"clip": {"name": clip[0], "pretrained": clip[1]}, "dino": {"model_id": dino},
                   **(backbone_options or {})}
        needed = {cls.backbone for cls in classes}
        self.batch_size = batch_size
        # In registry order, so the same metrics load (and embed) in the same order whatever order they are named in.
        self.backbones = {name: load_backbone(name, options.get(name), device) for name in BACKBONES if name in needed}
        self.metrics = [cls() for cls in classes]
        self.image_metrics = [metric for metric in self.metrics if metric.level == "image"]
        self.group_metrics = [metric for metric in self.metrics if metric.level == "group"]
        self._needs = {kind for metric in self.metrics for kind in metric.needs}

    def provenance(self) -> dict[str, dict[str, str]]:
        """metric name -> {axis, direction, backbone, scale}: how to read each number."""
        return {
            metric.name: {"axis": metric.axis, "direction": metric.direction,
                          "backbone": self.backbones[metric.backbone].description, "scale": metric.scale}
            for metric in self.metrics
        }

    def identity(self) -> dict[str, str]:
        """backbone name -> which weights it holds (a hash, hub id@commit, or tiny version)."""
        return {name: backbone.identity for name, backbone in self.backbones.items()}

    def _kinds(self, reads: str) -> list[tuple[str, Any]]:
        return [(kind, backbone) for backbone in self.backbones.values()
                for kind, source in backbone.produces.items() if source == reads]

    def embed_references(self, references: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """{image feature kind ('clip_image', 'dino_image', ...): [R, D] rows} of the references ({} for none).

        Every image feature of every loaded backbone. Embed the references once per study and pass
        the result to every `score_images` / `score_embedded` call.
        """
        if not references:
            return {}
        references = _rgb_images(references)
        return {kind: backbone.features(kind, references, self.batch_size) for kind, backbone in self._kinds("image")}

    def embed_images(self, images: Sequence[Image.Image], prompts: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """{feature kind: [N, D]} of generated images (and their prompts) that the metrics read.

        Each image goes through each backbone once; `prompts[i]` is image i's prompt, needed only by
        prompt features (clip_text: the prompt with its identifier token removed).
        """
        images = _rgb_images(images)
        embeddings = {kind: backbone.features(kind, images, self.batch_size)
                      for kind, backbone in self._kinds("image") if kind in self._needs}
        for kind, backbone in self._kinds("prompt"):
            if kind not in self._needs:
                continue
            if prompts is None or len(prompts) != len(images):
                readers = ", ".join(metric.name for metric in self.metrics if kind in metric.needs)
                raise ValueError(f"{readers} needs one prompt per image: got {len(images)} images and "
                                 f"{'no' if prompts is None else len(prompts)} prompts")
            embeddings[kind] = backbone.features(kind, list(prompts), self.batch_size)
        return embeddings

    def score_embedded(self, generated: Embeddings, references: Embeddings) -> dict[str, torch.Tensor]:
        """{metric name: [N] values on CPU} for every per-image metric."""
        return {metric.name: metric.score(generated, references).cpu() for metric in self.image_metrics}

    def score_images(
        self, images: Sequence[Image.Image], prompts: Sequence[str] | None, references_embedding: Embeddings
    ) -> dict[str, torch.Tensor]:
        """{metric name: [N] values on CPU} for every per-image metric (group metrics are left out).

        `prompts[i]` is the text CLIP-T compares image i with (identifier token already removed).
        """
        if not images:
            return {metric.name: torch.empty(0) for metric in self.image_metrics}
        return self.score_embedded(self.embed_images(images, prompts), references_embedding)


def _check_backbones(classes) -> None:
    """Each metric's backbone is registered and produces every feature the metric reads."""
    for cls in classes:
        backbone = BACKBONES.get(cls.backbone)
        if backbone is None:
            raise ValueError(f"metric {cls.name!r} needs backbone {cls.backbone!r}, which is not registered "
                             f"(known: {', '.join(BACKBONES)}); load the plugin that registers it")
        missing = [kind for kind in cls.needs if kind not in backbone.produces]
        if missing:
            raise ValueError(f"metric {cls.name!r} reads {', '.join(missing)}, which backbone {cls.backbone!r} "
                             f"does not produce (it produces {', '.join(backbone.produces)})")
