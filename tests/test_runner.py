"""The study runner on tiny models: every method end to end, exact seeds, cache, stop, CLI."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, tiny_study
from PIL import Image

from workbench.cache import read_png_metadata
from workbench.runner import run_study
from workbench.tiny import TINY_VERSION
from workbench.spec import load_study, parse_study

ALL_METHODS = [
    {"kind": "baseline"},
    {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.0, 0.5, 1.0]},
    {"kind": "lora", "path": "tiny", "weights": [0.0, 1.0]},
    {"kind": "textual_inversion", "embedding": "tiny", "token": "<kitty>", "weights": [1.0]},
    {"kind": "dreambooth", "checkpoint": "tiny", "weights": [1.0]},
]


def pixels(result, **where) -> np.ndarray:
    (match,) = [r for r in result.results
                if all(getattr(r.cell, k, None) == v or getattr(r, k, None) == v for k, v in where.items())]
    return np.asarray(Image.open(match.image_path))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_base):
    study = parse_study(tiny_study(methods=ALL_METHODS))
    out = tmp_path_factory.mktemp("full")
    return run_study(study, out, loaded=tiny_base, show_progress_bar=False)


def test_every_method_kind_writes_its_images_and_outputs(full_run):
    study, out = full_run.study, full_run.run_dir
    # 16 cells, 14 generated: IP-Adapter@0 is the baseline's image (same key), made once for both.
    assert full_run.complete and len(study.cells()) == 16 and full_run.generated == 14
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 16
    assert set(cells["kind"]) == {"baseline", "ip_adapter", "lora", "textual_inversion", "dreambooth"}
    assert {"prompt", "method", "weight", "seed", "image", "seconds"} <= set(cells.columns)
    assert all((out / p).is_file() for p in cells["image"])
    assert (out / "grid.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["base"] == {"tiny": "tiny", "version": TINY_VERSION}
    assert manifest["libraries"]["diffusers"]
    assert set(manifest["runs"][-1]["methods"]) == {"baseline", "ip_adapter", "lora", "textual_inversion", "dreambooth"}
    assert all(m["seconds"] > 0 and m["peak_memory_mb"] > 0 for m in manifest["runs"][-1]["methods"].values())
    assert manifest["models"]["methods"]["lora"]["path"]["sha256"]


def test_png_metadata_holds_the_generation_parameters(full_run):
    result = next(r for r in full_run.results if r.kind == "ip_adapter" and r.cell.weight == 0.5)
    meta = read_png_metadata(result.image_path)
    assert meta["method"] == "ip_adapter" and meta["weight"] == 0.5 and meta["seed"] == result.cell.seed
    assert meta["prompt"] == "a photo of a cat" and meta["steps"] == 2 and meta["key"] == result.key
    assert "Seed: " in Image.open(result.image_path).text["parameters"]


def test_methods_change_the_image_and_weight_zero_does_not(full_run):
    baseline = pixels(full_run, method="baseline", seed=0)
    assert np.array_equal(pixels(full_run, method="ip_adapter", weight=0.0, seed=0), baseline)
    for method, weight in [("ip_adapter", 0.5), ("ip_adapter", 1.0), ("lora", 1.0), ("textual_inversion", 1.0), ("dreambooth", 1.0)]:
        assert not np.array_equal(pixels(full_run, method=method, weight=weight, seed=0), baseline), method
    assert not np.array_equal(pixels(full_run, method="ip_adapter", weight=0.5, seed=0),
                              pixels(full_run, method="ip_adapter", weight=1.0, seed=0))
    assert not np.array_equal(pixels(full_run, method="baseline", seed=0), pixels(full_run, method="baseline", seed=1))


def test_ip_adapter_weight_zero_is_the_baseline_cell_made_once(full_run):
    baseline = {r.cell.seed: r for r in full_run.results if r.method == "baseline"}
    for zero in [r for r in full_run.results if r.method == "ip_adapter" and r.cell.weight == 0.0]:
        twin = baseline[zero.cell.seed]
        assert zero.key == twin.key and zero.image_path != twin.image_path
        assert zero.image_path.parent.name == "ip_adapter" and not zero.generated
        meta = read_png_metadata(zero.image_path)
        assert meta["method"] == "ip_adapter" and meta["weight"] == 0.0 and meta["key"] == zero.key
        assert meta["same_image_as"] == str(twin.image_path.relative_to(full_run.run_dir))
        assert np.array_equal(np.asarray(Image.open(zero.image_path)), np.asarray(Image.open(twin.image_path)))
    # Both cells keep their own score rows, with equal values.
    clip_i = full_run.scores[full_run.scores["metric"] == "clip_i"]
    zero_scores = clip_i[(clip_i["method"] == "ip_adapter") & (clip_i["weight"] == 0.0)].sort_values("seed")
    base_scores = clip_i[clip_i["method"] == "baseline"].sort_values("seed")
    assert len(zero_scores) == len(base_scores) == 2
    assert zero_scores["value"].to_list() == base_scores["value"].to_list()
    assert (full_run.summary().query("method == 'ip_adapter' and weight == 0")["clip_i_n"] == 2).all()


def test_a_baseline_added_after_an_ip_adapter_sweep_with_weight_zero_costs_nothing(tmp_path, tiny_base):
    ip_adapter = {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.0, 0.5]}
    first = run_study(parse_study(tiny_study(methods=[ip_adapter])), tmp_path, loaded=tiny_base,
                      show_progress_bar=False, score=False)
    assert first.generated == 4
    second = run_study(parse_study(tiny_study(methods=[{"kind": "baseline"}, ip_adapter])), tmp_path,
                       loaded=tiny_base, show_progress_bar=False, score=False)
    assert second.complete and second.generated == 0
    made = [r for r in second.results if r.method == "baseline"]
    assert len(made) == 2 and all(r.image_path.parent.name == "baseline" and r.image_path.is_file() for r in made)
    assert read_png_metadata(made[0].image_path)["method"] == "baseline"


def test_cell_alone_equals_cell_in_run(full_run, tmp_path, tiny_base):
    alone = parse_study(tiny_study(seeds=[1], methods=[{"kind": "lora", "path": "tiny", "weights": [1.0]}]))
    result = run_study(alone, tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert np.array_equal(pixels(result, method="lora", seed=1), pixels(full_run, method="lora", weight=1.0, seed=1))
    assert result.results[0].key == next(r.key for r in full_run.results if r.method == "lora" and r.cell.weight == 1.0 and r.cell.seed == 1)


def test_baseline_is_identical_after_every_method_ran(full_run, tmp_path, tiny_base):
    # full_run generated the baseline first, then all other methods, on the same shared pipeline.
    again = run_study(parse_study(tiny_study()), tmp_path, loaded=tiny_base, show_progress_bar=False)
    for seed in (0, 1):
        assert np.array_equal(pixels(again, method="baseline", seed=seed), pixels(full_run, method="baseline", seed=seed))


def test_second_run_generates_nothing_and_a_new_weight_only_its_column(tmp_path, tiny_base):
    data = tiny_study(methods=[{"kind": "baseline"}, {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5]}])
    first = run_study(parse_study(data), tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert first.generated == 4
    second = run_study(parse_study(data), tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert second.generated == 0 and second.complete
    data["methods"][1]["weights"] = [0.5, 0.8]
    third = run_study(parse_study(data), tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert third.generated == 2
    assert {r.cell.weight for r in third.results if r.generated} == {0.8}


def test_stop_keeps_finished_cells_and_a_rerun_completes(tmp_path, tiny_base):
    study = parse_study(tiny_study(seeds=[0, 1, 2]))
    done = []
    result = run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False, batch_size=1,
                       progress=lambda event: done.append(event.cell), should_stop=lambda: len(done) >= 2)
    assert result.stopped and result.generated == 2
    assert len(pd.read_csv(tmp_path / "cells.csv")) == 2
    assert not list(tmp_path.glob("images/*/*.partial"))
    rest = run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert rest.generated == 1 and rest.complete


def test_a_failing_method_leaves_the_pipeline_clean_and_keeps_finished_cells(tmp_path, tiny_base, monkeypatch):
    from workbench.methods import lora

    processors = {k: type(v) for k, v in tiny_base.pipe.unet.attn_processors.items()}
    study = parse_study(tiny_study(methods=[{"kind": "baseline"}, {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5]},
                                            {"kind": "lora", "path": "tiny", "weights": [1.0]}]))
    calls = {"n": 0}
    original = lora._LoraAttachment.call_kwargs

    def fail_on_second_batch(self, weights):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(self, weights)

    monkeypatch.setattr(lora._LoraAttachment, "call_kwargs", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated"):
        run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert len(pd.read_csv(tmp_path / "cells.csv")) == 5
    assert {k: type(v) for k, v in tiny_base.pipe.unet.attn_processors.items()} == processors
    assert not hasattr(tiny_base.pipe.unet, "peft_config") or not tiny_base.pipe.unet.peft_config


def test_sdxl_code_path_runs_every_method(tmp_path):
    from workbench.models import load_pipeline_uncached, LoadedBase, base_identity
    import torch

    pipe = load_pipeline_uncached("tiny-xl", dtype=torch.float32, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    loaded = LoadedBase(pipe, base_identity("tiny-xl"), dict(pipe.scheduler.config), "cpu", torch.float32)
    study = parse_study(tiny_study(base="tiny-xl", seeds=[0], methods=ALL_METHODS))
    result = run_study(study, tmp_path, loaded=loaded, show_progress_bar=False)
    assert result.complete and len(result.results) == 8 and result.generated == 7  # IP-Adapter@0 = baseline
    base = pixels(result, method="baseline", seed=0)
    # Generated on its own, without a baseline to copy, IP-Adapter@0 is the baseline bit for bit.
    zero_alone = run_study(parse_study(tiny_study(base="tiny-xl", seeds=[0], methods=[ALL_METHODS[1]])),
                           tmp_path / "alone", loaded=loaded, show_progress_bar=False, score=False)
    assert np.array_equal(pixels(zero_alone, method="ip_adapter", weight=0.0, seed=0), base)
    assert not np.array_equal(pixels(result, method="textual_inversion", seed=0), base)


def test_cli_runs_the_tiny_preset_twice_generating_nothing_the_second_time(tmp_path, capsys):
    from workbench.__main__ import main

    out = tmp_path / "run"
    arguments = ["run", str(REPO / "presets/tiny.yaml"), "--out", str(out)]
    first = subprocess.run([sys.executable, "-m", "workbench", *arguments], capture_output=True, text=True, cwd=REPO,
                           timeout=600)  # the real entry point, once
    assert first.returncode == 0, first.stderr
    study = load_study(REPO / "presets/tiny.yaml")
    assert f"{len(study.cells())} generated, 0 cached" in first.stdout
    assert main(arguments) == 0  # the same command again, in this process (no second start-up)
    assert f"0 generated, {len(study.cells())} cached" in capsys.readouterr().out
    assert (out / "grid.png").is_file() and (out / "grids/prompt_02.png").is_file()


def test_cli_bad_preset_is_one_line_and_nonzero(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("base: tiny\nprompts: []\n")
    done = subprocess.run([sys.executable, "-m", "workbench", "run", str(preset), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "prompts: expected a non-empty list" in done.stderr


def test_missing_hub_model_offline_names_the_id_and_the_fix(tmp_path):
    from workbench.errors import StudyError

    study = parse_study(tiny_study(base="nobody/not-a-model"))
    with pytest.raises(StudyError, match=r"nobody/not-a-model.*huggingface-cli download nobody/not-a-model"):
        run_study(study, tmp_path, show_progress_bar=False, score=False)


def test_missing_scoring_backbone_offline_fails_before_generating(tmp_path):
    from workbench.errors import StudyError

    study = parse_study(tiny_study(base="nobody/not-a-model"))
    with pytest.raises(StudyError, match=r"metrics: cannot load the scoring backbones ViT-B-32/openai"):
        run_study(study, tmp_path, show_progress_bar=False)
    assert not list(tmp_path.glob("images/*/*.png"))


@pytest.mark.parametrize("xl", [False, True])
def test_single_file_checkpoint_offline_says_which_configs_to_fetch(tmp_path, xl):
    import torch
    from safetensors.torch import save_file

    from workbench.errors import StudyError

    keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    if xl:
        keys["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    checkpoint = tmp_path / "my_model.safetensors"
    save_file(keys, checkpoint)
    study = parse_study(tiny_study(base=str(checkpoint)))
    expected = "stabilityai/stable-diffusion-xl-base-1.0" if xl else "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(StudyError, match=rf"my_model\.safetensors is a single-file checkpoint.*download {expected}"):
        run_study(study, tmp_path / "run", show_progress_bar=False, score=False)


def test_model_cpu_offload_makes_the_same_images(full_run, tmp_path, monkeypatch):
    # On this CPU-only machine the "device" is the CPU too, so offloading moves nothing, but every
    # method still loads and runs through diffusers' offload hooks (dreambooth re-hooks its swapped models).
    # diffusers' loaders re-apply offload on the detected accelerator and refuse "cpu"; name it "cpu:0".
    import diffusers.pipelines.pipeline_utils as pipeline_utils
    import torch

    from workbench.models import LoadedBase, base_identity, load_pipeline_uncached

    monkeypatch.setattr(pipeline_utils, "get_device", lambda: "cpu:0")
    pipe = load_pipeline_uncached("tiny", dtype=torch.float32, device="cpu", offload="model")
    assert pipe._all_hooks
    loaded = LoadedBase(pipe, base_identity("tiny"), dict(pipe.scheduler.config), "cpu", torch.float32, "model")
    result = run_study(parse_study(tiny_study(seeds=[1], methods=ALL_METHODS)), tmp_path, loaded=loaded,
                       show_progress_bar=False, score=False)
    assert result.complete and result.generated == 7
    for made in result.results:
        same = pixels(full_run, method=made.method, weight=made.cell.weight, seed=1)
        assert np.array_equal(np.asarray(Image.open(made.image_path)), same), (made.method, made.cell.weight)


def test_cli_refuses_an_unknown_offload_mode(tmp_path):
    command = [sys.executable, "-m", "workbench", "run", str(REPO / "presets/tiny.yaml"), "--offload", "disk"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "argument --offload: invalid choice: 'disk'" in done.stderr


def count_cells_csv_writes(monkeypatch) -> list:
    from workbench import report

    writes, write = [], report.write_cells_csv
    monkeypatch.setattr(report, "write_cells_csv", lambda *a, **k: writes.append(1) or write(*a, **k))
    return writes


def test_cells_csv_is_written_once_per_run_not_after_every_batch(tmp_path, tiny_base, monkeypatch):
    writes = count_cells_csv_writes(monkeypatch)
    study = parse_study(tiny_study(seeds=[0, 1, 2], methods=[{"kind": "baseline"},
                                                              {"kind": "lora", "path": "tiny", "weights": [1.0]}]))
    result = run_study(study, tmp_path, loaded=tiny_base, batch_size=1, show_progress_bar=False, score=False)
    assert result.generated == 6 and writes == [1]  # six batches, one write
    assert len(pd.read_csv(tmp_path / "cells.csv")) == 6


def test_a_stopped_run_writes_cells_csv_once_with_its_finished_cells(tmp_path, tiny_base, monkeypatch):
    writes = count_cells_csv_writes(monkeypatch)
    done = []
    result = run_study(parse_study(tiny_study(seeds=[0, 1, 2])), tmp_path, loaded=tiny_base, batch_size=1,
                       show_progress_bar=False, score=False, progress=lambda event: done.append(event.cell),
                       should_stop=lambda: len(done) >= 2)
    assert result.stopped and writes == [1]
    assert list(pd.read_csv(tmp_path / "cells.csv")["seed"]) == [0, 1]
