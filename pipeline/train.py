"""Persona LoRA: train on the preprocessed crops, validate every checkpoint, fuse the best.

Recipe (EasyPhoto's defaults, DESIGN.md section 4): LoRA rank 128 / alpha 64 on every linear
layer of the UNet's transformer blocks (attention q/k/v/out, proj_in/out, feed-forward) and on
the text encoder's attention and MLP; AdamW with UNet lr 1e-4 and text encoder lr 5e-5, constant;
steps = min(photos x 200, 800), each step 1 x 4 samples (batch x gradient accumulation); random
flips; a checkpoint every 100 steps.

Speed. The naive loop (VAE and text encoder on every sample, batch 1) is launch-bound, so:
- the VAE latents of every crop and its mirror image are computed once (their mean and std;
  each step still samples from that distribution, as encoding each time would);
- the caption is fixed, so the text encoder runs once per step at batch 1 and its output is
  broadcast across the batch (gradients sum back through the broadcast);
- the 4 accumulated samples run as one batch of 4 (`micro_batch` splits it again where memory
  is short): the same gradient as accumulating 4 batches of 1;
- on CUDA: frozen weights in bf16, LoRA weights in fp32 under bf16 autocast (without peft's
  cast of each LoRA input to fp32), fused AdamW, channels_last UNet, SDPA attention (diffusers'
  default), and the whole step (forward, backward, clipping, optimiser) captured once as a CUDA
  graph and replayed (`cuda_graph`), which removes the per-kernel launch cost that dominates at
  this size;
- validation runs with the LoRA merged, in the models' dtype (no autocast) and as CUDA graphs
  (`Validator`);
- checkpoints are copied into reused page-locked host buffers and written by a background
  thread, so the GPU does not wait for the disk; the last one carries no optimiser state.
Measured on one H200 with SD1.5 shapes (bench/RESULTS.md): 16.8 ms per sample against 185-307 ms
for the naive loop; the default run (800 steps, 8 checkpoints validated, fusion) takes 62.6 s.
`torch.backends.cudnn.benchmark` is switched on (process-wide): the first job in a process pays
about 30 s of cuDNN algorithm search, later jobs none.

Checkpoints (OUT/checkpoints/step-NNNNNN/) hold `pytorch_lora_weights.safetensors` in the
diffusers/PEFT LoRA format with the LoRA scale (alpha / rank) folded into lora_B, so any loader
that assumes alpha == rank (diffusers does when no alpha is stored) applies it exactly; plus the
validation images and scores. OUT/resume.pt holds the latest checkpoint's exact training state
(fp32 LoRA weights, optimiser moments, random generator), or a stopped run's (cancelled, or its
worker shut down) at the step it stopped, so a stopped or crashed run continues from there with
the same results as an uninterrupted one; once the last step is checkpointed it only
marks the run complete, and running again goes straight to fusion.

Validation and fusion. Every checkpoint inpaints the face region of each validation template
(strength 0.65, 20 steps, CFG 9) with the caption; each result is embedded by the caller's face
embedder and scored by its mean cosine similarity to the training photos' embeddings. The 10 best
results over all checkpoints pick the checkpoints: weight = times picked / 10 (/ the number of
results, when there are fewer than 10). Fusion is exact
in the weight space: the fused LoRA's product B·A equals sum_i w_i · B_i·A_i for every layer,
obtained by concatenating the checkpoints' ranks (A rows scaled by w_i, B columns as they are).
So the fused rank is rank x (checkpoints picked); summing A and B factors separately, as some
tools do, is not a weighted sum of the checkpoints (cross terms B_i·A_j appear).
OUT/persona_lora.safetensors is that file; OUT/persona_lora_kohya.safetensors is the same weights
with kohya/webui key names (lora_unet_*, lora_te_*, alpha = rank); OUT/best_face.png is the best
validation result, which rendering uses as the face to paste.

CLI contract (`python -m pipeline train PREPROCESSED_DIR --models MODEL_DIR --out OUT_DIR`):
every `*.png` in PREPROCESSED_DIR is a training crop; `persona.json`, if present, may give the
`caption` (the trigger phrase). Validation templates come from `--templates DIR` (images framed
like the crops: face centred, filling the middle third); without it the crops themselves serve.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from safetensors.torch import load_file, save_file

from pipeline.common import Cancelled, CancelToken, Progress, ProgressCallback, ignore_progress
from pipeline.cudagraphs import GraphedForward
from pipeline.faces import largest_face_embeddings, load_face_analyzer
from pipeline.compiling import CompiledGroupNorms
from pipeline.prompts import EASYPHOTO_NEGATIVE, encode_prompts

if TYPE_CHECKING:
    import argparse

    from pipeline.models import ModelSet

Embedder = Callable[[list[Image.Image]], np.ndarray]
"""Face embedder: images in, one L2-normalised row per image out (a zero row where no face is
found, which scores 0). The site wraps pipeline.faces' analyser; tests use tinykit.pixel_embedder."""

