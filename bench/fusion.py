"""Measures how classic portraits look: identity, skin tone and bleed, on real faces.

    python bench/fusion.py [--faces DIR] [--sheet fusion.png] [--save DIR] [--before DIR] [--smoke]

Every person of ../shared/faces (a double built from their photos by `pipeline.preprocess`, as the
site builds it) is rendered with the classic engine into each demo template (studio/demo) and into
each other person's photo; cases where template and person are the same are left out. Per case:

- identity: L2 distance between the portrait's face and each of the person's photos, dlib's raw
  128-d descriptors (face_recognition's scale: below 0.6 is "the same person"); the mean, and the
  distance to the template's own face for comparison;
- tone: CIELAB dE76 between the mean colour of the portrait's inner-face skin and the template's
  own, over the template's skin at its landmarks (eyes, brows and mouth cut out);
- bleed: the mean absolute change (0..255, over RGB) in the band just outside the template's face,
  its 68-point hull dilated from 0.04 to 0.22 face widths (the forehead is in that band);
- copy-paste: the distance to the person's photos other than the double's reference (the photo
  fused in) less the distance to the reference: how much closer the portrait is to the pasted
  photo than to photos of the same person it never saw (MultiID-Bench's concern: likeness to the
  reference rewards pasting). Only for people with more than one photo;
- seconds: `render_portraits` for that one template (fusion, paste-back, identity), model loading
  and template analysis excluded.

Goals (issue 18): every case recognised (identity < 0.6), tone <= 6 for every case and median <= 4,
bleed <= 4, the classic portrait <= 1 s on 2 cores. `--save DIR` writes each portrait; `--before DIR`
adds the portraits a run at another commit saved as the sheet's middle column (template | before |
after). Last line `worst_identity=N worst_tone=N median_tone=N worst_bleed=N seconds_per_portrait=N
mean_copy_paste=N`.
`--smoke` renders two cases only (CI runs it to keep this script working).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.faces import DlibFaceAnalyzer, Face  # noqa: E402
from pipeline.fusion import disk, face_width, hull_mask, skin_mask  # noqa: E402
from pipeline.generate import Persona, analyse_template, load_persona, render_portraits  # noqa: E402
from pipeline.preprocess import load_photo, preprocess, write_preprocessed  # noqa: E402

# Who is in ../shared/faces (its README); the partial face and the two-person photos are left out.
PEOPLE = {
    "obama": ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama1.jpg"),
    "biden": ("biden.jpg", "biden2.jpg"),
    "lacamoire": ("alex-lacamoire.png", "alex_lacamoire1.jpg"),
    "miranda": ("lin-manuel-miranda.png",),
}
# The demo templates and who they show (studio/demo/README.md).
DEMO = {
    "official-portrait-1.jpg": "obama",
    "official-portrait-2.jpg": "biden",
    "podium.jpg": "obama",
    "astronaut.jpg": "collins",
}


def raw_descriptor(analyzer: DlibFaceAnalyzer, image: Image.Image, face: Face) -> np.ndarray:
    """dlib's descriptor before our unit normalisation: face_recognition's 0.6 is on this scale."""
    pixels = np.asarray(image.convert("RGB"))
    rect = analyzer._dlib.rectangle(*(round(v) for v in face.box))
    return np.array(analyzer._encoder.compute_face_descriptor(pixels, analyzer._shape5(pixels, rect)))


def face_near(analyzer: DlibFaceAnalyzer, image: Image.Image, where: Face) -> Face | None:
    """The face found in `image` whose box centre is within half a face width of `where`'s."""
    centre = np.array([(where.box[0] + where.box[2]) / 2, (where.box[1] + where.box[3]) / 2])
    for found in analyzer.analyze(image):
        middle = np.array([(found.box[0] + found.box[2]) / 2, (found.box[1] + found.box[3]) / 2])
        if np.linalg.norm(middle - centre) < where.width / 2:
            return found
    return None


def tone_gap(portrait: np.ndarray, template: np.ndarray, face: Face) -> float:
    """dE76 between the mean Lab colours of the two images over the template's face skin."""
    skin = skin_mask(face.landmarks, (template.shape[1], template.shape[0]))

    def mean_lab(image: np.ndarray) -> np.ndarray:
        lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
        return lab[skin > 0].mean(axis=0)

    return float(np.linalg.norm(mean_lab(portrait) - mean_lab(template)))


def bleed(portrait: np.ndarray, template: np.ndarray, face: Face) -> float:
    """Mean absolute change in the band 0.04..0.22 face widths outside the template's face hull."""
    hull = hull_mask(face.landmarks, (template.shape[1], template.shape[0]))
    width = face_width(face.landmarks)
    band = cv2.subtract(cv2.dilate(hull, disk(0.22 * width)), cv2.dilate(hull, disk(0.04 * width))) > 0
    return float(np.abs(portrait.astype(np.float32) - template.astype(np.float32))[band].mean())


