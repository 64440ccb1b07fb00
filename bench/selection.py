"""Benchmark: who the double is, on ../shared/faces. Verdicts and margins, not speed.

Run from the repository root: `python bench/selection.py [FACES_DIR] [--smoke]`; `--smoke` runs one
case (seconds) and skips the distributions, so a check sees the benchmark still runs. The backend is
dlib unless `--backend insightface --models PACK_DIR` (whose limits nobody here has measured).

First the distance distributions the dlib limits in pipeline/faces.py come from: every pair of
faces found in every photo of the folder, by who they are (its README) and whether they are one
picture (a resized, letterboxed or cut copy). Then each case: the photos, the verdict expected and
the verdict given, and the margins of the vote (pipeline.preprocess.select_person): the farthest
genuine photo's majority distance to the double's other photos, and the nearest stranger's to the
double's photos, each against the same-person limit. The goal is every case right with a margin of
at least 0.03 on both sides. Ends with one line of figures, `name=value` each.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.faces import FaceAnalyzer, load_face_analyzer  # noqa: E402
from pipeline.preprocess import (  # noqa: E402
    PhotoCheck, PreprocessConfig, check_photo, load_photo, majority_distance, mirror_embedding, preprocess,
)

# Who is in each photo (the folder's README), and which picture it is: copies of one picture share
# it. Photos with two faces are told apart by where the face's centre lies (x, pixels).
PHOTOS = {
    "obama.jpg": "obama/portrait", "obama-480p.jpg": "obama/portrait", "obama_small.jpg": "obama/portrait",
    "obama_partial_face.jpg": "obama/portrait", "obama1.jpg": "obama/1", "obama2.jpg": "obama/2",
    "obama3.jpg": "obama/3", "biden.jpg": "biden/1", "biden2.jpg": "biden/2",
    "alex-lacamoire.png": "alex/1", "alex_lacamoire1.jpg": "alex/2", "lin-manuel-miranda.png": "lin/1",
}
# obama_and_biden.jpg: Biden on the left, Obama on the right. two_people.jpg: Obama (left) and Biden
# (right), cut from obama3.jpg and biden.jpg (their faces lie 0.066 and 0.052 from those: copies).
TWO_FACES = {
    "obama_and_biden.jpg": lambda x: "biden/oab" if x < 1000 else "obama/oab",
    "two_people.jpg": lambda x: "obama/3" if x < 600 else "biden/1",
}


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def faces_in_folder(folder: Path, analyzer: FaceAnalyzer) -> list[tuple[str, str, np.ndarray]]:
    """(photo, picture label, embedding) for every face of every photo in the folder."""
    found = []
    for name in sorted([*PHOTOS, *TWO_FACES]):
        image = load_photo((folder / name).read_bytes())
        for face in analyzer.analyze(image):
            label = PHOTOS.get(name) or TWO_FACES[name]((face.box[0] + face.box[2]) / 2)
            found.append((name, label, face.embedding))
    return found


def distributions(folder: Path, analyzer: FaceAnalyzer) -> dict[str, list[float]]:
    """Every pair's distance, by kind: one picture, one person in two pictures, two people; and the
    mirrored copies of each picture against the plain and the mirrored embedding."""
    faces = faces_in_folder(folder, analyzer)
    kinds: dict[str, list[float]] = {"one picture": [], "same person": [], "different people": []}
    for (_, a, x), (_, b, y) in itertools.combinations(faces, 2):
        kind = "one picture" if a == b else "same person" if a.split("/")[0] == b.split("/")[0] else "different people"
        kinds[kind].append(float(np.linalg.norm(x - y)))
    # Mirrored copies: one photo of each picture, mirrored and re-encoded as an upload would be.
    plain, mirrored, mirror_to_others = [], [], []
    pictures = {label: name for name, label in reversed(list(PHOTOS.items()))}  # first photo of each
    candidates = {label: check_photo(0, name, (folder / name).read_bytes(), analyzer, PreprocessConfig())[0]
                  for label, name in pictures.items()}
    for label, name in pictures.items():
        copy = analyzer.analyze(load_photo(jpeg(ImageOps.mirror(load_photo((folder / name).read_bytes())))))[0]
        mirror = mirror_embedding(candidates[label], analyzer)
        plain.append(float(np.linalg.norm(copy.embedding - candidates[label].face.embedding)))
        mirrored.append(float(np.linalg.norm(copy.embedding - mirror)))
        mirror_to_others += [
            float(np.linalg.norm(mirror - other.face.embedding))
            for other_label, other in candidates.items()
            if other_label != label and other_label.split("/")[0] == label.split("/")[0]
        ]
    kinds["mirrored copy, plain embedding"] = plain
    kinds["mirrored copy, the picture mirrored"] = mirrored
    kinds["the picture mirrored, the person's other pictures"] = mirror_to_others
    return kinds


@dataclass(frozen=True)
class Case:
    title: str
    photos: list[str]  # names of inputs (see inputs())
    expected: list[str | None]  # reason codes, None: accepted
    double: str  # who the double is; with several people, whose photos the margins are measured for


CASES = [
    Case("one person and a stranger", ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg", "obama-oab.jpg",
                                       "biden.jpg"], [None] * 5 + ["different_person"], "obama"),
    Case("the same stranger twice", ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg", "obama-oab.jpg",
                                     "biden.jpg", "biden2.jpg"], [None] * 5 + ["different_person"] * 2, "obama"),
    Case("a mirrored copy", ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg", "obama2-mirrored.jpg"],
         [None] * 4 + ["near_duplicate"], "obama"),
    Case("an upside-down photo", ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama-oab.jpg", "obama3-upside-down.jpg"],
         [None] * 5, "obama"),
    Case("3 + 2: two people", ["obama.jpg", "obama1.jpg", "obama2.jpg", "biden.jpg", "biden2.jpg"],
         ["several_people"] * 5, "obama"),
    Case("2 + 2: two people", ["obama.jpg", "obama2.jpg", "alex-lacamoire.png", "alex_lacamoire1.jpg"],
         ["several_people"] * 4, "obama"),
    Case("Biden's double, an Obama photo", ["biden.jpg", "biden2.jpg", "biden-oab.jpg", "obama3.jpg"],
         [None] * 3 + ["different_person"], "biden"),
    Case("people the tests never saw", ["alex-lacamoire.png", "alex_lacamoire1.jpg", "lin-manuel-miranda.png",
                                        "biden2.jpg"], [None] * 2 + ["different_person"] * 2, "alex"),
]
SMOKE_CASES = ["3 + 2: two people"]


def inputs(folder: Path) -> dict[str, bytes]:
    """The photos the cases use: the folder's, faces cut out of obama_and_biden.jpg, and copies."""
    photos = {name: (folder / name).read_bytes() for name in PHOTOS}
    both = Image.open(folder / "obama_and_biden.jpg").convert("RGB")
    photos["obama-oab.jpg"] = jpeg(both.crop((1002, 242, 1482, 722)))  # as tests/jobs_fixtures.five_obamas
    photos["biden-oab.jpg"] = jpeg(both.crop((602, 302, 1082, 782)))
    photos["obama2-mirrored.jpg"] = jpeg(ImageOps.mirror(load_photo(photos["obama2.jpg"])))
    photos["obama3-upside-down.jpg"] = jpeg(load_photo(photos["obama3.jpg"]).rotate(180))  # no EXIF tag
    return photos


