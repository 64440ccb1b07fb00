"""GroupNorm compiled to read channels_last activations as they are (an experiment, off by default).

PyTorch's CUDA GroupNorm has no channels_last kernel: it copies each channels_last input to NCHW,
and the next convolution copies the result back. On an H200 copies were 28% of a training step's
GPU time and 18% of a portrait's (bench/RESULTS.md, `--profile`). While `CompiledGroupNorms` is
installed, every nn.GroupNorm of the given models runs one `torch.compile`d function instead,
which reads either layout, keeps the statistics in fp32 and returns the input's dtype.

`compiled_norms` in TrainConfig and GenerateConfig switches it on; the benchmarks time it beside
the default. It stays off until a GPU run shows it pays for the compile time on a worker's first
job. The compiled function is shared by the process, so later jobs reuse its kernels.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch loads with the first model (pipeline.generate's classic engine needs none)
    import torch


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """fp32 statistics and arithmetic (as autocast runs GroupNorm), the input's dtype out."""
    import torch.nn.functional as F

    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.group_norm(x.float(), groups, weight, bias, eps).to(x.dtype)


RECOMPILE_LIMIT = 64


@functools.cache
def compiled_group_norm():
    """Symbolic sizes, so a new resolution or batch needs no compile of its own; dynamo still
    specialises on the channel count, eps, grad mode and dtype: SD1.5's UNet, VAE and ControlNets
    need a few dozen variants, more than dynamo's default limit of 8 per function, past which it
    would quietly run the rest eagerly. The limit is raised for the process (it counts per function)."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
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
