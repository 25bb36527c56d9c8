"""Metrics: small classes behind a registry. Every score is derived from precomputed embeddings.

The scorer embeds each image once per backbone into a dict of [N, D] unit-norm tensors keyed by
embedding kind, then hands those dicts to the metrics:

- ``clip_image``: CLIP image embeddings        (generated images and references)
- ``clip_text``:  CLIP text embedding of each generated image's prompt
- ``dino_image``: DINO CLS embeddings           (generated images and references)

An image metric gives one number per generated image; a group metric gives one number for a group
of images (the seeds of one prompt x method x weight).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Mapping, Protocol

import torch

Embeddings = Mapping[str, torch.Tensor]  # embedding kind -> [N, D] unit-norm rows

METRICS: dict[str, type] = {}


class Metric(Protocol):
    name: ClassVar[str]
    axis: ClassVar[Literal["image_fidelity", "prompt_fidelity", "diversity"]]
    direction: ClassVar[str]  # "higher is better"
    scale: ClassVar[str]  # "cosine in [-1, 1]"
    level: ClassVar[Literal["image", "group"]]
    backbone_kind: ClassVar[Literal["clip", "dino"]]
    needs: ClassVar[tuple[str, ...]]  # embedding kinds of the generated images it reads
    backbone: str  # the backbone that made the embeddings, e.g. "open_clip ViT-B-32 openai"


class ImageMetric(Metric, Protocol):
    def score(self, generated: Embeddings, references: Embeddings) -> torch.Tensor:
        """[N] one value per generated image."""


class GroupMetric(Metric, Protocol):
    def score_group(self, generated: Embeddings) -> float:
        """One value for the group of generated images (NaN where it is undefined)."""


def register_metric(name: str):
    def decorate(cls):
        cls.name = name
        METRICS[name] = cls
        return cls

    return decorate


def get_metric(name: str) -> type:
    """The metric class registered as `name`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(available_metrics())})")
    return METRICS[name]


def available_metrics() -> list[str]:
    return sorted(METRICS)


def mean_cosine_to_references(generated: Embeddings, references: Embeddings, kind: str) -> torch.Tensor:
    """[N] mean over references j of cos(generated_i, reference_j) for embedding `kind`; in [-1, 1]."""
    if kind not in references or references[kind].shape[0] == 0:
        raise ValueError(f"scoring {kind} against references needs at least one reference image")
    return (generated[kind] @ references[kind].T).mean(dim=1)


from . import clip, dino, diversity  # noqa: E402,F401  (register)
from .backbones import ClipBackbone, DinoBackbone, load_backbone  # noqa: E402
from .scorer import Scorer  # noqa: E402

__all__ = [
    "METRICS", "Embeddings", "Metric", "ImageMetric", "GroupMetric", "register_metric", "get_metric",
    "available_metrics", "ClipBackbone", "DinoBackbone", "load_backbone", "Scorer",
]
