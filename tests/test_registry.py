"""Methods and metrics are complete registry entries, and a plugin's appear everywhere with no edit."""

import dataclasses
import math

import pandas as pd
import pytest
import yaml
from conftest import REPO, tiny_study
from registries import restored_registries

from workbench.methods import METHODS, attached, register_method
from workbench.metrics import BACKBONES, METRICS, Scorer, register_metric
from workbench.spec import load_study, parse_study

PRESETS = sorted((REPO / "presets").glob("*.yaml"))
FIXTURE = "tests.plugin_fixture"


@pytest.fixture
def plugin():
    """The test plugin's method and metric, registered for one test only."""
    from workbench.plugins import load_plugins

    with restored_registries(FIXTURE):
        load_plugins([FIXTURE], environment=False, installed=False)
        yield


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_every_method_declares_what_the_app_and_the_spec_need(kind):
    cls = METHODS[kind]
    assert cls.kind == kind and isinstance(cls.title, str) and cls.title.strip()
    low, high = cls.weight_range
    assert low <= high
    for weights in (cls.default_weights, cls.suggested_weights):
        assert weights is None or (weights and all(low <= w <= high for w in weights)), weights
    assert isinstance(cls.uses_references, bool)
    # the weight-file option is one of the method's preset options, so the app can fill it in
    options = {field.name for field in dataclasses.fields(cls)}
    assert (cls.weight_option is None) == (cls.weight_file_kind is None)
    assert cls.weight_option is None or cls.weight_option in options
    assert not hasattr(cls, "per_sample_weights")  # known once loaded: the attachment says it


def test_the_shipped_methods_give_the_app_its_titles_options_and_first_sweeps():
    declared = {kind: (cls.title, cls.weight_option, cls.weight_file_kind, cls.suggested_weights)
                for kind, cls in METHODS.items()}
    assert declared == {
        "baseline": ("Baseline (text only)", None, None, None),
        "ip_adapter": ("IP-Adapter", "adapter", "adapter", (0.3, 0.5, 0.7)),
        "lora": ("Subject LoRA", "path", "lora", (0.6, 1.0)),
        "textual_inversion": ("Textual inversion", "embedding", "embedding", (1.0,)),
        "dreambooth": ("DreamBooth", "checkpoint", "checkpoint", (1.0,)),
    }


