"""Times persona LoRA training against the naive loop, on random weights (no downloads).

    python bench/train.py --shapes tiny                  # CPU, under a minute
    python bench/train.py --shapes sd15 --device cuda    # real SD1.5 shapes
    python bench/train.py --smoke                        # seconds: does it still run? (tests/test_bench_smoke.py)

The naive baseline is the plain diffusers-example loop: fp16 autocast with a loss scaler, batch 1,
the VAE and the text encoder run for every sample, nothing cached, unfused AdamW. Ours is
`pipeline.train.train_persona` itself (validation, checkpoints and fusion included). On CUDA it
first runs a 10-step job (a fresh process pays cuDNN's algorithm search once, as a resident
worker does on its first job), then short runs without the CUDA graph and with each UNet memory
layout (each layout warmed up first), and the default run with the faster layout. `--profile`
first prints where the GPU time of eager training steps and of one validation goes;
`--trial FLAG` adds the same short run with a TrainConfig flag off and on, back to back
(compiled_norms: pipeline/compiling.py's compiled GroupNorm; lean_lora: LeanLoraForward), after
the default run, whose summary line is printed as soon as it is measured, and again last:
`sample_s=... naive_sample_s=... speedup=... run_s=...`; run_s is the measured default run
(800 steps x 4 samples + 8 validations + fusion) when --steps is 800, else extrapolated to it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import ModelSet  # noqa: E402
from pipeline.tinykit import TINY_TEXT, TINY_UNET, TINY_VAE, build_components, pixel_embedder  # noqa: E402
from pipeline.train import (  # noqa: E402
    NoiseSchedule,
    TrainConfig,
    Validator,
    add_lora,
    cache_latents,
    caption_ids,
    centred_templates,
    face_crop,
    image_tensor,
    make_optimizer,
    mixed_precision,
    native_resolution,
    remove_lora,
    train_persona,
    train_step,
)

# SD1.5's architecture (runwayml/stable-diffusion-v1-5 configs), written out so nothing downloads.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
SHAPES = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT)}
DEFAULT_RUN_STEPS, DEFAULT_CHECKPOINTS = 800, 8
TRIAL_FLAGS = ("compiled_norms", "lean_lora")
SMOKE_STEPS = 2  # --smoke: our run's steps, and the naive loop's timed samples


def random_models(shapes: str, device: torch.device) -> ModelSet:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        parts = build_components(*SHAPES[shapes], seed=0)
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(device, dtype).eval().requires_grad_(False)
    return ModelSet(folder=Path("."), device=device, dtype=dtype, **parts)


def synthetic_photos(count: int, size: int, seed: int) -> list[Image.Image]:
    """Smooth random colour fields: the VAE and the embedder see varied, image-like input."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        for _ in range(count)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_sample_seconds(models: ModelSet, photos: list[Image.Image], caption: str, samples: int) -> float:
    """Seconds per sample of the plain loop (see the module docstring), after 4 warm-up samples."""
    device, cuda = models.device, models.device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    unet, vae, text_encoder = models.unet, models.vae, models.text_encoder
    for model in (unet, vae, text_encoder):
        model.to(dtype)
    config = TrainConfig()
    optimizer = torch.optim.AdamW(add_lora(unet, text_encoder, config), weight_decay=config.weight_decay)
    for model in (unet, text_encoder):  # plain peft casts each LoRA input to fp32 (ours turns it off)
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = True
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    schedule = NoiseSchedule.from_scheduler(models.scheduler, device)
    generator = torch.Generator(device).manual_seed(0)
    pixels = [image_tensor(p, native_resolution(models)) for p in photos]
    accumulation = config.gradient_accumulation

    def one_sample(index: int) -> None:
        pixel = pixels[index % len(pixels)]
        pixel = (pixel.flip(-1) if torch.rand(()) < 0.5 else pixel)[None].to(device, dtype)
        with torch.autocast(device.type, torch.float16, enabled=cuda):
            with torch.no_grad():
                latent = vae.encode(pixel).latent_dist.sample() * vae.config.scaling_factor
            ids = models.tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
            hidden = text_encoder(ids.to(device))[0]
            noisy, timesteps, target = schedule.batch(latent.float(), generator)
            prediction = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(prediction.float(), target.float()) / accumulation
        scaler.scale(loss).backward()
        if (index + 1) % accumulation == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    unet.train()
    text_encoder.train()
    try:
        for index in range(accumulation):
            one_sample(index)
        sync(device)
        started = time.perf_counter()
        for index in range(samples):
            one_sample(index)
        sync(device)
        return (time.perf_counter() - started) / samples
    finally:
        remove_lora(unet, text_encoder)
        for model in (unet, vae, text_encoder):
            model.to(models.dtype)


