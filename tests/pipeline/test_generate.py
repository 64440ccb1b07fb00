"""Portraits: the classic engine on real photos, the diffusion engine on the tiny kit, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.common import CancelToken, Cancelled
from pipeline.generate import (
    DiffusionEngine,
    GenerateConfig,
    TemplateRefused,
    analyse_template,
    canny_control,
    controlnet_inpaint_pipeline,
    crop_template,
    face_shape,
    fuse_lora,
    load_persona,
    portrait_prompts,
    recolour_face,
    render_portraits,
)
from pipeline.models import CONTROLNET_KINDS, load_models
from pipeline.preprocess import PreprocessConfig, preprocess, write_preprocessed
from tests.pipeline.tinykit_fixtures import tiny_kit  # noqa: F401 (fixture; also sets one CPU thread)

REPO = Path(__file__).resolve().parents[2]
OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama1.jpg")
# Few steps at 128 px: the tiny kit checks plumbing, not looks.
TINY = GenerateConfig(
    crop_size=128,
    pass1=replace(GenerateConfig.pass1, steps=8),  # 8 x 0.45 -> 3 denoising steps
    pass2=replace(GenerateConfig.pass2, steps=10),  # 10 x 0.30 -> 3
)


@pytest.fixture(scope="module")
def persona_dir(faces_dir, dlib_analyzer, tmp_path_factory) -> Path:
    photos = [(name, (faces_dir / name).read_bytes()) for name in OBAMA]
    folder = tmp_path_factory.mktemp("obama")
    write_preprocessed(preprocess(photos, dlib_analyzer), folder)
    return folder


@pytest.fixture(scope="module")
def persona(persona_dir, dlib_analyzer):
    return load_persona(persona_dir, dlib_analyzer)


@pytest.fixture(scope="module")
def biden(face_photo, dlib_analyzer):
    return analyse_template(face_photo("biden.jpg"), dlib_analyzer)


def changed_outside(result, template) -> np.ndarray:
    """Template pixels that changed anywhere but the crop window's square."""
    left, top, side = result.window
    changed = np.any(np.asarray(result.image) != np.asarray(template.image), axis=2)
    changed[max(0, int(top)) : int(top + side) + 1, max(0, int(left)) : int(left + side) + 1] = False
    return changed


# --------------------------------------------------------------------------- classic


def test_classic_portrait_looks_like_the_persona_and_keeps_the_template(persona, biden, dlib_analyzer):
    (result,) = render_portraits(persona, [biden], dlib_analyzer)
    assert result.engine == "classic" and result.image.size == biden.image.size
    found = dlib_analyzer.analyze(result.crop)[0]
    to_obama, to_biden = found.embedding @ persona.embedding, found.embedding @ biden.face.embedding
    assert to_obama > to_biden + 0.05
    assert result.identity_score == pytest.approx(float(to_obama), abs=1e-5)
    assert result.masks.inpaint is None and result.masks.edge is None

    # Far from the face nothing changes: the whole template outside the crop window, and inside it
    # everything outside the paste mask; the face box itself did change.
    assert not changed_outside(result, biden).any()
    before, after = np.asarray(biden.image), np.asarray(result.image)
    x0, y0, x1, y1 = (round(v) for v in biden.face.box)
    assert np.abs(after[y0:y1, x0:x1].astype(int) - before[y0:y1, x0:x1]).mean() > 10
    below = int(result.window[1] + result.window[2])
    assert np.array_equal(after[below:], before[below:])


def test_classic_portrait_when_the_crop_window_is_the_whole_template(persona, face_photo, dlib_analyzer):
    template = analyse_template(face_photo("biden2.jpg"), dlib_analyzer)  # square: the x3 crop fills it
    (result,) = render_portraits(persona, [template], dlib_analyzer)
    assert result.window[2] == pytest.approx(min(template.image.size))
    assert result.image.size == template.image.size and result.identity_score > 0.9


def test_template_without_a_face_is_refused(dlib_analyzer):
    blank = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8))
    with pytest.raises(TemplateRefused) as refused:
        analyse_template(blank, dlib_analyzer)
    assert refused.value.reason == "no_face" and "face" in str(refused.value)


def test_persona_from_another_backend_is_refused(persona_dir, dlib_analyzer):
    class Other:
        name = "insightface"

    with pytest.raises(ValueError, match="insightface"):
        load_persona(persona_dir, Other())


