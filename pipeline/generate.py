"""Portraits: a persona's face rendered into a template's style (EasyPhoto's inference, DESIGN.md s.4).

Two engines behind `render_portraits`:

- `classic` (no diffusion; the default when no diffusion weights are configured): crop the template
  around its face (box x3, 512 px square), fuse the reference face into it (pipeline.fusion: a
  dense warp by the 68 landmarks, the template's skin tone and light, `classic_fusion`'s shares),
  paste back, score identity.
- `diffusion`: EasyPhoto's two passes on top of that crop.
  1. Fusion of the reference face (ratio 0.6, the same pipeline.fusion): the init image and the
     source of the canny and colour controls (the colour control is the fused image itself at
     full resolution, EasyPhoto's `blur_ratio=1`).
  2. The best validation face placed on the template by its 5 keypoints (similarity transform):
     the source of the openpose-face control. That control is drawn from landmarks, so the paste
     is done on the landmarks themselves: the best face's landmarks, mapped by the transform, are
     exactly what a detector would find on the pasted image, without a second detection.
  3. Pass 1 inpaints the face mask (the face shape lifted up to its estimated hairline, with the
     box, closed, grown by 0.05 face widths) with the persona LoRA at 0.9 and ControlNets canny 0.50 / colour 0.85 / openpose 0.50, strength
     0.45 of 50 DPM++ 2M SDE Karras steps, CFG 7; then colour transfer toward the template. Both
     passes run their ControlNets in webui's control mode "My prompt is more important"
     (`GenerateConfig.control_mode`), and read prompts in webui's syntax (pipeline.prompts).
  4. A second fusion (0.6).
  5. Pass 2 inpaints the ring around the face contour plus the eyes and lips (canny 1.0 + tile
     1.0, strength 0.30 of 20 steps): it repairs the seams the fusion leaves. It starts from the
     second fusion, and its canny and tile controls are drawn from that same image. Then colour
     transfer of the face toward the template's face (EasyPhoto's "color shift last").
  6. Retouch hook, paste back into the full template, super-resolution hook.
  7. Identity score: cosine between the output face's embedding and the reference face's; and,
     where preprocessing held a photo out of training and fusion, to that photo's (the honest
     likeness: similarity to the fused reference rewards pasting it).

Every edit is composited through a feathered mask, so pixels away from the face keep the
template's exact values.

Speed (diffusion). `DiffusionEngine` builds the two diffusers inpaint pipelines once from the
resident components (they share the UNet, VAE, text encoder and ControlNets) and is reused for
every portrait. Per persona the LoRA is fused into the weights once through diffusers (load, fuse
at its scale, unload: rank x checkpoints of LoRA matmuls would otherwise run at every step) and the
fused weights are kept (`FusedLora`): each render call copies them in and the originals back, so
the resident models are exactly as before between calls (a bf16 unfuse would not be exact) and a
persona's next call costs two memory copies, not a LoRA load. Each template's prompt (its own
words with the defaults, `portrait_prompts`) is encoded once per call for both passes. A batch of
templates renders in one pipeline call per pass, and the masked image, which only 9-channel
inpainting UNets read, is not VAE-encoded (`controlnet_inpaint_pipeline`). On CUDA:
channels_last, cuDNN autotuning, and the UNet, ControlNet and VAE encoder/decoder forwards
replayed as CUDA graphs (`GraphedForward`), because at these sizes the GPU waits on kernel
launches. The graphs are installed only while the engine renders, so training on the same
resident models never sees them, and they survive persona changes because the LoRA swaps write
the weights in place.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from pipeline.common import CancelToken, Progress, ProgressCallback, gettext_noop, ignore_progress
from pipeline.cudagraphs import GraphedForward
from pipeline.faces import Face, FaceAnalyzer, likeness, load_face_analyzer
from pipeline.fusion import (
    EYES,
    OUTER_LIPS,
    FusionConfig,
    composite,
    disk,
    face_width,
    feathered,
    fuse_face,
    hairline,
    similarity_transform,
    transform_points,
)
from pipeline.compiling import CompiledForwards, CompiledGroupNorms
from pipeline.prompts import EASYPHOTO_NEGATIVE, EASYPHOTO_POSITIVE, encode_prompts
from pipeline.swapper import LearnedSwapper
from pipeline.preprocess import PreprocessConfig, crop_around_face, load_photo, no_restoration

if TYPE_CHECKING:
    import torch

    from pipeline.models import ModelSet

ImageHook = Callable[[Image.Image], Image.Image]

TEMPLATE_REASONS = {
    "no_face": gettext_noop("We could not find a face in this template."),
    "face_too_small": gettext_noop("The face in this template is too small; use a larger or closer photo."),
}

CONTROL_MODES = ("balanced", "prompt", "control")  # GenerateConfig.control_mode

@dataclass(frozen=True)
class InpaintPass:
    """One diffusion pass: which ControlNets at which scale, how much of the schedule to run."""

    controlnets: tuple[tuple[str, float], ...]
    strength: float
    steps: int


@dataclass(frozen=True)
class GenerateConfig:
    """EasyPhoto's inference defaults (DESIGN.md s.4)."""

    crop_scale: float = 3.0  # template crop: face box x3
    crop_size: int = 512
    # Diffusion's fusions (pipeline.fusion): EasyPhoto's rule, eyes 1.0, the template's lips, the
    # rest 0.6; the passes rebuild identity with the LoRA, and pass 2 repaints the eyes and lips.
    fusion: FusionConfig = FusionConfig()
    # Classic has no diffusion after the fusion to bring identity back nor to repaint a mouth, so
    # it fuses fully, lips too: with the template's lips, doubles were recognised less well
    # (bench/fusion.py).
    classic_fusion: FusionConfig = FusionConfig(lips=1.0, rest=1.0)
    # Sizes below are fractions of the face's width (its jaw's ends, pipeline.fusion.face_width).
    dilate_fraction: float = 0.05  # pass-1 mask grows by this (EasyPhoto's, up to the hairline)
    edge_fraction: float = 0.06  # pass-2 ring: this fraction of face width either side of the contour
    feather_fraction: float = 0.02  # composite masks are blurred by this fraction of face width
    canny_low: int = 100
    canny_high: int = 200
    lora_scale: float = 0.9
    prompt: str = EASYPHOTO_POSITIVE
    negative_prompt: str = EASYPHOTO_NEGATIVE
    guidance_scale: float = 7.0
    # sd-webui-controlnet's control mode. EasyPhoto sets "My prompt is more important" on every
    # unit ("to better control lips and eyes"): each ControlNet's 13 residuals are scaled from 0.1
    # (the first down block) up to 1.0 (the middle block), webui's 0.825^(12 - i), here diffusers'
    # guess-mode scales (10^(-(12 - i)/12), within 0.6% of them), on both halves of the CFG batch.
    # "balanced" scales every residual evenly. "control" ("ControlNet is more important") adds to
    # the soft scales what diffusers calls guess mode: the ControlNets see the conditional half only,
    # which halves their arithmetic (38% of pass 1's) and changes the output.
    control_mode: str = "prompt"
    pass1: InpaintPass = InpaintPass((("canny", 0.50), ("color", 0.85), ("openpose", 0.50)), 0.45, 50)
    pass2: InpaintPass = InpaintPass((("canny", 1.0), ("tile", 1.0)), 0.30, 20)
    seed: int = 0
    cuda_graphs: bool = True
    channels_last: bool = True  # UNet, VAE and ControlNet memory format (CUDA only)
    compiled_norms: bool = False  # experiment: pipeline.compiling's compiled GroupNorm (see there)
    # experiment: each model's forward compiled whole by this torch.compile backend, e.g. "inductor"
    # (pipeline.compiling's CompiledForwards); None runs them as they are.
    compile_backend: str | None = None

    def __post_init__(self) -> None:
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}, not {self.control_mode!r}")