def profile_training(models: ModelSet, photos, templates, config: TrainConfig) -> None:
    """GPU kernel tables of 3 eager training steps and of one eager validation (bench/profiling.py)."""
    from bench.profiling import kernel_table

    device, resolution = models.device, native_resolution(models)
    unet, text_encoder = models.unet, models.text_encoder
    groups = add_lora(unet, text_encoder, config)
    try:
        unet.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
        optimizer = make_optimizer(groups, config, device, capturable=False)
        params = [p for g in groups for p in g["params"]]
        latents = cache_latents(models.vae, photos, resolution, flip=True)
        schedule = NoiseSchedule.from_scheduler(models.scheduler, device)
        generator = torch.Generator(device).manual_seed(0)
        input_ids = caption_ids(models, config.caption)
        unet.train()
        text_encoder.train()

        def steps(count: int) -> None:
            for _ in range(count):
                noisy, timesteps, target = schedule.batch(latents.sample(config.samples_per_step, generator), generator)
                if config.channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                train_step(unet, text_encoder, optimizer, params, input_ids, noisy, timesteps, target,
                           config.samples_per_step, functools.partial(mixed_precision, models), config.max_grad_norm)

        steps(3)
        layout = "channels_last" if config.channels_last else "NCHW"
        print(kernel_table(lambda: steps(3), f"3 eager training steps, batch 4, {layout}"), flush=True)
        unet.eval()
        text_encoder.eval()
        validate = Validator(models, config, resolution, cuda_graph=False)
        crops = [face_crop(t, resolution) for t in templates]
        validate(crops)
        print(kernel_table(lambda: validate(crops), "one eager validation (4 templates, LoRA merged)"), flush=True)
    finally:
        remove_lora(unet, text_encoder)


