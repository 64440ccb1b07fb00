"""Preprocessing on real photos: decisions, scores, crops, the written folder and the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from PIL.PngImagePlugin import PngInfo

from pipeline.common import CancelToken, Cancelled, Progress
from pipeline.faces import model_files_id
from pipeline.preprocess import (
    REASONS, CutOuts, PhotoCheck, PreprocessConfig, check_key, check_photo, cut_key, grabcut_onto_white, inspect_photo,
    load_photo, no_restoration, preprocess, roll, upright_turn, write_preprocessed,
)
from tests.jobs_fixtures import five_obamas

REPO = Path(__file__).resolve().parents[2]
OBAMA = ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama1.jpg", "obama-480p.jpg"]
PERSONA = OBAMA + ["obama_partial_face.jpg", "biden.jpg", "two_people.jpg"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def landscape_without_face() -> bytes:
    """A sky-and-ground picture: smooth gradients and a sun, nothing face-like."""
    y, x = np.mgrid[0:480, 0:640]
    sky = np.stack([90 + y // 4, 140 + y // 6, 235 - y // 8], axis=-1)
    ground = np.stack([60 + x // 16, 120 + x // 20, 40 + 0 * x], axis=-1)
    pixels = np.where((y > 300)[..., None], ground, sky)
    pixels[(x - 500) ** 2 + (y - 90) ** 2 < 40**2] = (255, 230, 120)
    return png_bytes(Image.fromarray(pixels.astype(np.uint8)))


@pytest.fixture(scope="module")
def persona_photos(faces_dir: Path) -> list[tuple[str, bytes]]:
    photos = [(name, (faces_dir / name).read_bytes()) for name in PERSONA]
    return photos + [("landscape.png", landscape_without_face())]


@pytest.fixture(scope="module")
def run(persona_photos, dlib_analyzer):
    """One preprocessing of the persona, with every progress report it made."""
    reports: list[Progress] = []
    result = preprocess(persona_photos, dlib_analyzer, progress=reports.append)
    return result, reports


@pytest.fixture(scope="module")
def result(run):
    return run[0]


def reasons_of(result) -> dict[str, str | None]:
    return {decision.name: decision.reason for decision in result.decisions}


def test_obama_photos_are_kept_and_the_others_refused_with_reasons(result):
    reasons = reasons_of(result)
    assert list(reasons) == PERSONA + ["landscape.png"]
    for name in ("obama2.jpg", "obama3.jpg", "obama1.jpg"):
        assert reasons[name] is None, name
    # obama-480p.jpg is the official portrait letterboxed: one of the two may go.
    portrait = sorted([reasons["obama.jpg"] or "", reasons["obama-480p.jpg"] or ""])
    assert portrait in (["", ""], ["", "near_duplicate"])
    assert reasons["obama_partial_face.jpg"] == "face_cut_off"
    assert reasons["biden.jpg"] == "different_person"
    assert reasons["two_people.jpg"] == "multiple_faces"
    assert reasons["landscape.png"] == "no_face"


def test_every_refusal_carries_its_english_message(result):
    for decision in result.decisions:
        assert decision.accepted == (decision.reason is None)
        assert decision.message == (REASONS[decision.reason] if decision.reason else None)


def test_scores_rank_the_person_above_the_stranger(result):
    scores = {decision.name: decision.scores for decision in result.decisions}
    assert scores["two_people.jpg"] is None and scores["landscape.png"] is None
    for name in OBAMA:
        assert 0.0 <= scores[name].quality <= 1.0
        assert 0.8 <= scores[name].angle <= 1.0
        assert scores[name].similarity > scores["biden.jpg"].similarity


def test_reference_is_a_selected_obama_photo_with_keypoints_in_its_crop(result):
    selected = [image.name for image in result.train]
    assert result.reference is not None and result.reference.name in selected
    assert result.reference.name in OBAMA
    crop = result.reference.crop
    assert crop.image.size == (512, 512)
    x0, y0, x1, y1 = crop.box
    assert crop.keypoints.shape == (5, 2)
    assert ((crop.keypoints > (x0, y0)) & (crop.keypoints < (x1, y1))).all()
    # box x3: a third of the crop wide, more only when the photo is too small for x3
    assert 512 / 3 - 1 <= x1 - x0 <= 512 / 2


def test_training_images_are_square_crops_on_white(result):
    accepted = [decision.name for decision in result.decisions if decision.accepted]
    assert sorted(image.name for image in result.train) == sorted(accepted)
    for image in result.train:
        pixels = np.asarray(image.image)
        assert image.image.size == (512, 512) and image.image.mode == "RGB"
        assert (pixels[:8, :8] >= 250).all(), "the top corner is background: white"
        assert pixels[200:300, 220:290].mean() < 230, "the face in the middle is kept"


def test_progress_is_reported_per_photo_and_ends_at_one(run, persona_photos):
    _, reports = run
    fractions = [report.fraction for report in reports]
    assert len(reports) >= len(persona_photos)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(report.stage == "preprocess" for report in reports)


def test_cancel_stops_before_the_next_photo(faces_dir, dlib_analyzer):
    token = CancelToken()
    seen: list[Progress] = []

    def cancel_after_first(report: Progress) -> None:
        seen.append(report)
        token.cancel()

    photos = [("landscape.png", landscape_without_face()), ("obama.jpg", (faces_dir / "obama.jpg").read_bytes())]
    with pytest.raises(Cancelled):
        preprocess(photos, dlib_analyzer, progress=cancel_after_first, cancel=token)
    assert len(seen) == 1


def test_surplus_photos_are_refused_as_not_needed(faces_dir, dlib_analyzer):
    photos = [(name, (faces_dir / name).read_bytes()) for name in ("obama_small.jpg", "obama2.jpg", "obama3.jpg")]
    result = preprocess(photos, dlib_analyzer, PreprocessConfig(max_train_photos=2))
    assert sorted(decision.reason or "" for decision in result.decisions) == ["", "", "not_needed"]
    assert len(result.train) == 2


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda image: image.filter(ImageFilter.GaussianBlur(8)), "too_blurry"),
        (lambda image: ImageEnhance.Brightness(image).enhance(0.2), "too_dark"),
        (lambda image: image.resize((image.width // 4, image.height // 4)), "face_too_small"),
    ],
    ids=["blurred", "darkened", "shrunk"],
)
def test_poor_photos_are_refused(change, reason, face_photo, dlib_analyzer):
    decision, _ = check_photo(0, "obama.jpg", change(face_photo("obama.jpg")), dlib_analyzer, PreprocessConfig())
    assert decision.reason == reason
    assert decision.scores is not None


def test_heic_photos_are_read(face_photo):
    buffer = io.BytesIO()
    face_photo("obama_small.jpg").save(buffer, format="HEIF")
    photo = load_photo(buffer.getvalue())
    assert photo is not None and photo.size == (320, 240) and photo.mode == "RGB"


# Photos with odd metadata or odd encodings, as cameras, editors and attackers write them. The
# site's upload tests (tests/test_photo_upload.py) send the same files through the upload form.

def encoded_as(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_with_bad_exif(image: Image.Image) -> bytes:
    """A JFIF JPEG whose EXIF block has a bad TIFF header: reading it raises SyntaxError."""
    return encoded_as(image, "JPEG", dpi=(72, 72), exif=b"Exif\x00\x00JUNKJUNKJUNK")


def png_with_bad_exif(image: Image.Image) -> bytes:
    """A PNG whose eXIf chunk is not TIFF: reading it raises SyntaxError."""
    return encoded_as(image, "PNG", exif=b"JUNKJUNKJUNK")


def png_with_junk_raw_profile(image: Image.Image) -> bytes:
    """A PNG with ImageMagick's "Raw profile type exif" text chunk holding no hex: ValueError."""
    text = PngInfo()
    text.add_text("Raw profile type exif", "\nexif\n      24\nthis is not hexadecimal\n")
    return encoded_as(image, "PNG", pnginfo=text)


