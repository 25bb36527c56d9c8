"""No result is silently stale or wrong: caches follow the weights, rows follow cells, files follow the study."""

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_study
from PIL import Image

from workbench.cache import read_png_metadata
from workbench.images import load_image
from workbench.run_scores import ScoringSpec, load_scorer
from workbench.runner import run_study
from workbench.spec import parse_study


def _fresh_tiny_dino(folder, seed):
    from transformers import ViTConfig, ViTModel

    from workbench.metrics.backbones import TINY_DINO_CONFIG

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**TINY_DINO_CONFIG), add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)


def _fresh_tiny_clip(path, seed):
    import open_clip
    from safetensors.torch import save_file

    from workbench.metrics.backbones import TINY_CLIP_CONFIG

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _local_backbone_spec(kind, tmp_path):
    """A ScoringSpec whose `kind` backbone is a local copy of the tiny weights, and how to rewrite it."""
    from workbench.metrics import backbones

    if kind == "dino":
        folder = tmp_path / "dino"
        shutil.copytree(backbones.tiny_dino_dir(), folder)
        return ScoringSpec(("dino",), ("ViT-B-32", "tiny"), str(folder)), lambda: _fresh_tiny_dino(folder, 7)
    backbones._register_tiny_clip_config(backbones.tiny_clip_dir())
    path = tmp_path / "clip.safetensors"
    shutil.copy(backbones.tiny_clip_dir() / backbones.TINY_CLIP_WEIGHTS, path)
    return ScoringSpec(("clip_i",), (backbones.TINY_CLIP_NAME, str(path)), "tiny"), lambda: _fresh_tiny_clip(path, 7)


def _scores_by_hand(kind, spec, run_dir, study):
    """The metric of each image in cells.csv, from a backbone loaded afresh from the weights on disk now."""
    from workbench.metrics.backbones import ClipBackbone, DinoBackbone

    backbone = DinoBackbone(spec.dino) if kind == "dino" else ClipBackbone(*spec.clip)
    cells = pd.read_csv(run_dir / "cells.csv")
    images = [Image.open(run_dir / p).convert("RGB") for p in cells["image"]]
    references = backbone.embed_images([load_image(p) for p in study.subject.reference_images])
    return (backbone.embed_images(images) @ references.T).mean(dim=1).numpy()


@pytest.mark.parametrize("new_process", [True, False], ids=["new-process", "same-process"])
@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_replacing_local_backbone_weights_at_the_same_path_rescores_with_the_new_weights(
        kind, new_process, tmp_path, tiny_base):
    from workbench.metrics import load_backbone

    spec, rewrite = _local_backbone_spec(kind, tmp_path)
    metric = spec.metrics[0]
    study = parse_study(tiny_study())
    out = tmp_path / "run"
    first = run_study(study, out, loaded=tiny_base, scoring=spec, show_progress_bar=False)
    before = pd.read_csv(out / "cells.csv")[metric].to_numpy()
    np.testing.assert_allclose(before, _scores_by_hand(kind, spec, out, study), atol=1e-5)

    rewrite()
    if new_process:  # what a fresh process starts from: no backbone loaded yet
        load_backbone.cache_clear()
        load_scorer.cache_clear()
    again = run_study(study, out, loaded=tiny_base, scoring=spec, show_progress_bar=False)

    after = pd.read_csv(out / "cells.csv")[metric].to_numpy()
    assert again.generated == 0 and first.generated == 2
    np.testing.assert_allclose(after, _scores_by_hand(kind, spec, out, study), atol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)


def test_backbones_name_their_weights_by_content_not_by_path(tmp_path):
    from workbench.metrics.backbones import DinoBackbone, tiny_dino_dir

    folder = tmp_path / "dino"
    shutil.copytree(tiny_dino_dir(), folder)
    same = DinoBackbone(str(folder)).identity
    assert same == DinoBackbone(str(tiny_dino_dir())).identity
    _fresh_tiny_dino(folder, 7)
    assert DinoBackbone(str(folder)).identity != same
    assert DinoBackbone("tiny").identity.startswith("tiny-dino-")


def _local_ip_adapter(tmp_path):
    from workbench.tiny import tiny_ip_adapter

    folder, _, weights = tiny_ip_adapter("tiny").partition(":")
    copy = tmp_path / "adapter"
    shutil.copytree(folder, copy)
    return copy, weights


