"""A weight sweep in one batch equals its cells one at a time; out of memory shrinks the batch.

On CPU a batch of N runs other matmul kernels than a batch of 1 (gemm, not gemv), so batched
images equal single-cell images within a tolerance, not bit for bit. Measured on the tiny models
(2-10 steps, SD1.5- and SDXL-shaped, IP-Adapter and LoRA sweeps [0, 0.5, 1]): the float image before
quantisation differs by at most 1.7e-6 (of a [0, 1] range) and the 8-bit PNG by at most 1 level.
The bounds below leave a margin over that; benchmarks/README.md records the same numbers.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_study

from workbench.methods import attached
from workbench.generate import BatchFit, generate_batch
from workbench.runner import run_study
from workbench.spec import parse_study

FLOAT_TOLERANCE = 1e-5  # max |batched - single| of the float image in [0, 1]; measured 1.7e-6
UINT8_TOLERANCE = 1  # max |batched - single| of the 8-bit image; measured 1
WEIGHTS = [0.0, 0.5, 1.0]
IP_ADAPTER = {"kind": "ip_adapter", "adapter": "tiny", "weights": WEIGHTS}
LORA = {"kind": "lora", "path": "tiny", "weights": WEIGHTS}


def sweep(pipe, study, method_index=0, batch=True) -> dict:
    """{(weight, seed): float image [H, W, 3] in [0, 1]} of one method, as one batch or cell by cell."""
    spec = study.methods[method_index]
    cells = [c for c in study.cells() if c.method_index == method_index]
    with attached(spec.method, pipe, study) as attachment:
        if batch:
            images, _ = generate_batch(pipe, study, cells, attachment, None, output_type="np")
        else:
            images = [generate_batch(pipe, study, [c], attachment, None, output_type="np")[0][0] for c in cells]
    return {(c.weight, c.seed): image for c, image in zip(cells, images)}


def assert_close(batched: dict, single: dict):
    assert batched.keys() == single.keys()
    for key in single:
        difference = np.abs(batched[key] - single[key]).max()
        assert difference <= FLOAT_TOLERANCE, (key, difference)
        as_8bit = np.abs(np.round(batched[key] * 255) - np.round(single[key] * 255)).max()
        assert as_8bit <= UINT8_TOLERANCE, (key, as_8bit)


@pytest.mark.parametrize("method", [IP_ADAPTER, LORA], ids=["ip_adapter", "lora"])
def test_weight_sweep_in_one_batch_equals_each_weight_alone(method, tiny_base):
    study = parse_study(tiny_study(seeds=[0, 1], methods=[method]))
    batched = sweep(tiny_base.pipe, study)
    single = sweep(tiny_base.pipe, study, batch=False)
    assert_close(batched, single)
    # The sweep is a sweep: each weight changes the image.
    assert not np.array_equal(batched[(0.5, 0)], batched[(1.0, 0)])
    assert not np.array_equal(batched[(0.0, 0)], batched[(0.5, 0)])


@pytest.mark.parametrize("method", [IP_ADAPTER, LORA], ids=["ip_adapter", "lora"])
def test_mixing_weights_in_a_batch_is_exact(method, tiny_base):
    # Per-sample scales add no error of their own: a mixed batch equals, bit for bit, batches of one
    # weight each. The tolerance above is only batch-of-1 against batch-of-N kernels.
    study = parse_study(tiny_study(seeds=[0, 1, 2, 3], methods=[method]))
    mixed = sweep(tiny_base.pipe, study)
    for weight in WEIGHTS:
        alone = parse_study(tiny_study(seeds=[0, 1, 2, 3], methods=[dict(method, weights=[weight])]))
        for key, image in sweep(tiny_base.pipe, alone).items():
            assert np.array_equal(image, mixed[key]), key


def test_ip_adapter_weight_zero_in_a_mixed_batch_is_the_baseline(tiny_base):
    study = parse_study(tiny_study(seeds=[0, 1], methods=[{"kind": "baseline"}, IP_ADAPTER]))
    baseline = sweep(tiny_base.pipe, study, method_index=0, batch=False)
    batched = sweep(tiny_base.pipe, study, method_index=1)
    assert_close({key: batched[key] for key in baseline}, baseline)
    # Alone, weight 0 is the baseline bit for bit (the runner's promise at batch size 1).
    alone = sweep(tiny_base.pipe, study, method_index=1, batch=False)
    assert all(np.array_equal(alone[key], baseline[key]) for key in baseline)


def test_sdxl_weight_sweep_in_one_batch_equals_each_weight_alone(tiny_xl_pipe):
    study = parse_study(tiny_study(base="tiny-xl", seeds=[0], methods=[IP_ADAPTER, LORA]))
    for index in (0, 1):
        assert_close(sweep(tiny_xl_pipe, study, index), sweep(tiny_xl_pipe, study, index, batch=False))


def test_batched_run_writes_the_images_of_a_cell_by_cell_run(tmp_path, tiny_base):
    study = parse_study(tiny_study(seeds=[0, 1], methods=[{"kind": "baseline"}, IP_ADAPTER, LORA]))
    single = run_study(study, tmp_path / "single", loaded=tiny_base, batch_size=1, show_progress_bar=False, score=False)
    batched = run_study(study, tmp_path / "batched", loaded=tiny_base, batch_size=8, show_progress_bar=False,
                        score=False)
    assert batched.complete and batched.generated == single.generated == 12  # 14 cells; IP-Adapter@0 = baseline
    for one, many in zip(single.results, batched.results):
        assert one.key == many.key
        difference = np.abs(png(one.image_path) - png(many.image_path)).max()
        assert difference <= UINT8_TOLERANCE, (one.method, one.cell.weight, one.cell.seed, difference)


def png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


def test_mixed_lora_weights_leave_no_hook_and_the_pipeline_as_found(tiny_base):
    from test_methods import assert_same, snapshot

    pipe = tiny_base.pipe
    study = parse_study(tiny_study(methods=[LORA]))
    before = snapshot(pipe)
    with attached(study.methods[0].method, pipe, study) as attachment:
        attachment.call_kwargs([0.0, 0.5, 1.0])
        assert attachment.hooks
        attachment.call_kwargs([1.0])  # a one-weight batch after a mixed one: no hook left behind
        assert not attachment.hooks and not any(m._forward_hooks for m in pipe.unet.modules())
        attachment.call_kwargs([0.5, 1.0])
    assert not any(m._forward_hooks for m in pipe.unet.modules())
    assert_same(snapshot(pipe), before)


def test_lora_with_text_encoder_layers_runs_one_weight_per_call(tiny_base, tmp_path):
    path = text_encoder_lora(tmp_path)
    study = parse_study(tiny_study(seeds=[0], methods=[{"kind": "lora", "path": str(path), "weights": WEIGHTS}]))
    with attached(study.methods[0].method, tiny_base.pipe, study) as attachment:
        assert not attachment.per_sample_weights
        with pytest.raises(ValueError, match="one weight per batch"):
            attachment.call_kwargs([0.5, 1.0])
    # generate_batch splits the mixed batch by weight, so the sweep still equals its cells one at a time.
    assert_close(sweep(tiny_base.pipe, study), sweep(tiny_base.pipe, study, batch=False))


def text_encoder_lora(folder):
    """A LoRA on the tiny UNet and text encoder, saved the way diffusers' training scripts save one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from workbench.tiny import tiny_pipeline_dir

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir("tiny"), subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline_dir("tiny"), subfolder="text_encoder")
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    # peft itself, as diffusers' loader does: transformers' own add_adapter asks for a newer peft than the lock's
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                            text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder, save_embedding_layers=False)),
        weight_name="lora_te.safetensors")
    return folder / "lora_te.safetensors"