# --------------------------------------------------------------------------- inputs


class TemplateRefused(ValueError):
    """A template that cannot serve: `reason` is a TEMPLATE_REASONS key, the message is for staff."""

    def __init__(self, reason: str) -> None:
        super().__init__(TEMPLATE_REASONS[reason])
        self.reason = reason


@dataclass(frozen=True)
class TemplateFaces:
    """A template image and its faces, largest first; portraits replace the first.

    `prompt` and `negative_prompt` are the template's own words (staff write them with the
    template), used with the configuration's defaults by the diffusion engine (EasyPhoto's
    "additional prompt"); the classic engine has no prompt.
    """

    image: Image.Image
    faces: list[Face]
    prompt: str = ""
    negative_prompt: str = ""

    @property
    def face(self) -> Face:
        return self.faces[0]

    @property
    def boxes(self) -> list[list[float]]:
        return [[round(v, 1) for v in face.box] for face in self.faces]


def analyse_template(
    image: Image.Image, analyzer: FaceAnalyzer, prompt: str = "", negative_prompt: str = ""
) -> TemplateFaces:
    """Finds the template's faces for the staff upload; refuses one with no usable face."""
    image = image.convert("RGB")
    faces = analyzer.analyze(image)
    if not faces:
        raise TemplateRefused("no_face")
    if faces[0].width < analyzer.thresholds.min_face_size:
        raise TemplateRefused("face_too_small")
    return TemplateFaces(image, faces, prompt.strip(), negative_prompt.strip())


def portrait_prompts(caption: str, template: TemplateFaces, config: GenerateConfig) -> tuple[str, str]:
    """(prompt, negative prompt) of one portrait: the persona's trigger phrase, the template's own
    words, then the defaults, in webui's prompt syntax (pipeline.prompts)."""
    prompt = ", ".join(part for part in (caption, template.prompt, config.prompt) if part)
    negative = ", ".join(part for part in (template.negative_prompt, config.negative_prompt) if part)
    return prompt, negative


