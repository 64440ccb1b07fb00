"""Benchmark: face analysis and preprocessing of ../shared/faces on the CPU, dlib backend.

Run from the repository root: `python bench/preprocess.py [FACES_DIR] [--smoke]`; `--smoke` times
three of the photos only (seconds), so CI sees the benchmark still runs (tests/test_bench_smoke.py).
Baseline: the same analyser detecting at full resolution instead of on a copy whose long
side is 800 px. Model loading is timed apart: a worker loads the models once and keeps them.
Then the same photos again as the site's next upload or delete runs them: with each photo's checks
known, and with the training cut-outs known too. Ends with `seconds_per_photo=N`, the whole first
preprocessing (decode, analysis, checks, crops, segmentation) divided by the number of photos; the
goal is <= 0.5 on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.faces import DlibFaceAnalyzer  # noqa: E402
from pipeline.preprocess import CutOuts, load_photo, preprocess  # noqa: E402

# --smoke: three small photos of one person, so the selection and the cut-outs are exercised too.
SMOKE_PHOTOS = ("obama-480p.jpg", "obama.jpg", "obama2.jpg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faces", type=Path, nargs="?", default=REPO.parent / "shared" / "faces")
    parser.add_argument("--smoke", action="store_true", help="three photos only: does the benchmark still run?")
    args = parser.parse_args()
    paths = [args.faces / name for name in SMOKE_PHOTOS] if args.smoke else sorted(args.faces.iterdir())
    photos = [(path.name, path.read_bytes()) for path in paths if path.suffix != ".md"]

    started = time.perf_counter()
    ours = DlibFaceAnalyzer()
    print(f"model load: {time.perf_counter() - started:.2f} s")
    full_resolution = DlibFaceAnalyzer(detect_long_side=10**6)

    print(f"{'photo':<26}{'pixels':>10}{'faces':>7}{'full-res s':>12}{'ours s':>9}")
    totals = [0.0, 0.0]
    for name, data in photos:
        image = load_photo(data)
        timings = []
        for analyzer in (full_resolution, ours):
            started = time.perf_counter()
            faces = analyzer.analyze(image)
            timings.append(time.perf_counter() - started)
        totals = [total + timing for total, timing in zip(totals, timings)]
        print(f"{name:<26}{image.width * image.height:>10}{len(faces):>7}{timings[0]:>12.3f}{timings[1]:>9.3f}")
    print(f"{'analysis total':<43}{totals[0]:>12.3f}{totals[1]:>9.3f}")

    started = time.perf_counter()
    result = preprocess(photos, ours)
    elapsed = time.perf_counter() - started
    accepted = sum(decision.accepted for decision in result.decisions)
    print(f"preprocess: {len(photos)} photos, {accepted} selected, {elapsed:.2f} s")
    # What the site does on the next upload or delete: the same photos with what was found kept.
    known = {name: check for (name, _), check in zip(photos, result.checks)}
    cut = CutOuts(result.cut_key, {item.name: item.image for item in result.train})
    for label, kept in (("checks known", {"known": known}), ("checks and cut-outs known", {"known": known, "cut": cut})):
        started = time.perf_counter()
        preprocess(photos, ours, **kept)
        again = time.perf_counter() - started
        print(f"again, {label}: {again:.2f} s ({elapsed / again:.1f}x faster)")
    print(f"seconds_per_photo={elapsed / len(photos):.3f}")


if __name__ == "__main__":
    main()
