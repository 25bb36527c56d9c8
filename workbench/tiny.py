"""Tiny random-weight models built from configs, for tests, CI and demos without a GPU.

Everything is written to a cache folder and loaded back through the same loader calls the real
models use (`from_pretrained`, `load_ip_adapter`, `load_lora_weights`, `load_textual_inversion`),
so the offline path exercises the real code. Builds are deterministic (fixed torch seeds) and
idempotent: a folder that exists is reused.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

TINY_VERSION = "v3"
TINY_BASES = ("tiny", "tiny-xl")
CLIP_VOCAB_SIZE = 49408


def cache_root() -> Path:
    """Folder for generated files: $WORKBENCH_CACHE, else ~/.cache/workbench."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))


def _build_once(name: str, write) -> Path:
    """Run write(tmp_dir) once and move the result to cache_root()/name atomically."""
    target = cache_root() / f"{name}-{TINY_VERSION}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable mapping (the same table open_clip's tokenizer builds)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_tokenizer(folder: Path) -> None:
    """Write vocab.json/merges.txt of the real CLIP tokenizer from the BPE file open_clip ships."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    tokenizer.save_pretrained(folder)


# The sizes of diffusers' own fast tests (StableDiffusionPipelineFastTests.get_dummy_components):
# UNet and VAE (4, 8) wide with 2 norm groups, text encoders 8 wide. The vocabulary stays real (49,408
# tokens) so the real CLIP tokenizer, prompts and textual-inversion tokens work unchanged. SDXL's
# second text encoder is wider than the first (16 against 8), as in the real model, so an embedding or
# a pooled vector that reaches the wrong encoder fails on its shape instead of passing unnoticed.
BLOCK_CHANNELS = (4, 8)  # the UNet's and the VAE's block widths
NORM_GROUPS = 2
TEXT_WIDTH = 8  # SD1.5's text encoder and SDXL's first (CLIP ViT-L's place)
TEXT_WIDTH_2 = 16  # SDXL's second text encoder (OpenCLIP ViT-bigG's place); also its pooled projection
TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim: each of the 6 size/crop numbers is embedded this wide
IMAGE_EMBED_DIM = 8  # the IP-Adapter image encoder's projection


def _text_encoder_config(width: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=list(BLOCK_CHANNELS), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=NORM_GROUPS,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def build_sd15_components(seed: int = 0) -> dict:
    """Components of a tiny SD1.5-shaped pipeline (the sizes of diffusers' own dummy components)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=BLOCK_CHANNELS, layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, norm_num_groups=NORM_GROUPS,
    )
    torch.manual_seed(seed)
    vae = _vae()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_encoder_config(TEXT_WIDTH))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=_scheduler(),
                safety_checker=None, feature_extractor=None, image_encoder=None)


