"""Times portrait rendering.

    python bench/generate.py --engine classic                                  # CPU, real photos
    python bench/generate.py --engine diffusion --shapes tiny --device cpu     # plumbing, < 1 min
    python bench/generate.py --engine diffusion --shapes sd15 --device cuda    # SD1.5 shapes
    python bench/generate.py --engine classic --smoke                          # seconds: does it still run?
    python bench/generate.py --engine diffusion --smoke                        # (tests/test_bench_smoke.py)

classic: an Obama persona (../shared/faces, dlib) rendered into each posed template, N portraits at
512 px on the CPU; templates are analysed first, as the site does at upload. Model loading excluded.
Last line `seconds_per_portrait=N`.

diffusion: random weights in SD1.5's shapes built in code (bench/train.py's `random_models`, the
tiny kit's `random_controlnet`), so nothing downloads and the face photos are not needed: the
persona and templates are smooth random images with a fixed synthetic face geometry, and face
analysis is a stub returning that geometry (it costs nothing here; in production insightface runs
it on the GPU). Rows:
- naive: the plain diffusers StableDiffusionControlNetInpaintPipeline two-pass (pass 1: 3 ControlNets,
  50 steps x 0.45; pass 2: 2 ControlNets, 20 steps x 0.30; CFG 7; same scheduler), no LoRA, PIL in
  and out, the models as loaded (before ours converts them to channels_last);
- ours: `pipeline.generate.render_portraits` end to end (fusion, controls, both passes, colour
  transfer, paste-back, identity) with a rank-128 persona LoRA fused; on CUDA once eager and once
  with CUDA graphs, and the largest pixel difference between eager and graphs. Each `--trial`
  (`TRIALS`: the NCHW layout, the compiled GroupNorm, the "ControlNet is more important" control
  mode, each model compiled whole by inductor) adds a row, after the default's, and its pixel
  difference from the default; a trial that fails prints why and the rest goes on. Then the
  seconds of each stage of one call, and with `--profile` where the GPU time of the eager path
  goes (bench/profiling.py).
Last line `portrait_s=N batch4_portraits_per_s=N naive_portrait_s=N`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.common import ignore_progress  # noqa: E402
from pipeline.faces import DLIB_THRESHOLDS, Face, face_recognition_models_dir, hog_box  # noqa: E402
from pipeline.generate import (  # noqa: E402
    DiffusionEngine,
    GenerateConfig,
    Persona,
    TemplateFaces,
    analyse_template,
    load_persona,
    render_portraits,
)


def timed(function, repeats: int, device: torch.device) -> tuple[float, object]:
    """Mean seconds of `repeats` calls (CUDA synchronised) and the last call's result."""
    result = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats, result


# --------------------------------------------------------------------------- classic


def bench_classic(faces_dir: Path, rounds: int, count: int = 4) -> None:
    """`count`: photos of the persona, and templates (--smoke: 2)."""
    from pipeline.faces import DlibFaceAnalyzer
    from pipeline.preprocess import preprocess, write_preprocessed

    started = time.perf_counter()
    analyzer = DlibFaceAnalyzer()
    print(f"model load: {time.perf_counter() - started:.2f} s")
    names = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama1.jpg")[:count]
    with tempfile.TemporaryDirectory() as folder:
        write_preprocessed(preprocess([(n, (faces_dir / n).read_bytes()) for n in names], analyzer), folder)
        persona = load_persona(folder, analyzer)
    templates = []
    for name in ("biden.jpg", "biden2.jpg", "obama3.jpg", "alex_lacamoire1.jpg")[:count]:
        image = Image.open(faces_dir / name).convert("RGB")
        seconds, template = timed(lambda: analyse_template(image, analyzer), 1, torch.device("cpu"))
        templates.append(template)
        print(f"analyse {name:<22} {image.width}x{image.height} {seconds:.3f} s")
    timings = []
    for _ in range(rounds):
        for template in templates:
            seconds, (result,) = timed(lambda: render_portraits(persona, [template], analyzer), 1, torch.device("cpu"))
            timings.append(seconds)
    print(f"{len(timings)} portraits at 512 px: mean {np.mean(timings):.3f} s, max {np.max(timings):.3f} s; "
          f"last identity {result.identity_score:.3f}")
    print(f"seconds_per_portrait={np.mean(timings):.3f}")


# --------------------------------------------------------------------------- diffusion


