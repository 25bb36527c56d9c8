"""Decoding user images once, the same way everywhere: references, uploads, scoring."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import StudyError

MAX_IMAGE_PIXELS = 40_000_000  # a 40 MP photo; larger inputs are refused before decoding
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | bytes, field: str = "image") -> Image.Image:
    """Decode an image file into 8-bit RGB, upright (EXIF orientation applied), alpha on white.

    Raises StudyError naming `field` for a missing file, a file that is not an image, a corrupt one,
    or one over MAX_IMAGE_PIXELS.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise StudyError(f"{field}: file not found: {path}")
        data = path.read_bytes()
        name = str(path)
    else:
        data, name = source, "upload"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise StudyError(
                    f"{field}: {name} is {width}x{height} ({width * height / 1e6:.0f} MP); "
                    f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP: downscale it first"
                )
            probe.load()
            image = ImageOps.exif_transpose(probe)
            return _to_8bit_rgb(image)
    except StudyError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise StudyError(f"{field}: {name} is not an image PIL can decode ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise StudyError(f"{field}: {name} is corrupt or truncated ({error})") from None
