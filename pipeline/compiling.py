"""`torch.compile` experiments, off by default: the GroupNorm alone, or each model's whole forward.

PyTorch's CUDA GroupNorm has no channels_last kernel: it copies each channels_last input to NCHW,
and the next convolution copies the result back. On an H200 copies were 28% of a training step's
GPU time and 18% of a portrait's (bench/RESULTS.md, `--profile`), and elementwise work and norms
most of the rest of a portrait's: memory traffic that fused kernels would not make.

- `CompiledGroupNorms` (`compiled_norms` in TrainConfig and GenerateConfig): every nn.GroupNorm of
  the given models runs one `torch.compile`d function instead, which reads either layout, keeps
  the statistics in fp32 and returns the input's dtype. The compiled function is shared by the
  process, so later jobs reuse its kernels.
- `CompiledForwards` (`compile_backend` in GenerateConfig): each model's forward compiled whole
  (UNet, ControlNets, VAE coders), so inductor fuses each norm with its activation and the
  elementwise work around it; rendering's CUDA graphs then capture the compiled kernels.

The benchmarks time each beside the default. They stay off until a GPU run shows they pay for
their compile time on a worker's first job.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch loads with the first model (pipeline.generate's classic engine needs none)
    import torch

# dynamo compiles a function at most this many times (its default is 8), past which it would quietly
# run the rest eagerly; the limit is raised for the process (it counts per function).
RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """fp32 statistics and arithmetic (as autocast runs GroupNorm), the input's dtype out."""
    import torch.nn.functional as F

    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.group_norm(x.float(), groups, weight, bias, eps).to(x.dtype)


@functools.cache
def compiled_group_norm():
    """Symbolic sizes, so a new resolution or batch needs no compile of its own; dynamo still
    specialises on the channel count, eps, grad mode and dtype: SD1.5's UNet, VAE and ControlNets
    need a few dozen variants."""
    import torch

    _raise_recompile_limit()
    return torch.compile(group_norm, dynamic=True)


class CompiledGroupNorms:
    """Swaps the forward of every nn.GroupNorm in `models` for the compiled function, while installed."""

    def __init__(self, *models: torch.nn.Module) -> None:
        import torch

        self.norms = [m for model in models for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]

    @contextmanager
    def installed(self) -> Iterator[None]:
        function = compiled_group_norm()
        for norm in self.norms:
            norm.forward = functools.partial(function, groups=norm.num_groups, weight=norm.weight,
                                             bias=norm.bias, eps=norm.eps)
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward


class CompiledForwards:
    """Swaps each model's forward for its whole forward compiled by `backend`, while installed.

    Symbolic sizes, so batch 1 and batch 4, and longer prompts, share one compile of each model
    class: the models' modules are traced into the graph with their weights as inputs, so the
    ControlNets share one compile, and a persona's fused LoRA, copied into the weights in place,
    needs none. Duck sizing (one symbol for sizes that happen to be equal, as the middle block's 8
    and the 8 images of batch 4 with CFG) is off for the process: it would compile again for the
    next batch. Graph breaks are allowed (a part dynamo cannot trace runs eagerly), so that a
    library update slows a render rather than failing it; the tests check there are none today.
    """

    def __init__(self, *models: torch.nn.Module, backend: str = "inductor") -> None:
        import torch
        import torch.fx.experimental._config as symbolic_shapes

        _raise_recompile_limit()
        symbolic_shapes.use_duck_shape = False
        self.models = models
        self.forwards = [torch.compile(type(m).forward.__get__(m), backend=backend, dynamic=True) for m in models]

    @contextmanager
    def installed(self) -> Iterator[None]:
        for model, forward in zip(self.models, self.forwards):
            model.forward = forward
        try:
            yield
        finally:
            for model in self.models:
                del model.forward