@dataclass(frozen=True)
class Persona:
    """What rendering needs of a persona folder (see pipeline.preprocess and pipeline.train)."""

    folder: Path
    reference: Image.Image  # reference.png: the most frontal crop
    reference_face: Face  # its face in reference.png pixels: the fusions warp by its landmarks
    embedding: np.ndarray  # the reference face's identity embedding, unit norm
    caption: str  # the trigger phrase the LoRA was trained with
    held_out: np.ndarray | None = None  # a photo never trained on nor fused: its embedding, unit norm

    @property
    def best_face_path(self) -> Path:
        """The best validation face written by training; the reference stands in before training."""
        path = self.folder / "best_face.png"
        return path if path.is_file() else self.folder / "reference.png"


def load_persona(folder: str | Path, analyzer: FaceAnalyzer) -> Persona:
    """Reads persona.json and reference.png; the embedding is the reference photo's own, and
    `held_out` the held-out photo's where preprocessing kept one out."""
    folder = Path(folder)
    record_path = folder / "persona.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"no persona.json in {folder}: run `python -m pipeline preprocess` first")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    reference = record.get("reference")
    if reference is None:
        raise ValueError(f"persona {folder} has no reference face (no photo was accepted)")
    if record["backend"] != analyzer.name:
        raise ValueError(
            f"persona {folder} was analysed with {record['backend']}, not {analyzer.name}: "
            "identity embeddings of different backends cannot be compared"
        )
    embedding = next(item["embedding"] for item in record["train"] if item["name"] == reference["name"])
    image = Image.open(folder / reference["image"]).convert("RGB")
    return Persona(
        folder=folder,
        reference=image,
        reference_face=reference_face(image, np.asarray(reference["keypoints"], np.float32), analyzer),
        embedding=np.asarray(embedding, np.float32),
        caption=record["caption"],
        held_out=None if not record.get("held_out") else np.asarray(record["held_out"]["embedding"], np.float32),
    )


def reference_face(image: Image.Image, keypoints: np.ndarray, analyzer: FaceAnalyzer) -> Face:
    """The face of the reference crop that preprocessing chose (its keypoints are recorded), found
    again for its landmarks, which persona.json does not keep."""
    faces = analyzer.analyze(image)
    if not faces:
        raise ValueError("no face found in the reference photo")
    return min(faces, key=lambda face: float(np.abs(face.keypoints - keypoints).sum()))


# --------------------------------------------------------------------------- geometry and masks


@dataclass(frozen=True)
class TemplateCrop:
    image: np.ndarray  # (crop_size, crop_size, 3) uint8 RGB
    face: Face  # the template's face in crop pixels
    window: tuple[float, float, float]  # left, top, side of the crop in template pixels


def crop_template(template: TemplateFaces, config: GenerateConfig) -> TemplateCrop:
    """The template cropped around its face (box x3, square, crop_size px), via preprocess's crop."""
    face = template.face
    framing = PreprocessConfig(crop_scale=config.crop_scale, crop_size=config.crop_size)
    crop = crop_around_face(template.image, face, framing)
    scale = (crop.box[2] - crop.box[0]) / face.width
    left, top = face.box[0] - crop.box[0] / scale, face.box[1] - crop.box[1] / scale
    landmarks = None
    if face.landmarks is not None:
        landmarks = ((face.landmarks - np.array([left, top], np.float32)) * scale).astype(np.float32)
    in_crop = replace(face, box=crop.box, keypoints=crop.keypoints, landmarks=landmarks)
    return TemplateCrop(np.asarray(crop.image), in_crop, (left, top, config.crop_size / scale))


