"""One loader for every diffusion model the pipeline uses, and the list of production models.

A model folder has one layout whether it was fetched from the hub or built by
`pipeline.tinykit.build_tiny_kit`:

    MODEL_DIR/
      base/                  SD1.5-family pipeline in diffusers layout (model_index.json, unet/, vae/,
                             text_encoder/, tokenizer/, scheduler/); fp16 weight variants are accepted
      base.safetensors       optional: a single-file fine-tune that replaces base/'s weights
                             (base/ still provides the configs and the tokenizer)
      vae/                   the VAE to use instead of base/vae (production: sd-vae-ft-mse)
      controlnet/canny/      ControlNets in diffusers layout, or one original-format weights file
      controlnet/openpose/   beside a config.json (the colour ControlNet ships that way)
      controlnet/tile/
      controlnet/color/
      manifest.json          what fetch_models or the tiny kit wrote: every file's sha256

Nothing here downloads except `fetch_models`, which the site runs as `manage.py fetch_models`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from pipeline.common import Progress, ProgressCallback, ignore_progress

if TYPE_CHECKING:  # diffusers and transformers load only when a model does
    from diffusers import AutoencoderKL, ControlNetModel, SchedulerMixin, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

CONTROLNET_KINDS = ("canny", "openpose", "tile", "color")
MANIFEST_FILE = "manifest.json"
FETCH_COMMAND = "python manage.py fetch_models"


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository; it lands at the same relative path inside its model's folder."""

    repo_id: str
    filename: str
    revision: str = "main"
    # None: no checksum is pinned here; fetch_models records the fetched file's hash instead.
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # folder inside MODEL_DIR
    files: tuple[HubFile, ...]
    licence: str


def _repo_files(repo_id: str, filenames: tuple[str, ...]) -> tuple[HubFile, ...]:
    return tuple(HubFile(repo_id, name) for name in filenames)


_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.fp16.safetensors")

# Revisions are "main" and checksums None because neither could be read from the hub when this
# was written (no network); fetch_models records the sha256 of what it downloads, and
# check_models verifies against that record from then on. Pin both here once known.
PRODUCTION_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "base",
        "base",
        _repo_files(
            _SD15,
            (
                "model_index.json",
                "scheduler/scheduler_config.json",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ),
        ),
        "CreativeML OpenRAIL-M",
    ),
    ModelSpec(
        "vae",
        "vae",
        _repo_files("stabilityai/sd-vae-ft-mse", ("config.json", "diffusion_pytorch_model.safetensors")),
        "MIT",
    ),
    ModelSpec(
        "controlnet-canny",
        "controlnet/canny",
        _repo_files("lllyasviel/control_v11p_sd15_canny", _CONTROLNET_FILES),
        "CreativeML OpenRAIL-M",
    ),
    ModelSpec(
        "controlnet-openpose",
        "controlnet/openpose",
        _repo_files("lllyasviel/control_v11p_sd15_openpose", _CONTROLNET_FILES),
        "CreativeML OpenRAIL-M",
    ),
    ModelSpec(
        "controlnet-tile",
        "controlnet/tile",
        _repo_files("lllyasviel/control_v11f1e_sd15_tile", _CONTROLNET_FILES),
        "CreativeML OpenRAIL-M",
    ),
    ModelSpec(
        "controlnet-color",
        "controlnet/color",
        # EasyPhoto's "random colour" ControlNet is published only as an original-format .pth on
        # its authors' mirror; the architecture is SD1.5 ControlNet v1.1, so canny's config fits.
        (
            HubFile("lllyasviel/control_v11p_sd15_canny", "config.json"),
            HubFile("ll00292007/easyphoto", "control_sd15_random_color.pth"),
        ),
        "not stated by its publisher (EasyPhoto mirror): confirm before commercial use",
    ),
)


# --------------------------------------------------------------------------- checking, fetching


