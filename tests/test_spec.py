"""Bad input fails before any generation, with one line naming the field."""

import pickle
from pathlib import Path

import pytest
from conftest import REPO, tiny_study

from workbench.errors import StudyError
from workbench.spec import load_study, parse_study


def test_tiny_preset_covers_every_method_kind():
    from workbench.methods import METHODS

    study = load_study(REPO / "presets/tiny.yaml")
    assert {m.method.kind for m in study.methods} == set(METHODS)


def test_unknown_key_is_named():
    with pytest.raises(StudyError, match=r"<study>: sedes: unknown key"):
        parse_study(tiny_study(sedes=[1]))


def test_unknown_method_option_is_named():
    with pytest.raises(StudyError, match=r"methods\[0\]: unknown option 'scale' for baseline"):
        parse_study(tiny_study(methods=[{"kind": "baseline", "scale": 2}]))


def test_unknown_method_kind_lists_known_ones():
    with pytest.raises(StudyError, match=r"methods\[0\]: unknown method kind 'dreamboth' \(known: baseline"):
        parse_study(tiny_study(methods=[{"kind": "dreamboth"}]))


def test_weights_must_be_numbers():
    with pytest.raises(StudyError, match=r"methods\[0\]\.weights\[1\]: expected a number, got 'high'"):
        parse_study(tiny_study(methods=[{"kind": "ip_adapter", "adapter": "tiny", "weights": [0.3, "high"]}]))


def test_missing_reference_file_is_named(tmp_path):
    data = tiny_study(subject={"reference_images": [str(tmp_path / "nope.png")], "class_noun": "cat"})
    with pytest.raises(StudyError, match=r"subject\.reference_images\[0\]: file not found"):
        parse_study(data)


def test_undecodable_image_is_refused(tmp_path):
    bad = tmp_path / "cat.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(StudyError, match=r"subject\.reference_images\[0\]: .*cat\.png"):
        parse_study(tiny_study(subject={"reference_images": [str(bad)]}))