def _rewrite_image_encoder(encoder_dir):
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_dir)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.mul_(1.5)
    encoder.save_pretrained(encoder_dir, safe_serialization=True)


@pytest.mark.parametrize("form", ["repo:path", "file"])
def test_a_new_image_encoder_beside_a_local_ip_adapter_regenerates_the_cell(form, tmp_path, tiny_base):
    folder, weights = _local_ip_adapter(tmp_path)
    adapter = f"{folder}:{weights}" if form == "repo:path" else str(folder / weights)
    study = parse_study(tiny_study(seeds=[0], methods=[{"kind": "ip_adapter", "adapter": adapter, "weights": [1.0]}]))
    out = tmp_path / "run"
    first = run_study(study, out, loaded=tiny_base, show_progress_bar=False, score=False)
    first_methods = json.loads((out / "manifest.json").read_text())["models"]["methods"]
    old_image = np.asarray(Image.open(first.results[0].image_path))

    _rewrite_image_encoder(folder / "models" / "image_encoder")
    study = parse_study(tiny_study(seeds=[0], methods=[{"kind": "ip_adapter", "adapter": adapter, "weights": [1.0]}]))
    second = run_study(study, out, loaded=tiny_base, show_progress_bar=False, score=False)

    assert first.generated == 1 and second.generated == 1
    assert second.results[0].key != first.results[0].key
    assert not np.array_equal(np.asarray(Image.open(second.results[0].image_path)), old_image)
    manifest = json.loads((out / "manifest.json").read_text())
    encoder = first_methods["ip_adapter"]["image_encoder"]
    assert encoder["local"] == str(folder / "models" / "image_encoder")
    assert manifest["models"]["methods"]["ip_adapter"]["image_encoder"]["sha256"] != encoder["sha256"]


def test_the_default_ip_adapter_names_the_hub_image_encoder_it_loads():
    from workbench.methods.ip_adapter import IPAdapter

    identity = IPAdapter().identity()
    assert identity["image_encoder"]["hub"] == "h94/IP-Adapter"
    assert set(identity["image_encoder"]["subfolders"]) == {"models/image_encoder", "sdxl_models/image_encoder"}
    assert identity["image_encoder"]["revision"]


def test_two_prompts_rendering_to_the_same_baseline_text_keep_four_scored_cells(tmp_path, tiny_base):
    study = parse_study(tiny_study(prompts=["a {subject} {class}", "a {class}"]))
    result = run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert len({r.key for r in result.results}) == 2 and result.generated == 2
    assert len(pd.read_csv(tmp_path / "cells.csv")) == 4
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["dino_n"].tolist() == [4] and summary["diversity_n"].tolist() == [2]
    assert np.isfinite(summary["diversity_mean"]).all()
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert cells["diversity"].notna().all()


def _pngs(run_dir):
    return sorted(run_dir.glob("images/*/*.png"))


def test_reordering_prompts_leaves_exactly_one_png_per_cell(tmp_path, tiny_base):
    methods = [{"kind": "baseline"}, {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.0]}]
    prompts = ["a photo of a {subject} {class}", "a {subject} {class} in the snow"]
    first = run_study(parse_study(tiny_study(prompts=prompts, methods=methods)), tmp_path, loaded=tiny_base,
                      show_progress_bar=False, score=False)
    assert first.generated == 4 and len(_pngs(tmp_path)) == 8
    pixels = {(r.method, r.prompt, r.cell.seed): np.asarray(Image.open(r.image_path)) for r in first.results}

    second = run_study(parse_study(tiny_study(prompts=prompts[::-1], methods=methods)), tmp_path, loaded=tiny_base,
                       show_progress_bar=False, score=False)

    assert second.generated == 0 and second.complete
    assert _pngs(tmp_path) == sorted(r.image_path for r in second.results)
    for r in second.results:
        assert read_png_metadata(r.image_path)["key"] == r.key
        assert np.array_equal(np.asarray(Image.open(r.image_path)), pixels[(r.method, r.prompt, r.cell.seed)])
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert sorted(tmp_path / p for p in cells["image"]) == _pngs(tmp_path)


def test_images_of_a_method_left_out_of_the_study_stay_on_disk(tmp_path, tiny_base):
    both = [{"kind": "baseline"}, {"kind": "lora", "path": "tiny", "weights": [1.0]}]
    run_study(parse_study(tiny_study(methods=both)), tmp_path, loaded=tiny_base, show_progress_bar=False, score=False)
    lora_images = sorted(tmp_path.glob("images/lora/*.png"))
    run_study(parse_study(tiny_study(methods=both[:1])), tmp_path, loaded=tiny_base, show_progress_bar=False,
              score=False)
    assert sorted(tmp_path.glob("images/lora/*.png")) == lora_images and len(lora_images) == 2


