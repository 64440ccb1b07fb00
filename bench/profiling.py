"""Where GPU time goes: the CUDA kernels of one call, grouped into a few kinds, with the top kernels.

Used by `bench/train.py --profile` and `bench/generate.py --profile`. Run it on a warm process
(after cuDNN's algorithm search) and on eager code: the table is GPU time per kernel, which is the
same in eager and CUDA-graph runs, while the CPU launch gaps it leaves out are what graphs remove.

    python bench/profiling.py --smoke    # the table of a tiny network, seconds (tests/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Callable

import torch

# First match wins; checked against lower-case kernel names.
KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("convolution", r"conv|implicit|xmma_fprop|xmma_dgrad|xmma_wgrad|cudnn|fprop|dgrad|wgrad"),
    ("matmul", r"gemm|cutlass|sm90_xmma|ampere_|hopper|cublas|matmul|nvjet"),
    ("normalisation", r"norm|welford|moments"),
    ("optimizer", r"adam|foreach|multi_tensor|clip|norm_kernel"),
    ("copy / layout", r"copy|transpose|permute|contiguous|nchw|nhwc|cat|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|silu|gelu|mul|add|sum|mean|pow|exp|where|fill"),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def kernel_table(function: Callable[[], object], label: str, top: int = 12) -> str:
    """Runs `function` once under the profiler; returns a markdown table of its GPU time by kind and
    its `top` kernels, with the wall time and the share of it the GPU was busy. Without CUDA the
    "kernels" are the CPU operators' self times (enough to try the bench on tiny shapes)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        function()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1e3
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time_total / 1e3  # a kernel's own time, microseconds -> ms
        elif not cuda and event.device_type == torch.autograd.DeviceType.CPU:
            ms = event.self_cpu_time_total / 1e3
        else:
            continue
        entry = kernels.setdefault(event.name, [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    gpu_ms = max(sum(ms for ms, _ in kernels.values()), 1e-9)
    by_kind: dict[str, list[float]] = {}
    for name, (ms, count) in kernels.items():
        entry = by_kind.setdefault(kind_of(name), [0.0, 0])
        entry[0] += ms
        entry[1] += count
    lines = [
        f"profile: {label}: wall {wall_ms:.1f} ms (profiler on), GPU kernels {gpu_ms:.1f} ms "
        f"({100 * gpu_ms / wall_ms:.0f}% of wall), {sum(c for _, c in kernels.values())} launches",
        "",
        "| kind | kernel ms | share | kernels |",
        "|---|---|---|---|",
    ]
    for kind, (ms, count) in sorted(by_kind.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {kind} | {ms:.1f} | {100 * ms / gpu_ms:.0f}% | {count} |")
    lines += ["", "| top kernel | kernel ms | calls |", "|---|---|---|"]
    for name, (ms, count) in sorted(kernels.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"| {name[:100]} | {ms:.1f} | {count} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", required=True,
                        help="profile a tiny convolution and linear layer (alone, this module only does that)")
    parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    nn = torch.nn
    network = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 16)).to(device)
    images = torch.randn(4, 3, 32, 32, device=device)
    network(images)  # warm, as the benchmarks profile warm code
    table = kernel_table(lambda: network(images), "a tiny convolution and linear layer")
    print(table)
    launches = int(re.search(r"(\d+) launches", table).group(1))
    if not launches:
        raise SystemExit("the profiler recorded no kernel: kernel_table no longer reads its events")
    print(f"profiled_launches={launches}")


if __name__ == "__main__":
    main()
