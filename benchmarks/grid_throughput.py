"""Grid throughput: a plain diffusers loop against the workbench's batched runner, in one process.

    python benchmarks/grid_throughput.py --arch tiny            # CPU smoke test, tiny random models
    python benchmarks/grid_throughput.py --arch sd15            # full-size SD1.5, 512 px, 30 steps
    python benchmarks/grid_throughput.py --arch sdxl            # full-size SDXL, 1024 px

(a) naive: one image per pipeline call, the adapter's scale re-set for every cell, the IP-Adapter
    reference re-encoded every call, each image saved and scored as it comes (what a plain diffusers
    loop, A1111's X/Y/Z plot or a ComfyUI XY plot does);
(b) batched: `run_study(..., batch_size=B)`: all cells of one prompt and method in one call, a
    weight per sample, text and image embeddings computed once, scoring batched per call.

Both generate the same grid (prompts x methods x weights x seeds) from the same seeds, save PNGs and
score CLIP-I, CLIP-T and DINO. sd15/sdxl are built from their published configs with random weights
(benchmarks/architectures.py): nothing is downloaded, and speed does not depend on the values.
UNet FLOPs are counted with torch.utils.flop_counter for one forward of one latent and multiplied
by the latents the UNet actually saw (CFG doubles them); UNet seconds are measured around every
UNet forward (CUDA events on GPU). The last line is `speedup_vs_naive=X.XX` (naive wall / batched wall).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from workbench.generate import default_batch_size  # noqa: E402
from workbench.images import load_image  # noqa: E402
from workbench.models import LoadedBase, load_base, make_scheduler  # noqa: E402
from workbench.run_scores import ScoringSpec, load_scorer  # noqa: E402
from workbench.runner import run_study  # noqa: E402
from workbench.spec import parse_study  # noqa: E402

REFERENCE = REPO / "assets" / "chelsea.png"
PROMPTS = ["a photo of a {subject} {class}", "a {subject} {class} on the beach", "a {subject} {class} in the snow",
           "a {subject} {class} wearing a red hat"]
METRICS = ("clip_i", "clip_t", "dino")
DEFAULTS = {"tiny": dict(size=32, steps=30), "sd15": dict(size=512, steps=30), "sdxl": dict(size=1024, steps=30)}
# InstantStyle: the IP-Adapter only in the style layers of the first attention up block.
INSTANTSTYLE = {"tiny": {"up": {"block_0": [0.0, 1.0]}}, "sd15": {"up": {"block_1": [0.0, 1.0, 0.0]}},
                "sdxl": {"up": {"block_0": [0.0, 1.0, 0.0]}}}
# Dense bf16/fp16 tensor-core peaks, TFLOP/s, by a part of the device name (first match wins).
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2), ("A10G", 70.0)]


@dataclass
class Row:
    name: str
    images: int
    wall: float
    unet_seconds: float
    unet_flops: float
    peak_memory: str
    scoring_seconds: float
    max_pixel_difference: int | None = None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30)")
    parser.add_argument("--size", type=int, help="image side in pixels (tiny 32, sd15 512, sdxl 1024)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per cell column")
    parser.add_argument("--weights", default="0,0.25,0.5,1", help="comma-separated weights of every method")
    parser.add_argument("--methods", default="ip_adapter,lora,instantstyle",
                        help="comma-separated, from ip_adapter, lora, instantstyle (IP-Adapter in one block)")
    parser.add_argument("--prompts", type=int, default=1, help=f"how many prompts (1-{len(PROMPTS)})")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, help="cells per pipeline call (default: from free GPU memory; 16 on CPU)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", help="default cuda when present, else cpu")
    parser.add_argument("--no-score", action="store_true", help="generate only")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.steps = args.steps or DEFAULTS[args.arch]["steps"]
    args.size = args.size or DEFAULTS[args.arch]["size"]
    args.weights = [float(w) for w in args.weights.split(",")]
    args.methods = args.methods.split(",")
    return args


# ---------------------------------------------------------------- setup


def setup(args):
    """The loaded base, the study and the scoring spec for `args.arch`."""
    dtype = getattr(torch, args.dtype)
    if args.arch == "tiny":
        loaded = load_base("tiny", args.dtype, args.device)
        adapter, lora, scoring = "tiny", "tiny", ScoringSpec(METRICS, ("ViT-B-32", "tiny"), "tiny")
        base = "tiny"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import architectures
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()

        pipe = architectures.build_pipeline(args.arch, args.device, dtype)
        if args.device.startswith("cuda"):
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        base = f"benchmark/{args.arch}-random"
        scheduler = dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__)
        loaded = LoadedBase(pipe, {"benchmark": base}, scheduler, args.device, dtype)
        adapter = architectures.write_ip_adapter(args.arch, pipe.unet)
        lora = architectures.write_lora(args.arch, pipe.unet)
        clip, dino = architectures.scoring_backbones()
        scoring = ScoringSpec(METRICS, clip, dino)
    methods = {
        "ip_adapter": {"kind": "ip_adapter", "label": "ip_adapter", "adapter": adapter},
        "lora": {"kind": "lora", "label": "lora", "path": lora},
        "instantstyle": {"kind": "ip_adapter", "label": "instantstyle", "adapter": adapter,
                         "block_scales": INSTANTSTYLE[args.arch]},
    }
    study = parse_study({
        "name": f"grid-throughput-{args.arch}", "base": base,
        "subject": {"reference_images": [str(REFERENCE)], "token": "sks", "class_noun": "cat"},
        "prompts": PROMPTS[: args.prompts], "seeds": list(range(args.seeds)), "steps": args.steps,
        "guidance": args.guidance, "size": args.size, "dtype": args.dtype, "max_cells": 100_000,
        "methods": [dict(methods[name], weights=args.weights) for name in args.methods],
    }, base_dir=REPO)
    return loaded, study, scoring


# ---------------------------------------------------------------- measuring


class UNetMeter:
    """Seconds spent inside UNet forwards and the latents they processed (hooks; CUDA events on GPU)."""

    def __init__(self, unet, device: str):
        self.cuda = device.startswith("cuda")
        self.spans, self.rows = [], 0
        self.hooks = [unet.register_forward_pre_hook(self._start, with_kwargs=True),
                      unet.register_forward_hook(self._stop)]

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += sample.shape[0]
        self.spans.append([self._now(), None])

    def _stop(self, module, args, output):
        self.spans[-1][1] = self._now()

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(end - start for start, end in self.spans)

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def unet_flops_per_latent(pipe, study) -> int:
    """FLOPs of one UNet forward on one latent (a CFG step of one image is two), counted by torch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    height, width = (side // pipe.vae_scale_factor for side in study.size)
    sample = torch.zeros(1, unet.config.in_channels, height, width, device=device, dtype=dtype)
    context = torch.zeros(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device,
                          dtype=dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, device=device, dtype=dtype),
                                      "time_ids": torch.zeros(1, 6, device=device, dtype=dtype)}
    # The math backend spells attention as matmuls, which the counter sees on every device.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500, device=device), encoder_hidden_states=context, **extra)
    return counter.get_total_flops()


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def device_peak_tflops(device: str, dtype: str) -> float | None:
    if not device.startswith("cuda") or dtype == "float32":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- the two runs