def build_sdxl_components(seed: int = 0) -> dict:
    """Components of a tiny SDXL-shaped pipeline: two text encoders, text_time conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=BLOCK_CHANNELS, layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, transformer_layers_per_block=(1, 2),
        # the added condition: 6 embedded size/crop numbers and the second encoder's pooled prompt
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH_2,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,  # both encoders' hidden states, concatenated
        norm_num_groups=NORM_GROUPS,
    )
    torch.manual_seed(seed)
    vae = _vae()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_encoder_config(TEXT_WIDTH))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(TEXT_WIDTH_2, projection_dim=TEXT_WIDTH_2))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                scheduler=_scheduler(), image_encoder=None, feature_extractor=None)


def _write_pipeline(folder: Path, xl: bool, seed: int) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer")
    if xl:
        pipe = StableDiffusionXLPipeline(**build_sdxl_components(seed), tokenizer=tokenizer, tokenizer_2=tokenizer)
    else:
        pipe = StableDiffusionPipeline(**build_sd15_components(seed), tokenizer=tokenizer,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer")


@lru_cache(maxsize=None)
def tiny_pipeline_dir(base: str = "tiny", seed: int = 0) -> Path:
    """Folder of a saved tiny pipeline in diffusers format; seed != 0 gives a 'fine-tuned' variant."""
    xl = base == "tiny-xl"
    return _build_once(f"{base}-pipeline-s{seed}", lambda d: _write_pipeline(d, xl, seed))


def _cross_attention_hidden_sizes(unet) -> list[int]:
    """Hidden size of each cross-attention layer, in the order diffusers numbers IP-Adapter keys."""
    sizes = []
    channels = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            sizes.append(channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(channels))[int(name[len("up_blocks.")])])
        else:
            sizes.append(channels[int(name[len("down_blocks.")])])
    return sizes


def _write_ip_adapter(folder: Path, base: str) -> None:
    """An IP-Adapter repo laid out like h94/IP-Adapter: models/<weights>.safetensors + models/image_encoder."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir(base), subfolder="unet")
    cross_dim = unet.config.cross_attention_dim
    image_embed_dim = IMAGE_EMBED_DIM
    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, projection_dim=image_embed_dim, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, image_size=32, patch_size=8,
    ))
    encoder.save_pretrained(folder / "models" / "image_encoder", safe_serialization=True)
    generator = torch.Generator().manual_seed(2)
    tensors = {
        "image_proj.proj.weight": torch.randn(cross_dim * 4, image_embed_dim, generator=generator) * 0.2,
        "image_proj.proj.bias": torch.zeros(cross_dim * 4),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    for index, hidden in enumerate(_cross_attention_hidden_sizes(unet)):
        key_id = 2 * index + 1
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{name}.weight"] = torch.randn(hidden, cross_dim, generator=generator) * 0.3
    save_file(tensors, folder / "models" / "ip-adapter_tiny.safetensors")


@lru_cache(maxsize=None)
def tiny_ip_adapter(base: str = "tiny") -> str:
    """`repo:path` spec of a tiny IP-Adapter matching the tiny base, in h94/IP-Adapter layout."""
    folder = _build_once(f"{base}-ip-adapter", lambda d: _write_ip_adapter(d, base))
    return f"{folder}:models/ip-adapter_tiny.safetensors"


def _write_lora(folder: Path, base: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir(base), subfolder="unet")
    torch.manual_seed(3)
    # init_lora_weights=False: peft's default init makes B zero, a LoRA that changes nothing.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_class = StableDiffusionXLPipeline if base == "tiny-xl" else StableDiffusionPipeline
    pipeline_class.save_lora_weights(folder, unet_lora_layers=layers, weight_name="lora_tiny.safetensors")


@lru_cache(maxsize=None)
def tiny_lora(base: str = "tiny") -> str:
    """Path of a tiny UNet LoRA (.safetensors) with non-zero random A and B."""
    return str(_build_once(f"{base}-lora", lambda d: _write_lora(d, base)) / "lora_tiny.safetensors")


def _write_embedding(folder: Path, base: str) -> None:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(4)
    if base == "tiny-xl":
        tensors = {"clip_l": torch.randn(1, TEXT_WIDTH, generator=generator),
                   "clip_g": torch.randn(1, TEXT_WIDTH_2, generator=generator)}
    else:
        tensors = {"emb_params": torch.randn(1, TEXT_WIDTH, generator=generator)}
    save_file(tensors, folder / "embedding_tiny.safetensors")


@lru_cache(maxsize=None)
def tiny_embedding(base: str = "tiny") -> str:
    """Path of a tiny textual-inversion embedding (SD1.5 single tensor; SDXL clip_l/clip_g)."""
    return str(_build_once(f"{base}-embedding", lambda d: _write_embedding(d, base)) / "embedding_tiny.safetensors")


def tiny_dreambooth(base: str = "tiny") -> str:
    """Folder of a tiny 'fine-tuned' full pipeline: the same architecture with other weights."""
    return str(tiny_pipeline_dir(base, seed=5))


TINY_RESOURCES = {
    "ip_adapter": tiny_ip_adapter,
    "lora": tiny_lora,
    "embedding": tiny_embedding,
    "dreambooth": tiny_dreambooth,
}


def resolve_tiny(kind: str, base: str) -> str:
    """The path of tiny resource `kind` for a tiny base (what `tiny` means in a preset field)."""
    if base not in TINY_BASES:
        raise ValueError(f"'tiny' {kind} weights only fit a tiny base (tiny, tiny-xl), not {base!r}")
    return TINY_RESOURCES[kind](base)
