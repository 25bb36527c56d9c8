"""The Gradio app: form <-> study, uploads, public mode, the shared GPU queue, stop, failure, export, /run."""

import importlib.machinery
import io
import json
import re
import socket
import struct
import sys
import types
import zipfile
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, tiny_study
from PIL import Image

from workbench.app import AppConfig, build_app, default_config, launch_options
from workbench.app.config import ASSETS, PUBLIC_MAX_CELLS, TINY_PRESET, check_public, discover_models, preset_data
from workbench.app.form import Form, parse_numbers
from workbench.app.uploads import normalize_reference
from workbench.app.views import column_detail, column_for_click, column_seeds, disk_views, failure_text, \
    grid_click_column, live_columns, score_views
from workbench.app.workbench import user_errors
from workbench.errors import StudyError
from workbench.export import saved_study, unzip_run, zip_run
from workbench.jobs import GPU_MAX_SECONDS, STOP_FILE, gpu_seconds, job_events, on_gpu, request_stop
from workbench.run_folder import RunFolder
from workbench.runner import RunResult, run_study
from workbench.spec import parse_study


def run_job(data: dict, run_dir: Path, stop_after: int | None = None) -> tuple[list, RunResult | None]:
    """Drain job_events; press Stop (the stop file) after `stop_after` progress events."""
    events, result = [], None
    for item in job_events(parse_study(data), str(run_dir), score=False, tick=0.05):
        if isinstance(item, RunResult):
            result = item
        elif item is not None:
            events.append(item)
            if stop_after is not None and len(events) == stop_after:
                request_stop(str(run_dir))
    return events, result


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_base):
    """baseline + lora@{0.5, 1} x 2 seeds, scored, on disk."""
    study = parse_study(tiny_study(methods=[{"kind": "baseline"}, {"kind": "lora", "path": "tiny", "weights": [0.5, 1.0]}]))
    return run_study(study, tmp_path_factory.mktemp("scored"), loaded=tiny_base, show_progress_bar=False)


# ---------------------------------------------------------------- form and presets


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "presets").glob("*.yaml")))
def test_every_preset_fills_the_form_and_reads_back_as_the_same_study(preset):
    data, references = preset_data(REPO / "presets" / preset)
    with gr.Blocks():
        form = Form(discover_models(REPO / "models"), public=False)
    values = form.fill(data)
    assert values[form.notes] == ""  # the form shows every detail of every shipped preset
    again = parse_study(form.read(values, references), base_dir=REPO).to_dict()
    original = parse_study(data, base_dir=REPO / "presets").to_dict()
    assert {**again, "description": ""} == {**original, "description": ""}


def test_weights_and_seeds_are_parsed_with_the_field_named():
    assert parse_numbers("0.3, 0.5 0.7;1", "IP-Adapter weights") == [0.3, 0.5, 0.7, 1.0]
    assert parse_numbers("0 1 2", "seeds", int) == [0, 1, 2]
    with pytest.raises(StudyError, match=r"IP-Adapter weights: 'high' is not a number"):
        parse_numbers("0.3, high", "IP-Adapter weights")
    with pytest.raises(StudyError, match=r"seeds: '1.5' is not a whole number"):
        parse_numbers("1.5", "seeds", int)


def test_study_errors_reach_the_user_as_gr_error():
    @user_errors
    def fails():
        raise StudyError("seeds: expected a list of integers")

    with pytest.raises(gr.Error, match="seeds: expected a list of integers"):
        fails()


# ---------------------------------------------------------------- uploads


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """The same PNG with another size in its header (and a valid CRC): a decompression-bomb probe."""
    header = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + header + struct.pack(">I", zlib.crc32(header)) + data[33:]


