"""A plugin metric: `brightness`, the mean luminance of each generated image, in [0, 1], higher is brighter.

    python -m workbench run presets/tiny.yaml --plugin examples.plugins.brightness \
        --metrics clip_i,clip_t,dino,brightness --out runs/bright

adds a `brightness` column to cells.csv and `brightness_mean` (std, n, delta, ...) to summary.csv.
It reads pixels, not a learned embedding, so its backbone is a registered one without weights: one
feature per RGB image, its mean Rec. 601 luma (0.299 R + 0.587 G + 0.114 B on [0, 1]), not normalised.
"""

import numpy as np
import torch

from workbench.metrics import register_backbone, register_metric

LUMA = np.array([0.299, 0.587, 0.114])


@register_backbone("luminance")
class Luminance:
    produces = {"luminance": "image"}  # feature kind -> what it reads
    description = "mean Rec. 601 luma of the RGB pixels"  # shown as the metric's provenance
    identity = "rec601-luma-v1"  # no weights: a version of the formula keys the embedding cache

    def __init__(self, device="cpu"):  # a backbone's options are its keyword arguments; this one has none
        self.device = device

    def features(self, kind, images, batch_size=64):  # RGB PIL images -> [N, 1]
        means = [(np.asarray(image, dtype=np.float64) / 255 @ LUMA).mean() for image in images]
        return torch.tensor(means, dtype=torch.float32, device=self.device)[:, None]


@register_metric("brightness")
class Brightness:
    label, axis, direction, scale = "brightness", "appearance", "higher is brighter", "mean luminance in [0, 1]"
    level, backbone, needs = "image", "luminance", ("luminance",)

    def score(self, generated, references):
        return generated["luminance"][:, 0]
