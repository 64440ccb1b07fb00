"""The model loader and the production model checks, on the tiny kit (no downloads)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from pipeline import models
from pipeline.models import PRODUCTION_MODELS, check_models, fetch_models, load_models
from tests.pipeline.tinykit_fixtures import tiny_kit  # noqa: F401 (fixture)


def test_empty_folder_lists_every_model_missing_with_the_fetch_command(tmp_path):
    statuses = check_models(tmp_path)
    assert [s.name for s in statuses] == [spec.name for spec in PRODUCTION_MODELS]
    assert all(s.state == "missing" and "manage.py fetch_models" in s.detail for s in statuses)


def test_tiny_kit_is_ready_and_loads_once_per_process(tiny_kit):
    assert all(s.ready for s in check_models(tiny_kit))
    first = load_models(tiny_kit, "cpu")
    assert load_models(tiny_kit, "cpu") is first
    assert isinstance(first.unet, UNet2DConditionModel) and isinstance(first.vae, AutoencoderKL)
    assert first.unet.dtype == torch.float32 and first.controlnets == {}
    canny = first.controlnet("canny")
    assert isinstance(canny, ControlNetModel) and first.controlnet("canny") is canny
    with torch.no_grad():
        latents = first.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # the 4-block VAE shrinks images x8, as SD1.5's does


def test_a_file_with_a_wrong_hash_is_corrupt(tiny_kit, tmp_path):
    import shutil

    kit = shutil.copytree(tiny_kit, tmp_path / "kit")
    weights = kit / "controlnet" / "tile" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    states = {s.name: s for s in check_models(kit)}
    assert states["controlnet-tile"].state == "corrupt"
    assert "manage.py fetch_models" in states["controlnet-tile"].detail
    assert all(s.ready for name, s in states.items() if name != "controlnet-tile")


def test_fetch_downloads_through_the_hub_client_and_records_hashes(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, revision, local_dir, force_download):
        calls.append(repo_id)
        target = local_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{repo_id}/{filename}")
        return str(target)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    statuses = fetch_models(tmp_path)
    assert all(s.ready for s in statuses)
    assert len(calls) == sum(len(spec.files) for spec in PRODUCTION_MODELS)
    assert "lllyasviel/control_v11p_sd15_canny" in calls
    assert models.MANIFEST_FILE in {p.name for p in tmp_path.iterdir()}
    (tmp_path / "vae" / "config.json").write_text("changed")
    assert {s.name: s.state for s in check_models(tmp_path)}["vae"] == "corrupt"
    calls.clear()
    assert all(s.ready for s in fetch_models(tmp_path))  # fetches only the damaged file again
    assert calls == ["stabilityai/sd-vae-ft-mse"]