def mpo(first: Image.Image, second: Image.Image) -> bytes:
    """A multi-picture JPEG (MPO), as dual-lens cameras and several phones write them."""
    return encoded_as(first, "MPO", save_all=True, append_images=[second])


def scan_bomb(size: tuple[int, int], scans: int) -> bytes:
    """A progressive JPEG of `size` whose last scan is repeated to `scans` scans: a few hundred
    kilobytes that cost libjpeg about 1 ns per pixel and scan (3000 x 3000 x 2,000: ~18 s)."""
    data = encoded_as(Image.new("L", size, 128), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")  # this flat picture's scans hold no FF byte but their markers'
    return data[:-2] + data[last:-2] * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


@pytest.mark.parametrize("make", [jpeg_with_bad_exif, png_with_bad_exif, png_with_junk_raw_profile])
def test_malformed_metadata_is_ignored_and_the_pixels_kept(make, face_photo):
    original = face_photo("obama_small.jpg")
    photo = load_photo(make(original))
    assert photo is not None and photo.size == original.size and photo.mode == "RGB"
    difference = np.abs(np.asarray(photo, dtype=np.int16) - np.asarray(original, dtype=np.int16))
    assert difference.mean() < 10  # the same picture (JPEG noise aside), not turned


def test_readable_orientation_is_still_applied(face_photo):
    original = face_photo("obama_small.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    assert load_photo(encoded_as(original, "JPEG", exif=exif)).size == (original.height, original.width)


def test_a_scan_bomb_is_refused_within_a_cpu_budget():
    bomb = scan_bomb((3000, 3000), 2000)
    started = time.process_time()
    assert load_photo(bomb) is None
    assert time.process_time() - started < 1.0


def test_ordinary_progressive_jpegs_are_read(face_photo):
    original = face_photo("obama.jpg")
    data = encoded_as(original, "JPEG", progressive=True)
    assert data.count(b"\xff\xda") == 10
    assert load_photo(data).size == original.size


def test_non_image_bytes_are_refused(dlib_analyzer):
    decision, _ = check_photo(0, "notes.txt", b"these are not pixels", dlib_analyzer, PreprocessConfig())
    assert decision.reason == "not_an_image" and decision.scores is None


def test_written_folder_holds_crops_captions_and_persona_json(result, tmp_path):
    write_preprocessed(result, tmp_path)
    persona = json.loads((tmp_path / "persona.json").read_text(encoding="utf-8"))
    assert persona["version"] == 1 and persona["backend"] == "dlib"
    assert persona["reference"]["name"] == result.reference.name
    assert np.array(persona["reference"]["keypoints"]).shape == (5, 2)
    assert Image.open(tmp_path / persona["reference"]["image"]).size == (512, 512)
    assert len(persona["train"]) == len(result.train) >= 3
    for item in persona["train"]:
        assert Image.open(tmp_path / item["image"]).size == (512, 512)
        assert (tmp_path / item["image"]).with_suffix(".txt").read_text(encoding="utf-8").strip() == persona["caption"]
        assert len(item["embedding"]) == 128
    assert [photo["reason"] for photo in persona["photos"]] == [d.reason for d in result.decisions]


def test_command_line_prints_decisions_as_json(faces_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "two_people.jpg"):
        (photos / name).write_bytes((faces_dir / name).read_bytes())
    (photos / "landscape.png").write_bytes(landscape_without_face())
    (photos / "notes.txt").write_text("not a photo")
    command = [sys.executable, "-m", "pipeline", "preprocess", str(photos), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    reasons = {photo["name"]: photo["reason"] for photo in summary["photos"]}
    assert reasons == {
        "biden.jpg": "different_person",
        "landscape.png": "no_face",
        "notes.txt": "not_an_image",
        "obama.jpg": None,
        "obama2.jpg": None,
        "two_people.jpg": "multiple_faces",
    }
    assert summary["reference"] in ("obama.jpg", "obama2.jpg")
    messages = {photo["name"]: photo["message"] for photo in summary["photos"]}
    assert messages["biden.jpg"] == REASONS["different_person"]
    assert (tmp_path / "out" / "persona.json").is_file()


def test_command_line_reports_a_missing_folder(tmp_path):
    command = [sys.executable, "-m", "pipeline", "preprocess", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "not found" in json.loads(done.stderr)["error"]


class CountingAnalyzer:
    """The real dlib analyser, counting the photos it analyses."""

    def __init__(self, analyzer) -> None:
        self.analyzer, self.calls = analyzer, 0
        self.name, self.thresholds, self.model_id = analyzer.name, analyzer.thresholds, analyzer.model_id

    def analyze(self, image):
        self.calls += 1
        return self.analyzer.analyze(image)


def test_known_checks_stand_in_for_analysis_and_give_the_same_result(result, persona_photos, dlib_analyzer):
    counting = CountingAnalyzer(dlib_analyzer)
    # Through JSON, as the site stores them; one photo's check is missing and one is from other checks.
    known = {name: PhotoCheck.from_json(json.loads(json.dumps(check.to_json())))
             for (name, _), check in zip(persona_photos, result.checks)}
    del known["obama2.jpg"]
    known["obama3.jpg"] = replace(known["obama3.jpg"], key="dlib/v0/old")
    again = preprocess(persona_photos, counting, known=known)
    assert counting.calls == 2  # the photo without a check and the one with another key
    assert again.decisions == result.decisions
    assert [t.name for t in again.train] == [t.name for t in result.train]
    assert all(np.array_equal(a.embedding, b.embedding) for a, b in zip(again.train, result.train))
    assert again.reference.name == result.reference.name
    assert [c.to_json() for c in again.checks] == [c.to_json() for c in result.checks]


def test_known_photos_keep_their_cut_out_and_the_others_are_cut(result, persona_photos, dlib_analyzer):
    """An earlier run's training image stands in for segmenting a photo whose check is known."""
    known = {name: check for (name, _), check in zip(persona_photos, result.checks)}
    first, second, third = (item.name for item in result.train[:3])
    del known[third]  # analysed again, so cut again
    stand_in = Image.new("RGB", result.train[0].image.size, (12, 200, 40))  # no segmenter draws this
    cut = {first: stand_in, second: stand_in.resize((64, 64)), third: stand_in}  # second: not its crop's size
    segmented = []

    def grabcut(image, box):
        segmented.append(image.size)
        return grabcut_onto_white(image, box)

    again = preprocess(persona_photos, dlib_analyzer, known=known, cut=CutOuts(cut_key(no_restoration, grabcut), cut),
                       segment=grabcut)
    images = {item.name: item.image for item in again.train}
    assert images[first] is stand_in and len(segmented) == len(again.train) - 1
    assert images[second].size == stand_in.size and images[third] is not stand_in
    assert np.asarray(images[third])[0, 0].tolist() == [255, 255, 255]  # a fresh cut, onto white
    assert again.cut_key == cut_key(no_restoration, grabcut) != result.cut_key

    # Cut another way (here: the default segmenter, or an older version of it): all cut again.
    segmented.clear()
    anew = preprocess(persona_photos, dlib_analyzer, known=known, cut=CutOuts(result.cut_key, cut), segment=grabcut)
    assert all(item.image is not stand_in for item in anew.train) and len(segmented) == len(anew.train)


def test_checks_are_keyed_by_the_face_models_their_thresholds_and_the_settings(dlib_analyzer, tmp_path):
    key = check_key(dlib_analyzer, PreprocessConfig())
    assert dlib_analyzer.model_id.startswith("dlib-") and key.startswith(dlib_analyzer.model_id)

    def stand_in(**changes):
        fields = {"name": "dlib", "model_id": dlib_analyzer.model_id, "thresholds": dlib_analyzer.thresholds}
        return SimpleNamespace(**{**fields, **changes})

    assert check_key(stand_in(), PreprocessConfig()) == key
    stricter = replace(dlib_analyzer.thresholds, min_sharpness=1.0)
    assert check_key(stand_in(thresholds=stricter), PreprocessConfig()) != key
    assert check_key(stand_in(), PreprocessConfig(crop_scale=2.5)) != key
    pack = tmp_path / "w600k_r50.onnx"
    pack.write_bytes(b"a" * 10)
    first = model_files_id("insightface", [pack])
    pack.write_bytes(b"a" * 11)  # another pack in the same folder
    assert model_files_id("insightface", [pack]) != first


# Who the double is (issue 25): a vote of the person's photos, mirrors, turned photos, two people.

@pytest.fixture(scope="module")
def select(dlib_analyzer):
    """preprocess() of (name, data) photos, each name analysed once per module as the site does
    (its check is reused), with a quick stand-in for GrabCut: the selection is what is tested.
    Checks given as `known` (a test's own, changed ones) are used for that run only."""
    checks: dict[str, PhotoCheck] = {}

    def run(photos, config=PreprocessConfig(), known=None):
        result = preprocess(photos, dlib_analyzer, config, known=known or checks, segment=lambda image, box: image)
        if known is None:
            checks.update((name, check) for (name, _), check in zip(photos, result.checks))
        return result

    return run


def photo(faces_dir: Path, name: str) -> tuple[str, bytes]:
    return name, (faces_dir / name).read_bytes()


def limit_of(analyzer) -> float:
    return analyzer.thresholds.same_person_distance


@pytest.mark.parametrize("strangers", [["biden.jpg"], ["biden.jpg", "biden2.jpg"]], ids=["once", "twice"])
def test_a_strangers_photos_are_refused_never_the_reference_never_trained(strangers, select, faces_dir, dlib_analyzer):
    result = select(five_obamas() + [photo(faces_dir, name) for name in strangers])
    reasons = reasons_of(result)
    assert [reasons[name] for name, _ in five_obamas()] == [None] * 5
    assert [reasons[name] for name in strangers] == ["different_person"] * len(strangers)
    assert not {item.name for item in result.train} & set(strangers)
    assert result.reference.name not in strangers and result.people == []
    # Honest margins: the vote decides with room on both sides of the limit.
    distances = {d.name: d.scores.majority_distance for d in result.decisions}
    assert max(distances[name] for name, _ in five_obamas()) <= limit_of(dlib_analyzer) - 0.03
    assert min(distances[name] for name in strangers) >= limit_of(dlib_analyzer) + 0.03


def look_alike(stranger: np.ndarray, towards: np.ndarray, distance: float) -> np.ndarray:
    """The stranger's embedding moved along the arc towards `towards` until it lies `distance` from it."""
    low, high = 0.0, 1.0
    for _ in range(40):
        mix = (low + high) / 2
        moved = (1 - mix) * stranger + mix * towards
        moved /= np.linalg.norm(moved)
        low, high = (mix, high) if np.linalg.norm(moved - towards) > distance else (low, mix)
    return moved.astype(np.float32)


def test_a_look_alike_inside_the_limit_of_one_photo_cannot_pull_the_centre(select, faces_dir, dlib_analyzer):
    """The issue's look-alike: two photos of a stranger within the same-person distance of the
    medoid, the photo the old centre was built around, and beyond it from the person's other
    photos. The old centre took them in and moved towards them (they lay 0.32 from it); the vote
    refuses them."""
    photos = five_obamas() + [photo(faces_dir, "biden.jpg"), photo(faces_dir, "biden2.jpg")]
    first = select(photos)
    checks = {name: check for (name, _), check in zip(photos, first.checks)}
    obamas = np.stack([checks[name].face.embedding for name, _ in five_obamas()])
    medoid = obamas[np.argmin(np.linalg.norm(obamas[:, None] - obamas[None], axis=-1).sum(axis=1))]
    limit = limit_of(dlib_analyzer)
    for name in ("biden.jpg", "biden2.jpg"):
        face = replace(checks[name].face, embedding=look_alike(checks[name].face.embedding, medoid, limit - 0.001))
        checks[name] = replace(checks[name], face=face)
        assert np.linalg.norm(face.embedding - medoid) < limit
        assert sum(np.linalg.norm(obamas - face.embedding, axis=1) < limit) == 1  # the medoid only
    result = select(photos, known=checks)
    reasons = reasons_of(result)
    assert reasons["biden.jpg"] == reasons["biden2.jpg"] == "different_person"
    assert [reasons[name] for name, _ in five_obamas()] == [None] * 5
    assert result.reference.name not in ("biden.jpg", "biden2.jpg")


def test_a_mirrored_copy_is_a_near_duplicate(select, faces_dir, face_photo, dlib_analyzer):
    mirrored = ("obama2-mirrored.jpg", encoded_as(face_photo("obama2.jpg").transpose(Image.FLIP_LEFT_RIGHT), "JPEG"))
    photos = [photo(faces_dir, name) for name in ("obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg")] + [mirrored]
    result = select(photos)
    reasons = reasons_of(result)
    assert sorted([reasons["obama2.jpg"] or "", reasons["obama2-mirrored.jpg"] or ""]) == ["", "near_duplicate"]
    assert len(result.train) == 4
    # Caught by the mirrored embedding: the plain ones lie beyond the near-duplicate distance.
    plain, copy = (result.checks[index].face.embedding for index in (2, 4))
    assert np.linalg.norm(plain - copy) > dlib_analyzer.thresholds.near_duplicate_distance


def test_an_upside_down_photo_without_exif_is_turned_upright_and_kept(select, face_photo, dlib_analyzer):
    upside_down = ("obama3-upside-down.jpg", encoded_as(face_photo("obama3.jpg").rotate(180), "JPEG"))
    photos = [*five_obamas()[:3], five_obamas()[4], upside_down]  # obama3.jpg itself left out
    result = select(photos)
    assert reasons_of(result)["obama3-upside-down.jpg"] is None
    assert "obama3-upside-down.jpg" in {item.name for item in result.train}
    check = result.checks[-1]
    assert check.turn == 180 and check.scores.angle > 0.9
    # Cropped from the photo turned upright: the crop shows the face, upright.
    candidate, _ = check_photo(0, upside_down[0], upside_down[1], dlib_analyzer, PreprocessConfig(), check)
    (face,) = dlib_analyzer.analyze(candidate.crop.image)
    assert upright_turn(face) == 0 and abs(roll(face)) < 10


def turned_points(points: np.ndarray, size: tuple[int, int], turn: int) -> np.ndarray:
    """Where PIL's rotate(turn, expand=True) moves points of a photo of `size`."""
    (width, height), x, y = size, points[:, 0], points[:, 1]
    moved = {0: (x, y), 90: (y, width - x), 180: (width - x, height - y), 270: (height - y, x)}[turn]
    return np.stack(moved, axis=1).astype(np.float32)


@pytest.mark.parametrize("turn", [90, 180, 270])
def test_a_face_found_on_its_side_is_turned_upright_and_analysed_again(turn, face_photo, dlib_analyzer):
    """As insightface's SCRFD finds faces at any roll: the keypoints say which quarter turn sets
    the photo upright, and the face is analysed again there."""
    upright = face_photo("obama_small.jpg")
    (face,) = dlib_analyzer.analyze(upright)
    taken = upright.rotate(-turn % 360, expand=True)  # what rotate(turn) sets upright again
    sideways = replace(face, keypoints=turned_points(face.keypoints, upright.size, -turn % 360))
    assert upright_turn(sideways) == turn and upright_turn(face) == 0

    class FindsFacesAtAnyRoll(CountingAnalyzer):
        def analyze(self, image):
            self.calls += 1
            return [sideways] if image is taken else self.analyzer.analyze(image)

    check = inspect_photo(taken, FindsFacesAtAnyRoll(dlib_analyzer), PreprocessConfig())
    assert check.reason is None and check.turn == turn
    assert np.allclose(check.face.keypoints, face.keypoints, atol=1)  # the upright photo's face


def test_two_people_in_one_set_are_told_and_nothing_is_selected(select, faces_dir, tmp_path):
    names = ["obama.jpg", "obama1.jpg", "obama2.jpg", "biden.jpg", "biden2.jpg"]
    result = select([photo(faces_dir, name) for name in names])
    assert result.people == [names[:3], names[3:]]
    assert [(d.reason, d.person) for d in result.decisions] == [("several_people", 1)] * 3 + [("several_people", 2)] * 2
    assert result.decisions[0].message == REASONS["several_people"]
    assert result.train == [] and result.reference is None and result.held_out is None
    persona = write_preprocessed(result, tmp_path)
    assert persona["train"] == [] and [p["person"] for p in persona["photos"]] == [1, 1, 1, 2, 2]


def test_a_clear_majority_is_the_double_and_the_second_person_refused(select, faces_dir):
    """4 photos of one person and 2 of another: each of the four agrees with most of the others."""
    names = ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "biden2.jpg"]
    result = select([photo(faces_dir, name) for name in names])
    assert [d.reason for d in result.decisions] == [None] * 4 + ["different_person"] * 2
    assert result.people == []


def test_a_held_out_reference_is_kept_out_of_training_and_recorded(select, tmp_path):
    result = select(five_obamas(), PreprocessConfig(held_out_from=5))
    held = result.held_out
    assert held is not None and held.name not in {item.name for item in result.train}
    assert held.name != result.reference.name and len(result.train) == 4
    (decision,) = [d for d in result.decisions if d.held_out]
    assert decision.name == held.name and decision.accepted
    persona = write_preprocessed(result, tmp_path)
    assert persona["held_out"]["name"] == held.name and len(persona["held_out"]["embedding"]) == 128
    assert select(five_obamas()).held_out is None  # 5 photos: all of them train (held_out_from=7)
