"""Tiny diffusers pipelines with random weights, built from small configs and saved as safetensors
(no downloads; see shared/docs/DIFFUSERS.md). Random weights are fine for equivalence, NFE and
round-trip tests; they say nothing about quality.

- ``build_ddpm``: ``DDPMPipeline`` (``UNet2DModel``, 3x8x8, DDPM linear betas, epsilon).
- ``build_sd``: ``StableDiffusionPipeline`` (``UNet2DConditionModel`` with cross-attention dim 32,
  ``CLIPTextModel`` with a tiny character vocabulary, ``AutoencoderKL`` with one block, so the
  latents have the image's height and width), ``scaled_linear`` betas as Stable Diffusion 1.x.
- ``build_flow``: ``DDPMPipeline`` with a ``FlowMatchEulerDiscreteScheduler`` (the UNet predicts a
  flow velocity; time labels sigma * 1000).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000}


def _unet2d(seed: int, out_scale: float = 1.0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with torch.no_grad():  # random outputs of a moderate size (a trained eps net is ~N(0, 1))
        unet.conv_out.weight.mul_(out_scale)
    return unet


def build_ddpm(path: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A DDPMPipeline folder at ``path`` (DDPM linear betas, 1000 steps)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    DDPMPipeline(unet=_unet2d(seed), scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def build_flow(path: Path, seed: int = 0, shift: float = 3.0) -> Path:
    """A DDPMPipeline folder whose scheduler is FlowMatchEulerDiscreteScheduler (velocity output)."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    DDPMPipeline(unet=_unet2d(seed), scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over lower-case letters and digits (one token per character)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def build_sd(path: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline folder at ``path`` (latents 4 x H x W for an H x W image)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8)
    tok = tiny_tokenizer(path.parent / f".{path.name}-vocab")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
