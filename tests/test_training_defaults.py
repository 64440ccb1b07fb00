"""The production training recipe (README: rank 128/alpha 64, min(photos x 200, 800) steps, a
checkpoint every 100, fusion by the top 10) as the worker really builds it: the TrainConfig that
a build on the site hands to the trainer, with the settings' defaults, not TrainConfig's own."""

from __future__ import annotations

import pytest

from pipeline.tinykit import build_tiny_kit
from studio import jobs, services
from tests.jobs_fixtures import persona_with_photos

pytestmark = pytest.mark.django_db


class Stop(Exception):
    """Ends the build once the trainer was called: its config is what this test is about."""


def test_a_build_trains_with_the_production_recipe(owner, settings, tmp_path, monkeypatch):
    settings.MODEL_DIR = build_tiny_kit(tmp_path / "models")  # the engine's models load, no more
    settings.PORTRAIT_ENGINE = "diffusion"
    services.diffusion_engine.cache_clear()
    called = []

    def trainer(models, photos, out_dir, embed, templates, config, **kwargs):
        called.append((len(photos), config))
        raise Stop()

    monkeypatch.setattr(services, "train_persona", trainer)
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    with pytest.raises(Stop):
        jobs.build_double(job.id)  # the worker's entry point

    ((photos, config),) = called
    assert photos == 5
    assert (config.rank, config.alpha) == (128, 64)
    assert config.total_steps(photos) == min(photos * 200, 800) == 800
    assert [config.total_steps(n) for n in (1, 3, 4, 20)] == [200, 600, 800, 800]
    assert config.checkpoint_every == 100
    assert config.fusion_top_k == 10
