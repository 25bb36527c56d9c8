"""The labelled grid image: columns method@weight, rows seeds grouped by prompt, references at the left."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GridLayout:
    """Where things sit on a grid image: cells `size` wide, columns starting at x = `left`."""

    columns: int
    size: int
    cell_height: int
    gap: int
    font_size: int
    reference_width: int
    row_label_width: int

    @property
    def left(self) -> int:
        return self.reference_width + self.row_label_width

    def column_at(self, x: float) -> int | None:
        """The index of the column whose cells cover pixel column `x`; None on margins and gaps."""
        index, within = divmod(x - self.left, self.size + self.gap)
        return int(index) if 0 <= index < self.columns and within < self.size else None


def grid_layout(columns: int, image_size: tuple[int, int] | None, references: bool,
                cell_size: int | None = None) -> GridLayout:
    """The layout `make_grid` draws for `columns` columns of images of `image_size` (width, height).

    Cells are `cell_size` wide (default: the image width, at most 384 and at least 96) and keep the
    images' aspect ratio.
    """
    size = cell_size or max(96, min(384, image_size[0] if image_size else 256))
    cell_height = round(size * image_size[1] / image_size[0]) if image_size else size
    font_size = max(12, size // 14)
    gap = max(2, size // 64)
    return GridLayout(columns, size, cell_height, gap, font_size,
                      reference_width=size // 2 + 2 * gap if references else 0,
                      row_label_width=int(font_size * 5.5))


def make_grid(
    columns: list[str],
    groups: list[tuple[str, list[str], list[list[Image.Image | None]]]],
    references: list[Image.Image] = (),
    title: str = "",
    cell_size: int | None = None,
) -> Image.Image:
    """Draw a grid (laid out by `grid_layout`, from the first image's size).

    `groups` is a list of (prompt, row_labels, images) where images[row][column] may be None
    (a cell not generated yet, drawn as an empty box).
    """
    first = next((im for _, _, rows in groups for row in rows for im in row if im is not None), None)
    layout = grid_layout(len(columns), first.size if first else None, bool(references), cell_size)
    size, height_of_cell, gap, font_size = layout.size, layout.cell_height, layout.gap, layout.font_size
    font, small, bold = _font(font_size), _font(max(10, int(font_size * 0.85))), _font(int(font_size * 1.15))
    row_label_width, reference_width, left = layout.row_label_width, layout.reference_width, layout.left
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