def face_shape(face: Face, size: tuple[int, int]) -> np.ndarray:
    """The face itself (uint8 0/255, height x width): the hull of its 68 landmarks."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(face.landmarks).astype(np.int32)), 255)
    return mask


def inpaint_mask(face: Face, shape: np.ndarray, config: GenerateConfig) -> np.ndarray:
    """Pass 1: the face shape and box, up to the estimated hairline (pipeline.fusion.hairline), closed
    (no holes between them) and grown by `dilate_fraction` of the face's width (EasyPhoto's 0.05)."""
    mask = shape.copy()
    x0, y0, x1, y1 = (round(v) for v in face.box)
    cv2.rectangle(mask, (x0, y0), (x1, y1), 255, -1)
    forehead = np.vstack([face.landmarks[[0, 16]], hairline(face.landmarks)])
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(forehead).astype(np.int32)), 255)
    radius = config.dilate_fraction * face_width(face.landmarks)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, disk(radius))
    return cv2.dilate(mask, disk(radius))


def edge_mask(face: Face, shape: np.ndarray, config: GenerateConfig) -> np.ndarray:
    """Pass 2: the ring around the face contour plus the eyes and the lips (EasyPhoto's)."""
    kernel = disk(config.edge_fraction * face_width(face.landmarks))
    ring = cv2.subtract(cv2.dilate(shape, kernel), cv2.erode(shape, kernel))
    features = np.zeros_like(shape)
    for part in (*EYES, OUTER_LIPS):
        cv2.fillConvexPoly(features, cv2.convexHull(np.round(face.landmarks[part]).astype(np.int32)), 255)
    return cv2.max(ring, cv2.dilate(features, kernel))


def soft(mask: np.ndarray, face: Face, config: GenerateConfig) -> np.ndarray:
    """The mask feathered over `feather_fraction` of the face's width, inside itself."""
    return feathered(mask, config.feather_fraction * face_width(face.landmarks))


# --------------------------------------------------------------------------- colour, fusion, controls


def color_transfer(
    source: np.ndarray, target: np.ndarray, source_mask: np.ndarray, target_mask: np.ndarray
) -> np.ndarray:
    """`source` recoloured so its Lab mean and spread inside `source_mask` match `target`'s inside
    `target_mask` (EasyPhoto's colour transfer, restricted to the face so backgrounds do not count)."""
    source_lab = cv2.cvtColor(source.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    target_lab = cv2.cvtColor(target.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    s_mean, s_std = cv2.meanStdDev(source_lab, mask=source_mask)
    t_mean, t_std = cv2.meanStdDev(target_lab, mask=target_mask)
    lab = (source_lab - s_mean.ravel()) * (t_std.ravel() / np.maximum(s_std.ravel(), 1e-3)) + t_mean.ravel()
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def recolour_face(image: np.ndarray, template: np.ndarray, shape: np.ndarray, face: Face, config: GenerateConfig):
    """The face in `image` recoloured toward the template's own face, inside the face shape
    (EasyPhoto's "color shift last", on by default there): diffusion drifts the skin tone."""
    toned = color_transfer(image, template, shape, shape)
    return composite(image, toned, soft(shape, face, config))


def fused_into(
    crop: TemplateCrop,
    persona: Persona,
    config: FusionConfig,
    swapper: LearnedSwapper | None,
    image: np.ndarray | None = None,
):
    """The persona's face fused into the crop's face (pipeline.fusion); `image` replaces the
    crop's pixels (the diffusion engine's second fusion). The source is the reference photo, or
    with a learned swapper the crop's own face redrawn with the persona's identity (already in
    the crop's geometry, so the warp leaves it in place)."""
    base = crop.image if image is None else image
    if swapper is None:
        source, landmarks = np.asarray(persona.reference), persona.reference_face.landmarks
    else:
        source, landmarks = swapper.swap(base, crop.face, persona.embedding), crop.face.landmarks
    return fuse_face(base, crop.face.landmarks, source, landmarks, config)


def canny_control(image: np.ndarray, config: GenerateConfig) -> np.ndarray:
    edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), config.canny_low, config.canny_high)
    return np.repeat(edges[..., None], 3, axis=2)


def color_control(image: np.ndarray, config: GenerateConfig) -> np.ndarray:
    """The colour control: the fused image itself at full resolution (EasyPhoto's `blur_ratio=1`;
    its first releases used an 8x8 mosaic, which left the ControlNet no face colour to follow)."""
    return image.copy()


def pose_control(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Face landmarks drawn as openpose's face renderer does: white dots, radius 3, on black."""
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    for x, y in np.round(points).astype(int):
        cv2.circle(canvas, (int(x), int(y)), 3, (255, 255, 255), -1)
    return canvas


def pasted_landmarks(pose_face: Face, target: Face) -> np.ndarray:
    """The pose face's landmarks after its similarity paste onto the target face."""
    return transform_points(similarity_transform(pose_face.keypoints, target.keypoints), pose_face.landmarks)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PortraitMasks:
    """The masks used, in crop pixels (uint8 L images); the inpaint masks are None for classic."""

    face: Image.Image  # the face shape the fusions clone into
    paste: Image.Image  # where the crop was pasted back into the template
    inpaint: Image.Image | None = None  # pass 1
    edge: Image.Image | None = None  # pass 2


@dataclass(frozen=True)
class PortraitResult:
    image: Image.Image  # the template with the persona's face, template size (unless upscaled)
    identity_score: float | None  # cosine to the reference face; None when no face is found
    held_out_score: float | None  # cosine to the held-out photo; None without a face or such a photo
    engine: str  # "classic" or "diffusion"
    crop: Image.Image  # the rendered crop before paste-back
    window: tuple[float, float, float]  # left, top, side of the crop in template pixels
    masks: PortraitMasks


def rendered_embedding(image: Image.Image, face: Face, analyzer: FaceAnalyzer) -> np.ndarray | None:
    """The identity embedding of the face found where the template's face was, if one is."""
    centre = np.array([(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2])
    near = [
        found for found in analyzer.analyze(image)
        if np.linalg.norm(np.array([(found.box[0] + found.box[2]) / 2, (found.box[1] + found.box[3]) / 2]) - centre)
        < face.width / 2
    ]
    return near[0].embedding if near else None


def cosine_to(embedding: np.ndarray | None, reference: np.ndarray | None) -> float | None:
    return None if embedding is None or reference is None else float(embedding @ reference)


def paste_back(
    template: Image.Image, crop: np.ndarray, window: tuple[float, float, float], alpha: np.ndarray
) -> Image.Image:
    """The crop, scaled back to its window, blended into the template where `alpha` > 0 only."""
    left, top, side = window
    x0, y0 = max(0, int(np.floor(left))), max(0, int(np.floor(top)))  # float error can put them at -1e-13
    x1, y1 = min(template.width, int(np.ceil(left + side))), min(template.height, int(np.ceil(top + side)))
    # Affine map from template pixels (inside the integer box) to crop pixels.
    scale = crop.shape[1] / side
    to_crop = np.array([[scale, 0, (x0 - left) * scale], [0, scale, (y0 - top) * scale]], np.float32)
    size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_AREA if scale > 1 else cv2.INTER_CUBIC
    region = cv2.warpAffine(crop, to_crop, size, flags=flags | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    region_alpha = cv2.warpAffine(alpha, to_crop, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    out = np.asarray(template).copy()
    out[y0:y1, x0:x1] = composite(out[y0:y1, x0:x1], region, region_alpha)
    return Image.fromarray(out)


# --------------------------------------------------------------------------- diffusion engine


@dataclass
class DiffusionEngine:
    """Both inpaint pipelines, built once from the resident components and shared by every portrait."""

    pass1: object  # StableDiffusionControlNetInpaintPipeline with pass 1's ControlNets
    pass2: object  # the same components with pass 2's ControlNets
    graphed: list[GraphedForward] = field(default_factory=list)
    norms: CompiledGroupNorms | None = None
    compiled: CompiledForwards | None = None
    lora: FusedLora | None = None  # the last persona's, kept for its next call

    @classmethod
    def from_models(cls, models: ModelSet, config: GenerateConfig = GenerateConfig()) -> DiffusionEngine:
        import torch
        from diffusers import DPMSolverMultistepScheduler

        def pipeline(step: InpaintPass):
            # DPM++ 2M SDE Karras, each pipeline its own scheduler (schedulers hold per-call state).
            scheduler = DPMSolverMultistepScheduler.from_config(
                models.scheduler.config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
            )
            pipeline_class = controlnet_inpaint_pipeline()
            pipe = pipeline_class(
                vae=models.vae,
                text_encoder=models.text_encoder,
                tokenizer=models.tokenizer,
                unet=models.unet,
                controlnet=pipeline_class.ControlNets([models.controlnet(kind) for kind, _ in step.controlnets]),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe

        engine = cls(pipeline(config.pass1), pipeline(config.pass2))
        nets = {id(net): net for pipe in (engine.pass1, engine.pass2) for net in pipe.controlnet.nets}
        coders = (models.vae.encoder, models.vae.decoder)
        if config.compiled_norms:
            engine.norms = CompiledGroupNorms(models.unet, models.vae, *nets.values())
        if config.compile_backend is not None:
            engine.compiled = CompiledForwards(models.unet, *nets.values(), *coders, backend=config.compile_backend)
        if models.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            layout = torch.channels_last if config.channels_last else torch.contiguous_format
            for module in (models.unet, models.vae, *nets.values()):
                module.to(memory_format=layout)
            if config.cuda_graphs:
                pool = torch.cuda.graph_pool_handle()
                engine.graphed = [GraphedForward(m, pool) for m in (models.unet, *nets.values(), *coders)]
        return engine

    @property
    def device(self) -> torch.device:
        return self.pass1.unet.device

    @contextmanager
    def session(self, lora: LoraSource | None, scale: float) -> Iterator[None]:
        """The persona's LoRA fused in place and the CUDA graphs installed, for one render call.

        The last persona's fused weights are kept: the next call for the same LoRA (by its key)
        neither fetches nor fuses it again."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            if lora is not None:
                if self.lora is None or self.lora.key != (lora.key, scale):
                    self.lora = None  # free the last persona's copies first
                    self.lora = fuse_lora(self.pass1, lora.fetch(), scale, key=lora.key)
                stack.enter_context(self.lora.applied())
            # The compiled experiments before the graphs: the graphs' warm-up calls compile, and
            # the graphs capture the compiled forwards.
            for experiment in (self.compiled, self.norms):
                if experiment is not None:
                    stack.enter_context(experiment.installed())
            for graphed in self.graphed:
                stack.enter_context(graphed.installed())
            yield

    def forget_lora(self) -> None:
        """Drops the kept persona's fused weights (the models hold the originals between calls)."""
        import torch

        self.lora = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def encode_prompt(self, prompts: list[tuple[str, str]]):
        """(prompt, negative) embeddings, one row per image, computed once for both passes; in
        webui's prompt syntax (pipeline.prompts), all padded to one length."""
        pipe = self.pass1
        texts = [p for p, _ in prompts] + [n for _, n in prompts]
        embeddings = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, self.device)
        return embeddings[: len(prompts)], embeddings[len(prompts) :]


@dataclass(frozen=True)
class LoraSource:
    """A persona's LoRA file as the engine caches it: `key` names its contents (two different
    files never share one), and `fetch` returns a local path, called only when the engine does not
    hold that LoRA already. The site's key is the stored file's name; its fetch copies the gigabyte
    out of media storage, which a second request for the same double skips."""

    key: str
    fetch: Callable[[], Path]

    @classmethod
    def local(cls, path: str | Path) -> LoraSource:
        """A file on this machine, keyed by where it is."""
        path = Path(path)
        return cls(str(path.resolve()), lambda: path)


@dataclass
class FusedLora:
    """A persona LoRA fused at its scale: the touched layers with their original and fused weights.

    Computed once per persona through diffusers (load, fuse, unload), then swapped in and out of the
    resident models by in-place copies: a render call leaves the models exactly as it found them,
    and a second call for the same persona costs two memory copies instead of a LoRA load.
    """

    key: tuple[str, float]
    layers: list
    original: list
    fused: list

    @contextmanager
    def applied(self) -> Iterator[None]:
        import torch

        with torch.no_grad():
            for layer, weight in zip(self.layers, self.fused):
                layer.weight.copy_(weight)
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, weight in zip(self.layers, self.original):
                    layer.weight.copy_(weight)


@functools.cache
def controlnet_inpaint_pipeline() -> type:
    """diffusers' ControlNet inpaint pipeline with webui's control modes, without the VAE encode of
    the masked image.

    `control_mode` (GenerateConfig's): diffusers ties the soft per-block scales of guess mode to
    running the ControlNets on the conditional half only; EasyPhoto's mode wants the scales on the
    whole CFG batch, so the ControlNets get guess mode on their own (`SoftScaledControlNets`, which
    the pipeline must be built with).

    The masked image's latents are an input of 9-channel inpainting UNets only; SD1.5's UNet has 4
    channels and never reads them, yet the pipeline encodes the masked image of every portrait in
    both passes (2.3% of a portrait's arithmetic, bench/flops.py). A latent-shaped placeholder
    takes its place.
    """
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from diffusers.models import MultiControlNetModel

    class SoftScaledControlNets(MultiControlNetModel):
        """The ControlNets summed; with `soft_scales` each one scales its residuals as in guess
        mode, whichever part of the batch the pipeline hands it."""

        soft_scales = False

        def forward(self, *args, guess_mode: bool = False, **kwargs):
            return super().forward(*args, guess_mode=guess_mode or self.soft_scales, **kwargs)

    class ControlNetInpaintPipeline(StableDiffusionControlNetInpaintPipeline):
        ControlNets = SoftScaledControlNets  # the `controlnet` it is built with

        def __call__(self, *args, control_mode: str = "balanced", **kwargs):
            if not isinstance(self.controlnet, SoftScaledControlNets):
                raise TypeError("build this pipeline with controlnet=ControlNetInpaintPipeline.ControlNets([...])")
            self.controlnet.soft_scales = control_mode != "balanced"
            return super().__call__(*args, guess_mode=control_mode == "control", **kwargs)

        def prepare_mask_latents(self, mask, masked_image, *args, **kwargs):
            if self.unet.config.in_channels == 4:
                side = self.vae_scale_factor
                shape = (len(masked_image), 4, masked_image.shape[-2] // side, masked_image.shape[-1] // side)
                masked_image = masked_image.new_zeros(shape)  # 4 channels: taken as latents, not encoded
            return super().prepare_mask_latents(mask, masked_image, *args, **kwargs)

    return ControlNetInpaintPipeline


def fuse_lora(pipe, path: Path, scale: float, key: str | None = None) -> FusedLora:
    """Fuses a LoRA file into the pipeline's UNet and text encoder at `scale` and records the fused
    weights under `key` (default: the file's path); the models are back to their original weights
    on return."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="persona")
    try:
        layers = [
            module.get_base_layer()
            for model in (pipe.unet, pipe.text_encoder)
            for module in model.modules()
            if isinstance(module, BaseTunerLayer)
        ]
        original = [layer.weight.detach().clone() for layer in layers]
        pipe.fuse_lora(lora_scale=scale, adapter_names=["persona"])
        fused = [layer.weight.detach().clone() for layer in layers]
    finally:
        pipe.unload_lora_weights()
    with torch.no_grad():
        for layer, weight in zip(layers, original):
            layer.weight.copy_(weight)
    return FusedLora((key or str(path.resolve()), scale), layers, original, fused)


def inpaint(
    pipe,
    step: InpaintPass,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    controls: dict[str, list[np.ndarray]],
    embeds: tuple,
    config: GenerateConfig,
    report: Callable[[float], None],
    cancel: CancelToken,
) -> list[np.ndarray]:
    """One diffusers pipeline call over the whole batch; returns uint8 RGB images."""
    import torch

    def on_step(_pipe, index: int, _timestep, tensors: dict) -> dict:
        cancel.raise_if_cancelled()
        report((index + 1) / max(1, int(step.steps * step.strength)))
        return tensors

    size = images[0].shape[0]
    generators = [torch.Generator(pipe.unet.device).manual_seed(config.seed + i) for i in range(len(images))]
    with torch.no_grad():
        out = pipe(
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            image=[Image.fromarray(i) for i in images],
            mask_image=[Image.fromarray(m) for m in masks],
            # One (batch, H, W, 3) array per ControlNet: diffusers refuses nested lists of images.
            control_image=[np.stack(controls[kind]).astype(np.float32) / 255.0 for kind, _ in step.controlnets],
            controlnet_conditioning_scale=[scale for _, scale in step.controlnets],
            control_mode=config.control_mode,
            height=size,
            width=size,
            strength=step.strength,
            num_inference_steps=step.steps,
            guidance_scale=config.guidance_scale,
            generator=generators,
            output_type="np",
            callback_on_step_end=on_step,
        ).images
    return [np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8) for image in out]


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Rendered:
    crop: np.ndarray
    masks: dict[str, np.ndarray]  # keys: face, paste, and for diffusion inpaint, edge


def _classic(crop: TemplateCrop, persona: Persona, config: GenerateConfig, swapper: LearnedSwapper | None) -> _Rendered:
    shape = face_shape(crop.face, (config.crop_size, config.crop_size))
    fused = fused_into(crop, persona, config.classic_fusion, swapper)
    # Pasted back where the fusion may show, grown by the feather so the paste's own soft edge
    # falls where the fusion's weights are already 0: the rest of the crop is the template resampled.
    paste = cv2.dilate(fused.mask, disk(config.feather_fraction * face_width(crop.face.landmarks)))
    return _Rendered(fused.image, {"face": shape, "paste": paste})


def _diffusion(
    engine: DiffusionEngine,
    crops: list[TemplateCrop],
    prompts: list[tuple[str, str]],
    persona: Persona,
    pose_face: Face,
    config: GenerateConfig,
    swapper: LearnedSwapper | None,
    progress: ProgressCallback,
    cancel: CancelToken,
) -> list[_Rendered]:
    size = (config.crop_size, config.crop_size)
    shapes = [face_shape(c.face, size) for c in crops]
    first = [fused_into(c, persona, config.fusion, swapper).image for c in crops]
    controls = {
        "canny": [canny_control(f, config) for f in first],
        "color": [color_control(f, config) for f in first],
        "openpose": [pose_control(pasted_landmarks(pose_face, c.face), size) for c in crops],
    }
    masks1 = [inpaint_mask(c.face, s, config) for c, s in zip(crops, shapes)]
    embeds = engine.encode_prompt(prompts)
    cancel.raise_if_cancelled()
    progress(Progress("pass 1", 0.0))
    generated = inpaint(
        engine.pass1, config.pass1, first, masks1, controls, embeds, config,
        lambda f: progress(Progress("pass 1", min(f, 1.0))), cancel,
    )
    second = []
    for crop, fused, mask, image in zip(crops, first, masks1, generated):
        toned = color_transfer(image, crop.image, mask, mask)
        passed = composite(fused, toned, soft(mask, crop.face, config))
        second.append(fused_into(crop, persona, config.fusion, swapper, image=passed).image)
    masks2 = [edge_mask(c.face, s, config) for c, s in zip(crops, shapes)]
    # As in EasyPhoto, pass 2 starts from the second fusion and is guided by it.
    controls = {"canny": [canny_control(f, config) for f in second], "tile": second}
    cancel.raise_if_cancelled()
    progress(Progress("pass 2", 0.0))
    refined = inpaint(
        engine.pass2, config.pass2, second, masks2, controls, embeds, config,
        lambda f: progress(Progress("pass 2", min(f, 1.0))), cancel,
    )
    return [
        _Rendered(
            recolour_face(composite(s, r, soft(m2, c.face, config)), c.image, shape, c.face, config),
            {"face": shape, "paste": m1, "inpaint": m1, "edge": m2},
        )
        for c, shape, s, r, m1, m2 in zip(crops, shapes, second, refined, masks1, masks2)
    ]


def render_portraits(
    persona: Persona,
    templates: Sequence[TemplateFaces],
    analyzer: FaceAnalyzer,
    config: GenerateConfig = GenerateConfig(),
    engine: DiffusionEngine | None = None,
    lora: str | Path | LoraSource | None = None,
    retouch: ImageHook = no_restoration,
    upscale: ImageHook = no_restoration,
    progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
    swapper: LearnedSwapper | None = None,
) -> list[PortraitResult]:
    """Renders the persona into every template: classic without `engine`, else the two diffusion
    passes with the persona's LoRA (`lora`, a path or a LoraSource; None renders without one), all
    templates in one batch. `swapper` (pipeline.swapper, optional) fuses by a learned model
    instead of the reference photo's pixels."""
    cancel = cancel or CancelToken()
    crops = [crop_template(t, config) for t in templates]
    progress(Progress("preparing", 0.0, f"{len(crops)} template(s)"))
    if engine is None:
        rendered = []
        for index, crop in enumerate(crops):
            cancel.raise_if_cancelled()
            rendered.append(_classic(crop, persona, config, swapper))
            progress(Progress("fusing", (index + 1) / len(crops)))
    else:
        # The pose comes from the best validation face; where no face is found in it (a poorly
        # trained double), the reference photo, which always has one, stands in.
        pose_faces = analyzer.analyze(Image.open(persona.best_face_path).convert("RGB")) or analyzer.analyze(
            persona.reference
        )
        if not pose_faces:
            raise ValueError(f"no face found in {persona.best_face_path} nor in the reference photo")
        source = lora if isinstance(lora, LoraSource) or lora is None else LoraSource.local(lora)
        with engine.session(source, config.lora_scale):
            prompts = [portrait_prompts(persona.caption, t, config) for t in templates]
            rendered = _diffusion(engine, crops, prompts, persona, pose_faces[0], config, swapper, progress, cancel)
    results = []
    progress(Progress("finishing", 0.0))
    for index, (template, crop, done) in enumerate(zip(templates, crops, rendered)):
        cancel.raise_if_cancelled()
        face_crop = retouch(Image.fromarray(done.crop))
        alpha = soft(done.masks["paste"], crop.face, config)
        image = upscale(paste_back(template.image, np.asarray(face_crop), crop.window, alpha))
        embedding = rendered_embedding(face_crop, crop.face, analyzer)
        results.append(
            PortraitResult(
                image=image,
                identity_score=cosine_to(embedding, persona.embedding),
                held_out_score=cosine_to(embedding, persona.held_out),
                engine="classic" if engine is None else "diffusion",
                crop=face_crop,
                window=crop.window,
                masks=PortraitMasks(**{k: Image.fromarray(v) for k, v in done.masks.items()}),
            )
        )
        progress(Progress("finishing", (index + 1) / len(crops)))
    return results


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("persona", type=Path, help="persona folder (preprocess output, plus training's files)")
    parser.add_argument("template", type=Path, help="template image")
    parser.add_argument("--out", type=Path, required=True, help="portrait file to write (PNG)")
    parser.add_argument("--engine", choices=("classic", "diffusion"), help="default: diffusion when --models is given")
    parser.add_argument("--models", type=Path, help="diffusion model folder (see pipeline.models)")
    parser.add_argument("--lora", type=Path, help="default: PERSONA/persona_lora.safetensors")
    parser.add_argument("--backend", choices=("dlib", "insightface"), default="dlib")
    parser.add_argument("--face-models", type=Path, help="face model folder (required for insightface)")
    parser.add_argument("--swapper", type=Path, help="an inswapper_128-shaped ONNX file (pipeline.swapper; insightface)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--prompt", default="", help="the template's own words, added to the default prompt")
    parser.add_argument("--negative-prompt", default="", help="added to the default negative prompt")


def run(args: argparse.Namespace) -> dict:
    engine_name = args.engine or ("diffusion" if args.models else "classic")
    if engine_name == "diffusion" and args.models is None:
        raise ValueError("the diffusion engine needs --models")
    analyzer = load_face_analyzer(args.backend, args.face_models)
    persona = load_persona(args.persona, analyzer)
    image = load_photo(args.template.read_bytes()) if args.template.is_file() else None
    if image is None:
        raise FileNotFoundError(f"template image not found or unreadable: {args.template}")
    template = analyse_template(image, analyzer, args.prompt, args.negative_prompt)
    started = time.perf_counter()
    engine = lora = None
    if engine_name == "diffusion":
        from pipeline.models import load_models

        engine = DiffusionEngine.from_models(load_models(args.models, args.device))
        lora = args.lora or args.persona / "persona_lora.safetensors"
    swapper = LearnedSwapper(args.swapper) if args.swapper else None
    (result,) = render_portraits(persona, [template], analyzer, engine=engine, lora=lora, swapper=swapper)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.out)
    return {
        "out": str(args.out),
        "engine": result.engine,
        "identity_score": None if result.identity_score is None else round(result.identity_score, 4),
        "likeness": None if result.identity_score is None else round(likeness(result.identity_score, analyzer.thresholds)),
        "held_out_likeness": (
            None if result.held_out_score is None else round(likeness(result.held_out_score, analyzer.thresholds))
        ),
        "template_faces": template.boxes,
        "seconds": round(time.perf_counter() - started, 3),
    }
