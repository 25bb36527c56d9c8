"""CLIP-I and CLIP-T: image and prompt fidelity in CLIP space (the DreamBooth definitions)."""

from __future__ import annotations

import torch

from . import Embeddings, mean_cosine_to_references, register_metric


@register_metric("clip_i")
class ClipI:
    """Per generated image: mean cosine between its CLIP image embedding and each reference's.

    Cosine in [-1, 1], higher is better: 1 means the same CLIP embedding as every reference.
    """

    label = "CLIP-I"
    axis = "image_fidelity"
    direction = "higher is better"
    scale = "cosine in [-1, 1]"
    level = "image"
    backbone = "clip"
    needs = ("clip_image",)

    def score(self, generated: Embeddings, references: Embeddings) -> torch.Tensor:
        return mean_cosine_to_references(generated, references, "clip_image")


@register_metric("clip_t")
class ClipT:
    """Per generated image: cosine between its CLIP image embedding and its prompt's text embedding.

    The prompt is the one the image was made from with the identifier token removed. Cosine in
    [-1, 1], higher is better; real CLIP models give about 0.2-0.35 for matching pairs.
    """

    label = "CLIP-T"
    axis = "prompt_fidelity"
    direction = "higher is better"
    scale = "cosine in [-1, 1]"
    level = "image"
    backbone = "clip"
    needs = ("clip_image", "clip_text")

    def score(self, generated: Embeddings, references: Embeddings) -> torch.Tensor:
        return (generated["clip_image"] * generated["clip_text"]).sum(dim=-1)