def test_cli_renders_a_classic_portrait(persona_dir, faces_dir, tmp_path):
    out = tmp_path / "portrait.png"
    template = faces_dir / "biden.jpg"
    command = [sys.executable, "-m", "pipeline", "portrait", str(persona_dir), str(template), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["engine"] == "classic" and summary["identity_score"] > 0.9
    assert Image.open(out).size == Image.open(faces_dir / "biden.jpg").size


# --------------------------------------------------------------------------- diffusion on the tiny kit


@pytest.fixture(scope="module")
def models(tiny_kit):
    return load_models(tiny_kit, "cpu")


@pytest.fixture(scope="module")
def lora_file(tiny_kit, tmp_path_factory) -> Path:
    """A rank-4 LoRA with random (non-zero) B factors in diffusers' file format, made with peft on a
    separate copy of the tiny UNet and text encoder (the resident models stay untouched)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_kit / "base", safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
    )
    return folder / "pytorch_lora_weights.safetensors"


class Recording:
    """Forwards to a pipeline and keeps the keyword arguments of each call."""

    def __init__(self, pipe, calls: list, on_call=None):
        self._pipe, self._calls, self._on_call = pipe, calls, on_call

    def __call__(self, **kwargs):
        self._calls.append((self._pipe, kwargs))
        if self._on_call:
            self._on_call()
        return self._pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def unet_weights(models) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in models.unet.state_dict().items()}


@pytest.fixture(scope="module")
def diffusion_run(models, persona, biden, face_photo, dlib_analyzer, lora_file):
    """Two templates in one call, with every pipeline call and ControlNet call recorded."""
    engine = DiffusionEngine.from_models(models, TINY)
    original = unet_weights(models)
    calls, lora_active, net_calls = [], [], []
    engine.pass1 = Recording(
        engine.pass1, calls, lambda: lora_active.append(not torch.equal(models.unet.state_dict()[key], original[key]))
    )
    engine.pass2 = Recording(engine.pass2, calls)
    key = next(k for k in original if "attn1.to_q.weight" in k)
    hooks = [
        models.controlnet(kind).register_forward_pre_hook(
            lambda _m, _a, kwargs, kind=kind: net_calls.append(
                (kind, kwargs["conditioning_scale"], kwargs["guess_mode"], len(kwargs["sample"]))
            ),
            with_kwargs=True,
        )
        for kind in ("canny", "color", "openpose", "tile")
    ]
    vae_encodes = []
    hooks.append(models.vae.encoder.register_forward_pre_hook(lambda _m, args: vae_encodes.append(len(args[0]))))
    obama_template = analyse_template(face_photo("obama3.jpg"), dlib_analyzer, " red scarf ", "hat")
    reports = []
    try:
        results = render_portraits(
            persona, [biden, obama_template], dlib_analyzer, TINY,
            engine=engine, lora=lora_file, progress=reports.append,
        )
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "engine": engine, "results": results, "calls": calls, "net_calls": net_calls, "reports": reports,
        "lora_active": lora_active, "original": original, "templates": [biden, obama_template],
        "vae_encodes": vae_encodes,
    }


def test_diffusion_runs_both_passes_in_one_batch_with_the_configured_controlnets(diffusion_run, models):
    calls = diffusion_run["calls"]
    assert len(calls) == 2 and len(diffusion_run["results"]) == 2
    for (pipe, kwargs), step in zip(calls, (TINY.pass1, TINY.pass2)):
        assert [net for net in pipe.controlnet.nets] == [models.controlnet(kind) for kind, _ in step.controlnets]
        assert kwargs["controlnet_conditioning_scale"] == [scale for _, scale in step.controlnets]
        assert kwargs["strength"] == step.strength and kwargs["num_inference_steps"] == step.steps
        assert kwargs["guidance_scale"] == 7.0 and kwargs["height"] == kwargs["width"] == 128
        assert len(kwargs["image"]) == 2 and all(c.shape == (2, 128, 128, 3) for c in kwargs["control_image"])
    assert TINY.pass1.controlnets == (("canny", 0.50), ("color", 0.85), ("openpose", 0.50))
    assert TINY.pass2.controlnets == (("canny", 1.0), ("tile", 1.0))
    # What the ControlNets themselves were run with, every denoising step (CFG doubles the batch).
    seen = {(kind, scale) for kind, scale, *_ in diffusion_run["net_calls"]}
    assert seen == {("canny", 0.5), ("color", 0.85), ("openpose", 0.5), ("canny", 1.0), ("tile", 1.0)}
    # Each pass encodes each template's init image once (one generator each), and no masked image.
    assert diffusion_run["vae_encodes"] == [1, 1] * 2
    assert sum(kind == "openpose" for kind, *_ in diffusion_run["net_calls"]) == int(8 * 0.45)
    # Pass 2 starts from the second fusion (EasyPhoto's blend rule at 0.6) and is guided by that
    # same image: its tile control is the start image, and its canny control is drawn from it.
    _, second = calls[1]
    for index in range(len(diffusion_run["results"])):
        tile, init = second["control_image"][1][index] * 255, np.asarray(second["image"][index]).astype(np.float32)
        assert np.abs(tile - init).max() <= 0.5
        canny = second["control_image"][0][index]
        assert np.array_equal(canny > 0.5, canny_control(np.round(tile).astype(np.uint8), TINY) > 127)
    stages = [r.stage for r in diffusion_run["reports"]]
    assert "pass 1" in stages and "pass 2" in stages and stages[-1] == "finishing"


def test_controlnets_run_in_easyphotos_control_mode_on_both_cfg_halves(diffusion_run):
    """EasyPhoto's "My prompt is more important": soft scales (guess mode) on the whole CFG batch."""
    assert TINY.control_mode == GenerateConfig().control_mode == "prompt"
    assert {(guess, batch) for *_, guess, batch in diffusion_run["net_calls"]} == {(True, 2 * 2)}


def test_prompt_mode_scales_each_residual_from_a_tenth_to_one(diffusion_run):
    nets = diffusion_run["engine"].pass1._pipe.controlnet
    torch.manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, 16, 16),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, 32),
        controlnet_cond=[torch.rand(2, 3, 128, 128) for _ in nets.nets],
        conditioning_scale=[0.5, 0.85, 0.5],
        return_dict=False,
    )
    outputs = {}
    for soft in (False, True):
        nets.soft_scales = soft
        with torch.no_grad():
            down, mid = nets(**inputs)
        outputs[soft] = [*down, mid]
    balanced, scaled = outputs[False], outputs[True]
    factors = torch.logspace(-1, 0, len(balanced))
    assert all(r.abs().mean() > 1e-3 for r in balanced)
    # (At SD1.5's 13 residuals these factors are webui's 0.825^(12 - i) to within 0.6%.)
    for even, soft, factor in zip(balanced, scaled, factors):
        torch.testing.assert_close(soft, even * factor)


