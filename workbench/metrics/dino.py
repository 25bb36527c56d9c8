"""DINO: image fidelity from self-supervised ViT features (the DreamBooth definition)."""

from __future__ import annotations

import torch

from . import Embeddings, mean_cosine_to_references, register_metric


@register_metric("dino")
class Dino:
    """Per generated image: mean cosine between its DINO CLS embedding and each reference's.

    Cosine in [-1, 1], higher is better. Unlike CLIP-I it separates subjects of the same class
    (two different dogs), so it is the stricter identity measure.
    """

    label = "DINO"
    axis = "image_fidelity"
    direction = "higher is better"
    scale = "cosine in [-1, 1]"
    level = "image"
    backbone = "dino"
    needs = ("dino_image",)

    def score(self, generated: Embeddings, references: Embeddings) -> torch.Tensor:
        return mean_cosine_to_references(generated, references, "dino_image")