@dataclass(frozen=True)
class Double:
    persona: Persona
    reference_name: str  # which of the person's photos was fused in


def build_doubles(analyzer: DlibFaceAnalyzer, faces: Path, people: dict, work: Path) -> dict[str, Double]:
    doubles = {}
    for person, names in people.items():
        photos = [(name, (faces / name).read_bytes()) for name in names]
        folder = work / person
        result = preprocess(photos, analyzer)
        write_preprocessed(result, folder)
        doubles[person] = Double(load_persona(folder, analyzer), result.reference.name)
    return doubles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG to write (template | before | after)")
    parser.add_argument("--save", type=Path, help="folder to write each portrait into")
    parser.add_argument("--before", type=Path, help="a folder an earlier run saved portraits into")
    parser.add_argument("--smoke", action="store_true", help="two cases only")
    args = parser.parse_args()

    analyzer = DlibFaceAnalyzer()
    people = {"obama": PEOPLE["obama"], "lacamoire": PEOPLE["lacamoire"]} if args.smoke else PEOPLE
    templates = {name: (REPO / "studio" / "demo" / name, who) for name, who in DEMO.items()}
    templates.update({photos[0]: (args.faces / photos[0], person) for person, photos in people.items()})
    photo_descriptors = {}
    for person, names in people.items():
        rows = {}
        for name in names:
            image = load_photo((args.faces / name).read_bytes())
            rows[name] = raw_descriptor(analyzer, image, analyzer.analyze(image)[0])
        photo_descriptors[person] = rows

    with tempfile.TemporaryDirectory() as work:
        doubles = build_doubles(analyzer, args.faces, people, Path(work))
        cases = [(p, t) for p in doubles for t, (_, who) in templates.items() if who != p]
        if args.smoke:
            cases = cases[:2]
        print(f"{'person':<10}{'template':<26}{'identity':>9}{'vs tmpl':>9}{'copy-paste':>11}{'tone':>7}{'bleed':>7}{'s':>7}")
        rows, sheet, pasting = [], [], []
        for person, name in cases:
            template = analyse_template(load_photo(templates[name][0].read_bytes()), analyzer)
            started = time.perf_counter()
            (result,) = render_portraits(doubles[person].persona, [template], analyzer)
            seconds = time.perf_counter() - started
            portrait, original = np.asarray(result.image), np.asarray(template.image)
            found = face_near(analyzer, result.image, template.face)
            copy_paste = float("nan")
            if found is None:
                identity = own = float("inf")
            else:
                descriptor = raw_descriptor(analyzer, result.image, found)
                distances = {n: float(np.linalg.norm(d - descriptor)) for n, d in photo_descriptors[person].items()}
                identity = float(np.mean(list(distances.values())))
                own = float(np.linalg.norm(raw_descriptor(analyzer, template.image, template.face) - descriptor))
                reference = doubles[person].reference_name
                unseen = [d for n, d in distances.items() if n != reference]
                if unseen:
                    copy_paste = float(np.mean(unseen)) - distances[reference]
                    pasting.append(copy_paste)
            tone, spill = tone_gap(portrait, original, template.face), bleed(portrait, original, template.face)
            rows.append((identity, tone, spill, seconds))
            print(f"{person:<10}{name:<26}{identity:>9.3f}{own:>9.3f}{copy_paste:>11.3f}{tone:>7.2f}{spill:>7.2f}{seconds:>7.2f}")
            stem = f"{person}--{Path(name).stem}.png"
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                result.image.save(args.save / stem)
            sheet.append((template.image, args.before / stem if args.before else None, result.image, template.face))
        if args.sheet:
            contact_sheet(sheet).save(args.sheet)
            print(f"contact sheet: {args.sheet}")
    identities, tones, spills, times = zip(*rows)
    print(
        f"worst_identity={max(identities):.3f} worst_tone={max(tones):.2f} median_tone={statistics.median(tones):.2f} "
        f"worst_bleed={max(spills):.2f} seconds_per_portrait={statistics.mean(times):.3f} "
        f"mean_copy_paste={statistics.mean(pasting):.3f}"
    )


def contact_sheet(rows: list, side: int = 256) -> Image.Image:
    """One row per case: the template's face region, the earlier portrait (if any), this one."""
    columns = 3 if any(before is not None for _, before, _, _ in rows) else 2
    sheet = Image.new("RGB", (columns * side, len(rows) * side), "white")
    for row, (template, before, after, face) in enumerate(rows):
        x0, y0, x1, y1 = face.box
        reach = 1.2 * max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        window = (round(cx - reach), round(cy - reach), round(cx + reach), round(cy + reach))
        images = [template] + ([Image.open(before)] if columns == 3 and before and before.is_file() else
                               [Image.new("RGB", template.size, "white")] if columns == 3 else []) + [after]
        for column, image in enumerate(images):
            sheet.paste(image.convert("RGB").crop(window).resize((side, side)), (column * side, row * side))
    return sheet


if __name__ == "__main__":
    main()
