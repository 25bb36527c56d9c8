"""The labelled grid: layout follows columns, rows and the images' aspect ratio."""

from PIL import Image

from workbench.grid import make_grid


def solid(color, size=(64, 64)):
    return Image.new("RGB", size, color)


def test_grid_places_each_image_in_its_column_and_row():
    red, blue, green = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    grid = make_grid(["baseline", "ip_adapter@0.5"],
                     [("a cat", ["seed 0", "seed 1"], [[solid(red), solid(blue)], [solid(green), None]])],
                     cell_size=100)
    pixels = [grid.getpixel((x, y)) for x in range(grid.width) for y in range(grid.height)]
    assert pixels.count(red) == pixels.count(blue) == pixels.count(green) == 100 * 100


def test_grid_keeps_the_aspect_ratio_of_wide_images():
    wide = solid((255, 0, 0), (128, 64))
    grid = make_grid(["a"], [("p", ["seed 0"], [[wide]])], cell_size=100)
    red = [(x, y) for x in range(grid.width) for y in range(grid.height) if grid.getpixel((x, y)) == (255, 0, 0)]
    xs, ys = {x for x, _ in red}, {y for _, y in red}
    assert (max(xs) - min(xs) + 1, max(ys) - min(ys) + 1) == (100, 50)


def test_grid_grows_with_prompts_and_seeds():
    one = make_grid(["a"], [("p", ["s0"], [[solid((1, 2, 3))]])], cell_size=96)
    two = make_grid(["a"], [("p", ["s0", "s1"], [[solid((1, 2, 3))], [solid((1, 2, 3))]]),
                            ("q", ["s0"], [[solid((1, 2, 3))]])], cell_size=96)
    assert two.width == one.width and two.height > one.height + 2 * 96


def test_a_click_on_the_grid_finds_the_column_drawn_there():
    from conftest import tiny_study

    from workbench.report import grid_column_at
    from workbench.spec import parse_study

    study = parse_study(tiny_study(size=[64, 96], methods=[
        {"kind": "baseline"}, {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.3, 0.7]}]))
    colors = [(255, 0, 0), (0, 0, 255), (0, 160, 0)]
    labels = ["baseline", "ip_adapter@0.3", "ip_adapter@0.7"]
    rows = [[solid(color, (96, 64)) for color in colors] for _ in study.seeds]
    grid = make_grid(labels, [("a cat", [f"seed {s}" for s in study.seeds], rows)], [solid((9, 9, 9))], "title")
    y = next(y for y in range(grid.height) if grid.getpixel((grid.width - 5, y)) == colors[-1])
    hits = [grid_column_at(study, x) for x in range(grid.width)]
    for x, label in enumerate(hits):  # a column under every pixel of its cells, None elsewhere
        pixel = grid.getpixel((x, y))
        assert (label is not None) == (pixel in colors), (x, label, pixel)
        if label is not None:
            assert pixel == colors[labels.index(label)], (x, label, pixel)
    assert list(dict.fromkeys(h for h in hits if h)) == labels
