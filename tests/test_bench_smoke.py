"""Every benchmark still runs: each one's `--smoke` (tiny sizes, seconds) must end with its figures.

A benchmark is run by hand, rarely, so nothing else notices when the code it drives changes under
it (bench/preprocess.py crashed for weeks on a changed argument).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.jobs_fixtures import FACES
from tests.processes import ROOT

NUMBER = r"-?\d+(\.\d+)?"

# The command's arguments, and the names of the figures its last line gives.
BENCHMARKS = [
    pytest.param(["bench/preprocess.py", str(FACES)], ["seconds_per_photo"], id="preprocess"),
    pytest.param(["bench/generate.py", "--engine", "classic", "--faces", str(FACES)], ["seconds_per_portrait"],
                 id="generate-classic"),
    pytest.param(["bench/generate.py", "--engine", "diffusion"],
                 ["portrait_s", "batch2_portraits_per_s", "naive_portrait_s"], id="generate-diffusion"),
    pytest.param(["bench/train.py"], ["sample_s", "naive_sample_s", "speedup", "run_s"], id="train"),
    pytest.param(["bench/flops.py"], ["train_run_tflop", "train_floor_s", "portrait_tflop",
                                      "batch2_floor_portraits_per_s"], id="flops"),
    pytest.param(["bench/profiling.py"], ["profiled_launches"], id="profiling"),
    pytest.param(["bench/fusion.py", "--faces", str(FACES)],
                 ["worst_identity", "worst_tone", "median_tone", "worst_bleed", "seconds_per_portrait",
                  "mean_copy_paste"], id="fusion"),
    pytest.param(["bench/selection.py", str(FACES)],
                 ["cases_right", "cases", "genuine_margin_min", "stranger_margin_min", "seconds"], id="selection"),
    pytest.param(["bench/uploads.py"], ["five_xx", "lost", "pending", "p95_sqlite_s", "max_file_cpu_s", "over_limit",
                                        "over_limit_413", "over_limit_answer_s", "max_rss_growth_mb"], id="uploads"),
]


@pytest.mark.parametrize(("args", "figures"), BENCHMARKS)
def test_benchmark_smoke_run_prints_its_figures(args, figures):
    result = subprocess.run(
        [sys.executable, *args, "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(" ".join(f"{name}={NUMBER}" for name in figures), last_line), result.stdout[-3000:]
