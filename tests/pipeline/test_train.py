"""Persona training end to end on the tiny kit: train, checkpoint, validate, fuse, resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file

from pipeline.__main__ import main
from pipeline.common import CancelToken, Cancelled
from pipeline.models import load_models
from pipeline.prompts import encode_prompts
from pipeline.tinykit import pixel_embedder
from pipeline.train import (
    LORA_FILE,
    RESUME_FILE,
    CheckpointResult,
    TrainConfig,
    ValidationTemplate,
    Validator,
    add_lora,
    centred_templates,
    checkpoint_folder,
    face_crop,
    fusion_weights,
    remove_lora,
    train_persona,
    without_identity,
)
from tests.pipeline.tinykit_fixtures import photos, tiny_kit  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
# A higher learning rate than production so 4 steps visibly move the tiny model.
CONFIG = TrainConfig(rank=4, alpha=2, unet_lr=1e-3, text_lr=1e-3, max_steps=4, checkpoint_every=2, validation_steps=3)


@pytest.fixture(scope="module")
def models(tiny_kit):
    return load_models(tiny_kit, "cpu")


@pytest.fixture(scope="module")
def trained(models, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("persona")
    reports = []
    result = train_persona(models, photos, out, pixel_embedder, centred_templates(photos[:2]), CONFIG, reports.append)
    return result, reports


def unet_output(pipe) -> torch.Tensor:
    """The UNet's noise prediction for a fixed input, conditioned on the caption through the text encoder."""
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    ids = pipe.tokenizer(CONFIG.caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([500]), hidden).sample


def fresh_pipeline(tiny_kit) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_kit / "base", safety_checker=None, requires_safety_checker=False)


def delta(state: dict, key_a: str) -> torch.Tensor:
    """The weight change B @ A of one layer (1x1 convolutions flattened)."""
    a, b = state[key_a].float(), state[key_a.replace(".lora_A.", ".lora_B.")].float()
    return b.flatten(1) @ a.flatten(1)


def test_training_reports_progress_checkpoints_and_leaves_the_models_clean(trained, models):
    result, reports = trained
    assert result.steps == 4 and result.resumed_from_step == 0 and result.step_mode == "eager"
    assert [c.step for c in result.checkpoints] == [2, 4]
    assert all(len(c.scores) == 2 for c in result.checkpoints)
    assert {r.stage for r in reports} >= {"caching", "training", "validating", "fusing"}
    assert any("step 4/4 loss" in r.detail for r in reports)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.best_face_path.is_file() and result.lora_path.is_file() and result.kohya_path.is_file()
    assert sum(result.fusion_weights.values()) == pytest.approx(1.0)
    for model in (models.unet, models.text_encoder):
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())


def test_fused_lora_is_the_weighted_sum_of_the_checkpoints(trained, tmp_path):
    result, _ = trained
    fused = load_file(result.lora_path)
    steps = list(result.fusion_weights)
    checkpoints = [load_file(checkpoint_folder(result.lora_path.parent, s) / LORA_FILE) for s in steps]
    keys_a = [k for k in fused if ".lora_A." in k]
    assert any(k.startswith("unet.") for k in keys_a) and any(k.startswith("text_encoder.") for k in keys_a)
    assert len(steps) == 2 and not torch.equal(checkpoints[0][keys_a[0]], checkpoints[1][keys_a[0]])
    for key in keys_a:
        expected = sum(w * delta(c, key) for w, c in zip(result.fusion_weights.values(), checkpoints))
        assert fused[key].shape[0] == CONFIG.rank * len(steps)
        torch.testing.assert_close(delta(fused, key), expected, rtol=1e-2, atol=1e-6)


def test_fused_lora_and_its_kohya_export_load_into_a_diffusers_pipeline(trained, tiny_kit):
    result, _ = trained
    pipe = fresh_pipeline(tiny_kit)
    before = unet_output(pipe)
    pipe.load_lora_weights(result.lora_path.parent, weight_name=result.lora_path.name)
    with_lora = unet_output(pipe)
    assert not torch.allclose(before, with_lora, atol=1e-4)

    kohya = fresh_pipeline(tiny_kit)
    keys = load_file(result.kohya_path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    # webui's names: diffusers module paths with underscores, the text encoder under text_model.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert {k.rsplit(".", 2)[0].replace(".", "_") for k in load_file(result.lora_path)} == {
        k.split(".")[0].replace("lora_te_", "text_encoder_").replace("lora_unet_", "unet_") for k in keys
    }
    kohya.load_lora_weights(result.kohya_path.parent, weight_name=result.kohya_path.name)
    torch.testing.assert_close(unet_output(kohya), with_lora, rtol=1e-3, atol=1e-5)