@pytest.mark.parametrize("mode, guess, batch", [("balanced", False, 2), ("control", True, 1)])
def test_other_control_modes(mode, guess, batch, diffusion_run, models, persona, biden, dlib_analyzer, lora_file):
    """"balanced" scales evenly on both CFG halves; "control" runs the ControlNets on the conditional
    half only, and the UNet's unconditional half gets no residuals."""
    config = replace(TINY, control_mode=mode)
    engine = DiffusionEngine.from_models(models, config)
    net_calls, unconditional = [], []

    def on_net(_module, _args, kwargs):
        net_calls.append((kwargs["guess_mode"], len(kwargs["sample"])))

    def on_unet(_module, _args, kwargs):
        residuals = kwargs["down_block_additional_residuals"]
        unconditional.append(max(float(r[: len(r) // 2].abs().max()) for r in residuals))

    hooks = [models.controlnet(kind).register_forward_pre_hook(on_net, with_kwargs=True)
             for kind in ("canny", "color", "openpose", "tile")]
    hooks.append(models.unet.register_forward_pre_hook(on_unet, with_kwargs=True))
    try:
        (result,) = render_portraits(persona, [biden], dlib_analyzer, config, engine=engine, lora=lora_file)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(net_calls) == {(guess, batch)} and len(net_calls) == 3 * 3 + 2 * 3
    assert (max(unconditional) == 0.0) == (mode == "control")
    prompt_mode = np.asarray(diffusion_run["results"][0].crop).astype(int)
    assert np.abs(np.asarray(result.crop).astype(int) - prompt_mode).max() > 0


def test_the_last_colour_shift_brings_the_face_to_the_templates_tone(biden):
    """EasyPhoto's "color shift last": inside the face shape, the template's Lab statistics."""
    crop = crop_template(biden, TINY)
    shape = face_shape(crop.face, (128, 128))
    drifted = np.clip(crop.image.astype(int) + (40, -10, -25), 0, 255).astype(np.uint8)  # too red
    toned = recolour_face(drifted, crop.image, shape, crop.face, TINY)

    def face_lab(image):
        return cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[shape > 127].mean(axis=0)

    template, before, after = face_lab(crop.image), face_lab(drifted), face_lab(toned)
    assert np.abs(after - template).max() < 0.35 * np.abs(before - template).max()
    assert np.array_equal(toned[shape == 0], drifted[shape == 0])


def test_the_pipeline_refuses_controlnets_that_take_no_control_mode(models):
    pipe = controlnet_inpaint_pipeline()(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        controlnet=[models.controlnet("canny")], scheduler=models.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with pytest.raises(TypeError, match="ControlNets"):
        pipe(prompt="a portrait", control_mode="prompt")


def test_an_unknown_control_mode_is_refused():
    with pytest.raises(ValueError, match="balanced, prompt, control"):
        GenerateConfig(control_mode="strong")


def test_template_words_come_first_after_the_trigger_phrase(biden):
    config = GenerateConfig(prompt="best quality", negative_prompt="lowres")
    scarf = replace(biden, prompt="red scarf", negative_prompt="hat")
    assert portrait_prompts("phb person", scarf, config) == ("phb person, red scarf, best quality", "hat, lowres")
    assert portrait_prompts("phb person", biden, config) == ("phb person, best quality", "lowres")


def test_each_template_is_rendered_with_its_own_prompt(diffusion_run, persona):
    engine = diffusion_run["engine"]
    biden, scarf = diffusion_run["templates"]
    assert (scarf.prompt, scarf.negative_prompt) == ("red scarf", "hat")
    first = diffusion_run["calls"][0][1]
    # The rows the passes got are the text encoder's (with the persona LoRA fused) of each template's words.
    with engine.lora.applied():
        for index, template in enumerate((biden, scarf)):
            expected = engine.encode_prompt([portrait_prompts(persona.caption, template, TINY)])
            torch.testing.assert_close(first["prompt_embeds"][index : index + 1], expected[0])
            torch.testing.assert_close(first["negative_prompt_embeds"][index : index + 1], expected[1])
    assert not torch.equal(first["prompt_embeds"][0], first["prompt_embeds"][1])
    second = diffusion_run["calls"][1][1]
    assert torch.equal(second["prompt_embeds"], first["prompt_embeds"])


def test_lora_is_fused_while_rendering_and_the_weights_come_back_exactly(diffusion_run, models):
    assert diffusion_run["lora_active"] == [True]
    original = diffusion_run["original"]
    assert all(torch.equal(v, original[k]) for k, v in models.unet.state_dict().items())
    assert not any(type(m).__name__.startswith("Lora") for m in models.unet.modules())
    assert "forward" not in vars(models.unet)


def test_fused_lora_equals_the_lora_applied_at_its_scale(diffusion_run, models, lora_file):
    pipe = diffusion_run["engine"].pass1._pipe
    torch.manual_seed(0)
    latents, hidden = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)

    def unet_output():
        with torch.no_grad():
            return models.unet(latents, torch.tensor([500]), hidden).sample

    plain = unet_output()
    pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name, adapter_name="persona")
    pipe.set_adapters(["persona"], [0.9])
    applied = unet_output()
    pipe.unload_lora_weights()
    lora = fuse_lora(pipe, lora_file, 0.9)
    torch.testing.assert_close(unet_output(), plain, rtol=0, atol=0)
    with lora.applied():
        fused = unet_output()
    assert not torch.allclose(plain, applied, atol=1e-4)
    torch.testing.assert_close(fused, applied, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_output(), plain, rtol=0, atol=0)


def test_masks_cover_the_face_then_ring_its_edge_and_the_mouth(diffusion_run):
    results, templates = diffusion_run["results"], diffusion_run["templates"]
    first, second = diffusion_run["calls"][0][1], diffusion_run["calls"][1][1]
    for index, (result, template) in enumerate(zip(results, templates)):
        inpaint, edge = np.asarray(result.masks.inpaint) > 127, np.asarray(result.masks.edge) > 127
        assert np.array_equal(np.asarray(first["mask_image"][index]) > 127, inpaint)
        assert np.array_equal(np.asarray(second["mask_image"][index]) > 127, edge)
        # The face in crop pixels: the template's box and landmarks mapped through the crop window.
        left, top, side = result.window
        scale = 128 / side
        x0, y0, x1, y1 = ((v - o) * scale for v, o in zip(template.face.box, (left, top, left, top)))
        landmarks = (template.face.landmarks - np.array([left, top])) * scale
        box = inpaint[round(y0) : round(y1), round(x0) : round(x1)]
        assert box.mean() > 0.99 and inpaint.mean() < 0.6
        assert not edge[round(y0) : round(y1), round(x0) : round(x1)].all()

        def at(point) -> bool:
            return bool(edge[int(round(point[1])), int(round(point[0]))])

        assert at(landmarks[8]) and at(landmarks[0]) and at(landmarks[16])  # chin and jaw ends: the contour
        assert at(landmarks[48:60].mean(axis=0))  # the mouth
        assert not at(landmarks[27]) and not at(landmarks[36:48].mean(axis=0))  # nose bridge, eyes
        assert not edge[:5, :5].any() and not inpaint[:5, :5].any()


def test_diffusion_portrait_changes_only_the_face(diffusion_run):
    for result, template in zip(diffusion_run["results"], diffusion_run["templates"]):
        assert result.engine == "diffusion" and result.image.size == template.image.size
        assert not changed_outside(result, template).any()
        crop = np.asarray(result.crop)
        assert crop.shape == (128, 128, 3) and crop.std() > 5


def test_compiled_norms_render_the_same_portrait(
    diffusion_run, models, persona, biden, dlib_analyzer, lora_file, compiled_norm_calls
):
    """The experiment of pipeline/compiling.py, through the engine: same pixels, norms plain afterwards."""
    engine = DiffusionEngine.from_models(models, replace(TINY, compiled_norms=True))
    assert engine.norms is not None and len(engine.norms.norms) > 10
    (result,) = render_portraits(persona, [biden], dlib_analyzer, TINY, engine=engine, lora=lora_file)
    assert len(compiled_norm_calls) > 100  # the UNet's, the ControlNets' and the VAE's, every step
    expected = np.asarray(diffusion_run["results"][0].crop).astype(int)
    assert np.abs(np.asarray(result.crop).astype(int) - expected).max() <= 2
    assert not any("forward" in vars(norm) for norm in engine.norms.norms)



def test_compiled_models_render_the_same_portrait(diffusion_run, models, persona, biden, dlib_analyzer, lora_file):
    """The whole-model compile experiment through the engine, with dynamo's plain "eager" backend
    (tests/pipeline/test_compiling.py traces the graphs for inductor): every model the render
    calls is compiled, one compile per model class (the ControlNets share theirs), and the forwards
    are the models' own afterwards."""
    engine = DiffusionEngine.from_models(models, replace(TINY, compile_backend="eager"))
    compiled = engine.compiled.models
    assert {id(m) for m in compiled} == {id(m) for m in (models.unet, models.vae.encoder, models.vae.decoder,
                                                        *(models.controlnet(k) for k in CONTROLNET_KINDS))}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    (result,) = render_portraits(persona, [biden], dlib_analyzer, TINY, engine=engine, lora=lora_file)
    assert torch._dynamo.utils.counters["frames"]["ok"] == len({type(m) for m in compiled}) == 4
    assert not torch._dynamo.utils.counters["graph_break"]
    expected = np.asarray(diffusion_run["results"][0].crop).astype(int)
    assert np.abs(np.asarray(result.crop).astype(int) - expected).max() <= 2
    assert not any("forward" in vars(model) for model in compiled)

def test_cancel_stops_the_render_and_restores_the_weights(models, persona, biden, dlib_analyzer, lora_file):
    engine = DiffusionEngine.from_models(models, TINY)
    original = unet_weights(models)
    cancel = CancelToken()

    def progress(report):
        if report.stage == "pass 1":
            cancel.cancel()

    with pytest.raises(Cancelled):
        render_portraits(
            persona, [biden], dlib_analyzer, TINY, engine=engine, lora=lora_file, progress=progress, cancel=cancel
        )
    assert all(torch.equal(v, original[k]) for k, v in models.unet.state_dict().items())



def test_the_portraits_face_ends_in_the_templates_tone(diffusion_run):
    for result, template in zip(diffusion_run["results"], diffusion_run["templates"]):
        shape = np.asarray(result.masks.face) > 127

        def face_lab_mean(image):
            return cv2.cvtColor(np.asarray(image).astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[shape].mean(axis=0)

        drift = face_lab_mean(result.crop) - face_lab_mean(crop_template(template, TINY).image)
        assert np.abs(drift).max() < 2.0  # 4 to 12 without the last colour shift


def test_a_portrait_is_also_measured_against_the_held_out_photo(faces_dir, dlib_analyzer, biden, tmp_path):
    photos = [(name, (faces_dir / name).read_bytes()) for name in OBAMA]
    write_preprocessed(preprocess(photos, dlib_analyzer, PreprocessConfig(held_out_from=len(OBAMA))), tmp_path)
    persona = load_persona(tmp_path, dlib_analyzer)
    assert persona.held_out is not None and float(persona.held_out @ persona.embedding) < 0.999
    (result,) = render_portraits(persona, [biden], dlib_analyzer)
    found = dlib_analyzer.analyze(result.crop)[0]
    assert result.held_out_score == pytest.approx(float(found.embedding @ persona.held_out), abs=1e-5)
    assert result.identity_score == pytest.approx(float(found.embedding @ persona.embedding), abs=1e-5)
