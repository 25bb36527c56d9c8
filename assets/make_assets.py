"""Regenerate the demo reference images in ``assets/`` from scikit-image.

Every image comes from the sample data bundled with scikit-image
(``skimage.data``); see ``assets/README.md`` for each image's licence.

Usage (from the repository root)::

    python assets/make_assets.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
LONG_SIDE = 384  # downscale target for the long side (keeps files small)
CROP_SIZE = 256  # output size of the square face crop

# Square box (left, top, right, bottom) around Chelsea's face, in pixel
# coordinates of the original 451x300 ``skimage.data.chelsea()`` image.
CHELSEA_FACE_BOX = (110, 30, 370, 290)


def _to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")


def _fit_long_side(img: Image.Image, long_side: int = LONG_SIDE) -> Image.Image:
    w, h = img.size
    scale = long_side / max(w, h)
    if scale >= 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.LANCZOS)


def _save(img: Image.Image, name: str) -> Path:
    path = HERE / name
    img.save(path, format="PNG", optimize=True)
    print(f"{path.relative_to(HERE.parent)}: {img.size[0]}x{img.size[1]}, "
          f"{path.stat().st_size / 1024:.0f} KiB")
    return path


def main() -> None:
    originals = {
        "chelsea": _to_rgb(skimage.data.chelsea()),
        "astronaut": _to_rgb(skimage.data.astronaut()),
        "coffee": _to_rgb(skimage.data.coffee()),
        "rocket": _to_rgb(skimage.data.rocket()),
    }
    for name, img in originals.items():
        _save(_fit_long_side(img), f"{name}.png")

    # Extra views of the cat for multi-reference demos.
    face = originals["chelsea"].crop(CHELSEA_FACE_BOX)
    _save(face.resize((CROP_SIZE, CROP_SIZE), Image.LANCZOS), "chelsea_crop.png")
    _save(ImageOps.mirror(_fit_long_side(originals["chelsea"])), "chelsea_flip.png")


if __name__ == "__main__":
    main()