DEFAULT_CAPTION = "a photo of phb person"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ADAPTER = "persona"
LORA_FILE = "pytorch_lora_weights.safetensors"
RESUME_FILE = "resume.pt"


@dataclass
class TrainConfig:
    caption: str = DEFAULT_CAPTION
    resolution: int | None = None  # None: the model's native size (512 for SD1.5)
    rank: int = 128
    alpha: float = 64.0
    unet_lr: float = 1e-4
    text_lr: float = 5e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    steps_per_photo: int = 200
    max_steps: int = 800
    batch_size: int = 1
    gradient_accumulation: int = 4
    micro_batch: int | None = None  # samples per forward pass; None: the whole step at once
    random_flip: bool = True
    checkpoint_every: int = 100
    validation_steps: int = 20
    validation_strength: float = 0.65
    validation_guidance: float = 9.0
    validation_negative_prompt: str = EASYPHOTO_NEGATIVE  # in webui's syntax (pipeline.prompts)
    validation_mask_scale: float = 1.3  # the inpainted face: its box grown x1.3 about its centre, as EasyPhoto
    fusion_top_k: int = 10
    lora_dtype: str = "float16"  # of the saved files
    cuda_graph: bool = True  # replay the training step as a CUDA graph (CUDA only)
    channels_last: bool = True  # UNet memory format for training (CUDA only)
    compiled_norms: bool = False  # experiment: pipeline.compiling's compiled GroupNorm (see there)
    lean_lora: bool = True  # LeanLoraForward instead of peft's LoRA forward (the same function)
    seed: int = 0

    def total_steps(self, photos: int) -> int:
        return min(photos * self.steps_per_photo, self.max_steps)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation


@dataclass(frozen=True)
class ValidationTemplate:
    image: Image.Image
    face_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels


@dataclass
class CheckpointResult:
    step: int
    folder: Path
    scores: list[float]  # one per validation template

    @property
    def mean_score(self) -> float:
        return float(np.mean(self.scores))


@dataclass
class TrainResult:
    lora_path: Path
    kohya_path: Path
    best_face_path: Path
    best_score: float
    steps: int
    resumed_from_step: int
    checkpoints: list[CheckpointResult]
    fusion_weights: dict[int, float]  # checkpoint step -> weight
    losses: list[float]  # per step of this run (resumed steps excluded)
    seconds: dict[str, float]  # per stage, and "total"
    step_mode: str  # "cuda-graph" or "eager"

    def to_json(self) -> dict:
        return {
            "lora": str(self.lora_path),
            "kohya_lora": str(self.kohya_path),
            "best_face": str(self.best_face_path),
            "best_score": round(self.best_score, 4),
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "checkpoints": [
                {"step": c.step, "folder": str(c.folder), "mean_score": round(c.mean_score, 4)}
                for c in self.checkpoints
            ],
            "fusion_weights": {str(k): v for k, v in self.fusion_weights.items()},
            "final_loss": round(self.losses[-1], 5) if self.losses else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "step_mode": self.step_mode,
        }


# --------------------------------------------------------------------------- images


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB, centre-cropped square at `resolution`, as a (3, H, W) tensor in [-1, 1]."""
    square = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.BICUBIC)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def without_identity(template: ValidationTemplate, mask_scale: float, blur: float = 0.08) -> ValidationTemplate:
    """The template with its own face blurred (a Gaussian of `blur` face widths) inside the box
    validation inpaints: the built-in templates are portraits of famous people, whose faces would
    otherwise compete with the persona's at strength 0.65; EasyPhoto validates on faces of no one
    in particular. At 0.08 dlib no longer finds the demo portraits' people in them (distance over
    0.47 where found; the same-person limit is 0.40), while the face's layout and colours stay."""
    x0, y0, x1, y1 = template.face_box
    grow_x, grow_y = (mask_scale - 1) * (x1 - x0) / 2, (mask_scale - 1) * (y1 - y0) / 2
    box = (round(x0 - grow_x), round(y0 - grow_y), round(x1 + grow_x), round(y1 + grow_y))
    image = template.image.convert("RGB")
    blurred = image.filter(ImageFilter.GaussianBlur(blur * (x1 - x0)))
    image.paste(blurred.crop(box), box[:2])
    return ValidationTemplate(image, template.face_box)


