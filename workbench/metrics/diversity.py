"""Diversity: how different the seeds of one prompt x method x weight are from each other."""

from __future__ import annotations

from . import Embeddings, register_metric


@register_metric("diversity")
class Diversity:
    """Per group of images: mean over pairs of (1 - cosine) of their DINO CLS embeddings.

    In [0, 2], higher is more varied: 0 means every seed gave the same image (to DINO). NaN for a
    group of one image, which has no pairs.
    """

    label = "diversity"
    axis = "diversity"
    direction = "higher is better"
    scale = "1 - cosine in [0, 2]"
    level = "group"
    backbone = "dino"
    needs = ("dino_image",)

    def score_group(self, generated: Embeddings) -> float:
        rows = generated["dino_image"]
        count = rows.shape[0]
        if count < 2:
            return float("nan")
        cosines = rows @ rows.T
        # The diagonal (each image with itself) is not a pair: sum all, drop it, halve for i<j.
        pair_sum = (cosines.sum() - cosines.diagonal().sum()) / 2
        pairs = count * (count - 1) / 2
        return float(1 - pair_sum / pairs)
