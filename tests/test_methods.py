"""Each method leaves the shared pipeline exactly as a fresh one: processors, tokens, weights."""

import pytest
import torch
from conftest import tiny_study

from workbench.methods import attached
from workbench.spec import parse_study

METHODS = {
    "ip_adapter": {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5]},
    "lora": {"kind": "lora", "path": "tiny", "weights": [1.0]},
    "textual_inversion": {"kind": "textual_inversion", "embedding": "tiny", "token": "<kitty>"},
    "dreambooth": {"kind": "dreambooth", "checkpoint": "tiny", "weights": [0.5]},
}


def snapshot(pipe):
    return {
        "processors": {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()},
        "tokenizer": len(pipe.tokenizer),
        "embeddings": pipe.text_encoder.get_input_embeddings().weight.shape,
        "unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()},
        "text_encoder": pipe.text_encoder.get_input_embeddings().weight.clone(),
        "modules": (id(pipe.unet), id(pipe.text_encoder)),
        "image_encoder": getattr(pipe, "image_encoder", None),
    }


def assert_same(after, before):
    assert after["processors"] == before["processors"]
    assert after["tokenizer"] == before["tokenizer"]
    assert after["embeddings"] == before["embeddings"]
    assert after["modules"] == before["modules"]
    assert after["image_encoder"] is before["image_encoder"]
    assert after["unet"].keys() == before["unet"].keys()
    for key, value in before["unet"].items():
        assert torch.equal(after["unet"][key], value), key
    assert torch.equal(after["text_encoder"], before["text_encoder"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_leaves_the_pipeline_as_found(name, tiny_base):
    pipe = tiny_base.pipe
    study = parse_study(tiny_study(methods=[METHODS[name]]))
    spec = study.methods[0]
    before = snapshot(pipe)
    with attached(spec.method, pipe, study) as attachment:
        kwargs = attachment.call_kwargs(list(spec.weights))
        during = snapshot(pipe)
        attached_something = any(during[k] != before[k] for k in ("processors", "tokenizer", "modules"))
        assert attached_something or getattr(pipe.unet, "peft_config", None), name
    assert_same(snapshot(pipe), before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_released_even_when_the_block_raises(name, tiny_base):
    pipe = tiny_base.pipe
    study = parse_study(tiny_study(methods=[METHODS[name]]))
    before = snapshot(pipe)
    with pytest.raises(RuntimeError):
        with attached(study.methods[0].method, pipe, study) as attachment:
            attachment.call_kwargs(list(study.methods[0].weights))
            raise RuntimeError("cell failed")
    assert_same(snapshot(pipe), before)


def test_study_loras_stack_with_a_subject_lora_and_unload(tiny_base, tmp_path):
    from workbench.runner import run_study

    pipe = tiny_base.pipe
    before = snapshot(pipe)
    data = tiny_study(lora=[{"path": "tiny", "weight": 0.5}], seeds=[0],
                      methods=[{"kind": "baseline"}, METHODS["lora"]])
    result = run_study(parse_study(data), tmp_path, loaded=tiny_base, show_progress_bar=False)
    assert result.complete
    assert_same(snapshot(pipe), before)
    plain = run_study(parse_study(tiny_study(seeds=[0])), tmp_path / "plain", loaded=tiny_base, show_progress_bar=False)
    import numpy as np
    from PIL import Image

    with_lora = np.asarray(Image.open(result.results[0].image_path))
    without = np.asarray(Image.open(plain.results[0].image_path))
    assert not np.array_equal(with_lora, without)


def test_instantstyle_block_scales_apply_only_to_the_named_blocks(tiny_base, tmp_path):
    import numpy as np
    from PIL import Image

    from workbench.runner import run_study

    def image(method):
        study = parse_study(tiny_study(seeds=[0], methods=[method]))
        result = run_study(study, tmp_path / str(len(list(tmp_path.iterdir()))), loaded=tiny_base,
                           show_progress_bar=False, score=False)
        return np.asarray(Image.open(result.results[0].image_path))

    plain = image({"kind": "ip_adapter", "adapter": "tiny", "weights": [1.0]})
    up_only = image({"kind": "ip_adapter", "adapter": "tiny", "weights": [1.0],
                     "block_scales": {"up": {"block_0": [1.0, 1.0]}}})
    nowhere = image({"kind": "ip_adapter", "adapter": "tiny", "weights": [1.0],
                     "block_scales": {"up": {"block_0": [0.0, 0.0]}}})
    baseline = image({"kind": "baseline"})
    assert not np.array_equal(up_only, plain) and not np.array_equal(up_only, baseline)
    assert np.array_equal(nowhere, baseline)


@pytest.mark.parametrize("block_scales, where", [
    ({"up": {1: [1.0]}}, "block_scales.up: '1'"),
    ({"up": {"block_0": [[]]}}, r"block_scales.up.block_0\[0\]"),
    ({"up": {"block_0": [{}]}}, r"block_scales.up.block_0\[0\]"),
    ({"up": {"block_0": []}}, "block_scales.up.block_0"),
    ({"mid": {"block_0": 1.0}}, "block_scales.mid"),
    ({"up": {"block_x": 1.0}}, "block_scales.up: 'block_x'"),
])
def test_block_scales_of_another_shape_are_refused_naming_the_place(block_scales, where):
    from workbench.errors import StudyError

    with pytest.raises(StudyError, match=rf"methods\[0\]: {where}"):
        parse_study(tiny_study(methods=[{"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5],
                                         "block_scales": block_scales}]))


def test_block_scales_naming_a_block_without_attention_are_refused_before_a_cell(tiny_base):
    from workbench.errors import StudyError

    unet = tiny_base.pipe.unet
    without = next(i for i, block in enumerate(unet.up_blocks) if not hasattr(block, "attentions"))
    study = parse_study(tiny_study(methods=[{"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5],
                                             "block_scales": {"up": {f"block_{without}": 1.0}}}]))
    with pytest.raises(StudyError, match=rf"block_scales.up.block_{without}: .*no attention layers"):
        with attached(study.methods[0].method, tiny_base.pipe, study):
            pass
    assert not any(type(p).__name__.startswith("IPAdapter") for p in tiny_base.pipe.unet.attn_processors.values())