@dataclass(frozen=True)
class ModelStatus:
    name: str
    path: Path
    state: str  # "present" | "missing" | "corrupt"
    detail: str  # plain words for staff: what is wrong and how to fix it; empty when present
    licence: str

    @property
    def ready(self) -> bool:
        return self.state == "present"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, specs: tuple[ModelSpec, ...], source: str) -> Path:
    """Records every file's sha256 so check_models can later tell a damaged file from a good one."""
    models = [
        {
            "name": spec.name,
            "path": spec.path,
            "licence": spec.licence,
            "files": {f.filename: sha256_file(folder / spec.path / f.filename) for f in spec.files},
        }
        for spec in specs
    ]
    target = folder / MANIFEST_FILE
    target.write_text(json.dumps({"source": source, "models": models}, indent=2))
    return target


def _expected_files(folder: Path) -> list[tuple[str, str, str, dict[str, str | None]]]:
    """(name, path, licence, {file: sha256 or None}) from the folder's record, else the production list."""
    record = folder / MANIFEST_FILE
    if record.is_file():
        models = json.loads(record.read_text())["models"]
        return [(m["name"], m["path"], m["licence"], m["files"]) for m in models]
    return [
        (s.name, s.path, s.licence, {f.filename: f.sha256 for f in s.files}) for s in PRODUCTION_MODELS
    ]


def check_models(folder: str | Path, verify: bool = True) -> list[ModelStatus]:
    """Says for each model whether it is present, missing or corrupt (sha256 differs from the record).

    `verify=False` skips hashing (gigabytes) and only checks that the files exist.
    """
    folder = Path(folder)
    statuses = []
    for name, path, licence, files in _expected_files(folder):
        model_dir = folder / path
        missing = [f for f in files if not (model_dir / f).is_file()]
        corrupt = [
            f
            for f, expected in files.items()
            if verify and expected and f not in missing and sha256_file(model_dir / f) != expected
        ]
        if missing:
            state = "missing"
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            detail = f"{name} is missing ({shown} not found in {model_dir}). Run `{FETCH_COMMAND}` to download it."
        elif corrupt:
            state = "corrupt"
            detail = (
                f"{name} is damaged: {', '.join(corrupt)} does not match its recorded checksum. "
                f"Run `{FETCH_COMMAND}` to download it again."
            )
        else:
            state, detail = "present", ""
        statuses.append(ModelStatus(name, model_dir, state, detail, licence))
    return statuses


def fetch_models(
    folder: str | Path,
    progress: ProgressCallback = ignore_progress,
    specs: tuple[ModelSpec, ...] = PRODUCTION_MODELS,
) -> list[ModelStatus]:
    """Downloads every model of `specs` that is missing or damaged, checks pinned hashes, records all.

    The only function in the pipeline that reaches the network (through huggingface_hub, from the
    hub HF_ENDPOINT names). `specs` is the production list but for tests, which pin checksums.
    """
    from huggingface_hub import hf_hub_download

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = {f"{path}/{name}": sha for _, path, _, files in _expected_files(folder) for name, sha in files.items()}
    jobs = [(spec, f) for spec in specs for f in spec.files]
    for index, (spec, hub_file) in enumerate(jobs):
        target = folder / spec.path / hub_file.filename
        progress(Progress("fetching", index / len(jobs), f"{spec.name}: {hub_file.filename}"))
        expected = hub_file.sha256 or recorded.get(f"{spec.path}/{hub_file.filename}")
        if target.is_file():
            if expected is None or sha256_file(target) == expected:
                continue
            # Damaged: removed first, so a download that fails leaves no file that looks like the
            # model (huggingface_hub keeps the old one then, since 2.5) and one that works fetches anew.
            target.unlink()
        hf_hub_download(hub_file.repo_id, hub_file.filename, revision=hub_file.revision, local_dir=folder / spec.path)
        if hub_file.sha256 is not None and sha256_file(target) != hub_file.sha256:
            target.unlink()
            raise ValueError(f"{hub_file.repo_id}/{hub_file.filename} does not match its pinned sha256")
    write_manifest(folder, specs, source="huggingface hub")
    progress(Progress("fetching", 1.0, "done"))
    return check_models(folder, verify=False)


# --------------------------------------------------------------------------- loading


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA: one resident copy serves both LoRA training (no loss scaler) and rendering."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _variant(folder: Path, weights_name: str) -> str | None:
    """"fp16" when only the fp16 weights file is there (the production base ships that way)."""
    stem, suffix = weights_name.rsplit(".", 1)
    has_plain = (folder / weights_name).is_file()
    return "fp16" if not has_plain and (folder / f"{stem}.fp16.{suffix}").is_file() else None


