import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WORKBENCH_CACHE", str(Path(tempfile.gettempdir()) / "workbench-test-cache"))

import math

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTModel

from workbench.metrics import available_metrics, get_metric, load_backbone
from workbench.metrics import backbones as backbones_module
from workbench.metrics.backbones import ClipBackbone, DinoBackbone
from workbench.metrics.scorer import Scorer
from workbench.tiny import TINY_VERSION

PROMPTS = ["a photo of a dog", "a dog on the beach", "a watercolor painting of a dog", "a dog in space", "a dog", "x"]


def picture(seed: int, size=(96, 64), mode="RGB") -> Image.Image:
    """A smooth random picture (a gradient plus blobs), not pure noise, of any size and mode."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        blob = np.exp(-((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2) / rng.uniform(0.01, 0.1))
        channels.append(0.5 + 0.25 * (a * xx + b * yy) + 0.25 * c * blob)
    array = (np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    # batch_size 4 with 6 images: scoring runs over more than one batch.
    return Scorer(clip=("ViT-B-32", "tiny"), dino="tiny", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [picture(seed, size=(64 + 16 * seed, 96 - 8 * seed)) for seed in range(6)]


@pytest.fixture(scope="module")
def references() -> list[Image.Image]:
    return [picture(100 + seed, size=(80, 80)) for seed in range(3)]


def clip_image_by_hand(backbone: ClipBackbone, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model.encode_image(backbone.preprocess(image.convert("RGB"))[None])[0]


def clip_text_by_hand(backbone: ClipBackbone, text: str) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model.encode_text(backbone.tokenizer([text]))[0]


def dino_by_hand(backbone: DinoBackbone, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model(pixel_values=backbone.preprocess(image.convert("RGB"))[None]).last_hidden_state[0, 0]


def mean_cosine(vector: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.cosine_similarity(vector, other, dim=0) for other in others]).mean()


def test_registry_lists_metrics_and_names_them_on_unknown():
    assert available_metrics() == ["clip_i", "clip_t", "dino", "diversity"]
    assert get_metric("dino").axis == "image_fidelity"
    with pytest.raises(ValueError, match=r"unknown metric 'dinov2' \(known: clip_i, clip_t, dino, diversity\)"):
        get_metric("dinov2")
    with pytest.raises(ValueError, match="unknown metric"):
        Scorer(metrics=("clip_i", "fid"), clip=("ViT-B-32", "tiny"), dino="tiny")


def test_clip_i_is_the_mean_cosine_to_each_reference(scorer, images, references):
    clip = scorer.backbones["clip"]
    reference_rows = [clip_image_by_hand(clip, reference) for reference in references]
    expected = torch.stack([mean_cosine(clip_image_by_hand(clip, image), reference_rows) for image in images])

    scores = scorer.score_images(images, PROMPTS, scorer.embed_references(references))

    torch.testing.assert_close(scores["clip_i"], expected)


def test_clip_t_is_the_cosine_between_image_and_its_prompt(scorer, images, references):
    clip = scorer.backbones["clip"]
    expected = torch.stack([
        F.cosine_similarity(clip_image_by_hand(clip, image), clip_text_by_hand(clip, prompt), dim=0)
        for image, prompt in zip(images, PROMPTS)
    ])

    scores = scorer.score_images(images, PROMPTS, scorer.embed_references(references))

    torch.testing.assert_close(scores["clip_t"], expected)
    assert scores["clip_t"].std() > 0  # prompts make a difference even with random weights


def test_dino_is_the_mean_cosine_of_cls_tokens_to_each_reference(scorer, images, references):
    dino = scorer.backbones["dino"]
    reference_rows = [dino_by_hand(dino, reference) for reference in references]
    expected = torch.stack([mean_cosine(dino_by_hand(dino, image), reference_rows) for image in images])

    scores = scorer.score_images(images, PROMPTS, scorer.embed_references(references))

    torch.testing.assert_close(scores["dino"], expected)


def test_dino_preprocessing_is_the_dreambooth_one(scorer):
    image = picture(3, size=(300, 200))
    # Shorter side to 256 with bicubic resampling, centre crop 224, ImageNet mean/std.
    resized = image.resize((384, 256), Image.BICUBIC)
    left, top = (384 - 224) // 2, (256 - 224) // 2
    array = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    array = (array - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)

    torch.testing.assert_close(scorer.backbones["dino"].preprocess(image), expected)


def test_an_image_scored_against_itself_has_clip_i_and_dino_of_one(scorer, images):
    for image in images[:3]:
        scores = scorer.score_images([image], ["a dog"], scorer.embed_references([image]))
        assert scores["clip_i"].item() == pytest.approx(1.0, abs=1e-5)
        assert scores["dino"].item() == pytest.approx(1.0, abs=1e-5)


def test_diversity_is_the_mean_pairwise_one_minus_cosine_of_dino_embeddings(scorer, images):
    dino = scorer.backbones["dino"]
    group = images[:4]
    rows = [dino_by_hand(dino, image) for image in group]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.mean([1 - F.cosine_similarity(rows[i], rows[j], dim=0).item() for i, j in pairs])

    diversity = get_metric("diversity")()

    assert diversity.score_group({"dino_image": dino.embed_images(group)}) == pytest.approx(expected, abs=1e-6)
    assert expected > 0


def test_diversity_of_identical_images_is_zero_and_of_one_image_is_nan(scorer, images):
    dino = scorer.backbones["dino"]
    diversity = get_metric("diversity")()

    same = dino.embed_images([images[0]] * 3)
    assert diversity.score_group({"dino_image": same}) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(diversity.score_group({"dino_image": same[:1]}))


REFERENCE_ASSETS = ["chelsea.png", "chelsea_crop.png", "coffee.png"]


def scored_run(scorer, images, run_dir):
    """`images` scored along the runner's path (RunScores), as the 6 cells of a study: baseline and
    lora@0.5, lora@1, two seeds each; three reference images."""
    from types import SimpleNamespace

    from conftest import REPO, tiny_study

    from workbench.run_scores import RunScores
    from workbench.spec import parse_study

    study = parse_study(tiny_study(
        subject={"reference_images": [str(REPO / "assets" / name) for name in REFERENCE_ASSETS], "class_noun": "dog"},
        methods=[{"kind": "baseline"}, {"kind": "lora", "path": "tiny", "weights": [0.5, 1.0]}]))
    cells = study.cells()
    assert len(cells) == len(images)
    results = [SimpleNamespace(cell=cell, key=f"key{index}", method=study.methods[cell.method_index].label,
                               kind=study.methods[cell.method_index].method.kind, image_path=None)
               for index, cell in enumerate(cells)]
    run = RunScores(scorer, study, run_dir)
    run.add(results, images)
    return run, study


def test_the_score_table_is_long_with_one_diversity_row_per_group(scorer, images, tmp_path):
    from workbench.images import load_image

    run, study = scored_run(scorer, images, tmp_path)

    frame = run.frame()

    assert list(frame.columns) == ["prompt_index", "prompt", "method", "kind", "weight", "seed", "key", "metric",
                                   "value"]
    per_image = frame[frame.metric != "diversity"]
    assert len(per_image) == 3 * len(images)
    assert per_image["seed"].notna().all()
    references = scorer.embed_references([load_image(path) for path in study.subject.reference_images])
    expected = scorer.score_images(images, ["a photo of a dog"] * len(images), references)
    for name, values in expected.items():
        np.testing.assert_allclose(per_image[per_image.metric == name]["value"].to_numpy(), values.numpy(),
                                   rtol=1e-6)
        assert per_image[per_image.metric == name]["seed"].tolist() == [cell.seed for cell in study.cells()]

    groups = frame[frame.metric == "diversity"]
    assert groups["seed"].isna().all()
    assert groups["method"].tolist() == ["baseline", "lora", "lora"]
    np.testing.assert_array_equal(groups["weight"], [0.0, 0.5, 1.0])
    diversity = get_metric("diversity")()
    dino_rows = scorer.backbones["dino"].embed_images(images)
    for position, value in enumerate(groups["value"]):
        members = dino_rows[2 * position : 2 * position + 2]
        assert value == pytest.approx(diversity.score_group({"dino_image": members}), abs=1e-6)


def test_scoring_embeds_each_image_once_per_backbone(scorer, images, tmp_path, monkeypatch):
    embedded = []
    for kind, backbone in scorer.backbones.items():
        original = backbone.embed_images
        monkeypatch.setattr(backbone, "embed_images",
                            lambda batch, *args, _kind=kind, _original=original, **kwargs:
                            embedded.append((_kind, len(batch))) or _original(batch, *args, **kwargs))

    run, _ = scored_run(scorer, images, tmp_path)
    run.frame()

    assert sorted(embedded) == sorted([("clip", 6), ("clip", 3), ("dino", 6), ("dino", 3)])


def test_images_of_any_mode_score_like_their_rgb_conversion(scorer, images, references):
    odd = [images[0].convert("L"), images[1].convert("P"), images[2].convert("CMYK")]
    as_rgb = [image.convert("RGB") for image in odd]
    reference_embedding = scorer.embed_references(references)

    scores = scorer.score_images(odd, PROMPTS[:3], reference_embedding)
    expected = scorer.score_images(as_rgb, PROMPTS[:3], reference_embedding)

    for name in expected:
        torch.testing.assert_close(scores[name], expected[name])


def test_scorer_loads_only_the_backbones_its_metrics_need():
    assert set(Scorer(metrics=("clip_t",), clip=("ViT-B-32", "tiny"), device="cpu").backbones) == {"clip"}
    assert set(Scorer(metrics=("diversity",), dino="tiny", device="cpu").backbones) == {"dino"}


def test_provenance_says_how_to_read_each_metric(scorer):
    provenance = scorer.provenance()

    assert list(provenance) == ["clip_i", "clip_t", "dino", "diversity"]
    assert provenance["clip_t"]["axis"] == "prompt_fidelity"
    assert provenance["dino"] == {
        "axis": "image_fidelity", "direction": "higher is better",
        "backbone": f"transformers tiny random-weight ViT (tiny-dino-{TINY_VERSION})", "scale": "cosine in [-1, 1]",
    }
    assert provenance["clip_i"]["backbone"].startswith("open_clip tiny")


def test_load_backbone_returns_the_same_loaded_model_for_the_same_key():
    first = load_backbone("dino", {"model_id": "tiny"}, "cpu")

    assert load_backbone("dino", {"model_id": "tiny"}, torch.device("cpu")) is first
    assert load_backbone("dino", {"model_id": "tiny"}, "cpu").produces == {"dino_image": "image"}
    with pytest.raises(ValueError, match=r"unknown backbone 'siglip' \(known: clip, dino"):
        load_backbone("siglip", {"model_id": "x"}, "cpu")


def test_a_backbone_that_cannot_be_loaded_says_what_to_do():
    with pytest.raises(RuntimeError, match="(?s)could not load DINO workbench-test/no-such-model.*dino='tiny'"):
        DinoBackbone("workbench-test/no-such-model")
    with pytest.raises(RuntimeError, match="(?s)could not load CLIP ViT-B-32 no-such-tag.*'tiny'"):
        ClipBackbone("ViT-B-32", "no-such-tag")


def test_openai_clip_weights_are_built_with_the_quick_gelu_they_were_trained_with():
    assert backbones_module.trained_with_quick_gelu("ViT-B-32", "openai")
    assert backbones_module.trained_with_quick_gelu("ViT-L-14", "openai")
    assert not backbones_module.trained_with_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not backbones_module.trained_with_quick_gelu("ViT-B-32", "/some/local/file.safetensors")


def spy(calls: list, function):
    def wrapper(*args, **kwargs):
        calls.append(args[0])
        return function(*args, **kwargs)

    return wrapper


def test_tiny_backbones_are_saved_then_loaded_through_the_real_loaders(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    loaded, pretrained_files = [], []
    create = open_clip.create_model_and_transforms

    def create_spy(name, pretrained=None, **kwargs):
        pretrained_files.append(pretrained)
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy(loaded, create_spy))
    monkeypatch.setattr(ViTModel, "from_pretrained", spy(loaded, ViTModel.from_pretrained))

    clip, dino = ClipBackbone("ViT-B-32", "tiny"), DinoBackbone("tiny")

    clip_dir, dino_dir = tmp_path / f"tiny-clip-{TINY_VERSION}", tmp_path / f"tiny-dino-{TINY_VERSION}"
    assert (clip_dir / "workbench-tiny-clip.json").is_file() and (clip_dir / "open_clip_model.safetensors").is_file()
    assert (dino_dir / "config.json").is_file() and (dino_dir / "model.safetensors").is_file()
    assert loaded == ["workbench-tiny-clip", dino_dir]
    assert pretrained_files == [str(clip_dir / "open_clip_model.safetensors")]
    saved = load_file(clip_dir / "open_clip_model.safetensors")
    for key, value in clip.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_tiny_backbones_are_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    first_clip, first_dino = ClipBackbone("ViT-B-32", "tiny"), DinoBackbone("tiny")
    files = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    stamps = [path.stat().st_mtime_ns for path in files]

    def must_not_rebuild(folder):
        raise AssertionError("the tiny model was rebuilt although its folder exists")

    monkeypatch.setattr(backbones_module, "_write_tiny_clip", must_not_rebuild)
    monkeypatch.setattr(backbones_module, "_write_tiny_dino", must_not_rebuild)
    second_clip, second_dino = ClipBackbone("ViT-B-32", "tiny"), DinoBackbone("tiny")

    assert sorted(path for path in tmp_path.rglob("*") if path.is_file()) == files
    assert [path.stat().st_mtime_ns for path in files] == stamps
    image = picture(0)
    torch.testing.assert_close(second_clip.embed_images([image]), first_clip.embed_images([image]))
    torch.testing.assert_close(second_dino.embed_images([image]), first_dino.embed_images([image]))


def test_tiny_backbones_are_the_same_wherever_they_are_built(tmp_path, monkeypatch, scorer):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    rng_state = torch.random.get_rng_state()

    backbones_module.tiny_clip_dir(), backbones_module.tiny_dino_dir()

    assert torch.equal(torch.random.get_rng_state(), rng_state)  # building leaves the caller's RNG alone
    clip, dino = ClipBackbone("ViT-B-32", "tiny"), DinoBackbone("tiny")
    image = picture(1)
    for rebuilt, shared in ((clip, scorer.backbones["clip"]), (dino, scorer.backbones["dino"])):
        torch.testing.assert_close(rebuilt.embed_images([image]), shared.embed_images([image]), rtol=0, atol=0)


def test_scores_are_empty_for_no_images(scorer, references, tmp_path):
    from conftest import tiny_study

    from workbench.run_scores import SCORE_COLUMNS, RunScores
    from workbench.spec import parse_study

    scores = scorer.score_images([], [], scorer.embed_references(references))
    assert list(scores) == ["clip_i", "clip_t", "dino"]
    assert all(values.shape == (0,) for values in scores.values())
    frame = RunScores(scorer, parse_study(tiny_study()), tmp_path).frame()
    assert frame.empty and list(frame.columns) == SCORE_COLUMNS


def test_a_scored_frame_summarises_and_plots(scorer, images, tmp_path):
    from workbench.frontier import summarize
    from workbench.plots import frontier_figure

    scores = scored_run(scorer, images, tmp_path)[0].frame()

    summary = summarize(scores)
    figure = frontier_figure(summary, scores=scores, provenance=scorer.provenance())

    assert summary[["method", "dino_n", "clip_t_n", "diversity_n"]].values.tolist() == [
        ["baseline", 2, 2, 1], ["lora", 2, 2, 1], ["lora", 2, 2, 1]
    ]
    assert summary["on_pareto_front"].any()
    (baseline,) = [trace for trace in figure.data if trace.name == "baseline"]
    assert baseline.text == ("",)  # the baseline has no weight
    assert figure.layout.xaxis.title.text == (
        f"DINO (cosine in [-1, 1]) — image fidelity →<br><sup>transformers tiny random-weight ViT "
        f"(tiny-dino-{TINY_VERSION})</sup>"
    )


def hub_layout_state_dict(model: ViTModel) -> dict[str, torch.Tensor]:
    """`model`'s weights under the key names of the ViT checkpoints on the Hub (facebook/dino-vits16)."""
    renames = [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
               ("mlp.fc2", "output.dense")]
    renamed = {}
    for key, value in model.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        renamed[key] = value.contiguous()
    return renamed


