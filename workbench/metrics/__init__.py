"""Metrics: small classes behind a registry. Every score is derived from precomputed features.

A metric names the backbone it needs (`backbone = "dino"`, a name in the backbone registry) and the
feature kinds of that backbone it reads (`needs`). The scorer loads only the backbones its metrics
need, runs each image through each of them once into a dict of [N, D] tensors keyed by feature
kind, and hands those dicts to the metrics:

- ``clip_image``: CLIP image embeddings, unit-norm  (generated images and references)
- ``clip_text``:  CLIP text embedding of each generated image's prompt, unit-norm
- ``dino_image``: DINO CLS embeddings, unit-norm    (generated images and references)

A plugin's backbone may produce any per-image feature (examples/plugins/brightness.py: one
luminance value per image, not normalised).

An image metric gives one number per generated image; a group metric gives one number for a group
of images (the seeds of one prompt x method x weight).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Mapping, Protocol

import torch

from ..registry import register

Embeddings = Mapping[str, torch.Tensor]  # feature kind -> [N, D] rows

METRICS: dict[str, type] = {}


class Metric(Protocol):
    name: ClassVar[str]  # set by register_metric
    label: ClassVar[str]  # for people: "CLIP-I"
    axis: ClassVar[str]  # what it measures: "image_fidelity", "prompt_fidelity", "diversity", "quality", ...
    direction: ClassVar[str]  # "higher is better"
    scale: ClassVar[str]  # "cosine in [-1, 1]"
    level: ClassVar[Literal["image", "group"]]
    backbone: ClassVar[str]  # the registered backbone that makes its features: "clip"
    needs: ClassVar[tuple[str, ...]]  # feature kinds of the generated images it reads


class ImageMetric(Metric, Protocol):
    def score(self, generated: Embeddings, references: Embeddings) -> torch.Tensor:
        """[N] one value per generated image."""


class GroupMetric(Metric, Protocol):
    def score_group(self, generated: Embeddings) -> float:
        """One value for the group of generated images (NaN where it is undefined)."""


METRIC_ATTRIBUTES = ("label", "axis", "direction", "scale", "level", "backbone", "needs")


def register_metric(name: str):
    """Class decorator: make the metric class available as `--metrics <name>` and a column of the tables."""

    def decorate(cls):
        scorer = {"image": "score", "group": "score_group"}.get(getattr(cls, "level", None))
        if hasattr(cls, "level") and scorer is None:
            raise TypeError(f"metric {name!r}: level must be 'image' or 'group', got {cls.level!r}")
        required = METRIC_ATTRIBUTES + ((scorer,) if scorer else ())
        register(METRICS, "metric", name, cls, required, "workbench.metrics.Metric")
        cls.name = name
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


from .backbones import BACKBONES, Backbone, ClipBackbone, DinoBackbone, load_backbone, register_backbone  # noqa: E402
from . import clip, dino, diversity  # noqa: E402,F401  (register)
from .scorer import Scorer  # noqa: E402

__all__ = [
    "METRICS", "Embeddings", "Metric", "ImageMetric", "GroupMetric", "register_metric", "get_metric",
    "available_metrics", "BACKBONES", "Backbone", "register_backbone", "ClipBackbone", "DinoBackbone",
    "load_backbone", "Scorer",
]
