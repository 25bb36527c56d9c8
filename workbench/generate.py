"""Generation: cells -> images in memory, batch by batch, one method attached at a time. No disk.

A batch is consecutive cells of one method and one prompt (and one weight, unless the method's
attachment mixes weights per sample). Every image has its own CPU generator seeded from its cell,
so a cell's image does not depend on the batch it ran in (bit for bit at batch size 1 on CPU).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .methods import attached
from .methods.lora import BaseLoras
from .models import LoadedBase, make_scheduler
from .spec import Cell, Study


class StopRequested(Exception):
    """Raised inside a pipeline call to abandon the batch when the user pressed Stop."""


@dataclass
class MethodStats:
    images: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


@dataclass
class BatchFit:
    """The most cells one pipeline call may take: the chosen batch size, halved at each out-of-memory error."""

    size: int


def default_batch_size(loaded: LoadedBase, study: Study) -> int:
    """1 on CPU (a cell then equals itself inside any run, bit for bit); on GPU, from free memory."""
    if not loaded.device.startswith("cuda"):
        return 1
    free, _ = torch.cuda.mem_get_info()
    pixels = study.size[0] * study.size[1] / (512 * 512)
    per_sample = 0.35e9 * pixels * (2.0 if loaded.is_sdxl else 1.0)
    return int(max(1, min(16, (free * 0.6) // per_sample)))


def batches(cells: list[Cell], mixes: bool, batch_size: int) -> Iterator[list[Cell]]:
    """Consecutive chunks of one prompt (and one weight, unless `mixes`), at most `batch_size` long."""
    group: list[Cell] = []
    for cell in cells:
        same = group and group[0].prompt_index == cell.prompt_index and (mixes or group[0].weight == cell.weight)
        if group and (not same or len(group) == batch_size):
            yield group
            group = []
        group.append(cell)
    if group:
        yield group


def generate_cells(loaded: LoadedBase, study: Study, cells: list[Cell], *, batch_size: int | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   stats: dict[str, MethodStats] | None = None) -> Iterator[tuple[list[Cell], list, float]]:
    """Generate `cells` method by method; yield (batch, its images in order, seconds) per batch.

    The study's LoRAs stay attached for the whole run, each method for its own cells; both are
    released when the generator ends, raises or is closed. `stats[label]` adds each finished batch
    (images, seconds, peak memory). Stop raises StopRequested from inside the batch in flight.
    """
    stats = {} if stats is None else stats
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(loaded, study.scheduler)
    with attached(_BaseLorasMethod(), pipe, study):
        for method_index, spec in enumerate(study.methods):
            todo = [cell for cell in cells if cell.method_index == method_index]
            if not todo:
                continue
            method_stats = stats.setdefault(spec.label, MethodStats())
            if loaded.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            fit = BatchFit(batch_size or default_batch_size(loaded, study))
            with attached(spec.method, pipe, study) as attachment:
                for batch in batches(todo, attachment.per_sample_weights, fit.size):
                    images, seconds = generate_batch(pipe, study, batch, attachment, should_stop, fit)
                    yield batch, images, seconds
                    method_stats.images += len(batch)
                    method_stats.seconds += seconds
                    method_stats.peak_memory_mb = max(method_stats.peak_memory_mb, peak_memory_mb(loaded.device))


class _BaseLorasMethod:
    """Adapter so the study-level LoRAs use the same attached(...) context as methods."""

    def attach(self, pipe, study):
        return BaseLoras(pipe, study)


def generate_batch(pipe, study: Study, batch: list[Cell], attachment, should_stop=None, fit: BatchFit | None = None,
                   output_type: str = "pil") -> tuple[list, float]:
    """The images of `batch` (cells of one method), in order, and the seconds they took.

    Pipeline calls take at most `fit.size` cells (and one weight per call when the attachment cannot
    mix weights). A call that runs out of GPU memory is retried at half the size, and `fit` keeps the
    smaller size for the rest of the method; only a single cell that does not fit fails the study.
    """
    start = time.perf_counter()
    fit = fit or BatchFit(len(batch))
    mixes = attachment.per_sample_weights  # the attachment decides, once loaded (a LoRA with text-encoder layers cannot)
    images: list = []
    while len(images) < len(batch):
        chunk = batch[len(images):len(images) + fit.size]
        if not mixes:
            chunk = [cell for cell in chunk if cell.weight == chunk[0].weight]
        out_of_memory = False
        try:
            images += _pipe_call(pipe, study, chunk, attachment, should_stop, output_type)
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the failed call's tensors are already released
            fit.size = len(chunk) // 2
            torch.cuda.empty_cache()
            warnings.warn(f"out of GPU memory at batch size {len(chunk)}; retrying at {fit.size}")
    return images, time.perf_counter() - start


def _pipe_call(pipe, study: Study, cells: list[Cell], attachment, should_stop, output_type: str) -> list:
    """One pipeline call for cells of one method: one CPU generator per image, seeded from its cell."""
    kwargs = attachment.call_kwargs([cell.weight for cell in cells])
    generators = [torch.Generator("cpu").manual_seed(cell.seed) for cell in cells]

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if should_stop is not None and should_stop():
            raise StopRequested()
        return callback_kwargs

    # no_grad, not inference_mode: under CPU offload the hooks move weights inside this block, and
    # inference tensors would then refuse the next set_adapters (peft sets requires_grad).
    with torch.no_grad():
        negative_prompt = study.negative_prompt if study.guidance > 1.0 else None
        kwargs.update(_prompt_embeds(pipe, [study.render_prompt(cell) for cell in cells], negative_prompt))
        output = pipe(
            num_inference_steps=study.steps,
            guidance_scale=study.guidance,
            height=study.size[0],
            width=study.size[1],
            generator=generators,
            callback_on_step_end=on_step_end,
            output_type=output_type,
            **kwargs,
        )
    return list(output.images)


def _prompt_embeds(pipe, prompts: list[str], negative_prompt: str | None) -> dict[str, torch.Tensor]:
    """Pipeline arguments with the text embeddings of `prompts`: each distinct prompt encoded once, alone.

    Encoding a prompt alone and repeating it per sample gives a sample the same embeddings in a
    batch of any size, and spares the text encoder a batch of copies.
    """
    device = pipe._execution_device
    cfg = negative_prompt is not None
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if hasattr(pipe, "text_encoder_2"):  # SDXL: two encoders, plus pooled embeddings
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    encoded = {}
    for prompt in dict.fromkeys(prompts):
        encoded[prompt] = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
    return {name: torch.cat([encoded[prompt][index] for prompt in prompts])
            for index, name in enumerate(names) if encoded[prompts[0]][index] is not None}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)
