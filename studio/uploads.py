"""Checks an uploaded file and turns it into a clean JPEG, or refuses it with a reason.

Formats are recognised by content, not by name. The image is decoded once, uprighted by its
EXIF orientation where that can be read, and re-encoded from pixels, so no metadata block (EXIF,
GPS, XMP, ICC, comments) and nothing appended to the file survives. Pillow's decompression-bomb
warning is an error here. Everything that can be refused from the header (kind, pixels, shape,
decoding cost) is refused before the pixels are decoded.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.utils.translation import gettext_lazy as _
from PIL import Image, UnidentifiedImageError
from pillow_heif import register_heif_opener

from pipeline.preprocess import load_photo, too_costly_to_decode

register_heif_opener()
log = logging.getLogger(__name__)

ALLOWED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "HEIF"}  # MPO: a phone's multi-picture JPEG
STORED_LONG_SIDE = 3000  # enough for a 512 px face crop from any selfie; keeps storage small
# Smaller or narrower pictures hold no usable face, and slivers (8000 x 2) broke the analysis.
MIN_SIDE = 64
MAX_ASPECT = 8
DISPLAY_NAME_LENGTH = 100


@dataclass(frozen=True)
class Refusal:
    """Why a file was refused, in words for the person who sent it."""

    name: str
    message: str


class RefusedFile(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def display_name(raw: str) -> str:
    """A file's name as the pages show it: its printable characters, at most DISPLAY_NAME_LENGTH
    of them, the end (the extension) kept.

    A name is display text only, never a path: a control character or a lone surrogate would
    make PostgreSQL refuse the row, and a right-to-left override can make "gpj.exe" read "exe.jpg".
    """
    name = " ".join("".join(char for char in raw if char.isprintable()).split())
    if len(name) > DISPLAY_NAME_LENGTH:
        name = name[: DISPLAY_NAME_LENGTH - 21] + "…" + name[-20:]
    return name


def _check_shape(width: int, height: int) -> None:
    """Refuses a picture too small or too narrow to hold a face, before it is decoded."""
    if min(width, height) < MIN_SIDE:
        raise RefusedFile(
            _(
                "This image is only %(width)d × %(height)d pixels. "
                "Please send a photo at least %(side)d pixels on each side."
            )
            % {"width": width, "height": height, "side": MIN_SIDE}
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise RefusedFile(
            _(
                "This image is %(width)d × %(height)d pixels: too long and narrow for a portrait. "
                "Please send a photo at most %(ratio)d times as long as it is wide."
            )
            % {"width": width, "height": height, "ratio": MAX_ASPECT}
        )


def _decode(data: bytes) -> Image.Image:
    """Header checks first (format, pixel count, shape, progressive scans), then the full decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise RefusedFile(_("This kind of file is not supported. Please send a JPEG, PNG, WebP or HEIC photo."))
            if image.width * image.height > settings.PHOTO_MAX_PIXELS:
                raise RefusedFile(_("This image has too many pixels. Please send a smaller photo."))
            _check_shape(image.width, image.height)
            if too_costly_to_decode(data, image):
                raise RefusedFile(
                    _(
                        "This JPEG is saved in too many passes (progressive scans) to be opened quickly. "
                        "Please save it again as an ordinary JPEG, or send another photo."
                    )
                )
            if image.format in ("JPEG", "MPO"):
                # Decoded at 1/2, 1/4 or 1/8 scale where that still covers what is stored: a 48 MP
                # photo took 1.3 s to decode whole, for 3000 px kept.
                image.draft("RGB", (STORED_LONG_SIDE, STORED_LONG_SIDE))
            image.load()  # an MPO's first picture
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise RefusedFile(_("This image has too many pixels. Please send a smaller photo.")) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            raise RefusedFile(_("This file is not a photo we can read, or it is damaged.")) from None
    return image


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale (PNG "I;16"/"I") scaled to 8 bits; other modes unchanged."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 else 255.0
        return Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return image


def clean_photo(upload: UploadedFile) -> bytes:
    """The upload as a metadata-free JPEG, or RefusedFile with a message for the person.

    A decoder may fail in ways no list of exceptions foresees (a plugin's struct.error, say):
    that too is this file's refusal, logged, never the whole request's error.
    """
    if not upload.size:
        raise RefusedFile(_("This file is empty."))
    if upload.size > settings.PHOTO_MAX_BYTES:
        raise RefusedFile(
            _("This file is larger than %(megabytes)d MB.") % {"megabytes": settings.PHOTO_MAX_BYTES // 2**20}
        )
    try:
        return _clean(upload.read())
    except RefusedFile:
        raise
    except Exception:
        log.exception("decoding the upload %r failed", upload.name)
        raise RefusedFile(_("This file is not a photo we can read, or it is damaged.")) from None


def _clean(data: bytes) -> bytes:
    """Decoded, uprighted, shrunk to STORED_LONG_SIDE and re-encoded from the pixels alone."""
    rgb = load_photo(_to_8_bit(_decode(data)))
    if rgb is None:
        raise RefusedFile(_("This file is not a photo we can read, or it is damaged."))
    rgb.thumbnail((STORED_LONG_SIDE, STORED_LONG_SIDE), Image.Resampling.LANCZOS)
    # A new image from the pixels alone: Pillow would otherwise carry `info` (a JPEG comment,
    # for one) into the saved file.
    pixels_only = Image.fromarray(np.asarray(rgb))
    out = io.BytesIO()
    pixels_only.save(out, "JPEG", quality=92, optimize=True)
    return out.getvalue()