@dataclass
class ModelSet:
    """The components of one SD1.5-family model on one device; ControlNets load on first use."""

    folder: Path
    device: torch.device
    dtype: torch.dtype
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    controlnets: dict[str, ControlNetModel] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def controlnet(self, kind: str) -> ControlNetModel:
        if kind not in CONTROLNET_KINDS:
            raise ValueError(f"unknown ControlNet {kind!r}; expected one of {CONTROLNET_KINDS}")
        with self._lock:
            if kind not in self.controlnets:
                net = load_controlnet(self.folder / "controlnet" / kind, self.dtype)
                self.controlnets[kind] = net.to(self.device).requires_grad_(False)
            return self.controlnets[kind]


def load_controlnet(folder: Path, dtype: torch.dtype) -> ControlNetModel:
    """A diffusers ControlNet folder, or one original-format weights file beside a config.json."""
    from diffusers import ControlNetModel

    if not folder.is_dir():
        raise FileNotFoundError(f"no ControlNet at {folder}; run `{FETCH_COMMAND}`")
    weights_name = "diffusion_pytorch_model.safetensors"
    if (folder / weights_name).is_file() or _variant(folder, weights_name):
        return ControlNetModel.from_pretrained(folder, variant=_variant(folder, weights_name), dtype=dtype).eval()
    single = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pth", ".ckpt"))
    if not single:
        raise FileNotFoundError(f"no ControlNet weights in {folder}; run `{FETCH_COMMAND}`")
    return ControlNetModel.from_single_file(
        str(single[0]), config=str(folder), local_files_only=True, dtype=dtype
    ).eval()


def _load_base(folder: Path, dtype: torch.dtype) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = folder / "base"
    if not base.is_dir():
        raise FileNotFoundError(f"no base model at {base}; run `{FETCH_COMMAND}`")
    single_file = folder / "base.safetensors"
    if single_file.is_file():
        # The safety checker and its feature extractor are named in model_index.json but not used
        # (nor fetched): passed as None, diffusers does not try to download them.
        pipe = StableDiffusionPipeline.from_single_file(
            str(single_file), config=str(base), local_files_only=True, dtype=dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        parts = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    else:
        scheduler_class = json.loads((base / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        weights = "diffusion_pytorch_model.safetensors"
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(
                base / "unet", variant=_variant(base / "unet", weights), dtype=dtype
            ),
            "vae": AutoencoderKL.from_pretrained(base / "vae", variant=_variant(base / "vae", weights), dtype=dtype),
            "text_encoder": CLIPTextModel.from_pretrained(
                base / "text_encoder", variant=_variant(base / "text_encoder", "model.safetensors"), dtype=dtype
            ),
            "tokenizer": CLIPTokenizer.from_pretrained(base / "tokenizer"),
            "scheduler": getattr(diffusers, scheduler_class).from_pretrained(base / "scheduler"),
        }
    vae_dir = folder / "vae"
    if vae_dir.is_dir():
        weights = "diffusion_pytorch_model.safetensors"
        parts["vae"] = AutoencoderKL.from_pretrained(vae_dir, variant=_variant(vae_dir, weights), dtype=dtype)
    return parts


_CACHE: dict[tuple[str, str, torch.dtype], ModelSet] = {}
_CACHE_LOCK = threading.Lock()


def load_models(
    folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> ModelSet:
    """Loads the base model once per process and keeps it resident (workers reuse it across jobs)."""
    folder = Path(folder).resolve()
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    key = (str(folder), str(device), dtype)
    with _CACHE_LOCK:
        if key not in _CACHE:
            parts = _load_base(folder, dtype)
            for name in ("unet", "vae", "text_encoder"):
                parts[name] = parts[name].to(device).eval().requires_grad_(False)
            _CACHE[key] = ModelSet(folder=folder, device=device, dtype=dtype, **parts)
        return _CACHE[key]


def clear_model_cache() -> None:
    """Frees the resident models (tests; a worker switching model folders)."""
    with _CACHE_LOCK:
        _CACHE.clear()