ATTACHED = [
    ({"kind": "baseline"}, True),
    ({"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5]}, True),
    ({"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5], "block_scales": {"up": {"block_0": [0.0, 1.0]}}},
     False),
    ({"kind": "lora", "path": "tiny", "weights": [1.0]}, True),  # the tiny LoRA touches only the UNet
    ({"kind": "textual_inversion", "embedding": "tiny"}, False),
    ({"kind": "dreambooth", "checkpoint": "tiny"}, False),
]


@pytest.mark.parametrize("method, mixes", ATTACHED, ids=lambda v: v["kind"] + ("+blocks" if "block_scales" in v else "")
                         if isinstance(v, dict) else str(v))
def test_the_attachment_says_whether_one_batch_may_mix_weights(method, mixes, tiny_base):
    study = parse_study(tiny_study(seeds=[0], methods=[method]))
    with attached(study.methods[0].method, tiny_base.pipe, study) as attachment:
        assert attachment.per_sample_weights is mixes


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_declares_how_to_read_it_and_which_backbone_it_needs(name):
    cls = METRICS[name]
    assert cls.name == name
    for attribute in ("label", "axis", "direction", "scale"):
        assert isinstance(getattr(cls, attribute), str) and getattr(cls, attribute).strip(), attribute
    assert cls.level in ("image", "group")
    assert callable(getattr(cls, "score" if cls.level == "image" else "score_group"))
    assert cls.backbone in BACKBONES
    assert set(cls.needs) <= set(BACKBONES[cls.backbone].produces)


def test_metric_labels_come_from_the_registry(plugin):
    from workbench.frontier import metric_label

    assert [metric_label(name) for name in ("clip_i", "clip_t", "dino", "diversity")] == [
        "CLIP-I", "CLIP-T", "DINO", "diversity"]
    assert metric_label("seed_spread") == "seed spread"
    assert metric_label("not_registered") == "not_registered"


def test_a_class_that_does_not_declare_everything_is_refused_when_registered():
    with restored_registries():
        with pytest.raises(TypeError, match=r"metric 'half' \(.*Half\) does not declare label, backbone"):
            @register_metric("half")
            class Half:
                axis, direction, scale, level, needs = "quality", "higher is better", "[0, 1]", "image", ()

                def score(self, generated, references): ...

        with pytest.raises(TypeError, match=r"method 'bare' .* does not declare title, weight_option"):
            register_method("bare")(dataclasses.dataclass(frozen=True)(type("Bare", (), {})))
        with pytest.raises(TypeError, match=r"method 'plain': decorate a @dataclass\(frozen=True\) class"):
            register_method("plain")(type("Plain", (), {}))
        with pytest.raises(ValueError, match=r"metric 'dino' is already registered by workbench\.metrics\.dino\.Dino"):
            register_metric("dino")(type("Other", (METRICS["diversity"],), {}))
        assert "half" not in METRICS and "bare" not in METHODS


def test_the_scorer_names_a_backbone_nobody_registered():
    with restored_registries():
        @register_metric("elsewhere")
        class Elsewhere:
            label, axis, direction, scale = "elsewhere", "quality", "higher is better", "[0, 1]"
            level, backbone, needs = "image", "aesthetic", ("aesthetic_score",)

            def score(self, generated, references): ...

        with pytest.raises(ValueError, match="metric 'elsewhere' needs backbone 'aesthetic', which is not registered"):
            Scorer(metrics=("clip_i", "elsewhere"), clip=("ViT-B-32", "tiny"), device="cpu")


def test_a_plugin_method_and_metric_appear_in_the_cli_outputs(plugin, tmp_path, capsys):
    from workbench.__main__ import main

    preset = tmp_path / "token.yaml"
    preset.write_text(yaml.safe_dump(tiny_study(name="token", steps=1, methods=[
        {"kind": "baseline"}, {"kind": "token_only", "label": "token alone"}])))
    out = tmp_path / "run"

    code = main(["run", str(preset), "--plugin", FIXTURE, "--metrics", "clip_t,dino,seed_spread", "--out", str(out)])

    assert code == 0, capsys.readouterr().err
    cells = pd.read_csv(out / "cells.csv")
    assert cells.loc[cells.method == "token alone", "kind"].tolist() == ["token_only", "token_only"]
    assert cells["seed_spread"].notna().all()
    summary = pd.read_csv(out / "summary.csv")
    assert summary["method"].tolist() == ["baseline", "token alone"]
    assert {"seed_spread_mean", "seed_spread_delta"} <= set(summary.columns)
    assert "seed spread" in capsys.readouterr().out  # the CLI's table, labelled from the registry

    assert main(["metrics", "--plugin", FIXTURE]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(listed) == set(METRICS) and {"clip_i", "seed_spread"} <= set(listed)
    assert "seed spread  group  diversity" in listed["seed_spread"] and listed["seed_spread"].endswith("dino")


def test_there_are_presets_to_check():
    assert len(PRESETS) >= 5


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.name)
def test_every_kind_a_preset_uses_is_registered(path):
    kinds = [method["kind"] for method in yaml.safe_load(path.read_text())["methods"]]
    assert not set(kinds) - set(METHODS), f"{path.name} uses unregistered kinds"
    study = load_study(path)
    assert [spec.method.kind for spec in study.methods] == kinds
    assert "baseline" in kinds  # every comparison is made against the text-only control
    assert study.name == path.stem  # `run` writes to runs/NAME by default
    assert study.cells() and all(not math.isnan(w) for spec in study.methods for w in spec.weights)


def test_the_front_door_exports_the_public_api():
    import workbench
    from workbench import methods, metrics, plugins, spec

    assert workbench.load_study is spec.load_study and workbench.parse_study is spec.parse_study
    assert workbench.METHODS is methods.METHODS and workbench.register_method is methods.register_method
    assert workbench.METRICS is metrics.METRICS and workbench.register_metric is metrics.register_metric
    assert workbench.BACKBONES is metrics.BACKBONES and workbench.register_backbone is metrics.register_backbone
    assert workbench.load_plugins is plugins.load_plugins
    from workbench.runner import run_study

    assert workbench.run_study is run_study
    with pytest.raises(AttributeError):
        workbench.no_such_thing


def test_a_plugin_method_and_metric_appear_in_the_app_form_and_table(tmp_path, monkeypatch, tiny_base):
    from workbench.app import AppConfig, Workbench
    from workbench.app.config import TINY_PRESET

    monkeypatch.setenv("WORKBENCH_PLUGINS", FIXTURE)  # the app loads its plugins itself
    with restored_registries(FIXTURE):
        app = Workbench(AppConfig(preset=TINY_PRESET, runs_dir=tmp_path / "runs"))
        app.build()
        check_app_shows_the_plugin(app, tmp_path, tiny_base)


def check_app_shows_the_plugin(app, tmp_path, tiny_base):
    from workbench.app.views import disk_views
    from workbench.runner import run_study
    from workbench.run_scores import ScoringSpec
    from workbench.spec import parse_study

    rows = {row.kind: row for row in app.form.methods}
    assert rows["token_only"].title == "Token only (no weights)" and rows["token_only"].weights is None
    assert [row.kind for row in app.form.methods][:5] == ["baseline", "ip_adapter", "lora", "textual_inversion",
                                                         "dreambooth"]

    study = parse_study(tiny_study(methods=[{"kind": "baseline"}, {"kind": "token_only"}]))
    run_study(study, tmp_path / "run", loaded=tiny_base, show_progress_bar=False,
              scoring=ScoringSpec.for_study(study, metrics=("clip_t", "dino", "seed_spread")))
    assert "seed spread" in disk_views(tmp_path / "run", "dino").table.columns