def with_steps(config: GenerateConfig, steps: int | None) -> GenerateConfig:
    """Both passes `steps` long instead of EasyPhoto's 50 and 20 (--smoke); None: as they are."""
    if not steps:
        return config
    return replace(config, pass1=replace(config.pass1, steps=steps), pass2=replace(config.pass2, steps=steps))


class SyntheticFaces:
    """A face analyser stub: every image has one face at the same relative place (centre, a third
    of the short side wide), so crops, masks and controls have real geometry without a detector.
    Its 68 landmarks are dlib's predictor's on the box of those keypoints, as the insightface
    backend finds them (pipeline.faces): the masks and fusions of the diffusion engine need them."""

    name = model_id = "synthetic"
    thresholds = DLIB_THRESHOLDS
    KEYPOINTS = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32)

    def __init__(self) -> None:
        import dlib

        self._dlib = dlib
        predictor = face_recognition_models_dir() / "shape_predictor_68_face_landmarks.dat"
        self._shape68 = dlib.shape_predictor(str(predictor))

    def analyze(self, image: Image.Image) -> list[Face]:
        width = min(image.size) / 3
        x0, y0 = (image.width - width) / 2, (image.height - width) / 2
        embedding = np.ones(8, np.float32) / np.sqrt(8)
        keypoints = self.KEYPOINTS * width + np.array([x0, y0], np.float32)
        box = self._dlib.rectangle(*(round(v) for v in hog_box(keypoints)))
        shape = self._shape68(np.asarray(image.convert("RGB")), box)
        landmarks = np.array([(point.x, point.y) for point in shape.parts()], np.float32)
        return [Face((x0, y0, x0 + width, y0 + width), 1.0, keypoints, embedding, landmarks)]


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def synthetic_persona_and_templates(
    analyzer: SyntheticFaces, size: int, count: int
) -> tuple[Persona, list[TemplateFaces]]:
    """A persona (in a new temporary folder) and `count` templates, all smooth random images."""
    folder = Path(tempfile.mkdtemp())
    reference = smooth_image(size, size, seed=0)
    reference.save(folder / "reference.png")
    face = analyzer.analyze(reference)[0]
    persona = Persona(folder, reference, face, face.embedding, "phb person")
    images = [smooth_image(size * 3 // 2, size * 2, seed=10 + i) for i in range(count)]
    return persona, [TemplateFaces(image, analyzer.analyze(image)) for image in images]


def random_lora(models, folder: Path) -> Path:
    """A rank-128 persona LoRA (training's targets) with random weights, in diffusers' file format."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from pipeline.train import ADAPTER, TrainConfig, add_lora, remove_lora

    add_lora(models.unet, models.text_encoder, TrainConfig())
    try:
        with torch.no_grad():
            for model in (models.unet, models.text_encoder):
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, 1e-3)
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(models.unet, adapter_name=ADAPTER),
            text_encoder_lora_layers=get_peft_model_state_dict(models.text_encoder, adapter_name=ADAPTER),
        )
    finally:
        remove_lora(models.unet, models.text_encoder)
    return folder / "pytorch_lora_weights.safetensors"


def naive_two_pass(models, config: GenerateConfig, inputs: list[tuple[Image.Image, Image.Image]], seed: int = 0):
    """The plain diffusers two-pass: pipelines built as a user would, prompts and PIL images in."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetInpaintPipeline
    from pipeline.generate import canny_control, color_control

    def pipeline(step):
        scheduler = DPMSolverMultistepScheduler.from_config(
            models.scheduler.config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
        )
        pipe = StableDiffusionControlNetInpaintPipeline(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
            controlnet=[models.controlnet(kind) for kind, _ in step.controlnets], scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    first, second = pipeline(config.pass1), pipeline(config.pass2)
    size, count = inputs[0][0].width, len(inputs)

    def stacked(images: list[np.ndarray]) -> np.ndarray:
        # With several ControlNets diffusers takes a batch per net as one array, not a list of images.
        return np.stack(images).astype(np.float32) / 255.0

    def run() -> list[Image.Image]:
        images, masks = [image for image, _ in inputs], [mask for _, mask in inputs]
        arrays = [np.asarray(i) for i in images]
        common = dict(
            prompt=[config.prompt] * count, negative_prompt=[config.negative_prompt] * count, mask_image=masks,
            height=size, width=size, guidance_scale=config.guidance_scale,
        )
        out = first(
            image=images,
            control_image=[stacked([canny_control(a, config) for a in arrays]),
                           stacked([color_control(a, config) for a in arrays]),
                           stacked([np.zeros_like(a) for a in arrays])],
            controlnet_conditioning_scale=[s for _, s in config.pass1.controlnets],
            strength=config.pass1.strength, num_inference_steps=config.pass1.steps,
            generator=[torch.Generator(models.device).manual_seed(seed + i) for i in range(count)], **common,
        ).images
        arrays = [np.asarray(i) for i in out]
        return second(
            image=out,
            control_image=[stacked([canny_control(a, config) for a in arrays]), stacked(arrays)],
            controlnet_conditioning_scale=[s for _, s in config.pass2.controlnets],
            strength=config.pass2.strength, num_inference_steps=config.pass2.steps,
            generator=[torch.Generator(models.device).manual_seed(seed + i) for i in range(count)], **common,
        ).images

    return run


def stage_seconds(render, device: torch.device) -> dict[str, float]:
    """Seconds per progress stage of one render call (the GPU synchronised at each stage's start)."""
    marks = []

    def progress(report) -> None:
        if not marks or marks[-1][0] != report.stage:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append((report.stage, time.perf_counter()))

    started = time.perf_counter()
    render(progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ends = [t for _, t in marks[1:]] + [time.perf_counter()]
    seconds = {"crop": marks[0][1] - started}
    for (stage, begun), ended in zip(marks, ends):
        seconds[stage] = seconds.get(stage, 0.0) + ended - begun
    return seconds


# --trial NAME: a variant timed beside the default one, as (what the row says, what it changes).
TRIALS = {
    "nchw": ("NCHW", {"channels_last": False}),
    "compiled_norms": ("compiled GroupNorm", {"compiled_norms": True}),
    "control_mode": ('control mode "ControlNet is more important"', {"control_mode": "control"}),
    "compiled_models": ("models compiled by inductor", {"compile_backend": "inductor"}),
}


def bench_diffusion(
    shapes: str, device: torch.device, batch: int, profile: bool, trials: list[str], steps: int | None = None
) -> None:
    """`steps`: see with_steps."""
    from bench.train import random_models  # noqa: E402 (bench/ is a namespace package on REPO)
    from pipeline.models import CONTROLNET_KINDS
    from pipeline.tinykit import random_controlnet
    from pipeline.train import native_resolution

    started = time.perf_counter()
    models = random_models(shapes, device)
    for index, kind in enumerate(CONTROLNET_KINDS):
        models.controlnets[kind] = random_controlnet(models.unet, seed=1 + index).to(device, models.dtype).eval()
    size = native_resolution(models)
    cuda = device.type == "cuda"
    repeats = 3 if cuda else 1
    print(f"device={device} {torch.cuda.get_device_name(device) if cuda else ''} shapes={shapes} size={size} "
          f"dtype={models.dtype} torch={torch.__version__} build_s={time.perf_counter() - started:.1f}", flush=True)

    config = with_steps(GenerateConfig(crop_size=size), steps)
    analyzer = SyntheticFaces()
    persona, templates = synthetic_persona_and_templates(analyzer, size, batch)
    lora = random_lora(models, persona.folder)

    # naive first: ours converts the shared models to channels_last.
    naive_inputs = [(t.image.resize((size, size)), Image.new("L", (size, size), 255)) for t in templates]
    naive_one = naive_two_pass(models, config, naive_inputs[:1])
    naive_batch = naive_two_pass(models, config, naive_inputs)
    naive_one()
    naive_s, _ = timed(naive_one, repeats, device)
    naive_batch_s, _ = timed(naive_batch, 1, device)
    print(f"naive: {naive_s:.3f} s/portrait, batch {batch}: {naive_batch_s:.3f} s", flush=True)

    rows = [("naive diffusers two-pass", naive_s, naive_batch_s)]
    outputs, stages = {}, {}
    # The default configuration (CUDA graphs, channels_last) before the trials: a trial that fails
    # or runs out of time leaves the summary line measured.
    default = "ours, CUDA graphs" if cuda else "ours"
    variants = [("ours, eager", replace(config, cuda_graphs=False))] if cuda else []
    variants.append((default, config))
    trial_names = []
    for trial in trials:
        label, changes = TRIALS[trial]
        trial_names.append(f"{default}, {label}")
        variants.append((trial_names[-1], replace(config, **changes)))
    for name, variant in variants:
        engine = DiffusionEngine.from_models(models, variant)

        def one(progress=ignore_progress):
            return render_portraits(persona, templates[:1], analyzer, variant, engine=engine, lora=lora,
                                    progress=progress)

        def many(progress=ignore_progress):
            return render_portraits(persona, templates, analyzer, variant, engine=engine, lora=lora,
                                    progress=progress)

        try:
            first_s, _ = timed(one, 1, device)  # fuses the LoRA (once per persona), captures graphs (and compiles)
            second_s, _ = timed(many, 1, device)
            one_s, result = timed(one, repeats, device)
            many_s, _ = timed(many, 1 if not cuda else 2, device)
            stages[name] = (stage_seconds(one, device), stage_seconds(many, device))
        except Exception as error:  # noqa: BLE001 (a trial's failure is a result; the rest still runs)
            if name not in trial_names:
                raise
            print(f"{name}: failed: {type(error).__name__}: {error}", flush=True)
            continue
        outputs[name] = np.asarray(result[0].crop).astype(int)
        graphs = ""
        if engine.graphed:  # a module whose capture failed ran eagerly: its figures are not graphed ones
            graphs = (f"; graphs captured {sum(len(g.graphs) for g in engine.graphed)}, "
                      f"modules that fell back to eager {sum(g.failed for g in engine.graphed)}")
        print(f"{name}: first call {first_s:.3f} s, first batch {second_s:.3f} s, {one_s:.3f} s/portrait, "
              f"batch {batch}: {many_s:.3f} s{graphs}", flush=True)
        rows.append((name, one_s, many_s))
        if name == default:  # now, as well as last: a trial that runs out of time leaves it printed
            print(summary_line(one_s, many_s, batch, naive_s), flush=True)
        if profile and not (cuda and variant.cuda_graphs):
            from bench.profiling import kernel_table

            print(kernel_table(one, f"{name}, one portrait"), flush=True)
            print(kernel_table(many, f"{name}, {batch} portraits"), flush=True)
    for name in trial_names:
        if name in outputs:
            diff = np.abs(outputs[name] - outputs[default])
            print(f"{name} vs {default}: max pixel diff {diff.max()}, mean {diff.mean():.3f}")
    if cuda:
        diff = np.abs(outputs["ours, eager"] - outputs["ours, CUDA graphs"])
        print(f"eager vs graphs: max pixel diff {diff.max()}, mean {diff.mean():.3f}")
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    print()
    print("seconds per stage of one call (stage starts synchronised): variant, batch: stages")
    for name, (single, batched) in stages.items():
        for count, seconds in ((1, single), (batch, batched)):
            print(f"  {name}, batch {count}: " + " ".join(f"{k}={v:.3f}" for k, v in seconds.items()))
    print()
    print(f"| variant | s/portrait (batch 1) | s for {batch} | portraits/s (batch {batch}) | speedup (batch 1) |")
    print("|---|---|---|---|---|")
    for name, one_s, many_s in rows:
        print(f"| {name} | {one_s:.3f} | {many_s:.3f} | {batch / many_s:.2f} | {naive_s / one_s:.1f}x |")
    _, default_one, default_many = next(row for row in rows if row[0] == default)
    print(summary_line(default_one, default_many, batch, naive_s))


def summary_line(one_s: float, many_s: float, batch: int, naive_s: float) -> str:
    return f"portrait_s={one_s:.3f} batch{batch}_portraits_per_s={batch / many_s:.2f} naive_portrait_s={naive_s:.3f}"


SMOKE_STEPS = 4  # --smoke: a pass runs strength x this many steps (1 or 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("classic", "diffusion"), default="classic")
    parser.add_argument("--shapes", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="classic: rounds over the templates")
    parser.add_argument("--profile", action="store_true", help="diffusion: GPU kernel tables of the eager path")
    parser.add_argument("--trial", action="append", default=[], choices=sorted(TRIALS),
                        help="diffusion: also time a variant (repeatable): nchw (layout, CUDA only), compiled_norms "
                             "(pipeline/compiling.py's GroupNorm), control_mode (webui's 'ControlNet is more "
                             "important': ControlNets on the conditional half only; changes the output), "
                             "compiled_models (each model compiled whole by inductor)")
    parser.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, to see the benchmark still runs: classic 2 templates once; diffusion tiny "
                             f"shapes, batch 2, {SMOKE_STEPS} steps a pass")
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.engine == "classic":
        bench_classic(args.faces, 1 if args.smoke else args.rounds, 2 if args.smoke else 4)
    elif args.smoke:
        bench_diffusion("tiny", device, 2, args.profile, args.trial, steps=SMOKE_STEPS)
    else:
        bench_diffusion(args.shapes, device, args.batch, args.profile, args.trial)


if __name__ == "__main__":
    main()