def test_text_file_posing_as_image_is_refused(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(StudyError, match="not an image"):
        parse_study(tiny_study(subject={"reference_images": [str(bad)]}))


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_lora_is_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    weights = tmp_path / f"subject{suffix}"
    weights.write_bytes(pickle.dumps(boom))
    data = tiny_study(methods=[{"kind": "lora", "path": str(weights), "weights": [1.0]}])
    with pytest.raises(StudyError, match=r"methods\[0\]: path: .*pickle.*safetensors"):
        parse_study(data)
    assert not marker.exists()


def test_pickle_base_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(StudyError, match=r"base: .*model\.ckpt is a pickle checkpoint"):
        parse_study(tiny_study(base=str(ckpt)))


def test_empty_prompt_list_is_refused():
    with pytest.raises(StudyError, match=r"prompts: expected a non-empty list"):
        parse_study(tiny_study(prompts=[]))


def test_blank_prompt_is_refused():
    with pytest.raises(StudyError, match=r"prompts\[1\]: empty prompt"):
        parse_study(tiny_study(prompts=["a {class}", "   "]))


def test_a_literal_identifier_in_a_prompt_is_refused():
    with pytest.raises(StudyError, match=r"prompts\[1\]: writes the identifier 'sks' literally; write \{subject\}"):
        parse_study(tiny_study(prompts=["a {subject} {class}", "a sks cat in the snow"]))
    # a word that merely contains the token is not the token
    assert parse_study(tiny_study(prompts=["a {subject} {class} on the asks-table"])).prompts


def test_a_clip_choice_for_a_tiny_study_is_refused():
    from workbench.run_scores import ScoringSpec

    study = parse_study(tiny_study())
    with pytest.raises(StudyError, match="clip: a tiny study scores with tiny random CLIP"):
        ScoringSpec.for_study(study, clip="ViT-L-14")
    assert ScoringSpec.for_study(study).clip == ("ViT-B-32", "tiny")


def test_too_many_cells_is_refused_with_the_count():
    data = tiny_study(seeds=list(range(10)), max_cells=5)
    with pytest.raises(StudyError, match=r"max_cells: the study has 10 cells, more than max_cells=5"):
        parse_study(data)


def test_tiny_weights_need_a_tiny_base():
    data = tiny_study(base="stable-diffusion-v1-5/stable-diffusion-v1-5",
                      methods=[{"kind": "lora", "path": "tiny", "weights": [1.0]}])
    with pytest.raises(StudyError, match=r"only fit a tiny base"):
        parse_study(data)


def test_weights_required_for_sweep_methods():
    with pytest.raises(StudyError, match=r"methods\[0\]\.weights: ip_adapter needs a list of weights"):
        parse_study(tiny_study(methods=[{"kind": "ip_adapter", "adapter": "tiny"}]))


def test_placeholders_render_per_method():
    study = parse_study(tiny_study(
        prompts=["a {subject} {class} on the beach"],
        methods=[{"kind": "baseline"}, {"kind": "lora", "path": "tiny", "weights": [1.0]},
                 {"kind": "textual_inversion", "embedding": "tiny", "token": "<kitty>"}]))
    rendered = {study.methods[c.method_index].method.kind: study.render_prompt(c) for c in study.cells()}
    assert rendered == {"baseline": "a cat on the beach", "lora": "a sks cat on the beach",
                        "textual_inversion": "a <kitty> cat on the beach"}
    assert study.scoring_prompt(study.prompts[0]) == "a cat on the beach"


def test_preset_paths_resolve_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study(REPO / "presets/tiny.yaml")
    assert Path(study.subject.reference_images[0]).is_file()


def test_study_round_trips_through_its_dict():
    study = load_study(REPO / "presets/tiny.yaml")
    again = parse_study(study.to_dict(), base_dir=REPO)
    assert again.cells() == study.cells()
    assert [m.method.identity() for m in again.methods] == [m.method.identity() for m in study.methods]


# ---------------------------------------------------------------- every number and text field is bounded

NAN, INF = float("nan"), float("inf")
IP = {"kind": "ip_adapter", "adapter": "tiny"}
BAD_VALUES = [
    # (overrides of tiny_study, the field the one-line message must name)
    ({"seeds": [2**64]}, "seeds"),
    ({"seeds": [-1]}, "seeds"),
    ({"steps": NAN}, "steps"),
    ({"steps": INF}, "steps"),
    ({"steps": 10000}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": "abc"}, "steps"),
    ({"steps": 0}, "steps"),
    ({"size": 100000}, "size"),
    ({"size": [512, 4096]}, "size"),
    ({"size": "big"}, "size"),
    ({"size": 12}, "size"),
    ({"max_cells": NAN}, "max_cells"),
    ({"max_cells": 0}, "max_cells"),
    ({"guidance": -5}, "guidance"),
    ({"guidance": NAN}, "guidance"),
    ({"guidance": INF}, "guidance"),
    ({"guidance": 0.5}, "guidance"),
    ({"guidance": 1000}, "guidance"),
    ({"methods": [{**IP, "weights": [NAN]}]}, "methods[0].weights[0]"),
    ({"methods": [{**IP, "weights": [0.5, INF]}]}, "methods[0].weights[1]"),
    ({"methods": [{**IP, "weights": [3.0]}]}, "methods[0].weights[0]"),
    ({"methods": [{**IP, "weights": [10**400]}]}, "methods[0].weights[0]"),
    ({"methods": [{**IP, "weights": [0.5], "block_scales": {"up": {"block_0": [0.0, NAN, 0.0]}}}]},
     "methods[0]: block_scales"),
    ({"methods": [{"kind": "lora", "path": "tiny", "weights": [NAN]}]}, "methods[0].weights[0]"),
    ({"methods": [{"kind": "lora", "path": "tiny", "weights": [-INF]}]}, "methods[0].weights[0]"),
    ({"methods": [{"kind": "textual_inversion", "embedding": "tiny", "weights": [NAN]}]}, "methods[0].weights[0]"),
    ({"methods": [{"kind": "dreambooth", "checkpoint": "tiny", "weights": [NAN]}]}, "methods[0].weights[0]"),
    ({"lora": [{"path": "tiny", "weight": NAN}]}, "lora[0].weight"),
    ({"lora": [{"path": "tiny", "weight": 5}]}, "lora[0].weight"),
    ({"methods": [{"kind": "baseline", "weights": [1.0]}]}, "methods[0].weights[0]"),
    # free text: bounded, and text rather than a list
    ({"name": "n" * 201}, "name"),
    ({"description": "d" * 5001}, "description"),
    ({"description": ["a", "list"]}, "description"),
    ({"scheduler": "x" * 10000}, "scheduler"),  # the message quotes the start of it only
    ({"subject": {"reference_images": ["r" * 300]}}, "subject.reference_images[0]"),  # a name too long for a file
    ({"prompts": ["a {class} " + "x" * 1000]}, "prompts[0]"),
    ({"negative_prompt": "x" * 1001}, "negative_prompt"),
    ({"subject": {"reference_images": [], "token": "t" * 101}}, "subject.token"),
    ({"subject": {"reference_images": [], "class_noun": "c" * 101}}, "subject.class_noun"),
    ({"methods": [{"kind": "baseline", "label": "l" * 101}]}, "methods[0].label"),
    ({"methods": [{"kind": "textual_inversion", "embedding": "tiny", "token": "<" + "t" * 100 + ">"}]},
     "methods[0]: token"),
]


@pytest.mark.parametrize("overrides, field", BAD_VALUES, ids=[f"{f}={str(o)[:40]}" for o, f in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_naming_its_field(overrides, field):
    with pytest.raises(StudyError) as refused:
        parse_study(tiny_study(**overrides))
    message = str(refused.value)
    assert message.startswith(f"<study>: {field}"), message
    assert "\n" not in message and len(message) < 400, message


def test_numbers_at_the_edges_of_their_ranges_are_accepted():
    study = parse_study(tiny_study(
        seeds=[0, 2**64 - 1], steps=1000, size=[8, 2048], guidance=1, max_cells=1_000_000,
        lora=[{"path": "tiny", "weight": -2}],
        methods=[{**IP, "weights": [0, 2]}, {"kind": "lora", "path": "tiny", "weights": [-2, 2.0]}]))
    assert study.seeds == (0, 2**64 - 1) and study.steps == 1000 and study.size == (8, 2048)
    assert parse_study(tiny_study(steps=30.0)).steps == 30


def test_the_weight_range_is_stated_by_each_method_class():
    from workbench.methods import METHODS

    for kind, cls in METHODS.items():
        low, high = cls.weight_range
        assert low <= high, kind
    with pytest.raises(StudyError, match=r"methods\[0\]\.weights\[0\]: .*from 0 to 2 for ip_adapter"):
        parse_study(tiny_study(methods=[{**IP, "weights": [2.5]}]))


def _bomb(indent: str) -> str:
    """Nine levels of nine aliases, each to the level below: 9**9 strings once expanded (under 600 bytes)."""
    levels = [f'{indent}- &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"{indent}- &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(levels)


BOMBS = {
    "description": "name: bomb\nbase: tiny\nprompts: ['a {class}']\ndescription:\n" + _bomb("  "),
    "block_scales": ("name: bomb\nbase: tiny\nprompts: ['a {class}']\nsubject: {reference_images: [assets/chelsea.png]}\n"
                     "methods:\n  - kind: ip_adapter\n    adapter: tiny\n    weights: [0.5]\n    block_scales:\n"
                     "      up:\n        block_0:\n" + _bomb("          ")),
}


@pytest.mark.parametrize("field", BOMBS)
def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path, field):
    import time

    text = BOMBS[field]
    assert len(text.encode()) < 900
    preset = tmp_path / "bomb.yaml"
    preset.write_text(text)
    started = time.perf_counter()
    with pytest.raises(StudyError, match=r"bomb\.yaml: refused: aliases .* expand to more than 10000 values"):
        load_study(preset)
    with pytest.raises(StudyError, match=r"<study>: refused: aliases"):
        parse_study(text)
    assert time.perf_counter() - started < 0.5


def test_a_recursive_alias_is_refused():
    with pytest.raises(StudyError, match=r"refused: an alias refers to a node that contains it"):
        parse_study("name: loop\ndescription: &a [*a]\n")


def test_deep_nesting_is_refused_not_a_recursion_error():
    with pytest.raises(StudyError, match=r"refused: nested deeper than 32 levels"):
        parse_study("description: " + "[" * 5000 + "]" * 5000)


def test_a_preset_over_1_mb_is_refused_unread(tmp_path):
    preset = tmp_path / "huge.yaml"
    preset.write_text("description: '" + "x" * (1 << 20) + "'\n")
    with pytest.raises(StudyError, match=r"huge\.yaml: 1\.0 MB, more than the 1 MB a study may have"):
        load_study(preset)


def test_every_yaml_entry_point_uses_the_safe_loader(tmp_path):
    from workbench.app.workbench import read_yaml
    from workbench.export import saved_study

    (tmp_path / "study.yaml").write_text(BOMBS["description"])
    with pytest.raises(StudyError, match="refused: aliases"):
        saved_study(tmp_path)
    with pytest.raises(StudyError, match="refused: aliases"):
        read_yaml(BOMBS["description"])


def test_cli_refuses_a_nan_weight_with_one_line_and_a_nonzero_exit(tmp_path):
    import subprocess
    import sys

    preset = tmp_path / "nan.yaml"
    preset.write_text(f"name: nan\nbase: tiny\nprompts: ['a {{class}}']\nsize: 32\nsteps: 2\n"
                      f"subject: {{reference_images: [{REPO / 'assets/chelsea.png'}], class_noun: cat}}\n"
                      "methods:\n  - kind: ip_adapter\n    adapter: tiny\n    weights: [.nan]\n")
    done = subprocess.run([sys.executable, "-m", "workbench", "run", str(preset), "--out", str(tmp_path / "out"),
                           "--no-score"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {preset}: methods[0].weights[0]: expected a finite number, got nan"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifest_json_stays_strict_json_when_a_value_is_nan(tmp_path, tiny_base):
    import json

    from workbench.runner import run_study

    def refuse(constant):
        raise ValueError(f"bare {constant} in manifest.json")

    # a manifest written before weights were checked holds a bare NaN in an earlier run's record
    (tmp_path / "manifest.json").write_text('{"runs": [{"generated": 1, "scoring_to_generation_ratio": NaN}]}')
    study = parse_study(tiny_study(seeds=[0]))
    run_study(study, tmp_path, loaded=tiny_base, score=False, show_progress_bar=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["runs"][0]["scoring_to_generation_ratio"] is None
    assert manifest["study"]["seeds"] == [0]