def test_fusion_weights_count_the_top_results():
    checkpoints = [CheckpointResult(100, None, [0.9, 0.1]), CheckpointResult(200, None, [0.8, 0.7])]
    assert fusion_weights(checkpoints, top_k=3) == {100: 1 / 3, 200: 2 / 3}
    assert fusion_weights(checkpoints, top_k=10) == {100: 0.5, 200: 0.5}


def test_a_cancelled_run_resumes_from_its_last_checkpoint(trained, models, photos, tmp_path):
    templates = centred_templates(photos[:2])
    cancel = CancelToken()

    def cancel_after_first_checkpoint(report):
        if report.detail == "checkpoint 2 saved":
            cancel.cancel()

    with pytest.raises(Cancelled):
        train_persona(models, photos, tmp_path, pixel_embedder, templates, CONFIG, cancel_after_first_checkpoint, cancel)
    assert checkpoint_folder(tmp_path, 2).is_dir() and not checkpoint_folder(tmp_path, 4).exists()
    state = torch.load(tmp_path / RESUME_FILE, weights_only=True)
    saved = load_file(checkpoint_folder(tmp_path, 2) / LORA_FILE)
    scale = CONFIG.alpha / CONFIG.rank
    for key, value in state["unet"].items():  # the resume state is the checkpoint's weights, unrounded
        expected = value * scale if ".lora_B." in key else value
        torch.testing.assert_close(saved["unet." + key].float(), expected, rtol=1e-3, atol=1e-6)

    del state["complete"]  # as written before that marker existed: still resumes
    torch.save(state, tmp_path / RESUME_FILE)
    reports = []
    resumed = train_persona(models, photos, tmp_path, pixel_embedder, templates, CONFIG, reports.append)
    assert resumed.resumed_from_step == 2 and len(resumed.losses) == 2
    assert [r.detail for r in reports if r.detail.startswith("step")][0].startswith("step 3/4")
    assert [c.step for c in resumed.checkpoints] == [2, 4]
    # Resuming restores weights, optimiser and random state: the result equals the uninterrupted run's.
    uninterrupted = load_file(checkpoint_folder(trained[0].lora_path.parent, 4) / LORA_FILE)
    for key, value in load_file(checkpoint_folder(tmp_path, 4) / LORA_FILE).items():
        torch.testing.assert_close(value, uninterrupted[key])


class WorkerStopping(Exception):
    """What a worker's progress callback raises to stop a run when the worker shuts down."""


@pytest.mark.parametrize(("stop", "at", "kept"), [
    ("cancel token", "step 1/4", 1),  # checked before the next step
    ("progress callback raises", "step 1/4", 1),  # as a worker's shutdown stops it
    ("progress callback raises", "step 2/4", 2),  # a checkpoint's step, before it is validated
    ("progress callback raises", "checkpoint 2", 2),  # while it is validated
])
def test_a_run_stopped_between_checkpoints_resumes_from_the_step_it_stopped_at(
    stop, at, kept, trained, models, photos, tmp_path
):
    """A worker's shutdown (or a cancel) loses no training: the resume state is written at the step
    the run stopped; a checkpoint it stopped before is made first when it resumes, so the result
    is the uninterrupted run's, checkpoint by checkpoint."""
    templates = centred_templates(photos[:2])
    cancel = CancelToken()

    def stop_there(report):  # the first step and every checkpoint's step are always reported
        if report.detail == at or report.detail.startswith(at + " "):
            if stop == "cancel token":
                cancel.cancel()
            else:
                raise WorkerStopping()

    with pytest.raises(Cancelled if stop == "cancel token" else WorkerStopping):
        train_persona(models, photos, tmp_path, pixel_embedder, templates, CONFIG, stop_there, cancel)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert torch.load(tmp_path / RESUME_FILE, weights_only=True)["step"] == kept

    resumed = train_persona(models, photos, tmp_path, pixel_embedder, templates, CONFIG)
    assert resumed.resumed_from_step == kept and len(resumed.losses) == 4 - kept
    assert [c.step for c in resumed.checkpoints] == [2, 4]
    for step in (2, 4):
        uninterrupted = load_file(checkpoint_folder(trained[0].lora_path.parent, step) / LORA_FILE)
        for key, value in load_file(checkpoint_folder(tmp_path, step) / LORA_FILE).items():
            torch.testing.assert_close(value, uninterrupted[key])


