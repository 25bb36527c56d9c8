"""Full-size SD1.5 and SDXL built from their published configs with random weights, for the benchmark.

A UNet's speed does not depend on its weights' values, so these stand in for the real checkpoints
without a download. The configs are those of stable-diffusion-v1-5/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text encoders), h94/IP-Adapter's ViT-H image
encoder, open_clip ViT-B-32 and facebook/dino-vits16. The IP-Adapter (4 image tokens, as
ip-adapter_sd15 / ip-adapter_sdxl_vit-h) and a rank-16 UNet LoRA are written to the workbench cache
in the layouts diffusers' own loaders read, so the benchmark runs the real loading code.
"""

from __future__ import annotations

import torch

from workbench.tiny import _build_once, write_clip_tokenizer

ARCHES = ("sd15", "sdxl")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
SD15_VAE = dict(VAE, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # fp32 decode under fp16
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280)
VIT_H_IMAGE_ENCODER = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   image_size=224, patch_size=16, qkv_bias=True)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 set_alpha_to_one=False, skip_prk_steps=True, num_train_timesteps=1000)
IP_ADAPTER_TOKENS = 4
LORA_RANK = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_model(cls, config: dict, device: str, dtype: torch.dtype):
    """`cls(**config)` with PyTorch's default init, made directly in `dtype` on `device` (no fp32 copy)."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model.eval()


def _text_config(values: dict, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **values, **extra)


def build_pipeline(arch: str, device: str, dtype: torch.dtype):
    """A full-size `arch` pipeline with random weights, on `device` in `dtype`; seeded, so repeatable."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHES)})")
    tokenizer = CLIPTokenizer.from_pretrained(_build_once("bench-clip-tokenizer", write_clip_tokenizer))
    scheduler = PNDMScheduler(**SCHEDULER)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        xl = arch == "sdxl"
        unet = random_model(UNet2DConditionModel, SDXL_UNET if xl else SD15_UNET, device, dtype)
        vae = random_model(AutoencoderKL, SDXL_VAE if xl else SD15_VAE, device, dtype)
        text_encoder = CLIPTextModel._from_config(_text_config(CLIP_L_TEXT), dtype=dtype).eval()
        if xl:
            text_encoder_2 = CLIPTextModelWithProjection._from_config(_text_config(OPENCLIP_BIGG_TEXT),
                                                                      dtype=dtype).eval()
            pipe = StableDiffusionXLPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer, unet, scheduler,
                                             add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _cross_attention_sizes(unet) -> list[int]:
    """Output size of each cross-attention's to_k, in the order diffusers numbers IP-Adapter keys."""
    return [unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            for name in unet.attn_processors if not name.endswith("attn1.processor")]


def write_ip_adapter(arch: str, unet) -> str:
    """`folder:models/ip-adapter_<arch>.safetensors`: 4-token IP-Adapter weights + a ViT-H image encoder."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    name = f"ip-adapter_{arch}.safetensors"

    def write(folder):
        cross = unet.config.cross_attention_dim
        embed = VIT_H_IMAGE_ENCODER["projection_dim"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            encoder = CLIPVisionModelWithProjection._from_config(CLIPVisionConfig(**VIT_H_IMAGE_ENCODER),
                                                                 dtype=torch.bfloat16)
        encoder.save_pretrained(folder / "models" / "image_encoder", safe_serialization=True)
        generator = torch.Generator().manual_seed(2)
        tensors = {
            "image_proj.proj.weight": torch.randn(cross * IP_ADAPTER_TOKENS, embed, generator=generator) * 0.02,
            "image_proj.proj.bias": torch.zeros(cross * IP_ADAPTER_TOKENS),
            "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross),
        }
        for index, hidden in enumerate(_cross_attention_sizes(unet)):
            for key in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{2 * index + 1}.{key}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.02
        save_file({k: v.to(torch.float16) for k, v in tensors.items()}, folder / "models" / name)

    return f"{_build_once(f'bench-{arch}-ip-adapter', write)}:models/{name}"


def write_lora(arch: str, unet) -> str:
    """Path of a rank-16 LoRA on the UNet's attention projections (peft key layout), non-zero A and B."""
    from diffusers import StableDiffusionPipeline

    def write(folder):
        generator = torch.Generator().manual_seed(3)
        layers = {}
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
                layers[f"{name}.lora_A.weight"] = torch.randn(LORA_RANK, module.in_features, generator=generator) * 0.01
                layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.01
        layers = {k: v.to(torch.float16) for k, v in layers.items()}
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name="lora.safetensors")

    return str(_build_once(f"bench-{arch}-lora", write) / "lora.safetensors")


def scoring_backbones() -> tuple[tuple[str, str], str]:
    """(open_clip name, weights file) of a random ViT-B-32 and the folder of a random DINO ViT-S/16."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    def write_clip(folder):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            model = open_clip.create_model("ViT-B-32")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")

    def write_dino(folder):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            ViTModel(ViTConfig(**DINO_VITS16), add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)

    clip = _build_once("bench-clip-vit-b-32", write_clip) / "open_clip_model.safetensors"
    return ("ViT-B-32", str(clip)), str(_build_once("bench-dino-vits16", write_dino))
