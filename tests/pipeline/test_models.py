"""The model loader and the production model checks, on the tiny kit (no downloads)."""

from __future__ import annotations

import json

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


def test_an_original_format_controlnet_file_loads_beside_its_config(tiny_kit, tmp_path):
    """The colour ControlNet ships as one webui-format .pth: load_controlnet reads it through
    diffusers' single-file loader with the config.json beside it, offline."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from tests.pipeline.ldm_format import controlnet_to_ldm

    original = ControlNetModel.from_pretrained(tiny_kit / "controlnet" / "canny").eval()
    ldm = controlnet_to_ldm(original)
    assert all(k.startswith("control_model.") for k in ldm) and "control_model.zero_convs.0.0.weight" in ldm
    # The renaming is the exact inverse of diffusers' own conversion.
    back = convert_controlnet_checkpoint(ldm, dict(original.config))
    assert back.keys() == original.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in original.state_dict().items())

    folder = tmp_path / "color"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_kit / "controlnet" / "canny" / "config.json").read_bytes())
    torch.save(ldm, folder / "control_sd15_random_color.pth")
    loaded = models.load_controlnet(folder, torch.float32)
    assert isinstance(loaded, ControlNetModel) and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
    torch.manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32))
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = original(*inputs, controlnet_cond=image, return_dict=False)
        found = loaded(*inputs, controlnet_cond=image, return_dict=False)
    for want, got in zip([*expected[0], expected[1]], [*found[0], found[1]]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # same weights; kernels may differ


def test_a_single_file_base_checkpoint_replaces_the_base_weights(tiny_kit, tmp_path):
    """base.safetensors (an original-format fine-tune) is read with base/'s configs and tokenizer,
    offline; vae/ still replaces its VAE."""
    import shutil

    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from tests.pipeline.ldm_format import stable_diffusion_to_ldm

    kit = shutil.copytree(tiny_kit, tmp_path / "kit")
    unet = UNet2DConditionModel.from_pretrained(kit / "base" / "unet")
    vae = AutoencoderKL.from_pretrained(kit / "base" / "vae")
    text_encoder = CLIPTextModel.from_pretrained(kit / "base" / "text_encoder")
    torch.manual_seed(0)
    with torch.no_grad():  # a "fine-tune": other weights than base/ holds
        for model in (unet, text_encoder):
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01)
    ldm = stable_diffusion_to_ldm(unet, vae, text_encoder)
    # The renaming is the exact inverse of diffusers' own conversions.
    for converted, model in (
        (convert_ldm_unet_checkpoint(dict(ldm), dict(unet.config)), unet),
        (convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config)), vae),
        ({k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(dict(ldm)).items()}, text_encoder),
    ):
        assert converted.keys() == model.state_dict().keys()
        assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())

    save_file({k: v.contiguous() for k, v in ldm.items()}, kit / "base.safetensors")
    loaded = load_models(kit, "cpu")
    try:
        for model, expected in ((loaded.unet, unet), (loaded.text_encoder, text_encoder)):
            assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())
        override = AutoencoderKL.from_pretrained(kit / "vae")
        assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in override.state_dict().items())
        base_scheduler = json.loads((kit / "base" / "scheduler" / "scheduler_config.json").read_text())
        assert type(loaded.scheduler).__name__ == base_scheduler["_class_name"]
        assert loaded.tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(kit / "base" / "tokenizer").get_vocab()
    finally:
        models.clear_model_cache()