def run_ours(models, photos, templates, config: TrainConfig) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = train_persona(models, photos, out, pixel_embedder, templates, config)
    seconds = result.seconds
    checkpoints = len(result.checkpoints)
    samples = result.steps * config.samples_per_step
    per_checkpoint = (seconds["validate"] + seconds["save"]) / checkpoints
    extrapolated = (
        seconds["total"] - seconds["train"] - seconds["validate"] - seconds["save"]
        + seconds["train"] / result.steps * DEFAULT_RUN_STEPS
        + per_checkpoint * DEFAULT_CHECKPOINTS
    )
    measured = result.steps == DEFAULT_RUN_STEPS and checkpoints == DEFAULT_CHECKPOINTS
    return {
        "mode": result.step_mode,
        "steps": result.steps,
        "sample_s": seconds["train"] / samples,
        "seconds": seconds,
        "per_checkpoint_s": per_checkpoint,
        "run_s": seconds["total"] if measured else extrapolated,
        "run_measured": measured,
        "final_loss": result.losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, help="steps of our run (default: 800 sd15, 8 tiny)")
    parser.add_argument("--eager-steps", type=int, default=50, help="CUDA only: steps of the no-graph run")
    parser.add_argument("--layout-steps", type=int, default=100,
                        help="CUDA only: steps of each layout trial (0: no trial, channels_last)")
    parser.add_argument("--naive-samples", type=int, help="timed samples of the naive loop")
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print kernel tables first (CPU: operator times)")
    parser.add_argument("--trial", action="append", default=[], choices=TRIAL_FLAGS,
                        help="also time our run with this TrainConfig flag off and on (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny shapes, {SMOKE_STEPS} steps and {SMOKE_STEPS} naive samples: does it still run?")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.steps, args.naive_samples = "tiny", SMOKE_STEPS, SMOKE_STEPS

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    sd15 = args.shapes == "sd15"
    steps = args.steps or (DEFAULT_RUN_STEPS if sd15 else 8)
    naive_samples = args.naive_samples or (24 if sd15 else 8)
    started = time.perf_counter()
    models = random_models(args.shapes, device)
    resolution = native_resolution(models)
    photos = synthetic_photos(args.photos, resolution, seed=1)
    templates = centred_templates(synthetic_photos(4, resolution, seed=2))
    config = TrainConfig(max_steps=steps, checkpoint_every=max(steps // DEFAULT_CHECKPOINTS, 1))
    if not sd15:
        config = replace(config, rank=4, alpha=2, validation_steps=4)
    print(f"device={device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} "
          f"shapes={args.shapes} resolution={resolution} torch={torch.__version__} "
          f"build_s={time.perf_counter() - started:.1f}", flush=True)

    naive = naive_sample_seconds(models, photos, config.caption, naive_samples)
    print(f"naive: {naive:.4f} s/sample over {naive_samples} samples", flush=True)
    precision = "fp16" if device.type == "cuda" else "fp32"
    rows = [(f"naive ({precision}, batch 1, no cache)", naive, None)]
    if device.type == "cuda":
        # A resident worker pays cuDNN's algorithm search once per process, on its first job.
        first = run_ours(models, photos, templates, replace(config, max_steps=10, checkpoint_every=10))
        print(f"first job in this process (10 steps, cuDNN autotuning): total {first['seconds']['total']:.1f} s")
    if args.profile:
        profile_training(models, photos, templates, config)
    if device.type == "cuda":
        eager_steps = args.eager_steps
        eager = run_ours(models, photos, templates, replace(
            config, max_steps=eager_steps, checkpoint_every=eager_steps, cuda_graph=False
        ))
        print(f"ours eager: {eager}", flush=True)
        rows.append((f"ours, eager ({eager_steps} steps)", eager["sample_s"], eager))
        layouts = {}
        for channels_last in (True, False) if args.layout_steps else ():
            if not channels_last:  # a layout's first use pays cuDNN's search for its shapes: not timed
                run_ours(models, photos, templates, replace(config, max_steps=10, checkpoint_every=10,
                                                            channels_last=False))
            trial = run_ours(models, photos, templates, replace(
                config, max_steps=args.layout_steps, checkpoint_every=args.layout_steps, channels_last=channels_last
            ))
            name = f"ours, {trial['mode']}, {'channels_last' if channels_last else 'NCHW'} ({args.layout_steps} steps)"
            print(f"{name}: {trial}", flush=True)
            rows.append((name, trial["sample_s"], trial))
            layouts[channels_last] = trial["sample_s"]
        if layouts:
            config = replace(config, channels_last=min(layouts, key=layouts.get))
    ours = run_ours(models, photos, templates, config)
    print(f"ours: {ours}", flush=True)
    layout = "channels_last" if config.channels_last and device.type == "cuda" else "NCHW"
    rows.append((f"ours, {ours['mode']}, {layout} ({ours['steps']} steps)", ours["sample_s"], ours))
    print(summary_line(ours, naive), flush=True)  # now, as well as last: trials may run out of time
    for flag in args.trial:  # the same run with the flag off and on, back to back, each warmed up
        trial_steps = args.layout_steps or (100 if device.type == "cuda" else steps)
        short = replace(config, max_steps=trial_steps, checkpoint_every=trial_steps)
        for value in (True, False):
            started = time.perf_counter()
            warm = run_ours(models, photos, templates, replace(short, max_steps=10, checkpoint_every=10, **{flag: value}))
            print(f"{flag}={value}, warm-up job (10 steps; compiles what it compiles): "
                  f"total {time.perf_counter() - started:.1f} s, train {warm['seconds']['train']:.1f} s", flush=True)
        for value in (False, True):
            trial = run_ours(models, photos, templates, replace(short, **{flag: value}))
            name = f"ours, {trial['mode']}, {flag}={value} ({trial['steps']} steps)"
            print(f"{name}: {trial}", flush=True)
            rows.append((name, trial["sample_s"], trial))

    print()
    print("| variant | s/sample | s/step (x4) | speedup | loss |")
    print("|---|---|---|---|---|")
    for name, sample_s, detail in rows:
        loss = f"{detail['final_loss']:.4f}" if detail else "-"
        print(f"| {name} | {sample_s:.4f} | {sample_s * 4:.4f} | {naive / sample_s:.1f}x | {loss} |")
    seconds = " ".join(f"{k}={v:.2f}" for k, v in ours["seconds"].items())
    print(f"\nour run stages (s): {seconds}; per checkpoint (save+validate) {ours['per_checkpoint_s']:.2f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    label = "measured" if ours["run_measured"] else "extrapolated to 800 steps + 8 checkpoints"
    print(f"run_s is {label}")
    print(summary_line(ours, naive))


def summary_line(ours: dict, naive: float) -> str:
    return (f"sample_s={ours['sample_s']:.4f} naive_sample_s={naive:.4f} "
            f"speedup={naive / ours['sample_s']:.1f} run_s={ours['run_s']:.1f}")


if __name__ == "__main__":
    main()