def _csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_text_that_starts_a_spreadsheet_formula_is_escaped_in_every_csv_and_numbers_are_not(tmp_path, tiny_base):
    study = parse_study(tiny_study(
        seeds=[0],
        prompts=["=HYPERLINK(\"http://x\") a {subject} {class}", "@SUM(1) a {class}"],
        methods=[{"kind": "baseline", "label": "+base"},
                 {"kind": "lora", "path": "tiny", "weights": [-0.5], "label": "-lora"}]))
    run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False)

    for name in ("cells.csv", "scores.csv", "summary.csv"):
        rows = _csv_rows(tmp_path / name)
        assert {row["method"] for row in rows} == {"'+base", "'-lora"}, name
        if "prompt" in rows[0]:
            assert {row["prompt"][:2] for row in rows} == {"'=", "'@"}, name
        assert "-0.5" in {row["weight"] for row in rows}, name
    cells = _csv_rows(tmp_path / "cells.csv")
    assert {row["column"] for row in cells} == {"'+base", "'-lora@-0.5"}
    assert not any(row["value"].startswith("'") for row in _csv_rows(tmp_path / "scores.csv"))
    assert pd.read_csv(tmp_path / "cells.csv")["weight"].dtype == float


def test_csv_escaping_round_trips_through_the_run_folder_reader(tmp_path):
    from workbench.report import _atomic_csv, read_csv

    frame = pd.DataFrame({"prompt": ["=1+1", "'quoted", "\tx", "plain"], "weight": [-0.5, 1.0, 0.0, 2.0]})
    _atomic_csv(frame, tmp_path / "x.csv")
    assert [row["prompt"] for row in _csv_rows(tmp_path / "x.csv")] == ["'=1+1", "''quoted", "'\tx", "plain"]
    pd.testing.assert_frame_equal(read_csv(tmp_path / "x.csv"), frame)


LONG_PROMPT = " ".join(["a very detailed photo of a {subject} {class}"] + [f"word{i}" for i in range(100)])


def test_a_prompt_longer_than_77_tokens_is_flagged_in_cells_csv_and_the_result(tmp_path, tiny_base):
    from workbench.prompts import truncation_note

    study = parse_study(tiny_study(seeds=[0], prompts=["a photo of a {subject} {class}", LONG_PROMPT]))
    result = run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False, score=False)
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert cells["prompt_truncated"].tolist() == [False, True]
    assert result.truncated_prompts == [1]
    assert truncation_note(result.truncated_prompts).startswith("Prompt 2 is longer than the 77 tokens CLIP reads")


def test_the_cli_warns_once_per_prompt_longer_than_77_tokens(tmp_path, capsys):
    import yaml

    from workbench.__main__ import main

    preset = tmp_path / "long.yaml"
    preset.write_text(yaml.safe_dump(tiny_study(seeds=[0, 1], prompts=["a photo of a {subject} {class}", LONG_PROMPT])))
    assert main(["run", str(preset), "--out", str(tmp_path / "run"), "--no-score"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:") and "77" in line]
    assert len(warnings) == 1 and "prompts[1]" in warnings[0] and "truncat" in warnings[0]


def test_token_counts_agree_with_the_pipeline_tokenizer(tiny_base):
    from workbench.prompts import too_long

    tokenizer = tiny_base.pipe.tokenizer
    texts = ["a cat", " ".join(["cat"] * 75), " ".join(["cat"] * 76), LONG_PROMPT]
    assert [too_long(t) for t in texts] == [too_long(t, tokenizer) for t in texts] == [False, False, True, True]


def test_the_cli_warns_when_the_negative_prompt_is_longer_than_77_tokens(tmp_path, capsys):
    import yaml

    from workbench.__main__ import main

    preset = tmp_path / "long_negative.yaml"
    preset.write_text(yaml.safe_dump(tiny_study(seeds=[0], negative_prompt=LONG_PROMPT)))
    assert main(["run", str(preset), "--out", str(tmp_path / "run"), "--no-score"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:") and "77" in line]
    assert len(warnings) == 1 and "negative_prompt" in warnings[0] and "truncat" in warnings[0]