def run_naive(loaded, study, scorer, out_dir: Path, flops_per_latent: int) -> tuple[Row, dict]:
    """One pipeline call per cell; adapters loaded once per method and re-set for every cell."""
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(loaded, study.scheduler)
    reference = load_image(str(REFERENCE))
    cfg = study.guidance > 1.0
    images, scoring_seconds = {}, 0.0
    reset_memory(loaded.device)
    meter = UNetMeter(pipe.unet, loaded.device)
    start = time.perf_counter()
    references = scorer.embed_references([reference]) if scorer else None
    for method_index, spec in enumerate(study.methods):
        method = spec.method
        if spec.method.kind == "ip_adapter":
            folder, name = os.path.split(method.adapter.filename)
            pipe.load_ip_adapter(method.adapter.repo, subfolder=folder, weight_name=name)
        elif spec.method.kind == "lora":
            pipe.load_lora_weights(method.path.repo, adapter_name="subject")
        for cell in (c for c in study.cells() if c.method_index == method_index):
            extra = {}
            if method.kind == "ip_adapter":
                block_scales = spec.method.options().get("block_scales")
                pipe.set_ip_adapter_scale(_scaled(block_scales, cell.weight) if block_scales else cell.weight)
                extra["ip_adapter_image"] = reference
            elif method.kind == "lora":
                pipe.set_adapters(["subject"], [cell.weight])
            image = pipe(prompt=study.render_prompt(cell), negative_prompt=study.negative_prompt if cfg else None,
                         num_inference_steps=study.steps, guidance_scale=study.guidance, height=study.size[0],
                         width=study.size[1], generator=torch.Generator("cpu").manual_seed(cell.seed),
                         **extra).images[0]
            image.save(out_dir / f"{spec.label}_p{cell.prompt_index}_w{cell.weight:g}_s{cell.seed}.png")
            images[(spec.label, cell.prompt_index, cell.weight, cell.seed)] = image
            if scorer:
                scored = time.perf_counter()
                embedded = scorer.embed_images([image], [study.scoring_prompt(cell.template)])
                scorer.score_embedded(embedded, references)
                scoring_seconds += time.perf_counter() - scored
        if spec.method.kind == "ip_adapter":
            pipe.unload_ip_adapter()
        elif spec.method.kind == "lora":
            pipe.unload_lora_weights()
    wall = time.perf_counter() - start
    meter.remove()
    row = Row("naive (diffusers loop, batch 1)", len(images), wall, meter.seconds(), flops_per_latent * meter.rows,
              peak_memory(loaded.device), scoring_seconds)
    return row, images


def _scaled(block_scales, weight):
    if isinstance(block_scales, dict):
        return {k: _scaled(v, weight) for k, v in block_scales.items()}
    if isinstance(block_scales, list):
        return [v * weight for v in block_scales]
    return block_scales * weight


