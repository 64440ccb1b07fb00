"""The arithmetic of the default training run and of a portrait, at SD1.5's real shapes.

    python bench/flops.py                      # CPU, about a minute; nothing downloads
    python bench/flops.py --peak-tflops 790    # the H200's measured bf16 matmul rate (DESIGN.md)
    python bench/flops.py --smoke              # seconds: does it still run? (tests/test_bench_smoke.py)

What runs is the real code: `train_persona` and `render_portraits` on the tiny random models,
with a hook on every UNet, ControlNet, VAE coder and text-encoder call that records its stage,
batch, input size and grad mode. Each recorded call is then replayed at SD1.5's shapes (the
tiny crop scaled to 512 px) on the meta device under torch's FlopCounterMode, which counts
matmuls, convolutions and attention (forward, and backward for the training calls, with the
rank-128 LoRA attached). No weights exist on the meta device, so this takes seconds.

The tables give, per stage and model, the calls, the images through them, the TFLOP and the time
they would take at `--peak-tflops`: the floor that no kernel work goes below. The last line is
`train_run_tflop=N train_floor_s=N portrait_tflop=N batch4_floor_portraits_per_s=N`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.generate import SyntheticFaces, random_lora, synthetic_persona_and_templates, with_steps  # noqa: E402
from bench.train import SHAPES, random_models, synthetic_photos  # noqa: E402
from pipeline.common import Progress  # noqa: E402
from pipeline.generate import DiffusionEngine, GenerateConfig, render_portraits  # noqa: E402
from pipeline.models import CONTROLNET_KINDS  # noqa: E402
from pipeline.tinykit import build_components, pixel_embedder, random_controlnet  # noqa: E402
from pipeline.train import TrainConfig, add_lora, centred_templates, native_resolution, train_persona  # noqa: E402

SD15_SIZE = 512
TRAIN_STEPS, TRAIN_CHECKPOINTS = 2, 2  # the tiny run; the default run has 800 and 8
SMOKE_STEPS = 4  # --smoke: each portrait pass this long, counted at the tiny shapes (figures of no real run)


@dataclass(frozen=True)
class Call:
    """One forward of a model as the pipeline made it: where, how big, and whether it trained."""

    stage: str
    model: str  # "unet", "controlnet", "vae encoder", "vae decoder", "text encoder"
    batch: int
    height: int  # of the image (VAE encoder, ControlNet) or latents (UNet, VAE decoder); 0 for text
    width: int
    training: bool


class CallRecorder:
    """Forward pre-hooks on the models of a tiny run; the stage comes from the progress reports."""

    def __init__(self, models) -> None:
        self.models = models
        self.stage = "setup"
        self.calls: Counter[Call] = Counter()

    def progress(self, update: Progress) -> None:
        self.stage = update.stage

    @contextmanager
    def recording(self) -> Iterator[CallRecorder]:
        m = self.models
        watched = [(m.unet, "unet"), (m.vae.encoder, "vae encoder"), (m.vae.decoder, "vae decoder"),
                   (m.text_encoder, "text encoder")] + [(net, "controlnet") for net in m.controlnets.values()]
        hooks = [module.register_forward_pre_hook(self._hook(name), with_kwargs=True) for module, name in watched]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, name: str):
        def record(_module, args, kwargs) -> None:
            first = args[0] if args else next(iter(kwargs.values()))
            if name == "controlnet":  # its size is the control image's
                first = kwargs.get("controlnet_cond", args[3] if len(args) > 3 else first)
            height, width = (first.shape[-2], first.shape[-1]) if first.dim() == 4 else (0, 0)
            training = torch.is_grad_enabled()  # a training step reports its progress only after it ran
            stage = "training" if training else self.stage
            self.calls[Call(stage, name, first.shape[0], height, width, training)] += 1

        return record


def record_training(models) -> Counter[Call]:
    resolution = native_resolution(models)
    config = TrainConfig(max_steps=TRAIN_STEPS, checkpoint_every=TRAIN_STEPS // TRAIN_CHECKPOINTS, rank=4, alpha=2)
    recorder = CallRecorder(models)
    with recorder.recording(), tempfile.TemporaryDirectory() as out:
        train_persona(
            models, synthetic_photos(5, resolution, seed=1), out, pixel_embedder,
            centred_templates(synthetic_photos(4, resolution, seed=2)), config, progress=recorder.progress,
        )
    return recorder.calls


def record_portraits(models, batch: int, steps: int | None = None) -> Counter[Call]:
    config = with_steps(GenerateConfig(crop_size=native_resolution(models)), steps)
    analyzer = SyntheticFaces()
    persona, templates = synthetic_persona_and_templates(analyzer, config.crop_size, batch)
    engine = DiffusionEngine.from_models(models, config)
    recorder = CallRecorder(models)
    with recorder.recording():
        render_portraits(persona, templates, analyzer, config, engine=engine,
                         lora=random_lora(models, persona.folder), progress=recorder.progress)
    return recorder.calls


class SD15Flops:
    """FLOPs of one call at SD1.5's shapes, counted on the meta device (cached per shape); `shapes`
    "tiny" (--smoke) counts the tiny models' instead, which takes a second, not ten."""

    def __init__(self, rank: int, shapes: str = "sd15") -> None:
        from diffusers import ControlNetModel

        unet, vae, text = SHAPES[shapes]
        self.hidden_size = text["hidden_size"]
        with torch.device("meta"):
            plain, lora = (build_components(unet, vae, text) for _ in range(2))
            self.controlnet = ControlNetModel.from_unet(plain["unet"])
        add_lora(lora["unet"], lora["text_encoder"], TrainConfig(rank=rank))
        self.unet, self.vae, self.text = plain["unet"], plain["vae"], plain["text_encoder"]
        self.lora_unet, self.lora_text = lora["unet"], lora["text_encoder"]
        self.cache: dict[tuple, float] = {}

    def __call__(self, call: Call, scale: int) -> float:
        key = (call.model, call.height * scale, call.width * scale, call.training)
        if key not in self.cache:
            self.cache[key] = self._count(*key)
        return self.cache[key] * call.batch

    def _count(self, model: str, height: int, width: int, training: bool) -> float:
        meta = {"device": "meta"}
        tokens = torch.zeros(1, 77, dtype=torch.long, **meta)
        # In a training step the caption's embedding carries gradients back to the text encoder's LoRA.
        hidden = torch.zeros(1, 77, self.hidden_size, **meta).requires_grad_(training)
        step = torch.zeros(1, **meta)
        latent_hw = (height // 8, width // 8) if model == "controlnet" else (height, width)
        latents = torch.zeros(1, 4, *latent_hw, **meta)
        runs = {
            "unet": lambda: (self.lora_unet if training else self.unet)(latents, step, hidden).sample,
            "controlnet": lambda: self.controlnet(
                latents, step, hidden, controlnet_cond=torch.zeros(1, 3, height, width, **meta), return_dict=False
            )[1],
            "vae encoder": lambda: self.vae.encoder(torch.zeros(1, 3, height, width, **meta)),
            "vae decoder": lambda: self.vae.decoder(latents),
            "text encoder": lambda: (self.lora_text if training else self.text)(tokens)[0],
        }
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
            out = runs[model]()
            if training:
                out.float().square().mean().backward()
        return float(counter.get_total_flops())


@dataclass
class Row:
    calls: float = 0.0
    images: float = 0.0
    tflop: float = 0.0


def rows_by_model(calls: Counter[Call], flops: SD15Flops, scale: int, repeat: dict[str, float]) -> dict[tuple, Row]:
    """(stage, model) -> calls, images and TFLOP; stages in `repeat` multiplied (the tiny run's 2
    training steps and 2 validations stand for the default run's 800 and 8)."""
    rows: dict[tuple, Row] = {}
    for call, count in calls.items():
        times = count * repeat.get(call.stage, 1.0)
        row = rows.setdefault((call.stage, call.model), Row())
        row.calls += times
        row.images += times * call.batch
        row.tflop += times * flops(call, scale) / 1e12
    return rows


def print_rows(title: str, rows: dict[tuple, Row], peak: float) -> float:
    print(f"| {title} | model | calls | images | TFLOP | floor s |")
    print("|---|---|---|---|---|---|")
    for (stage, model), row in rows.items():
        print(f"| {stage} | {model} | {row.calls:.0f} | {row.images:.0f} | {row.tflop:.2f} | {row.tflop / peak:.3f} |")
    total = sum(row.tflop for row in rows.values())
    print(f"| all | | | | {total:.2f} | {total / peak:.3f} |")
    print()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 rate to take as the floor")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--smoke", action="store_true",
                        help=f"batch 2, portrait passes of {SMOKE_STEPS} steps, counted at the tiny shapes and "
                             "rank 4: seconds, to see it still runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch = 2
    portrait_steps = SMOKE_STEPS if args.smoke else None
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    models = random_models("tiny", torch.device("cpu"))
    for index, kind in enumerate(CONTROLNET_KINDS):
        models.controlnets[kind] = random_controlnet(models.unet, seed=1 + index).eval()
    scale = 1 if args.smoke else SD15_SIZE // native_resolution(models)
    flops = SD15Flops(rank=4, shapes="tiny") if args.smoke else SD15Flops(rank=TrainConfig.rank)
    peak = args.peak_tflops

    default = TrainConfig()
    steps = default.total_steps(photos=5)
    checkpoints = steps // default.checkpoint_every
    repeat = {"training": steps / TRAIN_STEPS, "validating": checkpoints / TRAIN_CHECKPOINTS}
    training = rows_by_model(record_training(models), flops, scale, repeat)
    one = rows_by_model(record_portraits(models, 1, portrait_steps), flops, scale, {})
    many = rows_by_model(record_portraits(models, args.batch, portrait_steps), flops, scale, {})

    shapes = f"SD1.5 shapes at {SD15_SIZE} px"
    if args.smoke:
        shapes = f"tiny shapes at {native_resolution(models)} px (--smoke)"
    print(f"{shapes}; floors at {peak:.0f} TFLOP/s")
    print()
    train_total = print_rows(f"training run ({steps} steps x 4, {checkpoints} checkpoints)", training, peak)
    one_total = print_rows("one portrait", one, peak)
    many_total = print_rows(f"{args.batch} portraits, one call", many, peak)
    per_portrait = many_total / args.batch
    batch_floor = peak / per_portrait  # portraits per second
    print(f"floor: {one_total / peak:.3f} s for one portrait, {batch_floor:.1f} portraits/s at batch {args.batch}; "
          f"4 portraits/s needs {4 * per_portrait:.0f} TFLOP/s ({4 * per_portrait / peak:.0%} of {peak:.0f})")
    print(f"train_run_tflop={train_total:.1f} train_floor_s={train_total / peak:.2f} "
          f"portrait_tflop={one_total:.2f} batch{args.batch}_floor_portraits_per_s={batch_floor:.2f}")

if __name__ == "__main__":
    main()
