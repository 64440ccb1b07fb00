"""The model loader and the production model checks, on the tiny kit; fetching, from a local
stand-in for the Hub (tests/pipeline/fake_hub.py): nothing is downloaded from the network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from pipeline import models
from pipeline.models import PRODUCTION_MODELS, ModelSpec, check_models, load_models
from tests.pipeline.fake_hub import LFS_SUFFIXES, FakeHub
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


# --------------------------------------------------------------------------- fetching from a hub
# The real huggingface_hub client downloads from tests/pipeline/fake_hub.py's server, which it
# finds as a deployment would point it at a mirror: HF_ENDPOINT in the environment. The client
# reads that once, when it is imported (constants.ENDPOINT, the URL template and the origins it
# trusts with redirects), and this process imported it long ago (diffusers): so each fetch runs in
# a process of its own: `manage.py fetch_models` for the production list, FETCH_SPECS for a list
# with checksums pinned to what the test's hub serves (the production list pins none yet).

ROOT = Path(__file__).resolve().parents[2]
TILE_WEIGHTS = next(  # (repo_id, filename)
    (f.repo_id, f.filename) for s in PRODUCTION_MODELS if s.name == "controlnet-tile" for f in s.files
    if f.filename.endswith(LFS_SUFFIXES)
)
FETCH_SPECS = """
import json, sys
from pipeline.models import HubFile, ModelSpec, fetch_models
specs = tuple(ModelSpec(s["name"], s["path"], tuple(HubFile(**f) for f in s["files"]), s["licence"])
              for s in json.loads(sys.argv[2]))
for status in fetch_models(sys.argv[1], specs=specs):
    print(status.state, status.name)
