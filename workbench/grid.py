"""The labelled grid image: columns method@weight, rows seeds grouped by prompt, references at the left."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
BAND = (236, 240, 246)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _text_width(draw, text, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fit(draw, text, font, width) -> str:
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def make_grid(
    columns: list[str],
    groups: list[tuple[str, list[str], list[list[Image.Image | None]]]],
    references: list[Image.Image] = (),
    title: str = "",
    cell_size: int | None = None,
) -> Image.Image:
    """Draw a grid.

    `groups` is a list of (prompt, row_labels, images) where images[row][column] may be None
    (a cell not generated yet, drawn as an empty box). Cells are `cell_size` wide (default: the
    first image's width, at most 384 and at least 96) and keep the images' aspect ratio.
    """
    first = next((im for _, _, rows in groups for row in rows for im in row if im is not None), None)
    size = cell_size or max(96, min(384, first.width if first else 256))
    height_of_cell = round(size * first.height / first.width) if first else size  # keep the aspect ratio
    gap = max(2, size // 64)
    font_size = max(12, size // 14)
    font, small, bold = _font(font_size), _font(max(10, int(font_size * 0.85))), _font(int(font_size * 1.15))
    row_label_width = int(font_size * 5.5)
    reference_width = size // 2 + 2 * gap if references else 0
    left = reference_width + row_label_width
    header = int(font_size * 3.4) + (int(font_size * 1.8) if title else 0)
    band = int(font_size * 2.0)
    chars = max(20, int((len(columns) * (size + gap)) / (font_size * 0.55)))
    wrapped = [textwrap.wrap(prompt, chars)[:2] or [""] for prompt, _, _ in groups]
    band_heights = [band + (len(lines) - 1) * int(font_size * 1.3) for lines in wrapped]
    body = sum(h + len(rows) * (height_of_cell + gap) for h, (_, rows, _) in zip(band_heights, groups))
    width = left + len(columns) * (size + gap) + gap
    height = header + body + gap
    if references:
        height = max(height, header + len(references) * (size // 2 + gap) + font_size * 2)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    y = gap
    if title:
        draw.text((gap * 2, y), _fit(draw, title, bold, width - 4 * gap), fill=INK, font=bold)
        y += int(font_size * 1.8)
    for index, label in enumerate(columns):
        x = left + index * (size + gap)
        name, _, weight = label.partition("@")
        for line_index, (line, line_font) in enumerate(((name, font), (f"@ {weight}" if weight else "", small))):
            text = _fit(draw, line, line_font, size)
            offset = (size - _text_width(draw, text, line_font)) // 2
            draw.text((x + offset, y + font_size * (0.3 + 1.25 * line_index)), text, fill=INK, font=line_font)
    if references:
        draw.text((gap, header - int(font_size * 1.4)), _fit(draw, "reference", small, reference_width), fill=MUTED, font=small)
        for index, ref in enumerate(references):
            thumb = ref.copy()
            thumb.thumbnail((size // 2, size // 2))
            canvas.paste(thumb, (gap, header + index * (size // 2 + gap)))

    y = header
    for (prompt, row_labels, rows), lines, band_height in zip(groups, wrapped, band_heights):
        draw.rectangle([row_label_width + reference_width - gap, y, width, y + band_height - gap], fill=BAND)
        for line_index, line in enumerate(lines):
            draw.text((left, y + gap + line_index * int(font_size * 1.3)), line, fill=INK, font=font)
        y += band_height
        for row_label, row in zip(row_labels, rows):
            draw.text((reference_width + gap, y + height_of_cell // 2 - font_size // 2), _fit(draw, row_label, font, row_label_width - 2 * gap), fill=INK, font=font)
            for index, image in enumerate(row):
                x = left + index * (size + gap)
                if image is None:
                    draw.rectangle([x, y, x + size - 1, y + height_of_cell - 1], outline=MUTED)
                    continue
                cell = (size, height_of_cell)
                thumb = image if image.size == cell else image.resize(cell, Image.LANCZOS)
                canvas.paste(thumb, (x, y))
            y += height_of_cell + gap
    return canvas