def test_a_finished_run_resumes_to_fusion_only(trained, models, photos, tmp_path):
    result, _ = trained
    out = shutil.copytree(result.lora_path.parent, tmp_path / "finished")
    state = torch.load(out / RESUME_FILE, weights_only=True)
    # The last snapshot only marks the end: no weights or optimiser moments are written for it.
    assert state == {"step": 4, "rank": CONFIG.rank, "alpha": CONFIG.alpha, "complete": True}
    again = train_persona(models, photos, out, pixel_embedder, centred_templates(photos[:2]), CONFIG)
    assert again.resumed_from_step == 4 and again.losses == [] and again.fusion_weights == result.fusion_weights
    assert [c.step for c in again.checkpoints] == [2, 4]
    with pytest.raises(ValueError, match="finished run of 4 steps"):
        train_persona(models, photos, out, pixel_embedder, centred_templates(photos[:2]), replace(CONFIG, max_steps=6))


def test_validation_inpaints_the_face_box_grown_by_a_third(photos):
    """EasyPhoto's validation mask: the face box x1.3 about its centre (x1.3 a side, x1.69 the area)."""
    template = centred_templates(photos[:1])[0]
    _, plain = face_crop(template, 64)
    _, grown = face_crop(template, 64, CONFIG.validation_mask_scale)
    assert CONFIG.validation_mask_scale == TrainConfig().validation_mask_scale == 1.3
    plain_area, grown_area = (np.asarray(plain) > 127).sum(), (np.asarray(grown) > 127).sum()
    assert grown_area == pytest.approx(1.69 * plain_area, rel=0.1)


def test_validation_merges_the_lora_and_restores_the_base_weights_exactly(models, photos):
    crops = [face_crop(t, 64) for t in centred_templates(photos[:2])]
    base = {name: model.state_dict() for name, model in (("unet", models.unet), ("text", models.text_encoder))}
    base = {name: {k: v.clone() for k, v in state.items()} for name, state in base.items()}

    def pipeline_call(pipe) -> list[np.ndarray]:
        """The validation call made directly: LoRA layers, if any, run as separate layers; the caption
        and EasyPhoto's negative prompt, read in webui's syntax."""
        texts = [CONFIG.caption, CONFIG.validation_negative_prompt]
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, pipe.device)
        images = pipe(
            prompt_embeds=embeds[:1].expand(2, -1, -1), negative_prompt_embeds=embeds[1:].expand(2, -1, -1),
            image=[c for c, _ in crops], mask_image=[m for _, m in crops],
            height=64, width=64, strength=CONFIG.validation_strength, num_inference_steps=CONFIG.validation_steps,
            guidance_scale=CONFIG.validation_guidance, generator=torch.Generator().manual_seed(CONFIG.seed),
        ).images
        return [np.asarray(image, np.float32) for image in images]

    def unchanged() -> bool:
        """The base weights (peft's base_layer entries included) are bit for bit the originals."""
        for name, model in (("unet", models.unet), ("text", models.text_encoder)):
            state = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
            if state.keys() != base[name].keys() or not all(torch.equal(v, base[name][k]) for k, v in state.items()):
                return False
        return True

    add_lora(models.unet, models.text_encoder, CONFIG)
    try:
        with torch.no_grad():
            for model in (models.unet, models.text_encoder):
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, 0.05)
        validate = Validator(models, CONFIG, 64, cuda_graph=False)
        during = []  # at every UNet call: every LoRA layer merged, the base weights changed
        hook = models.unet.register_forward_pre_hook(
            lambda *_: during.append(all(layer.merged for layer in validate.layers) and not unchanged())
        )
        encodes = []  # the images only: the 4-channel UNet never reads a masked image's latents
        encoder_hook = models.vae.encoder.register_forward_pre_hook(lambda _module, args: encodes.append(len(args[0])))
        try:
            merged = [np.asarray(image, np.float32) for image in validate(crops)]
        finally:
            hook.remove()
            encoder_hook.remove()
        assert during and all(during)
        assert encodes == [len(crops)]
        assert unchanged() and not any(layer.merged for layer in validate.layers)
        unmerged = pipeline_call(validate.pipe)

        # A failure inside the call (here: the first UNet step) leaves nothing merged either.
        def fail(*_):
            raise RuntimeError("out of memory")

        hook = models.unet.register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                validate(crops)
        finally:
            hook.remove()
        assert unchanged() and not any(layer.merged for layer in validate.layers)
    finally:
        remove_lora(models.unet, models.text_encoder)
    assert max(np.abs(a - b).max() for a, b in zip(merged, unmerged)) <= 2
    # The LoRA does change the result: validation sees it.
    assert max(np.abs(a - b).max() for a, b in zip(merged, pipeline_call(validate.pipe))) > 2