def run_batched(loaded, study, scoring, batch_size: int, out_dir: Path, flops_per_latent: int,
                naive_images: dict | None) -> Row:
    reset_memory(loaded.device)
    meter = UNetMeter(loaded.pipe.unet, loaded.device)
    start = time.perf_counter()
    result = run_study(study, out_dir, loaded=loaded, batch_size=batch_size, show_progress_bar=False,
                       write_outputs=False, score=scoring is not None, scoring=scoring, device=loaded.device)
    wall = time.perf_counter() - start
    meter.remove()
    difference = None
    if naive_images:
        difference = max(
            int(np.abs(np.asarray(naive_images[(r.method, r.cell.prompt_index, r.cell.weight, r.cell.seed)], dtype=int)
                       - np.asarray(load_image(str(r.image_path)), dtype=int)).max())
            for r in result.results)
    # Every cell counts as delivered; cells sharing the baseline's image (weight 0) are made once.
    shared = len(result.results) - result.generated
    name = f"batched (run_study, batch {batch_size}" + (f"; {shared} weight-0 cells shared)" if shared else ")")
    return Row(name, len(result.results), wall, meter.seconds(),
               flops_per_latent * meter.rows, peak_memory(loaded.device), result.scoring_seconds, difference)


def warm_up(loaded, study, scoring, batch_size: int) -> None:
    """Load every adapter once and run each kernel shape once, so neither timed run pays first-call costs."""
    small = parse_study({**study.to_dict(), "seeds": list(study.seeds[:1]), "prompts": list(study.prompts[:1]),
                         "steps": 2, "methods": [dict(m, weights=m["weights"][:1]) for m in study.to_dict()["methods"]]},
                        base_dir=REPO)
    with tempfile.TemporaryDirectory() as folder:
        run_study(small, folder, loaded=loaded, batch_size=1, show_progress_bar=False, write_outputs=False,
                  score=scoring is not None, scoring=scoring, device=loaded.device)
    with tempfile.TemporaryDirectory() as folder:
        wide = parse_study({**small.to_dict(), "seeds": list(range(batch_size)), "methods": [{"kind": "baseline"}]},
                           base_dir=REPO)
        run_study(wide, folder, loaded=loaded, batch_size=batch_size, show_progress_bar=False, write_outputs=False,
                  score=False, device=loaded.device)


# ---------------------------------------------------------------- report


def table(rows: list[Row], device: str, dtype: str) -> str:
    peak = device_peak_tflops(device, dtype)
    unit, scale = ("TFLOP/s", 1e12) if device.startswith("cuda") else ("GFLOP/s", 1e9)
    header = ["run", "images", "wall s", "images/s", "UNet s", f"UNet {unit}", "% of peak", "peak memory",
              "scoring % of wall", "scoring images/s", "max Δ vs naive (8-bit)"]
    lines = [header]
    for row in rows:
        achieved = row.unet_flops / row.unet_seconds if row.unet_seconds else 0.0
        lines.append([
            row.name, str(row.images), f"{row.wall:.2f}", f"{row.images / row.wall:.2f}", f"{row.unet_seconds:.2f}",
            f"{achieved / scale:.1f}", f"{100 * achieved / (peak * 1e12):.0f}%" if peak else "—", row.peak_memory,
            f"{100 * row.scoring_seconds / row.wall:.1f}%",
            f"{row.images / row.scoring_seconds:.0f}" if row.scoring_seconds else "—",
            "—" if row.max_pixel_difference is None else str(row.max_pixel_difference),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    render = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    render.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(render)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    loaded, study, scoring = setup(args)
    scoring = None if args.no_score else scoring
    scorer = load_scorer(scoring, args.device) if scoring else None
    batch_size = args.batch_size or (default_batch_size(loaded, study) if args.device.startswith("cuda") else 16)
    flops = unet_flops_per_latent(loaded.pipe, study)
    grid = (f"{len(study.prompts)} prompt(s) x {len(study.methods)} methods x {len(args.weights)} weights x "
            f"{len(study.seeds)} seeds = {len(study.cells())} images")
    print(f"device: {device_name(args.device)}, {args.dtype}; arch {args.arch}, {study.size[0]} px, "
          f"{study.steps} steps, CFG {study.guidance}; {grid}")
    print(f"UNet: {flops / 1e9:.2f} GFLOP per latent per step (torch.utils.flop_counter); "
          f"scoring: {', '.join(METRICS) if scoring else 'off'}")
    warm_up(loaded, study, scoring, batch_size)
    with tempfile.TemporaryDirectory() as folder:
        naive, images = run_naive(loaded, study, scorer, Path(folder), flops)
    with tempfile.TemporaryDirectory() as folder:
        batched = run_batched(loaded, study, scoring, batch_size, Path(folder), flops, images)
    print(table([naive, batched], args.device, args.dtype))
    print(f"total benchmark time {time.perf_counter() - started:.0f} s (setup and warm-up included)")
    print(f"speedup_vs_naive={naive.wall / batched.wall:.2f}")


if __name__ == "__main__":
    main()
