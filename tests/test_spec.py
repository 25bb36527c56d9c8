"""Bad input fails before any generation, with one line naming the field."""

import pickle
from pathlib import Path

import pytest
from conftest import REPO, tiny_study

from workbench.errors import StudyError
from workbench.spec import load_study, parse_study


def test_every_shipped_preset_loads_and_every_kind_is_registered():
    from workbench.methods import METHODS

    presets = sorted((REPO / "presets").glob("*.yaml"))
    assert len(presets) >= 5
    for path in presets:
        study = load_study(path)
        assert study.cells(), path
        for spec in study.methods:
            assert spec.method.kind in METHODS


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
    from workbench.scoring import ScoringSpec

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