def test_compiled_norms_train_the_same_lora(trained, models, photos, tmp_path, compiled_norm_calls):
    """The experiment of pipeline/compiling.py: the same two steps give the same checkpoint."""
    config = replace(CONFIG, max_steps=2, compiled_norms=True)
    norms = [m for m in (*models.unet.modules(), *models.vae.modules()) if isinstance(m, torch.nn.GroupNorm)]
    norm_calls = []
    hooks = [norm.register_forward_pre_hook(lambda *_: norm_calls.append(1)) for norm in norms]
    try:
        train_persona(models, photos, tmp_path, pixel_embedder, centred_templates(photos[:2]), config)
    finally:
        for hook in hooks:
            hook.remove()
    # Every GroupNorm call of every training and validation forward ran the compiled function; the
    # one VAE encode of the photos before training (one batch) ran PyTorch's.
    caching = sum(isinstance(m, torch.nn.GroupNorm) for m in models.vae.encoder.modules())
    assert len(norm_calls) > 50 and len(compiled_norm_calls) == len(norm_calls) - caching
    reference = load_file(checkpoint_folder(trained[0].lora_path.parent, 2) / LORA_FILE)
    compiled = load_file(checkpoint_folder(tmp_path, 2) / LORA_FILE)
    assert compiled.keys() == reference.keys()
    for key, value in compiled.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-5)
    assert not any("forward" in vars(norm) for norm in norms)


def test_command_line_trains_from_a_preprocessed_folder(tiny_kit, photos, tmp_path, capsys):
    crops = tmp_path / "preprocessed"
    (crops / "train").mkdir(parents=True)
    for index, photo in enumerate(photos):
        photo.save(crops / "train" / f"{index:02d}.png")
    train = [{"image": f"train/{index:02d}.png"} for index in range(len(photos))]
    (crops / "persona.json").write_text(json.dumps({"caption": "a photo of zwx person", "train": train}))
    argv = ["train", str(crops), "--models", str(tiny_kit), "--out", str(tmp_path / "out"), "--backend", "pixels"]
    assert main(argv + ["--max-steps", "2", "--checkpoint-every", "1", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and [c["step"] for c in summary["checkpoints"]] == [1, 2]
    assert set(summary["fusion_weights"]) <= {"1", "2"} and summary["best_score"] > -1


def test_lean_lora_forward_trains_the_same_lora_as_peft(models, photos, tmp_path, monkeypatch):
    """LeanLoraForward replaces peft's forward on every LoRA layer and trains the same weights."""
    from peft.tuners.lora import Conv2d, Linear

    peft_calls = []
    for layer_type in (Linear, Conv2d):
        peft_forward = layer_type.forward

        def counted(self, *args, _forward=peft_forward, **kwargs):
            peft_calls.append(type(self).__name__)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(layer_type, "forward", counted)
    config = replace(CONFIG, max_steps=3, checkpoint_every=3)
    templates = centred_templates(photos[:1])
    peft = train_persona(models, photos, tmp_path / "peft", pixel_embedder, templates, replace(config, lean_lora=False))
    assert {"Linear", "Conv2d"} <= set(peft_calls)  # the tiny UNet has both kinds of LoRA layer
    peft_calls.clear()
    lean = train_persona(models, photos, tmp_path / "lean", pixel_embedder, templates, config)
    assert peft_calls == []
    np.testing.assert_allclose(lean.losses, peft.losses, rtol=1e-5)
    expected, actual = load_file(peft.lora_path), load_file(lean.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key].float(), expected[key].float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["official-portrait-1.jpg", "official-portrait-2.jpg", "podium.jpg", "astronaut.jpg"])
def test_validation_templates_show_no_one_in_particular(name, dlib_analyzer):
    """The demo portraits are famous people: once their face is blurred for validation, dlib no
    longer finds that person there (farther than the same-person limit, or no face at all)."""
    image = Image.open(REPO / "studio" / "demo" / name).convert("RGB")
    face = dlib_analyzer.analyze(image)[0]
    template = without_identity(ValidationTemplate(image, tuple(int(v) for v in face.box)), CONFIG.validation_mask_scale)
    x0, y0, x1, y1 = face.box
    outside = np.ones((image.height, image.width), bool)
    outside[int(y0 - 0.2 * face.height) : int(y1 + 0.2 * face.height), int(x0 - 0.2 * face.width) : int(x1 + 0.2 * face.width)] = False
    assert np.array_equal(np.asarray(template.image)[outside], np.asarray(image)[outside])
    found = [f for f in dlib_analyzer.analyze(template.image) if abs(f.box[0] - x0) < face.width / 2]
    assert not found or np.linalg.norm(found[0].embedding - face.embedding) > dlib_analyzer.thresholds.same_person_distance