# Who is in the photos inputs() makes.
MADE = {"obama-oab.jpg": "obama", "biden-oab.jpg": "biden", "obama2-mirrored.jpg": "obama",
        "obama3-upside-down.jpg": "obama"}


def who(name: str) -> str:
    return MADE.get(name) or PHOTOS[name].split("/")[0]


def run_case(case: Case, photos: dict[str, bytes], analyzer: FaceAnalyzer, checks: dict[str, PhotoCheck]):
    """The verdicts, and the margins from the checks' embeddings (see the module docstring)."""
    result = preprocess([(name, photos[name]) for name in case.photos], analyzer, known=checks,
                        segment=lambda image, box: image)
    for name, check in zip(case.photos, result.checks):
        checks[name] = check
    limit = analyzer.thresholds.same_person_distance
    copies = {d.name for d in result.decisions if d.reason == "near_duplicate"}
    embedding = {name: checks[name].face.embedding for name in case.photos if checks[name].face is not None}
    genuine = [name for name in embedding if who(name) == case.double and name not in copies]
    strangers = [name for name in embedding if who(name) != case.double]

    def vote(name: str) -> float:
        return majority_distance(np.array([np.linalg.norm(embedding[name] - embedding[other])
                                           for other in genuine if other != name]))

    farthest = max(vote(name) for name in genuine)
    nearest = min((vote(name) for name in strangers), default=None)
    return result, limit - farthest, None if nearest is None else nearest - limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faces", type=Path, nargs="?", default=REPO.parent / "shared" / "faces")
    parser.add_argument("--smoke", action="store_true", help="one case, no distributions: does it still run?")
    parser.add_argument("--backend", choices=("dlib", "insightface"), default="dlib")
    parser.add_argument("--models", type=Path, default=None, help="model folder (required for insightface)")
    args = parser.parse_args()
    started = time.perf_counter()
    analyzer = load_face_analyzer(args.backend, args.models)
    limits = analyzer.thresholds
    print(f"{analyzer.name}: same-person limit {limits.same_person_distance}, near-duplicate limit "
          f"{limits.near_duplicate_distance}, mirror check below {limits.mirror_check_distance}")

    kinds = {} if args.smoke else distributions(args.faces, analyzer)
    if kinds:
        print(f"\n{'pairs':<50}{'n':>4}{'min':>8}{'median':>8}{'max':>8}")
        for kind, values in kinds.items():
            print(f"{kind:<50}{len(values):>4}{min(values):>8.3f}{float(np.median(values)):>8.3f}{max(values):>8.3f}")

    photos = inputs(args.faces)
    checks: dict[str, PhotoCheck] = {}
    right, genuine_margins, stranger_margins = 0, [], []
    cases = [case for case in CASES if not args.smoke or case.title in SMOKE_CASES]
    print(f"\n{'case / photo':<34}{'expected':<18}{'verdict':<18}{'person':>7}{'majority d':>11}")
    for case in cases:
        result, genuine_margin, stranger_margin = run_case(case, photos, analyzer, checks)
        verdicts = [decision.reason for decision in result.decisions]
        ok = verdicts == case.expected  # a held-out photo is accepted (reason None) all the same
        right += ok
        genuine_margins.append(genuine_margin)
        stranger_margins += [] if stranger_margin is None else [stranger_margin]
        margins = f"genuine margin {genuine_margin:+.3f}" + (
            "" if stranger_margin is None else f", stranger margin {stranger_margin:+.3f}")
        print(f"{case.title} ({'right' if ok else 'WRONG'}; {margins})")
        for decision, expected in zip(result.decisions, case.expected):
            distance = decision.scores.majority_distance if decision.scores else None
            print(f"  {decision.name:<32}{expected or 'accepted':<18}{decision.reason or 'accepted':<18}"
                  f"{decision.person or '':>7}{'' if distance is None else f'{distance:.3f}':>11}")
    figures = [f"cases_right={right}", f"cases={len(cases)}", f"genuine_margin_min={min(genuine_margins):.3f}"]
    figures += [f"stranger_margin_min={min(stranger_margins):.3f}"] if stranger_margins else []
    if kinds:
        figures += [f"same_person_max={max(kinds['same person']):.3f}",
                    f"different_min={min(kinds['different people']):.3f}"]
    figures.append(f"seconds={time.perf_counter() - started:.1f}")
    print("\n" + " ".join(figures))

if __name__ == "__main__":
    main()