"""


def served_bytes(repo_id: str, filename: str) -> bytes:
    """Small stand-ins: a JSON document for a config, 96 KiB of seeded noise for weights."""
    if not filename.endswith(LFS_SUFFIXES):
        return json.dumps({"repo": repo_id, "file": filename}).encode()
    return random.Random(f"{repo_id}/{filename}").randbytes(96 * 1024)


@pytest.fixture
def hub():
    files = {(f.repo_id, f.filename): served_bytes(f.repo_id, f.filename) for s in PRODUCTION_MODELS for f in s.files}
    with FakeHub(files) as hub:
        yield hub


def client_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """This environment without any HF_* setting (HF_HUB_OFFLINE, a token, a cache) or proxy,
    then the hub's endpoint, a cache of the test's own, and no telemetry."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE" and "proxy" not in k.lower()
    }
    return env | {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def run_fetch_command(hub: FakeHub, tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    env = client_env(hub, tmp_path) | {"DATA_DIR": str(tmp_path / "data"), "MODEL_DIR": str(folder)}
    return subprocess.run(
        [sys.executable, "manage.py", "fetch_models"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


def run_fetch(hub: FakeHub, tmp_path: Path, folder: Path, specs) -> subprocess.CompletedProcess:
    """fetch_models(folder, specs=specs) in a process of its own, pointed at the hub."""
    specs_json = json.dumps([dataclasses.asdict(s) for s in specs])
    return subprocess.run(
        [sys.executable, "-c", FETCH_SPECS, str(folder), specs_json],
        cwd=ROOT, env=client_env(hub, tmp_path), capture_output=True, text=True, timeout=180,
    )


def controlnet_specs(hub: FakeHub, pinned: bool) -> tuple[ModelSpec, ...]:
    """The canny and tile ControlNets of the production list, pinned to what the hub serves now."""
    specs = tuple(s for s in PRODUCTION_MODELS if s.name in ("controlnet-canny", "controlnet-tile"))
    if not pinned:
        return specs
    return tuple(
        dataclasses.replace(s, files=tuple(
            dataclasses.replace(f, sha256=hashlib.sha256(hub.files[(f.repo_id, f.filename)]).hexdigest())
            for f in s.files
        ))
        for s in specs
    )


def states(folder: Path) -> dict[str, str]:
    return {s.name: s.state for s in check_models(folder)}


def damage(path: Path) -> None:
    """Other bytes, the modification time kept (as a disk's bit rot leaves it): huggingface_hub's
    own record of the download (.cache/huggingface in the folder) still takes it for the good file."""
    stat = path.stat()
    path.write_bytes(b"damaged on disk")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_fetch_models_downloads_every_file_from_the_hub_endpoint_and_records_its_hash(hub, tmp_path):
    folder = tmp_path / "models"
    result = run_fetch_command(hub, tmp_path, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["present", s.name] for s in PRODUCTION_MODELS]
    wanted = [(f.repo_id, f.filename) for s in PRODUCTION_MODELS for f in s.files]
    assert sorted(hub.downloads()) == sorted(wanted)  # each once (canny's config.json twice: canny, color)
    # Weights come from the CDN the Hub's redirect named; nothing but files was asked for.
    assert {r.server for r in hub.requests if r.method == "GET" and r.filename.endswith(LFS_SUFFIXES)} == {"cdn"}
    assert all(r.repo_id is not None for r in hub.requests), hub.requests
    manifest = json.loads((folder / models.MANIFEST_FILE).read_text())
    assert [m["name"] for m in manifest["models"]] == [s.name for s in PRODUCTION_MODELS]
    for spec, record in zip(PRODUCTION_MODELS, manifest["models"]):
        for f in spec.files:
            served = hub.files[(f.repo_id, f.filename)]
            assert (folder / spec.path / f.filename).read_bytes() == served
            assert record["files"][f.filename] == hashlib.sha256(served).hexdigest()
    assert all(s.ready for s in check_models(folder))

    damaged = folder / "vae" / "config.json"
    damage(damaged)
    assert states(folder)["vae"] == "corrupt"
    hub.requests.clear()
    result = run_fetch_command(hub, tmp_path, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hub.downloads() == [("stabilityai/sd-vae-ft-mse", "config.json")]  # only the damaged file
    assert damaged.read_bytes() == hub.files[("stabilityai/sd-vae-ft-mse", "config.json")]
    assert all(s.ready for s in check_models(folder))


def test_fetch_refuses_a_file_that_does_not_match_its_pinned_sha256(hub, tmp_path):
    folder = tmp_path / "models"
    specs = controlnet_specs(hub, pinned=True)
    first = run_fetch(hub, tmp_path, folder, specs)
    assert first.returncode == 0, first.stderr  # the pins match what the hub serves
    assert states(folder) == {"controlnet-canny": "present", "controlnet-tile": "present"}

    # The hub now serves other bytes under the same name, with metadata that agrees with them:
    # nothing but the pin can tell. The copy on disk is damaged, so fetch_models downloads it again.
    good = hub.files[TILE_WEIGHTS]
    bad = hub.files[TILE_WEIGHTS] = bytes([good[0] ^ 0xFF]) + good[1:]
    target = folder / "controlnet" / "tile" / TILE_WEIGHTS[1]
    damage(target)
    hub.requests.clear()
    result = run_fetch(hub, tmp_path, folder, specs)
    assert result.returncode != 0
    assert f"ValueError: {TILE_WEIGHTS[0]}/{TILE_WEIGHTS[1]} does not match its pinned sha256" in result.stderr
    assert hub.downloads() == [TILE_WEIGHTS]  # the client did fetch it: the bad bytes arrived
    assert not target.exists()
    assert not any(p.read_bytes() == bad for p in folder.rglob("*") if p.is_file())  # nor anywhere else
    assert states(folder) == {"controlnet-canny": "present", "controlnet-tile": "missing"}


def test_a_download_cut_short_fails_and_leaves_no_file(hub, tmp_path):
    """The CDN announces the whole length and hangs up early, each time: the client tries again a
    few times, then raises. Nothing is pinned: the client's own check must catch it."""
    folder = tmp_path / "models"
    specs = controlnet_specs(hub, pinned=False)
    first = run_fetch(hub, tmp_path, folder, specs)
    assert first.returncode == 0, first.stderr
    assert states(folder) == {"controlnet-canny": "present", "controlnet-tile": "present"}

    target = folder / "controlnet" / "tile" / TILE_WEIGHTS[1]
    damage(target)
    hub.cut_at[TILE_WEIGHTS] = 4096
    hub.requests.clear()
    result = run_fetch(hub, tmp_path, folder, specs)
    assert result.returncode != 0
    size = len(hub.files[TILE_WEIGHTS])
    assert (
        "RemoteProtocolError: peer closed connection without sending complete message body"
        f" (received 4096 bytes, expected {size})"
    ) in result.stderr
    downloads = hub.downloads()
    assert set(downloads) == {TILE_WEIGHTS} and len(downloads) > 1  # it tried again, and gave up
    assert not target.exists()
    assert not [p for p in folder.rglob("*") if p.name.endswith(".incomplete")]
    assert states(folder) == {"controlnet-canny": "present", "controlnet-tile": "missing"}


def test_the_fetch_command_says_in_one_line_why_a_download_failed(hub, tmp_path):
    hub.cut_at[TILE_WEIGHTS] = 4096
    result = run_fetch_command(hub, tmp_path, tmp_path / "models")
    assert result.returncode == 1
    assert "CommandError: Could not download the models: RemoteProtocolError: peer closed connection" in result.stderr
    assert "Traceback" not in result.stderr


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