def face_crop(
    template: ValidationTemplate, resolution: int, mask_scale: float = 1.0
) -> tuple[Image.Image, Image.Image]:
    """The template framed like a training crop (face box x3, square) and the face mask in it: the
    face box grown `mask_scale` times about its centre."""
    x0, y0, x1, y1 = template.face_box
    width, height = template.image.size
    side = min(3 * max(x1 - x0, y1 - y0), width, height)
    left = min(max((x0 + x1) // 2 - side // 2, 0), width - side)
    top = min(max((y0 + y1) // 2 - side // 2, 0), height - side)
    crop = template.image.convert("RGB").crop((left, top, left + side, top + side))
    crop = crop.resize((resolution, resolution), Image.BICUBIC)
    scale = resolution / side
    mask = Image.new("L", (resolution, resolution), 0)
    grow_x, grow_y = (mask_scale - 1) * (x1 - x0) / 2, (mask_scale - 1) * (y1 - y0) / 2
    box = [(x0 - grow_x - left) * scale, (y0 - grow_y - top) * scale, (x1 + grow_x - left) * scale, (y1 + grow_y - top) * scale]
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return crop, mask


# --------------------------------------------------------------------------- model preparation


def native_resolution(models: ModelSet) -> int:
    return models.unet.config.sample_size * 2 ** (len(models.vae.config.block_out_channels) - 1)


def mixed_precision(models: ModelSet):
    """The training forward's autocast (bf16 frozen weights, fp32 LoRA), or nothing in fp32.

    Its weight cache stays off for CUDA graph capture; it would save nothing anyway (each weight is
    cast once per forward)."""
    if models.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(models.device.type, models.dtype, cache_enabled=False)


def caption_ids(models: ModelSet, caption: str) -> torch.Tensor:
    """The caption's token ids, padded to the text encoder's length, on the models' device."""
    tokenizer = models.tokenizer
    return tokenizer(
        caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(models.device)


def add_lora(unet, text_encoder, config: TrainConfig) -> list[dict]:
    """Adds trainable LoRA adapters (fp32) and returns the optimiser's parameter groups."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model, targets in ((unet, UNET_TARGETS), (text_encoder, TEXT_TARGETS)):
        model.requires_grad_(False)
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(targets))
        model.add_adapter(lora, adapter_name=ADAPTER)
        # peft casts each layer's input to the LoRA weights' dtype (fp32) and autocast casts it
        # back to bf16 for the matmul: two activation-sized copies per layer, forward and backward,
        # for the very same bf16 product (copies were 31% of a step's GPU time on an H200).
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
                if config.lean_lora and LeanLoraForward.fits(module):
                    module.forward = LeanLoraForward(module)
    groups = []
    for model, lr in ((unet, config.unet_lr), (text_encoder, config.text_lr)):
        params = [p for p in model.parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        groups.append({"params": params, "lr": lr})
    return groups


class LeanLoraForward:
    """peft's LoRA forward, base(x) + lora_B(lora_A(x)) * scaling, with less memory traffic.

    The scale multiplies lora_B's weight (out x rank values) instead of its output (an activation
    as large as the layer's), and for linear layers the sum is the matmul's own epilogue (addmm)
    instead of one more pass over the activation. peft's multiply and add were most of a training
    step's elementwise GPU time (bench/RESULTS.md). The same function: with alpha / rank a power
    of two (64 / 128) the scaled weight is exact, and addmm rounds the sum once instead of twice.
    Installed per layer while training; a merged layer (validation) runs its base layer alone.
    """

    def __init__(self, layer) -> None:
        self.layer = layer

    @staticmethod
    def fits(layer) -> bool:
        """Vanilla LoRA with our one adapter: no dropout, no DoRA-style variant, no bias."""
        from peft.tuners.lora import LoraLayer

        return (
            isinstance(layer, LoraLayer)
            and list(layer.lora_A) == [ADAPTER]
            and isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity)
            and ADAPTER not in layer.lora_variant
            and layer.lora_B[ADAPTER].bias is None
            and isinstance(layer.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d))
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.disable_adapters:  # never while training; peft's own forward knows what it means
            return type(layer).forward(layer, x)
        base = layer.base_layer(x)
        if layer.merged:
            return base
        lora_b = layer.lora_B[ADAPTER]
        hidden = layer.lora_A[ADAPTER](x)
        weight = lora_b.weight * layer.scaling[ADAPTER]
        if isinstance(lora_b, torch.nn.Linear):
            total = torch.addmm(base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight.t())
            return total.view(base.shape)
        return base + lora_b._conv_forward(hidden, weight, None)


def remove_lora(unet, text_encoder) -> None:
    """Returns the shared, resident models to their plain state after training."""
    from diffusers.utils import recurse_remove_peft_layers

    for model in (unet, text_encoder):
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        model._hf_peft_config_loaded = False
        model.eval()


def lora_state(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def set_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"resume state does not fit the model: {result.unexpected_keys[:3]}")


def exported(state: dict[str, torch.Tensor], scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LoRA weights for files: scale folded into lora_B (so alpha == rank), on the CPU, in `dtype`."""
    return {
        key: (value * scale if ".lora_B." in key else value).detach().to("cpu", dtype).contiguous()
        for key, value in state.items()
    }


def text_model_prefix(text_encoder) -> str:
    """Text-encoder keys are saved as the LoRA ecosystem names them ("text_model.encoder..."):
    transformers 5 dropped the `text_model` level, older stacks and webui expect it, and
    diffusers accepts both."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def save_lora(folder: Path, unet_state: dict, text_state: dict, weight_name: str = LORA_FILE) -> Path:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state, weight_name=weight_name
    )
    return folder / weight_name


# --------------------------------------------------------------------------- training stages


@dataclass
class LatentCache:
    """VAE posterior of every training crop (and its mirror image): sample = mean + std * noise."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(self.mean), (count,), generator=generator, device=self.mean.device)
        noise = torch.randn(
            (count, *self.mean.shape[1:]), generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return (self.mean[index] + self.std[index] * noise) * self.scaling_factor


@torch.no_grad()
def cache_latents(vae, photos: list[Image.Image], resolution: int, flip: bool, batch: int = 8) -> LatentCache:
    pixels = torch.stack([image_tensor(p, resolution) for p in photos])
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    means, stds = [], []
    for chunk in pixels.split(batch):
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return LatentCache(torch.cat(means), torch.cat(stds), vae.config.scaling_factor)


@dataclass
class NoiseSchedule:
    """The DDPM forward process used for training (SD1.5: scaled-linear betas, epsilon target)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(scheduler.config)
        return cls(ddpm.alphas_cumprod.to(device, torch.float32), ddpm.config.prediction_type)

    def batch(self, latents: torch.Tensor, generator: torch.Generator):
        """(noisy latents, timesteps, regression target) for one training batch."""
        count = len(latents)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (count,), generator=generator, device=latents.device)
        signal = self.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - self.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        noisy = signal * latents + sigma * noise
        target = noise if self.prediction_type == "epsilon" else signal * noise - sigma * latents
        return noisy, timesteps, target


def train_step(unet, text_encoder, optimizer, params, input_ids, noisy, timesteps, target, micro_batch, autocast, max_grad_norm):
    """Forward, backward, clip, optimiser step for one training step; returns the loss (a tensor).

    Leaves gradients in place: the eager caller clears them, the CUDA graph overwrites them.
    """
    total = len(noisy)
    loss_sum = torch.zeros((), device=noisy.device)
    for start in range(0, total, micro_batch):
        part = slice(start, start + micro_batch)
        count = len(noisy[part])
        with autocast():
            hidden = text_encoder(input_ids, return_dict=False)[0]
            prediction = unet(noisy[part], timesteps[part], hidden.expand(count, -1, -1), return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target[part].float()) * (count / total)
        loss.backward()
        loss_sum = loss_sum + loss.detach()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return loss_sum


class StepRunner:
    """Runs `step(noisy, timesteps, target)` eagerly, or as a replayed CUDA graph after warm-up.

    Capture needs a few eager steps first (on a side stream) to settle lazy initialisation;
    those are real training steps. If capture fails, it falls back to eager steps for good.
    """

    WARMUP = 3

    def __init__(self, step: Callable, optimizer, use_graph: bool):
        self.step = step
        self.optimizer = optimizer
        self.use_graph = use_graph
        self.calls = 0
        self.graph = None
        self.static: tuple[torch.Tensor, ...] = ()
        self.static_loss: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return "cuda-graph" if self.use_graph else "eager"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.use_graph:
            self.optimizer.zero_grad(set_to_none=True)
            return self.step(*inputs)
        if self.graph is None and self.calls <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            try:
                self._capture(inputs)
            except RuntimeError:  # something in the step cannot be captured here: stay eager
                self.use_graph = False
                return self(*inputs)
        for static, value in zip(self.static, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.static_loss.clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static = tuple(t.clone() for t in inputs)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self.step(*self.static)
        self.graph = graph


def make_optimizer(groups: list[dict], config: TrainConfig, device: torch.device, capturable: bool):
    cuda = device.type == "cuda"
    return torch.optim.AdamW(
        groups, weight_decay=config.weight_decay, fused=cuda or None, capturable=capturable and cuda
    )


# --------------------------------------------------------------------------- validation, fusion


class Validator:
    """Inpaints every template's face with the current LoRA, one batched pipeline call per checkpoint.

    The LoRA is merged into the frozen base weights for the call (peft's merge), so the UNet runs
    as it will when rendering: in the models' own dtype without autocast (whose fp32 norms cost
    a cast before and after each), without the rank-128 side matmuls of every layer, and on CUDA
    its forward replays as CUDA graphs (captured at the first checkpoint, reused by the next). The
    base weights are then restored from copies taken once, bit for bit, instead of peft's unmerge,
    whose subtraction would leave bf16 rounding in the weights training goes on with.
    """

    def __init__(self, models: ModelSet, config: TrainConfig, resolution: int, cuda_graph: bool):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline
        from peft.tuners.lora import LoraLayer

        self.config, self.resolution = config, resolution
        self.pipe = StableDiffusionInpaintPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            unet=models.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(models.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.layers = [
            m for model in (models.unet, models.text_encoder) for m in model.modules() if isinstance(m, LoraLayer)
        ]
        self.originals = [layer.get_base_layer().weight.detach().clone() for layer in self.layers]
        self.graphed = GraphedForward(models.unet, torch.cuda.graph_pool_handle()) if cuda_graph else None

    @torch.no_grad()
    def __call__(self, crops: list[tuple[Image.Image, Image.Image]]) -> list[Image.Image]:
        config = self.config
        try:
            for layer in self.layers:
                layer.merge(adapter_names=[ADAPTER])
            # Encoded with the LoRA merged (it trains the text encoder too), in webui's syntax.
            embeds = encode_prompts(
                self.pipe.tokenizer, self.pipe.text_encoder, [config.caption, config.validation_negative_prompt],
                self.pipe.device,
            )
            with self.graphed.installed() if self.graphed else nullcontext():
                return self.pipe(
                    prompt_embeds=embeds[:1].expand(len(crops), -1, -1),
                    negative_prompt_embeds=embeds[1:].expand(len(crops), -1, -1),
                    image=[c for c, _ in crops],
                    mask_image=[m for _, m in crops],
                    masked_image_latents=self.unread_masked_latents(len(crops)),
                    height=self.resolution,
                    width=self.resolution,
                    strength=config.validation_strength,
                    num_inference_steps=config.validation_steps,
                    guidance_scale=config.validation_guidance,
                    generator=torch.Generator(self.pipe.device).manual_seed(config.seed),
                ).images
        finally:
            for layer, original in zip(self.layers, self.originals):
                layer.get_base_layer().weight.copy_(original)
                layer.merged_adapters.clear()  # peft's record of what is merged: nothing, again

    def unread_masked_latents(self, count: int) -> torch.Tensor | None:
        """A placeholder for the masked image's latents, which only 9-channel inpainting UNets read.

        Without it the pipeline VAE-encodes the masked image too (4% of validation's arithmetic,
        bench/flops.py) for SD1.5's 4-channel UNet, which never looks at the result.
        """
        pipe = self.pipe
        if pipe.unet.config.in_channels != 4:
            return None
        side = self.resolution // pipe.vae_scale_factor
        return torch.zeros(count, 4, side, side, device=pipe.device, dtype=pipe.unet.dtype)


def identity_scores(embedder: Embedder, faces: list[Image.Image], reference: np.ndarray) -> list[float]:
    """Mean cosine similarity of each face to the training photos (rows are L2-normalised)."""
    return (embedder(faces) @ reference.T).mean(axis=1).astype(float).tolist()


def fusion_weights(checkpoints: list[CheckpointResult], top_k: int) -> dict[int, float]:
    """Weight of a checkpoint = how many of the top_k validation results it made / top_k
    (/ the number of results when there are fewer), so the weights add up to 1."""
    results = sorted(((s, c.step) for c in checkpoints for s in c.scores), reverse=True)[:top_k]
    steps = [step for _, step in results]
    return {step: steps.count(step) / len(steps) for step in sorted(set(steps))}


def fuse_loras(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Exact weighted sum of LoRAs: concatenate ranks, A rows scaled by the weight.

    For every layer, B_fused @ A_fused = sum_i w_i * B_i @ A_i (the layout of lora_A is
    (rank, in, ...) and of lora_B (out, rank, ...), linear and 1x1-conv alike).
    """
    fused = {}
    for key in states[0]:
        if ".lora_A." in key:
            fused[key] = torch.cat([w * s[key].float() for s, w in zip(states, weights)], dim=0)
        elif ".lora_B." in key:
            fused[key] = torch.cat([s[key].float() for s in states], dim=1)
        else:
            raise ValueError(f"unexpected key in a LoRA file: {key}")
    return fused


def split_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A LoRA file's UNet and text-encoder halves, without their "unet." / "text_encoder." prefixes."""
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    text = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    return unet, text


def kohya_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya/webui key names (lora_unet_*, lora_te_*; alpha = rank, as the scale is folded in)."""
    from diffusers.utils import convert_state_dict_to_kohya

    unet, text = split_prefixes(state)
    return {"lora_unet_" + k: v for k, v in convert_state_dict_to_kohya(unet).items()} | {
        "lora_te_" + k: v for k, v in convert_state_dict_to_kohya(text).items()
    }


@dataclass
class Fused:
    lora_path: Path
    kohya_path: Path
    weights: dict[int, float]
    best_face_path: Path
    best_score: float


def fuse_checkpoints(out_dir: Path, checkpoints: list[CheckpointResult], top_k: int, dtype: torch.dtype) -> Fused:
    """Writes the persona's fused LoRA (diffusers and kohya names) and its best validation face."""
    weights = fusion_weights(checkpoints, top_k)
    picked = [load_file(checkpoint_folder(out_dir, step) / LORA_FILE) for step in weights]
    fused = {k: v.to(dtype) for k, v in fuse_loras(picked, list(weights.values())).items()}
    lora_path = save_lora(out_dir, *split_prefixes(fused), weight_name="persona_lora.safetensors")
    kohya_path = out_dir / "persona_lora_kohya.safetensors"
    save_file(kohya_state(fused), kohya_path, metadata={"format": "pt"})
    best_score, folder, index = max((s, c.folder, i) for c in checkpoints for i, s in enumerate(c.scores))
    best_face_path = out_dir / "best_face.png"
    shutil.copyfile(folder / f"validation-{index}.png", best_face_path)
    return Fused(lora_path, kohya_path, weights, best_face_path, best_score)


# --------------------------------------------------------------------------- checkpoints, resume


def checkpoint_folder(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:06d}"


def read_checkpoints(out_dir: Path, up_to_step: int) -> list[CheckpointResult]:
    """Finished checkpoints of an earlier run; later ones (past the resume state) are removed."""
    results = []
    for folder in sorted((out_dir / "checkpoints").glob("step-*")):
        record = folder / "validation.json"
        step = int(folder.name.removeprefix("step-").removesuffix(".tmp"))
        if folder.suffix == ".tmp" or step > up_to_step or not record.is_file():
            shutil.rmtree(folder)
            continue
        results.append(CheckpointResult(step, folder, json.loads(record.read_text())["scores"]))
    return results


class HostSnapshot:
    """Copies training state into host buffers that are reused from one checkpoint to the next.

    At rank 128 a snapshot is about 1 GB (fp32 LoRA and two Adam moments); page-locked buffers
    allocated once (CUDA) copy it fast (on an H200 the default run's save time went from 4.5 s
    with fresh pageable copies to 2.4 s).
    Take a new snapshot only once the writer is done with the last one.
    """

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, value, path: tuple = ()):
        if isinstance(value, torch.Tensor):
            buffer = self.buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=self.pinned)
                self.buffers[path] = buffer
            return buffer.copy_(value.detach(), non_blocking=self.pinned)
        if isinstance(value, dict):
            return {k: self.take(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.take(v, path + (i,)) for i, v in enumerate(value)]
        return value


def resume_snapshot(
    host: HostSnapshot, step: int, unet, text_encoder, optimizer, generator, config: TrainConfig, complete: bool
) -> dict:
    """Everything a resumed run needs to continue exactly: fp32 LoRA, optimiser moments, RNG.

    The last step's snapshot is `complete`: nothing is left to train, so the optimiser moments (two
    thirds of the gigabyte) are neither copied nor written, and the resume file only marks the end.
    """
    snapshot = {
        "step": step,
        "rank": config.rank,
        "alpha": config.alpha,
        "complete": complete,
        "unet": host.take(lora_state(unet), ("unet",)),
        "text_encoder": host.take(lora_state(text_encoder), ("text_encoder",)),
        "generator": generator.get_state(),
    }
    if not complete:
        snapshot["optimizer"] = host.take(optimizer.state_dict(), ("optimizer",))
    if host.pinned:
        torch.cuda.current_stream().synchronize()  # the copies were queued behind the training step
    return snapshot


def write_checkpoint(
    folder: Path, snapshot: dict, config: TrainConfig, text_prefix: str, faces: list[Image.Image], scores: list[float]
) -> None:
    """Writes a checkpoint folder atomically (a .tmp folder renamed when complete)."""
    temporary = folder.with_suffix(".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    scale, dtype = config.alpha / config.rank, getattr(torch, config.lora_dtype)
    text_state = {text_prefix + k: v for k, v in exported(snapshot["text_encoder"], scale, dtype).items()}
    save_lora(temporary, exported(snapshot["unet"], scale, dtype), text_state)
    for index, face in enumerate(faces):
        face.save(temporary / f"validation-{index}.png", compress_level=1)
    (temporary / "validation.json").write_text(json.dumps({"step": snapshot["step"], "scores": scores}))
    os.replace(temporary, folder)


def write_checkpoint_and_resume_state(out_dir: Path, folder: Path, snapshot: dict, *checkpoint_args) -> None:
    """The checkpoint first, the resume state only once it is complete: a resume file never points
    past a checkpoint that failed to write (a full disk, say)."""
    write_checkpoint(folder, snapshot, *checkpoint_args)
    write_resume_state(out_dir, snapshot)


def write_resume_state(out_dir: Path, snapshot: dict) -> None:
    if snapshot["complete"]:  # a finished run resumes to fusion only: the checkpoints hold the weights
        snapshot = {key: snapshot[key] for key in ("step", "rank", "alpha", "complete")}
    temporary = out_dir / (RESUME_FILE + ".tmp")
    torch.save(snapshot, temporary)
    os.replace(temporary, out_dir / RESUME_FILE)


class BackgroundWriter:
    """Writes checkpoints on one worker thread, in order, while the GPU trains on.

    `drain` and `wait` return when everything submitted is on disk, and re-raise a failed write.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future] = []

    def submit(self, function: Callable, *args) -> None:
        self.pending.append(self.pool.submit(function, *args))

    def drain(self) -> None:
        for future in self.pending:
            future.result()
        self.pending.clear()

    def wait(self) -> None:
        self.pool.shutdown(wait=True)
        self.drain()


def load_resume_state(
    out_dir: Path, unet, text_encoder, optimizer, generator, config: TrainConfig, total_steps: int
) -> int:
    """Restores the last checkpoint's training state; returns its step (0 when starting fresh)."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if (state["rank"], state["alpha"]) != (config.rank, config.alpha):
        raise ValueError(f"{path} was trained with another LoRA rank/alpha; use a new output folder")
    if state.get("complete", False):  # absent in files written before the marker existed
        if state["step"] != total_steps:
            raise ValueError(f"{path} is a finished run of {state['step']} steps; use a new output folder")
        return state["step"]
    set_lora_state(unet, state["unet"])
    set_lora_state(text_encoder, state["text_encoder"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"]


# --------------------------------------------------------------------------- the whole stage


class _Clock:
    """Seconds per stage; synchronises CUDA at stage ends so GPU work is counted where it ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, stage: str, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now


def train_persona(
    models: ModelSet,
    photos: list[Image.Image],
    out_dir: str | Path,
    embedder: Embedder,
    templates: list[ValidationTemplate],
    config: TrainConfig | None = None,
    progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
) -> TrainResult:
    """Trains, checkpoints, validates and fuses; resumes from OUT's last checkpoint if there is one.

    The models are the process's resident set: LoRA layers are added for the run and removed
    afterwards, whatever happens. Raises Cancelled when `cancel` is set, at the next step; then,
    or when `progress` raises between steps, the steps done are kept for a resume.
    """
    config = config or TrainConfig()
    cancel = cancel or CancelToken()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not photos or not templates:
        raise ValueError("training needs at least one photo and one validation template")
    device = models.device
    resolution = config.resolution or native_resolution(models)
    total_steps = config.total_steps(len(photos))
    cuda = device.type == "cuda"
    autocast = functools.partial(mixed_precision, models)
    clock = _Clock(device)
    since = clock.started
    progress(Progress("caching", 0.0, "encoding photos"))
    reference = embedder(photos)
    crops = [face_crop(t, resolution, config.validation_mask_scale) for t in templates]
    latents = cache_latents(models.vae, photos, resolution, config.random_flip)
    input_ids = caption_ids(models, config.caption)
    schedule = NoiseSchedule.from_scheduler(models.scheduler, device)
    since = clock.add("cache", since)

    unet, text_encoder = models.unet, models.text_encoder
    torch.manual_seed(config.seed)
    groups = add_lora(unet, text_encoder, config)
    writer = BackgroundWriter()
    installed = ExitStack()
    try:
        if cuda:
            torch.backends.cudnn.benchmark = True
            unet.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
        params = [p for g in groups for p in g["params"]]
        use_graph = config.cuda_graph and cuda
        optimizer = make_optimizer(groups, config, device, capturable=use_graph)
        generator = torch.Generator(device).manual_seed(config.seed)
        start_step = load_resume_state(out_dir, unet, text_encoder, optimizer, generator, config, total_steps)
        checkpoints = read_checkpoints(out_dir, start_step)
        unet.train()
        text_encoder.train()
        micro_batch = config.micro_batch or config.samples_per_step

        def step(noisy, timesteps, target):
            return train_step(
                unet, text_encoder, optimizer, params, input_ids, noisy, timesteps, target,
                micro_batch, autocast, config.max_grad_norm,
            )

        runner = StepRunner(step, optimizer, use_graph)

        def is_checkpoint(steps: int) -> bool:
            return steps % config.checkpoint_every == 0 or steps == total_steps

        # A run stopped at a checkpoint's step before that checkpoint was made owes it first.
        owed = start_step > 0 and is_checkpoint(start_step) and all(c.step != start_step for c in checkpoints)
        # Nothing to validate when resuming a finished run (its copies of the weights cost memory).
        validate = Validator(models, config, resolution, use_graph) if start_step < total_steps or owed else None
        if config.compiled_norms:
            installed.enter_context(CompiledGroupNorms(unet, models.vae).installed())
        losses = torch.zeros(total_steps, device=device)
        host = HostSnapshot(pinned=cuda)
        text_prefix = text_model_prefix(text_encoder)
        since = clock.add("setup", since)
        step_started, last_report = time.perf_counter(), 0.0
        saved_step = start_step

        def keep_steps_done(steps: int) -> None:
            """Writes the resume state of a run that stops between checkpoints (cancelled, or its
            worker shutting down), so that it resumes where it stopped rather than at the last
            checkpoint; stopped at a checkpoint's step, the resumed run makes that checkpoint first."""
            if steps > saved_step:
                writer.drain()
                snapshot = resume_snapshot(host, steps, unet, text_encoder, optimizer, generator, config, False)
                writer.submit(write_resume_state, out_dir, snapshot)

        def report(update: Progress, steps: int) -> None:
            """The progress callback between steps, which may stop the run by raising."""
            try:
                progress(update)
            except BaseException:
                keep_steps_done(steps)
                raise

        def make_checkpoint(done: int) -> None:
            """Validates the LoRA after `done` steps and writes it with the resume state (in the
            background, while training goes on)."""
            nonlocal since, saved_step
            writer.drain()  # the host buffers are free again
            snapshot = resume_snapshot(
                host, done, unet, text_encoder, optimizer, generator, config, complete=done == total_steps
            )
            since = clock.add("save", since)
            report(Progress("validating", done / total_steps, f"checkpoint {done}"), done)
            unet.eval()
            text_encoder.eval()
            faces = validate(crops)
            unet.train()
            text_encoder.train()
            scores = identity_scores(embedder, faces, reference)
            since = clock.add("validate", since)
            folder = checkpoint_folder(out_dir, done)
            writer.submit(
                write_checkpoint_and_resume_state, out_dir, folder, snapshot, config, text_prefix, faces, scores
            )
            checkpoints.append(CheckpointResult(done, folder, scores))
            saved_step = done
            report(Progress("training", done / total_steps, f"checkpoint {done} saved"), done)

        if owed:
            make_checkpoint(start_step)
        for step_index in range(start_step, total_steps):
            if cancel.cancelled:
                keep_steps_done(step_index)
                raise Cancelled()
            sample = latents.sample(config.samples_per_step, generator)
            noisy, timesteps, target = schedule.batch(sample, generator)
            if cuda and config.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            loss = runner(noisy, timesteps, target)
            losses[step_index] = loss
            done = step_index + 1
            now = time.perf_counter()
            if now - last_report > 0.5 or is_checkpoint(done):
                last_report = now
                per_step = (now - step_started) / (done - start_step)
                remaining = total_steps - done
                validated = sum(1 for c in checkpoints if c.step > start_step)
                per_checkpoint = clock.seconds.get("validate", 0.0) / validated if validated else 2.0
                eta = per_step * remaining + per_checkpoint * math.ceil(remaining / config.checkpoint_every)
                report(Progress(
                    "training", done / total_steps, f"step {done}/{total_steps} loss {loss.item():.4f}", eta
                ), done)
            if is_checkpoint(done):
                since = clock.add("train", since)
                make_checkpoint(done)
        step_mode = runner.mode
        run_losses = losses[start_step:].tolist()
    finally:
        installed.close()
        validate = None  # its weight copies and graphs, before the cache is emptied
        remove_lora(unet, text_encoder)
        if cuda:
            torch.cuda.empty_cache()
        writer.wait()  # a cancelled run still leaves its last checkpoint complete
    since = clock.add("save", since)

    progress(Progress("fusing", 0.0, "fusing the best checkpoints"))
    fused = fuse_checkpoints(out_dir, checkpoints, config.fusion_top_k, getattr(torch, config.lora_dtype))
    clock.add("fuse", since)
    clock.seconds["total"] = time.perf_counter() - clock.started
    result = TrainResult(
        fused.lora_path, fused.kohya_path, fused.best_face_path, fused.best_score, total_steps, start_step,
        checkpoints, fused.weights, run_losses, clock.seconds, step_mode,
    )
    (out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    progress(Progress("fusing", 1.0, "done"))
    return result


# --------------------------------------------------------------------------- command line


def read_preprocessed(folder: Path) -> tuple[list[Image.Image], str]:
    """The training crops and caption of a folder written by `python -m pipeline preprocess`."""
    record_path = folder / "persona.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"no persona.json in {folder}: run `python -m pipeline preprocess` first")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if not record["train"]:
        raise ValueError(f"{folder} has no training crops: no photo was accepted")
    photos = [Image.open(folder / item["image"]).convert("RGB") for item in record["train"]]
    return photos, record.get("caption") or DEFAULT_CAPTION


def centred_templates(images: list[Image.Image]) -> list[ValidationTemplate]:
    """Templates framed like the crops: the face fills the middle third."""
    return [
        ValidationTemplate(image, (image.width // 3, image.height // 3, 2 * image.width // 3, 2 * image.height // 3))
        for image in images
    ]


def load_embedder(backend: str, face_models: Path | None) -> Embedder:
    """The face embedder of a backend; "pixels" for tiny random models, whose outputs hold no face."""
    if backend == "pixels":
        from pipeline.tinykit import pixel_embedder

        return pixel_embedder
    return functools.partial(largest_face_embeddings, load_face_analyzer(backend, face_models))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preprocessed", type=Path, help="folder written by `python -m pipeline preprocess`")
    parser.add_argument("--models", type=Path, required=True, help="model folder (see pipeline.models)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; an earlier run there resumes")
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--templates", type=Path, help="folder of face-centred validation images")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--backend", choices=("dlib", "insightface", "pixels"), default="dlib",
        help="face embedder for validation scores (pixels: the tiny kit's stand-in, whose outputs hold no face)",
    )
    parser.add_argument("--face-models", type=Path, help="face model folder (required for insightface)")


def run(args: argparse.Namespace) -> dict:
    from pipeline.models import load_models

    photos, caption = read_preprocessed(args.preprocessed)
    template_images = (
        [Image.open(p).convert("RGB") for p in sorted(args.templates.glob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
        if args.templates
        else photos
    )
    config = TrainConfig(caption=caption, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every)
    result = train_persona(
        load_models(args.models, args.device),
        photos,
        args.out,
        load_embedder(args.backend, args.face_models),
        centred_templates(template_images),
        config,
    )
    return result.to_json()
