"""Plugins: the brightness example, and how a plugin is named (CLI, environment, entry point)."""

import subprocess
import sys
from importlib.metadata import EntryPoint

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, tiny_study
from PIL import Image
from registries import restored_registries

from workbench.metrics import METRICS, Scorer

BRIGHTNESS = "examples.plugins.brightness"


def luminance_by_hand(image: Image.Image) -> float:
    """Mean Rec. 601 luma of an RGB image, channels on [0, 1]."""
    red, green, blue = (np.asarray(image.convert("RGB"), dtype=np.float64) / 255).transpose(2, 0, 1)
    return float((0.299 * red + 0.587 * green + 0.114 * blue).mean())


@pytest.fixture
def brightness():
    from workbench.plugins import load_plugins

    with restored_registries(BRIGHTNESS):
        load_plugins([BRIGHTNESS], environment=False, installed=False)
        yield Scorer(metrics=("brightness",), device="cpu")


def test_brightness_is_the_mean_luminance_of_the_image(brightness):
    grey = Image.new("RGB", (16, 16), (128, 128, 128))
    red_and_white = Image.fromarray(np.concatenate([np.full((8, 16, 3), (255, 0, 0)), np.full((8, 16, 3), 255)])
                                    .astype(np.uint8))

    values = brightness.score_images([grey, red_and_white, grey.convert("L")], None, {})["brightness"]

    torch.testing.assert_close(values, torch.tensor([128 / 255, (0.299 + 1) / 2, 128 / 255]))
    assert values[1] == pytest.approx(luminance_by_hand(red_and_white), abs=1e-6)


def test_brightness_loads_only_its_own_backbone_and_says_how_to_read_it(brightness):
    assert list(brightness.backbones) == ["luminance"]
    assert brightness.provenance() == {"brightness": {
        "axis": "appearance", "direction": "higher is brighter", "backbone": "mean Rec. 601 luma of the RGB pixels",
        "scale": "mean luminance in [0, 1]"}}


def test_the_example_is_short():
    assert len((REPO / "examples/plugins/brightness.py").read_text().splitlines()) < 40


def test_the_cli_with_the_brightness_plugin_adds_its_columns(tmp_path):
    # presets/tiny.yaml cut to two methods and one prompt, so the test runs in seconds
    preset = yaml.safe_load((REPO / "presets/tiny.yaml").read_text())
    preset.update(prompts=preset["prompts"][:1], steps=1, size=32, methods=preset["methods"][:2])
    preset["subject"]["reference_images"] = [str(REPO / path) for path in preset["subject"]["reference_images"]]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset))
    out = tmp_path / "run"

    done = subprocess.run([sys.executable, "-m", "workbench", "run", str(tmp_path / "tiny.yaml"), "--plugin", BRIGHTNESS,
                           "--metrics", "clip_i,clip_t,dino,brightness", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)

    assert done.returncode == 0, done.stderr
    cells = pd.read_csv(out / "cells.csv")
    by_hand = [luminance_by_hand(Image.open(out / image)) for image in cells["image"]]
    np.testing.assert_allclose(cells["brightness"], by_hand, atol=1e-6)
    summary = pd.read_csv(out / "summary.csv")
    expected = cells.groupby(["method", "weight"], sort=False)["brightness"].mean().to_numpy()
    np.testing.assert_allclose(summary["brightness_mean"], expected, rtol=1e-6)
    assert "brightness: mean Rec. 601 luma" in done.stdout
    page = (out / "frontier.html").read_text()
    assert "x = brightness" in page and "x = DINO" in page  # the plot's x menu offers the plugin's metric


def test_workbench_plugins_names_modules_for_the_cli_and_the_app(monkeypatch, capsys):
    from workbench.__main__ import main

    monkeypatch.setenv("WORKBENCH_PLUGINS", f" {BRIGHTNESS}, ,tests.plugin_fixture")
    with restored_registries(BRIGHTNESS, "tests.plugin_fixture"):
        assert main(["metrics"]) == 0
        assert {"brightness", "seed_spread"} <= set(METRICS)
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"brightness", "seed_spread", "clip_i"} <= set(listed)


def test_an_installed_entry_point_is_loaded(monkeypatch):
    from workbench import plugins

    entry_point = EntryPoint(name="brightness", value=BRIGHTNESS, group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [entry_point] if group == "workbench.plugins" else [])
    with restored_registries(BRIGHTNESS):
        assert plugins.load_plugins(environment=False) == [BRIGHTNESS]
        assert "brightness" in METRICS


def test_a_plugin_that_does_not_import_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from workbench.__main__ import main

    assert main(["metrics", "--plugin", "examples.plugins.no_such_plugin"]) == 2
    assert capsys.readouterr().err == (
        "error: --plugin: plugin 'examples.plugins.no_such_plugin' does not import: no such module "
        "(is it on the Python path? run from the folder that holds it)\n")

    (tmp_path / "clashing_plugin.py").write_text(
        "from workbench.metrics import register_metric, METRICS\n"
        "register_metric('dino')(type('Mine', (METRICS['diversity'],), {}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WORKBENCH_PLUGINS", "clashing_plugin")
    with restored_registries("clashing_plugin"):
        assert main(["metrics"]) == 2
    assert capsys.readouterr().err == (
        "error: WORKBENCH_PLUGINS: plugin 'clashing_plugin' does not import: ValueError: metric 'dino' is already "
        "registered by workbench.metrics.dino.Dino\n")
