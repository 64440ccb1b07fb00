"""Diffusers weights written back in the original (LDM / webui) key layout, for loader tests.

Production reads original-format files through diffusers' `from_single_file`: the colour
ControlNet is published only that way, and a fine-tuned base may come as one checkpoint. Nothing
downloads in tests, so the tiny kit's models are renamed into that layout here: the inverse of
diffusers' `convert_controlnet_checkpoint` / `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint`, which the tests run on the result to
prove the inverse exact before loading it for real.
"""

from __future__ import annotations

import re

import torch

RESNET_NAMES = (  # diffusers -> LDM, inside a resnet
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet(rest: str) -> str:
    for diffusers_name, ldm_name in RESNET_NAMES:
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name) :]
    return rest


def _fixed(kind: str) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping = DIFFUSERS_TO_LDM_MAPPING[kind]
    return mapping["layers"] if "layers" in mapping else mapping


def _encoder_side_key(key: str, per_level: int) -> str | None:
    """The UNet's and the ControlNet's shared half: input blocks and the middle block."""
    if match := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{level * per_level + layer + 1}.0.{_resnet(rest)}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{level * per_level + layer + 1}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    return None


def _controlnet_key(key: str, layers_per_block: int) -> str:
    fixed = _fixed("controlnet")
    if key in fixed:
        return fixed[key]
    if (ldm := _encoder_side_key(key, layers_per_block + 1)) is not None:
        return ldm
    if match := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
        return f"zero_convs.{match[1]}.0.{match[2]}"
    if match := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", key):
        return f"middle_block_out.0.{match[1]}"
    if match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)", key):
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
    raise ValueError(f"no LDM name for ControlNet key {key}")


def controlnet_to_ldm(net) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights as an original ControlNet file holds them."""
    layers = net.config.layers_per_block
    return {"control_model." + _controlnet_key(k, layers): v.clone() for k, v in net.state_dict().items()}


def _unet_key(key: str, config) -> str:
    fixed = _fixed("unet")
    if key in fixed:
        return fixed[key]
    per_level = config.layers_per_block + 1
    if (ldm := _encoder_side_key(key, per_level)) is not None:
        return ldm
    if match := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(match[1]) * per_level + int(match[2])}.0.{_resnet(match[3])}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(match[1]) * per_level + int(match[2])}.1.{match[3]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        level = int(match[1])
        slot = 2 if "CrossAttn" in config.up_block_types[level] else 1  # after the attention, if any
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{match[2]}"
    raise ValueError(f"no LDM name for UNet key {key}")


VAE_ATTENTION_NAMES = (
    ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
)


def _vae_key(key: str, levels: int) -> str:
    fixed = _fixed("vae")
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = match[2]
        for diffusers_name, ldm_name in VAE_ATTENTION_NAMES:
            rest = rest.replace(diffusers_name, ldm_name)
        return f"{match[1]}.mid.attn_1.{rest}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    # The decoder's up blocks are numbered from the bottom in the original layout.
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = levels - 1 - int(match[1])
        return f"decoder.up.{level}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{levels - 1 - int(match[1])}.upsample.conv.{match[2]}"
    raise ValueError(f"no LDM name for VAE key {key}")


def stable_diffusion_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """An SD1.x pipeline's weights as one original checkpoint holds them (model.diffusion_model.*,
    first_stage_model.*, cond_stage_model.transformer.text_model.*)."""
    state = {"model.diffusion_model." + _unet_key(k, unet.config): v.clone() for k, v in unet.state_dict().items()}
    levels = len(vae.config.down_block_types)
    for key, value in vae.state_dict().items():
        ldm = _vae_key(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # 1x1 convolutions in the original
        state["first_stage_model." + ldm] = value.clone()
    for key, value in text_encoder.state_dict().items():
        # transformers 5 flattened CLIPTextModel; original files keep the text_model level.
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = value.clone()
    return state