def fail_when_larger_than(limit, monkeypatch, pipe):
    """Make pipeline calls of more than `limit` images raise CUDA's out-of-memory error; return the call sizes."""
    sizes = []
    original = type(pipe).__call__

    def call(self, *args, **kwargs):
        sizes.append(len(kwargs["generator"]))
        if sizes[-1] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    return sizes


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size(tmp_path, tiny_base, monkeypatch):
    study = parse_study(tiny_study(seeds=[0, 1], methods=[IP_ADAPTER],
                                   prompts=["a photo of a {subject} {class}", "a {class} on the beach"]))
    reference = run_study(study, tmp_path / "reference", loaded=tiny_base, batch_size=1, show_progress_bar=False,
                          score=False)
    sizes = fail_when_larger_than(2, monkeypatch, tiny_base.pipe)
    with pytest.warns(UserWarning, match="out of GPU memory"):
        result = run_study(study, tmp_path / "run", loaded=tiny_base, batch_size=6, show_progress_bar=False,
                           score=False)
    assert result.complete and result.generated == 12
    # 6 fails, 3 fails, then batches of 1; the second prompt starts at the size that fitted.
    assert sizes == [6, 3] + [1] * 12
    for one, other in zip(reference.results, result.results):
        assert np.array_equal(png(one.image_path), png(other.image_path))


def test_a_single_cell_out_of_memory_fails_the_study(tmp_path, tiny_base, monkeypatch):
    fail_when_larger_than(0, monkeypatch, tiny_base.pipe)
    study = parse_study(tiny_study(seeds=[0, 1]))
    with pytest.warns(UserWarning, match="retrying at 1"), pytest.raises(torch.cuda.OutOfMemoryError):
        run_study(study, tmp_path, loaded=tiny_base, batch_size=2, show_progress_bar=False, score=False)


def test_batch_fit_splits_a_batch_into_calls_of_its_size(tiny_base, monkeypatch):
    sizes = fail_when_larger_than(100, monkeypatch, tiny_base.pipe)
    study = parse_study(tiny_study(seeds=[0, 1, 2], methods=[LORA]))
    with attached(study.methods[0].method, tiny_base.pipe, study) as attachment:
        images, _ = generate_batch(tiny_base.pipe, study, study.cells(), attachment, None, BatchFit(4))
    assert len(images) == 9 and sizes == [4, 4, 1]


@pytest.fixture(scope="module")
def tiny_xl_pipe():
    from workbench.models import load_pipeline_uncached

    return load_pipeline_uncached("tiny-xl", dtype=torch.float32, device="cpu")
