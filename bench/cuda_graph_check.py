"""Device check (issue 27): a GraphedForward capture really replays, and gives the eager results.

The CPU suite cannot capture CUDA graphs (tests/pipeline/test_compiling.py checks which forward
is installed, not that a capture replays), so bench/device_generate.sh runs this first on a lent
CUDA machine. Run from the repository root: `python bench/cuda_graph_check.py`. It prints one line
per check and exits non-zero when one fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cudagraphs import GraphedForward  # noqa: E402
from pipeline.tinykit import TINY_TEXT, TINY_UNET, TINY_VAE, build_components  # noqa: E402

REPLAYS = 4


def unet_inputs(seed: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator("cuda").manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, device="cuda", generator=generator)
    hidden = torch.randn(batch, 77, 32, device="cuda", generator=generator)
    return latents, torch.arange(batch, device="cuda") * 100 + seed, hidden


def not_called(*args, **kwargs):
    raise AssertionError("the eager forward ran: the call was not a replay")


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_graph_check: needs a CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    unet = build_components(TINY_UNET, TINY_VAE, TINY_TEXT, seed=0)["unet"].eval().to("cuda")
    graphed = GraphedForward(unet, pool=torch.cuda.graph_pool_handle())
    seeds = range(GraphedForward.WARMUP + 1, GraphedForward.WARMUP + 1 + REPLAYS)
    failures = []

    def check(name: str, passed: bool, detail: str = "") -> None:
        print(f"{'ok  ' if passed else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not passed:
            failures.append(name)

    with torch.no_grad():
        expected = {seed: unet(*unet_inputs(seed), return_dict=False)[0] for seed in seeds}
        with graphed.installed():
            for seed in range(GraphedForward.WARMUP + 1):  # eager warm-up calls, then the capture
                unet(*unet_inputs(seed), return_dict=False)
            check("one graph captured", len(graphed.graphs) == 1 and not graphed.failed,
                  f"graphs={len(graphed.graphs)} failed={graphed.failed}")
            graphed.forward = not_called  # from here on, only a replay can answer
            try:
                outputs = {seed: unet(*unet_inputs(seed), return_dict=False)[0] for seed in seeds}
            except AssertionError as error:
                check("later calls replay", False, str(error))
                outputs = {}
            else:
                check("later calls replay", True, f"{REPLAYS} calls with new inputs ran no eager forward")
    for seed, output in outputs.items():
        gap = (output - expected[seed]).abs().max().item()
        check(f"replay {seed} equals eager", gap < 1e-4, f"max abs difference {gap:.2e}")
    if outputs:
        first, second = outputs[seeds[0]], outputs[seeds[1]]
        check("each replay reads its own inputs", not torch.equal(first, second))
    print(f"cuda_graph_check: {'FAILED ' + ', '.join(failures) if failures else 'all passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
