"""Module forwards replayed as CUDA graphs: at SD1.5's sizes the GPU otherwise waits on kernel
launches. Used by rendering (UNet, ControlNets, VAE encoder and decoder) and by training's
checkpoint validation (UNet)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch


class GraphedForward:
    """A module's forward replayed as CUDA graphs, one per input signature (shapes and constants).

    The first WARMUP calls of a signature run eagerly (cuDNN autotuning, lazy initialisation), the
    next captures; later calls copy their tensors into the graph's static
    inputs and replay. Outputs are copies, so callers may keep them. If capture fails the module
    stays eager for good. Install with `installed()`: the module's forward is replaced only inside.
    What it runs and captures is the forward found at installation: the class's, or one that an
    experiment installed first (pipeline.compiling), which the graphs then replay.
    """

    WARMUP = 2

    def __init__(self, module: torch.nn.Module, pool) -> None:
        self.module = module
        self.pool = pool
        self.graphs: dict[tuple, tuple] = {}
        self.calls: dict[tuple, int] = {}
        self.failed = False
        self.weights = self._weight_pointers()

    def _weight_pointers(self) -> list[int]:
        return [p.data_ptr() for p in self.module.parameters()]

    @contextmanager
    def installed(self) -> Iterator[None]:
        # Graphs read weights at fixed addresses: if anything re-allocated them, capture anew.
        pointers = self._weight_pointers()
        if pointers != self.weights:
            self.graphs.clear()
            self.calls.clear()
            self.weights = pointers
        previous = vars(self.module).get("forward")
        self.forward = self.module.forward
        self.module.forward = self
        try:
            yield
        finally:
            if previous is None:
                del self.module.forward
            else:
                self.module.forward = previous

    def __call__(self, *args, **kwargs):
        import torch
        from torch.utils._pytree import tree_flatten, tree_unflatten

        eager = self.forward  # uncaptured
        if self.failed or torch.is_grad_enabled():
            return eager(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = (str(spec), *((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in leaves))
        if key in self.graphs:
            graph, static_leaves, static_out = self.graphs[key]
            for static, value in zip(static_leaves, leaves):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
            graph.replay()
            outputs, out_spec = tree_flatten(static_out)
            return tree_unflatten([t.clone() for t in outputs], out_spec)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.WARMUP:
            return eager(*args, **kwargs)
        static_leaves = [v.clone() if isinstance(v, torch.Tensor) else v for v in leaves]
        static_args, static_kwargs = tree_unflatten(static_leaves, spec)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = eager(*static_args, **static_kwargs)
        except RuntimeError:
            self.failed = True
            return eager(*args, **kwargs)
        self.graphs[key] = (graph, static_leaves, static_out)
        return self(*args, **kwargs)