def test_bad_uploads_are_refused_by_name(tmp_path):
    cat = Image.open(REPO / "assets/chelsea.png")
    cases = {
        "corrupt.png": (png_bytes(cat)[:400], "corrupt or truncated"),
        "huge.png": (with_png_size(png_bytes(cat), 8_000, 6_000), "48 MP"),
        "bomb.png": (with_png_size(png_bytes(cat), 20_000, 20_000), "decompression bomb"),
        "notes.png": (b"these are not pixels", "not an image"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(StudyError, match=rf"^reference image {name} is .*{message}") as refused:
            normalize_reference(path, tmp_path / "refs", f"reference image {name}")
        assert "BytesIO" not in str(refused.value) and "upload is" not in str(refused.value)


def test_odd_uploads_become_upright_8bit_rgb_pngs(tmp_path):
    refs = tmp_path / "refs"
    sixteen = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)  # mode I;16
    (tmp_path / "16bit.png").write_bytes(png_bytes(sixteen))
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    (tmp_path / "rgba.png").write_bytes(png_bytes(rgba))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("RGB", (60, 20), (0, 128, 255)).save(tmp_path / "rotated.jpg", exif=exif)

    converted = {name: Image.open(normalize_reference(tmp_path / name, refs, name))
                 for name in ("16bit.png", "rgba.png", "rotated.jpg")}
    assert all(image.mode == "RGB" and image.format == "PNG" for image in converted.values())
    assert converted["16bit.png"].size == (64, 48)
    assert converted["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert converted["rotated.jpg"].size == (20, 60)  # EXIF orientation applied


# ---------------------------------------------------------------- public mode


def test_public_mode_takes_only_allow_listed_models_and_no_typed_paths(tmp_path):
    choices = discover_models(tmp_path / "no-models")
    ok = tiny_study(methods=[{"kind": "lora", "path": "tiny", "weights": [1.0]}], max_cells=500)
    ok["subject"]["reference_images"] = ["assets/chelsea.png"]
    assert check_public(ok, choices)["max_cells"] == PUBLIC_MAX_CELLS
    refused = {
        "base": {**ok, "base": "/etc/passwd.safetensors"},
        "lora[0].path": {**ok, "lora": [{"path": "https://example.com/x.safetensors"}]},
        "methods[0].path": {**ok, "methods": [{"kind": "lora", "path": str(tmp_path / "x.safetensors")}]},
        "subject.reference_images[0]": {**ok, "subject": {"reference_images": ["/etc/hosts"]}},
        "steps": {**ok, "steps": 500},
    }
    for field, data in refused.items():
        with pytest.raises(StudyError, match=re.escape(field)):
            check_public(data, choices)
    uploaded = str(tmp_path / "upload.png")
    check_public({**ok, "subject": {"reference_images": [uploaded]}}, choices, {uploaded})


@pytest.mark.parametrize("field, value", [("steps", "abc"), ("subject", [1]), ("size", "big"),
                                          ("max_cells", float("nan")), ("methods", 5), ("steps", float("nan"))])
def test_public_mode_names_a_bad_value_in_one_line(tmp_path, field, value):
    choices = discover_models(tmp_path / "no-models")
    data = tiny_study(subject={"reference_images": ["assets/chelsea.png"], "class_noun": "cat"})
    data[field] = value
    with pytest.raises(StudyError) as refused:
        parse_study(check_public(data, choices), base_dir=REPO)
    assert re.match(rf"(<study>: )?{field}: ", str(refused.value)) and "\n" not in str(refused.value)


def test_form_numbers_that_are_not_finite_are_refused_by_name():
    with pytest.raises(StudyError, match=r"IP-Adapter weights: 'nan' is not a finite number"):
        parse_numbers("0.5, nan", "IP-Adapter weights")
    with pytest.raises(StudyError, match=r"seeds: 'inf' is not a finite number"):
        parse_numbers("inf", "seeds", int)
    with gr.Blocks():
        form = Form(discover_models(REPO / "models"), public=False)
    values = form.fill(tiny_study())
    for component, name in [(form.steps, "steps"), (form.guidance, "guidance"), (form.height, "height"),
                            (form.lora_weight, "LoRA weight")]:
        with pytest.raises(StudyError, match=rf"^{name}: nan is not a finite number"):
            form.read({**values, component: float("nan")}, [])


def test_public_launch_caps_upload_size_and_serves_no_run_folder_by_path(tmp_path):
    options = launch_options(AppConfig(public=True, runs_dir=tmp_path))
    assert options["max_file_size"] == "10mb"
    assert options["allowed_paths"] == [str(ASSETS)]
    assert default_config(public=True).public


# ---------------------------------------------------------------- the GPU queue and ZeroGPU


def test_every_generate_event_shares_one_gpu_queue_of_one(tmp_path):
    demo = build_app(AppConfig(preset=TINY_PRESET, runs_dir=tmp_path, queue_size=7))
    gpu = [fn for fn in demo.fns.values() if fn.concurrency_id == "gpu"]
    assert {fn.name for fn in gpu} == {"run_job", "api_run"}
    assert all(fn.concurrency_limit == 1 for fn in gpu)
    assert demo._queue.max_size == 7
    named = [fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"]
    assert named == ["run"]


def test_zero_gpu_gets_one_call_per_grid_with_a_duration_from_its_size(monkeypatch):
    small = tiny_study(size=64, steps=4)
    big = tiny_study(size=512, steps=30, seeds=list(range(8)), methods=[{"kind": "lora", "path": "tiny",
                                                                           "weights": [0.5, 1.0]}])
    assert 0 < gpu_seconds(parse_study(small), "run") < gpu_seconds(parse_study(big), "run") <= GPU_MAX_SECONDS
    assert on_gpu(job_events) is job_events  # no `spaces` package here: plain call

    calls = []
    spaces = types.ModuleType("spaces")
    spaces.__spec__ = importlib.machinery.ModuleSpec("spaces", None)
    spaces.GPU = lambda duration: (calls.append(duration), lambda fn: ("gpu", fn))[1]
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    assert on_gpu(job_events) == ("gpu", job_events)
    assert calls == [gpu_seconds]


# ---------------------------------------------------------------- stop, failure, continue


def test_stop_keeps_finished_cells_and_generate_again_makes_only_the_missing(tmp_path):
    data = tiny_study(seeds=[0, 1, 2, 3], steps=3)
    events, stopped = run_job(data, tmp_path, stop_after=1)
    assert stopped.stopped and 1 <= len(stopped.results) < 4
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(stopped.results)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "cells.csv").is_file()

    (tmp_path / STOP_FILE).unlink()  # what Generate does before queueing the next job
    _, resumed = run_job(data, tmp_path)
    assert resumed.complete and not resumed.stopped
    assert resumed.generated == 4 - len(stopped.results)


def test_a_failing_job_keeps_what_it_generated(tmp_path):
    broken = tmp_path / "broken-dreambooth"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    data = tiny_study(methods=[{"kind": "baseline"}, {"kind": "dreambooth", "checkpoint": str(broken)}])
    run_dir = tmp_path / "run"
    with pytest.raises(StudyError, match="dreambooth.checkpoint: cannot load"):
        run_job(data, run_dir)
    views = disk_views(run_dir, "dino")
    assert views.grid is not None and views.columns == ["baseline"]
    assert len(list((run_dir / "images").rglob("*.png"))) == 2


def test_a_failure_promises_kept_images_only_when_there_are_some():
    assert failure_text(0, 60, "base: not cached") == ("Failed before the first image: base: not cached. "
                                                          "Fix that and press Generate.")
    assert "The 2 finished images are kept" in failure_text(2, 6, "out of memory")


# ---------------------------------------------------------------- views, export, load back


def test_views_of_a_run_folder_show_scores_and_open_a_clicked_column(scored_run):
    run_dir = scored_run.run_dir
    views = disk_views(run_dir, "dino")
    assert list(views.table["method@weight"]) == ["baseline", "lora@0.5", "lora@1"]
    assert {"DINO", "CLIP-I", "CLIP-T", "front"} <= set(views.table.columns)
    assert views.figure is not None and views.columns == ["baseline", "lora@0.5", "lora@1"]
    assert disk_views(run_dir, "clip_i").figure.layout.xaxis.title.text.startswith("CLIP-I")
    assert column_for_click(run_dir, "lora|0.5|17") == "lora@0.5"
    assert column_for_click(run_dir, "baseline|0") == "baseline"
    items, caption = column_detail(run_dir, "lora@1")
    assert len(items) == 2 and all(Path(path).is_file() for path, _ in items)
    assert items[1][1].startswith("DINO ") and "seed 1" in items[1][1]  # scores first: a phone cuts the end
    assert caption.startswith("`lora@1` — 2 images") and column_seeds(run_dir, "lora@1") == 2


def test_a_click_on_the_grid_opens_the_column_under_it(scored_run):
    from PIL import Image

    from workbench.grid import grid_layout

    run_dir = scored_run.run_dir
    study = scored_run.study
    with Image.open(run_dir / "grid.png") as grid:
        width = grid.width
    layout = grid_layout(3, (study.size[1], study.size[0]), True)
    assert width == layout.left + 3 * (layout.size + layout.gap) + layout.gap  # the layout of the saved grid
    middle = layout.left + layout.size // 2
    clicks = [middle + index * (layout.size + layout.gap) for index in range(3)]
    assert [grid_click_column(run_dir, None, x) for x in clicks] == ["baseline", "lora@0.5", "lora@1"]
    assert grid_click_column(run_dir, None, 3) is None  # the row labels and references


def test_the_score_table_shows_each_mean_with_its_paired_difference_and_interval(scored_run):
    views = score_views(scored_run.scores, scored_run.provenance, live_columns(scored_run), "dino")

    summary = scored_run.summary().set_index("method")
    lora, baseline = summary[summary.weight == 0.5].loc["lora"], summary.loc["baseline"]
    table = views.table.set_index("method@weight")
    assert table.loc["lora@0.5", "DINO"] == (f"{lora.dino_mean:.3f}\u202fΔ {lora.dino_delta:+.4f} "
                                             f"[{lora.dino_delta_lo:+.4f}, {lora.dino_delta_hi:+.4f}]")
    assert table.loc["baseline", "DINO"] == f"{baseline.dino_mean:.3f}"  # the reference: no Δ
    assert "pairs, " in views.suggestion and "95% t-interval" in views.suggestion


def test_a_baseline_labelled_control_still_gets_its_suggestion_in_the_app(scored_run):
    scores = scored_run.scores.replace({"method": {"baseline": "control"}})
    assert set(scores.loc[scores.method == "control", "kind"]) == {"baseline"}

    views = score_views(scores, scored_run.provenance, {("control", 0.0): "control"}, "dino")

    assert "**Suggested:** lora at weight" in views.suggestion
    assert "Δ" not in views.table.set_index("method@weight").loc["control", "DINO"]


def test_a_run_stopped_before_any_method_says_when_a_weight_will_be_suggested(scored_run):
    scores = scored_run.scores
    views = score_views(scores[scores["method"] == "baseline"], scored_run.provenance,
                           live_columns(scored_run), "dino")
    assert list(views.table["method@weight"]) == ["baseline"]
    assert "appears once a method" in views.suggestion and "try higher weights" not in views.suggestion


def test_the_run_zip_holds_everything_and_loads_back_to_continue(scored_run, tmp_path, tiny_base):
    archive = zip_run(scored_run.run_dir, tmp_path / "run.zip")
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"grid.png", "cells.csv", "summary.csv", "scores.csv", "frontier.html", "manifest.json",
            "study.yaml"} <= names
    assert sum(name.startswith("images/") and name.endswith(".png") for name in names) == 6
    assert any(name.startswith("references/") for name in names)

    loaded = unzip_run(archive, tmp_path / "loaded")
    data = saved_study(loaded)
    assert data["methods"][1]["path"] == "tiny" and data["subject"]["reference_images"][0].startswith("references/")
    study = parse_study(data, base_dir=loaded)
    again = run_study(study, loaded, loaded=tiny_base, show_progress_bar=False, score=False)
    assert again.complete and again.generated == 0  # every cell came back from the zip


def test_a_zip_reaching_outside_its_folder_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("manifest.json", "{}")
        archive.writestr("../outside.png", b"x")
    with pytest.raises(StudyError, match="unexpected entry '../outside.png'"):
        unzip_run(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.png").exists()


# ---------------------------------------------------------------- the API


def test_run_endpoint_scripts_a_study_with_gradio_client(tmp_path):
    from gradio_client import Client

    config = AppConfig(preset=TINY_PRESET, runs_dir=tmp_path / "runs")
    demo = build_app(config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_options(config))
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        study = yaml.safe_dump(tiny_study(
            prompts=["a photo of a {subject} {class}", "a {subject} {class} on the beach"],
            methods=[{"kind": "baseline"}, {"kind": "lora", "path": "tiny", "weights": [1.0]}]))
        grids, summary, figure = client.predict(study, None, api_name="/run")
        assert [item["caption"] for item in grids] == ["grid.png", "grids/prompt_01.png", "grids/prompt_02.png"]
        assert Image.open(grids[0]["image"]).size[0] > 64
        rows = [dict(zip(summary["headers"], row)) for row in summary["data"]]
        assert [(row["method"], row["weight"]) for row in rows] == [("baseline", 0.0), ("lora", 1.0)]
        assert all(-1 <= row["dino_mean"] <= 1 and row["dino_n"] == 4 for row in rows)
        assert figure["type"] == "plotly" and json.loads(figure["plot"])["data"]
        with pytest.raises(Exception, match="seeds: expected a list of integers"):
            client.predict(yaml.safe_dump(tiny_study(seeds=["x"])), None, api_name="/run")
    finally:
        demo.close()


def test_the_app_shows_a_label_that_starts_a_formula_as_written(tmp_path, tiny_base):
    study = parse_study(tiny_study(methods=[{"kind": "baseline", "label": "-base"},
                                            {"kind": "lora", "path": "tiny", "weights": [1.0], "label": "=lora"}]))
    run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert set(RunFolder(tmp_path).cells()["method"]) == {"-base", "=lora"}
    views = disk_views(tmp_path, "dino")
    assert set(views.columns) == {"-base", "=lora@1"}
    assert views.table["method@weight"].tolist() == ["-base", "=lora@1"]
    assert column_detail(tmp_path, "=lora@1")[0]


# ---------------------------------------------------------------- one parse per Generate, metrics from the scores


def test_one_generate_parses_the_study_once(tmp_path, monkeypatch):
    import sys

    import workbench.spec
    from workbench.app import Workbench

    wb = Workbench(AppConfig(preset=TINY_PRESET, runs_dir=tmp_path / "runs"))
    wb.build()
    data = tiny_study(methods=[{"kind": "baseline"}, {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5]}])
    values = {**wb.form.fill(data), wb.refs_state: [str(REPO / "assets/chelsea.png")], wb.run_state: None,
              wb.job_state: None}

    parses, decodes = [], []
    real_parse, real_decode = workbench.spec.parse_study, workbench.spec.load_image

    def counted_parse(*args, **kwargs):
        parses.append(1)
        return real_parse(*args, **kwargs)

    def counted_decode(*args, **kwargs):  # what a parse spends its time on: each reference image decoded
        decodes.append(1)
        return real_decode(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("workbench") and m is not None]:
        if getattr(module, "parse_study", None) is real_parse:
            monkeypatch.setattr(module, "parse_study", counted_parse)
    monkeypatch.setattr(workbench.spec, "load_image", counted_decode)

    prepared = wb.on_generate(values)
    updates = list(wb.run_job(prepared[wb.study_state], prepared[wb.run_state], prepared[wb.job_state], "dino", None))

    assert len(parses) == 1 and len(decodes) == 1
    assert "Done: 4 cells" in updates[-1][wb.status]


def test_every_scored_image_metric_is_offered_as_an_axis_and_shown_in_the_table(scored_run):
    scores = scored_run.scores
    images = scores[scores["metric"] == "dino"].assign(metric="brightness", value=lambda f: f["value"] / 2 + 0.5)
    with_plugin = pd.concat([scores, images], ignore_index=True)

    views = score_views(with_plugin, scored_run.provenance, live_columns(scored_run), "brightness")

    assert [metric for _, metric in views.axes] == ["dino", "clip_i", "brightness"]
    assert list(views.table.columns) == ["method@weight", "front", "DINO", "CLIP-I", "CLIP-T", "brightness",
                                         "diversity", "n"]
    assert views.figure.layout.xaxis.title.text.startswith("brightness")
    assert len(views.widths) == len(views.table.columns)