def test_dino_reads_a_checkpoint_in_the_hub_layout_with_a_pooler(tmp_path, scorer):
    from safetensors.torch import save_file

    shared = scorer.backbones["dino"]
    state = hub_layout_state_dict(shared.model)
    assert "encoder.layer.0.attention.attention.query.weight" in state
    hidden = shared.model.config.hidden_size
    state |= {"pooler.dense.weight": torch.zeros(hidden, hidden), "pooler.dense.bias": torch.zeros(hidden)}
    shared.model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = DinoBackbone(str(tmp_path))

    image = picture(2)
    torch.testing.assert_close(loaded.embed_images([image]), shared.embed_images([image]), rtol=0, atol=0)


def test_dino_refuses_a_checkpoint_that_would_leave_layers_random(tmp_path, scorer):
    from safetensors.torch import save_file

    state = {key: value.contiguous() for key, value in scorer.backbones["dino"].model.state_dict().items()
             if not key.startswith("layers.1.")}
    scorer.backbones["dino"].model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(RuntimeError, match=r"lacks or misshapes \d+ weights .*layers\.1\."):
        DinoBackbone(str(tmp_path))


def test_images_preprocessed_in_threads_keep_their_order(scorer):
    # Threads preprocess only for a GPU encoder; here the same function is asked for them on the CPU.
    from workbench.metrics.backbones import _embed_in_batches

    dino = scorer.backbones["dino"]
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 260), (256, 256), (512, 384), (240, 320), (280, 280), (600, 300)]]
    encode = lambda batch: dino.model(pixel_values=batch).last_hidden_state[:, 0]  # noqa: E731
    threaded = _embed_in_batches(encode, dino.preprocess, images, 4, torch.device("cpu"), threads=True)
    serial = _embed_in_batches(encode, dino.preprocess, images, 4, torch.device("cpu"), threads=False)
    assert torch.equal(threaded, serial)
    assert torch.allclose(threaded, dino.embed_images(images, batch_size=4))


def test_a_prompt_feature_without_one_prompt_per_image_names_the_metric_that_reads_it(scorer, images):
    with pytest.raises(ValueError, match="clip_t needs one prompt per image: got 2 images and 1 prompts"):
        scorer.embed_images(images[:2], ["a dog"])
