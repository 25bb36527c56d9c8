"""Scoring a grid: embed every image once per backbone, then derive every metric from the embeddings."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from PIL import Image

from ..images import _to_8bit_rgb
from . import Embeddings, get_metric
from .backbones import load_backbone

RECORD_KEYS = ("prompt", "method", "weight", "seed", "clip_prompt")
GROUP_KEYS = ["prompt", "method", "weight"]  # a diversity group: the seeds of one cell of the grid
SCORE_COLUMNS = ["prompt", "method", "weight", "seed", "metric", "value"]


def _rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    # The same conversion references get when decoded (alpha composited on white, 16-bit scaled).
    return [image if image.mode == "RGB" else _to_8bit_rgb(image) for image in images]


def _select_rows(embeddings: Embeddings, positions: list[int]) -> dict[str, torch.Tensor]:
    return {kind: rows[positions] for kind, rows in embeddings.items()}


class Scorer:
    """Scores generated images against reference images and prompts with the chosen metrics.

    clip: (open_clip model name, pretrained tag or file); ("ViT-B-32", "tiny") is the tiny test model.
    dino: transformers model id or folder; "tiny" is the tiny test model.
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
    ):
        classes = [get_metric(name) for name in metrics]  # unknown names fail before any loading
        self.batch_size = batch_size
        self.backbones = {}
        if any(cls.backbone_kind == "clip" for cls in classes):
            self.backbones["clip"] = load_backbone("clip", clip[0], clip[1], device)
        if any(cls.backbone_kind == "dino" for cls in classes):
            self.backbones["dino"] = load_backbone("dino", dino, None, device)
        self.metrics = [cls(backbone=self.backbones[cls.backbone_kind].description) for cls in classes]
        self.image_metrics = [metric for metric in self.metrics if metric.level == "image"]
        self.group_metrics = [metric for metric in self.metrics if metric.level == "group"]
        self._needs = {kind for metric in self.metrics for kind in metric.needs}

    def provenance(self) -> dict[str, dict[str, str]]:
        """metric name -> {axis, direction, backbone, scale}: how to read each number."""
        return {
            metric.name: {"axis": metric.axis, "direction": metric.direction,
                          "backbone": metric.backbone, "scale": metric.scale}
            for metric in self.metrics
        }

    def identity(self) -> dict[str, str]:
        """backbone kind -> which weights it holds (a hash, hub id@commit, or tiny version)."""
        return {kind: backbone.identity for kind, backbone in self.backbones.items()}

    def embed_references(self, references: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """{'clip_image'|'dino_image': [R, D] unit-norm rows} of the reference images ({} for none).

        Embed the references once per study and pass the result to every `score_images` call.
        """
        if not references:
            return {}
        references = _rgb_images(references)
        return {
            f"{kind}_image": backbone.embed_images(references, self.batch_size)
            for kind, backbone in self.backbones.items()
        }

    def embed_images(self, images: Sequence[Image.Image], prompts: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """{embedding kind: [N, D]} of generated images (and their prompts), each image embedded once."""
        images = _rgb_images(images)
        embeddings = {
            f"{kind}_image": backbone.embed_images(images, self.batch_size)
            for kind, backbone in self.backbones.items()
            if f"{kind}_image" in self._needs
        }
        if "clip_text" in self._needs:
            if prompts is None or len(prompts) != len(images):
                raise ValueError(f"clip_t needs one prompt per image: got {len(images)} images and "
                                 f"{'no' if prompts is None else len(prompts)} prompts")
            embeddings["clip_text"] = self.backbones["clip"].embed_texts(list(prompts))
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

    def score_frame(
        self, records: Sequence[dict], images: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> pd.DataFrame:
        """Long table `prompt, method, weight, seed, metric, value`.

        One row per image per per-image metric, in input order; then one row per (prompt, method,
        weight) group per group metric, with `seed` missing (<NA>). `records[i]` describes
        `images[i]`: keys prompt, method, weight, seed, clip_prompt (the text for CLIP-T).
        """
        if len(records) != len(images):
            raise ValueError(f"score_frame: {len(records)} records for {len(images)} images")
        for index, record in enumerate(records):
            missing = [key for key in RECORD_KEYS if key not in record]
            if missing:
                raise ValueError(f"score_frame: records[{index}] lacks {', '.join(missing)} (needs {RECORD_KEYS})")
        cells = pd.DataFrame([{key: record[key] for key in RECORD_KEYS} for record in records],
                             columns=list(RECORD_KEYS))
        frames = []
        if len(cells):
            generated = self.embed_images(images, cells["clip_prompt"].tolist())
            per_image = self.score_embedded(generated, self.embed_references(references))
            for name, values in per_image.items():
                frames.append(cells[["prompt", "method", "weight", "seed"]].assign(metric=name, value=values.numpy()))
            group_rows = [
                dict(zip(GROUP_KEYS, key), seed=None, metric=metric.name,
                     value=metric.score_group(_select_rows(generated, group.index.to_list())))
                for metric in self.group_metrics
                for key, group in cells.groupby(GROUP_KEYS, sort=False, dropna=False)
            ]
            if group_rows:
                frames.append(pd.DataFrame(group_rows))
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCORE_COLUMNS)
        return frame[SCORE_COLUMNS].astype({"weight": "float64", "seed": "Int64", "value": "float64"})
