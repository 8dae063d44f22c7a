"""Tiny Stable Diffusion and SDXL pipelines built from configs, for tests and benchmarks.

A few hundred kilobytes of random weights: the pictures are noise, but every component a real
sdxl-turbo has is there (two CLIP text encoders and byte-level BPE tokenizers, a UNet with
text-time conditioning, a VAE, a scheduler), saved with save_pretrained like a downloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def tiny_tokenizer(directory: Path):
    """A CLIPTokenizer over all 256 bytes plus a few merges, from vocab.json/merges.txt files."""
    from transformers import CLIPTokenizer

    merges = [("t", "h"), ("th", "e</w>"), ("s", "e"), ("se", "a</w>")]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _byte_chars():
        vocab[char] = len(vocab)
    for char in _byte_chars():
        vocab[char + "</w>"] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32)


def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        norm_num_groups=32, **extra)


def build_tiny_sd(root: Path) -> Path:
    """A Stable Diffusion 1.x-shaped pipeline (one CLIP text encoder) saved under root/pipe."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root / "vocab")
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        unet=_tiny_unet(cross_attention_dim=32),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def build_tiny_sdxl(root: Path) -> Path:
    """An SDXL-shaped pipeline like sdxl-turbo (two text encoders, text-time conditioning,
    Euler ancestral with trailing timesteps) saved under root/pipe."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root / "vocab")
    unet = _tiny_unet(
        cross_attention_dim=64, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)  # pooled text + six size numbers
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(
            beta_schedule="scaled_linear", timestep_spacing="trailing"))
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"
