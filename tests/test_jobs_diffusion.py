"""The diffusion engine through the site: a double trained on the tiny model kit, then a portrait."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.tinykit import build_tiny_kit
from studio import jobs, services
from studio.models import Portrait
from tests.jobs_fixtures import demo_templates, persona_with_photos

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tiny_diffusion(settings, tmp_path):
    settings.MODEL_DIR = build_tiny_kit(tmp_path / "models")
    settings.PORTRAIT_ENGINE = "diffusion"
    settings.TRAIN_MAX_STEPS = 2
    settings.TRAIN_CHECKPOINT_EVERY = 1
    settings.PORTRAIT_SIZE = 64
    services.diffusion_engine.cache_clear()
    yield
    services.diffusion_engine.cache_clear()


def ready_diffusion_persona(owner, name: str = "Me"):
    persona = persona_with_photos(owner, name)
    jobs.build_double(services.request_training(persona).id)
    persona.refresh_from_db()
    assert (persona.status, persona.engine) == ("ready", "diffusion")
    return persona


def test_diffusion_double_and_portrait(owner, tiny_diffusion):
    persona = ready_diffusion_persona(owner)
    lora = load_file(persona.lora_file.path)
    assert any(key.startswith("unet.") for key in lora) and any(key.startswith("text_encoder.") for key in lora)
    assert Path(persona.best_face.path).is_file()

    (template,) = demo_templates(owner, 1)
    template.prompt, template.negative_prompt = "red scarf", "hat"
    template.save()
    job = services.request_portraits(persona, [template])
    text_encoder = services.diffusion_engine().pass1.text_encoder
    seen = []
    hook = text_encoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        jobs.make_portraits(job.id)
    finally:
        hook.remove()
    job.refresh_from_db()
    assert job.status == "succeeded", job.error_detail
    # The template's own words reached the text encoder (the tiny kit's tokenizer spells bytes).
    texts = [t for ids in seen for t in services.diffusion_engine().pass1.tokenizer.batch_decode(ids)]
    assert any("red scarf" in t for t in texts)
    assert any(t.replace(" ", "").startswith("<|startoftext|>hat,") for t in texts)  # the negative prompt
    portrait = Portrait.objects.get(job=job)
    assert portrait.image.width > 0 and Path(portrait.thumbnail.path).is_file()


def test_the_next_portraits_of_a_double_reuse_its_fused_lora(owner, tiny_diffusion, monkeypatch):
    persona = ready_diffusion_persona(owner)
    templates = demo_templates(owner, 2)
    jobs.make_portraits(services.request_portraits(persona, templates[:1]).id)
    fused = services.diffusion_engine().lora
    assert fused is not None and fused.key[0] == persona.lora_file.name
    copied, copy = [], jobs._copy_stored
    monkeypatch.setattr(jobs, "_copy_stored", lambda stored, path: copied.append(path.name) or copy(stored, path))
    job = services.request_portraits(persona, templates[1:])
    jobs.make_portraits(job.id)
    assert Portrait.objects.filter(job=job).count() == 1
    assert services.diffusion_engine().lora is fused  # neither fused again
    assert copied == ["best_face.png"]  # nor copied out of storage again

    other = ready_diffusion_persona(owner, "Another me")  # another LoRA file: fetched and fused
    jobs.make_portraits(services.request_portraits(other, templates[:1]).id)
    assert services.diffusion_engine().lora.key[0] == other.lora_file.name
    assert copied.count("persona_lora.safetensors") == 1


def test_asking_again_for_a_template_gives_another_take(owner, tiny_diffusion):
    persona = ready_diffusion_persona(owner)
    (template,) = demo_templates(owner, 1)
    takes = []
    for _ in range(2):
        job = services.request_portraits(persona, [template])
        jobs.make_portraits(job.id)
        with Portrait.objects.get(job=job).image.open("rb") as stored:
            takes.append(np.asarray(Image.open(stored).convert("RGB")).astype(int))
    assert takes[0].shape == takes[1].shape and np.abs(takes[0] - takes[1]).max() > 0


def test_a_deleted_doubles_fused_lora_leaves_the_worker(owner, tiny_diffusion):
    persona = ready_diffusion_persona(owner)
    (template,) = demo_templates(owner, 1)
    jobs.make_portraits(services.request_portraits(persona, [template]).id)
    engine = services.diffusion_engine()
    services.forget_deleted_lora()
    assert engine.lora is not None  # still the persona's: kept for its next portraits

    unet = engine.pass1.unet
    before = {name: weight.clone() for name, weight in unet.state_dict().items()}
    services.delete_all_data(owner, delete_account=False)
    services.forget_deleted_lora()
    assert engine.lora is None
    after = unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the base weights, untouched


def test_forgetting_loras_never_loads_the_engine(tiny_diffusion):
    services.forget_deleted_lora()
    assert services.diffusion_engine.cache_info().currsize == 0


def test_a_stopped_build_resumes_from_its_last_checkpoint(owner, tiny_diffusion, training_dir, monkeypatch, caplog):
    persona = persona_with_photos(owner)
    real_embeddings, calls = services.largest_face_embeddings, []

    def fails_at_the_second_checkpoint(*args):
        calls.append(args)  # the training photos, checkpoint 1's faces, checkpoint 2's faces
        if len(calls) == 3:
            raise RuntimeError("the worker's GPU fell off the bus")
        return real_embeddings(*args)

    monkeypatch.setattr(services, "largest_face_embeddings", fails_at_the_second_checkpoint)
    with pytest.raises(RuntimeError):
        jobs.build_double(services.request_training(persona).id)
    persona.refresh_from_db()
    assert persona.status == "failed"
    (folder,) = training_dir.iterdir()
    assert (folder / "resume.pt").is_file()
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-000001"]

    monkeypatch.setattr(services, "largest_face_embeddings", real_embeddings)
    with caplog.at_level("INFO", logger="studio.services"):
        jobs.build_double(services.request_training(persona).id)
    persona.refresh_from_db()
    assert persona.status == "ready"
    assert f"double {persona.pk}: training resumed from step 1 of 2" in caplog.text
    assert list(training_dir.iterdir()) == []  # the double is stored: nothing left to resume
