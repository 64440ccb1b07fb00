"""A tiny SD1.5-shaped model kit with seeded random weights, built in code.

Tests, developer mode and the site's demo need the real diffusers/peft code paths without
downloading gigabytes. `build_tiny_kit(folder)` writes a model folder in the production layout
(see pipeline.models) so it loads through the same `load_models`. The VAE has 4 blocks, so
images shrink x8 into latents as in SD1.5, and ControlNets' conditioning images line up.
The outputs are noise-like: the kit checks plumbing, not image quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.models import CONTROLNET_KINDS, HubFile, ModelSpec, write_manifest

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)
# SD1.5's scheduler settings (PNDM with the scaled-linear betas).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)


def byte_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes (no merges): works offline, spells every caption."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_components(
    unet_config: dict, vae_config: dict, text_config: dict, seed: int = 0
) -> dict:
    """Random-weight UNet, VAE, text encoder, tokenizer and scheduler (on the current default device)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_tokenizer()
    eos = tokenizer.eos_token_id
    text = CLIPTextConfig(
        **text_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=eos
    )
    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**unet_config),
        "vae": AutoencoderKL(**vae_config),
        "text_encoder": CLIPTextModel(text),
        "tokenizer": tokenizer,
        "scheduler": PNDMScheduler(**SD15_SCHEDULER),
    }


def random_controlnet(unet, seed: int):
    """A ControlNet copied from the UNet; its zero-initialised output convolutions get small random
    weights so that each ControlNet changes the result (a real trained one does too)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return net


def build_tiny_kit(folder: str | Path, seed: int = 0) -> Path:
    """Writes the tiny kit to `folder` in the production layout, with a manifest of its hashes."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = build_components(TINY_UNET, TINY_VAE, TINY_TEXT, seed)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder / "base")
    # The production kit carries a separate VAE folder; the tiny one mirrors the layout.
    shutil.copytree(folder / "base" / "vae", folder / "vae", dirs_exist_ok=True)
    for index, kind in enumerate(CONTROLNET_KINDS):
        random_controlnet(parts["unet"], seed + 1 + index).save_pretrained(folder / "controlnet" / kind)
    write_manifest(folder, _kit_specs(folder), source="pipeline.tinykit")
    return folder


def _kit_specs(folder: Path) -> tuple[ModelSpec, ...]:
    """The kit's files under the production model names, for the manifest."""
    paths = {"base": "base", "vae": "vae"} | {f"controlnet-{k}": f"controlnet/{k}" for k in CONTROLNET_KINDS}
    return tuple(
        ModelSpec(
            name,
            path,
            tuple(
                HubFile("local/tinykit", p.relative_to(folder / path).as_posix())
                for p in sorted((folder / path).rglob("*"))
                if p.is_file()
            ),
            "random weights, no licence needed",
        )
        for name, path in paths.items()
    )


def pixel_embedder(images: list[Image.Image]) -> np.ndarray:
    """A deterministic stand-in for a face embedder: the centred 16x16 grey thumbnail, L2-normalised.

    Developer mode and tests use it where no face model is installed; identical crops score 1.0.
    """
    rows = []
    for image in images:
        pixels = np.asarray(image.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
        pixels -= pixels.mean()
        rows.append(pixels / max(np.linalg.norm(pixels), 1e-8))
    return np.stack(rows).astype(np.float32)
